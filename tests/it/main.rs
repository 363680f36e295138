//! Integration tests: each builds the real plugins with cargo, starts the real `hotswap`
//! binary on an ephemeral loopback port and talks HTTP to it with a real client.

mod core;
mod candidates;
mod dev;
mod bench;
mod soak;
mod swap;
