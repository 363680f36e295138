//! Handing state from one build to the next at a swap, as Erlang's `code_change` does.
//!
//! A plugin keeps what must outlive its build (a counter, a cache worth keeping warm, sessions)
//! and gives `export_handler!` two functions:
//!
//! ```
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use handler_api::state::{Exported, Previous};
//! use handler_api::{export_handler, IntoResponse, Request, Response};
//!
//! static VISITS: AtomicU64 = AtomicU64::new(0);
//!
//! async fn app(_req: Request) -> Response {
//!     format!("visit {}\n", VISITS.fetch_add(1, Ordering::Relaxed) + 1).into_response()
//! }
//!
//! /// Schema 1: the count, 8 bytes little-endian.
//! fn export_state() -> Exported {
//!     Exported::new(1, VISITS.load(Ordering::Relaxed).to_le_bytes().to_vec())
//! }
//!
//! fn import_state(previous: Previous<'_>) -> Result<(), String> {
//!     match (previous.name(), previous.schema()) {
//!         ("visits", 1) => {
//!             let bytes = previous.bytes().try_into().map_err(|_| "schema 1 is 8 bytes")?;
//!             VISITS.store(u64::from_le_bytes(bytes), Ordering::Relaxed);
//!             Ok(())
//!         }
//!         // Another application's state, or a schema this build does not know (a
//!         // rollback to an older build): start afresh.
//!         _ => Ok(()),
//!     }
//! }
//!
//! export_handler!(name: "visits", version: "1.0.0", handler: app, state: (export_state, import_state));
//! ```
//!
//! # The contract
//!
//! - When a new build is about to start (a swap, or a canary), the host calls the serving
//!   build's `export_state` on one of its threads, then the new build's `import_state`, on one
//!   of the new build's threads, **before its `init`**: what `init` (or the function that builds
//!   an axum `Router`) does can rely on the imported state.
//! - An `Err` (or a panic) from `import_state` refuses the new build, with the message, and the
//!   serving build goes on as if nothing happened. Return `Err` only when starting afresh
//!   would be wrong; for state you cannot read (another application's, given its name, or a
//!   schema you do not know, as after a rollback to an older build), start afresh (`Ok`). A
//!   rollback or a pin whose build refuses the state is started once more without it (the
//!   log says so): the way back never depends on old code reading new state.
//! - The serving build goes on serving between its export and the swap, and its requests in
//!   progress finish on it afterwards: **writes it makes after the export are not carried**.
//!   For a canary that is the whole canary window: the canary takes the state when it
//!   starts, and what the serving build records while the canary runs (most requests) is not
//!   handed over again at the promotion. Keep in the handoff what may lose a while of writes
//!   (counters, caches), and what may not in a store of its own (a database).
//! - `export_state` runs beside requests: it must take what it exports consistently (an atomic,
//!   a lock), and be quick: it has `--init-timeout`, as `import_state`, `init` and `ready`
//!   each have. An export that fails, panics or times out hands nothing (the host logs it), and
//!   `import_state` is not called.
//! - `import_state` may use handler-api and log with `tracing`: the host's table is set up
//!   for it, as for `init`. (Records of the `log` crate reach the host only from the end of
//!   `init`, as the crate docs say.)
//! - The bytes are the plugin's own format, numbered by `schema`: nothing is serialised for
//!   you, so that no format (serde, bincode, …) is imposed.
//! - A build without the pair starts afresh, and the build before it exports nothing. The
//!   first build, and one started by a new host process after `hotswap upgrade`, import
//!   nothing.

use core::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::abi::{FfiPoll, FfiPreviousState, FfiState, FfiStr, HostApi};

/// The state a build hands to the next: bytes in a format of its own, numbered by `schema`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exported {
    schema: u32,
    bytes: Vec<u8>,
}

impl Exported {
    /// `bytes`, whose format the plugin numbers `schema`.
    pub fn new(schema: u32, bytes: Vec<u8>) -> Exported {
        Exported { schema, bytes }
    }
}

/// The state the previous build handed over, for the length of `import_state`.
#[derive(Debug, Clone, Copy)]
pub struct Previous<'a> {
    name: &'a str,
    version: &'a str,
    schema: u32,
    bytes: &'a [u8],
}

impl<'a> Previous<'a> {
    /// Made by hand, to test an `import_state` (the host makes it otherwise).
    pub fn new(name: &'a str, version: &'a str, schema: u32, bytes: &'a [u8]) -> Previous<'a> {
        Previous { name, version, schema, bytes }
    }

    /// The previous build's declared name (`export_handler!`'s `name`).
    pub fn name(&self) -> &'a str {
        self.name
    }

    /// The previous build's declared version.
    pub fn version(&self) -> &'a str {
        self.version
    }

    /// The schema the previous build gave its state.
    pub fn schema(&self) -> u32 {
        self.schema
    }

    /// The state's bytes.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }
}

/// A declared name or version as text (the host checked that they are UTF-8).
fn utf8(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap_or("")
}

/// `export` of the state declaration: the author's `export_state`, its bytes boxed until
/// `release`.
///
/// # Safety
/// `out` must be valid for writing.
pub unsafe fn export(out: *mut FfiState, export_state: fn() -> Exported) -> FfiPoll {
    match catch_unwind(export_state) {
        Ok(Exported { schema, bytes }) => {
            let bytes = Box::new(bytes);
            let view = FfiStr::new(&bytes);
            // SAFETY: the caller's out-parameter; the bytes stay boxed until `release`.
            unsafe { out.write(FfiState { schema, bytes: view, handle: Box::into_raw(bytes) as *mut c_void }) };
            FfiPoll::READY
        }
        Err(_) => FfiPoll::PANICKED,
    }
}

/// `release` of the state declaration.
///
/// # Safety
/// `state` must be what `export` wrote, released once.
pub unsafe fn release(state: *mut FfiState) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the handle is the box `export` made, given back once.
        drop(unsafe { Box::from_raw((*state).handle as *mut Vec<u8>) });
    }));
}

/// `import` of the state declaration: the author's `import_state`, its error written to the
/// host's sink.
///
/// # Safety
/// `host` must point at the host's table and `previous` at a valid previous state, both for
/// the call; `sink` must be the host's error sink for the call.
pub unsafe fn import<E: std::fmt::Display>(
    host: *const HostApi,
    previous: *const FfiPreviousState,
    sink: *mut c_void,
    import_state: fn(Previous<'_>) -> Result<(), E>,
) -> FfiPoll {
    // The table, panic hook and `tracing` subscriber, as `init` sets them up: `import_state`
    // runs first, and may log or use handler-api.
    // SAFETY: the host's table, valid until `shutdown` (the caller).
    let attached = unsafe { crate::export::attach(host, sink) };
    if attached != FfiPoll::READY {
        return attached;
    }
    let host = crate::host(); // recorded by `attach`
    // SAFETY: the caller's pointer, valid for the call.
    let previous = unsafe { &*previous };
    let write = |text: &str| {
        // SAFETY: `sink` is the host's sink for this call; `text` outlives it.
        unsafe { (host.error_write)(sink, FfiStr::new(text.as_bytes())) };
    };
    // SAFETY: the host's strings, valid for the call.
    let (name, version, bytes) = unsafe { (previous.name.as_bytes(), previous.version.as_bytes(), previous.bytes.as_bytes()) };
    let previous = Previous { name: utf8(name), version: utf8(version), schema: previous.schema, bytes };
    match catch_unwind(AssertUnwindSafe(|| import_state(previous).err().map(|e| e.to_string()))) {
        Ok(None) => FfiPoll::READY,
        Ok(Some(error)) => {
            write(&error);
            FfiPoll::ERROR
        }
        Err(payload) => {
            write(&format!("panicked: {}", crate::export::panic_message(&*payload)));
            FfiPoll::PANICKED
        }
    }
}
