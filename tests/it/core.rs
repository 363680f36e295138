//! Serving: requests through the C ABI, streaming both ways, HTTP/2, refusals, panics,
//! graceful shutdown.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hotswap_tests::{artifacts, chain, is_pattern, read_download, Host, WAIT};
use sha2::{Digest, Sha256};

const MIB: u64 = 1024 * 1024;

fn example() -> Host {
    Host::serve(&["--plugin", artifacts().example.to_str().unwrap()])
}

#[tokio::test]
async fn greets_with_name_and_version() {
    let host = example();
    let body = reqwest::get(host.url("/")).await.unwrap().text().await.unwrap();
    assert!(body.contains("hello from example-handler"), "{body}");
    assert!(body.contains("version=0.1.0"), "{body}");
    let health = reqwest::get(host.url("/health")).await.unwrap();
    assert_eq!(health.status(), 200);
    // One line per request at debug level.
    assert!(host.wait_for_log("request method=GET path=/health status=200", WAIT), "{}", host.log());
    // HEAD as GET, without the body; other methods get 405 with what is allowed.
    let client = reqwest::Client::new();
    let head = client.head(host.url("/")).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"].to_str().unwrap(), body.len().to_string());
    assert_eq!(head.bytes().await.unwrap().len(), 0);
    let put = client.put(host.url("/")).send().await.unwrap();
    assert_eq!((put.status().as_u16(), put.headers()["allow"].to_str().unwrap()), (405, "GET, HEAD"));
}

#[tokio::test]
async fn downloads_256_mib_byte_exact() {
    let host = example();
    let size = 256 * MIB;
    let response = reqwest::get(host.url(&format!("/download?size={size}"))).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.content_length(), Some(size));
    assert_eq!(read_download(response).await, size);
}

#[tokio::test]
async fn streams_a_256_mib_upload_without_buffering_it() {
    let host = Host::serve(&["--plugin", artifacts().example.to_str().unwrap(), "--max-body-size", "1GiB"]);
    // Warm up, then take the idle RSS.
    reqwest::get(host.url("/")).await.unwrap();
    let idle = host.rss();

    let size = 256 * MIB;
    let chunk = 256 * 1024;
    let (digest_tx, digest_rx) = std::sync::mpsc::channel();
    let body = futures_util::stream::unfold((0u64, Sha256::new(), 0x2545_f491_4f6c_dd1du64, digest_tx), move |(sent, mut hasher, mut x, tx)| async move {
        if sent >= size {
            let _ = tx.send(hasher.finalize());
            return None;
        }
        // Non-repeating content (xorshift), so a digest match means every byte arrived.
        let mut buf = Vec::with_capacity(chunk);
        while buf.len() < chunk {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            buf.extend_from_slice(&x.to_le_bytes());
        }
        hasher.update(&buf);
        Some((Ok::<_, std::io::Error>(bytes::Bytes::from(buf)), (sent + chunk as u64, hasher, x, tx)))
    });

    let pid_rss = {
        let pid = host.pid();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let sampler = std::thread::spawn(move || {
            let mut peak = 0u64;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                if let Some(kb) = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()) {
                    peak = peak.max(kb * 1024);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        });
        (stop, sampler)
    };
    let response = reqwest::Client::new()
        .post(host.url("/upload"))
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    let text = response.text().await.unwrap();
    pid_rss.0.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = pid_rss.1.join().unwrap();

    let expected: String = digest_rx.recv().unwrap().iter().map(|b| format!("{b:02x}")).collect();
    assert!(text.contains(&format!("bytes={size}")), "{text}");
    assert!(text.contains(&format!("sha256={expected}")), "{text}");
    assert!(peak < idle + 64 * MIB, "RSS peaked at {} MiB, idle was {} MiB", peak / MIB, idle / MIB);
    // The plugin's own `tracing` event, in the host's log, tagged with its name and version.
    assert!(host.wait_for_log("upload received", WAIT), "{}", host.log());
    let line = host.log().lines().find(|l| l.contains("upload received")).unwrap().to_owned();
    assert!(line.contains("plugin=example-handler@0.1.0") && line.contains(&format!("bytes={size}")), "{line}");
}

#[tokio::test]
async fn records_of_the_log_crate_reach_the_host_log_like_tracing_events() {
    let host = Host::serve(&["--plugin", artifacts().faulty.to_str().unwrap()]);
    let text = reqwest::get(host.url("/log")).await.unwrap().text().await.unwrap();
    assert_eq!(text, "logged\n");
    assert!(host.wait_for_log("fixture: a record of the log crate, attempt 3", WAIT), "{}", host.log());
    let line = host.log().lines().find(|l| l.contains("a record of the log crate")).unwrap().to_owned();
    assert!(line.contains(" WARN ") && line.contains("plugin=fixture-faulty@0.1.0"), "{line}");
    assert!(line.contains("target=fixture::pool"), "{line}");
}

#[tokio::test]
async fn the_plugin_s_tracing_spans_are_the_context_of_its_events_in_the_host_log() {
    let host = Host::serve(&["--plugin", artifacts().faulty.to_str().unwrap()]);
    assert_eq!(reqwest::get(host.url("/spans")).await.unwrap().text().await.unwrap(), "spans\n");
    assert!(host.wait_for_log("after an await in a span", WAIT), "{}", host.log());
    let log = host.log();
    let line = |needle: &str| log.lines().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("no {needle:?}:\n{log}"));
    let nested = line("inside two spans");
    assert!(nested.contains("spans=fixture_outer{id=7}:fixture_inner{depth=2}") && nested.contains("answer=42"), "{nested}");
    // Across an await: the instrumented future's span, and not the one left before it.
    let awaited = line("after an await in a span");
    assert!(awaited.contains("spans=fixture_task{n=1}") && !awaited.contains("fixture_outer"), "{awaited}");
    // `Span::current()` works: a task spawned in a span, with `in_current_span`, keeps it.
    assert!(host.wait_for_log("in a spawned task", WAIT), "{}", host.log());
    let log = host.log();
    let spawned = log.lines().find(|l| l.contains("in a spawned task")).unwrap();
    assert!(spawned.contains("spans=fixture_spawner{k=3}"), "{spawned}");
    // Outside any span, no field.
    assert_eq!(reqwest::get(host.url("/log")).await.unwrap().text().await.unwrap(), "logged\n");
    assert!(host.wait_for_log("a record of the log crate", WAIT), "{}", host.log());
    let log = host.log();
    let outside = log.lines().find(|l| l.contains("a record of the log crate")).unwrap();
    assert!(!outside.contains("spans="), "{outside}");
}

#[tokio::test]
async fn serves_http2_with_prior_knowledge() {
    let host = example();
    let client = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let response = client.get(host.url("/")).send().await.unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert!(response.text().await.unwrap().contains("hello from example-handler"));
    // A streamed body over HTTP/2 too.
    let response = client.get(host.url("/download?size=3000000")).send().await.unwrap();
    let bytes = response.bytes().await.unwrap();
    assert_eq!(bytes.len(), 3_000_000);
    assert!(is_pattern(&bytes, 0));
}

#[test]
fn refuses_a_plugin_built_for_the_previous_abi_naming_both_versions() {
    let log = match Host::try_serve(&["--plugin", artifacts().wrong_abi.to_str().unwrap()]) {
        Ok(_) => panic!("a plugin built for ABI version 3 was served"),
        Err(log) => log,
    };
    assert!(log.contains("plugin ABI version 3, host ABI version 4"), "{log}");
    assert!(log.contains("rebuild the plugin against the handler-api of this host"), "{log}");
}

#[tokio::test]
async fn a_handler_panic_is_a_500_and_the_next_request_is_served() {
    let host = Host::serve(&["--plugin", artifacts().faulty.to_str().unwrap()]);
    let client = reqwest::Client::new();
    let response = client.get(host.url("/panic")).send().await.unwrap();
    assert_eq!(response.status(), 500);
    let response = client.get(host.url("/")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "fine\n");
    assert!(host.wait_for_log("handler panic on purpose", WAIT), "{}", host.log());
    assert!(host.wait_for_log("answered 500", WAIT), "{}", host.log());
    // Reported through the host's log by the plugin's hook, not by std's default hook
    // (which would print "thread '...' panicked at").
    let log = host.log();
    let line = log.lines().find(|l| l.contains("handler panic on purpose")).unwrap();
    assert!(line.contains("plugin panicked at") && line.contains("plugin=fixture-faulty@0.1.0"), "{line}");
    assert!(!log.contains("thread '"), "{log}");
}

#[tokio::test]
async fn tokio_timers_or_spawn_in_a_plugin_are_a_500_that_names_the_replacement() {
    let host = Host::serve(&["--plugin", artifacts().faulty.to_str().unwrap()]);
    let client = reqwest::Client::new();
    for path in ["/tokio-sleep", "/tokio-spawn"] {
        let response = client.get(host.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 500, "{path}");
        assert_eq!(client.get(host.url("/")).send().await.unwrap().status(), 200, "the host goes on after {path}");
    }
    // Both mistakes are named, with their replacement.
    let hint = "use handler_api::spawn for tasks, handler_api::sleep";
    let deadline = Instant::now() + WAIT;
    while host.log().lines().filter(|l| l.contains("plugin panicked") && l.contains(hint)).count() < 2 {
        assert!(Instant::now() < deadline, "{}", host.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_empty_chunk_in_a_streamed_body_does_not_end_it() {
    let host = Host::serve(&["--plugin", artifacts().faulty.to_str().unwrap()]);
    let body = reqwest::get(host.url("/empty-chunks")).await.unwrap().text().await.unwrap();
    assert_eq!(body, "onetwo", "the body ended at its empty chunk");
}

#[tokio::test]
async fn a_body_panic_aborts_only_that_response() {
    let host = Host::serve(&["--plugin", artifacts().faulty.to_str().unwrap()]);
    // A second client with its own connection, mid-conversation while the body panics.
    let other = reqwest::Client::new();
    assert_eq!(other.get(host.url("/")).send().await.unwrap().status(), 200);

    let response = reqwest::get(host.url("/panic-body")).await.unwrap();
    assert_eq!(response.status(), 200);
    let expected = response.content_length().unwrap();
    let mut stream = response.bytes_stream();
    let mut received = 0u64;
    let mut failed = false;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => received += c.len() as u64,
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the aborted body ended cleanly after {received} of {expected} bytes");
    assert!(received < expected);
    assert_eq!(other.get(host.url("/")).send().await.unwrap().text().await.unwrap(), "fine\n");
    assert_eq!(reqwest::get(host.url("/")).await.unwrap().status(), 200);
    assert!(host.wait_for_log("body panic on purpose", WAIT), "{}", host.log());
}

#[tokio::test]
async fn sigterm_lets_a_slow_download_finish_then_exits_0() {
    let mut host = Host::serve(&["--plugin", artifacts().example.to_str().unwrap(), "--drain-timeout", "20s"]);
    let size = 2_000_000u64;
    let response = reqwest::get(host.url(&format!("/download?size={size}&rate=1000000"))).await.unwrap();
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    host.signal("TERM");
    let bytes = response.bytes().await.expect("the download was cut off by SIGTERM");
    assert_eq!(bytes.len() as u64, size);
    assert!(is_pattern(&bytes, 0));
    assert!(started.elapsed() >= Duration::from_millis(1500), "throttling did not apply");
    let code = tokio::task::spawn_blocking(move || {
        let code = host.wait_exit(Duration::from_secs(15));
        (code, host.log())
    })
    .await
    .unwrap();
    assert_eq!(code.0, Some(0), "{}", code.1);
    assert!(code.1.contains("generation unloaded and unmapped"), "{}", code.1);
}

#[tokio::test]
async fn responses_without_content_have_none_over_http1_and_http2() {
    let host = Host::serve(&["--plugin", artifacts().faulty.to_str().unwrap()]);
    for client in [reqwest::Client::new(), reqwest::Client::builder().http2_prior_knowledge().build().unwrap()] {
        // HEAD: the headers of the GET, its length included, and no body.
        let head = client.head(host.url("/")).send().await.unwrap_or_else(|e| panic!("HEAD: {}\n{}", chain(&e), host.log()));
        assert_eq!(head.status(), 200);
        assert_eq!(head.headers().get("content-length").map(|v| v.to_str().unwrap().to_owned()), Some("5".into()), "{head:?}");
        assert!(head.bytes().await.unwrap().is_empty());
        // A 204 and a 304 the plugin gave a body: sent without it.
        for code in [204, 304] {
            let response = client.get(host.url(&format!("/status?code={code}"))).send().await.unwrap_or_else(|e| panic!("{code}: {}", chain(&e)));
            assert_eq!(response.status().as_u16(), code);
            assert!(response.bytes().await.unwrap().is_empty());
        }
        // An empty body that claims a length: a 204 is sent without the claim, another
        // status is refused (HTTP/2 clients would reset the stream, HTTP/1 ones wait).
        let response = client.get(host.url("/status?code=204&length=5")).send().await.unwrap_or_else(|e| panic!("204: {}", chain(&e)));
        assert_eq!((response.status().as_u16(), response.headers().get("content-length")), (204, None));
        let response = client.get(host.url("/status?code=200&length=5")).send().await.unwrap_or_else(|e| panic!("200: {}", chain(&e)));
        assert_eq!(response.status().as_u16(), 500);
        let response = client.get(host.url("/status?code=200&length=0")).send().await.unwrap_or_else(|e| panic!("200: {}", chain(&e)));
        assert_eq!(response.status().as_u16(), 200);
        // A 1xx is no final answer: refused, with the reason in the log.
        let informational = client.get(host.url("/status?code=103")).send().await.unwrap_or_else(|e| panic!("103: {}", chain(&e)));
        assert_eq!(informational.status(), 500);
        // The host's own answer to HEAD has no body either.
        let failed = client.head(host.url("/panic")).send().await.unwrap_or_else(|e| panic!("HEAD /panic: {}", chain(&e)));
        assert_eq!(failed.status(), 500);
        assert!(failed.bytes().await.unwrap().is_empty());
    }
    assert!(host.wait_for_log("status 103 is informational, not a final answer", WAIT), "{}", host.log());
}

#[tokio::test]
async fn a_second_sigterm_cuts_off_what_the_drain_waits_for() {
    let mut host = Host::serve(&["--plugin", artifacts().example.to_str().unwrap(), "--drain-timeout", "120s"]);
    // A download of two minutes, which the drain would wait for.
    let response = reqwest::get(host.url("/download?size=120000000&rate=1000000")).await.unwrap();
    host.wait_in_flight(1).await;
    host.signal("TERM");
    assert!(host.wait_for_log("shutting down gracefully", WAIT), "{}", host.log());
    assert!(host.wait_for_log("draining", WAIT), "{}", host.log());
    host.signal("TERM");
    let cut = tokio::time::timeout(WAIT, response.bytes()).await;
    assert!(cut.is_ok_and(|read| read.is_err()), "the download was not cut off");
    let (code, log) = tokio::task::spawn_blocking(move || (host.wait_exit(WAIT), host.log())).await.unwrap();
    assert!(code.is_some(), "still running after the second SIGTERM:\n{log}");
    assert!(log.contains("stopping now: aborting responses still in progress"), "{log}");
    assert!(log.contains("generation unloaded and unmapped"), "it shut down in order:\n{log}");
}

#[tokio::test]
async fn blocking_work_runs_on_the_hosts_pool_and_its_panics_are_errors() {
    let host = Host::serve(&["--plugin", artifacts().faulty.to_str().unwrap()]);
    let text = reqwest::get(host.url("/blocking")).await.unwrap().text().await.unwrap();
    assert_eq!(text, "42 on another thread: true\n");
    let text = reqwest::get(host.url("/blocking-panic")).await.unwrap().text().await.unwrap();
    assert_eq!(text, "error: the blocking job panicked\n");
    assert!(host.wait_for_log("blocking job panic", WAIT), "{}", host.log());
    assert_eq!(reqwest::get(host.url("/")).await.unwrap().status(), 200);
}

#[tokio::test]
async fn a_body_read_under_the_plugins_own_waker_streams_over_http1_and_http2() {
    let host = Host::serve(&["--plugin", artifacts().faulty.to_str().unwrap()]);
    let size = 8 * MIB as usize;
    for client in [reqwest::Client::new(), reqwest::Client::builder().http2_prior_knowledge().build().unwrap()] {
        let chunks = futures_util::stream::iter((0..size / 65536).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![7u8; 65536]))));
        let response = client.post(host.url("/count-unordered")).body(reqwest::Body::wrap_stream(chunks)).send().await.unwrap();
        assert_eq!(response.text().await.unwrap(), format!("{size}\n"));
    }
    assert!(!host.log().contains("ERROR"), "{}", host.log());
}

#[tokio::test]
async fn an_http1_1_request_without_one_valid_host_is_a_400() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let host = Host::serve(&["--plugin", artifacts().example.to_str().unwrap()]);
    let status_of = |head: &'static str| {
        let addr = host.addr.clone();
        async move {
            let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
            stream.write_all(format!("{head}Connection: close\r\n\r\n").as_bytes()).await.unwrap();
            let mut answer = String::new();
            tokio::time::timeout(WAIT, stream.read_to_string(&mut answer)).await.expect("no answer").unwrap();
            answer.split(' ').nth(1).unwrap_or_default().to_owned()
        }
    };
    // RFC 9112, section 3.2: none, more than one, or one that is not a host.
    assert_eq!(status_of("GET / HTTP/1.1\r\n").await, "400");
    assert_eq!(status_of("GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n").await, "400");
    assert_eq!(status_of("GET / HTTP/1.1\r\nHost: a.example/path\r\n").await, "400");
    assert_eq!(status_of("GET / HTTP/1.1\r\nHost: a b\r\n").await, "400");
    // What is valid: a name, an address, a port, an IPv6 literal, an empty value; HTTP/1.0
    // without one.
    for head in [
        "GET / HTTP/1.1\r\nHost: a.example\r\n",
        "GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n",
        "GET / HTTP/1.1\r\nHost: [::1]:8080\r\n",
        "GET / HTTP/1.1\r\nHost:\r\n",
        "GET / HTTP/1.0\r\n",
        "GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n",
        "GET http://a.example/ HTTP/1.1\r\n",
    ] {
        assert_eq!(status_of(head).await, "200", "{head}");
    }
}
