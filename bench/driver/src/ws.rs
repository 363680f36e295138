//! WebSocket echo load: sessions that each send a message and wait for its echo, in a loop,
//! from plain threads (tungstenite's blocking client), as wrk does for requests.

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tungstenite::Message;

use crate::wrk::Run;

/// Bytes per message: a small message, where the per-message cost shows.
const MESSAGE: usize = 64;

/// The command the report names, for `sessions` sessions of `duration`.
pub(crate) fn description(sessions: usize, duration: Duration) -> String {
    format!(
        "{sessions} sessions to /ws for {}s, each sending a {MESSAGE}-byte binary message and waiting for its echo, in a loop",
        duration.as_secs_f64()
    )
}

/// Runs `sessions` echo sessions against `addr` (`host:port`) for `duration`: messages per
/// second (as `rps`), round-trip percentiles, failures.
pub(crate) fn run(addr: &str, sessions: usize, duration: Duration) -> Result<Run> {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let threads: Vec<_> = (0..sessions)
        .map(|i| {
            let (addr, stop) = (addr.to_owned(), stop.clone());
            std::thread::spawn(move || session(&addr, i, &stop))
        })
        .collect();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let mut round_trips = Vec::new();
    let mut failures = 0;
    for thread in threads {
        match thread.join() {
            Ok(Ok(mut times)) => round_trips.append(&mut times),
            Ok(Err(e)) => {
                eprintln!("== WebSocket session failed: {e:#}");
                failures += 1;
            }
            Err(_) => failures += 1,
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    if round_trips.is_empty() {
        bail!("no WebSocket message came back from {addr}");
    }
    round_trips.sort_unstable();
    let at = |p: f64| round_trips[((round_trips.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e3;
    Ok(Run {
        requests: round_trips.len() as u64,
        rps: round_trips.len() as f64 / elapsed,
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        failures,
        ..Run::default()
    })
}

/// One session: round trips until `stop`, each checked byte for byte.
fn session(addr: &str, seed: usize, stop: &AtomicBool) -> Result<Vec<Duration>> {
    let stream = TcpStream::connect(addr).with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let (mut ws, _) = tungstenite::client(format!("ws://{addr}/ws"), stream).context("WebSocket handshake failed")?;
    // The greeting first.
    match ws.read().context("no greeting")? {
        Message::Text(_) => {}
        other => bail!("expected a greeting, got {other:?}"),
    }
    let payload: Vec<u8> = (0..MESSAGE).map(|i| (i + seed) as u8).collect();
    let mut times = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let sent = Instant::now();
        ws.send(Message::binary(payload.clone())).context("send failed")?;
        match ws.read().context("read failed")? {
            Message::Binary(echo) if echo[..] == payload[..] => times.push(sent.elapsed()),
            other => bail!("the echo differs: {other:?}"),
        }
    }
    let _ = ws.close(None);
    let _ = ws.flush();
    Ok(times)
}
