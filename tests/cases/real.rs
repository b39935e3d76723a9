//! Against the real CNCF registry, with real clients: skopeo and containerd pull through
//! ocicache and every digest is checked.

use crate::support::clients::{
    assert_success, skopeo_available, skopeo_copy, verify_dir_copy, Containerd,
};
use crate::support::proxy::{config, Proxy};
use crate::support::registry::{header, random_bytes, Registry};

fn layers(seed: u64, sizes: &[usize]) -> Vec<Vec<u8>> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, s)| random_bytes(*s, seed + i as u64))
        .collect()
}

#[test]
fn skopeo_pulls_through_the_proxy_and_the_second_pull_is_served_from_cache() {
    let Some(reg) = Registry::start() else { return };
    if !skopeo_available() {
        return;
    }
    let img = reg.push_image("library/hello", "1.0", &layers(1, &[300_000, 70_000]));
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(config(dir.path(), &[("docker.io", &reg.url(), true)]));

    // Through the default upstream, with Docker Hub's library/ rule (`hello` = `library/hello`).
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("a");
    assert_success(
        "skopeo copy",
        &skopeo_copy(&format!("{}/hello:1.0", proxy.addr), &dest),
    );
    let mut got = verify_dir_copy(&dest);
    let mut want = img.all_digests();
    want.retain(|d| d != &img.manifest_digest);
    got.retain(|d| d != &img.manifest_digest);
    got.sort();
    want.sort();
    assert_eq!(got, want, "every blob arrives with the pushed digest");
    let blob_gets = reg.wait_for_requests("GET", "/blobs/sha256:", 3);
    assert_eq!(blob_gets, 3, "config and two layers fetched once each");

    // Again, through the path prefix: everything is in the cache now.
    let dest = out.path().join("b");
    assert_success(
        "skopeo copy",
        &skopeo_copy(
            &format!("{}/docker.io/library/hello:1.0", proxy.addr),
            &dest,
        ),
    );
    assert_eq!(verify_dir_copy(&dest).len(), got.len());
    reg.flush_access_log();
    assert_eq!(
        reg.count_requests("GET", "/blobs/"),
        3,
        "the second pull makes no upstream blob request"
    );
}

#[test]
fn containerd_pulls_through_the_proxy_with_ns_and_every_digest_arrives() {
    let Some(reg) = Registry::start() else { return };
    let Some(ctrd) = Containerd::start() else {
        return;
    };
    let img = reg.push_image("library/web", "2", &layers(10, &[200_000, 50_000, 1_000]));
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(config(dir.path(), &[("docker.io", &reg.url(), true)]));

    let out = ctrd.pull_via_mirror(proxy.addr, "docker.io/library/web:2");
    assert_success("ctr pull", &out);
    let have = ctrd.content_digests();
    for d in img.all_digests() {
        assert!(
            have.contains(&d),
            "{d} missing from containerd's content store"
        );
    }
    let blob_gets = reg.wait_for_requests("GET", "/blobs/sha256:", 4);
    assert_eq!(blob_gets, 4, "config and three layers, once each");

    // Pull again after removing the image: containerd fetches everything again, from us.
    assert_success("ctr rm", &ctrd.remove_image("docker.io/library/web:2"));
    assert_success(
        "ctr pull",
        &ctrd.pull_via_mirror(proxy.addr, "docker.io/library/web:2"),
    );
    reg.flush_access_log();
    assert_eq!(
        reg.count_requests("GET", "/blobs/"),
        4,
        "no upstream blob request on the second pull"
    );
    assert!(proxy.metric("ocicache_cache_hits_total{kind=\"blob\"}") >= 4.0);
}

#[test]
fn manifests_are_byte_exact_with_the_upstream_content_type_and_head_headers() {
    let Some(reg) = Registry::start() else { return };
    let img = reg.push_image("team/app", "v1", &layers(20, &[1000]));
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(config(dir.path(), &[("registry.local", &reg.url(), false)]));

    for path in [
        "/v2/team/app/manifests/v1?ns=registry.local".to_string(),
        "/v2/registry.local/team/app/manifests/v1".to_string(),
        format!(
            "/v2/registry.local/team/app/manifests/{}",
            img.manifest_digest
        ),
    ] {
        let (status, headers, body) = proxy.get(&path, &[]);
        assert_eq!(status, 200, "{path}");
        assert_eq!(body, img.manifest, "byte-exact manifest for {path}");
        assert_eq!(
            header(&headers, "content-type"),
            Some(img.media_type.as_str())
        );
        assert_eq!(
            header(&headers, "docker-content-digest"),
            Some(img.manifest_digest.as_str())
        );
        let (status, headers, body) = proxy.head(&path, &[]);
        assert_eq!(status, 200);
        assert!(body.is_empty());
        assert_eq!(
            header(&headers, "docker-content-digest"),
            Some(img.manifest_digest.as_str())
        );
        assert_eq!(
            header(&headers, "content-length"),
            Some(img.manifest.len().to_string().as_str())
        );
    }
    let (_, headers, _) = proxy.get("/v2/team/app/manifests/v1?ns=registry.local", &[]);
    assert_eq!(header(&headers, "oci-namespace"), Some("registry.local"));

    // Blob HEAD carries the length and digest, and a blob GET is exact.
    let layer = &img.layer_digests[0];
    let (status, headers, _) =
        proxy.head(&format!("/v2/registry.local/team/app/blobs/{layer}"), &[]);
    assert_eq!(status, 200);
    assert_eq!(
        header(&headers, "docker-content-digest"),
        Some(layer.as_str())
    );
    assert_eq!(
        header(&headers, "content-length"),
        Some(img.layer_blobs[0].len().to_string().as_str())
    );
    let (status, _, body) = proxy.get(&format!("/v2/registry.local/team/app/blobs/{layer}"), &[]);
    assert_eq!(status, 200);
    assert_eq!(body, img.layer_blobs[0]);

    // No default upstream: a bare name is NAME_UNKNOWN, never a guess.
    let (status, _, body) = proxy.get("/v2/team/app/manifests/v1", &[]);
    assert_eq!(status, 404);
    assert!(String::from_utf8_lossy(&body).contains("NAME_UNKNOWN"));
}

/// The upstream's own error reaches the client: the CNCF registry refuses an OCI index to a
/// client that accepts only Docker types, and says why; ocicache passes its code and message
/// on, not a generic "manifest unknown to the upstream".
#[test]
fn the_upstreams_own_error_code_and_message_reach_the_client() {
    let Some(reg) = Registry::start() else { return };
    let img = reg.push_image("library/multi", "amd", &layers(40, &[1000]));
    let (index_digest, _) = reg.push_index("library/multi", "1", &[(&img, "amd64")]);
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(config(dir.path(), &[("docker.io", &reg.url(), true)]));
    let docker_only = "application/vnd.docker.distribution.manifest.v2+json";
    let (status, _, body) = proxy.get("/v2/library/multi/manifests/1", &[("accept", docker_only)]);
    let text = String::from_utf8_lossy(&body);
    assert_eq!(status, 404, "{text}");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let err = &v["errors"][0];
    assert_eq!(err["code"], "MANIFEST_UNKNOWN", "{text}");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("accept header does not support OCI indexes"),
        "the registry's own message: {text}"
    );
    // And a client that accepts the index gets it.
    let (status, h, _) = proxy.get(
        "/v2/library/multi/manifests/1",
        &[("accept", "application/vnd.oci.image.index.v1+json")],
    );
    assert_eq!(status, 200);
    assert_eq!(
        header(&h, "docker-content-digest"),
        Some(index_digest.as_str())
    );
}
