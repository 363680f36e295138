//! hotswap: an HTTP server that replaces its request handler, a cdylib plugin, while it runs.
//!
//! | module | holds |
//! |---|---|
//! | [`trust`] | which plugin files may be loaded: owners, modes, trusted digests |
//! | [`loader`] | shadow copies, `dlopen`, the declaration check |
//! | [`bridge`] | the host's side of the C ABI: services lent to plugins, response adapters |
//! | [`generation`] | one loaded plugin and its threads; unloading and the `/proc/self/maps` check |
//! | [`builds`] | the builds in the plugin directory, and which one serves (versions, pins) |
//! | [`registry`] | the current generation, the atomic swap, draining; reload, pin, rollback |
//! | [`history`] | generations and refusals so far, kept copies for rollbacks |
//! | [`metrics`] | per-generation counters and the Prometheus exposition |
//! | [`admin`] | the admin API (status, reload, rollback, pin, metrics) on its own listener |
//! | [`client`] | the `status`, `reload`, `rollback`, `pin` and `unpin` commands |
//! | [`server`] | accepting, serving and moving connections between generations |
//! | [`latch`] | one-way events (superseded, aborted, shutting down) cheap to check on every poll |
//! | [`limits`] | header read and idle timeouts, kept apart from any generation's runtime |
//! | [`budget`] | what repeated loading consumes (keys, maps, fds), and refusing before it runs out |
//! | [`sys`] | the few libc calls the host makes |
//! | [`cli`] | the command line |
//! | [`config`] | the configuration file, turned into command-line flags |

#![deny(unsafe_op_in_unsafe_fn)]

pub mod admin;
pub mod bridge;
pub mod budget;
pub mod builds;
pub mod client;
pub mod cli;
pub mod config;
pub mod dev;
pub mod generation;
pub mod history;
pub mod latch;
pub mod limits;
pub mod loader;
pub mod metrics;
pub mod registry;
pub mod run;
pub mod server;
pub mod sys;
pub mod trust;
pub mod watch;
