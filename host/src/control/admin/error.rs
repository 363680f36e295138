//! Why the admin API could not start, or its socket cannot be trusted.

#![forbid(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Why the admin API could not be set up. The message is for the operator; the cause (an I/O
/// error) is its `source`, which the command line's `{:#}`, or [`AdminError::chain`], appends.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AdminError {
    #[error("cannot read the admin token file {}", path.display())]
    ReadToken { path: PathBuf, source: io::Error },
    #[error("the admin token file {} is empty: put a long random string in it", path.display())]
    EmptyToken { path: PathBuf },
    #[error(
        "the admin token file {} is readable or writable by {who} (mode {mode:04o}), who could use or replace the token: \
         run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    OpenToken { path: PathBuf, who: &'static str, mode: u32 },
    #[error(
        "the admin token file {} belongs to uid {owner}, neither this host's user (uid {uid}) nor root, who could \
         replace the token: run `chown {uid} {}` and `chmod 600 {}`",
        path.display(),
        path.display(),
        path.display()
    )]
    ForeignToken { path: PathBuf, owner: u32, uid: u32 },
    #[error(
        "the admin API on {addr} would be reachable from other machines without a token: \
         give --admin-token-file FILE (a file holding a long random string), or listen on 127.0.0.1"
    )]
    OpenWithoutToken { addr: SocketAddr },
    #[error("--admin https://{host}:PORT: give the IP address to listen on (0.0.0.0 for every one), not a name")]
    ListenOnName { host: String },
    #[error("cannot listen for the admin API on {addr}")]
    ListenTcp { addr: SocketAddr, source: io::Error },
    /// The address a TCP listener was bound to could not be read.
    #[error(transparent)]
    LocalAddr(io::Error),
    #[error("cannot keep a descriptor of the admin listener, for a later `hotswap upgrade`: {0}")]
    Share(io::Error),
    #[error("cannot create {} for the admin socket", dir.display())]
    CreateDir { dir: PathBuf, source: io::Error },
    #[error("{} exists and is not a socket: give --admin a path where nothing is yet", path.display())]
    NotASocket { path: PathBuf },
    #[error(
        "another hotswap host answers on the admin socket {}: give this one another --admin (or --admin off)",
        path.display()
    )]
    SocketInUse { path: PathBuf },
    #[error("cannot remove the stale admin socket {}", path.display())]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("cannot listen for the admin API on {}", path.display())]
    ListenUnix { path: PathBuf, source: io::Error },
    #[error("cannot make the admin socket {} private", path.display())]
    MakePrivate { path: PathBuf, source: io::Error },
    #[error("cannot use {} for the admin socket", dir.display())]
    UseDir { dir: PathBuf, source: io::Error },
    #[error(
        "the admin socket's directory {} belongs to user {owner}, not to this host's user ({uid}) or root: \
         someone else could replace the socket; give --admin a path in a directory of your own",
        dir.display()
    )]
    ForeignDir { dir: PathBuf, owner: u32, uid: u32 },
    #[error(
        "the admin socket's directory {} is writable by others (mode {mode:04o}), who could replace the socket: \
         run `chmod go-w {}`, or give --admin a path in a private directory",
        dir.display(),
        dir.display()
    )]
    OpenDir { dir: PathBuf, mode: u32 },
}

impl AdminError {
    /// The message followed by its causes, each after `: ` (as the command line prints errors).
    pub(crate) fn chain(&self) -> String {
        let mut text = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(e) = cause {
            text.push_str(": ");
            text.push_str(&e.to_string());
            cause = e.source();
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_messages_read_as_before() {
        let e = AdminError::OpenWithoutToken { addr: "0.0.0.0:9090".parse().unwrap() };
        assert_eq!(
            e.to_string(),
            "the admin API on 0.0.0.0:9090 would be reachable from other machines without a token: \
             give --admin-token-file FILE (a file holding a long random string), or listen on 127.0.0.1"
        );
        let e = AdminError::OpenDir { dir: "/srv/run".into(), mode: 0o777 };
        assert_eq!(
            e.to_string(),
            "the admin socket's directory /srv/run is writable by others (mode 0777), who could replace the socket: \
             run `chmod go-w /srv/run`, or give --admin a path in a private directory"
        );
        let e = AdminError::OpenToken { path: "/etc/token".into(), who: "its group and others", mode: 0o644 };
        assert_eq!(
            e.to_string(),
            "the admin token file /etc/token is readable or writable by its group and others (mode 0644), \
             who could use or replace the token: run `chmod 600 /etc/token`"
        );
        let e = AdminError::ReadToken { path: "/etc/token".into(), source: io::Error::from(io::ErrorKind::NotFound) };
        assert_eq!(e.chain(), "cannot read the admin token file /etc/token: entity not found");
    }
}
