//! Write request handlers for **hotswap**, the HTTP server that swaps its handler while it runs.
//!
//! A handler is ordinary async Rust over the [`http`] crate's types: it takes a [`Request`]
//! whose body streams in from the client and returns anything that implements
//! [`IntoResponse`], such as a [`Response`] whose body streams out. One
//! [`export_handler!`] line turns the crate into a plugin that hotswap loads, and replaces
//! without a restart when a new build appears.
//!
//! ```
//! use handler_api::{export_handler, Body, IntoResponse, Request, Response};
//! use http::{Method, StatusCode};
//!
//! async fn app(req: Request) -> Response {
//!     match (req.method(), req.uri().path()) {
//!         (&Method::GET, "/") => "hello from a plugin\n".into_response(),
//!         (&Method::POST, "/echo") => Response::new(req.into_body()),
//!         _ => (StatusCode::NOT_FOUND, "not found\n").into_response(),
//!     }
//! }
//!
//! export_handler!(name: "hello", version: "1.0.0", handler: app);
//! ```
//!
//! with, in `Cargo.toml`:
//!
//! ```toml
//! [lib]
//! crate-type = ["cdylib"]
//! ```
//!
//! # axum, and any tower service
//!
//! An axum `Router`, or any [`tower::Service`], is a handler too: give `export_handler!` the
//! function that builds it, and it runs when the host loads your build, so its state belongs
//! to that build:
//!
//! ```
//! use axum::{routing::get, Router};
//!
//! fn app() -> Result<Router, std::convert::Infallible> {
//!     Ok(Router::new().route("/", get(|| async { "hello from axum\n" })))
//! }
//!
//! handler_api::export_handler!(name: "hello-axum", version: "1.0.0", service: app);
//! ```
//!
//! Any `http_body::Body` answers ([`Body::new`]), and keeps its `Content-Length`. The `axum`
//! feature adds extractors for [`RequestContext`] and [`upgrade::Upgrade`] (module `axum`).
//!
//! # State across swaps
//!
//! A build can hand state (a counter, a warm cache) to the build that replaces it:
//! `export_handler!(…, state: (export_state, import_state))`; see [`state`].
//!
//! # What runs where
//!
//! The host owns the sockets, the runtime and the threads. Your code runs on threads that
//! belong to your plugin's *generation* (one loaded copy of the library), and the host joins
//! them before it unloads the library, so `thread_local!`, `tracing` and
//! `std::thread::current()` are safe to use. Do not start threads or a runtime yourself:
//! use [`spawn`] for background tasks, [`sleep`] and [`timeout`] for timers, and
//! [`spawn_blocking`] for blocking work such as file reads. tokio's own runtime services do
//! not exist in a plugin: `tokio::spawn`, `tokio::time::sleep` or `timeout`,
//! `tokio::task::spawn_blocking` panic there (the request is answered `500`, and the host's
//! log names the replacement). tokio's I/O traits, channels and locks work, as does
//! everything that needs no runtime.
//! A thread your code starts anyway (directly, or through a crate such as a blocking HTTP
//! client or a pool) keeps your build loaded until it exits: the host never unloads a library
//! while a thread it did not start may run its code, and after a few seconds leaves it loaded
//! for good, with a warning. Stop such threads in your `shutdown` hook.
//!
//! Each request runs on the generation that was current when it started, until its response
//! body has ended, even if a newer build has been swapped in since. Global state (statics,
//! `OnceLock`s) belongs to one generation: a new build starts with fresh statics.
//!
//! Library constructors and destructors (C++ globals, `.init_array`, crates that register
//! them) run before anything can check your build: the host runs them first in a short-lived
//! probe process, and refuses the build if they crash, exit or hang there. So they run twice
//! per load, once in that process: keep their effects inside the process. Do the real setup
//! in `init`. Destructors run again in the host when your build unloads: one that hangs there
//! holds the dynamic loader's lock for good, and the host exits (status 70) for its service
//! manager to restart it, so keep them short.
//!
//! # What a request carries
//!
//! Besides its head and body, each request has a [`RequestContext`] in its extensions: the
//! client's and the host's addresses, the scheme, and the request's id, which the host's log
//! lines about it carry. A request body's trailers are there once it has been read
//! ([`Body::trailers`]).
//!
//! # WebSockets and other upgrades
//!
//! A request that asks to switch protocols (HTTP/1.1 `Upgrade`, HTTP/2 extended CONNECT)
//! carries an [`upgrade::Upgrade`]; accept it, and a function of yours runs on the
//! connection's byte stream, which implements the async I/O traits WebSocket libraries take.
//! It stays on your build until it ends, across swaps; [`superseded`] tells it when a newer
//! build serves new requests, so it can close politely. See [`upgrade`].
//!
//! # Errors and panics
//!
//! A panic in a handler becomes a `500 Internal Server Error` and an error line in the host's
//! log; a panic (or an `Err` chunk) while a body streams aborts that one response, so the
//! client sees a broken transfer rather than a truncated body that looks complete. Other
//! requests and the host are unaffected. That needs panics that unwind: a build with
//! `panic = "abort"` in its profile (or `-C panic=abort`) would take the whole host down at its
//! first panic, so the host refuses to load it, saying which setting to change.
//!
//! # Logging
//!
//! Use `tracing` as usual: events reach the host's log tagged with the plugin's name and
//! version, and, inside spans, with their context as a `spans` field
//! (`spans=request{id=7}:db{table="users"}`), filtered by the host's `--log-level`: install
//! no subscriber of your own (there is one per process, and handler-api's is in place before
//! your `init` runs). Records of the `log` crate (which many libraries use) reach it the same
//! way, from the end of your `init` on (install no logger of your own, or those records go to
//! yours).
//!
//! # Testing
//!
//! With the `testing` feature, `handler_api::testing::TestHost` calls your handler or service
//! in `cargo test` the way hotswap does, with [`sleep`] and [`spawn_blocking`] working on the
//! test's tokio runtime:
//!
//! ```ignore
//! #[tokio::test]
//! async fn greets() {
//!     let host = handler_api::testing::TestHost::service(app().unwrap());
//!     assert_eq!(host.get("/").await.text(), "hello from axum\n");
//! }
//! ```
//!
//! # Under the hood
//!
//! Only `extern "C"` functions and `#[repr(C)]` data (module [`abi`]) cross between plugin and
//! host, so a plugin built by another compiler version works. The host checks the ABI
//! version and a fingerprint of every boundary type's layout before it calls anything.

#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod abi;
#[cfg(feature = "axum")]
pub mod axum;
mod body;
mod context;
#[doc(hidden)]
pub mod export;
mod log;
mod response;
mod service;
mod services;
pub mod state;
pub mod upgrade;
#[cfg(feature = "testing")]
pub mod testing;
#[cfg(feature = "tokio-host")]
pub mod tokio_host;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::task::{Context, Poll};

pub use body::Body;
pub use context::{RequestContext, RequestId};
pub use response::IntoResponse;
pub use services::{
    sleep, spawn, spawn_blocking, superseded, timeout, BlockingError, Elapsed, JoinHandle, Sleep, Superseded, Task, TaskError,
};

#[doc(hidden)]
pub use export as __private;

/// An HTTP request with a streaming [`Body`].
pub type Request<B = Body> = http::Request<B>;

/// An HTTP response with a streaming [`Body`].
pub type Response<B = Body> = http::Response<B>;

/// A boxed error, as carried by body chunks.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Something that can handle requests: implemented for every
/// `async fn(Request) -> impl IntoResponse` (and closures of that shape) that is
/// `Send + Sync + 'static`.
///
/// The bounds exist because the host may run requests on several threads at once and keeps
/// the handler for as long as the plugin is loaded.
pub trait Handler: Send + Sync + 'static {
    /// The future [`call`](Handler::call) returns.
    type Future: Future<Output = Response> + Send + 'static;

    /// Starts handling `req`.
    fn call(&self, req: Request) -> Self::Future;
}

impl<F, Fut, R> Handler for F
where
    F: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = R> + Send + 'static,
    R: IntoResponse,
{
    type Future = HandlerFuture<Fut>;

    fn call(&self, req: Request) -> Self::Future {
        HandlerFuture { inner: self(req) }
    }
}

pin_project_lite::pin_project! {
    /// The future of a handler function: its output, turned into a [`Response`].
    pub struct HandlerFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F, R> Future for HandlerFuture<F>
where
    F: Future<Output = R>,
    R: IntoResponse,
{
    type Output = Response;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Response> {
        self.project().inner.poll(cx).map(IntoResponse::into_response)
    }
}

/// The host's table of services, set by `init` (or, in-process, by `testing::install`).
static HOST: AtomicPtr<abi::HostApi> = AtomicPtr::new(std::ptr::null_mut());

fn try_host() -> Option<&'static abi::HostApi> {
    let ptr = HOST.load(Ordering::Acquire);
    // SAFETY: set by `init` (or `import_state`) to the plugin's copy of the host's table, or by
    // `testing::install` to a `static`: both live as long as the process.
    (!ptr.is_null()).then(|| unsafe { &*ptr })
}

#[track_caller]
fn host() -> &'static abi::HostApi {
    try_host().expect(
        "handler-api used outside a plugin loaded by the hotswap host \
         (in-process, call handler_api::testing::install first: feature `testing`)",
    )
}
