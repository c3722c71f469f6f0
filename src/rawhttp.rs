//! A minimal HTTP/1.1 client that sees response header names exactly as they came over the wire.
//!
//! The duplicate `runJob` this project guards against hinges on the *case* of a response header name: the
//! PowerJob 5.1.0 client finds `X-POWERJOB-AUTH-PASSED` but not `x-powerjob-auth-passed`. hyper normalises
//! header names to lower case and hides the original spelling, so whatever must tell the two apart speaks
//! HTTP/1.1 itself: the 5.1.0 client emulation ([`crate::sim::client`]), `runonce demo` (through
//! [`crate::sim::mock::fetch_stats`]), the mock's unit tests and the integration tests, whose scripted
//! upstreams also read requests with [`read_request`]. Heads are parsed with `httparse`, which hands out names
//! as sent.
//!
//! It is **not** used on the proxy's request path (hyper's, and the fast lane's own code in `proxy/lane.rs`).
//!
//! Scope: plain HTTP, one message per call; bytes read past the end of a message are dropped, so it does not
//! support pipelining. Interim 1xx responses are skipped; bodies are delimited by Content-Length, chunked
//! transfer coding (trailers dropped) or the end of the connection. Bounded by a 64 KiB head (every head,
//! interim ones included, however its bytes arrive), 128 header fields and a 16 MiB body. Every failure is an
//! [`io::Error`] (`InvalidData` for malformed or oversized input, `UnexpectedEof` for an early close, `TimedOut`
//! for the deadline of [`exchange`]); bad input never panics.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, ToSocketAddrs};

use crate::http1::chunked::Chunks;
use crate::http1::framing::Framing;
use crate::http1::head::{Head, HeadError, Limits};

/// Largest body we accept.
const MAX_BODY: usize = 16 * 1024 * 1024;
/// Largest head (start line plus headers) we accept.
const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in one head.
const MAX_HEADERS: usize = 128;
/// Most interim (1xx) responses skipped before the final one.
const MAX_INTERIM: usize = 8;

/// A final response; header names keep the case they had on the wire.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    /// The head exactly as received (lossy UTF-8), without the blank line that ends it.
    pub head: String,
    /// Header fields in order, names as received, values trimmed.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The value of the first header named exactly `name` (case-sensitive).
    pub fn exact(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// The header lines as they came, without the status line.
    pub fn header_lines(&self) -> Vec<&str> {
        self.head.lines().skip(1).collect()
    }

    /// The body parsed as JSON; the error shows the start of the body.
    pub fn json(&self) -> io::Result<serde_json::Value> {
        serde_json::from_slice(&self.body).map_err(|error| {
            let shown: String = self.text().chars().take(1024).collect();
            invalid(format!("body is not JSON ({error}): {shown:?}"))
        })
    }

    /// The body as text, invalid UTF-8 replaced.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A request as [`read_request`] read it; header names keep the case they had on the wire.
#[derive(Clone, Debug)]
pub struct Request {
    /// The request target from the request line, e.g. `/openApi/runJob`.
    pub target: String,
    /// Header fields in order, names as received, values trimmed.
    pub headers: Vec<(String, String)>,
    /// The body, chunked coding removed.
    pub body: Vec<u8>,
    /// Every byte of the request exactly as it came: head, body and any chunked framing.
    pub raw: Vec<u8>,
}

/// Connects to `addr`, writes `request` as given and reads one response, all within `timeout`.
pub async fn exchange(
    addr: impl ToSocketAddrs,
    request: &[u8],
    timeout: Duration,
) -> io::Result<Response> {
    let call = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|error| context("connect", error))?;
        // Best effort: only latency is at stake.
        let _ = stream.set_nodelay(true);
        stream
            .write_all(request)
            .await
            .map_err(|error| context("write", error))?;
        read_response(&mut stream).await
    };
    tokio::time::timeout(timeout, call).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("timeout after {timeout:?}"),
        )
    })?
}

/// Reads the final response from `stream`: skips interim 1xx heads, then reads the body by its framing.
pub async fn read_response(stream: &mut TcpStream) -> io::Result<Response> {
    let mut reader = Reader::new(stream, false);
    for _ in 0..MAX_INTERIM {
        let Some(head) = reader.read_head(false).await? else {
            return Err(closed("connection closed before a complete response head"));
        };
        let status = head
            .status()
            .ok_or_else(|| invalid("response without status"))?;
        if (100..200).contains(&status) && status != 101 {
            continue;
        }
        let body = reader.read_body(body_framing(&head)?).await?;
        return Ok(Response {
            status,
            head: String::from_utf8_lossy(head.text()).into_owned(),
            headers: fields(&head),
            body,
        });
    }
    Err(invalid("too many interim responses"))
}

/// Reads one request (head and body, by Content-Length or chunked); `None` if the peer closed before sending a
/// byte.
pub async fn read_request(stream: &mut TcpStream) -> io::Result<Option<Request>> {
    let mut reader = Reader::new(stream, true);
    let Some(head) = reader.read_head(true).await? else {
        return Ok(None);
    };
    let body = reader.read_body(body_framing(&head)?).await?;
    Ok(Some(Request {
        target: head.target().unwrap_or_default().to_string(),
        headers: fields(&head),
        body,
        raw: reader.buf[..reader.pos].to_vec(),
    }))
}

/// The fields of `head` as strings: names as sent, values trimmed (invalid UTF-8 replaced).
fn fields(head: &Head) -> Vec<(String, String)> {
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    head.fields().map(|(n, v)| (text(n), text(v))).collect()
}

/// The framing of `head`'s body (the one decision, [`crate::http1::framing`]), within the body cap.
fn body_framing(head: &Head) -> io::Result<Framing> {
    match head
        .framing(false)
        .map_err(|err| invalid(err.to_string()))?
    {
        Framing::Length(length) if length > MAX_BODY as u64 => {
            Err(invalid(format!("body of {length} bytes exceeds the cap")))
        }
        framing => Ok(framing),
    }
}

/// A buffered reader over the connection with bounded reads.
struct Reader<'a> {
    stream: &'a mut TcpStream,
    buf: Vec<u8>,
    /// Start of the unread bytes in `buf`.
    pos: usize,
    /// Keep consumed bytes, so that `buf[..pos]` is everything read so far (for [`read_request`]).
    keep: bool,
}

impl<'a> Reader<'a> {
    fn new(stream: &'a mut TcpStream, keep: bool) -> Self {
        Reader {
            stream,
            buf: Vec::with_capacity(8 * 1024),
            pos: 0,
            keep,
        }
    }

    fn unread(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Reads more bytes from the socket; returns how many (0 at end of stream).
    async fn fill(&mut self) -> io::Result<usize> {
        // Drop consumed bytes so the buffer stays proportional to what is still unread.
        if self.pos > 0 && !self.keep {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let mut chunk = [0u8; 8 * 1024];
        let read = self
            .stream
            .read(&mut chunk)
            .await
            .map_err(|error| context("read", error))?;
        self.buf.extend_from_slice(&chunk[..read]);
        Ok(read)
    }

    /// Reads and parses one head (of a request if `request`); `None` if the peer closed before sending a byte.
    ///
    /// A head longer than `MAX_HEAD` is refused however its bytes arrive: the check covers a head that completes
    /// in the read that crosses the cap, not only one still incomplete beyond it.
    async fn read_head(&mut self, request: bool) -> io::Result<Option<Head>> {
        let kind = head_kind(request);
        let limits = Limits {
            bytes: MAX_HEAD,
            fields: MAX_HEADERS,
        };
        loop {
            let parsed = if request {
                Head::request(self.unread(), limits)
            } else {
                Head::response(self.unread(), limits)
            };
            match parsed {
                Ok(Some(head)) => {
                    self.pos += head.len();
                    return Ok(Some(head));
                }
                Ok(None) => {}
                Err(HeadError::TooLarge(_)) => {
                    return Err(invalid(format!("{kind} head too large")))
                }
                Err(err) => return Err(invalid(format!("{kind} head: {err}"))),
            }
            if self.fill().await? == 0 {
                if self.unread().is_empty() {
                    return Ok(None);
                }
                return Err(closed(&format!(
                    "connection closed before a complete {kind} head"
                )));
            }
        }
    }

    async fn read_body(&mut self, framing: Framing) -> io::Result<Vec<u8>> {
        match framing {
            Framing::Empty => Ok(Vec::new()),
            // Within the cap (`body_framing`), so within `usize`.
            Framing::Length(length) => self.read_exact(length as usize).await,
            Framing::Chunked => self.read_chunked().await,
            Framing::Close => self.read_to_close().await,
        }
    }

    /// Reads exactly `length` bytes (the caller has checked `length` against the cap).
    async fn read_exact(&mut self, length: usize) -> io::Result<Vec<u8>> {
        while self.unread().len() < length {
            if self.fill().await? == 0 {
                return Err(closed("connection closed before the end of the body"));
            }
        }
        let bytes = self.unread()[..length].to_vec();
        self.pos += length;
        Ok(bytes)
    }

    /// Reads everything until the peer closes, within the body cap.
    async fn read_to_close(&mut self) -> io::Result<Vec<u8>> {
        loop {
            let read = self.fill().await?;
            if self.unread().len() > MAX_BODY {
                return Err(invalid("body exceeds the cap"));
            }
            if read == 0 {
                let bytes = self.unread().to_vec();
                self.pos = self.buf.len();
                return Ok(bytes);
            }
        }
    }

    /// Decodes a chunked body with the one decoder ([`crate::http1::chunked`]): strict, trailers dropped,
    /// within the body cap.
    async fn read_chunked(&mut self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        let mut chunks = Chunks::default();
        loop {
            let ended = chunks
                .decode(&self.buf[self.pos..], &mut body)
                .map_err(|err| invalid(err.to_string()))?;
            match ended {
                Some(end) => {
                    self.pos += end;
                    return Ok(body);
                }
                None => self.pos = self.buf.len(),
            }
            if body.len() as u64 + chunks.announced() > MAX_BODY as u64 {
                return Err(invalid("chunked body exceeds the cap"));
            }
            if self.fill().await? == 0 {
                return Err(closed("connection closed inside a chunked body"));
            }
        }
    }
}

fn head_kind(request: bool) -> &'static str {
    if request {
        "request"
    } else {
        "response"
    }
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

fn closed(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, message)
}

/// `error` with what was being done in front of its message.
fn context(what: &str, error: io::Error) -> io::Error {
    io::Error::new(error.kind(), format!("{what}: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tokio::net::TcpListener;

    /// Upper bound for any single exchange.
    const LIMIT: Duration = Duration::from_secs(10);
    const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n";

    /// A server for one connection: reads one request, writes `answer`, closes.
    async fn answering(answer: Vec<u8>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let _ = read_request(&mut stream).await;
            let _ = stream.write_all(&answer).await;
            let _ = stream.shutdown().await;
        });
        addr
    }

    async fn answer(bytes: &[u8]) -> io::Result<Response> {
        exchange(answering(bytes.to_vec()).await, GET, LIMIT).await
    }

    #[tokio::test]
    async fn head_and_header_names_are_kept_as_sent() {
        let response = answer(b"HTTP/1.1 200 OK\r\nX-POWERJOB-AUTH-PASSED: true\r\nx-powerjob-auth-passed: false\r\nContent-Length: 2\r\n\r\n{}extra").await.unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(
            response.head,
            "HTTP/1.1 200 OK\r\nX-POWERJOB-AUTH-PASSED: true\r\nx-powerjob-auth-passed: false\r\nContent-Length: 2"
        );
        assert_eq!(response.exact("X-POWERJOB-AUTH-PASSED"), Some("true"));
        assert_eq!(response.exact("x-powerjob-auth-passed"), Some("false"));
        assert_eq!(response.exact("X-Powerjob-Auth-Passed"), None);
        assert_eq!(response.header_lines().len(), 3);
        assert_eq!(response.json().unwrap(), serde_json::json!({}));
        assert_eq!(response.text(), "{}");
    }

    #[tokio::test]
    async fn chunked_bodies_decode() {
        let response = answer(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\nB\r\n, world! :)\r\n0\r\nX-Trailer: x\r\n\r\n",
        )
        .await
        .unwrap();
        assert_eq!(response.text(), "hello, world! :)");
    }

    #[tokio::test]
    async fn interim_response_and_body_until_close_are_handled() {
        let response = answer(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{\"a\":1}",
        )
        .await
        .unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.json().unwrap()["a"], 1);
    }

    /// A head of exactly `length` bytes (blank line included) with one large `X-Big` field.
    fn head_of(length: usize) -> String {
        let frame = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Big: \r\n\r\n".len();
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Big: {}\r\n\r\n",
            "a".repeat(length - frame)
        )
    }

    #[tokio::test]
    async fn heads_are_capped_however_they_arrive() {
        // At the cap: accepted.
        let response = answer(head_of(MAX_HEAD).as_bytes()).await.unwrap();
        assert_eq!(response.head.len() + 4, MAX_HEAD);
        assert!(response.exact("X-Big").is_some());
        // One byte over, whether the head completes in the read that crosses the cap or long after it.
        for length in [MAX_HEAD + 1, MAX_HEAD + 27, 4 * MAX_HEAD] {
            let error = answer(head_of(length).as_bytes()).await.unwrap_err();
            assert_eq!(
                error.kind(),
                io::ErrorKind::InvalidData,
                "{length}: {error}"
            );
            assert_eq!(error.to_string(), "response head too large");
        }
        // An oversized interim head is refused too.
        let interim = format!(
            "HTTP/1.1 100 Continue\r\nX-Big: {}\r\n\r\n",
            "a".repeat(MAX_HEAD)
        );
        let error = answer(interim.as_bytes()).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn caps_and_bad_input_are_errors() {
        use io::ErrorKind::{InvalidData, UnexpectedEof};
        let fields: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        let many_fields = format!("HTTP/1.1 200 OK\r\n{fields}\r\n");
        let cases: [(&[u8], io::ErrorKind); 9] = [
            (many_fields.as_bytes(), InvalidData),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 16777217\r\n\r\n",
                InvalidData,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
                InvalidData,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1000001\r\n",
                InvalidData,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
                InvalidData,
            ),
            (b"\x00garbage\r\n\r\n", InvalidData),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
                UnexpectedEof,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
                UnexpectedEof,
            ),
            (b"HTTP/1.1 200 OK\r\n", UnexpectedEof),
        ];
        for (case, kind) in cases {
            let error = answer(case).await.unwrap_err();
            assert_eq!(
                error.kind(),
                kind,
                "{:?}: {error}",
                String::from_utf8_lossy(case)
            );
        }
        let error = answer(b"").await.unwrap_err();
        assert_eq!(error.kind(), UnexpectedEof);
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let error = exchange(silent.local_addr().unwrap(), GET, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(error.to_string(), "timeout after 50ms");
    }

    #[tokio::test]
    async fn requests_are_read_whole_and_raw() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests: [&[u8]; 3] = [
            b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            b"GET /c HTTP/1.1\r\nHost: t\r\n\r\n",
        ];
        let client = tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            for request in requests {
                stream.write_all(request).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut read = Vec::new();
        for request in requests {
            let got = read_request(&mut stream).await.unwrap().unwrap();
            assert_eq!(got.raw, request);
            read.push(got);
        }
        assert_eq!(read[0].target, "/a");
        assert_eq!(read[0].body, b"abc");
        assert_eq!(read[1].body, b"abc", "chunked coding removed");
        assert_eq!(read[2].headers, [("Host".to_owned(), "t".to_owned())]);
        client.await.unwrap();
        assert!(read_request(&mut stream).await.unwrap().is_none());
    }

    /// The decision is `http1::framing`'s (its table); this reader adds its body cap.
    #[test]
    fn framing_is_http1s_within_the_cap() {
        let framing = |status: Option<u16>, pairs: &[(&str, &str)]| {
            let start = status.map_or("GET / HTTP/1.1".to_string(), |s| format!("HTTP/1.1 {s} X"));
            let fields: String = pairs.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
            let bytes = format!("{start}\r\n{fields}\r\n");
            let limits = Limits {
                bytes: MAX_HEAD,
                fields: MAX_HEADERS,
            };
            let head = match status {
                Some(_) => Head::response(bytes.as_bytes(), limits),
                None => Head::request(bytes.as_bytes(), limits),
            };
            body_framing(&head.unwrap().unwrap()).ok()
        };
        assert_eq!(framing(Some(204), &[]), Some(Framing::Empty));
        assert_eq!(
            framing(Some(200), &[("content-length", "5")]),
            Some(Framing::Length(5))
        );
        assert!(framing(Some(200), &[("Content-Length", "99999999999")]).is_none());
        assert_eq!(framing(Some(200), &[]), Some(Framing::Close));
        assert!(framing(None, &[("Transfer-Encoding", "gzip")]).is_none());
    }
}
