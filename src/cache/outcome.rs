//! How a request was answered, seen from the cache: one value per request, decided where the
//! answer is built and read by the log line (`cache=`), the metrics and the `X-Cache` header,
//! so that no layer matches strings to find out what happened.

/// Where a request's answer came from. `as_str` is its label in the log and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Served from the local tier without asking the upstream.
    Hit,
    /// A blob served from a fill (started by this request or joined), fed by the upstream.
    Fill,
    /// A manifest, tag list or referrers answer fetched from the upstream.
    Miss,
    /// A cached tag past its TTL that a `HEAD` to the upstream confirmed.
    Revalidated,
    /// A cached answer given because the upstream failed (stale-if-error).
    Stale,
    /// A `307` to a presigned URL of the blob in the shared tier (the bucket).
    Redirect,
    /// A blob whose fill the shared tier fed instead of the upstream.
    Bucket,
    /// Answered by asking the upstream, with nothing cached (a blob `HEAD`, which must not
    /// cost a download).
    Upstream,
    /// A blob whose fill another replica fed, streaming its own fill (`[cache.s3.peers]`).
    Peer,
}

impl Outcome {
    /// The label in the log line and the metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Fill => "fill",
            Outcome::Miss => "miss",
            Outcome::Revalidated => "revalidated",
            Outcome::Stale => "stale",
            Outcome::Redirect => "redirect",
            Outcome::Bucket => "bucket",
            Outcome::Upstream => "upstream",
            Outcome::Peer => "peer",
        }
    }

    /// The `X-Cache` header: `MISS` when the answer's bytes came from the upstream for this
    /// request, `HIT` when a cache tier (local or shared) or another replica had them.
    pub fn x_cache(self) -> &'static str {
        match self {
            Outcome::Fill | Outcome::Miss | Outcome::Upstream => "MISS",
            Outcome::Hit
            | Outcome::Revalidated
            | Outcome::Stale
            | Outcome::Redirect
            | Outcome::Bucket
            | Outcome::Peer => "HIT",
        }
    }

    /// Served stale because the upstream failed: the answer carries a `Warning` header.
    pub fn is_stale(self) -> bool {
        self == Outcome::Stale
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x_cache_says_miss_only_when_the_upstream_sent_the_bytes() {
        let all = [
            Outcome::Hit,
            Outcome::Fill,
            Outcome::Miss,
            Outcome::Revalidated,
            Outcome::Stale,
            Outcome::Redirect,
            Outcome::Bucket,
            Outcome::Upstream,
            Outcome::Peer,
        ];
        let misses: Vec<&str> = all
            .iter()
            .filter(|o| o.x_cache() == "MISS")
            .map(|o| o.as_str())
            .collect();
        assert_eq!(misses, ["fill", "miss", "upstream"]);
        assert!(all.iter().filter(|o| o.is_stale()).eq([&Outcome::Stale]));
    }
}
