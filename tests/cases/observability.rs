//! What operators look at: the Grafana dashboard and the Prometheus rules in `deploy/` use
//! only metrics the server exports, and the rules pass `promtool`; the status page, in a
//! real browser (Debian's chromium, headless, with nothing able to leave the machine), shows
//! what the server is doing, loads nothing from anywhere else, and agrees with `/metrics`
//! and `/api/v1/cache`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ocicache::config::{HumanDuration, SyncConfig};

use crate::support::fake::{Fake, Fault};
use crate::support::proxy::{config, Proxy};
use crate::support::registry::{
    header, http_request, random_bytes, require_binary, try_http_request,
};
use crate::support::wait_until;

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
        let unknown: Vec<&String> = names.iter().filter(|n| !exported.contains(*n)).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics /metrics lacks: {unknown:?}"
        );
        used.extend(names);
    }
    for needed in ["ocicache_pins_over_bound", "ocicache_sync_runs_total"] {
        assert!(used.contains(needed), "{needed}");
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

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A proxy of a fake upstream that has served a few pulls: two tags of `library/app`
/// pulled (one three times), a blob filled then hit, and one manifest request the upstream
/// failed with a 503 before answering again. With `sync`, also a `[[sync]]` entry that keeps
/// and pins `library/base:1` (synced before this returns).
fn served_a_few_pulls(dir: &Path, fake: &Fake, sync: bool) -> Proxy {
    let mut c = config(dir, &[("docker.io", &fake.url(), true)]);
    // Small enough that the usage bar shows.
    c.cache.max_size.0 = 8 << 20;
    if sync {
        fake.add_image(
            "library/base",
            "1",
            &["linux/amd64", "linux/arm64"],
            200_000,
            7,
        );
        c.sync = vec![SyncConfig {
            image: "docker.io/library/base".into(),
            tags: Some(vec!["1".into()]),
            tag_pattern: None,
            platforms: vec![],
            interval: HumanDuration(Duration::from_secs(6 * 3600)),
            pin: true,
        }];
    }
    let proxy = Proxy::start(c);
    if sync {
        wait_until("the sync's first run", Duration::from_secs(20), || {
            let s = proxy.state.sync.status();
            s.entries[0].runs >= 1 && !s.entries[0].running
        });
    }
    let blob = random_bytes(300_000, 18);
    let d = fake.add_blob(&blob);
    for (tag, body) in [
        ("1.0", "{\"schemaVersion\":2,\"a\":1}"),
        ("2.0", "{\"schemaVersion\":2}"),
    ] {
        fake.add_manifest("library/app", Some(tag), OCI_MANIFEST, body.as_bytes());
    }
    fake.fault("/manifests/2.0", Fault::Status(503), Some(1));
    assert_eq!(proxy.get("/v2/app/manifests/2.0", &[]).0, 503);
    for _ in 0..3 {
        assert_eq!(proxy.get("/v2/app/manifests/1.0", &[]).0, 200);
    }
    assert_eq!(proxy.get("/v2/app/manifests/2.0", &[]).0, 200);
    for _ in 0..2 {
        assert_eq!(proxy.get(&format!("/v2/app/blobs/{d}"), &[]).2, blob);
    }
    proxy
}

/// `GET` on the admin listener: status and body.
fn admin_get(proxy: &Proxy, path: &str) -> (u16, String) {
    let (s, _, body) = http_request("GET", &format!("{}{path}", proxy.admin_url()), &[], b"");
    (s, String::from_utf8(body).unwrap())
}

/// The exact value the page gives the figure `id` (its `data-value`), in the server's
/// HTML or in a browser's serialized DOM.
fn page_value(html: &str, id: &str) -> f64 {
    let at = [
        format!("id={id} data-value=\""),
        format!("id=\"{id}\" data-value=\""),
    ]
    .iter()
    .find_map(|p| html.find(p.as_str()).map(|i| i + p.len()))
    .unwrap_or_else(|| panic!("no figure {id} on the page"));
    let rest = &html[at..];
    rest[..rest.find('"').unwrap()].parse().unwrap()
}

#[test]
fn the_pages_numbers_agree_with_the_metrics_and_the_admin_api() {
    let fake = Fake::start();
    let dir = tempfile::tempdir().unwrap();
    let proxy = served_a_few_pulls(dir.path(), &fake, false);
    // Quiet: nothing runs, so the three answers are of the same moment.
    assert_eq!(proxy.state.cache.fills_in_flight(), 0);
    let (s, page) = admin_get(&proxy, "/");
    assert_eq!(s, 200);
    let (s, api) = admin_get(&proxy, "/api/v1/cache");
    assert_eq!(s, 200);
    let api: serde_json::Value = serde_json::from_str(&api).unwrap();
    let metric = |name: &str| proxy.metric(name);
    let figures = [
        (
            "cache-size",
            &api["size"],
            metric("ocicache_cache_size_bytes "),
        ),
        (
            "cache-max",
            &api["max_size"],
            metric("ocicache_cache_max_size_bytes "),
        ),
        (
            "cache-blobs",
            &api["blobs"],
            metric("ocicache_cache_entries "),
        ),
        (
            "cache-pinned",
            &api["pinned_bytes"],
            metric("ocicache_pinned_bytes "),
        ),
        ("hits", &api["hits"], metric("ocicache_cache_hits_total")),
        (
            "misses",
            &api["misses"],
            metric("ocicache_cache_misses_total"),
        ),
        (
            "bytes-local",
            &api["served_bytes"]["local"],
            metric("ocicache_served_bytes_total{source=\"local\"}"),
        ),
        (
            "bytes-upstream",
            &api["served_bytes"]["upstream"],
            metric("ocicache_served_bytes_total{source=\"upstream\"}"),
        ),
    ];
    for (id, from_api, from_metrics) in figures {
        let on_page = page_value(&page, id);
        assert_eq!(
            Some(on_page),
            from_api.as_f64(),
            "{id}: page vs /api/v1/cache"
        );
        assert_eq!(on_page, from_metrics, "{id}: page vs /metrics");
    }
    assert_eq!(
        page_value(&page, "bytes-upstream"),
        300_000.0,
        "not vacuous"
    );
    assert_eq!(
        page_value(&page, "hits"),
        3.0,
        "a blob hit and two tag hits"
    );
    let ratio = api["hit_ratio"].as_f64().unwrap();
    assert!((page_value(&page, "hit-ratio") - ratio).abs() < 1e-9);
    // Within its first five minutes, the recent figures are everything so far.
    assert_eq!(page_value(&page, "hits-recent"), page_value(&page, "hits"));
    assert_eq!(page_value(&page, "bytes-local-recent"), 300_000.0);
}

#[test]
fn the_page_escapes_what_comes_from_outside_and_keeps_the_token_rule() {
    let fake = Fake::start();
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), &[("docker.io", &fake.url(), true)]);
    c.admin.token = Some(ocicache::config::Secret("tok3n".into()));
    let proxy = Proxy::start(c);
    // An upstream error whose message carries markup: the fake's 503 says what it is told.
    fake.fault("/manifests/", Fault::Status(503), None);
    assert_eq!(
        proxy.get("/v2/x/manifests/<b>1", &[]).0 / 100,
        4,
        "a bad tag"
    );
    assert_eq!(proxy.get("/v2/evil/manifests/1", &[]).0, 503);
    let url = format!("{}/", proxy.admin_url());
    let (s, h, _) = http_request("GET", &url, &[], b"");
    assert_eq!(s, 401);
    // A browser is asked for the token as a Basic password, and may give it so.
    assert!(header(&h, "www-authenticate")
        .unwrap()
        .starts_with("Basic "));
    for wrong in ["Basic b3BzOm5vcGU=", "Bearer nope"] {
        assert_eq!(
            http_request("GET", &url, &[("authorization", wrong)], b"").0,
            401
        );
    }
    // "operator:tok3n"
    let basic = ("authorization", "Basic b3BlcmF0b3I6dG9rM24=");
    assert_eq!(http_request("GET", &url, &[basic], b"").0, 200);
    let (s, h, body) = http_request("GET", &url, &[("authorization", "Bearer tok3n")], b"");
    assert_eq!(s, 200);
    assert!(header(&h, "content-type").unwrap().starts_with("text/html"));
    assert!(header(&h, "content-security-policy")
        .unwrap()
        .starts_with("default-src 'none'"));
    let page = String::from_utf8(body).unwrap();
    assert!(
        page.contains("GET /v2/evil/manifests/1"),
        "the error is listed"
    );
    assert!(!page.contains("<b>"), "no markup from outside");
    for external in ["http://", "https://", "//fonts", "@import", "url("] {
        assert!(!page.contains(external), "{external} in the page");
    }
}

/// Where test artifacts go: `target/test-artifacts/`.
fn artifacts() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// What a browser's net log shows: each request's URL and who initiated it (`not an
/// origin` for the browser itself, else the page's origin), and every address it opened a
/// TCP connection to.
struct NetLog {
    requests: Vec<(String, String)>,
    connected: Vec<String>,
}

impl NetLog {
    fn read(path: &Path) -> NetLog {
        let log: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path).unwrap()).expect("a whole net log");
        let kind = |name: &str| log["constants"]["logEventTypes"][name].as_u64();
        let (start, connect) = (kind("URL_REQUEST_START_JOB"), kind("TCP_CONNECT_ATTEMPT"));
        assert!(
            start.is_some() && connect.is_some(),
            "the net log's event types"
        );
        let mut out = NetLog {
            requests: Vec::new(),
            connected: Vec::new(),
        };
        for e in log["events"].as_array().unwrap() {
            let p = &e["params"];
            let text = |k: &str| p[k].as_str().unwrap_or("").to_string();
            // An event's end carries no parameters.
            if e["type"].as_u64() == start && p["url"].is_string() {
                out.requests.push((text("url"), text("initiator")));
            } else if e["type"].as_u64() == connect && p["address"].is_string() {
                out.connected.push(text("address"));
            }
        }
        out
    }
}

/// Runs headless chromium on `url` with everything but loopback unresolvable and its own
/// background traffic off; `what` is `--dump-dom` or `--screenshot=<file>`. Returns its
/// stdout and its net log.
fn chromium(bin: &Path, url: &str, what: &str, scratch: &Path) -> (String, NetLog) {
    let netlog = scratch.join(format!("netlog-{}.json", what.len()));
    let out = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1280,1040",
        ])
        .arg(format!(
            "--user-data-dir={}",
            scratch.join("profile").display()
        ))
        .arg(format!("--log-net-log={}", netlog.display()))
        .arg(what)
        .arg(url)
        .current_dir(scratch)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8(out.stdout).unwrap(),
        NetLog::read(&netlog),
    )
}

#[test]
fn the_status_page_in_a_real_browser_shows_a_fill_in_flight_and_asks_no_other_host() {
    let Some(bin) = require_binary("chromium", "chromium") else {
        return;
    };
    let fake = Fake::start();
    let dir = tempfile::tempdir().unwrap();
    let proxy = served_a_few_pulls(dir.path(), &fake, true);
    // A fill in flight: 4 MiB at 16 KiB every 300 ms, about 77 s, while the browser looks
    // (twice: chromium on a loaded machine took more than the 20 s of 64 KiB chunks).
    let slow = random_bytes(4 << 20, 19);
    let slow_digest = fake.add_blob(&slow);
    fake.fault(
        &slow_digest,
        Fault::Slow {
            chunk: 16 << 10,
            delay: Duration::from_millis(300),
        },
        None,
    );
    let url = format!("{}/v2/app/blobs/{slow_digest}", proxy.url());
    // Cut when the proxy stops at the end: its result does not matter.
    let puller = std::thread::spawn(move || try_http_request("GET", &url, &[], b"").is_ok());
    wait_until("the fill to stream", Duration::from_secs(10), || {
        proxy
            .state
            .cache
            .fills_status()
            .iter()
            .any(|f| f.received > 0)
    });

    let scratch = tempfile::tempdir().unwrap();
    let page = format!("{}/", proxy.admin_url());
    let (dom, asked) = chromium(&bin, &page, "--dump-dom", scratch.path());
    let shot = artifacts().join("status-page.png");
    let (_, asked_too) = chromium(
        &bin,
        &page,
        &format!("--screenshot={}", shot.display()),
        scratch.path(),
    );
    assert!(
        proxy.state.cache.fills_in_flight() == 1,
        "the fill was in flight while the browser looked"
    );

    // The rendered text: the cache's usage, the fill, the upstream's state.
    let (size, _) = proxy.state.cache.usage();
    assert_eq!(page_value(&dom, "cache-size"), size as f64);
    assert!(
        dom.contains(&ocicache::prefetch::human(size)),
        "usage in human units"
    );
    assert!(dom.contains("Fills in flight"));
    assert!(
        dom.contains(&slow_digest[..19]),
        "the fill's digest is shown"
    );
    assert!(dom.contains(&format!("title=\"{slow_digest}\"")));
    assert!(
        dom.contains("of 4MiB") || dom.contains("of 4.0MiB"),
        "bytes of total: {dom}"
    );
    assert!(dom.contains("docker.io/library/app"), "the fill's image");
    assert!(
        dom.contains("class=\"state up\">up<"),
        "the upstream is up again"
    );
    assert!(dom.contains("HTTP 503"), "its last error");
    assert!(
        dom.contains("docker.io/library/app:1.0"),
        "the most pulled image"
    );
    // The sync entry ran and pinned its image.
    assert!(dom.contains("docker.io/library/base"), "the sync entry");
    assert!(
        dom.contains("class=\"state up\">ok<"),
        "its last run succeeded: {dom}"
    );
    assert!(dom.contains("docker.io/library/base:1"), "its pin");

    // The page asked for nothing but the admin address; the browser's own background
    // requests (initiated by no origin) resolved to nothing; no connection went anywhere
    // but loopback.
    let admin = format!("{}/", proxy.admin_url());
    let origin = admin.trim_end_matches('/');
    for log in [&asked, &asked_too] {
        assert!(
            log.requests.iter().any(|(u, _)| *u == admin),
            "the net log shows the page: {:?}",
            log.requests
        );
        for (u, initiator) in &log.requests {
            assert!(
                u.starts_with(&admin) || initiator == "not an origin",
                "the page asked for {u} (initiator {initiator})"
            );
            assert!(
                initiator == origin || initiator == "not an origin",
                "{initiator}"
            );
        }
        assert!(!log.connected.is_empty(), "the net log shows connections");
        for a in &log.connected {
            assert!(a.starts_with("127.0.0.1:"), "a connection to {a}");
        }
    }
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a screenshot"
    );
    eprintln!("screenshot: {}", shot.display());
    drop(proxy);
    let _ = puller.join();
}

#[test]
fn a_blob_that_fails_its_digest_shows_in_the_pages_recent_errors() {
    let fake = Fake::start();
    let data = random_bytes(100_000, 20);
    let d = fake.add_blob(&data);
    fake.fault(&d, Fault::CorruptBody, None);
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(config(dir.path(), &[("docker.io", &fake.url(), true)]));
    let cut = try_http_request("GET", &format!("{}/v2/x/blobs/{d}", proxy.url()), &[], b"");
    assert!(
        cut.map_or(true, |(_, _, body)| body != data),
        "never the wrong body whole"
    );
    wait_until("the failure is kept", Duration::from_secs(5), || {
        !proxy.state.status.errors().is_empty()
    });
    let (s, page) = admin_get(&proxy, "/");
    assert_eq!(s, 200);
    assert!(
        page.contains(&format!("does not match digest {d}")),
        "the page names the digest"
    );
    assert_eq!(
        proxy.metric("ocicache_fills_failed_total{reason=\"digest_mismatch\"}"),
        1.0,
        "what OcicacheDigestMismatch alerts on"
    );
}
