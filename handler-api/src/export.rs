//! The plugin's side of the C ABI, instantiated by [`export_handler!`](crate::export_handler).
//!
//! Every `extern "C"` function here catches panics: a panic becomes `PANICKED` (or `ERROR`)
//! for the host, after the panic hook installed by `init` has sent its message to the host's
//! log. Nothing unwinds across the boundary.

use std::cell::Cell;
use std::ffi::c_void;
use std::fmt::Display;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri, Version};

use crate::abi::{
    self, FfiBody, FfiBodyVTable, FfiChunk, FfiHeader, FfiPoll, FfiRequest, FfiResponse, FfiResponseFuture, FfiStr,
    FfiUpgrade, HostApi, ABI_VERSION,
};
use crate::body::Kind;
use crate::context::RequestContext;
use crate::upgrade::{self, Accepted, Upgrade};
use crate::{log, Body, Handler, Request, Response, HOST};

/// What the declaration of a plugin with a service calls.
pub mod service {
    pub use crate::service::{handle, install, uninstall};
}

/// What the state declaration calls.
pub mod state {
    pub use crate::state::{export, import, release};
}

/// The compiler that built this crate.
pub const RUSTC: &str = env!("HANDLER_API_RUSTC");

fn write_error(sink: *mut c_void, text: &str) {
    if let Some(host) = crate::try_host() {
        // SAFETY: `sink` is the host's error sink passed to this call; `text` outlives it.
        unsafe { (host.error_write)(sink, FfiStr::new(text.as_bytes())) };
    }
}

pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "non-string panic payload"
    }
}

/// `init` of the declaration: records the host's table, routes panics and `tracing` events to
/// the host's log, then runs the author's hook.
///
/// # Safety
/// `host` must point at a `HostApi` that stays valid until `shutdown` has returned.
pub unsafe fn init(
    host: *const HostApi,
    sink: *mut c_void,
    hook: impl FnOnce(*mut c_void) -> FfiPoll,
) -> FfiPoll {
    // SAFETY: forwarded from the caller.
    let attached = unsafe { attach(host, sink) };
    if attached != FfiPoll::READY {
        return attached;
    }
    let table = crate::host(); // recorded by `attach`
    let outcome = hook(sink);
    // After the author's init, so that a logger it installs (`log` takes one, and many
    // crates' `init()` panic when one is set) wins; records logged during init are lost.
    // It cannot panic; if it did, the plugin would only lose those records.
    let _ = catch_unwind(|| log::LogBridge::install(table));
    outcome
}

/// Records the host's table and routes panics and `tracing` events to the host's log: the
/// first thing `init` does, and `import_state` too, which runs before it (calling it twice
/// changes nothing).
///
/// # Safety
/// `host` must point at a `HostApi` that stays valid until `shutdown` has returned.
pub(crate) unsafe fn attach(host: *const HostApi, sink: *mut c_void) -> FfiPoll {
    if host.is_null() {
        return FfiPoll::ERROR;
    }
    // SAFETY: the caller guarantees `host` is valid; these fields open every version's table.
    let (version, size) = unsafe { ((*host).abi_version, (*host).size) };
    if version != ABI_VERSION {
        // Nothing else of a table of another version can be read (nor its `error_write`
        // called): the host checked the plugin's version before, and knows.
        return FfiPoll::ERROR;
    }
    if size < abi::HOST_API_BASE_SIZE {
        return FfiPoll::ERROR; // a broken host: not even its `error_write` can be trusted
    }
    // SAFETY: checked above: a table of this version, of `size` bytes (the caller).
    let table: &'static HostApi = &TABLE.get_or_init(|| Table(unsafe { copy_table(host) })).0;
    HOST.store(table as *const HostApi as *mut HostApi, Ordering::Release);
    let installed = catch_unwind(|| {
        // std's default hook captures backtraces (which pin the library when RUST_BACKTRACE is
        // set) and asks for the current thread; this one only formats and forwards.
        std::panic::set_hook(Box::new(|info| {
            let location = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
            let message = panic_message(info.payload());
            let hint = mistake_hint(message).map(|hint| format!(" ({hint})")).unwrap_or_default();
            // `try_host`, not `host`: a panic inside the hook aborts. The table is set above,
            // before the hook, so this always logs.
            if let Some(host) = crate::try_host() {
                log::emit(host, 1, "panic", &format!("plugin panicked{location}: {message}{hint}"));
            }
        }));
        // Before the author's init, which may log: a subscriber that init installs then
        // fails to (one per process), with a hint (`mistake_hint`). Fails here only if this
        // runs twice (`import_state`, then `init`): the first stays.
        let _ = tracing::subscriber::set_global_default(log::HostSubscriber::new(table));
    });
    if installed.is_err() {
        write_error(sink, "installing the panic hook or log bridge panicked");
        return FfiPoll::PANICKED;
    }
    FfiPoll::READY
}

/// The host's table as this plugin uses it: a copy (see [`copy_table`]), made once.
struct Table(HostApi);

// SAFETY: the table is never written after it is made; its pointers are the host's, which it
// shares with every thread of the plugin (`HostApi`'s contract).
unsafe impl Sync for Table {}
// SAFETY: as above.
unsafe impl Send for Table {}

static TABLE: std::sync::OnceLock<Table> = std::sync::OnceLock::new();

/// A copy of the host's table: its first `size` bytes, and for the functions a host older than
/// this handler-api does not have (they lie beyond its `size`), stand-ins that are never called
/// (`HostApi::has` says they are missing). A reference to the host's own table would claim all
/// of `HostApi`'s bytes, more than such a host's table has.
///
/// # Safety
/// `host` must point at a table of this ABI version, of at least `(*host).size` bytes, which is
/// at least [`abi::HOST_API_BASE_SIZE`].
unsafe fn copy_table(host: *const HostApi) -> HostApi {
    let mut table = std::mem::MaybeUninit::<HostApi>::uninit();
    let p = table.as_mut_ptr();
    // SAFETY: the caller's promise.
    let size = unsafe { (*host).size }.min(std::mem::size_of::<HostApi>());
    let reaches = |offset: usize, len: usize| size >= offset + len;
    // SAFETY: `size` bytes are readable at `host` (the caller), and fit in `table`.
    unsafe { std::ptr::copy_nonoverlapping(host as *const u8, p as *mut u8, size) };
    // Every field added after the base table (see `HostApi`) needs its stand-in here.
    if !reaches(std::mem::offset_of!(HostApi, spawn), std::mem::size_of::<abi::SpawnFn>()) {
        // SAFETY: a field of `table`, written whole.
        unsafe { std::ptr::addr_of_mut!((*p).spawn).write(missing_spawn) };
    }
    if !reaches(std::mem::offset_of!(HostApi, log_in_spans), std::mem::size_of::<abi::LogInSpansFn>()) {
        // SAFETY: as above.
        unsafe { std::ptr::addr_of_mut!((*p).log_in_spans).write(missing_log_in_spans) };
    }
    // SAFETY: every field is set: those within `size` by the host's bytes (the base table
    // whole, as `size` reaches it), the others just above.
    unsafe { table.assume_init() }
}

/// Stand-in for `HostApi::spawn` of a host that has none: the future is released, as the
/// call's contract says of a future not taken.
///
/// # Safety
/// `future` must uphold [`abi::FfiFuture`]'s contract.
unsafe extern "C" fn missing_spawn(_context: *const c_void, future: abi::FfiFuture) -> FfiPoll {
    // SAFETY: released exactly once, here (the caller's promise).
    unsafe { ((*future.vtable).drop)(future.state) };
    FfiPoll::ERROR
}

/// Stand-in for `HostApi::log_in_spans` of a host that has none.
///
/// # Safety
/// None: it touches nothing.
unsafe extern "C" fn missing_log_in_spans(_: *const c_void, _: u32, _: FfiStr, _: FfiStr, _: FfiStr) {}

/// What to do instead, for a panic that comes from a known mistake in a plugin.
pub(crate) fn mistake_hint(message: &str) -> Option<&'static str> {
    // tokio's words when there is no runtime to be found: a plugin's own copy of tokio never
    // sees the host's runtime, so `tokio::spawn`, `tokio::time::*` and
    // `tokio::task::spawn_blocking` all panic with them.
    if message.contains("Tokio 1.x") {
        return Some(
            "a plugin has no tokio runtime of its own: tokio::spawn, tokio::time and tokio::task::spawn_blocking \
             cannot work in one; use handler_api::spawn for tasks, handler_api::sleep and handler_api::timeout \
             for timers, and handler_api::spawn_blocking for blocking work",
        );
    }
    // tracing's words (and tracing-subscriber's `init()`'s) when a global subscriber is set
    // already: handler-api set one before the plugin's init, to route events to the host.
    (message.contains("global default trace dispatcher has already been set")
        || message.contains("Unable to install global subscriber"))
    .then_some(
        "a plugin's tracing events already go to the host's log, filtered by its --log-level: \
         install no subscriber of your own (use tracing::subscriber::with_default for one of your own \
         in a scope)",
    )
}

/// Runs an author's fallible hook (init or readiness), reporting its error or panic.
///
/// # Safety
/// `sink` must be the host's error sink passed to the hook being run, valid for this call:
/// the host writes the error through it.
pub unsafe fn run_fallible<E: Display>(sink: *mut c_void, hook: impl FnOnce() -> Result<(), E>) -> FfiPoll {
    // The error is formatted inside catch_unwind too: its Display is the author's code.
    match catch_unwind(AssertUnwindSafe(|| hook().err().map(|e| e.to_string()))) {
        Ok(None) => FfiPoll::READY,
        Ok(Some(error)) => {
            write_error(sink, &error);
            FfiPoll::ERROR
        }
        Err(payload) => {
            let message = panic_message(&*payload);
            let hint = mistake_hint(message).map(|hint| format!(" ({hint})")).unwrap_or_default();
            write_error(sink, &format!("panicked: {message}{hint}"));
            FfiPoll::PANICKED
        }
    }
}

/// Runs the author's shutdown hook, if any. A panic is reported to the host's log (by the
/// panic hook, then here) and swallowed: the library is unloaded either way.
pub fn run_shutdown(hook: impl FnOnce()) {
    if catch_unwind(AssertUnwindSafe(hook)).is_err() {
        if let Some(host) = crate::try_host() {
            log::emit(host, 2, "shutdown", "the shutdown hook panicked; the plugin is unloaded anyway");
        }
    }
}

/// A request in progress in the plugin: the state behind an [`FfiResponseFuture`].
enum Call<F> {
    /// The handler's future.
    Running(F),
    /// Answered without the handler (the request could not be rebuilt).
    Answered(Response),
    /// Answered: what the [`FfiResponse`] handed to the host borrows, until it drops the future.
    Sent(Sent),
    /// The handler panicked.
    Done,
}

/// A response handed to the host, which reads its headers and body in place.
struct Sent {
    headers: HeaderMap,
    /// Views of `headers` (the vector's own storage, which does not move with it).
    views: Vec<FfiHeader>,
    /// The full body, which the host copies: kept alive, never read here.
    _full: Bytes,
}

/// `handle` of the declaration: turns the host's request into an `http::Request`, calls the
/// handler and returns its future.
///
/// # Safety
/// `request` must point at a valid `FfiRequest` whose strings stay valid during this call.
pub unsafe fn handle<H: Handler>(handler: &H, request: *const FfiRequest) -> FfiResponseFuture {
    // The future lives in this box, which never moves, until the host drops it. The box is made
    // first, uninitialised, and the future written straight into it: a handler's future is
    // often a kilobyte or more, and every move of it is a copy.
    let state: *mut Call<H::Future> = Box::into_raw(Box::<Call<H::Future>>::new_uninit()).cast();
    let written = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: forwarded from the caller.
        let request = unsafe { &*request };
        // Take the body first, so it goes back to the host even if the rest is invalid.
        let body = Body::from_host(abi::FfiHostBody { handle: request.body.handle, exact_len: request.body.exact_len });
        // SAFETY: forwarded from the caller.
        match unsafe { build_request(request, body) } {
            Ok(mut req) => {
                // SAFETY: as above: the host keeps the request's strings valid during `handle`.
                let protocol = unsafe { request.upgrade.as_bytes() };
                if !protocol.is_empty() {
                    let protocol = String::from_utf8_lossy(protocol).into_owned();
                    req.extensions_mut().insert(Upgrade::new(protocol, request.version == abi::HTTP_2));
                }
                req.extensions_mut().insert(RequestContext::from_ffi(request));
                // SAFETY: the box is allocated for a `Call`, ours alone, and written once.
                unsafe { state.write(Call::Running(handler.call(req))) };
            }
            // SAFETY: as above.
            Err(e) => unsafe { state.write(Call::Answered(bad_request(e))) },
        }
    }));
    if written.is_err() {
        // Nothing was written (the write is the closure's last step, and cannot panic): `Done`
        // answers PANICKED.
        // SAFETY: as above.
        unsafe { state.write(Call::Done) };
    }
    FfiResponseFuture { state: state as *mut c_void, poll: poll_response::<H::Future>, drop: drop_response::<H::Future> }
}

fn bad_request(reason: String) -> Response {
    let mut res = Response::new(Body::from(format!("bad request: {reason}\n")));
    *res.status_mut() = http::StatusCode::BAD_REQUEST;
    res
}

thread_local! {
    /// The header map of this thread's last response, emptied, for its next request (what
    /// hyper does too): two allocations fewer per request. Generation threads are joined
    /// before the library unloads, so this destructor always runs in time.
    static SPARE_HEADERS: Cell<Option<HeaderMap>> = const { Cell::new(None) };
    /// Likewise, the vector of the last response's header views (empty).
    static SPARE_VIEWS: Cell<Vec<FfiHeader>> = const { Cell::new(Vec::new()) };
}

/// Keeps `headers` for the next request on this thread, unless it grew unusually large.
fn recycle(mut headers: HeaderMap) {
    if headers.capacity() <= 64 {
        headers.clear();
        SPARE_HEADERS.set(Some(headers));
    }
}

/// Rebuilds the host's request as an `http::Request` with `body`, copying what it borrows.
///
/// # Safety
/// Every string of `r` (method, target, header names and values) and, unless `headers` is null
/// or `headers_len` is 0, the `headers_len` headers at `headers` must stay valid and unchanged
/// during this call: what the host guarantees during `handle`.
unsafe fn build_request(r: &FfiRequest, body: Body) -> Result<Request, String> {
    // SAFETY: the host keeps every string of `r` valid during `handle`, `r.method` among them.
    let method = Method::from_bytes(unsafe { r.method.as_bytes() }).map_err(|e| e.to_string())?;
    let version = match r.version {
        abi::HTTP_09 => Version::HTTP_09,
        abi::HTTP_10 => Version::HTTP_10,
        abi::HTTP_2 => Version::HTTP_2,
        abi::HTTP_3 => Version::HTTP_3,
        _ => Version::HTTP_11,
    };
    let headers: &[abi::FfiHeader] = if r.headers_len == 0 || r.headers.is_null() {
        &[]
    } else {
        // SAFETY: non-null (checked above); the host keeps the `headers_len` headers at
        // `headers` valid during `handle`, and the slice does not outlive this call.
        unsafe { std::slice::from_raw_parts(r.headers, r.headers_len) }
    };
    // The target and the header values must be copied out of the host's memory. They share
    // one copy: one allocation (two once it is shared) instead of one each. As with hyper's
    // own header values, which share its read buffer, a value kept after the request keeps
    // that copy alive. The root path needs none.
    // SAFETY: the host keeps every string of `r` valid during `handle`, `r.uri` among them.
    let target = unsafe { r.uri.as_bytes() };
    let root = target == b"/";
    // SAFETY: the host keeps every string of `r` valid during `handle`, the header values
    // among them; the closure is used only within this call.
    let values = || headers.iter().map(|h| unsafe { h.value.as_bytes() });
    let mut text = {
        let mut text = Vec::with_capacity(if root { 0 } else { target.len() } + values().map(<[u8]>::len).sum::<usize>());
        if !root {
            text.extend_from_slice(target);
        }
        values().for_each(|v| text.extend_from_slice(v));
        Bytes::from(text)
    };
    let uri = if root {
        Uri::default() // "/", built without parsing
    } else {
        Uri::from_maybe_shared(text.split_to(target.len())).map_err(|e| e.to_string())?
    };
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    let mut map = SPARE_HEADERS.take().unwrap_or_default();
    // `try_`: a host whose --max-header-size lets more headers through than a HeaderMap
    // holds (about 24,000) must get a 400, not a panic.
    let too_many = |_| format!("{} header fields: more than a request may have", headers.len());
    map.try_reserve(headers.len()).map_err(too_many)?;
    for h in headers {
        // SAFETY: the host keeps every string of `r` valid during `handle`, the header names
        // among them.
        let name = HeaderName::from_bytes(unsafe { h.name.as_bytes() }).map_err(|e| e.to_string())?;
        // SAFETY: as for `values` above: the host keeps the header values valid during `handle`.
        let len = unsafe { h.value.as_bytes() }.len();
        // SAFETY: the ABI promises valid field values (the host passes `http::HeaderValue`s'
        // bytes), and these are those bytes, copied. (Debug builds check all the same: a
        // broken promise panics there, and the request is answered 500.)
        let value = unsafe { HeaderValue::from_maybe_shared_unchecked(text.split_to(len)) };
        map.try_append(name, value).map_err(too_many)?;
    }
    *req.headers_mut() = map;
    Ok(req)
}

/// `poll` of the [`FfiResponseFuture`] made by `handle`: polls the handler's future and, once
/// it is ready, writes the response to `out`.
///
/// # Safety
/// `state` must be the state of a future from `handle` for this `F`, not yet dropped and not
/// polled concurrently; `waker` must point at a valid `FfiWaker` for this call; `out` must be
/// valid for writing an `FfiResponse`.
unsafe extern "C" fn poll_response<F: Future<Output = Response>>(
    state: *mut c_void,
    waker: *const abi::FfiWaker,
    out: *mut FfiResponse,
) -> FfiPoll {
    // SAFETY: `state` is the box made in `handle`, exclusively ours until `drop_response`.
    let call = unsafe { &mut *(state as *mut Call<F>) };
    let response = match call {
        Call::Running(future) => {
            // SAFETY: the future sits in a box that is never moved, and is dropped in place.
            let future = unsafe { Pin::new_unchecked(future) };
            // SAFETY: the host keeps `waker` valid for this call.
            let waker = unsafe { abi::waker::borrow(waker) };
            let mut cx = Context::from_waker(&waker);
            match catch_unwind(AssertUnwindSafe(|| future.poll(&mut cx))) {
                Ok(Poll::Pending) => return FfiPoll::PENDING,
                Ok(Poll::Ready(response)) => response,
                Err(_) => {
                    // Dropping a future that panicked may panic again; contain that too.
                    let _ = catch_unwind(AssertUnwindSafe(|| *call = Call::Done));
                    return FfiPoll::PANICKED;
                }
            }
        }
        // The handler panicked earlier (or was polled after completion).
        Call::Done | Call::Sent(_) => return FfiPoll::PANICKED,
        Call::Answered(_) => {
            // Take the response, leaving `Done`. The `else` cannot run (`Answered` was matched
            // just above); it answers PANICKED rather than panicking, as nothing here may.
            let Call::Answered(response) = std::mem::replace(call, Call::Done) else {
                return FfiPoll::PANICKED;
            };
            response
        }
    };
    match catch_unwind(AssertUnwindSafe(|| send(call, response))) {
        Ok(response) => {
            // SAFETY: `out` is valid for writing, as the caller guarantees.
            unsafe { out.write(response) };
            FfiPoll::READY
        }
        Err(_) => {
            let _ = catch_unwind(AssertUnwindSafe(|| *call = Call::Done));
            FfiPoll::PANICKED
        }
    }
}

/// Keeps `response`'s head and body in `call` (as [`Call::Sent`]) and describes them for the
/// host, which reads them in place until it drops the future.
fn send<F>(call: &mut Call<F>, response: Response) -> FfiResponse {
    // What runs the author's code when dropped (the finished future, the extensions) goes
    // first: a panic there leaves nothing handed over half-way.
    *call = Call::Done;
    let (parts, body) = response.into_parts();
    let http::response::Parts { status, headers, extensions, .. } = parts;
    let session = extensions.get::<Accepted>().and_then(Accepted::take);
    drop(extensions);
    let upgrade = match session {
        Some(session) => upgrade::into_ffi(session),
        None => FfiUpgrade { state: std::ptr::null_mut(), vtable: std::ptr::null() },
    };
    let exact_len = body.exact_len().unwrap_or(abi::UNKNOWN_LENGTH);
    let (body_kind, full, stream) = match body.into_kind() {
        Kind::Empty => (abi::BODY_EMPTY, Bytes::new(), NO_STREAM),
        Kind::Full(bytes) => (abi::BODY_FULL, bytes, NO_STREAM),
        kind => {
            let state = Box::into_raw(Box::new(Streaming { body: Some(Body::from_kind(kind)), current: Bytes::new() }));
            (abi::BODY_STREAM, Bytes::new(), FfiBody { state: state as *mut c_void, vtable: &BODY_VTABLE, exact_len })
        }
    };
    // The views borrow the map's own storage, which stays put while the map moves into
    // `call`; likewise the vector's and the body's.
    let mut views = SPARE_VIEWS.take();
    views.extend(
        headers
            .iter()
            .map(|(n, v)| FfiHeader { name: FfiStr::new(n.as_str().as_bytes()), value: FfiStr::new(v.as_bytes()) }),
    );
    let response = FfiResponse {
        status: status.as_u16(),
        body_kind,
        headers: views.as_ptr(),
        headers_len: views.len(),
        full: FfiStr::new(&full),
        stream,
        upgrade,
    };
    *call = Call::Sent(Sent { headers, views, _full: full });
    response
}

/// The stream body of a response that has none.
const NO_STREAM: FfiBody = FfiBody { state: std::ptr::null_mut(), vtable: std::ptr::null(), exact_len: 0 };

/// `drop` of the [`FfiResponseFuture`] made by `handle`.
///
/// # Safety
/// `state` must be the state of a future from `handle` for this `F`, not used again afterwards.
unsafe extern "C" fn drop_response<F>(state: *mut c_void) {
    let _ = catch_unwind(|| {
        // SAFETY: the host calls this exactly once with the box made in `handle`.
        let call = unsafe { Box::from_raw(state as *mut Call<F>) };
        if let Call::Sent(sent) = *call {
            recycle(sent.headers);
            let mut views = sent.views;
            if views.capacity() <= 64 {
                views.clear();
                SPARE_VIEWS.set(views);
            }
        }
    });
}

/// A streaming response body: the state behind an [`FfiBody`] made by [`send`].
struct Streaming {
    /// `None` once it panicked.
    body: Option<Body>,
    /// The chunk last handed over, borrowed by the host until the next call.
    current: Bytes,
}

static BODY_VTABLE: FfiBodyVTable = FfiBodyVTable { poll_chunk: poll_body, drop: drop_body };

/// `poll_chunk` of the [`FfiBody`] made by [`send`]: hands the body's next chunk to the host,
/// borrowed or lent.
///
/// # Safety
/// `state` must be the state of a body from `send`, not yet dropped and not polled
/// concurrently; `waker` must point at a valid `FfiWaker` for this call; `out` must be valid
/// for writing an `FfiChunk`.
unsafe extern "C" fn poll_body(state: *mut c_void, waker: *const abi::FfiWaker, out: *mut FfiChunk) -> FfiPoll {
    // SAFETY: `state` is the box made in `send`, exclusively ours until `drop_body`.
    let streaming = unsafe { &mut *(state as *mut Streaming) };
    let Some(body) = streaming.body.as_mut() else {
        return FfiPoll::PANICKED;
    };
    // SAFETY: the host keeps `waker` valid for this call.
    let waker = unsafe { abi::waker::borrow(waker) };
    let mut cx = Context::from_waker(&waker);
    // Handing the chunk over and reporting an error run inside `catch_unwind` too: dropping a
    // chunk or formatting an error runs the author's code.
    let polled = catch_unwind(AssertUnwindSafe(|| {
        let chunk = match Pin::new(&mut *body).poll_chunk(&mut cx) {
            Poll::Pending => return FfiPoll::PENDING,
            // An empty chunk would read as the end: skip it, and ask for the next at once.
            Poll::Ready(Some(Ok(chunk))) if chunk.is_empty() => {
                cx.waker().wake_by_ref();
                return FfiPoll::PENDING;
            }
            Poll::Ready(None) => FfiChunk { data: FfiStr::EMPTY, release: None, state: std::ptr::null_mut() },
            Poll::Ready(Some(Ok(chunk))) if chunk.len() < LEND_FROM => {
                streaming.current = chunk;
                FfiChunk { data: FfiStr::new(&streaming.current), release: None, state: std::ptr::null_mut() }
            }
            Poll::Ready(Some(Ok(chunk))) => {
                // The bytes stay where they are (moving a `Bytes` does not move its data) until
                // the host releases the box that owns them.
                let data = FfiStr::new(&chunk);
                let state = Box::into_raw(Box::new(chunk)) as *mut c_void;
                FfiChunk { data, release: Some(release_chunk), state }
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(host) = crate::try_host() {
                    log::emit(host, abi::LOG_ERROR, "handler_api::body", &format!("response body failed: {e}"));
                }
                return FfiPoll::ERROR;
            }
        };
        // SAFETY: `out` is valid for writing, as the caller guarantees.
        unsafe { out.write(chunk) };
        FfiPoll::READY
    }));
    polled.unwrap_or_else(|_| {
        let _ = catch_unwind(AssertUnwindSafe(|| streaming.body = None));
        FfiPoll::PANICKED
    })
}

/// Chunks from this size on are lent to the host rather than copied: below it, a copy costs
/// less than the box and the release call.
const LEND_FROM: usize = 16 * 1024;

/// `release` of a chunk lent by `poll_body`.
///
/// # Safety
/// `state` must be the state of a chunk lent by `poll_body`, not used again afterwards.
unsafe extern "C" fn release_chunk(state: *mut c_void) {
    let _ = catch_unwind(|| {
        // SAFETY: the host calls this exactly once with the box made in `poll_body`.
        drop(unsafe { Box::from_raw(state as *mut Bytes) });
    });
}

/// `drop` of the [`FfiBody`] made by `send`.
///
/// # Safety
/// `state` must be the state of a body from `send`, not used again afterwards.
unsafe extern "C" fn drop_body(state: *mut c_void) {
    let _ = catch_unwind(|| {
        // SAFETY: the host calls this exactly once with the box made in `send`.
        drop(unsafe { Box::from_raw(state as *mut Streaming) });
    });
}

/// Generates the plugin's declaration: the one symbol the host looks up.
#[doc(hidden)]
#[macro_export]
macro_rules! __optional_hook {
    () => {
        None
    };
    ($ready:path) => {{
        /// `ready` of the declaration: runs the author's readiness check.
        ///
        /// # Safety
        /// `sink` must be a host error sink, valid for this call; `init` must have returned
        /// `READY`.
        unsafe extern "C" fn __hotswap_ready(sink: *mut ::core::ffi::c_void) -> $crate::abi::FfiPoll {
            // SAFETY: `sink` is the host's, for this call.
            unsafe { $crate::__private::run_fallible(sink, $ready) }
        }
        Some(__hotswap_ready as unsafe extern "C" fn(*mut ::core::ffi::c_void) -> $crate::abi::FfiPoll)
    }};
}

/// Exports a handler, or a tower service such as an axum `Router`, as a hotswap plugin, with
/// its name and semantic version.
///
/// Put it once in the crate root of a `cdylib`. It takes one of:
///
/// - `handler: f`: any `async fn(Request) -> impl IntoResponse`.
/// - `service: make`: a function `fn() -> Result<S, E>` (`E: Display`) that builds a
///   [`tower::Service`] taking a [`Request`](crate::Request) and answering an
///   `http::Response` with any [`http_body::Body`]: an axum `Router` (with its state), or
///   any tower stack. It runs in `init`, once per loaded build, so state (configuration, a
///   pool, caches) belongs to the build that made it and is dropped when that build is
///   unloaded, instead of living in statics. An `Err` refuses the build, and the previous
///   version keeps serving. The service is cloned for each request (an axum `Router` is
///   cheap to clone); a service error answers `500` and is logged.
///
/// `version` must be a [semantic version](https://semver.org) (`1.4.2`, `2.0.0-rc.1`,
/// `1.4.2+build.7`): the host orders builds by it, serves the highest, and refuses a build
/// whose version it cannot parse. `env!("CARGO_PKG_VERSION")` is a good choice.
///
/// Optional hooks, all plain functions:
///
/// - `init: fn() -> Result<(), E>` runs once when the host loads the plugin, before any
///   request (and before `make`); an `Err` (or a panic, or taking longer than the host's
///   init timeout) refuses the plugin and the previous version keeps serving. If `make`
///   then fails, `shutdown` runs before the build is refused (tasks `init` spawned are
///   dropped just after it, in that one case).
/// - `ready: fn() -> Result<(), E>` is checked after `init`, before the plugin gets traffic.
/// - `shutdown: fn()` runs once after the last request has ended (and after the service is
///   dropped), before the library is unloaded.
/// - `state: (export_state, import_state)`, with `fn() -> state::Exported` and
///   `fn(state::Previous<'_>) -> Result<(), E>`: the state this build hands to the next at a
///   swap, and takes over from the one before, before `init` (see [`state`](crate::state)).
///
/// # Examples
///
/// A handler function:
///
/// ```
/// use handler_api::{export_handler, Request};
///
/// async fn hello(_req: Request) -> &'static str {
///     "hello\n"
/// }
///
/// fn warm_up() -> Result<(), String> {
///     Ok(())
/// }
///
/// export_handler!(name: "hello", version: "1.0.0", handler: hello, init: warm_up);
/// ```
///
/// A service built at load, here a bare `tower::service_fn` with a greeting it owns (an axum
/// `Router` goes in the same place):
///
/// ```
/// use std::convert::Infallible;
/// use handler_api::{export_handler, Body, Request, Response};
///
/// fn app() -> Result<impl tower::Service<Request, Response = Response, Error = Infallible, Future = impl Send> + Clone + Send + Sync, String> {
///     let greeting: std::sync::Arc<str> = std::env::var("GREETING").unwrap_or_else(|_| "hello".into()).into();
///     Ok(tower::service_fn(move |_req: Request| {
///         let greeting = greeting.clone();
///         async move { Ok::<_, Infallible>(Response::new(Body::from(format!("{greeting}\n")))) }
///     }))
/// }
///
/// export_handler!(name: "greeter", version: "1.0.0", service: app);
/// ```
#[macro_export]
macro_rules! export_handler {
    (
        name: $name:expr,
        version: $version:expr,
        handler: $handler:path
        $(, init: $init:path)?
        $(, ready: $ready:path)?
        $(, shutdown: $shutdown:path)?
        $(, state: ($export:path, $import:path))?
        $(,)?
    ) => {
        $($crate::__state_declaration!($export, $import);)?
        $crate::__declaration! {
            name: $name,
            version: $version,
            // SAFETY: forwarded from `__hotswap_handle`'s caller.
            handle: |request| unsafe { $crate::__private::handle(&$handler, request) },
            make: (|| ::core::result::Result::<(), ::core::convert::Infallible>::Ok(())),
            uninstall: (|| {}),
            init: [$($init)?],
            ready: [$($ready)?],
            shutdown: [$($shutdown)?],
        }
    };
    (
        name: $name:expr,
        version: $version:expr,
        service: $make:path
        $(, init: $init:path)?
        $(, ready: $ready:path)?
        $(, shutdown: $shutdown:path)?
        $(, state: ($export:path, $import:path))?
        $(,)?
    ) => {
        $($crate::__state_declaration!($export, $import);)?
        $crate::__declaration! {
            name: $name,
            version: $version,
            // SAFETY: forwarded from `__hotswap_handle`'s caller; `shutdown` has not run.
            handle: |request| unsafe { $crate::__private::service::handle(request) },
            make: (|| $crate::__private::service::install($make)),
            // SAFETY: called by the declaration's `shutdown`, once no request runs any more.
            uninstall: (|| unsafe { $crate::__private::service::uninstall() }),
            init: [$($init)?],
            ready: [$($ready)?],
            shutdown: [$($shutdown)?],
        }
    };
}

/// The state handoff [`export_handler!`] generates with `state: (export, import)`: a second
/// symbol, which the host looks up if it is there.
#[doc(hidden)]
#[macro_export]
macro_rules! __state_declaration {
    ($export:path, $import:path) => {
        #[unsafe(no_mangle)]
        #[allow(non_upper_case_globals)]
        #[doc(hidden)]
        pub static hotswap_plugin_state: $crate::abi::StateDeclaration = $crate::abi::StateDeclaration {
            fingerprint: $crate::abi::STATE_FINGERPRINT,
            export: {
                /// `export` of the state declaration.
                ///
                /// # Safety
                /// `out` must be valid for writing.
                unsafe extern "C" fn __hotswap_state_export(out: *mut $crate::abi::FfiState) -> $crate::abi::FfiPoll {
                    // SAFETY: forwarded from the caller.
                    unsafe { $crate::__private::state::export(out, $export) }
                }
                __hotswap_state_export
            },
            release: {
                /// `release` of the state declaration.
                ///
                /// # Safety
                /// `state` must be what `export` wrote, released once.
                unsafe extern "C" fn __hotswap_state_release(state: *mut $crate::abi::FfiState) {
                    // SAFETY: forwarded from the caller.
                    unsafe { $crate::__private::state::release(state) }
                }
                __hotswap_state_release
            },
            import: {
                /// `import` of the state declaration.
                ///
                /// # Safety
                /// `host`, `previous` and `sink` must be valid for the call.
                unsafe extern "C" fn __hotswap_state_import(
                    host: *const $crate::abi::HostApi,
                    previous: *const $crate::abi::FfiPreviousState,
                    sink: *mut ::core::ffi::c_void,
                ) -> $crate::abi::FfiPoll {
                    // SAFETY: forwarded from the caller.
                    unsafe { $crate::__private::state::import(host, previous, sink, $import) }
                }
                __hotswap_state_import
            },
        };
    };
}

/// The declaration [`export_handler!`] generates: the one symbol the host looks up.
#[doc(hidden)]
#[macro_export]
macro_rules! __declaration {
    (
        name: $name:expr,
        version: $version:expr,
        handle: $handle:expr,
        make: $make:expr,
        uninstall: $uninstall:expr,
        init: [$($init:path)?],
        ready: [$($ready:path)?],
        shutdown: [$($shutdown:path)?],
    ) => {
        #[unsafe(no_mangle)]
        #[allow(non_upper_case_globals)]
        #[doc(hidden)]
        pub static hotswap_plugin_declaration: $crate::abi::PluginDeclaration = $crate::abi::PluginDeclaration {
            header: $crate::abi::DeclarationHeader::CURRENT,
            name: $crate::abi::FfiStr::from_static($name),
            version: $crate::abi::FfiStr::from_static($version),
            rustc: $crate::abi::FfiStr::from_static($crate::__private::RUSTC),
            init: {
                /// `init` of the declaration: see `handler_api::__private::init`.
                ///
                /// # Safety
                /// Called once, first. `host` must point at a `HostApi` that stays valid until
                /// `shutdown` has returned; `sink` must be a host error sink, valid for this call.
                unsafe extern "C" fn __hotswap_init(
                    host: *const $crate::abi::HostApi,
                    sink: *mut ::core::ffi::c_void,
                ) -> $crate::abi::FfiPoll {
                    // SAFETY: the host passes a table valid until shutdown.
                    unsafe {
                        $crate::__private::init(host, sink, |sink| {
                            $(
                                let initialized = $crate::__private::run_fallible(sink, $init);
                                if initialized != $crate::abi::FfiPoll::READY {
                                    return initialized;
                                }
                            )?
                            let made = $crate::__private::run_fallible(sink, $make);
                            if made != $crate::abi::FfiPoll::READY {
                                // The build is refused, and the host will not call `shutdown`:
                                // undo the author's `init` here.
                                $crate::__private::run_shutdown(|| { $( $shutdown(); )? });
                            }
                            made
                        })
                    }
                }
                __hotswap_init
            },
            ready: $crate::__optional_hook!($($ready)?),
            handle: {
                /// `handle` of the declaration: see `handler_api::__private::handle`.
                ///
                /// # Safety
                /// `init` must have returned `READY`, and `shutdown` not have run; `request`
                /// must point at a valid `FfiRequest` whose strings and headers stay valid
                /// during this call.
                unsafe extern "C" fn __hotswap_handle(
                    request: *const $crate::abi::FfiRequest,
                ) -> $crate::abi::FfiResponseFuture {
                    let handle: fn(*const $crate::abi::FfiRequest) -> $crate::abi::FfiResponseFuture = $handle;
                    handle(request)
                }
                __hotswap_handle
            },
            shutdown: {
                /// `shutdown` of the declaration: drops the service, if any, then runs the
                /// author's shutdown hook.
                ///
                /// # Safety
                /// Called once, after the last request has ended (every future, body and lent
                /// chunk released), before the library is unloaded, while the `HostApi` given
                /// to `init` is still valid.
                unsafe extern "C" fn __hotswap_shutdown() {
                    $crate::__private::run_shutdown($uninstall);
                    $crate::__private::run_shutdown(|| { $( $shutdown(); )? });
                }
                __hotswap_shutdown
            },
            // Decided where the macro expands: the plugin's own build, whose profile sets it.
            panic: if cfg!(panic = "unwind") { $crate::abi::PANIC_UNWIND } else { $crate::abi::PANIC_ABORT },
        };
    };
}

#[cfg(test)]
mod tests {
    use super::mistake_hint;

    /// A host of the first release of ABI version 4, whose table ends with the base: the copy
    /// reads no further, and says the later functions are missing.
    #[cfg(feature = "testing")]
    #[test]
    fn a_shorter_table_is_copied_as_far_as_it_goes() {
        use crate::abi::{HostApi, HOST_API_BASE_SIZE};
        crate::testing::install();
        let full: &HostApi = crate::host();
        // Exactly the base's bytes, in words so that it is aligned as a table.
        let mut short = vec![0usize; HOST_API_BASE_SIZE.div_ceil(size_of::<usize>())];
        // SAFETY: `short` holds at least HOST_API_BASE_SIZE bytes; `full` is a whole table.
        unsafe {
            std::ptr::copy_nonoverlapping(full as *const HostApi as *const u8, short.as_mut_ptr() as *mut u8, HOST_API_BASE_SIZE);
            (*(short.as_mut_ptr() as *mut HostApi)).size = HOST_API_BASE_SIZE;
        }
        // SAFETY: a table of this version, of `size` bytes.
        let copy = unsafe { super::copy_table(short.as_ptr() as *const HostApi) };
        assert_eq!(copy.size, HOST_API_BASE_SIZE);
        assert!(copy.spawn_fn().is_none() && copy.log_in_spans_fn().is_none());
        assert_eq!(copy.error_write as usize, full.error_write as usize);
        // A whole table keeps everything.
        // SAFETY: as above.
        let whole = unsafe { super::copy_table(full) };
        assert_eq!(whole.spawn_fn().map(|f| f as usize), full.spawn_fn().map(|f| f as usize));
    }

    #[test]
    fn a_second_tracing_subscriber_gets_a_hint_in_tracing_s_own_words() {
        let _ = tracing::subscriber::set_global_default(tracing::subscriber::NoSubscriber::default());
        let again = tracing::subscriber::set_global_default(tracing::subscriber::NoSubscriber::default());
        let error = again.unwrap_err().to_string();
        // As tracing-subscriber's `init()` panics, and as tracing's error says it.
        let message = format!("Unable to install global subscriber: {error}");
        assert!(mistake_hint(&message).is_some_and(|hint| hint.contains("install no subscriber")), "{message}");
        assert!(mistake_hint(&error).is_some(), "{error}");
        assert_eq!(mistake_hint("index out of bounds"), None);
    }
}
