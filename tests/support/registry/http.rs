//! A tiny blocking HTTP/1.1 client, used both for the registry and for the proxy under
//! test: no runtime needed, redirects not followed, every byte of the answer kept.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Connect timeout of the HTTP helper.
const HTTP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Read/write timeout of the HTTP helper (per socket operation).
pub const HTTP_IO_TIMEOUT: Duration = Duration::from_secs(120);

/// Status, headers (names lower-cased, in order), body.
pub type HttpResponse = (u16, Vec<(String, String)>, Vec<u8>);

/// First value of header `name` (case-insensitive).
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// `GET url`. Panics on a connection/IO error (use `try_http_request` to
/// observe those).
pub fn http_get(url: &str, headers: &[(&str, &str)]) -> HttpResponse {
    http_request("GET", url, headers, b"")
}

/// Any method (`HEAD` responses have an empty body). Redirects are NOT
/// followed. Sends `Connection: close` unless a Connection header is given.
/// Panics on a connection/IO error.
pub fn http_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    try_http_request(method, url, headers, body).unwrap_or_else(|e| panic!("{method} {url}: {e}"))
}

/// Like `http_request` but returns IO errors (connection refused, timeout,
/// malformed response) instead of panicking.
pub fn try_http_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    try_http_request_timeout(method, url, headers, body, HTTP_IO_TIMEOUT)
}

/// Resolve a possibly relative `Location` against `base` ("http://host:port").
pub fn absolute_url(base: &str, location: &str) -> String {
    if location.starts_with("http://") || location.starts_with("https://") {
        location.to_string()
    } else if location.starts_with('/') {
        format!("{}{location}", base.trim_end_matches('/'))
    } else {
        format!("{}/{location}", base.trim_end_matches('/'))
    }
}

fn bad(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

/// `(authority, host for DNS, port, path-and-query)` of an `http://` URL.
fn split_url(url: &str) -> std::io::Result<(String, String, u16, String)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| bad(format!("only http:// URLs are supported: {url}")))?;
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
        Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
        None => (rest, "/".to_string()),
    };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| bad("bad IPv6 authority"))?;
        let port = after.strip_prefix(':').map(|p| p.parse()).transpose();
        (
            h.to_string(),
            port.map_err(|_| bad("bad port"))?.unwrap_or(80),
        )
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad("bad port"))?),
            None => (authority.to_string(), 80),
        }
    };
    Ok((authority.to_string(), host, port, path))
}

/// `try_http_request` with an explicit per-operation IO timeout.
pub fn try_http_request_timeout(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> std::io::Result<HttpResponse> {
    let (authority, host, port, path) = split_url(url)?;
    let mut last_err = None;
    let mut stream = None;
    for a in (host.as_str(), port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, HTTP_CONNECT_TIMEOUT.min(timeout)) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last_err = Some(e),
        }
    }
    let stream = match stream {
        Some(s) => s,
        None => return Err(last_err.unwrap_or_else(|| bad("no address"))),
    };
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let _ = stream.set_nodelay(true);

    let has = |n: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(n));
    let mut req = format!("{method} {path} HTTP/1.1\r\n");
    if !has("host") {
        req.push_str(&format!("Host: {authority}\r\n"));
    }
    if !has("connection") {
        req.push_str("Connection: close\r\n");
    }
    if !has("user-agent") {
        req.push_str("User-Agent: ocicache-test-harness/1\r\n");
    }
    let wants_len = !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH");
    if wants_len && !has("content-length") && !has("transfer-encoding") {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut w = &stream;
    w.write_all(req.as_bytes())?;
    // A server may answer (e.g. 413/400) and close before reading the whole
    // body: then report its response rather than the write error.
    let mut write_err = w.write_all(body).and_then(|_| w.flush()).err();

    let mut r = BufReader::new(&stream);
    let (status, resp_headers) = loop {
        let (status, hs) = match read_head(&mut r) {
            Ok(v) => v,
            Err(e) => return Err(write_err.take().unwrap_or(e)),
        };
        // skip interim responses (100 Continue, 103 Early Hints)
        if (100..200).contains(&status) && status != 101 {
            continue;
        }
        break (status, hs);
    };
    let no_body = method.eq_ignore_ascii_case("HEAD")
        || status == 204
        || status == 304
        || (100..200).contains(&status);
    let mut out = Vec::new();
    if !no_body {
        let chunked = header(&resp_headers, "transfer-encoding")
            .map(|v| v.to_ascii_lowercase().contains("chunked"))
            .unwrap_or(false);
        if chunked {
            read_chunked(&mut r, &mut out)?;
        } else if let Some(len) = header(&resp_headers, "content-length") {
            let len: usize = len.trim().parse().map_err(|_| bad("bad Content-Length"))?;
            out.resize(len, 0);
            r.read_exact(&mut out)?;
        } else {
            r.read_to_end(&mut out)?;
        }
    }
    Ok((status, resp_headers, out))
}

fn read_line_crlf<R: BufRead>(r: &mut R) -> std::io::Result<String> {
    let mut buf = Vec::new();
    let n = r.read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed before a complete response",
        ));
    }
    while matches!(buf.last(), Some(b'\n' | b'\r')) {
        buf.pop();
    }
    String::from_utf8(buf).map_err(|_| bad("non-UTF-8 header line"))
}

fn read_head<R: BufRead>(r: &mut R) -> std::io::Result<(u16, Vec<(String, String)>)> {
    let status_line = read_line_crlf(r)?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(bad(format!("bad status line: {status_line:?}")));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line: {status_line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let line = read_line_crlf(r)?;
        if line.is_empty() {
            break;
        }
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| bad(format!("bad header line: {line:?}")))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    Ok((status, headers))
}

fn read_chunked<R: BufRead>(r: &mut R, out: &mut Vec<u8>) -> std::io::Result<()> {
    loop {
        let line = read_line_crlf(r)?;
        let size_str = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_str, 16)
            .map_err(|_| bad(format!("bad chunk size line: {line:?}")))?;
        if size == 0 {
            // trailers until the empty line
            loop {
                if read_line_crlf(r)?.is_empty() {
                    return Ok(());
                }
            }
        }
        let start = out.len();
        out.resize(start + size, 0);
        r.read_exact(&mut out[start..])?;
        let mut crlf = [0u8; 2];
        r.read_exact(&mut crlf)?;
        if &crlf != b"\r\n" {
            return Err(bad("chunk not followed by CRLF"));
        }
    }
}
