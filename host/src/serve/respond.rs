//! A request in flight: routed to a generation, handed to its plugin, answered, and its
//! response body sent.
//!
//! One value owns each request at every step, and with it the request's hold on its
//! generation ([`InFlight`]): the plugin's call ([`PluginCall`]) until it answers, then the
//! response body ([`HostBody`]). Each of those releases the plugin's state before the hold
//! goes, so no order of fields or drops can unload a library under its own code.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use handler_api::RequestId;
use http::{Request, Response, StatusCode};
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::plugin::request::{Answer, BodyProgress, CallError, CallFailed, Head, PluginCall};
use crate::plugin::response::{BodyError, ResponseBody};
use crate::plugin::upgrade::PendingUpgrade;
use crate::plugin::{thread_generation, Current, Generation, InFlight, LentTally};
use crate::serve::limits::Activity;
use crate::serve::state::ConnState;

/// Spawns hyper's HTTP/2 stream tasks on the runtime of the generation their request was
/// routed to, cut off if that generation's drain times out.
///
/// hyper calls the service for a stream's request and spawns the stream in the same poll of
/// the connection, on the same thread, and the connection's generation changes only between
/// polls (see `ConnState::generation`): so the stream runs on the connection's generation,
/// or the one the service routed it to (`STREAM_ROUTE`), which the request carries (its
/// `InFlight`). `hand_to_plugin` checks it. (hyper also runs the task of an upgraded stream
/// through here, later; it runs no plugin code.)
#[derive(Clone)]
pub(crate) struct StreamExecutor {
    pub(crate) conn: Arc<ConnState>,
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, stream: F) {
        let routed = STREAM_ROUTE.take().filter(|(conn, _)| std::ptr::eq(*conn, Arc::as_ptr(&self.conn)));
        let generation = routed.map_or_else(|| self.conn.generation.load_full(), |(_, generation)| generation);
        let runtime = generation.handle().clone();
        runtime.spawn(async move {
            tokio::select! {
                biased; // the stream first: it is what is usually ready
                _ = stream => {}
                () = generation.aborted().raised() => tracing::warn!("drain timeout: aborting an HTTP/2 stream"),
            }
        });
    }
}

/// Routes each request to the plugin of the connection's generation.
#[derive(Clone)]
pub(crate) struct PluginService {
    pub(crate) conn: Arc<ConnState>,
    /// The generation new requests go to.
    pub(crate) current: Arc<Current>,
}

impl hyper::service::Service<Request<Incoming>> for PluginService {
    type Response = Response<SentBody>;
    type Error = std::convert::Infallible;
    type Future = Respond;

    fn call(&self, request: Request<Incoming>) -> Respond {
        let conn = ConnRequest::new(self.conn.clone(), request.version() < http::Version::HTTP_2);
        let generation = self.conn.generation.load_full();
        let split = self.current.is_split();
        if !conn.h1 {
            // The stream's own task calls the plugin (the connection's task serves every
            // stream, and must not wait for one), on the runtime `StreamExecutor` spawns it
            // on: the generation routed to here, which may be another than the connection's
            // while a canary runs. The tally of the generation routed to, now: the connection
            // may move before the stream's plugin answers.
            if !split {
                let lent = self.conn.lent.load_full();
                return Respond::Starting(Some((request, InFlight::new(generation), conn.counting_lent_in(lent), None)));
            }
            let routed = self.route_stream(&request, &generation);
            let replay = self.replay_from(&request, &routed);
            let lent = if routed.id() == generation.id() { self.conn.lent.load_full() } else { self.conn.relayed_lent(&routed) };
            return Respond::Starting(Some((request, InFlight::new(routed), conn.counting_lent_in(lent), replay)));
        }
        let elsewhere = if generation.superseded().is_raised() {
            // hyper read this request ahead, with the previous one, and starts it now, after a
            // swap, before the connection could move: it goes to the new generation.
            Some(self.current.load()).filter(|next| next.id() != generation.id())
        } else if split {
            self.route_sticky_h1(&request, &generation)
        } else {
            None
        };
        if let Some(next) = elsewhere {
            let lent = self.conn.relayed_lent(&next);
            let replay = self.replay_from(&request, &next);
            return relay(next, conn.counting_lent_in(lent), move |in_flight, conn| hand_to_plugin(request, in_flight, conn, replay));
        }
        // The connection's task runs on its generation's runtime.
        let replay = if split { self.replay_from(&request, &generation) } else { None };
        hand_to_plugin(request, InFlight::new(generation), conn, replay)
    }
}

impl PluginService {
    /// Where a request routed to `generation` is answered if it fails there before its
    /// response starts: the current version, if `generation` is the canary and the request
    /// can be sent again (a `GET` or `HEAD` without a body).
    fn replay_from(&self, request: &Request<Incoming>, generation: &Generation) -> Option<Arc<Current>> {
        let again = matches!(*request.method(), http::Method::GET | http::Method::HEAD) && request.body().is_end_stream();
        (again && !self.current.is_current(generation.id()) && !generation.superseded().is_raised()).then(|| self.current.clone())
    }

    /// Where an HTTP/1 request's sticky key sends it, if not to the connection's generation:
    /// the connection follows it there at its next boundary. A connection whose requests
    /// carry keys takes no slots (see `ConnTask::next_route`).
    fn route_sticky_h1(&self, request: &Request<Incoming>, generation: &Arc<Generation>) -> Option<Arc<Generation>> {
        use std::sync::atomic::Ordering::Relaxed;
        let to = self.current.route_sticky(request.headers())?;
        if !self.conn.keyed.load(Relaxed) {
            self.conn.keyed.store(true, Relaxed);
        }
        if to.id() == generation.id() {
            // Where the key wants it already: a move asked for by an earlier request (of
            // another user, behind a proxy) is off.
            if self.conn.prefer.load(Relaxed) != 0 {
                self.conn.prefer.store(0, Relaxed);
            }
            return None;
        }
        self.conn.prefer.store(to.id(), Relaxed);
        Some(to)
    }

    /// The generation an HTTP/2 stream goes to while a canary runs: by its sticky key, or a
    /// slot. The stream is spawned on its runtime (see [`StreamExecutor`]).
    fn route_stream(&self, request: &Request<Incoming>, generation: &Arc<Generation>) -> Arc<Generation> {
        let routed = self.current.route_sticky(request.headers()).unwrap_or_else(|| self.current.route());
        if routed.id() != generation.id() {
            STREAM_ROUTE.set(Some((Arc::as_ptr(&self.conn), routed.clone())));
        }
        routed
    }
}

thread_local! {
    /// The generation the stream whose request was just routed goes to, if not the
    /// connection's: hyper spawns the stream (`StreamExecutor::execute`) right after it calls
    /// the service, in the same poll, on this thread.
    static STREAM_ROUTE: std::cell::RefCell<Option<(*const ConnState, Arc<Generation>)>> = const { std::cell::RefCell::new(None) };
}

/// Answers one request: the plugin's response future, turned into the response for hyper;
/// counts the request (status, and time until the response head).
///
/// A named future rather than an `async fn`'s: hyper keeps it in place, where a boxed one
/// would cost an allocation per request.
#[allow(clippy::large_enum_variant, reason = "boxed, it would cost an allocation per HTTP/2 request")]
pub(crate) enum Respond {
    /// An HTTP/2 request, handed to the plugin at the first poll, on the stream's task.
    Starting(Option<Starting>),
    Calling(Calling),
    /// An HTTP/1 request served by another generation than the connection's (see
    /// [`relay`]).
    Relayed(tokio::sync::oneshot::Receiver<Response<SentBody>>),
    /// Answered by the host, or taken by hyper.
    Answered(Option<Response<SentBody>>),
}

/// An HTTP/2 request before its first poll: where it goes, and where it is replayed.
type Starting = (Request<Incoming>, InFlight, ConnRequest, Option<Arc<Current>>);

/// What a canary's failed request needs to be answered by the current version instead: the
/// version's cell, and the request's version (its headers stay with the call: a `GET` or
/// `HEAD` without a body has nothing else).
pub(crate) struct Replay {
    current: Arc<Current>,
    version: http::Version,
}

/// A request in the plugin's hands: everything it holds, and what its log line needs.
pub(crate) struct Calling {
    /// The plugin's future, with the request's hold on its generation.
    call: PluginCall,
    conn: ConnRequest,
    started: Instant,
    /// The request's method, target and id, for the log.
    method: http::Method,
    uri: http::Uri,
    id: RequestId,
    /// The switch of protocols the client asked for, if the plugin may accept it.
    on_upgrade: Option<hyper::upgrade::OnUpgrade>,
    /// Where the request is answered if the plugin fails it: a canary's idempotent request.
    replay: Option<Replay>,
    /// The response timeout's timer, set at the first poll that finds the plugin busy: a
    /// request answered at once costs none.
    deadline: Option<Deadline>,
    /// Its access line, until it is answered (with `--access-log`).
    access: Unanswered,
}

/// When a request the plugin is still working on times out (`--response-timeout`).
struct Deadline {
    sleep: Pin<Box<tokio::time::Sleep>>,
    /// The request body as last seen: bytes the plugin has read, and whether it has ended.
    body: (u64, bool),
    /// Since when the plugin's time counts: the request's start, or its last progress with
    /// the body.
    since: Instant,
}

/// What a plugin's call came to: the response, or the same request again, elsewhere.
enum Finished {
    Response(Response<HostBody>),
    Replayed(Respond),
}

/// A new request id, unique in the process; shown (`Display`) as the plugin shows it. Each
/// thread takes them from a block of its own: no shared counter on the request path.
fn next_request_id() -> RequestId {
    const BLOCK: u64 = 1024;
    static BLOCKS: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static NEXT: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
    }
    NEXT.with(|next| {
        let (id, end) = next.get();
        if id < end {
            next.set((id + 1, end));
            return RequestId(id);
        }
        let start = BLOCKS.fetch_add(BLOCK, Ordering::Relaxed);
        next.set((start + 1, start + BLOCK));
        RequestId(start)
    })
}

impl Future for Respond {
    type Output = Result<Response<SentBody>, std::convert::Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Respond::Starting(starting) = this {
            if let Some((request, in_flight, conn, replay)) = starting.take() {
                *this = hand_to_plugin(request, in_flight, conn, replay);
            }
        }
        if let Respond::Calling(calling) = this {
            let called = match calling.call.poll(cx) {
                Poll::Ready(called) => called,
                Poll::Pending => match calling.out_of_time(cx) {
                    Some(failed) => Err(failed),
                    None => return Poll::Pending,
                },
            };
            if let Respond::Calling(calling) = std::mem::replace(this, Respond::Answered(None)) {
                match calling.finish(called) {
                    Finished::Response(response) => return Poll::Ready(Ok(response.map(SentBody::here))),
                    Finished::Replayed(replayed) => *this = replayed,
                }
            }
        }
        if let Respond::Relayed(response) = this {
            let Poll::Ready(relayed) = Pin::new(response).poll(cx) else { return Poll::Pending };
            return Poll::Ready(Ok(relayed.unwrap_or_else(|_| {
                // The new generation's runtime dropped the request: it is shutting down.
                let mut response = Response::new(SentBody::relayed(Relayed::ended()));
                *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                response
            })));
        }
        match this {
            Respond::Answered(response) => response.take().map_or(Poll::Pending, |r| Poll::Ready(Ok(r))),
            // Not reached: a future that completed is dropped by hyper, not polled again.
            Respond::Starting(_) | Respond::Calling(_) | Respond::Relayed(_) => Poll::Pending,
        }
    }
}

/// The host's own answer, `status`, to a request the plugin never sees.
fn answer_early(status: StatusCode, request: &Request<Incoming>, id: RequestId, in_flight: InFlight, conn: ConnRequest, started: Instant) -> Respond {
    let access = conn.state.access_log.then(|| Access::new(&conn, request.method().clone(), request.uri().clone(), request.version(), id, started));
    Respond::Answered(Some(error_response(status, request.method(), id, in_flight, conn, started, access).map(SentBody::here)))
}

/// Checks what the host checks before the plugin sees a request, and hands the request to
/// the plugin; or answers right away. Runs on a thread of the request's generation: the
/// connection's task (HTTP/1), which runs on the runtime of the generation it loaded, or the
/// stream's task (HTTP/2), spawned on the runtime of the generation it was routed to.
///
/// `replay`: where the request is answered if it fails here, if it was routed to a canary;
/// kept only for a `GET` or `HEAD` without a body.
fn hand_to_plugin(mut request: Request<Incoming>, in_flight: InFlight, conn: ConnRequest, replay: Option<Arc<Current>>) -> Respond {
    let started = Instant::now();
    let generation = in_flight.generation();
    let id = next_request_id();
    if thread_generation() != generation.id() {
        // Never expected: plugin code must only run on its generation's threads.
        tracing::error!(generation = generation.id(), request_id = %id, "request received outside its generation's runtime");
        return answer_early(StatusCode::SERVICE_UNAVAILABLE, &request, id, in_flight, conn, started);
    }
    if conn.h1 && !one_valid_host(&request) {
        tracing::debug!(method = %request.method(), path = %request.uri().path(), request_id = %id, "no Host header, more than one, or one that names no host: answered 400");
        return answer_early(StatusCode::BAD_REQUEST, &request, id, in_flight, conn, started);
    }
    let max_body_size = conn.state.max_body_size;
    if request.body().size_hint().lower() > max_body_size {
        tracing::debug!(method = %request.method(), path = %request.uri().path(), max_body_size, request_id = %id, "request body too large: answered 413");
        return answer_early(StatusCode::PAYLOAD_TOO_LARGE, &request, id, in_flight, conn, started);
    }
    let protocol = upgrade_protocol(&request);
    let on_upgrade = protocol.is_some().then(|| hyper::upgrade::on(&mut request));
    let (http::request::Parts { method, uri, version, headers, .. }, body) = request.into_parts();
    // (`replay` is given only for a `GET` or `HEAD` without a body.)
    let replay = replay.filter(|_| protocol.is_none()).map(|current| Replay { current, version });
    let asked = Asked { method, uri, version, headers, protocol, on_upgrade };
    call_plugin(asked, Some(body), in_flight, conn, replay, id, started)
}

/// Whether an HTTP/1 request has what RFC 9112 (section 3.2) requires a server to check: one
/// `Host` header at most, and a value that is a host (and port), or empty. Without this check,
/// a proxy in front and the plugin could each take another host for the request's. One is
/// required in HTTP/1.1 unless the target names the host (`GET http://host/ HTTP/1.1`, as
/// hyper's own client sends it): the server must use that one anyway (section 3.2.2).
fn one_valid_host(request: &Request<Incoming>) -> bool {
    let mut hosts = request.headers().get_all(http::header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(host), None) => host.as_bytes().iter().all(|b| {
            // RFC 3986's host and port: letters, digits, unreserved and sub-delims, `:`, IP
            // literals' brackets and `%` escapes. Checked by hand: a parse into an `Authority`
            // would also allow user info and cost more on every request.
            matches!(b, b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'!' | b'$' | b'&' | b'\''
                | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'=' | b':' | b'[' | b']' | b'%')
        }),
        (None, _) => request.version() < http::Version::HTTP_11 || request.uri().authority().is_some(),
        (Some(_), Some(_)) => false,
    }
}

/// A request's head, as the plugin is asked it.
struct Asked {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    headers: http::HeaderMap,
    /// The protocol it asks to switch to, if the host can switch it, and hyper's side of it.
    protocol: Option<String>,
    on_upgrade: Option<hyper::upgrade::OnUpgrade>,
}

/// Hands a request to the plugin of `in_flight`'s generation, on one of its threads.
/// `id` and `started`: the request's, from when it reached the host (a replay keeps them).
fn call_plugin(
    asked: Asked,
    body: Option<Incoming>,
    in_flight: InFlight,
    conn: ConnRequest,
    replay: Option<Replay>,
    id: RequestId,
    started: Instant,
) -> Respond {
    let Asked { method, uri, version, headers, protocol, on_upgrade } = asked;
    let head = Head {
        method: &method,
        uri: &uri,
        version,
        headers,
        origin: &conn.state.origin,
        request_id: id.0,
        upgrade: protocol.as_ref().map(|p| p.as_bytes()),
        keep_headers: replay.is_some(),
    };
    let access = conn.state.access_log
        .then(|| (Access::new(&conn, method.clone(), uri.clone(), version, id, started), in_flight.generation().clone()));
    let call = PluginCall::start(in_flight, head, body, conn.state.max_body_size);
    if let Some(body) = call.body_progress() {
        conn.state.activity.watch_body(body);
    }
    let access = Unanswered(access);
    Respond::Calling(Calling { call, conn, started, method, uri, id, on_upgrade, replay, deadline: None, access })
}

/// Answers a request the canary failed before its response started from the current
/// version, `next`, on its runtime. The request ran there as it came; the canary's figures count it
/// as the 500 (or 504) it would have been.
/// It keeps its id; its time (the response timeout's, the version's figures) starts anew.
fn replay_on(next: Arc<Generation>, replay: Replay, headers: http::HeaderMap, method: http::Method, uri: http::Uri, id: RequestId, conn: ConnRequest) -> Respond {
    let version = replay.version;
    let lent = conn.state.relayed_lent(&next);
    relay(next, conn.counting_lent_in(lent), move |in_flight, conn| {
        let asked = Asked { method, uri, version, headers, protocol: None, on_upgrade: None };
        call_plugin(asked, None, in_flight, conn, None, id, Instant::now())
    })
}

/// The protocol `request` asks to switch to, if hyper can switch it: an HTTP/1.1 `Upgrade`
/// (with `Connection: upgrade`), or an HTTP/2 extended CONNECT's `:protocol`.
fn upgrade_protocol(request: &Request<Incoming>) -> Option<String> {
    request.extensions().get::<hyper::upgrade::OnUpgrade>()?; // else hyper cannot switch it
    if request.version() >= http::Version::HTTP_2 {
        return request.extensions().get::<hyper::ext::Protocol>().map(|p| p.as_str().to_owned());
    }
    let asks = request.headers().get_all(http::header::CONNECTION).iter().any(|value| {
        value.to_str().is_ok_and(|v| v.split(',').any(|token| token.trim().eq_ignore_ascii_case("upgrade")))
    });
    let protocol = request.headers().get(http::header::UPGRADE)?.to_str().ok()?;
    asks.then(|| protocol.to_owned())
}

impl Calling {
    /// Whether the plugin, busy with the request, has run out of time: then its work on it is
    /// dropped. Its time is counted from the request's start, and again from the last body
    /// bytes it read, and stands still while it waits for the client's body (which
    /// `--body-read-timeout` times instead).
    fn out_of_time(&mut self, cx: &mut Context<'_>) -> Option<CallFailed> {
        let timeout = self.conn.state.response_timeout?;
        let (body, waiting) = self.call.body_progress().map_or(((0, false), false), |body| {
            ((body.received(), body.is_finished()), body.is_waiting() && !body.is_finished())
        });
        let deadline = match &mut self.deadline {
            Some(deadline) => deadline,
            None => {
                // (A timeout too long to add is no timeout.)
                let at = self.started.checked_add(timeout)?;
                let sleep = Box::pin(tokio::time::sleep_until(at.into()));
                self.deadline.insert(Deadline { sleep, body, since: self.started })
            }
        };
        if body != deadline.body {
            // The plugin read some of the body (polled for it, so polled here too): its time
            // counts from now. Only the next check of the timer moves it.
            deadline.body = body;
            deadline.since = Instant::now();
        }
        while deadline.sleep.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            // Waiting for the client, the plugin is not late: the body read timeout times that.
            let due = if waiting { now.checked_add(timeout) } else { deadline.since.checked_add(timeout) };
            match due {
                Some(due) if due > now => deadline.sleep.as_mut().reset(due.into()),
                Some(_) => return self.call.give_up(CallError::TimedOut(timeout)),
                None => return None,
            }
        }
        None
    }

    /// The response to hand to hyper, once the plugin's future has completed.
    fn finish(self, called: Result<Answer, CallFailed>) -> Finished {
        let Calling { mut call, conn, started, method, uri, id, on_upgrade, replay, deadline: _, mut access } = self;
        let access = access.take();
        // First: a response refused here (a switch that cannot happen, a 1xx) fails the call,
        // and a canary's failed call is replayed, with its headers.
        let called = called.and_then(|answer| switch_protocols(answer, on_upgrade, id, &conn)).and_then(|response| bodiless(response, &method));
        // Kept for a replay: given back for reuse unless the request is replayed.
        let headers = match call.take_headers() {
            Some(headers) if called.is_ok() => {
                crate::plugin::response::recycle(headers);
                None
            }
            kept => kept,
        };
        // Its state is released already; the hold is in `called`. The request body may still
        // be read by the response body (and time out then).
        let request_body = call.body_progress().cloned();
        drop(call);
        Finished::Response(match called {
            Ok(response) => {
                let generation = response.body().generation().id();
                tracing::debug!(
                    %method, path = %uri.path(), status = response.status().as_u16(), generation,
                    elapsed = ?started.elapsed(), request_id = %id, "request"
                );
                counted(response.map(|body| HostBody::new(body, conn, request_body, access)), started)
            }
            Err(CallFailed { error: CallError::BodyTooLarge, in_flight }) => {
                let max_body_size = conn.state.max_body_size;
                tracing::debug!(%method, path = %uri.path(), max_body_size, request_id = %id, "request body grew too large: answered 413");
                error_response(StatusCode::PAYLOAD_TOO_LARGE, &method, id, in_flight, conn, started, access)
            }
            Err(CallFailed { error: CallError::BodyTimedOut, in_flight }) => {
                tracing::debug!(%method, path = %uri.path(), request_id = %id, "request body too slow (--body-read-timeout): answered 408");
                error_response(StatusCode::REQUEST_TIMEOUT, &method, id, in_flight, conn, started, access)
            }
            Err(CallFailed { error, in_flight }) => {
                let status = match error {
                    CallError::TimedOut(_) => StatusCode::GATEWAY_TIMEOUT,
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                };
                let generation = in_flight.generation().clone();
                // Not on the build that failed, if it was promoted meanwhile.
                let elsewhere = replay.zip(headers).map(|(replay, headers)| (replay.current.load(), replay, headers));
                if let Some((next, replay, headers)) = elsewhere.filter(|(next, ..)| next.id() != generation.id()) {
                    tracing::error!(
                        %method, path = %uri.path(), generation = generation.id(), plugin = %generation.label(), request_id = %id,
                        "{error}; the canary's failure counts against it, and the current version answers the request"
                    );
                    generation.stats().record(status.as_u16(), started.elapsed());
                    generation.stats().replayed_elsewhere();
                    drop(in_flight);
                    return Finished::Replayed(replay_on(next, replay, headers, method, uri, id, conn));
                }
                tracing::error!(
                    %method, path = %uri.path(), generation = generation.id(), plugin = %generation.label(), request_id = %id,
                    "{error}; answered {}", status.as_u16()
                );
                error_response(status, &method, id, in_flight, conn, started, access)
            }
        })
    }
}

/// The response of `answer`; if the plugin accepted a switch of protocols that the request
/// asked for, its session starts once hyper has switched, on a task of the plugin's
/// generation. A response that would switch without a session, or whose switch cannot happen,
/// is refused (a 500): hyper would otherwise switch into nothing, or send a 101 it must not.
fn switch_protocols(
    answer: Answer,
    on_upgrade: Option<hyper::upgrade::OnUpgrade>,
    id: RequestId,
    conn: &ConnRequest,
) -> Result<Response<ResponseBody>, CallFailed> {
    let Answer { response, upgrade } = answer;
    let status = response.status();
    if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
        // hyper sends a 1xx only before a final response, never as one.
        let (_, body) = response.into_parts();
        let refused = format!("status {} is informational, not a final answer (use 2xx to 5xx)", status.as_u16());
        return Err(CallFailed { error: CallError::Invalid(refused), in_flight: body.into_in_flight() });
    }
    // HTTP/1.1 switches with 101; HTTP/2 switches an extended CONNECT's stream with a 2xx.
    let switches = if conn.h1 { status == StatusCode::SWITCHING_PROTOCOLS } else { status.is_success() };
    let refused = match (upgrade, on_upgrade) {
        (Some(upgrade), Some(on_upgrade)) if switches => {
            if conn.h1 {
                conn.state.switching.store(true, std::sync::atomic::Ordering::Release);
            }
            // On the generation's runtime: this runs on one of its threads. The session counts
            // as a request of its connection (HTTP/2: its idle timeout must not cut the
            // connection under it).
            let held = ConnRequest::new(conn.state.clone(), conn.h1);
            tokio::spawn(run_session(upgrade, on_upgrade, id, held));
            return Ok(response);
        }
        (Some(_), _) if status == StatusCode::SWITCHING_PROTOCOLS => {
            "status 101 for a request that cannot switch (it did not ask to, or came over HTTP/2)"
        }
        (Some(upgrade), _) => {
            // Accepted, but answered with a status that does not switch: the session is dropped
            // and the response goes out as it is.
            tracing::warn!(
                request_id = %id, generation = upgrade.generation().id(), status = status.as_u16(),
                "the handler accepted a switch of protocols but answered with a status that does not switch: \
                 the session does not run"
            );
            return Ok(response);
        }
        (None, _) if status == StatusCode::SWITCHING_PROTOCOLS => {
            "status 101 without accepting the switch (use handler_api::upgrade)"
        }
        (None, Some(_)) if switches => "a 2xx to an extended CONNECT without accepting the switch (use handler_api::upgrade)",
        (None, _) => return Ok(response),
    };
    let (_, body) = response.into_parts();
    Err(CallFailed { error: CallError::Invalid(refused.into()), in_flight: body.into_in_flight() })
}

/// A response that has no content (one to a HEAD request, a 204, a 304) goes without the
/// plugin's body: hyper leaves it out over HTTP/1 only, and over HTTP/2 the client takes DATA
/// there for a protocol error. A response to HEAD keeps the length its body had, as the same
/// GET's; a 204 has none.
fn bodiless(response: Response<ResponseBody>, method: &http::Method) -> Result<Response<ResponseBody>, CallFailed> {
    let (status, head) = (response.status(), *method == http::Method::HEAD);
    // (Any body that brings nothing: none, an empty one, or a stream of length 0.)
    let empty = response.body().is_end_stream();
    if !head && status != StatusCode::NO_CONTENT && status != StatusCode::NOT_MODIFIED {
        // An empty body is not checked against a `content-length` when the response is made
        // (a HEAD answer carries the GET's): here it must say 0, or HTTP/2 clients reset the
        // stream and HTTP/1 ones wait for bytes that never come.
        // (Looked up only for an empty body: not on every response.)
        let declared = if empty { response.headers().get(http::header::CONTENT_LENGTH) } else { None };
        if let Some(declared) = declared.filter(|v| v.as_bytes().iter().any(|&b| b != b'0')) {
            let refused = format!("its content-length header says {declared:?} but its body is empty (leave the header out: the host sets it from the body)");
            return Err(CallFailed { error: CallError::Invalid(refused), in_flight: response.into_body().into_in_flight() });
        }
        return Ok(response);
    }
    if empty {
        let mut response = response;
        if status == StatusCode::NO_CONTENT {
            response.headers_mut().remove(http::header::CONTENT_LENGTH);
        }
        return Ok(response);
    }
    let (mut parts, body) = response.into_parts();
    if status == StatusCode::NO_CONTENT {
        parts.headers.remove(http::header::CONTENT_LENGTH);
    } else if head && !parts.headers.contains_key(http::header::CONTENT_LENGTH) {
        if let Some(len) = body.size_hint().exact() {
            parts.headers.insert(http::header::CONTENT_LENGTH, len.into());
        }
    }
    Ok(Response::from_parts(parts, ResponseBody::Full { bytes: None, in_flight: body.into_in_flight() }))
}

/// Waits for hyper to switch protocols, then runs the plugin's session on the connection
/// until it ends, or until its generation is cut off (drain timeout). `held` is the session's
/// place on its connection.
async fn run_session(upgrade: PendingUpgrade, on_upgrade: hyper::upgrade::OnUpgrade, id: RequestId, held: ConnRequest) {
    let generation = upgrade.generation().clone();
    let aborted = generation.aborted().raised();
    tokio::pin!(aborted);
    let io = tokio::select! {
        io = on_upgrade => io,
        () = aborted.as_mut() => return,
    };
    let io = match io {
        Ok(io) => io,
        Err(e) => return tracing::debug!(request_id = %id, "the switch of protocols did not happen: {e}"),
    };
    if held.h1 {
        // The socket is the session's now, on this generation's runtime; hyper has let go of
        // it. A request relayed to this generation (see `relay`) came on a connection of the
        // one before: the socket re-registers here at its next poll.
        held.state.generation.store(generation.clone());
    }
    let io = TokioIo::new(io);
    let started = if held.h1 {
        upgrade.start(io)
    } else {
        upgrade.start(WindowWatched::new(io, held.state.activity.clone()))
    };
    let session = match started {
        Ok(session) => session,
        Err(e) => return tracing::error!(request_id = %id, generation = generation.id(), plugin = %generation.label(), "{e}"),
    };
    tracing::debug!(request_id = %id, generation = generation.id(), "upgraded connection started");
    tokio::pin!(session);
    tokio::select! {
        biased; // the session first: it is what is usually ready
        ended = session.as_mut() => match ended {
            Ok(()) => tracing::debug!(request_id = %id, generation = generation.id(), "upgraded connection ended"),
            Err(e) => tracing::error!(request_id = %id, generation = generation.id(), plugin = %generation.label(), "{e}"),
        },
        () = aborted.as_mut() => tracing::warn!(
            request_id = %id, generation = generation.id(), plugin = %generation.label(),
            "drain timeout: closing an upgraded connection"
        ),
    }
}

/// Counts a response whose head is ready, in its generation's figures.
fn counted(mut response: Response<HostBody>, started: Instant) -> Response<HostBody> {
    let status = response.status().as_u16();
    response.body().generation().stats().record(status, started.elapsed());
    if let Some(access) = &mut response.body_mut().access {
        access.status = status;
    }
    response
}

/// An answer from the host itself, for a request the plugin did not (or could not) answer
/// (with no body to a HEAD request). With the request's `id` in `x-request-id`: the log line
/// that says what went wrong carries it too.
fn error_response(
    status: StatusCode,
    method: &http::Method,
    id: RequestId,
    in_flight: InFlight,
    conn: ConnRequest,
    started: Instant,
    access: Option<Box<Access>>,
) -> Response<HostBody> {
    let body = if *method == http::Method::HEAD {
        ResponseBody::Full { bytes: None, in_flight }
    } else {
        ResponseBody::full(Bytes::from(format!("{}\n", status.canonical_reason().unwrap_or("error"))), in_flight)
    };
    let h1 = conn.h1;
    let mut response = Response::new(HostBody::new(body, conn, None, access));
    *response.status_mut() = status;
    if let Ok(id) = http::HeaderValue::from_str(&id.to_string()) {
        response.headers_mut().insert(http::header::HeaderName::from_static("x-request-id"), id);
    }
    if matches!(status, StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_TIMEOUT) && h1 {
        // The rest of the body is not wanted (or not coming): close rather than read it to
        // keep the connection alive. (HTTP/2 resets just the stream.)
        response.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
    }
    counted(response, started)
}

/// A request's place on its connection, from routing until its response body is dropped:
/// the connection's timeouts and moves wait for it.
pub(crate) struct ConnRequest {
    state: Arc<ConnState>,
    h1: bool,
    /// Where the chunks its response lends are counted, if not with the connection's
    /// generation's (a relayed request).
    lent: Option<Arc<LentTally>>,
}

impl ConnRequest {
    fn new(state: Arc<ConnState>, h1: bool) -> ConnRequest {
        state.activity.request_started();
        ConnRequest { state, h1, lent: None }
    }

    /// A request served elsewhere than on the connection's generation (an HTTP/2 stream's
    /// is served on its own task in any case).
    fn counting_lent_in(mut self, lent: Arc<LentTally>) -> ConnRequest {
        // Once: a relayed request that fails on a canary is relayed again, to be replayed.
        if self.h1 && self.lent.is_none() {
            self.state.activity.relay_started();
        }
        self.lent = Some(lent);
        self
    }

    /// The tally of the chunks its response lends.
    fn lent(&self) -> Arc<LentTally> {
        self.lent.clone().unwrap_or_else(|| self.state.lent.load_full())
    }
}

impl Drop for ConnRequest {
    fn drop(&mut self) {
        if self.h1 && self.lent.is_some() {
            // Relayed: it may end on another thread just as the next request ends on the
            // connection's.
            self.state.served.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            self.state.activity.relay_ended();
        } else if self.h1 {
            // One writer: an HTTP/1 connection's requests end one after another (no locked
            // read-modify-write on the request path).
            let served = self.state.served.load(std::sync::atomic::Ordering::Relaxed);
            self.state.served.store(served + 1, std::sync::atomic::Ordering::Release);
        }
        self.state.activity.request_ended();
        if self.h1 && self.state.wants_boundary.load(std::sync::atomic::Ordering::SeqCst) {
            self.state.activity.wake();
        }
    }
}

/// A response body as hyper sends it: counted in its generation's figures, and cut off if
/// the request body it may still be reading times out.
pub(crate) struct HostBody {
    /// Holds the request's generation until it ends.
    body: ResponseBody,
    /// The request's body, if it has one.
    request_body: Option<Arc<BodyProgress>>,
    /// Its line in the access log, written when it is dropped (with `--access-log`).
    access: Option<Box<Access>>,
    /// Its place on the connection.
    conn: ConnRequest,
}

/// Why a response was cut off.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    #[error(transparent)]
    Plugin(#[from] BodyError),
    #[error("the request body arrived too slowly (--body-read-timeout)")]
    RequestBodyTimedOut,
    #[error("its generation was cut off (drain timeout or --max-generations)")]
    Aborted,
}

impl HostBody {
    /// `request_body`: the request's body, if it has one, which cuts the response off if it
    /// times out.
    fn new(mut body: ResponseBody, conn: ConnRequest, request_body: Option<Arc<BodyProgress>>, access: Option<Box<Access>>) -> HostBody {
        body.count_lent_in(|| conn.lent());
        body.generation().stats().stream_started();
        HostBody { body, request_body, access, conn }
    }

    fn generation(&self) -> &Arc<Generation> {
        self.body.generation()
    }
}

impl Drop for HostBody {
    fn drop(&mut self) {
        self.generation().stats().stream_ended();
        if let Some(access) = self.access.take() {
            // hyper stops polling a body of known length once it has its bytes, and polls none
            // for a response that has no body (HEAD, 204, 304).
            let bodiless = access.method == http::Method::HEAD
                || matches!(access.status, 100..=199 | 204 | 304);
            let whole = !access.failed
                && (access.ended || bodiless || self.body.is_end_stream() || self.body.size_hint().exact() == Some(access.bytes));
            access.log(whole, self.body.generation());
        }
    }
}

/// The access line of a request the plugin is working on: written if the request is dropped
/// before the plugin answers, with status 499 (as nginx has it) if the client left or reset
/// its stream, or 503 if the host cut it off with its generation (drain timeout,
/// `--max-generations`); else taken for the response's.
struct Unanswered(Option<(Box<Access>, Arc<Generation>)>);

impl Unanswered {
    fn take(&mut self) -> Option<Box<Access>> {
        self.0.take().map(|(access, _)| access)
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some((mut access, generation)) = self.0.take() {
            access.status = if generation.aborted().is_raised() { 503 } else { 499 };
            access.log(false, &generation);
        }
    }
}

/// A response's line in the access log (`--access-log`): what it answered, and how much of
/// its body went out.
pub(crate) struct Access {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    peer: Option<std::net::SocketAddr>,
    id: RequestId,
    started: Instant,
    status: u16,
    bytes: u64,
    /// The body said it had ended.
    ended: bool,
    /// The body failed, or was cut off.
    failed: bool,
}

impl Access {
    /// The line of a request on `conn` (made only with `--access-log`). Its status is the
    /// response's, set by `counted`.
    fn new(conn: &ConnRequest, method: http::Method, uri: http::Uri, version: http::Version, id: RequestId, started: Instant) -> Box<Access> {
        let peer = conn.state.origin.peer;
        Box::new(Access { method, uri, version, peer, id, started, status: 0, bytes: 0, ended: false, failed: false })
    }

    /// Notes what a poll of the response body brought.
    fn saw(&mut self, polled: &Poll<Option<Result<Frame<Bytes>, SendError>>>) {
        match polled {
            Poll::Ready(Some(Ok(frame))) => self.bytes += frame.data_ref().map_or(0, |data| data.len() as u64),
            Poll::Ready(Some(Err(_))) => self.failed = true,
            Poll::Ready(None) => self.ended = true,
            Poll::Pending => {}
        }
    }

    fn log(&self, whole: bool, generation: &Generation) {
        let peer: &dyn std::fmt::Display = match &self.peer {
            Some(peer) => peer,
            None => &"-",
        };
        // The target as an HTTP/1 request line has it (HTTP/2's carries scheme and authority).
        let uri: &dyn std::fmt::Display = match self.uri.path_and_query() {
            Some(target) => target,
            None => &self.uri,
        };
        tracing::info!(
            target: "hotswap::access",
            method = %self.method, %uri, http = ?self.version, status = self.status, bytes = self.bytes,
            whole, ms = self.started.elapsed().as_secs_f64() * 1e3, %peer, request_id = %self.id,
            version = %generation.version(), "response"
        );
    }
}

impl http_body::Body for HostBody {
    type Data = Bytes;
    type Error = SendError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, SendError>>> {
        let this = self.get_mut();
        let timed_out = this.request_body.as_ref().is_some_and(|body| body.timed_out());
        let polled = if timed_out {
            // The connection is closed (HTTP/1) or the stream reset (HTTP/2).
            tracing::debug!("request body too slow (--body-read-timeout): response cut off");
            Poll::Ready(Some(Err(SendError::RequestBodyTimedOut)))
        } else {
            Pin::new(&mut this.body).poll_frame(cx).map_err(SendError::from)
        };
        if let Some(access) = &mut this.access {
            access.saw(&polled);
        }
        if timed_out {
            return polled;
        }
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.generation().stats().sent(data.len());
                }
            }
            Poll::Ready(Some(Err(e))) => {
                let generation = this.generation();
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

/// A response body as hyper sends it: from this thread, or relayed from another
/// generation's; and (HTTP/2) whether it waits for the client's flow-control window.
pub(crate) struct SentBody {
    source: Source,
    /// HTTP/2, once hyper has taken a data frame: set while hyper holds a frame it took and
    /// has not asked for the next of (or, for the last, not let go of the body). hyper does
    /// either only once the client's flow-control window has room for the frame.
    window: Option<WindowWait>,
}

enum Source {
    Here(HostBody),
    Relayed(Relayed),
}

impl SentBody {
    fn here(body: HostBody) -> SentBody {
        SentBody { source: Source::Here(body), window: None }
    }

    fn relayed(relayed: Relayed) -> SentBody {
        SentBody { source: Source::Relayed(relayed), window: None }
    }
}

impl Source {
    /// The connection's activity, if it speaks HTTP/2.
    fn http2_activity(&self) -> Option<&Arc<Activity>> {
        match self {
            Source::Here(body) => (!body.conn.h1).then_some(&body.conn.state.activity),
            Source::Relayed(relayed) => relayed.http2.as_ref(),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Source::Here(body) => body.is_end_stream(),
            Source::Relayed(relayed) => relayed.end_stream,
        }
    }
}

/// HTTP/2: something that may wait for the client's flow-control window (a response body,
/// an upgraded stream's writes), counted on its connection while it does: the send timeout
/// runs ([`Activity::awaits_window`]). Dropped, it waits no more.
struct WindowWait {
    activity: Arc<Activity>,
    awaiting: AtomicBool,
}

impl WindowWait {
    fn new(activity: Arc<Activity>) -> WindowWait {
        WindowWait { activity, awaiting: AtomicBool::new(false) }
    }

    fn begin(&self) {
        if !self.awaiting.swap(true, Ordering::AcqRel) {
            self.activity.awaits_window();
        }
    }

    fn end(&self) {
        if self.awaiting.swap(false, Ordering::AcqRel) {
            self.activity.window_opened();
        }
    }
}

impl Drop for WindowWait {
    fn drop(&mut self) {
        self.end();
    }
}

/// An HTTP/2 stream after a switch of protocols (extended CONNECT): a write (or flush) that
/// waits, waits for the client's flow-control window (the socket's own waits are seen below
/// h2), and the send timeout runs until hyper says there is room again. That is its wake, not
/// the plugin's next write: a plugin that gives up a write that waits (a `select!`) and only
/// reads on must not leave the connection counted as waiting.
struct WindowWatched {
    io: TokioIo<hyper::upgrade::Upgraded>,
    wake: Arc<WindowWake>,
}

impl WindowWatched {
    fn new(io: TokioIo<hyper::upgrade::Upgraded>, activity: Arc<Activity>) -> WindowWatched {
        let wake = Arc::new(WindowWake { wait: WindowWait::new(activity), waker: std::sync::Mutex::new(None) });
        WindowWatched { io, wake }
    }

    /// Runs a write-side poll of `io` with a waker that, when hyper wakes it, ends the wait.
    fn write_side<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: impl FnOnce(Pin<&mut TokioIo<hyper::upgrade::Upgraded>>, &mut Context<'_>) -> Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        {
            let mut slot = self.wake.waker.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if !slot.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *slot = Some(cx.waker().clone());
            }
        }
        // Counted as waiting before the poll: a wake that comes right after it ends the wait.
        self.wake.wait.begin();
        let waker = std::task::Waker::from(self.wake.clone());
        let polled = poll(Pin::new(&mut self.io), &mut Context::from_waker(&waker));
        if polled.is_ready() {
            self.wake.wait.end();
        }
        polled
    }
}

impl Drop for WindowWatched {
    fn drop(&mut self) {
        // Now: hyper may keep the waker (and so the wait) a while yet.
        self.wake.wait.end();
    }
}

/// What an HTTP/2 upgraded stream's writes wait for, ended by hyper's wake (then the
/// plugin's task is woken).
struct WindowWake {
    wait: WindowWait,
    waker: std::sync::Mutex<Option<std::task::Waker>>,
}

impl std::task::Wake for WindowWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.wait.end();
        let waker = self.waker.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl tokio::io::AsyncRead for WindowWatched {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for WindowWatched {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.get_mut().write_side(cx, |io, cx| io.poll_write(cx, buf))
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        self.get_mut().write_side(cx, |io, cx| io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.get_mut().write_side(cx, |io, cx| io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.get_mut().write_side(cx, |io, cx| io.poll_shutdown(cx))
    }
}

/// Serves a request on `next`, another generation than the one whose runtime runs the
/// connection: an HTTP/1 request hyper read ahead, before a swap; one whose sticky key names
/// the other generation of a canary split; a canary's failure answered by the current
/// version. Plugin code runs only on its generation's threads, so a task there starts the
/// call (`start`) and polls the response body, and hands the frames over. Rare, so the hop
/// between threads does not matter (an HTTP/1 connection moves to `next` after the first two).
fn relay<S>(next: Arc<Generation>, conn: ConnRequest, start: S) -> Respond
where
    S: FnOnce(InFlight, ConnRequest) -> Respond + Send + 'static,
{
    let (mut head_tx, head_rx) = tokio::sync::oneshot::channel();
    let http2 = (!conn.h1).then(|| conn.state.activity.clone());
    let runtime = next.handle().clone();
    runtime.spawn(async move {
        // Whatever ends it early (the client gone, the generation cut off) drops the request
        // here, on its generation's thread; the connection sees the body fail, never end.
        let aborted = next.aborted().token().clone();
        let respond = start(InFlight::new(next), conn);
        let response = tokio::select! {
            Ok(response) = respond => response,
            () = head_tx.closed() => return,
            () = aborted.cancelled() => return,
        };
        let (parts, body) = response.into_parts();
        let body = match body.source {
            Source::Here(body) => body,
            // Relayed on from here (a canary's failure answered by the current version): it
            // holds no plugin state, and goes to the connection as it is.
            Source::Relayed(relayed) => return drop(head_tx.send(Response::from_parts(parts, SentBody::relayed(relayed)))),
        };
        if !matches!(body.body, ResponseBody::Plugin(_)) {
            // No plugin code left to run: hyper may drop it wherever it likes.
            let _ = head_tx.send(Response::from_parts(parts, SentBody::here(body)));
            return;
        }
        let (frames_tx, frames_rx) = tokio::sync::mpsc::channel(1);
        let relayed = Relayed { frames: frames_rx, end_stream: false, size_hint: body.size_hint(), http2 };
        if head_tx.send(Response::from_parts(parts, SentBody::relayed(relayed))).is_err() {
            return; // the client is gone; the body is dropped here, on its generation
        }
        let mut body = std::pin::pin!(body);
        loop {
            let frame = tokio::select! {
                frame = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)) => frame,
                () = frames_tx.closed() => return,
                () = aborted.cancelled() => return,
            };
            let last = !matches!(frame, Some(Ok(_)));
            tokio::select! {
                sent = frames_tx.send(frame) => if sent.is_err() || last { return },
                () = aborted.cancelled() => return,
            }
        }
    });
    Respond::Relayed(head_rx)
}

/// The frames of a response body polled on another generation's thread (see [`relay`]):
/// each frame, then `None` at its end. A relay that stops without it failed.
pub(crate) struct Relayed {
    frames: tokio::sync::mpsc::Receiver<Option<Result<Frame<Bytes>, SendError>>>,
    end_stream: bool,
    size_hint: SizeHint,
    /// The connection's activity, if it speaks HTTP/2.
    http2: Option<Arc<Activity>>,
}

impl Relayed {
    /// A body that has ended, empty.
    fn ended() -> Relayed {
        let (_, frames) = tokio::sync::mpsc::channel(1);
        Relayed { frames, end_stream: true, size_hint: SizeHint::with_exact(0), http2: None }
    }
}

impl http_body::Body for SentBody {
    type Data = Bytes;
    type Error = SendError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, SendError>>> {
        let this = self.get_mut();
        let polled = match &mut this.source {
            Source::Here(body) => Pin::new(body).poll_frame(cx),
            Source::Relayed(relayed) => relayed.poll_frame(cx),
        };
        if let Some(activity) = this.source.http2_activity() {
            // The last frame too: hyper holds it until the window has room, and only then
            // lets go of the body.
            let awaiting = matches!(&polled, Poll::Ready(Some(Ok(frame))) if frame.data_ref().is_some_and(|data| !data.is_empty()));
            if awaiting {
                this.window.get_or_insert_with(|| WindowWait::new(activity.clone())).begin();
            } else if let Some(window) = &this.window {
                window.end();
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.source.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Here(body) => body.size_hint(),
            Source::Relayed(relayed) => relayed.size_hint,
        }
    }
}

impl Relayed {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, SendError>>> {
        if self.end_stream {
            return Poll::Ready(None);
        }
        match self.frames.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Some(frame))) => Poll::Ready(Some(frame)),
            Poll::Ready(Some(None)) => {
                self.end_stream = true;
                Poll::Ready(None)
            }
            Poll::Ready(None) => {
                self.end_stream = true;
                Poll::Ready(Some(Err(SendError::Aborted)))
            }
        }
    }
}
