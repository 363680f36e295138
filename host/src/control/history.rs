//! The generation history: every build that became current, and every one refused, most
//! recent last, each list bounded. What `GET /status` shows, what a rollback goes back to, and
//! (through per-version totals that outlive the records) what `/metrics` counts.
//!
//! Generations and refusals are kept apart, so that a stream of refusals never pushes out the
//! record of a generation; and a generation's record leaves only once it has unloaded, when
//! its counters are final and can be folded into the per-version totals.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::SystemTime;

use semver::Version;

use crate::plugin::stats::{GenerationStats, StatusTotals, Unloaded};

/// How many generation records, and how many refusals, are kept (a generation still loaded
/// is never dropped, so there may be more of those for a while).
pub(crate) const RECORDS_KEPT: usize = 32;
/// How many of the latest generations keep a copy of their bytes for a rollback.
pub(crate) const COPIES_KEPT: usize = 4;

/// One history entry.
#[derive(Clone)]
pub(crate) struct Record {
    /// The generation's id; `None` for a refused build.
    pub(crate) generation: Option<u64>,
    /// As declared, if the build got that far.
    pub(crate) name: Option<String>,
    pub(crate) version: Option<Version>,
    /// The file it came from.
    pub(crate) file: PathBuf,
    /// SHA-256 of its bytes, once computed (off the swap path).
    pub(crate) sha256: Arc<OnceLock<String>>,
    /// When it was loaded, or refused.
    pub(crate) at: SystemTime,
    /// Why it was refused.
    pub(crate) refused: Option<String>,
    /// The generation's counters (for a generation).
    pub(crate) stats: Option<Arc<GenerationStats>>,
    /// A private copy of its bytes, kept for a rollback.
    pub(crate) kept: Option<PathBuf>,
    /// Requests it answered on a previous host process: a record handed over by `hotswap
    /// upgrade` (its generation ran there, not here).
    pub(crate) served_before: Option<u64>,
    /// A canary that was never promoted: not what a rollback goes back to.
    pub(crate) canary: bool,
}

/// Where a history entry stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum State {
    Current,
    /// Gets a share of new requests as a canary.
    Canary,
    Draining,
    Unloaded,
    /// Closed but still mapped: reported as a bug.
    StillMapped,
    /// Left loaded because its threads were stuck in plugin code.
    Leaked,
    /// Unloaded, but its file stays mapped read-only (see `Unloaded::DataMapped`).
    DataMapped,
    /// Refused: the reason is the record's `refused`.
    Refused,
    /// Ran on the host process this one replaced (`hotswap upgrade`).
    PreviousHost,
}

impl State {
    pub(crate) fn as_str(&self) -> &'static str {
        match self {
            State::Current => "current",
            State::Canary => "canary",
            State::Draining => "draining",
            State::Unloaded => "unloaded",
            State::StillMapped => "still-mapped",
            State::Leaked => "leaked",
            State::DataMapped => "unloaded-file-mapped",
            State::Refused => "refused",
            State::PreviousHost => "previous-host",
        }
    }
}

impl Record {
    /// Where it stands, given the ids of the current generation and of the canary.
    pub(crate) fn state(&self, current: u64, canary: Option<u64>) -> State {
        if self.refused.is_some() {
            return State::Refused;
        }
        if self.served_before.is_some() {
            return State::PreviousHost;
        }
        match self.stats.as_ref().and_then(|s| s.unloaded()) {
            Some(Unloaded::Unmapped) => State::Unloaded,
            Some(Unloaded::StillMapped) => State::StillMapped,
            Some(Unloaded::Leaked) => State::Leaked,
            Some(Unloaded::DataMapped) => State::DataMapped,
            None if self.generation == Some(current) => State::Current,
            None if self.generation.is_some() && self.generation == canary => State::Canary,
            None => State::Draining,
        }
    }

    /// Requests it has answered.
    pub(crate) fn requests(&self) -> u64 {
        self.stats.as_ref().map_or(self.served_before.unwrap_or(0), |s| s.requests())
    }

    /// The record as handed to the next host process.
    fn carry(&self) -> Carried {
        Carried {
            generation: self.generation,
            name: self.name.clone(),
            version: self.version.as_ref().map(ToString::to_string),
            file: self.file.clone(),
            sha256: self.sha256.get().cloned(),
            at_ms: unix_ms(self.at),
            refused: self.refused.clone(),
            requests: self.requests(),
            kept: self.kept.clone(),
            canary: self.canary,
        }
    }
}

/// A history record as one host process hands it to the next (`hotswap upgrade`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Carried {
    generation: Option<u64>,
    name: Option<String>,
    version: Option<String>,
    file: PathBuf,
    sha256: Option<String>,
    /// When, in milliseconds since the Unix epoch.
    at_ms: u64,
    refused: Option<String>,
    requests: u64,
    /// The previous host's copy of its bytes: linked into this host's own before that host
    /// exits (see `History::import`).
    kept: Option<PathBuf>,
    #[serde(default)]
    canary: bool,
}

/// The history as one host process hands it to the next.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct CarriedHistory {
    generations: Vec<Carried>,
    refusals: Vec<Carried>,
}

/// The bounded history, and the totals of records that have left it.
#[derive(Default)]
pub(crate) struct History {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Generations, oldest first.
    records: VecDeque<Record>,
    /// Refused builds, oldest first.
    refused: VecDeque<Record>,
    /// Request figures of generations whose records were dropped, by (version, status).
    retired: BTreeMap<(String, String), StatusTotals>,
    refusals: BTreeMap<&'static str, u64>,
}

impl History {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a generation that has just become current, or started as a canary. Only the
    /// latest [`COPIES_KEPT`] generations that served as current keep their copy, and only
    /// the latest canary that never did; older copies are deleted. (Canaries that come and
    /// go must not push out the copies that a rollback, or the host an upgrade starts, loads
    /// the current version from.)
    pub(crate) fn swapped_in(&self, record: Record) {
        let mut inner = self.lock();
        inner.records.push_back(record);
        inner.evict();
        let (mut copies, mut canary_copy) = (0, false);
        for old in inner.records.iter_mut().rev().filter(|r| r.kept.is_some()) {
            let keep = if old.canary {
                !std::mem::replace(&mut canary_copy, true)
            } else {
                copies += 1;
                copies <= COPIES_KEPT
            };
            if !keep {
                remove_copy(old.kept.take());
            }
        }
    }

    /// The canary `generation` was promoted: it served as the current version.
    pub(crate) fn promoted(&self, generation: u64) {
        let mut inner = self.lock();
        if let Some(record) = inner.records.iter_mut().find(|r| r.generation == Some(generation)) {
            record.canary = false;
        }
    }

    /// Records a refused build; `reason_label` is its low-cardinality kind, for metrics.
    pub(crate) fn refused(&self, record: Record, reason_label: &'static str) {
        let mut inner = self.lock();
        *inner.refusals.entry(reason_label).or_default() += 1;
        if inner.refused.len() == RECORDS_KEPT {
            inner.refused.pop_front();
        }
        inner.refused.push_back(record);
    }

    /// Every generation record, oldest first.
    pub(crate) fn records(&self) -> Vec<Record> {
        let mut inner = self.lock();
        inner.evict();
        inner.records.iter().cloned().collect()
    }

    /// The records, for the next host process.
    pub(crate) fn carry(&self) -> CarriedHistory {
        let inner = self.lock();
        CarriedHistory {
            generations: inner.records.iter().map(Record::carry).collect(),
            refusals: inner.refused.iter().map(Record::carry).collect(),
        }
    }

    /// Takes in the records of the host process this one replaces, before any of its own,
    /// but for the record of its generation `serving`, whose build this host's first
    /// generation serves on (and records). Their kept copies are linked (or copied) by
    /// `keep`, since the previous host removes its own when it exits.
    pub(crate) fn import(&self, carried: CarriedHistory, serving: u64, keep: impl Fn(&Path) -> std::io::Result<PathBuf>) {
        let record = |c: Carried| Record {
            generation: c.generation,
            name: c.name,
            version: c.version.and_then(|v| Version::parse(&v).ok()),
            file: c.file,
            sha256: Arc::new(c.sha256.map(OnceLock::from).unwrap_or_default()),
            at: SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(c.at_ms),
            refused: c.refused,
            stats: None,
            kept: c.kept.and_then(|path| match keep(&path) {
                Ok(kept) => Some(kept),
                Err(e) => {
                    tracing::debug!(file = %path.display(), "cannot keep the previous host's copy for a rollback: {e}");
                    None
                }
            }),
            served_before: Some(c.requests),
            canary: c.canary,
        };
        let generations = carried.generations.into_iter().filter(|c| c.generation != Some(serving)).map(record);
        let refusals: Vec<Record> = carried.refusals.into_iter().map(record).collect();
        let mut inner = self.lock();
        let own = std::mem::take(&mut inner.records);
        inner.records = generations.chain(own).collect();
        let own = std::mem::take(&mut inner.refused);
        inner.refused = refusals.into_iter().chain(own).collect();
        while inner.refused.len() > RECORDS_KEPT {
            inner.refused.pop_front();
        }
    }

    /// Refused builds, oldest first.
    pub(crate) fn refusals(&self) -> Vec<Record> {
        self.lock().refused.iter().cloned().collect()
    }

    /// Refusals so far, by kind.
    pub(crate) fn refusals_by_reason(&self) -> Vec<(&'static str, u64)> {
        self.lock().refusals.iter().map(|(k, v)| (*k, *v)).collect()
    }

    /// Requests by (version, status): retired totals plus every record's live counters.
    pub(crate) fn totals_by_version(&self) -> BTreeMap<(String, String), StatusTotals> {
        let inner = self.lock();
        let mut totals = inner.retired.clone();
        for record in &inner.records {
            add_record(&mut totals, record);
        }
        totals
    }

    /// The most recent generation before `current` with another version: what a rollback
    /// goes back to.
    pub(crate) fn previous(&self, current: u64, current_version: &Version) -> Option<Record> {
        let inner = self.lock();
        inner
            .records
            .iter()
            .rev()
            .filter(|r| r.generation.is_some_and(|id| id < current) && !r.canary)
            .find(|r| r.version.as_ref().is_some_and(|v| v != current_version))
            .cloned()
    }

    /// Kept copies of generations whose name and version `matches`, newest first.
    pub(crate) fn copies_of(&self, matches: impl Fn(&str, &Version) -> bool) -> Vec<(Version, PathBuf)> {
        let inner = self.lock();
        inner
            .records
            .iter()
            .rev()
            .filter(|r| matches!((&r.name, &r.version), (Some(name), Some(version)) if matches(name, version)))
            .filter_map(|r| Some((r.version.clone()?, r.kept.clone()?)))
            .collect()
    }
}

impl Inner {
    /// Drops the oldest records of unloaded generations beyond [`RECORDS_KEPT`], folding their
    /// (final) counters into the totals.
    fn evict(&mut self) {
        while self.records.len() > RECORDS_KEPT {
            let gone = |r: &Record| r.served_before.is_some() || r.stats.as_ref().is_some_and(|s| s.unloaded().is_some());
            let Some(at) = self.records.iter().position(gone) else {
                return; // all still loaded: they stay until they unload
            };
            if let Some(mut gone) = self.records.remove(at) {
                add_record(&mut self.retired, &gone);
                remove_copy(gone.kept.take());
            }
        }
    }
}

fn add_record(totals: &mut BTreeMap<(String, String), StatusTotals>, record: &Record) {
    let (Some(stats), Some(version)) = (&record.stats, &record.version) else { return };
    for (status, figures) in stats.by_status() {
        totals.entry((version.to_string(), status.to_string())).or_default().add(&figures);
    }
}

fn remove_copy(path: Option<PathBuf>) {
    if let Some(path) = path {
        let _ = std::fs::remove_file(&path);
    }
}

/// Milliseconds since the Unix epoch (0 before it), as times cross to another host process.
pub(crate) fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A refusal record for `file`.
pub(crate) fn refusal(file: &Path, name: Option<String>, version: Option<Version>, reason: String) -> Record {
    Record {
        generation: None,
        name,
        version,
        file: file.to_path_buf(),
        sha256: Arc::default(),
        at: SystemTime::now(),
        refused: Some(reason),
        stats: None,
        kept: None,
        served_before: None,
        canary: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generation(id: u64, version: &str) -> Record {
        Record {
            generation: Some(id),
            name: Some("app".into()),
            version: Some(Version::parse(version).unwrap()),
            file: PathBuf::from("app.so"),
            sha256: Arc::default(),
            at: SystemTime::now(),
            refused: None,
            stats: Some(Arc::default()),
            kept: None,
            served_before: None,
            canary: false,
        }
    }

    #[test]
    fn counters_survive_records_leaving_the_history() {
        let history = History::default();
        let first = generation(1, "1.0.0");
        first.stats.as_ref().unwrap().record(200, std::time::Duration::from_millis(1));
        let first_stats = first.stats.clone().unwrap();
        history.swapped_in(first);
        for id in 2..=(RECORDS_KEPT as u64 + 5) {
            history.swapped_in(generation(id, "2.0.0"));
        }
        assert_eq!(history.records()[0].generation, Some(1), "a loaded generation's record stays");
        first_stats.set_unloaded(Unloaded::Unmapped);
        for id in 2..=6 {
            let stats = history.records().iter().find(|r| r.generation == Some(id)).unwrap().stats.clone().unwrap();
            stats.set_unloaded(Unloaded::Unmapped);
        }
        assert_eq!(history.records().len(), RECORDS_KEPT);
        assert_ne!(history.records()[0].generation, Some(1));
        let totals = history.totals_by_version();
        assert_eq!(totals[&("1.0.0".to_owned(), "200".to_owned())].count, 1);
    }

    #[test]
    fn refusals_never_push_out_generations() {
        let history = History::default();
        history.swapped_in(generation(1, "1.0.0"));
        for _ in 0..100 {
            history.refused(refusal(Path::new("bad.so"), None, None, "bad".into()), "not_a_library");
        }
        assert_eq!(history.records().len(), 1);
        assert_eq!(history.refusals().len(), RECORDS_KEPT);
        assert_eq!(history.refusals_by_reason(), vec![("not_a_library", 100)]);
    }

    #[test]
    fn canaries_that_come_and_go_keep_no_copy_from_the_current_version() {
        let dir = std::env::temp_dir().join(format!("hotswap-history-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kept = |id: u64, canary: bool| {
            let copy = dir.join(format!("{id}.so"));
            std::fs::write(&copy, b"bytes").unwrap();
            Record { kept: Some(copy), canary, ..generation(id, "1.0.0") }
        };
        let history = History::default();
        history.swapped_in(kept(1, false));
        for id in 2..=(COPIES_KEPT as u64 + 3) {
            history.swapped_in(kept(id, true));
        }
        let copies: Vec<_> = history.records().iter().filter(|r| r.kept.is_some()).map(|r| r.generation).collect();
        assert_eq!(copies, [Some(1), Some(COPIES_KEPT as u64 + 3)], "the current version's copy and the latest canary's");
        assert!(dir.join("1.so").exists() && !dir.join("2.so").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn previous_skips_the_current_version() {
        let history = History::default();
        history.swapped_in(generation(1, "1.0.0"));
        history.swapped_in(generation(2, "2.0.0"));
        history.swapped_in(generation(3, "2.0.0"));
        let previous = history.previous(3, &Version::parse("2.0.0").unwrap()).unwrap();
        assert_eq!(previous.generation, Some(1));
        assert!(history.previous(1, &Version::parse("1.0.0").unwrap()).is_none());
    }
}
