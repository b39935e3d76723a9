//! The status page, `GET /` of the admin listener: one HTML page rendered here, with no
//! external resource of any kind (inline CSS, CSS bars and an inline SVG, no fonts, no
//! framework), so that it works in an air-gapped site and over a bad link. A few lines of
//! script refresh it every few seconds; without scripts, a `<meta http-equiv=refresh>` does.
//! Its `Content-Security-Policy` lets the browser load nothing from anywhere else.
//!
//! Its figures come from where `/metrics` and `/api/v1/cache` read theirs, at the moment it
//! is rendered: the cache's index and fills, the metrics' counters, and [`crate::status`]
//! for what the metrics do not keep. Each figure carries its exact value in a `data-value`
//! attribute beside the human text (tests and scripts read those). Every string that comes
//! from outside (image names, error causes) is escaped.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{header, HeaderValue, Response, StatusCode};

use super::Admin;
use crate::cache::inventory::FillStatus;
use crate::clock;
use crate::prefetch::human;
use crate::server::body::{self, Body};
use crate::status::{HealthView, Recent, UpState, CLASSES, WINDOW};

/// How often the script reloads the figures.
const REFRESH_SECS: u64 = 5;
/// Rows of the most pulled images.
const TOP_IMAGES: usize = 10;

/// The browser may load nothing but this page and, for the refresh, the page again.
const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; \
                   connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

/// `GET /`.
pub fn page(admin: &Arc<Admin>) -> Response<Body> {
    let html = render(admin);
    let mut resp = Response::new(body::full(html));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    resp
}

/// The password of `Basic <base64 of user:password>` (any user): how a browser, which
/// cannot send a bearer token, gives the admin token for this page.
pub fn basic_password(authorization: &str) -> Option<String> {
    use base64::Engine as _;
    let encoded = authorization.strip_prefix("Basic ")?.trim();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    Some(text.split_once(':')?.1.to_string())
}

/// The admin API's 401 for the page, with a Basic challenge first so that a browser asks
/// for the token (as the password; any user name).
pub fn unauthorized(mut resp: Response<Body>) -> Response<Body> {
    let bearer = resp.headers_mut().remove(header::WWW_AUTHENTICATE);
    let h = resp.headers_mut();
    h.append(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"ocicache admin: the token is the password\""),
    );
    if let Some(b) = bearer {
        h.append(header::WWW_AUTHENTICATE, b);
    }
    resp
}

/// `s` with the characters that mean something in HTML (text or a quoted attribute)
/// replaced by their entities.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A duration as people say it: `12 s`, `3 min`, `2 h`, `4 d`.
fn span(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min", s / 60),
        3600..=86_399 => format!("{} h", s / 3600),
        _ => format!("{} d", s / 86_400),
    }
}

/// How long ago `t` was, or how far ahead it is: `just now`, `3 min ago`, `in 2 h`.
fn ago(t: SystemTime) -> String {
    match clock::age(t) {
        Duration::MAX => {
            let ahead = t.duration_since(clock::now()).unwrap_or_default();
            format!("in {}", span(ahead))
        }
        d if d < Duration::from_secs(2) => "just now".to_string(),
        d => format!("{} ago", span(d)),
    }
}

/// A time cell: relative, with the UTC time on hover.
fn time_cell(t: Option<SystemTime>) -> String {
    match t {
        None => "<td class=dim>never</td>".to_string(),
        Some(t) => format!(
            "<td title=\"{}\">{}</td>",
            humantime::format_rfc3339_seconds(t),
            ago(t)
        ),
    }
}

fn percent(ratio: Option<f64>) -> String {
    ratio.map_or("–".to_string(), |r| format!("{:.1} %", r * 100.0))
}

/// A right-aligned number cell: `text` shown, `value` exact in `data-value`.
fn num(id: &str, value: impl std::fmt::Display, text: &str) -> String {
    let id = if id.is_empty() {
        String::new()
    } else {
        format!(" id={id}")
    };
    format!(
        "<td class=n{id} data-value=\"{value}\">{}</td>",
        escape(text)
    )
}

/// A bar filled to `ratio` (clamped to 0..=1), with an optional darker part `inner`.
fn bar(ratio: f64, inner: Option<f64>, label: &str) -> String {
    let w = |r: f64| (r.clamp(0.0, 1.0) * 1000.0).round() / 10.0;
    let inner = inner.map_or(String::new(), |i| {
        format!("<span class=pin style=\"width:{}%\"></span>", w(i))
    });
    format!(
        "<div class=bar role=img aria-label=\"{}\"><span style=\"width:{}%\">{inner}</span></div>",
        escape(label),
        w(ratio)
    )
}

fn render(admin: &Arc<Admin>) -> String {
    let state = &admin.state;
    let now = clock::now();
    let mut out = String::with_capacity(32 << 10);
    head(&mut out, now, state.metrics.process_start_time.get());
    out.push_str("<main>");
    cache_section(&mut out, admin);
    traffic_section(&mut out, &state.status.recent());
    fills_section(&mut out, &state.cache.fills_status());
    upstreams_section(&mut out, admin);
    images_section(&mut out, admin);
    errors_section(&mut out, admin);
    sync_section(&mut out, admin);
    pins_section(&mut out, admin);
    out.push_str("</main>");
    out.push_str(SCRIPT);
    script_end(&mut out);
    out.push_str("</body></html>\n");
    out
}

const STYLE: &str = "\
:root{color-scheme:light dark;--fg:#1b1f24;--dim:#6a737d;--line:#d8dde3;--bg:#fff;--box:#f6f8fa;\
--bar:#3b82c4;--pin:#1d4f80;--ok:#1a7f37;--bad:#cf222e;--warn:#9a6700}\
@media (prefers-color-scheme:dark){:root{--fg:#e6edf3;--dim:#8b949e;--line:#30363d;--bg:#0d1117;\
--box:#161b22;--bar:#4f9be0;--pin:#a5cdf5;--ok:#3fb950;--bad:#f85149;--warn:#d29922}}\
*{box-sizing:border-box}\
body{margin:0;padding:.75rem;font:14px/1.4 system-ui,-apple-system,'Segoe UI',sans-serif;\
color:var(--fg);background:var(--bg)}\
header{display:flex;flex-wrap:wrap;gap:.25rem 1rem;align-items:baseline;margin-bottom:.75rem}\
h1{font-size:1.3rem;margin:0}h2{font-size:1rem;margin:0 0 .5rem}\
main{display:grid;gap:.75rem;grid-template-columns:repeat(auto-fit,minmax(min(100%,38rem),1fr))}\
section{background:var(--box);border:1px solid var(--line);border-radius:6px;padding:.6rem .75rem;\
min-width:0}\
.wide{grid-column:1/-1}.scroll{overflow-x:auto}\
table{border-collapse:collapse;width:100%}\
th,td{padding:.2rem .5rem;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}\
th{font-weight:600;color:var(--dim);white-space:nowrap}\
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}\
.dim{color:var(--dim)}.mono{font-family:ui-monospace,monospace;font-size:.9em;word-break:break-all}\
.bar{height:.9rem;background:var(--line);border-radius:3px;overflow:hidden;min-width:6rem}\
.bar>span{display:block;height:100%;background:var(--bar);position:relative}\
.bar .pin{position:absolute;left:0;top:0;background:var(--pin)}\
.state{font-weight:600}.up{color:var(--ok)}.failing{color:var(--bad)}.unused{color:var(--dim)}\
.warn{color:var(--warn)}\
svg{width:100%;height:40px;display:block}svg polyline{fill:none;stroke:var(--bar);stroke-width:1.5}\
a{color:var(--bar)}\
@media (max-width:40rem){body{padding:.4rem;font-size:13px}th,td{padding:.15rem .3rem}}\
";

/// Replaces the figures (not the page: no flicker, the scroll stays) every few seconds.
const SCRIPT: &str = "<script>\
setInterval(function(){fetch(location.href,{cache:'no-store'}).then(function(r){\
if(!r.ok)throw r.status;return r.text()}).then(function(t){\
var d=new DOMParser().parseFromString(t,'text/html');\
document.querySelector('main').replaceWith(d.querySelector('main'));\
document.getElementById('asof').replaceWith(d.getElementById('asof'))}).catch(function(){})},";
/// What closes [`SCRIPT`]: the period, then the tags.
fn script_end(out: &mut String) {
    let _ = write!(out, "{});</script>", REFRESH_SECS * 1000);
}

fn head(out: &mut String, now: SystemTime, started: i64) {
    let up = clock::since_epoch()
        .as_secs()
        .saturating_sub(started.max(0) as u64);
    let _ = write!(
        out,
        "<!doctype html><html lang=en><head><meta charset=utf-8>\
         <meta name=viewport content=\"width=device-width,initial-scale=1\">\
         <noscript><meta http-equiv=refresh content={}></noscript>\
         <title>ocicache status</title><style>{STYLE}</style></head><body>\
         <header><h1>ocicache</h1><span class=dim>{}</span>\
         <span id=asof class=dim>up {}, as of {}</span>\
         <a href=\"/\">reload</a></header>",
        REFRESH_SECS * 2,
        env!("CARGO_PKG_VERSION"),
        span(Duration::from_secs(up)),
        humantime::format_rfc3339_seconds(now),
    );
}

fn cache_section(out: &mut String, admin: &Admin) {
    let cache = &admin.state.cache;
    let (size, blobs) = cache.usage();
    let max = cache.index.max_size();
    let (pinned, over) = cache.index.pinned_usage();
    let ratio = |n: u64| n as f64 / max.max(1) as f64;
    let _ = write!(
        out,
        "<section id=cache><h2>Cache</h2>{}<table><tr><th>used</th>{}<td>{}</td></tr>\
         <tr><th>bound</th>{}<td></td></tr><tr><th>blobs</th>{}<td></td></tr>\
         <tr><th>pinned</th>{}<td>{}</td></tr>\
         <tr><th>index</th><td colspan=2>{}</td></tr></table></section>",
        bar(
            ratio(size),
            (pinned > 0).then(|| ratio(pinned) / ratio(size).max(f64::MIN_POSITIVE)),
            &format!("{} of {} used", human(size), human(max)),
        ),
        num("cache-size", size, &human(size)),
        percent(Some(ratio(size))),
        num("cache-max", max, &human(max)),
        num("cache-blobs", blobs, &blobs.to_string()),
        num("cache-pinned", pinned, &human(pinned)),
        if over {
            "<span class=\"state failing\">pins alone exceed the bound</span>"
        } else {
            ""
        },
        match cache.scan_under_way() {
            Some(n) => format!("<span class=warn>rebuilding: {n} blobs scanned</span>"),
            None => "complete".to_string(),
        },
    );
}

fn traffic_section(out: &mut String, recent: &Recent) {
    let (all, last) = (&recent.now, &recent.delta);
    let window = if recent.span + Duration::from_secs(1) >= WINDOW {
        "last 5 min".to_string()
    } else {
        format!("last {}", span(recent.span))
    };
    let _ = write!(
        out,
        "<section id=traffic><h2>Traffic</h2><div class=scroll><table>\
         <tr><th></th><th class=n>since start</th><th class=n>{window}</th></tr>\
         <tr><th>hit ratio</th>{}{}</tr><tr><th>hits</th>{}{}</tr><tr><th>misses</th>{}{}</tr>",
        num(
            "hit-ratio",
            all.hit_ratio().unwrap_or(0.0),
            &percent(all.hit_ratio())
        ),
        num(
            "hit-ratio-recent",
            last.hit_ratio().unwrap_or(0.0),
            &percent(last.hit_ratio())
        ),
        num("hits", all.hits, &all.hits.to_string()),
        num("hits-recent", last.hits, &last.hits.to_string()),
        num("misses", all.misses, &all.misses.to_string()),
        num("misses-recent", last.misses, &last.misses.to_string()),
    );
    for (source, bytes) in &all.bytes {
        let recent_bytes = last.bytes.get(source).copied().unwrap_or(0);
        let _ = write!(
            out,
            "<tr><th>bytes from {}</th>{}{}</tr>",
            escape(source),
            num(&format!("bytes-{source}"), bytes, &human(*bytes)),
            num(
                &format!("bytes-{source}-recent"),
                recent_bytes,
                &human(recent_bytes)
            ),
        );
    }
    let _ = write!(
        out,
        "</table></div><div class=dim>bytes served per 10 s, {window}</div>{}</section>",
        sparkline(&recent.bytes_per_bucket),
    );
}

/// An inline SVG line of `values` (scaled to the largest).
fn sparkline(values: &[u64]) -> String {
    let max = values.iter().copied().max().unwrap_or(0).max(1) as f64;
    let step = 300.0 / (values.len().max(2) - 1) as f64;
    let points: Vec<String> = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            format!(
                "{:.1},{:.1}",
                i as f64 * step,
                38.0 - *v as f64 / max * 36.0
            )
        })
        .collect();
    format!(
        "<svg viewBox=\"0 0 300 40\" preserveAspectRatio=none aria-hidden=true>\
         <polyline points=\"{}\"/></svg>",
        points.join(" ")
    )
}

/// A section of the page: its id and title.
struct Section<'a> {
    id: &'a str,
    title: &'a str,
    /// A count shown beside the title.
    count: Option<usize>,
    /// Across the whole width.
    wide: bool,
}

impl Section<'_> {
    /// Opens the section and its table, whose column headers are `headers` (a `#` before
    /// a header marks a number column); or, with no rows, writes `none` and closes the
    /// section, returning `false`.
    fn open(&self, out: &mut String, rows: usize, none: &str, headers: &[&str]) -> bool {
        let count = self
            .count
            .map_or(String::new(), |n| format!(" <span class=dim>({n})</span>"));
        let wide = if self.wide { " class=wide" } else { "" };
        let _ = write!(
            out,
            "<section id={}{wide}><h2>{}{count}</h2>",
            self.id, self.title
        );
        if rows == 0 {
            let _ = write!(out, "<p class=dim>{none}</p></section>");
            return false;
        }
        out.push_str("<div class=scroll><table><tr>");
        for h in headers {
            let _ = match h.strip_prefix('#') {
                Some(h) => write!(out, "<th class=n>{h}</th>"),
                None => write!(out, "<th>{h}</th>"),
            };
        }
        out.push_str("</tr>");
        true
    }

    fn close(out: &mut String) {
        out.push_str("</table></div></section>");
    }
}

fn fills_section(out: &mut String, fills: &[FillStatus]) {
    let section = Section {
        id: "fills",
        title: "Fills in flight",
        count: Some(fills.len()),
        wide: true,
    };
    let headers = [
        "digest",
        "image",
        "progress",
        "#received",
        "#rate",
        "#clients",
        "state",
        "started",
    ];
    if !section.open(out, fills.len(), "No fill under way.", &headers) {
        return;
    }
    for f in fills {
        let digest = f.digest.to_string();
        let secs = clock::age(f.started)
            .min(Duration::from_secs(1 << 40))
            .as_secs_f64();
        let rate = if secs > 0.0 {
            (f.received as f64 / secs) as u64
        } else {
            0
        };
        let (progress, of) = match f.expected {
            Some(total) if total > 0 => (
                bar(f.received as f64 / total as f64, None, "progress"),
                format!("{} of {}", human(f.received), human(total)),
            ),
            _ => (
                "<span class=dim>size unknown</span>".to_string(),
                human(f.received),
            ),
        };
        let _ = write!(
            out,
            "<tr class=fill><td class=mono title=\"{d}\">{short}…</td><td class=mono>{image}</td>\
             <td>{progress}</td>{received}{rate}{readers}<td>{state}</td>{started}</tr>",
            d = escape(&digest),
            short = escape(&digest[..digest.len().min(19)]),
            image = escape(f.repository.as_deref().unwrap_or("–")),
            received = num("", f.received, &of),
            rate = num("", rate, &format!("{}/s", human(rate))),
            readers = num("", f.readers, &f.readers.to_string()),
            state = f.state,
            started = time_cell(Some(f.started)),
        );
    }
    Section::close(out);
}

fn upstreams_section(out: &mut String, admin: &Admin) {
    let ups = &admin.state.upstreams.0;
    let section = Section {
        id: "upstreams",
        title: "Upstreams",
        count: None,
        wide: true,
    };
    let classes = CLASSES.map(|c| format!("#{c}"));
    let mut headers = vec!["upstream", "state", "last success", "last error", "cause"];
    headers.extend(classes.iter().map(String::as_str));
    headers.push("#rate limit left");
    if !section.open(out, ups.len(), "No upstream configured.", &headers) {
        return;
    }
    for up in ups {
        let h: HealthView = up.health.view();
        let class = match h.state {
            UpState::Up => "up",
            UpState::Failing => "failing",
            UpState::Unused => "unused",
        };
        let (err_at, cause) = match &h.last_error {
            Some((t, c)) => (Some(*t), escape(c)),
            None => (None, String::new()),
        };
        let _ = write!(
            out,
            "<tr><td class=mono>{}</td><td class=\"state {class}\">{}</td>{}{}<td>{cause}</td>",
            escape(&up.name),
            h.state.as_str(),
            time_cell(h.last_success),
            time_cell(err_at),
        );
        for n in h.classes {
            out.push_str(&num("", n, &n.to_string()));
        }
        let limit = match (h.ratelimit_remaining, h.ratelimit_limit) {
            (Some(r), Some(l)) => num("", r, &format!("{r} of {l}")),
            (Some(r), None) => num("", r, &r.to_string()),
            _ => "<td class=\"n dim\">–</td>".to_string(),
        };
        out.push_str(&limit);
        out.push_str("</tr>");
    }
    Section::close(out);
}

fn images_section(out: &mut String, admin: &Admin) {
    let top = admin.state.status.top_images(TOP_IMAGES);
    let section = Section {
        id: "images",
        title: "Most pulled",
        count: None,
        wide: false,
    };
    let headers = ["image", "#pulls", "last"];
    if !section.open(out, top.len(), "No pull by tag yet.", &headers) {
        return;
    }
    for p in top {
        let _ = write!(
            out,
            "<tr><td class=mono>{}</td>{}{}</tr>",
            escape(&p.image),
            num("", p.count, &p.count.to_string()),
            time_cell(Some(p.last)),
        );
    }
    Section::close(out);
}

fn errors_section(out: &mut String, admin: &Admin) {
    let errors = admin.state.status.errors();
    let section = Section {
        id: "errors",
        title: "Recent errors",
        count: None,
        wide: false,
    };
    let headers = ["when", "what", "cause", "#times"];
    if !section.open(out, errors.len(), "None since start.", &headers) {
        return;
    }
    for e in errors {
        let _ = write!(
            out,
            "<tr>{}<td class=mono>{}</td><td>{}</td>{}</tr>",
            time_cell(Some(e.last)),
            escape(&e.what),
            escape(&e.cause),
            num("", e.count, &e.count.to_string()),
        );
    }
    Section::close(out);
}

fn sync_section(out: &mut String, admin: &Admin) {
    let sync = admin.state.sync.status();
    let section = Section {
        id: "sync",
        title: if sync.enabled || sync.entries.is_empty() {
            "Sync"
        } else {
            "Sync (off: offline)"
        },
        count: Some(sync.entries.len()),
        wide: true,
    };
    let headers = [
        "entry",
        "every",
        "last run",
        "result",
        "last success",
        "next run",
        "#images",
        "#bytes",
        "tags",
        "last error",
    ];
    let none = "No sync configured (<code>[[sync]]</code> entries keep images cached on a \
                schedule).";
    if !section.open(out, sync.entries.len(), none, &headers) {
        return;
    }
    // The sync status gives its times as RFC 3339 text.
    let when = |t: &Option<String>| {
        time_cell(
            t.as_deref()
                .and_then(|t| humantime::parse_rfc3339_weak(t).ok()),
        )
    };
    for e in &sync.entries {
        let (class, result) = match (e.running, e.last_result.as_deref()) {
            (true, _) => ("warn", "running"),
            (false, Some("ok")) => ("up", "ok"),
            (false, Some("rate_limited")) => ("warn", "rate limited"),
            (false, Some(other)) => ("failing", other),
            (false, None) => ("unused", "not run yet"),
        };
        let tags: Vec<&str> = e.tags.keys().map(String::as_str).collect();
        let _ = write!(
            out,
            "<tr><td class=mono>{}</td><td>{}</td>{}<td class=\"state {class}\">{}</td>{}{}\
             {}{}<td class=mono>{}</td><td>{}</td></tr>",
            escape(&e.entry),
            span(Duration::from_secs(e.interval_seconds)),
            when(&e.last_run),
            escape(result),
            when(&e.last_success),
            when(&e.next_run),
            num("", e.images, &e.images.to_string()),
            num("", e.bytes, &human(e.bytes)),
            escape(&tags.join(", ")),
            escape(e.last_error.as_deref().unwrap_or("")),
        );
    }
    Section::close(out);
}

fn pins_section(out: &mut String, admin: &Admin) {
    let pins = admin.state.cache.pins();
    let section = Section {
        id: "pins",
        title: "Pins",
        count: Some(pins.len()),
        wide: false,
    };
    let headers = ["image", "#manifests", "#blobs", "pinned"];
    if !section.open(out, pins.len(), "No image pinned.", &headers) {
        return;
    }
    for p in pins {
        let k = &p.key;
        let sep = match k.reference {
            crate::reference::Reference::Tag(_) => ":",
            crate::reference::Reference::Digest(_) => "@",
        };
        let image = format!("{}/{}{sep}{}", k.upstream, k.name.as_str(), k.reference);
        let (m, b) = (p.image.manifests.len(), p.image.blobs.len());
        let _ = write!(
            out,
            "<tr><td class=mono>{}</td>{}{}{}</tr>",
            escape(&image),
            num("", m, &m.to_string()),
            num("", b, &b.to_string()),
            time_cell(Some(p.image.pinned_at)),
        );
    }
    Section::close(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outside_text_is_escaped() {
        assert_eq!(
            escape("<script>alert('x')</script>&\"y\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;y&quot;"
        );
        assert_eq!(escape("library/nginx:1.27"), "library/nginx:1.27");
    }

    #[test]
    fn a_browser_gives_the_token_as_a_basic_password() {
        // "admin:s3cret", "s3cret" (no user), "x:" (empty password)
        assert_eq!(
            basic_password("Basic YWRtaW46czNjcmV0").as_deref(),
            Some("s3cret")
        );
        assert_eq!(basic_password("Basic czNjcmV0"), None);
        assert_eq!(basic_password("Basic eDo=").as_deref(), Some(""));
        assert_eq!(basic_password("Bearer s3cret"), None);
        assert_eq!(basic_password("Basic !!!"), None);
    }

    #[test]
    fn spans_read_like_people_say_them() {
        assert_eq!(span(Duration::from_secs(12)), "12 s");
        assert_eq!(span(Duration::from_secs(190)), "3 min");
        assert_eq!(span(Duration::from_secs(7300)), "2 h");
        assert_eq!(span(Duration::from_secs(4 * 86_400 + 5)), "4 d");
    }

    #[tokio::test(start_paused = true)]
    async fn times_are_relative() {
        let then = clock::now();
        assert_eq!(ago(then), "just now");
        tokio::time::advance(Duration::from_secs(185)).await;
        assert_eq!(ago(then), "3 min ago");
        assert_eq!(ago(clock::now() + Duration::from_secs(125)), "in 2 min");
    }

    #[test]
    fn bars_and_numbers() {
        assert!(bar(1.7, None, "x").contains("width:100%"), "clamped");
        assert!(bar(0.25, Some(0.5), "a<b").contains("aria-label=\"a&lt;b\""));
        assert_eq!(
            num("hits", 1234, "1234"),
            "<td class=n id=hits data-value=\"1234\">1234</td>"
        );
        let svg = sparkline(&[0, 5, 10]);
        assert!(
            svg.contains("points=\"0.0,38.0 150.0,20.0 300.0,2.0\""),
            "{svg}"
        );
    }
}
