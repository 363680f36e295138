//! `hotswap dev`: live reload while developing a plugin.
//!
//! Finds the package and its local path dependencies with `cargo metadata`, watches their
//! sources, runs `cargo build` on a change and swaps the new build in when it succeeds. The
//! compiler's diagnostics go straight to the terminal; a failed build leaves the previous
//! generation serving.

#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use notify::{RecursiveMode, Watcher};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cmd::cli::DevArgs;
use crate::cmd::lifecycle::Role;
use crate::control::builds::PluginSource;
use crate::control::canary::CanaryPolicy;
use crate::control::registry::Registry;
use crate::plugin::trust::Trust;

/// Quiet time after a source change before building (editors write in bursts).
const DEBOUNCE: Duration = Duration::from_millis(150);

pub(crate) async fn run(args: DevArgs) -> anyhow::Result<()> {
    let (package, sources) = source_dirs(args.package.as_deref()).await?;
    tracing::info!(package = %package.name, "building");
    // Before the host's signal handlers: Ctrl-C ends the host, and cargo with it (the first
    // build stays in the terminal's process group).
    let artifact = build(&package, args.release, Group::Terminal).await?.context("the first build failed (errors above); fix them and run again")?;
    // Before the host loads it: a build made meanwhile by other means is then swapped in.
    let served = identity(&artifact);
    let release = args.release;
    // What dev mode loads is what it has just built itself, in the user's own workspace.
    let trust = Trust { own_build: true, ..Trust::default() };
    crate::cmd::lifecycle::run(&args.host, trust, PluginSource::file(&artifact), CanaryPolicy::default(), Role::Dev, move |registry, _hangup, shutdown| {
        rebuild_loop(package, release, sources, served, registry, shutdown)
    }).await
}

/// A package of the user's workspace.
struct Package {
    name: String,
    /// Cargo's id of it, which names the package of each artifact cargo reports.
    id: String,
}

/// The package to build (`package`, or the one in the current directory, or at the root of
/// hotswap's repository its example), and the directories of it and of every local package it
/// depends on by path.
async fn source_dirs(package: Option<&str>) -> anyhow::Result<(Package, Sources)> {
    let out = tokio::process::Command::new(cargo())
        .args(["metadata", "--format-version", "1"])
        .stderr(Stdio::inherit())
        .output()
        .await
        .context("cannot run cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata failed: run `hotswap dev` inside the plugin's cargo workspace");
    }
    let meta: Value = serde_json::from_slice(&out.stdout).context("cannot parse cargo metadata")?;
    // Local packages (no registry source) by name, with their id, directory and path deps.
    let mut local: HashMap<&str, (&str, PathBuf, Vec<PathBuf>)> = HashMap::new();
    for p in meta["packages"].as_array().into_iter().flatten() {
        if !p["source"].is_null() {
            continue;
        }
        let (Some(name), Some(id), Some(manifest)) = (p["name"].as_str(), p["id"].as_str(), p["manifest_path"].as_str()) else { continue };
        let dir = Path::new(manifest).parent().map(Path::to_path_buf).unwrap_or_default();
        let deps = p["dependencies"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d["path"].as_str().map(PathBuf::from))
            .collect();
        local.insert(name, (id, dir, deps));
    }
    // The plugins here: local packages with a cdylib target.
    let plugins: Vec<&str> = meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["source"].is_null())
        .filter(|p| {
            let targets = p["targets"].as_array().into_iter().flatten();
            targets.flat_map(|t| t["crate_types"].as_array().into_iter().flatten()).any(|c| c == "cdylib")
        })
        .filter_map(|p| p["name"].as_str())
        .collect();
    // `resolve.root`: the package of the current directory (or the nearest one above it).
    let root = meta["resolve"]["root"].as_str().and_then(|id| {
        let packages = meta["packages"].as_array()?;
        packages.iter().find(|p| p["id"].as_str() == Some(id))?["name"].as_str()
    });
    let package = match (package, root) {
        (Some(package), _) => package,
        (None, Some(root)) if plugins.contains(&root) => root,
        (None, _) if plugins.contains(&"example-handler") => "example-handler",
        (None, _) if plugins.len() == 1 => plugins[0],
        (None, _) if plugins.is_empty() => {
            bail!("no plugin here: no package of this cargo workspace builds a cdylib (crate-type = [\"cdylib\"] in its [lib])")
        }
        (None, _) => bail!("several plugins here ({}): give one with --package NAME", plugins.join(", ")),
    };
    let Some((id, dir, _)) = local.get(package) else {
        bail!("no package `{package}` in this cargo workspace (give --package NAME)");
    };
    let by_dir: HashMap<PathBuf, &str> = local.iter().map(|(n, (_, d, _))| (d.clone(), *n)).collect();
    let mut seen = HashSet::new();
    let mut queue = VecDeque::from([dir.clone()]);
    while let Some(dir) = queue.pop_front() {
        if !seen.insert(dir.clone()) {
            continue;
        }
        if let Some((_, _, deps)) = by_dir.get(&dir).and_then(|n| local.get(n)) {
            queue.extend(deps.iter().cloned());
        }
    }
    let mut dirs: Vec<PathBuf> = seen.into_iter().collect();
    dirs.sort();
    let target = meta["target_directory"].as_str().map(PathBuf::from).unwrap_or_default();
    Ok((Package { name: package.to_owned(), id: (*id).to_owned() }, Sources { dirs, target }))
}

/// Where a package's sources are: its directory and those of the local packages it depends
/// on, less cargo's build output.
struct Sources {
    dirs: Vec<PathBuf>,
    /// Cargo's target directory (wherever it is set: `CARGO_TARGET_DIR`, `.cargo/config.toml`).
    target: PathBuf,
}

impl Sources {
    /// Whether a change of `path` may change the build: any file of a package (its code, and
    /// what it reads with `include_str!` or a build script) but build output, hidden files
    /// and directories (`.git`), and editors' scratch files. Cargo then decides whether
    /// anything is to be rebuilt.
    fn has(&self, path: &Path) -> bool {
        if path.starts_with(&self.target) && !self.target.as_os_str().is_empty() {
            return false;
        }
        let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
        if name.ends_with('~') || name.ends_with(".swp") || name.ends_with(".swx") || name == "4913" {
            return false;
        }
        self.dirs.iter().filter_map(|d| path.strip_prefix(d).ok()).any(|rel| {
            !rel.components().any(|c| c.as_os_str() == "target" || c.as_os_str().to_string_lossy().starts_with('.'))
        })
    }

    /// Watches every directory of the packages but build output and hidden ones: a recursive
    /// watch on a package would take one inotify watch per directory of its `target/`. Run
    /// again at each change, for directories made since.
    fn watch(&self, watcher: &mut impl Watcher) {
        for dir in &self.dirs {
            if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
                tracing::warn!(dir = %dir.display(), "cannot watch: {e}");
            }
            let Ok(entries) = std::fs::read_dir(dir) else { continue };
            for entry in entries.flatten() {
                let path = entry.path();
                // Through a symbolic link too (`fs::metadata` follows it).
                if std::fs::metadata(&path).is_ok_and(|m| m.is_dir()) && self.has(&path.join("x")) {
                    if let Err(e) = watcher.watch(&path, RecursiveMode::Recursive) {
                        tracing::warn!(dir = %path.display(), "cannot watch: {e}");
                    }
                }
            }
        }
    }
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Which process group a cargo build runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Group {
    /// The terminal's, as the host's: Ctrl-C reaches it.
    Terminal,
    /// One of its own, ended with the build (the host handles the signals by then).
    Own,
}

/// The process group of a cargo build, ended if the build is given up before cargo exits.
struct BuildGroup(Option<u32>);

impl Drop for BuildGroup {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            crate::sys::terminate_group(pgid);
        }
    }
}

/// A file's device, inode, length and modification time.
type FileIdentity = (u64, u64, u64, std::time::SystemTime);

/// What tells one build's file from another: cargo leaves a file it found nothing to rebuild
/// as it was, and a build made meanwhile by other means (`cargo test`, an editor) replaces it.
fn identity(file: &Path) -> Option<FileIdentity> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(file).ok()?;
    Some((meta.dev(), meta.ino(), meta.len(), meta.modified().ok()?))
}

/// Builds `package`; `Ok(None)` when the build failed (its diagnostics were printed).
async fn build(package: &Package, release: bool, group: Group) -> anyhow::Result<Option<PathBuf>> {
    let Package { name: package, id } = package;
    let mut cmd = tokio::process::Command::new(cargo());
    cmd.args(["build", "-p", package, "--message-format=json-render-diagnostics"]);
    if release {
        cmd.arg("--release");
    }
    // A build given up (the host stops meanwhile) stops with it, rustc's processes too: cargo
    // runs in a process group of its own, which the guard ends. It reads nothing (a process
    // outside the terminal's group that reads it is stopped).
    if group == Group::Own {
        cmd.process_group(0);
    }
    cmd.kill_on_drop(true).stdin(Stdio::null());
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().context("cannot run cargo build")?;
    let mut group = BuildGroup(child.id().filter(|_| group == Group::Own));
    let stdout = child.stdout.take().context("cargo's output")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut artifact = None;
    while let Some(line) = lines.next_line().await? {
        let Ok(message) = serde_json::from_str::<Value>(&line) else { continue };
        // The package's own library, whatever its [lib] name.
        let cdylib = || message["target"]["kind"].as_array().into_iter().flatten().any(|k| k == "cdylib");
        if message["reason"] == "compiler-artifact" && message["package_id"] == id.as_str() && cdylib() {
            let so = message["filenames"].as_array().into_iter().flatten().filter_map(Value::as_str).find(|f| f.ends_with(".so"));
            if let Some(so) = so {
                artifact = Some(PathBuf::from(so));
            }
        }
    }
    let status = child.wait().await?;
    group.0 = None; // done: its pid may be another process's now
    if !status.success() {
        return Ok(None);
    }
    match artifact {
        Some(a) => Ok(Some(a)),
        None => bail!("`{package}` built, but produced no .so: set crate-type = [\"cdylib\"] in its [lib] section"),
    }
}

async fn rebuild_loop(
    package: Package,
    release: bool,
    sources: Sources,
    // The file of the build that serves.
    mut serving: Option<FileIdentity>,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let sources = Arc::new(sources);
    let watched = sources.clone();
    // The watcher's thread is the host's (see plugin::threads).
    let watcher = crate::plugin::threads::adopt(|| notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        let relevant = event.kind.is_create() || event.kind.is_modify() || event.kind.is_remove();
        if relevant && event.paths.iter().any(|p| watched.has(p)) {
            let _ = tx.send(());
        }
    }));
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => return tracing::error!("cannot watch the sources ({e}); live reload is off"),
    };
    sources.watch(&mut watcher);
    tracing::info!(package = %package.name, dirs = ?sources.dirs, "watching sources for changes");
    loop {
        tokio::select! {
            Some(()) = rx.recv() => {}
            () = shutdown.cancelled() => return,
        }
        // Debounce: wait until the burst of writes is over.
        loop {
            tokio::select! {
                Some(()) = rx.recv() => continue,
                () = tokio::time::sleep(DEBOUNCE) => break,
                () = shutdown.cancelled() => return,
            }
        }
        sources.watch(&mut watcher);
        tracing::info!(package = %package.name, "sources changed: rebuilding");
        // The host may be told to stop while cargo works: it does not wait for the build,
        // nor load it.
        let built = tokio::select! {
            built = build(&package, release, Group::Own) => built,
            () = shutdown.cancelled() => return,
        };
        match built {
            Ok(Some(artifact)) if identity(&artifact).is_some_and(|built| Some(built) == serving) => {
                tracing::info!("nothing the build uses changed: generation {} keeps serving", registry.current().id());
            }
            Ok(Some(artifact)) => {
                let built = identity(&artifact);
                // A refusal is logged and recorded by the registry.
                if let Ok(generation) = registry.load_and_swap(&artifact).await {
                    serving = built;
                    tracing::info!(generation = generation.id(), plugin = %generation.label(), "rebuilt and swapped in");
                }
            }
            Ok(None) => {
                let current = registry.current();
                tracing::warn!("build failed (compiler errors above); generation {} ({}) keeps serving", current.id(), current.label());
            }
            Err(e) => tracing::warn!("build failed: {e:#}"),
        }
    }
}
