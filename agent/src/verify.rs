//! Restore drills: prove that a set restores, on a copy, without touching the original.
//!
//! A drill (the `VerifySnapshots` RPC) restores this host's snapshots of a set into scratch
//! space with the ordinary restore machinery ([`crate::restore::restore_image`]: refused on a
//! volume of this agent, on the source's own filesystem and on a frozen filesystem; reflink
//! clones where it can, space checked where it copies), then, on a thread of its own:
//! 1. enters a mount namespace of its own (private propagation), so nothing it mounts is seen
//!    by the host, and everything it mounts goes when the thread ends — also on a panic;
//! 2. mounts a private tmpfs over `/tmp` (sockets and logs of the drill's databases: never a
//!    write to a disk that may be frozen) and each copy read-write (XFS with `nouuid`), at
//!    `<drill>/mnt/<n>`;
//! 3. checks each named hook's database on the copies: PostgreSQL is started on the copied
//!    data directory (no TCP, its socket in the private `/tmp`, archiving, autovacuum and fsync
//!    off, `pg_wal` and tablespace links re-pointed at the copies — a link leading outside
//!    them is refused, so the drill never starts on live files); crash recovery must finish
//!    (backup-mode sets too: data and WAL are one atomic cut), then `pg_amcheck
//!    --heapallindexed` and the operator's probe run. SQLite: `PRAGMA integrity_check` and
//!    the probe. MariaDB/MySQL: the server is started on the copied datadir as its owner (no
//!    TCP, its socket in the private `/tmp`, the copy's own binary log through a fresh index
//!    (its prepared transactions are decided from it), no replica threads, no event
//!    scheduler, no grant checks — only the drill reaches the socket; every InnoDB and Aria
//!    directory re-pointed at the copies, one on no copied volume refused); InnoDB crash
//!    recovery must finish, then `mariadb-check --all-databases` (or `mysqlcheck`) and the
//!    probe run;
//! 4. stops every process it started (fast shutdown, then the process group is killed),
//!    unmounts in reverse order, and leaves the namespace; the scratch directory is removed.
//!
//! The privileged effects (namespace, mounts) are behind [`DrillHost`], the database checks
//! behind [`DatabaseChecks`], so the sequence and its teardown are tested with fakes.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::hooks::{DescribedPath, HookConfig};

/// Most characters of output kept per check (the end of it: where the error is).
pub const OUTPUT_CAP: usize = 4000;

/// How long one drill may take in all; each step gets what is left.
pub const DRILL_TIMEOUT: Duration = Duration::from_secs(600);

/// What a drill, or one check, found (the proto's `VerifyOutcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Passed,
    Skipped,
    Error,
    Failed,
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    pub kind: String,
    pub outcome: Outcome,
    /// The checks run, the failing one last.
    pub check: String,
    pub output: String,
    pub duration: Duration,
}

/// One copy to mount: where the original was mounted, the restored image, its filesystem.
#[derive(Debug, Clone)]
pub struct Copy {
    pub mount_point: PathBuf,
    pub image: PathBuf,
    pub fs_type: String,
}

/// One database to check.
#[derive(Debug, Clone)]
pub struct Database {
    pub hook: String,
    pub config: Option<HookConfig>,
    /// Every path it writes, on the original, as `DescribeHooks` reports them.
    pub paths: Vec<DescribedPath>,
    /// Why its paths are unknown (cannot describe it): the check is an error.
    pub problem: String,
    pub backup_label: String,
    pub tablespace_map: String,
}

/// Everything a drill needs, prepared before its thread starts.
#[derive(Debug, Clone)]
pub struct Plan {
    /// `<scratch>/<set>.<ms>`: the copies in `images/`, mount points in `mnt/`.
    pub root: PathBuf,
    pub copies: Vec<Copy>,
    pub databases: Vec<Database>,
    pub deadline: Instant,
}

/// What the drill's thread reports.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub checks: Vec<Check>,
    /// What the teardown could not undo (empty: everything undone).
    pub teardown: Vec<String>,
}

impl Report {
    /// Failed beats error beats passed; skipped checks alone leave the drill passed only if
    /// something was checked.
    pub fn outcome(&self) -> Outcome {
        let worst = self.checks.iter().map(|c| c.outcome).max();
        match worst {
            None => Outcome::Error,
            Some(Outcome::Skipped) => {
                if self.checks.iter().any(|c| c.kind == "filesystem") {
                    Outcome::Passed
                } else {
                    Outcome::Skipped
                }
            }
            Some(o) => o,
        }
    }
}

/// The privileged world a drill acts on.
pub trait DrillHost: Send + Sync {
    /// Moves the calling thread into a mount namespace of its own, propagation private.
    fn enter_private_namespace(&self) -> Result<(), String>;
    /// A fresh tmpfs at `at` (in the drill's namespace).
    fn mount_tmpfs(&self, at: &Path) -> Result<(), String>;
    /// Mounts the filesystem image read-write at `at` (loop device released on unmount).
    fn mount_image(&self, image: &Path, at: &Path, fs_type: &str) -> Result<(), String>;
    fn unmount(&self, at: &Path) -> Result<(), String>;
}

/// Checks one database on the mounted copies.
pub trait DatabaseChecks: Send + Sync {
    fn check(&self, db: &Database, copies: &Mapping, deadline: Instant) -> Check;
}

/// Original mount point → where its copy is mounted in the drill.
#[derive(Debug, Clone, Default)]
pub struct Mapping {
    pub mounts: Vec<(PathBuf, PathBuf)>,
    /// The drill's private scratch (tmpfs): sockets and logs.
    pub run_dir: PathBuf,
}

impl Mapping {
    /// Where `path` of the original lies in the copies; `None` when on no copied volume.
    pub fn map(&self, path: &Path) -> Option<PathBuf> {
        self.mounts
            .iter()
            .filter(|(original, _)| path.starts_with(original))
            .max_by_key(|(original, _)| original.as_os_str().len())
            .map(|(original, copy)| {
                let rest = path.strip_prefix(original).unwrap_or(Path::new(""));
                if rest.as_os_str().is_empty() {
                    copy.clone()
                } else {
                    copy.join(rest)
                }
            })
    }
}

/// Runs the drill on the calling thread (which it moves into a mount namespace of its own:
/// call it only on a thread made for it, see [`run_on_own_thread`]).
pub fn run(plan: &Plan, host: &dyn DrillHost, checks: &dyn DatabaseChecks) -> Report {
    let mut report = Report::default();
    let started = Instant::now();
    if let Err(e) = host.enter_private_namespace() {
        report.checks.push(Check {
            name: "drill".into(),
            kind: "filesystem".into(),
            outcome: Outcome::Error,
            check: "private mount namespace".into(),
            output: cap(&e),
            duration: started.elapsed(),
        });
        return report;
    }
    let run_dir = PathBuf::from("/tmp");
    if let Err(e) = host.mount_tmpfs(&run_dir) {
        report.checks.push(Check {
            name: "drill".into(),
            kind: "filesystem".into(),
            outcome: Outcome::Error,
            check: "private tmpfs".into(),
            output: cap(&e),
            duration: started.elapsed(),
        });
        return report;
    }
    let mut mounted: Vec<PathBuf> = vec![run_dir.clone()];
    let mut mapping = Mapping {
        run_dir,
        ..Default::default()
    };
    let mut all_mounted = true;
    for (i, copy) in plan.copies.iter().enumerate() {
        let at = plan.root.join("mnt").join(i.to_string());
        let t = Instant::now();
        let result = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&at)
            .map_err(|e| format!("cannot make {}: {e}", at.display()))
            .and_then(|()| host.mount_image(&copy.image, &at, &copy.fs_type));
        let outcome = match &result {
            Ok(()) => {
                mounted.push(at.clone());
                mapping.mounts.push((copy.mount_point.clone(), at));
                Outcome::Passed
            }
            Err(_) => {
                all_mounted = false;
                Outcome::Failed
            }
        };
        report.checks.push(Check {
            name: copy.mount_point.display().to_string(),
            kind: "filesystem".into(),
            outcome,
            check: format!(
                "mount read-write{}",
                if copy.fs_type.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", copy.fs_type)
                }
            ),
            output: result.err().map(|e| cap(&e)).unwrap_or_default(),
            duration: t.elapsed(),
        });
    }
    for db in &plan.databases {
        if !all_mounted {
            report.checks.push(Check {
                name: db.hook.clone(),
                kind: db.config.as_ref().map(|c| c.kind()).unwrap_or("").into(),
                outcome: Outcome::Failed,
                check: "mount".into(),
                output: "not started: a volume of the set did not mount".into(),
                duration: Duration::ZERO,
            });
            continue;
        }
        report
            .checks
            .push(checks.check(db, &mapping, plan.deadline));
    }
    for at in mounted.iter().rev() {
        if let Err(e) = host.unmount(at) {
            report.teardown.push(cap(&e));
        }
    }
    report
}

/// Runs [`run`] on a thread made for it (the namespace goes with the thread), waiting at most
/// until the plan's deadline plus a minute for teardown.
pub fn run_on_own_thread(
    plan: Plan,
    host: Arc<dyn DrillHost>,
    checks: Arc<dyn DatabaseChecks>,
) -> Result<Report, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let wait = plan.deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(60);
    std::thread::Builder::new()
        .name("verify-drill".into())
        .spawn(move || {
            let _ = tx.send(run(&plan, host.as_ref(), checks.as_ref()));
        })
        .map_err(|e| format!("cannot start the drill's thread: {e}"))?;
    rx.recv_timeout(wait)
        .map_err(|_| "the drill did not finish in time; its thread is left to end".to_owned())
}

/// The last [`OUTPUT_CAP`] characters of `text`, marked when cut.
pub fn cap(text: &str) -> String {
    let text = text.trim();
    let count = text.chars().count();
    if count <= OUTPUT_CAP {
        return text.to_owned();
    }
    let tail: String = text.chars().skip(count - OUTPUT_CAP).collect();
    format!("…{tail}")
}

/// Removes the drill's scratch directory on a thread of its own: on a filesystem frozen by
/// someone else that blocks until the thaw, so after `wait` the removal is reported pending
/// (and finishes by itself).
pub fn remove_scratch(root: &Path, wait: Duration) -> Result<(), String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let dir = root.to_owned();
    std::thread::Builder::new()
        .name("verify-cleanup".into())
        .spawn(move || {
            let _ = tx.send(std::fs::remove_dir_all(&dir));
        })
        .map_err(|e| format!("cannot start a thread to remove {}: {e}", root.display()))?;
    match rx.recv_timeout(wait) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Ok(Err(e)) => Err(format!("cannot remove {}: {e}", root.display())),
        Err(_) => Err(format!(
            "removing {} did not finish within {} s (frozen?); it goes on in the background",
            root.display(),
            wait.as_secs()
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// The real host

/// Namespaces and mounts through the kernel and `mount(8)`.
pub struct SystemDrillHost;

impl DrillHost for SystemDrillHost {
    fn enter_private_namespace(&self) -> Result<(), String> {
        // SAFETY: unshare has no memory effects; CLONE_NEWNS (with the implied CLONE_FS) is
        // allowed for one thread of a multi-threaded process and affects only this thread.
        if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
            return Err(format!(
                "cannot make a private mount namespace: {}",
                std::io::Error::last_os_error()
            ));
        }
        nix::mount::mount(
            None::<&str>,
            "/",
            None::<&str>,
            nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .map_err(|e| format!("cannot make the drill's mounts private: {e}"))
    }

    fn mount_tmpfs(&self, at: &Path) -> Result<(), String> {
        nix::mount::mount(
            Some("quiesce-verify"),
            at,
            Some("tmpfs"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            Some("size=64m,mode=0755"),
        )
        .map_err(|e| format!("cannot mount a tmpfs at {}: {e}", at.display()))
    }

    fn mount_image(&self, image: &Path, at: &Path, fs_type: &str) -> Result<(), String> {
        let mut options = String::from("loop");
        if fs_type == "xfs" {
            // The copy has its source's UUID, which is mounted on this host.
            options.push_str(",nouuid");
        }
        let mut cmd = Command::new("mount");
        if !fs_type.is_empty() {
            cmd.args(["-t", fs_type]);
        }
        cmd.args(["-o", &options]).arg(image).arg(at);
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "mount {} failed ({}): {}",
                image.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    fn unmount(&self, at: &Path) -> Result<(), String> {
        let mut last = None;
        for _ in 0..20 {
            match nix::mount::umount2(at, nix::mount::MntFlags::empty()) {
                Ok(()) => return Ok(()),
                Err(nix::errno::Errno::EBUSY) => {
                    last = Some(nix::errno::Errno::EBUSY);
                    std::thread::sleep(Duration::from_millis(250));
                }
                Err(e) => return Err(format!("cannot unmount {}: {e}", at.display())),
            }
        }
        // Still busy: detach it (it goes once nothing holds it, at the latest with the
        // drill's namespace).
        let _ = nix::mount::umount2(at, nix::mount::MntFlags::MNT_DETACH);
        Err(format!(
            "{} was busy ({:?}) and was detached lazily",
            at.display(),
            last
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// The engines

/// PostgreSQL, MariaDB/MySQL and SQLite as this host runs them.
pub struct EngineChecks;

impl DatabaseChecks for EngineChecks {
    fn check(&self, db: &Database, copies: &Mapping, deadline: Instant) -> Check {
        let started = Instant::now();
        let (kind, result) = match &db.config {
            _ if !db.problem.is_empty() => {
                ("", Err((Outcome::Error, "describe", db.problem.clone())))
            }
            None => (
                "",
                Err((Outcome::Error, "config", "hook not configured".to_owned())),
            ),
            Some(HookConfig::Postgres(c)) => ("postgres", postgres::check(db, c, copies, deadline)),
            Some(HookConfig::Sqlite(c)) => ("sqlite", sqlite_check(db, c, copies)),
            Some(HookConfig::Mysql(c)) => ("mysql", mysql::check(db, c, copies, deadline)),
            Some(HookConfig::Exec(_)) => (
                "exec",
                Err((
                    Outcome::Skipped,
                    "none",
                    "a script hook names no database to check".to_owned(),
                )),
            ),
        };
        let kind = if kind.is_empty() {
            db.config.as_ref().map(|c| c.kind()).unwrap_or("")
        } else {
            kind
        };
        match result {
            Ok((checks, output)) => Check {
                name: db.hook.clone(),
                kind: kind.into(),
                outcome: Outcome::Passed,
                check: checks,
                output: cap(&output),
                duration: started.elapsed(),
            },
            Err((outcome, check, output)) => Check {
                name: db.hook.clone(),
                kind: kind.into(),
                outcome,
                check: check.into(),
                output: cap(&output),
                duration: started.elapsed(),
            },
        }
    }
}

/// `Ok((checks run, output))` or `Err((outcome, the failing check, output))`.
type EngineResult = Result<(String, String), (Outcome, &'static str, String)>;

fn path_of<'a>(db: &'a Database, what: &str) -> Option<&'a Path> {
    db.paths
        .iter()
        .find(|p| p.what == what)
        .map(|p| p.path.as_path())
}

fn sqlite_check(
    db: &Database,
    config: &crate::hooks::sqlite::SqliteConfig,
    copies: &Mapping,
) -> EngineResult {
    let original = path_of(db, "database").unwrap_or(&config.path);
    let Some(copy) = copies.map(original) else {
        return Err((
            Outcome::Error,
            "locate",
            format!(
                "{} is on no volume of the set on this host",
                original.display()
            ),
        ));
    };
    let failed = |e: rusqlite::Error| (Outcome::Failed, "PRAGMA integrity_check", e.to_string());
    let conn = rusqlite::Connection::open_with_flags(
        &copy,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(failed)?;
    conn.busy_timeout(Duration::from_secs(10)).map_err(failed)?;
    let rows: Vec<String> = {
        let mut stmt = conn.prepare("PRAGMA integrity_check").map_err(failed)?;
        stmt.query_map([], |r| r.get::<_, String>(0))
            .map_err(failed)?
            .collect::<Result<_, _>>()
            .map_err(failed)?
    };
    if rows != ["ok"] {
        return Err((Outcome::Failed, "PRAGMA integrity_check", rows.join("\n")));
    }
    let mut checks = "PRAGMA integrity_check".to_owned();
    let mut output = "integrity_check: ok".to_owned();
    if let (Some(sql), Some(expect)) = (&config.verify_probe, &config.verify_expect) {
        let answer: Result<String, _> = conn.query_row(sql, [], |r| {
            Ok(match r.get_ref(0)? {
                rusqlite::types::ValueRef::Null => String::new(),
                rusqlite::types::ValueRef::Integer(i) => i.to_string(),
                rusqlite::types::ValueRef::Real(f) => f.to_string(),
                rusqlite::types::ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
                rusqlite::types::ValueRef::Blob(b) => format!("<{} bytes>", b.len()),
            })
        });
        let answer = answer.map_err(|e| (Outcome::Failed, "probe", format!("{sql}: {e}")))?;
        if answer.trim() != expect.trim() {
            return Err((
                Outcome::Failed,
                "probe",
                format!("{sql}: answered {answer:?}, expected {expect:?}"),
            ));
        }
        checks.push_str(", probe");
        output.push_str(&format!("\nprobe: {answer}"));
    }
    Ok((checks, output))
}

/// PostgreSQL on the copy.
mod postgres {
    use super::*;
    use crate::hooks::postgres::PostgresConfig;
    use std::os::unix::fs::MetadataExt;

    /// The socket's port number (no TCP: `listen_addresses = ''`).
    const PORT: &str = "5432";

    pub fn check(
        db: &Database,
        config: &PostgresConfig,
        copies: &Mapping,
        deadline: Instant,
    ) -> EngineResult {
        let error = |check: &'static str, text: String| (Outcome::Error, check, text);
        let Some(original) = path_of(db, "data_directory") else {
            return Err(error(
                "locate",
                "the hook reported no data_directory".into(),
            ));
        };
        let Some(data) = copies.map(original) else {
            return Err(error(
                "locate",
                format!(
                    "data directory {} is on no volume of the set on this host",
                    original.display()
                ),
            ));
        };
        let meta = std::fs::symlink_metadata(data.join("PG_VERSION")).map_err(|e| {
            (
                Outcome::Failed,
                "recovery",
                format!("the copy has no {}/PG_VERSION: {e}", original.display()),
            )
        })?;
        let (uid, gid) = (meta.uid(), meta.gid());
        if uid == 0 {
            return Err(error(
                "start",
                "the copied data directory is owned by root; PostgreSQL refuses to run as root"
                    .into(),
            ));
        }
        let version = std::fs::read_to_string(data.join("PG_VERSION"))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default();
        let bin = PathBuf::from(format!("/usr/lib/postgresql/{version}/bin"));
        if !bin.join("postgres").exists() {
            return Err(error(
                "start",
                format!(
                    "no PostgreSQL {version} binaries in {} on this host",
                    bin.display()
                ),
            ));
        }
        relink(&data, copies)?;
        let _ = std::fs::remove_file(data.join("postmaster.pid"));
        // A backup-mode set is checked by crash recovery too: its data and WAL are one atomic
        // cut (the plan-time completeness check keeps pg_wal and every tablespace in the
        // group), while recovery from its backup_label needs the production WAL archive up to
        // the stop position, which a drill must not read from.
        let backup_mode = !db.backup_label.is_empty();
        // Socket and log in the drill's private tmpfs.
        let run = copies.run_dir.join(format!("pg-{}", db.hook));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&run)
            .map_err(|e| error("start", format!("cannot make {}: {e}", run.display())))?;
        std::os::unix::fs::chown(&run, Some(uid), Some(gid))
            .map_err(|e| error("start", format!("cannot chown {}: {e}", run.display())))?;
        // Only the data directory's owner (and root) reach this socket directory, in the
        // drill's own tmpfs: trust there lets the checks in as the cluster's superuser without
        // the production passwords.
        let hba = run.join("pg_hba.conf");
        std::fs::write(&hba, "local all all trust\n")
            .and_then(|()| std::os::unix::fs::chown(&hba, Some(uid), Some(gid)))
            .map_err(|e| error("start", format!("cannot write {}: {e}", hba.display())))?;
        let log_path = run.join("postgres.log");
        let log = File::create(&log_path)
            .map_err(|e| error("start", format!("cannot make {}: {e}", log_path.display())))?;
        let log_err = log.try_clone().map_err(|e| error("start", e.to_string()))?;
        let sock = run.display().to_string();
        let mut cmd = Command::new(bin.join("postgres"));
        cmd.arg("-D").arg(&data);
        for setting in [
            format!("port={PORT}"),
            "listen_addresses=".into(),
            format!("unix_socket_directories={sock}"),
            "archive_mode=off".into(),
            "archive_command=".into(),
            "restore_command=".into(),
            "autovacuum=off".into(),
            "fsync=off".into(),
            "ssl=off".into(),
            "logging_collector=off".into(),
            "log_destination=stderr".into(),
            "cluster_name=quiesce-verify".into(),
            "shared_buffers=32MB".into(),
            format!("hba_file={}", hba.display()),
        ] {
            cmd.arg("-c").arg(setting);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .current_dir(&run)
            .uid(uid)
            .gid(gid);
        as_drill_child(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|e| error("start", format!("cannot start postgres: {e}")))?;
        let mut server = Server {
            child,
            log: log_path.clone(),
        };
        // initdb names the bootstrap superuser after the OS user that ran it.
        let user = user_name(uid).unwrap_or_else(|| config.user.clone());
        let client = |program: &str| {
            let mut cmd = Command::new(bin.join(program));
            cmd.args(["-h", &sock, "-p", PORT, "-U", &user])
                .uid(uid)
                .gid(gid)
                .current_dir(&run)
                .stdin(Stdio::null())
                .env_remove("PGSERVICE")
                .env_remove("PGPASSWORD")
                .env("PGCONNECT_TIMEOUT", "10");
            cmd
        };
        let recovery = "crash recovery";
        let t = Instant::now();
        // Ready once recovery finished and it accepts connections.
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err((
                    Outcome::Failed,
                    "crash recovery",
                    format!("postgres exited ({status}):\n{}", tail(&server.log)),
                ));
            }
            let mut ready = client("pg_isready");
            ready.args(["-d", &config.dbname, "-t", "2"]);
            if run_until(&mut ready, deadline).is_ok_and(|(ok, _)| ok) {
                break;
            }
            if Instant::now() >= deadline {
                return Err((
                    Outcome::Error,
                    "recovery",
                    format!(
                        "not ready before the drill's deadline:\n{}",
                        tail(&server.log)
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let recovered_ms = t.elapsed().as_millis();
        let mut output = format!("{recovery} finished in {recovered_ms} ms");
        if backup_mode {
            output.push_str(
                " (a backup-mode set: its atomic data + WAL cut, without the label, which needs the WAL archive)",
            );
        }
        let mut checks = recovery.to_owned();
        let mut amcheck = client("pg_amcheck");
        amcheck.args([
            "-d",
            &config.dbname,
            "--all",
            "--install-missing",
            "--heapallindexed",
        ]);
        let (ok, text) = run_until(&mut amcheck, deadline)
            .map_err(|e| error("pg_amcheck --heapallindexed", e))?;
        if !ok {
            return Err((
                Outcome::Failed,
                "pg_amcheck --heapallindexed",
                if text.trim().is_empty() {
                    tail(&server.log)
                } else {
                    text
                },
            ));
        }
        checks.push_str(", pg_amcheck --heapallindexed");
        output.push_str("\npg_amcheck --heapallindexed --all: no corruption found");
        if let (Some(sql), Some(expect)) = (&config.verify_probe, &config.verify_expect) {
            let mut psql = client("psql");
            psql.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
                .args(["-d", &config.dbname, "-c", sql]);
            let (ok, text) = run_until(&mut psql, deadline).map_err(|e| error("probe", e))?;
            let answer = text.lines().next().unwrap_or("").trim().to_owned();
            if !ok || answer != expect.trim() {
                return Err((
                    Outcome::Failed,
                    "probe",
                    format!("{sql}: answered {:?}, expected {expect:?}", text.trim()),
                ));
            }
            checks.push_str(", probe");
            output.push_str(&format!("\nprobe: {answer}"));
        }
        server.stop();
        Ok((checks, output))
    }

    /// `pg_wal` and `pg_tblspc/*` links of the copy point at the original's files: re-point
    /// each at its copy, or refuse (never start the copy on a live file).
    fn relink(data: &Path, copies: &Mapping) -> Result<(), (Outcome, &'static str, String)> {
        let mut links = vec![data.join("pg_wal")];
        if let Ok(entries) = std::fs::read_dir(data.join("pg_tblspc")) {
            links.extend(entries.flatten().map(|e| e.path()));
        }
        for link in links {
            let Ok(target) = std::fs::read_link(&link) else {
                continue; // a directory, not a link
            };
            let target = if target.is_absolute() {
                target
            } else {
                link.parent().unwrap_or(data).join(target)
            };
            // A link already inside the copies (relative within the data directory) is fine.
            if copies
                .mounts
                .iter()
                .any(|(_, copy)| target.starts_with(copy))
            {
                continue;
            }
            let Some(copy) = copies.map(&target) else {
                return Err((
                    Outcome::Error,
                    "relink",
                    format!(
                        "{} points at {}, which is on no volume of the set on this host: not started, so the drill cannot touch the original",
                        link.display(),
                        target.display()
                    ),
                ));
            };
            std::fs::remove_file(&link)
                .and_then(|()| std::os::unix::fs::symlink(&copy, &link))
                .map_err(|e| {
                    (
                        Outcome::Error,
                        "relink",
                        format!("cannot re-point {}: {e}", link.display()),
                    )
                })?;
        }
        Ok(())
    }

    /// The postmaster of the drill: fast shutdown on drop, then its process group is killed.
    struct Server {
        child: Child,
        log: PathBuf,
    }

    impl Server {
        fn stop(&mut self) {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            if matches!(self.child.try_wait(), Ok(None)) {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
                let until = Instant::now() + Duration::from_secs(30);
                while Instant::now() < until && matches!(self.child.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            // Whatever is left of it (backends, a postmaster that did not stop).
            let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.stop();
        }
    }
}

/// MariaDB (or MySQL) on the copy.
mod mysql {
    use super::*;
    use crate::hooks::mysql::MysqlConfig;
    use std::os::unix::fs::MetadataExt;

    /// The first of `names` found in the usual places (Debian, RPM) or on `PATH`.
    fn find(names: &[&str]) -> Option<PathBuf> {
        let dirs = [
            "/usr/sbin",
            "/usr/bin",
            "/usr/libexec",
            "/usr/local/sbin",
            "/usr/local/bin",
        ];
        names.iter().find_map(|name| {
            dirs.iter()
                .map(|d| Path::new(d).join(name))
                .find(|p| p.exists())
        })
    }

    /// The server's binlog options on the copy: `--skip-log-bin` for a server without one;
    /// else the copied binlog files, listed in a new index in `run` (owned by the server).
    fn binlog_args(
        db: &Database,
        copies: &Mapping,
        run: &Path,
        uid: u32,
        gid: u32,
    ) -> Result<Vec<String>, String> {
        let Some(original) = path_of(db, "log_bin_basename dir") else {
            return Ok(vec!["--skip-log-bin".into()]);
        };
        let Some(dir) = copies.map(original) else {
            return Err(format!(
                "the binary log directory {} is on no volume of the set on this host: not started, so the drill cannot touch the original",
                original.display()
            ));
        };
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| format!("cannot list the copied binlog dir {}: {e}", dir.display()))?;
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        let Some(stem) = names
            .iter()
            .find_map(|n| n.strip_suffix(".index"))
            .map(str::to_owned)
        else {
            return Err(format!(
                "no binlog index in the copied binlog dir {}",
                dir.display()
            ));
        };
        let files: Vec<&String> = names
            .iter()
            .filter(|n| {
                n.strip_prefix(&stem)
                    .and_then(|rest| rest.strip_prefix('.'))
                    .is_some_and(|seq| !seq.is_empty() && seq.bytes().all(|b| b.is_ascii_digit()))
            })
            .collect();
        let index = run.join(format!("{stem}.index"));
        let text: String = files
            .iter()
            .map(|n| format!("{}\n", dir.join(n).display()))
            .collect();
        std::fs::write(&index, text)
            .map_err(|e| format!("cannot write {}: {e}", index.display()))?;
        std::os::unix::fs::chown(&index, Some(uid), Some(gid))
            .map_err(|e| format!("cannot chown {}: {e}", index.display()))?;
        Ok(vec![
            format!("--log-bin={}", dir.join(&stem).display()),
            format!("--log-bin-index={}", index.display()),
            // Any server id: the copy replicates nothing (no networking, no replica start).
            "--server-id=4294967295".into(),
        ])
    }

    pub fn check(
        db: &Database,
        config: &MysqlConfig,
        copies: &Mapping,
        deadline: Instant,
    ) -> EngineResult {
        let error = |check: &'static str, text: String| (Outcome::Error, check, text);
        let Some(original) = path_of(db, "datadir") else {
            return Err(error("locate", "the hook reported no datadir".into()));
        };
        let Some(datadir) = copies.map(original) else {
            return Err(error(
                "locate",
                format!(
                    "datadir {} is on no volume of the set on this host",
                    original.display()
                ),
            ));
        };
        // Every InnoDB/Aria directory the server reported, on the copies; one that is on no
        // copied volume would make the copy's server open the original's files: refused.
        let mut dirs = Vec::new();
        for (what, option) in [
            ("innodb_log_group_home_dir", "innodb-log-group-home-dir"),
            ("innodb_undo_directory", "innodb-undo-directory"),
            ("innodb_data_home_dir", "innodb-data-home-dir"),
            ("aria_log_dir_path", "aria-log-dir-path"),
        ] {
            let Some(path) = path_of(db, what) else {
                continue;
            };
            let Some(copy) = copies.map(path) else {
                return Err(error(
                    "relink",
                    format!(
                        "{what} {} is on no volume of the set on this host: not started, so the drill cannot touch the original",
                        path.display()
                    ),
                ));
            };
            dirs.push(format!("--{option}={}", copy.display()));
        }
        let meta = std::fs::metadata(&datadir).map_err(|e| {
            (
                Outcome::Failed,
                "crash recovery",
                format!("the copy has no datadir {}: {e}", original.display()),
            )
        })?;
        let (uid, gid) = (meta.uid(), meta.gid());
        if uid == 0 {
            return Err(error(
                "start",
                "the copied datadir is owned by root; the drill runs the server as the datadir's owner, never as root".into(),
            ));
        }
        let Some(server_bin) = find(&["mariadbd", "mysqld"]) else {
            return Err(error("start", "no mariadbd or mysqld on this host".into()));
        };
        let Some(check_bin) = find(&["mariadb-check", "mysqlcheck"]) else {
            return Err(error(
                "start",
                "no mariadb-check or mysqlcheck on this host".into(),
            ));
        };
        // Socket, pid file and error log in the drill's private tmpfs.
        let run = copies.run_dir.join(format!("mysql-{}", db.hook));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&run)
            .map_err(|e| error("start", format!("cannot make {}: {e}", run.display())))?;
        std::os::unix::fs::chown(&run, Some(uid), Some(gid))
            .map_err(|e| error("start", format!("cannot chown {}: {e}", run.display())))?;
        let sock = run.join("mysqld.sock");
        let log_path = run.join("error.log");
        // A server with a binary log decides its XA-prepared transactions (the engine's
        // two-phase commit with the binlog) from the binlog at recovery: the copy's own binlog,
        // through a fresh index in the drill's run dir (the copied index names the original's
        // files). New binlog files go on the copy only.
        let binlog = binlog_args(db, copies, &run, uid, gid).map_err(|e| error("relink", e))?;
        let mut cmd = Command::new(&server_bin);
        // --no-defaults: nothing of the host's my.cnf (its binlog, replication, ports,
        // paths) applies to the copy.
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", datadir.display()))
            .arg(format!("--socket={}", sock.display()))
            .arg(format!("--pid-file={}", run.join("mysqld.pid").display()))
            .arg(format!("--log-error={}", log_path.display()))
            // InnoDB's temporary files: the drill's /tmp is root's (0755).
            .arg(format!("--tmpdir={}", run.display()))
            .args([
                "--skip-networking",
                "--skip-slave-start",
                "--skip-grant-tables",
                "--event-scheduler=DISABLED",
                "--loose-wsrep-on=OFF",
                "--innodb-buffer-pool-size=64M",
                "--innodb-flush-log-at-trx-commit=0",
            ])
            .args(&dirs)
            .args(&binlog);
        // The copy's redo log as it is (a different size would make the server rebuild it).
        let log_home = dirs
            .iter()
            .find_map(|d| d.strip_prefix("--innodb-log-group-home-dir="))
            .map(PathBuf::from)
            .unwrap_or_else(|| datadir.clone());
        if let Ok(m) = std::fs::metadata(log_home.join("ib_logfile0")) {
            cmd.arg(format!("--innodb-log-file-size={}", m.len()));
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .current_dir(&run)
            .uid(uid)
            .gid(gid);
        as_drill_child(&mut cmd);
        let child = cmd.spawn().map_err(|e| {
            error(
                "start",
                format!("cannot start {}: {e}", server_bin.display()),
            )
        })?;
        let mut server = Server {
            child,
            log: log_path,
        };
        let client = |program: &Path| {
            let mut cmd = Command::new(program);
            cmd.arg("--no-defaults")
                .arg(format!("--socket={}", sock.display()))
                .arg("--user=root")
                .current_dir(&run)
                .stdin(Stdio::null())
                .env_remove("MYSQL_PWD")
                .env_remove("MYSQL_HOST");
            cmd
        };
        let sql_bin = find(&["mariadb", "mysql"]);
        let t = Instant::now();
        // Ready once InnoDB crash recovery finished and the socket answers.
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err((
                    Outcome::Failed,
                    "crash recovery",
                    format!("the server exited ({status}):\n{}", tail(&server.log)),
                ));
            }
            if sock.exists()
                && let Some(sql) = &sql_bin
            {
                let mut ping = client(sql);
                // The client's own option (mariadb-check has none); every call is also
                // bounded by the drill's deadline.
                ping.args(["--connect-timeout=10", "-N", "-B", "-e", "SELECT 1"]);
                if run_until(&mut ping, deadline).is_ok_and(|(ok, _)| ok) {
                    break;
                }
            }
            if Instant::now() >= deadline {
                return Err((
                    Outcome::Error,
                    "crash recovery",
                    format!(
                        "not ready before the drill's deadline:\n{}",
                        tail(&server.log)
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let recovered_ms = t.elapsed().as_millis();
        let mut checks = "crash recovery".to_owned();
        let mut output = format!("crash recovery finished in {recovered_ms} ms");
        let name = check_bin
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let check_name: &'static str = if name == "mysqlcheck" {
            "mysqlcheck"
        } else {
            "mariadb-check"
        };
        let mut check = client(&check_bin);
        check.args(["--all-databases", "--check", "--extended"]);
        let (ok, text) = run_until(&mut check, deadline).map_err(|e| error(check_name, e))?;
        // Its report: `db.table  OK`, or the table's name followed by `error : …` lines.
        let bad: Vec<&str> = text
            .lines()
            .filter(|l| l.trim_start().to_ascii_lowercase().starts_with("error"))
            .collect();
        if !ok || !bad.is_empty() {
            let mut text = text;
            if let Ok(Some(status)) = server.child.try_wait() {
                text.push_str(&format!(
                    "\nthe server exited ({status}):\n{}",
                    tail(&server.log)
                ));
            }
            return Err((Outcome::Failed, check_name, text));
        }
        let tables = text
            .lines()
            .filter(|l| l.trim_end().ends_with(" OK"))
            .count();
        checks.push_str(&format!(", {check_name}"));
        output.push_str(&format!(
            "\n{check_name} --all-databases --check --extended: {tables} tables OK"
        ));
        if let (Some(sql), Some(expect)) = (&config.verify_probe, &config.verify_expect) {
            let Some(sql_bin) = &sql_bin else {
                return Err(error(
                    "probe",
                    "no mariadb or mysql client on this host".into(),
                ));
            };
            let mut probe = client(sql_bin);
            probe.args(["-N", "-B", "-e", sql]);
            let (ok, text) = run_until(&mut probe, deadline).map_err(|e| error("probe", e))?;
            let answer = text
                .lines()
                .next()
                .and_then(|l| l.split('\t').next())
                .unwrap_or("")
                .trim()
                .to_owned();
            if !ok || answer != expect.trim() {
                return Err((
                    Outcome::Failed,
                    "probe",
                    format!("{sql}: answered {:?}, expected {expect:?}", text.trim()),
                ));
            }
            checks.push_str(", probe");
            output.push_str(&format!("\nprobe: {answer}"));
        }
        server.stop();
        Ok((checks, output))
    }

    /// The drill's server: a clean shutdown (SIGTERM) on drop, then its process group is
    /// killed.
    struct Server {
        child: Child,
        log: PathBuf,
    }

    impl Server {
        fn stop(&mut self) {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            if matches!(self.child.try_wait(), Ok(None)) {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
                let until = Instant::now() + Duration::from_secs(60);
                while Instant::now() < until && matches!(self.child.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.stop();
        }
    }
}

/// The login name of `uid`, from the password database.
fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: passwd is plain old data; getpwuid_r writes only into `pwd` and `buf` (whose
    // length it is told) and sets `result` to `&pwd` or null.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(
            uid,
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        );
        if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
            return None;
        }
        Some(
            std::ffi::CStr::from_ptr(pwd.pw_name)
                .to_string_lossy()
                .into_owned(),
        )
    }
}

/// The child gets its own process group (killed as one) and dies with the drill's thread.
fn as_drill_child(cmd: &mut Command) {
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// Runs a short client command until it exits or `deadline`: (success, stdout + stderr).
fn run_until(cmd: &mut Command, deadline: Instant) -> Result<(bool, String), String> {
    let out_file = tempfile_in_memory()?;
    let err_file = out_file
        .try_clone()
        .map_err(|e| format!("cannot capture output: {e}"))?;
    cmd.stdout(Stdio::from(
        out_file
            .try_clone()
            .map_err(|e| format!("cannot capture output: {e}"))?,
    ))
    .stderr(Stdio::from(err_file));
    as_drill_child(cmd);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let pid = nix::unistd::Pid::from_raw(child.id() as i32);
                let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
                let _ = child.wait();
                return Err(format!(
                    "{:?} did not finish before the drill's deadline",
                    cmd.get_program()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("cannot wait for {:?}: {e}", cmd.get_program())),
        }
    };
    let mut text = String::new();
    let mut file = out_file;
    let _ = file.seek(SeekFrom::Start(0));
    let _ = file.read_to_string(&mut text);
    Ok((status.success(), text))
}

/// An anonymous in-memory file for a child's output (no disk, nothing to remove).
fn tempfile_in_memory() -> Result<File, String> {
    let fd =
        nix::sys::memfd::memfd_create(c"quiesce-verify", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .map_err(|e| format!("cannot capture output: {e}"))?;
    Ok(File::from(fd))
}

/// The end of a log file, capped.
fn tail(path: &Path) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()));
    cap(&text)
}

/// Makes a directory world-traversable (the databases run as their own users).
pub fn traversable(dir: &Path) -> std::io::Result<()> {
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o7777;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o711))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct FakeHost {
        log: Mutex<Vec<String>>,
        fail_mount: Option<String>,
    }

    impl DrillHost for FakeHost {
        fn enter_private_namespace(&self) -> Result<(), String> {
            self.log.lock().unwrap().push("unshare".into());
            Ok(())
        }
        fn mount_tmpfs(&self, at: &Path) -> Result<(), String> {
            self.log
                .lock()
                .unwrap()
                .push(format!("tmpfs {}", at.display()));
            Ok(())
        }
        fn mount_image(&self, image: &Path, at: &Path, _fs: &str) -> Result<(), String> {
            if self.fail_mount.as_deref() == image.to_str() {
                return Err("bad superblock".into());
            }
            self.log
                .lock()
                .unwrap()
                .push(format!("mount {} {}", image.display(), at.display()));
            Ok(())
        }
        fn unmount(&self, at: &Path) -> Result<(), String> {
            self.log
                .lock()
                .unwrap()
                .push(format!("umount {}", at.display()));
            Ok(())
        }
    }

    struct FakeChecks(Outcome);

    impl DatabaseChecks for FakeChecks {
        fn check(&self, db: &Database, copies: &Mapping, _deadline: Instant) -> Check {
            let data = copies.map(Path::new("/vol/a/pgdata")).unwrap();
            Check {
                name: db.hook.clone(),
                kind: "postgres".into(),
                outcome: self.0,
                check: "pg_amcheck --heapallindexed".into(),
                output: data.display().to_string(),
                duration: Duration::ZERO,
            }
        }
    }

    fn plan(root: &Path) -> Plan {
        Plan {
            root: root.to_owned(),
            copies: vec![
                Copy {
                    mount_point: "/vol/a".into(),
                    image: root.join("images/a.img"),
                    fs_type: "ext4".into(),
                },
                Copy {
                    mount_point: "/vol/b".into(),
                    image: root.join("images/b.img"),
                    fs_type: "xfs".into(),
                },
            ],
            databases: vec![Database {
                hook: "pg".into(),
                config: None,
                paths: Vec::new(),
                problem: String::new(),
                backup_label: String::new(),
                tablespace_map: String::new(),
            }],
            deadline: Instant::now() + Duration::from_secs(5),
        }
    }

    #[test]
    fn a_drill_mounts_checks_on_the_copies_and_unmounts_in_reverse() {
        let dir = tempfile::tempdir().unwrap();
        let host = FakeHost::default();
        let report = run(&plan(dir.path()), &host, &FakeChecks(Outcome::Passed));
        assert_eq!(report.outcome(), Outcome::Passed, "{report:?}");
        let db = report.checks.iter().find(|c| c.name == "pg").unwrap();
        assert_eq!(
            db.output,
            dir.path().join("mnt/0/pgdata").display().to_string()
        );
        let log = host.log.lock().unwrap().clone();
        let mnt = |i: u32| dir.path().join(format!("mnt/{i}")).display().to_string();
        assert_eq!(
            log,
            vec![
                "unshare".to_string(),
                "tmpfs /tmp".into(),
                format!("mount {}/images/a.img {}", dir.path().display(), mnt(0)),
                format!("mount {}/images/b.img {}", dir.path().display(), mnt(1)),
                format!("umount {}", mnt(1)),
                format!("umount {}", mnt(0)),
                "umount /tmp".into(),
            ]
        );
        assert!(report.teardown.is_empty());
    }

    #[test]
    fn a_failed_check_fails_the_drill_and_a_copy_that_does_not_mount_starts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let report = run(
            &plan(dir.path()),
            &FakeHost::default(),
            &FakeChecks(Outcome::Failed),
        );
        assert_eq!(report.outcome(), Outcome::Failed);
        let bad = dir.path().join("images/b.img").display().to_string();
        let host = FakeHost {
            fail_mount: Some(bad),
            ..Default::default()
        };
        let report = run(&plan(dir.path()), &host, &FakeChecks(Outcome::Passed));
        assert_eq!(report.outcome(), Outcome::Failed);
        let fs = report.checks.iter().find(|c| c.name == "/vol/b").unwrap();
        assert_eq!(fs.outcome, Outcome::Failed);
        assert!(fs.output.contains("bad superblock"));
        let db = report.checks.iter().find(|c| c.name == "pg").unwrap();
        assert_eq!(db.check, "mount");
        let log = host.log.lock().unwrap().clone();
        assert_eq!(
            log.last().map(String::as_str),
            Some("umount /tmp"),
            "{log:?}"
        );
        assert!(
            log.iter()
                .any(|l| l.starts_with("umount") && l.ends_with("mnt/0"))
        );
    }

    #[test]
    fn paths_map_onto_the_longest_copied_mount_and_outside_is_none() {
        let mapping = Mapping {
            mounts: vec![
                ("/vol".into(), "/d/mnt/0".into()),
                ("/vol/wal".into(), "/d/mnt/1".into()),
            ],
            run_dir: "/tmp".into(),
        };
        assert_eq!(
            mapping.map(Path::new("/vol/wal/pg_wal")),
            Some(PathBuf::from("/d/mnt/1/pg_wal"))
        );
        assert_eq!(
            mapping.map(Path::new("/vol")),
            Some(PathBuf::from("/d/mnt/0"))
        );
        assert_eq!(mapping.map(Path::new("/volume2/x")), None);
        assert_eq!(mapping.map(Path::new("/var/lib/pg")), None);
    }

    #[test]
    fn outputs_keep_their_end() {
        let long = format!("{}END", "x".repeat(10_000));
        let capped = cap(&long);
        assert!(capped.ends_with("END"));
        assert!(capped.chars().count() <= OUTPUT_CAP + 1);
    }
}
