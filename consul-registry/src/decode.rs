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

use consul_api::{BodySink, EntryView, ServiceAnswer};

use crate::discovery::Instance;

/// Decodes successive health answers of one query, reusing what did not change.
#[derive(Debug, Default)]
pub struct Decoder {
    /// The last answer's body.
    body: Vec<u8>,
    /// Where each of its entries lies in it.
    spans: Vec<Range<usize>>,
    /// The instance each entry became; `None` for an entry left out (see [`Walk::step`]).
    instances: Vec<Option<Arc<Instance>>>,
    /// How many entries the last decode parsed.
    parsed: usize,
    /// The body before the last one, emptied: the next answer is read into it (no 12 MB
    /// allocation, page faults and regrowing per answer).
    spare: Vec<u8>,
}

impl Decoder {
    /// A decoder with no previous answer: the first decode parses everything.
    pub fn new() -> Self {
        Decoder::default()
    }

    /// Start decoding the next answer as its body arrives: give the [`Decoding`] to
    /// [`Health::service_answer_to`](consul_api::health::Health::service_answer_to), then
    /// [`finish`](Decoding::finish) it. Most of the work is done chunk by chunk while the
    /// rest is in flight, each chunk compared while it is still in the CPU's cache.
    pub fn start(&mut self) -> Decoding<'_> {
        let mut body = std::mem::take(&mut self.spare);
        body.clear();
        let walk = Walk::new(self.spans.len() + 1);
        Decoding {
            decoder: self,
            body,
            walk,
        }
    }

    /// The instances of a whole `answer` (see [`start`](Self::start) to decode one as it
    /// arrives).
    pub fn decode(&mut self, answer: ServiceAnswer) -> consul_api::Result<Vec<Arc<Instance>>> {
        let mut decoding = self.start();
        BodySink::extend(&mut decoding, answer.body());
        decoding.finish(answer.path())
    }

    /// How many entries the last decode parsed (the rest were reused).
    pub fn parsed_last(&self) -> usize {
        self.parsed
    }

    fn last(&self) -> Last<'_> {
        Last {
            body: &self.body,
            spans: &self.spans,
            instances: &self.instances,
        }
    }
}

/// One answer being decoded as it arrives ([`Decoder::start`]): a [`BodySink`] that walks
/// each chunk as it comes. Dropped unfinished (the read failed), it leaves the decoder as
/// it was.
#[derive(Debug)]
pub struct Decoding<'a> {
    decoder: &'a mut Decoder,
    /// The new answer's body so far.
    body: Vec<u8>,
    walk: Walk,
}

impl BodySink for Decoding<'_> {
    fn received(&self) -> usize {
        self.body.len()
    }

    fn reserve(&mut self, additional: usize) {
        self.body.reserve(additional);
    }

    fn extend(&mut self, chunk: &[u8]) {
        self.body.extend_from_slice(chunk);
        self.walk.run(&self.body, false, &self.decoder.last());
    }
}

impl Decoding<'_> {
    /// The whole answer has arrived (from `path`, for errors): its instances, in the answer's
    /// order, unchanged entries as the same `Arc`s as before, changed ones parsed. An answer
    /// that is not a list of entries is an error (and the next answer is parsed in full).
    pub fn finish(mut self, path: &str) -> consul_api::Result<Vec<Arc<Instance>>> {
        let body = std::mem::take(&mut self.body);
        self.walk.run(&body, true, &self.decoder.last());
        let decoder = &mut *self.decoder;
        if self.walk.state == State::Ended {
            let walk = std::mem::take(&mut self.walk);
            decoder.spans = walk.spans;
            decoder.parsed = walk.parsed;
            decoder.spare = std::mem::replace(&mut decoder.body, body);
            let instances = walk.instances.iter().flatten().cloned().collect();
            decoder.instances = walk.instances;
            return Ok(instances);
        }
        // Not a list we can walk: `null`, or malformed. Decode it the plain way, for the
        // precise error (or the rare body the walk does not take, such as `null`); the next
        // answer is parsed in full.
        decoder.body.clear();
        decoder.spans.clear();
        decoder.instances.clear();
        decoder.parsed = 0;
        let answer = ServiceAnswer::new(body, path);
        let instances = answer
            .entries()
            .map(|entries| entries.iter().map(|e| Arc::new(instance(e))).collect());
        decoder.spare = answer.into_body();
        instances
    }
}

impl Drop for Decoding<'_> {
    fn drop(&mut self) {
        if self.body.capacity() > self.decoder.spare.capacity() {
            self.decoder.spare = std::mem::take(&mut self.body);
        }
    }
}

/// The last answer, as the walk of the next one sees it.
struct Last<'a> {
    body: &'a [u8],
    spans: &'a [Range<usize>],
    instances: &'a [Option<Arc<Instance>>],
}

/// Whether the bytes ahead are a given entry of the last answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Same {
    Yes,
    No,
    /// What has arrived so far agrees; the rest has not arrived.
    Unknown,
}

impl Last<'_> {
    /// Whether `new` holds the last answer's entry `j` at `at` (`complete`: nothing more of
    /// `new` is coming).
    fn compare(&self, j: usize, new: &[u8], at: usize, complete: bool) -> Same {
        let Some(span) = self.spans.get(j) else {
            return Same::No;
        };
        let old = &self.body[span.clone()];
        let ahead = new.get(at..).unwrap_or_default();
        if let Some(ahead) = ahead.get(..old.len()) {
            return if ahead == old { Same::Yes } else { Same::No };
        }
        if !complete && old.starts_with(ahead) {
            Same::Unknown
        } else {
            Same::No
        }
    }

    /// The last answer's entry of `node` and `id`: found by a scan while few entries have
    /// been parsed (one change parses one or two), by an index built once after that.
    fn find(
        &self,
        index: &mut Option<Index>,
        lookups: usize,
        node: &str,
        id: &str,
    ) -> Option<usize> {
        if lookups <= SCANS {
            return self
                .instances
                .iter()
                .position(|i| i.as_ref().is_some_and(|i| i.id == id && i.node == node));
        }
        let index = index.get_or_insert_with(|| {
            let mut index = Index::new();
            for (j, i) in self.instances.iter().enumerate() {
                let Some(i) = i else { continue };
                index
                    .entry(i.node.clone())
                    .or_default()
                    .entry(i.id.clone())
                    .or_insert(j);
            }
            index
        });
        index.get(node)?.get(id).copied()
    }
}

/// The last answer's entries by node, then ID.
type Index = HashMap<String, HashMap<String, usize>>;

/// Parsed entries looked up by a scan of the last answer before an index is built.
const SCANS: usize = 8;

/// Where a walk is.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    #[default]
    Walking,
    /// The list ended, with nothing after it.
    Ended,
    /// Not a list of entries.
    Failed,
}

/// What one step of a walk did.
enum Step {
    /// Took one entry (or the list's opening bracket).
    Took,
    /// Needs more of the body: worth trying again once it is this long.
    More(usize),
    End,
    Bad,
}

/// A walk of one answer's list, entry by entry, reusing the last answer's entries where the
/// bytes are equal; it can stop wherever the body arrived so far ends, and go on from there.
/// A step that needs bytes not yet arrived changes nothing, and is taken again with more:
/// the outcome is the same however the body was cut into chunks.
#[derive(Debug, Default)]
struct Walk {
    spans: Vec<Range<usize>>,
    instances: Vec<Option<Arc<Instance>>>,
    parsed: usize,
    /// The last answer's entry expected next.
    cursor: usize,
    /// How parsed entries are found in the last answer.
    index: Option<Index>,
    lookups: usize,
    /// Where the next step starts; `None` before the list's `[`.
    pos: Option<usize>,
    /// The body's length at which the step that needed more is worth taking again: the end
    /// of the entry it compares with, or twice what it had for a parse, so an entry arriving
    /// in many small chunks costs a bounded number of attempts, not one per chunk.
    resume_at: usize,
    /// Parses started, finished or not (for the tests' bound on retries).
    #[cfg_attr(not(test), allow(dead_code))]
    parses: usize,
    state: State,
}

impl Walk {
    fn new(entries: usize) -> Self {
        Walk {
            spans: Vec::with_capacity(entries),
            instances: Vec::with_capacity(entries),
            ..Walk::default()
        }
    }

    /// Walk as far as `body` allows (`complete`: all of it has arrived).
    fn run(&mut self, body: &[u8], complete: bool, last: &Last<'_>) {
        if !complete && body.len() < self.resume_at {
            return;
        }
        while self.state == State::Walking {
            match self.step(body, complete, last) {
                Step::Took => {}
                Step::More(_) if complete => self.state = State::Failed,
                Step::More(need) => {
                    self.resume_at = need;
                    return;
                }
                Step::End => self.state = State::Ended,
                Step::Bad => self.state = State::Failed,
            }
        }
    }

    fn step(&mut self, body: &[u8], complete: bool, last: &Last<'_>) -> Step {
        let more = |need: usize| {
            if complete {
                Step::Bad
            } else {
                Step::More(need)
            }
        };
        let Some(start) = self.pos else {
            let open = skip_ws(body, 0);
            return match body.get(open) {
                None => more(body.len() + 1),
                Some(b'[') => {
                    self.pos = Some(open + 1);
                    Step::Took
                }
                Some(_) => Step::Bad,
            };
        };
        let first = self.spans.is_empty();
        let mut pos = skip_ws(body, start);
        match body.get(pos) {
            None => return more(body.len() + 1),
            // Whether anything follows the list is known only at the end.
            Some(b']') if !complete => return Step::More(usize::MAX),
            Some(b']') => {
                return if skip_ws(body, pos + 1) == body.len() {
                    Step::End
                } else {
                    Step::Bad
                };
            }
            Some(b',') if !first => pos = skip_ws(body, pos + 1),
            Some(_) if first => {}
            Some(_) => return Step::Bad,
        }
        // The last answer's entry expected here, or the one after it (an entry removed), or
        // its last entry (moved here by Consul's `passing` filter: the cursor stays for the
        // entries that follow).
        let cursor = self.cursor;
        let moved = last.spans.len().checked_sub(1).filter(|&j| j > cursor + 1);
        let expected = [(cursor, true), (cursor + 1, true)];
        for (j, in_order) in expected.into_iter().chain(moved.map(|j| (j, false))) {
            match last.compare(j, body, pos, complete) {
                Same::Yes => {
                    let end = pos + last.spans[j].len();
                    self.spans.push(pos..end);
                    self.instances.push(last.instances[j].clone());
                    self.pos = Some(end);
                    if in_order {
                        self.cursor = j + 1;
                    }
                    return Step::Took;
                }
                Same::No => {}
                Same::Unknown => return Step::More(pos + last.spans[j].len()),
            }
        }
        self.parses += 1;
        let mut stream = serde_json::Deserializer::from_slice(&body[pos..]).into_iter();
        let entry: EntryView<'_> = match stream.next() {
            Some(Ok(entry)) => entry,
            // A whole object whose values the view cannot hold (a foreign registration's
            // `Port: 70000`): left out, and said once (while its bytes stay the same, the
            // next answers match it without a parse).
            Some(Err(e)) if e.is_data() && body.get(pos) == Some(&b'{') => {
                let mut whole = serde_json::Deserializer::from_slice(&body[pos..])
                    .into_iter::<serde_json::Value>();
                return match whole.next() {
                    Some(Ok(value)) => {
                        let end = pos + whole.byte_offset();
                        left_out(&value, &e);
                        self.spans.push(pos..end);
                        self.instances.push(None);
                        self.parsed += 1;
                        self.pos = Some(end);
                        Step::Took
                    }
                    Some(Err(e)) if !e.is_eof() => Step::Bad,
                    _ => more(body.len() + (body.len() - pos).max(1)),
                };
            }
            Some(Err(e)) if !e.is_eof() => return Step::Bad,
            _ => return more(body.len() + (body.len() - pos).max(1)),
        };
        let end = pos + stream.byte_offset();
        let lookups = self.lookups + 1;
        let found = last.find(
            &mut self.index,
            lookups,
            &entry.node.node,
            &entry.service.id,
        );
        let mut cursor = self.cursor;
        if let Some(j) = found {
            // The same entry changed in place, or a run of entries removed before it (the
            // next entry follows it in both answers): go on from there. An entry moved from
            // elsewhere (the last, by the `passing` filter) leaves the cursor where it is.
            if j <= cursor + 1 {
                cursor = j + 1;
            } else {
                let next = skip_ws(body, end);
                let next = if body.get(next) == Some(&b',') {
                    skip_ws(body, next + 1)
                } else {
                    next
                };
                match last.compare(j + 1, body, next, complete) {
                    Same::Yes => cursor = j + 1,
                    Same::No => {}
                    Same::Unknown => return Step::More(next + last.spans[j + 1].len()),
                }
            }
        }
        let reused = found.filter(|&j| {
            last.spans[j].len() == end - pos && last.compare(j, body, pos, true) == Same::Yes
        });
        self.instances.push(Some(
            match reused.and_then(|j| last.instances[j].as_ref()) {
                Some(same) => Arc::clone(same),
                None => Arc::new(instance(&entry)),
            },
        ));
        self.spans.push(pos..end);
        self.parsed += 1;
        self.lookups = lookups;
        self.cursor = cursor;
        self.pos = Some(end);
        Step::Took
    }
}

/// Say that an entry was left out, and why.
fn left_out(entry: &serde_json::Value, error: &serde_json::Error) {
    let text = |pointer: &str| {
        entry
            .pointer(pointer)
            .and_then(|v| v.as_str())
            .unwrap_or("?")
    };
    tracing::warn!(
        service_id = text("/Service/ID"),
        node = text("/Node/Node"),
        "an instance Consul lists cannot be used, left out (the others are used; the \
         registration that made it needs fixing): {error}"
    );
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
    use std::collections::BTreeMap;

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

    /// A full decode by the same views and types, checked against [`by_value`], which
    /// shares neither.
    fn full(body: &[u8]) -> Vec<Instance> {
        let answer = ServiceAnswer::new(body.to_vec(), "/v1/health/service/scale");
        let instances: Vec<Instance> = answer
            .entries()
            .expect("valid")
            .iter()
            .map(instance)
            .collect();
        assert_eq!(
            instances,
            by_value(body),
            "the views agree with a plain walk"
        );
        instances
    }

    /// The instances an answer lists, by a plain walk of a [`serde_json::Value`] with the
    /// ranges spelled out: an entry with a field out of range (a port beyond 65535, a weight
    /// beyond a `u32`, a tag that is not a string...) is left out; a missing field takes
    /// Consul's default.
    fn by_value(body: &[u8]) -> Vec<Instance> {
        fn text(v: Option<&Value>) -> Option<String> {
            match v {
                None => Some(String::new()),
                Some(Value::String(s)) => Some(s.clone()),
                Some(_) => None,
            }
        }
        fn number<T: TryFrom<u64>>(v: Option<&Value>, missing: T) -> Option<T> {
            match v {
                None => Some(missing),
                Some(v) => T::try_from(v.as_u64()?).ok(),
            }
        }
        fn one(entry: &Value) -> Option<Instance> {
            let empty = json!({});
            let part = |name: &str| match entry.get(name) {
                None => Some(&empty),
                Some(v) => v.is_object().then_some(v),
            };
            let (node, service) = (part("Node")?, part("Service")?);
            let tags = match service.get("Tags") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(tags)) => tags
                    .iter()
                    .map(|t| t.as_str().map(str::to_owned))
                    .collect::<Option<_>>()?,
                Some(_) => return None,
            };
            let meta = match service.get("Meta") {
                None | Some(Value::Null) => BTreeMap::new(),
                Some(Value::Object(meta)) => meta
                    .iter()
                    .map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                    .collect::<Option<_>>()?,
                Some(_) => return None,
            };
            let weight = match service.get("Weights") {
                None | Some(Value::Null) => 1,
                Some(w @ Value::Object(_)) => {
                    number::<u32>(w.get("Warning"), 1)?;
                    number::<u32>(w.get("Passing"), 1)?
                }
                Some(_) => return None,
            };
            let checks = match entry.get("Checks") {
                None => &[][..],
                Some(checks) => checks.as_array()?,
            };
            for check in checks {
                check.get("Status").map_or(Some(""), Value::as_str)?;
            }
            let address = text(service.get("Address"))?;
            let node_address = text(node.get("Address"))?;
            Some(Instance {
                id: text(service.get("ID"))?,
                node: text(node.get("Node"))?,
                host: if address.is_empty() {
                    node_address
                } else {
                    address
                },
                port: number::<u16>(service.get("Port"), 0)?,
                tags,
                meta,
                weight,
            })
        }
        let list: Value = serde_json::from_slice(body).expect("JSON");
        list.as_array()
            .into_iter()
            .flatten()
            .filter_map(one)
            .collect()
    }

    /// `entry` as a foreign registration may leave it: a field out of range for our types.
    fn foreign(mut entry: Value, rng: &mut StdRng) -> Value {
        let service = &mut entry["Service"];
        match rng.random_range(0..6) {
            0 => service["Port"] = json!(70000),
            1 => service["Port"] = json!(-1),
            2 => service["Weights"]["Passing"] = json!(5_000_000_000u64),
            3 => service["Tags"] = json!([1, "x"]),
            4 => service["Meta"]["version"] = json!(2),
            _ => service["Address"] = json!(["127.0.0.1"]),
        }
        entry
    }

    fn decode(decoder: &mut Decoder, body: &[u8]) -> Vec<Arc<Instance>> {
        decoder
            .decode(ServiceAnswer::new(
                body.to_vec(),
                "/v1/health/service/scale",
            ))
            .expect("decodes")
    }

    /// As [`decode`], the body arriving in chunks of random sizes (from one byte).
    fn decode_in_chunks(
        decoder: &mut Decoder,
        body: &[u8],
        rng: &mut StdRng,
    ) -> Vec<Arc<Instance>> {
        let mut decoding = decoder.start();
        let mut rest = body;
        while !rest.is_empty() {
            let most = if rng.random_bool(0.5) { 7 } else { 3000 };
            let n = rng.random_range(1..=rest.len().min(most));
            let (chunk, after) = rest.split_at(n);
            BodySink::extend(&mut decoding, chunk);
            rest = after;
        }
        decoding
            .finish("/v1/health/service/scale")
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
                match rng.random_range(0..8) {
                    6 if !entries.is_empty() => {
                        // A foreign registration's entry, out of range, in place of one.
                        let at = rng.random_range(0..entries.len());
                        entries[at] = foreign(entries[at].clone(), &mut rng);
                    }
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
    fn an_answer_decoded_as_it_arrives_is_decoded_as_if_whole() {
        // Two decoders see the same answers, one whole, one in chunks cut anywhere (inside
        // an entry, a string, a number, between a comma and the next entry): the same
        // instances, the same reuse, the same number parsed.
        let mut rng = StdRng::seed_from_u64(11);
        for pretty in [false, true] {
            let (mut whole, mut chunked) = (Decoder::new(), Decoder::new());
            let mut entries: Vec<Value> = (0..40).map(|i| entry(i, "passing", "1")).collect();
            let (mut before_whole, mut before_chunked) = (Vec::new(), Vec::new());
            for round in 0..120 {
                let at = rng.random_range(0..entries.len());
                match round % 5 {
                    0 => entries = swap_remove(&entries, at),
                    1 => entries.insert(at, entry(100 + round, "passing", "1")),
                    2 => entries[at]["Service"]["Meta"]["version"] = json!(round.to_string()),
                    3 => entries[at] = foreign(entries[at].clone(), &mut rng),
                    _ => {}
                }
                let bytes = body(&entries, pretty);
                let a = decode(&mut whole, &bytes);
                let b = decode_in_chunks(&mut chunked, &bytes, &mut rng);
                assert_eq!(plain(&a), plain(&b), "round {round}");
                assert_eq!(plain(&b), full(&bytes), "round {round}");
                assert_eq!(whole.parsed_last(), chunked.parsed_last(), "round {round}");
                let reused = |now: &[Arc<Instance>], before: &[Arc<Instance>]| {
                    now.iter()
                        .map(|i| before.iter().position(|o| Arc::ptr_eq(i, o)))
                        .collect::<Vec<_>>()
                };
                assert_eq!(
                    reused(&a, &before_whole),
                    reused(&b, &before_chunked),
                    "round {round}: the same entries reused"
                );
                (before_whole, before_chunked) = (a, b);
            }
        }
    }

    #[test]
    fn an_entry_arriving_byte_by_byte_is_not_parsed_once_per_byte() {
        // A first answer (nothing to reuse: every entry is parsed), one byte per chunk. A
        // retry after every byte would start ~1,000 parses per entry; waiting for twice the
        // bytes before each new attempt starts about log2(entry size) + 1.
        let entries: Vec<Value> = (0..5).map(|i| entry(i, "passing", "1")).collect();
        let bytes = body(&entries, true);
        let mut decoder = Decoder::new();
        let mut decoding = decoder.start();
        for byte in bytes.chunks(1) {
            BodySink::extend(&mut decoding, byte);
        }
        let parses = decoding.walk.parses;
        // The last entry's next attempt may lie beyond the body's end: `finish` takes it.
        assert!(
            decoding.walk.spans.len() >= 4,
            "entries taken as they arrived"
        );
        assert!(parses <= 5 * 14, "{parses} parses for 5 entries of ~1 KB");
        let instances = decoding
            .finish("/v1/health/service/scale")
            .expect("decodes");
        assert_eq!(plain(&instances), full(&bytes));
    }

    #[test]
    fn an_answer_that_never_finishes_arriving_leaves_the_decoder_as_it_was() {
        let entries: Vec<Value> = (0..20).map(|i| entry(i, "passing", "1")).collect();
        let bytes = body(&entries, true);
        let mut decoder = Decoder::new();
        let first = decode(&mut decoder, &bytes);
        // A read cut off half-way: the decoding is dropped unfinished.
        let mut decoding = decoder.start();
        BodySink::extend(&mut decoding, &bytes[..bytes.len() / 2]);
        drop(decoding);
        // The next answer is still decoded against the last whole one.
        let again = decode(&mut decoder, &bytes);
        assert_eq!(decoder.parsed_last(), 0);
        assert!(first.iter().zip(&again).all(|(a, b)| Arc::ptr_eq(a, b)));
        // While it arrives, every entry whose bytes are in has been taken.
        let mut decoding = decoder.start();
        BodySink::extend(&mut decoding, &bytes[..bytes.len() - 10]);
        assert_eq!(
            decoding.walk.spans.len(),
            19,
            "all but the last, cut-off entry"
        );
        drop(decoding);
        // A body cut off is an error when finished, not a shorter list.
        let mut decoding = decoder.start();
        BodySink::extend(&mut decoding, &bytes[..bytes.len() - 3]);
        assert!(decoding.finish("/v1/health/service/scale").is_err());
    }

    #[test]
    fn a_foreign_entry_out_of_range_is_left_out_once_and_the_rest_listed() {
        for pretty in [false, true] {
            let mut entries: Vec<Value> = (0..10).map(|i| entry(i, "passing", "1")).collect();
            // Consul 1.8.7 accepts and returns these (a Go int): one instance each.
            entries[3]["Service"]["Port"] = json!(70000);
            entries[7]["Service"]["Port"] = json!(-1);
            let bytes = body(&entries, pretty);
            let mut decoder = Decoder::new();
            let first = decode(&mut decoder, &bytes);
            let ids: Vec<&str> = first.iter().map(|i| i.id.as_str()).collect();
            let expected: Vec<String> = (0..10)
                .filter(|i| ![3, 7].contains(i))
                .map(|i| format!("scale-{i:05}"))
                .collect();
            assert_eq!(ids, expected, "pretty: {pretty}");
            assert_eq!(plain(&first), by_value(&bytes));
            assert_eq!(decoder.parsed_last(), 10);
            // The same answer again: nothing parsed, the bad entries not looked at again.
            let again = decode(&mut decoder, &bytes);
            assert_eq!(decoder.parsed_last(), 0);
            assert!(first.iter().zip(&again).all(|(a, b)| Arc::ptr_eq(a, b)));
            // Fixed in place: listed again, one parse.
            entries[3]["Service"]["Port"] = json!(7000);
            let fixed = decode(&mut decoder, &body(&entries, pretty));
            assert_eq!(decoder.parsed_last(), 1);
            assert_eq!(fixed.len(), 9);
            assert_eq!(plain(&fixed), by_value(&body(&entries, pretty)));
            // Arriving in chunks, the same.
            let mut chunked = Decoder::new();
            let mut rng = StdRng::seed_from_u64(3);
            let got = decode_in_chunks(&mut chunked, &bytes, &mut rng);
            assert_eq!(plain(&got), plain(&first));
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
