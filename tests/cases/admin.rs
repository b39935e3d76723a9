//! The admin API (issue 17) end to end: a proxy in front of the fake upstream, its admin
//! listener asked over HTTP as an operator would, the fake counting what reaches the
//! upstream.

use std::time::Duration;

use serde_json::Value;

use crate::support::fake::{Fake, Fault};
use crate::support::proxy::{config, Proxy};
use crate::support::registry::{header, http_request, random_bytes};
use crate::support::wait_until;

const TOKEN: &str = "s3cret-admin-token";

/// A proxy of `fake` (the default upstream `docker.io`) with its admin API and `TOKEN`.
fn proxy_of(dir: &std::path::Path, fake: &Fake, max_size: u64) -> Proxy {
    let mut c = config(dir, &[("docker.io", &fake.url(), true)]);
    c.admin.token = Some(ocicache::config::Secret(TOKEN.into()));
    c.cache.max_size.0 = max_size;
    Proxy::start(c)
}

/// An admin request with the token: the status and the JSON body.
fn admin(proxy: &Proxy, method: &str, path: &str, body: &str) -> (u16, Value) {
    let auth = format!("Bearer {TOKEN}");
    let url = format!("{}{path}", proxy.admin_url());
    let (status, _, bytes) =
        http_request(method, &url, &[("authorization", &auth)], body.as_bytes());
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, json)
}

/// The OCI error code of an error envelope.
fn code(body: &Value) -> &str {
    body["errors"][0]["code"].as_str().unwrap_or("")
}

#[test]
fn the_cache_report_has_the_figures_and_every_request_needs_the_token() {
    let fake = Fake::start();
    let data = random_bytes(200_000, 17);
    let d = fake.add_blob(&data);
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_of(dir.path(), &fake, 1 << 30);

    // Without the token, or with a wrong one: 401, Bearer challenge, the spec's envelope.
    let url = format!("{}/api/v1/cache", proxy.admin_url());
    for auth in [None, Some("Bearer nope"), Some("Basic czNjcmV0")] {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", *a)).collect();
        let (s, h, body) = http_request("GET", &url, &headers, b"");
        assert_eq!(s, 401, "{auth:?}");
        assert!(header(&h, "www-authenticate")
            .unwrap()
            .starts_with("Bearer"));
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(code(&body), "UNAUTHORIZED");
    }
    // The public port never answers the admin API.
    let (s, _, _) = proxy.get("/api/v1/cache", &[]);
    assert_eq!(s, 404);

    // A miss then a hit.
    let blob = format!("/v2/x/blobs/{d}");
    assert_eq!(proxy.get(&blob, &[]).0, 200);
    assert_eq!(proxy.get(&blob, &[]).0, 200);
    let (s, report) = admin(&proxy, "GET", "/api/v1/cache", "");
    assert_eq!(s, 200, "{report}");
    assert_eq!(report["size"], 200_000);
    assert_eq!(report["blobs"], 1);
    assert_eq!(report["max_size"], 1u64 << 30);
    assert_eq!(
        (report["hits"].as_u64(), report["misses"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(report["hit_ratio"], 0.5);
    assert_eq!(report["served_bytes"]["upstream"], 200_000);
    assert_eq!(report["served_bytes"]["cache"], 200_000);
    assert_eq!(report["fills"], Value::Array(vec![]));

    // A fill under way, slow: listed with its progress.
    let big = random_bytes(1 << 20, 18);
    let d2 = fake.add_blob(&big);
    let slow = Fault::Slow {
        chunk: 64 << 10,
        delay: Duration::from_millis(100),
    };
    fake.fault(&d2, slow, Some(1));
    let url = format!("{}/v2/x/blobs/{d2}", proxy.url());
    let client = std::thread::spawn(move || {
        crate::support::registry::try_http_request("GET", &url, &[], b"")
    });
    let mut fill = Value::Null;
    wait_until("the fill in the report", Duration::from_secs(10), || {
        let (_, report) = admin(&proxy, "GET", "/api/v1/cache", "");
        fill = report["fills"][0].clone();
        fill["received"]
            .as_u64()
            .is_some_and(|n| n > 0 && n < 1 << 20)
    });
    assert_eq!(fill["digest"], d2);
    assert_eq!(fill["repository"], "docker.io/library/x");
    assert_eq!(fill["expected"], 1 << 20);
    assert_eq!(fill["state"], "streaming");
    assert_eq!(fill["readers"], 1);
    assert!(fill["started"].as_str().unwrap().ends_with('Z'));
    let (s, _, body) = client.join().unwrap().unwrap();
    assert!(s == 200 && body == big);
    let (_, report) = admin(&proxy, "GET", "/api/v1/cache", "");
    assert_eq!(report["fills"], Value::Array(vec![]), "done: off the list");
    assert_eq!(report["blobs"], 2);
}
