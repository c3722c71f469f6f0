//! The admin listener, on its own port (loopback by default):
//! - `GET /healthz`: the process is alive (always 200).
//! - `GET /readyz`: 200 when an upstream accepts a connection; 503 when none does or runonce is shutting down.
//!
//! Nothing here touches the request path; probes cost the proxy nothing.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::proxy::Proxy;

/// Serves admin requests until `stopped` turns true.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, mut stopped: watch::Receiver<bool>) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    tracing::warn!(%err, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped.changed() => return,
        };
        let proxy = Arc::clone(&proxy);
        let stopped = stopped.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let proxy = Arc::clone(&proxy);
                let stopping = *stopped.borrow();
                async move { Ok::<_, std::convert::Infallible>(answer(request, &proxy, stopping).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(
    request: Request<Incoming>,
    proxy: &Proxy,
    stopping: bool,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        return json(
            StatusCode::METHOD_NOT_ALLOWED,
            r#"{"status":"method not allowed"}"#,
        );
    }
    match request.uri().path() {
        "/healthz" => json(StatusCode::OK, r#"{"status":"ok"}"#),
        "/readyz" if stopping => json(
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"status":"shutting down"}"#,
        ),
        "/readyz" if proxy.upstreams().any_reachable().await => {
            json(StatusCode::OK, r#"{"status":"ready"}"#)
        }
        "/readyz" => json(
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"status":"no upstream reachable"}"#,
        ),
        _ => json(StatusCode::NOT_FOUND, r#"{"status":"not found"}"#),
    }
}

fn json(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
