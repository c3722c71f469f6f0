//! The load benchmark's script, run for a few seconds so that it cannot rot: `bench/run.sh --smoke` against the
//! test build of runonce must produce a row with figures for every scenario and system, the ratio table and
//! the soak line. The figures themselves mean nothing here (debug build, one second per row, a busy machine);
//! nothing is asserted on speed.
//!
//! Needs wrk, nginx and redis-server (scripts/setup.sh installs them). idempotent-proxy is optional: when it
//! is not installed its rows must say so rather than go missing.

use std::process::Command;
use std::time::{Duration, Instant};

/// The rows of the table: scenario, system, connections.
const ROWS: &[(&str, &str, &str)] = &[
    ("direct (ceiling)", "upstream nginx", "32"),
    ("pass-through fetchInstanceStatus", "runonce", "32"),
    ("pass-through fetchInstanceStatus", "nginx proxy_pass", "32"),
    ("runJob unique keys", "runonce memory", "32"),
    ("runJob unique keys", "runonce redis", "32"),
    ("runJob unique keys, in quarantine", "runonce memory", "32"),
    ("runJob unique keys", "idempotent-proxy redis", "32"),
    (
        "runJob one Idempotency-Key (replay)",
        "runonce memory",
        "32",
    ),
    ("runJob one Idempotency-Key (replay)", "runonce redis", "32"),
    (
        "runJob one Idempotency-Key (replay)",
        "idempotent-proxy redis",
        "32",
    ),
    (
        "runJob one Idempotency-Key (replay)",
        "runonce memory",
        "256",
    ),
    (
        "runJob one Idempotency-Key (replay)",
        "runonce redis",
        "256",
    ),
    (
        "runJob one Idempotency-Key (replay)",
        "idempotent-proxy redis",
        "256",
    ),
];

/// The script's whole run may take this long before the test gives up on it.
const LIMIT: Duration = Duration::from_secs(240);

#[test]
fn the_benchmark_script_measures_every_scenario_and_system() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = std::env::temp_dir().join(format!("runonce-bench-smoke-{}.md", std::process::id()));
    let _ = std::fs::remove_file(&out);
    let mut child = Command::new("bash")
        .arg(format!("{root}/bench/run.sh"))
        .args(["--smoke", "--bin", env!("CARGO_BIN_EXE_runonce"), "--out"])
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("run bash bench/run.sh");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the script") {
            break status;
        }
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("bench/run.sh --smoke ran longer than {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(status.success(), "bench/run.sh --smoke failed: {status}");
    let report = std::fs::read_to_string(&out).expect("the script wrote its report");
    let _ = std::fs::remove_file(&out);

    assert!(report.contains("<!-- bench:begin"), "{report}");
    assert!(report.contains("<!-- bench:end -->"), "{report}");
    assert!(report.contains("cores"), "machine line: {report}");
    let rows: Vec<Vec<&str>> = report
        .lines()
        .filter(|l| l.starts_with("| "))
        .map(|l| l.trim_matches('|').split('|').map(str::trim).collect())
        .collect();
    for (scenario, system, conns) in ROWS {
        let row = rows
            .iter()
            .find(|r| r.len() == 10 && r[0] == *scenario && r[1] == *system && r[2] == *conns)
            .unwrap_or_else(|| panic!("no row for {scenario} / {system} / c={conns}:\n{report}"));
        if system.starts_with("idempotent-proxy") && row[3].starts_with("skipped") {
            assert_eq!(row[3], "skipped (not installed)", "{row:?}");
            continue;
        }
        let number = |i: usize| -> f64 {
            row[i]
                .parse()
                .unwrap_or_else(|_| panic!("column {i} of {row:?} is not a number"))
        };
        assert!(number(3) > 0.0, "no requests answered: {row:?}");
        for column in 4..=8 {
            number(column);
        }
        if system.starts_with("runonce") {
            assert!(number(9) > 0.0, "runonce's peak RSS: {row:?}");
        }
    }
    for target in [
        "pass-through req/s, runonce ÷ nginx",
        "unique runJob on Redis req/s",
        "replay on Redis req/s at c=32",
        "replay on Redis req/s at c=256",
        "runonce peak RSS, every row",
        "soak: RSS growth",
    ] {
        assert!(
            rows.iter().any(|r| r[0].starts_with(target)),
            "no ratio row {target}:\n{report}"
        );
    }
    // The quarantine row measured leaders that asked PowerJob first: the admin counted them.
    let quarantine = rows
        .iter()
        .find(|r| r[0].starts_with("unique runJob on memory in quarantine"))
        .unwrap_or_else(|| panic!("no quarantine ratio row:\n{report}"));
    let checks = quarantine[1].rsplit("; ").next().unwrap_or("");
    assert!(
        checks.parse::<u64>().is_ok_and(|n| n > 0),
        "no call asked first: {quarantine:?}"
    );
    assert!(report.contains("Soak: "), "soak line: {report}");
}
