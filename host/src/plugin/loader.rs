//! Opening plugin libraries: private shadow copies, `dlopen`, and the declaration check that
//! comes before any other call into the plugin.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use handler_api::abi::{self, DeclarationHeader, PluginDeclaration};

use super::threads;

/// Why a plugin file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum LoadError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// The private copy could not be written.
    #[error("cannot write the private copy of {path} into the shadow directory {shadow_dir}: {source}{hint}")]
    Shadow { path: PathBuf, shadow_dir: PathBuf, source: std::io::Error, hint: &'static str },
    /// The dynamic loader refused the file.
    #[error("{path}: not a loadable shared library ({reason})")]
    Open { path: PathBuf, reason: String },
    /// The file is an ELF image cut short: still being written, or truncated.
    #[error("{path}: incomplete file: {len} bytes, but its ELF headers say it ends at byte {needed} (still being written, or truncated)")]
    Incomplete { path: PathBuf, len: u64, needed: u64 },
    /// The library loads but exports no declaration.
    #[error(
        "{path}: not a hotswap plugin: it exports no `{symbol}` symbol (export one with handler_api::export_handler!)"
    )]
    NotAPlugin { path: PathBuf, symbol: &'static str },
    /// The symbol exists but is not a declaration.
    #[error("{path}: `{symbol}` is not a hotswap declaration (bad magic bytes)")]
    BadMagic { path: PathBuf, symbol: &'static str },
    /// Built against an incompatible ABI version.
    #[error(
        "{path}: plugin ABI version {plugin}, host ABI version {host}: rebuild the plugin against the handler-api of this host"
    )]
    AbiVersion { path: PathBuf, plugin: u32, host: u32 },
    /// Same version number, different layout: a modified or mismatched handler-api.
    #[error(
        "{path}: boundary layout fingerprint {plugin:#018x} differs from the host's {host:#018x} (both ABI version {version}): rebuild the plugin against the handler-api of this host"
    )]
    Layout { path: PathBuf, plugin: u64, host: u64, version: u32 },
    /// The declared version is not a semantic version, so it cannot be ordered.
    #[error(
        "{path}: plugin `{name}` declares version `{version}`, which is not a semantic version ({reason}): declare one like 1.4.2 in export_handler!"
    )]
    Version { path: PathBuf, name: String, version: String, reason: semver::Error },
    /// Its panics abort the process instead of unwinding: the first one would kill the host.
    #[error(
        "{path}: plugin `{name}` was built with panics that abort (`panic = \"abort\"`): its first panic would kill the whole host. \
         Remove `panic = \"abort\"` from the [profile.release] (and [profile.dev]) section of its Cargo.toml, \
         or `-C panic=abort` from RUSTFLAGS, and rebuild"
    )]
    PanicAbort { path: PathBuf, name: String },
    /// Its state handoff was built against another handler-api.
    #[error(
        "{path}: plugin `{name}` hands state over (export_handler!'s `state:`) with a layout fingerprint {plugin:#018x} \
         that differs from the host's {host:#018x}: rebuild the plugin against the handler-api of this host"
    )]
    StateLayout { path: PathBuf, name: String, plugin: u64, host: u64 },
}

/// A plugin library mapped into the process, whose declaration has been checked.
///
/// Dropping it closes the library (`dlclose`). The host only drops it once no code of the
/// plugin can run any more: see `generation`.
pub(crate) struct Library {
    // Declared before `mapping`: nothing may use the declaration once the library is closed.
    declaration: NonNull<PluginDeclaration>,
    /// Its state handoff, if it has one (checked).
    state: Option<NonNull<abi::StateDeclaration>>,
    mapping: Mapping,
    pub(crate) name: String,
    pub(crate) version: semver::Version,
}

/// A library `dlopen`ed from its private copy: closing it (explicitly, or when dropped, on
/// any path) checks what of it is still mapped, and keeps the copy's descriptor open if
/// anything may be.
///
/// Dropped without [`Library::close`], it is a library the host never started (refused, or
/// abandoned): only its initialisers ran, but they may have started threads that run its code
/// (C and C++ globals do). It is closed once those are gone, and leaked if they stay.
struct Mapping {
    library: Option<libloading::Library>,
    /// The file the copy was made of, for the log.
    source: PathBuf,
    /// The threads not the host's that were alive before `dlopen`: any other that appears
    /// may run the library's code (see `threads`).
    foreign_before: BTreeSet<i32>,
    /// The private copy, open: the library was mapped from this very file (see
    /// [`Library::open`]). The dynamic loader knows the library by the name
    /// `/proc/self/fd/N`: a number reused for the next copy while this library is still
    /// loaded would make `dlopen` hand back this one.
    copy: Option<fs::File>,
    /// How `/proc/self/maps` names the file (`major:minor` and inode as it prints them, which
    /// on some file systems differ from what `fstat` says), read off a line that maps it
    /// right after `dlopen`; `None` if none did.
    maps_id: Option<(String, String)>,
}

impl Mapping {
    /// `dlclose`, then what `/proc/self/maps` still shows of the file.
    fn close(&mut self) -> Closed {
        let Some(library) = self.library.take() else { return Closed::Unmapped };
        let closed = library.close();
        // Unknown how the maps name it: assume the worst.
        let mapped = self.maps_id.as_ref().map_or(Mappings { bytes: 0, code: true }, mappings_of);
        let outcome = match closed {
            Err(e) => Closed::Failed(e),
            Ok(()) if mapped.code => Closed::StillMapped,
            Ok(()) if mapped.bytes > 0 => Closed::DataMapped { bytes: mapped.bytes },
            Ok(()) => Closed::Unmapped,
        };
        if matches!(outcome, Closed::StillMapped | Closed::Failed(_)) {
            // The loader may still know the library by this descriptor's number.
            std::mem::forget(self.copy.take());
        }
        outcome
    }
}

/// How long a library the host never started waits, when dropped, for threads its
/// initialisers started.
const UNSTARTED_THREADS_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.library.is_none() {
            return;
        }
        let holding = threads::wait_released(None, &self.foreign_before, UNSTARTED_THREADS_WAIT);
        if !holding.is_empty() {
            tracing::warn!(
                file = %self.source.display(),
                threads = %threads::describe(&holding),
                "threads its initialisers started are still running; its library stays loaded (leaked)"
            );
            std::mem::forget(self.library.take());
            std::mem::forget(self.copy.take());
        } else if let Closed::Failed(e) = self.close() {
            tracing::warn!(file = %self.source.display(), "dlclose of a library that was not started failed: {e}");
        }
    }
}

/// A library opened and refused by its declaration. Dropping it closes the library (see
/// [`Mapping`]): drop it off the thread that opened it, which must have exited first (the
/// thread-locals its initialisers made there are destroyed at that thread's exit, while the
/// library is still loaded).
pub(crate) struct Refused {
    pub(crate) error: LoadError,
    /// `None` if `dlopen` itself failed.
    _mapping: Option<Box<Mapping>>,
}

impl std::fmt::Debug for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

// SAFETY: `declaration` and `state` point at immutable static data inside the library, which
// `Library` keeps mapped; `libloading::Library` is Send + Sync.
unsafe impl Send for Library {}
// SAFETY: as above.
unsafe impl Sync for Library {}

impl Library {
    /// Opens the private copy `copy` (at `shadow`, never the user's file) and checks its
    /// declaration.
    ///
    /// The library is mapped from the open file, through `/proc/self/fd`, never by its path:
    /// the bytes mapped are the bytes that were checked, even if someone replaced the file or
    /// its directory in the meantime.
    ///
    /// Errors name `source`, the file the copy was made of: the one the operator knows.
    ///
    /// # Safety
    /// Loading a library runs its initialisers, as any native code would: `copy` must be a
    /// file the operator has chosen to trust.
    pub(crate) unsafe fn open(copy: fs::File, shadow: &Path, source: &Path) -> Result<Library, Refused> {
        use std::os::fd::AsRawFd as _;
        let path = source.to_path_buf();
        let foreign_before = threads::foreign();
        // SAFETY: forwarded to the caller (the library's initialisers run here).
        let library = unsafe { open_fd(copy.as_raw_fd()) }.map_err(|e| {
            // The loader names the descriptor it was given (`/proc/self/fd/N: …`): no use to
            // anyone reading the refusal.
            let reason = e.to_string();
            let reason = match reason.split_once("/proc/self/fd/").and_then(|(_, rest)| rest.split_once(": ")) {
                Some((_, why)) => why.to_owned(),
                None => reason,
            };
            Refused { error: LoadError::Open { path: path.clone(), reason }, _mapping: None }
        })?;
        let symbol = abi::DECLARATION_SYMBOL;
        // SAFETY: we only take the symbol's address here; it is read below as a header.
        let address = unsafe { library.get::<*const DeclarationHeader>(symbol.as_bytes()) }.map(|s| *s);
        // From here on, every refusal hands the library back in `Refused`, closed through
        // `Mapping` when the caller drops it.
        // The maps print the file's real path, as the descriptor's link does.
        let real = fs::read_link(format!("/proc/self/fd/{}", copy.as_raw_fd())).unwrap_or_else(|_| shadow.to_path_buf());
        let maps_id = maps_id_of(&real);
        let mut mapping = Mapping { library: Some(library), source: path.clone(), foreign_before, copy: Some(copy), maps_id };
        match Checked::of(&mut mapping, address, path) {
            Ok(Checked { declaration, state, name, version }) => Ok(Library { declaration, state, mapping, name, version }),
            Err(error) => Err(Refused { error, _mapping: Some(Box::new(mapping)) }),
        }
    }

    /// The checked state handoff, if the plugin has one; valid while `self` is.
    pub(crate) fn state_declaration(&self) -> Option<&abi::StateDeclaration> {
        // SAFETY: checked in `open`; the library stays mapped while `self` lives.
        self.state.map(|state| unsafe { state.as_ref() })
    }

    /// The threads not the host's that were alive before the library was opened: any other
    /// that appears may run its code (see `threads`).
    pub(crate) fn foreign_before(&self) -> &BTreeSet<i32> {
        &self.mapping.foreign_before
    }

    /// The checked declaration, valid while `self` is.
    pub(crate) fn declaration(&self) -> &PluginDeclaration {
        // SAFETY: checked in `open`; the library stays mapped while `self` lives.
        unsafe { self.declaration.as_ref() }
    }

    /// Closes the library (`dlclose`, which runs its finalisers) and says whether it is
    /// gone from the address space. Its file is closed too, unless the library may still be
    /// loaded (see `Mapping::copy`).
    pub(crate) fn close(mut self) -> Closed {
        self.mapping.close()
    }
}

/// What [`Library::open`] read off a declaration it accepted.
struct Checked {
    declaration: NonNull<PluginDeclaration>,
    state: Option<NonNull<abi::StateDeclaration>>,
    name: String,
    version: semver::Version,
}

impl Checked {
    /// Checks the declaration at `address` (the symbol's lookup in `mapping`'s library), the
    /// header first: nothing else of it is read unless its version and layout are ours.
    fn of(mapping: &mut Mapping, address: Result<*const DeclarationHeader, libloading::Error>, path: PathBuf) -> Result<Checked, LoadError> {
        let symbol = abi::DECLARATION_SYMBOL;
        let address = address.map_err(|_| LoadError::NotAPlugin { path: path.clone(), symbol })?;
        if mapping.maps_id.is_none() {
            // A path the maps print otherwise (escaped): the line that maps the declaration.
            mapping.maps_id = maps_id_at(address as u64);
        }
        let Some(address) = NonNull::new(address as *mut DeclarationHeader) else {
            return Err(LoadError::NotAPlugin { path, symbol });
        };
        // SAFETY: the symbol lies in a mapped, readable segment of the library. The header is
        // plain integers and bytes, valid for any bit pattern, and is the only part read before
        // the checks below. (A foreign symbol smaller than 24 bytes at the very end of a
        // segment could make this read cross into unmapped memory; the symbol name is
        // specific enough that we accept this.)
        let header = unsafe { address.as_ptr().read_unaligned() };
        if header.magic != abi::MAGIC {
            return Err(LoadError::BadMagic { path, symbol });
        }
        if header.abi_version != abi::ABI_VERSION {
            return Err(LoadError::AbiVersion { path, plugin: header.abi_version, host: abi::ABI_VERSION });
        }
        if header.layout_fingerprint != abi::LAYOUT_FINGERPRINT {
            return Err(LoadError::Layout {
                path,
                plugin: header.layout_fingerprint,
                host: abi::LAYOUT_FINGERPRINT,
                version: abi::ABI_VERSION,
            });
        }
        let declaration = address.cast::<PluginDeclaration>();
        // SAFETY: version and fingerprint match ours, so the symbol is a PluginDeclaration
        // with our layout, in static memory that lives as long as `library`.
        let decl = unsafe { declaration.as_ref() };
        // SAFETY: the declaration's strings point into the library's static data.
        let (name, version) = unsafe { (decl.name.to_string_lossy(), decl.version.to_string_lossy()) };
        if decl.panic != abi::PANIC_UNWIND {
            return Err(LoadError::PanicAbort { path, name });
        }
        let version = semver::Version::parse(&version).map_err(|reason| LoadError::Version { path: path.clone(), name: name.clone(), version, reason })?;
        let state = match mapping.library.as_ref() {
            // SAFETY: only the symbol's address is taken; it is read below, its fingerprint first.
            Some(library) => unsafe { library.get::<*const abi::StateDeclaration>(abi::STATE_SYMBOL.as_bytes()) }.ok().map(|s| *s),
            None => None,
        };
        let state = state.and_then(|address| NonNull::new(address as *mut abi::StateDeclaration));
        if let Some(address) = state {
            // SAFETY: the symbol lies in the library's static data; the fingerprint, a plain
            // integer at its start, is read before anything else of it.
            let fingerprint = unsafe { address.cast::<u64>().as_ptr().read_unaligned() };
            if fingerprint != abi::STATE_FINGERPRINT {
                return Err(LoadError::StateLayout { path, name, plugin: fingerprint, host: abi::STATE_FINGERPRINT });
            }
        }
        Ok(Checked { declaration, state, name, version })
    }
}

/// What [`Library::close`] did.
#[derive(Debug)]
pub(crate) enum Closed {
    /// Closed, and no longer mapped anywhere in the process.
    Unmapped,
    /// Closed, but its code is still mapped (see `/proc/self/maps`).
    StillMapped,
    /// Closed and its code unmapped, but `bytes` of its file stay mapped read-only, not
    /// executable: what std's backtrace symbolizer maps to read debug information, and never
    /// unmaps (its cache lived in the library's statics). Plugin code formatted a captured
    /// backtrace (`{:?}` of an `anyhow::Error` with `RUST_LIB_BACKTRACE=1`, for instance).
    DataMapped { bytes: u64 },
    /// `dlclose` failed: the library stays loaded.
    Failed(libloading::Error),
}

/// `dlopen`s the open file `fd` (`RTLD_NOW`: a library with unresolved symbols is refused
/// now, not at its first call).
///
/// # Safety
/// As `dlopen`: the library's initialisers run, and must be trusted.
pub(crate) unsafe fn open_fd(fd: std::os::fd::RawFd) -> Result<libloading::Library, libloading::Error> {
    use libloading::os::unix::{Library as UnixLibrary, RTLD_LOCAL, RTLD_NOW};
    // SAFETY: forwarded to the caller.
    unsafe { UnixLibrary::open(Some(format!("/proc/self/fd/{fd}")), RTLD_NOW | RTLD_LOCAL) }.map(Into::into)
}

/// What distinguishes one version of a file from the next: a rename or `cargo build` changes
/// the inode, a write in place the size or modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Identity {
    dev: u64,
    ino: u64,
    len: u64,
    pub(crate) modified: std::time::SystemTime,
}

impl Identity {
    /// Whether it can be sent to another process (`hotswap upgrade`): serde writes no time
    /// before 1970.
    pub(crate) fn sendable(&self) -> bool {
        self.modified >= std::time::UNIX_EPOCH
    }

    pub(crate) fn of(path: &Path) -> Option<Identity> {
        Identity::from_metadata(&fs::metadata(path).ok()?)
    }

    /// An identity with only a modification time, for unit tests of ordering rules.
    #[cfg(test)]
    pub(crate) fn for_tests(modified: std::time::SystemTime) -> Identity {
        Identity { dev: 0, ino: modified.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()), len: 0, modified }
    }

    pub(crate) fn from_metadata(m: &fs::Metadata) -> Option<Identity> {
        use std::os::unix::fs::MetadataExt;
        if !m.is_file() {
            return None;
        }
        Some(Identity { dev: m.dev(), ino: m.ino(), len: m.len(), modified: m.modified().ok()? })
    }
}

/// Where generations' private copies of their libraries live: a directory only this host
/// uses (mode 0700), removed at exit.
///
/// Each copy has a unique path: `dlopen` caches by path (and by inode), so loading the user's
/// file directly, or reusing a path, would hand back the old, still-mapped library; and `cp`
/// over a mapped file would corrupt running code. The directory holds a lock file, locked
/// for as long as the host runs, so that the next host can tell the directory of a crashed
/// one from a live one, and remove it.
#[derive(Debug)]
pub(crate) struct ShadowDir {
    dir: PathBuf,
    lock: Mutex<fs::File>,
    /// Numbers the copies: every load gets a path never used before (dlopen caches by path).
    copies: AtomicU64,
}

/// Shadow directories are named `hotswap-<pid>-<n>`.
const SHADOW_PREFIX: &str = "hotswap-";
const LOCK_FILE: &str = ".lock";
/// Where the bytes of recent generations are kept for rollbacks.
const KEPT_DIR: &str = "kept";

impl ShadowDir {
    /// Creates a private directory in `base` (default: the system's temporary directory),
    /// first removing any a crashed host left there.
    pub(crate) fn create(base: Option<&Path>) -> std::io::Result<ShadowDir> {
        let base = base.map(Path::to_path_buf).unwrap_or_else(std::env::temp_dir);
        {
            use std::os::unix::fs::DirBuilderExt as _;
            // Not writable by others whatever the umask: it is checked next.
            fs::DirBuilder::new().recursive(true).mode(0o755).create(&base)?;
        }
        check_base(&base)?;
        remove_stale(&base);
        // Another host of the same pid (in another pid namespace) may hold `-0`.
        let mut n = 0;
        loop {
            let dir = base.join(format!("{SHADOW_PREFIX}{}-{n}", std::process::id()));
            match create_private(&dir) {
                Ok(lock) => return Ok(ShadowDir { dir, lock: Mutex::new(lock), copies: AtomicU64::new(1) }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 100 => n += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// Copies the opened plugin file `source` (at `path`) to a fresh path, streaming (a plugin is never held in memory whole), and returns what the copy
    /// holds: its length, its first bytes (for the completeness check) and, with `hash`, its
    /// SHA-256. If the directory has vanished (a temporary-file cleaner), it is created again.
    pub(crate) fn copy(&self, path: &Path, source: &mut fs::File, hash: bool) -> Result<Copy, LoadError> {
        use std::io::ErrorKind;
        use std::os::unix::fs::OpenOptionsExt;
        let stem = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "plugin.so".into());
        let n = self.copies.fetch_add(1, Ordering::Relaxed);
        let shadow = self.dir.join(format!("c{n}-{stem}"));
        // create_new: never follow a link or reuse a file someone else put there.
        let create = || fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&shadow);
        let created = match self.check_private() {
            Err(e) if e.kind() == ErrorKind::NotFound => self.recreate().and_then(|()| create()),
            Err(e) => Err(e),
            Ok(()) => create(),
        };
        let copied = created.map_err(Failed::Write).and_then(|mut out| {
            let (len, head, sha256) = stream(source, &mut out, hash)?;
            // From here on the copy is known by this descriptor, never again by its path.
            let file = reopen_read_only(&out).map_err(Failed::Write)?;
            Ok(Copy { file, shadow: shadow.clone(), len, head, sha256 })
        });
        copied.map_err(|failed| {
            let _ = fs::remove_file(&shadow);
            match failed {
                Failed::Read(source) => LoadError::Read { path: path.to_path_buf(), source },
                Failed::Write(source) => {
                    let hint = match source.kind() {
                        ErrorKind::StorageFull | ErrorKind::QuotaExceeded => {
                            " (the disk is full: free space there, or give --shadow-dir on another file system)"
                        }
                        ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem | ErrorKind::NotADirectory => {
                            " (make it a directory this host can write, or give another --shadow-dir)"
                        }
                        _ => "",
                    };
                    LoadError::Shadow { path: path.to_path_buf(), shadow_dir: self.dir.clone(), source, hint }
                }
            }
        })
    }

    /// Keeps the bytes of a loaded copy for a later rollback, as a hard link in `kept/`
    /// (the copy itself is deleted when its generation unloads). Returns the link's path.
    pub(crate) fn keep(&self, shadow: &Path) -> std::io::Result<PathBuf> {
        use std::os::unix::fs::DirBuilderExt;
        let kept = self.dir.join(KEPT_DIR);
        match fs::DirBuilder::new().mode(0o700).create(&kept) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        let link = kept.join(shadow.file_name().unwrap_or(shadow.as_os_str()));
        fs::hard_link(shadow, &link)?;
        Ok(link)
    }

    /// Keeps, as [`ShadowDir::keep`] does, a copy another host process kept (the one this
    /// host replaces, whose directory goes when it exits): a hard link if both directories
    /// are on one file system, else a copy.
    pub(crate) fn keep_from(&self, kept: &Path) -> std::io::Result<PathBuf> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = self.dir.join(KEPT_DIR);
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        let n = self.copies.fetch_add(1, Ordering::Relaxed);
        let name = kept.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "plugin.so".into());
        let link = dir.join(format!("i{n}-{name}"));
        if fs::hard_link(kept, &link).is_err() {
            fs::copy(kept, &link)?;
        }
        Ok(link)
    }

    /// Checks that the directory is still the one this host made: its own, private.
    fn check_private(&self) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt as _;
        let meta = fs::symlink_metadata(&self.dir)?;
        if !meta.is_dir() || meta.uid() != crate::sys::effective_uid() || meta.mode() & 0o077 != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "it is no longer the private directory this host made (now owned by uid {}, mode {:04o}): \
                     someone replaced it",
                    meta.uid(),
                    meta.mode() & 0o7777
                ),
            ));
        }
        Ok(())
    }

    /// Creates the directory again after it was removed under us.
    fn recreate(&self) -> std::io::Result<()> {
        if let Some(base) = self.dir.parent() {
            check_base(base)?;
        }
        let lock = create_private(&self.dir)?;
        tracing::warn!(dir = %self.dir.display(), "the shadow directory was removed by someone else; created it again");
        *self.lock.lock().unwrap_or_else(PoisonError::into_inner) = lock;
        Ok(())
    }
}

impl Drop for ShadowDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// [`trust::check_shadow_base`](crate::plugin::trust::check_shadow_base), as an I/O error.
fn check_base(base: &Path) -> std::io::Result<()> {
    crate::plugin::trust::check_shadow_base(base)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::PermissionDenied, e.to_string()))
}

/// Creates `dir` with mode 0700 (whatever the umask) and returns its lock file, locked.
fn create_private(dir: &Path) -> std::io::Result<fs::File> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    fs::DirBuilder::new().mode(0o700).create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    let lock = fs::File::create(dir.join(LOCK_FILE))?;
    lock.lock()?;
    Ok(lock)
}

/// Removes the shadow directories of hosts that are no longer running: ours by owner and
/// name, with a lock file nobody holds (a live host holds its own for as long as it runs).
fn remove_stale(base: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = fs::read_dir(base) else { return };
    let uid = crate::sys::effective_uid();
    for entry in entries.filter_map(Result::ok) {
        let dir = entry.path();
        let ours = entry.file_name().to_string_lossy().starts_with(SHADOW_PREFIX)
            && fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir() && m.uid() == uid);
        if !ours {
            continue;
        }
        let Ok(lock) = fs::File::open(dir.join(LOCK_FILE)) else { continue };
        if lock.try_lock().is_ok() {
            match fs::remove_dir_all(&dir) {
                Ok(()) => tracing::info!(dir = %dir.display(), "removed the shadow directory of a host that is no longer running"),
                Err(e) => tracing::warn!(dir = %dir.display(), "cannot remove a stale shadow directory: {e}"),
            }
        }
    }
}

/// A plugin file opened for loading, with what the open file is (so checks and copy always
/// concern the same file).
pub(crate) struct PluginFile {
    pub(crate) file: fs::File,
    pub(crate) metadata: fs::Metadata,
    /// Where the opened file really is (symbolic links resolved), if the kernel says.
    pub(crate) real_path: Option<PathBuf>,
}

/// Opens a plugin file; refuses, without waiting, one that is not a regular file (a FIFO
/// named `*.so` would block the open until a writer came: see `trust::open_regular`).
pub(crate) fn open_plugin(path: &Path) -> Result<PluginFile, LoadError> {
    use std::os::fd::AsRawFd as _;
    let open = || -> std::io::Result<_> {
        let (file, metadata) = crate::plugin::trust::open_regular(path)?;
        let real_path = fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).ok();
        Ok(PluginFile { file, metadata, real_path })
    };
    open().map_err(|source| LoadError::Read { path: path.to_path_buf(), source })
}

/// A private copy, as written.
pub(crate) struct Copy {
    /// The copy, open for reading: what is checked, probed and mapped.
    pub(crate) file: fs::File,
    pub(crate) shadow: PathBuf,
    pub(crate) len: u64,
    /// The first bytes (up to [`HEAD_LEN`]), for the completeness check.
    pub(crate) head: Vec<u8>,
    /// SHA-256 of the copy, in lowercase hex, when asked for.
    pub(crate) sha256: Option<String>,
}

/// SHA-256 of the file at `path`, in lowercase hex, read in 64 KiB steps. Blocking.
pub(crate) fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut fs::File::open(path)?, &mut hasher)?;
    Ok(crate::plugin::trust::hex(&hasher.finalize()))
}

/// Opens the file `file` is open on again, read-only, through `/proc/self/fd` (the same file
/// whatever its path now names).
fn reopen_read_only(file: &fs::File) -> std::io::Result<fs::File> {
    use std::os::fd::AsRawFd as _;
    fs::File::open(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

enum Failed {
    Read(std::io::Error),
    Write(std::io::Error),
}

/// How much of the start of a plugin file a copy keeps for [`check_complete`]: the ELF header
/// and the program header table that linkers put right after it (at 56 bytes an entry, far
/// more than a library has).
const HEAD_LEN: usize = 64 * 1024;

/// Copies `from` to `to` in 64 KiB steps; returns the length, the first [`HEAD_LEN`] bytes and
/// the SHA-256 (with `hash`).
fn stream(from: &mut fs::File, to: &mut fs::File, hash: bool) -> Result<(u64, Vec<u8>, Option<String>), Failed> {
    use sha2::Digest as _;
    use std::io::{ErrorKind, Read as _, Write as _};
    let mut buf = vec![0u8; 64 * 1024];
    let (mut len, mut head, mut hasher) = (0u64, Vec::new(), hash.then(sha2::Sha256::new));
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(Failed::Read(e)),
        };
        let chunk = &buf[..n];
        if head.len() < HEAD_LEN {
            head.extend_from_slice(&chunk[..chunk.len().min(HEAD_LEN - head.len())]);
        }
        if let Some(hasher) = hasher.as_mut() {
            hasher.update(chunk);
        }
        to.write_all(chunk).map_err(Failed::Write)?;
        len += n as u64;
    }
    Ok((len, head, hasher.map(|h| crate::plugin::trust::hex(&h.finalize()))))
}

/// Checks that an ELF file (`bytes`: its first bytes, as [`Copy::head`] holds them; `len`: its
/// length) is as long as its own headers say, so that a file still being written, or cut
/// short, is never handed to `dlopen`: its mappings past the end of the file fault (SIGBUS)
/// when touched, taking the host down.
///
/// The file must hold its ELF header, its program header table, every loaded segment
/// (`PT_LOAD`, `p_offset + p_filesz`: what `dlopen` maps) and, when it has one, its section
/// header table (linkers write it last, at the very end). The section headers alone are not
/// enough: a stripped library may have none (`sstrip`, `strip --strip-section-headers`), and
/// then only the program headers say where it ends.
///
/// Written by hand: it reads a dozen header fields, not worth an ELF-parsing dependency. Files
/// that are not 64-bit little-endian ELF pass (`dlopen` refuses them with its own message),
/// and so does a program header table `dlopen` would refuse (entries not 56 bytes long);
/// files shorter than an ELF header fail. A program header table past the bytes given (linkers
/// put it right after the ELF header) cannot be read: only its own end is checked then.
pub(crate) fn check_complete(path: &Path, bytes: &[u8], len: u64) -> Result<(), LoadError> {
    let needed = elf_end(bytes);
    if needed > len { Err(LoadError::Incomplete { path: path.to_path_buf(), len, needed }) } else { Ok(()) }
}

/// Size of the ELF64 file header.
const ELF_HEADER: u64 = 64;
/// Size of an ELF64 program header.
const PROGRAM_HEADER: u64 = 56;
/// The program header type of a loaded segment.
const PT_LOAD: u32 = 1;

/// Where the ELF image starting with `bytes` says it ends (0 if it is not 64-bit
/// little-endian ELF); see [`check_complete`].
fn elf_end(bytes: &[u8]) -> u64 {
    if bytes.len() < ELF_HEADER as usize {
        // Empty, or the start of an ELF header: it needs at least a whole one.
        return if b"\x7fELF".starts_with(&bytes[..bytes.len().min(4)]) { ELF_HEADER } else { 0 };
    }
    if &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        return 0;
    }
    // Fields of `bytes` at `at`, little-endian; `None` past the end.
    let field = |at: u64, n: usize| -> Option<u64> {
        let at = usize::try_from(at).ok()?;
        let field = bytes.get(at..at.checked_add(n)?)?;
        Some(field.iter().rev().fold(0, |v, b| v << 8 | u64::from(*b)))
    };
    let header = |at: u64, n: usize| field(at, n).unwrap_or_default();
    let mut end = ELF_HEADER;

    let (shoff, shentsize, shnum) = (header(0x28, 8), header(0x3a, 2), header(0x3c, 2));
    if shoff != 0 {
        end = end.max(shoff.saturating_add(shentsize * shnum));
    }

    let (phoff, phentsize, phnum) = (header(0x20, 8), header(0x36, 2), header(0x38, 2));
    if phnum == 0 || phentsize != PROGRAM_HEADER {
        return end;
    }
    end = end.max(phoff.saturating_add(phentsize * phnum));
    for entry in (0..phnum).map(|i| phoff.saturating_add(i * phentsize)) {
        let (Some(kind), Some(offset), Some(size)) =
            (field(entry, 4), field(entry.saturating_add(8), 8), field(entry.saturating_add(0x20), 8))
        else {
            break; // past the bytes given: only the table's end is checked
        };
        if kind == u64::from(PT_LOAD) {
            end = end.max(offset.saturating_add(size));
        }
    }
    end
}

/// What `/proc/self/maps` still maps of one file.
struct Mappings {
    /// Bytes mapped.
    bytes: u64,
    /// Whether any of it is executable: code.
    code: bool,
}

/// One line of `/proc/self/maps`: `start-end perms offset dev inode path`.
struct MapsLine<'a> {
    start: u64,
    end: u64,
    perms: &'a str,
    /// The file mapped, as the maps name it (`major:minor` and inode); `None` if anonymous.
    file: Option<(&'a str, &'a str)>,
    line: &'a str,
}

impl MapsLine<'_> {
    fn parse(line: &str) -> Option<MapsLine<'_>> {
        let mut fields = line.split_ascii_whitespace();
        let (start, end) = fields.next()?.split_once('-')?;
        let perms = fields.next()?;
        let (dev, inode) = (fields.nth(1)?, fields.next()?);
        let (start, end) = (u64::from_str_radix(start, 16).ok()?, u64::from_str_radix(end, 16).ok()?);
        Some(MapsLine { start, end, perms, file: (inode != "0").then_some((dev, inode)), line })
    }

    /// The file it maps, owned.
    fn file_id(&self) -> Option<(String, String)> {
        self.file.map(|(dev, inode)| (dev.to_owned(), inode.to_owned()))
    }
}

/// This process's mappings, as text to parse with [`MapsLine::parse`].
fn read_maps() -> Option<String> {
    fs::read_to_string("/proc/self/maps").ok()
}

/// How `/proc/self/maps` names the file at `path` (device and inode, as it prints them), from
/// a line that maps it.
fn maps_id_of(path: &Path) -> Option<(String, String)> {
    let path = path.to_str()?.trim_end_matches(" (deleted)");
    let maps = read_maps()?;
    let named = |m: &MapsLine<'_>| m.line.trim_end().trim_end_matches(" (deleted)").ends_with(path);
    maps.lines().filter_map(MapsLine::parse).find(|m| m.file.is_some() && named(m))?.file_id()
}

/// How `/proc/self/maps` names the file mapped at `address` (device and inode, as printed).
fn maps_id_at(address: u64) -> Option<(String, String)> {
    let maps = read_maps()?;
    maps.lines().filter_map(MapsLine::parse).find(|m| m.file.is_some() && (m.start..m.end).contains(&address))?.file_id()
}

/// What `/proc/self/maps` lists of the file it names `id` (see [`maps_id_of`]): the real test
/// that `dlclose` unmapped it. If the maps cannot be read, the file counts as mapped code.
fn mappings_of((device, inode): &(String, String)) -> Mappings {
    let Some(maps) = read_maps() else { return Mappings { bytes: 0, code: true } };
    let ours = maps.lines().filter_map(MapsLine::parse).filter(|m| m.file == Some((device.as_str(), inode.as_str())));
    ours.fold(Mappings { bytes: 0, code: false }, |mapped, m| Mappings {
        bytes: mapped.bytes + m.end.saturating_sub(m.start),
        code: mapped.code || m.perms.contains('x'),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PT_DYNAMIC: u32 = 2;
    const PT_GNU_STACK: u32 = 0x6474_e551;

    /// A 64-bit little-endian ELF header and, right after it, program headers `(type, offset,
    /// size in the file)`; `sections` section headers at `shoff` (none if 0).
    fn elf(segments: &[(u32, u64, u64)], shoff: u64, sections: u16) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
        b[0x10..0x12].copy_from_slice(&3u16.to_le_bytes()); // ET_DYN
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        b[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        b[0x34..0x36].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        b[0x38..0x3a].copy_from_slice(&u16::try_from(segments.len()).unwrap().to_le_bytes());
        b[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes()); // e_shentsize
        b[0x3c..0x3e].copy_from_slice(&sections.to_le_bytes());
        for &(kind, offset, size) in segments {
            let mut ph = [0u8; 56];
            ph[..4].copy_from_slice(&kind.to_le_bytes());
            ph[8..16].copy_from_slice(&offset.to_le_bytes());
            ph[0x20..0x28].copy_from_slice(&size.to_le_bytes()); // p_filesz
            ph[0x28..0x30].copy_from_slice(&size.to_le_bytes()); // p_memsz
            b.extend_from_slice(&ph);
        }
        b
    }

    /// Where `check_complete` says a file starting with `bytes`, `len` bytes long, must end
    /// at least; `None` if it passes.
    fn needed(bytes: &[u8], len: u64) -> Option<u64> {
        match check_complete(Path::new("lib.so"), bytes, len) {
            Ok(()) => None,
            Err(LoadError::Incomplete { needed, len: l, .. }) => {
                assert_eq!(l, len);
                Some(needed)
            }
            Err(e) => panic!("not an Incomplete error: {e}"),
        }
    }

    /// A library as a linker lays it out: two loaded segments, the dynamic section inside the
    /// second, then what is not loaded (symbols, debug information) and the section headers.
    const LOADS: [(u32, u64, u64); 4] =
        [(PT_LOAD, 0, 0x2000), (PT_LOAD, 0x2000, 0x3000), (PT_DYNAMIC, 0x4000, 0x100), (PT_GNU_STACK, 0, 0)];

    #[test]
    fn maps_lines_are_read_field_by_field() {
        let file = MapsLine::parse("7fc2148e4000-7fc21490e000 r-xp 00029000 fe:00 10010653   /tmp/h x/c1-app.so (deleted)").unwrap();
        assert_eq!((file.start, file.end, file.perms, file.file), (0x7fc2_148e_4000, 0x7fc2_1490_e000, "r-xp", Some(("fe:00", "10010653"))));
        let anonymous = MapsLine::parse("7ffd1000-7ffd2000 rw-p 00000000 00:00 0 ").unwrap();
        assert_eq!(anonymous.file, None);
        assert!(MapsLine::parse("not a mapping").is_none());
    }

    #[test]
    fn a_stripped_library_cut_short_inside_a_loaded_segment_is_incomplete() {
        // No section headers (sstrip, strip --strip-section-headers): the program headers
        // alone say that the file ends at 0x5000.
        let stripped = elf(&LOADS, 0, 0);
        assert_eq!(needed(&stripped, 0x3000), Some(0x5000));
        assert_eq!(needed(&stripped, 0x4fff), Some(0x5000));
        assert_eq!(needed(&stripped, 0x5000), None);
        assert_eq!(needed(&stripped, 0x9000), None, "what follows the loaded segments is not needed");
    }

    #[test]
    fn section_headers_when_present_are_needed_too() {
        let full = elf(&LOADS, 0x8000, 10);
        assert_eq!(needed(&full, 0x5000), Some(0x8000 + 640), "symbols and section headers cut off");
        assert_eq!(needed(&full, 0x8000 + 640), None);
        // Section headers before the end of a loaded segment do not hide it.
        let odd = elf(&LOADS, 0x1000, 2);
        assert_eq!(needed(&odd, 0x1000 + 128), Some(0x5000));
    }

    #[test]
    fn the_program_header_table_itself_must_be_there() {
        let stripped = elf(&LOADS, 0, 0);
        // Only the ELF header has been written so far.
        assert_eq!(needed(&stripped[..64], 64), Some(64 + 4 * 56));
        assert_eq!(needed(&stripped[..100], 100), Some(64 + 4 * 56));
        // A table past the bytes given: its end is checked, its entries cannot be.
        assert_eq!(needed(&stripped[..100], 64 + 4 * 56), None);
    }

    #[test]
    fn only_loaded_segments_count_and_nothing_overflows() {
        // A segment that is not loaded (here one claiming to lie far out) is not mapped.
        let note = elf(&[(PT_LOAD, 0, 0x1000), (4, 0x10_0000, 0x10)], 0, 0);
        assert_eq!(needed(&note, 0x1000), None);
        let huge = elf(&[(PT_LOAD, u64::MAX - 1, 0x10)], u64::MAX - 4, 0xffff);
        assert_eq!(needed(&huge, 1 << 20), Some(u64::MAX));
    }

    #[test]
    fn program_headers_of_another_size_are_left_to_dlopen() {
        let mut odd = elf(&LOADS, 0, 0);
        odd[0x36..0x38].copy_from_slice(&64u16.to_le_bytes());
        assert_eq!(needed(&odd, 0x1000), None);
    }

    /// A fresh directory of this test process.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hotswap-loader-test-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A harmless real shared library of the system: glibc's `libdl.so.2` (an empty stub since
    /// glibc 2.34), found beside the libc this process runs on.
    fn system_library() -> PathBuf {
        let maps = fs::read_to_string("/proc/self/maps").unwrap();
        let libc = maps.lines().filter_map(|l| l.split_whitespace().nth(5)).find(|p| p.ends_with("/libc.so.6"));
        let libdl = Path::new(libc.expect("libc.so.6 is not mapped")).with_file_name("libdl.so.2");
        assert!(libdl.is_file(), "{} is missing", libdl.display());
        libdl
    }

    #[test]
    fn the_library_mapped_is_the_copy_that_was_checked_even_if_its_path_is_replaced() {
        let dir = scratch("bound");
        let shadow = ShadowDir::create(Some(&dir)).unwrap();
        let library = system_library();
        let mut source = fs::File::open(&library).unwrap();
        let copy = shadow.copy(&library, &mut source, true).unwrap();
        // Someone replaces the checked copy by another file between the checks and dlopen.
        let other = copy.shadow.with_extension("other");
        fs::write(&other, b"not the bytes that were checked").unwrap();
        fs::rename(&other, &copy.shadow).unwrap();
        // SAFETY: libdl.so.2 is a system library without initialisers of its own.
        let opened = unsafe { Library::open(copy.file, &copy.shadow, &copy.shadow) };
        // The checked bytes were mapped (a real library, not a plugin), not the file now at
        // the path (not a library at all).
        assert!(matches!(opened.as_ref().map_err(|r| &r.error), Err(LoadError::NotAPlugin { .. })), "{:?}", opened.err());
        drop(shadow);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_shadow_base_directory_must_not_let_others_replace_what_is_in_it() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = scratch("base");
        let mode = |m: u32| fs::set_permissions(&dir, fs::Permissions::from_mode(m)).unwrap();
        mode(0o777);
        let error = ShadowDir::create(Some(&dir)).expect_err("a world-writable base was accepted").to_string();
        assert!(error.contains("writable by others than its owner (mode 0777) and not sticky"), "{error}");
        assert!(error.contains("chmod +t"), "{error}");
        mode(0o1777);
        ShadowDir::create(Some(&dir)).expect("a sticky base like /tmp is fine");
        mode(0o755);
        let shadow = ShadowDir::create(Some(&dir)).expect("a base only its owner writes is fine");
        // The private directory replaced by one that is not private any more: refused.
        fs::set_permissions(&shadow.dir, fs::Permissions::from_mode(0o777)).unwrap();
        let library = system_library();
        let error = shadow.copy(&library, &mut fs::File::open(&library).unwrap(), false).err().expect("copied").to_string();
        assert!(error.contains("no longer the private directory this host made"), "{error}");
        drop(shadow);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_fifo_named_like_a_plugin_is_refused_without_waiting_for_a_writer() {
        let dir = scratch("fifo");
        let fifo = dir.join("app.so");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        let (tx, rx) = std::sync::mpsc::channel();
        let path = fifo.clone();
        std::thread::spawn(move || tx.send(open_plugin(&path).map(|_| ())));
        let Ok(opened) = rx.recv_timeout(std::time::Duration::from_secs(5)) else {
            // Let the stuck open go (a writer arrives), then fail.
            let _ = fs::OpenOptions::new().write(true).open(&fifo);
            panic!("opening a FIFO named app.so waited for a writer");
        };
        let error = opened.expect_err("a FIFO was opened as a plugin").to_string();
        assert!(error.contains("app.so: it is a FIFO (named pipe), not a regular file"), "{error}");

        let error = open_plugin(&dir).map(|_| ()).expect_err("a directory was opened as a plugin").to_string();
        assert!(error.ends_with("it is a directory, not a regular file"), "{error}");
        fs::write(dir.join("real.so"), b"\x7fELF").unwrap();
        let file = open_plugin(&dir.join("real.so")).map_err(|e| e.to_string()).unwrap();
        assert!(file.metadata.is_file());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn files_shorter_than_an_elf_header_and_other_formats() {
        assert_eq!(needed(b"", 0), Some(64));
        assert_eq!(needed(b"\x7fEL", 3), Some(64));
        assert_eq!(needed(b"\x7fELF\x02\x01", 6), Some(64));
        assert_eq!(needed(b"#!/bin/sh\n", 10), None);
        let mut elf32 = elf(&LOADS, 0, 0);
        elf32[4] = 1;
        assert_eq!(needed(&elf32, 0x1000), None, "32-bit ELF is dlopen's to refuse");
        let mut big_endian = elf(&LOADS, 0, 0);
        big_endian[5] = 2;
        assert_eq!(needed(&big_endian, 0x1000), None);
    }
}
