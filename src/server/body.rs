//! The response body type: a boxed stream of chunks. An `Err` chunk makes hyper abort the
//! response (the connection is closed before the announced length), so a client never sees
//! a clean end of a short or wrong body.
//!
//! Every response leaves the server wrapped in [`Logged`], which writes the request's log
//! line when the body ends rather than when the headers go out: only then are the bytes sent,
//! the time to the last byte, and whether the client got the whole body known. Before the
//! answer exists the line waits in a [`Pending`], which writes it if the client leaves first.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::{Method, StatusCode};
use http_body::SizeHint;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;

use crate::cache::Outcome;
use crate::clock::Instant;
use crate::error::Error;
use crate::upstream::Upstream;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body pulled from `stream` only as fast as the client reads: a slow client holds one
/// chunk of memory, not a queue.
pub fn stream<S>(stream: S) -> Body
where
    S: Stream<Item = std::io::Result<Bytes>> + Send + 'static,
{
    StreamBody::new(stream.map(|r| r.map(Frame::data).map_err(BoxError::from))).boxed_unsync()
}

/// What a request's log line says besides what only the body's end knows.
pub struct RequestLine {
    peer: SocketAddr,
    method: Method,
    path: String,
    status: StatusCode,
    started: Instant,
    /// The bytes a complete body carries (its `Content-Length`; 0 for a `HEAD`), when known.
    /// hyper stops polling a body once it has sent its `Content-Length`, so a body dropped
    /// at that point was sent whole, not aborted.
    expected: Option<u64>,
    outcome: Option<Outcome>,
    /// The upstream the request was routed to, named when no error names one.
    routed: Option<Arc<Upstream>>,
    /// The error the answer reports: its text is the line's `error`, its upstream the line's
    /// `upstream`.
    error: Option<Error>,
}

/// How a body ended.
enum End<'a> {
    /// Every byte was handed to hyper.
    Complete,
    /// The body yielded an error: hyper aborts the response.
    Failed(&'a BoxError),
    /// Dropped before its end: the client went away, or the connection failed.
    Dropped,
}

impl RequestLine {
    /// Writes the line: at `WARN` with the cause for a 5xx answer or a body that failed, at
    /// `INFO` otherwise (an error answer's cause included).
    fn write(self, sent: u64, end: End<'_>) {
        let upstream = self
            .error
            .as_ref()
            .and_then(Error::upstream_name)
            .or(self.routed.as_deref().map(|u| u.name.as_str()))
            .unwrap_or("-");
        let cache = self.outcome.map_or("-", Outcome::as_str);
        let aborted = !matches!(end, End::Complete);
        let ms = self.started.elapsed().as_millis() as u64;
        let status = self.status.as_u16();
        let (peer, method, path) = (self.peer, &self.method, self.path.as_str());
        let cause: Option<&dyn std::fmt::Display> = match &end {
            End::Failed(e) => Some(e),
            _ => self.error.as_ref().map(|e| e as &dyn std::fmt::Display),
        };
        let error = cause.map(tracing::field::display);
        if self.status.is_server_error() || matches!(end, End::Failed(_)) {
            tracing::warn!(target: TARGET, %peer, %method, %path, status, bytes = sent, ms, upstream, cache, aborted, error, "request");
        } else {
            tracing::info!(target: TARGET, %peer, %method, %path, status, bytes = sent, ms, upstream, cache, aborted, error, "request");
        }
    }
}

/// The line's target: the module that wrote it before it moved here, which operators' log
/// filters name.
const TARGET: &str = "ocicache::server::handlers";

/// The status logged for a request whose client went away before it was answered (hyper
/// drops the handler's future then), as nginx logs it.
const CLIENT_CLOSED: u16 = 499;

/// A request's log line while its answer is being built. Dropped before [`Pending::answered`]
/// (the client went away while the handler waited, on an upstream for instance), it writes
/// the line with status 499 and `aborted=true`: a request that never got an answer is
/// logged too.
pub struct Pending(Option<RequestLine>);

impl Pending {
    pub fn new(peer: SocketAddr, method: Method, path: String, started: Instant) -> Pending {
        Pending(Some(RequestLine {
            peer,
            method,
            path,
            status: StatusCode::from_u16(CLIENT_CLOSED).expect("a valid status"),
            started,
            expected: None,
            outcome: None,
            routed: None,
            error: None,
        }))
    }

    /// Where the handler notes the upstream the request is routed to, once it knows it.
    pub fn routed(&mut self) -> &mut Option<Arc<Upstream>> {
        &mut self.0.as_mut().expect("pending until answered").routed
    }

    /// The line of the answer: its status, the bytes a complete body carries, how the cache
    /// answered, and the error it reports.
    pub fn answered(
        mut self,
        status: StatusCode,
        expected: Option<u64>,
        outcome: Option<Outcome>,
        error: Option<Error>,
    ) -> RequestLine {
        let mut line = self.0.take().expect("answered once");
        line.status = status;
        line.expected = expected;
        line.outcome = outcome;
        line.error = error;
        line
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(line) = self.0.take() {
            line.write(0, End::Dropped);
        }
    }
}

/// A response body that counts the bytes of the frames it yields and writes the request's
/// log line once: at its end, at its first error, or when it is dropped before either. A
/// counter and a branch per frame; nothing allocated.
pub struct Logged {
    inner: Body,
    sent: u64,
    /// `None` once written.
    line: Option<RequestLine>,
}

impl Logged {
    pub fn new(inner: Body, line: RequestLine) -> Logged {
        Logged {
            inner,
            sent: 0,
            line: Some(line),
        }
    }

    fn finish(&mut self, end: End<'_>) {
        if let Some(line) = self.line.take() {
            line.write(self.sent, end);
        }
    }
}

impl http_body::Body for Logged {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &polled {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.sent += data.len() as u64;
                }
            }
            Some(Err(e)) => this.finish(End::Failed(e)),
            None => this.finish(End::Complete),
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        if self.line.is_some() {
            let whole = http_body::Body::is_end_stream(&self.inner)
                || self
                    .line
                    .as_ref()
                    .and_then(|l| l.expected)
                    .is_some_and(|n| n == self.sent);
            self.finish(if whole { End::Complete } else { End::Dropped });
        }
    }
}
