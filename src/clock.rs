//! The one clock of the library: wall-clock time (`now`) and monotonic time (`Instant`) that
//! tests can pause and advance with `tokio::time::pause` / `advance`.
//!
//! Monotonic time is tokio's [`tokio::time::Instant`], which a paused runtime freezes. Wall
//! time (tag records' confirmation times, lease expiries in the bucket) is needed too, since
//! it is written to disk and shared between replicas; here it is the wall time read once,
//! plus the tokio time elapsed since. Outside tests the two agree to within the drift of the
//! system clock over the process's life, which NTP keeps small; inside a paused test, wall
//! time moves exactly as far as the test advances it. Nothing else in the library reads
//! `SystemTime::now()` or `std::time::Instant::now()` for a decision.
//!
//! A [`Clock`] is that clock as one server instance reads it, plus the time a test skipped
//! ahead with [`Clock::advance`]: integration tests run a real server on real sockets (whose
//! runtime cannot be paused without its I/O timeouts firing at once), and still see a tag's
//! TTL pass without waiting for it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use tokio::time::Instant;

/// The wall time and the monotonic time at the first reading.
fn origin() -> &'static (SystemTime, Instant) {
    static ORIGIN: OnceLock<(SystemTime, Instant)> = OnceLock::new();
    ORIGIN.get_or_init(|| (SystemTime::now(), Instant::now()))
}

/// The wall-clock time, advancing with tokio's (pausable) clock.
pub fn now() -> SystemTime {
    let (wall, mono) = *origin();
    // Under a paused clock, tokio's `now()` is the frozen time plus what the test advanced.
    let elapsed = Instant::now().saturating_duration_since(mono);
    wall + elapsed
}

/// Time since the Unix epoch, by [`now`].
pub fn since_epoch() -> Duration {
    now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// How long ago `then` was, by [`now`]; `Duration::MAX` for a time in the future (a clock
/// that stepped back, or another replica's clock ahead of ours), so that it counts as old.
pub fn age(then: SystemTime) -> Duration {
    now().duration_since(then).unwrap_or(Duration::MAX)
}

/// The clock of one server instance: [`now`] plus what a test skipped.
#[derive(Debug, Default)]
pub struct Clock {
    /// Milliseconds skipped by [`Clock::advance`]; zero outside tests.
    skipped_ms: AtomicU64,
    /// Wakes [`Clock::sleep_until`] when a test skips ahead, so that a wait on this clock
    /// (a sync's interval) ends as soon as it has been skipped past.
    advanced: tokio::sync::Notify,
}

impl Clock {
    fn skipped(&self) -> Duration {
        Duration::from_millis(self.skipped_ms.load(Ordering::Relaxed))
    }

    /// The wall-clock time.
    pub fn now(&self) -> SystemTime {
        now() + self.skipped()
    }

    /// A monotonic instant.
    pub fn instant(&self) -> Instant {
        Instant::now() + self.skipped()
    }

    /// How long ago `then` was; `Duration::MAX` for a time in the future (see [`age`]).
    pub fn age(&self, then: SystemTime) -> Duration {
        self.now().duration_since(then).unwrap_or(Duration::MAX)
    }

    /// Moves this clock `d` ahead (for tests: a TTL passes without waiting for it).
    pub fn advance(&self, d: Duration) {
        self.skipped_ms
            .fetch_add(d.as_millis() as u64, Ordering::Relaxed);
        self.advanced.notify_waiters();
    }

    /// Waits until [`Clock::instant`] reaches `deadline`: tokio's sleep (which a paused
    /// runtime skips), cut short by [`Clock::advance`].
    pub async fn sleep_until(&self, deadline: Instant) {
        loop {
            // Made before the check: an advance between the two still wakes it.
            let advanced = self.advanced.notified();
            let now = self.instant();
            if now >= deadline {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(deadline - now) => {}
                _ = advanced => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn wall_time_follows_a_paused_clock() {
        let before = now();
        tokio::time::advance(Duration::from_secs(3600)).await;
        let after = now();
        let moved = after.duration_since(before).unwrap();
        assert!(
            moved >= Duration::from_secs(3600) && moved < Duration::from_secs(3601),
            "{moved:?}"
        );
        assert!(age(before) >= Duration::from_secs(3600));
    }

    #[tokio::test(start_paused = true)]
    async fn a_sleep_on_an_instance_clock_ends_when_skipped_past() {
        let c = std::sync::Arc::new(Clock::default());
        let deadline = c.instant() + Duration::from_secs(3600);
        let sleeper = tokio::spawn({
            let c = c.clone();
            async move { c.sleep_until(deadline).await }
        });
        tokio::task::yield_now().await;
        c.advance(Duration::from_secs(1800));
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished(), "half way");
        let before = Instant::now();
        c.advance(Duration::from_secs(1800));
        sleeper.await.unwrap();
        assert_eq!(
            Instant::now(),
            before,
            "woken by the skip, not by tokio's time"
        );
    }

    #[test]
    fn an_instance_clock_skips_ahead() {
        let c = Clock::default();
        let then = c.now();
        let i = c.instant();
        c.advance(Duration::from_secs(300));
        assert!(c.age(then) >= Duration::from_secs(300));
        assert!(c.instant() - i >= Duration::from_secs(300));
        assert!(
            Clock::default().age(then) < Duration::from_secs(300),
            "per instance"
        );
    }
}
