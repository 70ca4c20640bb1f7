//! Loop filesystems the tests make and own: [`LoopFs`] (an image on a loop device, mounted),
//! the XFS reflink [`Pool`] holding volume images, [`Tmpfs`] and [`BindMount`]. Every guard
//! thaws before it unmounts.

use std::fs::{self, File};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use quiesce_agent::freezer::{Freezer, IoctlFreezer, open_mount_point};
use quiesce_agent::mounts::DevId;

use crate::env::{check, find_tool, quiet, tool};
use crate::mounts::{dev_of, mount_at, rdev_of, unmount};
use crate::scratch::Scratch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    Ext4,
    /// XFS made with `-m reflink=1`: FICLONE works on files inside it.
    XfsReflink,
}

/// A filesystem image attached to a loop device and mounted. On drop: `fsfreeze -u` (errors
/// ignored), unmount (retried while busy, lazily at last), `losetup -d`, and — for images it
/// created — the image file. Every step checks first that the mount is still ours.
pub struct LoopFs {
    image: PathBuf,
    mount_point: PathBuf,
    device: Option<String>,
    dev: Option<DevId>,
    owns_image: bool,
    made_mount_point: bool,
}

impl LoopFs {
    /// Makes a sparse image of `size_mb` MiB at `image` (which must not exist), puts `kind` on
    /// it, attaches it and mounts it at `mount_point` (created if needed).
    pub fn create(image: &Path, size_mb: u64, kind: FsKind, mount_point: &Path) -> LoopFs {
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(image)
            .unwrap_or_else(|e| panic!("create {}: {e}", image.display()));
        file.set_len(size_mb << 20).expect("size the image");
        drop(file);
        let made = match kind {
            FsKind::Ext4 => check(tool("mkfs.ext4").args(["-q", "-F"]).arg(image)),
            FsKind::XfsReflink => {
                check(tool("mkfs.xfs").args(["-q", "-m", "reflink=1"]).arg(image))
            }
        };
        drop(made);
        LoopFs::attach_inner(image, mount_point, false, true)
    }

    /// Attaches an existing image (a snapshot, a restored image) and mounts it; read-only
    /// attaches the loop device read-only too, so not even journal replay can change the
    /// image. The image is left in place on drop.
    pub fn attach(image: &Path, mount_point: &Path, read_only: bool) -> LoopFs {
        LoopFs::attach_inner(image, mount_point, read_only, false)
    }

    fn attach_inner(image: &Path, mount_point: &Path, read_only: bool, owns_image: bool) -> LoopFs {
        let made_mount_point = !mount_point.exists();
        fs::create_dir_all(mount_point)
            .unwrap_or_else(|e| panic!("mkdir {}: {e}", mount_point.display()));
        let mut fs = LoopFs {
            image: image.to_owned(),
            mount_point: mount_point.to_owned(),
            device: None,
            dev: None,
            owns_image,
            made_mount_point,
        };
        let mut losetup = tool("losetup");
        losetup.args(["--find", "--show"]);
        if read_only {
            losetup.arg("--read-only");
        }
        let device = check(losetup.arg(image)).trim().to_owned();
        assert!(
            device.starts_with("/dev/loop"),
            "losetup printed {device:?}"
        );
        fs.device = Some(device.clone());
        let mut mount = tool("mount");
        if read_only {
            mount.args(["-o", "ro"]);
        }
        check(mount.arg(&device).arg(mount_point));
        let dev = rdev_of(&device);
        assert_eq!(
            dev_of(mount_point),
            dev,
            "{} is not the filesystem of {device} after mounting it",
            mount_point.display()
        );
        fs.dev = Some(dev);
        fs
    }

    pub fn mount_point(&self) -> &Path {
        &self.mount_point
    }

    /// A path inside the mounted filesystem.
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.mount_point.join(rel)
    }

    pub fn image(&self) -> &Path {
        &self.image
    }

    /// `/dev/loopN`.
    pub fn device(&self) -> &str {
        self.device.as_deref().expect("attached")
    }

    /// The filesystem's device number (`st_dev` of every file in it).
    pub fn dev(&self) -> DevId {
        self.dev.expect("mounted")
    }

    /// Whether the mount point still holds this loop device's filesystem.
    fn mounted_here(&self) -> bool {
        let (Some(device), Some(dev)) = (&self.device, self.dev) else {
            return false;
        };
        mount_at(&self.mount_point).is_some_and(|e| &e.source == device && e.dev == dev)
    }

    /// Opens the mount point, checking that it is this loop filesystem and nothing else (never
    /// the directory of the filesystem below an unmounted mount point).
    fn open_checked(&self) -> OwnedFd {
        assert!(
            self.mounted_here(),
            "{} is not mounted from {:?} any more",
            self.mount_point.display(),
            self.device
        );
        let fd = open_mount_point(&self.mount_point)
            .unwrap_or_else(|e| panic!("open {}: {e}", self.mount_point.display()));
        let file = File::from(fd.try_clone().expect("dup"));
        let dev = DevId::from_raw(file.metadata().expect("fstat").dev());
        assert_eq!(
            dev,
            self.dev(),
            "{} changed under the test",
            self.mount_point.display()
        );
        fd
    }

    /// Whether the filesystem is frozen right now, by anyone. Probes with FIFREEZE: EBUSY means
    /// frozen (nothing changes); success means it was not, and it is thawed again at once.
    pub fn is_frozen(&self) -> bool {
        let fd = self.open_checked();
        match IoctlFreezer.freeze(fd.as_fd()) {
            Ok(()) => {
                IoctlFreezer.thaw(fd.as_fd()).unwrap_or_else(|e| {
                    panic!("thaw after probing {}: {e}", self.mount_point.display())
                });
                false
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => true,
            Err(e) => panic!("FIFREEZE probe of {}: {e}", self.mount_point.display()),
        }
    }

    /// Freezes it behind the agent's back, as another tool would (`fsfreeze -f`).
    pub fn freeze_externally(&self) {
        drop(self.open_checked());
        check(tool("fsfreeze").arg("-f").arg(&self.mount_point));
    }

    /// `fsfreeze -u`; `true` when it thawed something, `false` when it was not frozen.
    pub fn thaw_externally(&self) -> bool {
        drop(self.open_checked());
        quiet(tool("fsfreeze").arg("-u").arg(&self.mount_point))
    }

    /// Flushes the whole filesystem (`syncfs`), so an image clone sees what was written.
    pub fn sync(&self) {
        let fd = self.open_checked();
        IoctlFreezer
            .syncfs(fd.as_fd())
            .unwrap_or_else(|e| panic!("syncfs {}: {e}", self.mount_point.display()));
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if self.mounted_here() {
            // Thaw before unmounting: an unmount of a frozen filesystem would wait for ever.
            quiet(tool("fsfreeze").arg("-u").arg(&self.mount_point));
            unmount(&self.mount_point, || self.mounted_here());
        }
        if let Some(device) = &self.device {
            // With a lazy unmount still pending, this sets autoclear instead.
            quiet(tool("losetup").arg("-d").arg(device));
        }
        if !self.mounted_here() {
            if self.owns_image {
                let _ = fs::remove_file(&self.image);
            }
            if self.made_mount_point && mount_at(&self.mount_point).is_none() {
                let _ = fs::remove_dir(&self.mount_point);
            }
        }
    }
}

/// An XFS reflink filesystem holding the images of ext4 volumes that are themselves
/// loop-mounted: the setup under which the `reflink` provider works. Owns its volumes and any
/// image attached from it, and drops them before itself.
pub struct Pool {
    attached: Vec<LoopFs>,
    volumes: Vec<(String, LoopFs)>,
    fs: LoopFs,
}

impl Pool {
    /// A sparse pool of `size_mb` MiB: `scratch/pool.img` mounted at `scratch/pool`.
    pub fn create(scratch: &Scratch, size_mb: u64) -> Pool {
        assert!(
            find_tool("mkfs.xfs").is_some(),
            "mkfs.xfs is not installed (apt-get install xfsprogs)"
        );
        let fs = LoopFs::create(
            &scratch.join("pool.img"),
            size_mb,
            FsKind::XfsReflink,
            &scratch.join("pool"),
        );
        Pool {
            attached: Vec::new(),
            volumes: Vec::new(),
            fs,
        }
    }

    pub fn root(&self) -> &Path {
        self.fs.mount_point()
    }

    pub fn fs(&self) -> &LoopFs {
        &self.fs
    }

    /// An ext4 volume whose image is `<pool>/<name>.img`, mounted at `mount_point`.
    pub fn add_volume(&mut self, name: &str, size_mb: u64, mount_point: &Path) -> &LoopFs {
        let image = self.root().join(format!("{name}.img"));
        let volume = LoopFs::create(&image, size_mb, FsKind::Ext4, mount_point);
        self.volumes.push((name.to_owned(), volume));
        &self.volumes.last().expect("just pushed").1
    }

    pub fn volume(&self, name: &str) -> &LoopFs {
        self.volumes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("no volume {name} in the pool"))
    }

    pub fn volumes(&self) -> impl Iterator<Item = (&str, &LoopFs)> {
        self.volumes.iter().map(|(n, v)| (n.as_str(), v))
    }

    /// Attaches an image (a snapshot or a restored image, normally inside the pool) and mounts
    /// it; it is unmounted before the pool is.
    pub fn attach(&mut self, image: &Path, mount_point: &Path, read_only: bool) -> &LoopFs {
        self.attached
            .push(LoopFs::attach(image, mount_point, read_only));
        self.attached.last().expect("just pushed")
    }
}

/// A tmpfs mounted for the test (the agent's state directory must be on one).
pub struct Tmpfs {
    path: PathBuf,
}

/// Source name of the harness's tmpfs mounts, so that drop only unmounts its own.
const TMPFS_SOURCE: &str = "quiesce-it";

impl Tmpfs {
    pub fn mount(path: &Path, size_mb: u64) -> Tmpfs {
        fs::create_dir_all(path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        check(
            tool("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size_mb}m,mode=0700")])
                .arg(TMPFS_SOURCE)
                .arg(path),
        );
        Tmpfs {
            path: path.to_owned(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.path.join(rel)
    }

    fn mounted_here(&self) -> bool {
        mount_at(&self.path).is_some_and(|e| e.fs_type == "tmpfs" && e.source == TMPFS_SOURCE)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        unmount(&self.path, || self.mounted_here());
        if mount_at(&self.path).is_none() {
            let _ = fs::remove_dir(&self.path);
        }
    }
}

/// `mount --bind SOURCE TARGET`: a second mount point (an alias) of the same filesystem.
pub struct BindMount {
    target: PathBuf,
    dev: DevId,
}

impl BindMount {
    pub fn new(source: &Path, target: &Path) -> BindMount {
        fs::create_dir_all(target).unwrap_or_else(|e| panic!("mkdir {}: {e}", target.display()));
        check(tool("mount").arg("--bind").arg(source).arg(target));
        let dev = dev_of(target);
        assert_eq!(dev, dev_of(source), "bind mount shows another filesystem");
        BindMount {
            target: target.to_owned(),
            dev,
        }
    }

    pub fn path(&self) -> &Path {
        &self.target
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        unmount(&self.target, || {
            mount_at(&self.target).is_some_and(|e| e.dev == self.dev)
        });
        if mount_at(&self.target).is_none() {
            let _ = fs::remove_dir(&self.target);
        }
    }
}
