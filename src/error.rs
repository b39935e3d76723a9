//! One error type for the request path, classified by the side that caused it (client,
//! upstream, us), and the one place that maps it to an HTTP status and the OCI error code,
//! message and detail (`Error::parts`; `server::envelope` writes the response).

use std::borrow::Cow;
use std::sync::Arc;

use http::{HeaderValue, StatusCode};

use crate::reference::ReferenceError;

/// The error codes of the OCI distribution spec (plus `UNAVAILABLE`, as the CNCF registry
/// uses it), each registered once with its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BlobUnknown,
    DigestInvalid,
    ManifestUnknown,
    ManifestInvalid,
    NameInvalid,
    NameUnknown,
    SizeInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    TooManyRequests,
    RangeInvalid,
    Unavailable,
    /// A pagination `n` that is not a number (the spec's code, for the admin API's lists).
    PaginationNumberInvalid,
    /// Ours: an admin API body or parameter the spec's codes do not cover.
    RequestInvalid,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BlobUnknown => "BLOB_UNKNOWN",
            ErrorCode::DigestInvalid => "DIGEST_INVALID",
            ErrorCode::ManifestUnknown => "MANIFEST_UNKNOWN",
            ErrorCode::ManifestInvalid => "MANIFEST_INVALID",
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::NameUnknown => "NAME_UNKNOWN",
            ErrorCode::SizeInvalid => "SIZE_INVALID",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Denied => "DENIED",
            ErrorCode::Unsupported => "UNSUPPORTED",
            // The spec spells it without underscores.
            ErrorCode::TooManyRequests => "TOOMANYREQUESTS",
            ErrorCode::RangeInvalid => "RANGE_INVALID",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::PaginationNumberInvalid => "PAGINATION_NUMBER_INVALID",
            ErrorCode::RequestInvalid => "REQUEST_INVALID",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::BlobUnknown | ErrorCode::ManifestUnknown | ErrorCode::NameUnknown => {
                StatusCode::NOT_FOUND
            }
            ErrorCode::DigestInvalid
            | ErrorCode::ManifestInvalid
            | ErrorCode::NameInvalid
            | ErrorCode::SizeInvalid
            | ErrorCode::PaginationNumberInvalid
            | ErrorCode::RequestInvalid => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Denied => StatusCode::FORBIDDEN,
            ErrorCode::Unsupported => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::RangeInvalid => StatusCode::RANGE_NOT_SATISFIABLE,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// What went wrong talking to an upstream. Cloneable so that one coalesced upstream request
/// can hand its failure to every waiter.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("timed out")]
    Timeout,
    #[error("answered {status}{}", said.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
    Status {
        status: StatusCode,
        retry_after: Option<HeaderValue>,
        /// The message of the upstream's error body, if it sent one.
        said: Option<String>,
    },
    #[error("token service failed: {0}")]
    Token(String),
    #[error("too many redirects")]
    Redirects,
    #[error("sent content that does not match digest {0}")]
    DigestMismatch(String),
    #[error("sent a body of the wrong length: {0}")]
    Length(String),
    #[error("sent a body larger than the limit of {0} bytes")]
    TooLarge(u64),
    #[error("stalled: no data for {0:?}")]
    Stalled(std::time::Duration),
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl UpstreamError {
    /// Failures for which a stale cached answer is better than an error (stale-if-error).
    pub fn is_unavailable(&self) -> bool {
        match self {
            UpstreamError::Status { status, .. } => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            UpstreamError::Connect(_)
            | UpstreamError::Timeout
            | UpstreamError::Token(_)
            | UpstreamError::Stalled(_)
            | UpstreamError::Protocol(_)
            | UpstreamError::Redirects => true,
            _ => false,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The client asked for something invalid or absent.
    #[error("{message}")]
    Client { code: ErrorCode, message: String },
    /// The upstream failed or lied.
    #[error("upstream {upstream}: {error}")]
    Upstream {
        upstream: String,
        error: UpstreamError,
    },
    /// The upstream refused what the client asked (404 and other 4xx that are not about
    /// our credentials or rate): its status, code and message are passed on.
    #[error("upstream {}: {} {}", .0.upstream, .0.code, .0.message)]
    Rejected(Arc<Rejection>),
    /// Our own failure (disk, a bug); the detail is logged, not sent.
    #[error("internal error: {0}")]
    Internal(Arc<std::io::Error>),
}

/// An upstream's refusal, as it said it.
#[derive(Debug)]
pub struct Rejection {
    pub upstream: String,
    pub status: StatusCode,
    /// The upstream's code (`MANIFEST_UNKNOWN`), or ours for what was asked when it sent none.
    pub code: String,
    pub message: String,
    /// The upstream's `detail`, `null` when it sent none.
    pub detail: serde_json::Value,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn client(code: ErrorCode, message: impl Into<String>) -> Error {
        Error::Client {
            code,
            message: message.into(),
        }
    }

    pub fn upstream(upstream: &str, error: UpstreamError) -> Error {
        Error::Upstream {
            upstream: upstream.to_string(),
            error,
        }
    }

    /// The upstream that caused this error, if one was asked.
    pub fn upstream_name(&self) -> Option<&str> {
        match self {
            Error::Upstream { upstream, .. } => Some(upstream),
            Error::Rejected(r) => Some(&r.upstream),
            Error::Client { .. } | Error::Internal(_) => None,
        }
    }

    /// Is this about what the client asked (bad or unknown), not a fault of ours or of the
    /// upstream's?
    pub fn is_client_side(&self) -> bool {
        matches!(self, Error::Client { .. } | Error::Rejected(_))
    }

    /// Status, code, message and detail for the client.
    pub fn parts(&self) -> (StatusCode, Cow<'_, str>, String, serde_json::Value) {
        let null = serde_json::Value::Null;
        match self {
            Error::Client { code, message } => {
                (code.status(), code.as_str().into(), message.clone(), null)
            }
            Error::Rejected(r) => (
                r.status,
                r.code.as_str().into(),
                r.message.clone(),
                r.detail.clone(),
            ),
            Error::Upstream { upstream, error } => {
                let msg = format!("upstream {upstream} {error}");
                let (status, code) = match error {
                    UpstreamError::Status { status, .. }
                        if *status == StatusCode::TOO_MANY_REQUESTS =>
                    {
                        (*status, ErrorCode::TooManyRequests)
                    }
                    UpstreamError::Status { status, .. }
                        if *status == StatusCode::UNAUTHORIZED
                            || *status == StatusCode::FORBIDDEN =>
                    {
                        (StatusCode::FORBIDDEN, ErrorCode::Denied)
                    }
                    // A gateway's statuses: an upstream's 500 from us would read as our own
                    // failure. Its 503 and 504 keep their meaning (try later, too slow).
                    UpstreamError::Status { status, .. } if status.is_server_error() => {
                        let status = match *status {
                            StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT => {
                                *status
                            }
                            _ => StatusCode::BAD_GATEWAY,
                        };
                        (status, ErrorCode::Unavailable)
                    }
                    UpstreamError::Timeout | UpstreamError::Stalled(_) => {
                        (StatusCode::GATEWAY_TIMEOUT, ErrorCode::Unavailable)
                    }
                    _ => (StatusCode::BAD_GATEWAY, ErrorCode::Unavailable),
                };
                (status, code.as_str().into(), msg, null)
            }
            Error::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "UNKNOWN".into(),
                "internal error".into(),
                null,
            ),
        }
    }

    /// The upstream's `Retry-After`, when it sent one with a failure.
    pub fn retry_after(&self) -> Option<&HeaderValue> {
        match self {
            Error::Upstream {
                error:
                    UpstreamError::Status {
                        retry_after: Some(ra),
                        ..
                    },
                ..
            } => Some(ra),
            _ => None,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.parts().0
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Internal(Arc::new(e))
    }
}

impl From<ReferenceError> for Error {
    fn from(e: ReferenceError) -> Self {
        let code = match e {
            ReferenceError::NameInvalid(_) => ErrorCode::NameInvalid,
            ReferenceError::TagInvalid(_) => ErrorCode::ManifestInvalid,
            ReferenceError::DigestInvalid(_) => ErrorCode::DigestInvalid,
            ReferenceError::UnsupportedAlgorithm(_) => ErrorCode::DigestInvalid,
        };
        Error::client(code, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(status: u16) -> Error {
        Error::upstream(
            "docker.io",
            UpstreamError::Status {
                status: StatusCode::from_u16(status).unwrap(),
                retry_after: Some(HeaderValue::from_static("7")),
                said: None,
            },
        )
    }

    #[test]
    fn an_upstream_failure_is_a_gateway_status_with_the_specs_code() {
        for (upstream, ours, code) in [
            (500, 502, "UNAVAILABLE"),
            (501, 502, "UNAVAILABLE"),
            (502, 502, "UNAVAILABLE"),
            (503, 503, "UNAVAILABLE"),
            (504, 504, "UNAVAILABLE"),
            (505, 502, "UNAVAILABLE"),
            (429, 429, "TOOMANYREQUESTS"),
            (401, 403, "DENIED"),
            (403, 403, "DENIED"),
        ] {
            let e = answered(upstream);
            let (status, c, _, _) = e.parts();
            assert_eq!((status.as_u16(), c.as_ref()), (ours, code), "{upstream}");
        }
        assert_eq!(answered(429).retry_after().unwrap(), "7");
        let timeout = Error::upstream("docker.io", UpstreamError::Timeout);
        assert_eq!(timeout.status(), StatusCode::GATEWAY_TIMEOUT);
        let refused = Error::upstream("docker.io", UpstreamError::Connect("refused".into()));
        assert_eq!(refused.status(), StatusCode::BAD_GATEWAY);
    }
}
