//! The local tier, always present and always first: the content-addressed store on disk
//! (`store`) and the LRU index over it (`index`). Blobs are served from it directly (and
//! fills write into it); as a [`Tier`] it answers what the cache asks of every tier.

pub mod index;
pub mod store;

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt};

use super::source::Source;
use super::tier::Record;
use super::tier::{Tier, TierBody};
use crate::reference::Digest;
use index::Index;
use store::Store;

/// Records are small: a larger one is not ours.
const MAX_RECORD: u64 = 64 << 10;

/// The disk store with its index.
pub struct Local {
    pub store: Arc<Store>,
    pub index: Index,
}

impl Local {
    /// Runs `f` on the store on a blocking thread.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(io::Error::other)?
    }
}

impl Tier for Local {
    fn name(&self) -> &'static str {
        "local"
    }

    fn get_blob<'a>(&'a self, digest: &'a Digest) -> BoxFuture<'a, Option<TierBody>> {
        async move {
            let d = digest.clone();
            let (file, size) = self.blocking(move |s| s.open_blob(&d)).await.ok()??;
            self.index.touch(digest);
            let body = Source::committed(file, size, None)
                .reader(0, size)
                .into_stream();
            Some((size, body))
        }
        .boxed()
    }

    fn head_blob<'a>(&'a self, digest: &'a Digest) -> BoxFuture<'a, Option<u64>> {
        async move {
            let d = digest.clone();
            let (_, size) = self.blocking(move |s| s.open_blob(&d)).await.ok()??;
            Some(size)
        }
        .boxed()
    }

    fn discard<'a>(&'a self, digest: &'a Digest) -> BoxFuture<'a, ()> {
        async move {
            self.store.remove(digest);
            self.index.forget(digest);
        }
        .boxed()
    }

    fn get_manifest<'a>(
        &'a self,
        digest: &'a Digest,
        max: u64,
    ) -> BoxFuture<'a, Option<(Bytes, Option<String>)>> {
        async move {
            let d = digest.clone();
            let found = self
                .blocking(move |s| {
                    let Some(media_type) = s.media_type(&d) else {
                        return Ok(None);
                    };
                    match std::fs::read(s.blob_path(&d)) {
                        Ok(bytes) if bytes.len() as u64 <= max => {
                            Ok(Some((Bytes::from(bytes), Some(media_type))))
                        }
                        Ok(_) => Ok(None),
                        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                        Err(e) => Err(e),
                    }
                })
                .await;
            match found {
                Ok(Some(m)) => {
                    self.index.touch(digest);
                    Some(m)
                }
                Ok(None) => None,
                Err(e) => {
                    tracing::warn!(%digest, error = %e, "could not read a cached manifest");
                    None
                }
            }
        }
        .boxed()
    }

    fn put_manifest<'a>(
        &'a self,
        digest: &'a Digest,
        bytes: Bytes,
        media_type: &'a str,
    ) -> BoxFuture<'a, io::Result<()>> {
        async move {
            let (d, mt, len) = (digest.clone(), media_type.to_string(), bytes.len() as u64);
            self.blocking(move |s| s.put_manifest(&d, &bytes, &mt))
                .await?;
            self.index.insert(digest.clone(), len);
            Ok(())
        }
        .boxed()
    }

    fn get_record<'a>(&'a self, record: &'a Record) -> BoxFuture<'a, Option<Bytes>> {
        async move {
            let path = self.store.root().join(record.local_path());
            let bytes = tokio::fs::read(path).await.ok()?;
            (bytes.len() as u64 <= MAX_RECORD).then(|| Bytes::from(bytes))
        }
        .boxed()
    }

    fn put_record<'a>(
        &'a self,
        record: &'a Record,
        bytes: Vec<u8>,
    ) -> BoxFuture<'a, io::Result<()>> {
        async move {
            let path = self.store.root().join(record.local_path());
            self.blocking(move |s| s.write_atomic(&path, &bytes)).await
        }
        .boxed()
    }

    fn touch(&self, digest: &Digest) {
        self.index.touch(digest);
    }

    fn purge<'a>(&'a self, digest: &'a Digest) -> BoxFuture<'a, ()> {
        self.discard(digest)
    }

    fn remove_record<'a>(&'a self, record: &'a Record) -> BoxFuture<'a, ()> {
        async move {
            let path = self.store.root().join(record.local_path());
            let _ = tokio::fs::remove_file(path).await;
        }
        .boxed()
    }
}
