//! `hotswap status | reload | rollback | pin VERSION | unpin`: the admin API from the shell.
//! Tables for people by default, the API's JSON with `--json`; a refused change exits
//! non-zero with the reason.

#![forbid(unsafe_code)]

use anyhow::{bail, Context as _};
use bytes::Bytes;
use comfy_table::{presets, Table};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::control::admin::{self, AdminAddr};
use crate::cmd::cli::AdminCommand;

/// Runs one admin command.
pub async fn run(command: AdminCommand) -> anyhow::Result<()> {
    let args = command.client().clone();
    let addr = args.admin.unwrap_or_default();
    let token = args.admin_token_file.as_deref().map(admin::read_token).transpose()?;
    let (method, path, body) = match &command {
        AdminCommand::Status(_) => (Method::GET, "/status", None),
        AdminCommand::Reload(_) => (Method::POST, "/reload", None),
        AdminCommand::Rollback(_) => (Method::POST, "/rollback", None),
        AdminCommand::Pin { version, .. } => (Method::POST, "/pin", Some(json!({ "version": version }))),
        AdminCommand::Unpin(_) => (Method::DELETE, "/pin", None),
    };
    let (status, answer) = call(&addr, token.as_deref(), method, path, body).await?;
    let value: Value = serde_json::from_slice(&answer)
        .with_context(|| format!("the admin API at {addr} answered {status} with something that is not JSON"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    }
    if let Some(message) = value.get("error").and_then(Value::as_str) {
        bail!("{message} ({status})");
    }
    match command {
        AdminCommand::Status(_) if !args.json => print!("{}", status_text(&value)),
        AdminCommand::Status(_) => {}
        _ => {
            let (line, refused) = outcome_text(&value);
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

/// Sends one request to the admin API; returns the status and body.
async fn call(addr: &AdminAddr, token: Option<&str>, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<(StatusCode, Bytes)> {
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
            exchange(stream, token, method, path, body).await
        }
        AdminAddr::Tcp(tcp) => {
            let stream = tokio::net::TcpStream::connect(tcp).await.with_context(unreachable)?;
            exchange(stream, token, method, path, body).await
        }
        AdminAddr::Off => bail!("--admin off: there is no admin API to talk to"),
    }
}

async fn exchange<S>(stream: S, token: Option<&str>, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<(StatusCode, Bytes)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.context("admin API handshake")?;
    tokio::spawn(connection);
    let mut request = Request::builder().method(method).uri(path).header(http::header::HOST, "hotswap-admin");
    if let Some(token) = token {
        request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    if !body.is_empty() {
        request = request.header(http::header::CONTENT_TYPE, "application/json");
    }
    let response = sender.send_request(request.body(Full::new(body))?).await.context("admin API request")?;
    let status = response.status();
    let bytes = response.into_body().collect().await.context("admin API answer")?.to_bytes();
    Ok((status, bytes))
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn brief(value: &Value) -> String {
    format!("{} {} (generation {})", text(&value["name"]), text(&value["version"]), text(&value["generation"]))
}

/// One line saying what a change did, and whether it was refused.
fn outcome_text(value: &Value) -> (String, bool) {
    let refused_list = |v: &Value| v.as_array().map(|a| a.iter().map(text).collect::<Vec<_>>().join("; ")).unwrap_or_default();
    match value["outcome"].as_str() {
        Some("swapped") => {
            let mut line = format!("swapped: {} -> {}", brief(&value["from"]), brief(&value["to"]));
            let refused = refused_list(&value["refused"]);
            if !refused.is_empty() {
                line.push_str(&format!(" (refused first: {refused})"));
            }
            (line, false)
        }
        Some("unchanged") => (format!("unchanged: {} serves; {}", brief(&value["serving"]), text(&value["reason"])), false),
        Some("refused") => {
            (format!("refused: {}; {} keeps serving", refused_list(&value["refused"]), brief(&value["serving"])), true)
        }
        _ => (value.to_string(), true),
    }
}

fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_style(presets::NOTHING).set_header(header.to_vec());
    table
}

fn bytes(value: &Value) -> String {
    value.as_u64().map_or_else(|| text(value), |n| bytesize::ByteSize::b(n).to_string())
}

fn seconds(value: &Value) -> String {
    value.as_f64().map_or_else(|| text(value), |s| humantime::format_duration(std::time::Duration::from_secs(s as u64)).to_string())
}

/// `hotswap status` for people.
fn status_text(status: &Value) -> String {
    let current = &status["current"];
    let mut out = format!("serving {} from {}\n", brief(current), text(&current["file"]));
    out.push_str(&format!("  sha256 {}\n", text(&current["sha256"])));
    match status["pin"].as_object() {
        Some(pin) => out.push_str(&format!(
            "  pinned to {} (by {}): `hotswap unpin` serves the highest version again\n",
            text(&pin["version"]),
            text(&pin["by"])
        )),
        None => out.push_str("  not pinned: the highest version serves\n"),
    }
    out.push_str(&format!("  plugins from {}\n\n", text(&status["plugin_source"])));

    let mut resident = table(&["GEN", "VERSION", "STATE", "IN FLIGHT", "STREAMS", "SENT", "REQUESTS", "AGE"]);
    for g in status["resident"].as_array().into_iter().flatten() {
        resident.add_row(vec![
            text(&g["generation"]),
            text(&g["version"]),
            text(&g["state"]),
            text(&g["in_flight"]),
            text(&g["streams"]),
            bytes(&g["bytes_sent"]),
            text(&g["requests"]),
            seconds(&g["age_seconds"]),
        ]);
    }
    out.push_str(&format!("resident generations\n{resident}\n\n"));

    let mut history = table(&["GEN", "VERSION", "STATE", "REQUESTS", "AT", "FILE", "SHA-256"]);
    for r in status["history"].as_array().into_iter().flatten() {
        let sha = text(&r["sha256"]);
        history.add_row(vec![
            text(&r["generation"]),
            text(&r["version"]),
            text(&r["state"]),
            text(&r["requests"]),
            text(&r["at"]),
            text(&r["file"]),
            sha.get(..12).map_or(sha.clone(), |s| format!("{s}…")),
        ]);
    }
    out.push_str(&format!("history (newest first)\n{history}\n"));

    let refusals: Vec<&Value> = status["refusals"].as_array().into_iter().flatten().collect();
    if !refusals.is_empty() {
        out.push_str("\nrecent refusals (newest first)\n");
        for r in refusals {
            out.push_str(&format!("  {}  {}: {}\n", text(&r["at"]), text(&r["file"]), text(&r["reason"])));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_outcome_is_an_error_with_its_reason() {
        let serving = json!({ "generation": 2, "name": "app", "version": "1.0.0", "file": "app.so" });
        let (line, refused) = outcome_text(&json!({ "outcome": "refused", "serving": serving, "refused": ["init failed: no"] }));
        assert!(refused);
        assert_eq!(line, "refused: init failed: no; app 1.0.0 (generation 2) keeps serving");
        let (line, refused) = outcome_text(&json!({ "outcome": "unchanged", "serving": serving, "reason": "it serves already" }));
        assert!(!refused && line.starts_with("unchanged: app 1.0.0"), "{line}");
    }
}
