//! Faults: handlers and hooks that never return or panic, handlers that block their threads,
//! a shadow directory that cannot be written or is full, signal storms, shutdown in the
//! middle of a swap, and the budgets that keep a process that swaps forever from running out.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use hotswap_tests::{artifacts, build_lock, example_version, heavy_lock, init_fixture, place_by_rename, target_dir, temp_dir, workspace, Host, WAIT};

const MIB: u64 = 1024 * 1024;

#[tokio::test]
async fn a_response_that_never_ends_is_aborted_by_the_drain_timeout_and_its_generation_unloads() {
    let dir = temp_dir("fault-hang");
    place_by_rename(&artifacts().faulty, &dir.join("app.so"));
    let host = Host::serve(&["--plugin-dir", dir.to_str().unwrap(), "--drain-timeout", "1s"]);
    let hung = tokio::spawn(reqwest::get(host.url("/hang")));
    host.wait_in_flight(1).await;
    place_by_rename(&example_version("1.0.0"), &dir.join("app.so"));
    let started = Instant::now();
    let outcome = tokio::time::timeout(WAIT, hung).await.expect("the hung request was never aborted");
    assert!(outcome.unwrap().is_err(), "a request that never ends got an answer");
    assert!(started.elapsed() < Duration::from_secs(10), "cut off late: {:?}", started.elapsed());
    let mapped = host.wait_mapped(1, WAIT).await;
    assert_eq!(mapped.len(), 1, "the hung generation stayed mapped: {mapped:?}\n{}", host.log());
    assert_eq!(host.version().await, "1.0.0");
}

#[tokio::test]
async fn response_data_queued_for_a_client_that_does_not_read_is_cut_off_with_its_generation() {
    let dir = temp_dir("fault-lent");
    place_by_rename(&example_version("1.0.0"), &dir.join("app.so"));
    let host = Host::serve(&["--plugin-dir", dir.to_str().unwrap(), "--drain-timeout", "1s", "--idle-timeout", "300s"]);
    // An HTTP/2 client that opens a window of 16 KiB and never reads: the handler's body (one
    // 64 KiB chunk, lent to the host) has ended, so the request has, but most of the chunk
    // waits in the connection's send buffer.
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .http2_initial_stream_window_size(16 * 1024)
        .http2_initial_connection_window_size(16 * 1024)
        .build()
        .unwrap();
    let unread = client.get(host.url("/download?size=65536")).send().await.unwrap();
    host.wait_in_flight(0).await;

    // Swapped: the connection moves on, holding the old generation's chunk. At the drain
    // timeout it is cut off with the generation, which unloads.
    place_by_rename(&example_version("2.0.0"), &dir.join("app.so"));
    host.wait_version("2.0.0").await;
    let mapped = host.wait_mapped(1, Duration::from_secs(15)).await;
    assert_eq!(mapped.len(), 1, "the old generation stayed loaded behind a queued chunk: {mapped:?}\n{}", host.log());
    assert!(host.log().contains("closing a connection whose client has not yet read the end of a response"), "{}", host.log());
    assert!(unread.bytes().await.is_err(), "the cut-off response was read whole");
}

#[tokio::test]
async fn a_generation_cut_off_but_still_loaded_counts_against_max_generations() {
    let dir = temp_dir("fault-cap");
    place_by_rename(&artifacts().faulty, &dir.join("app.so"));
    let host = Host::serve(&["--plugin-dir", dir.to_str().unwrap(), "--max-generations", "2", "--drain-timeout", "1s"]);
    // A handler that blocks its thread: cutting its generation off cannot take its response
    // away from it, so the generation stays loaded, cut off, until the call returns.
    let blocked = tokio::spawn(reqwest::get(host.url("/block?seconds=60")));
    host.wait_in_flight(1).await;
    place_by_rename(&example_version("1.0.0"), &dir.join("app.so"));
    host.wait_version("1.0.0").await;
    assert!(host.wait_for_log("drain timeout (1s) reached", WAIT), "{}", host.log());

    // One more would make three loaded, over the cap, whatever is cut off: refused (after
    // waiting for the cut-off generation to unload), and 1.0.0 keeps serving.
    place_by_rename(&example_version("2.0.0"), &dir.join("app.so"));
    let refused = "another would exceed --max-generations (2)";
    assert!(host.wait_for_log(refused, WAIT), "{}", host.log());
    assert_eq!(host.version().await, "1.0.0");
    assert!(host.mapped_plugins().len() <= 2, "{:?}", host.mapped_plugins());
    blocked.abort();
}

#[tokio::test]
async fn a_generation_whose_threads_all_block_is_reported_until_they_let_go() {
    let dir = temp_dir("fault-stall");
    place_by_rename(&artifacts().faulty, &dir.join("app.so"));
    let host = Host::serve(&["--plugin-dir", dir.to_str().unwrap(), "--workers", "1"]);
    // A blocking call in async code holds the generation's one worker thread for 15 s.
    let blocked = tokio::spawn(reqwest::get(host.url("/block?seconds=15")));
    host.wait_in_flight(1).await;
    assert!(host.wait_for_log("the generation has run no task for 5s", WAIT), "{}", host.log());
    assert!(host.log().contains("Move blocking work to handler_api::spawn_blocking"), "{}", host.log());
    let (_, status) = host.command_json(&["status"]);
    assert!(status["resident"][0]["blocked_seconds"].as_f64().is_some_and(|s| s >= 4.0), "{status}");
    let text = host.command(&["status"]).stdout;
    assert!(text.contains("current, blocked"), "{text}");
    assert_eq!(hotswap_tests::metric(&host.metrics().await, "hotswap_generation_stalls_total"), 1.0);

    let answer = blocked.await.unwrap().unwrap().text().await.unwrap();
    assert_eq!(answer, "unblocked\n");
    assert!(host.wait_for_log("the generation's threads run tasks again", WAIT), "{}", host.log());
    let (_, status) = host.command_json(&["status"]);
    assert!(status["resident"][0].get("blocked_seconds").is_none(), "{status}");
    // The watchdog holds nothing of the generation: replaced, it unloads.
    place_by_rename(&example_version("1.0.0"), &dir.join("app.so"));
    assert!(host.wait_for_log("generation unloaded and unmapped generation=1", WAIT), "{}", host.log());
}

#[tokio::test]
async fn a_backtrace_formatted_by_a_plugin_is_prevented_by_default_and_reported_when_forced() {
    let dir = temp_dir("fault-backtrace");
    place_by_rename(&artifacts().faulty, &dir.join("app.so"));
    let args = ["serve", "--listen", "127.0.0.1:0", "--plugin-dir", dir.to_str().unwrap()];
    let host = Host::start(&args, None, &[("RUST_BACKTRACE", Path::new("1"))], WAIT).unwrap();
    // With RUST_BACKTRACE=1, library code (anyhow, Backtrace::capture) would capture
    // backtraces; the host sets RUST_LIB_BACKTRACE=0 unless told otherwise.
    let text = reqwest::get(host.url("/backtrace")).await.unwrap().text().await.unwrap();
    assert!(text.starts_with("Disabled"), "{text}");
    // Forced: formatting it maps the library's file for std's symbolizer, for good.
    let text = reqwest::get(host.url("/backtrace?force")).await.unwrap().text().await.unwrap();
    assert!(text.starts_with("Captured"), "{text}");
    place_by_rename(&example_version("1.0.0"), &dir.join("app.so"));
    let reported = "generation unloaded, its code unmapped, but";
    assert!(host.wait_for_log(reported, WAIT), "{}", host.log());
    assert!(host.log().contains("stay mapped read-only for good: a backtrace through its code was symbolized"), "{}", host.log());
    let (_, status) = host.command_json(&["status"]);
    let first = status["history"].as_array().unwrap().iter().find(|r| r["generation"] == 1).cloned().unwrap();
    assert_eq!(first["state"], "unloaded-file-mapped", "{status}");
    assert_eq!(host.version().await, "1.0.0");
}

#[tokio::test]
async fn a_shutdown_hook_that_panics_or_hangs_does_not_stop_the_host() {
    let dir = temp_dir("fault-shutdown");
    place_by_rename(&init_fixture("shutdown-panic"), &dir.join("app.so"));
    let mut host = Host::serve(&["--plugin-dir", dir.to_str().unwrap()]);
    reqwest::get(host.url("/")).await.unwrap();

    // Panics: reported, and the library is unloaded anyway.
    place_by_rename(&init_fixture("shutdown-hang"), &dir.join("app.so"));
    assert!(host.wait_for_log("the shutdown hook panicked; the plugin is unloaded anyway", WAIT), "{}", host.log());
    assert!(host.wait_for_log("generation=1 plugin=fixture-init@0.1.0 elapsed", WAIT), "{}", host.log());

    // Hangs: after the unload timeout the host gives up on it, keeps its library (its code is
    // still running) and goes on serving.
    place_by_rename(&example_version("1.0.0"), &dir.join("app.so"));
    assert!(host.wait_for_log("shutdown hook did not return within", WAIT), "{}", host.log());
    assert!(host.wait_for_log("its library stays loaded (leaked)", WAIT), "{}", host.log());
    assert_eq!(host.version().await, "1.0.0");

    // And it still shuts down cleanly.
    host.signal("TERM");
    let code = tokio::task::spawn_blocking(move || host.wait_exit(Duration::from_secs(20))).await.unwrap();
    assert_eq!(code, Some(0));
}

#[tokio::test]
async fn a_destructor_that_hangs_in_the_host_ends_the_host_with_a_reason_instead_of_wedging_it() {
    let dir = temp_dir("fault-dtor");
    // Its destructor hangs only once init has run: the probe process (which never runs init)
    // closes it fine, the host does not.
    place_by_rename(&init_fixture("dtor-hang-after-init"), &dir.join("app.so"));
    // dlclose gets the longer of the unload timeout (5 s) and the init timeout.
    let mut host = Host::serve(&["--plugin-dir", dir.to_str().unwrap(), "--init-timeout", "2s"]);
    reqwest::get(host.url("/")).await.unwrap();
    place_by_rename(&example_version("1.0.0"), &dir.join("app.so"));
    // A process whose loader lock is held forever would soon answer nothing while looking
    // alive: the host exits (a service manager restarts it), and says why.
    let code = tokio::task::spawn_blocking(move || {
        let code = host.wait_exit(WAIT);
        (code, host.log())
    })
    .await
    .unwrap();
    assert_eq!(code.0, Some(70), "{}", code.1);
    let hung = "the dlclose of generation 1 (fixture-init@0.1.0) has not returned after 5s";
    assert!(code.1.contains(hung) && code.1.contains("fix the plugin's destructors"), "{}", code.1);
}

#[tokio::test]
async fn an_unwritable_shadow_directory_refuses_the_candidate_and_is_created_again_once_possible() {
    let (v1, v2) = (example_version("1.0.0"), example_version("2.0.0"));
    let dir = temp_dir("fault-shadow");
    place_by_rename(&v1, &dir.join("app.so"));
    let base = temp_dir("fault-shadow-base");
    let host = Host::serve(&["--plugin-dir", dir.to_str().unwrap(), "--shadow-dir", base.to_str().unwrap()]);
    let private = base.join(format!("hotswap-{}-0", host.pid()));

    // Something replaced the shadow directory with a file: no copy can be written there.
    std::fs::remove_dir_all(&private).unwrap();
    std::fs::write(&private, b"in the way").unwrap();
    place_by_rename(&v2, &dir.join("app.so"));
    assert!(host.wait_for_log("cannot write the private copy", WAIT), "{}", host.log());
    assert!(host.log().contains("keeps serving"), "{}", host.log());
    assert_eq!(host.version().await, "1.0.0");

    // Gone altogether (a temporary-file cleaner): created again, and the swap goes through.
    std::fs::remove_file(&private).unwrap();
    place_by_rename(&v2, &dir.join("app.so"));
    assert!(host.wait_for_log("created it again", WAIT), "{}", host.log());
    assert!(host.wait_for_log("new requests go to generation", WAIT), "{}", host.log());
    assert_eq!(host.version().await, "2.0.0");
}

#[tokio::test]
async fn a_full_disk_refuses_the_candidate_and_the_current_version_keeps_serving() {
    let (v1, v2) = (example_version("1.0.0"), example_version("2.0.0"));
    let dir = temp_dir("fault-full");
    place_by_rename(&v1, &dir.join("app.so"));
    let base = temp_dir("fault-full-base");
    // A file system with room for one copy of the plugin, not two: a tmpfs mounted in a mount
    // namespace of the host's own (unshare), invisible to the rest of the machine.
    let size = std::fs::metadata(&v1).unwrap().len() * 3 / 2;
    let script = r#"mount -t tmpfs -o size="$1" hotswap-test "$2" && shift 2 && exec "$@""#;
    // Where unprivileged mount namespaces are not allowed (some containers), this cannot run.
    let probe = Command::new("unshare").args(["--mount", "--map-root-user", "true"]).status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED a_full_disk_refuses_the_candidate: `unshare --mount --map-root-user` is not allowed here");
        return;
    }
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--map-root-user", "sh", "-c", script, "sh"]).arg(size.to_string()).arg(&base).arg(&artifacts().hotswap);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--plugin-dir"]).arg(&dir).arg("--shadow-dir").arg(&base);
    let host = Host::start_command(cmd, Duration::from_secs(30)).unwrap_or_else(|log| {
        panic!("cannot start hotswap on a small tmpfs (needs unshare and user namespaces):\n{log}")
    });
    assert_eq!(host.version().await, "1.0.0");

    place_by_rename(&v2, &dir.join("app.so"));
    assert!(host.wait_for_log("the disk is full", WAIT), "{}", host.log());
    assert!(host.log().contains("keeps serving"), "{}", host.log());
    assert_eq!(host.version().await, "1.0.0");
    assert_eq!(host.mapped_plugins().len(), 1);
}

#[tokio::test]
async fn a_sighup_storm_loads_a_new_build_once_and_the_host_keeps_serving() {
    let (v1, v2) = (example_version("1.0.0"), example_version("2.0.0"));
    let dir = temp_dir("fault-hup");
    place_by_rename(&v1, &dir.join("app.so"));
    let host = Host::serve(&["--plugin-dir", dir.to_str().unwrap()]);
    let pid = host.pid().to_string();
    place_by_rename(&v2, &dir.join("app.so"));
    // 500 SIGHUPs as fast as `kill` can send them, in 5 processes.
    let storms: Vec<_> = (0..5)
        .map(|_| {
            let script = format!("for i in $(seq 100); do kill -HUP {pid} || exit 1; done");
            Command::new("sh").args(["-c", &script]).spawn().unwrap()
        })
        .collect();
    for mut storm in storms {
        assert!(storm.wait().unwrap().success(), "the host died during the SIGHUP storm:\n{}", host.log());
    }
    assert!(host.wait_for_log("new requests go to generation 2", WAIT), "{}", host.log());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(host.version().await, "2.0.0");
    assert_eq!(host.log_count("swapped: new requests go to"), 1, "one new build, one swap:\n{}", host.log());
    assert_eq!(host.wait_mapped(1, WAIT).await.len(), 1, "{}", host.log());
}

#[tokio::test]
async fn sigterm_during_a_swap_exits_cleanly_with_nothing_left_mapped_or_on_disk() {
    let dir = temp_dir("fault-term");
    place_by_rename(&example_version("1.0.0"), &dir.join("app.so"));
    let base = temp_dir("fault-term-base");
    let mut host = Host::serve(&["--plugin-dir", dir.to_str().unwrap(), "--shadow-dir", base.to_str().unwrap()]);
    // A download in progress, and a candidate whose init takes 4 s.
    let download = reqwest::get(host.url(&format!("/download?size={}&rate={}", 2 * MIB, 4 * MIB))).await.unwrap();
    place_by_rename(&init_fixture("slow"), &dir.join("app.so"));
    assert!(host.wait_for_log("loading a candidate", WAIT), "{}", host.log());
    host.signal("TERM");
    // The download in progress still finishes.
    assert_eq!(download.bytes().await.unwrap().len() as u64, 2 * MIB);
    let (code, log) = tokio::task::spawn_blocking(move || (host.wait_exit(Duration::from_secs(20)), host.log())).await.unwrap();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("the plugin being loaded is abandoned"), "{log}");
    assert!(!log.contains("swapped:"), "swapped in after SIGTERM:\n{log}");
    assert!(!log.contains("STILL MAPPED") && !log.contains("leaked"), "{log}");
    let left: Vec<_> = std::fs::read_dir(&base).unwrap().collect();
    assert!(left.is_empty(), "left in the shadow base: {left:?}");
}

#[tokio::test]
async fn a_plugin_that_leaks_thread_keys_is_refused_before_the_process_runs_out() {
    let dir = temp_dir("fault-keys");
    let leaky = init_fixture("leak-keys");
    place_by_rename(&leaky, &dir.join("app.so"));
    let host = Host::serve(&["--plugin-dir", dir.to_str().unwrap()]);
    // Each load leaks 100 of the process's 1024 keys: the ninth or tenth must be refused.
    let mut refused = false;
    for _ in 0..12 {
        let swaps = host.log_count("swapped: new requests go to");
        place_by_rename(&leaky, &dir.join("app.so"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while host.log_count("swapped: new requests go to") == swaps && !host.log().contains("budget exhausted") {
            assert!(Instant::now() < deadline, "neither swapped nor refused:\n{}", host.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if host.log().contains("budget exhausted") {
            refused = true;
            break;
        }
    }
    assert!(refused, "never refused:\n{}", host.log());
    assert!(host.log().contains("budget running low"), "no early warning:\n{}", host.log());
    assert!(host.log().contains("pthread keys in use"), "{}", host.log());
    // Refused before the table ran out, not when the plugin found it empty.
    assert!(!host.log().contains("fixture: out of pthread keys"), "{}", host.log());
    // The host is alive and serving on the generation it had.
    let answer = reqwest::get(host.url("/")).await.unwrap().text().await.unwrap();
    assert_eq!(answer, "init fixture\n");
}

#[tokio::test]
async fn beyond_max_generations_the_oldest_draining_generation_is_cut_off() {
    let (v1, v2, v3) = (example_version("1.0.0"), example_version("2.0.0"), example_version("3.0.0"));
    let dir = temp_dir("fault-maxgen");
    place_by_rename(&v1, &dir.join("app.so"));
    let host = Host::serve(&["--plugin-dir", dir.to_str().unwrap(), "--max-generations", "2", "--drain-timeout", "120s"]);
    let slow = format!("/download?size={}&rate={}", 64 * MIB, MIB);
    let on_v1 = reqwest::get(host.url(&slow)).await.unwrap();
    place_by_rename(&v2, &dir.join("app.so"));
    assert!(host.wait_for_log("new requests go to generation 2", WAIT), "{}", host.log());
    let mut on_v2 = reqwest::get(host.url(&slow)).await.unwrap();

    // A third generation: v1, the oldest still draining, is cut off; v2 goes on streaming.
    place_by_rename(&v3, &dir.join("app.so"));
    let cut = tokio::time::timeout(Duration::from_secs(15), on_v1.bytes()).await.expect("v1's download was not cut off");
    assert!(cut.is_err(), "v1's download completed");
    assert!(host.wait_for_log("more than 2 generations loaded (--max-generations)", WAIT), "{}", host.log());
    let mapped = host.wait_mapped(2, WAIT).await;
    assert_eq!(mapped.len(), 2, "{mapped:?}\n{}", host.log());
    assert!(on_v2.chunk().await.unwrap().is_some(), "v2's download was cut off too");
    assert_eq!(host.version().await, "3.0.0");
}

#[tokio::test]
async fn a_newer_builds_threads_do_not_keep_an_older_one_loaded() {
    let dir = temp_dir("fault-threads-newer");
    place_by_rename(&example_version("1.0.0"), &dir.join("app.so"));
    let host = Host::serve(&["--plugin-dir", dir.to_str().unwrap()]);
    // Generation 1 stays loaded behind a download...
    let mut download = std::net::TcpStream::connect(&host.addr).unwrap();
    std::io::Write::write_all(&mut download, b"GET /download?size=100000000&rate=100000 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    std::io::Read::read_exact(&mut download, &mut [0; 12]).unwrap();
    // ...while generation 2 starts a long-lived thread of its own (a pool, say).
    place_by_rename(&artifacts().faulty, &dir.join("app.so"));
    assert!(host.wait_for_log("generation=2", WAIT), "{}", host.log());
    assert_eq!(reqwest::get(host.url("/spawn-thread?seconds=600")).await.unwrap().text().await.unwrap(), "started\n");
    // Once the download ends, generation 1 unloads: that thread never ran its code.
    drop(download);
    assert!(host.wait_for_log("generation unloaded and unmapped generation=1", WAIT), "{}", host.log());
    assert!(!host.log().contains("leaked"), "{}", host.log());
}

#[tokio::test]
async fn a_connection_a_plugin_hands_to_a_task_is_cut_off_with_its_generation() {
    let dir = temp_dir("fault-upgrade-task");
    place_by_rename(&artifacts().faulty, &dir.join("app.so"));
    let host = Host::serve(&["--plugin-dir", dir.to_str().unwrap(), "--drain-timeout", "1s"]);
    // An upgraded connection whose plugin gave it to a background task (which holds the
    // connection, and through it the generation) and ended its session.
    let mut upgraded = std::net::TcpStream::connect(&host.addr).unwrap();
    std::io::Write::write_all(&mut upgraded, b"GET /upgrade-spawn HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: x-test\r\n\r\n").unwrap();
    let mut head = [0; 12];
    std::io::Read::read_exact(&mut upgraded, &mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
    // Swapped out: at the drain timeout the task is dropped, the connection closes, and the
    // generation unloads.
    place_by_rename(&example_version("1.0.0"), &dir.join("app.so"));
    assert!(host.wait_for_log("generation unloaded and unmapped generation=1", WAIT), "{}", host.log());
    upgraded.set_read_timeout(Some(WAIT)).unwrap();
    let mut rest = Vec::new();
    assert!(std::io::Read::read_to_end(&mut upgraded, &mut rest).is_ok(), "the connection was not closed");
}

#[tokio::test]
async fn threads_a_plugin_starts_keep_its_library_loaded_until_they_exit() {
    // A thread of the plugin's own (named, so no name gives it away) that ends soon: the
    // unload waits for it, then unmaps the library.
    let dir = temp_dir("fault-threads-short");
    place_by_rename(&artifacts().faulty, &dir.join("app.so"));
    let host = Host::serve(&["--plugin-dir", dir.to_str().unwrap()]);
    let started = reqwest::get(host.url("/spawn-thread?seconds=2")).await.unwrap().text().await.unwrap();
    assert_eq!(started, "started\n");
    place_by_rename(&example_version("1.0.0"), &dir.join("app.so"));
    assert!(host.wait_for_log("generation unloaded and unmapped generation=1", WAIT), "{}", host.log());
    assert!(!host.log().contains("leaked"), "{}", host.log());

    // One that outlives the unload: the library is never closed under it. It stays loaded,
    // the log names the thread, status says leaked, and the new version serves.
    let dir = temp_dir("fault-threads-long");
    place_by_rename(&artifacts().faulty, &dir.join("app.so"));
    let host = Host::serve(&["--plugin-dir", dir.to_str().unwrap()]);
    reqwest::get(host.url("/spawn-thread?seconds=600")).await.unwrap();
    place_by_rename(&example_version("1.0.0"), &dir.join("app.so"));
    assert!(host.wait_for_log("its library stays loaded (leaked)", WAIT), "{}", host.log());
    assert!(host.log().contains("(fixture-pool)"), "the log does not name the thread:\n{}", host.log());
    assert_eq!(host.version().await, "1.0.0");
    let (_, status) = host.command_json(&["status"]);
    let history = status["history"].as_array().unwrap();
    assert!(history.iter().any(|r| r["generation"] == 1 && r["state"] == "leaked"), "{status}");
    assert_eq!(host.mapped_plugins().len(), 2, "the leaked library was unmapped");
}

/// fixture-faulty built with `panic = "abort"` in its profile, in a target directory of its own
/// (the setting applies to every crate of a build); a debug build, the quicker to make.
fn panic_abort_build() -> std::path::PathBuf {
    // A build from scratch loads both cores: not beside the other heavy tests.
    let _heavy = heavy_lock();
    let _lock = build_lock();
    let target = target_dir().join("it-panic-abort");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(workspace())
        .args(["build", "--quiet", "-p", "fixture-faulty", "--target-dir"])
        .arg(&target)
        .env("CARGO_PROFILE_DEV_PANIC", "abort")
        .status()
        .expect("cannot run cargo");
    assert!(status.success(), "cargo build with panic = abort failed");
    target.join("debug/libfixture_faulty.so")
}

#[tokio::test]
async fn a_build_whose_panics_abort_is_refused_with_the_setting_to_change() {
    let abort = panic_abort_build(); // first: it may wait for the heavy tests
    let dir = temp_dir("fault-panic-abort");
    place_by_rename(&example_version("1.0.0"), &dir.join("app.so"));
    let host = Host::serve(&["--plugin-dir", dir.to_str().unwrap()]);
    // Another plugin, newer on disk: it would serve, and its first panic (GET /panic) would
    // take the host down. It is refused at load, naming the setting.
    let copy = dir.join("faulty.so.tmp");
    std::fs::copy(&abort, &copy).unwrap();
    std::fs::rename(&copy, dir.join("faulty.so")).unwrap();
    assert!(host.wait_for_log("panics that abort", WAIT), "{}", host.log());
    let log = host.log();
    assert!(log.contains("[profile.release]") && log.contains("keeps serving"), "{log}");
    assert_eq!(host.version().await, "1.0.0");
    assert_eq!(reqwest::get(host.url("/panic")).await.unwrap().status(), 404, "the example handler serves /panic?");
    let (_, status) = host.command_json(&["status"]);
    assert!(status["refusals"][0]["reason"].as_str().is_some_and(|r| r.contains("panic = \"abort\"")), "{status}");
}

#[tokio::test]
async fn a_content_length_that_disagrees_with_the_body_is_refused_and_the_connection_serves_on() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let dir = temp_dir("fault-length");
    place_by_rename(&artifacts().faulty, &dir.join("app.so"));
    let host = Host::serve(&["--plugin-dir", dir.to_str().unwrap()]);
    for path in ["/wrong-length", "/wrong-length-stream"] {
        // On one HTTP/1.1 connection: the bad answer, then a good one that must read whole
        // (a wrong length would make the client take one for the other).
        let mut stream = tokio::net::TcpStream::connect(&host.addr).await.unwrap();
        let requests = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\nGET /fine HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(requests.as_bytes()).await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(WAIT, stream.read_to_string(&mut answer)).await.unwrap().unwrap();
        let responses: Vec<&str> = answer.split("HTTP/1.1 ").skip(1).collect();
        assert_eq!(responses.len(), 2, "{path}: {answer:?}\n{}", host.log());
        assert!(responses[0].starts_with("500"), "{path}: {answer:?}");
        assert!(responses[1].starts_with("200") && responses[1].ends_with("\r\n\r\nfine\n"), "{path}: {answer:?}");
    }
    assert!(host.wait_for_log("its content-length header says \"9\" but its body is 5 bytes", WAIT), "{}", host.log());
    assert_eq!(host.log_count("its content-length header says \"3\" but its body is 5 bytes"), 1, "{}", host.log());
    assert_eq!(host.log_count("its content-length header says \"9\" but its body is 5 bytes"), 1, "{}", host.log());
}

#[tokio::test]
async fn a_body_longer_than_its_length_is_cut_off_not_sent_as_complete() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let host = Host::serve(&["--plugin", artifacts().faulty.to_str().unwrap()]);
    // A sized stream that brings more than its size, and a stream whose content-length
    // header says less than it brings: hyper would send the first bytes as if complete and
    // keep the connection for the next response.
    for path in ["/long-sized-stream", "/long-stream-declared"] {
        let mut stream = tokio::net::TcpStream::connect(&host.addr).await.unwrap();
        let requests = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\nGET /fine HTTP/1.1\r\nHost: x\r\n\r\n");
        stream.write_all(requests.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(WAIT, stream.read_to_end(&mut answer)).await.expect("the connection stayed open").unwrap();
        // Closed with no answer (the head waits for the first bytes), or a short one.
        let answer = String::from_utf8_lossy(&answer);
        assert_eq!(answer.matches("HTTP/1.1 ").count(), answer.starts_with("HTTP/1.1 200") as usize, "{path}: {answer:?}");
        if let Some((head, body)) = answer.split_once("\r\n\r\n") {
            let declared: usize = head.lines().find_map(|l| l.strip_prefix("content-length: ")).unwrap().parse().unwrap();
            assert!(body.len() < declared, "{path}: the body looks complete: {answer:?}");
        }
    }
    assert!(host.wait_for_log("the response body brought more bytes than its length says", WAIT), "{}", host.log());
}
