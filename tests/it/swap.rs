//! The hot-swap issue: watched directory, atomic swap, drain, real unload.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hotswap_tests::{artifacts, example_version, is_pattern, place_by_cp, place_by_rename, temp_dir, version_in, Host};

const MIB: u64 = 1024 * 1024;

fn serve_dir(dir: &Path, extra: &[&str]) -> Host {
    let mut args = vec!["--plugin-dir", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    Host::serve(&args)
}

async fn version(client: &reqwest::Client, host: &Host) -> String {
    let text = client.get(host.url("/")).send().await.unwrap().text().await.unwrap();
    version_in(&text).unwrap_or_else(|| panic!("no version in {text:?}"))
}

/// Waits (bounded) until the host has exactly `n` plugin libraries mapped.
async fn wait_mapped(host: &Host, n: usize, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let mapped = host.mapped_plugins();
        if mapped.len() == n || Instant::now() > deadline {
            return mapped;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn swap_during_download(place: fn(&Path, &Path)) {
    let (v1, v2) = (example_version("1.0.0"), example_version("2.0.0"));
    let dir = temp_dir("swap-dl");
    place_by_rename(&v1, &dir.join("app.so"));
    let host = serve_dir(&dir, &[]);
    let client = reqwest::Client::new();
    assert_eq!(version(&client, &host).await, "1.0.0");

    // 32 MiB at 16 MiB/s: about two seconds, on v1 from start to end.
    let size = 32 * MIB;
    let download = reqwest::get(host.url(&format!("/download?size={size}&rate={}", 16 * MIB))).await.unwrap();
    let reader = tokio::spawn(async move {
        let mut stream = download.bytes_stream();
        let mut at = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.expect("the download broke during the swap");
            assert!(is_pattern(&chunk, at), "byte mismatch at offset {at}");
            at += chunk.len() as u64;
        }
        at
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    place(&v2, &dir.join("app.so"));
    let swapped = Instant::now();
    while version(&client, &host).await != "2.0.0" {
        assert!(swapped.elapsed() < Duration::from_secs(2), "v2 not served 2 s after it was placed\n{}", host.log());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mapped = host.mapped_plugins();
    assert!(mapped.iter().any(|m| m.contains("/g1-")), "v1 must stay mapped while its download runs: {mapped:?}\n{}", host.log());
    assert_eq!(reader.await.unwrap(), size);
    let mapped = wait_mapped(&host, 1, Duration::from_secs(5)).await;
    assert_eq!(mapped.len(), 1, "v1 still mapped after its download ended: {mapped:?}\n{}", host.log());
    assert!(host.log().contains("generation unloaded and unmapped generation=1"), "{}", host.log());
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
    let versions = ["1.0.0", "2.0.0", "3.0.0"];
    let builds: Vec<_> = versions.iter().map(|v| example_version(v)).collect();
    let dir = temp_dir("swap-load");
    place_by_rename(&builds[0], &dir.join("app.so"));
    let host = Arc::new(serve_dir(&dir, &[]));

    // The test's timeline of placements: (when, version index).
    let timeline = Arc::new(Mutex::new(vec![(Instant::now(), 0usize)]));
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (host, timeline, stop, served) = (host.clone(), timeline.clone(), stop.clone(), served.clone());
        clients.push(tokio::spawn(async move {
            let client = reqwest::Client::builder().pool_max_idle_per_host(1).build().unwrap();
            let mut stale = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                let response = client.get(host.url("/")).send().await.expect("request failed during swaps");
                assert_eq!(response.status(), 200);
                let answered = version_in(&response.text().await.unwrap()).unwrap();
                let received = Instant::now();
                served.fetch_add(1, Ordering::Relaxed);
                // Current at some moment during the request: placed before `received`, and not
                // replaced by two later placements before `sent` (the host may lag the file
                // system by one swap, never by two).
                let timeline = timeline.lock().unwrap();
                let last_before_sent = timeline.iter().rposition(|(t, _)| *t <= sent).unwrap_or(0);
                let allowed: Vec<usize> = timeline[last_before_sent.saturating_sub(1)..]
                    .iter()
                    .filter(|(t, _)| *t <= received)
                    .map(|(_, v)| *v)
                    .collect();
                if !allowed.iter().any(|v| versions[*v] == answered) {
                    stale.push(answered);
                }
            }
            stale
        }));
    }
    for i in 1..=200 {
        let v = i % versions.len();
        place_by_rename(&builds[v], &dir.join("app.so"));
        timeline.lock().unwrap().push((Instant::now(), v));
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let stale = c.await.expect("a client failed");
        assert!(stale.is_empty(), "answers from versions not current during the request: {stale:?}");
    }
    assert!(served.load(Ordering::Relaxed) > 1000, "too few requests to mean anything");
    let last = versions[200 % versions.len()];
    assert_eq!(version(&reqwest::Client::new(), &host).await, last);
    let swaps = host.log().matches("swapped: new requests go to").count();
    assert!(swaps >= 100, "only {swaps} swaps happened");
    let mapped = wait_mapped(&host, 1, Duration::from_secs(10)).await;
    let log = host.log();
    assert_eq!(mapped.len(), 1, "plugin libraries still mapped: {mapped:?}\n{}", log.lines().filter(|l| !l.contains("DEBUG")).collect::<Vec<_>>().join("\n"));
    assert!(!log.contains("STILL MAPPED"), "{log}");
}

#[tokio::test]
async fn thread_locals_tracing_and_thread_current_survive_100_swaps_and_shutdown() {
    let dir = temp_dir("swap-tls");
    let tls = &artifacts().tls;
    place_by_rename(tls, &dir.join("tls.so"));
    let host = Arc::new(serve_dir(&dir, &["--drain-timeout", "5s"]));
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
    let mapped = wait_mapped(&host, 1, Duration::from_secs(10)).await;
    assert_eq!(mapped.len(), 1, "old generations still mapped: {mapped:?}");
    let unloaded = host.log().matches("generation unloaded and unmapped").count();
    assert!(unloaded >= 50, "only {unloaded} generations unloaded\n{}", host.log());
    // Graceful shutdown: every thread that ran plugin code exits now.
    host.signal("TERM");
    let mut host = Arc::try_unwrap(host).ok().expect("clients still hold the host");
    let code = tokio::task::spawn_blocking(move || (host.wait_exit(Duration::from_secs(20)), host.log())).await.unwrap();
    assert_eq!(code.0, Some(0), "hotswap crashed or hung at shutdown:\n{}", code.1);
    assert!(!code.1.contains("STILL MAPPED"), "{}", code.1);
}
