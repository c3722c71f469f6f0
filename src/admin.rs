//! The admin listener, on its own port (loopback by default). Answers are JSON, but `/metrics`.
//!
//! Open to whoever reaches the port:
//! - `GET /healthz`: the process is alive (always 200).
//! - `GET /readyz`: 200 when an upstream accepts a connection; 503 when none does or runonce is shutting down
//!   (at once on SIGTERM, while the drain runs).
//! - `GET /metrics`: Prometheus text format ([`crate::metrics`]). `runonce_ready` is `/readyz`'s last answer;
//!   from the first scrape on, the listener also checks it in the background every 5 s.
//!
//! Operator endpoints, which read and change keys and the configuration:
//! - `GET /keys/{key}`: a record's state, age, owner, fingerprint and stored answer status.
//! - `DELETE /keys/{key}`: purges a record (to release an `unknown` key once the server was checked).
//! - `POST /keys/{key}/resolve`: asks PowerJob now what the unknown `runJob` on the key created, and settles
//!   the key by the answer (`guard::resolve`); with auth on, send the app's `X-POWERJOB-APP-ID` and
//!   `X-POWERJOB-ACCESS-TOKEN`.
//! - `GET /keys?state=inflight|done|unknown[&limit=N]`: records in that state (all without `state`).
//! - `POST /reload`: re-reads the configuration ([`crate::reload`]).
//!
//! With `admin_token` set they require `Authorization: Bearer <admin_token>` (401 otherwise). Without one they
//! answer only when the listener is bound to a loopback address: on any other address they answer 403, since an
//! unauthenticated `DELETE /keys` reachable from the network would let anyone re-open a key that must not run
//! twice. Probes and `/metrics` stay open either way (orchestrators and scrapers rarely send tokens).
//!
//! Nothing here touches the request path; probes cost the proxy nothing.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::rt::TokioTimer;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::config::{Secret, Settings};
use crate::proxy::Proxy;
use crate::reload::Reloader;
use crate::store::{Key, Listing, Record, State, Store};

/// Most records `GET /keys` returns unless `limit` asks for fewer (or more, up to [`MAX_LIST`]).
const DEFAULT_LIST: usize = 1000;
const MAX_LIST: usize = 10_000;

/// What the admin endpoints answer from.
pub struct Admin {
    proxy: Arc<Proxy>,
    /// Turns true on SIGTERM: `/readyz` answers 503 from then on.
    stopping: watch::Receiver<bool>,
    /// SHA-256 of `admin_token`, if set (digests compare in constant time, whatever the lengths).
    token: Option<[u8; 32]>,
    /// Operator endpoints answer without a token: none is set and the listener is on loopback.
    open_without_token: bool,
    reloader: Option<Arc<Reloader>>,
    /// The proxy's `header_read_timeout`, for the admin listener too.
    header_read_timeout: std::time::Duration,
    /// Signalled by each `/metrics` scrape: the first starts the background readiness check.
    scraped: tokio::sync::Notify,
}

impl Admin {
    pub fn new(
        settings: &Settings,
        proxy: Arc<Proxy>,
        stopping: watch::Receiver<bool>,
        reloader: Option<Arc<Reloader>>,
    ) -> Admin {
        let token = settings
            .admin_token
            .is_set()
            .then(|| settings.admin_token.digest());
        let loopback = settings.admin_listen.ip().is_loopback();
        if token.is_none() && !loopback {
            tracing::warn!(
                admin_listen = %settings.admin_listen,
                "admin_listen is not a loopback address and no admin_token is set: /keys and /reload answer 403"
            );
        }
        Admin {
            proxy,
            stopping,
            token,
            open_without_token: token.is_none() && loopback,
            reloader,
            header_read_timeout: settings.header_read_timeout.0,
            scraped: tokio::sync::Notify::new(),
        }
    }
}

/// Most admin connections served at once; the next one is accepted when one of them ends. Probes, scrapes
/// and an operator's calls need a handful.
const MAX_CONNECTIONS: usize = 64;

/// Serves admin requests until the task is dropped (the server ends it after the drain). The proxy's edge
/// limits hold here too: at most [`MAX_CONNECTIONS`] at once, and a head must arrive within
/// `header_read_timeout` (hyper has no read timeout without a timer).
pub async fn serve(listener: TcpListener, admin: Arc<Admin>) {
    // From the first scrape on, runonce_ready is at most READY_EVERY old, whether or not anything probes
    // /readyz. In the background, so a scrape never waits for the upstreams' connect time-outs; only once
    // something scrapes, so an unwatched runonce opens no connections to PowerJob of its own.
    let watch = {
        let admin = Arc::clone(&admin);
        async move {
            admin.scraped.notified().await;
            loop {
                ready_status(&admin).await;
                tokio::time::sleep(READY_EVERY).await;
            }
        }
    };
    tokio::select! {
        () = watch => {}
        () = accept(listener, admin) => {}
    }
}

/// How often the admin listener checks readiness for `runonce_ready`.
const READY_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

async fn accept(listener: TcpListener, admin: Arc<Admin>) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(admin.header_read_timeout);
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = match Arc::clone(&permits).acquire_owned().await {
            Ok(permit) => permit,
            Err(_) => return,
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!(%err, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let (admin, http) = (Arc::clone(&admin), http.clone());
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let admin = Arc::clone(&admin);
                async move { Ok::<_, std::convert::Infallible>(answer(request, &admin).await) }
            });
            let _ = http.serve_connection(TokioIo::new(stream), service).await;
            drop(permit);
        });
    }
}

async fn answer(request: Request<Incoming>, admin: &Admin) -> Response<Full<Bytes>> {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    match (&method, path.as_str()) {
        (&Method::GET, "/healthz") => json(StatusCode::OK, json!({"status": "ok"})),
        (&Method::GET, "/readyz") => readiness(admin).await,
        (&Method::GET, "/metrics") => {
            admin.scraped.notify_one();
            let mut response =
                Response::new(Full::new(Bytes::from(crate::metrics::get().render())));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
            );
            response
        }
        (_, "/reload") | (_, "/keys") => operator(&request, admin, &method, &path).await,
        (_, p) if p.starts_with("/keys/") => operator(&request, admin, &method, &path).await,
        (_, "/healthz" | "/readyz" | "/metrics") => method_not_allowed(),
        _ => json(StatusCode::NOT_FOUND, json!({"status": "not found"})),
    }
}

/// Whether runonce is ready, and if not why; kept in `runonce_ready`.
async fn ready_status(admin: &Admin) -> &'static str {
    let status = if *admin.stopping.borrow() {
        "shutting down"
    } else if admin.proxy.upstreams().any_reachable().await {
        "ready"
    } else {
        "no upstream reachable"
    };
    crate::metrics::get()
        .ready
        .set(i64::from(status == "ready"));
    status
}

async fn readiness(admin: &Admin) -> Response<Full<Bytes>> {
    let status = ready_status(admin).await;
    let code = if status == "ready" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(code, json!({ "status": status }))
}

/// The operator endpoints, behind the token (or loopback) check.
async fn operator(
    request: &Request<Incoming>,
    admin: &Admin,
    method: &Method,
    path: &str,
) -> Response<Full<Bytes>> {
    if let Some(refusal) = check_access(request, admin) {
        return refusal;
    }
    let store = admin.proxy.guard().store();
    match (method, path) {
        (&Method::POST, "/reload") => reload(admin),
        (&Method::GET, "/keys") => {
            let query = request.uri().query().unwrap_or("");
            let param = |name: &str| {
                form_urlencoded::parse(query.as_bytes())
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.into_owned())
            };
            let Some(filter) = Listing::parse(param("state").as_deref()) else {
                return json(
                    StatusCode::BAD_REQUEST,
                    json!({"status": "state must be inflight, done or unknown"}),
                );
            };
            let limit = match param("limit").map(|l| l.parse::<usize>()) {
                None => DEFAULT_LIST,
                Some(Ok(limit)) if (1..=MAX_LIST).contains(&limit) => limit,
                Some(_) => {
                    return json(
                        StatusCode::BAD_REQUEST,
                        json!({"status": format!("limit must be 1 to {MAX_LIST}")}),
                    )
                }
            };
            match store.list(filter, limit + 1).await {
                Ok(mut records) => {
                    let truncated = records.len() > limit;
                    records.truncate(limit);
                    let keys: Vec<Value> = records.iter().map(|(k, r)| describe(k, r)).collect();
                    json(
                        StatusCode::OK,
                        json!({"count": keys.len(), "truncated": truncated, "keys": keys}),
                    )
                }
                Err(err) => store_failed(&err),
            }
        }
        (&Method::POST, _) if path.starts_with("/keys/") && path.ends_with("/resolve") => {
            let text = &path["/keys/".len()..path.len() - "/resolve".len()];
            let Some(key) = Key::parse(text) else {
                return json(
                    StatusCode::BAD_REQUEST,
                    json!({"status": "a key is 64 lowercase hex characters"}),
                );
            };
            match admin
                .proxy
                .guard()
                .resolve_by_key(&key, request.headers())
                .await
            {
                Ok((status, mut body)) => {
                    body["key"] = json!(key.as_str());
                    json(status, body)
                }
                Err(err) => store_failed(&err),
            }
        }
        (&Method::GET | &Method::DELETE, _) if path.starts_with("/keys/") => {
            let text = &path["/keys/".len()..];
            let Some(key) = Key::parse(text) else {
                return json(
                    StatusCode::BAD_REQUEST,
                    json!({"status": "a key is 64 lowercase hex characters"}),
                );
            };
            if method == Method::GET {
                match store.get(&key).await {
                    Ok(Some(record)) => json(StatusCode::OK, describe(&key, &record)),
                    Ok(None) => json(
                        StatusCode::NOT_FOUND,
                        json!({"status": "no such key", "key": key.as_str()}),
                    ),
                    Err(err) => store_failed(&err),
                }
            } else {
                match store.purge(&key).await {
                    Ok(purged) => {
                        tracing::info!(key = key.prefix(), purged, "admin: key purged");
                        let status = if purged {
                            StatusCode::OK
                        } else {
                            StatusCode::NOT_FOUND
                        };
                        json(status, json!({"key": key.as_str(), "purged": purged}))
                    }
                    Err(err) => store_failed(&err),
                }
            }
        }
        _ => method_not_allowed(),
    }
}

/// `None` when the request may use the operator endpoints, else the refusal.
fn check_access(request: &Request<Incoming>, admin: &Admin) -> Option<Response<Full<Bytes>>> {
    let Some(expected) = &admin.token else {
        if admin.open_without_token {
            return None;
        }
        return Some(json(
            StatusCode::FORBIDDEN,
            json!({"status": "forbidden: admin_listen is not a loopback address and no admin_token is set"}),
        ));
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|given| Secret::matches(expected, given.trim().as_bytes())) {
        return None;
    }
    let mut refusal = json(
        StatusCode::UNAUTHORIZED,
        json!({"status": "unauthorized: send Authorization: Bearer <admin_token>"}),
    );
    refusal
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    Some(refusal)
}

fn reload(admin: &Admin) -> Response<Full<Bytes>> {
    let Some(reloader) = &admin.reloader else {
        return json(
            StatusCode::CONFLICT,
            json!({"status": "this process was not started from a configuration it can read again"}),
        );
    };
    match reloader.reload() {
        Ok(reloaded) => json(
            StatusCode::OK,
            json!({
                "status": "reloaded",
                "changed": reloaded.changed,
                "needs_restart": reloaded.needs_restart,
            }),
        ),
        Err(err) => json(
            StatusCode::BAD_REQUEST,
            json!({"status": "refused: the running configuration stays", "error": err.to_string()}),
        ),
    }
}

/// A record as the key API shows it.
fn describe(key: &Key, record: &Record) -> Value {
    let stored = match &record.state {
        State::Done {
            response,
            delivered,
        } => json!({"status": response.status, "delivered": delivered}),
        _ => Value::Null,
    };
    json!({
        "key": key.as_str(),
        "state": record.state.name(),
        "age_ms": record.age_ms,
        "owner": record.owner,
        "fingerprint": record.fingerprint,
        "stored": stored,
    })
}

fn store_failed(err: &crate::store::StoreError) -> Response<Full<Bytes>> {
    json(
        StatusCode::SERVICE_UNAVAILABLE,
        json!({"status": "store unavailable", "error": err.to_string()}),
    )
}

fn method_not_allowed() -> Response<Full<Bytes>> {
    json(
        StatusCode::METHOD_NOT_ALLOWED,
        json!({"status": "method not allowed"}),
    )
}

fn json(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
