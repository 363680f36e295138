//! The HTTP server: accepting connections, serving them on the threads of the current
//! generation, and moving them to a newer generation at a request boundary.
//!
//! ## Where a connection runs
//!
//! The listener lives on the host's own runtime. Each accepted socket is handed to the
//! current generation's runtime, which registers it with its own reactor and serves it with
//! hyper (HTTP/1.1 with keep-alive, or HTTP/2 with prior knowledge, detected per
//! connection; over TLS, as ALPN decides, after a handshake made there too). An HTTP/1 request is handed to the plugin, and its response polled, inline on
//! that connection's task: a request costs no hop between threads.
//!
//! When a newer generation becomes current, every connection of the old one is told
//! (`Generation::superseded`). A connection with no HTTP/1 request in progress moves at once:
//! its task ends on the old runtime and the same hyper connection future is spawned on the
//! new one, where the socket re-registers with the new reactor on its next poll
//! (`MigratingStream`). A connection busy with a response (a long download) finishes it on
//! the old generation and moves right after. No client reconnects and nothing is closed.
//!
//! HTTP/2 streams are spawned by hyper through `StreamExecutor` onto the runtime of the
//! generation serving the connection, and the stream's task carries that generation: the
//! plugin sees the request there, so a stream in progress never holds its connection (or its
//! other streams) back.
//!
//! ## While a canary runs
//!
//! Two generations take new requests, each on its own threads (`plugin::route` decides which).
//! A new connection starts on the generation its slot names; an HTTP/2 stream is spawned on
//! the runtime of the generation its own slot names. An HTTP/1 connection takes further slots
//! in blocks and serves each block in two runs, moving between them at a request boundary,
//! as after a swap (`connection::Runs`). A
//! request whose sticky key names the other generation is relayed to that runtime (a hop
//! between threads, once: the connection follows it at its next boundary). A canary's `GET`
//! or `HEAD` that fails before its response starts is relayed to the current generation.
//!
//! | module | holds |
//! |---|---|
//! | this one | the accept loop and the connection limit |
//! | [`connection`] | a connection's task, its socket, and its moves between generations |
//! | [`handoff`] | connections handed to a new host process at a request boundary |
//! | [`respond`] | a request in flight: handed to the plugin, answered, its body sent |
//! | [`state`] | what connections share with the server, and among their parts |
//! | [`limits`] | the header read, idle and body read timeouts, kept apart from any generation's runtime |

#![forbid(unsafe_code)]

pub(crate) mod connection;
pub(crate) mod handoff;
pub(crate) mod limits;
pub(crate) mod respond;
pub(crate) mod state;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::latch::Latch;
use crate::plugin::request::Origin;
use crate::plugin::Current;
pub(crate) use connection::ALPN;
use connection::{ConnTask, MigratingStream};
use handoff::Handed;
pub(crate) use limits::Limits;
use limits::Sweeper;
use state::{ConnState, OpenConnection, Shared};

/// State shared by the accept loop and every connection.
pub(crate) struct Server {
    shared: Arc<Shared>,
    limits: Limits,
    /// `--access-log`.
    access_log: bool,
    sweeper: Arc<Sweeper>,
    /// One permit per connection that may be open at once.
    slots: Arc<Semaphore>,
    /// Stops the sweeper when the server goes.
    _sweeping: DropGuard,
    /// Cancelled once the accept loop has ended.
    stopped_accepting: CancellationToken,
}

impl Server {
    /// A server for the generation that is `current` at each new connection and request. The
    /// timeout sweeper runs on the calling runtime (the host's own) until `shutdown`.
    pub(crate) fn new(current: Arc<Current>, limits: Limits, access_log: bool, shutdown: Arc<Latch>) -> Arc<Server> {
        let sweeper = Sweeper::new(&limits);
        // Until the server goes, not just until shutdown: connections that never send a
        // request (a TLS handshake never finished) must not hold up the drain.
        let sweeping = CancellationToken::new();
        tokio::spawn(sweeper.clone().run(sweeping.clone()));
        let max = usize::try_from(limits.max_connections).unwrap_or(usize::MAX).min(Semaphore::MAX_PERMITS);
        let slots = Arc::new(Semaphore::new(max));
        let shared = Arc::new(Shared::new(current, shutdown, limits.max_header_size));
        let stopped_accepting = CancellationToken::new();
        Arc::new(Server { shared, limits, access_log, sweeper, slots, _sweeping: sweeping.drop_guard(), stopped_accepting })
    }

    /// Accepts connections on `listeners` until shutdown is requested; those with a
    /// [`TlsAcceptor`] serve HTTPS. At `--max-connections`, it stops accepting until one
    /// closes: further clients wait in the listen backlogs. (One loop for all: a slot taken
    /// to wait on one listener would be missing on the others.)
    pub(crate) async fn accept_loop(self: &Arc<Self>, listeners: Vec<(TcpListener, Option<TlsAcceptor>)>) {
        let mut first = 0;
        loop {
            let slot = tokio::select! {
                s = self.slots.clone().acquire_owned() => s,
                () = self.shared.shutdown.token().cancelled() => break,
            };
            let Ok(slot) = slot else { break }; // the semaphore is never closed
            if self.slots.available_permits() == 0 {
                tracing::debug!(max = self.limits.max_connections, "connection limit reached: new clients wait in the backlog");
            }
            // Whichever listener has a client; they take turns at being asked first.
            first = (first + 1) % listeners.len().max(1);
            let accept = std::future::poll_fn(|cx| {
                for i in (first..listeners.len()).chain(0..first) {
                    if let std::task::Poll::Ready(accepted) = listeners[i].0.poll_accept(cx) {
                        return std::task::Poll::Ready((accepted, &listeners[i].1));
                    }
                }
                std::task::Poll::Pending
            });
            let (accepted, tls) = tokio::select! {
                biased; // once shutdown is asked (or a hand-over), no client more
                () = self.shared.shutdown.token().cancelled() => break,
                r = accept => r,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    match stream.into_std() {
                        Ok(stream) => self.serve_socket(stream, peer, Some(slot), Bytes::new(), true, tls.clone()),
                        Err(e) => tracing::debug!(%peer, "dropping connection: {e}"),
                    }
                }
                Err(e) => {
                    // Typically EMFILE: wait instead of spinning; the backlog keeps the rest.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        tracing::info!("stopped accepting connections");
        self.stopped_accepting.cancel();
    }

    /// Serves a connection the host this one replaces handed over, as if accepted here,
    /// reading first what that host had read of it. It takes one of the `--max-connections`
    /// slots if one is free; if none is, it is served anyway: its client is already
    /// connected, and may have sent a request. If this server is itself handing over, the
    /// connection goes straight on to the next host.
    pub(crate) fn adopt(self: &Arc<Self>, handed: Handed) {
        let slot = self.slots.clone().try_acquire_owned().ok();
        if slot.is_none() {
            tracing::debug!(max = self.limits.max_connections, "a connection handed over is served beyond the connection limit");
        }
        let Handed { stream, buffered, reading_head } = handed;
        let reading_head = reading_head || !buffered.is_empty();
        match stream.set_nonblocking(true).and_then(|()| stream.peer_addr()) {
            // Only cleartext connections are handed over: a TLS session stays in its process.
            Ok(peer) => self.serve_socket(stream, peer, slot, buffered, reading_head, None),
            Err(e) => tracing::debug!("dropping a connection handed over: {e}"),
        }
    }

    /// Stops accepting, and hands every cleartext HTTP/1 connection to `to` at its next
    /// request boundary (in the meantime it finishes its request in progress here). TLS,
    /// HTTP/2 and upgraded connections finish here. The accept loop returns, as at shutdown.
    ///
    /// Returns once the accept loop has ended (or after a second, if it does not run): a
    /// client that connects after that gets the new host, which accepts on the same sockets.
    pub(crate) async fn hand_over(&self, to: mpsc::UnboundedSender<Handed>) {
        if self.shared.handoff.set(to).is_err() {
            tracing::warn!("already handing over");
        }
        self.shared.shutdown.raise();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.stopped_accepting.cancelled()).await;
    }

    /// Whether the server has stopped to hand over to a new host process.
    pub(crate) fn is_handing_over(&self) -> bool {
        self.shared.handoff.get().is_some()
    }

    /// Serves `stream` on the current generation's runtime, reading `replay` first.
    /// `reading_head`: the connection owes a request head (header read timeout) rather
    /// than being between requests (idle timeout).
    fn serve_socket(
        self: &Arc<Self>,
        std_stream: std::net::TcpStream,
        peer: SocketAddr,
        slot: Option<OwnedSemaphorePermit>,
        replay: Bytes,
        reading_head: bool,
        tls: Option<TlsAcceptor>,
    ) {
        // While a canary runs, the connection's first slot says which generation serves it.
        let generation = self.shared.current.route();
        let origin = Origin { peer: Some(peer), local: std_stream.local_addr().ok(), https: tls.is_some() };
        let activity = self.sweeper.track(reading_head);
        let conn = Arc::new(ConnState::new(generation.clone(), origin, activity, &self.limits, self.access_log));
        let open = OpenConnection::new(&self.shared, slot);
        let shared = self.shared.clone();
        generation.handle().spawn(async move {
            // Now on the generation's runtime: register the socket with its reactor.
            let mut io = match MigratingStream::new(std_stream, conn.clone(), open) {
                Ok(io) => io,
                Err(e) => return tracing::debug!(%peer, "dropping connection: {e}"),
            };
            io.replay = replay;
            let future = connection::serve(io, conn.clone(), shared.clone(), tls);
            ConnTask::new(future, conn, shared).await;
        });
    }

    /// Waits until every connection has closed, or `timeout` passes; returns whether all did.
    pub(crate) async fn drained(&self, timeout: Duration) -> bool {
        self.shared.drained(timeout).await
    }

    /// Open connections.
    pub(crate) fn connections(&self) -> usize {
        self.shared.connections()
    }
}
