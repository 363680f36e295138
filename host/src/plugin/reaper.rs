//! The reaper: unloads generations once nothing can call into them any more.
//!
//! A generation's last `Arc` may go on one of its own threads (the last request ended
//! there), which cannot join itself; so `Drop for Generation` hands what is left of it, a
//! [`Retired`], to this thread. It runs the plugin's shutdown hook, shuts the generation's
//! runtime down and joins its threads (their TLS destructors run while the library is still
//! mapped), closes the library, deletes the shadow copy and checks `/proc/self/maps`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use handler_api::abi::HostApi;

use crate::plugin::services::PluginContext;
use crate::plugin::loader::{Closed, Library};
use crate::plugin::stats::{GenerationStats, Unloaded};
use crate::plugin::threads;

/// The name of every thread of generation `id`, for people (the host tells its threads by
/// id: see `threads`).
pub(crate) fn thread_name(id: u64) -> String {
    format!("hs-gen{id}")
}

/// What is left of a generation once nothing can call into it any more.
pub(crate) struct Retired {
    pub(crate) id: u64,
    pub(crate) label: String,
    pub(crate) stats: Arc<GenerationStats>,
    pub(crate) shadow: PathBuf,
    /// Whether `init` (and `ready`) succeeded: only then may the shutdown hook run.
    pub(crate) initialized: bool,
    /// How long the shutdown hook, and then the threads, may take.
    pub(crate) timeout: Duration,
    /// How long `dlclose` may take before the host gives up (see [`close`]).
    pub(crate) close_timeout: Duration,
    pub(crate) library: Library,
    pub(crate) runtime: tokio::runtime::Runtime,
    pub(crate) api: Box<HostApi>,
    pub(crate) context: Box<PluginContext>,
    /// The threads not the host's that were alive when its library was opened.
    pub(crate) foreign_before: BTreeSet<i32>,
}

/// Hands `retired` to the reaper thread, which unloads it.
pub(crate) fn retire(retired: Retired) {
    reaper().send(Message::Retire(Box::new(retired)));
}

impl Retired {
    /// Shutdown hook, join threads, close, delete, verify.
    fn unload(self) {
        let started = Instant::now();
        let Retired { id, label, stats, shadow, initialized, timeout, close_timeout, library, runtime, api, context, foreign_before } =
            self;
        // The plugin's background tasks end first, dropped on the generation's threads, so that
        // its shutdown hook runs with nothing of its own still running.
        if !context.tasks.stop(timeout) {
            tracing::warn!(generation = id, plugin = %label, "the plugin's spawned tasks were not dropped within {timeout:?}");
        }
        if initialized {
            let shutdown = library.declaration().shutdown;
            let (done_tx, done_rx) = mpsc::channel();
            runtime.spawn_blocking(move || {
                // SAFETY: init succeeded and no request is running any more.
                unsafe { shutdown() };
                let _ = done_tx.send(());
            });
            if done_rx.recv_timeout(timeout).is_err() {
                tracing::warn!(generation = id, plugin = %label, "shutdown hook did not return within {timeout:?}");
            }
        }
        runtime.shutdown_timeout(timeout);
        // Threads still running plugin code: the generation's own (an init or blocking job
        // that never returns), and threads the plugin started itself. Closing the library
        // would pull the code out from under them. (Joined threads may linger in /proc for a
        // moment; they are waited for.)
        let holding = threads::wait_released(Some(id), &foreign_before, timeout);
        let closed = if holding.is_empty() {
            let closed = close(library, id, &label, close_timeout);
            if matches!(closed, Closed::Unmapped | Closed::DataMapped { .. }) {
                // No code of the library is left to call them.
                drop((api, context));
            } else {
                // Code of the library may still run (a destructor it registered): the table
                // and context it may call stay too.
                std::mem::forget((api, context));
            }
            Some(closed)
        } else {
            tracing::warn!(
                generation = id,
                plugin = %label,
                threads = %threads::describe(&holding),
                "threads are still running the old generation's code (its own, or threads its plugin started); \
                 its library stays loaded (leaked): a plugin must stop the threads it starts in its shutdown hook"
            );
            std::mem::forget((library, api, context));
            None
        };
        let how = match &closed {
            None => Unloaded::Leaked,
            Some(Closed::Unmapped) => Unloaded::Unmapped,
            Some(Closed::DataMapped { .. }) => Unloaded::DataMapped,
            Some(Closed::StillMapped | Closed::Failed(_)) => Unloaded::StillMapped,
        };
        // Its path: the file itself goes once nothing maps it.
        let _ = std::fs::remove_file(&shadow);
        // Recorded before it is logged: whoever reads the log line finds it in the status.
        stats.set_unloaded(how);
        UNLOADS[how as usize].fetch_add(1, Ordering::Relaxed);
        match closed {
            None => {}
            Some(Closed::Unmapped) => {
                tracing::info!(generation = id, plugin = %label, elapsed = ?started.elapsed(), "generation unloaded and unmapped");
            }
            Some(Closed::DataMapped { bytes }) => tracing::warn!(
                generation = id,
                plugin = %label,
                "generation unloaded, its code unmapped, but {} of its file stay mapped read-only for good: \
                 a backtrace through its code was symbolized (by the plugin, formatting a captured backtrace, or \
                 by the host, printing a panic with RUST_BACKTRACE set), and std's symbolizer keeps the file it \
                 read the debug information from mapped (in memory and on disk). Leave RUST_LIB_BACKTRACE unset \
                 or 0 (hotswap defaults it to 0), and do not force backtraces in the plugin",
                bytesize::ByteSize::b(bytes).display().iec()
            ),
            Some(closed @ (Closed::StillMapped | Closed::Failed(_))) => {
                if let Closed::Failed(e) = closed {
                    tracing::warn!(generation = id, plugin = %label, "dlclose failed: {e}");
                }
                tracing::warn!(
                    generation = id,
                    plugin = %label,
                    shadow = %shadow.display(),
                    "generation closed but its library is STILL MAPPED (see /proc/self/maps)"
                );
            }
        }
        live_generations().fetch_sub(1, Ordering::SeqCst);
    }
}

/// Closes `library` on a thread of its own, and waits for it up to `timeout`.
///
/// A `dlclose` that does not return (finalisers that hang: the probe ran them once, but a
/// plugin's state can make them hang only after it has served) holds the dynamic loader's
/// lock, and glibc takes that lock whenever a thread first uses a thread-local with a
/// destructor: soon every thread of the host, serving or not, would hang behind it, and the
/// process would look alive while answering nothing. So the host ends at once instead, with a
/// message and a failure status, for the service manager to start it again (the shipped
/// systemd unit has `Restart=on-failure`).
fn close(library: Library, id: u64, label: &str, timeout: Duration) -> Closed {
    let (done_tx, done_rx) = mpsc::channel();
    // Taken by the closing thread; left here if it cannot start.
    let slot = Arc::new(Mutex::new(Some(library)));
    let theirs = slot.clone();
    let closing = std::thread::Builder::new().name("hs-dlclose".into()).spawn(move || {
        threads::host_thread(|| {
            if let Some(library) = theirs.lock().ok().and_then(|mut l| l.take()) {
                let _ = done_tx.send(library.close());
            }
        })
    });
    if let Err(e) = closing {
        tracing::warn!(generation = id, "cannot start a thread to close the library ({e}): closing it on the reaper");
        if let Some(library) = slot.lock().ok().and_then(|mut l| l.take()) {
            return library.close();
        }
    }
    match done_rx.recv_timeout(timeout) {
        Ok(closed) => closed,
        // The closing thread ended without a word (it panicked): what is mapped is unknown.
        Err(mpsc::RecvTimeoutError::Disconnected) => Closed::StillMapped,
        Err(mpsc::RecvTimeoutError::Timeout) => crate::sys::fatal(
            EXIT_LOADER_STUCK,
            &format!(
                "hotswap: fatal: the dlclose of generation {id} ({label}) has not returned after {timeout:?}: its \
                 library's finalisers (destructors) hang, holding the dynamic loader's lock, behind which every \
                 thread of the host would soon wait. Exiting now (status {EXIT_LOADER_STUCK}) so that the service \
                 manager restarts the host; fix the plugin's destructors"
            ),
        ),
    }
}

/// The exit status of a host that ends because a `dlclose` hangs (EX_SOFTWARE).
const EXIT_LOADER_STUCK: i32 = 70;

/// Generations unloaded so far, by outcome (indexed by `Unloaded as usize`).
static UNLOADS: [AtomicU64; Unloaded::ALL.len()] = [const { AtomicU64::new(0) }; Unloaded::ALL.len()];

/// Generations whose unloading ended `how`, so far.
pub(crate) fn unloads(how: Unloaded) -> u64 {
    UNLOADS[how as usize].load(Ordering::Relaxed)
}

/// Generations started and not yet unloaded.
pub(crate) fn live_generations() -> &'static AtomicUsize {
    static LIVE: AtomicUsize = AtomicUsize::new(0);
    &LIVE
}

/// Generations loaded and not yet fully unloaded.
pub(crate) fn resident_generations() -> usize {
    live_generations().load(Ordering::SeqCst)
}

enum Message {
    Retire(Box<Retired>),
    Flush(mpsc::Sender<()>),
}

struct Reaper(Mutex<mpsc::Sender<Message>>);

impl Reaper {
    fn send(&self, message: Message) {
        let sender = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(mpsc::SendError(Message::Retire(r))) = sender.send(message) {
            // The reaper thread is gone (it cannot panic in normal operation). Unload on a
            // thread of its own: this may be one of the generation's threads, which cannot
            // join itself.
            let id = r.id;
            let slot = Arc::new(Mutex::new(Some(r)));
            let theirs = slot.clone();
            let unload = move || threads::host_thread(|| theirs.lock().ok().and_then(|mut r| r.take()).map(|r| r.unload()));
            if let Err(e) = std::thread::Builder::new().name("hs-unload".into()).spawn(unload) {
                tracing::error!(generation = id, "cannot start a thread to unload the generation ({e}); it stays loaded");
                // Dropping it here would close the library under threads that may run it.
                std::mem::forget(slot.lock().ok().and_then(|mut r| r.take()));
            }
        }
    }
}

fn reaper() -> &'static Reaper {
    static REAPER: OnceLock<Reaper> = OnceLock::new();
    REAPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Message>();
        let spawned = std::thread::Builder::new().name("hs-reaper".into()).spawn(move || {
            threads::host_thread(|| {
                for message in rx {
                    match message {
                        Message::Retire(r) => r.unload(),
                        Message::Flush(done) => drop(done.send(())),
                    }
                }
            })
        });
        if let Err(e) = spawned {
            tracing::error!("cannot start the reaper thread ({e}); generations will be unloaded inline");
        }
        Reaper(Mutex::new(tx))
    })
}

/// Waits until every generation has been unloaded, or `timeout` passes. Returns whether all
/// were.
pub(crate) fn wait_all_unloaded(timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let (tx, rx) = mpsc::channel();
        reaper().send(Message::Flush(tx));
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = rx.recv_timeout(left);
        if resident_generations() == 0 {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
