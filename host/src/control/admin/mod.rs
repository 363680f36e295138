//! The admin API: JSON endpoints to see and change what serves, and Prometheus metrics, on a
//! listener of its own (never the public port).
//!
//! | endpoint | does |
//! |---|---|
//! | `GET /status` | the current generation, every resident one, the history, recent refusals, builds known |
//! | `POST /reload` | reads the plugin directory (and the certificates) again and swaps in the build that should serve |
//! | `POST /rollback` | goes back to the version served before the current one, and pins it |
//! | `POST /pin` `{"version": "1.2.0"}` | serves that version and holds it against newer builds |
//! | `DELETE /pin` | lifts the pin: the highest version serves again |
//! | `POST /canary` `{"version": "1.3.0", "percent": 10}` (both optional) | starts a canary, or sets its share |
//! | `POST /canary/promote` | promotes the canary now |
//! | `DELETE /canary` | rolls the canary back now (its build is refused) |
//! | `POST /upgrade` `{"binary": "/usr/bin/hotswap"}` (optional) | replaces the host process itself (see `cmd::upgrade`) |
//! | `GET /metrics` | Prometheus text format |
//!
//! A change answers once the swap has happened or was refused: 200 with `"outcome":
//! "swapped"` or `"unchanged"`, 409 with `"outcome": "refused"` and the reasons. A request the
//! API cannot act on gets a 4xx with `{"error": "..."}`.
//!
//! ## Who may call it
//!
//! By default it listens on a Unix socket of mode 0600, and answers only clients of this
//! host's user (or root), checked with `SO_PEERCRED`. On TCP it must be given a token file
//! unless it listens on a loopback address; with a token file, every request must carry
//! `Authorization: Bearer <token>`, and the file must be private (mode 0600, this user's or
//! root's). Against web pages in the operator's browser ([`guard`]): a change must carry
//! `Content-Type: application/json` or `X-Hotswap-Admin: 1`, and without a token a TCP
//! request must name a loopback host. Idle connections cannot lock the operator out
//! ([`slots`]).
//!
//! The documents it sends and takes are the types of [`api`], which the command-line client
//! reads back.

#![forbid(unsafe_code)]

pub(crate) mod api;
mod error;
mod guard;
mod slots;

pub(crate) use error::AdminError;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::control::host::{HostProcess, UpgradeOrder};
use crate::control::registry::{ChangeError, Outcome, Registry};
use crate::control::tls::{Certificate, Certificates};
use api::{
    BuildEntry, CanaryEntry, CanaryRequest, CertRefusalEntry, CertificateEntry, CertificatesReloaded, CurrentEntry, ErrorBody,
    HistoryEntry, PinEntry, PinRequest, RefusalEntry, ReloadAnswer, ResidentEntry, Status, TlsEntry, UpgradeRequest,
};
use crate::control::canary::Verdict;
use crate::plugin::route::Share;
pub(crate) use guard::INTENT_HEADER;
use slots::{Slots, Waiting};

/// Where the admin API listens (`--admin`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AdminAddr {
    /// A Unix socket (mode 0600).
    Unix(PathBuf),
    /// A TCP address (a token is required unless it is a loopback address).
    Tcp(SocketAddr),
    /// HTTPS on TCP, with the certificates that serve HTTPS (`https://ADDR:PORT`): for the
    /// host, an IP address to listen on; for the admin commands, also a host name, the one
    /// its certificate is for.
    Https { host: String, port: u16 },
    /// No admin API.
    Off,
}

impl Default for AdminAddr {
    /// The socket at [`default_socket`].
    fn default() -> AdminAddr {
        AdminAddr::Unix(default_socket())
    }
}

impl FromStr for AdminAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<AdminAddr, String> {
        if text == "off" {
            return Ok(AdminAddr::Off);
        }
        if let Some(rest) = text.strip_prefix("https://") {
            let rest = rest.trim_end_matches('/');
            let port = rest.rsplit_once(':').and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?)));
            return match port {
                // An IPv6 address is written in brackets, as in a URL.
                Some((host, port)) if !host.is_empty() => {
                    Ok(AdminAddr::Https { host: host.trim_start_matches('[').trim_end_matches(']').to_owned(), port })
                }
                _ => Err(format!("`{text}` is not https://HOST:PORT, like https://10.0.0.5:9090")),
            };
        }
        if let Ok(addr) = text.strip_prefix("http://").unwrap_or(text).trim_end_matches('/').parse::<SocketAddr>() {
            return Ok(AdminAddr::Tcp(addr));
        }
        let path = text.strip_prefix("unix:").unwrap_or(text);
        if path.is_empty() || !(path.contains('/') || path.ends_with(".sock")) {
            return Err(format!(
                "`{text}` is neither an address:port (127.0.0.1:9090) nor a socket path (/run/hotswap/admin.sock), nor `off`"
            ));
        }
        Ok(AdminAddr::Unix(PathBuf::from(path)))
    }
}

impl std::fmt::Display for AdminAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdminAddr::Unix(path) => write!(f, "unix:{}", path.display()),
            AdminAddr::Tcp(addr) => write!(f, "http://{addr}"),
            AdminAddr::Https { host, port } if host.contains(':') => write!(f, "https://[{host}]:{port}"),
            AdminAddr::Https { host, port } => write!(f, "https://{host}:{port}"),
            AdminAddr::Off => f.write_str("off"),
        }
    }
}

/// Where an admin listener handed to a new host process listens (the descriptor travels
/// beside it).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub(crate) enum HandedAdmin {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// The default admin socket: `/run/hotswap/admin.sock` for root (systemd's
/// `RuntimeDirectory=hotswap`), else `$XDG_RUNTIME_DIR/hotswap/admin.sock`, else
/// `/tmp/hotswap-<uid>/admin.sock`. The `status`, `reload`, … commands look there too.
pub(crate) fn default_socket() -> PathBuf {
    let uid = crate::sys::effective_uid();
    if uid == 0 {
        return PathBuf::from("/run/hotswap/admin.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("hotswap/admin.sock"),
        None => std::env::temp_dir().join(format!("hotswap-{uid}/admin.sock")),
    }
}

/// Reads a bearer token from `path` (surrounding whitespace is not part of it), as a client.
/// The host reads its own with [`guard::read_private_token`], which holds the file to stricter
/// rules.
pub(crate) fn read_token(path: &Path) -> Result<String, AdminError> {
    let text = std::fs::read_to_string(path).map_err(|source| AdminError::ReadToken { path: path.to_path_buf(), source })?;
    guard::token_in(&text, path)
}

/// A bound admin listener, not yet serving.
pub(crate) struct AdminListener {
    listener: Listener,
    token: Option<String>,
    addr: AdminAddr,
    /// Set for an `https://` address (see [`AdminListener::serve_tls`]).
    tls: Option<TlsAcceptor>,
    /// What a new host process would need to serve it on.
    served: ServedAdmin,
}

enum Listener {
    /// The socket file is removed when the listener goes.
    Unix { listener: UnixListener, file: SocketFile },
    Tcp(TcpListener),
}

/// An accepted admin connection.
enum Stream {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

impl Listener {
    /// The next connection, and whether its client may use the API: on the Unix socket, only
    /// this host's user and root (`SO_PEERCRED`); on TCP, whoever has the token.
    async fn accept(&self) -> std::io::Result<(Stream, bool)> {
        match self {
            Listener::Tcp(listener) => Ok((Stream::Tcp(listener.accept().await?.0), true)),
            Listener::Unix { listener, .. } => {
                let (stream, _) = listener.accept().await?;
                let allowed = stream.peer_cred().is_ok_and(|c| c.uid() == 0 || c.uid() == crate::sys::effective_uid());
                Ok((Stream::Unix(stream), allowed))
            }
        }
    }
}

/// Removes the socket file when the host exits, unless a new host process serves it on.
struct SocketFile {
    path: PathBuf,
    handed_over: Arc<std::sync::atomic::AtomicBool>,
}

impl SocketFile {
    fn new(path: PathBuf) -> SocketFile {
        SocketFile { path, handed_over: Arc::default() }
    }

    /// The file of a socket another host process serves (the one this host replaces), until
    /// this one owns it ([`ServedAdmin::own_socket_file`]): if this host fails to start, the
    /// file stays for that one.
    fn borrowed(path: PathBuf) -> SocketFile {
        SocketFile { path, handed_over: Arc::new(std::sync::atomic::AtomicBool::new(true)) }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if !self.handed_over.load(std::sync::atomic::Ordering::Acquire) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The admin listener while it serves: what a new host process needs to serve it on.
pub(crate) struct ServedAdmin {
    descriptor: std::os::fd::OwnedFd,
    handed: HandedAdmin,
    /// Set once a new process serves the socket: its file must stay.
    handed_over: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl ServedAdmin {
    fn of(listener: &Listener) -> Result<ServedAdmin, AdminError> {
        use std::os::fd::AsFd as _;
        let served = match listener {
            Listener::Unix { listener, file } => ServedAdmin {
                descriptor: listener.as_fd().try_clone_to_owned().map_err(AdminError::Share)?,
                handed: HandedAdmin::Unix(file.path.clone()),
                handed_over: Some(file.handed_over.clone()),
            },
            Listener::Tcp(listener) => ServedAdmin {
                descriptor: listener.as_fd().try_clone_to_owned().map_err(AdminError::Share)?,
                handed: HandedAdmin::Tcp(listener.local_addr().map_err(AdminError::LocalAddr)?),
                handed_over: None,
            },
        };
        Ok(served)
    }

    /// A descriptor of the listening socket, to send to a new host process, and where it
    /// listens.
    pub(crate) fn handoff(&self) -> std::io::Result<(std::os::fd::OwnedFd, HandedAdmin)> {
        Ok((self.descriptor.try_clone()?, self.handed.clone()))
    }

    /// A new process serves the socket now: leave its file when this one exits.
    pub(crate) fn handed_over(&self) {
        if let Some(flag) = &self.handed_over {
            flag.store(true, std::sync::atomic::Ordering::Release);
        }
    }

    /// This process serves the socket inherited from the one it replaced, which has let go
    /// of it: remove its file when this one exits.
    pub(crate) fn own_socket_file(&self) {
        if let Some(flag) = &self.handed_over {
            flag.store(false, std::sync::atomic::Ordering::Release);
        }
    }
}

impl AdminListener {
    /// Binds the address the operator chose, or the default socket. A busy default socket
    /// only disables the API (with a warning); a chosen address that cannot be bound fails
    /// the start.
    pub(crate) async fn bind(chosen: Option<&AdminAddr>, token_file: Option<&Path>) -> Result<Option<AdminListener>, AdminError> {
        let token = token_file.map(guard::read_private_token).transpose()?;
        let explicit = chosen.is_some();
        let addr = &chosen.cloned().unwrap_or_default();
        let listener = match addr {
            AdminAddr::Off => return Ok(None),
            AdminAddr::Tcp(_) | AdminAddr::Https { .. } => {
                let tcp = match addr {
                    AdminAddr::Https { host, port } => {
                        let ip = host.parse::<std::net::IpAddr>().map_err(|_| AdminError::ListenOnName { host: host.clone() })?;
                        SocketAddr::new(ip, *port)
                    }
                    AdminAddr::Tcp(tcp) => *tcp,
                    AdminAddr::Unix(_) | AdminAddr::Off => unreachable!("matched above"),
                };
                if !tcp.ip().is_loopback() && token.is_none() {
                    return Err(AdminError::OpenWithoutToken { addr: tcp });
                }
                let listener = TcpListener::bind(tcp).await.map_err(|source| AdminError::ListenTcp { addr: tcp, source })?;
                Listener::Tcp(listener)
            }
            AdminAddr::Unix(path) => match bind_unix(path).await {
                Ok(listener) => listener,
                Err(e) if !explicit => {
                    tracing::warn!("admin API disabled: {}", e.chain());
                    return Ok(None);
                }
                Err(e) => return Err(e),
            },
        };
        let addr = match (&listener, addr) {
            (Listener::Tcp(l), AdminAddr::Https { .. }) => {
                let local = l.local_addr().map_err(AdminError::LocalAddr)?;
                AdminAddr::Https { host: local.ip().to_string(), port: local.port() }
            }
            (Listener::Tcp(l), _) => AdminAddr::Tcp(l.local_addr().map_err(AdminError::LocalAddr)?),
            (Listener::Unix { .. }, _) => addr.clone(),
        };
        let served = ServedAdmin::of(&listener)?;
        Ok(Some(AdminListener { listener, token, addr, tls: None, served }))
    }

    /// The listener the host this one replaces served (`hotswap upgrade`), from its
    /// descriptor. The token is this host's own (`--admin-token-file`).
    /// `https`: this host's own `--admin` is an `https://` address.
    pub(crate) fn inherit(
        descriptor: std::os::fd::OwnedFd,
        handed: HandedAdmin,
        token_file: Option<&Path>,
        https: bool,
    ) -> Result<AdminListener, AdminError> {
        let token = token_file.map(guard::read_private_token).transpose()?;
        let (listener, addr) = match handed {
            HandedAdmin::Unix(path) => {
                let std = std::os::unix::net::UnixListener::from(descriptor);
                let listener = std.set_nonblocking(true).and_then(|()| UnixListener::from_std(std));
                let listener = listener.map_err(|source| AdminError::ListenUnix { path: path.clone(), source })?;
                (Listener::Unix { listener, file: SocketFile::borrowed(path.clone()) }, AdminAddr::Unix(path))
            }
            HandedAdmin::Tcp(tcp) => {
                let std = std::net::TcpListener::from(descriptor);
                let listener = std.set_nonblocking(true).and_then(|()| TcpListener::from_std(std));
                let listener = listener.map_err(|source| AdminError::ListenTcp { addr: tcp, source })?;
                let addr = if https { AdminAddr::Https { host: tcp.ip().to_string(), port: tcp.port() } } else { AdminAddr::Tcp(tcp) };
                (Listener::Tcp(listener), addr)
            }
        };
        let served = ServedAdmin::of(&listener)?;
        Ok(AdminListener { listener, token, addr, tls: None, served })
    }

    /// Whether it is to be served over HTTPS.
    pub(crate) fn wants_tls(&self) -> bool {
        matches!(self.addr, AdminAddr::Https { .. })
    }

    /// Serves it over HTTPS, with `config` (the certificates that serve HTTPS).
    pub(crate) fn serve_tls(&mut self, config: Arc<tokio_rustls::rustls::ServerConfig>) {
        self.tls = Some(TlsAcceptor::from(config));
    }

    /// Serves the API until `shutdown`. `host` is the process it speaks for (its upgrades).
    /// `certificates`: those that serve HTTPS, if any.
    pub(crate) fn spawn(
        self,
        registry: Arc<Registry>,
        host: Arc<HostProcess>,
        certificates: Option<Arc<Certificates>>,
        shutdown: CancellationToken,
    ) -> ServedAdmin {
        tracing::info!(
            token = self.token.is_some(),
            "admin API on {} (status, reload, rollback, pin, upgrade, metrics)", self.addr
        );
        // Without a token, a TCP listener (on loopback) answers only requests that name a
        // loopback host; with one, the token is the protection.
        let check_host = matches!(self.listener, Listener::Tcp(_)) && self.token.is_none();
        if let AdminAddr::Tcp(addr) = &self.addr {
            if !addr.ip().is_loopback() {
                tracing::warn!(
                    "the admin API listens on {addr} in clear text: its token crosses the network readable by anyone \
                     on the way; serve it over HTTPS with --admin https://{addr} (with --tls-cert and --tls-key)"
                );
            }
        }
        let tls = self.tls.clone();
        let slots = Slots::new(slots::MAX_WAITING, slots::MAX_SERVED);
        let api = Arc::new(Api { registry, host, certificates, token: self.token, check_host, slots: slots.clone(), started: SystemTime::now() });
        let listener = self.listener;
        tokio::spawn(async move {
            loop {
                // Always accepted: the slots close the connection that has waited longest for
                // its request when too many wait, so idle clients cannot lock the operator out.
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    () = shutdown.cancelled() => return,
                };
                match accepted {
                    Ok((stream, allowed)) => serve_connection(stream, tls.clone(), api.clone(), allowed, slots.admit(), shutdown.clone()),
                    Err(e) => {
                        tracing::warn!("admin API: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await; // EMFILE and friends
                    }
                }
            }
        });
        self.served
    }
}

/// Binds a Unix socket of mode 0600 at `path`, creating its directory (0700) if needed, and
/// replacing a socket file nobody listens on (left by a crashed host).
async fn bind_unix(path: &Path) -> Result<Listener, AdminError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = socket_dir(path);
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(dir)
            .map_err(|source| AdminError::CreateDir { dir: dir.to_path_buf(), source })?;
    }
    check_socket_dir(dir)?;
    if let Ok(existing) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !existing.file_type().is_socket() {
            return Err(AdminError::NotASocket { path: path.to_path_buf() });
        }
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(AdminError::SocketInUse { path: path.to_path_buf() });
        }
        std::fs::remove_file(path).map_err(|source| AdminError::RemoveStale { path: path.to_path_buf(), source })?;
    }
    let listener = UnixListener::bind(path).map_err(|source| AdminError::ListenUnix { path: path.to_path_buf(), source })?;
    let file = SocketFile::new(path.to_path_buf());
    // Connections made before this are still checked by their peer's uid.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|source| AdminError::MakePrivate { path: path.to_path_buf(), source })?;
    Ok(Listener::Unix { listener, file })
}

/// The directory a socket path is in (`.` for a bare file name).
pub(crate) fn socket_dir(path: &Path) -> &Path {
    path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// The socket's directory must be ours (or root's), and others may not replace files in it:
/// otherwise someone could put their own socket in our place and collect the commands (and
/// the token) meant for this host. World-writable sticky directories such as /tmp are fine.
pub(crate) fn check_socket_dir(dir: &Path) -> Result<(), AdminError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir).map_err(|source| AdminError::UseDir { dir: dir.to_path_buf(), source })?;
    let uid = crate::sys::effective_uid();
    if meta.uid() != uid && meta.uid() != 0 {
        return Err(AdminError::ForeignDir { dir: dir.to_path_buf(), owner: meta.uid(), uid });
    }
    let (writable_by_others, sticky) = (meta.mode() & 0o022 != 0, meta.mode() & 0o1000 != 0);
    if writable_by_others && !sticky {
        return Err(AdminError::OpenDir { dir: dir.to_path_buf(), mode: meta.mode() & 0o7777 });
    }
    Ok(())
}

struct Api {
    registry: Arc<Registry>,
    host: Arc<HostProcess>,
    /// Those that serve HTTPS, if any.
    certificates: Option<Arc<Certificates>>,
    token: Option<String>,
    /// Whether requests must name a loopback host (TCP without a token).
    check_host: bool,
    slots: Arc<Slots>,
    started: SystemTime,
}

/// How long a client may take to send a request head (when fewer than
/// [`slots::MAX_WAITING`] connections wait for theirs), or a request body.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one admin connection may last (a change waits for loads bounded by the init
/// timeout; this only stops a client that never goes away).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(600);

fn serve_connection(stream: Stream, tls: Option<TlsAcceptor>, api: Arc<Api>, allowed: bool, waiting: Waiting, shutdown: CancellationToken) {
    tokio::spawn(async move {
        match (stream, tls) {
            (Stream::Unix(s), _) => serve_one(s, api, allowed, waiting, shutdown).await,
            (Stream::Tcp(s), None) => serve_one(s, api, allowed, waiting, shutdown).await,
            // The handshake is bounded like a request head, and gives way to a newcomer too.
            (Stream::Tcp(s), Some(tls)) => {
                let handshake = tokio::select! {
                    handshake = tokio::time::timeout(HEAD_TIMEOUT, tls.accept(s)) => handshake,
                    () = waiting.evicted() => return tracing::debug!("admin API connection closed for a newcomer: no TLS handshake"),
                    // It must not keep the registry, and so a generation, alive past the drain.
                    () = shutdown.cancelled() => return,
                };
                match handshake {
                    Ok(Ok(s)) => serve_one(s, api, allowed, waiting, shutdown).await,
                    Ok(Err(e)) => tracing::debug!("admin API: TLS handshake failed: {e}"),
                    Err(_) => tracing::debug!("admin API: no TLS handshake within {HEAD_TIMEOUT:?}"),
                }
            }
        }
    });
}

/// Serves one request on a connection, until it is answered, the host shuts down (an admin
/// client must not keep the registry, and so a generation, alive past the drain), or, while
/// it waits for its request head, too many others wait too.
async fn serve_one<S>(stream: S, api: Arc<Api>, allowed: bool, waiting: Waiting, shutdown: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let waiting = Arc::new(waiting);
    let head = waiting.clone();
    let service = hyper::service::service_fn(move |request| {
        head.arrived();
        let api = api.clone();
        async move { Ok::<_, Infallible>(api.handle(request, allowed).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        served = tokio::time::timeout(CONNECTION_LIFETIME, connection.as_mut()) => match served {
            Ok(Err(e)) => tracing::debug!("admin API connection: {e}"),
            Err(_) => tracing::debug!("admin API connection open for {CONNECTION_LIFETIME:?}: closed"),
            Ok(Ok(())) => {}
        },
        () = waiting.evicted() => tracing::debug!("admin API connection closed for a newcomer: it sent no request"),
        () = shutdown.cancelled() => {
            // A request being answered (the upgrade that led to this shutdown) gets its
            // answer; a connection waiting for one is closed.
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, connection).await;
        }
    }
}

/// How long, at shutdown, an admin request in progress may take to be answered.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Every endpoint, with the methods it takes (as in an `Allow` header): what the answers to a
/// wrong method or an unknown path list. `Api::handle` routes them.
const ENDPOINTS: [(&str, &str); 8] = [
    ("/status", "GET"),
    ("/metrics", "GET"),
    ("/reload", "POST"),
    ("/rollback", "POST"),
    ("/pin", "POST, DELETE"),
    ("/canary", "POST, DELETE"),
    ("/canary/promote", "POST"),
    ("/upgrade", "POST"),
];

/// The largest request body the API reads.
const MAX_BODY: usize = 64 * 1024;

impl Api {
    async fn handle(&self, request: Request<Incoming>, allowed: bool) -> Response<Full<Bytes>> {
        if !allowed {
            return error(StatusCode::FORBIDDEN, "the admin socket answers only this host's user and root");
        }
        if self.check_host {
            if let Err(message) = guard::check_host(&request) {
                return error(StatusCode::FORBIDDEN, &message);
            }
        }
        if let Some(token) = &self.token {
            // The scheme name is case-insensitive (RFC 9110, 11.1).
            let given = request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map_or("", |(_, token)| token.trim());
            if !bool::from(subtle::ConstantTimeEq::ct_eq(given.as_bytes(), token.as_bytes())) {
                let mut response = error(StatusCode::UNAUTHORIZED, "a valid `Authorization: Bearer <token>` header is required (the token is in the host's --admin-token-file)");
                response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
                return response;
            }
        }
        let Some(_served) = self.slots.serve() else {
            let message = format!("the admin API is busy with {} requests: try again", slots::MAX_SERVED);
            return error(StatusCode::SERVICE_UNAVAILABLE, &message);
        };
        let (method, path) = (request.method().clone(), request.uri().path().to_owned());
        let change = matches!(
            (&method, path.as_str()),
            (&Method::POST, "/reload" | "/rollback" | "/pin" | "/canary" | "/canary/promote" | "/upgrade")
                | (&Method::DELETE, "/pin" | "/canary")
        );
        if change && !guard::is_intended(request.headers()) {
            return error(StatusCode::FORBIDDEN, guard::INTENT_REFUSED);
        }
        if let Some(pid) = self.host.handed_over_to().filter(|_| change) {
            return handed_over(pid);
        }
        if change && path != "/upgrade" {
            // A change waits for the others to end, and a host upgrade holds them all from
            // before it hands over until this process exits: answered like one that came after.
            return tokio::select! {
                response = self.route(request, method, &path) => response,
                pid = self.host.wait_handed_over() => handed_over(pid),
            };
        }
        self.route(request, method, &path).await
    }

    async fn route(&self, request: Request<Incoming>, method: Method, path: &str) -> Response<Full<Bytes>> {
        let registry = &self.registry;
        match (method, path) {
            (Method::GET, "/status") => {
                json_response(StatusCode::OK, &status(registry, &self.host, self.certificates.as_deref(), self.started))
            }
            (Method::GET, "/metrics") => {
                let mut response = Response::new(Full::new(Bytes::from(crate::control::metrics::render(registry, &self.host, self.certificates.as_ref()))));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                response
            }
            (Method::POST, "/reload") => {
                // The certificates first: they are read in an instant, and a swap may take a while.
                let certificates = self.certificates.as_ref().map(|c| {
                    let reloaded = c.reload(true);
                    CertificatesReloaded { replaced: reloaded.replaced.iter().map(|c| certificate_entry(c)).collect(), refused: reloaded.refused }
                });
                let outcome = registry.reload().await;
                let refused = matches!(outcome, Outcome::Refused { .. }) || certificates.as_ref().is_some_and(|c| !c.refused.is_empty());
                let status = if refused { StatusCode::CONFLICT } else { StatusCode::OK };
                json_response(status, &ReloadAnswer { outcome, certificates })
            }
            (Method::POST, "/rollback") => changed(registry.rollback().await),
            (Method::POST, "/pin") => {
                let version = match read_version(request).await {
                    Ok(version) => version,
                    Err(message) => return error(StatusCode::BAD_REQUEST, &message),
                };
                changed(registry.pin_version(version).await)
            }
            (Method::DELETE, "/pin") => outcome(registry.unpin().await),
            (Method::POST, "/canary") => {
                let (version, share) = match read_canary(request).await {
                    Ok(order) => order,
                    Err(message) => return error(StatusCode::BAD_REQUEST, &message),
                };
                changed(registry.canary(version, share).await)
            }
            (Method::POST, "/canary/promote") => changed(registry.promote().await),
            (Method::DELETE, "/canary") => changed(registry.abort_canary().await),
            (Method::POST, "/upgrade") => {
                let order = match read_json::<UpgradeRequest>(request, "{\"binary\": \"/usr/local/bin/hotswap\"} or {}").await {
                    Ok(order) => order,
                    Err(message) => return error(StatusCode::BAD_REQUEST, &message),
                };
                self.upgrade(order).await
            }
            (method, path) => match ENDPOINTS.iter().find(|(endpoint, _)| *endpoint == path) {
                Some((_, allow)) => {
                    let mut response = error(StatusCode::METHOD_NOT_ALLOWED, &format!("{path} takes {allow}, not {method}"));
                    response.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static(allow));
                    response
                }
                None => {
                    let known = ENDPOINTS.iter().map(|(path, allow)| format!("{allow} {path}")).collect::<Vec<_>>();
                    error(StatusCode::NOT_FOUND, &format!("no endpoint {path}: try {}", known.join("; ")))
                }
            },
        }
    }
}

impl Api {
    /// `POST /upgrade`: has the host process replaced, and answers once the new one serves
    /// (200) or did not start (500, with its error; this host goes on serving).
    async fn upgrade(&self, order: UpgradeRequest) -> Response<Full<Bytes>> {
        let Some(orders) = self.host.orders() else {
            return error(StatusCode::CONFLICT, "this host cannot upgrade itself: only `hotswap serve` can (not `hotswap dev`)");
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        let timeout = match order.timeout.as_deref().map(crate::control::host::parse_upgrade_timeout).transpose() {
            Ok(timeout) => timeout,
            Err(message) => return error(StatusCode::BAD_REQUEST, &format!("`timeout`: {message}")),
        };
        let order = UpgradeOrder { binary: order.binary, timeout, reply };
        if orders.send(order).await.is_err() {
            return error(StatusCode::CONFLICT, "this host is shutting down or has handed over already");
        }
        match answer.await {
            Ok(Ok(upgrade)) => json_response(StatusCode::OK, &upgrade),
            Ok(Err(message)) => error(StatusCode::INTERNAL_SERVER_ERROR, &message),
            Err(_) => error(StatusCode::CONFLICT, "this host is shutting down or has handed over already"),
        }
    }
}

/// The answer to a change once this host has handed over to `pid`.
fn handed_over(pid: u32) -> Response<Full<Bytes>> {
    let message = format!(
        "this host process has handed over to a new one (pid {pid}) and is finishing its last responses: \
         send the command again, it reaches the new one"
    );
    error(StatusCode::CONFLICT, &message)
}

/// The body of a change, as JSON: `T`, or an error message naming `example`. An empty body
/// reads as `{}`.
async fn read_json<T: serde::de::DeserializeOwned>(request: Request<Incoming>, example: &str) -> Result<T, String> {
    let body = tokio::time::timeout(HEAD_TIMEOUT, Limited::new(request.into_body(), MAX_BODY).collect())
        .await
        .map_err(|_| format!("the request body did not arrive within {HEAD_TIMEOUT:?}"))?
        .map_err(|e| format!("cannot read the request body: {e}"))?
        .to_bytes();
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) { b"{}" } else { &body };
    serde_json::from_slice(body).map_err(|e| format!("the body must be JSON like {example}: {e}"))
}

/// The `version` of a `POST /pin` body.
async fn read_version(request: Request<Incoming>) -> Result<semver::Version, String> {
    let pin: PinRequest = read_json(request, "{\"version\": \"1.2.0\"}").await?;
    semver::Version::parse(&pin.version).map_err(|e| format!("`{}` is not a semantic version like 1.2.0: {e}", pin.version))
}

/// The version and share of a `POST /canary` body.
async fn read_canary(request: Request<Incoming>) -> Result<(Option<semver::Version>, Option<Share>), String> {
    let order: CanaryRequest = read_json(request, "{\"version\": \"1.2.0\", \"percent\": 10}").await?;
    let version = order
        .version
        .map(|v| semver::Version::parse(&v).map_err(|e| format!("`{v}` is not a semantic version like 1.2.0: {e}")))
        .transpose()?;
    let share = order
        .percent
        .map(|percent| match Share::from_percent(percent) {
            Some(share) if share.percent() > 0.0 => Ok(share), // 0.004 would round to none
            _ => Err(format!("`percent`: {percent} is not at least 0.01 and at most 100 (DELETE /canary ends a canary)")),
        })
        .transpose()?;
    Ok((version, share))
}

fn changed(result: Result<Outcome, ChangeError>) -> Response<Full<Bytes>> {
    match result {
        Ok(o) => outcome(o),
        Err(e @ ChangeError::UnknownVersion { .. }) => error(StatusCode::NOT_FOUND, &e.to_string()),
        Err(
            e @ (ChangeError::NothingToRollBackTo { .. }
            | ChangeError::NothingToCanary { .. }
            | ChangeError::NoCanary
            | ChangeError::ServesAlready { .. }),
        ) => {
            error(StatusCode::CONFLICT, &e.to_string())
        }
    }
}

fn outcome(outcome: Outcome) -> Response<Full<Bytes>> {
    let status = match outcome {
        Outcome::Refused { .. } => StatusCode::CONFLICT,
        _ => StatusCode::OK,
    };
    json_response(status, &outcome)
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json_response(status, &ErrorBody { error: message.to_owned() })
}

fn json_response(status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    let (status, mut text) = match serde_json::to_vec_pretty(body) {
        Ok(text) => (status, text),
        // Not expected (paths are written lossily): say so, as an error.
        Err(e) => {
            let error = ErrorBody { error: format!("cannot encode the answer as JSON: {e}") };
            (StatusCode::INTERNAL_SERVER_ERROR, serde_json::to_vec_pretty(&error).unwrap_or_default())
        }
    };
    text.push(b'\n');
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    response
}

fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

fn age(at: SystemTime) -> f64 {
    SystemTime::now().duration_since(at).map_or(0.0, |d| (d.as_secs_f64() * 1000.0).round() / 1000.0)
}

/// A certificate, as status and reloads show it.
fn certificate_entry(c: &Certificate) -> CertificateEntry {
    let left = c.not_after.duration_since(SystemTime::now()).map_or(0.0, |d| d.as_secs_f64());
    CertificateEntry {
        cert_file: c.cert_file.clone(),
        expires_in_days: (left / 864.0).round() / 100.0,
        key_file: c.key_file.clone(),
        loaded_at: rfc3339(c.loaded_at),
        names: c.names.clone(),
        not_after: crate::control::tls::rfc3339(c.not_after),
        not_before: crate::control::tls::rfc3339(c.not_before),
        sha256: c.sha256.clone(),
        subject: c.subject.clone(),
    }
}

/// `GET /status`.
fn status(registry: &Registry, host: &HostProcess, certificates: Option<&Certificates>, started: SystemTime) -> Status {
    let current = registry.current();
    let canary = registry.canary_progress();
    let canary_id = canary.as_ref().map(|c| c.generation.id());
    let history = registry.history().records();
    let refused = registry.history().refusals();
    let record_of = |id: u64| history.iter().find(|r| r.generation == Some(id));
    let resident = registry
        .resident()
        .iter()
        .map(|g| {
            let at = record_of(g.id()).map_or(started, |r| r.at);
            ResidentEntry {
                age_seconds: age(at),
                blocked_seconds: crate::plugin::watchdog::blocked_for(g.id()).map(|d| d.as_secs_f64()),
                bytes_sent: g.stats().bytes_sent(),
                file: g.source().to_path_buf(),
                generation: g.id(),
                in_flight: g.in_flight(),
                loaded_at: rfc3339(at),
                name: g.name().to_owned(),
                requests: g.stats().requests(),
                state: match g.id() {
                    id if id == current.id() => "current",
                    id if Some(id) == canary_id => "canary",
                    _ => "draining",
                }
                .to_owned(),
                streams: g.stats().streams(),
                upgraded: g.stats().upgraded(),
                version: g.version().to_string(),
            }
        })
        .collect();
    let mut entries: Vec<_> = history.iter().chain(&refused).collect();
    entries.sort_by_key(|r| std::cmp::Reverse(r.at));
    let records = entries
        .into_iter()
        .map(|r| HistoryEntry {
            at: rfc3339(r.at),
            file: r.file.clone(),
            generation: r.generation,
            name: r.name.clone(),
            reason: r.refused.clone(),
            requests: r.requests(),
            sha256: r.sha256.get().cloned(),
            state: r.state(current.id(), canary_id).as_str().to_owned(),
            version: r.version.as_ref().map(ToString::to_string),
        })
        .collect();
    let refusals = refused
        .iter()
        .rev()
        .map(|r| RefusalEntry {
            at: rfc3339(r.at),
            file: r.file.clone(),
            reason: r.refused.clone(),
            version: r.version.as_ref().map(ToString::to_string),
        })
        .take(10)
        .collect();
    let builds = registry
        .builds()
        .into_iter()
        .map(|b| BuildEntry { file: b.file, name: b.name, refused: b.refused, rolled_back: b.rolled_back, version: b.version.to_string() })
        .collect();
    let ms = |d: Option<Duration>| d.map(|d| (d.as_secs_f64() * 1e6).round() / 1e3);
    let canary = canary.map(|c| CanaryEntry {
        current_errors: c.current.errors,
        current_p99_ms: ms(c.current.p99()),
        current_requests: c.current.requests,
        elapsed_seconds: (c.elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
        errors: c.canary.errors,
        generation: c.generation.id(),
        name: c.generation.name().to_owned(),
        p99_ms: ms(c.canary.p99()),
        percent: c.share.percent(),
        replayed: c.generation.stats().replayed(),
        requests: c.canary.requests,
        sticky: c.sticky,
        verdict: match c.verdict {
            Verdict::Wait(progress) => format!("waiting: {progress}"),
            Verdict::Promote(why) => format!("promoting: {why}"),
            Verdict::RollBack(why) => format!("rolling back: {why}"),
        },
        version: c.generation.version().to_string(),
    });
    Status {
        builds,
        canary,
        current: CurrentEntry {
            file: current.source().to_path_buf(),
            generation: current.id(),
            loaded_at: record_of(current.id()).map(|r| rfc3339(r.at)),
            name: current.name().to_owned(),
            sha256: record_of(current.id()).and_then(|r| r.sha256.get().cloned()),
            version: current.version().to_string(),
        },
        history: records,
        host_version: env!("CARGO_PKG_VERSION").to_owned(),
        pid: std::process::id(),
        pin: registry.pin().map(|p| PinEntry { by: p.by.to_string(), name: p.name, version: p.version.to_string() }),
        plugin_source: registry.source().dir.clone(),
        refusals,
        resident,
        tls: certificates.map(|c| TlsEntry {
            certificates: c.serving().iter().map(|c| certificate_entry(c)).collect(),
            refusals: c.refusals().iter().rev().map(|r| CertRefusalEntry { at: rfc3339(r.at), reason: r.reason.clone() }).collect(),
        }),
        upgrades: host.upgrades(),
        uptime_seconds: age(started),
    }
}

#[cfg(test)]
mod tests {
    use super::AdminAddr;

    #[test]
    fn an_admin_address_is_a_socket_an_address_or_an_https_url() {
        let parse = |text: &str| text.parse::<AdminAddr>();
        assert_eq!(parse("127.0.0.1:9090"), Ok(AdminAddr::Tcp("127.0.0.1:9090".parse().unwrap())));
        assert_eq!(parse("http://127.0.0.1:9090/"), Ok(AdminAddr::Tcp("127.0.0.1:9090".parse().unwrap())));
        assert_eq!(parse("https://admin.example:9090"), Ok(AdminAddr::Https { host: "admin.example".into(), port: 9090 }));
        assert_eq!(parse("https://[::1]:9090"), Ok(AdminAddr::Https { host: "::1".into(), port: 9090 }));
        assert_eq!(parse("https://[::1]:9090").unwrap().to_string(), "https://[::1]:9090");
        assert!(parse("https://admin.example").is_err());
        assert!(parse("https://:9090").is_err());
        assert_eq!(parse("/run/hotswap/admin.sock"), Ok(AdminAddr::Unix("/run/hotswap/admin.sock".into())));
        assert_eq!(parse("off"), Ok(AdminAddr::Off));
    }
}
