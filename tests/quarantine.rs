//! A store that forgot (issue "PowerJob decides", item 4): when runonce's store loses its records (Redis
//! flushed or restarted empty, a sidecar restarted with the memory store), a retry of a call it already sent
//! would reach PowerJob again. For one window after such a loss, a new leader on a resolvable route asks
//! PowerJob first and answers with the instance the call already created. Real `runonce`, `mock-powerjob` and
//! `redis-server` processes.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::redis::{RedisCluster, RedisServer};
use support::*;

const RUN_JOB: &str = "/openApi/runJob";
const FORM: &str = "jobId=5&delay=0&appId=1&instanceParams=%7B%22k%22%3A%22v%22%7D";
const KEYED: &str = "Idempotency-Key: order-1\r\n";

async fn run_job(proxy: SocketAddr, form: &str, extra: &str) -> RawResponse {
    raw(proxy, &form_post(RUN_JOB, form, extra))
        .await
        .expect("runJob answer")
}

/// `run_job`, again while the store is unavailable (503, nothing forwarded): after a Redis restart each
/// connection of the proxy's finds out on its next operation, as a client's retry does.
async fn run_job_retrying(proxy: SocketAddr, form: &str, extra: &str) -> RawResponse {
    for _ in 0..10 {
        let answer = run_job(proxy, form, extra).await;
        if answer.status != 503 {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the store stayed unavailable")
}

/// The proxy with the quarantine at its default, on (the shared helper turns it off for other tests).
fn guarding(mock: &Process, extra: &[&str]) -> Process {
    let mut args = vec!["--quarantine", "true"];
    args.extend_from_slice(extra);
    proxy(&[url(mock.addr("mock"))], &args)
}

async fn sent(mock: SocketAddr, path: &str) -> u64 {
    mock_stats(mock).await["requests_by_path"][path]
        .as_u64()
        .unwrap_or(0)
}

/// A metric's value on the admin listener's `/metrics` (0 when absent).
async fn metric(admin: SocketAddr, line_start: &str) -> f64 {
    let scrape = admin_call(admin, "GET", "/metrics", "").await.text();
    scrape
        .lines()
        .filter(|line| line.starts_with(line_start))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits (bounded) until the proxy counted `n` store losses.
async fn losses_reach(admin: SocketAddr, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(admin, "runonce_store_losses_total").await < n {
        assert!(
            Instant::now() < deadline,
            "the loss was not detected within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The first call creates instance `id`; after the store forgot it, the retry is answered with `id` by
/// PowerJob's own record, and the call reached the server once.
async fn retried_after_the_loss_gets_the_first_instance(
    proxy: SocketAddr,
    mock: SocketAddr,
    first_id: i64,
) {
    let retry = run_job_retrying(proxy, FORM, KEYED).await;
    assert_eq!(retry.status, 200, "{}", retry.text());
    assert_eq!(retry.json().unwrap()["data"].as_i64(), Some(first_id));
    assert_eq!(retry.exact("X-Runonce-Resolved"), Some("true"));
    assert_eq!(retry.exact("X-POWERJOB-AUTH-PASSED"), Some("true"));
    assert_eq!(
        sent(mock, RUN_JOB).await,
        1,
        "the call reached PowerJob once"
    );
    // From now on the store has the key again: a further retry is a plain replay.
    let again = run_job_retrying(proxy, FORM, KEYED).await;
    assert_eq!(
        again.json().unwrap()["data"].as_i64(),
        Some(first_id),
        "{}",
        again.text()
    );
    assert_eq!(sent(mock, RUN_JOB).await, 1);
}

/// The first call; its answer is stored once its delivery is confirmed (the connection's close, then the
/// delivery grace, 250 ms): waited for, so that the loss comes after.
async fn first_call(proxy: SocketAddr) -> i64 {
    let first = run_job(proxy, FORM, KEYED).await;
    assert_eq!(first.status, 200, "{}", first.text());
    tokio::time::sleep(Duration::from_millis(600)).await;
    first.json().unwrap()["data"]
        .as_i64()
        .expect("an instance id")
}

/// The store at `store` loses the first call's record (`lose`); the loss is found and the retry gets the
/// first instance.
async fn the_store_loses_the_record(store: &str, lose: impl FnOnce()) {
    let mock = mock("v5.1.1-auth-off", 0);
    let proxy = guarding(&mock, &["--store", store]);
    let (addr, admin) = (proxy.addr("proxy"), proxy.addr("admin"));
    let id = first_call(addr).await;
    let before = metric(admin, "runonce_store_losses_total").await;
    lose();
    losses_reach(admin, before + 1.0).await;
    retried_after_the_loss_gets_the_first_instance(addr, mock.addr("mock"), id).await;
}

#[tokio::test]
async fn a_flushed_redis_is_detected_and_powerjob_answers_the_retry() {
    let redis = RedisServer::start();
    the_store_loses_the_record(&redis.url(), || {
        redis.query(&["FLUSHALL"]).expect("FLUSHALL");
    })
    .await;
}

#[tokio::test]
async fn a_redis_restarted_empty_is_detected_and_powerjob_answers_the_retry() {
    let mut redis = RedisServer::start();
    let store = redis.url();
    the_store_loses_the_record(&store, || redis.restart()).await;
}

/// Each Cluster master has its own marker: flushing the masters is found too.
#[tokio::test]
async fn a_flushed_redis_cluster_is_detected_and_powerjob_answers_the_retry() {
    let cluster = RedisCluster::start(3);
    the_store_loses_the_record(&cluster.url(), || {
        for node in &cluster.nodes {
            node.query(&["FLUSHALL"]).expect("FLUSHALL");
        }
    })
    .await;
}

#[tokio::test]
async fn a_sidecar_restarted_with_the_memory_store_asks_powerjob_first() {
    let mock = mock("v5.1.1-auth-off", 0);
    let first = guarding(&mock, &[]);
    let id = first_call(first.addr("proxy")).await;
    drop(first);
    let second = guarding(&mock, &[]);
    assert_eq!(
        metric(second.addr("admin"), "runonce_store_losses_total").await,
        1.0,
        "a memory store that just started has lost whatever its predecessor held"
    );
    retried_after_the_loss_gets_the_first_instance(second.addr("proxy"), mock.addr("mock"), id)
        .await;
}

#[tokio::test]
async fn a_new_call_in_quarantine_is_asked_about_once_then_sent() {
    let mock = mock("v5.1.1-auth-off", 0);
    let proxy = guarding(&mock, &[]);
    let other = "jobId=5&delay=0&appId=1&instanceParams=another";
    let answer = run_job(proxy.addr("proxy"), other, "").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.exact("X-Runonce-Resolved"), None);
    assert_eq!(sent(mock.addr("mock"), "/openApi/queryInstance").await, 1);
    assert_eq!(sent(mock.addr("mock"), RUN_JOB).await, 1);
    let checks = metric(
        proxy.addr("admin"),
        "runonce_quarantine_checks_total{result=\"none\"}",
    )
    .await;
    assert_eq!(checks, 1.0);
}

#[tokio::test]
async fn outside_the_quarantine_a_leader_gains_no_round_trip() {
    let mock = mock("v5.1.1-auth-off", 0);
    // The quarantine lasts one window of the key: 1 s here.
    let proxy = guarding(&mock, &["--window", "1s"]);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let answer = run_job(proxy.addr("proxy"), FORM, "").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(sent(mock.addr("mock"), "/openApi/queryInstance").await, 0);
    assert_eq!(sent(mock.addr("mock"), RUN_JOB).await, 1);
}

#[tokio::test]
async fn quarantine_can_be_turned_off() {
    let mock = mock("v5.1.1-auth-off", 0);
    let proxy = proxy(&[url(mock.addr("mock"))], &["--quarantine", "false"]);
    let answer = run_job(proxy.addr("proxy"), FORM, KEYED).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(sent(mock.addr("mock"), "/openApi/queryInstance").await, 0);
    assert_eq!(
        metric(proxy.addr("admin"), "runonce_store_losses_total").await,
        1.0,
        "the loss is still counted"
    );
}

#[tokio::test]
async fn a_server_that_cannot_look_up_is_asked_once_per_quarantine() {
    // 5.1.0 cannot bind queryInstance's body: the quarantine cannot help, and does not cost every call.
    let mock = mock("v5.1.0-auth-off", 0);
    let proxy = guarding(&mock, &[]);
    for params in ["a", "b", "c"] {
        let form = format!("jobId=5&delay=0&appId=1&instanceParams={params}");
        let answer = run_job(proxy.addr("proxy"), &form, "").await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    assert_eq!(sent(mock.addr("mock"), RUN_JOB).await, 3);
    assert_eq!(sent(mock.addr("mock"), "/openApi/queryInstance").await, 1);
}
