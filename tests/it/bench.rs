//! The benchmark suite's smoke run: keeps bench/run.sh and its driver from rotting. It asserts
//! that the suite runs end to end and writes every table, never a speed. It needs wrk, and
//! installs nothing: without wrk on PATH it says so and skips (.ci/run installs wrk).

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use hotswap_tests::{artifacts, build_dir, example_version, heavy_lock, target_dir, temp_dir, workspace};

#[test]
fn the_benchmark_smoke_run_writes_every_table() {
    if !wrk_on_path() {
        eprintln!(
            "SKIPPED the_benchmark_smoke_run_writes_every_table: wrk is not installed \
             (install it with `apt-get install wrk`, or run .ci/run)"
        );
        return;
    }
    artifacts(); // the benchmark's binaries among them
    let (a, b) = (example_version("1.0.0+bench-a"), example_version("1.0.0+bench-b"));
    let dir = temp_dir("bench");
    let report = dir.join("BENCHMARKS.md");
    let _heavy = heavy_lock();
    let out = Command::new("bash")
        .arg(workspace().join("bench/run.sh"))
        .args(["--smoke", "--bin-dir"])
        .arg(build_dir())
        .arg("--plugins")
        .args([&a, &b])
        .args(["--versions", "1.0.0+bench-a", "1.0.0+bench-b", "--axum-plugin"])
        // The private copy: another test builds a variant of it in the target directory.
        .arg(&artifacts().axum)
        .arg("--out")
        .arg(&report)
        .arg("--work")
        .arg(dir.join("work"))
        .env("CARGO_TARGET_DIR", target_dir())
        .output()
        .expect("cannot run bash");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench/run.sh --smoke failed:\n{log}");

    let text = std::fs::read_to_string(&report).expect("no report written");
    for heading in [
        "### Targets",
        "### a. Hello world",
        "### b. Streaming download",
        "### c. Swap latency",
        "### d. Under load, with swaps",
        "### e. A throttled download across swaps",
        "### f. Memory",
        "### g. WebSocket echo",
        "### h. Instructions per request",
        "### i. An axum app",
        "### j. Upgrading the host binary",
        "### k. Hello world during a canary",
        "### l. Hello world over HTTPS",
    ] {
        assert!(text.contains(heading), "{heading:?} missing from the report:\n{text}");
    }
    let (k, l) = (text.find("### k.").unwrap(), text.find("### l.").unwrap());
    assert!(k < l && !text[l..].contains("### d."), "section l is out of place:\n{text}");
    for row in ["| hotswap | ", "| static | ", "× static (paired rounds: ", "| hotswap: rename → first answer", "| hotswap, a swap every", "checksum OK", "WebSocket echo ≥ 0.9 × static", "the same Router in static-axum", "What a Router costs in hotswap", "`hotswap upgrade` → first answer from the new process", "| hotswap, an upgrade every", "| hotswap, 50 % canary | ", "hello world during a 50 % canary ≥ 0.95 × without one", "hello world over HTTPS ≥ 0.95 × static over HTTPS"] {
        assert!(text.contains(row), "{row:?} missing from the report:\n{text}");
    }
    // The memory table reaches the last checkpoint.
    assert!(text.contains("| 10 | "), "memory checkpoints missing:\n{text}");
}

/// Whether an executable `wrk` is in one of PATH's directories, where bench/run.sh's
/// `command -v wrk` looks for it.
fn wrk_on_path() -> bool {
    let Some(path) = std::env::var_os("PATH") else { return false };
    std::env::split_paths(&path).any(|dir| {
        std::fs::metadata(dir.join("wrk")).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}
