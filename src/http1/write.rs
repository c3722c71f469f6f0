//! Writing a head for the next hop: header lines, and the framing fields written from the framing decision
//! ([`super::framing`]), never copied from the message. A copied `Content-Length` beside a chunked body, or a
//! framing field dropped because `Connection` named it, leaves the next hop reading the body one way while it
//! is sent another: on a kept-alive connection the next message is then read as this one's body (the desync
//! class). Written from the decision, the framing fields always say how the body goes out.

use std::io::Write as _;

use super::framing::{Framing, Message};

/// Appends the header line `name: value`.
pub fn put_line(to: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    to.extend_from_slice(name);
    to.extend_from_slice(b": ");
    to.extend_from_slice(value);
    to.extend_from_slice(b"\r\n");
}

/// Whether `name` is a framing field (`Content-Length`, `Transfer-Encoding`): a head writer leaves such lines
/// out of the fields it copies and writes them with [`write_framing`].
pub fn is_framing_field(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"content-length") || name.eq_ignore_ascii_case(b"transfer-encoding")
}

/// Appends the framing fields of `message`, whose body is forwarded as it came with `framing` (the decision
/// [`super::framing::framing`] made from `fields`, the message's own):
/// - `Length(n)`: `Content-Length: n` (one value, however it came: repeated, or as a list);
/// - `Chunked`, and `Close` with transfer codings: `Transfer-Encoding` with the codings as they came, in order
///   (a `gzip, chunked` body stays gzipped); never a `Content-Length`;
/// - `Empty`: nothing, except for the answer to a `HEAD` request, which announces the length (or the codings)
///   the `GET` would have had; a 1xx, 204 or 304 goes without either.
pub fn write_framing<'h, I>(to: &mut Vec<u8>, message: Message, framing: Framing, fields: I)
where
    I: IntoIterator<Item = (&'h [u8], &'h [u8])>,
{
    match framing {
        Framing::Length(length) => {
            let _ = write!(to, "Content-Length: {length}\r\n");
        }
        Framing::Chunked | Framing::Close => {
            write_codings(to, fields);
        }
        Framing::Empty => {
            let Message::Response {
                status,
                to_head: true,
            } = message
            else {
                return;
            };
            if (100..200).contains(&status) || status == 204 || status == 304 {
                return;
            }
            // What the `GET` would have had: the same decision, as if the body came.
            let fields: Vec<_> = fields.into_iter().collect();
            let as_get = Message::Response {
                status,
                to_head: false,
            };
            let announced = super::framing::framing(as_get, fields.iter().copied());
            match announced {
                Ok(Framing::Length(length)) => {
                    let _ = write!(to, "Content-Length: {length}\r\n");
                }
                Ok(Framing::Chunked | Framing::Close) => write_codings(to, fields),
                Ok(Framing::Empty) | Err(_) => {}
            }
        }
    }
}

/// `Transfer-Encoding` with every coding of `fields`, in order, when there is one.
fn write_codings<'h>(to: &mut Vec<u8>, fields: impl IntoIterator<Item = (&'h [u8], &'h [u8])>) {
    let mut written = false;
    for (name, value) in fields {
        if !name.eq_ignore_ascii_case(b"transfer-encoding") {
            continue;
        }
        for coding in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
            if coding.is_empty() {
                continue;
            }
            to.extend_from_slice(if written {
                b", "
            } else {
                &b"Transfer-Encoding: "[..]
            });
            to.extend_from_slice(coding);
            written = true;
        }
    }
    if written {
        to.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::super::framing::framing;
    use super::*;

    /// The framing lines written for a message with `fields`, decided as the forwarders decide.
    fn written(message: Message, fields: &[(&str, &str)]) -> String {
        let fields = || fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes()));
        let decided = framing(message, fields()).expect("valid framing");
        let mut to = Vec::new();
        write_framing(&mut to, message, decided, fields());
        String::from_utf8(to).unwrap()
    }

    fn status(status: u16) -> Message {
        Message::Response {
            status,
            to_head: false,
        }
    }

    const TO_HEAD: Message = Message::Response {
        status: 200,
        to_head: true,
    };

    /// A message, its fields, and the framing lines written for it.
    type Case = (
        Message,
        &'static [(&'static str, &'static str)],
        &'static str,
    );

    /// Every framing decision, written: one description of the body, the one it is sent with.
    #[test]
    fn the_framing_fields_say_how_the_body_goes_out() {
        let cases: &[Case] = &[
            (
                status(200),
                &[("content-length", "5")],
                "Content-Length: 5\r\n",
            ),
            (
                status(200),
                &[("Content-Length", "5, 5")],
                "Content-Length: 5\r\n",
            ),
            (
                status(200),
                &[("Content-Length", "5"), ("Content-Length", "5")],
                "Content-Length: 5\r\n",
            ),
            // A length beside chunked framing is never written: the desync.
            (
                status(200),
                &[("Transfer-Encoding", "chunked"), ("Content-Length", "5")],
                "Transfer-Encoding: chunked\r\n",
            ),
            (
                status(200),
                &[
                    ("Transfer-Encoding", "gzip"),
                    ("transfer-encoding", "chunked"),
                ],
                "Transfer-Encoding: gzip, chunked\r\n",
            ),
            (
                status(200),
                &[("Transfer-Encoding", " gzip ,, chunked")],
                "Transfer-Encoding: gzip, chunked\r\n",
            ),
            // Until the close: the codings stay, no length.
            (
                status(200),
                &[("Transfer-Encoding", "gzip"), ("Content-Length", "5")],
                "Transfer-Encoding: gzip\r\n",
            ),
            (status(200), &[], ""),
            (status(204), &[("Content-Length", "0")], ""),
            (status(304), &[("Content-Length", "9")], ""),
            (status(103), &[], ""),
            (TO_HEAD, &[("Content-Length", "9")], "Content-Length: 9\r\n"),
            (
                TO_HEAD,
                &[("Transfer-Encoding", "chunked")],
                "Transfer-Encoding: chunked\r\n",
            ),
            (TO_HEAD, &[], ""),
            (
                Message::Response {
                    status: 304,
                    to_head: true,
                },
                &[("Content-Length", "9")],
                "",
            ),
            (
                Message::Request,
                &[("Content-Length", "0")],
                "Content-Length: 0\r\n",
            ),
            (Message::Request, &[], ""),
            (
                Message::Request,
                &[("Transfer-Encoding", "chunked")],
                "Transfer-Encoding: chunked\r\n",
            ),
        ];
        for (message, fields, expected) in cases {
            assert_eq!(
                written(*message, fields),
                *expected,
                "{message:?} {fields:?}"
            );
        }
    }

    #[test]
    fn framing_fields_are_told_apart_from_the_rest() {
        for name in ["Content-Length", "content-length", "TRANSFER-ENCODING"] {
            assert!(is_framing_field(name.as_bytes()), "{name}");
        }
        for name in ["Connection", "Content-Type", "Transfer", "TE"] {
            assert!(!is_framing_field(name.as_bytes()), "{name}");
        }
        let mut line = Vec::new();
        put_line(&mut line, b"X-Case", b"v");
        assert_eq!(line, b"X-Case: v\r\n");
    }
}
