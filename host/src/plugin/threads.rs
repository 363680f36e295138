//! Which threads of the process are the host's, which run a generation's code, and which
//! appeared from plugin code.
//!
//! The host registers every thread it starts, by id: its runtime's, each generation's (with
//! the generation's id), the reaper's, the loader's. Any other live thread was started by
//! plugin code, directly or through a crate (a blocking HTTP client, a pool, a runtime of its
//! own), or by a library the host uses (those the host adopts when it starts them, see
//! [`adopt`]). A thread's name proves nothing: a plugin may name its threads anything, and a
//! new thread takes its creator's name.
//!
//! The reaper never closes a library while a thread of its generation, or a thread that
//! appeared since the library was opened and is not the host's, is alive: closing it would pull
//! the code out from under that thread.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::sys;

/// Who started a thread the host knows of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    /// The host itself: plugin code never runs there.
    Host,
    /// The runtime of this generation: its plugin code runs there.
    Generation(u64),
}

fn known() -> MutexGuard<'static, BTreeMap<i32, Owner>> {
    static KNOWN: Mutex<BTreeMap<i32, Owner>> = Mutex::new(BTreeMap::new());
    KNOWN.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Registers the calling thread as `owner`'s, until [`unregister`].
pub(crate) fn register(owner: Owner) {
    known().insert(sys::thread_id(), owner);
}

/// The calling thread is about to exit.
pub(crate) fn unregister() {
    known().remove(&sys::thread_id());
}

/// Runs `f` on a host thread of its own, registered as the host's for its life (unregistered
/// even if `f` panics, so that its id, once reused, is not taken for the host's).
pub(crate) fn host_thread<T>(f: impl FnOnce() -> T) -> T {
    struct Registered;
    impl Drop for Registered {
        fn drop(&mut self) {
            unregister();
        }
    }
    register(Owner::Host);
    let _registered = Registered;
    f()
}

/// The ids of the threads of this process now.
fn live() -> BTreeSet<i32> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return BTreeSet::new() };
    tasks.filter_map(Result::ok).filter_map(|t| t.file_name().to_str()?.parse().ok()).collect()
}

/// Live threads the host did not start.
pub(crate) fn foreign() -> BTreeSet<i32> {
    let known = known();
    live().into_iter().filter(|tid| !known.contains_key(tid)).collect()
}

/// Runs `f`, which starts threads of a library the host uses (a file watcher's), and takes
/// the threads that appeared meanwhile as the host's.
pub(crate) fn adopt<T>(f: impl FnOnce() -> T) -> T {
    let before = foreign();
    let result = f();
    let mut known = known();
    for tid in live().into_iter().filter(|tid| !before.contains(tid)) {
        known.entry(tid).or_insert(Owner::Host);
    }
    result
}

/// The threads that keep generation `id`'s library from being closed: its own still alive,
/// and those that appeared since `before` was taken (when its library was opened) and are not
/// the host's.
pub(crate) fn holding(id: Option<u64>, before: &BTreeSet<i32>) -> Vec<i32> {
    let live = live();
    let known = known();
    live.into_iter()
        .filter(|tid| match known.get(tid) {
            Some(Owner::Generation(owner)) => Some(*owner) == id,
            Some(Owner::Host) => false,
            None => !before.contains(tid),
        })
        .collect()
}

/// Waits up to `timeout` for the threads that hold a library ([`holding`]) to exit; returns
/// those still alive then. Threads that have just exited may linger in `/proc` for a moment:
/// they are waited for too.
pub(crate) fn wait_released(id: Option<u64>, before: &BTreeSet<i32>, timeout: Duration) -> Vec<i32> {
    let started = Instant::now();
    loop {
        let holding = holding(id, before);
        if holding.is_empty() || started.elapsed() >= timeout {
            return holding;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// `tid (name)` for each thread, for a log line.
pub(crate) fn describe(tids: &[i32]) -> String {
    let name = |tid: i32| {
        std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).map(|n| n.trim_end().to_owned()).unwrap_or_default()
    };
    tids.iter().map(|&tid| format!("{tid} ({})", name(tid))).collect::<Vec<_>>().join(", ")
}
