//! The LRU index over every blob on disk, weighed by size and bounded by `cache.max_size`,
//! and its rebuild from the disk at start, in the background.
//!
//! Not moka: with `[u8; 32]` keys, moka 0.12.16 still costs 338 bytes of resident memory
//! per entry (its per-entry `Arc`s, access-order deque nodes and concurrent hash table),
//! measured at 1,000,000 entries; the target is at most 128. It also cannot place an entry
//! anywhere but at the most recent end, which the rebuild needs (below). So the index is a
//! hash table of `u32` slots into one vector of fixed-size nodes that form a doubly linked
//! list in recency order: about 60 bytes per blob.
//!
//! The policy is plain LRU: a mirror must keep what was just pulled (moka's default TinyLFU
//! would refuse a fresh blob in favour of old popular ones). Eviction deletes the file; a
//! reader that has it open keeps reading (unlink semantics).
//!
//! Pinned digests (`cache::pins`) are never evicted: they count toward the bound, but the
//! eviction passes over them (moving each out of its way, to the recent end: a pinned entry
//! needs no recency). When what is left is all pinned and still over the bound, the index
//! says so (a warning, `ocicache_pins_over_bound`, `/readyz`) and evicts nothing more.
//!
//! The rebuild ([`Scan`]) runs on its own thread while the server answers: it walks the
//! store, sorts what it found by last use (the file's mtime, which hits refresh), and inserts
//! it oldest first, in batches. A blob used or added since the start is already indexed (a
//! request finds a blob that is on disk but not yet indexed, and indexes it); the scan then
//! leaves it where it is, and every scanned entry goes *before* all of those, so the bound
//! (which holds from then on) evicts the oldest scanned blobs first and never something used
//! since the start in favour of them.

use std::collections::{BTreeMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use hashbrown::HashTable;

use super::store::{Entry, Store};
use crate::metrics::Metrics;
use crate::reference::{Algorithm, Digest};

/// The end of a list, or no node.
const NIL: u32 = u32::MAX;

/// Marks, in [`Node::size`], a node whose digest is a sha512 (rare: see [`Lru::sha512`]).
const SHA512: u64 = 1 << 63;

/// Entries the scan inserts per lock of the index: small enough that a request waits
/// little for the lock, large enough that locking costs nothing.
pub const SCAN_BATCH: usize = 4096;

/// A digest as the index keeps it: binary, fixed size.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Key {
    Sha256([u8; 32]),
    Sha512([u8; 64]),
}

impl Key {
    fn of(d: &Digest) -> Key {
        // The hex of a parsed digest is lowercase and of the algorithm's length.
        match d.algorithm() {
            Algorithm::Sha256 => {
                let mut k = [0; 32];
                hex::decode_to_slice(d.hex(), &mut k).expect("a digest's hex");
                Key::Sha256(k)
            }
            Algorithm::Sha512 => {
                let mut k = [0; 64];
                hex::decode_to_slice(d.hex(), &mut k).expect("a digest's hex");
                Key::Sha512(k)
            }
        }
    }

    fn digest(&self) -> Digest {
        let s = match self {
            Key::Sha256(k) => format!("sha256:{}", hex::encode(k)),
            Key::Sha512(k) => format!("sha512:{}", hex::encode(k)),
        };
        Digest::parse(&s).expect("the hex of a digest's bytes")
    }
}

/// One indexed blob: 48 bytes.
struct Node {
    /// The sha256 digest; for a sha512 one, its first half (the whole is in `Lru::sha512`).
    key: [u8; 32],
    /// Bytes, with [`SHA512`] set for a sha512 digest. A free node's is 0.
    size: u64,
    /// Towards the least recently used end; the previous free node in the free list.
    prev: u32,
    /// Towards the most recently used end; the next free node in the free list.
    next: u32,
}

impl Node {
    fn bytes(&self) -> u64 {
        self.size & !SHA512
    }
}

/// The recency list and the tables that find its nodes. Behind one mutex: every operation is
/// a few pointer moves.
struct Lru {
    nodes: Vec<Node>,
    /// First node of the free list (chained through `next`), or [`NIL`].
    free: u32,
    /// sha256 digests: slots into `nodes`, hashed by the key they point at.
    sha256: HashTable<u32>,
    /// sha512 digests, rare in registries: an ordered map, so that a node's key (its first
    /// half) finds the whole digest.
    sha512: BTreeMap<[u8; 64], u32>,
    /// Keyed (SipHash): digests of content a client chose must not be able to crowd one
    /// bucket.
    hasher: RandomState,
    /// The least recently used node, evicted first.
    head: u32,
    /// The most recently used node.
    tail: u32,
    /// The last entry the scan inserted and that has not been used since: the next scanned
    /// entry (a more recent one) goes right after it, before everything used since the
    /// start. [`NIL`]: before the head.
    scan_tail: u32,
    bytes: u64,
    len: u64,
    /// While the scan runs: blobs deleted or forgotten since the start, which the scan may
    /// have found before and must not bring back. Few: only what a request evicted or an
    /// admin removed in those seconds.
    gone: Option<HashSet<Key>>,
    /// Digests the eviction passes over (`cache::pins`), indexed or not yet arrived.
    pinned: HashSet<Key>,
    /// Bytes of the indexed entries that are pinned.
    pinned_bytes: u64,
}

impl Lru {
    fn new() -> Lru {
        Lru {
            nodes: Vec::new(),
            free: NIL,
            sha256: HashTable::new(),
            sha512: BTreeMap::new(),
            hasher: RandomState::new(),
            head: NIL,
            tail: NIL,
            scan_tail: NIL,
            bytes: 0,
            len: 0,
            gone: Some(HashSet::new()),
            pinned: HashSet::new(),
            pinned_bytes: 0,
        }
    }

    fn is_pinned(&self, key: &Key) -> bool {
        !self.pinned.is_empty() && self.pinned.contains(key)
    }

    fn find(&self, key: &Key) -> Option<u32> {
        match key {
            Key::Sha256(k) => {
                let nodes = &self.nodes;
                self.sha256
                    .find(self.hasher.hash_one(k), |&i| nodes[i as usize].key == *k)
                    .copied()
            }
            Key::Sha512(k) => self.sha512.get(k).copied(),
        }
    }

    /// The key of node `i`.
    fn key_of(&self, i: u32) -> Key {
        let node = &self.nodes[i as usize];
        if node.size & SHA512 == 0 {
            return Key::Sha256(node.key);
        }
        let mut from = [0; 64];
        from[..32].copy_from_slice(&node.key);
        let (k, _) = self
            .sha512
            .range(from..)
            .take_while(|(k, _)| k[..32] == node.key)
            .find(|(_, &j)| j == i)
            .expect("a sha512 node is in the sha512 map");
        Key::Sha512(*k)
    }

    /// Adds a node for an absent `key`, unlinked, and returns it.
    fn add(&mut self, key: Key, size: u64) -> u32 {
        let (short, flag) = match &key {
            Key::Sha256(k) => (*k, 0),
            Key::Sha512(k) => (k[..32].try_into().expect("32 bytes"), SHA512),
        };
        let node = Node {
            key: short,
            size: size.min(!SHA512) | flag,
            prev: NIL,
            next: NIL,
        };
        let i = if self.free != NIL {
            let i = self.free;
            self.free = self.nodes[i as usize].next;
            self.nodes[i as usize] = node;
            i
        } else {
            assert!(self.nodes.len() < NIL as usize, "more than 4 billion blobs");
            self.nodes.push(node);
            (self.nodes.len() - 1) as u32
        };
        match key {
            Key::Sha256(k) => {
                let (nodes, hasher) = (&self.nodes, &self.hasher);
                self.sha256.insert_unique(hasher.hash_one(k), i, |&j| {
                    hasher.hash_one(nodes[j as usize].key)
                });
            }
            Key::Sha512(k) => {
                self.sha512.insert(k, i);
            }
        }
        self.bytes += size.min(!SHA512);
        self.len += 1;
        if self.is_pinned(&key) {
            self.pinned_bytes += size.min(!SHA512);
        }
        i
    }

    /// Removes node `i` (linked) from the list and the tables, and frees it.
    fn remove(&mut self, i: u32) -> Key {
        let key = self.key_of(i);
        self.unlink(i);
        match &key {
            Key::Sha256(k) => {
                let nodes = &self.nodes;
                if let Ok(e) = self
                    .sha256
                    .find_entry(self.hasher.hash_one(k), |&j| nodes[j as usize].key == *k)
                {
                    e.remove();
                }
            }
            Key::Sha512(k) => {
                self.sha512.remove(k);
            }
        }
        if self.is_pinned(&key) {
            self.pinned_bytes -= self.nodes[i as usize].bytes();
        }
        let node = &mut self.nodes[i as usize];
        self.bytes -= node.bytes();
        self.len -= 1;
        node.size = 0;
        node.next = self.free;
        self.free = i;
        key
    }

    fn unlink(&mut self, i: u32) {
        if self.scan_tail == i {
            // Everything before the scan's tail is scanned and unused since.
            self.scan_tail = self.nodes[i as usize].prev;
        }
        let Node { prev, next, .. } = self.nodes[i as usize];
        match prev {
            NIL => self.head = next,
            p => self.nodes[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.nodes[n as usize].prev = prev,
        }
        let node = &mut self.nodes[i as usize];
        node.prev = NIL;
        node.next = NIL;
    }

    /// Links unlinked node `i` right after `after` ([`NIL`]: at the head).
    fn link_after(&mut self, i: u32, after: u32) {
        let next = match after {
            NIL => self.head,
            a => self.nodes[a as usize].next,
        };
        self.nodes[i as usize].prev = after;
        self.nodes[i as usize].next = next;
        match after {
            NIL => self.head = i,
            a => self.nodes[a as usize].next = i,
        }
        match next {
            NIL => self.tail = i,
            n => self.nodes[n as usize].prev = i,
        }
    }

    /// Makes node `i` (linked) the most recently used.
    fn make_recent(&mut self, i: u32) {
        if self.tail != i {
            self.unlink(i);
            self.link_after(i, self.tail);
        } else if self.scan_tail == i {
            // Used since the start now: the next scanned entry goes before it.
            self.scan_tail = self.nodes[i as usize].prev;
        }
    }

    /// Evicts from the least recently used end until `max` bytes fit, passing over pinned
    /// entries; returns whether it stopped over `max` (what is left is all pinned).
    fn evict_over(&mut self, max: u64, evicted: &mut Vec<Key>) -> bool {
        // Each pinned entry is moved at most once before the loop meets a moved one again,
        // which it can only do once every entry left is pinned.
        let mut passed = 0;
        while self.bytes > max && self.head != NIL {
            let head = self.head;
            if self.is_pinned(&self.key_of(head)) {
                if passed >= self.len {
                    break;
                }
                passed += 1;
                self.make_recent(head);
                continue;
            }
            evicted.push(self.remove(head));
        }
        self.bytes > max
    }

    /// Replaces the pinned set and recounts the pinned bytes.
    fn set_pinned(&mut self, pinned: HashSet<Key>) {
        self.pinned = pinned;
        let mut bytes = 0;
        for key in &self.pinned {
            if let Some(i) = self.find(key) {
                bytes += self.nodes[i as usize].bytes();
            }
        }
        self.pinned_bytes = bytes;
    }

    /// Notes, while the scan runs, that `key`'s file is gone.
    fn note_gone(&mut self, key: Key) {
        if let Some(gone) = &mut self.gone {
            gone.insert(key);
        }
    }

    /// Keys from the least to the most recently used.
    fn keys(&self) -> Vec<Key> {
        let mut out = Vec::with_capacity(self.len as usize);
        let mut i = self.head;
        while i != NIL {
            out.push(self.key_of(i));
            i = self.nodes[i as usize].next;
        }
        out
    }
}

/// The index: cheap to clone (the scan thread holds one).
#[derive(Clone)]
pub struct Index {
    inner: Arc<Inner>,
}

struct Inner {
    lru: Mutex<Lru>,
    max_size: u64,
    /// Where evicted blobs are deleted.
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    /// Whether the start's scan has inserted everything it found.
    scan_done: AtomicBool,
    /// Blobs the start's scan has found so far.
    scanned: AtomicU64,
    /// Whether the last eviction stopped over the bound with only pinned blobs left.
    over_bound: AtomicBool,
}

impl Index {
    /// An empty index, its scan not done (see [`Scan`]).
    pub fn new(max_size: u64, store: Arc<Store>, metrics: Arc<Metrics>) -> Index {
        metrics.index_scan_done.set(0);
        metrics.index_scanned_blobs.set(0);
        Index {
            inner: Arc::new(Inner {
                lru: Mutex::new(Lru::new()),
                max_size,
                store,
                metrics,
                scan_done: AtomicBool::new(false),
                scanned: AtomicU64::new(0),
                over_bound: AtomicBool::new(false),
            }),
        }
    }

    /// Records a blob (newly committed or found on disk by a request) as the most recently
    /// used, and evicts what no longer fits.
    pub fn insert(&self, digest: Digest, size: u64) {
        let key = Key::of(&digest);
        let mut evicted = Vec::new();
        {
            let mut lru = self.inner.lru.lock().unwrap();
            match lru.find(&key) {
                Some(i) => {
                    let node = &mut lru.nodes[i as usize];
                    let old = node.bytes();
                    node.size = (node.size & SHA512) | size.min(!SHA512);
                    lru.bytes = lru.bytes - old + size.min(!SHA512);
                    if lru.is_pinned(&key) {
                        lru.pinned_bytes = lru.pinned_bytes - old + size.min(!SHA512);
                    }
                    lru.make_recent(i);
                }
                None => {
                    let i = lru.add(key, size);
                    let tail = lru.tail;
                    lru.link_after(i, tail);
                }
            }
            let over = lru.evict_over(self.inner.max_size, &mut evicted);
            for key in &evicted {
                lru.note_gone(*key);
            }
            self.note_bound(&lru, over);
        }
        self.delete(evicted);
    }

    /// Inserts entries found by the scan, oldest first, each only if absent, before
    /// everything used since the start; then evicts what no longer fits.
    fn insert_scanned(&self, batch: impl Iterator<Item = (Key, u64)>) {
        let mut evicted = Vec::new();
        {
            let mut lru = self.inner.lru.lock().unwrap();
            for (key, size) in batch {
                let gone = lru.gone.as_ref().is_some_and(|g| g.contains(&key));
                if gone || lru.find(&key).is_some() {
                    continue;
                }
                let i = lru.add(key, size);
                let after = lru.scan_tail;
                lru.link_after(i, after);
                lru.scan_tail = i;
            }
            let over = lru.evict_over(self.inner.max_size, &mut evicted);
            self.note_bound(&lru, over);
        }
        self.delete(evicted);
    }

    /// After an eviction: the pinned bytes, and whether pins alone exceed the bound (said
    /// once in the log when it starts, in the gauges always).
    fn note_bound(&self, lru: &Lru, over: bool) {
        let metrics = &self.inner.metrics;
        metrics.pinned_bytes.set(lru.pinned_bytes as i64);
        metrics.pins_over_bound.set(over as i64);
        if over && !self.inner.over_bound.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                pinned_bytes = lru.pinned_bytes,
                max_size = self.inner.max_size,
                "pinned images alone exceed cache.max_size: only unpinned blobs are evicted"
            );
        } else if !over && self.inner.over_bound.swap(false, Ordering::Relaxed) {
            tracing::info!("the cache is back under cache.max_size");
        }
    }

    /// Makes `digests` the pinned set: never evicted from now on, even those not yet
    /// indexed (once they arrive). What it no longer holds is evicted if over the bound.
    pub fn set_pinned(&self, digests: impl IntoIterator<Item = Digest>) {
        let pinned = digests.into_iter().map(|d| Key::of(&d)).collect();
        let mut evicted = Vec::new();
        {
            let mut lru = self.inner.lru.lock().unwrap();
            lru.set_pinned(pinned);
            let over = lru.evict_over(self.inner.max_size, &mut evicted);
            for key in &evicted {
                lru.note_gone(*key);
            }
            self.note_bound(&lru, over);
        }
        self.delete(evicted);
    }

    pub fn is_pinned(&self, digest: &Digest) -> bool {
        let key = Key::of(digest);
        self.inner.lru.lock().unwrap().is_pinned(&key)
    }

    /// The bytes of pinned blobs indexed, and whether they alone exceed the bound.
    pub fn pinned_usage(&self) -> (u64, bool) {
        let bytes = self.inner.lru.lock().unwrap().pinned_bytes;
        (bytes, self.inner.over_bound.load(Ordering::Relaxed))
    }

    /// The size of an indexed blob.
    pub fn size_of(&self, digest: &Digest) -> Option<u64> {
        let key = Key::of(digest);
        let lru = self.inner.lru.lock().unwrap();
        lru.find(&key).map(|i| lru.nodes[i as usize].bytes())
    }

    /// The bound (`cache.max_size`).
    pub fn max_size(&self) -> u64 {
        self.inner.max_size
    }

    /// Evicts least recently used, unpinned blobs until at most `target` bytes are indexed
    /// (the server's `gc`: beside fills, through the index). Returns the blobs and bytes
    /// removed.
    pub fn shrink_to(&self, target: u64) -> (u64, u64) {
        let mut evicted = Vec::new();
        let freed = {
            let mut lru = self.inner.lru.lock().unwrap();
            let before = lru.bytes;
            lru.evict_over(target, &mut evicted);
            for key in &evicted {
                lru.note_gone(*key);
            }
            let over = lru.bytes > self.inner.max_size;
            self.note_bound(&lru, over);
            before - lru.bytes
        };
        let removed = evicted.len() as u64;
        self.delete(evicted);
        (removed, freed)
    }

    /// Deletes evicted blobs, outside the lock.
    fn delete(&self, evicted: Vec<Key>) {
        for key in evicted {
            let digest = key.digest();
            tracing::debug!(%digest, "evicted");
            self.inner.metrics.evictions.inc();
            self.inner.store.remove(&digest);
        }
    }

    /// Refreshes recency on a hit.
    pub fn touch(&self, digest: &Digest) {
        let key = Key::of(digest);
        let mut lru = self.inner.lru.lock().unwrap();
        if let Some(i) = lru.find(&key) {
            lru.make_recent(i);
        }
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        let key = Key::of(digest);
        self.inner.lru.lock().unwrap().find(&key).is_some()
    }

    /// Forgets a blob without deleting its file (the caller has).
    pub fn forget(&self, digest: &Digest) {
        let key = Key::of(digest);
        let mut lru = self.inner.lru.lock().unwrap();
        if let Some(i) = lru.find(&key) {
            lru.remove(i);
        }
        lru.note_gone(key);
    }

    /// Bytes and entries indexed.
    pub fn usage(&self) -> (u64, u64) {
        let lru = self.inner.lru.lock().unwrap();
        (lru.bytes, lru.len)
    }

    /// Digests from the least to the most recently used (for tests and tools: it copies the
    /// whole order).
    pub fn recency(&self) -> Vec<Digest> {
        let keys = self.inner.lru.lock().unwrap().keys();
        keys.iter().map(Key::digest).collect()
    }

    /// Whether the start's scan is done: until then, blobs on disk may be missing from the
    /// index (a request still finds them) and the bound may not hold yet.
    pub fn scan_done(&self) -> bool {
        self.inner.scan_done.load(Ordering::Acquire)
    }

    /// Blobs the start's scan has found so far.
    pub fn scanned(&self) -> u64 {
        self.inner.scanned.load(Ordering::Relaxed)
    }

    fn add_scanned(&self, n: u64) {
        let total = self.inner.scanned.fetch_add(n, Ordering::Relaxed) + n;
        self.inner.metrics.index_scanned_blobs.set(total as i64);
    }
}

/// A blob found by the scan, sha256 (nearly all of them): 48 bytes, so that a million cost
/// 48 MB while the scan runs, freed when it ends.
struct Found256 {
    modified: u64,
    size: u64,
    key: [u8; 32],
}

/// The rebuild of an index from its store, run once at start (see the module docs).
pub struct Scan {
    index: Index,
    store: Arc<Store>,
    batch: usize,
    gate: Option<SyncSender<u64>>,
}

impl Scan {
    pub fn new(index: Index, store: Arc<Store>) -> Scan {
        Scan {
            index,
            store,
            batch: SCAN_BATCH,
            gate: None,
        }
    }

    /// Entries per batch (walked, then inserted): the unit of progress and of locking.
    pub fn batch(mut self, n: usize) -> Scan {
        self.batch = n.max(1);
        self
    }

    /// After each batch, the scan sends the number of blobs found so far on `gate` and
    /// waits until it is received (a rendezvous channel lets a test step the scan); once
    /// the receiver is dropped, the scan runs freely.
    pub fn gate(mut self, gate: SyncSender<u64>) -> Scan {
        self.gate = Some(gate);
        self
    }

    /// Runs the scan on a thread of its own: it blocks on the disk for seconds at a million
    /// blobs, which is no job for the runtime's blocking pool.
    pub fn spawn(self) -> std::thread::JoinHandle<()> {
        std::thread::Builder::new()
            .name("index-scan".into())
            .spawn(move || self.run())
            .expect("spawning the index scan thread")
    }

    /// Runs the scan to its end on this thread.
    pub fn run(mut self) {
        let started = crate::clock::Instant::now();
        let mut sha256: Vec<Found256> = Vec::new();
        let mut sha512: Vec<(u64, u64, [u8; 64])> = Vec::new();
        let mut pending = 0;
        let index = self.index.clone();
        let batch = self.batch;
        let gate = &mut self.gate;
        let walked = self.store.walk(|blob| {
            let Some(digest) = blob.digest() else {
                return Ok(());
            };
            let entry = Entry {
                digest,
                size: blob.size,
                modified: blob.modified,
            };
            let modified = entry
                .modified
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos().min(u64::MAX as u128) as u64)
                .unwrap_or(0);
            match Key::of(&entry.digest) {
                Key::Sha256(key) => sha256.push(Found256 {
                    modified,
                    size: entry.size,
                    key,
                }),
                Key::Sha512(key) => sha512.push((modified, entry.size, key)),
            }
            pending += 1;
            if pending == batch {
                index.add_scanned(pending as u64);
                pending = 0;
                step(gate, index.scanned());
            }
            Ok(())
        });
        if let Err(e) = walked {
            tracing::warn!(error = %e, "the index scan stopped early");
        }
        index.add_scanned(pending as u64);
        sha256.sort_unstable_by_key(|f| f.modified);
        sha512.sort_unstable_by_key(|f| f.0);
        {
            // Room for all at once: no rehash, and no vector that doubles past its need.
            let mut lru = index.inner.lru.lock().unwrap();
            let Lru {
                nodes,
                sha256: table,
                hasher,
                ..
            } = &mut *lru;
            table.reserve(sha256.len(), |&j| hasher.hash_one(nodes[j as usize].key));
            nodes.reserve(sha256.len() + sha512.len());
        }
        // Oldest first, merging the two sorted lists.
        let mut a = sha256.iter().peekable();
        let mut b = sha512.iter().peekable();
        let mut merged = std::iter::from_fn(|| match (a.peek(), b.peek()) {
            (Some(x), Some(y)) if y.0 < x.modified => b.next().map(|y| (Key::Sha512(y.2), y.1)),
            (Some(_), _) => a.next().map(|x| (Key::Sha256(x.key), x.size)),
            (None, _) => b.next().map(|y| (Key::Sha512(y.2), y.1)),
        })
        .peekable();
        while merged.peek().is_some() {
            index.insert_scanned(merged.by_ref().take(batch));
            step(gate, index.scanned());
        }
        drop(merged);
        drop(sha256);
        drop(sha512);
        index.inner.lru.lock().unwrap().gone = None;
        index.inner.scan_done.store(true, Ordering::Release);
        index.inner.metrics.index_scan_done.set(1);
        let (bytes, entries) = index.usage();
        tracing::info!(
            scanned = index.scanned(),
            entries,
            bytes,
            ms = started.elapsed().as_millis() as u64,
            "index rebuilt"
        );
    }
}

/// Hands progress to the gate, if any, and waits for it to be taken.
fn step(gate: &mut Option<SyncSender<u64>>, scanned: u64) {
    if let Some(tx) = gate {
        if tx.send(scanned).is_err() {
            *gate = None;
        }
    }
}

#[cfg(test)]
mod tests;
