//! Switching protocols: WebSocket sessions (HTTP/1.1 `Upgrade` and HTTP/2 extended CONNECT)
//! that stay on the build that accepted them across swaps, the superseded signal, the drain
//! timeout; and the request context a plugin sees.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hotswap_tests::{artifacts, example_version, place_by_rename, temp_dir, Host, WAIT};
use http_body_util::{BodyExt, StreamBody};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// A WebSocket session to the example handler's `/ws`, over HTTP/1.1.
pub(crate) async fn connect(host: &Host, query: &str) -> WebSocketStream<impl AsyncRead + AsyncWrite + Unpin> {
    let (ws, response) = tokio_tungstenite::connect_async(format!("ws://{}/ws{query}", host.addr))
        .await
        .unwrap_or_else(|e| panic!("WebSocket handshake failed: {e}\n{}", host.log()));
    assert_eq!(response.status(), 101);
    ws
}

/// The next data or close message, within a bound.
pub(crate) async fn next<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) -> Option<Message> {
    let message = tokio::time::timeout(WAIT, ws.next()).await.expect("no message within the wait");
    message.map(|m| m.expect("the session failed"))
}

/// The version a session's greeting names.
pub(crate) async fn greeting<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) -> String {
    match next(ws).await {
        Some(Message::Text(text)) => text.split("version=").nth(1).expect("a greeting with a version").to_owned(),
        other => panic!("expected a greeting, got {other:?}"),
    }
}

/// Sends `message` and checks it comes back byte for byte.
pub(crate) async fn echo<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>, message: Message) {
    ws.send(message.clone()).await.expect("the session broke");
    assert_eq!(next(ws).await, Some(message));
}

/// Bytes that differ from message to message.
fn payload(seed: u32, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[tokio::test]
async fn a_websocket_stays_on_its_build_across_20_swaps_and_its_library_unloads_when_it_closes() {
    let dir = temp_dir("ws-swaps");
    place_by_rename(&example_version("1.0.0"), &dir.join("app.so"));
    let host = Host::serve_dir(&dir, &["--admin", "127.0.0.1:0"]);
    let mut old = connect(&host, "").await;
    assert_eq!(greeting(&mut old).await, "1.0.0");

    // Two newer builds beside it; pinning one, then the other, swaps 20 times.
    place_by_rename(&example_version("2.0.0"), &dir.join("app-2.so"));
    place_by_rename(&example_version("3.0.0"), &dir.join("app-3.so"));
    let admin = host.admin_url();
    let client = reqwest::Client::new();
    for swap in 1..=20u32 {
        let version = if swap % 2 == 1 { "2.0.0" } else { "3.0.0" };
        let pinned = client.post(format!("{admin}/pin")).header("content-type", "application/json").body(format!("{{\"version\": \"{version}\"}}")).send().await.unwrap();
        assert!(pinned.status().is_success(), "pin {version}: {}\n{}", pinned.text().await.unwrap(), host.log());
        host.wait_version(version).await;
        // The session opened on v1 goes on, byte for byte, text and binary, large and small.
        echo(&mut old, Message::binary(payload(swap, 1 + (swap as usize * 7919) % 200_000))).await;
        echo(&mut old, Message::text(format!("message {swap} after the swap to {version}"))).await;
        // A new session gets the new build.
        let mut new = connect(&host, "").await;
        assert_eq!(greeting(&mut new).await, version, "a new session after swap {swap}");
        new.close(None).await.unwrap();
    }
    // Still on v1's code: a broadcast reaches the sessions of its own build, v1's.
    old.send(Message::text("broadcast: still here")).await.unwrap();
    assert_eq!(next(&mut old).await, Some(Message::text("broadcast: still here")));

    // The status and the metrics count it on generation 1, which stays mapped for it.
    let status = reqwest::get(format!("{admin}/status")).await.unwrap().text().await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let first = status["resident"].as_array().unwrap().iter().find(|g| g["generation"] == 1).cloned();
    assert_eq!(first.as_ref().map(|g| g["upgraded"].clone()), Some(1.into()), "{status}");
    let metrics = reqwest::get(format!("{admin}/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("hotswap_upgraded_connections{generation=\"1\",version=\"1.0.0\"} 1"), "{metrics}");
    // (The generation swapped away last may still be unloading beside them.)
    assert!(host.mapped_plugins().len() >= 2, "v1 unloaded under its session\n{}", host.log());
    assert!(!host.log().contains("generation unloaded and unmapped generation=1 "), "{}", host.log());

    old.close(None).await.unwrap();
    assert!(host.wait_for_log("generation unloaded and unmapped generation=1 ", WAIT), "{}", host.log());
    let mapped = host.wait_mapped(1, WAIT).await;
    assert_eq!(mapped.len(), 1, "v1 still mapped after its session closed: {mapped:?}\n{}", host.log());
}

#[tokio::test]
async fn a_session_that_asks_closes_politely_on_a_swap_and_the_drain_timeout_cuts_one_that_does_not() {
    let (v1, v2) = (example_version("1.0.0"), example_version("2.0.0"));
    let dir = temp_dir("ws-drain");
    place_by_rename(&v1, &dir.join("app.so"));
    let host = Host::serve_dir(&dir, &["--drain-timeout", "2s"]);
    let mut polite = connect(&host, "?on_swap=close").await;
    let mut stubborn = connect(&host, "").await;
    assert_eq!(greeting(&mut polite).await, "1.0.0");
    assert_eq!(greeting(&mut stubborn).await, "1.0.0");

    // Taken before the swap: a lower bound of the time since it, however late it is seen.
    let swapped = Instant::now();
    place_by_rename(&v2, &dir.join("app.so"));
    host.wait_version("2.0.0").await;
    // The polite one says why it closes: 1012, service restart.
    match next(&mut polite).await {
        Some(Message::Close(Some(frame))) => {
            assert_eq!(frame.code, CloseCode::Restart);
            assert_eq!(frame.reason, "service restart");
        }
        other => panic!("expected a close frame with code 1012, got {other:?}"),
    }
    // The other goes on, on v1, until the drain timeout; then the host cuts it.
    echo(&mut stubborn, Message::text("still talking")).await;
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match stubborn.next().await {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the drain timeout did not cut the session\n{}", host.log());
    assert!(swapped.elapsed() >= Duration::from_millis(1500), "cut before the drain timeout: {:?}", swapped.elapsed());
    assert!(host.wait_for_log("drain timeout: closing an upgraded connection", WAIT), "{}", host.log());
    let mapped = host.wait_mapped(1, WAIT).await;
    assert_eq!(mapped.len(), 1, "v1 still mapped after the drain timeout: {mapped:?}\n{}", host.log());
}

/// Opens a WebSocket session over HTTP/2 with an extended CONNECT (RFC 8441), with prior
/// knowledge, on a connection of its own; returns the session and the connection's task.
async fn connect_h2(host: &Host) -> WebSocketStream<TokioIo<hyper::upgrade::Upgraded>> {
    let tcp = tokio::net::TcpStream::connect(&host.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(connection);
    let mut request = http::Request::connect(format!("http://{}/ws", host.addr))
        .header("sec-websocket-version", "13")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    request.extensions_mut().insert(hyper::ext::Protocol::from_static("websocket"));
    let mut response = sender.send_request(request).await.unwrap_or_else(|e| panic!("extended CONNECT failed: {e}\n{}", host.log()));
    assert_eq!(response.status(), 200, "{}", host.log());
    let io = hyper::upgrade::on(&mut response).await.expect("the stream did not switch");
    WebSocketStream::from_raw_socket(TokioIo::new(io), Role::Client, None).await
}

#[tokio::test]
async fn a_websocket_over_http2_extended_connect_stays_on_its_build() {
    let (v1, v2) = (example_version("1.0.0"), example_version("2.0.0"));
    let dir = temp_dir("ws-h2");
    place_by_rename(&v1, &dir.join("app.so"));
    // A session holds its connection as a request does: the idle timeout does not cut it.
    let host = Host::serve_dir(&dir, &["--idle-timeout", "1s"]);
    let mut old = connect_h2(&host).await;
    assert_eq!(greeting(&mut old).await, "1.0.0");
    echo(&mut old, Message::binary(payload(1, 100_000))).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    echo(&mut old, Message::text("after a silence longer than the idle timeout")).await;

    place_by_rename(&v2, &dir.join("app.so"));
    host.wait_version("2.0.0").await;
    echo(&mut old, Message::binary(payload(2, 300_000))).await;
    echo(&mut old, Message::text("after the swap")).await;
    let mut new = connect_h2(&host).await;
    assert_eq!(greeting(&mut new).await, "2.0.0");
    assert_eq!(host.mapped_plugins().len(), 2, "v1 unloaded under its session\n{}", host.log());

    old.close(None).await.unwrap();
    new.close(None).await.unwrap();
    let mapped = host.wait_mapped(1, WAIT).await;
    assert_eq!(mapped.len(), 1, "v1 still mapped after its session closed: {mapped:?}\n{}", host.log());
}

#[tokio::test]
async fn a_websocket_over_http2_whose_client_grants_no_window_is_cut_off() {
    let host = Host::serve(&["--plugin", artifacts().example.to_str().unwrap(), "--send-timeout", "1s"]);
    let mut ws = connect_h2(&host).await;
    assert!(!greeting(&mut ws).await.is_empty());
    // The client sends and never reads: the echoes fill its stream's window, which it never
    // opens again, and the echo's writes wait. The session ends when the connection is cut.
    let flooded = tokio::time::timeout(WAIT, async {
        for seed in 0.. {
            if ws.send(Message::binary(payload(seed, 60 * 1024))).await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(flooded.is_ok(), "a WebSocket client granting no window was not cut off\n{}", host.log());
    assert!(host.wait_for_log("the client read nothing of its responses for the send timeout", WAIT), "{}", host.log());
}

/// `POST /context` of the faulty fixture over `version`, with a body and trailers; returns
/// its answer.
async fn context_via(host: &Host, http2: bool) -> String {
    let tcp = tokio::net::TcpStream::connect(&host.addr).await.unwrap();
    let local = tcp.local_addr().unwrap();
    let frames = futures_util::stream::iter([
        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from_static(b"hello"))),
        Ok(hyper::body::Frame::data(Bytes::from_static(b" world"))),
        Ok(hyper::body::Frame::trailers({
            let mut trailers = http::HeaderMap::new();
            trailers.insert("x-checksum", "abc123".parse().unwrap());
            trailers
        })),
    ]);
    let request = http::Request::post(format!("http://{}/context", host.addr))
        .header("te", "trailers")
        // HTTP/1.1 sends only the trailer fields it announced.
        .header("trailer", "x-checksum")
        .body(StreamBody::new(frames))
        .unwrap();
    let response = if http2 {
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
        tokio::spawn(connection);
        sender.send_request(request).await.unwrap()
    } else {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
        tokio::spawn(connection);
        sender.send_request(request).await.unwrap()
    };
    let text = String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(text.contains(&format!("peer={local}\n")), "the peer address is the client's {local}: {text}");
    text
}

#[tokio::test]
async fn the_plugin_sees_the_peer_address_scheme_request_id_and_trailers() {
    let host = Host::serve(&["--plugin", artifacts().faulty.to_str().unwrap()]);
    let mut ids = Vec::new();
    for http2 in [false, true] {
        let text = context_via(&host, http2).await;
        assert!(text.contains(&format!("local={}\n", host.addr)), "{text}");
        assert!(text.contains("scheme=http\n"), "{text}");
        assert!(text.contains(if http2 { "version=HTTP/2.0\n" } else { "version=HTTP/1.1\n" }), "{text}");
        assert!(text.contains("body=11\n"), "{text}");
        assert!(text.contains("trailers=x-checksum:abc123\n"), "the trailers did not reach the plugin: {text}");
        let id = text.split("request_id=").nth(1).and_then(|r| r.lines().next()).unwrap().to_owned();
        assert_eq!(id.len(), 16, "{text}");
        // The host's log line about the request carries the same id.
        assert!(host.wait_for_log(&format!("request_id={id}"), WAIT), "no log line with request_id={id}\n{}", host.log());
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1], "two requests, one id");
}
