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
//!
//! Threads started from a generation's threads are that generation's: the host defines
//! `pthread_create` (exported from its binary, see build.rs), which every plugin's calls reach
//! before libc's, and which notes who started the thread. A pool a newer build starts then
//! does not keep an older build loaded. A thread started elsewhere (by a library's
//! initialisers, on the host's loader thread) stays unattributed, and holds every library
//! opened before it appeared.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{c_int, c_void};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
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

/// The signature of `pthread_create`'s start routine.
type StartRoutine = extern "C" fn(*mut c_void) -> *mut c_void;
type PthreadCreate = unsafe extern "C" fn(*mut libc::pthread_t, *const libc::pthread_attr_t, StartRoutine, *mut c_void) -> c_int;

/// What a thread started from a generation's thread runs first.
struct Start {
    routine: StartRoutine,
    arg: *mut c_void,
    generation: u64,
}

/// libc's `pthread_create`, which the host's own wraps.
fn libc_pthread_create() -> Option<PthreadCreate> {
    static NEXT: OnceLock<Option<PthreadCreate>> = OnceLock::new();
    *NEXT.get_or_init(|| {
        // SAFETY: the name is a valid C string; RTLD_NEXT finds the definition after this
        // binary's own, libc's, whose type is `PthreadCreate`.
        let found = unsafe { libc::dlsym(libc::RTLD_NEXT, c"pthread_create".as_ptr()) };
        // SAFETY: a non-null result is libc's pthread_create (see above).
        (!found.is_null()).then(|| unsafe { std::mem::transmute::<*mut c_void, PthreadCreate>(found) })
    })
}

/// Every `pthread_create` of the process, the plugins' included (no crate does this: it must
/// be this binary's symbol). It starts the thread with libc's and, when the caller is one of a
/// generation's threads, registers the new one as that generation's before it runs anything.
///
/// # Safety
/// As libc's `pthread_create`.
#[no_mangle]
#[allow(unreachable_pub, reason = "called by its symbol, from C")]
pub unsafe extern "C" fn pthread_create(
    thread: *mut libc::pthread_t,
    attr: *const libc::pthread_attr_t,
    routine: StartRoutine,
    arg: *mut c_void,
) -> c_int {
    let Some(create) = libc_pthread_create() else { return libc::EAGAIN };
    let creator = known().get(&sys::thread_id()).copied();
    let Some(Owner::Generation(generation)) = creator else {
        // SAFETY: the caller's arguments, as libc's contract asks.
        return unsafe { create(thread, attr, routine, arg) };
    };
    let start = Box::into_raw(Box::new(Start { routine, arg, generation }));
    // SAFETY: as above; `attributed` takes ownership of `start` if the thread starts.
    let result = unsafe { create(thread, attr, attributed, start.cast()) };
    if result != 0 {
        // SAFETY: no thread started, so `start` is still this call's.
        drop(unsafe { Box::from_raw(start) });
    }
    result
}

/// The start routine of a thread started from a generation's thread.
extern "C" fn attributed(start: *mut c_void) -> *mut c_void {
    // SAFETY: `pthread_create` passed the `Start` it leaked, to this thread only.
    let Start { routine, arg, generation } = *unsafe { Box::from_raw(start.cast::<Start>()) };
    register(Owner::Generation(generation));
    // Unregistered when the thread exits, by a thread-local destructor: those run however
    // it exits, a return or `pthread_exit`. (The forced unwind of `pthread_exit` or of a
    // cancellation passes this frame, which holds nothing to drop: what unwinding through
    // Rust frames is known to do safely today, though the language does not promise it.)
    UNREGISTER_AT_EXIT.with(|_| {});
    routine(arg)
}

thread_local! {
    static UNREGISTER_AT_EXIT: UnregisterAtExit = const { UnregisterAtExit };
}

struct UnregisterAtExit;

impl Drop for UnregisterAtExit {
    fn drop(&mut self) {
        unregister();
    }
}
