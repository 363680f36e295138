//! Connections handed from one host process to the next (`hotswap upgrade`).
//!
//! When this host hands over, each of its HTTP/1 connections goes to the new host at its next
//! request boundary: hyper is told to stop without shutting the socket down, and gives back
//! the socket with the bytes it had read of the next request (`connection::drive_http1`).
//! The socket and those bytes travel together; the new host serves the socket as if it had
//! accepted it, reading those bytes first. The client keeps its connection and notices
//! nothing. HTTP/2 connections and upgraded ones (WebSockets) finish on the old host.

#![forbid(unsafe_code)]

use bytes::Bytes;

/// A connection on its way to another host process.
#[derive(Debug)]
pub(crate) struct Handed {
    pub(crate) stream: std::net::TcpStream,
    /// What the previous host had read from it and not yet served: the start of the next
    /// request, if any.
    pub(crate) buffered: Bytes,
    /// It owes the head of its first request (a new connection that has sent nothing yet):
    /// the header read timeout applies, not the idle timeout.
    pub(crate) reading_head: bool,
}
