//! The fill path's disk half, hash + write, against hashing alone.
//!
//! A fill (`src/cache/fill.rs`) feeds every chunk of the upstream body to a `DigestHasher`
//! and `pwrite`s it to a temp file. The goal: hash + write costs at most 1.2x hashing alone,
//! so verifying and keeping the bytes is not much dearer than verifying them.
//!
//! Benchmarks (64 MiB in 256 KiB chunks, each iteration into a freshly truncated file, so
//! the page cache allocates its pages as it does for a new fill):
//! - `sha256`: plain `sha2::Sha256` over the chunks (the baseline);
//! - `digest_hasher`: `ocicache::reference::DigestHasher`, the hasher fills use;
//! - `pwrite/<dir>`: `write_all_at` alone;
//! - `hash+pwrite/<dir>`: both, one chunk after the other, on one thread (the fill's
//!   `write_chunks` loop until the disk half was split in two threads);
//! - `serial_channel/<dir>`: that loop fed through a bounded tokio `mpsc` channel from
//!   another thread, publishing progress on a `watch` channel after each chunk;
//! - `two_threads/<dir>`: the hash on one thread, the writes on another, fed the same
//!   `Bytes` (std channels);
//! - `sink/<dir>`: the fill's own disk half, `ocicache::cache::fill::Sink` (each chunk
//!   written on one thread of the fills' disk pool and hashed on another), fed from an
//!   async task.
//!
//! `<dir>` is `tmpfs` (/dev/shm) and `disk` (the temp dir, or `FILL_BENCH_DIR`).
//! After criterion, a summary measures the ratios again with alternated runs and prints
//! PASS/FAIL for the 1.2x goal, on wall time (what a fill takes when a core is free for each
//! thread) and on CPU time (what it costs the machine).
//!
//! `cargo bench --bench fill`; `cargo bench --bench fill -- --quick` for a shorter run.

use std::fs::{File, OpenOptions};
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput};
use ocicache::cache::fill::Sink;
use ocicache::cache::Progress;
use ocicache::reference::{Algorithm, DigestHasher};
use sha2::{Digest as _, Sha256};

const CHUNK: usize = 256 << 10;
const TOTAL: usize = 64 << 20;
/// Chunks queued between the network task and the writer in a fill (`WRITE_QUEUE`).
const QUEUE: usize = 64;

/// Deterministic, incompressible bytes.
fn data() -> Bytes {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(TOTAL);
    while out.len() < TOTAL {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(TOTAL);
    Bytes::from(out)
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    for c in data.chunks(CHUNK) {
        h.update(c);
    }
    h.finalize().into()
}

fn digest_hasher(data: &[u8]) -> ocicache::reference::Digest {
    let mut h = DigestHasher::new(Algorithm::Sha256);
    for c in data.chunks(CHUNK) {
        h.update(c);
    }
    h.finalize()
}

fn pwrite(data: &[u8], file: &File) {
    let mut offset = 0u64;
    for c in data.chunks(CHUNK) {
        file.write_all_at(c, offset).unwrap();
        offset += c.len() as u64;
    }
}

fn hash_pwrite(data: &[u8], file: &File) -> ocicache::reference::Digest {
    let mut h = DigestHasher::new(Algorithm::Sha256);
    let mut offset = 0u64;
    for c in data.chunks(CHUNK) {
        h.update(c);
        file.write_all_at(c, offset).unwrap();
        offset += c.len() as u64;
    }
    h.finalize()
}

/// The serial loop as a fill ran it: chunks arrive on a bounded channel from another
/// thread (the network task), progress is published after each.
fn serial_channel(data: &Bytes, file: &File) -> ocicache::reference::Digest {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(QUEUE);
    let (progress, _reader) = tokio::sync::watch::channel(0u64);
    std::thread::scope(|s| {
        let producer = s.spawn(move || {
            let mut at = 0;
            while at < data.len() {
                let end = (at + CHUNK).min(data.len());
                tx.blocking_send(data.slice(at..end)).unwrap();
                at = end;
            }
        });
        let mut h = DigestHasher::new(Algorithm::Sha256);
        let mut offset = 0u64;
        while let Some(chunk) = rx.blocking_recv() {
            h.update(&chunk);
            file.write_all_at(&chunk, offset).unwrap();
            offset += chunk.len() as u64;
            progress.send_modify(|w| *w = offset);
        }
        producer.join().unwrap();
        h.finalize()
    })
}

/// The hash on this thread, the writes on another (fed the same `Bytes`, no copy), both
/// going at once.
fn two_threads(data: &Bytes, file: &File) -> ocicache::reference::Digest {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(QUEUE);
    std::thread::scope(|s| {
        let writer = s.spawn(move || {
            let mut offset = 0u64;
            for chunk in rx {
                file.write_all_at(&chunk, offset).unwrap();
                offset += chunk.len() as u64;
            }
        });
        let mut h = DigestHasher::new(Algorithm::Sha256);
        let mut at = 0;
        while at < data.len() {
            let end = (at + CHUNK).min(data.len());
            let chunk = data.slice(at..end);
            h.update(&chunk);
            tx.send(chunk).unwrap();
            at = end;
        }
        drop(tx);
        writer.join().unwrap();
        h.finalize()
    })
}

/// The fill's own disk half: `Sink` fed from a task of a one-worker runtime (the network
/// task's place), writing and hashing on its thread of the disk pool.
fn sink(rt: &tokio::runtime::Runtime, data: &Bytes, file: &File) -> ocicache::reference::Digest {
    let file = Arc::new(file.try_clone().unwrap());
    rt.block_on(async {
        let (progress, _reader) = tokio::sync::watch::channel(Progress::Streaming {
            size: Some(data.len() as u64),
            written: 0,
        });
        let sink = Sink::start(file, Algorithm::Sha256, Arc::new(progress));
        let mut at = 0;
        while at < data.len() {
            let end = (at + CHUNK).min(data.len());
            assert!(sink.push(data.slice(at..end)).await, "the writer failed");
            at = end;
        }
        let (written, digest) = sink.finish().await.unwrap();
        assert_eq!(written, data.len() as u64);
        digest
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// A temp file in `dir`, removed on drop.
struct TempFile {
    file: File,
    path: PathBuf,
}

impl TempFile {
    fn new(dir: &Path) -> TempFile {
        let path = dir.join(format!("ocicache-fill-bench-{}", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TempFile { file, path }
    }

    /// Empties the file (its pages are freed), as a new fill's temp file starts.
    fn reset(&self) {
        self.file.set_len(0).unwrap();
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The directories to write into: tmpfs when there is one, and the disk.
fn dirs() -> Vec<(&'static str, PathBuf)> {
    let mut v = Vec::new();
    let shm = Path::new("/dev/shm");
    if shm.is_dir() && writable(shm) {
        v.push(("tmpfs", shm.to_path_buf()));
    }
    let disk = std::env::var_os("FILL_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    v.push(("disk", disk));
    v
}

fn writable(dir: &Path) -> bool {
    let path = dir.join(format!("ocicache-fill-bench-probe-{}", std::process::id()));
    let ok = File::create(&path).is_ok();
    let _ = std::fs::remove_file(&path);
    ok
}

/// Times `f` over a freshly emptied file, `iters` times (the truncation is not timed).
fn timed(iters: u64, file: &TempFile, mut f: impl FnMut(&File)) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        file.reset();
        let start = Instant::now();
        f(&file.file);
        total += start.elapsed();
    }
    total
}

fn benches(c: &mut Criterion, data: &Bytes, rt: &tokio::runtime::Runtime) {
    let mut g = c.benchmark_group("fill");
    g.throughput(Throughput::Bytes(TOTAL as u64));
    g.sample_size(20);
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(4));
    g.bench_function("sha256", |b| b.iter(|| black_box(sha256(black_box(data)))));
    g.bench_function("digest_hasher", |b| {
        b.iter(|| black_box(digest_hasher(black_box(data))))
    });
    for (name, dir) in dirs() {
        let file = TempFile::new(&dir);
        g.bench_function(format!("pwrite/{name}"), |b| {
            b.iter_custom(|n| timed(n, &file, |f| pwrite(data, f)))
        });
        g.bench_function(format!("hash+pwrite/{name}"), |b| {
            b.iter_custom(|n| timed(n, &file, |f| drop(black_box(hash_pwrite(data, f)))))
        });
        g.bench_function(format!("serial_channel/{name}"), |b| {
            b.iter_custom(|n| timed(n, &file, |f| drop(black_box(serial_channel(data, f)))))
        });
        g.bench_function(format!("two_threads/{name}"), |b| {
            b.iter_custom(|n| timed(n, &file, |f| drop(black_box(two_threads(data, f)))))
        });
        g.bench_function(format!("sink/{name}"), |b| {
            b.iter_custom(|n| timed(n, &file, |f| drop(black_box(sink(rt, data, f)))))
        });
    }
    g.finish();
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// CPU time of this process so far (user + system, all threads, the exited ones included),
/// from `/proc/self/stat`. The kernel scales these ticks from its precise run-time
/// accounting, so a sum of deltas over many runs is accurate to a tick per run.
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_comm = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // After the command: state is field 3, utime 14 and stime 15 (USER_HZ is 100).
    Duration::from_millis((tick(11) + tick(12)) * 10)
}

/// One run's wall time and the process's CPU time over it.
fn run(file: Option<&TempFile>, f: impl FnOnce(Option<&File>)) -> (Duration, Duration) {
    if let Some(t) = file {
        t.reset();
    }
    let cpu = process_cpu();
    let start = Instant::now();
    f(file.map(|t| &t.file));
    (start.elapsed(), process_cpu() - cpu)
}

/// The goal, measured again with alternated runs so that every variant sees the same
/// machine: wall time (median) and CPU time (total over the runs, all threads). The verdict
/// is on CPU time, what hashing and writing cost; wall time also moves with whatever else
/// the machine runs.
fn summary(data: &Bytes) {
    const ROUNDS: usize = 15;
    let mib_s = |d: Duration| TOTAL as f64 / (1 << 20) as f64 / d.as_secs_f64();
    println!(
        "\nsummary: {} MiB in {} KiB chunks, {ROUNDS} alternated runs each, ratios to sha256 alone \
         (goal <= 1.20x, judged on the fill path today); load average {}",
        TOTAL >> 20,
        CHUNK >> 10,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let rt = runtime();
    // (label, run, is this the fill path today?)
    type Variant<'a> = Box<dyn Fn(&Bytes, &File) + 'a>;
    let variants: [(&str, Variant, bool); 4] = [
        (
            "hash+pwrite (1 thread)",
            Box::new(|d, f| drop(black_box(hash_pwrite(d, f)))),
            false,
        ),
        (
            "serial_channel",
            Box::new(|d, f| drop(black_box(serial_channel(d, f)))),
            false,
        ),
        (
            "two_threads",
            Box::new(|d, f| drop(black_box(two_threads(d, f)))),
            false,
        ),
        (
            "sink (the fill today)",
            Box::new(|d, f| drop(black_box(sink(&rt, d, f)))),
            true,
        ),
    ];
    for (name, dir) in dirs() {
        let file = TempFile::new(&dir);
        let mut hash = (Vec::new(), Duration::ZERO);
        let mut results = vec![(Vec::new(), Duration::ZERO); variants.len()];
        for _ in 0..ROUNDS {
            let (w, c) = run(None, |_| {
                black_box(sha256(black_box(data)));
            });
            hash.0.push(w);
            hash.1 += c;
            for (i, (_, f, _)) in variants.iter().enumerate() {
                let (w, c) = run(Some(&file), |file| f(data, file.unwrap()));
                results[i].0.push(w);
                results[i].1 += c;
            }
        }
        let (hw, hc) = (median(hash.0), hash.1 / ROUNDS as u32);
        println!(
            "  sha256 alone: {:.1} ms wall ({:.0} MiB/s), {:.1} ms CPU",
            hw.as_secs_f64() * 1e3,
            mib_s(hw),
            hc.as_secs_f64() * 1e3
        );
        for ((label, _, today), (walls, cpu)) in variants.iter().zip(results) {
            let (w, c) = (median(walls), cpu / ROUNDS as u32);
            let wall_ratio = w.as_secs_f64() / hw.as_secs_f64();
            let cpu_ratio = c.as_secs_f64() / hc.as_secs_f64();
            let verdict = |ok: bool| match (today, ok) {
                (false, _) => "info",
                (true, true) => "PASS",
                (true, false) => "FAIL",
            };
            println!(
                "  {label}/{name}: wall {:.1} ms ({:.0} MiB/s) = {wall_ratio:.2}x [{}], CPU {:.1} ms = {cpu_ratio:.2}x [{}]",
                w.as_secs_f64() * 1e3,
                mib_s(w),
                verdict(wall_ratio <= 1.2),
                c.as_secs_f64() * 1e3,
                verdict(cpu_ratio <= 1.2),
            );
        }
    }
}

fn main() {
    let data = data();
    let mut c = Criterion::default().configure_from_args();
    let rt = runtime();
    benches(&mut c, &data, &rt);
    c.final_summary();
    // `cargo test --benches` runs this with `--bench` absent: keep that fast.
    if std::env::args().any(|a| a == "--bench") {
        summary(&data);
    }
}
