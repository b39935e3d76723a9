//! Shared test support: the real registry and clients, the fake upstream, the proxy.
pub mod clients;
pub mod fake;
pub mod garage;
pub mod ports;
pub mod proxy;
pub mod registry;

/// Polls `f` every 20 ms until it holds; panics after `timeout`.
pub fn wait_until(what: &str, timeout: std::time::Duration, mut f: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
