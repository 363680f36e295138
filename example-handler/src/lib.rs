//! The example hotswap app.
//!
//! | route | answer |
//! |---|---|
//! | `GET /` | a greeting with the handler's name and version |
//! | `GET /download?size=N&rate=R` | `N` bytes (default 1 MiB) where byte `i` is `i mod 256`, throttled to about `R` bytes per second (unthrottled without `rate`) |
//! | `POST /upload` | the request body's byte count and SHA-256, streamed (never buffered) |
//! | `GET /health` | `ok` |
//! | `GET /host` | the host process serving the request (`pid=N`): it changes when `hotswap upgrade` replaces the host, on the same connection |
//! | `GET /clock?every_ms=N` | server-sent events: a `tick` event every `N` ms (default 1000) with the time and the version; when a newer build serves, a `superseded` event, and the stream ends (a browser's `EventSource` reconnects, to the new build) |
//! | `GET /ws` | a WebSocket echo that greets with the version; `broadcast:` messages go to every session of the same build; `?on_swap=close` closes with 1012 when a newer build serves |
//! | `GET /visits` | counts visits (`visits=N`); the count goes on across swaps: each build hands it to the next (`handler_api::state`) |
//!
//! `HEAD` is answered wherever `GET` is, except `/visits` (which counts) and `/ws`; another
//! method gets 405 with `Allow`.
//!
//! The version comes from `EXAMPLE_HANDLER_VERSION` at build time (default: the crate's
//! version), so two builds can be told apart:
//!
//! ```sh
//! EXAMPLE_HANDLER_VERSION=2.0.0 cargo build -p example-handler
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream;
use handler_api::state::{Exported, Previous};
use handler_api::{export_handler, Body, IntoResponse, Request, Response};
use http::{header, HeaderValue, Method, StatusCode};
use sha2::{Digest, Sha256};

mod ws;

/// This build's name.
pub const NAME: &str = "example-handler";

/// This build's version.
pub const VERSION: &str = match option_env!("EXAMPLE_HANDLER_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

/// Size of one download chunk.
const CHUNK: usize = 64 * 1024;

/// `CHUNK + 256` bytes of the download pattern, so any chunk starting at offset `i` is
/// `PATTERN[i % 256..][..len]`.
static PATTERN: [u8; CHUNK + 256] = {
    let mut p = [0u8; CHUNK + 256];
    let mut i = 0;
    while i < p.len() {
        p[i] = i as u8;
        i += 1;
    }
    p
};

/// The app: routes a request. `HEAD` is answered as `GET` (hyper sends the head only).
pub async fn app(req: Request) -> Response {
    const READ: [Method; 2] = [Method::GET, Method::HEAD];
    let read = READ.contains(req.method());
    match (req.uri().path(), req.method()) {
        ("/", _) if read => format!("hello from {NAME}\nversion={VERSION}\n").into_response(),
        ("/health", _) if read => "ok\n".into_response(),
        ("/visits", &Method::GET) => format!("visits={}\n", VISITS.fetch_add(1, Ordering::Relaxed) + 1).into_response(),
        ("/host", _) if read => format!("pid={}\n", std::process::id()).into_response(),
        ("/clock", _) if read => clock(req.uri().query().unwrap_or("")),
        ("/download", _) if read => download(req.uri().query().unwrap_or("")),
        ("/upload", &Method::POST) => upload(req.into_body()).await,
        // HTTP/1.1 asks with GET, HTTP/2 with CONNECT.
        ("/ws", &Method::GET | &Method::CONNECT) => ws::accept(req),
        ("/" | "/health" | "/host" | "/clock" | "/download", _) => not_allowed("GET, HEAD"),
        ("/visits" | "/ws", _) => not_allowed("GET"),
        ("/upload", _) => not_allowed("POST"),
        _ => (StatusCode::NOT_FOUND, "not found\n").into_response(),
    }
}

/// 405, with the methods the path takes.
fn not_allowed(allow: &'static str) -> Response {
    let mut res = (StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n").into_response();
    res.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
    res
}

fn query_u64(query: &str, key: &str) -> Result<Option<u64>, String> {
    for pair in query.split('&') {
        if let Some((k, v)) = pair.split_once('=') {
            if k == key {
                return v.parse().map(Some).map_err(|_| format!("{key} must be a whole number, got {v:?}\n"));
            }
        }
    }
    Ok(None)
}

/// Streams `size` bytes of the pattern, at most `rate` bytes per second.
fn download(query: &str) -> Response {
    let (size, rate) = match (query_u64(query, "size"), query_u64(query, "rate")) {
        (Ok(size), Ok(rate)) => (size.unwrap_or(1 << 20), rate.filter(|r| *r > 0)),
        (Err(e), _) | (_, Err(e)) => return (StatusCode::BAD_REQUEST, e).into_response(),
    };
    struct State {
        sent: u64,
        started: Instant,
    }
    let chunks = stream::unfold(State { sent: 0, started: Instant::now() }, move |mut s| async move {
        if s.sent >= size {
            return None;
        }
        let mut len = (size - s.sent).min(CHUNK as u64);
        if let Some(rate) = rate {
            // Send what the rate allows so far, in chunks of at least a step (about 50 per
            // second): an HTTP/2 client that buffers many tiny DATA frames may take them for an
            // attack and close the connection. Otherwise wait until the next step is due.
            let due = |bytes: u64| Duration::from_secs_f64(bytes as f64 / rate as f64);
            let step = len.min(rate.div_ceil(50).max(1));
            let elapsed = s.started.elapsed();
            let allowed = (elapsed.as_secs_f64() * rate as f64) as u64;
            if allowed < s.sent + step {
                handler_api::sleep(due(s.sent + step).saturating_sub(elapsed)).await;
                len = step;
            } else {
                len = len.min(allowed - s.sent);
            }
        }
        let offset = (s.sent % 256) as usize;
        let chunk = Bytes::from_static(&PATTERN[offset..offset + len as usize]);
        s.sent += len;
        Some((Ok::<_, std::convert::Infallible>(chunk), s))
    });
    let mut res = Response::new(Body::sized_stream(size, chunks));
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    res
}

/// Server-sent events: a tick every `every_ms`, until a newer build serves.
fn clock(query: &str) -> Response {
    let every = match query_u64(query, "every_ms") {
        Ok(ms) => Duration::from_millis(ms.unwrap_or(1000).clamp(10, 60_000)),
        Err(e) => return (StatusCode::BAD_REQUEST, e).into_response(),
    };
    /// The stream's state: events sent, and the signal that ends it.
    struct Clock {
        ticks: u64,
        superseded: Option<std::pin::Pin<Box<handler_api::Superseded>>>,
    }
    let start = Clock { ticks: 0, superseded: Some(Box::pin(handler_api::superseded())) };
    let events = stream::unfold(start, move |mut clock| async move {
        let superseded = clock.superseded.take()?; // taken after the last event: the end
        let tick = Box::pin(handler_api::sleep(if clock.ticks == 0 { Duration::ZERO } else { every }));
        let event = match futures_util::future::select(tick, superseded).await {
            futures_util::future::Either::Left((_, superseded)) => {
                clock.superseded = Some(superseded);
                clock.ticks += 1;
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                // `retry` with the first event: how soon a client reconnects after the end.
                let retry = if clock.ticks == 1 { "retry: 500\n" } else { "" };
                format!("{retry}id: {}\nevent: tick\ndata: {} {VERSION}\n\n", clock.ticks, now.as_millis())
            }
            // A newer build serves new requests: say so, and end; the client reconnects to it.
            futures_util::future::Either::Right(_) => "event: superseded\ndata: a newer build serves: reconnect\n\n".to_owned(),
        };
        Some((Ok::<_, std::convert::Infallible>(Bytes::from(event)), clock))
    });
    let mut res = Response::new(Body::from_stream(events));
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    res
}

/// Hashes the upload as it streams in.
async fn upload(mut body: Body) -> Response {
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    while let Some(chunk) = body.chunk().await {
        match chunk {
            Ok(bytes) => {
                total += bytes.len() as u64;
                hasher.update(&bytes);
            }
            Err(e) => {
                tracing::warn!(received = total, "upload failed: {e}");
                return (StatusCode::BAD_REQUEST, format!("upload failed after {total} bytes: {e}\n")).into_response();
            }
        }
    }
    let digest: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    tracing::info!(bytes = total, "upload received");
    format!("bytes={total}\nsha256={digest}\n").into_response()
}

/// Visits counted by this build and those before it.
static VISITS: AtomicU64 = AtomicU64::new(0);

/// The state this build hands to the next. Schema 1: the visit count, 8 bytes little-endian.
fn export_state() -> Exported {
    Exported::new(1, VISITS.load(Ordering::Relaxed).to_le_bytes().to_vec())
}

/// Takes the visit count over from the build before, if it was this app and its schema is
/// known; else counts from zero.
fn import_state(previous: Previous<'_>) -> Result<(), String> {
    match (previous.name(), previous.schema()) {
        (NAME, 1) => {
            let count = previous.bytes().try_into().map_err(|_| format!("schema 1 is 8 bytes, not {}", previous.bytes().len()))?;
            VISITS.store(u64::from_le_bytes(count), Ordering::Relaxed);
        }
        (NAME, schema) => {
            tracing::warn!(schema, from = previous.version(), "the visit count of an unknown schema is not taken over: counting from zero");
        }
        _ => {} // another application
    }
    Ok(())
}

export_handler!(name: NAME, version: VERSION, handler: app, state: (export_state, import_state));
