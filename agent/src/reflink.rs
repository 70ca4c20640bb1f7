//! The `reflink` host-local snapshot provider.
//!
//! A volume is a loop device whose backing file sits on a reflink-capable filesystem (XFS with
//! reflink, btrfs). Its snapshot, taken while the volume is frozen, is a reflink clone of the
//! backing file into `<snapshot-dir>/<set-id>/<volume>.img` on that same filesystem, holding
//! exactly the bytes the frozen filesystem had flushed.
//!
//! **Clones respect the deadline.** A clone costs time per *extent* of the source, not per byte
//! (measured on XFS: ≈35 µs per extent, so a fragmented image of 65,536 extents takes 2.3 s),
//! and while it runs the kernel makes FITHAW of the loop-backed filesystem wait: the thaw's
//! own writes reach the backing file, which the clone holds locked. So the clone is made in
//! ranges (`FICLONERANGE`) of at most [`EXTENTS_PER_RANGE`] extents each, cut at extent
//! boundaries read with `FIEMAP`, and the deadline is checked between ranges. When it comes, the
//! clone stops, the partial clone is removed and the thaw goes through after at most one range.
//! A clone is made under a temporary name (`.<volume>.img.partial`) and renamed when complete.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use tonic::Code;

use crate::mounts::DevId;

/// Name of the default snapshot directory, next to each backing file.
pub const DEFAULT_DIR_NAME: &str = ".quiesce-snapshots";

/// Most extents one `FICLONERANGE` covers. Measured on this project's lab (XFS reflink pool on
/// a loop file, 2 cores, `docs/consistency.md`): ≈35 µs per extent, so 128 extents take ≈4.5 ms
/// — the longest the thaw waits behind a running range.
pub const EXTENTS_PER_RANGE: u64 = 128;

/// Most bytes one range covers (few extents but a huge file: still one short call).
const MAX_RANGE_BYTES: u64 = 1 << 30;

/// Suffix of a clone being made; renamed to `<volume>.img` once complete.
const PARTIAL_SUFFIX: &str = ".partial";

/// Default estimate of one extent's clone cost (measured ≈35 µs, rounded up).
pub const DEFAULT_EXTENT_COST: Duration = Duration::from_micros(40);

mod ioctl {
    // FICLONE = _IOW(0x94, 9, int) (linux/fs.h): dest_fd.ioctl(FICLONE, src_fd).
    nix::ioctl_write_int!(ficlone, 0x94, 9);
    // FICLONERANGE = _IOW(0x94, 13, struct file_clone_range).
    nix::ioctl_write_ptr!(ficlonerange, 0x94, 13, super::FileCloneRange);
    // FS_IOC_FIEMAP = _IOWR('f', 11, struct fiemap): the 32-byte header, extents follow it.
    nix::ioctl_readwrite!(fiemap, b'f', 11, super::FiemapHeader);
}

/// `struct file_clone_range` (linux/fs.h).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct FileCloneRange {
    src_fd: i64,
    src_offset: u64,
    src_length: u64,
    dest_offset: u64,
}

/// `struct fiemap` without its flexible array of extents (linux/fiemap.h).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct FiemapHeader {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
}

/// `struct fiemap_extent` (linux/fiemap.h).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct FiemapExtent {
    fe_logical: u64,
    fe_physical: u64,
    fe_length: u64,
    fe_reserved64: [u64; 2],
    fe_flags: u32,
    fe_reserved: [u32; 3],
}

const FIEMAP_EXTENT_LAST: u32 = 0x1;
/// Extents asked for per FIEMAP call.
const FIEMAP_BATCH: usize = 256;

#[repr(C)]
struct FiemapBuf {
    header: FiemapHeader,
    extents: [FiemapExtent; FIEMAP_BATCH],
}

/// How many extents `file` has (FIEMAP with no room for extents returns just the count).
pub fn extent_count(file: &File) -> io::Result<u64> {
    let mut header = FiemapHeader {
        fm_length: u64::MAX,
        ..Default::default()
    };
    // SAFETY: with fm_extent_count = 0 the kernel writes only the header, which is valid and
    // exclusively borrowed for the call; the descriptor is open.
    unsafe { ioctl::fiemap(file.as_raw_fd(), &mut header) }?;
    Ok(u64::from(header.fm_mapped_extents))
}

/// Byte ranges `(offset, length)` covering the whole file, each ending on an extent boundary
/// after at most `per_range` extents (or `MAX_RANGE_BYTES`). The last range has length 0: "to
/// the end of the source". Also returns the number of extents seen.
pub fn plan_ranges(file: &File, per_range: u64) -> io::Result<(Vec<(u64, u64)>, u64)> {
    let mut ranges = Vec::new();
    let mut range_start = 0u64;
    let mut in_range = 0u64;
    let mut extents = 0u64;
    let mut next = 0u64;
    // SAFETY: FiemapBuf is plain old data; all-zero is a valid value.
    let mut buf: Box<FiemapBuf> = Box::new(unsafe { std::mem::zeroed() });
    'outer: loop {
        buf.header = FiemapHeader {
            fm_start: next,
            fm_length: u64::MAX - next,
            fm_extent_count: FIEMAP_BATCH as u32,
            ..Default::default()
        };
        // SAFETY: the header is followed in memory by room for FIEMAP_BATCH extents, as
        // fm_extent_count says; the buffer is exclusively borrowed and the descriptor open.
        unsafe { ioctl::fiemap(file.as_raw_fd(), &mut buf.header) }?;
        let mapped = (buf.header.fm_mapped_extents as usize).min(FIEMAP_BATCH);
        if mapped == 0 {
            break;
        }
        for extent in &buf.extents[..mapped] {
            extents += 1;
            in_range += 1;
            let end = extent.fe_logical + extent.fe_length;
            next = end;
            if in_range >= per_range || end - range_start >= MAX_RANGE_BYTES {
                if extent.fe_flags & FIEMAP_EXTENT_LAST != 0 {
                    break 'outer;
                }
                ranges.push((range_start, end - range_start));
                range_start = end;
                in_range = 0;
            }
            if extent.fe_flags & FIEMAP_EXTENT_LAST != 0 {
                break 'outer;
            }
        }
    }
    ranges.push((range_start, 0));
    Ok((ranges, extents))
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
    #[error(
        "clone of {mount} ({source_file}, {extents} extents) stopped after {done_extents} extents and {elapsed_ms} ms: {why}; the partial clone was removed"
    )]
    CloneStopped {
        mount: PathBuf,
        source_file: PathBuf,
        extents: u64,
        done_extents: u64,
        elapsed_ms: u64,
        why: String,
    },
    #[error("snapshot directory {dir} is on a frozen filesystem ({dev})")]
    DirOnFrozenFs { dir: PathBuf, dev: DevId },
    #[error("snapshot {path} already exists")]
    Exists { path: PathBuf },
    #[error("{path} is not a snapshot of set {set_id} in a snapshot directory of this agent")]
    ForeignSnapshot { path: PathBuf, set_id: String },
    #[error("snapshot {path} does not exist")]
    Missing { path: PathBuf },
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
            ReflinkError::CloneStopped { .. } => Code::DeadlineExceeded,
            ReflinkError::Exists { .. } => Code::AlreadyExists,
            ReflinkError::ForeignSnapshot { .. } => Code::PermissionDenied,
            ReflinkError::Missing { .. } => Code::NotFound,
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

/// What a delete removed, and what it could not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeleteReport {
    /// Snapshots (complete clones) removed.
    pub deleted: u32,
    /// Every path removed: clones, partial clones, other files, the set's directories.
    pub removed: Vec<PathBuf>,
    pub not_removed: Vec<(PathBuf, String)>,
}

impl DeleteReport {
    fn merge(&mut self, other: DeleteReport) {
        self.deleted += other.deleted;
        self.removed.extend(other.removed);
        self.not_removed.extend(other.not_removed);
    }
}

/// Why a clone must stop now, asked between ranges; `None`: go on.
pub type StopCheck<'a> = &'a (dyn Fn() -> Option<String> + Sync);

#[derive(Debug, Clone)]
pub struct ReflinkProvider {
    snapshot_dir: Option<PathBuf>,
    extent_cost: Duration,
}

impl ReflinkProvider {
    pub fn new(snapshot_dir: Option<PathBuf>) -> Self {
        ReflinkProvider {
            snapshot_dir,
            extent_cost: DEFAULT_EXTENT_COST,
        }
    }

    /// With another per-extent cost for the plan-time estimate (`reflink.extent-cost`).
    pub fn with_extent_cost(mut self, cost: Duration) -> Self {
        self.extent_cost = cost;
        self
    }

    /// The plan-time estimate of a clone of `backing_file`: its extent count and how long the
    /// clone is expected to take.
    pub fn estimate(&self, backing_file: &Path) -> Result<(u64, Duration), ReflinkError> {
        let file = File::open(backing_file).map_err(io_err("cannot open", backing_file))?;
        let extents = extent_count(&file).map_err(io_err("cannot map extents of", backing_file))?;
        let cost = self
            .extent_cost
            .saturating_mul(u32::try_from(extents).unwrap_or(u32::MAX));
        Ok((extents, cost))
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
        self.snapshot_until(set_id, mount, backing_file, frozen, &|| None)
    }

    /// As `snapshot`, clone in ranges, asking `stop` between ranges whether to give up (the
    /// freeze deadline came, the freeze ended). A stopped clone is removed.
    pub fn snapshot_until(
        &self,
        set_id: &str,
        mount: &Path,
        backing_file: &Path,
        frozen: &[DevId],
        stop: StopCheck<'_>,
    ) -> Result<Clone, ReflinkError> {
        let dir = self.dir_for(backing_file).join(set_id);
        refuse_frozen_dir(&dir, frozen)?;
        std::fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
        let name = image_name(mount);
        let target = dir.join(&name);
        if target.exists() {
            return Err(ReflinkError::Exists { path: target });
        }
        let partial = dir.join(format!(".{name}{PARTIAL_SUFFIX}"));
        let clone = clone_ranges(mount, backing_file, &partial, stop)?;
        if let Err(e) = std::fs::rename(&partial, &target) {
            let _ = std::fs::remove_file(&partial);
            return Err(io_err("cannot rename into", &target)(e));
        }
        Ok(Clone {
            path: target,
            ..clone
        })
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

    /// Removes everything of a set: the named snapshots (each checked to be one of this set's),
    /// then the whole `<dir>/<set-id>/` directory in every snapshot directory of this agent —
    /// partial clones, temporary names and anything else in it. Idempotent: what is already
    /// gone counts as removed and is not listed again. Symlinks are removed, never followed.
    pub fn delete(
        &self,
        set_id: &str,
        paths: &[PathBuf],
        backing_files: &[PathBuf],
    ) -> Result<DeleteReport, ReflinkError> {
        for path in paths {
            self.check_owned(set_id, path, backing_files)?;
        }
        let mut report = DeleteReport::default();
        for path in paths {
            match std::fs::remove_file(path) {
                Ok(()) => {
                    report.deleted += 1;
                    report.removed.push(path.clone());
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => report.not_removed.push((path.clone(), e.to_string())),
            }
        }
        for dir in self.dirs(backing_files) {
            report.merge(remove_set_dir(&dir.join(set_id)));
        }
        Ok(report)
    }

    /// Every snapshot directory of this agent: the configured one, or one per backing file.
    fn dirs(&self, backing_files: &[PathBuf]) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = backing_files.iter().map(|b| self.dir_for(b)).collect();
        dirs.extend(self.snapshot_dir.clone());
        dirs.sort();
        dirs.dedup();
        dirs
    }

    /// Materialises a snapshot as a new image in `target_dir`: a reflink clone where the
    /// filesystem allows, a full copy otherwise, each only after every check of
    /// [`crate::restore`] passed.
    pub fn restore(
        &self,
        set_id: &str,
        snapshot: &Path,
        target_dir: &Path,
        backing_files: &[PathBuf],
        guard: &crate::restore::Guard,
    ) -> Result<crate::restore::Restored, crate::error::Error> {
        self.check_owned(set_id, snapshot, backing_files)?;
        if !snapshot.exists() {
            return Err(ReflinkError::Missing {
                path: snapshot.to_owned(),
            }
            .into());
        }
        Ok(crate::restore::restore_image(snapshot, target_dir, guard)?)
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

/// Removes one set directory and everything in it, without following symlinks.
fn remove_set_dir(set_dir: &Path) -> DeleteReport {
    let mut report = DeleteReport::default();
    let meta = match std::fs::symlink_metadata(set_dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return report,
        Err(e) => {
            report.not_removed.push((set_dir.to_owned(), e.to_string()));
            return report;
        }
    };
    if !meta.is_dir() {
        // Not ours to walk (a symlink planted in its place): remove the link itself.
        match std::fs::remove_file(set_dir) {
            Ok(()) => report.removed.push(set_dir.to_owned()),
            Err(e) => report.not_removed.push((set_dir.to_owned(), e.to_string())),
        }
        return report;
    }
    let entries = match std::fs::read_dir(set_dir) {
        Ok(entries) => entries,
        Err(e) => {
            report.not_removed.push((set_dir.to_owned(), e.to_string()));
            return report;
        }
    };
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                report.not_removed.push((set_dir.to_owned(), e.to_string()));
                continue;
            }
        };
        let path = entry.path();
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        // remove_dir_all does not follow symlinks inside the tree.
        let result = if is_dir {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match result {
            Ok(()) => {
                if !is_dir && path.extension().is_some_and(|ext| ext == "img") {
                    report.deleted += 1;
                }
                report.removed.push(path);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => report.not_removed.push((path, e.to_string())),
        }
    }
    match std::fs::remove_dir(set_dir) {
        Ok(()) => report.removed.push(set_dir.to_owned()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => report.not_removed.push((set_dir.to_owned(), e.to_string())),
    }
    report
}

/// Clones `source` into a new file `target` range by range (see the module docs), asking
/// `stop` before each range. A failed or stopped clone leaves nothing behind.
fn clone_ranges(
    mount: &Path,
    source: &Path,
    target: &Path,
    stop: StopCheck<'_>,
) -> Result<Clone, ReflinkError> {
    let started = Instant::now();
    let src = File::open(source).map_err(io_err("cannot open", source))?;
    let size_bytes = src.metadata().map_err(io_err("cannot stat", source))?.len();
    let (ranges, extents) =
        plan_ranges(&src, EXTENTS_PER_RANGE).map_err(io_err("cannot map extents of", source))?;
    let dst = create_new(target)?;
    let fail = |err: ReflinkError| {
        let _ = std::fs::remove_file(target);
        err
    };
    let mut done_extents = 0u64;
    for (offset, length) in ranges {
        if let Some(why) = stop() {
            drop(dst);
            return Err(fail(ReflinkError::CloneStopped {
                mount: mount.to_owned(),
                source_file: source.to_owned(),
                extents,
                done_extents,
                elapsed_ms: started.elapsed().as_millis() as u64,
                why,
            }));
        }
        let arg = FileCloneRange {
            src_fd: i64::from(src.as_raw_fd()),
            src_offset: offset,
            src_length: length,
            dest_offset: offset,
        };
        // SAFETY: `arg` is a valid file_clone_range borrowed for the call; both descriptors
        // are open for its duration.
        if let Err(errno) = unsafe { ioctl::ficlonerange(dst.as_raw_fd(), &arg) } {
            return Err(fail(clone_error(errno, source, target)));
        }
        done_extents = (done_extents + EXTENTS_PER_RANGE).min(extents);
    }
    // A source ending in a hole: the clone must still have the source's length.
    let len = dst.metadata().map_err(io_err("cannot stat", target))?.len();
    if len != size_bytes
        && let Err(e) = dst.set_len(size_bytes)
    {
        return Err(fail(io_err("cannot size", target)(e)));
    }
    Ok(Clone {
        path: target.to_owned(),
        size_bytes,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

fn clone_error(errno: nix::errno::Errno, source: &Path, target: &Path) -> ReflinkError {
    let source_err = io::Error::from(errno);
    match errno {
        nix::errno::Errno::EOPNOTSUPP
        | nix::errno::Errno::EXDEV
        | nix::errno::Errno::EINVAL
        | nix::errno::Errno::ENOTTY => ReflinkError::NotCloneable {
            source_file: source.to_owned(),
            target: target.to_owned(),
            source: source_err,
        },
        _ => io_err("cannot clone into", target)(source_err),
    }
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
        return Err(clone_error(errno, source, target));
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
    fn ranges_end_on_extent_boundaries_and_cover_the_file() {
        // FIEMAP works on any filesystem: a sparse file of 8 separate 4 KiB extents.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("sparse.img");
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        use std::os::unix::fs::FileExt;
        for i in 0..8u64 {
            file.write_all_at(&[1u8; 4096], i * 65536).unwrap();
        }
        file.set_len(8 * 65536 + 4096).unwrap();
        file.sync_all().unwrap();
        assert_eq!(extent_count(&file).unwrap(), 8);
        let (ranges, extents) = plan_ranges(&file, 3).unwrap();
        assert_eq!(extents, 8);
        // 3 + 3 extents, then the rest "to the end" (length 0).
        assert_eq!(
            ranges,
            vec![
                (0, 2 * 65536 + 4096),
                (2 * 65536 + 4096, 3 * 65536),
                (5 * 65536 + 4096, 0)
            ]
        );
        let (whole, _) = plan_ranges(&file, EXTENTS_PER_RANGE).unwrap();
        assert_eq!(whole, vec![(0, 0)], "few extents: one call");
    }

    #[test]
    fn delete_removes_the_whole_set_directory_and_says_what_it_removed() {
        let pool = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep.txt"), b"not ours").unwrap();
        let snapshots = pool.path().join("snapshots");
        let set_dir = snapshots.join("set-1");
        std::fs::create_dir_all(&set_dir).unwrap();
        std::fs::write(set_dir.join("mnt-a.img"), b"clone").unwrap();
        std::fs::write(set_dir.join(".mnt-b.img.partial"), b"half").unwrap();
        std::os::unix::fs::symlink(outside.path(), set_dir.join("planted")).unwrap();
        let provider = ReflinkProvider::new(Some(snapshots.clone()));
        let report = provider
            .delete("set-1", &[set_dir.join("mnt-a.img")], &[])
            .unwrap();
        assert_eq!(report.deleted, 1, "{report:?}");
        assert!(report.not_removed.is_empty(), "{report:?}");
        for name in ["mnt-a.img", ".mnt-b.img.partial", "planted"] {
            assert!(
                report.removed.contains(&set_dir.join(name)),
                "{name}: {report:?}"
            );
        }
        assert!(report.removed.contains(&set_dir));
        assert!(!set_dir.exists());
        assert!(
            outside.path().join("keep.txt").exists(),
            "a symlink is removed, never followed"
        );
        // Idempotent.
        assert_eq!(
            provider.delete("set-1", &[], &[]).unwrap(),
            DeleteReport::default()
        );
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
