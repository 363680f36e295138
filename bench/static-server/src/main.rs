//! `static-server`: the baseline for benchmarking hotswap.
//!
//! It serves the example handler's routes from a plain hyper server. The handler is compiled
//! in, so there is no dlopen, no C ABI, no generations and no connection migration. Apart from
//! that it serves the same way `hotswap serve` does. It accepts on a current_thread runtime
//! and serves each connection on a multi-thread runtime with `--workers` threads, using
//! hyper-util's auto builder (HTTP/1.1 keep-alive, HTTP/2 prior knowledge) and TCP_NODELAY.
//! Any difference between the two servers is therefore what the plugin design costs.
//!
//! The handler still uses handler-api's services (`handler_api::sleep` for throttled
//! downloads), which a plugin gets from the host's table in `init`. Linked as an rlib, the
//! handler shares this process's handler-api, so at startup `handler_api::testing::install`
//! gives it an in-process table instead: timers and blocking work on the tokio runtime that
//! polls the request, as in hotswap. The handler's `tracing` events come straight to this
//! process's subscriber. Requests never cross the C ABI: `example_handler::app` is called as an
//! ordinary Rust function. Each request gets what hotswap gives it: a `RequestContext` in its
//! extensions, and the offer of a switch of protocols (WebSockets, HTTP/1.1 `Upgrade` or
//! HTTP/2 extended CONNECT), whose session runs on the connection as in hotswap.

use std::convert::Infallible;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::Parser;
use handler_api::{Body, RequestContext, RequestId};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::EnvFilter;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The example handler, compiled in and served without hotswap: the benchmark baseline.
#[derive(Debug, Parser)]
#[command(name = "static-server", version)]
struct Args {
    /// Address to listen on. Port 0 picks a free port; the log says which.
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,

    /// Worker threads serving connections (default: one per CPU).
    #[arg(long)]
    workers: Option<usize>,
}

fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::stderr().is_terminal();
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();

    let workers = args.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let serving = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.max(1))
        .thread_name("static-worker")
        .enable_all()
        .build()?;
    let accepting = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    handler_api::testing::install();
    accepting.block_on(async {
        let listener = TcpListener::bind(args.listen).await?;
        tracing::info!(workers, "listening on http://{}", listener.local_addr()?);
        accept_loop(listener, serving.handle()).await
    })?;
    serving.shutdown_timeout(Duration::from_secs(1));
    tracing::info!("shut down");
    Ok(())
}

/// Hands each connection to the serving runtime until SIGTERM or SIGINT.
async fn accept_loop(listener: TcpListener, serving: &Handle) -> Result<(), BoxError> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        match accepted {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                match stream.into_std() {
                    Ok(stream) => drop(serving.spawn(serve(stream))),
                    Err(e) => tracing::debug!("dropping connection: {e}"),
                }
            }
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    tracing::info!("received a signal: shutting down");
    Ok(())
}

/// Serves one connection, on the serving runtime (whose reactor the socket joins here).
async fn serve(stream: std::net::TcpStream) {
    let stream = match TcpStream::from_std(stream) {
        Ok(s) => s,
        Err(e) => return tracing::debug!("dropping connection: {e}"),
    };
    // What hotswap gives every request: its context, and switches of protocols.
    let (peer, local) = (stream.peer_addr().ok(), stream.local_addr().ok());
    let service = service_fn(move |mut req: http::Request<Incoming>| async move {
        let on_upgrade = upgrade_protocol(&req).map(|(protocol, http2)| {
            let on_upgrade = hyper::upgrade::on(&mut req);
            (protocol, http2, on_upgrade)
        });
        let mut req = req.map(|body| Body::from_stream(body.into_data_stream()));
        let id = RequestId(NEXT_ID.fetch_add(1, Ordering::Relaxed));
        req.extensions_mut().insert(RequestContext::new(peer, local, http::uri::Scheme::HTTP, id));
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
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http2().enable_connect_protocol();
    if let Err(e) = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).await {
        tracing::debug!("connection ended with an error: {e}");
    }
}

/// Request ids, as hotswap gives them.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

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
