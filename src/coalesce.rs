//! Coalescing of concurrent resolutions: callers that ask for the same key at the same time
//! share one run of the work and its result.
//!
//! An entry lives exactly as long as someone waits on it. Each caller holds a `Waiter`
//! guard; the last guard to go (the work finished, or every caller was cancelled) removes the
//! entry. So the map holds at most one entry per key being resolved right now, whatever the
//! keys are made of (a client's `Accept` header is part of a tag's key, and clients choose
//! it freely), and a resolution that everyone abandoned leaves nothing behind.
//!
//! If the caller that runs the work goes away, a waiting caller runs it instead
//! (`OnceCell::get_or_init`): cancelling one client never fails the others.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::OnceCell;

/// Runs one future per key at a time; callers with the same key share its result.
pub struct Coalesce<K: Eq + Hash + Clone, V> {
    /// A std mutex: held for a map operation, never across an await.
    flights: Mutex<HashMap<K, Arc<OnceCell<V>>>>,
}

impl<K: Eq + Hash + Clone, V: Clone> Default for Coalesce<K, V> {
    fn default() -> Self {
        Coalesce {
            flights: Mutex::new(HashMap::new()),
        }
    }
}

/// One caller's share of a flight. Every change of the cell's reference count happens under
/// the map's lock (a clone when a caller joins, the drop here), so the guard that sees itself
/// last really is the last, and removes the entry.
struct Waiter<'a, K: Eq + Hash + Clone, V> {
    coalesce: &'a Coalesce<K, V>,
    key: K,
    cell: Option<Arc<OnceCell<V>>>,
}

impl<K: Eq + Hash + Clone, V> Drop for Waiter<'_, K, V> {
    fn drop(&mut self) {
        let mut flights = self
            .coalesce
            .flights
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let Some(cell) = self.cell.take() else { return };
        // The map's own reference and ours: nobody else waits.
        let last = Arc::strong_count(&cell) <= 2;
        if last
            && flights
                .get(&self.key)
                .is_some_and(|c| Arc::ptr_eq(c, &cell))
        {
            flights.remove(&self.key);
        }
        drop(cell);
    }
}

impl<K: Eq + Hash + Clone, V: Clone> Coalesce<K, V> {
    /// The result of `f` for `key`, run once for all the callers that ask meanwhile.
    pub async fn run<F, Fut>(&self, key: K, f: F) -> V
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        let cell = {
            let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
            flights.entry(key.clone()).or_default().clone()
        };
        let waiter = Waiter {
            coalesce: self,
            key,
            cell: Some(cell),
        };
        let cell = waiter.cell.as_ref().expect("set above");
        let value = cell.get_or_init(f).await.clone();
        // Done: later callers start a new run (the result may be stale by then).
        {
            let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
            if flights
                .get(&waiter.key)
                .is_some_and(|c| Arc::ptr_eq(c, cell))
            {
                flights.remove(&waiter.key);
            }
        }
        value
    }

    /// Keys being resolved now.
    pub fn len(&self) -> usize {
        self.flights.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_run() {
        let c: Arc<Coalesce<u8, u32>> = Arc::new(Coalesce::default());
        let runs = Arc::new(AtomicU32::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (c, runs) = (c.clone(), runs.clone());
            tasks.push(tokio::spawn(async move {
                c.run(1, || async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    7
                })
                .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), 7);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(c.is_empty(), "a finished flight leaves no entry");
    }

    /// Clients choose the key (their Accept header is part of it): 10,000 resolutions, each
    /// with its own key, all cancelled mid-way, leave the map empty.
    #[tokio::test(start_paused = true)]
    async fn cancelled_resolutions_leave_nothing_behind() {
        let c: Arc<Coalesce<String, u32>> = Arc::new(Coalesce::default());
        let mut tasks = Vec::new();
        for i in 0..10_000 {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                c.run(format!("application/x-{i}"), || async {
                    std::future::pending::<()>().await;
                    0
                })
                .await
            }));
        }
        // Every task is waiting inside its flight.
        while c.len() < 10_000 {
            tokio::task::yield_now().await;
        }
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            assert!(t.await.unwrap_err().is_cancelled());
        }
        assert_eq!(c.len(), 0);
    }

    /// The caller that runs the work is cancelled: a waiting caller takes over, and the entry
    /// goes once the last caller has its answer.
    #[tokio::test(start_paused = true)]
    async fn a_waiter_takes_over_from_a_cancelled_runner() {
        let c: Arc<Coalesce<u8, u32>> = Arc::new(Coalesce::default());
        let first = {
            let c = c.clone();
            tokio::spawn(async move { c.run(1, std::future::pending::<u32>).await })
        };
        while c.is_empty() {
            tokio::task::yield_now().await;
        }
        let second = {
            let c = c.clone();
            tokio::spawn(async move { c.run(1, || async { 5 }).await })
        };
        tokio::task::yield_now().await;
        first.abort();
        assert_eq!(second.await.unwrap(), 5);
        assert!(c.is_empty());
    }
}
