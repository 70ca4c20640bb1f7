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

/// Checks `config` (read from `config_path`) against this host.
pub fn check(config_path: &Path, config: &Config, insecure: bool) -> Report {
    let mut report = Report {
        problems: config.problems(insecure),
    };
    match is_memory_fs(&config.state_dir) {
        Ok(true) => {}
        Ok(false) => report.problems.push(format!(
            "state-dir {} is not on tmpfs: freeze records must never be written to a disk filesystem",
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
