//! Blobs, manifests and tag records in the bucket: get, put, head, discard, presigned URLs,
//! and the `recent/` markers that record a blob's last use for the GC.

use std::io;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use object_store::{Attribute, Attributes, PutOptions, PutPayload};

use super::{Bucket, Fault};
use crate::cache::tier::Record;
use crate::clock::Instant;
use crate::reference::Digest;

/// A replica marks a blob as used in the bucket at most this often.
const TOUCH_EVERY: Duration = Duration::from_secs(600);
/// The largest tag list or referrers answer read back from the bucket (a hundred thousand
/// tags fit).
const MAX_LIST: u64 = 16 << 20;
/// Lifetime of a presigned URL.
const PRESIGN_FOR: Duration = Duration::from_secs(900);
impl Bucket {
    /// The blob from the bucket, as a stream, with its size.
    pub async fn get_blob(
        &self,
        d: &Digest,
    ) -> Option<(
        u64,
        futures_util::stream::BoxStream<'static, io::Result<Bytes>>,
    )> {
        let path = self.path("blobs", d);
        match self.call("get_blob", self.store.get(&path)).await {
            Ok(got) => {
                self.count("get_blob", "hit");
                self.present.insert(d.clone(), ());
                self.touch(d);
                let size = got.meta.size;
                let body = got.into_stream().map_err(io::Error::other).boxed();
                Some((size, body))
            }
            Err(Fault::Absent) => {
                self.count("get_blob", "miss");
                None
            }
            Err(_) => None,
        }
    }

    /// The size of the blob in the bucket, if it is there.
    pub async fn head_blob(&self, d: &Digest) -> Option<u64> {
        let path = self.path("blobs", d);
        let size = self
            .call("head_blob", self.store.head(&path))
            .await
            .ok()
            .map(|m| m.size)?;
        self.present.insert(d.clone(), ());
        Some(size)
    }

    /// Deletes a blob that proved wrong (bit rot, or someone wrote it behind our back).
    pub async fn discard(&self, d: &Digest) {
        tracing::error!(%d, "the shared store's copy does not match its digest: deleted");
        self.present.invalidate(d);
        let path = self.path("blobs", d);
        let _ = self.call("discard", self.store.delete(&path)).await;
    }

    /// Deletes a blob or manifest an operator purged (`purge_shared`): every replica
    /// fetches it again on its next miss.
    pub async fn purge(&self, d: &Digest) {
        tracing::info!(%d, "purged from the shared store");
        self.present.invalidate(d);
        let path = self.path("blobs", d);
        let _ = self.call("purge", self.store.delete(&path)).await;
    }

    /// Deletes a record an operator purged (`purge_shared`).
    pub async fn delete_record(&self, record: &Record) {
        let path = self.record_path(record);
        let _ = self.call("delete_tag", self.store.delete(&path)).await;
    }

    /// Stores a verified manifest (small: one PUT), with its media type.
    pub async fn put_manifest(&self, d: &Digest, bytes: Bytes, media_type: &str) {
        let path = self.path("blobs", d);
        let put = self.store.put_opts(
            &path,
            PutPayload::from(bytes),
            PutOptions {
                attributes: attributes(Some(media_type)),
                ..Default::default()
            },
        );
        let _ = self.call("put_manifest", put).await;
    }

    /// A manifest from the bucket, up to `max` bytes (the caller verifies its digest), and
    /// its media type if the store kept it.
    pub async fn get_manifest(&self, d: &Digest, max: u64) -> Option<(Bytes, Option<String>)> {
        let path = self.path("blobs", d);
        let got = self
            .call("get_manifest", self.store.get(&path))
            .await
            .ok()?;
        if got.meta.size > max {
            return None;
        }
        let media_type = got
            .attributes
            .get(&Attribute::ContentType)
            .map(|v| v.to_string());
        let bytes = self.call("get_manifest", got.bytes()).await.ok()?;
        self.touch(d);
        Some((bytes, media_type))
    }

    /// Keeps a record (a tag's, a repository's last good tag list, a digest's last good
    /// referrers) for the other replicas: one PUT. (`op` is `put_tag` for all of them.)
    pub async fn put_record_object(&self, record: &Record, bytes: Vec<u8>) {
        let path = self.record_path(record);
        let put = self.store.put(&path, PutPayload::from(bytes));
        let _ = self.call("put_tag", put).await;
    }

    /// A record whole, or `None` when it is missing, unreadable or larger than a record of
    /// its kind can be (a tag record is tiny; a list or a referrers index can be long).
    pub async fn get_record_object(&self, record: &Record) -> Option<Bytes> {
        let max = match record {
            Record::Tag(_) => 64 << 10,
            Record::TagList(_) | Record::Referrers(_) => MAX_LIST,
        };
        let path = self.record_path(record);
        let got = self.call("get_tag", self.store.get(&path)).await.ok()?;
        if got.meta.size > max {
            return None;
        }
        self.call("get_tag", got.bytes()).await.ok()
    }

    /// Marks `d` as used, for the GC's order (at most every `TOUCH_EVERY` per replica).
    pub fn touch(&self, d: &Digest) {
        let recent = self
            .touched
            .get(d)
            .is_some_and(|t| t.elapsed() < TOUCH_EVERY);
        if recent || !self.available() {
            return;
        }
        self.touched.insert(d.clone(), Instant::now());
        let store = self.store.clone();
        let path = self.path("recent", d);
        let timeout = self.timeout;
        tokio::spawn(async move {
            let _ = tokio::time::timeout(timeout, store.put(&path, PutPayload::default())).await;
        });
    }

    /// A presigned GET URL of blob `d`, if the bucket holds it. `known_only`: only if this
    /// replica saw it there lately (it uploaded, read or found it), without asking the store.
    pub async fn presigned(&self, d: &Digest, known_only: bool) -> Option<url::Url> {
        let signer = self.signer.as_ref()?;
        if known_only {
            self.present.get(d)?;
        } else {
            self.head_blob(d).await?;
        }
        let path = self.path("blobs", d);
        let url = self
            .call(
                "presign",
                signer.signed_url(http::Method::GET, &path, PRESIGN_FOR),
            )
            .await
            .ok()?;
        self.touch(d);
        Some(url)
    }
}

pub(super) fn attributes(media_type: Option<&str>) -> Attributes {
    let mut attrs = Attributes::new();
    if let Some(mt) = media_type {
        attrs.insert(Attribute::ContentType, mt.to_string().into());
    }
    attrs
}
