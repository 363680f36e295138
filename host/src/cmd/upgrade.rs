//! `hotswap upgrade`: replacing the host process itself (a new hotswap binary) without
//! refusing a connection or cutting a response.
//!
//! ## How
//!
//! 1. The running host (the *old* one) starts the new binary with its own arguments and a
//!    `SOCK_SEQPACKET` socket pair between them, the new one's end at descriptor 3
//!    (`HOTSWAP_UPGRADE_FD`). Over it, it sends `Hello`: the listening sockets (the admin
//!    listener and `--listen-tls`'s too; as descriptors, `SCM_RIGHTS`), the build it serves with the pin, the history
//!    and the builds it refused ([`Inheritance`]), and the upgrades before this one. From
//!    then on it holds changes (swaps, pins, reloads) back: the new host gets the state as it
//!    is.
//! 2. The new host binds nothing: it will serve on those sockets. It loads the same build
//!    (the bytes the old host kept of it; the build's file if it kept none), and only once
//!    that has worked does it answer `Ready`. If it cannot (`Failed`, an exit, or no answer within the timeout), it is
//!    stopped, the old host has changed nothing and goes on serving, and the order fails
//!    with the new host's error.
//! 3. On `Ready` the old host stops accepting and says so (`Accepted`; a connection it still
//!    accepts in that moment is handed over like the others); only then does the new host
//!    accept, serve the admin API and tell systemd it is the main process. The
//!    listening socket stays open all along: clients wait in its backlog, none is refused.
//! 4. The old host shuts down as on SIGTERM, except that each HTTP/1 connection goes to the
//!    new host at its next request boundary, with the bytes of the next request already read
//!    (`Connection`): its client keeps its socket. TLS connections (a TLS session cannot
//!    leave its process), HTTP/2 and upgraded connections
//!    (WebSockets), and responses in progress, finish on the old host, within the drain
//!    timeout. Then it sends `Done` and exits 0 (non-zero if the new host went away and
//!    connections were lost). Changes sent to it meanwhile are refused: they belong to the
//!    new host.
//!
//! Upgrades may follow each other before the previous one is done: a host still taking
//! connections over from the one before passes them on to the next, and waits for that one's
//! `Done` before it exits.
//!
//! A rollback is the same command with the old binary.

#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd as _, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_seqpacket::ancillary::{AncillaryMessageWriter, OwnedAncillaryMessage};
use tokio_seqpacket::UnixSeqpacket;
use tokio_util::sync::CancellationToken;

use crate::control::admin::{HandedAdmin, ServedAdmin};
use crate::control::history::unix_ms;
use crate::control::host::{HostProcess, UpgradeOrder, UpgradeRecord};
use crate::control::registry::{Inheritance, Registry};
use crate::serve::handoff::Handed;
use crate::serve::Server;

/// Where the new process finds its end of the hand-over socket.
const CHILD_FD: i32 = 3;
/// How long a new host may take to serve, by default.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// The largest datagram sent: longer messages continue in the next ones.
const DATAGRAM: usize = 32 * 1024;
/// Room for the descriptors sent with one message (at most three).
const ANCILLARY: usize = 128;

/// What the two processes say to each other.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "message", rename_all = "snake_case")]
enum Message {
    /// Old to new, with the listening socket and, if any, the admin listener and the HTTPS
    /// listener attached.
    Hello {
        inheritance: Box<Inheritance>,
        upgrades: Vec<UpgradeRecord>,
        /// Upgrades in all (`upgrades` keeps the latest).
        upgrade_count: u64,
        admin: Option<HandedAdmin>,
        /// Whether the HTTPS listener of `--listen-tls` follows the admin listener.
        #[serde(default)]
        tls_listener: bool,
        /// Whether that listener was passed by the service manager (named `https`) rather
        /// than bound for `--listen-tls`: the new host keeps it without the flag.
        #[serde(default)]
        tls_activated: bool,
        from_pid: u32,
        from_version: String,
        binary: PathBuf,
        /// When the upgrade was ordered, in milliseconds since the Unix epoch.
        ordered_ms: u64,
    },
    /// New to old: it is ready to serve; the old one stops accepting and answers `Accepted`.
    Ready { upgrade: UpgradeRecord },
    /// New to old: it cannot serve, and why; the old one goes on.
    Failed { error: String },
    /// Old to new: it has stopped accepting: the new one is the host now (and tells the
    /// service manager so).
    Accepted,
    /// Old to new, with a connection attached: the bytes read of its next request follow.
    /// `reading_head`: it has not sent its first request yet.
    Connection { reading_head: bool },
    /// Old to new: nothing more comes.
    Done { handed: u64 },
}

/// One end of the hand-over socket. A message is a datagram holding the lengths of its JSON
/// and of the bytes that follow it (`u32` each, little-endian), the JSON, then the bytes; what
/// does not fit continues in the next datagrams. Descriptors travel with the first.
struct Channel(UnixSeqpacket);

impl Channel {
    async fn send(&self, message: &Message, tail: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let json = serde_json::to_vec(message).map_err(io::Error::other)?;
        let length = |n: usize| u32::try_from(n).map_err(|_| io::Error::other("message too long")).map(u32::to_le_bytes);
        let mut whole = Vec::with_capacity(8 + json.len() + tail.len());
        whole.extend_from_slice(&length(json.len())?);
        whole.extend_from_slice(&length(tail.len())?);
        whole.extend_from_slice(&json);
        whole.extend_from_slice(tail);
        let mut chunks = whole.chunks(DATAGRAM);
        let first = chunks.next().unwrap_or_default();
        let mut space = [0u8; ANCILLARY];
        let mut ancillary = AncillaryMessageWriter::new(&mut space);
        if !fds.is_empty() {
            ancillary.add_fds(fds.iter().copied()).map_err(io::Error::from)?;
        }
        self.0.send_with_ancillary(first, &mut ancillary).await?;
        for chunk in chunks {
            self.0.send(chunk).await?;
        }
        Ok(())
    }

    /// The next message, its bytes and its descriptors; `None` when the other end has closed.
    async fn recv(&self) -> io::Result<Option<(Message, Bytes, Vec<OwnedFd>)>> {
        let mut buffer = vec![0u8; DATAGRAM];
        let mut space = [0u8; ANCILLARY];
        let (info, ancillary) = self.0.recv_with_ancillary(&mut buffer, &mut space).await?;
        if info.truncated() {
            return Err(io::Error::other("a hand-over message did not fit (is the other host another version of hotswap?)"));
        }
        if ancillary.is_truncated() {
            // This process is out of descriptors: the message's own were closed by the kernel.
            tracing::warn!("a descriptor handed over was lost: this host is out of file descriptors (raise LimitNOFILE / ulimit -n)");
        }
        let mut fds = Vec::new();
        for message in ancillary.into_messages() {
            if let OwnedAncillaryMessage::FileDescriptors(received) = message {
                fds.extend(received);
            }
        }
        let read = info.bytes_read();
        if read == 0 {
            return Ok(None);
        }
        if read < 8 {
            return Err(io::Error::other("a truncated hand-over message"));
        }
        let length = |at: usize| buffer.get(at..at + 4).and_then(|b| <[u8; 4]>::try_from(b).ok()).map_or(0, u32::from_le_bytes) as usize;
        let (json_len, tail_len) = (length(0), length(4));
        let total = 8 + json_len + tail_len;
        let mut whole = buffer[..read].to_vec();
        while whole.len() < total {
            let info = self.0.recv(&mut buffer).await?;
            let n = info.bytes_read();
            if info.truncated() {
                return Err(io::Error::other("a hand-over message did not fit"));
            }
            if n == 0 {
                return Err(io::Error::other("the hand-over socket closed in the middle of a message"));
            }
            whole.extend_from_slice(&buffer[..n]);
        }
        let message = serde_json::from_slice(&whole[8..8 + json_len]).map_err(io::Error::other)?;
        Ok(Some((message, Bytes::copy_from_slice(&whole[8 + json_len..total]), fds)))
    }
}

/// What the old host lends an upgrade: how to start the new binary, and what to hand it.
pub(crate) struct Upgrader {
    pub(crate) registry: Arc<Registry>,
    pub(crate) host: Arc<HostProcess>,
    pub(crate) server: Arc<Server>,
    /// A descriptor of the listening socket.
    pub(crate) listener: OwnedFd,
    /// `--listen-tls`'s, or the one the service manager passed (see `tls_activated`).
    pub(crate) tls_listener: Option<OwnedFd>,
    /// The HTTPS listener was passed by the service manager, named `https`.
    pub(crate) tls_activated: bool,
    pub(crate) admin: Option<ServedAdmin>,
    /// The binary this host runs (as found at its start: the same path serves a newer build
    /// installed over it).
    pub(crate) binary: PathBuf,
    /// This process's arguments, which the new one gets too.
    pub(crate) args: Vec<OsString>,
}

/// Carries out upgrade orders (admin API, SIGUSR2), one at a time, until one succeeds: then
/// this host hands over (see the module's documentation), and the forwarding of its
/// connections comes back, for the shutdown to finish once the server has drained.
pub(crate) async fn carry_out(mut orders: mpsc::Receiver<UpgradeOrder>, upgrader: Upgrader) -> Option<Forwarding> {
    while let Some(order) = orders.recv().await {
        let started = Instant::now();
        let binary = order.binary.clone().unwrap_or_else(|| upgrader.binary.clone());
        tracing::info!(binary = %binary.display(), "upgrading the host: starting the new binary");
        // No swap, pin or reload from here on: the new host gets the state as it is now. If
        // the upgrade succeeds, changes waiting here and new ones are answered 409 (see
        // `HostProcess::handed_over_to`): the new host is the one to ask.
        let changes = upgrader.registry.hold_changes().await;
        match start_successor(&upgrader, &binary, order.timeout.unwrap_or(DEFAULT_TIMEOUT)).await {
            Ok((channel, successor, record)) => {
                tracing::info!(
                    pid = record.to_pid, version = %record.to_version, took_ms = started.elapsed().as_millis() as u64,
                    "upgrade: the new host is ready; this one stops accepting and hands over its connections"
                );
                successor.release();
                upgrader.host.handed_over(record.clone());
                // The new process is the service now; it says so too, once this one has
                // stopped accepting (`Accepted`), but this one is the main process now.
                super::lifecycle::notify_service_manager(&[sd_notify::NotifyState::MainPid(record.to_pid)]);
                if let Some(admin) = &upgrader.admin {
                    admin.handed_over();
                }
                let (to, handed) = mpsc::unbounded_channel();
                upgrader.server.hand_over(to).await;
                let _ = order.reply.send(Ok(record));
                let finish = CancellationToken::new();
                let task = tokio::spawn(forward(channel, handed, finish.clone()));
                return Some(Forwarding { finish, task, changes });
            }
            Err(e) => {
                let message = format!("{e:#}");
                tracing::error!("upgrade failed, this host goes on serving: {message}");
                let _ = order.reply.send(Err(message));
            }
        }
    }
    None
}

/// The new host's process until it has taken over: stopped if the upgrade does not complete
/// (it failed, timed out, or this host is told to stop meanwhile), so it never serves beside
/// this one.
struct Successor(Option<tokio::process::Child>);

impl Successor {
    /// It serves now: it must outlive this host.
    fn release(mut self) {
        self.0.take();
    }
}

impl Drop for Successor {
    fn drop(&mut self) {
        let Some(mut child) = self.0.take() else { return };
        // SIGTERM first: the plugin it may have loaded gets its shutdown hooks. SIGKILL if it
        // is still there after a grace.
        if let Some(pid) = child.id() {
            crate::sys::terminate(pid);
        }
        let stop = async move {
            if tokio::time::timeout(SUCCESSOR_GRACE, child.wait()).await.is_err() {
                let _ = child.start_kill(); // tokio reaps it
            }
        };
        // Without a runtime the process is ending: the child is reparented, and goes on its own.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            drop(runtime.spawn(stop));
        }
    }
}

/// How long a new host that is not wanted may take to stop after SIGTERM.
const SUCCESSOR_GRACE: Duration = Duration::from_secs(5);

/// Why a new host did not serve.
enum NotServing {
    /// It said why.
    Refused(String),
    /// The hand-over went wrong, or it ended without saying why.
    Broken(anyhow::Error),
}

/// Starts `binary` and waits until it serves (or fails, exits, or lets `timeout` pass).
async fn start_successor(upgrader: &Upgrader, binary: &Path, timeout: Duration) -> anyhow::Result<(Channel, Successor, UpgradeRecord)> {
    let ordered = SystemTime::now();
    // As PID 1 (of a container), this process ends its container when it exits after handing
    // over, and the new host with it; an init in front (tini, `docker run --init`) ends it too,
    // when its one child exits.
    anyhow::ensure!(
        std::process::id() != 1,
        "this host is PID 1 (of its container): once it hands over and exits, the container \
         stops, and the new host with it. In a container, upgrade the host by rolling out a new \
         image (Kubernetes: a rolling update of the Deployment)"
    );
    check_binary(binary)?;
    let (ours, theirs) = UnixSeqpacket::pair().context("cannot create the socket pair for the hand-over")?;
    let theirs = OwnedFd::from(theirs);
    let mut command = tokio::process::Command::new(binary);
    command
        .args(upgrader.args.iter().skip(1))
        .env(crate::sys::UPGRADE_FD_ENV, CHILD_FD.to_string())
        // Sockets systemd passed were meant for this process (they come in `Hello`).
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .stdin(std::process::Stdio::null());
    crate::sys::pass_descriptor(command.as_std_mut(), theirs.as_fd(), CHILD_FD);
    let child = command.spawn().with_context(|| format!("cannot start {}", binary.display()))?;
    drop(theirs);
    let pid = child.id().unwrap_or(0);
    let mut successor = Successor(Some(child));
    let channel = Channel(ours);
    let answer = async {
        let (admin, admin_fd) = match &upgrader.admin {
            Some(admin) => {
                let (fd, handed) = admin.handoff().context("cannot share the admin listener").map_err(NotServing::Broken)?;
                (Some(handed), Some(fd))
            }
            None => (None, None),
        };
        let hello = Message::Hello {
            inheritance: Box::new(upgrader.registry.inheritance()),
            upgrades: upgrader.host.upgrades(),
            upgrade_count: upgrader.host.upgrade_count(),
            admin,
            tls_listener: upgrader.tls_listener.is_some(),
            tls_activated: upgrader.tls_activated,
            from_pid: std::process::id(),
            from_version: env!("CARGO_PKG_VERSION").to_owned(),
            binary: binary.to_path_buf(),
            ordered_ms: unix_ms(ordered),
        };
        let mut fds = vec![upgrader.listener.as_fd()];
        fds.extend(admin_fd.as_ref().map(|fd| fd.as_fd()));
        // Last: a binary from before HTTPS ignores it.
        fds.extend(upgrader.tls_listener.as_ref().map(|fd| fd.as_fd()));
        let broken = |e: io::Error, what: &str| NotServing::Broken(anyhow::Error::new(e).context(what.to_owned()));
        channel.send(&hello, &[], &fds).await.map_err(|e| broken(e, "cannot send the sockets to the new host"))?;
        match channel.recv().await.map_err(|e| broken(e, "cannot hear from the new host"))? {
            Some((Message::Ready { upgrade }, ..)) => Ok(upgrade),
            Some((Message::Failed { error }, ..)) => Err(NotServing::Refused(error)),
            Some((other, ..)) => Err(NotServing::Broken(anyhow::anyhow!("it sent {other:?} instead of saying whether it serves"))),
            None => Err(NotServing::Broken(anyhow::anyhow!("it closed the hand-over before it served"))),
        }
    };
    let outcome = tokio::select! {
        biased; // an answer that came in time is taken even if the timeout is due too
        answer = answer => answer,
        () = tokio::time::sleep(timeout) => {
            anyhow::bail!("the new host ({}, pid {pid}) did not serve within {timeout:?}: it was stopped", binary.display())
        }
    };
    match outcome {
        Ok(record) => Ok((channel, successor, record)),
        Err(NotServing::Refused(error)) => anyhow::bail!("the new host ({}, pid {pid}) cannot serve: {error}", binary.display()),
        Err(NotServing::Broken(e)) => {
            // If it has ended on its own, its exit says more than the socket did.
            let exited = match successor.0.as_mut() {
                Some(child) => tokio::time::timeout(Duration::from_millis(500), child.wait()).await.ok().and_then(Result::ok),
                None => None,
            };
            match exited {
                Some(status) => {
                    anyhow::bail!("the new host ({}, pid {pid}) exited ({status}) before it served: its log says why", binary.display())
                }
                None => Err(e.context(format!("the new host ({}, pid {pid}) did not serve: it was stopped", binary.display()))),
            }
        }
    }
}

/// Fails early, with a clear message, for a binary that cannot be started.
fn check_binary(binary: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::metadata(binary).with_context(|| format!("cannot use {} as the new binary", binary.display()))?;
    anyhow::ensure!(
        meta.is_file() && meta.permissions().mode() & 0o111 != 0,
        "{} is not an executable file: give the path of a hotswap binary (--binary)",
        binary.display()
    );
    Ok(())
}

/// The old host's side once the new one serves: its connections on their way there.
pub(crate) struct Forwarding {
    finish: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<u64>>,
    changes: tokio::sync::OwnedMutexGuard<()>,
}

impl Forwarding {
    /// Sends what is left (the server has drained: every connection handed over is queued)
    /// and says so to the new host. Returns how many connections were handed over, or an
    /// error if some could not be; and the hold on registry changes, to keep until exit.
    pub(crate) async fn finish(self) -> (anyhow::Result<u64>, tokio::sync::OwnedMutexGuard<()>) {
        self.finish.cancel();
        let handed = match self.task.await {
            Ok(handed) => handed,
            Err(e) => Err(anyhow::anyhow!("the hand-over task failed: {e}")),
        };
        (handed, self.changes)
    }
}

/// What the forwarding waits for.
enum Next {
    Connection(Handed),
    /// The new host said something, or closed: it is gone (it says nothing after `Ready`).
    Gone,
    Finished,
}

/// Tells the new host it is the host now, sends it each connection handed over until
/// `finish`, then `Done`. A connection that cannot go (the new host has gone) is closed,
/// and counted in the error.
async fn forward(channel: Channel, mut handed: mpsc::UnboundedReceiver<Handed>, finish: CancellationToken) -> anyhow::Result<u64> {
    let mut gone = channel.send(&Message::Accepted, &[], &[]).await.is_err();
    let (mut count, mut lost) = (0u64, 0u64);
    loop {
        let next = tokio::select! {
            biased;
            next = handed.recv() => next.map_or(Next::Finished, Next::Connection),
            () = finish.cancelled() => Next::Finished,
            _ = channel.recv(), if !gone => Next::Gone,
        };
        match next {
            Next::Connection(connection) => send_connection(&channel, connection, &mut gone, &mut count, &mut lost).await,
            Next::Gone => gone = true,
            Next::Finished => break,
        }
    }
    while let Ok(connection) = handed.try_recv() {
        send_connection(&channel, connection, &mut gone, &mut count, &mut lost).await;
    }
    if !gone {
        if let Err(e) = channel.send(&Message::Done { handed: count }, &[], &[]).await {
            tracing::debug!("cannot tell the new host the hand-over is done: {e}");
        }
    }
    if lost > 0 {
        anyhow::bail!(
            "the new host went away during the hand-over: {lost} connections could not be handed over and were closed; \
             if nothing serves the port now, start hotswap again"
        );
    }
    Ok(count)
}

async fn send_connection(channel: &Channel, connection: Handed, gone: &mut bool, count: &mut u64, lost: &mut u64) {
    if *gone {
        *lost += 1; // the socket closes here: its client sees the connection end
        return;
    }
    let message = Message::Connection { reading_head: connection.reading_head };
    match channel.send(&message, &connection.buffered, &[connection.stream.as_fd()]).await {
        Ok(()) => *count += 1,
        Err(e) => {
            *lost += 1;
            if matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset) {
                *gone = true;
            } else {
                tracing::warn!("cannot hand a connection to the new host: {e}");
            }
        }
    }
}

/// The sockets the host this one replaces handed over.
pub(crate) struct InheritedSockets {
    pub(crate) listener: std::net::TcpListener,
    pub(crate) admin: Option<(OwnedFd, HandedAdmin)>,
    /// `--listen-tls`'s, or the service manager's (`tls_activated`).
    pub(crate) tls_listener: Option<std::net::TcpListener>,
    pub(crate) tls_activated: bool,
}

/// The new host's side: what the host it replaces handed over, but the sockets.
pub(crate) struct Inherited {
    channel: Channel,
    pub(crate) inheritance: Inheritance,
    pub(crate) upgrades: Vec<UpgradeRecord>,
    upgrade_count: u64,
    from_pid: u32,
    from_version: String,
    binary: PathBuf,
    ordered_ms: u64,
}

/// If this process was started by `hotswap upgrade`: what the host it replaces handed over.
pub(crate) async fn inherit() -> anyhow::Result<Option<(Inherited, InheritedSockets)>> {
    let Some(fd) = crate::sys::upgrade_socket().context("cannot use the hand-over socket")? else {
        return Ok(None);
    };
    let channel = Channel(UnixSeqpacket::try_from(fd).context("cannot use the hand-over socket")?);
    let received = tokio::time::timeout(Duration::from_secs(10), channel.recv())
        .await
        .context("the host this one replaces sent nothing")?
        .context("cannot hear from the host this one replaces")?;
    let Some((Message::Hello { inheritance, upgrades, upgrade_count, admin, tls_listener, tls_activated, from_pid, from_version, binary, ordered_ms }, _, fds)) =
        received
    else {
        anyhow::bail!("the host this one replaces did not start the hand-over as expected");
    };
    let mut fds = fds.into_iter();
    let listener = fds.next().context("the host this one replaces sent no listening socket")?;
    let listener = std::net::TcpListener::from(listener);
    listener.set_nonblocking(true)?;
    let admin = match admin {
        Some(handed) => Some((fds.next().context("the host this one replaces sent no admin listener")?, handed)),
        None => None,
    };
    let tls_listener = match tls_listener {
        true => {
            let listener = std::net::TcpListener::from(fds.next().context("the host this one replaces sent no HTTPS listener")?);
            listener.set_nonblocking(true)?;
            Some(listener)
        }
        false => None,
    };
    tracing::info!(from_pid, from_version = %from_version, addr = %listener.local_addr()?, "taking over from the host this one replaces");
    let inheritance = *inheritance;
    let inherited = Inherited { channel, inheritance, upgrades, upgrade_count, from_pid, from_version, binary, ordered_ms };
    Ok(Some((inherited, InheritedSockets { listener, admin, tls_listener, tls_activated })))
}

impl Inherited {
    /// Tells the host this one replaces that it cannot serve, and why: that one goes on.
    pub(crate) async fn failed(&self, error: &anyhow::Error) {
        let message = Message::Failed { error: format!("{error:#}") };
        if let Err(e) = self.channel.send(&message, &[], &[]).await {
            tracing::debug!("cannot tell the previous host why this one failed: {e}");
        }
    }

    /// Tells the host this one replaces that this one is ready to serve, and waits until that
    /// one has stopped accepting (`Accepted`): from then on this is the host. An error: that
    /// one is gone, or gave up waiting (and stops this one). Until then this one accepts no
    /// connection and changes nothing (the clients wait in the listen backlog, for whichever
    /// host serves).
    pub(crate) async fn ready(&self, host: &HostProcess) -> anyhow::Result<()> {
        let now = SystemTime::now();
        let record = UpgradeRecord {
            at: humantime::format_rfc3339_millis(now).to_string(),
            binary: self.binary.clone(),
            connections_handed_over: 0,
            from_pid: self.from_pid,
            from_version: self.from_version.clone(),
            to_pid: std::process::id(),
            to_version: env!("CARGO_PKG_VERSION").to_owned(),
            took_ms: unix_ms(now).saturating_sub(self.ordered_ms),
        };
        let ready = Message::Ready { upgrade: record.clone() };
        let sent = self.channel.send(&ready, &[], &[]).await;
        // A previous host that died first closed the channel: the send fails, or the answer.
        let answer = match sent {
            Ok(()) => self.channel.recv().await,
            Err(e) => Err(e),
        };
        if let Ok(Some((Message::Accepted, ..))) = answer {
            host.upgraded_into(self.upgrade_count + 1, record);
            return Ok(());
        }
        if !crate::sys::process_exists(self.from_pid) {
            // It died before it could answer: nothing else serves the port now.
            tracing::warn!(pid = self.from_pid, "the previous host is gone before it let this one take over: serving anyway");
            host.upgraded_into(self.upgrade_count + 1, record);
            return Ok(());
        }
        match answer {
            Ok(Some((other, ..))) => anyhow::bail!("the previous host sent {other:?} instead of letting this one serve"),
            Ok(None) => anyhow::bail!("the previous host did not let this one take over (it gave up waiting, or was stopped)"),
            Err(e) => Err(anyhow::Error::new(e).context("cannot hear from the previous host")),
        }
    }

    /// Takes in the previous host's connections as they come, until it is done (or gone).
    /// If this host hands over in turn meanwhile, they go on to the next one (see
    /// `Server::adopt`): so this host must not exit before this ends.
    pub(crate) async fn adopt(self, server: Arc<Server>, host: Arc<HostProcess>) {
        loop {
            match self.channel.recv().await {
                Ok(Some((Message::Connection { reading_head }, buffered, fds))) => {
                    let Some(fd) = fds.into_iter().next() else {
                        tracing::warn!("the previous host handed over a connection without its socket");
                        continue;
                    };
                    host.adopted_one();
                    server.adopt(Handed { stream: std::net::TcpStream::from(fd), buffered, reading_head });
                }
                Ok(Some((Message::Done { handed }, ..))) => {
                    return tracing::info!(connections = handed, "the previous host has handed over every connection it could");
                }
                Ok(Some((other, ..))) => tracing::debug!("unexpected hand-over message: {other:?}"),
                Ok(None) => return tracing::info!("the previous host has gone"),
                Err(e) => return tracing::warn!("the hand-over from the previous host ended: {e}"),
            }
        }
    }
}
