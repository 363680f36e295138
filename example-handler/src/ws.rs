//! `GET /ws`: a WebSocket echo that greets with the build's version, and a broadcast to
//! every session of the same build.
//!
//! Each text or binary message comes back as it was sent. A text message that starts with
//! `broadcast:` goes, as it is, to every session this build serves (its sender included).
//! A session opened with `?on_swap=close` says goodbye (close code 1012, "service restart")
//! as soon as a newer build serves new requests, so that its client reconnects to the new
//! code; the others go on, on this build, until they end.

use std::sync::OnceLock;

use futures_util::{SinkExt, StreamExt};
use handler_api::upgrade::{Upgrade, Upgraded};
use handler_api::{IntoResponse, Request, Response};
use http::{header, HeaderValue, StatusCode};
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::{NAME, VERSION};

/// The broadcast channel of this build's sessions. A static belongs to one build (one
/// generation): sessions of a newer build have a channel of their own.
fn channel() -> &'static broadcast::Sender<String> {
    static CHANNEL: OnceLock<broadcast::Sender<String>> = OnceLock::new();
    CHANNEL.get_or_init(|| broadcast::channel(64).0)
}

/// Accepts the WebSocket handshake (HTTP/1.1 `Upgrade`, or HTTP/2 extended CONNECT).
pub(crate) fn accept(mut req: Request) -> Response {
    let Some(upgrade) = Upgrade::from_request(&mut req) else {
        let mut res = (StatusCode::UPGRADE_REQUIRED, "connect with a WebSocket client\n").into_response();
        res.headers_mut().insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        return res;
    };
    if !upgrade.protocol().eq_ignore_ascii_case("websocket") {
        return (StatusCode::BAD_REQUEST, "only WebSocket upgrades are served here\n").into_response();
    }
    // HTTP/1.1 proves the handshake with the key; HTTP/2's extended CONNECT has none.
    let accept_key = match req.headers().get("sec-websocket-key") {
        Some(key) => Some(derive_accept_key(key.as_bytes())),
        None if upgrade.is_http2() => None,
        None => return (StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key\n").into_response(),
    };
    let close_on_swap = req.uri().query().is_some_and(|q| q.split('&').any(|p| p == "on_swap=close"));
    let mut res = upgrade.accept(move |io| session(io, close_on_swap));
    if let Some(Ok(key)) = accept_key.map(|k| HeaderValue::from_str(&k)) {
        res.headers_mut().insert("sec-websocket-accept", key);
    }
    res
}

/// One WebSocket session, on the build that accepted it.
async fn session(io: Upgraded, close_on_swap: bool) {
    let ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
    let (mut tx, mut rx) = ws.split();
    let mut broadcasts = channel().subscribe();
    if tx.send(Message::text(format!("hello from {NAME} version={VERSION}"))).await.is_err() {
        return;
    }
    let superseded = handler_api::superseded();
    tokio::pin!(superseded);
    loop {
        tokio::select! {
            biased;
            () = &mut superseded, if close_on_swap => {
                let goodbye = CloseFrame { code: CloseCode::Restart, reason: "service restart".into() };
                let _ = tx.send(Message::Close(Some(goodbye))).await;
                break;
            }
            message = rx.next() => match message {
                Some(Ok(Message::Text(text))) if text.starts_with("broadcast:") => {
                    let _ = channel().send(text.to_string());
                }
                Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => {
                    if tx.send(message).await.is_err() {
                        break;
                    }
                }
                // tungstenite answers pings itself; a close or a failure ends the session.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
            },
            Ok(text) = broadcasts.recv() => {
                if tx.send(Message::text(text)).await.is_err() {
                    break;
                }
            }
        }
    }
}
