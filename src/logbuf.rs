//! The log's writer: every thread appends its formatted lines to one buffer in memory, and
//! one thread writes that buffer out in one system call, every [`FLUSH_EVERY`] or as soon as
//! it holds [`BATCH`] bytes.
//!
//! Why not a channel to a writer thread (`tracing-appender`): it woke the writer for each
//! line when the server was not saturated, and the writer spun (`sched_yield`) waiting for
//! the next one: one client reading 1 MiB blobs cost 3.6 `sched_yield`, one `futex` and one
//! `write` per request on that thread alone, and cached manifests under `wrk` were served
//! at 53,000-62,000 requests/s with the request lines against 84,000 without them. Here a
//! line costs a lock and a copy; the writer wakes 20 times a second, or once a batch.
//!
//! Nothing is dropped: past [`CAP`] bytes waiting (an output that does not keep up), a
//! thread that logs waits for the writer. A line reaches the output at most
//! [`FLUSH_EVERY`] after it was logged; the rest is written when the [`Guard`] drops.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

/// The longest a line waits in memory.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// Bytes that make the writer go before its time.
pub const BATCH: usize = 64 << 10;
/// Bytes waiting past which a thread that logs waits for the writer.
pub const CAP: usize = 4 << 20;

struct Shared {
    state: Mutex<State>,
    /// The writer waits on it for a batch, or for the end.
    ready: Condvar,
    /// Threads that log wait on it for room.
    room: Condvar,
    batch: usize,
    cap: usize,
}

#[derive(Default)]
struct State {
    buf: Vec<u8>,
    closed: bool,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // A thread that panicked while holding the lock left whole lines: appends are single
    // copies.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the log's layer writes to (a `MakeWriter`): cheap to clone.
#[derive(Clone)]
pub struct Lines(Arc<Shared>);

/// Writes what is left when dropped, and ends the writer thread.
pub struct Guard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// A writer thread writing to `out`, and the handle lines are written through.
pub fn spawn(out: impl Write + Send + 'static) -> (Lines, Guard) {
    spawn_with(out, BATCH, CAP)
}

fn spawn_with(mut out: impl Write + Send + 'static, batch: usize, cap: usize) -> (Lines, Guard) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        ready: Condvar::new(),
        room: Condvar::new(),
        batch,
        cap,
    });
    let writer = shared.clone();
    let thread = std::thread::Builder::new()
        .name("ocicache-log".into())
        .spawn(move || {
            let mut spare = Vec::new();
            loop {
                let (lines, closed) = writer.next_batch(std::mem::take(&mut spare));
                // An output that fails (a closed pipe) loses these lines, not the server.
                let _ = out.write_all(&lines).and_then(|()| out.flush());
                spare = lines;
                spare.clear();
                if closed {
                    return;
                }
            }
        })
        .expect("a thread for the log");
    (
        Lines(shared.clone()),
        Guard {
            shared,
            thread: Some(thread),
        },
    )
}

impl Shared {
    /// Waits for a batch, the time to flush, or the end; takes what is waiting (leaving
    /// `spare` in its place) and says whether the log is closed.
    fn next_batch(&self, spare: Vec<u8>) -> (Vec<u8>, bool) {
        let mut state = lock(&self.state);
        if state.buf.len() < self.batch && !state.closed {
            state = self
                .ready
                .wait_timeout(state, FLUSH_EVERY)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        let lines = std::mem::replace(&mut state.buf, spare);
        let closed = state.closed;
        drop(state);
        if lines.len() >= self.cap {
            self.room.notify_all();
        }
        (lines, closed)
    }

    fn append(&self, line: &[u8]) {
        let mut state = lock(&self.state);
        while state.buf.len() >= self.cap && !state.closed {
            state = self
                .room
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        let before = state.buf.len();
        state.buf.extend_from_slice(line);
        // Once per batch, not per line: a notification is a system call.
        if before < self.batch && state.buf.len() >= self.batch {
            self.ready.notify_one();
        }
    }
}

impl Lines {
    /// Appends `line` (whole lines, each ending with a newline) as one write.
    pub fn write_line(&self, line: &[u8]) {
        self.0.append(line);
    }
}

/// One write is kept whole: the fmt layer formats an event, then writes it with one
/// `write_all`, which this accepts at once.
impl Write for &Lines {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        self.0.append(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Lines {
    type Writer = &'a Lines;

    fn make_writer(&'a self) -> &'a Lines {
        self
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        lock(&self.shared.state).closed = true;
        self.shared.ready.notify_one();
        self.shared.room.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output that keeps what it is given, for a test to read.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    #[test]
    fn lines_from_many_threads_arrive_whole_and_in_each_threads_order() {
        let sink = Sink::default();
        let (lines, guard) = spawn_with(sink.clone(), 1 << 10, 4 << 10);
        std::thread::scope(|s| {
            for t in 0..4 {
                let lines = &lines;
                s.spawn(move || {
                    for i in 0..2_000 {
                        // As the fmt layer writes an event: formatted, then one write.
                        let line = format!("thread {t} line {i:05} end\n");
                        (&mut &*lines).write_all(line.as_bytes()).unwrap();
                    }
                });
            }
        });
        drop(guard);
        let text = sink.text();
        let mut next = [0; 4];
        for line in text.lines() {
            let words: Vec<&str> = line.split(' ').collect();
            assert_eq!(words.len(), 5, "a torn line: {line:?}");
            let t: usize = words[1].parse().unwrap();
            assert_eq!(words[3].parse::<usize>().unwrap(), next[t], "out of order");
            next[t] += 1;
        }
        assert_eq!(next, [2_000; 4], "every line arrives once");
    }

    #[test]
    fn a_lone_line_is_written_without_waiting_for_a_batch_or_the_end() {
        let sink = Sink::default();
        let (lines, _guard) = spawn(sink.clone());
        writeln!(&mut &lines, "only line").unwrap();
        // Polled, not slept: the writer goes within FLUSH_EVERY.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while sink.text().is_empty() {
            assert!(std::time::Instant::now() < deadline, "never written");
            std::thread::yield_now();
        }
        assert_eq!(sink.text(), "only line\n");
    }

    /// An output that accepts nothing until the test lets it.
    struct Gate {
        open: Arc<(Mutex<bool>, Condvar)>,
        sink: Sink,
    }

    impl Write for Gate {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let (open, cv) = &*self.open;
            let mut open = open.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
            self.sink.write(b)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_output_holds_back_the_threads_that_log_instead_of_growing_or_dropping() {
        let open = Arc::new((Mutex::new(false), Condvar::new()));
        let sink = Sink::default();
        let gate = Gate {
            open: open.clone(),
            sink: sink.clone(),
        };
        let (lines, guard) = spawn_with(gate, 64, 256);
        let logging = std::thread::spawn(move || {
            for i in 0..200 {
                writeln!(&mut &lines, "line {i:04} of a stuck log").unwrap();
            }
            lines
        });
        // The logging thread fills what the writer took and the cap, then waits.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let waiting = lock(&guard.shared.state).buf.len();
            if waiting >= 256 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never reached the cap"
            );
            std::thread::yield_now();
        }
        assert!(!logging.is_finished(), "held back at the cap");
        assert!(lock(&guard.shared.state).buf.len() < 256 + 64, "bounded");
        let (flag, cv) = &*open;
        *flag.lock().unwrap() = true;
        cv.notify_all();
        let lines = logging.join().unwrap();
        drop(lines);
        drop(guard);
        assert_eq!(sink.text().lines().count(), 200, "nothing dropped");
    }
}
