//! The few process facts the host needs from libc, as safe functions. Every `unsafe` call to
//! libc in the host is here.

use std::io;

/// The effective user id of this process.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The soft and hard limit on open file descriptors.
pub fn open_files_limit() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is a valid, writable rlimit for the call's duration.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((limit.rlim_cur, limit.rlim_max))
}

/// Raises the soft limit on open file descriptors to `wanted`, or to the hard limit if that is
/// lower. Returns the new soft limit.
pub fn raise_open_files_limit(wanted: u64) -> io::Result<u64> {
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

/// The lowest free pthread thread-specific-data key, found by creating one and deleting it
/// at once.
///
/// glibc hands out the lowest free index of a table of `PTHREAD_KEYS_MAX` (1024) and keys
/// are never returned by code that leaks them (a plugin's copy of std leaks one per library
/// copy: see `budget`), so this is how many keys are in use, give or take holes left by keys
/// that were deleted. `None` when none is free.
pub fn lowest_free_thread_key() -> Option<u64> {
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: `key` is writable; no destructor is registered, so the key may be deleted at
    // once without running anything.
    if unsafe { libc::pthread_key_create(&mut key, None) } != 0 {
        return None;
    }
    // SAFETY: `key` was created just above and has never been used.
    unsafe { libc::pthread_key_delete(key) };
    Some(u64::from(key))
}

/// How many thread-specific-data keys a process may have (glibc's `PTHREAD_KEYS_MAX`).
pub const THREAD_KEYS_MAX: u64 = 1024;
