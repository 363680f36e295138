//! Services the host lends every plugin through its table: logging, and error messages from
//! `init`. (Timers and blocking work are handler-api's `tokio_host`, on the generation's
//! runtime: see `table`.)
//!
//! Every `extern "C"` function here is host code called by the plugin. None may unwind (a
//! panic escaping an `extern "C"` function aborts the process), so each body that calls into
//! tokio runs inside `catch_unwind`.

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

use handler_api::abi::{FfiFuture, FfiPoll, FfiStr};
use handler_api::tokio_host::PluginTask;

/// Host data behind [`HostApi::context`](handler_api::abi::HostApi::context): who is logging,
/// the generation's `superseded` latch, for `superseded_new`, and its background tasks.
pub(crate) struct PluginContext {
    pub(crate) label: String,
    pub(crate) superseded: tokio_util::sync::CancellationToken,
    pub(crate) tasks: Tasks,
}

/// The futures a generation's plugin spawned (`handler_api::spawn`): they run on its runtime
/// until they end, until the generation is cut off ([`Tasks::cancel`]), or until it is
/// unloaded, when [`Tasks::stop`] drops them on its threads before the shutdown hook.
pub(crate) struct Tasks {
    runtime: tokio::runtime::Handle,
    tracker: tokio_util::task::TaskTracker,
    stop: tokio_util::sync::CancellationToken,
    /// Held while a task is spawned and while the tracker closes, so that no task starts
    /// after `stop` has seen the last one end.
    gate: std::sync::Mutex<()>,
}

impl Tasks {
    pub(crate) fn new(runtime: tokio::runtime::Handle) -> Tasks {
        Tasks { runtime, tracker: Default::default(), stop: Default::default(), gate: Default::default() }
    }

    /// Drops every task (on the generation's threads), now and as soon as any is spawned
    /// later: what a cut-off generation's plugin left running (a task holding a connection
    /// lent to it, which holds the generation) must not keep it loaded.
    pub(crate) fn cancel(&self) {
        self.stop.cancel();
    }

    /// Drops every task still running (on the generation's threads), and waits up to
    /// `timeout` for the drops to be done. No task can be spawned afterwards. Called on the
    /// reaper's thread, which is not one of the runtime's.
    pub(crate) fn stop(&self, timeout: std::time::Duration) -> bool {
        {
            let _gate = self.gate.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            self.tracker.close();
        }
        self.stop.cancel();
        // Waited for on this thread's own clock: the runtime's timer would not fire if every
        // worker were stuck in a task that never returns.
        let (done, waited) = std::sync::mpsc::channel();
        let tracker = self.tracker.clone();
        drop(self.runtime.spawn(async move {
            tracker.wait().await;
            let _ = done.send(());
        }));
        waited.recv_timeout(timeout).is_ok()
    }
}

/// `HostApi::spawn`: runs a plugin future on its generation's runtime, as a task that the
/// generation drops before it is unloaded.
///
/// # Safety
/// `context` is the `PluginContext` of the table the plugin was given; `future` upholds
/// `FfiFuture`'s contract and passes to the host.
pub(crate) unsafe extern "C" fn spawn(context: *const c_void, future: FfiFuture) -> FfiPoll {
    // SAFETY: handler-api spawns only `Send` futures, and the generation (so the library)
    // outlives its tasks: `Tasks::stop` drops them before it is unloaded.
    let task = unsafe { PluginTask::new(future) };
    // SAFETY: `context` is the generation's PluginContext, alive as long as its table.
    let plugin = unsafe { &*(context as *const PluginContext) };
    let tasks = &plugin.tasks;
    let _gate = tasks.gate.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if tasks.tracker.is_closed() {
        // The generation is being unloaded: nothing may start now. (`task` is released here, on
        // the plugin's calling thread.)
        return FfiPoll::ERROR;
    }
    let stop = tasks.stop.clone();
    let label = plugin.label.clone();
    catch_unwind(AssertUnwindSafe(|| {
        tasks.tracker.spawn_on(
            async move {
                tokio::select! {
                    biased;
                    () = stop.cancelled() => {}
                    done = task => if done == FfiPoll::PANICKED {
                        tracing::error!(target: "plugin", plugin = %label, "a task the plugin spawned panicked");
                    },
                }
            },
            &tasks.runtime,
        );
        FfiPoll::READY
    }))
    .unwrap_or(FfiPoll::PANICKED)
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

/// `HostApi::log_in_spans`: a log record of the plugin from within its `tracing` spans, with
/// their context as the `spans` field.
///
/// # Safety
/// As for [`log`]; `spans` is valid for the call too.
pub(crate) unsafe extern "C" fn log_in_spans(context: *const c_void, level: u32, target: FfiStr, spans: FfiStr, message: FfiStr) {
    let _ = catch_unwind(|| {
        // SAFETY: the plugin keeps the string valid for this call.
        let spans = unsafe { spans.to_string_lossy() };
        if spans.is_empty() {
            // SAFETY: forwarded from the caller.
            return unsafe { log(context, level, target, message) };
        }
        // SAFETY: `context` is the generation's PluginContext, alive as long as its table.
        let plugin = unsafe { &(*(context as *const PluginContext)).label };
        // SAFETY: the plugin keeps both strings valid for this call.
        let (target, message) = unsafe { (target.to_string_lossy(), message.to_string_lossy()) };
        match level {
            1 => tracing::error!(target: "plugin", %plugin, %target, %spans, "{message}"),
            2 => tracing::warn!(target: "plugin", %plugin, %target, %spans, "{message}"),
            3 => tracing::info!(target: "plugin", %plugin, %target, %spans, "{message}"),
            4 => tracing::debug!(target: "plugin", %plugin, %target, %spans, "{message}"),
            _ => tracing::trace!(target: "plugin", %plugin, %target, %spans, "{message}"),
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
