//! Which certificate serves HTTPS: read from PEM files, checked before it serves, and replaced
//! without a restart, like a plugin build.
//!
//! A certificate serves only once its chain parses, its key is the one the certificate was
//! issued for, and it has not expired. A new one written or renamed into place (or on
//! `hotswap reload`, or SIGHUP) is checked the same way and then used for every new
//! handshake; connections already open keep the one they negotiated. One that fails is
//! refused with the reason (log, `hotswap status`, metrics) and the previous one keeps
//! serving.
//!
//! With a directory (`--tls-dir`), each `NAME.crt` with its `NAME.key` is a certificate,
//! chosen per handshake by the name the client asks for (SNI) against the certificate's DNS
//! names; the first by file name serves clients that ask for another name, or none. Each
//! pair is replaced or refused on its own.

use std::collections::{BTreeMap, VecDeque};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{RecursiveMode, Watcher as _};
use sha2::{Digest as _, Sha256};
use tokio::signal::unix::Signal;
use tokio::sync::mpsc;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::{self, PemObject as _};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, InconsistentKeys, ServerConfig};
use tokio_util::sync::CancellationToken;

use crate::plugin::threads;

/// Refusals kept for `hotswap status`.
const REFUSALS_KEPT: usize = 16;
/// Files that changed are read this long after the last change: a certificate and its key
/// are written one after the other.
const SETTLE: Duration = Duration::from_millis(300);
/// The longest a reload waits for changes to settle.
const MAX_SETTLE: Duration = Duration::from_secs(2);

/// Where the certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CertSource {
    /// One certificate chain and its key (`--tls-cert`, `--tls-key`).
    Pair { cert: PathBuf, key: PathBuf },
    /// A directory of `NAME.crt` and `NAME.key` pairs (`--tls-dir`), chosen by SNI.
    Dir(PathBuf),
}

/// Why a certificate cannot serve.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CertError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error(
        "{} holds no certificate: give the certificate chain in PEM (`-----BEGIN CERTIFICATE-----`), the server's own certificate first",
        path.display()
    )]
    NoCertificate { path: PathBuf },
    #[error("{} holds no private key: give the key in PEM (`-----BEGIN PRIVATE KEY-----`, or an RSA or EC key)", path.display())]
    NoKey { path: PathBuf },
    #[error("{} is not valid PEM: {reason}", path.display())]
    Pem { path: PathBuf, reason: String },
    #[error("certificate {index} of the chain in {} cannot be parsed: {reason}", path.display())]
    Parse { path: PathBuf, index: usize, reason: String },
    #[error("the key in {} cannot be used: {reason}", path.display())]
    Key { path: PathBuf, reason: String },
    #[error(
        "the key in {} does not belong to the certificate in {}: give the key the certificate was issued for",
        key.display(),
        cert.display()
    )]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("the certificate in {} expired at {not_after}: renew it", path.display())]
    Expired { path: PathBuf, not_after: String },
    #[error(
        "the certificate in {} is valid only from {not_before}: clients would refuse it until then, so the one that \
         serves goes on (is this machine's clock right?)",
        path.display()
    )]
    NotYetValid { path: PathBuf, not_before: String },
    #[error("{} has no key beside it: add {}", cert.display(), key.display())]
    MissingKey { cert: PathBuf, key: PathBuf },
    #[error("{} holds no certificate: add NAME.crt with its key NAME.key", dir.display())]
    EmptyDir { dir: PathBuf },
}

impl CertSource {
    /// The certificate file, or the directory.
    fn path(&self) -> &Path {
        match self {
            CertSource::Pair { cert, .. } => cert,
            CertSource::Dir(dir) => dir,
        }
    }
}

impl CertError {
    /// A short name for the metrics' `reason` label.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            CertError::Read { .. } | CertError::MissingKey { .. } | CertError::EmptyDir { .. } => "unreadable",
            CertError::NoCertificate { .. } | CertError::NoKey { .. } | CertError::Pem { .. } | CertError::Parse { .. } => "invalid",
            CertError::Key { .. } => "key",
            CertError::Mismatch { .. } => "mismatch",
            CertError::Expired { .. } => "expired",
            CertError::NotYetValid { .. } => "not_yet_valid",
        }
    }
}

/// How far in the future a replacement certificate's start of validity may be (clocks of the
/// issuer and of this machine differ) before it is refused.
const CLOCK_SKEW: std::time::Duration = std::time::Duration::from_secs(300);

/// A certificate that passed the checks, with what status and metrics show of it.
#[derive(Debug)]
pub(crate) struct Certificate {
    pub(crate) key: Arc<CertifiedKey>,
    /// The server certificate's subject, like `CN=example.com`.
    pub(crate) subject: String,
    /// The DNS names it is valid for (its subject alternative names), lowercase.
    pub(crate) names: Vec<String>,
    pub(crate) not_before: SystemTime,
    pub(crate) not_after: SystemTime,
    /// SHA-256 of the server certificate (DER), in hex: what `openssl x509 -fingerprint
    /// -sha256` prints, without the colons.
    pub(crate) sha256: String,
    pub(crate) cert_file: PathBuf,
    pub(crate) key_file: PathBuf,
    pub(crate) loaded_at: SystemTime,
}

impl Certificate {
    /// Reads and checks a certificate chain and its key.
    fn load(cert_file: &Path, key_file: &Path, provider: &CryptoProvider) -> Result<Certificate, CertError> {
        let read = |path: &Path| std::fs::read(path).map_err(|source| CertError::Read { path: path.to_owned(), source });
        let (cert_pem, key_pem) = (read(cert_file)?, read(key_file)?);
        let pem_error = |path: &Path, e: pem::Error| CertError::Pem { path: path.to_owned(), reason: e.to_string() };
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&cert_pem).collect::<Result<_, _>>().map_err(|e| pem_error(cert_file, e))?;
        let Some(server) = chain.first() else { return Err(CertError::NoCertificate { path: cert_file.to_owned() }) };
        for (index, der) in chain.iter().enumerate().skip(1) {
            let (_, parsed) = x509_parser::parse_x509_certificate(der)
                .map_err(|e| CertError::Parse { path: cert_file.to_owned(), index: index + 1, reason: e.to_string() })?;
            let not_after = system_time(parsed.validity().not_after.timestamp());
            if not_after < SystemTime::now() {
                tracing::warn!(
                    cert = %cert_file.display(),
                    "certificate {} of the chain ({}) expired at {}: clients that need it refuse the chain; replace it",
                    index + 1,
                    parsed.subject(),
                    rfc3339(not_after)
                );
            }
        }
        let (_, parsed) = x509_parser::parse_x509_certificate(server)
            .map_err(|e| CertError::Parse { path: cert_file.to_owned(), index: 1, reason: e.to_string() })?;
        let not_before = system_time(parsed.validity().not_before.timestamp());
        let not_after = system_time(parsed.validity().not_after.timestamp());
        if not_after < SystemTime::now() {
            return Err(CertError::Expired { path: cert_file.to_owned(), not_after: rfc3339(not_after) });
        }
        let subject = parsed.subject().to_string();
        let mut names: Vec<String> = match parsed.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    x509_parser::extensions::GeneralName::DNSName(dns) => Some(dns.to_ascii_lowercase()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        if names.is_empty() {
            // A certificate without subject alternative names: its common name, as old clients read it.
            names.extend(parsed.subject().iter_common_name().filter_map(|cn| cn.as_str().ok()).map(str::to_ascii_lowercase));
        }
        let sha256 = Sha256::digest(server.as_ref()).iter().map(|b| format!("{b:02x}")).collect();
        let key = match PrivateKeyDer::from_pem_slice(&key_pem) {
            Ok(key) => key,
            Err(pem::Error::NoItemsFound) => return Err(CertError::NoKey { path: key_file.to_owned() }),
            Err(e) => return Err(pem_error(key_file, e)),
        };
        let signer = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| CertError::Key { path: key_file.to_owned(), reason: e.to_string() })?;
        let key = CertifiedKey::new(chain, signer);
        match key.keys_match() {
            // A key whose public half rustls cannot derive: the handshake would tell.
            Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {}
            Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
                return Err(CertError::Mismatch { cert: cert_file.to_owned(), key: key_file.to_owned() })
            }
            Err(e) => return Err(CertError::Key { path: key_file.to_owned(), reason: e.to_string() }),
        }
        if let Ok(meta) = std::fs::metadata(key_file) {
            use std::os::unix::fs::PermissionsExt as _;
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    key = %key_file.display(),
                    "the private key is readable or writable by others than its owner (mode {:04o}): run `chmod 600 {}`",
                    meta.permissions().mode() & 0o7777,
                    key_file.display()
                );
            }
        }
        if not_before > SystemTime::now() {
            tracing::warn!(
                cert = %cert_file.display(),
                "the certificate is valid only from {}: clients refuse it until then (is this machine's clock right?)",
                rfc3339(not_before)
            );
        }
        Ok(Certificate {
            key: Arc::new(key),
            subject,
            names,
            not_before,
            not_after,
            sha256,
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            loaded_at: SystemTime::now(),
        })
    }

    /// Whether it is valid for `name` (lowercase), a wildcard matching one label.
    fn serves(&self, name: &str) -> bool {
        self.names.iter().any(|n| match n.strip_prefix("*.") {
            Some(parent) => name.split_once('.').is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
            None => n == name,
        })
    }
}

fn system_time(unix_seconds: i64) -> SystemTime {
    let seconds = Duration::from_secs(unix_seconds.unsigned_abs());
    let at = if unix_seconds >= 0 { SystemTime::UNIX_EPOCH.checked_add(seconds) } else { SystemTime::UNIX_EPOCH.checked_sub(seconds) };
    at.unwrap_or(SystemTime::UNIX_EPOCH)
}

/// A time as RFC 3339, to the second. (A certificate may date from before 1970, which
/// humantime's formatter refuses with a panic.)
pub(crate) fn rfc3339(at: SystemTime) -> String {
    match at.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(_) => humantime::format_rfc3339_seconds(at).to_string(),
        Err(_) => "before 1970-01-01T00:00:00Z".to_owned(),
    }
}

/// The certificates that serve: the first for clients that ask for no name, or another.
#[derive(Debug)]
struct CertSet(Vec<Arc<Certificate>>);

impl CertSet {
    fn pick(&self, name: Option<&str>) -> Option<&Arc<Certificate>> {
        let chosen = name.and_then(|name| {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            self.0.iter().find(|c| c.names.contains(&name)).or_else(|| self.0.iter().find(|c| c.serves(&name)))
        });
        chosen.or_else(|| self.0.first())
    }
}

/// A certificate refused, as status shows it.
#[derive(Debug, Clone)]
pub(crate) struct CertRefusal {
    pub(crate) at: SystemTime,
    pub(crate) reason: String,
}

/// What a reload did.
#[derive(Debug, Default)]
pub(crate) struct Reloaded {
    /// Certificates that serve from now on in place of others (or beside them: a new pair
    /// in the directory).
    pub(crate) replaced: Vec<Arc<Certificate>>,
    /// Why others were refused.
    pub(crate) refused: Vec<String>,
}

/// The files' sizes, change times (which no one can set back) and inodes at a reload: the
/// watcher reloads only when they change.
type Stamp = Vec<(PathBuf, Option<(u64, i64, i64, u64)>)>;

/// What reloads have seen.
#[derive(Debug, Default)]
struct Book {
    stamp: Option<Stamp>,
    refusals: VecDeque<CertRefusal>,
    refused_by_kind: BTreeMap<&'static str, u64>,
    replaced: u64,
}

impl Book {
    /// Records and counts a refusal, and logs it with `then`, what happens instead.
    fn refuse(&mut self, error: &CertError, then: &str) {
        tracing::warn!("refused a certificate: {error}; {then}");
        *self.refused_by_kind.entry(error.kind()).or_default() += 1;
        self.refusals.push_back(CertRefusal { at: SystemTime::now(), reason: error.to_string() });
        while self.refusals.len() > REFUSALS_KEPT {
            self.refusals.pop_front();
        }
    }
}

/// The certificates that serve, and where they come from. It chooses the certificate of each
/// handshake (`ResolvesServerCert`).
#[derive(Debug)]
pub(crate) struct Certificates {
    source: CertSource,
    provider: Arc<CryptoProvider>,
    serving: ArcSwap<CertSet>,
    book: Mutex<Book>,
}

impl Certificates {
    /// Reads and checks the certificates of `source`. One pair must pass to start; in a
    /// directory, the others are refused as they would be at a reload, and the host starts
    /// with those that pass.
    pub(crate) fn load(source: CertSource) -> Result<Arc<Certificates>, CertError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let stamp = stamp(&source);
        let mut book = Book { stamp: Some(stamp), ..Book::default() };
        let mut certs = Vec::new();
        let mut first_error = None;
        for (cert, key) in pairs(&source)? {
            match load_pair(&cert, key.as_deref(), &provider) {
                Ok(loaded) => certs.push(Arc::new(loaded)),
                Err(error) if matches!(source, CertSource::Dir(_)) => {
                    book.refuse(&error, "it does not serve");
                    first_error.get_or_insert(error);
                }
                Err(error) => return Err(error),
            }
        }
        if certs.is_empty() {
            return Err(first_error.unwrap_or_else(|| CertError::EmptyDir { dir: source.path().to_owned() }));
        }
        for cert in &certs {
            log_serving(cert, "serving HTTPS with");
        }
        Ok(Arc::new(Certificates { source, provider, serving: ArcSwap::from_pointee(CertSet(certs)), book: Mutex::new(book) }))
    }

    /// A rustls configuration that takes its certificates from here, offering `alpn`
    /// (the most preferred first): TLS 1.2 and 1.3 with rustls' default cipher suites, and
    /// session tickets so that returning clients resume without a full handshake.
    pub(crate) fn server_config(self: &Arc<Self>, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, rustls::Error> {
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config.ticketer = rustls::crypto::ring::Ticketer::new()?;
        Ok(Arc::new(config))
    }

    /// The certificates that serve, the default first.
    pub(crate) fn serving(&self) -> Vec<Arc<Certificate>> {
        self.serving.load().0.clone()
    }

    /// Recent refusals, oldest first.
    pub(crate) fn refusals(&self) -> Vec<CertRefusal> {
        self.book().refusals.iter().cloned().collect()
    }

    /// Certificates refused since the start, by [`CertError::kind`].
    pub(crate) fn refused_by_kind(&self) -> BTreeMap<&'static str, u64> {
        self.book().refused_by_kind.clone()
    }

    /// Certificates that replaced others since the start.
    pub(crate) fn replaced_count(&self) -> u64 {
        self.book().replaced
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads the files again and serves what changed and passes the checks; what fails is
    /// refused and what served keeps serving. `force`: even if the files look unchanged (a
    /// reload asked for by the operator); what they refused again is then answered, but not
    /// recorded or counted twice.
    pub(crate) fn reload(&self, force: bool) -> Reloaded {
        let mut book = self.book();
        let stamp = stamp(&self.source);
        let unchanged = book.stamp.as_ref() == Some(&stamp);
        if unchanged && !force {
            return Reloaded::default();
        }
        book.stamp = Some(stamp);
        let serving = self.serving.load_full();
        let mut reloaded = Reloaded::default();
        let mut refuse = |book: &mut Book, error: CertError| {
            if unchanged {
                tracing::warn!("a certificate is still refused: {error}");
            } else {
                book.refuse(&error, "the previous one keeps serving");
            }
            reloaded.refused.push(error.to_string());
        };
        let pairs = match pairs(&self.source) {
            Ok(pairs) => pairs,
            Err(error) => {
                refuse(&mut book, error);
                return reloaded;
            }
        };
        let mut next = Vec::with_capacity(pairs.len());
        for (cert, key) in &pairs {
            let previous = serving.0.iter().find(|c| c.cert_file == *cert);
            match load_pair(cert, key.as_deref(), &self.provider) {
                // The same chain (so the same key, which matched it): nothing to replace.
                Ok(loaded) if previous.is_some_and(|p| p.key.cert == loaded.key.cert) => next.extend(previous.cloned()),
                // Not valid yet, where one that is serves: it would turn every client away.
                Ok(loaded) if loaded.not_before > SystemTime::now() + CLOCK_SKEW && previous.is_some_and(|p| p.not_after > SystemTime::now()) => {
                    refuse(&mut book, CertError::NotYetValid { path: cert.clone(), not_before: rfc3339(loaded.not_before) });
                    next.extend(previous.cloned());
                }
                Ok(loaded) => {
                    let loaded = Arc::new(loaded);
                    reloaded.replaced.push(loaded.clone());
                    next.push(loaded);
                }
                Err(error) => {
                    refuse(&mut book, error);
                    next.extend(previous.cloned());
                }
            }
        }
        let removed = serving.0.iter().any(|c| !pairs.iter().any(|(cert, _)| *cert == c.cert_file));
        if !reloaded.replaced.is_empty() || removed {
            if next.is_empty() {
                // Every pair of the directory is gone or refused: the previous ones serve on.
                refuse(&mut book, CertError::EmptyDir { dir: self.source.path().to_owned() });
                return reloaded;
            }
            book.replaced += reloaded.replaced.len() as u64;
            self.serving.store(Arc::new(CertSet(next)));
            for cert in &reloaded.replaced {
                log_serving(cert, "new certificate serves:");
            }
        }
        reloaded
    }

    /// Watches the certificate files and reloads when they change, or on SIGHUP (`hangup`),
    /// until `shutdown`.
    pub(crate) async fn watch(self: Arc<Self>, mut hangup: Signal, shutdown: CancellationToken) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        // Only changes: the host's own reads of the files (and anyone's) open them too.
        let changes = move |event: notify::Result<notify::Event>| {
            if event.is_ok_and(|e| !matches!(e.kind, EventKind::Access(_)) || e.kind == EventKind::Access(AccessKind::Close(AccessMode::Write))) {
                let _ = tx.send(());
            }
        };
        // The watcher's thread is the host's (see plugin::threads).
        let watcher = threads::adopt(|| notify::recommended_watcher(changes));
        let _watcher = match watcher {
            Ok(mut watcher) => {
                for dir in self.watched_dirs() {
                    if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
                        tracing::warn!(dir = %dir.display(), "cannot watch for new certificates ({e}): they are read on SIGHUP or `hotswap reload`");
                    }
                }
                Some(watcher)
            }
            Err(e) => {
                tracing::warn!("cannot watch for new certificates ({e}): they are read on SIGHUP or `hotswap reload`");
                None
            }
        };
        // A change made between the first read and now has sent no event.
        self.reload(false);
        loop {
            tokio::select! {
                Some(()) = rx.recv() => {
                    // Let the writer finish the pair, but not for ever: a directory busy with
                    // other files would put the reload off.
                    let settled = tokio::time::Instant::now() + MAX_SETTLE;
                    loop {
                        tokio::select! {
                            Some(()) = rx.recv(), if tokio::time::Instant::now() < settled => continue,
                            () = tokio::time::sleep(SETTLE) => break,
                            () = tokio::time::sleep_until(settled) => break,
                            () = shutdown.cancelled() => return,
                        }
                    }
                    self.reload(false);
                }
                Some(()) = hangup.recv() => {
                    tracing::info!("SIGHUP: reading the certificates again");
                    self.reload(true);
                }
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// The directories whose changes may change a certificate: those of the files (a
    /// rename into place, or a Kubernetes Secret's symlink swap, happens there).
    fn watched_dirs(&self) -> Vec<PathBuf> {
        let parent = |p: &Path| p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_owned();
        let mut dirs = match &self.source {
            CertSource::Pair { cert, key } => vec![parent(cert), parent(key)],
            CertSource::Dir(dir) => vec![dir.clone()],
        };
        dirs.dedup();
        dirs
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.serving.load().pick(hello.server_name()).map(|c| c.key.clone())
    }
}

fn log_serving(cert: &Certificate, what: &str) {
    tracing::info!(
        subject = %cert.subject,
        names = %cert.names.join(","),
        expires = %rfc3339(cert.not_after),
        sha256 = %cert.sha256,
        file = %cert.cert_file.display(),
        "{what} {}", cert.names.first().map_or(cert.subject.as_str(), String::as_str)
    );
}

/// Reads and checks `cert` with `key`, which a directory may lack.
fn load_pair(cert: &Path, key: Option<&Path>, provider: &CryptoProvider) -> Result<Certificate, CertError> {
    match key {
        Some(key) => Certificate::load(cert, key, provider),
        None => Err(CertError::MissingKey { cert: cert.to_owned(), key: cert.with_extension("key") }),
    }
}

/// The certificate files of `source`, each with its key file if there is one.
fn pairs(source: &CertSource) -> Result<Vec<(PathBuf, Option<PathBuf>)>, CertError> {
    let dir = match source {
        CertSource::Pair { cert, key } => return Ok(vec![(cert.clone(), Some(key.clone()))]),
        CertSource::Dir(dir) => dir,
    };
    let entries = std::fs::read_dir(dir).map_err(|source| CertError::Read { path: dir.clone(), source })?;
    // Hidden files are editors' and tools' (`.#a.crt`, a half-written `.a.crt.tmp`).
    let mut certs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "crt") && !p.file_name().is_some_and(|n| n.as_encoded_bytes().starts_with(b".")))
        .collect();
    certs.sort();
    if certs.is_empty() {
        return Err(CertError::EmptyDir { dir: dir.clone() });
    }
    Ok(certs
        .into_iter()
        .map(|cert| {
            let key = Some(cert.with_extension("key")).filter(|key| key.exists());
            (cert, key)
        })
        .collect())
}

/// The files of `source` as they are now (through symlinks).
fn stamp(source: &CertSource) -> Stamp {
    let files = match source {
        CertSource::Pair { cert, key } => vec![cert.clone(), key.clone()],
        CertSource::Dir(dir) => {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir).into_iter().flatten().filter_map(Result::ok).map(|e| e.path()).collect();
            files.sort();
            files
        }
    };
    files
        .into_iter()
        .map(|file| {
            let meta = std::fs::metadata(&file).ok().map(|m| (m.len(), m.ctime(), m.ctime_nsec(), m.ino()));
            (file, meta)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(names: &[&str]) -> Certificate {
        Certificate {
            key: Arc::new(CertifiedKey::new(vec![], Arc::new(NoKey))),
            subject: String::new(),
            names: names.iter().map(|n| n.to_string()).collect(),
            not_before: SystemTime::UNIX_EPOCH,
            not_after: SystemTime::UNIX_EPOCH,
            sha256: String::new(),
            cert_file: PathBuf::from("a.crt"),
            key_file: PathBuf::from("a.key"),
            loaded_at: SystemTime::UNIX_EPOCH,
        }
    }

    #[derive(Debug)]
    struct NoKey;
    impl rustls::sign::SigningKey for NoKey {
        fn choose_scheme(&self, _: &[rustls::SignatureScheme]) -> Option<Box<dyn rustls::sign::Signer>> {
            None
        }
        fn algorithm(&self) -> rustls::SignatureAlgorithm {
            rustls::SignatureAlgorithm::ECDSA
        }
    }

    #[test]
    fn sni_picks_the_exact_name_then_a_wildcard_then_the_first() {
        let set = CertSet(vec![Arc::new(cert(&["a.example"])), Arc::new(cert(&["*.example"])), Arc::new(cert(&["b.example"]))]);
        let pick = |name: Option<&str>| set.pick(name).unwrap().names[0].clone();
        assert_eq!(pick(Some("b.example")), "b.example");
        assert_eq!(pick(Some("B.Example")), "b.example");
        assert_eq!(pick(Some("c.example")), "*.example");
        assert_eq!(pick(Some("x.c.example")), "a.example", "a wildcard matches one label");
        assert_eq!(pick(Some("example")), "a.example");
        assert_eq!(pick(None), "a.example");
    }
}
