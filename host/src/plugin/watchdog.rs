//! Notices a generation whose threads are all stuck in plugin code, and says so.
//!
//! A handler that blocks its thread (`std::thread::sleep`, blocking I/O, a lock held across a
//! long wait, a loop that never yields) holds one of its generation's worker threads; a few of
//! them hold them all, and then nothing of that generation runs: not its other requests, not
//! its timers, not even the response timeout that would answer them. From outside, requests
//! just hang. So a thread of the host's own sends each generation a probe, an empty task, once
//! a second; a probe that has not run within [`STALL`] means that every worker thread is
//! busy and none yields. That is logged once, with what to do, and counted; and again when
//! the generation runs tasks again.
//!
//! A probe is host code, and holds nothing of its generation: not the generation (which
//! would keep it loaded), only a counter.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use crate::plugin::generation::Generation;
use crate::plugin::threads;

/// How long a probe may wait for a worker thread before the generation counts as stalled:
/// far longer than a busy but healthy runtime takes to pick up a task.
pub(crate) const STALL: Duration = Duration::from_secs(5);

/// How often each generation is probed.
const EVERY: Duration = Duration::from_secs(1);

/// Stalls seen since the process started, for the metrics.
static STALLS: AtomicU64 = AtomicU64::new(0);

/// Stalls seen since the process started.
pub(crate) fn stalls() -> u64 {
    STALLS.load(Ordering::Relaxed)
}

/// One watched generation.
struct Watched {
    id: u64,
    generation: Weak<Generation>,
    /// The last probe that ran (probes are numbered from 1).
    answered: Arc<AtomicU64>,
    /// The last probe sent, and when.
    sent: u64,
    sent_at: Instant,
    /// When the generation was found stalled, while it is.
    stalled: Option<Instant>,
}

static WATCHED: Mutex<Vec<Watched>> = Mutex::new(Vec::new());

/// Whether the watchdog's thread runs: generations are watched only then.
static RUNNING: AtomicBool = AtomicBool::new(false);

/// Starts the watchdog's thread, for the life of the process. Called once at start-up,
/// before any plugin library is opened: a thread started later would be taken for one of
/// the plugin's, which keeps its library from unloading (see `threads::holding`).
pub(crate) fn start() {
    let started = std::thread::Builder::new().name("hotswap-watchdog".into()).spawn(|| threads::host_thread(run));
    match started {
        Ok(_) => RUNNING.store(true, Ordering::Release),
        Err(e) => tracing::warn!("cannot start the watchdog thread ({e}): a generation whose threads are all blocked will not be reported"),
    }
}

/// Watches `generation` from now on, until it is gone; returns it.
pub(crate) fn watched(generation: Arc<Generation>) -> Arc<Generation> {
    if RUNNING.load(Ordering::Acquire) {
        WATCHED.lock().unwrap_or_else(PoisonError::into_inner).push(Watched {
            id: generation.id(),
            generation: Arc::downgrade(&generation),
            answered: Arc::default(),
            sent: 0,
            sent_at: Instant::now(),
            stalled: None,
        });
    }
    generation
}

/// How long generation `id` has been blocked, if it is (see the module's docs): from the
/// probe that did not run, so up to a second early.
pub(crate) fn blocked_for(id: u64) -> Option<Duration> {
    let watched = WATCHED.lock().unwrap_or_else(PoisonError::into_inner);
    watched.iter().find(|w| w.id == id)?.stalled.map(|since| since.elapsed())
}

/// What a check found, logged once the list is let go.
enum Found {
    Stalled { id: u64, plugin: String, in_flight: usize },
    Recovered { id: u64, plugin: String, after: Duration },
}

fn run() {
    let mut last = Instant::now();
    loop {
        std::thread::sleep(EVERY);
        // Asleep much longer than asked (the process was stopped, the machine suspended): the
        // probes waited for this thread, not for the generations' workers.
        let overslept = last.elapsed() > 2 * EVERY;
        last = Instant::now();
        let found = check_all(overslept);
        for found in found {
            match found {
                Found::Stalled { id, plugin, in_flight } => tracing::warn!(
                    generation = id, %plugin, in_flight,
                    "the generation has run no task for {}s: all its worker threads are busy in plugin code that does \
                     not yield (a blocking call in async code, such as std::thread::sleep, blocking I/O or a lock held \
                     across a long wait, or a loop). Its requests wait, and no timeout can answer them, until a thread \
                     lets go. Move blocking work to handler_api::spawn_blocking; --workers sets how many threads a \
                     generation has",
                    STALL.as_secs()
                ),
                Found::Recovered { id, plugin, after } => tracing::info!(
                    generation = id, %plugin,
                    "the generation's threads run tasks again, after about {}s blocked", after.as_secs().max(1)
                ),
            }
        }
    }
}

fn check_all(overslept: bool) -> Vec<Found> {
    let mut found = Vec::new();
    let mut watched = WATCHED.lock().unwrap_or_else(PoisonError::into_inner);
    watched.retain_mut(|w| {
        let Some(generation) = w.generation.upgrade() else { return false };
        if overslept {
            w.sent_at = Instant::now();
        }
        found.extend(check(w, &generation));
        true
    });
    found
}

fn check(w: &mut Watched, generation: &Generation) -> Option<Found> {
    let now = Instant::now();
    if w.answered.load(Ordering::Acquire) == w.sent {
        let recovered = w.stalled.take().map(|since| Found::Recovered { id: w.id, plugin: generation.label(), after: since.elapsed() });
        w.sent += 1;
        w.sent_at = now;
        let (probe, answered) = (w.sent, w.answered.clone());
        // A runtime shutting down drops the task unrun; its generation is gone by then.
        drop(generation.handle().spawn(async move { answered.store(probe, Ordering::Release) }));
        return recovered;
    }
    if w.stalled.is_none() && now.duration_since(w.sent_at) >= STALL {
        w.stalled = Some(w.sent_at);
        STALLS.fetch_add(1, Ordering::Relaxed);
        return Some(Found::Stalled { id: w.id, plugin: generation.label(), in_flight: generation.in_flight() });
    }
    None
}
