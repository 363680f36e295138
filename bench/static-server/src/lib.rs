//! The plumbing of the benchmark's static servers: the binaries `static-server` (the example
//! handler) and `static-axum` (the axum example's Router), each with its app compiled in. They
//! are two binaries because each app exports the plugin declaration symbol, which one binary
//! can hold only once.
//!
//! Both serve as `hotswap serve` does, without dlopen, the C ABI, generations or connection
//! migration. They accept on a current_thread runtime and serve each connection on a
//! multi-thread runtime with `--workers` threads, using hyper-util's auto builder (HTTP/1.1
//! keep-alive, HTTP/2 prior knowledge; over TLS with `--tls-cert`, ALPN) and TCP_NODELAY. Each request gets what hotswap gives
//! it: a `RequestContext` in its extensions. Any difference between hotswap and these is
//! therefore what the plugin design costs.
//!
//! The apps use handler-api's services (`handler_api::sleep`, `spawn`), which a plugin gets
//! from the host's table in `init`. Linked as an rlib, an app shares this process's
//! handler-api, so at startup `handler_api::testing::install` gives it an in-process table:
//! timers and tasks on the tokio runtime that polls the request, as in hotswap. The apps'
//! `tracing` events come straight to this process's subscriber.

use std::future::Future;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::Parser;
use handler_api::{RequestContext, RequestId};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::EnvFilter;

/// A boxed error, for `main`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The options both servers take.
#[derive(Debug, Parser)]
#[command(version)]
pub struct Args {
    /// Address to listen on. Port 0 picks a free port; the log says which.
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,

    /// Worker threads serving connections (default: one per CPU).
    #[arg(long)]
    pub workers: Option<usize>,

    /// Serve HTTPS with this certificate chain (PEM), as `hotswap serve --tls-cert` does:
    /// rustls with the ring provider, ALPN h2 then http/1.1, session tickets.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,

    /// The key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
}

/// The TLS configuration, when serving HTTPS. A static: the apps' connection functions take
/// a plain `TcpStream` (for its addresses), and [`serve_connection`] makes the handshake.
static TLS: std::sync::OnceLock<tokio_rustls::TlsAcceptor> = std::sync::OnceLock::new();

/// The same TLS settings as hotswap's (`control::tls`), with one certificate.
fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> Result<tokio_rustls::TlsAcceptor, BoxError> {
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls::{crypto::ring, ServerConfig};
    let chain = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key)?;
    let mut config = ServerConfig::builder_with_provider(std::sync::Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.ticketer = ring::Ticketer::new()?;
    Ok(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)))
}

/// Serves `connection` for each accepted connection until SIGTERM or SIGINT.
pub fn run<C, F>(args: Args, connection: C) -> Result<(), BoxError>
where
    C: Fn(TcpStream) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::stderr().is_terminal();
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();

    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let _ = TLS.set(tls_acceptor(cert, key)?);
    }
    let scheme = if TLS.get().is_some() { "https" } else { "http" };
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
        tracing::info!(workers, "listening on {scheme}://{}", listener.local_addr()?);
        accept_loop(listener, serving.handle(), connection).await
    })?;
    serving.shutdown_timeout(Duration::from_secs(1));
    tracing::info!("shut down");
    Ok(())
}

/// Hands each connection to the serving runtime until SIGTERM or SIGINT.
async fn accept_loop<C, F>(listener: TcpListener, serving: &Handle, connection: C) -> Result<(), BoxError>
where
    C: Fn(TcpStream) -> F,
    F: Future<Output = ()> + Send + 'static,
{
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
                // Joins the serving runtime's reactor there, not the accepting one's.
                match stream.into_std() {
                    Ok(stream) => {
                        let _guard = serving.enter();
                        match TcpStream::from_std(stream) {
                            Ok(stream) => drop(serving.spawn(connection(stream))),
                            Err(e) => tracing::debug!("dropping connection: {e}"),
                        }
                    }
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

/// Serves one connection with `service`, as `hotswap serve` does: HTTP/1.1 with upgrades, or
/// HTTP/2 with extended CONNECT.
pub async fn serve_connection<S, B>(stream: TcpStream, service: S)
where
    S: hyper::service::Service<http::Request<Incoming>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http2().enable_connect_protocol();
    // Over TLS, an HTTP/2 client (ALPN h2) sends the preface too, which the builder detects.
    let served = match TLS.get() {
        Some(tls) => match tls.accept(stream).await {
            Ok(stream) => builder.serve_connection_with_upgrades(TokioIo::new(stream), service).await,
            Err(e) => return tracing::debug!("TLS handshake failed: {e}"),
        },
        None => builder.serve_connection_with_upgrades(TokioIo::new(stream), service).await,
    };
    if let Err(e) = served {
        tracing::debug!("connection ended with an error: {e}");
    }
}

/// The context hotswap gives a request on a connection from `peer` to `local`, with the next
/// request id.
pub fn context(peer: Option<SocketAddr>, local: Option<SocketAddr>) -> RequestContext {
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let scheme = if TLS.get().is_some() { http::uri::Scheme::HTTPS } else { http::uri::Scheme::HTTP };
    RequestContext::new(peer, local, scheme, RequestId(NEXT_ID.fetch_add(1, Ordering::Relaxed)))
}
