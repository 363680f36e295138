//! What a soak run measured, the checks it must pass, and the summary it prints.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use super::load::{ClientStats, Download, Failure};

/// Open file descriptors by kind (see [`crate::proc::fd_census`]).
pub(crate) type Census = BTreeMap<String, usize>;

/// Everything a soak run measured.
#[derive(Debug, Default)]
pub(crate) struct Summary {
    pub(crate) versions: [String; 2],
    /// How long the load ran.
    pub(crate) elapsed: Duration,
    pub(crate) swap_every: Duration,
    pub(crate) download_size: u64,
    pub(crate) download_rate: u64,
    pub(crate) rss_limit_kib: u64,
    pub(crate) clients: Vec<ClientStats>,
    pub(crate) renames: u64,
    pub(crate) swaps_logged: u64,
    pub(crate) downloads: Vec<Download>,
    /// Host RSS after the warm-up, with the load running.
    pub(crate) rss_warm_kib: u64,
    /// Host RSS sampled through the rest of the load.
    pub(crate) rss_during_kib: Vec<u64>,
    /// Host RSS at the end: load stopped, old generations unloaded.
    pub(crate) rss_end_kib: u64,
    /// Host fds with no client connected, after the first swaps and before the load.
    pub(crate) fds_before: Census,
    /// Host fds after the warm-up, with every client connected.
    pub(crate) fds_during: usize,
    /// Host fds at the end, every client gone.
    pub(crate) fds_after: Census,
    /// Plugin libraries mapped into the host at the end.
    pub(crate) mapped_end: usize,
    /// Why the last build renamed in did not answer new requests at the end, if it did not.
    pub(crate) unsettled: Option<String>,
    /// Warnings and errors in the host's log, if any.
    pub(crate) log_problems: Option<String>,
}

/// One check: its name, whether it passed, and the figures behind it.
#[derive(Debug)]
pub(crate) struct Check {
    pub(crate) name: &'static str,
    pub(crate) ok: bool,
    pub(crate) detail: String,
}

impl Summary {
    pub(crate) fn requests(&self) -> u64 {
        self.clients.iter().map(|c| c.requests).sum()
    }

    pub(crate) fn failures(&self) -> u64 {
        self.clients.iter().map(|c| c.failures).sum()
    }

    fn answers(&self, version: usize) -> u64 {
        self.clients.iter().map(|c| c.versions[version]).sum()
    }

    fn connections(&self) -> u64 {
        self.clients.iter().map(|c| c.connections).sum()
    }

    /// The first `n` distinct failure messages any client kept, each at its first time.
    fn first_failures(&self, n: usize) -> Vec<&Failure> {
        let mut all: Vec<&Failure> = self.clients.iter().flat_map(|c| &c.samples).collect();
        all.sort_by_key(|(at, _)| *at);
        let mut distinct: Vec<&Failure> = Vec::new();
        for failure in all {
            if distinct.len() < n && !distinct.iter().any(|(_, m)| *m == failure.1) {
                distinct.push(failure);
            }
        }
        distinct
    }

    fn fds(census: &Census) -> usize {
        census.values().sum()
    }

    /// Every check, passed or not.
    pub(crate) fn checks(&self) -> Vec<Check> {
        let idle = self.clients.iter().filter(|c| c.requests == 0).count();
        let exact = self.downloads.iter().filter(|d| d.exact).count();
        let growth_kib = self.rss_end_kib.saturating_sub(self.rss_warm_kib);
        let answered = [self.answers(0), self.answers(1)];
        vec![
            Check {
                name: "requests",
                ok: self.failures() == 0 && self.requests() > 0 && idle == 0 && !self.clients.is_empty(),
                detail: format!("{} failed of {}; {idle} of {} clients never answered", self.failures(), self.requests(), self.clients.len()),
            },
            Check {
                name: "swaps",
                ok: answered.iter().all(|n| *n > 0) && self.swaps_logged > 0 && self.unsettled.is_none(),
                detail: match &self.unsettled {
                    None => format!("{} swaps logged; both versions answered; the last build serves", self.swaps_logged),
                    Some(e) => format!("{} swaps logged; {e}", self.swaps_logged),
                },
            },
            Check {
                name: "downloads",
                ok: !self.downloads.is_empty() && exact == self.downloads.len(),
                detail: format!("{exact} of {} byte-exact", self.downloads.len()),
            },
            Check {
                name: "rss",
                ok: self.rss_warm_kib > 0 && growth_kib <= self.rss_limit_kib,
                detail: format!("{:+.1} MiB after warm-up, limit +{:.0} MiB", signed_mib(self.rss_warm_kib, self.rss_end_kib), mib(self.rss_limit_kib)),
            },
            Check {
                name: "libraries",
                ok: self.mapped_end == 1,
                detail: format!("plugin libraries mapped at the end: {}", self.mapped_end),
            },
            Check {
                name: "fds",
                ok: !self.fds_before.is_empty() && self.fds_after == self.fds_before,
                detail: format!(
                    "{} before the clients, {} after them{}",
                    Summary::fds(&self.fds_before),
                    Summary::fds(&self.fds_after),
                    census_diff(&self.fds_before, &self.fds_after).map(|d| format!(" ({d})")).unwrap_or_default()
                ),
            },
            Check {
                name: "log",
                ok: self.log_problems.is_none(),
                detail: self.log_problems.clone().unwrap_or_else(|| "no warnings or errors".into()),
            },
        ]
    }

    /// Names of the checks that failed.
    pub(crate) fn failed(&self) -> Vec<&'static str> {
        self.checks().into_iter().filter(|c| !c.ok).map(|c| c.name).collect()
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn signed_mib(from_kib: u64, to_kib: u64) -> f64 {
    mib(to_kib) - mib(from_kib)
}

/// `min-max` of `values` with `decimals` (just the value if they are all equal).
fn range(values: &[f64], decimals: usize) -> String {
    if values.is_empty() {
        return "-".into();
    }
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = (format!("{min:.decimals$}"), format!("{max:.decimals$}"));
    if lo == hi { lo } else { format!("{lo}-{hi}") }
}

/// What changed between two fd censuses (`socket +2, pipe -1`), or None if nothing did.
fn census_diff(before: &Census, after: &Census) -> Option<String> {
    let mut kinds: Vec<&String> = before.keys().chain(after.keys()).collect();
    kinds.sort();
    kinds.dedup();
    let changes: Vec<String> = kinds
        .into_iter()
        .filter_map(|k| {
            let d = *after.get(k).unwrap_or(&0) as i64 - *before.get(k).unwrap_or(&0) as i64;
            (d != 0).then(|| format!("{k} {d:+}"))
        })
        .collect();
    (!changes.is_empty()).then(|| changes.join(", "))
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b] = &self.versions;
        writeln!(
            f,
            "== soak: {:.1} s, {} keep-alive clients, a rename every {} ms, downloads of {} B at {} B/s",
            self.elapsed.as_secs_f64(),
            self.clients.len(),
            self.swap_every.as_millis(),
            self.download_size,
            self.download_rate
        )?;
        writeln!(
            f,
            "requests   {} sent ({a} answered {}, {b} {}), {} failed, {} connections opened",
            self.requests(),
            self.answers(0),
            self.answers(1),
            self.failures(),
            self.connections()
        )?;
        writeln!(f, "swaps      {} renames, {} swaps logged by the host", self.renames, self.swaps_logged)?;
        let bytes: u64 = self.downloads.iter().map(|d| d.received).sum();
        let exact = self.downloads.iter().filter(|d| d.exact).count();
        let secs: Vec<f64> = self.downloads.iter().map(|d| d.elapsed.as_secs_f64()).collect();
        let renames: Vec<f64> = self.downloads.iter().map(|d| d.swaps as f64).collect();
        writeln!(
            f,
            "downloads  {} ({exact} byte-exact), {bytes} B in all; each {} s long, across {} renames",
            self.downloads.len(),
            range(&secs, 1),
            range(&renames, 0)
        )?;
        writeln!(
            f,
            "RSS        {:.1} MiB after warm-up, {:.1} MiB at the end ({:+.1} MiB)",
            mib(self.rss_warm_kib),
            mib(self.rss_end_kib),
            signed_mib(self.rss_warm_kib, self.rss_end_kib)
        )?;
        let during: Vec<String> = self.rss_during_kib.iter().map(|k| format!("{:.1}", mib(*k))).collect();
        writeln!(f, "RSS        through the load, MiB: {}", during.join(", "))?;
        writeln!(
            f,
            "fds        {} without clients before, {} with all clients connected, {} after",
            Summary::fds(&self.fds_before),
            self.fds_during,
            Summary::fds(&self.fds_after)
        )?;
        writeln!(f, "libraries  {} mapped at the end", self.mapped_end)?;
        for (at, message) in self.first_failures(10) {
            writeln!(f, "failure     first at {:.3} s: {message}", at.as_secs_f64())?;
        }
        for d in self.downloads.iter().filter(|d| !d.exact) {
            writeln!(f, "download failed: {} B received: {}", d.received, d.error.as_deref().unwrap_or("short"))?;
        }
        for check in self.checks() {
            writeln!(f, "check {:<10} {} ({})", check.name, if check.ok { "ok" } else { "FAILED" }, check.detail)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passing() -> Summary {
        let client = ClientStats { requests: 10, versions: [5, 5], connections: 1, ..ClientStats::default() };
        let download = Download { received: 100, exact: true, error: None, elapsed: Duration::from_secs(1), swaps: 10 };
        let census: Census = [("socket".to_owned(), 3), ("anon_inode:[eventpoll]".to_owned(), 4)].into();
        Summary {
            versions: ["a".into(), "b".into()],
            rss_limit_kib: 10 << 10,
            clients: vec![client],
            renames: 10,
            swaps_logged: 10,
            downloads: vec![download],
            rss_warm_kib: 30 << 10,
            rss_end_kib: 31 << 10,
            fds_before: census.clone(),
            fds_after: census,
            mapped_end: 1,
            ..Summary::default()
        }
    }

    fn fails_only(name: &str, change: impl FnOnce(&mut Summary)) {
        let mut s = passing();
        change(&mut s);
        assert_eq!(s.failed(), vec![name], "{s}");
    }

    #[test]
    fn a_clean_run_passes() {
        let s = passing();
        assert!(s.failed().is_empty(), "{s}");
        assert!(s.to_string().contains("check fds        ok"), "{s}");
    }

    #[test]
    fn each_problem_fails_its_check() {
        fails_only("requests", |s| s.clients[0].fail(Duration::ZERO, "connection closed by the server".into()));
        fails_only("requests", |s| s.clients.push(ClientStats::default()));
        fails_only("swaps", |s| s.clients[0].versions = [10, 0]);
        fails_only("swaps", |s| s.unsettled = Some("b never answered".into()));
        fails_only("downloads", |s| s.downloads[0].exact = false);
        fails_only("downloads", |s| s.downloads.clear());
        fails_only("rss", |s| s.rss_end_kib = s.rss_warm_kib + (10 << 10) + 1);
        fails_only("libraries", |s| s.mapped_end = 2);
        fails_only("libraries", |s| s.mapped_end = 0);
        fails_only("fds", |s| *s.fds_after.get_mut("socket").unwrap() += 1);
        fails_only("log", |s| s.log_problems = Some("WARN generation still mapped".into()));
    }

    #[test]
    fn ranges_collapse_when_equal() {
        assert_eq!(range(&[5.01, 4.98], 1), "5.0");
        assert_eq!(range(&[49.0, 51.0, 50.0], 0), "49-51");
        assert_eq!(range(&[], 0), "-");
    }

    #[test]
    fn census_diff_names_what_changed() {
        let before: Census = [("socket".to_owned(), 3), ("pipe".to_owned(), 1)].into();
        let after: Census = [("socket".to_owned(), 5), ("/dev/null".to_owned(), 1)].into();
        assert_eq!(census_diff(&before, &after).as_deref(), Some("/dev/null +1, pipe -1, socket +2"));
        assert_eq!(census_diff(&before, &before), None);
    }
}
