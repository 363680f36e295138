//! The HTTP server: accepting connections, serving them on the threads of the current
//! generation, and moving them to a newer generation at a request boundary.
//!
//! ## Where a connection runs
//!
//! The listener lives on the host's own runtime. Each accepted socket is handed to the
//! current generation's runtime, which registers it with its own reactor and serves it with
//! hyper (HTTP/1.1 with keep-alive, or HTTP/2 with prior knowledge, detected per
//! connection). An HTTP/1 request is handed to the plugin, and its response polled, inline on
//! that connection's task: a request costs no hop between threads.
//!
//! When a newer generation becomes current, every connection of the old one is told
//! (`Generation::superseded`). A connection with no HTTP/1 request in progress moves at once:
//! its task ends on the old runtime and the same hyper connection future is spawned on the
//! new one, where the socket re-registers with the new reactor on its next poll
//! (`MigratingStream`). A connection busy with a response (a long download) finishes it on
//! the old generation and moves right after. No client reconnects and nothing is closed.
//!
//! HTTP/2 streams are spawned by hyper through `StreamExecutor` onto the runtime of the
//! generation the stream was routed to, and the plugin sees the request there, so a stream in
//! progress never holds its connection (or its other streams) back.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper::server::conn::{http1, http2};
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::bridge::{self, BodyError, CallError, PluginCall, ResponseBody};
use crate::cli::HttpLimits;
use crate::generation::{thread_generation, Generation};
use crate::latch::{Latch, Waiter};
use crate::limits::{Activity, Expiry, Sweeper};
use crate::registry::Registry;

/// State shared by the accept loop and every connection.
pub struct Server {
    registry: Arc<Registry>,
    shutdown: Arc<Latch>,
    limits: HttpLimits,
    sweeper: Arc<Sweeper>,
    /// One permit per connection that may be open at once.
    slots: Arc<Semaphore>,
    connections: AtomicUsize,
    all_closed: Notify,
}

impl Server {
    /// A server for `registry`'s generations. The timeout sweeper runs on the calling runtime
    /// (the host's own) until `shutdown`.
    pub fn new(registry: Arc<Registry>, limits: HttpLimits, shutdown: Arc<Latch>) -> Arc<Server> {
        let sweeper = Sweeper::new(limits.header_read_timeout, limits.idle_timeout);
        tokio::spawn(sweeper.clone().run(shutdown.token().clone()));
        let max = usize::try_from(limits.max_connections).unwrap_or(usize::MAX).min(Semaphore::MAX_PERMITS);
        let slots = Arc::new(Semaphore::new(max));
        Arc::new(Server {
            registry,
            shutdown,
            limits,
            sweeper,
            slots,
            connections: AtomicUsize::new(0),
            all_closed: Notify::new(),
        })
    }

    /// Accepts connections until shutdown is requested. At `--max-connections`, it stops
    /// accepting until one closes: further clients wait in the listen backlog.
    pub async fn accept_loop(self: &Arc<Self>, listener: TcpListener) {
        loop {
            let slot = tokio::select! {
                s = self.slots.clone().acquire_owned() => s,
                () = self.shutdown.token().cancelled() => break,
            };
            let Ok(slot) = slot else { break }; // the semaphore is never closed
            if self.slots.available_permits() == 0 {
                tracing::debug!(max = self.limits.max_connections, "connection limit reached: new clients wait in the backlog");
            }
            let accepted = tokio::select! {
                r = listener.accept() => r,
                () = self.shutdown.token().cancelled() => break,
            };
            match accepted {
                Ok((stream, peer)) => self.hand_over(stream, peer, slot),
                Err(e) => {
                    // Typically EMFILE: wait instead of spinning; the backlog keeps the rest.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        tracing::info!("stopped accepting connections");
    }

    fn hand_over(self: &Arc<Self>, stream: TcpStream, peer: SocketAddr, slot: OwnedSemaphorePermit) {
        let _ = stream.set_nodelay(true);
        let std_stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => return tracing::debug!(%peer, "dropping connection: {e}"),
        };
        let generation = self.registry.current();
        let conn = Arc::new(ConnState {
            generation: ArcSwap::new(generation.clone()),
            next_stream: Mutex::new(None),
            activity: self.sweeper.track(),
            max_body_size: self.limits.max_body_size,
        });
        let open = OpenConnection::new(self, slot);
        let server = self.clone();
        generation.handle().spawn(async move {
            // Now on the generation's runtime: register the socket with its reactor.
            let io = match MigratingStream::new(std_stream, conn.clone()) {
                Ok(io) => io,
                Err(e) => return tracing::debug!(%peer, "dropping connection: {e}"),
            };
            let future = serve(io, conn.clone(), server.clone(), open);
            ConnTask::new(future, conn, server).await;
        });
    }

    /// Waits until every connection has closed, or `timeout` passes; returns whether all did.
    pub async fn drained(&self, timeout: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.all_closed.notified();
                if self.connections.load(Ordering::SeqCst) == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// Per-connection state, shared by its task, its socket, its service and its executor.
struct ConnState {
    /// The generation whose runtime serves this connection now.
    generation: ArcSwap<Generation>,
    /// The generation chosen by the service for the HTTP/2 stream hyper is about to spawn.
    next_stream: Mutex<Option<Arc<Generation>>>,
    /// For the header read and idle timeouts.
    activity: Arc<Activity>,
    max_body_size: u64,
}

type ConnFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The hyper connection, with graceful shutdown wired in; movable between runtimes.
fn serve(io: MigratingStream, conn: Arc<ConnState>, server: Arc<Server>, open: OpenConnection) -> ConnFuture {
    Box::pin(async move {
        let _open = open;
        let mut io = io;
        let http2 = match sniff_http2(&mut io).await {
            Ok(http2) => http2,
            Err(e) => return tracing::debug!("connection ended before its first request: {e}"),
        };
        if http2 {
            conn.activity.is_http2();
        }
        let max_header_size = usize::try_from(server.limits.max_header_size).unwrap_or(usize::MAX);
        let service = PluginService { conn: conn.clone() };
        // Both answer a request head over the limit with 431 (h2: over the advertised header
        // list size).
        let result = if http2 {
            let mut builder = http2::Builder::new(StreamExecutor { conn });
            builder.max_header_list_size(u32::try_from(max_header_size).unwrap_or(u32::MAX));
            drive(builder.serve_connection(TokioIo::new(io), service), &server.shutdown).await
        } else {
            let mut builder = http1::Builder::new();
            builder.max_header_size(max_header_size);
            drive(builder.serve_connection(TokioIo::new(io), service), &server.shutdown).await
        };
        if let Err(e) = result {
            tracing::debug!("connection ended with an error: {e}");
        }
    })
}

/// Runs a hyper connection to its end; on shutdown, lets it finish what it has started.
async fn drive<C>(connection: C, shutdown: &Latch) -> Result<(), C::Error>
where
    C: GracefulConnection,
{
    tokio::pin!(connection);
    tokio::select! {
        biased; // the connection first: it is what is usually ready
        r = connection.as_mut() => r,
        () = shutdown.raised() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    }
}

/// What an HTTP/2 client with prior knowledge (h2c) sends first; anything else is HTTP/1.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads just enough of a new connection to tell HTTP/2 from HTTP/1, and leaves what it read
/// to be read again. (hyper-util's `auto` builder does this too, but cannot limit the size of
/// an HTTP/1 request head apart from the size of hyper's read and write buffers, and a
/// 64 KiB buffer costs about 10% of streaming throughput.)
async fn sniff_http2(io: &mut MigratingStream) -> io::Result<bool> {
    use tokio::io::AsyncReadExt as _;
    let mut seen = [0u8; H2_PREFACE.len()];
    let mut len = 0;
    while len < seen.len() && H2_PREFACE.starts_with(&seen[..len]) {
        let n = io.read(&mut seen[len..]).await?;
        if n == 0 {
            break;
        }
        len += n;
    }
    io.replay = Bytes::copy_from_slice(&seen[..len]);
    Ok(seen[..len] == *H2_PREFACE)
}

/// An open connection: counted for the drain at shutdown, and holding one of the
/// `--max-connections` slots until it closes.
struct OpenConnection {
    server: Arc<Server>,
    _slot: OwnedSemaphorePermit,
}

impl OpenConnection {
    fn new(server: &Arc<Server>, slot: OwnedSemaphorePermit) -> OpenConnection {
        server.connections.fetch_add(1, Ordering::SeqCst);
        OpenConnection { server: server.clone(), _slot: slot }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        if self.server.connections.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.server.all_closed.notify_waiters();
        }
    }
}

/// Drives a connection on one generation's runtime until it ends, must be cut off (drain
/// timeout), or can move to a newer generation.
struct ConnTask {
    connection: Option<ConnFuture>,
    conn: Arc<ConnState>,
    generation: Arc<Generation>,
    server: Arc<Server>,
    /// Wake this task when its generation is superseded or aborted. They are polled only when
    /// the task's waker changes (in practice once); every poll reads the latches' flags.
    superseded: Waiter,
    aborted: Waiter,
    registered: Option<Waker>,
}

impl ConnTask {
    fn new(connection: ConnFuture, conn: Arc<ConnState>, server: Arc<Server>) -> ConnTask {
        let generation = conn.generation.load_full();
        ConnTask {
            connection: Some(connection),
            superseded: generation.superseded().waiter(),
            aborted: generation.aborted().waiter(),
            registered: None,
            generation,
            conn,
            server,
        }
    }

    /// Makes sure a raised latch wakes this task.
    fn register(&mut self, cx: &mut Context<'_>) {
        if self.registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return;
        }
        self.superseded.register(cx);
        self.aborted.register(cx);
        self.conn.activity.wake_on_expiry(cx.waker());
        self.registered = Some(cx.waker().clone());
    }
}

impl Future for ConnTask {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        this.register(cx);
        if let Some(why) = this.conn.activity.take_expiry() {
            let why = match why {
                Expiry::HeaderRead => "the request head did not arrive within the header read timeout",
                Expiry::Idle => "idle for the idle timeout",
            };
            tracing::debug!("closing a connection: {why}");
            this.connection = None;
            return Poll::Ready(());
        }
        // Before reading the next request: a request that arrives together with the news of
        // a swap must go to the new generation.
        if this.try_move() {
            return Poll::Ready(());
        }
        let Some(connection) = this.connection.as_mut() else { return Poll::Ready(()) };
        if connection.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        // And after: an HTTP/1 response may just have ended.
        if this.try_move() {
            return Poll::Ready(());
        }
        if this.generation.aborted().is_raised() && this.conn.activity.http1_busy() {
            tracing::warn!(
                generation = this.generation.id(),
                plugin = %this.generation.label(),
                "drain timeout: aborting a response still in progress"
            );
            this.connection = None; // drops the response, on this generation's thread
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

impl ConnTask {
    /// Moves the connection to the current generation if this one was superseded and no
    /// HTTP/1 request is in progress. Returns whether it moved.
    fn try_move(&mut self) -> bool {
        if !self.generation.superseded().is_raised() || self.conn.activity.http1_busy() {
            return false;
        }
        let next = self.server.registry.current();
        if next.id() == self.generation.id() {
            return false;
        }
        let Some(connection) = self.connection.take() else { return false };
        self.conn.generation.store(next.clone());
        next.handle().spawn(ConnTask::new(connection, self.conn.clone(), self.server.clone()));
        true
    }
}

/// A TCP stream that re-registers with the reactor of whichever generation's runtime polls
/// it, so its connection can move between runtimes.
struct MigratingStream {
    io: Option<TcpStream>,
    /// Bytes already read from the socket (by [`sniff_http2`]) to be read again first.
    replay: Bytes,
    /// Keeps the reactor `io` is registered with alive until it re-registers.
    registered: Arc<Generation>,
    conn: Arc<ConnState>,
}

impl MigratingStream {
    fn new(stream: std::net::TcpStream, conn: Arc<ConnState>) -> io::Result<MigratingStream> {
        let registered = conn.generation.load_full();
        Ok(MigratingStream { io: Some(TcpStream::from_std(stream)?), replay: Bytes::new(), registered, conn })
    }

    /// Notes bytes written, for the idle timeout.
    fn wrote(&self, polled: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.conn.activity.sent();
        }
        polled
    }

    fn io(&mut self) -> io::Result<Pin<&mut TcpStream>> {
        if self.registered.id() != thread_generation() {
            let target = self.conn.generation.load_full();
            if target.id() != thread_generation() {
                return Err(io::Error::other("connection polled outside its generation's runtime"));
            }
            let io = self.io.take().ok_or_else(|| io::Error::other("connection lost while moving"))?;
            // Deregister from the old reactor (still alive: `registered` holds it) and
            // register with this runtime's.
            self.io = Some(TcpStream::from_std(io.into_std()?)?);
            self.registered = target;
        }
        self.io.as_mut().map(Pin::new).ok_or_else(|| io::Error::other("connection lost while moving"))
    }
}

impl AsyncRead for MigratingStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.replay.is_empty() {
            let n = buf.remaining().min(this.replay.len());
            buf.put_slice(&this.replay.split_to(n));
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = match this.io() {
            Ok(io) => io.poll_read(cx, buf),
            Err(e) => return Poll::Ready(Err(e)),
        };
        if buf.filled().len() > before {
            this.conn.activity.received();
        }
        polled
    }
}

impl AsyncWrite for MigratingStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = match this.io() {
            Ok(io) => io.poll_write(cx, buf),
            Err(e) => return Poll::Ready(Err(e)),
        };
        this.wrote(polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = match this.io() {
            Ok(io) => io.poll_write_vectored(cx, bufs),
            Err(e) => return Poll::Ready(Err(e)),
        };
        this.wrote(polled)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().io() {
            Ok(io) => io.poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().io() {
            Ok(io) => io.poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

/// Spawns hyper's HTTP/2 stream tasks on the runtime of the generation each stream was
/// routed to, cut off if that generation's drain times out.
#[derive(Clone)]
struct StreamExecutor {
    conn: Arc<ConnState>,
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        // hyper calls the service and then, at once, spawns the stream: the generation the
        // service picked is waiting in `next_stream`.
        let generation = self.conn.next_stream.lock().unwrap_or_else(PoisonError::into_inner).take();
        match generation {
            Some(generation) => {
                let runtime = generation.handle().clone();
                runtime.spawn(async move {
                    tokio::select! {
                        biased; // the stream first: it is what is usually ready
                        _ = future => {}
                        () = generation.aborted().raised() => tracing::warn!("drain timeout: aborting an HTTP/2 stream"),
                    }
                });
            }
            None => drop(tokio::spawn(future)),
        }
    }
}

/// Routes each request to the plugin of the connection's generation.
#[derive(Clone)]
struct PluginService {
    conn: Arc<ConnState>,
}

impl hyper::service::Service<Request<Incoming>> for PluginService {
    type Response = Response<HostBody>;
    type Error = std::convert::Infallible;
    type Future = Respond;

    fn call(&self, request: Request<Incoming>) -> Respond {
        let generation = self.conn.generation.load_full();
        if request.version() < http::Version::HTTP_2 {
            return hand_to_plugin(request, RequestGuard::new(generation, self.conn.clone(), true));
        }
        // The stream's own task calls the plugin: the connection's task serves every stream,
        // and must not wait for one.
        *self.conn.next_stream.lock().unwrap_or_else(PoisonError::into_inner) = Some(generation.clone());
        Respond::Starting(Some((request, RequestGuard::new(generation, self.conn.clone(), false))))
    }
}

/// Answers one request: the plugin's response future, turned into the response for hyper;
/// counts the request (status, and time until the response head).
///
/// A named future rather than an `async fn`'s: hyper keeps it in place, where a boxed one
/// would cost an allocation per request (over a kilobyte, past glibc's fast bins).
enum Respond {
    /// An HTTP/2 request, handed to the plugin at the first poll, on the stream's task.
    Starting(Option<(Request<Incoming>, RequestGuard)>),
    Calling(Calling),
    /// Answered by the host, or taken by hyper.
    Answered(Option<Response<HostBody>>),
}

/// A request in the plugin's hands. Field order matters: the plugin's state (`call`) is
/// dropped before the generation its code lives in can be released (`guard`).
struct Calling {
    call: PluginCall,
    guard: RequestGuard,
    started: Instant,
    /// The request's method and target, for the log.
    method: http::Method,
    uri: http::Uri,
}

impl Future for Respond {
    type Output = Result<Response<HostBody>, std::convert::Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Respond::Starting(starting) = this {
            if let Some((request, guard)) = starting.take() {
                *this = hand_to_plugin(request, guard);
            }
        }
        if let Respond::Calling(calling) = this {
            let Poll::Ready(called) = calling.call.poll(cx, &calling.guard.generation) else { return Poll::Pending };
            if let Respond::Calling(calling) = std::mem::replace(this, Respond::Answered(None)) {
                return Poll::Ready(Ok(calling.finish(called)));
            }
        }
        match this {
            Respond::Answered(response) => response.take().map_or(Poll::Pending, |r| Poll::Ready(Ok(r))),
            // Not reached: a future that completed is dropped by hyper, not polled again.
            Respond::Starting(_) | Respond::Calling(_) => Poll::Pending,
        }
    }
}

/// Checks what the host checks before the plugin sees a request, and hands the request to
/// the plugin; or answers right away. Runs on a thread of the request's generation: the
/// connection's task (HTTP/1), which runs on the runtime of the generation it loaded, or the
/// stream's task (HTTP/2), spawned on the runtime of the generation it was routed to.
fn hand_to_plugin(request: Request<Incoming>, guard: RequestGuard) -> Respond {
    let started = Instant::now();
    let generation = &guard.generation;
    if thread_generation() != generation.id() {
        // Never expected: plugin code must only run on its generation's threads.
        tracing::error!(generation = generation.id(), "request received outside its generation's runtime");
        return Respond::Answered(Some(error_response(StatusCode::SERVICE_UNAVAILABLE, guard, started)));
    }
    let max_body_size = guard.conn.max_body_size;
    if request.body().size_hint().lower() > max_body_size {
        tracing::debug!(method = %request.method(), path = %request.uri().path(), max_body_size, "request body too large: answered 413");
        return Respond::Answered(Some(error_response(StatusCode::PAYLOAD_TOO_LARGE, guard, started)));
    }
    let (call, method, uri) = bridge::call(generation, request, max_body_size);
    Respond::Calling(Calling { call, guard, started, method, uri })
}

impl Calling {
    /// The response to hand to hyper, once the plugin's future has completed.
    fn finish(self, called: Result<Response<ResponseBody>, CallError>) -> Response<HostBody> {
        let Calling { call, guard, started, method, uri } = self;
        drop(call); // the plugin's state goes first
        let generation = &guard.generation;
        match called {
            Ok(response) => {
                tracing::debug!(
                    %method, path = %uri.path(), status = response.status().as_u16(), generation = generation.id(),
                    elapsed = ?started.elapsed(), "request"
                );
                counted(response.map(|body| HostBody::new(body, guard)), started)
            }
            Err(CallError::BodyTooLarge) => {
                let max_body_size = guard.conn.max_body_size;
                tracing::debug!(%method, path = %uri.path(), max_body_size, "request body grew too large: answered 413");
                error_response(StatusCode::PAYLOAD_TOO_LARGE, guard, started)
            }
            Err(e) => {
                tracing::error!(%method, path = %uri.path(), generation = generation.id(), plugin = %generation.label(), "{e}; answered 500");
                error_response(StatusCode::INTERNAL_SERVER_ERROR, guard, started)
            }
        }
    }
}

/// Counts a response whose head is ready, in its generation's figures.
fn counted(response: Response<HostBody>, started: Instant) -> Response<HostBody> {
    response.body().guard.generation.stats().record(response.status().as_u16(), started.elapsed());
    response
}

fn error_response(status: StatusCode, guard: RequestGuard, started: Instant) -> Response<HostBody> {
    let text = format!("{}\n", status.canonical_reason().unwrap_or("error"));
    let h1 = guard.h1;
    let mut response = Response::new(HostBody::new(ResponseBody::Full(Some(Bytes::from(text))), guard));
    *response.status_mut() = status;
    if status == StatusCode::PAYLOAD_TOO_LARGE && h1 {
        // The rest of the body is not wanted: close rather than read it to keep the
        // connection alive. (HTTP/2 resets just the stream.)
        response.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
    }
    counted(response, started)
}

/// Holds a request's generation (and, for HTTP/1, its connection's place) until its response
/// body is dropped.
struct RequestGuard {
    generation: Arc<Generation>,
    conn: Arc<ConnState>,
    h1: bool,
}

impl RequestGuard {
    fn new(generation: Arc<Generation>, conn: Arc<ConnState>, h1: bool) -> RequestGuard {
        generation.stats().request_started();
        conn.activity.request_started();
        RequestGuard { generation, conn, h1 }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.generation.stats().request_ended();
        self.conn.activity.request_ended();
    }
}

/// A response body together with the generation it came from. Field order matters: the
/// plugin's body is dropped (running plugin code) before the generation is released.
pub struct HostBody {
    body: ResponseBody,
    guard: RequestGuard,
}

impl HostBody {
    fn new(body: ResponseBody, guard: RequestGuard) -> HostBody {
        guard.generation.stats().stream_started();
        HostBody { body, guard }
    }
}

impl Drop for HostBody {
    fn drop(&mut self) {
        self.guard.generation.stats().stream_ended();
    }
}

impl http_body::Body for HostBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.guard.generation.stats().sent(data.len());
                }
            }
            Poll::Ready(Some(Err(e))) => {
                let generation = &this.guard.generation;
                tracing::error!(generation = generation.id(), plugin = %generation.label(), "{e}; response aborted");
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
