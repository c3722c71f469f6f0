//! Real `redis-server` processes for the store tests, on free loopback ports, each in its own temporary
//! directory: a standalone server (optionally with an append-only file, so a restart keeps its data) that can
//! be stopped, restarted on the same port, paused (SIGSTOP) and resumed, and a Redis Cluster of N masters made with `redis-cli --cluster create`.
//!
//! Every process is killed and every directory removed on drop; every wait has a deadline. The tests never
//! touch a Redis they did not start (not even one on the default port).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a server may take to answer `PING` after it was started.
const READY: Duration = Duration::from_secs(10);

/// A `redis-server` child process on `127.0.0.1:port`.
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    /// Arguments besides port, bind address and directory (the Cluster's, for a Cluster node).
    extra: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// A standalone server on a free port, answering `PING`.
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// A standalone server that keeps every acknowledged write across a crash (`appendfsync always`): a
    /// [`Self::restart`] after [`Self::stop`] comes back with its records, as a production Redis with AOF does.
    pub fn start_persistent() -> RedisServer {
        RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"])
    }

    fn start_with(extra: &[&str]) -> RedisServer {
        let cluster = extra.contains(&"--cluster-enabled");
        let mut last_failure = String::new();
        // A port found free may be taken before the server binds it: try a few.
        for _ in 0..5 {
            let port = free_port(cluster);
            let mut server = RedisServer {
                port,
                dir: temp_dir(port),
                extra: extra.iter().map(|s| s.to_string()).collect(),
                child: None,
            };
            match server.spawn() {
                Ok(()) => return server,
                Err(failure) => last_failure = failure,
            }
        }
        panic!("redis-server did not start: {last_failure}");
    }

    /// Starts the process and waits for `PING`; on failure the process is gone again.
    fn spawn(&mut self) -> Result<(), String> {
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        let port = self.port.to_string();
        let log = self.dir.join("redis.log");
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--daemonize", "no", "--loglevel", "notice"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-server is not installed (not on PATH): run `make test`, which installs it, \
                 or install the redis-server package"
            ),
            Err(e) => panic!("cannot start redis-server: {e}"),
        };
        self.child = Some(child);
        let deadline = Instant::now() + READY;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                return Err(format!(
                    "exited with {status} on port {}: {tail:?}",
                    self.port
                ));
            }
            if self.query(&["PING"]).as_deref() == Some("+PONG\r\n") {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!("no PONG on port {} within {READY:?}", self.port));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `redis://127.0.0.1:PORT/0`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Whether the process runs (it may be paused).
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the server (SIGKILL, as a crash); its data is gone (no persistence).
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Starts the server again on the same port (stopping it first if it runs).
    pub fn restart(&mut self) {
        self.kill();
        // The port was just ours; allow for the kernel to let go of it.
        let deadline = Instant::now() + READY;
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(failure) if Instant::now() > deadline => {
                    panic!("redis-server did not restart: {failure}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Freezes the process (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused process run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("redis-server is not running");
        let status = Command::new("kill")
            .arg(signal)
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} failed");
    }

    /// Sends one command and returns the raw reply (RESP), or `None` when there is none within a second.
    pub fn query(&self, args: &[&str]) -> Option<String> {
        query(self.addr(), args)
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of masters without replicas, every slot covered.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// `masters` nodes (at least 3, as `redis-cli --cluster create` wants), joined, `cluster_state:ok` on each.
    pub fn start(masters: usize) -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..masters)
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "5000",
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes.iter().map(|n| n.addr().to_string()).collect();
        let mut create = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run redis-cli ({e}): run `make test`, which installs it")
            });
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = create.try_wait().expect("wait for redis-cli") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = create.kill();
                let _ = create.wait();
                panic!("redis-cli --cluster create did not finish within 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut output = String::new();
        if let Some(mut out) = create.stdout.take() {
            let _ = out.read_to_string(&mut output);
        }
        if let Some(mut err) = create.stderr.take() {
            let _ = err.read_to_string(&mut output);
        }
        assert!(
            status.success(),
            "redis-cli --cluster create failed: {output}"
        );
        let cluster = RedisCluster { nodes };
        cluster.wait_ok();
        cluster
    }

    /// Waits until every node says `cluster_state:ok` (at most 20 s).
    fn wait_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        for node in &self.nodes {
            loop {
                let info = node.query(&["CLUSTER", "INFO"]).unwrap_or_default();
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "node {} not ok within 20 s: {info}",
                    node.port()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Kills every node (their cluster configuration stays on disk).
    pub fn stop(&mut self) {
        for node in &mut self.nodes {
            node.stop();
        }
    }

    /// Starts every node again on its port, with its cluster configuration, and waits for `cluster_state:ok`.
    pub fn restart(&mut self) {
        for node in &mut self.nodes {
            node.restart();
        }
        self.wait_ok();
    }

    /// `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,…`
    pub fn url(&self) -> String {
        let nodes: Vec<String> = self.nodes.iter().map(|n| n.addr().to_string()).collect();
        format!("redis+cluster://{}", nodes.join(","))
    }
}

/// A free loopback port; for a Cluster node also its bus port (port + 10000).
fn free_port(cluster: bool) -> u16 {
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind a loopback port")
            .port();
        if !cluster {
            return port;
        }
        if let Some(bus) = port.checked_add(10_000) {
            if TcpListener::bind(("127.0.0.1", bus)).is_ok() {
                return port;
            }
        }
    }
    panic!("no free loopback port found");
}

fn temp_dir(port: u16) -> PathBuf {
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "runonce-redis-{}-{}-{port}",
        std::process::id(),
        COUNT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// One command over a fresh connection; the reply as text (RESP), `None` when incomplete within a second.
pub fn query(addr: SocketAddr, args: &[&str]) -> Option<String> {
    let timeout = Duration::from_secs(1);
    let mut stream = TcpStream::connect_timeout(&addr, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;
    let mut request = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        request.extend_from_slice(format!("${}\r\n{arg}\r\n", arg.len()).as_bytes());
    }
    stream.write_all(&request).ok()?;
    let deadline = Instant::now() + timeout;
    let mut reply = Vec::new();
    let mut chunk = [0u8; 4096];
    while Instant::now() < deadline {
        if reply_len(&reply).is_some() {
            return Some(String::from_utf8_lossy(&reply).into_owned());
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => reply.extend_from_slice(&chunk[..n]),
        }
    }
    reply_len(&reply).map(|_| String::from_utf8_lossy(&reply).into_owned())
}

/// The length of the first complete RESP2 reply in `buf`, if it is complete.
fn reply_len(buf: &[u8]) -> Option<usize> {
    let line_end = buf.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&buf[1..line_end]).ok()?;
    let after = line_end + 2;
    match buf.first()? {
        b'+' | b'-' | b':' => Some(after),
        b'$' => {
            let len: i64 = line.parse().ok()?;
            if len < 0 {
                return Some(after);
            }
            let end = after + len as usize + 2;
            (buf.len() >= end).then_some(end)
        }
        b'*' => {
            let count: i64 = line.parse().ok()?;
            let mut at = after;
            for _ in 0..count.max(0) {
                at += reply_len(&buf[at..])?;
            }
            Some(at)
        }
        _ => None,
    }
}
