//! Tag lists: fetched whole (every page), sorted, kept as the last good list for stale and
//! offline answers, locally and in the bucket shared with other replicas (so a replica whose
//! upstream fails, or that runs `offline`, answers the list another one fetched).

use super::*;

impl Manifests {
    /// The whole tag list of `name`, sorted; the last good one when the upstream fails.
    pub async fn tag_list(
        &self,
        up: &Arc<Upstream>,
        name: &Name,
    ) -> Result<Answer<Arc<Vec<String>>>, Error> {
        let key = (up.name.clone(), name.clone());
        let last_good = || async {
            if let Some(l) = self.tag_lists.get(&key) {
                return Some(l);
            }
            let record = Record::tag_list(&up.name, name);
            let bytes = match self.cache.record(&record).await {
                Some(b) => b,
                None => self.cache.shared_record(&record).await?,
            };
            let list: Vec<String> = serde_json::from_slice(&bytes).ok()?;
            Some(Arc::new(list))
        };
        if self.offline {
            return match last_good().await {
                Some(l) => Ok(Answer::hit(l)),
                None => Err(Error::client(
                    ErrorCode::NameUnknown,
                    "repository not cached (offline)",
                )),
            };
        }
        self.list_flights
            .run(key.clone(), || async {
                match up.tags(name, self.max_size).await {
                    Ok(list) => {
                        let list = Arc::new(list);
                        self.tag_lists.insert(key.clone(), list.clone());
                        let bytes = serde_json::to_vec(&*list).expect("a list serializes");
                        self.cache.put_record(&Record::tag_list(&up.name, name), bytes, true).await;
                        Ok(Answer::miss(list))
                    }
                    Err(Error::Upstream { upstream, error }) if error.is_unavailable() => match last_good().await {
                        Some(l) => {
                            tracing::warn!(%upstream, %name, %error, "upstream failed: serving the last tag list");
                            self.metrics.stale(&upstream);
                            Ok(Answer::stale(l))
                        }
                        None => Err(Error::Upstream { upstream, error }),
                    },
                    Err(e) => Err(e),
                }
            })
            .await
    }
}
