//! How a message's body is delimited: RFC 9112 §6.3, decided once for requests and responses.

/// Where a body ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body: a request without framing headers, a response to `HEAD`, a 1xx, 204 or 304.
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// Chunked (the last transfer coding applied).
    Chunked,
    /// A response that runs until the connection closes.
    Close,
}

/// The message whose body is framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message {
    Request,
    /// A response with `status`, `to_head` when it answers a `HEAD` request.
    Response {
        status: u16,
        to_head: bool,
    },
}

/// Framing headers a message must not be read with (RFC 9112 §6.3: a server answers 400, a client closes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// A `Content-Length` that is not a decimal number of at most 19 digits, or values that disagree.
    #[error("invalid or conflicting Content-Length")]
    Length,
    /// A request whose `Transfer-Encoding` does not end in `chunked`: its length cannot be known.
    #[error("a request Transfer-Encoding that does not end in chunked")]
    RequestCoding,
    /// An HTTP/1.0 message with a `Transfer-Encoding` (RFC 9112 §6.1: its framing is faulty, whatever else it
    /// says; hyper refuses it too).
    #[error("a Transfer-Encoding in an HTTP/1.0 message")]
    Http10Coding,
}

/// [`framing`] for a message of HTTP/1.`minor`: the decision for HTTP/1.1, and an HTTP/1.0 message with a
/// `Transfer-Encoding` refused (a response without a body still has none: its framing is never read).
pub fn framing_of<'h, I>(message: Message, minor: u8, headers: I) -> Result<Framing, Invalid>
where
    I: IntoIterator<Item = (&'h [u8], &'h [u8])> + Clone,
{
    let decided = framing(message, headers.clone())?;
    let coded = || {
        headers
            .into_iter()
            .any(|(name, _)| name.eq_ignore_ascii_case(b"transfer-encoding"))
    };
    if minor == 0 && decided != Framing::Empty && coded() {
        return Err(Invalid::Http10Coding);
    }
    Ok(decided)
}

/// The framing of `message`, whose header fields are `(name, value)`. `Transfer-Encoding` wins over
/// `Content-Length`, which is then ignored (and must not be forwarded); identical `Content-Length` values,
/// repeated or in a list, count as one.
pub fn framing<'h>(
    message: Message,
    headers: impl IntoIterator<Item = (&'h [u8], &'h [u8])>,
) -> Result<Framing, Invalid> {
    if let Message::Response { status, to_head } = message {
        if to_head || (100..200).contains(&status) || status == 204 || status == 304 {
            return Ok(Framing::Empty);
        }
    }
    let mut last_coding: Option<&[u8]> = None;
    let mut length: Option<Result<u64, Invalid>> = None;
    for (name, value) in headers {
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if let Some(coding) = value
                .split(|b| *b == b',')
                .map(<[u8]>::trim_ascii)
                .rfind(|coding| !coding.is_empty())
            {
                last_coding = Some(coding);
            }
        } else if name.eq_ignore_ascii_case(b"content-length") {
            for item in value.split(|b| *b == b',') {
                let parsed = parse_length(item.trim_ascii()).ok_or(Invalid::Length);
                length = Some(match (length, parsed) {
                    (None, parsed) => parsed,
                    (Some(Ok(seen)), Ok(value)) if seen == value => Ok(seen),
                    _ => Err(Invalid::Length),
                });
            }
        }
    }
    match (last_coding, message) {
        (Some(coding), _) if coding.eq_ignore_ascii_case(b"chunked") => Ok(Framing::Chunked),
        (Some(_), Message::Request) => Err(Invalid::RequestCoding),
        (Some(_), Message::Response { .. }) => Ok(Framing::Close),
        (None, _) => match (length, message) {
            (Some(length), _) => length.map(Framing::Length),
            (None, Message::Request) => Ok(Framing::Empty),
            (None, Message::Response { .. }) => Ok(Framing::Close),
        },
    }
}

/// A `Content-Length` value: decimal digits only (no sign, no spaces), at most 19 of them (within `i64`).
pub fn parse_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: Message = Message::Response {
        status: 200,
        to_head: false,
    };

    fn of(message: Message, headers: &[(&str, &str)]) -> Result<Framing, Invalid> {
        framing(
            message,
            headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())),
        )
    }

    /// One table for requests and responses.
    #[test]
    fn framing_follows_rfc_9112() {
        let status = |status| Message::Response {
            status,
            to_head: false,
        };
        let head = Message::Response {
            status: 200,
            to_head: true,
        };
        type Case = (
            Message,
            &'static [(&'static str, &'static str)],
            Result<Framing, Invalid>,
        );
        let cases: &[Case] = &[
            (head, &[("Content-Length", "9")], Ok(Framing::Empty)),
            (status(204), &[], Ok(Framing::Empty)),
            (status(304), &[("Content-Length", "9")], Ok(Framing::Empty)),
            (status(101), &[], Ok(Framing::Empty)),
            (OK, &[("Content-Length", "9")], Ok(Framing::Length(9))),
            (OK, &[("content-length", "0")], Ok(Framing::Length(0))),
            (
                OK,
                &[("Content-Length", "9"), ("content-length", "9")],
                Ok(Framing::Length(9)),
            ),
            (OK, &[("Content-Length", "9, 9")], Ok(Framing::Length(9))),
            (
                OK,
                &[("Content-Length", "9"), ("Content-Length", "8")],
                Err(Invalid::Length),
            ),
            (OK, &[("Content-Length", "9, 8")], Err(Invalid::Length)),
            (OK, &[("Content-Length", "+9")], Err(Invalid::Length)),
            (OK, &[("Content-Length", "x")], Err(Invalid::Length)),
            (OK, &[("Content-Length", "")], Err(Invalid::Length)),
            (
                OK,
                &[("Content-Length", "18446744073709551615")],
                Err(Invalid::Length),
            ),
            (
                OK,
                &[
                    ("Transfer-Encoding", "gzip, Chunked"),
                    ("Content-Length", "9"),
                ],
                Ok(Framing::Chunked),
            ),
            (
                OK,
                &[
                    ("Transfer-Encoding", "gzip"),
                    ("Transfer-Encoding", "chunked"),
                ],
                Ok(Framing::Chunked),
            ),
            (
                OK,
                &[("Transfer-Encoding", "chunked, gzip")],
                Ok(Framing::Close),
            ),
            (
                OK,
                &[("Transfer-Encoding", "chunked"), ("Content-Length", "x")],
                Ok(Framing::Chunked),
            ),
            (OK, &[], Ok(Framing::Close)),
            (Message::Request, &[], Ok(Framing::Empty)),
            (
                Message::Request,
                &[("Content-Length", "5")],
                Ok(Framing::Length(5)),
            ),
            (
                Message::Request,
                &[("Transfer-Encoding", "chunked")],
                Ok(Framing::Chunked),
            ),
            (
                Message::Request,
                &[("Transfer-Encoding", "gzip")],
                Err(Invalid::RequestCoding),
            ),
        ];
        for (message, headers, expected) in cases {
            assert_eq!(of(*message, headers), *expected, "{message:?} {headers:?}");
        }
    }

    #[test]
    fn an_http_1_0_message_with_a_coding_is_refused() {
        let fields = [(&b"Transfer-Encoding"[..], &b"chunked"[..])];
        assert_eq!(framing_of(OK, 0, fields), Err(Invalid::Http10Coding));
        assert_eq!(framing_of(OK, 1, fields), Ok(Framing::Chunked));
        let length = [(&b"Content-Length"[..], &b"2"[..])];
        assert_eq!(framing_of(OK, 0, length), Ok(Framing::Length(2)));
        let no_body = Message::Response {
            status: 204,
            to_head: false,
        };
        assert_eq!(framing_of(no_body, 0, fields), Ok(Framing::Empty));
    }

    #[test]
    fn lengths_are_read_strictly() {
        assert_eq!(parse_length(b"0"), Some(0));
        assert_eq!(parse_length(b"18446744073709551615"), None, "20 digits");
        assert_eq!(parse_length(b"9223372036854775807"), Some(i64::MAX as u64));
        for bad in [&b""[..], b"-1", b"+1", b"1 2", b"0x10", b"1,1"] {
            assert_eq!(parse_length(bad), None, "{bad:?}");
        }
    }
}
