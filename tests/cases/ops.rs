//! Operations: metrics, health, TLS, client auth, limits, the CLI.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::clients::assert_success;
use crate::support::proxy::{config, toml_for, ChildProxy, Proxy};
use crate::support::registry::{header, random_bytes, Registry};

const BIN: &str = env!("CARGO_BIN_EXE_ocicache");

#[test]
fn health_and_metrics_change_as_requests_are_served() {
    let Some(reg) = Registry::start() else { return };
    let img = reg.push_image("library/m", "1", &[random_bytes(5000, 3)]);
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(config(dir.path(), &[("docker.io", &reg.url(), true)]));
    assert_eq!(proxy.get("/healthz", &[]).0, 200);
    assert_eq!(proxy.get("/readyz", &[]).0, 200);

    let before_hits = proxy.metric("ocicache_cache_hits_total{kind=\"blob\"}");
    let before_fills = proxy.metric("ocicache_fills_completed_total");
    let layer = format!("/v2/m/blobs/{}", img.layer_digests[0]);
    let (s, h, _) = proxy.get(&layer, &[]);
    assert_eq!((s, header(&h, "x-cache")), (200, Some("MISS")));
    let (s, h, _) = proxy.get(&layer, &[]);
    assert_eq!((s, header(&h, "x-cache")), (200, Some("HIT")));
    assert_eq!(
        proxy.metric("ocicache_fills_completed_total") - before_fills,
        1.0
    );
    assert_eq!(
        proxy.metric("ocicache_cache_hits_total{kind=\"blob\"}") - before_hits,
        1.0
    );
    assert!(proxy.metric("ocicache_served_bytes_total{source=\"local\"}") >= 5000.0);
    assert!(proxy.metric("ocicache_cache_size_bytes") >= 5000.0);
    assert!(
        proxy.metric("ocicache_upstream_requests_total{upstream=\"docker.io\",status=\"200\"}")
            >= 1.0
    );
    assert!(
        proxy.metric("ocicache_http_requests_total{route=\"blob\",method=\"GET\",status=\"200\"}")
            >= 2.0
    );
}

fn self_signed(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert_path = dir.join("tls.crt");
    let key_path = dir.join("tls.key");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    (cert_path, key_path, cert.cert.der().to_vec())
}

/// A GET over TLS trusting `ca_der`, with ALPN `alpn`; returns the status line and the
/// negotiated protocol.
fn tls_get(
    addr: std::net::SocketAddr,
    ca_der: &[u8],
    alpn: &[u8],
    path: &str,
) -> (String, Option<Vec<u8>>) {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(ca_der.to_vec()))
        .unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let mut sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    if alpn == b"h2" {
        // The HTTP/2 preface and an empty SETTINGS frame; the server answers with SETTINGS.
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            .unwrap();
        let mut buf = [0u8; 9];
        tls.read_exact(&mut buf).unwrap();
        assert_eq!(buf[3], 4, "a SETTINGS frame");
        let proto = tls.conn.alpn_protocol().map(|p| p.to_vec());
        return ("h2".into(), proto);
    }
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out);
    let proto = conn.alpn_protocol().map(|p| p.to_vec());
    let text = String::from_utf8_lossy(&out).to_string();
    (text.lines().next().unwrap_or("").to_string(), proto)
}

#[test]
fn tls_serves_http1_and_http2_with_a_generated_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, der) = self_signed(dir.path());
    let mut c = config(
        &dir.path().join("cache"),
        &[("docker.io", "http://127.0.0.1:9", true)],
    );
    c.tls = Some(ocicache::config::TlsConfig { cert, key });
    let proxy = Proxy::start(c);
    let (status, proto) = tls_get(proxy.addr, &der, b"http/1.1", "/v2/");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(proto.as_deref(), Some(&b"http/1.1"[..]));
    let (_, proto) = tls_get(proxy.addr, &der, b"h2", "/v2/");
    assert_eq!(proto.as_deref(), Some(&b"h2"[..]));
    // Plain HTTP on the TLS port gets nothing useful: the handshake fails and the connection closes.
    let r = crate::support::registry::try_http_request_timeout(
        "GET",
        &format!("http://{}/v2/", proxy.addr),
        &[],
        b"",
        Duration::from_secs(5),
    );
    assert!(r.is_err() || r.unwrap().0 != 200);
}

#[test]
fn client_auth_is_required_accepted_and_refused() {
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(
        &htpasswd,
        format!("alice:{}\n", bcrypt::hash("wonderland", 4).unwrap()),
    )
    .unwrap();
    let mut c = config(
        &dir.path().join("cache"),
        &[("docker.io", "http://127.0.0.1:9", true)],
    );
    c.auth = Some(ocicache::config::AuthConfig {
        htpasswd,
        protect_metrics: true,
    });
    let proxy = Proxy::start(c);
    let (s, h, body) = proxy.get("/v2/", &[]);
    assert_eq!(s, 401);
    assert_eq!(
        header(&h, "www-authenticate"),
        Some("Basic realm=\"ocicache\"")
    );
    assert!(String::from_utf8_lossy(&body).contains("UNAUTHORIZED"));
    use base64::Engine as _;
    let good = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("alice:wonderland")
    );
    let bad = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("alice:nope")
    );
    assert_eq!(proxy.get("/v2/", &[("Authorization", &good)]).0, 200);
    assert_eq!(proxy.get("/v2/", &[("Authorization", &bad)]).0, 401);
    assert_eq!(
        proxy
            .get("/v2/library/x/manifests/1", &[("Authorization", &bad)])
            .0,
        401
    );
    assert_eq!(proxy.get("/healthz", &[]).0, 200, "health stays open");
    assert_eq!(proxy.get("/readyz", &[]).0, 200);
    assert_eq!(proxy.get("/metrics", &[]).0, 401, "protect_metrics");
    assert_eq!(proxy.get("/metrics", &[("Authorization", &good)]).0, 200);
}

#[test]
fn a_slow_header_client_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), &[("docker.io", "http://127.0.0.1:9", true)]);
    c.limits.header_read_timeout.0 = Duration::from_secs(1);
    let proxy = Proxy::start(c);
    let mut sock = TcpStream::connect(proxy.addr).unwrap();
    sock.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let _ = sock.read_to_end(&mut buf);
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(8),
        "closed by the server, not by our timeout: {waited:?}"
    );
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
    // The proxy still serves others.
    assert_eq!(proxy.get("/v2/", &[]).0, 200);
}

#[test]
fn oversized_headers_are_refused_and_the_proxy_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), &[("docker.io", "http://127.0.0.1:9", true)]);
    c.limits.max_header_size.0 = 16 << 10;
    let proxy = Proxy::start(c);
    let big = "a".repeat(64 << 10);
    let r = crate::support::registry::try_http_request(
        "GET",
        &format!("{}/v2/", proxy.url()),
        &[("X-Big", &big)],
        b"",
    );
    assert!(
        r.is_err() || r.as_ref().unwrap().0 == 431 || r.as_ref().unwrap().0 == 400,
        "{:?}",
        r.map(|r| r.0)
    );
    assert_eq!(proxy.get("/v2/", &[]).0, 200);
}

#[test]
fn config_check_names_the_bad_key_and_value() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.toml");
    std::fs::write(&f, "[cache]\nmax_size = \"twenty\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["config", "check", "--config"])
        .arg(&f)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_size") && err.contains("twenty"), "{err}");
    let out = Command::new(BIN)
        .args([
            "config",
            "check",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/ocicache.toml"),
        ])
        .output()
        .unwrap();
    assert_success("config check of the documented example", &out);
    let out = Command::new(BIN)
        .args([
            "config",
            "check",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/ocicache.toml"),
        ])
        .output()
        .unwrap();
    assert_success("config check of deploy/ocicache.toml", &out);
}

#[test]
fn prefetch_fills_a_cache_folder_that_an_offline_serve_then_serves_completely() {
    let Some(reg) = Registry::start() else { return };
    let amd = reg.push_image_for_arch("library/multi", "amd", &[random_bytes(40_000, 50)], "amd64");
    let arm = reg.push_image_for_arch("library/multi", "arm", &[random_bytes(30_000, 60)], "arm64");
    let (index_digest, _) =
        reg.push_index("library/multi", "1", &[(&amd, "amd64"), (&arm, "arm64")]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("ocicache.toml");
    let cache = dir.path().join("cache");
    std::fs::write(
        &cfg,
        format!(
            "[cache]\ndir = \"{}\"\n[[upstreams]]\nname = \"docker.io\"\nurl = \"{}\"\ndefault = true\n",
            cache.display(),
            reg.url()
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["prefetch", "--config"])
        .arg(&cfg)
        .arg("multi:1")
        .output()
        .unwrap();
    assert_success("prefetch", &out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("4 blobs"), "{stdout}");

    // Only one platform, into another cache: its two blobs.
    let only_arm = dir.path().join("arm.toml");
    std::fs::write(
        &only_arm,
        std::fs::read_to_string(&cfg).unwrap().replace(
            cache.to_str().unwrap(),
            dir.path().join("arm").to_str().unwrap(),
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["prefetch", "--platform", "linux/arm64", "--config"])
        .arg(&only_arm)
        .arg("multi:1")
        .output()
        .unwrap();
    assert_success("prefetch --platform", &out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("2 manifests, 2 blobs"), "{stdout}");
    let hex = arm.layer_digests[0].strip_prefix("sha256:").unwrap();
    assert!(dir
        .path()
        .join("arm/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .exists());

    // Again: everything is already cached.
    let out = Command::new(BIN)
        .args(["prefetch", "--config"])
        .arg(&cfg)
        .arg("multi:1")
        .output()
        .unwrap();
    assert_success("prefetch", &out);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("0B fetched"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // The upstream goes away; an offline proxy serves every part of the image.
    drop(reg);
    let mut c = config(&cache, &[("docker.io", "http://127.0.0.1:9", true)]);
    c.offline = true;
    let proxy = Proxy::start(c);
    let (s, h, _) = proxy.get("/v2/multi/manifests/1", &[]);
    assert_eq!(s, 200);
    assert_eq!(
        header(&h, "docker-content-digest"),
        Some(index_digest.as_str())
    );
    for img in [&amd, &arm] {
        let (s, _, body) = proxy.get(&format!("/v2/multi/manifests/{}", img.manifest_digest), &[]);
        assert_eq!((s, body.as_slice()), (200, img.manifest.as_slice()));
        for (d, blob) in img.layer_digests.iter().zip(&img.layer_blobs) {
            let (s, _, body) = proxy.get(&format!("/v2/multi/blobs/{d}"), &[]);
            assert_eq!((s, &body), (200, blob));
        }
        assert_eq!(
            proxy
                .get(&format!("/v2/multi/blobs/{}", img.config_digest), &[])
                .0,
            200
        );
    }
    let (s, _, body) = proxy.get("/v2/multi/manifests/not-cached", &[]);
    assert_eq!(s, 404);
    assert!(String::from_utf8_lossy(&body).contains("MANIFEST_UNKNOWN"));
}

#[test]
fn cache_verify_finds_a_blob_corrupted_on_disk() {
    let Some(reg) = Registry::start() else { return };
    let img = reg.push_image("library/v", "1", &[random_bytes(10_000, 70)]);
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(config(dir.path(), &[("docker.io", &reg.url(), true)]));
    let layer = &img.layer_digests[0];
    assert_eq!(proxy.get(&format!("/v2/v/blobs/{layer}"), &[]).0, 200);
    proxy.stop();
    let hex = layer.strip_prefix("sha256:").unwrap();
    let path = dir.path().join("blobs/sha256").join(&hex[..2]).join(hex);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let out = Command::new(BIN)
        .args(["cache", "verify"])
        .env("OCICACHE_CACHE__DIR", dir.path())
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "verify reports corruption with a failing status"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("removed {layer}")));
    assert!(!path.exists());
    let out = Command::new(BIN)
        .args(["cache", "stats"])
        .env("OCICACHE_CACHE__DIR", dir.path())
        .output()
        .unwrap();
    assert_success("cache stats", &out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("entries:"));
}

#[test]
fn sigterm_during_a_fill_leaves_no_temp_file() {
    use crate::support::fake::{Fake, Fault};
    let fake = Fake::start();
    let data = random_bytes(4 << 20, 90);
    let d = fake.add_blob(&data);
    fake.fault(
        "/blobs/",
        Fault::Slow {
            chunk: 16 << 10,
            delay: Duration::from_millis(50),
        },
        None,
    );
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let toml = format!(
        "[limits]\nshutdown_timeout = \"1s\"\n{}",
        toml_for(&cache, &fake.url(), "")
    );
    let child = ChildProxy::start(dir.path(), &toml, std::process::Stdio::null());
    let base = child.base.clone();
    let start = Instant::now();
    let url = format!("{base}/v2/x/blobs/{d}");
    let client = std::thread::spawn(move || {
        crate::support::registry::try_http_request("GET", &url, &[], b"")
    });
    while std::fs::read_dir(cache.join("tmp"))
        .map(|d| d.count())
        .unwrap_or(0)
        == 0
    {
        assert!(start.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.terminate();
    assert!(
        out.status.success(),
        "a clean exit on SIGTERM: {:?}",
        out.status
    );
    assert_eq!(
        std::fs::read_dir(cache.join("tmp")).unwrap().count(),
        0,
        "no temp file left"
    );
    let hex = d.strip_prefix("sha256:").unwrap();
    assert!(
        !cache
            .join("blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .exists(),
        "the unfinished blob is not committed"
    );
    // The client saw an aborted response, not a clean wrong one.
    match client.join().unwrap() {
        Err(_) => {}
        Ok((s, _, body)) => assert!(s != 200 || body.len() < data.len()),
    }
}

/// `ocicache serve` holds its cache folder: the `cache` commands beside it are refused
/// without touching anything (they used to clear `tmp/`, failing the fills under way), and so
/// is a second server on the folder.
#[test]
fn cache_commands_beside_a_running_server_are_refused_and_its_fill_completes() {
    use crate::support::fake::{Fake, Fault};
    let fake = Fake::start();
    // 4 MiB in 32 KiB pieces 50 ms apart: a fill that lasts about 6 s, long enough for the
    // commands below to run during it.
    let data = random_bytes(4 << 20, 91);
    let d = fake.add_blob(&data);
    fake.fault(
        "/blobs/",
        Fault::Slow {
            chunk: 32 << 10,
            delay: Duration::from_millis(50),
        },
        None,
    );
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let child = ChildProxy::start(
        dir.path(),
        &toml_for(&cache, &fake.url(), ""),
        std::process::Stdio::null(),
    );
    let pid = child.child.id();
    let _reap = KillOnPanic(pid);
    let url = format!("{}/v2/x/blobs/{d}", child.base);
    let client = std::thread::spawn(move || {
        crate::support::registry::try_http_request("GET", &url, &[], b"")
    });
    let start = Instant::now();
    let fill = loop {
        let writing = std::fs::read_dir(cache.join("tmp"))
            .unwrap()
            .flatten()
            .find(|f| f.metadata().unwrap().len() > 0);
        if let Some(f) = writing {
            break f.path();
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no fill started");
        std::thread::sleep(Duration::from_millis(20));
    };

    let cfg = dir.path().join("c.toml");
    for command in [&["stats"][..], &["verify"], &["gc", "--size", "0"]] {
        let out = Command::new(BIN)
            .arg("cache")
            .args(command)
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(3),
            "cache {command:?} refused: {err}"
        );
        assert!(
            err.contains(&format!(
                "a running server (pid {pid}) holds {}",
                cache.display()
            )) && err.contains("nothing was done")
                && err.contains("--server URL"),
            "cache {command:?}: {err}"
        );
        assert!(out.stdout.is_empty(), "cache {command:?} printed no result");
    }
    assert!(fill.exists(), "the fill's temp file is untouched");

    // A second server on the folder (another port) stops at start, naming the holder.
    let second = dir.path().join("second.toml");
    std::fs::write(
        &second,
        format!(
            "listen = \"127.0.0.1:{}\"\n{}",
            crate::support::registry::free_port(),
            toml_for(&cache, &fake.url(), "")
        ),
    )
    .unwrap();
    let mut other = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&second)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while other.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(10) {
            let _ = other.kill();
            panic!("a second server started on a held folder");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = other.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!(
            "{} is held by a running ocicache server (pid {pid})",
            cache.display()
        )),
        "{err}"
    );
    assert!(
        fill.exists(),
        "the fill is still under way: the refusals came during it"
    );

    // The fill completes and the blob is served right, then from the cache.
    let (s, _, body) = client.join().unwrap().expect("the client's GET");
    assert_eq!(s, 200);
    assert!(body == data, "the filled blob is served whole and right");
    fake.clear_faults();
    let (s, h, body) = crate::support::registry::try_http_request(
        "GET",
        &format!("{}/v2/x/blobs/{d}", child.base),
        &[],
        b"",
    )
    .unwrap();
    assert_eq!((s, header(&h, "x-cache")), (200, Some("HIT")));
    assert!(body == data);

    // Once the server has stopped, the commands work on the folder.
    assert!(child.terminate().status.success());
    let out = Command::new(BIN)
        .args(["cache", "stats", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_success("cache stats after the server stopped", &out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("entries:  1\n"), "{stdout}");
}

/// Kills a child server if the test fails before stopping it, so that no server outlives it.
struct KillOnPanic(u32);

impl Drop for KillOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = Command::new("kill")
                .args(["-KILL", &self.0.to_string()])
                .status();
        }
    }
}
