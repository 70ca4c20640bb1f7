//! The host's mount table (`/proc/self/mountinfo`, read with the agent's own parser), device
//! numbers, and unmounting only what is still ours.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use quiesce_agent::mounts::{DevId, MountEntry, MountTable, ProcMountTable};

use crate::env::{quiet, tool};

pub(crate) fn mount_entries() -> Vec<MountEntry> {
    ProcMountTable::host()
        .entries()
        .expect("read /proc/self/mountinfo")
}

/// The topmost mount at exactly `path`.
pub fn mount_at(path: &Path) -> Option<MountEntry> {
    ProcMountTable::host()
        .at(path)
        .expect("read /proc/self/mountinfo")
}

/// The device of the filesystem holding `path` (`stat` does not block on a frozen fs).
pub fn dev_of(path: &Path) -> DevId {
    DevId::of_path(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
}

/// The device number of a block device node such as `/dev/loop3`.
pub(crate) fn rdev_of(device: &str) -> DevId {
    let meta = fs::metadata(device).unwrap_or_else(|e| panic!("stat {device}: {e}"));
    DevId::from_raw(meta.rdev())
}

/// Unmounts `path` if `still_ours()` says the mount there is still the one we made: retries
/// while busy for up to 1 s, then detaches it lazily (the filesystem goes once its last open
/// descriptor closes; it was thawed before).
pub(crate) fn unmount(path: &Path, still_ours: impl Fn() -> bool) {
    for _ in 0..10 {
        if !still_ours() {
            return;
        }
        if quiet(tool("umount").arg(path)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if still_ours() {
        eprintln!("harness: {} still busy; lazy unmount", path.display());
        quiet(tool("umount").arg("-l").arg(path));
    }
}
