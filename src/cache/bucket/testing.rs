//! Test support for the bucket's unit tests: tiers on one in-memory store whose clock is the
//! library's (`crate::clock`), so that leases, back-off and GC are tested under paused time.
//!
//! object_store's `InMemory` stamps Last-Modified with the system clock, which a paused
//! tokio clock does not move: a lease written after `advance` would look as old as the test.
//! [`TestStore`] keeps the stamps by `clock::now()`, as a real store's would move beside a
//! real clock. Each replica gets its own view of the one store ([`TestStore::view`]) with a
//! switch that makes its calls hang ([`TestStore::hang`]): a replica that stalls.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMode,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, UploadPart,
};
use tokio::sync::watch;

use super::Bucket;
use crate::clock;
use crate::metrics::Metrics;

/// When each object was last written, by the library's clock.
type Stamps = Arc<Mutex<HashMap<Path, DateTime<Utc>>>>;

/// One replica's view of an in-memory store shared by all views.
pub struct TestStore {
    inner: Arc<InMemory>,
    stamps: Stamps,
    /// While `true`, this view's calls wait (a replica whose calls stall).
    hung: watch::Sender<bool>,
    /// While `true`, this view's writes are done but their answers wait (a slow network:
    /// the caller times out on a write that landed).
    answers_hung: watch::Sender<bool>,
    /// Does the store honour `PutMode::Create` (`If-None-Match: *`)? If not, it overwrites.
    if_none_match: bool,
    /// Does the store honour `PutMode::Update` (`If-Match`)? If not, it overwrites.
    if_match: bool,
    /// Every path written through any view, in order (tests count writes).
    writes: Arc<Mutex<Vec<String>>>,
}

impl TestStore {
    pub fn new() -> Arc<TestStore> {
        TestStore::with_conditions(true, true)
    }

    /// A store that honours conditional creates, updates, both or neither (as S3 stores
    /// differ); one that does not overwrites instead, as they do.
    pub fn with_conditions(if_none_match: bool, if_match: bool) -> Arc<TestStore> {
        Arc::new(TestStore {
            inner: Arc::new(InMemory::new()),
            stamps: Stamps::default(),
            hung: watch::Sender::new(false),
            answers_hung: watch::Sender::new(false),
            if_none_match,
            if_match,
            writes: Arc::default(),
        })
    }

    /// Another view of the same objects, with its own `hang` switch.
    pub fn view(&self) -> Arc<TestStore> {
        Arc::new(TestStore {
            inner: self.inner.clone(),
            stamps: self.stamps.clone(),
            hung: watch::Sender::new(false),
            answers_hung: watch::Sender::new(false),
            if_none_match: self.if_none_match,
            if_match: self.if_match,
            writes: self.writes.clone(),
        })
    }

    /// How many writes (PUTs) were made under `prefix`, through every view.
    pub fn writes_under(&self, prefix: &str) -> usize {
        let writes = self.writes.lock().unwrap();
        writes.iter().filter(|p| p.starts_with(prefix)).count()
    }

    /// Makes this view's calls wait (from their start) until `hang(false)`.
    pub fn hang(&self, hung: bool) {
        self.hung.send_replace(hung);
    }

    /// Makes this view's writes land, but their answers wait until `hang_answers(false)`.
    pub fn hang_answers(&self, hung: bool) {
        self.answers_hung.send_replace(hung);
    }

    async fn ready(&self) {
        let mut rx = self.hung.subscribe();
        let _ = rx.wait_for(|hung| !hung).await;
    }

    fn stamp(&self, location: &Path) {
        let now = DateTime::<Utc>::from(clock::now());
        self.stamps.lock().unwrap().insert(location.clone(), now);
    }

    fn restamp(stamps: &Stamps, mut meta: ObjectMeta) -> ObjectMeta {
        if let Some(t) = stamps.lock().unwrap().get(&meta.location) {
            meta.last_modified = *t;
        }
        meta
    }
}

impl fmt::Debug for TestStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TestStore")
    }
}

impl fmt::Display for TestStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TestStore")
    }
}

#[async_trait]
impl ObjectStore for TestStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        mut opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.ready().await;
        let ignored = match opts.mode {
            PutMode::Create => !self.if_none_match,
            PutMode::Update(_) => !self.if_match,
            PutMode::Overwrite => false,
        };
        if ignored {
            opts.mode = PutMode::Overwrite;
        }
        let done = self.inner.put_opts(location, payload, opts).await?;
        self.writes.lock().unwrap().push(location.to_string());
        self.stamp(location);
        let mut rx = self.answers_hung.subscribe();
        let _ = rx.wait_for(|hung| !hung).await;
        Ok(done)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.ready().await;
        let upload = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(Upload {
            upload,
            location: location.clone(),
            stamps: self.stamps.clone(),
        }))
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.ready().await;
        let mut got = self.inner.get_opts(location, options).await?;
        got.meta = Self::restamp(&self.stamps, got.meta);
        Ok(got)
    }

    async fn delete(&self, location: &Path) -> object_store::Result<()> {
        self.ready().await;
        self.inner.delete(location).await?;
        self.stamps.lock().unwrap().remove(location);
        Ok(())
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let (inner, stamps, prefix) = (self.inner.clone(), self.stamps.clone(), prefix.cloned());
        let mut hung = self.hung.subscribe();
        futures_util::stream::once(async move {
            let _ = hung.wait_for(|hung| !hung).await;
        })
        .flat_map(move |()| inner.list(prefix.as_ref()))
        .map_ok(move |m| Self::restamp(&stamps, m))
        .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.ready().await;
        let mut listed = self.inner.list_with_delimiter(prefix).await?;
        listed.objects = listed
            .objects
            .into_iter()
            .map(|m| Self::restamp(&self.stamps, m))
            .collect();
        Ok(listed)
    }

    async fn copy(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.ready().await;
        self.inner.copy(from, to).await?;
        self.stamp(to);
        Ok(())
    }

    async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.ready().await;
        self.inner.copy_if_not_exists(from, to).await?;
        self.stamp(to);
        Ok(())
    }
}

/// A multipart upload that stamps its object when it completes.
#[derive(Debug)]
struct Upload {
    upload: Box<dyn MultipartUpload>,
    location: Path,
    stamps: Stamps,
}

#[async_trait]
impl MultipartUpload for Upload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        self.upload.put_part(data)
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        let done = self.upload.complete().await?;
        let now = DateTime::<Utc>::from(clock::now());
        self.stamps
            .lock()
            .unwrap()
            .insert(self.location.clone(), now);
        Ok(done)
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.upload.abort().await
    }
}

/// A tier on `store` (a 5 s call timeout, a 5 s `lease_wait`), as a replica would open it.
pub fn tier(store: &Arc<TestStore>, lease_ttl: Duration, max_size: u64) -> Arc<Bucket> {
    Arc::new(Bucket::new(
        store.clone(),
        "mirror/",
        Duration::from_secs(5),
        Duration::from_secs(5),
        lease_ttl,
        max_size,
        Arc::new(Metrics::new()),
    ))
}

/// The keys under `prefix`, sorted.
pub async fn keys(store: &TestStore, prefix: &str) -> Vec<String> {
    let prefix = Path::from(prefix);
    let mut keys: Vec<String> = store
        .list(Some(&prefix))
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap();
    keys.sort();
    keys
}
