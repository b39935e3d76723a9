//! Hostile upstreams: redirects, token services, oversized answers, lies. Each gives the
//! client a clear error in the spec's format, caches nothing wrong, leaks no credential, and
//! leaves the proxy serving.

use std::process::Stdio;
use std::time::Duration;

use crate::support::fake::{Auth, Fake, Fault};
use crate::support::proxy::{config, toml_for, ChildProxy, Proxy};
use crate::support::registry::{header, random_bytes, try_http_request};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn proxy_with_creds(fake: &Fake, dir: &std::path::Path, user: &str, pass: &str) -> Proxy {
    let mut c = config(dir, &[("docker.io", &fake.url(), true)]);
    c.upstreams[0].username = Some(user.into());
    c.upstreams[0].password = Some(ocicache::config::Secret(pass.into()));
    c.upstreams[0].read_timeout.0 = Duration::from_secs(1);
    Proxy::start(c)
}

#[test]
fn bearer_tokens_are_fetched_with_credentials_cached_and_reused() {
    let fake = Fake::start();
    fake.set_auth(Auth::Bearer {
        creds: Some(("u".into(), "p4ss".into())),
        expires_in: 300,
    });
    let data = random_bytes(50_000, 1);
    let d = fake.add_blob(&data);
    let m = fake.add_manifest(
        "library/a",
        Some("1"),
        OCI_MANIFEST,
        b"{\"schemaVersion\":2}",
    );
    let dir = tempfile::tempdir().unwrap();
    let p = proxy_with_creds(&fake, dir.path(), "u", "p4ss");
    assert_eq!(p.get(&format!("/v2/a/blobs/{d}"), &[]).2, data);
    assert_eq!(p.get(&format!("/v2/a/manifests/{m}"), &[]).0, 200);
    assert_eq!(p.get("/v2/a/manifests/1", &[]).0, 200);
    assert_eq!(
        fake.count("GET", "/token"),
        1,
        "one token per scope, reused"
    );
    assert!(p.metric("ocicache_token_fetches_total") >= 1.0);
    let wrong = tempfile::tempdir().unwrap();
    let p2 = proxy_with_creds(&fake, wrong.path(), "u", "wrong");
    let (s, _, body) = p2.get(&format!("/v2/a/blobs/{d}"), &[]);
    assert!(
        s >= 400 && String::from_utf8_lossy(&body).contains("\"errors\""),
        "{s}"
    );
}

#[test]
fn basic_auth_upstreams_get_the_configured_credentials() {
    let fake = Fake::start();
    fake.set_auth(Auth::Basic {
        user: "bob".into(),
        pass: "b0b".into(),
    });
    let d = fake.add_blob(b"basic content");
    let dir = tempfile::tempdir().unwrap();
    let p = proxy_with_creds(&fake, dir.path(), "bob", "b0b");
    assert_eq!(p.get(&format!("/v2/a/blobs/{d}"), &[]).2, b"basic content");
}

#[test]
fn redirects_to_another_origin_never_see_authorization() {
    let fake = Fake::start();
    fake.set_auth(Auth::Bearer {
        creds: Some(("u".into(), "secretpw".into())),
        expires_in: 300,
    });
    let cdn = Fake::start(); // another port: another origin
    let data = random_bytes(20_000, 2);
    let d = fake.add_blob(&data);
    cdn.add_blob(&data);
    fake.fault("/blobs/", Fault::RedirectTo(cdn.url()), None);
    let dir = tempfile::tempdir().unwrap();
    let p = proxy_with_creds(&fake, dir.path(), "u", "secretpw");
    let (s, _, body) = p.get(&format!("/v2/a/blobs/{d}"), &[]);
    assert_eq!((s, body.as_slice()), (200, data.as_slice()));
    assert!(cdn.count("GET", "/blobs/") == 1);
    for r in cdn.requests() {
        assert!(
            r.header("authorization").is_none(),
            "the redirect target saw Authorization: {r:?}"
        );
    }
    assert!(fake.requests().iter().any(|r| r.path.contains("/blobs/")
        && r.header("authorization")
            .is_some_and(|a| a.starts_with("Bearer "))));
    // The Location is not cached: the next miss of another blob asks the registry again.
    let other = random_bytes(1000, 3);
    let d2 = fake.add_blob(&other);
    cdn.add_blob(&other);
    let before = fake.count("GET", "/blobs/");
    assert_eq!(p.get(&format!("/v2/a/blobs/{d2}"), &[]).2, other);
    assert_eq!(
        fake.count("GET", &d2),
        1,
        "asked the registry, not a remembered Location"
    );
    assert!(fake.count("GET", "/blobs/") > before);
}

#[test]
fn a_redirect_loop_is_bounded() {
    let fake = Fake::start();
    let d = fake.add_blob(b"never served");
    fake.fault("/blobs/", Fault::RedirectLoop, None);
    let dir = tempfile::tempdir().unwrap();
    let p = Proxy::start(config(dir.path(), &[("docker.io", &fake.url(), true)]));
    let (s, _, body) = p.get(&format!("/v2/a/blobs/{d}"), &[]);
    assert_eq!(s, 502);
    assert!(String::from_utf8_lossy(&body).contains("redirect"));
    assert!(
        fake.count("GET", "/blobs/") <= 6,
        "bounded: {}",
        fake.count("GET", "/blobs/")
    );
    assert_eq!(p.get("/v2/", &[]).0, 200);
}

#[test]
fn a_token_service_that_refuses_loops_or_stalls_gives_a_clear_error() {
    let fake = Fake::start();
    fake.set_auth(Auth::Bearer {
        creds: None,
        expires_in: 300,
    });
    let m = fake.add_manifest(
        "library/a",
        Some("1"),
        OCI_MANIFEST,
        b"{\"schemaVersion\":2}",
    );
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), &[("docker.io", &fake.url(), true)]);
    c.upstreams[0].read_timeout.0 = Duration::from_secs(1);
    c.upstreams[0].tag_ttl.0 = Duration::ZERO;
    let p = Proxy::start(c);
    for fault in [
        Fault::Status(500),
        Fault::Status(401),
        Fault::RedirectLoop,
        Fault::Delay(Duration::from_secs(3)),
        Fault::Refuse,
    ] {
        fake.fault("/token", fault.clone(), Some(1));
        let (s, _, body) = p.get(&format!("/v2/a/manifests/{m}"), &[]);
        assert!(s >= 500 || s == 403, "{fault:?}: {s}");
        assert!(
            String::from_utf8_lossy(&body).contains("\"errors\""),
            "{fault:?}"
        );
    }
    assert!(fake.count("GET", "/token") <= 6, "no loop followed");
    // Once it works, the tag is cached; a failing token service then means a stale answer.
    assert_eq!(p.get("/v2/a/manifests/1", &[]).0, 200);
    fake.set_auth(Auth::Bearer {
        creds: None,
        expires_in: 300,
    }); // forget issued tokens
    fake.fault("/token", Fault::Status(503), None);
    let (s, h, _) = p.get("/v2/a/manifests/1", &[]);
    assert_eq!(s, 200);
    assert!(header(&h, "warning").is_some());
}

#[test]
fn oversized_and_lying_manifests_are_refused_and_not_cached() {
    let fake = Fake::start();
    let big = format!("{{\"schemaVersion\":2,\"pad\":\"{}\"}}", "x".repeat(20_000));
    let d_big = fake.add_manifest("library/a", Some("big"), OCI_MANIFEST, big.as_bytes());
    fake.add_manifest(
        "library/a",
        Some("liar"),
        OCI_MANIFEST,
        b"{\"schemaVersion\":2,\"x\":1}",
    );
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), &[("docker.io", &fake.url(), true)]);
    c.limits.max_manifest_size.0 = 8 << 10;
    let p = Proxy::start(c);
    for path in [
        "/v2/a/manifests/big".to_string(),
        format!("/v2/a/manifests/{d_big}"),
    ] {
        let (s, _, body) = p.get(&path, &[]);
        assert_eq!(s, 502, "{path}");
        assert!(String::from_utf8_lossy(&body).contains("larger than the limit"));
    }
    fake.fault("/manifests/liar", Fault::LieDigest, None);
    let (s, _, _) = p.get("/v2/a/manifests/liar", &[]);
    assert_eq!(s, 502, "a Docker-Content-Digest that lies");
    let hex = d_big.strip_prefix("sha256:").unwrap();
    assert!(!dir
        .path()
        .join("blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .exists());
    fake.fault("/manifests/", Fault::HugeHeader(200_000), Some(1));
    let (s, _, _) = p.get("/v2/a/manifests/big", &[]);
    assert!(s >= 500);
    assert_eq!(p.get("/v2/", &[]).0, 200);
}

#[test]
fn credentials_and_tokens_never_appear_in_logs_or_error_bodies() {
    let fake = Fake::start();
    fake.set_auth(Auth::Bearer {
        creds: Some(("user1".into(), "hunter2-pw".into())),
        expires_in: 300,
    });
    let d = fake.add_blob(b"secret-protected");
    let cdn = Fake::start();
    let dir = tempfile::tempdir().unwrap();
    let pwfile = dir.path().join("pw");
    std::fs::write(&pwfile, "hunter2-pw\n").unwrap();
    let upstream_creds = format!(
        "username = \"user1\"\npassword_file = \"{}\"\n",
        pwfile.display()
    );
    let toml = format!(
        "[log]\nlevel = \"trace\"\n{}",
        toml_for(&dir.path().join("cache"), &fake.url(), &upstream_creds)
    );
    let child = ChildProxy::start(dir.path(), &toml, Stdio::piped());
    let base = child.base.clone();
    let (s, _, body1) =
        try_http_request("GET", &format!("{base}/v2/a/blobs/{d}"), &[], b"").unwrap();
    assert_eq!(s, 200);
    // An error path too: a redirect to elsewhere that fails, and an upstream error body.
    fake.fault("/manifests/", Fault::RedirectTo(cdn.url()), None);
    let (_, _, body2) =
        try_http_request("GET", &format!("{base}/v2/a/manifests/x"), &[], b"").unwrap();
    fake.fault("/blobs/", Fault::Status(500), None);
    let (_, _, body3) = try_http_request(
        "GET",
        &format!("{base}/v2/a/blobs/sha256:{}", "c".repeat(64)),
        &[],
        b"",
    )
    .unwrap();
    let out = child.terminate();
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(logs.contains("request"), "logs were captured: {logs}");
    let tokens: Vec<String> = fake
        .requests()
        .iter()
        .filter_map(|r| r.header("authorization").map(String::from))
        .collect();
    assert!(!tokens.is_empty());
    let mut secrets = vec!["hunter2-pw".to_string()];
    for t in &tokens {
        secrets.push(t.split(' ').nth(1).unwrap().to_string());
    }
    for s in &secrets {
        assert!(!logs.contains(s.as_str()), "a secret in the logs");
        for body in [&body1, &body2, &body3] {
            assert!(
                !String::from_utf8_lossy(body).contains(s.as_str()),
                "a secret in an answer"
            );
        }
    }
    for r in cdn.requests() {
        assert!(r.header("authorization").is_none());
    }
}
