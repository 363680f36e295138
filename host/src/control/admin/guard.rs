//! What the admin API checks so that no one but the operator drives it: web pages in the
//! operator's browser, and other users of the machine.
//!
//! - **Changes must say they are meant.** A web page can send a "simple" cross-site POST to
//!   `http://127.0.0.1:9090/rollback` (a form, or `fetch` with `text/plain`) without asking the
//!   server first. It cannot send `Content-Type: application/json` or a header of its own
//!   (`X-Hotswap-Admin`) without a CORS preflight, which this API never grants. So every
//!   change must carry one of the two.
//! - **The Host header names a loopback host** on a TCP listener without a token: a page of
//!   `evil.example` whose name is re-pointed to 127.0.0.1 (DNS rebinding) reaches the listener
//!   as its own origin, and could read `/status`; its requests still say `Host: evil.example`.
//!   With a token, the token is the protection (and the API may be used from other machines).
//! - **The token file is private**: readable by no one but its owner, who is this host's user
//!   or root (as the trusted digests list).

#![forbid(unsafe_code)]

use std::io::Read as _;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use http::{header, HeaderMap, Request, Uri};

use crate::control::admin::error::AdminError;

/// The header a script sends (with any value) to say a change is meant, when its body is not
/// JSON: `X-Hotswap-Admin: 1`.
pub(crate) const INTENT_HEADER: &str = "x-hotswap-admin";

/// The answer to a change that carries neither.
pub(crate) const INTENT_REFUSED: &str = "a change must carry `Content-Type: application/json` or an `X-Hotswap-Admin: 1` \
     header (which a web page cannot send to this API): for example \
     `curl -X POST -H 'X-Hotswap-Admin: 1' http://127.0.0.1:9090/reload`";

/// Whether a change request carries what a cross-site request from a browser cannot: a JSON
/// content type or the [`INTENT_HEADER`].
pub(crate) fn is_intended(headers: &HeaderMap) -> bool {
    if headers.contains_key(INTENT_HEADER) {
        return true;
    }
    headers.get_all(header::CONTENT_TYPE).iter().any(|value| {
        let essence = value.to_str().unwrap_or_default().split(';').next().unwrap_or_default().trim();
        essence.eq_ignore_ascii_case("application/json")
    })
}

/// Checks that every host `request` names (its `Host` header, and the authority of an
/// absolute URI) is a loopback one: `localhost` or a loopback address, with any port. The
/// error is the answer to send.
pub(crate) fn check_host<B>(request: &Request<B>) -> Result<(), String> {
    let hosts: Vec<&str> = request.headers().get_all(header::HOST).iter().map(|v| v.to_str().unwrap_or("(not text)")).collect();
    if hosts.is_empty() {
        return Err("the Host header is missing: this admin API answers only requests that name a loopback host \
                    (`Host: 127.0.0.1`, `localhost` or `[::1]`)"
            .to_owned());
    }
    let named = request.uri().authority().map(|a| a.as_str());
    for host in hosts.iter().copied().chain(named) {
        if !is_loopback_host(host) {
            return Err(format!(
                "the Host header `{host}` is not a loopback host: without a token this admin API answers only requests \
                 to 127.0.0.1, localhost or [::1] (a web page reaching it under another name is refused)"
            ));
        }
    }
    Ok(())
}

/// Whether `authority` (a `Host` value: a name or address, maybe with a port) is
/// `localhost`, or an address on the loopback interface. Addresses cannot be re-pointed, and
/// `localhost` resolves on this machine.
fn is_loopback_host(authority: &str) -> bool {
    let Ok(uri) = format!("http://{authority}/").parse::<Uri>() else { return false };
    let Some(host) = uri.host() else { return false };
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return false; // user information is not a Host
    }
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    host.eq_ignore_ascii_case("localhost") || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Reads the host's bearer token from `path`, which must be private: refused if its group or
/// others may read or write it, or if it belongs to someone other than this host's user or
/// root. Checked on the file as opened.
pub(crate) fn read_private_token(path: &Path) -> Result<String, AdminError> {
    let read = |source| AdminError::ReadToken { path: path.to_path_buf(), source };
    let mut file = std::fs::File::open(path).map_err(read)?;
    let meta = file.metadata().map_err(read)?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        let who = crate::plugin::trust::let_in(mode, 0o077);
        return Err(AdminError::OpenToken { path: path.to_path_buf(), who, mode });
    }
    let uid = crate::sys::effective_uid();
    if meta.uid() != uid && meta.uid() != 0 {
        return Err(AdminError::ForeignToken { path: path.to_path_buf(), owner: meta.uid(), uid });
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(read)?;
    token_in(&text, path)
}

/// The token a token file holds (surrounding whitespace is not part of it).
pub(crate) fn token_in(text: &str, path: &Path) -> Result<String, AdminError> {
    let token = text.trim();
    if token.is_empty() {
        return Err(AdminError::EmptyToken { path: path.to_path_buf() });
    }
    Ok(token.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_host(host: &str) -> Request<()> {
        Request::builder().uri("/status").header(header::HOST, host).body(()).unwrap()
    }

    #[test]
    fn only_loopback_hosts_pass() {
        for good in ["127.0.0.1", "127.0.0.1:9090", "localhost", "LOCALHOST:1", "[::1]", "[::1]:9090", "127.1.2.3:80"] {
            assert!(check_host(&with_host(good)).is_ok(), "{good}");
        }
        for bad in ["evil.example", "evil.example:9090", "localhost.evil.example", "127.0.0.1.nip.io", "10.0.0.1:9090", "[::2]", "", "a@127.0.0.1"] {
            let refused = check_host(&with_host(bad)).expect_err(bad);
            assert!(refused.contains("Host header") && refused.contains(bad), "{refused}");
        }
        let missing = Request::builder().uri("/status").body(()).unwrap();
        assert!(check_host(&missing).unwrap_err().contains("Host header is missing"));
        // An absolute URI names the host the request is for, whatever the Host header says.
        let absolute = Request::builder().uri("http://evil.example/status").header(header::HOST, "127.0.0.1").body(()).unwrap();
        assert!(check_host(&absolute).unwrap_err().contains("evil.example"));
    }

    #[test]
    fn a_change_needs_json_or_the_header() {
        let headers = |pairs: &[(&str, &str)]| {
            let mut map = HeaderMap::new();
            for (k, v) in pairs {
                map.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
            }
            map
        };
        assert!(is_intended(&headers(&[("content-type", "application/json")])));
        assert!(is_intended(&headers(&[("content-type", "Application/JSON; charset=utf-8")])));
        assert!(is_intended(&headers(&[("x-hotswap-admin", "1")])));
        assert!(is_intended(&headers(&[("content-type", "text/plain"), ("X-Hotswap-Admin", "yes")])));
        for simple in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/jsonp"] {
            assert!(!is_intended(&headers(&[("content-type", simple)])), "{simple}");
        }
        assert!(!is_intended(&headers(&[])));
    }
}
