//! [`Latch`]: a one-way event (a generation superseded or aborted, the host shutting down)
//! that busy connections can look at on every poll.

#![forbid(unsafe_code)]

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};

use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// Raised once, never lowered. Checking it is one atomic load, where a `CancellationToken`
/// takes a lock; the token is still there for whoever wants to wait the usual way.
#[derive(Default)]
pub(crate) struct Latch {
    raised: AtomicBool,
    token: CancellationToken,
}

impl Latch {
    pub(crate) fn new() -> Latch {
        Latch::default()
    }

    pub(crate) fn raise(&self) {
        // The flag first: a task woken by the token sees it.
        self.raised.store(true, Ordering::Release);
        self.token.cancel();
    }

    pub(crate) fn is_raised(&self) -> bool {
        self.raised.load(Ordering::Acquire)
    }

    /// The token cancelled when the latch is raised. Only [`Latch::raise`] may cancel it (or
    /// `raised` would miss it); hand out child tokens to whoever needs one to cancel.
    pub(crate) fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Completes when the latch is raised. Meant to be polled beside a connection on each of
    /// its polls: while the task's waker stays the same, a poll is one atomic load. Nothing is
    /// allocated or locked until its first poll.
    pub(crate) fn raised(&self) -> Raised<'_> {
        Raised { latch: self, waiter: None, registered: None }
    }

    /// What a task that checks [`Latch::is_raised`] itself registers its waker with, to be
    /// woken when the latch is raised.
    pub(crate) fn waiter(&self) -> Waiter {
        Waiter(Some(Box::pin(self.token.clone().cancelled_owned())))
    }
}

/// Wakes a task when its latch is raised; see [`Latch::waiter`].
pub(crate) struct Waiter(Option<Pin<Box<WaitForCancellationFutureOwned>>>);

impl Waiter {
    /// Makes sure the task of `cx` is woken when the latch is raised. Registering takes the
    /// token's lock: call it when the task's waker has changed, not on every poll.
    pub(crate) fn register(&mut self, cx: &mut Context<'_>) {
        if self.0.as_mut().is_some_and(|wait| wait.as_mut().poll(cx).is_ready()) {
            self.0 = None; // raised: nothing more to wait for
        }
    }
}

/// The future of [`Latch::raised`].
pub(crate) struct Raised<'a> {
    latch: &'a Latch,
    /// Made at the first poll that registers.
    waiter: Option<Waiter>,
    /// The waker last registered (in practice, the only one).
    registered: Option<Waker>,
}

impl Future for Raised<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.latch.is_raised() {
            return Poll::Ready(());
        }
        if !this.registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            this.waiter.get_or_insert_with(|| this.latch.waiter()).register(cx);
            this.registered = Some(cx.waker().clone());
            // Raised while registering: the flag is set before the token is cancelled.
            if this.latch.is_raised() {
                return Poll::Ready(());
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn a_waiting_task_wakes_when_raised() {
        let latch = Arc::new(Latch::new());
        let waiter = tokio::spawn({
            let latch = latch.clone();
            async move { latch.raised().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        latch.raise();
        tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("woken").expect("no panic");
        assert!(latch.is_raised() && latch.token().is_cancelled());
        latch.raised().await; // already raised: at once
    }
}
