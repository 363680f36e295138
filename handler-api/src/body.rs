//! [`Body`]: the streaming body of requests and responses.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use futures_core::Stream;
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::{Frame, SizeHint};

use crate::abi::{self, FfiHostBody, FfiPoll, FfiStr};
use crate::{host, BoxError};

/// A streaming HTTP body, used for both requests and responses.
///
/// A request's body arrives from the client chunk by chunk as you poll it: a 1 GiB upload is
/// never held in memory unless you collect it. A response body is either complete
/// ([`Body::from`] a string or bytes), empty, or a [`Stream`] of chunks that the host polls
/// as the client reads, so a slow client slows the stream instead of filling memory.
///
/// # Example
///
/// ```
/// use handler_api::{Body, Request, Response};
///
/// // Count the bytes of an upload without buffering it.
/// async fn count(req: Request) -> Response {
///     let mut body = req.into_body();
///     let mut total = 0usize;
///     while let Some(chunk) = body.chunk().await {
///         match chunk {
///             Ok(bytes) => total += bytes.len(),
///             Err(e) => return Response::new(Body::from(format!("upload failed: {e}"))),
///         }
///     }
///     Response::new(Body::from(format!("{total} bytes\n")))
/// }
/// ```
pub struct Body {
    kind: Kind,
}

pub(crate) enum Kind {
    Empty,
    Full(Bytes),
    Stream { stream: Pin<Box<dyn Stream<Item = Result<Bytes, BoxError>> + Send>>, exact_len: Option<u64> },
    Host(HostBody),
}

impl Body {
    /// A body with no bytes.
    pub fn empty() -> Body {
        Body { kind: Kind::Empty }
    }

    /// A body that yields the frames of any [`http_body::Body`]: axum's, hyper's,
    /// http-body-util's, or a [`Body`] (returned as it is). Its exact length, when the body
    /// knows it, becomes the response's `Content-Length`. Trailers frames are dropped (the
    /// host sends no response trailers); an error aborts the response, as with
    /// [`Body::from_stream`].
    ///
    /// A body whose bytes are all there already (axum's answer to `String`, `Json` or
    /// `Full`) is taken whole, as [`Body::from`] bytes would be: the host copies it once
    /// instead of polling it chunk by chunk.
    ///
    /// # Example
    ///
    /// ```
    /// use handler_api::Body;
    /// use http_body_util::Full;
    ///
    /// let body = Body::new(Full::new(bytes::Bytes::from_static(b"hello")));
    /// assert_eq!(body.exact_len(), Some(5));
    /// ```
    pub fn new<B>(body: B) -> Body
    where
        B: http_body::Body + Send + 'static,
        B::Error: Into<BoxError>,
    {
        // Not wrapped again when it is one of ours.
        let mut slot = Some(body);
        if let Some(ours) = (&mut slot as &mut dyn std::any::Any).downcast_mut::<Option<Body>>() {
            return ours.take().unwrap_or_default();
        }
        let Some(body) = slot else { return Body::empty() };
        if body.is_end_stream() {
            return Body::empty();
        }
        let exact_len = body.size_hint().exact();
        let mut body = Box::pin(body);
        let mut first = None;
        if exact_len.is_some() {
            // A body that knows its length usually has its bytes in hand: one poll, with a waker
            // that does nothing, finds out. `Pending` here loses nothing: the host polls again,
            // with its own waker, before it waits.
            let mut cx = Context::from_waker(std::task::Waker::noop());
            match body.as_mut().poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(mut data) = frame.into_data() {
                        let bytes = data.copy_to_bytes(data.remaining());
                        if body.is_end_stream() {
                            return Body::from(bytes);
                        }
                        first = Some(Ok(bytes));
                    }
                }
                Poll::Ready(Some(Err(e))) => first = Some(Err(e.into())),
                Poll::Ready(None) => return Body::empty(),
                Poll::Pending => {}
            }
        }
        let stream = Frames { first, body };
        Body { kind: Kind::Stream { stream: Box::pin(stream), exact_len } }
    }

    /// A body that yields the items of `stream` as chunks. An `Err` item aborts the response
    /// (the client sees a broken connection, never a truncated body that looks complete).
    pub fn from_stream<S, E>(stream: S) -> Body
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        Body { kind: Kind::Stream { stream: Box::pin(MapErr(stream)), exact_len: None } }
    }

    /// Like [`Body::from_stream`], for a stream that yields exactly `len` bytes in total; the
    /// response gets a `Content-Length` instead of chunked encoding.
    pub fn sized_stream<S, E>(len: u64, stream: S) -> Body
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        Body { kind: Kind::Stream { stream: Box::pin(MapErr(stream)), exact_len: Some(len) } }
    }

    /// The next chunk, `None` at the end.
    ///
    /// # Cancel safety
    /// Cancel safe: a chunk is only taken out of the body when this future completes.
    pub async fn chunk(&mut self) -> Option<Result<Bytes, BoxError>> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_chunk(cx)).await
    }

    /// Reads the whole body into memory. Use it for small bodies only.
    pub async fn collect(mut self) -> Result<Bytes, BoxError> {
        let mut all = Vec::new();
        while let Some(chunk) = self.chunk().await {
            all.extend_from_slice(&chunk?);
        }
        Ok(all.into())
    }

    /// The exact length of what is left of the body, when known: all of it before the first
    /// chunk is read. A body handed on after some of it was read (as a response, say) is sent
    /// with this length.
    pub fn exact_len(&self) -> Option<u64> {
        match &self.kind {
            Kind::Empty => Some(0),
            Kind::Full(b) => Some(b.len() as u64),
            Kind::Stream { exact_len, .. } => *exact_len,
            Kind::Host(h) => h.exact_len,
        }
    }

    pub(crate) fn from_kind(kind: Kind) -> Body {
        Body { kind }
    }

    pub(crate) fn into_kind(self) -> Kind {
        self.kind
    }

    pub(crate) fn from_host(body: FfiHostBody) -> Body {
        if body.handle.is_null() {
            return Body::empty();
        }
        let exact_len = (body.exact_len != abi::UNKNOWN_LENGTH).then_some(body.exact_len);
        Body { kind: Kind::Host(HostBody { handle: body.handle, exact_len, ended: false, trailers: None, trailers_yielded: false }) }
    }

    /// The trailers of a request body, once it has ended (`None` before, and when the client
    /// sent none).
    pub fn trailers(&self) -> Option<&HeaderMap> {
        match &self.kind {
            Kind::Host(h) => h.trailers.as_ref(),
            _ => None,
        }
    }

    pub(crate) fn poll_chunk(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, BoxError>>> {
        let (polled, exact_len) = match &mut self.kind {
            Kind::Empty => return Poll::Ready(None),
            Kind::Full(_) => {
                return match std::mem::replace(&mut self.kind, Kind::Empty) {
                    Kind::Full(b) if !b.is_empty() => Poll::Ready(Some(Ok(b))),
                    _ => Poll::Ready(None),
                };
            }
            Kind::Stream { stream, exact_len } => (stream.as_mut().poll_next(cx), exact_len),
            Kind::Host(h) => (h.poll_chunk(cx), &mut h.exact_len),
        };
        if let (Poll::Ready(Some(Ok(chunk))), Some(left)) = (&polled, exact_len) {
            *left = left.saturating_sub(chunk.len() as u64);
        }
        polled
    }
}

impl Default for Body {
    fn default() -> Body {
        Body::empty()
    }
}

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Empty => "empty",
            Kind::Full(_) => "full",
            Kind::Stream { .. } => "stream",
            Kind::Host(_) => "request",
        };
        f.debug_struct("Body").field("kind", &kind).field("exact_len", &self.exact_len()).finish()
    }
}

impl From<Bytes> for Body {
    fn from(b: Bytes) -> Body {
        Body { kind: Kind::Full(b) }
    }
}
impl From<Vec<u8>> for Body {
    fn from(v: Vec<u8>) -> Body {
        Bytes::from(v).into()
    }
}
impl From<String> for Body {
    fn from(s: String) -> Body {
        Bytes::from(s).into()
    }
}
impl From<&'static str> for Body {
    fn from(s: &'static str) -> Body {
        Bytes::from_static(s.as_bytes()).into()
    }
}
impl From<&'static [u8]> for Body {
    fn from(s: &'static [u8]) -> Body {
        Bytes::from_static(s).into()
    }
}
impl From<()> for Body {
    fn from(_: ()) -> Body {
        Body::empty()
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut *this).poll_chunk(cx) {
            Poll::Ready(None) => {}
            polled => return polled.map(|c| c.map(|r| r.map(Frame::data))),
        }
        // The end of the data: a request body's trailers follow, once.
        if let Kind::Host(h) = &mut this.kind {
            if !std::mem::replace(&mut h.trailers_yielded, true) {
                if let Some(trailers) = &h.trailers {
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers.clone()))));
                }
            }
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.kind, Kind::Empty)
    }

    fn size_hint(&self) -> SizeHint {
        self.exact_len().map(SizeHint::with_exact).unwrap_or_default()
    }
}

impl Stream for Body {
    type Item = Result<Bytes, BoxError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.poll_chunk(cx)
    }
}

struct MapErr<S>(S);

impl<S, E> Stream for MapErr<S>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: Into<BoxError>,
{
    type Item = Result<Bytes, BoxError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // SAFETY: structural pinning of the only field; MapErr never moves it.
        let inner = unsafe { self.map_unchecked_mut(|s| &mut s.0) };
        inner.poll_next(cx).map(|o| o.map(|r| r.map_err(Into::into)))
    }
}

/// The data of an [`http_body::Body`], as a stream of chunks (see [`Body::new`]).
struct Frames<B: ?Sized> {
    /// What `Body::new`'s first poll found.
    first: Option<Result<Bytes, BoxError>>,
    body: Pin<Box<B>>,
}

impl<B> Stream for Frames<B>
where
    B: http_body::Body + ?Sized,
    B::Error: Into<BoxError>,
{
    type Item = Result<Bytes, BoxError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // `Frames` is `Unpin`: its body is boxed.
        let this = self.get_mut();
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(first));
        }
        loop {
            return match this.body.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(mut data) => Poll::Ready(Some(Ok(data.copy_to_bytes(data.remaining())))),
                    // Trailers: the host sends none; go on to the end.
                    Err(_) => continue,
                },
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            };
        }
    }
}

/// A request body still owned by the host; chunks are copied out as they are polled.
pub(crate) struct HostBody {
    handle: *mut core::ffi::c_void,
    exact_len: Option<u64>,
    ended: bool,
    /// Read from the host at the end.
    trailers: Option<HeaderMap>,
    /// Whether `poll_frame` has handed them out.
    trailers_yielded: bool,
}

// SAFETY: the handle is an exclusively owned host object (hyper's `Incoming`, which is Send);
// the host's functions on it may be called from any thread of the generation.
unsafe impl Send for HostBody {}

impl HostBody {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BoxError>>> {
        if self.handle.is_null() || self.ended {
            return Poll::Ready(None);
        }
        let waker = abi::waker::lend(cx.waker());
        let mut chunk = FfiStr::EMPTY;
        // SAFETY: `handle` is live (not yet dropped) and `waker`/`chunk` outlive the call.
        let r = unsafe { (host().body_poll)(self.handle, &waker, &mut chunk) };
        match r {
            FfiPoll::PENDING => Poll::Pending,
            FfiPoll::READY if chunk.ptr.is_null() => {
                self.ended = true;
                self.trailers = self.read_trailers();
                Poll::Ready(None)
            }
            // SAFETY: the host keeps the chunk valid until the next call on this body; it is
            // copied right here.
            FfiPoll::READY => Poll::Ready(Some(Ok(Bytes::copy_from_slice(unsafe { chunk.as_bytes() })))),
            _ => Poll::Ready(Some(Err("the client's request body failed (connection broken)".into()))),
        }
    }
}

impl HostBody {
    /// The trailers the host received, once the body has ended.
    fn read_trailers(&mut self) -> Option<HeaderMap> {
        let (mut headers, mut len) = (std::ptr::null(), 0);
        // SAFETY: `handle` is live; the out-parameters outlive the call.
        if unsafe { (host().body_trailers)(self.handle, &mut headers, &mut len) } != FfiPoll::READY || len == 0 {
            return None;
        }
        // SAFETY: the host keeps `len` headers at `headers` valid until the next call on this
        // body; they are copied right here.
        let headers = unsafe { std::slice::from_raw_parts(headers, len) };
        // More trailers than a HeaderMap holds: those it holds (a panic here would abort the
        // request).
        let mut map = HeaderMap::try_with_capacity(len).unwrap_or_default();
        for h in headers {
            // SAFETY: as above.
            let (name, value) = unsafe { (h.name.as_bytes(), h.value.as_bytes()) };
            if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
                if map.try_append(name, value).is_err() {
                    break;
                }
            }
        }
        Some(map)
    }
}

impl Drop for HostBody {
    fn drop(&mut self) {
        if !self.handle.is_null() {
            // SAFETY: the handle is released exactly once, here.
            unsafe { (host().body_drop)(self.handle) };
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use http_body::{Frame, SizeHint};
    use http_body_util::{BodyExt, Full, StreamBody};

    use super::{Body, Kind};
    use crate::BoxError;

    /// Reads `body` to its end. The bodies here never wait without waking: a loop of polls
    /// with a waker that does nothing is enough.
    fn drain(mut body: Body) -> Result<Vec<u8>, String> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut all = Vec::new();
        loop {
            match Pin::new(&mut body).poll_chunk(&mut cx) {
                Poll::Ready(Some(chunk)) => all.extend_from_slice(&chunk.map_err(|e| e.to_string())?),
                Poll::Ready(None) => return Ok(all),
                Poll::Pending => {}
            }
        }
    }

    #[test]
    fn a_complete_body_is_taken_whole_with_its_length() {
        let body = Body::new(Full::new(Bytes::from_static(b"hello")));
        assert!(matches!(&body.kind, Kind::Full(b) if b == "hello"), "{body:?}");
        assert_eq!(body.exact_len(), Some(5));
        // Boxed bodies (axum's) report the same.
        let body = Body::new(Full::new(Bytes::from_static(b"hi")).map_err(|never| -> BoxError { match never {} }).boxed());
        assert!(matches!(&body.kind, Kind::Full(b) if b == "hi"), "{body:?}");
    }

    #[test]
    fn our_own_body_is_not_wrapped_again() {
        assert!(matches!(Body::new(Body::from("x")).kind, Kind::Full(_)));
        assert!(matches!(Body::new(http_body_util::Empty::<Bytes>::new()).kind, Kind::Empty));
    }

    #[test]
    fn a_stream_keeps_every_chunk_skips_trailers_and_has_no_length() {
        let frames = futures_util::stream::iter([
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"one"))),
            Ok(Frame::trailers(http::HeaderMap::new())),
            Ok(Frame::data(Bytes::from_static(b"two"))),
        ]);
        let body = Body::new(StreamBody::new(frames));
        assert_eq!(body.exact_len(), None);
        assert_eq!(drain(body).unwrap(), b"onetwo");
    }

    /// A body that knows its length but is not ready at once; then fails, if asked to.
    struct Later {
        polls: u32,
        fail: bool,
    }

    impl http_body::Body for Later {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            self.polls += 1;
            match self.polls {
                1 => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                2 if self.fail => Poll::Ready(Some(Err("broken".into()))),
                2 => Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"late"))))),
                _ => Poll::Ready(None),
            }
        }

        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(4)
        }
    }

    #[test]
    fn a_body_not_ready_at_first_is_polled_again_and_keeps_its_length() {
        let body = Body::new(Later { polls: 0, fail: false });
        assert!(matches!(body.kind, Kind::Stream { exact_len: Some(4), .. }), "{body:?}");
        assert_eq!(drain(body).unwrap(), b"late");
    }

    #[test]
    fn a_body_partly_read_tells_the_length_of_what_is_left() {
        let chunks = futures_util::stream::iter([Ok::<_, BoxError>(Bytes::from_static(b"magic")), Ok(Bytes::from_static(b"rest"))]);
        let mut body = Body::sized_stream(9, chunks);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(matches!(Pin::new(&mut body).poll_chunk(&mut cx), Poll::Ready(Some(Ok(b))) if b == "magic"));
        assert_eq!(body.exact_len(), Some(4));
        assert_eq!(http_body::Body::size_hint(&body).exact(), Some(4));
        assert_eq!(drain(body).unwrap(), b"rest");
    }

    #[test]
    fn an_error_is_kept_for_the_reader() {
        assert_eq!(drain(Body::new(Later { polls: 0, fail: true })).unwrap_err(), "broken");
        // Found by `Body::new`'s own first poll: still the reader's to see.
        assert_eq!(drain(Body::new(Later { polls: 1, fail: true })).unwrap_err(), "broken");
    }
}
