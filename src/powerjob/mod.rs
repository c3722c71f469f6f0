//! PowerJob protocol facts: paths, header names and the `ResultDTO` body shape.
//!
//! Everything here is read from PowerJob's source (see `shared/POWERJOB.md`); no PowerJob code is copied.
//! This module owns *facts*; the proxy's rules that use them live in `proxy/`, the fake server in `mock.rs`
//! and the 5.1.0 client emulation in `client.rs`.

pub mod client;
pub mod mock;

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

/// The endpoint of an OpenAPI path: `/openApi/runJob` → `runJob`, `/pj/openApi/runJob` → `runJob`.
///
/// Any prefix before `/openApi` is allowed because the client builds URLs as `{address}/openApi/{path}` and an
/// address may carry a path (`host:port/prefix`). Returns `None` for everything that is not under `/openApi/`.
pub fn openapi_endpoint(path: &str) -> Option<&str> {
    const MARK: &str = "/openApi/";
    // At the slashes rather than with `str::find`, whose substring searcher took longer to set up than the
    // search itself (callgrind); this runs twice per forwarded request. The first match either way.
    let at = path
        .match_indices('/')
        .map(|(at, _)| at)
        .find(|&at| path[at..].starts_with(MARK))?;
    let rest = &path[at + MARK.len()..];
    (!rest.is_empty()).then_some(rest)
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
        assert_eq!(openapi_endpoint("/openApi/runJob"), Some("runJob"));
        assert_eq!(openapi_endpoint("/pj/openApi/runJob"), Some("runJob"));
        assert_eq!(openapi_endpoint("/openApi/"), None);
        assert_eq!(openapi_endpoint("/openApiX/runJob"), None);
        assert_eq!(openapi_endpoint("/server/hello"), None);
        assert_eq!(
            openapi_endpoint("/open/openApi/a/openApi/b"),
            Some("a/openApi/b")
        );
        assert_eq!(openapi_endpoint("openApi/runJob"), None);
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
