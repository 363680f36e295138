//! Production operations: versions, pins, rollback, the admin API and its CLI, metrics.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use hotswap_tests::{artifacts, example_version, init_fixture, place_by_rename, temp_dir, write_left_open, Host, WAIT};
use serde_json::Value;

use crate::trust::sha256_hex;

const MIB: u64 = 1024 * 1024;

/// Waits (bounded) for a log line containing every one of `parts`.
async fn wait_for_line(host: &Host, parts: &[&str]) {
    let deadline = Instant::now() + WAIT;
    while !host.log().lines().any(|line| parts.iter().all(|p| line.contains(p))) {
        assert!(Instant::now() < deadline, "no log line with {parts:?}:\n{}", host.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_highest_version_serves_and_a_pin_holds_against_newer_builds() {
    let (v1, v2, v3) = (example_version("1.0.0"), example_version("2.0.0"), example_version("3.0.0"));
    let dir = temp_dir("versions");
    // 2.0.0 is the older file: still, the highest version serves.
    place_by_rename(&v2, &dir.join("app-2.so"));
    std::thread::sleep(Duration::from_millis(20));
    place_by_rename(&v1, &dir.join("app-1.so"));
    let host = Host::serve_dir(&dir, &[]);
    assert_eq!(host.version().await, "2.0.0");
    let mode = std::fs::metadata(&host.admin).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the admin socket must be private");

    // A lower version, newer on disk, does not replace it.
    place_by_rename(&v1, &dir.join("app-1-again.so"));
    wait_for_line(&host, &["is lower than 2.0.0, which serves", "app-1-again.so"]).await;
    assert_eq!(host.version().await, "2.0.0");

    // Pinned, it serves; the answer comes once the swap is done.
    let (code, pinned) = host.command_json(&["pin", "1.0.0"]);
    assert_eq!(code, 0, "{pinned}");
    assert_eq!(pinned["outcome"], "swapped", "{pinned}");
    assert_eq!(pinned["to"]["version"], "1.0.0", "{pinned}");
    assert_eq!(host.version().await, "1.0.0");

    // A newer build does not replace a pinned version.
    place_by_rename(&v3, &dir.join("app-3.so"));
    wait_for_line(&host, &["version 1.0.0 is pinned", "app-3.so"]).await;
    assert_eq!(host.version().await, "1.0.0");
    let (_, status) = host.command_json(&["status"]);
    assert_eq!(status["pin"]["version"], "1.0.0", "{status}");
    assert_eq!(status["pin"]["by"], "pin", "{status}");
    let versions: Vec<&str> = status["builds"].as_array().unwrap().iter().filter_map(|b| b["version"].as_str()).collect();
    assert_eq!(versions.first(), Some(&"3.0.0"), "{status}");

    // An unknown version: a 4xx, a message naming what is known, a non-zero exit.
    let unknown = host.command(&["pin", "9.9.9"]);
    assert_ne!(unknown.code, 0);
    assert!(unknown.stderr.contains("no build of version 9.9.9") && unknown.stderr.contains("3.0.0, 2.0.0, 1.0.0"), "{unknown:?}");
    let invalid = host.command(&["pin", "latest"]);
    assert_ne!(invalid.code, 0);
    assert!(invalid.stderr.contains("not a semantic version"), "{invalid:?}");

    // Unpinned, the highest version serves at once; the tables say so.
    let unpin = host.command(&["unpin"]);
    assert_eq!(unpin.code, 0, "{unpin:?}");
    assert!(unpin.stdout.starts_with("swapped: example-handler 1.0.0"), "{unpin:?}");
    assert!(unpin.stdout.contains("-> example-handler 3.0.0"), "{unpin:?}");
    assert_eq!(host.version().await, "3.0.0");
    let table = host.command(&["status"]);
    assert_eq!(table.code, 0, "{table:?}");
    for expected in ["serving example-handler 3.0.0", "not pinned", "resident generations", "IN FLIGHT", "history (newest first)"] {
        assert!(table.stdout.contains(expected), "{expected:?} not in:\n{}", table.stdout);
    }
    let unchanged = host.command_json(&["reload"]);
    assert_eq!(unchanged.0, 0);
    assert_eq!(unchanged.1["outcome"], "unchanged", "{}", unchanged.1);
}

/// Runs `hotswap ARGS` as user `nobody` (65534), through util-linux's `setpriv`.
fn command_as_nobody(args: &[&str]) -> std::process::Output {
    std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&artifacts().hotswap)
        .args(args)
        .env_remove("HOTSWAP_ADMIN")
        .output()
        .expect("setpriv ran a moment ago")
}

#[tokio::test]
async fn the_admin_socket_answers_only_its_user_and_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: acting as another user takes root");
        return;
    }
    if !std::process::Command::new("setpriv").arg("--version").output().is_ok_and(|o| o.status.success())
        || !command_as_nobody(&["--version"]).status.success()
    {
        eprintln!("skipped: no setpriv, or user nobody cannot run {}", artifacts().hotswap.display());
        return;
    }
    let host = Host::serve(&["--plugin", artifacts().example.to_str().unwrap()]);
    let socket = host.admin.to_str().unwrap();

    // The socket's mode keeps other users out.
    let out = command_as_nobody(&["status", "--admin", socket]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("cannot reach the admin API") && stderr.contains("Permission denied"), "{out:?}");

    // Should the mode be loosened, the host still refuses them, by their credentials.
    std::fs::set_permissions(&host.admin, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = command_as_nobody(&["status", "--admin", socket]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(stderr.contains("403") && stderr.contains("answers only this host's user and root"), "{stderr}");
    // Root still gets its answer.
    assert_eq!(host.command(&["status"]).code, 0);
}

#[tokio::test]
async fn rollback_returns_to_the_previous_version_even_after_its_file_was_replaced() {
    let (v1, v2, v3) = (example_version("1.0.0"), example_version("2.0.0"), example_version("3.0.0"));
    let dir = temp_dir("rollback");
    place_by_rename(&v1, &dir.join("app.so"));
    let host = Host::serve_dir(&dir, &[]);
    assert_eq!(host.version().await, "1.0.0");
    let nothing = host.command(&["rollback"]);
    assert_ne!(nothing.code, 0);
    assert!(nothing.stderr.contains("nothing to roll back to"), "{nothing:?}");

    // A good but unwanted deploy over the same file: 1.0.0's bytes are gone from the directory.
    place_by_rename(&v2, &dir.join("app.so"));
    host.wait_version("2.0.0").await;
    for _ in 0..5 {
        assert_eq!(host.version().await, "2.0.0");
    }
    let (code, rolled) = host.command_json(&["rollback"]);
    assert_eq!(code, 0, "{rolled}");
    assert_eq!((rolled["outcome"].as_str(), rolled["from"]["version"].as_str(), rolled["to"]["version"].as_str()), (Some("swapped"), Some("2.0.0"), Some("1.0.0")), "{rolled}");
    assert_eq!(host.version().await, "1.0.0");

    // It is the very build that served before, and it stays: rollback pins.
    let (_, status) = host.command_json(&["status"]);
    assert_eq!(status["pin"]["by"], "rollback", "{status}");
    let v1_sha = sha256_hex(&v1);
    let deadline = Instant::now() + WAIT;
    let mut status = status;
    while status["current"]["sha256"].is_null() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        status = host.command_json(&["status"]).1;
    }
    assert_eq!(status["current"]["sha256"], v1_sha.as_str(), "{status}");
    let history = status["history"].as_array().unwrap();
    let states: Vec<(u64, &str)> = history.iter().map(|r| (r["generation"].as_u64().unwrap(), r["state"].as_str().unwrap())).collect();
    assert_eq!(states[0], (3, "current"), "{status}");
    assert!(states.iter().any(|s| s.0 == 2), "{status}");
    let second = history.iter().find(|r| r["generation"] == 2).unwrap();
    assert!(second["requests"].as_u64().unwrap() >= 5, "{second}");
    assert_eq!(second["sha256"], sha256_hex(&v2).as_str(), "{second}");
    place_by_rename(&v3, &dir.join("app.so"));
    assert!(host.wait_for_log("version 1.0.0 is pinned (by rollback)", WAIT), "{}", host.log());
    assert_eq!(host.version().await, "1.0.0");
}

#[tokio::test]
async fn a_bad_deploy_is_refused_and_the_previous_version_keeps_serving() {
    let v1 = example_version("1.0.0");
    let init_error = init_fixture("error");
    let dir = temp_dir("bad-deploy");
    place_by_rename(&v1, &dir.join("app.so"));
    let host = Host::serve_dir(&dir, &[]);

    place_by_rename(&init_error, &dir.join("next.so"));
    assert!(host.wait_for_log("refused plugin candidate", WAIT), "{}", host.log());
    assert_eq!(host.version().await, "1.0.0");
    let (_, status) = host.command_json(&["status"]);
    let refusal = &status["refusals"][0];
    assert!(refusal["reason"].as_str().unwrap().contains("init failed: fixture: init refuses on purpose"), "{status}");
    assert!(refusal["file"].as_str().unwrap().ends_with("next.so"), "{status}");
    assert_eq!(status["history"][0]["state"], "refused", "{status}");
    assert_eq!(status["current"]["version"], "1.0.0", "{status}");

    // `reload` tries again (with a stray bad file beside it), answers once refused, and says why.
    std::fs::write(dir.join("garbage.so"), b"not an ELF file at all").unwrap();
    let reload = host.command(&["reload"]);
    assert_ne!(reload.code, 0, "{reload:?}");
    assert!(reload.stderr.contains("refused:") && reload.stderr.contains("init failed"), "{reload:?}");
    assert!(reload.stderr.contains("example-handler 1.0.0 (generation 1) keeps serving"), "{reload:?}");
    assert_eq!(host.version().await, "1.0.0");
}

/// A GET on the admin API, with `token` as the bearer token.
async fn admin_get(url: &str, token: Option<&str>) -> (u16, String) {
    let mut request = reqwest::Client::new().get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// A series' value in a scrape, 0 if it is not there (yet).
fn metric(text: &str, series: &str) -> f64 {
    find_metric(text, series).unwrap_or(0.0)
}

/// A series that must be in the scrape.
fn required_metric(text: &str, series: &str) -> f64 {
    find_metric(text, series).unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

fn find_metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map(|v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn metrics_and_status_follow_requests_swaps_refusals_and_unloads_behind_a_token() {
    let (v1, v2) = (example_version("1.0.0"), example_version("2.0.0"));
    let dir = temp_dir("metrics");
    let token_file = dir.join("admin.token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let plugins = temp_dir("metrics-plugins");
    place_by_rename(&v1, &plugins.join("app.so"));
    let tcp = ["--admin", "127.0.0.1:0", "--admin-token-file", token_file.to_str().unwrap()];
    let mut args = vec!["--drain-timeout", "1s"];
    args.extend_from_slice(&tcp);
    let host = Host::serve_dir(&plugins, &args);
    let admin = host.admin_url();
    let url = |path: &str| format!("{admin}{path}");

    // The token is required, and checked.
    assert_eq!(admin_get(&url("/metrics"), None).await.0, 401);
    assert_eq!(admin_get(&url("/metrics"), Some("wrong")).await.0, 401);
    let addr = admin.trim_start_matches("http://");
    let no_token = host.command(&["status", "--admin", addr]);
    assert_ne!(no_token.code, 0);
    assert!(no_token.stderr.contains("Bearer"), "{no_token:?}");
    let with_token = host.command(&["status", "--admin", addr, "--admin-token-file", token_file.to_str().unwrap()]);
    assert_eq!(with_token.code, 0, "{with_token:?}");

    let token = Some("s3cret-token");
    let (code, before) = admin_get(&url("/metrics"), token).await;
    assert_eq!(code, 200);
    let ok = r#"hotswap_requests_total{version="1.0.0",status="200"}"#;
    let not_found = r#"hotswap_requests_total{version="1.0.0",status="404"}"#;
    let client = reqwest::Client::new();
    for _ in 0..20 {
        assert_eq!(client.get(host.url("/")).send().await.unwrap().status(), 200);
    }
    for _ in 0..3 {
        assert_eq!(client.get(host.url("/nope")).send().await.unwrap().status(), 404);
    }
    let (_, after) = admin_get(&url("/metrics"), token).await;
    assert_eq!(metric(&after, ok) - metric(&before, ok), 20.0, "{after}");
    assert_eq!(metric(&after, not_found) - metric(&before, not_found), 3.0, "{after}");
    let histogram = r#"hotswap_request_duration_seconds_count{version="1.0.0",status="200"}"#;
    assert_eq!(metric(&after, histogram), metric(&after, ok), "{after}");
    let inf = r#"hotswap_request_duration_seconds_bucket{version="1.0.0",status="200",le="+Inf"}"#;
    assert_eq!(metric(&after, inf), metric(&after, ok), "{after}");

    // A download in progress: in flight, streaming, bytes counted; then a swap whose old
    // generation outlives the drain timeout and is cut off, then unloaded.
    let size = 64 * MIB;
    let download = client.get(host.url(&format!("/download?size={size}&rate={}", 2 * MIB))).send().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, during) = admin_get(&url("/metrics"), token).await;
    assert_eq!(metric(&during, r#"hotswap_in_flight_requests{generation="1",version="1.0.0"}"#), 1.0, "{during}");
    let (_, status) = admin_get(&url("/status"), token).await;
    let status: Value = serde_json::from_str(&status).unwrap();
    let first = &status["resident"][0];
    assert_eq!((first["in_flight"].as_u64(), first["streams"].as_u64()), (Some(1), Some(1)), "{status}");
    assert!(first["bytes_sent"].as_u64().unwrap() > 0 && first["age_seconds"].as_f64().unwrap() > 0.0, "{status}");

    place_by_rename(&v2, &plugins.join("app.so"));
    host.wait_version("2.0.0").await;
    let (_, at_swap) = admin_get(&url("/metrics"), token).await;
    std::fs::write(plugins.join("garbage.so"), b"garbage").unwrap();
    assert!(host.wait_for_log("not a loadable shared library", WAIT), "{}", host.log());
    assert!(download.bytes().await.is_err(), "the download outlived the drain timeout");
    let deadline = Instant::now() + WAIT;
    let metrics = loop {
        let (_, text) = admin_get(&url("/metrics"), token).await;
        if metric(&text, r#"hotswap_unloads_total{result="unmapped"}"#) >= 1.0 || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(metric(&metrics, "hotswap_swaps_total"), 1.0, "{metrics}");
    assert_eq!(metric(&metrics, r#"hotswap_refusals_total{reason="not_a_library"}"#), 1.0, "{metrics}");
    assert_eq!(metric(&metrics, r#"hotswap_aborted_responses_total{cause="drain_timeout"}"#), 1.0, "{metrics}");
    assert_eq!(metric(&metrics, r#"hotswap_unloads_total{result="unmapped"}"#), 1.0, "{metrics}");
    assert_eq!(required_metric(&metrics, r#"hotswap_unloads_total{result="still_mapped"}"#), 0.0, "{metrics}");
    assert_eq!(metric(&metrics, "hotswap_resident_generations"), 1.0, "{metrics}");
    // Version 1.0.0's counts outlive its generation (the download counts as a 200 too).
    assert!(metric(&at_swap, ok) > metric(&after, ok), "{at_swap}");
    assert_eq!(metric(&metrics, ok), metric(&at_swap, ok), "{metrics}");
}

#[tokio::test]
async fn the_admin_api_refuses_what_it_cannot_act_on() {
    let dir = temp_dir("admin-errors");
    let token_file = dir.join("token");
    std::fs::write(&token_file, "t").unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let plugin = artifacts().example.to_str().unwrap();

    // Reachable from other machines without a token: refused at startup, saying what to do.
    let open = Host::try_serve(&["--plugin", plugin, "--admin", "0.0.0.0:0"]).err().expect("served an open admin API");
    assert!(open.contains("without a token") && open.contains("--admin-token-file"), "{open}");
    // A path that holds something else is not taken for a stale socket and removed.
    let precious = dir.join("data.sock");
    std::fs::write(&precious, "keep me").unwrap();
    let taken = Host::try_serve(&["--plugin", plugin, "--admin", precious.to_str().unwrap()]).err().expect("replaced a file");
    assert!(taken.contains("is not a socket"), "{taken}");
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "keep me");

    let host = Host::serve(&["--plugin", plugin, "--admin", "127.0.0.1:0", "--admin-token-file", token_file.to_str().unwrap()]);
    let admin = host.admin_url();
    let client = reqwest::Client::new();
    let send = |request: reqwest::RequestBuilder| async move {
        let response = request.bearer_auth("t").header("X-Hotswap-Admin", "1").send().await.unwrap();
        let status = response.status().as_u16();
        let body: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
        (status, body)
    };
    let (status, body) = send(client.post(format!("{admin}/pin")).body("{not json")).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("must be JSON"), "{body}");
    let (status, body) = send(client.post(format!("{admin}/pin")).body(r#"{"version": "2"}"#)).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = send(client.post(format!("{admin}/pin")).body(r#"{"version": "4.5.6"}"#)).await;
    assert_eq!(status, 404, "{body}");
    assert!(body["error"].as_str().unwrap().contains("no build of version 4.5.6"), "{body}");
    let wrong_method = client.get(format!("{admin}/pin")).bearer_auth("t").send().await.unwrap();
    assert_eq!(wrong_method.status(), 405);
    assert_eq!(wrong_method.headers()["allow"], "POST, DELETE");
    let (status, body) = send(client.get(format!("{admin}/nothing"))).await;
    assert_eq!(status, 404);
    assert!(body["error"].as_str().unwrap().contains("try GET /status; GET /metrics; POST /reload"), "{body}");
    let (status, body) = send(client.delete(format!("{admin}/pin"))).await;
    assert_eq!((status, body["outcome"].as_str()), (200, Some("unchanged")), "{body}");
    let (status, body) = send(client.post(format!("{admin}/rollback"))).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("nothing to roll back to"), "{body}");
}

#[tokio::test]
async fn the_access_log_has_a_line_per_response_as_it_ends() {
    let host = Host::serve(&["--plugin", artifacts().example.to_str().unwrap(), "--access-log"]);
    let client = reqwest::Client::new();
    assert_eq!(client.get(host.url("/?a=1")).send().await.unwrap().status(), 200);
    assert_eq!(client.get(host.url("/nope")).send().await.unwrap().status(), 404);
    let body = client.get(host.url("/download?size=100000")).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(body.len(), 100_000);
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    assert_eq!(h2.post(host.url("/upload")).body("abc").send().await.unwrap().status(), 200);
    // A download the client leaves half-way: its line says the body did not go out whole.
    let mut cut = client.get(host.url("/download?size=100000000")).send().await.unwrap();
    cut.chunk().await.unwrap();
    drop(cut);
    // HEAD: hyper sends the head only, and the line says the response went out whole.
    assert_eq!(client.head(host.url("/health")).send().await.unwrap().status(), 200);

    fn line<'a>(parts: &[&'a str]) -> Vec<&'a str> {
        [&["hotswap::access", "response"][..], parts].concat()
    }
    wait_for_line(&host, &line(&["method=GET", "uri=/?a=1", "http=HTTP/1.1", "status=200", "bytes=41", "whole=true", "version=0.1.0", "peer=127.0.0.1:", "request_id=0"])).await;
    wait_for_line(&host, &line(&["uri=/nope", "status=404", "whole=true"])).await;
    wait_for_line(&host, &line(&["uri=/download?size=100000 ", "status=200", "bytes=100000", "whole=true"])).await;
    wait_for_line(&host, &line(&["method=POST", "uri=/upload", "http=HTTP/2.0", "status=200", "whole=true"])).await;
    wait_for_line(&host, &line(&["uri=/download?size=100000000", "status=200", "whole=false"])).await;
    wait_for_line(&host, &line(&["method=HEAD", "uri=/health", "status=200", "bytes=0", "whole=true"])).await;
    let ids = host.log().lines().filter(|l| l.contains("hotswap::access")).filter(|l| l.contains("request_id=")).count();
    assert_eq!(ids, 6, "{}", host.log());

    // The host's own answers: a 504 has its line, with the id the client got; a body that
    // panics half-way did not go out whole.
    let faulty = Host::serve(&["--plugin", artifacts().faulty.to_str().unwrap(), "--access-log", "--response-timeout", "3s"]);
    let late = client.get(faulty.url("/hang")).send().await.unwrap();
    assert_eq!(late.status(), 504);
    let id = late.headers()["x-request-id"].to_str().unwrap().to_owned();
    wait_for_line(&faulty, &line(&["uri=/hang", "status=504", "whole=true", &format!("request_id={id}")])).await;
    assert!(client.get(faulty.url("/panic-body")).send().await.unwrap().bytes().await.is_err());
    wait_for_line(&faulty, &line(&["uri=/panic-body", "status=200", "whole=false"])).await;
    // A client that leaves before its answer (well before the response timeout): 499, as nginx
    // logs it.
    let left = reqwest::Client::new().get(faulty.url("/hang?left")).timeout(Duration::from_millis(300)).send().await;
    assert!(left.is_err(), "{left:?}");
    wait_for_line(&faulty, &line(&["uri=/hang?left", "status=499", "whole=false"])).await;
    let hangs = faulty.log().lines().filter(|l| l.contains("hotswap::access") && l.contains("uri=/hang")).count();
    assert_eq!(hangs, 2, "one line each:\n{}", faulty.log());

    // One the host cuts off with its generation (drain timeout after a swap): 503.
    let dir = temp_dir("access-cut");
    place_by_rename(&artifacts().faulty, &dir.join("app.so"));
    let draining = Host::serve(&["--plugin-dir", dir.to_str().unwrap(), "--access-log", "--drain-timeout", "1s"]);
    let hung = tokio::spawn(reqwest::get(draining.url("/hang?cut")));
    draining.wait_in_flight(1).await;
    place_by_rename(&example_version("1.0.0"), &dir.join("app.so"));
    wait_for_line(&draining, &line(&["uri=/hang?cut", "status=503", "whole=false", "version=0.1.0"])).await;
    assert!(hung.await.unwrap().is_err(), "the cut request got an answer");

    // Off by default.
    let quiet = Host::serve(&["--plugin", artifacts().example.to_str().unwrap()]);
    assert_eq!(client.get(quiet.url("/")).send().await.unwrap().status(), 200);
    assert!(quiet.wait_for_log("request method=GET path=/ status=200", WAIT), "{}", quiet.log());
    assert!(!quiet.log().contains("hotswap::access"), "{}", quiet.log());
}

#[tokio::test]
async fn a_build_just_dropped_in_can_be_pinned_at_once() {
    let dir = temp_dir("pin-just-dropped");
    place_by_rename(&example_version("2.0.0"), &dir.join("app-2.so"));
    let host = Host::serve_dir(&dir, &[]);
    assert!(host.wait_for_log("watching for new plugin builds", WAIT), "{}", host.log());
    tokio::time::sleep(Duration::from_millis(100)).await; // past the watcher's first scan
    // Written in place and left open: the watcher waits for its writer (or 300 ms), and the
    // pin comes first. It must find the build all the same.
    let v1 = std::fs::read(example_version("1.0.0")).unwrap();
    let open = write_left_open(&dir.join("app-1.so"), &v1);
    let (code, pinned) = host.command_json(&["pin", "1.0.0"]);
    drop(open);
    assert_eq!(code, 0, "{pinned}\n{}", host.log());
    assert_eq!(pinned["outcome"], "swapped", "{pinned}");
    assert_eq!(host.version().await, "1.0.0");
}
