//! Everything that touches a loaded library, and the only `unsafe` code of the host besides
//! `sys`: loading a plugin file ([`loader`], [`trust`], [`budget`], [`candidate`]), the
//! loaded [`Generation`] and the requests it holds, unloading it ([`reaper`]), and the host's
//! side of the C ABI ([`table`] of [`services`], [`request`], [`response`], [`upgrade`], with
//! the plugin's own wakers parked by [`wakers`]), and the [`watchdog`] that reports a
//! generation whose threads are all blocked in plugin code.
//!
//! Dependencies point one way (`host/tests/layout.rs` checks): `trust`, `budget`, `stats` and
//! `services` need nothing else here, `loader` only `trust`; `reaper` needs those;
//! `generation` needs `reaper`; `wakers` needs `generation`; `response`, `request` and
//! `upgrade` need `generation` (and `wakers`); `table` gathers the ABI's functions;
//! `candidate` builds generations; `route` says which of them new requests go to.

pub(crate) mod budget;
pub(crate) mod candidate;
pub(crate) mod generation;
pub(crate) mod loader;
pub(crate) mod probe;
pub(crate) mod reaper;
pub(crate) mod request;
pub(crate) mod response;
pub(crate) mod route;
pub(crate) mod services;
pub(crate) mod stats;
pub(crate) mod table;
pub(crate) mod threads;
pub(crate) mod trust;
pub(crate) mod upgrade;
pub(crate) mod wakers;
pub(crate) mod watchdog;

pub(crate) use candidate::{Candidate, GenerationError, LoadOptions};
pub(crate) use generation::{thread_generation, Generation, InFlight, LentTally};
pub(crate) use route::Current;
