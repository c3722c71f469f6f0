//! The idempotency engine on the embedded memory store: real `runonce` and `mock-powerjob` processes, raw sockets.
//!
//! Each test counts what reached the server (the mock's `/mock/stats`, or a scripted upstream's request log),
//! so a de-duplication that did not happen, or one that swallowed a call it should not, fails the test.

mod support;

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use support::*;

const RUN_JOB: &str = "/openApi/runJob";
const FORM: &str = "jobId=5&delay=0&appId=1&instanceParams=%7B%22k%22%3A%22v%20w%22%7D";

async fn run_job(proxy: std::net::SocketAddr, body: &str, extra: &str) -> RawResponse {
    raw(proxy, &form_post(RUN_JOB, body, extra))
        .await
        .expect("runJob answer")
}

/// A header runonce wrote itself (hyper writes those names in lower case).
fn any_case(response: &RawResponse, name: &str) -> Option<String> {
    response.header_lines().into_iter().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.eq_ignore_ascii_case(name)
            .then(|| value.trim().to_string())
    })
}

async fn instances(mock: &Process) -> u64 {
    mock_stats(mock.addr("mock")).await["instances"]
        .as_u64()
        .unwrap()
}

#[tokio::test]
async fn a_storm_of_200_concurrent_duplicates_creates_one_instance() {
    let mock = mock("v5.1.1-auth-off", 1000);
    let proxy = proxy(&[url(mock.addr("mock"))], &[]);
    let addr = proxy.addr("proxy");
    // All 200 requests but their last byte first, then the last bytes together: the duplicates arrive well
    // within the leader's 1 s however loaded the machine is (a later one would be a new call by design).
    let request = form_post(RUN_JOB, FORM, "");
    let (head, last) = request.split_at(request.len() - 1);
    let mut streams = Vec::new();
    for _ in 0..200 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(head).await.unwrap();
        streams.push(stream);
    }
    for stream in &mut streams {
        stream.write_all(last).await.unwrap();
    }
    let calls: Vec<_> = streams
        .into_iter()
        .map(|mut stream| tokio::spawn(async move { read_response(&mut stream).await }))
        .collect();
    let mut ids = Vec::new();
    let mut replayed = 0;
    for call in calls {
        let answer = call.await.unwrap().expect("runJob answer");
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(answer.exact("X-POWERJOB-AUTH-PASSED"), Some("true"));
        replayed += usize::from(answer.exact("Idempotent-Replayed") == Some("true"));
        ids.push(
            answer.json().unwrap()["data"]
                .as_i64()
                .expect("an instance id"),
        );
    }
    assert_eq!(instances(&mock).await, 1);
    ids.dedup();
    assert_eq!(ids.len(), 1, "every answer carries the one instance's id");
    assert!(ids[0] > 1 << 53);
    assert_eq!(
        replayed, 199,
        "all but the leader's answer are shared copies"
    );
}

#[tokio::test]
async fn a_deliberate_repeat_runs_but_the_same_idempotency_key_replays() {
    let mock = mock("v5.1.1-auth-off", 0);
    let proxy = proxy(&[url(mock.addr("mock"))], &[]);
    let addr = proxy.addr("proxy");

    let first = run_job(addr, FORM, "").await;
    let second = run_job(addr, FORM, "").await;
    assert_eq!(
        instances(&mock).await,
        2,
        "the first answer was delivered: an identical call is a new call"
    );
    assert_ne!(
        first.json().unwrap()["data"],
        second.json().unwrap()["data"]
    );
    assert_eq!(second.exact("Idempotent-Replayed"), None);

    let key = "Idempotency-Key: 0f6e4c9a-1\r\n";
    let first = run_job(addr, FORM, key).await;
    let second = run_job(addr, FORM, key).await;
    assert_eq!(instances(&mock).await, 3, "one instance for the keyed pair");
    assert_eq!(
        first.json().unwrap()["data"],
        second.json().unwrap()["data"]
    );
    assert_eq!(first.exact("Idempotent-Replayed"), None);
    assert_eq!(second.exact("Idempotent-Replayed"), Some("true"));
    // The replay keeps the header names' case byte for byte.
    assert_eq!(second.exact("X-POWERJOB-AUTH-PASSED"), Some("true"));
}

#[tokio::test]
async fn a_caller_that_disconnects_gets_the_stored_answer_on_retry() {
    let mock = mock("v5.1.1-auth-off", 800);
    let proxy = proxy(&[url(mock.addr("mock"))], &[]);
    let addr = proxy.addr("proxy");
    {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut stream, &form_post(RUN_JOB, FORM, ""))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Gone before the answer: the leader's call goes on without it.
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(instances(&mock).await, 1);
    let retry = run_job(addr, FORM, "").await;
    assert_eq!(retry.status, 200);
    assert_eq!(retry.exact("Idempotent-Replayed"), Some("true"));
    assert_eq!(instances(&mock).await, 1, "the retry got the stored answer");
    // That replay was delivered: an identical call now is a deliberate repeat.
    let repeat = run_job(addr, FORM, "").await;
    assert_eq!(repeat.exact("Idempotent-Replayed"), None);
    assert_ne!(
        repeat.json().unwrap()["data"],
        retry.json().unwrap()["data"]
    );
    assert_eq!(instances(&mock).await, 2);
}

#[tokio::test]
async fn different_jobs_params_or_delays_are_different_calls() {
    let mock = mock("v5.1.1-auth-off", 0);
    // Replays within the window, so only a different key can explain a new instance.
    let proxy = proxy(&[url(mock.addr("mock"))], &["--after-delivery", "replay"]);
    let addr = proxy.addr("proxy");
    let bodies = [
        "jobId=5&delay=0&appId=1",
        "jobId=6&delay=0&appId=1",
        "jobId=5&delay=1000&appId=1",
        "jobId=5&delay=0&appId=1&instanceParams=a",
        "jobId=5&delay=0&appId=1&instanceParams=b",
    ];
    for body in bodies {
        assert_eq!(run_job(addr, body, "").await.status, 200);
    }
    assert_eq!(instances(&mock).await, 5);
    // The same calls again: replays, in the OkHttp encoding or not (`delay` absent = 0).
    run_job(addr, "appId=1&jobId=5", "").await;
    run_job(addr, "jobId=5&delay=0&appId=1&instanceParams=a", "").await;
    assert_eq!(instances(&mock).await, 5);
}

#[tokio::test]
async fn after_the_window_an_identical_call_creates_a_new_instance() {
    let mock = mock("v5.1.1-auth-off", 0);
    let proxy = proxy(
        &[url(mock.addr("mock"))],
        &["--after-delivery", "replay", "--window", "1s"],
    );
    let addr = proxy.addr("proxy");
    let first = run_job(addr, FORM, "").await;
    let within = run_job(addr, FORM, "").await;
    assert_eq!(
        within.json().unwrap()["data"],
        first.json().unwrap()["data"]
    );
    assert_eq!(instances(&mock).await, 1);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let after = run_job(addr, FORM, "").await;
    assert_ne!(after.json().unwrap()["data"], first.json().unwrap()["data"]);
    assert_eq!(instances(&mock).await, 2);
}

/// Two identical calls through a proxy that would replay a stored answer; returns how many reached upstream.
async fn twice_against(answer: Vec<u8>) -> (usize, RawResponse) {
    let upstream = RawUpstream::start(move |_| Script::Answer(answer.clone())).await;
    let proxy = proxy(&[upstream.url()], &["--after-delivery", "replay"]);
    let first = run_job(proxy.addr("proxy"), FORM, "").await;
    run_job(proxy.addr("proxy"), FORM, "").await;
    (upstream.count(), first)
}

fn answer(status: &str, extra: &str, body: &str) -> Vec<u8> {
    format!("HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{body}", body.len())
        .into_bytes()
}

#[tokio::test]
async fn only_a_definite_success_is_stored() {
    let (sent, _) = twice_against(ok_answer("")).await;
    assert_eq!(sent, 1, "success:true is stored and replayed");

    let failed = r#"{"success":false,"data":null,"message":"IllegalArgumentException: can't find job by jobId: 5"}"#;
    let (sent, first) = twice_against(answer("200 OK", "", failed)).await;
    assert_eq!(sent, 2, "success:false created nothing: released");
    assert_eq!(
        first.json().unwrap()["success"],
        false,
        "the answer reaches the client as it came"
    );

    let refused = r#"{"success":false,"data":null,"message":"INVALID_TOKEN"}"#;
    let (sent, first) = twice_against(answer(
        "200 OK",
        "X-POWERJOB-AUTH-PASSED: false\r\n",
        refused,
    ))
    .await;
    assert_eq!(sent, 2, "auth false: released");
    assert_eq!(
        first.exact("X-POWERJOB-AUTH-PASSED"),
        Some("false"),
        "a false is never turned true"
    );

    let (sent, first) = twice_against(answer(
        "500 Internal Server Error",
        "",
        r#"{"success":false}"#,
    ))
    .await;
    assert_eq!(
        sent, 1,
        "5xx: the server may have acted; unknown, never re-sent"
    );
    assert_eq!(first.status, 500);
}

#[tokio::test]
async fn a_call_whose_answer_was_lost_is_never_sent_again() {
    // The upstream reads the request, then hangs up: it may have created the instance.
    let upstream = RawUpstream::start(|_| Script::Hangup).await;
    let proxy = proxy(&[upstream.url()], &[]);
    let first = run_job(proxy.addr("proxy"), FORM, "").await;
    assert_eq!(first.status, 502, "{}", first.text());
    assert_eq!(first.json().unwrap()["code"], "RUNONCE_UPSTREAM_BROKEN");
    let retry = run_job(proxy.addr("proxy"), FORM, "").await;
    assert_eq!(retry.status, 409);
    assert_eq!(retry.json().unwrap()["code"], "RUNONCE_OUTCOME_UNKNOWN");
    assert_eq!(retry.json().unwrap()["success"], false);
    let after: u64 = any_case(&retry, "Retry-After")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=60).contains(&after), "{after}");
    assert_eq!(upstream.count(), 1, "the unknown call was not re-sent");
}

#[tokio::test]
async fn an_upstream_that_cannot_be_reached_releases_the_key() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = proxy(&[url(closed)], &[]);
    for _ in 0..2 {
        let answer = run_job(proxy.addr("proxy"), FORM, "").await;
        assert_eq!(answer.status, 502);
        assert_eq!(
            answer.json().unwrap()["code"],
            "RUNONCE_UPSTREAM_UNREACHABLE",
            "never sent: not unknown"
        );
    }
}

#[tokio::test]
async fn an_idempotency_key_reused_with_another_payload_is_refused_naming_the_fields() {
    let mock = mock("v5.1.1-auth-off", 0);
    let proxy = proxy(&[url(mock.addr("mock"))], &[]);
    let addr = proxy.addr("proxy");
    let key = "Idempotency-Key: order-77\r\n";
    assert_eq!(
        run_job(addr, "jobId=5&delay=0&appId=1", key).await.status,
        200
    );
    let other = run_job(addr, "jobId=6&delay=0&appId=1&instanceParams=x", key).await;
    assert_eq!(other.status, 422);
    assert_eq!(
        other.json().unwrap()["code"],
        "RUNONCE_IDEMPOTENCY_KEY_REUSED"
    );
    let message = other.json().unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains("instanceParams, jobId"), "{message}");
    assert_eq!(instances(&mock).await, 1);

    let bad = run_job(
        addr,
        FORM,
        &format!("Idempotency-Key: {}\r\n", "k".repeat(300)),
    )
    .await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json().unwrap()["code"], "RUNONCE_BAD_IDEMPOTENCY_KEY");
}

#[tokio::test]
async fn a_duplicate_waits_for_the_whole_leader_call() {
    // wait_timeout is never shorter than upstream_timeout, which bounds the leader's whole call: a duplicate
    // sees the call's end and shares its answer (409 "still in flight" is left to a replica that waits less).
    let mock = mock("v5.1.1-auth-off", 1500);
    let proxy = proxy(
        &[url(mock.addr("mock"))],
        &["--wait-timeout", "2s", "--upstream-timeout", "2s"],
    );
    let addr = proxy.addr("proxy");
    let leader = tokio::spawn(async move { run_job(addr, FORM, "").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let waiter = run_job(addr, FORM, "").await;
    assert_eq!(waiter.status, 200, "{}", waiter.text());
    assert_eq!(waiter.exact("Idempotent-Replayed"), Some("true"));
    let leader = leader.await.unwrap();
    assert_eq!(leader.status, 200);
    assert_eq!(
        waiter.json().unwrap()["data"],
        leader.json().unwrap()["data"]
    );
    assert_eq!(instances(&mock).await, 1);
}

#[tokio::test]
async fn updates_pass_and_unguarded_routes_are_not_keyed() {
    let upstream = RawUpstream::start(|_| Script::Answer(ok_answer(""))).await;
    let proxy = proxy(&[upstream.url()], &["--after-delivery", "replay"]);
    let addr = proxy.addr("proxy");
    let save = |body: &'static str| {
        format!("POST /openApi/saveJob HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
    };
    for _ in 0..2 {
        raw(addr, save(r#"{"id":3,"appId":1,"jobName":"a"}"#).as_bytes())
            .await
            .unwrap();
    }
    assert_eq!(
        upstream.count(),
        2,
        "saveJob with an id updates: not guarded"
    );
    for _ in 0..2 {
        raw(addr, save(r#"{"appId":1,"jobName":"a"}"#).as_bytes())
            .await
            .unwrap();
    }
    assert_eq!(
        upstream.count(),
        3,
        "saveJob without an id creates: guarded"
    );
    for _ in 0..2 {
        raw(
            addr,
            &form_post("/openApi/fetchInstanceStatus", "instanceId=1&appId=1", ""),
        )
        .await
        .unwrap();
    }
    assert_eq!(upstream.count(), 5, "reads pass through");
}

#[tokio::test]
async fn the_510_clients_resend_after_auth_app_is_recognised_when_the_header_is_not_repaired() {
    use runonce::sim::client::{Client510, ClientConfig};
    let mock = mock("v5.1.0-auth-off", 0);
    // Without the repair the 5.1.0 client re-sends each runJob after /authApp: the re-send signature.
    let proxy = proxy(&[url(mock.addr("mock"))], &["--auth-header", "preserve"]);
    let config = ClientConfig::new(vec![proxy.addr("proxy").to_string()], "my-app", "123456");
    let mut client = Client510::connect(config).await.expect("client");
    let result = client.run_job(5, "", 0).await.unwrap();
    assert!(result.success);
    let stats = mock_stats(mock.addr("mock")).await;
    assert_eq!(stats["requests_by_path"]["/openApi/runJob"], 1, "{stats}");
    assert_eq!(stats["instances"], 1);
}

#[tokio::test]
async fn with_the_header_repaired_an_identical_call_after_auth_app_is_a_new_call() {
    use runonce::sim::client::{Client510, ClientConfig};
    let mock = mock("v5.1.0-auth-off", 0);
    let proxy = proxy(&[url(mock.addr("mock"))], &[]);
    let config = ClientConfig::new(vec![proxy.addr("proxy").to_string()], "my-app", "123456");
    // Connecting calls /authApp; two deliberate runJob follow within a second.
    let mut client = Client510::connect(config).await.expect("client");
    let first = client.run_job(5, "", 0).await.unwrap();
    let second = client.run_job(5, "", 0).await.unwrap();
    assert_ne!(first.data_i64(), second.data_i64());
    let stats = mock_stats(mock.addr("mock")).await;
    assert_eq!(stats["instances"], 2, "{stats}");
}

#[tokio::test]
async fn every_spelling_the_server_reads_as_run_job_is_guarded_and_repaired() {
    // The mock reads paths as PowerJob's Tomcat/Spring stack does, so each spelling runs a job there.
    let mock = mock("v5.1.0-auth-off", 0);
    let proxy = proxy(&[url(mock.addr("mock"))], &[]);
    let addr = proxy.addr("proxy");
    let key = "Idempotency-Key: spellings-1\r\n";
    let spellings = [
        "/openApi/runJob",
        "/%6FpenApi/run%4Aob",
        "/x/../openApi/runJob",
        "//openApi//runJob/",
        "/openApi;a=b/runJob;jsessionid=1",
    ];
    let mut ids = Vec::new();
    for path in spellings {
        let answer = raw(addr, &form_post(path, FORM, key)).await.unwrap();
        assert_eq!(answer.status, 200, "{path}: {}", answer.text());
        assert_eq!(
            answer.exact("X-POWERJOB-AUTH-PASSED"),
            Some("true"),
            "{path}: the auth header is repaired"
        );
        ids.push(answer.json().unwrap()["data"].clone());
    }
    assert_eq!(instances(&mock).await, 1, "one instance for every spelling");
    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");
}
