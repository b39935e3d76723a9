//! Referrers: passed through, cached briefly, the last good answer served when the upstream
//! fails or the cache is offline (kept on disk and in the bucket shared with other replicas,
//! so it survives a restart and serves the replicas that did not fetch it).

use super::*;

impl Manifests {
    /// Referrers of `digest`, passed through, cached briefly, stale on error.
    pub async fn referrers(
        &self,
        up: &Arc<Upstream>,
        name: &Name,
        digest: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Answer<Arc<(Bytes, HeaderValue)>>, Error> {
        let key = format!(
            "{}\0{name}\0{digest}\0{}",
            up.name,
            artifact_type.unwrap_or_default()
        );
        // Briefly: a minute at most, and never longer than the upstream's tag TTL.
        let fresh_for = REFERRERS_TTL.min(up.tag_ttl);
        if let Some((hit, _)) = self
            .referrers_fresh
            .get(&key)
            .filter(|(_, at)| self.clock.instant().saturating_duration_since(*at) < fresh_for)
        {
            return Ok(Answer::hit(hit));
        }
        let record = Record::referrers(&up.name, name, digest, artifact_type.unwrap_or_default());
        if self.offline {
            return match self.last_referrers(&key, &record).await {
                Some(v) => Ok(Answer::hit(v)),
                None => Err(unknown_offline()),
            };
        }
        let fetched = up
            .referrers(name, digest, artifact_type, self.max_size)
            .await
            .map(Arc::new);
        match fetched {
            Ok(v) => {
                self.referrers_fresh
                    .insert(key.clone(), (v.clone(), self.clock.instant()));
                self.referrers_last.insert(key, v.clone());
                // Kept as text: an index is JSON; anything else is only kept in memory.
                if let (Ok(content_type), Ok(body)) = (v.1.to_str(), std::str::from_utf8(&v.0)) {
                    let kept = KeptReferrers {
                        content_type: content_type.to_string(),
                        body: body.to_string(),
                    };
                    let bytes = serde_json::to_vec(&kept).expect("a record serializes");
                    self.cache.put_record(&record, bytes, true).await;
                }
                Ok(Answer::miss(v))
            }
            Err(Error::Upstream { upstream, error }) if error.is_unavailable() => {
                match self.last_referrers(&key, &record).await {
                    Some(v) => {
                        self.metrics.stale(&upstream);
                        Ok(Answer::stale(v))
                    }
                    None => Err(Error::Upstream { upstream, error }),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// The last good referrers answer: in memory, else on disk, else in the bucket.
    async fn last_referrers(
        &self,
        key: &str,
        record: &Record,
    ) -> Option<Arc<(Bytes, HeaderValue)>> {
        if let Some(v) = self.referrers_last.get(key) {
            return Some(v);
        }
        let bytes = match self.cache.record(record).await {
            Some(b) => b,
            None => self.cache.shared_record(record).await?,
        };
        let kept: KeptReferrers = serde_json::from_slice(&bytes).ok()?;
        let content_type = HeaderValue::from_str(&kept.content_type).ok()?;
        let v = Arc::new((Bytes::from(kept.body), content_type));
        self.referrers_last.insert(key.to_string(), v.clone());
        Some(v)
    }
}

/// A referrers answer as kept on disk and in the bucket (an OCI index: JSON text).
#[derive(Serialize, Deserialize)]
struct KeptReferrers {
    content_type: String,
    body: String,
}
