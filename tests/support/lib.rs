//! Shared machinery of the integration tests: building the real artifacts with cargo, and
//! running the real `hotswap` binary on an ephemeral loopback port.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a test waits for something the host should do soon (a swap, an unload, a log
/// line). Generous, because a loaded CI machine can be slow; free when it comes sooner. An
/// assertion about how fast something happens states its own bound.
pub const WAIT: Duration = Duration::from_secs(30);

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace().join("target"))
}

/// Where `cargo_build` puts what it builds: the dev profile's directory. `cargo test` has
/// already compiled every dependency in that profile, so the artifacts cost seconds; a release
/// build of them took about 4 of CI's 10 minutes. Nothing here measures speed (bench/run.sh
/// does, in release).
pub fn build_dir() -> PathBuf {
    target_dir().join("debug")
}

/// Runs `cargo build` (dev profile) for `packages` with extra environment; panics with cargo's
/// output on failure.
pub fn cargo_build(packages: &[&str], env: &[(&str, &str)]) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    // (RUSTC_BOOTSTRAP, when set to read libtest's unstable timings, would make cargo rebuild
    // everything.)
    cmd.current_dir(workspace()).args(["build", "--quiet"]).env_remove("RUSTC_BOOTSTRAP");
    for p in packages {
        cmd.args(["-p", p]);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("cannot run cargo");
    assert!(out.status.success(), "cargo build {packages:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// Paths of the artifacts every test uses, built once per test process.
pub struct Artifacts {
    pub hotswap: PathBuf,
    pub example: PathBuf,
    pub faulty: PathBuf,
    pub wrong_abi: PathBuf,
    pub tls: PathBuf,
    /// examples/axum-app.
    pub axum: PathBuf,
}

pub fn artifacts() -> &'static Artifacts {
    static BUILT: OnceLock<Artifacts> = OnceLock::new();
    BUILT.get_or_init(|| {
        let _lock = build_lock();
        // The benchmark's binaries too (its smoke run and the soak use them): one build of the
        // whole set keeps both cores busy, where builds one after another would not.
        let packages = ["hotswap", "example-handler", "example-axum", "fixture-faulty", "fixture-wrong-abi", "fixture-tls"];
        cargo_build(&[&packages[..], &["static-server", "hotswap-bench"]].concat(), &[]);
        let built = build_dir();
        // Private copies: hosts watch the file they serve, and other tests rebuild variants
        // of these crates in the build directory.
        let dir = private_dir(&target_dir().join("it-plugins"));
        let copy = |lib: &str| {
            let dest = dir.join(lib);
            copy_private(&built.join(lib), &dest);
            dest
        };
        Artifacts {
            hotswap: built.join("hotswap"),
            example: copy("libexample_handler.so"),
            faulty: copy("libfixture_faulty.so"),
            wrong_abi: copy("libfixture_wrong_abi.so"),
            tls: copy("libfixture_tls.so"),
            axum: copy("libexample_axum.so"),
        }
    })
}

/// Serialises the tests that load the machine on purpose (the benchmark smoke run, the soak),
/// so that at most one of them runs beside the timing-sensitive tests.
pub fn heavy_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serialises builds in this process (variants of one crate overwrite each other's output).
pub fn build_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Builds the example handler with `EXAMPLE_HANDLER_VERSION=version` and copies the library
/// to a stable path of its own (cached per version).
pub fn example_version(version: &str) -> PathBuf {
    variant("example-handler", "EXAMPLE_HANDLER_VERSION", version)
}

/// Builds `package` with `var=value` in the environment (read by `option_env!`) and moves
/// the library to a path of its own; cached per variant. (Tests serve private copies, made
/// by `artifacts` before any variant is built, so the default build is not put back: that
/// would cost a build per variant.)
pub fn variant(package: &str, var: &str, value: &str) -> PathBuf {
    static CACHE: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());
    let key = format!("{package}-{value}");
    let cached = || CACHE.lock().unwrap().iter().find(|(k, _)| *k == key).map(|(_, p)| p.clone());
    if let Some(p) = cached() {
        return p;
    }
    artifacts();
    let _lock = build_lock();
    if let Some(p) = cached() {
        return p; // built by another test while this one waited for the lock
    }
    cargo_build(&[package], &[(var, value)]);
    let dir = private_dir(&target_dir().join("it-plugins"));
    let lib = format!("lib{}.so", package.replace('-', "_"));
    let dest = dir.join(format!("{key}.so"));
    place_by_rename(&build_dir().join(&lib), &dest);
    CACHE.lock().unwrap().push((key, dest.clone()));
    dest
}

/// A copy of the init fixture (tests/fixtures/init) that misbehaves as `mode` says: built
/// once, the mode written into each copy (cached per mode).
pub fn init_fixture(mode: &str) -> PathBuf {
    const TAG: &[u8] = b"hotswap-fixture-init-mode:";
    static CACHE: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());
    let built = variant("fixture-init", "FIXTURE_INIT_BUILD", "once");
    // Held from the look-up to the insert: two tests asking for one mode write it once.
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = cache.iter().find(|(m, _)| m == mode) {
        return p.clone();
    }
    let mut bytes = std::fs::read(&built).unwrap();
    let found = bytes.windows(TAG.len()).position(|w| w == TAG).expect("the init fixture has no mode tag");
    let last = bytes.windows(TAG.len()).rposition(|w| w == TAG);
    assert_eq!(Some(found), last, "the mode tag appears more than once in the init fixture");
    let at = found + TAG.len();
    assert!(mode.len() < 64 - TAG.len(), "mode {mode:?} too long");
    bytes[at..at + mode.len()].copy_from_slice(mode.as_bytes());
    let dest = built.with_file_name(format!("fixture-init-mode-{mode}.so"));
    let staged = built.with_file_name(format!(".fixture-init-mode-{mode}.so.tmp"));
    std::fs::write(&staged, &bytes).unwrap();
    std::fs::rename(&staged, &dest).unwrap();
    cache.push((mode.to_owned(), dest.clone()));
    dest
}

/// A fresh directory under the target dir (left for inspection; cleaned by `cargo clean`).
pub fn temp_dir(name: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = target_dir().join("it-tmp").join(format!("{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    private_dir(&dir)
}

/// Creates `dir` (if needed) writable by its owner only, whatever the umask: the host
/// refuses plugins from a directory others may write.
pub fn private_dir(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir.to_path_buf()
}

/// Copies `src` to `dest` (in place, if `dest` exists), writable by its owner only.
pub fn copy_private(src: &Path, dest: &Path) {
    std::fs::copy(src, dest).unwrap();
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Puts `src` at `dest` atomically: copy to a hidden temporary name, then rename.
pub fn place_by_rename(src: &Path, dest: &Path) {
    let tmp = dest.with_file_name(format!(".{}.tmp", dest.file_name().unwrap().to_string_lossy()));
    copy_private(src, &tmp);
    std::fs::rename(&tmp, dest).unwrap();
}

/// Writes `src` over `dest` in place (same inode), as `cp` does.
/// Writes `bytes` to `dest` in place and leaves it open: the watcher waits for its writer to
/// close it (or for 300 ms without a change) before it loads it. Closed when dropped.
pub fn write_left_open(dest: &Path, bytes: &[u8]) -> std::fs::File {
    let mut file = std::fs::File::create(dest).unwrap();
    std::io::Write::write_all(&mut file, bytes).unwrap();
    file
}

pub fn place_by_cp(src: &Path, dest: &Path) {
    copy_private(src, dest);
}

/// The `version=` line of the example handler's greeting.
pub fn version_in(greeting: &str) -> Option<String> {
    greeting.lines().find_map(|l| l.strip_prefix("version=")).map(str::to_owned)
}

/// A running `hotswap` process; killed on drop if still running.
pub struct Host {
    child: Child,
    /// Where it listens: for cleartext HTTP, else for HTTPS.
    pub addr: String,
    /// Where it listens for HTTPS, if it does.
    pub https: Option<String>,
    log: Arc<Mutex<String>>,
    /// The admin API's socket: the path the test gave with `--admin /abs/path` (or
    /// HOTSWAP_ADMIN), else one of its own. A test that gives a TCP address or a relative path
    /// must not use `command`, `command_json` or `wait_in_flight`.
    pub admin: PathBuf,
}

/// What a `hotswap` admin command printed, and how it exited.
#[derive(Debug)]
pub struct CommandOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Host {
    /// Serves the plugin directory `dir`, with `extra` arguments.
    pub fn serve_dir(dir: &Path, extra: &[&str]) -> Host {
        let mut args = vec!["--plugin-dir", dir.to_str().unwrap()];
        args.extend_from_slice(extra);
        Host::serve(&args)
    }

    /// Starts `hotswap serve` on 127.0.0.1:0 with `args` added, and waits until it listens.
    pub fn serve(args: &[&str]) -> Host {
        Host::try_serve(args).unwrap_or_else(|log| panic!("hotswap did not start:\n{log}"))
    }

    /// Like `serve`, but returns the log if the process exits before listening.
    pub fn try_serve(args: &[&str]) -> Result<Host, String> {
        let mut full = vec!["serve", "--listen", "127.0.0.1:0"];
        full.extend_from_slice(args);
        Host::start(&full, None, &[], Duration::from_secs(30))
    }

    /// Runs `hotswap ARGS` (in `cwd`, if given) and waits up to `startup` until it listens;
    /// returns the log if it does not.
    pub fn start(args: &[&str], cwd: Option<&Path>, env: &[(&str, &Path)], startup: Duration) -> Result<Host, String> {
        let mut cmd = Command::new(&artifacts().hotswap);
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        if let Some(cwd) = cwd {
            cmd.current_dir(cwd);
        }
        cmd.args(args);
        Host::start_command(cmd, startup)
    }

    /// Runs `cmd`, which must end up as the `hotswap` process itself (a wrapper has to `exec`
    /// it), and waits up to `startup` until it listens; returns the log if it does not.
    pub fn start_command(mut cmd: Command, startup: Duration) -> Result<Host, String> {
        // Each host its own admin socket (the default path is one per user), unless the test
        // chose one (`--admin /path`, or HOTSWAP_ADMIN). Short, under /tmp: socket paths are
        // limited to 107 bytes.
        let flag = cmd.get_args().skip_while(|a| *a != "--admin").nth(1).filter(|v| Path::new(v).is_absolute());
        let env = cmd.get_envs().find(|(k, _)| *k == "HOTSWAP_ADMIN").and_then(|(_, v)| v);
        let admin = match flag.or(env) {
            Some(chosen) => PathBuf::from(chosen),
            None => {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let path = std::env::temp_dir().join(format!("hotswap-it-{}-{n}.sock", std::process::id()));
                cmd.env("HOTSWAP_ADMIN", &path);
                path
            }
        };
        let mut child = cmd
            .env("RUST_LOG", "info,hotswap=debug,plugin=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start hotswap");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // Into the log first: a test that has the address may look for this line.
                {
                    let mut log = sink.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
                if let Some(rest) = line.split("listening on ").nth(1).filter(|r| r.starts_with("http")) {
                    // `http://ADDR[, https://ADDR]`: text logs end the line there; JSON logs
                    // close a string.
                    let urls = rest.split(|c: char| c.is_whitespace() || c == '"').map(|u| u.trim_end_matches(','));
                    let (mut http, mut https) = (None, None);
                    for url in urls {
                        if let Some(addr) = url.strip_prefix("http://") {
                            http = Some(addr.to_owned());
                        } else if let Some(addr) = url.strip_prefix("https://") {
                            https = Some(addr.to_owned());
                        }
                    }
                    let _ = tx.send((http, https));
                }
            }
        });
        match rx.recv_timeout(startup) {
            Ok((http, https)) => {
                let addr = http.or_else(|| https.clone()).unwrap_or_default();
                Ok(Host { child, addr, https, log, admin })
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(100));
                Err(log.lock().unwrap().clone())
            }
        }
    }

    /// Runs `hotswap ARGS` (an admin command) against this host's admin socket.
    pub fn command(&self, args: &[&str]) -> CommandOutput {
        let out = Command::new(&artifacts().hotswap).args(args).env("HOTSWAP_ADMIN", &self.admin).output().unwrap();
        CommandOutput {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs an admin command with `--json` and parses what it printed.
    pub fn command_json(&self, args: &[&str]) -> (i32, serde_json::Value) {
        let mut full = args.to_vec();
        full.push("--json");
        let out = self.command(&full);
        let value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("hotswap {args:?} --json printed no JSON ({e}): {out:?}"));
        (out.code, value)
    }

    /// `http://ADDR/path`; `https://` on a host that serves HTTPS only (whose clients must
    /// then trust its certificate).
    pub fn url(&self, path: &str) -> String {
        let scheme = if self.https.as_deref() == Some(self.addr.as_str()) { "https" } else { "http" };
        format!("{scheme}://{}{}", self.addr, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process has logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits (bounded) until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Resident set size in bytes.
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// Distinct plugin shadow copies mapped into the process.
    pub fn mapped_plugins(&self) -> Vec<String> {
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", self.pid())).unwrap_or_default();
        let mut libs: Vec<String> = maps
            .lines()
            .filter_map(|l| l.split_whitespace().nth(5).map(str::to_owned))
            .filter(|p| p.contains("/hotswap-") && p.contains(".so"))
            .collect();
        libs.sort();
        libs.dedup();
        libs
    }

    /// Open file descriptors of the process.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).expect("hotswap is not running").count()
    }

    /// Waits (bounded, without blocking the runtime: the test's own connections must be able
    /// to close) until the process maps exactly `n` plugin libraries; returns what it maps then.
    pub async fn wait_mapped(&self, n: usize, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let mapped = self.mapped_plugins();
            if mapped.len() == n || Instant::now() > deadline {
                return mapped;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (bounded by [`WAIT`]) until the admin API counts `n` requests in flight, over
    /// all resident generations.
    pub async fn wait_in_flight(&self, n: u64) {
        let deadline = Instant::now() + WAIT;
        loop {
            let (_, status) = self.command_json(&["status"]);
            let resident = status["resident"].as_array().cloned().unwrap_or_default();
            if resident.iter().filter_map(|g| g["in_flight"].as_u64()).sum::<u64>() == n {
                return;
            }
            assert!(Instant::now() < deadline, "never {n} requests in flight: {status}\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (bounded by [`WAIT`]) until `GET /` answers `version`.
    pub async fn wait_version(&self, version: &str) {
        let deadline = Instant::now() + WAIT;
        while self.version().await != version {
            assert!(Instant::now() < deadline, "{version} not served within {WAIT:?}:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The scrape of `GET /metrics`, over the host's admin socket.
    pub async fn metrics(&self) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut socket = tokio::net::UnixStream::connect(&self.admin).await.unwrap();
        socket.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut answer = String::new();
        socket.read_to_string(&mut answer).await.unwrap();
        answer
    }

    /// `POST path` to the admin socket, without starting a CLI process (for races that a
    /// process start would lose): the status line and the JSON answer.
    pub async fn admin_post(&self, path: &str) -> (String, serde_json::Value) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut socket = tokio::net::UnixStream::connect(&self.admin).await.unwrap();
        let request = format!("POST {path} HTTP/1.1\r\nHost: localhost\r\nX-Hotswap-Admin: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        socket.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(WAIT, socket.read_to_string(&mut answer)).await.expect("no answer").unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
        let status = head.lines().next().unwrap_or_default().to_owned();
        (status, serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}")))
    }

    /// The address `http://…` of the admin API when the host was given a TCP one.
    pub fn admin_url(&self) -> String {
        let log = self.log();
        let at = log.split("admin API on ").nth(1).and_then(|r| r.split_whitespace().next());
        at.expect("no admin address logged").to_owned()
    }

    /// The version `GET /` answers with (the example handler's `version=` line), or the whole
    /// answer if it names none; asked on a new connection.
    pub async fn version(&self) -> String {
        self.version_via(&reqwest::Client::new()).await
    }

    /// Like [`Host::version`], asked through `client` (whose kept-alive connections it reuses).
    pub async fn version_via(&self, client: &reqwest::Client) -> String {
        let text = client.get(self.url("/")).send().await.unwrap().text().await.unwrap();
        version_in(&text).unwrap_or(text)
    }

    /// How many log lines contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log.lock().unwrap().matches(needle).count()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([&format!("-{sig}"), &self.pid().to_string()]).status().unwrap();
        assert!(ok.success());
    }

    /// Waits (bounded) for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.admin);
    }
}

/// Byte `i` of the example handler's download pattern is `i mod 256`: checks `chunk`, which
/// starts at offset `at`.
pub fn is_pattern(chunk: &[u8], at: u64) -> bool {
    chunk.iter().enumerate().all(|(i, b)| *b == ((at + i as u64) % 256) as u8)
}

/// Reads a `/download` response to its end, checking each byte against the pattern; returns
/// how many came. Panics if the response breaks off, or a byte is wrong.
pub async fn read_download(mut response: reqwest::Response) -> u64 {
    let mut at = 0u64;
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                assert!(is_pattern(&chunk, at), "wrong bytes at {at}");
                at += chunk.len() as u64;
            }
            Ok(None) => return at,
            Err(e) => panic!("the download was cut at byte {at}: {}", chain(&e)),
        }
    }
}

/// An error with its causes, `: `-separated (reqwest's own message rarely says what broke).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text += &format!(": {c}");
        cause = c.source();
    }
    text
}

/// A series' value in a scrape of `GET /metrics`, 0 if it is not there.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
}

/// Parses the UTC timestamp that starts a log line (`2026-11-24T15:56:34.659029Z`).
pub fn log_time(line: &str) -> Option<std::time::SystemTime> {
    let ts = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min) = (t.next()?.parse::<u64>().ok()?, t.next()?.parse::<u64>().ok()?);
    let secs: f64 = t.next()?.parse().ok()?;
    // Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146_097 + doe - 719_468) as u64;
    let nanos = ((days * 86_400 + h * 3600 + min * 60) as f64 + secs) * 1e9;
    Some(std::time::UNIX_EPOCH + Duration::from_nanos(nanos as u64))
}
