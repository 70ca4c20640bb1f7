//! Thawing what a previous agent left frozen: start-up replay of the freeze record, and the
//! local emergency hatch `quiesce-agent thaw`.

use std::io;
use std::os::fd::AsFd;
use std::path::Path;

use crate::freezer::Freezer;
use crate::mounts::{DevId, MountTable};
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
/// Only the filesystem the record names is touched: if the mount point now holds another
/// device, it is left alone.
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
            let outcome = match mounts.at(&volume.mount_point) {
                Ok(Some(entry)) if entry.dev.to_string() == volume.dev => {
                    thaw_path(freezer, &volume.mount_point)
                }
                Ok(Some(_)) => Outcome::Replaced,
                Ok(None) => Outcome::NotMounted,
                Err(e) => Outcome::Failed(e.to_string()),
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

/// FITHAW on one mount point.
pub fn thaw_path(freezer: &dyn Freezer, mount_point: &Path) -> Outcome {
    let fd = match freezer.open(mount_point) {
        Ok(fd) => fd,
        Err(e) => return Outcome::Failed(format!("cannot open: {e}")),
    };
    match freezer.thaw(fd.as_fd()) {
        Ok(()) => Outcome::Thawed,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Outcome::WasNotFrozen,
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

/// Device of the filesystem mounted at `mount_point`, if it is a mount point.
pub fn mounted_dev(mounts: &dyn MountTable, mount_point: &Path) -> Option<DevId> {
    mounts.at(mount_point).ok().flatten().map(|entry| entry.dev)
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
                    mount_id: i as u32,
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
