//! Interop with the real OkHttp: the 5.1.0 client's request path (POWERJOB.md §8) written in Java on Debian's
//! `libokhttp-java` (tests/java/PowerJob510Client.java, compiled here with javac), against the real
//! `mock-powerjob` and `runonce` processes. One `runJob` per scenario; the instances come from the mock's
//! `/mock/stats`.
//!
//! The last scenarios put a hop between the server and runonce that lower-cases every response header name,
//! as the nginx in PowerJob issue #1062 did: the 5.1.0 client's case-sensitive lookup then misses even the
//! header a 5.1.1 server sends, and only runonce's repair (exact case, on the way back) keeps the call single.
//!
//! Java 17 (`javac`), okhttp.jar and okio.jar come from scripts/setup.sh (`make test`).

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use runonce::rawhttp;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// Where Debian's libokhttp-java and libokio-java put their jars.
const JARS: [&str; 2] = ["/usr/share/java/okhttp.jar", "/usr/share/java/okio.jar"];

/// Compiles the Java client into a fresh directory; returns the classpath to run it with.
fn compile_client() -> String {
    for jar in JARS {
        assert!(
            Path::new(jar).exists(),
            "{jar} is missing: run scripts/setup.sh (installs libokhttp-java)"
        );
    }
    let libs = JARS.join(":");
    let classes: PathBuf =
        std::env::temp_dir().join(format!("runonce-okhttp-{}", std::process::id()));
    std::fs::create_dir_all(&classes).expect("class directory");
    let source = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/java/PowerJob510Client.java"
    );
    let out = std::process::Command::new("javac")
        .args(["-nowarn", "-cp", &libs, "-d"])
        .arg(&classes)
        .arg(source)
        .output()
        .expect("javac (a JDK) is missing: run scripts/setup.sh");
    assert!(
        out.status.success(),
        "javac failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!("{}:{libs}", classes.display())
}

/// One run of the Java client: constructor, then one `runJob(5)`; returns its output.
async fn run_client(classpath: &str, address: SocketAddr) -> String {
    let child = tokio::process::Command::new("java")
        .args(["-cp", classpath, "PowerJob510Client"])
        .args([&address.to_string(), "my-app", "123456", "5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("java is missing: run scripts/setup.sh");
    // A JVM start on a loaded machine takes seconds; the client's own calls time out after 2 s each.
    let out = tokio::time::timeout(STEP * 6, child.wait_with_output())
        .await
        .expect("the Java client finished in time")
        .expect("java ran");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the Java client failed ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("RESULT success=true data="), "{stdout}");
    stdout
}

/// A hop that passes requests through as they came and re-writes every response with lower-case header names
/// (re-framed with a Content-Length, as a buffering reverse proxy does). One upstream connection per client
/// connection; stops when dropped.
struct LowerCasingHop {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl LowerCasingHop {
    async fn start(upstream: SocketAddr) -> LowerCasingHop {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, upstream));
            }
        });
        LowerCasingHop { addr, task }
    }
}

impl Drop for LowerCasingHop {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(mut client: TcpStream, upstream: SocketAddr) -> std::io::Result<()> {
    let mut server = TcpStream::connect(upstream).await?;
    while let Some(request) = rawhttp::read_request(&mut client).await? {
        server.write_all(&request.raw).await?;
        let response = read_response(&mut server).await?;
        client.write_all(&lower_cased(&response)).await?;
    }
    Ok(())
}

/// The response with every header name lower-cased and the body framed by Content-Length.
fn lower_cased(response: &RawResponse) -> Vec<u8> {
    let status_line = response.head.lines().next().unwrap_or_default();
    let mut out = format!("{status_line}\r\n");
    for (name, value) in &response.headers {
        let name = name.to_ascii_lowercase();
        if name != "content-length" && name != "transfer-encoding" {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    out.push_str(&format!("content-length: {}\r\n\r\n", response.body.len()));
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&response.body);
    bytes
}

/// How one scenario's `runJob` went on the server.
struct Counts {
    instances: u64,
    run_job_posts: u64,
    auth_failed_logged: bool,
}

/// Runs the Java client once against `mode`, reaching it through the hop and/or runonce as asked.
async fn scenario(classpath: &str, mode: &str, hop: bool, through_runonce: bool) -> Counts {
    let mock = mock(mode, 0);
    let hop = match hop {
        true => Some(LowerCasingHop::start(mock.addr("mock")).await),
        false => None,
    };
    let server = hop.as_ref().map_or(mock.addr("mock"), |hop| hop.addr);
    let runonce = through_runonce.then(|| proxy(&[url(server)], &[]));
    let front = runonce.as_ref().map_or(server, |p| p.addr("proxy"));

    let output = run_client(classpath, front).await;
    let stats = mock_stats(mock.addr("mock")).await;
    Counts {
        instances: stats["instances"].as_u64().unwrap_or(0),
        run_job_posts: stats["requests_by_path"]["/openApi/runJob"]
            .as_u64()
            .unwrap_or(0),
        auth_failed_logged: output.contains("auth failed[authStatus: null]"),
    }
}

#[tokio::test]
async fn the_real_okhttp_client_runs_a_job_once_through_runonce_even_behind_a_lower_casing_hop() {
    let classpath = compile_client();
    // (server mode, lower-casing hop in front of the server, through runonce, instances expected)
    let cases = [
        ("v5.1.0-auth-off", false, false, 2),
        ("v5.1.0-auth-off", false, true, 1),
        ("v5.1.0-auth-off", true, true, 1),
        ("v5.1.1-auth-off", false, false, 1),
        ("v5.1.1-auth-off", true, false, 2),
        ("v5.1.1-auth-off", true, true, 1),
    ];
    println!("OkHttp 3.13.1 (Debian libokhttp-java), PowerJob 5.1.0 client path, one runJob each:");
    println!(
        "{:<16} {:<28} {:>9} {:>13}",
        "server", "path", "instances", "runJob POSTs"
    );
    let mut failures = Vec::new();
    for (mode, hop, through_runonce, expected) in cases {
        let counts = scenario(&classpath, mode, hop, through_runonce).await;
        let path = match (hop, through_runonce) {
            (false, false) => "direct",
            (true, false) => "lower-casing hop",
            (false, true) => "runonce",
            (true, true) => "runonce, lower-casing hop",
        };
        println!(
            "{mode:<16} {path:<28} {:>9} {:>13}",
            counts.instances, counts.run_job_posts
        );
        // The client re-sends exactly when it missed the exact-case header, and each runJob POST reached the
        // server and created an instance.
        let resent = counts.run_job_posts == 2;
        if counts.instances != expected || counts.auth_failed_logged != resent {
            failures.push(format!(
                "{mode} via {path}: {} instances (expected {expected}), {} runJob POSTs, auth failure logged: {}",
                counts.instances, counts.run_job_posts, counts.auth_failed_logged
            ));
        }
    }
    let _ = std::fs::remove_dir_all(classpath.split(':').next().unwrap_or_default());
    assert!(failures.is_empty(), "{failures:#?}");
}
