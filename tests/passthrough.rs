//! Forwarding through the real binary, asserted on the bytes a client socket receives: header-name case,
//! the auth-header repair, hop-by-hop headers, X-Forwarded-*, streaming, and the body limit.

mod support;

use support::*;

/// An upstream that answers every request with `answer`.
async fn upstream_answering(answer: Vec<u8>) -> RawUpstream {
    RawUpstream::start(move |_| Script::Answer(answer.clone())).await
}

#[tokio::test]
async fn response_header_names_keep_the_upstreams_case_byte_for_byte() {
    let upstream = upstream_answering(ok_answer(
        "X-Custom-CASE: a\r\nx-lower: b\r\nX-POWERJOB-AUTH-PASSED: true\r\n",
    ))
    .await;
    let proxy = proxy(&[upstream.url()], &[]);
    let response = raw(
        proxy.addr("proxy"),
        &form_post("/openApi/fetchInstanceStatus", "instanceId=1", ""),
    )
    .await
    .unwrap();
    assert_eq!(response.status, 200);
    let lines = response.header_lines();
    for expected in [
        "Content-Type: application/json",
        "X-Custom-CASE: a",
        "x-lower: b",
        "X-POWERJOB-AUTH-PASSED: true",
    ] {
        assert!(lines.contains(&expected), "{expected:?} not in {lines:?}");
    }
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.to_ascii_lowercase().starts_with("x-powerjob-auth-passed"))
            .count(),
        1
    );
    assert_eq!(
        response.json().unwrap()["data"],
        serde_json::json!(754612332134400064_i64)
    );
}

#[tokio::test]
async fn a_missing_auth_header_is_added_in_exact_case_on_openapi_200s_only() {
    let upstream = RawUpstream::start(|request| {
        let request = String::from_utf8_lossy(request);
        if request.starts_with("POST /openApi/missing") {
            Script::Answer(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec())
        } else {
            Script::Answer(ok_answer(""))
        }
    })
    .await;
    let proxy = proxy(&[upstream.url()], &[]);
    let addr = proxy.addr("proxy");

    let runjob = raw(
        addr,
        &form_post("/openApi/runJob", "jobId=5&delay=0&appId=1", ""),
    )
    .await
    .unwrap();
    assert_eq!(
        runjob.exact("X-POWERJOB-AUTH-PASSED"),
        Some("true"),
        "{}",
        runjob.head
    );
    let prefixed = raw(addr, &form_post("/pj/openApi/runJob", "jobId=5", ""))
        .await
        .unwrap();
    assert_eq!(prefixed.exact("X-POWERJOB-AUTH-PASSED"), Some("true"));

    let not_openapi = raw(addr, &form_post("/server/hello", "", ""))
        .await
        .unwrap();
    assert_eq!(not_openapi.status, 200);
    assert!(
        !not_openapi
            .head
            .to_ascii_lowercase()
            .contains("x-powerjob-auth-passed"),
        "{}",
        not_openapi.head
    );
    let not_200 = raw(addr, &form_post("/openApi/missing", "", ""))
        .await
        .unwrap();
    assert_eq!(not_200.status, 404);
    assert!(!not_200
        .head
        .to_ascii_lowercase()
        .contains("x-powerjob-auth-passed"));
}

#[tokio::test]
async fn a_lower_cased_true_is_rewritten_and_false_stays_false() {
    let lowered = upstream_answering(ok_answer("x-powerjob-auth-passed: true\r\n")).await;
    let proxy_lowered = proxy(&[lowered.url()], &[]);
    let response = raw(
        proxy_lowered.addr("proxy"),
        &form_post("/openApi/runJob", "jobId=5", ""),
    )
    .await
    .unwrap();
    assert_eq!(response.exact("X-POWERJOB-AUTH-PASSED"), Some("true"));
    assert!(!response.head.contains("x-powerjob-auth-passed"));

    let refused = upstream_answering(ok_answer("X-POWERJOB-AUTH-PASSED: false\r\n")).await;
    let proxy_refused = proxy(&[refused.url()], &[]);
    let response = raw(
        proxy_refused.addr("proxy"),
        &form_post("/openApi/runJob", "jobId=5", ""),
    )
    .await
    .unwrap();
    assert_eq!(response.exact("X-POWERJOB-AUTH-PASSED"), Some("false"));
    assert_eq!(
        response
            .header_lines()
            .iter()
            .filter(|l| l.contains("AUTH-PASSED"))
            .count(),
        1
    );
}

#[tokio::test]
async fn preserve_mode_leaves_the_header_alone() {
    let upstream = upstream_answering(ok_answer("")).await;
    let proxy = proxy(&[upstream.url()], &["--auth-header", "preserve"]);
    let response = raw(
        proxy.addr("proxy"),
        &form_post("/openApi/runJob", "jobId=5", ""),
    )
    .await
    .unwrap();
    assert_eq!(response.status, 200);
    assert!(
        !response
            .head
            .to_ascii_lowercase()
            .contains("x-powerjob-auth-passed"),
        "{}",
        response.head
    );
}

#[tokio::test]
async fn hop_by_hop_headers_are_dropped_both_ways_and_forwarded_headers_added() {
    let upstream = upstream_answering(ok_answer(
        "Connection: X-Upstream-Hop\r\nX-Upstream-Hop: 1\r\nKeep-Alive: timeout=5\r\n",
    ))
    .await;
    let proxy = proxy(&[upstream.url()], &[]);
    let request = form_post(
        "/openApi/fetchJob",
        "jobId=1",
        "Connection: X-Client-Hop\r\nX-Client-Hop: 1\r\nProxy-Authorization: secret\r\nX-POWERJOB-APP-ID: 1\r\n",
    );
    let response = raw(proxy.addr("proxy"), &request).await.unwrap();
    assert_eq!(response.status, 200);
    let head = response.head.to_ascii_lowercase();
    assert!(
        !head.contains("x-upstream-hop") && !head.contains("keep-alive"),
        "{}",
        response.head
    );

    let seen = upstream.request(0);
    assert!(
        !seen.to_ascii_lowercase().contains("x-client-hop"),
        "{seen}"
    );
    assert!(
        !seen.to_ascii_lowercase().contains("proxy-authorization"),
        "{seen}"
    );
    assert!(
        seen.contains("X-POWERJOB-APP-ID: 1"),
        "request header case is kept too: {seen}"
    );
    assert!(
        seen.to_ascii_lowercase()
            .contains("x-forwarded-for: 127.0.0.1"),
        "{seen}"
    );
    assert!(
        seen.to_ascii_lowercase()
            .contains("x-forwarded-proto: http"),
        "{seen}"
    );
    assert!(seen.ends_with("\r\n\r\njobId=1"), "{seen}");
}

#[tokio::test]
async fn large_bodies_stream_both_ways() {
    // 3 MiB up (chunked, no Content-Length) and 3 MiB down.
    let big = "x".repeat(3 * 1024 * 1024);
    let answer = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{big}",
        big.len()
    )
    .into_bytes();
    let upstream = upstream_answering(answer).await;
    let proxy = proxy(&[upstream.url()], &[]);
    // An unguarded route: guarded ones (saveJob without an id) read the body whole, and refuse one that is
    // neither form nor JSON.
    let mut request = b"POST /openApi/fetchInstanceInfo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for chunk in big.as_bytes().chunks(100_000) {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let response = raw(proxy.addr("proxy"), &request).await.unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.body.len(), big.len());
    let seen = upstream.requests.lock().unwrap()[0].clone();
    assert!(
        seen.len() > big.len(),
        "the upstream got the whole body: {} bytes",
        seen.len()
    );
}

#[tokio::test]
async fn bodies_over_the_limit_get_413_whether_declared_or_streamed() {
    let upstream = upstream_answering(ok_answer("")).await;
    let proxy = proxy(&[upstream.url()], &["--body-limit", "64KiB"]);
    let addr = proxy.addr("proxy");

    let declared = format!(
        "POST /openApi/saveJob HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        65 * 1024
    );
    let response = raw(addr, declared.as_bytes()).await.unwrap();
    assert_eq!(response.status, 413);
    assert_eq!(response.json().unwrap()["code"], "RUNONCE_BODY_TOO_LARGE");
    assert_eq!(
        upstream.count(),
        0,
        "a declared oversized body never reaches the upstream"
    );

    let mut streamed = b"POST /openApi/saveJob HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for _ in 0..20 {
        streamed.extend_from_slice(b"1000\r\n");
        streamed.extend_from_slice(&[b'y'; 0x1000]);
        streamed.extend_from_slice(b"\r\n");
    }
    streamed.extend_from_slice(b"0\r\n\r\n");
    let response = raw(addr, &streamed).await.unwrap();
    assert_eq!(response.status, 413, "{}", response.text());
    assert_eq!(response.json().unwrap()["success"], false);

    let fine = raw(addr, &form_post("/openApi/runJob", "jobId=1", ""))
        .await
        .unwrap();
    assert_eq!(fine.status, 200, "the proxy still serves");
}

/// Client connections are served on `workers` threads, each borrowing upstream connections from a pool of its
/// own (`src/workers.rs`): two keep-alive clients, handed to the two workers in turn, send requests one after
/// the other, and the upstream sees every request on one connection per worker. A pool shared by the threads
/// would serve them all on one; no reuse, on twenty.
#[tokio::test]
async fn each_worker_thread_keeps_its_own_upstream_connection_alive() {
    use tokio::io::AsyncWriteExt;
    let upstream = upstream_answering(ok_answer("")).await;
    let proxy = proxy(&[upstream.url()], &["--workers", "2"]);
    let addr = proxy.addr("proxy");
    let mut clients = [
        tokio::net::TcpStream::connect(addr).await.unwrap(),
        tokio::net::TcpStream::connect(addr).await.unwrap(),
    ];
    let request = b"GET /openApi/fetchInstanceStatus?instanceId=1 HTTP/1.1\r\nHost: test\r\n\r\n";
    for round in 0..10 {
        for client in clients.iter_mut() {
            client.write_all(request).await.unwrap();
            let response = read_response(client).await.unwrap();
            assert_eq!(response.status, 200, "round {round}: {}", response.head);
            // Time for the connection to go back to its pool before the next request.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
    assert_eq!(upstream.count(), 20);
    assert_eq!(
        upstream.connections(),
        2,
        "one upstream connection per worker"
    );
}
