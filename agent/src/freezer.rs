//! FIFREEZE / FITHAW / syncfs behind a narrow trait, so the freeze state machine can be tested
//! with a fake.
//!
//! The kernel's answers the state machine relies on: FIFREEZE on a frozen filesystem returns
//! EBUSY (someone else holds it), FITHAW on a filesystem that is not frozen returns EINVAL.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Syncs, freezes and thaws filesystems through a descriptor of their mount point — the one
/// `volumes::resolve_all` opened and checked; nothing here opens anything by name.
/// Implementations block; callers run them off the async runtime.
pub trait Freezer: Send + Sync + 'static {
    fn syncfs(&self, fd: BorrowedFd<'_>) -> io::Result<()>;
    fn freeze(&self, fd: BorrowedFd<'_>) -> io::Result<()>;
    fn thaw(&self, fd: BorrowedFd<'_>) -> io::Result<()>;
}

mod ioctl {
    // FIFREEZE = _IOWR('X', 119, int), FITHAW = _IOWR('X', 120, int) (linux/fs.h).
    nix::ioctl_readwrite!(fifreeze, b'X', 119, libc::c_int);
    nix::ioctl_readwrite!(fithaw, b'X', 120, libc::c_int);
}

/// Opens a mount point for the ioctls (a read-only directory descriptor, no atime update) the
/// way the agent does: no symlink anywhere on the path, every directory above it safe from
/// non-root users (`safepath::open_mount_point`).
pub fn open_mount_point(mount_point: &Path) -> io::Result<OwnedFd> {
    crate::safepath::open_mount_point(mount_point).map_err(io::Error::other)
}

/// Issues FITHAW on `fd`. Shared with the guardian process, which must thaw with nothing but
/// the descriptors it holds.
pub fn fithaw(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut arg: libc::c_int = 0;
    // SAFETY: FITHAW takes an int argument the kernel ignores; `fd` is a valid open descriptor
    // for the lifetime of the borrow and `arg` outlives the call.
    unsafe { ioctl::fithaw(fd.as_raw_fd(), &mut arg) }?;
    Ok(())
}

/// The real thing.
#[derive(Debug, Default, Clone, Copy)]
pub struct IoctlFreezer;

impl Freezer for IoctlFreezer {
    fn syncfs(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        // SAFETY: `fd` is a valid descriptor for the duration of the call.
        let rc = unsafe { libc::syncfs(fd.as_raw_fd()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn freeze(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let mut arg: libc::c_int = 0;
        // SAFETY: FIFREEZE takes an int argument the kernel ignores; `fd` is a valid open
        // descriptor for the lifetime of the borrow and `arg` outlives the call.
        unsafe { ioctl::fifreeze(fd.as_raw_fd(), &mut arg) }?;
        Ok(())
    }

    fn thaw(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        fithaw(fd)
    }
}

/// One call the fake saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Sync(PathBuf),
    Freeze(PathBuf),
    Thaw(PathBuf),
}

/// A hand-written fake: records calls, keeps a frozen flag per mount point (the path its
/// descriptor names in `/proc/self/fd`) with the kernel's EBUSY/EINVAL semantics, and injects
/// errors and delays.
#[derive(Debug, Default, Clone)]
pub struct FakeFreezer {
    inner: Arc<Mutex<FakeState>>,
    /// FIFREEZE calls started so far, for [`FakeFreezer::rendezvous`].
    started: Arc<(Mutex<usize>, Condvar)>,
}

#[derive(Debug, Default)]
struct FakeState {
    frozen: HashMap<PathBuf, bool>,
    calls: Vec<Call>,
    fail_freeze: HashMap<PathBuf, i32>,
    freeze_delay: HashMap<PathBuf, Duration>,
    rendezvous: Option<(usize, Duration)>,
}

impl FakeFreezer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn calls(&self) -> Vec<Call> {
        self.inner.lock().unwrap().calls.clone()
    }

    pub fn is_frozen(&self, mount_point: &Path) -> bool {
        let state = self.inner.lock().unwrap();
        state.frozen.get(mount_point).copied().unwrap_or(false)
    }

    /// Makes FIFREEZE on `mount_point` fail with `errno`.
    pub fn fail_freeze(&self, mount_point: &Path, errno: i32) {
        let mut state = self.inner.lock().unwrap();
        state.fail_freeze.insert(mount_point.to_owned(), errno);
    }

    /// Makes FIFREEZE on `mount_point` block for `delay` (like a sync of much dirty data).
    pub fn delay_freeze(&self, mount_point: &Path, delay: Duration) {
        let mut state = self.inner.lock().unwrap();
        state.freeze_delay.insert(mount_point.to_owned(), delay);
    }

    /// Makes every FIFREEZE wait until `count` FIFREEZE calls have started, for at most
    /// `wait`; one that waits in vain fails with ETIMEDOUT and freezes nothing. Freezes issued
    /// one after another can never meet: this proves they run at once.
    pub fn rendezvous(&self, count: usize, wait: Duration) {
        self.inner.lock().unwrap().rendezvous = Some((count, wait));
    }

    /// Freezes or thaws behind the agent's back (another tool, an operator).
    pub fn set_frozen(&self, mount_point: &Path, frozen: bool) {
        let mut state = self.inner.lock().unwrap();
        state.frozen.insert(mount_point.to_owned(), frozen);
    }

    fn path_of(&self, fd: BorrowedFd<'_>) -> PathBuf {
        std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .unwrap_or_else(|_| PathBuf::from(format!("<fd {}>", fd.as_raw_fd())))
    }
}

impl Freezer for FakeFreezer {
    fn syncfs(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let path = self.path_of(fd);
        self.inner.lock().unwrap().calls.push(Call::Sync(path));
        Ok(())
    }

    fn freeze(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let path = self.path_of(fd);
        let (delay, rendezvous) = {
            let mut state = self.inner.lock().unwrap();
            state.calls.push(Call::Freeze(path.clone()));
            (state.freeze_delay.get(&path).copied(), state.rendezvous)
        };
        if let Some((count, wait)) = rendezvous {
            let (started, all_in) = &*self.started;
            let mut n = started.lock().unwrap();
            *n += 1;
            all_in.notify_all();
            let (n, timeout) = all_in.wait_timeout_while(n, wait, |n| *n < count).unwrap();
            if timeout.timed_out() && *n < count {
                return Err(io::Error::from_raw_os_error(libc::ETIMEDOUT));
            }
        }
        if let Some(delay) = delay {
            std::thread::sleep(delay);
        }
        let mut state = self.inner.lock().unwrap();
        if let Some(errno) = state.fail_freeze.get(&path) {
            return Err(io::Error::from_raw_os_error(*errno));
        }
        let frozen = state.frozen.entry(path).or_insert(false);
        if *frozen {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        *frozen = true;
        Ok(())
    }

    fn thaw(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let path = self.path_of(fd);
        let mut state = self.inner.lock().unwrap();
        state.calls.push(Call::Thaw(path.clone()));
        let frozen = state.frozen.entry(path).or_insert(false);
        if !*frozen {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        *frozen = false;
        Ok(())
    }
}
