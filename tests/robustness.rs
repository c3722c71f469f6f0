//! Failover that never re-sends, upstream failures, request-head limits, garbled input, slow clients, admin
//! probes and SIGTERM draining, through the real binary.

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A loopback address nothing listens on: bound, then closed.
async fn closed_port() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    url(addr)
}

#[tokio::test]
async fn an_unreachable_upstream_is_skipped_for_the_next_one() {
    let dead = closed_port().await;
    let live = RawUpstream::start(|_| Script::Answer(ok_answer(""))).await;
    let proxy = proxy(&[dead, live.url()], &[]);
    for _ in 0..3 {
        let response = raw(
            proxy.addr("proxy"),
            &form_post("/openApi/runJob", "jobId=1", ""),
        )
        .await
        .unwrap();
        assert_eq!(response.status, 200);
    }
    assert_eq!(live.count(), 3);
}

#[tokio::test]
async fn no_reachable_upstream_gives_502_with_a_powerjob_body() {
    let proxy = proxy(&[closed_port().await], &[]);
    let response = raw(
        proxy.addr("proxy"),
        &form_post("/openApi/runJob", "jobId=1", ""),
    )
    .await
    .unwrap();
    assert_eq!(response.status, 502);
    let json = response.json().unwrap();
    assert_eq!(json["success"], false);
    assert_eq!(json["data"], serde_json::Value::Null);
    assert_eq!(json["code"], "RUNONCE_UPSTREAM_UNREACHABLE");
    assert!(json["message"].as_str().unwrap().starts_with("runonce: "));
}

#[tokio::test]
async fn a_request_that_reached_an_upstream_is_never_sent_to_another() {
    // The first upstream reads the request and hangs up; the second must never see it.
    let breaks = RawUpstream::start(|_| Script::Hangup).await;
    let spare = RawUpstream::start(|_| Script::Answer(ok_answer(""))).await;
    let proxy = proxy(&[breaks.url(), spare.url()], &[]);
    let response = raw(
        proxy.addr("proxy"),
        &form_post("/openApi/runJob", "jobId=1", ""),
    )
    .await
    .unwrap();
    assert_eq!(response.status, 502);
    assert_eq!(response.json().unwrap()["code"], "RUNONCE_UPSTREAM_BROKEN");
    assert_eq!((breaks.count(), spare.count()), (1, 0));
}

#[tokio::test]
async fn a_slow_upstream_gives_504_and_the_request_is_not_re_sent() {
    let slow = RawUpstream::start(|_| Script::Slow(Duration::from_secs(5), ok_answer(""))).await;
    let spare = RawUpstream::start(|_| Script::Answer(ok_answer(""))).await;
    let proxy = proxy(&[slow.url(), spare.url()], &["--upstream-timeout", "300ms"]);
    let started = Instant::now();
    let response = raw(
        proxy.addr("proxy"),
        &form_post("/openApi/runJob", "jobId=1", ""),
    )
    .await
    .unwrap();
    assert_eq!(response.status, 504);
    assert_eq!(response.json().unwrap()["code"], "RUNONCE_UPSTREAM_TIMEOUT");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "answered at the timeout, not at the upstream's pace"
    );
    assert_eq!((slow.count(), spare.count()), (1, 0));
}

#[tokio::test]
async fn keep_alive_connections_are_reused_and_survive_an_upstream_closing_them() {
    // The upstream closes after every answer: pooled connections go stale, and the next request must still
    // go through on a fresh one (the stale one never took it).
    let upstream = RawUpstream::start(|_| Script::Answer(ok_answer("Connection: close\r\n"))).await;
    let proxy = proxy(&[upstream.url()], &[]);
    let mut client = TcpStream::connect(proxy.addr("proxy")).await.unwrap();
    for i in 0..5 {
        let request = format!(
            "POST /openApi/fetchInstanceStatus HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\ninstanceId={i}",
            format!("instanceId={i}").len()
        );
        client.write_all(request.as_bytes()).await.unwrap();
        let response = read_response(&mut client).await.unwrap();
        assert_eq!(response.status, 200, "request {i}");
    }
    assert_eq!(upstream.count(), 5);
}

#[tokio::test]
async fn too_many_or_too_large_headers_get_431_and_a_garbled_request_400() {
    let upstream = RawUpstream::start(|_| Script::Answer(ok_answer(""))).await;
    let proxy = proxy(
        &[upstream.url()],
        &["--max-headers", "20", "--max-header-bytes", "4KiB"],
    );
    let addr = proxy.addr("proxy");

    let many: String = (0..30).map(|i| format!("X-H{i}: v\r\n")).collect();
    let response = raw(addr, &form_post("/openApi/runJob", "jobId=1", &many))
        .await
        .unwrap();
    assert_eq!(response.status, 431);
    assert_eq!(response.json().unwrap()["code"], "RUNONCE_HEAD_TOO_LARGE");

    let large = format!("X-Big: {}\r\n", "a".repeat(5000));
    let response = raw(addr, &form_post("/openApi/runJob", "jobId=1", &large))
        .await
        .unwrap();
    assert_eq!(response.status, 431);
    assert_eq!(response.json().unwrap()["code"], "RUNONCE_HEAD_TOO_LARGE");

    // Far beyond the limit hyper itself refuses (a bare 431), before the request is even parsed.
    let huge = format!("X-Huge: {}\r\n", "a".repeat(64 * 1024));
    let response = raw(addr, &form_post("/openApi/runJob", "jobId=1", &huge))
        .await
        .unwrap();
    assert_eq!(response.status, 431);

    let garbled = raw(addr, b"P\x00ST /openApi/runJob HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(garbled.status, 400);
    let garbled = raw(
        addr,
        b"POST /openApi/runJob HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(garbled.status, 400);

    assert_eq!(upstream.count(), 0, "nothing refused reached the upstream");
    let fine = raw(addr, &form_post("/openApi/runJob", "jobId=1", ""))
        .await
        .unwrap();
    assert_eq!(fine.status, 200, "the proxy still serves");
}

#[tokio::test]
async fn a_client_that_never_finishes_its_head_is_disconnected() {
    let upstream = RawUpstream::start(|_| Script::Answer(ok_answer(""))).await;
    let proxy = proxy(&[upstream.url()], &["--header-read-timeout", "300ms"]);
    let mut slow = TcpStream::connect(proxy.addr("proxy")).await.unwrap();
    slow.write_all(b"POST /openApi/runJob HTTP/1.1\r\nHost: t\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(STEP, slow.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the connection was closed");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(upstream.count(), 0);
}

#[tokio::test]
async fn admin_probes_report_liveness_and_upstream_reachability() {
    let upstream = RawUpstream::start(|_| Script::Answer(ok_answer(""))).await;
    let up = proxy(&[upstream.url()], &[]);
    let get = |path: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").into_bytes()
    };
    assert_eq!(
        raw(up.addr("admin"), &get("/healthz"))
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        raw(up.addr("admin"), &get("/readyz")).await.unwrap().status,
        200
    );
    assert_eq!(
        raw(up.addr("admin"), &get("/nope")).await.unwrap().status,
        404
    );

    let down = proxy(&[closed_port().await], &[]);
    assert_eq!(
        raw(down.addr("admin"), &get("/healthz"))
            .await
            .unwrap()
            .status,
        200
    );
    let ready = raw(down.addr("admin"), &get("/readyz")).await.unwrap();
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json().unwrap()["status"], "no upstream reachable");
}

#[tokio::test]
async fn sigterm_lets_the_in_flight_request_finish_then_exits() {
    let slow =
        RawUpstream::start(|_| Script::Slow(Duration::from_millis(800), ok_answer(""))).await;
    let mut proxy = proxy(&[slow.url()], &["--drain-timeout", "5s"]);
    let addr = proxy.addr("proxy");
    let in_flight =
        tokio::spawn(async move { raw(addr, &form_post("/openApi/runJob", "jobId=1", "")).await });
    // Wait until the request is at the upstream, then ask the proxy to stop.
    let deadline = Instant::now() + STEP;
    while slow.count() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    proxy.terminate();
    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.status, 200, "the in-flight request was answered");
    let status = proxy.wait_exit(STEP).expect("exited after draining");
    assert!(status.success(), "{status:?}");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
}
