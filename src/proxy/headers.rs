//! Header rules on the way through, one place for both paths: hop-by-hop removal, `X-Forwarded-*`, the
//! answer-head limits, the auth-header rule ([`auth_fix`]: what a 200 head needs for the 5.1.0 client), and
//! exact-case response heads.
//!
//! The auth-header rule is applied where the bytes are, not here: on the upstream connection's bytes before
//! hyper parses them (`tap.rs`), because hyper keeps the header-case map private and a name added to a
//! `HeaderMap` afterwards would leave in lower case; and by the fast lane as it writes the head (`lane.rs`).

use std::io::Write as _;
use std::net::IpAddr;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::response;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::powerjob::AUTH_PASSED;

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the legacy ones proxies drop.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// The largest answer head runonce reads, on every path: hyper's client refuses larger ones (its buffer
/// limit, 8 KiB + 100 × 4 KiB), so the lane and the tap stop there too, and the header rules (the auth-header
/// repair among them) hold for every head that gets through.
pub const MAX_ANSWER_HEAD: usize = 400 * 1024;
/// The most headers an answer head may have: hyper's client's limit.
pub const MAX_ANSWER_HEADERS: usize = 100;

/// The header line the auth-header repair adds.
pub const AUTH_LINE: &[u8] = b"X-POWERJOB-AUTH-PASSED: true\r\n";

/// What a 200 head needs.
#[derive(Debug, PartialEq)]
pub enum Fix {
    /// No such header: add one.
    Add,
    /// The header with value true, its name in another case: the field at this index.
    Rename(usize),
}

/// The auth-header rule (the one place it is written; the tap and the lane apply it): what a 200 answer head
/// with these fields (in order) needs for the 5.1.0 client to find `X-POWERJOB-AUTH-PASSED: true`.
pub fn auth_fix<'h>(fields: impl IntoIterator<Item = (&'h [u8], &'h [u8])>) -> Option<Fix> {
    let found = fields
        .into_iter()
        .enumerate()
        .find(|(_, (name, _))| name.eq_ignore_ascii_case(AUTH_PASSED.as_bytes()));
    let Some((index, (name, value))) = found else {
        return Some(Fix::Add);
    };
    if name == AUTH_PASSED.as_bytes() || !value.trim_ascii().eq_ignore_ascii_case(b"true") {
        return None;
    }
    Some(Fix::Rename(index))
}

/// Whether `name` is one of [`HOP_BY_HOP`] (`Connection` included), in any case: for heads read as bytes.
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|hop| name.eq_ignore_ascii_case(hop.as_str().as_bytes()))
}

/// Writes a `Content-Length` that came as a list of one value (`2, 2`, or repeated lines), which hyper read as
/// that value, as the one value: the length a head writer writes from its framing decision
/// (`http1::write::write_framing`), the same on both paths.
pub fn one_length(headers: &mut HeaderMap) {
    let Some(value) = headers.get(header::CONTENT_LENGTH) else {
        return;
    };
    let single = value.as_bytes().iter().all(u8::is_ascii_digit)
        && headers.get_all(header::CONTENT_LENGTH).iter().count() == 1;
    if single {
        return;
    }
    let fields = headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .map(|v| (&b"content-length"[..], v.as_bytes()));
    if let Ok(crate::http1::framing::Framing::Length(length)) =
        crate::http1::framing::framing(crate::http1::framing::Message::Request, fields)
    {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
}

/// Drops hop-by-hop headers, including every header that `Connection` names. `Transfer-Encoding` goes too:
/// hyper frames the message again on the other side.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names the message has, then removals of those present only: cheaper than a hashed
    // removal of each of ours (two calls per forwarded request, 5% of its instructions in callgrind). Most
    // requests carry none of them; most answers carry `Connection: keep-alive` alone.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    let present: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            *name == header::TRANSFER_ENCODING || HOP_BY_HOP.contains(name) || named.contains(name)
        })
        .cloned()
        .collect();
    for name in present {
        headers.remove(name);
    }
}

/// Appends the client's address to `X-Forwarded-For` and sets `X-Forwarded-Proto` when no hop before us did.
pub fn add_forwarded(headers: &mut HeaderMap, client: IpAddr, proto: &'static str) {
    const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
    const XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");
    let mut value = Vec::with_capacity(64);
    forwarded_for(
        headers.get(&XFF).map(HeaderValue::as_bytes),
        client,
        &mut value,
    );
    if let Ok(value) = HeaderValue::from_bytes(&value) {
        headers.insert(XFF, value);
    }
    headers
        .entry(XFP)
        .or_insert(HeaderValue::from_static(proto));
}

/// Writes the `X-Forwarded-For` value runonce sends (the rule for both paths; the lane writes it into its head
/// lines): the earlier hops' value (the first field's, kept when it reads as a header string: visible ASCII and
/// tabs, as `HeaderValue::to_str` decides), then the client's address.
pub fn forwarded_for(earlier: Option<&[u8]>, client: IpAddr, to: &mut Vec<u8>) {
    let readable =
        |v: &&[u8]| !v.is_empty() && v.iter().all(|b| *b == b'\t' || (0x20..0x7f).contains(b));
    if let Some(earlier) = earlier.filter(readable) {
        to.extend_from_slice(earlier);
        to.extend_from_slice(b", ");
    }
    let _ = write!(to, "{client}");
}

/// Parses a rendered HTTP/1.1 response head (status line, headers, blank line) into `Parts` whose header names
/// leave a `preserve_header_case` server connection exactly as written here.
///
/// hyper records the case of names it parses in a private extension; letting its own client parser read the
/// head over an in-memory pipe is the one way to build that record with public API. The body is not read:
/// callers put their own body beside the `Parts`. Costs a few microseconds; meant for heads built once and
/// cloned (`Parts: Clone`), or for rare paths.
pub async fn parse_response_head(head: &[u8]) -> Result<response::Parts, hyper::Error> {
    let (ours, mut theirs) = tokio::io::duplex(head.len() + 256);
    let (mut send, conn) = hyper::client::conn::http1::Builder::new()
        .preserve_header_case(true)
        .handshake::<_, Empty<Bytes>>(TokioIo::new(ours))
        .await?;
    // hyper refuses bytes that arrive before its request went out, so the fake peer answers only after reading
    // it (one short request line, read in one go from the pipe).
    let peer = async move {
        let mut request = [0u8; 256];
        if theirs.read(&mut request).await.is_ok() {
            let _ = theirs.write_all(head).await;
        }
        theirs
    };
    tokio::pin!(conn);
    let response = tokio::select! {
        (response, _peer) = async { tokio::join!(send.send_request(http::Request::new(Empty::new())), peer) } => response?,
        // The connection only ends first when the head could not be parsed.
        Err(err) = &mut conn => return Err(err),
    };
    Ok(response.into_parts().0)
}

/// Renders a response head with the given names in the given case (values as given), then parses it with
/// [`parse_response_head`]. `Content-Length: 0` is implied when no framing header is given.
pub async fn exact_case_head(
    status: http::StatusCode,
    headers: &[(&str, &str)],
) -> Result<response::Parts, hyper::Error> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    for (name, value) in headers {
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    let framed = headers.iter().any(|(n, _)| {
        n.eq_ignore_ascii_case("content-length") || n.eq_ignore_ascii_case("transfer-encoding")
    });
    if !framed {
        head.push_str("Content-Length: 0\r\n");
    }
    head.push_str("\r\n");
    let mut parts = parse_response_head(head.as_bytes()).await?;
    if !framed {
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-powerjob-app-id", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-powerjob-app-id"));
    }

    #[test]
    fn forwarded_for_keeps_readable_earlier_hops_then_the_client() {
        let written = |earlier: Option<&[u8]>| {
            let mut to = Vec::new();
            forwarded_for(earlier, "10.0.0.9".parse().unwrap(), &mut to);
            String::from_utf8(to).unwrap()
        };
        assert_eq!(written(None), "10.0.0.9");
        assert_eq!(
            written(Some(b"1.2.3.4, 5.6.7.8")),
            "1.2.3.4, 5.6.7.8, 10.0.0.9"
        );
        assert_eq!(written(Some(b"")), "10.0.0.9");
        assert_eq!(
            written(Some("caf\u{e9}".as_bytes())),
            "10.0.0.9",
            "not a header string"
        );
    }

    #[test]
    fn the_auth_header_rule() {
        let fix = |fields: &[(&str, &str)]| {
            auth_fix(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
        };
        assert_eq!(fix(&[("Content-Type", "json")]), Some(Fix::Add));
        assert_eq!(
            fix(&[("X-POWERJOB-AUTH-PASSED", "true")]),
            None,
            "as it should be"
        );
        assert_eq!(
            fix(&[("A", "1"), ("x-powerjob-auth-passed", " TRUE ")]),
            Some(Fix::Rename(1))
        );
        assert_eq!(
            fix(&[("x-powerjob-auth-passed", "false")]),
            None,
            "false never becomes true"
        );
    }

    #[test]
    fn a_length_list_of_one_value_is_written_as_that_value() {
        let lengths = |values: &[&'static str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::CONTENT_LENGTH, HeaderValue::from_static(v));
            }
            one_length(&mut h);
            let all = h.get_all(header::CONTENT_LENGTH).iter();
            all.map(|v| v.to_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(lengths(&["2"]), ["2"]);
        assert_eq!(lengths(&["2, 2"]), ["2"]);
        assert_eq!(lengths(&["2", "2"]), ["2"]);
        assert_eq!(
            lengths(&["2", "3"]),
            ["2", "3"],
            "not one value: left for hyper"
        );
        assert!(lengths(&[]).is_empty());
    }

    #[test]
    fn each_hop_by_hop_header_goes_on_its_own() {
        for name in HOP_BY_HOP.into_iter().chain([header::TRANSFER_ENCODING]) {
            let mut h = HeaderMap::new();
            h.insert(name.clone(), HeaderValue::from_static("x"));
            h.insert("x-powerjob-app-id", HeaderValue::from_static("1"));
            remove_hop_by_hop(&mut h);
            assert_eq!(h.len(), 1, "{name} kept: {h:?}");
        }
        let mut h = HeaderMap::new();
        h.insert("x-powerjob-app-id", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "an end-to-end header goes nowhere");
    }

    #[test]
    fn forwarded_for_appends_and_proto_is_kept() {
        let mut h = HeaderMap::new();
        add_forwarded(&mut h, "127.0.0.1".parse().unwrap(), "http");
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        add_forwarded(&mut h, "::1".parse().unwrap(), "http");
        assert_eq!(h["x-forwarded-for"], "127.0.0.1, ::1");
        assert_eq!(h["x-forwarded-proto"], "https");
    }

    #[tokio::test]
    async fn exact_case_head_parses_names_and_values() {
        let parts = exact_case_head(http::StatusCode::OK, &[("X-POWERJOB-AUTH-PASSED", "true")])
            .await
            .unwrap();
        assert_eq!(parts.status, 200);
        assert_eq!(parts.headers["x-powerjob-auth-passed"], "true");
        assert!(parts.headers.get(header::CONTENT_LENGTH).is_none());
    }
}
