//! Integration tests: each builds the real plugins with cargo, starts the real `hotswap`
//! binary on an ephemeral loopback port and talks HTTP to it with a real client.

mod admin;
mod apps;
mod bench;
mod canary;
mod candidates;
mod config;
mod core;
mod deploy;
mod dev;
mod faults;
mod handoff;
mod host_upgrade;
mod limits;
mod operations;
mod soak;
mod swap;
mod systemd;
mod tls;
mod trust;
mod upgrades;
