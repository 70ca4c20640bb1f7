//! Materialising a snapshot as a new image in a directory the operator names — without ever
//! harming a live volume.
//!
//! A restore writes as much as the volume it restores, as root, into a directory named in a
//! request. So before one byte is written:
//! - the directory is opened by descriptor ([`safepath::open_mount_point`]: no symlink on the
//!   way, every directory above it safe from non-root users); missing directories are made
//!   with `mkdirat` below that descriptor, so nobody can steer the restore elsewhere;
//! - its filesystem is identified by superblock on that descriptor, and refused when it is the
//!   filesystem of any volume this agent is configured for (every group's volumes on this
//!   host), or of the volume the snapshot was taken of;
//! - it is refused when frozen: by this agent (known at once), or by anyone else — the image
//!   file is first made with `O_TMPFILE` on a thread of its own, and a filesystem on which that
//!   does not return within [`FROZEN_PROBE`] is frozen (the thread stays blocked until the
//!   thaw, then drops its unnamed file; nothing is left);
//! - for a copy (anything but a reflink clone on the snapshot's own filesystem), the free space
//!   is checked against the blocks the snapshot really holds.
//!
//! The image is written into that unnamed `O_TMPFILE` file and linked into place with
//! `linkat` only once complete: an existing name is never overwritten (`EEXIST`), and every
//! failure — out of space, an I/O error, the agent killed — leaves nothing behind, because an
//! unnamed file vanishes with its last descriptor. Filesystems without `O_TMPFILE` get a
//! named temporary (`.<image>.partial`), removed on every failure path, and `renameat2` with
//! `RENAME_NOREPLACE`.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{Mode, fstat, mkdirat};
use quiesce_proto::echo::CappedPath;
use tonic::Code;

use crate::mounts::DevId;
use crate::safepath::{self, PathError};

/// How long creating the image file may take before its filesystem counts as frozen.
pub const FROZEN_PROBE: Duration = Duration::from_secs(2);

/// Copy buffer.
const CHUNK: usize = 1 << 20;

/// A filesystem a restore must never write to, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Protected {
    pub dev: DevId,
    /// What lives there, for the message: "volume /var/lib/pg (group member of this agent)".
    pub what: String,
}

/// One restored image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    pub path: PathBuf,
    /// A reflink clone (no data copied); false: a full copy.
    pub cloned: bool,
    /// The filesystem found in the image (`xfs`, `ext4`, `btrfs`), empty when unknown.
    pub fs_type: String,
    pub size_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("restore target {} must be an absolute path", CappedPath(.target))]
    Relative { target: PathBuf },
    #[error("restore target {} is refused: its path is not safe", CappedPath(.target))]
    Unsafe {
        target: PathBuf,
        #[source]
        source: PathError,
    },
    #[error(
        "restore target {} is on the filesystem of {what} ({dev}); restoring there could fill a live volume: use a directory on scratch space",
        CappedPath(.target)
    )]
    OnProtected {
        target: PathBuf,
        what: String,
        dev: DevId,
    },
    #[error("restore target {} is on a frozen filesystem ({dev}): {by}", CappedPath(.target))]
    Frozen {
        target: PathBuf,
        dev: DevId,
        by: String,
    },
    #[error(
        "restore target {} has {available} bytes free; the image of {} needs {needed}: nothing was written",
        CappedPath(.target), CappedPath(.snapshot)
    )]
    NoSpace {
        target: PathBuf,
        snapshot: PathBuf,
        needed: u64,
        available: u64,
    },
    #[error("restored image {} already exists; a restore never overwrites", CappedPath(.path))]
    Exists { path: PathBuf },
    #[error("{op} {}", CappedPath(.path))]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl RestoreError {
    pub fn code(&self) -> Code {
        match self {
            RestoreError::Relative { .. } => Code::InvalidArgument,
            RestoreError::Unsafe { .. } => Code::FailedPrecondition,
            RestoreError::OnProtected { .. } => Code::FailedPrecondition,
            RestoreError::Frozen { .. } => Code::FailedPrecondition,
            RestoreError::NoSpace { .. } => Code::ResourceExhausted,
            RestoreError::Exists { .. } => Code::AlreadyExists,
            RestoreError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
                Code::ResourceExhausted
            }
            RestoreError::Io { .. } => Code::Internal,
        }
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> RestoreError + 'a {
    move |source| RestoreError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

fn errno_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(Errno) -> RestoreError + 'a {
    move |errno| io_err(op, path)(io::Error::from(errno))
}

/// What a restore must check the target against.
#[derive(Debug, Clone, Default)]
pub struct Guard {
    /// Filesystems never written: every configured volume, the snapshot's source volume.
    pub protected: Vec<Protected>,
    /// Filesystems this agent holds frozen now.
    pub frozen: Vec<DevId>,
    /// How long creating the image may take before the target counts as frozen.
    pub frozen_probe: Option<Duration>,
}

/// Restores `snapshot` (a file this agent made, already checked to be one of the set's) as
/// `<target_dir>/<file name of snapshot>`: see the module docs for every check.
pub fn restore_image(
    snapshot: &Path,
    target_dir: &Path,
    guard: &Guard,
) -> Result<Restored, RestoreError> {
    if !target_dir.is_absolute() {
        return Err(RestoreError::Relative {
            target: target_dir.to_owned(),
        });
    }
    let name = snapshot
        .file_name()
        .ok_or_else(|| io_err("no file name in", snapshot)(io::ErrorKind::InvalidInput.into()))?
        .to_owned();
    let src = nix::fcntl::open(
        snapshot,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno_err("cannot open", snapshot))?;
    let src = File::from(src);
    let src_stat = fstat(&src).map_err(errno_err("cannot stat", snapshot))?;
    let size_bytes = src_stat.st_size as u64;

    // The nearest existing directory, by descriptor; nothing is created before it is checked.
    let (existing, missing) = open_existing(target_dir)?;
    let dev = superblock(existing.as_fd(), target_dir)?;
    check_dev(target_dir, dev, guard)?;
    let probe = guard.frozen_probe.unwrap_or(FROZEN_PROBE);
    let mut temp = TempImage::create(&existing, target_dir, &name, dev, probe)?;
    let target = target_dir.join(&name);

    // The image is written before any directory is made: a refusal leaves nothing at all.
    let same_fs = superblock(src.as_fd(), snapshot)? == dev;
    let cloned = same_fs && clone_into(&src, temp.file()).is_ok();
    if !cloned {
        let needed = (src_stat.st_blocks as u64)
            .saturating_mul(512)
            .min(size_bytes);
        let stat = nix::sys::statvfs::fstatvfs(&existing)
            .map_err(errno_err("cannot statfs", target_dir))?;
        let available =
            (stat.blocks_available() as u64).saturating_mul(stat.fragment_size() as u64);
        if needed > available {
            return Err(RestoreError::NoSpace {
                target: target_dir.to_owned(),
                snapshot: snapshot.to_owned(),
                needed,
                available,
            });
        }
        copy_sparse(&src, temp.file(), size_bytes).map_err(io_err("cannot copy into", &target))?;
    }
    let dir = make_missing(existing, target_dir, &missing)?;
    if superblock(dir.as_fd(), target_dir)? != dev {
        return Err(RestoreError::Unsafe {
            target: target_dir.to_owned(),
            source: PathError::NotCanonical {
                path: target_dir.to_owned(),
            },
        });
    }
    temp.file()
        .sync_all()
        .map_err(io_err("cannot sync", &target))?;
    let fs_type = sniff_fs_type(temp.file());
    temp.commit(&dir, &name, &target)?;
    // The new name is durable once its directory is.
    let _ = nix::unistd::fsync(&dir);
    Ok(Restored {
        path: target,
        cloned,
        fs_type,
        size_bytes,
    })
}

/// The superblock a descriptor lives on.
fn superblock(fd: BorrowedFd<'_>, what: &Path) -> Result<DevId, RestoreError> {
    DevId::of_fd(fd, what).map_err(io_err("cannot identify the filesystem of", what))
}

fn check_dev(target: &Path, dev: DevId, guard: &Guard) -> Result<(), RestoreError> {
    if let Some(p) = guard.protected.iter().find(|p| p.dev == dev) {
        return Err(RestoreError::OnProtected {
            target: target.to_owned(),
            what: p.what.clone(),
            dev,
        });
    }
    if guard.frozen.contains(&dev) {
        return Err(RestoreError::Frozen {
            target: target.to_owned(),
            dev,
            by: "a set of this agent holds it frozen".into(),
        });
    }
    Ok(())
}

/// Opens the longest existing prefix of `target` (see `safepath`), and returns the names of
/// the directories still to be made below it.
fn open_existing(target: &Path) -> Result<(OwnedFd, Vec<PathBuf>), RestoreError> {
    let unsafe_target = |source| RestoreError::Unsafe {
        target: target.to_owned(),
        source,
    };
    if target
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(unsafe_target(PathError::NotCanonical {
            path: target.to_owned(),
        }));
    }
    let mut missing = Vec::new();
    let mut at = target.to_owned();
    loop {
        match safepath::open_mount_point(&at) {
            Ok(fd) => {
                missing.reverse();
                return Ok((fd, missing));
            }
            Err(e) if e.is_not_found() && at.parent().is_some() => {
                missing.push(PathBuf::from(at.file_name().unwrap_or_default()));
                at.pop();
            }
            Err(e) => return Err(unsafe_target(e)),
        }
    }
}

/// Makes each missing directory (0700, root's) below `dir` and opens it without following
/// symlinks; one made by someone else in between is opened only if it is a real directory.
fn make_missing(
    mut dir: OwnedFd,
    target: &Path,
    missing: &[PathBuf],
) -> Result<OwnedFd, RestoreError> {
    for name in missing {
        match mkdirat(&dir, name.as_path(), Mode::from_bits_truncate(0o700)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(errno_err("cannot create", target)(e)),
        }
        dir = openat(
            &dir,
            name.as_path(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::ELOOP | Errno::ENOTDIR => RestoreError::Unsafe {
                target: target.to_owned(),
                source: PathError::NotDirectory {
                    path: target.to_owned(),
                    component: name.clone(),
                },
            },
            e => errno_err("cannot open", target)(e),
        })?;
    }
    Ok(dir)
}

/// The image being written: an unnamed `O_TMPFILE` file, or a named temporary removed on drop.
struct TempImage {
    file: File,
    /// Named fallback: its directory and name, removed unless committed.
    named: Option<(OwnedFd, CString)>,
}

impl TempImage {
    /// Makes the file on a thread of its own: on a frozen filesystem that call blocks until
    /// the thaw, so after `probe` without an answer the filesystem is reported frozen and the
    /// thread left to finish (and clean up) on its own.
    fn create(
        dir: &OwnedFd,
        target: &Path,
        name: &OsStr,
        dev: DevId,
        probe: Duration,
    ) -> Result<TempImage, RestoreError> {
        let dir = dir.try_clone().map_err(io_err("cannot open", target))?;
        let temp_name = CString::new(format!(".{}.partial", name.to_string_lossy()))
            .map_err(|_| io_err("bad name in", target)(io::ErrorKind::InvalidInput.into()))?;
        let (tx, rx) = mpsc::channel();
        let started = Instant::now();
        std::thread::Builder::new()
            .name("restore-create".into())
            .spawn(move || {
                // When the restore gave up (a frozen filesystem, thawed since), the file is
                // dropped here: unnamed, or removed by `TempImage`'s drop.
                let _ = tx.send(make_temp(dir, temp_name));
            })
            .map_err(io_err("cannot start a thread for", target))?;
        match rx.recv_timeout(probe) {
            Ok(made) => made.map_err(|e| io_err("cannot create a file in", target)(e)),
            Err(_) => Err(RestoreError::Frozen {
                target: target.to_owned(),
                dev,
                by: format!(
                    "creating a file there did not finish within {} ms (frozen by another tool, e.g. fsfreeze?)",
                    started.elapsed().as_millis()
                ),
            }),
        }
    }

    fn file(&mut self) -> &mut File {
        &mut self.file
    }

    /// Gives the finished image its name; fails rather than replace anything.
    fn commit(mut self, dir: &OwnedFd, name: &OsStr, target: &Path) -> Result<(), RestoreError> {
        let new = CString::new(name.as_bytes())
            .map_err(|_| io_err("bad name", target)(io::ErrorKind::InvalidInput.into()))?;
        let exists = || RestoreError::Exists {
            path: target.to_owned(),
        };
        match self.named.take() {
            None => {
                let proc_path =
                    CString::new(format!("/proc/self/fd/{}", self.file.as_raw_fd())).unwrap();
                // SAFETY: both strings are NUL-terminated and live across the call; the
                // descriptors are open.
                let rc = unsafe {
                    libc::linkat(
                        libc::AT_FDCWD,
                        proc_path.as_ptr(),
                        dir.as_raw_fd(),
                        new.as_ptr(),
                        libc::AT_SYMLINK_FOLLOW,
                    )
                };
                if rc != 0 {
                    let err = io::Error::last_os_error();
                    return Err(if err.raw_os_error() == Some(libc::EEXIST) {
                        exists()
                    } else {
                        io_err("cannot link into", target)(err)
                    });
                }
                Ok(())
            }
            Some((temp_dir, temp_name)) => {
                // SAFETY: as above; renameat2 takes two (dirfd, name) pairs and flags.
                let rc = unsafe {
                    libc::renameat2(
                        temp_dir.as_raw_fd(),
                        temp_name.as_ptr(),
                        dir.as_raw_fd(),
                        new.as_ptr(),
                        libc::RENAME_NOREPLACE,
                    )
                };
                if rc != 0 {
                    let err = io::Error::last_os_error();
                    remove_named(&temp_dir, &temp_name);
                    return Err(if err.raw_os_error() == Some(libc::EEXIST) {
                        exists()
                    } else {
                        io_err("cannot rename into", target)(err)
                    });
                }
                Ok(())
            }
        }
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        if let Some((dir, name)) = self.named.take() {
            remove_named(&dir, &name);
        }
    }
}

fn remove_named(dir: &OwnedFd, name: &CString) {
    // SAFETY: a NUL-terminated name relative to an open directory descriptor.
    unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) };
}

/// `O_TMPFILE` in `dir`, or (where the filesystem has none) a new named file.
fn make_temp(dir: OwnedFd, temp_name: CString) -> io::Result<TempImage> {
    let dot = c".";
    // SAFETY: NUL-terminated path relative to an open directory descriptor.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            dot.as_ptr(),
            libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC,
            0o600,
        )
    };
    if fd >= 0 {
        // SAFETY: a descriptor just returned to us, owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        return Ok(TempImage { file, named: None });
    }
    let err = io::Error::last_os_error();
    if !matches!(
        err.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
    ) {
        return Err(err);
    }
    // SAFETY: as above; O_EXCL with O_CREAT never opens an existing file or follows a link.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            temp_name.as_ptr(),
            libc::O_CREAT | libc::O_EXCL | libc::O_RDWR | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            0o600,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned to us, owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    Ok(TempImage {
        file,
        named: Some((dir, temp_name)),
    })
}

mod ioctl {
    // FICLONE = _IOW(0x94, 9, int) (linux/fs.h): dest_fd.ioctl(FICLONE, src_fd).
    nix::ioctl_write_int!(ficlone, 0x94, 9);
}

fn clone_into(src: &File, dst: &File) -> nix::Result<()> {
    // SAFETY: both descriptors are open for the call; FICLONE takes the source descriptor as
    // its integer argument.
    unsafe { ioctl::ficlone(dst.as_raw_fd(), src.as_raw_fd() as _) }.map(|_| ())
}

/// Copies the data of `src` (skipping holes, so a sparse image stays sparse) into `dst`, then
/// gives `dst` the source's length.
fn copy_sparse(src: &File, dst: &File, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0u64;
    while offset < len {
        // SAFETY: lseek on an open descriptor has no memory effects.
        let data = unsafe { libc::lseek(src.as_raw_fd(), offset as i64, libc::SEEK_DATA) };
        if data < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole is left
            }
            return Err(err);
        }
        let data = data as u64;
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(src.as_raw_fd(), data as i64, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let hole = (hole as u64).min(len);
        let mut at = data;
        while at < hole {
            let want = ((hole - at) as usize).min(CHUNK);
            let got = src.read_at(&mut buf[..want], at)?;
            if got == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the snapshot shrank while it was copied",
                ));
            }
            dst.write_all_at(&buf[..got], at)?;
            at += got as u64;
        }
        offset = hole;
    }
    dst.set_len(len)
}

/// The filesystem whose superblock the image starts with.
pub fn sniff_fs_type(image: &File) -> String {
    let mut xfs = [0u8; 4];
    if image.read_exact_at(&mut xfs, 0).is_ok() && &xfs == b"XFSB" {
        return "xfs".into();
    }
    let mut btrfs = [0u8; 8];
    if image.read_exact_at(&mut btrfs, 0x10040).is_ok() && &btrfs == b"_BHRfS_M" {
        return "btrfs".into();
    }
    let mut ext = [0u8; 2];
    if image.read_exact_at(&mut ext, 1024 + 56).is_ok() && ext == [0x53, 0xEF] {
        return "ext4".into();
    }
    String::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> Guard {
        Guard {
            frozen_probe: Some(Duration::from_secs(5)),
            ..Default::default()
        }
    }

    fn snapshot_in(dir: &Path, bytes: &[u8]) -> PathBuf {
        let path = dir.join("snap").join("vol-a.img");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    #[test]
    fn a_restore_makes_missing_directories_copies_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = vec![0u8; 3 << 20];
        bytes[0..4].copy_from_slice(b"XFSB");
        bytes[(2 << 20) + 7] = 42;
        let snapshot = snapshot_in(dir.path(), &bytes);
        let target = dir.path().join("restore/a b;c");
        let restored = restore_image(&snapshot, &target, &guard()).unwrap();
        assert_eq!(restored.path, target.join("vol-a.img"));
        assert_eq!(restored.fs_type, "xfs");
        assert_eq!(std::fs::read(&restored.path).unwrap(), bytes);
        assert_eq!(entries(&target), vec!["vol-a.img".to_string()]);
        let err = restore_image(&snapshot, &target, &guard()).unwrap_err();
        assert!(matches!(err, RestoreError::Exists { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("already exists; a restore never overwrites")
        );
        assert_eq!(std::fs::read(&restored.path).unwrap(), bytes, "untouched");
        assert_eq!(entries(&target), vec!["vol-a.img".to_string()]);
    }

    #[test]
    fn a_target_on_a_protected_filesystem_is_refused_before_anything_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let snapshot = snapshot_in(dir.path(), b"data");
        let dev = DevId::of_path(dir.path()).unwrap();
        let target = dir.path().join("new/dir");
        let guard = Guard {
            protected: vec![Protected {
                dev,
                what: "volume /vol/a".into(),
            }],
            ..guard()
        };
        let err = restore_image(&snapshot, &target, &guard).unwrap_err();
        assert!(matches!(err, RestoreError::OnProtected { .. }), "{err}");
        assert!(
            err.to_string().contains("filesystem of volume /vol/a"),
            "{err}"
        );
        assert!(!dir.path().join("new").exists());
        let frozen = Guard {
            frozen: vec![dev],
            ..self::guard()
        };
        let err = restore_image(&snapshot, &target, &frozen).unwrap_err();
        assert!(matches!(err, RestoreError::Frozen { .. }), "{err}");
        assert!(!dir.path().join("new").exists());
    }

    #[test]
    fn a_symlink_on_the_target_path_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let snapshot = snapshot_in(dir.path(), b"data");
        std::fs::create_dir(dir.path().join("real")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("real"), dir.path().join("link")).unwrap();
        let err = restore_image(&snapshot, &dir.path().join("link/x"), &guard()).unwrap_err();
        assert!(matches!(err, RestoreError::Unsafe { .. }), "{err}");
        assert!(entries(&dir.path().join("real")).is_empty());
    }

    #[test]
    fn long_targets_are_echoed_capped() {
        let long = format!("/{}", "d".repeat(5000));
        let err =
            restore_image(Path::new("/nonexistent/s.img"), Path::new(&long), &guard()).unwrap_err();
        assert!(err.to_string().len() < 600, "{}", err.to_string().len());
    }

    #[test]
    fn sparse_copies_keep_length_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src_path = dir.path().join("sparse");
        let src = File::create(&src_path).unwrap();
        src.write_all_at(b"head", 0).unwrap();
        src.write_all_at(b"tail", 64 << 20).unwrap();
        src.set_len(128 << 20).unwrap();
        let src = File::open(&src_path).unwrap();
        let dst_path = dir.path().join("copy");
        let dst = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&dst_path)
            .unwrap();
        copy_sparse(&src, &dst, 128 << 20).unwrap();
        let meta = std::fs::metadata(&dst_path).unwrap();
        assert_eq!(meta.len(), 128 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(
            meta.blocks() * 512 < 8 << 20,
            "holes kept: {}",
            meta.blocks()
        );
        let mut buf = [0u8; 4];
        dst.read_exact_at(&mut buf, 64 << 20).unwrap();
        assert_eq!(&buf, b"tail");
    }
}
