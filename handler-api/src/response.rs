//! [`IntoResponse`]: what a handler may return.

use bytes::Bytes;
use http::{header, HeaderValue, StatusCode};

use crate::{Body, Response};

/// Turns a handler's return value into a [`Response`].
///
/// Implemented for responses with any body convertible into [`Body`], for text and bytes
/// (`200 OK`), a bare [`StatusCode`], `(StatusCode, T)` and `Result<T, E>` where both sides
/// implement it.
///
/// # Example
///
/// ```
/// use handler_api::{IntoResponse, Request};
/// use http::StatusCode;
///
/// async fn lookup(req: Request) -> Result<String, (StatusCode, &'static str)> {
///     let id = req.uri().query().ok_or((StatusCode::BAD_REQUEST, "missing id\n"))?;
///     Ok(format!("item {id}\n"))
/// }
/// # let _ = lookup;
/// ```
pub trait IntoResponse {
    /// Performs the conversion.
    fn into_response(self) -> Response;
}

impl<B: Into<Body>> IntoResponse for http::Response<B> {
    fn into_response(self) -> Response {
        self.map(Into::into)
    }
}

fn text(body: Body) -> Response {
    let mut res = Response::new(body);
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    res
}

impl IntoResponse for &'static str {
    fn into_response(self) -> Response {
        text(self.into())
    }
}

impl IntoResponse for String {
    fn into_response(self) -> Response {
        text(self.into())
    }
}

impl IntoResponse for Bytes {
    fn into_response(self) -> Response {
        let mut res = Response::new(Body::from(self));
        res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
        res
    }
}

impl IntoResponse for Vec<u8> {
    fn into_response(self) -> Response {
        Bytes::from(self).into_response()
    }
}

impl IntoResponse for Body {
    fn into_response(self) -> Response {
        Response::new(self)
    }
}

impl IntoResponse for StatusCode {
    fn into_response(self) -> Response {
        let mut res = Response::new(Body::empty());
        *res.status_mut() = self;
        res
    }
}

impl<T: IntoResponse> IntoResponse for (StatusCode, T) {
    fn into_response(self) -> Response {
        let mut res = self.1.into_response();
        *res.status_mut() = self.0;
        res
    }
}

impl<T: IntoResponse, E: IntoResponse> IntoResponse for Result<T, E> {
    fn into_response(self) -> Response {
        match self {
            Ok(t) => t.into_response(),
            Err(e) => e.into_response(),
        }
    }
}
