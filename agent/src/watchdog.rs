//! Who thaws if the agent itself dies while holding a freeze.
//!
//! The agent hands the mount descriptors of every freeze to a watchdog before the first
//! FIFREEZE and takes them back after the last FITHAW. The real watchdog is a guardian process
//! forked before the async runtime starts (see `guardian`); it thaws everything it still holds
//! the moment the agent's end of their socket closes, whatever killed the agent.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;

pub trait Watchdog: Send + Sync {
    /// Takes a copy of the set's mount descriptors before they are frozen.
    fn hold(&self, set_id: &str, fds: &[Arc<OwnedFd>]) -> io::Result<()>;
    /// The set is thawed: forget its descriptors.
    fn release(&self, set_id: &str);
}

/// No watchdog (unit tests with a fake freezer; `--no-guardian` for debugging).
#[derive(Debug, Default)]
pub struct NoWatchdog;

impl Watchdog for NoWatchdog {
    fn hold(&self, _set_id: &str, _fds: &[Arc<OwnedFd>]) -> io::Result<()> {
        Ok(())
    }

    fn release(&self, _set_id: &str) {}
}
