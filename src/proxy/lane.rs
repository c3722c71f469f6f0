//! The fast lane: plain pass-through requests forwarded by runonce's own HTTP/1.1 code instead of hyper's.
//!
//! Why: a pass-through request through hyper crosses two dispatchers (server and client connection), a
//! request channel, a body channel and a spawned check-in task, and builds two `HeaderMap`s with their
//! header-case maps. `perf` put half of runonce's CPU per forwarded request in that user-space work, which
//! kept pass-through below nginx's throughput (BENCHMARKS.md). The lane reads the request head with
//! `httparse` (the parser hyper uses), writes it upstream as it came minus the hop-by-hop headers, and copies
//! the answer back, all in the connection's task on plain sockets from a per-thread pool.
//!
//! The lane takes only what it can forward exactly; it is strict, and anything else goes to hyper:
//! - a whole HTTP/1.1 request head in the bytes read so far, within `max_header_bytes` and `max_headers`;
//! - an origin-form target of URI characters only, any method but `CONNECT`;
//! - a body framed by at most one valid `Content-Length` within `body_limit`: no `Transfer-Encoding`, no
//!   `Expect`, no `Upgrade`, and a `Connection` header naming only `close` or `keep-alive`;
//! - a route the engine does not guard (guarded calls are read whole and keyed by `crate::guard`).
//!
//! Anything else, from the first request that does not qualify on, is **handed off** ([`Exit::HandOff`]):
//! hyper serves the rest of the connection, starting with the bytes the lane read and did not use, exactly as
//! if it had served the connection from its start. So every refusal (400, 413, 431, …), every guarded call
//! and every unusual framing keeps one implementation, hyper's path in `proxy/mod.rs`. The hand-off happens
//! only between requests, before anything of the handed request went anywhere.
//!
//! Its loop: read a head with the codec (`http1::head`), classify it (`Proxy::classify`, as hyper's path does),
//! forward, stream the answer, or hand off. Forwarding keeps the promises of hyper's path: the same header rules
//! (`headers.rs`: hop-by-hop removal, `X-Forwarded-For`/`-Proto`, `Host` when missing, the auth-header rule,
//! applied to the head the lane reads), framing fields written from the framing decision (`http1::write`),
//! failover only while nothing was sent (a connect failure; a pooled connection that reads as
//! closed is dropped before use), `upstream_timeout` up to the answer's head (504, never re-sent), and the
//! same PowerJob-shaped error answers (`error::rescue`). Answers stream back as their upstream framed them
//! (`Content-Length`, chunked, or up to the close); interim 1xx heads are dropped, as hyper's client does.
//! Header names keep their case both ways.

use std::io::Write as _;
use std::net::SocketAddr;
use std::ops::Range;
use std::time::Instant;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use http::{Method, Response};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::error::{rescue, ProxyError};
use super::headers::{auth_fix, forwarded_for, Fix, AUTH_LINE};
use super::headers::{is_hop_by_hop, MAX_ANSWER_HEAD, MAX_ANSWER_HEADERS};
use super::Proxy;
use crate::http1::chunked::Chunks;
use crate::http1::framing::{parse_length, Framing, Message};
use crate::http1::head::{Head, HeadError, Limits};
use crate::http1::write::{is_framing_field, put_line, write_framing};
use crate::powerjob;

/// How a connection left the lane.
pub enum Exit {
    /// Closed: by the client, after `Connection: close`, an error answer, shutdown or the head time-out.
    Done,
    /// Not a request for the lane: hyper serves the connection from here, starting with these bytes.
    HandOff(TcpStream, BytesMut),
}

/// Read size for bodies and heads.
const READ_CHUNK: usize = 16 * 1024;

/// Serves `client` while its requests are for the lane. `stopped` turns true at shutdown: the connection then
/// ends after the request under way.
pub async fn serve(
    proxy: &Proxy,
    client: TcpStream,
    peer: SocketAddr,
    mut stopped: watch::Receiver<bool>,
) -> Exit {
    let mut conn = Conn {
        proxy,
        client,
        peer,
        buf: BytesMut::with_capacity(READ_CHUNK),
        up_buf: BytesMut::new(),
        lines: Vec::with_capacity(1024),
        wire: Vec::with_capacity(2048),
        answer_due: Deadline::new(),
    };
    let mut head_due = Deadline::new();
    loop {
        if *stopped.borrow() {
            return Exit::Done;
        }
        // The next request's head, within `header_read_timeout` from here (hyper's slowloris guard).
        head_due.set(proxy.header_read_timeout);
        let request = loop {
            if !conn.buf.is_empty() {
                match conn.read_head() {
                    Read::Request(request) => break request,
                    Read::HandOff => return Exit::HandOff(conn.client, conn.buf),
                    Read::Partial if conn.buf.len() > proxy.max_header_bytes => {
                        return Exit::HandOff(conn.client, conn.buf)
                    }
                    Read::Partial => {}
                }
            }
            conn.buf.reserve(READ_CHUNK);
            let idle = conn.buf.is_empty();
            let read = tokio::select! {
                biased;
                read = conn.client.read_buf(&mut conn.buf) => Some(read),
                () = head_due.elapsed() => None,
                Ok(_) = stopped.wait_for(|stopped| *stopped), if idle => return Exit::Done,
            };
            match read {
                Some(Ok(0)) | Some(Err(_)) => return Exit::Done,
                Some(Ok(_)) => {}
                None if idle => return Exit::Done,
                None => {
                    tracing::info!(%peer, "closed a connection that sent no complete request head in time");
                    return Exit::Done;
                }
            }
        };
        match conn.forward(&request, &stopped).await {
            Ok(true) => {}
            Ok(false) => {
                let _ = conn.client.shutdown().await;
                return Exit::Done;
            }
            Err(Failure::Answer(err)) => {
                conn.answer_error(&request, &err).await;
                return Exit::Done;
            }
            Err(Failure::ClientGone) => return Exit::Done,
        }
    }
}

/// A connection handed to hyper: the bytes the lane read and did not use, then the connection itself.
pub struct Rewind<T> {
    read: BytesMut,
    io: T,
}

impl<T> Rewind<T> {
    pub fn new(io: T, read: BytesMut) -> Rewind<T> {
        Rewind { read, io }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.read.is_empty() {
            return Pin::new(&mut self.io).poll_read(cx, out);
        }
        let n = self.read.len().min(out.remaining());
        out.put_slice(&self.read[..n]);
        self.read.advance(n);
        Poll::Ready(Ok(()))
    }
}

write_through!(Rewind);

impl<T: crate::proxy::delivery::SocketError> crate::proxy::delivery::SocketError for Rewind<T> {
    fn socket_error(&self) -> Option<io::Error> {
        self.io.socket_error()
    }
}

/// What the bytes read so far hold.
enum Read {
    /// A request for the lane, its head consumed.
    Request(Request),
    /// The start of a head: read on.
    Partial,
    /// A request for hyper's path.
    HandOff,
}

/// A request the lane forwards. Its target and header lines are in [`Conn::lines`].
struct Request {
    method: Method,
    /// The request target, as the client sent it.
    target: Range<usize>,
    /// The header lines as they go upstream (`Name: value\r\n` each), without `Host` when the client sent none.
    headers: Range<usize>,
    has_host: bool,
    /// `Content-Length` (0 when absent).
    body: u64,
    /// The client asked to close after this request.
    close: bool,
    /// Apply the auth-header repair to the answer.
    repair: bool,
}

/// Why a request ended without its answer streamed to the client.
enum Failure {
    /// Answered with runonce's error answer; the connection closes after it.
    Answer(ProxyError),
    /// The client connection failed: nothing can be answered.
    ClientGone,
}

struct Conn<'a> {
    proxy: &'a Proxy,
    client: TcpStream,
    peer: SocketAddr,
    /// Bytes read from the client and not used yet (the next request's, once a request's head is read).
    buf: BytesMut,
    /// Bytes read from the upstream and not written yet.
    up_buf: BytesMut,
    /// The request's target and header lines, as they go upstream.
    lines: Vec<u8>,
    /// What is written next: the upstream request's head, or the client answer's head.
    wire: Vec<u8>,
    /// When the upstream's answer head is due (`upstream_timeout`).
    answer_due: Deadline,
}

/// A connection's time limit for one phase (reading a request head, waiting for an answer head), set anew for
/// each request. One timer per connection and phase: each is only ever moved later (the same limit from a
/// later start), which tokio does without a lock and without waking its driver. A fresh `timeout` per request
/// registered and removed a timer under the driver's lock each time, and one due before the driver's next
/// wake-up wrote to its eventfd: measured in BENCHMARKS.md.
struct Deadline(Pin<Box<tokio::time::Sleep>>);

impl Deadline {
    fn new() -> Deadline {
        // Not registered with the driver until first set and polled.
        Deadline(Box::pin(tokio::time::sleep_until(
            tokio::time::Instant::now(),
        )))
    }

    /// Due `limit` from now.
    fn set(&mut self, limit: std::time::Duration) {
        self.0.as_mut().reset(tokio::time::Instant::now() + limit);
    }

    /// Resolves when the limit last set has passed.
    fn elapsed(&mut self) -> &mut Pin<Box<tokio::time::Sleep>> {
        &mut self.0
    }
}

impl Conn<'_> {
    /// Parses the head at the start of `buf` and, when the lane takes the request, consumes it and writes its
    /// target and upstream header lines into `lines`. Nothing is consumed otherwise.
    fn read_head(&mut self) -> Read {
        match self.take_head() {
            Ok(Some(request)) => Read::Request(request),
            Ok(None) => Read::Partial,
            Err(()) => Read::HandOff,
        }
    }

    /// [`Self::read_head`]: `Ok(None)` for a partial head, `Err` to hand off.
    fn take_head(&mut self) -> Result<Option<Request>, ()> {
        let proxy = self.proxy;
        let classify = |method: &Method, path: &str| {
            let class = proxy.classify(method, path);
            // A guarded route is the engine's; noting an `/authApp` call is a store write: hyper's path.
            let elsewhere = class.route.is_some() || (class.auth_app && proxy.guard().notes_auth());
            (!elsewhere).then_some(class.repair)
        };
        let rules = HeadRules {
            max_header_bytes: proxy.max_header_bytes,
            max_headers: proxy.max_headers,
            body_limit: proxy.body_limit,
            classify: &classify,
        };
        let Some((len, request)) =
            request_head(&self.buf, &rules, self.peer.ip(), &mut self.lines)?
        else {
            return Ok(None);
        };
        self.buf.advance(len);
        Ok(Some(request))
    }

    /// Forwards `request` and streams the answer back. `Ok(true)`: the connection may carry another request.
    /// The connection closes after it when the client asked, the answer is delimited by the close, or runonce
    /// is shutting down (`stopped`).
    async fn forward(
        &mut self,
        request: &Request,
        stopped: &watch::Receiver<bool>,
    ) -> Result<bool, Failure> {
        let metrics = crate::metrics::get();
        metrics.passthrough();
        let upstreams = self.proxy.upstreams();
        let (first, count) = upstreams.order();
        let mut upstream = None;
        let mut last = (String::new(), String::new());
        for step in 0..count {
            let index = (first + step) % count;
            match upstreams.raw_connect(index).await {
                Ok(conn) => {
                    upstream = Some(conn);
                    break;
                }
                Err(cause) => {
                    upstreams.not_reached(index, step + 1 == count, &cause);
                    last = (upstreams.url(index).to_string(), cause);
                }
            }
        }
        let Some(mut upstream) = upstream else {
            return Err(Failure::Answer(ProxyError::Unreachable {
                upstream: last.0,
                cause: last.1,
            }));
        };
        let url = upstreams.url(upstream.server);
        let started = Instant::now();
        let timeout = upstreams.response_timeout();
        let Conn {
            client,
            buf,
            up_buf,
            lines,
            wire,
            answer_due,
            ..
        } = self;
        // The request's head, and as much of its body as was read with it, in one write.
        wire.clear();
        wire.extend_from_slice(request.method.as_str().as_bytes());
        wire.push(b' ');
        wire.extend_from_slice(url.base.as_bytes());
        wire.extend_from_slice(&lines[request.target.clone()]);
        wire.extend_from_slice(b" HTTP/1.1\r\n");
        wire.extend_from_slice(&lines[request.headers.clone()]);
        if !request.has_host {
            put_line(wire, b"Host", url.authority.as_bytes());
        }
        wire.extend_from_slice(b"\r\n");
        let with_head = buf.len().min(request.body as usize);
        wire.extend_from_slice(&buf[..with_head]);
        buf.advance(with_head);
        let broken = |cause: String| {
            Failure::Answer(ProxyError::Broken {
                upstream: url.to_string(),
                cause,
            })
        };
        up_buf.clear();
        let mut cut_short = false;
        let left = request.body - with_head as u64;
        let exchange = async {
            let stream = &mut upstream.stream;
            match send_request(stream, client, buf, wire, left, &broken).await {
                Ok(()) => read_answer_head(stream, up_buf, &broken).await,
                // The server may have answered early (a refusal) and closed before the body's end: its
                // answer, if one came, is the client's; neither connection carries anything more.
                Err(failure @ Failure::Answer(ProxyError::Broken { .. })) => {
                    cut_short = true;
                    read_answer_head(stream, up_buf, &broken)
                        .await
                        .map_err(|_| failure)
                }
                Err(failure) => Err(failure),
            }
        };
        answer_due.set(timeout);
        let head = tokio::select! {
            biased;
            result = exchange => result?,
            () = answer_due.elapsed() => {
                return Err(Failure::Answer(ProxyError::Timeout {
                    upstream: url.to_string(),
                    timeout,
                }))
            }
        };
        upstreams.answered(upstream.server, first);
        metrics
            .upstream_passthrough
            .observe(started.elapsed().as_secs_f64());
        // The client's head: the upstream's, minus hop-by-hop headers, repaired.
        let code = head.status().unwrap_or(0);
        let message = Message::Response {
            status: code,
            to_head: request.method == Method::HEAD,
        };
        let framing = head
            .framing(request.method == Method::HEAD)
            .map_err(|err| broken(format!("{err} in the answer")))?;
        let upstream_close = head.version() != 1
            || connection_tokens(head.fields()).any(|t| t.eq_ignore_ascii_case(b"close"));
        let close = request.close || cut_short || framing == Framing::Close || *stopped.borrow();
        let fix = (request.repair && code == 200)
            .then(|| auth_fix(head.fields()))
            .flatten();
        let named = connection_names(head.fields());
        wire.clear();
        wire.extend_from_slice(b"HTTP/1.1 ");
        let _ = write!(wire, "{code} ");
        wire.extend_from_slice(head.reason());
        wire.extend_from_slice(b"\r\n");
        for (index, (name, value)) in head.fields().enumerate() {
            // The framing fields are written from the decision below, whatever `Connection` names.
            if is_framing_field(name)
                || is_hop_by_hop(name)
                || named.iter().any(|n| n.eq_ignore_ascii_case(name))
            {
                continue;
            }
            let name = if fix == Some(Fix::Rename(index)) {
                powerjob::AUTH_PASSED.as_bytes()
            } else {
                name
            };
            put_line(wire, name, value);
        }
        // The body goes out framed as it came, and its framing fields say so.
        write_framing(wire, message, framing, head.fields());
        if fix.is_some() {
            metrics.auth_headers_repaired.inc();
        }
        if fix == Some(Fix::Add) {
            wire.extend_from_slice(AUTH_LINE);
        }
        if close {
            wire.extend_from_slice(b"Connection: close\r\n");
        }
        wire.extend_from_slice(b"\r\n");
        // The body: what came with the head goes out with it, the rest as it arrives.
        let mut body = Body::new(framing);
        let mut done = body
            .take(up_buf, wire)
            .map_err(|()| broken("invalid chunked body in the answer".into()))?;
        client
            .write_all(wire)
            .await
            .map_err(|_| Failure::ClientGone)?;
        while !done {
            up_buf.clear();
            up_buf.reserve(READ_CHUNK);
            match upstream.stream.read_buf(up_buf).await {
                Ok(0) if framing == Framing::Close => break,
                // Cut short: the client's answer cannot be completed; closing tells it so.
                Ok(0) | Err(_) => {
                    tracing::warn!(upstream = %url, "upstream answer ended before its body's end; closing the client connection");
                    return Ok(false);
                }
                Ok(_) => {}
            }
            wire.clear();
            done = match body.take(up_buf, wire) {
                Ok(done) => done,
                Err(()) => {
                    tracing::warn!(upstream = %url, "invalid chunked body in an upstream answer; closing the client connection");
                    return Ok(false);
                }
            };
            client
                .write_all(wire)
                .await
                .map_err(|_| Failure::ClientGone)?;
        }
        // Reused only when its answer ended exactly where its framing said.
        if framing != Framing::Close && !upstream_close && !cut_short && up_buf.is_empty() {
            upstreams.raw_checkin(upstream);
        }
        Ok(!close)
    }

    /// Writes runonce's answer for `err` (PowerJob-shaped, one log line) and lets the connection close.
    async fn answer_error(&mut self, request: &Request, err: &ProxyError) {
        let target = std::str::from_utf8(&self.lines[request.target.clone()]).unwrap_or("/");
        let path = target.split('?').next().unwrap_or(target);
        let response: Response<bytes::Bytes> = rescue(err, &request.method, path);
        let wire = &mut self.wire;
        wire.clear();
        let status = response.status();
        let _ = write!(
            wire,
            "HTTP/1.1 {} {}\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        );
        for (name, value) in response.headers() {
            put_line(wire, name.as_str().as_bytes(), value.as_bytes());
        }
        let body = response.body();
        let _ = write!(
            wire,
            "Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        if request.method != Method::HEAD {
            wire.extend_from_slice(body);
        }
        if self.client.write_all(wire).await.is_ok() {
            let _ = self.client.shutdown().await;
        }
    }
}

/// Writes the request's head (and the body bytes read with it, all in `wire`), then the `left` body bytes still
/// to come from the client.
async fn send_request(
    stream: &mut TcpStream,
    client: &mut TcpStream,
    buf: &mut BytesMut,
    wire: &[u8],
    mut left: u64,
    broken: &impl Fn(String) -> Failure,
) -> Result<(), Failure> {
    stream
        .write_all(wire)
        .await
        .map_err(|err| broken(format!("write: {err}")))?;
    while left > 0 {
        buf.reserve(READ_CHUNK);
        match client.read_buf(buf).await {
            Ok(0) | Err(_) => {
                return Err(Failure::Answer(ProxyError::ClientBody {
                    cause: format!("the connection ended {left} bytes before the body's end"),
                }))
            }
            Ok(_) => {}
        }
        let take = buf.len().min(left as usize);
        stream
            .write_all(&buf[..take])
            .await
            .map_err(|err| broken(format!("write: {err}")))?;
        buf.advance(take);
        left -= take as u64;
    }
    Ok(())
}

/// Reads the upstream's answer into `up_buf` until a final head is whole; returns the head's length. Interim
/// (1xx) heads are dropped, as hyper's client drops them.
async fn read_answer_head(
    stream: &mut TcpStream,
    up_buf: &mut BytesMut,
    broken: &impl Fn(String) -> Failure,
) -> Result<Head, Failure> {
    let limits = Limits {
        bytes: MAX_ANSWER_HEAD,
        fields: MAX_ANSWER_HEADERS,
    };
    loop {
        if !up_buf.is_empty() {
            match Head::response(up_buf, limits) {
                Ok(Some(head)) => match head.status() {
                    Some(101) => return Err(broken("an unrequested protocol switch (101)".into())),
                    Some(100..=199) => {
                        up_buf.advance(head.len());
                        continue;
                    }
                    _ => {
                        up_buf.advance(head.len());
                        return Ok(head);
                    }
                },
                Ok(None) => {}
                Err(HeadError::TooLarge(limit)) => {
                    return Err(broken(format!("answer head larger than {limit} bytes")))
                }
                Err(err) => return Err(broken(format!("invalid answer head: {err}"))),
            }
        }
        up_buf.reserve(READ_CHUNK);
        match stream.read_buf(up_buf).await {
            Ok(0) => {
                return Err(broken(
                    "connection closed before a complete answer head".into(),
                ))
            }
            Ok(_) => {}
            Err(err) => return Err(broken(format!("read: {err}"))),
        }
    }
}

/// What the lane decides a request head by: the limits hyper's path would apply, and which requests are not the
/// lane's to forward.
struct HeadRules<'a> {
    max_header_bytes: usize,
    max_headers: usize,
    body_limit: u64,
    /// The request's class by method and path ([`Proxy::classify`], the one decision both paths take):
    /// `Some(repair)` for the lane, with whether its answer gets the auth-header repair; `None` for hyper's path
    /// (a guarded route; a noted `/authApp`).
    classify: &'a dyn Fn(&Method, &str) -> Option<bool>,
}

/// Reads a request head at the start of `buf` for the lane: `Ok(Some((len, request)))` with its target and header
/// lines written to `lines` as they go upstream (hop-by-hop fields dropped, `Content-Length` written from the
/// framing, `X-Forwarded-For` and `-Proto` as `headers::add_forwarded` writes them); `Ok(None)` while the head is
/// incomplete; `Err(())` to hand the connection to hyper, which refuses or serves what the lane does not.
/// No socket: the lane calls it on the bytes it has read.
fn request_head(
    buf: &[u8],
    rules: &HeadRules<'_>,
    peer: std::net::IpAddr,
    lines: &mut Vec<u8>,
) -> Result<Option<(usize, Request)>, ()> {
    let limits = Limits {
        bytes: rules.max_header_bytes,
        fields: rules.max_headers,
    };
    // Malformed heads, over the limits: hyper's to refuse.
    let Some(head) = Head::request(buf, limits).map_err(drop)? else {
        return Ok(None);
    };
    let len = head.len();
    if head.version() != 1 {
        return Err(());
    }
    let method = Method::from_bytes(head.method()).map_err(drop)?;
    let target = head.target().ok_or(())?;
    if method == Method::CONNECT || !target.starts_with('/') || !target.bytes().all(is_target_byte)
    {
        return Err(());
    }
    lines.clear();
    lines.extend_from_slice(target.as_bytes());
    let header_start = lines.len();
    let (mut body, mut close, mut has_host, mut has_proto) = (None, false, false, false);
    let mut first_forwarded_for: Option<&[u8]> = None;
    for (name, value) in head.fields() {
        let is = |known: &str| name.eq_ignore_ascii_case(known.as_bytes());
        if is("content-length") {
            if body.is_some() {
                return Err(());
            }
            body = Some(parse_length(value).ok_or(())?);
            // Written from the framing below, never copied.
            continue;
        } else if is("transfer-encoding") || is("expect") || is("upgrade") {
            return Err(());
        } else if is("connection") {
            for token in tokens(value) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if !token.is_empty() && !token.eq_ignore_ascii_case(b"keep-alive") {
                    // It names a header to drop as hop-by-hop: rare enough to leave to hyper's path.
                    return Err(());
                }
            }
            continue;
        } else if is_hop_by_hop(name) {
            continue;
        } else if is("host") {
            if has_host {
                return Err(());
            }
            has_host = true;
        } else if is("x-forwarded-for") {
            // As `headers::add_forwarded`: the first such line only.
            first_forwarded_for.get_or_insert(value);
            continue;
        } else if is("x-forwarded-proto") {
            has_proto = true;
        }
        put_line(lines, name, value);
    }
    let framing = body.map_or(Framing::Empty, Framing::Length);
    write_framing(lines, Message::Request, framing, []);
    let body = body.unwrap_or(0);
    if body > rules.body_limit {
        return Err(());
    }
    // Classified by the path as the server reads it: a guarded route, a noted `/authApp`, go to hyper.
    let path = target.split('?').next().unwrap_or(target);
    let repair = (rules.classify)(&method, path).ok_or(())?;
    // `X-Forwarded-For` by the one rule: earlier hops, then this client.
    lines.extend_from_slice(b"X-Forwarded-For: ");
    forwarded_for(first_forwarded_for, peer, lines);
    lines.extend_from_slice(b"\r\n");
    if !has_proto {
        lines.extend_from_slice(b"X-Forwarded-Proto: http\r\n");
    }
    let request = Request {
        method,
        target: 0..header_start,
        headers: header_start..lines.len(),
        has_host,
        body,
        close,
        repair,
    };
    Ok(Some((len, request)))
}

/// The answer body's progress: how much of it is still to come.
struct Body {
    framing: Framing,
    left: u64,
    chunks: Chunks,
}

impl Body {
    fn new(framing: Framing) -> Body {
        Body {
            framing,
            left: match framing {
                Framing::Length(length) => length,
                _ => 0,
            },
            chunks: Chunks::default(),
        }
    }

    /// Moves the part of `from` that belongs to the body into `to`; `Ok(true)` once the body is complete.
    /// What is left in `from` then came after the body's end. `Err` for a malformed chunked body.
    fn take(&mut self, from: &mut BytesMut, to: &mut Vec<u8>) -> Result<bool, ()> {
        let take = match self.framing {
            Framing::Empty => 0,
            Framing::Length(_) => {
                let take = from.len().min(self.left as usize);
                self.left -= take as u64;
                take
            }
            Framing::Chunked => self
                .chunks
                .feed(from)
                .map_err(|_| ())?
                .unwrap_or(from.len()),
            Framing::Close => from.len(),
        };
        to.extend_from_slice(&from[..take]);
        from.advance(take);
        Ok(match self.framing {
            Framing::Empty => true,
            Framing::Length(_) => self.left == 0,
            Framing::Chunked => self.chunks.done(),
            Framing::Close => false,
        })
    }
}

/// Request-target bytes the lane forwards as they came: RFC 3986's unreserved, sub-delims, `:`, `@`, `/`, `?`
/// and `%`. Anything else (a fragment, spaces, non-ASCII) goes to hyper's path, which parses the URI itself.
fn is_target_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&byte)
}

/// The comma-separated tokens of one header value, trimmed.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|b| *b == b',').map(<[u8]>::trim_ascii)
}

/// The tokens of every `Connection` field of a head.
fn connection_tokens<'h>(
    fields: impl Iterator<Item = (&'h [u8], &'h [u8])>,
) -> impl Iterator<Item = &'h [u8]> {
    fields
        .filter(|(name, _)| name.eq_ignore_ascii_case(b"connection"))
        .flat_map(|(_, value)| tokens(value))
}

/// The fields a `Connection` field names, to drop with it (besides its `close` and `keep-alive`).
fn connection_names<'h>(fields: impl Iterator<Item = (&'h [u8], &'h [u8])>) -> Vec<&'h [u8]> {
    connection_tokens(fields)
        .filter(|t| {
            !t.is_empty()
                && !t.eq_ignore_ascii_case(b"close")
                && !t.eq_ignore_ascii_case(b"keep-alive")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lane's rules at the defaults' limits; `runJob` is a guarded route.
    fn decide(buf: &[u8], lines: &mut Vec<u8>) -> Result<Option<(usize, Request)>, ()> {
        // As `Proxy::classify` with the repair on and `runJob` guarded.
        let classify = |_: &Method, path: &str| match powerjob::served_endpoint(path).as_deref() {
            Some("runJob") => None,
            endpoint => Some(endpoint.is_some()),
        };
        let rules = HeadRules {
            max_header_bytes: 8 * 1024,
            max_headers: 100,
            body_limit: 1024,
            classify: &classify,
        };
        request_head(buf, &rules, [10, 0, 0, 9].into(), lines)
    }

    /// The lane's decision on `head`, checked at every split point: each shorter prefix is incomplete or
    /// already handed off, never taken as a request; the whole head with the next request's bytes after it
    /// is taken the same, up to its own end.
    fn at_every_split(head: &str) -> Result<(Request, String), ()> {
        let bytes = head.as_bytes();
        let mut lines = Vec::new();
        for end in 0..bytes.len() {
            match decide(&bytes[..end], &mut lines) {
                Ok(None) => {}
                Ok(Some(_)) => panic!("taken at {end} of {head:?}"),
                // A hand-off decided early must stay the decision.
                Err(()) => {
                    assert_eq!(decide(bytes, &mut lines).err(), Some(()), "{head:?}");
                    return Err(());
                }
            }
        }
        let whole = decide(bytes, &mut lines);
        let mut pipelined = bytes.to_vec();
        pipelined.extend_from_slice(b"GET /next HTTP/1.1\r\n\r\n");
        let mut next_lines = Vec::new();
        let next = decide(&pipelined, &mut next_lines);
        match (whole, next) {
            (Ok(Some((len, request))), Ok(Some((next_len, _)))) => {
                assert_eq!((len, next_len), (bytes.len(), bytes.len()), "{head:?}");
                assert_eq!(lines, next_lines, "{head:?}");
                Ok((request, String::from_utf8(lines).unwrap()))
            }
            (Err(()), Err(())) => Err(()),
            other => panic!("{head:?}: {:?}", (other.0.is_ok(), other.1.is_ok())),
        }
    }

    #[test]
    fn plain_requests_are_the_lanes_and_go_upstream_as_they_came() {
        let (request, lines) = at_every_split(
            "GET /openApi/fetchInstanceStatus?instanceId=1 HTTP/1.1\r\nHost: pj\r\nX-Case: v\r\n\r\n",
        )
        .expect("the lane's");
        assert_eq!(request.method, Method::GET);
        assert_eq!(
            (request.body, request.close, request.has_host),
            (0, false, true)
        );
        assert!(request.repair, "a PowerJob endpoint");
        assert_eq!(
            lines,
            "/openApi/fetchInstanceStatus?instanceId=1Host: pj\r\nX-Case: v\r\nX-Forwarded-For: 10.0.0.9\r\nX-Forwarded-Proto: http\r\n"
        );
        // A body's length is written from the framing, once; hop-by-hop fields go; earlier hops are kept.
        let (request, lines) = at_every_split(
            "POST /x HTTP/1.1\r\nContent-Length: 5\r\nKeep-Alive: 5\r\nConnection: close\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
        )
        .expect("the lane's");
        assert_eq!(
            (request.body, request.close, request.repair),
            (5, true, false)
        );
        assert_eq!(
            lines,
            "/xContent-Length: 5\r\nX-Forwarded-For: 1.2.3.4, 10.0.0.9\r\nX-Forwarded-Proto: http\r\n"
        );
    }

    /// Every rule that hands a request to hyper's path, at every split point.
    #[test]
    fn what_the_lane_does_not_forward_goes_to_hyper() {
        let long = format!("GET / HTTP/1.1\r\nX-Long: {}\r\n\r\n", "a".repeat(9 * 1024));
        let many: String = (0..101).map(|i| format!("X-{i}: v\r\n")).collect();
        let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
        let cases = [
            "POST /openApi/runJob HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            "POST /pj/openApi/runJob?appId=1 HTTP/1.1\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            "GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nConnection: x-secret\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1025\r\n\r\n",
            "GET / HTTP/1.0\r\n\r\n",
            "CONNECT pj:7700 HTTP/1.1\r\n\r\n",
            "GET http://pj/ HTTP/1.1\r\n\r\n",
            "GET /a#b HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: v\r\n\r\n",
            &long,
            &many,
        ];
        for head in cases {
            assert!(at_every_split(head).is_err(), "{head:?} was taken");
        }
    }

    #[test]
    fn targets_are_read_strictly() {
        assert!("/openApi/runJob?appId=1&x=%20;a=b"
            .bytes()
            .all(is_target_byte));
        for bad in ["/a b", "/a#frag", "/a\"", "/\u{e9}", "/a<b>", "/a\\b"] {
            assert!(!bad.bytes().all(is_target_byte), "{bad}");
        }
    }
}
