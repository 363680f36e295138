//! Responses, from the plugin to the host: the response the plugin writes in one call, read
//! into the host's types, and the body it streams, as an `http_body::Body` hyper can send.

use std::cell::{Cell, RefCell};
use std::ffi::c_void;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use handler_api::abi::{self, DropFn, FfiBody, FfiChunk, FfiHeader, FfiPoll, FfiResponse, FfiStr, FfiUpgrade};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use http_body::{Frame, SizeHint};

use crate::plugin::generation::{thread_generation, Generation, InFlight, LentCount, LentTally};

thread_local! {
    /// The header map of this thread's last request, emptied, for the next response the
    /// plugin describes, so that a response's headers need no allocation of their own.
    static SPARE_HEADERS: Cell<Option<HeaderMap>> = const { Cell::new(None) };
}

/// Keeps `headers` for the next response on this thread, unless it grew unusually large.
#[inline]
pub(crate) fn recycle(mut headers: HeaderMap) {
    if headers.capacity() <= 64 {
        headers.clear();
        SPARE_HEADERS.set(Some(headers));
    }
}

/// A response the plugin wrote (an [`FfiResponse`]), read into the host's types: its head
/// copied, its stream body and upgrade owned (released when dropped, unless claimed).
pub(super) struct Written {
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) body: WrittenBody,
    pub(super) upgrade: Option<Unaccepted>,
}

/// The body of a [`Written`] response.
pub(super) enum WrittenBody {
    Empty,
    Full(Bytes),
    /// Released when dropped, unless it becomes a response body.
    Stream(Unclaimed),
}

impl Written {
    /// Reads `ffi`, which the plugin wrote in a poll that returned `READY`. Its stream body
    /// and upgrade are owned from here on, even when the response is invalid (the error says
    /// why): they are released as the error returns, on the calling thread.
    ///
    /// # Safety
    /// `ffi` must be what the plugin wrote: its strings and headers valid during this call,
    /// its stream body and upgrade live and handed over. The caller must run on a thread of
    /// the plugin's generation and hold it.
    pub(super) unsafe fn read(ffi: &FfiResponse) -> Result<Written, String> {
        // Owned first, so that whatever is wrong below releases them.
        let stream = (ffi.body_kind == abi::BODY_STREAM && !ffi.stream.vtable.is_null())
            .then(|| Unclaimed(FfiBody { state: ffi.stream.state, vtable: ffi.stream.vtable, exact_len: ffi.stream.exact_len }));
        let upgrade = (!ffi.upgrade.vtable.is_null())
            .then(|| Unaccepted(FfiUpgrade { state: ffi.upgrade.state, vtable: ffi.upgrade.vtable }));
        let status = StatusCode::from_u16(ffi.status).map_err(|_| format!("invalid status code {}", ffi.status))?;
        let body = match (ffi.body_kind, stream) {
            (abi::BODY_EMPTY, _) => WrittenBody::Empty,
            // SAFETY: the plugin keeps `full` valid during this call.
            (abi::BODY_FULL, _) => WrittenBody::Full(Bytes::copy_from_slice(unsafe { ffi.full.as_bytes() })),
            (abi::BODY_STREAM, Some(stream)) => WrittenBody::Stream(stream),
            (kind, _) => return Err(format!("unknown body kind {kind}")),
        };
        let views: &[FfiHeader] = if ffi.headers_len == 0 || ffi.headers.is_null() {
            &[]
        } else {
            // SAFETY: non-null; the plugin keeps `headers_len` headers there valid during this
            // call, and the slice does not outlive it.
            unsafe { std::slice::from_raw_parts(ffi.headers, ffi.headers_len) }
        };
        // hyper frames a body of known length by that length but writes the plugin's own
        // `content-length` as it is: one that disagrees would desynchronise an HTTP/1
        // connection (the client reads the rest as the next response).
        let known_len = match &body {
            WrittenBody::Full(bytes) if !bytes.is_empty() => Some(bytes.len() as u64),
            WrittenBody::Stream(s) if s.0.exact_len != abi::UNKNOWN_LENGTH && s.0.exact_len != 0 => Some(s.0.exact_len),
            _ => None,
        };
        let mut headers = if views.is_empty() { HeaderMap::new() } else { SPARE_HEADERS.take().unwrap_or_default() };
        RECENT_HEADERS.with_borrow_mut(|recent| {
            for h in views {
                // SAFETY: the plugin keeps its header strings valid during this call.
                let (name, value) = unsafe { (h.name.as_bytes(), h.value.as_bytes()) };
                let Some((n, v)) = recent.header(name, value) else {
                    return Err(format!("invalid header {:?}", String::from_utf8_lossy(name)));
                };
                if let Some(len) = known_len.filter(|_| n == http::header::CONTENT_LENGTH) {
                    if declared_length(&v) != Some(len) {
                        return Err(format!(
                            "its content-length header says {v:?} but its body is {len} bytes \
                             (leave the header out: the host sets it from the body)"
                        ));
                    }
                }
                headers.append(n, v);
            }
            Ok(())
        })?;
        Ok(Written { status, headers, body, upgrade })
    }
}

/// An upgrade the plugin accepted, not yet started: dropping it releases the plugin's state
/// (on the calling thread, which must be one of the generation's, while it is loaded).
pub(crate) struct Unaccepted(pub(super) FfiUpgrade);

// SAFETY: the plugin's state is `Send` (handler-api requires it of a session); it is owned
// exclusively by this value.
unsafe impl Send for Unaccepted {}

impl Drop for Unaccepted {
    fn drop(&mut self) {
        // SAFETY: owned, never started: released exactly once, here.
        unsafe { ((*self.0.vtable).drop)(self.0.state) };
    }
}

/// A streaming body the plugin handed over, not yet part of a response: dropping it releases
/// the plugin's state (on the calling thread, while the library is loaded).
pub(super) struct Unclaimed(FfiBody);

impl Unclaimed {
    /// The body, now owned by whoever releases it.
    fn claim(self) -> FfiBody {
        let ffi = FfiBody { state: self.0.state, vtable: self.0.vtable, exact_len: self.0.exact_len };
        std::mem::forget(self);
        ffi
    }
}

impl Drop for Unclaimed {
    fn drop(&mut self) {
        // SAFETY: the plugin handed this body over, and it was never claimed: released
        // exactly once, here.
        unsafe { ((*self.0.vtable).drop)(self.0.state) };
    }
}

impl WrittenBody {
    /// The response body, holding the request's generation until it ends.
    ///
    /// `headers`: the response's, whose `content-length` (if the stream's length is unknown)
    /// is where hyper ends the body it sends.
    pub(super) fn into_response_body(self, in_flight: InFlight, headers: &HeaderMap) -> ResponseBody {
        match self {
            WrittenBody::Empty => ResponseBody::Full { bytes: None, in_flight },
            WrittenBody::Full(bytes) => ResponseBody::Full { bytes: Some(bytes), in_flight },
            WrittenBody::Stream(body) => {
                let ffi = body.claim();
                let left = if ffi.exact_len != abi::UNKNOWN_LENGTH {
                    ffi.exact_len
                } else {
                    headers.get(http::header::CONTENT_LENGTH).and_then(declared_length).unwrap_or(u64::MAX)
                };
                ResponseBody::Plugin(PluginBody { ffi, finished: false, left, in_flight })
            }
        }
    }
}

/// The length a `content-length` value gives, as hyper reads it: digits only (`+5` parses as
/// a number, but is no length on the wire).
fn declared_length(value: &HeaderValue) -> Option<u64> {
    value.to_str().ok().filter(|v| v.bytes().all(|b| b.is_ascii_digit())).and_then(|v| v.parse().ok())
}

thread_local! {
    static RECENT_HEADERS: RefCell<RecentHeaders> = const { RefCell::new(RecentHeaders { entries: Vec::new(), next: 0 }) };
}

/// The headers that repeat from one response to the next (`content-type` above all) that
/// this thread has parsed lately, found by their bytes. Reusing one costs two comparisons and
/// a reference count, where a new one is parsed, validated, and its value copied into an
/// allocation of its own.
struct RecentHeaders {
    entries: Vec<(HeaderName, HeaderValue)>,
    /// Where the next new entry goes, once full.
    next: usize,
}

impl RecentHeaders {
    const CAPACITY: usize = 8;
    /// Longer values are not kept.
    const LONGEST: usize = 128;

    /// The header for these bytes, or `None` if they are not a valid name and value.
    fn header(&mut self, name: &[u8], value: &[u8]) -> Option<(HeaderName, HeaderValue)> {
        // Names compare ignoring case, as `HeaderName::from_bytes` would parse them.
        let found = self.entries.iter().find(|(n, v)| n.as_str().as_bytes().eq_ignore_ascii_case(name) && v.as_bytes() == value);
        if let Some((n, v)) = found {
            return Some((n.clone(), v.clone()));
        }
        let name = HeaderName::from_bytes(name).ok()?;
        if !REPEATING.contains(&name) || value.len() > Self::LONGEST {
            return Some((name, HeaderValue::from_bytes(value).ok()?));
        }
        let value = HeaderValue::from_maybe_shared(Bytes::copy_from_slice(value)).ok()?;
        if self.entries.len() < Self::CAPACITY {
            self.entries.push((name.clone(), value.clone()));
        } else {
            self.entries[self.next] = (name.clone(), value.clone());
            self.next = (self.next + 1) % Self::CAPACITY;
        }
        Some((name, value))
    }
}

/// The response headers [`RecentHeaders`] keeps: few distinct values, none of
/// them secret (a cookie or a location is neither, and would push out those that are).
const REPEATING: [HeaderName; 6] = {
    use http::header::*;
    [CONTENT_TYPE, CACHE_CONTROL, CONTENT_ENCODING, VARY, SERVER, X_CONTENT_TYPE_OPTIONS]
};

/// A body chunk that stays in the plugin's memory: it keeps its generation (so the library)
/// alive, and hands the release back to the plugin on one of the generation's threads.
struct Lent {
    data: FfiStr,
    release: Release,
    generation: Arc<Generation>,
    /// Counted in its connection's tally while it lives.
    _counted: Option<LentCount>,
}

// SAFETY: the bytes are immutable and owned by the plugin's `state` (a `Bytes`, which is
// Send) until `release`; `Drop` runs `release` only on the generation's own threads.
unsafe impl Send for Lent {}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `data` stays valid until `release`, which only `Drop` calls.
        unsafe { self.data.as_bytes() }
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        let release = Release(self.release.0, self.release.1);
        if thread_generation() == self.generation.id() {
            release.run();
        } else {
            // Usually hyper drops a chunk right after writing it, on the response's thread. A
            // connection that moved to a newer generation with the chunk still queued drops it
            // elsewhere; plugin code runs only on its generation's threads, so send it there
            // (the task holds the generation, so its runtime is still up).
            let generation = self.generation.clone();
            self.generation.handle().spawn(async move {
                release.run();
                drop(generation);
            });
        }
    }
}

/// A lent chunk's state and release function.
struct Release(*mut c_void, DropFn);

// SAFETY: the state is an owned `Bytes` in the plugin, which is Send.
unsafe impl Send for Release {}

impl Release {
    fn run(self) {
        // SAFETY: called exactly once per lent chunk, on a thread of its generation, while the
        // library is loaded (the caller holds the generation).
        unsafe { (self.1)(self.0) }
    }
}
/// A response body, complete or streamed from the plugin, with the request's hold on its
/// generation: the body is the last part of a request in flight.
pub(crate) enum ResponseBody {
    /// A complete body (or none), from the plugin or the host.
    Full { bytes: Option<Bytes>, in_flight: InFlight },
    Plugin(PluginBody),
}

impl ResponseBody {
    /// A complete body, for an answer the host gives itself.
    pub(crate) fn full(bytes: Bytes, in_flight: InFlight) -> ResponseBody {
        ResponseBody::Full { bytes: Some(bytes), in_flight }
    }

    /// Counts the chunks a streamed body lends in the tally `lent` makes (only a streamed
    /// body lends: the others are not asked for one).
    pub(crate) fn count_lent_in(&mut self, lent: impl FnOnce() -> Arc<LentTally>) {
        if let ResponseBody::Plugin(body) = self {
            body.in_flight.count_lent_in(lent());
        }
    }

    /// The request's hold on its generation, for an answer the host gives instead.
    pub(crate) fn into_in_flight(self) -> InFlight {
        match self {
            ResponseBody::Full { in_flight, .. } => in_flight,
            ResponseBody::Plugin(body) => {
                let body = std::mem::ManuallyDrop::new(body);
                // SAFETY: the plugin's state is released first, exactly once (Drop will not
                // run), while the hold, read out just before, keeps the library loaded.
                unsafe {
                    let in_flight = std::ptr::read(&body.in_flight);
                    ((*body.ffi.vtable).drop)(body.ffi.state);
                    in_flight
                }
            }
        }
    }

    /// The generation the response comes from.
    pub(crate) fn generation(&self) -> &Arc<Generation> {
        match self {
            ResponseBody::Full { in_flight, .. } | ResponseBody::Plugin(PluginBody { in_flight, .. }) => in_flight.generation(),
        }
    }
}

/// Why a plugin's body stream ended early.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("the response body panicked mid-stream")]
    Panicked,
    #[error("the response body failed mid-stream")]
    Failed,
    #[error("the response body brought more bytes than its length says")]
    TooLong,
}

/// A streaming body produced by the plugin. Its `Drop` releases the plugin's state before
/// the hold on the library (a field) goes.
pub(crate) struct PluginBody {
    ffi: FfiBody,
    finished: bool,
    /// The bytes it may still bring: hyper stops writing at the length it was given and
    /// drops the rest, so that a longer body would look complete to the client, with the
    /// connection kept alive. A body that brings more fails instead.
    left: u64,
    /// Keeps the library loaded while the state lives; lent chunks clone its generation.
    in_flight: InFlight,
}

// SAFETY: the plugin's body is `Send`; the state is owned exclusively by this value.
unsafe impl Send for PluginBody {}
// SAFETY: `&PluginBody` only reads `exact_len`, `finished` and the `Arc<Generation>` of
// `in_flight` (which is Sync); the plugin's state is reached only through `&mut`.
unsafe impl Sync for PluginBody {}

impl PluginBody {
    /// The bytes of a chunk the plugin produced, copied or lent (`None` at the end).
    fn take(&self, chunk: FfiChunk) -> Option<Bytes> {
        match chunk.release {
            // SAFETY: a borrowed chunk stays valid until the next call on this body.
            None if chunk.data.len > 0 => Some(Bytes::copy_from_slice(unsafe { chunk.data.as_bytes() })),
            None => None,
            Some(release) => Some(Bytes::from_owner(Lent {
                data: chunk.data,
                release: Release(chunk.state, release),
                generation: self.in_flight.generation().clone(),
                _counted: self.in_flight.lent().map(LentTally::count),
            })),
        }
    }
}

impl Drop for PluginBody {
    fn drop(&mut self) {
        // SAFETY: released exactly once, while `in_flight` (dropped after this) keeps the
        // library loaded.
        unsafe { ((*self.ffi.vtable).drop)(self.ffi.state) };
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ResponseBody::Full { bytes, .. } => Poll::Ready(bytes.take().filter(|b| !b.is_empty()).map(|b| Ok(Frame::data(b)))),
            ResponseBody::Plugin(body) => {
                if body.finished {
                    return Poll::Ready(None);
                }
                let waker = abi::waker::lend(cx.waker());
                let mut chunk = MaybeUninit::<FfiChunk>::uninit();
                // SAFETY: the state is live until drop, and `in_flight` keeps its library
                // loaded; waker and chunk outlive the call.
                let r = unsafe { ((*body.ffi.vtable).poll_chunk)(body.ffi.state, &waker, chunk.as_mut_ptr()) };
                match r {
                    FfiPoll::PENDING => Poll::Pending,
                    FfiPoll::READY => {
                        // SAFETY: on READY the plugin has written the chunk.
                        let chunk = unsafe { chunk.assume_init() };
                        match body.take(chunk) {
                            Some(chunk) => match body.left.checked_sub(chunk.len() as u64) {
                                Some(left) => {
                                    body.left = left;
                                    Poll::Ready(Some(Ok(Frame::data(chunk))))
                                }
                                None => {
                                    body.finished = true;
                                    tracing::warn!(
                                        plugin = %body.in_flight.generation().label(),
                                        "the response body brought more bytes than its length says: cut off, so that the \
                                         client sees an incomplete response (leave content-length out, or make it true)"
                                    );
                                    Poll::Ready(Some(Err(BodyError::TooLong)))
                                }
                            },
                            None => {
                                body.finished = true;
                                Poll::Ready(None)
                            }
                        }
                    }
                    FfiPoll::PANICKED => {
                        body.finished = true;
                        Poll::Ready(Some(Err(BodyError::Panicked)))
                    }
                    _ => {
                        body.finished = true;
                        Poll::Ready(Some(Err(BodyError::Failed)))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Full { bytes, .. } => bytes.as_ref().is_none_or(|b| b.is_empty()),
            ResponseBody::Plugin(b) => b.finished || b.ffi.exact_len == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Full { bytes, .. } => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            ResponseBody::Plugin(b) if b.ffi.exact_len != abi::UNKNOWN_LENGTH => SizeHint::with_exact(b.ffi.exact_len),
            ResponseBody::Plugin(_) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::CONTENT_TYPE;

    #[test]
    fn repeated_headers_are_shared_and_others_copied() {
        let mut recent = RecentHeaders { entries: Vec::new(), next: 0 };
        let (name, first) = recent.header(b"content-type", b"text/plain").expect("valid");
        let (_, again) = recent.header(b"content-type", b"text/plain").expect("valid");
        assert_eq!(name, CONTENT_TYPE);
        assert_eq!(first, again);
        assert_eq!(first.as_bytes().as_ptr(), again.as_bytes().as_ptr(), "the same bytes, shared");
        assert_eq!(recent.entries.len(), 1);

        // Never kept: another name, a secret, a long value, an invalid one. A name is found
        // by its bytes only once parsed: another spelling is parsed, and still valid.
        assert!(recent.header(b"set-cookie", b"session=secret").is_some());
        assert!(recent.header(b"content-type", &[b'a'; 200]).is_some());
        assert!(recent.header(b"content-type", b"bad\r\nvalue").is_none());
        assert!(recent.header(b"bad name", b"text/plain").is_none());
        assert_eq!(recent.header(b"Content-Type", b"text/plain").map(|(n, _)| n), Some(CONTENT_TYPE));
        assert_eq!(recent.entries.len(), 1);

        // Full: the oldest entries make room.
        for i in 0..RecentHeaders::CAPACITY {
            recent.header(b"content-type", format!("type/{i}").as_bytes());
        }
        assert_eq!(recent.entries.len(), RecentHeaders::CAPACITY);
        assert!(recent.entries.iter().all(|(_, v)| v != "text/plain"));
    }
}
