//! Opening plugin libraries: private shadow copies, `dlopen`, and the declaration check that
//! comes before any other call into the plugin.

use std::fs;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use handler_api::abi::{self, DeclarationHeader, PluginDeclaration};

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
}

/// A plugin library mapped into the process, whose declaration has been checked.
///
/// Dropping it closes the library (`dlclose`). The host only drops it once no code of the
/// plugin can run any more: see `generation`.
pub(crate) struct Library {
    // Declared before `library`: nothing may use the declaration once the library is closed.
    declaration: NonNull<PluginDeclaration>,
    library: libloading::Library,
    pub(crate) name: String,
    pub(crate) version: semver::Version,
}

// SAFETY: `declaration` points at immutable static data inside the library, which `Library`
// keeps mapped; `libloading::Library` is Send + Sync.
unsafe impl Send for Library {}
// SAFETY: as above.
unsafe impl Sync for Library {}

impl Library {
    /// Opens `shadow` (a private copy, never the user's file) and checks its declaration.
    ///
    /// # Safety
    /// Loading a library runs its initialisers, as any native code would: `shadow` must be a
    /// file the operator has chosen to trust.
    pub(crate) unsafe fn open(shadow: &Path) -> Result<Library, LoadError> {
        use libloading::os::unix::{Library as UnixLibrary, RTLD_LOCAL, RTLD_NOW};
        let path = shadow.to_path_buf();
        // RTLD_NOW: refuse a library with unresolved symbols now, not at its first call.
        // SAFETY: forwarded to the caller (the library's initialisers run here).
        let library: libloading::Library = unsafe { UnixLibrary::open(Some(shadow), RTLD_NOW | RTLD_LOCAL) }
            .map_err(|e| LoadError::Open { path: path.clone(), reason: e.to_string() })?
            .into();
        let symbol = abi::DECLARATION_SYMBOL;
        // SAFETY: we only take the symbol's address here; it is read below as a header.
        let address = unsafe { library.get::<*const DeclarationHeader>(symbol.as_bytes()) }
            .map(|s| *s)
            .map_err(|_| LoadError::NotAPlugin { path: path.clone(), symbol })?;
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
        let version = semver::Version::parse(&version).map_err(|reason| LoadError::Version { path, name: name.clone(), version, reason })?;
        Ok(Library { declaration, library, name, version })
    }

    /// The checked declaration, valid while `self` is.
    pub(crate) fn declaration(&self) -> &PluginDeclaration {
        // SAFETY: checked in `open`; the library stays mapped while `self` lives.
        unsafe { self.declaration.as_ref() }
    }

    /// Closes the library.
    pub(crate) fn close(self) -> Result<(), libloading::Error> {
        self.library.close()
    }
}

/// What distinguishes one version of a file from the next: a rename or `cargo build` changes
/// the inode, a write in place the size or modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Identity {
    dev: u64,
    ino: u64,
    len: u64,
    pub(crate) modified: std::time::SystemTime,
}

impl Identity {
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
        fs::create_dir_all(&base)?;
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
        let created = match create() {
            Err(e) if e.kind() == ErrorKind::NotFound => self.recreate().and_then(|()| create()),
            other => other,
        };
        let copied = created.map_err(Failed::Write).and_then(|mut out| stream(source, &mut out, hash));
        copied.map(|(len, head, sha256)| Copy { shadow: shadow.clone(), len, head, sha256 }).map_err(|failed| {
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

    /// Creates the directory again after it was removed under us.
    fn recreate(&self) -> std::io::Result<()> {
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

/// Opens a plugin file.
pub(crate) fn open_plugin(path: &Path) -> Result<PluginFile, LoadError> {
    use std::os::fd::AsRawFd as _;
    let open = || -> std::io::Result<_> {
        let file = fs::File::open(path)?;
        let metadata = file.metadata()?;
        let real_path = fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).ok();
        Ok(PluginFile { file, metadata, real_path })
    };
    open().map_err(|source| LoadError::Read { path: path.to_path_buf(), source })
}

/// A private copy, as written.
pub(crate) struct Copy {
    pub(crate) shadow: PathBuf,
    pub(crate) len: u64,
    /// The first bytes (up to an ELF header's 64).
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

enum Failed {
    Read(std::io::Error),
    Write(std::io::Error),
}

/// Copies `from` to `to` in 64 KiB steps; returns the length, the first 64 bytes and the
/// SHA-256 (with `hash`).
fn stream(from: &mut fs::File, to: &mut fs::File, hash: bool) -> Result<(u64, Vec<u8>, Option<String>), Failed> {
    use sha2::Digest as _;
    use std::io::{ErrorKind, Read as _, Write as _};
    let mut buf = vec![0u8; 64 * 1024];
    let (mut len, mut head, mut hasher) = (0u64, Vec::with_capacity(64), hash.then(sha2::Sha256::new));
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(Failed::Read(e)),
        };
        let chunk = &buf[..n];
        if head.len() < 64 {
            head.extend_from_slice(&chunk[..chunk.len().min(64 - head.len())]);
        }
        if let Some(hasher) = hasher.as_mut() {
            hasher.update(chunk);
        }
        to.write_all(chunk).map_err(Failed::Write)?;
        len += n as u64;
    }
    Ok((len, head, hasher.map(|h| crate::plugin::trust::hex(&h.finalize()))))
}

/// Checks that an ELF file (`bytes`: its first 64 bytes or more; `len`: its length) is as
/// long as its own headers say, so that a file still being
/// written is never handed to `dlopen` (whose mappings past the end of a file fault on
/// access). Linkers write the section header table last, at the end of the file, so its end
/// is where the file must end. Written by hand: it is 15 lines of reading three header fields,
/// not worth an ELF-parsing dependency. Files that are not 64-bit little-endian ELF pass
/// (`dlopen` refuses them with its own message); files shorter than a header fail.
pub(crate) fn check_complete(path: &Path, bytes: &[u8], len: u64) -> Result<(), LoadError> {
    let incomplete = |needed| Err(LoadError::Incomplete { path: path.to_path_buf(), len, needed });
    if bytes.len() < 64 {
        return if bytes.is_empty() || b"\x7fELF".starts_with(&bytes[..bytes.len().min(4)]) { incomplete(64) } else { Ok(()) };
    }
    if &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        return Ok(());
    }
    let u16_at = |o: usize| u64::from(u16::from_le_bytes([bytes[o], bytes[o + 1]]));
    let shoff = u64::from_le_bytes(bytes[0x28..0x30].try_into().unwrap_or_default());
    let needed = shoff.saturating_add(u16_at(0x3a).saturating_mul(u16_at(0x3c)));
    if needed > len { incomplete(needed) } else { Ok(()) }
}

/// Whether `/proc/self/maps` still lists `path`: the real test that `dlclose` unmapped it.
pub(crate) fn is_mapped(path: &Path) -> bool {
    let needle = path.to_string_lossy();
    fs::read_to_string("/proc/self/maps").map(|maps| maps.lines().any(|l| l.contains(needle.as_ref()))).unwrap_or(false)
}
