//! The load probe: a candidate library is opened and closed first in a short-lived child
//! process, and only then in the host.
//!
//! Opening a library runs its initialisers (constructors, `.init_array`, C++ globals) before
//! anything can refuse it, and closing it runs its finalisers. In the host, one that aborts
//! or exits takes the whole host down, and one that hangs holds the dynamic loader's lock,
//! so that every load and unload after it, and every thread that waits for the loader,
//! hangs too. The probe process (this same binary, started with [`PROBE_ARG`]) does both
//! under a timeout: a probe that crashes, exits or hangs refuses the build with the reason,
//! and the host never maps it.
//!
//! The child maps the very file the host checked and will map: the host's descriptor of the
//! private copy, passed down as descriptor [`PROBE_FD`]. It reports how far it got on stdout,
//! one byte per step, so that a hang is told apart: in the initialisers or the finalisers.

use std::fs::File;
use std::os::fd::{AsRawFd as _, RawFd};
use std::process::{ExitCode, ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::AsyncReadExt as _;

/// The first argument that makes `hotswap` a probe process. Not a subcommand: it is for the
/// host alone, and must not depend on the command line or configuration of a user.
pub(crate) const PROBE_ARG: &str = "__hotswap-probe-library";

/// The descriptor the probe process finds the library at.
const PROBE_FD: RawFd = 3;
/// Written by the probe once `dlopen` has returned (the initialisers have run).
const OPENED: u8 = b'o';
/// Written by the probe once `dlclose` has returned (the finalisers have run).
const CLOSED: u8 = b'c';
/// How much of the probe's standard error a refusal quotes.
const STDERR_KEPT: usize = 2048;

/// Why the probe refused a library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum ProbeError {
    #[error("cannot start the probe process that opens it first ({0}); it was not opened in the host")]
    Spawn(std::io::Error),
    #[error(
        "its {step} {how}{stderr}: in the host, that would have taken the whole host down. Fix the library's {step} (constructors or destructors: static initialisers, \
         .init_array/.fini_array, C++ globals, or a crate that registers them)"
    )]
    Crashed { step: Step, how: String, stderr: String },
    #[error(
        "its {step} did not finish within {timeout:?} in the probe process that opened it first: in the host, \
         that would have blocked every later load and unload. Fix the library's {step} (constructors or \
         destructors), or give them more time with --init-timeout"
    )]
    Hung { step: Step, timeout: Duration },
}

impl ProbeError {
    /// What kind of refusal this is, as a metrics label.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            ProbeError::Spawn(_) => "probe_failed",
            ProbeError::Crashed { .. } => "probe_crashed",
            ProbeError::Hung { .. } => "probe_hung",
        }
    }
}

/// Which of the library's own code the probe was running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    Initialisers,
    Finalisers,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::Initialisers => "initialisers",
            Step::Finalisers => "finalisers",
        })
    }
}

/// Opens and closes the library `copy` in a probe process, under `timeout`.
pub(crate) async fn probe(copy: &File, timeout: Duration) -> Result<(), ProbeError> {
    let fd = copy.as_raw_fd();
    // /proc/self/exe: this very binary, even if the file it was started from has since been
    // replaced (an upgrade) or removed.
    let mut command = tokio::process::Command::new("/proc/self/exe");
    command.arg(PROBE_ARG).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    // SAFETY: the closure runs in the child between fork and exec, and calls only
    // async-signal-safe functions (fcntl, dup2, setrlimit) on values it owns.
    unsafe {
        command.pre_exec(move || {
            // The copy's descriptor is close-on-exec, as every descriptor of the host: the
            // child gets its own, without the flag, at the number it looks for.
            let passed = if fd == PROBE_FD { libc::fcntl(fd, libc::F_SETFD, 0) } else { libc::dup2(fd, PROBE_FD) };
            if passed < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // A crash of the probe is expected, and reported: it leaves no core dump.
            let no_core = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            libc::setrlimit(libc::RLIMIT_CORE, &no_core);
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(ProbeError::Spawn)?;
    let (Some(mut stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(ProbeError::Spawn(std::io::Error::other("no pipe to the probe process")));
    };
    // Read as it comes, so that a library writing much cannot block the probe on a full pipe.
    let stderr = tokio::spawn(read_capped(stderr));
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => Some(status.map_err(ProbeError::Spawn)?),
        Err(_) => {
            let _ = child.kill().await;
            None
        }
    };
    let mut progress = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), stdout.read_to_end(&mut progress)).await;
    let step = if progress.contains(&OPENED) { Step::Finalisers } else { Step::Initialisers };
    let Some(status) = status else { return Err(ProbeError::Hung { step, timeout }) };
    if status.success() && progress.contains(&CLOSED) {
        return Ok(());
    }
    // A process the library forked may hold the pipe open: do not wait for it long.
    let stderr = match tokio::time::timeout(Duration::from_secs(1), stderr).await {
        Ok(Ok(text)) if !text.trim().is_empty() => format!(" (it wrote: {})", text.trim()),
        _ => String::new(),
    };
    Err(ProbeError::Crashed { step, how: describe(status), stderr })
}

/// How the probe process ended, for people.
fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("ended the probe process that opened it first (exit status {code})"),
        (None, Some(signal)) => {
            format!("crashed the probe process that opened it first (signal {signal}, {})", signal_name(signal))
        }
        (None, None) => "ended the probe process that opened it first".to_owned(),
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGABRT => "SIGABRT: an abort, such as a Rust panic that cannot unwind",
        libc::SIGSEGV => "SIGSEGV: an invalid memory access",
        libc::SIGBUS => "SIGBUS: a bad memory access",
        libc::SIGILL => "SIGILL: an illegal instruction",
        libc::SIGFPE => "SIGFPE: an arithmetic fault",
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

/// Reads `from` to its end, keeping the first [`STDERR_KEPT`] bytes as text.
async fn read_capped(mut from: impl tokio::io::AsyncRead + Unpin) -> String {
    let (mut kept, mut buf) = (Vec::new(), [0u8; 4096]);
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        kept.extend_from_slice(&buf[..n.min(STDERR_KEPT.saturating_sub(kept.len()))]);
    }
    String::from_utf8_lossy(&kept).into_owned()
}

/// The probe process: opens the library at descriptor [`PROBE_FD`] as the host would, closes
/// it, and says how far it got. Whether the library is a valid plugin is for the host to
/// check, once it knows that opening it is safe.
pub(crate) fn child() -> ExitCode {
    use std::io::Write as _;
    let report = |step: u8| {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(&[step]).and_then(|()| out.flush());
    };
    // SAFETY: running the library's initialisers, away from the host, is this process's
    // whole purpose.
    let opened = unsafe { crate::plugin::loader::open_fd(PROBE_FD) };
    report(OPENED);
    if let Ok(library) = opened {
        // A library that fails to close stays loaded: this process ends right after.
        let _ = library.close();
    }
    report(CLOSED);
    ExitCode::SUCCESS
}
