//! Services the host lends every plugin through its table: logging, and error messages from
//! `init`. (Timers and blocking work are handler-api's `tokio_host`, on the generation's
//! runtime: see `table`.)
//!
//! Every `extern "C"` function here is host code called by the plugin. None may unwind (a
//! panic escaping an `extern "C"` function aborts the process), so each body that calls into
//! tokio runs inside `catch_unwind`.

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

use handler_api::abi::FfiStr;

/// Host data behind [`HostApi::context`](handler_api::abi::HostApi::context): who is logging,
/// and the generation's `superseded` latch, for `superseded_new`.
pub(crate) struct PluginContext {
    pub(crate) label: String,
    pub(crate) superseded: tokio_util::sync::CancellationToken,
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
