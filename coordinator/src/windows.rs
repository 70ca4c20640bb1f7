//! The freeze windows open in this process. While any group is frozen the coordinator waits on
//! no disk: a set holds a [`Window`] from its first freeze sent to its last thaw returned, and
//! everything that would commit to the catalog meanwhile — the audit writer, the reconciler,
//! completion polling, retention, new sets, operator writes — first waits for
//! [`FreezeWindows::closed`]. Reads never wait.
//!
//! A leaf: it knows nothing of sets or the catalog.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Longest anything waits for the windows to close: each window is bounded by its group's
/// freeze budget, but back-to-back windows of several groups must not starve the writers.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

/// Counts the open windows; shared by every set and writer of one coordinator.
#[derive(Default)]
pub struct FreezeWindows {
    open: AtomicUsize,
    closed: Notify,
}

/// One open window; dropping it closes it (on every path, panics included).
pub struct Window(Arc<FreezeWindows>);

impl Drop for Window {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.closed.notify_waiters();
        }
    }
}

impl FreezeWindows {
    pub fn new() -> Arc<FreezeWindows> {
        Arc::new(FreezeWindows::default())
    }

    /// Opens a window, closed when the returned guard drops.
    pub fn open(self: &Arc<Self>) -> Window {
        self.open.fetch_add(1, Ordering::SeqCst);
        Window(self.clone())
    }

    /// Windows open now.
    pub fn open_count(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Waits until no window is open, at most `max`. Returns whether they closed (`false`: the
    /// wait ran out and the caller goes ahead, logging why).
    pub async fn closed_within(&self, max: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + max;
        loop {
            let notified = self.closed.notified();
            tokio::pin!(notified);
            // Registered before the count is read, so a close in between is not missed.
            notified.as_mut().enable();
            if self.open_count() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.open_count() == 0;
            }
        }
    }

    /// [`closed_within`](Self::closed_within) [`MAX_WAIT`], saying so when it ran out.
    pub async fn closed(&self, what: &str) {
        if !self.closed_within(MAX_WAIT).await {
            tracing::warn!(
                open = self.open_count(),
                what,
                "freeze windows still open after {} s; writing anyway",
                MAX_WAIT.as_secs()
            );
        }
    }

    /// The blocking form, for threads outside the runtime (the audit writer).
    pub fn wait_closed_blocking(&self, max: Duration) -> bool {
        let started = Instant::now();
        while self.open_count() > 0 {
            if started.elapsed() >= max {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn closed_waits_for_the_last_window_and_no_longer() {
        let windows = FreezeWindows::new();
        assert!(windows.closed_within(Duration::ZERO).await, "none open");
        let first = windows.open();
        let second = windows.open();
        assert_eq!(windows.open_count(), 2);
        let waiter = {
            let windows = windows.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let closed = windows.closed_within(Duration::from_secs(10)).await;
                (closed, started.elapsed())
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(first);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !waiter.is_finished(),
            "returned while a window was still open"
        );
        drop(second);
        let (closed, waited) = waiter.await.unwrap();
        assert!(closed);
        assert!(waited >= Duration::from_millis(150), "{waited:?}");
        assert_eq!(windows.open_count(), 0);
    }

    #[tokio::test]
    async fn the_wait_is_bounded() {
        let windows = FreezeWindows::new();
        let _open = windows.open();
        let started = Instant::now();
        assert!(!windows.closed_within(Duration::from_millis(80)).await);
        assert!(started.elapsed() >= Duration::from_millis(80));
        assert!(!windows.wait_closed_blocking(Duration::from_millis(20)));
    }

    #[test]
    fn a_window_closes_when_its_holder_panics() {
        let windows = FreezeWindows::new();
        let held = windows.clone();
        let _ = std::thread::spawn(move || {
            let _window = held.open();
            panic!("the set's task panicked");
        })
        .join();
        assert_eq!(windows.open_count(), 0);
    }
}
