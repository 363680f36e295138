//! The registry: which generation is current, and which older ones are still draining.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::SystemTime;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::budget::Budget;
use crate::generation::{Generation, GenerationError, LoadOptions};

/// No candidate could be loaded at startup.
#[derive(Debug, thiserror::Error)]
#[error("no loadable plugin{}", .0.iter().map(|r| format!("\n  - {r}")).collect::<String>())]
pub struct StartError(pub Vec<String>);

/// The current generation and the history of resident ones.
pub struct Registry {
    current: ArcSwap<Generation>,
    resident: Mutex<Vec<Weak<Generation>>>,
    next_id: AtomicU64,
    options: LoadOptions,
    drain_timeout: Duration,
    /// The most generations loaded at once (`--max-generations`).
    max_generations: u64,
    budget: Budget,
    refusals: Mutex<VecDeque<Refusal>>,
}

/// A candidate that was not swapped in, and why.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub file: PathBuf,
    pub reason: String,
    pub at: SystemTime,
}

/// How many refusals the registry remembers.
const REFUSALS_KEPT: usize = 32;

impl Registry {
    /// Loads the first generation from the first of `candidates` that loads; the server
    /// does not start without one. The error lists every refusal.
    pub async fn start(
        candidates: &[PathBuf],
        options: LoadOptions,
        drain_timeout: Duration,
        max_generations: u64,
    ) -> Result<Registry, StartError> {
        let mut refusals = Vec::new();
        for (next_id, plugin) in (1..).zip(candidates) {
            match Generation::load(plugin, next_id, &options).await {
                Ok(first) => {
                    tracing::info!(generation = first.id(), plugin = %first.label(), file = %plugin.display(), "plugin loaded");
                    for r in &refusals {
                        tracing::warn!("refused: {r}");
                    }
                    return Ok(Registry {
                        resident: Mutex::new(vec![Arc::downgrade(&first)]),
                        current: ArcSwap::new(first),
                        next_id: AtomicU64::new(next_id + 1),
                        options,
                        drain_timeout,
                        max_generations,
                        budget: Budget::default(),
                        refusals: Mutex::new(VecDeque::new()),
                    });
                }
                Err(e) => refusals.push(e.to_string()),
            }
        }
        Err(StartError(refusals))
    }

    /// Logs and records that `file` was not swapped in.
    pub fn refuse(&self, file: &Path, reason: &str) {
        let current = self.current();
        tracing::warn!(
            file = %file.display(),
            "refused plugin candidate: {reason}; generation {} ({}) keeps serving", current.id(), current.label()
        );
        let mut refusals = self.refusals.lock().unwrap_or_else(PoisonError::into_inner);
        if refusals.len() == REFUSALS_KEPT {
            refusals.pop_front();
        }
        refusals.push_back(Refusal { file: file.to_path_buf(), reason: reason.to_owned(), at: SystemTime::now() });
    }

    /// Recent refusals, oldest first.
    pub fn refusals(&self) -> Vec<Refusal> {
        self.refusals.lock().unwrap_or_else(PoisonError::into_inner).iter().cloned().collect()
    }

    /// The generation new requests go to.
    pub fn current(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    /// Loads `plugin` as a candidate and, if it passes every check, makes it current in one
    /// atomic step. On error the current generation keeps serving.
    pub async fn load_and_swap(&self, plugin: &Path) -> Result<Arc<Generation>, GenerationError> {
        let reading = self.budget.check_before_load()?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(generation = id, file = %plugin.display(), "loading a candidate");
        let candidate = Generation::load(plugin, id, &self.options).await?;
        self.budget.loaded(reading);
        self.swap(candidate.clone());
        Ok(candidate)
    }

    /// Makes `next` current; the old generation drains (bounded by the drain timeout).
    pub fn swap(&self, next: Arc<Generation>) {
        let old = self.current.swap(next.clone());
        let resident = {
            let mut resident = self.resident.lock().unwrap_or_else(PoisonError::into_inner);
            resident.retain(|g| g.strong_count() > 0);
            resident.push(Arc::downgrade(&next));
            resident.iter().filter_map(Weak::upgrade).collect::<Vec<_>>()
        };
        tracing::info!(
            from = %old.label(), from_generation = old.id(), to = %next.label(), to_generation = next.id(),
            "swapped: new requests go to generation {}", next.id()
        );
        old.superseded().raise();
        self.enforce_max_generations(resident);
        let old = Arc::downgrade(&old);
        let timeout = self.drain_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            if let Some(old) = old.upgrade() {
                tracing::warn!(
                    generation = old.id(), plugin = %old.label(), in_flight = old.in_flight(),
                    "drain timeout ({timeout:?}) reached: aborting the generation's remaining responses"
                );
                old.aborted().raise();
            }
        });
    }

    /// Cuts off the oldest draining generations while more than `--max-generations` are
    /// loaded (not counting those already cut off, which are on their way out).
    fn enforce_max_generations(&self, mut resident: Vec<Arc<Generation>>) {
        resident.retain(|g| !g.aborted().is_raised());
        resident.sort_by_key(|g| g.id());
        let excess = (resident.len() as u64).saturating_sub(self.max_generations);
        for oldest in resident.iter().take(excess as usize) {
            tracing::warn!(
                generation = oldest.id(), plugin = %oldest.label(), in_flight = oldest.in_flight(),
                "more than {} generations loaded (--max-generations): aborting the oldest one's remaining responses",
                self.max_generations
            );
            oldest.aborted().raise();
        }
    }

    /// Generations still loaded (current first is not guaranteed).
    pub fn resident(&self) -> Vec<Arc<Generation>> {
        let resident = self.resident.lock().unwrap_or_else(PoisonError::into_inner);
        resident.iter().filter_map(Weak::upgrade).collect()
    }

    /// Cuts off every response still in progress, on every generation.
    pub fn abort_all(&self) {
        for generation in self.resident() {
            generation.aborted().raise();
        }
    }
}
