//! Bad candidates are refused with a reason while the current version keeps serving; a slow
//! writer is waited for.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hotswap_tests::{artifacts, example_version, init_fixture, place_by_rename, temp_dir, version_in, Host, WAIT};

fn system_libz() -> PathBuf {
    ["/usr/lib/x86_64-linux-gnu/libz.so.1", "/lib/x86_64-linux-gnu/libz.so.1", "/usr/lib64/libz.so.1", "/usr/lib/libz.so.1"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("no system libz to use as a shared library that is not a plugin")
}

fn write_file(path: &Path, bytes: &[u8]) -> PathBuf {
    std::fs::write(path, bytes).unwrap();
    path.to_path_buf()
}

#[tokio::test]
async fn bad_candidates_are_refused_and_the_current_version_keeps_serving() {
    let v1 = example_version("1.0.0");
    let v2 = example_version("2.0.0");
    let init_error = init_fixture("error");
    let init_panic = init_fixture("panic");
    let init_hang = init_fixture("hang");
    let not_ready = init_fixture("notready");
    // Library constructors and destructors run by the dynamic loader: first in a probe
    // process, never in the host when they crash or hang.
    let ctor_abort = init_fixture("ctor-abort");
    let ctor_exit = init_fixture("ctor-exit");
    let ctor_hang = init_fixture("ctor-hang");
    let dtor_hang = init_fixture("dtor-hang");

    let dir = temp_dir("candidates");
    let scratch = temp_dir("candidates-src");
    place_by_rename(&v1, &dir.join("app.so"));
    let host = Arc::new(Host::serve(&["--plugin-dir", dir.to_str().unwrap(), "--init-timeout", "2s"]));

    // Probe all along: every answer must come from v1 until the slow writer's v2 completes.
    let stop = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(AtomicU64::new(0));
    let prober = {
        let (host, stop, answers) = (host.clone(), stop.clone(), answers.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            while !stop.load(Ordering::Relaxed) {
                let text = client.get(host.url("/")).send().await.expect("request failed").text().await.unwrap();
                assert_eq!(version_in(&text).as_deref(), Some("1.0.0"), "{text}");
                answers.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    let real = std::fs::read(&v2).unwrap();
    let mut random = vec![0u8; 8192];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in random.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let cases: Vec<(&str, PathBuf, &str)> = vec![
        ("empty.so", write_file(&scratch.join("empty"), b""), "incomplete file: 0 bytes"),
        ("random.so", write_file(&scratch.join("random"), &random), "not a loadable shared library"),
        ("truncated.so", write_file(&scratch.join("truncated"), &real[..real.len() / 2]), "so it is truncated"),
        ("libz.so", system_libz(), "not a hotswap plugin"),
        ("wrong-abi.so", artifacts().wrong_abi.clone(), "plugin ABI version 3, host ABI version 4"),
        ("init-error.so", init_error, "init failed: fixture: init refuses on purpose"),
        ("init-panic.so", init_panic, "init panicked: panicked: fixture: init panics on purpose"),
        ("init-hang.so", init_hang, "init did not return within 2s"),
        ("not-ready.so", not_ready, "readiness check failed: fixture: not ready on purpose"),
        ("ctor-abort.so", ctor_abort, "its initialisers crashed the probe process that opened it first (signal 6, SIGABRT"),
        ("ctor-exit.so", ctor_exit, "its initialisers ended the probe process that opened it first (exit status 3)"),
        ("ctor-hang.so", ctor_hang, "its initialisers did not finish within 2s in the probe process"),
        ("dtor-hang.so", dtor_hang, "its finalisers did not finish within 2s in the probe process"),
    ];
    for (name, source, reason) in &cases {
        place_by_rename(source, &dir.join(name));
        let expected = "refused plugin candidate: ";
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let log = host.log();
            if log.lines().any(|l| l.contains(expected) && l.contains(reason) && l.contains(name)) {
                break;
            }
            assert!(Instant::now() < deadline, "{name} was not refused with {reason:?}:\n{log}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(!host.log().contains("swapped:"), "a bad candidate was swapped in:\n{}", host.log());

    // A slow writer: v2 written in place in small pieces. Never refused, loaded once complete.
    let slow = dir.join("slow.so");
    let mut file = std::fs::File::create(&slow).unwrap();
    let pieces: Vec<_> = real.chunks(real.len() / 40 + 1).collect();
    let (last, pieces) = pieces.split_last().unwrap();
    for piece in pieces {
        file.write_all(piece).unwrap();
        file.flush().unwrap();
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    // The prober stops before the file is complete: from then on v2 may serve.
    stop.store(true, Ordering::Relaxed);
    prober.await.expect("an answer did not come from v1 while bad candidates arrived");
    assert!(answers.load(Ordering::Relaxed) > 50);
    file.write_all(last).unwrap();
    drop(file);
    host.wait_version("2.0.0").await;
    let log = host.log();
    assert!(!log.lines().any(|l| l.contains("refused") && l.contains("slow.so")), "{log}");
}

#[tokio::test]
async fn a_build_refused_at_start_is_refused_once() {
    let dir = temp_dir("candidates-start");
    place_by_rename(&example_version("1.0.0"), &dir.join("app.so"));
    write_file(&dir.join("garbage.so"), b"not a library at all");
    let host = Host::serve(&["--plugin-dir", dir.to_str().unwrap()]);
    // The watcher's first scan finds the file already read: it is not offered again.
    assert!(host.wait_for_log("watching for new plugin builds", WAIT), "{}", host.log());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let lines = host.log().lines().filter(|l| l.contains("garbage.so")).count();
    assert_eq!(lines, 1, "refused more than once:\n{}", host.log());
    let (_, status) = host.command_json(&["status"]);
    assert_eq!(status["refusals"].as_array().map(Vec::len), Some(1), "{status}");
    // A reload tries it again, and says it is still refused (recorded once all the same).
    let reload = host.command(&["reload"]);
    assert_ne!(reload.code, 0, "{reload:?}");
    assert!(reload.stdout.contains("garbage.so") || reload.stderr.contains("garbage.so"), "{reload:?}");
    let (_, status) = host.command_json(&["status"]);
    assert_eq!(status["refusals"].as_array().map(Vec::len), Some(1), "{status}");
}

/// The `n`-byte little-endian field at `at` of an ELF image, as a number.
fn le(bytes: &[u8], at: usize, n: usize) -> u64 {
    bytes[at..at + n].iter().rev().fold(0, |v, b| v << 8 | u64::from(*b))
}

/// Where the last loaded segment (`PT_LOAD`) of the 64-bit ELF image `elf` ends in the file.
fn loaded_end(elf: &[u8]) -> usize {
    let (phoff, phentsize, phnum) = (le(elf, 0x20, 8), le(elf, 0x36, 2), le(elf, 0x38, 2));
    let end = (0..phnum)
        .map(|i| (phoff + i * phentsize) as usize)
        .filter(|&ph| le(elf, ph, 4) == 1)
        .map(|ph| le(elf, ph + 8, 8) + le(elf, ph + 0x20, 8))
        .max()
        .expect("no PT_LOAD segment");
    end as usize
}

/// The first `len` bytes of `elf`, with no section header table: what `sstrip` (or
/// `strip --strip-section-headers`) leaves of a library, e_shoff, e_shnum and e_shstrndx zero.
fn without_section_headers(elf: &[u8], len: usize) -> Vec<u8> {
    let mut stripped = elf[..len].to_vec();
    stripped[0x28..0x30].fill(0);
    stripped[0x3c..0x40].fill(0);
    stripped
}

#[tokio::test]
async fn a_truncated_library_without_section_headers_is_refused_and_the_host_keeps_serving() {
    let dir = temp_dir("candidates-stripped");
    let scratch = temp_dir("candidates-stripped-src");
    place_by_rename(&example_version("1.0.0"), &dir.join("app.so"));
    let host = Host::serve(&["--plugin-dir", dir.to_str().unwrap()]);

    // Cut off halfway through its loaded segments: only the program headers tell. dlopen would
    // map the missing pages and fault (SIGBUS) on touching them, taking the host down.
    let real = std::fs::read(example_version("2.0.0")).unwrap();
    let end = loaded_end(&real);
    let truncated = write_file(&scratch.join("truncated"), &without_section_headers(&real, end / 2));
    place_by_rename(&truncated, &dir.join("stripped.so"));
    let refused = format!("incomplete file: {} bytes, but its ELF headers say it ends at byte {end}", end / 2);
    let deadline = Instant::now() + Duration::from_secs(15);
    let is_refusal = |l: &str| l.contains("refused plugin candidate: ") && l.contains(&refused) && l.contains("so it is truncated");
    while !host.log().lines().any(is_refusal) {
        assert!(Instant::now() < deadline, "the truncated stripped library was not refused as truncated:\n{}", host.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(host.version().await, "1.0.0", "{}", host.log());

    // Complete up to its last loaded byte (sstrip drops what follows): loaded and served.
    let complete = write_file(&scratch.join("complete"), &without_section_headers(&real, end));
    place_by_rename(&complete, &dir.join("stripped.so"));
    host.wait_version("2.0.0").await;
}

fn mkfifo(path: &Path) {
    let made = std::process::Command::new("mkfifo").arg(path).status().expect("cannot run mkfifo");
    assert!(made.success(), "mkfifo {} failed", path.display());
}

#[tokio::test]
async fn a_fifo_named_like_a_plugin_does_not_stop_the_host() {
    // Opening a FIFO for reading waits for a writer: a load that opened one would hang, and
    // with it every load after it. (The loader refuses one without opening it for good; the
    // directory scans pass over files that are not regular before that.)
    let dir = temp_dir("candidates-fifo");
    place_by_rename(&example_version("1.0.0"), &dir.join("app.so"));
    mkfifo(&dir.join("early.so"));
    let host = Host::serve(&["--plugin-dir", dir.to_str().unwrap()]);
    assert!(host.wait_for_log("watching for new plugin builds", WAIT), "{}", host.log());
    mkfifo(&dir.join("late.so"));
    host.signal("HUP");
    assert!(host.wait_for_log("SIGHUP: rescanning the plugin directory", WAIT), "{}", host.log());
    assert_eq!(host.version().await, "1.0.0");
    // Loads still go on.
    place_by_rename(&example_version("2.0.0"), &dir.join("next.so"));
    host.wait_version("2.0.0").await;
}

#[tokio::test]
async fn a_refused_library_whose_initialiser_started_a_thread_is_not_closed_under_it() {
    // Its thread first sleeps for a second, then runs the library's code every 20 ms.
    let threaded = hotswap_tests::variant("fixture-wrong-abi", "FIXTURE_THREAD_AT_LOAD", "1");
    let dir = temp_dir("candidates-ctor-thread");
    place_by_rename(&example_version("1.0.0"), &dir.join("app.so"));
    let host = Host::serve(&["--plugin-dir", dir.to_str().unwrap()]);
    place_by_rename(&threaded, &dir.join("threaded.so"));
    assert!(host.wait_for_log("refused plugin candidate", WAIT), "{}", host.log());
    assert!(host.wait_for_log("stays loaded (leaked)", WAIT), "{}", host.log());
    tokio::time::sleep(Duration::from_millis(1500)).await; // past the thread's first wake-up
    let answer = reqwest::get(host.url("/")).await.expect("the host died");
    assert_eq!(version_in(&answer.text().await.unwrap()).as_deref(), Some("1.0.0"));
}
