//! What operators look at: the Grafana dashboard and the Prometheus rules in `deploy/` use
//! only metrics the server exports, and the rules pass `promtool`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::fake::Fake;
use crate::support::proxy::{config, Proxy};
use crate::support::registry::require_binary;

/// Metrics the dashboard and the rules use that other branches add and that this one does
/// not have yet. The lead empties it as they are merged: keep it tiny.
const NOT_YET_MERGED: &[&str] = &[
    // wt-sync: scheduled syncs.
    "ocicache_sync_runs_total",
    "ocicache_sync_last_success_timestamp_seconds",
];

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

/// Every `ocicache_...` name in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("ocicache_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// The expressions of the dashboard's panels (and its variables' queries).
fn dashboard_exprs(json: &serde_json::Value) -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "query" | "definition", serde_json::Value::String(s)) => {
                            out.push(s.clone())
                        }
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(json, &mut out);
    out
}

/// The `expr:` of every rule in a rules file: a one-line value or a `|` block (the lines
/// indented deeper than the key).
fn rule_exprs(yaml: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = yaml.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(value) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let value = value.trim();
        if value != "|" && value != ">" {
            out.push(value.to_string());
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let mut block = String::new();
        while let Some(next) = lines.peek() {
            if next.trim().is_empty() || next.len() - next.trim_start().len() > indent {
                block.push_str(next.trim());
                block.push(' ');
                lines.next();
            } else {
                break;
            }
        }
        out.push(block);
    }
    out
}

/// The series names a `/metrics` text can carry: each family's name with the suffixes its
/// type gives its samples (a family with no sample yet still has its `# TYPE` line).
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix("# TYPE ") {
            let mut parts = t.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                "summary" => &["_sum", "_count"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') {
            if let Some(name) = line.split(['{', ' ']).next() {
                names.insert(name.to_string());
            }
        }
    }
    names
}

/// `/metrics` of a server that has answered a request.
fn live_metrics() -> String {
    let fake = Fake::start();
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(config(dir.path(), &[("docker.io", &fake.url(), true)]));
    assert_eq!(proxy.get("/v2/", &[]).0, 200);
    let (status, _, body) = proxy.get("/metrics", &[]);
    assert_eq!(status, 200);
    String::from_utf8(body).unwrap()
}

#[test]
fn the_dashboard_and_the_rules_use_only_exported_metrics() {
    let exported = exported_names(&live_metrics());
    assert!(
        exported.contains("ocicache_http_requests_total"),
        "{exported:?}"
    );
    let dashboard: serde_json::Value =
        serde_json::from_slice(&std::fs::read(deploy("grafana/ocicache.json")).unwrap())
            .expect("the dashboard is JSON");
    let rules = std::fs::read_to_string(deploy("prometheus/alerts.yaml")).unwrap();
    let exprs = [
        ("dashboard", dashboard_exprs(&dashboard)),
        ("rules", rule_exprs(&rules)),
    ];
    let mut used = BTreeSet::new();
    for (file, exprs) in &exprs {
        let names: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
        assert!(names.len() >= 6, "{file}: too few metrics found: {names:?}");
        let unknown: Vec<&String> = names
            .iter()
            .filter(|n| !exported.contains(*n) && !NOT_YET_MERGED.contains(&n.as_str()))
            .collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics /metrics lacks: {unknown:?}"
        );
        used.extend(names);
    }
    // The allowance holds only what is still used and still missing.
    for n in NOT_YET_MERGED {
        assert!(used.contains(*n), "{n} is allowed but not used");
        assert!(
            !exported.contains(*n),
            "{n} is exported now: drop it from NOT_YET_MERGED"
        );
    }
    assert_eq!(exprs[1].1.len(), 7, "every rule's expr is read");
}

#[test]
fn the_dashboard_is_importable_with_a_datasource_variable() {
    let d: serde_json::Value =
        serde_json::from_slice(&std::fs::read(deploy("grafana/ocicache.json")).unwrap()).unwrap();
    let vars = d["templating"]["list"].as_array().unwrap();
    assert!(vars.iter().any(|v| v["name"] == "datasource"
        && v["type"] == "datasource"
        && v["query"] == "prometheus"));
    let panels = d["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "unique panel ids");
        if p["type"] != "row" {
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
            for t in p["targets"].as_array().unwrap() {
                assert_eq!(t["datasource"]["uid"], "${datasource}", "{}", p["title"]);
            }
        }
    }
    assert!(d["uid"].is_string() && d["title"] == "ocicache" && d["schemaVersion"].is_u64());
}

/// `promtool` with `args` in `deploy/prometheus`; `None` when it is not installed (and not
/// under CI).
fn promtool(args: &[&str]) -> Option<std::process::Output> {
    let bin = require_binary("promtool", "prometheus")?;
    Some(
        Command::new(bin)
            .args(args)
            .current_dir(deploy("prometheus"))
            .output()
            .unwrap(),
    )
}

#[test]
fn promtool_checks_the_rules_and_runs_their_unit_tests() {
    let Some(check) = promtool(&["check", "rules", "alerts.yaml"]) else {
        return;
    };
    let said = String::from_utf8_lossy(&check.stdout).to_string()
        + &String::from_utf8_lossy(&check.stderr);
    assert!(check.status.success(), "promtool check rules: {said}");
    assert!(said.contains("7 rules found"), "{said}");
    let test = promtool(&["test", "rules", "alerts_test.yaml"]).unwrap();
    let said =
        String::from_utf8_lossy(&test.stdout).to_string() + &String::from_utf8_lossy(&test.stderr);
    assert!(test.status.success(), "promtool test rules: {said}");
    assert!(said.contains("SUCCESS"), "{said}");
}

#[test]
fn rule_and_name_parsers_find_what_they_should() {
    let yaml = "    rules:\n      - alert: A\n        expr: |\n          sum(rate(ocicache_a_total[5m]))\n            / ocicache_b > 0\n        for: 5m\n      - alert: B\n        expr: ocicache_c:rate5m > 1\n";
    let exprs = rule_exprs(yaml);
    assert_eq!(exprs.len(), 2, "{exprs:?}");
    let names: Vec<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    assert_eq!(
        names,
        ["ocicache_a_total", "ocicache_b", "ocicache_c:rate5m"]
    );
    let text = "# TYPE ocicache_h histogram\n# TYPE ocicache_c counter\n# TYPE ocicache_g gauge\nocicache_g 1\n";
    let got = exported_names(text);
    for n in [
        "ocicache_h_bucket",
        "ocicache_h_count",
        "ocicache_c_total",
        "ocicache_g",
    ] {
        assert!(got.contains(n), "{n}");
    }
    assert!(
        !got.contains("ocicache_c"),
        "a counter's series end in _total"
    );
}

#[test]
fn latency_bound_and_start_time_are_exported() {
    let fake = Fake::start();
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), &[("docker.io", &fake.url(), true)]);
    c.cache.max_size.0 = 123_456_789;
    let proxy = Proxy::start(c);
    for _ in 0..3 {
        assert_eq!(proxy.get("/v2/", &[]).0, 200);
    }
    assert_eq!(proxy.get("/v2/nope/manifests/1", &[]).0, 404);
    let count = |labels: &str| {
        proxy.metric(&format!(
            "ocicache_http_request_duration_seconds_count{{{labels}}}"
        ))
    };
    assert_eq!(count(r#"route="base",outcome="none""#), 3.0);
    assert_eq!(count(r#"route="manifest",outcome="error""#), 1.0);
    assert_eq!(
        proxy.metric("ocicache_cache_max_size_bytes "),
        123_456_789.0
    );
    let started = proxy.metric("ocicache_process_start_time_seconds ");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - started).abs() < 600.0, "{started} vs {now}");
}
