//! `[[sync]]` entries: images the server keeps cached on a schedule (see `crate::sync`).

use super::*;

/// `[[sync]]`: an image the server keeps cached: at start and every `interval` its tags are
/// resolved and what is missing is fetched (see `sync`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// The repository as users write it, without a tag: `docker.io/library/nginx`, `nginx`,
    /// `ghcr.io/owner/app`. Its registry must be a configured upstream.
    pub image: String,
    /// The tags kept; exclusive with `tag_pattern`.
    pub tags: Option<Vec<String>>,
    /// A regular expression (the `regex` crate's syntax): the repository's tags that match
    /// it, anywhere unless anchored with `^` / `$`, are kept. Exclusive with `tags`.
    pub tag_pattern: Option<String>,
    /// The platforms of an index kept, `os/arch[/variant]`; empty: all of them.
    #[serde(default)]
    pub platforms: Vec<String>,
    /// How often the entry is synced (from the start of one run to the next, plus jitter).
    #[serde(default = "default_sync_interval")]
    pub interval: HumanDuration,
    /// Pin what is synced (never evicted by the LRU bound); a tag that moved has its
    /// previous digest unpinned.
    #[serde(default)]
    pub pin: bool,
}

fn default_sync_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(6 * 3600))
}

impl SyncConfig {
    /// The compiled `tag_pattern`, if there is one (checked by `validate`).
    pub fn pattern(&self) -> Option<Result<regex::Regex, regex::Error>> {
        self.tag_pattern.as_deref().map(regex::Regex::new)
    }

    pub(super) fn validate(
        &self,
        at: &str,
        upstreams: &[UpstreamConfig],
    ) -> Result<(), ConfigError> {
        let key = |k: &str| format!("{at}.{k}");
        let image = crate::prefetch::ImageRef::parse(&self.image)
            .map_err(|e| invalid(key("image"), &self.image, &e.to_string()))?;
        let last = self.image.rsplit('/').next().unwrap_or_default();
        if self.image.contains('@') || last.contains(':') {
            return Err(invalid(
                key("image"),
                &self.image,
                "a repository without a tag or digest: list tags in `tags`",
            ));
        }
        if !upstreams.iter().any(|u| u.answers_to(&image.registry)) {
            return Err(invalid(
                key("image"),
                &self.image,
                &format!("registry {:?} is not a configured upstream", image.registry),
            ));
        }
        match (&self.tags, &self.tag_pattern) {
            (Some(tags), None) => {
                if tags.is_empty() {
                    return Err(invalid(key("tags"), "[]", "list at least one tag"));
                }
                for t in tags {
                    if let Err(e) = crate::reference::Tag::parse(t) {
                        return Err(invalid(key("tags"), t, &e.to_string()));
                    }
                }
            }
            (None, Some(p)) => {
                if let Some(Err(e)) = self.pattern() {
                    return Err(invalid(key("tag_pattern"), p, &e.to_string()));
                }
            }
            _ => {
                return Err(invalid(
                    key("tags"),
                    "",
                    "give exactly one of tags and tag_pattern",
                ))
            }
        }
        for p in &self.platforms {
            let parts: Vec<&str> = p.split('/').collect();
            let ok = (2..=3).contains(&parts.len())
                && parts.iter().all(|s| {
                    !s.is_empty()
                        && s.bytes().all(|b| {
                            b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                        })
                });
            if !ok {
                return Err(invalid(
                    key("platforms"),
                    p,
                    "a platform is os/arch or os/arch/variant, e.g. linux/arm64/v8",
                ));
            }
        }
        if self.interval.0.is_zero() {
            return Err(invalid(key("interval"), "0s", "must be above zero"));
        }
        Ok(())
    }
}

impl UpstreamConfig {
    /// Is `registry` (a host[:port] as users write it in an image) this upstream: its name,
    /// or its URL's authority?
    pub fn answers_to(&self, registry: &str) -> bool {
        if self.name == registry {
            return true;
        }
        let Ok(url) = url::Url::parse(&self.url) else {
            return false;
        };
        match (url.host_str(), url.port()) {
            (Some(h), Some(p)) => registry == format!("{h}:{p}"),
            (Some(h), None) => registry == h,
            _ => false,
        }
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    const UPSTREAM: &str = "[[upstreams]]\nname = \"docker.io\"\nurl = \"http://127.0.0.1:5001\"\n";

    #[test]
    fn sync_entries_from_a_file_with_defaults() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "s.toml",
                &format!(
                    "{UPSTREAM}[[sync]]\nimage = \"nginx\"\ntags = [\"1.27\", \"stable\"]\n\
                     platforms = [\"linux/amd64\", \"linux/arm64/v8\"]\ninterval = \"6h\"\npin = true\n\
                     [[sync]]\nimage = \"127.0.0.1:5001/team/app\"\ntag_pattern = \"^1\\\\.2[6-9]\\\\.\"\n"
                ),
            )?;
            let c = Config::load(Some(Path::new("s.toml"))).unwrap();
            assert_eq!(c.sync.len(), 2);
            let (a, b) = (&c.sync[0], &c.sync[1]);
            assert_eq!(
                a.tags.as_deref(),
                Some(&["1.27".to_string(), "stable".into()][..])
            );
            assert_eq!(a.platforms, ["linux/amd64", "linux/arm64/v8"]);
            assert_eq!(a.interval.0, Duration::from_secs(6 * 3600));
            assert!(a.pin);
            let re = b.pattern().unwrap().unwrap();
            assert!(re.is_match("1.27.3") && !re.is_match("1.25.0") && !re.is_match("v1.27.3"));
            assert_eq!(b.interval.0, Duration::from_secs(6 * 3600), "the default");
            assert!(!b.pin && b.platforms.is_empty());
            Ok(())
        });
    }

    /// figment reads an array of tables from one variable in TOML's inline syntax; the
    /// `__` nesting cannot index into an array.
    #[test]
    fn sync_entries_from_the_environment() {
        Jail::expect_with(|jail| {
            jail.create_file("u.toml", UPSTREAM)?;
            jail.set_env(
                "OCICACHE_SYNC",
                r#"[{image="docker.io/library/nginx",tags=["1.27"],platforms=["linux/amd64"],interval="30m",pin=true}]"#,
            );
            let c = Config::load(Some(Path::new("u.toml"))).unwrap();
            assert_eq!(c.sync.len(), 1);
            assert_eq!(c.sync[0].image, "docker.io/library/nginx");
            assert_eq!(c.sync[0].tags.as_deref(), Some(&["1.27".to_string()][..]));
            assert_eq!(c.sync[0].interval.0, Duration::from_secs(1800));
            assert!(c.sync[0].pin);
            Ok(())
        });
    }

    #[test]
    fn bad_sync_entries_name_the_key() {
        Jail::expect_with(|jail| {
            for (body, key, says) in [
                ("image = \"nginx\"", "sync[0].tags", "exactly one"),
                (
                    "image = \"nginx\"\ntags = [\"1\"]\ntag_pattern = \"1\"",
                    "sync[0].tags",
                    "exactly one",
                ),
                (
                    "image = \"nginx\"\ntags = []",
                    "sync[0].tags",
                    "at least one",
                ),
                (
                    "image = \"nginx\"\ntags = [\"a b\"]",
                    "sync[0].tags",
                    "invalid tag",
                ),
                (
                    "image = \"nginx\"\ntag_pattern = \"(\"",
                    "sync[0].tag_pattern",
                    "regex",
                ),
                (
                    "image = \"nginx:1\"\ntags = [\"1\"]",
                    "sync[0].image",
                    "without a tag",
                ),
                (
                    "image = \"ghcr.io/a/b\"\ntags = [\"1\"]",
                    "sync[0].image",
                    "not a configured",
                ),
                (
                    "image = \"UPPER\"\ntags = [\"1\"]",
                    "sync[0].image",
                    "invalid",
                ),
                (
                    "image = \"nginx\"\ntags = [\"1\"]\ninterval = \"0s\"",
                    "sync[0].interval",
                    "above zero",
                ),
                (
                    "image = \"nginx\"\ntags = [\"1\"]\nplatforms = [\"amd64\"]",
                    "sync[0].platforms",
                    "os/arch",
                ),
                (
                    "image = \"nginx\"\ntags = [\"1\"]\npinned = true",
                    "pinned",
                    "unknown",
                ),
            ] {
                jail.create_file("bad.toml", &format!("{UPSTREAM}[[sync]]\n{body}\n"))?;
                let e = Config::load(Some(Path::new("bad.toml")))
                    .unwrap_err()
                    .to_string();
                assert!(e.contains(key) && e.contains(says), "{body}: {e}");
            }
            Ok(())
        });
    }
}
