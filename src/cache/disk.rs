//! The disk threads of the fills: a fixed pool, sized by the cores, that hashes and writes
//! every fill's chunks.
//!
//! A fill's chunks must be hashed and written in order, and both are blocking work (the hash
//! is CPU, `pwrite` may wait for the disk), so they run off the runtime. Two blocking-pool
//! threads per fill for its whole life, as fills had before, make the thread count follow the
//! number of cold misses (a storm of 300 misses made 500 threads, and a hit that needed the
//! blocking pool waited seconds for it). Here each fill is given one [`Lane`], a thread of the
//! pool, for its life: its jobs run in order on that thread, beside the jobs of the other
//! fills given the same thread. A lane is chosen as the thread with the fewest fills.
//!
//! A job that panics takes down neither its thread nor other fills: the panic is caught, and
//! what the job held is dropped (so the fill that sent it sees its sink fail).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, OnceLock};

type Job = Box<dyn FnOnce() + Send>;

/// The pool: one queue per thread, and how many fills each thread serves.
struct Pool {
    threads: Vec<(mpsc::Sender<Job>, AtomicUsize)>,
}

/// Threads of the pool: the cores, at least 2 (so one slow disk write does not stall every
/// fill's hash) and at most 8 (more would not make the disk faster).
fn size() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 8)
}

/// The process's pool, started at its first use. Process-wide rather than per cache: the
/// bound is on the threads of the process.
fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        keep_freed_buffers();
        let threads = (0..size())
            .map(|i| {
                let (tx, rx) = mpsc::channel::<Job>();
                std::thread::Builder::new()
                    .name(format!("ocicache-disk-{i}"))
                    .spawn(move || {
                        for job in rx {
                            if catch_unwind(AssertUnwindSafe(job)).is_err() {
                                tracing::error!("a fill's disk job panicked");
                            }
                        }
                    })
                    .expect("spawning a disk thread");
                (tx, AtomicUsize::new(0))
            })
            .collect();
        Pool { threads }
    })
}

/// Tells glibc's allocator to keep the memory of freed network buffers for the next ones.
///
/// A fill frees every chunk (a buffer of up to 400 KiB that the upstream's connection read
/// into) on a disk thread once written, hashed and read, and the connection allocates the
/// next. With glibc's defaults, those buffers are mapped and unmapped one by one, or the
/// freed top of the heap is given back to the kernel as soon as it passes twice the largest
/// buffer seen: either way the next read faults its pages in again, zeroed. That was about
/// 100,000 page faults per cold GiB, 0.15-0.2 CPU-s (of 1.7). Buffers up to 4 MiB now come
/// from the heap, and up to 32 MiB of freed heap is kept: the peak memory is unchanged (the
/// memory is reused, not added), only given back later.
fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only sets the allocator's parameters; it is safe at any time, from
    // any thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
    }
}

/// One thread of the pool, given to one fill for its life: jobs sent on a lane run one after
/// the other, in the order sent.
pub struct Lane {
    thread: usize,
}

impl Lane {
    /// The lane of a new fill: the thread that serves the fewest fills now.
    pub fn new() -> Lane {
        let pool = pool();
        let thread = (0..pool.threads.len())
            .min_by_key(|&i| pool.threads[i].1.load(Ordering::Relaxed))
            .unwrap_or(0);
        pool.threads[thread].1.fetch_add(1, Ordering::Relaxed);
        Lane { thread }
    }

    /// A second lane for the same fill, on another thread than `lane` (the one of the others
    /// that serves the fewest fills): the fill's work on the two overlaps.
    pub fn beside(lane: &Lane) -> Lane {
        let pool = pool();
        let thread = (0..pool.threads.len())
            .filter(|&i| i != lane.thread)
            .min_by_key(|&i| pool.threads[i].1.load(Ordering::Relaxed))
            .unwrap_or(lane.thread);
        pool.threads[thread].1.fetch_add(1, Ordering::Relaxed);
        Lane { thread }
    }

    /// Runs `job` on the lane's thread, after the jobs sent before it.
    pub fn run(&self, job: impl FnOnce() + Send + 'static) {
        // The threads never exit, so the send cannot fail; if it did, the job would be
        // dropped, and what it holds (a permit, a reply channel) tells its sender.
        let _ = pool().threads[self.thread].0.send(Box::new(job));
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        pool().threads[self.thread]
            .1
            .fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_in_order_and_a_panic_spares_the_thread() {
        let lane = Lane::new();
        let (tx, rx) = mpsc::channel();
        for i in 0..100 {
            let tx = tx.clone();
            lane.run(move || tx.send(i).unwrap());
        }
        lane.run(|| panic!("injected"));
        lane.run(move || tx.send(100).unwrap());
        let got: Vec<i32> = rx.iter().take(101).collect();
        assert_eq!(got, (0..=100).collect::<Vec<_>>());
    }

    /// A fill's hash lane is on another thread than its write lane, whatever the load of
    /// the threads (here: every fill so far on one thread), and its jobs run in order too.
    #[test]
    fn a_lane_beside_another_is_on_another_thread() {
        let crowded: Vec<Lane> = (0..10).map(|_| Lane::new()).collect();
        for lane in &crowded {
            let other = Lane::beside(lane);
            assert_ne!(other.thread, lane.thread);
            let (tx, rx) = mpsc::channel();
            for i in 0..10 {
                let tx = tx.clone();
                other.run(move || tx.send(i).unwrap());
            }
            drop(tx);
            assert_eq!(rx.iter().collect::<Vec<_>>(), (0..10).collect::<Vec<_>>());
        }
    }

    #[test]
    fn the_pool_is_bounded() {
        let lanes: Vec<Lane> = (0..100).map(|_| Lane::new()).collect();
        let threads: std::collections::HashSet<usize> = lanes.iter().map(|l| l.thread).collect();
        assert!((2..=8).contains(&threads.len()), "{}", threads.len());
    }
}
