//! Script hooks: a directory of root-owned executables, run in name order with the phase as
//! `argv[1]` — `prepare`, `freeze`, `thaw`, `freeze-fail` — the `freeze`/`thaw` convention of
//! qemu-guest-agent's fsfreeze-hook scripts, so existing scripts work unchanged.
//!
//! `freeze` runs in the quiesce phase (before FIFREEZE) and `thaw` in resume (after FITHAW):
//! no script ever runs while this set's filesystems are frozen. Environment: `QUIESCE_SET_ID`,
//! `QUIESCE_MOUNTS` (colon-separated), `QUIESCE_HOOK`, `PATH`. Working directory `/`. Each call
//! has its phase's timeout; on timeout the whole process group is killed. A non-zero exit fails
//! the set. Stdout lines `key=value` are kept as output (`SCRIPT.key`).
//!
//! Executed as checked: the directory's whole path (no symlink; every directory up to `/`
//! owned by root and not writable by group or others) and each script (a regular file owned
//! by root, not writable by group or others) are checked on descriptors at `check-config`, at
//! `run`, at prepare and again before every later run of a script, which must still be the
//! very file checked at prepare. What runs is the descriptor that was checked (`/proc/self/fd/N`,
//! the way `fexecve` runs a file), never the name looked up again.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::stat::FileStat;
use serde::Deserialize;

use super::{
    DbPath, Hook, HookContext, HookResult, HookSession, HookValues, Timeouts, effective_uid,
};
use crate::error::error_chain;
use crate::safepath;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ExecConfig {
    /// Directory of executables (owned by root, not writable by group or others).
    pub dir: PathBuf,
    #[serde(default = "super::default_prepare_timeout", with = "humantime_serde")]
    pub prepare_timeout: Duration,
    #[serde(default = "super::default_quiesce_timeout", with = "humantime_serde")]
    pub quiesce_timeout: Duration,
    #[serde(default = "super::default_resume_timeout", with = "humantime_serde")]
    pub resume_timeout: Duration,
    /// Which calling convention the scripts expect.
    #[serde(default)]
    pub convention: Convention,
}

/// How scripts are called.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Convention {
    /// Quiesce's own: `prepare`, `freeze`, then `thaw` (or `freeze-fail` when the freeze did
    /// not happen) in reverse name order, so a script that locked last unlocks first.
    #[default]
    Quiesce,
    /// qemu-guest-agent's `fsfreeze-hook`, exactly: only `freeze` and `thaw` (also when the
    /// freeze failed, as qemu-ga thaws then), both in name order. For scripts such as qemu's
    /// `mysql-flush.sh.sample`, which exit 1 on any other argument.
    Qemu,
}

impl ExecConfig {
    pub fn timeouts(&self) -> Timeouts {
        Timeouts {
            prepare: self.prepare_timeout,
            quiesce: self.quiesce_timeout,
            resume: self.resume_timeout,
        }
    }
}

/// One script of a hook directory, checked and held open: what runs is this file.
struct Script {
    /// `<dir>/<name>`, for messages and `argv[0]`.
    path: PathBuf,
    name: std::ffi::OsString,
    /// `O_PATH` descriptor of the file that was checked.
    fd: OwnedFd,
    /// Identity of that file (device, inode), compared at every later run.
    id: (u64, u64),
}

/// Refuses a script someone other than root could have changed (owner, mode).
fn check_script(path: &Path, stat: &FileStat) -> Result<(), String> {
    if !(stat.st_uid == 0 || stat.st_uid == effective_uid()) {
        return Err(format!(
            "{} is owned by uid {}, not by root (or the agent's uid {})",
            path.display(),
            stat.st_uid,
            effective_uid()
        ));
    }
    let mode = stat.st_mode & 0o7777;
    if mode & 0o022 != 0 {
        return Err(format!(
            "{} has mode {mode:04o}: group- or world-writable hooks are refused",
            path.display()
        ));
    }
    Ok(())
}

/// Suffixes of files qemu-ga's `fsfreeze-hook` never runs (backups, package-manager leftovers,
/// examples), skipped here too.
const SKIPPED_SUFFIXES: &[&str] = &[
    "~", ".bak", ".orig", ".rpmnew", ".rpmorig", ".rpmsave", ".sample",
];

fn hidden(name: &str) -> bool {
    name.starts_with('.')
        || name.contains(".dpkg-")
        || SKIPPED_SUFFIXES.iter().any(|suffix| name.ends_with(suffix))
}

/// Opens the hook directory with its whole path checked (`safepath::open_trusted_dir`: no
/// symlink, every directory up to `/` owned by root and not writable by group or others), and
/// every executable in it, checked on the descriptor. In name order; hidden files, backups
/// (`~`, `.dpkg-*`) and non-executable files are skipped; a symlink is refused.
fn open_scripts(dir: &Path) -> Result<Vec<Script>, String> {
    let dir_fd = safepath::open_trusted_dir(dir).map_err(|e| error_chain(&e))?;
    // Listed through the checked descriptor (its /proc link leads to the open directory),
    // not by name.
    let listing = format!("/proc/self/fd/{}", dir_fd.as_raw_fd());
    let cannot_list = |e: std::io::Error| format!("cannot list {}: {e}", dir.display());
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&listing).map_err(cannot_list)? {
        let name = entry.map_err(cannot_list)?.file_name();
        if !hidden(&name.to_string_lossy()) {
            names.push(name);
        }
    }
    names.sort();
    let mut scripts = Vec::new();
    for name in names {
        let (fd, stat) =
            safepath::open_in_dir(dir_fd.as_fd(), dir, &name).map_err(|e| error_chain(&e))?;
        let path = dir.join(&name);
        if !safepath::is_regular(&stat) || stat.st_mode & 0o111 == 0 {
            continue;
        }
        check_script(&path, &stat)?;
        scripts.push(Script {
            path,
            name,
            fd,
            id: (stat.st_dev, stat.st_ino),
        });
    }
    Ok(scripts)
}

/// The executables of a hook directory, in name order, after every check (for
/// `check-config`; a run uses the descriptors of its own check).
pub fn scripts(dir: &Path) -> Result<Vec<PathBuf>, String> {
    Ok(open_scripts(dir)?.into_iter().map(|s| s.path).collect())
}

/// Before every run of a script: the whole path checked again, and the file found there must
/// be the one checked at prepare. Returns a fresh descriptor of it.
fn recheck(dir: &Path, script: &Script) -> Result<OwnedFd, String> {
    let dir_fd = safepath::open_trusted_dir(dir).map_err(|e| error_chain(&e))?;
    let (fd, stat) =
        safepath::open_in_dir(dir_fd.as_fd(), dir, &script.name).map_err(|e| error_chain(&e))?;
    if !safepath::is_regular(&stat) || (stat.st_dev, stat.st_ino) != script.id {
        return Err(format!(
            "{} is not the file checked at prepare any more; refusing to run it",
            script.path.display()
        ));
    }
    check_script(&script.path, &stat)?;
    Ok(fd)
}

pub struct ExecHook {
    name: String,
    config: ExecConfig,
}

impl ExecHook {
    pub fn new(name: &str, config: ExecConfig) -> Self {
        ExecHook {
            name: name.into(),
            config,
        }
    }
}

#[tonic::async_trait]
impl Hook for ExecHook {
    fn kind(&self) -> &'static str {
        "exec"
    }

    async fn paths(&self) -> HookResult<Vec<DbPath>> {
        Ok(Vec::new())
    }

    async fn prepare(&self, ctx: &HookContext) -> HookResult<Box<dyn HookSession>> {
        // The list is fixed at prepare: nothing is read from disk once the freeze nears.
        let scripts = open_scripts(&self.config.dir)?;
        let mut session = ExecSession {
            hook: self.name.clone(),
            ctx: ctx.clone(),
            dir: self.config.dir.clone(),
            scripts,
            timeouts: self.config.timeouts(),
            convention: self.config.convention,
            frozen: 0,
            values: HookValues::default(),
        };
        if session.convention == Convention::Quiesce {
            for index in 0..session.scripts.len() {
                session.call(index, "prepare").await?;
            }
        }
        Ok(Box::new(session))
    }
}

struct ExecSession {
    hook: String,
    ctx: HookContext,
    dir: PathBuf,
    scripts: Vec<Script>,
    timeouts: Timeouts,
    convention: Convention,
    /// How many scripts' `freeze` call started (they get `thaw` or `freeze-fail`).
    frozen: usize,
    values: HookValues,
}

impl ExecSession {
    async fn call(&mut self, index: usize, phase: &'static str) -> HookResult<()> {
        let script = &self.scripts[index];
        let timeout = match phase {
            "prepare" => self.timeouts.prepare,
            "freeze" => self.timeouts.quiesce,
            _ => self.timeouts.resume,
        };
        let script_name = script.name.to_string_lossy().into_owned();
        // The first run (prepare) executes the descriptor just checked; every later one checks
        // the whole path again and that it still leads to that same file.
        let fd = if phase == "prepare" {
            script
                .fd
                .try_clone()
                .map_err(|e| format!("script {script_name}: {e}"))?
        } else {
            recheck(&self.dir, script).map_err(|e| format!("script {script_name} {phase}: {e}"))?
        };
        let script_path = script.path.clone();
        let mounts = self
            .ctx
            .mounts
            .iter()
            .map(|m| m.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        let stdout = run(
            &fd,
            &script_path,
            phase,
            &self.hook,
            &self.ctx.set_id,
            &mounts,
            timeout,
        )
        .await
        .map_err(|e| format!("script {script_name} {phase}: {e}"))?;
        for line in stdout.lines() {
            if let Some((key, value)) = line.split_once('=') {
                let key = key.trim();
                if !key.is_empty() && !key.contains(char::is_whitespace) {
                    self.values
                        .set(&format!("{script_name}.{key}"), value.trim_end());
                }
            }
        }
        Ok(())
    }
}

/// Runs one script call in its own process group; stdout on success.
///
/// The file executed is `script`, the descriptor that was checked, never a path looked up
/// again: the child execs `/proc/self/fd/N` (the kernel follows that link to the open file,
/// as `fexecve` does), with `N` kept open across the exec so that a `#!` interpreter can read
/// the script through it. `argv[0]` is `path`; a `#!` script sees `/proc/self/fd/N` as `$0`.
async fn run(
    script: &OwnedFd,
    path: &Path,
    phase: &str,
    hook: &str,
    set_id: &str,
    mounts: &str,
    timeout: Duration,
) -> Result<String, String> {
    let raw = script.as_raw_fd();
    let mut command = tokio::process::Command::new(format!("/proc/self/fd/{raw}"));
    command.arg0(path);
    // SAFETY: the closure runs in the child between fork and exec and calls only fcntl(2),
    // which is async-signal-safe; `raw` stays open in the parent until `spawn` returns.
    unsafe {
        command.pre_exec(move || {
            if libc::fcntl(raw, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
        .arg(phase)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("QUIESCE_SET_ID", set_id)
        .env("QUIESCE_MOUNTS", mounts)
        .env("QUIESCE_HOOK", hook)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(|e| format!("cannot start: {e}"))?;
    // Whether this call times out or the caller's phase deadline drops it, the script's whole
    // process group is killed (its group id is its pid: `process_group(0)`).
    let mut group = GroupKiller(child.id());
    // Output is collected on the side: a script may leave a background process holding its
    // stdout or stderr (qemu's mysql-flush.sh keeps its lock that way), so the call ends when
    // the script exits, not when its pipes close.
    let stdout = collect(child.stdout.take());
    let stderr = collect(child.stderr.take());
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => return Err(format!("cannot wait for it: {e}")),
        Err(_) => {
            return Err(format!(
                "did not finish within {}; its process group was killed",
                humantime::format_duration(timeout)
            ));
        }
    };
    // It exited: what it leaves running is its business (and gets `thaw` later).
    group.0 = None;
    let stdout = stdout.finish().await;
    let stderr = stderr.finish().await;
    if status.success() {
        Ok(stdout)
    } else {
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
        Err(format!(
            "exited with {status}{}",
            last.map(|l| format!(": {}", l.trim())).unwrap_or_default()
        ))
    }
}

/// A pipe read to its end (bounded to 64 KiB) by a task of its own.
struct Collected {
    buffer: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

fn collect(pipe: Option<impl tokio::io::AsyncRead + Unpin + Send + 'static>) -> Collected {
    let buffer = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let task = pipe.map(|mut pipe| {
        let buffer = buffer.clone();
        tokio::spawn(async move {
            let mut chunk = [0u8; 4096];
            loop {
                match tokio::io::AsyncReadExt::read(&mut pipe, &mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let mut buffer = buffer.lock().unwrap();
                        let room = (64 * 1024usize).saturating_sub(buffer.len());
                        buffer.extend_from_slice(&chunk[..n.min(room)]);
                    }
                }
            }
        })
    });
    Collected { buffer, task }
}

impl Collected {
    /// What was read by the time the pipe closed, or 100 ms after the script exited.
    async fn finish(mut self) -> String {
        if let Some(task) = self.task.take() {
            let mut task = task;
            if tokio::time::timeout(Duration::from_millis(100), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
        let buffer = self.buffer.lock().unwrap();
        String::from_utf8_lossy(&buffer).into_owned()
    }
}

/// Kills a script's process group when dropped while armed.
struct GroupKiller(Option<u32>);

impl Drop for GroupKiller {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[tonic::async_trait]
impl HookSession for ExecSession {
    async fn quiesce(&mut self) -> HookResult<()> {
        for index in 0..self.scripts.len() {
            self.frozen = index + 1;
            self.call(index, "freeze").await?;
        }
        Ok(())
    }

    async fn resume(&mut self, froze: bool) -> HookResult<()> {
        let mut problems = Vec::new();
        let (phase, order): (&'static str, Vec<usize>) = match self.convention {
            Convention::Quiesce => (
                if froze { "thaw" } else { "freeze-fail" },
                (0..self.frozen).rev().collect(),
            ),
            Convention::Qemu => ("thaw", (0..self.frozen).collect()),
        };
        for index in order {
            if let Err(e) = self.call(index, phase).await {
                problems.push(e);
            }
        }
        self.frozen = 0;
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    fn output(&self) -> HookValues {
        self.values.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hooks::{HookRegistry, HookSet};
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    fn write_script(dir: &Path, name: &str, body: &str) {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn setup(quiesce: Duration) -> (tempfile::TempDir, HookRegistry, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let log = dir.path().join("log");
        let hooks = dir.path().join("hooks.d");
        std::fs::create_dir(&hooks).unwrap();
        std::fs::set_permissions(&hooks, std::fs::Permissions::from_mode(0o755)).unwrap();
        let config = ExecConfig {
            dir: hooks.clone(),
            prepare_timeout: Duration::from_secs(5),
            quiesce_timeout: quiesce,
            resume_timeout: Duration::from_secs(5),
            convention: Convention::Quiesce,
        };
        let mut registry = HookRegistry::default();
        registry.insert(
            "scripts",
            Arc::new(ExecHook::new("scripts", config.clone())),
            config.timeouts(),
        );
        (dir, registry, log)
    }

    fn ctx() -> HookContext {
        HookContext {
            set_id: "s1".into(),
            mounts: vec!["/mnt/a".into(), "/mnt/b".into()],
        }
    }

    #[tokio::test]
    async fn scripts_run_in_name_order_with_phases_env_and_outputs() {
        let (dir, registry, log) = setup(Duration::from_secs(5));
        let hooks = dir.path().join("hooks.d");
        for name in ["20-b", "10-a"] {
            write_script(
                &hooks,
                name,
                &format!(
                    "echo \"{name} $1 $QUIESCE_SET_ID $QUIESCE_MOUNTS\" >> {}\necho \"phase=$1\"",
                    log.display()
                ),
            );
        }
        std::fs::write(hooks.join("README"), "not executable").unwrap();
        let mut set = HookSet::prepare(&registry, &["scripts".into()], &ctx())
            .await
            .unwrap();
        set.quiesce().await.unwrap();
        let outputs = set.resume(true).await;
        let lines = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = lines.lines().collect();
        assert_eq!(
            lines,
            [
                "10-a prepare s1 /mnt/a:/mnt/b",
                "20-b prepare s1 /mnt/a:/mnt/b",
                "10-a freeze s1 /mnt/a:/mnt/b",
                "20-b freeze s1 /mnt/a:/mnt/b",
                "20-b thaw s1 /mnt/a:/mnt/b",
                "10-a thaw s1 /mnt/a:/mnt/b",
            ]
        );
        assert!(outputs[0].error.is_empty(), "{}", outputs[0].error);
        assert!(
            outputs[0]
                .values
                .values
                .contains(&("10-a.phase".into(), "thaw".into()))
        );
    }

    #[tokio::test]
    async fn a_failing_freeze_fails_the_set_and_gets_freeze_fail() {
        let (dir, registry, log) = setup(Duration::from_secs(5));
        let hooks = dir.path().join("hooks.d");
        write_script(
            &hooks,
            "10-ok",
            &format!("echo \"ok $1\" >> {}", log.display()),
        );
        write_script(
            &hooks,
            "20-bad",
            &format!(
                "echo \"bad $1\" >> {}\n[ \"$1\" = freeze ] && {{ echo 'database said no' >&2; exit 3; }}\nexit 0",
                log.display()
            ),
        );
        let mut set = HookSet::prepare(&registry, &["scripts".into()], &ctx())
            .await
            .unwrap();
        let (err, _) = set.quiesce().await.unwrap_err();
        let err = err.to_string();
        assert!(
            err.contains("script 20-bad freeze: exited with exit status: 3: database said no"),
            "{err}"
        );
        let lines = std::fs::read_to_string(&log).unwrap();
        assert!(
            lines.ends_with("ok freeze\nbad freeze\nbad freeze-fail\nok freeze-fail\n"),
            "{lines}"
        );
    }

    #[tokio::test]
    async fn a_hanging_script_is_killed_with_its_whole_process_group() {
        let (dir, registry, _log) = setup(Duration::from_millis(500));
        let hooks = dir.path().join("hooks.d");
        let pidfile = dir.path().join("child.pid");
        write_script(
            &hooks,
            "10-hang",
            &format!(
                "if [ \"$1\" = freeze ]; then sleep 300 & echo $! > {}; wait; fi",
                pidfile.display()
            ),
        );
        let mut set = HookSet::prepare(&registry, &["scripts".into()], &ctx())
            .await
            .unwrap();
        let (err, _) = set.quiesce().await.unwrap_err();
        assert!(
            err.to_string().contains("did not finish within 500ms"),
            "{err}"
        );
        let child: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The grandchild (`sleep`) is gone too: killed with the group, then reaped by init.
        let mut gone = false;
        for _ in 0..50 {
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            if stat.is_empty() || stat.contains(") Z ") {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        assert!(gone, "the script child survived the timeout: {stat}");
    }

    #[tokio::test]
    async fn a_script_leaving_a_background_process_on_its_pipes_returns_when_it_exits() {
        let (dir, registry, _log) = setup(Duration::from_secs(5));
        let hooks = dir.path().join("hooks.d");
        let pidfile = dir.path().join("bg.pid");
        // Like qemu's mysql-flush.sh: the lock holder runs on in the background at `freeze`.
        write_script(
            &hooks,
            "10-bg",
            &format!(
                "if [ \"$1\" = freeze ]; then sleep 30 & echo $! > {}; fi\necho held=yes",
                pidfile.display()
            ),
        );
        let mut set = HookSet::prepare(&registry, &["scripts".into()], &ctx())
            .await
            .unwrap();
        let started = std::time::Instant::now();
        set.quiesce().await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "a script that exited cleanly keeps its background process"
        );
        let outputs = set.resume(true).await;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        assert!(
            outputs[0]
                .values
                .values
                .contains(&("10-bg.held".into(), "yes".into()))
        );
    }

    #[tokio::test]
    async fn a_script_replaced_after_prepare_is_refused_and_does_not_run() {
        let (dir, registry, log) = setup(Duration::from_secs(5));
        let hooks = dir.path().join("hooks.d");
        write_script(
            &hooks,
            "10-a",
            &format!("echo \"a $1\" >> {}", log.display()),
        );
        let mut set = HookSet::prepare(&registry, &["scripts".into()], &ctx())
            .await
            .unwrap();
        // Another file (a new inode) under the same name.
        std::fs::remove_file(hooks.join("10-a")).unwrap();
        write_script(
            &hooks,
            "10-a",
            &format!("echo \"b $1\" >> {}", log.display()),
        );
        // The failed quiesce resumes (`freeze-fail`) what started: refused the same way.
        let (err, outputs) = set.quiesce().await.unwrap_err();
        assert!(
            err.to_string().contains("not the file checked at prepare"),
            "{err}"
        );
        assert!(
            outputs[0].error.contains("not the file checked"),
            "{outputs:?}"
        );
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "a prepare\n");
    }

    #[tokio::test]
    async fn a_parent_made_writable_after_prepare_stops_every_later_run() {
        let (dir, registry, log) = setup(Duration::from_secs(5));
        let hooks = dir.path().join("hooks.d");
        write_script(
            &hooks,
            "10-a",
            &format!("echo \"a $1\" >> {}", log.display()),
        );
        let mut set = HookSet::prepare(&registry, &["scripts".into()], &ctx())
            .await
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let (err, _) = set.quiesce().await.unwrap_err();
        assert!(
            err.to_string().contains("writable by group or others"),
            "{err}"
        );
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "a prepare\n");
    }

    #[tokio::test]
    async fn a_symlinked_hook_dir_is_refused() {
        let (dir, _registry, _log) = setup(Duration::from_secs(5));
        let link = dir.path().join("link.d");
        std::os::unix::fs::symlink(dir.path().join("hooks.d"), &link).unwrap();
        let err = scripts(&link).unwrap_err();
        assert!(err.contains("is a symbolic link"), "{err}");
        write_script(&dir.path().join("hooks.d"), "10-a", "exit 0");
        std::os::unix::fs::symlink(
            dir.path().join("hooks.d/10-a"),
            dir.path().join("hooks.d/20-link"),
        )
        .unwrap();
        let err = scripts(&dir.path().join("hooks.d")).unwrap_err();
        assert!(err.contains("20-link is a symbolic link"), "{err}");
    }

    #[test]
    fn writable_scripts_are_refused() {
        let (dir, _registry, _log) = setup(Duration::from_secs(1));
        let hooks = dir.path().join("hooks.d");
        write_script(&hooks, "10-a", "exit 0");
        assert_eq!(scripts(&hooks).unwrap().len(), 1);
        std::fs::set_permissions(hooks.join("10-a"), std::fs::Permissions::from_mode(0o775))
            .unwrap();
        let err = scripts(&hooks).unwrap_err();
        assert!(err.contains("group- or world-writable"), "{err}");
        std::fs::set_permissions(hooks.join("10-a"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        std::fs::set_permissions(&hooks, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(
            scripts(&hooks)
                .unwrap_err()
                .contains("hooks.d has mode 0777")
        );
    }

    #[tokio::test]
    async fn qemu_convention_calls_only_freeze_and_thaw_in_name_order_and_skips_what_qemu_skips() {
        let (dir, _, log) = setup(Duration::from_secs(5));
        let hooks = dir.path().join("hooks.d");
        // Like qemu's mysql-flush.sh.sample: any argument but freeze/thaw is an error.
        let strict = |name: &str| {
            format!(
                "case \"$1\" in freeze|thaw) echo \"{name} $1\" >> {} ;; *) echo \"bad arg $1\" >&2; exit 1 ;; esac",
                log.display()
            )
        };
        for name in ["20-b", "10-a"] {
            write_script(&hooks, name, &strict(name));
        }
        for skipped in [
            "30-mysql-flush.sh.sample",
            "40-x.rpmsave",
            "41-x.rpmnew",
            "42-x.rpmorig",
            "43-x.bak",
            "44-x.orig",
            "45-x~",
            "46-x.dpkg-old",
        ] {
            write_script(
                &hooks,
                skipped,
                &format!("echo {skipped} >> {}", log.display()),
            );
        }
        let config = ExecConfig {
            dir: hooks.clone(),
            prepare_timeout: Duration::from_secs(5),
            quiesce_timeout: Duration::from_secs(5),
            resume_timeout: Duration::from_secs(5),
            convention: Convention::Qemu,
        };
        let mut registry = HookRegistry::default();
        registry.insert(
            "qemu",
            Arc::new(ExecHook::new("qemu", config.clone())),
            config.timeouts(),
        );
        let mut set = HookSet::prepare(&registry, &["qemu".into()], &ctx())
            .await
            .unwrap();
        set.quiesce().await.unwrap();
        let outputs = set.resume(true).await;
        assert!(outputs[0].error.is_empty(), "{}", outputs[0].error);
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "10-a freeze\n20-b freeze\n10-a thaw\n20-b thaw\n"
        );
        // A freeze that failed is thawed the qemu way too: `thaw`, never `freeze-fail`.
        std::fs::remove_file(&log).unwrap();
        let mut set = HookSet::prepare(&registry, &["qemu".into()], &ctx())
            .await
            .unwrap();
        set.quiesce().await.unwrap();
        let outputs = set.resume(false).await;
        assert!(outputs[0].error.is_empty(), "{}", outputs[0].error);
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "10-a freeze\n20-b freeze\n10-a thaw\n20-b thaw\n"
        );
    }

    #[test]
    fn the_convention_is_read_from_the_config() {
        let config: ExecConfig =
            toml::from_str("dir = \"/etc/qemu/fsfreeze-hook.d\"\nconvention = \"qemu\"").unwrap();
        assert_eq!(config.convention, Convention::Qemu);
        let config: ExecConfig = toml::from_str("dir = \"/x\"").unwrap();
        assert_eq!(config.convention, Convention::Quiesce);
    }
}
