//! Apps as plugin authors write them: an axum Router (examples/axum-app) served by the real
//! host.

use std::path::Path;
use std::time::{Duration, Instant};

use hotswap_tests::{artifacts, copy_private, example_version, place_by_rename, temp_dir, variant, Host, WAIT};

/// GET `path` until its body contains `needle`.
async fn wait_body(host: &Host, path: &str, needle: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let body = reqwest::get(host.url(path)).await.unwrap().text().await.unwrap();
        if body.contains(needle) {
            return body;
        }
        assert!(Instant::now() < deadline, "{path} never answered {needle:?} (last: {body:?}):\n{}", host.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_axum_router_serves_json_with_state_of_its_build_released_at_unload() {
    let dir = temp_dir("apps-axum");
    copy_private(&artifacts().axum, &dir.join("app.so"));
    let host = Host::serve_dir(&dir, &[]);
    let client = reqwest::Client::new();

    let hello = client.get(host.url("/")).send().await.unwrap();
    // A complete body keeps its length: no chunked encoding.
    assert_eq!(hello.headers()["content-length"], "30", "{:?}", hello.headers());
    assert_eq!(hello.text().await.unwrap(), "hello from example-axum 0.1.0\n");

    let added = client.post(host.url("/todos")).json(&serde_json::json!({"title": "ship it"})).send().await.unwrap();
    assert_eq!(added.status(), 201);
    assert_eq!(added.headers()["content-type"], "application/json");
    assert_eq!(added.json::<serde_json::Value>().await.unwrap(), serde_json::json!({"id": 1, "title": "ship it"}));
    let list: serde_json::Value = client.get(host.url("/todos")).send().await.unwrap().json().await.unwrap();
    assert_eq!(list, serde_json::json!([{"id": 1, "title": "ship it"}]));
    let missing = client.get(host.url("/todos/7")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.json::<serde_json::Value>().await.unwrap(), serde_json::json!({"error": "no to-do 7"}));
    let rejected = client.post(host.url("/todos")).header("content-type", "application/json").body("{").send().await.unwrap();
    assert_eq!(rejected.status(), 400, "axum's own rejection of bad JSON");

    // The context reaches axum's extractor: the peer is this client's socket.
    let who: serde_json::Value = client.get(host.url("/whoami")).send().await.unwrap().json().await.unwrap();
    assert!(who["peer"].as_str().is_some_and(|p| p.starts_with("127.0.0.1:")), "{who}");
    assert_eq!(who["request_id"].as_str().map(str::len), Some(16), "{who}");
    let started = Instant::now();
    assert_eq!(client.get(host.url("/slow?ms=50")).send().await.unwrap().text().await.unwrap(), "waited 50 ms\n");
    assert!(started.elapsed() >= Duration::from_millis(50));

    // A WebSocket through axum's routing and handler-api's Upgrade extractor.
    let (mut ws, response) = tokio_tungstenite::connect_async(format!("ws://{}/ws", host.addr)).await.unwrap();
    assert_eq!(response.status(), 101);
    use futures_util::{SinkExt, StreamExt};
    ws.send(tokio_tungstenite::tungstenite::Message::text("echo through axum")).await.unwrap();
    let echoed = tokio::time::timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(echoed.into_text().unwrap().as_str(), "echo through axum");
    ws.close(None).await.unwrap();
    assert_eq!(client.get(host.url("/ws")).send().await.unwrap().status(), 426, "a plain GET is asked to upgrade");

    // A background task (handler_api::spawn) runs on the build's runtime, holding its state.
    assert_eq!(client.post(host.url("/ticker")).send().await.unwrap().text().await.unwrap(), "ticking\n");
    let deadline = Instant::now() + WAIT;
    while client.get(host.url("/ticks")).send().await.unwrap().text().await.unwrap().trim().parse::<u64>().unwrap() < 3 {
        assert!(Instant::now() < deadline, "the ticker does not tick:\n{}", host.log());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // A new build starts with state of its own. The old build's task is dropped when the build
    // unloads, and then its state (which the task held).
    place_by_rename(&variant("example-axum", "EXAMPLE_AXUM_VERSION", "2.0.0"), &dir.join("app.so"));
    wait_body(&host, "/", "example-axum 2.0.0").await;
    assert_eq!(client.get(host.url("/todos")).send().await.unwrap().text().await.unwrap(), "[]");
    assert!(host.wait_for_log("state released version=\"0.1.0\" todos=1", WAIT), "{}", host.log());
    // In this order: the host drops the build's tasks, then its service (and so the state),
    // then runs its shutdown hook.
    assert!(host.wait_for_log("build unloading version=\"0.1.0\"", WAIT), "{}", host.log());
    let log = host.log();
    let at = |line: &str| log.find(line).unwrap_or_else(|| panic!("no {line:?} in the log:\n{log}"));
    let (stopped, released, unloading) =
        (at("ticker stopped version=\"0.1.0\""), at("state released version=\"0.1.0\""), at("build unloading version=\"0.1.0\""));
    assert!(stopped < released && released < unloading, "tasks, state, then the hook:\n{log}");
    assert_eq!(host.wait_mapped(1, WAIT).await.len(), 1, "{}", host.log());
}

#[test]
fn a_service_that_fails_to_build_refuses_its_build_with_the_reason() {
    let dir = temp_dir("apps-axum-refused");
    copy_private(&artifacts().axum, &dir.join("app.so"));
    // Its `app()` reads the greeting when the build loads, and refuses an empty one.
    let env = [("EXAMPLE_AXUM_GREETING", Path::new(""))];
    let args = ["serve", "--listen", "127.0.0.1:0", "--plugin-dir", dir.to_str().unwrap()];
    let log = Host::start(&args, None, &env, Duration::from_secs(30)).err().expect("started with no loadable build");
    let refused = "example-axum@0.1.0: init failed: EXAMPLE_AXUM_GREETING is set but empty: unset it or give a greeting";
    assert!(log.contains(refused), "{log}");
}

/// Reads `stream` until `done` holds for what was read, or `WAIT` passes.
async fn read_until(
    stream: &mut (impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    text: &mut String,
    done: impl Fn(&str, bool) -> bool,
) {
    use futures_util::StreamExt;
    let deadline = Instant::now() + WAIT;
    loop {
        let next = tokio::time::timeout_at(deadline.into(), stream.next()).await.unwrap_or_else(|_| panic!("timed out:\n{text}"));
        let ended = next.is_none();
        if let Some(chunk) = next {
            text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        }
        if done(text, ended) {
            return;
        }
        assert!(!ended, "the stream ended early:\n{text}");
    }
}

#[tokio::test]
async fn a_server_sent_events_clock_ticks_then_ends_politely_when_a_newer_build_serves() {
    let dir = temp_dir("apps-clock");
    place_by_rename(&example_version("1.0.0"), &dir.join("app.so"));
    let host = Host::serve_dir(&dir, &[]);
    let response = reqwest::get(host.url("/clock?every_ms=50")).await.unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut events = response.bytes_stream();
    let mut text = String::new();
    read_until(&mut events, &mut text, |t, _| t.matches("event: tick\n").count() >= 3).await;
    assert!(text.starts_with("retry: 500\nid: 1\nevent: tick\ndata: "), "{text}");
    assert!(text.contains("id: 3\nevent: tick\n") && text.contains(" 1.0.0\n\n"), "{text}");

    // A newer build: the stream says so and ends; a new one is the new build's.
    place_by_rename(&example_version("2.0.0"), &dir.join("app.so"));
    read_until(&mut events, &mut text, |_, ended| ended).await;
    assert!(text.ends_with("\n\nevent: superseded\ndata: a newer build serves: reconnect\n\n"), "{text}");
    let mut again = reqwest::get(host.url("/clock?every_ms=50")).await.unwrap().bytes_stream();
    let mut text = String::new();
    read_until(&mut again, &mut text, |t, _| t.contains("\n\n")).await;
    assert!(text.contains(" 2.0.0\n\n"), "{text}");
}
