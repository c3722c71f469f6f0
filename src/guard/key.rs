//! The key of a guarded request: a fingerprint of what it asks for, or the client's `Idempotency-Key`.
//!
//! Canonical form v1 (hashed with SHA-256): the method, the route, the **principal** (the app: the
//! `X-POWERJOB-APP-ID` header, else the `appId` field; never the token, which the 5.1.0 client's re-send
//! changes) and the route's fields, sorted by name, each length-prefixed so that no two forms run together.
//! - Form bodies are decoded properly (`+` is a space, `%XX` are UTF-8 bytes) and merged with the query
//!   string, as Spring binds them.
//! - JSON bodies: each top-level member as compact JSON with sorted keys (a non-object body is one member
//!   named `""`). Integers are exact to 64 bits, so int64 ids above 2^53 do not collide.
//! - A missing field equals its default (`instanceParams` absent = empty, `delay` absent = `0`), so the
//!   client's omission of an empty `instanceParams` does not make a different key.
//! - Any other body (or a body that does not parse) counts as one opaque field: its bytes.
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
    /// `(name, value)` sorted by name; values of repeated names keep their order.
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

/// Reads the payload of a request. `app_header` is the `X-POWERJOB-APP-ID` value, if any; `selected` limits
/// the fields to those names (the route's `fields` setting).
pub fn payload(
    route: &str,
    content_type: Option<&str>,
    query: Option<&str>,
    body: &[u8],
    app_header: Option<&str>,
    selected: Option<&[String]>,
) -> Payload {
    let mut fields: Vec<(String, String)> = query.map(form_fields).unwrap_or_default();
    let kind = content_type.unwrap_or("").to_ascii_lowercase();
    if kind.starts_with("application/x-www-form-urlencoded") {
        fields.extend(form_fields_bytes(body));
    } else if !body.is_empty() {
        match (kind.contains("json"))
            .then(|| serde_json::from_slice::<Value>(body))
            .and_then(Result::ok)
        {
            Some(Value::Object(members)) => {
                fields.extend(members.into_iter().map(|(k, v)| (k, canonical_json(&v))))
            }
            Some(other) => fields.push((String::new(), canonical_json(&other))),
            None => fields.push(("\u{0}body".to_string(), hex(&Sha256::digest(body)))),
        }
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
    // Stable: repeated names keep their order.
    fields.sort_by(|a, b| a.0.cmp(&b.0));
    Payload { principal, fields }
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
    let mut map = serde_json::Map::new();
    for (name, value) in &payload.fields {
        let digest = hex(&Sha256::digest(value.as_bytes()));
        let entry = map
            .entry(name.clone())
            .or_insert_with(|| Value::String(String::new()));
        // Repeated names: digest of the digests, in order.
        let joined = format!("{}{}", entry.as_str().unwrap_or(""), &digest[..16]);
        *entry = Value::String(joined);
    }
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

fn form_fields(text: &str) -> Vec<(String, String)> {
    form_fields_bytes(text.as_bytes())
}

fn form_fields_bytes(bytes: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(bytes)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
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
            &payload("runJob", FORM, None, body.as_bytes(), app_header, None),
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
                &payload("saveJob", json, None, body.as_bytes(), None, None),
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
    fn unparseable_and_deeply_nested_bodies_are_opaque_not_errors() {
        let json = Some("application/json");
        let deep = "[".repeat(100_000);
        let p = payload("saveJob", json, None, deep.as_bytes(), None, None);
        assert_eq!(p.fields.len(), 1);
        let garbage = payload("saveJob", json, None, b"\xff\xfe not json", None, None);
        assert_ne!(
            fingerprint("POST", "saveJob", &p),
            fingerprint("POST", "saveJob", &garbage)
        );
        let bad_form = payload("runJob", FORM, None, b"jobId=%zz&appId=%ff", None, None);
        assert!(
            bad_form
                .fields
                .iter()
                .any(|(k, v)| k == "jobId" && v == "%zz"),
            "{bad_form:?}"
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
        );
        let b = payload(
            "runJob",
            FORM,
            None,
            b"jobId=5&delay=99&appId=1",
            None,
            Some(&only),
        );
        assert_eq!(
            fingerprint("POST", "runJob", &a),
            fingerprint("POST", "runJob", &b)
        );
        let query = payload("runJob", None, Some("jobId=5&appId=1"), b"", None, None);
        assert_eq!(query.principal, "1");
        assert!(query.fields.contains(&("jobId".into(), "5".into())));
    }

    #[test]
    fn differing_fields_are_named() {
        let a = payload("runJob", FORM, None, b"jobId=5&delay=0&appId=1", None, None);
        let b = payload(
            "runJob",
            FORM,
            None,
            b"jobId=6&delay=0&appId=1&instanceParams=x",
            None,
            None,
        );
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
                &payload("saveJob", json, None, body.as_bytes(), Some("1"), None),
            )
        };
        assert_ne!(
            fp(r#"{"appId":2,"jobName":"a"}"#),
            fp(r#"{"appId":3,"jobName":"a"}"#)
        );
        assert_eq!(fp(r#"{"appId":1,"jobName":"a"}"#), fp(r#"{"jobName":"a"}"#));
    }
}
