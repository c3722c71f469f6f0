//! PowerJob protocol facts: paths, header names and the `ResultDTO` body shape.
//!
//! Everything here is read from PowerJob's source (see `shared/POWERJOB.md`); no PowerJob code is copied.
//! This module owns *facts*; the proxy's rules that use them live in `proxy/`, the fake server and the 5.1.0
//! client emulation in `sim/`.

use std::borrow::Cow;

use serde_json::Value;

/// Response header the 5.1.x client looks up by this exact, case-sensitive name (value compared ignoring case).
pub const AUTH_PASSED: &str = "X-POWERJOB-AUTH-PASSED";
/// Request header carrying the app id obtained from `/authApp`.
pub const APP_ID: &str = "X-POWERJOB-APP-ID";
/// Request header carrying the token obtained from `/authApp`.
pub const ACCESS_TOKEN: &str = "X-POWERJOB-ACCESS-TOKEN";

/// The endpoint that issues tokens; the 5.1.0 client calls it right before its duplicate re-send.
pub const AUTH_APP: &str = "authApp";

/// The OpenAPI base path; the client puts whatever prefix its address carries before it.
pub const WEB_PATH: &str = "/openApi";

/// The path's segments as the server reads them (Tomcat, then Spring MVC): `%XX` decoded, each segment's
/// `;params` cut, empty and `.` segments skipped, `..` going up one. A backslash separates too: reading more
/// paths as OpenAPI ones is the safe side for a guard.
pub fn served_segments(path: &str) -> Vec<String> {
    let decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
    let mut segments = Vec::new();
    for segment in decoded.split(['/', '\\']) {
        match segment.split(';').next().unwrap_or("") {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            segment => segments.push(segment.to_string()),
        }
    }
    segments
}

/// The OpenAPI endpoint (`runJob`, `authApp`, …) that a request for `path` reaches on the server: the last of
/// [`served_segments`] when an `openApi` segment comes before it. Any prefix before `/openApi` is allowed,
/// because the client builds URLs as `{address}/openApi/{path}` and an address may carry a path. So
/// `/pj/openApi/runJob/`, `/%6FpenApi/run%4Aob` and `/x/../openApi;a=b/runJob` all reach `runJob`, and runonce
/// must guard them all. A plain path (the usual case) is read without allocating.
pub fn served_endpoint(path: &str) -> Option<Cow<'_, str>> {
    let plain = !path.contains(['%', ';', '\\']) && !path.contains("//") && !path.contains("/.");
    if plain {
        let mut segments = path.trim_end_matches('/').rsplit('/');
        let endpoint = segments.next().filter(|e| !e.is_empty())?;
        return (segments.next() == Some("openApi")).then_some(Cow::Borrowed(endpoint));
    }
    let mut segments = served_segments(path);
    let endpoint = segments.pop()?;
    (segments.last().map(String::as_str) == Some("openApi")).then_some(Cow::Owned(endpoint))
}

/// The part of `path` before `/openApi/{endpoint}` (see [`served_endpoint`]), normalized for keys: `None` when
/// the path reaches no OpenAPI endpoint, `""` when nothing comes before `/openApi`.
///
/// A path router may send `/clusterA/openApi/…` and `/clusterB/openApi/…` to two PowerJob clusters, so the
/// prefix is part of a key. Spellings that path routers read as one path read as one prefix here, as nginx
/// normalizes a URI before matching a `location`: `%XX` decoded (`%2F` is a `/`), empty segments (`//`) and `.`
/// skipped, `..` going up one, with the same segments as [`served_segments`]. What a router may route
/// apart stays apart: a segment's `;params` (nginx does not cut them), a backslash (nginx on Unix reads it as a
/// plain character), letter case, and bytes that are not UTF-8 (decoded losslessly, never replaced). The
/// result is injective: each segment is rendered with its separator and every byte outside a safe set as
/// `%XX`, so no two different segment lists give one string.
pub fn served_prefix(path: &str) -> Option<String> {
    // `/openApi/{endpoint}` as clients send it: nothing before `/openApi`, nothing to decode or to skip.
    if let Some(endpoint) = path.strip_prefix("/openApi/") {
        let plain = !endpoint.contains(['/', '\\', '%']);
        let name = endpoint.split(';').next().unwrap_or_default();
        if plain && !matches!(name, "" | "." | "..") {
            return Some(String::new());
        }
    }
    served_prefix_of_any(path)
}

/// [`served_prefix`] of any path.
fn served_prefix_of_any(path: &str) -> Option<String> {
    let decoded: Vec<u8> = percent_encoding::percent_decode_str(path).collect();
    // (separator before it, segment bytes), with the skips and pops of `served_segments`.
    let mut segments: Vec<(u8, &[u8])> = Vec::new();
    let mut separator = b'/';
    for piece in decoded.split_inclusive(|&b| b == b'/' || b == b'\\') {
        let (segment, next) = match piece.split_last() {
            Some((&last, rest)) if last == b'/' || last == b'\\' => (rest, last),
            _ => (piece, separator),
        };
        let name = segment.split(|&b| b == b';').next().unwrap_or_default();
        match name {
            b"" | b"." => {}
            b".." => {
                segments.pop();
            }
            _ => segments.push((separator, segment)),
        }
        separator = next;
    }
    let served = segments.len().checked_sub(2)?;
    let open_api = segments[served].1.split(|&b| b == b';').next();
    if open_api != Some(b"openApi".as_slice()) {
        return None;
    }
    let mut prefix = String::new();
    for (separator, segment) in &segments[..served] {
        prefix.push(char::from(*separator));
        for &byte in *segment {
            if byte.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&byte) {
                prefix.push(char::from(byte));
            } else {
                prefix.push_str(&format!("%{byte:02X}"));
            }
        }
    }
    Some(prefix)
}

/// Whether a request header value counts as present: the server treats `null` and `undefined` as absent.
pub fn header_present(value: &str) -> bool {
    !matches!(value, "" | "null" | "undefined")
}

/// A `ResultDTO` (4.x) / `PowerResultDTO` (5.1.x) body as PowerJob's Jackson renders it, nulls included.
///
/// `data` is a JSON value so that int64 ids above 2^53 stay exact (serde_json keeps u64/i64 as integers).
pub fn result_json(
    success: bool,
    data: Value,
    message: Option<&str>,
    code: Option<&str>,
) -> String {
    serde_json::json!({ "success": success, "data": data, "message": message, "code": code })
        .to_string()
}

/// `ResultDTO` without the 5.1.x `code` field, as a 4.3.x server answers.
pub fn result_json_v4(success: bool, data: Value, message: Option<&str>) -> String {
    serde_json::json!({ "success": success, "data": data, "message": message }).to_string()
}

/// Instance status ints (`InstanceStatus`).
pub mod status {
    pub const WAITING_DISPATCH: i32 = 1;
    pub const RUNNING: i32 = 3;
    pub const SUCCEED: i32 = 5;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_allows_a_prefix_and_rejects_other_paths() {
        let endpoint = |path| served_endpoint(path).map(Cow::into_owned);
        for path in [
            "/openApi/runJob",
            "/pj/openApi/runJob",
            "/openApi/runJob/",
            "/openApi/runJob;jsessionid=1",
            "/openApi;a=b/runJob",
            "/%6FpenApi/run%4Aob",
            "//openApi//runJob//",
            "/x/../openApi/./runJob",
            "/openApi\\runJob",
        ] {
            assert_eq!(endpoint(path).as_deref(), Some("runJob"), "{path}");
        }
        for path in [
            "/openApi/",
            "/openApi",
            "/openApiX/runJob",
            "/server/hello",
            "/openApi/runJob/x",
            "/openApi/runJob/..",
            "/",
        ] {
            assert_eq!(endpoint(path), None, "{path}");
        }
    }

    #[test]
    fn the_prefix_is_read_wherever_the_endpoint_is() {
        let prefix = |path| served_prefix(path);
        for (path, expected) in [
            ("/openApi/runJob", ""),
            ("/pj/openApi/runJob", "/pj"),
            ("//pj//openApi//runJob//", "/pj"),
            ("/x/../pj/./openApi/runJob;jsessionid=1", "/pj"),
            ("/%70j/%6FpenApi/run%4Aob", "/pj"),
            ("/a%2Fb/openApi/runJob", "/a/b"),
            ("/a%5Cb/openApi/runJob", "/a\\b"),
            ("/a;v=2/openApi;x=1/runJob", "/a;v=2"),
            ("/caf%C3%A9/openApi/runJob", "/caf%C3%A9"),
            ("/%FF/openApi/runJob", "/%FF"),
            ("/50%25/openApi/runJob", "/50%25"),
            ("/a b/openApi/runJob", "/a%20b"),
        ] {
            assert_eq!(prefix(path).as_deref(), Some(expected), "{path}");
        }
        // Every path with an endpoint has a prefix, and no other path has one.
        for path in [
            "/openApi/runJob/",
            "/openApi;a=b/runJob",
            "//openApi//runJob//",
            "/openApi\\runJob",
            "/openApi/",
            "/openApiX/runJob",
            "/openApi/runJob/..",
            "/",
        ] {
            assert_eq!(
                prefix(path).is_some(),
                served_endpoint(path).is_some(),
                "{path}"
            );
        }
    }

    #[test]
    fn the_plain_path_shortcut_reads_the_prefix_as_any_path() {
        for path in [
            "/openApi/runJob",
            "/openApi/runJob;jsessionid=1",
            "/openApi/;x",
            "/openApi/.",
            "/openApi/..",
            "/openApi/..;x",
            "/openApi/.;x",
            "/openApi/",
            "/openApi/runJob/",
            "/openApi/run%4Aob",
            "/openApi/a\\b",
            "/openApi/a b",
            "/openApi/...",
        ] {
            assert_eq!(served_prefix(path), served_prefix_of_any(path), "{path}");
        }
    }

    #[test]
    fn result_json_keeps_int64_ids_exact() {
        let body = result_json(true, Value::from(754_612_332_134_400_064_i64), None, None);
        assert_eq!(
            body,
            r#"{"code":null,"data":754612332134400064,"message":null,"success":true}"#
        );
    }

    #[test]
    fn null_and_undefined_headers_count_as_absent() {
        assert!(!header_present("null"));
        assert!(!header_present("undefined"));
        assert!(!header_present(""));
        assert!(header_present("1"));
    }
}
