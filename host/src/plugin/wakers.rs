//! Wakers the plugin made, kept by host code.
//!
//! A plugin polls host objects (a request body, an upgraded connection) with the waker of its
//! task. When that is the host's own waker making a round trip, host code keeps it freely.
//! When the plugin made it (`FuturesUnordered`, a WebSocket library's stream splitting and
//! the like make their own), it is plugin code: it must be woken and dropped only on the
//! generation's threads, while the library is loaded. hyper, h2 and tokio's reactor keep the
//! last waker in state the *connection* owns, which may have moved to a newer generation or
//! outlive this one. So they get a proxy instead: host code that wakes the plugin's waker on
//! its generation's threads, and the plugin's waker stays parked here, dropped with its
//! owner (a host object the plugin releases on one of those threads).

use std::mem::ManuallyDrop;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::Waker;

use handler_api::abi::{self, FfiWaker};

use crate::plugin::generation::thread_generation;

/// Where a host object polled by the plugin parks the plugin's own waker.
#[derive(Default)]
pub(crate) struct Parking {
    slot: Option<Arc<Mutex<Option<Waker>>>>,
    proxy: Option<Waker>,
}

impl Parking {
    /// The waker to hand to hyper, h2 or tokio for a poll with `ffi`: the host's own waker when
    /// it made a round trip (`borrowed` views it), else the proxy, with the plugin's waker
    /// parked behind it. Must run on a thread of the plugin's generation.
    ///
    /// # Safety
    /// `ffi` must point at a valid `FfiWaker` for this call, and `borrowed` be
    /// `abi::waker::borrow(ffi)`.
    pub(crate) unsafe fn waker<'a>(&'a mut self, ffi: *const FfiWaker, borrowed: &'a ManuallyDrop<Waker>) -> &'a Waker {
        // SAFETY: the caller guarantees `ffi` is valid.
        if unsafe { abi::waker::is_native(ffi) } {
            return borrowed;
        }
        let slot = self.slot.get_or_insert_with(Arc::default);
        let mut parked = slot.lock().unwrap_or_else(PoisonError::into_inner);
        if !parked.as_ref().is_some_and(|w| w.will_wake(borrowed)) {
            *parked = Some((**borrowed).clone());
        }
        drop(parked);
        debug_assert_ne!(thread_generation(), 0, "a plugin polled a host object outside its generation's threads");
        self.proxy.get_or_insert_with(|| {
            Waker::from(Arc::new(Proxy {
                generation: thread_generation(),
                runtime: tokio::runtime::Handle::current(),
                slot: Arc::downgrade(slot),
            }))
        })
    }
}

impl Drop for Parking {
    fn drop(&mut self) {
        // The plugin's waker goes here, on the generation's thread; a proxy hyper may still
        // hold then finds an empty slot.
        if let Some(slot) = &self.slot {
            drop(slot.lock().unwrap_or_else(PoisonError::into_inner).take());
        }
    }
}

/// What host machinery gets instead of a waker the plugin made (see the module's comment).
struct Proxy {
    generation: u64,
    runtime: tokio::runtime::Handle,
    slot: Weak<Mutex<Option<Waker>>>,
}

impl std::task::Wake for Proxy {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let Some(slot) = self.slot.upgrade() else { return };
        if thread_generation() == self.generation {
            // Already on one of its threads (its reactor, usually): wake it here.
            wake_parked(&slot);
        } else {
            self.runtime.spawn(async move { wake_parked(&slot) });
        }
    }
}

/// Wakes the plugin's parked waker, if any (on a thread of its generation), leaving it parked.
fn wake_parked(slot: &Mutex<Option<Waker>>) {
    let waker = slot.lock().unwrap_or_else(PoisonError::into_inner).clone();
    if let Some(waker) = waker {
        waker.wake();
    }
}
