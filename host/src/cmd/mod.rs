//! The command line: clap arguments ([`cli`]), the configuration file ([`config`]), the
//! admin commands ([`client`]), the development loop ([`dev`]), new plugin crates ([`new`])
//! and the serving lifecycle ([`lifecycle`]). The only place `anyhow` is used: everything below returns typed errors, and
//! here they become messages for the terminal and the log.

#![forbid(unsafe_code)]

pub(crate) mod cli;
pub(crate) mod client;
pub(crate) mod config;
pub(crate) mod dev;
pub(crate) mod lifecycle;
pub(crate) mod new;
pub(crate) mod upgrade;

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;

use crate::control::builds::PluginSource;
use crate::control::watch;
use crate::plugin::probe;
use crate::plugin::threads::{self, Owner};
use crate::plugin::trust::Trust;
use cli::{Cli, Command, ServeArgs};

/// Whether library code captures backtraces (`std::backtrace::Backtrace::capture`, anyhow);
/// takes precedence over `RUST_BACKTRACE` for them.
const LIB_BACKTRACE: &str = "RUST_LIB_BACKTRACE";

/// Runs the command line: parses it (with the configuration file), and runs the command.
pub fn main() -> ExitCode {
    if std::env::args_os().nth(1).is_some_and(|arg| arg == probe::PROBE_ARG) {
        return probe::child();
    }
    // Before any thread starts: it changes the environment.
    crate::sys::claim_upgrade_socket();
    if std::env::var_os(LIB_BACKTRACE).is_none() {
        // Backtraces captured by library code (anyhow's, with RUST_BACKTRACE=1) would, once a
        // plugin formats one, keep its file mapped after it unloads (see plugin::loader).
        // Panics are reported without them anyway. Set before any thread starts.
        std::env::set_var(LIB_BACKTRACE, "0");
    }
    let args = match config::apply(std::env::args_os().collect()) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("hotswap: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cli = Cli::parse_from(args);
    let access_log = match &cli.command {
        Command::Serve(args) => args.host.access_log,
        Command::Dev(args) => args.host.access_log,
        _ => false,
    };
    init_logging(&cli.log_level, &cli.log_format, access_log);
    let server = !matches!(cli.command, Command::Admin(_) | Command::New(_));
    let result = match cli.command {
        Command::Serve(args) => run(serve_command(*args)),
        Command::Dev(args) => run(dev::run(*args)),
        Command::New(args) => new::run(args),
        Command::Admin(command) => run(client::run(command)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if server {
                tracing::error!("{e:#}");
            }
            eprintln!("hotswap: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `access_log`: the access log's lines pass whatever the level, or RUST_LOG, says.
fn init_logging(level: &str, format: &str, access_log: bool) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    // A bare level applies to hotswap and its plugins; dependencies (hyper, h2) stay at info.
    let directives = if level.contains('=') { level.to_owned() } else { format!("info,hotswap={level},plugin={level}") };
    let mut filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&directives))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    if access_log {
        if let Ok(access) = "hotswap::access=info".parse() {
            filter = filter.add_directive(access);
        }
    }
    // A log that cannot be written (stderr closed) is lost quietly: reporting that on stderr
    // would panic, in the middle of serving.
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).log_internal_errors(false);
    if format == "json" {
        logs.json().init();
    } else {
        logs.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

/// The host's own runtime: accepting, signals, swaps. Plugin code never runs on it.
fn run(main: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    // The host's threads are told from those plugin code starts by id (see plugin::threads).
    threads::register(Owner::Host);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("hs-main")
        .on_thread_start(|| threads::register(Owner::Host))
        .on_thread_stop(threads::unregister)
        .build()
        .context("cannot start the host runtime")?;
    let result = runtime.block_on(main);
    // Dropping the runtime would wait for its blocking work without end: a library whose
    // constructor hangs in the host, a read from a mount that hangs, must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    result
}

/// `hotswap serve`: the plugin source from the flags, the file watcher as the swap trigger.
async fn serve_command(args: ServeArgs) -> anyhow::Result<()> {
    let source = match (&args.plugin, &args.plugin_dir) {
        (Some(file), _) => PluginSource::file(file),
        (None, Some(dir)) => PluginSource::directory(dir.clone()),
        (None, None) => anyhow::bail!("give --plugin PATH or --plugin-dir DIR"),
    };
    let trust = Trust { insecure: args.insecure_plugin_dir, digests: args.trusted_digests.clone(), own_build: false };
    lifecycle::run(&args.host, trust, source.clone(), args.canary.policy(), lifecycle::Role::Service, move |registry, hangup, shutdown| {
        watch::run(source, registry, hangup, shutdown)
    }).await
}
