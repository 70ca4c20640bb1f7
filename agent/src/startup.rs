//! The one check of a config against this host, shared by `check-config` and `run`: both
//! refuse exactly the same things (exit 64).
//!
//! Refused: every problem of the config itself; a state directory not on tmpfs; a listed
//! volume that cannot be frozen as things are now (not mounted; the root filesystem or the one
//! holding the agent's own files, by superblock; an unsupported filesystem; a path a non-root
//! user could redirect); hook files that are not private to root (secrets, script
//! directories and their whole path); a config that defines hooks and is readable by others.
//! Every freeze checks its volumes again: what is mounted can change after the start.

use std::path::Path;

use crate::config::Config;
use crate::error::error_chain;
use crate::mounts::ProcMountTable;
use crate::records::is_memory_fs;
use crate::volumes::{AgentFiles, resolve};

/// What the check found: each problem refuses the config.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub problems: Vec<String>,
}

impl Report {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Whether the state directory is (or, once `run` makes it, will be) on tmpfs: a missing
/// directory counts as its parent's filesystem, since [`ensure_state_dir`] makes it there.
fn state_dir_fs(dir: &Path) -> std::io::Result<bool> {
    match dir.try_exists() {
        Ok(false) => match dir.parent() {
            Some(parent) => is_memory_fs(parent).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("does not exist, and neither does a tmpfs at its parent {} to make it on ({e})", parent.display()),
                )
            }),
            None => Ok(false),
        },
        _ => is_memory_fs(dir),
    }
}

/// Makes the state directory (0700) when it is missing and its parent is on tmpfs — `/run`
/// after a reboot on a host without systemd's `RuntimeDirectory=`. Never on a disk
/// filesystem: there the start is refused instead (see [`check`]). Returns whether it made it.
pub fn ensure_state_dir(dir: &Path) -> std::io::Result<bool> {
    if dir.try_exists()? {
        return Ok(false);
    }
    let Some(parent) = dir.parent() else {
        return Ok(false);
    };
    if !is_memory_fs(parent)? {
        return Ok(false);
    }
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Checks `config` (read from `config_path`) against this host.
pub fn check(config_path: &Path, config: &Config, insecure: bool) -> Report {
    let mut report = Report {
        problems: config.problems(insecure),
    };
    match state_dir_fs(&config.state_dir) {
        Ok(true) => {}
        Ok(false) => report.problems.push(format!(
            "state-dir {} is not on tmpfs: freeze records must never be written to a disk filesystem (on a host whose /run is not tmpfs, mount one: `mount -t tmpfs -o mode=0700,size=8m tmpfs {}`, or set state-dir to a directory on a tmpfs)",
            config.state_dir.display(),
            config.state_dir.display()
        )),
        Err(e) => report
            .problems
            .push(format!("state-dir {}: {e}", config.state_dir.display())),
    }
    let table = ProcMountTable::host();
    let files = AgentFiles::discover(&config.state_dir);
    for volume in &config.volumes {
        if let Err(e) = resolve(config, &table, &files, &volume.mount) {
            report.problems.push(error_chain(&e));
        }
    }
    for (name, hook) in &config.hooks {
        report.problems.extend(hook.file_problems(name));
    }
    if !config.hooks.is_empty()
        && let Err(e) = crate::hooks::check_private_file(config_path)
    {
        report
            .problems
            .push(format!("config file (it defines hooks): {e}"));
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_state_dir_is_made_only_on_tmpfs() {
        // /dev/shm is a tmpfs on Linux hosts; the work tree is on a disk filesystem.
        let shm = Path::new("/dev/shm");
        if is_memory_fs(shm).unwrap_or(false) {
            let dir = shm.join(format!("quiesce-state-test-{}", std::process::id()));
            let _ = std::fs::remove_dir(&dir);
            assert!(
                state_dir_fs(&dir).unwrap(),
                "a missing dir on tmpfs will be made"
            );
            assert!(ensure_state_dir(&dir).unwrap());
            assert!(dir.is_dir());
            assert!(!ensure_state_dir(&dir).unwrap(), "made once");
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700);
            std::fs::remove_dir(&dir).unwrap();
        }
        let disk = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let dir = disk.path().join("state");
        if !is_memory_fs(disk.path()).unwrap() {
            assert!(!state_dir_fs(&dir).unwrap(), "refused on disk");
            assert!(!ensure_state_dir(&dir).unwrap());
            assert!(!dir.exists(), "never made on a disk filesystem");
        }
    }
}
