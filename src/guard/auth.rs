//! Auth-safe replays: a stored answer never lets a request skip the server's token check.
//!
//! The key holds the principal (the app), never the token: the 5.1.0 client's re-send carries a new token and
//! must still match. So a duplicate may present a token other than the leader's, or none, or a forged one. The
//! record keeps a SHA-256 digest of the leader's token ([`credential`]; never the token). A duplicate (a waiter
//! or a hit) whose token digest differs is replayed only after the server accepted its token, asked with a
//! read-only call ([`verify`]): `POST …/openApi/fetchInstanceStatus` for the stored instance id, carrying the
//! duplicate's `X-POWERJOB-APP-ID` and `X-POWERJOB-ACCESS-TOKEN`. PowerJob's interceptor checks the token
//! before any controller runs, so the call's `X-POWERJOB-AUTH-PASSED` is the verdict whatever the body says:
//!
//! | the server's answer (taken before the auth-header repair) | the duplicate gets |
//! |---|---|
//! | 200 with `X-POWERJOB-AUTH-PASSED: true` (token accepted) | the stored answer |
//! | 200 without the header (auth is off on the server: no token is checked) | the stored answer |
//! | anything else (`false` with the server's error body, a 500, …) | that answer, as the server sent it |
//! | no answer within the bound (unreachable, timeout) | 502 `RUNONCE_AUTH_UNVERIFIED` |
//!
//! Whether the server enforces auth is thus decided by the server at the time of each duplicate, never by a
//! belief cached from an earlier answer; and nothing about a verdict is cached, so a revoked or expired token
//! replays nothing. The call creates nothing (a status read), goes to the upstreams with the usual
//! never-resend failover, and is bounded by [`VERIFY_TIMEOUT`] (or `upstream_timeout`, if shorter).
//!
//! Security caveat: with auth off on the server (the default) there is no token to check; any caller of the
//! same app gets the replay. `allow_apps`, `allow_networks` and `shared_secret` ([`crate::proxy::access`]) are
//! the guard then.

use std::time::Duration;

use bytes::Bytes;
use http::{header, request, HeaderValue, Method, Request, Response};
use sha2::{Digest, Sha256};

use crate::powerjob::{self, ACCESS_TOKEN, APP_ID, AUTH_PASSED};
use crate::proxy::answer::Answer;
use crate::proxy::error::ProxyError;
use crate::proxy::headers;
use crate::proxy::tap::Arm;
use crate::proxy::upstream::{Exchange, Exchanged};
use crate::store::{hex, Stored};

/// Longest a verification may take (PowerJob clients give a whole call 2 s; a status read is quick).
pub const VERIFY_TIMEOUT: Duration = Duration::from_secs(5);
/// Most bytes of the verification answer read (a refusal is a small JSON body).
const MAX_VERDICT: usize = 64 * 1024;
/// The read-only endpoint asked.
const VERIFY_ENDPOINT: &str = "fetchInstanceStatus";

/// The digest of the request's access token: hex SHA-256 (domain-separated), or empty when it sent none
/// (absent, empty, `null` or `undefined`, as the server reads it). Several values are digested together.
pub fn credential(headers: &http::HeaderMap) -> String {
    let tokens: Vec<&[u8]> = headers
        .get_all(ACCESS_TOKEN)
        .iter()
        .map(HeaderValue::as_bytes)
        .filter(|t| std::str::from_utf8(t).map_or(true, powerjob::header_present))
        .collect();
    if tokens.is_empty() {
        return String::new();
    }
    let mut hash = Sha256::new();
    hash.update(b"runonce-credential-v1\n");
    for token in tokens {
        hash.update((token.len() as u64).to_be_bytes());
        hash.update(token);
    }
    hex(&hash.finalize())
}

/// What the server said about a duplicate's token.
pub enum Verdict {
    /// Accepted, or not checked because the server runs with auth off: the stored answer may be replayed.
    Accepted,
    /// Not accepted: the server's own answer, for the duplicate as it came.
    Refused(Response<Answer>),
}

/// Asks the server whether it accepts the token of the duplicate whose head is `parts`, with a read-only call
/// about the `stored` answer's instance. `Err` when no verdict came within the bound.
pub async fn verify(
    upstreams: &dyn Exchange,
    parts: &request::Parts,
    stored: &Stored,
) -> Result<Verdict, ProxyError> {
    let bound = VERIFY_TIMEOUT.min(upstreams.response_timeout());
    match tokio::time::timeout(bound, ask(upstreams, parts, stored)).await {
        Ok(verdict) => verdict,
        Err(_) => Err(ProxyError::AuthUnverified {
            cause: format!("no answer within {} ms", bound.as_millis()),
        }),
    }
}

async fn ask(
    upstreams: &dyn Exchange,
    parts: &request::Parts,
    stored: &Stored,
) -> Result<Verdict, ProxyError> {
    let request =
        verification_request(parts, stored).map_err(|cause| ProxyError::AuthUnverified {
            cause: format!("cannot build the verification request: {cause}"),
        })?;
    let unverified = |err: ProxyError| ProxyError::AuthUnverified {
        cause: match err {
            ProxyError::Unreachable { upstream, cause }
            | ProxyError::Broken { upstream, cause } => {
                format!("{upstream}: {cause}")
            }
            ProxyError::Timeout { upstream, timeout } => {
                format!("{upstream}: no answer within {} ms", timeout.as_millis())
            }
            other => other.to_string(),
        },
    };
    // No repair: a 200 without the header must stay without it (it means "auth off", not "accepted").
    let Exchanged {
        parts: mut head,
        body,
        ..
    } = upstreams
        .exchange(request, Arm::default(), MAX_VERDICT)
        .await
        .map_err(unverified)?;
    if accepted(&head) {
        return Ok(Verdict::Accepted);
    }
    headers::remove_hop_by_hop(&mut head.headers);
    Ok(Verdict::Refused(Response::from_parts(
        head,
        Answer::new(body),
    )))
}

/// 200, and every `X-POWERJOB-AUTH-PASSED` says `true` (none at all: the server checks no token).
pub(crate) fn accepted(head: &http::response::Parts) -> bool {
    head.status == http::StatusCode::OK
        && head
            .headers
            .get_all(AUTH_PASSED)
            .iter()
            .all(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"true"))
}

/// `POST {prefix}/openApi/fetchInstanceStatus` with the stored answer's instance id and the duplicate's app id
/// and token headers, nothing else of the duplicate.
fn verification_request(
    parts: &request::Parts,
    stored: &Stored,
) -> Result<Request<Bytes>, http::Error> {
    let mut form = form_urlencoded::Serializer::new(String::new());
    if let Some(id) = instance_id(&stored.body) {
        form.append_pair("instanceId", &id);
    }
    if let Some(app) = parts.headers.get(APP_ID).and_then(|v| v.to_str().ok()) {
        form.append_pair("appId", app);
    }
    let body = Bytes::from(form.finish());
    side_request(
        parts,
        VERIFY_ENDPOINT,
        "application/x-www-form-urlencoded",
        body,
    )
}

/// `POST {prefix}/openApi/{endpoint}` on behalf of the request whose head is `parts`: with its app id and
/// token headers and its `Host`, nothing else of it (a read runonce asks the server: the token check, the
/// lookup of an unknown call's instance).
pub(crate) fn side_request(
    parts: &request::Parts,
    endpoint: &str,
    content_type: &'static str,
    body: Bytes,
) -> Result<Request<Bytes>, http::Error> {
    let path = parts.uri.path();
    // The prefix the client addresses the server with (`host:port/prefix`); it holds no `/openApi/`, so the
    // endpoint asked is always the last segment. Only plain segments are kept: no `..`, `%XX` or `;params`
    // that could make the server read the check as another path.
    let prefix = path.find("/openApi/").map_or("", |at| &path[..at]);
    let plain = |segment: &str| {
        !matches!(segment, "." | "..")
            && segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    };
    let prefix = if prefix.split('/').skip(1).all(plain) {
        prefix
    } else {
        ""
    };
    let uri = format!("{prefix}{}/{endpoint}", powerjob::WEB_PATH);
    let mut request = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, body.len());
    for name in [APP_ID, ACCESS_TOKEN] {
        for value in parts.headers.get_all(name) {
            request = request.header(name, value);
        }
    }
    if let Some(host) = parts.headers.get(header::HOST) {
        request = request.header(header::HOST, host);
    }
    request.body(body)
}

/// The `data` of a stored `ResultDTO` when it is an id (runJob's instanceId).
fn instance_id(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    match &value["data"] {
        serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(status: u16, passed: &[&str]) -> http::response::Parts {
        let mut response = Response::builder().status(status);
        for value in passed {
            response = response.header(AUTH_PASSED, *value);
        }
        response.body(()).unwrap().into_parts().0
    }

    #[test]
    fn the_verdict_is_the_servers_auth_header_on_a_200() {
        assert!(accepted(&head(200, &["true"])));
        assert!(accepted(&head(200, &["TRUE"])));
        assert!(accepted(&head(200, &[])), "auth off: nothing checked");
        assert!(!accepted(&head(200, &["false"])));
        assert!(!accepted(&head(200, &["true", "false"])));
        assert!(!accepted(&head(200, &["yes"])));
        assert!(!accepted(&head(500, &[])));
        assert!(!accepted(&head(401, &["true"])));
    }

    #[test]
    fn the_credential_is_a_digest_and_absent_tokens_are_empty() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(credential(&headers), "");
        headers.insert(ACCESS_TOKEN, HeaderValue::from_static("null"));
        assert_eq!(credential(&headers), "", "`null` counts as absent");
        headers.insert(ACCESS_TOKEN, HeaderValue::from_static("eyJ.secret.token"));
        let digest = credential(&headers);
        assert_eq!(digest.len(), 64);
        assert!(!digest.contains("secret"));
        headers.insert(ACCESS_TOKEN, HeaderValue::from_static("eyJ.other.token"));
        assert_ne!(credential(&headers), digest);
    }

    #[test]
    fn the_verification_reads_the_stored_instance_with_the_duplicates_credentials() {
        let (parts, _) = Request::post("/pj/openApi/runJob")
            .header(APP_ID, "1")
            .header(ACCESS_TOKEN, "t2")
            .header("X-Other", "not copied")
            .body(())
            .unwrap()
            .into_parts();
        let stored = Stored {
            status: 200,
            head: Bytes::new(),
            body: Bytes::from_static(br#"{"success":true,"data":754612332134400064}"#),
        };
        for (odd, asked) in [
            ("/mock/../openApi/runJob", "/openApi/fetchInstanceStatus"),
            ("/a;b/openApi/runJob", "/openApi/fetchInstanceStatus"),
            ("/p%2e/openApi/runJob", "/openApi/fetchInstanceStatus"),
            (
                "/p-1/v2/openApi/runJob",
                "/p-1/v2/openApi/fetchInstanceStatus",
            ),
        ] {
            let mut odd_parts = parts.clone();
            odd_parts.uri = odd.parse().unwrap();
            let request = verification_request(&odd_parts, &stored).unwrap();
            assert_eq!(request.uri(), asked, "{odd}");
        }
        let request = verification_request(&parts, &stored).unwrap();
        assert_eq!(request.uri(), "/pj/openApi/fetchInstanceStatus");
        assert_eq!(request.headers()[ACCESS_TOKEN], "t2");
        assert_eq!(request.headers()[APP_ID], "1");
        assert!(request.headers().get("x-other").is_none());
        assert_eq!(
            &request.body()[..],
            b"instanceId=754612332134400064&appId=1"
        );
    }
}
