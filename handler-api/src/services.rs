//! Services the host lends to plugins: timers and blocking work.
//!
//! A plugin has no runtime of its own (its copy of tokio would have no reactor), so it asks
//! the host for these. They run on threads that belong to the plugin's generation, which the
//! host joins before it unloads the library.

use std::ffi::c_void;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::abi::{self, FfiJob, FfiPoll};
use crate::host;

/// Waits until `duration` has elapsed since the call, on the host's timer (like
/// `tokio::time::sleep`, the countdown starts when the future is made, not when it is first
/// polled).
///
/// # Example
///
/// ```
/// # async fn f() {
/// use std::time::Duration;
/// handler_api::sleep(Duration::from_millis(20)).await;
/// # }
/// ```
///
/// # Panics
/// When polled outside a request of a plugin loaded by hotswap (in a unit test, say), unless
/// `handler_api::testing::install` (feature `testing`) has run and a tokio runtime with a
/// timer is current.
pub fn sleep(duration: Duration) -> Sleep {
    Sleep { duration, deadline: Instant::now().checked_add(duration), handle: std::ptr::null_mut() }
}

/// Future returned by [`sleep`].
#[derive(Debug)]
pub struct Sleep {
    duration: Duration,
    /// When it is due (`None`: beyond what `Instant` can say; then `duration` from the first
    /// poll).
    deadline: Option<Instant>,
    handle: *mut c_void,
}

// SAFETY: the handle is an exclusively owned host timer (tokio's `Sleep`, which is Send).
unsafe impl Send for Sleep {}
// SAFETY: `&Sleep` exposes nothing; all access goes through `&mut`/`Pin<&mut>`.
unsafe impl Sync for Sleep {}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.handle.is_null() {
            let left = self.deadline.map_or(self.duration, |deadline| deadline.saturating_duration_since(Instant::now()));
            let nanos = u64::try_from(left.as_nanos()).unwrap_or(u64::MAX);
            // SAFETY: a plain call into the host's table.
            self.handle = unsafe { (host().sleep_new)(nanos) };
            assert!(!self.handle.is_null(), "handler_api::sleep polled outside the hotswap host's runtime");
        }
        let waker = abi::waker::lend(cx.waker());
        // SAFETY: the handle is live; `waker` outlives the call.
        match unsafe { (host().sleep_poll)(self.handle, &waker) } {
            FfiPoll::PENDING => Poll::Pending,
            _ => Poll::Ready(()),
        }
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if !self.handle.is_null() {
            // SAFETY: released exactly once.
            unsafe { (host().sleep_drop)(self.handle) };
        }
    }
}

/// Runs blocking work (file I/O, heavy computation) on the host's blocking pool, so it does
/// not stall the threads that serve requests.
///
/// # Example
///
/// ```
/// # async fn f() -> Result<(), handler_api::BlockingError> {
/// let text = handler_api::spawn_blocking(|| std::fs::read_to_string("/etc/hostname")).await?;
/// # let _ = text; Ok(()) }
/// ```
///
/// # Errors
/// [`BlockingError`] if `f` panicked (the panic is logged) or the host could not run it.
pub fn spawn_blocking<F, T>(f: F) -> JoinHandle<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let shared = Arc::new(Job::<F, T> { work: Mutex::new(Some(f)), result: Mutex::new(None) });
    let job = FfiJob {
        state: Arc::into_raw(shared.clone()) as *mut c_void,
        run: run_job::<F, T>,
        release: release_job::<F, T>,
    };
    // SAFETY: a plain call into the host's table; the job's functions uphold FfiJob's contract.
    let handle = unsafe { (host().blocking_spawn)(job) };
    JoinHandle { handle, shared }
}

/// The error of a [`spawn_blocking`] job that did not return a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockingError(&'static str);

impl std::fmt::Display for BlockingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}
impl std::error::Error for BlockingError {}

struct Job<F, T> {
    work: Mutex<Option<F>>,
    result: Mutex<Option<Result<T, BlockingError>>>,
}

/// `run` of the [`FfiJob`] made by `spawn_blocking`: runs the work, storing its result (or
/// that it panicked) for the `JoinHandle`.
///
/// # Safety
/// `state` must be the state of a job from `spawn_blocking` for these `F` and `T` whose
/// reference the host has not yet released (`release_job`).
unsafe extern "C" fn run_job<F: FnOnce() -> T, T>(state: *mut c_void) {
    // SAFETY: `state` is the Arc handed to the host in `spawn_blocking`, not yet released.
    let job = unsafe { &*(state as *const Job<F, T>) };
    let work = job.work.lock().ok().and_then(|mut w| w.take());
    if let Some(work) = work {
        let result = catch_unwind(AssertUnwindSafe(work)).map_err(|_| BlockingError("the blocking job panicked"));
        if let Ok(mut slot) = job.result.lock() {
            *slot = Some(result);
        }
    }
}

/// `release` of the [`FfiJob`] made by `spawn_blocking`: drops the host's reference.
///
/// # Safety
/// `state` must be the state of a job from `spawn_blocking` for these `F` and `T`, released
/// exactly once and not used again afterwards.
unsafe extern "C" fn release_job<F, T>(state: *mut c_void) {
    // Dropping F or T could panic; that must not unwind into the host.
    let _ = catch_unwind(|| {
        // SAFETY: the host releases its reference exactly once.
        drop(unsafe { Arc::from_raw(state as *const Job<F, T>) });
    });
}

/// Future returned by [`spawn_blocking`]; resolves to the job's value.
pub struct JoinHandle<T> {
    handle: *mut c_void,
    shared: Arc<dyn JobResult<T>>,
}

trait JobResult<T>: Send + Sync {
    fn take(&self) -> Option<Result<T, BlockingError>>;
}
impl<F: Send, T: Send> JobResult<T> for Job<F, T> {
    fn take(&self) -> Option<Result<T, BlockingError>> {
        self.result.lock().ok()?.take()
    }
}

// SAFETY: the handle is an exclusively owned host task handle (tokio's JoinHandle, Send).
unsafe impl<T: Send> Send for JoinHandle<T> {}
// SAFETY: `&JoinHandle` exposes nothing.
unsafe impl<T: Send> Sync for JoinHandle<T> {}

impl<T> std::fmt::Debug for JoinHandle<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinHandle").finish_non_exhaustive()
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = Result<T, BlockingError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.handle.is_null() {
            return Poll::Ready(Err(BlockingError("the host could not run the blocking job")));
        }
        let waker = abi::waker::lend(cx.waker());
        // SAFETY: the handle is live; `waker` outlives the call.
        match unsafe { (host().blocking_poll)(self.handle, &waker) } {
            FfiPoll::PENDING => Poll::Pending,
            FfiPoll::READY => Poll::Ready(
                self.shared.take().unwrap_or(Err(BlockingError("the blocking job's result was already taken"))),
            ),
            _ => Poll::Ready(Err(BlockingError("the host's blocking task failed"))),
        }
    }
}

impl<T> Drop for JoinHandle<T> {
    fn drop(&mut self) {
        if !self.handle.is_null() {
            // SAFETY: released exactly once.
            unsafe { (host().blocking_drop)(self.handle) };
        }
    }
}

/// Completes once this build no longer gets new requests: a newer build of the plugin serves
/// them, or the host is shutting down. Requests and upgraded connections already running go
/// on (until the host's drain timeout); a long-lived one (a WebSocket, server-sent events)
/// can use this to end politely and let its client reconnect to the new code.
///
/// Outside the hotswap host (in a unit test), it never completes.
///
/// # Example
///
/// ```
/// # async fn session() {
/// handler_api::superseded().await;
/// // A newer build serves new requests now: tell the client, and end the session.
/// # }
/// ```
pub fn superseded() -> Superseded {
    Superseded { handle: std::ptr::null_mut(), asked: false }
}

/// Future returned by [`superseded`].
#[derive(Debug)]
pub struct Superseded {
    handle: *mut c_void,
    asked: bool,
}

// SAFETY: the handle is an exclusively owned host object (a cancellation future, Send).
unsafe impl Send for Superseded {}
// SAFETY: `&Superseded` exposes nothing; all access goes through `Pin<&mut>`.
unsafe impl Sync for Superseded {}

impl Future for Superseded {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(host) = crate::try_host() else { return Poll::Pending };
        if !self.asked {
            self.asked = true;
            // SAFETY: a plain call into the host's table, with the context it gave us.
            self.handle = unsafe { (host.superseded_new)(host.context) };
        }
        if self.handle.is_null() {
            return Poll::Pending; // the host cannot tell
        }
        let waker = abi::waker::lend(cx.waker());
        // SAFETY: the handle is live; `waker` outlives the call.
        match unsafe { (host.superseded_poll)(self.handle, &waker) } {
            FfiPoll::PENDING => Poll::Pending,
            _ => Poll::Ready(()),
        }
    }
}

impl Drop for Superseded {
    fn drop(&mut self) {
        if let (false, Some(host)) = (self.handle.is_null(), crate::try_host()) {
            // SAFETY: released exactly once.
            unsafe { (host.superseded_drop)(self.handle) };
        }
    }
}

/// Runs `future` in the background, on the host's runtime, on threads of this build: the
/// replacement for `tokio::spawn`, which has no runtime in a plugin. Await the [`Task`] for
/// its output, or drop it to let the future run on alone.
///
/// The future belongs to this build: it runs until it completes, or until the build is
/// unloaded (after a newer one serves and this one's last request has ended) or cut off
/// (its requests still running at the host's drain timeout). Then the host drops it, before
/// your `shutdown` hook, so a background loop needs no stop signal of its own. It does not
/// keep the build loaded: to end a loop earlier, when a newer build takes over, watch
/// [`superseded`].
///
/// # Example
///
/// ```
/// # async fn f() {
/// use std::time::Duration;
/// let refresh = handler_api::spawn(async {
///     handler_api::sleep(Duration::from_millis(10)).await;
///     42
/// });
/// assert_eq!(refresh.await, Ok(42));
/// # }
/// ```
pub fn spawn<F>(future: F) -> Task<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (sender, receiver) = tokio::sync::oneshot::channel();
    let task: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(async move {
        let _ = sender.send(future.await);
    });
    let ffi = crate::upgrade::ffi_future(task);
    let host = host();
    match host.spawn_fn() {
        Some(spawn) => {
            // SAFETY: a plain call into the host's table, with the context it gave us; the
            // future's functions uphold FfiFuture's contract. The host takes the future or
            // releases it (the task then fails).
            let _ = unsafe { spawn(host.context, ffi) };
        }
        None => {
            // A host from before `spawn`: the future is released here, and the task fails.
            // SAFETY: `ffi` is ours, released exactly once.
            unsafe { ((*ffi.vtable).drop)(ffi.state) };
        }
    }
    Task { receiver }
}

/// A future run by [`spawn`]; resolves to its output.
#[derive(Debug)]
pub struct Task<T> {
    receiver: tokio::sync::oneshot::Receiver<T>,
}

/// Why a [`Task`] has no output: it panicked (the panic is logged), or it was dropped
/// unfinished because its build is being unloaded, or the host could not run it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskError;

impl std::fmt::Display for TaskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the spawned task ended without an output (it panicked, or its build is unloading)")
    }
}
impl std::error::Error for TaskError {}

impl<T> Future for Task<T> {
    type Output = Result<T, TaskError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.receiver).poll(cx).map(|r| r.map_err(|_| TaskError))
    }
}

/// Runs `future` for at most `duration`, on the host's timer: the replacement for
/// `tokio::time::timeout`. `Err(Elapsed)` if time ran out first (the future is dropped).
///
/// # Example
///
/// ```
/// # async fn f() {
/// use std::time::Duration;
/// let never = std::future::pending::<()>();
/// assert!(handler_api::timeout(Duration::from_millis(5), never).await.is_err());
/// # }
/// ```
pub async fn timeout<F: Future>(duration: Duration, future: F) -> Result<F::Output, Elapsed> {
    let mut future = std::pin::pin!(future);
    let mut timer = std::pin::pin!(sleep(duration));
    std::future::poll_fn(|cx| {
        if let Poll::Ready(output) = future.as_mut().poll(cx) {
            return Poll::Ready(Ok(output));
        }
        timer.as_mut().poll(cx).map(|()| Err(Elapsed))
    })
    .await
}

/// The error of [`timeout`]: the time ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

impl std::fmt::Display for Elapsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the deadline elapsed")
    }
}
impl std::error::Error for Elapsed {}
