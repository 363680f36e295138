//! Run a handler in-process, without hotswap: in unit tests, or in a server of your own.
//!
//! Inside hotswap, [`sleep`](crate::sleep), [`spawn_blocking`](crate::spawn_blocking) and the
//! log are services the host lends the plugin through a table ([`HostApi`]) that it hands to
//! the plugin's `init`. A handler called as a plain Rust function has no host, and those
//! services panic. [`install`] gives handler-api an in-process table instead, implemented with
//! tokio: timers and blocking work run on the tokio runtime the handler is polled on.
//!
//! Available with the `testing` feature, usually as a dev-dependency:
//!
//! ```toml
//! [dev-dependencies]
//! handler-api = { path = "../handler-api", features = ["testing"] }
//! tokio = { version = "1", features = ["rt", "time"] }
//! ```
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use handler_api::{Body, IntoResponse, Request, Response};
//!
//! async fn slow(_req: Request) -> Response {
//!     handler_api::sleep(Duration::from_millis(5)).await;
//!     let len = handler_api::spawn_blocking(|| "computed".len()).await.unwrap();
//!     format!("{len}\n").into_response()
//! }
//!
//! handler_api::testing::install();
//! let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
//! let res = runtime.block_on(slow(Request::new(Body::empty())));
//! assert_eq!(res.status(), 200);
//! ```
//!
//! # What it covers
//!
//! - **Timers and blocking work** need a tokio runtime: poll the handler inside one (as
//!   `block_on`, `#[tokio::test]` or a hyper server do), with its time driver enabled
//!   (`enable_time` or `enable_all`). Outside a runtime, `sleep` panics and `spawn_blocking`
//!   fails with a [`BlockingError`](crate::BlockingError), as they do in a plugin on a thread
//!   that is not its generation's.
//! - **Logging**: called in-process, the handler shares the process's `tracing`, so its events
//!   go straight to whatever subscriber the process (or the test) has installed. What
//!   handler-api itself writes to the host's log goes to that subscriber too, with target
//!   `handler_api`.
//! - **Not the C ABI.** Nothing crosses it in-process: the handler is an `async fn` called
//!   directly. The table's functions that serve calls through the declaration that
//!   [`export_handler!`](crate::export_handler) generates (request body chunks) are stubs
//!   that fail with [`FfiPoll::ERROR`]; [`superseded`](crate::superseded) never completes. Do
//!   not drive the declaration's `handle` with this table; nor does [`install`] run the
//!   declaration's `init` (or your `init` hook: call it yourself if the handler needs it).
//! - **Switching protocols** (WebSockets): a server of your own offers the switch with
//!   [`offer_upgrade`] and runs the session the handler accepted with [`accepted_session`],
//!   on its connection once it has switched.
//!
//! The table stays installed for the rest of the process.

use std::ffi::c_void;
use std::mem::MaybeUninit;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::ptr;
use std::sync::atomic::Ordering;
use std::task::Context;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::abi::{FfiHeader, FfiPoll, FfiStr, FfiWaker, HostApi, ABI_VERSION};
use crate::tokio_host::{io_outcome, sleep_drop, sleep_new, sleep_poll, Job, PluginTask};
use crate::HOST;

/// Installs the in-process host, so that handler-api's services work when a handler is called
/// as plain Rust.
///
/// Safe to call any number of times, from any thread: the first call installs the table, the
/// others find it there. If handler-api already has a host (the plugin was loaded by
/// hotswap), that host stays: its services are the ones that work in its process.
///
/// # Example
///
/// ```
/// handler_api::testing::install();
/// handler_api::testing::install(); // does nothing more
/// ```
pub fn install() {
    // Only ever read through a shared reference (`crate::host`), never written through.
    let table = &TABLE as *const HostApi as *mut HostApi;
    let _ = HOST.compare_exchange(ptr::null_mut(), table, Ordering::AcqRel, Ordering::Acquire);
}

/// The in-process table. It has no per-plugin data, so `context` is null.
static TABLE: HostApi = HostApi {
    size: std::mem::size_of::<HostApi>(),
    abi_version: ABI_VERSION,
    // Everything: the process's own subscriber filters.
    max_log_level: crate::abi::LOG_TRACE,
    context: ptr::null(),
    log,
    error_write,
    body_poll,
    body_trailers,
    body_drop: release_nothing,
    io_poll_read,
    io_poll_write,
    io_poll_flush,
    io_poll_shutdown,
    io_drop,
    superseded_new,
    superseded_poll: poll_error,
    superseded_drop: release_nothing,
    sleep_new,
    sleep_poll,
    sleep_drop,
    blocking_spawn,
    blocking_poll,
    blocking_drop,
    spawn,
    log_in_spans,
};

// Every function below is called through the table, as `extern "C"`: none may unwind (a panic
// escaping one aborts the process), so each that calls into tokio, `tracing` or allocates runs
// inside `catch_unwind`.

/// `HostApi::spawn` in-process: the future runs on a thread of its own, outside the test's
/// runtime, as a plugin's tasks run in hotswap (where the plugin's copy of tokio never sees the
/// host's runtime): `tokio::spawn` or tokio's timers fail in it here as they would there. The
/// caller's runtime is lent to it, for handler-api's own services. Without one, the future is
/// released and the call fails, as in hotswap.
///
/// # Safety
/// `future` must uphold [`crate::abi::FfiFuture`]'s contract; it passes to this function.
unsafe extern "C" fn spawn(_context: *const c_void, future: crate::abi::FfiFuture) -> FfiPoll {
    // SAFETY: forwarded from the caller; in-process, the plugin's code is this process's own.
    let task = unsafe { PluginTask::new(future) };
    catch_unwind(AssertUnwindSafe(move || {
        let run = move || {
            let _ = block_on(task); // a panic in it is the plugin's to report
        };
        if off_runtime("test-host-task", run) {
            FfiPoll::READY
        } else {
            FfiPoll::ERROR
        }
    }))
    .unwrap_or(FfiPoll::PANICKED)
}

/// Runs `work` on a thread of its own named `name`, outside the test's runtime, with the
/// calling thread's runtime lent to it (for handler-api's services, as hotswap lends its
/// own). Whether it started: not without a runtime, nor without a thread (then `work` is
/// dropped unrun).
fn off_runtime(name: &str, work: impl FnOnce() + Send + 'static) -> bool {
    let Some(runtime) = crate::tokio_host::runtime() else { return false };
    let started = std::thread::Builder::new().name(name.into()).spawn(move || {
        let _lent = crate::tokio_host::lend(Some(runtime));
        work();
    });
    started.is_ok()
}

/// Whether a job of [`blocking_spawn`] has run, and whom to tell.
#[derive(Default)]
struct Blocking {
    done: std::sync::atomic::AtomicBool,
    waker: std::sync::Mutex<Option<std::task::Waker>>,
}

/// `HostApi::blocking_spawn` in-process: the job runs on a thread of its own, outside the
/// test's runtime, for the reason given at [`spawn`]; null without a runtime (the job is then
/// released without running), as in hotswap.
///
/// # Safety
/// `job` must uphold [`FfiJob`](crate::abi::FfiJob)'s contract.
unsafe extern "C" fn blocking_spawn(job: crate::abi::FfiJob) -> *mut c_void {
    let job = Job(job);
    catch_unwind(AssertUnwindSafe(move || {
        let state = std::sync::Arc::new(Blocking::default());
        let finished = state.clone();
        // Not started, `job` drops unrun: released without running.
        let started = off_runtime("test-host-blocking", move || {
            let job = job; // the whole `Job` (Send), not its raw fields
            // SAFETY: run once, before `release` (which runs when `job` drops).
            unsafe { (job.0.run)(job.0.state) };
            drop(job);
            finished.done.store(true, Ordering::Release);
            if let Some(waker) = finished.waker.lock().ok().and_then(|mut w| w.take()) {
                waker.wake();
            }
        });
        if started {
            std::sync::Arc::into_raw(state) as *mut c_void
        } else {
            ptr::null_mut()
        }
    }))
    .unwrap_or(ptr::null_mut())
}

/// `HostApi::blocking_poll` of [`blocking_spawn`]'s jobs.
///
/// # Safety
/// `task` must come from [`blocking_spawn`], not yet dropped; `waker` must be valid for this
/// call.
unsafe extern "C" fn blocking_poll(task: *mut c_void, waker: *const FfiWaker) -> FfiPoll {
    catch_unwind(|| {
        // SAFETY: a live `Arc<Blocking>` from `blocking_spawn`, whose reference the caller holds.
        let state = unsafe { &*(task as *const Blocking) };
        if state.done.load(Ordering::Acquire) {
            return FfiPoll::READY;
        }
        // SAFETY: the caller keeps `waker` valid for this call.
        let waker = unsafe { crate::abi::waker::borrow(waker) };
        if let Ok(mut slot) = state.waker.lock() {
            *slot = Some((*waker).clone());
        }
        // It may have finished before the waker was in place.
        if state.done.load(Ordering::Acquire) {
            FfiPoll::READY
        } else {
            FfiPoll::PENDING
        }
    })
    .unwrap_or(FfiPoll::ERROR)
}

/// `HostApi::blocking_drop` of [`blocking_spawn`]'s jobs (the job itself runs to its end).
///
/// # Safety
/// `task` must come from [`blocking_spawn`] and not be used again.
unsafe extern "C" fn blocking_drop(task: *mut c_void) {
    // SAFETY: the reference `blocking_spawn` handed out, released exactly once.
    let _ = catch_unwind(|| drop(unsafe { std::sync::Arc::from_raw(task as *const Blocking) }));
}

/// Records a log event of handler-api in the process's `tracing` dispatcher.
///
/// # Safety
/// `target` and `message` must be valid for this call.
unsafe extern "C" fn log(_context: *const c_void, level: u32, target: FfiStr, message: FfiStr) {
    let _ = catch_unwind(|| {
        // SAFETY: the caller keeps both strings valid for this call.
        let (target, message) = unsafe { (target.to_string_lossy(), message.to_string_lossy()) };
        match level {
            1 => tracing::error!(target: "handler_api", %target, "{message}"),
            2 => tracing::warn!(target: "handler_api", %target, "{message}"),
            3 => tracing::info!(target: "handler_api", %target, "{message}"),
            4 => tracing::debug!(target: "handler_api", %target, "{message}"),
            _ => tracing::trace!(target: "handler_api", %target, "{message}"),
        }
    });
}

/// Records a log event of handler-api from within spans (see [`log`]); the context leads the
/// message.
///
/// # Safety
/// `target`, `spans` and `message` must be valid for this call.
unsafe extern "C" fn log_in_spans(context: *const c_void, level: u32, target: FfiStr, spans: FfiStr, message: FfiStr) {
    // SAFETY: the caller keeps the strings valid for this call.
    let (spans_text, message_text) = unsafe { (spans.as_bytes(), message.as_bytes()) };
    if spans_text.is_empty() {
        // SAFETY: forwarded from the caller.
        return unsafe { log(context, level, target, message) };
    }
    let text = [spans_text, b": ", message_text].concat();
    // SAFETY: forwarded from the caller; `text` outlives the call.
    unsafe { log(context, level, target, FfiStr::new(&text)) };
}

/// Appends `text` to an error sink.
///
/// # Safety
/// `sink` must point at a `String` that nothing else uses during this call, and `text` must
/// be valid for this call.
unsafe extern "C" fn error_write(sink: *mut c_void, text: FfiStr) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the caller passes a `String` it lends us exclusively for this call.
        let sink = unsafe { &mut *(sink as *mut String) };
        // SAFETY: the caller keeps `text` valid for this call.
        sink.push_str(&unsafe { text.to_string_lossy() });
    }));
}

/// Stub: there are no host request bodies in-process (a handler called directly gets a
/// [`Body`](crate::Body) it was given, never a host handle).
extern "C" fn body_poll(_body: *mut c_void, _waker: *const FfiWaker, _chunk: *mut FfiStr) -> FfiPoll {
    FfiPoll::ERROR
}

/// Stub: see [`body_poll`].
extern "C" fn body_trailers(_body: *mut c_void, _headers: *mut *const FfiHeader, _len: *mut usize) -> FfiPoll {
    FfiPoll::ERROR
}

/// In-process switches of protocols, for a server of your own that calls the handler as
/// plain Rust (the benchmark's static server does): offer the switch on the request; once
/// your server has switched, run the session the handler accepted on the connection.
///
/// # Example
///
/// ```
/// use handler_api::upgrade::Upgrade;
/// use handler_api::{Body, Request};
///
/// handler_api::testing::install();
/// let mut req = Request::new(Body::empty());
/// handler_api::testing::offer_upgrade(&mut req, "websocket", false);
/// let upgrade = Upgrade::from_request(&mut req).expect("offered");
/// let mut res = upgrade.accept(|_io| async {});
/// assert_eq!(res.status(), 101);
/// assert!(handler_api::testing::accepted_session(&mut res).is_some());
/// ```
pub fn offer_upgrade<B>(req: &mut crate::Request<B>, protocol: &str, http2: bool) {
    req.extensions_mut().insert(crate::upgrade::Upgrade::new(protocol.to_owned(), http2));
}

/// The session the handler accepted in `res` (see [`offer_upgrade`]), taken out of it.
pub fn accepted_session(res: &mut crate::Response) -> Option<AcceptedSession> {
    let session = res.extensions_mut().remove::<crate::upgrade::Accepted>()?.take()?;
    Some(AcceptedSession(session))
}

/// A session a handler accepted, to run on the connection once your server has switched
/// protocols.
pub struct AcceptedSession(crate::upgrade::Session);

impl std::fmt::Debug for AcceptedSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcceptedSession").finish_non_exhaustive()
    }
}

impl AcceptedSession {
    /// Runs the session on `io`, the connection after the switch, until it ends.
    ///
    /// # Panics
    /// In a plugin loaded by hotswap (where the host's table, not the in-process one, serves).
    pub fn run<IO>(self, io: IO) -> impl std::future::Future<Output = ()> + Send + 'static
    where
        IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        install(); // the session's I/O goes through this table...
        // ...and only through it: a host's own table would take the handle for one of its own.
        assert!(ptr::eq(crate::host(), &TABLE), "AcceptedSession::run in a plugin loaded by hotswap");
        let io: Box<InProcessIo> = Box::new(Box::new(io));
        (self.0)(crate::upgrade::Upgraded::from_handle(Box::into_raw(io) as *mut c_void))
    }
}

/// What an in-process connection is to the table's `io_*` functions: the handle is a
/// `Box<InProcessIo>`.
type InProcessIo = Box<dyn Connection>;

trait Connection: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Connection for T {}

/// Polls the in-process connection behind `io` with the waker behind `waker`.
///
/// # Safety
/// `io` must be a live handle made by [`AcceptedSession::run`], used by one thread at a time;
/// `waker` must be valid for the call.
unsafe fn poll_io(io: *mut c_void, waker: *const FfiWaker, f: impl FnOnce(Pin<&mut InProcessIo>, &mut Context<'_>) -> FfiPoll) -> FfiPoll {
    catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: forwarded from the caller.
        let io = unsafe { &mut *(io as *mut InProcessIo) };
        // SAFETY: forwarded from the caller.
        let waker = unsafe { crate::abi::waker::borrow(waker) };
        f(Pin::new(io), &mut Context::from_waker(&waker))
    }))
    .unwrap_or(FfiPoll::ERROR)
}


/// Reads from an in-process connection.
///
/// # Safety
/// As for [`poll_io`]; `buf` must be writable for `cap` bytes, `read` for a `usize`.
unsafe extern "C" fn io_poll_read(io: *mut c_void, waker: *const FfiWaker, buf: *mut u8, cap: usize, read: *mut usize) -> FfiPoll {
    // SAFETY: forwarded from the caller.
    unsafe {
        poll_io(io, waker, |io, cx| {
            // SAFETY: the caller lends `cap` writable bytes at `buf` for this call.
            let mut buf = ReadBuf::uninit(std::slice::from_raw_parts_mut(buf as *mut MaybeUninit<u8>, cap));
            let polled = io.poll_read(cx, &mut buf);
            // SAFETY: the caller's out-parameter.
            io_outcome(polled, |()| *read = buf.filled().len())
        })
    }
}

/// Writes to an in-process connection.
///
/// # Safety
/// As for [`poll_io`]; `data` must be valid for the call, `written` writable.
unsafe extern "C" fn io_poll_write(io: *mut c_void, waker: *const FfiWaker, data: FfiStr, written: *mut usize) -> FfiPoll {
    // SAFETY: forwarded from the caller; `data` and `written` as the caller guarantees.
    unsafe { poll_io(io, waker, |io, cx| io_outcome(io.poll_write(cx, data.as_bytes()), |n| *written = n)) }
}

/// Flushes an in-process connection.
///
/// # Safety
/// As for [`poll_io`].
unsafe extern "C" fn io_poll_flush(io: *mut c_void, waker: *const FfiWaker) -> FfiPoll {
    // SAFETY: forwarded from the caller.
    unsafe { poll_io(io, waker, |io, cx| io_outcome(io.poll_flush(cx), |()| {})) }
}

/// Shuts an in-process connection's writing side down.
///
/// # Safety
/// As for [`poll_io`].
unsafe extern "C" fn io_poll_shutdown(io: *mut c_void, waker: *const FfiWaker) -> FfiPoll {
    // SAFETY: forwarded from the caller.
    unsafe { poll_io(io, waker, |io, cx| io_outcome(io.poll_shutdown(cx), |()| {})) }
}

/// Closes an in-process connection.
///
/// # Safety
/// `io` must be a live handle made by [`AcceptedSession::run`], not used again afterwards.
unsafe extern "C" fn io_drop(io: *mut c_void) {
    let _ = catch_unwind(|| {
        // SAFETY: released exactly once.
        drop(unsafe { Box::from_raw(io as *mut InProcessIo) });
    });
}

/// Stub for the polls of host objects that do not exist in-process.
extern "C" fn poll_error(_handle: *mut c_void, _waker: *const FfiWaker) -> FfiPoll {
    FfiPoll::ERROR
}

/// Stub: in-process, no newer build ever supersedes the handler.
extern "C" fn superseded_new(_context: *const c_void) -> *mut c_void {
    ptr::null_mut()
}

/// Stub: the host objects it would release (request bodies, superseded handles) do not exist
/// in-process.
extern "C" fn release_nothing(_handle: *mut c_void) {}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use tracing_core::field::{Field, Visit};
    use tracing_core::span::{Attributes, Id, Record};
    use tracing_core::{Event, Metadata, Subscriber};

    use super::*;

    /// A current-thread runtime with a timer, as a `#[tokio::test]` would run.
    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap()
    }

    /// Runs `future` on a fresh runtime, failing the test instead of hanging if a waker is lost.
    fn run<F: Future>(future: F) -> F::Output {
        install();
        runtime().block_on(async {
            tokio::time::timeout(Duration::from_secs(10), future).await.expect("timed out: a wake-up was lost")
        })
    }

    #[test]
    fn the_test_host_fails_tokio_s_runtime_in_a_handler_as_hotswap_does() {
        async fn mistaken(_req: crate::Request) -> &'static str {
            tokio::time::sleep(Duration::from_millis(1)).await;
            "slept\n"
        }
        async fn right(_req: crate::Request) -> String {
            crate::sleep(Duration::from_millis(1)).await;
            let task = crate::spawn(async { crate::sleep(Duration::from_millis(1)).await });
            let blocking = crate::spawn_blocking(|| 6 * 7).await;
            format!("slept, {:?}, {:?}\n", task.await, blocking)
        }
        run(async {
            let res = TestHost::new(mistaken).get("/").await;
            assert_eq!(res.status(), 500);
            let why = res.panicked().expect("a panic");
            assert!(why.contains("Tokio 1.x") && why.contains("use handler_api::spawn for tasks, handler_api::sleep"), "{why}");
            assert_eq!(TestHost::new(right).get("/").await.text(), "slept, Ok(()), Ok(42)\n");
        });
    }

    #[test]
    fn tasks_and_blocking_jobs_run_outside_the_runtime_as_in_hotswap() {
        async fn app(_req: crate::Request) -> String {
            let (sent, received) = std::sync::mpsc::channel();
            drop(crate::spawn(async move {
                // handler-api's own services work in a task; tokio's do not.
                crate::sleep(Duration::from_millis(1)).await;
                let _ = sent.send(tokio::runtime::Handle::try_current().is_ok());
            }));
            let in_task = crate::spawn_blocking(move || received.recv_timeout(Duration::from_secs(5))).await;
            let in_job = crate::spawn_blocking(|| tokio::runtime::Handle::try_current().is_ok()).await;
            format!("{in_task:?} {in_job:?}")
        }
        run(async {
            let res = TestHost::new(app).get("/").await;
            assert_eq!(res.text(), "Ok(Ok(false)) Ok(false)", "tokio's runtime is current where hotswap's plugin has none");
        });
    }

    #[test]
    fn lengths_are_checked_as_the_host_checks_them() {
        async fn app(req: crate::Request) -> crate::Response {
            use crate::IntoResponse;
            let mut res = "five!".into_response();
            match req.uri().path() {
                "/wrong" => drop(res.headers_mut().insert(http::header::CONTENT_LENGTH, 9.into())),
                "/short" => *res.body_mut() = crate::Body::sized_stream(9, futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"five!"))])),
                _ => {}
            }
            res
        }
        run(async {
            let host = TestHost::new(app);
            let fine = host.get("/").await;
            assert_eq!((fine.status(), fine.header("content-length"), fine.invalid()), (http::StatusCode::OK, Some("5"), None));
            let wrong = host.get("/wrong").await;
            assert_eq!(wrong.status(), 500);
            assert!(wrong.invalid().is_some_and(|why| why.contains("content-length header says \"9\"")), "{:?}", wrong.invalid());
            let short = host.get("/short").await;
            assert_eq!(short.aborted(), Some("the body brought 5 bytes where its length said 9"));
        });
    }

    #[test]
    fn install_is_idempotent() {
        install();
        let first = HOST.load(Ordering::Acquire);
        install();
        install();
        assert_eq!(HOST.load(Ordering::Acquire), first);
        assert!(ptr::eq(crate::host(), &TABLE));
    }

    #[test]
    fn sleep_waits_on_tokio_timer() {
        let started = Instant::now();
        run(crate::sleep(Duration::from_millis(30)));
        assert!(started.elapsed() >= Duration::from_millis(30), "woke after {:?}", started.elapsed());
    }

    #[test]
    fn sleep_counts_from_when_it_is_made_not_first_polled() {
        let started = Instant::now();
        let due = crate::sleep(Duration::from_millis(400));
        std::thread::sleep(Duration::from_millis(400)); // work before the first poll
        run(due);
        let elapsed = started.elapsed();
        assert!(elapsed < Duration::from_millis(700), "woke after {elapsed:?}, not 400 ms after it was made");
    }

    #[test]
    fn sleeps_run_concurrently() {
        let started = Instant::now();
        run(async {
            let a = crate::sleep(Duration::from_millis(50));
            let b = crate::sleep(Duration::from_millis(50));
            futures_util::future::join(a, b).await;
        });
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(50) && elapsed < Duration::from_secs(5), "took {elapsed:?}");
    }

    #[test]
    fn spawn_blocking_runs_on_another_thread() {
        let caller = std::thread::current().id();
        let job = || {
            std::thread::sleep(Duration::from_millis(20));
            (42, std::thread::current().id())
        };
        let (value, thread) = run(async { crate::spawn_blocking(job).await }).unwrap();
        assert_eq!(value, 42);
        assert_ne!(thread, caller, "the job ran on the runtime's thread, blocking it");
    }

    #[test]
    fn spawn_blocking_reports_a_panic() {
        let result = run(async { crate::spawn_blocking(|| -> u32 { panic!("job failed on purpose") }).await });
        assert_eq!(result.unwrap_err().to_string(), "the blocking job panicked");
    }

    #[test]
    fn spawn_blocking_outside_a_runtime_fails() {
        install();
        let result = futures_util::FutureExt::now_or_never(crate::spawn_blocking(|| 1));
        let error = result.expect("answers at once").unwrap_err();
        assert_eq!(error.to_string(), "the host could not run the blocking job");
    }

    #[test]
    fn dropped_job_handle_still_runs_the_job() {
        let (sent, received) = std::sync::mpsc::channel();
        run(async move {
            drop(crate::spawn_blocking(move || sent.send(()).unwrap()));
            let waited = crate::spawn_blocking(move || received.recv_timeout(Duration::from_secs(5))).await;
            waited.unwrap().expect("the job whose handle was dropped did not run");
        });
    }

    /// Records the events it sees as `target message`.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<String>>>);

    impl Subscriber for Recorder {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
        fn event(&self, event: &Event<'_>) {
            struct Text(String);
            impl Visit for Text {
                fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
                    use std::fmt::Write as _;
                    let _ = write!(self.0, " {}={value:?}", field.name());
                }
            }
            let mut text = Text(format!("{} {}", event.metadata().level(), event.metadata().target()));
            event.record(&mut text);
            self.0.lock().unwrap().push(text.0);
        }
    }

    #[test]
    fn log_reaches_the_process_subscriber() {
        install();
        let recorder = Recorder::default();
        tracing::subscriber::with_default(recorder.clone(), || {
            crate::log::emit(crate::host(), 2, "handler_api::body", "response body failed: boom");
        });
        let events = recorder.0.lock().unwrap();
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(events[0].starts_with("WARN handler_api"), "{events:?}");
        assert!(events[0].contains("target=handler_api::body"), "{events:?}");
        assert!(events[0].contains("response body failed: boom"), "{events:?}");
    }

    #[test]
    fn error_write_appends_to_a_string() {
        let mut sink = String::from("init failed: ");
        // SAFETY: `sink` is a live `String`, lent for the call; the text outlives it.
        unsafe { (TABLE.error_write)(&mut sink as *mut String as *mut c_void, FfiStr::new(b"no database")) };
        assert_eq!(sink, "init failed: no database");
    }

    #[test]
    fn an_accepted_session_runs_on_an_in_process_connection() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        run(async {
            let mut req = crate::Request::new(crate::Body::empty());
            offer_upgrade(&mut req, "echo", false);
            let upgrade = crate::upgrade::Upgrade::from_request(&mut req).expect("offered");
            assert_eq!((upgrade.protocol(), upgrade.is_http2()), ("echo", false));
            let mut res = upgrade.accept(|mut io| async move {
                let mut buf = [0u8; 64];
                while let Ok(n @ 1..) = io.read(&mut buf).await {
                    io.write_all(&buf[..n]).await.unwrap();
                }
                io.shutdown().await.unwrap();
            });
            assert_eq!(res.status(), 101);
            assert_eq!(res.headers()["upgrade"], "echo");
            let session = accepted_session(&mut res).expect("accepted");
            assert!(accepted_session(&mut res).is_none(), "taken once");
            // A pipe smaller than the message: backpressure both ways.
            let (client, server) = tokio::io::duplex(8);
            let task = tokio::spawn(session.run(server));
            let (mut reader, mut writer) = tokio::io::split(client);
            let message = b"a message longer than the pipe";
            let mut echoed = Vec::new();
            let (written, read) = futures_util::future::join(
                async {
                    writer.write_all(message).await?;
                    writer.shutdown().await
                },
                reader.read_to_end(&mut echoed),
            )
            .await;
            written.unwrap();
            read.unwrap();
            assert_eq!(echoed, message);
            task.await.unwrap();
        });
    }

    #[test]
    fn abi_callbacks_report_an_error() {
        let mut chunk = FfiStr::EMPTY;
        // SAFETY: as above.
        let polled = unsafe { (TABLE.body_poll)(ptr::null_mut(), ptr::null(), &mut chunk) };
        assert_eq!(polled, FfiPoll::ERROR);
    }
}

/// An in-process host for `cargo test`: calls a handler, or a service such as an axum
/// `Router`, the way hotswap does, and reads the whole response.
///
/// What hotswap does around a call, it does too:
/// - Your code runs on a thread of its own, outside the test's tokio runtime, as a plugin's
///   code runs outside any runtime of its own. So `tokio::spawn` or `tokio::time::sleep` in
///   it fail here as they fail under hotswap: the response is a `500`, and
///   [`TestResponse::panicked`] says why and what to use instead.
/// - handler-api's services work, on the test's tokio runtime: [`sleep`](crate::sleep),
///   [`timeout`](crate::timeout), [`spawn`](crate::spawn) and
///   [`spawn_blocking`](crate::spawn_blocking). ([`install`] is done for you.) A spawned task
///   and a blocking job run on threads of their own, outside the runtime, as in hotswap.
/// - Each request gets a [`RequestContext`](crate::RequestContext) (peer `127.0.0.1:40000`, a
///   request id counting from 1).
/// - A service's response body becomes a [`Body`](crate::Body), as the host converts it.
/// - A panic answers `500 Internal Server Error`.
/// - A response body that fails, or panics, while it streams is reported by
///   [`TestResponse::aborted`], where a client would see a broken transfer; so is one that
///   brings more or fewer bytes than its length said.
/// - A `content-length` header that disagrees with the body's length makes the response a
///   `500`, and [`TestResponse::invalid`] says why; a body of known length gets its
///   `content-length`, as hotswap sends it.
///
/// # Example
///
/// ```
/// use handler_api::testing::TestHost;
/// use handler_api::{IntoResponse, Request, Response};
///
/// async fn app(req: Request) -> Response {
///     match req.uri().path() {
///         "/" => "hello\n".into_response(),
///         _ => (http::StatusCode::NOT_FOUND, "not found\n").into_response(),
///     }
/// }
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// // In a `#[tokio::test] async fn`:
/// let host = TestHost::new(app);
/// let res = host.get("/").await;
/// assert_eq!(res.status(), 200);
/// assert_eq!(res.text(), "hello\n");
/// assert_eq!(host.get("/nowhere").await.status(), 404);
/// # });
/// ```
///
/// Services are built by the same function `export_handler!` is given:
/// `TestHost::service(app().unwrap())`.
pub struct TestHost<H> {
    handler: std::sync::Arc<H>,
    requests: std::sync::atomic::AtomicU64,
}

impl<H: crate::Handler> TestHost<H> {
    /// A host for `handler`, any `async fn(Request) -> impl IntoResponse`.
    pub fn new(handler: H) -> TestHost<H> {
        install();
        TestHost { handler: std::sync::Arc::new(handler), requests: std::sync::atomic::AtomicU64::new(0) }
    }

    /// `GET path` (a path with its query, such as `/items?page=2`).
    pub async fn get(&self, path: &str) -> TestResponse {
        self.request(request(http::Method::GET, path, crate::Body::empty())).await
    }

    /// `POST path` with `body`.
    pub async fn post(&self, path: &str, body: impl Into<crate::Body>) -> TestResponse {
        self.request(request(http::Method::POST, path, body.into())).await
    }

    /// Sends `req` as it is, with a [`RequestContext`](crate::RequestContext) unless it has
    /// one, and reads the whole response.
    ///
    /// # Panics
    /// If the thread that runs the request cannot be started.
    pub async fn request(&self, mut req: crate::Request) -> TestResponse {
        if req.extensions().get::<crate::RequestContext>().is_none() {
            let id = self.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            let peer = std::net::SocketAddr::from(([127, 0, 0, 1], 40000));
            let local = std::net::SocketAddr::from(([127, 0, 0, 1], 8080));
            let context = crate::RequestContext::new(Some(peer), Some(local), http::uri::Scheme::HTTP, crate::RequestId(id));
            req.extensions_mut().insert(context);
        }
        let runtime = tokio::runtime::Handle::try_current().ok();
        let handler = self.handler.clone();
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new().name("test-host-request".into()).spawn(move || {
            let _lent = crate::tokio_host::lend(runtime);
            let _ = sender.send(block_on(answer(&*handler, req)));
        });
        spawned.expect("TestHost: cannot start the request's thread");
        receiver.await.expect("TestHost: the request's thread ended without an answer")
    }
}

/// Calls `handler` with `req` and reads the whole response, as the host would.
async fn answer<H: crate::Handler>(handler: &H, req: crate::Request) -> TestResponse {
    let mut panicked = None;
    let called = catch_unwind(AssertUnwindSafe(|| handler.call(req))).map_err(|payload| panic_text(&*payload));
    let answered = match called {
        Ok(future) => CatchUnwind(std::pin::pin!(future)).await,
        Err(message) => Err(message),
    };
    let mut invalid = None;
    let response = answered.unwrap_or_else(|message| {
        panicked = Some(message);
        crate::IntoResponse::into_response(http::StatusCode::INTERNAL_SERVER_ERROR)
    });
    let response = match refused(&response) {
        Some(why) => {
            invalid = Some(why);
            crate::IntoResponse::into_response(http::StatusCode::INTERNAL_SERVER_ERROR)
        }
        None => response,
    };
    let (mut parts, mut body) = response.into_parts();
    let announced = body.exact_len();
    let mut bytes = Vec::new();
    let mut aborted = None;
    loop {
        match CatchUnwind(std::pin::pin!(body.chunk())).await {
            Ok(Some(Ok(chunk))) => bytes.extend_from_slice(&chunk),
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                aborted = Some(e.to_string());
                break;
            }
            Err(message) => {
                aborted = Some(format!("the response body panicked: {message}"));
                break;
            }
        }
    }
    // Dropping what panicked may panic again: contained too.
    let _ = catch_unwind(AssertUnwindSafe(move || drop(body)));
    // The host sends a body of known length with that length, and cuts it off if it brings
    // more or less.
    if let Some(len) = announced.filter(|_| aborted.is_none()) {
        if bytes.len() as u64 != len {
            aborted = Some(format!("the body brought {} bytes where its length said {len}", bytes.len()));
        } else if !parts.headers.contains_key(http::header::CONTENT_LENGTH) && len > 0 {
            parts.headers.insert(http::header::CONTENT_LENGTH, len.into());
        }
    }
    TestResponse { parts, body: bytes.into(), aborted, panicked, invalid }
}

/// Why the host would not send `response` (it answers `500` instead), as it checks it.
fn refused(response: &crate::Response) -> Option<String> {
    let known = response.body().exact_len().filter(|len| *len > 0)?;
    // Each of them, as the host checks each header.
    response.headers().get_all(http::header::CONTENT_LENGTH).iter().find_map(|declared| {
        // Digits only (`+5` parses, but is no length on the wire).
        let parsed = declared.to_str().ok().filter(|v| v.bytes().all(|b| b.is_ascii_digit())).and_then(|v| v.parse().ok());
        (parsed != Some(known)).then(|| {
            format!("its content-length header says {declared:?} but its body is {known} bytes (leave the header out: the host sets it from the body)")
        })
    })
}

/// A panic's message, with what to do instead when it comes from a known mistake.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    let message = crate::export::panic_message(payload);
    match crate::export::mistake_hint(message) {
        Some(hint) => format!("{message} ({hint})"),
        None => message.to_owned(),
    }
}

/// Runs `future` to its end on this thread, which is not a runtime's.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(std::sync::Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let std::task::Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
        std::thread::park();
    }
}

/// A service's host: see [`TestHost`].
impl TestHost<()> {
    /// A host for `service`: an axum `Router`, or any tower service `export_handler!` takes.
    pub fn service<S, B>(service: S) -> TestHost<impl crate::Handler>
    where
        S: tower::Service<crate::Request, Response = http::Response<B>> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
        S::Error: Into<crate::BoxError>,
        B: http_body::Body + Send + 'static,
        B::Error: Into<crate::BoxError>,
    {
        TestHost::new(crate::service::ServiceHandler::new(service))
    }
}

fn request(method: http::Method, path: &str, body: crate::Body) -> crate::Request {
    let mut req = crate::Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = path.parse().unwrap_or_else(|e| panic!("TestHost: {path:?} is not a request target: {e}"));
    req
}

/// A response read whole by [`TestHost`].
#[derive(Debug)]
pub struct TestResponse {
    parts: http::response::Parts,
    body: bytes::Bytes,
    aborted: Option<String>,
    panicked: Option<String>,
    invalid: Option<String>,
}

impl TestResponse {
    /// The status.
    pub fn status(&self) -> http::StatusCode {
        self.parts.status
    }

    /// The headers.
    pub fn headers(&self) -> &http::HeaderMap {
        &self.parts.headers
    }

    /// The value of header `name`, if it is present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.parts.headers.get(name)?.to_str().ok()
    }

    /// The body.
    pub fn bytes(&self) -> &bytes::Bytes {
        &self.body
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Why the body ended early, if it did: it failed or panicked while streaming. `body` then
    /// holds what was read before.
    pub fn aborted(&self) -> Option<&str> {
        self.aborted.as_deref()
    }

    /// The panic that made this response a `500`, if one did: its message, and what to use
    /// instead when it is a known mistake (tokio's runtime in a plugin, for one).
    pub fn panicked(&self) -> Option<&str> {
        self.panicked.as_deref()
    }

    /// Why the host refused the handler's response, if it did (it answers `500` instead): a
    /// `content-length` header that disagrees with the body's length, as hotswap checks it.
    pub fn invalid(&self) -> Option<&str> {
        self.invalid.as_deref()
    }
}

/// Polls a future, answering the panic's message if it panics (as the host turns a panic into
/// a `500`).
struct CatchUnwind<'a, F>(Pin<&'a mut F>);

impl<F: std::future::Future> std::future::Future for CatchUnwind<'_, F> {
    type Output = Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> std::task::Poll<Self::Output> {
        match catch_unwind(AssertUnwindSafe(|| self.0.as_mut().poll(cx))) {
            Ok(polled) => polled.map(Ok),
            Err(payload) => std::task::Poll::Ready(Err(panic_text(&*payload))),
        }
    }
}
