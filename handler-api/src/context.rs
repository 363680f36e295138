//! [`RequestContext`]: what the host knows of a request beyond its head.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

use http::uri::Scheme;

use crate::abi::{self, FfiRequest, FfiSocketAddr};
use crate::Request;

/// Where a request came from and how: the connection's addresses, the scheme, and the id the
/// host's log knows it by. Every request a plugin gets carries one in its extensions.
///
/// # Example
///
/// ```
/// use handler_api::{Request, RequestContext};
///
/// async fn whoami(req: Request) -> String {
///     match RequestContext::of(&req) {
///         Some(cx) => format!("{} (request {})\n", cx.peer_addr().map_or("?".into(), |a| a.to_string()), cx.request_id()),
///         None => "called without a host\n".into(),
///     }
/// }
/// ```
#[derive(Clone, Debug)]
pub struct RequestContext {
    peer: Option<SocketAddr>,
    local: Option<SocketAddr>,
    scheme: Scheme,
    request_id: RequestId,
}

impl RequestContext {
    /// A context, for a request made in a test or a server of your own.
    pub fn new(peer: Option<SocketAddr>, local: Option<SocketAddr>, scheme: Scheme, request_id: RequestId) -> Self {
        RequestContext { peer, local, scheme, request_id }
    }

    /// The context of `req`, if a host made it (a request built in a test has none unless
    /// the test inserted one).
    pub fn of<B>(req: &Request<B>) -> Option<&RequestContext> {
        req.extensions().get::<RequestContext>()
    }

    /// The client's address: the other end of the connection (a proxy's, behind one).
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer
    }

    /// The host's address the client connected to.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local
    }

    /// `http` or `https`: how the client reached the host.
    pub fn scheme(&self) -> &Scheme {
        &self.scheme
    }

    /// The request's id, which the host's log lines about it carry.
    pub fn request_id(&self) -> RequestId {
        self.request_id
    }

    pub(crate) fn from_ffi(r: &FfiRequest) -> RequestContext {
        RequestContext {
            peer: socket_addr(&r.peer),
            local: socket_addr(&r.local),
            scheme: if r.scheme == abi::SCHEME_HTTPS { Scheme::HTTPS } else { Scheme::HTTP },
            request_id: RequestId(r.request_id),
        }
    }
}

fn socket_addr(a: &FfiSocketAddr) -> Option<SocketAddr> {
    match a.family {
        abi::ADDR_IPV4 => {
            let [b0, b1, b2, b3, ..] = a.ip;
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(b0, b1, b2, b3)), a.port))
        }
        abi::ADDR_IPV6 => Some(SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(a.ip), a.port, 0, a.scope_id))),
        _ => None,
    }
}

/// Identifies one request in the host's log: unique in the host process for its life. Shown
/// as 16 hexadecimal digits, as the host's log shows it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}
