//! The plugin builds the host knows of (files of the plugin directory, with their declared
//! name and version), and the rule that decides which one serves.
//!
//! ## Which build serves
//!
//! - By default, the highest version: a build replaces the serving one if it is a higher
//!   version of the same plugin, or the same version and newer on disk (a rebuild). A lower
//!   version never replaces a higher one. Versions compare by semantic-versioning precedence,
//!   so build metadata (`1.2.0+abc`) does not order builds; the newer file wins among them.
//! - A build of another plugin (another declared name) is another application: it replaces
//!   the serving one if it is newer on disk, and its versions are not compared.
//! - Under a pin, only builds of the pinned version serve; among them, the newer file.

#![forbid(unsafe_code)]

use std::cmp::Ordering;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use semver::Version;

use crate::plugin::loader::Identity;

/// A plugin file whose declaration has been read.
#[derive(Debug, Clone)]
pub(crate) struct Build {
    pub(crate) file: PathBuf,
    pub(crate) identity: Identity,
    pub(crate) name: String,
    pub(crate) version: Version,
    /// Refused when it was started; not tried again until SIGHUP or a reload.
    pub(crate) refused: bool,
    /// Rolled back as a canary: not tried again, even at a reload, unless started by hand.
    pub(crate) rolled_back: bool,
}

/// A version of a plugin the operator chose, by `pin` or `rollback`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pin {
    pub(crate) name: String,
    pub(crate) version: Version,
    pub(crate) by: PinnedBy,
}

/// What set a pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PinnedBy {
    Pin,
    Rollback,
}

impl std::fmt::Display for PinnedBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PinnedBy::Pin => "pin",
            PinnedBy::Rollback => "rollback",
        })
    }
}

impl Pin {
    /// Whether a build of plugin `name` at `version` satisfies the pin: the same plugin, the
    /// same precedence, and the same build metadata if the pin names any (`1.2.0` matches
    /// `1.2.0+abc`; `1.2.0+abc` only itself).
    pub(crate) fn matches(&self, name: &str, version: &Version) -> bool {
        name == self.name && is_version(version, &self.version)
    }
}

/// Whether `version` is `wanted`: the same precedence, and the same build metadata if
/// `wanted` names any.
pub(crate) fn is_version(version: &Version, wanted: &Version) -> bool {
    version.cmp_precedence(wanted) == Ordering::Equal && (wanted.build.is_empty() || version.build == wanted.build)
}

/// What serves now, as far as choosing goes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Serving<'a> {
    pub(crate) name: &'a str,
    pub(crate) version: &'a Version,
    /// When the file it was loaded from was last modified.
    pub(crate) modified: SystemTime,
}

/// Why a build does not replace the one serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotServed {
    /// Another version (or plugin) is pinned.
    Pinned,
    /// A lower version of the plugin serving.
    Lower,
    /// Not newer on disk than what serves (at an equal version, or of another plugin).
    NotNewer,
}

/// The rule (see the module docs): whether `build` should replace `serving`, or why not.
pub(crate) fn verdict(build: &Build, serving: &Serving<'_>, pin: Option<&Pin>) -> Result<(), NotServed> {
    let newer_file = if build.identity.modified > serving.modified { Ok(()) } else { Err(NotServed::NotNewer) };
    match pin {
        Some(pin) if !pin.matches(&build.name, &build.version) => Err(NotServed::Pinned),
        Some(pin) if pin.matches(serving.name, serving.version) => newer_file,
        Some(_) => Ok(()),
        None if build.name != serving.name => newer_file,
        None => match build.version.cmp_precedence(serving.version) {
            Ordering::Greater => Ok(()),
            Ordering::Equal => newer_file,
            Ordering::Less => Err(NotServed::Lower),
        },
    }
}

/// Whether `build` should replace `serving`.
pub(crate) fn replaces(build: &Build, serving: &Serving<'_>, pin: Option<&Pin>) -> bool {
    verdict(build, serving, pin).is_ok()
}

/// Why `build` does not replace `serving`, for the log and the admin API.
pub(crate) fn why_not(build: &Build, serving: &Serving<'_>, pin: Option<&Pin>) -> String {
    match (verdict(build, serving, pin), pin) {
        (Err(NotServed::Pinned), Some(pin)) => format!(
            "{}@{} is not served: version {} is pinned (by {}); `hotswap unpin` serves the highest version again",
            build.name, build.version, pin.version, pin.by
        ),
        (Err(NotServed::Lower), _) => format!(
            "{}@{} is not served: it is lower than {}, which serves; `hotswap pin {}` serves it",
            build.name, build.version, serving.version, build.version
        ),
        _ => format!("{}@{} is not served: it is not newer than what serves", build.name, build.version),
    }
}

/// The builds known, by file.
#[derive(Debug, Default)]
pub(crate) struct Builds {
    by_file: HashMap<PathBuf, Build>,
}

impl Builds {
    /// The build at `file`, if it is still the file as it was read.
    pub(crate) fn get(&self, file: &Path, identity: Identity) -> Option<&Build> {
        self.by_file.get(file).filter(|b| b.identity == identity)
    }

    pub(crate) fn insert(&mut self, build: Build) {
        self.by_file.insert(build.file.clone(), build);
    }

    pub(crate) fn mark_refused(&mut self, file: &Path) {
        if let Some(build) = self.by_file.get_mut(file) {
            build.refused = true;
        }
    }

    /// A canary of `file`, as `identity`, was rolled back.
    pub(crate) fn mark_rolled_back(&mut self, file: &Path, identity: Identity) {
        if let Some(build) = self.by_file.get_mut(file).filter(|b| b.identity == identity) {
            build.rolled_back = true;
        }
    }

    /// The build of `file` served after all (a canary started by hand, promoted).
    pub(crate) fn clear_rolled_back(&mut self, file: &Path) {
        if let Some(build) = self.by_file.get_mut(file) {
            build.rolled_back = false;
        }
    }

    /// Refused builds get another chance (SIGHUP, reload): what was wrong may have been
    /// fixed without a new file (a digest listed, disk space freed).
    pub(crate) fn forget_refusals(&mut self) {
        for build in self.by_file.values_mut() {
            build.refused = false;
        }
    }

    /// Drops builds whose file is gone or has changed since it was read.
    pub(crate) fn prune(&mut self) {
        self.by_file.retain(|file, build| Identity::of(file) == Some(build.identity));
    }

    /// Every build known.
    pub(crate) fn all(&self) -> impl Iterator<Item = &Build> {
        self.by_file.values()
    }

    /// Builds that should replace `serving` (every build, with nothing serving), best first:
    /// the plugin of the newest file first, then by version, then newest file first.
    pub(crate) fn better_than(&self, serving: Option<&Serving<'_>>, pin: Option<&Pin>) -> Vec<Build> {
        let mut better: Vec<Build> = self
            .by_file
            .values()
            .filter(|b| !b.refused && !b.rolled_back)
            .filter(|b| match serving {
                Some(serving) => replaces(b, serving, pin),
                None => pin.is_none_or(|pin| pin.matches(&b.name, &b.version)),
            })
            .cloned()
            .collect();
        let newest_name = better.iter().max_by_key(|b| b.identity.modified).map(|b| b.name.clone());
        better.sort_by(|a, b| {
            let ours = |x: &Build| Some(&x.name) == newest_name.as_ref();
            ours(b).cmp(&ours(a)).then_with(|| highest_first(a, b))
        });
        better
    }
}

/// The order of builds of one plugin: the highest version first, then the newest file.
pub(crate) fn highest_first(a: &Build, b: &Build) -> Ordering {
    b.version.cmp_precedence(&a.version).then_with(|| b.identity.modified.cmp(&a.identity.modified))
}

/// Where plugins come from: every `*.so` in a directory, or one file of it.
#[derive(Debug, Clone)]
pub(crate) struct PluginSource {
    pub(crate) dir: PathBuf,
    /// Only this file name (`--plugin PATH`), or any plugin name (`--plugin-dir DIR`).
    pub(crate) only: Option<std::ffi::OsString>,
}

impl PluginSource {
    pub(crate) fn directory(dir: PathBuf) -> PluginSource {
        PluginSource { dir, only: None }
    }

    pub(crate) fn file(path: &Path) -> PluginSource {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        PluginSource { dir, only: path.file_name().map(OsStr::to_os_string) }
    }

    /// The file (`--plugin`) or directory (`--plugin-dir`) builds are taken from.
    pub(crate) fn location(&self) -> PathBuf {
        self.only.as_ref().map_or_else(|| self.dir.clone(), |name| self.dir.join(name))
    }

    /// Whether a file of this name may be a plugin.
    pub(crate) fn accepts(&self, name: &OsStr) -> bool {
        if let Some(only) = &self.only {
            return name == only;
        }
        let name = name.to_string_lossy();
        !name.starts_with('.') && !name.starts_with('#') && !name.ends_with('~') && name.ends_with(".so")
    }

    /// The path of a plugin file this source serves, if `path` (from an event) is one.
    pub(crate) fn plugin_path(&self, path: &Path) -> Option<PathBuf> {
        let (name, parent) = (path.file_name()?, path.parent()?);
        let in_dir = parent == self.dir || same_dir(parent, &self.dir);
        (in_dir && self.accepts(name)).then(|| self.dir.join(name))
    }

    /// Plugin files now in the directory, newest first.
    pub(crate) fn scan(&self) -> Vec<(PathBuf, Identity)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return Vec::new() };
        let mut files: Vec<(PathBuf, Identity)> = entries
            .filter_map(Result::ok)
            .filter(|e| self.accepts(&e.file_name()))
            .filter_map(|e| Some((e.path(), Identity::of(&e.path())?)))
            .collect();
        files.sort_by_key(|f| std::cmp::Reverse(f.1.modified));
        files
    }
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn build(name: &str, version: &str, age_secs: u64) -> Build {
        let file = PathBuf::from(format!("{name}-{version}.so"));
        let modified = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 - age_secs);
        Build { file, identity: Identity::for_tests(modified), name: name.into(), version: Version::parse(version).unwrap(), refused: false, rolled_back: false }
    }

    fn serving(b: &Build) -> Serving<'_> {
        Serving { name: &b.name, version: &b.version, modified: b.identity.modified }
    }

    #[test]
    fn higher_versions_and_rebuilds_replace_lower_versions_do_not() {
        let v2 = build("app", "2.0.0", 100);
        assert!(replaces(&build("app", "3.0.0", 200), &serving(&v2), None), "higher, though older on disk");
        assert!(replaces(&build("app", "2.0.0", 50), &serving(&v2), None), "a rebuild");
        assert!(!replaces(&build("app", "2.0.0", 150), &serving(&v2), None), "an older file of the same version");
        assert!(!replaces(&build("app", "1.9.9", 0), &serving(&v2), None), "lower, though newer on disk");
        assert!(replaces(&build("app", "2.0.0+b", 50), &serving(&v2), None), "build metadata does not order");
        assert!(replaces(&build("other", "0.1.0", 50), &serving(&v2), None), "another plugin, newer");
        assert!(why_not(&build("app", "1.0.0", 0), &serving(&v2), None).contains("hotswap pin 1.0.0"));
    }

    #[test]
    fn a_pin_holds_against_newer_versions() {
        let v1 = build("app", "1.0.0", 100);
        let pin = Pin { name: "app".into(), version: Version::parse("1.0.0").unwrap(), by: PinnedBy::Pin };
        assert!(!replaces(&build("app", "2.0.0", 0), &serving(&v1), Some(&pin)));
        assert!(replaces(&build("app", "1.0.0+rebuilt", 0), &serving(&v1), Some(&pin)));
        assert!(!replaces(&build("other", "1.0.0", 0), &serving(&v1), Some(&pin)), "another plugin at the pinned version");
        let exact = Pin { name: "app".into(), version: Version::parse("1.0.0+a").unwrap(), by: PinnedBy::Rollback };
        assert!(!exact.matches("app", &Version::parse("1.0.0+b").unwrap()));
    }

    #[test]
    fn the_highest_version_of_the_newest_files_plugin_comes_first() {
        let mut builds = Builds::default();
        for b in [build("app", "1.0.0", 10), build("app", "2.0.0", 300), build("app", "1.5.0", 20), build("old", "9.0.0", 400)] {
            builds.insert(b);
        }
        let order: Vec<String> = builds.better_than(None, None).iter().map(|b| format!("{}@{}", b.name, b.version)).collect();
        assert_eq!(order, ["app@2.0.0", "app@1.5.0", "app@1.0.0", "old@9.0.0"]);
        let pin = Pin { name: "app".into(), version: Version::parse("1.5.0").unwrap(), by: PinnedBy::Pin };
        assert_eq!(builds.better_than(None, Some(&pin)).len(), 1);
    }
}
