//! The deployment files in docker/: what can be checked without a container engine.
//!
//! - Every Kubernetes manifest passes `kubernetes-validate --strict` (the schemas of the oldest Kubernetes the
//!   manifests claim, and of the newest the validator knows).
//! - What a schema cannot see: the gateway's replicas, rollout, disruption budget and drain timing; probes on
//!   the admin port; non-root containers with resources; the sidecar's app pointing at runonce on localhost.
//! - Every `RUNONCE_*` variable in the manifests, the compose file and the Dockerfile is one runonce reads, and
//!   every runonce command line in them (args + env) starts the real binary (listen addresses moved to free
//!   loopback ports). The image itself is built and run, and the compose file brought up, by
//!   tests/container.rs (podman).
//! - `runonce health`, the image's health check, against a real runonce.
//!
//! YAML is read with Python's PyYAML, which kubernetes-validate depends on (both installed by scripts/setup.sh).

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use support::{mock, proxy, url, Process};

/// Kubernetes versions the manifests are validated against: the oldest they claim (the preStop `sleep` action
/// is on by default from 1.30) and the newest the validator knows.
const KUBERNETES_VERSIONS: [Option<&str>; 2] = [Some("1.30.0"), None];

/// Where the image puts the binary (docker/Dockerfile); in the tests it is the binary cargo built.
const IMAGE_BINARY: &str = "/usr/local/bin/runonce";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo("docker/k8s"))
        .expect("docker/k8s")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "sidecar and gateway manifests: {files:?}");
    files
}

fn python(args: &[&str]) -> Output {
    Command::new("python3")
        .args(args)
        .output()
        .expect("python3 is missing: run scripts/setup.sh")
}

/// Every document of a YAML file, as JSON.
fn yaml(path: &Path) -> Vec<Value> {
    let out = python(&[
        "-c",
        "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]))",
        path.to_str().expect("utf-8 path"),
    ]);
    assert!(
        out.status.success(),
        "{} does not parse as YAML (or PyYAML is missing: run scripts/setup.sh): {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON from python")
}

/// Every Kubernetes object of every manifest, with the file it came from.
fn objects() -> Vec<(PathBuf, Value)> {
    manifests()
        .into_iter()
        .flat_map(|file| yaml(&file).into_iter().map(move |doc| (file.clone(), doc)))
        .collect()
}

fn find<'a>(objects: &'a [(PathBuf, Value)], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .map(|(_, o)| o)
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in docker/k8s"))
}

fn list(value: &Value) -> &[Value] {
    value.as_array().map(Vec::as_slice).unwrap_or_default()
}

fn strings(value: &Value) -> Vec<String> {
    list(value)
        .iter()
        .map(|v| v.as_str().expect("a string").to_owned())
        .collect()
}

/// A pod template's containers, init containers (native sidecars) included.
fn containers(pod: &Value) -> Vec<&Value> {
    list(&pod["initContainers"])
        .iter()
        .chain(list(&pod["containers"]))
        .collect()
}

fn is_runonce(container: &Value) -> bool {
    container["image"]
        .as_str()
        .is_some_and(|image| image.starts_with("runonce:") || image.contains("/runonce:"))
}

/// A container's plain `env` values; values from Secrets become a stand-in.
fn container_env(container: &Value) -> BTreeMap<String, String> {
    list(&container["env"])
        .iter()
        .map(|var| {
            let name = var["name"].as_str().expect("env name").to_owned();
            let value = match var["value"].as_str() {
                Some(value) => value.to_owned(),
                None => "from-a-secret".to_owned(),
            };
            (name, value)
        })
        .collect()
}

/// The port number a probe's `port` (a number or a container port's name) points at.
fn probe_port(container: &Value, port: &Value) -> u64 {
    if let Some(number) = port.as_u64() {
        return number;
    }
    list(&container["ports"])
        .iter()
        .find(|p| p["name"] == *port)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no container port named {port}"))
}

fn port_of(addr: &str) -> u64 {
    addr.rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr}"))
}

#[test]
fn every_manifest_passes_kubernetes_validate_strictly() {
    for file in manifests() {
        for version in KUBERNETES_VERSIONS {
            let mut args = vec!["-m", "kubernetes_validate", "--strict"];
            if let Some(version) = version {
                args.extend(["-k", version]);
            }
            args.push(file.to_str().expect("utf-8 path"));
            let out = python(&args);
            let report = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success(),
                "{} against {version:?} (kubernetes-validate missing? run scripts/setup.sh):\n{report}",
                file.display()
            );
            assert!(
                report.contains("passed"),
                "validated nothing in {}: {report}",
                file.display()
            );
        }
    }
}

#[test]
fn the_gateway_keeps_two_replicas_serving_through_rollouts_drains_and_shutdown() {
    let objects = objects();
    let deployment = find(&objects, "Deployment", "runonce-gateway");
    let spec = &deployment["spec"];
    assert!(spec["replicas"].as_u64() >= Some(2), "replicas ≥ 2");
    assert_eq!(spec["strategy"]["type"], "RollingUpdate");
    assert_eq!(spec["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
    let labels = &spec["template"]["metadata"]["labels"];
    assert_eq!(spec["selector"]["matchLabels"], *labels);

    let pdb = find(&objects, "PodDisruptionBudget", "runonce-gateway");
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"], *labels,
        "the PDB covers the gateway pods"
    );
    assert!(pdb["spec"]["minAvailable"].as_u64() >= Some(1));

    let pod = &spec["template"]["spec"];
    let runonce = containers(pod)
        .into_iter()
        .find(|c| is_runonce(c))
        .expect("a runonce container");
    let vars = container_env(runonce);
    let service = find(&objects, "Service", "runonce-gateway");
    assert_eq!(service["spec"]["selector"], *labels);
    let service_ports = list(&service["spec"]["ports"]);
    assert_eq!(service_ports.len(), 1, "the Service exposes the proxy only");
    assert_eq!(
        probe_port(runonce, &service_ports[0]["targetPort"]),
        port_of(&vars["RUNONCE_LISTEN"]),
        "the Service reaches the proxy port"
    );

    // SIGTERM comes after the preStop sleep, and runonce drains for drain_timeout after it.
    let pre_stop = runonce["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .expect("a preStop sleep, so endpoints stop routing here before SIGTERM");
    let grace = humantime::parse_duration(&vars["RUNONCE_DRAIN_TIMEOUT"]).expect("a duration");
    let termination = pod["terminationGracePeriodSeconds"].as_u64().expect("set");
    assert!(
        Duration::from_secs(termination) > Duration::from_secs(pre_stop) + grace,
        "terminationGracePeriodSeconds {termination} must exceed the preStop {pre_stop} s + drain_timeout {grace:?}"
    );

    // The store is the Redis of the same file, run without eviction.
    let redis = find(&objects, "Deployment", "runonce-redis");
    let redis_container = &redis["spec"]["template"]["spec"]["containers"][0];
    let args = strings(&redis_container["args"]);
    let policy = args.iter().position(|a| a == "--maxmemory-policy");
    assert_eq!(
        policy.map(|i| args[i + 1].as_str()),
        Some("noeviction"),
        "{args:?}"
    );
    let redis_service = find(&objects, "Service", "runonce-redis");
    let redis_port = redis_service["spec"]["ports"][0]["port"].as_u64().unwrap();
    assert_eq!(
        vars["RUNONCE_STORE"],
        format!("redis://runonce-redis:{redis_port}/0")
    );
    assert_eq!(
        redis_service["spec"]["selector"],
        redis["spec"]["template"]["metadata"]["labels"]
    );
}

#[test]
fn every_container_runs_as_non_root_with_resources_and_runonce_is_probed_on_its_admin_port() {
    let mut runonce_containers = 0;
    for (file, object) in objects() {
        if object["kind"] != "Deployment" {
            continue;
        }
        let name = format!("{} {}", file.display(), object["metadata"]["name"]);
        let pod = &object["spec"]["template"]["spec"];
        assert_eq!(
            pod["securityContext"]["runAsNonRoot"], true,
            "{name}: runAsNonRoot"
        );
        assert!(
            pod["securityContext"]["runAsUser"].as_u64() > Some(0),
            "{name}: a non-root runAsUser"
        );
        for container in containers(pod) {
            let cname = format!("{name}/{}", container["name"]);
            let resources = &container["resources"];
            for (kind, resource) in [
                ("requests", "cpu"),
                ("requests", "memory"),
                ("limits", "memory"),
            ] {
                assert!(
                    resources[kind][resource].is_string(),
                    "{cname}: resources.{kind}.{resource}"
                );
            }
            let security = &container["securityContext"];
            assert_eq!(security["allowPrivilegeEscalation"], false, "{cname}");
            assert_ne!(security["runAsUser"], 0, "{cname}: no root override");
            assert_ne!(security["runAsNonRoot"], false, "{cname}: no root override");
            if !is_runonce(container) {
                continue;
            }
            runonce_containers += 1;
            let vars = container_env(container);
            let admin = &vars["RUNONCE_ADMIN_LISTEN"];
            assert!(
                !admin.starts_with("127.") && !admin.starts_with("[::1]"),
                "{cname}: the kubelet probes the pod IP, so admin_listen {admin} must not be loopback"
            );
            for probe in ["readinessProbe", "livenessProbe"] {
                let get = &container[probe]["httpGet"];
                assert_eq!(
                    probe_port(container, &get["port"]),
                    port_of(admin),
                    "{cname}: {probe} on the admin port"
                );
                let path = get["path"].as_str().unwrap_or_default();
                assert!(
                    ["/healthz", "/readyz"].contains(&path),
                    "{cname}: {probe} path {path}"
                );
            }
        }
    }
    assert!(
        runonce_containers >= 2,
        "the gateway and the sidecar run runonce"
    );
}

#[test]
fn the_sidecar_app_talks_to_runonce_on_localhost_and_runonce_starts_before_it() {
    let objects = objects();
    let app = find(&objects, "Deployment", "my-app");
    let pod = &app["spec"]["template"]["spec"];
    let sidecar = list(&pod["initContainers"])
        .iter()
        .find(|c| is_runonce(c))
        .expect("runonce as a native sidecar (an init container)");
    assert_eq!(
        sidecar["restartPolicy"], "Always",
        "a native sidecar keeps running beside the app"
    );
    let listen = &container_env(sidecar)["RUNONCE_LISTEN"];
    let app_container = list(&pod["containers"])
        .iter()
        .find(|c| !is_runonce(c))
        .expect("an app container");
    let expected = format!("127.0.0.1:{}", port_of(listen));
    assert!(
        container_env(app_container)
            .values()
            .any(|v| *v == expected),
        "the app's PowerJob address is runonce's listen port on localhost ({expected})"
    );
}

/// A runonce command line found in a deployment file: where, the args after the binary, and its environment.
struct CommandLine {
    source: String,
    args: Vec<String>,
    env: BTreeMap<String, String>,
}

/// The Dockerfile's final stage, as (instruction, rest) pairs with continuation lines joined.
fn dockerfile_final_stage() -> (usize, Vec<(String, String)>) {
    let text = std::fs::read_to_string(repo("docker/Dockerfile")).expect("docker/Dockerfile");
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if current.is_empty() && (line.is_empty() || line.starts_with('#')) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(start) => current.push_str(start),
            None => {
                current.push_str(line);
                let (instruction, rest) = current.split_once(' ').unwrap_or((&current, ""));
                instructions.push((instruction.to_ascii_uppercase(), rest.trim().to_owned()));
                current.clear();
            }
        }
    }
    let stages = instructions.iter().filter(|(i, _)| i == "FROM").count();
    let last = instructions
        .iter()
        .rposition(|(i, _)| i == "FROM")
        .expect("a FROM");
    (stages, instructions.split_off(last))
}

/// An exec-form (JSON array) instruction argument.
fn exec_form(rest: &str) -> Vec<String> {
    serde_json::from_str(rest).unwrap_or_else(|_| panic!("not exec form (JSON array): {rest}"))
}

/// The image's entrypoint, command and environment.
fn image() -> (Vec<String>, Vec<String>, BTreeMap<String, String>) {
    let (_, stage) = dockerfile_final_stage();
    let last = |name: &str| {
        stage
            .iter()
            .rev()
            .find(|(i, _)| i == name)
            .map(|(_, rest)| rest.clone())
            .unwrap_or_else(|| panic!("no {name} in the final stage"))
    };
    let env = stage
        .iter()
        .filter(|(i, _)| i == "ENV")
        .flat_map(|(_, rest)| rest.split_whitespace())
        .map(|pair| {
            let (k, v) = pair.split_once('=').expect("ENV KEY=value");
            (k.to_owned(), v.to_owned())
        })
        .collect();
    (exec_form(&last("ENTRYPOINT")), exec_form(&last("CMD")), env)
}

/// Every runonce command line in docker/: the Dockerfile's, the compose services' and the manifests'.
fn command_lines() -> Vec<CommandLine> {
    let (entrypoint, cmd, image_env) = image();
    assert_eq!(entrypoint, [IMAGE_BINARY]);
    let mut lines = vec![CommandLine {
        source: "Dockerfile CMD".into(),
        args: cmd.clone(),
        env: image_env.clone(),
    }];
    let compose = &yaml(&repo("docker/docker-compose.yml"))[0];
    for (name, service) in compose["services"].as_object().expect("services") {
        if service["image"].as_str() != Some("runonce:local") {
            continue;
        }
        let mut env = image_env.clone();
        for (k, v) in service["environment"].as_object().into_iter().flatten() {
            env.insert(k.clone(), v.as_str().expect("string value").to_owned());
        }
        lines.push(CommandLine {
            source: format!("compose {name}"),
            args: strings(&service["command"]),
            env,
        });
    }
    for (file, object) in objects() {
        if object["kind"] != "Deployment" {
            continue;
        }
        for container in containers(&object["spec"]["template"]["spec"]) {
            if !is_runonce(container) {
                continue;
            }
            assert!(
                container["command"].is_null(),
                "the image's entrypoint is the binary"
            );
            let mut env = image_env.clone();
            env.extend(container_env(container));
            lines.push(CommandLine {
                source: format!("{} {}", file.display(), object["metadata"]["name"]),
                args: strings(&container["args"]),
                env,
            });
        }
    }
    lines
}

/// The variables runonce reads: one per setting, plus RUNONCE_CONFIG and RUNONCE_LOG, which `serve --help`
/// names.
fn variables_runonce_reads() -> Vec<String> {
    let help = Command::new(env!("CARGO_BIN_EXE_runonce"))
        .args(["serve", "--help"])
        .output()
        .expect("runonce serve --help");
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let mut vars = runonce::config::env_vars();
    for extra in ["RUNONCE_CONFIG", "RUNONCE_LOG"] {
        assert!(help.contains(extra), "`serve --help` names {extra}");
        vars.push(extra.to_owned());
    }
    vars
}

#[test]
fn every_runonce_variable_in_docker_files_is_one_runonce_reads() {
    let known = variables_runonce_reads();
    let mut seen = Vec::new();
    for line in command_lines() {
        for name in line.env.keys().filter(|k| k.starts_with("RUNONCE_")) {
            assert!(
                known.contains(name),
                "{}: {name} is not a runonce setting (known: {known:?})",
                line.source
            );
            seen.push(name.clone());
        }
    }
    assert!(seen.iter().any(|v| v == "RUNONCE_STORE"), "{seen:?}");
}

/// `args` with every listen address moved to a free loopback port, so the command can run here.
fn localized(args: &[String]) -> Vec<String> {
    let mut out = args.to_vec();
    for i in 1..out.len() {
        if matches!(out[i - 1].as_str(), "--listen" | "--admin-listen") {
            out[i] = "127.0.0.1:0".into();
        }
    }
    out
}

#[test]
fn every_runonce_command_line_in_docker_files_starts_the_real_binary() {
    let mut started = Vec::new();
    for line in command_lines() {
        let args = localized(&line.args);
        let mut env = line.env.clone();
        for key in ["RUNONCE_LISTEN", "RUNONCE_ADMIN_LISTEN"] {
            if env.contains_key(key) {
                env.insert(key.into(), "127.0.0.1:0".into());
            }
        }
        // The image has no upstream of its own: `docker run` supplies one.
        if line.source == "Dockerfile CMD" {
            env.insert("RUNONCE_UPSTREAMS".into(), "http://powerjob:7700".into());
        }
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // Process::start fails the test unless the process prints its `listening …` line.
        let process = Process::start(&args, &env);
        started.push(format!("{}: {:?}", line.source, process.addrs));
    }
    println!("{started:#?}");
    assert!(started.len() >= 5, "{started:#?}");
}

#[test]
fn the_dockerfile_is_multi_stage_non_root_with_a_health_check_the_binary_runs() {
    let (stages, stage) = dockerfile_final_stage();
    assert!(stages >= 2, "a build stage and a runtime stage");
    let base = match stage[0].1.strip_prefix("${") {
        // FROM ${BASE}: the ARG's default.
        Some(arg) => {
            let text = std::fs::read_to_string(repo("docker/Dockerfile")).unwrap();
            let name = arg.trim_end_matches('}');
            let prefix = format!("ARG {name}=");
            text.lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .unwrap_or_else(|| panic!("no {prefix}"))
                .to_owned()
        }
        None => stage[0].1.clone(),
    };
    assert!(
        base.contains("distroless") || base.starts_with("scratch"),
        "a small runtime base: {base}"
    );
    let user = stage
        .iter()
        .rev()
        .find(|(i, _)| i == "USER")
        .map(|(_, user)| user.clone())
        .expect("USER");
    let uid: u32 = user
        .split(':')
        .next()
        .and_then(|u| u.parse().ok())
        .expect("a numeric USER, so Kubernetes can check runAsNonRoot");
    assert_ne!(uid, 0);
    assert!(
        stage
            .iter()
            .any(|(i, rest)| i == "COPY" && rest.ends_with(IMAGE_BINARY)),
        "the binary is copied to {IMAGE_BINARY}"
    );

    let healthcheck = stage
        .iter()
        .find(|(i, _)| i == "HEALTHCHECK")
        .map(|(_, rest)| rest.clone())
        .expect("HEALTHCHECK");
    let cmd = healthcheck
        .split_once("CMD ")
        .map(|(_, cmd)| exec_form(cmd))
        .expect("HEALTHCHECK … CMD [exec form]");
    assert_eq!(cmd[0], IMAGE_BINARY);
    let url_at = cmd
        .iter()
        .position(|a| a == "--url")
        .expect("an explicit --url")
        + 1;
    let (_, _, env) = image();
    let admin_port = port_of(&env["RUNONCE_ADMIN_LISTEN"]);
    assert!(
        cmd[url_at].starts_with(&format!("http://127.0.0.1:{admin_port}/")),
        "the health check asks the image's admin port: {cmd:?}"
    );

    // The same arguments against a real runonce, its admin port in place of the image's.
    let mock = mock("v5.1.0-auth-off", 0);
    let proxy = proxy(&[url(mock.addr("mock"))], &[]);
    let mut args = cmd[1..].to_vec();
    args[url_at - 1] = cmd[url_at].replace(
        &format!("127.0.0.1:{admin_port}"),
        &proxy.addr("admin").to_string(),
    );
    let out = health(&args);
    assert!(out.status.success(), "{}", stderr(&out));
}

fn health(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_runonce"))
        .args(args)
        .output()
        .expect("runonce health")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn health_at(url: &str) -> Output {
    health(&["health".into(), "--url".into(), url.into()])
}

#[test]
fn runonce_health_exits_0_only_on_a_2xx_answer() {
    let mock = mock("v5.1.0-auth-off", 0);
    let proxy = proxy(&[url(mock.addr("mock"))], &[]);
    let admin = proxy.addr("admin");

    let healthy = health_at(&format!("http://{admin}/healthz"));
    assert_eq!(healthy.status.code(), Some(0), "{}", stderr(&healthy));
    assert!(String::from_utf8_lossy(&healthy.stdout).starts_with("healthy: 200"));
    let ready = health_at(&format!("http://{admin}/readyz"));
    assert_eq!(ready.status.code(), Some(0), "{}", stderr(&ready));
    // The compose file checks the mock this way.
    let stats = health_at(&format!("http://{}/mock/stats", mock.addr("mock")));
    assert_eq!(stats.status.code(), Some(0), "{}", stderr(&stats));

    let missing = health_at(&format!("http://{admin}/nope"));
    assert_eq!(missing.status.code(), Some(1));
    assert!(stderr(&missing).contains("404"), "{}", stderr(&missing));

    // No upstream reachable: alive, but not ready.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let lonely = proxy_to(dead);
    let admin = lonely.addr("admin");
    assert_eq!(
        health_at(&format!("http://{admin}/healthz")).status.code(),
        Some(0)
    );
    let unready = health_at(&format!("http://{admin}/readyz"));
    assert_eq!(unready.status.code(), Some(1));
    assert!(stderr(&unready).contains("503"), "{}", stderr(&unready));

    // Nothing listening at all.
    drop(lonely);
    let gone = health_at(&format!("http://{admin}/healthz"));
    assert_eq!(gone.status.code(), Some(1), "{}", stderr(&gone));
}

fn proxy_to(upstream: std::net::SocketAddr) -> Process {
    proxy(&[url(upstream)], &["--connect-timeout", "200ms"])
}

#[test]
fn the_compose_file_runs_runonce_on_redis_in_front_of_the_mock() {
    let compose = &yaml(&repo("docker/docker-compose.yml"))[0];
    let services = &compose["services"];
    for name in ["redis", "runonce", "mock"] {
        assert!(services[name].is_object(), "service {name}");
    }
    let redis = strings(&services["redis"]["command"]);
    let policy = redis.iter().position(|a| a == "--maxmemory-policy");
    assert_eq!(policy.map(|i| redis[i + 1].as_str()), Some("noeviction"));

    let mock_args = strings(&services["mock"]["command"]);
    assert_eq!(mock_args[0], "mock-powerjob");
    let mock_listen = mock_args
        .iter()
        .position(|a| a == "--listen")
        .map(|i| &mock_args[i + 1])
        .expect("mock --listen");
    let runonce = &services["runonce"];
    let args = strings(&runonce["command"]);
    let upstream = args
        .iter()
        .position(|a| a == "--upstream")
        .map(|i| &args[i + 1])
        .expect("--upstream");
    assert_eq!(*upstream, format!("http://mock:{}", port_of(mock_listen)));
    assert!(
        runonce["environment"]["RUNONCE_STORE"]
            .as_str()
            .is_some_and(|s| s.starts_with("redis://redis:6379")),
        "{runonce}"
    );
    for service in ["runonce", "mock"] {
        let build = &services[service]["build"];
        let dockerfile = repo("docker")
            .join(build["context"].as_str().expect("context"))
            .join(build["dockerfile"].as_str().expect("dockerfile"));
        assert!(dockerfile.exists(), "{}", dockerfile.display());
    }
    // Published ports point at the ports the processes listen on.
    let (_, _, image_env) = image();
    let published: Vec<u64> = strings(&runonce["ports"])
        .iter()
        .map(|p| port_of(p))
        .collect();
    for key in ["RUNONCE_LISTEN", "RUNONCE_ADMIN_LISTEN"] {
        assert!(
            published.contains(&port_of(&image_env[key])),
            "{key} is published: {published:?}"
        );
    }
    // The mock has no runonce admin port: its health check must not use the image's.
    let check = strings(&services["mock"]["healthcheck"]["test"]);
    assert!(
        check
            .iter()
            .any(|a| a.ends_with(&format!(":{}/mock/stats", port_of(mock_listen)))),
        "{check:?}"
    );
}
