//! A fresh directory under `/var/tmp` per test, never removed while something is mounted in it.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::env::unix_ns;
use crate::mounts::mount_entries;

static SCRATCH_SEQ: AtomicU32 = AtomicU32::new(0);

/// A fresh directory under `/var/tmp` for one test. Removed on drop — unless something is still
/// mounted below it, in which case it is left alone (with a message) rather than risk deleting
/// the contents of a mounted filesystem.
pub struct Scratch {
    path: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let seq = SCRATCH_SEQ.fetch_add(1, Ordering::Relaxed);
        let path = PathBuf::from(format!(
            "/var/tmp/quiesce-it.{tag}.{}.{seq}.{}",
            std::process::id(),
            unix_ns() % 1_000_000
        ));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Scratch { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.path.join(rel)
    }

    /// Creates `rel` (and its parents) below the scratch directory.
    pub fn mkdir(&self, rel: impl AsRef<Path>) -> PathBuf {
        let path = self.path.join(rel);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let busy: Vec<PathBuf> = mount_entries()
            .into_iter()
            .map(|e| e.mount_point)
            .filter(|m| m.starts_with(&self.path))
            .collect();
        if busy.is_empty() {
            let _ = fs::remove_dir_all(&self.path);
        } else {
            eprintln!(
                "harness: leaving {} in place: still mounted below it: {busy:?}",
                self.path.display()
            );
        }
    }
}
