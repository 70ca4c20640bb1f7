//! The freeze record under the tmpfs state directory: one small file per set the agent holds
//! frozen, written before the first FIFREEZE and removed after the last FITHAW. A restarted
//! agent (or the emergency `thaw --all`) reads it back and thaws what a dead agent left frozen.
//!
//! The directory must be on tmpfs: writing a record must never touch a disk filesystem that
//! could be frozen.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::mounts::DevId;

/// statfs(2) magic numbers of memory filesystems.
const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FreezeRecord {
    pub set_id: String,
    pub pid: u32,
    pub volumes: Vec<RecordedVolume>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RecordedVolume {
    pub mount_point: PathBuf,
    pub dev: String,
}

impl RecordedVolume {
    pub fn new(mount_point: &Path, dev: DevId) -> Self {
        RecordedVolume {
            mount_point: mount_point.to_owned(),
            dev: dev.to_string(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RecordStore {
    dir: PathBuf,
}

impl RecordStore {
    pub fn new(state_dir: &Path) -> Self {
        RecordStore {
            dir: state_dir.join("freezes"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn create_dir(&self) -> io::Result<()> {
        std::fs::create_dir_all(&self.dir)
    }

    fn path(&self, set_id: &str) -> PathBuf {
        self.dir.join(format!("{set_id}.json"))
    }

    /// Writes atomically (temp file + rename) so a crash never leaves half a record.
    pub fn write(&self, record: &FreezeRecord) -> Result<(), (PathBuf, io::Error)> {
        let path = self.path(&record.set_id);
        let tmp = self.dir.join(format!(".{}.tmp", record.set_id));
        let body = serde_json::to_vec(record).map_err(|e| (path.clone(), io::Error::other(e)))?;
        std::fs::write(&tmp, body)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| (path, e))
    }

    pub fn remove(&self, set_id: &str) -> io::Result<()> {
        match std::fs::remove_file(self.path(set_id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every record present, with unreadable ones reported by path.
    pub fn list(&self) -> io::Result<Vec<Result<FreezeRecord, (PathBuf, String)>>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            other => other?,
        };
        let mut records = Vec::new();
        for entry in entries {
            let path = entry?.path();
            if path.extension().is_none_or(|ext| ext != "json") {
                continue;
            }
            let parsed = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()));
            records.push(parsed.map_err(|e| (path, e)));
        }
        Ok(records)
    }
}

/// Whether `path` lies on tmpfs or ramfs.
pub fn is_memory_fs(path: &Path) -> io::Result<bool> {
    let stat = nix::sys::statfs::statfs(path)?;
    let magic = stat.filesystem_type().0 as i64;
    Ok(magic == TMPFS_MAGIC || magic == RAMFS_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_remove_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::new(dir.path());
        store.create_dir().unwrap();
        let record = FreezeRecord {
            set_id: "pg-1".into(),
            pid: 42,
            volumes: vec![RecordedVolume::new(
                Path::new("/mnt/a"),
                DevId { major: 7, minor: 0 },
            )],
        };
        store.write(&record).unwrap();
        std::fs::write(store.dir().join("junk.json"), "{").unwrap();
        let listed = store.list().unwrap();
        assert_eq!(listed.len(), 2);
        assert!(listed.contains(&Ok(record)));
        assert!(listed.iter().any(|r| r.is_err()));
        store.remove("pg-1").unwrap();
        store.remove("pg-1").unwrap();
        assert_eq!(store.list().unwrap().len(), 1);
    }

    #[test]
    fn dev_shm_is_memory_and_the_work_tree_is_not() {
        if Path::new("/dev/shm").exists() {
            assert!(is_memory_fs(Path::new("/dev/shm")).unwrap());
        }
        assert!(!is_memory_fs(Path::new(env!("CARGO_MANIFEST_DIR"))).unwrap());
    }
}
