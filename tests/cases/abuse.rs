//! Hostile clients: every answer is the right 4xx in the spec's format, nothing touches the
//! disk or the network, and the proxy keeps serving.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::support::fake::Fake;
use crate::support::proxy::{config, Proxy};
use crate::support::registry::{header, try_http_request};

fn code_of(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(body)));
    v["errors"][0]["code"].as_str().unwrap_or("").to_string()
}

/// Sends a raw request line (so no client library normalizes the path) and returns the
/// status and body.
fn raw(proxy: &Proxy, request: &str) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(proxy.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "{request}\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = match out.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => out[i + 4..].to_vec(),
        None => Vec::new(),
    };
    (status, body)
}

#[test]
fn path_traversal_in_every_spelling_is_refused_before_any_io() {
    let fake = Fake::start();
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(config(dir.path(), &[("docker.io", &fake.url(), true)]));
    let d = format!("sha256:{}", "a".repeat(64));
    let paths = [
        format!("/v2/../../etc/passwd/blobs/{d}"),
        format!("/v2/library/../x/blobs/{d}"),
        format!("/v2/%2e%2e/%2e%2e/x/blobs/{d}"),
        format!("/v2/a%2fb/blobs/{d}"),
        "/v2/a%2F..%2Fb/manifests/latest".to_string(),
        "/v2/x/manifests/..".to_string(),
        "/v2/x/manifests/%2e%2e".to_string(),
        "/v2/x/blobs/sha256:..%2f..%2fetc".to_string(),
        "/v2/x/blobs/sha256:../../../../etc/passwd".to_string(),
        format!("/v2/x//y/blobs/{d}"),
        format!("/v2/./x/blobs/{d}"),
        format!("/v2/x/blobs/{}", d.to_uppercase()),
    ];
    for p in &paths {
        let (s, body) = raw(&proxy, &format!("GET {p} HTTP/1.1"));
        assert!((400..500).contains(&s), "{p}: {s}");
        let code = code_of(&body);
        assert!(
            [
                "NAME_INVALID",
                "DIGEST_INVALID",
                "MANIFEST_INVALID",
                "NAME_UNKNOWN"
            ]
            .contains(&code.as_str()),
            "{p}: {code}"
        );
    }
    assert_eq!(fake.requests().len(), 0, "nothing reached the upstream");
    let entries: Vec<_> = walk(dir.path());
    assert!(
        entries
            .iter()
            .all(|p| !p.contains("passwd") && !p.contains("..")),
        "{entries:?}"
    );
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        out.push(p.display().to_string());
        if p.is_dir() {
            out.extend(walk(&p));
        }
    }
    out
}

#[test]
fn invalid_names_tags_digests_and_methods_get_the_right_code() {
    let fake = Fake::start();
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(config(dir.path(), &[("docker.io", &fake.url(), true)]));
    let hex64 = "a".repeat(64);
    let cases: Vec<(String, u16, &str)> = vec![
        ("/v2/UPPER/manifests/latest".into(), 400, "NAME_INVALID"),
        ("/v2/a__-b/manifests/latest".into(), 400, "NAME_INVALID"),
        (
            format!("/v2/{}/manifests/latest", "a".repeat(300)),
            400,
            "NAME_INVALID",
        ),
        ("/v2/x/manifests/-tag".into(), 400, "MANIFEST_INVALID"),
        (
            format!("/v2/x/manifests/{}", "t".repeat(129)),
            400,
            "MANIFEST_INVALID",
        ),
        ("/v2/x/blobs/sha256:abc".into(), 400, "DIGEST_INVALID"),
        (format!("/v2/x/blobs/md5:{hex64}"), 400, "DIGEST_INVALID"),
        (
            format!("/v2/x/blobs/sha256:{}", "g".repeat(64)),
            400,
            "DIGEST_INVALID",
        ),
        ("/v2/x/blobs/notadigest".into(), 400, "DIGEST_INVALID"),
        (
            format!("/v2/x/referrers/sha256:{}", "z".repeat(64)),
            400,
            "DIGEST_INVALID",
        ),
        ("/v2/x/unknown/endpoint".into(), 404, "NAME_UNKNOWN"),
        ("/v3/".into(), 404, "NAME_UNKNOWN"),
    ];
    for (path, status, code) in &cases {
        let (s, h, body) = proxy.get(path, &[]);
        assert_eq!((s, code_of(&body).as_str()), (*status, *code), "{path}");
        assert_eq!(header(&h, "content-type"), Some("application/json"));
    }
    for method in ["POST", "PUT", "PATCH", "DELETE"] {
        for path in [
            "/v2/x/blobs/uploads/",
            "/v2/x/manifests/latest",
            &format!("/v2/x/blobs/sha256:{hex64}"),
            "/v2/",
        ] {
            let (s, h, body) = crate::support::registry::http_request(
                method,
                &format!("{}{path}", proxy.url()),
                &[],
                b"{}",
            );
            assert_eq!(
                (s, code_of(&body).as_str()),
                (405, "UNSUPPORTED"),
                "{method} {path}"
            );
            assert_eq!(header(&h, "allow"), Some("GET, HEAD"));
        }
    }
    let (s, _) = raw(&proxy, "BREW /v2/ HTTP/1.1");
    assert_eq!(s, 405);
    assert_eq!(fake.requests().len(), 0);
}

#[test]
fn a_flood_for_unconfigured_registries_makes_no_outbound_connection() {
    let fake = Fake::start();
    let dir = tempfile::tempdir().unwrap();
    // No default upstream: nothing may be guessed.
    let proxy = Proxy::start(config(
        dir.path(),
        &[("registry.local", &fake.url(), false)],
    ));
    let d = format!("sha256:{}", "b".repeat(64));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let base = proxy.url();
            let d = d.clone();
            std::thread::spawn(move || {
                for i in 0..100 {
                    let path = match i % 4 {
                        0 => format!("/v2/library/x/manifests/1?ns=evil{t}-{i}.invalid"),
                        1 => format!("/v2/evil{t}.example.com/x/blobs/{d}"),
                        2 => "/v2/x/manifests/latest?ns=169.254.169.254".to_string(),
                        _ => "/v2/127.0.0.1:22/x/tags/list".to_string(),
                    };
                    let (s, _, body) =
                        try_http_request("GET", &format!("{base}{path}"), &[], b"").unwrap();
                    assert_eq!(s, 404, "{path}");
                    assert_eq!(code_of(&body), "NAME_UNKNOWN");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(fake.requests().len(), 0);
    assert_eq!(fake.connections(), 0);
    assert_eq!(proxy.metric("ocicache_upstream_requests_total"), 0.0);
    assert_eq!(proxy.get("/v2/", &[]).0, 200);
}

#[test]
fn thousands_of_idle_connections_do_not_stop_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), &[("docker.io", "http://127.0.0.1:9", true)]);
    c.limits.header_read_timeout.0 = Duration::from_secs(2);
    let proxy = Proxy::start(c);
    let mut idle = Vec::new();
    for _ in 0..400 {
        match TcpStream::connect(proxy.addr) {
            Ok(s) => idle.push(s),
            Err(_) => break, // our own descriptor limit
        }
    }
    assert!(idle.len() >= 200, "opened {}", idle.len());
    assert_eq!(
        proxy.get("/v2/", &[]).0,
        200,
        "served while {} connections idle",
        idle.len()
    );
    // The idle ones are cut off by the header timeout (2 s): a read returns once the server
    // closes (the first waits for it, the others are closed by then); one that is still
    // open after 6 s is counted as not closed.
    let mut closed = 0;
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
        let mut b = [0u8; 64];
        if s.read(&mut b).is_ok() {
            closed += 1;
        }
    }
    assert!(
        closed >= idle.len() * 9 / 10,
        "{closed} of {} closed",
        idle.len()
    );
    assert_eq!(proxy.get("/v2/", &[]).0, 200);
}
