//! The fill path's blocking half, hash + write, against hashing alone.
//!
//! A fill (`src/cache/fill.rs`, `write_chunks`) feeds every chunk of the upstream body to a
//! `DigestHasher` and `pwrite`s it to a temp file. The goal: hash + write costs at most 1.2x
//! hashing alone, so verifying and keeping the bytes is not much dearer than verifying them.
//!
//! Benchmarks (64 MiB in 256 KiB chunks, each iteration into a freshly truncated file, so
//! the page cache allocates its pages as it does for a new fill):
//! - `sha256`: plain `sha2::Sha256` over the chunks (the baseline);
//! - `digest_hasher`: `ocicache::reference::DigestHasher`, the hasher fills use;
//! - `pwrite/<dir>`: `write_all_at` alone;
//! - `hash+pwrite/<dir>`: both, one chunk after the other, as `write_chunks` does;
//! - `write_chunks/<dir>`: the same loop fed through a bounded tokio `mpsc` channel from
//!   another thread and publishing progress on a `watch` channel after each chunk, as a fill.
//!
//! `<dir>` is `tmpfs` (/dev/shm) and `disk` (the temp dir, or `FILL_BENCH_DIR`).
//! After criterion, a summary measures the ratios again (medians of alternated runs) and
//! prints PASS/FAIL for the 1.2x goal.
//!
//! `cargo bench --bench fill`; `cargo bench --bench fill -- --quick` for a shorter run.

use std::fs::{File, OpenOptions};
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput};
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

/// `write_chunks` as a fill runs it: chunks arrive on a bounded channel from another
/// thread (the network task), progress is published after each.
fn write_chunks(data: &Bytes, file: &File) -> ocicache::reference::Digest {
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

fn benches(c: &mut Criterion, data: &Bytes) {
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
        g.bench_function(format!("write_chunks/{name}"), |b| {
            b.iter_custom(|n| timed(n, &file, |f| drop(black_box(write_chunks(data, f)))))
        });
    }
    g.finish();
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// The goal, measured again with alternated runs so that both sides see the same machine.
fn summary(data: &Bytes) {
    const ROUNDS: usize = 15;
    let mib_s = |d: Duration| TOTAL as f64 / (1 << 20) as f64 / d.as_secs_f64();
    println!(
        "\nsummary: {} MiB in {} KiB chunks, median of {ROUNDS} alternated runs",
        TOTAL >> 20,
        CHUNK >> 10
    );
    for (name, dir) in dirs() {
        let file = TempFile::new(&dir);
        let (mut hash, mut both, mut chunks) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            let start = Instant::now();
            black_box(sha256(black_box(data)));
            hash.push(start.elapsed());
            both.push(timed(1, &file, |f| drop(black_box(hash_pwrite(data, f)))));
            chunks.push(timed(1, &file, |f| drop(black_box(write_chunks(data, f)))));
        }
        let (h, b, w) = (median(hash), median(both), median(chunks));
        for (label, d) in [("hash+pwrite", b), ("write_chunks", w)] {
            let ratio = d.as_secs_f64() / h.as_secs_f64();
            println!(
                "  {} {label}/{name}: {:.1} ms ({:.0} MiB/s) vs sha256 {:.1} ms ({:.0} MiB/s) = {ratio:.2}x (goal <= 1.20x)",
                if ratio <= 1.2 { "PASS" } else { "FAIL" },
                d.as_secs_f64() * 1e3,
                mib_s(d),
                h.as_secs_f64() * 1e3,
                mib_s(h),
            );
        }
    }
}

fn main() {
    let data = data();
    let mut c = Criterion::default().configure_from_args();
    benches(&mut c, &data);
    c.final_summary();
    // `cargo test --benches` runs this with `--bench` absent: keep that fast.
    if std::env::args().any(|a| a == "--bench") {
        summary(&data);
    }
}
