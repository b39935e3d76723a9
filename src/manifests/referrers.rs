//! Referrers: passed through, cached briefly, the last good answer served when the upstream
//! fails.

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
        if self.offline {
            return match self.referrers_last.get(&key) {
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
                Ok(Answer::miss(v))
            }
            Err(Error::Upstream { upstream, error }) if error.is_unavailable() => {
                match self.referrers_last.get(&key) {
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
}
