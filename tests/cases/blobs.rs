//! The blob data path against the fake upstream: one fill per digest, verified commits,
//! failures that abort every reader and cache nothing, ranges, the LRU bound, restarts.

use std::path::Path;
use std::time::Duration;

use sha2::{Digest as _, Sha256};

use crate::support::fake::{Fake, Fault};
use crate::support::proxy::{config, toml_for, ChildProxy, Proxy};
use crate::support::registry::{header, random_bytes, try_http_request, try_http_request_timeout};
use crate::support::wait_until;

fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn blob_file(cache: &Path, digest: &str) -> std::path::PathBuf {
    let hex = digest.strip_prefix("sha256:").unwrap();
    cache.join("blobs/sha256").join(&hex[..2]).join(hex)
}

fn tmp_files(cache: &Path) -> usize {
    std::fs::read_dir(cache.join("tmp"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn proxy_for(fake: &Fake, dir: &Path) -> Proxy {
    Proxy::start(config(dir, &[("docker.io", &fake.url(), true)]))
}

#[test]
fn fifty_concurrent_gets_of_a_cold_blob_make_one_upstream_get() {
    let fake = Fake::start();
    let data = random_bytes(4 << 20, 1);
    let digest = fake.add_blob(&data);
    fake.fault(
        "/blobs/",
        Fault::Slow {
            chunk: 64 << 10,
            delay: Duration::from_millis(10),
        },
        None,
    );
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_for(&fake, dir.path());
    let url = format!("{}/v2/library/x/blobs/{digest}", proxy.url());
    let clients: Vec<_> = (0..50)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || try_http_request("GET", &url, &[], b"").unwrap())
        })
        .collect();
    for c in clients {
        let (status, headers, body) = c.join().unwrap();
        assert_eq!(status, 200);
        assert_eq!(
            header(&headers, "content-length"),
            Some((4u64 << 20).to_string().as_str())
        );
        assert_eq!(sha(&body), digest, "every client gets the right bytes");
    }
    assert_eq!(
        fake.count("GET", "/blobs/"),
        1,
        "the upstream sent the blob once"
    );
    assert!(blob_file(dir.path(), &digest).exists());
    assert_eq!(tmp_files(dir.path()), 0);
}

/// A fill that goes wrong: every client gets an error (never a clean wrong body), nothing is
/// cached, and the next request starts a new fill that succeeds.
fn failing_fill_aborts_every_reader(fault: Fault) {
    let fake = Fake::start();
    let data = random_bytes(1 << 20, 2);
    let digest = fake.add_blob(&data);
    // Every fill fails while the clients run: one that arrives after a fast failure starts
    // a new fill, which must fail the same way, never hand it the bytes of another.
    fake.fault("/blobs/", fault.clone(), None);
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_for(&fake, dir.path());
    let url = format!("{}/v2/library/x/blobs/{digest}", proxy.url());
    let clients: Vec<_> = (0..5)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                try_http_request_timeout("GET", &url, &[], b"", Duration::from_secs(30))
            })
        })
        .collect();
    for c in clients {
        match c.join().unwrap() {
            Err(_) => {}
            Ok((status, _, body)) => {
                assert!(
                    status != 200 || body != data,
                    "{fault:?}: a client got a complete body"
                );
                assert!(
                    status >= 400,
                    "{fault:?}: a clean 200 end of a bad body ({} bytes)",
                    body.len()
                );
            }
        }
    }
    wait_until(
        "the failed fill to clean up",
        Duration::from_secs(10),
        || tmp_files(dir.path()) == 0,
    );
    assert!(
        !blob_file(dir.path(), &digest).exists(),
        "{fault:?}: nothing cached"
    );
    let failed = fake.count("GET", "/blobs/");
    assert!(
        (1..=5).contains(&failed),
        "{fault:?}: {failed} upstream GETs"
    );
    fake.clear_faults();
    let (status, _, body) = proxy.get(&format!("/v2/library/x/blobs/{digest}"), &[]);
    assert_eq!(status, 200, "{fault:?}: the next request refetches");
    assert_eq!(sha(&body), digest);
    assert_eq!(fake.count("GET", "/blobs/"), failed + 1);
    assert!(proxy.metric("ocicache_fills_failed_total") >= failed as f64);
}

#[test]
fn wrong_bytes_abort_every_client_and_cache_nothing() {
    failing_fill_aborts_every_reader(Fault::CorruptBody);
}

#[test]
fn a_short_body_aborts_every_client_and_caches_nothing() {
    failing_fill_aborts_every_reader(Fault::ShortBody(300_000));
}

#[test]
fn a_stalled_body_aborts_every_client_and_caches_nothing() {
    failing_fill_aborts_every_reader(Fault::StallAfter(300_000));
}

#[test]
fn a_reset_connection_aborts_every_client_and_caches_nothing() {
    failing_fill_aborts_every_reader(Fault::ResetAfter(300_000));
}

#[test]
fn a_body_longer_than_announced_caches_nothing_wrong() {
    failing_fill_aborts_every_reader(Fault::LongBody);
}

#[test]
fn an_upstream_error_status_reaches_the_client_in_the_spec_format() {
    let fake = Fake::start();
    let digest = fake.add_blob(b"hello");
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_for(&fake, dir.path());
    fake.fault("/blobs/", Fault::Status(503), Some(1));
    let (s, _, body) = proxy.get(&format!("/v2/library/x/blobs/{digest}"), &[]);
    assert_eq!(s, 503);
    assert!(String::from_utf8_lossy(&body).contains("\"errors\""));
    let unknown = sha(b"not there");
    let (s, _, body) = proxy.get(&format!("/v2/library/x/blobs/{unknown}"), &[]);
    assert_eq!(s, 404);
    assert!(String::from_utf8_lossy(&body).contains("BLOB_UNKNOWN"));
    assert_eq!(
        proxy.get(&format!("/v2/library/x/blobs/{digest}"), &[]).2,
        b"hello"
    );
}

#[test]
fn a_fill_outlives_the_client_that_started_it() {
    let fake = Fake::start();
    let data = random_bytes(2 << 20, 3);
    let digest = fake.add_blob(&data);
    fake.fault(
        "/blobs/",
        Fault::Slow {
            chunk: 64 << 10,
            delay: Duration::from_millis(20),
        },
        None,
    );
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_for(&fake, dir.path());
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(proxy.addr).unwrap();
        write!(
            s,
            "GET /v2/library/x/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        .unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).unwrap();
    } // the client hangs up after its first bytes
    wait_until("the fill to commit", Duration::from_secs(30), || {
        blob_file(dir.path(), &digest).exists()
    });
    let (s, h, body) = proxy.get(&format!("/v2/library/x/blobs/{digest}"), &[]);
    assert_eq!((s, header(&h, "x-cache")), (200, Some("HIT")));
    assert_eq!(sha(&body), digest);
    assert_eq!(fake.count("GET", "/blobs/"), 1);
}

#[test]
fn ranges_on_cached_blobs() {
    let fake = Fake::start();
    let data = random_bytes(10_000, 4);
    let digest = fake.add_blob(&data);
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_for(&fake, dir.path());
    let path = format!("/v2/library/x/blobs/{digest}");
    assert_eq!(proxy.get(&path, &[]).0, 200);

    let (s, h, body) = proxy.get(&path, &[("Range", "bytes=10-19")]);
    assert_eq!((s, body.as_slice()), (206, &data[10..20]));
    assert_eq!(header(&h, "content-range"), Some("bytes 10-19/10000"));
    assert_eq!(header(&h, "accept-ranges"), Some("bytes"));
    let (s, _, body) = proxy.get(&path, &[("Range", "bytes=9990-")]);
    assert_eq!((s, body.as_slice()), (206, &data[9990..]));
    let (s, _, body) = proxy.get(&path, &[("Range", "bytes=-5")]);
    assert_eq!((s, body.as_slice()), (206, &data[9995..]));
    let (s, _, body) = proxy.get(&path, &[("Range", "bytes=9000-20000")]);
    assert_eq!(
        (s, body.as_slice()),
        (206, &data[9000..]),
        "clamped to the end"
    );

    let (s, h, body) = proxy.get(&path, &[("Range", "bytes=0-1, 100-101")]);
    assert_eq!(s, 206);
    let ct = header(&h, "content-type").unwrap().to_string();
    assert!(ct.starts_with("multipart/byteranges; boundary="), "{ct}");
    let boundary = ct.split("boundary=").nth(1).unwrap();
    let text = body.clone();
    let expect_part = |range: &str, bytes: &[u8]| {
        let mut part = format!("--{boundary}\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {range}/10000\r\n\r\n").into_bytes();
        part.extend_from_slice(bytes);
        part
    };
    let contains = |needle: &[u8]| text.windows(needle.len()).any(|w| w == needle);
    assert!(contains(&expect_part("0-1", &data[0..2])));
    assert!(contains(&expect_part("100-101", &data[100..102])));
    assert!(text.ends_with(format!("--{boundary}--\r\n").as_bytes()));
    assert_eq!(
        header(&h, "content-length"),
        Some(body.len().to_string().as_str())
    );

    for bad in [
        "bytes=10000-",
        "bytes=-0",
        "bytes=5-2",
        "bytes=abc",
        "bytes=99999999999999999999999-",
    ] {
        let (s, h, body) = proxy.get(&path, &[("Range", bad)]);
        assert_eq!(s, 416, "{bad}");
        assert_eq!(header(&h, "content-range"), Some("bytes */10000"), "{bad}");
        assert!(String::from_utf8_lossy(&body).contains("\"errors\""));
    }
    let many = format!(
        "bytes={}",
        (0..100)
            .map(|i| format!("{}-{}", i * 10, i * 10 + 1))
            .collect::<Vec<_>>()
            .join(",")
    );
    assert_eq!(proxy.get(&path, &[("Range", &many)]).0, 416);
    // Another unit is ignored: the whole blob.
    let (s, _, body) = proxy.get(&path, &[("Range", "items=0-1")]);
    assert_eq!((s, body.len()), (200, 10_000));
    assert_eq!(fake.count("GET", "/blobs/"), 1);
}

#[test]
fn a_range_on_a_cold_blob_fills_the_whole_blob() {
    let fake = Fake::start();
    let data = random_bytes(300_000, 5);
    let digest = fake.add_blob(&data);
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_for(&fake, dir.path());
    let path = format!("/v2/library/x/blobs/{digest}");
    let (s, _, body) = proxy.get(&path, &[("Range", "bytes=1000-1999")]);
    assert_eq!((s, body.as_slice()), (206, &data[1000..2000]));
    wait_until("the whole blob", Duration::from_secs(10), || {
        blob_file(dir.path(), &digest).exists()
    });
    assert_eq!(std::fs::read(blob_file(dir.path(), &digest)).unwrap(), data);
    assert_eq!(fake.count("GET", "/blobs/"), 1);
}

#[test]
fn a_range_on_a_filling_blob_is_answered_when_the_fill_reaches_it() {
    let fake = Fake::start();
    let data = random_bytes(1 << 20, 6);
    let digest = fake.add_blob(&data);
    fake.fault(
        "/blobs/",
        Fault::Slow {
            chunk: 32 << 10,
            delay: Duration::from_millis(10),
        },
        None,
    );
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_for(&fake, dir.path());
    let url = format!("{}/v2/library/x/blobs/{digest}", proxy.url());
    let full = {
        let url = url.clone();
        std::thread::spawn(move || try_http_request("GET", &url, &[], b"").unwrap())
    };
    wait_until("the fill to start", Duration::from_secs(10), || {
        fake.count("GET", "/blobs/") == 1
    });
    let ranged: Vec<_> = ["bytes=0-99", "bytes=-100", "bytes=500000-500099,1000-1099"]
        .into_iter()
        .map(|r| {
            let url = url.clone();
            std::thread::spawn(move || {
                (
                    r,
                    try_http_request("GET", &url, &[("Range", r)], b"").unwrap(),
                )
            })
        })
        .collect();
    for t in ranged {
        let (r, (s, _, body)) = t.join().unwrap();
        assert_eq!(s, 206, "{r}");
        match r {
            "bytes=0-99" => assert_eq!(body, &data[..100]),
            "bytes=-100" => assert_eq!(body, &data[data.len() - 100..]),
            _ => assert!(body.windows(100).any(|w| w == &data[500000..500100])),
        }
    }
    assert_eq!(sha(&full.join().unwrap().2), digest);
    assert_eq!(fake.count("GET", "/blobs/"), 1);
}

#[test]
fn the_lru_bound_evicts_the_least_recently_used_blob() {
    let fake = Fake::start();
    let blobs: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| {
            let d = random_bytes(400 << 10, 10 + i);
            (fake.add_blob(&d), d)
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), &[("docker.io", &fake.url(), true)]);
    c.cache.max_size.0 = 1 << 20; // room for two 400 KiB blobs
    let proxy = Proxy::start(c);
    let get = |d: &str| proxy.get(&format!("/v2/library/x/blobs/{d}"), &[]);
    assert_eq!(get(&blobs[0].0).0, 200);
    assert_eq!(get(&blobs[1].0).0, 200);
    assert_eq!(
        get(&blobs[0].0)
            .1
            .iter()
            .find(|(k, _)| k == "x-cache")
            .unwrap()
            .1,
        "HIT"
    ); // 0 is now the most recent
    assert_eq!(get(&blobs[2].0).0, 200); // evicts 1, the least recently used
    wait_until("eviction", Duration::from_secs(5), || {
        !blob_file(dir.path(), &blobs[1].0).exists()
    });
    assert!(blob_file(dir.path(), &blobs[0].0).exists());
    assert!(blob_file(dir.path(), &blobs[2].0).exists());
    assert!(proxy.metric("ocicache_evictions_total") >= 1.0);
    // An evicted blob is fetched again, correctly.
    assert_eq!(sha(&get(&blobs[1].0).2), blobs[1].0);
    assert_eq!(fake.count("GET", &blobs[1].0), 2);
}

#[test]
fn a_restart_keeps_what_was_cached() {
    let fake = Fake::start();
    let data = random_bytes(100_000, 7);
    let digest = fake.add_blob(&data);
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_for(&fake, dir.path());
    assert_eq!(
        proxy.get(&format!("/v2/library/x/blobs/{digest}"), &[]).0,
        200
    );
    proxy.stop();
    drop(fake); // the upstream is gone
    let proxy = Proxy::start(config(
        dir.path(),
        &[("docker.io", "http://127.0.0.1:9", true)],
    ));
    let (s, h, body) = proxy.get(&format!("/v2/library/x/blobs/{digest}"), &[]);
    assert_eq!((s, header(&h, "x-cache")), (200, Some("HIT")));
    assert_eq!(body, data);
    let (s, h, _) = proxy.head(&format!("/v2/library/x/blobs/{digest}"), &[]);
    assert_eq!(s, 200);
    assert_eq!(header(&h, "content-length"), Some("100000"));
}

#[test]
fn sigkill_mid_fill_then_restart_serves_only_verified_blobs() {
    let fake = Fake::start();
    let data = random_bytes(2 << 20, 8);
    let digest = fake.add_blob(&data);
    let done = fake.add_blob(b"a small blob, committed before the kill");
    fake.fault(
        &digest,
        Fault::Slow {
            chunk: 16 << 10,
            delay: Duration::from_millis(20),
        },
        None,
    );
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let ChildProxy {
        base, mut child, ..
    } = ChildProxy::start(
        dir.path(),
        &toml_for(&cache, &fake.url(), ""),
        std::process::Stdio::null(),
    );
    assert_eq!(
        try_http_request("GET", &format!("{base}/v2/x/blobs/{done}"), &[], b"")
            .unwrap()
            .0,
        200
    );
    let url = format!("{base}/v2/x/blobs/{digest}");
    let _client = std::thread::spawn(move || try_http_request("GET", &url, &[], b""));
    wait_until("the fill to write", Duration::from_secs(10), || {
        std::fs::read_dir(cache.join("tmp"))
            .unwrap()
            .flatten()
            .any(|f| f.metadata().unwrap().len() > 0)
    });
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(tmp_files(&cache), 1, "the partial fill is left by the kill");

    drop(fake);
    let proxy = Proxy::start(config(&cache, &[("docker.io", "http://127.0.0.1:9", true)]));
    assert_eq!(tmp_files(&cache), 0, "temp files are removed at start");
    assert!(!blob_file(&cache, &digest).exists());
    let (s, _, _) = proxy.get(&format!("/v2/x/blobs/{digest}"), &[]);
    assert_ne!(s, 200, "the partial blob is never served");
    let (s, _, body) = proxy.get(&format!("/v2/x/blobs/{done}"), &[]);
    assert_eq!(
        (s, body.as_slice()),
        (200, &b"a small blob, committed before the kill"[..])
    );
}

/// A tmpfs of `size` mounted on a fresh folder, unmounted on drop. `None` (said loudly)
/// where mounting is not allowed, unless under CI, where that is a failure.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            assert!(
                !crate::support::registry::under_ci(),
                "cannot mount a tmpfs under CI (run as root)"
            );
            eprintln!("SKIPPED: cannot mount a tmpfs here (not root?)");
            return None;
        }
        Some(SmallDisk { dir })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

#[test]
fn a_full_disk_fails_the_fill_cleanly_and_the_cache_keeps_serving() {
    let Some(disk) = SmallDisk::mount("2m") else {
        return;
    };
    let fake = Fake::start();
    let small = random_bytes(200_000, 20);
    let d_small = fake.add_blob(&small);
    let big = random_bytes(4 << 20, 21);
    let d_big = fake.add_blob(&big);
    let cache = disk.dir.path().join("cache");
    let proxy = Proxy::start(config(&cache, &[("docker.io", &fake.url(), true)]));
    assert_eq!(proxy.get(&format!("/v2/x/blobs/{d_small}"), &[]).2, small);

    match try_http_request(
        "GET",
        &format!("{}/v2/x/blobs/{d_big}", proxy.url()),
        &[],
        b"",
    ) {
        Err(_) => {}
        Ok((s, _, body)) => assert!(
            s >= 500 || body != big,
            "a full disk cannot give a complete blob"
        ),
    }
    wait_until(
        "the failed fill to clean up",
        Duration::from_secs(10),
        || tmp_files(&cache) == 0,
    );
    assert!(!blob_file(&cache, &d_big).exists());
    assert!(proxy.metric("ocicache_fills_failed_total{reason=\"disk\"}") >= 1.0);
    // What was cached is still served, and small new blobs still fit.
    let (s, h, body) = proxy.get(&format!("/v2/x/blobs/{d_small}"), &[]);
    assert_eq!((s, header(&h, "x-cache"), body), (200, Some("HIT"), small));
    let tiny = fake.add_blob(b"still room for this");
    assert_eq!(
        proxy.get(&format!("/v2/x/blobs/{tiny}"), &[]).2,
        b"still room for this"
    );
    drop(proxy);
}
