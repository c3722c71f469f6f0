//! The fast lane (`src/proxy/lane.rs`): plain pass-through requests forwarded by runonce's own HTTP/1.1 code.
//! Each behaviour is checked with the lane on (the default) and off (`--fast-lane false`, hyper's path), so the
//! two paths are held to the same bytes; plus the hand-off to hyper in the middle of a connection.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const LANES: [&str; 2] = ["true", "false"];

/// An answer whose body names the request's path, so order and routing can be read off it.
fn echo_path(request: &[u8]) -> Vec<u8> {
    let line = String::from_utf8_lossy(request);
    let path = line.split(' ').nth(1).unwrap_or("?").to_string();
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{path}",
        path.len()
    )
    .into_bytes()
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n")
}

#[tokio::test]
async fn keep_alive_and_pipelined_requests_are_answered_in_order_on_one_upstream_connection() {
    for lane in LANES {
        let upstream = RawUpstream::start(|request| Script::Answer(echo_path(request))).await;
        let proxy = proxy(&[upstream.url()], &["--workers", "1", "--fast-lane", lane]);
        let mut client = TcpStream::connect(proxy.addr("proxy")).await.unwrap();
        for i in 0..3 {
            client
                .write_all(get(&format!("/a/{i}")).as_bytes())
                .await
                .unwrap();
            let response = read_response(&mut client).await.unwrap();
            assert_eq!(response.text(), format!("/a/{i}"), "lane {lane}");
        }
        // Two requests in one write: both answered, in order.
        let both = format!("{}{}", get("/b/1"), get("/b/2"));
        client.write_all(both.as_bytes()).await.unwrap();
        // rawhttp drops bytes past one message, so the answers are read from one buffer here.
        let mut wire = Vec::new();
        let deadline = tokio::time::Instant::now() + STEP;
        while String::from_utf8_lossy(&wire).matches("/b/").count() < 2 {
            let mut chunk = [0u8; 4096];
            let read = tokio::time::timeout_at(
                deadline,
                tokio::io::AsyncReadExt::read(&mut client, &mut chunk),
            )
            .await
            .expect("pipelined answers in time")
            .unwrap();
            assert!(
                read > 0,
                "lane {lane}: closed early: {}",
                String::from_utf8_lossy(&wire)
            );
            wire.extend_from_slice(&chunk[..read]);
        }
        let wire = String::from_utf8_lossy(&wire).into_owned();
        let (first, second) = (wire.find("/b/1").unwrap(), wire.find("/b/2").unwrap());
        assert!(first < second, "lane {lane}: out of order: {wire}");
        assert_eq!(upstream.count(), 5, "lane {lane}");
        if lane == "true" {
            // The lane gives its upstream connection back in the connection's own task, before it reads the next
            // request; hyper's path gives it back from a task of its own, which the next request can overtake
            // (it then opens a second connection).
            assert_eq!(
                upstream.connections(),
                1,
                "one upstream connection, kept alive"
            );
        }
    }
}

#[tokio::test]
async fn requests_go_upstream_with_the_clients_header_case_and_body() {
    for lane in LANES {
        let upstream = RawUpstream::start(|_| Script::Answer(ok_answer(""))).await;
        let proxy = proxy(&[upstream.url()], &["--fast-lane", lane]);
        let mut client = TcpStream::connect(proxy.addr("proxy")).await.unwrap();
        // The head in two writes, the body in a third: the lane reads on until the head is whole.
        let body = "appId=1&instanceId=754612332134400064";
        let head = format!(
            "POST /openApi/fetchInstanceStatus?x=%41 HTTP/1.1\r\nHost: test\r\nX-POWERJOB-APP-ID: 1\r\nX-Forwarded-For: 10.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let (a, b) = head.split_at(30);
        client.write_all(a.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        client.write_all(b.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        client.write_all(body.as_bytes()).await.unwrap();
        let response = read_response(&mut client).await.unwrap();
        assert_eq!(response.status, 200, "lane {lane}");
        assert_eq!(
            response.exact("X-POWERJOB-AUTH-PASSED"),
            Some("true"),
            "lane {lane}"
        );
        let seen = upstream.request(0);
        assert!(
            seen.starts_with("POST /openApi/fetchInstanceStatus?x=%41 HTTP/1.1\r\n"),
            "lane {lane}: {seen}"
        );
        for line in [
            "X-POWERJOB-APP-ID: 1",
            "Host: test",
            "Content-Type: application/x-www-form-urlencoded",
        ] {
            assert!(
                seen.contains(&format!("\r\n{line}\r\n")),
                "lane {lane}: {line:?} in {seen}"
            );
        }
        let lower = seen.to_ascii_lowercase();
        assert!(
            lower.contains("x-forwarded-for: 10.0.0.1, 127.0.0.1\r\n"),
            "lane {lane}: {seen}"
        );
        assert!(
            seen.ends_with(&format!("\r\n\r\n{body}")),
            "lane {lane}: {seen}"
        );
    }
}

#[tokio::test]
async fn chunked_and_close_delimited_answers_reach_the_client_whole() {
    for lane in LANES {
        let upstream = RawUpstream::start(|request| {
            let request = String::from_utf8_lossy(request);
            if request.starts_with("GET /chunked") {
                // An extension, two chunks, a trailer; Content-Length beside chunked must not reach the client.
                Script::Answer(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n"
                        .to_vec(),
                )
            } else if request.starts_with("GET /close") {
                Script::Close(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end".to_vec())
            } else {
                Script::Answer(echo_path(request.as_bytes()))
            }
        })
        .await;
        let proxy = proxy(&[upstream.url()], &["--fast-lane", lane]);
        let mut client = TcpStream::connect(proxy.addr("proxy")).await.unwrap();
        client.write_all(get("/chunked").as_bytes()).await.unwrap();
        let response = read_response(&mut client).await.unwrap();
        assert_eq!(response.text(), "hello world", "lane {lane}");
        assert!(
            !response
                .head
                .to_ascii_lowercase()
                .contains("content-length"),
            "lane {lane}: {}",
            response.head
        );
        // The chunked answer ended where it should: the connection carries the next request.
        client.write_all(get("/next").as_bytes()).await.unwrap();
        assert_eq!(
            read_response(&mut client).await.unwrap().text(),
            "/next",
            "lane {lane}"
        );

        let mut client = TcpStream::connect(proxy.addr("proxy")).await.unwrap();
        client.write_all(get("/close").as_bytes()).await.unwrap();
        let response = read_response(&mut client).await.unwrap();
        assert_eq!(response.text(), "until the end", "lane {lane}");
    }
}

#[tokio::test]
async fn upstream_failures_are_answered_in_powerjob_shape_and_never_sent_twice() {
    for lane in LANES {
        // Nothing listens on the first address: the request goes to the second, once.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let nowhere = url(closed.local_addr().unwrap());
        drop(closed);
        let upstream = RawUpstream::start(|request| {
            if request.starts_with(b"GET /slow") {
                Script::Slow(Duration::from_secs(3), ok_answer(""))
            } else if request.starts_with(b"GET /hangup") {
                Script::Hangup
            } else {
                Script::Answer(echo_path(request))
            }
        })
        .await;
        let proxy = proxy(
            &[nowhere, upstream.url()],
            &["--fast-lane", lane, "--upstream-timeout", "300ms"],
        );
        let addr = proxy.addr("proxy");
        let response = raw(addr, get("/fine").as_bytes()).await.unwrap();
        assert_eq!(response.text(), "/fine", "lane {lane}");

        let response = raw(addr, get("/slow").as_bytes()).await.unwrap();
        assert_eq!(response.status, 504, "lane {lane}");
        assert_eq!(response.json().unwrap()["code"], "RUNONCE_UPSTREAM_TIMEOUT");
        let response = raw(addr, get("/hangup").as_bytes()).await.unwrap();
        assert_eq!(response.status, 502, "lane {lane}");
        assert_eq!(response.json().unwrap()["code"], "RUNONCE_UPSTREAM_BROKEN");
        assert_eq!(response.json().unwrap()["success"], false);
        assert_eq!(
            upstream.count(),
            3,
            "lane {lane}: each request reached the server once"
        );
    }
}

/// A request the lane does not take (here a chunked body, then a guarded `runJob`) is served by hyper's path
/// on the same connection, with the bytes the lane had read; the requests before it were the lane's.
#[tokio::test]
async fn a_request_the_lane_does_not_take_is_served_by_hyper_on_the_same_connection() {
    let upstream = RawUpstream::start(|request| {
        if request.starts_with(b"POST /openApi/runJob") {
            Script::Answer(ok_answer(""))
        } else {
            Script::Answer(echo_path(request))
        }
    })
    .await;
    let proxy = proxy(&[upstream.url()], &[]);
    let mut client = TcpStream::connect(proxy.addr("proxy")).await.unwrap();
    client.write_all(get("/plain").as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut client).await.unwrap().text(), "/plain");
    // A chunked request body: not the lane's.
    let chunked = "POST /chunked-body HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
    client.write_all(chunked.as_bytes()).await.unwrap();
    assert_eq!(
        read_response(&mut client).await.unwrap().text(),
        "/chunked-body"
    );
    let seen = upstream.request(1);
    assert!(seen.ends_with("\r\n\r\n3\r\nabc\r\n0\r\n\r\n"), "{seen}");
    // hyper serves the rest of the connection.
    client.write_all(get("/after").as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut client).await.unwrap().text(), "/after");
    // A guarded call with an Idempotency-Key, twice: one upstream call, one replay.
    let run = |key: &str| {
        form_post(
            "/openApi/runJob",
            "appId=1&jobId=7&instanceParams=p&delay=0",
            &format!("Idempotency-Key: {key}\r\nX-POWERJOB-APP-ID: 1\r\n"),
        )
    };
    let first = {
        let request = run("lane-handoff");
        // form_post asks to close: send it on this connection, as its last request.
        client.write_all(&request).await.unwrap();
        read_response(&mut client).await.unwrap()
    };
    assert_eq!(first.status, 200, "{}", first.text());
    let second = raw(proxy.addr("proxy"), &run("lane-handoff"))
        .await
        .unwrap();
    assert_eq!(second.status, 200);
    assert_eq!(
        second.exact("Idempotent-Replayed"),
        Some("true"),
        "{}",
        second.head
    );
    let run_jobs = (0..upstream.count())
        .filter(|&i| upstream.request(i).starts_with("POST /openApi/runJob"))
        .count();
    assert_eq!(run_jobs, 1, "the guarded call reached the upstream once");
}

/// A client that stops in the middle of a head is closed after `header_read_timeout`, as hyper closes it.
#[tokio::test]
async fn a_head_that_stops_halfway_is_closed_after_the_head_timeout() {
    let upstream = RawUpstream::start(|_| Script::Answer(ok_answer(""))).await;
    let proxy = proxy(&[upstream.url()], &["--header-read-timeout", "300ms"]);
    let mut client = TcpStream::connect(proxy.addr("proxy")).await.unwrap();
    client
        .write_all(b"GET /openApi/fetchJob HTTP/1.1\r\nHost: t")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(
        STEP,
        tokio::io::AsyncReadExt::read_to_end(&mut client, &mut rest),
    )
    .await;
    assert!(read.is_ok(), "the connection was closed");
    assert_eq!(upstream.count(), 0);
}

/// The head and answer time limits start anew with each request on a kept-alive connection: requests that
/// each keep within them pass, however long the connection has lived, and the first one over a limit fails.
#[tokio::test]
async fn time_limits_start_anew_with_each_request_on_a_connection() {
    for lane in LANES {
        let upstream = RawUpstream::start(|request| {
            if request.starts_with(b"GET /too-slow") {
                Script::Slow(Duration::from_secs(2), echo_path(request))
            } else {
                Script::Slow(Duration::from_millis(150), echo_path(request))
            }
        })
        .await;
        let limits = [
            "--fast-lane",
            lane,
            "--upstream-timeout",
            "400ms",
            "--header-read-timeout",
            "400ms",
        ];
        let proxy = proxy(&[upstream.url()], &limits);
        let mut client = TcpStream::connect(proxy.addr("proxy")).await.unwrap();
        // Four answers of 150 ms and three pauses of 250 ms: about 1.4 s, well past either limit from the start.
        for i in 0..4 {
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            let path = format!("/ok-{i}");
            client.write_all(get(&path).as_bytes()).await.unwrap();
            let response = read_response(&mut client).await.unwrap();
            assert_eq!(response.text(), path, "lane {lane}");
        }
        client.write_all(get("/too-slow").as_bytes()).await.unwrap();
        let response = read_response(&mut client).await.unwrap();
        assert_eq!(response.status, 504, "lane {lane}");
        assert_eq!(upstream.count(), 5, "lane {lane}: each request went once");
    }
}

/// `upstream_max_idle = 0` keeps no upstream connection: each request opens its own, and nothing fails.
#[tokio::test]
async fn with_no_idle_upstream_connections_allowed_each_request_opens_one() {
    let upstream = RawUpstream::start(|request| Script::Answer(echo_path(request))).await;
    let proxy = proxy(&[upstream.url()], &["--upstream-max-idle", "0"]);
    let mut client = TcpStream::connect(proxy.addr("proxy")).await.unwrap();
    for i in 0..3 {
        client
            .write_all(get(&format!("/n/{i}")).as_bytes())
            .await
            .unwrap();
        assert_eq!(
            read_response(&mut client).await.unwrap().text(),
            format!("/n/{i}")
        );
    }
    assert_eq!(upstream.connections(), 3);
}

/// An upstream's `Connection` header may name `Content-Length` or `Transfer-Encoding`: the message still needs
/// its framing. Both paths frame the body the client receives, and the kept-alive connection carries the next
/// answer as an answer, not as more body.
#[tokio::test]
async fn framing_headers_named_in_connection_still_frame_the_answer() {
    for lane in LANES {
        let upstream = RawUpstream::start(|request| {
            let request = String::from_utf8_lossy(request);
            if request.starts_with("GET /named-length") {
                Script::Answer(
                    b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 5\r\n\r\nhello"
                        .to_vec(),
                )
            } else if request.starts_with("GET /named-chunked") {
                Script::Answer(
                    b"HTTP/1.1 200 OK\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                        .to_vec(),
                )
            } else {
                Script::Answer(echo_path(request.as_bytes()))
            }
        })
        .await;
        let proxy = proxy(&[upstream.url()], &["--fast-lane", lane]);
        for path in ["/named-length", "/named-chunked"] {
            let mut client = TcpStream::connect(proxy.addr("proxy")).await.unwrap();
            client.write_all(get(path).as_bytes()).await.unwrap();
            let response = tokio::time::timeout(STEP, read_response(&mut client))
                .await
                .unwrap_or_else(|_| panic!("lane {lane} {path}: the answer has no end"))
                .unwrap();
            assert_eq!(response.text(), "hello", "lane {lane} {path}");
            client.write_all(get("/next").as_bytes()).await.unwrap();
            let next = tokio::time::timeout(STEP, read_response(&mut client))
                .await
                .unwrap_or_else(|_| panic!("lane {lane} {path}: no next answer"))
                .unwrap();
            assert_eq!(next.text(), "/next", "lane {lane} {path}");
        }
    }
}

/// The auth-header repair is one rule on both paths, whatever the size of the answer's head: a 70 KB head
/// (beyond the tap's old 64 KiB, within hyper's own limit) is repaired on the lane and on hyper's path alike.
#[tokio::test]
async fn a_large_answer_head_is_repaired_on_both_paths() {
    use tokio::io::AsyncReadExt;
    for lane in LANES {
        let upstream = RawUpstream::start(|_| {
            let pad = "p".repeat(70 * 1024);
            let body = r#"{"success":true,"data":1,"message":null}"#;
            Script::Answer(
                format!(
                    "HTTP/1.1 200 OK\r\nX-Pad: {pad}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .into_bytes(),
            )
        })
        .await;
        let proxy = proxy(&[upstream.url()], &["--fast-lane", lane]);
        let mut client = TcpStream::connect(proxy.addr("proxy")).await.unwrap();
        let request = "GET /openApi/fetchInstanceStatus?instanceId=1 HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n";
        client.write_all(request.as_bytes()).await.unwrap();
        // rawhttp refuses heads over 64 KiB: read the whole answer as bytes.
        let mut answer = Vec::new();
        tokio::time::timeout(STEP, client.read_to_end(&mut answer))
            .await
            .expect("the answer in time")
            .unwrap();
        let text = String::from_utf8_lossy(&answer);
        let head = &text[..text.find("\r\n\r\n").expect("a whole head")];
        assert!(
            head.starts_with("HTTP/1.1 200"),
            "lane {lane}: {}",
            &head[..40]
        );
        assert!(
            head.contains("\r\nX-POWERJOB-AUTH-PASSED: true"),
            "lane {lane}: the head has no repaired auth header"
        );
    }
}

/// What a client reads of an answer, for comparing the paths: the status line's code, the header names and
/// values but `date` and `connection` (hyper's server adds a date; the connection's fate is each path's own),
/// lower-cased and sorted, and the body.
async fn seen_by_client(
    proxy: std::net::SocketAddr,
    request: &str,
) -> (String, Vec<String>, String) {
    use tokio::io::AsyncReadExt;
    let mut client = TcpStream::connect(proxy).await.unwrap();
    client.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(STEP, client.read_to_end(&mut answer))
        .await
        .expect("the answer, then the close")
        .unwrap();
    let text = String::from_utf8_lossy(&answer).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    // A chunked body is compared decoded: the lane forwards the upstream's chunks as they came, hyper's path
    // chunks anew; the client reads the same data.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut data = Vec::new();
        runonce::http1::chunked::Chunks::default()
            .decode(body.as_bytes(), &mut data)
            .expect("a valid chunked body");
        String::from_utf8_lossy(&data).to_string()
    } else {
        body.to_string()
    };
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap_or("")
        .split(' ')
        .nth(1)
        .unwrap_or("")
        .to_string();
    let mut headers: Vec<String> = lines
        .map(|l| l.to_ascii_lowercase())
        .filter(|l| !l.starts_with("date:") && !l.starts_with("connection:"))
        .collect();
    headers.sort();
    (status, headers, body)
}

/// Odd but legal upstream answers reach the client the same way on the lane and on hyper's path: one table.
#[tokio::test]
async fn odd_answers_read_the_same_on_both_paths() {
    let cases: &[(&str, &str, &[u8])] = &[
        (
            "a 304 with a length and no body",
            "GET /odd HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\nETag: \"x\"\r\n\r\n",
        ),
        (
            "a 204",
            "GET /odd HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
        ),
        (
            "an interim 103 before the answer",
            "GET /odd HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        ),
        (
            "a chunked answer with an extension",
            "GET /odd HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;e=1\r\nok\r\n0\r\n\r\n",
        ),
        (
            "an answer to HEAD with the length of what GET would send",
            "HEAD /odd HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nContent-Type: text/plain\r\n\r\n",
        ),
        (
            "an HTTP/1.0 answer delimited by the close",
            "GET /odd HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end",
        ),
        (
            "a Content-Length list of one value",
            "GET /odd HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok",
        ),
    ];
    let mut differ = Vec::new();
    for (what, request, answer) in cases {
        let answer = answer.to_vec();
        // An answer with no length runs until the upstream closes.
        let close = !String::from_utf8_lossy(&answer).contains("Content-Length")
            && !String::from_utf8_lossy(&answer).contains("chunked")
            && answer.starts_with(b"HTTP/1.0");
        let upstream = RawUpstream::start(move |_| {
            if close {
                Script::Close(answer.clone())
            } else {
                Script::Answer(answer.clone())
            }
        })
        .await;
        let mut seen = Vec::new();
        for lane in LANES {
            let proxy = proxy(&[upstream.url()], &["--fast-lane", lane]);
            seen.push(seen_by_client(proxy.addr("proxy"), request).await);
        }
        if seen[0] != seen[1] {
            differ.push(format!("{what}: lane {:?}, hyper {:?}", seen[0], seen[1]));
        }
    }
    assert!(differ.is_empty(), "{differ:#?}");
}

/// An HTTP/1.0 answer with a `Transfer-Encoding` has faulty framing (RFC 9112 §6.1): hyper's path refuses it
/// (502), and so does the lane, which read it as chunked before (found by `tests/http1_differential.rs`).
#[tokio::test]
async fn a_transfer_coding_in_an_http_1_0_answer_is_refused_on_both_paths() {
    let answer =
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n".to_vec();
    let upstream = RawUpstream::start(move |_| Script::Answer(answer.clone())).await;
    for lane in LANES {
        let proxy = proxy(&[upstream.url()], &["--fast-lane", lane]);
        let request = "GET /odd HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
        let (status, _, body) = seen_by_client(proxy.addr("proxy"), request).await;
        assert_eq!(status, "502", "fast lane {lane}: {body}");
    }
}
