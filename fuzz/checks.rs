//! What the fuzz targets check for one input, shared with `tests/fuzz_corpus.rs`, which runs every seed in
//! `fuzz/corpus/` through these same functions on a plain `cargo test` (no cargo-fuzz needed).
//!
//! Beyond "never panics, never recurses without bound":
//! - canonicalize: a payload that reads is deterministic, its fields are sorted and unique, its key is 64 hex
//!   characters, and a form re-encoded from the decoded fields reads back to the same key (what the key is made
//!   of is exactly what was decoded);
//! - config: settings that load render (`check-config`) to TOML that loads again to the same rendering.

#![allow(dead_code)] // each target uses one of the two

use runonce::config::Settings;
use runonce::guard::key;

const CONTENT_TYPES: [Option<&str>; 5] = [
    Some("application/x-www-form-urlencoded"),
    Some("application/json; charset=utf-8"),
    Some("text/plain"),
    None,
    Some("application/x-www-form-urlencoded; charset=UTF-8"),
];
const ROUTES: [&str; 3] = ["runJob", "saveJob", "runWorkflow"];

/// Input layout: byte 0 picks the Content-Type, byte 1 the route and whether there is an app header; the rest
/// is `query \n body` (no `\n`: all body). A query that is not UTF-8 is dropped (a URI cannot carry it).
pub fn canonicalize(data: &[u8]) {
    let [kind, route, rest @ ..] = data else {
        return;
    };
    let content_type = CONTENT_TYPES[usize::from(*kind) % CONTENT_TYPES.len()];
    let route = ROUTES[usize::from(*route) % ROUTES.len()];
    let app_header = (data[1] & 0x80 != 0).then_some("7");
    let (query, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(at) => (std::str::from_utf8(&rest[..at]).ok(), &rest[at + 1..]),
        None => (None, rest),
    };
    let read = |body: &[u8]| key::payload(route, content_type, query, body, app_header, None);
    let Ok(payload) = read(body) else {
        return;
    };
    assert_eq!(Ok(&payload), read(body).as_ref(), "deterministic");
    let names: Vec<&str> = payload.fields.iter().map(|(k, _)| k.as_str()).collect();
    assert!(
        names.windows(2).all(|w| w[0] < w[1]),
        "sorted, unique: {names:?}"
    );
    let fingerprint = key::fingerprint("POST", "", route, &payload);
    assert_eq!(fingerprint.as_str().len(), 64);
    assert!(fingerprint.as_str().bytes().all(|b| b.is_ascii_hexdigit()));
    let digests: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&key::field_digests(&payload))
            .expect("field digests are a JSON object");
    assert_eq!(digests.len(), payload.fields.len());

    let form = content_type.is_some_and(|c| c.starts_with("application/x-www-form-urlencoded"));
    if form && query.is_none() && !body.is_empty() && app_header.is_none() {
        // Re-encode what was decoded (appId included again when it was the principal): the same key.
        let mut encoder = form_urlencoded::Serializer::new(String::new());
        for (name, value) in &payload.fields {
            encoder.append_pair(name, value);
        }
        if !payload.principal.is_empty() && !payload.fields.iter().any(|(k, _)| k == "appId") {
            encoder.append_pair("appId", &payload.principal);
        }
        let again = read(encoder.finish().as_bytes()).expect("a re-encoded form reads");
        assert_eq!(key::fingerprint("POST", "", route, &again), fingerprint);
    }
}

/// Input: a config file's text.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(settings) = Settings::from_toml(text) else {
        return;
    };
    let rendered = settings.to_toml();
    let again = Settings::from_toml(&rendered)
        .unwrap_or_else(|err| panic!("check-config output does not load: {err}\n{rendered}"));
    assert_eq!(again.to_toml(), rendered, "rendering is stable");
}
