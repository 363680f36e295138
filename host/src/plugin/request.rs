//! Requests, from the host to the plugin: the call that starts the plugin's response future
//! and polls it to its answer, and the request body the plugin reads.
//!
//! The `extern "C"` functions here are host code called by the plugin; none may unwind, so
//! each body runs inside `catch_unwind`.

use std::ffi::c_void;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use handler_api::abi::{
    self, FfiHeader, FfiHostBody, FfiPoll, FfiRequest, FfiResponse, FfiResponseFuture, FfiSocketAddr, FfiStr, FfiWaker,
};
use http_body::Body as _;
use hyper::body::Incoming;
use smallvec::SmallVec;

use crate::plugin::generation::{thread_generation, InFlight};
use crate::plugin::response::{self, ResponseBody, Written};
use crate::plugin::upgrade::PendingUpgrade;
use crate::plugin::wakers::Parking;

/// A request body lent to the plugin: hyper's `Incoming` plus the chunk last handed out,
/// which must stay valid until the next poll.
struct RequestBody {
    incoming: Incoming,
    current: Bytes,
    /// How many more bytes the client may send (`--max-body-size`).
    allowed: u64,
    /// What the host's timeouts and its answer need to know of this body.
    progress: Arc<BodyProgress>,
    /// A waker the plugin made itself, parked here instead of inside hyper.
    parking: Parking,
    /// The trailers, once the body has ended, and the views of them lent to the plugin.
    trailers: Option<(http::HeaderMap, Vec<FfiHeader>)>,
    /// Whether the body reached its end (not failed, cut or timed out).
    ended: bool,
}

/// How a request body the plugin reads is coming along, shared with the host's
/// `--body-read-timeout` sweeper (`serve::limits`) and the request's answer: bytes handed to
/// the plugin, whether the plugin is waiting for more, and the verdicts. A few relaxed atomic
/// operations per chunk; a request without a body has none.
#[derive(Debug, Default)]
pub(crate) struct BodyProgress {
    /// Body bytes handed to the plugin so far.
    received: AtomicU64,
    /// The plugin's last read found nothing: it waits for the client.
    waiting: AtomicBool,
    /// The body has ended, failed, or the plugin let go of it: nothing more to time.
    finished: AtomicBool,
    /// The client sent more than `--max-body-size`: the host answers 413.
    too_large: AtomicBool,
    /// The client sent too little for too long (`--body-read-timeout`): the host answers 408,
    /// or cuts off a response already started.
    timed_out: AtomicBool,
    /// The waker of the plugin's waiting read (host code: a native waker or the proxy).
    waker: Mutex<Option<Waker>>,
}

impl BodyProgress {
    /// Body bytes handed to the plugin so far.
    pub(crate) fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Whether the plugin waits for the client (its last read found nothing).
    pub(crate) fn is_waiting(&self) -> bool {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Whether the body needs no more timing: it ended or failed, or the plugin dropped it.
    pub(crate) fn is_finished(&self) -> bool {
        self.finished.load(Ordering::Relaxed)
    }

    /// Whether the body timed out.
    pub(crate) fn timed_out(&self) -> bool {
        self.timed_out.load(Ordering::Acquire)
    }

    /// The client was too slow: the plugin's next read fails, and the request with it. Wakes
    /// the waiting read.
    pub(crate) fn time_out(&self) {
        if self.is_finished() {
            return; // its last bytes came in after all
        }
        self.timed_out.store(true, Ordering::Release);
        let waker = self.waker.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn finish(&self) {
        self.waiting.store(false, Ordering::Relaxed);
        self.finished.store(true, Ordering::Relaxed);
    }

    /// As if the plugin had read `received` bytes and were `waiting` for more.
    #[cfg(test)]
    pub(crate) fn simulate(&self, received: u64, waiting: bool) {
        self.received.store(received, Ordering::Relaxed);
        self.waiting.store(waiting, Ordering::Relaxed);
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
        let borrowed = unsafe { abi::waker::borrow(waker) };
        // SAFETY: as above; `borrowed` is its view.
        let waker = unsafe { body.parking.waker(waker, &borrowed) };
        let progress = &*body.progress;
        if progress.too_large.load(Ordering::Relaxed) || progress.timed_out() {
            // Past the size limit, or too slow: nothing more is read.
            progress.finish();
            return FfiPoll::ERROR;
        }
        let mut cx = Context::from_waker(waker);
        loop {
            let polled = match Pin::new(&mut body.incoming).poll_frame(&mut cx) {
                // Every byte its Content-Length announced has come. hyper says so only once it
                // has read the next request's head when the response ended first (a plugin
                // that answers, then reads on): the end is not worth waiting for.
                Poll::Pending if body.incoming.is_end_stream() => Poll::Ready(None),
                polled => polled,
            };
            match polled {
                Poll::Pending => {
                    // The waker first: a timeout found after it was parked wakes it, and one
                    // found before is seen just below.
                    let mut parked = progress.waker.lock().unwrap_or_else(PoisonError::into_inner);
                    if !parked.as_ref().is_some_and(|w| w.will_wake(waker)) {
                        *parked = Some(waker.clone());
                    }
                    drop(parked);
                    progress.waiting.store(true, Ordering::Relaxed);
                    if progress.timed_out() {
                        progress.finish();
                        return FfiPoll::ERROR;
                    }
                    return FfiPoll::PENDING;
                }
                Poll::Ready(None) => {
                    progress.finish();
                    body.ended = true;
                    // SAFETY: `chunk` is the plugin's out-parameter.
                    unsafe { *chunk = FfiStr::EMPTY };
                    return FfiPoll::READY;
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let data = match frame.into_data() {
                        Ok(data) => data,
                        Err(frame) => {
                            if let Ok(trailers) = frame.into_trailers() {
                                body.trailers = Some((trailers, Vec::new()));
                            }
                            continue;
                        }
                    };
                    if data.is_empty() {
                        continue;
                    }
                    let Some(allowed) = body.allowed.checked_sub(data.len() as u64) else {
                        progress.too_large.store(true, Ordering::Release);
                        progress.finish();
                        return FfiPoll::ERROR;
                    };
                    body.allowed = allowed;
                    // One writer (the plugin reads from one thread at a time).
                    progress.received.store(progress.received() + data.len() as u64, Ordering::Relaxed);
                    progress.waiting.store(false, Ordering::Relaxed);
                    body.current = data;
                    // SAFETY: as above; `current` stays untouched until the next poll.
                    unsafe { *chunk = FfiStr::new(&body.current) };
                    return FfiPoll::READY;
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::debug!("request body failed: {e}");
                    progress.finish();
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
        // The plugin no longer reads: the body is not timed any more.
        body.progress.finish();
        drop(body.progress.waker.lock().unwrap_or_else(PoisonError::into_inner).take());
        // Its parking drops the plugin's waker here, on the generation's thread.
    });
}

/// `HostApi::body_trailers`: the trailers of a request body that has ended.
///
/// # Safety
/// `body` is a live handle from the request, used by one thread at a time; `headers` and `len` are valid for writing.
pub(crate) unsafe extern "C" fn body_trailers(body: *mut c_void, headers: *mut *const FfiHeader, len: *mut usize) -> FfiPoll {
    catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `body` is a live RequestBody handed to the plugin, used by one thread at a time.
        let body = unsafe { &mut *(body as *mut RequestBody) };
        if !body.ended {
            return FfiPoll::ERROR;
        }
        let views: &[FfiHeader] = match &mut body.trailers {
            Some((map, views)) => {
                views.clear();
                views.extend(map.iter().map(|(n, v)| FfiHeader {
                    name: FfiStr::new(n.as_str().as_bytes()),
                    value: FfiStr::new(v.as_bytes()),
                }));
                views
            }
            None => &[],
        };
        // SAFETY: the plugin's out-parameters; the views stay valid until the next call on
        // this body, as the ABI says.
        unsafe {
            *headers = views.as_ptr();
            *len = views.len();
        }
        FfiPoll::READY
    }))
    .unwrap_or(FfiPoll::ERROR)
}

/// What the plugin is given of a request's head: its headers (taken, to be reused), a view
/// of its method and target (which stay the caller's, for its log line), and where it came
/// from.
pub(crate) struct Head<'a> {
    pub(crate) method: &'a http::Method,
    pub(crate) uri: &'a http::Uri,
    pub(crate) version: http::Version,
    pub(crate) headers: http::HeaderMap,
    pub(crate) origin: &'a Origin,
    pub(crate) request_id: u64,
    /// The protocol the client asks to switch to, when the host can switch this request.
    pub(crate) upgrade: Option<&'a [u8]>,
    /// Keep the headers after the call (see [`PluginCall::take_headers`]) rather than reuse
    /// them: a request that may be sent again elsewhere.
    pub(crate) keep_headers: bool,
}

/// Where a connection's requests come from.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Origin {
    pub(crate) peer: Option<SocketAddr>,
    pub(crate) local: Option<SocketAddr>,
    pub(crate) https: bool,
}

fn ffi_addr(addr: Option<SocketAddr>) -> FfiSocketAddr {
    match addr {
        Some(SocketAddr::V4(a)) => {
            let mut ip = [0; 16];
            ip[..4].copy_from_slice(&a.ip().octets());
            FfiSocketAddr { family: abi::ADDR_IPV4, port: a.port(), scope_id: 0, ip }
        }
        Some(SocketAddr::V6(a)) => {
            FfiSocketAddr { family: abi::ADDR_IPV6, port: a.port(), scope_id: a.scope_id(), ip: a.ip().octets() }
        }
        None => FfiSocketAddr { family: abi::ADDR_NONE, port: 0, scope_id: 0, ip: [0; 16] },
    }
}

/// What a plugin's call ended with: the response, and the upgrade it accepted, if any.
pub(crate) struct Answer {
    pub(crate) response: http::Response<ResponseBody>,
    pub(crate) upgrade: Option<PendingUpgrade>,
}

/// A request in the plugin's hands: its response future, and until that completes, the
/// request's hold on the generation whose code the future is.
pub(crate) struct PluginCall {
    ffi: FfiResponseFuture,
    /// The request's headers, when kept (`Head::keep_headers`).
    headers: Option<http::HeaderMap>,
    /// The request body's progress, if it has a body.
    body: Option<Arc<BodyProgress>>,
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
    /// The client sent the body too slowly while the plugin waited for it; the plugin's read
    /// failed, and whatever it answered (if it did) is moot.
    #[error("the request body arrived too slowly (--body-read-timeout)")]
    BodyTimedOut,
    /// The plugin did not answer within `--response-timeout`: its work on the request was
    /// dropped.
    #[error("the handler did not answer within {} (--response-timeout)", humantime::format_duration(*.0))]
    TimedOut(std::time::Duration),
}

impl PluginCall {
    /// Starts a request in the plugin of `in_flight`'s generation, with its body (`None`:
    /// without one). Must run on a thread of that generation. The headers are taken (to be
    /// reused); the method and target are borrowed, and stay the caller's, for its log line.
    /// A body longer than `max_body_size`
    /// fails, for the plugin, where it crosses the limit, and the call then ends in
    /// [`CallError::BodyTooLarge`]; one that times out (see [`PluginCall::body_progress`])
    /// ends it in [`CallError::BodyTimedOut`], whether or not the plugin has answered.
    #[inline]
    pub(crate) fn start(in_flight: InFlight, head: Head<'_>, incoming: Option<Incoming>, max_body_size: u64) -> PluginCall {
        debug_assert_eq!(thread_generation(), in_flight.generation().id(), "a plugin call started outside its generation");
        let exact_len = incoming.as_ref().map_or(0, |incoming| incoming.size_hint().exact().unwrap_or(abi::UNKNOWN_LENGTH));
        // A request without a body (most GETs) costs no allocation for one.
        let mut progress = None;
        let body = if let Some(incoming) = incoming.filter(|incoming| !incoming.is_end_stream()) {
            let shared = progress.insert(Arc::new(BodyProgress::default())).clone();
            let body = RequestBody {
                incoming,
                current: Bytes::new(),
                allowed: max_body_size,
                progress: shared,
                parking: Parking::default(),
                trailers: None,
                ended: false,
            };
            Box::into_raw(Box::new(body)) as *mut c_void
        } else {
            std::ptr::null_mut()
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
            http::Version::HTTP_09 => abi::HTTP_09,
            http::Version::HTTP_10 => abi::HTTP_10,
            http::Version::HTTP_2 => abi::HTTP_2,
            http::Version::HTTP_3 => abi::HTTP_3,
            _ => abi::HTTP_11,
        };
        let ffi = FfiRequest {
            method: FfiStr::new(head.method.as_str().as_bytes()),
            uri: FfiStr::new(uri.as_bytes()),
            version,
            scheme: if head.origin.https { abi::SCHEME_HTTPS } else { abi::SCHEME_HTTP },
            headers: headers.as_ptr(),
            headers_len: headers.len(),
            peer: ffi_addr(head.origin.peer),
            local: ffi_addr(head.origin.local),
            request_id: head.request_id,
            upgrade: head.upgrade.map_or(FfiStr::EMPTY, FfiStr::new),
            body: FfiHostBody { handle: body, exact_len },
        };
        let handle = in_flight.generation().declaration().handle;
        // SAFETY: the declaration was checked at load and `in_flight` keeps the library
        // loaded; `ffi` and everything it borrows outlive the call; the body handle passes to
        // the plugin, which releases it through `body_drop`.
        let future = unsafe { handle(&ffi) };
        drop(headers);
        let kept = if head.keep_headers {
            Some(head.headers)
        } else {
            response::recycle(head.headers);
            None
        };
        PluginCall { ffi: future, body: progress, in_flight: Some(in_flight), headers: kept }
    }

    /// The request's headers, if the call was asked to keep them.
    pub(crate) fn take_headers(&mut self) -> Option<http::HeaderMap> {
        self.headers.take()
    }

    /// The request body's progress, for the host's `--body-read-timeout` (`None` without a
    /// body): when the host times it out ([`BodyProgress::time_out`]), the plugin's read
    /// fails and the call ends in [`CallError::BodyTimedOut`].
    pub(crate) fn body_progress(&self) -> Option<&Arc<BodyProgress>> {
        self.body.as_ref()
    }

    /// Polls the plugin's future, on a thread of its generation. Once it is ready the
    /// plugin's state is released, and the answer carries the request's hold on the
    /// generation: the response body, or the failure.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<Answer, CallFailed>> {
        // Not reached: a completed future is dropped by its owner, not polled again.
        let Some(in_flight) = &self.in_flight else { return Poll::Pending };
        debug_assert_eq!(thread_generation(), in_flight.generation().id(), "a plugin call polled outside its generation");
        let waker = abi::waker::lend(cx.waker());
        let mut out = MaybeUninit::<FfiResponse>::uninit();
        // SAFETY: the state is live (`in_flight` is `Some`) and its library loaded; waker and
        // out outlive the call.
        let r = unsafe { (self.ffi.poll)(self.ffi.state, &waker, out.as_mut_ptr()) };
        // A plugin still busy after its body read failed for slowness is not waited for: the
        // request has failed, and its slot on the connection is wanted.
        let timed_out = self.body.as_ref().is_some_and(|body| body.timed_out());
        if r == FfiPoll::PENDING && !timed_out {
            return Poll::Pending;
        }
        // Read (and own) what the plugin wrote while its state, which the strings borrow, lives.
        let written = (r == FfiPoll::READY).then(|| {
            // SAFETY: on READY the plugin has written `out`, valid until its state is released
            // below; this thread is the generation's, and `in_flight` holds it.
            unsafe { Written::read(out.assume_init_ref()) }
        });
        let body_failed = self.body_failed();
        // Always `Some`: `in_flight` was checked above, and only this poll releases it.
        let Some(in_flight) = self.release() else { return Poll::Pending };
        let error = match (body_failed, r, written) {
            (Some(failed), ..) => failed,
            (None, _, Some(Ok(Written { status, headers, body, upgrade }))) => {
                let upgrade = upgrade.map(|ffi| PendingUpgrade::new(ffi, InFlight::new(in_flight.generation().clone())));
                let mut response = http::Response::new(body.into_response_body(in_flight, &headers));
                *response.status_mut() = status;
                *response.headers_mut() = headers;
                return Poll::Ready(Ok(Answer { response, upgrade }));
            }
            (None, _, Some(Err(invalid))) => CallError::Invalid(invalid),
            (None, FfiPoll::PANICKED, _) => CallError::Panicked,
            _ => CallError::Invalid("the handler failed".into()),
        };
        // Whatever the plugin handed over for this answer not given (a body, an upgrade) was
        // released above, while `in_flight` held the library.
        Poll::Ready(Err(CallFailed { error, in_flight }))
    }

    /// Stops waiting for the plugin's answer: its future is dropped (on this thread, one of
    /// its generation's), and the call ends in `error`, unless its body failed first (then in
    /// that failure, as `poll` would end it). `None` if it had ended already.
    pub(crate) fn give_up(&mut self, error: CallError) -> Option<CallFailed> {
        debug_assert_eq!(thread_generation(), self.in_flight.as_ref()?.generation().id(), "a plugin call dropped outside its generation");
        let error = self.body_failed().unwrap_or(error);
        self.release().map(|in_flight| CallFailed { error, in_flight })
    }

    /// How the request failed on the host's side, if its body did (too large, or too slow):
    /// that is the answer, whatever the plugin made of the failed read.
    fn body_failed(&self) -> Option<CallError> {
        let body = self.body.as_ref()?;
        if body.too_large.load(Ordering::Acquire) {
            Some(CallError::BodyTooLarge)
        } else if body.timed_out() {
            Some(CallError::BodyTimedOut)
        } else {
            None
        }
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
