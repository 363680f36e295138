//! `hotswap-bench soak`: hotswap under steady load while plugins are swapped, for a fixed time
//! (`bench/soak.sh`, and a 10-second run in the integration tests).
//!
//! On 127.0.0.1 only, it starts the real `hotswap serve --plugin-dir`, and then:
//!
//! 1. **Prime**: a few renames of the two builds into the plugin directory, no clients; once
//!    the last one serves and the old ones are unmapped, the host's open file descriptors are
//!    the baseline (no client connection is open).
//! 2. **Load**, for `--seconds`: a rename every `--swap-every-ms`, `--clients` threads each
//!    looping `GET /` on one kept-alive connection of its own (hand-written HTTP/1.1, so a
//!    closed or broken connection is seen, never retried away), and throttled downloads one
//!    after another, each spanning many swaps and checked byte by byte. After `--warm-up-ms`
//!    (the first swaps grow RSS: glibc gives each new generation's threads an arena) the
//!    host's RSS is the reference; it is sampled about ten times more during the load.
//! 3. **End**: everything stops and every client closes its connection; the driver waits
//!    (bounded) for the last build to serve, for the old generations to be unmapped and for
//!    the host's fds to return to the baseline, then stops the host.
//!
//! The checks: no failed request, every download byte-exact, both versions served, RSS at the
//! end within `--rss-limit-mib` of after warm-up, one plugin library mapped, the same fds as
//! before the clients (compared by kind), and no warning or error in the host's log. Every
//! wait is bounded; each client request times out after 10 s.

mod load;
mod summary;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};

use crate::conn::Conn;
use crate::proc::{self, Server};
use crate::sections;
use crate::swap::{Build, Swapper};
use summary::{Census, Summary};

/// Runs hotswap under keep-alive load, swaps and throttled downloads, then checks that
/// nothing failed and nothing leaked.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The hotswap binary.
    #[arg(long)]
    hotswap: PathBuf,
    /// Two builds of the example handler that answer with different versions.
    #[arg(long, num_args = 2, required = true)]
    plugins: Vec<PathBuf>,
    /// The versions those two builds answer with, in the same order.
    #[arg(long, num_args = 2, required = true)]
    versions: Vec<String>,
    /// Scratch directory (plugin directory, shadow copies, host log); emptied first.
    #[arg(long)]
    work: PathBuf,
    /// How long the load runs.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Keep-alive clients, each a thread with one connection.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Time between two renames into the plugin directory.
    #[arg(long, default_value_t = 100)]
    swap_every_ms: u64,
    /// Load time before the reference RSS is taken.
    #[arg(long, default_value_t = 2000)]
    warm_up_ms: u64,
    /// Bytes per throttled download.
    #[arg(long, default_value_t = 5_000_000)]
    download_size: u64,
    /// Throttle of the downloads, bytes per second.
    #[arg(long, default_value_t = 1_000_000)]
    download_rate: u64,
    /// Largest RSS growth allowed from after the warm-up to the end.
    #[arg(long, default_value_t = 10)]
    rss_limit_mib: u64,
}

/// Renames before the load, to get past the first generations before the fd baseline; even,
/// so that the first build serves again at the end of them.
const PRIME_SWAPS: u32 = 4;
/// Bound on each wait for the host to settle (new build serving, old ones unmapped, fds).
const SETTLE: Duration = Duration::from_secs(15);

/// Runs the soak, prints its summary on stdout and fails naming every check that failed.
pub(crate) fn main(args: Args) -> Result<()> {
    ensure!(args.plugins.len() == 2 && args.versions.len() == 2, "give two plugins and two versions");
    ensure!(args.versions[0] != args.versions[1], "the two builds must answer with different versions");
    ensure!(args.clients > 0 && args.download_rate > 0 && args.swap_every_ms > 0, "clients, rate and swap interval must be positive");
    ensure!(args.warm_up_ms < args.seconds * 1000, "the warm-up must be shorter than the run");
    let summary = run(&args)?;
    print!("{summary}");
    let failed = summary.failed();
    if !failed.is_empty() {
        bail!("soak failed: {} (host log: {})", failed.join(", "), args.work.join("host.log").display());
    }
    println!("== soak passed");
    Ok(())
}

fn run(args: &Args) -> Result<Summary> {
    let builds = [0, 1].map(|i| Build { file: args.plugins[i].clone(), version: args.versions[i].clone() });
    let (server, mut swapper) = sections::hotswap_in(&args.hotswap, &builds, &args.work)?;
    let shadow = args.work.join("shadow");
    let swap_every = Duration::from_millis(args.swap_every_ms);
    let mut summary = Summary {
        versions: builds.map(|b| b.version),
        swap_every,
        download_size: args.download_size,
        download_rate: args.download_rate,
        rss_limit_kib: args.rss_limit_mib << 10,
        ..Summary::default()
    };

    eprintln!("== soak: priming with {PRIME_SWAPS} swaps");
    prime(&server, &mut swapper, &summary.versions[0], swap_every, &shadow)?;
    summary.fds_before = steady_census(server.pid()).context("the host's fds did not settle before the load")?;
    let swaps_before = sections::swaps_logged(&server);

    eprintln!("== soak: {} clients, a rename every {swap_every:?}, for {} s", args.clients, args.seconds);
    let last = apply_load(args, &server, &mut swapper, &mut summary)?.unwrap_or_else(|| summary.versions[0].clone());

    eprintln!("== soak: load stopped; waiting for the host to settle");
    summary.unsettled = wait_for_version(server.port, &last, SETTLE).err().map(|e| format!("{e:#}"));
    summary.mapped_end = wait_one_mapped(&server, &shadow);
    summary.fds_after = wait_for_census(server.pid(), &summary.fds_before);
    summary.rss_end_kib = server.rss_kib();
    summary.swaps_logged = sections::swaps_logged(&server) - swaps_before;

    let log = server.log.clone();
    drop(server); // SIGTERM: the shutdown is part of the log checked
    let text = std::fs::read_to_string(&log).with_context(|| format!("cannot read {}", log.display()))?;
    summary.log_problems = sections::check_log(&text).err().map(|e| format!("{e:#}"));
    Ok(summary)
}

/// Once the first build (answering `first`) serves, renames the builds in a few times with no
/// client connected, and waits until the first build serves again and is the only one mapped.
fn prime(server: &Server, swapper: &mut Swapper, first: &str, every: Duration, shadow: &Path) -> Result<()> {
    wait_for_version(server.port, first, SETTLE)?;
    for _ in 0..PRIME_SWAPS {
        swapper.prepare()?;
        std::thread::sleep(every);
        swapper.publish()?;
    }
    wait_for_version(server.port, first, SETTLE)?;
    sections::wait_one_mapped(server, shadow, SETTLE)?;
    Ok(())
}

/// The load phase: swaps, clients and downloads for `args.seconds`, RSS and fds sampled after
/// the warm-up. Returns the last version renamed in, if any was.
fn apply_load(args: &Args, server: &Server, swapper: &mut Swapper, summary: &mut Summary) -> Result<Option<String>> {
    let stop = AtomicBool::new(false);
    let renames = AtomicU64::new(0);
    let versions = summary.versions.clone();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.seconds);
    let (port, swap_every) = (server.port, summary.swap_every);
    std::thread::scope(|scope| -> Result<Option<String>> {
        let (stop, renames, versions) = (&stop, &renames, &versions);
        let swaps = scope.spawn(move || {
            let last = load::swaps(swapper, swap_every, stop, renames);
            if last.is_err() {
                stop.store(true, Ordering::Relaxed);
            }
            last
        });
        let clients: Vec<_> = (0..args.clients).map(|_| scope.spawn(move || load::client(port, versions, stop, started))).collect();
        let downloads = scope.spawn(move || load::downloads(port, args.download_size, args.download_rate, deadline, renames));

        let warmed_up = started + Duration::from_millis(args.warm_up_ms);
        load::sleep_until(warmed_up, stop);
        summary.rss_warm_kib = server.rss_kib();
        summary.fds_during = proc::open_fds(server.pid());
        // RSS through the load, about ten samples, to tell a plateau from a slope.
        let step = (deadline - warmed_up).div_f64(10.0).max(Duration::from_secs(1));
        let mut next = warmed_up + step;
        while next < deadline && !stop.load(Ordering::Relaxed) {
            load::sleep_until(next, stop);
            summary.rss_during_kib.push(server.rss_kib());
            next += step;
        }
        load::sleep_until(deadline, stop);
        stop.store(true, Ordering::Relaxed);
        summary.elapsed = started.elapsed();

        let panicked = |what: &str| anyhow!("a {what} thread panicked");
        let last = swaps.join().map_err(|_| panicked("swap"))?.context("swapping failed")?;
        for client in clients {
            summary.clients.push(client.join().map_err(|_| panicked("client"))?);
        }
        summary.downloads = downloads.join().map_err(|_| panicked("download"))?;
        summary.renames = renames.load(Ordering::Relaxed);
        Ok((!last.is_empty()).then_some(last))
    })
}

/// Waits until a new connection's `GET /` answers `version`; one connection per attempt,
/// closed after it.
fn wait_for_version(port: u16, version: &str, timeout: Duration) -> Result<()> {
    let started = Instant::now();
    let mut last = String::from("no answer");
    while started.elapsed() < timeout {
        match Conn::open(port, Duration::from_secs(2)).and_then(|mut c| c.get_text("/")) {
            Ok((200, body)) if load::version_in(&body) == Some(version) => return Ok(()),
            Ok((status, body)) => last = format!("status {status}: {body:?}"),
            Err(e) => last = format!("{e:#}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("version {version} not served within {timeout:?} (last answer: {last})")
}

/// Waits (bounded) for one plugin library mapped; returns how many are mapped at the end.
fn wait_one_mapped(server: &Server, shadow: &Path) -> usize {
    let _ = sections::wait_one_mapped(server, shadow, SETTLE);
    proc::mapped_under(server.pid(), shadow)
}

/// The host's fd census once two readings 300 ms apart agree (connections just closed by a
/// client take a moment to be closed by the host too).
fn steady_census(pid: u32) -> Result<Census> {
    let started = Instant::now();
    let mut last = proc::fd_census(pid);
    while started.elapsed() < SETTLE {
        std::thread::sleep(Duration::from_millis(300));
        let now = proc::fd_census(pid);
        if now == last && !now.is_empty() {
            return Ok(now);
        }
        last = now;
    }
    bail!("still changing after {SETTLE:?}: {last:?}")
}

/// Waits (bounded) until the host's fds are `baseline` again; returns the last census.
fn wait_for_census(pid: u32, baseline: &Census) -> Census {
    let started = Instant::now();
    loop {
        let now = proc::fd_census(pid);
        if now == *baseline || started.elapsed() > SETTLE {
            return now;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
