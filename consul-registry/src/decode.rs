//! Decoding a service's health answers by what changed: with thousands of instances, one
//! check flipping makes Consul send the whole list again (1.1 KB an instance; 2.5 KB from a
//! `-dev` agent), and parsing all of it on every change is most of a client's cost.
//!
//! [`Decoder`] keeps the last answer's body, where each of its entries lies, and the instance
//! each became. A new answer is walked entry by entry; at each entry the bytes ahead are
//! compared (a `memcmp`, not a parse) with the last answer's entry expected there (the one
//! after the last match, or the one after that: an entry removed; else the last answer's last
//! entry, see below). Equal bytes are the same entry, and its [`Instance`] is reused as it is
//! (the same `Arc`). Only an entry that matches none is parsed, into a view that borrows from the body and skips every field discovery
//! does not use ([`consul_api::EntryView`]); a parsed entry found in the last answer by its
//! node and ID, with the same bytes, keeps its `Arc` too.
//!
//! Why the walk follows entries rather than a common prefix and suffix: Consul 1.8.7's
//! `?passing` filter (`filterNonPassing`, agent/health_endpoint.go) removes an entry by moving
//! the *last* entry into its place, so one check turning critical changes two places of the
//! list, one of them anywhere. The walk finds the moved entry by its bytes and takes the rest
//! as they are; when the check passes again, the two entries back in their places are parsed.
//!
//! Why this is exact: an entry is a complete JSON object; a parser that starts at its first
//! byte ends at its closing brace, and what it reads depends only on the bytes in between. So
//! bytes equal to an entry of the last answer parse to that entry's instance. The list's
//! punctuation between entries is checked by the walk itself. Anything unexpected falls back
//! to a full parse, whose error (if any) is the one returned.

use std::{collections::HashMap, ops::Range, sync::Arc};

use consul_api::{EntryView, ServiceAnswer};

use crate::discovery::Instance;

/// Decodes successive health answers of one query, reusing what did not change.
#[derive(Debug, Default)]
pub struct Decoder {
    /// The last answer's body.
    body: Vec<u8>,
    /// Where each of its entries lies in it.
    spans: Vec<Range<usize>>,
    /// The instance each entry became.
    instances: Vec<Arc<Instance>>,
    /// How many entries the last decode parsed.
    parsed: usize,
    /// The body before the last one, emptied: the next answer is read into it.
    spare: Vec<u8>,
}

impl Decoder {
    /// A decoder with no previous answer: the first decode parses everything.
    pub fn new() -> Self {
        Decoder::default()
    }

    /// The instances of `answer`, in the answer's order: unchanged entries as the same `Arc`s
    /// as before, changed ones parsed. An answer that is not a list of entries is an error
    /// (and the next answer is parsed in full).
    pub fn decode(&mut self, answer: ServiceAnswer) -> consul_api::Result<Vec<Arc<Instance>>> {
        let body = answer.body();
        let last = Last {
            body: &self.body,
            spans: &self.spans,
            instances: &self.instances,
        };
        let Some((spans, instances, parsed)) = walk(body, &last) else {
            // Not a list we can walk: `null`, or malformed. Decode it the plain way, for the
            // precise error (or the rare body the walk does not take, such as `null`).
            self.clear();
            let entries = answer.entries()?;
            return Ok(entries.iter().map(|e| Arc::new(instance(e))).collect());
        };
        self.spans = spans;
        self.instances.clone_from(&instances);
        self.parsed = parsed;
        let mut old = std::mem::replace(&mut self.body, answer.into_body());
        old.clear();
        self.spare = old;
        Ok(instances)
    }

    /// An empty buffer to read the next answer into: the body of the answer before the last,
    /// with its capacity (see [`consul_api::health::Health::service_answer_into`]).
    pub fn buffer(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.spare)
    }

    /// How many entries the last decode parsed (the rest were reused).
    pub fn parsed_last(&self) -> usize {
        self.parsed
    }

    fn clear(&mut self) {
        self.body.clear();
        self.spans.clear();
        self.instances.clear();
        self.parsed = 0;
    }
}

/// The spans, instances and number of entries parsed of one decoded body.
type Decoded = (Vec<Range<usize>>, Vec<Arc<Instance>>, usize);

/// The last answer, as the walk of the next one sees it.
struct Last<'a> {
    body: &'a [u8],
    spans: &'a [Range<usize>],
    instances: &'a [Arc<Instance>],
}

impl Last<'_> {
    /// Whether `new` holds the last answer's entry `j` at `at`.
    fn matches(&self, j: usize, new: &[u8], at: usize) -> bool {
        self.spans.get(j).is_some_and(|span| {
            new.get(at..at + span.len())
                .is_some_and(|ahead| ahead == &self.body[span.clone()])
        })
    }

    /// The last answer's entry of `node` and `id`: found by a scan while few entries have
    /// been parsed (one change parses one or two), by an index built once after that.
    fn find<'a>(
        &'a self,
        index: &mut Option<HashMap<(&'a str, &'a str), usize>>,
        lookups: &mut usize,
        node: &str,
        id: &str,
    ) -> Option<usize> {
        *lookups += 1;
        if *lookups <= SCANS {
            return self
                .instances
                .iter()
                .position(|i| i.id == id && i.node == node);
        }
        let index = index.get_or_insert_with(|| {
            let mut index = HashMap::with_capacity(self.instances.len());
            for (j, i) in self.instances.iter().enumerate() {
                index.entry((i.node.as_str(), i.id.as_str())).or_insert(j);
            }
            index
        });
        index.get(&(node, id)).copied()
    }
}

/// Parsed entries looked up by a scan of the last answer before an index is built.
const SCANS: usize = 8;

/// Walk `body`'s list entry by entry, reusing `last`'s entries where the bytes are equal;
/// `None` if `body` is not a list of entries.
fn walk(body: &[u8], last: &Last<'_>) -> Option<Decoded> {
    let mut spans = Vec::with_capacity(last.spans.len() + 1);
    let mut instances = Vec::with_capacity(last.spans.len() + 1);
    let mut parsed = 0;
    // The last answer's entry expected next, and how parsed entries are found in it.
    let mut cursor = 0;
    let mut index = None;
    let mut lookups = 0;
    // Where Consul's `passing` filter takes the entry that fills a removed one's place.
    let moved = last.spans.len().checked_sub(1);
    let open = skip_ws(body, 0);
    if body.get(open) != Some(&b'[') {
        return None;
    }
    let mut pos = open + 1;
    let mut first = true;
    loop {
        pos = skip_ws(body, pos);
        match body.get(pos)? {
            b']' => {
                return (skip_ws(body, pos + 1) == body.len())
                    .then_some((spans, instances, parsed));
            }
            b',' if !first => pos = skip_ws(body, pos + 1),
            _ if first => {}
            _ => return None,
        }
        first = false;
        if let Some(j) = (cursor..cursor + 2).find(|&j| last.matches(j, body, pos)) {
            let len = last.spans[j].len();
            spans.push(pos..pos + len);
            instances.push(Arc::clone(&last.instances[j]));
            pos += len;
            cursor = j + 1;
            continue;
        }
        if let Some(j) = moved.filter(|&j| j > cursor + 1 && last.matches(j, body, pos)) {
            // The last entry, moved here; the cursor stays for the entries that follow.
            let len = last.spans[j].len();
            spans.push(pos..pos + len);
            instances.push(Arc::clone(&last.instances[j]));
            pos += len;
            continue;
        }
        let mut stream = serde_json::Deserializer::from_slice(&body[pos..]).into_iter();
        let entry: EntryView<'_> = stream.next()?.ok()?;
        let end = pos + stream.byte_offset();
        parsed += 1;
        let found = last.find(
            &mut index,
            &mut lookups,
            &entry.node.node,
            &entry.service.id,
        );
        let reused =
            found.filter(|&j| last.matches(j, body, pos) && last.spans[j].len() == end - pos);
        instances.push(match reused {
            Some(j) => Arc::clone(&last.instances[j]),
            None => Arc::new(instance(&entry)),
        });
        spans.push(pos..end);
        if let Some(j) = found {
            // The same entry changed in place, or a run of entries removed before it (the
            // next entry follows it in both answers): go on from there. An entry moved from
            // elsewhere (the last, by the `passing` filter) leaves the cursor where it is.
            let next = skip_ws(body, end);
            let next = if body.get(next) == Some(&b',') {
                skip_ws(body, next + 1)
            } else {
                next
            };
            if j <= cursor + 1 || last.matches(j + 1, body, next) {
                cursor = j + 1;
            }
        }
        pos = end;
    }
}

/// The instance an entry describes.
pub(crate) fn instance(entry: &EntryView<'_>) -> Instance {
    let service = &entry.service;
    Instance {
        id: service.id.clone().into_owned(),
        node: entry.node.node.clone().into_owned(),
        host: entry.address().to_owned(),
        port: service.port,
        tags: service
            .tags
            .iter()
            .flatten()
            .map(|t| t.clone().into_owned())
            .collect(),
        meta: service
            .meta
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone().into_owned(), v.clone().into_owned()))
            .collect(),
        weight: service.weights.unwrap_or_default().passing,
    }
}

fn skip_ws(body: &[u8], mut pos: usize) -> usize {
    while let Some(b' ' | b'\n' | b'\r' | b'\t') = body.get(pos) {
        pos += 1;
    }
    pos
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng, rngs::StdRng};
    use serde_json::{Value, json};

    use super::*;

    fn entry(i: usize, status: &str, version: &str) -> Value {
        json!({
            "Node": {"ID": "n", "Node": format!("node-{}", i % 7), "Address": "10.0.0.1",
                     "TaggedAddresses": {"lan": "10.0.0.1"}, "Meta": {"a": "b"}},
            "Service": {"ID": format!("scale-{i:05}"), "Service": "scale",
                        "Tags": ["v1", "quote\"d"], "Address": if i.is_multiple_of(3) { "" } else { "127.0.0.2" },
                        "Meta": {"version": version}, "Port": 20000 + i,
                        "Weights": {"Passing": 1 + i % 4, "Warning": 1},
                        "Proxy": {"MeshGateway": {}, "Expose": {}}, "Connect": {}},
            "Checks": [
                {"Node": "n", "CheckID": "serfHealth", "Status": "passing",
                 "Output": "Agent alive and reachable", "Definition": {}},
                {"Node": "n", "CheckID": format!("c{i}"), "Status": status,
                 "Output": "ok ] , [ { \" }", "Definition": {}}
            ]
        })
    }

    fn body(entries: &[Value], pretty: bool) -> Vec<u8> {
        let list = Value::Array(entries.to_vec());
        if pretty {
            serde_json::to_vec_pretty(&list).expect("encode")
        } else {
            serde_json::to_vec(&list).expect("encode")
        }
    }

    fn full(body: &[u8]) -> Vec<Instance> {
        let answer = ServiceAnswer::new(body.to_vec(), "/v1/health/service/scale");
        answer
            .entries()
            .expect("valid")
            .iter()
            .map(instance)
            .collect()
    }

    fn decode(decoder: &mut Decoder, body: &[u8]) -> Vec<Arc<Instance>> {
        decoder
            .decode(ServiceAnswer::new(
                body.to_vec(),
                "/v1/health/service/scale",
            ))
            .expect("decodes")
    }

    fn plain(instances: &[Arc<Instance>]) -> Vec<Instance> {
        instances.iter().map(|i| (**i).clone()).collect()
    }

    #[test]
    fn a_changed_entry_is_the_only_one_parsed_and_the_rest_are_the_same_arcs() {
        for pretty in [false, true] {
            let mut entries: Vec<Value> = (0..50).map(|i| entry(i, "passing", "1")).collect();
            let mut decoder = Decoder::new();
            let first = decode(&mut decoder, &body(&entries, pretty));
            assert_eq!(decoder.parsed_last(), 50);
            assert_eq!(plain(&first), full(&body(&entries, pretty)));

            // One entry's meta changes in the middle.
            entries[20] = entry(20, "passing", "2");
            let second = decode(&mut decoder, &body(&entries, pretty));
            assert_eq!(decoder.parsed_last(), 1, "pretty: {pretty}");
            assert_eq!(plain(&second), full(&body(&entries, pretty)));
            for i in (0..50).filter(|&i| i != 20) {
                assert!(Arc::ptr_eq(&first[i], &second[i]), "entry {i} reused");
            }
            assert_eq!(second[20].meta["version"], "2");

            // One leaves (a check turned critical under `?passing`), then comes back.
            let gone: Vec<Value> = entries
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != 33)
                .map(|(_, e)| e.clone())
                .collect();
            let third = decode(&mut decoder, &body(&gone, pretty));
            assert_eq!(decoder.parsed_last(), 0);
            assert_eq!(plain(&third), full(&body(&gone, pretty)));
            let back = decode(&mut decoder, &body(&entries, pretty));
            assert_eq!(decoder.parsed_last(), 1);
            assert_eq!(plain(&back), full(&body(&entries, pretty)));
        }
    }

    /// Consul 1.8.7's `?passing` filter removes an entry by moving the last one into its
    /// place (`filterNonPassing`); when the check passes again the list is back in order.
    fn swap_remove(entries: &[Value], at: usize) -> Vec<Value> {
        let mut out = entries.to_vec();
        out.swap_remove(at);
        out
    }

    #[test]
    fn consuls_passing_filter_moving_the_last_entry_costs_no_parse() {
        for pretty in [false, true] {
            let entries: Vec<Value> = (0..200).map(|i| entry(i, "passing", "1")).collect();
            let mut decoder = Decoder::new();
            let mut ordered = decode(&mut decoder, &body(&entries, pretty));
            for at in [0, 77, 198, 199] {
                // The check of entry `at` turns critical: the last entry takes its place.
                let critical = swap_remove(&entries, at);
                let moved = decode(&mut decoder, &body(&critical, pretty));
                assert_eq!(plain(&moved), full(&body(&critical, pretty)), "at {at}");
                assert_eq!(decoder.parsed_last(), 0, "at {at}");
                for (i, instance) in moved.iter().enumerate() {
                    let was = if i == at { 199 } else { i };
                    assert!(
                        Arc::ptr_eq(instance, &ordered[was]),
                        "at {at}: entry {i} reused"
                    );
                }
                // It passes again: the list is back in order, two entries in new places.
                let back = decode(&mut decoder, &body(&entries, pretty));
                assert_eq!(plain(&back), full(&body(&entries, pretty)), "at {at}");
                assert!(
                    decoder.parsed_last() <= 2,
                    "at {at}: {}",
                    decoder.parsed_last()
                );
                // All but the one that was gone are the same `Arc`s as before it went.
                let reused = back
                    .iter()
                    .zip(&ordered)
                    .filter(|(a, b)| Arc::ptr_eq(a, b))
                    .count();
                assert_eq!(reused, 199, "at {at}");
                ordered = back;
            }
            // Ten entries in a row go: the rest are found again after one parse.
            let mut fewer = entries.clone();
            fewer.drain(100..110);
            decode(&mut decoder, &body(&fewer, pretty));
            assert_eq!(decoder.parsed_last(), 1, "a run of removals");
        }
    }

    #[test]
    fn random_edits_decode_exactly_as_a_full_parse() {
        let mut rng = StdRng::seed_from_u64(7);
        for pretty in [false, true] {
            let mut decoder = Decoder::new();
            let mut entries: Vec<Value> = (0..30).map(|i| entry(i, "passing", "1")).collect();
            let mut next = 30;
            for round in 0..400 {
                match rng.random_range(0..7) {
                    0 if !entries.is_empty() => {
                        let at = rng.random_range(0..entries.len());
                        entries.remove(at);
                    }
                    1 => {
                        let at = rng.random_range(0..=entries.len());
                        entries.insert(at, entry(next, "passing", "1"));
                        next += 1;
                    }
                    2 if !entries.is_empty() => {
                        let at = rng.random_range(0..entries.len());
                        let version = rng.random_range(0..1000).to_string();
                        entries[at]["Service"]["Meta"]["version"] = Value::String(version);
                    }
                    3 if !entries.is_empty() => {
                        let at = rng.random_range(0..entries.len());
                        entries[at]["Checks"][1]["Status"] = json!("warning");
                    }
                    5 if !entries.is_empty() => {
                        let at = rng.random_range(0..entries.len());
                        entries = swap_remove(&entries, at);
                    }
                    4 if entries.len() > 1 => {
                        // Two edits far apart.
                        let last = entries.len() - 1;
                        entries[0]["Service"]["Port"] = json!(rng.random_range(1..60000));
                        entries[last]["Service"]["Tags"] = json!(["x", "y"]);
                    }
                    _ => {
                        // An identical answer (a blocking query woken by another service).
                    }
                }
                let bytes = body(&entries, pretty);
                let got = plain(&decode(&mut decoder, &bytes));
                assert_eq!(got, full(&bytes), "round {round}, pretty {pretty}");
            }
        }
    }

    #[test]
    fn empty_null_and_malformed_answers() {
        let mut decoder = Decoder::new();
        assert!(decode(&mut decoder, b"[]").is_empty());
        assert!(decode(&mut decoder, b"null").is_empty());
        let entries: Vec<Value> = (0..3).map(|i| entry(i, "passing", "1")).collect();
        assert_eq!(decode(&mut decoder, &body(&entries, false)).len(), 3);
        let broken = &body(&entries, false)[..200];
        let err = decoder
            .decode(ServiceAnswer::new(
                broken.to_vec(),
                "/v1/health/service/scale",
            ))
            .expect_err("truncated");
        assert!(
            err.to_string().contains("/v1/health/service/scale"),
            "{err}"
        );
        // After an error the next answer is parsed in full, and right.
        assert_eq!(decode(&mut decoder, &body(&entries, false)).len(), 3);
        assert_eq!(decoder.parsed_last(), 3);
        // Trailing garbage after the list is not accepted silently.
        let mut trailing = body(&entries, false);
        trailing.extend_from_slice(b" x");
        assert!(
            decoder
                .decode(ServiceAnswer::new(trailing, "/v1/health/service/scale"))
                .is_err()
        );
    }
}
