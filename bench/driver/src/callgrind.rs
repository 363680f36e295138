//! Instructions per request: each server under callgrind (valgrind's instruction counter) with
//! one worker thread, run twice, with a short and a long wrk run: the difference in
//! instructions over the difference in requests is what one more request costs, without the
//! start-up and shut-down. Unlike requests per second, the count does not depend on how busy
//! the machine is.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::proc::{self, Server};
use crate::wrk;

/// Whether valgrind is installed.
pub(crate) fn available() -> bool {
    Command::new("valgrind").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// One server's count.
#[derive(Debug, Clone)]
pub(crate) struct Count {
    pub(crate) name: &'static str,
    /// Requests of the long run beyond the short one.
    pub(crate) requests: u64,
    pub(crate) per_request: f64,
}

/// Counts `binary args` (which must print hotswap's "listening on" line) under callgrind, with
/// wrk on GET / for `short` and then `long`.
pub(crate) fn count(name: &'static str, binary: &Path, args: &[&str], work: &Path, short: Duration, long: Duration) -> Result<Count> {
    let (r1, i1) = run(name, binary, args, work, short)?;
    let (r2, i2) = run(name, binary, args, work, long)?;
    ensure!(r2 > r1, "{name} answered no more requests in {long:?} than in {short:?} under callgrind");
    Ok(Count { name, requests: r2 - r1, per_request: i2.saturating_sub(i1) as f64 / (r2 - r1) as f64 })
}

/// One process: wrk for `time`, then a graceful stop; its requests and instructions in all.
fn run(name: &'static str, binary: &Path, args: &[&str], work: &Path, time: Duration) -> Result<(u64, u64)> {
    let out = work.join(format!("callgrind-{name}-{}ms.out", time.as_millis()));
    let mut cmd = Command::new("valgrind");
    cmd.arg("--tool=callgrind").arg(format!("--callgrind-out-file={}", out.display())).arg(binary).args(args);
    let log = work.join(format!("callgrind-{name}-{}ms.log", time.as_millis()));
    let server = Server::start_within(name, cmd, log, proc::listening_port, Duration::from_secs(120))?;
    let run = wrk::run(4, time, &server.url("/"))?;
    drop(server); // SIGTERM: both servers exit cleanly, and callgrind writes its counts
    let text = std::fs::read_to_string(&out).with_context(|| format!("callgrind wrote no {}", out.display()))?;
    let instructions = text
        .lines()
        .find_map(|l| l.strip_prefix("summary:").or_else(|| l.strip_prefix("totals:")))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no instruction total in {}", out.display()))?;
    Ok((run.requests, instructions))
}
