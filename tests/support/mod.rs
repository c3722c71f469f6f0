//! Test harness: the real `runonce` binary on free loopback ports, a scriptable raw upstream, and raw HTTP
//! (through `runonce::rawhttp`, which keeps header names as they came).
//!
//! Every process is killed on drop; every read has a deadline, so no test can hang.
#![allow(dead_code)] // each test file uses a different part of the harness

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runonce::rawhttp;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
pub mod redis;

/// How long any single network step of a test may take before the test fails.
pub const STEP: Duration = Duration::from_secs(10);

/// A child process of the `runonce` binary, killed on drop.
pub struct Process {
    pub child: Child,
    /// The `key=value` pairs of the `listening …` line the process printed.
    pub addrs: Vec<(String, String)>,
}

impl Process {
    /// Starts `runonce ARGS…` and waits for its `listening …` line on stdout.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Process {
        Process::spawn(args, env, Stdio::inherit())
    }

    /// [`Process::start`], with the process's log (stderr) collected for the test to read.
    pub fn start_logged(args: &[&str], env: &[(&str, &str)]) -> (Process, Logs) {
        let mut process = Process::spawn(args, env, Stdio::piped());
        let stderr = process.child.stderr.take().expect("stderr");
        let logs = Logs::default();
        let lines = Arc::clone(&logs.0);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        (process, logs)
    }

    fn spawn(args: &[&str], env: &[(&str, &str)], stderr: Stdio) -> Process {
        let mut child = Command::new(env!("CARGO_BIN_EXE_runonce"))
            .args(args)
            // Quiet unless a test (or the person running it) asks for more.
            .env(
                "RUNONCE_LOG",
                std::env::var("RUNONCE_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn runonce");
        let stdout = child.stdout.take().expect("stdout");
        // Read the first line on a thread so a process that never prints cannot hang the test.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(STEP).unwrap_or_default();
        assert!(
            line.starts_with("listening "),
            "runonce {args:?} did not start: {line:?}"
        );
        let addrs = line
            .split_whitespace()
            .skip(1)
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        Process { child, addrs }
    }

    pub fn addr(&self, key: &str) -> SocketAddr {
        let (_, value) = self
            .addrs
            .iter()
            .find(|(k, _)| k == key)
            .unwrap_or_else(|| panic!("no {key} address"));
        value.parse().expect("socket address")
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Sends `signal` (`HUP`, `TERM`, …).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The log lines a process wrote to stderr so far (see [`Process::start_logged`]).
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<String>>>);

impl Logs {
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    /// Waits (at most [`STEP`]) for a line containing `needle`, and returns it.
    pub fn wait_for(&self, needle: &str) -> Option<String> {
        let deadline = std::time::Instant::now() + STEP;
        loop {
            if let Some(line) = self.lines().into_iter().find(|l| l.contains(needle)) {
                return Some(line);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `args` for `runonce serve` on free ports in front of `upstreams`, with extra flags.
pub fn proxy_args<'a>(upstreams: &'a [String], extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ];
    for upstream in upstreams {
        args.extend(["--upstream", upstream.as_str()]);
    }
    // The quarantine (a memory store that just started lost whatever a predecessor held) makes each new
    // `runJob` leader ask the server's `queryInstance` first: one request more than the call itself, on
    // upstreams that count what reaches them. Tests of other things turn it off; tests/quarantine.rs names
    // `--quarantine true`, the default.
    if !extra.contains(&"--quarantine") {
        args.extend(["--quarantine", "false"]);
    }
    args.extend_from_slice(extra);
    args
}

/// A request to the admin listener at `admin`: `method path`, with `headers` (each line ending in CRLF).
pub async fn admin_call(admin: SocketAddr, method: &str, path: &str, headers: &str) -> RawResponse {
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: admin\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    raw(admin, request.as_bytes()).await.expect("admin answer")
}

/// `runonce serve` on free ports in front of `upstreams`, with extra flags.
pub fn proxy(upstreams: &[String], extra: &[&str]) -> Process {
    Process::start(&proxy_args(upstreams, extra), &[])
}

/// `runonce mock-powerjob` on a free port.
pub fn mock(mode: &str, latency_ms: u64) -> Process {
    let latency = latency_ms.to_string();
    mock_with(mode, &["--latency-ms", &latency])
}

/// `runonce mock-powerjob` on a free port, with extra flags (`--fault KIND`, …).
pub fn mock_with(mode: &str, extra: &[&str]) -> Process {
    let mut args = vec!["mock-powerjob", "--listen", "127.0.0.1:0", "--mode", mode];
    args.extend_from_slice(extra);
    Process::start(&args, &[])
}

/// The mock's app 1 (`my-app`, password 123456) asks `/authApp`.
const AUTH_BODY: &str = r#"{"appName":"my-app","encryptedPassword":"e10adc3949ba59abbe56e057f20f883e","encryptType":"md5"}"#;

/// A fresh token for app 1 from the mock's `/authApp` (straight to the mock: runonce passes it through anyway).
pub async fn app_token(mock: SocketAddr) -> String {
    let request = format!(
        "POST /openApi/authApp HTTP/1.1\r\nHost: test\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{AUTH_BODY}",
        AUTH_BODY.len()
    );
    let answer = raw(mock, request.as_bytes()).await.expect("authApp");
    answer.json().unwrap()["data"]["token"]
        .as_str()
        .expect("a token")
        .to_string()
}

/// The header lines that present `token` as app 1's.
pub fn credentials(token: &str) -> String {
    format!("X-POWERJOB-APP-ID: 1\r\nX-POWERJOB-ACCESS-TOKEN: {token}\r\n")
}

pub fn url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

/// A raw HTTP answer: `status`, the `head` exactly as it came (without the blank line), `headers` with names as
/// sent, `exact(name)`, `header_lines()`, the `body`, `json()` and `text()`.
pub use rawhttp::Response as RawResponse;

/// Writes `request` to a new connection and reads one response, all within [`STEP`].
pub async fn raw(addr: SocketAddr, request: &[u8]) -> std::io::Result<RawResponse> {
    rawhttp::exchange(addr, request, STEP).await
}

/// Reads one response from `stream`, with a deadline.
pub async fn read_response(stream: &mut TcpStream) -> std::io::Result<RawResponse> {
    tokio::time::timeout(STEP, rawhttp::read_response(stream))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no response in time"))?
}

/// A form POST to `path`, rendered as OkHttp would send it.
pub fn form_post(path: &str, body: &str, extra_headers: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/x-www-form-urlencoded\r\n{extra_headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The mock's `/mock/requests`: every request it saw, as JSON.
pub async fn mock_requests(mock: SocketAddr) -> RawResponse {
    raw(
        mock,
        b"GET /mock/requests HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("the mock's request log")
}

/// The mock's `/mock/stats` JSON.
pub async fn mock_stats(mock: SocketAddr) -> serde_json::Value {
    runonce::sim::mock::fetch_stats(mock, STEP)
        .await
        .expect("mock stats")
}

/// What a scripted upstream does with one request.
pub enum Script {
    /// Write these bytes as the answer (keep the connection open for the next request).
    Answer(Vec<u8>),
    /// Wait, then answer.
    Slow(Duration, Vec<u8>),
    /// Close the connection without answering (after the request was read).
    Hangup,
    /// Write these bytes, then close the connection (an answer delimited by the close).
    Close(Vec<u8>),
}

/// A raw TCP upstream that records each request it reads (head and body, bytes as they came) and answers as
/// `script` says. Reads requests with `rawhttp::read_request` (Content-Length and chunked bodies).
pub struct RawUpstream {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<Vec<u8>>>>,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl RawUpstream {
    pub async fn start(script: impl Fn(&[u8]) -> Script + Send + Sync + 'static) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(script);
        let recorded = Arc::clone(&requests);
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let accepted = Arc::clone(&connections);
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let script = Arc::clone(&script);
                let recorded = Arc::clone(&recorded);
                tokio::spawn(async move {
                    while let Ok(Ok(Some(request))) =
                        tokio::time::timeout(STEP, rawhttp::read_request(&mut stream)).await
                    {
                        let request = request.raw;
                        recorded.lock().unwrap().push(request.clone());
                        match script(&request) {
                            Script::Answer(bytes) => {
                                if stream.write_all(&bytes).await.is_err() {
                                    return;
                                }
                            }
                            Script::Slow(wait, bytes) => {
                                tokio::time::sleep(wait).await;
                                if stream.write_all(&bytes).await.is_err() {
                                    return;
                                }
                            }
                            Script::Hangup => return,
                            Script::Close(bytes) => {
                                let _ = stream.write_all(&bytes).await;
                                return;
                            }
                        }
                    }
                });
            }
        });
        RawUpstream {
            addr,
            requests,
            connections,
            task,
        }
    }

    pub fn url(&self) -> String {
        url(self.addr)
    }

    pub fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn request(&self, i: usize) -> String {
        String::from_utf8_lossy(&self.requests.lock().unwrap()[i]).into_owned()
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A canned 200 answer with the given extra header lines and a small PowerJob body.
pub fn ok_answer(extra: &str) -> Vec<u8> {
    let body = r#"{"success":true,"data":754612332134400064,"message":null}"#;
    format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{body}", body.len())
        .into_bytes()
}

/// The scheduling policy (field 41 of `stat`) of each of the process's threads named `runonce-worker-*`, and
/// of its other threads.
#[cfg(target_os = "linux")]
pub fn thread_policies(pid: u32) -> (Vec<u32>, Vec<u32>) {
    let (mut workers, mut others) = (Vec::new(), Vec::new());
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let stat = std::fs::read_to_string(task.unwrap().path().join("stat")).unwrap();
        let (open, close) = (stat.find('(').unwrap(), stat.rfind(')').unwrap());
        let policy = stat[close + 2..]
            .split(' ')
            .nth(38)
            .unwrap()
            .parse()
            .unwrap();
        if stat[open + 1..close].starts_with("runonce-worker") {
            workers.push(policy);
        } else {
            others.push(policy);
        }
    }
    (workers, others)
}
