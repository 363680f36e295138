//! Responses, from the plugin to the host: the slot where the plugin describes its
//! response, and the body it streams, as an `http_body::Body` hyper can send.
//!
//! The `extern "C"` functions here are host code called by the plugin; none may unwind, so
//! each body that can panic runs inside `catch_unwind`.

use std::cell::{Cell, RefCell};
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use handler_api::abi::{self, FfiBody, FfiLent, FfiPoll, FfiStr};
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

/// Where the plugin describes its response, during the poll that completes its future.
#[derive(Default)]
pub(crate) struct ResponseSlot {
    pub(super) status: Option<StatusCode>,
    pub(super) headers: HeaderMap,
    pub(super) body: SlotBody,
    /// Why the response is invalid, if it is.
    pub(super) error: Option<String>,
}

/// The body the plugin set in a slot.
#[derive(Default)]
pub(super) enum SlotBody {
    #[default]
    Empty,
    Full(Bytes),
    /// Released when dropped, unless it becomes a response body.
    Stream(Unclaimed),
}

/// A streaming body the plugin handed over in a slot, not yet part of a response: dropping
/// it releases the plugin's state (during the poll that set it, its library loaded).
pub(super) struct Unclaimed(FfiBody);

impl Unclaimed {
    /// The body, now owned by whoever releases it.
    fn claim(self) -> FfiBody {
        let ffi = FfiBody { state: self.0.state, poll_chunk: self.0.poll_chunk, drop: self.0.drop, exact_len: self.0.exact_len };
        std::mem::forget(self);
        ffi
    }
}

impl Drop for Unclaimed {
    fn drop(&mut self) {
        // SAFETY: the plugin handed this body over, and it was never claimed: released
        // exactly once, here, during the poll that set it (its library loaded).
        unsafe { (self.0.drop)(self.0.state) };
    }
}

impl SlotBody {
    /// The response body, holding the request's generation until it ends.
    pub(super) fn into_response_body(self, in_flight: InFlight) -> ResponseBody {
        match self {
            SlotBody::Empty => ResponseBody::Full { bytes: None, in_flight },
            SlotBody::Full(bytes) => ResponseBody::Full { bytes: Some(bytes), in_flight },
            SlotBody::Stream(body) => ResponseBody::Plugin(PluginBody { ffi: body.claim(), finished: false, in_flight }),
        }
    }
}

/// `HostApi::response_set_status`.
///
/// # Safety
/// `response` is the `ResponseSlot` passed to the poll this call is part of.
pub(crate) unsafe extern "C" fn response_set_status(response: *mut c_void, status: u16) -> FfiPoll {
    // SAFETY: `response` is the slot passed to this poll.
    let slot = unsafe { &mut *(response as *mut ResponseSlot) };
    match StatusCode::from_u16(status) {
        Ok(s) => {
            slot.status = Some(s);
            FfiPoll::READY
        }
        Err(_) => {
            slot.error = Some(format!("invalid status code {status}"));
            FfiPoll::ERROR
        }
    }
}

/// `HostApi::response_append_header`.
///
/// # Safety
/// `response` is the `ResponseSlot` passed to the poll this call is part of; `name` and `value` are valid for the call.
pub(crate) unsafe extern "C" fn response_append_header(response: *mut c_void, name: FfiStr, value: FfiStr) -> FfiPoll {
    catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `response` is the slot passed to this poll; the strings live for this call.
        let (slot, name, value) = unsafe { (&mut *(response as *mut ResponseSlot), name.as_bytes(), value.as_bytes()) };
        match RECENT_HEADERS.with_borrow_mut(|recent| recent.header(name, value)) {
            Some((n, v)) => {
                if slot.headers.capacity() == 0 {
                    slot.headers = SPARE_HEADERS.take().unwrap_or_default();
                }
                slot.headers.append(n, v);
                FfiPoll::READY
            }
            None => {
                slot.error = Some(format!("invalid header {:?}", String::from_utf8_lossy(name)));
                FfiPoll::ERROR
            }
        }
    }))
    .unwrap_or(FfiPoll::ERROR)
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

/// `HostApi::response_set_full_body`: the whole body, copied.
///
/// # Safety
/// `response` is the `ResponseSlot` passed to the poll this call is part of; `body` is valid for the call.
pub(crate) unsafe extern "C" fn response_set_full_body(response: *mut c_void, body: FfiStr) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `response` is the slot passed to this poll; `body` lives for this call.
        let slot = unsafe { &mut *(response as *mut ResponseSlot) };
        // SAFETY: the plugin keeps `body` valid for this call.
        let bytes = Bytes::copy_from_slice(unsafe { body.as_bytes() });
        slot.body = SlotBody::Full(bytes); // a stream set before is released
    }));
}

/// `HostApi::response_set_stream_body`: the body streams from the plugin, which hands its state over.
///
/// # Safety
/// `response` is the `ResponseSlot` passed to the poll this call is part of; `body` is a live body of the plugin, owned by the host from now on.
pub(crate) unsafe extern "C" fn response_set_stream_body(response: *mut c_void, body: FfiBody) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `response` is the slot passed to this poll.
        let slot = unsafe { &mut *(response as *mut ResponseSlot) };
        slot.body = SlotBody::Stream(Unclaimed(body)); // likewise
    }));
}

/// Where the plugin puts the chunk it produces, during one `poll_chunk`.
struct ChunkSink<'a> {
    chunk: Option<Bytes>,
    generation: &'a Arc<Generation>,
    lent: Option<&'a Arc<LentTally>>,
}

/// `HostApi::chunk_push`: the next chunk of a response body, copied.
///
/// # Safety
/// `sink` is the `ChunkSink` passed to the `poll_chunk` this call is part of; `data` is valid for the call.
pub(crate) unsafe extern "C" fn chunk_push(sink: *mut c_void, data: FfiStr) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `sink` is the `ChunkSink` passed to this poll_chunk; `data` lives for it.
        let sink = unsafe { &mut *(sink as *mut ChunkSink) };
        // SAFETY: the plugin keeps `data` valid for this call.
        sink.chunk = Some(Bytes::copy_from_slice(unsafe { data.as_bytes() }));
    }));
}

/// `HostApi::chunk_lend`: the next chunk of a response body, lent (no copy).
///
/// # Safety
/// `sink` is the `ChunkSink` passed to the `poll_chunk` this call is part of; `chunk` stays valid until its `release` is called.
pub(crate) unsafe extern "C" fn chunk_lend(sink: *mut c_void, chunk: FfiLent) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `sink` is the `ChunkSink` passed to this poll_chunk.
        let sink = unsafe { &mut *(sink as *mut ChunkSink) };
        let lent = Lent { chunk, generation: sink.generation.clone(), _counted: sink.lent.map(LentTally::count) };
        sink.chunk = Some(Bytes::from_owner(lent));
    }));
}

/// A body chunk that stays in the plugin's memory: it keeps its generation (so the library)
/// alive, and hands the release back to the plugin on one of the generation's threads.
struct Lent {
    chunk: FfiLent,
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
        unsafe { self.chunk.data.as_bytes() }
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        let release = Release(self.chunk.state, self.chunk.release);
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

/// A lent chunk's release function and state.
struct Release(*mut c_void, unsafe extern "C" fn(*mut c_void));

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
}

/// A streaming body produced by the plugin. Its `Drop` releases the plugin's state before
/// the hold on the library (a field) goes.
pub(crate) struct PluginBody {
    ffi: FfiBody,
    finished: bool,
    /// Keeps the library loaded while the state lives; lent chunks clone its generation.
    in_flight: InFlight,
}

// SAFETY: the plugin's body is `Send`; the state is owned exclusively by this value.
unsafe impl Send for PluginBody {}
// SAFETY: `&PluginBody` only reads `exact_len`, `finished` and the `Arc<Generation>` of
// `in_flight` (which is Sync); the plugin's state is reached only through `&mut`.
unsafe impl Sync for PluginBody {}

impl Drop for PluginBody {
    fn drop(&mut self) {
        // SAFETY: released exactly once, while `in_flight` (dropped after this) keeps the
        // library loaded.
        unsafe { (self.ffi.drop)(self.ffi.state) };
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
                let mut sink =
                    ChunkSink { chunk: None, generation: body.in_flight.generation(), lent: body.in_flight.lent() };
                // SAFETY: the state is live until drop, and `in_flight` keeps its library
                // loaded; waker and sink outlive the call.
                let r = unsafe {
                    (body.ffi.poll_chunk)(body.ffi.state, &waker, &mut sink as *mut ChunkSink as *mut c_void)
                };
                match r {
                    FfiPoll::PENDING => Poll::Pending,
                    FfiPoll::READY => match sink.chunk {
                        Some(chunk) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
                        None => {
                            body.finished = true;
                            Poll::Ready(None)
                        }
                    },
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
            ResponseBody::Plugin(b) if b.ffi.exact_len != u64::MAX => SizeHint::with_exact(b.ffi.exact_len),
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
