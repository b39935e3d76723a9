//! The integration tests: one binary, each test with its own temp dirs and loopback ports.
//! Real parts (the CNCF registry, skopeo, containerd) for truth; the in-process fake
//! upstream for faults.

mod cases;
mod support;
