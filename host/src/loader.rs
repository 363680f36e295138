//! Opening plugin libraries: private shadow copies, `dlopen`, and the declaration check that
//! comes before any other call into the plugin.

use std::fs;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use handler_api::abi::{self, DeclarationHeader, PluginDeclaration};

/// Why a plugin file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The file could not be read or copied.
    #[error("cannot copy {path} to the shadow directory {shadow_dir}: {source}")]
    Copy { path: PathBuf, shadow_dir: PathBuf, source: std::io::Error },
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
}

/// A plugin library mapped into the process, whose declaration has been checked.
///
/// Dropping it closes the library (`dlclose`). The host only drops it once no code of the
/// plugin can run any more: see `generation`.
pub struct Library {
    // Declared before `library`: nothing may use the declaration once the library is closed.
    declaration: NonNull<PluginDeclaration>,
    library: libloading::Library,
    pub name: String,
    pub version: String,
    pub rustc: String,
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
    pub unsafe fn open(shadow: &Path) -> Result<Library, LoadError> {
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
        let (name, version, rustc) =
            unsafe { (decl.name.to_string_lossy(), decl.version.to_string_lossy(), decl.rustc.to_string_lossy()) };
        Ok(Library { declaration, library, name, version, rustc })
    }

    /// The checked declaration, valid while `self` is.
    pub fn declaration(&self) -> &PluginDeclaration {
        // SAFETY: checked in `open`; the library stays mapped while `self` lives.
        unsafe { self.declaration.as_ref() }
    }

    /// Closes the library.
    pub fn close(self) -> Result<(), String> {
        self.library.close().map_err(|e| e.to_string())
    }
}

/// Where a generation's private copy of its library lives.
///
/// Each copy has a unique path: `dlopen` caches by path (and by inode), so loading the user's
/// file directly, or reusing a path, would hand back the old, still-mapped library; and `cp`
/// over a mapped file would corrupt running code.
#[derive(Debug)]
pub struct ShadowDir {
    dir: PathBuf,
}

impl ShadowDir {
    /// Creates a private directory (mode 0700) for this process's shadow copies.
    pub fn create(base: Option<&Path>) -> std::io::Result<ShadowDir> {
        use std::os::unix::fs::DirBuilderExt;
        let base = base.map(Path::to_path_buf).unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("hotswap-{}", std::process::id()));
        if dir.exists() {
            fs::remove_dir_all(&dir)?; // a stale one from a previous process with our pid
        }
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        Ok(ShadowDir { dir })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Copies `source` to a fresh path for generation `id`.
    pub fn copy_in(&self, source: &Path, id: u64) -> Result<PathBuf, LoadError> {
        let stem = source.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "plugin.so".into());
        let shadow = self.dir.join(format!("g{id}-{stem}"));
        fs::copy(source, &shadow).map_err(|source_err| LoadError::Copy {
            path: source.to_path_buf(),
            shadow_dir: self.dir.clone(),
            source: source_err,
        })?;
        Ok(shadow)
    }
}

impl Drop for ShadowDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Checks that an ELF file is as long as its own headers say, so that a file still being
/// written is never handed to `dlopen` (whose mappings past the end of a file fault on
/// access). Linkers write the section header table last, at the end of the file, so its end
/// is where the file must end. Written by hand: it is 15 lines of reading three header fields,
/// not worth an ELF-parsing dependency. Files that are not 64-bit little-endian ELF pass
/// (`dlopen` refuses them with its own message); files shorter than a header fail.
pub fn check_complete(path: &Path) -> Result<(), LoadError> {
    let bytes = fs::read(path).map_err(|e| LoadError::Open { path: path.to_path_buf(), reason: e.to_string() })?;
    let len = bytes.len() as u64;
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
pub fn is_mapped(path: &Path) -> bool {
    let needle = path.to_string_lossy();
    fs::read_to_string("/proc/self/maps").map(|maps| maps.lines().any(|l| l.contains(needle.as_ref()))).unwrap_or(false)
}
