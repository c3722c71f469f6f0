//! `runonce health`: one GET to an admin endpoint, for container health checks.
//!
//! The image is distroless (no shell, no curl), so a Docker `HEALTHCHECK` or a Kubernetes `exec` probe needs a
//! checker inside the binary itself. It sends `GET` to the URL (by default the admin `/healthz` on loopback) and
//! succeeds only on a 2xx answer within the timeout. It speaks plain HTTP through [`crate::rawhttp`]; nothing
//! here runs inside the proxy.

use std::time::Duration;

use crate::rawhttp;

/// Where the Dockerfile's admin listener answers inside the container.
pub const DEFAULT_URL: &str = "http://127.0.0.1:9700/healthz";

/// Why a check failed: the URL, the connection, or the answer.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("bad URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("GET {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("GET {url}: status {status}: {body}")]
    Unhealthy {
        url: String,
        status: u16,
        body: String,
    },
}

/// GETs `url` (`http://host:port/path`) within `timeout`; `Ok` carries the status and body of a 2xx answer.
pub async fn check(url: &str, timeout: Duration) -> Result<(u16, String), HealthError> {
    let bad = |reason: &str| HealthError::BadUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let uri: http::Uri = url.parse().map_err(|_| bad("not a URL"))?;
    if uri.scheme_str() != Some("http") {
        return Err(bad("only http:// is supported"));
    }
    let authority = uri.authority().ok_or_else(|| bad("needs host:port"))?;
    let port = authority.port_u16().unwrap_or(80);
    let target = uri.path_and_query().map_or("/", |p| p.as_str());
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: runonce-health\r\nConnection: close\r\n\r\n"
    );
    let response = rawhttp::exchange(
        (authority.host().trim_matches(['[', ']']), port),
        request.as_bytes(),
        timeout,
    )
    .await
    .map_err(|source| HealthError::Unreachable {
        url: url.to_owned(),
        source,
    })?;
    let body = response.text().trim().to_owned();
    if (200..300).contains(&response.status) {
        Ok((response.status, body))
    } else {
        Err(HealthError::Unhealthy {
            url: url.to_owned(),
            status: response.status,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_url_that_is_not_plain_http_is_refused_before_connecting() {
        for url in [
            "https://127.0.0.1:1/healthz",
            "127.0.0.1:9700",
            "nonsense url",
        ] {
            let err = check(url, Duration::from_secs(1)).await.unwrap_err();
            assert!(matches!(err, HealthError::BadUrl { .. }), "{url}: {err}");
        }
    }

    #[tokio::test]
    async fn a_closed_port_is_unreachable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}/healthz");
        let err = check(&url, Duration::from_secs(2)).await.unwrap_err();
        assert!(matches!(err, HealthError::Unreachable { .. }), "{err}");
    }
}
