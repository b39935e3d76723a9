//! Manifests and tags against the fake upstream, which counts HEAD and GET separately.

use std::time::Duration;

use crate::support::fake::{Fake, Fault};
use crate::support::proxy::{config, Proxy};
use crate::support::registry::{header, random_bytes};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

fn manifest(seed: u64) -> Vec<u8> {
    let cfg = format!("sha256:{}", hex::encode(random_bytes(32, seed)));
    format!(
        "{{\"schemaVersion\":2,\"mediaType\":\"{OCI_MANIFEST}\",\"config\":{{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"{cfg}\",\"size\":2}},\"layers\":[]}}"
    )
    .into_bytes()
}

fn proxy(fake: &Fake, dir: &std::path::Path, ttl: Duration) -> Proxy {
    let mut c = config(dir, &[("docker.io", &fake.url(), true)]);
    c.upstreams[0].tag_ttl.0 = ttl;
    c.upstreams[0].read_timeout.0 = Duration::from_secs(1);
    Proxy::start(c)
}

#[test]
fn within_the_ttl_a_tag_costs_no_upstream_request() {
    let fake = Fake::start();
    let m = manifest(1);
    let d = fake.add_manifest("library/t", Some("1"), OCI_MANIFEST, &m);
    let dir = tempfile::tempdir().unwrap();
    let p = proxy(&fake, dir.path(), Duration::from_secs(3600));
    for _ in 0..5 {
        let (s, h, body) = p.get("/v2/t/manifests/1", &[]);
        assert_eq!((s, body.as_slice()), (200, m.as_slice()));
        assert_eq!(header(&h, "docker-content-digest"), Some(d.as_str()));
        let (s, h, _) = p.head("/v2/t/manifests/1", &[]);
        assert_eq!(
            (s, header(&h, "content-length")),
            (200, Some(m.len().to_string().as_str()))
        );
    }
    assert_eq!(fake.count("GET", "/manifests/"), 1);
    assert_eq!(fake.count("HEAD", "/manifests/"), 0);
    // By digest: immutable, never asked again.
    assert_eq!(p.get(&format!("/v2/t/manifests/{d}"), &[]).2, m);
    assert_eq!(fake.count("GET", "/manifests/"), 1);
}

#[test]
fn after_the_ttl_a_head_revalidates_and_a_get_follows_only_when_the_digest_moved() {
    let fake = Fake::start();
    let m1 = manifest(2);
    fake.add_manifest("library/t", Some("latest"), OCI_MANIFEST, &m1);
    let dir = tempfile::tempdir().unwrap();
    let p = proxy(&fake, dir.path(), Duration::ZERO); // "0s": revalidate every time
    assert_eq!(p.get("/v2/t/manifests/latest", &[]).2, m1);
    assert_eq!(
        (
            fake.count("HEAD", "/manifests/"),
            fake.count("GET", "/manifests/")
        ),
        (0, 1)
    );
    for i in 1..=3 {
        assert_eq!(p.get("/v2/t/manifests/latest", &[]).2, m1);
        assert_eq!(
            (
                fake.count("HEAD", "/manifests/"),
                fake.count("GET", "/manifests/")
            ),
            (i, 1)
        );
    }
    // The tag moves upstream: one HEAD, then one GET of the new manifest.
    let m2 = manifest(3);
    let d2 = fake.add_manifest("library/t", Some("latest"), OCI_MANIFEST, &m2);
    let (_, h, body) = p.get("/v2/t/manifests/latest", &[]);
    assert_eq!(body, m2);
    assert_eq!(header(&h, "docker-content-digest"), Some(d2.as_str()));
    assert_eq!(
        (
            fake.count("HEAD", "/manifests/"),
            fake.count("GET", "/manifests/")
        ),
        (4, 2)
    );
}

#[test]
fn a_cached_tag_is_served_stale_when_the_upstream_fails() {
    let fake = Fake::start();
    let m = manifest(4);
    fake.add_manifest("library/t", Some("1"), OCI_MANIFEST, &m);
    let dir = tempfile::tempdir().unwrap();
    let p = proxy(&fake, dir.path(), Duration::ZERO);
    assert_eq!(p.get("/v2/t/manifests/1", &[]).0, 200);
    let faults = [
        Fault::Status(500),
        Fault::Status(503),
        Fault::TooMany {
            retry_after: "30".into(),
        },
        Fault::Refuse,
        Fault::Hang,
    ];
    for (i, fault) in faults.iter().enumerate() {
        fake.fault("/manifests/", fault.clone(), Some(1));
        let (s, h, body) = p.get("/v2/t/manifests/1", &[]);
        assert_eq!((s, body.as_slice()), (200, m.as_slice()), "{fault:?}");
        assert!(
            header(&h, "warning").is_some_and(|w| w.starts_with("110")),
            "{fault:?}"
        );
        assert_eq!(
            p.metric("ocicache_stale_answers_total"),
            (i + 1) as f64,
            "{fault:?}"
        );
    }
    // A refused connection altogether (the upstream is gone).
    drop(fake);
    let (s, h, _) = p.get("/v2/t/manifests/1", &[]);
    assert_eq!((s, header(&h, "x-cache")), (200, Some("HIT")));
}

#[test]
fn with_nothing_cached_the_client_gets_the_upstream_status_in_the_spec_format() {
    let fake = Fake::start();
    fake.add_manifest("library/t", Some("1"), OCI_MANIFEST, &manifest(5));
    let dir = tempfile::tempdir().unwrap();
    let p = proxy(&fake, dir.path(), Duration::ZERO);
    fake.fault(
        "/manifests/",
        Fault::TooMany {
            retry_after: "42".into(),
        },
        Some(1),
    );
    let (s, h, body) = p.get("/v2/t/manifests/1", &[]);
    assert_eq!(s, 429);
    assert_eq!(header(&h, "retry-after"), Some("42"));
    assert!(String::from_utf8_lossy(&body).contains("\"TOOMANYREQUESTS\""));
    fake.fault("/manifests/", Fault::Status(503), Some(1));
    let (s, _, body) = p.get("/v2/t/manifests/1", &[]);
    assert_eq!(s, 503);
    assert!(String::from_utf8_lossy(&body).contains("\"errors\""));
    let (s, _, body) = p.get("/v2/t/manifests/nope", &[]);
    assert_eq!(s, 404);
    assert!(String::from_utf8_lossy(&body).contains("MANIFEST_UNKNOWN"));
}

#[test]
fn offline_serves_everything_cached_regardless_of_age_and_contacts_nobody() {
    let fake = Fake::start();
    let m = manifest(6);
    let d = fake.add_manifest("library/t", Some("1"), OCI_MANIFEST, &m);
    let blob = fake.add_blob(b"layer bytes");
    let dir = tempfile::tempdir().unwrap();
    {
        let p = proxy(&fake, dir.path(), Duration::ZERO);
        assert_eq!(p.get("/v2/t/manifests/1", &[]).0, 200);
        assert_eq!(p.get(&format!("/v2/t/blobs/{blob}"), &[]).0, 200);
    }
    fake.reset_counts();
    let mut c = config(dir.path(), &[("docker.io", &fake.url(), true)]);
    c.offline = true;
    c.upstreams[0].tag_ttl.0 = Duration::ZERO;
    let p = Proxy::start(c);
    let (s, _, body) = p.get("/v2/t/manifests/1", &[]);
    assert_eq!((s, body.as_slice()), (200, m.as_slice()));
    assert_eq!(p.get(&format!("/v2/t/manifests/{d}"), &[]).0, 200);
    assert_eq!(p.get(&format!("/v2/t/blobs/{blob}"), &[]).2, b"layer bytes");
    assert_eq!(p.head(&format!("/v2/t/blobs/{blob}"), &[]).0, 200);
    let (s, _, body) = p.get("/v2/t/manifests/2", &[]);
    assert_eq!(s, 404);
    assert!(String::from_utf8_lossy(&body).contains("MANIFEST_UNKNOWN"));
    let (s, _, body) = p.get(&format!("/v2/t/blobs/sha256:{}", "0".repeat(64)), &[]);
    assert_eq!(s, 404);
    assert!(String::from_utf8_lossy(&body).contains("BLOB_UNKNOWN"));
    assert_eq!(
        fake.requests().len(),
        0,
        "offline never contacts the upstream"
    );
}

#[test]
fn a_lying_upstream_is_refused_for_manifests_by_digest_and_nothing_is_cached() {
    let fake = Fake::start();
    let m = manifest(7);
    let d = fake.add_manifest("library/t", None, OCI_MANIFEST, &m);
    let dir = tempfile::tempdir().unwrap();
    let p = proxy(&fake, dir.path(), Duration::ZERO);
    for fault in [Fault::CorruptBody, Fault::LieDigest] {
        fake.fault("/manifests/", fault.clone(), Some(1));
        let (s, _, body) = p.get(&format!("/v2/t/manifests/{d}"), &[]);
        assert_eq!(s, 502, "{fault:?}");
        assert!(String::from_utf8_lossy(&body).contains("\"errors\""));
    }
    let hex = d.strip_prefix("sha256:").unwrap();
    assert!(!dir
        .path()
        .join("blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .exists());
    let (s, h, body) = p.get(&format!("/v2/t/manifests/{d}"), &[]);
    assert_eq!((s, body.as_slice()), (200, m.as_slice()));
    assert_eq!(header(&h, "content-type"), Some(OCI_MANIFEST));
}

#[test]
fn a_hundred_concurrent_resolutions_make_one_upstream_request() {
    let fake = Fake::start();
    let m = manifest(8);
    fake.add_manifest("library/t", Some("1"), OCI_MANIFEST, &m);
    fake.fault(
        "/manifests/",
        Fault::Delay(Duration::from_millis(300)),
        None,
    );
    let dir = tempfile::tempdir().unwrap();
    let p = proxy(&fake, dir.path(), Duration::ZERO);
    let resolve_all = |p: &Proxy| {
        let url = format!("{}/v2/t/manifests/1", p.url());
        let threads: Vec<_> = (0..100)
            .map(|_| {
                let url = url.clone();
                std::thread::spawn(move || {
                    crate::support::registry::http_request("HEAD", &url, &[], b"")
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap().0, 200);
        }
    };
    resolve_all(&p); // cold: one GET
    assert_eq!(
        (
            fake.count("HEAD", "/manifests/"),
            fake.count("GET", "/manifests/")
        ),
        (0, 1)
    );
    resolve_all(&p); // cached, TTL 0: one HEAD
    assert_eq!(
        (
            fake.count("HEAD", "/manifests/"),
            fake.count("GET", "/manifests/")
        ),
        (1, 1)
    );
}

#[test]
fn the_clients_accept_list_is_honoured() {
    let fake = Fake::start();
    let idx = format!("{{\"schemaVersion\":2,\"mediaType\":\"{OCI_INDEX}\",\"manifests\":[]}}")
        .into_bytes();
    fake.add_manifest("library/t", Some("1"), OCI_INDEX, &idx);
    let dir = tempfile::tempdir().unwrap();
    let p = proxy(&fake, dir.path(), Duration::from_secs(3600));
    let (s, h, _) = p.get("/v2/t/manifests/1", &[]);
    assert_eq!((s, header(&h, "content-type")), (200, Some(OCI_INDEX)));
    let asked = fake
        .requests()
        .into_iter()
        .find(|r| r.path.contains("/manifests/"))
        .unwrap();
    let accept = asked.header("accept").unwrap().to_string();
    for t in [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST] {
        assert!(
            accept.contains(t),
            "without Accept the upstream is asked for every type: {accept}"
        );
    }
    // A client that only takes Docker manifests is not given the cached index as if it were:
    // the upstream is asked with its list.
    let _ = p.get("/v2/t/manifests/1", &[("Accept", DOCKER_MANIFEST)]);
    let last = fake
        .requests()
        .into_iter()
        .rfind(|r| r.path.contains("/manifests/"))
        .unwrap();
    assert_eq!(last.header("accept"), Some(DOCKER_MANIFEST));
    assert_eq!(fake.count("GET", "/manifests/"), 2);
}

#[test]
fn tag_lists_are_paginated_by_the_proxy_and_served_stale_when_the_upstream_fails() {
    let fake = Fake::start();
    fake.set_tags("library/t", &["b", "a", "d", "c", "e"]);
    let dir = tempfile::tempdir().unwrap();
    let p = proxy(&fake, dir.path(), Duration::ZERO);
    let (s, h, body) = p.get("/v2/t/tags/list?n=2", &[]);
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["tags"], serde_json::json!(["a", "b"]));
    assert_eq!(v["name"], "library/t");
    assert_eq!(
        header(&h, "link"),
        Some("</v2/t/tags/list?n=2&last=b>; rel=\"next\"")
    );
    let (_, h, body) = p.get("/v2/t/tags/list?n=2&last=b", &[]);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["tags"], serde_json::json!(["c", "d"]));
    let (_, h2, body) = p.get("/v2/t/tags/list?n=2&last=d", &[]);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["tags"], serde_json::json!(["e"]));
    assert!(header(&h, "link").is_some() && header(&h2, "link").is_none());
    let (_, _, body) = p.get("/v2/t/tags/list", &[]);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["tags"].as_array().unwrap().len(), 5);
    assert_eq!(p.get("/v2/t/tags/list?n=x", &[]).0, 400);

    fake.fault("/tags/list", Fault::Status(503), None);
    let (s, h, body) = p.get("/v2/t/tags/list", &[]);
    assert_eq!(s, 200, "the last good list");
    assert!(header(&h, "warning").is_some());
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()["tags"]
            .as_array()
            .unwrap()
            .len(),
        5
    );
}

#[test]
fn referrers_are_passed_through_cached_briefly_and_served_stale() {
    let fake = Fake::start();
    let m = manifest(9);
    let d = fake.add_manifest("library/t", Some("1"), OCI_MANIFEST, &m);
    let index = format!("{{\"schemaVersion\":2,\"mediaType\":\"{OCI_INDEX}\",\"manifests\":[]}}");
    fake.set_referrers("library/t", &d, index.as_bytes());
    let dir = tempfile::tempdir().unwrap();
    let p = proxy(&fake, dir.path(), Duration::from_secs(3600));
    let (s, h, body) = p.get(&format!("/v2/t/referrers/{d}"), &[]);
    assert_eq!((s, body.as_slice()), (200, index.as_bytes()));
    assert_eq!(header(&h, "content-type"), Some(OCI_INDEX));
    assert_eq!(p.get(&format!("/v2/t/referrers/{d}"), &[]).0, 200);
    assert_eq!(fake.count("GET", "/referrers/"), 1, "cached briefly");
    // With a filter it is another answer.
    let q = format!("/v2/t/referrers/{d}?artifactType=application%2Fx.sig");
    let (s, h, _) = p.get(&q, &[]);
    assert_eq!(
        (s, header(&h, "oci-filters-applied")),
        (200, Some("artifactType"))
    );
    assert_eq!(fake.count("GET", "/referrers/"), 2);
    drop(p);

    // With a TTL of 0 it is asked every time, and the last good answer covers a failure.
    let dir = tempfile::tempdir().unwrap();
    let p = proxy(&fake, dir.path(), Duration::ZERO);
    assert_eq!(p.get(&format!("/v2/t/referrers/{d}"), &[]).0, 200);
    fake.fault("/referrers/", Fault::Status(502), Some(1));
    let (s, h, body) = p.get(&format!("/v2/t/referrers/{d}"), &[]);
    assert_eq!((s, body.as_slice()), (200, index.as_bytes()));
    assert!(header(&h, "warning").is_some());
    assert_eq!(fake.count("GET", "/referrers/"), 4);
}

/// The TTL passes on the server's clock (skipped ahead, not waited for): within it no upstream
/// request; after it one HEAD and no GET while the tag has not moved; after it again, with the
/// tag moved upstream, the new manifest.
#[test]
fn after_the_ttl_a_tag_is_revalidated_with_a_head() {
    let fake = Fake::start();
    let m1 = manifest(31);
    let d1 = fake.add_manifest("library/ttl", Some("1"), OCI_MANIFEST, &m1);
    let dir = tempfile::tempdir().unwrap();
    let p = proxy(&fake, dir.path(), Duration::from_secs(300));
    let path = "/v2/ttl/manifests/1";
    assert_eq!(p.get(path, &[]).0, 200);
    assert_eq!(fake.count("GET", "/manifests/1"), 1);

    p.state.clock.advance(Duration::from_secs(299));
    let (s, h, _) = p.get(path, &[]);
    assert_eq!(
        (s, header(&h, "docker-content-digest")),
        (200, Some(d1.as_str()))
    );
    assert_eq!(
        fake.count("HEAD", "/manifests/1"),
        0,
        "still within the TTL"
    );
    assert_eq!(fake.count("GET", "/manifests/1"), 1);

    p.state.clock.advance(Duration::from_secs(2));
    let (s, h, body) = p.get(path, &[]);
    assert_eq!((s, body.as_slice()), (200, m1.as_slice()));
    assert_eq!(header(&h, "docker-content-digest"), Some(d1.as_str()));
    assert_eq!(
        fake.count("HEAD", "/manifests/1"),
        1,
        "revalidated by a HEAD"
    );
    assert_eq!(fake.count("GET", "/manifests/1"), 1, "not fetched again");
    // Confirmed again: a new TTL from now.
    assert_eq!(p.get(path, &[]).0, 200);
    assert_eq!(fake.count("HEAD", "/manifests/1"), 1);

    let m2 = manifest(32);
    let d2 = fake.add_manifest("library/ttl", Some("1"), OCI_MANIFEST, &m2);
    p.state.clock.advance(Duration::from_secs(301));
    let (s, h, body) = p.get(path, &[]);
    assert_eq!((s, body.as_slice()), (200, m2.as_slice()));
    assert_eq!(header(&h, "docker-content-digest"), Some(d2.as_str()));
    assert_eq!(fake.count("HEAD", "/manifests/1"), 2);
    assert_eq!(fake.count("GET", "/manifests/1"), 2, "the moved tag's body");
}
