//! The `reflink` host-local snapshot provider.
//!
//! A volume is a loop device whose backing file sits on a reflink-capable filesystem (XFS with
//! reflink, btrfs). Its snapshot, taken while the volume is frozen, is an FICLONE of the backing
//! file into `<snapshot-dir>/<set-id>/<volume>.img` on that same filesystem: instant, and
//! holding exactly the bytes the frozen filesystem had flushed.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::Instant;

use tonic::Code;

use crate::mounts::DevId;

/// Name of the default snapshot directory, next to each backing file.
pub const DEFAULT_DIR_NAME: &str = ".quiesce-snapshots";

mod ioctl {
    // FICLONE = _IOW(0x94, 9, int) (linux/fs.h): dest_fd.ioctl(FICLONE, src_fd).
    nix::ioctl_write_int!(ficlone, 0x94, 9);
}

#[derive(Debug, thiserror::Error)]
pub enum ReflinkError {
    #[error(
        "{mount} is on {device}, not a loop device: the reflink provider clones loop backing files"
    )]
    NotLoopBacked { mount: PathBuf, device: String },
    #[error(
        "cannot clone {source_file} into {target}: its filesystem does not support reflinks (use XFS with reflink=1 or btrfs, and keep snapshots on the same filesystem)"
    )]
    NotCloneable {
        source_file: PathBuf,
        target: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("snapshot directory {dir} is on a frozen filesystem ({dev})")]
    DirOnFrozenFs { dir: PathBuf, dev: DevId },
    #[error("snapshot {path} already exists")]
    Exists { path: PathBuf },
    #[error("{path} is not a snapshot of set {set_id} in a snapshot directory of this agent")]
    ForeignSnapshot { path: PathBuf, set_id: String },
    #[error("snapshot {path} does not exist")]
    Missing { path: PathBuf },
    #[error("restore target {path} must be an absolute path")]
    RelativeTarget { path: PathBuf },
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl ReflinkError {
    pub fn code(&self) -> Code {
        match self {
            ReflinkError::NotLoopBacked { .. } => Code::FailedPrecondition,
            ReflinkError::NotCloneable { .. } => Code::FailedPrecondition,
            ReflinkError::DirOnFrozenFs { .. } => Code::FailedPrecondition,
            ReflinkError::Exists { .. } => Code::AlreadyExists,
            ReflinkError::ForeignSnapshot { .. } => Code::PermissionDenied,
            ReflinkError::Missing { .. } => Code::NotFound,
            ReflinkError::RelativeTarget { .. } => Code::InvalidArgument,
            ReflinkError::Io { .. } => Code::Internal,
        }
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ReflinkError + 'a {
    move |source| ReflinkError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// One clone made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clone {
    pub path: PathBuf,
    pub size_bytes: u64,
    pub duration_ms: u64,
}

#[derive(Debug, Clone)]
pub struct ReflinkProvider {
    snapshot_dir: Option<PathBuf>,
}

impl ReflinkProvider {
    pub fn new(snapshot_dir: Option<PathBuf>) -> Self {
        ReflinkProvider { snapshot_dir }
    }

    /// The snapshot directory for a backing file.
    pub fn dir_for(&self, backing_file: &Path) -> PathBuf {
        match &self.snapshot_dir {
            Some(dir) => dir.clone(),
            None => backing_file
                .parent()
                .unwrap_or(Path::new("/"))
                .join(DEFAULT_DIR_NAME),
        }
    }

    /// The backing file of a volume, or why it has none.
    pub fn backing_file<'a>(
        mount: &Path,
        device: &str,
        backing_file: Option<&'a Path>,
    ) -> Result<&'a Path, ReflinkError> {
        backing_file.ok_or_else(|| ReflinkError::NotLoopBacked {
            mount: mount.to_owned(),
            device: device.to_owned(),
        })
    }

    /// Clones `backing_file` into this set's snapshot directory. `frozen` lists filesystems
    /// that must not be written (the directory is checked before anything is created).
    pub fn snapshot(
        &self,
        set_id: &str,
        mount: &Path,
        backing_file: &Path,
        frozen: &[DevId],
    ) -> Result<Clone, ReflinkError> {
        let dir = self.dir_for(backing_file).join(set_id);
        refuse_frozen_dir(&dir, frozen)?;
        std::fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
        let target = dir.join(image_name(mount));
        clone_file(backing_file, &target)
    }

    /// Whether `path` is a snapshot of `set_id` that this provider made: directly inside
    /// `<snapshot dir>/<set-id>/`, for one of the snapshot dirs of `backing_files`.
    fn check_owned(
        &self,
        set_id: &str,
        path: &Path,
        backing_files: &[PathBuf],
    ) -> Result<(), ReflinkError> {
        let foreign = || ReflinkError::ForeignSnapshot {
            path: path.to_owned(),
            set_id: set_id.to_owned(),
        };
        if !path.is_absolute()
            || path
                .components()
                .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
            || path.extension().is_none_or(|ext| ext != "img")
        {
            return Err(foreign());
        }
        let set_dir = path.parent().ok_or_else(foreign)?;
        if set_dir.file_name().is_none_or(|name| name != set_id) {
            return Err(foreign());
        }
        let root = set_dir.parent().ok_or_else(foreign)?;
        let mut dirs: Vec<PathBuf> = backing_files.iter().map(|b| self.dir_for(b)).collect();
        dirs.extend(self.snapshot_dir.clone());
        if dirs.iter().any(|dir| dir == root) {
            Ok(())
        } else {
            Err(foreign())
        }
    }

    /// Removes a set's snapshots. Missing ones count as removed. No paths: every snapshot of
    /// the set in every snapshot directory of this agent (clean-up after an ambiguous failure).
    pub fn delete(
        &self,
        set_id: &str,
        paths: &[PathBuf],
        backing_files: &[PathBuf],
    ) -> Result<u32, ReflinkError> {
        if paths.is_empty() {
            let found = self.find_all(set_id, backing_files);
            return if found.is_empty() {
                Ok(0)
            } else {
                self.delete(set_id, &found, backing_files)
            };
        }
        for path in paths {
            self.check_owned(set_id, path, backing_files)?;
        }
        let mut deleted = 0;
        for path in paths {
            match std::fs::remove_file(path) {
                Ok(()) => deleted += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("cannot remove", path)(e)),
            }
            if let Some(dir) = path.parent() {
                // Only succeeds once the set's directory is empty.
                let _ = std::fs::remove_dir(dir);
            }
        }
        Ok(deleted)
    }

    /// Every `.img` in `<dir>/<set-id>/` over the snapshot dirs of `backing_files`.
    fn find_all(&self, set_id: &str, backing_files: &[PathBuf]) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = backing_files.iter().map(|b| self.dir_for(b)).collect();
        dirs.extend(self.snapshot_dir.clone());
        dirs.sort();
        dirs.dedup();
        let mut found = Vec::new();
        for dir in dirs {
            let Ok(entries) = std::fs::read_dir(dir.join(set_id)) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|ext| ext == "img") {
                    found.push(path);
                }
            }
        }
        found
    }

    /// Materialises a snapshot as a new image in `target_dir`: a reflink clone where the
    /// filesystem allows, a full copy otherwise. Returns the image and whether it was cloned.
    pub fn restore(
        &self,
        set_id: &str,
        snapshot: &Path,
        target_dir: &Path,
        backing_files: &[PathBuf],
    ) -> Result<(PathBuf, bool), ReflinkError> {
        self.check_owned(set_id, snapshot, backing_files)?;
        if !target_dir.is_absolute() {
            return Err(ReflinkError::RelativeTarget {
                path: target_dir.to_owned(),
            });
        }
        if !snapshot.exists() {
            return Err(ReflinkError::Missing {
                path: snapshot.to_owned(),
            });
        }
        std::fs::create_dir_all(target_dir).map_err(io_err("cannot create", target_dir))?;
        let name = snapshot.file_name().unwrap_or_default();
        let target = target_dir.join(name);
        match clone_file(snapshot, &target) {
            Ok(_) => Ok((target, true)),
            Err(ReflinkError::NotCloneable { .. }) => {
                copy_new(snapshot, &target)?;
                Ok((target, false))
            }
            Err(e) => Err(e),
        }
    }
}

/// `/var/lib/pg data` → `var-lib-pg_data.img`: unique per mount point, readable.
pub fn image_name(mount: &Path) -> String {
    let flat: String = mount
        .to_string_lossy()
        .trim_matches('/')
        .chars()
        .map(|c| match c {
            '/' => '-',
            c if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_') => c,
            _ => '_',
        })
        .collect();
    let flat = if flat.is_empty() { "root".into() } else { flat };
    format!("{flat}.img")
}

/// Refuses a directory whose nearest existing ancestor is on a frozen filesystem. `stat` does
/// not block on a frozen filesystem; `mkdir` would.
fn refuse_frozen_dir(dir: &Path, frozen: &[DevId]) -> Result<(), ReflinkError> {
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let dev = DevId::of_path(existing).map_err(io_err("cannot stat", existing))?;
    if frozen.contains(&dev) {
        return Err(ReflinkError::DirOnFrozenFs {
            dir: dir.to_owned(),
            dev,
        });
    }
    Ok(())
}

/// FICLONE `source` into a new file `target` (0600). A failed clone leaves nothing behind.
pub fn clone_file(source: &Path, target: &Path) -> Result<Clone, ReflinkError> {
    let started = Instant::now();
    let src = File::open(source).map_err(io_err("cannot open", source))?;
    let size_bytes = src.metadata().map_err(io_err("cannot stat", source))?.len();
    let dst = create_new(target)?;
    // SAFETY: both descriptors are open for the duration of the call; FICLONE takes the source
    // descriptor as its integer argument.
    let result = unsafe { ioctl::ficlone(dst.as_raw_fd(), src.as_raw_fd() as _) };
    if let Err(errno) = result {
        drop(dst);
        let _ = std::fs::remove_file(target);
        let source_err = io::Error::from(errno);
        return Err(match errno {
            nix::errno::Errno::EOPNOTSUPP
            | nix::errno::Errno::EXDEV
            | nix::errno::Errno::EINVAL
            | nix::errno::Errno::ENOTTY => ReflinkError::NotCloneable {
                source_file: source.to_owned(),
                target: target.to_owned(),
                source: source_err,
            },
            _ => io_err("cannot clone into", target)(source_err),
        });
    }
    Ok(Clone {
        path: target.to_owned(),
        size_bytes,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

fn create_new(target: &Path) -> Result<File, ReflinkError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(target)
        .map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => ReflinkError::Exists {
                path: target.to_owned(),
            },
            _ => io_err("cannot create", target)(e),
        })
}

fn copy_new(source: &Path, target: &Path) -> Result<(), ReflinkError> {
    let mut src = File::open(source).map_err(io_err("cannot open", source))?;
    let mut dst = create_new(target)?;
    io::copy(&mut src, &mut dst).map_err(io_err("cannot copy into", target))?;
    dst.sync_all().map_err(io_err("cannot sync", target))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names_are_flat_and_distinct() {
        assert_eq!(
            image_name(Path::new("/var/lib/pg data")),
            "var-lib-pg_data.img"
        );
        assert_ne!(image_name(Path::new("/a/b")), image_name(Path::new("/a-c")));
    }

    #[test]
    fn only_own_snapshots_can_be_deleted_or_restored() {
        let provider = ReflinkProvider::new(None);
        let backing = vec![PathBuf::from("/pool/data.img")];
        let ok = PathBuf::from("/pool/.quiesce-snapshots/set-1/mnt-data.img");
        assert!(provider.check_owned("set-1", &ok, &backing).is_ok());
        for bad in [
            "/etc/passwd",
            "/pool/.quiesce-snapshots/set-2/mnt-data.img",
            "/pool/.quiesce-snapshots/set-1/../../data.img",
            "/other/.quiesce-snapshots/set-1/mnt-data.img",
            "/pool/.quiesce-snapshots/set-1/mnt-data.raw",
        ] {
            let err = provider
                .check_owned("set-1", Path::new(bad), &backing)
                .unwrap_err();
            assert!(matches!(err, ReflinkError::ForeignSnapshot { .. }), "{bad}");
        }
    }

    #[test]
    fn a_filesystem_without_reflink_is_refused_clearly_and_leaves_nothing() {
        // The work tree is on ext4 here, which has no FICLONE.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let source = dir.path().join("backing.img");
        std::fs::write(&source, b"data").unwrap();
        let target = dir.path().join("clone.img");
        match clone_file(&source, &target) {
            Err(err @ ReflinkError::NotCloneable { .. }) => {
                assert!(err.to_string().contains("does not support reflinks"));
                assert!(!target.exists());
            }
            // A reflink-capable work tree (btrfs, xfs) clones instead.
            Ok(clone) => assert_eq!(std::fs::read(clone.path).unwrap(), b"data"),
            Err(other) => panic!("unexpected error: {other}"),
        }
    }

    #[test]
    fn snapshot_dir_on_a_frozen_filesystem_is_refused_before_mkdir() {
        let dir = tempfile::tempdir().unwrap();
        let dev = DevId::of_path(dir.path()).unwrap();
        let err = refuse_frozen_dir(&dir.path().join("a/b"), &[dev]).unwrap_err();
        assert!(matches!(err, ReflinkError::DirOnFrozenFs { .. }));
        assert!(!dir.path().join("a").exists());
    }
}
