//! Upgrading the host binary itself (`hotswap upgrade`): sockets, build and connections go to
//! a new process; nothing is refused or cut.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hotswap_tests::{artifacts, example_version, heavy_lock, place_by_rename, read_download, temp_dir, Host, WAIT};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// One keep-alive connection that, like the bench driver's clients, never reconnects and
/// never retries: any failure is an error.
struct KeepAlive {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl KeepAlive {
    async fn connect(addr: &str) -> KeepAlive {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).unwrap();
        KeepAlive { stream, buffer: Vec::new() }
    }

    /// `GET path` on this connection: the body of a 200, or what went wrong.
    async fn get(&mut self, path: &str) -> Result<String, String> {
        let request = format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
        self.stream.write_all(request.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
        let head_end = loop {
            if let Some(at) = self.buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            self.fill().await?;
        };
        let head = String::from_utf8_lossy(&self.buffer[..head_end]).into_owned();
        if !head.starts_with("HTTP/1.1 200") {
            return Err(format!("answered {head:?}"));
        }
        if head.to_ascii_lowercase().contains("connection: close") {
            return Err(format!("the server closes the connection: {head:?}"));
        }
        let length: usize = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
            .ok_or_else(|| format!("no content-length: {head:?}"))?;
        while self.buffer.len() < head_end + length {
            self.fill().await?;
        }
        let body = String::from_utf8_lossy(&self.buffer[head_end..head_end + length]).into_owned();
        self.buffer.drain(..head_end + length);
        Ok(body)
    }

    async fn fill(&mut self) -> Result<(), String> {
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk).await {
            Ok(0) => Err("the connection was closed".into()),
            Ok(n) => {
                self.buffer.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e) => Err(format!("read: {e}")),
        }
    }

    /// The pid of the host process that answers on this connection.
    async fn host_pid(&mut self) -> Result<u32, String> {
        let body = self.get("/host").await?;
        body.trim().strip_prefix("pid=").and_then(|p| p.parse().ok()).ok_or_else(|| format!("not a pid: {body:?}"))
    }
}

/// Whether process `pid` is still running (and not a zombie).
pub(crate) fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| !stat.split(") ").nth(1).is_some_and(|s| s.starts_with('Z')))
}

/// The host processes upgrades started, stopped when dropped (the test's own `Host` stops only
/// the first).
#[derive(Default)]
pub(crate) struct Reap(std::sync::Mutex<Vec<u32>>);

impl Reap {
    pub(crate) fn add(&self, pid: u32) {
        self.0.lock().unwrap().push(pid);
    }

    fn all(&self) -> Vec<u32> {
        self.0.lock().unwrap().clone()
    }
}

impl Drop for Reap {
    fn drop(&mut self) {
        for pid in self.0.get_mut().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).stderr(std::process::Stdio::null()).status();
        }
    }
}

/// A host serving the example handler from a directory of its own (`name`), with `extra`
/// arguments, and the reaper of the hosts its upgrades start.
fn example_host(name: &str, extra: &[&str]) -> (std::path::PathBuf, Host, Reap) {
    let dir = temp_dir(name);
    place_by_rename(&artifacts().example, &dir.join("app.so"));
    let host = Host::serve_dir(&dir, extra);
    (dir, host, Reap::default())
}

/// `hotswap upgrade` against `host`'s admin socket, off the async runtime; the new pid.
pub(crate) async fn upgrade(admin: &Path, extra: &[&str]) -> Result<u32, String> {
    let mut args = vec!["upgrade".to_owned(), "--json".to_owned()];
    args.extend(extra.iter().map(|a| a.to_string()));
    let admin = admin.to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(&artifacts().hotswap).args(&args).env("HOTSWAP_ADMIN", admin).output().unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)));
    }
    let record: serde_json::Value = serde_json::from_str(&stdout).map_err(|e| format!("{e}: {stdout}"))?;
    Ok(record["to_pid"].as_u64().unwrap() as u32)
}

#[test]
fn ten_host_upgrades_under_load_refuse_nothing_and_cut_nothing() {
    // It loads the machine on purpose: not beside the other heavy tests.
    let _heavy = heavy_lock();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap();
    runtime.block_on(ten_upgrades());
}

async fn ten_upgrades() {
    let (_dir, mut host, reap) = example_host("host-upgrade", &["--drain-timeout", "60s"]);
    // Carried to every new host: the pin, and the history.
    let pinned = host.command(&["pin", "0.1.0"]);
    assert_eq!(pinned.code, 0, "{pinned:?}");

    // A throttled download, begun on the first host: it must finish there, byte-exact.
    let size: u64 = 32 << 20;
    let download = {
        let url = host.url(&format!("/download?size={size}&rate={}", 12 << 20));
        tokio::spawn(async move {
            let response = reqwest::get(url).await.expect("download request");
            assert_eq!(response.status(), 200);
            read_download(response).await
        })
    };

    // Keep-alive load: each client one socket, never reconnecting, never retrying.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let mut busy = Vec::new();
    for _ in 0..8 {
        let (addr, stop, served) = (host.addr.clone(), stop.clone(), served.clone());
        busy.push(tokio::spawn(async move {
            let mut client = KeepAlive::connect(&addr).await;
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let pid = client.host_pid().await.unwrap_or_else(|e| panic!("a keep-alive request failed (hosts seen: {seen:?}): {e}"));
                if seen.last() != Some(&pid) {
                    seen.push(pid);
                }
                served.fetch_add(1, Ordering::Relaxed);
            }
            seen
        }));
    }
    // New connections all along: none may be refused.
    let refused = Arc::new(AtomicU64::new(0));
    let connector = {
        let (addr, stop, refused) = (host.addr.clone(), stop.clone(), refused.clone());
        tokio::spawn(async move {
            let mut opened = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let mut client = match TcpStream::connect(&addr).await {
                    Ok(stream) => KeepAlive { stream, buffer: Vec::new() },
                    Err(e) => {
                        eprintln!("connection refused: {e}");
                        refused.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                if let Err(e) = client.get("/health").await {
                    eprintln!("a new connection failed: {e}");
                    refused.fetch_add(1, Ordering::Relaxed);
                }
                opened += 1;
            }
            opened
        })
    };
    // Idle keep-alive connections: one request before the upgrades, one after.
    let mut idle = Vec::new();
    for _ in 0..4 {
        let mut client = KeepAlive::connect(&host.addr).await;
        assert_eq!(client.host_pid().await.unwrap(), host.pid());
        idle.push(client);
    }

    let mut last = host.pid();
    for i in 0..10 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let next = upgrade(&host.admin, &[]).await.unwrap_or_else(|e| panic!("upgrade {i} failed: {e}\n{}", host.log()));
        assert_ne!(next, last);
        reap.add(next);
        last = next;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut hosts_seen = BTreeSet::new();
    for client in busy {
        let seen = client.await.expect("a keep-alive client failed");
        assert_eq!(seen.last(), Some(&last), "a keep-alive connection did not reach the last host: {seen:?}");
        hosts_seen.extend(seen);
    }
    assert!(hosts_seen.len() >= 6, "keep-alive connections went through too few hosts: {hosts_seen:?}");
    let opened = connector.await.unwrap();
    assert_eq!(refused.load(Ordering::Relaxed), 0, "new connections refused or failed (of {opened})");
    assert!(served.load(Ordering::Relaxed) > 500, "too few requests to mean anything");
    for client in &mut idle {
        assert_eq!(client.host_pid().await.expect("an idle keep-alive connection was lost"), last);
    }
    assert_eq!(download.await.expect("the download failed"), size);

    // The first host has exited 0 once its download was done; every later one but the last too.
    assert_eq!(host.wait_exit(Duration::from_secs(30)), Some(0), "{}", host.log());
    let all = reap.all();
    for pid in &all[..all.len() - 1] {
        let deadline = Instant::now() + Duration::from_secs(20);
        while alive(*pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!alive(*pid), "host {pid} is still running after handing over");
    }
    assert!(alive(last));

    // The last host carries the pin, the history and the upgrades.
    let (_, status) = host.command_json(&["status"]);
    assert_eq!(status["pid"], last);
    assert_eq!(status["pin"]["version"], "0.1.0", "{status}");
    assert_eq!(status["upgrades"].as_array().unwrap().len(), 10, "{status}");
    // Generations are numbered on across processes: the first host's was 1.
    assert_eq!(status["current"]["generation"], 11, "{status}");
    let handed: u64 = status["upgrades"].as_array().unwrap().iter().map(|u| u["connections_handed_over"].as_u64().unwrap()).sum();
    assert!(handed >= 10, "too few connections handed over: {status}");
}

#[tokio::test]
async fn the_history_and_a_rollback_survive_upgrades() {
    let (a, b) = (example_version("1.0.0+a"), example_version("1.0.0+b"));
    let dir = temp_dir("host-upgrade-history");
    place_by_rename(&a, &dir.join("app.so"));
    let host = Host::serve_dir(&dir, &[]);
    let reap = Reap::default();
    place_by_rename(&b, &dir.join("app.so"));
    host.wait_version("1.0.0+b").await;
    for _ in 0..2 {
        reap.add(upgrade(&host.admin, &[]).await.unwrap());
    }
    // The build is gone from the directory: the rollback comes from the copy the first host
    // kept, carried over twice.
    std::fs::remove_file(dir.join("app.so")).unwrap();
    let rollback = host.command(&["rollback"]);
    assert_eq!(rollback.code, 0, "{rollback:?}\n{}", host.log());
    host.wait_version("1.0.0+a").await;
    // Upgrades after the rollback serve the build rolled back to, still pinned.
    for _ in 0..2 {
        reap.add(upgrade(&host.admin, &[]).await.unwrap_or_else(|e| panic!("{e}\n{}", host.log())));
    }
    assert_eq!(host.version().await, "1.0.0+a");
    let (_, status) = host.command_json(&["status"]);
    assert_eq!(status["pin"]["by"], "rollback", "{status}");
    let earlier: Vec<_> = status["history"].as_array().unwrap().iter().filter(|r| r["state"] == "previous-host").collect();
    assert!(earlier.iter().any(|r| r["version"] == "1.0.0+b"), "{status}");
}

#[tokio::test]
async fn a_canary_rolled_back_before_an_upgrade_stays_out_after_it() {
    let (dir, host, reap) = example_host("host-upgrade-canary", &["--canary", "50", "--canary-min-requests", "20"]);
    place_by_rename(&artifacts().faulty, &dir.join("faulty.so"));
    assert!(host.wait_for_log("canary started", Duration::from_secs(30)), "{}", host.log());
    let client = reqwest::Client::new();
    for i in 0..2000 {
        if host.log().contains("canary rolled back") {
            break;
        }
        // Every request is answered 200: the canary's panics are answered by the current version.
        let response = client.get(host.url(if i % 2 == 0 { "/health?panic" } else { "/health" })).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }
    assert!(host.wait_for_log("canary rolled back", Duration::from_secs(30)), "{}", host.log());
    reap.add(upgrade(&host.admin, &[]).await.unwrap_or_else(|e| panic!("{e}\n{}", host.log())));
    tokio::time::sleep(Duration::from_millis(500)).await; // the new host settles
    let (_, status) = host.command_json(&["status"]);
    assert_eq!(status["canary"], serde_json::Value::Null, "{status}");
    assert_eq!(status["current"]["name"], "example-handler", "{status}");
    let faulty = status["builds"].as_array().unwrap().iter().find(|b| b["name"] == "fixture-faulty").cloned();
    assert_eq!(faulty.map(|b| b["rolled_back"].clone()), Some(true.into()), "{status}");
    assert_eq!(host.log_count("canary started"), 1, "{}", host.log());
}

#[tokio::test]
async fn a_build_refused_before_an_upgrade_is_not_tried_again_after_it() {
    let (dir, host, reap) = example_host("host-upgrade-refused", &[]);
    // Another plugin, newer on disk: it should serve, but its init fails. And a file that is
    // no library at all.
    place_by_rename(&hotswap_tests::init_fixture("error"), &dir.join("other.so"));
    assert!(host.wait_for_log("refused plugin candidate", Duration::from_secs(30)), "{}", host.log());
    let junk = temp_dir("host-upgrade-junk").join("junk.so");
    std::fs::write(&junk, b"not a library").unwrap();
    place_by_rename(&junk, &dir.join("junk.so"));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while host.log_count("refused plugin candidate") < 2 {
        assert!(std::time::Instant::now() < deadline, "{}", host.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = upgrade(&host.admin, &[]).await.unwrap();
    reap.add(pid);
    assert_eq!(KeepAlive::connect(&host.addr).await.host_pid().await.unwrap(), pid);
    tokio::time::sleep(Duration::from_millis(500)).await; // the new host settles
    assert_eq!(host.log_count("refused plugin candidate"), 2, "{}", host.log());
    let (_, status) = host.command_json(&["status"]);
    assert_eq!(status["current"]["name"], "example-handler", "{status}");
    assert_eq!(status["refusals"].as_array().unwrap().len(), 2, "{status}");
    // The refusal names the file as the operator knows it, not the host's private copy.
    let junk_refusal = status["refusals"].as_array().unwrap().iter().find(|r| r["file"].as_str().unwrap().ends_with("junk.so")).unwrap();
    let reason = junk_refusal["reason"].as_str().unwrap();
    assert!(reason.starts_with(&format!("{}: not a loadable shared library", dir.join("junk.so").display())), "{reason}");
    assert!(!reason.contains("/proc/self/fd"), "{reason}");
    assert_eq!(status["builds"].as_array().unwrap().iter().filter(|b| b["refused"] == true).count(), 1, "{status}");
}

#[tokio::test]
async fn a_new_binary_that_does_not_serve_leaves_the_old_host_serving() {
    let (_dir, host, _reap) = example_host("host-upgrade-fails", &[]);
    let mut client = KeepAlive::connect(&host.addr).await;
    assert_eq!(client.host_pid().await.unwrap(), host.pid());

    // One that exits at once, one that never answers, one that is no program at all.
    let scripts = temp_dir("host-upgrade-scripts");
    let write = |name: &str, text: &str| {
        use std::os::unix::fs::PermissionsExt as _;
        let path = scripts.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    };
    let exits = write("exits.sh", "#!/bin/sh\necho 'broken build' >&2\nexit 3\n");
    let hangs = write("hangs.sh", "#!/bin/sh\nexec sleep 600\n");
    // A real hotswap that cannot load the plugin: it trusts no build.
    let digests = scripts.join("trusted.sha256");
    std::fs::write(&digests, format!("{}\n", "0".repeat(64))).unwrap();
    let cannot_load = write(
        "cannot-load.sh",
        &format!("#!/bin/sh\nexec {} \"$@\" --trusted-digests {}\n", artifacts().hotswap.display(), digests.display()),
    );
    let text = scripts.join("notes.txt");
    std::fs::write(&text, "not a program").unwrap();

    let error = upgrade(&host.admin, &["--binary", exits.to_str().unwrap()]).await.unwrap_err();
    assert!(error.contains("exited (exit status: 3) before it served"), "{error}");
    let error = upgrade(&host.admin, &["--binary", hangs.to_str().unwrap(), "--timeout", "1s"]).await.unwrap_err();
    assert!(error.contains("did not serve within"), "{error}");
    let error = upgrade(&host.admin, &["--binary", text.to_str().unwrap()]).await.unwrap_err();
    assert!(error.contains("not an executable file"), "{error}");
    let error = upgrade(&host.admin, &["--binary", cannot_load.to_str().unwrap()]).await.unwrap_err();
    assert!(error.contains("cannot serve: no loadable plugin"), "{error}");

    // Still this host, on the same connection, and new connections too.
    assert_eq!(client.host_pid().await.unwrap(), host.pid());
    assert_eq!(KeepAlive::connect(&host.addr).await.host_pid().await.unwrap(), host.pid());
    let (_, status) = host.command_json(&["status"]);
    assert_eq!(status["upgrades"].as_array().unwrap().len(), 0, "{status}");
    assert!(host.log().contains("upgrade failed, this host goes on serving"), "{}", host.log());
}

#[tokio::test]
async fn a_host_that_is_pid_1_refuses_to_upgrade_and_goes_on_serving() {
    // PID 1 of a PID namespace of its own, as in a container (in a user namespace, so that
    // it needs no root).
    const UNSHARE: [&str; 4] = ["--user", "--map-root-user", "--pid", "--fork"];
    let probe = std::process::Command::new("unshare").args(UNSHARE).arg("true").output();
    if !probe.is_ok_and(|out| out.status.success()) {
        eprintln!("SKIPPED the PID 1 test: `unshare --pid` is not allowed here");
        return;
    }
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(UNSHARE).args(["--kill-child", "--"]).arg(&artifacts().hotswap);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--plugin", artifacts().example.to_str().unwrap()]);
    let host = Host::start_command(cmd, Duration::from_secs(30)).unwrap_or_else(|log| panic!("{log}"));
    let error = upgrade(&host.admin, &[]).await.unwrap_err();
    assert!(error.contains("this host is PID 1") && error.contains("rolling out a new image"), "{error}");
    let served = reqwest::get(host.url("/")).await.unwrap();
    assert_eq!(served.status(), 200);
}

// Multi-threaded: the wait for the old host's exit blocks the test's thread, while the HTTP/2
// client's connection task must go on running to answer the old host's GOAWAY and close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_and_http2_finish_on_the_old_host() {
    use crate::upgrades::{connect, echo, greeting};
    use tokio_tungstenite::tungstenite::Message;
    let (_dir, mut host, reap) = example_host("host-upgrade-long", &[]);
    let mut session = connect(&host, "").await;
    greeting(&mut session).await;
    // A throttled download over HTTP/2 (prior knowledge), under way at the upgrade.
    let size: u64 = 2 << 20;
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let response = h2.get(host.url(&format!("/download?size={size}&rate={}", 2 << 20))).send().await.unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);

    let next = upgrade(&host.admin, &[]).await.unwrap();
    reap.add(next);
    assert_eq!(KeepAlive::connect(&host.addr).await.host_pid().await.unwrap(), next);
    // Both go on, on the old host.
    echo(&mut session, Message::text("after the upgrade")).await;
    assert_eq!(read_download(response).await, size);
    echo(&mut session, Message::text("still the old host")).await;
    assert!(alive(host.pid()), "the old host left before its WebSocket ended");
    session.close(None).await.unwrap();
    assert_eq!(host.wait_exit(Duration::from_secs(20)), Some(0), "{}", host.log());
}

#[tokio::test]
async fn sigusr2_upgrades_to_the_binary_at_the_path_the_host_was_started_from() {
    // Started through a symlink, as an installer that switches versions leaves it: the
    // upgrade runs what the symlink names then, not the file it named at the start.
    let dir = temp_dir("host-upgrade-usr2");
    place_by_rename(&artifacts().example, &dir.join("app.so"));
    let link = dir.join("hotswap");
    std::os::unix::fs::symlink(&artifacts().hotswap, &link).unwrap();
    let mut command = std::process::Command::new(&link);
    command.args(["serve", "--listen", "127.0.0.1:0", "--plugin-dir"]).arg(&dir);
    let mut host = Host::start_command(command, Duration::from_secs(30)).unwrap_or_else(|log| panic!("{log}"));
    let reap = Reap::default();
    let mut client = KeepAlive::connect(&host.addr).await;
    assert_eq!(client.host_pid().await.unwrap(), host.pid());
    host.signal("USR2");
    assert_eq!(host.wait_exit(Duration::from_secs(30)), Some(0), "{}", host.log());
    let named = format!("starting the new binary binary={}", link.display());
    assert!(host.wait_for_log(&named, Duration::from_secs(5)), "{}", host.log());
    let next = client.host_pid().await.expect("the idle connection was lost");
    reap.add(next);
    assert_ne!(next, host.pid());
    assert!(alive(next));
}

#[tokio::test]
async fn canaries_that_come_and_go_over_one_file_leave_the_upgrade_the_current_build() {
    // One file, written over by each build (as `cp target/…/lib.so app.so` does): the host's
    // copy of the build it serves is all that is left of it.
    let dir = temp_dir("host-upgrade-canaries");
    let app = dir.join("app.so");
    place_by_rename(&example_version("1.0.0"), &app);
    let host = Host::serve(&["--plugin-dir", dir.to_str().unwrap(), "--canary", "10", "--canary-min-requests", "1000000"]);
    let reap = Reap::default();
    let builds = [example_version("2.0.0"), example_version("3.0.0")];
    for i in 0..6 {
        place_by_rename(&builds[i % 2], &app);
        let wanted = i + 1;
        let started = Instant::now();
        while host.log_count("canary started") < wanted {
            assert!(started.elapsed() < WAIT, "canary {wanted} did not start\n{}", host.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    reap.add(upgrade(&host.admin, &[]).await.unwrap_or_else(|e| panic!("{e}\n{}", host.log())));
    let mut greetings = std::collections::BTreeSet::new();
    for _ in 0..50 {
        greetings.insert(host.version().await);
    }
    assert!(greetings.contains("1.0.0"), "the new host does not serve the current build: {greetings:?}\n{}", host.log());
}

#[tokio::test]
async fn a_change_that_waits_out_an_upgrade_is_told_to_go_to_the_new_host() {
    // A build whose init takes 4 s: the new host takes that long to serve, and the old one
    // holds changes meanwhile.
    let dir = temp_dir("host-upgrade-held");
    place_by_rename(&hotswap_tests::init_fixture("slow"), &dir.join("app.so"));
    let host = Host::serve(&["--plugin-dir", dir.to_str().unwrap(), "--init-timeout", "20s"]);
    let reap = Reap::default();
    let admin = host.admin.clone();
    let upgrading = tokio::spawn(async move { upgrade(&admin, &[]).await });
    // Logged just before the old host holds changes (the new one then takes 4 s to serve).
    // Waited for without blocking the runtime, which runs the upgrade's task.
    let started = Instant::now();
    while !host.log().contains("upgrading the host: starting the new binary") {
        assert!(started.elapsed() < WAIT, "the upgrade did not start\n{}", host.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, answer) = host.admin_post("/reload").await;
    assert!(status.contains(" 409 "), "{status} {answer}\n{}", host.log());
    assert!(answer["error"].as_str().is_some_and(|e| e.contains("has handed over to a new one")), "{answer}");
    reap.add(upgrading.await.unwrap().unwrap_or_else(|e| panic!("{e}\n{}", host.log())));
}
