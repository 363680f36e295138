//! The host's side of the C ABI: the services in [`HostApi`], and adapters that turn a
//! plugin's response future and body into ordinary Rust futures and `http_body::Body`s.
//!
//! Every `extern "C"` function here is host code called by the plugin. None may unwind (a
//! panic escaping an `extern "C"` function aborts the process), so each body that calls into
//! tokio or hyper runs inside `catch_unwind`.

use std::cell::{Cell, RefCell};
use std::ffi::c_void;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use handler_api::abi::{
    self, FfiBody, FfiHeader, FfiHostBody, FfiJob, FfiLent, FfiPoll, FfiRequest, FfiResponseFuture, FfiStr,
    FfiWaker, HostApi,
};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use smallvec::SmallVec;

use crate::generation::{thread_generation, Generation};

/// Host data behind [`HostApi::context`]: who is logging.
pub struct PluginContext {
    pub label: String,
}

/// Builds the service table lent to one generation.
pub fn host_api(context: *const PluginContext, max_log_level: u32) -> HostApi {
    HostApi {
        abi_version: abi::ABI_VERSION,
        max_log_level,
        context: context as *const c_void,
        log,
        error_write,
        body_poll,
        body_drop,
        response_set_status,
        response_append_header,
        response_set_full_body,
        response_set_stream_body,
        chunk_push,
        chunk_lend,
        sleep_new,
        sleep_poll,
        sleep_drop,
        blocking_spawn,
        blocking_poll,
        blocking_drop,
    }
}

/// The host's most verbose enabled level, in the ABI's numbering.
pub fn max_log_level() -> u32 {
    use tracing::level_filters::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::OFF => 0,
        LevelFilter::ERROR => 1,
        LevelFilter::WARN => 2,
        LevelFilter::INFO => 3,
        LevelFilter::DEBUG => 4,
        _ => 5,
    }
}

unsafe extern "C" fn log(context: *const c_void, level: u32, target: FfiStr, message: FfiStr) {
    let _ = catch_unwind(|| {
        // SAFETY: `context` is the generation's PluginContext, alive as long as its table.
        let plugin = unsafe { &(*(context as *const PluginContext)).label };
        // SAFETY: the plugin keeps both strings valid for this call.
        let (target, message) = unsafe { (target.to_string_lossy(), message.to_string_lossy()) };
        match level {
            1 => tracing::error!(target: "plugin", %plugin, %target, "{message}"),
            2 => tracing::warn!(target: "plugin", %plugin, %target, "{message}"),
            3 => tracing::info!(target: "plugin", %plugin, %target, "{message}"),
            4 => tracing::debug!(target: "plugin", %plugin, %target, "{message}"),
            _ => tracing::trace!(target: "plugin", %plugin, %target, "{message}"),
        }
    });
}

unsafe extern "C" fn error_write(sink: *mut c_void, text: FfiStr) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: error sinks are always `&mut String` owned by the caller of init/ready.
        let sink = unsafe { &mut *(sink as *mut String) };
        // SAFETY: the plugin keeps `text` valid for this call.
        sink.push_str(&unsafe { text.to_string_lossy() });
    }));
}

// ---------------------------------------------------------------------------------------
// Request bodies

/// A request body lent to the plugin: hyper's `Incoming` plus the chunk last handed out,
/// which must stay valid until the next poll.
struct RequestBody {
    incoming: Incoming,
    current: Bytes,
    /// How many more bytes the client may send (`--max-body-size`).
    allowed: u64,
    /// Raised when the client sent more: the host answers 413.
    too_large: Arc<AtomicBool>,
    /// A waker the plugin made itself, parked here instead of inside hyper (see
    /// [`PluginWakerProxy`]).
    plugin_waker: Option<Arc<Mutex<Option<Waker>>>>,
    proxy: Option<Waker>,
}

/// What hyper gets instead of a waker the plugin made itself (`FuturesUnordered` and the like
/// make their own). hyper and h2 keep the last waker in state the *connection* owns, and the
/// connection may have moved to a newer generation, or outlive this one: a plugin waker woken
/// or dropped there would run plugin code on the wrong threads, or after `dlclose`. The proxy
/// is host code; it wakes the plugin's waker on the generation's own runtime, and the plugin's
/// waker is dropped there too (in `body_poll` or `body_drop`).
struct PluginWakerProxy {
    generation: tokio::runtime::Handle,
    slot: Weak<Mutex<Option<Waker>>>,
}

impl std::task::Wake for PluginWakerProxy {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let Some(slot) = self.slot.upgrade() else { return };
        self.generation.spawn(async move {
            let waker = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
            if let Some(waker) = waker {
                waker.wake();
            }
        });
    }
}

unsafe extern "C" fn body_poll(body: *mut c_void, waker: *const FfiWaker, chunk: *mut FfiStr) -> FfiPoll {
    catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `body` is a live RequestBody handed to the plugin in `call`; the plugin
        // polls it from one thread at a time (it holds it by `&mut`).
        let body = unsafe { &mut *(body as *mut RequestBody) };
        // SAFETY: the plugin keeps `waker` valid for this call.
        let native = unsafe { abi::waker::is_native(waker) };
        // SAFETY: as above.
        let waker = unsafe { abi::waker::borrow(waker) };
        let waker: &Waker = if native {
            &waker
        } else {
            // Park a clone of the plugin's waker here (on this generation's thread) and give
            // hyper the proxy.
            let slot = body.plugin_waker.get_or_insert_with(|| Arc::new(Mutex::new(None))).clone();
            let mut parked = slot.lock().unwrap_or_else(PoisonError::into_inner);
            if !parked.as_ref().is_some_and(|w| w.will_wake(&waker)) {
                *parked = Some((*waker).clone());
            }
            drop(parked);
            body.proxy.get_or_insert_with(|| {
                Waker::from(Arc::new(PluginWakerProxy {
                    generation: tokio::runtime::Handle::current(),
                    slot: Arc::downgrade(&slot),
                }))
            })
        };
        if body.too_large.load(Ordering::Relaxed) {
            return FfiPoll::ERROR; // past the limit: nothing more is read
        }
        let mut cx = Context::from_waker(waker);
        loop {
            match Pin::new(&mut body.incoming).poll_frame(&mut cx) {
                Poll::Pending => return FfiPoll::PENDING,
                Poll::Ready(None) => {
                    // SAFETY: `chunk` is the plugin's out-parameter.
                    unsafe { *chunk = FfiStr::EMPTY };
                    return FfiPoll::READY;
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else { continue }; // trailers are not passed on
                    if data.is_empty() {
                        continue;
                    }
                    let Some(allowed) = body.allowed.checked_sub(data.len() as u64) else {
                        body.too_large.store(true, Ordering::Release);
                        return FfiPoll::ERROR;
                    };
                    body.allowed = allowed;
                    body.current = data;
                    // SAFETY: as above; `current` stays untouched until the next poll.
                    unsafe { *chunk = FfiStr::new(&body.current) };
                    return FfiPoll::READY;
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::debug!("request body failed: {e}");
                    return FfiPoll::ERROR;
                }
            }
        }
    }))
    .unwrap_or(FfiPoll::ERROR)
}

unsafe extern "C" fn body_drop(body: *mut c_void) {
    let _ = catch_unwind(|| {
        // SAFETY: the plugin releases each body exactly once.
        let body = unsafe { Box::from_raw(body as *mut RequestBody) };
        // Drop the parked plugin waker here, on the generation's thread; the proxy hyper may
        // still hold then finds an empty slot.
        if let Some(slot) = &body.plugin_waker {
            drop(slot.lock().unwrap_or_else(PoisonError::into_inner).take());
        }
    });
}

// ---------------------------------------------------------------------------------------
// Responses

thread_local! {
    /// The header map of this thread's last request, emptied, for the next response the
    /// plugin describes: two allocations fewer per request.
    static SPARE_HEADERS: Cell<Option<HeaderMap>> = const { Cell::new(None) };
}

/// Keeps `headers` for the next response on this thread, unless it grew unusually large.
fn recycle(mut headers: HeaderMap) {
    if headers.capacity() <= 64 {
        headers.clear();
        SPARE_HEADERS.set(Some(headers));
    }
}

/// Where the plugin describes its response, during the poll that completes its future.
struct ResponseSlot<'g> {
    /// Cloned into a streaming body, which must keep the library loaded.
    generation: &'g Arc<Generation>,
    status: Option<StatusCode>,
    headers: HeaderMap,
    body: Option<ResponseBody>,
    error: Option<String>,
}

unsafe extern "C" fn response_set_status(response: *mut c_void, status: u16) -> FfiPoll {
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

unsafe extern "C" fn response_append_header(response: *mut c_void, name: FfiStr, value: FfiStr) -> FfiPoll {
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

unsafe extern "C" fn response_set_full_body(response: *mut c_void, body: FfiStr) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `response` is the slot passed to this poll; `body` lives for this call.
        let slot = unsafe { &mut *(response as *mut ResponseSlot) };
        slot.body = Some(ResponseBody::Full(Some(Bytes::copy_from_slice(unsafe { body.as_bytes() }))));
    }));
}

unsafe extern "C" fn response_set_stream_body(response: *mut c_void, body: FfiBody) {
    // SAFETY: `response` is the slot passed to this poll.
    let slot = unsafe { &mut *(response as *mut ResponseSlot) };
    slot.body = Some(ResponseBody::Plugin(PluginBody { ffi: body, finished: false, generation: slot.generation.clone() }));
}

/// Where the plugin puts the chunk it produces, during one `poll_chunk`.
struct ChunkSink<'a> {
    chunk: Option<Bytes>,
    generation: &'a Arc<Generation>,
}

unsafe extern "C" fn chunk_push(sink: *mut c_void, data: FfiStr) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `sink` is the `ChunkSink` passed to this poll_chunk; `data` lives for it.
        let sink = unsafe { &mut *(sink as *mut ChunkSink) };
        sink.chunk = Some(Bytes::copy_from_slice(unsafe { data.as_bytes() }));
    }));
}

unsafe extern "C" fn chunk_lend(sink: *mut c_void, chunk: FfiLent) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `sink` is the `ChunkSink` passed to this poll_chunk.
        let sink = unsafe { &mut *(sink as *mut ChunkSink) };
        let lent = Lent { chunk, generation: sink.generation.clone() };
        sink.chunk = Some(Bytes::from_owner(lent));
    }));
}

/// A body chunk that stays in the plugin's memory: it keeps its generation (so the library)
/// alive, and hands the release back to the plugin on one of the generation's threads.
struct Lent {
    chunk: FfiLent,
    generation: Arc<Generation>,
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

/// Starts a request in the plugin. Must run on a thread of the plugin's generation. A body
/// longer than `max_body_size` fails, for the plugin, where it crosses the limit, and the
/// call then ends in [`CallError::BodyTooLarge`]. Gives back the request's method and target
/// (moved, not cloned), for the log.
pub fn call(generation: &Generation, request: http::Request<Incoming>, max_body_size: u64) -> (PluginCall, http::Method, http::Uri) {
    let (parts, incoming) = request.into_parts();
    let exact_len = incoming.size_hint().exact().unwrap_or(u64::MAX);
    // A request without a body (most GETs) costs no allocation for one.
    let mut too_large = None;
    let body = if incoming.is_end_stream() {
        std::ptr::null_mut()
    } else {
        let flag = too_large.insert(Arc::new(AtomicBool::new(false))).clone();
        let body = RequestBody {
            incoming,
            current: Bytes::new(),
            allowed: max_body_size,
            too_large: flag,
            plugin_waker: None,
            proxy: None,
        };
        Box::into_raw(Box::new(body)) as *mut c_void
    };
    // Borrowed views of the headers; on the stack for any usual request. Only the bytes of
    // `HeaderValue`s may go here: the ABI promises plugins valid values (`FfiHeader::value`).
    let mut headers = SmallVec::<[FfiHeader; 16]>::new();
    headers.extend(
        parts.headers.iter().map(|(n, v)| FfiHeader { name: FfiStr::new(n.as_str().as_bytes()), value: FfiStr::new(v.as_bytes()) }),
    );
    let absolute;
    let uri = match parts.uri.scheme() {
        None => parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        Some(_) => {
            absolute = parts.uri.to_string();
            &absolute
        }
    };
    let version = match parts.version {
        http::Version::HTTP_09 => 9,
        http::Version::HTTP_10 => 10,
        http::Version::HTTP_2 => 20,
        http::Version::HTTP_3 => 30,
        _ => 11,
    };
    let ffi = FfiRequest {
        method: FfiStr::new(parts.method.as_str().as_bytes()),
        uri: FfiStr::new(uri.as_bytes()),
        version,
        headers: headers.as_ptr(),
        headers_len: headers.len(),
        body: FfiHostBody { handle: body, exact_len },
    };
    // SAFETY: the declaration was checked at load; `ffi` and everything it borrows outlive the
    // call; the body handle passes to the plugin, which releases it through `body_drop`.
    let future = unsafe { (generation.declaration().handle)(&ffi) };
    drop(headers);
    recycle(parts.headers);
    let call = PluginCall {
        ffi: future,
        too_large,
        #[cfg(debug_assertions)]
        generation: generation.id(),
    };
    (call, parts.method, parts.uri)
}

/// Why a plugin call produced no response.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("the handler panicked")]
    Panicked,
    #[error("the handler returned an invalid response: {0}")]
    Invalid(String),
    /// The client sent a body longer than the limit; whatever the plugin answered to the
    /// body cut short is moot.
    #[error("the request body is larger than --max-body-size")]
    BodyTooLarge,
}

/// The plugin's response future. Dropping it drops the plugin's state.
pub struct PluginCall {
    ffi: FfiResponseFuture,
    too_large: Option<Arc<AtomicBool>>,
    /// The generation the call was made on: the one to poll it with (checked in debug builds).
    #[cfg(debug_assertions)]
    generation: u64,
}

// SAFETY: the plugin's future is `Send` (handler-api requires it); the state is owned
// exclusively by this value.
unsafe impl Send for PluginCall {}

impl PluginCall {
    /// Polls the plugin's future, on a thread of `generation`, the one it was called on
    /// (whose streaming bodies keep it loaded).
    pub fn poll(&mut self, cx: &mut Context<'_>, generation: &Arc<Generation>) -> Poll<Result<http::Response<ResponseBody>, CallError>> {
        #[cfg(debug_assertions)]
        assert_eq!(generation.id(), self.generation, "a plugin call polled with another generation");
        let waker = abi::waker::lend(cx.waker());
        // The header map comes from `SPARE_HEADERS` at the first header, if there is one.
        let mut slot = ResponseSlot { generation, status: None, headers: HeaderMap::new(), body: None, error: None };
        // SAFETY: the state is live until drop; waker and slot outlive the call.
        let r = unsafe { (self.ffi.poll)(self.ffi.state, &waker, &mut slot as *mut ResponseSlot as *mut c_void) };
        if r != FfiPoll::PENDING && self.too_large.as_ref().is_some_and(|flag| flag.load(Ordering::Acquire)) {
            return Poll::Ready(Err(CallError::BodyTooLarge)); // `slot` and its body drop here
        }
        match r {
            FfiPoll::PENDING => Poll::Pending,
            FfiPoll::READY => {
                let mut response = http::Response::new(slot.body.unwrap_or(ResponseBody::Full(None)));
                *response.status_mut() = slot.status.unwrap_or(StatusCode::OK);
                *response.headers_mut() = slot.headers;
                Poll::Ready(Ok(response))
            }
            FfiPoll::PANICKED => Poll::Ready(Err(CallError::Panicked)),
            _ => Poll::Ready(Err(CallError::Invalid(slot.error.unwrap_or_else(|| "unknown error".into())))),
        }
    }
}

impl Drop for PluginCall {
    fn drop(&mut self) {
        // SAFETY: released exactly once.
        unsafe { (self.ffi.drop)(self.ffi.state) };
    }
}

/// A response body: complete, or streamed from the plugin.
pub enum ResponseBody {
    Full(Option<Bytes>),
    Plugin(PluginBody),
}

/// Why a plugin's body stream ended early.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the response body panicked mid-stream")]
    Panicked,
    #[error("the response body failed mid-stream")]
    Failed,
    #[error("the response was aborted: {0}")]
    Aborted(&'static str),
}

/// A streaming body produced by the plugin.
pub struct PluginBody {
    ffi: FfiBody,
    finished: bool,
    /// For the chunks it lends, which keep the library loaded until hyper is done with them.
    generation: Arc<Generation>,
}

// SAFETY: the plugin's body is `Send`; the state is owned exclusively by this value.
unsafe impl Send for PluginBody {}
// SAFETY: `&PluginBody` only reads `exact_len` and `finished`.
unsafe impl Sync for PluginBody {}

impl Drop for PluginBody {
    fn drop(&mut self) {
        // SAFETY: released exactly once.
        unsafe { (self.ffi.drop)(self.ffi.state) };
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ResponseBody::Full(bytes) => Poll::Ready(bytes.take().filter(|b| !b.is_empty()).map(|b| Ok(Frame::data(b)))),
            ResponseBody::Plugin(body) => {
                if body.finished {
                    return Poll::Ready(None);
                }
                let waker = abi::waker::lend(cx.waker());
                let mut sink = ChunkSink { chunk: None, generation: &body.generation };
                // SAFETY: the state is live until drop; waker and sink outlive the call.
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
            ResponseBody::Full(b) => b.as_ref().is_none_or(|b| b.is_empty()),
            ResponseBody::Plugin(b) => b.finished || b.ffi.exact_len == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ResponseBody::Plugin(b) if b.ffi.exact_len != u64::MAX => SizeHint::with_exact(b.ffi.exact_len),
            ResponseBody::Plugin(_) => SizeHint::default(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Timers and blocking work

unsafe extern "C" fn sleep_new(nanos: u64) -> *mut c_void {
    catch_unwind(|| {
        if tokio::runtime::Handle::try_current().is_err() {
            return std::ptr::null_mut();
        }
        Box::into_raw(Box::new(tokio::time::sleep(Duration::from_nanos(nanos)))) as *mut c_void
    })
    .unwrap_or(std::ptr::null_mut())
}

unsafe extern "C" fn sleep_poll(sleep: *mut c_void, waker: *const FfiWaker) -> FfiPoll {
    catch_unwind(|| {
        // SAFETY: `sleep` is a live boxed Sleep from `sleep_new`; it never moves out of its
        // box until `sleep_drop`, so pinning it in place is sound.
        let sleep = unsafe { Pin::new_unchecked(&mut *(sleep as *mut tokio::time::Sleep)) };
        // SAFETY: the plugin keeps `waker` valid for this call.
        let waker = unsafe { abi::waker::borrow(waker) };
        match sleep.poll(&mut Context::from_waker(&waker)) {
            Poll::Ready(()) => FfiPoll::READY,
            Poll::Pending => FfiPoll::PENDING,
        }
    })
    .unwrap_or(FfiPoll::READY)
}

unsafe extern "C" fn sleep_drop(sleep: *mut c_void) {
    // SAFETY: released exactly once.
    let _ = catch_unwind(|| drop(unsafe { Box::from_raw(sleep as *mut tokio::time::Sleep) }));
}

/// A job handed over by the plugin; its `release` runs when this is dropped, whether or not
/// the job ran.
struct Job(FfiJob);

// SAFETY: handler-api only builds jobs from `Send` closures and results.
unsafe impl Send for Job {}

impl Drop for Job {
    fn drop(&mut self) {
        // SAFETY: FfiJob's contract: release exactly once, after run.
        unsafe { (self.0.release)(self.0.state) };
    }
}

unsafe extern "C" fn blocking_spawn(job: FfiJob) -> *mut c_void {
    let job = Job(job);
    catch_unwind(AssertUnwindSafe(move || {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return std::ptr::null_mut(); // `job` drops here: released without running
        };
        let task = runtime.spawn_blocking(move || {
            let job = job; // capture the whole Job (Send), not its raw fields
            // SAFETY: run at most once, before `release` (which runs when `job` drops).
            unsafe { (job.0.run)(job.0.state) };
        });
        Box::into_raw(Box::new(task)) as *mut c_void
    }))
    .unwrap_or(std::ptr::null_mut())
}

unsafe extern "C" fn blocking_poll(task: *mut c_void, waker: *const FfiWaker) -> FfiPoll {
    catch_unwind(|| {
        // SAFETY: `task` is a live boxed JoinHandle from `blocking_spawn`.
        let task = unsafe { &mut *(task as *mut tokio::task::JoinHandle<()>) };
        // SAFETY: the plugin keeps `waker` valid for this call.
        let waker = unsafe { abi::waker::borrow(waker) };
        match Pin::new(task).poll(&mut Context::from_waker(&waker)) {
            Poll::Ready(Ok(())) => FfiPoll::READY,
            Poll::Ready(Err(_)) => FfiPoll::ERROR,
            Poll::Pending => FfiPoll::PENDING,
        }
    })
    .unwrap_or(FfiPoll::ERROR)
}

unsafe extern "C" fn blocking_drop(task: *mut c_void) {
    // SAFETY: released exactly once.
    let _ = catch_unwind(|| drop(unsafe { Box::from_raw(task as *mut tokio::task::JoinHandle<()>) }));
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
