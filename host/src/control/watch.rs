//! Watching the plugin directory and turning file changes into swaps.
//!
//! Files arrive in many ways, and each must end in exactly one load of a complete file:
//!
//! - renamed into place (atomic): loaded at once;
//! - written in place (`cp` over a file, a slow writer): loaded when the writer closes it,
//!   and only if the ELF image is as long as its headers say (`loader::check_complete`); a
//!   file that stays incomplete for [`GIVE_UP_AFTER`] is refused as truncated;
//! - replaced with a new inode (what `cargo build` does): like a rename;
//! - editor and temporary files, names that are not `*.so`: ignored;
//! - a plugin file removed: logged; the current generation keeps serving;
//! - the directory removed and created again: watched again once it is back;
//! - a directory the OS cannot watch (an inotify limit reached, say): scanned every
//!   [`POLL`] instead, with a warning that says why and how to fix it.
//!
//! Events coalesce: the loop drains everything pending before it loads, loads one candidate
//! at a time, the most recently modified complete candidate first; whether it serves is the
//! registry's rule (see `builds`). SIGHUP rescans
//! the directory. Every refusal is logged with the file and the exact reason, and recorded in
//! the registry.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecursiveMode, Watcher};
use tokio::signal::unix::Signal;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::control::builds::PluginSource;
use crate::plugin::threads;
use crate::plugin::GenerationError;
use crate::plugin::loader::{Identity, LoadError};
use crate::control::registry::{Outcome, Registry};

/// A file written in place is loaded this long after its last change even if no close event
/// arrives (writers that keep the file open, or mmap it).
const SETTLE: Duration = Duration::from_millis(300);
/// A file that stays incomplete, unchanged, this long is refused as truncated.
pub(crate) const GIVE_UP_AFTER: Duration = Duration::from_secs(2);
/// How often a directory that cannot be watched is scanned instead, and how often a watched
/// one is checked for having been replaced under its path (a renamed directory, a symlink
/// pointed elsewhere: inotify goes on watching the old one, and says nothing).
const POLL: Duration = Duration::from_secs(2);

/// Which directory a path names now (symlinks followed): device and inode.
fn dir_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).ok().filter(std::fs::Metadata::is_dir).map(|m| (m.dev(), m.ino()))
}

/// A file that has changed and not yet been loaded or refused.
#[derive(Debug)]
struct Pending {
    /// Complete as far as the writer is concerned (renamed in, or closed after writing).
    closed: bool,
    last_event: Instant,
    /// When it was first found incomplete, and as what.
    incomplete_since: Option<(Instant, Identity)>,
}

/// Why the loop woke up.
enum Trigger {
    Fs(notify::Result<notify::Event>),
    Rescan(&'static str),
}

/// Watches `source` and swaps in new plugins until `shutdown`.
/// `hangup` delivers SIGHUP, which rescans the directory.
pub(crate) async fn run(source: PluginSource, registry: Arc<Registry>, hangup: Signal, shutdown: CancellationToken) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let fs_tx = tx.clone();
    // The watcher's thread is the host's (see plugin::threads). Without one (the inotify
    // instance limit reached), the directory is scanned instead.
    let mut watcher = threads::adopt(|| {
        notify::recommended_watcher(move |event| {
            let _ = fs_tx.send(Trigger::Fs(event));
        })
    });
    spawn_sighup(tx.clone(), hangup, shutdown.clone());

    // The directory being watched, as it was when the watch began.
    let mut watched: Option<(u64, u64)> = None;
    // The directory exists but the OS refuses to watch it: scanned every POLL instead.
    let mut polling: Option<Instant> = None;
    let mut handled: HashMap<PathBuf, Identity> = HashMap::new();
    // What is serving already counts as handled. (Scoped: holding the Arc would keep that
    // generation resident for as long as the watcher runs.)
    {
        // As it was when loaded: a file replaced since then is a new candidate.
        let current = registry.current();
        handled.insert(current.source().to_path_buf(), current.identity());
    }
    let mut pending: HashMap<PathBuf, Pending> = HashMap::new();
    let mut rescan: Option<&'static str> = None;

    loop {
        if watched.is_some() && dir_id(&source.dir) != watched {
            tracing::info!(dir = %source.dir.display(), "the plugin directory was replaced (renamed, or its symlink re-pointed)");
            if let Ok(watcher) = &mut watcher {
                let _ = watcher.unwatch(&source.dir);
            }
            watched = None;
        }
        if watched.is_none() {
            let id = dir_id(&source.dir);
            let outcome = match (&mut watcher, id) {
                // Gone, or no directory (a file in its place): waited for, as a directory gone.
                (_, None) => Err(notify::Error::generic("not a directory")),
                (Ok(watcher), Some(_)) => watcher.watch(&source.dir, RecursiveMode::NonRecursive),
                (Err(e), Some(_)) => Err(notify::Error::generic(&format!("no file watcher: {e}"))),
            };
            match outcome {
                Ok(()) => {
                    watched = id;
                    polling = None;
                    tracing::info!(dir = %source.dir.display(), "watching for new plugin builds");
                    rescan.get_or_insert("directory (re)appeared");
                }
                Err(e) if source.dir.is_dir() => match polling {
                    None => {
                        tracing::warn!(
                            dir = %source.dir.display(),
                            "cannot watch the plugin directory ({e}); scanning it every {POLL:?} instead. \
                             If an inotify limit is reached, raise it (sysctl fs.inotify.max_user_watches or fs.inotify.max_user_instances)"
                        );
                        polling = Some(Instant::now());
                        rescan.get_or_insert("directory cannot be watched");
                    }
                    Some(last) if last.elapsed() >= POLL => {
                        polling = Some(Instant::now());
                        rescan.get_or_insert("poll");
                    }
                    Some(_) => {}
                },
                Err(_) => polling = None, // gone: watched again once it is back
            }
        }
        let tick = if rescan.is_some() {
            Duration::ZERO // a rescan is due: do not wait for an event that may never come
        } else if !pending.is_empty() || (watched.is_none() && polling.is_none()) {
            Duration::from_millis(50)
        } else if let Some(last) = polling {
            POLL.saturating_sub(last.elapsed())
        } else {
            POLL // to see the directory replaced under its path
        };
        let first = tokio::select! {
            t = rx.recv() => t,
            () = tokio::time::sleep(tick) => None,
            () = shutdown.cancelled() => return,
        };
        // Coalesce: take everything that has arrived.
        let mut triggers: Vec<Trigger> = first.into_iter().collect();
        while let Ok(t) = rx.try_recv() {
            triggers.push(t);
        }
        for trigger in triggers {
            match trigger {
                Trigger::Rescan(why) => rescan = Some(why),
                Trigger::Fs(Err(e)) => tracing::warn!("watch error: {e}"),
                Trigger::Fs(Ok(event)) => {
                    if event.paths.iter().any(|p| p == &source.dir) && matches!(event.kind, EventKind::Remove(_)) {
                        tracing::warn!(dir = %source.dir.display(), "plugin directory removed; the current generation keeps serving");
                        if let Ok(watcher) = &mut watcher {
                            let _ = watcher.unwatch(&source.dir);
                        }
                        watched = None;
                    }
                    if event.need_rescan() {
                        // The kernel's queue overflowed: events were lost.
                        rescan = Some("file events were lost");
                    }
                    note_event(&source, &event, &mut pending);
                }
            }
        }
        if watched.is_none() && polling.is_none() && source.dir.is_dir() {
            continue; // re-watch first, then rescan
        }
        if let Some(why) = rescan.take() {
            if why == "SIGHUP" {
                // The same as `hotswap reload`: read everything again, retry refused builds.
                tokio::select! {
                    outcome = registry.reload() => log_reload(&outcome),
                    () = shutdown.cancelled() => return,
                }
            }
            for (path, identity) in source.scan() {
                if registry.has_read(&path, identity) {
                    pending.remove(&path);
                    handled.insert(path, identity);
                } else if handled.get(&path) != Some(&identity) {
                    // New since, or still being written: taken like any other event.
                    pending.entry(path).or_insert(Pending { closed: true, last_event: Instant::now(), incomplete_since: None });
                }
            }
        }
        if let Some(path) = pick(&mut pending, &handled) {
            tokio::select! {
                () = attempt(&path, &registry, &mut pending, &mut handled) => {}
                () = shutdown.cancelled() => return abandon(&path),
            }
        }
    }
}

/// Shutdown came while `path` was being loaded: it is dropped (and unloaded) unserved.
fn abandon(path: &Path) {
    tracing::info!(file = %path.display(), "shutting down: the plugin being loaded is abandoned");
}

/// Says what a SIGHUP did.
fn log_reload(outcome: &Outcome) {
    match outcome {
        Outcome::Unchanged { serving, .. } => tracing::info!(
            "SIGHUP: no new plugin file; generation {} ({}@{}) keeps serving", serving.generation, serving.name, serving.version
        ),
        Outcome::Swapped { to, .. } => tracing::info!("SIGHUP: swapped in generation {} ({}@{})", to.generation, to.name, to.version),
        Outcome::Refused { serving, refused } => tracing::warn!(
            "SIGHUP: refused ({}); generation {} ({}@{}) keeps serving",
            refused.join("; "), serving.generation, serving.name, serving.version
        ),
        Outcome::Canary { canary, percent, refused, .. } => {
            tracing::info!("SIGHUP: generation {} ({}@{}) runs as a canary ({percent} %)", canary.generation, canary.name, canary.version);
            if !refused.is_empty() {
                tracing::warn!("SIGHUP: refused first: {}", refused.join("; "));
            }
        }
        Outcome::RolledBack { .. } => {}
    }
}

fn note_event(source: &PluginSource, event: &notify::Event, pending: &mut HashMap<PathBuf, Pending>) {
    for path in &event.paths {
        let Some(path) = source.plugin_path(path) else { continue };
        match event.kind {
            EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_)) if !path.exists() => {
                pending.remove(&path);
                tracing::info!(file = %path.display(), "plugin file removed; the current generation keeps serving");
            }
            EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(ModifyKind::Name(_))
            | EventKind::Create(_)
            | EventKind::Modify(_) => {
                // A file renamed into place is complete; a created or modified one is
                // complete once its writer closes it (or after SETTLE without changes).
                let closed = matches!(
                    event.kind,
                    EventKind::Access(AccessKind::Close(AccessMode::Write)) | EventKind::Modify(ModifyKind::Name(_))
                );
                let entry = pending.entry(path).or_insert(Pending {
                    closed,
                    last_event: Instant::now(),
                    incomplete_since: None,
                });
                entry.closed = closed || (entry.closed && !matches!(event.kind, EventKind::Modify(ModifyKind::Data(_))));
                entry.last_event = Instant::now();
            }
            _ => {}
        }
    }
}

/// The newest pending file that is ready to load; drops pending files that vanished or are
/// what is already handled.
fn pick(pending: &mut HashMap<PathBuf, Pending>, handled: &HashMap<PathBuf, Identity>) -> Option<PathBuf> {
    pending.retain(|path, _| Identity::of(path).is_some_and(|id| handled.get(path) != Some(&id)));
    pending
        .iter()
        .filter(|(_, p)| p.closed || p.last_event.elapsed() >= SETTLE)
        .filter_map(|(path, _)| Some((path.clone(), Identity::of(path)?)))
        .max_by_key(|(_, id)| id.modified)
        .map(|(path, _)| path)
}

async fn attempt(
    path: &Path,
    registry: &Registry,
    pending: &mut HashMap<PathBuf, Pending>,
    handled: &mut HashMap<PathBuf, Identity>,
) {
    let Some(identity) = Identity::of(path) else { return };
    match registry.offer(path).await {
        Ok(_) => {
            // Swapped in, or read and not chosen (a lower version, a pin): either way handled.
            pending.remove(path);
            handled.insert(path.to_path_buf(), identity);
        }
        Err(e @ GenerationError::Load(LoadError::Incomplete { len, needed, .. })) => {
            let Some(entry) = pending.get_mut(path) else { return };
            entry.closed = false; // wait for the writer
            match entry.incomplete_since {
                Some((since, seen)) if seen == identity && since.elapsed() >= GIVE_UP_AFTER => {
                    let reason = format!(
                        "incomplete file: {len} bytes, but its ELF headers say it ends at byte {needed}; unchanged for {GIVE_UP_AFTER:?}, so it is truncated"
                    );
                    registry.refuse(path, e.kind(), &reason, None);
                    pending.remove(path);
                    handled.insert(path.to_path_buf(), identity);
                }
                Some((_, seen)) if seen == identity => {}
                _ => {
                    tracing::debug!(file = %path.display(), len, needed, "plugin file still incomplete; waiting for the writer");
                    entry.incomplete_since = Some((Instant::now(), identity));
                    entry.last_event = Instant::now();
                }
            }
        }
        Err(_) => {
            // Refused, and recorded as such by the registry.
            pending.remove(path);
            handled.insert(path.to_path_buf(), identity);
        }
    }
}

fn spawn_sighup(tx: mpsc::UnboundedSender<Trigger>, mut hup: Signal, shutdown: CancellationToken) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                Some(()) = hup.recv() => {
                    tracing::info!("SIGHUP: rescanning the plugin directory");
                    if tx.send(Trigger::Rescan("SIGHUP")).is_err() { return; }
                }
                () = shutdown.cancelled() => return,
            }
        }
    });
}
