//! Authentication to an upstream: the `WWW-Authenticate` challenge flow of the distribution
//! spec. Bearer tokens (anonymous, or with the upstream's credentials) are cached per scope
//! until shortly before they expire; Basic sends the configured credentials.
//!
//! Tokens and passwords never reach a log: `Authorization` values are `HeaderValue`s marked
//! sensitive, errors name the realm's host, never its answer.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use http::{header, HeaderValue, Request, StatusCode};
use http_body_util::Empty;
use url::Url;

use super::challenge::{self, Challenge};
use super::client::{read_body, send_with_timeout, HttpClient};
use crate::clock::Instant;
use crate::config::Secret;
use crate::error::UpstreamError;
use crate::metrics::{Metrics, UpstreamStatusLabels};

/// A token is renewed this long before the upstream says it expires.
const EXPIRY_MARGIN: Duration = Duration::from_secs(10);
/// Largest token response read.
const MAX_TOKEN_RESPONSE: u64 = 64 << 10;

pub struct Auth {
    upstream: String,
    creds: Option<(String, Secret)>,
    client: HttpClient,
    timeout: Duration,
    metrics: Arc<Metrics>,
    /// Scope (`repository:library/nginx:pull`) to `Authorization` value and its expiry.
    tokens: moka::future::Cache<String, (HeaderValue, Instant)>,
}

impl Auth {
    pub fn new(
        upstream: String,
        creds: Option<(String, Secret)>,
        client: HttpClient,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Auth {
        Auth {
            upstream,
            creds,
            client,
            timeout,
            metrics,
            tokens: moka::future::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(3600))
                .build(),
        }
    }

    /// The `Authorization` value cached for `scope`, if still valid.
    pub async fn cached(&self, scope: &str) -> Option<HeaderValue> {
        match self.tokens.get(scope).await {
            Some((value, expires)) if Instant::now() < expires => Some(value),
            _ => None,
        }
    }

    /// Answers a 401 challenge: `Ok(Some(value))` to retry with, `Ok(None)` when we cannot
    /// (no usable challenge, or Basic without credentials).
    pub async fn authenticate(
        &self,
        header: Option<&HeaderValue>,
        scope: &str,
    ) -> Result<Option<HeaderValue>, UpstreamError> {
        let challenges = header
            .and_then(|h| h.to_str().ok())
            .map(challenge::parse)
            .unwrap_or_default();
        if let Some(bearer) = challenges.iter().find(|c| c.scheme == "bearer") {
            let fetched = self.fetch_token(bearer, scope).await;
            self.metrics
                .token_fetches
                .get_or_create(&UpstreamStatusLabels {
                    upstream: self.upstream.clone(),
                    status: if fetched.is_ok() { "ok" } else { "error" }.into(),
                })
                .inc();
            let (value, lifetime) = fetched?;
            let expires = Instant::now() + lifetime.saturating_sub(EXPIRY_MARGIN);
            self.tokens
                .insert(scope.to_string(), (value.clone(), expires))
                .await;
            return Ok(Some(value));
        }
        if challenges.iter().any(|c| c.scheme == "basic") {
            if let Some(basic) = self.basic() {
                self.tokens
                    .insert(
                        scope.to_string(),
                        (basic.clone(), Instant::now() + Duration::from_secs(3600)),
                    )
                    .await;
                return Ok(Some(basic));
            }
        }
        Ok(None)
    }

    fn basic(&self) -> Option<HeaderValue> {
        let (user, Secret(pass)) = self.creds.as_ref()?;
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        let mut value = HeaderValue::from_str(&format!("Basic {encoded}")).ok()?;
        value.set_sensitive(true);
        Some(value)
    }

    async fn fetch_token(
        &self,
        challenge: &Challenge,
        scope: &str,
    ) -> Result<(HeaderValue, Duration), UpstreamError> {
        let realm = challenge
            .param("realm")
            .ok_or_else(|| UpstreamError::Token("Bearer challenge without realm".into()))?;
        let mut url =
            Url::parse(realm).map_err(|_| UpstreamError::Token("invalid realm URL".into()))?;
        if url.scheme() != "https" && url.scheme() != "http" {
            return Err(UpstreamError::Token("realm is not an HTTP URL".into()));
        }
        let realm_host = url.host_str().unwrap_or_default().to_string();
        {
            let mut q = url.query_pairs_mut();
            if let Some(service) = challenge.param("service") {
                q.append_pair("service", service);
            }
            q.append_pair("scope", scope);
        }
        let mut req = Request::get(url.as_str())
            .body(Empty::new())
            .map_err(|e| UpstreamError::Token(e.to_string()))?;
        if let Some(basic) = self.basic() {
            req.headers_mut().insert(header::AUTHORIZATION, basic);
        }
        tracing::debug!(upstream = %self.upstream, realm = %realm_host, scope, "fetching token");
        // No redirects: credentials go to the realm the registry named, nowhere else.
        let resp = send_with_timeout(&self.client, req, self.timeout)
            .await
            .map_err(|e| UpstreamError::Token(format!("{realm_host}: {e}")))?;
        if resp.status() != StatusCode::OK {
            return Err(UpstreamError::Token(format!(
                "{realm_host} answered {}",
                resp.status()
            )));
        }
        let body = read_body(resp.into_body(), MAX_TOKEN_RESPONSE, self.timeout)
            .await
            .map_err(|e| UpstreamError::Token(format!("{realm_host}: {e}")))?;
        let token = challenge::parse_token_response(&body)
            .map_err(|e| UpstreamError::Token(format!("{realm_host}: {e}")))?;
        let mut value =
            HeaderValue::from_str(&format!("Bearer {}", token.token)).map_err(|_| {
                UpstreamError::Token(format!("{realm_host}: token is not a header value"))
            })?;
        value.set_sensitive(true);
        Ok((value, token.expires_in))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpstreamConfig;

    #[tokio::test(start_paused = true)]
    async fn a_token_is_not_used_past_its_expiry() {
        let cfg = UpstreamConfig::new("docker.io", "http://127.0.0.1:1", true);
        let client = super::super::client::http_client(&cfg).unwrap();
        let metrics = Arc::new(Metrics::new());
        let auth = Auth::new(
            "docker.io".into(),
            None,
            client,
            Duration::from_secs(5),
            metrics,
        );
        let lifetime = Duration::from_secs(60);
        let token = HeaderValue::from_static("Bearer t");
        auth.tokens
            .insert("s".into(), (token, Instant::now() + lifetime))
            .await;
        assert!(auth.cached("s").await.is_some());
        tokio::time::advance(lifetime + Duration::from_secs(1)).await;
        assert!(
            auth.cached("s").await.is_none(),
            "expired on the library's clock"
        );
    }
}
