//! A request's way through runonce: limits, header rules, forwarding as a stream, and the rescue.
//!
//! - [`lane`]: the fast lane, runonce's own HTTP/1.1 forwarding of plain pass-through requests; it hands a
//!   connection to hyper (and this module) at the first request it does not take.
//! - [`access`]: runonce's own access control (networks, shared secret, app ids), off unless configured.
//! - [`upstream`]: the servers, their connection pools, failover that never re-sends.
//! - [`tap`]: the auth-header repair, on the upstream connection's bytes.
//! - [`headers`]: hop-by-hop removal, `X-Forwarded-*`, exact-case heads for answers runonce writes itself.
//! - [`error`]: [`ProxyError`] and the one [`rescue`](error::rescue) that answers for it.
//!
//! - [`answer`]: the body of answers runonce holds whole, which reports when it was delivered.
//!
//! Bodies stream both ways on every route but the guarded ones (`runJob`, …), which [`crate::guard`] reads
//! whole, keys and de-duplicates, and, while `allow_apps` is set, other `/openApi/**` requests, read whole to
//! find their app ids; everything else passes untouched.

/// `AsyncWrite` for an IO wrapper whose writes go straight to its `io` field: the wrappers here ([`tap::Tap`],
/// [`lane::Rewind`]) only change what is read.
macro_rules! write_through {
    ($wrapper:ident) => {
        impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $wrapper<T> {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                data: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.io).poll_write(cx, data)
            }

            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                data: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, data)
            }

            fn is_write_vectored(&self) -> bool {
                self.io.is_write_vectored()
            }

            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.io).poll_flush(cx)
            }

            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
            }
        }
    };
}

pub mod access;
pub mod answer;
pub mod delivery;
pub mod error;
pub mod headers;
pub mod lane;
pub mod tap;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, Version};
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use hyper::body::Incoming;

use crate::config::{AuthHeader, Settings};
use crate::guard::routes::Route;
use crate::guard::Guard;
use crate::powerjob;
use crate::store::AnyStore;
use access::Access;
use answer::Answer;
use error::{rescue, ProxyError};
use upstream::Upstreams;

/// What a client receives: the upstream's stream, or an answer runonce holds whole (its own, a guarded
/// call's, a replay).
pub type ResponseBody = Either<Incoming, Answer>;

/// A request's class ([`Proxy::classify`]).
pub struct Class {
    /// The guarded route it is on, if any: the engine's.
    pub route: Option<Arc<Route>>,
    /// Its answer gets the auth-header repair (`auth_header = "repair"`, a PowerJob endpoint).
    pub repair: bool,
    /// An `/authApp` call (noted for the 5.1.0 re-send, when the repair is off).
    pub auth_app: bool,
    /// Which access rules apply to it ([`access::Access::scope`]; the lane runs only without access rules).
    pub scope: access::Scope,
}

/// The proxy's request handling, shared by every connection.
pub struct Proxy {
    upstreams: Arc<Upstreams>,
    guard: Arc<Guard>,
    access: Access,
    /// `X-Forwarded-Proto`: `https` when the listener speaks TLS.
    scheme: &'static str,
    auth_header: AuthHeader,
    body_limit: u64,
    body_read_timeout: std::time::Duration,
    header_read_timeout: std::time::Duration,
    /// Whether plain pass-through requests take the [`lane`].
    lane: bool,
    max_header_bytes: usize,
    max_headers: usize,
}

impl Proxy {
    pub fn new(settings: &Settings, store: AnyStore) -> Self {
        let upstreams = Arc::new(Upstreams::new(settings));
        let access = Access::new(settings);
        // The lane writes `X-Forwarded-Proto: http` and applies no access rule: plain listeners without them.
        let lane = settings.fast_lane.0 && settings.tls_cert.trim().is_empty() && access.is_off();
        Proxy {
            guard: Arc::new(Guard::new(settings, store, upstreams.clone())),
            upstreams,
            access,
            scheme: if settings.tls_cert.trim().is_empty() {
                "http"
            } else {
                "https"
            },
            auth_header: settings.auth_header,
            body_limit: settings.body_limit.as_u64(),
            body_read_timeout: settings.body_read_timeout.0,
            header_read_timeout: settings.header_read_timeout.0,
            lane,
            max_header_bytes: settings.max_header_bytes.as_u64() as usize,
            max_headers: settings.max_headers.0,
        }
    }

    pub fn upstreams(&self) -> &Upstreams {
        &self.upstreams
    }

    /// Whether this proxy's connections start in the [`lane`].
    pub fn lane(&self) -> bool {
        self.lane
    }

    pub fn guard(&self) -> &Guard {
        &self.guard
    }

    /// What a request is by its method and path: the one decision hyper's path and the lane both take (its
    /// access scope, its guarded route, the auth-header repair, an `/authApp` note). The
    /// endpoint is read as the server reads the path (`powerjob::served_endpoint`), so that no spelling of
    /// `runJob` gets past the guard.
    pub fn classify(&self, method: &Method, path: &str) -> Class {
        let endpoint = powerjob::served_endpoint(path);
        Class {
            scope: self.access.scope(path),
            repair: self.auth_header == AuthHeader::Repair && endpoint.is_some(),
            auth_app: endpoint.as_deref() == Some(powerjob::AUTH_APP),
            route: endpoint.and_then(|endpoint| self.guard.route(method, &endpoint)),
        }
    }

    /// Answers one client request; never fails: errors become PowerJob-shaped answers.
    /// `delivery` watches the client's connection for whether it took a guarded answer.
    pub async fn handle(
        &self,
        request: Request<Incoming>,
        client: SocketAddr,
        delivery: Option<&Arc<delivery::Delivery>>,
    ) -> Response<ResponseBody> {
        let method = request.method().clone();
        let uri = request.uri().clone();
        match self.dispatch(request, client, delivery).await {
            Ok(response) => response,
            Err(err) => {
                let mut response = rescue(&err, &method, uri.path());
                if let ProxyError::BodyTimeout { .. } = err {
                    // The rest of the body may still come: this connection cannot carry another request.
                    response
                        .headers_mut()
                        .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
                }
                response.map(Either::Right)
            }
        }
    }

    /// Applies the access rules, the limits and the header rules, then forwards the request as a stream, or, on
    /// a guarded route, reads it whole and hands it to the engine.
    async fn dispatch(
        &self,
        request: Request<Incoming>,
        client: SocketAddr,
        delivery: Option<&Arc<delivery::Delivery>>,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        // A request refused before it is routed counts as `rejected` on route `other` (the engine counts its
        // own); an access refusal's one log line (the rescue's) names who was refused.
        let refused = |err: ProxyError| {
            crate::metrics::get().rejected();
            match err {
                ProxyError::Forbidden { code, reason } => ProxyError::Forbidden {
                    code,
                    reason: format!("{reason} (client {})", client.ip()),
                },
                other => other,
            }
        };
        self.check_head(&request).map_err(refused)?;
        let (mut parts, body) = request.into_parts();
        let Class {
            route,
            repair,
            auth_app,
            scope,
        } = self.classify(&parts.method, parts.uri.path());
        // Refused callers learn nothing else about the request.
        self.access
            .check_head(client.ip(), scope, &parts.headers)
            .map_err(refused)?;
        self.access.remove_secret(&mut parts.headers);
        if parts.method == Method::CONNECT {
            return Err(refused(ProxyError::Method {
                method: parts.method,
            }));
        }
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|len| len > self.body_limit) {
            return Err(refused(ProxyError::BodyTooLarge {
                limit: self.body_limit,
            }));
        }
        if auth_app {
            self.guard.note_auth(client.ip()).await;
        }
        headers::remove_hop_by_hop(&mut parts.headers);
        headers::add_forwarded(&mut parts.headers, client.ip(), self.scheme);
        // The parts keep their extensions: hyper's record of the client's header-name case goes upstream too.
        parts.version = Version::HTTP_11;
        let limit_error = |err: ProxyError| match err {
            ProxyError::BodyTooLarge { .. } => ProxyError::BodyTooLarge {
                limit: self.body_limit,
            },
            other => other,
        };
        // Guarded routes, and any OpenAPI request while `allow_apps` is on, are read whole first.
        let body = if route.is_some() || self.access.reads_body(scope) {
            let bytes = self.read_body(body).await.map_err(refused)?;
            self.access
                .check_apps(scope, &parts, &bytes)
                .map_err(refused)?;
            if let Some(route) = route {
                let delivery = delivery.cloned();
                let answer = self
                    .guard
                    .handle(route, parts, bytes, client, repair, delivery)
                    .await;
                return answer.map(|response| response.map(Either::Right));
            }
            Either::Right(Full::new(bytes))
        } else {
            Either::Left(Limited::new(body, self.body_limit as usize))
        };
        let metrics = crate::metrics::get();
        metrics.passthrough();
        let arm = tap::Arm {
            repair,
            capture: false,
        };
        let started = std::time::Instant::now();
        let (mut response, _) = self
            .upstreams
            .send(Request::from_parts(parts, body), arm)
            .await
            .map_err(limit_error)?;
        metrics
            .upstream_passthrough
            .observe(started.elapsed().as_secs_f64());
        if response.headers().contains_key(header::TRANSFER_ENCODING) {
            // hyper read the body by its transfer coding; a length beside it would mislead the client.
            response.headers_mut().remove(header::CONTENT_LENGTH);
        }
        headers::remove_hop_by_hop(response.headers_mut());
        headers::one_length(response.headers_mut());
        Ok(response.map(Either::Left))
    }

    /// The whole request body, within `body_limit` and `body_read_timeout` (the slowloris guard for bodies
    /// runonce reads whole).
    async fn read_body(&self, body: Incoming) -> Result<Bytes, ProxyError> {
        let whole = Limited::new(body, self.body_limit as usize).collect();
        Ok(tokio::time::timeout(self.body_read_timeout, whole)
            .await
            .map_err(|_| ProxyError::BodyTimeout {
                timeout: self.body_read_timeout,
            })?
            .map_err(|err| match err.downcast::<LengthLimitError>() {
                Ok(_) => ProxyError::BodyTooLarge {
                    limit: self.body_limit,
                },
                Err(err) => ProxyError::ClientBody {
                    cause: err.to_string(),
                },
            })?
            .to_bytes())
    }

    /// Header limits with a clear answer; hyper's own limits (twice these, see `server.rs`) are the backstop.
    fn check_head<B>(&self, request: &Request<B>) -> Result<(), ProxyError> {
        let headers = request.headers();
        if headers.len() > self.max_headers {
            return Err(ProxyError::HeadTooLarge {
                what: format!(
                    "{} headers, at most {} allowed",
                    headers.len(),
                    self.max_headers
                ),
            });
        }
        // The request line plus each header line as it came: `name: value\r\n`.
        let uri = request.uri();
        let target = uri.path_and_query().map_or(1, |pq| pq.as_str().len())
            + uri.authority().map_or(0, |a| a.as_str().len());
        let line = request.method().as_str().len() + target + " HTTP/1.1\r\n".len() + 1;
        let size = headers.iter().fold(line, |sum, (name, value)| {
            sum + name.as_str().len() + value.len() + 4
        });
        if size > self.max_header_bytes {
            return Err(ProxyError::HeadTooLarge {
                what: format!(
                    "{size} bytes of headers, at most {} allowed",
                    self.max_header_bytes
                ),
            });
        }
        Ok(())
    }
}
