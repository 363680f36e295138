//! The service table lent to each generation: every host function the ABI names, from
//! `services`, `request`, `upgrade`, and handler-api's `tokio_host`.

use std::ffi::c_void;

use handler_api::abi::{self, HostApi};

use crate::plugin::request::{body_drop, body_poll, body_trailers};
use crate::plugin::services::{error_write, log, log_in_spans, spawn, PluginContext};
use crate::plugin::upgrade::{
    io_drop, io_poll_flush, io_poll_read, io_poll_shutdown, io_poll_write, superseded_drop, superseded_new, superseded_poll,
};
// Timers and blocking work on the generation's runtime: the one implementation handler-api
// has for every host on tokio (the in-process test host too).
use handler_api::tokio_host::{blocking_drop, blocking_poll, blocking_spawn, sleep_drop, sleep_new, sleep_poll};

/// Builds the service table lent to one generation; `context` must outlive it.
pub(crate) fn host_api(context: *const PluginContext, max_log_level: u32) -> HostApi {
    HostApi {
        size: std::mem::size_of::<HostApi>(),
        abi_version: abi::ABI_VERSION,
        max_log_level,
        context: context as *const c_void,
        log,
        error_write,
        body_poll,
        body_trailers,
        body_drop,
        io_poll_read,
        io_poll_write,
        io_poll_flush,
        io_poll_shutdown,
        io_drop,
        superseded_new,
        superseded_poll,
        superseded_drop,
        sleep_new,
        sleep_poll,
        sleep_drop,
        blocking_spawn,
        blocking_poll,
        blocking_drop,
        spawn,
        log_in_spans,
    }
}
