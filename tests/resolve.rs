//! When runonce cannot know, PowerJob decides (issue "PowerJob decides"): an unknown `runJob` is resolved by
//! asking the server's `queryInstance` (5.1.1+). Real `runonce` and `mock-powerjob` processes; the mock creates
//! the instance and then answers badly (or not at all), as a real server behind a slow forward or a hop does.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use support::*;

const RUN_JOB: &str = "/openApi/runJob";
const FORM: &str = "jobId=5&delay=0&appId=1&instanceParams=%7B%22k%22%3A%22v%22%7D";
/// resolve_after in these tests.
const AFTER: Duration = Duration::from_millis(1500);

async fn run_job(proxy: SocketAddr) -> RawResponse {
    raw(proxy, &form_post(RUN_JOB, FORM, ""))
        .await
        .expect("runJob answer")
}

/// The mock with `fault` on its first instance-creating call.
fn faulty_mock(mode: &str, fault: &str) -> Process {
    faulty_mock_with(mode, fault, &[])
}

/// The mock with `fault` once, and more flags.
fn faulty_mock_with(mode: &str, fault: &str, extra: &[&str]) -> Process {
    let mut flags = vec!["--fault", fault, "--fault-count", "1"];
    flags.extend_from_slice(extra);
    mock_with(mode, &flags)
}

fn resolving_proxy(mock: &Process) -> Process {
    proxy_resolving_after(mock, "1500ms")
}

/// The proxy with short timeouts, resolving `resolve_after` after a call turned unknown.
fn proxy_resolving_after(mock: &Process, resolve_after: &str) -> Process {
    proxy(
        &[url(mock.addr("mock"))],
        &[
            "--upstream-timeout",
            "1s",
            "--wait-timeout",
            "1s",
            "--resolve-after",
            resolve_after,
        ],
    )
}

/// Every instance of job 5 the mock holds, asked the way a client would.
async fn instances_of_job_5(mock: SocketAddr) -> Vec<i64> {
    let body = r#"{"appIdEq":1,"jobIdEq":5,"pageSize":100}"#;
    let request = format!(
        "POST /openApi/queryInstance HTTP/1.1\r\nHost: m\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let answer = raw(mock, request.as_bytes()).await.unwrap();
    answer.json().unwrap()["data"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["instanceId"].as_i64().unwrap())
        .collect()
}

async fn run_jobs_sent(mock: SocketAddr) -> u64 {
    mock_stats(mock).await["requests_by_path"]["/openApi/runJob"]
        .as_u64()
        .unwrap_or(0)
}

/// The first call creates the instance and gets `first_status`; a duplicate after `resolve_after` gets 200
/// with that instance's id, never a second instance.
async fn created_then_resolved(fault: &str, first_status: u16) {
    let mock = faulty_mock("v5.1.1-auth-off", fault);
    let proxy = resolving_proxy(&mock);
    let addr = proxy.addr("proxy");
    let first = run_job(addr).await;
    assert_eq!(first.status, first_status, "{fault}: {}", first.text());
    let early = run_job(addr).await;
    assert_eq!(early.status, 409, "{fault}: unknown until resolve_after");
    tokio::time::sleep(AFTER).await;
    let duplicate = run_job(addr).await;
    assert_eq!(duplicate.status, 200, "{fault}: {}", duplicate.text());
    let created = instances_of_job_5(mock.addr("mock")).await;
    assert_eq!(created.len(), 1, "{fault}: one instance");
    assert_eq!(duplicate.json().unwrap()["data"].as_i64(), Some(created[0]));
    assert_eq!(duplicate.exact("X-POWERJOB-AUTH-PASSED"), Some("true"));
    assert_eq!(
        run_jobs_sent(mock.addr("mock")).await,
        1,
        "{fault}: sent once"
    );
}

#[tokio::test]
async fn a_timeout_after_the_instance_was_created_resolves_to_its_id() {
    created_then_resolved("stall-after-create", 504).await;
}

#[tokio::test]
async fn a_forward_timeout_answer_after_create_resolves_to_its_id() {
    created_then_resolved("timeout-after-create", 200).await;
}

#[tokio::test]
async fn a_hops_504_after_create_resolves_to_its_id() {
    created_then_resolved("504-after-create", 504).await;
}

#[tokio::test]
async fn sent_but_never_created_is_released_and_runs_once_more() {
    let mock = faulty_mock("v5.1.1-auth-off", "close-without-create");
    let proxy = resolving_proxy(&mock);
    let addr = proxy.addr("proxy");
    let first = run_job(addr).await;
    assert_eq!(first.status, 502, "{}", first.text());
    tokio::time::sleep(AFTER).await;
    let retry = run_job(addr).await;
    assert_eq!(retry.status, 200, "{}", retry.text());
    assert_eq!(instances_of_job_5(mock.addr("mock")).await.len(), 1);
    assert_eq!(run_jobs_sent(mock.addr("mock")).await, 2);
}

#[tokio::test]
async fn two_matching_instances_stay_unknown_and_are_never_sent_again() {
    let mock = faulty_mock("v5.1.1-auth-off", "stall-after-create");
    let proxy = resolving_proxy(&mock);
    let addr = proxy.addr("proxy");
    assert_eq!(run_job(addr).await.status, 504);
    // The same job with the same parameters, run by someone else meanwhile.
    let outside = "jobId=5&appId=1&delay=0&instanceParams=%7B%22k%22%3A%22v%22%7D";
    let created = raw(
        mock.addr("mock"),
        &form_post("/mock/create-instance", outside, ""),
    )
    .await
    .unwrap();
    assert_eq!(created.status, 200, "{}", created.text());
    tokio::time::sleep(AFTER).await;
    for _ in 0..2 {
        let duplicate = run_job(addr).await;
        assert_eq!(duplicate.status, 409, "{}", duplicate.text());
        assert_eq!(duplicate.json().unwrap()["code"], "RUNONCE_OUTCOME_UNKNOWN");
    }
    assert_eq!(run_jobs_sent(mock.addr("mock")).await, 1);
    // The leader's own resolution and the duplicates', within resolve_after of each other: asked once.
    assert_eq!(queries_sent(mock.addr("mock")).await, 1);
}

#[tokio::test]
async fn a_510_server_cannot_be_asked_and_the_key_stays_unknown() {
    let mock = faulty_mock("v5.1.0-auth-off", "stall-after-create");
    let proxy = resolving_proxy(&mock);
    let addr = proxy.addr("proxy");
    assert_eq!(run_job(addr).await.status, 504);
    tokio::time::sleep(AFTER).await;
    let duplicate = run_job(addr).await;
    assert_eq!(duplicate.status, 409, "{}", duplicate.text());
    assert_eq!(run_jobs_sent(mock.addr("mock")).await, 1);
}

/// The leader asks by itself, `resolve_after` after its call turned unknown: no duplicate needed.
#[tokio::test]
async fn the_leader_resolves_its_own_unknown_call() {
    let mock = faulty_mock("v5.1.1-auth-off", "stall-after-create");
    let proxy = resolving_proxy(&mock);
    let (addr, admin) = (proxy.addr("proxy"), proxy.addr("admin"));
    assert_eq!(run_job(addr).await.status, 504);
    let listed = |answer: RawResponse| -> u64 {
        let json: Value = answer.json().unwrap();
        json["count"].as_u64().unwrap()
    };
    assert_eq!(
        listed(admin_call(admin, "GET", "/keys?state=unknown", "").await),
        1
    );
    tokio::time::sleep(AFTER + Duration::from_millis(700)).await;
    assert_eq!(
        listed(admin_call(admin, "GET", "/keys?state=unknown", "").await),
        0
    );
    assert_eq!(
        listed(admin_call(admin, "GET", "/keys?state=done", "").await),
        1
    );
    let scrape = admin_call(admin, "GET", "/metrics", "").await.text();
    assert!(
        scrape.contains("runonce_resolutions_total{result=\"done\"} 1"),
        "{scrape}"
    );
}

async fn queries_sent(mock: SocketAddr) -> u64 {
    mock_stats(mock).await["requests_by_path"]["/openApi/queryInstance"]
        .as_u64()
        .unwrap_or(0)
}

/// Replicas on the store at `store`, whose duplicates wait long enough for a resolution (1.5 s after the
/// call turned unknown), and take every identical call for a retry (`after_delivery = "replay"`).
fn dead_leader_flags(store: &str) -> [&str; 10] {
    [
        "--store",
        store,
        "--upstream-timeout",
        "1s",
        "--wait-timeout",
        "5s",
        "--resolve-after",
        "1500ms",
        "--after-delivery",
        "replay",
    ]
}

/// Duplicates that arrive while one of them asks PowerJob wait for that answer: one query, however many
/// duplicates. The leader's replica is gone (a dead leader's key), so only the duplicates ask. Every identical
/// call is a retry here (`after_delivery = "replay"`): by default one that connects only after another
/// duplicate received the resolved answer would be a deliberate repeat, a new call.
#[tokio::test]
async fn concurrent_duplicates_of_a_dead_leaders_key_ask_powerjob_once() {
    let redis = support::redis::RedisServer::start();
    let mock = faulty_mock("v5.1.1-auth-off", "stall-after-create");
    let (upstream, store) = ([url(mock.addr("mock"))], redis.url());
    let flags = dead_leader_flags(&store);
    let leader = proxy(&upstream, &flags);
    assert_eq!(run_job(leader.addr("proxy")).await.status, 504);
    drop(leader);
    let other = proxy(&upstream, &flags);
    tokio::time::sleep(AFTER).await;
    let before = queries_sent(mock.addr("mock")).await;
    let addr = other.addr("proxy");
    let duplicates: Vec<_> = (0..10).map(|_| tokio::spawn(run_job(addr))).collect();
    let mut answers = Vec::new();
    for duplicate in duplicates {
        answers.push(duplicate.await.unwrap());
    }
    all_got_the_one_instance_asked_once(&mock, before, &answers).await;
}

/// Every answer is the one instance the mock holds, PowerJob was asked once since `before` queries, and the
/// call was sent once.
async fn all_got_the_one_instance_asked_once(mock: &Process, before: u64, answers: &[RawResponse]) {
    // Read before the test's own query below.
    let asked = queries_sent(mock.addr("mock")).await - before;
    let created = instances_of_job_5(mock.addr("mock")).await;
    assert_eq!(created.len(), 1);
    for answer in answers {
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(answer.json().unwrap()["data"].as_i64(), Some(created[0]));
    }
    assert_eq!(asked, 1, "one query for every duplicate");
    assert_eq!(run_jobs_sent(mock.addr("mock")).await, 1);
}

/// The key of the one unknown record, from the admin listing.
async fn the_unknown_key(admin: SocketAddr) -> String {
    let listed = admin_call(admin, "GET", "/keys?state=unknown", "").await;
    let json: Value = listed.json().unwrap();
    assert_eq!(json["count"], 1, "{}", listed.text());
    json["keys"][0]["key"].as_str().unwrap().to_string()
}

/// A proxy whose leaders do not resolve by themselves within the test (resolve_after 1 min).
fn patient_proxy(mock: &Process) -> Process {
    proxy_resolving_after(mock, "60s")
}

#[tokio::test]
async fn an_operator_resolves_an_unknown_key_by_its_key() {
    let mock = faulty_mock("v5.1.1-auth-off", "stall-after-create");
    let proxy = patient_proxy(&mock);
    let (addr, admin) = (proxy.addr("proxy"), proxy.addr("admin"));
    assert_eq!(run_job(addr).await.status, 504);
    let key = the_unknown_key(admin).await;
    // The leader keeps its lookup with the record right after the outcome: allow it a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let path = format!("/keys/{key}/resolve");
    let resolved = admin_call(admin, "POST", &path, "").await;
    assert_eq!(resolved.status, 200, "{}", resolved.text());
    let created = instances_of_job_5(mock.addr("mock")).await;
    let json: Value = resolved.json().unwrap();
    assert_eq!(
        (
            json["result"].as_str(),
            json["instance"].as_i64(),
            json["state"].as_str()
        ),
        (Some("done"), Some(created[0]), Some("done")),
        "{json}"
    );
    let duplicate = run_job(addr).await;
    assert_eq!(duplicate.json().unwrap()["data"].as_i64(), Some(created[0]));
    assert_eq!(run_jobs_sent(mock.addr("mock")).await, 1);
    // Done now: nothing to resolve; and a key must be one.
    assert_eq!(admin_call(admin, "POST", &path, "").await.status, 409);
    assert_eq!(
        admin_call(admin, "POST", "/keys/abc/resolve", "")
            .await
            .status,
        400
    );
    let absent = format!("/keys/{}/resolve", "0".repeat(64));
    assert_eq!(admin_call(admin, "POST", &absent, "").await.status, 404);
}

/// With auth on, the operator's query carries the app's credentials: a forged token resolves nothing and
/// gets the server's refusal; the app's token resolves the key.
#[tokio::test]
async fn with_auth_on_an_operator_resolves_only_with_the_apps_token() {
    let mock = faulty_mock("auth-on", "stall-after-create");
    let proxy = patient_proxy(&mock);
    let (addr, admin) = (proxy.addr("proxy"), proxy.addr("admin"));
    let token = app_token(mock.addr("mock")).await;
    let first = raw(addr, &form_post(RUN_JOB, FORM, &credentials(&token)))
        .await
        .unwrap();
    assert_eq!(first.status, 504, "{}", first.text());
    let key = the_unknown_key(admin).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let path = format!("/keys/{key}/resolve");
    let forged = admin_call(admin, "POST", &path, &credentials("forged")).await;
    assert_eq!(forged.status, 403, "{}", forged.text());
    let json: Value = forged.json().unwrap();
    assert_eq!(
        (json["result"].as_str(), json["state"].as_str()),
        (Some("refused"), Some("unknown"))
    );
    let accepted = admin_call(admin, "POST", &path, &credentials(&token)).await;
    assert_eq!(accepted.status, 200, "{}", accepted.text());
    assert_eq!(accepted.json().unwrap()["result"], "done");
    assert_eq!(run_jobs_sent(mock.addr("mock")).await, 1);
}

/// An operator may ask before `resolve_after`, but "nothing yet" is not "nothing": the server may still create
/// the instance (a forward can take 5 s), so the key stays unknown and no duplicate reaches the server.
#[tokio::test]
async fn an_operator_asking_early_finds_nothing_yet_and_releases_nothing() {
    let mock = faulty_mock("v5.1.1-auth-off", "close-without-create");
    let proxy = patient_proxy(&mock);
    let (addr, admin) = (proxy.addr("proxy"), proxy.addr("admin"));
    assert_eq!(run_job(addr).await.status, 502);
    let key = the_unknown_key(admin).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let asked = admin_call(admin, "POST", &format!("/keys/{key}/resolve"), "").await;
    assert_eq!(asked.status, 200, "{}", asked.text());
    let json: Value = asked.json().unwrap();
    assert_eq!(
        (json["result"].as_str(), json["state"].as_str()),
        (Some("nothing yet"), Some("unknown")),
        "{json}"
    );
    let duplicate = run_job(addr).await;
    assert_eq!(duplicate.status, 409, "{}", duplicate.text());
    assert_eq!(run_jobs_sent(mock.addr("mock")).await, 1);
}

/// Two logical calls with the same payload under two `Idempotency-Key`s, on two replicas: the first was sent
/// and never created (the server closed after reading it), the second created its instance. The first's
/// resolution finds that instance in its window, but it is the other key's: the first is released and runs,
/// once; it never takes the other call's id.
#[tokio::test]
async fn another_keys_instance_is_not_taken_for_this_ones() {
    let redis = support::redis::RedisServer::start();
    let mock = faulty_mock("v5.1.1-auth-off", "close-without-create");
    let store = redis.url();
    let flags = [
        "--store",
        store.as_str(),
        "--upstream-timeout",
        "1s",
        "--wait-timeout",
        "1s",
        "--resolve-after",
        "1500ms",
    ];
    let upstream = [url(mock.addr("mock"))];
    let (a, b) = (proxy(&upstream, &flags), proxy(&upstream, &flags));
    let keyed = |addr: SocketAddr, key: &'static str| async move {
        raw(
            addr,
            &form_post(RUN_JOB, FORM, &format!("Idempotency-Key: {key}\r\n")),
        )
        .await
        .unwrap()
    };
    let first = keyed(a.addr("proxy"), "first").await;
    assert_eq!(first.status, 502, "{}", first.text());
    let second = keyed(b.addr("proxy"), "second").await;
    assert_eq!(second.status, 200, "{}", second.text());
    let theirs = second.json().unwrap()["data"].as_i64().unwrap();
    tokio::time::sleep(AFTER + Duration::from_millis(500)).await;
    let retry = keyed(a.addr("proxy"), "first").await;
    assert_eq!(retry.status, 200, "{}", retry.text());
    let ours = retry.json().unwrap()["data"].as_i64().unwrap();
    assert_ne!(ours, theirs, "the other key's instance");
    assert_eq!(instances_of_job_5(mock.addr("mock")).await.len(), 2);
    assert_eq!(run_jobs_sent(mock.addr("mock")).await, 3);
}

/// Duplicates that arrive on two replicas while one of them asks PowerJob wait for that answer, whichever
/// replica they reach: one query (slow here, 0.7 s), one instance, the same id for both.
#[tokio::test]
async fn duplicates_on_another_replica_wait_for_the_resolution_under_way() {
    let redis = support::redis::RedisServer::start();
    let mock = faulty_mock_with(
        "v5.1.1-auth-off",
        "stall-after-create",
        &["--query-latency-ms", "700"],
    );
    let (upstream, store) = ([url(mock.addr("mock"))], redis.url());
    let flags = dead_leader_flags(&store);
    let leader = proxy(&upstream, &flags);
    assert_eq!(run_job(leader.addr("proxy")).await.status, 504);
    drop(leader);
    let (b, c) = (proxy(&upstream, &flags), proxy(&upstream, &flags));
    tokio::time::sleep(AFTER).await;
    let before = queries_sent(mock.addr("mock")).await;
    let on_b = tokio::spawn(run_job(b.addr("proxy")));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let on_c = tokio::spawn(run_job(c.addr("proxy")));
    let answers = [on_b.await.unwrap(), on_c.await.unwrap()];
    all_got_the_one_instance_asked_once(&mock, before, &answers).await;
}

/// The leader's own asking failed (the server answered 500): it asks again, twice as late, and the key
/// resolves with no duplicate and no person.
#[tokio::test]
async fn a_failed_asking_is_tried_again_by_the_leader() {
    let mock = faulty_mock_with(
        "v5.1.1-auth-off",
        "stall-after-create",
        &["--query-failures", "1"],
    );
    let proxy = resolving_proxy(&mock);
    let (addr, admin) = (proxy.addr("proxy"), proxy.addr("admin"));
    assert_eq!(run_job(addr).await.status, 504);
    let state_count = |state: &'static str| async move {
        let listed = admin_call(admin, "GET", &format!("/keys?state={state}"), "").await;
        listed.json().unwrap()["count"].as_u64().unwrap()
    };
    // First asked at 1.5 s (and failed), again at 4.5 s.
    tokio::time::sleep(AFTER + Duration::from_millis(700)).await;
    assert_eq!(queries_sent(mock.addr("mock")).await, 1);
    assert_eq!(state_count("unknown").await, 1, "the asking failed");
    tokio::time::sleep(AFTER * 2).await;
    assert_eq!(state_count("done").await, 1, "asked again");
    assert_eq!(queries_sent(mock.addr("mock")).await, 2);
    let scrape = admin_call(admin, "GET", "/metrics", "").await.text();
    assert!(
        scrape.contains("runonce_resolutions_total{result=\"failed\"} 1")
            && scrape.contains("runonce_resolutions_total{result=\"done\"} 1"),
        "{scrape}"
    );
}
