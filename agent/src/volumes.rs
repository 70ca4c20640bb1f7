//! Turning a requested mount point into a filesystem the agent may freeze — or a refusal that
//! says why not.

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::error::Error;
use crate::mounts::{DevId, FREEZABLE_FS_TYPES, MountEntry, MountTable, is_freezable};

/// A mount point that passed every check: allowed by config, mounted, freezable, not the root
/// filesystem and not holding anything the agent itself needs while frozen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub mount_point: PathBuf,
    pub entry: MountEntry,
    pub backing_file: Option<PathBuf>,
}

impl Volume {
    pub fn dev(&self) -> DevId {
        self.entry.dev
    }
}

/// Files the agent touches while a freeze is held. A volume holding any of them is refused:
/// freezing it would hang the agent on its own filesystem.
#[derive(Debug, Clone, Default)]
pub struct AgentFiles {
    root: Option<DevId>,
    files: Vec<(&'static str, PathBuf, DevId)>,
}

impl AgentFiles {
    /// What this process really uses: `/`, the state directory, its binary and, when stderr is
    /// a regular file, the log it writes to.
    pub fn discover(state_dir: &Path) -> AgentFiles {
        let mut files = AgentFiles {
            root: DevId::of_path(Path::new("/")).ok(),
            files: Vec::new(),
        };
        files.add("state directory", state_dir);
        if let Ok(exe) = std::fs::read_link("/proc/self/exe") {
            files.add("binary", &exe);
        }
        if let Ok(log) = std::fs::read_link("/proc/self/fd/2")
            && log.is_file()
        {
            files.add("log file", &log);
        }
        files
    }

    pub fn add(&mut self, what: &'static str, path: &Path) {
        if let Ok(dev) = DevId::of_path(path) {
            self.files.push((what, path.to_owned(), dev));
        }
    }

    pub fn with_root(mut self, dev: DevId) -> Self {
        self.root = Some(dev);
        self
    }

    fn refuse(&self, mount: &Path, dev: DevId) -> Result<(), Error> {
        if mount == Path::new("/") || self.root == Some(dev) {
            return Err(Error::RootFilesystem {
                mount: mount.to_owned(),
            });
        }
        if let Some((what, path, _)) = self.files.iter().find(|(_, _, held)| *held == dev) {
            return Err(Error::HoldsAgentFile {
                mount: mount.to_owned(),
                what,
                path: path.clone(),
            });
        }
        Ok(())
    }
}

/// Resolves one mount point through the mount table and applies every refusal rule.
pub fn resolve(
    config: &Config,
    table: &dyn MountTable,
    agent_files: &AgentFiles,
    mount: &Path,
) -> Result<Volume, Error> {
    if !config.is_allowed(mount) {
        return Err(Error::NotAllowed {
            mount: mount.to_owned(),
            allowed: config.allowed_list(),
        });
    }
    let entry = table.at(mount)?.ok_or_else(|| Error::NotMounted {
        mount: mount.to_owned(),
    })?;
    agent_files.refuse(mount, entry.dev)?;
    if !is_freezable(&entry.fs_type) {
        return Err(Error::UnsupportedFs {
            mount: mount.to_owned(),
            fs_type: entry.fs_type.clone(),
            supported: FREEZABLE_FS_TYPES.join(", "),
        });
    }
    let backing_file = table.loop_backing_file(entry.dev);
    Ok(Volume {
        mount_point: mount.to_owned(),
        entry,
        backing_file,
    })
}

/// Resolves a request's mount points: each must pass `resolve`; aliases of one filesystem
/// (bind mounts, a device mounted twice) collapse into one volume, frozen once. The result is
/// in the stable freeze order (by mount point).
pub fn resolve_all(
    config: &Config,
    table: &dyn MountTable,
    agent_files: &AgentFiles,
    mounts: &[PathBuf],
) -> Result<Vec<Volume>, Error> {
    if mounts.is_empty() {
        return Err(Error::InvalidArgument("no mount points named".into()));
    }
    let mut volumes: Vec<Volume> = Vec::new();
    for mount in mounts {
        let volume = resolve(config, table, agent_files, mount)?;
        if !volumes.iter().any(|known| known.dev() == volume.dev()) {
            volumes.push(volume);
        }
    }
    volumes.sort_by(|a, b| a.mount_point.cmp(&b.mount_point));
    Ok(volumes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mounts::{MountError, parse_mountinfo};

    struct Table(Vec<MountEntry>);

    impl MountTable for Table {
        fn entries(&self) -> Result<Vec<MountEntry>, MountError> {
            Ok(self.0.clone())
        }
        fn loop_backing_file(&self, dev: DevId) -> Option<PathBuf> {
            (dev.major == 7).then(|| PathBuf::from(format!("/pool/{}.img", dev.minor)))
        }
    }

    fn table() -> Table {
        Table(
            parse_mountinfo(
                "22 1 254:0 / / rw - ext4 /dev/vda rw
30 22 0:25 / /run/q rw - tmpfs tmpfs rw
41 22 7:0 / /mnt/data rw - ext4 /dev/loop0 rw
42 22 7:0 / /mnt/alias rw - ext4 /dev/loop0 rw
43 22 7:1 / /mnt/wal rw - xfs /dev/loop1 rw
44 22 7:2 / /mnt/state rw - ext4 /dev/loop2 rw
",
            )
            .unwrap(),
        )
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
        let mut files = AgentFiles::default().with_root(DevId {
            major: 254,
            minor: 0,
        });
        files.files.push((
            "state directory",
            "/mnt/state/run".into(),
            DevId { major: 7, minor: 2 },
        ));
        files
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
            &paths(&["/mnt/wal", "/mnt/alias", "/mnt/data"]),
        )
        .unwrap();
        let mounts: Vec<_> = volumes.iter().map(|v| v.mount_point.clone()).collect();
        assert_eq!(mounts, paths(&["/mnt/alias", "/mnt/wal"]));
        assert_eq!(volumes[0].backing_file, Some(PathBuf::from("/pool/0.img")));
    }

    #[test]
    fn refusals_name_the_mount_and_the_reason() {
        let config = config(&["/", "/run/q", "/mnt/state", "/mnt/nowhere", "/mnt/data"]);
        let check = |mount: &str| {
            resolve(&config, &table(), &files(), Path::new(mount))
                .unwrap_err()
                .to_string()
        };
        assert!(check("/").contains("root filesystem"));
        assert!(check("/run/q").contains("tmpfs, which cannot be frozen"));
        assert!(check("/mnt/state").contains("holds the agent's state directory"));
        assert!(check("/mnt/nowhere").contains("not a mount point"));
        let not_allowed = check("/mnt/alias");
        assert!(
            not_allowed.contains("/mnt/alias is not an allowed volume"),
            "{not_allowed}"
        );
    }
}
