//! Connection timeouts that do not depend on any generation's runtime.
//!
//! hyper can time out a slow request head itself, but only with a timer whose sleeps belong
//! to one tokio runtime, and a connection here moves from one generation's runtime to the
//! next (`serve`): a sleep made on an old runtime fails once that runtime shuts down. So the
//! host keeps time itself: every connection has an [`Activity`] it updates with a few atomic
//! operations, and one [`Sweeper`] task on the host's own runtime, which lives as long as the
//! process, expires connections that have sat too long.
//!
//! Connections read no clock. They count what happens; the sweeper reads the clock once per
//! tick and times each connection from the tick at which it first saw the count where it is
//! now. That tick comes after the activity, so a connection never expires early; it expires
//! at most about two ticks late (one to see the activity, one to see the timeout pass), and a
//! tick is a quarter of the shortest timeout, at most a second. The timeouts:
//!
//! - *header read timeout* (HTTP/1): a new connection, or bytes of a next request, and no
//!   request has reached the plugin since (a slowloris client sending its head a byte at a
//!   time, or one that connects and says nothing);
//! - *idle timeout*: no request in progress, and nothing received or sent since.
//!
//! A connection with a request in progress (a long download, an upload) is never timed out
//! here; the drain timeout bounds those on old generations. The connection's task has the
//! last word: it closes an expired connection only if no request has started since.

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::task::Waker;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// What one client may cost the server.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// How long an HTTP/1 client may take to send a request head.
    pub(crate) header_read_timeout: Duration,
    /// How long a connection may sit idle.
    pub(crate) idle_timeout: Duration,
    /// The largest request head accepted (431 beyond).
    pub(crate) max_header_size: u64,
    /// The largest request body accepted (413 beyond).
    pub(crate) max_body_size: u64,
    /// The most connections served at once.
    pub(crate) max_connections: u64,
}

/// Milliseconds since the process first asked (a vDSO clock read, no syscall).
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// The top bit of an activity word: the connection owes the head of a request that has not
/// reached the plugin yet. The other bits count changes of phase and activity.
const READING_HEAD: u64 = 1 << 63;

/// Why a connection was closed by the sweeper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expiry {
    HeaderRead = 1,
    Idle = 2,
}

/// What one connection has been doing, as far as timeouts care.
#[derive(Debug)]
pub(crate) struct Activity {
    /// `READING_HEAD` or not, plus a count of changes: a phase that begins, or activity that
    /// restarts the idle timer. The sweeper times the connection from when it sees a change.
    phase: AtomicU64,
    /// Requests (HTTP/1 or HTTP/2 streams) in progress, responses included.
    requests: AtomicUsize,
    /// HTTP/2: its control frames (pings, window updates) are not request heads.
    http2: AtomicBool,
    /// An [`Expiry`] the sweeper found, for the connection's task to act on; 0 for none.
    expired: AtomicU8,
    /// Woken when the connection expires.
    waker: Mutex<Option<Waker>>,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            // A new connection owes its first request's head: one that never sends anything
            // is cut off by the header read timeout.
            phase: AtomicU64::new(READING_HEAD),
            requests: AtomicUsize::new(0),
            http2: AtomicBool::new(false),
            expired: AtomicU8::new(0),
            waker: Mutex::new(None),
        }
    }

    /// The connection speaks HTTP/2: from now on only the idle timeout applies.
    pub(crate) fn is_http2(&self) {
        self.http2.store(true, Ordering::Relaxed);
        self.changed(false);
    }

    /// Notes a change, in the phase that reads the head of a request or not. Two threads
    /// racing here (HTTP/2 streams) may count one change instead of two: still a change.
    fn changed(&self, reading_head: bool) {
        let count = self.phase.load(Ordering::Relaxed).wrapping_add(1) & !READING_HEAD;
        self.phase.store(count | if reading_head { READING_HEAD } else { 0 }, Ordering::Relaxed);
    }

    /// Whether an HTTP/1 request is in progress: polled inline on the connection's task, it
    /// pins the connection to its generation until its response ends. (A connection speaks
    /// one protocol for its whole life.)
    pub(crate) fn http1_busy(&self) -> bool {
        !self.http2.load(Ordering::Relaxed) && self.requests.load(Ordering::Acquire) > 0
    }

    /// Bytes arrived from the client.
    pub(crate) fn received(&self) {
        if self.requests.load(Ordering::Relaxed) > 0 {
            return;
        }
        if self.http2.load(Ordering::Relaxed) {
            self.changed(false);
        } else if self.phase.load(Ordering::Relaxed) & READING_HEAD == 0 {
            // The head of a next request begins; its bytes that follow do not restart the
            // timer (a slowloris client sends one at a time).
            self.changed(true);
        }
    }

    /// Bytes went out to the client: hyper may still be writing a response whose body has
    /// already ended (and with it the request), to a client that reads slowly.
    pub(crate) fn sent(&self) {
        if self.requests.load(Ordering::Relaxed) == 0 && self.phase.load(Ordering::Relaxed) & READING_HEAD == 0 {
            self.changed(false);
        }
    }

    /// A request reached the plugin.
    pub(crate) fn request_started(&self) {
        self.requests.fetch_add(1, Ordering::AcqRel);
        // The head has arrived. Nothing to count: a request in progress never expires, and
        // `request_ended` counts a change.
        let phase = self.phase.load(Ordering::Relaxed);
        if phase & READING_HEAD != 0 {
            self.phase.store(phase & !READING_HEAD, Ordering::Relaxed);
        }
    }

    /// A request's response ended (or was dropped).
    pub(crate) fn request_ended(&self) {
        // The change first: a sweeper that sees no request in progress sees it too.
        self.changed(false);
        self.requests.fetch_sub(1, Ordering::Release);
    }

    /// Takes what the sweeper found, if it still holds: `None` when nothing expired, or when
    /// a request has started since (the sweeper looks again later).
    pub(crate) fn take_expiry(&self) -> Option<Expiry> {
        // Every poll of the connection asks: a plain load, and a swap only when there is news.
        if self.expired.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let found = self.expired.swap(0, Ordering::AcqRel);
        if found == 0 || self.requests.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(if found == Expiry::HeaderRead as u8 { Expiry::HeaderRead } else { Expiry::Idle })
    }

    /// Wake `waker` when the connection expires.
    pub(crate) fn wake_on_expiry(&self, waker: &Waker) {
        *self.waker.lock().unwrap_or_else(PoisonError::into_inner) = Some(waker.clone());
    }

    fn expire(&self, why: Expiry) {
        self.expired.store(why as u8, Ordering::Release);
        if let Some(waker) = self.waker.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            waker.wake_by_ref();
        }
    }

    /// Whether this connection has outlived a timeout at time `now`; `seen` is what the
    /// sweeper saw of it before.
    fn check(&self, seen: &mut Seen, now: u64, header_read: u64, idle: u64) -> Option<Expiry> {
        if self.requests.load(Ordering::Acquire) > 0 {
            return None;
        }
        let phase = self.phase.load(Ordering::Relaxed);
        if phase != seen.phase {
            *seen = Seen { phase, since: now };
            return None;
        }
        let since = now.saturating_sub(seen.since);
        if phase & READING_HEAD != 0 {
            (since >= header_read).then_some(Expiry::HeaderRead)
        } else {
            (since >= idle).then_some(Expiry::Idle)
        }
    }
}

/// What the sweeper last saw of a connection: its activity word, and since when.
struct Seen {
    phase: u64,
    since: u64,
}

/// Watches every open connection's [`Activity`] and expires those past a timeout.
pub(crate) struct Sweeper {
    header_read: Duration,
    idle: Duration,
    tracked: Mutex<Vec<(Weak<Activity>, Seen)>>,
}

impl Sweeper {
    pub(crate) fn new(header_read: Duration, idle: Duration) -> Arc<Sweeper> {
        Arc::new(Sweeper { header_read, idle, tracked: Mutex::new(Vec::new()) })
    }

    /// The activity record of a new connection, watched until it is dropped.
    pub(crate) fn track(&self) -> Arc<Activity> {
        let activity = Arc::new(Activity::new());
        let seen = Seen { phase: activity.phase.load(Ordering::Relaxed), since: now_ms() };
        self.tracked.lock().unwrap_or_else(PoisonError::into_inner).push((Arc::downgrade(&activity), seen));
        activity
    }

    /// Runs on the host's runtime until `shutdown`, checking a few times per shortest timeout.
    pub(crate) async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let period = (self.header_read.min(self.idle) / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let (header_read, idle) = (self.header_read.as_millis() as u64, self.idle.as_millis() as u64);
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = shutdown.cancelled() => return,
            }
            let now = now_ms();
            let mut expired = Vec::new();
            self.tracked.lock().unwrap_or_else(PoisonError::into_inner).retain_mut(|(weak, seen)| {
                let Some(activity) = weak.upgrade() else { return false };
                if let Some(why) = activity.check(seen, now, header_read, idle) {
                    expired.push((activity, why));
                }
                true
            });
            // Woken outside the lock: a waker may run arbitrary code.
            for (activity, why) in expired {
                activity.expire(why);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: u64 = 1_000;
    const IDLE: u64 = 5_000;

    fn watched(activity: &Activity, at: u64) -> Seen {
        Seen { phase: activity.phase.load(Ordering::Relaxed), since: at }
    }

    #[test]
    fn the_head_is_timed_from_the_connection_start_whatever_trickles_in() {
        let a = Activity::new();
        let mut seen = watched(&a, 0);
        a.received(); // a slowloris byte
        assert_eq!(a.check(&mut seen, 999, HEAD, IDLE), None);
        a.received();
        assert_eq!(a.check(&mut seen, 1_000, HEAD, IDLE), Some(Expiry::HeaderRead));
    }

    #[test]
    fn idle_is_timed_from_the_tick_that_saw_the_last_activity() {
        let a = Activity::new();
        let mut seen = watched(&a, 0);
        a.request_started();
        assert_eq!(a.check(&mut seen, 60_000, HEAD, IDLE), None, "a request in progress never expires");
        a.request_ended();
        assert_eq!(a.check(&mut seen, 60_100, HEAD, IDLE), None, "the change is seen here");
        assert_eq!(a.check(&mut seen, 65_099, HEAD, IDLE), None);
        a.sent(); // the rest of the response went out
        assert_eq!(a.check(&mut seen, 65_100, HEAD, IDLE), None);
        assert_eq!(a.check(&mut seen, 70_100, HEAD, IDLE), Some(Expiry::Idle));
    }

    #[test]
    fn a_next_request_head_starts_the_header_timer() {
        let a = Activity::new();
        let mut seen = watched(&a, 0);
        a.request_started();
        a.request_ended();
        assert_eq!(a.check(&mut seen, 10, HEAD, IDLE), None);
        a.received();
        assert_eq!(a.check(&mut seen, 20, HEAD, IDLE), None);
        assert_eq!(a.check(&mut seen, 1_019, HEAD, IDLE), None);
        assert_eq!(a.check(&mut seen, 1_020, HEAD, IDLE), Some(Expiry::HeaderRead));
    }
}
