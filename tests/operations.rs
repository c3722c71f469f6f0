//! Operating runonce: metrics after a known traffic mix, one log line per guarded request (and no secrets in the
//! log), configuration reload on SIGHUP and `POST /reload`, and the drain on SIGTERM. Real `runonce`,
//! `mock-powerjob` and `redis-server` processes, raw sockets.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::redis::RedisServer;
use support::*;
use tokio::io::AsyncWriteExt;

const RUN_JOB: &str = "/openApi/runJob";
const FORM: &str = "jobId=5&delay=0&appId=1&instanceParams=x";

async fn run_job(proxy: SocketAddr, body: &str, extra: &str) -> RawResponse {
    raw(proxy, &form_post(RUN_JOB, body, extra))
        .await
        .expect("runJob answer")
}

async fn instances(mock: &Process) -> u64 {
    mock_stats(mock.addr("mock")).await["instances"]
        .as_u64()
        .unwrap()
}

/// The value of the sample `name` (with its labels, as rendered) in a scrape, 0 when absent.
fn sample(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .find_map(|line| {
            let value = line.strip_prefix(name)?.strip_prefix(' ')?;
            value.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0.0)
}

async fn scrape(admin: SocketAddr) -> String {
    let answer = admin_call(admin, "GET", "/metrics", "").await;
    assert_eq!(answer.status, 200);
    answer.text()
}

fn requests(route: &str, role: &str) -> String {
    format!("runonce_requests_total{{route=\"{route}\",role=\"{role}\"}}")
}

#[tokio::test]
async fn metrics_count_a_known_traffic_mix() {
    let mock = mock("v5.1.0-auth-off", 400);
    // The first upstream refuses connections: the first request fails over to the mock, once.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = url(dead.local_addr().unwrap());
    drop(dead);
    let proxy = proxy(&[dead_url, url(mock.addr("mock"))], &[]);
    let (addr, admin) = (proxy.addr("proxy"), proxy.addr("admin"));

    // Two pass-through requests (the first one fails over).
    for _ in 0..2 {
        let answer = raw(addr, &form_post("/openApi/assert", "appName=my-app", ""))
            .await
            .unwrap();
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    // A leader, then the same Idempotency-Key again: a hit.
    let keyed = "Idempotency-Key: order-1\r\n";
    assert_eq!(run_job(addr, FORM, keyed).await.status, 200);
    let hit = run_job(addr, FORM, keyed).await;
    assert_eq!(hit.exact("Idempotent-Replayed"), Some("true"));
    // Two identical calls at once: a leader and a waiter.
    let other = "jobId=6&delay=0&appId=1";
    let first = tokio::spawn(async move { run_job(addr, other, "").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = run_job(addr, other, "").await;
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(second.exact("Idempotent-Replayed"), Some("true"));
    // A malformed Idempotency-Key: rejected.
    let too_long = format!("Idempotency-Key: {}\r\n", "k".repeat(300));
    let bad = run_job(addr, FORM, &too_long).await;
    assert_eq!(bad.status, 400, "{}", bad.text());
    assert!(bad.text().contains("RUNONCE_BAD_IDEMPOTENCY_KEY"));
    // Refused before routing: a CONNECT and a body declared over the limit.
    let connect = raw(
        addr,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(connect.status, 405, "{}", connect.text());
    let huge = raw(
        addr,
        b"POST /openApi/runJob HTTP/1.1\r\nHost: t\r\nContent-Length: 999999999\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(huge.status, 413, "{}", huge.text());
    assert_eq!(instances(&mock).await, 2);

    let text = scrape(admin).await;
    let expect = [
        (requests("other", "passthrough"), 2.0),
        (requests("runJob", "leader"), 2.0),
        (requests("runJob", "hit"), 1.0),
        (requests("runJob", "waiter"), 1.0),
        (requests("runJob", "rejected"), 1.0),
        (requests("other", "rejected"), 2.0),
        ("runonce_duplicates_suppressed_total".into(), 2.0),
        ("runonce_upstream_failovers_total".into(), 1.0),
        // The mock (5.1.0) sends no auth header: each of the 4 answers from upstream was repaired.
        ("runonce_auth_headers_repaired_total".into(), 4.0),
        ("runonce_inflight_keys".into(), 0.0),
        ("runonce_store_errors_total".into(), 0.0),
        (
            "runonce_upstream_guarded_seconds_count{route=\"runJob\"}".into(),
            2.0,
        ),
        ("runonce_upstream_passthrough_seconds_count".into(), 2.0),
        ("runonce_wait_seconds_count".into(), 1.0),
        (
            "runonce_leader_outcomes_total{outcome=\"done\",reason=\"success\"}".into(),
            2.0,
        ),
    ];
    for (name, value) in expect {
        assert_eq!(sample(&text, &name), value, "{name} in:\n{text}");
    }
    // The waiter waited for the leader's slow call: its wait lies in a bucket above 100 ms.
    assert!(sample(&text, "runonce_wait_seconds_sum") > 0.1, "{text}");
}

#[tokio::test]
async fn a_full_memory_store_evicts_only_delivered_answers_and_counts_them() {
    let mock = mock("v5.1.1-auth-off", 0);
    // Nobody waited on these answers: a delivered one makes room as soon as it is stored (a grace after the
    // close that confirms its delivery).
    let proxy = proxy(&[url(mock.addr("mock"))], &["--memory-max-keys", "2"]);
    let (addr, admin) = (proxy.addr("proxy"), proxy.addr("admin"));
    for job in 1..=3 {
        let answer = run_job(addr, &format!("jobId={job}&appId=1"), "").await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    // The third claim found two delivered answers and dropped the oldest.
    let text = scrape(admin).await;
    assert_eq!(
        sample(&text, "runonce_memory_evictions_total"),
        1.0,
        "{text}"
    );
}

#[tokio::test]
async fn store_errors_are_counted_and_no_secret_reaches_the_log() {
    let mock = mock("v5.1.1-auth-off", 0);
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let store = format!(
        "redis://:redis-password-3141@{}/0",
        dead.local_addr().unwrap()
    );
    drop(dead);
    let upstreams = [url(mock.addr("mock"))];
    let args = proxy_args(
        &upstreams,
        &[
            "--store",
            &store,
            "--store-timeout",
            "300ms",
            "--log-format",
            "json",
        ],
    );
    let env = [
        ("RUNONCE_LOG", "debug"),
        ("RUNONCE_ADMIN_TOKEN", "admin-token-2718"),
    ];
    let (proxy, logs) = Process::start_logged(&args, &env);
    let (addr, admin) = (proxy.addr("proxy"), proxy.addr("admin"));

    let token = "X-POWERJOB-ACCESS-TOKEN: client-token-1618\r\nAuthorization: Bearer client-bearer-1414\r\n";
    let refused = run_job(addr, FORM, token).await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    let wrong = admin_call(admin, "GET", "/keys", "Authorization: Bearer nope\r\n").await;
    assert_eq!(wrong.status, 401);
    let right = admin_call(
        admin,
        "GET",
        "/keys",
        "Authorization: Bearer admin-token-2718\r\n",
    )
    .await;
    assert_eq!(right.status, 503, "the store is down: {}", right.text());

    let text = scrape(admin).await;
    assert_eq!(sample(&text, "runonce_store_errors_total"), 1.0, "{text}");
    assert_eq!(sample(&text, &requests("runJob", "rejected")), 1.0);
    assert_eq!(instances(&mock).await, 0, "fail-closed forwards nothing");

    let line = logs
        .wait_for("guarded request")
        .expect("a guarded request line");
    let json: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
    assert_eq!(json["fields"]["role"], "rejected", "{line}");
    assert_eq!(
        json["fields"]["outcome"], "RUNONCE_STORE_UNAVAILABLE",
        "{line}"
    );
    let all = logs.lines().join("\n");
    assert!(
        all.contains("redis://:***@"),
        "the store URL is logged redacted: {all}"
    );
    for secret in [
        "client-token-1618",
        "client-bearer-1414",
        "admin-token-2718",
        "redis-password-3141",
    ] {
        assert!(!all.contains(secret), "{secret} appears in the log:\n{all}");
    }
}

/// Scrapes `admin` until the text holds `needle`, for at most 8 s.
async fn until_scraped(admin: SocketAddr, needle: &str, otherwise: &str) {
    for _ in 0..80 {
        if scrape(admin).await.contains(needle) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{otherwise}");
}

/// `runonce_ready` follows `/readyz`: 1 while the upstream accepts connections, 0 once it is gone, found by the
/// admin's own check (every 5 s from the first scrape on) with nothing probing `/readyz`, and at once by a
/// probe. A scrape does not check: it never waits for the upstreams.
#[tokio::test]
async fn runonce_ready_is_what_readyz_would_answer() {
    let mut mock = mock("v5.1.0-auth-off", 0);
    let mock_addr = mock.addr("mock").to_string();
    let upstreams = [url(mock.addr("mock"))];
    let proxy = Process::start(
        &proxy_args(&upstreams, &["--connect-timeout", "200ms"]),
        &[],
    );
    let admin = proxy.addr("admin");
    // The first scrape starts the checks.
    until_scraped(admin, "runonce_ready 1", "runonce_ready never became 1").await;
    mock.child.kill().expect("kill the mock");
    mock.child.wait().expect("the mock exits");
    until_scraped(admin, "runonce_ready 0", "runonce_ready stayed 1 for 8 s").await;
    let readyz = admin_call(admin, "GET", "/readyz", "").await;
    assert_eq!(readyz.status, 503, "{}", readyz.text());
    // Back, and a probe says so at once.
    let _back = Process::start(
        &[
            "mock-powerjob",
            "--listen",
            &mock_addr,
            "--mode",
            "v5.1.0-auth-off",
        ],
        &[],
    );
    let readyz = admin_call(admin, "GET", "/readyz", "").await;
    assert_eq!(readyz.status, 200, "{}", readyz.text());
    assert_eq!(sample(&scrape(admin).await, "runonce_ready"), 1.0);
}

/// A Redis that refuses every client (protected mode, as a Redis on its own defaults does to a client from another
/// host or container: it writes `-DENIED …` and closes). The store's own connection retries by itself and only
/// times out; the log must say what Redis said, not just "no answer".
#[tokio::test]
async fn a_redis_that_refuses_every_client_is_named_in_the_log() {
    const DENIED: &str =
        "DENIED Redis is running in protected mode because protected mode is enabled";
    // On a thread of its own: the test's runtime is blocked while it waits for the log.
    let refusing = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let store = format!("redis://{}/0", refusing.local_addr().unwrap());
    std::thread::spawn(move || {
        for mut client in refusing.incoming().flatten() {
            let _ = std::io::Write::write_all(&mut client, format!("-{DENIED}\r\n").as_bytes());
        }
    });
    let mock = mock("v5.1.0-auth-off", 0);
    let upstreams = [url(mock.addr("mock"))];
    let args = proxy_args(&upstreams, &["--store", &store, "--store-timeout", "200ms"]);
    let (proxy, logs) = Process::start_logged(&args, &[("RUNONCE_LOG", "info")]);
    for _ in 0..4 {
        let refused = run_job(proxy.addr("proxy"), FORM, "").await;
        assert_eq!(refused.status, 503, "{}", refused.text());
    }
    // The probe's line, not the listener's (which may quote Redis too).
    let said = logs.wait_for("new_connection=");
    assert!(
        said.as_deref().is_some_and(|line| line.contains(DENIED)),
        "{said:?}\n{}",
        logs.lines().join("\n")
    );
    assert_eq!(instances(&mock).await, 0);
}

#[tokio::test]
async fn a_guarded_request_logs_exactly_one_json_line_with_its_fields() {
    let mock = mock("v5.1.1-auth-off", 0);
    let upstreams = [url(mock.addr("mock"))];
    let args = proxy_args(&upstreams, &["--log-format", "json"]);
    let (proxy, logs) = Process::start_logged(&args, &[("RUNONCE_LOG", "info")]);
    let addr = proxy.addr("proxy");
    let token = "X-POWERJOB-ACCESS-TOKEN: client-token-1618\r\n";
    assert_eq!(run_job(addr, FORM, token).await.status, 200);
    // A pass-through request writes no such line.
    raw(addr, &form_post("/openApi/assert", "appName=my-app", token))
        .await
        .unwrap();
    logs.wait_for("guarded request").expect("the line");
    // Let any second line (there must be none) arrive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines: Vec<String> = logs
        .lines()
        .into_iter()
        .filter(|l| l.contains("guarded request"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let json: serde_json::Value = serde_json::from_str(&lines[0]).expect("JSON");
    let fields = &json["fields"];
    assert_eq!(fields["route"], "runJob");
    assert_eq!(fields["role"], "leader");
    assert_eq!(fields["outcome"], "done");
    assert_eq!(fields["key"].as_str().map(str::len), Some(12), "{fields}");
    assert!(fields["upstream_ms"].is_u64(), "{fields}");
    let all = logs.lines().join("\n");
    assert!(!all.contains("client-token-1618"), "{all}");
}

/// A config file for `runonce serve --config`, in front of `upstream`. The same payload goes out under
/// several keys and unguarded: in a quarantine PowerJob could not tell those calls apart (README, "A store
/// that forgot"), and this is about reloads, so the quarantine is off.
fn write_config(path: &std::path::Path, upstream: &str, extra: &str) {
    let text = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nupstreams = [\"{upstream}\"]\nadmin_token = \"tok\"\nquarantine = false\n{extra}"
    );
    std::fs::write(path, text).unwrap();
}

/// Sends `request` on the kept-alive `stream` and reads the answer.
async fn exchange(stream: &mut tokio::net::TcpStream, request: &[u8]) -> RawResponse {
    stream.write_all(request).await.unwrap();
    read_response(stream).await.expect("an answer")
}

fn keep_alive_run_job(key: &str) -> Vec<u8> {
    format!(
        "POST {RUN_JOB} HTTP/1.1\r\nHost: test\r\nContent-Type: application/x-www-form-urlencoded\r\nIdempotency-Key: {key}\r\nContent-Length: {}\r\n\r\n{FORM}",
        FORM.len()
    )
    .into_bytes()
}

#[tokio::test]
async fn sighup_applies_a_new_route_on_an_open_connection_and_refuses_an_invalid_file() {
    let mock = mock("v5.1.1-auth-off", 0);
    let dir = std::env::temp_dir().join(format!("runonce-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("runonce.toml");
    let upstream = url(mock.addr("mock"));
    write_config(&config, &upstream, "");
    let args = ["serve", "--config", config.to_str().unwrap()];
    let (proxy, logs) = Process::start_logged(&args, &[("RUNONCE_LOG", "info")]);
    let (addr, admin) = (proxy.addr("proxy"), proxy.addr("admin"));
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();

    // Guarded: the same Idempotency-Key replays.
    assert_eq!(
        exchange(&mut conn, &keep_alive_run_job("a")).await.status,
        200
    );
    let again = exchange(&mut conn, &keep_alive_run_job("a")).await;
    assert_eq!(again.exact("Idempotent-Replayed"), Some("true"));
    assert_eq!(instances(&mock).await, 1);

    // runJob no longer guarded, and a setting that needs a restart.
    write_config(
        &config,
        &upstream,
        "max_connections = 5\n[routes.runJob]\nenabled = false\n",
    );
    proxy.signal("HUP");
    let restart = logs
        .wait_for("needs restart")
        .expect("a needs-restart line");
    assert!(restart.contains("max_connections"), "{restart}");
    logs.wait_for("configuration reloaded").expect("reloaded");
    let passed = exchange(&mut conn, &keep_alive_run_job("a")).await;
    assert_eq!(passed.status, 200);
    assert_eq!(passed.exact("Idempotent-Replayed"), None);
    assert_eq!(instances(&mock).await, 2, "runJob now passes through");

    // An invalid file is refused: the log says why, and runJob stays unguarded.
    write_config(&config, &upstream, "window = \"banana\"\n");
    proxy.signal("HUP");
    logs.wait_for("reload refused").expect("a refusal line");
    // The TOML error quotes the bad line (on lines of its own in the text format).
    let all = logs.lines().join("\n");
    assert!(all.contains("window = \"banana\""), "{all}");
    exchange(&mut conn, &keep_alive_run_job("a")).await;
    assert_eq!(
        instances(&mock).await,
        3,
        "the running configuration stayed"
    );

    // POST /reload needs the token, and applies the file (guarded again: a new key leads, then replays).
    write_config(&config, &upstream, "");
    let denied = admin_call(admin, "POST", "/reload", "").await;
    assert_eq!(denied.status, 401);
    let reloaded = admin_call(admin, "POST", "/reload", "Authorization: Bearer tok\r\n").await;
    assert_eq!(reloaded.status, 200, "{}", reloaded.text());
    assert_eq!(
        reloaded.json().unwrap()["changed"],
        serde_json::json!(["routes"])
    );
    exchange(&mut conn, &keep_alive_run_job("b")).await;
    let replayed = exchange(&mut conn, &keep_alive_run_job("b")).await;
    assert_eq!(replayed.exact("Idempotent-Replayed"), Some("true"));
    assert_eq!(instances(&mock).await, 4);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A field of a key's record, read straight from Redis.
fn hget(redis: &RedisServer, key: &str, field: &str) -> String {
    let reply = redis
        .query(&["HGET", &format!("runonce:{{{key}}}"), field])
        .unwrap_or_default();
    // `$N\r\nvalue\r\n`
    reply.lines().nth(1).unwrap_or("").to_string()
}

/// The one key in flight, from the admin API.
async fn inflight_key(admin: SocketAddr) -> String {
    for _ in 0..250 {
        let answer = admin_call(admin, "GET", "/keys?state=inflight", "").await;
        let json = answer.json().unwrap();
        if let Some(key) = json["keys"][0]["key"].as_str() {
            return key.to_string();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no key in flight");
}

#[tokio::test]
async fn sigterm_turns_unready_at_once_and_lets_the_leader_finish_and_store_its_answer() {
    let redis = RedisServer::start();
    let mock = mock("v5.1.1-auth-off", 1500);
    let store = redis.url();
    let mut proxy = proxy(
        &[url(mock.addr("mock"))],
        &["--store", &store, "--drain-timeout", "20s"],
    );
    let (addr, admin) = (proxy.addr("proxy"), proxy.addr("admin"));
    assert_eq!(admin_call(admin, "GET", "/readyz", "").await.status, 200);
    let call = tokio::spawn(async move { run_job(addr, FORM, "").await });
    let key = inflight_key(admin).await;

    proxy.terminate();
    let mut unready = None;
    for _ in 0..50 {
        let status = admin_call(admin, "GET", "/readyz", "").await.status;
        if status == 503 {
            unready = Some(status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        unready,
        Some(503),
        "/readyz turns 503 while the leader runs"
    );
    let answer = call.await.unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    let status = proxy
        .wait_exit(Duration::from_secs(20))
        .expect("exited within the drain timeout");
    assert!(status.success(), "{status:?}");
    assert_eq!(hget(&redis, &key, "state"), "done");
    assert_eq!(hget(&redis, &key, "delivered"), "1");
    assert_eq!(instances(&mock).await, 1);
}

#[tokio::test]
async fn a_leader_slower_than_the_drain_timeout_is_cut_off_and_its_key_reads_unknown() {
    let redis = RedisServer::start();
    let mock = mock("v5.1.1-auth-off", 8000);
    let store = redis.url();
    let upstreams = [url(mock.addr("mock"))];
    let mut proxy = proxy(&upstreams, &["--store", &store, "--drain-timeout", "1s"]);
    let (addr, admin) = (proxy.addr("proxy"), proxy.addr("admin"));
    let call = tokio::spawn(async move { raw(addr, &form_post(RUN_JOB, FORM, "")).await });
    let key = inflight_key(admin).await;

    let sent = std::time::Instant::now();
    proxy.terminate();
    // Drain timeout + store time-out + the cut-off grace, with a wide margin for a loaded machine.
    proxy
        .wait_exit(Duration::from_secs(6))
        .expect("exited soon after the drain timeout");
    assert!(sent.elapsed() < Duration::from_secs(8));
    // The client is told: the call may have reached the server and is not re-sent.
    let answer = call
        .await
        .unwrap()
        .expect("an answer before the process exits");
    assert_eq!(answer.status, 503, "{}", answer.text());
    let json = answer.json().unwrap();
    assert_eq!(json["success"], false);
    // runonce's own shutdown, not an upstream named `runonce`.
    assert_eq!(json["code"], "RUNONCE_SHUTTING_DOWN", "{json}");
    assert!(!answer.text().contains("upstream runonce"), "{json}");
    assert_eq!(hget(&redis, &key, "state"), "unknown");

    // Another replica on the same store never sends it again.
    let second = support::proxy(&upstreams, &["--store", &store]);
    let again = run_job(second.addr("proxy"), FORM, "").await;
    assert_eq!(again.status, 409, "{}", again.text());
    assert!(again.text().contains("RUNONCE_OUTCOME_UNKNOWN"));
    assert_eq!(instances(&mock).await, 1);
}

/// Worker threads run under `SCHED_BATCH` (3) by default, and under the normal policy (0) with
/// `--batch-scheduling false`; the process's other threads keep the normal policy either way.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn worker_threads_run_under_sched_batch_unless_switched_off() {
    let mock = mock("v5.1.0-auth-off", 0);
    let upstream = url(mock.addr("mock"));
    for (extra, expected) in [(&[][..], 3), (&["--batch-scheduling", "false"][..], 0)] {
        let proxy = proxy(
            std::slice::from_ref(&upstream),
            &[&["--workers", "2"], extra].concat(),
        );
        // Connections are handed to the workers in turn: two answers, one from each (each set its policy
        // before serving).
        for _ in 0..2 {
            assert_eq!(run_job(proxy.addr("proxy"), FORM, "").await.status, 200);
        }
        let (workers, others) = thread_policies(proxy.child.id());
        assert_eq!(workers, vec![expected; 2], "{extra:?}");
        assert!(
            !others.is_empty() && others.iter().all(|&p| p == 0),
            "{others:?}"
        );
    }
}
