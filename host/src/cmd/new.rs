//! `hotswap new`: a new plugin crate, ready for `hotswap dev` and `cargo test`.
//!
//! Writes `Cargo.toml` (a cdylib on handler-api, its own workspace), `src/lib.rs` (a handler,
//! or an axum Router with `--axum`, with a test on handler-api's test host), `README.md` and
//! `.gitignore`. It never overwrites: the directory must not exist, or be empty.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

use crate::cmd::cli::NewArgs;

/// The handler-api of the source tree this binary was built from, if it is still there.
fn bundled_handler_api() -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?.join("handler-api");
    path.join("Cargo.toml").is_file().then(|| path.canonicalize().unwrap_or(path))
}

pub(crate) fn run(args: NewArgs) -> anyhow::Result<()> {
    let name = args.name.as_str();
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !valid {
        bail!("{name:?} is not a crate name: use letters, digits, '-' and '_', starting with a letter");
    }
    if RESERVED.contains(&name.replace('-', "_").as_str()) {
        bail!("{name:?} cannot name a plugin crate (a Rust keyword, a standard crate, or handler-api itself): choose another");
    }
    let dir = args.path.clone().unwrap_or_else(|| PathBuf::from(name));
    if dir.exists() && dir.read_dir().with_context(|| format!("cannot read {}", dir.display()))?.next().is_some() {
        bail!("{} exists and is not empty: choose another name or --path", dir.display());
    }
    // Where handler-api comes from, as the inside of an inline table (`path = "…"`).
    let source = match (&args.handler_api_git, &args.handler_api) {
        (Some(url), _) => format!("git = {}", toml_string(url)),
        (None, Some(path)) => path_source(path)?,
        (None, None) => match bundled_handler_api() {
            Some(path) => path_source(&path)?,
            None => bail!(
                "cannot find handler-api: give --handler-api PATH (the handler-api directory of a hotswap \
                 checkout) or --handler-api-git URL (the hotswap repository)"
            ),
        },
    };
    let files = [
        ("Cargo.toml", cargo_toml(name, &source, args.axum)),
        ("src/lib.rs", if args.axum { AXUM_LIB.to_owned() } else { HANDLER_LIB.to_owned() }.replace("{name}", name)),
        ("README.md", readme(name)),
        (".gitignore", "/target\n".to_owned()),
    ];
    for (file, text) in files {
        let path = dir.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let dev = format!("cd {} && hotswap dev", dir.display());
    let width = dev.len().max("cargo test".len());
    if let Some(workspace) = enclosing_workspace(&dir) {
        // Cargo refuses a crate with a [workspace] of its own that an enclosing workspace's
        // `members` claims; one outside them builds on its own, as meant.
        eprintln!(
            "note: {} is inside the cargo workspace of {}: if its `members` take this directory in, \
             remove the [workspace] line of {name}'s Cargo.toml and list it there instead",
            dir.display(),
            workspace.display()
        );
    }
    println!("Created the plugin {name} in {}. Next:", dir.display());
    println!("  {dev:width$}   # serves it on http://127.0.0.1:8080, rebuilt and swapped in on every save");
    println!("  {:width$}   # runs its tests, on handler-api's test host", "cargo test");
    Ok(())
}

/// Names a plugin crate cannot take: Rust keywords, the standard crates, and its dependency.
const RESERVED: &[&str] = &[
    "as", "async", "await", "break", "const", "continue", "crate", "dyn", "else", "enum", "extern", "false", "fn", "for",
    "if", "impl", "in", "let", "loop", "match", "mod", "move", "mut", "pub", "ref", "return", "self", "static", "struct",
    "super", "trait", "true", "type", "unsafe", "use", "where", "while", "abstract", "become", "box", "do", "final", "gen",
    "macro", "override", "priv", "try", "typeof", "unsized", "virtual", "yield", "alloc", "core", "proc_macro", "std",
    "test", "handler_api",
];

/// The directory of the nearest `Cargo.toml` with a `[workspace]` above `dir`, if any.
fn enclosing_workspace(dir: &Path) -> Option<PathBuf> {
    let dir = std::path::absolute(dir).ok()?;
    dir.ancestors().skip(1).find(|d| {
        std::fs::read_to_string(d.join("Cargo.toml")).is_ok_and(|toml| toml.lines().any(|l| l.trim() == "[workspace]"))
    }).map(Path::to_path_buf)
}

/// `path = "…"` for the handler-api crate at `path`.
fn path_source(path: &Path) -> anyhow::Result<String> {
    let path = path.canonicalize().with_context(|| format!("no handler-api at {}", path.display()))?;
    if !path.join("Cargo.toml").is_file() {
        bail!("{} is not the handler-api crate (it has no Cargo.toml)", path.display());
    }
    let path = path.to_str().with_context(|| format!("{} is not UTF-8, which Cargo.toml needs", path.display()))?;
    Ok(format!("path = {}", toml_string(path)))
}

/// `text` as a TOML basic string.
fn toml_string(text: &str) -> String {
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for c in text.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            c if c.is_control() => quoted.push_str(&format!("\\u{:04X}", c as u32)),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

/// The crate's manifest; `source` says where handler-api comes from (see [`path_source`]).
fn cargo_toml(name: &str, source: &str, axum: bool) -> String {
    let (features, other_deps) = if axum {
        (
            ", features = [\"axum\"]",
            "# No runtime features: the host runs the app.\naxum = { version = \"0.8\", default-features = false, features = [\"json\", \"query\"] }\n",
        )
    } else {
        ("", "http = \"1\"\n")
    };
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2021"

[lib]
# A hotswap plugin is a C-compatible dynamic library.
crate-type = ["cdylib"]

[dependencies]
handler-api = {{ {source}{features} }}
{other_deps}
[dev-dependencies]
handler-api = {{ {source}, features = ["testing"{dev_features}] }}
tokio = {{ version = "1", features = ["rt", "macros"] }}

# A crate of its own, outside any enclosing workspace.
[workspace]
"#,
        dev_features = if axum { ", \"axum\"" } else { "" },
    )
}

fn readme(name: &str) -> String {
    format!(
        "# {name}\n\nA plugin for hotswap, the HTTP server that swaps its code while it runs.\n\n- `hotswap dev`: serve it on http://127.0.0.1:8080; \
         every save rebuilds it and swaps the new build in without a restart.\n- `cargo test`: its tests, on \
         handler-api's test host.\n- `cargo build --release`, then `hotswap serve --plugin-dir DIR` with \
         `target/release/lib{lib}.so` copied into DIR: production.\n",
        lib = name.replace('-', "_")
    )
}

const HANDLER_LIB: &str = r#"//! {name}: a hotswap plugin.

use handler_api::{export_handler, IntoResponse, Request, Response};
use http::{Method, StatusCode};

/// Routes a request.
async fn app(req: Request) -> Response {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/") => "hello from {name}\n".into_response(),
        _ => (StatusCode::NOT_FOUND, "not found\n").into_response(),
    }
}

export_handler!(name: "{name}", version: env!("CARGO_PKG_VERSION"), handler: app);

#[cfg(test)]
mod tests {
    use handler_api::testing::TestHost;

    #[tokio::test]
    async fn greets() {
        let host = TestHost::new(super::app);
        let res = host.get("/").await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.text(), "hello from {name}\n");
        assert_eq!(host.get("/nowhere").await.status(), 404);
    }
}
"#;

const AXUM_LIB: &str = r#"//! {name}: an axum app as a hotswap plugin.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use handler_api::export_handler;

/// State of one loaded build: a new build starts with its own.
#[derive(Default)]
struct AppState {
    visits: AtomicU64,
}

/// Builds the app when the host loads this build.
fn app() -> Result<Router, String> {
    Ok(Router::new()
        .route("/", get(hello))
        .route("/visits", get(visits))
        .with_state(Arc::new(AppState::default())))
}

export_handler!(name: "{name}", version: env!("CARGO_PKG_VERSION"), service: app);

async fn hello(State(state): State<Arc<AppState>>) -> String {
    state.visits.fetch_add(1, Ordering::Relaxed);
    "hello from {name}\n".to_owned()
}

async fn visits(State(state): State<Arc<AppState>>) -> Json<u64> {
    Json(state.visits.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use handler_api::testing::TestHost;

    #[tokio::test]
    async fn counts_visits() {
        let host = TestHost::service(super::app().unwrap());
        assert_eq!(host.get("/").await.text(), "hello from {name}\n");
        assert_eq!(host.get("/visits").await.text(), "1");
    }
}
"#;
