//! The admin API against callers other than the operator: web pages in the operator's browser
//! (cross-site POSTs, DNS rebinding), other users (the token file), and clients that connect
//! and send nothing.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use hotswap_tests::{artifacts, example_version, place_by_rename, temp_dir, Host};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Writes a token file of mode `mode`.
fn token_file(dir: &Path, token: &str, mode: u32) -> String {
    let path = dir.join("admin.token");
    std::fs::write(&path, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Sends `head` (the request line and headers, without the blank line) and `body` as they are
/// on a new connection to `addr`; returns the status and the body as JSON.
async fn raw(addr: &str, head: &str, body: &str) -> (u16, Value) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("{head}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let status = answer.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status in {answer:?}"));
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}")))
}

/// The version that serves, according to the admin API (asked the way a script would).
async fn serving(addr: &str) -> String {
    let (status, body) = raw(addr, &format!("GET /status HTTP/1.1\r\nHost: {addr}"), "").await;
    assert_eq!(status, 200, "{body}");
    body["current"]["version"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_web_page_can_neither_change_nor_read_the_admin_api_on_loopback() {
    let (v1, v2) = (example_version("1.0.0"), example_version("2.0.0"));
    let dir = temp_dir("admin-web");
    place_by_rename(&v1, &dir.join("app.so"));
    let host = Host::serve_dir(&dir, &["--admin", "127.0.0.1:0"]);
    let url = host.admin_url();
    let addr = url.trim_start_matches("http://").to_owned();
    place_by_rename(&v2, &dir.join("app.so"));
    host.wait_version("2.0.0").await;
    let (_, before) = raw(&addr, &format!("GET /status HTTP/1.1\r\nHost: {addr}"), "").await;

    // What a page on another site can send without a preflight: a form, or `fetch` in no-cors
    // mode with a text body. Each is refused, says what to send, and changes nothing.
    let origin = "Origin: https://evil.example";
    let simple = [
        ("POST /rollback", "Content-Type: application/x-www-form-urlencoded", "a=b"),
        ("POST /reload", "Content-Type: text/plain", ""),
        ("POST /pin", "Content-Type: text/plain;charset=UTF-8", r#"{"version":"1.0.0"}"#),
        ("POST /rollback", "Content-Type: multipart/form-data; boundary=x", "--x--"),
        ("POST /rollback", "Accept: */*", ""),
    ];
    for (line, content_type, body) in simple {
        let head = format!("{line} HTTP/1.1\r\nHost: {addr}\r\n{origin}\r\n{content_type}");
        let (status, answer) = raw(&addr, &head, body).await;
        assert_eq!(status, 403, "{line} {content_type}: {answer}");
        let message = answer["error"].as_str().unwrap();
        assert!(message.contains("Content-Type: application/json") && message.contains("X-Hotswap-Admin: 1"), "{message}");
    }
    assert_eq!(serving(&addr).await, "2.0.0");
    assert_eq!(host.version().await, "2.0.0");
    let (_, after) = raw(&addr, &format!("GET /status HTTP/1.1\r\nHost: {addr}"), "").await;
    assert!(after["pin"].is_null(), "{after}");
    assert_eq!(after["current"]["generation"], before["current"]["generation"], "{after}");

    // A script that says it means it: the header, or a JSON body.
    let (status, answer) = raw(&addr, &format!("POST /rollback HTTP/1.1\r\nHost: {addr}\r\nX-Hotswap-Admin: 1"), "").await;
    assert_eq!((status, answer["outcome"].as_str()), (200, Some("swapped")), "{answer}");
    assert_eq!(host.version().await, "1.0.0");
    let json = "POST /pin HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json";
    let (status, answer) = raw(&addr, json, r#"{"version":"2.0.0"}"#).await;
    assert_eq!((status, answer["outcome"].as_str()), (200, Some("swapped")), "{answer}");
    assert_eq!(host.version().await, "2.0.0");
    // A share that rounds to none would start a canary that never gets a request.
    let canary = "POST /canary HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json";
    let (status, answer) = raw(&addr, canary, r#"{"version":"1.0.0","percent":0.004}"#).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("at least 0.01"), "{answer}");

    // The CLI over TCP sends what it must, for every change.
    for (command, version) in [("unpin", "2.0.0"), ("rollback", "1.0.0"), ("unpin", "2.0.0"), ("reload", "2.0.0")] {
        let out = host.command(&[command, "--admin", &addr]);
        assert_eq!(out.code, 0, "{command}: {out:?}");
        assert_eq!(host.version().await, version, "after {command}");
    }

    // DNS rebinding: a page of evil.example whose name now points at 127.0.0.1 reaches the
    // listener as its own origin, but its requests still name evil.example.
    let with_port = format!("evil.example:{}", addr.rsplit(':').next().unwrap());
    for host_header in ["evil.example", with_port.as_str(), "127.0.0.1.evil.example"] {
        let (status, answer) = raw(&addr, &format!("GET /status HTTP/1.1\r\nHost: {host_header}"), "").await;
        assert_eq!(status, 403, "{host_header}: {answer}");
        let message = answer["error"].as_str().unwrap();
        assert!(message.contains(&format!("the Host header `{host_header}`")), "{message}");
        assert!(answer.get("current").is_none(), "{answer}");
    }
    let (status, _) = raw(&addr, "GET /metrics HTTP/1.1\r\nHost: evil.example", "").await;
    assert_eq!(status, 403);
    for loopback in ["localhost", "127.0.0.1", "[::1]:9090", addr.as_str()] {
        let (status, answer) = raw(&addr, &format!("GET /status HTTP/1.1\r\nHost: {loopback}"), "").await;
        assert_eq!(status, 200, "{loopback}: {answer}");
    }
    assert_eq!(host.command(&["status", "--admin", &addr]).code, 0);
}

#[tokio::test]
async fn with_a_token_any_host_name_is_served() {
    // Used from another machine, through a name: the token is the protection.
    let dir = temp_dir("admin-token-host");
    let token = token_file(&dir, "t0ken", 0o600);
    let host = Host::serve(&["--plugin", artifacts().example.to_str().unwrap(), "--admin", "127.0.0.1:0", "--admin-token-file", &token]);
    let addr = host.admin_url().trim_start_matches("http://").to_owned();
    let (status, answer) = raw(&addr, "GET /status HTTP/1.1\r\nHost: admin.internal.example:9090\r\nAuthorization: Bearer t0ken", "").await;
    assert_eq!(status, 200, "{answer}");
    let (status, _) = raw(&addr, "GET /status HTTP/1.1\r\nHost: admin.internal.example:9090", "").await;
    assert_eq!(status, 401);
    // Changes still need the header (a page could guess no token, but scripts are told once).
    let (status, answer) = raw(&addr, "POST /reload HTTP/1.1\r\nHost: admin.internal.example\r\nAuthorization: Bearer t0ken", "").await;
    assert_eq!(status, 403, "{answer}");
    let (status, answer) =
        raw(&addr, "POST /reload HTTP/1.1\r\nHost: admin.internal.example\r\nAuthorization: Bearer t0ken\r\nX-Hotswap-Admin: 1", "").await;
    assert_eq!((status, answer["outcome"].as_str()), (200, Some("unchanged")), "{answer}");
}

#[tokio::test]
async fn a_token_file_others_may_read_or_that_another_user_owns_refuses_the_start() {
    let plugin = artifacts().example.to_str().unwrap();
    let dir = temp_dir("admin-token-mode");
    for (mode, who) in [(0o644, "its group and others"), (0o640, "its group"), (0o602, "others")] {
        let token = token_file(&dir, "s3cret", mode);
        let log = Host::try_serve(&["--plugin", plugin, "--admin", "127.0.0.1:0", "--admin-token-file", &token])
            .err()
            .unwrap_or_else(|| panic!("served with a token file of mode {mode:o}"));
        let expected = format!("the admin token file {token} is readable or writable by {who} (mode {mode:04o})");
        assert!(log.contains(&expected), "{expected:?} not in:\n{log}");
        assert!(log.contains(&format!("run `chmod 600 {token}`")), "{log}");
    }
    // Private, it serves (0400 too).
    for mode in [0o600, 0o400] {
        let token = token_file(&dir, "s3cret", mode);
        let host = Host::serve(&["--plugin", plugin, "--admin", "127.0.0.1:0", "--admin-token-file", &token]);
        let addr = host.admin_url().trim_start_matches("http://").to_owned();
        assert_eq!(host.command(&["status", "--admin", &addr, "--admin-token-file", &token]).code, 0);
    }

    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped the owner check: giving a file to another user takes root");
        return;
    }
    let token = token_file(&dir, "s3cret", 0o600);
    std::os::unix::fs::chown(&token, Some(65534), None).unwrap();
    let log = Host::try_serve(&["--plugin", plugin, "--admin", "127.0.0.1:0", "--admin-token-file", &token])
        .err()
        .expect("served with another user's token file");
    assert!(log.contains(&format!("the admin token file {token} belongs to uid 65534")), "{log}");
    assert!(log.contains(&format!("run `chown 0 {token}` and `chmod 600 {token}`")), "{log}");
}

/// How long the CLI may take to answer while idle connections are open: well under the 10 s
/// the host gives a client to send its request head, after which idle ones are closed anyway.
const PROMPT: Duration = Duration::from_secs(4);

#[tokio::test]
async fn idle_connections_do_not_lock_the_operator_out() {
    let plugin = artifacts().example.to_str().unwrap();

    // On the default transport, the Unix socket.
    let host = Host::serve(&["--plugin", plugin]);
    let mut idle = Vec::new();
    for _ in 0..24 {
        idle.push(tokio::net::UnixStream::connect(&host.admin).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await; // all accepted
    let started = Instant::now();
    let out = host.command(&["status"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(started.elapsed() < PROMPT, "`hotswap status` took {:?} beside idle connections", started.elapsed());
    drop(idle);

    // On TCP, with a token: anyone may connect, only the operator gets an answer.
    let dir = temp_dir("admin-idle");
    let token = token_file(&dir, "s3cret", 0o600);
    let host = Host::serve(&["--plugin", plugin, "--admin", "127.0.0.1:0", "--admin-token-file", &token]);
    let addr = host.admin_url().trim_start_matches("http://").to_owned();
    let mut idle = Vec::new();
    for _ in 0..24 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for command in ["status", "reload"] {
        let started = Instant::now();
        let out = host.command(&[command, "--admin", &addr, "--admin-token-file", &token]);
        assert_eq!(out.code, 0, "{command}: {out:?}");
        assert!(started.elapsed() < PROMPT, "`hotswap {command}` took {:?} beside idle connections", started.elapsed());
    }
    // 24 idle connections: the 8 beyond 16 were closed at once, then one for the first
    // command (whose place the second took), all without an answer; the others still wait.
    let mut closed = 0;
    for stream in &mut idle {
        let mut buf = [0u8; 64];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(50), stream.read(&mut buf)).await {
            assert_eq!(n, 0, "an idle connection got {:?}", String::from_utf8_lossy(&buf[..n]));
            closed += 1;
        }
    }
    assert!((9..24).contains(&closed), "{closed} of 24 idle connections closed");
}

#[test]
fn admin_off_serves_no_admin_api() {
    let dir = temp_dir("admin-off");
    let socket = dir.join("admin.sock");
    // The default socket of this test's host would be `socket`: with `off`, nothing is there.
    let mut cmd = std::process::Command::new(&artifacts().hotswap);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--plugin", artifacts().example.to_str().unwrap(), "--admin", "off"]);
    cmd.env("HOTSWAP_ADMIN", &socket);
    let host = Host::start_command(cmd, Duration::from_secs(30)).unwrap_or_else(|log| panic!("{log}"));
    assert!(!host.log().contains("admin API on"), "{}", host.log());
    assert!(!socket.exists(), "an admin socket was made");
    let out = host.command(&["status", "--admin", socket.to_str().unwrap()]);
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("cannot reach the admin API"), "{out:?}");
}
