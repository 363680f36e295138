//! The benchmark suite's smoke run: keeps bench/run.sh and its driver from rotting. It asserts
//! that the suite runs end to end and writes every table, never a speed.

use std::process::Command;

use hotswap_tests::{build_lock, cargo_build, example_version, heavy_lock, target_dir, temp_dir, workspace};

#[test]
fn the_benchmark_smoke_run_writes_every_table() {
    {
        let _lock = build_lock();
        cargo_build(&["hotswap", "static-server", "hotswap-bench"], &[]);
    }
    let (a, b) = (example_version("1.0.0+bench-a"), example_version("1.0.0+bench-b"));
    let dir = temp_dir("bench");
    let report = dir.join("BENCHMARKS.md");
    let _heavy = heavy_lock();
    let out = Command::new("bash")
        .arg(workspace().join("bench/run.sh"))
        .args(["--smoke", "--no-build", "--plugins"])
        .args([&a, &b])
        .args(["--versions", "1.0.0+bench-a", "1.0.0+bench-b", "--out"])
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
    ] {
        assert!(text.contains(heading), "{heading:?} missing from the report:\n{text}");
    }
    for row in ["| hotswap | ", "| static | ", "× static (paired rounds: ", "| hotswap: rename → first answer", "| hotswap, a swap every", "checksum OK"] {
        assert!(text.contains(row), "{row:?} missing from the report:\n{text}");
    }
    // The memory table reaches the last checkpoint.
    assert!(text.contains("| 10 | "), "memory checkpoints missing:\n{text}");
}
