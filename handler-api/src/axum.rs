//! With the `axum` feature: handler-api's types in axum's hands, and back.
//!
//! A `Router` needs nothing of this to run as a plugin: `export_handler!(…, service: app)`
//! takes it as it is (see [`export_handler!`](crate::export_handler)). This feature adds what
//! an axum app reaches for inside its handlers:
//!
//! - [`RequestContext`] and [`Upgrade`] as extractors: `async fn h(cx: RequestContext)`.
//! - [`Body`] as an axum response, and axum's body as a [`Body`], so that a handler written
//!   for one answers in the other's terms.
//!
//! ```toml
//! [dependencies]
//! handler-api = { version = "0.1", features = ["axum"] }
//! axum = { version = "0.8", default-features = false, features = ["json"] }
//! ```
//!
//! # Example
//!
//! ```
//! use axum::routing::get;
//! use axum::Router;
//! use handler_api::RequestContext;
//!
//! async fn whoami(cx: RequestContext) -> String {
//!     format!("request {} from {:?}\n", cx.request_id(), cx.peer_addr())
//! }
//!
//! fn app() -> Result<Router, std::convert::Infallible> {
//!     Ok(Router::new().route("/whoami", get(whoami)))
//! }
//!
//! handler_api::export_handler!(name: "whoami", version: "1.0.0", service: app);
//! ```

use axum_core::extract::{FromRequestParts, OptionalFromRequestParts};
use axum_core::response::{IntoResponse, Response};
use http::request::Parts;
use http::StatusCode;

use crate::upgrade::Upgrade;
use crate::{Body, RequestContext};

/// Every request served by hotswap (or by `handler_api::testing`) carries one; a request
/// that does not is answered `500`.
impl<S: Sync> FromRequestParts<S> for RequestContext {
    type Rejection = (StatusCode, &'static str);

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<RequestContext>().cloned().ok_or((
            StatusCode::INTERNAL_SERVER_ERROR,
            "this request has no RequestContext: it was not served by hotswap or handler_api::testing\n",
        ))
    }
}

/// A request that does not ask to switch protocols (or that the host cannot switch) is
/// answered `426 Upgrade Required`.
impl<S: Sync> FromRequestParts<S> for Upgrade {
    type Rejection = (StatusCode, &'static str);

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.remove::<Upgrade>().ok_or((StatusCode::UPGRADE_REQUIRED, "this endpoint switches protocols: ask for an upgrade\n"))
    }
}

/// `Option<RequestContext>`: `None` for a request made without one.
impl<S: Sync> OptionalFromRequestParts<S> for RequestContext {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<RequestContext>().cloned())
    }
}

/// `Option<Upgrade>`: one route that serves plain requests and switches those that ask. (Over
/// HTTP/2, a switch arrives as a CONNECT request: route it with `any`, or `on` with
/// `MethodFilter::CONNECT`, beside `get`.)
impl<S: Sync> OptionalFromRequestParts<S> for Upgrade {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.remove::<Upgrade>())
    }
}

impl IntoResponse for Body {
    fn into_response(self) -> Response {
        Response::new(axum_core::body::Body::new(self))
    }
}

impl From<axum_core::body::Body> for Body {
    fn from(body: axum_core::body::Body) -> Body {
        Body::new(body)
    }
}
