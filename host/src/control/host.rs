//! The host process itself: the upgrades of the host binary that led to it (`hotswap
//! upgrade`), the connections it took over from the process before it, and the way to ask it
//! to upgrade (the admin API and SIGUSR2 send an [`UpgradeOrder`]; `cmd::upgrade` carries it
//! out).

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

/// How many upgrades are remembered.
const UPGRADES_KEPT: usize = 32;

/// The longest an upgrade may wait for the new host: under the admin API's connection
/// lifetime, so the answer always gets through.
pub(crate) const MAX_UPGRADE_TIMEOUT: Duration = Duration::from_secs(300);

/// How long an upgrade may wait for the new host, from text like `30s`: 1s to 5 minutes.
pub(crate) fn parse_upgrade_timeout(text: &str) -> Result<Duration, String> {
    let timeout = humantime::parse_duration(text).map_err(|e| format!("`{text}` is not a duration like 30s: {e}"))?;
    if timeout < Duration::from_secs(1) || timeout > MAX_UPGRADE_TIMEOUT {
        return Err(format!("{text} is outside 1s to {}", humantime::format_duration(MAX_UPGRADE_TIMEOUT)));
    }
    Ok(timeout)
}

/// One upgrade of the host binary: a process handed its sockets and connections to another.
/// (Fields in alphabetical order, as every admin API document: see `admin::api`.)
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct UpgradeRecord {
    /// When the new process took over (RFC 3339).
    pub(crate) at: String,
    /// The binary the new process runs.
    pub(crate) binary: PathBuf,
    /// Idle keep-alive connections the new process took over without their clients
    /// reconnecting (so far, for the latest upgrade).
    pub(crate) connections_handed_over: u64,
    pub(crate) from_pid: u32,
    pub(crate) from_version: String,
    pub(crate) to_pid: u32,
    pub(crate) to_version: String,
    /// Milliseconds from the order to the new process serving.
    pub(crate) took_ms: u64,
}

/// Asks the host to upgrade: start `binary` (default: the running one's path) and hand over.
#[derive(Debug)]
pub(crate) struct UpgradeOrder {
    pub(crate) binary: Option<PathBuf>,
    /// How long the new process may take to confirm it serves.
    pub(crate) timeout: Option<Duration>,
    /// The upgrade as recorded, or why it did not happen (the old host keeps serving).
    pub(crate) reply: oneshot::Sender<Result<UpgradeRecord, String>>,
}

/// What the host process knows of itself.
#[derive(Debug, Default)]
pub(crate) struct HostProcess {
    /// Oldest first: those of the processes before this one, then its own (once it hands
    /// over).
    upgrades: Mutex<Vec<UpgradeRecord>>,
    /// Upgrades in all, since the first process (`upgrades` keeps the latest).
    upgrade_count: AtomicU64,
    /// Connections this process took over from the one before it.
    adopted: AtomicU64,
    /// The pid of the process this one handed over to; 0 while it serves.
    handed_over_to: std::sync::atomic::AtomicU32,
    /// Cancelled once it has handed over.
    handover: tokio_util::sync::CancellationToken,
    /// Where upgrade orders go; `None` where upgrades are not supported (`hotswap dev`).
    orders: Option<mpsc::Sender<UpgradeOrder>>,
}

impl HostProcess {
    /// A host process that carries out upgrade orders sent to `orders` (if any), after the
    /// `upgrades` that led to it.
    pub(crate) fn new(orders: Option<mpsc::Sender<UpgradeOrder>>, upgrades: Vec<UpgradeRecord>) -> HostProcess {
        HostProcess {
            upgrade_count: AtomicU64::new(upgrades.len() as u64),
            upgrades: Mutex::new(upgrades),
            adopted: AtomicU64::new(0),
            handed_over_to: std::sync::atomic::AtomicU32::new(0),
            handover: tokio_util::sync::CancellationToken::new(),
            orders,
        }
    }

    /// This process is the `count`th upgrade of the host, recorded as `upgrade`.
    pub(crate) fn upgraded_into(&self, count: u64, upgrade: UpgradeRecord) {
        self.record(upgrade);
        self.upgrade_count.store(count, Ordering::Relaxed);
    }

    /// This process has handed over to another (`upgrade`): it serves nothing new, and the
    /// admin API refuses changes, which belong to the new one.
    pub(crate) fn handed_over(&self, upgrade: UpgradeRecord) {
        self.handed_over_to.store(upgrade.to_pid, Ordering::Release);
        self.upgrade_count.fetch_add(1, Ordering::Relaxed);
        self.record(upgrade);
        self.handover.cancel();
    }

    /// Waits until this process has handed over; the pid of the one it handed over to.
    pub(crate) async fn wait_handed_over(&self) -> u32 {
        self.handover.cancelled().await;
        self.handed_over_to.load(Ordering::Acquire)
    }

    /// The pid of the process this one handed over to, if it has.
    pub(crate) fn handed_over_to(&self) -> Option<u32> {
        Some(self.handed_over_to.load(Ordering::Acquire)).filter(|pid| *pid != 0)
    }

    /// Upgrades in all, since the first host process.
    pub(crate) fn upgrade_count(&self) -> u64 {
        self.upgrade_count.load(Ordering::Relaxed)
    }

    /// Where to send an upgrade order, if this host can upgrade.
    pub(crate) fn orders(&self) -> Option<&mpsc::Sender<UpgradeOrder>> {
        self.orders.as_ref()
    }

    /// Every upgrade remembered, oldest first; the last one (into this process) counts the
    /// connections adopted so far.
    pub(crate) fn upgrades(&self) -> Vec<UpgradeRecord> {
        let mut upgrades = self.upgrades.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let pid = std::process::id();
        if let Some(last) = upgrades.last_mut().filter(|u| u.to_pid == pid) {
            last.connections_handed_over = self.adopted();
        }
        upgrades
    }

    /// Records an upgrade (this process's own hand-over, or the one that started it).
    fn record(&self, upgrade: UpgradeRecord) {
        let mut upgrades = self.upgrades.lock().unwrap_or_else(PoisonError::into_inner);
        upgrades.push(upgrade);
        let excess = upgrades.len().saturating_sub(UPGRADES_KEPT);
        upgrades.drain(..excess);
    }

    /// A connection handed over by the previous process was taken over.
    pub(crate) fn adopted_one(&self) {
        self.adopted.fetch_add(1, Ordering::Relaxed);
    }

    /// Connections taken over from the previous process.
    pub(crate) fn adopted(&self) -> u64 {
        self.adopted.load(Ordering::Relaxed)
    }
}
