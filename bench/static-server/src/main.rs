//! `static-server`: the baseline for benchmarking hotswap.
//!
//! It serves the example handler's routes from a plain hyper server (see the crate's library
//! for how, and what it shares with hotswap). Requests never cross the C ABI:
//! `example_handler::app` is called as an ordinary Rust function. Each request also gets the
//! offer of a switch of protocols (WebSockets, HTTP/1.1 `Upgrade` or HTTP/2 extended
//! CONNECT), whose session runs on the connection as in hotswap.

use std::convert::Infallible;

use clap::Parser;
use handler_api::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use static_server::{context, serve_connection, Args, BoxError};
use tokio::net::TcpStream;

fn main() -> Result<(), BoxError> {
    static_server::run(Args::parse(), serve)
}

/// Serves one connection with the example handler.
async fn serve(stream: TcpStream) {
    let (peer, local) = (stream.peer_addr().ok(), stream.local_addr().ok());
    let service = service_fn(move |mut req: http::Request<Incoming>| async move {
        let on_upgrade = upgrade_protocol(&req).map(|(protocol, http2)| {
            let on_upgrade = hyper::upgrade::on(&mut req);
            (protocol, http2, on_upgrade)
        });
        let mut req = req.map(|body| Body::from_stream(body.into_data_stream()));
        req.extensions_mut().insert(context(peer, local));
        let on_upgrade = on_upgrade.map(|(protocol, http2, on_upgrade)| {
            handler_api::testing::offer_upgrade(&mut req, &protocol, http2);
            on_upgrade
        });
        let mut res = example_handler::app(req).await;
        if let (Some(on_upgrade), Some(session)) = (on_upgrade, handler_api::testing::accepted_session(&mut res)) {
            tokio::spawn(async move {
                match on_upgrade.await {
                    Ok(io) => session.run(TokioIo::new(io)).await,
                    Err(e) => tracing::debug!("the switch of protocols did not happen: {e}"),
                }
            });
        }
        Ok::<_, Infallible>(res)
    });
    serve_connection(stream, service).await;
}

/// The protocol `req` asks to switch to, and whether over HTTP/2, as hotswap offers it.
fn upgrade_protocol(req: &http::Request<Incoming>) -> Option<(String, bool)> {
    req.extensions().get::<hyper::upgrade::OnUpgrade>()?;
    if req.version() >= http::Version::HTTP_2 {
        return req.extensions().get::<hyper::ext::Protocol>().map(|p| (p.as_str().to_owned(), true));
    }
    let asks = req.headers().get_all(http::header::CONNECTION).iter().any(|value| {
        value.to_str().is_ok_and(|v| v.split(',').any(|token| token.trim().eq_ignore_ascii_case("upgrade")))
    });
    let protocol = req.headers().get(http::header::UPGRADE)?.to_str().ok()?;
    asks.then(|| (protocol.to_owned(), false))
}
