//! The serving lifecycle shared by `hotswap serve` and `hotswap dev`: load the first
//! generation, listen, run the swap triggers, drain on SIGTERM/SIGINT, unload, exit.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use sd_notify::NotifyState;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use std::os::fd::AsFd as _;

use crate::cmd::upgrade;
use crate::control::admin::{AdminAddr, AdminListener};
use crate::control::host::{HostProcess, UpgradeOrder};
use crate::control::registry::Outcome;
use crate::control::builds::PluginSource;
use crate::control::canary::CanaryPolicy;
use crate::control::tls::Certificates;
use crate::cmd::cli::HostArgs;
use crate::plugin::{reaper, watchdog};
use crate::plugin::LoadOptions;
use crate::latch::Latch;
use crate::plugin::loader::ShadowDir;
use crate::control::registry::Registry;
use crate::plugin::trust::Trust;
use crate::serve::Server;

/// Serves until SIGTERM or SIGINT, starting with the build of `source` that should serve
/// (see `builds`); `triggers` runs beside the server and swaps in new generations (file watcher, dev
/// rebuilds; SIGHUP arrives on the given stream) until the token is cancelled.
///
/// `role`: what it runs as (see [`Role`]).
///
/// A second SIGTERM or SIGINT during the drain cuts off what is still in progress at once;
/// a third ends the process on the spot.
pub(crate) async fn run<T, F>(
    args: &HostArgs,
    trust: Trust,
    source: PluginSource,
    policy: CanaryPolicy,
    role: Role,
    triggers: T,
) -> anyhow::Result<()>
where
    T: FnOnce(Arc<Registry>, Signal, CancellationToken) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    // Before any plugin library is opened (see `watchdog::start`).
    watchdog::start();
    // Every signal handler is in place before anything can be signalled about: a SIGHUP
    // that arrived before its handler would terminate the process (the default action).
    let latch = Arc::new(Latch::new());
    // Only the latch may cancel: its flag, which connections read, must be raised first.
    let shutdown = latch.token().child_token();
    let forced = spawn_signal_handler(latch.clone(), role == Role::Dev)?;
    let hangup = signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
    // SIGHUP also reads the certificates again: each stream gets every signal.
    let hangup_tls = signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
    let user2 = signal(SignalKind::user_defined2()).context("cannot install the SIGUSR2 handler")?;
    let binary = started_from().map_or_else(|| std::env::current_exe().context("cannot tell which binary this host runs"), Ok)?;
    // The socket first: one passed by systemd (or by the host this one replaces) is taken
    // before anything else opens a file, and a port in use fails the start before any plugin
    // is loaded.
    let (inherited, sockets) = upgrade::inherit().await?.unzip();
    // The one socket passed is named `https`: it serves HTTPS, whatever --listen-tls says.
    let mut lone_https = false;
    let (listener, inherited_admin, inherited_tls, activated_tls) = match sockets {
        Some(sockets) => {
            let (tls, activated) = if sockets.tls_activated { (None, sockets.tls_listener) } else { (sockets.tls_listener, None) };
            (TcpListener::from_std(sockets.listener)?, Some(sockets.admin), tls, activated)
        }
        None => {
            let passed = crate::sys::inherited_listeners().context("cannot use the sockets passed by the service manager")?;
            lone_https = passed.lone_https;
            let listener = match passed.plain {
                Some(passed) => TcpListener::from_std(passed)?,
                None => TcpListener::bind(args.listen).await.with_context(|| format!("cannot listen on {}", args.listen))?,
            };
            (listener, None, None, passed.https)
        }
    };
    if (activated_tls.is_some() || lone_https) && args.tls.tls_cert.is_none() && args.tls.tls_dir.is_none() {
        anyhow::bail!(
            "the service manager passed a socket named `https`, and no certificate is given: \
             give --tls-cert and --tls-key (or --tls-dir), or remove FileDescriptorName=https"
        );
    }
    let tls_activated = activated_tls.is_some();
    if let (true, Some(addr)) = (tls_activated || lone_https, args.tls.listen_tls) {
        let passed = if lone_https { "one socket, named `https`" } else { "a socket named `https`" };
        tracing::warn!("--listen-tls {addr} is not used: the service manager passed {passed}, which serves HTTPS");
    }
    let tls_listener = match (args.tls.listen_tls, inherited_tls) {
        _ if lone_https => None,
        _ if activated_tls.is_some() => activated_tls.map(TcpListener::from_std).transpose()?,
        (Some(_), Some(inherited)) => Some(TcpListener::from_std(inherited)?),
        (Some(addr), None) => Some(TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} (--listen-tls)"))?),
        (None, Some(_)) => {
            tracing::warn!("the previous host served HTTPS on a second address (--listen-tls), and this one is not told to: it is closed");
            None
        }
        (None, None) => None,
    };
    let started = start(args, trust, source, policy, inherited.as_ref(), inherited_admin, listener).await;
    let (registry, listener, admin, certificates) = match (started, &inherited) {
        (Ok(started), _) => started,
        (Err(e), Some(inherited)) => {
            inherited.failed(&e).await;
            return Err(e);
        }
        (Err(e), None) => return Err(e),
    };
    let (orders, orders_in) = tokio::sync::mpsc::channel(4);
    let host = Arc::new(HostProcess::new((role == Role::Service).then_some(orders), inherited.as_ref().map(|i| i.upgrades.clone()).unwrap_or_default()));
    spawn_upgrade_signal(user2, host.clone());
    let listening = listener.as_fd().try_clone_to_owned().context("cannot keep the listening socket for an upgrade")?;
    let tls_listening = match &tls_listener {
        Some(l) => Some(l.as_fd().try_clone_to_owned().context("cannot keep the HTTPS listening socket for an upgrade")?),
        None => None,
    };
    // Which listener serves HTTPS: --listen-tls's, else --listen's once a certificate is given.
    let acceptor = match &certificates {
        Some(certificates) => Some(TlsAcceptor::from(certificates.server_config(crate::serve::ALPN).context("cannot set up TLS")?)),
        None => None,
    };
    let (plain_tls, second_tls) = if tls_listener.is_some() { (None, acceptor) } else { (acceptor, None) };
    let server = Server::new(registry.current_cell(), args.limits.limits(), args.access_log, latch);
    // A host that takes over first waits until the previous one has stopped accepting; it
    // changes and serves nothing before (that one may yet stop it).
    if let Some(inherited) = &inherited {
        inherited.ready(&host).await?;
    }
    let triggers = tokio::spawn(triggers(registry.clone(), hangup, shutdown.clone()));
    tokio::spawn(registry.clone().judge_canaries(shutdown.clone()));
    if let Some(certificates) = &certificates {
        tokio::spawn(certificates.clone().watch(hangup_tls, shutdown.clone()));
    }
    let admin = admin.map(|admin| admin.spawn(registry.clone(), host.clone(), certificates.clone(), shutdown.clone()));
    let adopting = match inherited {
        Some(inherited) => {
            if let Some(admin) = &admin {
                admin.own_socket_file();
            }
            // systemd follows this process from now on (`NotifyAccess=all`).
            notify_service_manager(&[NotifyState::MainPid(std::process::id()), NotifyState::Ready]);
            let registry = registry.clone();
            tokio::spawn(async move {
                // A build newer than the one the previous host served may have arrived meanwhile.
                if let Outcome::Swapped { to, .. } = registry.settle().await {
                    tracing::info!(generation = to.generation, "swapped in a build newer than the previous host served");
                }
            });
            Some(tokio::spawn(inherited.adopt(server.clone(), host.clone())))
        }
        None => {
            notify_service_manager(&[NotifyState::Ready]);
            None
        }
    };
    // One line, which scripts wait for: `listening on http://ADDR[, https://ADDR]`.
    let listening_on: Vec<String> = [(Some(&listener), plain_tls.is_some()), (tls_listener.as_ref(), true)]
        .into_iter()
        .filter_map(|(listener, tls)| {
            let scheme = if tls { "https" } else { "http" };
            listener.map(|l| l.local_addr().map_or_else(|e| format!("{scheme} (its address cannot be read: {e})"), |a| format!("{scheme}://{a}")))
        })
        .collect();
    tracing::info!("listening on {}", listening_on.join(", "));
    let upgrader = upgrade::Upgrader {
        registry: registry.clone(),
        host: host.clone(),
        server: server.clone(),
        listener: listening,
        tls_listener: tls_listening,
        tls_activated,
        admin,
        binary,
        args: std::env::args_os().collect(),
    };
    let upgrades = tokio::spawn(upgrade::carry_out(orders_in, upgrader));
    let mut listeners = vec![(listener, plain_tls)];
    listeners.extend(tls_listener.map(|l| (l, second_tls)));
    server.accept_loop(listeners).await;
    // Handing over to a new host, or shutting down?
    let forwarding = if server.is_handing_over() {
        upgrades.await.ok().flatten()
    } else {
        upgrades.abort(); // a new host being started is stopped
        None
    };
    if forwarding.is_none() {
        notify_service_manager(&[NotifyState::Stopping]);
        let _ = triggers.await;
    } else {
        // Changes stay held while this host hands over: a swap the watcher was about to
        // make would wait for them for ever. The new host watches the directory now.
        triggers.abort();
    }
    // No build gets new requests any more (and no swap is under way): long-lived sessions
    // that watch for it (WebSockets, through `handler_api::superseded`) may end politely
    // while the rest drains.
    registry.current_cell().load().superseded().raise();
    if let Some(canary) = registry.current_cell().canary() {
        canary.generation().superseded().raise();
    }
    if let Some(adopting) = adopting {
        // Connections the previous host is still handing over are served here (or go on to
        // the next host) rather than lost when this process exits. It ends when that host
        // is done, or gone: it drains within its own drain timeout.
        let _ = adopting.await;
    }

    tracing::info!(connections = server.connections(), "draining (up to {:?})", args.drain_timeout);
    let drained = tokio::select! {
        drained = server.drained(args.drain_timeout) => drained,
        () = forced.raised() => false,
    };
    if !drained {
        let why = if forced.is_raised() { "stopping now" } else { "drain timeout reached" };
        tracing::warn!(connections = server.connections(), "{why}: aborting responses still in progress");
        registry.abort_all();
        server.drained(Duration::from_secs(2)).await;
    }
    let mut handed_over = Ok(());
    // Held until exit: a change that was waiting for it would be lost with this process.
    let mut _changes = None;
    if let Some(forwarding) = forwarding {
        let (handed, changes) = forwarding.finish().await;
        _changes = Some(changes);
        match handed {
            Ok(handed) => tracing::info!(connections = handed, "handed over to the new host"),
            Err(e) => {
                tracing::error!("{e:#}");
                handed_over = Err(e);
            }
        }
    }
    drop(server);
    drop(registry);
    let unloaded = tokio::task::spawn_blocking(|| reaper::wait_all_unloaded(Duration::from_secs(15))).await?;
    if !unloaded {
        tracing::warn!(resident = reaper::resident_generations(), "some generations were not unloaded before exit");
    }
    tracing::info!("shut down");
    handed_over
}

/// Loads the first generation and opens the admin listener: from the arguments, or as the
/// host this one replaces hands them over.
async fn start(
    args: &HostArgs,
    trust: Trust,
    source: PluginSource,
    policy: CanaryPolicy,
    inherited: Option<&upgrade::Inherited>,
    inherited_admin: Option<Option<(std::os::fd::OwnedFd, crate::control::admin::HandedAdmin)>>,
    listener: TcpListener,
) -> anyhow::Result<(Arc<Registry>, TcpListener, Option<AdminListener>, Option<Arc<Certificates>>)> {
    // Before any plugin is loaded: a certificate that cannot serve fails the start at once.
    let certificates = args.tls.source().map(Certificates::load).transpose().context("cannot serve HTTPS")?;
    let token_file = args.admin.admin_token_file.as_deref();
    let https = matches!(args.admin.admin, Some(AdminAddr::Https { .. }));
    let mut admin = match inherited_admin {
        // As the previous host had it (or had none).
        Some(admin) => admin.map(|(fd, handed)| AdminListener::inherit(fd, handed, token_file, https)).transpose()?,
        None => AdminListener::bind(args.admin.admin.as_ref(), token_file).await?,
    };
    if let Some(admin) = admin.as_mut().filter(|a| a.wants_tls()) {
        let Some(certificates) = &certificates else {
            anyhow::bail!("the admin API over https:// needs a certificate: give --tls-cert and --tls-key (or --tls-dir)");
        };
        admin.serve_tls(certificates.server_config(&[b"http/1.1"]).context("cannot set up TLS for the admin API")?);
    }
    let shadow = Arc::new(ShadowDir::create(args.shadow_dir.as_deref()).context("cannot create the shadow directory")?);
    let options = LoadOptions {
        worker_threads: args.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
        init_timeout: args.init_timeout,
        unload_timeout: Duration::from_secs(5),
        shadow,
        trust,
    };
    reserve_file_descriptors(args.limits.max_connections);
    let inheritance = inherited.map(|i| i.inheritance.clone());
    let registry = Registry::start(source, options, args.drain_timeout, args.max_generations, policy, inheritance).await?;
    Ok((Arc::new(registry), listener, admin, certificates))
}

/// SIGUSR2: upgrade the host to the binary at its own path (see `cmd::upgrade`).
fn spawn_upgrade_signal(mut user2: Signal, host: Arc<HostProcess>) {
    tokio::spawn(async move {
        while user2.recv().await.is_some() {
            let Some(orders) = host.orders() else {
                tracing::warn!("received SIGUSR2: only `hotswap serve` can upgrade itself; ignored");
                continue;
            };
            tracing::info!("received SIGUSR2: upgrading the host binary");
            let (reply, answer) = tokio::sync::oneshot::channel();
            if orders.send(UpgradeOrder { binary: None, timeout: None, reply }).await.is_err() {
                return;
            }
            // The outcome is logged where the upgrade is carried out.
            let _ = answer.await;
        }
    });
}

/// Tells systemd (`Type=notify`, when `NOTIFY_SOCKET` is set) where the service stands.
pub(crate) fn notify_service_manager(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!("cannot notify the service manager (NOTIFY_SOCKET): {e}");
    }
}

/// File descriptors the host needs besides one per connection: listeners, the watcher,
/// generations' runtimes, logs.
const FD_RESERVE: u64 = 256;

/// Raises the soft limit on open files so that `max_connections` fit (many systems start
/// processes at 1024), or warns that they cannot. It asks for room for as many again where
/// the hard limit allows: a host taking over from another (`hotswap upgrade`) serves the
/// connections handed over even beyond the limit.
fn reserve_file_descriptors(max_connections: u64) {
    let wanted = max_connections.saturating_add(FD_RESERVE);
    match crate::sys::raise_open_files_limit(wanted.saturating_add(max_connections)) {
        Ok(limit) if limit < wanted => tracing::warn!(
            "--max-connections {max_connections} needs about {wanted} file descriptors, but the limit is {limit}: \
             lower --max-connections, or raise the hard limit (ulimit -Hn, systemd LimitNOFILE=)"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot read or raise the open files limit: {e}"),
    }
}

/// What a host is run as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// `hotswap serve`: it can replace itself with a new binary (`hotswap upgrade`, SIGUSR2;
    /// see `cmd::upgrade`), and SIGHUP reloads. A host started by such an upgrade takes its
    /// sockets, build and history from the host it replaces instead of from its arguments.
    Service,
    /// `hotswap dev`, in a terminal: SIGHUP (the terminal closed) stops it, as SIGTERM does;
    /// it rebuilds when its sources change.
    Dev,
}

/// Raises `shutdown` at the first SIGTERM or SIGINT (or SIGHUP, with `hangup_stops`); the
/// latch it returns at the second, to cut off what is still in progress; and ends the
/// process at the third.
fn spawn_signal_handler(shutdown: Arc<Latch>, hangup_stops: bool) -> anyhow::Result<Arc<Latch>> {
    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    let mut hup = if hangup_stops { Some(signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?) } else { None };
    let forced = Arc::new(Latch::new());
    let force = forced.clone();
    tokio::spawn(async move {
        for received in 1.. {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                Some(()) = async { hup.as_mut()?.recv().await } => "SIGHUP",
            };
            match received {
                1 => {
                    tracing::info!("received {name}: shutting down gracefully (again to cut off what is in progress)");
                    shutdown.raise();
                }
                2 => {
                    tracing::warn!("received {name} again: cutting off what is in progress (once more to exit at once)");
                    force.raise();
                }
                _ => crate::sys::fatal(130, &format!("hotswap: received {name} a third time: exiting at once")),
            }
        }
    });
    Ok(forced)
}

/// The path this process was started from, as given (`argv[0]`, made absolute, or found on
/// `PATH`): not resolved through symlinks as `current_exe` is, so that an upgrade by default
/// runs what an installer has since pointed that path at (`/usr/local/bin/hotswap` ->
/// `/opt/hotswap-0.2.0/hotswap`).
fn started_from() -> Option<PathBuf> {
    let arg0 = PathBuf::from(std::env::args_os().next()?);
    if arg0.components().count() > 1 {
        return std::path::absolute(&arg0).ok().filter(|p| p.is_file());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(&arg0)).find(|p| p.is_absolute() && p.is_file())
}
