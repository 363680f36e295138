//! A connection: its task on the runtime of the generation serving it, its socket, and its
//! moves to a newer generation at a request boundary.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::latch::{Latch, Waiter};
use crate::plugin::route::MAX_BLOCK;
use crate::plugin::{thread_generation, Generation, LentTally};
use crate::serve::handoff::Handed;
use crate::serve::limits::{Activity, Expiry, Http2Frames};
use crate::serve::respond::{PluginService, StreamExecutor};
use crate::serve::state::{ConnState, OpenConnection, Shared};

pub(crate) type ConnFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The ALPN name of HTTP/2.
const H2: &[u8] = b"h2";
/// The protocols an HTTPS listener offers, the preferred first.
pub(crate) const ALPN: &[&[u8]] = &[H2, b"http/1.1"];
/// HTTP/2 streams a connection may have open at once (nginx allows 128).
const H2_MAX_STREAMS: u32 = 128;
/// How much of its response an HTTP/2 stream may queue ahead of the client.
const H2_SEND_BUFFER: usize = 128 * 1024;
/// hyper's default bound on an HTTP/1 connection's buffers.
const H1_DEFAULT_BUFFER: usize = 8192 + 4096 * 100;

/// The hyper connection, with graceful shutdown (or a hand-over to a new host) wired in;
/// movable between runtimes.
///
/// With `tls`, the connection is HTTPS: the handshake comes first (timed by the header read
/// timeout, like a request head), and ALPN tells HTTP/2 from HTTP/1.1.
pub(crate) fn serve(io: MigratingStream, conn: Arc<ConnState>, shared: Arc<Shared>, tls: Option<TlsAcceptor>) -> ConnFuture {
    Box::pin(async move {
        let (mut io, http2) = match tls {
            Some(acceptor) => {
                let Some(io) = expect_tls(io).await else { return };
                match acceptor.accept(io).await {
                    Ok(stream) => {
                        let http2 = stream.get_ref().1.alpn_protocol() == Some(H2);
                        (ConnIo { transport: Transport::Tls(Box::new(stream)), frames: None }, http2)
                    }
                    Err(e) => return tracing::debug!("TLS handshake failed: {e}"),
                }
            }
            None => {
                let mut io = io;
                let http2 = match sniff_http2(&mut io, &shared).await {
                    Ok(Sniffed::Http1) => false,
                    Ok(Sniffed::Http2) => true,
                    // A new connection owes its first request head; one handed over to this
                    // host between requests, and on at once, does not.
                    Ok(Sniffed::HandOver(to)) => return io.hand_over(Bytes::new(), conn.activity.reading_head(), &to),
                    Err(e) => return tracing::debug!("connection ended before its first request: {e}"),
                };
                (ConnIo { transport: Transport::Plain(io), frames: None }, http2)
            }
        };
        if http2 {
            conn.activity.is_http2();
            // The frames that follow the preface are followed, for the header timeout. The
            // preface itself is still to be read, through `io` (from the sniffer's replay,
            // or from TLS).
            io.frames = Some(Http2Frames::after_preface(H2_PREFACE.len()));
        }
        let max_header_size = usize::try_from(shared.max_header_size).unwrap_or(usize::MAX);
        let service = PluginService { conn: conn.clone(), current: shared.current.clone() };
        // Both answer a request head over the limit with 431 (h2: over the advertised header
        // list size).
        // Both let the plugin switch protocols: HTTP/1.1 `Upgrade`, HTTP/2 extended CONNECT
        // (RFC 8441).
        let result = if http2 {
            let mut builder = http2::Builder::new(StreamExecutor { conn });
            builder.max_header_list_size(u32::try_from(max_header_size).unwrap_or(u32::MAX));
            builder.enable_connect_protocol();
            // One connection slot carries this many requests at once, and each stream may
            // queue this much of its response for a client that does not read: hyper's
            // defaults (200 streams, 400 KiB each) let one client pin 80 MiB per connection.
            builder.max_concurrent_streams(H2_MAX_STREAMS);
            builder.max_send_buf_size(H2_SEND_BUFFER);
            let connection = builder.serve_connection(TokioIo::new(io), service);
            drive(connection, &shared.shutdown, |c| c.graceful_shutdown()).await
        } else {
            let mut builder = http1::Builder::new();
            builder.max_header_size(max_header_size);
            // A head must also fit hyper's read buffer, whose default bound is below the
            // largest `--max-header-size`.
            builder.max_buf_size(max_header_size.max(H1_DEFAULT_BUFFER));
            let connection = builder.serve_connection(TokioIo::new(io), service).with_upgrades();
            drive_http1(connection, &conn, &shared).await
        };
        if let Err(e) = result {
            // hyper's own message is terse ("connection error"): its cause says what it was.
            match std::error::Error::source(&e) {
                Some(cause) => tracing::debug!("connection ended with an error: {e}: {cause}"),
                None => tracing::debug!("connection ended with an error: {e}"),
            }
        }
    })
}

/// Runs a hyper connection to its end; on shutdown, lets it finish what it has started
/// (`graceful` tells it to).
async fn drive<C: Future>(connection: C, shutdown: &Latch, graceful: impl FnOnce(Pin<&mut C>)) -> C::Output {
    tokio::pin!(connection);
    tokio::select! {
        biased; // the connection first: it is what is usually ready
        r = connection.as_mut() => r,
        () = shutdown.raised() => {
            graceful(connection.as_mut());
            connection.await
        }
    }
}

type Http1Connection = http1::UpgradeableConnection<TokioIo<ConnIo>, PluginService>;

/// Runs an HTTP/1 connection to its end. On shutdown, it finishes the request in progress;
/// then, if this host hands over to a new one, the connection goes there at its next request
/// boundary, with the bytes hyper has read of the next request: the client does not notice.
/// Otherwise it is closed.
async fn drive_http1(mut connection: Http1Connection, conn: &ConnState, shared: &Shared) -> hyper::Result<()> {
    tokio::select! {
        biased; // the connection first: it is what is usually ready
        r = &mut connection => return r,
        () = shared.shutdown.raised() => {}
    }
    // A TLS session cannot go to another process: the connection closes after its request in
    // progress, and its client connects again (to the new host).
    let Some(to) = shared.handoff.get().filter(|_| !conn.origin.https) else {
        if conn.origin.https && conn.served.load(std::sync::atomic::Ordering::Acquire) == 0 {
            // Its client has just finished its handshake and sends its first request now
            // (TLS 1.2: a round trip later): hyper, told to shut down before it has read
            // anything, would close the connection unanswered. That request is served first
            // (the header read timeout bounds the wait).
            let ended = std::future::poll_fn(|cx| match Pin::new(&mut connection).poll(cx) {
                Poll::Ready(r) => Poll::Ready(Some(r)),
                Poll::Pending if conn.activity.http1_busy() || conn.served.load(std::sync::atomic::Ordering::Acquire) > 0 => {
                    Poll::Ready(None)
                }
                Poll::Pending => Poll::Pending,
            })
            .await;
            if let Some(r) = ended {
                return r;
            }
        }
        Pin::new(&mut connection).graceful_shutdown();
        return connection.await;
    };
    // The connection is polled first: one that ends on its own (the client closed, hyper gave
    // up reading a body nobody wanted) ends here, and is not handed over.
    // SeqCst: see `Activity::http1_busy`.
    conn.wants_boundary.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut nudged_after = None;
    let ended = std::future::poll_fn(|cx| match Pin::new(&mut connection).poll(cx) {
        Poll::Ready(r) => Poll::Ready(Some(r)),
        Poll::Pending if conn.at_request_boundary() => Poll::Ready(None),
        Poll::Pending => {
            // hyper may have last asked the socket for bytes while the request was still in
            // progress, and would not ask again before the client sends its next request
            // (which it may then serve within one poll, and so on). Polled once more after
            // each request that ends, it asks, and finds the boundary.
            let served = conn.served.load(std::sync::atomic::Ordering::Acquire);
            if !conn.activity.http1_busy() && nudged_after != Some(served) {
                nudged_after = Some(served);
                cx.waker().wake_by_ref();
            }
            Poll::Pending
        }
    })
    .await;
    if let Some(r) = ended {
        return r;
    }
    // hyper is between requests: told to shut down, it stops without reading or writing
    // more, and without shutting the socket down (`handing_over`).
    conn.handing_over.store(true, std::sync::atomic::Ordering::Release);
    Pin::new(&mut connection).graceful_shutdown();
    (&mut connection).await?;
    if let Some(parts) = connection.into_parts() {
        if let Transport::Plain(io) = parts.io.into_inner().transport {
            io.hand_over(parts.read_buf, false, to);
        }
    }
    Ok(())
}

/// Reads the first byte of a connection to an HTTPS listener, and leaves it to be read
/// again. If it does not begin a TLS handshake record, the client speaks cleartext HTTP (an
/// `http://` URL for an `https://` port): it is told so and closed, as nginx does.
async fn expect_tls(mut io: MigratingStream) -> Option<MigratingStream> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    /// The content type of a TLS record that carries a handshake message.
    const HANDSHAKE: u8 = 0x16;
    let mut first = [0u8; 1];
    match io.read(&mut first).await {
        Ok(1) if first[0] == HANDSHAKE => {
            io.replay_first(&first);
            Some(io)
        }
        Ok(1) => {
            const ANSWER: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 45\r\nConnection: close\r\n\r\nThis port speaks HTTPS: use an https:// URL.\n";
            tracing::debug!("a cleartext request on an HTTPS listener: answered 400");
            let _ = io.write_all(ANSWER).await;
            let _ = io.shutdown().await;
            // Closed with the request unread, the socket would be reset, and the answer lost
            // with it: read on until the client closes (the header read timeout bounds this).
            let (mut sink, mut left) = ([0u8; 4096], 64 * 1024usize);
            while left > 0 {
                match io.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
            None
        }
        Ok(_) => None,
        Err(e) => {
            tracing::debug!("connection ended before its TLS handshake: {e}");
            None
        }
    }
}

/// What an HTTP/2 client with prior knowledge (h2c) sends first; anything else is HTTP/1.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a new connection turned out to be.
enum Sniffed {
    Http1,
    Http2,
    /// Nothing told yet, and this host is handing over: the connection goes to the new host.
    HandOver(mpsc::UnboundedSender<Handed>),
}

/// Reads just enough of a new connection to tell HTTP/2 from HTTP/1, and leaves what it read
/// to be read again. (hyper-util's `auto` builder does this too, but cannot limit the size of
/// an HTTP/1 request head apart from the size of hyper's read and write buffers, and large
/// buffers slow streaming down.)
async fn sniff_http2(io: &mut MigratingStream, shared: &Shared) -> io::Result<Sniffed> {
    use tokio::io::AsyncReadExt as _;
    let mut seen = [0u8; H2_PREFACE.len()];
    let mut len = 0;
    let mut shutdown = std::pin::pin!(shared.shutdown.raised());
    let mut watching = true;
    while len < seen.len() && H2_PREFACE.starts_with(&seen[..len]) {
        let read = tokio::select! {
            biased;
            // Cancel-safe: a read that loses the race has read nothing.
            n = io.read(&mut seen[len..]) => Some(n?),
            () = &mut shutdown, if watching => None,
        };
        match read {
            Some(0) => break,
            Some(n) => len += n,
            None => match shared.handoff.get() {
                Some(to) => {
                    io.replay_first(&seen[..len]);
                    return Ok(Sniffed::HandOver(to.clone()));
                }
                None => watching = false,
            },
        }
    }
    // What was read comes again first, before any replayed bytes not yet read (a connection
    // handed over with bytes its previous host had read).
    io.replay_first(&seen[..len]);
    Ok(if seen[..len] == *H2_PREFACE { Sniffed::Http2 } else { Sniffed::Http1 })
}

/// Drives a connection on one generation's runtime until it ends, must be cut off (drain
/// timeout), or can move to a newer generation.
pub(crate) struct ConnTask {
    connection: Option<ConnFuture>,
    conn: Arc<ConnState>,
    generation: Arc<Generation>,
    shared: Arc<Shared>,
    /// Wake this task when its generation is superseded or aborted. They are polled only when
    /// the task's waker changes (in practice once); every poll reads the latches' flags.
    superseded: Waiter,
    aborted: Waiter,
    registered: Option<Waker>,
    /// Generations this connection moved away from, while they are loaded: if one is cut off
    /// (drain timeout, `--max-generations`) while the connection still holds response chunks
    /// it lent, queued for a client that does not read them, the connection is closed, or
    /// they would keep it loaded.
    lingering: Vec<Lingering>,
    /// HTTP/2: when to close the connection for chunks of a cut-off generation, if they are
    /// still held then. The streams of that generation are reset when it is cut off, which
    /// frees theirs; the grace lets that happen before the connection, and the streams of
    /// newer generations on it, are given up.
    grace: Option<Pin<Box<tokio::time::Sleep>>>,
    /// HTTP/1, while a canary runs: which generation its next requests go to.
    runs: Runs,
}

/// An HTTP/1 connection's requests while a canary runs, in runs on one generation: it takes
/// blocks of slots (`plugin::route`), 1, 2, 4, … up to `MAX_BLOCK`, and serves each block as
/// two runs, its canary slots and the others, in alternating order from one block to the
/// next (canary-current, current-canary, …), so that it moves about once per block.
#[derive(Debug, Clone, Copy)]
struct Runs {
    /// The count of requests served at which the current run ends.
    due: u64,
    /// Blocks taken.
    blocks: u32,
    /// The rest of the current block: whether it is the canary's, and how many requests.
    then: Option<(bool, u64)>,
}

impl Runs {
    /// A new connection has taken one slot (see `Server::serve_socket`).
    fn new() -> Runs {
        Runs { due: 1, blocks: 1, then: None }
    }

    /// Whether the next run, which starts at `served`, is the canary's (`None`: no canary
    /// runs).
    fn next(&mut self, current: &crate::plugin::Current, served: u64) -> Option<bool> {
        if let Some((canary, len)) = self.then.take() {
            self.due = served + len;
            return Some(canary);
        }
        let block = current.take_block(MAX_BLOCK.min(1 << self.blocks.min(MAX_BLOCK.ilog2())));
        self.blocks += 1;
        let Some(block) = block else {
            self.due = served + MAX_BLOCK;
            return None;
        };
        let runs = [(true, block.canary_slots), (false, block.len - block.canary_slots)];
        let [first, second] = if self.blocks.is_multiple_of(2) { runs } else { [runs[1], runs[0]] };
        let (first, second) = if first.1 == 0 { (second, None) } else { (first, Some(second).filter(|s| s.1 > 0)) };
        self.due = served + first.1;
        self.then = second;
        Some(first.0)
    }
}

/// A generation a connection left.
struct Lingering {
    generation: Weak<Generation>,
    /// Wakes the connection's task when the generation is cut off.
    waiter: Waiter,
    /// The chunks it lent that the connection still holds.
    lent: Arc<LentTally>,
}

impl Lingering {
    /// The generation's id, if it has been cut off while the connection holds its chunks.
    fn cut_off_holding(&self) -> Option<u64> {
        if self.lent.held() == 0 {
            return None; // no reference count taken on every poll
        }
        let generation = self.generation.upgrade()?;
        (generation.aborted().is_raised() && self.lent.held() > 0).then(|| generation.id())
    }
}

/// How long an HTTP/2 connection may go on holding chunks of a cut-off generation.
const HTTP2_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

impl ConnTask {
    pub(crate) fn new(connection: ConnFuture, conn: Arc<ConnState>, shared: Arc<Shared>) -> ConnTask {
        ConnTask::moved(connection, conn, shared, Vec::new(), Runs::new())
    }

    fn moved(connection: ConnFuture, conn: Arc<ConnState>, shared: Arc<Shared>, lingering: Vec<Lingering>, runs: Runs) -> ConnTask {
        let generation = conn.generation.load_full();
        ConnTask {
            runs,
            connection: Some(connection),
            superseded: generation.superseded().waiter(),
            aborted: generation.aborted().waiter(),
            registered: None,
            lingering,
            grace: None,
            generation,
            conn,
            shared,
        }
    }

    /// Makes sure a raised latch wakes this task.
    fn register(&mut self, cx: &mut Context<'_>) {
        if self.registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return;
        }
        self.superseded.register(cx);
        self.aborted.register(cx);
        for lingering in &mut self.lingering {
            lingering.waiter.register(cx);
        }
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
                Expiry::Http2Header => "an HTTP/2 header block did not complete within the header read timeout",
                Expiry::Send => "the client read nothing of its responses for the send timeout (--send-timeout)",
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
        if this.generation.aborted().is_raised() && this.conn.activity.http1_busy_here() {
            tracing::warn!(
                generation = this.generation.id(),
                plugin = %this.generation.label(),
                "drain timeout: aborting a response still in progress"
            );
            this.connection = None; // drops the response, on this generation's thread
            return Poll::Ready(());
        }
        if let Some(id) = this.holds_aborted_chunks(cx) {
            tracing::warn!(
                generation = id,
                "drain timeout: closing a connection whose client has not yet read the end of a response \
                 of a generation being cut off"
            );
            this.connection = None; // drops the chunks; their release goes to their generation
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

impl ConnTask {
    /// Moves the connection to another generation's runtime if no HTTP/1 request is in
    /// progress: to the current generation if this one was superseded; while a canary runs,
    /// where its next run of requests, or the sticky key of its last request, sends it.
    /// Returns whether it moved.
    fn try_move(&mut self) -> bool {
        let superseded = self.generation.superseded().is_raised();
        let route_due = self.shared.current.is_split() && self.route_due();
        if !superseded && !route_due {
            return false;
        }
        if self.conn.activity.http1_busy_here() || self.conn.switching.load(std::sync::atomic::Ordering::Acquire) {
            return false;
        }
        let next = if superseded {
            self.shared.current.load()
        } else {
            match self.next_route() {
                Some(next) => next,
                None => return false,
            }
        };
        if next.id() == self.generation.id() {
            return false;
        }
        let Some(connection) = self.connection.take() else { return false };
        let mut lingering = std::mem::take(&mut self.lingering);
        // Left behind with nothing held: an HTTP/1 connection lends no more chunks there (an
        // HTTP/2 stream still in progress might, and so might a relayed request).
        let lends_on = self.conn.activity.http2() || self.conn.activity.relaying();
        if !lends_on {
            lingering.retain(|l| l.generation.strong_count() > 0 && l.lent.held() > 0);
        }
        // From now on, requests count the chunks of the generation they go to (from the
        // requests already relayed to it, if any).
        let mut relayed = {
            let mut relayed = self.conn.relayed_lent.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            self.conn.relayed_any.store(false, std::sync::atomic::Ordering::Release);
            std::mem::take(&mut *relayed)
        };
        let to_next = relayed.iter().position(|(g, _)| std::ptr::eq(g.as_ptr(), Arc::as_ptr(&next)));
        let lent = to_next.map(|i| relayed.swap_remove(i).1).unwrap_or_default();
        let left = (Arc::downgrade(&self.generation), self.conn.lent.swap(lent));
        for (generation, lent) in relayed.into_iter().chain([left]) {
            if lent.held() == 0 && !lends_on {
                continue; // nothing held, and the connection lends no more there
            }
            let Some(waiter) = generation.upgrade().map(|g| g.aborted().waiter()) else { continue };
            lingering.push(Lingering { generation, waiter, lent });
        }
        self.conn.generation.store(next.clone());
        let task = ConnTask::moved(connection, self.conn.clone(), self.shared.clone(), lingering, self.runs);
        next.handle().spawn(task);
        true
    }

    /// Whether the connection's run of requests on this generation has ended (see
    /// [`Runs`]), or the sticky key of a request wants it elsewhere.
    fn route_due(&self) -> bool {
        self.conn.served.load(std::sync::atomic::Ordering::Relaxed) >= self.runs.due
            || self.conn.prefer.load(std::sync::atomic::Ordering::Relaxed) != 0
    }

    /// Where the connection goes for its next requests, while a canary runs: where the
    /// sticky key of its last request wants it; or, if its requests carry no key, where its
    /// next run of requests goes.
    fn next_route(&mut self) -> Option<Arc<Generation>> {
        use std::sync::atomic::Ordering::Relaxed;
        let served = self.conn.served.load(Relaxed);
        let prefer = self.conn.prefer.swap(0, Relaxed);
        let current = &self.shared.current;
        if prefer != 0 {
            self.runs.due = served + MAX_BLOCK;
            return current.by_id(prefer);
        }
        if self.conn.keyed.swap(false, Relaxed) {
            self.runs.due = served + MAX_BLOCK;
            return None;
        }
        let canary = self.runs.next(current, served)?;
        Some(if canary { current.canary().map_or_else(|| current.load(), |c| c.generation().clone()) } else { current.load() })
    }

    /// The id of a generation cut off (drain timeout, `--max-generations`) whose lent chunks
    /// this connection still holds, once it must be closed for them (at once for HTTP/1,
    /// after [`HTTP2_GRACE`] for HTTP/2).
    fn holds_aborted_chunks(&mut self, cx: &mut Context<'_>) -> Option<u64> {
        let relayed = self.conn.relayed_any.load(std::sync::atomic::Ordering::Acquire);
        if self.lingering.is_empty() && !relayed && !self.generation.aborted().is_raised() {
            return None; // every poll of a connection that never moved comes here
        }
        self.lingering.retain(|l| l.generation.strong_count() > 0);
        let own = (self.generation.aborted().is_raised() && self.conn.lent.load().held() > 0).then(|| self.generation.id());
        let holding = own.or_else(|| self.lingering.iter().find_map(Lingering::cut_off_holding)).or_else(|| {
            // Chunks of responses relayed from another generation (a sticky key's, a replay's,
            // an HTTP/2 stream's routed elsewhere) that the connection has not moved to.
            let relayed = self.conn.relayed_lent.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            relayed.iter().find_map(|(generation, lent)| {
                let generation = generation.upgrade().filter(|_| lent.held() > 0)?;
                generation.aborted().is_raised().then(|| generation.id())
            })
        });
        let Some(id) = holding else {
            self.grace = None;
            return None;
        };
        if !self.conn.activity.http2() {
            return Some(id);
        }
        let grace = self.grace.get_or_insert_with(|| Box::pin(tokio::time::sleep(HTTP2_GRACE)));
        grace.as_mut().poll(cx).is_ready().then_some(id)
    }
}

/// A TCP stream that re-registers with the reactor of whichever generation's runtime polls
/// it, so its connection can move between runtimes.
pub(crate) struct MigratingStream {
    io: Option<TcpStream>,
    /// Bytes already read from the socket (by [`sniff_http2`], or by the host that handed the
    /// connection over) to be read again first.
    pub(crate) replay: Bytes,
    /// Keeps the reactor `io` is registered with alive until it re-registers.
    registered: Arc<Generation>,
    conn: Arc<ConnState>,
    /// The connection's slot, held as long as the socket is open: after a switch of
    /// protocols too, when the socket outlives hyper's connection.
    _open: OpenConnection,
}

impl MigratingStream {
    pub(crate) fn new(stream: std::net::TcpStream, conn: Arc<ConnState>, open: OpenConnection) -> io::Result<MigratingStream> {
        let registered = conn.generation.load_full();
        let io = Some(TcpStream::from_std(stream)?);
        Ok(MigratingStream { io, replay: Bytes::new(), registered, conn, _open: open })
    }

    /// Puts `read` back before any bytes still to be replayed.
    fn replay_first(&mut self, read: &[u8]) {
        self.replay = if self.replay.is_empty() {
            Bytes::copy_from_slice(read)
        } else {
            [read, &self.replay[..]].concat().into()
        };
    }

    /// Hands the socket to the new host (`hotswap upgrade`), with `buffered`, the bytes hyper
    /// had read of it, and any not yet replayed. `reading_head`: it owes its first request's
    /// head (header read timeout) rather than being between requests. The connection's slot
    /// is given back only once the socket is on its way: when the server has drained, every
    /// socket handed over is in `to`.
    pub(crate) fn hand_over(mut self, buffered: Bytes, reading_head: bool, to: &mpsc::UnboundedSender<Handed>) {
        let Some(io) = self.io.take() else { return };
        let stream = match io.into_std() {
            Ok(stream) => stream,
            Err(e) => return tracing::debug!("cannot hand a connection over: {e}"),
        };
        let buffered = if self.replay.is_empty() { buffered } else { [buffered, std::mem::take(&mut self.replay)].concat().into() };
        if to.send(Handed { stream, buffered, reading_head }).is_err() {
            tracing::debug!("cannot hand a connection over: the hand-over has ended");
        }
    }

    /// Notes bytes written, for the idle timeout, and writes that wait, for the send timeout;
    /// once that has expired the connection, a write that would wait fails instead.
    fn wrote(&self, polled: Poll<io::Result<usize>>, cx: &Context<'_>) -> Poll<io::Result<usize>> {
        let activity = &self.conn.activity;
        match polled {
            Poll::Ready(Ok(n)) if n > 0 => {
                activity.sent();
            }
            Poll::Pending => {
                if activity.send_expired() {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the client read nothing for the send timeout")));
                }
                activity.write_waited();
                // An upgraded connection's writer is no longer the connection's task: it is
                // the one to wake when the timeout expires.
                activity.wake_on_expiry(cx.waker());
            }
            _ => {}
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
            this.conn.read_any.store(true, std::sync::atomic::Ordering::Release);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = match this.io() {
            Ok(io) => io.poll_read(cx, buf),
            Err(e) => return Poll::Ready(Err(e)),
        };
        // HTTP/2's bytes are no activity: its frames are followed above TLS (`ConnIo`).
        if this.conn.activity.http2() {
            return polled;
        }
        if buf.filled().len() > before {
            this.conn.activity.received();
            this.conn.saw_bytes();
        } else if polled.is_pending() {
            this.conn.found_no_bytes();
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
        this.wrote(polled, cx)
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
        this.wrote(polled, cx)
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
        if self.conn.handing_over.load(std::sync::atomic::Ordering::Acquire) {
            return Poll::Ready(Ok(())); // the new host serves on
        }
        match self.get_mut().io() {
            Ok(io) => io.poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

/// What hyper reads and writes: the socket, or TLS over it; an HTTP/2 connection's frames
/// are followed here, where they are in clear, for the header read and send timeouts.
pub(crate) struct ConnIo {
    transport: Transport,
    frames: Option<Http2Frames>,
}

enum Transport {
    Plain(MigratingStream),
    Tls(Box<TlsStream<MigratingStream>>),
}

impl Transport {
    fn activity(&self) -> &Activity {
        match self {
            Transport::Plain(io) => &io.conn.activity,
            Transport::Tls(tls) => &tls.get_ref().0.conn.activity,
        }
    }
}

impl ConnIo {
    /// Follows the first `n` bytes of `bufs`, just written (HTTP/2).
    fn wrote(&mut self, bufs: &[io::IoSlice<'_>], mut n: usize) {
        let Some(frames) = &mut self.frames else { return };
        for buf in bufs {
            if n == 0 {
                break;
            }
            let len = buf.len().min(n);
            frames.wrote(&buf[..len], self.transport.activity());
            n -= len;
        }
    }
}

impl AsyncRead for ConnIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = match &mut this.transport {
            Transport::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        };
        if let Some(frames) = &mut this.frames {
            if buf.filled().len() > before {
                frames.read(&buf.filled()[before..], this.transport.activity());
            }
        }
        polled
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = match &mut this.transport {
            Transport::Plain(io) => Pin::new(io).poll_write(cx, buf),
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        };
        if let Poll::Ready(Ok(n)) = polled {
            this.wrote(&[io::IoSlice::new(buf)], n);
        }
        polled
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = match &mut this.transport {
            Transport::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        };
        if let Poll::Ready(Ok(n)) = polled {
            this.wrote(bufs, n);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        match &self.transport {
            Transport::Plain(io) => io.is_write_vectored(),
            Transport::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().transport {
            Transport::Plain(io) => Pin::new(io).poll_flush(cx),
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().transport {
            Transport::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}
