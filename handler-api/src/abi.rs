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
/// [`HostApi`] (see [`HostApi::size`]).
pub const ABI_VERSION: u32 = 4;

/// First bytes of every [`DeclarationHeader`].
pub const MAGIC: [u8; 8] = *b"HOTSWAP\0";

/// Name of the symbol a plugin exports: a static [`PluginDeclaration`].
pub const DECLARATION_SYMBOL: &str = "hotswap_plugin_declaration";

/// A borrowed UTF-8 (or byte) string: valid only for the call it is passed to, unless the
/// function that passes it says otherwise.
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

/// A length that is not known in advance ([`FfiHostBody::exact_len`], [`FfiBody::exact_len`]).
pub const UNKNOWN_LENGTH: u64 = u64::MAX;

/// [`FfiRequest::version`]: HTTP/0.9.
pub const HTTP_09: u32 = 9;
/// [`FfiRequest::version`]: HTTP/1.0.
pub const HTTP_10: u32 = 10;
/// [`FfiRequest::version`]: HTTP/1.1.
pub const HTTP_11: u32 = 11;
/// [`FfiRequest::version`]: HTTP/2.
pub const HTTP_2: u32 = 20;
/// [`FfiRequest::version`]: HTTP/3.
pub const HTTP_3: u32 = 30;

/// [`FfiRequest::scheme`]: cleartext HTTP.
pub const SCHEME_HTTP: u32 = 1;
/// [`FfiRequest::scheme`]: HTTP over TLS.
pub const SCHEME_HTTPS: u32 = 2;

/// [`FfiSocketAddr::family`]: no address (the connection has none, as a Unix socket).
pub const ADDR_NONE: u16 = 0;
/// [`FfiSocketAddr::family`]: IPv4, in the first 4 bytes of `ip`.
pub const ADDR_IPV4: u16 = 4;
/// [`FfiSocketAddr::family`]: IPv6.
pub const ADDR_IPV6: u16 = 6;

/// [`FfiResponse::body_kind`]: no body.
pub const BODY_EMPTY: u32 = 0;
/// [`FfiResponse::body_kind`]: the whole body, in [`FfiResponse::full`].
pub const BODY_FULL: u32 = 1;
/// [`FfiResponse::body_kind`]: a streamed body, [`FfiResponse::stream`].
pub const BODY_STREAM: u32 = 2;

/// [`HostApi::log`] levels (and [`HostApi::max_log_level`]; 0 is off).
pub const LOG_ERROR: u32 = 1;
/// See [`LOG_ERROR`].
pub const LOG_WARN: u32 = 2;
/// See [`LOG_ERROR`].
pub const LOG_INFO: u32 = 3;
/// See [`LOG_ERROR`].
pub const LOG_DEBUG: u32 = 4;
/// See [`LOG_ERROR`].
pub const LOG_TRACE: u32 = 5;

/// [`PluginDeclaration::panic`]: panics unwind, and the plugin catches them at the boundary.
pub const PANIC_UNWIND: u32 = 1;
/// [`PluginDeclaration::panic`]: panics abort the process (`panic = "abort"` in the profile).
pub const PANIC_ABORT: u32 = 2;

/// Declares the type of every function pointer that crosses, and keeps their text for
/// [`LAYOUT_FINGERPRINT`]: a function whose parameters change meaning but not size (a
/// `*mut FfiStr` that becomes a `*mut FfiChunk`) changes the fingerprint too.
macro_rules! signatures {
    ($($(#[$meta:meta])* $name:ident = $ty:ty;)*) => {
        $( $(#[$meta])* pub type $name = $ty; )*
        const SIGNATURES: &str = concat!($(stringify!($name), "=", stringify!($ty), ";"),*);
    };
}

/// [`signatures!`] for the state handoff, whose fingerprint is its own.
macro_rules! signatures_of_state {
    ($($(#[$meta:meta])* $name:ident = $ty:ty;)*) => {
        $( $(#[$meta])* pub type $name = $ty; )*
        const STATE_SIGNATURES: &str = concat!($(stringify!($name), "=", stringify!($ty), ";"),*);
    };
}

signatures! {
    /// [`FfiWakerVTable::clone`].
    WakerCloneFn = unsafe extern "C" fn(data: *const c_void) -> FfiWaker;
    /// [`FfiWakerVTable::wake`], `wake_by_ref` and `drop`.
    WakerFn = unsafe extern "C" fn(data: *const c_void);
    /// Releases plugin state: every `drop` and `release` that takes only the state.
    DropFn = unsafe extern "C" fn(state: *mut c_void);
    /// [`FfiResponseFuture::poll`].
    ResponsePollFn = unsafe extern "C" fn(state: *mut c_void, waker: *const FfiWaker, response: *mut FfiResponse) -> FfiPoll;
    /// [`FfiBodyVTable::poll_chunk`].
    ChunkPollFn = unsafe extern "C" fn(state: *mut c_void, waker: *const FfiWaker, chunk: *mut FfiChunk) -> FfiPoll;
    /// [`FfiFutureVTable::poll`].
    FuturePollFn = unsafe extern "C" fn(state: *mut c_void, waker: *const FfiWaker) -> FfiPoll;
    /// [`FfiUpgradeVTable::start`].
    UpgradeStartFn = unsafe extern "C" fn(state: *mut c_void, io: *mut c_void) -> FfiFuture;
    /// [`HostApi::log`].
    LogFn = unsafe extern "C" fn(context: *const c_void, level: u32, target: FfiStr, message: FfiStr);
    /// [`HostApi::error_write`].
    ErrorWriteFn = unsafe extern "C" fn(sink: *mut c_void, text: FfiStr);
    /// [`HostApi::body_poll`].
    BodyPollFn = unsafe extern "C" fn(body: *mut c_void, waker: *const FfiWaker, chunk: *mut FfiStr) -> FfiPoll;
    /// [`HostApi::body_trailers`].
    BodyTrailersFn = unsafe extern "C" fn(body: *mut c_void, headers: *mut *const FfiHeader, len: *mut usize) -> FfiPoll;
    /// Releases a host object: [`HostApi::body_drop`], `io_drop`, `superseded_drop`, `sleep_drop`
    /// and `blocking_drop`.
    HostDropFn = unsafe extern "C" fn(handle: *mut c_void);
    /// [`HostApi::io_poll_read`].
    IoReadFn = unsafe extern "C" fn(io: *mut c_void, waker: *const FfiWaker, buf: *mut u8, cap: usize, read: *mut usize) -> FfiPoll;
    /// [`HostApi::io_poll_write`].
    IoWriteFn = unsafe extern "C" fn(io: *mut c_void, waker: *const FfiWaker, data: FfiStr, written: *mut usize) -> FfiPoll;
    /// [`HostApi::io_poll_flush`], [`HostApi::io_poll_shutdown`], [`HostApi::superseded_poll`],
    /// [`HostApi::sleep_poll`] and [`HostApi::blocking_poll`].
    HostPollFn = unsafe extern "C" fn(handle: *mut c_void, waker: *const FfiWaker) -> FfiPoll;
    /// [`HostApi::superseded_new`].
    SupersededNewFn = unsafe extern "C" fn(context: *const c_void) -> *mut c_void;
    /// [`HostApi::sleep_new`].
    SleepNewFn = unsafe extern "C" fn(nanos: u64) -> *mut c_void;
    /// [`HostApi::blocking_spawn`].
    BlockingSpawnFn = unsafe extern "C" fn(job: FfiJob) -> *mut c_void;
    /// [`PluginDeclaration::init`].
    InitFn = unsafe extern "C" fn(host: *const HostApi, error_sink: *mut c_void) -> FfiPoll;
    /// [`PluginDeclaration::ready`].
    ReadyFn = unsafe extern "C" fn(error_sink: *mut c_void) -> FfiPoll;
    /// [`PluginDeclaration::handle`].
    HandleFn = unsafe extern "C" fn(request: *const FfiRequest) -> FfiResponseFuture;
    /// [`PluginDeclaration::shutdown`].
    ShutdownFn = unsafe extern "C" fn();
}

/// Functions behind an [`FfiWaker`], implemented by the side that created it.
#[repr(C)]
pub struct FfiWakerVTable {
    /// Returns an owned waker that wakes the same task.
    pub clone: WakerCloneFn,
    /// Wakes the task and releases an owned waker.
    pub wake: WakerFn,
    /// Wakes the task; the waker stays valid.
    pub wake_by_ref: WakerFn,
    /// Releases an owned waker without waking.
    pub drop: WakerFn,
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

/// One header, borrowed.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FfiHeader {
    /// Header name (lowercase).
    pub name: FfiStr,
    /// Header value bytes: always a valid field value (bytes `http::HeaderValue` accepts),
    /// which the receiver may rely on without checking again.
    pub value: FfiStr,
}

/// A socket address: an IP address and a port.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FfiSocketAddr {
    /// [`ADDR_IPV4`], [`ADDR_IPV6`] or [`ADDR_NONE`].
    pub family: u16,
    /// The port, in host byte order.
    pub port: u16,
    /// IPv6 scope id (0 otherwise).
    pub scope_id: u32,
    /// The address bytes in network order: the first 4 for IPv4.
    pub ip: [u8; 16],
}

/// A request body owned by the host. The plugin polls it with [`HostApi::body_poll`] and must
/// hand it back exactly once with [`HostApi::body_drop`].
#[repr(C)]
#[derive(Debug)]
pub struct FfiHostBody {
    /// Opaque host handle; null when the request has no body (the plugin then neither polls
    /// nor drops it).
    pub handle: *mut c_void,
    /// Exact length if known (`Content-Length`), else [`UNKNOWN_LENGTH`].
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
    /// HTTP version: [`HTTP_11`] and the like.
    pub version: u32,
    /// [`SCHEME_HTTP`] or [`SCHEME_HTTPS`]: how the client reached the host.
    pub scheme: u32,
    /// Pointer to `headers_len` headers.
    pub headers: *const FfiHeader,
    /// Number of headers.
    pub headers_len: usize,
    /// The client's address (the other end of the connection).
    pub peer: FfiSocketAddr,
    /// The host's address the client connected to.
    pub local: FfiSocketAddr,
    /// Unique in the host process for its life; the host's log lines about this request
    /// carry it.
    pub request_id: u64,
    /// The protocol the client asks to switch to, if the host can switch this request (an
    /// HTTP/1.1 `Upgrade` header, an HTTP/2 extended CONNECT's `:protocol`); else empty. See
    /// [`FfiResponse::upgrade`].
    pub upgrade: FfiStr,
    /// The body; ownership passes to the plugin.
    pub body: FfiHostBody,
}

/// A chunk of a response body, produced by [`FfiBodyVTable::poll_chunk`].
#[repr(C)]
#[derive(Debug)]
pub struct FfiChunk {
    /// The bytes.
    pub data: FfiStr,
    /// `None`: `data` is borrowed until the next call on its body. `Some`: `data` is lent
    /// until the host calls `release(state)`, exactly once, on a thread of the plugin's
    /// generation, while the library is still loaded (the host keeps it without a copy).
    pub release: Option<DropFn>,
    /// Plugin-owned state that keeps lent `data` alive.
    pub state: *mut c_void,
}

/// The functions of a response body.
#[repr(C)]
pub struct FfiBodyVTable {
    /// Produces the next chunk into `chunk` and returns `READY`; `READY` with an empty
    /// `chunk.data` (and no `release`) is the end of the body. `ERROR` and `PANICKED` abort
    /// the response.
    pub poll_chunk: ChunkPollFn,
    /// Releases `state`; called exactly once.
    pub drop: DropFn,
}

/// A response body produced by the plugin, polled by the host chunk by chunk.
#[repr(C)]
#[derive(Debug)]
pub struct FfiBody {
    /// Plugin-owned state.
    pub state: *mut c_void,
    /// Its functions (a static of the plugin).
    pub vtable: *const FfiBodyVTable,
    /// Exact length if known, else [`UNKNOWN_LENGTH`].
    pub exact_len: u64,
}

/// The functions of an [`FfiFuture`].
#[repr(C)]
pub struct FfiFutureVTable {
    /// `READY` when done; `ERROR` and `PANICKED` end it too.
    pub poll: FuturePollFn,
    /// Releases `state`; called exactly once, done or not.
    pub drop: DropFn,
}

/// A plugin future with no output, polled by the host.
#[repr(C)]
#[derive(Debug)]
pub struct FfiFuture {
    /// Plugin-owned state.
    pub state: *mut c_void,
    /// Its functions (a static of the plugin).
    pub vtable: *const FfiFutureVTable,
}

/// The functions of an [`FfiUpgrade`].
#[repr(C)]
pub struct FfiUpgradeVTable {
    /// Starts the plugin's side of the connection once the host has switched protocols:
    /// `io` is the connection's byte stream (see [`HostApi::io_poll_read`]), which passes to
    /// the plugin (it releases it with [`HostApi::io_drop`]). Consumes `state`. A null vtable
    /// in the result means the plugin failed to start (it panicked) and has released `io`
    /// already.
    pub start: UpgradeStartFn,
    /// Releases `state` when the switch did not happen (the client left first, or the host
    /// refused the response).
    pub drop: DropFn,
}

/// An upgrade the plugin accepts: what runs on the connection after the response.
#[repr(C)]
#[derive(Debug)]
pub struct FfiUpgrade {
    /// Plugin-owned state.
    pub state: *mut c_void,
    /// Its functions; null when the response accepts no upgrade.
    pub vtable: *const FfiUpgradeVTable,
}

/// A response, written by [`FfiResponseFuture::poll`] when it returns `READY`. Its strings
/// and headers are borrowed until the host drops the future; the stream body and the upgrade
/// pass to the host.
#[repr(C)]
#[derive(Debug)]
pub struct FfiResponse {
    /// The status code.
    pub status: u16,
    /// [`BODY_EMPTY`], [`BODY_FULL`] or [`BODY_STREAM`].
    pub body_kind: u32,
    /// Pointer to `headers_len` headers.
    pub headers: *const FfiHeader,
    /// Number of headers.
    pub headers_len: usize,
    /// [`BODY_FULL`]: the body.
    pub full: FfiStr,
    /// [`BODY_STREAM`]: the body (its vtable is null otherwise).
    pub stream: FfiBody,
    /// An accepted upgrade (status 101 over HTTP/1.1, 2xx to an extended CONNECT), if any.
    pub upgrade: FfiUpgrade,
}

/// The future returned by [`PluginDeclaration::handle`].
#[repr(C)]
#[derive(Debug)]
pub struct FfiResponseFuture {
    /// Plugin-owned state.
    pub state: *mut c_void,
    /// On `READY`, the plugin has written the response to `response`.
    pub poll: ResponsePollFn,
    /// Releases `state`; called exactly once.
    pub drop: DropFn,
}

/// A unit of blocking work, run by the host on a thread of the plugin's generation.
#[repr(C)]
#[derive(Debug)]
pub struct FfiJob {
    /// Plugin-owned state.
    pub state: *mut c_void,
    /// Runs the work; called at most once, never concurrently with `release`.
    pub run: DropFn,
    /// Releases the host's reference to `state`; called exactly once, after `run` if it ran.
    pub release: DropFn,
}

/// Services the host lends to a plugin. One table per loaded generation; valid from `init`
/// until after `shutdown` returns.
///
/// Later versions of this ABI may add functions at the end without a new [`ABI_VERSION`]:
/// [`LAYOUT_FINGERPRINT`] covers the fields of [`HOST_API_BASE_SIZE`] only (new fields go after
/// them, outside the fingerprint's `open` list, with signatures declared outside
/// `signatures!`). A plugin requires a table of at least the base size, and checks
/// [`HostApi::size`] before it calls a function added after it; a host built later lends its
/// larger table to plugins built earlier unchanged.
#[repr(C)]
pub struct HostApi {
    /// `size_of::<HostApi>()` as the host was built: which functions it has.
    pub size: usize,
    /// The host's [`ABI_VERSION`].
    pub abi_version: u32,
    /// Most verbose level the host records: 0 off, [`LOG_ERROR`] .. [`LOG_TRACE`].
    pub max_log_level: u32,
    /// Opaque, passed back to `log` and `superseded_new`.
    pub context: *const c_void,
    /// Records a log event of the plugin (level as in `max_log_level`).
    pub log: LogFn,
    /// Appends text to a host error sink (as passed to `init` and `ready`).
    pub error_write: ErrorWriteFn,

    /// Polls a request body for its next chunk. `READY` with a non-null `chunk` is data, valid
    /// until the next call on this body; `READY` with a null `chunk.ptr` is the end; `ERROR`
    /// means the client failed (the connection broke).
    pub body_poll: BodyPollFn,
    /// After `body_poll` returned the end: the body's trailers (none if `len` is 0), valid
    /// until the next call on this body. `ERROR` before the end.
    pub body_trailers: BodyTrailersFn,
    /// Releases a request body.
    pub body_drop: HostDropFn,

    /// Reads from an upgraded connection into `buf` (`cap` bytes, which need not be
    /// initialised): `READY` with `read` set (0 at the end of the stream), `PENDING`, or
    /// `ERROR` when the connection failed.
    pub io_poll_read: IoReadFn,
    /// Writes some of `data`: `READY` with `written` set, `PENDING`, or `ERROR`.
    pub io_poll_write: IoWriteFn,
    /// Flushes what was written.
    pub io_poll_flush: HostPollFn,
    /// Shuts the writing side down (the client sees the end of the stream).
    pub io_poll_shutdown: HostPollFn,
    /// Releases an upgraded connection, closing it.
    pub io_drop: HostDropFn,

    /// A handle whose `superseded_poll` is `READY` once the plugin's generation no longer gets
    /// new requests (a newer one serves them, or the host is shutting down); null if the host
    /// cannot tell.
    pub superseded_new: SupersededNewFn,
    /// See `superseded_new`.
    pub superseded_poll: HostPollFn,
    /// Releases a handle of `superseded_new`.
    pub superseded_drop: HostDropFn,

    /// Starts a timer of `nanos` nanoseconds; null if called outside the host's runtime.
    pub sleep_new: SleepNewFn,
    /// `READY` once the timer has elapsed.
    pub sleep_poll: HostPollFn,
    /// Releases a timer.
    pub sleep_drop: HostDropFn,

    /// Runs `job` on the host's blocking pool; null if called outside the host's runtime (then
    /// the job was released).
    pub blocking_spawn: BlockingSpawnFn,
    /// `READY` once the job's `run` has returned.
    pub blocking_poll: HostPollFn,
    /// Forgets a job handle (the job itself still runs to completion).
    pub blocking_drop: HostDropFn,

    // Added after the first release of ABI version 4, beyond `HOST_API_BASE_SIZE`: a plugin
    // checks `size` before it calls one of these (see [`HostApi::has`]), and its copy of a
    // shorter table has a stand-in for each (`export::copy_table`: add one there).
    /// Runs `future` on the generation's runtime until it completes, or until the generation
    /// is unloaded: the host then drops it, on one of the generation's threads, before
    /// `shutdown`. `READY` if the host took it; otherwise (the generation is unloading, or the
    /// host has no runtime) it has been released already.
    pub spawn: SpawnFn,
    /// Like `log`, for an event inside the plugin's `tracing` spans: `spans` is their context,
    /// outermost first, as `outer{a=1}:inner{b=2}` (empty outside any).
    pub log_in_spans: LogInSpansFn,
}

/// [`HostApi::log_in_spans`]. (Declared outside `signatures!`, as [`SpawnFn`].)
pub type LogInSpansFn =
    unsafe extern "C" fn(context: *const c_void, level: u32, target: FfiStr, spans: FfiStr, message: FfiStr);

/// [`HostApi::spawn`]. (Declared outside `signatures!`: the fingerprint covers the base table
/// only.)
pub type SpawnFn = unsafe extern "C" fn(context: *const c_void, future: FfiFuture) -> FfiPoll;

impl HostApi {
    /// Whether this table, whose `size` the host set, reaches to the end of the field at
    /// `offset` of `len` bytes: a host built before the field was added lends a shorter one.
    pub fn has(&self, offset: usize, len: usize) -> bool {
        self.size >= offset + len
    }

    /// [`HostApi::log_in_spans`], if this host has it.
    pub fn log_in_spans_fn(&self) -> Option<LogInSpansFn> {
        // Read only when present, as `spawn_fn`.
        if self.has(offset_of!(HostApi, log_in_spans), size_of::<LogInSpansFn>()) {
            Some(self.log_in_spans)
        } else {
            None
        }
    }

    /// [`HostApi::spawn`], if this host has it.
    pub fn spawn_fn(&self) -> Option<SpawnFn> {
        // Read only when present: a shorter table ends before it.
        if self.has(offset_of!(HostApi, spawn), size_of::<SpawnFn>()) {
            Some(self.spawn)
        } else {
            None
        }
    }
}

/// The size of [`HostApi`] in the first release of ABI version 4, up to and with its last
/// field then (`blocking_drop`): every plugin of this version may call every function within
/// it. Frozen: fields added later do not move it.
pub const HOST_API_BASE_SIZE: usize = offset_of!(HostApi, blocking_drop) + size_of::<HostDropFn>();

const _: () = assert!(size_of::<HostApi>() >= HOST_API_BASE_SIZE);
// Fields added later go at the end, in the order they were added: never between.
const _: () = assert!(offset_of!(HostApi, spawn) == HOST_API_BASE_SIZE);
const _: () = assert!(offset_of!(HostApi, log_in_spans) == offset_of!(HostApi, spawn) + size_of::<SpawnFn>());

// SAFETY: the table is immutable after the host creates it; `context` points at immutable host
// data that the host keeps alive for the table's whole life. Its functions are thread-safe.
unsafe impl Sync for HostApi {}
// SAFETY: as above.
unsafe impl Send for HostApi {}

/// Fixed-layout start of every [`PluginDeclaration`]; the only part the host reads before it
/// has checked the version and fingerprint. It has the same layout in every ABI version.
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
    pub init: InitFn,
    /// Optional readiness check, called after `init`; `ERROR` refuses the plugin.
    pub ready: Option<ReadyFn>,
    /// Starts handling a request.
    pub handle: HandleFn,
    /// Called once before the library is unloaded, after the last request has ended.
    pub shutdown: ShutdownFn,
    /// How the plugin's panics end: [`PANIC_UNWIND`] (caught at the boundary, so a panic is
    /// one failed request) or [`PANIC_ABORT`] (the process dies: the host refuses such a build).
    pub panic: u32,
}

// SAFETY: a declaration is immutable static data: string pointers into the plugin's read-only
// data and function pointers. Sharing references to it between threads is sound.
unsafe impl Sync for PluginDeclaration {}
// SAFETY: as above; the raw pointers are never written through.
unsafe impl Send for PluginDeclaration {}

/// FNV-1a over the 8 bytes of `v`.
const fn mix(mut h: u64, v: u64) -> u64 {
    let mut i = 0;
    while i < 8 {
        h ^= (v >> (i * 8)) & 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    h
}

/// FNV-1a over the bytes of `text` but its whitespace: how `stringify!` spaces tokens may
/// differ from one compiler to the next, the tokens do not.
const fn mix_text(mut h: u64, text: &str) -> u64 {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if !bytes[i].is_ascii_whitespace() {
            h ^= bytes[i] as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        i += 1;
    }
    h
}

macro_rules! fingerprint {
    (
        types { $($t:ty { $($f:ident),* })* }
        open { $($o:ty { $($of:ident),* })* }
        values { $($v:expr),* $(,)? }
    ) => {{
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        h = mix(h, ABI_VERSION as u64);
        h = mix_text(h, SIGNATURES);
        $(
            h = mix_text(h, stringify!($t));
            h = mix(h, size_of::<$t>() as u64);
            h = mix(h, align_of::<$t>() as u64);
            $(
                h = mix_text(h, stringify!($f));
                h = mix(h, offset_of!($t, $f) as u64);
            )*
        )*
        $(
            h = mix_text(h, stringify!($o));
            h = mix(h, align_of::<$o>() as u64);
            $(
                h = mix_text(h, stringify!($of));
                h = mix(h, offset_of!($o, $of) as u64);
            )*
        )*
        $(
            h = mix_text(h, stringify!($v));
            h = mix(h, $v as u64);
        )*
        h
    }};
}

/// A hash of what both sides must agree on: the size, alignment, field names and offsets of
/// every type in this module, the signature of every function pointer, and the value of every
/// constant (status codes, kinds, sentinels). Two builds with the same fingerprint agree on
/// the layout and the meaning of everything that crosses the boundary.
pub const LAYOUT_FINGERPRINT: u64 = fingerprint! {
    types {
        FfiStr { ptr, len }
        FfiPoll {}
        FfiWakerVTable { clone, wake, wake_by_ref, drop }
        FfiWaker { data, vtable }
        FfiHeader { name, value }
        FfiSocketAddr { family, port, scope_id, ip }
        FfiHostBody { handle, exact_len }
        FfiRequest { method, uri, version, scheme, headers, headers_len, peer, local, request_id, upgrade, body }
        FfiChunk { data, release, state }
        FfiBodyVTable { poll_chunk, drop }
        FfiBody { state, vtable, exact_len }
        FfiFutureVTable { poll, drop }
        FfiFuture { state, vtable }
        FfiUpgradeVTable { start, drop }
        FfiUpgrade { state, vtable }
        FfiResponse { status, body_kind, headers, headers_len, full, stream, upgrade }
        FfiResponseFuture { state, poll, drop }
        FfiJob { state, run, release }
        DeclarationHeader { magic, abi_version, reserved, layout_fingerprint }
        PluginDeclaration { header, name, version, rustc, init, ready, handle, shutdown, panic }
    }
    // Their fields, but not their size: functions added at the end later keep the fingerprint.
    open {
        HostApi {
            size, abi_version, max_log_level, context, log, error_write, body_poll, body_trailers,
            body_drop, io_poll_read, io_poll_write, io_poll_flush, io_poll_shutdown, io_drop,
            superseded_new, superseded_poll, superseded_drop, sleep_new, sleep_poll, sleep_drop,
            blocking_spawn, blocking_poll, blocking_drop
        }
    }
    values {
        FfiPoll::READY.0, FfiPoll::PENDING.0, FfiPoll::PANICKED.0, FfiPoll::ERROR.0, UNKNOWN_LENGTH,
        HTTP_09, HTTP_10, HTTP_11, HTTP_2, HTTP_3, SCHEME_HTTP, SCHEME_HTTPS, ADDR_NONE, ADDR_IPV4,
        ADDR_IPV6, BODY_EMPTY, BODY_FULL, BODY_STREAM, LOG_ERROR, LOG_WARN, LOG_INFO, LOG_DEBUG,
        LOG_TRACE, PANIC_UNWIND, PANIC_ABORT,
    }
};

/// Name of the optional symbol of a plugin that hands its state to the next build at a swap:
/// a static [`StateDeclaration`]. A plugin without it starts afresh, and hands nothing on.
pub const STATE_SYMBOL: &str = "hotswap_plugin_state";

/// The state a plugin hands over ([`StateDeclaration::export`]): bytes in the plugin's memory
/// until [`StateDeclaration::release`] gives them back.
#[repr(C)]
#[derive(Debug)]
pub struct FfiState {
    /// What the bytes mean, as the plugin numbers its own formats.
    pub schema: u32,
    /// The bytes; valid until `release`.
    pub bytes: FfiStr,
    /// The plugin's own handle on them, for `release`.
    pub handle: *mut c_void,
}

/// The state the previous build handed over, lent to [`StateDeclaration::import`] for the call.
#[repr(C)]
#[derive(Debug)]
pub struct FfiPreviousState {
    /// The previous build's declared name.
    pub name: FfiStr,
    /// The previous build's declared version.
    pub version: FfiStr,
    /// [`FfiState::schema`] as the previous build exported it.
    pub schema: u32,
    /// Its bytes, valid for the call.
    pub bytes: FfiStr,
}

signatures_of_state! {
    /// [`StateDeclaration::export`]: on `READY`, the state is in `out`, until `release`.
    StateExportFn = unsafe extern "C" fn(out: *mut FfiState) -> FfiPoll;
    /// [`StateDeclaration::release`]: gives back what `export` wrote to `state`.
    StateReleaseFn = unsafe extern "C" fn(state: *mut FfiState);
    /// [`StateDeclaration::import`]: called before `init`, on a thread of the new generation;
    /// `host` is the table `init` will get; on `ERROR` the reason was written to `error_sink`,
    /// and the build is refused.
    StateImportFn = unsafe extern "C" fn(host: *const HostApi, previous: *const FfiPreviousState, error_sink: *mut c_void) -> FfiPoll;
}

/// A plugin's state handoff (`export_handler!(…, state: (export, import))`): checked against
/// [`STATE_FINGERPRINT`] before the host calls anything in it. Apart from the declaration, so
/// that a plugin without it, or one built before it existed, loads as before.
#[repr(C)]
pub struct StateDeclaration {
    /// [`STATE_FINGERPRINT`] as the plugin was built.
    pub fingerprint: u64,
    /// Called on a thread of the old generation, when a new build is about to start.
    pub export: StateExportFn,
    /// Gives back what `export` wrote.
    pub release: StateReleaseFn,
    /// Called on a thread of the new generation, before its `init`.
    pub import: StateImportFn,
}

// SAFETY: static data: a number and function pointers, never written.
unsafe impl Sync for StateDeclaration {}

/// A hash of the layout and signatures of [`StateDeclaration`] and what it passes.
pub const STATE_FINGERPRINT: u64 = {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    h = mix_text(h, STATE_SIGNATURES);
    h = mix(h, size_of::<FfiState>() as u64);
    h = mix(h, offset_of!(FfiState, schema) as u64);
    h = mix(h, offset_of!(FfiState, bytes) as u64);
    h = mix(h, offset_of!(FfiState, handle) as u64);
    h = mix(h, size_of::<FfiPreviousState>() as u64);
    h = mix(h, offset_of!(FfiPreviousState, name) as u64);
    h = mix(h, offset_of!(FfiPreviousState, version) as u64);
    h = mix(h, offset_of!(FfiPreviousState, schema) as u64);
    h = mix(h, offset_of!(FfiPreviousState, bytes) as u64);
    h = mix(h, size_of::<StateDeclaration>() as u64);
    h = mix(h, offset_of!(StateDeclaration, export) as u64);
    h = mix(h, offset_of!(StateDeclaration, release) as u64);
    h = mix(h, offset_of!(StateDeclaration, import) as u64);
    mix(h, LAYOUT_FINGERPRINT)
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
    use std::panic::{catch_unwind, AssertUnwindSafe};

    // An FfiWaker whose data is a `Waker` of this side: borrowed (`&Waker`) when passed into
    // a poll, or boxed (`Box<Waker>`) once cloned.
    static NATIVE: FfiWakerVTable = FfiWakerVTable {
        clone: native_clone,
        wake: native_wake,
        wake_by_ref: native_wake_by_ref,
        drop: native_drop,
    };

    // A waker's functions run its maker's code (a custom executor's `Wake`, say), which may
    // panic; unwinding out of an `extern "C"` function aborts the process, so each catches it.
    // A wake that panicked is lost, as it would be had the waker's maker dropped it.

    /// `clone` of NATIVE: an owned (boxed) clone of the `Waker` behind `data`; a waker that
    /// does nothing if that clone panicked.
    ///
    /// # Safety
    /// `data` must be the data of a NATIVE waker, borrowed or owned: a live `Waker` of this
    /// side.
    unsafe extern "C" fn native_clone(data: *const c_void) -> FfiWaker {
        // SAFETY: NATIVE wakers always point at a live `Waker` of this side.
        let waker = unsafe { &*(data as *const Waker) };
        catch_unwind(AssertUnwindSafe(|| waker.clone()))
            .map(|clone| FfiWaker { data: Box::into_raw(Box::new(clone)) as *const c_void, vtable: &NATIVE })
            .unwrap_or(FfiWaker { data: core::ptr::null(), vtable: &NOOP })
    }
    /// `wake` of NATIVE: wakes and releases an owned waker.
    ///
    /// # Safety
    /// `data` must be the data of an owned NATIVE waker (a `Box<Waker>` from `native_clone`),
    /// not used again afterwards.
    unsafe extern "C" fn native_wake(data: *const c_void) {
        // SAFETY: only owned (boxed) NATIVE wakers are woken by value.
        let waker = unsafe { Box::from_raw(data as *mut Waker) };
        let _ = catch_unwind(AssertUnwindSafe(|| waker.wake()));
    }
    /// `wake_by_ref` of NATIVE: wakes, keeping the waker valid.
    ///
    /// # Safety
    /// As for `native_clone`: `data` must be the data of a NATIVE waker, borrowed or owned.
    unsafe extern "C" fn native_wake_by_ref(data: *const c_void) {
        // SAFETY: as in `native_clone`.
        let waker = unsafe { &*(data as *const Waker) };
        let _ = catch_unwind(AssertUnwindSafe(|| waker.wake_by_ref()));
    }
    /// `drop` of NATIVE: releases an owned waker without waking.
    ///
    /// # Safety
    /// As for `native_wake`: `data` must be the data of an owned NATIVE waker, not used again.
    unsafe extern "C" fn native_drop(data: *const c_void) {
        // SAFETY: only owned (boxed) NATIVE wakers are dropped.
        let waker = unsafe { Box::from_raw(data as *mut Waker) };
        let _ = catch_unwind(AssertUnwindSafe(|| drop(waker)));
    }

    /// A waker that does nothing: what a clone that panicked gives.
    static NOOP: FfiWakerVTable = FfiWakerVTable { clone: noop_clone, wake: noop, wake_by_ref: noop, drop: noop };

    /// `clone` of NOOP.
    ///
    /// # Safety
    /// None: it touches nothing. An `unsafe fn` only to have an `FfiWakerVTable` entry's type.
    unsafe extern "C" fn noop_clone(_: *const c_void) -> FfiWaker {
        FfiWaker { data: core::ptr::null(), vtable: &NOOP }
    }
    /// `wake`, `wake_by_ref` and `drop` of NOOP.
    ///
    /// # Safety
    /// None, as for `noop_clone`.
    unsafe extern "C" fn noop(_: *const c_void) {}

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

    #[cfg(test)]
    mod tests {
        use std::sync::Arc;
        use std::task::Wake;

        use super::*;

        /// A maker's waker whose every function panics.
        struct Panicky;

        impl Wake for Panicky {
            fn wake(self: Arc<Self>) {
                panic!("a waker that panics");
            }
        }

        #[test]
        fn a_waker_that_panics_does_not_unwind_into_the_other_side() {
            let waker = Waker::from(Arc::new(Panicky));
            let lent = lend(&waker);
            // SAFETY: `lent` is a borrowed NATIVE waker of the live `waker`; the clone is owned,
            // and woken once.
            unsafe {
                ((*lent.vtable).wake_by_ref)(lent.data);
                let owned = ((*lent.vtable).clone)(lent.data);
                ((*owned.vtable).wake)(owned.data);
            }
        }

        /// A waker whose clone panics (an `Arc`'s cannot): the clone gives one that does
        /// nothing, and the original is still dropped once.
        #[test]
        fn a_waker_whose_clone_panics_gives_one_that_does_nothing() {
            unsafe fn clone(_: *const ()) -> RawWaker {
                panic!("a clone that panics");
            }
            unsafe fn nothing(_: *const ()) {}
            static PANICKY: RawWakerVTable = RawWakerVTable::new(clone, nothing, nothing, nothing);
            // SAFETY: the vtable's functions touch nothing (or panic).
            let waker = unsafe { Waker::from_raw(RawWaker::new(core::ptr::null(), &PANICKY)) };
            let lent = lend(&waker);
            // SAFETY: as above; the clone is owned, and released once.
            unsafe {
                let owned = ((*lent.vtable).clone)(lent.data);
                assert!(core::ptr::eq(owned.vtable, &NOOP));
                ((*owned.vtable).wake_by_ref)(owned.data);
                ((*owned.vtable).drop)(owned.data);
            }
        }
    }
}
