//! Hot swapping: watched directory, atomic swap, drain, real unload.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use hotswap_tests::{artifacts, example_version, is_pattern, log_time, place_by_cp, place_by_rename, private_dir, read_download, temp_dir, version_in, Host, WAIT};

const MIB: u64 = 1024 * 1024;

async fn swap_during_download(place: fn(&Path, &Path)) {
    let (v1, v2) = (example_version("1.0.0"), example_version("2.0.0"));
    let dir = temp_dir("swap-dl");
    place_by_rename(&v1, &dir.join("app.so"));
    let host = Host::serve_dir(&dir, &[]);
    let client = reqwest::Client::new();
    assert_eq!(host.version_via(&client).await, "1.0.0");

    // 80 MiB at 8 MiB/s: about ten seconds, on v1 from start to end (v2 must be serving
    // within eight).
    let size = 80 * MIB;
    let download = reqwest::get(host.url(&format!("/download?size={size}&rate={}", 8 * MIB))).await.unwrap();
    let reader = tokio::spawn(read_download(download));
    tokio::time::sleep(Duration::from_millis(300)).await;
    place(&v2, &dir.join("app.so"));
    let swapped = Instant::now();
    while host.version_via(&client).await != "2.0.0" {
        assert!(swapped.elapsed() < Duration::from_secs(8), "v2 not served 8 s after it was placed\n{}", host.log());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mapped = host.mapped_plugins();
    assert_eq!(mapped.len(), 2, "v1 must stay mapped (beside v2) while its download runs: {mapped:?}\n{}", host.log());
    assert_eq!(reader.await.unwrap(), size);
    let mapped = host.wait_mapped(1, WAIT).await;
    assert_eq!(mapped.len(), 1, "v1 still mapped after its download ended: {mapped:?}\n{}", host.log());
    assert!(host.wait_for_log("generation unloaded and unmapped generation=1", WAIT), "{}", host.log());
}

#[tokio::test]
async fn a_host_given_one_file_swaps_that_file_and_ignores_its_neighbours() {
    let dir = temp_dir("one-file");
    place_by_rename(&example_version("1.0.0"), &dir.join("app.so"));
    let file = dir.join("app.so");
    let host = Host::serve(&["--plugin", file.to_str().unwrap()]);
    assert_eq!(host.version().await, "1.0.0");
    // A newer build beside it is not this host's.
    place_by_rename(&example_version("3.0.0"), &dir.join("other.so"));
    // A new build of the file itself is.
    place_by_rename(&example_version("2.0.0"), &file);
    host.wait_version("2.0.0").await;
    assert!(!host.log().contains("other.so"), "it looked at a neighbour:\n{}", host.log());
    assert_eq!(host.wait_mapped(1, WAIT).await.len(), 1, "{}", host.log());
}

#[tokio::test]
async fn a_download_finishes_on_v1_while_v2_arrives_by_rename() {
    swap_during_download(place_by_rename).await;
}

#[tokio::test]
async fn a_download_finishes_on_v1_while_v2_is_copied_over_the_file() {
    swap_during_download(place_by_cp).await;
}

#[tokio::test]
async fn two_hundred_swaps_under_keep_alive_load_lose_nothing() {
    // Equal precedence (build metadata does not order versions): each newer file replaces
    // the one serving, as a rebuild does.
    let versions = ["1.0.0+a", "1.0.0+b", "1.0.0+c"];
    let builds: Vec<_> = versions.iter().map(|v| example_version(v)).collect();
    let dir = temp_dir("swap-load");
    place_by_rename(&builds[0], &dir.join("app.so"));
    let host = Arc::new(Host::serve_dir(&dir, &[]));

    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (host, stop, served) = (host.clone(), stop.clone(), served.clone());
        clients.push(tokio::spawn(async move {
            let client = reqwest::Client::builder().pool_max_idle_per_host(1).build().unwrap();
            let mut answers = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let sent = SystemTime::now();
                let response = client.get(host.url("/")).send().await.expect("request failed during swaps");
                assert_eq!(response.status(), 200);
                let answered = version_in(&response.text().await.unwrap()).unwrap();
                answers.push((sent, SystemTime::now(), answered));
                served.fetch_add(1, Ordering::Relaxed);
            }
            answers
        }));
    }
    for i in 1..=200 {
        place_by_rename(&builds[i % versions.len()], &dir.join("app.so"));
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut answers = Vec::new();
    for c in clients {
        answers.extend(c.await.expect("a client failed"));
    }

    // The host's own timeline: when each version became current, from its log. The host
    // swaps, then logs, in one task: so a version became current after the line of the swap
    // before it (not necessarily by its own line, which may come many milliseconds after the
    // swap on a loaded machine). A request already being read when the next swap lands
    // finishes on the old version: allow 5 ms after the next line for that. A connection left
    // on an old generation would answer after its successor's line: stale.
    let log = host.log();
    let mut timeline = vec![(std::time::UNIX_EPOCH, versions[0].to_owned())];
    for line in log.lines().filter(|l| l.contains("swapped: new requests go to")) {
        let to = line.split(" to=example-handler@").nth(1).and_then(|r| r.split_whitespace().next()).unwrap();
        timeline.push((log_time(line).expect("log line without a timestamp"), to.to_owned()));
    }
    let slack = Duration::from_millis(5);
    let stale: Vec<_> = answers
        .iter()
        .filter(|(sent, received, version)| {
            // Current at some moment of [sent, received]: its interval on the timeline, bounded
            // as above, meets the request's.
            let current_during = |i: usize| {
                let start = if i == 0 { std::time::UNIX_EPOCH } else { timeline[i - 1].0 };
                let end = timeline.get(i + 1).map(|(next, _)| *next + slack);
                timeline[i].1 == **version && start <= *received && end.is_none_or(|end| *sent <= end)
            };
            !(0..timeline.len()).any(current_during)
        })
        .collect();
    assert!(stale.is_empty(), "{} answers from versions not current during their request, e.g. {:?}", stale.len(), stale.first());
    assert!(served.load(Ordering::Relaxed) > 1000, "too few requests to mean anything");
    let last = versions[200 % versions.len()];
    host.wait_version(last).await;
    // Renames that arrive while a build loads are merged: fewer swaps than renames on a slow
    // machine, but never few.
    let swaps = host.log().matches("swapped: new requests go to").count();
    assert!(swaps >= 50, "only {swaps} swaps happened");
    let mapped = host.wait_mapped(1, Duration::from_secs(10)).await;
    let log = host.log();
    assert_eq!(mapped.len(), 1, "plugin libraries still mapped: {mapped:?}\n{}", log.lines().filter(|l| !l.contains("DEBUG")).collect::<Vec<_>>().join("\n"));
    assert!(!log.contains("STILL MAPPED"), "{log}");
    // Busy, never blocked: the watchdog reports no generation.
    assert!(!log.contains("has run no task"), "{log}");
}

#[tokio::test]
async fn thread_locals_tracing_and_thread_current_survive_100_swaps_and_shutdown() {
    let dir = temp_dir("swap-tls");
    let tls = &artifacts().tls;
    place_by_rename(tls, &dir.join("tls.so"));
    let host = Arc::new(Host::serve_dir(&dir, &["--drain-timeout", "5s"]));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (host, stop) = (host.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let text = client.get(host.url("/")).send().await.expect("request failed").text().await.unwrap();
                assert!(text.starts_with("tls ok on"), "{text}");
                n += 1;
            }
            n
        }));
    }
    for _ in 0..100 {
        place_by_rename(tls, &dir.join("tls.so")); // a new inode each time: a new generation
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        assert!(c.await.unwrap() > 0);
    }
    let mapped = host.wait_mapped(1, Duration::from_secs(10)).await;
    assert_eq!(mapped.len(), 1, "old generations still mapped: {mapped:?}");
    let unloaded = host.log().matches("generation unloaded and unmapped").count();
    assert!(unloaded >= 25, "only {unloaded} generations unloaded\n{}", host.log());
    // Graceful shutdown: every thread that ran plugin code exits now.
    host.signal("TERM");
    let mut host = Arc::try_unwrap(host).ok().expect("clients still hold the host");
    let code = tokio::task::spawn_blocking(move || (host.wait_exit(Duration::from_secs(20)), host.log())).await.unwrap();
    assert_eq!(code.0, Some(0), "hotswap crashed or hung at shutdown:\n{}", code.1);
    assert!(!code.1.contains("STILL MAPPED"), "{}", code.1);
}

#[tokio::test]
async fn sighup_file_removal_and_a_recreated_directory() {
    let (v1, v2) = (example_version("1.0.0"), example_version("2.0.0"));
    let dir = temp_dir("swap-dir");
    place_by_rename(&v1, &dir.join("app.so"));
    let host = Host::serve_dir(&dir, &[]);
    let client = reqwest::Client::new();

    host.signal("HUP");
    assert!(host.wait_for_log("SIGHUP: no new plugin file", WAIT), "{}", host.log());

    std::fs::remove_file(dir.join("app.so")).unwrap();
    assert!(host.wait_for_log("plugin file removed", WAIT), "{}", host.log());
    assert_eq!(host.version_via(&client).await, "1.0.0");

    std::fs::remove_dir_all(&dir).unwrap();
    assert!(host.wait_for_log("plugin directory removed", WAIT), "{}", host.log());
    assert_eq!(host.version_via(&client).await, "1.0.0");
    private_dir(&dir);
    // Editor and temporary files are ignored.
    std::fs::write(dir.join(".app.so.swp"), b"not a plugin").unwrap();
    std::fs::write(dir.join("notes.txt~"), b"not a plugin").unwrap();
    place_by_rename(&v2, &dir.join("app.so"));
    let placed = Instant::now();
    while host.version_via(&client).await != "2.0.0" {
        assert!(placed.elapsed() < WAIT, "v2 not picked up in the re-created directory\n{}", host.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!host.log().contains("refused"), "{}", host.log());
}

#[tokio::test]
async fn the_drain_timeout_cuts_off_an_old_generation_and_unloads_it() {
    let (v1, v2) = (example_version("1.0.0"), example_version("2.0.0"));
    let dir = temp_dir("swap-drain");
    place_by_rename(&v1, &dir.join("app.so"));
    let host = Host::serve_dir(&dir, &["--drain-timeout", "1s"]);
    // 16 MiB at 1 MiB/s would take 16 s; the old generation may only stream for 1 s more.
    let download = reqwest::get(host.url(&format!("/download?size={}&rate={}", 16 * MIB, MIB))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    place_by_rename(&v2, &dir.join("app.so"));
    let started = Instant::now();
    let result = download.bytes().await;
    assert!(result.is_err(), "the old generation's download was not cut off");
    assert!(started.elapsed() < Duration::from_secs(12), "cut off late: {:?}", started.elapsed());
    assert!(host.wait_for_log("drain timeout", WAIT), "{}", host.log());
    let mapped = host.wait_mapped(1, WAIT).await;
    assert_eq!(mapped.len(), 1, "v1 still mapped after its drain timeout: {mapped:?}\n{}", host.log());
    assert_eq!(host.version().await, "2.0.0");
}

/// Reads one HTTP/1.1 response with a `Content-Length` from `client` (`buffer` holds what
/// was read past the previous one): its head and its body.
async fn read_response(client: &mut tokio::net::TcpStream, buffer: &mut Vec<u8>) -> (String, Vec<u8>) {
    use tokio::io::AsyncReadExt as _;
    let mut chunk = vec![0u8; 64 * 1024];
    let end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = client.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the connection closed");
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
        .unwrap_or_else(|| panic!("no content-length: {head}"));
    while buffer.len() < end + length {
        let n = client.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the connection closed");
        buffer.extend_from_slice(&chunk[..n]);
    }
    let body = buffer[end..end + length].to_vec();
    buffer.drain(..end + length);
    (head, body)
}

#[tokio::test]
async fn a_pipelined_request_that_starts_after_a_swap_gets_the_new_code() {
    use tokio::io::AsyncWriteExt as _;
    let dir = temp_dir("swap-pipelined");
    place_by_rename(&example_version("1.0.0"), &dir.join("app.so"));
    let host = Host::serve(&["--plugin-dir", dir.to_str().unwrap()]);
    let v2 = example_version("2.0.0"); // built (if need be) before the clock starts
    let mut client = tokio::net::TcpStream::connect(&host.addr).await.unwrap();
    // Three requests in one write: a response that streams for about 4 s on v1, then two
    // requests the host reads together with the first, before the swap...
    let requests = "GET /download?size=800000&rate=200000 HTTP/1.1\r\nHost: test\r\n\r\n\
                    GET / HTTP/1.1\r\nHost: test\r\n\r\n\
                    GET /download?size=300000 HTTP/1.1\r\nHost: test\r\n\r\n";
    client.write_all(requests.as_bytes()).await.unwrap();
    host.wait_in_flight(1).await;
    place_by_rename(&v2, &dir.join("app.so"));
    host.wait_version("2.0.0").await;
    // ...but which start once the first has ended, after the swap: they get the new code,
    // a streamed body included.
    let mut buffer = Vec::new();
    let responses = tokio::time::timeout(WAIT, async {
        let mut responses = Vec::new();
        for _ in 0..3 {
            responses.push(read_response(&mut client, &mut buffer).await);
        }
        responses
    });
    let responses = responses.await.expect("three responses did not arrive");
    assert_eq!(responses[0].1.len(), 800_000);
    let greeting = String::from_utf8_lossy(&responses[1].1);
    assert_eq!(version_in(&greeting).as_deref(), Some("2.0.0"), "{greeting}\n{}", host.log());
    let (head, body) = &responses[2];
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body.len(), 300_000);
    assert!(is_pattern(body, 0), "the relayed download is not byte-exact");
    // (Waited for: the log is read from the host's stderr by a thread of its own.)
    let served_by_v2 = host.wait_for_log("request method=GET path=/download status=200 generation=2", WAIT);
    assert!(served_by_v2, "{}", host.log());
}

#[tokio::test]
async fn a_pipelined_request_relayed_to_the_new_code_outlives_the_old_codes_drain_timeout() {
    use tokio::io::AsyncWriteExt as _;
    let dir = temp_dir("swap-pipelined-long");
    place_by_rename(&example_version("1.0.0"), &dir.join("app.so"));
    let host = Host::serve(&["--plugin-dir", dir.to_str().unwrap(), "--drain-timeout", "6s"]);
    let v2 = example_version("2.0.0"); // built (if need be) before the clock starts
    let mut client = tokio::net::TcpStream::connect(&host.addr).await.unwrap();
    // A response of about 4 s on v1 (the time the swap has), and one read with it that starts
    // after the swap, on v2, and streams for about 10 s: past v1's drain timeout, which must
    // not cut it.
    let requests = "GET /download?size=800000&rate=200000 HTTP/1.1\r\nHost: test\r\n\r\n\
                    GET /download?size=2000000&rate=200000 HTTP/1.1\r\nHost: test\r\n\r\n";
    client.write_all(requests.as_bytes()).await.unwrap();
    host.wait_in_flight(1).await;
    place_by_rename(&v2, &dir.join("app.so"));
    host.wait_version("2.0.0").await;
    let mut buffer = Vec::new();
    let (_, first) = tokio::time::timeout(WAIT, read_response(&mut client, &mut buffer)).await.expect("the first response");
    assert_eq!(first.len(), 800_000);
    // The connection follows its request to v2, and v1 unloads without waiting for it (or
    // being cut off at its drain timeout: see the end).
    let mapped = host.wait_mapped(1, WAIT).await;
    assert_eq!(mapped.len(), 1, "v1 stayed loaded behind a request of v2's: {mapped:?}\n{}", host.log());
    let (head, second) = tokio::time::timeout(WAIT, read_response(&mut client, &mut buffer)).await.expect("the second response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(second.len(), 2_000_000);
    assert!(is_pattern(&second, 0), "the relayed download is not byte-exact");
    assert!(!host.log().contains("drain timeout: aborting"), "{}", host.log());
}

#[tokio::test]
async fn a_directory_replaced_under_its_path_is_watched_again() {
    // Releases side by side, `current` a symlink to one, switched as deploy tools do:
    // a new symlink renamed over the old one.
    let base = temp_dir("swap-release-dirs");
    let release = |n: u32, version: &str| {
        let dir = private_dir(&base.join(format!("release-{n}")));
        place_by_rename(&example_version(version), &dir.join("app.so"));
        dir
    };
    let current = base.join("current");
    let point = |target: &Path| {
        let staged = base.join("current.tmp");
        std::os::unix::fs::symlink(target, &staged).unwrap();
        std::fs::rename(&staged, &current).unwrap();
    };
    point(&release(1, "1.0.0"));
    let host = Host::serve(&["--plugin-dir", current.to_str().unwrap()]);
    assert!(host.wait_for_log("watching for new plugin builds", WAIT), "{}", host.log());
    point(&release(2, "2.0.0"));
    host.wait_version("2.0.0").await; // the new release is seen

    // A real directory renamed away, and another renamed into its place.
    let plain = private_dir(&base.join("plain"));
    place_by_rename(&example_version("1.0.0"), &plain.join("app.so"));
    let host = Host::serve(&["--plugin-dir", plain.to_str().unwrap()]);
    assert!(host.wait_for_log("watching for new plugin builds", WAIT), "{}", host.log());
    std::fs::rename(&plain, base.join("plain.old")).unwrap();
    std::fs::rename(release(3, "2.0.0"), &plain).unwrap();
    host.wait_version("2.0.0").await; // the new directory is seen
    // And the new one is watched: a build placed in it is served.
    place_by_rename(&example_version("3.0.0"), &plain.join("app.so"));
    host.wait_version("3.0.0").await;
}
