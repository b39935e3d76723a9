//! Several replicas sharing one cache in a real S3-compatible store: a 3-node Garage cluster
//! (replication factor 3) on loopback. The upstream is the fake (to count its requests and
//! to corrupt bodies) or the CNCF registry with skopeo (for a real pull).

use std::time::{Duration, Instant};

use object_store::ObjectStore;
use ocicache::config::{Config, S3Config};

use crate::support::clients::{assert_success, skopeo_copy, verify_dir_copy};
use crate::support::fake::{Fake, Fault};
use crate::support::garage::Garage;
use crate::support::proxy::{config, Proxy};
use crate::support::registry::{header, http_request, random_bytes, try_http_request, Registry};
use crate::support::wait_until;

fn s3(g: &Garage, prefix: &str, extra: serde_json::Value) -> S3Config {
    let mut v = serde_json::json!({
        "endpoint": g.endpoint(0),
        "bucket": g.bucket(),
        "region": g.region(),
        "prefix": prefix,
        "access_key_id": g.access_key_id(),
        "secret_access_key": g.secret_access_key(),
        "timeout": "5s",
        "lease_wait": "60s",
    });
    if let serde_json::Value::Object(m) = extra {
        v.as_object_mut().unwrap().extend(m);
    }
    serde_json::from_value(v).unwrap()
}

/// A replica on the fake upstream, with its own local tier, on the shared bucket.
/// `TEST_LOG=ocicache=debug` shows the replicas' logs.
fn replica(fake_url: &str, s3: S3Config) -> (Proxy, tempfile::TempDir) {
    if let Ok(filter) = std::env::var("TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(filter)
            .try_init();
    }
    let dir = tempfile::tempdir().unwrap();
    let mut c: Config = config(dir.path(), &[("docker.io", fake_url, true)]);
    c.cache.s3 = Some(s3);
    (Proxy::start(c), dir)
}

/// The bucket's objects under `prefix`: (key, size), sorted.
fn objects(g: &Garage, prefix: &str) -> Vec<(String, u64)> {
    let store = g.client(0);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use futures_util::TryStreamExt;
        let p = object_store::path::Path::from(prefix);
        let mut v: Vec<(String, u64)> = store
            .list(Some(&p))
            .map_ok(|m| (m.location.to_string(), m.size))
            .try_collect()
            .await
            .unwrap();
        v.sort();
        v
    })
}

fn blob_key(prefix: &str, digest: &str) -> String {
    format!(
        "{prefix}/blobs/sha256/{}",
        digest.strip_prefix("sha256:").unwrap()
    )
}

#[test]
fn a_blob_pulled_through_one_replica_is_served_by_the_other_without_the_upstream() {
    let g = Garage::start();
    let fake = Fake::start();
    let data = random_bytes(12 << 20, 81); // a multipart upload
    let digest = fake.add_blob(&data);
    let (a, _da) = replica(&fake.url(), s3(&g, "t1", serde_json::json!({})));
    let (b, _db) = replica(&fake.url(), s3(&g, "t1", serde_json::json!({})));
    let path = format!("/v2/library/x/blobs/{digest}");

    let (status, _, body) = a.get(&path, &[]);
    assert_eq!(status, 200);
    assert_eq!(crate::support::fake::sha256(&body), digest);
    wait_until("the upload", Duration::from_secs(20), || {
        objects(&g, "t1/blobs")
            .iter()
            .any(|(k, s)| *k == blob_key("t1", &digest) && *s == data.len() as u64)
    });
    // The upload task releases the lease once the upload is complete, just after it.
    wait_until("the lease released", Duration::from_secs(20), || {
        objects(&g, "t1/leases").is_empty()
    });

    fake.reset_counts();
    let (status, headers, _) = b.head(&path, &[]);
    assert_eq!(status, 200);
    assert_eq!(
        header(&headers, "content-length"),
        Some(data.len().to_string().as_str())
    );
    let (status, headers, body) = b.get(&path, &[("Range", "bytes=100-199")]);
    assert_eq!(status, 206);
    assert_eq!(body, &data[100..200]);
    // A fill fed by the bucket is not a miss to the upstream.
    assert_eq!(
        header(&headers, "x-cache"),
        Some("HIT"),
        "a fill from the bucket"
    );
    let (status, _, body) = b.get(&path, &[]);
    assert_eq!(status, 200);
    assert_eq!(crate::support::fake::sha256(&body), digest);
    assert_eq!(fake.count("GET", "/blobs/"), 0, "served from the bucket");
    assert!(b.metric("ocicache_served_bytes_total{source=\"bucket\"}") > 0.0);
    assert_eq!(fake.count("HEAD", "/blobs/"), 0);
    // Now in b's local tier too.
    assert!(b
        .cache_dir()
        .join("blobs/sha256")
        .join(&digest[7..9])
        .join(&digest[7..])
        .exists());
}

#[test]
fn a_real_pull_through_one_replica_makes_the_other_answer_without_the_upstream() {
    let Some(registry) = Registry::start() else {
        return;
    };
    let layers = vec![random_bytes(3 << 20, 82), random_bytes(7 << 20, 83)];
    registry.push_image("team/app", "v1", &layers);
    let g = Garage::start();
    let (a, _da) = replica(&registry.url(), s3(&g, "t2", serde_json::json!({})));
    let (b, _db) = replica(&registry.url(), s3(&g, "t2", serde_json::json!({})));

    let out = tempfile::tempdir().unwrap();
    let image = format!("{}/team/app:v1", a.addr);
    assert_success("skopeo via replica a", &skopeo_copy(&image, out.path()));
    assert_eq!(
        verify_dir_copy(out.path()).len(),
        3,
        "two layers and the config"
    );
    // Wait for both layers (and the config) in the bucket.
    wait_until("the uploads", Duration::from_secs(30), || {
        objects(&g, "t2/blobs").len() >= 4
    });
    wait_until("the tag record", Duration::from_secs(10), || {
        !objects(&g, "t2/tags").is_empty()
    });
    let before_blobs = registry.count_requests("GET", "/blobs/");
    let before_manifests = registry.count_requests("GET", "/manifests/")
        + registry.count_requests("HEAD", "/manifests/");

    let out = tempfile::tempdir().unwrap();
    let image = format!("{}/team/app:v1", b.addr);
    assert_success("skopeo via replica b", &skopeo_copy(&image, out.path()));
    assert_eq!(
        verify_dir_copy(out.path()).len(),
        3,
        "two layers and the config"
    );
    assert_eq!(
        registry.count_requests("GET", "/blobs/"),
        before_blobs,
        "replica b pulled no blob from the upstream"
    );
    assert_eq!(
        registry.count_requests("GET", "/manifests/")
            + registry.count_requests("HEAD", "/manifests/"),
        before_manifests,
        "replica b answered the tag from the shared tag record"
    );
}

/// 20 clients spread over `n` replicas ask for one cold blob at once: how many upstream
/// GETs? Garage ignores conditional writes, so this is the lease by listing: one.
fn cold_blob_over_replicas(n: usize, prefix: &str) -> usize {
    let g = Garage::start();
    let fake = Fake::start();
    let data = random_bytes(8 << 20, 84 + n as u64);
    let digest = fake.add_blob(&data);
    fake.fault(
        "/blobs/",
        Fault::Slow {
            chunk: 256 << 10,
            delay: Duration::from_millis(20),
        },
        None,
    );
    let replicas: Vec<_> = (0..n)
        .map(|_| replica(&fake.url(), s3(&g, prefix, serde_json::json!({}))))
        .collect();
    let clients: Vec<_> = (0..20)
        .map(|i| {
            let url = format!("{}/v2/library/x/blobs/{digest}", replicas[i % n].0.url());
            std::thread::spawn(move || try_http_request("GET", &url, &[], b"").unwrap())
        })
        .collect();
    for c in clients {
        let (status, _, body) = c.join().unwrap();
        assert_eq!(status, 200);
        assert_eq!(crate::support::fake::sha256(&body), digest);
    }
    let fetches = fake.count("GET", "/blobs/");
    eprintln!("{n} replicas, 20 clients, one cold 8 MiB blob: {fetches} upstream GETs");
    assert!((1..=n).contains(&fetches), "{fetches} upstream GETs");
    fetches
}

#[test]
fn twenty_cold_clients_over_two_and_three_replicas() {
    let two = cold_blob_over_replicas(2, "t3a");
    let three = cold_blob_over_replicas(3, "t3b");
    eprintln!("upstream GETs: 2 replicas {two}, 3 replicas {three}");
    // Measured: 1 and 1. Without leases it is 2 and 3. The lease by listing (Garage has no
    // conditional writes) is best effort: a PUT slower than its wait on a loaded machine can
    // make a second winner, so allow one.
    assert!(two + three <= 3, "2 replicas: {two}, 3 replicas: {three}");
}

#[test]
fn a_corrupt_upstream_body_leaves_nothing_in_the_bucket() {
    let g = Garage::start();
    let fake = Fake::start();
    let small = random_bytes(100 << 10, 85);
    let big = random_bytes(11 << 20, 86);
    let (a, _da) = replica(&fake.url(), s3(&g, "t4", serde_json::json!({})));
    for data in [&small, &big] {
        let digest = fake.add_blob(data);
        fake.fault(&digest, Fault::CorruptBody, Some(1));
        let url = format!("{}/v2/library/x/blobs/{digest}", a.url());
        // The client sees an error (a cut body), never a clean wrong one.
        if let Ok((status, _, body)) = try_http_request("GET", &url, &[], b"") {
            assert!(
                status != 200 || body.len() < data.len(),
                "a wrong body came out whole"
            );
        }
    }
    // Both uploads end (aborted with their fills) and release their leases.
    wait_until("the uploads' end", Duration::from_secs(20), || {
        a.metric(r#"ocicache_shared_store_operations_total{op="upload",result="aborted"}"#) >= 2.0
            && objects(&g, "t4/leases").is_empty()
    });
    assert_eq!(
        objects(&g, "t4/blobs"),
        vec![],
        "nothing unverified in the bucket"
    );
    assert!(objects(&g, "t4/leases").is_empty());
    // The next request refetches, and then the bucket has it.
    let digest = crate::support::fake::sha256(&big);
    let (status, _, body) = a.get(&format!("/v2/library/x/blobs/{digest}"), &[]);
    assert_eq!(status, 200);
    assert_eq!(crate::support::fake::sha256(&body), digest);
    wait_until("the upload", Duration::from_secs(20), || {
        objects(&g, "t4/blobs").len() == 1
    });
}

#[test]
fn pulls_go_on_with_a_store_node_down_and_with_the_whole_store_down() {
    let mut g = Garage::start();
    let fake = Fake::start();
    let (a, _da) = replica(&fake.url(), s3(&g, "t5", serde_json::json!({})));
    let (b, _db) = replica(&fake.url(), s3(&g, "t5", serde_json::json!({})));
    g.kill_node(2);
    let data = random_bytes(6 << 20, 87);
    let digest = fake.add_blob(&data);
    let path = format!("/v2/library/x/blobs/{digest}");
    let (status, _, body) = a.get(&path, &[]);
    assert_eq!(status, 200);
    assert_eq!(crate::support::fake::sha256(&body), digest);
    // Garage answers the first GET after a node's death after ~9 s: over `timeout`, so the
    // replica skips the store for a while, and the upload is tried again after it.
    wait_until("the upload", Duration::from_secs(40), || {
        objects(&g, "t5/blobs").len() == 1
    });
    fake.reset_counts();
    let (status, _, body) = b.get(&path, &[]);
    assert_eq!(status, 200);
    assert_eq!(crate::support::fake::sha256(&body), digest);
    assert_eq!(
        fake.count("GET", "/blobs/"),
        0,
        "from the bucket, with a node down"
    );

    // Every node down: the local tier and the upstream still serve.
    g.kill_node(0);
    g.kill_node(1);
    let (status, _, _) = a.get(&path, &[]);
    assert_eq!(status, 200, "a's local tier");
    let other = random_bytes(1 << 20, 88);
    let other_digest = fake.add_blob(&other);
    let started = Instant::now();
    let (status, _, body) = b.get(&format!("/v2/library/x/blobs/{other_digest}"), &[]);
    assert_eq!(status, 200);
    assert_eq!(crate::support::fake::sha256(&body), other_digest);
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(
        b.metric("ocicache_shared_store_operations_total{op=\"get_blob\",result=\"error\"}") >= 1.0
    );
}

#[test]
fn gc_keeps_the_bucket_under_its_bound_while_two_replicas_run_it() {
    let g = Garage::start();
    let fake = Fake::start();
    let bound = 3u64 << 20;
    let extra = serde_json::json!({"max_size": "3MiB", "gc_interval": "1s"});
    let (a, _da) = replica(&fake.url(), s3(&g, "t6", extra.clone()));
    let (b, _db) = replica(&fake.url(), s3(&g, "t6", extra));
    for i in 0..8u64 {
        let data = random_bytes(1 << 20, 90 + i);
        let digest = fake.add_blob(&data);
        let via = if i % 2 == 0 { &a } else { &b };
        let (status, _, _) = via.get(&format!("/v2/library/x/blobs/{digest}"), &[]);
        assert_eq!(status, 200);
        // Uploaded (so that the blobs land, and are used, in this order).
        let uploaded = || {
            via.metric(r#"ocicache_shared_store_operations_total{op="upload",result="completed"}"#)
        };
        wait_until("the upload", Duration::from_secs(20), || {
            uploaded() >= (i / 2 + 1) as f64
        });
    }
    wait_until("the GC", Duration::from_secs(15), || {
        let total: u64 = objects(&g, "t6/blobs").iter().map(|(_, s)| s).sum();
        total <= bound
    });
    let kept = objects(&g, "t6/blobs");
    assert!(
        (2..=3).contains(&kept.len()),
        "the most recent blobs are kept: {kept:?}"
    );
}

#[test]
fn redirect_sends_hits_to_a_presigned_url_of_the_bucket() {
    let g = Garage::start();
    let fake = Fake::start();
    let data = random_bytes(2 << 20, 89);
    let digest = fake.add_blob(&data);
    let (a, _da) = replica(
        &fake.url(),
        s3(&g, "t7", serde_json::json!({"redirect": true})),
    );
    let path = format!("/v2/library/x/blobs/{digest}");
    // Cold: served by the proxy (and uploaded).
    let (status, _, body) = a.get(&path, &[]);
    assert_eq!(status, 200);
    assert_eq!(body.len(), data.len());
    wait_until("the upload", Duration::from_secs(20), || {
        objects(&g, "t7/blobs").len() == 1
    });
    // A local hit of a blob this replica uploaded: redirected without asking the store.
    let heads = |p: &crate::support::proxy::Proxy| {
        p.metric("ocicache_shared_store_operations_total{op=\"head_blob\"")
    };
    let heads_before = heads(&a);
    let hits =
        |p: &crate::support::proxy::Proxy| p.metric("ocicache_cache_hits_total{kind=\"blob\"}");
    let hits_before = hits(&a);
    let (status, headers, _) = a.get(&path, &[]);
    assert_eq!(status, 307);
    assert_eq!(
        heads(&a),
        heads_before,
        "a local hit makes no call to the bucket"
    );
    assert_eq!(hits(&a), hits_before, "a redirect is not counted as a hit");
    let location = header(&headers, "location").unwrap().to_string();
    assert!(
        location.starts_with(&g.endpoint(0)),
        "to the store: {location}"
    );
    assert!(!location.contains(g.secret_access_key()));
    let (status, _, body) = http_request("GET", &location, &[], b"");
    assert_eq!(status, 200);
    assert_eq!(crate::support::fake::sha256(&body), digest);
}

#[test]
fn replicas_resolving_the_same_cold_manifests_ask_the_upstream_once() {
    let g = Garage::start();
    let fake = Fake::start();
    let oci = "application/vnd.oci.image.manifest.v1+json";
    let by_tag = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
    let tag_digest = fake.add_manifest("library/app", Some("v1"), oci, by_tag);
    let by_digest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8b","size":2},"layers":[]}"#;
    let other_digest = fake.add_manifest("library/app", None, oci, by_digest);
    // Slow answers, so that the replicas ask at the same time.
    fake.fault(
        "/manifests/",
        Fault::Delay(Duration::from_millis(500)),
        None,
    );
    let replicas: Vec<_> = (0..3)
        .map(|_| replica(&fake.url(), s3(&g, "t8", serde_json::json!({}))))
        .collect();
    for (reference, digest) in [("v1", &tag_digest), (other_digest.as_str(), &other_digest)] {
        let clients: Vec<_> = replicas
            .iter()
            .map(|(p, _)| {
                let url = format!("{}/v2/library/app/manifests/{reference}", p.url());
                std::thread::spawn(move || {
                    try_http_request(
                        "GET",
                        &url,
                        &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
                        b"",
                    )
                    .unwrap()
                })
            })
            .collect();
        for c in clients {
            let (status, headers, body) = c.join().unwrap();
            assert_eq!(status, 200);
            assert_eq!(
                header(&headers, "docker-content-digest"),
                Some(digest.as_str())
            );
            assert_eq!(&crate::support::fake::sha256(&body), digest);
        }
    }
    // Measured: 2 (one per manifest); 6 without the lease. Best effort (see above).
    let gets = fake.count("GET", "/manifests/");
    eprintln!("3 replicas, 2 cold manifests: {gets} upstream GETs");
    assert!(
        gets <= 3,
        "{gets} upstream GETs for 2 manifests across 3 replicas"
    );
}
