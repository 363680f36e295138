//! The reaper: unloads generations once nothing can call into them any more.
//!
//! A generation's last `Arc` may go on one of its own threads (the last request ended
//! there), which cannot join itself; so `Drop for Generation` hands what is left of it, a
//! [`Retired`], to this thread. It runs the plugin's shutdown hook, shuts the generation's
//! runtime down and joins its threads (their TLS destructors run while the library is still
//! mapped), closes the library, deletes the shadow copy and checks `/proc/self/maps`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use handler_api::abi::HostApi;

use crate::plugin::services::PluginContext;
use crate::plugin::loader::{self, Library};
use crate::plugin::stats::{GenerationStats, Unloaded};

/// The name of every thread of generation `id` (also how `/proc` finds stragglers).
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
    pub(crate) library: Library,
    pub(crate) runtime: tokio::runtime::Runtime,
    pub(crate) api: Box<HostApi>,
    pub(crate) context: Box<PluginContext>,
}

/// Hands `retired` to the reaper thread, which unloads it.
pub(crate) fn retire(retired: Retired) {
    reaper().send(Message::Retire(Box::new(retired)));
}

impl Retired {
    /// Shutdown hook, join threads, close, delete, verify.
    fn unload(self) {
        let started = Instant::now();
        let Retired { id, label, stats, shadow, initialized, timeout, library, runtime, api, context } = self;
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
        let joining = Instant::now();
        runtime.shutdown_timeout(timeout);
        // A joined thread can linger in /proc for a moment while the kernel finishes its exit
        // (pthread_join returns when the tid is cleared, before the task is reaped): wait for
        // those. A thread still there after the timeout is stuck in plugin code.
        let mut stragglers = live_threads(&thread_name(id));
        while stragglers > 0 && joining.elapsed() < timeout {
            std::thread::sleep(Duration::from_millis(2));
            stragglers = live_threads(&thread_name(id));
        }
        if stragglers > 0 {
            // Code of the library is still running (an init or blocking job that never
            // returns): closing it would pull the code out from under that thread.
            tracing::warn!(
                generation = id,
                plugin = %label,
                threads = stragglers,
                "threads of the old generation are still running plugin code; its library stays loaded (leaked)"
            );
            std::mem::forget((library, api, context));
            LEAKED.fetch_add(1, Ordering::Relaxed);
        } else {
            if let Err(e) = library.close() {
                tracing::warn!(generation = id, plugin = %label, "dlclose failed: {e}");
            }
            drop((api, context));
        }
        let _ = std::fs::remove_file(&shadow);
        let mapped = loader::is_mapped(&shadow);
        stats.set_unloaded(match (stragglers > 0, mapped) {
            (true, _) => Unloaded::Leaked,
            (false, true) => Unloaded::StillMapped,
            (false, false) => Unloaded::Unmapped,
        });
        if mapped {
            STILL_MAPPED.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                generation = id,
                plugin = %label,
                shadow = %shadow.display(),
                "generation closed but its library is STILL MAPPED (see /proc/self/maps)"
            );
        } else if stragglers == 0 {
            UNMAPPED.fetch_add(1, Ordering::Relaxed);
            tracing::info!(generation = id, plugin = %label, elapsed = ?started.elapsed(), "generation unloaded and unmapped");
        }
        live_generations().fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts threads of this process named `name` (Linux `comm`, at most 15 bytes).
fn live_threads(name: &str) -> usize {
    let name = &name.as_bytes()[..name.len().min(15)];
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0 };
    tasks
        .filter_map(Result::ok)
        .filter(|t| std::fs::read(t.path().join("comm")).is_ok_and(|c| c.strip_suffix(b"\n").unwrap_or(&c) == name))
        .count()
}

static UNMAPPED: AtomicU64 = AtomicU64::new(0);
static STILL_MAPPED: AtomicU64 = AtomicU64::new(0);
static LEAKED: AtomicU64 = AtomicU64::new(0);

/// Unload outcomes so far: (unmapped, still mapped, leaked because threads were stuck).
pub(crate) fn unload_counts() -> (u64, u64, u64) {
    (UNMAPPED.load(Ordering::Relaxed), STILL_MAPPED.load(Ordering::Relaxed), LEAKED.load(Ordering::Relaxed))
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
            let unload = move || theirs.lock().ok().and_then(|mut r| r.take()).map(|r| r.unload());
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
            for message in rx {
                match message {
                    Message::Retire(r) => r.unload(),
                    Message::Flush(done) => drop(done.send(())),
                }
            }
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
