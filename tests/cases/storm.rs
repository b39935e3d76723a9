//! A storm of cold misses: many distinct blobs at once, more than `cache.max_fills`. Every
//! fill completes with the right bytes, the ones beyond the bound wait their turn (the
//! `ocicache_fills_queued` gauge shows them), and nothing is left behind.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::support::fake::Fake;
use crate::support::proxy::{config, Proxy};
use crate::support::registry::{random_bytes, sha256_digest};
use crate::support::wait_until;

#[test]
fn a_thousand_cold_fills_at_once_all_complete_in_turn() {
    const BLOBS: usize = 1000;
    let fake = Fake::start();
    let blobs: Vec<(String, usize)> = (0..BLOBS)
        .map(|i| (fake.add_blob(&random_bytes(4096 + i, i as u64)), 4096 + i))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), &[("docker.io", &fake.url(), true)]);
    c.cache.max_fills = 8;
    let proxy = Proxy::start(c);

    // The peak of the queue gauge, sampled while the storm runs.
    let peak = Arc::new(AtomicI64::new(0));
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (state, peak, sampling) = (proxy.state.clone(), peak.clone(), sampling.clone());
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                peak.fetch_max(state.metrics.fills_queued.get(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let results: Vec<(u16, String, usize)> = rt.block_on(async {
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let gets: Vec<_> = blobs
            .iter()
            .map(|(digest, _)| {
                let url = format!("{}/v2/library/storm/blobs/{digest}", proxy.url());
                let client = client.clone();
                tokio::spawn(async move {
                    let resp = client.get(url.parse().unwrap()).await.unwrap();
                    let status = resp.status().as_u16();
                    let body = resp.into_body().collect().await.unwrap().to_bytes();
                    (status, sha256_digest(&body), body.len())
                })
            })
            .collect();
        let mut results = Vec::new();
        for g in gets {
            results.push(g.await.unwrap());
        }
        results
    });
    sampling.store(false, Ordering::Relaxed);
    sampler.join().unwrap();

    for ((status, got, len), (want, size)) in results.iter().zip(&blobs) {
        assert_eq!((*status, got, *len), (200, want, *size));
    }
    assert_eq!(
        fake.count("GET", "/blobs/"),
        BLOBS,
        "one upstream GET a blob"
    );
    assert!(
        peak.load(Ordering::Relaxed) > 0,
        "fills beyond max_fills waited their turn"
    );
    let m = &proxy.state.metrics;
    wait_until("the fills to be forgotten", Duration::from_secs(5), || {
        proxy.state.cache.fills_in_flight() == 0
    });
    assert_eq!((m.fills_queued.get(), m.fills_in_flight.get()), (0, 0));
    assert_eq!(m.fills_completed.get(), BLOBS as u64);
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0
    );
}
