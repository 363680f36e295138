//! Load generation with wrk, and reading its report.

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// One wrk run's figures.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Run {
    pub(crate) requests: u64,
    pub(crate) rps: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) mib_per_s: f64,
    /// Non-2xx/3xx answers plus socket errors (connect, read, write, timeout).
    pub(crate) failures: u64,
    /// CPU time the server used during the run, per request, in microseconds.
    pub(crate) server_cpu_us: f64,
}

/// The exact command line, for the report.
pub(crate) fn command_line(connections: u32, duration: Duration, url: &str) -> String {
    format!("wrk -t1 -c{connections} -d{}s --latency {url}", duration.as_secs_f64())
}

pub(crate) fn run(connections: u32, duration: Duration, url: &str) -> Result<Run> {
    let out = Command::new("wrk")
        .args(["-t1", &format!("-c{connections}"), &format!("-d{}s", duration.as_secs_f64()), "--latency", url])
        .output()
        .context("cannot run wrk (bench/run.sh installs it)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {}{}", text, String::from_utf8_lossy(&out.stderr));
    }
    parse(&text).with_context(|| format!("unexpected wrk output:\n{text}"))
}

fn parse(text: &str) -> Option<Run> {
    let mut run = Run::default();
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => run.rps = v.parse().ok()?,
            ["Transfer/sec:", v] => run.mib_per_s = mib(v)?,
            ["50%", v] => run.p50_ms = ms(v)?,
            ["99%", v] => run.p99_ms = ms(v)?,
            [n, "requests", "in", ..] => run.requests = n.parse().ok()?,
            ["Non-2xx", "or", "3xx", "responses:", n] => run.failures += n.parse::<u64>().ok()?,
            ["Socket", "errors:", rest @ ..] => {
                // "connect 0, read 3, write 0, timeout 0"
                run.failures += rest.iter().filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok()).sum::<u64>();
            }
            _ => {}
        }
    }
    (run.rps > 0.0).then_some(run)
}

fn ms(v: &str) -> Option<f64> {
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => return None,
    })
}

fn mib(v: &str) -> Option<f64> {
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "B" => n / 1048576.0,
        "KB" => n / 1024.0,
        "MB" => n,
        "GB" => n * 1024.0,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_a_wrk_report() {
        let text = "Running 1s test @ http://127.0.0.1:1/\n  Latency Distribution\n     50%  172.00us\n     99%    1.56ms\n  139771 requests in 1.00s, 20.00MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\n  Non-2xx or 3xx responses: 4\nRequests/sec: 139771.00\nTransfer/sec:      4.33GB\n";
        let run = super::parse(text).unwrap();
        assert_eq!(run.requests, 139771);
        assert_eq!(run.failures, 7);
        assert!((run.p50_ms - 0.172).abs() < 1e-9 && (run.p99_ms - 1.56).abs() < 1e-9);
        assert!((run.mib_per_s - 4433.92).abs() < 0.01);
    }
}
