use super::*;
use std::io::Write;

fn put(store: &Store, data: &[u8]) -> Digest {
    store.put_for_test(data)
}

#[test]
fn evicts_the_least_recently_used_beyond_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let index = Index::new(1 << 20, store.clone(), Arc::new(Metrics::new()));
    let put = |n: u8| {
        let data = vec![n; 400 << 10];
        let d = put(&store, &data);
        index.insert(d.clone(), data.len() as u64);
        d
    };
    let a = put(1);
    let b = put(2);
    index.touch(&a);
    let c = put(3);
    assert!(
        !store.blob_path(&b).exists(),
        "b was the least recently used"
    );
    assert!(store.blob_path(&a).exists() && store.blob_path(&c).exists());
    assert!(!index.contains(&b));
    assert_eq!(index.usage(), (800 << 10, 2));
    assert_eq!(index.recency(), vec![a, c]);
}

#[test]
fn scanned_entries_go_before_those_used_since_the_start_and_are_evicted_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let index = Index::new(5, store.clone(), Arc::new(Metrics::new()));
    let old: Vec<Digest> = (0..6u8).map(|n| put(&store, &[n])).collect();
    // Used since the start: indexed before the scan reaches it.
    index.insert(old[4].clone(), 1);
    let new = put(&store, b"new");
    index.insert(new.clone(), 1);
    index.insert_scanned(old.iter().map(|d| (Key::of(d), 1)));
    // 7 bytes over a bound of 5: the two oldest scanned go, not the two used since.
    assert_eq!(
        index.recency(),
        vec![
            old[2].clone(),
            old[3].clone(),
            old[5].clone(),
            old[4].clone(),
            new.clone()
        ]
    );
    assert!(!store.blob_path(&old[0]).exists() && !store.blob_path(&old[1]).exists());
    // A scanned entry used now moves to the recent end; the next scanned one still goes
    // before everything used since the start.
    index.touch(&old[5]);
    let later = put(&store, b"later");
    index.insert_scanned(std::iter::once((Key::of(&later), 1)));
    assert_eq!(
        index.recency(),
        vec![
            old[3].clone(),
            later.clone(),
            old[4].clone(),
            new.clone(),
            old[5].clone()
        ]
    );
    // What was evicted or forgotten while the scan runs does not come back from it.
    index.forget(&later);
    index.insert_scanned(std::iter::once((Key::of(&later), 1)));
    assert_eq!(
        index.recency(),
        vec![old[3].clone(), old[4].clone(), new, old[5].clone()]
    );
}

#[test]
fn sha512_digests_are_indexed_beside_sha256_ones() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let index = Index::new(2, store.clone(), Arc::new(Metrics::new()));
    let mut h = crate::reference::DigestHasher::new(Algorithm::Sha512);
    h.update(b"x");
    let big = h.finalize();
    let (mut f, tmp) = store.temp().unwrap();
    f.write_all(b"x").unwrap();
    store.commit(&f, &tmp, &big).unwrap();
    let small = put(&store, b"y");
    index.insert(big.clone(), 1);
    index.insert(small.clone(), 1);
    assert!(index.contains(&big) && index.contains(&small));
    assert_eq!(index.recency(), vec![big.clone(), small.clone()]);
    index.insert(put(&store, b"z"), 1);
    assert!(!index.contains(&big), "the oldest, a sha512, is evicted");
    assert!(!store.blob_path(&big).exists());
    index.forget(&small);
    assert_eq!(index.usage(), (1, 1));
}

/// `n` blobs of 8 bytes on disk (written directly: no fsync), last used one second
/// apart from a day ago: the scan's order is their order here.
fn blobs_on_disk(dir: &std::path::Path, n: u32) -> Vec<(Digest, Vec<u8>)> {
    let store = Store::open(dir).unwrap();
    let base = crate::clock::now() - std::time::Duration::from_secs(86_400);
    (0..n)
        .map(|i| {
            let data = format!("{i:08}").into_bytes();
            let d = Digest::sha256_of(&data);
            let path = store.blob_path(&d);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let f = std::fs::File::create(&path).unwrap();
            (&f).write_all(&data).unwrap();
            f.set_modified(base + std::time::Duration::from_secs(i as u64))
                .unwrap();
            (d, data)
        })
        .collect()
}

fn open(dir: &std::path::Path, max_size: u64) -> (Arc<crate::cache::Cache>, Scan) {
    let d = std::time::Duration::from_secs(5);
    let limits = crate::cache::FillLimits {
        stall_timeout: d,
        fill_deadline: d,
        max_fills: crate::config::DEFAULT_MAX_FILLS,
    };
    crate::cache::Cache::open_unindexed(dir, max_size, limits, Arc::new(Metrics::new()), None)
        .unwrap()
}

/// Serves `d` the way a GET does offline (from the local tier) and returns its bytes.
async fn get(cache: &Arc<crate::cache::Cache>, d: &Digest) -> Vec<u8> {
    use futures_util::StreamExt;
    let Ok(crate::cache::Found::Source(mut src)) = cache.blob(d, None).await else {
        panic!("{d} not served from the disk");
    };
    let size = src.size().await.unwrap();
    let mut out = Vec::new();
    let mut body = src.reader(0, size).into_stream();
    while let Some(chunk) = body.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    out
}

#[tokio::test]
async fn a_blob_at_the_end_of_the_scan_is_served_before_the_scan_is_done() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = blobs_on_disk(dir.path(), 50_000);
    let (cache, scan) = open(dir.path(), 1 << 40);
    let (tx, rx) = std::sync::mpsc::sync_channel(0);
    let scan = scan.batch(1000).gate(tx).spawn();
    // The scan waits after its first batch: 1,000 of 50,000 found, none indexed.
    assert_eq!(rx.recv().unwrap(), 1000);
    assert!(!cache.index.scan_done());
    assert_eq!(cache.index.usage(), (0, 0));
    let metrics = cache.metrics.encode();
    assert!(
        metrics.contains("ocicache_index_scan_done 0\n"),
        "{metrics}"
    );
    assert!(metrics.contains("ocicache_index_scanned_blobs 1000\n"));

    // The last in the scan's order, then the first: served from the disk, indexed.
    let (last, first) = (&blobs[49_999], &blobs[0]);
    assert_eq!(get(&cache, &last.0).await, last.1);
    assert_eq!(get(&cache, &first.0).await, first.1);
    assert!(!cache.index.scan_done());
    assert_eq!(cache.index.usage(), (16, 2));

    // The rest of the scan, batch by batch: it does not reorder them as old.
    let steps = rx.iter().count();
    scan.join().unwrap();
    assert!(steps >= 49 + 50, "{steps} batches walked and inserted");
    assert!(cache.index.scan_done());
    assert_eq!(cache.index.scanned(), 50_000);
    assert_eq!(cache.index.usage(), (8 * 50_000, 50_000));
    let mut expected: Vec<Digest> = blobs[1..49_999].iter().map(|b| b.0.clone()).collect();
    expected.extend([last.0.clone(), first.0.clone()]);
    assert!(cache.index.recency() == expected, "scan order lost");
    assert!(cache
        .metrics
        .encode()
        .contains("ocicache_index_scan_done 1\n"));
}

#[tokio::test]
async fn a_start_over_the_bound_evicts_the_oldest_and_nothing_used_since() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = blobs_on_disk(dir.path(), 2000);
    // Room for 500 of the 2,000 blobs.
    let (cache, scan) = open(dir.path(), 8 * 500);
    let (tx, rx) = std::sync::mpsc::sync_channel(0);
    let scan = scan.batch(100).gate(tx).spawn();
    rx.recv().unwrap();
    // Used since the start: the three oldest on disk, and one new blob.
    for b in &blobs[..3] {
        assert_eq!(get(&cache, &b.0).await, b.1);
    }
    let new = put(&cache.store, b"new blob");
    cache.index.insert(new.clone(), 8);
    drop(rx);
    scan.join().unwrap();

    let mut expected: Vec<Digest> = blobs[1504..].iter().map(|b| b.0.clone()).collect();
    expected.extend(blobs[..3].iter().map(|b| b.0.clone()));
    expected.push(new.clone());
    assert!(
        cache.index.recency() == expected,
        "the oldest scanned go first"
    );
    assert_eq!(cache.index.usage(), (8 * 500, 500));
    for b in &blobs[3..1504] {
        assert!(!cache.store.blob_path(&b.0).exists(), "evicted and deleted");
    }
    for d in &expected {
        assert!(cache.store.blob_path(d).exists());
    }
}

#[tokio::test]
async fn recency_is_kept_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = blobs_on_disk(dir.path(), 5000);
    let (cache, scan) = open(dir.path(), 1 << 40);
    scan.run();
    // Hits refresh the files' mtimes: these become the most recent, in this order.
    for i in [4000, 17, 2500] {
        get(&cache, &blobs[i].0).await;
    }
    let before = cache.index.recency();
    assert_eq!(before.len(), 5000);
    assert_eq!(before[4997..], [4000, 17, 2500].map(|i| blobs[i].0.clone()));
    drop(cache);

    let (cache, scan) = open(dir.path(), 1 << 40);
    scan.run();
    assert!(
        cache.index.recency() == before,
        "recency lost across a restart"
    );
}
