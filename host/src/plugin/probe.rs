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
//! private copy, inherited (its number is the child's second argument). It reports how far it
//! got on its standard output, one byte per step, so that a hang is told apart: in the
//! initialisers or the finalisers; what the library itself writes there goes to its standard
//! error, which the host quotes. It runs in a process group of its own, killed as a whole, so
//! that processes the library starts do not outlive it.

use std::fs::File;
use std::os::fd::{AsRawFd as _, RawFd};
use std::path::Path;
use std::process::{ExitCode, ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::AsyncReadExt as _;

/// The first argument that makes `hotswap` a probe process. Not a subcommand: it is for the
/// host alone, and must not depend on the command line or configuration of a user.
pub(crate) const PROBE_ARG: &str = "__hotswap-probe-library";

/// Written by the probe process before it opens the library: it is ours, and runs.
const STARTED: u8 = b's';
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
        "the probe process that opens it first did not start{stderr}; it was not opened in the host (the hotswap \
         binary must be able to run itself)"
    )]
    NotStarted { stderr: String },
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
            ProbeError::Spawn(_) | ProbeError::NotStarted { .. } => "probe_failed",
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
    // /proc/self/exe: this very binary, even if the file it was started from has since been
    // replaced (an upgrade) or removed. Under an emulator such as valgrind that names the
    // emulator, which will not run: then the path this binary was started from.
    match run(Path::new("/proc/self/exe"), copy, timeout).await {
        Err(ProbeError::NotStarted { .. }) => match std::env::current_exe() {
            Ok(exe) => run(&exe, copy, timeout).await,
            Err(e) => Err(ProbeError::Spawn(e)),
        },
        other => other,
    }
}

/// One probe, of the binary at `exe`.
async fn run(exe: &Path, copy: &File, timeout: Duration) -> Result<(), ProbeError> {
    let fd = copy.as_raw_fd();
    let mut command = tokio::process::Command::new(exe);
    command
        .arg(PROBE_ARG)
        .arg(fd.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    // SAFETY: the closure runs in the child between fork and exec, and calls only
    // async-signal-safe functions (fcntl, prctl, setrlimit) on values it owns.
    unsafe {
        command.pre_exec(move || {
            // The copy's descriptor is close-on-exec, as every descriptor of the host: the
            // child's copy of it loses the flag.
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // It dies with the host.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            // A crash of the probe is expected, and reported: it leaves no core dump.
            let no_core = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            libc::setrlimit(libc::RLIMIT_CORE, &no_core);
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(ProbeError::Spawn)?;
    let group = child.id().and_then(|pid| i32::try_from(pid).ok());
    // Whatever happens, processes the library started in the probe go with it.
    let group = KillGroup(group);
    let (Some(mut stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(ProbeError::Spawn(std::io::Error::other("no pipe to the probe process")));
    };
    // Read as it comes, so that a library writing much cannot block the probe on a full pipe.
    let stderr = tokio::spawn(read_capped(stderr));
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => Some(status.map_err(ProbeError::Spawn)?),
        Err(_) => {
            let _ = child.kill().await;
            // Its children too, before reading what it said: they may hold the pipe.
            drop(group);
            None
        }
    };
    let mut progress = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), stdout.read_to_end(&mut progress)).await;
    let step = if progress.contains(&OPENED) { Step::Finalisers } else { Step::Initialisers };
    if progress.first() != Some(&STARTED) {
        return Err(ProbeError::NotStarted { stderr: quoted(stderr).await });
    }
    let Some(status) = status else { return Err(ProbeError::Hung { step, timeout }) };
    if status.success() && progress == [STARTED, OPENED, CLOSED] {
        return Ok(());
    }
    Err(ProbeError::Crashed { step, how: describe(status), stderr: quoted(stderr).await })
}

/// What the probe wrote to its standard error, to quote in a refusal.
async fn quoted(stderr: tokio::task::JoinHandle<String>) -> String {
    // A process the library forked may hold the pipe open: do not wait for it long.
    match tokio::time::timeout(Duration::from_secs(1), stderr).await {
        Ok(Ok(text)) if !text.trim().is_empty() => format!(" (it wrote: {})", text.trim()),
        _ => String::new(),
    }
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

/// Kills a process group when dropped.
struct KillGroup(Option<i32>);

impl Drop for KillGroup {
    fn drop(&mut self) {
        if let Some(group) = self.0 {
            // SAFETY: killpg has no memory preconditions; the group is the probe's own (it
            // was started as its leader), and no longer exists once every member is reaped.
            unsafe { libc::killpg(group, libc::SIGKILL) };
        }
    }
}

/// The probe process: opens the library at the descriptor its second argument names, as the
/// host would, closes it, and says how far it got. Whether the library is a valid plugin is
/// for the host to check, once it knows that opening it is safe.
pub(crate) fn child() -> ExitCode {
    use std::io::Write as _;
    use std::os::fd::FromRawFd as _;
    let Some(fd) = std::env::args().nth(2).and_then(|n| n.parse::<RawFd>().ok()) else {
        eprintln!("{PROBE_ARG}: the library's descriptor is missing");
        return ExitCode::FAILURE;
    };
    // The steps go out on a descriptor of their own; what the library writes to standard
    // output goes to standard error.
    // SAFETY: dup and dup2 on the standard descriptors, which this process has.
    let progress = unsafe { libc::dup(libc::STDOUT_FILENO) };
    // SAFETY: as above.
    if progress < 0 || unsafe { libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO) } < 0 {
        eprintln!("{PROBE_ARG}: cannot set up its output: {}", std::io::Error::last_os_error());
        return ExitCode::FAILURE;
    }
    // SAFETY: `progress` was just created by dup, and nothing else owns it.
    let mut progress = unsafe { std::fs::File::from_raw_fd(progress) };
    let mut report = |step: u8| drop(progress.write_all(&[step]));
    report(STARTED);
    // SAFETY: running the library's initialisers, away from the host, is this process's
    // whole purpose.
    let opened = unsafe { crate::plugin::loader::open_fd(fd) };
    report(OPENED);
    if let Ok(library) = opened {
        // A library that fails to close stays loaded: this process ends right after.
        let _ = library.close();
    }
    report(CLOSED);
    ExitCode::SUCCESS
}
