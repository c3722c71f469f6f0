//! A request's way through runonce: limits, header rules, forwarding as a stream, and the rescue.
//!
//! - [`upstream`]: the servers, their connection pools, failover that never re-sends.
//! - [`tap`]: the auth-header repair, on the upstream connection's bytes.
//! - [`headers`]: hop-by-hop removal, `X-Forwarded-*`, exact-case heads for answers runonce writes itself.
//! - [`error`]: [`ProxyError`] and the one [`rescue`](error::rescue) that answers for it.
//!
//! Bodies stream both ways; nothing is buffered on this path. The idempotency engine will take the guarded
//! routes (`runJob`, …) before they reach [`Proxy::forward`]; everything else passes here untouched.

pub mod error;
pub mod headers;
pub mod tap;
pub mod upstream;

use std::net::SocketAddr;

use bytes::Bytes;
use http::{header, Method, Request, Response, Version};
use http_body_util::{Either, Full, Limited};
use hyper::body::Incoming;

use crate::config::{AuthHeader, Settings};
use crate::powerjob;
use error::{rescue, ProxyError};
use upstream::Upstreams;

/// What a client receives: the upstream's stream, or an answer runonce wrote.
pub type ResponseBody = Either<Incoming, Full<Bytes>>;

/// The proxy's request handling, shared by every connection.
pub struct Proxy {
    upstreams: Upstreams,
    auth_header: AuthHeader,
    body_limit: u64,
    max_header_bytes: usize,
    max_headers: usize,
}

impl Proxy {
    pub fn new(settings: &Settings) -> Self {
        Proxy {
            upstreams: Upstreams::new(settings),
            auth_header: settings.auth_header,
            body_limit: settings.body_limit.as_u64(),
            max_header_bytes: settings.max_header_bytes.as_u64() as usize,
            max_headers: settings.max_headers.0,
        }
    }

    pub fn upstreams(&self) -> &Upstreams {
        &self.upstreams
    }

    /// Answers one client request; never fails: errors become PowerJob-shaped answers.
    pub async fn handle(
        &self,
        request: Request<Incoming>,
        client: SocketAddr,
    ) -> Response<ResponseBody> {
        let method = request.method().clone();
        let uri = request.uri().clone();
        match self.forward(request, client).await {
            Ok(response) => response.map(Either::Left),
            Err(err) => rescue(&err, &method, uri.path()).map(Either::Right),
        }
    }

    /// Forwards a request as it is, but for the header rules, and streams the answer back.
    pub async fn forward(
        &self,
        request: Request<Incoming>,
        client: SocketAddr,
    ) -> Result<Response<Incoming>, ProxyError> {
        self.check_head(&request)?;
        let (mut parts, body) = request.into_parts();
        if parts.method == Method::CONNECT {
            return Err(ProxyError::Method {
                method: parts.method,
            });
        }
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|len| len > self.body_limit) {
            return Err(ProxyError::BodyTooLarge {
                limit: self.body_limit,
            });
        }
        let repair = self.auth_header == AuthHeader::Repair
            && powerjob::openapi_endpoint(parts.uri.path()).is_some();
        headers::remove_hop_by_hop(&mut parts.headers);
        headers::add_forwarded(&mut parts.headers, client.ip(), "http");
        // The parts keep their extensions: hyper's record of the client's header-name case goes upstream too.
        parts.version = Version::HTTP_11;
        let body = Either::Left(Limited::new(body, self.body_limit as usize));
        let arm = tap::Arm {
            repair,
            capture: false,
        };
        let (mut response, _) = self
            .upstreams
            .send(Request::from_parts(parts, body), arm)
            .await
            .map_err(|err| match err {
                ProxyError::BodyTooLarge { .. } => ProxyError::BodyTooLarge {
                    limit: self.body_limit,
                },
                other => other,
            })?;
        headers::remove_hop_by_hop(response.headers_mut());
        Ok(response)
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
