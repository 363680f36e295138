//! Timers and blocking work on tokio: the services any host built on tokio lends a plugin
//! through its table ([`HostApi`](crate::abi::HostApi)). The hotswap host lends these, on each
//! generation's own runtime, and so does the in-process host of the `testing` feature: one
//! implementation for both. Available with the `tokio-host` feature; a plugin does not need it.
//!
//! Each runs on the tokio runtime of the calling thread, and none may unwind (a panic escaping
//! an `extern "C"` function aborts the process): each that calls into tokio or allocates runs
//! inside `catch_unwind`.

use std::cell::RefCell;
use std::ffi::c_void;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::ptr;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::abi::{self, FfiJob, FfiPoll, FfiWaker};

thread_local! {
    /// A runtime lent to a thread that is not one of its own: the in-process test host runs
    /// each request on a thread outside tokio, as hotswap runs plugin code outside the
    /// plugin's copy of tokio, and lends it the test's runtime for these services.
    static LENT: RefCell<Option<tokio::runtime::Handle>> = const { RefCell::new(None) };
}

/// The runtime these services use on this thread: the one it runs in, or the one lent to it.
pub(crate) fn runtime() -> Option<tokio::runtime::Handle> {
    tokio::runtime::Handle::try_current().ok().or_else(|| LENT.try_with(|lent| lent.borrow().clone()).ok().flatten())
}

/// Lends `runtime` to this thread until the guard drops (see [`LENT`]).
#[cfg(feature = "testing")]
pub(crate) fn lend(runtime: Option<tokio::runtime::Handle>) -> impl Drop {
    struct Lent;
    impl Drop for Lent {
        fn drop(&mut self) {
            let _ = LENT.try_with(|lent| lent.borrow_mut().take());
        }
    }
    LENT.with(|lent| *lent.borrow_mut() = runtime);
    Lent
}

/// Starts a tokio timer on the current runtime; null outside a runtime (or one without a time
/// driver).
pub extern "C" fn sleep_new(nanos: u64) -> *mut c_void {
    catch_unwind(|| {
        let Some(runtime) = runtime() else { return ptr::null_mut() };
        let _entered = runtime.enter(); // the timer's driver: that runtime's
        // Boxed so that it never moves: `sleep_poll` pins it in place.
        Box::into_raw(Box::new(tokio::time::sleep(Duration::from_nanos(nanos)))) as *mut c_void
    })
    .unwrap_or(ptr::null_mut())
}

/// Polls a timer from [`sleep_new`].
///
/// A timer that cannot be polled (tokio panics once its runtime has started shutting down)
/// stays `PENDING`, and is never woken: its task is about to be dropped with the runtime.
/// Reported as elapsed, it would let a plugin's throttled loop (`loop { sleep(d).await; .. }`)
/// run flat out, each sleep ready at once, while its generation unloads.
///
/// # Safety
/// `sleep` must come from [`sleep_new`], not yet dropped, and not be polled concurrently;
/// `waker` must be valid for this call.
pub unsafe extern "C" fn sleep_poll(sleep: *mut c_void, waker: *const FfiWaker) -> FfiPoll {
    catch_unwind(|| {
        // SAFETY: `sleep` is a live boxed `Sleep` from `sleep_new`, ours alone during this call;
        // it never moves out of its box until `sleep_drop`, so pinning it in place is sound.
        let sleep = unsafe { Pin::new_unchecked(&mut *(sleep as *mut tokio::time::Sleep)) };
        // SAFETY: the caller keeps `waker` valid for this call.
        let waker = unsafe { abi::waker::borrow(waker) };
        match sleep.poll(&mut Context::from_waker(&waker)) {
            Poll::Ready(()) => FfiPoll::READY,
            Poll::Pending => FfiPoll::PENDING,
        }
    })
    .unwrap_or(FfiPoll::PENDING)
}

/// Releases a timer from [`sleep_new`].
///
/// # Safety
/// `sleep` must come from [`sleep_new`] and not be used again.
pub unsafe extern "C" fn sleep_drop(sleep: *mut c_void) {
    // SAFETY: a box from `sleep_new`, released exactly once (the caller's promise).
    let _ = catch_unwind(|| drop(unsafe { Box::from_raw(sleep as *mut tokio::time::Sleep) }));
}

/// A job handed over through [`blocking_spawn`]; its `release` runs when this is dropped,
/// whether or not the job ran.
pub(crate) struct Job(pub(crate) FfiJob);

// SAFETY: handler-api only builds jobs from `Send` closures and results (`spawn_blocking`'s
// bounds), and `FfiJob`'s contract allows `run` and `release` on any thread.
unsafe impl Send for Job {}

impl Drop for Job {
    fn drop(&mut self) {
        // SAFETY: FfiJob's contract: release exactly once, after `run` if it ran. A `Job` is
        // dropped once, and `run` (in `blocking_spawn`) takes it by reference before that.
        unsafe { (self.0.release)(self.0.state) };
    }
}

/// Runs `job` on the current runtime's blocking pool; null outside a runtime (the job is then
/// released without running).
///
/// # Safety
/// `job` must uphold [`FfiJob`]'s contract: `run` and `release` callable once each, from any
/// thread.
pub unsafe extern "C" fn blocking_spawn(job: FfiJob) -> *mut c_void {
    let job = Job(job);
    catch_unwind(AssertUnwindSafe(move || {
        let Some(runtime) = runtime() else {
            return ptr::null_mut(); // `job` drops here: released without running
        };
        let task = runtime.spawn_blocking(move || {
            let job = job; // capture the whole `Job` (Send), not its raw fields
            // SAFETY: run at most once, before `release` (which runs when `job` drops).
            unsafe { (job.0.run)(job.0.state) };
        });
        Box::into_raw(Box::new(task)) as *mut c_void
    }))
    .unwrap_or(ptr::null_mut())
}

/// Polls a task from [`blocking_spawn`]: `READY` once the job's `run` has returned.
///
/// # Safety
/// `task` must come from [`blocking_spawn`], not yet dropped, and not be polled concurrently;
/// `waker` must be valid for this call.
pub unsafe extern "C" fn blocking_poll(task: *mut c_void, waker: *const FfiWaker) -> FfiPoll {
    catch_unwind(|| {
        // SAFETY: `task` is a live boxed `JoinHandle` from `blocking_spawn`, ours alone during
        // this call.
        let task = unsafe { &mut *(task as *mut tokio::task::JoinHandle<()>) };
        // SAFETY: the caller keeps `waker` valid for this call.
        let waker = unsafe { abi::waker::borrow(waker) };
        match Pin::new(task).poll(&mut Context::from_waker(&waker)) {
            Poll::Ready(Ok(())) => FfiPoll::READY,
            Poll::Ready(Err(_)) => FfiPoll::ERROR,
            Poll::Pending => FfiPoll::PENDING,
        }
    })
    .unwrap_or(FfiPoll::ERROR)
}

/// Forgets a task from [`blocking_spawn`]; the job itself runs to completion.
///
/// # Safety
/// `task` must come from [`blocking_spawn`] and not be used again.
pub unsafe extern "C" fn blocking_drop(task: *mut c_void) {
    // SAFETY: a box from `blocking_spawn`, released exactly once (the caller's promise).
    let _ = catch_unwind(|| drop(unsafe { Box::from_raw(task as *mut tokio::task::JoinHandle<()>) }));
}

/// A plugin's [`abi::FfiFuture`] as a Rust future: polled through its vtable, released when
/// dropped (on the dropping thread). Its output is the plugin's last poll code: `READY`, or
/// `PANICKED` or `ERROR` when it ended otherwise. Runs the tasks of `HostApi::spawn`, in the
/// hotswap host and in the in-process one.
pub struct PluginTask(abi::FfiFuture);

impl PluginTask {
    /// Takes ownership of `future`.
    ///
    /// # Safety
    /// `future` must uphold [`abi::FfiFuture`]'s contract (a live state, a vtable valid until
    /// it is released), its state must be `Send` (handler-api's `spawn` requires it), and its
    /// code must stay loaded until this value is dropped.
    pub unsafe fn new(future: abi::FfiFuture) -> PluginTask {
        PluginTask(future)
    }
}

// SAFETY: `new`'s caller promises a `Send` state, which this value owns alone.
unsafe impl Send for PluginTask {}

impl Future for PluginTask {
    type Output = FfiPoll;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<FfiPoll> {
        let waker = abi::waker::lend(cx.waker());
        // SAFETY: the state is live until drop and its code loaded (`new`'s contract); `waker`
        // outlives the call.
        match unsafe { ((*self.0.vtable).poll)(self.0.state, &waker) } {
            FfiPoll::PENDING => Poll::Pending,
            done => Poll::Ready(done),
        }
    }
}

impl Drop for PluginTask {
    fn drop(&mut self) {
        // SAFETY: released exactly once, here, while its code is loaded (`new`'s contract).
        unsafe { ((*self.0.vtable).drop)(self.0.state) };
    }
}

/// What a poll of an upgraded connection's byte stream means across the ABI: `READY` with
/// `done` given the value, `PENDING`, or `ERROR` for an I/O error (which the caller may log
/// first).
pub fn io_outcome<T>(polled: std::task::Poll<std::io::Result<T>>, done: impl FnOnce(T)) -> FfiPoll {
    match polled {
        std::task::Poll::Pending => FfiPoll::PENDING,
        std::task::Poll::Ready(Ok(value)) => {
            done(value);
            FfiPoll::READY
        }
        std::task::Poll::Ready(Err(_)) => FfiPoll::ERROR,
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap()
    }

    #[test]
    fn a_timer_whose_runtime_shut_down_does_not_look_elapsed() {
        let runtime = runtime();
        let sleep = {
            let _inside = runtime.enter();
            sleep_new(1_000_000)
        };
        assert!(!sleep.is_null());
        drop(runtime); // tokio panics when a timer of a shut-down runtime is polled
        let waker = abi::waker::lend(Waker::noop());
        // SAFETY: a live timer from `sleep_new`; `waker` outlives the calls.
        unsafe {
            assert_eq!(sleep_poll(sleep, &waker), FfiPoll::PENDING);
            assert_eq!(sleep_poll(sleep, &waker), FfiPoll::PENDING, "a second poll fails the same way");
            sleep_drop(sleep);
        }
    }

    /// A plugin's throttled loop, polled while its generation's runtime shuts down (the
    /// runtime's context still current): it must wait, not run through its sleeps.
    #[cfg(feature = "testing")]
    #[test]
    fn a_throttled_loop_does_not_spin_once_the_runtime_shuts_down() {
        crate::testing::install();
        let runtime = runtime();
        let handle = runtime.handle().clone();
        drop(runtime);
        let _inside = handle.enter();
        let mut ticks = 0;
        let mut throttled = Box::pin(async {
            for _ in 0..1000 {
                crate::sleep(Duration::from_millis(1)).await;
                ticks += 1;
            }
        });
        let polled = throttled.as_mut().poll(&mut Context::from_waker(Waker::noop()));
        assert!(polled.is_pending(), "the loop ran through all its sleeps at once");
        drop(throttled);
        assert_eq!(ticks, 0);
    }
}
