//! Generations: one loaded copy of a plugin, with the threads that run its code.
//!
//! ## Why every generation has its own threads
//!
//! Plugin code that uses `thread_local!` with a destructor (tracing does), or
//! `std::thread::current()`, ties the library to every thread it ran on: glibc keeps the
//! library mapped until those threads exit, or calls into it when they do. tokio's worker
//! threads never exit. So each generation gets its own tokio runtime, built by the host (with
//! a working reactor and timer), and plugin code runs only on that runtime's threads: the
//! connections it serves, the timers and blocking jobs it asks for. When the generation's
//! last request has ended, its runtime is shut down, its threads are joined (running their
//! TLS destructors while the library is still mapped), and only then is the library closed.
//! The server (`serve`) keeps connections on the threads of the generation they are served by
//! and moves them to the new one at a request boundary, so no request pays for a hop between
//! threads.
//!
//! ## Lifecycle
//!
//! `candidate` makes generations. A request holds its generation through an [`InFlight`];
//! `route::Current` says which generation new requests go to. When the last `Arc<Generation>` goes, `Drop`
//! hands what is left to the reaper (`reaper`), which unloads it.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::mem::ManuallyDrop;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use handler_api::abi::{HostApi, PluginDeclaration};

use crate::latch::Latch;
use crate::plugin::loader::{Identity, Library};
use crate::plugin::reaper::{self, Retired};
use crate::plugin::services::PluginContext;
use crate::plugin::stats::GenerationStats;

thread_local! {
    /// The generation whose runtime owns this thread (0: none).
    static THREAD_GENERATION: Cell<u64> = const { Cell::new(0) };
}

/// The id of the generation whose runtime owns the calling thread, or 0.
pub(crate) fn thread_generation() -> u64 {
    THREAD_GENERATION.with(Cell::get)
}

/// Marks the calling thread as one of generation `id`'s (its runtime's `on_thread_start`).
pub(super) fn enter_thread(id: u64) {
    THREAD_GENERATION.with(|g| g.set(id));
}

/// One loaded copy of a plugin and the runtime whose threads run its code.
pub(crate) struct Generation {
    pub(super) id: u64,
    pub(super) name: String,
    pub(super) version: semver::Version,
    pub(super) source: PathBuf,
    /// Which version of the source file was loaded.
    pub(super) identity: Identity,
    /// SHA-256 of the loaded bytes, when a trusted digest list asked for it.
    pub(super) digest: Option<String>,
    pub(super) shadow: PathBuf,
    pub(super) handle: tokio::runtime::Handle,
    pub(super) stats: Arc<GenerationStats>,
    pub(super) superseded: Latch,
    pub(super) aborted: Latch,
    pub(super) initialized: bool,
    pub(super) unload_timeout: Duration,
    /// How long `dlclose` may take: as long as the probe gave the finalisers, at least.
    pub(super) close_timeout: Duration,
    // Taken by `Drop`, which hands them to the reaper. The table and context must outlive
    // every call into the library, so they leave together with it.
    pub(super) library: ManuallyDrop<Library>,
    pub(super) runtime: ManuallyDrop<tokio::runtime::Runtime>,
    pub(super) api: ManuallyDrop<Box<HostApi>>,
    pub(super) context: ManuallyDrop<Box<PluginContext>>,
    /// The threads not the host's that were alive before its library was opened.
    pub(super) foreign_before: BTreeSet<i32>,
    /// Its `export_state` did not return in time once: it is not asked again.
    pub(super) export_stuck: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation")
            .field("id", &self.id)
            .field("plugin", &self.label())
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Generation {
    /// This generation's number, unique in the process, starting at 1.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// `name@version`, as the plugin declares them.
    pub(crate) fn label(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    /// The plugin's declared name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The plugin's declared version.
    pub(crate) fn version(&self) -> &semver::Version {
        &self.version
    }

    /// Its counters: requests by status, streams, bytes sent, how it was unloaded.
    pub(crate) fn stats(&self) -> &Arc<GenerationStats> {
        &self.stats
    }

    /// Its private copy (deleted when it unloads).
    pub(crate) fn shadow(&self) -> &Path {
        &self.shadow
    }

    /// The file it was loaded from.
    pub(crate) fn source(&self) -> &Path {
        &self.source
    }

    /// Which version of the source file was loaded (device, inode, length, modification time).
    pub(crate) fn identity(&self) -> Identity {
        self.identity
    }

    /// SHA-256 of the loaded library, when `--trusted-digests` is in use.
    pub(crate) fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }


    /// The checked declaration; valid while `self` is.
    pub(crate) fn declaration(&self) -> &PluginDeclaration {
        self.library.declaration()
    }

    /// The runtime whose threads run this generation's code.
    pub(crate) fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }

    /// Requests (with their response bodies) in progress on this generation.
    pub(crate) fn in_flight(&self) -> usize {
        self.stats.in_flight()
    }

    /// Raised when a newer generation has become current.
    pub(crate) fn superseded(&self) -> &Latch {
        &self.superseded
    }

    /// Raised when the responses still running here must be cut off (drain timeout).
    pub(crate) fn aborted(&self) -> &Latch {
        &self.aborted
    }

    /// Cuts off what still runs here (at the drain timeout, or past `--max-generations`):
    /// responses and upgraded connections, through [`Generation::aborted`], and the tasks its
    /// plugin spawned, which may hold such a connection (and so this generation).
    pub(crate) fn abort(&self) {
        self.aborted.raise();
        self.context.tasks.cancel();
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        // SAFETY: each field is taken exactly once, here, and never used again.
        let retired = unsafe {
            Retired {
                id: self.id,
                label: self.label(),
                stats: self.stats.clone(),
                shadow: std::mem::take(&mut self.shadow),
                initialized: self.initialized,
                timeout: self.unload_timeout,
                close_timeout: self.close_timeout,
                library: ManuallyDrop::take(&mut self.library),
                runtime: ManuallyDrop::take(&mut self.runtime),
                api: ManuallyDrop::take(&mut self.api),
                context: ManuallyDrop::take(&mut self.context),
                foreign_before: std::mem::take(&mut self.foreign_before),
            }
        };
        // This may run on one of the generation's own threads (the last request ended
        // there), which cannot join itself: the reaper thread does the unloading.
        reaper::retire(retired);
    }
}


/// A request's hold on the generation it was routed to, from then until its response body
/// ends: it keeps the library loaded and counts the request in flight. Whatever holds plugin
/// state for a request (its call, its streaming body) owns the hold, and releases that state
/// before the hold goes.
pub(crate) struct InFlight {
    generation: Arc<Generation>,
    /// Counts the chunks of its response body lent to the connection (see [`LentTally`]);
    /// set only for a streamed body, the only kind that lends.
    lent: Option<Arc<LentTally>>,
}

impl InFlight {
    pub(crate) fn new(generation: Arc<Generation>) -> InFlight {
        generation.stats.request_started();
        InFlight { generation, lent: None }
    }

    /// Counts the chunks its response body lends in `lent`.
    pub(super) fn count_lent_in(&mut self, lent: Arc<LentTally>) {
        self.lent = Some(lent);
    }

    pub(crate) fn generation(&self) -> &Arc<Generation> {
        &self.generation
    }

    pub(crate) fn lent(&self) -> Option<&Arc<LentTally>> {
        self.lent.as_ref()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.generation.stats.request_ended();
    }
}

/// How many response chunks lent by plugins (in their memory, each holding its generation)
/// one connection still holds: in hyper's write queue or HTTP/2 send buffers, after the
/// request that made them may have ended. While any are held, the connection keeps the
/// generations that lent them loaded, so it must be cut off when they are (see `serve`).
#[derive(Debug, Default)]
pub(crate) struct LentTally(std::sync::atomic::AtomicUsize);

impl LentTally {
    /// Chunks lent and not yet released.
    pub(crate) fn held(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Counts one chunk lent, until the returned value is dropped.
    pub(super) fn count(self: &Arc<Self>) -> LentCount {
        self.0.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        LentCount(self.clone())
    }
}

/// One lent chunk, counted in its connection's [`LentTally`] while it lives.
pub(super) struct LentCount(Arc<LentTally>);

impl Drop for LentCount {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}
