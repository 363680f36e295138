//! A [`tower::Service`] as the plugin's handler: an axum `Router`, or any tower stack.
//!
//! `export_handler!(…, service: make)` builds the service in `init`, once per generation, and
//! keeps it until `shutdown`, when it is dropped on one of the generation's threads (so what
//! it owns, a pool or a cache, is released with its build). Each request gets a clone of it,
//! made ready and called once, as hyper-util and axum's own server do.

use std::ffi::c_void;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::task::{Context, Poll};

use tower::util::Oneshot;
use tower::{Service, ServiceExt};

use crate::abi::{FfiRequest, FfiResponseFuture};
use crate::{Body, BoxError, Handler, IntoResponse, Request, Response};

/// A service as a [`Handler`]: each request is handed to a clone of it.
pub(crate) struct ServiceHandler<S> {
    service: S,
}

impl<S> ServiceHandler<S> {
    pub(crate) fn new(service: S) -> ServiceHandler<S> {
        ServiceHandler { service }
    }
}

impl<S, B> Handler for ServiceHandler<S>
where
    S: Service<Request, Response = http::Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Future = ServiceFuture<S>;

    fn call(&self, req: Request) -> ServiceFuture<S> {
        ServiceFuture { inner: self.service.clone().oneshot(req) }
    }
}

pin_project_lite::pin_project! {
    /// A request in a service's hands; its response, with the body as a [`Body`].
    pub struct ServiceFuture<S: Service<Request>> {
        #[pin]
        inner: Oneshot<S, Request>,
    }
}

impl<S, B> Future for ServiceFuture<S>
where
    S: Service<Request, Response = http::Response<B>>,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Response;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Response> {
        self.project().inner.poll(cx).map(|answered| match answered {
            Ok(response) => response.map(Body::new),
            Err(e) => {
                let e: BoxError = e.into();
                tracing::error!(target: "handler_api::service", "the service failed: {e}; answered 500");
                http::StatusCode::INTERNAL_SERVER_ERROR.into_response()
            }
        })
    }
}

/// The service built by `init`: type-erased, since the static holding it cannot name its type.
struct Installed {
    handler: *mut c_void,
    /// `handle` for the handler's type.
    handle: unsafe fn(*const c_void, *const FfiRequest) -> FfiResponseFuture,
    /// Drops the handler.
    drop: unsafe fn(*mut c_void),
}

// SAFETY: `handler` points at a `ServiceHandler<S>` with `S: Send + Sync` (the bounds of
// `install`), used through `&` by any thread and dropped by one.
unsafe impl Send for Installed {}
// SAFETY: as for Send.
unsafe impl Sync for Installed {}

/// Set by `init`, taken by `shutdown`: this copy of the library's service. Each generation is
/// a copy of the library, with statics of its own.
static INSTALLED: AtomicPtr<Installed> = AtomicPtr::new(std::ptr::null_mut());

/// Builds the service with `make` and keeps it for [`handle`]. `init` of the declaration calls
/// it once, before any request.
pub fn install<M, S, E, B>(make: M) -> Result<(), E>
where
    M: FnOnce() -> Result<S, E>,
    S: Service<Request, Response = http::Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Error: Into<BoxError>,
{
    /// # Safety
    /// `handler` must come from `install` for this `H`, and not be dropped yet.
    unsafe fn handle_as<H: Handler>(handler: *const c_void, request: *const FfiRequest) -> FfiResponseFuture {
        // SAFETY: the caller guarantees the type, and that the handler is alive.
        let handler = unsafe { &*(handler as *const H) };
        // SAFETY: forwarded from the caller of `handle`.
        unsafe { crate::export::handle(handler, request) }
    }
    /// # Safety
    /// `handler` must come from `install` for this `H`, and not be used again.
    unsafe fn drop_as<H>(handler: *mut c_void) {
        // SAFETY: made by `Box::into_raw` in `install`, for this type.
        drop(unsafe { Box::from_raw(handler as *mut H) });
    }
    let handler = Box::new(ServiceHandler::new(make()?));
    let installed = Box::new(Installed {
        handler: Box::into_raw(handler) as *mut c_void,
        handle: handle_as::<ServiceHandler<S>>,
        drop: drop_as::<ServiceHandler<S>>,
    });
    let installed = Box::into_raw(installed);
    if INSTALLED.compare_exchange(std::ptr::null_mut(), installed, Ordering::AcqRel, Ordering::Acquire).is_err() {
        // Not reached in a plugin, whose `init` runs once. The first service stays: requests
        // may be using it.
        // SAFETY: made just above, never shared.
        unsafe { drop_installed(installed) };
    }
    Ok(())
}

/// `handle` of a declaration with a service: hands the request to the installed service.
///
/// # Safety
/// As for [`crate::export::handle`]; and `shutdown` must not have run.
pub unsafe fn handle(request: *const FfiRequest) -> FfiResponseFuture {
    let installed = INSTALLED.load(Ordering::Acquire);
    if installed.is_null() {
        // Not reached: the host calls `handle` only after `init` has succeeded.
        let unready = |_: Request| async { (http::StatusCode::SERVICE_UNAVAILABLE, "the service is not built yet\n") };
        // SAFETY: forwarded from the caller.
        return unsafe { crate::export::handle(&unready, request) };
    }
    // SAFETY: set by `install` and only taken by `shutdown`, which the host calls after the
    // last request has ended.
    let installed = unsafe { &*installed };
    // SAFETY: `handle` and `handler` were made together by `install`; forwarded from the caller.
    unsafe { (installed.handle)(installed.handler, request) }
}

/// Drops the installed service, if any: `shutdown` of the declaration calls it, on one of the
/// generation's threads, after the last request has ended.
///
/// # Safety
/// No request may be running, nor start afterwards: `handle` uses the service in place.
pub unsafe fn uninstall() {
    let installed = INSTALLED.swap(std::ptr::null_mut(), Ordering::AcqRel);
    // SAFETY: taken out of `INSTALLED`, so dropped once; no request is running any more.
    unsafe { drop_installed(installed) };
}

/// # Safety
/// `installed` must be null or come from `install`, and not be used again.
unsafe fn drop_installed(installed: *mut Installed) {
    if installed.is_null() {
        return;
    }
    // SAFETY: made by `Box::into_raw` in `install`.
    let installed = unsafe { Box::from_raw(installed) };
    // SAFETY: `drop` and `handler` were made together by `install`.
    unsafe { (installed.drop)(installed.handler) };
}
