//! The image and the compose file, built and run (issue "Operating runonce for real").
//!
//! podman, with runc, builds docker/Dockerfile from the binary cargo built (`--build-arg BINARY=prebuilt`, so
//! nothing compiles inside a container) on local stand-ins for its base images, which scripts/base-images.sh
//! unpacks from Debian's packages; no registry is needed. Then:
//!
//! - the image: the mock and the proxy as two containers on a network of the test's own, each with a read-only
//!   root, every capability dropped and user 65532; duplicate `runJob`s through the proxy make one instance
//!   (and the auth header comes back in its exact case);
//!   podman runs the image's HEALTHCHECK (and it fails where there is no runonce admin port); SIGTERM stops the
//!   proxy cleanly.
//! - the static build: `cargo build --target x86_64-unknown-linux-musl` gives a binary with no interpreter,
//!   which runs `FROM scratch` (`--build-arg BASE=scratch`) as the proxy and the mock do above, with every
//!   worker thread under SCHED_BATCH.
//! - docker/docker-compose.yml under podman-compose: Redis, the mock and runonce; the same duplicates make one
//!   instance, with the keys in Redis; `down` leaves nothing behind.
//!
//! Each test has a podman of its own: containers.conf, storage and network files in a temporary folder
//! (CONTAINERS_CONF, CONTAINERS_STORAGE_CONF), all removed at the end. What rootful podman's netavark changes on
//! the machine stays: IP forwarding on, and its iptables chains, emptied of every rule when the networks go. The
//! tests take turns, since the bridges and subnets podman makes are the kernel's, not the folder's. Where podman
//! cannot run a container, a test says so on the terminal (past the test harness's capture) and returns:
//! skipped with its reason, never passed in silence.

mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use support::*;
use tokio::sync::MutexGuard;

/// The image the compose file names, built here from the test binary.
const IMAGE: &str = "runonce:local";
/// distroless's `nonroot`.
const NONROOT: &str = "65532:65532";
/// Any one podman or podman-compose command may take this long (seconds) before the test fails.
const COMMAND_LIMIT: &str = "180";
/// One at a time (see the module's note).
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Says why a test did not run, where the test harness does not capture it, and returns; with
/// `RUNONCE_CONTAINER_TESTS=required` (CI sets it: its machine runs podman) a skip fails the test instead.
fn skipped(test: &str, why: &str) {
    if std::env::var("RUNONCE_CONTAINER_TESTS").as_deref() == Ok("required") {
        panic!("{test} cannot run, and RUNONCE_CONTAINER_TESTS=required: {why}");
    }
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

fn said(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

/// A podman of the test's own: its configuration, images, containers and networks live in `dir`.
struct Podman {
    dir: PathBuf,
}

impl Podman {
    /// A podman of its own, or why there cannot be one here.
    fn new(test: &str) -> Result<Podman, String> {
        if Command::new("podman").arg("--version").output().is_err() {
            return Err("podman is not installed (scripts/setup.sh installs it)".into());
        }
        // Rootful podman: the tests make networks and stand-in images with files owned by 65532.
        let uid = Command::new("id").arg("-u").output().map(|out| out.stdout);
        if !uid.is_ok_and(|uid| uid.trim_ascii() == b"0") {
            return Err("these tests run podman as root, as CI does".into());
        }
        let dir = std::env::temp_dir().join(format!("runonce-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("networks")).expect("podman folder");
        // crun refuses this machine's hybrid cgroup set-up; runc does not. There is no systemd to run health
        // checks on a timer (the tests run them), nor to log events to. The ulimits are this machine's hard
        // limits, which podman's defaults exceed.
        let conf = format!(
            "[containers]\n\
             default_ulimits = [\"nofile=20000:20000\", \"nproc=32768:32768\"]\n\
             [engine]\n\
             runtime = \"runc\"\n\
             cgroup_manager = \"cgroupfs\"\n\
             events_logger = \"file\"\n\
             [network]\n\
             network_backend = \"netavark\"\n\
             network_config_dir = \"{}\"\n",
            dir.join("networks").display()
        );
        std::fs::write(dir.join("containers.conf"), conf).expect("containers.conf");
        let storage = format!(
            "[storage]\ndriver = \"overlay\"\nrunroot = \"{}\"\ngraphroot = \"{}\"\n",
            dir.join("run").display(),
            dir.join("storage").display()
        );
        std::fs::write(dir.join("storage.conf"), storage).expect("storage.conf");
        let podman = Podman { dir };
        let info = podman.output("podman", &["info"]);
        if !info.status.success() {
            return Err(format!("`podman info` failed: {}", said(&info)));
        }
        Ok(podman)
    }

    /// `program args…` (podman, or python3 running podman-compose) on this podman, within [`COMMAND_LIMIT`].
    fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut command = Command::new("timeout");
        command
            .arg(COMMAND_LIMIT)
            .arg(program)
            .args(args)
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"));
        command
    }

    fn output(&self, program: &str, args: &[&str]) -> Output {
        self.command(program, args)
            .output()
            .unwrap_or_else(|err| panic!("{program} {args:?}: {err}"))
    }

    /// `podman args…`, which must succeed; its standard output.
    fn podman(&self, args: &[&str]) -> String {
        let out = self.output("podman", args);
        assert!(out.status.success(), "podman {args:?}: {}", said(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The stand-in base images (scripts/base-images.sh). Err: podman cannot run a container here.
    fn base_images(&self) -> Result<(), String> {
        let base = self
            .command(
                "bash",
                &[repo("scripts/base-images.sh").to_str().expect("path")],
            )
            .output()
            .expect("bash");
        assert!(
            base.status.success(),
            "scripts/base-images.sh: {}",
            said(&base)
        );
        // Whether a container runs at all, on the base image alone: its dynamic loader says its version.
        let probe = self.output(
            "podman",
            &[
                "run",
                "--rm",
                "--network",
                "none",
                "gcr.io/distroless/cc-debian12:nonroot",
                "/lib64/ld-linux-x86-64.so.2",
                "--version",
            ],
        );
        if !probe.status.success() {
            return Err(format!(
                "podman cannot run a container here: {}",
                said(&probe)
            ));
        }
        Ok(())
    }

    /// The stand-in base images, then [`IMAGE`] from docker/Dockerfile with the test binary in it. Err: podman
    /// cannot run a container here.
    fn images(&self) -> Result<(), String> {
        self.base_images()?;
        self.build(IMAGE, Path::new(env!("CARGO_BIN_EXE_runonce")), &[]);
        Ok(())
    }

    /// `tag` from docker/Dockerfile around `binary` (`--build-arg BINARY=prebuilt`), with more build arguments;
    /// checks that the image runs as nonroot and kept its HEALTHCHECK.
    fn build(&self, tag: &str, binary: &Path, build_args: &[&str]) {
        let context = self.dir.join(format!("context-{}", tag.replace(':', "-")));
        std::fs::create_dir_all(&context).expect("build context");
        std::fs::copy(binary, context.join("runonce")).expect("binary");
        let dockerfile = repo("docker/Dockerfile");
        let mut args = vec![
            "build",
            "--quiet",
            "--format",
            "docker",
            "--file",
            dockerfile.to_str().expect("path"),
            "--build-arg",
            "BINARY=prebuilt",
        ];
        for arg in build_args {
            args.extend(["--build-arg", arg]);
        }
        args.extend(["--tag", tag, context.to_str().expect("path")]);
        self.podman(&args);
        // --format docker keeps the HEALTHCHECK (an OCI image has no place for it).
        let config = self.podman(&[
            "image",
            "inspect",
            tag,
            "--format",
            "{{.Config.User}} {{json .Config.Healthcheck.Test}}",
        ]);
        assert_eq!(
            config,
            format!(
                "{NONROOT} [\"CMD\",\"/usr/local/bin/runonce\",\"health\",\"--url\",\"http://127.0.0.1:9700/healthz\"]"
            )
        );
    }

    /// Starts the mock and a proxy in front of it from `image`, on a network of their own, each with a read-only
    /// root, every capability dropped and user 65532; returns the published (proxy, admin, mock) ports. The
    /// proxy finds the mock by `upstream`.
    fn mock_and_proxy(&self, image: &str, upstream: Upstream) -> (u16, u16, u16) {
        self.podman(&["network", "create", "runonce-test"]);
        let (proxy_port, admin_port, mock_port) = (free_port(), free_port(), free_port());
        let hardened = [
            "run",
            "--detach",
            "--network",
            "runonce-test",
            "--read-only",
            "--cap-drop",
            "all",
            "--security-opt",
            "no-new-privileges",
            "--user",
            NONROOT,
        ];
        let publish = |port: u16, to: u16| format!("127.0.0.1:{port}:{to}");
        let (mock_published, proxy_published, admin_published) = (
            publish(mock_port, 7700),
            publish(proxy_port, 7700),
            publish(admin_port, 9700),
        );
        let mut mock = hardened.to_vec();
        mock.extend(["--name", "mock", "--publish", &mock_published, image]);
        mock.extend(["mock-powerjob", "--listen", "0.0.0.0:7700", "--mode"]);
        mock.push("v5.1.0-auth-off");
        self.podman(&mock);
        let host = match upstream {
            Upstream::ByName => "mock".to_string(),
            Upstream::ByAddress => self.podman(&[
                "inspect",
                "mock",
                "--format",
                "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            ]),
        };
        let upstream = format!("http://{host}:7700");
        let mut proxy = hardened.to_vec();
        proxy.extend(["--name", "proxy", "--publish", &proxy_published]);
        proxy.extend(["--publish", &admin_published, image]);
        proxy.extend(["serve", "--upstream", &upstream]);
        self.podman(&proxy);
        (proxy_port, admin_port, mock_port)
    }

    /// Runs `container`'s health check now (there is no systemd timer to): whether it passed.
    fn health_check(&self, container: &str) -> bool {
        self.output("podman", &["healthcheck", "run", container])
            .status
            .success()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        for args in [
            &["rm", "--all", "--force", "--time", "0"][..],
            &["network", "prune", "--force"],
            &["system", "reset", "--force"],
        ] {
            let _ = self.output("podman", args);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The test's turn and a podman of its own, named `name`; None where there cannot be one here (said on the
/// terminal, as `test` skipped).
async fn podman_for(test: &str, name: &str) -> Option<(MutexGuard<'static, ()>, Podman)> {
    let turn = TURN.lock().await;
    match Podman::new(name) {
        Ok(podman) => Some((turn, podman)),
        Err(why) => {
            skipped(test, &why);
            None
        }
    }
}

/// How the proxy container names the mock's.
enum Upstream {
    /// `mock`, resolved by podman's DNS (aardvark-dns), as the compose file does.
    ByName,
    /// Its address on the network.
    ByAddress,
}

/// A free port on loopback, for podman to publish a container's port on.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Waits (bounded) until the admin at `admin` answers /readyz with 200.
async fn wait_ready(admin: SocketAddr) {
    for _ in 0..100 {
        let request = b"GET /readyz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n";
        if raw(admin, request)
            .await
            .is_ok_and(|answer| answer.status == 200)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("runonce at {admin} never became ready");
}

/// A `runJob` sent again with a new token (as the 5.1.0 client's re-send, or a retry after a time-out, sends
/// it), and four concurrent duplicates, all under one `Idempotency-Key`, through `proxy` to the mock at `mock`:
/// every answer names the one instance, and the mock created one.
async fn duplicates_make_one_instance(proxy: SocketAddr, mock: SocketAddr) {
    const FORM: &str = "appId=1&jobId=7&instanceParams=container&delay=0";
    let call = move |token: String| async move {
        let headers = credentials(&token) + "Idempotency-Key: container-test-1\r\n";
        let answer = raw(proxy, &form_post("/openApi/runJob", FORM, &headers))
            .await
            .expect("runJob answer");
        assert_eq!(answer.status, 200, "{}", answer.text());
        let body = answer.json().expect("a JSON body");
        assert_eq!(body["success"], true, "{body}");
        (answer, body["data"].clone())
    };
    let (first, instance) = call(app_token(mock).await).await;
    // The mock is PowerJob 5.1.0 with auth off: it sends no auth header, and runonce adds it in its exact case,
    // so the 5.1.0 client takes the success for one.
    assert_eq!(
        first.exact("X-POWERJOB-AUTH-PASSED"),
        Some("true"),
        "{}",
        first.head
    );
    let (_, again) = call(app_token(mock).await).await;
    assert_eq!(again, instance);
    let token = app_token(mock).await;
    let concurrent: Vec<_> = (0..4).map(|_| tokio::spawn(call(token.clone()))).collect();
    for task in concurrent {
        assert_eq!(task.await.expect("a duplicate").1, instance);
    }
    assert_eq!(mock_stats(mock).await["instances"], 1);
}

#[tokio::test]
async fn the_image_runs_in_front_of_the_mock_as_nonroot_on_a_read_only_root() {
    const TEST: &str = "the_image_runs_in_front_of_the_mock_as_nonroot_on_a_read_only_root";
    let Some((_turn, podman)) = podman_for(TEST, "image").await else {
        return;
    };
    if let Err(why) = podman.images() {
        return skipped(TEST, &why);
    }
    let (proxy_port, admin_port, mock_port) = podman.mock_and_proxy(IMAGE, Upstream::ByName);

    wait_ready(loopback(admin_port)).await;
    duplicates_make_one_instance(loopback(proxy_port), loopback(mock_port)).await;

    // What the kernel says of the running proxy: user nonroot, no capabilities.
    let top = podman.podman(&["top", "proxy", "user", "capeff"]);
    let row: Vec<&str> = top
        .lines()
        .nth(1)
        .expect("a process")
        .split_whitespace()
        .collect();
    assert_eq!(row, ["nonroot", "none"], "{top}");
    // The image's HEALTHCHECK passes on the proxy, and fails on the mock, which has no runonce admin port.
    assert!(podman.health_check("proxy"));
    let status = podman.podman(&["inspect", "proxy", "--format", "{{.State.Health.Status}}"]);
    assert_eq!(status, "healthy");
    assert!(!podman.health_check("mock"));
    // runonce is PID 1 in its container: SIGTERM drains and exits 0, well within podman's 10 s.
    let stopping = std::time::Instant::now();
    podman.podman(&["stop", "--time", "10", "proxy"]);
    assert!(
        stopping.elapsed() < Duration::from_secs(8),
        "{:?}",
        stopping.elapsed()
    );
    let exit = podman.podman(&["inspect", "proxy", "--format", "{{.State.ExitCode}}"]);
    assert_eq!(exit, "0", "{}", podman.podman(&["logs", "proxy"]));
}

#[tokio::test]
async fn the_compose_file_comes_up_under_podman_compose() {
    const TEST: &str = "the_compose_file_comes_up_under_podman_compose";
    let Some((_turn, podman)) = podman_for(TEST, "compose").await else {
        return;
    };
    if !podman
        .output("python3", &["-c", "import podman_compose"])
        .status
        .success()
    {
        return skipped(
            TEST,
            "podman-compose is not installed (scripts/setup.sh installs it)",
        );
    }
    if let Err(why) = podman.images() {
        return skipped(TEST, &why);
    }
    let (proxy_port, admin_port, mock_port) = (free_port(), free_port(), free_port());
    let compose = repo("docker/docker-compose.yml");
    let compose = compose.to_str().expect("path");
    let project = format!("runonce-test-{}", std::process::id());
    let compose_run = |args: &[&str]| {
        let mut all = vec![
            "-m",
            "podman_compose",
            "--file",
            compose,
            "--project-name",
            &project,
        ];
        all.extend_from_slice(args);
        let out = podman
            .command("python3", &all)
            .env("PROXY_PORT", proxy_port.to_string())
            .env("ADMIN_PORT", admin_port.to_string())
            .env("MOCK_PORT", mock_port.to_string())
            .output()
            .expect("podman-compose");
        assert!(
            out.status.success(),
            "podman-compose {args:?}: {}",
            said(&out)
        );
    };
    compose_run(&["up", "--detach"]);
    let container = |service: &str| {
        podman.podman(&[
            "ps",
            "--filter",
            &format!("label=com.docker.compose.service={service}"),
            "--format",
            "{{.Names}}",
        ])
    };
    let (redis, mock, runonce) = (container("redis"), container("mock"), container("runonce"));

    wait_ready(loopback(admin_port)).await;
    duplicates_make_one_instance(loopback(proxy_port), loopback(mock_port)).await;
    // The key is in the compose file's Redis.
    let keys = podman.podman(&[
        "exec",
        &redis,
        "redis-cli",
        "--scan",
        "--pattern",
        "runonce:*",
    ]);
    assert!(!keys.is_empty(), "no runonce key in Redis");
    // Every service's health check passes, with no shell in any image.
    for name in [&redis, &mock, &runonce] {
        assert!(podman.health_check(name), "{name}");
    }

    compose_run(&["down", "--timeout", "10"]);
    let left = podman.podman(&["ps", "--all", "--format", "{{.Names}}"]);
    assert_eq!(left, "", "containers left after down");
}

/// The musl target triple of the static build.
const MUSL: &str = "x86_64-unknown-linux-musl";

/// `cargo build --target x86_64-unknown-linux-musl` of the binary, into target/musl (a build directory of its
/// own, apart from the one this test runs from): its path, or why it cannot be built here.
fn static_binary() -> Result<PathBuf, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let libdir = Command::new("rustc")
        .args(["--print", "target-libdir", "--target", MUSL])
        .output()
        .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        .map_err(|err| format!("rustc: {err}"))?;
    if !libdir.is_dir() {
        return Err(format!(
            "the {MUSL} target is not installed (scripts/setup.sh adds it with rustup)"
        ));
    }
    let target_dir = repo("target/musl");
    let built = Command::new(cargo)
        .args(["build", "--locked", "--bin", "runonce", "--target", MUSL])
        .env("CARGO_TARGET_DIR", &target_dir)
        .current_dir(repo(""))
        .output()
        .expect("cargo");
    assert!(built.status.success(), "the static build: {}", said(&built));
    Ok(target_dir.join(MUSL).join("debug/runonce"))
}

/// Whether an ELF64 file names a program interpreter (a `PT_INTERP` program header): a dynamically linked
/// executable does, a static one (static-pie included) does not.
fn has_interpreter(elf: &[u8]) -> bool {
    assert_eq!(&elf[..5], b"\x7fELF\x02", "an ELF64 file");
    let u16_at = |at: usize| u16::from_le_bytes([elf[at], elf[at + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (size, count) = (u16_at(0x36), u16_at(0x38));
    (0..count).any(|i| {
        let at = phoff + i * size;
        u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) == 3
    })
}

#[tokio::test]
async fn a_static_build_runs_from_scratch_with_its_workers_under_sched_batch() {
    const TEST: &str = "a_static_build_runs_from_scratch_with_its_workers_under_sched_batch";
    let Some((_turn, podman)) = podman_for(TEST, "static").await else {
        return;
    };
    let binary = match static_binary() {
        Ok(binary) => binary,
        Err(why) => return skipped(TEST, &why),
    };
    let elf = std::fs::read(&binary).expect("the static binary");
    assert!(!has_interpreter(&elf), "{} is not static", binary.display());
    let cargo_built = std::fs::read(env!("CARGO_BIN_EXE_runonce")).expect("the test binary");
    assert!(
        has_interpreter(&cargo_built),
        "the check can tell a dynamic one"
    );
    if let Err(why) = podman.base_images() {
        return skipped(TEST, &why);
    }
    podman.build("runonce:static", &binary, &["BASE=scratch"]);
    let files = podman.podman(&[
        "image",
        "inspect",
        "runonce:static",
        "--format",
        "{{len .RootFS.Layers}}",
    ]);
    assert_eq!(files, "1", "FROM scratch: one layer, the binary");
    // By address: musl's resolver failed a lookup of the mock's name now and then right after the containers
    // started (1 in 60 here; glibc's, in the image above, none): README, Deploy.
    let (proxy_port, admin_port, mock_port) =
        podman.mock_and_proxy("runonce:static", Upstream::ByAddress);

    wait_ready(loopback(admin_port)).await;
    duplicates_make_one_instance(loopback(proxy_port), loopback(mock_port)).await;
    // musl's sched_setscheduler always fails; the system call does not: every worker runs under SCHED_BATCH.
    let pid: u32 = podman
        .podman(&["inspect", "proxy", "--format", "{{.State.Pid}}"])
        .parse()
        .expect("the proxy's pid");
    let (workers, others) = thread_policies(pid);
    assert!(
        !workers.is_empty() && workers.iter().all(|&p| p == 3),
        "{workers:?}"
    );
    // The main thread and the rest keep the normal policy (a thread a worker starts inherits the worker's).
    assert!(others.contains(&0), "{others:?}");
    assert!(podman.health_check("proxy"));
}
