//! The key/value store (`/v1/kv/...`) and its transactions (`/v1/txn`), as Consul's Go `api`
//! names them: [`KVPair`], [`KVTxnOp`], [`TxnResponse`].
//!
//! Consul 1.8.7's behaviour, as verified against the real agent:
//!
//! * a missing key answers 404 with an `X-Consul-Index`: [`Kv::get`] returns `None` with
//!   that index, so a blocking read of a key that does not exist yet waits for it;
//! * a prefix with no key under it answers 404 too: [`Kv::list`] and [`Kv::keys`] return an
//!   empty list, with the index;
//! * a value is at most [`MAX_VALUE_BYTES`] (512 KiB, `kv_max_value_size`); a transaction
//!   at most [`MAX_TXN_OPS`] (64) operations and [`MAX_TXN_BYTES`] (512 KiB of JSON request,
//!   `txn_max_req_len`). Beyond them Consul answers 413; here the request is refused before
//!   it is sent ([`Error::TooLarge`]);
//! * a check-and-set (`?cas=`) that lost answers `false` (200), not an error;
//! * a transaction that failed answers 409 with the failing operation's index and reason,
//!   and none of its operations is applied: [`Kv::txn`] returns it as a [`TxnResponse`]
//!   whose [`errors`](TxnResponse::errors) are set.

use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};

use crate::{
    client::{Client, RequestBody, decode},
    error::{Error, Result},
    query::{QueryMeta, QueryOptions},
};

/// The largest value Consul 1.8 accepts by default (`kv_max_value_size`): 512 KiB.
pub const MAX_VALUE_BYTES: usize = 512 * 1024;

/// The most operations one transaction may hold.
pub const MAX_TXN_OPS: usize = 64;

/// The largest transaction request Consul 1.8 accepts by default (`txn_max_req_len`), in
/// bytes of JSON, values base64-encoded (a third larger than they are).
pub const MAX_TXN_BYTES: usize = 512 * 1024;

/// One key and its value (`/v1/kv/:key`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct KVPair {
    /// `Key`: its full path, without a leading `/`.
    pub key: String,
    /// `CreateIndex`: the Raft index at which the key was created.
    pub create_index: u64,
    /// `ModifyIndex`: the Raft index of its last write: what a check-and-set names.
    pub modify_index: u64,
    /// `LockIndex`: how many times a session has acquired it.
    pub lock_index: u64,
    /// `Flags`: an opaque number the writer chose.
    pub flags: u64,
    /// `Value`, decoded from Consul's base64; `None` when Consul sends `null` (a key
    /// written with an empty body, or a transaction's answer, which echoes no values).
    #[serde(with = "base64_value")]
    pub value: Option<Vec<u8>>,
    /// `Session`: the session holding its lock, if any.
    pub session: Option<String>,
}

impl KVPair {
    /// The value as bytes (empty when there is none).
    pub fn value(&self) -> &[u8] {
        self.value.as_deref().unwrap_or_default()
    }
}

/// Consul's base64 (standard alphabet, padded) for [`KVPair::value`] and [`KVTxnOp::value`].
mod base64_value {
    use base64::{Engine as _, engine::general_purpose::STANDARD};
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    pub fn serialize<S: Serializer>(value: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(bytes) => s.serialize_str(&STANDARD.encode(bytes)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        text.map(|t| STANDARD.decode(t.as_bytes()).map_err(D::Error::custom))
            .transpose()
    }
}

/// What a transaction's KV operation does (`Verb`), as Consul names it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KVOp {
    /// `set`: write the value.
    #[default]
    Set,
    /// `cas`: write the value if the key's `ModifyIndex` is `Index` (0: if it does not exist).
    Cas,
    /// `get`: read the key (the transaction fails if it does not exist).
    Get,
    /// `get-tree`: read every key under the prefix.
    GetTree,
    /// `check-index`: fail the transaction unless the key's `ModifyIndex` is `Index`.
    CheckIndex,
    /// `check-not-exists`: fail the transaction if the key exists.
    CheckNotExists,
    /// `delete`: delete the key.
    Delete,
    /// `delete-tree`: delete every key under the prefix.
    DeleteTree,
    /// `delete-cas`: delete the key if its `ModifyIndex` is `Index`.
    DeleteCas,
}

/// One KV operation of a transaction (`{"KV": {...}}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct KVTxnOp {
    /// `Verb`.
    pub verb: KVOp,
    /// `Key`.
    pub key: String,
    /// `Value`, base64-encoded on the wire; for `set` and `cas`.
    #[serde(with = "base64_value", skip_serializing_if = "Option::is_none")]
    pub value: Option<Vec<u8>>,
    /// `Flags`.
    #[serde(skip_serializing_if = "is_zero")]
    pub flags: u64,
    /// `Index`: the `ModifyIndex` a `cas`, `check-index` or `delete-cas` expects.
    #[serde(skip_serializing_if = "is_zero")]
    pub index: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl KVTxnOp {
    /// `set` `key` to `value`.
    pub fn set(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        KVTxnOp {
            verb: KVOp::Set,
            key: key.into(),
            value: Some(value.into()),
            ..Default::default()
        }
    }

    /// `cas`: set `key` to `value` if its `ModifyIndex` is `index` (0: if it does not exist).
    pub fn cas(key: impl Into<String>, value: impl Into<Vec<u8>>, index: u64) -> Self {
        KVTxnOp {
            verb: KVOp::Cas,
            index,
            ..KVTxnOp::set(key, value)
        }
    }

    /// `delete` `key`.
    pub fn delete(key: impl Into<String>) -> Self {
        KVTxnOp {
            verb: KVOp::Delete,
            key: key.into(),
            ..Default::default()
        }
    }

    /// `delete-tree`: every key under `prefix`.
    pub fn delete_tree(prefix: impl Into<String>) -> Self {
        KVTxnOp {
            verb: KVOp::DeleteTree,
            key: prefix.into(),
            ..Default::default()
        }
    }

    /// `check-index`: fail the transaction unless `key`'s `ModifyIndex` is `index`.
    pub fn check_index(key: impl Into<String>, index: u64) -> Self {
        KVTxnOp {
            verb: KVOp::CheckIndex,
            key: key.into(),
            index,
            ..Default::default()
        }
    }
}

/// The wire form of an operation: `{"KV": op}`.
#[derive(Serialize)]
struct TxnOp<'a> {
    #[serde(rename = "KV")]
    kv: &'a KVTxnOp,
}

/// One operation's result (`{"KV": KVPair}`): the key after a write (without its value),
/// or as read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct TxnResult {
    /// `KV`.
    #[serde(rename = "KV", default)]
    pub kv: Option<KVPair>,
}

/// Why a transaction failed: which operation, and what Consul said.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct TxnError {
    /// `OpIndex`: the failing operation's position in the transaction, from 0.
    pub op_index: usize,
    /// `What`: Consul's reason (`failed to set key "a", index is stale`).
    pub what: String,
}

/// A transaction's answer: every operation's result if it was applied, or the errors that
/// made Consul apply none of them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct TxnResponse {
    /// `Results`, in the operations' order (Consul sends `null` when it failed).
    #[serde(deserialize_with = "null_as_empty")]
    pub results: Vec<TxnResult>,
    /// `Errors`: empty when the transaction was applied.
    #[serde(deserialize_with = "null_as_empty")]
    pub errors: Vec<TxnError>,
}

impl TxnResponse {
    /// Whether every operation was applied (Consul answered 200).
    pub fn committed(&self) -> bool {
        self.errors.is_empty()
    }
}

fn null_as_empty<'de, D, T>(d: D) -> std::result::Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

/// The KV endpoints.
#[derive(Debug, Clone, Copy)]
pub struct Kv<'a> {
    client: &'a Client,
}

impl<'a> Kv<'a> {
    pub(crate) fn new(client: &'a Client) -> Self {
        Kv { client }
    }

    /// `GET /v1/kv/:key`: the key, or `None` when it does not exist (with the index to block
    /// on until it does). Blocks on `opts.wait_index`.
    pub async fn get(&self, key: &str, opts: &QueryOptions) -> Result<(Option<KVPair>, QueryMeta)> {
        let (pairs, meta) = self.read(key, &[], opts).await?;
        let key = key.strip_prefix('/').unwrap_or(key);
        Ok((pairs.into_iter().find(|p| p.key == key), meta))
    }

    /// `GET /v1/kv/:prefix?recurse`: every key under `prefix` with its value, sorted by key
    /// (empty when there is none), read at one index: one snapshot of the tree. Blocks on
    /// `opts.wait_index`.
    pub async fn list(
        &self,
        prefix: &str,
        opts: &QueryOptions,
    ) -> Result<(Vec<KVPair>, QueryMeta)> {
        self.read(prefix, &[("recurse", String::new())], opts).await
    }

    /// `GET /v1/kv/:prefix?keys`: the keys under `prefix`; with a `separator`, only down to
    /// the first separator after the prefix (a "directory" listing: `app/db/` for
    /// `app/db/url`). Blocks on `opts.wait_index`.
    pub async fn keys(
        &self,
        prefix: &str,
        separator: Option<&str>,
        opts: &QueryOptions,
    ) -> Result<(Vec<String>, QueryMeta)> {
        let mut params = vec![("keys", String::new())];
        if let Some(separator) = separator {
            params.push(("separator", separator.to_owned()));
        }
        let (body, meta, path) = self.get_raw(prefix, &params, opts).await?;
        let keys: Option<Vec<String>> = match body {
            Some(body) => decode("GET", &path, &body)?,
            None => None,
        };
        Ok((keys.unwrap_or_default(), meta))
    }

    /// `PUT /v1/kv/:key`: write `value`.
    pub async fn put(&self, key: &str, value: &[u8]) -> Result<()> {
        self.write(key, value, 0, None).await.map(drop)
    }

    /// `PUT /v1/kv/:key?cas=index&flags=`: write `value` (with `flags`) if the key's
    /// `ModifyIndex` is still `index` (0: only if it does not exist). `Ok(false)` when
    /// another write came first: read again and retry.
    pub async fn cas(&self, key: &str, value: &[u8], flags: u64, index: u64) -> Result<bool> {
        self.write(key, value, flags, Some(index)).await
    }

    /// `DELETE /v1/kv/:key`: delete the key (deleting a missing key succeeds).
    pub async fn delete(&self, key: &str) -> Result<()> {
        self.remove(key, &[]).await.map(drop)
    }

    /// `DELETE /v1/kv/:key?cas=index`: delete the key if its `ModifyIndex` is still `index`;
    /// `Ok(false)` when it is not.
    pub async fn delete_cas(&self, key: &str, index: u64) -> Result<bool> {
        self.remove(key, &[("cas", index.to_string())]).await
    }

    /// `DELETE /v1/kv/:prefix?recurse`: delete every key under `prefix`.
    pub async fn delete_tree(&self, prefix: &str) -> Result<()> {
        self.remove(prefix, &[("recurse", String::new())])
            .await
            .map(drop)
    }

    /// `PUT /v1/txn`: apply `ops` atomically: all of them, or (Consul answers 409) none, the
    /// answer's [`errors`](TxnResponse::errors) saying which failed and why. More than
    /// [`MAX_TXN_OPS`] operations, or a request over [`MAX_TXN_BYTES`], is refused before it
    /// is sent.
    pub async fn txn(&self, ops: &[KVTxnOp]) -> Result<TxnResponse> {
        if ops.len() > MAX_TXN_OPS {
            return Err(Error::TooLarge {
                what: "the transaction".into(),
                size: ops.len(),
                limit: MAX_TXN_OPS,
                unit: "operations",
            });
        }
        for op in ops {
            check_value(&op.key, op.value.as_deref().unwrap_or_default())?;
        }
        let wire: Vec<TxnOp<'_>> = ops.iter().map(|kv| TxnOp { kv }).collect();
        let body = RequestBody::json(&wire, &["txn"])?;
        if body.len() > MAX_TXN_BYTES {
            return Err(Error::TooLarge {
                what: "the transaction's request (values in base64)".into(),
                size: body.len(),
                limit: MAX_TXN_BYTES,
                unit: "bytes",
            });
        }
        let (raw, _, path, _) = self
            .client
            .request(
                Method::PUT,
                &["txn"],
                &[],
                None,
                Some(body),
                &[StatusCode::CONFLICT],
            )
            .await?;
        decode("PUT", &path, &raw)
    }

    /// A GET of `key` whose 404 is an answer: `None` for the body, with the index.
    async fn get_raw(
        &self,
        key: &str,
        params: &[(&'static str, String)],
        opts: &QueryOptions,
    ) -> Result<(Option<Vec<u8>>, QueryMeta, String)> {
        let (body, meta, path, status) = self
            .client
            .request(
                Method::GET,
                &segments(key),
                params,
                Some(opts),
                None,
                &[StatusCode::NOT_FOUND],
            )
            .await?;
        let found = status != StatusCode::NOT_FOUND;
        Ok((found.then_some(body), meta, path))
    }

    /// The pairs a GET of `key` answers (none for a 404).
    async fn read(
        &self,
        key: &str,
        params: &[(&'static str, String)],
        opts: &QueryOptions,
    ) -> Result<(Vec<KVPair>, QueryMeta)> {
        let (body, meta, path) = self.get_raw(key, params, opts).await?;
        let pairs: Option<Vec<KVPair>> = match body {
            Some(body) => decode("GET", &path, &body)?,
            None => None,
        };
        Ok((pairs.unwrap_or_default(), meta))
    }

    async fn write(&self, key: &str, value: &[u8], flags: u64, cas: Option<u64>) -> Result<bool> {
        check_value(key, value)?;
        let mut params = Vec::new();
        if flags != 0 {
            params.push(("flags", flags.to_string()));
        }
        if let Some(index) = cas {
            params.push(("cas", index.to_string()));
        }
        let (raw, _, path, _) = self
            .client
            .request(
                Method::PUT,
                &segments(key),
                &params,
                None,
                Some(RequestBody::raw(value.to_vec())),
                &[],
            )
            .await?;
        decode("PUT", &path, &raw)
    }

    async fn remove(&self, key: &str, params: &[(&'static str, String)]) -> Result<bool> {
        let (raw, _, path, _) = self
            .client
            .request(Method::DELETE, &segments(key), params, None, None, &[])
            .await?;
        decode("DELETE", &path, &raw)
    }
}

/// The path of `key`: `kv`, then its parts (a key's `/` separate path segments; a prefix's
/// trailing `/` is kept as an empty last segment).
fn segments(key: &str) -> Vec<&str> {
    let key = key.strip_prefix('/').unwrap_or(key);
    std::iter::once("kv").chain(key.split('/')).collect()
}

/// A value over [`MAX_VALUE_BYTES`] is refused before it is sent.
fn check_value(key: &str, value: &[u8]) -> Result<()> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(Error::TooLarge {
            what: format!("the value of key {key:?}"),
            size: value.len(),
            limit: MAX_VALUE_BYTES,
            unit: "bytes",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_consul_1_8_answers() {
        let pairs: Vec<KVPair> = serde_json::from_str(
            r#"[{"LockIndex": 0, "Key": "a", "Flags": 3, "Value": "aGVsbG8=",
                 "CreateIndex": 13, "ModifyIndex": 14}]"#,
        )
        .unwrap();
        assert_eq!(pairs[0].value(), b"hello");
        assert_eq!((pairs[0].flags, pairs[0].modify_index), (3, 14));
        assert_eq!(pairs[0].session, None);

        let ok: TxnResponse = serde_json::from_str(
            r#"{"Results": [{"KV": {"LockIndex": 0, "Key": "p/x", "Flags": 0,
                "Value": null, "CreateIndex": 15, "ModifyIndex": 15}}], "Errors": null}"#,
        )
        .unwrap();
        assert!(ok.committed());
        assert_eq!(ok.results[0].kv.as_ref().unwrap().modify_index, 15);
        assert_eq!(ok.results[0].kv.as_ref().unwrap().value, None);

        let failed: TxnResponse = serde_json::from_str(
            r#"{"Results": null, "Errors": [{"OpIndex": 1,
                "What": "failed to set key \"p/x\", index is stale"}]}"#,
        )
        .unwrap();
        assert!(!failed.committed());
        assert!(failed.results.is_empty());
        assert_eq!(failed.errors[0].op_index, 1);

        let bad = serde_json::from_str::<KVPair>(r#"{"Key": "a", "Value": "not base64!"}"#);
        assert!(bad.is_err());
    }

    #[test]
    fn operations_encode_as_consul_reads_them() {
        let ops = [
            KVTxnOp::set("p/x", "1"),
            KVTxnOp::cas("p/y", "2", 7),
            KVTxnOp::delete("p/z"),
        ];
        let wire: Vec<TxnOp<'_>> = ops.iter().map(|kv| TxnOp { kv }).collect();
        assert_eq!(
            serde_json::to_string(&wire).unwrap(),
            r#"[{"KV":{"Verb":"set","Key":"p/x","Value":"MQ=="}},{"KV":{"Verb":"cas","Key":"p/y","Value":"Mg==","Index":7}},{"KV":{"Verb":"delete","Key":"p/z"}}]"#
        );
        assert_eq!(
            serde_json::to_string(&KVOp::CheckNotExists).unwrap(),
            r#""check-not-exists""#
        );
    }

    #[test]
    fn keys_become_path_segments() {
        assert_eq!(segments("app/db/url"), ["kv", "app", "db", "url"]);
        assert_eq!(segments("/app/"), ["kv", "app", ""]);
        assert_eq!(segments(""), ["kv", ""]);
    }

    #[tokio::test]
    async fn over_the_limits_is_refused_before_sending() {
        // Nothing listens on port 9 of loopback: a request sent would fail otherwise.
        let client = Client::new(crate::Config::default().with_address("127.0.0.1:9")).unwrap();
        let kv = client.kv();
        let big = vec![b'x'; MAX_VALUE_BYTES + 1];
        let err = kv.put("app/big", &big).await.unwrap_err();
        assert!(matches!(err, Error::TooLarge { size, .. } if size == MAX_VALUE_BYTES + 1));
        assert!(err.to_string().contains("app/big"), "{err}");
        assert!(!err.is_retryable());

        let ops: Vec<KVTxnOp> = (0..=MAX_TXN_OPS)
            .map(|i| KVTxnOp::set(format!("k/{i}"), "v"))
            .collect();
        let err = kv.txn(&ops).await.unwrap_err();
        assert!(err.to_string().contains("65 operations"), "{err}");

        // Two values of 300 KB each: each within its limit, the request (in base64) not.
        let half = vec![b'x'; 300_000];
        let ops = [KVTxnOp::set("k/a", half.clone()), KVTxnOp::set("k/b", half)];
        let err = kv.txn(&ops).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::TooLarge {
                    limit: MAX_TXN_BYTES,
                    ..
                }
            ),
            "{err}"
        );
    }
}
