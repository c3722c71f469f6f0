//! The dashboard and the alerting rules an operator imports (`monitoring/`, issue "Operating runonce for
//! real"): the rules pass `promtool check rules`, the PrometheusRule manifest holds the same rules, and every
//! runonce metric the dashboard or the rules name is one a running runonce exports.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use support::*;

fn file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(file(path)).unwrap_or_else(|err| panic!("{path}: {err}"))
}

const RULES: &str = "monitoring/prometheus/runonce-rules.yml";
const OPERATOR_RULES: &str = "monitoring/prometheus/runonce-prometheusrule.yaml";
const DASHBOARD: &str = "monitoring/grafana/runonce.json";
const POD_MONITOR: &str = "monitoring/prometheus/runonce-podmonitor.yaml";

#[test]
fn the_rules_pass_promtool() {
    let Ok(checked) = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(file(RULES))
        .output()
    else {
        // Visible in the test output; scripts/setup.sh installs Debian's prometheus, which has promtool.
        eprintln!(
            "SKIPPED the_rules_pass_promtool: promtool is not installed (run scripts/setup.sh)"
        );
        return;
    };
    let said = String::from_utf8_lossy(&checked.stdout).to_string()
        + &String::from_utf8_lossy(&checked.stderr);
    assert!(checked.status.success(), "{said}");
    assert!(said.contains("SUCCESS: 7 rules found"), "{said}");
}

#[test]
fn the_prometheusrule_manifest_holds_the_same_rules() {
    let plain = read(RULES);
    let plain = plain.split_once("groups:\n").expect("a groups: key").1;
    let manifest = read(OPERATOR_RULES);
    assert!(manifest.contains("kind: PrometheusRule"));
    let groups = manifest.split_once("  groups:\n").expect("spec.groups").1;
    let unindented: String = groups
        .lines()
        .map(|l| l.strip_prefix("  ").unwrap_or(l))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(unindented.trim_end(), plain.trim_end());
}

/// The `runonce_*` names in `text`, as a PromQL query names them.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("runonce_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

#[tokio::test]
async fn every_metric_the_dashboard_and_rules_name_is_exported() {
    let dashboard: serde_json::Value = serde_json::from_str(&read(DASHBOARD)).expect("JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10);
    for panel in panels {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{}", panel["title"]);
    }
    let named: BTreeSet<String> = names_in(&read(DASHBOARD))
        .into_iter()
        .chain(names_in(&read(RULES)))
        .collect();
    assert!(named.len() >= 12, "{named:?}");

    // A running runonce, after a guarded call, its duplicate and a pass-through request.
    let mock = mock("v5.1.0-auth-off", 0);
    let proxy = proxy(&[url(mock.addr("mock"))], &[]);
    let form = "jobId=5&delay=0&appId=1&instanceParams=monitoring";
    for _ in 0..2 {
        let answer = raw(proxy.addr("proxy"), &form_post("/openApi/runJob", form, ""))
            .await
            .unwrap();
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    let status = form_post("/openApi/fetchInstanceStatus", "instanceId=1&appId=1", "");
    raw(proxy.addr("proxy"), &status).await.unwrap();
    let scrape = admin_call(proxy.addr("admin"), "GET", "/metrics", "")
        .await
        .text();
    let exported: BTreeSet<String> = scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect();
    let missing: Vec<_> = named.difference(&exported).collect();
    assert!(missing.is_empty(), "not exported: {missing:?}\n{scrape}");
}

/// The PodMonitor scrapes what the gateway manifest runs, under the job the rules name.
#[test]
fn the_podmonitor_scrapes_the_gateway_under_the_job_the_rules_name() {
    let documents = |path: &str| -> Vec<serde_json::Value> {
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))",
            ])
            .arg(file(path))
            .output()
            .expect("python3 (scripts/setup.sh)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON")
    };
    let monitor = &documents(POD_MONITOR)[0];
    assert_eq!(monitor["kind"], "PodMonitor");
    let spec = &monitor["spec"];
    let gateway = documents("docker/k8s/gateway.yaml")
        .into_iter()
        .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "runonce-gateway")
        .expect("the gateway Deployment");
    let pod = &gateway["spec"]["template"];
    let labels = pod["metadata"]["labels"].as_object().expect("pod labels");
    for (name, value) in spec["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels")
    {
        assert_eq!(labels.get(name), Some(value), "the selector's {name}");
    }
    let endpoint = &spec["podMetricsEndpoints"][0];
    assert_eq!(endpoint["path"], "/metrics");
    let ports: Vec<&serde_json::Value> = pod["spec"]["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .flat_map(|c| c["ports"].as_array().into_iter().flatten())
        .collect();
    let admin = ports
        .iter()
        .find(|p| p["name"] == endpoint["port"])
        .expect("the scraped port is one the gateway names");
    assert_eq!(admin["containerPort"], 9700, "the admin port");
    // The job the series get: the pods' value of the jobLabel label, the job RunonceDown names.
    let job = labels[spec["jobLabel"].as_str().expect("jobLabel")]
        .as_str()
        .expect("a job");
    assert!(
        read(RULES).contains(&format!("up{{job=\"{job}\"}}")),
        "job {job}"
    );
}
