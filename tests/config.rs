//! Bad settings from a flag, the environment or a file stop the binary with exit code 64 and name the key.

use std::process::{Command, Output};

fn runonce(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_runonce"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run runonce")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_bad_flag_value_exits_64_naming_the_flag() {
    let out = runonce(
        &[
            "serve",
            "--upstream",
            "http://127.0.0.1:1",
            "--body-limit",
            "lots",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("--body-limit"), "{}", stderr(&out));
}

#[test]
fn a_bad_environment_value_exits_64_naming_the_variable() {
    let out = runonce(
        &["serve", "--upstream", "http://127.0.0.1:1"],
        &[("RUNONCE_AUTH_HEADER", "sometimes")],
    );
    assert_eq!(out.status.code(), Some(64));
    assert!(
        stderr(&out).contains("RUNONCE_AUTH_HEADER"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn no_upstream_exits_64_naming_upstreams() {
    let out = runonce(&["serve", "--listen", "127.0.0.1:0"], &[]);
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("upstreams"), "{}", stderr(&out));
}

#[test]
fn an_unknown_flag_exits_64() {
    let out = runonce(&["serve", "--upstreem", "http://127.0.0.1:1"], &[]);
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn check_config_prints_the_effective_settings_of_the_example_file() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/runonce.toml");
    let out = runonce(&["check-config", example], &[("RUNONCE_MAX_HEADERS", "77")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let printed: toml::Table = String::from_utf8_lossy(&out.stdout).parse().expect("TOML");
    assert_eq!(
        printed["max_headers"].as_integer(),
        Some(77),
        "the environment applies"
    );
    assert_eq!(
        printed["upstreams"][0].as_str(),
        Some("http://127.0.0.1:7701")
    );
    assert_eq!(printed["auth_header"].as_str(), Some("repair"));
}

#[test]
fn check_config_names_an_unknown_key_in_a_file() {
    let path = std::env::temp_dir().join(format!("runonce-bad-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        "upstreams = [\"http://127.0.0.1:1\"]\nlisten_addr = \"127.0.0.1:1\"\n",
    )
    .unwrap();
    let out = runonce(&["check-config", path.to_str().unwrap()], &[]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("listen_addr"), "{}", stderr(&out));
}

#[test]
fn a_redis_url_that_does_not_parse_exits_64_before_listening() {
    let out = runonce(
        &[
            "serve",
            "--upstream",
            "http://127.0.0.1:1",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--store",
            "redis://[bad",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("store"), "{}", stderr(&out));
    assert!(
        out.stdout.is_empty(),
        "nothing listened: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn an_unknown_runonce_variable_is_named_in_a_warning() {
    let file =
        std::env::temp_dir().join(format!("runonce-unknown-env-{}.toml", std::process::id()));
    std::fs::write(&file, "upstreams = [\"http://127.0.0.1:1\"]\n").unwrap();
    let out = runonce(
        &["check-config", file.to_str().unwrap()],
        &[("RUNONCE_SHUTDOWN_GRACE", "5s"), ("RUNONCE_LOG", "info")],
    );
    std::fs::remove_file(&file).ok();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("RUNONCE_SHUTDOWN_GRACE is not a runonce setting"),
        "{err}"
    );
    assert!(!err.contains("RUNONCE_LOG"), "RUNONCE_LOG is read: {err}");
}
