//! What connections share: with the server ([`Shared`]), and among the parts of one
//! connection ([`ConnState`]).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit};

use crate::latch::Latch;
use crate::plugin::request::Origin;
use crate::plugin::{Current, Generation, LentTally};
use crate::serve::handoff::Handed;
use crate::serve::limits::{Activity, Limits};

/// What the server shares with every connection.
pub(crate) struct Shared {
    /// The generation new connections go to, and connections move to.
    pub(crate) current: Arc<Current>,
    pub(crate) shutdown: Arc<Latch>,
    pub(crate) max_header_size: u64,
    /// Set when this host hands over to a new process (`hotswap upgrade`): at shutdown, an
    /// HTTP/1 connection goes there at its next request boundary instead of being closed.
    pub(crate) handoff: OnceLock<mpsc::UnboundedSender<Handed>>,
    connections: AtomicUsize,
    all_closed: Notify,
}

impl Shared {
    pub(crate) fn new(current: Arc<Current>, shutdown: Arc<Latch>, max_header_size: u64) -> Shared {
        Shared {
            current,
            shutdown,
            max_header_size,
            handoff: OnceLock::new(),
            connections: AtomicUsize::new(0),
            all_closed: Notify::new(),
        }
    }

    /// Waits until every connection has closed, or `timeout` passes; returns whether all did.
    pub(crate) async fn drained(&self, timeout: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.all_closed.notified();
                if self.connections.load(Ordering::SeqCst) == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }

    /// Open connections.
    pub(crate) fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// Per-connection state, shared by its task, its socket, its service and its executor.
pub(crate) struct ConnState {
    /// The generation whose runtime serves this connection now. Only the connection's own
    /// task changes it (`ConnTask::try_move`), between polls of the hyper connection: so the
    /// service and the executor, which hyper calls for a stream in one poll, see the same
    /// generation. (After an HTTP/1 switch of protocols, when that task has ended, the
    /// session sets it to its own generation: see `respond::run_session`.)
    pub(crate) generation: ArcSwap<Generation>,
    /// Its addresses, for the plugin.
    pub(crate) origin: Origin,
    /// For the header read, idle and body read timeouts.
    pub(crate) activity: Arc<Activity>,
    pub(crate) max_body_size: u64,
    /// `--response-timeout`.
    pub(crate) response_timeout: Option<Duration>,
    /// `--access-log`.
    pub(crate) access_log: bool,
    /// Response chunks lent by the plugin of `generation` that this connection still holds;
    /// replaced by a fresh tally when the connection moves (see `ConnTask::lingering`).
    pub(crate) lent: ArcSwap<LentTally>,
    /// The tallies of requests relayed to generations other than this one (see
    /// `respond::relay`): the one of the generation the connection moves to becomes `lent`
    /// when it does; the others are followed as generations it left.
    pub(crate) relayed_lent: std::sync::Mutex<Vec<(Weak<Generation>, Arc<LentTally>)>>,
    /// HTTP/1: the id of the generation the connection should move to at its next request
    /// boundary (0: none): a request's sticky key sent it there (see `plugin::route`).
    pub(crate) prefer: AtomicU64,
    /// HTTP/1: a request with a sticky key came since the connection last took slots:
    /// its keys route it, not slots.
    pub(crate) keyed: AtomicBool,
    /// Some request was relayed to another generation (`relayed_lent` has entries).
    pub(crate) relayed_any: AtomicBool,
    /// HTTP/1: the plugin accepted a switch of protocols. The socket goes to its session, on
    /// this generation's runtime, once hyper has sent the response: the connection must not
    /// move (and re-register the socket elsewhere) before.
    pub(crate) switching: AtomicBool,
    /// HTTP/1: hyper last asked for bytes with no request in progress, and none came: it
    /// holds no part of a request but what it may have buffered. Where a connection may be
    /// handed over.
    pub(crate) awaiting_request: AtomicBool,
    /// The connection is being handed over: hyper's shutdown of the socket must not reach
    /// it (the new host serves it on).
    pub(crate) handing_over: AtomicBool,
    /// HTTP/1: hyper has read something of this connection. Until it has served a request,
    /// or while it has read nothing, it is not between requests (hyper would finish such a
    /// first request before it stops, and say `Connection: close`).
    pub(crate) read_any: AtomicBool,
    /// HTTP/1: requests served on this connection.
    pub(crate) served: std::sync::atomic::AtomicU64,
    /// The connection's task waits for a request boundary (to hand the connection over): a
    /// request that ends elsewhere (relayed to another runtime) wakes it.
    pub(crate) wants_boundary: AtomicBool,
}

impl ConnState {
    /// The tally of the chunks lent by requests relayed to `generation`.
    pub(crate) fn relayed_lent(&self, generation: &Arc<Generation>) -> Arc<LentTally> {
        let mut relayed = self.relayed_lent.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        relayed.retain(|(g, _)| g.strong_count() > 0);
        if let Some((_, lent)) = relayed.iter().find(|(g, _)| std::ptr::eq(g.as_ptr(), Arc::as_ptr(generation))) {
            return lent.clone();
        }
        let lent = Arc::<LentTally>::default();
        relayed.push((Arc::downgrade(generation), lent.clone()));
        self.relayed_any.store(true, Ordering::Release);
        lent
    }

    pub(crate) fn new(generation: Arc<Generation>, origin: Origin, activity: Arc<Activity>, limits: &Limits, access_log: bool) -> ConnState {
        ConnState {
            generation: ArcSwap::new(generation),
            origin,
            activity,
            max_body_size: limits.max_body_size,
            response_timeout: limits.response_timeout,
            access_log,
            lent: ArcSwap::default(),
            relayed_lent: std::sync::Mutex::default(),
            prefer: AtomicU64::new(0),
            keyed: AtomicBool::new(false),
            relayed_any: AtomicBool::new(false),
            switching: AtomicBool::new(false),
            awaiting_request: AtomicBool::new(false),
            handing_over: AtomicBool::new(false),
            read_any: AtomicBool::new(false),
            served: std::sync::atomic::AtomicU64::new(0),
            wants_boundary: AtomicBool::new(false),
        }
    }

    /// HTTP/1: bytes arrived. (Each flag is written only when it changes: this is on every
    /// read.)
    pub(crate) fn saw_bytes(&self) {
        if !self.read_any.load(Ordering::Relaxed) {
            self.read_any.store(true, Ordering::Release);
        }
        if self.awaiting_request.load(Ordering::Relaxed) {
            self.awaiting_request.store(false, Ordering::Release);
        }
    }

    /// HTTP/1: hyper asked the socket for bytes and found none.
    pub(crate) fn found_no_bytes(&self) {
        if !self.awaiting_request.load(Ordering::Relaxed) && !self.activity.http1_busy() {
            self.awaiting_request.store(true, Ordering::Release);
        }
    }

    /// HTTP/1: whether the connection is between requests, with nothing of a request read
    /// but what hyper holds in its buffer: where it may be handed over. hyper stops there at
    /// once when told to shut down, without reading or writing more.
    pub(crate) fn at_request_boundary(&self) -> bool {
        self.awaiting_request.load(Ordering::Acquire)
            && !self.activity.http1_busy()
            && !self.switching.load(Ordering::Acquire)
            && (self.served.load(Ordering::Acquire) > 0 || !self.read_any.load(Ordering::Acquire))
            // A request body the plugin still reads after its response has ended: hyper is
            // in the middle of it.
            && !self.activity.reading_body()
    }
}

/// An open connection: counted for the drain at shutdown, and holding one of the
/// `--max-connections` slots until it closes (but for one handed over by a previous host
/// when none was free).
pub(crate) struct OpenConnection {
    shared: Arc<Shared>,
    _slot: Option<OwnedSemaphorePermit>,
}

impl OpenConnection {
    pub(crate) fn new(shared: &Arc<Shared>, slot: Option<OwnedSemaphorePermit>) -> OpenConnection {
        shared.connections.fetch_add(1, Ordering::SeqCst);
        OpenConnection { shared: shared.clone(), _slot: slot }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        if self.shared.connections.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.shared.all_closed.notify_waiters();
        }
    }
}

