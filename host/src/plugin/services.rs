//! Services the host lends every plugin through its table: logging, error messages from
//! `init`, timers and blocking work.
//!
//! Every `extern "C"` function here is host code called by the plugin. None may unwind (a
//! panic escaping an `extern "C"` function aborts the process), so each body that calls into
//! tokio runs inside `catch_unwind`.

use std::ffi::c_void;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use handler_api::abi::{self, FfiJob, FfiPoll, FfiStr, FfiWaker};

/// Host data behind [`HostApi::context`](handler_api::abi::HostApi::context): who is logging.
pub(crate) struct PluginContext {
    pub(crate) label: String,
}

/// The host's most verbose enabled level, in the ABI's numbering.
pub(crate) fn max_log_level() -> u32 {
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

/// `HostApi::log`: a log record of the plugin, into the host's log.
///
/// # Safety
/// `context` is the `PluginContext` of the table the plugin was given; `target` and `message` are valid for the call.
pub(crate) unsafe extern "C" fn log(context: *const c_void, level: u32, target: FfiStr, message: FfiStr) {
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

/// `HostApi::error_write`: text for the error of `init` or `ready`.
///
/// # Safety
/// `sink` is the error sink passed to that `init` or `ready` (a `String` of the host); `text` is valid for the call.
pub(crate) unsafe extern "C" fn error_write(sink: *mut c_void, text: FfiStr) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: error sinks are always `&mut String` owned by the caller of init/ready.
        let sink = unsafe { &mut *(sink as *mut String) };
        // SAFETY: the plugin keeps `text` valid for this call.
        sink.push_str(&unsafe { text.to_string_lossy() });
    }));
}

/// `HostApi::sleep_new`: a timer on the generation's runtime (null outside one).
///
/// # Safety
/// None beyond the ABI's: any value of `nanos` is accepted.
pub(crate) unsafe extern "C" fn sleep_new(nanos: u64) -> *mut c_void {
    catch_unwind(|| {
        if tokio::runtime::Handle::try_current().is_err() {
            return std::ptr::null_mut();
        }
        Box::into_raw(Box::new(tokio::time::sleep(Duration::from_nanos(nanos)))) as *mut c_void
    })
    .unwrap_or(std::ptr::null_mut())
}

/// `HostApi::sleep_poll`.
///
/// # Safety
/// `sleep` is a live timer from `sleep_new`; `waker` is valid for the call.
pub(crate) unsafe extern "C" fn sleep_poll(sleep: *mut c_void, waker: *const FfiWaker) -> FfiPoll {
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

/// `HostApi::sleep_drop`.
///
/// # Safety
/// `sleep` is a live timer from `sleep_new`, released exactly once.
pub(crate) unsafe extern "C" fn sleep_drop(sleep: *mut c_void) {
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

/// `HostApi::blocking_spawn`: a job on the generation's blocking pool (null outside its runtime; the job is then released without running).
///
/// # Safety
/// `job` follows `FfiJob`'s contract: `run` at most once, then `release` exactly once.
pub(crate) unsafe extern "C" fn blocking_spawn(job: FfiJob) -> *mut c_void {
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

/// `HostApi::blocking_poll`.
///
/// # Safety
/// `task` is a live handle from `blocking_spawn`; `waker` is valid for the call.
pub(crate) unsafe extern "C" fn blocking_poll(task: *mut c_void, waker: *const FfiWaker) -> FfiPoll {
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

/// `HostApi::blocking_drop`.
///
/// # Safety
/// `task` is a live handle from `blocking_spawn`, released exactly once.
pub(crate) unsafe extern "C" fn blocking_drop(task: *mut c_void) {
    // SAFETY: released exactly once.
    let _ = catch_unwind(|| drop(unsafe { Box::from_raw(task as *mut tokio::task::JoinHandle<()>) }));
}
