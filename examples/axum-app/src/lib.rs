//! An axum app as a hotswap plugin.
//!
//! | route | answer |
//! |---|---|
//! | `GET /` | a greeting with the app's version |
//! | `GET /todos` | the to-do list, as JSON |
//! | `POST /todos` | adds `{"title": …}`; answers `201` with the new item |
//! | `GET /todos/{id}` | one item, or `404` with a JSON error |
//! | `GET /whoami` | the request's context (peer address, scheme, request id), as JSON |
//! | `GET /slow?ms=N` | answers after `N` ms (`handler_api::sleep`: tokio's timers do not run in a plugin) |
//! | `POST /ticker` | starts a background task (`handler_api::spawn`) that counts ticks every 10 ms until this build is unloaded |
//! | `GET /ticks` | the ticks counted so far |
//! | `GET /ws` | a WebSocket echo (HTTP/1.1 `Upgrade`, or HTTP/2 extended CONNECT), through handler-api's `Upgrade` extractor; a plain GET is answered `426` |
//!
//! The app's state (the list, and the greeting read from `EXAMPLE_AXUM_GREETING`) is built
//! by [`app`] when the host loads the build, and dropped when the build is unloaded: each
//! build has its own. A real app keeps what must outlive a build in a database.
//!
//! The version comes from `EXAMPLE_AXUM_VERSION` at build time (default: the crate's), so
//! two builds can be told apart.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::{SinkExt, StreamExt};
use handler_api::upgrade::Upgrade;
use handler_api::{export_handler, RequestContext};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;
use serde::{Deserialize, Serialize};

/// This build's version.
pub const VERSION: &str = match option_env!("EXAMPLE_AXUM_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

/// A to-do item.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Todo {
    pub id: u64,
    pub title: String,
}

/// What `POST /todos` takes.
#[derive(Debug, Deserialize)]
pub struct NewTodo {
    pub title: String,
}

/// The state of one loaded build.
pub struct AppState {
    greeting: String,
    todos: Mutex<BTreeMap<u64, Todo>>,
    ticking: AtomicBool,
    ticks: AtomicU64,
}

impl Drop for AppState {
    fn drop(&mut self) {
        // Runs when the host unloads this build: the state goes with it.
        tracing::info!(version = VERSION, todos = self.todos.get_mut().map_or(0, |t| t.len()), "state released");
    }
}

/// Builds the app and its state: the host calls it once per loaded build, before any request.
pub fn app() -> Result<Router, String> {
    let greeting = std::env::var("EXAMPLE_AXUM_GREETING").unwrap_or_else(|_| "hello".to_owned());
    if greeting.is_empty() {
        return Err("EXAMPLE_AXUM_GREETING is set but empty: unset it or give a greeting".to_owned());
    }
    let state = Arc::new(AppState {
        greeting,
        todos: Mutex::new(BTreeMap::new()),
        ticking: AtomicBool::new(false),
        ticks: AtomicU64::new(0),
    });
    Ok(Router::new()
        .route("/", get(hello))
        .route("/todos", get(list).post(add))
        .route("/todos/{id}", get(one))
        .route("/whoami", get(whoami))
        .route("/slow", get(slow))
        .route("/ticker", axum::routing::post(start_ticker))
        .route("/ticks", get(ticks))
        // `any`: HTTP/2 asks to switch with CONNECT.
        .route("/ws", axum::routing::any(websocket))
        .with_state(state))
}

/// Runs when the host unloads this build, after its last request, its background tasks and
/// its state are gone.
fn unloading() {
    tracing::info!(version = VERSION, "build unloading");
}

export_handler!(name: "example-axum", version: VERSION, service: app, shutdown: unloading);

async fn hello(State(state): State<Arc<AppState>>) -> String {
    format!("{} from example-axum {VERSION}\n", state.greeting)
}

async fn list(State(state): State<Arc<AppState>>) -> Json<Vec<Todo>> {
    let todos = state.todos.lock().unwrap_or_else(PoisonError::into_inner);
    Json(todos.values().cloned().collect())
}

async fn add(State(state): State<Arc<AppState>>, Json(new): Json<NewTodo>) -> (StatusCode, Json<Todo>) {
    let mut todos = state.todos.lock().unwrap_or_else(PoisonError::into_inner);
    let id = todos.keys().next_back().map_or(1, |last| last + 1);
    let todo = Todo { id, title: new.title };
    todos.insert(id, todo.clone());
    (StatusCode::CREATED, Json(todo))
}

/// An error, as JSON.
#[derive(Debug, Serialize)]
struct Error {
    error: String,
}

async fn one(State(state): State<Arc<AppState>>, Path(id): Path<u64>) -> Result<Json<Todo>, (StatusCode, Json<Error>)> {
    let todos = state.todos.lock().unwrap_or_else(PoisonError::into_inner);
    todos.get(&id).cloned().map(Json).ok_or_else(|| (StatusCode::NOT_FOUND, Json(Error { error: format!("no to-do {id}") })))
}

/// What `/whoami` answers.
#[derive(Debug, Serialize)]
struct WhoAmI {
    peer: Option<String>,
    scheme: String,
    request_id: String,
    version: &'static str,
}

async fn whoami(cx: RequestContext) -> Json<WhoAmI> {
    Json(WhoAmI {
        peer: cx.peer_addr().map(|a| a.to_string()),
        scheme: cx.scheme().to_string(),
        request_id: cx.request_id().to_string(),
        version: VERSION,
    })
}

#[derive(Debug, Deserialize)]
struct Wait {
    ms: u64,
}

async fn slow(Query(wait): Query<Wait>) -> String {
    handler_api::sleep(Duration::from_millis(wait.ms.min(10_000))).await;
    format!("waited {} ms\n", wait.ms)
}

async fn start_ticker(State(state): State<Arc<AppState>>) -> &'static str {
    if state.ticking.swap(true, Ordering::AcqRel) {
        return "already ticking\n";
    }
    // The task holds the state: the host drops the task when this build is unloaded, and the
    // state goes with it.
    drop(handler_api::spawn(async move {
        let _stopped = TickerStopped;
        loop {
            handler_api::sleep(Duration::from_millis(10)).await;
            state.ticks.fetch_add(1, Ordering::Relaxed);
        }
    }));
    "ticking\n"
}

/// Logs when the ticker's task is dropped.
struct TickerStopped;

impl Drop for TickerStopped {
    fn drop(&mut self) {
        tracing::info!(version = VERSION, "ticker stopped");
    }
}

async fn ticks(State(state): State<Arc<AppState>>) -> String {
    format!("{}\n", state.ticks.load(Ordering::Relaxed))
}

/// A WebSocket echo. axum's own `WebSocketUpgrade` needs hyper's connection, which a plugin
/// does not have; handler-api's `Upgrade` switches protocols through the host instead, and
/// tungstenite runs over the connection it lends.
async fn websocket(upgrade: Option<Upgrade>, headers: HeaderMap) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let Some(upgrade) = upgrade.filter(|u| u.protocol().eq_ignore_ascii_case("websocket")) else {
        return (StatusCode::UPGRADE_REQUIRED, [("upgrade", "websocket")], "connect with a WebSocket client\n").into_response();
    };
    // HTTP/1.1 proves the handshake with the key; HTTP/2's extended CONNECT has none.
    let accept_key = match headers.get("sec-websocket-key") {
        Some(key) => Some(derive_accept_key(key.as_bytes())),
        None if upgrade.is_http2() => None,
        None => return (StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key\n").into_response(),
    };
    let mut res = upgrade.accept(|io| async move {
        let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
        while let Some(Ok(message)) = ws.next().await {
            if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
                break;
            }
        }
    });
    if let Some(Ok(key)) = accept_key.map(|k| axum::http::HeaderValue::from_str(&k)) {
        res.headers_mut().insert("sec-websocket-accept", key);
    }
    res.into_response()
}

#[cfg(test)]
mod tests {
    use handler_api::testing::TestHost;
    use handler_api::{Body, Request};

    use super::*;

    fn post_json(path: &str, json: &str) -> Request {
        Request::post(path).header("content-type", "application/json").body(Body::from(json.to_owned())).unwrap()
    }

    #[tokio::test]
    async fn greets_with_its_version() {
        let host = TestHost::service(app().unwrap());
        let res = host.get("/").await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.text(), format!("hello from example-axum {VERSION}\n"));
    }

    #[tokio::test]
    async fn todos_are_added_listed_and_found() {
        let host = TestHost::service(app().unwrap());
        let res = host.request(post_json("/todos", r#"{"title":"swap the build"}"#)).await;
        assert_eq!(res.status(), 201, "{}", res.text());
        assert_eq!(res.text(), r#"{"id":1,"title":"swap the build"}"#);
        assert_eq!(res.header("content-type"), Some("application/json"));
        assert_eq!(host.get("/todos").await.text(), r#"[{"id":1,"title":"swap the build"}]"#);
        assert_eq!(host.get("/todos/1").await.status(), 200);
        let missing = host.get("/todos/9").await;
        assert_eq!((missing.status(), missing.text()), (StatusCode::NOT_FOUND, r#"{"error":"no to-do 9"}"#.to_owned()));
        let bad = host.request(post_json("/todos", "{")).await;
        assert_eq!(bad.status(), 400, "{}", bad.text());
    }

    #[tokio::test]
    async fn each_app_has_its_own_state() {
        let first = TestHost::service(app().unwrap());
        first.request(post_json("/todos", r#"{"title":"a"}"#)).await;
        let second = TestHost::service(app().unwrap());
        assert_eq!(second.get("/todos").await.text(), "[]");
    }

    #[tokio::test]
    async fn the_websocket_route_asks_for_an_upgrade() {
        let host = TestHost::service(app().unwrap());
        let res = host.get("/ws").await;
        assert_eq!((res.status(), res.header("upgrade")), (StatusCode::UPGRADE_REQUIRED, Some("websocket")));
    }

    #[tokio::test]
    async fn the_ticker_counts_in_the_background() {
        let host = TestHost::service(app().unwrap());
        assert_eq!(host.post("/ticker", "").await.text(), "ticking\n");
        assert_eq!(host.post("/ticker", "").await.text(), "already ticking\n");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let ticks: u64 = host.get("/ticks").await.text().trim().parse().unwrap();
        assert!(ticks >= 2, "{ticks} ticks in 100 ms");
    }

    #[tokio::test]
    async fn the_request_context_and_the_host_s_timer_work_in_tests() {
        let host = TestHost::service(app().unwrap());
        let who = host.get("/whoami").await.text();
        assert!(who.contains(r#""peer":"127.0.0.1:40000""#) && who.contains(r#""scheme":"http""#), "{who}");
        let started = std::time::Instant::now();
        assert_eq!(host.get("/slow?ms=30").await.text(), "waited 30 ms\n");
        assert!(started.elapsed() >= Duration::from_millis(30));
    }
}
