//! BENCHMARKS.md: the results of the last run, between two markers, so that the analysis
//! written around them survives a new run.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::sections::Results;
use crate::{wrk, Params};

const BEGIN: &str = "<!-- results:begin (written by bench/run.sh; edit outside the markers) -->";
const END: &str = "<!-- results:end -->";

/// Replaces the part between the markers of `path`, or creates the file.
pub(crate) fn write(path: &Path, results: &str) -> Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let block = format!("{BEGIN}\n{results}{END}");
    let text = match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if b < e => format!("{}{block}{}", &old[..b], &old[e + END.len()..]),
        _ => format!("# Benchmarks\n\nWritten by `bench/run.sh`.\n\n{block}\n"),
    };
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// The `p`-th percentile (nearest rank) in milliseconds.
fn percentile_ms(v: &[Duration], p: f64) -> f64 {
    let mut ms: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    if ms.is_empty() {
        return f64::NAN;
    }
    ms.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * ms.len() as f64).ceil().max(1.0) as usize;
    ms[rank.min(ms.len()) - 1]
}

fn med(runs: &[wrk::Run], f: impl Fn(&wrk::Run) -> f64) -> f64 {
    median(runs.iter().map(f).collect())
}

/// The median of `runs`' ratios to `base`'s, round by round. A round runs every server one
/// after the other, so its ratio compares runs minutes apart at most: the machine's drift
/// over the whole suite cancels out, which it does not in a ratio of medians.
fn paired(runs: &[wrk::Run], base: &[wrk::Run], f: impl Fn(&wrk::Run) -> f64) -> f64 {
    median(runs.iter().zip(base).map(|(run, base)| f(run) / f(base)).collect())
}

fn failures(runs: &[wrk::Run]) -> u64 {
    runs.iter().map(|r| r.failures).sum()
}

pub(crate) fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(if o.stdout.is_empty() { &o.stderr } else { &o.stdout }).lines().next().unwrap_or("").trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "?".into())
}

pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| c.lines().find_map(|l| l.strip_prefix("model name").map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())))
        .unwrap_or_else(|| "?".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} CPUs ({cpu}), {} {}", sh("uname", &["-s"]), sh("uname", &["-r"]))
}

/// The table of hello-world rounds (sections a and i): medians, and ratios to static's.
fn hello_table(w: &mut String, servers: &[(&'static str, Vec<wrk::Run>)]) {
    hello_table_against(w, servers, "static");
}

/// [`hello_table`], with ratios to the server named `against`.
/// The runs of server `name` among `rounds` (none if it did not run).
fn runs_of<'a>(rounds: &'a [(&'static str, Vec<wrk::Run>)], name: &str) -> &'a [wrk::Run] {
    rounds.iter().find(|(n, _)| *n == name).map_or(&[], |(_, runs)| runs.as_slice())
}

fn hello_table_against(w: &mut String, servers: &[(&'static str, Vec<wrk::Run>)], against: &str) {
    let base = runs_of(servers, against);
    let (base_rps, base_cpu) = (med(base, |x| x.rps), med(base, |x| x.server_cpu_us));
    let _ = writeln!(
        w,
        "| server | req/s | p50 ms | p99 ms | failed | req/s vs {against} | server CPU µs/request | CPU vs {against} | rounds (req/s) |\n|---|---|---|---|---|---|---|---|---|"
    );
    for (name, runs) in servers {
        let rounds: Vec<String> = runs.iter().map(|x| format!("{:.0}", x.rps)).collect();
        let _ = writeln!(
            w,
            "| {name} | {:.0} | {:.3} | {:.3} | {} | {:.3} | {:.2} | {:.2} | {} |",
            med(runs, |x| x.rps),
            med(runs, |x| x.p50_ms),
            med(runs, |x| x.p99_ms),
            failures(runs),
            med(runs, |x| x.rps) / base_rps,
            med(runs, |x| x.server_cpu_us),
            med(runs, |x| x.server_cpu_us) / base_cpu,
            rounds.join(", ")
        );
    }
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "**missed**" }
}

pub(crate) fn render(r: &Results, p: &Params, smoke: bool, entry: &str) -> String {
    let mut o = String::new();
    let w = &mut o;
    let hello = |name: &str| runs_of(&r.hello, name);
    let dl = |name: &str| runs_of(&r.download, name);
    let rps = |name: &str| med(hello(name), |x| x.rps);
    let (hot_rps, static_rps, node_rps) = (rps("hotswap"), rps("static"), rps("node-cluster"));
    let stream = med(dl("hotswap"), |x| x.mib_per_s) / med(dl("static"), |x| x.mib_per_s);
    let stream_paired = paired(dl("hotswap"), dl("static"), |x| x.mib_per_s);
    let ws = |name: &str| runs_of(&r.ws, name);
    let echo = med(ws("hotswap"), |x| x.rps) / med(ws("static"), |x| x.rps);
    let echo_paired = paired(ws("hotswap"), ws("static"), |x| x.rps);
    let swap_p50 = percentile_ms(&r.latency.first_answer, 50.0);
    let load_failures = failures(&r.load.swapping);
    let slow_ok = r.slow.received == r.slow.size && r.slow.checksum_ok && r.slow.error.is_none();
    let mem = |swaps: u64| r.memory.iter().find(|m| m.swaps == swaps);
    let [first_point, _, last_point] = p.memory_points;

    let _ = writeln!(w, "## Last run\n");
    if smoke {
        let _ = writeln!(w, "**Smoke run** (`{entry}`): seconds per section, to check that the suite works; its figures mean nothing.\n");
    }
    let commit = sh("git", &["rev-parse", "--short", "HEAD"]);
    let _ = writeln!(w, "- Date: {}; commit {commit}", sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]));
    let _ = writeln!(w, "- Machine: {}", machine());
    let _ = writeln!(w, "- Tools: {}, node {}", sh("wrk", &["-v"]).split(" [").next().unwrap_or("wrk"), sh("node", &["--version"]));
    let _ = writeln!(w, "- Command: `{entry}`; everything on 127.0.0.1, wrk on the same cores as the servers.");
    if let Some(note) = &r.anchor_note {
        let _ = writeln!(w, "- {note}.");
    }

    let _ = writeln!(
        w,
        "\n### Targets\n\nRatios of medians decide; beside them, the median of the ratios round by round \
         (the servers of one round run one after the other).\n\n| target | measured | |\n|---|---|---|"
    );
    let _ = writeln!(
        w,
        "| hello world ≥ 0.95 × static | {:.3} × static (paired rounds: {:.3}) | {} |",
        hot_rps / static_rps,
        paired(hello("hotswap"), hello("static"), |x| x.rps),
        verdict(hot_rps / static_rps >= 0.95)
    );
    if node_rps.is_finite() {
        let _ = writeln!(
            w,
            "| hello world ≥ 1.5 × Node cluster | {:.2} × Node cluster (paired rounds: {:.2}) | {} |",
            hot_rps / node_rps,
            paired(hello("hotswap"), hello("node-cluster"), |x| x.rps),
            verdict(hot_rps / node_rps >= 1.5)
        );
    }
    let _ = writeln!(w, "| streaming ≥ 0.98 × static | {stream:.3} × static (paired rounds: {stream_paired:.3}) | {} |", verdict(stream >= 0.98));
    let _ = writeln!(
        w,
        "| WebSocket echo ≥ 0.9 × static | {echo:.3} × static (paired rounds: {echo_paired:.3}) | {} |",
        verdict(echo >= 0.9)
    );
    let axum = |name: &str| runs_of(&r.axum_hello, name);
    let axum_ratio = med(axum("hotswap"), |x| x.rps) / med(axum("static"), |x| x.rps);
    if !r.axum_hello.is_empty() {
        let _ = writeln!(
            w,
            "| axum app's hello world ≥ 0.95 × the same Router in static-axum | {axum_ratio:.3} × static (paired rounds: {:.3}) | {} |",
            paired(axum("hotswap"), axum("static"), |x| x.rps),
            verdict(axum_ratio >= 0.95)
        );
    }
    let canary = |name: &str| runs_of(&r.canary_hello, name);
    let canary_ratio = med(canary(crate::sections::CANARY), |x| x.rps) / med(canary("hotswap"), |x| x.rps);
    if !r.canary_hello.is_empty() {
        let _ = writeln!(
            w,
            "| hello world during a 50 % canary ≥ 0.95 × without one | {canary_ratio:.3} × (paired rounds: {:.3}) | {} |",
            paired(canary(crate::sections::CANARY), canary("hotswap"), |x| x.rps),
            verdict(canary_ratio >= 0.95)
        );
    }
    let tls = |name: &str| runs_of(&r.tls_hello, name);
    let tls_ratio = med(tls("hotswap"), |x| x.rps) / med(tls("static"), |x| x.rps);
    if !r.tls_hello.is_empty() {
        let _ = writeln!(
            w,
            "| hello world over HTTPS ≥ 0.95 × static over HTTPS | {tls_ratio:.3} × static (paired rounds: {:.3}) | {} |",
            paired(tls("hotswap"), tls("static"), |x| x.rps),
            verdict(tls_ratio >= 0.95)
        );
    }
    let _ = writeln!(w, "| swap latency p50 < 5 ms | {swap_p50:.2} ms | {} |", verdict(swap_p50 < 5.0));
    let _ = writeln!(w, "| no failed request with a swap every {:?} | {load_failures} failed | {} |", p.swap_every, verdict(load_failures == 0));
    let _ = writeln!(w, "| throttled download across {} swaps intact | {} | {} |", p.slow_swaps, if slow_ok { "byte-exact" } else { "broken" }, verdict(slow_ok));
    if let (Some(a), Some(b)) = (mem(first_point), mem(last_point)) {
        let growth = (b.rss_kib as f64 - a.rss_kib as f64) / 1024.0;
        let _ = writeln!(
            w,
            "| RSS after {last_point} swaps within 5 MiB of after {first_point}, one library mapped | {growth:+.1} MiB, {} mapped | {} |",
            b.mapped,
            verdict(growth.abs() <= 5.0 && b.mapped == 1)
        );
    }

    let _ = writeln!(w, "\n### a. Hello world\n");
    let _ = writeln!(
        w,
        "Median of {} rounds of {:?} per server; rounds alternate between servers, in reverse order every other round. \
         Server CPU is user + system time of the server's processes during the round, per request.\n",
        p.hello_rounds, p.hello_time
    );
    hello_table(w, &r.hello);
    let _ = writeln!(w, "\nCommands:");
    for c in &r.hello_commands {
        let _ = writeln!(w, "- `{c}`");
    }

    let _ = writeln!(w, "\n### b. Streaming download (no throttle)\n");
    let _ = writeln!(w, "Median of {} rounds of `{}`.\n", p.download_rounds, r.download_command);
    let _ = writeln!(w, "| server | MiB/s | p50 ms per download | failed | vs static | server CPU ms/download | rounds (MiB/s) |\n|---|---|---|---|---|---|---|");
    for (name, runs) in &r.download {
        let rounds: Vec<String> = runs.iter().map(|x| format!("{:.0}", x.mib_per_s)).collect();
        let _ = writeln!(
            w,
            "| {name} | {:.0} | {:.1} | {} | {:.3} | {:.2} | {} |",
            med(runs, |x| x.mib_per_s),
            med(runs, |x| x.p50_ms),
            failures(runs),
            med(runs, |x| x.mib_per_s) / med(dl("static"), |x| x.mib_per_s),
            med(runs, |x| x.server_cpu_us) / 1000.0,
            rounds.join(", ")
        );
    }

    let _ = writeln!(w, "\n### c. Swap latency\n");
    let _ = writeln!(
        w,
        "{} swaps on an idle host: a complete build is copied beside the plugin directory, then renamed into it; \
         the clock starts at the rename. New requests poll `GET /` back to back, each on a fresh connection.\n",
        r.latency.first_answer.len()
    );
    let _ = writeln!(w, "| | p50 ms | p99 ms | max ms |\n|---|---|---|---|");
    for (what, v) in [("rename → first answer from the new version", &r.latency.first_answer), ("rename → old generation unmapped", &r.latency.old_unmapped)] {
        let _ = writeln!(w, "| hotswap: {what} | {:.2} | {:.2} | {:.2} |", percentile_ms(v, 50.0), percentile_ms(v, 99.0), percentile_ms(v, 100.0));
    }
    if let Some(a) = &r.anchor_reloads {
        for anchor in &a.anchors {
            for (prefix, what) in [("4 reload->first new", "reload → first new answer"), ("4 reload->all workers", "reload → all workers new")] {
                let _ = writeln!(w, "| {anchor} (anchor): {what}, ms med(min-max) | {} | | |", a.get(prefix, anchor).unwrap_or("n/a"));
            }
        }
    }

    let _ = writeln!(w, "\n### d. Under load, with swaps\n");
    let _ = writeln!(
        w,
        "`{}`, {} rounds each, alternating: without swaps, and with a rename every {:?} \
         ({} renames, {} swaps logged by the host).\n",
        r.load.command, p.load_rounds, p.swap_every, r.load.renames, r.load.swaps_logged
    );
    let _ = writeln!(w, "| | req/s | p99 ms | failed |\n|---|---|---|---|");
    let _ = writeln!(w, "| hotswap, no swaps | {:.0} | {:.3} | {} |", med(&r.load.steady, |x| x.rps), med(&r.load.steady, |x| x.p99_ms), failures(&r.load.steady));
    let _ = writeln!(w, "| hotswap, a swap every {:?} | {:.0} | {:.3} | {} |", p.swap_every, med(&r.load.swapping, |x| x.rps), med(&r.load.swapping, |x| x.p99_ms), load_failures);
    anchor_load_rows(w, r);

    let _ = writeln!(w, "\n### e. A throttled download across swaps\n");
    let s = &r.slow;
    let _ = writeln!(
        w,
        "`GET /download?size={}&rate={}` on hotswap while {} swaps happen ({:?} in, then every {:?}).\n",
        s.size, p.slow_rate, p.slow_swaps, p.slow_first, p.slow_spacing
    );
    let _ = writeln!(w, "| | result | version answered to new requests before each swap, and 1 s after the last |\n|---|---|---|");
    let _ = writeln!(
        w,
        "| hotswap | HTTP {}, {}/{} B, checksum {}, {:.1} s{} | {} |",
        s.status,
        s.received,
        s.size,
        if s.checksum_ok { "OK" } else { "MISMATCH" },
        s.elapsed.as_secs_f64(),
        s.error.as_deref().map(|e| format!(", error: {e}")).unwrap_or_default(),
        s.versions.join(", ")
    );
    if let Some(a) = &r.anchor_reloads {
        for anchor in &a.anchors {
            let get = |k: &str| a.get(k, anchor).unwrap_or("n/a").to_owned();
            let _ = writeln!(w, "| {anchor} (anchor), same download, 5 reloads | {} | {} |", get("3 download"), get("3 version served"));
        }
    }
    let _ = writeln!(
        w,
        "\nSwap latency during the download (rename → first new answer): {}.",
        s.swap_latency.iter().map(|d| format!("{:.1} ms", d.as_secs_f64() * 1000.0)).collect::<Vec<_>>().join(", ")
    );

    let _ = writeln!(w, "\n### f. Memory\n");
    let _ = writeln!(w, "Resident memory at steady state, after the hello-world rounds:\n");
    let _ = writeln!(w, "| server | processes | RSS MiB |\n|---|---|---|");
    for (name, kib, procs) in &r.rss_kib {
        let _ = writeln!(w, "| {name} | {procs} | {:.1} |", *kib as f64 / 1024.0);
    }
    if let Some(a) = &r.anchor_reloads {
        for anchor in &a.anchors {
            let _ = writeln!(w, "| {anchor} (anchor's own figure) | | {} |", a.get("5 RSS", anchor).unwrap_or("n/a"));
        }
    }
    let _ = writeln!(w, "\nA fresh hotswap swapped back and forth between two builds (each swap waits for the first new answer; each point after the old generations have unloaded and 100 requests):\n");
    let _ = writeln!(w, "| swaps | RSS MiB | plugin libraries mapped | open fds |\n|---|---|---|---|");
    for m in &r.memory {
        let _ = writeln!(w, "| {} | {:.1} | {} | {} |", m.swaps, m.rss_kib as f64 / 1024.0, m.mapped, m.fds);
    }
    let _ = writeln!(w, "\n### g. WebSocket echo\n");
    let _ = writeln!(w, "Median of {} rounds: {}.\n", p.ws_rounds, r.ws_command);
    let _ = writeln!(
        w,
        "| server | messages/s | p50 ms | p99 ms | failed sessions | vs static | server CPU µs/message | rounds (messages/s) |\n|---|---|---|---|---|---|---|---|"
    );
    for (name, runs) in &r.ws {
        let rounds: Vec<String> = runs.iter().map(|x| format!("{:.0}", x.rps)).collect();
        let _ = writeln!(
            w,
            "| {name} | {:.0} | {:.3} | {:.3} | {} | {:.3} | {:.2} | {} |",
            med(runs, |x| x.rps),
            med(runs, |x| x.p50_ms),
            med(runs, |x| x.p99_ms),
            failures(runs),
            med(runs, |x| x.rps) / med(ws("static"), |x| x.rps),
            med(runs, |x| x.server_cpu_us),
            rounds.join(", ")
        );
    }
    let _ = writeln!(w, "\n### h. Instructions per request\n");
    if let (true, Some((short, long))) = (r.instructions.is_empty(), p.callgrind_times) {
        let _ = writeln!(w, "valgrind is not installed on this machine: left out ({short:?} and {long:?} runs under callgrind).");
    } else if r.instructions.is_empty() {
        let _ = writeln!(w, "Left out of a smoke run.");
    } else {
        let _ = writeln!(
            w,
            "Each server under callgrind with one worker thread, started twice: wrk runs GET / with 4 connections \
             for {:?}, then, in the second process, for {:?}. Instructions per request = the difference in \
             instructions over the difference in requests: start-up and shut-down cancel out.\n",
            p.callgrind_times.map_or(Default::default(), |t| t.0),
            p.callgrind_times.map_or(Default::default(), |t| t.1)
        );
        let _ = writeln!(w, "| server | requests (difference) | instructions/request | vs static |\n|---|---|---|---|");
        let base = r.instructions.iter().find(|c| c.name == "static").map_or(f64::NAN, |c| c.per_request);
        for c in &r.instructions {
            let _ = writeln!(w, "| {} | {} | {:.0} | {:.2} |", c.name, c.requests, c.per_request, c.per_request / base);
        }
    }
    let _ = writeln!(w, "\n### i. An axum app\n");
    if r.axum_hello.is_empty() {
        let _ = writeln!(w, "Left out: the axum example or static-axum was not built.");
    } else {
        let _ = writeln!(
            w,
            "`GET /` of examples/axum-app (a Router with state and JSON routes): hotswap serving it as a plugin, and \
             static-axum with the same Router compiled in, as axum's own server runs it, and hotswap serving the bare \
             example handler of section a. As in section a: median of {} rounds of {:?}, alternating.\n",
            p.hello_rounds, p.hello_time
        );
        hello_table(w, &r.axum_hello);
        let bare = axum(crate::sections::BARE);
        let _ = writeln!(
            w,
            "\nWhat a Router costs in hotswap over the bare example handler, in the same rounds: {:.3} × its req/s \
             (paired rounds: {:.3}), {:+.2} µs of server CPU per request ({:.2} against {:.2}).",
            med(axum("hotswap"), |x| x.rps) / med(bare, |x| x.rps),
            paired(axum("hotswap"), bare, |x| x.rps),
            med(axum("hotswap"), |x| x.server_cpu_us) - med(bare, |x| x.server_cpu_us),
            med(axum("hotswap"), |x| x.server_cpu_us),
            med(bare, |x| x.server_cpu_us)
        );
        let _ = writeln!(w, "\nCommands:");
        for c in &r.axum_commands {
            let _ = writeln!(w, "- `{c}`");
        }
    }
    host_upgrades(w, r, p);
    if !r.canary_hello.is_empty() {
        let _ = writeln!(w, "\n### k. Hello world during a canary\n");
        let _ = writeln!(
            w,
            "hotswap with the second build as a canary that gets 50 % of new requests (never judged, so it runs \
             throughout), against hotswap without one. Each wrk connection takes blocks of up to 64 requests and moves \
             between the two generations' threads about once per block. As in section a: median of {} rounds of \
             {:?}, alternating.\n",
            p.hello_rounds, p.hello_time
        );
        hello_table_against(w, &r.canary_hello, "hotswap");
        let _ = writeln!(w, "\nCommands:");
        for c in &r.canary_commands {
            let _ = writeln!(w, "- `{c}`");
        }
    }
    if !r.tls_hello.is_empty() {
        let _ = writeln!(w, "\n### l. Hello world over HTTPS\n");
        let _ = writeln!(
            w,
            "hotswap with `--tls-cert` against the static server with `--tls-cert`: the same self-signed certificate \
             (ECDSA P-256), rustls with the ring provider, ALPN offered by both (wrk asks for none: HTTP/1.1), TLS 1.3 as wrk's OpenSSL negotiates it. wrk keeps its connections open, so this is the cost \
             of encrypting requests and responses, not of handshakes. As in section a: median of {} rounds of {:?}, \
             alternating.\n",
            p.hello_rounds, p.hello_time
        );
        hello_table_against(w, &r.tls_hello, "static");
        let _ = writeln!(w, "\nCommands:");
        for c in &r.tls_commands {
            let _ = writeln!(w, "- `{c}`");
        }
    }
    if let Some(a) = &r.anchor_reloads {
        let _ = writeln!(w, "\nAnchor figures come from its own script, run in the same session: `{}`.", a.command);
    }
    o
}

/// The anchor's rows for a table of throughput under load: its own run with a reload every
/// 2 s.
fn anchor_load_rows(w: &mut String, r: &Results) {
    let Some(a) = &r.anchor_reloads else { return };
    for anchor in &a.anchors {
        let get = |k: &str| a.get(k, anchor).unwrap_or("n/a").to_owned();
        let _ = writeln!(
            w,
            "| {anchor} (anchor), a reload every 2 s | {} | {} | {} non-2xx, socket errors c/r/w/t {} |",
            get("2 load req/s"),
            get("2 load latency p99"),
            get("2 load non-2xx"),
            get("2 load socket errors")
        );
    }
}

/// Section j: upgrading the host binary, beside the anchor's reloads.
fn host_upgrades(w: &mut String, r: &Results, p: &Params) {
    let u = &r.upgrades;
    let _ = writeln!(w, "\n### j. Upgrading the host binary\n");
    let _ = writeln!(
        w,
        "{} upgrades of an idle host to the same binary (`hotswap upgrade`): the clock starts when the command is \
         issued and stops at the first answer from the new process, polled with `GET /host` on new connections.\n",
        u.first_answer.len()
    );
    let _ = writeln!(w, "| | p50 ms | p99 ms | max ms |\n|---|---|---|---|");
    let v = &u.first_answer;
    let _ = writeln!(
        w,
        "| hotswap: `hotswap upgrade` → first answer from the new process | {:.1} | {:.1} | {:.1} |",
        percentile_ms(v, 50.0),
        percentile_ms(v, 99.0),
        percentile_ms(v, 100.0)
    );
    if let Some(a) = &r.anchor_reloads {
        for anchor in &a.anchors {
            let value = a.get("4 reload->first new", anchor).unwrap_or("n/a");
            let _ = writeln!(w, "| {anchor} (anchor): reload → first new answer, ms med(min-max) | {value} | | |");
        }
    }
    let _ = writeln!(
        w,
        "\nUnder load: `{}`, {} rounds each, alternating: without upgrades, and with an upgrade every {:?} \
         ({} upgrades in all). wrk does not retry: a request cut or refused by an upgrade counts as failed.\n",
        u.command,
        u.steady.len(),
        p.upgrade_every,
        u.upgrades_under_load
    );
    let _ = writeln!(w, "| | req/s | p99 ms | failed requests |\n|---|---|---|---|");
    let _ = writeln!(w, "| hotswap, no upgrades | {:.0} | {:.3} | {} |", med(&u.steady, |x| x.rps), med(&u.steady, |x| x.p99_ms), failures(&u.steady));
    let _ = writeln!(
        w,
        "| hotswap, an upgrade every {:?} | {:.0} | {:.3} | {} |",
        p.upgrade_every,
        med(&u.upgrading, |x| x.rps),
        med(&u.upgrading, |x| x.p99_ms),
        failures(&u.upgrading)
    );
    anchor_load_rows(w, r);
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_new_run_replaces_only_the_results() {
        let path = std::env::temp_dir().join(format!("hotswap-bench-report-{}.md", std::process::id()));
        let _ = std::fs::remove_file(&path);
        super::write(&path, "first\n").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("# Title\n\nanalysis before\n\n{}\nanalysis after\n", text.trim_start_matches("# Benchmarks\n"))).unwrap();
        super::write(&path, "second\n").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(text.contains("analysis before") && text.contains("analysis after") && text.contains("second\n"), "{text}");
        assert!(!text.contains("first"), "{text}");
    }
}
