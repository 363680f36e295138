//! Exports the host's `pthread_create` from its binary, so that a plugin's calls reach it
//! before libc's (see `plugin::threads`): an executable exports no symbol unless asked.

fn main() {
    println!("cargo:rustc-link-arg-bins=-Wl,--export-dynamic-symbol=pthread_create");
}
