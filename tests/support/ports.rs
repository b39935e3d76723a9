//! Ports for the servers that bind an address written in their configuration rather than
//! a listener the test hands them: a replica's peer endpoint (which the other replicas and
//! the blob's owner are computed from before it starts), `ocicache serve` as a child, the
//! CNCF registry, Garage's nodes. The test picks the port free, the server binds it a
//! moment later; whatever binds it in between makes the start fail.
//!
//! So the ports come from below Linux's ephemeral range: the kernel never hands those out
//! for a `127.0.0.1:0` bind or an outgoing connection, which this suite makes by the
//! thousand, in parallel, while a replica starts. Within this process no port is given
//! twice, until all 12,000 have been (a walk over the range, from a place of its own to
//! each process, with a stride that reaches every port). A server that binds a port of its own configuration can then
//! only lose it to another process that picked the same number in the same moment; the
//! registry and Garage retry their starts with new ports all the same.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// How many ports the range holds.
const SPAN: u32 = 12_000;
/// The walk's step: prime, and no divisor of `SPAN`, so the walk reaches every port before
/// it comes back; consecutive ports are far apart, far from another process's.
const STRIDE: u32 = 7_919;
/// The start of the ephemeral range when it cannot be read (Linux's default, 32768-60999).
const EPHEMERAL_START: u32 = 32_768;

/// A port on 127.0.0.1 that nothing listens on now and that this process has not handed
/// out before, below the ephemeral range.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (low, offset) = *walk();
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = low + (offset + n.wrapping_mul(STRIDE)) % SPAN;
        let port = u16::try_from(port).expect("the range is below 65536");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The range's first port, and this process's place in it (from the time and the pid).
fn walk() -> &'static (u32, u32) {
    static WALK: OnceLock<(u32, u32)> = OnceLock::new();
    WALK.get_or_init(|| {
        let top = ephemeral_start()
            .unwrap_or(EPHEMERAL_START)
            .max(SPAN + 1024);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let seed = nanos ^ std::process::id().wrapping_mul(0x9E37_79B9);
        (top - SPAN, seed % SPAN)
    })
}

/// The first port of the kernel's ephemeral range (`net.ipv4.ip_local_port_range`).
fn ephemeral_start() -> Option<u32> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    range.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_below_the_ephemeral_range_free_and_never_given_twice() {
        let top = ephemeral_start().unwrap_or(EPHEMERAL_START);
        let ports: Vec<u16> = (0..300).map(|_| free_port()).collect();
        let distinct: std::collections::HashSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len(), "a port given twice");
        for &p in &ports {
            assert!(
                u32::from(p) < top,
                "{p} is in the ephemeral range from {top}"
            );
        }
        // Free when given: a server can bind it.
        let last = *ports.last().unwrap();
        assert!(TcpListener::bind(("127.0.0.1", last)).is_ok());
    }
}
