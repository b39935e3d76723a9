//! The replicas' membership, kept in the bucket: each replica that serves a peer endpoint
//! writes `peers/<hex of its advertised URL>` (empty) every few seconds, and lists them. A
//! listing alone names every member (the URL is the object's name, hex-encoded so that no
//! configured text is ever a path component), and the store's Last-Modified says which are
//! alive: no GET per member, no clock of another replica trusted.

use std::time::Duration;

use futures_util::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload};

use super::Bucket;
use crate::clock;

impl Bucket {
    fn members_dir(&self) -> Path {
        Path::from(format!("{}peers", self.prefix))
    }

    /// Writes this replica's heartbeat, advertising `url`; `false` if the store failed.
    pub async fn beat(&self, url: &str) -> bool {
        let path = self.members_dir().child(hex::encode(url));
        self.call("peers", self.store.put(&path, PutPayload::new()))
            .await
            .is_ok()
    }

    /// The URLs of the replicas whose heartbeat is younger than `alive`, sorted; `None` if
    /// the store failed.
    pub async fn members(&self, alive: Duration) -> Option<Vec<String>> {
        let dir = self.members_dir();
        let all = self
            .call("peers", self.store.list(Some(&dir)).try_collect::<Vec<_>>())
            .await
            .ok()?;
        let oldest = chrono::DateTime::<chrono::Utc>::from(clock::now())
            - chrono::Duration::from_std(alive).unwrap_or(chrono::Duration::MAX);
        let mut urls: Vec<String> = all
            .into_iter()
            .filter(|m| m.last_modified > oldest)
            .filter_map(|m| {
                let name = m.location.filename()?;
                String::from_utf8(hex::decode(name).ok()?).ok()
            })
            .collect();
        urls.sort();
        urls.dedup();
        Some(urls)
    }

    /// Deletes this replica's heartbeat (at shutdown: the others stop asking it at once).
    pub async fn leave(&self, url: &str) {
        let path = self.members_dir().child(hex::encode(url));
        let _ = self.call("peers", self.store.delete(&path)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{tier, TestStore};
    use super::super::LEASE_TTL;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn members_are_those_that_beat_lately() {
        let store = TestStore::new();
        let (a, b) = (
            tier(&store, LEASE_TTL, 1 << 30),
            tier(&store, LEASE_TTL, 1 << 30),
        );
        let alive = Duration::from_secs(8);
        assert_eq!(a.members(alive).await, Some(vec![]));
        assert!(a.beat("http://10.0.0.2:5001").await);
        assert!(b.beat("http://10.0.0.1:5001").await);
        assert_eq!(
            a.members(alive).await.unwrap(),
            ["http://10.0.0.1:5001", "http://10.0.0.2:5001"]
        );
        // b stops beating; a goes on.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(a.beat("http://10.0.0.2:5001").await);
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(b.members(alive).await.unwrap(), ["http://10.0.0.2:5001"]);
        a.leave("http://10.0.0.2:5001").await;
        assert_eq!(b.members(alive).await, Some(vec![]));
    }
}
