//! Auth-safe replays: a stored answer reaches a duplicate whose token differs from the leader's only after the
//! server accepted that token (a read-only `fetchInstanceStatus`); an invalid token gets the server's own
//! refusal, never the stored answer. Real `runonce` and `mock-powerjob --mode auth-on` processes, raw sockets.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::*;

const RUN_JOB: &str = "/openApi/runJob";
const FORM: &str = "jobId=5&delay=0&appId=1";
async fn run_job(proxy: SocketAddr, headers: &str) -> RawResponse {
    raw(proxy, &form_post(RUN_JOB, FORM, headers))
        .await
        .expect("runJob answer")
}

async fn stats(mock: &Process) -> (u64, u64, u64) {
    let stats = mock_stats(mock.addr("mock")).await;
    let path = |p: &str| stats["requests_by_path"][p].as_u64().unwrap_or(0);
    (
        stats["instances"].as_u64().unwrap(),
        path("/openApi/runJob"),
        path("/openApi/fetchInstanceStatus"),
    )
}

fn replayed(answer: &RawResponse) -> bool {
    answer.exact("Idempotent-Replayed") == Some("true")
}

#[tokio::test]
async fn waiters_with_another_token_share_the_answer_only_once_the_server_accepted_it() {
    let mock = mock("auth-on", 1500);
    let proxy = proxy(&[url(mock.addr("mock"))], &[]);
    let (m, p) = (mock.addr("mock"), proxy.addr("proxy"));
    let (leader_token, other_token) = (app_token(m).await, app_token(m).await);

    let leader_headers = credentials(&leader_token);
    let leader = tokio::spawn(async move { run_job(p, &leader_headers).await });
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Concurrent duplicates while the leader's call runs: they wait for its outcome.
    let waiters = [
        credentials(&leader_token),
        credentials(&other_token),
        credentials("forged"),
        "X-POWERJOB-APP-ID: 1\r\n".to_string(),
    ]
    .map(|headers| tokio::spawn(async move { run_job(p, &headers).await }));
    let leader = leader.await.unwrap();
    let [same, valid, forged, none] = waiters;
    let (same, valid, forged, none) = (
        same.await.unwrap(),
        valid.await.unwrap(),
        forged.await.unwrap(),
        none.await.unwrap(),
    );

    let id = leader.json().unwrap()["data"].clone();
    assert!(id.as_i64().is_some(), "{}", leader.text());
    assert_eq!(leader.exact("X-POWERJOB-AUTH-PASSED"), Some("true"));
    // The leader's own token: the shared answer, no check.
    assert!(replayed(&same));
    assert_eq!(same.json().unwrap()["data"], id);
    // Another valid token: verified, then the shared answer.
    assert!(replayed(&valid), "{}", valid.head);
    assert_eq!(valid.json().unwrap()["data"], id);
    assert_eq!(valid.exact("X-POWERJOB-AUTH-PASSED"), Some("true"));
    // A forged token: the server's own refusal, in exact case, and no instance id.
    assert!(!replayed(&forged));
    assert_eq!(forged.status, 200);
    assert_eq!(
        forged.exact("X-POWERJOB-AUTH-PASSED"),
        Some("false"),
        "{}",
        forged.head
    );
    let refusal = forged.json().unwrap();
    assert_eq!(
        (refusal["success"].clone(), refusal["code"].clone()),
        (false.into(), "-401".into())
    );
    assert!(!forged.text().contains(&id.to_string()));
    // No token at all.
    assert_eq!(none.exact("X-POWERJOB-AUTH-PASSED"), Some("false"));
    assert_eq!(none.json().unwrap()["code"], "-1002");
    assert!(!none.text().contains(&id.to_string()));

    let (instances, run_jobs, verifications) = stats(&mock).await;
    assert_eq!((instances, run_jobs), (1, 1), "duplicates never ran");
    assert_eq!(
        verifications, 3,
        "one read-only call per token that differs"
    );
}

#[tokio::test]
async fn a_stored_answer_is_replayed_to_another_token_only_while_the_server_accepts_it() {
    let mock = mock("auth-on", 0);
    // Every identical call within the window is a retry: only the token check stands between it and the answer.
    let proxy = proxy(&[url(mock.addr("mock"))], &["--after-delivery", "replay"]);
    let (m, p) = (mock.addr("mock"), proxy.addr("proxy"));
    let (leader_token, other_token) = (app_token(m).await, app_token(m).await);

    let first = run_job(p, &credentials(&leader_token)).await;
    let id = first.json().unwrap()["data"].clone();
    assert!(id.as_i64().is_some(), "{}", first.text());

    let same = run_job(p, &credentials(&leader_token)).await;
    assert!(replayed(&same));
    assert_eq!(
        stats(&mock).await,
        (1, 1, 0),
        "the leader's own token: no check"
    );

    let other = run_job(p, &credentials(&other_token)).await;
    assert!(replayed(&other), "{}", other.head);
    assert_eq!(other.json().unwrap()["data"], id);
    assert_eq!(stats(&mock).await, (1, 1, 1));

    let forged = run_job(p, &credentials("forged")).await;
    assert!(!replayed(&forged));
    assert_eq!(forged.exact("X-POWERJOB-AUTH-PASSED"), Some("false"));
    assert!(!forged.text().contains(&id.to_string()));

    // The token is revoked (expired) on the server: no verdict was cached, so it gets no replay.
    let expired = raw(
        m,
        b"POST /mock/expire-tokens HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(expired.status, 200);
    let revoked = run_job(p, &credentials(&other_token)).await;
    assert!(!replayed(&revoked), "{}", revoked.head);
    assert_eq!(revoked.exact("X-POWERJOB-AUTH-PASSED"), Some("false"));
    assert_eq!(
        revoked.json().unwrap()["code"],
        "-403",
        "{}",
        revoked.text()
    );
    assert!(!revoked.text().contains(&id.to_string()));

    let (instances, run_jobs, verifications) = stats(&mock).await;
    assert_eq!((instances, run_jobs), (1, 1));
    assert_eq!(verifications, 3);
}

#[tokio::test]
async fn with_auth_off_on_the_server_another_token_still_gets_the_replay() {
    // A 5.1.0 server with auth off checks no token and sends no auth header: the check finds nothing to
    // refuse, and the duplicate gets the stored answer (with the header repaired, as every answer).
    let mock = mock("v5.1.0-auth-off", 0);
    let proxy = proxy(&[url(mock.addr("mock"))], &["--after-delivery", "replay"]);
    let p = proxy.addr("proxy");
    let first = run_job(p, &credentials("t1")).await;
    let second = run_job(p, &credentials("t2")).await;
    assert!(replayed(&second), "{}", second.head);
    assert_eq!(
        second.json().unwrap()["data"],
        first.json().unwrap()["data"]
    );
    assert_eq!(second.exact("X-POWERJOB-AUTH-PASSED"), Some("true"));
    assert_eq!(stats(&mock).await, (1, 1, 1));
}

#[tokio::test]
async fn no_verdict_means_no_replay() {
    // The server answers runJob (auth passed) but breaks off the read-only check.
    let upstream = RawUpstream::start(|request| {
        if String::from_utf8_lossy(request).contains("fetchInstanceStatus") {
            Script::Hangup
        } else {
            Script::Answer(ok_answer("X-POWERJOB-AUTH-PASSED: true\r\n"))
        }
    })
    .await;
    let proxy = proxy(&[upstream.url()], &["--after-delivery", "replay"]);
    let p = proxy.addr("proxy");
    let first = run_job(p, &credentials("t1")).await;
    assert_eq!(first.status, 200);
    let second = run_job(p, &credentials("t2")).await;
    assert_eq!(second.status, 502, "{}", second.text());
    assert_eq!(second.json().unwrap()["code"], "RUNONCE_AUTH_UNVERIFIED");
    assert!(!second.text().contains("754612332134400064"));
    assert_eq!(upstream.count(), 2, "runJob once, the check once");
    assert!(upstream
        .request(1)
        .starts_with("POST /openApi/fetchInstanceStatus "));
    assert!(upstream
        .request(1)
        .contains("instanceId=754612332134400064"));
}

#[tokio::test]
async fn replicas_on_redis_check_the_token_of_a_duplicate_led_elsewhere() {
    let redis = support::redis::RedisServer::start();
    let mock = mock("auth-on", 1200);
    let upstream = [url(mock.addr("mock"))];
    let flags = ["--store", &redis.url(), "--after-delivery", "replay"];
    let (a, b) = (proxy(&upstream, &flags), proxy(&upstream, &flags));
    let m = mock.addr("mock");
    let (leader_token, other_token) = (app_token(m).await, app_token(m).await);

    let (pa, pb) = (a.addr("proxy"), b.addr("proxy"));
    let leader = tokio::spawn(async move { run_job(pa, &credentials(&leader_token)).await });
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Waiters on the other replica: the leader's token digest came to it through Redis.
    let forged = tokio::spawn(async move { run_job(pb, &credentials("forged")).await });
    let valid = tokio::spawn(async move { run_job(pb, &credentials(&other_token)).await });
    let (leader, forged, valid) = (
        leader.await.unwrap(),
        forged.await.unwrap(),
        valid.await.unwrap(),
    );
    let id = leader.json().unwrap()["data"].clone();
    assert!(id.as_i64().is_some(), "{}", leader.text());
    assert!(replayed(&valid), "{}", valid.head);
    assert_eq!(valid.json().unwrap()["data"], id);
    assert!(!replayed(&forged));
    assert_eq!(forged.exact("X-POWERJOB-AUTH-PASSED"), Some("false"));
    assert!(!forged.text().contains(&id.to_string()));
    assert_eq!(stats(&mock).await, (1, 1, 2));
}

/// A server that answers runJob at once (auth passed) and the read-only check only after `check_delay`.
async fn slow_check(check_delay: Duration, flags: &[&str]) -> (RawResponse, usize) {
    let upstream = RawUpstream::start(move |request| {
        let answer = ok_answer("X-POWERJOB-AUTH-PASSED: true\r\n");
        if String::from_utf8_lossy(request).contains("fetchInstanceStatus") {
            Script::Slow(check_delay, answer)
        } else {
            Script::Answer(answer)
        }
    })
    .await;
    let mut args = vec!["--after-delivery", "replay"];
    args.extend_from_slice(flags);
    let proxy = proxy(&[upstream.url()], &args);
    let p = proxy.addr("proxy");
    assert_eq!(run_job(p, &credentials("t1")).await.status, 200);
    let second = run_job(p, &credentials("t2")).await;
    (second, upstream.count())
}

fn assert_unverified(answer: &RawResponse) {
    assert_eq!(answer.status, 502, "{}", answer.text());
    assert_eq!(answer.json().unwrap()["code"], "RUNONCE_AUTH_UNVERIFIED");
    assert!(
        answer
            .header_lines()
            .iter()
            .any(|line| line.eq_ignore_ascii_case("retry-after: 1")),
        "{}",
        answer.head
    );
}

#[tokio::test]
async fn the_check_is_bounded_by_the_upstream_timeout() {
    let (answer, asked) = slow_check(Duration::from_secs(4), &["--upstream-timeout", "1s"]).await;
    assert_unverified(&answer);
    assert_eq!(asked, 2, "the check was asked once and not re-sent");
}

#[tokio::test]
async fn the_check_is_bounded_by_five_seconds_whatever_the_upstream_timeout() {
    // Past 5 s the server's late "true" comes too late: no replay.
    let (answer, asked) = slow_check(Duration::from_secs(8), &[]).await;
    assert_unverified(&answer);
    assert!(answer.text().contains("5000 ms"), "{}", answer.text());
    assert_eq!(asked, 2);
}
