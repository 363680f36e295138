//! Connection and request-body timeouts that do not depend on any generation's runtime.
//!
//! hyper can time out a slow request head itself, but only with a timer whose sleeps belong
//! to one tokio runtime, and a connection here moves from one generation's runtime to the
//! next (`serve`): a sleep made on an old runtime fails once that runtime shuts down. So the
//! host keeps time itself: every connection has an [`Activity`] it updates with a few atomic
//! operations, and one [`Sweeper`] task on the host's own runtime, which lives as long as the
//! process, expires connections (and request bodies) that have sat too long.
//!
//! Connections read no clock. They count what happens; the sweeper reads the clock once per
//! tick and times each connection from the tick at which it first saw the count where it is
//! now. That tick comes after the activity, so a connection never expires early; it expires
//! at most about two ticks late (one to see the activity, one to see the timeout pass), and a
//! tick is a quarter of the shortest timeout, at most a second. The timeouts:
//!
//! - *header read timeout*: HTTP/1, a new connection, or bytes of a next request, and no
//!   request has reached the plugin since (a slowloris client sending its head a byte at a
//!   time, or one that connects and says nothing); HTTP/2, a header block (HEADERS and its
//!   CONTINUATIONs) begun and not completed ([`Http2Frames`] follows the frames). A header
//!   block in progress stalls everything the client sends on that connection, so it is timed
//!   out even while other streams are in progress;
//! - *idle timeout*: no request in progress, and (HTTP/1) nothing received or sent since. An
//!   HTTP/2 connection is idle whenever no stream is in progress and no DATA goes out,
//!   whatever other bytes flow: PINGs, SETTINGS and WINDOW_UPDATEs are answered by h2 itself
//!   and are no requests;
//! - *body read timeout*: a request body the plugin is waiting for brought less than
//!   `--min-body-rate` × the timeout (at least one byte) within the timeout. The body's
//!   [`BodyProgress`] counts what the plugin got and whether it waits; time the plugin spends
//!   not reading does not count (the client cannot send faster than it reads). The plugin's
//!   read then fails, the request is answered 408 (or its response, if started, cut off), and
//!   the connection is closed (HTTP/1) or the stream reset (HTTP/2);
//! - *send timeout*: the connection has had bytes to write and the client's socket has taken
//!   none of them for the timeout (a client that stops reading a response, or never reads
//!   one); or (HTTP/2) a response or upgraded stream waits for the client's flow-control
//!   window and no DATA has gone out for the timeout (a client that stops granting window:
//!   its socket takes all the rest, PINGs answered included). As for HTTP/1, it is the
//!   connection that is timed: DATA of any of its streams is progress. Honoured whatever is
//!   in progress: the connection is closed, its responses cut off (an upgraded connection's
//!   next write fails), and what they held is freed.
//!
//! Otherwise a connection with a request in progress (a long download, a steady upload) is
//! never timed out here; the drain timeout bounds those on old generations. The connection's
//! task has the last word on the first two: it closes an expired connection only if no
//! request has started since (except for an incomplete HTTP/2 header block).

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::task::Waker;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::plugin::request::BodyProgress;

/// What one client may cost the server.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// How long a client may take to send a request head (HTTP/1) or a header block (HTTP/2).
    pub(crate) header_read_timeout: Duration,
    /// How long a connection may sit idle.
    pub(crate) idle_timeout: Duration,
    /// How long a request body the plugin waits for may go without progress.
    pub(crate) body_read_timeout: Duration,
    /// How long the client may take none of what the connection has to send (`None`: as long
    /// as it likes).
    pub(crate) send_timeout: Option<Duration>,
    /// How long the plugin may take to answer a request, not counting time spent waiting for
    /// its body (`None`: as long as it likes). Kept by the request itself (`respond`).
    pub(crate) response_timeout: Option<Duration>,
    /// Bytes per second a body must bring, over each body read timeout, to count as progress.
    pub(crate) min_body_rate: u64,
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
/// reached the plugin yet (HTTP/1). The other bits count changes of phase and activity.
const READING_HEAD: u64 = 1 << 63;

/// Why a connection was closed by the sweeper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expiry {
    HeaderRead = 1,
    Idle = 2,
    /// An HTTP/2 header block did not complete: honoured even with streams in progress.
    Http2Header = 3,
    /// The client took nothing of what was to be sent: honoured even with requests in
    /// progress.
    Send = 4,
}

/// A request body the sweeper watches, and what it last saw of it.
#[derive(Debug)]
struct WatchedBody {
    body: Weak<BodyProgress>,
    /// Bytes received when the current window began.
    received: u64,
    /// When the current window began; `None` until the sweeper first sees the body.
    since: Option<u64>,
}

/// What one connection has been doing, as far as timeouts care.
#[derive(Debug)]
pub(crate) struct Activity {
    /// `READING_HEAD` or not, plus a count of changes: a phase that begins, or activity that
    /// restarts the idle timer. The sweeper times the connection from when it sees a change.
    phase: AtomicU64,
    /// Requests (HTTP/1 or HTTP/2 streams) in progress, responses included.
    requests: AtomicUsize,
    /// HTTP/1: those of them relayed to another generation's runtime (counted in `requests`
    /// too), which do not tie the connection to its own.
    relayed: AtomicUsize,
    /// HTTP/2: bytes received or sent are no requests, and its header blocks are followed.
    http2: AtomicBool,
    /// HTTP/2: header blocks begun plus header blocks completed, so odd while one is
    /// incomplete. Written only by the task that reads the socket.
    header_blocks: AtomicU64,
    /// Writes that made progress, times two, plus one while a write waits for the client's
    /// socket to take something: odd while blocked. Written by the task that writes.
    writes: AtomicU64,
    /// HTTP/2: response bodies of which hyper holds a frame that waits for the client's
    /// flow-control window (see `respond::SentBody`).
    awaiting_window: AtomicUsize,
    /// HTTP/2: writes that carried DATA, plus bodies that began to wait for a window: while
    /// `awaiting_window` is not zero, the send timeout runs from its last change.
    data_out: AtomicU64,
    /// Request bodies read on this connection (HTTP/2: one per stream), for the body read
    /// timeout. Touched by a request with a body when it starts, and by the sweeper.
    bodies: Mutex<Vec<WatchedBody>>,
    /// Whether `bodies` may hold one: a connection that never had a request body never
    /// takes its lock on the request path.
    had_body: AtomicBool,
    /// An [`Expiry`] the sweeper found, for the connection's task to act on; 0 for none.
    expired: AtomicU8,
    /// Woken when the connection expires.
    waker: Mutex<Option<Waker>>,
}

impl Activity {
    /// `reading_head`: the connection owes a request head. A new connection owes its first
    /// request's: one that never sends anything is cut off by the header read timeout. One
    /// handed over by a previous host between requests is idle.
    fn new(reading_head: bool) -> Activity {
        Activity {
            phase: AtomicU64::new(if reading_head { READING_HEAD } else { 0 }),
            requests: AtomicUsize::new(0),
            relayed: AtomicUsize::new(0),
            http2: AtomicBool::new(false),
            header_blocks: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            awaiting_window: AtomicUsize::new(0),
            data_out: AtomicU64::new(0),
            bodies: Mutex::new(Vec::new()),
            had_body: AtomicBool::new(false),
            expired: AtomicU8::new(0),
            waker: Mutex::new(None),
        }
    }

    /// The connection speaks HTTP/2: from now on it is idle whenever no stream is in
    /// progress, and its header blocks are timed ([`Http2Frames`]).
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
        // SeqCst, as `request_ended`'s: a connection waiting for its boundary sets
        // `ConnState::wants_boundary`, then reads this; a request that ends does the reverse.
        !self.http2.load(Ordering::Relaxed) && self.requests.load(Ordering::SeqCst) > 0
    }

    /// Whether an HTTP/1 request is in progress on the connection's own generation: one
    /// relayed elsewhere (read ahead at a swap, or routed by its sticky key) lets the
    /// connection move to where it is served, in the middle of its response, or be left
    /// when its generation is cut off. Racing with a request's start or end, it errs towards
    /// busy.
    pub(crate) fn http1_busy_here(&self) -> bool {
        !self.http2.load(Ordering::Relaxed)
            && self.requests.load(Ordering::SeqCst).saturating_sub(self.relayed.load(Ordering::SeqCst)) > 0
    }

    /// An HTTP/1 request in progress (already counted by `request_started`) is relayed to
    /// another generation.
    pub(crate) fn relay_started(&self) {
        self.relayed.fetch_add(1, Ordering::SeqCst);
    }

    /// A relayed HTTP/1 request ends (before `request_ended`).
    pub(crate) fn relay_ended(&self) {
        self.relayed.fetch_sub(1, Ordering::SeqCst);
    }

    /// Whether an HTTP/1 request relayed to another generation is in progress.
    pub(crate) fn relaying(&self) -> bool {
        self.relayed.load(Ordering::SeqCst) > 0
    }

    /// Bytes arrived from the client (HTTP/1; for HTTP/2 bytes are no activity).
    pub(crate) fn received(&self) {
        if self.requests.load(Ordering::Relaxed) > 0 || self.http2.load(Ordering::Relaxed) {
            return;
        }
        if self.body_in_progress() {
            self.changed(false); // activity: idle from its end, not from its response's
            return;
        }
        if self.phase.load(Ordering::Relaxed) & READING_HEAD == 0 {
            // The head of a next request begins; its bytes that follow do not restart the
            // timer (a slowloris client sends one at a time).
            self.changed(true);
        }
    }

    /// Bytes went out to the client: progress for the send timeout, and (HTTP/1) activity for
    /// the idle timeout, as hyper may still be writing a response whose body has already ended
    /// (and with it the request) to a client that reads slowly. (An HTTP/2 connection also
    /// sends answers to PINGs and SETTINGS, which are no activity.)
    pub(crate) fn sent(&self) {
        let writes = self.writes.load(Ordering::Relaxed);
        self.writes.store((writes | 1) + 1, Ordering::Relaxed);
        // The client reads again (an upgraded connection's writes go on once expired, until
        // one waits): the expiry no longer holds.
        if writes % 2 == 1 && self.send_expired() {
            let _ = self.expired.compare_exchange(Expiry::Send as u8, 0, Ordering::AcqRel, Ordering::Relaxed);
        }
        if self.requests.load(Ordering::Relaxed) == 0
            && self.phase.load(Ordering::Relaxed) & READING_HEAD == 0
            && !self.http2.load(Ordering::Relaxed)
        {
            self.changed(false);
        }
    }

    /// A write to the client's socket had to wait for room: the send timeout runs from here
    /// until something goes out ([`Activity::sent`]).
    pub(crate) fn write_waited(&self) {
        let writes = self.writes.load(Ordering::Relaxed);
        if writes & 1 == 0 {
            self.writes.store(writes | 1, Ordering::Relaxed);
        }
    }

    /// HTTP/2: hyper took a frame of a response body that does not end it, and asks for the
    /// next only once the client's flow-control window has room for this one. Until
    /// [`Activity::window_opened`], DATA must go out within the send timeout.
    pub(crate) fn awaits_window(&self) {
        // The first starts the timer; others join it (a client that opens streams it grants
        // no window for must not restart it).
        if self.awaiting_window.fetch_add(1, Ordering::Relaxed) == 0 {
            self.data_out.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// HTTP/2: hyper asked a body that [`Activity::awaits_window`] for its next frame (or
    /// dropped it).
    pub(crate) fn window_opened(&self) {
        self.awaiting_window.fetch_sub(1, Ordering::Relaxed);
    }

    /// HTTP/2: a write carried DATA: progress for the send timeout, and activity for the idle
    /// timeout (h2 may still be sending a response whose body, and so its request, has ended).
    fn data_sent(&self) {
        self.data_out.fetch_add(1, Ordering::Relaxed);
        self.changed(false);
    }

    /// Whether the send timeout has expired the connection (its writes then fail).
    pub(crate) fn send_expired(&self) -> bool {
        self.expired.load(Ordering::Acquire) == Expiry::Send as u8
    }

    /// HTTP/2: the client began a header block. Called by the task reading the socket only.
    pub(crate) fn header_block_started(&self) {
        self.header_blocks.store(self.header_blocks.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
    }

    /// HTTP/2: the header block is complete; a request, or trailers, or a refusal follows.
    pub(crate) fn header_block_ended(&self) {
        self.header_blocks.store(self.header_blocks.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
        self.changed(false);
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
        self.requests.fetch_sub(1, Ordering::SeqCst);
    }

    /// Whether the connection owes a request head (rather than being between requests).
    pub(crate) fn reading_head(&self) -> bool {
        self.phase.load(Ordering::Relaxed) & READING_HEAD != 0
    }

    /// Whether the connection speaks HTTP/2.
    pub(crate) fn http2(&self) -> bool {
        self.http2.load(Ordering::Relaxed)
    }

    /// Times a request's body from now on: the body read timeout applies while the plugin
    /// waits for it. Only requests with a body come here.
    pub(crate) fn watch_body(&self, body: &Arc<BodyProgress>) {
        let mut bodies = self.bodies.lock().unwrap_or_else(PoisonError::into_inner);
        bodies.retain(|w| w.body.strong_count() > 0);
        bodies.push(WatchedBody { body: Arc::downgrade(body), received: 0, since: None });
        self.had_body.store(true, Ordering::Relaxed);
    }

    /// Whether the plugin waits for more of a request body after its response has ended (it
    /// answered first, and reads on, on a task of its own): the client's bytes are that
    /// body's, not a next request's head, and the connection is not idle; the body read
    /// timeout applies instead. A body the plugin holds without reading does not count: the
    /// connection's own timeouts still bound what the client does.
    fn body_in_progress(&self) -> bool {
        if !self.had_body.load(Ordering::Relaxed) {
            return false;
        }
        let mut bodies = self.bodies.lock().unwrap_or_else(PoisonError::into_inner);
        bodies.retain(|w| w.body.strong_count() > 0);
        if bodies.is_empty() {
            self.had_body.store(false, Ordering::Relaxed); // under the lock, as `watch_body` sets it
        }
        bodies.iter().any(|w| w.body.upgrade().is_some_and(|b| !b.is_finished() && !b.timed_out() && b.is_waiting()))
    }

    /// Whether a request body of this connection is still being read (not ended, failed or
    /// let go of by the plugin).
    pub(crate) fn reading_body(&self) -> bool {
        let bodies = self.bodies.lock().unwrap_or_else(PoisonError::into_inner);
        bodies.iter().any(|w| w.body.upgrade().is_some_and(|b| !b.is_finished()))
    }

    /// Takes what the sweeper found, if it still holds: `None` when nothing expired, or when
    /// a request has started since (the sweeper looks again later).
    pub(crate) fn take_expiry(&self) -> Option<Expiry> {
        // Every poll of the connection asks: a plain load, and a swap only when there is news.
        if self.expired.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let found = self.expired.swap(0, Ordering::AcqRel);
        if found == Expiry::Http2Header as u8 {
            return Some(Expiry::Http2Header);
        }
        if found == Expiry::Send as u8 {
            // Kept: the socket's writes fail from now on, even once it is no longer hyper's.
            self.expired.store(found, Ordering::Release);
            return Some(Expiry::Send);
        }
        if found == 0 || self.requests.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(if found == Expiry::HeaderRead as u8 { Expiry::HeaderRead } else { Expiry::Idle })
    }

    /// Wake `waker` when the connection expires.
    pub(crate) fn wake_on_expiry(&self, waker: &Waker) {
        let mut slot = self.waker.lock().unwrap_or_else(PoisonError::into_inner);
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
    }

    /// Wakes the connection's task (the waker given to `wake_on_expiry`).
    pub(crate) fn wake(&self) {
        if let Some(waker) = self.waker.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            waker.wake_by_ref();
        }
    }

    fn expire(&self, why: Expiry) {
        self.expired.store(why as u8, Ordering::Release);
        if let Some(waker) = self.waker.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            waker.wake_by_ref();
        }
    }

    /// Whether this connection has outlived a timeout at time `now`; `seen` is what the
    /// sweeper saw of it before. Bodies that timed out are added to `slow_bodies`.
    fn check(&self, seen: &mut Seen, now: u64, t: &Timeouts, slow_bodies: &mut Vec<Arc<BodyProgress>>) -> Option<Expiry> {
        // An incomplete HTTP/2 header block holds up the whole connection, whatever else is in
        // progress on it.
        let blocks = self.header_blocks.load(Ordering::Relaxed);
        if seen.blocks.for_at_least(blocks, blocks % 2 == 1, now, t.header_read) {
            return Some(Expiry::Http2Header);
        }
        // A client that takes nothing holds its responses, whatever else is in progress; so
        // does an HTTP/2 client that grants no window, whatever else its socket takes.
        let writes = self.writes.load(Ordering::Relaxed);
        let blocked = seen.writes.for_at_least(writes, writes % 2 == 1, now, t.send);
        let data = self.data_out.load(Ordering::Relaxed);
        let starved = seen.data.for_at_least(data, self.awaiting_window.load(Ordering::Relaxed) > 0, now, t.send);
        if blocked || starved {
            return (self.expired.load(Ordering::Relaxed) != Expiry::Send as u8).then_some(Expiry::Send);
        }
        if self.requests.load(Ordering::Acquire) > 0 || self.body_in_progress() {
            self.check_bodies(now, t, slow_bodies);
            return None;
        }
        let phase = self.phase.load(Ordering::Relaxed);
        if phase != seen.phase {
            (seen.phase, seen.since) = (phase, now);
            return None;
        }
        let since = now.saturating_sub(seen.since);
        if phase & READING_HEAD != 0 {
            (since >= t.header_read).then_some(Expiry::HeaderRead)
        } else {
            (since >= t.idle).then_some(Expiry::Idle)
        }
    }

    /// The body read timeout: a body the plugin waits for must bring `t.body_progress` bytes
    /// within each `t.body_read`. A window begins when the sweeper first sees the body, when
    /// it sees that much progress, or when it sees the plugin not waiting.
    fn check_bodies(&self, now: u64, t: &Timeouts, slow_bodies: &mut Vec<Arc<BodyProgress>>) {
        let mut bodies = self.bodies.lock().unwrap_or_else(PoisonError::into_inner);
        bodies.retain_mut(|watched| {
            let Some(body) = watched.body.upgrade() else { return false };
            if body.is_finished() || body.timed_out() {
                return false;
            }
            let received = body.received();
            let progressed = received.saturating_sub(watched.received) >= t.body_progress;
            match watched.since {
                Some(since) if body.is_waiting() && !progressed => {
                    if now.saturating_sub(since) < t.body_read {
                        return true;
                    }
                    slow_bodies.push(body);
                    false
                }
                _ => {
                    (watched.received, watched.since) = (received, Some(now));
                    true
                }
            }
        });
    }
}

/// Follows an HTTP/2 connection's frames, as far as its timeouts need: the client's, for
/// where a header block (a HEADERS frame, then CONTINUATIONs until one carries END_HEADERS)
/// is open; the server's, for when DATA goes out. h2 reads and writes the same bytes and
/// checks them; this only counts, a few operations per frame. Written here because neither
/// hyper nor h2 has a header timeout or a send timeout for HTTP/2, nor tells when a header
/// block begins or DATA leaves.
#[derive(Debug, Default)]
pub(crate) struct Http2Frames {
    /// Bytes of the client's connection preface still to come: they are no frame.
    preface_left: usize,
    client: FrameSplitter,
    server: FrameSplitter,
    /// The client's current frame completes a header block.
    ends_block: bool,
    /// A header block is open.
    in_block: bool,
}

impl Http2Frames {
    const DATA: u8 = 0x0;
    const HEADERS: u8 = 0x1;
    const CONTINUATION: u8 = 0x9;
    const END_HEADERS: u8 = 0x4;

    /// Follows a client's bytes from the first, the connection preface of `preface` bytes,
    /// and the server's from the first.
    pub(crate) fn after_preface(preface: usize) -> Http2Frames {
        Http2Frames { preface_left: preface, ..Http2Frames::default() }
    }

    /// Follows `bytes`, the next ones read from the client.
    pub(crate) fn read(&mut self, mut bytes: &[u8], activity: &Activity) {
        if self.preface_left > 0 {
            let n = bytes.len().min(self.preface_left);
            self.preface_left -= n;
            bytes = &bytes[n..];
        }
        let (ends_block, in_block) = (&mut self.ends_block, &mut self.in_block);
        self.client.split(bytes, |piece| match piece {
            Piece::Begins { kind, flags } => {
                *ends_block = false;
                if kind == Self::HEADERS || kind == Self::CONTINUATION {
                    if !*in_block {
                        *in_block = true;
                        activity.header_block_started();
                    }
                    *ends_block = flags & Self::END_HEADERS != 0;
                }
            }
            Piece::Payload { .. } => {}
            Piece::Ends => {
                if *in_block && *ends_block {
                    *in_block = false;
                    activity.header_block_ended();
                }
            }
        });
    }

    /// Follows `bytes`, the next ones written to the client.
    pub(crate) fn wrote(&mut self, bytes: &[u8], activity: &Activity) {
        let mut data = false;
        self.server.split(bytes, |piece| data |= matches!(piece, Piece::Payload { kind: Self::DATA }));
        if data {
            activity.data_sent();
        }
    }
}

/// Where frames begin and end in the bytes one side of an HTTP/2 connection sends.
#[derive(Debug, Default)]
struct FrameSplitter {
    /// The frame header being read.
    head: [u8; 9],
    head_len: u8,
    /// The current frame's type.
    kind: u8,
    /// Bytes of the current frame's payload still to come.
    payload_left: u32,
}

/// What [`FrameSplitter::split`] found in some bytes.
enum Piece {
    /// A frame's header.
    Begins { kind: u8, flags: u8 },
    /// Some of the current frame's payload (not reported for an empty one).
    Payload { kind: u8 },
    /// The end of the current frame.
    Ends,
}

impl FrameSplitter {
    /// Follows `bytes`, the next ones of this side, telling `found` what they hold.
    fn split(&mut self, mut bytes: &[u8], mut found: impl FnMut(Piece)) {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let n = bytes.len().min(self.payload_left as usize);
                self.payload_left -= n as u32;
                bytes = &bytes[n..];
                found(Piece::Payload { kind: self.kind });
                if self.payload_left == 0 {
                    found(Piece::Ends);
                }
                continue;
            }
            let have = usize::from(self.head_len);
            let n = bytes.len().min(self.head.len() - have);
            self.head[have..have + n].copy_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if have + n < self.head.len() {
                self.head_len = (have + n) as u8;
                return;
            }
            self.head_len = 0;
            let [l0, l1, l2, kind, flags, ..] = self.head;
            self.kind = kind;
            found(Piece::Begins { kind, flags });
            self.payload_left = u32::from_be_bytes([0, l0, l1, l2]);
            if self.payload_left == 0 {
                found(Piece::Ends);
            }
        }
    }
}

/// What the sweeper last saw of a connection: its activity word, and since when; and the
/// counters that must move while the connection waits on its client.
struct Seen {
    phase: u64,
    since: u64,
    /// HTTP/2 header blocks begun and completed.
    blocks: Still,
    /// Writes to the client's socket.
    writes: Still,
    /// HTTP/2: DATA written.
    data: Still,
}

impl Seen {
    fn new(phase: u64, at: u64) -> Seen {
        let still = Still { count: 0, since: at };
        Seen { phase, since: at, blocks: still, writes: still, data: still }
    }
}

/// A counter as the sweeper last saw it, and since when it has not moved.
#[derive(Clone, Copy)]
struct Still {
    count: u64,
    since: u64,
}

impl Still {
    /// Whether `count` has not moved for `timeout` at `now` while the connection `waits` on
    /// it; a move, or no wait, starts the time again.
    fn for_at_least(&mut self, count: u64, waits: bool, now: u64, timeout: u64) -> bool {
        if count != self.count || !waits {
            *self = Still { count, since: now };
            return false;
        }
        now.saturating_sub(self.since) >= timeout
    }
}

/// The timeouts in milliseconds, and the progress a body must make per body read timeout.
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    header_read: u64,
    idle: u64,
    body_read: u64,
    body_progress: u64,
    send: u64,
}

impl Timeouts {
    fn new(limits: &Limits) -> Timeouts {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let body_read = ms(limits.body_read_timeout);
        let body_progress = u128::from(limits.min_body_rate) * u128::from(body_read) / 1000;
        Timeouts {
            header_read: ms(limits.header_read_timeout),
            idle: ms(limits.idle_timeout),
            body_read,
            body_progress: u64::try_from(body_progress).unwrap_or(u64::MAX).max(1),
            send: limits.send_timeout.map_or(u64::MAX, ms),
        }
    }
}

/// Watches every open connection's [`Activity`] and expires those past a timeout.
pub(crate) struct Sweeper {
    timeouts: Timeouts,
    /// How often it looks: a quarter of the shortest timeout, between 10 ms and a second.
    period: Duration,
    tracked: Mutex<Vec<(Weak<Activity>, Seen)>>,
}

impl Sweeper {
    pub(crate) fn new(limits: &Limits) -> Arc<Sweeper> {
        let send = limits.send_timeout.unwrap_or(Duration::MAX);
        let shortest = limits.header_read_timeout.min(limits.idle_timeout).min(limits.body_read_timeout).min(send);
        Arc::new(Sweeper {
            timeouts: Timeouts::new(limits),
            period: (shortest / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)),
            tracked: Mutex::new(Vec::new()),
        })
    }

    /// The activity record of a new connection, watched until it is dropped; see
    /// `Activity::new` for `reading_head`.
    pub(crate) fn track(&self, reading_head: bool) -> Arc<Activity> {
        let activity = Arc::new(Activity::new(reading_head));
        let now = now_ms();
        let seen = Seen::new(activity.phase.load(Ordering::Relaxed), now);
        self.tracked.lock().unwrap_or_else(PoisonError::into_inner).push((Arc::downgrade(&activity), seen));
        activity
    }

    /// Runs on the host's runtime until `shutdown`, checking a few times per shortest timeout.
    pub(crate) async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(self.period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = shutdown.cancelled() => return,
            }
            let now = now_ms();
            let mut expired = Vec::new();
            let mut slow_bodies = Vec::new();
            self.tracked.lock().unwrap_or_else(PoisonError::into_inner).retain_mut(|(weak, seen)| {
                let Some(activity) = weak.upgrade() else { return false };
                if let Some(why) = activity.check(seen, now, &self.timeouts, &mut slow_bodies) {
                    expired.push((activity, why));
                }
                true
            });
            // Woken outside the lock: a waker may run arbitrary code.
            for (activity, why) in expired {
                activity.expire(why);
            }
            for body in slow_bodies {
                body.time_out();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: u64 = 1_000;
    const IDLE: u64 = 5_000;
    const BODY: u64 = 2_000;
    /// Bytes a body must bring per `BODY`.
    const PROGRESS: u64 = 1_024;
    const SEND: u64 = 3_000;
    const T: Timeouts = Timeouts { header_read: HEAD, idle: IDLE, body_read: BODY, body_progress: PROGRESS, send: SEND };

    fn watched(activity: &Activity, at: u64) -> Seen {
        Seen::new(activity.phase.load(Ordering::Relaxed), at)
    }

    fn check(a: &Activity, seen: &mut Seen, now: u64) -> Option<Expiry> {
        let mut slow = Vec::new();
        let found = a.check(seen, now, &T, &mut slow);
        assert!(slow.is_empty(), "no body here");
        found
    }

    /// Checks `a` at `now`; returns whether its one body timed out then.
    fn body_timed_out(a: &Activity, seen: &mut Seen, now: u64) -> bool {
        let mut slow = Vec::new();
        assert_eq!(a.check(seen, now, &T, &mut slow), None, "a request in progress");
        !slow.is_empty()
    }

    #[test]
    fn the_head_is_timed_from_the_connection_start_whatever_trickles_in() {
        let a = Activity::new(true);
        let mut seen = watched(&a, 0);
        a.received(); // a slowloris byte
        assert_eq!(check(&a, &mut seen, 999), None);
        a.received();
        assert_eq!(check(&a, &mut seen, 1_000), Some(Expiry::HeaderRead));
    }

    #[test]
    fn a_client_that_takes_nothing_is_cut_off_even_with_a_request_in_progress() {
        let a = Activity::new(true);
        let mut seen = watched(&a, 0);
        a.request_started();
        a.sent();
        a.write_waited(); // the client's socket is full
        assert_eq!(check(&a, &mut seen, 100), None, "the wait is seen here");
        // A slow client that takes something now and then is not cut off.
        a.sent();
        a.write_waited();
        assert_eq!(check(&a, &mut seen, 100 + SEND - 1), None, "the progress is seen here");
        assert_eq!(check(&a, &mut seen, 100 + 2 * SEND - 2), None);
        assert_eq!(check(&a, &mut seen, 100 + 2 * SEND - 1), Some(Expiry::Send));
        a.expire(Expiry::Send);
        assert!(a.send_expired());
        assert_eq!(a.take_expiry(), Some(Expiry::Send), "honoured with a request in progress");
        assert!(a.send_expired(), "the socket's writes fail from now on");
        assert_eq!(check(&a, &mut seen, 100 + 3 * SEND), None, "expired once");
    }

    #[test]
    fn idle_is_timed_from_the_tick_that_saw_the_last_activity() {
        let a = Activity::new(true);
        let mut seen = watched(&a, 0);
        a.request_started();
        assert_eq!(check(&a, &mut seen, 60_000), None, "a request in progress never expires");
        a.request_ended();
        assert_eq!(check(&a, &mut seen, 60_100), None, "the change is seen here");
        assert_eq!(check(&a, &mut seen, 65_099), None);
        a.sent(); // the rest of the response went out
        assert_eq!(check(&a, &mut seen, 65_100), None);
        assert_eq!(check(&a, &mut seen, 70_100), Some(Expiry::Idle));
    }

    #[test]
    fn a_next_request_head_starts_the_header_timer() {
        let a = Activity::new(true);
        let mut seen = watched(&a, 0);
        a.request_started();
        a.request_ended();
        assert_eq!(check(&a, &mut seen, 10), None);
        a.received();
        assert_eq!(check(&a, &mut seen, 20), None);
        assert_eq!(check(&a, &mut seen, 1_019), None);
        assert_eq!(check(&a, &mut seen, 1_020), Some(Expiry::HeaderRead));
    }

    #[test]
    fn http2_pings_and_their_answers_are_no_activity() {
        let a = Activity::new(true);
        a.is_http2();
        let mut seen = watched(&a, 0);
        for at in (0..IDLE).step_by(100) {
            a.received(); // a PING
            a.sent(); // its answer
            assert_eq!(check(&a, &mut seen, at), None);
        }
        assert_eq!(check(&a, &mut seen, IDLE), Some(Expiry::Idle));
        // A stream is: the idle timer starts again when it ends.
        a.request_started();
        a.request_ended();
        assert_eq!(check(&a, &mut seen, IDLE + 10), None);
        assert_eq!(check(&a, &mut seen, 2 * IDLE + 9), None);
        assert_eq!(check(&a, &mut seen, 2 * IDLE + 10), Some(Expiry::Idle));
    }

    /// A frame header: length, type, flags, stream 1.
    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut frame = vec![len[1], len[2], len[3], kind, flags, 0, 0, 0, 1];
        frame.extend_from_slice(payload);
        frame
    }

    #[test]
    fn an_incomplete_http2_header_block_is_timed_even_with_streams_in_progress() {
        let a = Activity::new(true);
        a.is_http2();
        const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        let mut frames = Http2Frames::after_preface(PREFACE.len());
        let mut seen = watched(&a, 0);
        a.request_started(); // another stream, in progress throughout
        // The preface, then a complete block, split across reads anywhere, leave nothing open.
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(0x6, 0, &[0; 8])); // PING
        bytes.extend(frame(0x1, 0x4 | 0x1, b"abc")); // HEADERS, END_HEADERS | END_STREAM
        for byte in &bytes {
            frames.read(std::slice::from_ref(byte), &a);
        }
        assert_eq!(a.header_blocks.load(Ordering::Relaxed), 2);
        // HEADERS without END_HEADERS, then a CONTINUATION dripped a byte at a time.
        frames.read(&frame(0x1, 0, b"abc"), &a);
        assert_eq!(check(&a, &mut seen, 10), None, "the block is seen open here");
        let continuation = frame(0x9, 0x4, b"defgh");
        for (i, byte) in continuation[..continuation.len() - 1].iter().enumerate() {
            frames.read(std::slice::from_ref(byte), &a);
            assert_eq!(check(&a, &mut seen, 10 + i as u64 * 50), None);
        }
        assert_eq!(check(&a, &mut seen, 10 + HEAD), Some(Expiry::Http2Header));
        // Had its last byte come in time, the block would have been complete.
        frames.read(&continuation[continuation.len() - 1..], &a);
        assert_eq!(a.header_blocks.load(Ordering::Relaxed) % 2, 0);
        assert_eq!(check(&a, &mut seen, 20 + HEAD), None);
    }

    #[test]
    fn an_http2_response_waiting_for_a_window_is_timed_until_data_goes_out() {
        let a = Activity::new(true);
        a.is_http2();
        let mut frames = Http2Frames::after_preface(0);
        let mut seen = watched(&a, 0);
        a.request_started();
        assert_eq!(check(&a, &mut seen, 10 * SEND), None, "a response that waits for its plugin is not timed");
        a.awaits_window();
        let start = 10 * SEND + 10;
        assert_eq!(check(&a, &mut seen, start), None, "the wait is seen here");
        // What goes out besides DATA is no progress: a PING's answer, SETTINGS, and the
        // header of a DATA frame whose payload has not followed yet.
        frames.wrote(&frame(0x6, 0x1, &[0; 8]), &a);
        frames.wrote(&frame(0x4, 0, &[]), &a);
        let data = frame(0x0, 0, &[7; 100]);
        frames.wrote(&data[..9], &a);
        a.sent();
        assert_eq!(check(&a, &mut seen, start + SEND - 1), None);
        // Its payload is.
        frames.wrote(&data[9..20], &a);
        assert_eq!(check(&a, &mut seen, start + SEND), None, "the DATA is seen here");
        assert_eq!(check(&a, &mut seen, start + 2 * SEND - 1), None);
        assert_eq!(check(&a, &mut seen, start + 2 * SEND), Some(Expiry::Send));
        // Once hyper asks for the next frame, the body waits for its plugin again.
        a.window_opened();
        let mut seen = watched(&a, start);
        assert_eq!(check(&a, &mut seen, start + 10 * SEND), None);
    }

    #[test]
    fn http2_data_going_out_after_its_stream_ended_is_no_idleness() {
        let a = Activity::new(true);
        a.is_http2();
        let mut frames = Http2Frames::after_preface(0);
        let mut seen = watched(&a, 0);
        a.request_started();
        a.request_ended(); // the body was all handed to h2, which sends it as the client reads
        let data = frame(0x0, 0, &[7; 100]);
        for at in (0..3 * IDLE).step_by(1_000) {
            frames.wrote(&data, &a);
            assert_eq!(check(&a, &mut seen, at), None, "idle at {at}");
        }
        assert_eq!(check(&a, &mut seen, 4 * IDLE - 1_000), Some(Expiry::Idle));
    }

    #[test]
    fn a_body_read_on_after_its_response_is_no_next_head_and_is_still_timed() {
        let a = Activity::new(true);
        let mut seen = watched(&a, 0);
        a.request_started();
        let body = Arc::new(BodyProgress::default());
        a.watch_body(&body);
        a.request_ended(); // answered first; the plugin reads on, on a task of its own
        body.simulate(0, true); // and waits for more
        a.received();
        assert!(!a.reading_head(), "its bytes are the body's, not a next request's");
        assert!(!body_timed_out(&a, &mut seen, 100), "the window begins");
        // Steady progress for longer than the idle timeout: neither head nor idle timeout.
        let mut at = 100;
        for i in 1..=30 {
            body.simulate(i * 1_024, true);
            at += 500;
            assert!(!body_timed_out(&a, &mut seen, at), "timed out at {at}");
        }
        // Then nothing: the body read timeout applies.
        assert!(!body_timed_out(&a, &mut seen, at + BODY - 1));
        assert!(body_timed_out(&a, &mut seen, at + BODY), "the body read timeout applies");
    }

    #[test]
    fn a_body_held_but_not_read_after_its_response_leaves_the_connection_timed() {
        let a = Activity::new(true);
        let mut seen = watched(&a, 0);
        a.request_started();
        let body = Arc::new(BodyProgress::default());
        a.watch_body(&body);
        a.request_ended(); // the plugin keeps the body, and does not read it
        a.received(); // a next head, a byte at a time
        assert!(a.reading_head());
        assert_eq!(check(&a, &mut seen, 100), None, "the head is seen here");
        assert_eq!(check(&a, &mut seen, 100 + HEAD), Some(Expiry::HeaderRead));
    }

    #[test]
    fn a_body_the_plugin_waits_for_must_make_progress_within_each_window() {
        let a = Activity::new(true);
        let mut seen = watched(&a, 0);
        a.request_started();
        let body = Arc::new(BodyProgress::default());
        a.watch_body(&body);
        assert!(!body_timed_out(&a, &mut seen, 0), "first seen: the window begins");
        // The plugin does not wait (it is busy): no time counts.
        assert!(!body_timed_out(&a, &mut seen, 10 * BODY));
        // A steady 2 KiB/s, seen every 500 ms: each window brings enough.
        let mut at = 10 * BODY;
        for received in (1..=10).map(|i| i * 1_024) {
            body.simulate(received, true);
            at += 500;
            assert!(!body_timed_out(&a, &mut seen, at), "a steady body timed out at {at}");
        }
        // Then a byte a second: not enough.
        for received in 10 * 1_024 + 1..10 * 1_024 + 4 {
            body.simulate(received, true);
            at += 1_000;
            if body_timed_out(&a, &mut seen, at) {
                assert!(at >= 10 * BODY + 5_000 + BODY, "timed out early, at {at}");
                return;
            }
        }
        panic!("a body trickling a byte a second never timed out");
    }

    #[test]
    fn with_no_minimum_rate_any_byte_is_progress() {
        let t = Timeouts { body_progress: 1, ..T };
        let a = Activity::new(true);
        let mut seen = watched(&a, 0);
        a.request_started();
        let body = Arc::new(BodyProgress::default());
        a.watch_body(&body);
        let mut slow = Vec::new();
        body.simulate(0, true);
        assert_eq!(a.check(&mut seen, 0, &t, &mut slow), None);
        for second in 1..10 {
            body.simulate(second, true);
            assert_eq!(a.check(&mut seen, second * 1_000, &t, &mut slow), None);
        }
        assert!(slow.is_empty());
        assert_eq!(a.check(&mut seen, 9_000 + BODY, &t, &mut slow), None);
        assert_eq!(slow.len(), 1, "silent for the whole timeout");
    }
}
