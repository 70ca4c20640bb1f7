//! Turning a requested mount point into a filesystem the agent may freeze — or a refusal that
//! says why not.
//!
//! Identity is by descriptor and by superblock, never by name: each listed mount is opened
//! once with no symlink anywhere on its path and every directory above it safe from non-root
//! users (`safepath`); the descriptor must be the root of the mount `/proc/self/mountinfo`
//! lists at that path (its `statx` mount id names the entry); "the same filesystem" means the
//! same superblock (the entry's `major:minor`), so bind mounts, a device mounted twice and the
//! subvolumes of one btrfs are one filesystem. Every ioctl then goes through that descriptor.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::Config;
use crate::error::Error;
use crate::mounts::{DevId, FREEZABLE_FS_TYPES, MountEntry, MountTable, by_mount_id, is_freezable};
use crate::safepath::{self, MAX_PATH_BYTES};

/// A mount point that passed every check: allowed by config, the root of the mount listed
/// there, freezable, not the root filesystem and not holding anything the agent itself needs
/// while frozen. `fd` is the descriptor every ioctl on it goes through.
#[derive(Debug, Clone)]
pub struct Volume {
    pub mount_point: PathBuf,
    /// Every requested path that named this superblock (the mount point included).
    pub aliases: Vec<PathBuf>,
    pub entry: MountEntry,
    pub backing_file: Option<PathBuf>,
    pub fd: Arc<OwnedFd>,
}

impl Volume {
    /// The superblock.
    pub fn dev(&self) -> DevId {
        self.entry.dev
    }
}

/// How an agent file is identified: a descriptor held open (the real agent), or a superblock
/// given outright (unit tests).
#[derive(Debug, Clone)]
enum FileId {
    Held(Arc<OwnedFd>),
    Superblock(DevId),
    /// Could not be opened: every freeze is refused, naming it (fail safe).
    Unknown(String),
}

#[derive(Debug, Clone)]
struct AgentFile {
    what: &'static str,
    path: PathBuf,
    id: FileId,
}

/// Files the agent touches while a freeze is held. A volume on the superblock of any of them is
/// refused: freezing it would hang the agent on its own filesystem. `/` is one of them.
#[derive(Debug, Clone, Default)]
pub struct AgentFiles {
    files: Vec<AgentFile>,
}

const ROOT: &str = "root filesystem";

impl AgentFiles {
    /// What this process really uses: `/`, the state directory, its binary and, when stderr or
    /// stdout is a regular file, the log it writes to. Each is held open (`O_PATH`), so its
    /// superblock is found through its mount id at every check, whatever is renamed since.
    pub fn discover(state_dir: &Path) -> AgentFiles {
        let mut files = AgentFiles::default();
        files.hold(ROOT, Path::new("/"));
        files.hold("state directory", state_dir);
        let exe = std::fs::read_link("/proc/self/exe").unwrap_or_else(|_| "(binary)".into());
        files.hold_as("binary", Path::new("/proc/self/exe"), exe);
        for (fd, what) in [(2, "log file"), (1, "output file")] {
            let link = format!("/proc/self/fd/{fd}");
            if let Ok(target) = std::fs::read_link(&link)
                && std::fs::metadata(&link).is_ok_and(|m| m.is_file())
            {
                files.hold_as(what, Path::new(&link), target);
            }
        }
        files
    }

    /// Holds `path` open to identify its filesystem later. A path that cannot be opened is
    /// still listed: every freeze is then refused, naming it (fail safe).
    pub fn hold(&mut self, what: &'static str, path: &Path) {
        self.hold_as(what, path, path.to_owned());
    }

    fn hold_as(&mut self, what: &'static str, open_path: &Path, shown: PathBuf) {
        use nix::fcntl::{OFlag, open};
        let flags = OFlag::O_PATH | OFlag::O_CLOEXEC;
        let id = match open(open_path, flags, nix::sys::stat::Mode::empty()) {
            Ok(fd) => FileId::Held(Arc::new(fd)),
            Err(e) => FileId::Unknown(format!("cannot open it: {e}")),
        };
        self.files.push(AgentFile {
            what,
            path: shown,
            id,
        });
    }

    /// Tests: the root filesystem is this superblock.
    pub fn with_root(self, dev: DevId) -> Self {
        self.with_file(ROOT, Path::new("/"), dev)
    }

    /// Tests: `what` (at `path`) lives on superblock `dev`.
    pub fn with_file(mut self, what: &'static str, path: &Path, dev: DevId) -> Self {
        self.files.push(AgentFile {
            what,
            path: path.to_owned(),
            id: FileId::Superblock(dev),
        });
        self
    }

    /// The superblock of every agent file, from `entries` (read after the volumes were opened).
    fn superblocks(&self, entries: &[MountEntry]) -> Result<Vec<(&AgentFile, DevId)>, Error> {
        self.files
            .iter()
            .map(|file| {
                let dev = match &file.id {
                    FileId::Superblock(dev) => *dev,
                    FileId::Unknown(why) => {
                        return Err(Error::AgentFileUnknown {
                            what: file.what,
                            path: file.path.clone(),
                            why: why.clone(),
                        });
                    }
                    FileId::Held(fd) => {
                        let mount =
                            safepath::mount_of_fd(fd.as_fd(), &file.path).map_err(|source| {
                                Error::AgentFileUnknown {
                                    what: file.what,
                                    path: file.path.clone(),
                                    why: source.to_string(),
                                }
                            })?;
                        match by_mount_id(entries, mount.mount_id) {
                            Some(entry) => entry.dev,
                            // A descriptor inherited from another mount namespace (a log file
                            // opened by whoever started the agent) lives on a mount this
                            // namespace does not list. Its st_dev then names its superblock,
                            // except on btrfs, whose st_dev is per subvolume: there, fail safe.
                            None => foreign_superblock(fd.as_fd(), mount.st_dev).map_err(
                                |why| Error::AgentFileUnknown {
                                    what: file.what,
                                    path: file.path.clone(),
                                    why: format!(
                                        "mount {} is not in this namespace's mountinfo, and {why}",
                                        mount.mount_id
                                    ),
                                },
                            )?,
                        }
                    }
                };
                Ok((file, dev))
            })
            .collect()
    }
}

/// The superblock of a file whose mount is not in this namespace, from its `st_dev`, on
/// filesystems where `st_dev` is the superblock's number. Err says why it cannot be told.
fn foreign_superblock(
    fd: std::os::fd::BorrowedFd<'_>,
    (major, minor): (u32, u32),
) -> Result<DevId, String> {
    let fs = nix::sys::statfs::fstatfs(fd).map_err(|e| format!("fstatfs failed: {e}"))?;
    let magic = fs.filesystem_type();
    if magic == nix::sys::statfs::BTRFS_SUPER_MAGIC
        || magic == nix::sys::statfs::OVERLAYFS_SUPER_MAGIC
    {
        return Err(format!(
            "its st_dev {major}:{minor} does not name a superblock on that filesystem type (0x{:x})",
            magic.0
        ));
    }
    Ok(DevId { major, minor })
}

fn refuse_agent_files(mount: &Path, dev: DevId, own: &[(&AgentFile, DevId)]) -> Result<(), Error> {
    if mount == Path::new("/") {
        return Err(Error::RootFilesystem {
            mount: mount.to_owned(),
        });
    }
    match own.iter().find(|(_, held)| *held == dev) {
        Some((file, _)) if file.what == ROOT => Err(Error::RootFilesystem {
            mount: mount.to_owned(),
        }),
        Some((file, _)) => Err(Error::HoldsAgentFile {
            mount: mount.to_owned(),
            what: file.what,
            path: file.path.clone(),
        }),
        None => Ok(()),
    }
}

/// The request-side checks that cost nothing: how many, how long, and listed in the config.
/// Made first, so an oversized request is refused before any work.
pub fn check_request(config: &Config, mounts: &[PathBuf]) -> Result<(), Error> {
    if mounts.is_empty() {
        return Err(Error::InvalidArgument("no mount points named".into()));
    }
    let max = config.max_volumes_per_request;
    if mounts.len() > max {
        return Err(Error::OverLimit {
            what: "mount points in one request",
            got: mounts.len(),
            max,
            limit: "max-volumes-per-request",
        });
    }
    for mount in mounts {
        let len = mount.as_os_str().len();
        if len > MAX_PATH_BYTES {
            return Err(Error::OverLimit {
                what: "bytes in a mount point path",
                got: len,
                max: MAX_PATH_BYTES,
                limit: "PATH_MAX",
            });
        }
        if !config.is_allowed(mount) {
            return Err(Error::NotAllowed {
                mount: crate::error::capped_path(mount),
                allowed: config.allowed_list(),
            });
        }
    }
    Ok(())
}

/// Resolves one mount point and applies every refusal rule.
pub fn resolve(
    config: &Config,
    table: &dyn MountTable,
    agent_files: &AgentFiles,
    mount: &Path,
) -> Result<Volume, Error> {
    let mut volumes = resolve_all(config, table, agent_files, &[mount.to_owned()])?;
    Ok(volumes.remove(0))
}

/// Resolves a request's mount points: each must pass every check; aliases of one superblock
/// (bind mounts, a device mounted twice, subvolumes of one btrfs) collapse into one volume,
/// frozen once. The result is in the stable freeze order (by mount point). Blocking: call it
/// off the async runtime.
pub fn resolve_all(
    config: &Config,
    table: &dyn MountTable,
    agent_files: &AgentFiles,
    mounts: &[PathBuf],
) -> Result<Vec<Volume>, Error> {
    check_request(config, mounts)?;
    let mut unique: Vec<&PathBuf> = Vec::with_capacity(mounts.len());
    for mount in mounts {
        if !unique.contains(&mount) {
            unique.push(mount);
        }
    }
    // Open first, then read the table: every mount a descriptor is on is listed in it.
    let mut opened = Vec::with_capacity(unique.len());
    for mount in unique {
        let handle = table.open_mount(mount).map_err(|source| {
            if source.is_not_found() {
                Error::NotMounted {
                    mount: mount.clone(),
                }
            } else {
                Error::UnsafePath {
                    mount: mount.clone(),
                    source,
                }
            }
        })?;
        opened.push((mount, handle));
    }
    let entries = table.entries()?;
    let own = agent_files.superblocks(&entries)?;
    let mut volumes: Vec<Volume> = Vec::new();
    for (mount, handle) in opened {
        let entry = by_mount_id(&entries, handle.mount_id)
            .filter(|entry| handle.is_mount_root && entry.mount_point == *mount)
            .ok_or_else(|| Error::NotMounted {
                mount: mount.clone(),
            })?
            .clone();
        refuse_agent_files(mount, entry.dev, &own)?;
        if !is_freezable(&entry.fs_type) {
            return Err(Error::UnsupportedFs {
                mount: mount.clone(),
                fs_type: entry.fs_type.clone(),
                supported: FREEZABLE_FS_TYPES.join(", "),
            });
        }
        match volumes.iter_mut().find(|known| known.dev() == entry.dev) {
            Some(known) => known.aliases.push(mount.clone()),
            None => volumes.push(Volume {
                mount_point: mount.clone(),
                aliases: vec![mount.clone()],
                backing_file: table.loop_backing_file(entry.dev),
                entry,
                fd: Arc::new(handle.fd),
            }),
        }
    }
    volumes.sort_by(|a, b| a.mount_point.cmp(&b.mount_point));
    Ok(volumes)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::mounts::{MountError, OpenedMount, parse_mountinfo};
    use crate::safepath::PathError;

    #[test]
    fn a_file_outside_this_namespace_is_known_by_its_st_dev_except_on_btrfs() {
        use std::os::unix::fs::MetadataExt;
        let file = tempfile::NamedTempFile::new().unwrap();
        let meta = file.as_file().metadata().unwrap();
        let fs = nix::sys::statfs::fstatfs(file.as_file()).unwrap();
        let st_dev = (libc::major(meta.dev()), libc::minor(meta.dev()));
        let got = foreign_superblock(file.as_file().as_fd(), st_dev);
        if fs.filesystem_type() == nix::sys::statfs::BTRFS_SUPER_MAGIC {
            let why = got.unwrap_err();
            assert!(why.contains("does not name a superblock"), "{why}");
        } else {
            let dev = got.unwrap();
            assert_eq!((dev.major, dev.minor), st_dev);
        }
    }

    /// A mount table whose mount points are real directories (so they can be opened) and whose
    /// mount ids are the entries'. `open_mount` opens by name: the fake stands in for the
    /// kernel's answers, not for the path checks (`safepath` has its own tests).
    pub(crate) struct FakeTable {
        pub entries: Vec<MountEntry>,
        /// Paths that open but are the root of no mount (a plain directory).
        pub plain: Vec<PathBuf>,
    }

    impl MountTable for FakeTable {
        fn entries(&self) -> Result<Vec<MountEntry>, MountError> {
            Ok(self.entries.clone())
        }
        fn loop_backing_file(&self, dev: DevId) -> Option<PathBuf> {
            (dev.major == 7).then(|| PathBuf::from(format!("/pool/{}.img", dev.minor)))
        }
        fn open_mount(&self, path: &Path) -> Result<OpenedMount, PathError> {
            fake_open(&self.entries, &self.plain, path)
        }
    }

    /// What the kernel would answer for a fake table: the topmost entry at `path`.
    pub(crate) fn fake_open(
        entries: &[MountEntry],
        plain: &[PathBuf],
        path: &Path,
    ) -> Result<OpenedMount, PathError> {
        let entry = entries.iter().rev().find(|e| e.mount_point == path);
        if entry.is_none() && !plain.iter().any(|p| p == path) {
            return Err(PathError::Open {
                path: path.to_owned(),
                component: path.to_owned(),
                source: std::io::Error::from_raw_os_error(libc::ENOENT),
            });
        }
        // The directory itself when it exists (the fake freezer tells volumes apart by the
        // path of their descriptor), else any directory.
        let flags = nix::fcntl::OFlag::O_RDONLY
            | nix::fcntl::OFlag::O_DIRECTORY
            | nix::fcntl::OFlag::O_CLOEXEC;
        let mode = nix::sys::stat::Mode::empty();
        let fd = nix::fcntl::open(path, flags, mode)
            .or_else(|_| nix::fcntl::open("/", flags, mode))
            .unwrap();
        Ok(OpenedMount {
            fd,
            mount_id: entry.map(|e| e.mount_id).unwrap_or(u64::MAX),
            is_mount_root: entry.is_some(),
        })
    }

    fn table() -> FakeTable {
        FakeTable {
            entries: parse_mountinfo(
                "22 1 254:0 / / rw - ext4 /dev/vda rw
30 22 0:25 / /run/q rw - tmpfs tmpfs rw
41 22 7:0 / /mnt/data rw - ext4 /dev/loop0 rw
42 22 7:0 / /mnt/alias rw - ext4 /dev/loop0 rw
43 22 7:1 / /mnt/wal rw - xfs /dev/loop1 rw
44 22 7:2 / /mnt/state rw - ext4 /dev/loop2 rw
45 22 0:40 /@home /home rw - btrfs /dev/vdb rw
",
            )
            .unwrap(),
            plain: vec!["/mnt/plain".into()],
        }
    }

    fn config(mounts: &[&str]) -> Config {
        let mut config = Config::parse("listen = \"127.0.0.1:1\"\nstate-dir = \"/run/q\"").unwrap();
        config.volumes = mounts
            .iter()
            .map(|m| crate::config::VolumeConfig {
                mount: m.into(),
                ebs_volume_id: None,
            })
            .collect();
        config
    }

    fn files() -> AgentFiles {
        AgentFiles::default()
            .with_root(DevId {
                major: 254,
                minor: 0,
            })
            .with_file(
                "state directory",
                Path::new("/mnt/state/run"),
                DevId { major: 7, minor: 2 },
            )
    }

    fn paths(list: &[&str]) -> Vec<PathBuf> {
        list.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn aliases_of_one_filesystem_are_frozen_once_in_stable_order() {
        let config = config(&["/mnt/wal", "/mnt/data", "/mnt/alias"]);
        let volumes = resolve_all(
            &config,
            &table(),
            &files(),
            &paths(&["/mnt/wal", "/mnt/alias", "/mnt/data", "/mnt/wal"]),
        )
        .unwrap();
        let mounts: Vec<_> = volumes.iter().map(|v| v.mount_point.clone()).collect();
        assert_eq!(mounts, paths(&["/mnt/alias", "/mnt/wal"]));
        assert_eq!(volumes[0].aliases, paths(&["/mnt/alias", "/mnt/data"]));
        assert_eq!(volumes[0].backing_file, Some(PathBuf::from("/pool/0.img")));
    }

    #[test]
    fn refusals_name_the_mount_and_the_reason() {
        let config = config(&[
            "/",
            "/run/q",
            "/mnt/state",
            "/mnt/nowhere",
            "/mnt/data",
            "/mnt/plain",
        ]);
        let check = |mount: &str| {
            crate::error::error_chain(
                &resolve(&config, &table(), &files(), Path::new(mount)).unwrap_err(),
            )
        };
        assert!(check("/").contains("root filesystem"));
        assert!(check("/run/q").contains("tmpfs, which cannot be frozen"));
        assert!(check("/mnt/state").contains("holds the agent's state directory"));
        assert!(check("/mnt/nowhere").contains("not a mount point"));
        assert!(check("/mnt/plain").contains("not a mount point"));
        let not_allowed = check("/mnt/alias");
        assert!(
            not_allowed.contains("/mnt/alias is not an allowed volume"),
            "{not_allowed}"
        );
    }

    #[test]
    fn another_subvolume_of_the_root_btrfs_is_the_root_filesystem() {
        // `/` is subvolume @ of the btrfs 0:40; /home is subvolume @home of the same one.
        let config = config(&["/home"]);
        let files = AgentFiles::default().with_root(DevId {
            major: 0,
            minor: 40,
        });
        let err = resolve(&config, &table(), &files, Path::new("/home")).unwrap_err();
        assert!(matches!(err, Error::RootFilesystem { .. }), "{err}");
    }

    #[test]
    fn requests_over_the_limits_are_refused_naming_the_limit() {
        let mut config = config(&["/mnt/data"]);
        config.max_volumes_per_request = 4;
        let many = vec![PathBuf::from("/mnt/data"); 5];
        let err = resolve_all(&config, &table(), &files(), &many).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("max-volumes-per-request"), "{text}");
        assert!(text.contains("5") && text.contains("at most 4"), "{text}");
        assert_eq!(
            tonic::Status::from(err).code(),
            tonic::Code::InvalidArgument
        );
        let long = PathBuf::from(format!("/{}", "x".repeat(MAX_PATH_BYTES)));
        let err = resolve_all(&config, &table(), &files(), &[long]).unwrap_err();
        assert!(err.to_string().contains("PATH_MAX"), "{err}");
        // A long but legal path that is not listed is echoed capped.
        let unlisted = PathBuf::from(format!("/{}", "y".repeat(2000)));
        let err = resolve_all(&config, &table(), &files(), &[unlisted]).unwrap_err();
        assert!(err.to_string().len() < 600, "{}", err.to_string().len());
    }

    #[test]
    fn an_agent_file_whose_filesystem_cannot_be_found_refuses_every_freeze() {
        let config = config(&["/mnt/data"]);
        let mut files = files();
        files.hold("state directory", Path::new("/nonexistent/quiesce-state"));
        let err = resolve(&config, &table(), &files, Path::new("/mnt/data")).unwrap_err();
        assert!(matches!(err, Error::AgentFileUnknown { .. }), "{err}");
        assert!(
            err.to_string().contains("/nonexistent/quiesce-state"),
            "{err}"
        );
    }
}
