//! Which plugin files the host agrees to load.
//!
//! Loading a plugin runs its code with the host's privileges, so a plugin is only as
//! trustworthy as the places it comes from. Like sshd's StrictModes, the host refuses a plugin
//! file, or the directory it is in, that is writable by group or others or owned by a user
//! other than the host's or root: anyone who can write there can replace the code the host
//! runs. `--insecure-plugin-dir` loads such files anyway, with a warning at every load.
//!
//! With `--trusted-digests FILE`, only plugins whose SHA-256 is listed in FILE are loaded.
//! The digest is taken of the very bytes that are loaded (the private copy), and the list is
//! read again at every load, so adding a digest takes effect without a restart.

#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::fs::{File, Metadata};
use std::io::Read as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::sys;

/// Why a plugin file was not trusted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum TrustError {
    #[error(
        "{path}: the {what} is writable by {who} (mode {mode:04o}), so someone else could replace the plugin: \
         run `chmod go-w {path}` (then `hotswap reload`, if the host runs), or pass --insecure-plugin-dir to accept the risk"
    )]
    Writable { path: PathBuf, what: &'static str, who: &'static str, mode: u32 },
    #[error(
        "{path}: the {what} is owned by uid {owner}, neither this host's user (uid {host}) nor root, so that user could \
         replace the plugin: run `chown {host} {path}` (then `hotswap reload`, if the host runs), or pass --insecure-plugin-dir to accept the risk"
    )]
    Owner { path: PathBuf, what: &'static str, owner: u32, host: u32 },
    #[error("{path}: cannot check who may write the {what}: {source}")]
    Stat { path: PathBuf, what: &'static str, source: std::io::Error },
    #[error(
        "{path}: SHA-256 {digest} is not in the trusted digests file {list}; if this build is meant to run, \
         add its digest there (`sha256sum {path} >> {list}`), then `hotswap reload` if the host runs"
    )]
    UnknownDigest { path: PathBuf, digest: String, list: PathBuf },
    #[error("cannot read the trusted digests file {list}: {reason}")]
    DigestList { list: PathBuf, reason: String },
    #[error(
        "{path}: will not keep the private copies of plugins there: {reason}; give --shadow-dir a directory only \
         this host's user (uid {host}) or root can write, or one with the sticky bit set like /tmp (`chmod +t {path}`)"
    )]
    ShadowBase { path: PathBuf, reason: String, host: u32 },
}

/// The host's rules for plugin files.
#[derive(Debug, Clone, Default)]
pub(crate) struct Trust {
    /// Load from insecure places anyway (with a warning).
    pub(crate) insecure: bool,
    /// Only load plugins whose SHA-256 is listed in this file.
    pub(crate) digests: Option<PathBuf>,
    /// Skip the ownership and mode checks: `hotswap dev` loads what it has just built itself.
    pub(crate) own_build: bool,
}

impl Trust {
    /// Checks that the plugin file (`file`: the metadata of the file as opened) and the
    /// directory it really is in (`real_path`: symbolic links resolved) are writable only by
    /// this host's user or root. With `insecure`, a failed check is logged as a warning and
    /// the load goes on.
    pub(crate) fn check_source(&self, plugin: &Path, file: &Metadata, real_path: Option<&Path>) -> Result<(), TrustError> {
        if self.own_build {
            return Ok(());
        }
        let dir = match real_path.unwrap_or(plugin).parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let dir_meta = std::fs::metadata(dir)
            .map_err(|source| TrustError::Stat { path: dir.to_path_buf(), what: "plugin directory", source });
        let checked = dir_meta
            .and_then(|meta| check_writers(dir, &meta, "plugin directory"))
            .and_then(|()| check_writers(plugin, file, "plugin file"));
        match checked {
            Err(e) if self.insecure => {
                tracing::warn!("loading an insecure plugin (--insecure-plugin-dir): {e}");
                Ok(())
            }
            other => other,
        }
    }

    /// Whether loads need the SHA-256 of the plugin.
    pub(crate) fn wants_digest(&self) -> bool {
        self.digests.is_some()
    }

    /// With a digest list, checks that `digest` (the SHA-256 of the plugin as it will be
    /// loaded, in hex) is on it.
    pub(crate) fn check_digest(&self, plugin: &Path, digest: Option<&str>) -> Result<(), TrustError> {
        let Some(list) = &self.digests else { return Ok(()) };
        let digest = digest.unwrap_or_default();
        if trusted_digests(list)?.iter().any(|d| d == digest) {
            Ok(())
        } else {
            Err(TrustError::UnknownDigest { path: plugin.to_path_buf(), digest: digest.to_owned(), list: list.clone() })
        }
    }
}

/// Opens `path` for reading if it is a regular file, with its metadata (of the file as
/// opened, so that checks and reads concern the same file).
///
/// Whatever else bears the name is refused before it is read, with what it is: a FIFO would
/// block the open until a writer came (forever: the loading thread stuck, and every load
/// after it), a device may act on being opened. So the open does not wait (`O_NONBLOCK`,
/// which regular files ignore: see open(2)) nor adopt a terminal (`O_NOCTTY`), and the type
/// is checked on the open file, leaving no moment to swap in something else after a check.
pub(crate) fn open_regular(path: &Path) -> std::io::Result<(File, Metadata)> {
    use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(path)?;
    let metadata = file.metadata()?;
    let kind = metadata.file_type();
    let what = match () {
        () if kind.is_file() => return Ok((file, metadata)),
        () if kind.is_dir() => "a directory",
        () if kind.is_fifo() => "a FIFO (named pipe)",
        () if kind.is_socket() => "a socket",
        () if kind.is_char_device() => "a character device",
        () if kind.is_block_device() => "a block device",
        () => "of an unknown type",
    };
    Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("it is {what}, not a regular file")))
}

/// Checks the directory the shadow directory is made in (`--shadow-dir`, by default the
/// system's temporary directory). Whoever can remove or rename entries there can put a
/// directory of their own where the host keeps the plugins it maps, so it must be writable
/// by this host's user or root only, or sticky (as `/tmp` is: then only an entry's owner may
/// remove or rename it).
pub(crate) fn check_shadow_base(base: &Path) -> Result<(), TrustError> {
    let host = sys::effective_uid();
    let refused = |reason: String| TrustError::ShadowBase { path: base.to_path_buf(), reason, host };
    let meta = std::fs::metadata(base)
        .map_err(|source| TrustError::Stat { path: base.to_path_buf(), what: "shadow directory's parent", source })?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(refused(format!("it is writable by others than its owner (mode {mode:04o}) and not sticky")));
    }
    if meta.uid() != host && meta.uid() != 0 {
        return Err(refused(format!("it is owned by uid {}", meta.uid())));
    }
    Ok(())
}

/// Who besides its owner the permission bits `mask` (such as 0o022, writing) of `mode` let
/// in: "its group", "others" or "its group and others".
pub(crate) fn let_in(mode: u32, mask: u32) -> &'static str {
    match (mode & mask & 0o070 != 0, mode & mask & 0o007 != 0) {
        (true, true) => "its group and others",
        (false, true) => "others",
        _ => "its group",
    }
}

/// Refuses `path` (whose metadata is `meta`) if anyone but this host's user or root may
/// write it.
fn check_writers(path: &Path, meta: &Metadata, what: &'static str) -> Result<(), TrustError> {
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(TrustError::Writable { path: path.to_path_buf(), what, who: let_in(mode, 0o022), mode });
    }
    let host = sys::effective_uid();
    if meta.uid() != host && meta.uid() != 0 {
        return Err(TrustError::Owner { path: path.to_path_buf(), what, owner: meta.uid(), host });
    }
    Ok(())
}

/// The digests listed in `list`: one per line, either bare hex or `sha256sum` output
/// (`<hex>  <file>`); blank lines and `#` comments are skipped. The list is held to the same
/// rules as plugin files: whoever can write it decides what runs.
fn trusted_digests(list: &Path) -> Result<Vec<String>, TrustError> {
    let refused = |reason: String| TrustError::DigestList { list: list.to_path_buf(), reason };
    // Checked on the file as opened (a FIFO is refused, not waited on: it is read at every
    // load). No --insecure-plugin-dir here: the list is what guards an insecure plugin
    // directory.
    let (mut file, meta) = open_regular(list).map_err(|e| refused(e.to_string()))?;
    check_writers(list, &meta, "trusted digests file").map_err(|e| refused(e.to_string()))?;
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(|e| refused(e.to_string()))?;
    let mut digests = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let hex = line.split_whitespace().next().unwrap_or_default().to_ascii_lowercase();
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(refused(format!("line {}: `{line}` is not a SHA-256 digest (64 hex digits)", n + 1)));
        }
        digests.push(hex);
    }
    Ok(digests)
}

/// Bytes in lowercase hex (as `sha256sum` prints a digest).
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut hex, b| {
        let _ = write!(hex, "{b:02x}");
        hex
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_as_the_trusted_digests_file_is_refused_without_waiting_for_a_writer() {
        let dir = std::env::temp_dir().join(format!("hotswap-trust-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let list = dir.join("trusted.sha256");
        assert!(std::process::Command::new("mkfifo").arg(&list).status().unwrap().success());
        let (tx, rx) = std::sync::mpsc::channel();
        let path = list.clone();
        std::thread::spawn(move || tx.send(trusted_digests(&path).map(|_| ()).map_err(|e| e.to_string())));
        let Ok(read) = rx.recv_timeout(std::time::Duration::from_secs(5)) else {
            let _ = std::fs::OpenOptions::new().write(true).open(&list); // lets the stuck open go
            panic!("reading a FIFO as the trusted digests file waited for a writer");
        };
        let error = read.expect_err("a FIFO was read as the trusted digests file");
        assert!(error.ends_with("trusted.sha256: it is a FIFO (named pipe), not a regular file"), "{error}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
