//! `static-axum`: the axum example's Router (`examples/axum-app`) compiled into a plain hyper
//! server, as axum's own server would run it: the baseline for hotswap serving the same app as
//! a plugin (bench section i). See the crate's library for what it shares with hotswap.

use clap::Parser;
use handler_api::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use static_server::{context, serve_connection, Args, BoxError};
use tokio::net::TcpStream;

fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    // Built once, as hotswap builds it once per loaded build.
    let router = example_axum::app()?;
    static_server::run(args, move |stream| serve(stream, router.clone()))
}

/// Serves one connection with the Router.
async fn serve(stream: TcpStream, router: axum::Router) {
    let (peer, local) = (stream.peer_addr().ok(), stream.local_addr().ok());
    let service = service_fn(move |req: http::Request<Incoming>| {
        let mut req = req.map(|body| Body::from_stream(body.into_data_stream()));
        req.extensions_mut().insert(context(peer, local));
        tower::ServiceExt::oneshot(router.clone(), req)
    });
    serve_connection(stream, service).await;
}
