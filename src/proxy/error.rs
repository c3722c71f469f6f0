//! The proxy's failures and the one rescue that turns any of them into the client's answer.
//!
//! Each variant says whether the request left runonce ([`ProxyError::sent`]): a request that never reached a
//! server may go to the next one; one that did may have created an instance and is never sent again. The
//! answer is always a PowerJob-shaped body (`{"success":false,…,"code":"RUNONCE_…"}`), so a PowerJob client
//! reports it like any server failure, plus one log line.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use std::time::Duration;

use crate::powerjob;

#[derive(Clone, Debug, thiserror::Error)]
pub enum ProxyError {
    /// Content-Length or the streamed body went over `body_limit`.
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    /// More header bytes or headers than allowed.
    #[error("request head is larger than allowed: {what}")]
    HeadTooLarge { what: String },
    /// Methods a PowerJob proxy does not tunnel.
    #[error("method {method} is not supported")]
    Method { method: http::Method },
    /// The client's body broke off while it was being forwarded.
    #[error("the request body could not be read from the client: {cause}")]
    ClientBody { cause: String },
    /// A guarded call's body or query cannot be read the way the server would read it; nothing was forwarded.
    #[error("the request cannot be de-duplicated safely, so it was not forwarded: {reason}")]
    BadBody { reason: String },
    /// A guarded call's body is neither a form nor JSON; nothing was forwarded.
    #[error("{reason}; the request was not forwarded")]
    UnsupportedMediaType { reason: String },
    /// A guarded call's body did not arrive whole within `body_read_timeout`; nothing was forwarded.
    #[error("the request body did not arrive within {timeout:?}; the request was not forwarded")]
    BodyTimeout { timeout: Duration },
    /// No upstream could be connected to; the request was sent nowhere.
    #[error("no upstream server could be reached (last: {upstream}: {cause})")]
    Unreachable { upstream: String, cause: String },
    /// The request was sent and no answer came in time. Not retried: the server may have acted on it.
    #[error("upstream {upstream} did not answer within {timeout:?}; the request is not re-sent because the server may have acted on it")]
    Timeout { upstream: String, timeout: Duration },
    /// The connection failed after the request was sent. Not retried, for the same reason.
    #[error("upstream {upstream} failed after the request was sent ({cause}); the request is not re-sent because the server may have acted on it")]
    Broken { upstream: String, cause: String },
    /// The `Idempotency-Key` header is malformed.
    #[error("bad Idempotency-Key header: {reason}")]
    BadIdempotencyKey { reason: String },
    /// The same `Idempotency-Key` came with another payload.
    #[error("this Idempotency-Key was used for another request; fields that differ: {}", fields.join(", "))]
    KeyReused { fields: Vec<String> },
    /// An identical call may have created something, and its answer is not known: never re-sent.
    #[error("an identical request may already have taken effect and its outcome is unknown; it is not sent again (check the server, then retry after the window or purge the key)")]
    OutcomeUnknown { retry_after: Duration },
    /// An identical call is still running after the wait deadline.
    #[error("an identical request is still running after {waited:?}; retry later")]
    StillRunning { waited: Duration },
    /// The store could not be used and the route is `fail-closed`: nothing was forwarded.
    #[error("the idempotency store is unavailable, so the request was not forwarded ({cause})")]
    StoreUnavailable { cause: String },
    /// A duplicate's token differs from the leader's and the server gave no verdict on it (see
    /// `guard::auth`): the stored answer is not replayed, and nothing was created.
    #[error("the stored answer is not replayed: the server could not confirm this request's token ({cause})")]
    AuthUnverified { cause: String },
    /// runonce is shutting down and `drain_timeout` ran out while a leader waited for its upstream: the
    /// request may have reached the server, and is never sent again.
    #[error("runonce is shutting down: drain_timeout ran out before the upstream answered; the request may have reached the server and is not re-sent")]
    ShuttingDown,
    /// A failure inside runonce (a task that panicked, an answer it could not rebuild). Whether the request
    /// reached the server is not known: it is never sent again.
    #[error("runonce failed inside ({cause}); the request may have reached the server and is not re-sent")]
    Internal { cause: String },
    /// Refused by runonce's own access control (`allow_networks`, `allow_apps`, `shared_secret`): nothing was
    /// forwarded. `reason` never holds a secret.
    #[error("access denied: {reason}")]
    Forbidden { code: &'static str, reason: String },
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::HeadTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::Method { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::ClientBody { .. } | ProxyError::BadBody { .. } => StatusCode::BAD_REQUEST,
            ProxyError::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ProxyError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ProxyError::Unreachable { .. } | ProxyError::Broken { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BadIdempotencyKey { .. } => StatusCode::BAD_REQUEST,
            ProxyError::KeyReused { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ProxyError::OutcomeUnknown { .. } | ProxyError::StillRunning { .. } => {
                StatusCode::CONFLICT
            }
            ProxyError::StoreUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::AuthUnverified { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ProxyError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The machine-readable `code` of the body.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::BodyTooLarge { .. } => "RUNONCE_BODY_TOO_LARGE",
            ProxyError::HeadTooLarge { .. } => "RUNONCE_HEAD_TOO_LARGE",
            ProxyError::Method { .. } => "RUNONCE_METHOD_NOT_ALLOWED",
            ProxyError::ClientBody { .. } => "RUNONCE_BAD_REQUEST_BODY",
            ProxyError::BadBody { .. } => "RUNONCE_BAD_BODY",
            ProxyError::UnsupportedMediaType { .. } => "RUNONCE_UNSUPPORTED_MEDIA_TYPE",
            ProxyError::BodyTimeout { .. } => "RUNONCE_BODY_TIMEOUT",
            ProxyError::Unreachable { .. } => "RUNONCE_UPSTREAM_UNREACHABLE",
            ProxyError::Timeout { .. } => "RUNONCE_UPSTREAM_TIMEOUT",
            ProxyError::Broken { .. } => "RUNONCE_UPSTREAM_BROKEN",
            ProxyError::BadIdempotencyKey { .. } => "RUNONCE_BAD_IDEMPOTENCY_KEY",
            ProxyError::KeyReused { .. } => "RUNONCE_IDEMPOTENCY_KEY_REUSED",
            ProxyError::OutcomeUnknown { .. } => "RUNONCE_OUTCOME_UNKNOWN",
            ProxyError::StillRunning { .. } => "RUNONCE_IN_FLIGHT",
            ProxyError::StoreUnavailable { .. } => "RUNONCE_STORE_UNAVAILABLE",
            ProxyError::AuthUnverified { .. } => "RUNONCE_AUTH_UNVERIFIED",
            ProxyError::Forbidden { code, .. } => code,
            ProxyError::ShuttingDown => "RUNONCE_SHUTTING_DOWN",
            ProxyError::Internal { .. } => "RUNONCE_INTERNAL",
        }
    }

    /// When the client may try again (`Retry-After`), for refusals that pass.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProxyError::OutcomeUnknown { retry_after } => Some(*retry_after),
            ProxyError::StillRunning { .. }
            | ProxyError::StoreUnavailable { .. }
            | ProxyError::AuthUnverified { .. } => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    /// Whether the call may have reached a server (and so may have had an effect there): the one at-most-once
    /// rule for failures. The engine releases a leader's key only on a failure that is not sent; the log line
    /// says it. Only what is certainly not sent is listed: a failure to connect, and refusals made before
    /// anything was forwarded. Everything else may have been (`BodyTooLarge` and `ClientBody` also come from
    /// a body cut off mid-stream; `OutcomeUnknown`: an identical call may have reached it).
    pub fn sent(&self) -> bool {
        !matches!(
            self,
            ProxyError::Unreachable { .. }
                | ProxyError::HeadTooLarge { .. }
                | ProxyError::Method { .. }
                | ProxyError::BadBody { .. }
                | ProxyError::UnsupportedMediaType { .. }
                | ProxyError::BodyTimeout { .. }
                | ProxyError::BadIdempotencyKey { .. }
                | ProxyError::KeyReused { .. }
                | ProxyError::StillRunning { .. }
                | ProxyError::StoreUnavailable { .. }
                | ProxyError::AuthUnverified { .. }
                | ProxyError::Forbidden { .. }
        )
    }
}

/// The client's answer to `err`, with one log line.
pub fn rescue<B: From<Bytes>>(err: &ProxyError, method: &http::Method, path: &str) -> Response<B> {
    let status = err.status();
    if status.is_server_error() {
        tracing::warn!(%method, path, status = status.as_u16(), code = err.code(), sent = err.sent(), cause = %err, "request failed");
    } else {
        tracing::info!(%method, path, status = status.as_u16(), code = err.code(), cause = %err, "request refused");
    }
    let mut response = error_response(status, err.code(), &err.to_string());
    if let Some(after) = err.retry_after() {
        // Whole seconds, at least one.
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    response
}

/// A PowerJob-shaped error answer: `{"success":false,"data":null,"message":"runonce: …","code":"…"}`.
pub fn error_response<B: From<Bytes>>(
    status: StatusCode,
    code: &str,
    message: &str,
) -> Response<B> {
    let body = powerjob::result_json(
        false,
        serde_json::Value::Null,
        Some(&format!("runonce: {message}")),
        Some(code),
    );
    let mut response = Response::new(B::from(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    #[tokio::test]
    async fn rescue_answers_with_a_powerjob_shaped_body() {
        let err = ProxyError::Timeout {
            upstream: "127.0.0.1:7700".into(),
            timeout: Duration::from_secs(2),
        };
        assert!(err.sent());
        let response: Response<Full<Bytes>> = rescue(&err, &http::Method::POST, "/openApi/runJob");
        assert_eq!(response.status(), 504);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["success"], false);
        assert_eq!(json["data"], serde_json::Value::Null);
        assert_eq!(json["code"], "RUNONCE_UPSTREAM_TIMEOUT");
        assert!(json["message"]
            .as_str()
            .unwrap()
            .starts_with("runonce: upstream 127.0.0.1:7700 did not answer"));
    }

    #[test]
    fn only_errors_after_sending_count_as_sent() {
        let unreachable = ProxyError::Unreachable {
            upstream: "a".into(),
            cause: "refused".into(),
        };
        assert!(!unreachable.sent());
        assert_eq!(unreachable.status(), 502);
        assert!(ProxyError::Broken {
            upstream: "a".into(),
            cause: "reset".into()
        }
        .sent());
        // A body that broke off mid-request, and an identical call's unknown outcome, may have reached it.
        assert!(ProxyError::ClientBody {
            cause: "reset".into()
        }
        .sent());
        assert!(ProxyError::OutcomeUnknown {
            retry_after: Duration::from_secs(60)
        }
        .sent());
        assert!(!ProxyError::StoreUnavailable {
            cause: "down".into()
        }
        .sent());
        assert!(
            ProxyError::BodyTooLarge { limit: 0 }.sent(),
            "may be cut off mid-stream"
        );
        // runonce's own failures may come after sending: never re-sent, and not blamed on an upstream.
        assert!(ProxyError::ShuttingDown.sent());
        assert_eq!(ProxyError::ShuttingDown.status(), 503);
        let internal = ProxyError::Internal {
            cause: "task failed".into(),
        };
        assert!(internal.sent());
        assert_eq!(internal.status(), 500);
        assert!(!internal.to_string().contains("upstream"), "{internal}");
    }
}
