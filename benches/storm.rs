//! A storm of cold misses: does a hit still answer at once?
//!
//! Starts a release `ocicache serve` as a subprocess, its upstream a fake registry served by
//! this process on 127.0.0.1: `BLOBS` distinct blobs of 1 MiB, each sent at 64 KiB/s (16 KiB
//! every 250 ms: about 16 s a fill), plus one blob sent at full speed, fetched once first so
//! that it is cached. Then it requests all `BLOBS` cold at once, one connection each, and
//! meanwhile requests the cached blob and `/healthz`, 100 times each, one every 100 ms.
//!
//! It prints: how many fills gave the client the right bytes (sha256 of what it got), the
//! storm's wall time, p50/p99/max latency of the hit and of `/healthz` (request to last body
//! byte), the peak thread count (`Threads` of `/proc/<pid>/status`, sampled every 50 ms), the
//! peak RSS (`VmHWM`), the peak of `ocicache_fills_queued` (sampled every 500 ms; absent
//! from builds before it existed), ocicache's CPU time, and the machine's load average (the
//! latencies mean little when other work holds the cores). Targets: hit and `/healthz` p99 under 10 ms, threads
//! under 64, peak RSS under 256 MiB.
//!
//! `cargo bench --bench storm`. `OCICACHE_BIN=path` runs another build (e.g. an older
//! commit's); `STORM_BLOBS=n` changes the number of cold blobs; `STORM_MAX_FILLS=n` sets
//! `OCICACHE_CACHE__MAX_FILLS` (left unset, the binary's default applies). Without
//! `--bench` (as `cargo test --benches` runs it) it does nothing.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest as _, Sha256};

const BLOB: usize = 1 << 20;
const PIECE: usize = 16 << 10;
const PIECE_EVERY: Duration = Duration::from_millis(250);
const PROBES: usize = 100;
const PROBE_EVERY: Duration = Duration::from_millis(100);

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// Piece `k` of blob `i`: deterministic, incompressible, distinct for every blob.
fn piece(i: u64, k: u64) -> Bytes {
    let mut state = (i << 20 | k) ^ 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(PIECE);
    while out.len() < PIECE {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    Bytes::from(out)
}

fn digest_of(i: u64) -> String {
    let mut h = Sha256::new();
    for k in 0..(BLOB / PIECE) as u64 {
        h.update(piece(i, k));
    }
    hex::encode(h.finalize())
}

/// The fake upstream: `/v2/` answers 200; a blob GET by digest streams the blob, throttled
/// unless it is blob `fast`.
async fn upstream(blobs: Arc<HashMap<String, u64>>, fast: u64) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let blobs = blobs.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let blobs = blobs.clone();
                    async move { Ok::<_, Infallible>(answer(&blobs, fast, req)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

fn answer(
    blobs: &HashMap<String, u64>,
    fast: u64,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<Body> {
    let path = req.uri().path();
    let found = path
        .rsplit_once("/blobs/sha256:")
        .and_then(|(_, hex)| Some((hex.to_string(), *blobs.get(hex)?)));
    let Some((hex, i)) = found else {
        let status = if path == "/v2/" { 200 } else { 404 };
        return hyper::Response::builder()
            .status(status)
            .body(Full::new(Bytes::from_static(b"{}")).boxed())
            .unwrap();
    };
    let pieces = (BLOB / PIECE) as u64;
    let body = futures_util::stream::unfold(0u64, move |k| async move {
        if k == pieces {
            return None;
        }
        if k > 0 && i != fast {
            tokio::time::sleep(PIECE_EVERY).await;
        }
        Some((Ok::<_, Infallible>(Frame::data(piece(i, k))), k + 1))
    });
    hyper::Response::builder()
        .header("content-length", BLOB)
        .header("content-type", "application/octet-stream")
        .header("docker-content-digest", format!("sha256:{hex}"))
        .body(StreamBody::new(body).boxed())
        .unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `(Threads, VmRSS in KiB, VmHWM in KiB)` of `pid`.
fn proc_status(pid: u32) -> Option<(u64, u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
    };
    Some((field("Threads:")?, field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU time of `pid` so far (user + system, all its threads), from `/proc/<pid>/stat`.
fn cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_comm = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // After the command: utime is field 14 and stime 15 of the line (USER_HZ is 100).
    Duration::from_millis((tick(11) + tick(12)) * 10)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn percentiles(mut v: Vec<Duration>) -> String {
    if v.is_empty() {
        return "no samples".into();
    }
    v.sort();
    let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} requests)",
        ms(at(0.50)),
        ms(at(0.99)),
        ms(*v.last().unwrap()),
        v.len()
    )
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// GETs `url`: status, body, and the time to the last byte.
async fn get(client: &HttpClient, url: &str) -> Result<(u16, Bytes, Duration), String> {
    let start = Instant::now();
    let resp = client
        .get(url.parse().unwrap())
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body, start.elapsed()))
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("storm: skipped (run it with `cargo bench --bench storm`)");
        return;
    }
    let n: u64 = std::env::var("STORM_BLOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let bin =
        std::env::var("OCICACHE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_ocicache").into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let start = Instant::now();
    let digests: Vec<String> = (0..=n).map(digest_of).collect();
    let blobs: Arc<HashMap<String, u64>> = Arc::new(
        digests
            .iter()
            .enumerate()
            .map(|(i, d)| (d.clone(), i as u64))
            .collect(),
    );
    println!(
        "storm: {n} blobs of 1 MiB at 64 KiB/s (+1 cached); digests in {:.1} s; binary {bin}",
        start.elapsed().as_secs_f64()
    );
    let up = rt.block_on(upstream(blobs.clone(), n));

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\n[cache]\ndir = \"{}\"\n[log]\nlevel = \"warn\"\n\
             [[upstreams]]\nname = \"docker.io\"\nurl = \"http://{up}\"\ndefault = true\n",
            dir.path().join("cache").display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("ocicache.log")).unwrap();
    let mut cmd = std::process::Command::new(&bin);
    cmd.args(["serve", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .stderr(log);
    if let Ok(m) = std::env::var("STORM_MAX_FILLS") {
        cmd.env("OCICACHE_CACHE__MAX_FILLS", m);
    }
    let mut child = cmd.spawn().expect("starting ocicache");
    let pid = child.id();
    let base = format!("http://127.0.0.1:{port}");
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(120))
        .build_http();

    rt.block_on(async {
        let ready = Instant::now();
        while get(&client, &format!("{base}/healthz")).await.is_err() {
            assert!(
                ready.elapsed() < Duration::from_secs(10),
                "ocicache did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let hit_url = format!(
            "{base}/v2/library/storm/blobs/sha256:{}",
            digests[n as usize]
        );
        let (status, body, _) = get(&client, &hit_url).await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(hex::encode(Sha256::digest(&body)), digests[n as usize]);

        // Sampling: threads and RSS every 50 ms, the queue gauge every 500 ms.
        let done = Arc::new(AtomicBool::new(false));
        let peak_threads = Arc::new(AtomicU64::new(0));
        let peak_queued = Arc::new(AtomicU64::new(0));
        let sampler = {
            let (done, peak) = (done.clone(), peak_threads.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    if let Some((threads, _, _)) = proc_status(pid) {
                        peak.fetch_max(threads, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        let queue = {
            let (done, peak, client, url) = (
                done.clone(),
                peak_queued.clone(),
                client.clone(),
                format!("{base}/metrics"),
            );
            tokio::spawn(async move {
                let mut seen = false;
                while !done.load(Ordering::Relaxed) {
                    if let Ok((_, body, _)) = get(&client, &url).await {
                        let text = String::from_utf8_lossy(&body);
                        if let Some(v) = text.lines().find_map(|l| {
                            l.strip_prefix("ocicache_fills_queued ")?
                                .parse::<f64>()
                                .ok()
                        }) {
                            seen = true;
                            peak.fetch_max(v as u64, Ordering::Relaxed);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                seen
            })
        };

        let storm_start = Instant::now();
        let (cpu_start, load_start) = (cpu(pid), load_average());
        let fills: Vec<_> = (0..n as usize)
            .map(|i| {
                let (client, url, want) = (
                    client.clone(),
                    format!("{base}/v2/library/storm/blobs/sha256:{}", digests[i]),
                    digests[i].clone(),
                );
                tokio::spawn(async move {
                    match get(&client, &url).await {
                        Ok((200, body, took)) => {
                            (hex::encode(Sha256::digest(&body)) == want, Some(took))
                        }
                        _ => (false, None),
                    }
                })
            })
            .collect();

        // The probes, while the storm runs.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (mut hits, mut health, mut probe_errors) = (Vec::new(), Vec::new(), 0);
        for _ in 0..PROBES {
            match get(&client, &hit_url).await {
                Ok((200, body, took)) if body.len() == BLOB => hits.push(took),
                _ => probe_errors += 1,
            }
            match get(&client, &format!("{base}/healthz")).await {
                Ok((200, _, took)) => health.push(took),
                _ => probe_errors += 1,
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
        let probes_took = storm_start.elapsed();
        let cpu_probes = cpu(pid) - cpu_start;

        let mut correct = 0;
        let mut took = Vec::new();
        for f in fills {
            let (ok, t) = f.await.unwrap();
            correct += ok as usize;
            took.extend(t);
        }
        let storm = storm_start.elapsed();
        let cpu_storm = cpu(pid) - cpu_start;
        done.store(true, Ordering::Relaxed);
        sampler.join().unwrap();
        let queued_seen = queue.await.unwrap();
        let (threads_now, _, hwm) = proc_status(pid).unwrap_or_default();

        println!(
            "fills: {correct}/{n} correct, storm over in {:.1} s",
            storm.as_secs_f64()
        );
        println!(
            "  cold clients, request to last byte: {}",
            percentiles(took)
        );
        println!(
            "hit (cached 1 MiB blob), during the first {:.1} s: {}",
            probes_took.as_secs_f64(),
            percentiles(hits)
        );
        println!("/healthz: {}", percentiles(health));
        if probe_errors > 0 {
            println!("probe errors: {probe_errors}");
        }
        println!(
            "peak threads: {} (at the end: {threads_now})",
            peak_threads.load(Ordering::Relaxed)
        );
        println!("peak RSS (VmHWM): {:.1} MiB", hwm as f64 / 1024.0);
        println!(
            "ocicache CPU: {:.1} s over the storm ({:.0}% of one core), {:.1} s while probing \
             ({:.0}%); load average at the start {load_start}, at the end {}",
            cpu_storm.as_secs_f64(),
            100.0 * cpu_storm.as_secs_f64() / storm.as_secs_f64(),
            cpu_probes.as_secs_f64(),
            100.0 * cpu_probes.as_secs_f64() / probes_took.as_secs_f64(),
            load_average()
        );
        if queued_seen {
            println!(
                "peak ocicache_fills_queued: {}",
                peak_queued.load(Ordering::Relaxed)
            );
        }
    });
    let _ = child.kill();
    let _ = child.wait();
}
