//! Records which compiler builds this crate, so a plugin can tell the host (informational:
//! the C ABI does not depend on it).
use std::process::Command;

fn main() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown rustc".into());
    println!("cargo:rustc-env=HANDLER_API_RUSTC={version}");
    println!("cargo:rerun-if-env-changed=RUSTC");
}
