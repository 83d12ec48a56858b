//! Lists from Consul decoded so that one bad entry cannot take the rest down.
//!
//! A foreign registration can hold what our types cannot: Consul 1.8.7 accepts and returns
//! `Port: 70000` or `-1` (a Go `int`), weights beyond a `u32`, and so on. Decoded as a whole,
//! one such entry fails the whole answer: every instance of the service, every service of the
//! agent. So an answer is decoded as a whole first (the common case, as fast as ever); only
//! when that fails on a *value* (not on the JSON's syntax) is it read again as a
//! [`serde_json::Value`], each entry of its list tried alone, those that do not decode left
//! out and reported, and the rest decoded.

use serde::Deserialize;
use serde_json::{Value, error::Category};

use crate::error::{Error, Result};

/// An entry left out of an answer, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Skipped {
    /// What names the entry: its key in a map, or its service or check ID (and node).
    pub label: String,
    /// The decoding error.
    pub reason: String,
}

/// The answer is the list of entries (or `null`, no entry).
pub(crate) fn list(value: &mut Value) -> Option<&mut Value> {
    value.is_array().then_some(value)
}

/// The answer is a map of entries by ID.
pub(crate) fn map(value: &mut Value) -> Option<&mut Value> {
    value.is_object().then_some(value)
}

/// `body` decoded as `T`. If that fails on a value, the entries of the list (or map) that
/// `entries` finds in the answer and that do not decode as `E` are left out, each handed to
/// `skipped`, and the rest decoded as `T` again. An error that is not in an entry is
/// returned as it was.
pub(crate) fn decode_skipping<'de, T: Deserialize<'de>, E: Deserialize<'de>>(
    method: &'static str,
    path: &str,
    body: &'de [u8],
    entries: fn(&mut Value) -> Option<&mut Value>,
    skipped: &mut dyn FnMut(Skipped),
) -> Result<T> {
    let err = match serde_json::from_slice::<T>(body) {
        Ok(answer) => return Ok(answer),
        Err(e) => e,
    };
    let failed = |e: &serde_json::Error| Error::Decode {
        method,
        path: path.to_owned(),
        reason: e.to_string(),
        snippet: crate::client::snippet(body),
    };
    if err.classify() != Category::Data {
        return Err(failed(&err));
    }
    let Ok(mut value) = serde_json::from_slice::<Value>(body) else {
        return Err(failed(&err));
    };
    let mut any = false;
    // Owned values, read for any lifetime: views that borrow from the body get owned text.
    let mut keep = |label: String, entry: &Value| match E::deserialize(entry.clone()) {
        Ok(_) => true,
        Err(e) => {
            any = true;
            skipped(Skipped {
                label,
                reason: e.to_string(),
            });
            false
        }
    };
    match entries(&mut value) {
        Some(Value::Array(entries)) => entries.retain(|entry| keep(label_of(entry), entry)),
        Some(Value::Object(entries)) => entries.retain(|key, entry| keep(key.clone(), entry)),
        _ => {}
    }
    if !any {
        // Not an entry's fault: the answer's own error.
        return Err(failed(&err));
    }
    T::deserialize(value).map_err(|e| failed(&e))
}

/// What names a list entry: a health entry's service ID and node, a catalog entry's
/// `ServiceID` and `Node`, a check's `CheckID`.
pub(crate) fn label_of(entry: &Value) -> String {
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
    let id = text(entry.pointer("/Service/ID"))
        .or_else(|| text(entry.get("ServiceID")).filter(|id| !id.is_empty()))
        .or_else(|| text(entry.get("CheckID")))
        .or_else(|| text(entry.get("ID")))
        .unwrap_or_else(|| "(no ID)".to_owned());
    match text(entry.pointer("/Node/Node")).or_else(|| text(entry.get("Node"))) {
        Some(node) => format!("{id:?} on node {node:?}"),
        None => format!("{id:?}"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::de::DeserializeOwned;

    use super::*;
    use crate::{AgentService, CatalogService, HealthCheck, ServiceEntry};

    fn skipping<T: DeserializeOwned, E: DeserializeOwned>(
        body: &str,
        entries: fn(&mut Value) -> Option<&mut Value>,
    ) -> (Result<T>, Vec<Skipped>) {
        let mut skipped = Vec::new();
        let answer = decode_skipping::<T, E>("GET", "/v1/x", body.as_bytes(), entries, &mut |s| {
            skipped.push(s)
        });
        (answer, skipped)
    }

    #[test]
    fn a_health_entry_out_of_range_is_left_out_and_named() {
        for bad in [
            r#""Port": 70000"#,
            r#""Port": -1"#,
            r#""Port": 1.5"#,
            r#""Port": "80""#,
            r#""Port": 1, "Weights": {"Passing": 5000000000, "Warning": 1}"#,
            r#""Port": 1, "Weights": {"Passing": -3, "Warning": 1}"#,
            r#""Port": 1, "Tags": [1, 2]"#,
            r#""Port": 1, "Tags": "web""#,
            r#""Port": 1, "Meta": {"a": 1}"#,
            r#""Port": 1, "Address": ["127.0.0.1"]"#,
        ] {
            let body = format!(
                r#"[{{"Node": {{"Node": "n1", "Address": "127.0.0.1"}},
                     "Service": {{"ID": "good", "Port": 8080}}, "Checks": []}},
                    {{"Node": {{"Node": "n2"}}, "Service": {{"ID": "bad", {bad}}},
                     "Checks": [{{"Status": "passing"}}]}}]"#
            );
            // Decoded as a whole, the answer fails.
            assert!(
                serde_json::from_str::<Vec<ServiceEntry>>(&body).is_err(),
                "{bad}"
            );
            let (answer, skipped) =
                skipping::<Option<Vec<ServiceEntry>>, ServiceEntry>(&body, list);
            let entries = answer.expect(bad).expect("a list");
            assert_eq!(entries.len(), 1, "{bad}");
            assert_eq!(entries[0].service.id, "good");
            assert_eq!(entries[0].service.port, 8080);
            assert_eq!(skipped.len(), 1, "{bad}");
            assert_eq!(skipped[0].label, r#""bad" on node "n2""#);
            assert!(!skipped[0].reason.is_empty());
        }
    }

    #[test]
    fn a_bad_service_of_the_agent_is_left_out_by_its_id() {
        let body = r#"{"good": {"ID": "good", "Service": "web", "Port": 80},
                       "bad": {"ID": "bad", "Service": "web", "Port": 70000},
                       "worse": {"ID": "worse", "Service": "web", "Port": -1}}"#;
        let (answer, skipped) = skipping::<BTreeMap<String, AgentService>, AgentService>(body, map);
        let services = answer.unwrap();
        assert_eq!(services.keys().collect::<Vec<_>>(), ["good"]);
        let labels: Vec<_> = skipped.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(labels, ["bad", "worse"]);
        assert!(skipped[0].reason.contains("70000"), "{:?}", skipped[0]);
    }

    #[test]
    fn catalog_entries_and_checks_too() {
        let body = r#"[{"Node": "n1", "ServiceID": "good", "ServicePort": 1},
                       {"Node": "n1", "ServiceID": "bad", "ServicePort": 65536}]"#;
        let (answer, skipped) = skipping::<Option<Vec<CatalogService>>, CatalogService>(body, list);
        assert_eq!(answer.unwrap().expect("a list")[0].service_id, "good");
        assert_eq!(skipped[0].label, r#""bad" on node "n1""#);

        let body = r#"[{"CheckID": "c1", "Node": "n1", "CreateIndex": 1},
                       {"CheckID": "c2", "Node": "n1", "CreateIndex": -1}]"#;
        let (answer, skipped) = skipping::<Option<Vec<HealthCheck>>, HealthCheck>(body, list);
        assert_eq!(answer.unwrap().expect("a list")[0].check_id, "c1");
        assert_eq!(skipped[0].label, r#""c2" on node "n1""#);
    }

    #[test]
    fn errors_that_are_no_entrys_fault_stay_errors() {
        for body in [
            r#"[{"Service": {"ID": "a", "Port": 1}}"#,
            r#"{"not": "a list"}"#,
            r#"[{"Service": {"ID": "a", "Port": 1}}] x"#,
            r#"7"#,
        ] {
            let (answer, skipped) = skipping::<Option<Vec<ServiceEntry>>, ServiceEntry>(body, list);
            let err = answer.expect_err(body);
            assert!(matches!(err, Error::Decode { .. }), "{body}: {err}");
            assert!(err.to_string().contains("/v1/x"), "{err}");
            assert!(skipped.is_empty(), "{body}: {skipped:?}");
        }
        // An empty list and `null` are fine.
        for body in ["[]", "null"] {
            let (answer, skipped) = skipping::<Option<Vec<ServiceEntry>>, ServiceEntry>(body, list);
            assert_eq!(answer.unwrap().unwrap_or_default(), vec![]);
            assert!(skipped.is_empty());
        }
    }
}
