//! The serving lifecycle shared by `hotswap serve` and `hotswap dev`: load the first
//! generation, listen, run the swap triggers, drain on SIGTERM/SIGINT, unload, exit.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use sd_notify::NotifyState;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::control::admin::AdminListener;
use crate::control::builds::PluginSource;
use crate::cmd::cli::HostArgs;
use crate::plugin::reaper;
use crate::plugin::LoadOptions;
use crate::latch::Latch;
use crate::plugin::loader::ShadowDir;
use crate::control::registry::Registry;
use crate::plugin::trust::Trust;
use crate::serve::Server;

/// Serves until SIGTERM or SIGINT, starting with the build of `source` that should serve
/// (see `builds`); `triggers` runs beside the server and swaps in new generations (file watcher, dev
/// rebuilds; SIGHUP arrives on the given stream) until the token is cancelled.
pub(crate) async fn run<T, F>(args: &HostArgs, trust: Trust, source: PluginSource, triggers: T) -> anyhow::Result<()>
where
    T: FnOnce(Arc<Registry>, Signal, CancellationToken) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    // Every signal handler is in place before anything can be signalled about: a SIGHUP
    // that arrived before its handler would terminate the process (the default action).
    let latch = Arc::new(Latch::new());
    // Only the latch may cancel: its flag, which connections read, must be raised first.
    let shutdown = latch.token().child_token();
    spawn_signal_handler(latch.clone())?;
    let hangup = signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
    // The socket first: one passed by systemd is taken before anything else opens a file, and
    // a port in use fails the start before any plugin is loaded.
    let listener = match crate::sys::inherited_listener().context("cannot use the socket passed by the service manager")? {
        Some(inherited) => TcpListener::from_std(inherited)?,
        None => TcpListener::bind(args.listen).await.with_context(|| format!("cannot listen on {}", args.listen))?,
    };
    let admin = AdminListener::bind(args.admin.admin.as_ref(), args.admin.admin_token_file.as_deref()).await?;
    let shadow = Arc::new(ShadowDir::create(args.shadow_dir.as_deref()).context("cannot create the shadow directory")?);
    let options = LoadOptions {
        worker_threads: args.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
        init_timeout: args.init_timeout,
        unload_timeout: Duration::from_secs(5),
        shadow: shadow.clone(),
        trust,
    };
    reserve_file_descriptors(args.limits.max_connections);
    let registry = Arc::new(Registry::start(source, options, args.drain_timeout, args.max_generations).await?);
    let triggers = tokio::spawn(triggers(registry.clone(), hangup, shutdown.clone()));
    if let Some(admin) = admin {
        admin.spawn(registry.clone(), shutdown.clone());
    }
    tracing::info!("listening on http://{}", listener.local_addr()?);
    notify_service_manager(&[NotifyState::Ready]);
    let server = Server::new(registry.current_cell(), args.limits.limits(), latch);
    server.accept_loop(listener).await;
    notify_service_manager(&[NotifyState::Stopping]);
    let _ = triggers.await;
    // No build gets new requests any more (and no swap is under way): long-lived sessions
    // that watch for it (WebSockets, through `handler_api::superseded`) may end politely
    // while the rest drains.
    registry.current_cell().load().superseded().raise();

    tracing::info!(connections = server.connections(), "draining (up to {:?})", args.drain_timeout);
    if !server.drained(args.drain_timeout).await {
        tracing::warn!(connections = server.connections(), "drain timeout reached: aborting responses still in progress");
        registry.abort_all();
        server.drained(Duration::from_secs(2)).await;
    }
    drop(server);
    drop(registry);
    let unloaded = tokio::task::spawn_blocking(|| reaper::wait_all_unloaded(Duration::from_secs(15))).await?;
    if !unloaded {
        tracing::warn!(resident = reaper::resident_generations(), "some generations were not unloaded before exit");
    }
    drop(shadow);
    tracing::info!("shut down");
    Ok(())
}

/// Tells systemd (`Type=notify`, when `NOTIFY_SOCKET` is set) where the service stands.
fn notify_service_manager(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!("cannot notify the service manager (NOTIFY_SOCKET): {e}");
    }
}

/// File descriptors the host needs besides one per connection: listeners, the watcher,
/// generations' runtimes, logs.
const FD_RESERVE: u64 = 256;

/// Raises the soft limit on open files so that `max_connections` fit (many systems start
/// processes at 1024), or warns that they cannot.
fn reserve_file_descriptors(max_connections: u64) {
    let wanted = max_connections.saturating_add(FD_RESERVE);
    match crate::sys::raise_open_files_limit(wanted) {
        Ok(limit) if limit < wanted => tracing::warn!(
            "--max-connections {max_connections} needs about {wanted} file descriptors, but the limit is {limit}: \
             lower --max-connections, or raise the hard limit (ulimit -Hn, systemd LimitNOFILE=)"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot read or raise the open files limit: {e}"),
    }
}

fn spawn_signal_handler(shutdown: Arc<Latch>) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!("received {name}: shutting down gracefully");
        shutdown.raise();
    });
    Ok(())
}
