//! Start-up on a cache folder that already holds blobs (issue 15): the index is rebuilt in
//! the background; readiness and metrics report it. (Serving while the scan runs, the bound
//! and recency across restarts are tested beside the index, where the scan can be held.)

use std::io::Write;

use ocicache::reference::Digest;

use crate::support::proxy::{config, Proxy};

#[test]
fn blobs_left_on_disk_are_indexed_served_and_reported_ready() {
    let dir = tempfile::tempdir().unwrap();
    let blobs: Vec<(Digest, Vec<u8>)> = (0..300u32)
        .map(|i| {
            let data = format!("blob {i}").into_bytes();
            let d = Digest::sha256_of(&data);
            let path = dir
                .path()
                .join("blobs/sha256")
                .join(&d.hex()[..2])
                .join(d.hex());
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::File::create(&path)
                .unwrap()
                .write_all(&data)
                .unwrap();
            (d, data)
        })
        .collect();
    let mut cfg = config(dir.path(), &[("docker.io", "http://127.0.0.1:9", true)]);
    cfg.offline = true;
    // Proxy::start returns once the scan is done.
    let proxy = Proxy::start(cfg);
    let (status, _, body) = proxy.get("/readyz", &[]);
    assert_eq!((status, body.as_slice()), (200, &b"ready\n"[..]));
    assert_eq!(proxy.metric("ocicache_index_scan_done"), 1.0);
    assert_eq!(proxy.metric("ocicache_index_scanned_blobs"), 300.0);
    assert_eq!(proxy.metric("ocicache_cache_entries"), 300.0);
    let (d, data) = &blobs[123];
    let (status, _, body) = proxy.get(&format!("/v2/library/x/blobs/{d}"), &[]);
    assert_eq!((status, &body), (200, data));
}
