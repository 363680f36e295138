//! The measurements, one function per section of the report.

use std::io::Read;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use sha2::{Digest, Sha256};

use crate::proc::{self, Server};
use crate::swap::{Build, Client, Swapper, SWAP_WAIT};
use crate::{anchor, callgrind, wrk, ws, Params};

/// What the suite runs.
pub(crate) struct Setup {
    pub(crate) hotswap: PathBuf,
    pub(crate) static_server: PathBuf,
    /// The axum example: its plugin build, and the static server with its Router compiled in
    /// (section i; left out without them).
    pub(crate) axum: Option<(PathBuf, PathBuf)>,
    pub(crate) builds: [Build; 2],
    pub(crate) anchor: Option<PathBuf>,
    pub(crate) work: PathBuf,
}

/// Everything measured, for the report.
#[derive(Debug, Default)]
pub(crate) struct Results {
    pub(crate) hello: Vec<(&'static str, Vec<wrk::Run>)>,
    pub(crate) hello_commands: Vec<String>,
    /// Section i: the axum example's hello world, hotswap (the plugin) against static-axum.
    pub(crate) axum_hello: Vec<(&'static str, Vec<wrk::Run>)>,
    pub(crate) axum_commands: Vec<String>,
    /// Section k: hello world with half of the requests going to a canary, and without one.
    pub(crate) canary_hello: Vec<(&'static str, Vec<wrk::Run>)>,
    pub(crate) canary_commands: Vec<String>,
    /// l. Hello world over HTTPS.
    pub(crate) tls_hello: Vec<(&'static str, Vec<wrk::Run>)>,
    pub(crate) tls_commands: Vec<String>,
    pub(crate) rss_kib: Vec<(&'static str, u64, usize)>,
    pub(crate) download: Vec<(&'static str, Vec<wrk::Run>)>,
    pub(crate) download_command: String,
    pub(crate) ws: Vec<(&'static str, Vec<wrk::Run>)>,
    pub(crate) ws_command: String,
    pub(crate) latency: Latency,
    pub(crate) load: Load,
    pub(crate) slow: Slow,
    pub(crate) memory: Vec<MemoryPoint>,
    pub(crate) upgrades: HostUpgrades,
    pub(crate) anchor_reloads: Option<anchor::Summary>,
    pub(crate) anchor_note: Option<String>,
    /// Instructions per hello-world request, hotswap and static (empty without valgrind).
    pub(crate) instructions: Vec<callgrind::Count>,
}

#[derive(Debug, Default)]
pub(crate) struct Latency {
    /// Rename to first answer from the new version, per swap.
    pub(crate) first_answer: Vec<Duration>,
    /// Rename to the old generation unmapped (every request on the new version), per swap.
    pub(crate) old_unmapped: Vec<Duration>,
}

#[derive(Debug, Default)]
pub(crate) struct Load {
    pub(crate) command: String,
    pub(crate) steady: Vec<wrk::Run>,
    pub(crate) swapping: Vec<wrk::Run>,
    pub(crate) renames: u64,
    pub(crate) swaps_logged: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Slow {
    pub(crate) size: u64,
    pub(crate) received: u64,
    pub(crate) status: u16,
    pub(crate) checksum_ok: bool,
    pub(crate) elapsed: Duration,
    pub(crate) error: Option<String>,
    /// Version answered to a new request before each swap, and one second after the last.
    pub(crate) versions: Vec<String>,
    pub(crate) swap_latency: Vec<Duration>,
}

/// j. Upgrades of the host binary (`hotswap upgrade`).
#[derive(Debug, Default)]
pub(crate) struct HostUpgrades {
    /// `hotswap upgrade` issued → first answer from the new process on a new connection, per
    /// upgrade of an idle host.
    pub(crate) first_answer: Vec<Duration>,
    /// The wrk load.
    pub(crate) command: String,
    pub(crate) steady: Vec<wrk::Run>,
    /// The same load with an upgrade every `Params::upgrade_every`.
    pub(crate) upgrading: Vec<wrk::Run>,
    pub(crate) upgrades_under_load: u64,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct MemoryPoint {
    pub(crate) swaps: u64,
    pub(crate) rss_kib: u64,
    pub(crate) mapped: usize,
    pub(crate) fds: usize,
}

pub(crate) fn run_all(setup: &Setup, params: &Params, anchor_reloads: bool) -> Result<Results> {
    let mut results = Results::default();
    if setup.anchor.is_none() {
        results.anchor_note = Some("Node.js or the anchor copy is missing: the anchor was left out".into());
    }
    {
        let (hot, mut swapper) = start_hotswap(setup, "hotswap")?;
        let stat = start_static(setup)?;
        let node = setup.anchor.as_deref().map(anchor::start_cluster).transpose()?;
        let mut servers: Vec<&Server> = vec![&hot, &stat];
        servers.extend(node.as_ref());

        (results.hello, results.hello_commands) = hello(&servers, params)?;
        std::thread::sleep(Duration::from_secs(1));
        for s in &servers {
            results.rss_kib.push((s.name, s.rss_kib(), s.pids().len()));
        }
        download(&[&hot, &stat], params, &mut results)?;
        websocket(&[&hot, &stat], params, &mut results)?;
        drop(node);
        drop(stat);

        results.latency = latency(&hot, &mut swapper, setup, params)?;
        results.load = load(&hot, &mut swapper, params)?;
        results.slow = slow_download(&hot, &mut swapper, params)?;
        let log = hot.log_text();
        drop(hot);
        check_log(&log)?;
    }
    if let Some((plugin, static_axum)) = &setup.axum {
        let build = Build { file: plugin.clone(), version: "axum".into() };
        let (hot, _swapper) = hotswap_in(&setup.hotswap, &[build.clone(), build], &setup.work.join("hotswap-axum"))?;
        let mut cmd = Command::new(static_axum);
        cmd.args(["--listen", "127.0.0.1:0"]).env_remove("RUST_LOG");
        let stat = Server::start("static", cmd, setup.work.join("static-axum.log"), proc::listening_port)?;
        // The bare example handler in the same rounds: what the Router costs, paired.
        let (mut bare, _swapper) = start_hotswap(setup, "hotswap-bare")?;
        bare.name = BARE;
        eprintln!("== i. the axum example");
        (results.axum_hello, results.axum_commands) = hello(&[&hot, &stat, &bare], params)?;
        for server in [&hot, &bare] {
            check_log(&server.log_text())?;
        }
    } else {
        eprintln!("== no axum example given: section i is left out");
    }
    (results.canary_hello, results.canary_commands) = canary(setup, params)?;
    (results.tls_hello, results.tls_commands) = https(setup, params)?;
    results.upgrades = host_upgrades(setup, params)?;
    {
        let (hot, mut swapper) = start_hotswap(setup, "hotswap-memory")?;
        results.memory = memory(&hot, &mut swapper, setup, params)?;
        let log = hot.log_text();
        drop(hot);
        check_log(&log)?;
    }
    if params.callgrind_times.is_none() {
        eprintln!("== instructions per request are left out of a smoke run");
    } else if callgrind::available() {
        results.instructions = instructions(setup, params)?;
    } else {
        eprintln!("== valgrind is not installed: instructions per request are left out");
    }
    if anchor_reloads {
        if let Some(dir) = &setup.anchor {
            results.anchor_reloads = Some(anchor::run_reload_bench(dir)?);
        }
    }
    Ok(results)
}

/// Section i's name for hotswap serving the bare example handler beside the axum app.
pub(crate) const BARE: &str = "hotswap, bare handler";

/// Section k's name for hotswap with half of the requests going to a canary.
pub(crate) const CANARY: &str = "hotswap, 50 % canary";

/// Where [`hotswap_in`] has the host put its shadow copies of plugins.
fn shadow_dir(setup: &Setup, name: &str) -> PathBuf {
    setup.work.join(name).join("shadow")
}

fn start_hotswap(setup: &Setup, name: &'static str) -> Result<(Server, Swapper)> {
    hotswap_in(&setup.hotswap, &setup.builds, &setup.work.join(name))
}

/// Starts `hotswap serve` at its default log level on a fresh `root`: the first build in
/// `root/plugins` (watched), shadow copies in `root/shadow` (see [`shadow_dir`]), the log in
/// `root/host.log`; the swapper stages its builds in `root/staging`. No admin API.
pub(crate) fn hotswap_in(hotswap: &Path, builds: &[Build; 2], root: &Path) -> Result<(Server, Swapper)> {
    hotswap_with_admin(hotswap, builds, root, None, &[])
}

/// [`hotswap_in`], with the admin API on the Unix socket `admin` if given, and `extra`
/// arguments.
fn hotswap_with_admin(hotswap: &Path, builds: &[Build; 2], root: &Path, admin: Option<&Path>, extra: &[&str]) -> Result<(Server, Swapper)> {
    let _ = std::fs::remove_dir_all(root);
    let (plugins, staging) = (root.join("plugins"), root.join("staging"));
    std::fs::create_dir_all(&plugins).with_context(|| format!("cannot create {}", plugins.display()))?;
    std::fs::create_dir_all(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
    let swapper = Swapper::new(builds.clone(), &plugins, &staging);
    swapper.install_first()?;
    let mut cmd = Command::new(hotswap);
    // No admin API unless asked for: the default socket may belong to another host.
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--admin"])
        .arg(admin.map_or("off".as_ref(), Path::as_os_str))
        .arg("--plugin-dir")
        .arg(&plugins)
        .arg("--shadow-dir")
        .arg(root.join("shadow"))
        .args(extra)
        .env_remove("RUST_LOG")
        .env_remove("HOTSWAP_LOG");
    let server = Server::start("hotswap", cmd, root.join("host.log"), proc::listening_port)?;
    Ok((server, swapper))
}

fn start_static(setup: &Setup) -> Result<Server> {
    let mut cmd = Command::new(&setup.static_server);
    cmd.args(["--listen", "127.0.0.1:0"]).env_remove("RUST_LOG");
    Server::start("static", cmd, setup.work.join("static.log"), proc::listening_port)
}

/// Warnings and errors in a host log mean something went wrong during a section.
pub(crate) fn check_log(log: &str) -> Result<()> {
    let bad: Vec<&str> = log.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).take(10).collect();
    ensure!(bad.is_empty(), "the host logged warnings or errors:\n{}", bad.join("\n"));
    Ok(())
}

/// a. (and i.) Hello world: every server, the same wrk settings, rounds alternating. The runs
/// of each server, and the commands.
type Rounds = (Vec<(&'static str, Vec<wrk::Run>)>, Vec<String>);

fn hello(servers: &[&Server], params: &Params) -> Result<Rounds> {
    let (mut runs, mut commands) = (Vec::new(), Vec::new());
    for s in servers {
        // (The driver's client speaks no TLS: over HTTPS, wrk's failure count tells.)
        ensure!(s.https || Client::new().answers(&s.url("/")), "{} does not answer GET /", s.name);
        wrk::run(params.connections, Duration::from_secs(1), &s.url("/"))?; // warm-up
        runs.push((s.name, Vec::new()));
        commands.push(wrk::command_line(params.connections, params.hello_time, &s.url("/")));
    }
    for round in 1..=params.hello_rounds {
        for i in round_order(servers.len(), round) {
            let s = servers[i];
            eprintln!("== hello round {round}: {}", s.name);
            let run = measured(s, || wrk::run(params.connections, params.hello_time, &s.url("/")))?;
            runs[i].1.push(run);
        }
    }
    Ok((runs, commands))
}

/// k. Hello world while a canary gets half of the new requests (the second build, never
/// judged), against the same host without one, rounds alternating.
fn canary(setup: &Setup, params: &Params) -> Result<Rounds> {
    eprintln!("== k. hello world during a 50 % canary");
    let never = ["--canary-requests", "1000000000", "--canary-min-requests", "1000000000", "--canary-duration", "1000days"];
    let args = [&["--canary", "50"][..], &never[..]].concat();
    let (mut split, mut swapper) = hotswap_with_admin(&setup.hotswap, &setup.builds, &setup.work.join("hotswap-canary"), None, &args)?;
    split.name = CANARY;
    swapper.prepare()?;
    swapper.publish()?;
    // Both versions answer new connections once the canary runs.
    let (client, deadline) = (Client::new(), Instant::now() + SWAP_WAIT);
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 2 {
        ensure!(Instant::now() < deadline, "the canary did not start within {SWAP_WAIT:?}");
        seen.extend(client.version(&split.url("/")));
    }
    let (plain, _swapper) = start_hotswap(setup, "hotswap-no-canary")?;
    let rounds = hello(&[&plain, &split], params)?;
    for server in [&plain, &split] {
        check_log(&server.log_text())?;
    }
    Ok(rounds)
}

/// l. Hello world over HTTPS (keep-alive: wrk makes one handshake per connection), hotswap
/// against the static server with the same certificate and TLS settings.
fn https(setup: &Setup, params: &Params) -> Result<Rounds> {
    eprintln!("== l. hello world over HTTPS");
    let dir = setup.work.join("tls");
    std::fs::create_dir_all(&dir)?;
    let issued = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, issued.cert.pem())?;
    // Private, as a key must be (the host warns otherwise).
    std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&key)?.write_all(issued.signing_key.serialize_pem().as_bytes())?;
    let (cert, key) = (cert.to_string_lossy().into_owned(), key.to_string_lossy().into_owned());
    let tls = ["--tls-cert", cert.as_str(), "--tls-key", key.as_str()];
    let (hot, _swapper) = hotswap_with_admin(&setup.hotswap, &setup.builds, &setup.work.join("hotswap-tls"), None, &tls)?;
    let mut cmd = Command::new(&setup.static_server);
    cmd.args(["--listen", "127.0.0.1:0"]).args(tls).env_remove("RUST_LOG");
    let stat = Server::start("static", cmd, setup.work.join("static-tls.log"), proc::listening_port)?;
    ensure!(hot.https && stat.https, "a server did not serve HTTPS");
    let rounds = hello(&[&hot, &stat], params)?;
    for (name, runs) in &rounds.0 {
        ensure!(runs.iter().all(|r| r.failures == 0), "{name} failed requests over HTTPS");
    }
    check_log(&hot.log_text())?;
    Ok(rounds)
}

/// b. Streaming downloads, no throttle.
fn download(servers: &[&Server], params: &Params, results: &mut Results) -> Result<()> {
    let path = format!("/download?size={}", params.download_size);
    results.download_command = wrk::command_line(params.download_connections, params.download_time, &format!("http://127.0.0.1:PORT{path}"));
    results.download = servers.iter().map(|s| (s.name, Vec::new())).collect();
    for round in 1..=params.download_rounds {
        for i in round_order(servers.len(), round) {
            let s = servers[i];
            eprintln!("== download round {round}: {}", s.name);
            let run = measured(s, || wrk::run(params.download_connections, params.download_time, &s.url(&path)))?;
            results.download[i].1.push(run);
        }
    }
    Ok(())
}

/// h. Instructions per hello-world request, under callgrind, one worker thread each.
fn instructions(setup: &Setup, params: &Params) -> Result<Vec<callgrind::Count>> {
    let root = setup.work.join("callgrind");
    let _ = std::fs::remove_dir_all(&root);
    let plugins = root.join("plugins");
    std::fs::create_dir_all(&plugins)?;
    std::fs::copy(&setup.builds[0].file, plugins.join("app.so"))?;
    let shadow = root.join("shadow");
    let (plugins, shadow) = (plugins.to_string_lossy().into_owned(), shadow.to_string_lossy().into_owned());
    let hotswap_args =
        ["serve", "--listen", "127.0.0.1:0", "--admin", "off", "--workers", "1", "--plugin-dir", &plugins, "--shadow-dir", &shadow];
    eprintln!("== instructions per request: hotswap under callgrind");
    let Some((short, long)) = params.callgrind_times else { return Ok(Vec::new()) };
    let hot = callgrind::count("hotswap", &setup.hotswap, &hotswap_args, &root, short, long)?;
    eprintln!("== instructions per request: static under callgrind");
    let static_args = ["--listen", "127.0.0.1:0", "--workers", "1"];
    let stat = callgrind::count("static", &setup.static_server, &static_args, &root, short, long)?;
    Ok(vec![hot, stat])
}

/// g. WebSocket echo: messages per second over many sessions, hotswap against static.
fn websocket(servers: &[&Server], params: &Params, results: &mut Results) -> Result<()> {
    results.ws_command = ws::description(params.ws_sessions, params.ws_time);
    results.ws = servers.iter().map(|s| (s.name, Vec::new())).collect();
    for round in 1..=params.ws_rounds {
        for i in round_order(servers.len(), round) {
            let s = servers[i];
            eprintln!("== WebSocket echo round {round}: {}", s.name);
            let run = measured(s, || ws::run(&s.addr(), params.ws_sessions, params.ws_time))?;
            results.ws[i].1.push(run);
        }
    }
    Ok(())
}

/// Servers in order on odd rounds and in reverse on even ones, so that going first (or last)
/// favours none of them.
fn round_order(servers: usize, round: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..servers).collect();
    if round.is_multiple_of(2) {
        order.reverse();
    }
    order
}

/// Runs `load` and adds the server's CPU time per request.
fn measured(server: &Server, load: impl FnOnce() -> Result<wrk::Run>) -> Result<wrk::Run> {
    let before = server.cpu_seconds();
    let mut run = load()?;
    run.server_cpu_us = (server.cpu_seconds() - before) * 1e6 / run.requests.max(1) as f64;
    Ok(run)
}

/// Waits (bounded) until exactly one plugin library is mapped; returns when that was true.
pub(crate) fn wait_one_mapped(server: &Server, shadow: &Path, timeout: Duration) -> Result<Instant> {
    let started = Instant::now();
    loop {
        let mapped = proc::mapped_under(server.pid(), shadow);
        if mapped == 1 {
            return Ok(Instant::now());
        }
        if started.elapsed() > timeout {
            bail!("{mapped} plugin libraries still mapped after {timeout:?}");
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// c. Swap latency: rename to first new answer, and to the old generation unmapped.
fn latency(hot: &Server, swapper: &mut Swapper, setup: &Setup, params: &Params) -> Result<Latency> {
    eprintln!("== swap latency: {} swaps", params.latency_swaps);
    let client = Client::new();
    let shadow = shadow_dir(setup, "hotswap");
    let mut latency = Latency::default();
    for _ in 0..params.latency_swaps {
        let (renamed, first_answer) = swapper.swap(&client, &hot.url("/"))?;
        latency.first_answer.push(first_answer);
        let unmapped = wait_one_mapped(hot, &shadow, SWAP_WAIT)?;
        latency.old_unmapped.push(unmapped - renamed);
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(latency)
}

/// Swaps the host has logged so far.
pub(crate) fn swaps_logged(server: &Server) -> u64 {
    server.log_text().matches("swapped: new requests go to generation").count() as u64
}

/// d. Throughput and failures with a swap every `swap_every`, against the same load without.
fn load(hot: &Server, swapper: &mut Swapper, params: &Params) -> Result<Load> {
    let url = hot.url("/");
    let mut load = Load { command: wrk::command_line(params.connections, params.load_time, &url), ..Load::default() };
    let before = swaps_logged(hot);
    for round in 1..=params.load_rounds {
        eprintln!("== load round {round}: no swaps");
        load.steady.push(wrk::run(params.connections, params.load_time, &url)?);
        eprintln!("== load round {round}: a swap every {:?}", params.swap_every);
        let (run, renames) = wrk_while(params, &url, params.swap_every, |moment| match moment {
            Moment::Ahead => swapper.prepare().map(drop),
            Moment::Due => swapper.publish().map(drop),
        })?;
        load.swapping.push(run);
        load.renames += renames;
    }
    std::thread::sleep(Duration::from_millis(500));
    load.swaps_logged = swaps_logged(hot) - before;
    Ok(load)
}

/// When [`wrk_while`] calls its action.
enum Moment {
    /// Ahead of the next due time, off the clock (staging a build).
    Ahead,
    /// At the due time.
    Due,
}

/// Runs wrk's load on `url` and, meanwhile, `act` every `every` (with [`Moment::Ahead`] first,
/// then [`Moment::Due`] on time), leaving the last interval free so the run ends settled.
/// Returns the run and how many times it acted.
fn wrk_while(params: &Params, url: &str, every: Duration, mut act: impl FnMut(Moment) -> Result<()>) -> Result<(wrk::Run, u64)> {
    std::thread::scope(|scope| {
        let wrk = scope.spawn(|| wrk::run(params.connections, params.load_time, url));
        let started = Instant::now();
        let mut acted = 0;
        while started.elapsed() + every * 2 < params.load_time {
            act(Moment::Ahead)?;
            let due = started + every * (acted as u32 + 1);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            act(Moment::Due)?;
            acted += 1;
        }
        let run = wrk.join().map_err(|_| anyhow::anyhow!("wrk thread panicked"))??;
        Ok((run, acted))
    })
}

/// j. Upgrades of the host binary: on an idle host, `hotswap upgrade` to the first answer from
/// the new process; then throughput and failures under keep-alive load (wrk, which does not
/// retry) with an upgrade every `upgrade_every`, against the same load without.
fn host_upgrades(setup: &Setup, params: &Params) -> Result<HostUpgrades> {
    eprintln!("== j. host upgrades: {} on an idle host, then under load", params.upgrades);
    // Socket paths are limited to 107 bytes: not under the work directory.
    let admin = std::env::temp_dir().join(format!("hotswap-bench-{}.sock", std::process::id()));
    let (hot, _swapper) = hotswap_with_admin(&setup.hotswap, &setup.builds, &setup.work.join("hotswap-upgrade"), Some(&admin), &[])?;
    // The process serving now; every upgrade replaces it, and the last one is stopped here.
    let mut serving = Stop(hot.pid());
    let mut result = HostUpgrades::default();
    let upgrade = |serving: &mut Stop| -> Result<u32> {
        let out = Command::new(&setup.hotswap).args(["upgrade", "--json", "--admin"]).arg(&admin).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(out.status.success(), "hotswap upgrade failed: {text}{}", String::from_utf8_lossy(&out.stderr));
        let pid = text
            .split("\"to_pid\":")
            .nth(1)
            .and_then(|rest| rest.trim_start().split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
            .with_context(|| format!("no to_pid in {text}"))?;
        serving.0 = pid;
        Ok(pid)
    };
    for _ in 0..params.upgrades {
        let started = Instant::now();
        let next = upgrade(&mut serving)?;
        loop {
            let (status, body) = crate::conn::Conn::open(hot.port, Duration::from_secs(5))?.get_text("/host")?;
            if status == 200 && body.trim() == format!("pid={next}") {
                break;
            }
            ensure!(started.elapsed() < SWAP_WAIT, "the new host {next} did not answer within {SWAP_WAIT:?}");
        }
        result.first_answer.push(started.elapsed());
        std::thread::sleep(Duration::from_millis(200));
    }
    let url = hot.url("/");
    result.command = wrk::command_line(params.connections, params.load_time, &url);
    for round in 1..=params.load_rounds {
        eprintln!("== j. load round {round}: no upgrades");
        result.steady.push(wrk::run(params.connections, params.load_time, &url)?);
        eprintln!("== j. load round {round}: an upgrade every {:?}", params.upgrade_every);
        let (run, upgrades) = wrk_while(params, &url, params.upgrade_every, |moment| match moment {
            Moment::Ahead => Ok(()),
            Moment::Due => upgrade(&mut serving).map(drop),
        })?;
        result.upgrading.push(run);
        result.upgrades_under_load += upgrades;
    }
    let log = hot.log_text();
    drop(hot);
    drop(serving);
    check_log(&log)?;
    Ok(result)
}

/// Stops a host process that is not the driver's child (one a `hotswap upgrade` started)
/// when dropped, and waits (bounded) for it to go.
struct Stop(u32);

impl Drop for Stop {
    fn drop(&mut self) {
        proc::signal(self.0, "TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::path::Path::new(&format!("/proc/{}", self.0)).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// e. A throttled download across swaps: it must finish byte-exact on its version while new
/// requests get each new one.
fn slow_download(hot: &Server, swapper: &mut Swapper, params: &Params) -> Result<Slow> {
    eprintln!("== throttled download of {} B at {} B/s across {} swaps", params.slow_size, params.slow_rate, params.slow_swaps);
    let url = hot.url(&format!("/download?size={}&rate={}", params.slow_size, params.slow_rate));
    let client = Client::new();
    let mut slow = Slow { size: params.slow_size, ..Slow::default() };
    let expected = pattern_digest(params.slow_size);
    std::thread::scope(|scope| -> Result<()> {
        let download = scope.spawn(|| {
            let agent = ureq::AgentBuilder::new().timeout_read(Duration::from_secs(10)).build();
            let started = Instant::now();
            let response = agent.get(&url).call().map_err(|e| e.to_string())?;
            let status = response.status();
            let mut reader = response.into_reader();
            let (mut hasher, mut received, mut buf) = (Sha256::new(), 0u64, vec![0; 1 << 16]);
            let error = loop {
                match reader.read(&mut buf) {
                    Ok(0) => break None,
                    Ok(n) => {
                        hasher.update(&buf[..n]);
                        received += n as u64;
                    }
                    Err(e) => break Some(e.to_string()),
                }
            };
            Ok::<_, String>((status, received, hasher.finalize().to_vec(), started.elapsed(), error))
        });
        let started = Instant::now();
        for i in 0..params.slow_swaps {
            let due = started + params.slow_first + params.slow_spacing * i as u32;
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            slow.versions.push(client.version(&hot.url("/")).unwrap_or_else(|| "(failed)".into()));
            slow.swap_latency.push(swapper.swap(&client, &hot.url("/"))?.1);
        }
        std::thread::sleep(Duration::from_secs(1));
        slow.versions.push(client.version(&hot.url("/")).unwrap_or_else(|| "(failed)".into()));
        match download.join().map_err(|_| anyhow::anyhow!("download thread panicked"))? {
            Ok((status, received, digest, elapsed, error)) => {
                slow.status = status;
                slow.received = received;
                slow.checksum_ok = digest == expected;
                slow.elapsed = elapsed;
                slow.error = error;
            }
            Err(e) => slow.error = Some(e),
        }
        Ok(())
    })?;
    Ok(slow)
}

/// SHA-256 of the example handler's download body: byte i is i mod 256.
fn pattern_digest(size: u64) -> Vec<u8> {
    let block: Vec<u8> = (0..=255u8).cycle().take(1 << 16).collect();
    let mut hasher = Sha256::new();
    let mut left = size;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        hasher.update(&block[..n]);
        left -= n as u64;
    }
    hasher.finalize().to_vec()
}

/// f. Memory and mapped libraries after many swaps, on a fresh host.
fn memory(hot: &Server, swapper: &mut Swapper, setup: &Setup, params: &Params) -> Result<Vec<MemoryPoint>> {
    let client = Client::new();
    let shadow = shadow_dir(setup, "hotswap-memory");
    let url = hot.url("/");
    let mut points = Vec::new();
    let mut measure = |swaps: u64| -> Result<()> {
        for _ in 0..100 {
            client.version(&url).context("GET / failed")?;
        }
        wait_one_mapped(hot, &shadow, SWAP_WAIT)?;
        std::thread::sleep(Duration::from_millis(300));
        points.push(MemoryPoint {
            swaps,
            rss_kib: hot.rss_kib(),
            mapped: proc::mapped_under(hot.pid(), &shadow),
            fds: proc::open_fds(hot.pid()),
        });
        Ok(())
    };
    measure(0)?;
    let mut done = 0;
    for point in params.memory_points {
        eprintln!("== memory: swapping up to {point}");
        while done < point {
            swapper.swap(&client, &url)?;
            done += 1;
        }
        measure(done)?;
    }
    Ok(points)
}
