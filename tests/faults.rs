//! Faults under load, with real processes: Redis restarted, Redis paused past the lease, the upstream killed
//! mid-call and restarted, one of two proxies SIGKILLed mid-storm, clients that hang up while their leader's
//! call runs.
//!
//! After each: no instance created twice (the mock's `instances_by_job`: at most one per set of duplicates;
//! every proxy runs with `after_delivery = replay`, so a duplicate never counts as a deliberate repeat), every
//! request either answered or refused with a status and a PowerJob-shaped body (none hangs: every exchange is
//! bounded by [`STEP`]; a connection closed without an answer counts only where the test itself caused it),
//! and the proxy still serving. The figures are printed (`cargo test --test faults -- --nocapture`).
//!
//! What `replicas.rs` and `engine.rs` already cover is not repeated: Redis down (fail-closed / fail-open), a lone
//! leader's proxy killed, a lone caller hanging up on the memory store.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use support::redis::RedisServer;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const RUN_JOB: &str = "/openApi/runJob";

fn body(job: u64) -> String {
    format!("jobId={job}&delay=0&appId=1&instanceParams=faults")
}

/// What the clients of one scenario saw.
#[derive(Default)]
struct Tally {
    sent: usize,
    by_status: BTreeMap<u16, usize>,
    /// Connections that ended without an answer (only where the test caused it).
    closed: usize,
}

impl Tally {
    /// Counts one exchange; an answer must be PowerJob-shaped: `success:true` on 200, else
    /// `success:false` with a `RUNONCE_…` code.
    fn add(&mut self, outcome: std::io::Result<RawResponse>) -> Option<RawResponse> {
        self.sent += 1;
        let response = match outcome {
            Ok(response) => response,
            Err(err) => {
                assert_ne!(
                    err.kind(),
                    std::io::ErrorKind::TimedOut,
                    "a request hung past {STEP:?}"
                );
                self.closed += 1;
                return None;
            }
        };
        let json = response
            .json()
            .unwrap_or_else(|e| panic!("{} without a JSON body: {e}", response.status));
        if response.status == 200 {
            assert_eq!(json["success"], true, "{json}");
        } else {
            assert_eq!(json["success"], false, "{json}");
            let code = json["code"].as_str().unwrap_or_default();
            assert!(code.starts_with("RUNONCE_"), "{}: {json}", response.status);
        }
        *self.by_status.entry(response.status).or_default() += 1;
        Some(response)
    }

    fn answered(&self) -> usize {
        self.by_status
            .iter()
            .filter(|(s, _)| (200..300).contains(*s))
            .map(|(_, n)| n)
            .sum()
    }

    fn refused(&self) -> usize {
        self.sent - self.answered() - self.closed
    }

    /// Prints the figures, and checks that at most one instance was created per job of `jobs`.
    async fn report(&self, scenario: &str, mock: SocketAddr, jobs: &[u64]) -> u64 {
        let stats = mock_stats(mock).await;
        let created: Vec<u64> = jobs
            .iter()
            .map(|job| {
                stats["instances_by_job"][job.to_string()]
                    .as_u64()
                    .unwrap_or(0)
            })
            .collect();
        let total: u64 = created.iter().sum();
        eprintln!(
            "{scenario}: sent {}, answered {}, refused {} {:?}, closed {}, instances created {total} for {} jobs",
            self.sent,
            self.answered(),
            self.refused(),
            self.by_status,
            self.closed,
            jobs.len()
        );
        for (job, n) in jobs.iter().zip(&created) {
            assert!(
                *n <= 1,
                "{scenario}: job {job} created {n} instances: {stats}"
            );
        }
        total
    }
}

/// Waits until the mock has created an instance for `job` (the call reached the server), at most 10 s.
async fn until_created(mock: SocketAddr, job: u64) -> serde_json::Value {
    for _ in 0..500 {
        let stats = mock_stats(mock).await;
        if stats["instances_by_job"][job.to_string()] == 1 {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("job {job} never reached the mock");
}

async fn run_job(addr: SocketAddr, job: u64) -> std::io::Result<RawResponse> {
    raw(addr, &form_post(RUN_JOB, &body(job), "")).await
}

/// `runonce serve` in front of `mock` on the store at `store`, replaying duplicates for the whole window.
fn guarded_proxy(mock: &Process, store: &str, extra: &[&str]) -> Process {
    let mut args = vec!["--store", store, "--after-delivery", "replay"];
    args.extend_from_slice(extra);
    proxy(&[url(mock.addr("mock"))], &args)
}

/// Polls until `call` answers 200 (at most 15 s).
async fn until_served(addr: SocketAddr, job: u64) -> RawResponse {
    for _ in 0..150 {
        if let Ok(answer) = run_job(addr, job).await {
            if answer.status == 200 {
                return answer;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the proxy did not serve job {job} again");
}

/// Sends every job of `jobs` once per wave, `waves` waves `every` apart, spread over `proxies`; each request is
/// a task. Returns the tasks in sending order.
fn load(
    proxies: &[SocketAddr],
    jobs: std::ops::Range<u64>,
    waves: usize,
    every: Duration,
) -> tokio::task::JoinHandle<Vec<std::io::Result<RawResponse>>> {
    let proxies = proxies.to_vec();
    tokio::spawn(async move {
        let mut calls = Vec::new();
        for wave in 0..waves {
            for (i, job) in jobs.clone().enumerate() {
                let addr = proxies[(wave + i) % proxies.len()];
                calls.push(tokio::spawn(run_job(addr, job)));
            }
            tokio::time::sleep(every).await;
        }
        let mut outcomes = Vec::new();
        for call in calls {
            outcomes.push(call.await.expect("request task"));
        }
        outcomes
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_under_load() {
    // Redis with an append-only file: a crash and restart keeps every acknowledged claim (without one, a
    // restart forgets the keys and no proxy can tell a duplicate from a new call; README says so).
    let redis = RedisServer::start_persistent();
    let mock = mock("v5.1.1-auth-off", 1500);
    let flags = ["--store-timeout", "300ms", "--lease", "1s"];
    let a = guarded_proxy(&mock, &redis.url(), &flags);
    let b = guarded_proxy(&mock, &redis.url(), &flags);
    let proxies = [a.addr("proxy"), b.addr("proxy")];
    let jobs = 100..120;
    // 20 jobs × 15 waves, 200 ms apart: 3 s of duplicates; Redis is down for about a second in the middle.
    let traffic = load(&proxies, jobs.clone(), 15, Duration::from_millis(200));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let redis = tokio::task::spawn_blocking(move || {
        let mut redis = redis;
        redis.stop();
        std::thread::sleep(Duration::from_millis(1000));
        redis.restart();
        redis
    })
    .await
    .unwrap();
    let mut tally = Tally::default();
    for outcome in traffic.await.unwrap() {
        tally.add(outcome);
    }
    assert_eq!(tally.closed, 0, "every request was answered or refused");
    assert!(
        tally.by_status.contains_key(&503),
        "some requests met the outage: {:?}",
        tally.by_status
    );
    let created = tally
        .report(
            "redis restarted under load",
            mock.addr("mock"),
            &jobs.collect::<Vec<_>>(),
        )
        .await;
    assert!(created >= 1);
    for proxy in proxies {
        until_served(proxy, 500).await;
    }
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_longer_than_the_lease() {
    let redis = RedisServer::start();
    let mock = mock("v5.1.1-auth-off", 3000);
    let flags = ["--store-timeout", "300ms", "--lease", "1s"];
    let a = guarded_proxy(&mock, &redis.url(), &flags);
    let b = guarded_proxy(&mock, &redis.url(), &flags);
    let proxies = [a.addr("proxy"), b.addr("proxy")];
    // The leader's call runs 3 s; Redis freezes for 2.5 s of it (more than twice the lease).
    let leader = tokio::spawn(run_job(proxies[0], 7));
    until_created(mock.addr("mock"), 7).await;
    let waiter = tokio::spawn(run_job(proxies[1], 7));
    tokio::time::sleep(Duration::from_millis(200)).await;
    redis.pause();
    // Duplicates and other calls while Redis is frozen.
    let during = load(&proxies, 7..11, 3, Duration::from_millis(500));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    redis.resume();
    let mut tally = Tally::default();
    let led = tally
        .add(leader.await.unwrap())
        .expect("the leader answered");
    assert_eq!(
        led.status, 200,
        "the leader's client gets the server's answer"
    );
    tally.add(waiter.await.unwrap());
    for outcome in during.await.unwrap() {
        tally.add(outcome);
    }
    // After: the leader's outcome could not be recorded under a lapsed lease, so its key is unknown.
    let mut retries = Vec::new();
    for proxy in proxies {
        let retry = tally.add(run_job(proxy, 7).await).expect("answered");
        retries.push(retry.status);
    }
    assert_eq!(tally.closed, 0);
    assert!(
        retries.iter().all(|s| *s == 409 || *s == 200),
        "a retry is refused as unknown or replayed, never re-run: {retries:?}"
    );
    let created = tally
        .report(
            "redis paused past the lease",
            mock.addr("mock"),
            &[7, 8, 9, 10],
        )
        .await;
    assert!(created >= 1);
    let stats = mock_stats(mock.addr("mock")).await;
    assert_eq!(stats["instances_by_job"]["7"], 1, "{stats}");
    for proxy in proxies {
        until_served(proxy, 501).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_the_store_missed_is_recorded_when_it_comes_back_within_the_lease() {
    let redis = RedisServer::start();
    let mock = mock("v5.1.1-auth-off", 1500);
    let proxy = guarded_proxy(
        &mock,
        &redis.url(),
        &["--store-timeout", "300ms", "--lease", "6s"],
    );
    let addr = proxy.addr("proxy");
    let leader = tokio::spawn(run_job(addr, 21));
    until_created(mock.addr("mock"), 21).await;
    // Redis freezes while the call runs: the leader's answer cannot be stored when it comes.
    redis.pause();
    let led = leader.await.unwrap().expect("the leader answered");
    assert_eq!(
        led.status,
        200,
        "the client gets the server's answer at once: {}",
        led.text()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.resume();
    // Well within the 6 s lease: the retried write lands, and a duplicate gets the answer, not 409 unknown.
    let again = run_job(addr, 21).await.expect("answered");
    assert_eq!(again.status, 200, "{}", again.text());
    assert_eq!(again.exact("Idempotent-Replayed"), Some("true"));
    assert_eq!(again.json().unwrap()["data"], led.json().unwrap()["data"]);
    let stats = mock_stats(mock.addr("mock")).await;
    assert_eq!(stats["instances_by_job"]["21"], 1, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_killed_mid_call_and_restarted() {
    let redis = RedisServer::start();
    let mut mock = mock("v5.1.1-auth-off", 4000);
    let mock_addr = mock.addr("mock");
    let proxy = guarded_proxy(&mock, &redis.url(), &[]);
    let addr = proxy.addr("proxy");
    let calls: Vec<_> = (0..10).map(|_| tokio::spawn(run_job(addr, 3))).collect();
    // The mock creates the instance on receipt, then takes 4 s to answer: kill it in between.
    let created_before_kill = until_created(mock_addr, 3).await;
    mock.child.kill().expect("SIGKILL the upstream");
    let _ = mock.child.wait();
    let mut tally = Tally::default();
    for call in calls {
        tally.add(call.await.unwrap());
    }
    assert_eq!(tally.closed, 0);
    // The leader's answer broke off: it and the duplicates that waited for it share that outcome (502); any
    // that arrived after it ended find the key unknown (409). Never a second call.
    let shared = tally.by_status.get(&502).copied().unwrap_or(0);
    let late = tally.by_status.get(&409).copied().unwrap_or(0);
    assert!(shared >= 1 && shared + late == 10, "{:?}", tally.by_status);

    // The same server comes back on the same address.
    let restarted = Process::start(
        &[
            "mock-powerjob",
            "--listen",
            &mock_addr.to_string(),
            "--mode",
            "v5.1.1-auth-off",
        ],
        &[],
    );
    for _ in 0..5 {
        let retry = tally.add(run_job(addr, 3).await).expect("answered");
        assert_eq!(retry.status, 409, "{}", retry.text());
        assert_eq!(retry.json().unwrap()["code"], "RUNONCE_OUTCOME_UNKNOWN");
    }
    let other = until_served(addr, 4).await;
    tally.add(Ok(other));
    let after = mock_stats(restarted.addr("mock")).await;
    eprintln!("before the kill: {created_before_kill}");
    let created_after = tally
        .report(
            "upstream killed mid-call (restarted mock)",
            restarted.addr("mock"),
            &[3, 4],
        )
        .await;
    assert_eq!(
        after["instances_by_job"]["3"],
        serde_json::Value::Null,
        "job 3 was never re-sent: {after}"
    );
    assert_eq!(created_after, 1, "job 4 only");
    eprintln!(
        "instances created in all: {} (job 3 once before the kill, job 4 once after)",
        1 + created_after
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_proxies_sigkilled_mid_storm() {
    let redis = RedisServer::start();
    let mock = mock("v5.1.1-auth-off", 1500);
    let flags = ["--store-timeout", "300ms", "--lease", "1s"];
    let mut a = guarded_proxy(&mock, &redis.url(), &flags);
    let b = guarded_proxy(&mock, &redis.url(), &flags);
    let proxies = [a.addr("proxy"), b.addr("proxy")];
    let jobs = 200..210;
    let storm = load(&proxies, jobs.clone(), 10, Duration::from_millis(100));
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.child.kill().expect("SIGKILL proxy a");
    let _ = a.child.wait();
    let outcomes = storm.await.unwrap();
    let mut on_a = Tally::default();
    let mut on_b = Tally::default();
    // `load` alternates proxies by (wave + job index): recover which one each request went to.
    let per_wave = jobs.clone().count();
    for (n, outcome) in outcomes.into_iter().enumerate() {
        let (wave, i) = (n / per_wave, n % per_wave);
        if (wave + i) % 2 == 0 {
            on_a.add(outcome);
        } else {
            on_b.add(outcome);
        }
    }
    assert_eq!(on_b.closed, 0, "the surviving proxy answered every request");
    let mut retries = Tally::default();
    for job in jobs.clone() {
        let retry = retries
            .add(run_job(proxies[1], job).await)
            .expect("answered");
        assert!(
            retry.status == 200 || retry.status == 409,
            "job {job}: {}",
            retry.text()
        );
    }
    let job_list: Vec<u64> = jobs.collect();
    eprintln!(
        "to the killed proxy: sent {}, answered {}, refused {}, closed by the kill {}",
        on_a.sent,
        on_a.answered(),
        on_a.refused(),
        on_a.closed
    );
    on_b.report(
        "proxy SIGKILLed mid-storm (survivor)",
        mock.addr("mock"),
        &job_list,
    )
    .await;
    retries
        .report(
            "proxy SIGKILLed mid-storm (retries after)",
            mock.addr("mock"),
            &job_list,
        )
        .await;
    until_served(proxies[1], 502).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_hang_up_while_their_leaders_call_runs() {
    let redis = RedisServer::start();
    let mock = mock("v5.1.1-auth-off", 1000);
    let a = guarded_proxy(&mock, &redis.url(), &[]);
    let b = guarded_proxy(&mock, &redis.url(), &[]);
    let proxies = [a.addr("proxy"), b.addr("proxy")];
    // The leader and nine duplicates hang up 200 ms in; ten other duplicates stay.
    let mut leavers = Vec::new();
    let first = TcpStream::connect(proxies[0]).await.unwrap();
    leavers.push(first);
    leavers[0]
        .write_all(&form_post(RUN_JOB, &body(9), ""))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    for i in 0..9 {
        let mut stream = TcpStream::connect(proxies[i % 2]).await.unwrap();
        stream
            .write_all(&form_post(RUN_JOB, &body(9), ""))
            .await
            .unwrap();
        leavers.push(stream);
    }
    let stayers: Vec<_> = (0..10)
        .map(|i| tokio::spawn(run_job(proxies[i % 2], 9)))
        .collect();
    until_created(mock.addr("mock"), 9).await;
    let hung_up = leavers.len();
    drop(leavers);
    let mut tally = Tally::default();
    let mut ids = Vec::new();
    for call in stayers {
        let answer = tally.add(call.await.unwrap()).expect("answered");
        assert_eq!(answer.status, 200, "{}", answer.text());
        ids.push(answer.json().unwrap()["data"].clone());
    }
    let retry = tally.add(run_job(proxies[1], 9).await).expect("answered");
    assert_eq!(retry.exact("Idempotent-Replayed"), Some("true"));
    ids.push(retry.json().unwrap()["data"].clone());
    ids.dedup();
    assert_eq!(ids.len(), 1, "everyone got the one instance: {ids:?}");
    eprintln!("clients that hung up mid-call: {hung_up}");
    let created = tally
        .report("clients hang up mid-call", mock.addr("mock"), &[9])
        .await;
    assert_eq!(created, 1);
    until_served(proxies[0], 503).await;
}
