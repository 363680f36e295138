//! What decides which generation serves: the builds the host knows of and the rule that
//! picks one ([`builds`]), the [`registry`] that swaps it in (or starts it as a canary, judged
//! by [`canary`]) and drains the old one, the
//! [`history`] of generations and refusals, the file [`watch`]er, the certificates that serve HTTPS ([`tls`]), the [`admin`] API and the
//! Prometheus [`metrics`] it exposes; and the [`host`] process itself, with the upgrades of
//! the host binary that led to it.

#![forbid(unsafe_code)]

pub(crate) mod admin;
pub(crate) mod builds;
pub(crate) mod canary;
pub(crate) mod history;
pub(crate) mod host;
pub(crate) mod metrics;
pub(crate) mod registry;
pub(crate) mod tls;
pub(crate) mod watch;
