//! The key of a guarded request: a fingerprint of what it asks for, or the client's `Idempotency-Key`.
//!
//! Canonical form v1 (hashed with SHA-256): the method, the route, the **principal** (the app: the
//! `X-POWERJOB-APP-ID` header, else the `appId` field; never the token, which the 5.1.0 client's re-send
//! changes) and the route's fields, sorted by name, each length-prefixed so that no two forms run together.
//! - Form bodies are decoded properly (`+` is a space, `%XX` are UTF-8 bytes) and merged with the query
//!   string, as Spring binds them.
//! - JSON bodies: each top-level member as compact JSON with sorted keys (a non-object body is one member
//!   named `""`). Integers are exact to 64 bits, so int64 ids above 2^53 do not collide. A body with a number
//!   that is not an exact 64-bit integer (a fraction, an exponent, a larger integer) is also keyed by its
//!   bytes: serde_json rounds such numbers to `f64`, and two different numbers must not make one key.
//! - A missing field equals its default (`instanceParams` absent = empty, `delay` absent = `0`), so the
//!   client's omission of an empty `instanceParams` does not make a different key.
//!
//! What cannot be keyed the way the server reads it is refused ([`BadPayload`]), never forwarded under a key that
//! might merge two different calls: a non-empty body that is neither a form nor JSON, invalid percent-encoding
//! or invalid UTF-8 in a form or the query, JSON that does not parse (serde_json stops at 128 levels of
//! nesting, so a deep body is refused rather than recursed into), and a field given twice (Spring would bind
//! one value or join them; which one is not ours to guess).
//!
//! Pure functions; no I/O.

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::powerjob;
use crate::store::{hex, Key};

/// The parts of a request the key is made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payload {
    /// The app the request acts for (may be empty when the request names none).
    pub principal: String,
    /// `(name, value)` sorted by name, each name once.
    pub fields: Vec<(String, String)>,
}

/// Body fields that have a value when absent, per route.
pub fn defaults(route: &str) -> &'static [(&'static str, &'static str)] {
    match route {
        "runJob" => &[("instanceParams", ""), ("delay", "0")],
        "runWorkflow" => &[("initParams", ""), ("delay", "0")],
        _ => &[],
    }
}

/// Why a guarded request's fields cannot be read (the client gets 400 or 415, nothing is forwarded).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadPayload {
    /// A non-empty body that is neither `application/x-www-form-urlencoded` nor JSON.
    #[error("a guarded call's body must be application/x-www-form-urlencoded or application/json, not {content_type:?}")]
    MediaType { content_type: String },
    /// The form, the query or the JSON does not parse, or names a field twice.
    #[error("{0}")]
    Malformed(String),
}

/// Reads the payload of a request. `app_header` is the `X-POWERJOB-APP-ID` value, if any; `selected` limits
/// the fields to those names (the route's `fields` setting).
pub fn payload(
    route: &str,
    content_type: Option<&str>,
    query: Option<&str>,
    body: &[u8],
    app_header: Option<&str>,
    selected: Option<&[String]>,
) -> Result<Payload, BadPayload> {
    let mut fields: Vec<(String, String)> = match query {
        Some(query) => form_fields(query.as_bytes()).map_err(|why| malformed("query", why))?,
        None => Vec::new(),
    };
    let kind = content_type.unwrap_or("").to_ascii_lowercase();
    if body.is_empty() {
        // Query parameters only: the Content-Type does not matter.
    } else if kind.starts_with("application/x-www-form-urlencoded") {
        fields.extend(form_fields(body).map_err(|why| malformed("form body", why))?);
    } else if kind.contains("json") {
        let value = serde_json::from_slice::<Value>(body)
            .map_err(|err| BadPayload::Malformed(format!("the JSON body does not parse: {err}")))?;
        if has_inexact_number(&value) {
            fields.push(("\u{0}body".to_string(), hex(&Sha256::digest(body))));
        }
        match value {
            Value::Object(members) => {
                fields.extend(members.into_iter().map(|(k, v)| (k, canonical_json(&v))))
            }
            other => fields.push((String::new(), canonical_json(&other))),
        }
    } else {
        return Err(BadPayload::MediaType {
            content_type: content_type.unwrap_or("(none)").to_string(),
        });
    }
    let mut names: Vec<&str> = fields.iter().map(|(name, _)| name.as_str()).collect();
    names.sort_unstable();
    if let Some(twice) = names.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(BadPayload::Malformed(format!(
            "the field {:?} is given more than once",
            twice[0]
        )));
    }
    let principal = app_header
        .filter(|v| powerjob::header_present(v))
        .map(str::to_string)
        .or_else(|| {
            fields
                .iter()
                .find(|(k, _)| k == "appId")
                .map(|(_, v)| v.trim_matches('"').to_string())
        })
        .unwrap_or_default();
    // The body's `appId` is the principal already, unless a header named another app: then it stays a field,
    // so that two bodies for different apps behind one header never share a key.
    fields.retain(|(name, value)| name != "appId" || value.trim_matches('"') != principal);
    for (name, default) in defaults(route) {
        let absent = !fields.iter().any(|(k, _)| k == name);
        if absent {
            fields.push((name.to_string(), default.to_string()));
        }
    }
    if let Some(selected) = selected {
        fields.retain(|(name, _)| selected.iter().any(|s| s == name));
    }
    fields.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Payload { principal, fields })
}

fn malformed(what: &str, why: String) -> BadPayload {
    BadPayload::Malformed(format!("the {what} is not valid form encoding: {why}"))
}

/// Whether a JSON body (saveJob, saveWorkflow) names the record it updates: then it creates nothing new.
/// `addWorkflowNode` sends an array of nodes: it updates only when every node has an id.
pub fn names_existing_record(body: &[u8]) -> bool {
    fn has_id(v: &Value) -> bool {
        v.get("id").is_some_and(|id| !id.is_null())
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(nodes)) => !nodes.is_empty() && nodes.iter().all(has_id),
        Ok(object) => has_id(&object),
        Err(_) => false,
    }
}

/// The fingerprint of `payload` on `method` `route`: 64 hex characters.
pub fn fingerprint(method: &str, route: &str, payload: &Payload) -> Key {
    let mut hash = Sha256::new();
    hash.update(b"runonce-fp-v1\n");
    for part in [method, route, payload.principal.as_str()] {
        put(&mut hash, part);
    }
    for (name, value) in &payload.fields {
        put(&mut hash, name);
        put(&mut hash, value);
    }
    Key::from_digest(&hash.finalize())
}

/// The key of a request that carries an `Idempotency-Key`: the client's key within (principal, route).
pub fn idempotency_key(route: &str, principal: &str, client_key: &str) -> Key {
    let mut hash = Sha256::new();
    hash.update(b"runonce-ik-v1\n");
    for part in [principal, route, client_key] {
        put(&mut hash, part);
    }
    Key::from_digest(&hash.finalize())
}

/// The fields as `{"name":"digest"}` JSON, stored beside a record to name the fields that differ later.
pub fn field_digests(payload: &Payload) -> String {
    let map: serde_json::Map<String, Value> = payload
        .fields
        .iter()
        .map(|(name, value)| {
            let digest = hex(&Sha256::digest(value.as_bytes()));
            (name.clone(), Value::String(digest[..16].to_string()))
        })
        .collect();
    Value::Object(map).to_string()
}

/// The names whose digests differ between two `field_digests` values, sorted.
pub fn differing_fields(stored: &str, now: &str) -> Vec<String> {
    let parse =
        |s: &str| serde_json::from_str::<serde_json::Map<String, Value>>(s).unwrap_or_default();
    let (a, b) = (parse(stored), parse(now));
    let mut names: Vec<String> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| k.to_string())
        .collect();
    names.sort();
    names.dedup();
    names
}

fn put(hash: &mut Sha256, part: &str) {
    hash.update((part.len() as u64).to_be_bytes());
    hash.update(part.as_bytes());
}

/// Decodes `application/x-www-form-urlencoded` strictly: `+` is a space, `%XX` a byte, and the decoded bytes
/// must be UTF-8. Empty pairs (`a=1&&b=2`) are skipped and a name without `=` has an empty value, as the
/// `form_urlencoded` crate (and Spring) read them.
fn form_fields(bytes: &[u8]) -> Result<Vec<(String, String)>, String> {
    bytes
        .split(|&b| b == b'&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = match pair.iter().position(|&b| b == b'=') {
                Some(at) => (&pair[..at], &pair[at + 1..]),
                None => (pair, &b""[..]),
            };
            Ok((form_decode(name)?, form_decode(value)?))
        })
        .collect()
}

fn form_decode(encoded: &[u8]) -> Result<String, String> {
    let mut out = Vec::with_capacity(encoded.len());
    let mut i = 0;
    while i < encoded.len() {
        match encoded[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = encoded.get(i + 1..i + 3).and_then(|h| {
                    let text = std::str::from_utf8(h).ok()?;
                    // from_str_radix accepts a leading `+`; only two hex digits are an escape.
                    h.iter()
                        .all(u8::is_ascii_hexdigit)
                        .then(|| u8::from_str_radix(text, 16).ok())?
                });
                let Some(byte) = hex else {
                    let shown = String::from_utf8_lossy(&encoded[i..encoded.len().min(i + 3)]);
                    return Err(format!("{shown:?} is not a %XX escape"));
                };
                out.push(byte);
                i += 2;
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|err| format!("decoded bytes are not UTF-8 ({err})"))
}

/// Whether a number in `value` is not an exact 64-bit integer (serde_json holds it as a rounded `f64`).
/// Recursion is bounded: serde_json refuses documents nested deeper than 128 levels.
fn has_inexact_number(value: &Value) -> bool {
    match value {
        Value::Number(n) => n.is_f64(),
        Value::Array(items) => items.iter().any(has_inexact_number),
        Value::Object(members) => members.values().any(has_inexact_number),
        _ => false,
    }
}

/// Compact JSON with object keys sorted (serde_json's map is ordered by key without `preserve_order`).
fn canonical_json(value: &Value) -> String {
    value.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORM: Option<&str> = Some("application/x-www-form-urlencoded");

    fn run_job(body: &str, app_header: Option<&str>) -> Key {
        fingerprint(
            "POST",
            "runJob",
            &payload("runJob", FORM, None, body.as_bytes(), app_header, None).unwrap(),
        )
    }

    #[test]
    fn okhttp_encodings_and_field_order_do_not_change_the_key() {
        // OkHttp encodes a space as %20; a browser form would use +. Spring decodes both to a space.
        let okhttp = run_job(
            "jobId=5&delay=0&appId=1&instanceParams=%7B%22k%22%3A%22v%20w%22%7D",
            None,
        );
        let plus = run_job(
            "appId=1&instanceParams=%7B%22k%22:%22v+w%22%7D&jobId=5&delay=0",
            None,
        );
        assert_eq!(okhttp, plus);
        let other = run_job(
            "jobId=5&delay=0&appId=1&instanceParams=%7B%22k%22%3A%22v%2Bw%22%7D",
            None,
        );
        assert_ne!(okhttp, other, "%2B is a literal +, not a space");
    }

    #[test]
    fn missing_fields_equal_their_defaults() {
        assert_eq!(
            run_job("jobId=5&appId=1", None),
            run_job("jobId=5&delay=0&appId=1&instanceParams=", None)
        );
        assert_ne!(
            run_job("jobId=5&appId=1", None),
            run_job("jobId=5&delay=1000&appId=1", None)
        );
    }

    #[test]
    fn the_principal_is_the_app_from_header_or_field_never_the_token() {
        let header = run_job("jobId=5&delay=0", Some("1"));
        let field = run_job("jobId=5&delay=0&appId=1", None);
        assert_eq!(header, field);
        assert_eq!(header, run_job("jobId=5&delay=0&appId=1", Some("1")));
        assert_ne!(header, run_job("jobId=5&delay=0&appId=2", None));
        assert_eq!(
            run_job("jobId=5&appId=1", Some("null")),
            field,
            "`null` counts as absent"
        );
    }

    #[test]
    fn different_jobs_params_and_delays_differ() {
        let base = run_job("jobId=5&delay=0&appId=1", None);
        for other in [
            "jobId=6&delay=0&appId=1",
            "jobId=5&delay=1&appId=1",
            "jobId=5&delay=0&appId=1&instanceParams=x",
        ] {
            assert_ne!(base, run_job(other, None), "{other}");
        }
    }

    #[test]
    fn field_boundaries_cannot_be_shifted() {
        assert_ne!(
            run_job("jobId=5&instanceParams=a%26delay%3D1&appId=1", None),
            run_job("jobId=5&instanceParams=a&delay=1&appId=1", None)
        );
    }

    #[test]
    fn json_is_canonical_and_int64_exact() {
        let json = Some("application/json; charset=utf-8");
        let fp = |body: &str| {
            fingerprint(
                "POST",
                "saveJob",
                &payload("saveJob", json, None, body.as_bytes(), None, None).unwrap(),
            )
        };
        assert_eq!(
            fp(r#"{"appId":1,"jobName":"a","extra":{"y":1,"x":2}}"#),
            fp(r#"{ "extra": {"x":2, "y":1}, "jobName":"a", "appId":1 }"#)
        );
        assert_ne!(
            fp(r#"{"appId":1,"n":754612332134400064}"#),
            fp(r#"{"appId":1,"n":754612332134400065}"#)
        );
        assert_ne!(
            fp(r#"{"appId":1,"jobName":"a"}"#),
            fp(r#"{"appId":2,"jobName":"a"}"#)
        );
    }

    #[test]
    fn what_cannot_be_keyed_as_the_server_reads_it_is_refused() {
        let json = Some("application/json");
        let refused = |content_type: Option<&str>, body: &[u8]| {
            payload("saveJob", content_type, None, body, None, None).unwrap_err()
        };
        // Deeper than serde_json's 128 levels: refused, not recursed into.
        let deep = "[".repeat(100_000);
        assert!(matches!(
            refused(json, deep.as_bytes()),
            BadPayload::Malformed(_)
        ));
        assert!(matches!(
            refused(json, b"\xff\xfe not json"),
            BadPayload::Malformed(_)
        ));
        for form in [
            &b"jobId=%zz&appId=1"[..],
            b"jobId=5%",
            b"jobId=5%4",
            b"jobId=%+1",
            b"appId=%ff",
            b"a=%C3%28",
        ] {
            let err = refused(FORM, form);
            assert!(matches!(err, BadPayload::Malformed(_)), "{form:?}: {err:?}");
        }
        let err = payload("runJob", FORM, Some("jobId=%e9"), b"appId=1", None, None).unwrap_err();
        assert!(err.to_string().contains("query"), "{err}");
        let err = refused(FORM, b"jobId=5&appId=1&jobId=6");
        assert!(err.to_string().contains("\"jobId\""), "{err}");
        let err = payload(
            "runJob",
            FORM,
            Some("appId=1"),
            b"appId=1&jobId=5",
            None,
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("appId"), "{err}");
        assert!(matches!(
            refused(Some("text/plain"), b"jobId=5"),
            BadPayload::MediaType { .. }
        ));
        assert!(matches!(
            refused(None, b"jobId=5"),
            BadPayload::MediaType { .. }
        ));
        // No body: the query alone, whatever the Content-Type says.
        assert!(payload(
            "runJob",
            Some("text/plain"),
            Some("jobId=5&appId=1"),
            b"",
            None,
            None
        )
        .is_ok());
        // Valid UTF-8 through escapes, and empty pairs, are fine.
        let p = payload(
            "runJob",
            FORM,
            None,
            b"instanceParams=%C3%A9t%C3%A9&&appId=1&flag",
            None,
            None,
        )
        .unwrap();
        assert!(
            p.fields
                .contains(&("instanceParams".into(), "\u{e9}t\u{e9}".into())),
            "{p:?}"
        );
        assert!(p.fields.contains(&("flag".into(), String::new())), "{p:?}");
    }

    #[test]
    fn numbers_serde_json_rounds_never_share_a_key() {
        let json = Some("application/json");
        let fp = |body: &str| {
            fingerprint(
                "POST",
                "saveJob",
                &payload("saveJob", json, None, body.as_bytes(), None, None).unwrap(),
            )
        };
        // Both round to the same f64.
        assert_ne!(
            fp(r#"{"appId":1,"n":123456789012345678901234567890}"#),
            fp(r#"{"appId":1,"n":123456789012345678901234567891}"#)
        );
        assert_ne!(
            fp(r#"{"appId":1,"x":0.10000000000000000001}"#),
            fp(r#"{"appId":1,"x":0.1}"#)
        );
        assert_eq!(
            fp(r#"{"appId":1,"x":0.5}"#),
            fp(r#"{"appId":1,"x":0.5}"#),
            "identical bytes still share a key"
        );
    }

    #[test]
    fn selected_fields_and_query_parameters() {
        let only = vec!["jobId".to_string()];
        let a = payload(
            "runJob",
            FORM,
            None,
            b"jobId=5&delay=0&appId=1",
            None,
            Some(&only),
        )
        .unwrap();
        let b = payload(
            "runJob",
            FORM,
            None,
            b"jobId=5&delay=99&appId=1",
            None,
            Some(&only),
        )
        .unwrap();
        assert_eq!(
            fingerprint("POST", "runJob", &a),
            fingerprint("POST", "runJob", &b)
        );
        let query = payload("runJob", None, Some("jobId=5&appId=1"), b"", None, None).unwrap();
        assert_eq!(query.principal, "1");
        assert!(query.fields.contains(&("jobId".into(), "5".into())));
    }

    #[test]
    fn differing_fields_are_named() {
        let a = payload("runJob", FORM, None, b"jobId=5&delay=0&appId=1", None, None).unwrap();
        let b = payload(
            "runJob",
            FORM,
            None,
            b"jobId=6&delay=0&appId=1&instanceParams=x",
            None,
            None,
        )
        .unwrap();
        assert_eq!(
            differing_fields(&field_digests(&a), &field_digests(&b)),
            vec!["instanceParams", "jobId"]
        );
        assert!(differing_fields(&field_digests(&a), &field_digests(&a)).is_empty());
    }

    #[test]
    fn save_calls_with_an_id_name_an_existing_record() {
        assert!(names_existing_record(br#"{"id":3,"jobName":"a"}"#));
        assert!(!names_existing_record(br#"{"id":null,"jobName":"a"}"#));
        assert!(!names_existing_record(br#"{"jobName":"a"}"#));
        assert!(names_existing_record(br#"[{"id":1},{"id":2}]"#));
        assert!(!names_existing_record(br#"[{"id":1},{"nodeName":"x"}]"#));
    }

    #[test]
    fn idempotency_keys_are_scoped_to_principal_and_route() {
        assert_ne!(
            idempotency_key("runJob", "1", "k"),
            idempotency_key("runJob", "2", "k")
        );
        assert_ne!(
            idempotency_key("runJob", "1", "k"),
            idempotency_key("runWorkflow", "1", "k")
        );
        assert_eq!(
            idempotency_key("runJob", "1", "k"),
            idempotency_key("runJob", "1", "k")
        );
    }

    #[test]
    fn a_body_app_other_than_the_header_app_stays_in_the_key() {
        let json = Some("application/json");
        let fp = |body: &str| {
            fingerprint(
                "POST",
                "saveJob",
                &payload("saveJob", json, None, body.as_bytes(), Some("1"), None).unwrap(),
            )
        };
        assert_ne!(
            fp(r#"{"appId":2,"jobName":"a"}"#),
            fp(r#"{"appId":3,"jobName":"a"}"#)
        );
        assert_eq!(fp(r#"{"appId":1,"jobName":"a"}"#), fp(r#"{"jobName":"a"}"#));
    }
}
