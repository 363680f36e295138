//! The few things the host needs from the operating system below std, as safe functions:
//! every `unsafe` call to libc in the host, and the adoption of sockets passed in (by systemd,
//! or by the host this one replaces).

use std::io;

/// The effective user id of this process.
pub(crate) fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The calling thread's id (as in `/proc/self/task`).
pub(crate) fn thread_id() -> i32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() }
}

/// The soft and hard limit on open file descriptors.
pub(crate) fn open_files_limit() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is a valid, writable rlimit for the call's duration.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((limit.rlim_cur, limit.rlim_max))
}

/// Raises the soft limit on open file descriptors to `wanted`, or to the hard limit if that is
/// lower. Returns the new soft limit.
pub(crate) fn raise_open_files_limit(wanted: u64) -> io::Result<u64> {
    let (soft, hard) = open_files_limit()?;
    let target = wanted.min(hard);
    if target <= soft {
        return Ok(soft);
    }
    let limit = libc::rlimit { rlim_cur: target, rlim_max: hard };
    // SAFETY: `limit` is a valid rlimit; raising the soft limit up to the hard one is allowed
    // for any process.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(target)
}

/// How many pthread thread-specific-data keys are in use, measured as the lowest free key
/// above 0: creating keys until one above 0 comes back, then deleting them.
///
/// glibc hands out the lowest free index of a table of `PTHREAD_KEYS_MAX` (1024), and keys
/// leaked by plugins are never deleted (see `budget`), so the table fills from the bottom.
/// Key 0 is special: Rust's std uses 0 as "not created yet", so when glibc gives it key 0 it
/// takes another and frees 0 again. Key 0 therefore stays free in a Rust process however
/// full the table is, and a probe that stopped at it would always read 0. `None` when no key
/// is free.
pub(crate) fn thread_keys_in_use() -> Option<u64> {
    let mut created = Vec::with_capacity(2);
    let mut found = None;
    while created.len() < 2 {
        let mut key: libc::pthread_key_t = 0;
        // SAFETY: `key` is writable; no destructor is registered, so the key may be deleted
        // without running anything.
        if unsafe { libc::pthread_key_create(&mut key, None) } != 0 {
            break;
        }
        created.push(key);
        if key != 0 {
            found = Some(u64::from(key));
            break;
        }
    }
    for key in created {
        // SAFETY: created just above and never used.
        unsafe { libc::pthread_key_delete(key) };
    }
    found
}

/// The listening sockets a service manager passed in (systemd socket activation: `LISTEN_FDS`
/// and `LISTEN_PID` naming this process).
#[derive(Debug, Default)]
pub(crate) struct InheritedListeners {
    /// The one to serve on instead of `--listen`.
    pub(crate) plain: Option<std::net::TcpListener>,
    /// The one named `https` (`FileDescriptorName=https`), to serve on instead of
    /// `--listen-tls`.
    pub(crate) https: Option<std::net::TcpListener>,
    /// `plain` is a socket named `https` passed alone: it serves HTTPS only.
    pub(crate) lone_https: bool,
}

/// The listening sockets a service manager passed in, if any: one (whatever its name), or two
/// when one of them is named `https`; more are an error. They are handed out once: later calls find none.
pub(crate) fn inherited_listeners() -> io::Result<InheritedListeners> {
    use std::os::fd::FromRawFd as _;
    use std::sync::atomic::{AtomicBool, Ordering};
    // `sd_notify::listen_fds_with_names` leaves the environment as it is, so it would name the
    // same descriptors again: two owners of one fd. This flag makes the first call the only one.
    static TAKEN: AtomicBool = AtomicBool::new(false);
    if TAKEN.swap(true, Ordering::AcqRel) {
        return Ok(InheritedListeners::default());
    }
    let mut inherited = InheritedListeners::default();
    // None for this process (LISTEN_PID names another): its names, inherited, are not ours.
    if sd_notify::listen_fds()?.len() == 0 {
        return Ok(inherited);
    }
    for (fd, name) in sd_notify::listen_fds_with_names()? {
        if !is_listening_stream(fd) {
            return Err(io::Error::other(format!("the socket passed in fd {fd} ({name}) is not a listening stream (TCP) socket")));
        }
        // SAFETY: the service manager passed this descriptor to this process (LISTEN_PID is
        // our pid) for it to own, and nothing else in the process has taken it: only this
        // function reads LISTEN_FDS, and `TAKEN` lets it do so once.
        let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
        // A listening stream socket that is not TCP (a Unix socket) fails here.
        let addr = listener.local_addr().map_err(|e| io::Error::other(format!("the socket passed in fd {fd} ({name}) is not a TCP listener: {e}")))?;
        listener.set_nonblocking(true)?;
        let slot = if name == "https" { &mut inherited.https } else { &mut inherited.plain };
        if slot.is_some() {
            return Err(io::Error::other(
                "more sockets passed (LISTEN_FDS) than hotswap serves: one, and a second named `https` \
                 (FileDescriptorName=https) for HTTPS",
            ));
        }
        tracing::info!(%addr, name, "using a listening socket passed by the service manager (LISTEN_FDS)");
        *slot = Some(listener);
    }
    // One socket alone, whatever its name, serves instead of --listen (HTTPS with a
    // certificate), as before names were read; one named `https` must serve HTTPS.
    if inherited.plain.is_none() && inherited.https.is_some() {
        inherited.plain = inherited.https.take();
        inherited.lone_https = true;
    }
    Ok(inherited)
}

/// Whether `fd` is a stream socket that is listening.
fn is_listening_stream(fd: std::os::fd::RawFd) -> bool {
    let option = |name| {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `value` and `len` are valid for writes of an int, as both options return;
        // `getsockopt` on a descriptor that is not a socket fails without touching them.
        let ok = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, name, (&mut value as *mut libc::c_int).cast(), &mut len) } == 0;
        ok.then_some(value)
    };
    option(libc::SO_TYPE) == Some(libc::SOCK_STREAM) && option(libc::SO_ACCEPTCONN) == Some(1)
}

/// The environment variable that tells a new host which descriptor leads to the host it
/// replaces (`hotswap upgrade`).
pub(crate) const UPGRADE_FD_ENV: &str = "HOTSWAP_UPGRADE_FD";

/// The socket to the host this process replaces, as [`claim_upgrade_socket`] found it.
static UPGRADE_SOCKET: std::sync::Mutex<Option<io::Result<std::os::fd::OwnedFd>>> = std::sync::Mutex::new(None);

/// Takes the socket to the host this process replaces, if it was started by `hotswap
/// upgrade` (descriptor named by [`UPGRADE_FD_ENV`]), for [`upgrade_socket`]. Call it at the
/// start of `main`, before any thread: it removes the variable from the environment (so
/// that no process this one starts sees it). The descriptor is made close-on-exec, so that
/// those processes (plugin probes, a later upgrade) do not hold it open either.
pub(crate) fn claim_upgrade_socket() {
    let Some(value) = std::env::var_os(UPGRADE_FD_ENV) else { return };
    std::env::remove_var(UPGRADE_FD_ENV);
    let claimed = value
        .to_str()
        .and_then(|v| v.parse::<std::os::fd::RawFd>().ok())
        .filter(|fd| *fd > 2)
        .ok_or_else(|| io::Error::other(format!("{UPGRADE_FD_ENV}={value:?} is not a descriptor number above 2")))
        .and_then(adopt_upgrade_socket);
    *UPGRADE_SOCKET.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(claimed);
}

fn adopt_upgrade_socket(fd: std::os::fd::RawFd) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: F_GETFD only reads the descriptor's flags; it fails on a closed descriptor.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::other(format!("{UPGRADE_FD_ENV}={fd}: {}", io::Error::last_os_error())));
    }
    // SAFETY: as above, on a descriptor just checked to be open; only the close-on-exec flag
    // changes.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the host that started this process passed this descriptor for it to own, and
    // named it in the variable just removed: nothing else in this process knows of it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// The socket to the host this process replaces, if it was started by `hotswap upgrade`.
/// Handed out once.
pub(crate) fn upgrade_socket() -> io::Result<Option<std::os::fd::OwnedFd>> {
    UPGRADE_SOCKET.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take().transpose()
}

/// Makes `command` start its process with `fd` as descriptor `target` (open across `exec`,
/// whatever its close-on-exec flag here), and with no other descriptor above `target`: a
/// plugin may have opened files without close-on-exec, and they are not the new process's.
/// `fd` must stay open until the process is spawned.
pub(crate) fn pass_descriptor(command: &mut std::process::Command, fd: std::os::fd::BorrowedFd<'_>, target: std::os::fd::RawFd) {
    use std::os::fd::AsRawFd as _;
    use std::os::unix::process::CommandExt as _;
    let source = fd.as_raw_fd();
    let set_up = move || {
        if source == target {
            // dup2 onto itself would leave close-on-exec set.
            // SAFETY: fcntl is async-signal-safe; it only changes the flags of an open descriptor.
            let flags = unsafe { libc::fcntl(source, libc::F_GETFD) };
            // SAFETY: as above.
            if flags < 0 || unsafe { libc::fcntl(source, libc::F_SETFD, flags & !libc::FD_CLOEXEC) } < 0 {
                return Err(io::Error::last_os_error());
            }
        // SAFETY: dup2 is async-signal-safe; `source` is open (the caller keeps it until the
        // spawn returns) and `target` is replaced in the child only.
        } else if unsafe { libc::dup2(source, target) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // Marked close-on-exec rather than closed: std reports a failed exec through a pipe
        // of its own, already close-on-exec, that must stay open until then.
        // SAFETY: close_range is a raw system call, async-signal-safe; it changes descriptors
        // of the child only. Without it (Linux before 5.11) they stay open: a leak, no harm.
        unsafe { libc::syscall(libc::SYS_close_range, target + 1, libc::c_uint::MAX, libc::CLOSE_RANGE_CLOEXEC) };
        Ok(())
    };
    // SAFETY: the closure runs in the child between fork and exec, and calls only
    // async-signal-safe functions (fcntl, dup2, close_range); it allocates nothing and takes
    // no lock.
    unsafe { command.pre_exec(set_up) };
}

/// Sends SIGTERM to process `pid` (a child this host started); nothing if it is gone.
pub(crate) fn terminate(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return };
    // SAFETY: kill has no memory preconditions; a pid that is gone fails with ESRCH.
    unsafe { libc::kill(pid, libc::SIGTERM) };
}

/// Sends SIGTERM to every process of group `pgid` (one this host started, with
/// `process_group(0)`); nothing if it is gone.
pub(crate) fn terminate_group(pgid: u32) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else { return };
    if pgid > 1 {
        // SAFETY: kill has no memory preconditions; a group that is gone fails with ESRCH.
        unsafe { libc::kill(-pgid, libc::SIGTERM) };
    }
}

/// Whether process `pid` still exists (a zombie counts).
pub(crate) fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: signal 0 checks only that the process exists and may be signalled.
    let sent = unsafe { libc::kill(pid, 0) } == 0;
    sent || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// How many thread-specific-data keys a process may have (glibc's `PTHREAD_KEYS_MAX`).
pub(crate) const THREAD_KEYS_MAX: u64 = 1024;

/// Writes `message` to standard error and ends the process now with `code`, without running
/// `atexit` handlers or library finalisers, and without anything that could wait on a lock:
/// a raw `write(2)`, then `_exit(2)`. For when the process can no longer go on safely.
pub(crate) fn fatal(code: i32, message: &str) -> ! {
    let line = format!("{message}\n");
    let mut rest = line.as_bytes();
    while !rest.is_empty() {
        // SAFETY: `rest` is a valid, initialised buffer of `rest.len()` bytes.
        let n = unsafe { libc::write(libc::STDERR_FILENO, rest.as_ptr().cast(), rest.len()) };
        let Ok(n @ 1..) = usize::try_from(n) else { break };
        rest = &rest[n..];
    }
    // SAFETY: _exit has no preconditions; it ends the process without returning.
    unsafe { libc::_exit(code) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_held_are_counted_although_key_0_stays_free() {
        // Leave key 0 free, as Rust's std does.
        let mut zero = 0;
        // SAFETY: no destructor; deleted at once.
        unsafe {
            libc::pthread_key_create(&mut zero, None);
            libc::pthread_key_delete(zero);
        }
        let before = thread_keys_in_use().expect("a free key");
        let mut held: Vec<libc::pthread_key_t> = Vec::new();
        for _ in 0..3 {
            let mut key = 0;
            // SAFETY: no destructor; deleted below.
            assert_eq!(unsafe { libc::pthread_key_create(&mut key, None) }, 0);
            held.push(key);
        }
        let during = thread_keys_in_use();
        for key in held {
            // SAFETY: created above, deleted once.
            unsafe { libc::pthread_key_delete(key) };
        }
        // Key 0 went to one of the three; the other two are above `before`.
        assert!(during.is_some_and(|n| n >= before + 2), "{before} -> {during:?}");
    }
}
