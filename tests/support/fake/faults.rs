//! The fake's fault modes, and the plan of a request's answer: record it, check auth, pick
//! the fault that applies, and build the answer it changes.

use std::time::Duration;

use bytes::Bytes;

use super::auth::basic_matches;
use super::counters::Recorded;
use super::http::{Mode, Request, Response};
use super::routing::Route;
use super::{sha256, Auth, Shared, Store};

/// The parameter `RedirectLoop` counts its hops in.
const LOOP_PARAM: &str = "fake_loop";

#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer with this status and an OCI error body (`{"errors":[{"code":..}]}`: UNAUTHORIZED,
    /// DENIED, BLOB_UNKNOWN/MANIFEST_UNKNOWN/NAME_UNKNOWN, TOOMANYREQUESTS, UNAVAILABLE or
    /// UNKNOWN). A 401 carries the `WWW-Authenticate` challenge of the current auth mode
    /// (none in `Auth::None`; Basic at `/token`).
    Status(u16),
    /// 429 with this `Retry-After` and a TOOMANYREQUESTS error body.
    TooMany { retry_after: String },
    /// Read the request, then close the connection without answering.
    Refuse,
    /// Read the request, never answer; the connection stays open until the fake drops.
    Hang,
    /// Answer normally after this delay (the headers come after the delay).
    Delay(Duration),
    /// Same length and headers (the right digest), one byte changed near the middle of the
    /// body. Text stays valid (a letter or digit is swapped for another), so JSON still parses
    /// and only a digest check finds it. An empty body is left as it is.
    CorruptBody,
    /// Announce the full Content-Length, send only N bytes (at most length - 1, so it is
    /// always short), then close the connection (FIN).
    ShortBody(usize),
    /// Announce a Content-Length of half the body (and `Connection: close`), then send the
    /// whole body and 1 KiB of junk after it, then close. A client that obeys Content-Length
    /// gets the first half only, whose digest is wrong; the rest is junk on the connection.
    LongBody,
    /// Announce the full Content-Length (and `Connection: close`), send the right body, then
    /// these many junk bytes, then close. A client that obeys Content-Length gets the right body. (Not in the brief:
    /// the literal "correct body plus trailing bytes" case.)
    TrailingGarbage(usize),
    /// `Transfer-Encoding: chunked` (64 KiB chunks), no Content-Length, right bytes.
    NoContentLength,
    /// Announce the full Content-Length, send N bytes (at most length - 1), then send
    /// nothing more; the connection stays open until the fake drops.
    StallAfter(usize),
    /// Announce the full Content-Length, send N bytes (at most length - 1), wait 100 ms, then
    /// reset the connection (RST). The client may see fewer than N bytes: a reset discards
    /// what it had not read yet.
    ResetAfter(usize),
    /// The right body with the full Content-Length, in `chunk`-byte pieces with `delay`
    /// between them (the headers and the first piece go out at once).
    Slow { chunk: usize, delay: Duration },
    /// `Docker-Content-Digest` names another valid-looking sha256 digest (added if the answer
    /// had none). Body unchanged.
    LieDigest,
    /// 307 to this absolute URL followed by the original path and query (for another origin:
    /// another Fake's `url()`).
    RedirectTo(String),
    /// 307 to this same fake, same path, with `fake_loop=<n+1>` in the query, forever.
    RedirectLoop,
    /// The normal answer plus a response header `X-Fake-Huge` of this many bytes.
    HugeHeader(usize),
}

impl Fault {
    /// Faults about the body, which HEAD requests skip.
    fn body_only(&self) -> bool {
        matches!(
            self,
            Fault::CorruptBody
                | Fault::ShortBody(_)
                | Fault::LongBody
                | Fault::TrailingGarbage(_)
                | Fault::NoContentLength
                | Fault::StallAfter(_)
                | Fault::ResetAfter(_)
                | Fault::Slow { .. }
        )
    }
}

pub(super) struct FaultRule {
    pub(super) path_contains: String,
    pub(super) fault: Fault,
    pub(super) remaining: Option<usize>,
}

pub(super) enum Action {
    Respond,
    Refuse,
    Hang,
}

pub(super) struct Plan {
    pub(super) action: Action,
    pub(super) response: Response,
    pub(super) mode: Mode,
    pub(super) delay: Option<Duration>,
}

impl Plan {
    pub(super) fn respond(response: Response) -> Plan {
        Plan {
            action: Action::Respond,
            response,
            mode: Mode::Normal,
            delay: None,
        }
    }
}

impl Shared {
    /// Everything about a request that is decided under the lock: record it, check auth,
    /// pick the fault, build the answer.
    pub(super) fn plan(&self, req: &Request) -> Plan {
        let mut st = self.lock();
        st.requests.push(Recorded {
            method: req.method.clone(),
            path: req.path.clone(),
            query: req.query.clone(),
            headers: req.headers.clone(),
        });
        let route = Route::parse(&req.path);
        let registry = req.path == "/v2" || req.path.starts_with("/v2/");

        // Auth first: a 401 for a missing or bad token/credentials uses no fault.
        if let Route::Token = route {
            if let Auth::Bearer {
                creds: Some((user, pass)),
                ..
            } = &st.auth
            {
                if !basic_matches(req, user, pass) {
                    return Plan::respond(
                        Response::error(401, "UNAUTHORIZED", "token service: credentials required")
                            .header("WWW-Authenticate", "Basic realm=\"fake\""),
                    );
                }
            }
        } else if registry {
            if let Some(denied) = st.check_auth(req, &route, &self.url) {
                return Plan::respond(denied);
            }
        }

        let fault = st.take_fault(req);
        let ratelimit_remaining = st.ratelimit_remaining.clone();
        let challenge = if let Route::Token = route {
            Some("Basic realm=\"fake\"".to_string())
        } else {
            st.challenge(&route, &self.url)
        };
        drop(st);

        let with_query = |base: &str, query: Option<String>| match query {
            Some(q) if !q.is_empty() => format!("{base}{}?{q}", req.path),
            _ => format!("{base}{}", req.path),
        };
        let mut plan = match &fault {
            Some(Fault::Refuse) => Plan {
                action: Action::Refuse,
                ..Plan::respond(Response::new(0))
            },
            Some(Fault::Hang) => Plan {
                action: Action::Hang,
                ..Plan::respond(Response::new(0))
            },
            Some(Fault::Status(status)) => {
                let status = *status;
                let code = match status {
                    401 => "UNAUTHORIZED",
                    403 => "DENIED",
                    404 => route.not_found_code(),
                    429 => "TOOMANYREQUESTS",
                    503 => "UNAVAILABLE",
                    _ => "UNKNOWN",
                };
                let mut r = Response::error(status, code, &format!("fake fault: status {status}"));
                if status == 401 {
                    if let Some(c) = challenge {
                        r = r.header("WWW-Authenticate", c);
                    }
                }
                Plan::respond(r)
            }
            Some(Fault::TooMany { retry_after }) => Plan::respond(
                Response::error(429, "TOOMANYREQUESTS", "fake fault: too many requests")
                    .header("Retry-After", retry_after.clone()),
            ),
            Some(Fault::RedirectTo(url)) => Plan::respond(Response::new(307).header(
                "Location",
                with_query(url.trim_end_matches('/'), req.query.clone()),
            )),
            Some(Fault::RedirectLoop) => {
                let mut n = 0u64;
                let mut kept = Vec::new();
                for pair in req
                    .query
                    .as_deref()
                    .unwrap_or("")
                    .split('&')
                    .filter(|p| !p.is_empty())
                {
                    match pair
                        .strip_prefix(LOOP_PARAM)
                        .and_then(|v| v.strip_prefix('='))
                    {
                        Some(v) => n = v.parse().unwrap_or(0),
                        None => kept.push(pair.to_string()),
                    }
                }
                kept.push(format!("{LOOP_PARAM}={}", n + 1));
                Plan::respond(
                    Response::new(307)
                        .header("Location", with_query(&self.url, Some(kept.join("&")))),
                )
            }
            _ => Plan::respond(self.route(req, &route)),
        };
        if registry {
            plan.response.headers.push((
                "Docker-Distribution-API-Version".into(),
                "registry/2.0".into(),
            ));
            if let Some(r) = ratelimit_remaining {
                plan.response
                    .headers
                    .push(("ratelimit-remaining".into(), r));
            }
        }
        match fault {
            None
            | Some(Fault::Refuse)
            | Some(Fault::Hang)
            | Some(Fault::Status(_))
            | Some(Fault::TooMany { .. })
            | Some(Fault::RedirectTo(_))
            | Some(Fault::RedirectLoop) => {}
            Some(Fault::Delay(d)) => plan.delay = Some(d),
            Some(Fault::LieDigest) => {
                let mut other = plan.response.body.to_vec();
                other.extend_from_slice(b"fake: a lie");
                plan.response
                    .set_header("Docker-Content-Digest", sha256(&other));
            }
            Some(Fault::HugeHeader(n)) => plan
                .response
                .headers
                .push(("X-Fake-Huge".into(), "h".repeat(n))),
            Some(Fault::CorruptBody) => plan.response.body = corrupt(&plan.response.body),
            Some(Fault::ShortBody(n)) => plan.mode = Mode::Short(n),
            Some(Fault::LongBody) => plan.mode = Mode::Long,
            Some(Fault::TrailingGarbage(n)) => plan.mode = Mode::Trailing(n),
            Some(Fault::NoContentLength) => plan.mode = Mode::Chunked,
            Some(Fault::StallAfter(n)) => plan.mode = Mode::Stall(n),
            Some(Fault::ResetAfter(n)) => plan.mode = Mode::Reset(n),
            Some(Fault::Slow { chunk, delay }) => plan.mode = Mode::Slow(chunk.max(1), delay),
        }
        plan
    }
}

impl Store {
    /// The fault for this request, if any, its use counted.
    pub(super) fn take_fault(&mut self, req: &Request) -> Option<Fault> {
        let head = req.method == "HEAD";
        let i = self.faults.iter().rposition(|f| {
            req.path.contains(&f.path_contains)
                && f.remaining != Some(0)
                && !(head && f.fault.body_only())
        })?;
        let rule = &mut self.faults[i];
        let fault = rule.fault.clone();
        if let Some(n) = &mut rule.remaining {
            *n -= 1;
            if *n == 0 {
                self.faults.remove(i);
            }
        }
        Some(fault)
    }
}

/// One byte changed near the middle: a letter or digit becomes another of its kind when one
/// is near, so text stays text; otherwise the middle byte is inverted.
fn corrupt(body: &Bytes) -> Bytes {
    if body.is_empty() {
        return body.clone();
    }
    let mut v = body.to_vec();
    let mid = v.len() / 2;
    let pick = (0..v.len().min(4096))
        .flat_map(|d| [mid.checked_add(d), mid.checked_sub(d)])
        .flatten()
        .find(|&i| i < v.len() && v[i].is_ascii_alphanumeric());
    match pick {
        Some(i) => {
            v[i] = match v[i] {
                b'9' => b'8',
                b'z' => b'y',
                b'Z' => b'Y',
                c => c + 1,
            }
        }
        None => v[mid] ^= 0xff,
    }
    Bytes::from(v)
}
