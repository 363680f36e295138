//! HTTP limits: slow and idle clients are cut off (slow heads, HTTP/2 header blocks and
//! PINGs, trickling request bodies, clients that stop reading), oversized heads and bodies are refused, excess
//! connections wait, a client that vanishes frees its generation, and a handler that does
//! not answer in time gets a 504.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use hotswap_tests::{artifacts, chain, example_version, place_by_rename, temp_dir, Host, WAIT};

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

/// How many PING acknowledgements `bytes`, an HTTP/2 server's frames, hold.
fn ping_acks(mut bytes: &[u8]) -> usize {
    let mut acks = 0;
    while bytes.len() >= 9 {
        let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        acks += usize::from(bytes[3] == PING && bytes[4] & 1 == 1);
        bytes = &bytes[(9 + len).min(bytes.len())..];
    }
    acks
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
fn a_large_max_header_size_is_honoured_up_to_its_value() {
    // Above hyper's default buffer bound (408 KiB), which must grow with the flag.
    let host = example(&["--max-header-size", "1MiB"]);
    for (size, status) in [(600 * 1024, "200"), (1100 * 1024, "431")] {
        let mut stream = connect(&host);
        write!(stream, "GET / HTTP/1.1\r\nHost: t\r\nx-big: {}\r\nConnection: close\r\n\r\n", "x".repeat(size)).unwrap();
        let response = read_head(&mut stream);
        assert!(response.starts_with(&format!("HTTP/1.1 {status}")), "{size} bytes: {response}");
    }
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
async fn a_client_that_stops_reading_is_cut_off_after_the_send_timeout() {
    let host = example(&["--send-timeout", "1s"]);
    // A download whose client reads nothing: once the sockets' buffers are full, nothing
    // more goes out, and the response, with its generation's hold, is cut off.
    let mut download = connect(&host);
    write!(download, "GET /download?size=10000000000 HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    assert!(host.wait_for_log("the client read nothing of its responses for the send timeout", WAIT), "{}", host.log());
    host.wait_in_flight(0).await;

    // A WebSocket whose client sends and never reads: the echo's write fails, its session
    // ends and the connection closes.
    let mut ws = connect(&host);
    write!(
        ws,
        "GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .unwrap();
    assert!(read_head(&mut ws).starts_with("HTTP/1.1 101"));
    let upgraded = |scrape: String| -> f64 {
        let series = scrape.lines().filter(|l| l.starts_with("hotswap_upgraded_connections{"));
        series.filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
    };
    // (The session starts just after the 101 goes out.)
    let deadline = Instant::now() + WAIT;
    while upgraded(host.metrics().await) != 1.0 {
        assert!(Instant::now() < deadline, "the session did not start:\n{}", host.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sender = ws.try_clone().unwrap();
    let flood = std::thread::spawn(move || {
        let mut sender = sender;
        // Binary frames of 60 KiB, masked (with a zero mask) as a client's must be.
        let mut frame = vec![0x82, 0xfe, 0xf0, 0x00, 0, 0, 0, 0];
        frame.extend(std::iter::repeat_n(7u8, 0xf000));
        while sender.write_all(&frame).is_ok() {}
    });
    let deadline = Instant::now() + WAIT;
    while upgraded(host.metrics().await) != 0.0 {
        assert!(Instant::now() < deadline, "the WebSocket that reads nothing was not cut off:\n{}", host.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(ws);
    flood.join().unwrap();
}

#[test]
fn a_body_read_after_its_response_ends_and_is_not_timed_as_the_next_head() {
    let dir = temp_dir("read-later");
    place_by_rename(&artifacts().faulty, &dir.join("app.so"));
    let host = Host::serve(&["--plugin-dir", dir.to_str().unwrap(), "--header-read-timeout", "1s", "--idle-timeout", "1s"]);
    // The plugin answers at once and reads the upload on; its bytes keep coming for 3 s,
    // longer than the head and idle timeouts.
    let mut upload = connect(&host);
    write!(upload, "POST /read-later HTTP/1.1\r\nHost: t\r\nContent-Length: 7000\r\n\r\n").unwrap();
    assert!(read_head(&mut upload).starts_with("HTTP/1.1 202"));
    upload.read_exact(&mut [0; 8]).unwrap(); // "reading\n"
    for _ in 0..7 {
        std::thread::sleep(Duration::from_millis(430));
        upload.write_all(&[b'x'; 1000]).unwrap();
    }
    // Its end reaches the plugin with its last byte, and the connection serves on.
    assert!(host.wait_for_log("read later: 7000 bytes", Duration::from_secs(5)), "{}", host.log());
    let next = get_keep_alive(&mut upload, "/fine");
    assert!(next.starts_with("HTTP/1.1 200"), "{next:?}\n{}", host.log());
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

/// Writes `bytes` to `stream` `every` apart, until the server closes or `limit` passes
/// (the write error, or `Ok` if it never closed). Runs on a thread of its own.
fn drip(mut stream: TcpStream, bytes: Vec<Vec<u8>>, every: Duration, limit: Duration) -> std::thread::JoinHandle<std::io::Result<()>> {
    std::thread::spawn(move || {
        let started = Instant::now();
        for piece in bytes.iter().cycle() {
            stream.write_all(piece)?;
            std::thread::sleep(every);
            if started.elapsed() > limit {
                break;
            }
        }
        Ok(())
    })
}

#[test]
fn a_request_body_trickling_in_is_cut_off_and_its_slot_freed_but_a_steady_one_is_not() {
    let host = example(&["--body-read-timeout", "2s", "--max-connections", "1"]);

    // A byte a second: it would take 100 s. The default --min-body-rate (512B/s) wants 1 KiB
    // per 2 s.
    let mut slow = connect(&host);
    write!(slow, "POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n").unwrap();
    let started = Instant::now();
    let trickle = drip(slow.try_clone().unwrap(), vec![b"x".to_vec()], Duration::from_secs(1), Duration::from_secs(15));
    let response = read_head(&mut slow);
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    let (_, closed) = read_to_close(&mut slow);
    let cut = started.elapsed();
    assert!(cut < Duration::from_secs(5), "cut off only after {cut:?} (closed {closed:?} after the answer)");
    assert!(cut >= Duration::from_millis(1800), "cut off after only {cut:?}");
    assert!(trickle.join().unwrap().is_err(), "the connection stayed open for the trickle");
    assert!(host.wait_for_log("request body too slow (--body-read-timeout): answered 408", WAIT), "{}", host.log());
    assert!(host.wait_for_log("upload failed", WAIT), "the plugin's read did not fail:\n{}", host.log());

    // Its slot is free (--max-connections 1): a normal client is served at once.
    let waited = Instant::now();
    let mut normal = connect(&host);
    write!(normal, "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").unwrap();
    let (answer, _) = read_to_close(&mut normal);
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
    assert!(waited.elapsed() < Duration::from_secs(1), "the normal client waited {:?}", waited.elapsed());

    // A slow but steady upload (1 KiB every 500 ms, 5 s in all) is not cut.
    let mut steady = connect(&host);
    write!(steady, "POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").unwrap();
    for _ in 0..10 {
        write!(steady, "400\r\n").unwrap();
        steady.write_all(&[7u8; 1024]).unwrap();
        steady.write_all(b"\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(500));
    }
    steady.write_all(b"0\r\n\r\n").unwrap();
    let (answer, _) = read_to_close(&mut steady);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200") && answer.contains("bytes=10240"), "{answer}");
}

#[test]
fn a_plugin_reading_the_body_under_a_waker_of_its_own_is_woken_by_the_body_timeout() {
    // The fixture reads the body inside a FuturesUnordered: hyper holds the host's proxy for
    // the plugin's waker. The client sends a byte and then nothing: only the timeout wakes
    // the plugin, through the proxy.
    let host = Host::serve(&["--plugin", artifacts().faulty.to_str().unwrap(), "--body-read-timeout", "1s"]);
    let mut silent = connect(&host);
    write!(silent, "POST /count-unordered HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nx").unwrap();
    let started = Instant::now();
    let response = read_head(&mut silent);
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(started.elapsed() < Duration::from_secs(3), "answered only after {:?}", started.elapsed());
    let (_, closed) = read_to_close(&mut silent);
    assert!(closed < Duration::from_secs(1), "the connection stayed open {closed:?} after the 408");
}

#[tokio::test]
async fn an_http2_upload_trickling_in_gets_408_and_only_its_stream_is_reset() {
    let host = example(&["--body-read-timeout", "2s"]);
    let client = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let trickle = futures_util::stream::unfold(0u32, |sent| async move {
        (sent < 30).then_some(())?;
        if sent > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Some((Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"x")), sent + 1))
    });
    let started = Instant::now();
    let response = client.post(host.url("/upload")).body(reqwest::Body::wrap_stream(trickle)).send().await.unwrap();
    assert_eq!(response.status(), 408);
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert!(started.elapsed() < Duration::from_secs(5), "answered only after {:?}", started.elapsed());

    // The connection goes on serving, a steady upload (1 KiB every 500 ms) too.
    let steady = futures_util::stream::unfold(0u32, |sent| async move {
        (sent < 8).then_some(())?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        Some((Ok::<_, std::io::Error>(bytes::Bytes::from(vec![7u8; 1024])), sent + 1))
    });
    let response = client.post(host.url("/upload")).body(reqwest::Body::wrap_stream(steady)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.text().await.unwrap().contains("bytes=8192"));
    assert_eq!(host.log_count("connection ended"), 0, "the connection was closed:\n{}", host.log());
}

/// An HTTP/2 frame.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut frame = vec![len[1], len[2], len[3], kind, flags];
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// A GET request's header block (HPACK: static-table names, literal values).
fn h2_get(path: &str) -> Vec<u8> {
    let mut block = vec![0x82, 0x86, 0x04, path.len() as u8]; // :method GET, :scheme http, :path
    block.extend_from_slice(path.as_bytes());
    block.extend_from_slice(&[0x01, 0x01, b't']); // :authority t
    block
}

/// An HTTP/2 connection (prior knowledge), its preface and SETTINGS sent.
fn h2_connect(host: &Host) -> TcpStream {
    h2_connect_with(host, &[])
}

/// An HTTP/2 connection whose client's SETTINGS carry `settings`.
fn h2_connect_with(host: &Host, settings: &[u8]) -> TcpStream {
    let mut stream = connect(host);
    stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    stream.write_all(&h2_frame(SETTINGS, 0, 0, settings)).unwrap();
    stream
}

/// `GET path` on stream 1 of a new HTTP/2 connection whose client grants no window
/// (SETTINGS_INITIAL_WINDOW_SIZE 0: no stream may be sent DATA until it grants some).
fn h2_get_with_no_window(host: &Host, path: &str) -> TcpStream {
    let mut h2 = h2_connect_with(host, &[0, 4, 0, 0, 0, 0]);
    h2.write_all(&h2_frame(HEADERS, END_HEADERS | END_STREAM, 1, &h2_get(path))).unwrap();
    h2
}

/// PINGs on `h2` five times a second, for up to 15 s, on a thread of its own (see [`drip`]).
fn ping(h2: &TcpStream) -> std::thread::JoinHandle<std::io::Result<()>> {
    drip(h2.try_clone().unwrap(), vec![h2_frame(PING, 0, 0, b"12345678")], Duration::from_millis(200), Duration::from_secs(15))
}

/// Reads one frame: its type, flags, stream and payload. Acknowledges the server's SETTINGS.
fn h2_read_frame(stream: &mut TcpStream) -> (u8, u8, u32, Vec<u8>) {
    let mut head = [0u8; 9];
    stream.read_exact(&mut head).expect("no frame");
    let mut payload = vec![0u8; u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize];
    stream.read_exact(&mut payload).expect("a frame cut short");
    let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    if head[3] == SETTINGS && head[4] & 1 == 0 {
        stream.write_all(&h2_frame(SETTINGS, 1, 0, &[])).unwrap();
    }
    (head[3], head[4], id, payload)
}

#[test]
fn an_http2_connection_is_offered_bounded_streams() {
    let host = example(&[]);
    let mut h2 = h2_connect(&host);
    let (kind, _, _, settings) = h2_read_frame(&mut h2);
    assert_eq!(kind, SETTINGS);
    let value = |id: u16| {
        settings.chunks_exact(6).find(|s| u16::from_be_bytes([s[0], s[1]]) == id).map(|s| u32::from_be_bytes([s[2], s[3], s[4], s[5]]))
    };
    assert_eq!(value(0x3), Some(128), "SETTINGS_MAX_CONCURRENT_STREAMS: {settings:?}");
}

#[test]
fn an_http2_client_that_grants_no_window_is_cut_off_after_the_send_timeout() {
    let host = example(&["--send-timeout", "2s"]);
    let mut h2 = h2_get_with_no_window(&host, "/download?size=100000000");
    // A slow reader for two send timeouts: 4 KiB granted every 250 ms (to the stream and to
    // the connection), and read.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        h2.write_all(&h2_frame(WINDOW_UPDATE, 0, 1, &4096u32.to_be_bytes())).unwrap();
        h2.write_all(&h2_frame(WINDOW_UPDATE, 0, 0, &4096u32.to_be_bytes())).unwrap();
        let mut got = 0;
        while got < 4096 {
            let (kind, _, id, payload) = h2_read_frame(&mut h2);
            assert!(kind != 0x7 && kind != 0x3, "the slow reader was cut off ({kind}) after {:?}", started.elapsed());
            if kind == DATA && id == 1 {
                got += payload.len();
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    // Then no more window, and PINGs five times a second, each answered: the download is
    // cut off all the same, and the connection with it.
    let stopped = Instant::now();
    let pings = ping(&h2);
    let (answers, _) = read_to_close(&mut h2);
    let cut = stopped.elapsed();
    assert!(cut < Duration::from_secs(12), "a client granting no window held its download {cut:?}");
    assert!(ping_acks(&answers) >= 3, "the PINGs were not answered: {answers:?}");
    assert!(pings.join().unwrap().is_err(), "the connection stayed open");
    assert!(host.wait_for_log("the client read nothing of its responses for the send timeout", WAIT), "{}", host.log());
}

#[test]
fn an_http2_response_whose_one_frame_waits_for_a_window_is_cut_off_too() {
    let host = example(&["--send-timeout", "2s"]);
    // Hello world: its body is one frame, the last, which hyper holds until the window opens.
    let mut h2 = h2_get_with_no_window(&host, "/");
    let started = Instant::now();
    let pings = ping(&h2);
    let (_, _) = read_to_close(&mut h2);
    assert!(started.elapsed() < Duration::from_secs(12), "held {:?}", started.elapsed());
    assert!(pings.join().unwrap().is_err(), "the connection stayed open");
    assert!(host.wait_for_log("the client read nothing of its responses for the send timeout", WAIT), "{}", host.log());
}

#[test]
fn an_http2_response_still_going_out_after_its_stream_ended_is_not_idle() {
    let host = example(&["--idle-timeout", "1s"]);
    // One 64 KiB chunk to a client that grants 8 KiB every 250 ms (2 s): the body has all
    // been handed to h2 at the first grant, long before the client has read it.
    const SIZE: usize = 64 * 1024;
    let mut h2 = h2_get_with_no_window(&host, &format!("/download?size={SIZE}"));
    let mut got = 0;
    'read: loop {
        h2.write_all(&h2_frame(WINDOW_UPDATE, 0, 1, &8192u32.to_be_bytes())).unwrap();
        h2.write_all(&h2_frame(WINDOW_UPDATE, 0, 0, &8192u32.to_be_bytes())).unwrap();
        let mut granted = 8192;
        while granted > 0 {
            let (kind, flags, id, payload) = h2_read_frame(&mut h2);
            assert!(kind != 0x7, "cut off (GOAWAY) after {got} bytes\n{}", host.log());
            if kind == DATA && id == 1 {
                got += payload.len();
                granted -= payload.len().min(granted);
                if flags & END_STREAM != 0 {
                    break 'read;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(got, SIZE);
}

#[test]
fn an_http2_connection_sending_only_pings_is_closed_after_the_idle_timeout() {
    let host = example(&["--idle-timeout", "1s"]);
    let mut h2 = h2_connect(&host);
    // One request, answered: the connection speaks HTTP/2.
    h2.write_all(&h2_frame(HEADERS, END_HEADERS | END_STREAM, 1, &h2_get("/"))).unwrap();
    let mut body = Vec::new();
    loop {
        let (kind, flags, id, payload) = h2_read_frame(&mut h2);
        if kind == DATA && id == 1 {
            body.extend_from_slice(&payload);
            if flags & END_STREAM != 0 {
                break;
            }
        }
    }
    assert!(String::from_utf8_lossy(&body).contains("example-handler"), "{}", String::from_utf8_lossy(&body));

    // Then only PINGs (each answered by the server), five a second: idle all the same.
    let started = Instant::now();
    let pings = ping(&h2);
    let (answers, waited) = read_to_close(&mut h2);
    assert!(waited < Duration::from_secs(4), "a connection sending PINGs stayed open {waited:?}");
    assert!(started.elapsed() >= Duration::from_millis(800), "closed after only {:?}", started.elapsed());
    assert!(ping_acks(&answers) >= 3, "the PINGs were not answered: {answers:?}");
    assert!(pings.join().unwrap().is_err(), "the connection stayed open for the PINGs");
    assert!(host.wait_for_log("idle for the idle timeout", WAIT), "{}", host.log());
}

#[test]
fn an_http2_header_block_dripped_in_is_cut_off_even_beside_a_stream_in_progress() {
    let host = example(&["--header-read-timeout", "1s", "--idle-timeout", "30s"]);
    let mut h2 = h2_connect(&host);
    // A download on stream 1 (100 s long): a request in progress throughout.
    h2.write_all(&h2_frame(HEADERS, END_HEADERS | END_STREAM, 1, &h2_get("/download?size=10000000&rate=100000"))).unwrap();
    loop {
        let (kind, _, id, payload) = h2_read_frame(&mut h2);
        if kind == HEADERS && id == 1 {
            assert_eq!(payload.first(), Some(&0x88), "not a 200: {payload:?}"); // :status 200, indexed
            break;
        }
    }
    // Stream 3's header block: HEADERS without END_HEADERS, then a CONTINUATION whose 20
    // bytes come one every 200 ms (4 s).
    let started = Instant::now();
    h2.write_all(&h2_frame(HEADERS, END_STREAM, 3, &[0x82, 0x86, 0x84])).unwrap();
    let mut continuation = h2_frame(CONTINUATION, END_HEADERS, 3, b"\x00\x06x-slow\x0baaaaaaaaaaa");
    let rest = continuation.split_off(9);
    h2.write_all(&continuation).unwrap();
    let bytes = rest.iter().map(|b| vec![*b]).collect();
    let dripping = drip(h2.try_clone().unwrap(), bytes, Duration::from_millis(200), Duration::from_secs(15));
    let (_, _) = read_to_close(&mut h2);
    let cut = started.elapsed();
    assert!(cut < Duration::from_secs(3), "cut off only after {cut:?}");
    assert!(dripping.join().unwrap().is_err(), "the connection stayed open for the dripped header block");
    assert!(host.wait_for_log("an HTTP/2 header block did not complete", WAIT), "{}", host.log());
}

#[test]
fn many_slow_clients_do_not_lock_normal_ones_out() {
    const SLOTS: usize = 8;
    let host = example(&[
        "--max-connections", "8", "--header-read-timeout", "2s", "--idle-timeout", "2s", "--body-read-timeout", "2s",
    ]);
    // Every slot taken by a slow client, two of each kind, each going on for up to 15 s.
    let (every, limit) = (Duration::from_millis(250), Duration::from_secs(15));
    let mut slow = Vec::new();
    for _ in 0..SLOTS / 4 {
        // An HTTP/1 head a byte at a time (slowloris).
        let head = b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        slow.push(drip(connect(&host), head.iter().map(|b| vec![*b]).collect(), every, limit));
        // An HTTP/1 body a byte at a time.
        let mut body = connect(&host);
        write!(body, "POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n").unwrap();
        slow.push(drip(body, vec![b"x".to_vec()], every, limit));
        // HTTP/2 PINGs and nothing else.
        slow.push(drip(h2_connect(&host), vec![h2_frame(PING, 0, 0, b"12345678")], every, limit));
        // An HTTP/2 header block a byte at a time.
        let mut block = h2_frame(HEADERS, END_STREAM, 1, &[0x82, 0x86, 0x84]);
        block.extend(h2_frame(CONTINUATION, END_HEADERS, 1, &[0u8; 60]));
        slow.push(drip(h2_connect(&host), block.iter().map(|b| vec![*b]).collect(), every, limit));
    }

    // As many normal clients, waiting in the backlog: each one's download (100 s long) holds
    // its slot until all have been answered, so each needs a slot a slow client had.
    let started = Instant::now();
    let answered = std::sync::Arc::new(std::sync::Barrier::new(SLOTS));
    let normal: Vec<_> = (0..SLOTS)
        .map(|_| {
            let mut stream = connect(&host);
            let answered = answered.clone();
            std::thread::spawn(move || {
                write!(stream, "GET /download?size=10000000&rate=100000 HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
                stream.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && matches!(stream.read(&mut byte), Ok(1)) {
                    head.push(byte[0]);
                }
                let waited = started.elapsed();
                answered.wait();
                (String::from_utf8_lossy(&head).into_owned(), waited)
            })
        })
        .collect();
    for client in normal {
        let (head, waited) = client.join().unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "a normal client was not served (after {waited:?}): {head:?}\n{}", host.log());
        // The timeouts are 2 s; the sweeper may see them up to two ticks (500 ms each) late.
        assert!(waited < Duration::from_secs(5), "a normal client waited {waited:?}");
    }
    for client in slow {
        assert!(client.join().unwrap().is_err(), "a slow client was never cut off");
    }
}

#[tokio::test]
async fn a_handler_slower_than_the_response_timeout_gets_a_504_but_slow_bodies_do_not() {
    let host = Host::serve(&["--plugin", artifacts().faulty.to_str().unwrap(), "--response-timeout", "1s"]);

    // HTTP/1.1: answered 504 after about a second; the connection serves on.
    let mut stream = connect(&host);
    let started = Instant::now();
    let answer = get_keep_alive(&mut stream, "/hang");
    let took = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    assert!(took >= Duration::from_millis(950) && took < Duration::from_secs(5), "answered after {took:?}");
    assert!(get_keep_alive(&mut stream, "/").ends_with("fine\n"), "the connection did not serve on");
    assert!(host.wait_for_log("the handler did not answer within 1s (--response-timeout); answered 504", WAIT), "{}", host.log());
    // The answer names the request as the log line does.
    let id = answer.lines().find_map(|l| l.strip_prefix("x-request-id: ")).unwrap_or_else(|| panic!("no x-request-id: {answer}"));
    assert!(host.log().lines().any(|l| l.contains("answered 504") && l.contains(&format!("request_id={id}"))), "{id}\n{}", host.log());

    // HTTP/2: the stream.
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let response = h2.get(host.url("/hang")).send().await.unwrap();
    assert_eq!((response.version(), response.status()), (reqwest::Version::HTTP_2, reqwest::StatusCode::GATEWAY_TIMEOUT));
    assert_eq!(hotswap_tests::metric(&host.metrics().await, r#"hotswap_requests_total{version="0.1.0",status="504"}"#), 2.0);

    // An upload that takes three times the timeout, with a pause of more than twice the
    // timeout, answered once it is read: time the handler spends waiting for the body, or
    // reading it, does not count.
    let mut upload = connect(&host);
    write!(upload, "POST /context HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").unwrap();
    for pause in [2500, 300, 300, 300, 300, 500] {
        write!(upload, "400\r\n").unwrap();
        upload.write_all(&[7u8; 1024]).unwrap();
        upload.write_all(b"\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(pause));
    }
    upload.write_all(b"0\r\n\r\n").unwrap();
    let (answer, _) = read_to_close(&mut upload);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200") && answer.contains("body=6144"), "{answer}");

    // A response body is not timed: a download of twice the timeout finishes.
    let example = example(&["--response-timeout", "1s"]);
    let started = Instant::now();
    let body = reqwest::get(example.url("/download?size=200000&rate=100000")).await.unwrap().bytes().await.unwrap();
    assert_eq!(body.len(), 200_000);
    assert!(started.elapsed() >= Duration::from_millis(1900), "the download was not throttled");

    // 0 turns it off (rather than timing out at once).
    let patient = Host::serve(&["--plugin", artifacts().faulty.to_str().unwrap(), "--response-timeout", "0"]);
    let waiting = tokio::time::timeout(Duration::from_millis(1500), reqwest::get(patient.url("/hang"))).await;
    assert!(waiting.is_err(), "answered with the timeout off: {waiting:?}");
}

#[tokio::test]
async fn more_headers_than_a_header_map_is_made_for_are_a_400_not_a_panic() {
    let host = Host::serve(&["--plugin", artifacts().example.to_str().unwrap(), "--max-header-size", "4MiB"]);
    let mut headers = reqwest::header::HeaderMap::new();
    for _ in 0..25_000 {
        headers.append("x-many", reqwest::header::HeaderValue::from_static("1"));
    }
    let client = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let response = client.get(host.url("/")).headers(headers).send().await.unwrap_or_else(|e| panic!("{}\n{}", chain(&e), host.log()));
    assert_eq!(response.status(), 400, "{}", host.log());
    assert!(!host.log().contains("panicked"), "{}", host.log());
}
