//! Resource budgets for a process that loads plugins forever.
//!
//! Unloading a generation gives back its threads, its mappings and nearly all its memory
//! (BENCHMARKS.md has the figures over 2000 swaps). One thing it cannot give back: a plugin
//! whose own copy of std calls `std::thread::current()` (directly, through the default panic
//! hook, or through crates that name threads) creates a pthread key with a destructor inside
//! the plugin, and never deletes it. glibc has 1024 keys per process; when they run out, the
//! next `thread::current()` anywhere in the process aborts it ("out of TLS keys").
//!
//! So before every load the host checks what is left of each budget that repeated loading
//! draws on, warns when one runs low, and refuses the load while the process can still serve
//! on the generation it has. A restart (which a supervisor can do gracefully: see README)
//! gives everything back.

#![forbid(unsafe_code)]

use std::fmt;
use std::sync::{Mutex, PoisonError};

use crate::sys;

/// One resource, as much of it as is in use now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Usage {
    pub(crate) resource: Resource,
    pub(crate) used: u64,
    pub(crate) limit: u64,
}

/// What repeated loading draws on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resource {
    /// pthread thread-specific-data keys (glibc: 1024 per process, leaked by plugins).
    ThreadKeys,
    /// Memory mappings (`vm.max_map_count`): each loaded library maps several.
    MemoryMaps,
    /// Open file descriptors (the soft `RLIMIT_NOFILE`).
    FileDescriptors,
}

impl Resource {
    /// Left free when a load is refused: what the host itself still needs to serve and to
    /// unload (a thread starting, a runtime's epoll and event fds, a few mappings).
    fn reserve(self) -> u64 {
        match self {
            Resource::ThreadKeys => 32,
            Resource::MemoryMaps => 1024,
            Resource::FileDescriptors => 64,
        }
    }

    fn what_to_do(self) -> &'static str {
        match self {
            Resource::ThreadKeys => {
                "the plugin leaks one pthread key per load (its std's thread::current()); restart the host to reclaim them"
            }
            Resource::MemoryMaps => "old generations may still be mapped (see /proc/PID/maps); raise vm.max_map_count or restart",
            Resource::FileDescriptors => "close connections, lower --max-connections, or raise the open files limit (ulimit -n)",
        }
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Resource::ThreadKeys => "pthread keys",
            Resource::MemoryMaps => "memory mappings",
            Resource::FileDescriptors => "file descriptors",
        })
    }
}

impl Usage {
    fn free(&self) -> u64 {
        self.limit.saturating_sub(self.used)
    }

    /// Whether a load that takes `cost` more would eat into the reserve.
    fn exhausted(&self, cost: u64) -> bool {
        self.free() <= self.resource.reserve() + cost
    }

    /// Whether to warn: three quarters used.
    fn low(&self) -> bool {
        self.used.saturating_mul(4) >= self.limit.saturating_mul(3)
    }
}

impl fmt::Display for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} of {} {} in use", self.used, self.limit, self.resource)
    }
}

/// A load refused because a budget would run out.
#[derive(Debug, thiserror::Error)]
#[error(
    "budget exhausted: {usage}, and {reserve} are kept for the host to go on serving{cost}; no further plugin is loaded: {hint}",
    reserve = usage.resource.reserve(),
    cost = if *per_load > 0 { format!(" plus {per_load} for the load (what one load has taken)") } else { String::new() },
    hint = usage.resource.what_to_do()
)]
pub(crate) struct BudgetError {
    pub(crate) usage: Usage,
    /// What one load has been seen to take of this resource.
    pub(crate) per_load: u64,
}

/// What is in use now, for each budget that can be measured here.
pub(crate) fn usage() -> Vec<Usage> {
    let mut all = Vec::with_capacity(3);
    let keys = sys::thread_keys_in_use().unwrap_or(sys::THREAD_KEYS_MAX);
    all.push(Usage { resource: Resource::ThreadKeys, used: keys, limit: sys::THREAD_KEYS_MAX });
    let maps = std::fs::read_to_string("/proc/self/maps").map(|m| m.lines().count() as u64);
    let max_maps = std::fs::read_to_string("/proc/sys/vm/max_map_count").ok().and_then(|s| s.trim().parse().ok());
    if let (Ok(used), Some(limit)) = (maps, max_maps) {
        all.push(Usage { resource: Resource::MemoryMaps, used, limit });
    }
    let fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count() as u64);
    if let (Ok(used), Ok((limit, _))) = (fds, sys::open_files_limit()) {
        all.push(Usage { resource: Resource::FileDescriptors, used, limit });
    }
    all
}

/// The budgets as seen across loads: how many pthread keys one load has cost, so that a load
/// is refused while there is still room for it (a plugin may leak more than the reserve).
#[derive(Debug, Default)]
pub(crate) struct Budget {
    inner: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    /// Keys in use just before the last load that went through.
    keys_before_last_load: Option<u64>,
    /// The most keys one generation has taken, from one load to the next.
    keys_per_load: u64,
}

impl Budget {
    /// Checks every budget before a load: warns about those running low, and refuses the
    /// load if one would leave less than its reserve. Call [`Budget::loaded`] with the
    /// returned reading once the load has gone through.
    pub(crate) fn check_before_load(&self) -> Result<Reading, BudgetError> {
        let all = usage();
        tracing::debug!(budgets = %all.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "), "before loading");
        let mut seen = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let keys = all.iter().find(|u| u.resource == Resource::ThreadKeys).map(|u| u.used);
        if let (Some(now), Some(before)) = (keys, seen.keys_before_last_load) {
            seen.keys_per_load = seen.keys_per_load.max(now.saturating_sub(before));
        }
        for usage in &all {
            let cost = if usage.resource == Resource::ThreadKeys { seen.keys_per_load } else { 0 };
            if usage.exhausted(cost) {
                return Err(BudgetError { usage: *usage, per_load: cost });
            }
        }
        for usage in all.iter().filter(|u| u.low()) {
            tracing::warn!(
                "budget running low: {usage}; loads are refused when {} are left ({})",
                usage.resource.reserve(),
                usage.resource.what_to_do()
            );
        }
        Ok(Reading { keys })
    }

    /// A load checked with `reading` went through.
    pub(crate) fn loaded(&self, reading: Reading) {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner).keys_before_last_load = reading.keys;
    }
}

/// What [`Budget::check_before_load`] measured.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reading {
    keys: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_is_low_at_three_quarters_and_out_at_its_reserve() {
        let at = |used| Usage { resource: Resource::ThreadKeys, used, limit: 1024 };
        assert!(!at(700).low());
        assert!(at(768).low());
        assert!(!at(991).exhausted(0));
        assert!(at(992).exhausted(0));
        // A load known to take keys needs room for them too.
        assert!(at(991).exhausted(1));
        assert!(!at(990).exhausted(1));
    }

    #[test]
    fn usage_is_measured_in_this_process() {
        let all = usage();
        let keys = all.iter().find(|u| u.resource == Resource::ThreadKeys).expect("thread keys measured");
        assert!(keys.used < keys.limit);
        assert!(all.iter().any(|u| u.resource == Resource::MemoryMaps && u.used > 10));
    }
}
