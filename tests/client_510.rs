//! The 5.1.0 client's request sequence (POWERJOB.md §8) against the real `mock-powerjob` and `runonce` processes.

mod support;

use runonce::sim::client::{Client510, ClientConfig};
use std::net::SocketAddr;
use std::time::Duration;
use support::*;

async fn client(addresses: &[SocketAddr]) -> Client510 {
    let config = ClientConfig::new(
        addresses.iter().map(ToString::to_string).collect(),
        "my-app",
        "123456",
    );
    Client510::connect(config).await.expect("client connects")
}

fn run_job_posts(stats: &serde_json::Value) -> u64 {
    stats["requests_by_path"]["/openApi/runJob"]
        .as_u64()
        .unwrap_or(0)
}

#[tokio::test]
async fn direct_to_a_510_server_one_run_job_creates_two_instances() {
    let mock = mock("v5.1.0-auth-off", 0);
    let mut client = client(&[mock.addr("mock")]).await;
    let result = client.run_job(5, "", 0).await.unwrap();
    assert!(result.success);
    let stats = mock_stats(mock.addr("mock")).await;
    assert_eq!(
        stats["instances"], 2,
        "the bug this project exists for: {stats}"
    );
    assert_eq!(run_job_posts(&stats), 2);
    assert!(
        client
            .log()
            .iter()
            .any(|l| l.contains("auth failed[authStatus: null]")),
        "{:?}",
        client.log()
    );
}

#[tokio::test]
async fn through_runonce_one_run_job_creates_one_instance_and_the_client_gets_its_id() {
    let mock = mock("v5.1.0-auth-off", 0);
    let proxy = proxy(&[url(mock.addr("mock"))], &[]);
    let mut client = client(&[proxy.addr("proxy")]).await;
    let result = client.run_job(5, r#"{"k":"v w"}"#, 0).await.unwrap();
    assert!(result.success, "{result:?}");
    let id = result.data_i64().expect("an instance id");
    assert!(
        id > 1 << 53,
        "ids are int64 above 2^53 and arrive exact: {id}"
    );

    let stats = mock_stats(mock.addr("mock")).await;
    assert_eq!(stats["instances"], 1, "{stats}");
    assert_eq!(run_job_posts(&stats), 1);
    // The id the client got is the instance the server created: the server knows it.
    let status = client.fetch_instance_status(id).await.unwrap();
    assert!(status.success, "{status:?}");
    assert!(
        !client.log().iter().any(|l| l.contains("auth failed")),
        "no auth failure seen: {:?}",
        client.log()
    );
}

#[tokio::test]
async fn through_runonce_every_instance_creating_call_is_single() {
    let mock = mock("v5.1.0-auth-off", 0);
    let proxy = proxy(&[url(mock.addr("mock"))], &[]);
    let mut client = client(&[proxy.addr("proxy")]).await;
    for job in 1..=3 {
        assert!(client.run_job(job, "", 0).await.unwrap().success);
    }
    assert!(client.run_workflow(7, "", 0).await.unwrap().success);
    let stats = mock_stats(mock.addr("mock")).await;
    assert_eq!(
        (
            stats["instances"].as_u64(),
            stats["workflow_instances"].as_u64()
        ),
        (Some(3), Some(1)),
        "{stats}"
    );
}

#[tokio::test]
async fn a_511_server_needs_no_repair_and_runonce_changes_nothing() {
    let mock = mock("v5.1.1-auth-off", 0);
    let proxy = proxy(&[url(mock.addr("mock"))], &[]);
    for address in [mock.addr("mock"), proxy.addr("proxy")] {
        let mut client = client(&[address]).await;
        assert!(client.run_job(5, "", 0).await.unwrap().success);
    }
    assert_eq!(
        mock_stats(mock.addr("mock")).await["instances"],
        2,
        "one per call, direct and through runonce"
    );
}

#[tokio::test]
async fn an_auth_on_server_refusing_a_token_is_not_turned_into_a_success() {
    let mock = mock("auth-on", 0);
    let proxy = proxy(&[url(mock.addr("mock"))], &[]);
    let request = form_post(
        "/openApi/runJob",
        "jobId=5&delay=0&appId=1",
        "X-POWERJOB-APP-ID: 1\r\nX-POWERJOB-ACCESS-TOKEN: forged\r\n",
    );
    let response = raw(proxy.addr("proxy"), &request).await.unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(
        response.exact("X-POWERJOB-AUTH-PASSED"),
        Some("false"),
        "{}",
        response.head
    );
    assert_eq!(response.json().unwrap()["success"], false);
    assert_eq!(mock_stats(mock.addr("mock")).await["instances"], 0);
}

#[tokio::test]
async fn the_client_fails_over_from_a_dead_address_to_runonce() {
    let mock = mock("v5.1.0-auth-off", 0);
    let proxy = proxy(&[url(mock.addr("mock"))], &[]);
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let mut config = ClientConfig::new(
        vec![dead.to_string(), proxy.addr("proxy").to_string()],
        "my-app",
        "123456",
    );
    config.timeout = Duration::from_millis(500);
    let mut client = Client510::connect(config).await.unwrap();
    assert!(client.run_job(5, "", 0).await.unwrap().success);
    assert_eq!(client.current_address(), proxy.addr("proxy").to_string());
    assert_eq!(mock_stats(mock.addr("mock")).await["instances"], 1);
}
