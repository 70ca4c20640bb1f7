//! Opening a path so that nobody but root can steer where it leads.
//!
//! A path the agent acts on as root — a listed mount point it will FIFREEZE, a hook directory
//! whose scripts it will execute — is opened once, one component at a time from `/`, with
//! `O_NOFOLLOW`: no symbolic link is followed anywhere on it (a symlink component is refused,
//! naming it). Every directory passed through is checked *on the descriptor just opened*
//! (`fstat`, so what is checked is what is walked): it must be owned by root (or by the agent's
//! own uid, which is root in production) and must not be writable by group or others — except
//! a sticky directory such as `/tmp` or `/var/tmp`, whose next component must then be owned by
//! root, since the sticky bit stops everyone else from renaming or replacing it.
//!
//! Once such a path is safe, only root can change what it names, so the descriptor returned is
//! the object that was checked, and the caller acts on the descriptor only.
//!
//! `statx` (`STATX_MNT_ID`, `STATX_ATTR_MOUNT_ROOT`) then says which mount a descriptor lives on
//! and whether it is that mount's root: `mounts` matches the mount id to `/proc/self/mountinfo`,
//! whose `major:minor` identifies the superblock (what FIFREEZE freezes).

use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, open, openat};
use nix::sys::stat::{FileStat, Mode, fstat, fstatat};

/// Longest path the agent accepts anywhere (Linux's PATH_MAX).
pub const MAX_PATH_BYTES: usize = 4096;

const S_IFMT: u32 = libc::S_IFMT;
const S_IFDIR: u32 = libc::S_IFDIR;
const S_IFREG: u32 = libc::S_IFREG;
const S_IFLNK: u32 = libc::S_IFLNK;

#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("{path} must be an absolute path without `.` or `..` components")]
    NotCanonical { path: PathBuf },
    #[error(
        "{path}: {component} is a symbolic link; the agent follows none on the paths it acts on"
    )]
    Symlink { path: PathBuf, component: PathBuf },
    #[error("{path}: {component} is not a directory")]
    NotDirectory { path: PathBuf, component: PathBuf },
    #[error(
        "{path}: {dir} is owned by uid {uid}, not root; its owner could redirect {path} to another file or filesystem"
    )]
    NotRootOwned {
        path: PathBuf,
        dir: PathBuf,
        uid: u32,
    },
    #[error(
        "{path}: {dir} has mode {mode:04o}: writable by group or others, who could redirect {path} to another file or filesystem"
    )]
    Writable {
        path: PathBuf,
        dir: PathBuf,
        mode: u32,
    },
    #[error(
        "{path}: {dir} is a sticky world-writable directory and {component} in it is owned by uid {uid}, not root"
    )]
    StickyNotRootOwned {
        path: PathBuf,
        dir: PathBuf,
        component: PathBuf,
        uid: u32,
    },
    #[error("cannot open {component} (on the way to {path})")]
    Open {
        path: PathBuf,
        component: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("statx on {path}")]
    Statx {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the kernel does not report {what} (statx); Linux 5.8 or later is needed to identify filesystems safely"
    )]
    Unsupported { what: &'static str },
}

impl PathError {
    /// Whether the path names nothing right now (as opposed to something unsafe).
    pub fn is_not_found(&self) -> bool {
        matches!(self, PathError::Open { source, .. } if source.raw_os_error() == Some(libc::ENOENT))
    }
}

/// How the last component is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Last {
    /// A directory for ioctls (FIFREEZE needs a real descriptor, not `O_PATH`); its own owner
    /// and mode are not checked (a mounted filesystem's root may belong to a database user).
    MountRoot,
    /// A directory whose contents the agent trusts: checked like every directory above it.
    TrustedDir,
}

/// Uids whose directories are trusted: root, and the agent's own effective uid (root in
/// production; the test suite's user in unit tests).
fn trusted(uid: u32) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    uid == 0 || uid == unsafe { libc::geteuid() }
}

fn mode_of(stat: &FileStat) -> u32 {
    stat.st_mode
}

/// Splits `path` into its normal components; refuses relative paths and `.`/`..`.
fn components(path: &Path) -> Result<Vec<&std::ffi::OsStr>, PathError> {
    let not_canonical = || PathError::NotCanonical {
        path: path.to_owned(),
    };
    if path.as_os_str().len() > MAX_PATH_BYTES {
        return Err(not_canonical());
    }
    let mut parts = path.components();
    if parts.next() != Some(Component::RootDir) {
        return Err(not_canonical());
    }
    parts
        .map(|c| match c {
            Component::Normal(name) => Ok(name),
            _ => Err(not_canonical()),
        })
        .collect()
}

/// Checks a directory the walk passes through. Returns whether it is sticky and writable by
/// others (its next component must then be trusted-owned).
fn check_dir(path: &Path, dir: &Path, stat: &FileStat) -> Result<bool, PathError> {
    check_dir_as(path, dir, stat, true)
}

/// A directory whose contents are trusted: no sticky exception.
fn check_trusted_dir(path: &Path, dir: &Path, stat: &FileStat) -> Result<(), PathError> {
    check_dir_as(path, dir, stat, false).map(|_| ())
}

fn check_dir_as(
    path: &Path,
    dir: &Path,
    stat: &FileStat,
    sticky_ok: bool,
) -> Result<bool, PathError> {
    let mode = mode_of(stat);
    if mode & S_IFMT != S_IFDIR {
        return Err(PathError::NotDirectory {
            path: path.to_owned(),
            component: dir.to_owned(),
        });
    }
    if !trusted(stat.st_uid) {
        return Err(PathError::NotRootOwned {
            path: path.to_owned(),
            dir: dir.to_owned(),
            uid: stat.st_uid,
        });
    }
    if mode & 0o022 != 0 {
        if sticky_ok && mode & libc::S_ISVTX != 0 {
            return Ok(true);
        }
        return Err(PathError::Writable {
            path: path.to_owned(),
            dir: dir.to_owned(),
            mode: mode & 0o7777,
        });
    }
    Ok(false)
}

fn open_err(path: &Path, component: &Path, source: Errno) -> PathError {
    PathError::Open {
        path: path.to_owned(),
        component: component.to_owned(),
        source: source.into(),
    }
}

/// Why `openat(dir, name, O_NOFOLLOW|O_DIRECTORY)` failed with ELOOP/ENOTDIR: a symlink, or
/// something else that is not a directory.
fn explain_not_dir(
    dir: BorrowedFd<'_>,
    name: &std::ffi::OsStr,
    path: &Path,
    at: &Path,
) -> PathError {
    match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(stat) if mode_of(&stat) & S_IFMT == S_IFLNK => PathError::Symlink {
            path: path.to_owned(),
            component: at.to_owned(),
        },
        _ => PathError::NotDirectory {
            path: path.to_owned(),
            component: at.to_owned(),
        },
    }
}

/// The walk: opens every directory of `path` from `/` without following symlinks, checking
/// each one it passes through, and opens the last component as `last` says.
fn walk(path: &Path, last: Last) -> Result<OwnedFd, PathError> {
    let names = components(path)?;
    let root = Path::new("/");
    let dir_flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut dir = open(root, dir_flags, Mode::empty()).map_err(|e| open_err(path, root, e))?;
    let mut at = PathBuf::from("/");
    let mut stat = fstat(&dir).map_err(|e| open_err(path, root, e))?;
    if names.is_empty() {
        // The path is `/` itself.
        if last == Last::TrustedDir {
            check_trusted_dir(path, &at, &stat)?;
        }
        return match last {
            Last::TrustedDir => Ok(dir),
            Last::MountRoot => open_mount_root_at(None, root, path, &at),
        };
    }
    for (index, name) in names.iter().enumerate() {
        let sticky = check_dir(path, &at, &stat)?;
        let parent = at.clone();
        at.push(name);
        let is_last = index + 1 == names.len();
        let next = if is_last && last == Last::MountRoot {
            open_mount_root_at(Some(dir.as_fd()), Path::new(name), path, &at)?
        } else {
            match openat(&dir, *name, dir_flags, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::ENOTDIR | Errno::ELOOP) => {
                    return Err(explain_not_dir(dir.as_fd(), name, path, &at));
                }
                Err(e) => return Err(open_err(path, &at, e)),
            }
        };
        stat = fstat(&next).map_err(|e| open_err(path, &at, e))?;
        if sticky && !trusted(stat.st_uid) {
            return Err(PathError::StickyNotRootOwned {
                path: path.to_owned(),
                dir: parent,
                component: at.clone(),
                uid: stat.st_uid,
            });
        }
        dir = next;
    }
    if last == Last::TrustedDir {
        check_trusted_dir(path, &at, &stat)?;
    }
    Ok(dir)
}

/// Opens a directory for ioctls: read-only, no atime update where allowed, never a symlink.
fn open_mount_root_at(
    dir: Option<BorrowedFd<'_>>,
    name: &Path,
    path: &Path,
    at: &Path,
) -> Result<OwnedFd, PathError> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let attempt = |flags: OFlag| match dir {
        Some(dir) => openat(dir, name, flags, Mode::empty()),
        None => open(name, flags, Mode::empty()),
    };
    let result = match attempt(flags | OFlag::O_NOATIME) {
        // O_NOATIME is refused (EPERM) on files the caller does not own, outside root.
        Err(Errno::EPERM) => attempt(flags),
        other => other,
    };
    match result {
        Ok(fd) => Ok(fd),
        Err(Errno::ENOTDIR | Errno::ELOOP) => match dir {
            Some(dir) => Err(explain_not_dir(dir, name.as_os_str(), path, at)),
            None => Err(PathError::NotDirectory {
                path: path.to_owned(),
                component: at.to_owned(),
            }),
        },
        Err(e) => Err(open_err(path, at, e)),
    }
}

/// Opens a mount point for FIFREEZE/FITHAW/syncfs: no symlink anywhere on `path`, every
/// directory above it safe from non-root users. Whether the descriptor really is the root of
/// the mount listed at `path` is the caller's to check ([`mount_id`]).
pub fn open_mount_point(path: &Path) -> Result<OwnedFd, PathError> {
    walk(path, Last::MountRoot)
}

/// Opens a directory whose contents the agent will trust (a hook directory): the walk of
/// [`open_mount_point`], and the directory itself must be owned by root and not writable by
/// group or others. The descriptor is `O_PATH`: use it with `*at` calls.
pub fn open_trusted_dir(path: &Path) -> Result<OwnedFd, PathError> {
    walk(path, Last::TrustedDir)
}

/// A file inside a trusted directory, opened `O_PATH | O_NOFOLLOW`: refused if it is a symlink;
/// its `fstat` is returned for the caller's checks.
pub fn open_in_dir(
    dir: BorrowedFd<'_>,
    dir_path: &Path,
    name: &std::ffi::OsStr,
) -> Result<(OwnedFd, FileStat), PathError> {
    let path = dir_path.join(name);
    let flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = openat(dir, name, flags, Mode::empty()).map_err(|e| open_err(&path, &path, e))?;
    let stat = fstat(&fd).map_err(|e| open_err(&path, &path, e))?;
    if mode_of(&stat) & S_IFMT == S_IFLNK {
        return Err(PathError::Symlink {
            component: path.clone(),
            path,
        });
    }
    Ok((fd, stat))
}

/// Whether `stat` is a regular file.
pub fn is_regular(stat: &FileStat) -> bool {
    mode_of(stat) & S_IFMT == S_IFREG
}

/// Which mount a descriptor lives on, as `statx` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MountOf {
    /// The mount id of `/proc/self/mountinfo`'s first field.
    pub mount_id: u64,
    /// The descriptor is the root of that mount.
    pub is_mount_root: bool,
    /// `st_dev` as statx reports it (`stx_dev_major:stx_dev_minor`). It is the superblock's
    /// own number on most filesystems, but not on btrfs (one anonymous number per subvolume)
    /// nor on overlayfs (the underlying layer's): use it only where the mount id cannot be.
    pub st_dev: (u32, u32),
}

impl fmt::Display for MountOf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "mount {}", self.mount_id)
    }
}

fn statx_raw(
    dirfd: libc::c_int,
    path: &CString,
    flags: libc::c_int,
    what: &Path,
) -> Result<MountOf, PathError> {
    // SAFETY: an all-zero `statx` is a valid value of this plain C struct.
    let mut buf: libc::statx = unsafe { std::mem::zeroed() };
    let mask = libc::STATX_MNT_ID;
    // SAFETY: `path` is a NUL-terminated string and `buf` a writable statx buffer, both valid
    // for the duration of the call; `dirfd` is a descriptor the caller holds open (or AT_FDCWD).
    let rc = unsafe { libc::statx(dirfd, path.as_ptr(), flags, mask, &mut buf) };
    if rc != 0 {
        return Err(PathError::Statx {
            path: what.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    if buf.stx_mask & libc::STATX_MNT_ID == 0 {
        return Err(PathError::Unsupported { what: "mount ids" });
    }
    let root_attr = libc::STATX_ATTR_MOUNT_ROOT as u64;
    if buf.stx_attributes_mask & root_attr == 0 {
        return Err(PathError::Unsupported {
            what: "mount roots",
        });
    }
    Ok(MountOf {
        mount_id: buf.stx_mnt_id,
        is_mount_root: buf.stx_attributes & root_attr != 0,
        st_dev: (buf.stx_dev_major, buf.stx_dev_minor),
    })
}

/// The mount `fd` lives on, and whether `fd` is its root.
pub fn mount_of_fd(fd: BorrowedFd<'_>, what: &Path) -> Result<MountOf, PathError> {
    statx_raw(
        fd.as_raw_fd(),
        &CString::default(),
        libc::AT_EMPTY_PATH,
        what,
    )
}

/// The mount `path` lives on (following symlinks: for the agent's own files, whose location
/// no one else chooses).
pub fn mount_of_path(path: &Path) -> Result<MountOf, PathError> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| PathError::NotCanonical {
        path: path.to_owned(),
    })?;
    statx_raw(libc::AT_FDCWD, &c, 0, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A private tree under a temp dir: `<tmp>/t` (0755) holds what each test makes.
    fn tree() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        chmod(dir.path(), 0o755);
        let t = dir.path().join("t");
        std::fs::create_dir(&t).unwrap();
        chmod(&t, 0o755);
        (dir, t)
    }

    #[test]
    fn a_plain_safe_path_opens() {
        let (_dir, t) = tree();
        let target = t.join("a/b");
        std::fs::create_dir_all(&target).unwrap();
        let fd = open_mount_point(&target).unwrap();
        let meta = std::fs::metadata(&target).unwrap();
        let stat = fstat(&fd).unwrap();
        assert_eq!(stat.st_ino, std::os::unix::fs::MetadataExt::ino(&meta));
        open_trusted_dir(&target).unwrap();
    }

    #[test]
    fn a_symlink_anywhere_on_the_path_is_refused_and_named() {
        let (_dir, t) = tree();
        std::fs::create_dir_all(t.join("real/mnt")).unwrap();
        symlink(t.join("real"), t.join("link")).unwrap();
        let err = open_mount_point(&t.join("link/mnt")).unwrap_err();
        assert!(matches!(err, PathError::Symlink { .. }), "{err}");
        assert!(
            err.to_string()
                .contains(&format!("{} is a symbolic link", t.join("link").display())),
            "{err}"
        );
        // The last component too.
        symlink(t.join("real/mnt"), t.join("mnt-link")).unwrap();
        let err = open_mount_point(&t.join("mnt-link")).unwrap_err();
        assert!(matches!(err, PathError::Symlink { .. }), "{err}");
        let err = open_trusted_dir(&t.join("mnt-link")).unwrap_err();
        assert!(matches!(err, PathError::Symlink { .. }), "{err}");
    }

    #[test]
    fn a_directory_others_can_write_is_refused_unless_sticky() {
        let (_dir, t) = tree();
        let target = t.join("pub/mnt");
        std::fs::create_dir_all(&target).unwrap();
        chmod(&t.join("pub"), 0o777);
        let err = open_mount_point(&target).unwrap_err();
        assert!(
            err.to_string()
                .contains("has mode 0777: writable by group or others"),
            "{err}"
        );
        chmod(&t.join("pub"), 0o775);
        assert!(matches!(
            open_mount_point(&target).unwrap_err(),
            PathError::Writable { mode: 0o775, .. }
        ));
        // Sticky (like /tmp): others cannot rename what they do not own in it.
        chmod(&t.join("pub"), 0o1777);
        open_mount_point(&target).unwrap();
        // The hook directory itself must not be writable, sticky or not.
        chmod(&target, 0o1777);
        assert!(open_trusted_dir(&target).is_err());
        assert!(
            open_mount_point(&target).is_ok(),
            "a mount root's mode is its own"
        );
    }

    #[test]
    fn dot_dot_and_relative_paths_are_refused() {
        for bad in ["relative/x", "/a/../b", "/a/./b/.."] {
            let err = open_mount_point(Path::new(bad)).unwrap_err();
            assert!(
                matches!(err, PathError::NotCanonical { .. }),
                "{bad}: {err}"
            );
        }
        let long = format!("/{}", "a".repeat(MAX_PATH_BYTES));
        assert!(matches!(
            open_mount_point(Path::new(&long)).unwrap_err(),
            PathError::NotCanonical { .. }
        ));
    }

    #[test]
    fn a_file_where_a_directory_should_be_is_named() {
        let (_dir, t) = tree();
        std::fs::write(t.join("file"), "x").unwrap();
        let err = open_mount_point(&t.join("file/mnt")).unwrap_err();
        assert!(matches!(err, PathError::NotDirectory { .. }), "{err}");
        assert!(
            open_mount_point(&t.join("missing"))
                .unwrap_err()
                .is_not_found()
        );
    }

    #[test]
    fn directories_owned_by_someone_else_are_refused() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping: needs root to chown");
            return;
        }
        let (_dir, t) = tree();
        let target = t.join("theirs/mnt");
        std::fs::create_dir_all(&target).unwrap();
        std::os::unix::fs::chown(t.join("theirs"), Some(65534), None).unwrap();
        let err = open_mount_point(&target).unwrap_err();
        assert!(
            matches!(err, PathError::NotRootOwned { uid: 65534, .. }),
            "{err}"
        );
        // Under a sticky directory, a component owned by someone else is refused too.
        std::os::unix::fs::chown(t.join("theirs"), Some(0), None).unwrap();
        chmod(&t, 0o1777);
        std::os::unix::fs::chown(t.join("theirs"), Some(65534), None).unwrap();
        chmod(&t.join("theirs"), 0o755);
        let err = open_mount_point(&target).unwrap_err();
        assert!(
            matches!(
                err,
                PathError::NotRootOwned { .. } | PathError::StickyNotRootOwned { .. }
            ),
            "{err}"
        );
    }

    #[test]
    fn statx_tells_mount_roots_and_mount_ids() {
        let root = open_mount_point(Path::new("/")).unwrap();
        let at_root = mount_of_fd(root.as_fd(), Path::new("/")).unwrap();
        assert!(at_root.is_mount_root, "/ is the root of its mount");
        let here = Path::new(env!("CARGO_MANIFEST_DIR"));
        let inside = mount_of_path(here).unwrap();
        assert!(
            !inside.is_mount_root,
            "{} is not a mount root",
            here.display()
        );
        let by_fd = mount_of_fd(
            open(here, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty())
                .unwrap()
                .as_fd(),
            here,
        )
        .unwrap();
        assert_eq!(inside, by_fd);
    }
}
