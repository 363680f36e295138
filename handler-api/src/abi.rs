//! The C ABI between the hotswap host and a plugin.
//!
//! Plugin authors never touch this module: [`export_handler!`](crate::export_handler) generates
//! the plugin's side and the host implements the other. It is public because both sides must
//! share one definition of every type that crosses.
//!
//! # Rules of the boundary
//!
//! - Only `extern "C"` functions and `#[repr(C)]` data cross. No Rust-layout type (`String`,
//!   `Vec`, `Box<dyn _>`, the `http` types) ever does.
//! - Memory is released by the side that allocated it. Strings passed as [`FfiStr`] are
//!   borrowed for the duration of the call only; the receiver copies what it keeps.
//! - Every function the plugin exports catches panics and reports them as
//!   [`FfiPoll::PANICKED`]; a panic never unwinds into the host.
//! - The host reads [`DeclarationHeader`] first and checks [`ABI_VERSION`] and
//!   [`LAYOUT_FINGERPRINT`] before it touches anything else the plugin exports.
//!
//! # Async
//!
//! Futures and bodies cross as a state pointer plus poll and drop functions. A poll receives a
//! borrowed [`FfiWaker`]; the callee may `wake_by_ref` it or `clone` it into an owned waker,
//! which it must eventually `wake` or `drop` exactly once.

use core::ffi::c_void;
use core::mem::{align_of, offset_of, size_of};

/// Version of this ABI. Bumped on any change that is not purely additive at the end of
/// [`HostApi`].
pub const ABI_VERSION: u32 = 3;

/// First bytes of every [`DeclarationHeader`].
pub const MAGIC: [u8; 8] = *b"HOTSWAP\0";

/// Name of the symbol a plugin exports: a static [`PluginDeclaration`].
pub const DECLARATION_SYMBOL: &str = "hotswap_plugin_declaration";

/// A borrowed UTF-8 (or byte) string: valid only for the call it is passed to.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FfiStr {
    /// Start of the bytes; may be null when `len` is 0.
    pub ptr: *const u8,
    /// Number of bytes.
    pub len: usize,
}

impl FfiStr {
    /// The empty string.
    pub const EMPTY: FfiStr = FfiStr { ptr: core::ptr::null(), len: 0 };

    /// Borrows `s` (usable in `static` items).
    pub const fn from_static(s: &'static str) -> FfiStr {
        FfiStr { ptr: s.as_ptr(), len: s.len() }
    }

    /// Borrows `bytes` for as long as the caller keeps them alive.
    pub fn new(bytes: &[u8]) -> FfiStr {
        FfiStr { ptr: bytes.as_ptr(), len: bytes.len() }
    }

    /// The bytes.
    ///
    /// # Safety
    /// `ptr` must point to `len` readable bytes that stay valid and unchanged for `'a`.
    pub unsafe fn as_bytes<'a>(&self) -> &'a [u8] {
        if self.len == 0 || self.ptr.is_null() {
            return &[];
        }
        // SAFETY: the caller guarantees `ptr..ptr+len` is valid for 'a; null/empty handled above.
        unsafe { core::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The bytes as text, with invalid UTF-8 replaced.
    ///
    /// # Safety
    /// As for [`FfiStr::as_bytes`].
    pub unsafe fn to_string_lossy(&self) -> String {
        // SAFETY: forwarded to the caller.
        String::from_utf8_lossy(unsafe { self.as_bytes() }).into_owned()
    }
}

/// Outcome of a poll or a call across the boundary.
///
/// A transparent `u8` rather than a Rust enum: a value the other side sends is checked, never
/// trusted to be a valid discriminant.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct FfiPoll(pub u8);

impl FfiPoll {
    /// Finished (a poll) or succeeded (a call).
    pub const READY: FfiPoll = FfiPoll(0);
    /// Not finished; the waker will be woken.
    pub const PENDING: FfiPoll = FfiPoll(1);
    /// The callee panicked; the object must not be polled again, only dropped.
    pub const PANICKED: FfiPoll = FfiPoll(2);
    /// The callee failed without panicking (the reason was logged or written to a sink).
    pub const ERROR: FfiPoll = FfiPoll(3);
}

/// Functions behind an [`FfiWaker`], implemented by the side that created it.
#[repr(C)]
pub struct FfiWakerVTable {
    /// Returns an owned waker that wakes the same task.
    pub clone: unsafe extern "C" fn(data: *const c_void) -> FfiWaker,
    /// Wakes the task and releases an owned waker.
    pub wake: unsafe extern "C" fn(data: *const c_void),
    /// Wakes the task; the waker stays valid.
    pub wake_by_ref: unsafe extern "C" fn(data: *const c_void),
    /// Releases an owned waker without waking.
    pub drop: unsafe extern "C" fn(data: *const c_void),
}

/// An FFI-safe `std::task::Waker`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FfiWaker {
    /// Opaque to the receiver.
    pub data: *const c_void,
    /// Implemented by the creator.
    pub vtable: *const FfiWakerVTable,
}

/// One request header, borrowed.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FfiHeader {
    /// Header name (lowercase).
    pub name: FfiStr,
    /// Header value bytes: always a valid field value (bytes `http::HeaderValue` accepts),
    /// which the plugin may rely on without checking again.
    pub value: FfiStr,
}

/// A request body owned by the host. The plugin polls it with [`HostApi::body_poll`] and must
/// hand it back exactly once with [`HostApi::body_drop`].
#[repr(C)]
#[derive(Debug)]
pub struct FfiHostBody {
    /// Opaque host handle; null when the request has no body (the plugin then neither polls
    /// nor drops it).
    pub handle: *mut c_void,
    /// Exact length if known (`Content-Length`), else `u64::MAX`.
    pub exact_len: u64,
}

/// A request, borrowed for the duration of [`PluginDeclaration::handle`]; the body is handed
/// over and owned by the plugin from then on.
#[repr(C)]
#[derive(Debug)]
pub struct FfiRequest {
    /// Method, such as `GET`.
    pub method: FfiStr,
    /// The request target: origin-form (`/path?query`) or absolute-form (HTTP/2).
    pub uri: FfiStr,
    /// HTTP version: 9 (0.9), 10, 11, 20 or 30.
    pub version: u32,
    /// Pointer to `headers_len` headers.
    pub headers: *const FfiHeader,
    /// Number of headers.
    pub headers_len: usize,
    /// The body; ownership passes to the plugin.
    pub body: FfiHostBody,
}

/// A response body produced by the plugin, polled by the host chunk by chunk.
#[repr(C)]
#[derive(Debug)]
pub struct FfiBody {
    /// Plugin-owned state.
    pub state: *mut c_void,
    /// Produces the next chunk by calling [`HostApi::chunk_push`] on `sink` and returning
    /// `READY`; `READY` without a push is the end of the body. `ERROR` and `PANICKED` abort the
    /// response.
    pub poll_chunk:
        unsafe extern "C" fn(state: *mut c_void, waker: *const FfiWaker, sink: *mut c_void) -> FfiPoll,
    /// Releases `state`; called exactly once.
    pub drop: unsafe extern "C" fn(state: *mut c_void),
    /// Exact length if known, else `u64::MAX`.
    pub exact_len: u64,
}

/// The future returned by [`PluginDeclaration::handle`].
#[repr(C)]
#[derive(Debug)]
pub struct FfiResponseFuture {
    /// Plugin-owned state.
    pub state: *mut c_void,
    /// On `READY`, the plugin has described the response through the `HostApi::response_*`
    /// functions on `response`.
    pub poll:
        unsafe extern "C" fn(state: *mut c_void, waker: *const FfiWaker, response: *mut c_void) -> FfiPoll,
    /// Releases `state`; called exactly once.
    pub drop: unsafe extern "C" fn(state: *mut c_void),
}

/// Bytes the plugin lends to the host: readable until the host calls `release`.
#[repr(C)]
#[derive(Debug)]
pub struct FfiLent {
    /// The bytes, owned by `state`.
    pub data: FfiStr,
    /// Plugin-owned state that keeps `data` alive.
    pub state: *mut c_void,
    /// Releases `state`; called exactly once.
    pub release: unsafe extern "C" fn(state: *mut c_void),
}

/// A unit of blocking work, run by the host on a thread of the plugin's generation.
#[repr(C)]
#[derive(Debug)]
pub struct FfiJob {
    /// Plugin-owned state.
    pub state: *mut c_void,
    /// Runs the work; called at most once, never concurrently with `release`.
    pub run: unsafe extern "C" fn(state: *mut c_void),
    /// Releases the host's reference to `state`; called exactly once, after `run` if it ran.
    pub release: unsafe extern "C" fn(state: *mut c_void),
}

/// Services the host lends to a plugin. One table per loaded generation; valid from `init`
/// until after `shutdown` returns.
#[repr(C)]
pub struct HostApi {
    /// The host's [`ABI_VERSION`].
    pub abi_version: u32,
    /// Most verbose level the host records: 0 off, 1 error, 2 warn, 3 info, 4 debug, 5 trace.
    pub max_log_level: u32,
    /// Opaque, passed back to `log`.
    pub context: *const c_void,
    /// Records a log event of the plugin (level as in `max_log_level`).
    pub log: unsafe extern "C" fn(context: *const c_void, level: u32, target: FfiStr, message: FfiStr),
    /// Appends text to a host error sink (as passed to `init` and `ready`).
    pub error_write: unsafe extern "C" fn(sink: *mut c_void, text: FfiStr),

    /// Polls a request body for its next chunk. `READY` with a non-null `chunk` is data, valid
    /// until the next call on this body; `READY` with a null `chunk.ptr` is the end; `ERROR`
    /// means the client failed (the connection broke).
    pub body_poll:
        unsafe extern "C" fn(body: *mut c_void, waker: *const FfiWaker, chunk: *mut FfiStr) -> FfiPoll,
    /// Releases a request body.
    pub body_drop: unsafe extern "C" fn(body: *mut c_void),

    /// Sets the response status code; returns `ERROR` for a code outside 100..=999.
    pub response_set_status: unsafe extern "C" fn(response: *mut c_void, status: u16) -> FfiPoll,
    /// Appends a response header; returns `ERROR` for an invalid name or value.
    pub response_append_header:
        unsafe extern "C" fn(response: *mut c_void, name: FfiStr, value: FfiStr) -> FfiPoll,
    /// Sets the whole body at once (copied).
    pub response_set_full_body: unsafe extern "C" fn(response: *mut c_void, body: FfiStr),
    /// Sets a streaming body; the host owns it from then on and drops it exactly once.
    pub response_set_stream_body: unsafe extern "C" fn(response: *mut c_void, body: FfiBody),
    /// Delivers one body chunk (copied) from inside [`FfiBody::poll_chunk`].
    pub chunk_push: unsafe extern "C" fn(sink: *mut c_void, data: FfiStr),
    /// Delivers one body chunk without copying it, from inside [`FfiBody::poll_chunk`]. The
    /// host reads `chunk.data` until it calls `chunk.release`, exactly once, on a thread of the
    /// plugin's generation, while the library is still loaded.
    pub chunk_lend: unsafe extern "C" fn(sink: *mut c_void, chunk: FfiLent),

    /// Starts a timer of `nanos` nanoseconds; null if called outside the host's runtime.
    pub sleep_new: unsafe extern "C" fn(nanos: u64) -> *mut c_void,
    /// `READY` once the timer has elapsed.
    pub sleep_poll: unsafe extern "C" fn(sleep: *mut c_void, waker: *const FfiWaker) -> FfiPoll,
    /// Releases a timer.
    pub sleep_drop: unsafe extern "C" fn(sleep: *mut c_void),

    /// Runs `job` on the host's blocking pool; null if called outside the host's runtime (then
    /// the job was released).
    pub blocking_spawn: unsafe extern "C" fn(job: FfiJob) -> *mut c_void,
    /// `READY` once the job's `run` has returned.
    pub blocking_poll: unsafe extern "C" fn(task: *mut c_void, waker: *const FfiWaker) -> FfiPoll,
    /// Forgets a job handle (the job itself still runs to completion).
    pub blocking_drop: unsafe extern "C" fn(task: *mut c_void),
}

// SAFETY: the table is immutable after the host creates it; `context` points at immutable host
// data that the host keeps alive for the table's whole life. Its functions are thread-safe.
unsafe impl Sync for HostApi {}
// SAFETY: as above.
unsafe impl Send for HostApi {}

/// Fixed-layout start of every [`PluginDeclaration`]; the only part the host reads before it
/// has checked the version and fingerprint.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DeclarationHeader {
    /// Always [`MAGIC`].
    pub magic: [u8; 8],
    /// The plugin's [`ABI_VERSION`].
    pub abi_version: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// The plugin's [`LAYOUT_FINGERPRINT`].
    pub layout_fingerprint: u64,
}

impl DeclarationHeader {
    /// The header of a plugin built against this crate.
    pub const CURRENT: DeclarationHeader = DeclarationHeader {
        magic: MAGIC,
        abi_version: ABI_VERSION,
        reserved: 0,
        layout_fingerprint: LAYOUT_FINGERPRINT,
    };
}

/// What a plugin exports under [`DECLARATION_SYMBOL`].
#[repr(C)]
pub struct PluginDeclaration {
    /// Checked before anything else.
    pub header: DeclarationHeader,
    /// The plugin's name.
    pub name: FfiStr,
    /// The plugin's semantic version.
    pub version: FfiStr,
    /// The compiler that built the plugin (informational).
    pub rustc: FfiStr,
    /// Called once, first, on a thread of the plugin's generation. `host` stays valid until
    /// `shutdown` has returned. On `ERROR` the reason was written to `error_sink`.
    pub init: unsafe extern "C" fn(host: *const HostApi, error_sink: *mut c_void) -> FfiPoll,
    /// Optional readiness check, called after `init`; `ERROR` refuses the plugin.
    pub ready: Option<unsafe extern "C" fn(error_sink: *mut c_void) -> FfiPoll>,
    /// Starts handling a request.
    pub handle: unsafe extern "C" fn(request: *const FfiRequest) -> FfiResponseFuture,
    /// Called once before the library is unloaded, after the last request has ended.
    pub shutdown: unsafe extern "C" fn(),
    /// How the plugin's panics end: [`PANIC_UNWIND`] (caught at the boundary, so a panic is
    /// one failed request) or [`PANIC_ABORT`] (the process dies: the host refuses such a build).
    pub panic: u32,
}

/// [`PluginDeclaration::panic`]: panics unwind, and the plugin catches them at the boundary.
pub const PANIC_UNWIND: u32 = 1;
/// [`PluginDeclaration::panic`]: panics abort the process (`panic = "abort"` in the profile).
pub const PANIC_ABORT: u32 = 2;

// SAFETY: a declaration is immutable static data: string pointers into the plugin's read-only
// data and function pointers. Sharing references to it between threads is sound.
unsafe impl Sync for PluginDeclaration {}
// SAFETY: as above; the raw pointers are never written through.
unsafe impl Send for PluginDeclaration {}

const fn mix(mut h: u64, v: usize) -> u64 {
    // FNV-1a over the 8 bytes of `v`.
    let mut i = 0;
    while i < 8 {
        h ^= ((v as u64) >> (i * 8)) & 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    h
}

macro_rules! fingerprint {
    ($($t:ty { $($f:ident),* })*) => {{
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        h = mix(h, ABI_VERSION as usize);
        $(
            h = mix(h, size_of::<$t>());
            h = mix(h, align_of::<$t>());
            $( h = mix(h, offset_of!($t, $f)); )*
        )*
        h
    }};
}

/// A hash of the size, alignment and field offsets of every type in this module. Two builds
/// with the same fingerprint agree on the layout of everything that crosses the boundary.
pub const LAYOUT_FINGERPRINT: u64 = fingerprint! {
    FfiStr { ptr, len }
    FfiPoll {}
    FfiWakerVTable { clone, wake, wake_by_ref, drop }
    FfiWaker { data, vtable }
    FfiHeader { name, value }
    FfiHostBody { handle, exact_len }
    FfiRequest { method, uri, version, headers, headers_len, body }
    FfiBody { state, poll_chunk, drop, exact_len }
    FfiResponseFuture { state, poll, drop }
    FfiLent { data, state, release }
    FfiJob { state, run, release }
    HostApi {
        abi_version, max_log_level, context, log, error_write, body_poll, body_drop,
        response_set_status, response_append_header, response_set_full_body,
        response_set_stream_body, chunk_push, chunk_lend, sleep_new, sleep_poll, sleep_drop,
        blocking_spawn, blocking_poll, blocking_drop
    }
    DeclarationHeader { magic, abi_version, reserved, layout_fingerprint }
    PluginDeclaration { header, name, version, rustc, init, ready, handle, shutdown, panic }
};

pub mod waker {
    //! Conversions between `std::task::Waker` and [`super::FfiWaker`].
    //!
    //! Both sides compile this module, each into its own copy with its own vtable addresses.
    //! A waker that makes a round trip (host → plugin → host) is unwrapped back to the
    //! original rather than wrapped twice, so the host never holds a waker whose functions
    //! live in the plugin unless the plugin made that waker itself.

    use super::{FfiWaker, FfiWakerVTable};
    use core::ffi::c_void;
    use core::mem::ManuallyDrop;
    use core::task::{RawWaker, RawWakerVTable, Waker};

    // An FfiWaker whose data is a `Waker` of this side: borrowed (`&Waker`) when passed into
    // a poll, or boxed (`Box<Waker>`) once cloned.
    static NATIVE: FfiWakerVTable = FfiWakerVTable {
        clone: native_clone,
        wake: native_wake,
        wake_by_ref: native_wake_by_ref,
        drop: native_drop,
    };

    /// `clone` of NATIVE: an owned (boxed) clone of the `Waker` behind `data`.
    ///
    /// # Safety
    /// `data` must be the data of a NATIVE waker, borrowed or owned: a live `Waker` of this
    /// side.
    unsafe extern "C" fn native_clone(data: *const c_void) -> FfiWaker {
        // SAFETY: NATIVE wakers always point at a live `Waker` of this side.
        let waker = unsafe { &*(data as *const Waker) };
        FfiWaker { data: Box::into_raw(Box::new(waker.clone())) as *const c_void, vtable: &NATIVE }
    }
    /// `wake` of NATIVE: wakes and releases an owned waker.
    ///
    /// # Safety
    /// `data` must be the data of an owned NATIVE waker (a `Box<Waker>` from `native_clone`),
    /// not used again afterwards.
    unsafe extern "C" fn native_wake(data: *const c_void) {
        // SAFETY: only owned (boxed) NATIVE wakers are woken by value.
        unsafe { Box::from_raw(data as *mut Waker) }.wake();
    }
    /// `wake_by_ref` of NATIVE: wakes, keeping the waker valid.
    ///
    /// # Safety
    /// As for `native_clone`: `data` must be the data of a NATIVE waker, borrowed or owned.
    unsafe extern "C" fn native_wake_by_ref(data: *const c_void) {
        // SAFETY: as in `native_clone`.
        unsafe { &*(data as *const Waker) }.wake_by_ref();
    }
    /// `drop` of NATIVE: releases an owned waker without waking.
    ///
    /// # Safety
    /// As for `native_wake`: `data` must be the data of an owned NATIVE waker, not used again.
    unsafe extern "C" fn native_drop(data: *const c_void) {
        // SAFETY: only owned (boxed) NATIVE wakers are dropped.
        drop(unsafe { Box::from_raw(data as *mut Waker) });
    }

    // A std Waker wrapping an FfiWaker of the other side: borrowed (`*const FfiWaker`) for the
    // duration of a poll, or boxed once cloned.
    static BORROWED: RawWakerVTable =
        RawWakerVTable::new(ffi_clone, ffi_wake_by_ref, ffi_wake_by_ref, ffi_noop);
    static OWNED: RawWakerVTable = RawWakerVTable::new(ffi_clone, ffi_wake, ffi_wake_by_ref, ffi_drop);

    /// `clone` of BORROWED and OWNED: clones the wrapped `FfiWaker` through its creator's
    /// vtable into an OWNED waker.
    ///
    /// # Safety
    /// `data` must be the data of a BORROWED or OWNED waker: a pointer to a valid `FfiWaker`.
    unsafe fn ffi_clone(data: *const ()) -> RawWaker {
        // SAFETY: BORROWED and OWNED data always point at a valid FfiWaker.
        let ffi = unsafe { &*(data as *const FfiWaker) };
        // SAFETY: the FfiWaker's creator implements clone for its own data.
        let owned = unsafe { ((*ffi.vtable).clone)(ffi.data) };
        RawWaker::new(Box::into_raw(Box::new(owned)) as *const (), &OWNED)
    }
    /// `wake` of OWNED: wakes through the creator's vtable and frees the box.
    ///
    /// # Safety
    /// `data` must be the data of an OWNED waker (a `Box<FfiWaker>` holding an owned
    /// `FfiWaker`), not used again afterwards.
    unsafe fn ffi_wake(data: *const ()) {
        // SAFETY: OWNED data is a Box<FfiWaker> holding an owned FfiWaker.
        let ffi = unsafe { Box::from_raw(data as *mut FfiWaker) };
        // SAFETY: an owned FfiWaker may be woken by value once.
        unsafe { ((*ffi.vtable).wake)(ffi.data) };
    }
    /// `wake_by_ref` of BORROWED and OWNED (and BORROWED's `wake`: a borrowed waker is only
    /// ever woken by reference).
    ///
    /// # Safety
    /// As for `ffi_clone`: `data` must point at a valid `FfiWaker`.
    unsafe fn ffi_wake_by_ref(data: *const ()) {
        // SAFETY: as in `ffi_clone`.
        let ffi = unsafe { &*(data as *const FfiWaker) };
        // SAFETY: wake_by_ref is allowed on borrowed and owned FfiWakers.
        unsafe { ((*ffi.vtable).wake_by_ref)(ffi.data) };
    }
    /// `drop` of OWNED: releases the owned `FfiWaker` through its creator's vtable and frees
    /// the box.
    ///
    /// # Safety
    /// As for `ffi_wake`: `data` must be the data of an OWNED waker, not used again.
    unsafe fn ffi_drop(data: *const ()) {
        // SAFETY: OWNED data is a Box<FfiWaker> holding an owned FfiWaker.
        let ffi = unsafe { Box::from_raw(data as *mut FfiWaker) };
        // SAFETY: an owned FfiWaker is released exactly once.
        unsafe { ((*ffi.vtable).drop)(ffi.data) };
    }
    /// `drop` of BORROWED: the lender keeps ownership, so there is nothing to release.
    ///
    /// # Safety
    /// None: it touches nothing. It is an `unsafe fn` only to have a `RawWakerVTable` entry's
    /// type.
    unsafe fn ffi_noop(_: *const ()) {}

    /// Lends `waker` to the other side for the duration of one call.
    ///
    /// The returned value borrows `waker`: it must not be used after `waker` is dropped, and
    /// the receiver may only `clone` or `wake_by_ref` it.
    pub fn lend(waker: &Waker) -> FfiWaker {
        if core::ptr::eq(waker.vtable(), &BORROWED) || core::ptr::eq(waker.vtable(), &OWNED) {
            // A waker the other side lent us (or its clone): hand back the original.
            // SAFETY: data of these vtables is always a valid `*const FfiWaker`.
            return unsafe { *(waker.data() as *const FfiWaker) };
        }
        FfiWaker { data: waker as *const Waker as *const c_void, vtable: &NATIVE }
    }

    /// Whether `ffi` is a waker of this side that made a round trip (as opposed to one the
    /// other side created itself).
    ///
    /// # Safety
    /// `ffi` must point at a valid `FfiWaker`.
    pub unsafe fn is_native(ffi: *const FfiWaker) -> bool {
        // SAFETY: the caller guarantees `ffi` is valid.
        core::ptr::eq(unsafe { (*ffi).vtable }, &NATIVE)
    }

    /// Views a waker lent by the other side as a std `Waker`, valid while `ffi` is.
    ///
    /// # Safety
    /// `ffi` must point at a valid borrowed or owned `FfiWaker` for as long as the returned
    /// waker (not its clones) is used.
    pub unsafe fn borrow(ffi: *const FfiWaker) -> ManuallyDrop<Waker> {
        // SAFETY: the caller guarantees `ffi` is valid.
        let f = unsafe { &*ffi };
        if core::ptr::eq(f.vtable, &NATIVE) {
            // Our own waker made a round trip: use it directly, without wrapping.
            // SAFETY: NATIVE data is a live `Waker`; the copy is never dropped (ManuallyDrop),
            // so the original keeps sole ownership.
            return ManuallyDrop::new(unsafe { core::ptr::read(f.data as *const Waker) });
        }
        // SAFETY: BORROWED's functions only read `ffi`, which the caller keeps valid.
        ManuallyDrop::new(unsafe { Waker::from_raw(RawWaker::new(ffi as *const (), &BORROWED)) })
    }
}
