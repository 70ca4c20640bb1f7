//! Lease and max-freeze expiry on a thread of their own, which nothing else can delay.
//!
//! Once a set is frozen its mount descriptors are handed to the `LeaseTimer`'s thread with the
//! set's lease and hard deadlines. That thread does nothing but wait for the next deadline and
//! FITHAW through the descriptors it holds: no request handling, no async runtime, no lock that
//! request work could hold for long. A busy or stalled runtime (a flood of requests, a hook
//! that hogs a worker) therefore cannot make a lease outlive its deadline.
//!
//! The async side learns of an expiry through a oneshot channel, then resumes hooks and
//! releases the set; the thaw has already happened. An explicit thaw first `disarm`s the set:
//! under the timer's lock exactly one of the two — the timer or the caller — thaws each set,
//! and the caller learns which.
//!
//! The timer holds any number of descriptors per set and thaws them all at once, each FITHAW
//! on a thread of its own (like the explicit thaw, `freeze.rs`): one slow FITHAW does not hold
//! the others' writers. It does not care how they were frozen.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::oneshot;

use crate::freezer::Freezer;

/// Past this, a late wake-up or a slow FITHAW is logged.
const LATE: std::time::Duration = std::time::Duration::from_millis(50);

/// Why the timer ended a freeze.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    Lease,
    MaxFreeze,
}

/// What the timer did when a deadline passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    pub why: Expired,
    /// When the last FITHAW returned.
    pub thawed_at: Instant,
    pub thawed_at_ms: u64,
    /// Some FITHAW said EINVAL: someone thawed behind the agent's back before the deadline.
    pub external: bool,
    /// Some FITHAW failed otherwise.
    pub failed: bool,
}

/// The answer of [`LeaseTimer::disarm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disarmed {
    /// Still frozen: the caller now owns the thaw.
    Armed,
    /// The timer already thawed it.
    Fired(Expiry),
    /// Never armed (or already disarmed).
    Unknown,
}

struct Armed {
    fds: Vec<Arc<OwnedFd>>,
    lease: Instant,
    hard: Instant,
    notify: Option<oneshot::Sender<()>>,
}

impl Armed {
    fn deadline(&self) -> Instant {
        self.lease.min(self.hard)
    }
}

#[derive(Default)]
struct State {
    armed: HashMap<String, Armed>,
    /// Expiries not yet claimed by `disarm`.
    fired: HashMap<String, Expiry>,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    freezer: Arc<dyn Freezer>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Owns the lease thread; stops it when dropped.
pub struct LeaseTimer {
    shared: Arc<Shared>,
}

impl LeaseTimer {
    pub fn new(freezer: Arc<dyn Freezer>) -> LeaseTimer {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            freezer,
        });
        let thread = shared.clone();
        std::thread::Builder::new()
            .name("quiesce-lease".into())
            .spawn(move || run(&thread))
            .expect("spawn the lease timer thread");
        LeaseTimer { shared }
    }

    /// Hands over a frozen set: `fds` are thawed, all at once, at `min(lease, hard)`. The receiver fires once the timer has thawed it.
    pub fn arm(
        &self,
        set_id: &str,
        fds: Vec<Arc<OwnedFd>>,
        lease: Instant,
        hard: Instant,
    ) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let mut state = self.shared.lock();
        state.fired.remove(set_id);
        state.armed.insert(
            set_id.to_owned(),
            Armed {
                fds,
                lease: lease.min(hard),
                hard,
                notify: Some(tx),
            },
        );
        drop(state);
        self.shared.wake.notify_all();
        rx
    }

    /// Moves the lease deadline (never past the hard one). `Err` with the expiry if the timer
    /// already thawed the set, `Err(None)` if it is not armed.
    pub fn renew(&self, set_id: &str, lease: Instant) -> Result<(), Option<Expiry>> {
        let mut state = self.shared.lock();
        if let Some(armed) = state.armed.get_mut(set_id) {
            armed.lease = lease.min(armed.hard);
            drop(state);
            self.shared.wake.notify_all();
            return Ok(());
        }
        Err(state.fired.get(set_id).copied())
    }

    /// Takes the set back. See [`Disarmed`].
    pub fn disarm(&self, set_id: &str) -> Disarmed {
        let mut state = self.shared.lock();
        if state.armed.remove(set_id).is_some() {
            return Disarmed::Armed;
        }
        match state.fired.remove(set_id) {
            Some(expiry) => Disarmed::Fired(expiry),
            None => Disarmed::Unknown,
        }
    }

    /// Whether the set is armed (frozen, deadline not passed).
    pub fn is_armed(&self, set_id: &str) -> bool {
        self.shared.lock().armed.contains_key(set_id)
    }
}

impl Drop for LeaseTimer {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
    }
}

/// Nice value the lease thread asks for (needs CAP_SYS_NICE; without it the thread keeps the
/// process's, which is enough: request work is bounded and runs at most a few at a time).
const LEASE_NICE: libc::c_int = -10;

fn run(shared: &Shared) {
    // SAFETY: setpriority has no memory-safety preconditions; on Linux PRIO_PROCESS with who 0
    // sets the calling thread's nice value only.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, LEASE_NICE) } != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "lease thread keeps the agent's priority"
        );
    }
    let mut state = shared.lock();
    loop {
        if state.stop {
            return;
        }
        let now = Instant::now();
        let due: Vec<String> = state
            .armed
            .iter()
            .filter(|(_, armed)| armed.deadline() <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for set_id in due {
            let Some(mut armed) = state.armed.remove(&set_id) else {
                continue;
            };
            // The thaw happens under the lock, so that a concurrent `disarm` either took the
            // set before (and thaws it itself) or finds it thawed.
            let why = if now >= armed.hard {
                Expired::MaxFreeze
            } else {
                Expired::Lease
            };
            let late = now.saturating_duration_since(armed.deadline());
            let (mut external, mut failed) = (false, false);
            for result in thaw_at_once(shared.freezer.as_ref(), &armed.fds) {
                match result {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => external = true,
                    Err(e) => {
                        failed = true;
                        tracing::error!(set_id, error = %e, "FITHAW at lease expiry failed");
                    }
                }
            }
            let expiry = Expiry {
                why,
                thawed_at: Instant::now(),
                thawed_at_ms: crate::freeze::unix_ms(),
                external,
                failed,
            };
            let thaw = expiry.thawed_at.saturating_duration_since(now);
            if late > LATE || thaw > LATE {
                tracing::warn!(
                    set_id,
                    late_ms = late.as_millis() as u64,
                    fithaw_ms = thaw.as_millis() as u64,
                    "lease thread: deadline passed before it ran, or FITHAW was slow (CPU or I/O starved?)"
                );
            }
            state.fired.insert(set_id.clone(), expiry);
            if let Some(tx) = armed.notify.take() {
                let _ = tx.send(());
            }
        }
        let next = state.armed.values().map(Armed::deadline).min();
        state = match next {
            Some(deadline) => {
                let wait = deadline.saturating_duration_since(Instant::now());
                shared
                    .wake
                    .wait_timeout(state, wait)
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
            None => shared.wake.wait(state).unwrap_or_else(|p| p.into_inner()),
        };
    }
}

/// FITHAW of every descriptor at once, each on a scoped thread of its own; one the system
/// refuses a thread for is thawed here, after the others were started. The results in the
/// order given.
fn thaw_at_once(freezer: &dyn Freezer, fds: &[Arc<OwnedFd>]) -> Vec<std::io::Result<()>> {
    if let [fd] = fds {
        return vec![freezer.thaw(fd.as_fd())];
    }
    std::thread::scope(|scope| {
        let started: Vec<_> = fds
            .iter()
            .map(|fd| {
                std::thread::Builder::new()
                    .name("quiesce-lease-thaw".into())
                    .spawn_scoped(scope, move || freezer.thaw(fd.as_fd()))
                    .map_err(|_| fd)
            })
            .collect();
        started
            .into_iter()
            .map(|thread| match thread {
                Ok(handle) => handle
                    .join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("FITHAW thread panicked"))),
                Err(fd) => freezer.thaw(fd.as_fd()),
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::freezer::FakeFreezer;
    use std::time::Duration;

    fn frozen_dir(freezer: &FakeFreezer) -> (tempfile::TempDir, Arc<OwnedFd>) {
        let dir = tempfile::tempdir().unwrap();
        let fd = nix::fcntl::open(
            dir.path(),
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap();
        freezer.set_frozen(dir.path(), true);
        (dir, Arc::new(fd))
    }

    #[tokio::test]
    async fn the_timer_thaws_at_the_lease_and_says_so() {
        let freezer = FakeFreezer::new();
        let (dir, fd) = frozen_dir(&freezer);
        let timer = LeaseTimer::new(Arc::new(freezer.clone()));
        let start = Instant::now();
        let rx = timer.arm(
            "s1",
            vec![fd],
            start + Duration::from_millis(100),
            start + Duration::from_secs(5),
        );
        rx.await.unwrap();
        assert!(start.elapsed() >= Duration::from_millis(100));
        assert!(!freezer.is_frozen(dir.path()));
        assert!(!timer.is_armed("s1"));
        match timer.disarm("s1") {
            Disarmed::Fired(expiry) => {
                assert_eq!(expiry.why, Expired::Lease);
                assert!(!expiry.external && !expiry.failed);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(timer.disarm("s1"), Disarmed::Unknown);
    }

    #[tokio::test]
    async fn renewals_stop_at_the_hard_deadline() {
        let freezer = FakeFreezer::new();
        let (dir, fd) = frozen_dir(&freezer);
        let timer = LeaseTimer::new(Arc::new(freezer.clone()));
        let start = Instant::now();
        let rx = timer.arm(
            "s1",
            vec![fd],
            start + Duration::from_millis(50),
            start + Duration::from_millis(300),
        );
        timer.renew("s1", start + Duration::from_secs(60)).unwrap();
        rx.await.unwrap();
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(2),
            "{took:?}"
        );
        assert!(!freezer.is_frozen(dir.path()));
        assert!(matches!(
            timer.renew("s1", Instant::now()),
            Err(Some(Expiry {
                why: Expired::MaxFreeze,
                ..
            }))
        ));
    }

    #[tokio::test]
    async fn a_disarmed_set_is_left_to_the_caller() {
        let freezer = FakeFreezer::new();
        let (dir, fd) = frozen_dir(&freezer);
        let timer = LeaseTimer::new(Arc::new(freezer.clone()));
        let start = Instant::now();
        let rx = timer.arm(
            "s1",
            vec![fd],
            start + Duration::from_millis(50),
            start + Duration::from_secs(5),
        );
        assert_eq!(timer.disarm("s1"), Disarmed::Armed);
        assert!(rx.await.is_err(), "no expiry once disarmed");
        std::thread::sleep(Duration::from_millis(100));
        assert!(freezer.is_frozen(dir.path()), "the timer never thawed it");
    }

    #[tokio::test]
    async fn lease_expiry_thaws_every_volume_at_once_each_on_its_own_thread() {
        let freezer = FakeFreezer::new();
        let volumes: Vec<_> = (0..3).map(|_| frozen_dir(&freezer)).collect();
        // Each FITHAW waits until all three have started: one after another, the first would
        // wait in vain and fail (and leave its volume frozen).
        freezer.thaw_rendezvous(3, Duration::from_secs(2));
        let timer = LeaseTimer::new(Arc::new(freezer.clone()));
        let start = Instant::now();
        let rx = timer.arm(
            "s1",
            volumes.iter().map(|(_, fd)| fd.clone()).collect(),
            start + Duration::from_millis(20),
            start + Duration::from_secs(5),
        );
        rx.await.unwrap();
        for (dir, _) in &volumes {
            assert!(!freezer.is_frozen(dir.path()), "{}", dir.path().display());
        }
        match timer.disarm("s1") {
            Disarmed::Fired(expiry) => {
                assert_eq!(expiry.why, Expired::Lease);
                assert!(!expiry.failed && !expiry.external, "{expiry:?}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_thaw_behind_our_back_is_reported() {
        let freezer = FakeFreezer::new();
        let (dir, fd) = frozen_dir(&freezer);
        freezer.set_frozen(dir.path(), false);
        let timer = LeaseTimer::new(Arc::new(freezer.clone()));
        let start = Instant::now();
        let _rx = timer.arm("s1", vec![fd], start, start + Duration::from_secs(5));
        let deadline = Instant::now() + Duration::from_secs(2);
        while timer.is_armed("s1") {
            assert!(Instant::now() < deadline, "the timer never fired");
            std::thread::sleep(Duration::from_millis(5));
        }
        match timer.disarm("s1") {
            Disarmed::Fired(expiry) => assert!(expiry.external),
            other => panic!("{other:?}"),
        }
    }
}
