//! Which filesystems exist on this host: `/proc/self/mountinfo` and loop device backing files,
//! and which mount and superblock a descriptor the agent holds lives on.
//!
//! Paths are parameters so that unit tests feed a fake tree from a temp dir.

use std::fmt;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::safepath::{self, PathError};

/// A superblock: the `major:minor` that `/proc/self/mountinfo` shows for every mount of one
/// filesystem. Two mounts with the same `DevId` are one superblock (bind mounts, a device
/// mounted twice, every subvolume of one btrfs): FIFREEZE on either freezes both.
///
/// Never compare it with `stat()`'s `st_dev`: btrfs gives every subvolume an anonymous device
/// number of its own (stat 0:41 where mountinfo says 0:40). [`DevId::of_path`] and
/// [`DevId::of_fd`] find the mount through `statx(STATX_MNT_ID)` instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DevId {
    pub major: u32,
    pub minor: u32,
}

impl DevId {
    /// The superblock holding `path` (symlinks followed): the mountinfo `major:minor` of the
    /// mount `statx` says the path lives on.
    pub fn of_path(path: &Path) -> io::Result<DevId> {
        let mount = safepath::mount_of_path(path).map_err(io::Error::other)?;
        superblock_of(&ProcMountTable::host(), mount.mount_id, path)
    }

    /// The superblock a descriptor lives on.
    pub fn of_fd(fd: BorrowedFd<'_>, what: &Path) -> io::Result<DevId> {
        let mount = safepath::mount_of_fd(fd, what).map_err(io::Error::other)?;
        superblock_of(&ProcMountTable::host(), mount.mount_id, what)
    }

    pub fn from_raw(dev: u64) -> DevId {
        DevId {
            major: libc::major(dev),
            minor: libc::minor(dev),
        }
    }

    fn parse(s: &str) -> Option<DevId> {
        let (major, minor) = s.split_once(':')?;
        Some(DevId {
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
        })
    }
}

fn superblock_of(table: &dyn MountTable, mount_id: u64, what: &Path) -> io::Result<DevId> {
    let entries = table.entries().map_err(io::Error::other)?;
    by_mount_id(&entries, mount_id)
        .map(|entry| entry.dev)
        .ok_or_else(|| {
            io::Error::other(format!(
                "{} is on mount {mount_id}, which /proc/self/mountinfo does not list",
                what.display()
            ))
        })
}

/// The entry of a mount id.
pub fn by_mount_id(entries: &[MountEntry], mount_id: u64) -> Option<&MountEntry> {
    entries.iter().find(|entry| entry.mount_id == mount_id)
}

impl fmt::Display for DevId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_id: u64,
    pub dev: DevId,
    /// The directory of the filesystem that is mounted here (not `/` for bind mounts of a subdir).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
}

/// Filesystems that implement FIFREEZE on a block device.
pub const FREEZABLE_FS_TYPES: &[&str] = &["ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs"];

pub fn is_freezable(fs_type: &str) -> bool {
    FREEZABLE_FS_TYPES.contains(&fs_type)
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} line {line}: malformed entry")]
    Malformed { path: PathBuf, line: usize },
}

/// A mount point opened for the ioctls, and what `statx` says about the descriptor.
#[derive(Debug)]
pub struct OpenedMount {
    pub fd: OwnedFd,
    /// The mount the descriptor lives on (mountinfo's first field).
    pub mount_id: u64,
    /// The descriptor is the root of that mount (not a directory below it).
    pub is_mount_root: bool,
}

/// The host's mount table.
pub trait MountTable: Send + Sync {
    fn entries(&self) -> Result<Vec<MountEntry>, MountError>;
    /// For a loop device, the file behind it; `None` for anything else.
    fn loop_backing_file(&self, dev: DevId) -> Option<PathBuf>;
    /// Opens `path` for FIFREEZE/FITHAW/syncfs with no symlink anywhere on it and every
    /// directory above it safe from non-root users (see `safepath`), and says which mount the
    /// descriptor lives on. The caller matches that mount id to [`MountTable::entries`].
    fn open_mount(&self, path: &Path) -> Result<OpenedMount, PathError>;

    /// The entry mounted at exactly `path` (the topmost one if several are stacked).
    fn at(&self, path: &Path) -> Result<Option<MountEntry>, MountError> {
        Ok(self
            .entries()?
            .into_iter()
            .rev()
            .find(|entry| entry.mount_point == path))
    }
}

/// The real table: `/proc/self/mountinfo` and `/sys/dev/block`.
#[derive(Debug, Clone)]
pub struct ProcMountTable {
    mountinfo: PathBuf,
    sys_dev_block: PathBuf,
}

impl ProcMountTable {
    pub fn new(mountinfo: impl Into<PathBuf>, sys_dev_block: impl Into<PathBuf>) -> Self {
        ProcMountTable {
            mountinfo: mountinfo.into(),
            sys_dev_block: sys_dev_block.into(),
        }
    }

    pub fn host() -> Self {
        ProcMountTable::new("/proc/self/mountinfo", "/sys/dev/block")
    }
}

impl MountTable for ProcMountTable {
    fn entries(&self) -> Result<Vec<MountEntry>, MountError> {
        let text = std::fs::read_to_string(&self.mountinfo).map_err(|source| MountError::Read {
            path: self.mountinfo.clone(),
            source,
        })?;
        parse_mountinfo(&text).map_err(|line| MountError::Malformed {
            path: self.mountinfo.clone(),
            line,
        })
    }

    fn loop_backing_file(&self, dev: DevId) -> Option<PathBuf> {
        let path = self
            .sys_dev_block
            .join(dev.to_string())
            .join("loop/backing_file");
        let text = std::fs::read_to_string(path).ok()?;
        let file = text.trim_end_matches('\n');
        (!file.is_empty()).then(|| PathBuf::from(file))
    }

    fn open_mount(&self, path: &Path) -> Result<OpenedMount, PathError> {
        let fd = safepath::open_mount_point(path)?;
        let mount = safepath::mount_of_fd(std::os::fd::AsFd::as_fd(&fd), path)?;
        Ok(OpenedMount {
            fd,
            mount_id: mount.mount_id,
            is_mount_root: mount.is_mount_root,
        })
    }
}

/// Parses mountinfo text; on error returns the 1-based line number that is malformed.
pub fn parse_mountinfo(text: &str) -> Result<Vec<MountEntry>, usize> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(index, line)| parse_line(line).ok_or(index + 1))
        .collect()
}

// 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
fn parse_line(line: &str) -> Option<MountEntry> {
    let (left, right) = line.split_once(" - ")?;
    let mut fields = left.split(' ');
    let mount_id = fields.next()?.parse().ok()?;
    let _parent_id = fields.next()?;
    let dev = DevId::parse(fields.next()?)?;
    let root = unescape(fields.next()?);
    let mount_point = unescape(fields.next()?);
    let mut right = right.split(' ');
    let fs_type = right.next()?.to_string();
    let source = unescape(right.next().unwrap_or(""));
    Some(MountEntry {
        mount_id,
        dev,
        root: PathBuf::from(root),
        mount_point: PathBuf::from(mount_point),
        fs_type,
        source,
    })
}

/// mountinfo writes space, tab, newline and backslash as `\ooo` octal escapes.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 4)
            .filter(|_| bytes[i] == b'\\')
            .and_then(|digits| std::str::from_utf8(digits).ok())
            .and_then(|digits| u8::from_str_radix(digits, 8).ok());
        match escaped {
            Some(value) => {
                out.push(value);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 254:0 / / rw,relatime - ext4 /dev/vda rw
30 22 0:25 / /run rw,nosuid - tmpfs tmpfs rw,size=100k
41 22 7:0 / /mnt/data rw,relatime - ext4 /dev/loop0 rw
42 22 7:0 / /mnt/data\\040alias rw,relatime - ext4 /dev/loop0 rw
43 22 7:1 /sub /srv/bind rw - xfs /dev/loop1 rw
44 22 0:50 / /mnt/nfs rw - nfs4 server:/export rw
";

    #[test]
    fn parses_fields_and_escapes() {
        let entries = parse_mountinfo(SAMPLE).unwrap();
        assert_eq!(entries.len(), 6);
        let alias = &entries[3];
        assert_eq!(alias.mount_point, Path::new("/mnt/data alias"));
        assert_eq!(alias.dev, DevId { major: 7, minor: 0 });
        assert_eq!(
            alias.dev, entries[2].dev,
            "bind/alias shares the superblock"
        );
        assert_eq!(entries[4].root, Path::new("/sub"));
        assert_eq!(entries[5].fs_type, "nfs4");
        assert_eq!(entries[5].source, "server:/export");
    }

    #[test]
    fn malformed_line_is_named() {
        let text = "22 1 254:0 / / rw - ext4 /dev/vda rw\ngarbage line\n";
        assert_eq!(parse_mountinfo(text), Err(2));
    }

    #[test]
    fn reads_fake_proc_and_sys_tree() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mountinfo"), SAMPLE).unwrap();
        let loop_dir = dir.path().join("block/7:0/loop");
        std::fs::create_dir_all(&loop_dir).unwrap();
        std::fs::write(loop_dir.join("backing_file"), "/pool/data.img\n").unwrap();
        let table = ProcMountTable::new(dir.path().join("mountinfo"), dir.path().join("block"));

        let data = table.at(Path::new("/mnt/data")).unwrap().unwrap();
        assert_eq!(
            table.loop_backing_file(data.dev),
            Some(PathBuf::from("/pool/data.img"))
        );
        assert_eq!(
            table.loop_backing_file(DevId {
                major: 254,
                minor: 0
            }),
            None
        );
        assert_eq!(table.at(Path::new("/mnt")).unwrap(), None);
    }

    #[test]
    fn the_real_table_identifies_a_mount_by_its_descriptor() {
        let table = ProcMountTable::host();
        let opened = table.open_mount(Path::new("/")).unwrap();
        assert!(opened.is_mount_root);
        let entries = table.entries().unwrap();
        let entry = by_mount_id(&entries, opened.mount_id).expect("/ is listed");
        assert_eq!(entry.mount_point, Path::new("/"));
        assert_eq!(DevId::of_path(Path::new("/")).unwrap(), entry.dev);
        assert_eq!(
            DevId::of_fd(std::os::fd::AsFd::as_fd(&opened.fd), Path::new("/")).unwrap(),
            entry.dev
        );
        // A directory below a mount root opens (it is safe) but is no mount root.
        let here = table.open_mount(Path::new(env!("CARGO_MANIFEST_DIR")));
        if let Ok(here) = here {
            assert!(!here.is_mount_root);
        }
    }

    #[test]
    fn only_block_filesystems_are_freezable() {
        for fs in ["ext4", "xfs", "btrfs"] {
            assert!(is_freezable(fs), "{fs}");
        }
        for fs in ["tmpfs", "nfs4", "cifs", "fuse.sshfs", "overlay", "proc"] {
            assert!(!is_freezable(fs), "{fs}");
        }
    }
}
