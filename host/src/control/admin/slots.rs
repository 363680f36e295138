//! How many admin connections the host holds, and who keeps one when they run short.
//!
//! Admin clients are few, and a cap keeps them from using up the descriptors the public
//! server needs. But a cap on connections alone lets anyone who can connect (any local user,
//! on a loopback TCP listener) lock the operator out: open 16 connections and send nothing.
//! So the connections are counted in two stages:
//!
//! - **Waiting** for a request head: at most [`MAX_WAITING`]. One more connection closes the
//!   one that has waited longest. The operator's client sends its request as soon as it
//!   connects, so idle connections go first, and no connection waits in the backlog behind
//!   them: the listener always accepts.
//! - **Served**: a request whose head has arrived and passed the checks (the peer's user on
//!   the Unix socket, the Host header, the token). At most [`MAX_SERVED`] at once; one more
//!   is answered 503 at once, rather than held open. On the Unix socket and with a token, only
//!   the operator's own requests get this far. (Without a token, on loopback TCP, anyone who
//!   can connect is the operator.)

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// The most connections waiting for their request head.
pub(crate) const MAX_WAITING: usize = 16;
/// The most requests served at once.
pub(crate) const MAX_SERVED: usize = 16;

/// The admin API's connection slots.
pub(crate) struct Slots {
    /// Connections waiting for a request head, oldest first: an id and what closes it.
    waiting: Mutex<VecDeque<(u64, CancellationToken)>>,
    next: AtomicU64,
    served: Arc<Semaphore>,
    max_waiting: usize,
}

impl Slots {
    pub(crate) fn new(max_waiting: usize, max_served: usize) -> Arc<Slots> {
        Arc::new(Slots {
            waiting: Mutex::new(VecDeque::new()),
            next: AtomicU64::new(0),
            served: Arc::new(Semaphore::new(max_served)),
            max_waiting,
        })
    }

    /// Counts a connection just accepted as waiting for its request head; if as many wait
    /// already, the one that has waited longest is closed.
    pub(crate) fn admit(self: &Arc<Slots>) -> Waiting {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let evicted = CancellationToken::new();
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        while waiting.len() >= self.max_waiting {
            let Some((_, oldest)) = waiting.pop_front() else { break };
            tracing::debug!("admin API: {} connections wait for a request: closing the one that waited longest", self.max_waiting);
            oldest.cancel();
        }
        waiting.push_back((id, evicted.clone()));
        Waiting { slots: self.clone(), id, evicted }
    }

    /// A slot to serve a request that passed the checks, or `None` if as many are served.
    pub(crate) fn serve(&self) -> Option<OwnedSemaphorePermit> {
        self.served.clone().try_acquire_owned().ok()
    }

    fn arrived(&self, id: u64) {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner()).retain(|(waiting, _)| *waiting != id);
    }
}

/// A connection counted as waiting for its request head, until [`Waiting::arrived`] or drop.
pub(crate) struct Waiting {
    slots: Arc<Slots>,
    id: u64,
    evicted: CancellationToken,
}

impl Waiting {
    /// The request head has arrived: the connection no longer waits, and is no longer closed
    /// for newcomers.
    pub(crate) fn arrived(&self) {
        self.slots.arrived(self.id);
    }

    /// Resolves when the connection was closed for a newcomer.
    pub(crate) async fn evicted(&self) {
        self.evicted.cancelled().await;
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.arrived();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newcomer_closes_the_longest_waiting_and_arrived_ones_stay() {
        let slots = Slots::new(2, 1);
        let (a, b) = (slots.admit(), slots.admit());
        a.arrived();
        let c = slots.admit(); // a arrived: b and c wait, nothing closed
        assert!(!a.evicted.is_cancelled() && !b.evicted.is_cancelled() && !c.evicted.is_cancelled());
        let d = slots.admit();
        assert!(b.evicted.is_cancelled(), "the longest waiting goes first");
        assert!(!c.evicted.is_cancelled() && !d.evicted.is_cancelled());
        drop(c); // gone by itself: its slot is free
        let e = slots.admit();
        assert!(!d.evicted.is_cancelled() && !e.evicted.is_cancelled());

        let served = slots.serve().expect("one slot");
        assert!(slots.serve().is_none(), "as many are served");
        drop(served);
        assert!(slots.serve().is_some());
    }
}
