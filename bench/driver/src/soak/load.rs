//! The soak's load: keep-alive clients, the swapper, and throttled downloads, each on its own
//! thread until `stop` is set.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};

use crate::conn::Conn;
use crate::swap::Swapper;

/// How long a request may wait for the server, on any read or write.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Failure messages kept per thread (the count is always complete).
const SAMPLES: usize = 5;

/// A failure: when it happened (since the load started) and what it was.
pub(crate) type Failure = (Duration, String);

/// What one keep-alive client saw.
#[derive(Debug, Default)]
pub(crate) struct ClientStats {
    pub(crate) requests: u64,
    /// Answers per version, in the order the versions were given.
    pub(crate) versions: [u64; 2],
    pub(crate) failures: u64,
    pub(crate) samples: Vec<Failure>,
    /// Connections opened: 1 unless one broke.
    pub(crate) connections: u64,
}

impl ClientStats {
    /// Counts a failure, keeping its message if it is among the first few.
    pub(crate) fn fail(&mut self, at: Duration, message: String) {
        self.failures += 1;
        if self.samples.len() < SAMPLES {
            self.samples.push((at, message));
        }
    }
}

/// One client: a single kept-alive connection, `GET /` in a loop; every answer must be a 200
/// greeting from one of `versions`. A broken connection is a failure, then reopened.
pub(crate) fn client(port: u16, versions: &[String; 2], stop: &AtomicBool, started: Instant) -> ClientStats {
    let mut stats = ClientStats::default();
    let mut conn: Option<Conn> = None;
    while !stop.load(Ordering::Relaxed) {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Conn::open(port, REQUEST_TIMEOUT) {
                Ok(c) => {
                    stats.connections += 1;
                    conn.insert(c)
                }
                Err(e) => {
                    stats.fail(started.elapsed(), format!("{e:#}"));
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            },
        };
        stats.requests += 1;
        match c.get_text("/") {
            Ok((200, body)) => match version_in(&body).and_then(|v| versions.iter().position(|k| *k == v)) {
                Some(i) => stats.versions[i] += 1,
                None => stats.fail(started.elapsed(), format!("200 from an unexpected version: {body:?}")),
            },
            Ok((status, body)) => stats.fail(started.elapsed(), format!("status {status}: {body:?}")),
            Err(e) => {
                stats.fail(started.elapsed(), format!("{e:#}"));
                conn = None;
            }
        }
    }
    stats
}

/// The `version=` line of the example handler's greeting.
pub(crate) fn version_in(greeting: &str) -> Option<&str> {
    greeting.lines().find_map(|l| l.strip_prefix("version=")).map(str::trim)
}

/// Renames the next build into the plugin directory every `every` until `stop`; counts the
/// renames in `renames`. Returns the version of the last build renamed in.
pub(crate) fn swaps(swapper: &mut Swapper, every: Duration, stop: &AtomicBool, renames: &AtomicU64) -> Result<String> {
    let started = Instant::now();
    let mut last = String::new();
    let mut n = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let version = swapper.prepare()?.version.clone();
        n += 1;
        sleep_until(started + every * n, stop);
        if stop.load(Ordering::Relaxed) {
            break;
        }
        swapper.publish()?;
        renames.fetch_add(1, Ordering::Relaxed);
        last = version;
    }
    Ok(last)
}

/// Sleeps until `due` in short steps, returning early once `stop` is set.
pub(crate) fn sleep_until(due: Instant, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let left = due.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

/// One throttled download.
#[derive(Debug, Clone)]
pub(crate) struct Download {
    pub(crate) received: u64,
    /// Every byte as expected and all `size` of them.
    pub(crate) exact: bool,
    pub(crate) error: Option<String>,
    pub(crate) elapsed: Duration,
    /// Renames into the plugin directory while it ran.
    pub(crate) swaps: u64,
}

/// Throttled downloads of `size` bytes at `rate` bytes/s, one after another on one kept-alive
/// connection: the first at once, each next one only if it should end before `deadline`.
pub(crate) fn downloads(port: u16, size: u64, rate: u64, deadline: Instant, renames: &AtomicU64) -> Vec<Download> {
    let expected = Duration::from_secs_f64(size as f64 / rate as f64);
    let path = format!("/download?size={size}&rate={rate}");
    let mut done: Vec<Download> = Vec::new();
    let mut conn = None;
    while done.is_empty() || Instant::now() + expected.mul_f64(1.2) + Duration::from_millis(500) < deadline {
        let (started, swaps_before) = (Instant::now(), renames.load(Ordering::Relaxed));
        let outcome = match conn.take() {
            Some(c) => Ok(c),
            None => Conn::open(port, REQUEST_TIMEOUT),
        }
        .and_then(|mut c| download(&mut c, &path, size).map(|checked| (c, checked)));
        let mut d = Download {
            received: 0,
            exact: false,
            error: None,
            elapsed: started.elapsed(),
            swaps: renames.load(Ordering::Relaxed) - swaps_before,
        };
        match outcome {
            Ok((c, (received, mismatch))) => {
                conn = Some(c);
                d.received = received;
                d.exact = mismatch.is_none() && received == size;
                d.error = mismatch.map(|at| format!("byte {at} differs from the pattern"));
            }
            Err(e) => {
                d.error = Some(format!("{e:#}"));
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        done.push(d);
    }
    done
}

/// Downloads `path`, checking each byte against the pattern (byte i is i mod 256); returns
/// the bytes received and the offset of the first wrong byte, if any.
fn download(conn: &mut Conn, path: &str, size: u64) -> Result<(u64, Option<u64>)> {
    let (mut received, mut mismatch) = (0u64, None);
    let head = conn.get(path, |chunk| {
        if mismatch.is_none() {
            mismatch = chunk.iter().zip(received..).find(|(b, i)| **b != *i as u8).map(|(_, i)| i);
        }
        received += chunk.len() as u64;
    })?;
    ensure!(head.status == 200, "status {}", head.status);
    ensure!(head.content_length == size, "content-length {} instead of {size}", head.content_length);
    Ok((received, mismatch))
}
