//! A generation's counters: requests by status code with their latency, in-flight requests
//! and streams, bytes sent, and how its unloading ended.
//!
//! A request costs a few relaxed additions in plain atomics, with no lock and no label
//! lookup; the Prometheus exposition (`control::metrics`) reads them at a scrape.

use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

/// Upper bounds of the latency histogram's buckets, in seconds.
pub(crate) const BUCKETS: [f64; 16] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// The same bounds in nanoseconds, for the hot path.
const BUCKET_NANOS: [u64; 16] = {
    let mut nanos = [0u64; 16];
    let mut i = 0;
    while i < 16 {
        nanos[i] = (BUCKETS[i] * 1e9) as u64;
        i += 1;
    }
    nanos
};

/// Counters are sharded by thread: requests served on different worker threads never write
/// the same cache line (a shared counter bouncing between cores costs more than the rest of
/// the bookkeeping together; BENCHMARKS.md has the figures). A thread picks its shard once.
const SHARDS: usize = 4;
/// Distinct status codes counted per shard without a lock; further ones share a mutex.
const SLOTS: usize = 8;

thread_local! {
    static SHARD: usize = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS
    };
}

/// Requests answered with one status code: how long they took until the response head was
/// ready (the count is the sum of the buckets).
#[derive(Default)]
struct StatusStats {
    nanos: AtomicU64,
    /// Per bucket (not cumulative); the last one is +Inf.
    buckets: [AtomicU64; 17],
}

impl StatusStats {
    fn snapshot(&self) -> StatusTotals {
        let buckets: [u64; 17] = std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed));
        StatusTotals {
            count: buckets.iter().sum(),
            seconds: self.nanos.load(Ordering::Relaxed) as f64 / 1e9,
            buckets,
        }
    }
}

/// One thread's counters. Aligned to its own cache lines.
#[derive(Default)]
#[repr(align(128))]
struct Shard {
    /// Status codes claimed (0: free), and their figures.
    codes: [std::sync::atomic::AtomicU16; SLOTS],
    slots: [StatusStats; SLOTS],
    /// Requests started minus ended on this thread, responses included (may go negative: a
    /// request can end on another thread than it started on).
    in_flight: std::sync::atomic::AtomicI64,
    /// Response bodies started minus ended on this thread (may go negative, likewise).
    streams: std::sync::atomic::AtomicI64,
    bytes_sent: AtomicU64,
}

impl Shard {
    /// The slot of `status`, claiming a free one if needed.
    fn slot(&self, status: u16) -> Option<&StatusStats> {
        for (code, slot) in self.codes.iter().zip(&self.slots) {
            match code.load(Ordering::Acquire) {
                c if c == status => return Some(slot),
                0 => match code.compare_exchange(0, status, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => return Some(slot),
                    Err(c) if c == status => return Some(slot),
                    Err(_) => continue,
                },
                _ => continue,
            }
        }
        None
    }
}

/// A snapshot of one status code's figures, also what retired generations are summed into.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct StatusTotals {
    pub(crate) count: u64,
    pub(crate) seconds: f64,
    pub(crate) buckets: [u64; 17],
}

impl StatusTotals {
    pub(crate) fn add(&mut self, other: &StatusTotals) {
        self.count += other.count;
        self.seconds += other.seconds;
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
    }
}

/// How a generation's unloading ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unloaded {
    /// Closed, and gone from `/proc/self/maps`.
    Unmapped,
    /// Closed, but still in `/proc/self/maps`: a bug to report.
    StillMapped,
    /// Not closed: threads were still running plugin code.
    Leaked,
    /// Closed and its code unmapped, but its file stays mapped read-only (a backtrace
    /// symbolizer's cache): memory and disk space, no code.
    DataMapped,
}

impl Unloaded {
    /// Every outcome, in the order of their discriminants.
    pub(crate) const ALL: [Unloaded; 4] = [Unloaded::Unmapped, Unloaded::StillMapped, Unloaded::Leaked, Unloaded::DataMapped];
}

/// Requests canaries failed that the current version answered, by every generation so far.
static REPLAYED: AtomicU64 = AtomicU64::new(0);

/// Requests canaries failed that the current version answered, in this process.
pub(crate) fn replayed_total() -> u64 {
    REPLAYED.load(Ordering::Relaxed)
}

/// Counters of one generation, shared by the generation, its requests and its history
/// record (which outlives it).
#[derive(Default)]
pub(crate) struct GenerationStats {
    shards: [Shard; SHARDS],
    /// Status codes beyond what the shards' slots hold (rare: a plugin using many codes).
    more: std::sync::Mutex<std::collections::BTreeMap<u16, StatusTotals>>,
    /// 0 while loaded; then 1 + the `Unloaded` variant.
    unloaded: AtomicU8,
    /// Connections whose protocol was switched (WebSockets), open now. Rare enough for one
    /// counter.
    upgraded: std::sync::atomic::AtomicUsize,
    /// Requests it failed as a canary that the current version answered instead. Rare.
    replayed: AtomicU64,
}

impl GenerationStats {
    fn shard(&self) -> &Shard {
        &self.shards[SHARD.with(|s| *s)]
    }

    /// Counts a request answered with `status` whose response head was ready after `elapsed`.
    pub(crate) fn record(&self, status: u16, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let bucket = BUCKET_NANOS.iter().position(|&bound| nanos <= bound).unwrap_or(BUCKET_NANOS.len());
        match self.shard().slot(status) {
            Some(stats) => {
                stats.nanos.fetch_add(nanos, Ordering::Relaxed);
                stats.buckets[bucket].fetch_add(1, Ordering::Relaxed);
            }
            None => {
                let mut more = self.more.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let totals = more.entry(status).or_default();
                totals.count += 1;
                totals.seconds += nanos as f64 / 1e9;
                totals.buckets[bucket] += 1;
            }
        }
    }

    /// A request reached the generation; it is in flight until its response body ends.
    pub(crate) fn request_started(&self) {
        self.shard().in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn request_ended(&self) {
        self.shard().in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Requests (with their response bodies) in progress.
    pub(crate) fn in_flight(&self) -> usize {
        let open: i64 = self.shards.iter().map(|s| s.in_flight.load(Ordering::Relaxed)).sum();
        usize::try_from(open).unwrap_or(0)
    }

    pub(crate) fn stream_started(&self) {
        self.shard().streams.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stream_ended(&self) {
        self.shard().streams.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn sent(&self, bytes: usize) {
        self.shard().bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Response bodies being sent now.
    pub(crate) fn streams(&self) -> usize {
        let open: i64 = self.shards.iter().map(|s| s.streams.load(Ordering::Relaxed)).sum();
        usize::try_from(open).unwrap_or(0)
    }

    pub(crate) fn upgraded_started(&self) {
        self.upgraded.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn upgraded_ended(&self) {
        self.upgraded.fetch_sub(1, Ordering::Relaxed);
    }

    /// A request it failed as a canary was answered by the current version instead.
    pub(crate) fn replayed_elsewhere(&self) {
        self.replayed.fetch_add(1, Ordering::Relaxed);
        REPLAYED.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests it failed as a canary that the current version answered instead.
    pub(crate) fn replayed(&self) -> u64 {
        self.replayed.load(Ordering::Relaxed)
    }

    /// Upgraded connections (WebSockets) its plugin serves now.
    pub(crate) fn upgraded(&self) -> usize {
        self.upgraded.load(Ordering::Relaxed)
    }

    /// Response body bytes handed to the connection.
    pub(crate) fn bytes_sent(&self) -> u64 {
        self.shards.iter().map(|s| s.bytes_sent.load(Ordering::Relaxed)).sum()
    }

    /// Requests answered so far.
    pub(crate) fn requests(&self) -> u64 {
        self.by_status().map(|(_, totals)| totals.count).sum()
    }

    /// Per status code, what has been counted.
    pub(crate) fn by_status(&self) -> impl Iterator<Item = (u16, StatusTotals)> {
        let mut all = self.more.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        for shard in &self.shards {
            for (code, slot) in shard.codes.iter().zip(&shard.slots) {
                match code.load(Ordering::Acquire) {
                    0 => {}
                    code => all.entry(code).or_default().add(&slot.snapshot()),
                }
            }
        }
        all.into_iter()
    }

    pub(crate) fn set_unloaded(&self, how: Unloaded) {
        self.unloaded.store(how as u8 + 1, Ordering::Release);
    }

    /// How unloading ended, once it has.
    pub(crate) fn unloaded(&self) -> Option<Unloaded> {
        let stored = self.unloaded.load(Ordering::Acquire);
        Unloaded::ALL.get(usize::from(stored).checked_sub(1)?).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_land_in_their_status_and_bucket() {
        let stats = GenerationStats::default();
        stats.record(200, Duration::from_micros(80));
        stats.record(200, Duration::from_millis(3));
        stats.record(503, Duration::from_secs(60));
        stats.record(799, Duration::ZERO);
        let all: Vec<_> = stats.by_status().collect();
        assert_eq!(all.len(), 3);
        let ok = &all.iter().find(|(code, _)| *code == 200).unwrap().1;
        assert_eq!(ok.count, 2);
        assert_eq!(ok.buckets[0], 1, "80 µs is under the first bound");
        assert_eq!(ok.buckets[5], 1, "3 ms is in (2.5 ms, 5 ms]");
        let unavailable = &all.iter().find(|(code, _)| *code == 503).unwrap().1;
        assert_eq!(unavailable.buckets[16], 1, "a minute is past the last bound");
        assert_eq!(stats.requests(), 4);
    }

    #[test]
    fn many_status_codes_and_threads_are_all_counted() {
        let stats = std::sync::Arc::new(GenerationStats::default());
        let threads: Vec<_> = (0..6)
            .map(|t| {
                let stats = stats.clone();
                std::thread::spawn(move || {
                    for code in 200..230u16 {
                        stats.record(code, Duration::from_micros(t));
                        stats.stream_started();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        for _ in 0..(6 * 30) {
            stats.stream_ended();
        }
        assert_eq!(stats.requests(), 6 * 30);
        assert_eq!(stats.by_status().count(), 30);
        assert!(stats.by_status().all(|(_, t)| t.count == 6));
        assert_eq!(stats.streams(), 0);
    }
}
