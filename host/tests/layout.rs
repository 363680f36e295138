//! The host's layout, as its README and crate docs describe it: modules import one another
//! without cycles, and `unsafe` code lives only in `plugin` and `sys`.
//!
//! Reads the sources: every `crate::a::b` path is an edge from the module it is written in
//! to the deepest module it names, and every `mod` an edge from a parent to its child (so a
//! child that imports its parent closes a cycle too).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn sources() -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("readable source directory") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    files
        .into_iter()
        .filter(|f| f.file_name().is_some_and(|n| n != "main.rs"))
        .map(|file| {
            let relative = file.strip_prefix(&src).expect("under src").with_extension("");
            let mut parts: Vec<String> = relative.iter().map(|p| p.to_string_lossy().into_owned()).collect();
            if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
                parts.pop();
            }
            let module = if parts.is_empty() { "crate".to_owned() } else { format!("crate::{}", parts.join("::")) };
            let text = std::fs::read_to_string(&file).expect("readable source");
            (module, code_only(&text))
        })
        .collect()
}

/// The text without comments and without `#[cfg(test)]` modules (which may use anything).
fn code_only(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// Every `crate::...` path in `code`, as far as its lowercase segments go.
fn crate_paths(code: &str) -> Vec<String> {
    let mut paths = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at..];
        let end = rest.find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == ':')).unwrap_or(rest.len());
        paths.push(rest[..end].trim_end_matches(':').to_owned());
    }
    paths
}

#[test]
fn host_modules_import_each_other_without_cycles() {
    let sources = sources();
    let modules: BTreeSet<&str> = sources.iter().map(|(m, _)| m.as_str()).collect();
    let mut edges: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for (module, code) in &sources {
        let targets = edges.entry(module.as_str()).or_default();
        for path in crate_paths(code) {
            let mut target = path.as_str();
            while !modules.contains(target) {
                match target.rfind("::") {
                    Some(at) => target = &target[..at],
                    None => break,
                }
            }
            if target != module && modules.contains(target) {
                targets.insert(target.to_owned());
            }
        }
        if let Some(at) = module.rfind("::") {
            edges.entry(&module[..at]).or_default().insert(module.clone());
        }
    }
    // Depth-first search for a back edge.
    fn visit<'a>(
        node: &'a str,
        edges: &'a BTreeMap<&str, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| *n == node) {
            let mut cycle: Vec<String> = path[at..].iter().map(|s| s.to_string()).collect();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if !done.insert(node) {
            return None;
        }
        path.push(node);
        for next in edges.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, edges, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for module in &modules {
        if let Some(cycle) = visit(module, &edges, &mut Vec::new(), &mut done) {
            panic!("an import cycle between the host's modules: {}", cycle.join(" -> "));
        }
    }
    // The folders depend on each other one way only.
    for (from, to) in [("crate::plugin", "crate::serve"), ("crate::plugin", "crate::control"), ("crate::plugin", "crate::cmd"),
        ("crate::serve", "crate::control"), ("crate::serve", "crate::cmd"), ("crate::control", "crate::serve"), ("crate::control", "crate::cmd")]
    {
        for (module, targets) in &edges {
            if module.starts_with(from) {
                let bad: Vec<_> = targets.iter().filter(|t| t.starts_with(to)).collect();
                assert!(bad.is_empty(), "{module} imports {bad:?}: {from} must not depend on {to}");
            }
        }
    }
}

#[test]
fn unsafe_code_lives_only_in_plugin_and_sys() {
    for (module, code) in sources() {
        let allowed = module.starts_with("crate::plugin") || module == "crate::sys";
        let uses_unsafe = code.match_indices("unsafe").any(|(at, word)| {
            let (before, after) = (code[..at].chars().next_back(), code[at + word.len()..].chars().next());
            let boundary = |c: Option<char>| !c.is_some_and(|c| c.is_alphanumeric() || c == '_');
            // The keyword, not the word quoted as text (a list of Rust keywords has it).
            boundary(before) && boundary(after) && before != Some('"') && after != Some('"')
        });
        assert!(allowed || !uses_unsafe, "{module} uses `unsafe`: keep it in plugin/ or sys.rs");
    }
    for folder in ["serve", "control", "cmd"] {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(folder).join("mod.rs");
        let text = std::fs::read_to_string(&root).expect("readable module root");
        assert!(text.contains("#![forbid(unsafe_code)]"), "{} must forbid unsafe code", root.display());
    }
}
