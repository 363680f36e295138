//! The command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand};

use crate::control::admin::AdminAddr;
use crate::control::canary::CanaryPolicy;
use crate::control::tls::CertSource;
use crate::plugin::route::{Share, Sticky};
use crate::serve::Limits;

/// An HTTP server that swaps its request handler while it runs.
///
/// The handler is a plugin: a cdylib built against the handler-api crate. hotswap loads it
/// from a private copy, serves HTTP/1.1 (keep-alive) and HTTP/2 (prior knowledge) on one port,
/// and on SIGTERM or SIGINT stops accepting, lets responses in progress finish (up to
/// --drain-timeout) and exits 0.
#[derive(Debug, Parser)]
#[command(name = "hotswap", version, propagate_version = true)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,

    /// A configuration file (TOML) with any of the options below; flags given on the command
    /// line override it. deploy/hotswap.toml in the repository is an annotated example.
    #[arg(long, global = true, value_name = "FILE", env = "HOTSWAP_CONFIG")]
    pub(crate) config: Option<PathBuf>,

    /// Log format: text (for people) or json (one object per line, for log collectors).
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    pub(crate) log_format: String,

    /// Log level: error, warn, info (startup, swaps, refusals), debug (one line per request)
    /// or trace. RUST_LOG, if set, takes precedence and accepts per-module filters.
    #[arg(long, global = true, default_value = "info", env = "HOTSWAP_LOG", value_parser = parse_log_level)]
    pub(crate) log_level: String,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Serve HTTP with a plugin as the request handler, swapping in new builds as they appear.
    // A flag given twice takes its last value: the configuration file's settings come first.
    #[command(args_override_self = true)]
    Serve(Box<ServeArgs>),
    /// Develop a plugin with live reload: rebuild it with cargo when its sources change and
    /// swap the new build in. A failed build prints the compiler's errors and the previous
    /// build keeps serving. Run it in the plugin's cargo workspace.
    #[command(args_override_self = true)]
    Dev(Box<DevArgs>),
    /// Create a new plugin crate: a handler (or an axum app, with --axum) and a test, ready
    /// for `hotswap dev` and `cargo test`.
    New(NewArgs),
    #[command(flatten)]
    Admin(AdminCommand),
}

#[derive(Debug, Args)]
pub(crate) struct NewArgs {
    /// The crate's name (letters, digits, '-' and '_'); also its directory, unless --path.
    pub(crate) name: String,

    /// An axum app (a Router with state, built when the host loads the build) instead of a
    /// plain handler function.
    #[arg(long)]
    pub(crate) axum: bool,

    /// The directory to create (default: NAME). It must not exist, or be empty.
    #[arg(long, value_name = "DIR")]
    pub(crate) path: Option<PathBuf>,

    /// handler-api as a path dependency on this directory (default: the handler-api of the
    /// source tree this binary was built from).
    #[arg(long, value_name = "PATH", conflicts_with = "handler_api_git")]
    pub(crate) handler_api: Option<PathBuf>,

    /// handler-api as a git dependency on this repository (hotswap's).
    #[arg(long, value_name = "URL")]
    pub(crate) handler_api_git: Option<String>,
}

/// The commands that talk to a running host's admin API.
#[derive(Debug, Subcommand)]
pub(crate) enum AdminCommand {
    /// Show what serves: the current generation, those still draining (in-flight requests,
    /// open streams, bytes sent, age), the history of generations and recent refusals.
    #[command(args_override_self = true)]
    Status(AdminClientArgs),
    /// Read the plugin directory again and swap in the build that should serve (retrying
    /// builds refused before), and read the TLS certificates again. Exits non-zero, with the
    /// reason, if a build or a certificate was refused.
    #[command(args_override_self = true)]
    Reload(AdminClientArgs),
    /// Go back to the version served before the current one, and pin it (newer builds are
    /// not swapped in until `hotswap unpin`).
    #[command(args_override_self = true)]
    Rollback(AdminClientArgs),
    /// Serve VERSION (a build of it in the plugin directory, or a kept copy of an earlier
    /// generation) and hold it against newer builds until `hotswap unpin`.
    #[command(args_override_self = true)]
    Pin {
        /// A semantic version, like 1.4.2 (matches 1.4.2+anything unless build metadata is given).
        // Not the id `version`: that is `--version`'s, which every subcommand has.
        #[arg(id = "pin_version", value_name = "VERSION")]
        version: String,
        #[command(flatten)]
        client: AdminClientArgs,
    },
    /// Lift the pin: the highest version serves again (swapped in now if it is not serving).
    #[command(args_override_self = true)]
    Unpin(AdminClientArgs),
    /// Start a canary: VERSION (default: the build that should replace the current one) gets
    /// --percent of new requests while the current version serves the rest. It is promoted,
    /// or rolled back and its build refused, by the host's --canary-* rules; `hotswap status`
    /// shows how it is doing. Given for the canary that runs, --percent changes its share.
    #[command(args_override_self = true)]
    Canary {
        /// A semantic version, like 1.4.2 (a build in the plugin directory, or a kept copy).
        #[arg(id = "canary_version", value_name = "VERSION", conflicts_with_all = ["promote", "abort"])]
        version: Option<String>,
        /// The share of new requests it gets, above 0 and up to 100 (default: the share of the
        /// canary that runs, else the host's --canary, else 10).
        #[arg(long, value_parser = parse_share, conflicts_with_all = ["promote", "abort"])]
        percent: Option<f64>,
        /// Promote the canary now: it gets every new request.
        #[arg(long, conflicts_with = "abort")]
        promote: bool,
        /// Roll the canary back now: the current version serves every request, and the
        /// canary's build is refused.
        #[arg(long)]
        abort: bool,
        #[command(flatten)]
        client: AdminClientArgs,
    },
    /// Replace the host process itself with a new hotswap binary, refusing no connection and
    /// cutting no response. The new process gets the listening socket, the admin socket, the
    /// build that serves (with the pin and history), and every idle cleartext keep-alive
    /// connection (TLS ones close after their request in progress, and their clients
    /// connect again, to the new host);
    /// responses in progress, HTTP/2 and WebSocket connections finish on the old process,
    /// which then exits 0. If the new binary does not serve within --timeout, the old host
    /// goes on as before and this exits non-zero with the new one's error. SIGUSR2 does the
    /// same with the running binary's path. Roll back by upgrading to the old binary.
    #[command(args_override_self = true)]
    Upgrade {
        /// The new binary. Default: the path the running host was started from (where a
        /// newer build may have been installed since).
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
        /// How long the new host may take to load the plugin and serve (1s to 5m).
        #[arg(long, default_value = "60s", value_parser = crate::control::host::parse_upgrade_timeout)]
        timeout: Duration,
        #[command(flatten)]
        client: AdminClientArgs,
    },
}

impl AdminCommand {
    /// How to reach the host.
    pub(crate) fn client(&self) -> &AdminClientArgs {
        match self {
            AdminCommand::Status(args)
            | AdminCommand::Reload(args)
            | AdminCommand::Rollback(args)
            | AdminCommand::Unpin(args)
            | AdminCommand::Pin { client: args, .. }
            | AdminCommand::Canary { client: args, .. }
            | AdminCommand::Upgrade { client: args, .. } => args,
        }
    }
}

/// How the admin commands reach the host.
#[derive(Debug, Clone, Args)]
pub(crate) struct AdminClientArgs {
    /// The host's admin API: a Unix socket path, address:port, or https://HOST:PORT. Default:
    /// the host's own default (/run/hotswap/admin.sock as root, else
    /// $XDG_RUNTIME_DIR/hotswap/admin.sock).
    #[arg(long, value_name = "SOCKET|ADDR|https://HOST:PORT", env = "HOTSWAP_ADMIN")]
    pub(crate) admin: Option<AdminAddr>,

    /// For an https:// --admin: the certificate authority (PEM) that issued the host's
    /// certificate, trusted instead of the system's.
    #[arg(long, value_name = "FILE", env = "HOTSWAP_ADMIN_CA")]
    pub(crate) admin_ca: Option<PathBuf>,

    /// A file holding the bearer token the host was given (--admin-token-file).
    #[arg(long, value_name = "FILE", env = "HOTSWAP_ADMIN_TOKEN_FILE")]
    pub(crate) admin_token_file: Option<PathBuf>,

    /// Print the API's JSON instead of tables.
    #[arg(long)]
    pub(crate) json: bool,
}

/// The admin API's listener.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Admin API")]
pub(crate) struct AdminArgs {
    /// Where the admin API (status, reload, rollback, pin, upgrade, metrics) listens: a Unix socket
    /// path (mode 0600, answering only this user and root), an address:port, https://ADDR:PORT
    /// (HTTPS with the certificates of --tls-cert or --tls-dir, so that the token never
    /// crosses the network in clear text), or `off`.
    /// Default: /run/hotswap/admin.sock as root, else $XDG_RUNTIME_DIR/hotswap/admin.sock
    /// (or /tmp/hotswap-UID/admin.sock); if that default is taken by another host, the API
    /// is disabled with a warning.
    #[arg(long, value_name = "SOCKET|ADDR|https://ADDR|off", env = "HOTSWAP_ADMIN")]
    pub(crate) admin: Option<AdminAddr>,

    /// A file holding a bearer token that every admin request must carry
    /// (`Authorization: Bearer TOKEN`). Required when --admin is a non-loopback address.
    #[arg(long, value_name = "FILE", env = "HOTSWAP_ADMIN_TOKEN_FILE")]
    pub(crate) admin_token_file: Option<PathBuf>,
}

/// Options shared by `serve` and `dev`.
#[derive(Debug, Args)]
pub(crate) struct HostArgs {
    /// Address to listen on. Port 0 picks a free port; the log says which. Under systemd
    /// socket activation (LISTEN_FDS), the socket passed in is used instead.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub(crate) listen: SocketAddr,

    /// How long responses in progress, and upgraded connections (WebSockets), may go on after
    /// shutdown is requested, or after their generation was replaced, before they are cut
    /// off. Examples: 30s, 500ms, 2m.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub(crate) drain_timeout: Duration,

    /// How long a plugin may take, at each step of a load, before it is refused: its library
    /// opened and closed in a probe process (its constructors and destructors), its init, its
    /// readiness check.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub(crate) init_timeout: Duration,

    /// Worker threads per generation, at least 1 (default: one per CPU).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub(crate) workers: Option<usize>,

    /// Directory for the private shadow copies of plugins (a 0700 subdirectory is created
    /// there and removed at exit; ones left by a crashed host are removed at start).
    /// Default: the system's temporary directory.
    #[arg(long, value_name = "DIR")]
    pub(crate) shadow_dir: Option<PathBuf>,

    /// The most generations that may be loaded at once: the current one and those still
    /// draining or not yet unloaded. When a swap would exceed it, the oldest draining
    /// generation's remaining responses are cut off and it unloads; a load that would exceed it
    /// even so (generations already cut off that have not unloaded within 5 s) is refused.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(2..))]
    pub(crate) max_generations: u64,

    /// Log every response as it ends, at info level with the target hotswap::access: its
    /// method, path and query, HTTP version, status, the body bytes sent and whether the body
    /// went out whole, the time from the request to the end of the response, the client's
    /// address, the request id and the version that answered. In the log's format
    /// (--log-format json for a collector), on stderr. Requests hyper refuses before they
    /// reach the host (a malformed request line) are not in it.
    #[arg(long)]
    pub(crate) access_log: bool,

    #[command(flatten)]
    pub(crate) tls: TlsArgs,

    #[command(flatten)]
    pub(crate) limits: HttpLimits,

    #[command(flatten)]
    pub(crate) admin: AdminArgs,
}

/// HTTPS: where its certificates come from, and where it listens.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "HTTPS")]
#[command(group(ArgGroup::new("tls_source").args(["tls_cert", "tls_dir"])))]
pub(crate) struct TlsArgs {
    /// Serve HTTPS (HTTP/2 and HTTP/1.1, by ALPN; TLS 1.2 and 1.3) with this certificate chain
    /// (PEM, the server's certificate first): on --listen, or on --listen-tls if given. A new
    /// certificate written or renamed over it (or `hotswap reload`, or SIGHUP) is checked
    /// (it parses, the key matches, it has not expired) and used for new connections, while
    /// open ones keep theirs; one that fails is refused, with the reason in the log and
    /// `hotswap status`, and the previous one keeps serving. The header read timeout covers
    /// the handshake.
    #[arg(long, value_name = "FILE", requires = "tls_key", conflicts_with = "tls_dir")]
    pub(crate) tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM: PKCS#8, RSA or EC). Keep it readable by the
    /// host's user only.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub(crate) tls_key: Option<PathBuf>,

    /// Serve HTTPS with a directory of certificates: each NAME.crt with its key NAME.key,
    /// chosen for each connection by the name the client asks for (SNI); the first by file
    /// name serves clients that ask for no name or another one. Each pair is replaced (or
    /// refused) on its own, as with --tls-cert.
    #[arg(long, value_name = "DIR")]
    pub(crate) tls_dir: Option<PathBuf>,

    /// Serve HTTPS on this address, and cleartext HTTP (and h2c) on --listen beside it.
    /// Without it, --listen serves HTTPS only, once a certificate is given.
    #[arg(long, value_name = "ADDR", requires = "tls_source")]
    pub(crate) listen_tls: Option<SocketAddr>,
}

impl TlsArgs {
    /// Where the certificates come from, if HTTPS is served.
    pub(crate) fn source(&self) -> Option<CertSource> {
        match (&self.tls_cert, &self.tls_key, &self.tls_dir) {
            (Some(cert), Some(key), _) => Some(CertSource::Pair { cert: cert.clone(), key: key.clone() }),
            (_, _, Some(dir)) => Some(CertSource::Dir(dir.clone())),
            _ => None,
        }
    }
}

/// What one client may cost the server.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "HTTP limits")]
pub(crate) struct HttpLimits {
    /// How long a client may take to send a request's head. HTTP/1: the request line and
    /// headers, counted from their first byte, or from the connection's start for the first
    /// request; a slower client (slowloris), or one silent after connecting, is disconnected.
    /// HTTP/2: a header block (HEADERS and its CONTINUATION frames), counted from its first
    /// frame; the connection is closed even if other streams are in progress on it.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub(crate) header_read_timeout: Duration,

    /// How long a connection with no request in progress may stay open. HTTP/1: nothing
    /// received or sent for this long (keep-alive). HTTP/2: no stream in progress for this
    /// long, whatever else the client sends (PINGs, SETTINGS and WINDOW_UPDATEs keep no
    /// connection open).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub(crate) idle_timeout: Duration,

    /// How long a request body the plugin is waiting for may go without progress (like
    /// nginx's client_body_timeout): if the client sends less than --min-body-rate × this
    /// (at least one byte) within it, the plugin's read fails, the request is answered 408
    /// (or its response, if started, cut off), and the connection is closed (HTTP/1) or the
    /// stream reset (HTTP/2). Time the plugin spends not reading the body does not count.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub(crate) body_read_timeout: Duration,

    /// How long a client may go without taking any of what the connection has to send it
    /// (like nginx's send_timeout): a client that stops reading a response (or a WebSocket),
    /// or an HTTP/2 client that stops granting flow-control window for one, is then cut off,
    /// with every response in progress on the connection, and what they held is freed. A
    /// slow client that takes something within each period is not. 0 turns it off.
    /// Examples: 60s, 5m, 0.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub(crate) send_timeout: Duration,

    /// How long the plugin may take to answer a request (its response's status and headers),
    /// counted from when the request reached it, and again from each part of the request body
    /// it reads; time it spends waiting for the client's body does not count. A request not
    /// answered in time gets a 504 (a canary's idempotent request is answered by the current
    /// version instead) and the plugin's work on it is dropped. A response's body, once
    /// started, is not timed (downloads, server-sent events), nor a WebSocket. A handler that
    /// blocks its thread is answered only once it lets go. 0 turns it off (long polling that
    /// answers late). Examples: 60s, 5m, 0.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub(crate) response_timeout: Duration,

    /// The slowest a request body may arrive, averaged over each --body-read-timeout, while
    /// the plugin waits for it: a client trickling a byte at a time is cut off as if it sent
    /// nothing. 0 turns the rate off (any byte is progress). Examples: 512B/s, 1KiB/s, 0.
    #[arg(long, default_value = "512B/s", value_parser = parse_rate)]
    pub(crate) min_body_rate: u64,

    /// The largest request head (request line and headers) accepted; a larger one is
    /// answered 431. At least 8KiB. Above about 400KiB it also raises what an HTTP/1
    /// connection may buffer (hyper bounds both with one figure). Examples: 16KiB, 1MiB.
    #[arg(long, default_value = "64KiB", value_parser = parse_header_size)]
    pub(crate) max_header_size: u64,

    /// The largest request body accepted. A larger declared Content-Length is answered 413
    /// without calling the plugin; a streamed body that grows past it fails for the plugin
    /// where it crosses the limit, and is answered 413 (unless the plugin had already started
    /// its response, which is then cut off). Examples: 64MiB, 1GiB.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    pub(crate) max_body_size: u64,

    /// The most connections served at once. Further clients wait in the listen backlog until
    /// a connection closes; none is refused or reset.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) max_connections: u64,
}

impl HttpLimits {
    /// The server's limits.
    pub(crate) fn limits(&self) -> Limits {
        Limits {
            header_read_timeout: self.header_read_timeout,
            idle_timeout: self.idle_timeout,
            body_read_timeout: self.body_read_timeout,
            send_timeout: Some(self.send_timeout).filter(|t| !t.is_zero()),
            response_timeout: Some(self.response_timeout).filter(|t| !t.is_zero()),
            min_body_rate: self.min_body_rate,
            max_header_size: self.max_header_size,
            max_body_size: self.max_body_size,
            max_connections: self.max_connections,
        }
    }
}

pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    text.parse::<bytesize::ByteSize>().map(|size| size.as_u64())
}

/// Bytes per second: a size, with or without `/s`.
pub(crate) fn parse_rate(text: &str) -> Result<u64, String> {
    let text = text.trim();
    parse_size(text.strip_suffix("/s").unwrap_or(text))
}

pub(crate) fn parse_header_size(text: &str) -> Result<u64, String> {
    // hyper reads request heads into a buffer of at least 8 KiB.
    parse_size(text).and_then(|size| if size >= 8192 { Ok(size) } else { Err("must be at least 8KiB".into()) })
}

#[derive(Debug, Args)]
pub(crate) struct DevArgs {
    /// The cargo package of the plugin (a cdylib). Default: the package of the current
    /// directory if it is a plugin, else the workspace's only plugin (in hotswap's own
    /// repository, example-handler).
    #[arg(long, short)]
    pub(crate) package: Option<String>,

    /// Build in release mode.
    #[arg(long)]
    pub(crate) release: bool,

    #[command(flatten)]
    pub(crate) host: HostArgs,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("source").required(true).args(["plugin", "plugin_dir"])))]
pub(crate) struct ServeArgs {
    /// The plugin library (.so) to serve. It is copied to a private shadow path and loaded
    /// from there; the file itself is never mapped, so it may be replaced at any time: a new
    /// build written or renamed over it is swapped in unless it is a lower version (see
    /// --plugin-dir).
    #[arg(long, value_name = "PATH")]
    pub(crate) plugin: Option<PathBuf>,

    /// A directory of plugin builds (*.so). The highest version that loads is served (a
    /// rebuild of it, newer on disk, too; a build of another plugin if newer on disk); a new
    /// or changed file is validated and swapped in if it should serve, and a lower version
    /// never replaces a higher one unless pinned (`hotswap pin`). SIGHUP rescans the directory.
    #[arg(long, value_name = "DIR")]
    pub(crate) plugin_dir: Option<PathBuf>,

    /// Load plugins even from a file or directory that someone other than this host's user
    /// (or root) may write, with a warning at every load. Without it such plugins are refused.
    #[arg(long)]
    pub(crate) insecure_plugin_dir: bool,

    /// Only load plugins whose SHA-256 is listed in FILE (one digest per line, or the output
    /// of sha256sum). Others are refused, with their digest in the log. FILE is read again at
    /// every load.
    #[arg(long, value_name = "FILE")]
    pub(crate) trusted_digests: Option<PathBuf>,

    #[command(flatten)]
    pub(crate) canary: CanaryArgs,

    #[command(flatten)]
    pub(crate) host: HostArgs,
}

/// Canary rollouts: how a new build is tried on a share of requests, and judged.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Canary rollouts")]
pub(crate) struct CanaryArgs {
    /// Start every new build as a canary that gets PERCENT of new requests (above 0, up to 100) while
    /// the current version serves the rest; it is promoted or rolled back by the rules below.
    /// Without it, a new build serves every new request at once (`hotswap canary` still
    /// starts a canary by hand).
    #[arg(long, value_name = "PERCENT", value_parser = parse_share)]
    pub(crate) canary: Option<f64>,

    /// New builds found in the plugin directory do not serve by themselves: they are listed
    /// (`hotswap status`), and `hotswap canary VERSION` or `hotswap pin VERSION` serves one.
    /// For a fleet whose rollouts decide when a build serves (deploy/rollout.sh).
    #[arg(long, conflicts_with = "canary")]
    pub(crate) hold: bool,

    /// Start pinned to VERSION (as `hotswap pin VERSION` would), if a build of it is there;
    /// else the highest version serves, with a warning. With --hold, what a restarted host
    /// serves: the version the fleet released (deploy/kubernetes sets it from its ConfigMap).
    #[arg(long, value_name = "VERSION", env = "HOTSWAP_PIN", value_parser = parse_version)]
    pub(crate) pin: Option<semver::Version>,

    /// Route by a key, so that one user sees one version: `cookie:NAME` or `header:NAME`.
    /// Requests without the key are split by share alone.
    #[arg(long, value_name = "cookie:NAME|header:NAME")]
    pub(crate) canary_sticky: Option<Sticky>,

    /// Promote a healthy canary once it has answered this many requests.
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) canary_requests: u64,

    /// Or once it has run this long (and answered --canary-min-requests).
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = humantime::parse_duration)]
    pub(crate) canary_duration: Duration,

    /// Judge a canary only once it has answered this many requests; from then on, its error
    /// rate is checked continuously.
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) canary_min_requests: u64,

    /// Roll back a canary whose share of 5xx answers (panics included) exceeds the current
    /// version's, over the same window, by more than this many percentage points.
    #[arg(long, value_name = "POINTS", default_value_t = 1.0, value_parser = parse_percent)]
    pub(crate) canary_max_error_rate: f64,

    /// Roll back a canary whose p99 time to the response head exceeds the current version's,
    /// over the same window, times this, plus --canary-latency-slack.
    #[arg(long, value_name = "RATIO", default_value_t = 1.5, value_parser = parse_ratio)]
    pub(crate) canary_max_latency_ratio: f64,

    /// Added to the current version's p99 before that comparison: differences below it are
    /// noise (a busy machine, a few slow requests among a canary's first ones), not a
    /// regression. Examples: 10ms, 0ms, 50ms.
    #[arg(long, value_name = "DURATION", default_value = "10ms", value_parser = humantime::parse_duration)]
    pub(crate) canary_latency_slack: Duration,
}

impl CanaryArgs {
    /// The rules the registry applies.
    pub(crate) fn policy(&self) -> CanaryPolicy {
        CanaryPolicy {
            auto: self.canary.and_then(Share::from_percent),
            hold: self.hold,
            start_pin: self.pin.clone(),
            sticky: self.canary_sticky.clone(),
            requests: self.canary_requests,
            duration: self.canary_duration,
            min_requests: self.canary_min_requests,
            max_error_rate: self.canary_max_error_rate,
            max_latency_ratio: self.canary_max_latency_ratio,
            latency_slack: self.canary_latency_slack,
        }
    }
}

/// A percentage, 0 to 100.
pub(crate) fn parse_percent(text: &str) -> Result<f64, String> {
    let percent: f64 = text.trim().trim_end_matches('%').parse().map_err(|_| format!("`{text}` is not a number like 10 or 2.5"))?;
    Share::from_percent(percent).map(Share::percent).ok_or_else(|| format!("{text} is not between 0 and 100"))
}

/// A log level, or filter directives as `RUST_LOG` takes them (`info,hotswap=debug`).
pub(crate) fn parse_log_level(text: &str) -> Result<String, String> {
    let level = text.trim();
    let valid = if level.contains('=') {
        tracing_subscriber::EnvFilter::try_new(level).is_ok()
    } else {
        ["off", "error", "warn", "info", "debug", "trace"].iter().any(|l| l.eq_ignore_ascii_case(level))
    };
    if valid {
        Ok(level.to_owned())
    } else {
        Err(format!("`{text}` is not a log level (error, warn, info, debug or trace) nor filter directives like info,hotswap=debug"))
    }
}

/// A semantic version, like 1.4.2.
pub(crate) fn parse_version(text: &str) -> Result<semver::Version, String> {
    semver::Version::parse(text.trim()).map_err(|e| format!("`{text}` is not a semantic version like 1.4.2: {e}"))
}

/// A canary's share: a percentage above 0.
pub(crate) fn parse_share(text: &str) -> Result<f64, String> {
    let percent = parse_percent(text)?;
    if percent <= 0.0 {
        return Err("0 % would send the canary nothing: give a share above 0 (or end it with --abort)".into());
    }
    Ok(percent)
}

/// A ratio from 1 to 1000.
pub(crate) fn parse_ratio(text: &str) -> Result<f64, String> {
    match text.trim().trim_end_matches(['x', '×']).parse::<f64>() {
        Ok(ratio) if (1.0..=1000.0).contains(&ratio) => Ok(ratio),
        _ => Err(format!("`{text}` is not a ratio from 1 to 1000, like 1.5")),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    #[test]
    fn the_command_line_is_consistent() {
        // clap's own checks (ids used twice, such as `pin`'s VERSION against `--version`),
        // which otherwise fail only when that subcommand is parsed in a debug build.
        super::Cli::command().debug_assert();
    }

    #[test]
    fn a_rate_is_a_size_per_second() {
        assert_eq!(super::parse_rate("512B/s"), Ok(512));
        assert_eq!(super::parse_rate("1KiB/s"), Ok(1024));
        assert_eq!(super::parse_rate("2048"), Ok(2048));
        assert_eq!(super::parse_rate("0"), Ok(0));
        assert!(super::parse_rate("fast").is_err());
    }
}
