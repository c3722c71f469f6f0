//! runonce's own access control (for servers with OpenAPI auth off): allowed networks, allowed app ids, a shared
//! secret header. Each refusal is a 403 with a PowerJob-shaped body and its own code, and nothing reaches the
//! server (the mock counts every request it gets).

mod support;

use std::net::SocketAddr;

use support::*;

const SECRET: &str = "s3cret-0123456789-abcdef";

fn json_post(path: &str, body: &str, extra_headers: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json; charset=utf-8\r\n{extra_headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn send(proxy: SocketAddr, request: Vec<u8>) -> RawResponse {
    raw(proxy, &request).await.expect("an answer")
}

/// 403, `success:false`, `data:null`, and the code.
fn assert_refused(answer: &RawResponse, code: &str) {
    assert_eq!(answer.status, 403, "{}", answer.text());
    let body = answer.json().unwrap();
    assert_eq!(body["success"], false);
    assert_eq!(body["data"], serde_json::Value::Null);
    assert_eq!(body["code"], code, "{body}");
    assert!(body["message"]
        .as_str()
        .unwrap()
        .starts_with("runonce: access denied: "));
}

async fn requests_to(mock: &Process, path: &str) -> u64 {
    mock_stats(mock.addr("mock")).await["requests_by_path"][path]
        .as_u64()
        .unwrap_or(0)
}

#[tokio::test]
async fn only_allowed_apps_reach_the_server_on_guarded_and_pass_through_routes() {
    let mock = mock("v5.1.1-auth-off", 0);
    let proxy = proxy(
        &[url(mock.addr("mock"))],
        &["--allow-app", "1", "--allow-app", "7"],
    );
    let p = proxy.addr("proxy");

    let ok = send(
        p,
        form_post("/openApi/runJob", "jobId=5&delay=0&appId=1", ""),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    let other = send(
        p,
        form_post("/openApi/runJob", "jobId=5&delay=0&appId=2", ""),
    )
    .await;
    assert_refused(&other, "RUNONCE_APP_NOT_ALLOWED");
    assert!(other.text().contains("app 2 is not in allow_apps"));
    // The header names another app than the form: both must be allowed.
    let mixed = send(
        p,
        form_post(
            "/openApi/runJob",
            "jobId=5&delay=0&appId=1",
            "X-POWERJOB-APP-ID: 2\r\n",
        ),
    )
    .await;
    assert_refused(&mixed, "RUNONCE_APP_NOT_ALLOWED");
    let none = send(p, form_post("/openApi/runJob", "jobId=5&delay=0", "")).await;
    assert_refused(&none, "RUNONCE_APP_NOT_ALLOWED");
    let hex = send(p, form_post("/openApi/runJob", "jobId=5&appId=0x1", "")).await;
    assert_refused(&hex, "RUNONCE_APP_NOT_ALLOWED");
    let odd = send(p, form_post("/%6FpenApi;x/runJob", "jobId=5&appId=2", "")).await;
    assert_refused(&odd, "RUNONCE_APP_NOT_ALLOWED");
    assert_eq!(requests_to(&mock, "/openApi/runJob").await, 1);

    // Pass-through routes: the body is read to find the app, then forwarded whole.
    let status = send(
        p,
        form_post("/openApi/fetchInstanceStatus", "instanceId=3&appId=7", ""),
    )
    .await;
    assert_eq!(status.status, 200);
    let status = send(
        p,
        form_post("/openApi/fetchInstanceStatus", "instanceId=3&appId=2", ""),
    )
    .await;
    assert_refused(&status, "RUNONCE_APP_NOT_ALLOWED");
    assert_eq!(requests_to(&mock, "/openApi/fetchInstanceStatus").await, 1);
    let save = send(
        p,
        json_post("/openApi/saveJob", r#"{"appId":2,"jobName":"x"}"#, ""),
    )
    .await;
    assert_refused(&save, "RUNONCE_APP_NOT_ALLOWED");
    assert_eq!(requests_to(&mock, "/openApi/saveJob").await, 0);

    // The login names the app by name: it passes (the server checks the password).
    let login = send(
        p,
        json_post(
            "/openApi/authApp",
            r#"{"appName":"my-app","encryptedPassword":"e10adc3949ba59abbe56e057f20f883e","encryptType":"md5"}"#,
            "",
        ),
    )
    .await;
    assert_eq!(login.json().unwrap()["success"], true, "{}", login.text());
    assert_eq!(mock_stats(mock.addr("mock")).await["instances"], 1);
}

#[tokio::test]
async fn only_allowed_networks_are_served_on_every_path() {
    let mock = mock("v5.1.1-auth-off", 0);
    let refused = proxy(
        &[url(mock.addr("mock"))],
        &["--allow-network", "10.0.0.0/8"],
    );
    let answer = send(
        refused.addr("proxy"),
        form_post("/openApi/runJob", "jobId=5&delay=0&appId=1", ""),
    )
    .await;
    assert_refused(&answer, "RUNONCE_NETWORK_NOT_ALLOWED");
    assert!(answer.text().contains("127.0.0.1"));
    let other_path = send(
        refused.addr("proxy"),
        b"GET /server/hello HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".to_vec(),
    )
    .await;
    assert_refused(&other_path, "RUNONCE_NETWORK_NOT_ALLOWED");
    assert_eq!(
        mock_stats(mock.addr("mock")).await["requests_by_path"],
        serde_json::json!({}),
        "nothing was forwarded"
    );

    let allowed = proxy(
        &[url(mock.addr("mock"))],
        &[
            "--allow-network",
            "10.0.0.0/8",
            "--allow-network",
            "127.0.0.0/8",
        ],
    );
    let answer = send(
        allowed.addr("proxy"),
        form_post("/openApi/runJob", "jobId=5&delay=0&appId=1", ""),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
}

#[tokio::test]
async fn the_shared_secret_is_required_on_openapi_and_never_forwarded() {
    let mock = mock("v5.1.1-auth-off", 0);
    let upstreams = [url(mock.addr("mock"))];
    let proxy = Process::start(
        &proxy_args(&upstreams, &["--shared-secret-header", "X-Runonce-Secret"]),
        &[("RUNONCE_SHARED_SECRET", SECRET)],
    );
    let p = proxy.addr("proxy");
    let run = |headers: String| form_post("/openApi/runJob", "jobId=5&delay=0&appId=1", &headers);

    let missing = send(p, run(String::new())).await;
    assert_refused(&missing, "RUNONCE_SECRET_REQUIRED");
    // Spellings the server reads as /openApi/runJob need it too.
    for path in [
        "/%6FpenApi/runJob",
        "/openApi;x=1/runJob",
        "//openApi/runJob",
    ] {
        let odd = send(p, form_post(path, "jobId=5&delay=0&appId=1", "")).await;
        assert_refused(&odd, "RUNONCE_SECRET_REQUIRED");
    }
    let wrong = send(
        p,
        run("X-Runonce-Secret: s3cret-0123456789-abcdeF\r\n".into()),
    )
    .await;
    assert_refused(&wrong, "RUNONCE_SECRET_REQUIRED");
    assert!(!wrong.text().contains(SECRET));
    let twice = send(
        p,
        run(format!(
            "X-Runonce-Secret: {SECRET}\r\nX-Runonce-Secret: {SECRET}\r\n"
        )),
    )
    .await;
    assert_refused(&twice, "RUNONCE_SECRET_REQUIRED");
    assert_eq!(requests_to(&mock, "/openApi/runJob").await, 0);

    let right = send(p, run(format!("x-runonce-secret: {SECRET}\r\n"))).await;
    assert_eq!(right.status, 200, "{}", right.text());
    assert_eq!(right.exact("X-POWERJOB-AUTH-PASSED"), Some("true"));
    // Paths outside /openApi/** need no secret (workers, the console), and the secret never goes upstream.
    let console = send(
        p,
        format!("GET /index.html HTTP/1.1\r\nHost: t\r\nX-Runonce-Secret: {SECRET}\r\nConnection: close\r\n\r\n")
            .into_bytes(),
    )
    .await;
    assert_eq!(console.status, 404, "the mock's own answer");
    let requests = mock_requests(mock.addr("mock")).await;
    let seen = requests.text();
    assert!(
        seen.contains("/openApi/runJob") && seen.contains("/index.html"),
        "{seen}"
    );
    assert!(
        !seen.to_ascii_lowercase().contains("x-runonce-secret"),
        "{seen}"
    );
    assert!(!seen.contains(SECRET));
}

#[test]
fn check_config_never_prints_the_secret() {
    let path = std::env::temp_dir().join(format!("runonce-secret-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        format!(
            "upstreams = [\"http://127.0.0.1:1\"]\nshared_secret_header = \"X-Runonce-Secret\"\nshared_secret = \"{SECRET}\"\nallow_networks = [\"10.1.2.3/8\", \"::1\"]\nallow_apps = [1, \"7\"]\n"
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_runonce"))
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!printed.contains(SECRET), "{printed}");
    assert!(
        printed.contains("shared_secret = \"(redacted)\""),
        "{printed}"
    );
    assert!(printed.contains("\"10.0.0.0/8\""), "{printed}");
    assert!(printed.contains("allow_apps = [1, 7]"), "{printed}");
}

/// Spring binds a multipart body's parts as request parameters: with `allow_apps` on, a multipart
/// `/openApi/**` request is refused (415), so an app named only in a part never reaches the server.
#[tokio::test]
async fn allow_apps_refuses_multipart_bodies_it_does_not_read() {
    let mock = mock("v5.1.1-auth-off", 0);
    let proxy = proxy(&[url(mock.addr("mock"))], &["--allow-app", "1"]);
    let body = "--b\r\nContent-Disposition: form-data; name=\"appId\"\r\n\r\n2\r\n--b\r\nContent-Disposition: form-data; name=\"jobId\"\r\n\r\n5\r\n--b--\r\n";
    let request = format!(
        "POST /openApi/deleteJob HTTP/1.1\r\nHost: test\r\nX-POWERJOB-APP-ID: 1\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let answer = send(proxy.addr("proxy"), request.into_bytes()).await;
    assert_eq!(answer.status, 415, "{}", answer.text());
    assert_eq!(
        answer.json().unwrap()["code"],
        "RUNONCE_UNSUPPORTED_MEDIA_TYPE"
    );
    assert_eq!(requests_to(&mock, "/openApi/deleteJob").await, 0);
}
