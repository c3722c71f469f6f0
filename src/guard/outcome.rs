//! What an upstream answer means for the key (DESIGN.md "Outcomes"): keep it, release it, or mark it unknown.
//!
//! | upstream answer                                  | outcome                                   |
//! |--------------------------------------------------|-------------------------------------------|
//! | 2xx, auth passed or absent, `success:true`       | `Done`: stored for the window, replayed   |
//! | 2xx with `X-POWERJOB-AUTH-PASSED: false`         | `Release`: the server refused, created nothing |
//! | 2xx, `success:false` (a business error)          | `Release` (or `Done` with `keep_business_errors`) |
//! | 2xx whose body is not a PowerJob result          | `Unknown`: it may have acted; cannot tell |
//! | 1xx/3xx/4xx/5xx                                  | `Release`: PowerJob answers every accepted call with 200 |
//!
//! Failures of the call itself are decided by the caller from `ProxyError::sent`: never sent → `Release`,
//! sent → `Unknown`.

use http::HeaderMap;

use crate::powerjob::AUTH_PASSED;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Done,
    Release(&'static str),
    Unknown(&'static str),
}

impl Outcome {
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Done => "done",
            Outcome::Release(_) => "released",
            Outcome::Unknown(_) => "unknown",
        }
    }
}

pub fn classify(
    status: u16,
    headers: &HeaderMap,
    body: &[u8],
    keep_business_errors: bool,
) -> Outcome {
    if !(200..300).contains(&status) {
        return Outcome::Release("the server answered with an error status");
    }
    let refused = headers
        .get(AUTH_PASSED)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("false"));
    if refused {
        return Outcome::Release("the server refused the credentials");
    }
    match serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("success")?.as_bool())
    {
        Some(true) => Outcome::Done,
        Some(false) if keep_business_errors => Outcome::Done,
        Some(false) => Outcome::Release("the server answered success:false"),
        None => Outcome::Unknown("the answer is not a PowerJob result"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn auth(value: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTH_PASSED, HeaderValue::from_static(value));
        h
    }

    const OK: &[u8] = br#"{"success":true,"data":754612332134400064,"message":null}"#;
    const FAILED: &[u8] =
        br#"{"success":false,"data":null,"message":"IllegalArgumentException: x"}"#;

    #[test]
    fn the_outcome_table() {
        assert_eq!(classify(200, &HeaderMap::new(), OK, false), Outcome::Done);
        assert_eq!(classify(200, &auth("true"), OK, false), Outcome::Done);
        assert!(matches!(
            classify(200, &auth("false"), FAILED, false),
            Outcome::Release(_)
        ));
        assert!(matches!(
            classify(200, &auth("FALSE"), OK, false),
            Outcome::Release(_)
        ));
        assert!(matches!(
            classify(200, &HeaderMap::new(), FAILED, false),
            Outcome::Release(_)
        ));
        assert_eq!(
            classify(200, &HeaderMap::new(), FAILED, true),
            Outcome::Done
        );
        assert!(matches!(
            classify(500, &HeaderMap::new(), OK, false),
            Outcome::Release(_)
        ));
        assert!(matches!(
            classify(404, &HeaderMap::new(), b"", false),
            Outcome::Release(_)
        ));
        assert!(matches!(
            classify(200, &HeaderMap::new(), b"<html>", false),
            Outcome::Unknown(_)
        ));
    }
}
