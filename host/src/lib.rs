//! hotswap: an HTTP server that replaces its request handler, a cdylib plugin, while it runs.
//!
//! # Core concepts
//!
//! A plugin file goes through these stages, each a type that owns what that stage needs:
//!
//! - **Library** (`plugin::loader::Library`): a private copy of a plugin file, mapped with
//!   `dlopen`, whose declaration (ABI version, layout fingerprint, name, version) has been
//!   checked before anything in it is called.
//! - **Candidate** (`plugin::Candidate`): a library that passed every check that needs only
//!   its bytes (trust, completeness, digest). Only its initialisers have run. Dropping it
//!   closes the library.
//! - **Generation** (`plugin::Generation`): a started candidate: its own tokio runtime
//!   (plugin code runs only on its threads), the service table lent to it, its `init` done.
//!   Whatever may run its code holds its `Arc<Generation>`: a request in flight holds it
//!   through `plugin::InFlight`, which its plugin call and then its response body own.
//! - **Retired** (`plugin::reaper::Retired`): what is left once the last `Arc<Generation>`
//!   has gone. The reaper thread runs the plugin's shutdown hook, joins the generation's
//!   threads, closes the library and checks that it left `/proc/self/maps`.
//!
//! Around them:
//!
//! - The **Registry** (`control::registry::Registry`) decides which generation is current:
//!   it reads builds, swaps a new generation in atomically (`plugin::Current`), drains the
//!   old one within the drain timeout, and handles reload, pin and rollback; the watcher, the
//!   admin API and SIGHUP drive it.
//! - The **Server** (`serve::Server`) accepts connections and serves each on the runtime of
//!   the current generation, moving it to the next one at a request boundary. It needs only
//!   the current generation, never the registry.
//!
//! # Layout
//!
//! One folder per audience, dependencies pointing one way (`cmd` → `control` → `plugin`,
//! `cmd` → `serve` → `plugin`):
//!
//! | module | holds |
//! |---|---|
//! | `plugin` | loading, generations, unloading, the host side of the C ABI: the only `unsafe` besides `sys` |
//! | `serve` | the HTTP server: accepting, connections and their moves, requests in flight, limits |
//! | `control` | which generation serves: builds, registry, history, watcher, admin API, metrics |
//! | `cmd` | the command line: arguments, configuration file, admin client, dev loop, the serving lifecycle |
//! | `latch` | one-way events (superseded, aborted, shutting down) cheap to check on every poll |
//! | `sys` | the few libc calls the host makes |

#![deny(unsafe_op_in_unsafe_fn)]

mod cmd;
mod control;
mod latch;
mod plugin;
mod serve;
mod sys;

pub use cmd::main;
