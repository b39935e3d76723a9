//! The response body type: a boxed stream of chunks. An `Err` chunk makes hyper abort the
//! response (the connection is closed before the announced length), so a client never sees
//! a clean end of a short or wrong body.
//!
//! Every response leaves the server wrapped in [`Logged`], which writes the request's log
//! line when the body ends rather than when the headers go out: only then are the bytes sent,
//! the time to the last byte, and whether the client got the whole body known. Before the
//! answer exists the line waits in a [`Pending`], which writes it if the client leaves first.

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
    /// The client's address, formatted once per connection.
    peer: Arc<str>,
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
        if let Some(out) = DIRECT.get() {
            // Formatted in this thread's buffer, kept from line to line: nothing allocated.
            let written = LINE.with_borrow_mut(|line| {
                line.clear();
                let direct = self.format_direct(sent, &end, line);
                if direct {
                    out.write_line(line);
                }
                direct
            });
            if written {
                return;
            }
        }
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
        let (peer, method, path) = (&*self.peer, &self.method, self.path.as_str());
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

/// Where request lines go without passing through `tracing` (see [`write_lines_to`]).
static DIRECT: std::sync::OnceLock<crate::logbuf::Lines> = std::sync::OnceLock::new();

thread_local! {
    /// The request line being formatted on this thread for [`DIRECT`].
    static LINE: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(256));
}

/// From now on, a request line that the human format would write its own way (see
/// [`LineFormat`]: `INFO`, no error, no span) is formatted here and appended to `lines`
/// directly, the same bytes. For a log in the human format on an output without colours
/// only: that is when `LineFormat` writes the line itself.
///
/// Why: a cached manifest answer cost about 32,500 instructions, 5,250 of them the line
/// through `tracing` (the event's dispatch, a visitor call and a `fmt` pass per field), and
/// with the line off the same build served 84,000 requests/s against 60,000-64,000.
pub fn write_lines_to(lines: crate::logbuf::Lines) {
    let _ = DIRECT.set(lines);
}

impl RequestLine {
    /// The line as `LineFormat` writes it, into `out`, if it is one this path writes (at
    /// `INFO`, enabled, no error, outside any span, every string plain): else `false`, and
    /// `tracing` writes it.
    fn format_direct(&self, sent: u64, end: &End<'_>, out: &mut Vec<u8>) -> bool {
        let upstream = self.routed.as_deref().map_or("-", |u| u.name.as_str());
        let cache = self.outcome.map_or("-", Outcome::as_str);
        if self.error.is_some()
            || self.status.is_server_error()
            || matches!(end, End::Failed(_))
            || !plain(upstream)
            || !plain(cache)
            || !tracing::enabled!(target: TARGET, tracing::Level::INFO)
            || !tracing::Span::current().is_none()
        {
            return false;
        }
        let Some(time) = timestamp_now() else {
            return false;
        };
        out.extend_from_slice(&time);
        out.extend_from_slice(b"  INFO ");
        out.extend_from_slice(TARGET.as_bytes());
        out.extend_from_slice(b": request peer=");
        out.extend_from_slice(self.peer.as_bytes());
        out.extend_from_slice(b" method=");
        out.extend_from_slice(self.method.as_str().as_bytes());
        out.extend_from_slice(b" path=");
        out.extend_from_slice(self.path.as_bytes());
        out.extend_from_slice(b" status=");
        push_u64(out, u64::from(self.status.as_u16()));
        out.extend_from_slice(b" bytes=");
        push_u64(out, sent);
        out.extend_from_slice(b" ms=");
        push_u64(out, self.started.elapsed().as_millis() as u64);
        out.extend_from_slice(b" upstream=\"");
        out.extend_from_slice(upstream.as_bytes());
        out.extend_from_slice(b"\" cache=\"");
        out.extend_from_slice(cache.as_bytes());
        out.extend_from_slice(b"\" aborted=");
        out.extend_from_slice(if matches!(end, End::Complete) {
            b"false"
        } else {
            b"true"
        });
        out.push(b'\n');
        true
    }
}

/// Is `s` written by `Debug` as itself between quotes (nothing escaped)?
fn plain(s: &str) -> bool {
    s.bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
}

/// `v` in decimal, appended to `out`.
fn push_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(decimal(v, &mut [0; 20]));
}

/// `v` in decimal, written at the end of `digits`.
fn decimal(v: u64, digits: &mut [u8; 20]) -> &[u8] {
    let mut i = digits.len();
    let mut v = v;
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    &digits[i..]
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
    pub fn new(peer: Arc<str>, method: Method, path: String, started: Instant) -> Pending {
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

/// The event format of the human-readable log: the request line written directly, the same
/// bytes as `inner` (tracing-subscriber's default `Full` format) writes, at a third of its
/// cost; every other event, a line inside a span, or a terminal with colours goes to `inner`.
///
/// The request line is the one event per request: under load, the default format spent a
/// third of a cached manifest's user-space instructions on it (styling each field name with
/// an empty ANSI style, field by field through `fmt::Arguments`).
pub struct LineFormat<F> {
    inner: F,
}

impl<F> LineFormat<F> {
    pub fn new(inner: F) -> LineFormat<F> {
        LineFormat { inner }
    }
}

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for LineFormat<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        use tracing_subscriber::fmt::time::FormatTime;
        let meta = event.metadata();
        if meta.target() != TARGET
            || writer.has_ansi_escapes()
            || !writer.sanitizes_ansi_escapes()
            || ctx.event_scope().is_some()
        {
            return self.inner.format_event(ctx, writer, event);
        }
        let mut fields = LineFields {
            out: String::with_capacity(256),
            first: true,
            unsupported: false,
        };
        event.record(&mut fields);
        if fields.unsupported {
            return self.inner.format_event(ctx, writer, event);
        }
        #[cfg(test)]
        tests::FAST_LINES.with(|n| n.set(n.get() + 1));
        match timestamp_now() {
            Some(t) => writer.write_str(std::str::from_utf8(&t).expect("ascii"))?,
            None => {
                if tracing_subscriber::fmt::time::SystemTime
                    .format_time(&mut writer)
                    .is_err()
                {
                    writer.write_str("<unknown time>")?;
                }
            }
        }
        let level = match *meta.level() {
            tracing::Level::TRACE => "TRACE",
            tracing::Level::DEBUG => "DEBUG",
            tracing::Level::INFO => " INFO",
            tracing::Level::WARN => " WARN",
            tracing::Level::ERROR => "ERROR",
        };
        writer.write_char(' ')?;
        writer.write_str(level)?;
        writer.write_char(' ')?;
        writer.write_str(meta.target())?;
        writer.write_str(": ")?;
        writer.write_str(&fields.out)?;
        writer.write_char('\n')
    }
}

/// The log's wall time now (not a decision: read as the default format's timer reads it),
/// as [`timestamp`] writes it.
fn timestamp_now() -> Option<[u8; 27]> {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    timestamp(d.as_secs(), d.subsec_micros())
}

/// `secs` and `micros` since the epoch as the default format writes them (RFC 3339, UTC,
/// `2026-12-01T21:11:09.906502Z`), for the years 1970 to 9999. The date and time to the
/// second are made once a second (per thread): most of the default timer's cost.
fn timestamp(secs: u64, micros: u32) -> Option<[u8; 27]> {
    use std::cell::Cell;
    thread_local! {
        static SECOND: Cell<Option<(u64, [u8; 19])>> = const { Cell::new(None) };
    }
    if secs > 253_402_300_799 {
        return None; // after 9999: the default writes the year its own way
    }
    let two = |out: &mut [u8], v: u64| {
        out[0] = b'0' + (v / 10) as u8;
        out[1] = b'0' + (v % 10) as u8;
    };
    let head = match SECOND.with(Cell::get) {
        Some((s, head)) if s == secs => head,
        _ => {
            // Days to a civil date (the proleptic Gregorian calendar, from 0000-03-01).
            let z = secs / 86_400 + 719_468;
            let era = z / 146_097;
            let doe = z - era * 146_097;
            let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
            let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
            let mp = (5 * doy + 2) / 153;
            let day = doy - (153 * mp + 2) / 5 + 1;
            let month = if mp < 10 { mp + 3 } else { mp - 9 };
            let year = yoe + era * 400 + u64::from(month <= 2);
            let t = secs % 86_400;
            let mut head = *b"0000-00-00T00:00:00";
            two(&mut head[0..2], year / 100);
            two(&mut head[2..4], year % 100);
            two(&mut head[5..7], month);
            two(&mut head[8..10], day);
            two(&mut head[11..13], t / 3_600);
            two(&mut head[14..16], t / 60 % 60);
            two(&mut head[17..19], t % 60);
            SECOND.with(|c| c.set(Some((secs, head))));
            head
        }
    };
    let mut out = *b"0000-00-00T00:00:00.000000Z";
    out[..19].copy_from_slice(&head);
    let mut m = micros;
    for i in (20..26).rev() {
        out[i] = b'0' + (m % 10) as u8;
        m /= 10;
    }
    Some(out)
}

/// The request line's fields as the default format writes them: `message` bare (control
/// characters escaped), the others `name=value` with the value's `Debug`, one space apart.
struct LineFields {
    out: String,
    first: bool,
    /// A field the default format writes in its own way (an error value, with its sources):
    /// the line is left to it.
    unsupported: bool,
}

impl LineFields {
    fn name(&mut self, name: &str) {
        if !std::mem::take(&mut self.first) {
            self.out.push(' ');
        }
        self.out.push_str(name.strip_prefix("r#").unwrap_or(name));
        self.out.push('=');
    }
}

impl tracing::field::Visit for LineFields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write;
        if field.name().starts_with("log.") {
            return;
        }
        if field.name() == "message" {
            if !std::mem::take(&mut self.first) {
                self.out.push(' ');
            }
            let start = self.out.len();
            let _ = write!(self.out, "{value:?}");
            if self.out[start..].chars().any(|c| {
                matches!(
                    c,
                    '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' | '\u{80}'..='\u{9f}'
                )
            }) {
                let raw = self.out.split_off(start);
                for c in raw.chars() {
                    match c {
                        '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' => {
                            let _ = write!(self.out, "\\x{:02x}", c as u32);
                        }
                        '\u{80}'..='\u{9f}' => {
                            let _ = write!(self.out, "\\u{{{:x}}}", c as u32);
                        }
                        c => self.out.push(c),
                    }
                }
            }
            return;
        }
        self.name(field.name());
        let _ = write!(self.out, "{value:?}");
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        if field.name().starts_with("log.") {
            return;
        }
        self.name(field.name());
        let mut digits = [0; 20];
        let digits = decimal(value, &mut digits);
        self.out
            .push_str(std::str::from_utf8(digits).expect("ascii digits"));
    }

    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        if field.name().starts_with("log.") {
            return;
        }
        self.name(field.name());
        self.out.push_str(if value { "true" } else { "false" });
    }

    fn record_error(
        &mut self,
        field: &tracing::field::Field,
        value: &(dyn std::error::Error + 'static),
    ) {
        let _ = (field, value);
        self.unsupported = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    thread_local! {
        /// Lines `LineFormat` wrote itself, on this thread.
        pub(super) static FAST_LINES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// A writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Writes the request lines of `lines` under the default format and under `LineFormat`.
    fn both(lines: impl Fn()) -> (String, String) {
        let run = |fast: bool| {
            let buf = Buf::default();
            let out = buf.clone();
            let builder = tracing_subscriber::fmt()
                .with_writer(move || out.clone())
                .with_ansi(false);
            if fast {
                let sub = builder
                    .event_format(LineFormat::new(tracing_subscriber::fmt::format()))
                    .finish();
                tracing::subscriber::with_default(sub, &lines);
            } else {
                tracing::subscriber::with_default(builder.finish(), &lines);
            }
            let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
            comparable(&text)
        };
        (run(false), run(true))
    }

    /// The lines of `text` without what differs between two writings of one line: the
    /// timestamps, and the milliseconds on a busy machine.
    fn comparable(text: &str) -> String {
        text.lines()
            .map(|l| {
                let rest = l.split_once(' ').expect("a timestamp").1;
                match rest.split_once(" ms=") {
                    Some((a, b)) => {
                        let b = b.trim_start_matches(|c: char| c.is_ascii_digit());
                        format!("{a} ms=N{b}")
                    }
                    None => rest.to_string(),
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// A line written around `tracing` is the line `LineFormat` writes for it; the lines it
    /// leaves to `tracing` are those `LineFormat` would not write the same way.
    #[test]
    fn a_request_line_written_around_tracing_is_the_same_line() {
        let peer: Arc<str> = Arc::from("[::1]:4242");
        let line = |method, path: &str, status, outcome| {
            Pending::new(peer.clone(), method, path.into(), Instant::now()).answered(
                StatusCode::from_u16(status).unwrap(),
                Some(1037),
                outcome,
                None,
            )
        };
        let buf = Buf::default();
        let out = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .with_ansi(false)
            .event_format(LineFormat::new(tracing_subscriber::fmt::format()))
            .finish();
        let mut direct = Vec::new();
        tracing::subscriber::with_default(sub, || {
            let cases = [
                (
                    Method::GET,
                    "/v2/a/b/manifests/v1",
                    200,
                    Some(Outcome::Hit),
                    End::Complete,
                ),
                (
                    Method::HEAD,
                    "/v2/x/blobs/sha256:00",
                    404,
                    None,
                    End::Complete,
                ),
                (
                    Method::GET,
                    "/v2/x/blobs/sha256:01",
                    200,
                    Some(Outcome::Fill),
                    End::Dropped,
                ),
            ];
            for (method, path, status, outcome, end) in cases {
                let sent = if matches!(end, End::Dropped) { 3 } else { 1037 };
                let written = line(method.clone(), path, status, outcome).format_direct(
                    sent,
                    &end,
                    &mut direct,
                );
                assert!(written, "{path}");
                line(method, path, status, outcome).write(sent, end);
            }
            let failed: BoxError = "cut short".into();
            let not = [
                line(Method::GET, "/v2/", 502, None).format_direct(0, &End::Complete, &mut direct),
                line(Method::GET, "/v2/", 200, None).format_direct(
                    0,
                    &End::Failed(&failed),
                    &mut direct,
                ),
                Pending::new(peer.clone(), Method::GET, "/v2/".into(), Instant::now())
                    .answered(
                        StatusCode::NOT_FOUND,
                        Some(0),
                        None,
                        Some(Error::client(crate::error::ErrorCode::NameUnknown, "no")),
                    )
                    .format_direct(0, &End::Complete, &mut direct),
                tracing::info_span!("in_a_span").in_scope(|| {
                    line(Method::GET, "/v2/", 200, None).format_direct(
                        0,
                        &End::Complete,
                        &mut direct,
                    )
                }),
            ];
            assert_eq!(not, [false; 4], "left to tracing");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let formatted = comparable(&text);
        assert_eq!(formatted.lines().count(), 3, "{formatted}");
        assert_eq!(comparable(std::str::from_utf8(&direct).unwrap()), formatted);
        // With no subscriber that wants INFO lines of this target, nothing is written.
        let quiet = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .finish();
        tracing::subscriber::with_default(quiet, || {
            let mut none = Vec::new();
            assert!(!line(Method::GET, "/v2/", 200, None).format_direct(
                0,
                &End::Complete,
                &mut none
            ));
            assert!(none.is_empty());
        });
    }

    #[test]
    fn timestamps_as_the_default_format_writes_them() {
        let t =
            |secs, micros| String::from_utf8(timestamp(secs, micros).unwrap().to_vec()).unwrap();
        assert_eq!(t(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(t(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(t(951_868_799, 999_999), "2000-02-29T23:59:59.999999Z");
        assert_eq!(t(1_796_083_199, 906_502), "2026-11-30T23:59:59.906502Z");
        // The same second again (cached), then the next day.
        assert_eq!(t(1_796_083_199, 1), "2026-11-30T23:59:59.000001Z");
        assert_eq!(t(1_796_083_200, 0), "2026-12-01T00:00:00.000000Z");
        assert_eq!(t(4_102_444_800, 0), "2100-01-01T00:00:00.000000Z");
        assert_eq!(t(253_402_300_799, 0), "9999-12-31T23:59:59.000000Z");
        assert!(timestamp(253_402_300_800, 0).is_none());
    }

    #[test]
    fn the_request_line_is_written_as_the_default_format_writes_it() {
        let peer: Arc<str> = Arc::from("127.0.0.1:4242");
        let (default, fast) = both(|| {
            let mut p = Pending::new(
                peer.clone(),
                Method::GET,
                "/v2/a/b/manifests/v1".into(),
                Instant::now(),
            );
            *p.routed() = None;
            let line = p.answered(StatusCode::OK, Some(1037), Some(Outcome::Hit), None);
            line.write(1037, End::Complete);
            let line = Pending::new(
                peer.clone(),
                Method::HEAD,
                "/v2/x/blobs/sha256:00".into(),
                Instant::now(),
            )
            .answered(
                StatusCode::NOT_FOUND,
                Some(0),
                None,
                Some(Error::client(
                    crate::error::ErrorCode::BlobUnknown,
                    "no \"such\" blob\u{1b}[31m",
                )),
            );
            line.write(0, End::Complete);
            let failed: BoxError = "cut short\x07".into();
            let line = Pending::new(
                peer.clone(),
                Method::GET,
                "/v2/x/blobs/sha256:01".into(),
                Instant::now(),
            )
            .answered(StatusCode::OK, Some(10), Some(Outcome::Fill), None);
            line.write(3, End::Failed(&failed));
            // Dropped unanswered: 499, aborted.
            drop(Pending::new(
                peer.clone(),
                Method::GET,
                "/v2/".into(),
                Instant::now(),
            ));
            // Other events are the default format's.
            tracing::info!(target: "ocicache::other", n = 3, "something \x1b else");
            tracing::warn!(target: TARGET, "a request-line target, message with \x1b escape");
        });
        // Its own path wrote the 5 lines of its target (the one with an error value too: it
        // is displayed, not recorded as an error), not the other event.
        assert_eq!(FAST_LINES.with(|n| n.get()), 5);
        assert_eq!(default.lines().count(), 6, "{default}");
        assert!(default.contains("status=499"), "{default}");
        assert_eq!(fast, default);
    }
}
