//! Tags: a record maps a tag to a digest with the time the upstream last confirmed it;
//! within `tag_ttl` it is answered with no upstream contact, after it revalidated with a
//! `HEAD`; stale-if-error when the upstream fails. Records are shared with other replicas.

use super::*;

impl Manifests {
    pub(super) async fn by_tag(
        &self,
        up: &Arc<Upstream>,
        name: &Name,
        tag: &Tag,
        accept: Option<&str>,
    ) -> Result<Answer<Arc<Manifest>>, Error> {
        let record = self.tag_record(TagKeyRef::new(&up.name, name, tag)).await;
        let usable = match &record {
            Some(r) if accepts(accept, &r.media_type) => {
                self.cached(&r.digest).await?.map(|m| (r.clone(), m))
            }
            _ => None,
        };
        match &usable {
            Some((r, m)) if !self.offline && self.clock.age(r.confirmed) < up.tag_ttl => {
                self.metrics.hit("tag");
                return Ok(Answer::hit(m.clone()));
            }
            _ => {}
        }
        // Past the hit: the owned key (three copies of strings) is made only from here.
        let key: TagKey = (up.name.clone(), name.clone(), tag.clone());
        if self.offline {
            if let Some((_, m)) = usable {
                return Ok(Answer::hit(m));
            }
            // What another replica recorded in the shared tier, whatever its age.
            return match self.shared_tag(&key, accept, Duration::MAX).await {
                Some(m) => Ok(Answer::hit(m)),
                None => Err(unknown_offline()),
            };
        }
        self.metrics.miss("tag");
        let flight = (key.clone(), accept.unwrap_or_default().to_string());
        self.tag_flights
            .run(flight, || async {
                // With peers, the replica responsible for the tag answers for all (it looks
                // in the shared tier itself, and revalidates the tag once for all).
                let reference = Reference::Tag(tag.clone());
                if let Some(m) = self.resolved_by_peer(up, name, &reference, accept).await {
                    let outcome = match &usable {
                        Some((r, _)) if r.digest == m.digest => Outcome::Revalidated,
                        _ => Outcome::Miss,
                    };
                    return Ok(Answer { value: m, outcome });
                }
                // Another replica may have confirmed the tag within its TTL: answer the same.
                if let Some(m) = self.shared_tag(&key, accept, up.tag_ttl).await {
                    return Ok(Answer::hit(m));
                }
                self.revalidate(up, key.clone(), usable, accept).await
            })
            .await
    }

    /// The tag's record in the shared tier, if it was confirmed within `ttl` and its
    /// manifest is there and acceptable; adopted here.
    pub(super) async fn shared_tag(
        &self,
        key: &TagKey,
        accept: Option<&str>,
        ttl: Duration,
    ) -> Option<Arc<Manifest>> {
        let bytes = self.cache.shared_record(&tag_record_name(key)).await?;
        let record: TagRecord = serde_json::from_slice(&bytes).ok()?;
        let age = self.clock.age(record.confirmed);
        if (&record.upstream, &record.name, &record.tag) != (&key.0, &key.1, &key.2)
            || age >= ttl
            || !accepts(accept, &record.media_type)
        {
            return None;
        }
        let m = self.cached(&record.digest).await.ok()??;
        self.metrics.hit("tag");
        self.tags.insert(key.clone(), Arc::new(record.clone()));
        self.persist_tag(key, &record, false).await;
        Some(m)
    }

    /// Asks the upstream about a tag whose record is missing or old.
    pub(super) async fn revalidate(
        &self,
        up: &Arc<Upstream>,
        key: TagKey,
        usable: Option<(Arc<TagRecord>, Arc<Manifest>)>,
        accept: Option<&str>,
    ) -> Result<Answer<Arc<Manifest>>, Error> {
        let (_, name, tag) = &key;
        let reference = Reference::Tag(tag.clone());
        let result = async {
            if let Some((record, cached)) = &usable {
                // HEAD first: the body only when the digest moved.
                let moved_to = up.manifest_digest(name, tag, accept).await?;
                if moved_to.as_ref() == Some(&record.digest) {
                    self.record_tag(&key, cached, true).await;
                    return Ok((cached.clone(), Outcome::Revalidated));
                }
                if let Some(d) = moved_to {
                    if let Some(m) = self.cached(&d).await? {
                        if accepts(accept, &m.media_type) {
                            self.record_tag(&key, &m, true).await;
                            return Ok((m, Outcome::Revalidated));
                        }
                    }
                }
            }
            // Recorded by `fetch` (or adopted from another replica's record).
            let m = self.fetch(up, name, &reference, accept).await?;
            Ok((m, Outcome::Miss))
        }
        .await;
        match result {
            Ok((value, outcome)) => Ok(Answer { value, outcome }),
            Err(Error::Upstream { upstream, error })
                if error.is_unavailable() && usable.is_some() =>
            {
                tracing::warn!(upstream = %upstream, name = %name, tag = %tag, %error, "upstream failed: serving the cached tag stale");
                self.metrics.stale(&upstream);
                Ok(Answer::stale(usable.expect("checked").1))
            }
            Err(e) => Err(e),
        }
    }

    pub(super) async fn tag_record(&self, key: TagKeyRef<'_>) -> Option<Arc<TagRecord>> {
        if let Some(r) = self.tags.get(&key) {
            return Some(r);
        }
        let key = key.to_owned();
        let bytes = self.cache.record(&tag_record_name(&key)).await?;
        let record: Arc<TagRecord> = Arc::new(serde_json::from_slice(&bytes).ok()?);
        if (&record.upstream, &record.name, &record.tag) != (&key.0, &key.1, &key.2) {
            return None;
        }
        self.tags.insert(key.clone(), record.clone());
        Some(record)
    }

    /// Records that the tag `key` points to `m`, confirmed now: in memory, on disk and, when
    /// `share`, in the bucket.
    pub(super) async fn record_tag(&self, key: &TagKey, m: &Manifest, share: bool) {
        let record = TagRecord {
            upstream: key.0.clone(),
            name: key.1.clone(),
            tag: key.2.clone(),
            digest: m.digest.clone(),
            media_type: m.media_type.clone(),
            confirmed: self.clock.now(),
        };
        self.tags.insert(key.clone(), Arc::new(record.clone()));
        self.persist_tag(key, &record, share).await;
    }

    /// Keeps a tag record on disk and, if `share`, in the bucket.
    pub(super) async fn persist_tag(&self, key: &TagKey, record: &TagRecord, share: bool) {
        let bytes = serde_json::to_vec(record).expect("a record serializes");
        self.cache
            .put_record(&tag_record_name(key), bytes, share)
            .await;
    }
}
