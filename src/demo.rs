//! `runonce demo`: the 5.1.0 client's double `runJob`, shown side by side.
//!
//! Starts, in this process and on free loopback ports, two mock PowerJob servers in `v5.1.0-auth-off` mode
//! (auth off, the default, and no `X-POWERJOB-AUTH-PASSED` header) and one runonce proxy in front of the
//! second. The 5.1.0 client emulation then calls `runJob` once against each, and the table shows what each
//! server created.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::config::{Flags, Settings};
use crate::server::{self, Listeners};
use crate::sim::client::{Client510, ClientConfig};
use crate::sim::mock::{self, MockOptions, Mode};

/// One row of the table.
struct Row {
    path: &'static str,
    instance_id: Option<i64>,
    run_job_posts: u64,
    /// What the client logged during the call.
    client_log: Vec<String>,
    auth_app_posts: u64,
    instances: u64,
}

pub async fn run() -> Result<(), String> {
    let (stop, stopped) = tokio::sync::watch::channel(());
    let direct = start_mock(stopped.clone()).await?;
    let behind = start_mock(stopped.clone()).await?;
    let proxy = start_proxy(behind, stopped.clone()).await?;

    let mut rows = Vec::new();
    for (path, client_address, server) in [
        ("direct to PowerJob 5.1.0", direct, direct),
        ("through runonce", proxy, behind),
    ] {
        let (instance_id, before, client_log) = one_run_job(client_address, server).await?;
        let stats = mock_stats(server).await?;
        let count = |path: &str| stats["requests_by_path"][path].as_u64().unwrap_or(0);
        rows.push(Row {
            path,
            instance_id,
            client_log,
            run_job_posts: count("/openApi/runJob"),
            auth_app_posts: count("/openApi/authApp") - before,
            instances: stats["instances"].as_u64().unwrap_or(0),
        });
    }
    drop(stop);

    println!("One PowerJobClient.runJob(5) from the 5.1.0 client, against a 5.1.0 server with OpenAPI auth off:\n");
    println!(
        "{:<26} {:>12} {:>22} {:>10}   instanceId returned",
        "", "runJob POSTs", "authApp POSTs in call", "instances"
    );
    for row in &rows {
        let id = row.instance_id.map_or("-".to_string(), |id| id.to_string());
        println!(
            "{:<26} {:>12} {:>22} {:>10}   {id}",
            row.path, row.run_job_posts, row.auth_app_posts, row.instances
        );
    }
    for row in &rows {
        println!("\nThe client's log, {}:", row.path);
        if row.client_log.is_empty() {
            println!("  (nothing)");
        }
        for line in &row.client_log {
            println!("  {line}");
        }
    }
    println!(
        "\nDirect, the client misses X-POWERJOB-AUTH-PASSED, re-authenticates and sends the same runJob again: two\n\
         instances, and the caller only learns of the second. Through runonce the header arrives in exact case and\n\
         the job runs once."
    );
    Ok(())
}

/// Connects a 5.1.0 client to `address` and calls `runJob` once; returns the id it got and the `/authApp`
/// count at `server` before the call (the constructor makes its own), and what the client logged in the call.
async fn one_run_job(
    address: SocketAddr,
    server: SocketAddr,
) -> Result<(Option<i64>, u64, Vec<String>), String> {
    let config = ClientConfig::new(vec![address.to_string()], "my-app", "123456");
    let mut client = Client510::connect(config)
        .await
        .map_err(|err| format!("client: {err}"))?;
    let before = mock_stats(server).await?["requests_by_path"]["/openApi/authApp"]
        .as_u64()
        .unwrap_or(0);
    let logged = client.log().len();
    let result = client
        .run_job(5, "", 0)
        .await
        .map_err(|err| format!("runJob: {err}"))?;
    Ok((result.data_i64(), before, client.log()[logged..].to_vec()))
}

async fn start_mock(mut stopped: tokio::sync::watch::Receiver<()>) -> Result<SocketAddr, String> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|err| format!("mock: {err}"))?;
    let addr = listener.local_addr().map_err(|err| err.to_string())?;
    let options = MockOptions {
        mode: Mode::V510AuthOff,
        ..MockOptions::default()
    };
    tokio::spawn(mock::run(listener, options, async move {
        let _ = stopped.changed().await;
    }));
    Ok(addr)
}

async fn start_proxy(
    upstream: SocketAddr,
    mut stopped: tokio::sync::watch::Receiver<()>,
) -> Result<SocketAddr, String> {
    let env = move |key: &str| match key {
        "RUNONCE_LISTEN" | "RUNONCE_ADMIN_LISTEN" => Some("127.0.0.1:0".to_string()),
        "RUNONCE_UPSTREAMS" => Some(format!("http://{upstream}")),
        "RUNONCE_DRAIN_TIMEOUT" => Some("1s".to_string()),
        _ => None,
    };
    let settings = Settings::load(None, env, &Flags::default()).map_err(|err| err.to_string())?;
    let store = crate::store::open(&settings)
        .await
        .map_err(|err| err.to_string())?;
    let listeners = Listeners::bind(&settings)
        .await
        .map_err(|err| err.to_string())?;
    let addr = listeners
        .proxy
        .local_addr()
        .map_err(|err| err.to_string())?;
    let shutdown = async move {
        let _ = stopped.changed().await;
    };
    tokio::spawn(server::run(settings, listeners, store, shutdown, None));
    Ok(addr)
}

async fn mock_stats(server: SocketAddr) -> Result<serde_json::Value, String> {
    mock::fetch_stats(server, Duration::from_secs(5))
        .await
        .map_err(|err| format!("mock stats: {err}"))
}
