//! At most once, with no way around it: each test is one way a single logical call used to reach the server
//! twice (issue "At most once"), on real parts: the `runonce` binary, a scripted raw upstream that answers as
//! PowerJob (or a hop before it) does after it created the instance, and a real `redis-server` where Redis is
//! involved. Each counts what reached the upstream.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::redis::RedisServer;
use support::*;

const RUN_JOB: &str = "/openApi/runJob";
const FORM: &str = "jobId=5&delay=0&appId=1&instanceParams=once";

async fn run_job(proxy: SocketAddr, extra: &str) -> RawResponse {
    run_job_body(proxy, FORM, extra).await
}

async fn run_job_body(proxy: SocketAddr, body: &str, extra: &str) -> RawResponse {
    raw(proxy, &form_post(RUN_JOB, body, extra))
        .await
        .expect("runJob answer")
}

/// A 200 answer with a PowerJob body.
fn pj(body: &str) -> Vec<u8> {
    answer("200 OK", "application/json", body)
}

fn answer(status: &str, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn failure(message: &str) -> String {
    serde_json::json!({"success": false, "data": null, "message": message, "code": null})
        .to_string()
}

/// Answers PowerJob (or a hop in front of it) gives after the instance may exist: none proves that nothing
/// was created (POWERJOB.md §10).
fn answers_after_create() -> Vec<(&'static str, Vec<u8>)> {
    let nginx = |code: &str, reason: &str| {
        format!("<html>\r\n<head><title>{code} {reason}</title></head>\r\n<body>\r\n<center><h1>{code} {reason}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n")
    };
    vec![
        (
            "a forward's TimeoutException",
            pj(&failure("TimeoutException: null")),
        ),
        (
            "a dispatch error after the insert",
            pj(&failure("PowerJobException: dispatch failed")),
        ),
        (
            "a bare NullPointerException",
            pj(&failure("NullPointerException: ")),
        ),
        (
            "a 500 from the server",
            answer(
                "500 Internal Server Error",
                "application/json",
                &failure("java.lang.RuntimeException"),
            ),
        ),
        (
            "a hop's 502",
            answer("502 Bad Gateway", "text/html", &nginx("502", "Bad Gateway")),
        ),
        (
            "a hop's 504",
            answer(
                "504 Gateway Time-out",
                "text/html",
                &nginx("504", "Gateway Time-out"),
            ),
        ),
        ("a 200 that is no PowerJob result", pj("<html>ok</html>")),
    ]
}

#[tokio::test]
async fn answers_that_may_follow_a_created_instance_are_never_sent_again() {
    for (what, bytes) in answers_after_create() {
        let status = String::from_utf8_lossy(&bytes[9..12])
            .parse::<u16>()
            .unwrap();
        let upstream = RawUpstream::start(move |_| Script::Answer(bytes.clone())).await;
        let proxy = proxy(&[upstream.url()], &[]);
        let first = run_job(proxy.addr("proxy"), "").await;
        assert_eq!(first.status, status, "{what}: the answer as it came");
        let retry = run_job(proxy.addr("proxy"), "").await;
        assert_eq!(retry.status, 409, "{what}: {}", retry.text());
        assert_eq!(
            retry.json().unwrap()["code"],
            "RUNONCE_OUTCOME_UNKNOWN",
            "{what}"
        );
        assert_eq!(upstream.count(), 1, "{what}: sent once");
    }
}

/// PowerJob's failures that happen before anything is inserted (POWERJOB.md §10, read from the 5.1.x source):
/// the key is released, and the next identical call reaches the server.
#[tokio::test]
async fn failures_before_the_insert_release_the_key() {
    let released = [
        "IllegalArgumentException: can't find job by jobId: 5",
        "IllegalArgumentException: this job is not belong to the app whose appId is 1",
        "MethodArgumentTypeMismatchException: Failed to convert value of type 'java.lang.String' to required type 'java.lang.Long'; nested exception is java.lang.NumberFormatException: For input string: \"x\"",
        "MissingServletRequestParameterException: Required request parameter 'jobId' for method parameter type Long is not present",
        "HttpRequestMethodNotSupportedException: Request method 'GET' not supported",
    ];
    for message in released {
        let body = failure(message);
        let upstream = RawUpstream::start(move |_| Script::Answer(pj(&body))).await;
        let proxy = proxy(&[upstream.url()], &[]);
        for _ in 0..2 {
            let answer = run_job(proxy.addr("proxy"), "").await;
            assert_eq!(answer.status, 200, "{message}");
            assert_eq!(answer.json().unwrap()["success"], false);
        }
        assert_eq!(upstream.count(), 2, "{message}: released, so sent again");
    }
    // A 4xx from the servlet container, and the interceptor's refusal.
    for bytes in [
        answer("404 Not Found", "application/json", "{}"),
        pj_with_auth_false(),
    ] {
        let upstream = RawUpstream::start(move |_| Script::Answer(bytes.clone())).await;
        let proxy = proxy(&[upstream.url()], &[]);
        run_job(proxy.addr("proxy"), "").await;
        run_job(proxy.addr("proxy"), "").await;
        assert_eq!(upstream.count(), 2);
    }
}

fn pj_with_auth_false() -> Vec<u8> {
    let body = r#"{"success":false,"message":"TOKEN_EXPIRED:x","code":"-403"}"#;
    format!("HTTP/1.1 200 OK\r\nX-POWERJOB-AUTH-PASSED: false\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).into_bytes()
}

#[tokio::test]
async fn keep_business_errors_stores_every_success_false() {
    let body = failure("TimeoutException: null");
    let upstream = RawUpstream::start(move |_| Script::Answer(pj(&body))).await;
    let proxy = proxy(
        &[upstream.url()],
        &[
            "--keep-business-errors",
            "true",
            "--after-delivery",
            "replay",
        ],
    );
    run_job(proxy.addr("proxy"), "").await;
    let replay = run_job(proxy.addr("proxy"), "").await;
    assert_eq!(replay.status, 200);
    assert_eq!(replay.exact("Idempotent-Replayed"), Some("true"));
    assert_eq!(upstream.count(), 1);
}

/// Five identical calls at once; the upstream answers the one it gets slowly with `bytes`. Returns how many
/// reached the upstream and the five answers.
async fn five_at_once(
    store: &[&str],
    bytes: Vec<u8>,
    body: &str,
) -> (usize, Vec<RawResponse>, Process) {
    let upstream =
        RawUpstream::start(move |_| Script::Slow(Duration::from_millis(600), bytes.clone())).await;
    let proxy = proxy(&[upstream.url()], store);
    let addr = proxy.addr("proxy");
    let calls: Vec<_> = (0..5)
        .map(|i| {
            let body = body.to_string();
            tokio::spawn(async move {
                // The leader first, the others while its call runs.
                tokio::time::sleep(Duration::from_millis(if i == 0 { 0 } else { 150 })).await;
                run_job_body(addr, &body, "").await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap());
    }
    let sent = upstream.count();
    // Keep the upstream alive for callers that send more.
    std::mem::forget(upstream);
    (sent, answers, proxy)
}

async fn concurrent_duplicates_share_the_leaders_outcome(store: &[&str]) {
    // Each case its own payload: a Redis store outlives the proxies.
    for (i, (what, bytes)) in answers_after_create().into_iter().enumerate() {
        let expected = String::from_utf8_lossy(&bytes).into_owned();
        let body = format!("jobId=5&delay=0&appId=1&instanceParams=case-{i}");
        let (sent, answers, _proxy) = five_at_once(store, bytes, &body).await;
        assert_eq!(sent, 1, "{what}: five duplicates, one call");
        for answer in &answers {
            assert!(
                expected.ends_with(&answer.text()),
                "{what}: every duplicate gets the leader's answer, got {} {}",
                answer.status,
                answer.text()
            );
        }
    }
    // A released answer is shared by the duplicates that waited for it; a call after it runs again.
    let body = failure("IllegalArgumentException: can't find job by jobId: 5");
    let payload = "jobId=5&delay=0&appId=1&instanceParams=released";
    let (sent, answers, _proxy) = five_at_once(store, pj(&body), payload).await;
    assert_eq!(sent, 1, "released: the waiters share it, none is re-sent");
    for answer in &answers {
        assert_eq!(answer.text(), body);
    }
}

#[tokio::test]
async fn concurrent_duplicates_share_the_leaders_outcome_on_the_memory_store() {
    concurrent_duplicates_share_the_leaders_outcome(&[]).await;
}

#[tokio::test]
async fn concurrent_duplicates_share_the_leaders_outcome_on_redis() {
    let redis = RedisServer::start();
    let url = redis.url();
    concurrent_duplicates_share_the_leaders_outcome(&["--store", &url]).await;
}

/// A full memory store: `Idempotency-Key` answers (24 h) fill it while leader + waiter pairs of fingerprinted
/// calls run. The waiter woken by its leader's completion must get that answer, never lead a second call.
#[tokio::test]
async fn a_full_memory_store_never_doubles_a_leader_and_its_waiter() {
    let upstream = RawUpstream::start(|request| {
        let slow = String::from_utf8_lossy(request).contains("pair-");
        let wait = Duration::from_millis(if slow { 150 } else { 0 });
        Script::Slow(wait, ok_answer(""))
    })
    .await;
    // Records settled within the last wait_timeout are kept: 300 ms here, so that the flood (about a
    // thousand calls a second) finds room among the 300.
    let proxy = proxy(
        &[upstream.url()],
        &[
            "--memory-max-keys",
            "300",
            "--wait-timeout",
            "300ms",
            "--upstream-timeout",
            "300ms",
        ],
    );
    let addr = proxy.addr("proxy");
    let flood = tokio::spawn(async move {
        for i in 0..20_000 {
            let key = format!("Idempotency-Key: flood-{i}\r\n");
            run_job_body(addr, &format!("jobId=7&appId=1&instanceParams=f{i}"), &key).await;
        }
    });
    let mut pairs = Vec::new();
    for i in 0..20 {
        let body = format!("jobId=5&appId=1&instanceParams=pair-{i}");
        let leader = {
            let body = body.clone();
            tokio::spawn(async move { run_job_body(addr, &body, "").await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let waiter = run_job_body(addr, &body, "").await;
        pairs.push((leader.await.unwrap(), waiter));
    }
    flood.abort();
    let requests = upstream.requests.lock().unwrap().clone();
    for (i, (leader, waiter)) in pairs.iter().enumerate() {
        let needle = format!("instanceParams=pair-{i}");
        let sent = requests
            .iter()
            .filter(|r| String::from_utf8_lossy(r).ends_with(&needle))
            .count();
        // A full store refuses a claim (503, nothing forwarded); it never lets one through twice.
        let expected = usize::from(leader.status == 200 || waiter.status == 200);
        assert_eq!(sent, expected, "pair {i} reached the upstream {sent} times");
        if leader.status == 200 && waiter.status == 200 {
            assert_eq!(
                waiter.json().unwrap()["data"],
                leader.json().unwrap()["data"]
            );
        }
    }
    let served = pairs.iter().filter(|(l, _)| l.status == 200).count();
    assert!(served >= 10, "most pairs found room: {served} of 20");
}

/// Redis forgets the key (FLUSHALL) while this process's leader runs and its own waiter waits: the waiter
/// must not lead a second call.
#[tokio::test]
async fn a_redis_that_forgets_under_a_local_leader_and_waiter_sends_once() {
    let redis = RedisServer::start();
    let upstream =
        RawUpstream::start(|_| Script::Slow(Duration::from_millis(800), ok_answer(""))).await;
    let proxy = proxy(&[upstream.url()], &["--store", &redis.url()]);
    let addr = proxy.addr("proxy");
    let leader = tokio::spawn(async move { run_job(addr, "").await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let waiter = tokio::spawn(async move { run_job(addr, "").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(redis.query(&["FLUSHALL"]).is_some());
    let (leader, waiter) = (leader.await.unwrap(), waiter.await.unwrap());
    assert_eq!(leader.status, 200, "{}", leader.text());
    assert_eq!(upstream.count(), 1, "the waiter did not lead");
    assert_eq!(waiter.status, 200, "{}", waiter.text());
    assert_eq!(
        waiter.json().unwrap()["data"],
        leader.json().unwrap()["data"]
    );
}

/// A `fail-open` proxy on `redis` (200 ms store time-out) in front of an upstream that answers after `slow`.
async fn fail_open(redis: &RedisServer, slow: u64, extra: &[&str]) -> (RawUpstream, Process) {
    let upstream =
        RawUpstream::start(move |_| Script::Slow(Duration::from_millis(slow), ok_answer(""))).await;
    let url = redis.url();
    let mut flags = vec![
        "--store",
        &url,
        "--on-store-error",
        "fail-open",
        "--store-timeout",
        "200ms",
    ];
    flags.extend_from_slice(extra);
    let proxy = proxy(&[upstream.url()], &flags);
    (upstream, proxy)
}

/// With `fail-open`, a duplicate sent to the same process while Redis hangs (its leader claimed on Redis) is
/// de-duplicated in the process.
#[tokio::test]
async fn fail_open_deduplicates_in_the_process_while_redis_hangs() {
    let redis = RedisServer::start();
    let (upstream, proxy) = fail_open(&redis, 1000, &[]).await;
    let addr = proxy.addr("proxy");
    let leader = tokio::spawn(async move { run_job(addr, "").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    redis.pause();
    let duplicate = run_job(addr, "").await;
    redis.resume();
    let leader = leader.await.unwrap();
    assert_eq!(upstream.count(), 1, "one call reached the upstream");
    assert_eq!(leader.status, 200);
    assert_eq!(
        duplicate.json().unwrap()["data"],
        leader.json().unwrap()["data"]
    );
}

/// With `fail-open`, a leader that claimed on the in-process fallback while Redis hung still answers its
/// duplicates after Redis came back.
#[tokio::test]
async fn fail_open_deduplicates_in_the_process_after_redis_came_back() {
    let redis = RedisServer::start();
    let (upstream, proxy) = fail_open(&redis, 300, &["--after-delivery", "replay"]).await;
    let addr = proxy.addr("proxy");
    redis.pause();
    let leader = run_job(addr, "").await;
    redis.resume();
    assert_eq!(leader.status, 200, "{}", leader.text());
    // The paused Redis may have run the timed-out claim late; give the proxy its reconnect.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let duplicate = run_job(addr, "").await;
    assert_eq!(upstream.count(), 1, "one call reached the upstream");
    assert_eq!(
        duplicate.json().unwrap()["data"],
        leader.json().unwrap()["data"]
    );
}

/// A claim that timed out at runonce but ran on Redis later must not leave an orphan that blocks the key:
/// the client was told 503 "nothing forwarded", so its retry must run.
#[tokio::test]
async fn a_claim_that_timed_out_but_ran_leaves_no_orphan() {
    let redis = RedisServer::start();
    let upstream = RawUpstream::start(|_| Script::Answer(ok_answer(""))).await;
    let proxy = proxy(
        &[upstream.url()],
        &["--store", &redis.url(), "--store-timeout", "200ms"],
    );
    let addr = proxy.addr("proxy");
    // Other calls first, on connections of their own (so on every worker thread): each worker's Redis
    // connection is up and Redis has the scripts, so the timed-out claim runs as soon as Redis does.
    warm_up(addr).await;
    redis.pause();
    let refused = run_job(addr, "").await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    redis.resume();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut retry = run_job(addr, "").await;
    // The proxy may still be reconnecting to Redis: a 503 says nothing was forwarded; try again.
    for _ in 0..20 {
        if retry.status != 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        retry = run_job(addr, "").await;
    }
    assert_eq!(retry.status, 200, "{}", retry.text());
    assert_eq!(upstream.count(), 9);
}

/// Warms up every worker's Redis connection (so that a claim sent while Redis is paused runs when it resumes).
async fn warm_up(addr: SocketAddr) {
    for i in 0..8 {
        let body = format!("jobId=5&appId=1&instanceParams=warm-{i}");
        assert_eq!(run_job_body(addr, &body, "").await.status, 200);
    }
}

/// On a `fail-open` route the call goes ahead on the in-process fallback when the claim times out: should that
/// claim still run on Redis, its record stays (and turns unknown with its lease), so that another replica
/// never sends the call a second time.
#[tokio::test]
async fn a_fail_open_claim_that_ran_late_is_kept_for_the_other_replicas() {
    let redis = RedisServer::start();
    let upstream = RawUpstream::start(|_| Script::Answer(ok_answer(""))).await;
    let url = redis.url();
    let flags = [
        "--store",
        url.as_str(),
        "--store-timeout",
        "200ms",
        "--lease",
        "2s",
    ];
    let mut open = flags.to_vec();
    open.extend(["--on-store-error", "fail-open"]);
    let (a, b) = (
        proxy(&[upstream.url()], &open),
        proxy(&[upstream.url()], &flags),
    );
    warm_up(a.addr("proxy")).await;
    redis.pause();
    let led = run_job(a.addr("proxy"), "").await;
    assert_eq!(led.status, 200, "fail-open forwards: {}", led.text());
    redis.resume();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let other = run_job(b.addr("proxy"), "").await;
    assert_eq!(other.status, 409, "{}", other.text());
    assert_eq!(upstream.count(), 9, "the call reached the upstream once");
}

/// The whole leader call (head, then body) is bounded by one `upstream_timeout`, not one per part.
#[tokio::test]
async fn the_whole_leader_call_is_bounded_by_upstream_timeout() {
    // The head after 1.2 s, then part of the body, then nothing: head and body each within 1.5 s.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stalling = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                tokio::time::sleep(Duration::from_millis(1200)).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n{\"success\":")
                    .await;
                tokio::time::sleep(Duration::from_secs(10)).await;
            });
        }
    });
    let proxy = proxy(
        &[url(stalling)],
        &["--upstream-timeout", "1500ms", "--wait-timeout", "1500ms"],
    );
    let started = std::time::Instant::now();
    let answer = run_job(proxy.addr("proxy"), "").await;
    let took = started.elapsed();
    assert_eq!(answer.status, 504, "{}", answer.text());
    assert!(
        took < Duration::from_millis(2500),
        "bounded by one upstream_timeout (1.5 s), took {took:?}"
    );
    // The message names the upstream that stalled, once.
    let message = answer.json().unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains(&format!("upstream http://{stalling}")),
        "{message}"
    );
    assert!(!message.contains("upstream upstream"), "{message}");
}

#[tokio::test]
async fn a_wait_timeout_shorter_than_upstream_timeout_is_refused() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_runonce"))
        .args([
            "serve",
            "--upstream",
            "http://127.0.0.1:9",
            "--wait-timeout",
            "1s",
            "--upstream-timeout",
            "2s",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("wait_timeout"), "{stderr}");
}

/// A caller told 409 (still in flight) is owed the answer: its retry is replayed, on any replica, even after
/// the leader's own client received it. Replica B waits less than replica A's call takes.
#[tokio::test]
async fn a_caller_told_409_is_owed_the_answer_on_any_replica() {
    let redis = RedisServer::start();
    let upstream =
        RawUpstream::start(|_| Script::Slow(Duration::from_millis(1200), ok_answer(""))).await;
    let store = redis.url();
    let a = proxy(&[upstream.url()], &["--store", &store]);
    let b = proxy(
        &[upstream.url()],
        &[
            "--store",
            &store,
            "--wait-timeout",
            "300ms",
            "--upstream-timeout",
            "300ms",
        ],
    );
    let (a_addr, b_addr) = (a.addr("proxy"), b.addr("proxy"));
    let leader = tokio::spawn(async move { run_job(a_addr, "").await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let told = run_job(b_addr, "").await;
    assert_eq!(told.status, 409, "{}", told.text());
    assert_eq!(told.json().unwrap()["code"], "RUNONCE_IN_FLIGHT");
    let leader = leader.await.unwrap();
    assert_eq!(leader.status, 200);
    // The leader's client received its answer; the caller told to retry does so, on either replica.
    for addr in [b_addr, a_addr] {
        let retry = run_job(addr, "").await;
        assert_eq!(retry.status, 200, "{}", retry.text());
        assert_eq!(retry.exact("Idempotent-Replayed"), Some("true"));
        assert_eq!(
            retry.json().unwrap()["data"],
            leader.json().unwrap()["data"]
        );
    }
    assert_eq!(upstream.count(), 1);
}

/// With `auth_header = "preserve"` the 5.1.0 client's re-send (same payload, after `/authApp`) is recognised
/// on every replica: behind a load balancer `/authApp` lands on one and the re-send on another.
#[tokio::test]
async fn the_510_resend_is_recognised_across_replicas() {
    let redis = RedisServer::start();
    let upstream = RawUpstream::start(|request| {
        if String::from_utf8_lossy(request).contains("/openApi/authApp") {
            let body = r#"{"success":true,"data":{"appId":1,"token":"t2","extra":null},"message":null,"code":null}"#;
            Script::Answer(pj(body))
        } else {
            Script::Answer(ok_answer(""))
        }
    })
    .await;
    let store = redis.url();
    let flags = ["--store", store.as_str(), "--auth-header", "preserve"];
    let (a, b) = (
        proxy(&[upstream.url()], &flags),
        proxy(&[upstream.url()], &flags),
    );
    let (a_addr, b_addr) = (a.addr("proxy"), b.addr("proxy"));
    // The 5.1.0 sequence: runJob (answered, no auth header), /authApp, the same runJob with a new token;
    // each step through another replica, and the other way round.
    for (i, (first, auth, resend)) in [(a_addr, b_addr, a_addr), (b_addr, a_addr, b_addr)]
        .into_iter()
        .enumerate()
    {
        let body = format!("jobId=5&delay=0&appId=1&instanceParams=lb-{i}");
        let original = run_job_body(first, &body, "X-POWERJOB-ACCESS-TOKEN: t1\r\n").await;
        assert_eq!(original.status, 200);
        let auth_app = br#"{"appName":"my-app","encryptedPassword":"e10adc3949ba59abbe56e057f20f883e","encryptType":"md5"}"#;
        let request = format!(
            "POST /openApi/authApp HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            auth_app.len()
        );
        let mut request = request.into_bytes();
        request.extend_from_slice(auth_app);
        assert_eq!(raw(auth, &request).await.unwrap().status, 200);
        let resent = run_job_body(resend, &body, "X-POWERJOB-ACCESS-TOKEN: t2\r\n").await;
        assert_eq!(resent.status, 200);
        assert_eq!(
            resent.exact("Idempotent-Replayed"),
            Some("true"),
            "case {i}"
        );
        assert_eq!(
            resent.json().unwrap()["data"],
            original.json().unwrap()["data"]
        );
    }
    let run_jobs = (0..upstream.count())
        .filter(|&i| upstream.request(i).contains("/openApi/runJob"))
        .count();
    assert_eq!(run_jobs, 2, "one runJob per logical call");
}

/// A client whose timeout fires while the answer is in transit (the 5.1.x client gives a whole call 2 s) has
/// not received it: its retry is replayed, not run as a new call.
#[tokio::test]
async fn an_answer_the_client_gave_up_on_is_not_delivered() {
    use tokio::io::AsyncWriteExt;
    let upstream =
        RawUpstream::start(|_| Script::Slow(Duration::from_millis(400), ok_answer(""))).await;
    let proxy = proxy(&[upstream.url()], &[]);
    let addr = proxy.addr("proxy");
    // Keep-alive, as OkHttp: the connection stays open after the answer unless the client closes it.
    let request = form_post(RUN_JOB, FORM, "")
        .into_iter()
        .collect::<Vec<u8>>();
    let request = String::from_utf8(request)
        .unwrap()
        .replace("Connection: close\r\n", "");
    let mut gave_up = tokio::net::TcpStream::connect(addr).await.unwrap();
    gave_up.write_all(request.as_bytes()).await.unwrap();
    // The answer reaches the client's socket, but the call timeout fires before the client reads it: it
    // closes the socket with the answer unread, and its system sends a reset.
    tokio::time::sleep(Duration::from_millis(600)).await;
    drop(gave_up);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let retry = run_job(addr, "").await;
    assert_eq!(retry.status, 200, "{}", retry.text());
    assert_eq!(retry.exact("Idempotent-Replayed"), Some("true"));
    assert_eq!(upstream.count(), 1, "the retry was not a new call");
}

/// An answer is delivered once confirmed: the connection carries the client's next request, or stays open
/// without a reset for the grace, or closes cleanly after the client read it. Then an identical call is a
/// new call (a deliberate repeat).
#[tokio::test]
async fn a_confirmed_delivery_makes_an_identical_call_a_new_call() {
    use tokio::io::AsyncWriteExt;
    let upstream = RawUpstream::start(|_| Script::Answer(ok_answer(""))).await;
    let proxy = proxy(&[upstream.url()], &[]);
    let addr = proxy.addr("proxy");
    let keep_alive = |body: &str| {
        format!(
            "POST {RUN_JOB} HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    // The next request on the same connection confirms the first answer.
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = "jobId=5&delay=0&appId=1&instanceParams=next";
    conn.write_all(keep_alive(body).as_bytes()).await.unwrap();
    let first = read_response(&mut conn).await.unwrap();
    conn.write_all(keep_alive(body).as_bytes()).await.unwrap();
    let second = read_response(&mut conn).await.unwrap();
    assert_eq!(second.exact("Idempotent-Replayed"), None);
    assert_ne!(second.json().unwrap()["data"], serde_json::Value::Null);
    assert_eq!(first.status, 200);
    // A connection that stays open, read, without a reset: delivered after the grace.
    let body = "jobId=5&delay=0&appId=1&instanceParams=open";
    let mut open = tokio::net::TcpStream::connect(addr).await.unwrap();
    open.write_all(keep_alive(body).as_bytes()).await.unwrap();
    read_response(&mut open).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let again = run_job_body(addr, body, "").await;
    assert_eq!(again.exact("Idempotent-Replayed"), None, "a new call");
    // Read, then closed cleanly (Connection: close).
    let body = "jobId=5&delay=0&appId=1&instanceParams=closed";
    run_job_body(addr, body, "").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let again = run_job_body(addr, body, "").await;
    assert_eq!(again.exact("Idempotent-Replayed"), None, "a new call");
    assert_eq!(upstream.count(), 6);
    drop(open);
}

/// The mock creates the instance, then answers as PowerJob does when a forward timed out, the dispatch after
/// the insert failed, the server failed, or a hop in front of it gave up; or it never answers. Five identical
/// calls at once and a retry after: one instance, at the default settings and on Redis.
async fn the_mock_creates_then_answers_badly(store: &[&str]) {
    for (i, fault) in [
        "timeout-after-create",
        "error-after-create",
        "5xx-after-create",
        "502-after-create",
        "504-after-create",
        "stall-after-create",
    ]
    .into_iter()
    .enumerate()
    {
        let mock = mock_with(
            "v5.1.1-auth-off",
            &["--latency-ms", "300", "--fault", fault],
        );
        let mut flags = store.to_vec();
        flags.extend(["--upstream-timeout", "2s", "--wait-timeout", "2s"]);
        let proxy = proxy(&[url(mock.addr("mock"))], &flags);
        let addr = proxy.addr("proxy");
        let body = format!("jobId=5&delay=0&appId=1&instanceParams=mock-{i}");
        let calls: Vec<_> = (0..5)
            .map(|n| {
                let body = body.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(if n == 0 { 0 } else { 100 })).await;
                    run_job_body(addr, &body, "").await
                })
            })
            .collect();
        let mut statuses = Vec::new();
        for call in calls {
            statuses.push(call.await.unwrap().status);
        }
        statuses.dedup();
        assert_eq!(
            statuses.len(),
            1,
            "{fault}: one outcome shared by all: {statuses:?}"
        );
        let retry = run_job_body(addr, &body, "").await;
        assert_eq!(retry.status, 409, "{fault}: {}", retry.text());
        let stats = mock_stats(mock.addr("mock")).await;
        assert_eq!(stats["instances"], 1, "{fault}: {stats}");
    }
}

#[tokio::test]
async fn the_mock_creates_then_answers_badly_on_the_memory_store() {
    the_mock_creates_then_answers_badly(&[]).await;
}

#[tokio::test]
async fn the_mock_creates_then_answers_badly_on_redis() {
    let redis = RedisServer::start();
    let url = redis.url();
    the_mock_creates_then_answers_badly(&["--store", &url]).await;
}
