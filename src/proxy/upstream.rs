//! The upstream PowerJob servers: a keep-alive connection pool per server, and failover that never re-sends.
//!
//! Requests start at the server that answered last (as the PowerJob client keeps a `currentAddress`) and move
//! to the next one **only while the request has not left runonce**: a connect failure, or a pooled connection
//! that hyper reports closed before it wrote anything (`TrySendError` hands the request back). Once hyper has
//! taken the request, any failure is final for it (`Timeout` → 504, `Broken` → 502): the server may already
//! have created an instance, and at-most-once is the promise.
//!
//! The pool is our own, on `hyper::client::conn::http1`, rather than hyper-util's legacy client, because two
//! things need the connection itself: the [`Tap`] on its bytes is armed per request (auth-header repair), and
//! failover needs the request back when it was never sent.

use std::collections::VecDeque;
use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{header, response, HeaderValue, Request, Response, Uri};
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::error::ProxyError;
use super::tap::{Arm, Tap, TapCtl};
use crate::config::{Settings, UpstreamUrl};
use crate::workers;

/// A forwarded request's body: the client's stream under the size limit, or bytes runonce already holds.
pub type ForwardBody = Either<Limited<Incoming>, Full<Bytes>>;

/// A whole exchange with the servers, as the engine makes it: the request sent whole (failing over only while
/// it was not sent, as [`Upstreams::send`]), the answer read whole, its body at most `limit` bytes. The engine
/// holds its upstream as this trait, so that its rules run in unit tests against a stand-in, without sockets.
pub trait Exchange: Send + Sync {
    fn exchange(
        &self,
        request: Request<Bytes>,
        arm: Arm,
        limit: usize,
    ) -> Pin<Box<dyn Future<Output = Result<Exchanged, ProxyError>> + Send + '_>>;

    /// How long a server has to answer a request.
    fn response_timeout(&self) -> Duration;

    /// The server requests go to first (the one that answered last): named in errors.
    fn current(&self) -> String;
}

/// What an [`Exchange`] brought back.
pub struct Exchanged {
    pub parts: response::Parts,
    pub body: Bytes,
    /// The answer's head as it came, when the tap was armed to capture it.
    pub head: Option<Bytes>,
}

impl Exchange for Upstreams {
    fn exchange(
        &self,
        request: Request<Bytes>,
        arm: Arm,
        limit: usize,
    ) -> Pin<Box<dyn Future<Output = Result<Exchanged, ProxyError>> + Send + '_>> {
        Box::pin(async move {
            let request = request.map(|body| Either::Right(Full::new(body)));
            let (response, head) = self.send(request, arm).await?;
            let (parts, incoming) = response.into_parts();
            let body = Limited::new(incoming, limit)
                .collect()
                .await
                .map_err(|err| ProxyError::Broken {
                    upstream: self.current(),
                    cause: format!("reading its answer: {err}"),
                })?
                .to_bytes();
            Ok(Exchanged { parts, body, head })
        })
    }

    fn response_timeout(&self) -> Duration {
        self.response_timeout
    }

    fn current(&self) -> String {
        let (current, _) = self.order();
        self.url(current).to_string()
    }
}

/// Every configured server, in order.
pub struct Upstreams {
    servers: Vec<Arc<Upstream>>,
    /// Index of the server that answered last: the first one tried.
    current: AtomicUsize,
    connect_timeout: Duration,
    response_timeout: Duration,
}

/// One server and its idle connections.
struct Upstream {
    url: UpstreamUrl,
    /// Idle connections, oldest first, one pool per [`workers::slot`]: a connection's task runs on the thread
    /// that opened it, so a request borrows one of its own thread's. A std `Mutex`: held for a push or pop,
    /// never across an `.await`, and in practice only by its own thread.
    idle: Vec<Mutex<VecDeque<Idle>>>,
    /// Idle plain connections of the [fast lane](super::lane), per slot like `idle`.
    raw_idle: Vec<Mutex<VecDeque<RawIdle>>>,
    max_idle: usize,
    idle_timeout: Duration,
}

struct RawIdle {
    stream: TcpStream,
    since: Instant,
}

/// A plain connection to server `server`, borrowed by the fast lane; [`Upstreams::raw_checkin`] gives it back.
pub struct RawConn {
    pub stream: TcpStream,
    pub server: usize,
}

struct Idle {
    send: SendRequest<ForwardBody>,
    ctl: Arc<TapCtl>,
    since: Instant,
}

/// How one server's attempt ended when it did not answer.
enum Attempt {
    /// The request did not leave runonce: it may go to the next server.
    NotSent(Box<Request<ForwardBody>>, String),
    /// The request may have reached the server: final.
    Failed(ProxyError),
}

impl Upstreams {
    pub fn new(settings: &Settings) -> Self {
        let slots = 1 + workers::count(settings.workers.0);
        let servers = settings
            .upstreams
            .iter()
            .map(|url| {
                Arc::new(Upstream {
                    url: url.clone(),
                    idle: (0..slots).map(|_| Mutex::new(VecDeque::new())).collect(),
                    raw_idle: (0..slots).map(|_| Mutex::new(VecDeque::new())).collect(),
                    max_idle: settings.upstream_max_idle.0,
                    idle_timeout: settings.upstream_idle_timeout.0,
                })
            })
            .collect();
        Upstreams {
            servers,
            current: AtomicUsize::new(0),
            connect_timeout: settings.connect_timeout.0,
            response_timeout: settings.upstream_timeout.0,
        }
    }

    /// Sends `request` (origin-form URI) to the first server that takes it. `arm` sets the tap for its answer:
    /// the auth-header repair, and whether to hand back the answer's head as it reached hyper (for storing).
    pub async fn send(
        &self,
        mut request: Request<ForwardBody>,
        arm: Arm,
    ) -> Result<(Response<Incoming>, Option<Bytes>), ProxyError> {
        let path = request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let first = self.current.load(Ordering::Relaxed);
        let mut last = (String::new(), String::new());
        for step in 0..self.servers.len() {
            let index = (first + step) % self.servers.len();
            let server = &self.servers[index];
            match server
                .send(
                    request,
                    &path,
                    arm,
                    self.connect_timeout,
                    self.response_timeout,
                )
                .await
            {
                Ok(response) => {
                    self.answered(index, first);
                    return Ok(response);
                }
                Err(Attempt::Failed(err)) => return Err(err),
                Err(Attempt::NotSent(back, cause)) => {
                    self.not_reached(index, step + 1 == self.servers.len(), &cause);
                    last = (server.url.to_string(), cause);
                    request = *back;
                }
            }
        }
        Err(ProxyError::Unreachable {
            upstream: last.0,
            cause: last.1,
        })
    }

    /// How many servers there are, and which one to try first (the one that answered last).
    pub fn order(&self) -> (usize, usize) {
        (self.current.load(Ordering::Relaxed), self.servers.len())
    }

    /// Server `index`'s path prefix and `host:port`.
    pub fn url(&self, index: usize) -> &UpstreamUrl {
        &self.servers[index].url
    }

    /// Notes that server `index` answered after the first choice did not: it is tried first from now on.
    pub fn answered(&self, index: usize, first: usize) {
        if index != first {
            self.current.store(index, Ordering::Relaxed);
            tracing::info!(upstream = %self.servers[index].url, "upstream failover: now sending here first");
        }
    }

    /// Notes that server `index` could not be reached and the request goes to the next one (or nowhere).
    pub fn not_reached(&self, index: usize, last: bool, cause: &str) {
        if !last {
            crate::metrics::get().upstream_failovers.inc();
        }
        tracing::warn!(upstream = %self.servers[index].url, %cause, "upstream not reachable; request not sent, trying the next");
    }

    /// A plain connection to server `index` for the fast lane: an idle one of this thread's that is still open
    /// (the server may have closed it meanwhile: then it reads as ended, and goes), else a new one. Nothing has
    /// been sent on it when this returns, so an error here leaves the request free to go elsewhere.
    pub async fn raw_connect(&self, index: usize) -> Result<RawConn, String> {
        let server = &self.servers[index];
        loop {
            let idle = server
                .raw_idle()
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_back();
            let Some(idle) = idle else { break };
            if idle.since.elapsed() >= server.idle_timeout {
                continue;
            }
            let mut probe = [0u8; 1];
            // Open and quiet: `WouldBlock`. Ended (`Ok(0)`), failed, or with bytes nobody asked for: dropped.
            if let Err(err) = idle.stream.try_read(&mut probe) {
                if err.kind() == std::io::ErrorKind::WouldBlock {
                    return Ok(RawConn {
                        stream: idle.stream,
                        server: index,
                    });
                }
            }
        }
        let stream = server.dial(self.connect_timeout).await?;
        Ok(RawConn {
            stream,
            server: index,
        })
    }

    /// Gives back a connection whose last answer was read to its end, into this thread's pool.
    pub fn raw_checkin(&self, conn: RawConn) {
        let server = &self.servers[conn.server];
        let mut idle = server.raw_idle().lock().unwrap_or_else(|p| p.into_inner());
        // Expired ones go from the oldest end (closed by the server meanwhile or not: their sockets are let
        // go), then the oldest while the pool is full; `upstream_max_idle = 0` keeps none.
        while idle
            .front()
            .is_some_and(|oldest| oldest.since.elapsed() >= server.idle_timeout)
            || (!idle.is_empty() && idle.len() >= server.max_idle)
        {
            idle.pop_front();
        }
        if server.max_idle == 0 {
            return;
        }
        idle.push_back(RawIdle {
            stream: conn.stream,
            since: Instant::now(),
        });
    }

    /// How long a server has to answer a request.
    pub fn response_timeout(&self) -> Duration {
        self.response_timeout
    }

    /// Whether any server accepts a TCP connection (readiness). Opens and closes one connection; sends nothing.
    pub async fn any_reachable(&self) -> bool {
        for server in &self.servers {
            let connect = TcpStream::connect(server.url.authority.as_str());
            if let Ok(Ok(_)) = tokio::time::timeout(self.connect_timeout, connect).await {
                return true;
            }
        }
        false
    }
}

impl Upstream {
    async fn send(
        self: &Arc<Self>,
        mut request: Request<ForwardBody>,
        path: &PathAndQuery,
        arm: Arm,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Result<(Response<Incoming>, Option<Bytes>), Attempt> {
        *request.uri_mut() = match self.uri(path) {
            Ok(uri) => uri,
            Err(cause) => return Err(Attempt::NotSent(Box::new(request), cause)),
        };
        if !request.headers().contains_key(header::HOST) {
            if let Ok(host) = HeaderValue::from_str(&self.url.authority) {
                request.headers_mut().insert(header::HOST, host);
            }
        }
        // Pooled connections first; one the server closed meanwhile hands the request back and is dropped.
        // The loop ends: every turn either returns or takes a connection out of the finite idle list.
        loop {
            let (mut send, ctl, reused) = match self.checkout() {
                Some(idle) => (idle.send, idle.ctl, true),
                None => match self.connect(connect_timeout).await {
                    Ok((send, ctl)) => (send, ctl, false),
                    Err(cause) => return Err(Attempt::NotSent(Box::new(request), cause)),
                },
            };
            ctl.arm(arm);
            match tokio::time::timeout(response_timeout, send.try_send_request(request)).await {
                Ok(Ok(response)) => {
                    let head = if arm.capture { ctl.take_head() } else { None };
                    self.checkin_when_idle(send, ctl);
                    return Ok((response, head));
                }
                Ok(Err(mut err)) => match err.take_message() {
                    Some(back) if reused => request = back,
                    Some(back) => {
                        return Err(Attempt::NotSent(
                            Box::new(back),
                            err.into_error().to_string(),
                        ))
                    }
                    None => return Err(Attempt::Failed(self.classify(err.into_error()))),
                },
                // Dropping the call closes the connection; the request may be on the server already.
                Err(_) => {
                    return Err(Attempt::Failed(ProxyError::Timeout {
                        upstream: self.url.to_string(),
                        timeout: response_timeout,
                    }))
                }
            }
        }
    }

    fn uri(&self, path: &PathAndQuery) -> Result<Uri, String> {
        if self.url.base.is_empty() {
            return Ok(Uri::from(path.clone()));
        }
        format!("{}{}", self.url.base, path)
            .parse()
            .map_err(|err| format!("bad path: {err}"))
    }

    /// A failure after hyper took the request: the client's body, or the upstream, is to blame.
    fn classify(&self, err: hyper::Error) -> ProxyError {
        let mut source = err.source();
        while let Some(cause) = source {
            if cause.is::<LengthLimitError>() {
                return ProxyError::BodyTooLarge { limit: 0 };
            }
            source = cause.source();
        }
        if err.is_user() {
            return ProxyError::ClientBody {
                cause: err.to_string(),
            };
        }
        ProxyError::Broken {
            upstream: self.url.to_string(),
            cause: err.to_string(),
        }
    }

    /// This thread's pool of plain connections.
    fn raw_idle(&self) -> &Mutex<VecDeque<RawIdle>> {
        &self.raw_idle[workers::slot() % self.raw_idle.len()]
    }

    /// This thread's pool.
    fn idle(&self) -> &Mutex<VecDeque<Idle>> {
        &self.idle[workers::slot() % self.idle.len()]
    }

    fn checkout(&self) -> Option<Idle> {
        let mut idle = self
            .idle()
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        while let Some(conn) = idle.pop_back() {
            if conn.since.elapsed() < self.idle_timeout && conn.send.is_ready() {
                return Some(conn);
            }
        }
        None
    }

    /// Puts the connection back once its answer has been read to the end (hyper then reports it ready), into
    /// the pool of the thread it runs on.
    fn checkin_when_idle(self: &Arc<Self>, mut send: SendRequest<ForwardBody>, ctl: Arc<TapCtl>) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            if send.ready().await.is_err() {
                return;
            }
            let mut idle = this
                .idle()
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if idle.len() >= this.max_idle {
                idle.pop_front();
            }
            idle.push_back(Idle {
                send,
                ctl,
                since: Instant::now(),
            });
        });
    }

    /// A new TCP connection to this server, within `timeout`.
    async fn dial(&self, timeout: Duration) -> Result<TcpStream, String> {
        let stream =
            match tokio::time::timeout(timeout, TcpStream::connect(self.url.authority.as_str()))
                .await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(err)) => return Err(format!("connect: {err}")),
                Err(_) => return Err(format!("connect: no answer within {timeout:?}")),
            };
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    async fn connect(
        &self,
        timeout: Duration,
    ) -> Result<(SendRequest<ForwardBody>, Arc<TapCtl>), String> {
        let stream = self.dial(timeout).await?;
        let ctl = Arc::new(TapCtl::default());
        let (send, conn) = hyper::client::conn::http1::Builder::new()
            .preserve_header_case(true)
            .handshake(TokioIo::new(Tap::new(stream, Arc::clone(&ctl))))
            .await
            .map_err(|err| format!("handshake: {err}"))?;
        let upstream = self.url.to_string();
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::debug!(%upstream, %err, "upstream connection ended");
            }
        });
        Ok((send, ctl))
    }
}
