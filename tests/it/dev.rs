//! `hotswap dev`: live reload of a crate's sources.

use std::time::{Duration, Instant};

use hotswap_tests::{temp_dir, workspace, Host, WAIT};

async fn wait_for_answer(host: &Host, want: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
    while Instant::now() < deadline {
        if let Ok(response) = client.get(host.url("/")).send().await {
            last = response.text().await.unwrap_or_default();
            if last.contains(want) {
                return last;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no answer containing {want:?} within {timeout:?} (last: {last:?})\n{}", host.log());
}

/// Starts `hotswap dev` with `extra` arguments in the crate at `dir`, building in the target
/// directory the dev tests share; waits (up to the first build) until it listens.
async fn start_dev(dir: &std::path::Path, extra: &[&str]) -> Host {
    let target = hotswap_tests::target_dir().join("it-dev");
    let mut args = vec!["dev".to_owned(), "--listen".to_owned(), "127.0.0.1:0".to_owned()];
    args.extend(extra.iter().map(|a| a.to_string()));
    let cwd = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Host::start(&args, Some(&cwd), &[("CARGO_TARGET_DIR", target.as_path())], Duration::from_secs(300))
    })
    .await
    .unwrap()
    .unwrap_or_else(|log| panic!("hotswap dev did not start in {}:\n{log}", dir.display()))
}

#[tokio::test]
async fn dev_mode_rebuilds_on_change_and_keeps_serving_through_a_syntax_error() {
    // A small app of its own, as its own cargo workspace: the loop is what is tested, and a
    // crate with few dependencies keeps its first build short. Its library is named apart
    // from its package, as cargo allows.
    let dir = temp_dir("dev");
    let root = workspace();
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::write(
        dir.join("src/lib.rs"),
        r#"use handler_api::{export_handler, Request};

async fn app(_req: Request) -> &'static str {
    include_str!("../greeting.txt")
}

export_handler!(name: "devapp", version: "0.1.0", handler: app);
"#,
    )
    .unwrap();
    std::fs::write(dir.join("greeting.txt"), "hello from example-handler\n").unwrap();
    std::fs::copy(root.join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
    std::fs::write(
        dir.join("Cargo.toml"),
        format!(
            r#"[package]
name = "devapp"
version = "0.1.0"
edition = "2021"

[lib]
name = "devapp_plugin"
crate-type = ["cdylib"]

[dependencies]
handler-api = {{ path = "{}" }}

[workspace]
"#,
            root.join("handler-api").display()
        ),
    )
    .unwrap();
    let host = start_dev(&dir, &["--package", "devapp"]).await;
    wait_for_answer(&host, "hello from example-handler", Duration::from_secs(10)).await;
    let pid = host.pid();

    // What the code reads (`include_str!`) is a source too.
    std::fs::write(dir.join("greeting.txt"), "howdy from example-handler\n").unwrap();
    wait_for_answer(&host, "howdy from example-handler", Duration::from_secs(120)).await;
    assert_eq!(host.pid(), pid);
    assert!(host.wait_for_log("rebuilt and swapped in", WAIT), "{}", host.log());
    // A file the build does not use: cargo has nothing to do, and nothing is swapped.
    std::fs::write(dir.join("NOTES.md"), "to do\n").unwrap();
    assert!(host.wait_for_log("nothing the build uses changed: generation 2 keeps serving", Duration::from_secs(120)), "{}", host.log());

    // A directory made since the start is watched too.
    std::fs::create_dir(dir.join("assets")).unwrap();
    std::fs::write(dir.join("assets/greeting.txt"), "hi from example-handler\n").unwrap();
    let source = dir.join("src/lib.rs");
    let original = std::fs::read_to_string(&source).unwrap().replace("../greeting.txt", "../assets/greeting.txt");
    tokio::time::sleep(Duration::from_millis(500)).await; // the directory's event comes first
    std::fs::write(&source, &original).unwrap();
    wait_for_answer(&host, "hi from example-handler", Duration::from_secs(120)).await;
    std::fs::write(dir.join("assets/greeting.txt"), "hey from example-handler\n").unwrap();
    wait_for_answer(&host, "hey from example-handler", Duration::from_secs(120)).await;

    std::fs::write(&source, original + "\nfn broken( {\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !host.log().contains("build failed") {
        assert!(Instant::now() < deadline, "the broken build was not reported:\n{}", host.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = host.log();
    // rustc's own words, with the place: the host's line alone says "build failed".
    assert!(log.contains("src/lib.rs") && (log.contains("error:") || log.contains("error[")), "the compiler's errors were not shown:\n{log}");
    assert!(log.contains("keeps serving"), "{log}");
    wait_for_answer(&host, "hey from example-handler", Duration::from_secs(5)).await;
}

#[tokio::test]
async fn hotswap_new_makes_a_crate_that_hotswap_dev_serves_outside_the_workspace() {
    let parent = temp_dir("new");
    let dir = parent.join("greeter");
    let hotswap = &hotswap_tests::artifacts().hotswap;
    let out = std::process::Command::new(hotswap).args(["new", "greeter", "--path"]).arg(&dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("hotswap dev"), "it says what to run next");
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    let handler_api = workspace().join("handler-api").canonicalize().unwrap();
    assert!(manifest.contains(&format!("handler-api = {{ path = \"{}\" }}", handler_api.display())), "{manifest}");
    assert!(manifest.contains("crate-type = [\"cdylib\"]") && manifest.contains("\n[workspace]\n"), "{manifest}");
    assert!(std::fs::read_to_string(dir.join("src/lib.rs")).unwrap().contains("TestHost"), "it comes with a test");

    // Nothing is overwritten.
    let again = std::process::Command::new(hotswap).args(["new", "greeter", "--path"]).arg(&dir).output().unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists and is not empty"), "{again:?}");

    // `hotswap dev` in it, with no --package, serves it. (The repository's lock file, so that
    // the versions, and so the build directory, are those of the other dev test.)
    std::fs::copy(workspace().join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
    let host = start_dev(&dir, &[]).await;
    wait_for_answer(&host, "hello from greeter\n", Duration::from_secs(10)).await;
    drop(host);

    // Both templates compile, with their tests (which ran when the templates were written).
    let axum_dir = parent.join("greeter-axum");
    let out = std::process::Command::new(hotswap).args(["new", "greeter-axum", "--axum", "--path"]).arg(&axum_dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::copy(workspace().join("Cargo.lock"), axum_dir.join("Cargo.lock")).unwrap();
    for crate_dir in [parent.join("greeter"), axum_dir] {
        let checked = tokio::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["check", "--tests", "--offline", "--quiet"])
            .current_dir(&crate_dir)
            .env("CARGO_TARGET_DIR", hotswap_tests::target_dir().join("it-dev"))
            .env_remove("RUSTC_BOOTSTRAP")
            .output()
            .await
            .unwrap();
        assert!(checked.status.success(), "{}: {}", crate_dir.display(), String::from_utf8_lossy(&checked.stderr));
    }
}
