//! The soak run, shortened: `bench/soak.sh` for 10 s against prebuilt artifacts. 64 keep-alive
//! clients, a swap every 100 ms and throttled downloads; the run must pass every check (no
//! failed request, downloads byte-exact, RSS, one library mapped, no fd leaked, a clean host
//! log), and a run with a problem must name it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use hotswap_tests::{artifacts, build_dir, example_version, heavy_lock, target_dir, temp_dir, workspace};

/// The checks the soak prints, one `check NAME ok|FAILED (...)` line each.
const CHECKS: [&str; 7] = ["requests", "swaps", "downloads", "rss", "libraries", "fds", "log"];

/// Runs `bench/soak.sh` with the tests' binaries on two example builds with `args` added.
fn soak(plugins: [&Path; 2], args: &[&str]) -> Output {
    let _heavy = heavy_lock();
    Command::new("bash")
        .arg(workspace().join("bench/soak.sh"))
        .arg("--bin-dir")
        .arg(build_dir())
        .arg("--plugins")
        .args(plugins)
        .arg("--work")
        .arg(temp_dir("soak"))
        .args(args)
        .env("CARGO_TARGET_DIR", target_dir())
        .output()
        .expect("cannot run bash")
}

/// The hotswap binary, the driver, and two example builds (the ones the benchmark test uses,
/// so that a full test run builds them once).
fn built() -> [PathBuf; 2] {
    artifacts(); // the benchmark's binaries among them
    [example_version("1.0.0+bench-a"), example_version("1.0.0+bench-b")]
}

fn check_line<'a>(summary: &'a str, name: &str) -> &'a str {
    let prefix = format!("check {name} ");
    summary.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no {prefix:?} line in:\n{summary}"))
}

#[test]
fn a_ten_second_soak_passes_every_check() {
    let [a, b] = built();
    // 3 MB at 1 MB/s: two downloads fit in the 10 s, the second started after the first.
    let out = soak([&a, &b], &["--versions", "1.0.0+bench-a", "1.0.0+bench-b", "--seconds", "10", "--download-size", "3000000"]);
    let (summary, log) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the soak failed:\n{summary}\n{log}");
    for name in CHECKS {
        let line = check_line(&summary, name);
        assert!(line.split_whitespace().nth(2) == Some("ok"), "{line}\n{summary}");
    }
    for figure in ["64 keep-alive clients", " 0 failed, 64 connections opened", "1 mapped at the end"] {
        assert!(summary.contains(figure), "{figure:?} missing from the summary:\n{summary}");
    }
    let downloads: u32 = summary
        .lines()
        .find_map(|l| l.strip_prefix("downloads  "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no downloads line in:\n{summary}"));
    assert!(downloads >= 2, "a second download should have started after the first:\n{summary}");
    assert!(summary.contains("== soak passed"), "{summary}");
}

#[test]
fn a_soak_that_sees_a_wrong_answer_fails_and_names_the_checks() {
    let [a, b] = built();
    // The second build is declared with a version it does not answer with: each of its
    // answers is a failed request, and that version is never seen.
    let out = soak([&a, &b], &["--versions", "1.0.0+bench-a", "1.0.0+bench-c", "--seconds", "2", "--warm-up-ms", "1000", "--clients", "4", "--download-size", "500000"]);
    let (summary, log) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "the soak passed:\n{summary}\n{log}");
    assert!(log.contains("soak failed: requests, swaps"), "{log}");
    for name in ["requests", "swaps"] {
        let line = check_line(&summary, name);
        assert!(line.contains("FAILED"), "{line}\n{summary}");
    }
    assert!(summary.contains("200 from an unexpected version"), "{summary}");
    for name in ["downloads", "libraries", "fds", "log"] {
        let line = check_line(&summary, name);
        assert!(line.contains(" ok "), "{line}\n{summary}");
    }
}
