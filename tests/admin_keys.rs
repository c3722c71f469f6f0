//! The admin key API (`GET /keys/{key}`, `DELETE /keys/{key}`, `GET /keys?state=…`) on the memory store, a
//! real Redis and a real Redis Cluster, and who may use it (the admin token, loopback).

mod support;

use std::net::SocketAddr;

use serde_json::Value;
use support::redis::{RedisCluster, RedisServer};
use support::*;

const RUN_JOB: &str = "/openApi/runJob";

/// A scripted server: a body with `hangup` gets no answer (its outcome is unknown), any other a 200.
async fn upstream() -> RawUpstream {
    RawUpstream::start(|request| {
        if String::from_utf8_lossy(request).contains("hangup") {
            Script::Hangup
        } else {
            Script::Answer(ok_answer("X-POWERJOB-AUTH-PASSED: true\r\n"))
        }
    })
    .await
}

async fn run_job(proxy: SocketAddr, body: &str) -> RawResponse {
    raw(proxy, &form_post(RUN_JOB, body, ""))
        .await
        .expect("runJob answer")
}

async fn get(admin: SocketAddr, path: &str) -> (u16, Value) {
    let answer = admin_call(admin, "GET", path, "").await;
    (answer.status, answer.json().unwrap_or(Value::Null))
}

/// Six done keys (spread over a Cluster's masters) and one unknown; then reads, lists and purges them.
async fn the_key_api_lists_reads_and_purges(store: &str) {
    let upstream = upstream().await;
    let proxy = proxy(&[upstream.url()], &["--store", store]);
    let (addr, admin) = (proxy.addr("proxy"), proxy.addr("admin"));
    for job in 0..6 {
        assert_eq!(
            run_job(addr, &format!("appId=1&jobId={job}")).await.status,
            200
        );
    }
    let lost = "appId=1&jobId=99&instanceParams=hangup";
    assert_eq!(run_job(addr, lost).await.status, 502);
    // The answers are stored once their delivery is confirmed (a grace after the close).
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;

    let (status, all) = get(admin, "/keys").await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(all["count"], 7, "{all}");
    assert_eq!(all["truncated"], false);
    let (_, done) = get(admin, "/keys?state=done").await;
    assert_eq!(done["count"], 6, "{done}");
    assert_eq!(done["keys"][0]["stored"]["status"], 200, "{done}");
    assert_eq!(done["keys"][0]["stored"]["delivered"], true, "{done}");
    let (_, limited) = get(admin, "/keys?state=done&limit=2").await;
    assert_eq!(
        (limited["count"].as_u64(), limited["truncated"].as_bool()),
        (Some(2), Some(true))
    );
    let (_, unknown) = get(admin, "/keys?state=unknown").await;
    assert_eq!(unknown["count"], 1, "{unknown}");
    let key = unknown["keys"][0]["key"].as_str().unwrap().to_string();

    let (status, record) = get(admin, &format!("/keys/{key}")).await;
    assert_eq!(status, 200);
    assert_eq!(record["state"], "unknown");
    assert_eq!(record["stored"], Value::Null);
    assert_eq!(
        record["fingerprint"].as_str().map(str::len),
        Some(64),
        "{record}"
    );
    assert!(!record["owner"].as_str().unwrap().is_empty());
    assert!(record["age_ms"].is_u64());

    // The unknown key refuses its duplicate until an operator purges it.
    assert_eq!(run_job(addr, lost).await.status, 409);
    assert_eq!(upstream.count(), 7);
    let purged = admin_call(admin, "DELETE", &format!("/keys/{key}"), "").await;
    assert_eq!(purged.status, 200, "{}", purged.text());
    assert_eq!(purged.json().unwrap()["purged"], true);
    assert_eq!(get(admin, &format!("/keys/{key}")).await.0, 404);
    assert_eq!(
        run_job(addr, lost).await.status,
        502,
        "purged: the call runs again"
    );
    assert_eq!(upstream.count(), 8);

    assert_eq!(get(admin, "/keys/not-a-key").await.0, 400);
    assert_eq!(get(admin, "/keys?state=lost").await.0, 400);
    let gone = admin_call(admin, "DELETE", &format!("/keys/{}", "0".repeat(64)), "").await;
    assert_eq!(gone.status, 404);
}

#[tokio::test]
async fn the_key_api_on_the_memory_store() {
    the_key_api_lists_reads_and_purges("memory").await;
}

#[tokio::test]
async fn the_key_api_on_redis() {
    let redis = RedisServer::start();
    the_key_api_lists_reads_and_purges(&redis.url()).await;
}

#[tokio::test]
async fn the_key_api_on_redis_cluster_lists_every_master() {
    let cluster = RedisCluster::start(3);
    the_key_api_lists_reads_and_purges(&cluster.url()).await;
}

#[tokio::test]
async fn an_admin_token_guards_the_key_api_and_reload_but_not_probes_or_metrics() {
    let upstream = upstream().await;
    let env = [("RUNONCE_ADMIN_TOKEN", "s3cret")];
    let upstreams = [upstream.url()];
    let proxy = Process::start(&proxy_args(&upstreams, &[]), &env);
    let admin = proxy.addr("admin");
    for (method, path) in [
        ("GET", "/keys"),
        ("DELETE", &*format!("/keys/{}", "a".repeat(64))),
        ("POST", "/reload"),
    ] {
        let none = admin_call(admin, method, path, "").await;
        assert_eq!(none.status, 401, "{method} {path}");
        assert!(none.head.contains("Bearer"), "{}", none.head);
        let wrong = admin_call(admin, method, path, "Authorization: Bearer s3cre\r\n").await;
        assert_eq!(wrong.status, 401, "{method} {path}");
    }
    let right = admin_call(admin, "GET", "/keys", "Authorization: Bearer s3cret\r\n").await;
    assert_eq!(right.status, 200, "{}", right.text());
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(
            admin_call(admin, "GET", path, "").await.status,
            200,
            "{path}"
        );
    }
}

#[tokio::test]
async fn without_a_token_a_non_loopback_admin_listener_refuses_the_key_api() {
    let upstream = upstream().await;
    let upstreams = [upstream.url()];
    let args = proxy_args(&upstreams, &["--admin-listen", "0.0.0.0:0"]);
    let proxy = Process::start(&args, &[]);
    let port = proxy.addr("admin").port();
    let admin = SocketAddr::from(([127, 0, 0, 1], port));
    let refused = admin_call(admin, "GET", "/keys", "").await;
    assert_eq!(refused.status, 403, "{}", refused.text());
    let refused = admin_call(admin, "DELETE", &format!("/keys/{}", "a".repeat(64)), "").await;
    assert_eq!(refused.status, 403);
    assert_eq!(admin_call(admin, "POST", "/reload", "").await.status, 403);
    assert_eq!(admin_call(admin, "GET", "/healthz", "").await.status, 200);
    assert_eq!(admin_call(admin, "GET", "/metrics", "").await.status, 200);
}

/// The admin listener holds the proxy's edge limits: a head must arrive within `header_read_timeout`, so
/// half-sent requests do not hold their sockets forever (hyper has no read timeout without a timer).
#[tokio::test]
async fn the_admin_listener_cuts_off_heads_that_never_end() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = upstream().await;
    let proxy = proxy(&[upstream.url()], &["--header-read-timeout", "1s"]);
    let admin = proxy.addr("admin");
    let mut dripping = Vec::new();
    for _ in 0..100 {
        let mut conn = tokio::net::TcpStream::connect(admin).await.unwrap();
        conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\n")
            .await
            .unwrap();
        dripping.push(conn);
    }
    for (i, conn) in dripping.iter_mut().enumerate() {
        let mut buf = [0u8; 256];
        let closed =
            tokio::time::timeout(std::time::Duration::from_secs(5), conn.read(&mut buf)).await;
        assert!(
            matches!(closed, Ok(Ok(_)) | Ok(Err(_))),
            "connection {i} still open 5 s after a 1 s header_read_timeout"
        );
    }
    assert_eq!(get(admin, "/healthz").await.0, 200);
}
