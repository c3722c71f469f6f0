//! Replicas sharing Redis: real `runonce` processes, a real `redis-server` (or a three-node Redis Cluster)
//! started by the test on free ports, the mock PowerJob server, and the 5.1.0 client emulation.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use runonce::sim::client::{Client510, ClientConfig};
use support::redis::{RedisCluster, RedisServer};
use support::*;

const RUN_JOB: &str = "/openApi/runJob";
const FORM: &str = "jobId=5&delay=0&appId=1&instanceParams=replicas";

async fn run_job(proxy: SocketAddr) -> RawResponse {
    raw(proxy, &form_post(RUN_JOB, FORM, ""))
        .await
        .expect("runJob answer")
}

/// Two `runonce` replicas in front of `mock`, sharing the store at `store_url`, with extra `flags`.
fn two_replicas(store_url: &str, mock: &Process, flags: &[&str]) -> (Process, Process) {
    let mut args = vec!["--store", store_url];
    args.extend_from_slice(flags);
    let upstream = [url(mock.addr("mock"))];
    (proxy(&upstream, &args), proxy(&upstream, &args))
}

async fn instances(mock: &Process) -> u64 {
    mock_stats(mock.addr("mock")).await["instances"]
        .as_u64()
        .unwrap()
}

/// Sends `n` identical `runJob` at once, spread over `proxies`; returns the instance ids answered.
async fn storm(proxies: &[SocketAddr], n: usize) -> Vec<i64> {
    let calls: Vec<_> = (0..n)
        .map(|i| {
            let addr = proxies[i % proxies.len()];
            tokio::spawn(async move { run_job(addr).await })
        })
        .collect();
    let mut ids = Vec::new();
    for call in calls {
        let answer = call.await.unwrap();
        assert_eq!(answer.status, 200, "{}", answer.text());
        ids.push(
            answer.json().unwrap()["data"]
                .as_i64()
                .expect("an instance id"),
        );
    }
    ids.sort();
    ids.dedup();
    ids
}

#[tokio::test]
async fn the_510_client_failing_over_between_two_proxies_creates_one_instance() {
    let redis = RedisServer::start();
    // Slower than the client's 2 s call timeout: it gives up on the first proxy and sends to the second.
    let mock = mock("v5.1.0-auth-off", 3000);
    let (a, b) = two_replicas(&redis.url(), &mock, &[]);
    let addresses = vec![a.addr("proxy").to_string(), b.addr("proxy").to_string()];
    let mut client = Client510::connect(ClientConfig::new(addresses, "my-app", "123456"))
        .await
        .expect("client");
    let result = client
        .run_job(5, "", 0)
        .await
        .expect("runJob through the second proxy");
    assert!(result.success, "{result:?}");
    assert!(
        client
            .log()
            .iter()
            .any(|line| line.contains("server change")),
        "the client failed over: {:?}",
        client.log()
    );
    let stats = mock_stats(mock.addr("mock")).await;
    assert_eq!(stats["requests_by_path"][RUN_JOB], 1, "{stats}");
    assert_eq!(stats["instances"], 1);
    let created = stats["instances_by_job"]["5"].as_u64();
    assert_eq!(created, Some(1), "{stats}");
    let id = result.data_i64().expect("instance id");
    assert!(
        instance_exists(&mock, id, 5).await,
        "the client got the one instance's id"
    );
}

/// Whether the mock knows an instance with this id, created for `job`.
async fn instance_exists(mock: &Process, id: i64, job: i64) -> bool {
    let body = format!("instanceId={id}&appId=1");
    let info = raw(
        mock.addr("mock"),
        &form_post("/openApi/fetchInstanceInfo", &body, ""),
    )
    .await
    .expect("fetchInstanceInfo")
    .json()
    .unwrap();
    info["success"] == true && info["data"]["jobId"] == job
}

#[tokio::test]
async fn a_storm_split_over_two_proxies_on_one_redis_creates_one_instance() {
    let redis = RedisServer::start();
    let mock = mock("v5.1.1-auth-off", 1000);
    let (a, b) = two_replicas(&redis.url(), &mock, &[]);
    let ids = storm(&[a.addr("proxy"), b.addr("proxy")], 200).await;
    assert_eq!(ids.len(), 1, "every answer carries the one id: {ids:?}");
    assert_eq!(instances(&mock).await, 1);
}

#[tokio::test]
async fn a_storm_on_redis_cluster_creates_one_instance() {
    let cluster = RedisCluster::start(3);
    let mock = mock("v5.1.1-auth-off", 1000);
    let (a, b) = two_replicas(&cluster.url(), &mock, &[]);
    let ids = storm(&[a.addr("proxy"), b.addr("proxy")], 200).await;
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(instances(&mock).await, 1);
    // Different calls spread over the slots stay different.
    for job in 6..12 {
        let body = format!("jobId={job}&delay=0&appId=1");
        let answer = raw(a.addr("proxy"), &form_post(RUN_JOB, &body, ""))
            .await
            .unwrap();
        assert_eq!(answer.status, 200);
    }
    assert_eq!(instances(&mock).await, 7);
}

#[tokio::test]
async fn a_leader_killed_mid_call_leaves_the_key_unknown_and_nothing_is_sent_again() {
    let redis = RedisServer::start();
    let mock = mock("v5.1.1-auth-off", 3000);
    let flags = ["--lease", "1s", "--store-timeout", "300ms"];
    let (mut a, b) = two_replicas(&redis.url(), &mock, &flags);
    let a_addr = a.addr("proxy");
    let lost = tokio::spawn(async move { raw(a_addr, &form_post(RUN_JOB, FORM, "")).await });
    // The mock creates the instance on receipt, then waits 3 s: kill the leader's proxy in between.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(instances(&mock).await, 1);
    a.child.kill().expect("SIGKILL the leader's proxy");
    let _ = a.child.wait();
    assert!(
        lost.await.unwrap().is_err(),
        "the killed proxy answered nothing"
    );

    // A retry on the other replica: the lease runs out, the outcome is unknown, and it is not re-sent.
    let retry = run_job(b.addr("proxy")).await;
    assert_eq!(retry.status, 409, "{}", retry.text());
    assert_eq!(retry.json().unwrap()["code"], "RUNONCE_OUTCOME_UNKNOWN");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let later = run_job(b.addr("proxy")).await;
    assert_eq!(later.status, 409);
    let stats = mock_stats(mock.addr("mock")).await;
    assert_eq!(stats["requests_by_path"][RUN_JOB], 1, "{stats}");
    assert_eq!(stats["instances"], 1);
}

/// Polls until `call` answers 200 (Redis came back and runonce reconnected), at most 15 s.
async fn until_ok(proxy: SocketAddr, body: &str) -> RawResponse {
    for _ in 0..150 {
        let answer = raw(proxy, &form_post(RUN_JOB, body, "")).await.unwrap();
        if answer.status == 200 {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("runonce did not recover after Redis came back");
}

#[tokio::test]
async fn redis_down_fail_closed_refuses_and_forwards_nothing_then_recovers() {
    let mut redis = RedisServer::start();
    let mock = mock("v5.1.1-auth-off", 0);
    let store = redis.url();
    let proxy = proxy(
        &[url(mock.addr("mock"))],
        &["--store", &store, "--store-timeout", "300ms"],
    );
    let addr = proxy.addr("proxy");
    assert_eq!(run_job(addr).await.status, 200);
    redis.stop();
    for body in [
        "jobId=5&appId=1&instanceParams=down1",
        "jobId=5&appId=1&instanceParams=down2",
    ] {
        let answer = raw(addr, &form_post(RUN_JOB, body, "")).await.unwrap();
        assert_eq!(answer.status, 503, "{}", answer.text());
        assert_eq!(answer.json().unwrap()["code"], "RUNONCE_STORE_UNAVAILABLE");
    }
    // Unguarded routes do not need the store.
    let status = raw(
        addr,
        &form_post("/openApi/fetchInstanceStatus", "instanceId=1&appId=1", ""),
    )
    .await
    .unwrap();
    assert_eq!(status.status, 200);
    assert_eq!(
        instances(&mock).await,
        1,
        "nothing guarded was forwarded while Redis was down"
    );
    redis.restart();
    until_ok(addr, "jobId=5&appId=1&instanceParams=back").await;
    assert_eq!(instances(&mock).await, 2);
}

#[tokio::test]
async fn redis_down_fail_open_forwards_and_still_de_duplicates_in_process() {
    let mut redis = RedisServer::start();
    let mock = mock("v5.1.1-auth-off", 500);
    let store = redis.url();
    let proxy = proxy(
        &[url(mock.addr("mock"))],
        &[
            "--store",
            &store,
            "--store-timeout",
            "300ms",
            "--on-store-error",
            "fail-open",
        ],
    );
    let addr = proxy.addr("proxy");
    redis.stop();
    let ids = storm(&[addr], 20).await;
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(
        instances(&mock).await,
        1,
        "forwarded once, de-duplicated in this process"
    );
    redis.restart();
    until_ok(addr, "jobId=5&appId=1&instanceParams=back").await;
    assert_eq!(instances(&mock).await, 2);
}

#[tokio::test]
async fn fail_open_never_forwards_a_duplicate_of_a_call_it_saw_in_flight() {
    let redis = RedisServer::start();
    let mock = mock("v5.1.1-auth-off", 1500);
    let flags = ["--store-timeout", "300ms", "--on-store-error", "fail-open"];
    let (a, b) = two_replicas(&redis.url(), &mock, &flags);
    let (a_addr, b_addr) = (a.addr("proxy"), b.addr("proxy"));
    let leader = tokio::spawn(async move { run_job(a_addr).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The duplicate on the other replica finds the call in flight and waits; then Redis stops answering.
    let waiter = tokio::spawn(async move { run_job(b_addr).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.pause();
    let waited = waiter.await.unwrap();
    redis.resume();
    assert_eq!(waited.status, 503, "{}", waited.text());
    assert_eq!(waited.json().unwrap()["code"], "RUNONCE_STORE_UNAVAILABLE");
    assert_eq!(leader.await.unwrap().status, 200);
    let stats = mock_stats(mock.addr("mock")).await;
    assert_eq!(
        stats["requests_by_path"][RUN_JOB], 1,
        "fail-open did not send it twice: {stats}"
    );
}

/// How many times Redis ran each of the scripting commands since the last `CONFIG RESETSTAT`.
fn script_calls(redis: &RedisServer) -> (u64, u64) {
    let stats = redis.query(&["INFO", "commandstats"]).expect("INFO answer");
    let calls = |command: &str| {
        stats
            .lines()
            .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:calls=")))
            .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap())
    };
    (calls("evalsha"), calls("eval"))
}

#[tokio::test]
async fn a_delivered_call_costs_redis_two_scripts_and_its_delivery_is_recorded() {
    let redis = RedisServer::start();
    let mock = mock("v5.1.1-auth-off", 0);
    let proxy = proxy(&[url(mock.addr("mock"))], &["--store", &redis.url()]);
    let addr = proxy.addr("proxy");
    // Loads the scripts (the first use of each is an EVAL after a NOSCRIPT).
    assert_eq!(run_job(addr).await.status, 200);
    // Its answer is stored once its delivery is confirmed, a grace after the close.
    tokio::time::sleep(Duration::from_millis(600)).await;
    redis.query(&["CONFIG", "RESETSTAT"]).expect("reset");
    let body = "jobId=5&delay=0&appId=1&instanceParams=two-scripts";
    let first = raw(addr, &form_post(RUN_JOB, body, "")).await.unwrap();
    assert_eq!(first.status, 200);
    // Claim, then complete with the delivery in the same write once the connection confirmed it (the close
    // without a reset, a grace after it): no third script to mark it delivered.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(script_calls(&redis), (2, 0));
    // The delivery was recorded: an identical call now is a deliberate repeat, a new instance.
    let repeat = raw(addr, &form_post(RUN_JOB, body, "")).await.unwrap();
    assert_eq!(repeat.exact("Idempotent-Replayed"), None);
    assert_ne!(
        first.json().unwrap()["data"],
        repeat.json().unwrap()["data"]
    );
    assert_eq!(instances(&mock).await, 3);
}
