//! The fake's HTTP/1.1, by hand over tokio `TcpStream`s, so that a fault can break the
//! stream at any byte after the headers have gone out: requests read, answers written in
//! each body mode a fault asks for.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::faults::Action;
use super::Shared;

/// Longest request head (request line and headers) the fake reads: beyond it, 431.
const MAX_HEAD: usize = 64 << 10;
/// How long `ResetAfter` waits between sending its bytes and the reset, so that they reach
/// the client first.
const RESET_PAUSE: Duration = Duration::from_millis(100);
/// How many extra bytes `LongBody` sends after the whole body.
const LONG_EXTRA: usize = 1024;

pub(super) struct Request {
    pub(super) method: String,
    pub(super) path: String,
    pub(super) query: Option<String>,
    pub(super) headers: Vec<(String, String)>,
    pub(super) keep_alive: bool,
}

impl Request {
    pub(super) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

pub(super) struct Response {
    pub(super) status: u16,
    pub(super) headers: Vec<(String, String)>,
    pub(super) body: Bytes,
}

impl Response {
    pub(super) fn new(status: u16) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    pub(super) fn header(mut self, name: &str, value: impl Into<String>) -> Response {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    pub(super) fn set_header(&mut self, name: &str, value: String) {
        self.headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        self.headers.push((name.to_string(), value));
    }

    pub(super) fn body(mut self, body: impl Into<Bytes>) -> Response {
        self.body = body.into();
        self
    }

    pub(super) fn json(status: u16, value: serde_json::Value) -> Response {
        Response::new(status)
            .header("Content-Type", "application/json")
            .body(serde_json::to_vec(&value).unwrap())
    }

    pub(super) fn error(status: u16, code: &str, message: &str) -> Response {
        Response::json(
            status,
            serde_json::json!({"errors": [{"code": code, "message": message, "detail": null}]}),
        )
    }
}

/// How the body goes out.
pub(super) enum Mode {
    Normal,
    Chunked,
    Short(usize),
    Long,
    Trailing(usize),
    Stall(usize),
    Reset(usize),
    Slow(usize, Duration),
}

pub(super) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hexval = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hexval(b[i + 1]), hexval(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `a=b&c=d`, percent-decoded, `+` as space.
pub(super) fn query_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                percent_decode(&k.replace('+', " ")),
                percent_decode(&v.replace('+', " ")),
            )
        })
        .collect()
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

// ---------------------------------------------------------------------------------------------
// The connection: hand-written HTTP/1.1

enum ReadError {
    /// Closed, reset, or an IO error: nothing to answer.
    Gone,
    /// Answer this status, then close.
    Bad(u16),
}

impl From<std::io::Error> for ReadError {
    fn from(_: std::io::Error) -> ReadError {
        ReadError::Gone
    }
}

struct Conn {
    sock: TcpStream,
    buf: Vec<u8>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Conn {
    /// Read more bytes into the buffer; false at EOF.
    async fn fill(&mut self) -> std::io::Result<bool> {
        let mut tmp = [0u8; 16 << 10];
        let n = self.sock.read(&mut tmp).await?;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n > 0)
    }

    async fn read_line(&mut self) -> Result<String, ReadError> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return Ok(line);
            }
            if self.buf.len() > 8192 {
                return Err(ReadError::Bad(400));
            }
            if !self.fill().await? {
                return Err(ReadError::Gone);
            }
        }
    }

    async fn discard(&mut self, mut n: u64) -> Result<(), ReadError> {
        loop {
            let take = (self.buf.len() as u64).min(n) as usize;
            self.buf.drain(..take);
            n -= take as u64;
            if n == 0 {
                return Ok(());
            }
            if !self.fill().await? {
                return Err(ReadError::Gone);
            }
        }
    }

    /// The next request, its body read and thrown away; None when the client closed
    /// between requests.
    async fn read_request(&mut self) -> Result<Option<Request>, ReadError> {
        let end = loop {
            while self.buf.starts_with(b"\r\n") {
                self.buf.drain(..2);
            }
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            if self.buf.len() > MAX_HEAD {
                return Err(ReadError::Bad(431));
            }
            if !self.fill().await? {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ReadError::Gone)
                };
            }
        };
        if end > MAX_HEAD {
            return Err(ReadError::Bad(431));
        }
        let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let mut parts = lines.next().unwrap_or("").split_whitespace();
        let (Some(method), Some(target), Some(version), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(ReadError::Bad(400));
        };
        if !version.starts_with("HTTP/1.") {
            return Err(ReadError::Bad(505));
        }
        let mut headers = Vec::new();
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                return Err(ReadError::Bad(400));
            };
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
        // Absolute form: keep the path and query.
        let mut target = target.to_string();
        for scheme in ["http://", "https://"] {
            if let Some(rest) = target.strip_prefix(scheme) {
                target = match rest.find('/') {
                    Some(i) => rest[i..].to_string(),
                    None => "/".to_string(),
                };
                break;
            }
        }
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p.to_string(), Some(q.to_string())),
            None => (target, None),
        };
        let req = Request {
            method: method.to_string(),
            path,
            query,
            headers,
            keep_alive: false,
        };
        let connection = req.header("connection").unwrap_or("").to_ascii_lowercase();
        let keep_alive = if version == "HTTP/1.0" {
            connection.contains("keep-alive")
        } else {
            !connection.contains("close")
        };
        let req = Request { keep_alive, ..req };

        let chunked = req
            .header("transfer-encoding")
            .is_some_and(|t| t.to_ascii_lowercase().contains("chunked"));
        let length = match req.header("content-length") {
            Some(v) => Some(v.parse::<u64>().map_err(|_| ReadError::Bad(400))?),
            None => None,
        };
        let has_body = chunked || length.is_some_and(|n| n > 0);
        if has_body
            && req
                .header("expect")
                .is_some_and(|e| e.eq_ignore_ascii_case("100-continue"))
        {
            self.sock
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await?;
        }
        if chunked {
            loop {
                let line = self.read_line().await?;
                let size = line.split(';').next().unwrap_or("").trim();
                let size = u64::from_str_radix(size, 16).map_err(|_| ReadError::Bad(400))?;
                if size == 0 {
                    while !self.read_line().await?.is_empty() {}
                    break;
                }
                self.discard(size).await?;
                if !self.read_line().await?.is_empty() {
                    return Err(ReadError::Bad(400));
                }
            }
        } else if let Some(n) = length {
            self.discard(n).await?;
        }
        Ok(Some(req))
    }
}

enum After {
    KeepAlive,
    Close,
    Hang,
}

pub(super) async fn serve_connection(shared: Arc<Shared>, sock: TcpStream) {
    let mut conn = Conn {
        sock,
        buf: Vec::new(),
    };
    loop {
        let req = match conn.read_request().await {
            Ok(Some(req)) => req,
            Ok(None) | Err(ReadError::Gone) => return,
            Err(ReadError::Bad(status)) => {
                let r =
                    Response::error(status, "UNSUPPORTED", "the fake could not read the request");
                let _ = write_response(&mut conn.sock, r, false, Mode::Normal, false).await;
                return;
            }
        };
        let plan = shared.plan(&req);
        match plan.action {
            Action::Respond => {}
            Action::Refuse => {
                let _ = conn.sock.shutdown().await;
                return;
            }
            Action::Hang => std::future::pending::<()>().await,
        }
        if let Some(d) = plan.delay {
            tokio::time::sleep(d).await;
        }
        let head_only = req.method == "HEAD";
        match write_response(
            &mut conn.sock,
            plan.response,
            head_only,
            plan.mode,
            req.keep_alive,
        )
        .await
        {
            Ok(After::KeepAlive) => {}
            Ok(After::Close) | Err(_) => return,
            Ok(After::Hang) => std::future::pending::<()>().await,
        }
    }
}

async fn write_response(
    sock: &mut TcpStream,
    r: Response,
    head_only: bool,
    mode: Mode,
    keep_alive: bool,
) -> std::io::Result<After> {
    let no_body = r.status < 200 || r.status == 204 || r.status == 304;
    let len = r.body.len();
    let mut head = format!("HTTP/1.1 {} {}\r\n", r.status, reason(r.status));
    for (k, v) in &r.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !no_body {
        match mode {
            Mode::Chunked => head.push_str("Transfer-Encoding: chunked\r\n"),
            Mode::Long if !head_only => head.push_str(&format!("Content-Length: {}\r\n", len / 2)),
            _ => head.push_str(&format!("Content-Length: {len}\r\n")),
        }
    }
    // A connection that will carry junk after the body is announced as closing, so a client
    // does not put it back in its pool (where the junk would fail an unrelated request).
    let normal = matches!(mode, Mode::Normal | Mode::Chunked | Mode::Slow(..));
    let junk_follows = matches!(mode, Mode::Long | Mode::Trailing(_));
    if (normal && !keep_alive) || junk_follows {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    sock.write_all(head.as_bytes()).await?;

    let finish = |keep_alive: bool| {
        if keep_alive {
            After::KeepAlive
        } else {
            After::Close
        }
    };
    if head_only || no_body {
        sock.flush().await?;
        if !keep_alive {
            let _ = sock.shutdown().await;
        }
        return Ok(finish(keep_alive));
    }
    // At most len - 1 bytes, so a cut body is always short.
    let cut = |n: usize| n.min(len.saturating_sub(1));
    let body = &r.body[..];
    match mode {
        Mode::Normal => sock.write_all(body).await?,
        Mode::Chunked => {
            for chunk in body.chunks(64 << 10) {
                sock.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                    .await?;
                sock.write_all(chunk).await?;
                sock.write_all(b"\r\n").await?;
            }
            sock.write_all(b"0\r\n\r\n").await?;
        }
        Mode::Slow(chunk, delay) => {
            for (i, piece) in body.chunks(chunk).enumerate() {
                if i > 0 {
                    tokio::time::sleep(delay).await;
                }
                sock.write_all(piece).await?;
                sock.flush().await?;
            }
        }
        Mode::Short(n) => {
            sock.write_all(&body[..cut(n)]).await?;
            sock.flush().await?;
            let _ = sock.shutdown().await;
            return Ok(After::Close);
        }
        // The whole body and junk after it (`Long` announced half the length).
        Mode::Long | Mode::Trailing(_) => {
            let extra = match mode {
                Mode::Trailing(n) => n,
                _ => LONG_EXTRA,
            };
            sock.write_all(body).await?;
            sock.write_all(&junk(extra)).await?;
            sock.flush().await?;
            let _ = sock.shutdown().await;
            return Ok(After::Close);
        }
        Mode::Stall(n) => {
            sock.write_all(&body[..cut(n)]).await?;
            sock.flush().await?;
            return Ok(After::Hang);
        }
        Mode::Reset(n) => {
            sock.write_all(&body[..cut(n)]).await?;
            sock.flush().await?;
            tokio::time::sleep(RESET_PAUSE).await;
            let _ = sock.set_zero_linger();
            return Ok(After::Close); // dropping the socket now sends RST
        }
    }
    sock.flush().await?;
    if !keep_alive {
        let _ = sock.shutdown().await;
    }
    Ok(finish(keep_alive))
}

fn junk(n: usize) -> Vec<u8> {
    b"fake: bytes past the end of the body\r\n"
        .iter()
        .copied()
        .cycle()
        .take(n)
        .collect()
}
