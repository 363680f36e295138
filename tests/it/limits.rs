//! HTTP limits: slow and idle clients are cut off, oversized heads and bodies are refused,
//! excess connections wait, and a client that vanishes frees its generation.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use hotswap_tests::{artifacts, example_version, place_by_rename, temp_dir, Host, WAIT};

const MIB: u64 = 1024 * 1024;

fn example(extra: &[&str]) -> Host {
    let mut args = vec!["--plugin", artifacts().example.to_str().unwrap()];
    args.extend_from_slice(extra);
    Host::serve(&args)
}

fn connect(host: &Host) -> TcpStream {
    let stream = TcpStream::connect(&host.addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream
}

/// Reads until the server closes the connection; returns what arrived and how long it took.
fn read_to_close(stream: &mut TcpStream) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the server did not close the connection: {e}"),
        }
    }
    (all, started.elapsed())
}

/// Reads a response head.
fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).expect("no response"), 1, "closed before a response: {head:?}");
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Sends one keep-alive GET and reads its (small) response.
fn get_keep_alive(stream: &mut TcpStream, path: &str) -> String {
    write!(stream, "GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut buf = vec![0u8; 4096];
    let n = stream.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn a_slowloris_client_is_cut_off_and_its_resources_freed() {
    let host = example(&["--header-read-timeout", "1s"]);
    assert!(get_keep_alive(&mut connect(&host), "/").starts_with("HTTP/1.1 200"));
    std::thread::sleep(Duration::from_millis(200));
    let baseline = host.fds();

    // Sends its head a byte every 200 ms: it would take 8 s.
    let mut slow = connect(&host);
    let started = Instant::now();
    let mut cut = false;
    for byte in b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: aaaaaaaa\r\n\r\n" {
        if slow.write_all(&[*byte]).is_err() {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        let mut probe = [0u8; 64];
        slow.set_nonblocking(true).unwrap();
        let read = slow.read(&mut probe);
        slow.set_nonblocking(false).unwrap();
        if matches!(read, Ok(0)) || read.as_ref().is_err_and(|e| e.kind() != ErrorKind::WouldBlock) {
            cut = true;
            break;
        }
    }
    assert!(cut, "a client sending its head a byte at a time was never cut off");
    assert!(started.elapsed() < Duration::from_secs(4), "cut off only after {:?}", started.elapsed());

    // One that connects and sends nothing is cut off too.
    let (_, waited) = read_to_close(&mut connect(&host));
    assert!(waited < Duration::from_secs(4), "a silent connection stayed open {waited:?}");

    // Their sockets are closed on the server's side.
    std::thread::sleep(Duration::from_millis(300));
    assert!(host.fds() <= baseline, "fds: {} before, {} after", baseline, host.fds());
    // A normal client is still served.
    let answer = get_keep_alive(&mut connect(&host), "/");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[test]
fn an_idle_keep_alive_connection_is_closed_but_a_long_download_is_not() {
    let host = example(&["--idle-timeout", "1s"]);
    let mut idle = connect(&host);
    assert!(get_keep_alive(&mut idle, "/").starts_with("HTTP/1.1 200"));
    let (rest, waited) = read_to_close(&mut idle);
    assert!(rest.is_empty());
    assert!(waited < Duration::from_secs(4), "idle connection stayed open {waited:?}");
    assert!(waited >= Duration::from_millis(500), "closed after only {waited:?}");
    assert!(host.wait_for_log("idle for the idle timeout", WAIT), "{}", host.log());

    // A response in progress is not idle: 3 MiB at 1 MiB/s takes 3 s.
    let mut busy = connect(&host);
    write!(busy, "GET /download?size={}&rate={} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", 3 * MIB, MIB).unwrap();
    let (response, took) = read_to_close(&mut busy);
    assert!(took >= Duration::from_secs(2), "download ended after {took:?}");
    assert_eq!(body_len(&response), 3 * MIB, "a throttled download was cut short");

    // Nor is one whose body the plugin has finished but the client is still reading: 32 MiB
    // unthrottled lands in socket buffers long before a client reading 64 KiB every 20 ms
    // (about 3 MiB/s) has it all.
    let mut slow_reader = connect(&host);
    write!(slow_reader, "GET /download?size={} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", 32 * MIB).unwrap();
    let mut response = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match slow_reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(&buf[..n]),
            Err(e) => panic!("the slow reader's download broke: {e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(body_len(&response), 32 * MIB, "a response still being written was cut off as idle");
}

/// The length of the body of a complete `Connection: close` response.
fn body_len(response: &[u8]) -> u64 {
    let head_end = response.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head") + 4;
    (response.len() - head_end) as u64
}

#[tokio::test]
async fn oversized_heads_get_431_and_oversized_bodies_413() {
    let host = example(&["--max-header-size", "8KiB", "--max-body-size", "1MiB"]);
    let client = reqwest::Client::new();

    let big_header = "x".repeat(16 * 1024);
    let response = client.get(host.url("/")).header("x-big", &big_header).send().await.unwrap();
    assert_eq!(response.status(), 431);
    let response = client.get(host.url("/")).header("x-small", "x".repeat(1024)).send().await.unwrap();
    assert_eq!(response.status(), 200);

    // Declared too large: refused before the plugin sees a byte (none is sent).
    let mut declared = connect(&host);
    write!(declared, "POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n", 2 * MIB).unwrap();
    let response = read_head(&mut declared);
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");

    // Streamed (chunked, no length): cut off where it crosses the limit, one byte over.
    let mut streamed = connect(&host);
    write!(streamed, "POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
    let chunk = vec![7u8; 64 * 1024];
    for _ in 0..16 {
        write!(streamed, "{:x}\r\n", chunk.len()).unwrap();
        streamed.write_all(&chunk).unwrap();
        streamed.write_all(b"\r\n").unwrap();
    }
    streamed.write_all(b"1\r\nx\r\n0\r\n\r\n").unwrap();
    let response = read_head(&mut streamed);
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(host.wait_for_log("request body grew too large", WAIT), "{}", host.log());

    // Exactly at the limit: served.
    let response = client.post(host.url("/upload")).body(vec![7u8; MIB as usize]).send().await.unwrap();
    assert_eq!(response.status(), 200);
}

#[test]
fn excess_connections_wait_in_the_backlog_and_none_is_reset() {
    let host = example(&["--max-connections", "2"]);
    let mut first = connect(&host);
    let mut second = connect(&host);
    assert!(get_keep_alive(&mut first, "/").starts_with("HTTP/1.1 200"));
    assert!(get_keep_alive(&mut second, "/").starts_with("HTTP/1.1 200"));

    // The third connects (the kernel's backlog) but is not served while both are open.
    let mut third = connect(&host);
    write!(third, "GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    third.set_read_timeout(Some(Duration::from_millis(700))).unwrap();
    let mut buf = [0u8; 4096];
    match third.read(&mut buf) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("a third connection was served or reset beyond --max-connections 2: {other:?}"),
    }
    // One closes: the third is served, on the connection it opened.
    drop(first);
    third.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let n = third.read(&mut buf).expect("the waiting connection was reset");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    assert!(get_keep_alive(&mut second, "/").starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn a_client_that_vanishes_mid_download_or_mid_upload_frees_its_generation() {
    let (v1, v2, v3) = (example_version("1.0.0"), example_version("2.0.0"), example_version("3.0.0"));
    let dir = temp_dir("vanish");
    place_by_rename(&v1, &dir.join("app.so"));
    // The drain timeout is far away: only the disconnect can free the old generation.
    let host = Host::serve(&["--plugin-dir", dir.to_str().unwrap(), "--drain-timeout", "120s"]);

    // A download on v1 (64 MiB at 1 MiB/s), abandoned after v2 arrives.
    let download = reqwest::get(host.url(&format!("/download?size={}&rate={}", 64 * MIB, MIB))).await.unwrap();
    place_by_rename(&v2, &dir.join("app.so"));
    assert!(host.wait_for_log("new requests go to generation 2", WAIT), "{}", host.log());
    assert_eq!(host.mapped_plugins().len(), 2, "v1 should still be streaming");
    drop(download);
    let mapped = host.wait_mapped(1, WAIT).await;
    assert_eq!(mapped.len(), 1, "v1 stayed mapped after its client vanished: {mapped:?}\n{}", host.log());

    // An upload on v2 that stalls, then its client vanishes after v3 arrives.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(1);
    let body = reqwest::Body::wrap_stream(tokio_stream_from(rx));
    let upload = tokio::spawn(reqwest::Client::new().post(host.url("/upload")).body(body).send());
    tx.send(Ok(bytes::Bytes::from(vec![1u8; 64 * 1024]))).await.unwrap();
    host.wait_in_flight(1).await;
    place_by_rename(&v3, &dir.join("app.so"));
    assert!(host.wait_for_log("new requests go to generation 3", WAIT), "{}", host.log());
    assert_eq!(host.mapped_plugins().len(), 2, "v2 should still be receiving the upload");
    upload.abort();
    drop(tx);
    let mapped = host.wait_mapped(1, WAIT).await;
    assert_eq!(mapped.len(), 1, "v2 stayed mapped after its uploading client vanished: {mapped:?}\n{}", host.log());
}

fn tokio_stream_from<T: Send + 'static>(rx: tokio::sync::mpsc::Receiver<T>) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) })
}
