use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use hotswap::cli::{Cli, Command, ServeArgs};
use hotswap::generation::{self, LoadOptions};
use hotswap::loader::ShadowDir;
use hotswap::registry::Registry;
use hotswap::server::Server;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_level);
    let result = match cli.command {
        Command::Serve(args) => run(serve(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("hotswap: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(level: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    // A bare level applies to hotswap and its plugins; dependencies (hyper, h2) stay at info.
    let directives = if level.contains('=') { level.to_owned() } else { format!("info,hotswap={level},plugin={level}") };
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&directives))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// The host's own runtime: accepting, signals, swaps. Plugin code never runs on it.
fn run(main: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("hs-main")
        .build()
        .context("cannot start the host runtime")?;
    runtime.block_on(main)
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let shadow = Arc::new(ShadowDir::create(args.shadow_dir.as_deref()).context("cannot create the shadow directory")?);
    let options = LoadOptions {
        worker_threads: args.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
        init_timeout: args.init_timeout,
        unload_timeout: Duration::from_secs(5),
        shadow: shadow.clone(),
    };
    let registry = Arc::new(
        Registry::start(&args.plugin, options, args.drain_timeout)
            .await
            .with_context(|| format!("cannot serve {}", args.plugin.display()))?,
    );
    let listener = TcpListener::bind(args.listen).await.with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = listener.local_addr()?;
    tracing::info!("listening on http://{address}");

    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone())?;
    let server = Server::new(registry.clone(), shutdown.clone());
    server.accept_loop(listener).await;

    tracing::info!(connections = server.connections(), "draining (up to {:?})", args.drain_timeout);
    if !server.drained(args.drain_timeout).await {
        tracing::warn!(connections = server.connections(), "drain timeout reached: aborting responses still in progress");
        registry.abort_all();
        server.drained(Duration::from_secs(2)).await;
    }
    drop(server);
    drop(registry);
    let unloaded = tokio::task::spawn_blocking(|| generation::wait_all_unloaded(Duration::from_secs(15))).await?;
    if !unloaded {
        tracing::warn!(resident = generation::resident_generations(), "some generations were not unloaded before exit");
    }
    drop(shadow);
    tracing::info!("shut down");
    Ok(())
}

fn spawn_signal_handler(shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!("received {name}: shutting down gracefully");
        shutdown.cancel();
    });
    Ok(())
}
