//! Loading: a plugin file becomes a [`Candidate`] (copied to a private path, checked,
//! opened, its declaration checked) and then a [`Generation`] (its runtime started, `init`
//! and the readiness check run, each under a timeout).

use std::mem::ManuallyDrop;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use handler_api::abi::{FfiPoll, FfiPreviousState, FfiState, FfiStr, HostApi};

use crate::latch::Latch;
use crate::plugin::budget::BudgetError;
use crate::plugin::generation::{self, Generation};
use crate::plugin::loader::{self, Identity, Library, LoadError, ShadowDir};
use crate::plugin::probe::{self, ProbeError};
use crate::plugin::reaper::{self, thread_name};
use crate::plugin::services::{self, PluginContext, Tasks};
use crate::plugin::table;
use crate::plugin::threads::{self, Owner};
use crate::plugin::trust::{Trust, TrustError};
use crate::plugin::watchdog;

/// Why a candidate plugin did not become a generation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum GenerationError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Untrusted(#[from] TrustError),
    #[error("{path}: refused: {source}")]
    Probe { path: PathBuf, source: ProbeError },
    #[error(transparent)]
    Budget(#[from] BudgetError),
    #[error(
        "{loaded} generations are loaded and {cut_off} of them were cut off but have not unloaded (see the \
         warnings about them): another would exceed --max-generations ({max}). Restart the host to free them, \
         or raise --max-generations"
    )]
    GenerationCap { loaded: u64, cut_off: u64, max: u64 },
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
    #[error("{plugin}: refused the state of {previous} (its import_state failed: {reason})")]
    StateImport { plugin: String, previous: String, reason: String },
}

impl GenerationError {
    /// What kind of refusal this is, as a metrics label.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            GenerationError::Load(e) => match e {
                LoadError::Read { .. } => "unreadable",
                LoadError::Shadow { .. } => "shadow_dir",
                LoadError::Open { .. } => "not_a_library",
                LoadError::Incomplete { .. } => "incomplete",
                LoadError::NotAPlugin { .. } | LoadError::BadMagic { .. } => "not_a_plugin",
                LoadError::AbiVersion { .. } | LoadError::Layout { .. } => "abi_mismatch",
                LoadError::Version { .. } => "bad_version",
                LoadError::PanicAbort { .. } => "panic_abort",
                LoadError::StateLayout { .. } => "abi_mismatch",
            },
            GenerationError::Untrusted(_) => "untrusted",
            GenerationError::Probe { source, .. } => source.kind(),
            GenerationError::Budget(_) => "budget",
            GenerationError::GenerationCap { .. } => "generation_cap",
            GenerationError::Runtime(_) => "runtime",
            GenerationError::InitFailed { .. } => "init_failed",
            GenerationError::InitPanicked { .. } => "init_panicked",
            GenerationError::InitTimeout { .. } => "init_timeout",
            GenerationError::NotReady { .. } => "not_ready",
            GenerationError::StateImport { .. } => "state_import",
        }
    }
}

/// How generations are loaded.
#[derive(Debug, Clone)]
pub(crate) struct LoadOptions {
    /// Worker threads of each generation's runtime.
    pub(crate) worker_threads: usize,
    /// How long `init` and the readiness check may take, each.
    pub(crate) init_timeout: Duration,
    /// How long unloading waits for the plugin's shutdown hook and for its threads to exit.
    pub(crate) unload_timeout: Duration,
    /// Where shadow copies go.
    pub(crate) shadow: Arc<ShadowDir>,
    /// Which plugin files may be loaded.
    pub(crate) trust: Trust,
}


/// A plugin file copied to its private path, after every check that needs only its bytes.
struct Copied {
    /// The copy, open: what was checked, and what will be mapped.
    file: std::fs::File,
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
    Ok(Copied { file: copy.file, shadow: copy.shadow, identity, digest: copy.sha256 })
}

/// A plugin build copied, opened and its declaration checked: of its code, only the
/// library's initialisers have run. [`Candidate::start`] makes it a generation; dropping it
/// closes the library and deletes the copy.
pub(crate) struct Candidate {
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
    pub(crate) async fn open(source: &Path, options: &LoadOptions) -> Result<Candidate, GenerationError> {
        // File work (read, hash, write the copy) stays off the host's runtime thread, which
        // accepts connections and keeps their timeouts.
        let prepared = {
            let (source, options) = (source.to_path_buf(), options.clone());
            tokio::task::spawn_blocking(move || private_copy(&source, &options)).await
        };
        let Copied { file, shadow, identity, digest } =
            prepared.map_err(|join| GenerationError::Runtime(std::io::Error::other(join.to_string())))??;
        // Its initialisers and finalisers run first where they cannot harm the host.
        if let Err(e) = probe::probe(&file, options.init_timeout).await {
            let _ = std::fs::remove_file(&shadow);
            return Err(GenerationError::Probe { path: source.to_path_buf(), source: e });
        }
        match open_library(file, &shadow, source).await {
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

    /// Names the candidate by `source`, the file its bytes came from (as `identity`, if
    /// known), rather than by the copy it was opened from: a host that takes over from another
    /// (`hotswap upgrade`) loads the bytes that host kept of the build it serves, which is
    /// known by its own file.
    pub(crate) fn named(mut self, source: &Path, identity: Option<Identity>) -> Candidate {
        self.source = source.to_path_buf();
        if let Some(identity) = identity {
            self.identity = identity;
        }
        self
    }

    /// The plugin's declared name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The plugin's declared version.
    pub(crate) fn version(&self) -> &semver::Version {
        &self.version
    }

    /// The file it was copied from.
    /// Whether its plugin takes over state from the build before (`handler_api::state`).
    pub(crate) fn takes_state(&self) -> bool {
        self.library.as_ref().is_some_and(|library| library.state_declaration().is_some())
    }

    pub(crate) fn source(&self) -> &Path {
        &self.source
    }

    /// Which version of the source file was copied.
    pub(crate) fn identity(&self) -> Identity {
        self.identity
    }

    /// Starts it as generation `id`: its runtime, `init` (bounded by a timeout) and
    /// readiness check. On error nothing of it stays behind (except a library whose init
    /// never returned, which cannot be unloaded while its code runs).
    pub(crate) async fn start(mut self, id: u64, options: &LoadOptions, previous: Option<&HandedState>) -> Result<Arc<Generation>, GenerationError> {
        let Some(library) = self.library.take() else {
            // Only `Drop` takes it otherwise: unreachable while `self` is alive.
            return Err(GenerationError::Runtime(std::io::Error::other("the candidate was already started")));
        };
        let runtime = match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(options.worker_threads.max(1))
            .thread_name(thread_name(id))
            .on_thread_start(move || {
                threads::register(Owner::Generation(id));
                generation::enter_thread(id);
            })
            .on_thread_stop(threads::unregister)
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
        let superseded = Latch::new();
        let context = Box::new(PluginContext {
            label: format!("{}@{}", self.name, self.version),
            superseded: superseded.token().clone(),
            tasks: Tasks::new(runtime.handle().clone()),
        });
        let api = Box::new(table::host_api(&*context, services::max_log_level()));
        reaper::live_generations().fetch_add(1, Ordering::SeqCst);
        let foreign_before = library.foreign_before().clone();
        let mut generation = Generation {
            id,
            name: std::mem::take(&mut self.name),
            version: self.version.clone(),
            source: std::mem::take(&mut self.source),
            identity: self.identity,
            digest: self.digest.take(),
            shadow,
            handle: runtime.handle().clone(),
            stats: Arc::default(),
            superseded,
            aborted: Latch::new(),
            initialized: false,
            unload_timeout: options.unload_timeout,
            close_timeout: options.unload_timeout.max(options.init_timeout),
            library: ManuallyDrop::new(library),
            runtime: ManuallyDrop::new(runtime),
            api: ManuallyDrop::new(api),
            context: ManuallyDrop::new(context),
            foreign_before,
            export_stuck: std::sync::atomic::AtomicBool::new(false),
        };
        // On any error below, `generation` drops and the reaper unloads it.
        let plugin = generation.label();
        if let (Some(previous), Some(state)) = (previous, generation.library.state_declaration()) {
            let import = state.import;
            let api = SendPtr(&**generation.api as *const HostApi);
            let handed = previous.clone();
            let outcome = run_hook(&generation, options.init_timeout, move |sink| {
                let api = api;
                let ffi = FfiPreviousState {
                    name: FfiStr::new(handed.name.as_bytes()),
                    version: FfiStr::new(handed.version.as_bytes()),
                    schema: handed.schema,
                    bytes: FfiStr::new(&handed.bytes),
                };
                // SAFETY: the state declaration was checked at load; the table and `ffi` (and
                // the bytes it borrows) outlive the call; `sink` is a live String.
                unsafe { import(api.0, &ffi, sink) }
            })
            .await;
            let failed = |reason: String| GenerationError::StateImport { plugin: plugin.clone(), previous: previous.label(), reason };
            match outcome {
                None => return Err(failed(format!("no answer within {:?} (the library stays loaded while it runs)", options.init_timeout))),
                Some((FfiPoll::READY, _)) => {
                    tracing::info!(plugin = %plugin, from = %previous.label(), schema = previous.schema, bytes = previous.bytes.len(), "state imported");
                }
                Some((_, reason)) => return Err(failed(reason)),
            }
        }
        let init = generation.declaration().init;
        let api = SendPtr(&**generation.api as *const HostApi);
        let (outcome, reason) = run_hook(&generation, options.init_timeout, move |sink| {
            let api = api;
            // SAFETY: the declaration was checked at load; the table lives as long as the
            // generation, whose library stays loaded while this thread runs; `sink` is a
            // live String.
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
            return Ok(watchdog::watched(Arc::new(generation)));
        };
        let outcome_and_reason = run_hook(&generation, options.init_timeout, move |sink| {
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
        Ok(watchdog::watched(Arc::new(generation)))
    }
}

impl Drop for Candidate {
    fn drop(&mut self) {
        let Some(library) = self.library.take() else { return };
        let shadow = std::mem::take(&mut self.shadow);
        // Dropped, the library waits for threads its initialisers started, then runs its
        // finalisers (see `loader::Mapping`): on the blocking pool, not the host's thread.
        let close = move || {
            drop(library);
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
async fn open_library(file: std::fs::File, shadow: &Path, source: &Path) -> Result<Library, GenerationError> {
    let failed = |reason: String| GenerationError::Runtime(std::io::Error::other(reason));
    let (path, source) = (shadow.to_path_buf(), source.to_path_buf());
    // SAFETY: the operator chose this file as a plugin; opening it runs its initialisers,
    // which is what loading a plugin means.
    let opening = std::thread::Builder::new()
        .name("hs-dlopen".into())
        .spawn(move || threads::host_thread(|| unsafe { Library::open(file, &path, &source) }));
    let thread = opening.map_err(GenerationError::Runtime)?;
    // A refused library is closed here, once the thread that opened it has exited.
    let joined = tokio::task::spawn_blocking(move || thread.join().map(|opened| opened.map_err(|refused| refused.error)));
    let joined = joined.await.map_err(|e| failed(e.to_string()))?;
    Ok(joined.map_err(|_| failed("opening the library panicked".into()))??)
}

/// A raw pointer that may cross to a generation thread for one call.
struct SendPtr<T>(*const T);
// SAFETY: used only to pass the HostApi (Sync, immutable) and error sinks that the sending
// side keeps alive and does not touch until the receiving call has returned.
unsafe impl<T> Send for SendPtr<T> {}


/// The state a generation handed over (`handler_api::state`), copied out of its memory, for
/// the build that replaces it.
#[derive(Debug, Clone)]
pub(crate) struct HandedState {
    pub(crate) name: String,
    pub(crate) version: String,
    pub(crate) schema: u32,
    /// Shared: a build that is tried more than once is handed the same copy.
    pub(crate) bytes: Arc<[u8]>,
}

impl HandedState {
    /// `name@version` of the build that handed it over.
    pub(crate) fn label(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

impl Generation {
    /// The state this generation hands to the build that replaces it, if its plugin hands
    /// any: exported on one of its threads, within `timeout`, and copied. A failure is logged
    /// and hands nothing (the new build starts afresh); an export that did not return is not
    /// asked again.
    pub(crate) async fn export_state(self: &Arc<Self>, timeout: Duration) -> Option<HandedState> {
        let state = self.library.state_declaration()?;
        if self.export_stuck.load(Ordering::Acquire) {
            tracing::warn!(generation = self.id(), plugin = %self.label(), "an earlier export_state never returned: the new build starts without the state");
            return None;
        }
        let (export, release) = (state.export, state.release);
        // Held by the job: the library stays loaded while its export runs, even past the
        // timeout (and the shutdown hook waits for it, as for any request).
        let generation = self.clone();
        let exported = run_on(self, timeout, move || {
            let _held = generation;
            let mut out = FfiState { schema: 0, bytes: FfiStr::EMPTY, handle: std::ptr::null_mut() };
            // SAFETY: the state declaration was checked at load, and `_held` keeps the library
            // loaded while this thread runs; `out` is writable.
            if unsafe { export(&mut out) } != FfiPoll::READY {
                return Err("it failed or panicked");
            }
            if out.handle.is_null() {
                return Err("it answered without state");
            }
            // SAFETY: on READY the plugin wrote `out`; its bytes are valid until `release`.
            let bytes: Arc<[u8]> = unsafe { out.bytes.as_bytes() }.into();
            let schema = out.schema;
            // SAFETY: what `export` wrote, given back once.
            unsafe { release(&mut out) };
            Ok((schema, bytes))
        })
        .await;
        let why = match exported {
            Some(Ok(Ok((schema, bytes)))) => {
                return Some(HandedState { name: self.name().to_owned(), version: self.version().to_string(), schema, bytes });
            }
            Some(Ok(Err(why))) => why.to_owned(),
            Some(Err(join)) => format!("its thread ended: {join}"),
            None => {
                self.export_stuck.store(true, Ordering::Release);
                format!("it did not return within {timeout:?} (the library stays loaded while it runs)")
            }
        };
        tracing::warn!(generation = self.id(), plugin = %self.label(), "export_state: {why}; the new build starts without the state");
        None
    }
}

/// Runs `job` on a thread of this generation (its blocking pool), with a timeout: `None` on
/// timeout.
async fn run_on<T: Send + 'static>(
    generation: &Generation,
    timeout: Duration,
    job: impl FnOnce() -> T + Send + 'static,
) -> Option<Result<T, tokio::task::JoinError>> {
    tokio::time::timeout(timeout, generation.handle().spawn_blocking(job)).await.ok()
}

/// Runs an init-like hook on a thread of this generation, with a timeout. `None` on
/// timeout; otherwise the outcome and whatever the plugin wrote to the error sink.
async fn run_hook(
    generation: &Generation,
    timeout: Duration,
    hook: impl FnOnce(*mut std::ffi::c_void) -> FfiPoll + Send + 'static,
) -> Option<(FfiPoll, String)> {
    let ran = run_on(generation, timeout, move || {
        let mut sink = String::new();
        let outcome = hook(&mut sink as *mut String as *mut std::ffi::c_void);
        (outcome, sink)
    });
    match ran.await? {
        Ok(result) => Some(result),
        Err(join) => Some((FfiPoll::PANICKED, join.to_string())),
    }
}
