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
}
