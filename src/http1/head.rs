//! A message head as it came: one buffer, header names as sent (the case the 5.1.0 client depends on), every
//! part a range into the buffer. Parsed with `httparse`, the parser hyper uses, under limits of the caller's.

use std::mem::MaybeUninit;
use std::ops::Range;

use bytes::Bytes;

use super::framing::{framing_of, Framing, Invalid, Message};

/// A parsed head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    /// The head's bytes, through the blank line that ends it.
    bytes: Bytes,
    start: Start,
    /// Minor version: `HTTP/1.0` or `HTTP/1.1`.
    version: u8,
    /// Each field's name and value (trimmed), in order.
    fields: Vec<(Range<usize>, Range<usize>)>,
}

/// The start line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Start {
    Request {
        method: Range<usize>,
        target: Range<usize>,
    },
    Response {
        status: u16,
        reason: Range<usize>,
    },
}

/// How large a head may be.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most bytes, through the blank line.
    pub bytes: usize,
    /// Most fields.
    pub fields: usize,
}

/// Why a head cannot be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("malformed head: {0}")]
    Malformed(String),
    #[error("head larger than {0} bytes")]
    TooLarge(usize),
    #[error("more than {0} header fields")]
    TooManyFields(usize),
}

/// Fields parsed at most at once (httparse's slots live on the stack).
const SLOTS: usize = 256;

impl Head {
    /// The request head at the start of `buf`: `Ok(None)` while it is incomplete (and within the limits).
    pub fn request(buf: &[u8], limits: Limits) -> Result<Option<Head>, HeadError> {
        Head::parse(buf, limits, true)
    }

    /// The response head at the start of `buf` (a 1xx too: the caller reads on after it).
    pub fn response(buf: &[u8], limits: Limits) -> Result<Option<Head>, HeadError> {
        Head::parse(buf, limits, false)
    }

    fn parse(buf: &[u8], limits: Limits, request: bool) -> Result<Option<Head>, HeadError> {
        // Uninitialised: a head's few fields are written, not the whole array (8 KiB zeroed per head cost
        // more than the parse).
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; SLOTS];
        let slots = &mut slots[..limits.fields.min(SLOTS)];
        let config = httparse::ParserConfig::default();
        let malformed = |err: httparse::Error| match err {
            httparse::Error::TooManyHeaders => HeadError::TooManyFields(limits.fields),
            other => HeadError::Malformed(other.to_string()),
        };
        // A head is refused past the limit however its bytes arrive: one that completes beyond it too.
        let too_large = |len: usize| len > limits.bytes;
        let partial = || {
            if too_large(buf.len()) {
                Err(HeadError::TooLarge(limits.bytes))
            } else {
                Ok(None)
            }
        };
        let at = |part: &[u8]| offset(buf, part);
        let ranges = |fields: &[httparse::Header<'_>]| -> Vec<(Range<usize>, Range<usize>)> {
            fields
                .iter()
                .map(|field| (at(field.name.as_bytes()), at(field.value.trim_ascii())))
                .collect()
        };
        let (len, start, version, fields) = if request {
            let mut head = httparse::Request::new(&mut []);
            let parsed = config.parse_request_with_uninit_headers(&mut head, buf, slots);
            let httparse::Status::Complete(len) = parsed.map_err(malformed)? else {
                return partial();
            };
            let (Some(method), Some(target)) = (head.method, head.path) else {
                return Err(HeadError::Malformed("no request line".into()));
            };
            let start = Start::Request {
                method: at(method.as_bytes()),
                target: at(target.as_bytes()),
            };
            (len, start, head.version, ranges(head.headers))
        } else {
            let mut head = httparse::Response::new(&mut []);
            let parsed = config.parse_response_with_uninit_headers(&mut head, buf, slots);
            let httparse::Status::Complete(len) = parsed.map_err(malformed)? else {
                return partial();
            };
            let Some(status) = head.code else {
                return Err(HeadError::Malformed("no status line".into()));
            };
            let reason = head.reason.map_or(0..0, |reason| at(reason.as_bytes()));
            let start = Start::Response { status, reason };
            (len, start, head.version, ranges(head.headers))
        };
        if too_large(len) {
            return Err(HeadError::TooLarge(limits.bytes));
        }
        Ok(Some(Head {
            bytes: Bytes::copy_from_slice(&buf[..len]),
            start,
            version: version.unwrap_or(1),
            fields,
        }))
    }

    /// Its length in bytes, through the blank line: where the body starts.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Never: a head has at least its start line.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn start(&self) -> &Start {
        &self.start
    }

    /// The minor version (0 or 1).
    pub fn version(&self) -> u8 {
        self.version
    }

    /// A response's status code.
    pub fn status(&self) -> Option<u16> {
        match self.start {
            Start::Response { status, .. } => Some(status),
            Start::Request { .. } => None,
        }
    }

    /// A response's reason phrase, as sent (empty for a request).
    pub fn reason(&self) -> &[u8] {
        match &self.start {
            Start::Response { reason, .. } => &self.bytes[reason.clone()],
            Start::Request { .. } => b"",
        }
    }

    /// A request's method, as sent (empty for a response).
    pub fn method(&self) -> &[u8] {
        match &self.start {
            Start::Request { method, .. } => &self.bytes[method.clone()],
            Start::Response { .. } => b"",
        }
    }

    /// A request's target, as sent.
    pub fn target(&self) -> Option<&str> {
        match &self.start {
            Start::Request { target, .. } => std::str::from_utf8(&self.bytes[target.clone()]).ok(),
            Start::Response { .. } => None,
        }
    }

    /// The fields, names as sent, values trimmed, in order.
    pub fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> + Clone + '_ {
        self.fields
            .iter()
            .map(|(name, value)| (&self.bytes[name.clone()], &self.bytes[value.clone()]))
    }

    /// Where the name of the field at `index` lies in the head's bytes.
    pub fn name_range(&self, index: usize) -> Option<Range<usize>> {
        self.fields.get(index).map(|(name, _)| name.clone())
    }

    /// The first value of the field named exactly `name` (case and all).
    pub fn exact(&self, name: &str) -> Option<&[u8]> {
        self.fields()
            .find(|(n, _)| *n == name.as_bytes())
            .map(|(_, v)| v)
    }

    /// How its body is delimited (the framing decision).
    pub fn framing(&self, to_head: bool) -> Result<Framing, Invalid> {
        let message = match self.start {
            Start::Request { .. } => Message::Request,
            Start::Response { status, .. } => Message::Response { status, to_head },
        };
        framing_of(message, self.version, self.fields())
    }

    /// The head's bytes without the blank line that ends it (and the line break before it).
    pub fn text(&self) -> &[u8] {
        let mut text = &self.bytes[..];
        for _ in 0..2 {
            text = text.strip_suffix(b"\n").unwrap_or(text);
            text = text.strip_suffix(b"\r").unwrap_or(text);
        }
        text
    }
}

/// Where `part`, a slice of `buf` that httparse handed out, lies in `buf`.
fn offset(buf: &[u8], part: &[u8]) -> Range<usize> {
    let start = (part.as_ptr() as usize).saturating_sub(buf.as_ptr() as usize);
    start..start + part.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        bytes: 1024,
        fields: 8,
    };

    /// `head` read at every split point: incomplete (or refused) before its end, the same head at its end and
    /// with the next message's bytes after it.
    fn at_every_split(bytes: &[u8], request: bool) -> Result<Head, HeadError> {
        let parse = |buf: &[u8]| Head::parse(buf, LIMITS, request);
        for end in 0..bytes.len() {
            match parse(&bytes[..end]) {
                Ok(None) => {}
                Ok(Some(_)) => panic!("complete at {end}"),
                Err(_) => return Err(parse(bytes).expect_err("a refusal stays")),
            }
        }
        let whole = parse(bytes)?.expect("complete at its end");
        let mut more = bytes.to_vec();
        more.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(parse(&more), Ok(Some(whole.clone())));
        assert_eq!(whole.len(), bytes.len());
        Ok(whole)
    }

    #[test]
    fn names_keep_their_case_and_values_are_trimmed() {
        let head = at_every_split(
            b"HTTP/1.1 200 OK\r\nX-POWERJOB-AUTH-PASSED:  true \r\nx-powerjob-auth-passed: false\r\nContent-Length: 2\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!(head.status(), Some(200));
        assert_eq!(head.version(), 1);
        assert_eq!(head.exact("X-POWERJOB-AUTH-PASSED"), Some(&b"true"[..]));
        assert_eq!(head.exact("x-powerjob-auth-passed"), Some(&b"false"[..]));
        assert_eq!(head.exact("X-Powerjob-Auth-Passed"), None);
        assert_eq!(head.framing(false), Ok(Framing::Length(2)));
        assert_eq!(head.framing(true), Ok(Framing::Empty));
        assert!(head.text().ends_with(b"Content-Length: 2"));
        let request = at_every_split(
            b"POST /openApi/runJob?appId=1 HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            true,
        )
        .unwrap();
        assert_eq!(request.target(), Some("/openApi/runJob?appId=1"));
        assert_eq!(request.version(), 0);
        // RFC 9112 §6.1: an HTTP/1.0 message with a coding has faulty framing.
        assert_eq!(request.framing(false), Err(Invalid::Http10Coding));
        let Start::Request { method, .. } = request.start() else {
            panic!("a request")
        };
        assert_eq!(&request.bytes[method.clone()], b"POST");
    }

    #[test]
    fn limits_and_bad_heads_are_refused_however_the_bytes_arrive() {
        let long = format!("HTTP/1.1 200 OK\r\nX: {}\r\n\r\n", "a".repeat(1024));
        assert_eq!(
            at_every_split(long.as_bytes(), false),
            Err(HeadError::TooLarge(1024))
        );
        let many: String = (0..9).map(|i| format!("X-{i}: v\r\n")).collect();
        let many = format!("HTTP/1.1 200 OK\r\n{many}\r\n");
        assert_eq!(
            at_every_split(many.as_bytes(), false),
            Err(HeadError::TooManyFields(8))
        );
        for bad in [
            &b"HTTP/1.1 2000 OK\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nBad Name: v\r\n\r\n",
            b"HTTP/2 200 OK\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                matches!(at_every_split(bad, false), Err(HeadError::Malformed(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            at_every_split(b"HTTP/1.1 200 OK\r\n\r\n", true),
            Err(HeadError::Malformed(_))
        ));
    }
}
