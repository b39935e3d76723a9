//! Warming and scheduled syncs (`[[sync]]`) against the fake upstream: what is cached at
//! start and served without the upstream, tags that move, tag patterns across pages, 429s
//! and `offline`.

use ocicache::prefetch::ImageRef;
use ocicache::warm::{warm, Progress};

use crate::support::fake::Fake;
use crate::support::proxy::{config, Proxy};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Warming an index for two of its three platforms fetches exactly their manifests and
/// blobs, verified, reports progress to the end, and leaves them served with no upstream
/// request; warming it again fetches nothing.
#[test]
fn warm_fetches_the_platforms_asked_for_and_the_cache_then_serves_them() {
    let fake = Fake::start();
    let img = fake.add_image(
        "library/app",
        "1",
        &["linux/amd64", "linux/arm64/v8", "linux/arm/v7"],
        200_000,
        1,
    );
    let dir = tempfile::tempdir().unwrap();
    let p = Proxy::start(config(dir.path(), &[("docker.io", &fake.url(), true)]));
    let image = ImageRef::parse("docker.io/library/app:1").unwrap();
    let platforms = ["linux/amd64".to_string(), "linux/arm64".to_string()];
    let (tx, rx) = tokio::sync::watch::channel(Progress::default());
    let w = runtime()
        .block_on(warm(&p.state, &image, &platforms, Some(&tx)))
        .unwrap();
    assert_eq!(w.digest.to_string(), img.index);
    let manifests: Vec<String> = w.manifests.iter().map(|d| d.to_string()).collect();
    assert_eq!(
        manifests,
        [&img.index[..], &img.manifests[0], &img.manifests[1]]
    );
    let blobs: Vec<String> = w.blobs.iter().map(|d| d.to_string()).collect();
    assert_eq!(blobs, img.blobs[..4]);
    assert!(w.fetched_bytes > 400_000 && w.cached_bytes == 0 && !w.stale);
    let done = rx.borrow().clone();
    assert_eq!(
        (done.manifests, done.blobs_done, done.blobs_total),
        (3, 4, 4)
    );
    assert_eq!(
        (done.bytes_done, done.bytes_total),
        (w.fetched_bytes, w.fetched_bytes)
    );
    assert_eq!(fake.count("GET", &img.blobs[4]), 0, "arm/v7 is not fetched");
    assert_eq!(fake.count("GET", &img.manifests[2]), 0);

    fake.reset_counts();
    for d in &img.manifests[..2] {
        assert_eq!(p.get(&format!("/v2/app/manifests/{d}"), &[]).0, 200);
    }
    for d in &img.blobs[..4] {
        let (s, _, body) = p.get(&format!("/v2/app/blobs/{d}"), &[]);
        assert_eq!((s, crate::support::fake::sha256(&body)), (200, d.clone()));
    }
    assert_eq!(p.get("/v2/app/manifests/1", &[]).0, 200);
    assert!(fake.requests().is_empty(), "{:?}", fake.requests());

    let again = runtime()
        .block_on(warm(&p.state, &image, &platforms, None))
        .unwrap();
    assert_eq!(
        (again.fetched_bytes, again.cached_bytes),
        (0, w.fetched_bytes)
    );
    assert!(
        fake.requests().is_empty(),
        "within the tag's TTL: no request"
    );
}
