//! What the fake counts: every request it received, as it received it, and the connections
//! it accepted, for tests that assert how often the upstream was asked.

use std::sync::atomic::Ordering;

use super::Fake;

/// One request as the fake received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// The path as sent (not percent-decoded), without the query.
    pub path: String,
    pub query: Option<String>,
    /// In order; names lowercase.
    pub headers: Vec<(String, String)>,
}

impl Recorded {
    /// The first header of this name (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl Fake {
    /// Requests received (registry and token endpoints), in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.lock().requests.clone()
    }

    /// How many requests had this method and a path containing `path_contains`.
    pub fn count(&self, method: &str, path_contains: &str) -> usize {
        self.shared
            .lock()
            .requests
            .iter()
            .filter(|r| r.method.eq_ignore_ascii_case(method) && r.path.contains(path_contains))
            .count()
    }

    /// Forget the recorded requests and the connection count.
    pub fn reset_counts(&self) {
        self.shared.lock().requests.clear();
        self.shared.connections.store(0, Ordering::SeqCst);
    }

    /// Connections accepted so far (since the last `reset_counts`).
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }
}
