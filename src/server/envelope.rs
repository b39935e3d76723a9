//! Our [`Error`] as an HTTP response: the spec's JSON envelope
//! `{"errors":[{"code","message","detail"}]}` with the status, code, message and detail that
//! `Error::parts` maps it to, and the upstream's `Retry-After` when it sent one.

use bytes::Bytes;
use http::{header, HeaderValue, Response};

use super::body::{self, Body};
use crate::error::Error;

impl Error {
    /// The response in the spec's error envelope.
    pub fn into_response(self) -> Response<Body> {
        let (status, code, message, detail) = self.parts();
        let body = serde_json::json!({
            "errors": [{ "code": code, "message": message, "detail": detail }]
        });
        let mut resp = Response::new(body::full(Bytes::from(body.to_string())));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(ra) = self.retry_after() {
            h.insert(header::RETRY_AFTER, ra.clone());
        }
        resp
    }
}
