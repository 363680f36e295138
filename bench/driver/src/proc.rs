//! The servers under test, as child processes: start, find their port, read their memory.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A server process, stopped (SIGTERM, then SIGKILL) when dropped.
pub(crate) struct Server {
    pub(crate) name: &'static str,
    pub(crate) port: u16,
    /// It serves HTTPS (its log said `listening on https://`).
    pub(crate) https: bool,
    child: Child,
    pub(crate) log: PathBuf,
}

impl Server {
    /// Starts `command` with stderr and stdout in `log`; waits until `ready(log text)` gives
    /// the port (or the process exits, or 20 s pass).
    pub(crate) fn start(name: &'static str, command: Command, log: PathBuf, ready: impl Fn(&str) -> Option<u16>) -> Result<Server> {
        Server::start_within(name, command, log, ready, Duration::from_secs(20))
    }

    /// [`Server::start`], waiting up to `limit` (a server under valgrind starts slowly).
    pub(crate) fn start_within(
        name: &'static str,
        mut command: Command,
        log: PathBuf,
        ready: impl Fn(&str) -> Option<u16>,
        limit: Duration,
    ) -> Result<Server> {
        let out = File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        command.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
        let child = command.spawn().with_context(|| format!("cannot start {name}: {command:?}"))?;
        let mut server = Server { name, port: 0, https: false, child, log };
        let started = Instant::now();
        loop {
            let text = std::fs::read_to_string(&server.log).unwrap_or_default();
            if let Some(port) = ready(&text) {
                server.port = port;
                server.https = text.contains(&format!("listening on https://127.0.0.1:{port}"));
                eprintln!("== {name} listening on 127.0.0.1:{port} (pid {})", server.pid());
                return Ok(server);
            }
            if let Some(status) = server.child.try_wait()? {
                bail!("{name} exited at startup ({status}):\n{text}");
            }
            if started.elapsed() > limit {
                bail!("{name} did not start listening within {limit:?}:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process and its children (the Node cluster's workers).
    pub(crate) fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.pid()];
        pids.extend(children(self.pid()));
        pids
    }

    /// Resident memory of the process and its children, in KiB.
    pub(crate) fn rss_kib(&self) -> u64 {
        self.pids().into_iter().filter_map(rss_kib).sum()
    }

    /// CPU time (user + system) used so far by the process and its children, in seconds.
    pub(crate) fn cpu_seconds(&self) -> f64 {
        self.pids().into_iter().filter_map(cpu_ticks).sum::<u64>() as f64 / CLOCK_TICKS_PER_SECOND
    }

    /// `127.0.0.1:PORT`.
    pub(crate) fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub(crate) fn url(&self, path: &str) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}{path}", self.port)
    }

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        signal(self.pid(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The port in a `listening on http://127.0.0.1:PORT` (or `https://`) log line (hotswap,
/// static-server).
pub(crate) fn listening_port(log: &str) -> Option<u16> {
    let rest = &log[log.find("listening on http")? + "listening on http".len()..];
    let rest = rest.strip_prefix("s").unwrap_or(rest).strip_prefix("://127.0.0.1:")?;
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// A port that was free a moment ago, for servers that cannot pick their own (Node).
pub(crate) fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub(crate) fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill").arg(format!("-{name}")).arg(pid.to_string()).status();
}

fn children(pid: u32) -> Vec<u32> {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) else { return Vec::new() };
    text.split_whitespace().filter_map(|p| p.parse().ok()).flat_map(|p| std::iter::once(p).chain(children(p))).collect()
}

/// `USER_HZ`, which Linux fixes at 100 for /proc.
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields 14 and 15 (utime, stime) follow it.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches(" kB").trim().parse().ok()
}

/// Distinct files under `dir` mapped into `pid` (hotswap's private copies of plugins).
pub(crate) fn mapped_under(pid: u32, dir: &Path) -> usize {
    let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else { return 0 };
    let dir = dir.to_string_lossy();
    let mut files: Vec<&str> = maps.lines().filter_map(|l| l.split_whitespace().nth(5)).filter(|p| p.starts_with(&*dir)).collect();
    files.sort_unstable();
    files.dedup();
    files.len()
}

/// Open file descriptors of `pid`.
pub(crate) fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Open file descriptors of `pid` by kind: what each links to, with inode numbers dropped
/// (`socket`, `pipe`, `anon_inode:[eventpoll]`, or a path), so that two censuses compare.
pub(crate) fn fd_census(pid: u32) -> BTreeMap<String, usize> {
    let mut census = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return census };
    for entry in dir.flatten() {
        // An fd closed between listing and reading is simply not counted.
        let Ok(target) = std::fs::read_link(entry.path()) else { continue };
        *census.entry(fd_kind(&target.to_string_lossy())).or_insert(0) += 1;
    }
    census
}

/// `socket:[1234]` -> `socket`; the private copy of the serving plugin (the host keeps it open
/// while it is loaded: `hotswap-<pid>-<n>/c<copy>-<name>`, a new one per swap) -> `plugin
/// copy`; anything else as it is.
fn fd_kind(target: &str) -> String {
    let path = std::path::Path::new(target.trim_end_matches(" (deleted)"));
    let in_shadow = path.parent().and_then(|d| d.file_name()).is_some_and(|d| d.to_string_lossy().starts_with("hotswap-"));
    let copy = path.file_name().map(|f| f.to_string_lossy().into_owned()).is_some_and(|f| {
        f.strip_prefix('c').and_then(|rest| rest.split_once('-')).is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    });
    if in_shadow && copy {
        return "plugin copy".to_owned();
    }
    match target.split_once(":[") {
        Some((kind, rest)) if rest.trim_end_matches(']').bytes().all(|b| b.is_ascii_digit()) => kind.to_owned(),
        _ => target.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_kinds_drop_inode_numbers_only() {
        assert_eq!(fd_kind("socket:[299363]"), "socket");
        assert_eq!(fd_kind("pipe:[300157]"), "pipe");
        assert_eq!(fd_kind("anon_inode:[eventpoll]"), "anon_inode:[eventpoll]");
        assert_eq!(fd_kind("/tmp/x/host.log"), "/tmp/x/host.log");
        assert_eq!(fd_kind("/tmp/hotswap-12-0/c104-example.so"), "plugin copy");
        assert_eq!(fd_kind("/tmp/hotswap-12-0/c5-app.so (deleted)"), "plugin copy");
        assert_eq!(fd_kind("/tmp/hotswap-12-0/kept/c5-app.so"), "/tmp/hotswap-12-0/kept/c5-app.so");
    }

    #[test]
    fn a_census_of_this_process_counts_its_fds() {
        let census = fd_census(std::process::id());
        assert!(census.values().sum::<usize>() >= 3, "{census:?}");
    }
}
