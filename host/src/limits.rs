//! Connection timeouts that do not depend on any generation's runtime.
//!
//! hyper can time out a slow request head itself, but only with a timer whose sleeps belong
//! to one tokio runtime, and a connection here moves from one generation's runtime to the
//! next (`server`): a sleep made on an old runtime fails once that runtime shuts down. So the
//! host keeps time itself: every connection has an [`Activity`] it updates with a few atomic
//! operations, and one [`Sweeper`] task on the host's own runtime, which lives as long as the
//! process, closes connections that have sat too long:
//!
//! - *header read timeout*: the first byte of a request arrived, and the request has not
//!   reached the plugin since (a slowloris client sending its head a byte at a time);
//! - *idle timeout*: no request in progress and nothing received since the last one ended.
//!
//! A connection with a request in progress (a long download, an upload) is never timed out
//! here; the drain timeout bounds those on old generations. Time is read from a coarse clock
//! the sweeper advances, so the per-request cost is a few atomic operations and no syscall.

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::task::Waker;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// Milliseconds since the process's first use of the clock, advanced by the sweeper.
static COARSE_NOW_MS: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn coarse_now() -> u64 {
    COARSE_NOW_MS.load(Ordering::Relaxed)
}

/// The top bit of an activity word: the connection has received bytes of a request that has
/// not reached the plugin yet. The other bits: when that phase began, on the coarse clock.
const READING_HEAD: u64 = 1 << 63;

/// Why a connection was closed by the sweeper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    HeaderRead,
    Idle,
}

/// What one connection has been doing, as far as timeouts care.
#[derive(Debug)]
pub struct Activity {
    /// `READING_HEAD` or not, plus the coarse time that phase began.
    phase: AtomicU64,
    /// Requests (HTTP/1 or HTTP/2 streams) in progress, responses included.
    requests: AtomicUsize,
    expired: OnceLock<Expiry>,
    /// Woken when the connection expires.
    waker: Mutex<Option<Waker>>,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            // A new connection owes its first request's head: one that never sends anything
            // is cut off by the header read timeout.
            phase: AtomicU64::new(READING_HEAD | coarse_now()),
            requests: AtomicUsize::new(0),
            expired: OnceLock::new(),
            waker: Mutex::new(None),
        }
    }

    /// Bytes arrived from the client.
    pub fn received(&self) {
        let phase = self.phase.load(Ordering::Relaxed);
        if phase & READING_HEAD == 0 && self.requests.load(Ordering::Relaxed) == 0 {
            self.phase.store(READING_HEAD | coarse_now(), Ordering::Relaxed);
        }
    }

    /// A request reached the plugin.
    pub fn request_started(&self) {
        self.requests.fetch_add(1, Ordering::AcqRel);
    }

    /// A request's response ended (or was dropped).
    pub fn request_ended(&self) {
        if self.requests.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.phase.store(coarse_now(), Ordering::Relaxed);
        }
    }

    /// Whether the sweeper has expired this connection, and why.
    pub fn expired(&self) -> Option<Expiry> {
        self.expired.get().copied()
    }

    /// Wake `waker` when the connection expires.
    pub fn wake_on_expiry(&self, waker: &Waker) {
        *self.waker.lock().unwrap_or_else(PoisonError::into_inner) = Some(waker.clone());
    }

    fn expire(&self, why: Expiry) {
        if self.expired.set(why).is_ok() {
            if let Some(waker) = self.waker.lock().unwrap_or_else(PoisonError::into_inner).take() {
                waker.wake();
            }
        }
    }

    /// Whether this connection has outlived a timeout at coarse time `now`.
    fn check(&self, now: u64, header_read: u64, idle: u64) -> Option<Expiry> {
        if self.requests.load(Ordering::Acquire) > 0 {
            return None;
        }
        let phase = self.phase.load(Ordering::Relaxed);
        let since = now.saturating_sub(phase & !READING_HEAD);
        if phase & READING_HEAD != 0 {
            (since >= header_read).then_some(Expiry::HeaderRead)
        } else {
            (since >= idle).then_some(Expiry::Idle)
        }
    }
}

/// Watches every open connection's [`Activity`] and expires those past a timeout.
pub struct Sweeper {
    header_read: Duration,
    idle: Duration,
    tracked: Mutex<Vec<Weak<Activity>>>,
}

impl Sweeper {
    pub fn new(header_read: Duration, idle: Duration) -> Arc<Sweeper> {
        COARSE_NOW_MS.store(epoch().elapsed().as_millis() as u64, Ordering::Relaxed);
        Arc::new(Sweeper { header_read, idle, tracked: Mutex::new(Vec::new()) })
    }

    /// The activity record of a new connection, watched until it is dropped.
    pub fn track(&self) -> Arc<Activity> {
        let activity = Arc::new(Activity::new());
        self.tracked.lock().unwrap_or_else(PoisonError::into_inner).push(Arc::downgrade(&activity));
        activity
    }

    /// Runs on the host's runtime until `shutdown`, checking a few times per shortest timeout.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let period = (self.header_read.min(self.idle) / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let (header_read, idle) = (self.header_read.as_millis() as u64, self.idle.as_millis() as u64);
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = shutdown.cancelled() => return,
            }
            let now = epoch().elapsed().as_millis() as u64;
            COARSE_NOW_MS.store(now, Ordering::Relaxed);
            let mut expired = Vec::new();
            self.tracked.lock().unwrap_or_else(PoisonError::into_inner).retain(|weak| {
                let Some(activity) = weak.upgrade() else { return false };
                if let Some(why) = activity.check(now, header_read, idle) {
                    expired.push((activity, why));
                    return false;
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
