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
    assert_eq!(report["served_bytes"]["local"], 200_000);
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

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// An image in `repo:tag` of the fake: a config and these layers. Returns the manifest's
/// digest and the blobs' (config first).
fn image(fake: &Fake, repo: &str, tag: &str, layers: &[Vec<u8>]) -> (String, Vec<String>) {
    let config = format!("{{\"architecture\":\"amd64\",\"os\":\"linux\",\"tag\":\"{tag}\"}}");
    let mut blobs = vec![fake.add_blob(config.as_bytes())];
    let descriptor = |d: &str, size: usize, media_type: &str| serde_json::json!({ "mediaType": media_type, "digest": d, "size": size });
    let mut json_layers = Vec::new();
    for l in layers {
        let d = fake.add_blob(l);
        json_layers.push(descriptor(
            &d,
            l.len(),
            "application/vnd.oci.image.layer.v1.tar",
        ));
        blobs.push(d);
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(&blobs[0], config.len(), "application/vnd.oci.image.config.v1+json"),
        "layers": json_layers,
    });
    let bytes = serde_json::to_vec(&manifest).unwrap();
    (
        fake.add_manifest(repo, Some(tag), OCI_MANIFEST, &bytes),
        blobs,
    )
}

/// Pulls `repo:tag` through the proxy as a client would: the manifest, then every blob.
fn pull(proxy: &Proxy, repo: &str, tag: &str, blobs: &[String]) {
    let (s, _, _) = proxy.get(
        &format!("/v2/{repo}/manifests/{tag}"),
        &[("accept", OCI_MANIFEST)],
    );
    assert_eq!(s, 200, "{repo}:{tag}");
    for b in blobs {
        assert_eq!(
            proxy.get(&format!("/v2/{repo}/blobs/{b}"), &[]).0,
            200,
            "{b}"
        );
    }
}

/// Pulls `n` unrelated blobs of `size` bytes through the proxy: an eviction storm.
fn storm(proxy: &Proxy, fake: &Fake, n: u8, size: usize) {
    for i in 0..n {
        let d = fake.add_blob(&random_bytes(size, 1000 + u64::from(i)));
        assert_eq!(proxy.get(&format!("/v2/other/blobs/{d}"), &[]).0, 200);
    }
}

#[test]
fn a_pinned_image_outlives_an_eviction_storm_and_a_restart() {
    let fake = Fake::start();
    let (manifest, blobs) = image(
        &fake,
        "library/app",
        "1",
        &[random_bytes(400_000, 1), random_bytes(300_000, 2)],
    );
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_of(dir.path(), &fake, 2 << 20);

    // Pinned before it is pulled: resolved through the manifests service.
    let (s, pin) = admin(&proxy, "PUT", "/api/v1/pins/docker.io/app/1", "");
    assert_eq!(s, 200, "{pin}");
    assert_eq!(pin["name"], "library/app");
    assert_eq!(pin["reference"], "1");
    assert_eq!(pin["manifests"], serde_json::json!([manifest]));
    assert_eq!(pin["blobs"], serde_json::json!(blobs));
    pull(&proxy, "app", "1", &blobs);

    // 30 blobs of 200 KB through a 2 MiB cache: everything unpinned goes around.
    storm(&proxy, &fake, 30, 200_000);
    let (_, report) = admin(&proxy, "GET", "/api/v1/cache", "");
    assert!(report["size"].as_u64().unwrap() <= 2 << 20, "{report}");
    assert!(
        report["pinned_bytes"].as_u64().unwrap() >= 700_000,
        "{report}"
    );
    fake.reset_counts();
    pull(&proxy, "app", "1", &blobs);
    assert_eq!(
        fake.requests().len(),
        0,
        "the pinned image came from the cache"
    );

    // The pin survives a restart, and keeps protecting the image.
    proxy.stop();
    let proxy = proxy_of(dir.path(), &fake, 2 << 20);
    let (s, pins) = admin(&proxy, "GET", "/api/v1/pins", "");
    assert_eq!(s, 200);
    assert_eq!(pins[0]["manifests"], serde_json::json!([manifest]));
    storm(&proxy, &fake, 30, 200_000);
    fake.reset_counts();
    for b in &blobs {
        assert_eq!(proxy.get(&format!("/v2/app/blobs/{b}"), &[]).0, 200);
    }
    assert_eq!(fake.requests().len(), 0, "still cached after the restart");

    // Unpinned: the next storm evicts it.
    let (s, _) = admin(&proxy, "DELETE", "/api/v1/pins/docker.io/app/1", "");
    assert_eq!(s, 200);
    let (s, body) = admin(&proxy, "DELETE", "/api/v1/pins/docker.io/app/1", "");
    assert_eq!((s, code(&body)), (404, "MANIFEST_UNKNOWN"));
    storm(&proxy, &fake, 30, 200_000);
    fake.reset_counts();
    assert_eq!(
        proxy.get(&format!("/v2/app/blobs/{}", blobs[1]), &[]).0,
        200
    );
    assert_eq!(fake.count("GET", &blobs[1]), 1, "evicted once unpinned");
}

#[test]
fn bad_names_tags_and_digests_are_400_and_change_nothing() {
    let fake = Fake::start();
    let (a, blobs) = image(&fake, "library/app", "1", &[random_bytes(1000, 6)]);
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_of(dir.path(), &fake, 1 << 30);
    pull(&proxy, "app", "1", &blobs);
    fake.reset_counts();
    for (method, path, expected) in [
        ("DELETE", "/api/v1/tags/docker.io/App/1", "NAME_INVALID"),
        (
            "DELETE",
            &format!("/api/v1/tags/docker.io/app/{a}"),
            "MANIFEST_INVALID",
        ),
        (
            "DELETE",
            "/api/v1/images/docker.io/app/1;rm",
            "MANIFEST_INVALID",
        ),
        (
            "DELETE",
            "/api/v1/images/docker.io/app/sha256:XYZ",
            "DIGEST_INVALID",
        ),
        ("DELETE", "/api/v1/blobs/sha256:123", "DIGEST_INVALID"),
        (
            "DELETE",
            "/api/v1/blobs/md5:d41d8cd98f00b204e9800998ecf8427e",
            "DIGEST_INVALID",
        ),
        (
            "DELETE",
            "/api/v1/images/docker.io/app/1?purge_shared=yes",
            "REQUEST_INVALID",
        ),
        ("PUT", "/api/v1/pins/docker.io/UPPER/1", "NAME_INVALID"),
        (
            "PUT",
            "/api/v1/pins/docker.io/app/bad:tag",
            "DIGEST_INVALID",
        ),
        ("PUT", "/api/v1/pins/docker.io/app/-tag", "MANIFEST_INVALID"),
        ("PUT", "/api/v1/pins/docker.io/a/../b/1", "NAME_INVALID"),
        ("PUT", "/api/v1/pins/docker.io/1", "NAME_INVALID"),
        (
            "DELETE",
            "/api/v1/pins/docker.io/app/sha256:abc",
            "DIGEST_INVALID",
        ),
    ] {
        let (s, body) = admin(&proxy, method, path, "");
        assert_eq!((s, code(&body)), (400, expected), "{method} {path}: {body}");
    }
    let (s, body) = admin(&proxy, "PUT", "/api/v1/pins/quay.io/app/1", "");
    assert_eq!(
        (s, code(&body)),
        (404, "NAME_UNKNOWN"),
        "not configured: {body}"
    );
    assert_eq!(fake.requests().len(), 0, "nothing reached the upstream");
    assert_eq!(
        admin(&proxy, "GET", "/api/v1/pins", "").1,
        serde_json::json!([])
    );
}

#[test]
fn the_images_list_names_what_is_cached_page_by_page() {
    let fake = Fake::start();
    let (a, a_blobs) = image(&fake, "library/app", "1", &[random_bytes(50_000, 3)]);
    let (b, b_blobs) = image(&fake, "team/tool", "v2", &[random_bytes(70_000, 4)]);
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_of(dir.path(), &fake, 1 << 30);
    pull(&proxy, "app", "1", &a_blobs);
    pull(&proxy, "team/tool", "v2", &b_blobs);
    assert_eq!(
        admin(&proxy, "PUT", "/api/v1/pins/docker.io/team/tool/v2", "").0,
        200
    );

    let (s, page) = admin(&proxy, "GET", "/api/v1/images", "");
    assert_eq!(s, 200, "{page}");
    let images = page["images"].as_array().unwrap();
    assert_eq!(images.len(), 2, "{page}");
    let app = &images[0];
    assert_eq!(
        (&app["upstream"], &app["name"], &app["tag"], &app["digest"]),
        (
            &"docker.io".into(),
            &"library/app".into(),
            &"1".into(),
            &a.clone().into()
        )
    );
    assert_eq!(app["media_type"], OCI_MANIFEST);
    let blob_bytes = |blobs: &[String]| -> u64 {
        blobs
            .iter()
            .map(|d| proxy.head(&format!("/v2/app/blobs/{d}"), &[]))
            .map(|(_, h, _)| {
                header(&h, "content-length")
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
            })
            .sum()
    };
    let a_size = blob_bytes(&a_blobs) + blob_bytes(std::slice::from_ref(&a));
    assert_eq!(app["size"], a_size, "{app}");
    assert!(app["confirmed"].as_str().unwrap().ends_with('Z'));
    assert!(app["last_pulled"].as_str().unwrap().ends_with('Z'));
    assert_eq!(app["pinned"], false);
    let tool = &images[1];
    assert_eq!(
        (&tool["name"], &tool["digest"]),
        (&"team/tool".into(), &b.clone().into())
    );
    assert_eq!(tool["pinned"], true);

    // Filtered, and one at a time: the next page after the first.
    let (_, page) = admin(
        &proxy,
        "GET",
        "/api/v1/images?upstream=docker.io&name=app",
        "",
    );
    assert_eq!(page["images"].as_array().unwrap().len(), 1);
    assert_eq!(page["images"][0]["digest"], a);
    let (_, first) = admin(&proxy, "GET", "/api/v1/images?n=1", "");
    assert_eq!(first["images"][0]["digest"], a);
    let next = first["next"].as_str().unwrap().to_string();
    let q: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("n", "1")
        .append_pair("last", &next)
        .finish();
    let (_, second) = admin(&proxy, "GET", &format!("/api/v1/images?{q}"), "");
    assert_eq!(second["images"][0]["digest"], b);
    assert_eq!(second["next"], Value::Null);

    // A manifest pulled by digest only: listed without a tag, upstream or name.
    let (c, _) = image(&fake, "library/other", "x", &[random_bytes(10_000, 5)]);
    let by_digest = format!("/v2/other/manifests/{c}");
    assert_eq!(proxy.get(&by_digest, &[("accept", OCI_MANIFEST)]).0, 200);
    let (_, page) = admin(&proxy, "GET", "/api/v1/images", "");
    let untagged = &page["images"][0];
    assert_eq!(
        (&untagged["digest"], &untagged["tag"]),
        (&c.clone().into(), &Value::Null)
    );
    assert_eq!(untagged["upstream"], Value::Null);
    assert_eq!(page["images"].as_array().unwrap().len(), 3);

    let (s, body) = admin(&proxy, "GET", "/api/v1/images?n=lots", "");
    assert_eq!((s, code(&body)), (400, "PAGINATION_NUMBER_INVALID"));
    let (s, body) = admin(&proxy, "GET", "/api/v1/images?name=Bad", "");
    assert_eq!((s, code(&body)), (400, "NAME_INVALID"));
}

#[test]
fn a_purged_tag_is_asked_again_and_a_purged_image_keeps_the_blobs_others_use() {
    let fake = Fake::start();
    let shared = random_bytes(100_000, 7);
    let (a, a_blobs) = image(
        &fake,
        "library/app",
        "1",
        &[shared.clone(), random_bytes(60_000, 8)],
    );
    let (_, b_blobs) = image(
        &fake,
        "library/app",
        "2",
        &[shared, random_bytes(80_000, 9)],
    );
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_of(dir.path(), &fake, 1 << 30);
    pull(&proxy, "app", "1", &a_blobs);
    pull(&proxy, "app", "2", &b_blobs);

    // Within tag_ttl a pull asks nothing; once the tag is purged, the upstream is asked.
    fake.reset_counts();
    pull(&proxy, "app", "1", &a_blobs);
    assert_eq!(fake.requests().len(), 0);
    let (s, body) = admin(&proxy, "DELETE", "/api/v1/tags/docker.io/app/1", "");
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["tags"], serde_json::json!(["docker.io/library/app:1"]));
    let (s, body) = admin(&proxy, "DELETE", "/api/v1/tags/docker.io/app/1", "");
    assert_eq!(
        (s, code(&body)),
        (404, "MANIFEST_UNKNOWN"),
        "already forgotten"
    );
    pull(&proxy, "app", "1", &a_blobs);
    assert_eq!(
        fake.count("GET", "/manifests/1"),
        1,
        "{:?}",
        fake.requests()
    );
    assert_eq!(fake.requests().len(), 1, "the blobs stayed cached");

    // The image goes, with its own blobs; the layer image 2 shares stays.
    let (s, body) = admin(&proxy, "DELETE", "/api/v1/images/docker.io/app/1", "");
    assert_eq!(s, 200, "{body}");
    let removed: Vec<&str> = body["digests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    let mut expected = vec![a.as_str(), a_blobs[0].as_str(), a_blobs[2].as_str()];
    expected.sort();
    let mut got = removed.clone();
    got.sort();
    assert_eq!(got, expected, "{body}");
    assert_eq!(body["kept"], serde_json::json!([a_blobs[1]]));
    let (_, list) = admin(&proxy, "GET", "/api/v1/images", "");
    assert_eq!(list["images"].as_array().unwrap().len(), 1, "{list}");
    fake.reset_counts();
    pull(&proxy, "app", "2", &b_blobs);
    assert_eq!(fake.requests().len(), 0, "image 2 is whole");
    assert_eq!(
        proxy.get(&format!("/v2/app/blobs/{}", a_blobs[2]), &[]).0,
        200
    );
    assert_eq!(fake.requests().len(), 1, "image 1's own layer was deleted");

    // A blob, then again (gone), then bad input.
    let blob = format!("/api/v1/blobs/{}", a_blobs[2]);
    let (s, body) = admin(&proxy, "DELETE", &blob, "");
    assert_eq!(
        (s, &body["digests"]),
        (200, &serde_json::json!([a_blobs[2]]))
    );
    let (s, body) = admin(&proxy, "DELETE", &blob, "");
    assert_eq!((s, code(&body)), (404, "BLOB_UNKNOWN"));
    let (s, body) = admin(&proxy, "DELETE", &format!("{blob}?purge_shared=maybe"), "");
    assert_eq!((s, code(&body)), (400, "REQUEST_INVALID"));
}

#[test]
fn deleting_a_blob_while_it_fills_corrupts_nothing() {
    let fake = Fake::start();
    let data = random_bytes(1 << 20, 21);
    let d = fake.add_blob(&data);
    let slow = Fault::Slow {
        chunk: 64 << 10,
        delay: Duration::from_millis(50),
    };
    fake.fault(&d, slow, Some(1));
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_of(dir.path(), &fake, 1 << 30);
    let url = format!("{}/v2/x/blobs/{d}", proxy.url());
    let client = std::thread::spawn(move || http_request("GET", &url, &[], b""));
    wait_until("the fill", Duration::from_secs(10), || {
        let (_, report) = admin(&proxy, "GET", "/api/v1/cache", "");
        report["fills"][0]["received"]
            .as_u64()
            .is_some_and(|n| n > 0)
    });
    let (s, body) = admin(&proxy, "DELETE", &format!("/api/v1/blobs/{d}"), "");
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["filling"], serde_json::json!([d]));
    let (s, _, got) = client.join().unwrap();
    assert!(
        s == 200 && got == data,
        "the client got the whole, right blob"
    );
    let (s, h, got) = proxy.get(&format!("/v2/x/blobs/{d}"), &[]);
    assert_eq!((s, header(&h, "x-cache")), (200, Some("HIT")));
    assert!(got == data);
    assert_eq!(fake.count("GET", &d), 1);
}

/// Polls job `id` until it ends; returns it.
fn job_end(proxy: &Proxy, id: u64) -> Value {
    let mut job = Value::Null;
    wait_until("the job's end", Duration::from_secs(30), || {
        job = admin(proxy, "GET", &format!("/api/v1/jobs/{id}"), "").1;
        job["state"] != "running"
    });
    job
}

#[test]
fn verify_and_gc_jobs_run_beside_fills_and_no_fill_fails() {
    let fake = Fake::start();
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_of(dir.path(), &fake, 1 << 30);
    let cached: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| {
            let data = random_bytes(100_000, 30 + i);
            let d = fake.add_blob(&data);
            assert_eq!(proxy.get(&format!("/v2/x/blobs/{d}"), &[]).0, 200);
            (d, data)
        })
        .collect();
    // Bit rot in one committed blob: same length, other bytes.
    let (rotten, rotten_data) = &cached[0];
    let hex = rotten.strip_prefix("sha256:").unwrap();
    let path = proxy
        .cache_dir()
        .join("blobs/sha256")
        .join(&hex[..2])
        .join(hex);
    std::fs::write(&path, vec![0u8; 100_000]).unwrap();

    // Four slow fills under way.
    let slow: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| {
            let data = random_bytes(1 << 20, 40 + i);
            let d = fake.add_blob(&data);
            let fault = Fault::Slow {
                chunk: 64 << 10,
                delay: Duration::from_millis(80),
            };
            fake.fault(&d, fault, Some(1));
            (d, data)
        })
        .collect();
    let clients: Vec<_> = slow
        .iter()
        .map(|(d, _)| {
            let url = format!("{}/v2/x/blobs/{d}", proxy.url());
            std::thread::spawn(move || http_request("GET", &url, &[], b""))
        })
        .collect();
    wait_until("four fills streaming", Duration::from_secs(10), || {
        let (_, report) = admin(&proxy, "GET", "/api/v1/cache", "");
        let fills = report["fills"].as_array().cloned().unwrap_or_default();
        fills.len() == 4 && fills.iter().all(|f| f["received"].as_u64() > Some(0))
    });

    let (s, verify) = admin(&proxy, "POST", "/api/v1/verify", "");
    assert_eq!(
        (s, &verify["kind"], &verify["state"]),
        (202, &"verify".into(), &"running".into())
    );
    let verify = job_end(&proxy, verify["id"].as_u64().unwrap());
    assert_eq!(verify["state"], "done", "{verify}");
    assert_eq!(verify["result"]["removed"], serde_json::json!([rotten]));
    // After the verify: a gc to 0 would otherwise remove the rotten blob first.
    let (s, gc) = admin(&proxy, "POST", "/api/v1/gc", r#"{"size": "0"}"#);
    assert_eq!(s, 202, "{gc}");
    let gc = job_end(&proxy, gc["id"].as_u64().unwrap());
    assert_eq!(gc["state"], "done", "{gc}");
    assert!(gc["result"]["removed"].as_u64() >= Some(2), "{gc}");
    assert!(
        !admin(&proxy, "GET", "/api/v1/cache", "").1["fills"]
            .as_array()
            .unwrap()
            .is_empty(),
        "the jobs ended while fills still ran"
    );

    for (client, (_, data)) in clients.into_iter().zip(&slow) {
        let (s, _, got) = client.join().unwrap();
        assert!(
            s == 200 && got == *data,
            "a fill's client got the whole, right blob"
        );
    }
    assert_eq!(proxy.metric("ocicache_fills_failed_total"), 0.0);
    for (d, _) in &slow {
        let (s, h, _) = proxy.get(&format!("/v2/x/blobs/{d}"), &[]);
        assert_eq!((s, header(&h, "x-cache")), (200, Some("HIT")), "committed");
    }
    // The rotten blob was removed: fetched again, right.
    let (s, _, got) = proxy.get(&format!("/v2/x/blobs/{rotten}"), &[]);
    assert!(s == 200 && got == *rotten_data);
    assert_eq!(fake.count("GET", rotten), 2);

    let (s, body) = admin(&proxy, "POST", "/api/v1/gc", r#"{"size": "lots"}"#);
    assert_eq!((s, code(&body)), (400, "REQUEST_INVALID"));
    let (s, body) = admin(&proxy, "GET", "/api/v1/jobs/999", "");
    assert_eq!((s, code(&body)), (404, "NAME_UNKNOWN"));
}

#[test]
fn a_prefetch_job_fills_the_cache_inside_the_server() {
    let fake = Fake::start();
    let (manifest, blobs) = image(
        &fake,
        "library/app",
        "1",
        &[random_bytes(300_000, 50), random_bytes(200_000, 51)],
    );
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_of(dir.path(), &fake, 1 << 30);
    let (s, job) = admin(
        &proxy,
        "POST",
        "/api/v1/prefetch",
        r#"{"images": ["app:1"]}"#,
    );
    assert_eq!((s, &job["kind"]), (202, &"prefetch".into()), "{job}");
    let job = job_end(&proxy, job["id"].as_u64().unwrap());
    assert_eq!(job["state"], "done", "{job}");
    let warmed = &job["result"]["images"][0]["warmed"];
    assert_eq!(warmed["digest"], manifest);
    assert_eq!(warmed["blobs"], serde_json::json!(blobs));
    assert!(warmed["fetched_bytes"].as_u64() > Some(500_000), "{warmed}");
    assert_eq!(job["result"]["failed"], 0);
    fake.reset_counts();
    pull(&proxy, "app", "1", &blobs);
    assert_eq!(fake.requests().len(), 0, "the pull came from the cache");

    for (body, status, expected) in [
        (r#"{"images": []}"#, 400, "REQUEST_INVALID"),
        (r#"{"images": ["Bad/Name"]}"#, 400, "NAME_INVALID"),
        (r#"{"images": ["quay.io/x/y:1"]}"#, 404, "NAME_UNKNOWN"),
        (
            r#"{"images": ["app"], "platforms": ["linux"]}"#,
            400,
            "REQUEST_INVALID",
        ),
        (r#"{"imagez": ["app"]}"#, 400, "REQUEST_INVALID"),
        ("not json", 400, "REQUEST_INVALID"),
    ] {
        let (s, err) = admin(&proxy, "POST", "/api/v1/prefetch", body);
        assert_eq!((s, code(&err)), (status, expected), "{body}: {err}");
    }
    assert_eq!(
        fake.requests().len(),
        0,
        "nothing was fetched for bad requests"
    );
}

const BIN: &str = env!("CARGO_BIN_EXE_ocicache");

/// Runs `ocicache cache <args>`: exit code, stdout, stderr.
fn cli(args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(BIN)
        .arg("cache")
        .args(args)
        .env_remove("OCICACHE_ADMIN_TOKEN")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cache_stats_beside_a_server_is_refused_without_server_and_answered_with_it() {
    use crate::support::proxy::{toml_for, ChildProxy};
    let fake = Fake::start();
    let data = random_bytes(123_456, 60);
    let d = fake.add_blob(&data);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let child = ChildProxy::start(
        dir.path(),
        &toml_for(&cache, &fake.url(), ""),
        std::process::Stdio::null(),
    );
    let url = format!("{}/v2/x/blobs/{d}", child.base);
    assert_eq!(http_request("GET", &url, &[], b"").0, 200);

    let cfg = dir.path().join("c.toml");
    let cfg = cfg.to_str().unwrap();
    let (status, out, err) = cli(&["stats", "--config", cfg]);
    assert_eq!(status, Some(3), "{err}");
    assert!(out.is_empty());
    assert!(
        err.contains("a running server (pid") && err.contains("--server URL"),
        "{err}"
    );

    let (status, out, err) = cli(&["stats", "--server", &child.admin]);
    assert_eq!(status, Some(0), "{err}");
    assert!(out.contains("entries:  1\n"), "{out}");
    assert!(out.contains("(123456 bytes)"), "{out}");
    assert!(out.contains("1 misses"), "{out}");
    assert!(child.terminate().status.success());
}

#[test]
fn the_cache_commands_ask_the_admin_api_with_server_and_its_token() {
    let fake = Fake::start();
    let shared = random_bytes(40_000, 70);
    let (a, a_blobs) = image(
        &fake,
        "library/app",
        "1",
        &[shared.clone(), random_bytes(30_000, 71)],
    );
    let (_, b_blobs) = image(&fake, "library/app", "2", &[shared]);
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_of(dir.path(), &fake, 1 << 30);
    pull(&proxy, "app", "1", &a_blobs);
    pull(&proxy, "app", "2", &b_blobs);
    let server = proxy.admin_url();
    let with = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--server", &server, "--token", TOKEN]);
        cli(&all)
    };

    let (status, _, err) = cli(&["ls", "--server", &server, "--token", "wrong"]);
    assert_eq!(status, Some(1));
    assert!(err.contains("401") && err.contains("UNAUTHORIZED"), "{err}");

    let (status, out, err) = with(&["ls"]);
    assert_eq!(status, Some(0), "{err}");
    assert!(
        out.contains("docker.io/library/app:1") && out.contains("docker.io/library/app:2"),
        "{out}"
    );

    let (status, out, err) = with(&["pin", "app:2"]);
    assert_eq!(status, Some(0), "{err}");
    assert!(out.contains("pinned app:2: 1 manifests, 2 blobs"), "{out}");
    assert_eq!(proxy.state.cache.pins().len(), 1);

    let (status, out, err) = with(&["rm", "docker.io/library/app:1"]);
    assert_eq!(status, Some(0), "{err}");
    assert!(out.contains(&format!("removed {a}")), "{out}");
    assert!(out.contains(&format!("kept {}", a_blobs[1])), "{out}");
    let (status, _, err) = with(&["rm", "app:1"]);
    assert_eq!(status, Some(1));
    assert!(err.contains("MANIFEST_UNKNOWN"), "{err}");

    let (status, out, err) = with(&["unpin", "app:2"]);
    assert_eq!(status, Some(0), "{err}");
    assert!(out.contains("unpinned app:2"), "{out}");
    assert!(proxy.state.cache.pins().is_empty());

    let blob = &b_blobs[1];
    let (status, out, err) = with(&["rm", blob]);
    assert_eq!(status, Some(0), "{err}");
    assert!(out.contains(&format!("removed {blob}")), "{out}");

    let (status, out, err) = with(&["verify"]);
    assert_eq!(status, Some(0), "{err}");
    assert!(out.contains("0 corrupt and removed"), "{out}");
    let (status, out, err) = with(&["gc", "--size", "0"]);
    assert_eq!(status, Some(0), "{err}");
    assert!(out.contains("0B remain"), "{out}");
}

#[test]
fn without_server_the_commands_work_on_a_folder_no_server_holds() {
    let fake = Fake::start();
    let (_, blobs) = image(&fake, "library/app", "1", &[random_bytes(20_000, 80)]);
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_of(dir.path(), &fake, 1 << 30);
    pull(&proxy, "app", "1", &blobs);
    let cache = proxy.cache_dir();
    proxy.stop();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        crate::support::proxy::toml_for(&cache, &fake.url(), ""),
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap();
    let (status, out, err) = cli(&["ls", "--config", cfg]);
    assert_eq!(status, Some(0), "{err}");
    assert!(out.contains("docker.io/library/app:1"), "{out}");
    let (status, out, err) = cli(&["rm", "app:1", "--config", cfg]);
    assert_eq!(status, Some(0), "{err}");
    assert!(out.contains("forgot tag docker.io/library/app:1"), "{out}");
    let (_, out, _) = cli(&["ls", "--config", cfg]);
    assert!(!out.contains("app:1"), "{out}");
}

#[test]
fn pins_alone_over_the_bound_are_said_in_readyz_and_metrics() {
    let fake = Fake::start();
    let (_, blobs) = image(
        &fake,
        "library/big",
        "1",
        &[random_bytes(600_000, 90), random_bytes(600_000, 91)],
    );
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_of(dir.path(), &fake, 1 << 20);
    assert_eq!(
        admin(&proxy, "PUT", "/api/v1/pins/docker.io/big/1", "").0,
        200
    );
    pull(&proxy, "big", "1", &blobs);
    let (s, _, body) = proxy.get("/readyz", &[]);
    let body = String::from_utf8(body).unwrap();
    assert_eq!(s, 200, "still serving: ready");
    assert!(body.contains("pinned images alone"), "{body}");
    assert_eq!(proxy.metric("ocicache_pins_over_bound"), 1.0);
    assert!(proxy.metric("ocicache_pinned_bytes") > f64::from(1 << 20));
    fake.reset_counts();
    pull(&proxy, "big", "1", &blobs);
    assert_eq!(fake.requests().len(), 0, "nothing pinned was evicted");
    assert_eq!(
        admin(&proxy, "DELETE", "/api/v1/pins/docker.io/big/1", "").0,
        200
    );
    assert_eq!(proxy.get("/readyz", &[]).2, b"ready\n");
    assert_eq!(proxy.metric("ocicache_pins_over_bound"), 0.0);
}
