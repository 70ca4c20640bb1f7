//! Thawing what a previous agent left frozen: start-up replay of the freeze record, and the
//! local emergency hatch `quiesce-agent thaw`.

use std::io;
use std::os::fd::AsFd;
use std::path::Path;

use crate::freezer::Freezer;
use crate::mounts::{DevId, MountTable, by_mount_id};
use crate::records::RecordStore;

/// What happened to one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Thawed,
    /// FITHAW said it was not frozen (EINVAL): nothing to do.
    WasNotFrozen,
    /// The mount point now holds another filesystem than the one recorded: left alone.
    Replaced,
    NotMounted,
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    pub set_id: String,
    pub mount_point: String,
    pub outcome: Outcome,
}

/// Thaws every volume of every record and removes the records whose volumes are all settled.
/// Only the filesystem the record names is touched: the mount point is opened as a freeze
/// opens it (no symlink, safe directories, the root of the mount listed there), and FITHAW
/// goes through that descriptor only if its superblock is the recorded one.
pub fn replay(
    records: &RecordStore,
    freezer: &dyn Freezer,
    mounts: &dyn MountTable,
) -> io::Result<Vec<Recovered>> {
    let mut done = Vec::new();
    for record in records.list()? {
        let record = match record {
            Ok(record) => record,
            Err((path, why)) => {
                tracing::error!(path = %path.display(), why, "unreadable freeze record left in place");
                continue;
            }
        };
        let mut settled = true;
        for volume in &record.volumes {
            let outcome = match open_mount_root(mounts, &volume.mount_point) {
                Ok((fd, dev)) if dev.to_string() == volume.dev => thaw_fd(freezer, &fd),
                Ok(_) => Outcome::Replaced,
                Err(outcome) => outcome,
            };
            if matches!(outcome, Outcome::Failed(_)) {
                settled = false;
            }
            done.push(Recovered {
                set_id: record.set_id.clone(),
                mount_point: volume.mount_point.display().to_string(),
                outcome,
            });
        }
        if settled {
            records.remove(&record.set_id)?;
        }
    }
    Ok(done)
}

/// Opens `mount_point` the way a freeze does and returns the descriptor with its superblock;
/// `Err` is the outcome to report when it is not the root of a mount, or not safe to open.
fn open_mount_root(
    mounts: &dyn MountTable,
    mount_point: &Path,
) -> Result<(std::os::fd::OwnedFd, DevId), Outcome> {
    let opened = match mounts.open_mount(mount_point) {
        Ok(opened) => opened,
        Err(e) if e.is_not_found() => return Err(Outcome::NotMounted),
        Err(e) => return Err(Outcome::Failed(crate::error::error_chain(&e))),
    };
    let entries = mounts
        .entries()
        .map_err(|e| Outcome::Failed(crate::error::error_chain(&e)))?;
    match by_mount_id(&entries, opened.mount_id) {
        Some(entry) if opened.is_mount_root && entry.mount_point == mount_point => {
            Ok((opened.fd, entry.dev))
        }
        _ => Err(Outcome::NotMounted),
    }
}

/// FITHAW on one mount point (`thaw --mount --force`): opened as a freeze opens it, and only
/// if it is the root of the mount listed there.
pub fn thaw_path(freezer: &dyn Freezer, mounts: &dyn MountTable, mount_point: &Path) -> Outcome {
    match open_mount_root(mounts, mount_point) {
        Ok((fd, _)) => thaw_fd(freezer, &fd),
        Err(outcome) => outcome,
    }
}

fn thaw_fd(freezer: &dyn Freezer, fd: &std::os::fd::OwnedFd) -> Outcome {
    match freezer.thaw(fd.as_fd()) {
        Ok(()) => Outcome::Thawed,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Outcome::WasNotFrozen,
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::freezer::FakeFreezer;
    use crate::mounts::{MountEntry, MountError};
    use crate::records::{FreezeRecord, RecordedVolume};
    use std::path::PathBuf;

    struct Table(Vec<(PathBuf, DevId)>);

    impl MountTable for Table {
        fn entries(&self) -> Result<Vec<MountEntry>, MountError> {
            Ok(self
                .0
                .iter()
                .enumerate()
                .map(|(i, (path, dev))| MountEntry {
                    mount_id: i as u64,
                    dev: *dev,
                    root: "/".into(),
                    mount_point: path.clone(),
                    fs_type: "ext4".into(),
                    source: "/dev/loop0".into(),
                })
                .collect())
        }
        fn loop_backing_file(&self, _dev: DevId) -> Option<PathBuf> {
            None
        }
        fn open_mount(
            &self,
            path: &Path,
        ) -> Result<crate::mounts::OpenedMount, crate::safepath::PathError> {
            crate::volumes::tests::fake_open(&self.entries().unwrap(), &[], path)
        }
    }

    #[test]
    fn replay_thaws_recorded_volumes_and_leaves_replaced_mounts_alone() {
        let state = tempfile::tempdir().unwrap();
        let vols = tempfile::tempdir().unwrap();
        let a = vols.path().join("a");
        let b = vols.path().join("b");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let dev_a = DevId { major: 7, minor: 0 };
        let store = RecordStore::new(state.path());
        store.create_dir().unwrap();
        store
            .write(&FreezeRecord {
                set_id: "s1".into(),
                pid: 1,
                volumes: vec![
                    RecordedVolume::new(&a, dev_a),
                    RecordedVolume::new(&b, DevId { major: 7, minor: 1 }),
                ],
            })
            .unwrap();
        let freezer = FakeFreezer::new();
        freezer.set_frozen(&a, true);
        freezer.set_frozen(&b, true);
        // b now holds a different filesystem than the record names.
        let table = Table(vec![
            (a.clone(), dev_a),
            (b.clone(), DevId { major: 7, minor: 9 }),
        ]);

        let done = replay(&store, &freezer, &table).unwrap();
        assert_eq!(done.len(), 2);
        assert_eq!(done[0].outcome, Outcome::Thawed);
        assert_eq!(done[1].outcome, Outcome::Replaced);
        assert!(!freezer.is_frozen(&a));
        assert!(
            freezer.is_frozen(&b),
            "a filesystem we did not freeze is never thawed"
        );
        assert!(store.list().unwrap().is_empty(), "settled record removed");
    }
}
