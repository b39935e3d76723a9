//! Coalescing: the one mechanism by which concurrent requests for the same thing share one
//! piece of work, for blobs (fills) and manifests (tag, digest and tag-list resolutions).
//!
//! [`Flights`] is the map under both: one entry per key in flight, and an entry is removed
//! by identity (it is this very flight, not a newer one under the same key) by whoever ends
//! it. A blob's fill is detached from its clients by design (it outlives them, to fill the
//! cache), so its entry lives while the fill runs and the fill's guard ends it. A resolution
//! lives exactly as long as someone waits on it ([`Coalesce`]): each caller holds a
//! `Waiter` guard, and the last guard to go (the work finished, or every caller was
//! cancelled) removes the entry. So the map holds at most one entry per key being resolved
//! right now, whatever the keys are made of (a client's `Accept` header is part of a tag's
//! key, and clients choose it freely), and a resolution that everyone abandoned leaves
//! nothing behind.
//!
//! If the caller that runs a resolution goes away, a waiting caller runs it instead
//! (`OnceCell::get_or_init`): cancelling one client never fails the others.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::OnceCell;

/// Work in flight by key: at most one entry per key, each an `Arc` whose identity tells one
/// flight from a later one under the same key.
pub struct Flights<K, T> {
    /// A std mutex: held for a map operation (and a fill's temp file creation), never
    /// across an await.
    map: Mutex<HashMap<K, Arc<T>>>,
}

impl<K: Eq + Hash + Clone, T> Default for Flights<K, T> {
    fn default() -> Self {
        Flights {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash + Clone, T> Flights<K, T> {
    fn lock(&self) -> MutexGuard<'_, HashMap<K, Arc<T>>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The flight of `key`, if one is under way.
    pub fn get(&self, key: &K) -> Option<Arc<T>> {
        self.lock().get(key).cloned()
    }

    /// The flight of `key`: the one under way, else the one `start` makes (under the map's
    /// lock, so two callers never both start one). `start` may decide there is nothing to
    /// start (`Ok(None)`).
    pub fn join_or_start<E>(
        &self,
        key: &K,
        start: impl FnOnce() -> Result<Option<Arc<T>>, E>,
    ) -> Result<Option<Arc<T>>, E> {
        let mut map = self.lock();
        if let Some(flight) = map.get(key) {
            return Ok(Some(flight.clone()));
        }
        let started = start()?;
        if let Some(flight) = &started {
            map.insert(key.clone(), flight.clone());
        }
        Ok(started)
    }

    /// Ends `flight`: its entry goes, unless a newer flight holds the key.
    pub fn end(&self, key: &K, flight: &Arc<T>) {
        let mut map = self.lock();
        if map.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            map.remove(key);
        }
    }

    /// Keys in flight now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every flight under way now, with its key.
    pub fn snapshot(&self) -> Vec<(K, Arc<T>)> {
        self.lock()
            .iter()
            .map(|(k, f)| (k.clone(), f.clone()))
            .collect()
    }
}

/// Runs one future per key at a time; callers with the same key share its result.
pub struct Coalesce<K: Eq + Hash + Clone, V> {
    flights: Flights<K, OnceCell<V>>,
}

impl<K: Eq + Hash + Clone, V: Clone> Default for Coalesce<K, V> {
    fn default() -> Self {
        Coalesce {
            flights: Flights::default(),
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
        let mut flights = self.coalesce.flights.lock();
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
        let started = self
            .flights
            .join_or_start(&key, || Ok::<_, ()>(Some(Arc::default())));
        let cell = started.ok().flatten().expect("a cell is always started");
        let waiter = Waiter {
            coalesce: self,
            key,
            cell: Some(cell),
        };
        let cell = waiter.cell.as_ref().expect("set above");
        let value = cell.get_or_init(f).await.clone();
        // Done: later callers start a new run (the result may be stale by then).
        self.flights.end(&waiter.key, cell);
        value
    }

    /// Keys being resolved now.
    pub fn len(&self) -> usize {
        self.flights.len()
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
