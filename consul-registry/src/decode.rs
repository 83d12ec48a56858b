//! Decoding a service's health answers by what changed: with thousands of instances, one
//! check flipping makes Consul send the whole list again (1.1 KB an instance; 2.5 KB from a
//! `-dev` agent), and parsing all of it on every change is most of a client's cost.
//!
//! [`Decoder`] keeps the last answer's body, where each of its entries lies, and the instance
//! each became. A new answer is compared with the last one byte for byte from both ends (a
//! `memcmp`, not a parse): entries wholly inside the common prefix or the common suffix are
//! the same entries, and their [`Instance`]s are reused as they are (the same `Arc`); only the
//! bytes between are parsed, into views that borrow from the body and skip every field
//! discovery does not use ([`consul_api::EntryView`]).
//!
//! Why this is exact: a JSON parser's state at a byte depends only on the bytes before it, so
//! the entries that end inside the common prefix parse the same in both bodies. At the other
//! end, when parsing the new body reaches the start of an entry at the same distance from the
//! end as an entry of the last body, and that point lies in the common suffix, both parsers
//! stand at the start of an entry with the same bytes ahead: the rest parses the same. When
//! that does not happen, parsing simply goes on to the end. Anything unexpected falls back to
//! a full parse, whose error (if any) is the one returned.

use std::{ops::Range, sync::Arc};

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
        let decoded = if self.spans.is_empty() {
            None
        } else {
            self.incremental(body)
        };
        let (spans, instances, parsed) = match decoded.or_else(|| parse_from(body, None)) {
            Some(decoded) => decoded,
            None => {
                // Not a list we can walk: `null`, or malformed. Decode it the plain way, for
                // the precise error (or the rare body the walk does not take, such as `null`).
                self.clear();
                let entries = answer.entries()?;
                return Ok(entries.iter().map(|e| Arc::new(instance(e))).collect());
            }
        };
        self.spans = spans;
        self.instances = instances.clone();
        self.parsed = parsed;
        self.body = answer.into_body();
        Ok(instances)
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

    /// Decode `new` against the last body, or `None` if the walk fails (then a full parse).
    fn incremental(&self, new: &[u8]) -> Option<Decoded> {
        let old = self.body.as_slice();
        let prefix = common_prefix(old, new);
        // Measured over the whole bodies: it may overlap the prefix (an entry removed between
        // two that start alike), which is right, as only the bytes after a point matter.
        let suffix = common_suffix(old, new);
        // Entries wholly in the common prefix are kept as they are.
        let kept = self.spans.partition_point(|r| r.end <= prefix);
        let reuse = Reuse {
            spans: &self.spans,
            instances: &self.instances,
            // Old entries starting in the common suffix, with the shift to the new body.
            suffix_from: old.len() - suffix,
            old_len: old.len(),
            new_len: new.len(),
        };
        let start = Start {
            spans: self.spans[..kept].to_vec(),
            instances: self.instances[..kept].to_vec(),
            at: self.spans[..kept].last().map(|r| r.end),
        };
        parse_from(new, Some((start, reuse)))
    }
}

/// The spans, instances and number of entries parsed of one decoded body.
type Decoded = (Vec<Range<usize>>, Vec<Arc<Instance>>, usize);

/// Where a walk starts: the entries kept so far and the end of the last (`None`: at the top).
struct Start {
    spans: Vec<Range<usize>>,
    instances: Vec<Arc<Instance>>,
    at: Option<usize>,
}

/// The last body's entries that a walk may take over once it reaches the common suffix.
struct Reuse<'a> {
    spans: &'a [Range<usize>],
    instances: &'a [Arc<Instance>],
    suffix_from: usize,
    old_len: usize,
    new_len: usize,
}

impl Reuse<'_> {
    /// The index of the last body's entry that starts where `new_at` lies in the new body,
    /// if that point is in the common suffix.
    fn entry_at(&self, new_at: usize) -> Option<usize> {
        let old_at = (new_at + self.old_len).checked_sub(self.new_len)?;
        if old_at < self.suffix_from {
            return None;
        }
        self.spans.binary_search_by_key(&old_at, |r| r.start).ok()
    }
}

/// Walk the top-level array of `body`: from its start, or from `start` taking over the last
/// body's entries from `reuse` once the walk reaches them. `None` if `body` is not an array
/// of entries.
fn parse_from(body: &[u8], from: Option<(Start, Reuse<'_>)>) -> Option<Decoded> {
    let (mut spans, mut instances, at, reuse) = match from {
        Some((start, reuse)) => (start.spans, start.instances, start.at, Some(reuse)),
        None => (Vec::new(), Vec::new(), None, None),
    };
    let mut parsed = 0;
    // Position after the last entry, or after the opening bracket when none is behind us.
    let mut pos = match at {
        Some(end) => end,
        None => {
            let open = skip_ws(body, 0);
            if body.get(open) != Some(&b'[') {
                return None;
            }
            open + 1
        }
    };
    let mut first = at.is_none();
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
        if let Some(reuse) = &reuse
            && let Some(j) = reuse.entry_at(pos)
        {
            let shift = |r: &Range<usize>| {
                (r.start + reuse.new_len - reuse.old_len)..(r.end + reuse.new_len - reuse.old_len)
            };
            spans.extend(reuse.spans[j..].iter().map(shift));
            instances.extend(reuse.instances[j..].iter().cloned());
            return Some((spans, instances, parsed));
        }
        let mut stream = serde_json::Deserializer::from_slice(&body[pos..]).into_iter();
        let entry: EntryView<'_> = stream.next()?.ok()?;
        let end = pos + stream.byte_offset();
        spans.push(pos..end);
        instances.push(Arc::new(instance(&entry)));
        parsed += 1;
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

/// Length of the common prefix, compared a block at a time (`memcmp`), then byte by byte.
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    const BLOCK: usize = 4096;
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + BLOCK <= n && a[i..i + BLOCK] == b[i..i + BLOCK] {
        i += BLOCK;
    }
    i + a[i..n]
        .iter()
        .zip(&b[i..n])
        .take_while(|(x, y)| x == y)
        .count()
}

/// Length of the common suffix, likewise from the end.
fn common_suffix(a: &[u8], b: &[u8]) -> usize {
    const BLOCK: usize = 4096;
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + BLOCK <= n
        && a[a.len() - i - BLOCK..a.len() - i] == b[b.len() - i - BLOCK..b.len() - i]
    {
        i += BLOCK;
    }
    i + a[..a.len() - i]
        .iter()
        .rev()
        .zip(b[..b.len() - i].iter().rev())
        .take_while(|(x, y)| x == y)
        .count()
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

    #[test]
    fn random_edits_decode_exactly_as_a_full_parse() {
        let mut rng = StdRng::seed_from_u64(7);
        for pretty in [false, true] {
            let mut decoder = Decoder::new();
            let mut entries: Vec<Value> = (0..30).map(|i| entry(i, "passing", "1")).collect();
            let mut next = 30;
            for round in 0..400 {
                match rng.random_range(0..6) {
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

    #[test]
    fn common_prefix_and_suffix_across_blocks() {
        let a: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut b = a.clone();
        b[9_000] = 0xff;
        assert_eq!(common_prefix(&a, &b), 9_000);
        assert_eq!(common_suffix(&a, &b), 999);
        assert_eq!(common_prefix(&a, &a), a.len());
        assert_eq!(common_suffix(&a[1..], &a), a.len() - 1);
    }
}
