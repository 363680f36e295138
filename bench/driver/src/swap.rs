//! Swapping plugins the way a deploy does: a complete file renamed into the watched directory.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How long a swap (or the unload after it) may take before the run gives up: far beyond
/// the milliseconds one takes, so that only a broken swap, never a busy machine, stops it.
pub(crate) const SWAP_WAIT: Duration = Duration::from_secs(30);

/// One build of the example handler and the version it answers with.
#[derive(Debug, Clone)]
pub(crate) struct Build {
    pub(crate) file: PathBuf,
    pub(crate) version: String,
}

/// Alternates two builds into `dir/example.so`.
pub(crate) struct Swapper {
    builds: [Build; 2],
    staging: PathBuf,
    target: PathBuf,
    next: usize,
    prepared: Option<usize>,
    pub(crate) swaps: u64,
}

impl Swapper {
    /// `staging` must be on the same filesystem as `dir` (rename is atomic only there).
    pub(crate) fn new(builds: [Build; 2], dir: &Path, staging: &Path) -> Swapper {
        Swapper { builds, staging: staging.join("example.so"), target: dir.join("example.so"), next: 1, prepared: None, swaps: 0 }
    }

    /// Puts the first build in place, before the host starts.
    pub(crate) fn install_first(&self) -> Result<&Build> {
        std::fs::copy(&self.builds[0].file, &self.target).with_context(|| format!("cannot copy to {}", self.target.display()))?;
        Ok(&self.builds[0])
    }

    /// Copies the next build next to the directory (not timed: a deploy copies first).
    pub(crate) fn prepare(&mut self) -> Result<&Build> {
        let i = self.next;
        std::fs::copy(&self.builds[i].file, &self.staging).with_context(|| format!("cannot copy to {}", self.staging.display()))?;
        self.prepared = Some(i);
        Ok(&self.builds[i])
    }

    /// Renames the prepared file into the directory; returns when that happened.
    pub(crate) fn publish(&mut self) -> Result<Instant> {
        let Some(i) = self.prepared.take() else { bail!("nothing prepared") };
        std::fs::rename(&self.staging, &self.target).context("rename into the plugin directory")?;
        let at = Instant::now();
        self.next = 1 - i;
        self.swaps += 1;
        Ok(at)
    }

    /// Prepares, publishes and waits (up to [`SWAP_WAIT`]) for the first answer from the new
    /// version, polling on a fresh connection each time. Returns when the rename happened and
    /// how long after it the first new answer came.
    pub(crate) fn swap(&mut self, client: &Client, url: &str) -> Result<(Instant, Duration)> {
        let version = self.prepare()?.version.clone();
        let at = self.publish()?;
        loop {
            if client.version(url).as_deref() == Some(version.as_str()) {
                return Ok((at, at.elapsed()));
            }
            if at.elapsed() > SWAP_WAIT {
                bail!("version {version} not served {SWAP_WAIT:?} after the rename");
            }
        }
    }
}

/// An HTTP client that opens a fresh connection per request, as a new visitor would.
pub(crate) struct Client(ureq::Agent);

impl Client {
    pub(crate) fn new() -> Client {
        Client(ureq::AgentBuilder::new().max_idle_connections(0).timeout(Duration::from_secs(2)).build())
    }

    /// Whether `GET url` answers 200.
    pub(crate) fn answers(&self, url: &str) -> bool {
        self.0.get(url).call().is_ok_and(|r| r.status() == 200)
    }

    /// The `version=` line of `GET url`, or None if the request failed.
    pub(crate) fn version(&self, url: &str) -> Option<String> {
        let body = self.0.get(url).call().ok()?.into_string().ok()?;
        body.lines().find_map(|l| l.strip_prefix("version=")).map(|v| v.split_whitespace().next().unwrap_or("").to_owned())
    }
}
