//! The admin API's client, for the `ocicache cache ...` commands with `--server`: the
//! command line is a client of the API, so the two cannot drift apart. Plain HTTP/1.1 on
//! hyper-util's client (the admin listener is loopback or a private address; no TLS).

use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::config::Secret;
use crate::upstream::error_chain;

/// How long one request may take (a verify or gc is a job: its request returns at once).
const TIMEOUT: Duration = Duration::from_secs(60);
/// How often a job is polled while it runs.
const POLL: Duration = Duration::from_millis(200);

/// Why a call to the admin API failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("--server {0:?}: not an http:// URL")]
    Url(String),
    #[error("{server}: {error}")]
    Http { server: String, error: String },
    /// The API answered with an error envelope.
    #[error("{status} {code}: {message}")]
    Api {
        status: StatusCode,
        code: String,
        message: String,
    },
    #[error("{server}: not the admin API's JSON: {error}")]
    Body { server: String, error: String },
}

pub struct Client {
    /// `http://host:port`, no trailing slash.
    base: String,
    token: Option<Secret>,
    http: hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>,
}

impl Client {
    /// A client of the admin API at `server` (`http://127.0.0.1:5080`).
    pub fn new(server: &str, token: Option<Secret>) -> Result<Client, ClientError> {
        let base = server.trim_end_matches('/').to_string();
        match url::Url::parse(&base) {
            Ok(u) if u.scheme() == "http" && u.host().is_some() && u.path() == "/" => {}
            _ => return Err(ClientError::Url(server.to_string())),
        }
        let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
        Ok(Client { base, token, http })
    }

    /// `method path` (under `/api/v1/`) with an optional JSON body: the JSON answer, or the
    /// error the API answered.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let http_err = |error: String| ClientError::Http {
            server: self.base.clone(),
            error,
        };
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}/api/v1/{path}", self.base))
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(t) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {}", t.0));
        }
        let req = req
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| http_err(e.to_string()))?;
        let answer = async {
            let resp = self
                .http
                .request(req)
                .await
                .map_err(|e| http_err(error_chain(&e)))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| http_err(e.to_string()))?
                .to_bytes();
            Ok::<_, ClientError>((status, body))
        };
        let (status, body) = tokio::time::timeout(TIMEOUT, answer)
            .await
            .map_err(|_| http_err(format!("no answer within {TIMEOUT:?}")))??;
        let json: Value = serde_json::from_slice(&body).map_err(|e| ClientError::Body {
            server: self.base.clone(),
            error: format!("{status}: {e}"),
        })?;
        if !status.is_success() {
            let e = &json["errors"][0];
            return Err(ClientError::Api {
                status,
                code: e["code"].as_str().unwrap_or("UNKNOWN").to_string(),
                message: e["message"].as_str().unwrap_or("").to_string(),
            });
        }
        Ok(json)
    }

    /// Starts a job (`POST path`) and waits for its end; returns the job (its `state` is
    /// `done` or `failed`). `progress` sees the job while it runs.
    pub async fn run_job(
        &self,
        path: &str,
        body: Option<&Value>,
        mut progress: impl FnMut(&Value),
    ) -> Result<Value, ClientError> {
        let job = self.call(Method::POST, path, body).await?;
        let id = job["id"].as_u64().ok_or_else(|| ClientError::Body {
            server: self.base.clone(),
            error: "a job without an id".into(),
        })?;
        loop {
            let job = self.call(Method::GET, &format!("jobs/{id}"), None).await?;
            if job["state"] != "running" {
                return Ok(job);
            }
            progress(&job);
            tokio::time::sleep(POLL).await;
        }
    }
}
