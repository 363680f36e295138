//! Upgraded connections, from the host's side: the session the plugin runs on a connection
//! after a switch of protocols, the byte stream it is lent, and the signal that its
//! generation no longer gets new requests.
//!
//! The `extern "C"` functions here are host code called by the plugin; none may unwind, so
//! each body runs inside `catch_unwind`.

use std::ffi::c_void;
use std::future::Future;
use std::mem::MaybeUninit;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use handler_api::abi::{self, FfiFuture, FfiPoll, FfiStr, FfiWaker};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::plugin::generation::{Generation, InFlight};
use crate::plugin::response::Unaccepted;
use crate::plugin::services::PluginContext;
use crate::plugin::wakers::Parking;

/// The connection a switch of protocols leaves, as the host lends it to the plugin: hyper's
/// upgraded stream, with whatever the server watches of it.
pub(crate) trait UpgradedIo: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> UpgradedIo for T {}

/// An upgrade the plugin accepted, waiting for the host to switch protocols. It holds its
/// generation as a request in flight does; dropping it releases the plugin's state (on a
/// thread of that generation).
pub(crate) struct PendingUpgrade {
    ffi: Unaccepted,
    hold: InFlight,
}

/// Why an upgraded connection's session ended early.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    #[error("the upgraded connection's handler panicked")]
    Panicked,
    #[error("the upgraded connection's handler failed")]
    Failed,
}

impl PendingUpgrade {
    pub(super) fn new(ffi: Unaccepted, hold: InFlight) -> PendingUpgrade {
        PendingUpgrade { ffi, hold }
    }

    /// The generation whose plugin accepted it.
    pub(crate) fn generation(&self) -> &Arc<Generation> {
        self.hold.generation()
    }

    /// Starts the plugin's session on `io`, the connection after the switch. Must run on a
    /// thread of the generation.
    pub(crate) fn start(self, io: impl UpgradedIo + 'static) -> Result<Session, SessionError> {
        let PendingUpgrade { ffi, hold } = self;
        let ffi = std::mem::ManuallyDrop::new(ffi); // `start` consumes the state
        let io = Box::into_raw(Box::new(HostIo {
            io: Box::new(io),
            reading: Parking::default(),
            writing: Parking::default(),
        }));
        // SAFETY: the upgrade is live and never started (it was owned until here); `io`
        // passes to the plugin, which releases it through `io_drop`; `hold` keeps the library
        // loaded during the call, and the session after it.
        let future = unsafe { ((*ffi.0.vtable).start)(ffi.0.state, io as *mut c_void) };
        if future.vtable.is_null() {
            return Err(SessionError::Panicked);
        }
        hold.generation().stats().upgraded_started();
        Ok(Session { ffi: future, done: false, hold })
    }
}

/// The plugin's side of an upgraded connection: its future, polled to its end on a thread
/// of its generation, which it holds. Dropping it releases the plugin's state (on the
/// dropping thread, which must be the generation's) and so the connection.
pub(crate) struct Session {
    ffi: FfiFuture,
    done: bool,
    hold: InFlight,
}

// SAFETY: the plugin's session future is `Send` (handler-api requires it); its state is owned
// exclusively by this value.
unsafe impl Send for Session {}

impl Future for Session {
    type Output = Result<(), SessionError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(Ok(()));
        }
        let waker = abi::waker::lend(cx.waker());
        // SAFETY: the state is live until drop, and `hold` keeps its library loaded; `waker`
        // outlives the call.
        let r = unsafe { ((*this.ffi.vtable).poll)(this.ffi.state, &waker) };
        let result = match r {
            FfiPoll::PENDING => return Poll::Pending,
            FfiPoll::READY => Ok(()),
            FfiPoll::PANICKED => Err(SessionError::Panicked),
            _ => Err(SessionError::Failed),
        };
        this.done = true;
        Poll::Ready(result)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // SAFETY: released exactly once, while `hold` (dropped after this) keeps the library
        // loaded.
        unsafe { ((*self.ffi.vtable).drop)(self.ffi.state) };
        self.hold.generation().stats().upgraded_ended();
    }
}

/// An upgraded connection lent to the plugin.
struct HostIo {
    io: Box<dyn UpgradedIo>,
    /// Wakers the plugin made itself, parked here instead of inside hyper or the reactor: one
    /// for reading, one for writing (flush and shutdown included), as tokio and hyper keep
    /// one of each; a reader and a writer on two tasks each get theirs back.
    reading: Parking,
    writing: Parking,
}

/// Which of its two wakers a poll of an upgraded connection uses.
#[derive(Clone, Copy)]
enum Direction {
    Read,
    Write,
}

/// Runs `f` with the connection behind `io` and a context whose waker is safe to hand to
/// hyper and tokio.
///
/// # Safety
/// `io` must be a live `HostIo` from `PendingUpgrade::start`, used by one thread at a time;
/// `waker` must be valid for the call.
unsafe fn with_io(
    io: *mut c_void,
    waker: *const FfiWaker,
    direction: Direction,
    f: impl FnOnce(Pin<&mut dyn UpgradedIo>, &mut Context<'_>) -> FfiPoll,
) -> FfiPoll {
    catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: forwarded from the caller.
        let HostIo { io, reading, writing } = unsafe { &mut *(io as *mut HostIo) };
        let parking = match direction {
            Direction::Read => reading,
            Direction::Write => writing,
        };
        // SAFETY: forwarded from the caller.
        let borrowed = unsafe { abi::waker::borrow(waker) };
        // SAFETY: as above; `borrowed` is its view.
        let waker = unsafe { parking.waker(waker, &borrowed) };
        let mut cx = Context::from_waker(waker);
        f(Pin::new(&mut **io), &mut cx)
    }))
    .unwrap_or(FfiPoll::ERROR)
}

/// The ABI's answer for `polled` (handler-api's `io_outcome`), with a failure logged.
fn outcome<T>(polled: Poll<std::io::Result<T>>, done: impl FnOnce(T)) -> FfiPoll {
    if let Poll::Ready(Err(e)) = &polled {
        tracing::debug!("upgraded connection failed: {e}");
    }
    handler_api::tokio_host::io_outcome(polled, done)
}

/// `HostApi::io_poll_read`.
///
/// # Safety
/// `io` is a live upgraded connection lent to the plugin, used by one thread at a time; `buf` is writable for `cap` bytes; `waker` and `read` are valid for the call.
pub(crate) unsafe extern "C" fn io_poll_read(io: *mut c_void, waker: *const FfiWaker, buf: *mut u8, cap: usize, read: *mut usize) -> FfiPoll {
    // SAFETY: forwarded from the caller.
    unsafe {
        with_io(io, waker, Direction::Read, |io, cx| {
            // SAFETY: the plugin lends `cap` writable bytes at `buf` for this call.
            let buf = std::slice::from_raw_parts_mut(buf as *mut MaybeUninit<u8>, cap);
            let mut buf = ReadBuf::uninit(buf);
            let polled = io.poll_read(cx, &mut buf);
            // SAFETY: the plugin's out-parameter.
            outcome(polled, |()| *read = buf.filled().len())
        })
    }
}

/// `HostApi::io_poll_write`.
///
/// # Safety
/// As for `io_poll_read`; `data` is valid for the call, `written` writable.
pub(crate) unsafe extern "C" fn io_poll_write(io: *mut c_void, waker: *const FfiWaker, data: FfiStr, written: *mut usize) -> FfiPoll {
    // SAFETY: forwarded from the caller.
    unsafe {
        with_io(io, waker, Direction::Write, |io, cx| {
            // SAFETY: the plugin keeps `data` valid for this call; `written` is its out-parameter.
            outcome(io.poll_write(cx, data.as_bytes()), |n| *written = n)
        })
    }
}

/// `HostApi::io_poll_flush`.
///
/// # Safety
/// As for `io_poll_read`.
pub(crate) unsafe extern "C" fn io_poll_flush(io: *mut c_void, waker: *const FfiWaker) -> FfiPoll {
    // SAFETY: forwarded from the caller.
    unsafe { with_io(io, waker, Direction::Write, |io, cx| outcome(io.poll_flush(cx), |()| {})) }
}

/// `HostApi::io_poll_shutdown`.
///
/// # Safety
/// As for `io_poll_read`.
pub(crate) unsafe extern "C" fn io_poll_shutdown(io: *mut c_void, waker: *const FfiWaker) -> FfiPoll {
    // SAFETY: forwarded from the caller.
    unsafe { with_io(io, waker, Direction::Write, |io, cx| outcome(io.poll_shutdown(cx), |()| {})) }
}

/// `HostApi::io_drop`: the plugin is done with the connection; it closes.
///
/// # Safety
/// `io` is a live upgraded connection lent to the plugin, released exactly once.
pub(crate) unsafe extern "C" fn io_drop(io: *mut c_void) {
    let _ = catch_unwind(|| {
        // SAFETY: the plugin releases each connection exactly once.
        drop(unsafe { Box::from_raw(io as *mut HostIo) });
    });
}

/// What `superseded_new` hands out.
struct SupersededWait {
    wait: Pin<Box<WaitForCancellationFutureOwned>>,
    parking: Parking,
}

/// `HostApi::superseded_new`.
///
/// # Safety
/// `context` is the `PluginContext` of the table the plugin was given.
pub(crate) unsafe extern "C" fn superseded_new(context: *const c_void) -> *mut c_void {
    catch_unwind(|| {
        // SAFETY: `context` is the generation's PluginContext, alive as long as its table.
        let context = unsafe { &*(context as *const PluginContext) };
        let wait = SupersededWait { wait: Box::pin(context.superseded.clone().cancelled_owned()), parking: Parking::default() };
        Box::into_raw(Box::new(wait)) as *mut c_void
    })
    .unwrap_or(std::ptr::null_mut())
}

/// `HostApi::superseded_poll`.
///
/// # Safety
/// `handle` is a live handle of `superseded_new`, used by one thread at a time; `waker` is valid for the call.
pub(crate) unsafe extern "C" fn superseded_poll(handle: *mut c_void, waker: *const FfiWaker) -> FfiPoll {
    catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: forwarded from the caller.
        let wait = unsafe { &mut *(handle as *mut SupersededWait) };
        // SAFETY: forwarded from the caller.
        let borrowed = unsafe { abi::waker::borrow(waker) };
        // SAFETY: as above; `borrowed` is its view.
        let waker = unsafe { wait.parking.waker(waker, &borrowed) };
        match wait.wait.as_mut().poll(&mut Context::from_waker(waker)) {
            Poll::Ready(()) => FfiPoll::READY,
            Poll::Pending => FfiPoll::PENDING,
        }
    }))
    .unwrap_or(FfiPoll::ERROR)
}

/// `HostApi::superseded_drop`.
///
/// # Safety
/// `handle` is a live handle of `superseded_new`, released exactly once.
pub(crate) unsafe extern "C" fn superseded_drop(handle: *mut c_void) {
    let _ = catch_unwind(|| {
        // SAFETY: released exactly once.
        drop(unsafe { Box::from_raw(handle as *mut SupersededWait) });
    });
}
