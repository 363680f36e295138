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
//! The `server` module keeps connections on the threads of the generation they are served by
//! and moves them to the new one at a request boundary, so no request pays for a hop between
//! threads.
//!
//! ## Lifecycle
//!
//! [`Candidate::open`] copies the file to a private shadow path, opens it and checks its
//! declaration; [`Candidate::start`] starts its runtime, runs its `init` (bounded by a timeout) and readiness
//! check. Requests hold an `Arc<Generation>`; when the last one goes, `Drop` hands the parts
//! to the reaper thread, which runs the plugin's shutdown hook, joins the threads, closes the
//! library, deletes the shadow file and checks `/proc/self/maps`.

use std::cell::Cell;
use std::mem::ManuallyDrop;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use handler_api::abi::{FfiPoll, HostApi, PluginDeclaration};

use crate::bridge::{self, PluginContext};
use crate::budget::BudgetError;
use crate::latch::Latch;
use crate::loader::{self, Identity, Library, LoadError, ShadowDir};
use crate::metrics::{GenerationStats, Unloaded};
use crate::trust::{Trust, TrustError};

thread_local! {
    /// The generation whose runtime owns this thread (0: none).
    static THREAD_GENERATION: Cell<u64> = const { Cell::new(0) };
}

/// The id of the generation whose runtime owns the calling thread, or 0.
pub fn thread_generation() -> u64 {
    THREAD_GENERATION.with(Cell::get)
}

/// The name of every thread of generation `id` (also how `/proc` finds stragglers).
fn thread_name(id: u64) -> String {
    format!("hs-gen{id}")
}

/// Why a candidate plugin did not become a generation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GenerationError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Untrusted(#[from] TrustError),
    #[error(transparent)]
    Budget(#[from] BudgetError),
    #[error("cannot start the plugin's runtime: {0}")]
    Runtime(std::io::Error),
    #[error("{plugin}: init failed: {reason}")]
    InitFailed { plugin: String, reason: String },
    #[error("{plugin}: init panicked: {reason}")]
    InitPanicked { plugin: String, reason: String },
    #[error("{plugin}: init did not return within {timeout:?} (the library stays loaded while it runs)")]
    InitTimeout { plugin: String, timeout: Duration },
    #[error("{plugin}: readiness check failed: {reason}")]
    NotReady { plugin: String, reason: String },
}

impl GenerationError {
    /// What kind of refusal this is, as a metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            GenerationError::Load(e) => match e {
                LoadError::Read { .. } => "unreadable",
                LoadError::Shadow { .. } => "shadow_dir",
                LoadError::Open { .. } => "not_a_library",
                LoadError::Incomplete { .. } => "incomplete",
                LoadError::NotAPlugin { .. } | LoadError::BadMagic { .. } => "not_a_plugin",
                LoadError::AbiVersion { .. } | LoadError::Layout { .. } => "abi_mismatch",
                LoadError::Version { .. } => "bad_version",
            },
            GenerationError::Untrusted(_) => "untrusted",
            GenerationError::Budget(_) => "budget",
            GenerationError::Runtime(_) => "runtime",
            GenerationError::InitFailed { .. } => "init_failed",
            GenerationError::InitPanicked { .. } => "init_panicked",
            GenerationError::InitTimeout { .. } => "init_timeout",
            GenerationError::NotReady { .. } => "not_ready",
        }
    }
}

/// How generations are loaded.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Worker threads of each generation's runtime.
    pub worker_threads: usize,
    /// How long `init` and the readiness check may take, each.
    pub init_timeout: Duration,
    /// How long unloading waits for the plugin's shutdown hook and for its threads to exit.
    pub unload_timeout: Duration,
    /// Where shadow copies go.
    pub shadow: Arc<ShadowDir>,
    /// Which plugin files may be loaded.
    pub trust: Trust,
}

/// One loaded copy of a plugin and the runtime whose threads run its code.
pub struct Generation {
    id: u64,
    name: String,
    version: semver::Version,
    source: PathBuf,
    /// Which version of the source file was loaded.
    identity: Identity,
    /// SHA-256 of the loaded bytes, when a trusted digest list asked for it.
    digest: Option<String>,
    shadow: PathBuf,
    loaded_at: Instant,
    handle: tokio::runtime::Handle,
    stats: Arc<GenerationStats>,
    superseded: Latch,
    aborted: Latch,
    initialized: bool,
    unload_timeout: Duration,
    // Taken by `Drop`, which hands them to the reaper. The table and context must outlive
    // every call into the library, so they leave together with it.
    library: ManuallyDrop<Library>,
    runtime: ManuallyDrop<tokio::runtime::Runtime>,
    api: ManuallyDrop<Box<HostApi>>,
    context: ManuallyDrop<Box<PluginContext>>,
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

/// A plugin file copied to its private path, after every check that needs only its bytes.
struct Copied {
    shadow: PathBuf,
    identity: Identity,
    digest: Option<String>,
}

/// Opens `source` once, checks who may write it, copies it to a fresh private path, and
/// checks the copy: complete, and (with a digest list) trusted. Blocking.
fn private_copy(source: &Path, options: &LoadOptions) -> Result<Copied, GenerationError> {
    let mut file = loader::open_plugin(source)?;
    let identity = Identity::from_metadata(&file.metadata).ok_or_else(|| LoadError::Read {
        path: source.to_path_buf(),
        source: std::io::Error::other("not a regular file"),
    })?;
    options.trust.check_source(source, &file.metadata, file.real_path.as_deref())?;
    let copy = options.shadow.copy(source, &mut file.file, options.trust.wants_digest())?;
    let checked = loader::check_complete(source, &copy.head, copy.len)
        .map_err(GenerationError::from)
        .and_then(|()| Ok(options.trust.check_digest(source, copy.sha256.as_deref())?));
    if let Err(e) = checked {
        let _ = std::fs::remove_file(&copy.shadow);
        return Err(e);
    }
    Ok(Copied { shadow: copy.shadow, identity, digest: copy.sha256 })
}

/// A plugin build copied, opened and its declaration checked: of its code, only the
/// library's initialisers have run. [`Candidate::start`] makes it a generation; dropping it
/// closes the library and deletes the copy.
pub struct Candidate {
    source: PathBuf,
    shadow: PathBuf,
    identity: Identity,
    digest: Option<String>,
    name: String,
    version: semver::Version,
    /// Taken by `start` (or `Drop`).
    library: Option<Library>,
}

impl std::fmt::Debug for Candidate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Candidate").field("source", &self.source).field("version", &self.version()).finish_non_exhaustive()
    }
}

impl Candidate {
    /// Copies `source` to a private path, checks it (trust, completeness, digest), opens the
    /// copy and checks its declaration (ABI, layout, semantic version).
    pub async fn open(source: &Path, options: &LoadOptions) -> Result<Candidate, GenerationError> {
        // File work (read, hash, write the copy) stays off the host's runtime thread, which
        // accepts connections and keeps their timeouts.
        let prepared = {
            let (source, options) = (source.to_path_buf(), options.clone());
            tokio::task::spawn_blocking(move || private_copy(&source, &options)).await
        };
        let Copied { shadow, identity, digest } =
            prepared.map_err(|join| GenerationError::Runtime(std::io::Error::other(join.to_string())))??;
        match open_library(&shadow).await {
            Ok(library) => Ok(Candidate {
                source: source.to_path_buf(),
                shadow,
                identity,
                digest,
                name: library.name.clone(),
                version: library.version.clone(),
                library: Some(library),
            }),
            Err(e) => {
                let _ = std::fs::remove_file(&shadow);
                Err(e)
            }
        }
    }

    /// The plugin's declared name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The plugin's declared version.
    pub fn version(&self) -> &semver::Version {
        &self.version
    }

    /// The file it was copied from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Which version of the source file was copied.
    pub fn identity(&self) -> Identity {
        self.identity
    }

    /// Starts it as generation `id`: its runtime, `init` (bounded by a timeout) and
    /// readiness check. On error nothing of it stays behind (except a library whose init
    /// never returned, which cannot be unloaded while its code runs).
    pub async fn start(mut self, id: u64, options: &LoadOptions) -> Result<Arc<Generation>, GenerationError> {
        let Some(library) = self.library.take() else {
            // Only `Drop` takes it otherwise: unreachable while `self` is alive.
            return Err(GenerationError::Runtime(std::io::Error::other("the candidate was already started")));
        };
        let runtime = match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(options.worker_threads.max(1))
            .thread_name(thread_name(id))
            .on_thread_start(move || THREAD_GENERATION.with(|g| g.set(id)))
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                self.library = Some(library); // dropping `self` closes it and deletes the copy
                return Err(GenerationError::Runtime(e));
            }
        };
        let shadow = std::mem::take(&mut self.shadow);
        let context = Box::new(PluginContext { label: format!("{}@{}", self.name, self.version) });
        let api = Box::new(bridge::host_api(&*context, bridge::max_log_level()));
        live_generations().fetch_add(1, Ordering::SeqCst);
        let mut generation = Generation {
            id,
            name: std::mem::take(&mut self.name),
            version: self.version.clone(),
            source: std::mem::take(&mut self.source),
            identity: self.identity,
            digest: self.digest.take(),
            shadow,
            loaded_at: Instant::now(),
            handle: runtime.handle().clone(),
            stats: Arc::default(),
            superseded: Latch::new(),
            aborted: Latch::new(),
            initialized: false,
            unload_timeout: options.unload_timeout,
            library: ManuallyDrop::new(library),
            runtime: ManuallyDrop::new(runtime),
            api: ManuallyDrop::new(api),
            context: ManuallyDrop::new(context),
        };
        // On any error below, `generation` drops and the reaper unloads it.
        let plugin = generation.label();
        let init = generation.declaration().init;
        let api = SendPtr(&**generation.api as *const HostApi);
        let (outcome, reason) = generation
            .run_hook(options.init_timeout, move |sink| {
                let api = api;
                // SAFETY: the table lives as long as the generation; `sink` is a live String.
                unsafe { init(api.0, sink) }
            })
            .await
            .ok_or_else(|| GenerationError::InitTimeout { plugin: plugin.clone(), timeout: options.init_timeout })?;
        match outcome {
            FfiPoll::READY => {}
            FfiPoll::PANICKED => return Err(GenerationError::InitPanicked { plugin, reason }),
            _ => return Err(GenerationError::InitFailed { plugin, reason }),
        }
        // The shutdown hook may run at unload once `init` has succeeded and `ready`, if any,
        // has returned: never beside `ready`, even if this load is abandoned while it runs.
        let Some(ready) = generation.declaration().ready else {
            generation.initialized = true;
            return Ok(Arc::new(generation));
        };
        let outcome_and_reason = generation
            .run_hook(options.init_timeout, move |sink| {
                // SAFETY: `init` succeeded; `sink` is a live String.
                unsafe { ready(sink) }
            })
            .await;
        let Some((outcome, reason)) = outcome_and_reason else {
            // `ready` is still running: its thread keeps the library loaded (see
            // `Retired::unload`), and the shutdown hook is not run.
            return Err(GenerationError::NotReady {
                plugin,
                reason: format!("no answer within {:?}", options.init_timeout),
            });
        };
        generation.initialized = true;
        if outcome != FfiPoll::READY {
            return Err(GenerationError::NotReady { plugin, reason });
        }
        Ok(Arc::new(generation))
    }
}

impl Drop for Candidate {
    fn drop(&mut self) {
        let Some(library) = self.library.take() else { return };
        let (source, shadow) = (std::mem::take(&mut self.source), std::mem::take(&mut self.shadow));
        // dlclose runs the library's finalisers: on the blocking pool, not the host's thread.
        let close = move || {
            if let Err(e) = library.close() {
                tracing::warn!(file = %source.display(), "dlclose of a candidate failed: {e}");
            }
            let _ = std::fs::remove_file(&shadow);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(close)),
            Err(_) => close(),
        }
    }
}

/// Opens the private copy on a thread of its own, joined before the library is used: the
/// thread-locals its initialisers create are destroyed while the library is loaded, and pin
/// no host thread to it. If the load is abandoned meanwhile, the library is closed (on the
/// blocking pool) only after that thread has exited.
async fn open_library(shadow: &Path) -> Result<Library, GenerationError> {
    let failed = |reason: String| GenerationError::Runtime(std::io::Error::other(reason));
    let path = shadow.to_path_buf();
    // SAFETY: the operator chose this file as a plugin; opening it runs its initialisers,
    // which is what loading a plugin means.
    let opening = std::thread::Builder::new().name("hs-dlopen".into()).spawn(move || unsafe { Library::open(&path) });
    let thread = opening.map_err(GenerationError::Runtime)?;
    let joined = tokio::task::spawn_blocking(move || thread.join()).await.map_err(|e| failed(e.to_string()))?;
    Ok(joined.map_err(|_| failed("opening the library panicked".into()))??)
}

/// A raw pointer that may cross to a generation thread for one call.
struct SendPtr<T>(*const T);
// SAFETY: used only to pass the HostApi (Sync, immutable) and error sinks that the sending
// side keeps alive and does not touch until the receiving call has returned.
unsafe impl<T> Send for SendPtr<T> {}

impl Generation {
    /// Runs an init-like hook on a thread of this generation, with a timeout. `None` on
    /// timeout; otherwise the outcome and whatever the plugin wrote to the error sink.
    async fn run_hook(
        &self,
        timeout: Duration,
        hook: impl FnOnce(*mut std::ffi::c_void) -> FfiPoll + Send + 'static,
    ) -> Option<(FfiPoll, String)> {
        let task = self.handle.spawn_blocking(move || {
            let mut sink = String::new();
            let outcome = hook(&mut sink as *mut String as *mut std::ffi::c_void);
            (outcome, sink)
        });
        match tokio::time::timeout(timeout, task).await {
            Ok(Ok(result)) => Some(result),
            Ok(Err(join)) => Some((FfiPoll::PANICKED, join.to_string())),
            Err(_) => None,
        }
    }

    /// This generation's number, unique in the process, starting at 1.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// `name@version`, as the plugin declares them.
    pub fn label(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    /// The plugin's declared name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The plugin's declared version.
    pub fn version(&self) -> &semver::Version {
        &self.version
    }

    /// Its counters: requests by status, streams, bytes sent, how it was unloaded.
    pub fn stats(&self) -> &Arc<GenerationStats> {
        &self.stats
    }

    /// Its private copy (deleted when it unloads).
    pub fn shadow(&self) -> &Path {
        &self.shadow
    }

    /// The file it was loaded from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Which version of the source file was loaded (device, inode, length, modification time).
    pub fn identity(&self) -> Identity {
        self.identity
    }

    /// SHA-256 of the loaded library, when `--trusted-digests` is in use.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// When it was loaded.
    pub fn loaded_at(&self) -> Instant {
        self.loaded_at
    }

    /// The checked declaration; valid while `self` is.
    pub fn declaration(&self) -> &PluginDeclaration {
        self.library.declaration()
    }

    /// The runtime whose threads run this generation's code.
    pub fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }

    /// Requests (with their response bodies) in progress on this generation.
    pub fn in_flight(&self) -> usize {
        self.stats.in_flight()
    }

    /// Raised when a newer generation has become current.
    pub fn superseded(&self) -> &Latch {
        &self.superseded
    }

    /// Raised when the responses still running here must be cut off (drain timeout).
    pub fn aborted(&self) -> &Latch {
        &self.aborted
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
                library: ManuallyDrop::take(&mut self.library),
                runtime: ManuallyDrop::take(&mut self.runtime),
                api: ManuallyDrop::take(&mut self.api),
                context: ManuallyDrop::take(&mut self.context),
            }
        };
        // This may run on one of the generation's own threads (the last request ended
        // there), which cannot join itself: the reaper thread does the unloading.
        reaper().send(Message::Retire(Box::new(retired)));
    }
}

/// What is left of a generation once nothing can call into it any more.
struct Retired {
    id: u64,
    label: String,
    stats: Arc<GenerationStats>,
    shadow: PathBuf,
    initialized: bool,
    timeout: Duration,
    library: Library,
    runtime: tokio::runtime::Runtime,
    api: Box<HostApi>,
    context: Box<PluginContext>,
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
pub fn unload_counts() -> (u64, u64, u64) {
    (UNMAPPED.load(Ordering::Relaxed), STILL_MAPPED.load(Ordering::Relaxed), LEAKED.load(Ordering::Relaxed))
}

fn live_generations() -> &'static AtomicUsize {
    static LIVE: AtomicUsize = AtomicUsize::new(0);
    &LIVE
}

/// Generations loaded and not yet fully unloaded.
pub fn resident_generations() -> usize {
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
pub fn wait_all_unloaded(timeout: Duration) -> bool {
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
