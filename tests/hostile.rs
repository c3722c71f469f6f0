//! Hostile input through the real binary: malformed and truncated HTTP, oversized and unreadable bodies on a
//! guarded route, header injection, slow clients and thousands of idle connections.
//!
//! Each case has a defined answer: a 4xx with a PowerJob-shaped body (runonce's own), a bare 400/431 (hyper's,
//! for bytes that are not HTTP), or a closed connection; nothing malformed reaches the upstream, and the proxy
//! still serves afterwards. Garbled heads and oversized heads already have tests in `robustness.rs`, oversized
//! bodies on pass-through routes in `passthrough.rs`.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const RUN_JOB: &str = "/openApi/runJob";

/// How one exchange ended.
#[derive(Debug)]
enum Ending {
    Answered(RawResponse),
    /// The connection closed (or was reset) without an answer.
    Closed,
}

/// Writes `bytes`, half-closes when `finish`, then reads one answer or the close, within [`STEP`].
async fn send(addr: SocketAddr, bytes: &[u8], finish: bool) -> Ending {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    // A write may fail when the proxy already answered and closed: the answer is still there to read.
    let _ = stream.write_all(bytes).await;
    if finish {
        let _ = stream.shutdown().await;
    }
    match read_response(&mut stream).await {
        Ok(response) => Ending::Answered(response),
        Err(err) if err.kind() == std::io::ErrorKind::TimedOut => {
            panic!("no answer and no close within {STEP:?}")
        }
        Err(_) => Ending::Closed,
    }
}

/// Asserts runonce's own refusal: `status`, a PowerJob-shaped body with `code`.
fn assert_refused(ending: &Ending, status: u16, code: &str) {
    let Ending::Answered(response) = ending else {
        panic!("expected {status} {code}, the connection closed");
    };
    assert_eq!(response.status, status, "{}", response.text());
    let json = response.json().expect("a JSON body");
    assert_eq!(json["success"], false, "{json}");
    assert_eq!(json["data"], serde_json::Value::Null, "{json}");
    assert_eq!(json["code"], code, "{json}");
    assert!(json["message"].as_str().unwrap().starts_with("runonce: "));
}

fn post(path: &str, content_type: Option<&str>, body: &[u8]) -> Vec<u8> {
    let content_type = content_type
        .map(|c| format!("Content-Type: {c}\r\n"))
        .unwrap_or_default();
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\n{content_type}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

async fn still_serves(addr: SocketAddr) {
    let fine = raw(addr, &form_post(RUN_JOB, "jobId=1&appId=1", ""))
        .await
        .expect("a normal request");
    assert_eq!(fine.status, 200, "the proxy still serves: {}", fine.text());
}

async fn upstream() -> RawUpstream {
    RawUpstream::start(|_| Script::Answer(ok_answer(""))).await
}

#[tokio::test]
async fn malformed_http_gets_400_or_a_close_and_never_reaches_the_upstream() {
    let upstream = upstream().await;
    let proxy = proxy(&[upstream.url()], &[]);
    let addr = proxy.addr("proxy");
    let cases: [(&str, &[u8]); 8] = [
        ("no version", b"POST /openApi/runJob\r\nHost: t\r\n\r\n"),
        ("HTTP/9.9", b"POST /openApi/runJob HTTP/9.9\r\nHost: t\r\n\r\n"),
        ("space in a header name", b"POST /openApi/runJob HTTP/1.1\r\nHost: t\r\nX Bad: 1\r\n\r\n"),
        ("a bare CR in a value", b"POST /openApi/runJob HTTP/1.1\r\nHost: t\r\nX-A: a\rInjected: b\r\n\r\n"),
        ("NUL in a value", b"POST /openApi/runJob HTTP/1.1\r\nHost: t\r\nX-A: a\x00b\r\n\r\n"),
        ("two Content-Lengths that differ",
         b"POST /openApi/runJob HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"),
        ("a chunk size that is not hex",
         b"POST /openApi/runJob HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\njobId=1\r\n0\r\n\r\n"),
        ("a negative Content-Length", b"POST /openApi/runJob HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n"),
    ];
    let mut figures = Vec::new();
    for (what, bytes) in cases {
        let ending = send(addr, bytes, true).await;
        let shown = match &ending {
            Ending::Answered(r) => {
                assert!(
                    (400..500).contains(&r.status),
                    "{what}: {} {}",
                    r.status,
                    r.text()
                );
                r.status.to_string()
            }
            Ending::Closed => "closed".to_string(),
        };
        figures.push(format!("{what}: {shown}"));
    }
    eprintln!("malformed HTTP answers: {figures:#?}");
    assert_eq!(upstream.count(), 0, "nothing malformed was forwarded");
    still_serves(addr).await;
}

#[tokio::test]
async fn content_length_beside_chunked_is_dropped_before_forwarding() {
    // The smuggling shape: the upstream must not see both framings (RFC 9112 §6.3: chunked wins, the
    // Content-Length goes).
    let upstream = upstream().await;
    let proxy = proxy(&[upstream.url()], &[]);
    let request = b"POST /openApi/fetchInstanceStatus HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nc\r\ninstanceId=1\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n";
    let Ending::Answered(answer) = send(proxy.addr("proxy"), request, false).await else {
        panic!("closed");
    };
    assert_eq!(answer.status, 200);
    assert_eq!(
        upstream.count(),
        1,
        "one request forwarded, nothing smuggled"
    );
    let forwarded = upstream.request(0).to_ascii_lowercase();
    assert!(!forwarded.contains("content-length: 4"), "{forwarded}");
    assert!(!forwarded.contains("smuggled"), "{forwarded}");
}

#[tokio::test]
async fn truncated_requests_are_not_forwarded() {
    let upstream = upstream().await;
    let proxy = proxy(&[upstream.url()], &[]);
    let addr = proxy.addr("proxy");
    // A head cut short, then the client half-closes: nothing to answer.
    let ending = send(
        addr,
        b"POST /openApi/runJob HTTP/1.1\r\nHost: t\r\nContent-Le",
        true,
    )
    .await;
    assert!(matches!(ending, Ending::Closed), "{ending:?}");
    // A guarded call whose body stops short of its Content-Length: runonce's 400.
    let mut short = form_post(RUN_JOB, "jobId=1&appId=1", "");
    short.truncate(short.len() - 4);
    let ending = send(addr, &short, true).await;
    assert_refused(&ending, 400, "RUNONCE_BAD_REQUEST_BODY");
    // A chunked body that ends without its last chunk.
    let chunked = b"POST /openApi/runJob HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n7\r\njobId=1\r\n";
    let ending = send(addr, chunked, true).await;
    assert_refused(&ending, 400, "RUNONCE_BAD_REQUEST_BODY");
    assert_eq!(
        upstream.count(),
        0,
        "no part of a truncated call was forwarded"
    );
    still_serves(addr).await;
}

#[tokio::test]
async fn a_guarded_body_over_the_limit_gets_413_declared_or_chunked() {
    let upstream = upstream().await;
    let proxy = proxy(&[upstream.url()], &["--body-limit", "64KiB"]);
    let addr = proxy.addr("proxy");
    let big = format!("jobId=1&appId=1&instanceParams={}", "x".repeat(70 * 1024));
    let ending = send(addr, &form_post(RUN_JOB, &big, ""), false).await;
    assert_refused(&ending, 413, "RUNONCE_BODY_TOO_LARGE");
    let mut chunked = b"POST /openApi/runJob HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for _ in 0..20 {
        chunked.extend_from_slice(b"1000\r\n");
        chunked.extend_from_slice(&[b'y'; 0x1000]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let ending = send(addr, &chunked, false).await;
    assert_refused(&ending, 413, "RUNONCE_BODY_TOO_LARGE");
    assert_eq!(upstream.count(), 0);
    still_serves(addr).await;
}

#[tokio::test]
async fn guarded_bodies_runonce_cannot_key_safely_are_refused_and_not_forwarded() {
    let upstream = upstream().await;
    let proxy = proxy(&[upstream.url()], &[]);
    let addr = proxy.addr("proxy");
    let form = Some("application/x-www-form-urlencoded");
    let json = Some("application/json");
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "missing Content-Type",
            post(RUN_JOB, None, b"jobId=1&appId=1"),
            415,
            "RUNONCE_UNSUPPORTED_MEDIA_TYPE",
        ),
        (
            "text/plain",
            post(RUN_JOB, Some("text/plain"), b"jobId=1&appId=1"),
            415,
            "RUNONCE_UNSUPPORTED_MEDIA_TYPE",
        ),
        (
            "multipart",
            post(RUN_JOB, Some("multipart/form-data; boundary=x"), b"--x--"),
            415,
            "RUNONCE_UNSUPPORTED_MEDIA_TYPE",
        ),
        (
            "invalid %-escape",
            post(RUN_JOB, form, b"jobId=%zz&appId=1"),
            400,
            "RUNONCE_BAD_BODY",
        ),
        (
            "truncated %-escape",
            post(RUN_JOB, form, b"jobId=1&appId=1%4"),
            400,
            "RUNONCE_BAD_BODY",
        ),
        (
            "invalid UTF-8 via escapes",
            post(RUN_JOB, form, b"jobId=1&appId=1&instanceParams=%ff"),
            400,
            "RUNONCE_BAD_BODY",
        ),
        (
            "invalid UTF-8 raw",
            post(RUN_JOB, form, b"jobId=1&appId=1&instanceParams=\xc3\x28"),
            400,
            "RUNONCE_BAD_BODY",
        ),
        (
            "invalid %-escape in the query",
            post("/openApi/runJob?appId=%g1", form, b"jobId=1"),
            400,
            "RUNONCE_BAD_BODY",
        ),
        (
            "a duplicate field",
            post(RUN_JOB, form, b"jobId=1&appId=1&jobId=2"),
            400,
            "RUNONCE_BAD_BODY",
        ),
        (
            "a field in query and body",
            post("/openApi/runJob?jobId=1", form, b"jobId=1&appId=1"),
            400,
            "RUNONCE_BAD_BODY",
        ),
        (
            "JSON nested 5000 deep",
            post("/openApi/saveJob", json, deep.as_bytes()),
            400,
            "RUNONCE_BAD_BODY",
        ),
        (
            "JSON that does not parse",
            post("/openApi/saveJob", json, b"{\"appId\":1,"),
            400,
            "RUNONCE_BAD_BODY",
        ),
    ];
    for (what, request, status, code) in &cases {
        let ending = send(addr, request, false).await;
        eprintln!("{what}: {status} {code}");
        assert_refused(&ending, *status, code);
    }
    assert_eq!(upstream.count(), 0, "none of them was forwarded");

    // Valid neighbours of those cases go through.
    let huge_json = format!(
        r#"{{"appId":1,"jobName":"big","jobParams":"{}"}}"#,
        "p".repeat(3 * 1024 * 1024)
    );
    let nested = format!(
        r#"{{"appId":1,"x":{}1{}}}"#,
        "[".repeat(100),
        "]".repeat(100)
    );
    let fine: [(&str, Vec<u8>); 4] = [
        (
            "escaped UTF-8",
            post(
                RUN_JOB,
                form,
                b"jobId=1&appId=1&instanceParams=%C3%A9t%C3%A9",
            ),
        ),
        (
            "query-only, no Content-Type",
            post("/openApi/runJob?jobId=2&appId=1", None, b""),
        ),
        (
            "3 MiB of JSON",
            post("/openApi/saveJob", json, huge_json.as_bytes()),
        ),
        (
            "JSON nested 100 deep",
            post("/openApi/saveJob", json, nested.as_bytes()),
        ),
    ];
    for (what, request) in &fine {
        match send(addr, request, false).await {
            Ending::Answered(r) => assert_eq!(r.status, 200, "{what}: {}", r.text()),
            Ending::Closed => panic!("{what}: closed"),
        }
    }
    assert_eq!(upstream.count(), fine.len());
}

#[tokio::test]
async fn header_injection_does_not_reach_the_upstream_as_a_header() {
    let upstream = upstream().await;
    let proxy = proxy(&[upstream.url()], &[]);
    let addr = proxy.addr("proxy");
    // Encoded CR LF in the path and query stays encoded; it never becomes a line of the forwarded head.
    let request = b"GET /openApi/assert%0D%0AInjected:%20yes?appName=a%0d%0aInjected2:%20yes HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
    let Ending::Answered(answer) = send(addr, request, false).await else {
        panic!("closed");
    };
    assert_eq!(answer.status, 200);
    // An obs-folded header (a continuation line) is refused, not unfolded into a new header.
    let folded = b"POST /openApi/fetchInstanceStatus HTTP/1.1\r\nHost: t\r\nX-A: a\r\n Injected: b\r\nContent-Length: 0\r\n\r\n";
    let ending = send(addr, folded, true).await;
    assert!(
        matches!(&ending, Ending::Closed)
            || matches!(&ending, Ending::Answered(r) if r.status == 400),
        "{ending:?}"
    );
    // An Idempotency-Key with a control character is not HTTP (hyper's bare 400); one with bytes beyond ASCII
    // is runonce's 400.
    let control = form_post(RUN_JOB, "jobId=1&appId=1", "Idempotency-Key: a\x01b\r\n");
    match send(addr, &control, false).await {
        Ending::Answered(r) => assert_eq!(r.status, 400),
        Ending::Closed => {}
    }
    let keyed = form_post(RUN_JOB, "jobId=1&appId=1", "Idempotency-Key: k\u{e9}y\r\n");
    assert_refused(
        &send(addr, &keyed, false).await,
        400,
        "RUNONCE_BAD_IDEMPOTENCY_KEY",
    );

    assert_eq!(upstream.count(), 1, "only the GET went through");
    let forwarded = upstream.request(0);
    let head = forwarded.split("\r\n\r\n").next().unwrap();
    assert!(
        !head
            .lines()
            .any(|l| l.to_ascii_lowercase().starts_with("injected")),
        "{head}"
    );
    assert!(
        head.starts_with("GET /openApi/assert%0D%0AInjected:%20yes?"),
        "{head}"
    );
}

#[tokio::test]
async fn a_guarded_body_that_never_arrives_gets_408_and_a_close() {
    let upstream = upstream().await;
    let proxy = proxy(&[upstream.url()], &["--body-read-timeout", "500ms"]);
    let addr = proxy.addr("proxy");
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // The head promises 40 bytes; 10 come, then nothing (the connection stays open).
    stream
        .write_all(b"POST /openApi/runJob HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 40\r\n\r\njobId=1&a")
        .await
        .unwrap();
    let started = Instant::now();
    let response = read_response(&mut stream).await.expect("an answer");
    let waited = started.elapsed();
    assert_eq!(response.status, 408, "{}", response.text());
    assert_eq!(response.json().unwrap()["code"], "RUNONCE_BODY_TIMEOUT");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(STEP, stream.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the connection was closed after the 408");
    eprintln!("slow guarded body: 408 after {waited:?}");
    assert_eq!(upstream.count(), 0);
    still_serves(addr).await;
}

#[tokio::test]
async fn a_pass_through_body_that_stalls_is_bounded_by_the_upstream_timeout() {
    let upstream = upstream().await;
    let proxy = proxy(&[upstream.url()], &["--upstream-timeout", "700ms"]);
    let addr = proxy.addr("proxy");
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"POST /openApi/fetchInstanceStatus HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 40\r\n\r\ninstanceId=1")
        .await
        .unwrap();
    let response = read_response(&mut stream).await.expect("an answer");
    assert_eq!(response.status, 504, "{}", response.text());
    assert_eq!(response.json().unwrap()["code"], "RUNONCE_UPSTREAM_TIMEOUT");
    assert_eq!(
        upstream.count(),
        0,
        "the upstream never got a whole request"
    );
    still_serves(addr).await;
}

#[tokio::test]
async fn a_head_dripped_byte_by_byte_is_cut_off_at_the_header_read_timeout() {
    let upstream = upstream().await;
    let proxy = proxy(&[upstream.url()], &["--header-read-timeout", "1s"]);
    let addr = proxy.addr("proxy");
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = form_post(RUN_JOB, "jobId=1&appId=1", "");
    let started = Instant::now();
    let mut sent = 0;
    // One byte every 100 ms: the whole head would take far longer than the timeout.
    for byte in &head {
        if stream.write_all(&[*byte]).await.is_err() || started.elapsed() > STEP {
            break;
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(STEP, stream.read_to_end(&mut rest)).await;
    eprintln!(
        "dripping client: cut off after {sent} of {} bytes, {:?}",
        head.len(),
        started.elapsed()
    );
    assert!(
        sent < head.len(),
        "the proxy waited for the whole dripped head"
    );
    assert!(started.elapsed() < STEP);
    assert_eq!(upstream.count(), 0);
    still_serves(addr).await;
}

/// The soft limit of open files (`ulimit -n`, inherited by the proxy), at most `want`.
fn open_files_for(want: u64) -> u64 {
    let out = std::process::Command::new("sh")
        .args(["-c", "ulimit -n"])
        .output()
        .expect("ulimit");
    let soft: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(1024);
    soft.min(want)
}

#[tokio::test]
async fn two_thousand_idle_connections_neither_block_a_request_nor_stay_open() {
    let upstream = upstream().await;
    let proxy = proxy(&[upstream.url()], &["--header-read-timeout", "2s"]);
    let addr = proxy.addr("proxy");
    // Each idle socket costs one descriptor here and one in the proxy; keep 200 spare for everything else.
    let limit = open_files_for(2200);
    let count = (limit.saturating_sub(200)).min(2000) as usize;
    assert!(count >= 500, "ulimit -n is {limit}: too low for this test");
    let mut idle = Vec::with_capacity(count);
    for _ in 0..count {
        idle.push(
            TcpStream::connect(addr)
                .await
                .expect("connect an idle socket"),
        );
    }
    let opened = Instant::now();
    still_serves(addr).await;
    eprintln!(
        "{count} idle connections open; a normal request answered after {:?}",
        opened.elapsed()
    );
    // Each idle connection is closed by the proxy at the header read timeout.
    let closes = idle.into_iter().map(|mut stream| {
        tokio::spawn(async move {
            let mut buf = [0u8; 1];
            matches!(
                tokio::time::timeout(STEP, stream.read(&mut buf)).await,
                Ok(Ok(0)) | Ok(Err(_))
            )
        })
    });
    let mut closed = 0;
    for close in closes.collect::<Vec<_>>() {
        closed += usize::from(close.await.unwrap());
    }
    eprintln!(
        "idle connections closed by the proxy: {closed} of {count}, all within {:?}",
        opened.elapsed()
    );
    assert_eq!(closed, count);
    assert_eq!(upstream.count(), 1);
    still_serves(addr).await;
}

#[tokio::test]
async fn idle_connections_beyond_max_connections_delay_a_request_only_by_header_read_timeouts() {
    let upstream = upstream().await;
    let proxy = proxy(
        &[upstream.url()],
        &["--header-read-timeout", "3s", "--max-connections", "100"],
    );
    let addr = proxy.addr("proxy");
    // 200 idle sockets against 100 slots: the second hundred waits in the backlog until the first is cut off.
    let opened = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(TcpStream::connect(addr).await.expect("connect"));
    }
    // When the proxy cuts off each idle connection (as seen from here).
    let closes: Vec<_> = idle
        .into_iter()
        .map(|mut stream| {
            tokio::spawn(async move {
                let mut buf = [0u8; 1];
                let _ = tokio::time::timeout(STEP, stream.read(&mut buf)).await;
                opened.elapsed()
            })
        })
        .collect();
    let started = opened.elapsed();
    still_serves(addr).await;
    let answered = opened.elapsed();
    let mut first_close = STEP;
    for close in closes {
        first_close = first_close.min(close.await.unwrap());
    }
    eprintln!(
        "200 idle connections, max_connections 100, header_read_timeout 3s: a request waited {:?}; the first idle one was cut off at {first_close:?}",
        answered - started
    );
    assert!(answered < STEP, "bounded by the idle connections' timeouts");
    // With the cap no slot frees before an idle connection is cut off, 3 s after it was accepted (here, a
    // second is allowed for opening the 200 sockets): without it the request would be answered at once.
    assert!(
        answered - started >= Duration::from_secs(1),
        "the request was served while every slot was held by an idle connection"
    );
    assert!(first_close >= Duration::from_secs(3), "{first_close:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_connections_queues_in_the_kernel_while_the_proxy_is_off_the_cpu() {
    // std's listen backlog (128) dropped the SYNs beyond it, and those clients came back a second later: in a
    // storm of duplicates, after the first answer was delivered. Freeze the proxy and connect 600 times.
    let upstream = upstream().await;
    let proxy = proxy(&[upstream.url()], &[]);
    let addr = proxy.addr("proxy");
    let signal = |sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, &proxy.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    };
    signal("-STOP");
    let mut queued = Vec::new();
    let mut stuck = 0;
    for _ in 0..600 {
        // The handshake completes in the kernel when the accept queue has room; a dropped SYN would be
        // retried only after a second.
        match tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => queued.push(stream),
            _ => stuck += 1,
        }
        if stuck > 0 {
            break;
        }
    }
    signal("-CONT");
    eprintln!(
        "proxy frozen: {} connections queued, {stuck} not",
        queued.len()
    );
    assert_eq!(stuck, 0, "connects beyond the listen backlog hung");
    // Each is served once the proxy runs again (one after the other: the scripted upstream has std's backlog).
    for mut stream in queued {
        stream
            .write_all(b"GET /openApi/assert HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(
            read_response(&mut stream).await.expect("an answer").status,
            200
        );
    }
}
