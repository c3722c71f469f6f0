//! The upstream connection's bytes, with `X-POWERJOB-AUTH-PASSED` repaired in response heads as they arrive.
//!
//! Why here and not on the parsed response: hyper records the case of the header names it parses in a private
//! extension and writes any name it did not parse in lower case. The 5.1.0 client looks the header up by its
//! exact upper-case name, so a header added to a `HeaderMap` would not be seen. Rewriting the head before hyper
//! parses it (with `preserve_header_case`) makes the repaired name one that hyper parsed: it leaves toward the
//! client exactly as written, and every other name keeps the server's case too.
//!
//! The rule, applied only to a response head that the pool [armed](TapCtl::arm) this tap for (a request to
//! `/openApi/**` with `auth_header = "repair"`):
//! - status 200 and no such header → `X-POWERJOB-AUTH-PASSED: true` is added;
//! - the header in another case with the value `true` → its name is rewritten in exact case (same length, in place);
//! - any other value (`false`) or status, or the exact name already → left as it came: `false` never becomes `true`.
//!
//! Interim (1xx) heads pass untouched; the final head is the one repaired. Heads are read with
//! [`crate::http1::head`]; bodies are never looked at. A head larger than [`MAX_ANSWER_HEAD`] or one that does
//! not parse passes unchanged for hyper to judge.
//!
//! The rule itself is [`super::headers::auth_fix`]; the fast lane ([`super::lane`]) reads answer heads itself and
//! applies it too.
//!
//! The tap can also keep a copy of the final head as it goes to hyper ([`Arm::capture`]): the idempotency
//! engine stores it, so a replayed answer carries the header names in the server's case.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, ReadBuf};

use crate::powerjob::AUTH_PASSED;

use super::headers::{auth_fix, Fix, AUTH_LINE, MAX_ANSWER_HEAD, MAX_ANSWER_HEADERS};
use crate::http1::head::{Head, Limits};

/// What the tap does with the next response head.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Arm {
    /// Apply the auth-header repair.
    pub repair: bool,
    /// Keep a copy of the final head for [`TapCtl::take_head`].
    pub capture: bool,
}

impl Arm {
    fn bits(self) -> u8 {
        u8::from(self.repair) | u8::from(self.capture) << 1
    }

    fn from_bits(bits: u8) -> Arm {
        Arm {
            repair: bits & 1 != 0,
            capture: bits & 2 != 0,
        }
    }
}

/// Shared between the pool, which arms the tap before sending a request, and the connection's IO.
#[derive(Debug, Default)]
pub struct TapCtl {
    /// [`Arm`] bits for the next response head; 0 lets it pass without a look.
    next_head: AtomicU8,
    /// The last captured head. A std `Mutex`: taken for a moment, never across an `.await`.
    captured: Mutex<Option<Bytes>>,
}

impl TapCtl {
    /// Sets what happens to the answer of the request about to be sent.
    pub fn arm(&self, arm: Arm) {
        self.next_head.store(arm.bits(), Ordering::Release);
    }

    /// The final head of the last answer, when the tap was armed to capture it and could read it.
    pub fn take_head(&self) -> Option<Bytes> {
        self.captured
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

/// An IO object (the upstream TCP stream) whose reads pass through the repair.
#[derive(Debug)]
pub struct Tap<T> {
    io: T,
    ctl: Arc<TapCtl>,
    read: ReadState,
}

#[derive(Debug)]
enum ReadState {
    /// Bytes pass straight into hyper's buffer.
    Pass,
    /// Collecting a response head to repair or capture.
    Head(Vec<u8>, Arm),
    /// Handing over collected (and repaired) bytes; `Pass` after them.
    Drain { buf: Vec<u8>, at: usize },
}

impl<T> Tap<T> {
    pub fn new(io: T, ctl: Arc<TapCtl>) -> Self {
        Tap {
            io,
            ctl,
            read: ReadState::Pass,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tap<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            match &mut this.read {
                ReadState::Pass => {
                    let arm = this.ctl.next_head.swap(0, Ordering::AcqRel);
                    if arm == 0 {
                        return Pin::new(&mut this.io).poll_read(cx, out);
                    }
                    this.read = ReadState::Head(Vec::with_capacity(1024), Arm::from_bits(arm));
                }
                ReadState::Drain { buf, at } => {
                    let n = out.remaining().min(buf.len() - *at);
                    out.put_slice(&buf[*at..*at + n]);
                    *at += n;
                    if *at == buf.len() {
                        this.read = ReadState::Pass;
                    }
                    return Poll::Ready(Ok(()));
                }
                ReadState::Head(buf, arm) => {
                    let arm = *arm;
                    let mut chunk = [0u8; 4096];
                    let mut chunk = ReadBuf::new(&mut chunk);
                    ready!(Pin::new(&mut this.io).poll_read(cx, &mut chunk))?;
                    let eof = chunk.filled().is_empty();
                    buf.extend_from_slice(chunk.filled());
                    if let Some((repaired, head)) = repair(buf, eof, arm.repair) {
                        if arm.capture {
                            let head = head.map(|range| Bytes::copy_from_slice(&repaired[range]));
                            *this.ctl.captured.lock().unwrap_or_else(|p| p.into_inner()) = head;
                        }
                        // Empty after end-of-stream: the drain then reports end-of-stream too.
                        this.read = ReadState::Drain {
                            buf: repaired,
                            at: 0,
                        };
                    }
                }
            }
        }
    }
}

/// Repairs (when `fix_auth`) the final head in `buf` once it is complete: `Some((bytes to hand over, where the
/// final head lies in them))`, or `None` to read more. The range is `None` when no final head could be read.
fn repair(
    buf: &mut Vec<u8>,
    eof: bool,
    fix_auth: bool,
) -> Option<(Vec<u8>, Option<std::ops::Range<usize>>)> {
    let limits = Limits {
        bytes: MAX_ANSWER_HEAD,
        fields: MAX_ANSWER_HEADERS,
    };
    let mut start = 0;
    loop {
        match Head::response(&buf[start..], limits) {
            Ok(Some(head)) => {
                let code = head.status().unwrap_or(0);
                let len = head.len();
                if (100..200).contains(&code) {
                    start += len;
                    continue;
                }
                let fix = (fix_auth && code == 200)
                    .then(|| auth_fix(head.fields()))
                    .flatten();
                if fix.is_some() {
                    crate::metrics::get().auth_headers_repaired.inc();
                }
                let grown = if fix == Some(Fix::Add) {
                    AUTH_LINE.len()
                } else {
                    0
                };
                // Where the named field's name lies in `buf`.
                let rename = match fix {
                    Some(Fix::Rename(index)) => {
                        head.name_range(index).map(|name| start + name.start)
                    }
                    _ => None,
                };
                let out = apply(std::mem::take(buf), fix, rename, start + len);
                return Some((out, Some(start..start + len + grown)));
            }
            Ok(None) if !eof => return None,
            // Too large, malformed, or cut short: pass as it came.
            _ => return Some((std::mem::take(buf), None)),
        }
    }
}

/// `buf` with `fix` applied to the head ending at `head_end`; a rename writes the name that starts at `rename`.
fn apply(mut buf: Vec<u8>, fix: Option<Fix>, rename: Option<usize>, head_end: usize) -> Vec<u8> {
    match fix {
        None => buf,
        Some(Fix::Rename(_)) => {
            if let Some(at) = rename {
                buf[at..at + AUTH_PASSED.len()].copy_from_slice(AUTH_PASSED.as_bytes());
            }
            buf
        }
        Some(Fix::Add) => {
            // Insert before the blank line that ends the head (CRLF, or a bare LF that httparse also accepts).
            let at = if buf[..head_end].ends_with(b"\r\n\r\n") {
                head_end - 2
            } else {
                head_end - 1
            };
            let mut out = Vec::with_capacity(buf.len() + AUTH_LINE.len());
            out.extend_from_slice(&buf[..at]);
            out.extend_from_slice(AUTH_LINE);
            out.extend_from_slice(&buf[at..]);
            out
        }
    }
}

write_through!(Tap);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Feeds `wire` through an armed (or unarmed) tap in chunks of `step` bytes and returns what hyper would read.
    async fn through_tap(wire: &[u8], armed: bool, step: usize) -> Vec<u8> {
        through_tap_capturing(
            wire,
            Arm {
                repair: armed,
                capture: false,
            },
            step,
        )
        .await
        .0
    }

    async fn through_tap_capturing(wire: &[u8], arm: Arm, step: usize) -> (Vec<u8>, Option<Bytes>) {
        let (mut server, client) = tokio::io::duplex(64);
        let ctl = Arc::new(TapCtl::default());
        ctl.arm(arm);
        let mut tap = Tap::new(client, Arc::clone(&ctl));
        let wire = wire.to_vec();
        let writer = tokio::spawn(async move {
            for chunk in wire.chunks(step) {
                server.write_all(chunk).await.unwrap();
            }
        });
        let mut out = Vec::new();
        tap.read_to_end(&mut out).await.unwrap();
        writer.await.unwrap();
        (out, ctl.take_head())
    }

    const BODY: &str = "{\"success\":true,\"data\":754612332134400064,\"message\":null}";

    fn response(extra: &str) -> String {
        format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{BODY}", BODY.len())
    }

    #[tokio::test]
    async fn a_missing_header_is_added_in_exact_case_even_across_reads() {
        for step in [1, 7, 4096] {
            let out =
                String::from_utf8(through_tap(response("").as_bytes(), true, step).await).unwrap();
            assert_eq!(
                out,
                response("").replace("\r\n\r\n", "\r\nX-POWERJOB-AUTH-PASSED: true\r\n\r\n"),
                "step {step}"
            );
        }
    }

    #[tokio::test]
    async fn a_lower_cased_true_is_renamed_and_false_is_never_touched() {
        let out = through_tap(
            response("x-powerjob-auth-passed: true\r\n").as_bytes(),
            true,
            5,
        )
        .await;
        assert_eq!(out, response("X-POWERJOB-AUTH-PASSED: true\r\n").as_bytes());
        for kept in [
            "x-powerjob-auth-passed: false\r\n",
            "X-POWERJOB-AUTH-PASSED: false\r\n",
            "X-POWERJOB-AUTH-PASSED: TRUE\r\n",
        ] {
            let out = through_tap(response(kept).as_bytes(), true, 5).await;
            assert_eq!(out, response(kept).as_bytes(), "{kept}");
        }
    }

    #[tokio::test]
    async fn unarmed_non_200_and_garbled_heads_pass_unchanged() {
        assert_eq!(
            through_tap(response("").as_bytes(), false, 3).await,
            response("").as_bytes()
        );
        let not_found = response("").replace("200 OK", "404 Not Found");
        assert_eq!(
            through_tap(not_found.as_bytes(), true, 3).await,
            not_found.as_bytes()
        );
        let garbled = b"HTTP/1.1 2OO OK\r\nX: y\r\n\r\n";
        assert_eq!(through_tap(garbled, true, 3).await, garbled);
        let cut = b"HTTP/1.1 200 OK\r\nContent-";
        assert_eq!(through_tap(cut, true, 3).await, cut);
    }

    #[tokio::test]
    async fn interim_heads_pass_and_the_final_head_is_repaired() {
        let wire = format!("HTTP/1.1 100 Continue\r\n\r\n{}", response(""));
        let out = String::from_utf8(through_tap(wire.as_bytes(), true, 11).await).unwrap();
        assert!(out.starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"));
        assert!(
            out.contains("\r\nX-POWERJOB-AUTH-PASSED: true\r\n\r\n{"),
            "{out}"
        );
    }

    #[tokio::test]
    async fn a_body_that_looks_like_a_head_is_not_touched() {
        let body = "HTTP/1.1 200 OK\r\n\r\n";
        let wire = format!(
            "HTTP/1.1 200 OK\r\nX-POWERJOB-AUTH-PASSED: true\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        assert_eq!(through_tap(wire.as_bytes(), true, 4).await, wire.as_bytes());
    }

    #[tokio::test]
    async fn the_final_head_is_captured_as_handed_over() {
        let wire = format!("HTTP/1.1 100 Continue\r\n\r\n{}", response("X-Case: A\r\n"));
        let (out, head) = through_tap_capturing(
            wire.as_bytes(),
            Arm {
                repair: true,
                capture: true,
            },
            9,
        )
        .await;
        let head = String::from_utf8(head.expect("captured").to_vec()).unwrap();
        assert!(
            head.starts_with("HTTP/1.1 200 OK\r\n")
                && head.ends_with("X-POWERJOB-AUTH-PASSED: true\r\n\r\n"),
            "{head}"
        );
        assert!(String::from_utf8(out).unwrap().contains(&head));
        let (_, head) = through_tap_capturing(
            response("").as_bytes(),
            Arm {
                repair: false,
                capture: true,
            },
            9,
        )
        .await;
        assert!(
            !String::from_utf8(head.unwrap().to_vec())
                .unwrap()
                .contains("AUTH"),
            "capture alone repairs nothing"
        );
    }
}
