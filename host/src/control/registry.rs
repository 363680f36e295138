//! The registry: which generation is current, which older ones are still draining, and every
//! change of the current one (a new build, a reload, a pin, a rollback), one at a time.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant, SystemTime};

use semver::Version;
use serde::{Deserialize, Serialize};

use crate::control::builds::{self, Build, Builds, Pin, PinnedBy, PluginSource, Serving};
use crate::control::canary::{self, CanaryPolicy, Verdict, Window};
use crate::control::history::{self, CarriedHistory, History, Record};
use crate::plugin::budget::Budget;
use crate::plugin::loader::{Identity, LoadError};
use crate::plugin::route::{Canary, Share};
use crate::plugin::{Candidate, Current, Generation, GenerationError, LoadOptions};

/// No candidate could be loaded at startup.
#[derive(Debug, thiserror::Error)]
#[error("no loadable plugin{}", .0.iter().map(|r| format!("\n  - {r}")).collect::<String>())]
pub(crate) struct StartError(pub Vec<String>);

/// Why a host that takes over from another (`hotswap upgrade`) cannot load the build that
/// one serves.
#[derive(Debug, thiserror::Error)]
enum InheritError {
    #[error(transparent)]
    Load(#[from] GenerationError),
    #[error(
        "{path} no longer holds the build the previous host serves (it was replaced since), and that host has no \
         copy of it left: the new host would serve other code. The previous host keeps serving; let it load a \
         build of that path first (or pin one), then upgrade again"
    )]
    Replaced { path: PathBuf },
}

/// A change that could not even be tried.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ChangeError {
    #[error("no build of version {version} is known (in {dir} or kept from earlier generations); known versions: {known}")]
    UnknownVersion { version: Version, dir: PathBuf, known: String },
    #[error("nothing to roll back to: no earlier generation served a version other than {current}")]
    NothingToRollBackTo { current: Version },
    #[error("no build should replace {current} (none is newer, a pin holds it, or the newer ones were refused or rolled back): give the version to start as a canary, `hotswap canary VERSION`")]
    NothingToCanary { current: String },
    #[error("no canary runs: start one with `hotswap canary VERSION --percent 10`")]
    NoCanary,
    #[error("{current} serves already: a canary must be another version (`hotswap status` lists the builds known)")]
    ServesAlready { current: String },
}

/// A generation, as the admin API shows it in an outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Brief {
    pub(crate) generation: u64,
    pub(crate) name: String,
    pub(crate) version: String,
    /// As text (lossy, if the path is not UTF-8).
    pub(crate) file: String,
}

impl Brief {
    fn of(generation: &Generation) -> Brief {
        Brief {
            generation: generation.id(),
            name: generation.name().to_owned(),
            version: generation.version().to_string(),
            file: generation.source().to_string_lossy().into_owned(),
        }
    }
}

/// What a change did. A reload, pin, rollback or unpin answers with this once the swap has
/// happened or was refused.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub(crate) enum Outcome {
    /// A new generation is current. `refused` lists builds tried before it.
    Swapped { from: Brief, to: Brief, refused: Vec<String> },
    /// Nothing better to serve (or it serves already).
    Unchanged { serving: Brief, reason: String },
    /// Every build that should have served was refused; `serving` keeps serving.
    Refused { serving: Brief, refused: Vec<String> },
    /// A canary runs: `canary` gets `percent` of new requests, `serving` the rest.
    /// `refused` lists builds tried before it.
    Canary { serving: Brief, canary: Brief, percent: f64, refused: Vec<String> },
    /// The canary was rolled back: its build is refused, and `serving` serves every request.
    RolledBack { serving: Brief, canary: Brief, reason: String },
}

/// Host-wide events, by kind.
#[derive(Debug, Default)]
pub(crate) struct Events {
    /// Swaps: a new generation became current.
    pub(crate) swaps: AtomicU64,
    /// Responses cut off because their generation's drain timeout passed.
    pub(crate) aborted_by_drain_timeout: AtomicU64,
    /// Responses cut off because too many generations were loaded (`--max-generations`).
    pub(crate) aborted_by_generation_cap: AtomicU64,
    /// Canaries promoted, and rolled back (by their figures or by the operator).
    pub(crate) canary_promotions: AtomicU64,
    pub(crate) canary_rollbacks: AtomicU64,
}


/// What a host process hands the one that replaces it (`hotswap upgrade`): the new one
/// serves the same build, under the same pin, with the same history, numbering generations on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Inheritance {
    /// The file the current generation was loaded from (a build, or a kept copy).
    pub(crate) serving: PathBuf,
    /// The previous host's copy of the bytes it serves, if it kept one: what the new host
    /// loads, since `serving` may have been written over since (it names the build).
    pub(crate) kept: Option<PathBuf>,
    /// The previous host's current generation: the new host's first generation takes over its
    /// history record.
    pub(crate) generation: u64,
    /// The identity of the build's file, as the previous host read it (`None` for a time
    /// before 1970, which cannot be sent).
    pub(crate) identity: Option<Identity>,
    pub(crate) pin: Option<InheritedPin>,
    pub(crate) history: CarriedHistory,
    /// Builds the previous host refused to start, as they were then: the new host does not
    /// try them again until a reload (or a new file), as that one would not have.
    #[serde(default)]
    pub(crate) refused: Vec<(PathBuf, Identity)>,
    /// Files the previous host could not read as builds, as they were then: the new host
    /// neither reads them again nor records their refusals a second time.
    #[serde(default)]
    pub(crate) unreadable: Vec<(PathBuf, Identity)>,
    /// The id of the generation the new host starts.
    pub(crate) next_id: u64,
    /// Builds rolled back as canaries, as they were then: the new host keeps them out too.
    #[serde(default)]
    pub(crate) rolled_back: Vec<(PathBuf, Identity)>,
}

/// A pin, as handed over.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct InheritedPin {
    name: String,
    version: String,
    /// `pin` or `rollback`.
    by: String,
}

/// What a build that starts becomes.
#[derive(Debug, Clone, Copy)]
enum Then {
    /// The current generation.
    Swap(Handoff),
    /// The canary, with this share.
    Canary(Share),
}

/// Whether a build that refuses the state handed to it is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handoff {
    /// It is: a new build must take over what the old one had.
    Required,
    /// It is started again without it: a rollback or a pin, the way back.
    Optional,
}

/// How long after a swap the build's SHA-256 is computed.
const HASH_DELAY: Duration = Duration::from_secs(1);

/// The current generation and the history of resident ones.
pub(crate) struct Registry {
    current: Arc<Current>,
    resident: Mutex<Vec<Weak<Generation>>>,
    next_id: AtomicU64,
    options: LoadOptions,
    drain_timeout: Duration,
    /// The most generations loaded at once (`--max-generations`).
    max_generations: u64,
    budget: Budget,
    source: PluginSource,
    builds: Mutex<Builds>,
    /// Files that could not be read as builds, as they were then: a reload tries them again
    /// (what was wrong may have been fixed in place) but reports only new failures.
    unreadable: Mutex<HashMap<PathBuf, Identity>>,
    pin: Mutex<Option<Pin>>,
    history: History,
    events: Arc<Events>,
    /// Changes are made one at a time (the watcher, SIGHUP and the admin API all change).
    /// A host upgrade holds it too, from the state it hands over until it is done.
    changing: Arc<tokio::sync::Mutex<()>>,
    /// How canaries run and are judged.
    policy: CanaryPolicy,
    /// The canary in progress, if any (also in `current`, which routes to it).
    canary: Mutex<Option<CanaryRun>>,
}

/// A canary in progress.
struct CanaryRun {
    canary: Arc<Canary>,
    /// The build it was loaded from: refused if it is rolled back.
    file: PathBuf,
    started: Instant,
    /// The current generation's figures when the canary started: both are judged over the
    /// same window.
    current_start: Window,
}

/// A canary in progress, as `hotswap status` shows it.
#[derive(Debug, Clone)]
pub(crate) struct CanaryProgress {
    pub(crate) generation: Arc<Generation>,
    pub(crate) share: Share,
    pub(crate) sticky: Option<String>,
    pub(crate) elapsed: Duration,
    /// Its figures, and the current version's, since it started.
    pub(crate) canary: Window,
    pub(crate) current: Window,
    pub(crate) verdict: Verdict,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Registry {
    /// Reads every build in `source` and starts the one that should serve (the highest
    /// version; see `builds`), falling back to the next on failure. The server does not start
    /// without one; the error lists every refusal.
    ///
    /// With an `inheritance` (this host replaces another), it starts the build that host
    /// serves, and nothing else: if that fails, the error says why, and the other host goes on.
    pub(crate) async fn start(
        source: PluginSource,
        options: LoadOptions,
        drain_timeout: Duration,
        max_generations: u64,
        policy: CanaryPolicy,
        inheritance: Option<Inheritance>,
    ) -> Result<Registry, StartError> {
        let first_id = inheritance.as_ref().map_or(1, |i| i.next_id);
        let registry = |first: Arc<Generation>, builds: Builds, unreadable, history: History| Registry {
            resident: Mutex::new(vec![Arc::downgrade(&first)]),
            current: Arc::new(Current::new(first)),
            next_id: AtomicU64::new(first_id + 1),
            options: options.clone(),
            drain_timeout,
            max_generations,
            budget: Budget::default(),
            source: source.clone(),
            builds: Mutex::new(builds),
            unreadable: Mutex::new(unreadable),
            pin: Mutex::new(None),
            history,
            events: Arc::default(),
            changing: Arc::new(tokio::sync::Mutex::new(())),
            policy: policy.clone(),
            canary: Mutex::new(None),
        };
        let (history, mut builds, mut refusals) = (History::default(), Builds::default(), Vec::new());
        // What could not be read, as `read_build` keeps it: the watcher's first scan then
        // finds it read, and does not refuse (and record) it a second time.
        let mut unreadable = HashMap::new();
        // Every build is read; the best so far stays open, so the one that serves is not
        // loaded twice.
        let mut best: Option<Candidate> = None;
        let known_unreadable = inheritance.as_ref().map_or(&[][..], |i| &i.unreadable[..]);
        for (file, identity) in source.scan() {
            if known_unreadable.iter().any(|(f, i)| *f == file && *i == identity) {
                unreadable.insert(file, identity);
                continue;
            }
            match Candidate::open(&file, &options).await {
                Ok(candidate) => {
                    builds.insert(build_of(&candidate));
                    if builds.better_than(None, None).first().is_some_and(|b| b.file == file) {
                        best = Some(candidate);
                    }
                }
                Err(e) => {
                    history.refused(history::refusal(&file, None, None, e.to_string()), e.kind());
                    refusals.push(e.to_string());
                    if !matches!(e, GenerationError::Load(LoadError::Incomplete { .. })) {
                        unreadable.insert(file, identity);
                    }
                }
            }
        }
        if let Some(inheritance) = inheritance {
            drop(best);
            let pin = inheritance.pin.as_ref().and_then(|p| {
                let by = if p.by == "rollback" { PinnedBy::Rollback } else { PinnedBy::Pin };
                Some(Pin { name: p.name.clone(), version: Version::parse(&p.version).ok()?, by })
            });
            let first = start_inherited(&inheritance, &options, first_id).await.map_err(|e| StartError(vec![e.to_string()]))?;
            tracing::info!(
                generation = first.id(), plugin = %first.label(), file = %inheritance.serving.display(),
                "plugin loaded (the build the previous host serves)"
            );
            history.import(inheritance.history, inheritance.generation, |kept| options.shadow.keep_from(kept));
            for (file, identity) in &inheritance.refused {
                if builds.get(file, *identity).is_some() {
                    builds.mark_refused(file);
                }
            }
            for (file, identity) in &inheritance.rolled_back {
                builds.mark_rolled_back(file, *identity);
            }
            let registry = registry(first.clone(), builds, unreadable, history);
            *lock(&registry.pin) = pin;
            registry.record_swap(&first, false);
            return Ok(registry);
        }
        // Started pinned (`--pin`): the build of that version, if there is one.
        let pin = policy.start_pin.as_ref().and_then(|version| {
            let Some(build) = builds.all().find(|b| builds::is_version(&b.version, version)) else {
                tracing::warn!(version = %version, "--pin {version}: no build of that version is here; the highest version serves, unpinned");
                return None;
            };
            Some(Pin { name: build.name.clone(), version: version.clone(), by: PinnedBy::Pin })
        });
        for build in builds.better_than(None, pin.as_ref()) {
            let candidate = match best.take() {
                Some(c) if c.source() == build.file => Ok(c),
                _ => Candidate::open(&build.file, &options).await,
            };
            let started = match candidate {
                Ok(candidate) => candidate.start(first_id, &options, None).await,
                Err(e) => Err(e),
            };
            match started {
                Ok(first) => {
                    tracing::info!(generation = first.id(), plugin = %first.label(), file = %build.file.display(), "plugin loaded");
                    for r in &refusals {
                        tracing::warn!("refused: {r}");
                    }
                    let registry = registry(first.clone(), builds, unreadable, history);
                    if let Some(pin) = pin {
                        tracing::info!(version = %pin.version, "pinned (--pin): newer builds do not replace it until `hotswap unpin`");
                        *lock(&registry.pin) = Some(pin);
                    }
                    registry.record_swap(&first, false);
                    return Ok(registry);
                }
                Err(e) => {
                    history.refused(
                        history::refusal(&build.file, Some(build.name.clone()), Some(build.version.clone()), e.to_string()),
                        e.kind(),
                    );
                    builds.mark_refused(&build.file);
                    refusals.push(e.to_string());
                }
            }
        }
        if refusals.is_empty() {
            refusals.push(format!("no plugin file at {}: put a build there first", source.location().display()));
        }
        Err(StartError(refusals))
    }

    /// What the host process that replaces this one needs to serve on where it stands.
    /// Take it under [`Registry::hold_changes`], held until that process serves or failed:
    /// a change made in between would not reach it.
    pub(crate) fn inheritance(&self) -> Inheritance {
        let current = self.current();
        let kept = self.history.records().into_iter().find(|r| r.generation == Some(current.id())).and_then(|r| r.kept);
        let (refused, rolled_back) = {
            let builds = lock(&self.builds);
            let sent = |b: &Build| (b.file.clone(), b.identity);
            let sendable = || builds.all().filter(|b| b.identity.sendable());
            (sendable().filter(|b| b.refused).map(sent).collect(), sendable().filter(|b| b.rolled_back).map(sent).collect())
        };
        Inheritance {
            serving: current.source().to_path_buf(),
            kept,
            generation: current.id(),
            identity: Some(current.identity()).filter(Identity::sendable),
            pin: self.pin().map(|p| InheritedPin { name: p.name, version: p.version.to_string(), by: p.by.to_string() }),
            history: self.history.carry(),
            refused,
            unreadable: lock(&self.unreadable)
                .iter()
                .filter(|(_, identity)| identity.sendable())
                .map(|(file, identity)| (file.clone(), *identity))
                .collect(),
            next_id: self.next_id.load(Ordering::Relaxed),
            rolled_back,
        }
    }

    /// Holds every change (swaps, reloads, pins) back while the guard lives: a host upgrade
    /// hands over the state as it is, and what this host does after that is lost.
    pub(crate) async fn hold_changes(&self) -> tokio::sync::OwnedMutexGuard<()> {
        self.changing.clone().lock_owned().await
    }

    /// Swaps in the build that should serve, if it is not serving: for a host that took over
    /// from another and may have found newer builds than that one served.
    pub(crate) async fn settle(&self) -> Outcome {
        let _changing = self.changing.lock().await;
        self.converge(None).await
    }

    /// The generation new requests go to.
    pub(crate) fn current(&self) -> Arc<Generation> {
        self.current.load()
    }

    /// The cell the server reads the current generation from.
    pub(crate) fn current_cell(&self) -> Arc<Current> {
        self.current.clone()
    }

    /// The pin in force, if any.
    pub(crate) fn pin(&self) -> Option<Pin> {
        lock(&self.pin).clone()
    }

    pub(crate) fn history(&self) -> &History {
        &self.history
    }

    pub(crate) fn events(&self) -> &Events {
        &self.events
    }

    /// Where plugins come from.
    pub(crate) fn source(&self) -> &PluginSource {
        &self.source
    }

    /// Every build known in the plugin directory, highest version first.
    pub(crate) fn builds(&self) -> Vec<Build> {
        let mut builds = lock(&self.builds);
        builds.prune();
        let mut all: Vec<Build> = builds.all().cloned().collect();
        all.sort_by(builds::highest_first);
        all
    }

    /// Logs and records that `file` was not swapped in; `kind` labels the refusal in metrics.
    pub(crate) fn refuse(&self, file: &Path, kind: &'static str, reason: &str, build: Option<&Build>) {
        let current = self.current();
        tracing::warn!(
            file = %file.display(),
            "refused plugin candidate: {reason}; generation {} ({}) keeps serving", current.id(), current.label()
        );
        let (name, version) = build.map(|b| (b.name.clone(), b.version.clone())).unzip();
        self.history.refused(history::refusal(file, name, version, reason.to_owned()), kind);
    }

    /// A new or changed file in the plugin directory (the watcher): reads its declaration and
    /// swaps it in if it should serve (see `builds`). A file still being written comes back
    /// as `LoadError::Incomplete`, unrecorded: the watcher waits for its writer. Other errors
    /// have been recorded.
    pub(crate) async fn offer(&self, file: &Path) -> Result<Outcome, GenerationError> {
        let _changing = self.changing.lock().await;
        let current = self.current();
        let Some(identity) = Identity::of(file) else {
            return Ok(self.unchanged(format!("{} is gone", file.display())));
        };
        if current.source() == file && current.identity() == identity {
            return Ok(self.unchanged("it serves already".into()));
        }
        let known = lock(&self.builds).get(file, identity).cloned();
        let (build, held) = match known {
            Some(build) => (build, None),
            None => {
                let candidate = self.read_build(file, identity).await.map_err(|(e, _)| e)?;
                (build_of(&candidate), Some(candidate))
            }
        };
        let outcome = self.converge(held).await;
        let held = self.policy.hold && builds::replaces(&build, &serving(&self.current()), self.pin().as_ref());
        if self.canary_of(&build).is_some() || held {
            // It says why: the build is the canary, or held.
            if let Outcome::Unchanged { reason, .. } = &outcome {
                tracing::info!(file = %file.display(), "{reason}");
            }
            return Ok(outcome);
        }
        if let Outcome::Unchanged { .. } = outcome {
            let current = self.current();
            let reason = builds::why_not(&build, &serving(&current), self.pin().as_ref());
            tracing::info!(file = %file.display(), "{reason}");
            return Ok(self.unchanged(reason));
        }
        Ok(outcome)
    }

    /// Whether the file at `path`, as `identity`, has been read: it is a known build, was
    /// refused, or is what serves.
    pub(crate) fn has_read(&self, path: &Path, identity: Identity) -> bool {
        self.is_known(path, identity) || lock(&self.unreadable).get(path) == Some(&identity)
    }

    /// Whether the file at `path`, as `identity`, is a known build or what serves.
    fn is_known(&self, path: &Path, identity: Identity) -> bool {
        lock(&self.builds).get(path, identity).is_some() || self.current().identity() == identity
    }

    /// Reads the plugin directory again, retries builds refused before (what was wrong may
    /// have been fixed in place), and swaps in the build that should serve, if it is not
    /// serving. Answers once that has happened or was refused.
    pub(crate) async fn reload(&self) -> Outcome {
        let _changing = self.changing.lock().await;
        lock(&self.builds).forget_refusals();
        let mut refused = Vec::new();
        for (file, identity) in self.source.scan() {
            if self.is_known(&file, identity) {
                continue;
            }
            match self.read_build(&file, identity).await {
                Ok(_) => {}
                Err((GenerationError::Load(LoadError::Incomplete { .. }), _)) => {
                    tracing::debug!(file = %file.display(), "reload: still being written; the watcher loads it once complete");
                }
                // Said again even if recorded before: the operator asked for this try.
                Err((e, _)) => refused.push(e.to_string()),
            }
        }
        match self.converge(None).await {
            Outcome::Swapped { from, to, refused: more } => {
                refused.extend(more);
                Outcome::Swapped { from, to, refused }
            }
            Outcome::Refused { serving, refused: more } => {
                refused.extend(more);
                Outcome::Refused { serving, refused }
            }
            Outcome::Canary { serving, canary, percent, refused: more } => {
                refused.extend(more);
                Outcome::Canary { serving, canary, percent, refused }
            }
            unchanged if refused.is_empty() => unchanged,
            _ => Outcome::Refused { serving: Brief::of(&self.current()), refused },
        }
    }

    /// Serves `version` (a build of it from the plugin directory, or a kept copy of an
    /// earlier generation) and holds it: newer builds are not swapped in until `unpin`.
    pub(crate) async fn pin_version(&self, version: Version) -> Result<Outcome, ChangeError> {
        let _changing = self.changing.lock().await;
        let read = self.read_new_files().await;
        let current = self.current().name().to_owned();
        // The plugin serving, if it has a build of that version; else the plugin that has.
        let own = |name: &str, v: &Version| name == current && builds::is_version(v, &version);
        let name = match self.sources_of(&version, None, own) {
            Ok(_) => current,
            Err(_) => self.name_of_version(&version).unwrap_or(current),
        };
        let pinned = self.switch_to(Pin { name, version, by: PinnedBy::Pin }, None).await;
        self.after_order(read, pinned).await
    }

    /// What an order that read new files (`read_new_files`) ends in. Those files the watcher
    /// takes as handled: if the order failed, what it read serves, if it should, as if offered.
    async fn after_order(&self, read: bool, done: Result<Outcome, ChangeError>) -> Result<Outcome, ChangeError> {
        if done.is_err() && read {
            self.converge(None).await;
        }
        done
    }

    /// Reads the complete files of the plugin directory not read yet: a build just dropped in,
    /// which the watcher has not come to, is one an operator's order may name. (Refusals are
    /// logged and recorded as the watcher's would be.)
    /// Returns whether it read a build.
    async fn read_new_files(&self) -> bool {
        let mut read = false;
        for (file, identity) in self.source.scan() {
            if self.has_read(&file, identity) {
                continue;
            }
            match self.read_build(&file, identity).await {
                Ok(_) => read = true,
                // No room to load more now: the watcher tries again at its next change.
                Err((GenerationError::GenerationCap { .. }, _)) => break,
                Err(_) => {}
            }
        }
        read
    }

    /// The plugin that has a build (or a kept copy) of `version`, if one has.
    fn name_of_version(&self, version: &Version) -> Option<String> {
        let in_dir = lock(&self.builds).all().find(|b| builds::is_version(&b.version, version)).map(|b| b.name.clone());
        in_dir.or_else(|| {
            let records = self.history.records();
            records.into_iter().filter(|r| r.kept.is_some()).find(|r| r.version.as_ref().is_some_and(|v| builds::is_version(v, version)))?.name
        })
    }

    /// Goes back to the version served before the current one (its kept copy, or a build of
    /// it in the plugin directory), and pins it.
    pub(crate) async fn rollback(&self) -> Result<Outcome, ChangeError> {
        let _changing = self.changing.lock().await;
        if let Some(rolled_back) = self.roll_back_canary("the operator rolled it back".into()) {
            return Ok(rolled_back); // what is newest is the canary: it goes, the current one stays
        }
        let current = self.current();
        // The previous generation's record: a generation's always has a name and a version.
        let Some(Record { name: Some(name), version: Some(version), kept, .. }) = self.history.previous(current.id(), current.version())
        else {
            return Err(ChangeError::NothingToRollBackTo { current: current.version().clone() });
        };
        self.switch_to(Pin { name, version, by: PinnedBy::Rollback }, kept).await
    }

    /// Lifts the pin: the highest version serves again (swapped in now if it is not serving).
    pub(crate) async fn unpin(&self) -> Outcome {
        let _changing = self.changing.lock().await;
        if let Some(pin) = lock(&self.pin).take() {
            tracing::info!(version = %pin.version, "unpinned: the highest version serves again");
        }
        self.converge(None).await
    }

    /// Starts a canary of `version` (default: the build that should replace the current
    /// one) with `share` of new requests; or, if that canary runs already, gives it `share`.
    pub(crate) async fn canary(&self, version: Option<Version>, share: Option<Share>) -> Result<Outcome, ChangeError> {
        let _changing = self.changing.lock().await;
        let read = self.read_new_files().await;
        let started = self.start_canary(version, share).await;
        self.after_order(read, started).await
    }

    /// `canary`, under the change lock.
    async fn start_canary(&self, version: Option<Version>, share: Option<Share>) -> Result<Outcome, ChangeError> {
        let current = self.current();
        if let Some(run) = lock(&self.canary).as_ref() {
            let generation = run.canary.generation();
            if version.as_ref().is_none_or(|v| builds::is_version(generation.version(), v)) {
                let share = share.unwrap_or_else(|| run.canary.share());
                run.canary.set_share(share);
                tracing::info!(generation = generation.id(), plugin = %generation.label(), "the canary now gets {} % of new requests", share.percent());
                return Ok(self.canary_outcome(generation, share, Vec::new()));
            }
        }
        if version.as_ref().is_some_and(|v| builds::is_version(current.version(), v)) {
            return Err(ChangeError::ServesAlready { current: current.label() });
        }
        let share = share.or(self.policy.auto).unwrap_or(Share::TEN_PERCENT);
        let mut sources = match &version {
            // A build of that version, of the plugin serving if there is one, else of any.
            Some(version) => {
                let own = |name: &str, v: &Version| name == current.name() && builds::is_version(v, version);
                let any = |_: &str, v: &Version| builds::is_version(v, version);
                self.sources_of(version, None, own).or_else(|_| self.sources_of(version, None, any))?
            }
            None => {
                let mut builds = lock(&self.builds);
                builds.prune();
                builds.better_than(Some(&serving(&current)), self.pin().as_ref()).into_iter().map(|b| b.file).collect()
            }
        };
        // Not the current generation's own file, as it was loaded.
        sources.retain(|file| !(file == current.source() && Identity::of(file) == Some(current.identity())));
        if sources.is_empty() {
            return Err(match version {
                Some(version) => ChangeError::UnknownVersion { version, dir: self.source.dir.clone(), known: self.known_versions() },
                None => ChangeError::NothingToCanary { current: current.label() },
            });
        }
        let mut refused = Vec::new();
        for file in sources {
            let candidate = self.open(&file).await;
            let build = match &candidate {
                Ok(c) if version.as_ref().is_some_and(|v| !builds::is_version(c.version(), v)) => continue, // changed since
                Ok(c) => Some(build_of(c)),
                Err(_) => None,
            };
            match self.try_start(candidate, &file, build.as_ref(), Then::Canary(share)).await {
                Ok(canary) => return Ok(self.canary_outcome(&canary, share, refused)),
                Err(e) => refused.push(e.to_string()),
            }
        }
        Ok(Outcome::Refused { serving: Brief::of(&current), refused })
    }

    /// Promotes the canary now: it gets every new request.
    pub(crate) async fn promote(&self) -> Result<Outcome, ChangeError> {
        let _changing = self.changing.lock().await;
        self.promote_canary("by the operator").ok_or(ChangeError::NoCanary)
    }

    /// Rolls the canary back now: its build is refused.
    pub(crate) async fn abort_canary(&self) -> Result<Outcome, ChangeError> {
        let _changing = self.changing.lock().await;
        self.roll_back_canary("the operator rolled it back".into()).ok_or(ChangeError::NoCanary)
    }

    /// The canary in progress, with its figures and the current version's since it started,
    /// and what they say.
    pub(crate) fn canary_progress(&self) -> Option<CanaryProgress> {
        let (canary, started, current_start) = {
            let run = lock(&self.canary);
            let run = run.as_ref()?;
            (run.canary.clone(), run.started, run.current_start.clone())
        };
        let generation = canary.generation().clone();
        let theirs = Window::of(generation.stats());
        let ours = Window::of(self.current().stats()).since(&current_start);
        let elapsed = started.elapsed();
        let verdict = canary::judge(&self.policy, &theirs, &ours, elapsed);
        let sticky = canary.sticky().map(ToString::to_string);
        Some(CanaryProgress { generation, share: canary.share(), sticky, elapsed, canary: theirs, current: ours, verdict })
    }

    /// Judges the canary in progress every tenth of a second, until `shutdown`.
    pub(crate) async fn judge_canaries(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => return,
            }
            // Raced with shutdown too: a host upgrade holds changes until this process exits,
            // and a judge waiting for them would hold the registry, and its generations, loaded.
            tokio::select! {
                () = self.judge_canary() => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Promotes the canary, or rolls it back, if its figures say so (see `canary`).
    pub(crate) async fn judge_canary(&self) {
        let Some(progress) = self.canary_progress() else { return };
        if let Verdict::Wait(_) = progress.verdict {
            return;
        }
        // A failing canary leaves the route at once, even if a change holds the lock for long
        // (a load, a host upgrade); and, superseded, its kept-alive connections move to the
        // current version at their next request, as at a swap.
        let stopped = match &progress.verdict {
            Verdict::RollBack(why) if self.current.stop_canary(&progress.generation) => {
                progress.generation.superseded().raise();
                tracing::info!(generation = progress.generation.id(), "canary failing ({why}): it gets no more requests");
                Some(why.clone())
            }
            _ => None,
        };
        let _changing = self.changing.lock().await;
        // Judged again: the wait may have been long (a host upgrade holds changes), and the
        // canary may have ended, or its figures changed, meanwhile. One taken out of the route
        // is rolled back whatever its figures say now: it was superseded, for good.
        let Some(progress) = self.canary_progress().filter(|now| Arc::ptr_eq(&now.generation, &progress.generation)) else {
            return;
        };
        match (stopped, progress.verdict) {
            (Some(why), _) | (None, Verdict::RollBack(why)) => drop(self.roll_back_canary(why)),
            (None, Verdict::Promote(why)) => drop(self.promote_canary(&why)),
            (None, Verdict::Wait(_)) => {}
        }
    }

    fn promote_canary(&self, why: &str) -> Option<Outcome> {
        let run = lock(&self.canary).take()?;
        let next = run.canary.generation().clone();
        let from = self.current();
        tracing::info!(generation = next.id(), plugin = %next.label(), "canary promoted ({why}): it gets every new request");
        let hold = {
            let mut builds = lock(&self.builds);
            builds.clear_rolled_back(&run.file);
            let pin = lock(&self.pin);
            match pin.as_ref() {
                Some(pin) => !pin.matches(next.name(), next.version()),
                // A canary of a lower version (started by hand) would be replaced at the next change.
                None => !builds.better_than(Some(&serving(&next)), None).is_empty(),
            }
        };
        if hold {
            tracing::info!(version = %next.version(), "pinned: the canary promoted holds against the builds that would replace it; `hotswap unpin` lifts it");
            *lock(&self.pin) = Some(Pin { name: next.name().to_owned(), version: next.version().clone(), by: PinnedBy::Pin });
        }
        self.history.promoted(next.id());
        self.make_current(next.clone(), false);
        self.current.set_canary(None);
        self.events.canary_promotions.fetch_add(1, Ordering::Relaxed);
        Some(Outcome::Swapped { from: Brief::of(&from), to: Brief::of(&next), refused: Vec::new() })
    }

    /// Ends the canary and refuses its build, for `reason`.
    fn roll_back_canary(&self, reason: String) -> Option<Outcome> {
        let run = lock(&self.canary).take()?;
        self.current.set_canary(None);
        let canary = run.canary.generation();
        self.retire(canary);
        lock(&self.builds).mark_rolled_back(&run.file, canary.identity());
        let current = self.current();
        tracing::warn!(
            generation = canary.id(), plugin = %canary.label(), file = %run.file.display(),
            "canary rolled back: {reason}; generation {} ({}) serves every request, and the build is not tried again \
             until a new file replaces it (or `hotswap canary {}` starts it by hand)",
            current.id(), current.label(), canary.version()
        );
        let reason = format!("canary rolled back: {reason}");
        let record = history::refusal(&run.file, Some(canary.name().to_owned()), Some(canary.version().clone()), reason.clone());
        self.history.refused(record, "canary");
        self.events.canary_rollbacks.fetch_add(1, Ordering::Relaxed);
        Some(Outcome::RolledBack { serving: Brief::of(&current), canary: Brief::of(canary), reason })
    }

    /// The canary in progress if it runs `build`.
    fn canary_of(&self, build: &Build) -> Option<Arc<Canary>> {
        let run = lock(&self.canary);
        let run = run.as_ref()?;
        (run.file == build.file && run.canary.generation().identity() == build.identity).then(|| run.canary.clone())
    }

    fn canary_outcome(&self, canary: &Generation, share: Share, refused: Vec<String>) -> Outcome {
        Outcome::Canary { serving: Brief::of(&self.current()), canary: Brief::of(canary), percent: share.percent(), refused }
    }

    /// Routes `share` of new requests to `generation`, in place of any canary before it.
    fn install_canary(&self, generation: Arc<Generation>, file: &Path, share: Share) {
        let current = self.current();
        let canary = Arc::new(Canary::new(generation.clone(), share, self.policy.sticky.clone()));
        let run = CanaryRun { canary: canary.clone(), file: file.to_path_buf(), started: Instant::now(), current_start: Window::of(current.stats()) };
        let replaced = lock(&self.canary).replace(run);
        self.current.set_canary(Some(canary));
        let resident = self.add_resident(&generation);
        if let Some(replaced) = replaced {
            let old = replaced.canary.generation();
            tracing::info!(generation = old.id(), plugin = %old.label(), "canary replaced by a newer build");
            self.retire(old);
        }
        tracing::info!(
            generation = generation.id(), plugin = %generation.label(), file = %file.display(),
            "canary started: generation {} gets {} % of new requests, generation {} ({}) the rest",
            generation.id(), share.percent(), current.id(), current.label()
        );
        self.record_swap(&generation, true);
        self.enforce_max_generations(resident);
    }

    /// Every version known, highest first, for an error message.
    fn known_versions(&self) -> String {
        let mut known: std::collections::BTreeSet<Version> = lock(&self.builds).all().map(|b| b.version.clone()).collect();
        known.extend(self.history.copies_of(|_, _| true).into_iter().map(|(v, _)| v));
        if known.is_empty() {
            return "none".into();
        }
        known.iter().rev().map(Version::to_string).collect::<Vec<_>>().join(", ")
    }

    /// Files that hold a build of `version` that `matches` (name, version): `kept` first,
    /// then builds in the plugin directory (newest file first), then kept copies of earlier
    /// generations.
    fn sources_of(
        &self,
        version: &Version,
        kept: Option<PathBuf>,
        matches: impl Fn(&str, &Version) -> bool,
    ) -> Result<Vec<PathBuf>, ChangeError> {
        let mut sources: Vec<PathBuf> = kept.into_iter().collect();
        let mut in_dir: Vec<Build> = {
            let mut builds = lock(&self.builds);
            builds.prune();
            builds.all().filter(|b| matches(&b.name, &b.version)).cloned().collect()
        };
        in_dir.sort_by_key(|b| std::cmp::Reverse(b.identity.modified));
        sources.extend(in_dir.into_iter().map(|b| b.file));
        sources.extend(self.history.copies_of(&matches).into_iter().map(|(_, kept)| kept));
        let mut seen = HashSet::new();
        sources.retain(|source| seen.insert(source.clone()));
        if sources.is_empty() {
            return Err(ChangeError::UnknownVersion { version: version.clone(), dir: self.source.dir.clone(), known: self.known_versions() });
        }
        Ok(sources)
    }

    /// Opens `file` (found as `identity`) and adds it to the builds. A failure, other than a
    /// file still being written, is recorded as a refusal unless this same file was refused
    /// before; the error comes back with whether it was recorded.
    async fn read_build(&self, file: &Path, identity: Identity) -> Result<Candidate, (GenerationError, bool)> {
        match self.open(file).await {
            Ok(candidate) => {
                lock(&self.unreadable).remove(file);
                lock(&self.builds).insert(build_of(&candidate));
                Ok(candidate)
            }
            Err(e @ GenerationError::Load(LoadError::Incomplete { .. })) => Err((e, false)),
            Err(e @ GenerationError::GenerationCap { .. }) => {
                // Not the file's fault: read again at its next change (or SIGHUP).
                self.refuse(file, e.kind(), &e.to_string(), None);
                Err((e, true))
            }
            Err(e) => {
                let new = lock(&self.unreadable).insert(file.to_path_buf(), identity) != Some(identity);
                if new {
                    self.refuse(file, e.kind(), &e.to_string(), None);
                }
                Err((e, new))
            }
        }
    }

    /// Loads `file` and swaps it in whatever its version (`hotswap dev`: the build just made).
    /// A refusal is logged and recorded, as any other; the error is its reason.
    pub(crate) async fn load_and_swap(&self, file: &Path) -> Result<Arc<Generation>, GenerationError> {
        let _changing = self.changing.lock().await;
        let candidate = self.open(file).await;
        if let Ok(candidate) = &candidate {
            lock(&self.builds).insert(build_of(candidate));
        }
        self.try_start(candidate, file, None, Then::Swap(Handoff::Required)).await
    }

    fn unchanged(&self, reason: String) -> Outcome {
        Outcome::Unchanged { serving: Brief::of(&self.current()), reason }
    }

    /// Refuses a load that would make more than `--max-generations` generations loaded even
    /// once every draining one is cut off: when the current one, the new one and those cut off
    /// already (which something keeps from unloading) are too many. Those cut off are usually
    /// on their way out, so it waits for them first, up to the unload timeout.
    async fn check_generation_cap(&self) -> Result<(), GenerationError> {
        let deadline = tokio::time::Instant::now() + self.options.unload_timeout;
        loop {
            // Counted, not kept: holding them while waiting would delay their unloading.
            let (loaded, cut_off) = {
                let resident = self.resident();
                (resident.len() as u64, resident.iter().filter(|g| g.aborted().is_raised()).count() as u64)
            };
            if cut_off + 2 <= self.max_generations {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(GenerationError::GenerationCap { loaded, cut_off, max: self.max_generations });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Opens `file` as a candidate, within the budget.
    async fn open(&self, file: &Path) -> Result<Candidate, GenerationError> {
        self.check_generation_cap().await?;
        let reading = self.budget.check_before_load()?;
        tracing::debug!(file = %file.display(), "loading a candidate");
        let candidate = Candidate::open(file, &self.options).await?;
        self.budget.loaded(reading);
        Ok(candidate)
    }

    /// Swaps in the best build that should replace the current one, trying the next on
    /// failure. `held` is a candidate already open (used if it is the one chosen).
    async fn converge(&self, mut held: Option<Candidate>) -> Outcome {
        let mut refused = Vec::new();
        loop {
            let current = self.current();
            let pin = self.pin();
            let best = {
                let mut builds = lock(&self.builds);
                builds.prune();
                builds.better_than(Some(&serving(&current)), pin.as_ref()).into_iter().next()
            };
            let Some(best) = best else {
                return if refused.is_empty() {
                    self.unchanged(format!("{} serves and no build should replace it", current.label()))
                } else {
                    Outcome::Refused { serving: Brief::of(&current), refused }
                };
            };
            if self.policy.hold && refused.is_empty() {
                return self.unchanged(format!(
                    "{} serves, and new builds are held (--hold): `hotswap canary {}` or `hotswap pin {}` serves {}",
                    current.label(),
                    best.version,
                    best.version,
                    best.file.display()
                ));
            }
            if let Some(canary) = self.canary_of(&best) {
                let reason = format!("{} is the canary ({} % of new requests)", canary.generation().label(), canary.share().percent());
                return if refused.is_empty() { self.unchanged(reason) } else { Outcome::Refused { serving: Brief::of(&current), refused } };
            }
            let candidate = match held.take() {
                Some(c) if c.source() == best.file && c.identity() == best.identity => Ok(c),
                _ => self.open(&best.file).await,
            };
            // A new build starts as a canary (`--canary`), and replaces one started by hand,
            // at its share, if it is newer than it: it is not less risky than the one tried.
            let running = lock(&self.canary).as_ref().and_then(|run| {
                let tried = run.canary.generation();
                builds::replaces(&best, &serving(tried), None).then(|| run.canary.share())
            });
            if let Some(share) = self.policy.auto.or(running) {
                match self.try_start(candidate, &best.file, Some(&best), Then::Canary(share)).await {
                    Ok(canary) => return self.canary_outcome(&canary, share, refused),
                    Err(e @ GenerationError::GenerationCap { .. }) => {
                        refused.push(e.to_string());
                        return Outcome::Refused { serving: Brief::of(&current), refused };
                    }
                    Err(e) => refused.push(e.to_string()),
                }
                continue;
            }
            match self.try_start(candidate, &best.file, Some(&best), Then::Swap(Handoff::Required)).await {
                Ok(next) => return Outcome::Swapped { from: Brief::of(&current), to: Brief::of(&next), refused },
                Err(e @ GenerationError::GenerationCap { .. }) => {
                    // Not the build's fault, and no other build would fare better.
                    refused.push(e.to_string());
                    return Outcome::Refused { serving: Brief::of(&current), refused };
                }
                Err(e) => refused.push(e.to_string()),
            }
        }
    }

    /// Serves a build matching `pin` (trying `kept` first), then sets the pin.
    async fn switch_to(&self, pin: Pin, kept: Option<PathBuf>) -> Result<Outcome, ChangeError> {
        let current = self.current();
        if pin.matches(current.name(), current.version()) {
            self.end_canary(&format!("version {} is pinned", pin.version));
            tracing::info!(version = %pin.version, by = %pin.by, "pinned: {} serves already", current.label());
            let reason = format!("{} serves already; version {} is now pinned", current.label(), pin.version);
            *lock(&self.pin) = Some(pin);
            return Ok(self.unchanged(reason));
        }
        let sources = self.sources_of(&pin.version, kept, |name, v| pin.matches(name, v))?;
        let mut refused = Vec::new();
        for file in sources {
            let candidate = self.open(&file).await;
            let build = match &candidate {
                Ok(c) if !pin.matches(c.name(), c.version()) => continue, // changed since it was read
                Ok(c) => Some(build_of(c)),
                Err(_) => None,
            };
            // A rollback or a pin never depends on an older build reading newer state.
            match self.try_start(candidate, &file, build.as_ref(), Then::Swap(Handoff::Optional)).await {
                Ok(next) => {
                    tracing::info!(version = %pin.version, by = %pin.by, "pinned: {} serves", next.label());
                    *lock(&self.pin) = Some(pin);
                    return Ok(Outcome::Swapped { from: Brief::of(&current), to: Brief::of(&next), refused });
                }
                Err(e) => refused.push(e.to_string()),
            }
        }
        Ok(Outcome::Refused { serving: Brief::of(&current), refused })
    }

    /// Starts an opened candidate (of `file`) and swaps it in, or makes it the canary; on
    /// failure records the refusal (and marks the build refused).
    async fn try_start(
        &self,
        candidate: Result<Candidate, GenerationError>,
        file: &Path,
        build: Option<&Build>,
        then: Then,
    ) -> Result<Arc<Generation>, GenerationError> {
        let started = match (candidate, then) {
            (Ok(candidate), Then::Swap(handoff)) => self.start_and_swap(candidate, handoff).await,
            (Ok(candidate), Then::Canary(share)) => {
                let started = self.start_handed(candidate, Handoff::Required).await;
                started.inspect(|generation| self.install_canary(generation.clone(), file, share))
            }
            (Err(e), _) => Err(e),
        };
        started.inspect_err(|e| {
            // Too many generations loaded is not the build's fault: it is tried again later.
            if !matches!(e, GenerationError::GenerationCap { .. }) {
                lock(&self.builds).mark_refused(file);
            }
            self.refuse(file, e.kind(), &e.to_string(), build);
        })
    }

    async fn start_and_swap(&self, candidate: Candidate, handoff: Handoff) -> Result<Arc<Generation>, GenerationError> {
        let next = self.start_handed(candidate, handoff).await?;
        self.swap(next.clone());
        Ok(next)
    }

    /// Starts `candidate` with the state of the current generation, if both hand state over
    /// (`handler_api::state`). With `Handoff::Optional`, a build that refuses the state is
    /// started once more without it.
    async fn start_handed(&self, candidate: Candidate, handoff: Handoff) -> Result<Arc<Generation>, GenerationError> {
        let previous = match candidate.takes_state() {
            true => self.current().export_state(self.options.init_timeout).await,
            false => None,
        };
        let file = candidate.source().to_path_buf();
        let started = candidate.start(self.next_id.fetch_add(1, Ordering::Relaxed), &self.options, previous.as_ref()).await;
        match started {
            Err(GenerationError::StateImport { plugin, previous, reason }) if handoff == Handoff::Optional => {
                tracing::warn!(
                    plugin = %plugin,
                    "it refused the state of {previous} ({reason}): started again without it, as the way back must not \
                     depend on it"
                );
                let again = self.open(&file).await?;
                again.start(self.next_id.fetch_add(1, Ordering::Relaxed), &self.options, None).await
            }
            started => started,
        }
    }

    /// Makes `next` current; the old generation drains (bounded by the drain timeout). A
    /// canary in progress ends (its build is not refused).
    fn swap(&self, next: Arc<Generation>) {
        self.end_canary(&format!("{} becomes current", next.label()));
        self.make_current(next, true);
    }

    /// Ends the canary in progress, if any, without refusing its build.
    fn end_canary(&self, why: &str) {
        if let Some(run) = lock(&self.canary).take() {
            self.current.set_canary(None);
            let canary = run.canary.generation();
            tracing::info!(generation = canary.id(), plugin = %canary.label(), "canary ended: {why}");
            self.retire(canary);
        }
    }

    /// Makes `next` current (`record`: adds it to the history); the old one drains.
    fn make_current(&self, next: Arc<Generation>, record: bool) {
        let old = self.current.swap(next.clone());
        let resident = self.add_resident(&next);
        // Kept-alive connections move on before anything that may block (the log's write).
        old.superseded().raise();
        tracing::info!(
            from = %old.label(), from_generation = old.id(), to = %next.label(), to_generation = next.id(),
            "swapped: new requests go to generation {}", next.id()
        );
        self.events.swaps.fetch_add(1, Ordering::Relaxed);
        if record {
            self.record_swap(&next, false);
        }
        self.enforce_max_generations(resident);
        self.drain(&old);
    }

    /// Counts `generation` among the resident ones (a canary promoted is there already);
    /// returns every resident one.
    fn add_resident(&self, generation: &Arc<Generation>) -> Vec<Arc<Generation>> {
        let mut resident = lock(&self.resident);
        resident.retain(|g| g.strong_count() > 0);
        if !resident.iter().any(|g| std::ptr::eq(g.as_ptr(), Arc::as_ptr(generation))) {
            resident.push(Arc::downgrade(generation));
        }
        resident.iter().filter_map(Weak::upgrade).collect()
    }

    /// Tells `old`'s sessions that it no longer gets new requests, and cuts off what it still
    /// serves at the drain timeout.
    fn retire(&self, old: &Arc<Generation>) {
        old.superseded().raise();
        self.drain(old);
    }

    /// Cuts off what `old` still serves once the drain timeout has passed.
    fn drain(&self, old: &Arc<Generation>) {
        let old = Arc::downgrade(old);
        let timeout = self.drain_timeout;
        let events = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            if let Some(old) = old.upgrade().filter(|old| !old.aborted().is_raised()) {
                tracing::warn!(
                    generation = old.id(), plugin = %old.label(), in_flight = old.in_flight(),
                    "drain timeout ({timeout:?}) reached: aborting the generation's remaining responses"
                );
                events.aborted_by_drain_timeout.fetch_add(old.in_flight() as u64, Ordering::Relaxed);
                old.abort();
            }
        });
    }

    /// Adds `next` to the history, keeps a copy of its bytes for a rollback, and computes its
    /// SHA-256 off the swap path (unless the trusted-digest check already did).
    fn record_swap(&self, next: &Arc<Generation>, canary: bool) {
        let kept = match self.options.shadow.keep(next.shadow()) {
            Ok(kept) => Some(kept),
            Err(e) => {
                tracing::warn!(generation = next.id(), "cannot keep a copy of the build for a rollback: {e}");
                None
            }
        };
        let record = Record {
            generation: Some(next.id()),
            name: Some(next.name().to_owned()),
            version: Some(next.version().clone()),
            file: next.source().to_path_buf(),
            sha256: Arc::default(),
            at: SystemTime::now(),
            refused: None,
            stats: Some(next.stats().clone()),
            kept: kept.clone(),
            served_before: None,
            canary,
        };
        match next.digest() {
            Some(digest) => drop(record.sha256.set(digest.to_owned())),
            None => {
                // Hashing a build takes milliseconds of CPU: not while the new generation
                // takes its first requests.
                let (slot, path) = (record.sha256.clone(), kept.unwrap_or_else(|| next.shadow().to_path_buf()));
                tokio::spawn(async move {
                    tokio::time::sleep(HASH_DELAY).await;
                    let hashed = tokio::task::spawn_blocking(move || crate::plugin::loader::sha256_file(&path).map_err(|e| (path, e))).await;
                    match hashed {
                        Ok(Ok(digest)) => drop(slot.set(digest)),
                        Ok(Err((path, e))) => tracing::debug!(file = %path.display(), "cannot compute the SHA-256 of a loaded build: {e}"),
                        Err(_) => {}
                    }
                });
            }
        }
        self.history.swapped_in(record);
    }

    /// Cuts off the oldest draining generations while more than `--max-generations` are
    /// loaded. Those already cut off count too: they are loaded until they have unloaded, and
    /// something may keep them (see [`Registry::check_generation_cap`]).
    fn enforce_max_generations(&self, mut resident: Vec<Arc<Generation>>) {
        let excess = (resident.len() as u64).saturating_sub(self.max_generations);
        let current = self.current().id();
        let canary = self.current.canary().map(|c| c.generation().id());
        // Canaries never promoted first (they served a share, the old current one most
        // requests), then the oldest.
        let never: Vec<u64> = self.history.records().iter().filter(|r| r.canary).filter_map(|r| r.generation).collect();
        resident.sort_by_key(|g| (!never.contains(&g.id()), g.id()));
        let draining = resident.iter().filter(|g| !g.aborted().is_raised() && g.id() != current && Some(g.id()) != canary);
        for oldest in draining.take(excess as usize) {
            tracing::warn!(
                generation = oldest.id(), plugin = %oldest.label(), in_flight = oldest.in_flight(),
                "more than {} generations loaded (--max-generations): aborting the oldest one's remaining responses",
                self.max_generations
            );
            self.events.aborted_by_generation_cap.fetch_add(oldest.in_flight() as u64, Ordering::Relaxed);
            oldest.abort();
        }
    }

    /// Generations still loaded, oldest first.
    pub(crate) fn resident(&self) -> Vec<Arc<Generation>> {
        let mut resident: Vec<_> = lock(&self.resident).iter().filter_map(Weak::upgrade).collect();
        resident.sort_by_key(|g| g.id());
        resident
    }

    /// Cuts off every response still in progress, on every generation.
    pub(crate) fn abort_all(&self) {
        for generation in self.resident() {
            generation.abort();
        }
    }
}

/// Starts the build a previous host serves: the bytes it kept (linked into this host's own
/// directory while it runs), named by the file they came from; or that file.
async fn start_inherited(inheritance: &Inheritance, options: &LoadOptions, id: u64) -> Result<Arc<Generation>, InheritError> {
    let link = inheritance.kept.as_deref().map(|kept| options.shadow.keep_from(kept));
    let candidate = match &link {
        Some(Ok(link)) => Candidate::open(link, options).await.map(|c| c.named(&inheritance.serving, inheritance.identity)),
        Some(Err(e)) => {
            tracing::debug!("cannot use the previous host's copy of its build ({e}): loading {}", inheritance.serving.display());
            Candidate::open(&inheritance.serving, options).await
        }
        None => Candidate::open(&inheritance.serving, options).await,
    };
    // Without the copy, the file must still be the one that host read.
    let from_file = !matches!(link, Some(Ok(_)));
    if let Some(Ok(link)) = link {
        let _ = std::fs::remove_file(link); // the generation keeps its own copy
    }
    let candidate = candidate?;
    if from_file && inheritance.identity.is_some_and(|identity| identity != candidate.identity()) {
        return Err(InheritError::Replaced { path: inheritance.serving.clone() });
    }
    Ok(candidate.start(id, options, None).await?)
}

fn build_of(candidate: &Candidate) -> Build {
    Build {
        file: candidate.source().to_path_buf(),
        identity: candidate.identity(),
        name: candidate.name().to_owned(),
        version: candidate.version().clone(),
        refused: false,
        rolled_back: false,
    }
}

fn serving(current: &Generation) -> Serving<'_> {
    Serving { name: current.name(), version: current.version(), modified: current.identity().modified }
}
