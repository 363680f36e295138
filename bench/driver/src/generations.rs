//! `hotswap-bench generations` (run by `bench/generations.sh`): what repeated loading costs
//! per generation.
//!
//! Each plugin gets a fresh host started with `--log-level debug`. The driver renames copies
//! of the plugin into the host's plugin directory, one at a time: each rename is a new inode,
//! so each is a new generation. After each rename it waits for the host's answer in its log
//! (swapped, or refused). Then it sends requests on fresh connections, so that the new
//! generation's code runs on its threads (this is when a plugin creates its thread-locals
//! and its copy of std's `thread::current()` key).
//!
//! At each checkpoint the driver first waits until every replaced generation has logged
//! "generation unloaded and unmapped" and one plugin library is left mapped. Then it reads
//! `/proc/PID` (RSS, mappings, fds, threads), the pthread keys in use, and the host's own
//! reading of them from its last "before loading" line (logged before each load attempt,
//! refused ones included). The keys in use are counted in glibc's key table
//! (`__pthread_keys`, 1024 entries of `{ seq, destructor }`, in use when `seq` is odd), read
//! through `/proc/PID/mem`. It also checkpoints at the first refused load. The report is Markdown; the analysis in
//! BENCHMARKS.md is written by hand around it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::proc::{self, Server};
use crate::report;
use crate::swap::{Build, Swapper};

/// Swaps each plugin many times on a fresh host and records what the process holds.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The hotswap binary.
    #[arg(long)]
    hotswap: PathBuf,
    /// A plugin to measure, as NAME=PATH. Repeat it for several plugins; each gets its own host.
    #[arg(long = "plugin", value_parser = parse_plugin, required = true)]
    plugins: Vec<(String, PathBuf)>,
    /// Renames per plugin.
    #[arg(long, default_value_t = 2000)]
    swaps: u64,
    /// Where to measure, in renames done (0 is always measured).
    #[arg(long, value_delimiter = ',', default_value = "10,100,500,1000,1500,2000")]
    checkpoints: Vec<u64>,
    /// The host's --drain-timeout, in milliseconds. Each swap arms a timer that holds the
    /// replaced generation's allocation (not its library) until it fires, so checkpoints wait
    /// this long after the last swap: short, so that they measure what stays.
    #[arg(long, default_value_t = 1000)]
    drain_timeout_ms: u64,
    /// Requests after each swap, each on a fresh connection.
    #[arg(long, default_value_t = 2)]
    requests: u32,
    /// Scratch directory (plugin directories, shadow directories, host logs).
    #[arg(long)]
    work: PathBuf,
    /// Also write the report (Markdown) to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The command that ran this, for the report.
    #[arg(long, default_value = "bench/generations.sh")]
    entry: String,
}

fn parse_plugin(s: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = s.split_once('=').ok_or("expected NAME=PATH")?;
    Ok((name.to_owned(), PathBuf::from(path)))
}

/// `args` starts with the subcommand's name.
pub(crate) fn main(args: Args) -> Result<()> {
    std::fs::create_dir_all(&args.work)?;
    let mut runs = Vec::new();
    for (name, file) in &args.plugins {
        runs.push(measure(&args, name, file)?);
    }
    let text = render(&args, &runs);
    print!("{text}");
    if let Some(out) = &args.out {
        std::fs::write(out, &text).with_context(|| format!("cannot write {}", out.display()))?;
        eprintln!("== report written to {}", out.display());
    }
    Ok(())
}

/// What the process holds at one checkpoint.
#[derive(Debug, Clone)]
struct Point {
    renames: u64,
    note: &'static str,
    /// Generations loaded so far, the first one included.
    loaded: u64,
    refused: u64,
    rss_kib: u64,
    maps: u64,
    /// Plugin libraries (shadow copies) still mapped.
    mapped: u64,
    fds: u64,
    threads: u64,
    /// pthread keys in use, counted in glibc's table.
    keys: Option<u64>,
    /// pthread keys in use according to the host's last "before loading" line.
    host_keys: Option<u64>,
    /// Every replaced generation unloaded and one library mapped, before the timeout.
    settled: bool,
}

/// One plugin's run.
#[derive(Debug)]
struct Run {
    name: String,
    file: PathBuf,
    size: u64,
    points: Vec<Point>,
    /// The rename at which a load was first refused, and why.
    first_refusal: Option<(u64, String)>,
    answered: u64,
    failed: u64,
    /// Answered and failed requests after the first refusal.
    answered_after_refusal: u64,
    failed_after_refusal: u64,
    /// Keys in use after the last rename whose requests were answered.
    last_keys: Option<(u64, u64)>,
    /// Why the run stopped early (the host died, a swap never showed).
    stopped: Option<String>,
    alive_at_end: bool,
    /// Warnings, errors and non-tracing lines in the host's log: kind -> (count, first rename).
    events: BTreeMap<String, (u64, u64)>,
    elapsed: Duration,
    log: PathBuf,
}

fn measure(args: &Args, name: &str, file: &Path) -> Result<Run> {
    let root = args.work.join(name);
    let _ = std::fs::remove_dir_all(&root);
    let (plugins, staging, shadow) = (root.join("plugins"), root.join("staging"), root.join("shadow"));
    for dir in [&plugins, &staging, &shadow] {
        std::fs::create_dir_all(dir)?;
    }
    // Two byte-identical copies, alternated: each rename brings a new inode.
    let build = |version: &str| Build { file: file.to_path_buf(), version: version.into() };
    let mut swapper = Swapper::new([build("a"), build("b")], &plugins, &staging);
    swapper.install_first()?;
    let mut cmd = Command::new(&args.hotswap);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--admin", "off", "--log-level", "debug", "--drain-timeout"])
        .arg(format!("{}ms", args.drain_timeout_ms))
        .arg("--plugin-dir")
        .arg(&plugins)
        .arg("--shadow-dir")
        .arg(&shadow)
        .env_remove("RUST_LOG")
        .env_remove("HOTSWAP_LOG");
    let log_path = root.join("host.log");
    let server = Server::start("hotswap", cmd, log_path.clone(), proc::listening_port)?;
    let pid = server.pid();
    let keys = KeyTable::find(pid);
    if keys.is_none() {
        eprintln!("== cannot read glibc's pthread key table in {pid} (needs nm and /proc/PID/mem): keys are not counted");
    }
    let url = server.url("/");
    let agent = ureq::AgentBuilder::new().max_idle_connections(0).timeout(Duration::from_secs(5)).build();
    let mut log = Log::new(log_path.clone());
    let mut run = Run {
        name: name.to_owned(),
        file: file.to_path_buf(),
        size: std::fs::metadata(file)?.len(),
        points: Vec::new(),
        first_refusal: None,
        answered: 0,
        failed: 0,
        answered_after_refusal: 0,
        failed_after_refusal: 0,
        last_keys: None,
        stopped: None,
        alive_at_end: false,
        events: BTreeMap::new(),
        elapsed: Duration::ZERO,
        log: log_path,
    };
    let started = Instant::now();
    eprintln!("== {name}: {} renames, pid {pid}", args.swaps);

    let request = |run: &mut Run| {
        for _ in 0..args.requests {
            let ok = agent.get(&url).call().ok().filter(|r| r.status() == 200).and_then(|r| r.into_string().ok()).is_some();
            *if ok { &mut run.answered } else { &mut run.failed } += 1;
            if run.first_refusal.is_some() {
                *if ok { &mut run.answered_after_refusal } else { &mut run.failed_after_refusal } += 1;
            }
        }
    };
    request(&mut run);
    log.poll(0)?;
    run.points.push(checkpoint(pid, keys.as_ref(), &shadow, args.drain_timeout_ms, &mut log, 0, "")?);

    let mut done = 0;
    while done < args.swaps {
        let (swapped, refused) = (log.swapped, log.refused);
        swapper.prepare()?;
        swapper.publish()?;
        done += 1;
        // The host's answer: swapped or refused.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            log.poll(done)?;
            if log.swapped > swapped || log.refused > refused {
                break;
            }
            if !alive(pid) || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        if !alive(pid) {
            run.stopped = Some(format!("the host exited after rename {done}"));
            break;
        }
        if log.swapped == swapped && log.refused == refused {
            run.stopped = Some(format!("rename {done}: neither a swap nor a refusal logged within 10 s"));
            break;
        }
        let first_refusal = log.refused > refused && run.first_refusal.is_none();
        if first_refusal {
            run.first_refusal = Some((done, log.last_refusal.clone()));
            eprintln!("== {name}: first refused load at rename {done}: {}", log.last_refusal);
        }
        let failed = run.failed;
        request(&mut run);
        if !alive(pid) {
            run.stopped = Some(format!("the host exited during the requests after rename {done} (the first requests of generation {})", 1 + log.swapped));
            break;
        }
        if run.failed == failed {
            run.last_keys = keys.as_ref().and_then(KeyTable::in_use).map(|k| (done, k)).or(run.last_keys);
        }
        if first_refusal {
            run.points.push(checkpoint(pid, keys.as_ref(), &shadow, args.drain_timeout_ms, &mut log, done, "first refusal")?);
        }
        if args.checkpoints.contains(&done) {
            eprintln!("== {name}: checkpoint at {done} renames");
            run.points.push(checkpoint(pid, keys.as_ref(), &shadow, args.drain_timeout_ms, &mut log, done, "")?);
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    log.poll(done)?;
    run.alive_at_end = alive(pid);
    run.elapsed = started.elapsed();
    run.events = std::mem::take(&mut log.events);
    drop(server);
    Ok(run)
}

/// Waits until the replaced generations have unloaded, then reads what the process holds.
/// `/proc/PID/smaps` is kept beside the log as `smaps-RENAMES.txt`, to see where memory went.
fn checkpoint(
    pid: u32,
    keys: Option<&KeyTable>,
    shadow: &Path,
    drain_timeout_ms: u64,
    log: &mut Log,
    renames: u64,
    note: &'static str,
) -> Result<Point> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let settled = loop {
        log.poll(renames)?;
        if log.unloaded == log.swapped && proc::mapped_under(pid, shadow) == 1 {
            break true;
        }
        if !alive(pid) || Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    std::thread::sleep(Duration::from_millis(drain_timeout_ms + 500));
    log.poll(renames)?;
    if let (Ok(smaps), Some(dir)) = (std::fs::read(format!("/proc/{pid}/smaps")), shadow.parent()) {
        std::fs::write(dir.join(format!("smaps-{renames}.txt")), smaps)?;
    }
    let count = |what: &str| std::fs::read_dir(format!("/proc/{pid}/{what}")).map_or(0, |d| d.count() as u64);
    Ok(Point {
        renames,
        note,
        loaded: 1 + log.swapped,
        refused: log.refused,
        rss_kib: rss_kib(pid),
        maps: std::fs::read_to_string(format!("/proc/{pid}/maps")).map_or(0, |m| m.lines().count() as u64),
        mapped: proc::mapped_under(pid, shadow) as u64,
        fds: count("fd"),
        threads: count("task"),
        keys: keys.and_then(KeyTable::in_use),
        host_keys: log.keys,
        settled,
    })
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()))
        .unwrap_or(0)
}

/// glibc's `PTHREAD_KEYS_MAX`.
const THREAD_KEYS_MAX: usize = 1024;

/// glibc's pthread key table in a process: `__pthread_keys`, found at libc's load address
/// (its mapping at file offset 0) plus the symbol's value (from `nm -D`).
struct KeyTable {
    mem: PathBuf,
    address: u64,
}

impl KeyTable {
    fn find(pid: u32) -> Option<KeyTable> {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
        let (base, libc) = maps.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let path = *f.get(5)?;
            let name = path.rsplit('/').next()?;
            let at_start = f[2].trim_start_matches('0').is_empty();
            (at_start && (name == "libc.so.6" || name.starts_with("libc-")))
                .then(|| Some((u64::from_str_radix(f[0].split('-').next()?, 16).ok()?, path.to_owned())))
                .flatten()
        })?;
        let nm = Command::new("nm").args(["-D", "--defined-only", &libc]).output().ok()?;
        let symbol = String::from_utf8_lossy(&nm.stdout).lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3 && f[2].split('@').next() == Some("__pthread_keys")).then(|| u64::from_str_radix(f[0], 16).ok()).flatten()
        })?;
        let table = KeyTable { mem: format!("/proc/{pid}/mem").into(), address: base + symbol };
        table.in_use().map(|_| table)
    }

    /// Keys in use: entries (`{ seq, destructor }`) whose sequence number is odd.
    fn in_use(&self) -> Option<u64> {
        let mut mem = std::fs::File::open(&self.mem).ok()?;
        mem.seek(SeekFrom::Start(self.address)).ok()?;
        let mut table = vec![0u8; THREAD_KEYS_MAX * 16];
        mem.read_exact(&mut table).ok()?;
        Some(table.chunks_exact(16).filter(|e| e[0] & 1 == 1).count() as u64)
    }
}

/// The process exists and is not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').and_then(|i| s[i + 1..].split_whitespace().next().map(|state| state != "Z")))
        .unwrap_or(false)
}

/// The host's log, read as it grows.
struct Log {
    path: PathBuf,
    offset: u64,
    partial: String,
    swapped: u64,
    refused: u64,
    unloaded: u64,
    keys: Option<u64>,
    last_refusal: String,
    events: BTreeMap<String, (u64, u64)>,
}

impl Log {
    fn new(path: PathBuf) -> Log {
        Log {
            path,
            offset: 0,
            partial: String::new(),
            swapped: 0,
            refused: 0,
            unloaded: 0,
            keys: None,
            last_refusal: String::new(),
            events: BTreeMap::new(),
        }
    }

    /// Reads the complete lines written since the last call; `renames` is for the record.
    fn poll(&mut self, renames: u64) -> Result<()> {
        let mut file = std::fs::File::open(&self.path).with_context(|| format!("cannot open {}", self.path.display()))?;
        file.seek(SeekFrom::Start(self.offset))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        self.offset += bytes.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&bytes));
        let Some(end) = self.partial.rfind('\n') else { return Ok(()) };
        let text: String = self.partial.drain(..=end).collect();
        for line in text.lines() {
            self.line(line, renames);
        }
        Ok(())
    }

    fn line(&mut self, line: &str, renames: u64) {
        if line.contains("swapped: new requests go to generation") {
            self.swapped += 1;
        } else if line.contains("generation unloaded and unmapped") {
            self.unloaded += 1;
        } else if let Some(i) = line.find("budgets=") {
            self.keys = budget_used(&line[i + "budgets=".len()..], "pthread keys");
        }
        if let Some(i) = line.find("refused plugin candidate: ") {
            self.refused += 1;
            self.last_refusal = line[i + "refused plugin candidate: ".len()..].to_owned();
        }
        // A tracing line is "TIMESTAMP LEVEL target: message"; anything else (an abort
        // message, a signal) is recorded too.
        let mut words = line.split_whitespace();
        let (stamp, level) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        let tracing_line = stamp.starts_with(|c: char| c.is_ascii_digit());
        if tracing_line && !matches!(level, "WARN" | "ERROR") {
            return;
        }
        let message = if tracing_line { line.split_once(": ").map_or(line, |(_, m)| m) } else { line };
        let kind: String = format!("{} {}", if tracing_line { level } else { "other" }, normalize(message));
        let entry = self.events.entry(kind).or_insert((0, renames));
        entry.0 += 1;
    }
}

/// "N" of the "N of M WHAT in use" part of a budgets line.
fn budget_used(budgets: &str, what: &str) -> Option<u64> {
    budgets.split(", ").find(|p| p.contains(what))?.split_whitespace().next()?.parse().ok()
}

/// A message with its numbers and paths blanked, so that repeats group, cut to a readable length.
fn normalize(message: &str) -> String {
    let mut out = String::new();
    let mut in_number = false;
    for c in message.chars() {
        if c.is_ascii_digit() {
            if !in_number {
                out.push('N');
            }
            in_number = true;
        } else {
            in_number = false;
            out.push(c);
        }
    }
    let out: Vec<&str> = out.split_whitespace().map(|w| if w.contains('/') { "PATH" } else { w }).collect();
    let out = out.join(" ");
    match out.char_indices().nth(160) {
        Some((i, _)) => format!("{}…", &out[..i]),
        None => out,
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn render(args: &Args, runs: &[Run]) -> String {
    let mut w = String::new();
    let _ = writeln!(w, "## Repeated loading: measured");
    let _ = writeln!(w);
    let _ = writeln!(w, "- Command: `{}`", args.entry);
    let _ = writeln!(w, "- Machine: {}", report::machine());
    let _ = writeln!(w, "- {}; {}", report::sh("rustc", &["--version"]), report::sh("ldd", &["--version"]));
    let _ = writeln!(
        w,
        "- Per plugin: a fresh `hotswap serve --log-level debug --drain-timeout {}ms`, {} renames of a copy of the build into its plugin directory, {} requests (fresh connections) after each; checkpoints once every replaced generation has unloaded and the drain timeout has passed.",
        args.drain_timeout_ms, args.swaps, args.requests
    );
    for run in runs {
        let _ = writeln!(w);
        let _ = writeln!(w, "### {} ({}, {:.1} MiB)", run.name, run.file.display(), mib(run.size / 1024));
        let _ = writeln!(w);
        let _ = writeln!(w, "| renames | generations loaded | refused | RSS MiB | mappings | plugin libraries mapped | fds | threads | pthread keys in use | keys in use, host's reading |");
        let _ = writeln!(w, "|---|---|---|---|---|---|---|---|---|---|");
        for p in &run.points {
            let note = match (p.note, p.settled) {
                ("", true) => String::new(),
                (n, true) => format!(" ({n})"),
                ("", false) => " (**not settled**)".into(),
                (n, false) => format!(" ({n}, **not settled**)"),
            };
            let keys = p.keys.map_or("?".into(), |k| k.to_string());
            let host_keys = p.host_keys.map_or("?".into(), |k| k.to_string());
            let _ = writeln!(
                w,
                "| {}{note} | {} | {} | {:.1} | {} | {} | {} | {} | {keys} | {host_keys} |",
                p.renames,
                p.loaded,
                p.refused,
                mib(p.rss_kib),
                p.maps,
                p.mapped,
                p.fds,
                p.threads
            );
        }
        let _ = writeln!(w);
        if let Some(line) = per_generation(&run.points) {
            let _ = writeln!(w, "{line}");
            let _ = writeln!(w);
        }
        let _ = writeln!(
            w,
            "- Requests: {} answered, {} failed{}.",
            run.answered,
            run.failed,
            if run.first_refusal.is_some() {
                format!(" ({} answered and {} failed after the first refusal)", run.answered_after_refusal, run.failed_after_refusal)
            } else {
                String::new()
            }
        );
        match &run.first_refusal {
            Some((at, reason)) => {
                let _ = writeln!(w, "- First refused load: rename {at}: `{reason}`");
            }
            None => {
                let _ = writeln!(w, "- No load was refused.");
            }
        }
        if let Some((at, keys)) = run.last_keys {
            let _ = writeln!(w, "- pthread keys in use after the last rename whose requests were answered ({at}): {keys}.");
        }
        if let Some(why) = &run.stopped {
            let _ = writeln!(w, "- **Stopped early: {why}.**");
        }
        let _ = writeln!(w, "- Host alive at the end: {}; {:.0} s; log: {}", if run.alive_at_end { "yes" } else { "**no**" }, run.elapsed.as_secs_f64(), run.log.display());
        if run.events.is_empty() {
            let _ = writeln!(w, "- No warning or error in the host's log.");
        } else {
            let _ = writeln!(w, "- Warnings, errors and other lines in the host's log (numbers and paths blanked):");
            for (kind, (count, first)) in &run.events {
                let _ = writeln!(w, "  - {count} × `{kind}` (first at rename {first})");
            }
        }
    }
    w
}

/// Growth per generation loaded, from the checkpoint at 100 renames to the last checkpoint
/// that loaded more (2000, or the last before loads were refused).
fn per_generation(points: &[Point]) -> Option<String> {
    let base = points.iter().find(|p| p.renames == 100)?;
    let last = points.iter().map(|p| p.loaded).max()?;
    let end = points.iter().find(|p| p.loaded == last)?;
    let n = end.loaded.checked_sub(base.loaded).filter(|&n| n > 0)? as f64;
    let d = |a: u64, b: u64| (b as f64 - a as f64) / n;
    let keys = match (base.keys, end.keys) {
        (Some(a), Some(b)) => format!("{:+.3}", d(a, b)),
        _ => "?".into(),
    };
    Some(format!(
        "Per generation, from {} to {} renames ({} generations loaded): RSS {:+.2} KiB, mappings {:+.3}, plugin libraries mapped {:+.3}, fds {:+.3}, threads {:+.3}, pthread keys {keys}.",
        base.renames,
        end.renames,
        n,
        d(base.rss_kib, end.rss_kib),
        d(base.maps, end.maps),
        d(base.mapped, end.mapped),
        d(base.fds, end.fds),
        d(base.threads, end.threads),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_and_messages_are_read_from_log_lines() {
        let b = "991 of 1024 pthread keys in use, 412 of 65530 memory mappings in use, 19 of 20000 file descriptors in use";
        assert_eq!(budget_used(b, "pthread keys"), Some(991));
        assert_eq!(budget_used(b, "file descriptors"), Some(19));
        assert_eq!(normalize("refused /tmp/x/a.so: 12 of 1024"), "refused PATH N of N");
    }
}
