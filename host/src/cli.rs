//! The command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand};

/// An HTTP server that swaps its request handler while it runs.
///
/// The handler is a plugin: a cdylib built against the handler-api crate. hotswap loads it
/// from a private copy, serves HTTP/1.1 (keep-alive) and HTTP/2 (prior knowledge) on one port,
/// and on SIGTERM or SIGINT stops accepting, lets responses in progress finish (up to
/// --drain-timeout) and exits 0.
#[derive(Debug, Parser)]
#[command(name = "hotswap", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Log level: error, warn, info (startup, swaps, refusals), debug (one line per request)
    /// or trace. RUST_LOG, if set, takes precedence and accepts per-module filters.
    #[arg(long, global = true, default_value = "info", env = "HOTSWAP_LOG")]
    pub log_level: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve HTTP with a plugin as the request handler, swapping in new builds as they appear.
    Serve(ServeArgs),
    /// Develop a plugin with live reload: rebuild it with cargo when its sources change and
    /// swap the new build in. A failed build prints the compiler's errors and the previous
    /// build keeps serving. Run it in the plugin's cargo workspace.
    Dev(DevArgs),
}

/// Options shared by `serve` and `dev`.
#[derive(Debug, Args)]
pub struct HostArgs {
    /// Address to listen on. Port 0 picks a free port; the log says which.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// How long responses in progress may go on after shutdown is requested, or after their
    /// generation was replaced, before they are cut off. Examples: 30s, 500ms, 2m.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// How long a plugin's init and readiness check may take, each, before it is refused.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub init_timeout: Duration,

    /// Worker threads per generation (default: one per CPU).
    #[arg(long)]
    pub workers: Option<usize>,

    /// Directory for the private shadow copies of plugins (a 0700 subdirectory is created
    /// there and removed at exit). Default: the system's temporary directory.
    #[arg(long, value_name = "DIR")]
    pub shadow_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// The cargo package of the plugin (a cdylib).
    #[arg(long, short, default_value = "example-handler")]
    pub package: String,

    /// Build in release mode.
    #[arg(long)]
    pub release: bool,

    #[command(flatten)]
    pub host: HostArgs,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("source").required(true).args(["plugin", "plugin_dir"])))]
pub struct ServeArgs {
    /// The plugin library (.so) to serve. It is copied to a private shadow path and loaded
    /// from there; the file itself is never mapped, so it may be replaced at any time: a new
    /// build written or renamed over it is swapped in.
    #[arg(long, value_name = "PATH")]
    pub plugin: Option<PathBuf>,

    /// A directory of plugin builds (*.so). The most recently modified one that loads is
    /// served; any new or changed file is validated and swapped in, newest first. SIGHUP
    /// rescans the directory.
    #[arg(long, value_name = "DIR")]
    pub plugin_dir: Option<PathBuf>,

    #[command(flatten)]
    pub host: HostArgs,
}
