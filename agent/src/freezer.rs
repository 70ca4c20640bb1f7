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
    /// Outside any freeze, after `syncfs`: asks the filesystem to checkpoint its journal, so
    /// that FIFREEZE finds no journal to replay into place. `Ok(false)` where the filesystem or
    /// kernel has no such call (the clean fallback: nothing done, nothing wrong).
    fn checkpoint(&self, _fd: BorrowedFd<'_>) -> io::Result<bool> {
        Ok(false)
    }
}

/// What the prepare work did to one volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// `syncfs` calls made (at least one).
    pub syncs: u32,
    /// The journal was checkpointed (ext4's `EXT4_IOC_CHECKPOINT`).
    pub checkpointed: bool,
}

/// A `syncfs` that took at most this long found little to write: stop repeating.
pub const QUIET_SYNC: Duration = Duration::from_millis(5);

/// Most `syncfs` calls one prepare makes per volume.
pub const MAX_SYNCS: u32 = 8;

/// Leaves FIFREEZE as little to do as possible, outside the freeze window: `syncfs` repeated
/// until one call is quick (took at most [`QUIET_SYNC`], i.e. found little to write), at most
/// [`MAX_SYNCS`] calls and no new call once `budget` has passed; then the filesystem's journal
/// checkpoint where it has one. Writers keep writing meanwhile, so each call has less to do
/// than the one before only while the load is below the disk's speed: the bounds hold either
/// way.
pub fn settle(freezer: &dyn Freezer, fd: BorrowedFd<'_>, budget: Duration) -> io::Result<Settled> {
    let started = std::time::Instant::now();
    let mut syncs = 0;
    loop {
        let call = std::time::Instant::now();
        freezer.syncfs(fd)?;
        syncs += 1;
        if call.elapsed() <= QUIET_SYNC || syncs >= MAX_SYNCS || started.elapsed() >= budget {
            break;
        }
    }
    let checkpointed = freezer.checkpoint(fd)?;
    Ok(Settled {
        syncs,
        checkpointed,
    })
}

mod ioctl {
    // FIFREEZE = _IOWR('X', 119, int), FITHAW = _IOWR('X', 120, int) (linux/fs.h).
    nix::ioctl_readwrite!(fifreeze, b'X', 119, libc::c_int);
    nix::ioctl_readwrite!(fithaw, b'X', 120, libc::c_int);
    // EXT4_IOC_CHECKPOINT = _IOW('f', 43, __u32) (fs/ext4/ext4.h, Linux >= 5.13).
    nix::ioctl_write_ptr!(ext4_checkpoint, b'f', 43, u32);
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

    /// ext4: `EXT4_IOC_CHECKPOINT` (flags 0: flush the journal into place, no discard or
    /// zeroout). Only on ext4 — the number means nothing elsewhere; XFS and btrfs have no
    /// such call (their `syncfs` already forces the log / commits the transaction). A kernel
    /// before 5.13 (ENOTTY), a filesystem without a journal (EINVAL) or any EOPNOTSUPP is the
    /// clean fallback: `Ok(false)`.
    fn checkpoint(&self, fd: BorrowedFd<'_>) -> io::Result<bool> {
        let fs = nix::sys::statfs::fstatfs(fd).map_err(io::Error::from)?;
        if fs.filesystem_type() != nix::sys::statfs::EXT4_SUPER_MAGIC {
            return Ok(false);
        }
        let flags: u32 = 0;
        // SAFETY: EXT4_IOC_CHECKPOINT reads one u32 of flags; `fd` is a valid open descriptor
        // for the lifetime of the borrow and `flags` outlives the call.
        match unsafe { ioctl::ext4_checkpoint(fd.as_raw_fd(), &flags) } {
            Ok(_) => Ok(true),
            Err(nix::errno::Errno::ENOTTY)
            | Err(nix::errno::Errno::EINVAL)
            | Err(nix::errno::Errno::EOPNOTSUPP) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

/// One call the fake saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Sync(PathBuf),
    Freeze(PathBuf),
    Thaw(PathBuf),
    Checkpoint(PathBuf),
}

/// A hand-written fake: records calls, keeps a frozen flag per mount point (the path its
/// descriptor names in `/proc/self/fd`) with the kernel's EBUSY/EINVAL semantics, and injects
/// errors and delays.
#[derive(Debug, Default, Clone)]
pub struct FakeFreezer {
    inner: Arc<Mutex<FakeState>>,
    /// FIFREEZE calls started so far, for [`FakeFreezer::rendezvous`].
    started: Arc<(Mutex<usize>, Condvar)>,
    /// FITHAW calls started so far, for [`FakeFreezer::thaw_rendezvous`].
    thaws_started: Arc<(Mutex<usize>, Condvar)>,
}

#[derive(Debug, Default)]
struct FakeState {
    frozen: HashMap<PathBuf, bool>,
    calls: Vec<Call>,
    fail_freeze: HashMap<PathBuf, i32>,
    freeze_delay: HashMap<PathBuf, Duration>,
    rendezvous: Option<(usize, Duration)>,
    thaw_rendezvous: Option<(usize, Duration)>,
    /// How long each `syncfs` takes, in turn (then instant).
    sync_delays: Vec<Duration>,
    checkpoint: Option<i32>,
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

    /// Like [`FakeFreezer::rendezvous`] for FITHAW: every thaw waits until `count` have
    /// started, for at most `wait`; one that waits in vain fails with ETIMEDOUT and thaws
    /// nothing. Thaws issued one after another can never meet.
    pub fn thaw_rendezvous(&self, count: usize, wait: Duration) {
        self.inner.lock().unwrap().thaw_rendezvous = Some((count, wait));
    }

    /// Makes the next `syncfs` calls take these durations in turn (much dirty data, then less).
    pub fn delay_syncs(&self, delays: &[Duration]) {
        self.inner.lock().unwrap().sync_delays = delays.to_vec();
    }

    /// Makes `checkpoint` supported (`None`: answers `Ok(false)`, the default) or fail with
    /// `errno`; `Some(0)`: succeeds.
    pub fn checkpoint_answers(&self, errno: Option<i32>) {
        self.inner.lock().unwrap().checkpoint = errno;
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
        let delay = {
            let mut state = self.inner.lock().unwrap();
            state.calls.push(Call::Sync(path));
            (!state.sync_delays.is_empty()).then(|| state.sync_delays.remove(0))
        };
        if let Some(delay) = delay {
            std::thread::sleep(delay);
        }
        Ok(())
    }

    fn checkpoint(&self, fd: BorrowedFd<'_>) -> io::Result<bool> {
        let path = self.path_of(fd);
        let mut state = self.inner.lock().unwrap();
        state.calls.push(Call::Checkpoint(path));
        match state.checkpoint {
            None => Ok(false),
            Some(0) => Ok(true),
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
        }
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
        let rendezvous = {
            let mut state = self.inner.lock().unwrap();
            state.calls.push(Call::Thaw(path.clone()));
            state.thaw_rendezvous
        };
        if let Some((count, wait)) = rendezvous {
            let (started, all_in) = &*self.thaws_started;
            let mut n = started.lock().unwrap();
            *n += 1;
            all_in.notify_all();
            let (n, timeout) = all_in.wait_timeout_while(n, wait, |n| *n < count).unwrap();
            if timeout.timed_out() && *n < count {
                return Err(io::Error::from_raw_os_error(libc::ETIMEDOUT));
            }
        }
        let mut state = self.inner.lock().unwrap();
        let frozen = state.frozen.entry(path).or_insert(false);
        if !*frozen {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        *frozen = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn dir_fd() -> (tempfile::TempDir, OwnedFd) {
        let dir = tempfile::tempdir().unwrap();
        let fd: OwnedFd = std::fs::File::open(dir.path()).unwrap().into();
        (dir, fd)
    }

    #[test]
    fn settle_repeats_syncfs_until_one_is_quick_then_checkpoints() {
        let (_dir, fd) = dir_fd();
        let fake = FakeFreezer::new();
        fake.delay_syncs(&[Duration::from_millis(30), Duration::from_millis(20)]);
        fake.checkpoint_answers(Some(0));
        let settled = settle(&fake, fd.as_fd(), Duration::from_secs(5)).unwrap();
        assert_eq!(
            settled,
            Settled {
                syncs: 3,
                checkpointed: true
            }
        );
        let calls = fake.calls();
        assert!(
            matches!(calls.last(), Some(Call::Checkpoint(_))),
            "{calls:?}"
        );
    }

    #[test]
    fn settle_is_bounded_in_calls_and_time() {
        let (_dir, fd) = dir_fd();
        let fake = FakeFreezer::new();
        fake.delay_syncs(&[Duration::from_millis(20); 20]);
        let settled = settle(&fake, fd.as_fd(), Duration::from_secs(60)).unwrap();
        assert_eq!(settled.syncs, MAX_SYNCS);
        let fake = FakeFreezer::new();
        fake.delay_syncs(&[Duration::from_millis(40); 20]);
        let settled = settle(&fake, fd.as_fd(), Duration::from_millis(50)).unwrap();
        assert_eq!(settled.syncs, 2, "no new call once the budget has passed");
    }

    #[test]
    fn a_checkpoint_failure_is_reported_and_its_absence_is_not_one() {
        let (_dir, fd) = dir_fd();
        let fake = FakeFreezer::new();
        assert!(
            !settle(&fake, fd.as_fd(), Duration::from_secs(1))
                .unwrap()
                .checkpointed
        );
        fake.checkpoint_answers(Some(libc::EIO));
        let err = settle(&fake, fd.as_fd(), Duration::from_secs(1)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
    }

    #[test]
    fn the_real_checkpoint_does_nothing_off_ext4() {
        // A temp dir is on tmpfs or the root filesystem: never frozen, and the ext4 ioctl is
        // sent only to ext4 (where, without root, it fails EPERM: reported, not hidden).
        let (_dir, fd) = dir_fd();
        let fs = nix::sys::statfs::fstatfs(fd.as_fd()).unwrap();
        if fs.filesystem_type() != nix::sys::statfs::EXT4_SUPER_MAGIC {
            assert!(!IoctlFreezer.checkpoint(fd.as_fd()).unwrap());
        }
    }
}
