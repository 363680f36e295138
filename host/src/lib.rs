//! hotswap: an HTTP server that replaces its request handler, a cdylib plugin, while it runs.
//!
//! | module | holds |
//! |---|---|
//! | [`loader`] | shadow copies, `dlopen`, the declaration check |
//! | [`bridge`] | the host's side of the C ABI: services lent to plugins, response adapters |
//! | [`generation`] | one loaded plugin and its threads; unloading and the `/proc/self/maps` check |
//! | [`registry`] | the current generation, the atomic swap, draining |
//! | [`server`] | accepting, serving and moving connections between generations |
//! | [`cli`] | the command line |

#![deny(unsafe_op_in_unsafe_fn)]

pub mod bridge;
pub mod cli;
pub mod dev;
pub mod generation;
pub mod loader;
pub mod registry;
pub mod run;
pub mod server;
pub mod watch;
