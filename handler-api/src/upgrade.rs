//! Switching protocols: WebSockets and any other protocol a client asks to upgrade to, over
//! HTTP/1.1 (`Upgrade`) or HTTP/2 (extended CONNECT, RFC 8441).
//!
//! A request that asks for an upgrade the host can perform carries an [`Upgrade`]. Accept it
//! with [`Upgrade::accept`], which returns the response that switches protocols and takes the
//! function that runs on the connection afterwards, with the connection's byte stream
//! ([`Upgraded`]). That function's future runs on the host's threads of the generation that
//! accepted it, until it ends: a swap to a newer build does not end it. To let clients move to
//! the new code, watch [`superseded`](crate::superseded) and close politely.
//!
//! [`Upgraded`] implements the async I/O traits of tokio and of `futures-io`, so a WebSocket
//! library runs over it without a runtime: `tokio_tungstenite::WebSocketStream::from_raw_socket`
//! or `async_tungstenite`'s. The WebSocket handshake is yours: over HTTP/1.1, answer the
//! client's `Sec-WebSocket-Key` with a `Sec-WebSocket-Accept` header (tungstenite's
//! `derive_accept_key`); over HTTP/2 there is none.
//!
//! # Example
//!
//! ```
//! use handler_api::upgrade::Upgrade;
//! use handler_api::{IntoResponse, Request, Response};
//! use http::StatusCode;
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! async fn echo(mut req: Request) -> Response {
//!     let Some(upgrade) = Upgrade::from_request(&mut req) else {
//!         return (StatusCode::UPGRADE_REQUIRED, "ask for an upgrade\n").into_response();
//!     };
//!     upgrade.accept(|mut io| async move {
//!         let mut buf = [0u8; 1024];
//!         while let Ok(n @ 1..) = io.read(&mut buf).await {
//!             if io.write_all(&buf[..n]).await.is_err() {
//!                 break;
//!             }
//!         }
//!     })
//! }
//! ```

use std::ffi::c_void;
use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use http::{header, HeaderValue, StatusCode};

use crate::abi::{self, FfiFuture, FfiFutureVTable, FfiPoll, FfiStr, FfiUpgrade, FfiUpgradeVTable};
use crate::{host, Body, Request, Response};

/// A client's request to switch protocols, which the host can perform. Taken from the
/// request with [`Upgrade::from_request`].
#[derive(Clone, Debug)]
pub struct Upgrade {
    protocol: String,
    http2: bool,
}

impl Upgrade {
    pub(crate) fn new(protocol: String, http2: bool) -> Upgrade {
        Upgrade { protocol, http2 }
    }

    /// Takes the upgrade `req` asks for, if it asks for one the host can perform.
    pub fn from_request<B>(req: &mut Request<B>) -> Option<Upgrade> {
        req.extensions_mut().remove::<Upgrade>()
    }

    /// The protocol asked for, such as `websocket` (HTTP/1.1's `Upgrade` header, HTTP/2's
    /// `:protocol`).
    pub fn protocol(&self) -> &str {
        &self.protocol
    }

    /// Whether the client asked over HTTP/2 (an extended CONNECT), not HTTP/1.1.
    pub fn is_http2(&self) -> bool {
        self.http2
    }

    /// Accepts the upgrade: returns the response that switches protocols (`101 Switching
    /// Protocols` with `Connection` and `Upgrade` headers over HTTP/1.1, `200 OK` over
    /// HTTP/2), to which you may add headers. Once the host has sent it, `session` runs with
    /// the connection's byte stream, until its future ends.
    ///
    /// Give the response back as it is: with another status, the host does not switch, and
    /// `session` never runs.
    pub fn accept<F, Fut>(self, session: F) -> Response
    where
        F: FnOnce(Upgraded) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let session: Session = Box::new(move |io| Box::pin(session(io)));
        let mut response = Response::new(Body::empty());
        if self.http2 {
            *response.status_mut() = StatusCode::OK;
        } else {
            *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let headers = response.headers_mut();
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            if let Ok(protocol) = HeaderValue::from_str(&self.protocol) {
                headers.insert(header::UPGRADE, protocol);
            }
        }
        response.extensions_mut().insert(Accepted(Arc::new(Mutex::new(Some(session)))));
        response
    }
}

pub(crate) type SessionFuture = Pin<Box<dyn Future<Output = ()> + Send>>;
pub(crate) type Session = Box<dyn FnOnce(Upgraded) -> SessionFuture + Send>;

/// The session of an accepted upgrade, in the response's extensions until the response
/// crosses to the host. (Extensions must be `Clone`; only one clone ever takes it.)
#[derive(Clone)]
pub(crate) struct Accepted(Arc<Mutex<Option<Session>>>);

impl Accepted {
    pub(crate) fn take(&self) -> Option<Session> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// Hands `session` to the host as an [`FfiUpgrade`].
pub(crate) fn into_ffi(session: Session) -> FfiUpgrade {
    FfiUpgrade { state: Box::into_raw(Box::new(session)) as *mut c_void, vtable: &UPGRADE_VTABLE }
}

static UPGRADE_VTABLE: FfiUpgradeVTable = FfiUpgradeVTable { start, drop: drop_upgrade };
static SESSION_VTABLE: FfiFutureVTable = FfiFutureVTable { poll: poll_session, drop: drop_session };

/// Hands `future` to the host as an [`FfiFuture`] (for [`crate::spawn`]).
pub(crate) fn ffi_future(future: SessionFuture) -> FfiFuture {
    FfiFuture { state: Box::into_raw(Box::new(Some(future))) as *mut c_void, vtable: &SESSION_VTABLE }
}

/// `start` of [`UPGRADE_VTABLE`]: runs the author's function on the connection. A null
/// vtable in the result means it panicked (and the connection was released).
///
/// # Safety
/// `state` must be a `Box<Session>` from `into_ffi`, not used again afterwards; `io` must be a
/// live upgraded connection of the host, which passes to the plugin.
unsafe extern "C" fn start(state: *mut c_void, io: *mut c_void) -> FfiFuture {
    let started = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the host hands the box made in `into_ffi` back exactly once.
        let session = unsafe { Box::from_raw(state as *mut Session) };
        let future = session(Upgraded { io });
        Box::into_raw(Box::new(Some(future))) as *mut c_void
    }));
    match started {
        Ok(state) => FfiFuture { state, vtable: &SESSION_VTABLE },
        Err(_) => FfiFuture { state: std::ptr::null_mut(), vtable: std::ptr::null() },
    }
}

/// `drop` of [`UPGRADE_VTABLE`].
///
/// # Safety
/// `state` must be a `Box<Session>` from `into_ffi`, not used again afterwards.
unsafe extern "C" fn drop_upgrade(state: *mut c_void) {
    let _ = catch_unwind(|| {
        // SAFETY: the host releases the box made in `into_ffi` exactly once.
        drop(unsafe { Box::from_raw(state as *mut Session) });
    });
}

/// `poll` of [`SESSION_VTABLE`].
///
/// # Safety
/// `state` must be the state of a session future from `start`, not yet dropped and not
/// polled concurrently; `waker` must point at a valid `FfiWaker` for this call.
unsafe extern "C" fn poll_session(state: *mut c_void, waker: *const abi::FfiWaker) -> FfiPoll {
    // SAFETY: `state` is the box made in `start`, exclusively ours until `drop_session`.
    let slot = unsafe { &mut *(state as *mut Option<SessionFuture>) };
    let Some(future) = slot.as_mut() else { return FfiPoll::PANICKED };
    // SAFETY: the host keeps `waker` valid for this call.
    let waker = unsafe { abi::waker::borrow(waker) };
    let mut cx = Context::from_waker(&waker);
    match catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(&mut cx))) {
        Ok(Poll::Pending) => FfiPoll::PENDING,
        Ok(Poll::Ready(())) => FfiPoll::READY,
        Err(_) => {
            let _ = catch_unwind(AssertUnwindSafe(|| *slot = None));
            FfiPoll::PANICKED
        }
    }
}

/// `drop` of [`SESSION_VTABLE`].
///
/// # Safety
/// `state` must be the state of a session future from `start`, not used again afterwards.
unsafe extern "C" fn drop_session(state: *mut c_void) {
    let _ = catch_unwind(|| {
        // SAFETY: the host releases the box made in `start` exactly once.
        drop(unsafe { Box::from_raw(state as *mut Option<SessionFuture>) });
    });
}

/// The byte stream of a connection after a switch of protocols: reads what the client sends,
/// writes what it receives, with backpressure both ways. Dropping it closes the connection.
pub struct Upgraded {
    io: *mut c_void,
}

// SAFETY: the handle is an exclusively owned host object (hyper's upgraded connection, which
// is Send); the host's functions on it may be called from any thread of the generation.
unsafe impl Send for Upgraded {}
// SAFETY: `&Upgraded` exposes nothing; all access goes through `&mut`/`Pin<&mut>`.
unsafe impl Sync for Upgraded {}

impl std::fmt::Debug for Upgraded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upgraded").finish_non_exhaustive()
    }
}

impl Upgraded {
    /// The stream behind a handle of the host's (`testing` makes in-process ones).
    #[cfg(feature = "testing")]
    pub(crate) fn from_handle(io: *mut c_void) -> Upgraded {
        Upgraded { io }
    }
}

fn broken() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the upgraded connection failed")
}

impl Upgraded {
    fn read_into(&mut self, cx: &mut Context<'_>, buf: &mut [MaybeUninit<u8>]) -> Poll<io::Result<usize>> {
        let waker = abi::waker::lend(cx.waker());
        let mut read = 0;
        // SAFETY: the handle is live; `buf` is writable for its length (the host writes, never
        // reads, it); `waker` and `read` outlive the call.
        let r = unsafe { (host().io_poll_read)(self.io, &waker, buf.as_mut_ptr() as *mut u8, buf.len(), &mut read) };
        match r {
            FfiPoll::PENDING => Poll::Pending,
            FfiPoll::READY => Poll::Ready(Ok(read.min(buf.len()))),
            _ => Poll::Ready(Err(broken())),
        }
    }

    fn write_from(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let waker = abi::waker::lend(cx.waker());
        let mut written = 0;
        // SAFETY: the handle is live; `data`, `waker` and `written` outlive the call.
        let r = unsafe { (host().io_poll_write)(self.io, &waker, FfiStr::new(data), &mut written) };
        match r {
            FfiPoll::PENDING => Poll::Pending,
            FfiPoll::READY => Poll::Ready(Ok(written.min(data.len()))),
            _ => Poll::Ready(Err(broken())),
        }
    }

    fn poll_host(&mut self, cx: &mut Context<'_>, f: abi::HostPollFn) -> Poll<io::Result<()>> {
        let waker = abi::waker::lend(cx.waker());
        // SAFETY: the handle is live; `waker` outlives the call.
        match unsafe { f(self.io, &waker) } {
            FfiPoll::PENDING => Poll::Pending,
            FfiPoll::READY => Poll::Ready(Ok(())),
            _ => Poll::Ready(Err(broken())),
        }
    }
}

impl Drop for Upgraded {
    fn drop(&mut self) {
        // SAFETY: released exactly once.
        unsafe { (host().io_drop)(self.io) };
    }
}

impl tokio::io::AsyncRead for Upgraded {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> Poll<io::Result<()>> {
        // SAFETY: the host only writes into the unfilled part, and reports how much it wrote.
        let unfilled = unsafe { buf.unfilled_mut() };
        let n = match self.get_mut().read_into(cx, unfilled) {
            Poll::Ready(Ok(n)) => n,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        };
        // SAFETY: the host initialised the first `n` bytes of the unfilled part.
        unsafe { buf.assume_init(n) };
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for Upgraded {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().write_from(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_host(cx, host().io_poll_flush)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_host(cx, host().io_poll_shutdown)
    }
}

impl futures_io::AsyncRead for Upgraded {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        // SAFETY: initialised bytes viewed as possibly uninitialised ones; the host only writes.
        let buf = unsafe { &mut *(buf as *mut [u8] as *mut [MaybeUninit<u8>]) };
        self.get_mut().read_into(cx, buf)
    }
}

impl futures_io::AsyncWrite for Upgraded {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().write_from(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_host(cx, host().io_poll_flush)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_host(cx, host().io_poll_shutdown)
    }
}
