//! `hotswap status | reload | rollback | pin VERSION | unpin | canary | upgrade`: the admin API
//! from the shell.
//! Tables for people by default, the API's JSON with `--json`; a refused change exits
//! non-zero with the reason.

#![forbid(unsafe_code)]

use std::sync::Arc;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use comfy_table::{presets, Table};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};

use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

use crate::cmd::cli::AdminCommand;
use crate::control::admin::api::{self, Brief, Outcome};
use crate::control::admin::{self, AdminAddr};

/// Runs one admin command.
pub(crate) async fn run(command: AdminCommand) -> anyhow::Result<()> {
    let args = command.client().clone();
    let addr = args.admin.unwrap_or_default();
    let token = args.admin_token_file.as_deref().map(admin::read_token).transpose()?;
    let (method, path, body) = match &command {
        AdminCommand::Status(_) => (Method::GET, "/status", None),
        AdminCommand::Reload(_) => (Method::POST, "/reload", None),
        AdminCommand::Rollback(_) => (Method::POST, "/rollback", None),
        AdminCommand::Pin { version, .. } => {
            let pin = api::PinRequest { version: version.clone() };
            (Method::POST, "/pin", Some(Bytes::from(serde_json::to_vec(&pin)?)))
        }
        AdminCommand::Unpin(_) => (Method::DELETE, "/pin", None),
        AdminCommand::Canary { promote: true, .. } => (Method::POST, "/canary/promote", None),
        AdminCommand::Canary { abort: true, .. } => (Method::DELETE, "/canary", None),
        AdminCommand::Canary { version, percent, .. } => {
            let order = api::CanaryRequest { version: version.clone(), percent: *percent };
            (Method::POST, "/canary", Some(Bytes::from(serde_json::to_vec(&order)?)))
        }
        AdminCommand::Upgrade { binary, timeout, .. } => {
            // The host may run in another directory: a relative path is this shell's.
            let binary = binary.as_deref().map(std::path::absolute).transpose().context("cannot resolve --binary")?;
            let order = api::UpgradeRequest { binary, timeout: Some(humantime::format_duration(*timeout).to_string()) };
            (Method::POST, "/upgrade", Some(Bytes::from(serde_json::to_vec(&order)?)))
        }
    };
    let (status, answer) = call(&addr, args.admin_ca.as_deref(), token.as_deref(), method, path, body).await?;
    match command {
        AdminCommand::Status(_) => {
            let document: api::Status = read(&addr, status, &answer, args.json)?;
            if !args.json {
                print!("{}", status_text(&document));
            }
        }
        AdminCommand::Reload(_) => {
            let answer: api::ReloadAnswer = read(&addr, status, &answer, args.json)?;
            let (mut line, mut refused) = outcome_text(&answer.outcome);
            if let Some(certificates) = &answer.certificates {
                let (certificates_line, certificates_refused) = certificates_text(certificates);
                line.push('\n');
                line.push_str(&certificates_line);
                refused |= certificates_refused;
            }
            if !args.json {
                println!("{line}");
            }
            if refused {
                bail!("{line}");
            }
        }
        AdminCommand::Upgrade { .. } => {
            let upgrade: api::UpgradeRecord = read(&addr, status, &answer, args.json)?;
            if !args.json {
                println!("{}", upgrade_text(&upgrade));
            }
        }
        _ => {
            let outcome: Outcome = read(&addr, status, &answer, args.json)?;
            let (line, refused) = outcome_text(&outcome);
            if !args.json {
                println!("{line}");
            }
            if refused {
                bail!("{line}");
            }
        }
    }
    Ok(())
}

/// Reads the API's answer as a `T`, printing it as it came with `--json`. An answer of
/// `{"error": "..."}` is an error with that message and the status.
fn read<T: DeserializeOwned>(addr: &AdminAddr, status: StatusCode, answer: &[u8], json: bool) -> anyhow::Result<T> {
    // First: a document this client cannot read (from another version of the host) is still
    // shown in full.
    if json {
        println!("{}", String::from_utf8_lossy(answer).trim_end());
    }
    let read = match serde_json::from_slice::<api::ErrorBody>(answer) {
        Ok(refusal) => Err(refusal),
        Err(_) => Ok(serde_json::from_slice::<T>(answer).map_err(|e| {
            let what = if e.is_data() {
                "a document this client cannot read (is it another version of hotswap?)"
            } else {
                "something that is not JSON"
            };
            anyhow::Error::new(e).context(format!("the admin API at {addr} answered {status} with {what}"))
        })?),
    };
    read.map_err(|api::ErrorBody { error }| anyhow::anyhow!("{error} ({status})"))
}

/// Sends one request to the admin API; returns the status and body. `ca`: for HTTPS, the
/// certificate authority to trust instead of the system's.
async fn call(
    addr: &AdminAddr,
    ca: Option<&std::path::Path>,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<Bytes>,
) -> anyhow::Result<(StatusCode, Bytes)> {
    let unreachable = || format!("cannot reach the admin API at {addr}: is hotswap serving, with this --admin?");
    match addr {
        AdminAddr::Unix(socket) => {
            // Only talk (and send a token) to a socket this user or root serves, in a
            // directory no one else could have put it in.
            admin::check_socket_dir(admin::socket_dir(socket))?;
            let stream = tokio::net::UnixStream::connect(socket).await.with_context(unreachable)?;
            let server = stream.peer_cred().context("cannot tell who serves the admin socket")?.uid();
            let me = crate::sys::effective_uid();
            anyhow::ensure!(
                server == me || server == 0,
                "the admin socket {} is served by user {server}, not by you ({me}) or root: refusing to talk to it",
                socket.display()
            );
            exchange(stream, "hotswap-admin", token, method, path, body).await
        }
        AdminAddr::Tcp(tcp) => {
            // An unspecified address (0.0.0.0, [::]) is this machine's own: the token stays on it.
            if token.is_some() && !tcp.ip().is_loopback() && !tcp.ip().is_unspecified() {
                eprintln!("hotswap: warning: the admin token goes to {tcp} in clear text: serve the admin API over https:// (see --admin)");
            }
            let stream = tokio::net::TcpStream::connect(tcp).await.with_context(unreachable)?;
            // The address itself: without a token, a loopback listener answers only requests
            // that name a loopback host.
            exchange(stream, &tcp.to_string(), token, method, path, body).await
        }
        AdminAddr::Https { host, port } => {
            let connector = tokio_rustls::TlsConnector::from(client_config(ca)?);
            let name = ServerName::try_from(host.clone()).with_context(|| format!("`{host}` is neither a host name nor an IP address"))?;
            let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await.with_context(unreachable)?;
            let stream = connector.connect(name, stream).await.with_context(|| {
                format!("cannot set up TLS with the admin API at {addr} (does its certificate name {host}, and is its issuer trusted? see --admin-ca)")
            })?;
            // An IPv6 address in brackets, as in a URL.
            let authority = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
            exchange(stream, &authority, token, method, path, body).await
        }
        AdminAddr::Off => bail!("--admin off: there is no admin API to talk to"),
    }
}

/// TLS for an https:// admin API, trusting `ca` (PEM) or else the system's authorities.
fn client_config(ca: Option<&std::path::Path>) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(ca) => {
            let certs = CertificateDer::pem_file_iter(ca)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .with_context(|| format!("cannot read the certificate authority {}", ca.display()))?;
            anyhow::ensure!(!certs.is_empty(), "{} holds no certificate (PEM)", ca.display());
            for cert in certs {
                roots.add(cert).with_context(|| format!("cannot use the certificate authority in {}", ca.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            anyhow::ensure!(!roots.is_empty(), "no certificate authority found on this system: give --admin-ca FILE");
        }
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Sends one request on `stream`, naming `host` in its Host header. Every request says it is
/// meant (`X-Hotswap-Admin`): the API refuses changes that do not, as a web page's would.
async fn exchange<S>(
    stream: S,
    host: &str,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<Bytes>,
) -> anyhow::Result<(StatusCode, Bytes)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.context("admin API handshake")?;
    tokio::spawn(connection);
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, host)
        .header(admin::INTENT_HEADER, "1");
    if let Some(token) = token {
        request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let body = body.unwrap_or_default();
    if !body.is_empty() {
        request = request.header(http::header::CONTENT_TYPE, "application/json");
    }
    let response = sender.send_request(request.body(Full::new(body))?).await.context("admin API request (if the host serves it over HTTPS, give --admin https://HOST:PORT)")?;
    let status = response.status();
    let bytes = response.into_body().collect().await.context("admin API answer")?.to_bytes();
    Ok((status, bytes))
}

/// A value for people: `-` when there is none.
fn text(value: Option<impl ToString>) -> String {
    value.map_or_else(|| "-".into(), |v| v.to_string())
}

fn brief(brief: &Brief) -> String {
    format!("{} {} (generation {})", brief.name, brief.version, brief.generation)
}

/// One line saying what a change did, and whether it was refused.
fn outcome_text(outcome: &Outcome) -> (String, bool) {
    match outcome {
        Outcome::Swapped { from, to, refused } => {
            let mut line = format!("swapped: {} -> {}", brief(from), brief(to));
            if !refused.is_empty() {
                line.push_str(&format!(" (refused first: {})", refused.join("; ")));
            }
            (line, false)
        }
        Outcome::Unchanged { serving, reason } => (format!("unchanged: {} serves; {reason}", brief(serving)), false),
        Outcome::Refused { serving, refused } => {
            (format!("refused: {}; {} keeps serving", refused.join("; "), brief(serving)), true)
        }
        Outcome::Canary { serving, canary, percent, refused } => {
            let mut line = format!("canary: {} gets {percent} % of new requests, {} the rest", brief(canary), brief(serving));
            if !refused.is_empty() {
                line.push_str(&format!(" (refused first: {})", refused.join("; ")));
            }
            (line, false)
        }
        Outcome::RolledBack { serving, canary, reason } => {
            (format!("rolled back: {} ({reason}); {} serves every request", brief(canary), brief(serving)), false)
        }
    }
}

/// What a reload did with the certificates, and whether one was refused.
fn certificates_text(reloaded: &api::CertificatesReloaded) -> (String, bool) {
    let mut lines: Vec<String> = reloaded
        .replaced
        .iter()
        .map(|c| format!("certificate: {} ({}) serves new connections, until {}", c.subject, c.names.join(", "), c.not_after))
        .collect();
    lines.extend(reloaded.refused.iter().map(|r| format!("certificate refused: {r}; the previous one keeps serving")));
    if lines.is_empty() {
        lines.push("certificates: unchanged".into());
    }
    (lines.join("\n"), !reloaded.refused.is_empty())
}

/// One line saying what an upgrade did.
fn upgrade_text(u: &api::UpgradeRecord) -> String {
    format!(
        "upgraded: pid {} (hotswap {}) -> pid {} (hotswap {}, {}), serving after {} ms; \
         the old process finishes its responses in progress and exits",
        u.from_pid,
        u.from_version,
        u.to_pid,
        u.to_version,
        u.binary.display(),
        u.took_ms
    )
}

fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_style(presets::NOTHING).set_header(header.to_vec());
    table
}

fn bytes(n: u64) -> String {
    bytesize::ByteSize::b(n).to_string()
}

fn seconds(s: f64) -> String {
    humantime::format_duration(std::time::Duration::from_secs(s as u64)).to_string()
}

/// `hotswap status` for people.
fn status_text(status: &api::Status) -> String {
    let current = &status.current;
    let mut out = format!("host pid {} (hotswap {}), up {}\n", status.pid, status.host_version, seconds(status.uptime_seconds));
    out.push_str(&format!(
        "serving {} {} (generation {}) from {}\n",
        current.name,
        current.version,
        current.generation,
        current.file.display()
    ));
    out.push_str(&format!("  sha256 {}\n", text(current.sha256.as_ref())));
    match &status.pin {
        Some(pin) => out.push_str(&format!(
            "  pinned to {} (by {}): `hotswap unpin` serves the highest version again\n",
            pin.version, pin.by
        )),
        None => out.push_str("  not pinned: the highest version serves\n"),
    }
    out.push_str(&format!("  plugins from {}\n", status.plugin_source.display()));
    if let Some(c) = &status.canary {
        let p99 = |ms: Option<f64>| ms.map_or_else(|| "-".into(), |ms| format!("{ms:.2} ms"));
        let rate = |errors: u64, requests: u64| if requests == 0 { 0.0 } else { errors as f64 * 100.0 / requests as f64 };
        out.push_str(&format!(
            "canary {} {} (generation {}): {} % of new requests{}, for {}\n",
            c.name,
            c.version,
            c.generation,
            c.percent,
            c.sticky.as_ref().map_or_else(String::new, |s| format!(", sticky by {s}")),
            seconds(c.elapsed_seconds)
        ));
        out.push_str(&format!(
            "  canary:  {} requests, 5xx {:.1} %, p99 {}\n  current: {} requests, 5xx {:.1} %, p99 {}\n  {}\n",
            c.requests,
            rate(c.errors, c.requests),
            p99(c.p99_ms),
            c.current_requests,
            rate(c.current_errors, c.current_requests),
            p99(c.current_p99_ms),
            c.verdict
        ));
    }
    out.push('\n');

    let mut resident = table(&["GEN", "VERSION", "STATE", "IN FLIGHT", "STREAMS", "UPGRADED", "SENT", "REQUESTS", "AGE"]);
    for g in &status.resident {
        resident.add_row(vec![
            g.generation.to_string(),
            g.version.clone(),
            match g.blocked_seconds {
                Some(blocked) => format!("{}, blocked {}", g.state, seconds(blocked)),
                None => g.state.clone(),
            },
            g.in_flight.to_string(),
            g.streams.to_string(),
            g.upgraded.to_string(),
            bytes(g.bytes_sent),
            g.requests.to_string(),
            seconds(g.age_seconds),
        ]);
    }
    out.push_str(&format!("resident generations\n{resident}\n\n"));

    let mut history = table(&["GEN", "VERSION", "STATE", "REQUESTS", "AT", "FILE", "SHA-256"]);
    for r in &status.history {
        let sha = text(r.sha256.as_ref());
        history.add_row(vec![
            text(r.generation),
            text(r.version.as_ref()),
            r.state.clone(),
            r.requests.to_string(),
            r.at.clone(),
            r.file.display().to_string(),
            sha.get(..12).map_or(sha.clone(), |s| format!("{s}…")),
        ]);
    }
    out.push_str(&format!("history (newest first)\n{history}\n"));

    if !status.upgrades.is_empty() {
        let mut upgrades = table(&["AT", "FROM", "TO", "BINARY", "TOOK", "CONNECTIONS HANDED OVER"]);
        for u in status.upgrades.iter().rev() {
            upgrades.add_row(vec![
                u.at.clone(),
                format!("pid {} ({})", u.from_pid, u.from_version),
                format!("pid {} ({})", u.to_pid, u.to_version),
                u.binary.display().to_string(),
                format!("{} ms", u.took_ms),
                u.connections_handed_over.to_string(),
            ]);
        }
        out.push_str(&format!("\nhost upgrades (newest first)\n{upgrades}\n"));
    }

    if let Some(tls) = &status.tls {
        let mut certificates = table(&["SUBJECT", "NAMES", "EXPIRES", "IN", "FILE", "SHA-256"]);
        for c in &tls.certificates {
            certificates.add_row(vec![
                c.subject.clone(),
                c.names.join(", "),
                c.not_after.clone(),
                format!("{:.1} days", c.expires_in_days),
                c.cert_file.display().to_string(),
                c.sha256.get(..12).map_or(c.sha256.clone(), |s| format!("{s}…")),
            ]);
        }
        out.push_str(&format!("\nHTTPS certificates (the first serves clients that name no other)\n{certificates}\n"));
        if !tls.refusals.is_empty() {
            out.push_str("certificates refused (newest first; the previous ones kept serving)\n");
            for r in &tls.refusals {
                out.push_str(&format!("  {}  {}\n", r.at, r.reason));
            }
        }
    }

    if !status.refusals.is_empty() {
        out.push_str("\nrecent refusals (newest first)\n");
        for r in &status.refusals {
            out.push_str(&format!("  {}  {}: {}\n", r.at, r.file.display(), text(r.reason.as_ref())));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_outcome_is_an_error_with_its_reason() {
        let serving = Brief { generation: 2, name: "app".into(), version: "1.0.0".into(), file: "app.so".into() };
        let (line, refused) = outcome_text(&Outcome::Refused { serving: serving.clone(), refused: vec!["init failed: no".into()] });
        assert!(refused);
        assert_eq!(line, "refused: init failed: no; app 1.0.0 (generation 2) keeps serving");
        let (line, refused) = outcome_text(&Outcome::Unchanged { serving, reason: "it serves already".into() });
        assert!(!refused && line.starts_with("unchanged: app 1.0.0"), "{line}");
    }
}
