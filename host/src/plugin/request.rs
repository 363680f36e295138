//! Requests, from the host to the plugin: the call that starts the plugin's response future
//! and polls it to its answer, and the request body the plugin reads.
//!
//! The `extern "C"` functions here are host code called by the plugin; none may unwind, so
//! each body runs inside `catch_unwind`.

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use handler_api::abi::{self, FfiHeader, FfiHostBody, FfiPoll, FfiRequest, FfiResponseFuture, FfiStr, FfiWaker};
use http::StatusCode;
use http_body::Body as _;
use hyper::body::Incoming;
use smallvec::SmallVec;

use crate::plugin::generation::{thread_generation, InFlight};
use crate::plugin::response::{self, ResponseBody, ResponseSlot};

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

/// `HostApi::body_poll`: the next chunk of a request body the plugin reads.
///
/// # Safety
/// `body` is a live handle from the request (not yet passed to `body_drop`), polled by one thread at a time; `waker` and `chunk` are valid for the call.
pub(crate) unsafe extern "C" fn body_poll(body: *mut c_void, waker: *const FfiWaker, chunk: *mut FfiStr) -> FfiPoll {
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

/// `HostApi::body_drop`: the plugin is done with a request body.
///
/// # Safety
/// `body` is a live handle from the request, released exactly once.
pub(crate) unsafe extern "C" fn body_drop(body: *mut c_void) {
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

/// What the plugin is given of a request's head: its headers (taken, to be reused), and a
/// view of its method and target (which stay the caller's, for its log line).
pub(crate) struct Head<'a> {
    pub(crate) method: &'a http::Method,
    pub(crate) uri: &'a http::Uri,
    pub(crate) version: http::Version,
    pub(crate) headers: http::HeaderMap,
}

/// A request in the plugin's hands: its response future, and until that completes, the
/// request's hold on the generation whose code the future is.
pub(crate) struct PluginCall {
    ffi: FfiResponseFuture,
    too_large: Option<Arc<AtomicBool>>,
    /// `Some` while the plugin's state is live. When the future completes, the state is
    /// released at once and the hold passes to the answer: so a `PluginCall` never holds
    /// plugin state without also holding its library.
    in_flight: Option<InFlight>,
}

// SAFETY: the plugin's future is `Send` (handler-api requires it); the state is owned
// exclusively by this value.
unsafe impl Send for PluginCall {}

/// Why a plugin call produced no response, with the request's hold on its generation, for
/// the answer the host gives instead.
pub(crate) struct CallFailed {
    pub(crate) error: CallError,
    pub(crate) in_flight: InFlight,
}

/// What went wrong in a plugin call.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    #[error("the handler panicked")]
    Panicked,
    #[error("the handler returned an invalid response: {0}")]
    Invalid(String),
    /// The client sent a body longer than the limit; whatever the plugin answered to the
    /// body cut short is moot.
    #[error("the request body is larger than --max-body-size")]
    BodyTooLarge,
}

impl PluginCall {
    /// Starts a request in the plugin of `in_flight`'s generation. Must run on a thread of
    /// that generation. The headers are taken (to be reused); the method and target are
    /// borrowed, and stay the caller's, for its log line. A body longer than `max_body_size`
    /// fails, for the plugin, where it crosses the limit, and the call then ends in
    /// [`CallError::BodyTooLarge`].
    #[inline]
    pub(crate) fn start(in_flight: InFlight, head: Head<'_>, incoming: Incoming, max_body_size: u64) -> PluginCall {
        debug_assert_eq!(thread_generation(), in_flight.generation().id(), "a plugin call started outside its generation");
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
            head.headers.iter().map(|(n, v)| FfiHeader { name: FfiStr::new(n.as_str().as_bytes()), value: FfiStr::new(v.as_bytes()) }),
        );
        let absolute;
        let uri = match head.uri.scheme() {
            None => head.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
            Some(_) => {
                absolute = head.uri.to_string();
                &absolute
            }
        };
        let version = match head.version {
            http::Version::HTTP_09 => 9,
            http::Version::HTTP_10 => 10,
            http::Version::HTTP_2 => 20,
            http::Version::HTTP_3 => 30,
            _ => 11,
        };
        let ffi = FfiRequest {
            method: FfiStr::new(head.method.as_str().as_bytes()),
            uri: FfiStr::new(uri.as_bytes()),
            version,
            headers: headers.as_ptr(),
            headers_len: headers.len(),
            body: FfiHostBody { handle: body, exact_len },
        };
        let handle = in_flight.generation().declaration().handle;
        // SAFETY: the declaration was checked at load and `in_flight` keeps the library
        // loaded; `ffi` and everything it borrows outlive the call; the body handle passes to
        // the plugin, which releases it through `body_drop`.
        let future = unsafe { handle(&ffi) };
        drop(headers);
        response::recycle(head.headers);
        PluginCall { ffi: future, too_large, in_flight: Some(in_flight) }
    }

    /// Polls the plugin's future, on a thread of its generation. Once it is ready the
    /// plugin's state is released, and the answer carries the request's hold on the
    /// generation: the response body, or the failure.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<http::Response<ResponseBody>, CallFailed>> {
        // Not reached: a completed future is dropped by its owner, not polled again.
        let Some(in_flight) = &self.in_flight else { return Poll::Pending };
        debug_assert_eq!(thread_generation(), in_flight.generation().id(), "a plugin call polled outside its generation");
        let waker = abi::waker::lend(cx.waker());
        // The header map comes from `SPARE_HEADERS` at the first header, if there is one.
        let mut slot = ResponseSlot::default();
        // SAFETY: the state is live (`in_flight` is `Some`) and its library loaded; waker and
        // slot outlive the call.
        let r = unsafe { (self.ffi.poll)(self.ffi.state, &waker, &mut slot as *mut ResponseSlot as *mut c_void) };
        if r == FfiPoll::PENDING {
            return Poll::Pending;
        }
        let too_large = self.too_large.as_ref().is_some_and(|flag| flag.load(Ordering::Acquire));
        let ResponseSlot { status, headers, body, error } = slot;
        // Always `Some`: `in_flight` was checked above, and only this poll releases it.
        let Some(in_flight) = self.release() else { return Poll::Pending };
        let error = match r {
            _ if too_large => CallError::BodyTooLarge,
            FfiPoll::READY => {
                let mut response = http::Response::new(body.into_response_body(in_flight));
                *response.status_mut() = status.unwrap_or(StatusCode::OK);
                *response.headers_mut() = headers;
                return Poll::Ready(Ok(response));
            }
            FfiPoll::PANICKED => CallError::Panicked,
            _ => CallError::Invalid(error.unwrap_or_else(|| "unknown error".into())),
        };
        // A body the plugin set for this answer not given is released as `body` drops, after
        // this: the answer holds the library.
        Poll::Ready(Err(CallFailed { error, in_flight }))
    }

    /// Releases the plugin's state, and gives back the hold on its generation (`None` if it
    /// was released already).
    fn release(&mut self) -> Option<InFlight> {
        let in_flight = self.in_flight.take()?;
        // SAFETY: the state is live until here, and released exactly once (`in_flight` is now
        // `None`, so neither `poll` nor `Drop` touches it again); `in_flight` keeps the
        // library loaded during the call.
        unsafe { (self.ffi.drop)(self.ffi.state) };
        Some(in_flight)
    }
}

impl Drop for PluginCall {
    fn drop(&mut self) {
        // A request dropped before its answer (the client went away) still has its state.
        drop(self.release());
    }
}
