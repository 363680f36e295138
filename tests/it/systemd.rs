//! systemd integration: readiness notification (`Type=notify`) and socket activation.

use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use hotswap_tests::{artifacts, temp_dir, Host};

/// The next notification on `socket`, as text.
fn next_notification(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf).expect("no notification within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// `GET /health` on a connection of its own; the whole response.
fn health(addr: impl std::net::ToSocketAddrs) -> String {
    use std::io::{Read as _, Write as _};
    let mut probe = std::net::TcpStream::connect(addr).unwrap();
    probe.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    probe.read_to_string(&mut response).unwrap();
    response
}

/// A host serving the example handler, with a notification socket of its own (as systemd
/// gives a `Type=notify` service).
fn notifying_host(name: &str) -> (UnixDatagram, Host) {
    let socket_path = temp_dir(name).join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut cmd = Command::new(&artifacts().hotswap);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--plugin"]).arg(&artifacts().example).env("NOTIFY_SOCKET", &socket_path);
    let host = Host::start_command(cmd, Duration::from_secs(30)).unwrap_or_else(|log| panic!("{log}"));
    (socket, host)
}

#[test]
fn tells_systemd_when_it_is_ready_and_when_it_stops() {
    let (socket, mut host) = notifying_host("notify");

    // READY=1 once it serves: by then a request is answered.
    assert!(next_notification(&socket).lines().any(|l| l == "READY=1"));
    let response = health(&host.addr);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    host.signal("TERM");
    assert!(next_notification(&socket).lines().any(|l| l == "STOPPING=1"));
    assert_eq!(host.wait_exit(Duration::from_secs(20)), Some(0));
}

#[test]
fn after_an_upgrade_the_new_process_tells_systemd_it_is_the_main_one() {
    let (socket, mut host) = notifying_host("notify-upgrade");
    assert!(next_notification(&socket).lines().any(|l| l == "READY=1"));

    let (code, upgrade) = host.command_json(&["upgrade"]);
    assert_eq!(code, 0, "{upgrade}\n{}", host.log());
    let new_pid = upgrade["to_pid"].as_u64().unwrap();
    // The old process names the new one as the main process; the new one says so too, and
    // that it is ready (the unit's NotifyAccess=all lets systemd take this from it).
    let notifications = [next_notification(&socket), next_notification(&socket)].join("\n");
    assert!(notifications.lines().any(|l| l == format!("MAINPID={new_pid}")), "{notifications}");
    assert!(notifications.lines().any(|l| l == "READY=1"), "{notifications}");
    assert_eq!(host.wait_exit(Duration::from_secs(20)), Some(0), "{}", host.log());
    // The old process drained quietly: STOPPING=1 is the new one's to send, at its own stop.
    socket.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut buf = [0u8; 512];
    assert!(socket.recv(&mut buf).is_err(), "the old process sent {:?}", String::from_utf8_lossy(&buf));
    let _ = Command::new("kill").args(["-TERM", &new_pid.to_string()]).status();
    socket.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    assert!(next_notification(&socket).lines().any(|l| l == "STOPPING=1"));
    let unit = std::fs::read_to_string(hotswap_tests::workspace().join("deploy/systemd/hotswap.service")).unwrap();
    assert_eq!(setting(&unit, "NotifyAccess"), "all");
}

/// `hotswap ARGS` started as systemd starts a socket-activated service: `sockets` (at most
/// two, with their names) passed as fds 3 and 4, with LISTEN_FDS, LISTEN_FDNAMES and
/// LISTEN_PID naming the process.
pub(crate) fn socket_activated(sockets: &[(&TcpListener, &str)], args: &[&str]) -> Command {
    assert!(sockets.len() <= 2);
    let mut fds = [-1; 2];
    for (slot, (listener, _)) in fds.iter_mut().zip(sockets) {
        *slot = listener.as_raw_fd();
    }
    let count = sockets.len();
    let names: Vec<&str> = sockets.iter().map(|(_, name)| *name).collect();
    let mut cmd = Command::new("sh");
    // $$ is the shell's pid, which `exec` hands to hotswap.
    cmd.args(["-c", &format!(r#"LISTEN_PID=$$ LISTEN_FDS={count} exec "$0" "$@""#)])
        .env("LISTEN_FDNAMES", names.join(":"))
        .arg(&artifacts().hotswap)
        .args(args);
    // SAFETY: only async-signal-safe calls between fork and exec, on a fixed array. Each
    // socket is first copied above the targets (so that one already at 3 or 4 is not
    // overwritten), then onto 3, 4: dup2 clears close-on-exec on the copy.
    unsafe {
        cmd.pre_exec(move || {
            let mut high = [-1; 2];
            for i in 0..count {
                high[i] = libc::fcntl(fds[i], libc::F_DUPFD, 10);
                if high[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, fd) in high.iter().enumerate().take(count) {
                if libc::dup2(*fd, 3 + i as i32) != 3 + i as i32 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}

#[test]
fn serves_on_a_socket_passed_by_socket_activation() {
    // What systemd does for hotswap.socket: bind, then pass the socket as fd 3.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // --listen names a port that is never bound: the passed socket wins.
    let plugin = artifacts().example.to_str().unwrap();
    let cmd = socket_activated(&[(&listener, "hotswap.socket")], &["serve", "--listen", "127.0.0.1:1", "--plugin", plugin]);
    let host = Host::start_command(cmd, Duration::from_secs(30)).unwrap_or_else(|log| panic!("{log}"));
    assert_eq!(host.addr, addr.to_string(), "it did not serve on the passed socket:\n{}", host.log());
    assert!(host.log().contains("using a listening socket passed by the service manager"), "{}", host.log());
    drop(listener); // the host holds its own copy
    let response = health(addr);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}

#[test]
fn sockets_it_cannot_serve_stop_the_start_with_the_reason() {
    let plugin = artifacts().example.to_str().unwrap();
    let (a, b) = (TcpListener::bind("127.0.0.1:0").unwrap(), TcpListener::bind("127.0.0.1:0").unwrap());
    let args = ["serve", "--listen", "127.0.0.1:1", "--plugin", plugin];
    for (sockets, reason) in [
        (vec![(&a, "hotswap.socket"), (&b, "hotswap.socket")], "one, and a second named `https`"),
        (vec![(&a, "hotswap.socket"), (&b, "https")], "a socket named `https`, and no certificate is given"),
        (vec![(&b, "https")], "a socket named `https`, and no certificate is given"),
    ] {
        let out = socket_activated(&sockets, &args).output().unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && said.contains(reason), "{said}");
    }
}

/// A systemd time span as the files in deploy/ write them: `45`, `45s`, `1min 30s`, `500ms`.
fn time_span(text: &str) -> Duration {
    let mut total = Duration::ZERO;
    for part in text.split_whitespace() {
        let digits = part.find(|c: char| !c.is_ascii_digit()).unwrap_or(part.len());
        let n: u64 = part[..digits].parse().unwrap_or_else(|_| panic!("not a time span: {text:?}"));
        total += match &part[digits..] {
            "" | "s" | "sec" => Duration::from_secs(n),
            "ms" | "msec" => Duration::from_millis(n),
            "m" | "min" => Duration::from_secs(60 * n),
            unit => panic!("unit {unit:?} of {text:?}: add it to this test"),
        };
    }
    total
}

/// The value of the first line `key = value` (or `key=value`) of `text`.
fn setting<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().trim_matches('"'))
        .unwrap_or_else(|| panic!("no {key} in:\n{text}"))
}

#[test]
fn the_shipped_unit_waits_for_a_clean_stop_before_sigkill() {
    // After SIGTERM the host drains for up to drain_timeout, aborts what is left and waits up
    // to 2s for it, then waits up to 15s for the generations to unload (their shutdown hooks
    // included): host/src/cmd/lifecycle.rs. systemd must not SIGKILL it before that.
    const ABORT: Duration = Duration::from_secs(2);
    const UNLOAD: Duration = Duration::from_secs(15);
    const MARGIN: Duration = Duration::from_secs(5);
    let deploy = hotswap_tests::workspace().join("deploy");
    let unit = std::fs::read_to_string(deploy.join("systemd/hotswap.service")).unwrap();
    let config = std::fs::read_to_string(deploy.join("hotswap.toml")).unwrap();
    let exec = setting(&unit, "ExecStart");
    assert!(exec.contains("--config /etc/hotswap/hotswap.toml"), "the unit no longer runs deploy/hotswap.toml: {exec}");
    let stop = time_span(setting(&unit, "TimeoutStopSec"));
    let drain = time_span(setting(&config, "drain_timeout"));
    let needed = drain + ABORT + UNLOAD + MARGIN;
    assert!(
        stop >= needed,
        "TimeoutStopSec={stop:?}, but a clean stop may take {:?} (drain {drain:?}, abort {ABORT:?}, unload {UNLOAD:?}), \
         and a margin of {MARGIN:?}",
        needed - MARGIN
    );
}
