//! The response body type: a boxed stream of chunks. An `Err` chunk makes hyper abort the
//! response (the connection is closed before the announced length), so a client never sees
//! a clean end of a short or wrong body.

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;

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
