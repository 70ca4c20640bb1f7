//! Database and script hooks: the database's own view of the cut, taken around the freeze.
//!
//! Phases, per set and per hook, in the order the coordinator names them:
//! - **prepare** (before any freeze; slow work allowed): open every connection, file and
//!   process the later phases need, and do the slow work (checkpoints, table flushes).
//! - **quiesce** (just before the first FIFREEZE): take locks in the sessions opened by prepare.
//!   Nothing here may open anything new: the filesystems are about to be frozen.
//! - **resume** (after the last FITHAW): release the locks, read final positions. Runs in
//!   reverse order for every hook whose quiesce *started* — also the one that failed or timed
//!   out, so that a half-taken lock is released — on every path: thaw, freeze failure, lease
//!   expiry, max-freeze, shutdown.
//!
//! Each phase has its own timeout per hook; a hook that overruns fails the set. Connection
//! details and credentials live only in the agent's config; the coordinator names hooks.

pub mod exec;
pub mod mysql;
pub mod postgres;
pub mod sqlite;

#[cfg(test)]
pub mod fake;

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::mounts::MountTable;

/// What a hook phase returns on failure: one line naming the cause (and the fix, when known).
pub type HookResult<T> = Result<T, String>;

/// The set a hook works for.
#[derive(Debug, Clone, Default)]
pub struct HookContext {
    pub set_id: String,
    pub mounts: Vec<PathBuf>,
}

/// A path the database writes, for the completeness check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbPath {
    /// What it is: `data_directory`, `pg_wal`, `tablespace ts1`, `datadir`, ...
    pub what: String,
    pub path: PathBuf,
}

/// A configured hook: knows how to start a session for one set.
#[tonic::async_trait]
pub trait Hook: Send + Sync {
    fn kind(&self) -> &'static str;
    /// Every path the database writes (empty for script hooks).
    async fn paths(&self) -> HookResult<Vec<DbPath>>;
    /// Opens what later phases need and does the slow work.
    async fn prepare(&self, ctx: &HookContext) -> HookResult<Box<dyn HookSession>>;
}

/// One hook's live session for one set, from prepare to resume.
#[tonic::async_trait]
pub trait HookSession: Send {
    /// Takes the locks. Opens nothing new.
    async fn quiesce(&mut self) -> HookResult<()>;
    /// Releases the locks and reads final positions. `froze` is false when the freeze never
    /// happened (a quiesce or FIFREEZE failed): script hooks then get `freeze-fail`. Must cope
    /// with a quiesce that failed or was cut off by its timeout half way.
    async fn resume(&mut self, froze: bool) -> HookResult<()>;
    /// A prepared session that will never quiesce (the set failed before the freeze).
    async fn release(&mut self) {}
    /// Key/value output recorded so far (positions, label, ...).
    fn output(&self) -> HookValues;
}

/// What one hook recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HookValues {
    pub values: Vec<(String, String)>,
    /// PostgreSQL backup mode: `labelfile` and `spcmapfile` of `pg_backup_stop()`, as returned.
    pub backup_label: String,
    pub tablespace_map: String,
}

impl HookValues {
    pub fn set(&mut self, key: &str, value: impl Into<String>) {
        let value = value.into();
        match self.values.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => self.values.push((key.to_owned(), value)),
        }
    }
}

/// What one hook reports at the end of a set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HookOutput {
    pub hook: String,
    pub kind: String,
    pub values: HookValues,
    /// Why the resume failed (empty when it did not).
    pub error: String,
    pub quiesce_ms: u64,
    pub resume_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("hook {name} is not configured on this agent (configured: {known})")]
    Unknown { name: String, known: String },
    #[error("hook {name} is named twice")]
    Duplicate { name: String },
    #[error("set {set_id} names hooks [{wanted}] at freeze, but prepared [{prepared}]")]
    NotPrepared {
        set_id: String,
        wanted: String,
        prepared: String,
    },
    #[error("hook {hook}: {phase} did not finish within {timeout}")]
    Timeout {
        hook: String,
        phase: &'static str,
        timeout: String,
    },
    #[error("hook {hook}: {phase} failed: {message}")]
    Failed {
        hook: String,
        phase: &'static str,
        message: String,
    },
}

impl HookError {
    pub fn code(&self) -> tonic::Code {
        match self {
            HookError::Unknown { .. } => tonic::Code::FailedPrecondition,
            HookError::Duplicate { .. } => tonic::Code::InvalidArgument,
            HookError::NotPrepared { .. } => tonic::Code::FailedPrecondition,
            HookError::Timeout { .. } => tonic::Code::DeadlineExceeded,
            HookError::Failed { .. } => tonic::Code::Aborted,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Config

/// `[hook.NAME]` in the agent's config.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum HookConfig {
    Postgres(postgres::PostgresConfig),
    Mysql(mysql::MysqlConfig),
    Sqlite(sqlite::SqliteConfig),
    Exec(exec::ExecConfig),
}

/// Per-phase deadlines of one hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub prepare: Duration,
    pub quiesce: Duration,
    pub resume: Duration,
}

pub fn default_prepare_timeout() -> Duration {
    Duration::from_secs(60)
}
pub fn default_quiesce_timeout() -> Duration {
    Duration::from_secs(10)
}
pub fn default_resume_timeout() -> Duration {
    Duration::from_secs(60)
}

impl HookConfig {
    pub fn timeouts(&self) -> Timeouts {
        match self {
            HookConfig::Postgres(c) => c.timeouts(),
            HookConfig::Mysql(c) => c.timeouts(),
            HookConfig::Sqlite(c) => c.timeouts(),
            HookConfig::Exec(c) => c.timeouts(),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            HookConfig::Postgres(_) => "postgres",
            HookConfig::Mysql(_) => "mysql",
            HookConfig::Sqlite(_) => "sqlite",
            HookConfig::Exec(_) => "exec",
        }
    }

    /// Problems with the config itself (no file system access).
    pub fn problems(&self, name: &str) -> Vec<String> {
        let mut problems = Vec::new();
        if !valid_hook_name(name) {
            problems.push(format!(
                "hook name {name:?} must be 1-64 characters of [A-Za-z0-9_-]"
            ));
        }
        let t = self.timeouts();
        for (phase, value) in [
            ("prepare", t.prepare),
            ("quiesce", t.quiesce),
            ("resume", t.resume),
        ] {
            if value.is_zero() {
                problems.push(format!(
                    "hook {name}: {phase}-timeout must be longer than 0s"
                ));
            }
        }
        let absolute = |what: &str, path: &Path, problems: &mut Vec<String>| {
            if !path.is_absolute() {
                problems.push(format!(
                    "hook {name}: {what} {} must be an absolute path",
                    path.display()
                ));
            }
        };
        let probe = match self {
            HookConfig::Postgres(c) => (&c.verify_probe, &c.verify_expect),
            HookConfig::Sqlite(c) => (&c.verify_probe, &c.verify_expect),
            HookConfig::Mysql(c) => (&c.verify_probe, &c.verify_expect),
            HookConfig::Exec(_) => (&None, &None),
        };
        if probe.0.is_some() != probe.1.is_some() {
            problems.push(format!(
                "hook {name}: verify-probe and verify-expect go together (the query and the answer it must give)"
            ));
        }
        match self {
            HookConfig::Postgres(c) => {
                if let Some(p) = &c.password_file {
                    absolute("password-file", p, &mut problems);
                }
                if !is_local_host(&c.host) {
                    problems.push(format!(
                        "hook {name}: host {} must be a unix socket directory or a loopback address",
                        c.host
                    ));
                }
            }
            HookConfig::Mysql(c) => {
                if let Some(p) = &c.password_file {
                    absolute("password-file", p, &mut problems);
                }
                if let Some(socket) = &c.socket {
                    absolute("socket", socket, &mut problems);
                }
                if c.socket.is_none() && !is_local_host(&c.host) {
                    problems.push(format!(
                        "hook {name}: host {} must be a loopback address (or set socket)",
                        c.host
                    ));
                }
                if c.lock_wait_timeout.is_zero() {
                    problems.push(format!(
                        "hook {name}: lock-wait-timeout must be longer than 0s"
                    ));
                }
            }
            HookConfig::Sqlite(c) => absolute("path", &c.path, &mut problems),
            HookConfig::Exec(c) => absolute("dir", &c.dir, &mut problems),
        }
        problems
    }

    /// Problems found on this host: secrets and scripts must be private to root.
    pub fn file_problems(&self, name: &str) -> Vec<String> {
        let mut problems = Vec::new();
        let password_file = match self {
            HookConfig::Postgres(c) => c.password_file.as_deref(),
            HookConfig::Mysql(c) => c.password_file.as_deref(),
            _ => None,
        };
        if let Some(path) = password_file
            && let Err(e) = check_private_file(path)
        {
            problems.push(format!("hook {name}: {e}"));
        }
        if let HookConfig::Exec(c) = self
            && let Err(e) = exec::scripts(&c.dir)
        {
            problems.push(format!("hook {name}: {e}"));
        }
        problems
    }
}

pub fn valid_hook_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Hooks run on the database host: only unix sockets (absolute paths) and loopback addresses.
fn is_local_host(host: &str) -> bool {
    host.starts_with('/') || matches!(host, "localhost" | "127.0.0.1" | "::1")
}

/// The agent's effective uid: files it trusts must be owned by it (root in production).
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// A secret (or a config holding hooks) must be owned by the agent's user and readable by
/// nobody else.
pub fn check_private_file(path: &Path) -> Result<(), String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let uid = effective_uid();
    if meta.uid() != uid {
        return Err(format!(
            "{} is owned by uid {}, not by the agent's uid {uid}",
            path.display(),
            meta.uid()
        ));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} has mode {mode:04o}: it holds secrets and must not be readable by group or others (chmod 600)",
            path.display()
        ));
    }
    Ok(())
}

/// Reads a password file (checked private), trimming one trailing newline.
pub fn read_password(path: &Path) -> HookResult<String> {
    check_private_file(path)?;
    let mut text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read password file {}: {e}", path.display()))?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    Ok(text)
}

// ---------------------------------------------------------------------------------------------
// Registry and the per-set runner

/// The hooks this agent knows, by name.
#[derive(Clone, Default)]
pub struct HookRegistry {
    hooks: BTreeMap<String, (Arc<dyn Hook>, Timeouts)>,
}

impl HookRegistry {
    pub fn from_config(hooks: &BTreeMap<String, HookConfig>) -> HookRegistry {
        let mut registry = HookRegistry::default();
        for (name, config) in hooks {
            let hook: Arc<dyn Hook> = match config {
                HookConfig::Postgres(c) => Arc::new(postgres::PostgresHook::new(c.clone())),
                HookConfig::Mysql(c) => Arc::new(mysql::MysqlHook::new(name, c.clone())),
                HookConfig::Sqlite(c) => Arc::new(sqlite::SqliteHook::new(c.clone())),
                HookConfig::Exec(c) => Arc::new(exec::ExecHook::new(name, c.clone())),
            };
            registry.insert(name, hook, config.timeouts());
        }
        registry
    }

    pub fn insert(&mut self, name: &str, hook: Arc<dyn Hook>, timeouts: Timeouts) {
        self.hooks.insert(name.to_owned(), (hook, timeouts));
    }

    pub fn is_empty(&self) -> bool {
        self.hooks.is_empty()
    }

    pub fn get(&self, name: &str) -> Result<(Arc<dyn Hook>, Timeouts), HookError> {
        self.hooks
            .get(name)
            .cloned()
            .ok_or_else(|| HookError::Unknown {
                name: name.to_owned(),
                known: if self.hooks.is_empty() {
                    "none".into()
                } else {
                    self.hooks.keys().cloned().collect::<Vec<_>>().join(", ")
                },
            })
    }

    /// Every path each named hook's database writes, resolved to the mount holding it.
    pub async fn describe(
        &self,
        names: &[String],
        mounts: &dyn MountTable,
    ) -> Vec<HookDescription> {
        let mut out = Vec::new();
        for name in names {
            let mut description = HookDescription {
                name: name.clone(),
                ..Default::default()
            };
            match self.get(name) {
                Err(e) => description.problem = e.to_string(),
                Ok((hook, timeouts)) => {
                    description.kind = hook.kind().into();
                    match tokio::time::timeout(timeouts.prepare, hook.paths()).await {
                        Err(_) => {
                            description.problem = HookError::Timeout {
                                hook: name.clone(),
                                phase: "describe",
                                timeout: humantime::format_duration(timeouts.prepare).to_string(),
                            }
                            .to_string()
                        }
                        Ok(Err(message)) => {
                            description.problem = HookError::Failed {
                                hook: name.clone(),
                                phase: "describe",
                                message,
                            }
                            .to_string()
                        }
                        Ok(Ok(paths)) => {
                            for path in paths {
                                let resolved = resolve_path(&path.path);
                                let mount = mount_of(mounts, &resolved);
                                description.paths.push(DescribedPath {
                                    what: path.what,
                                    path: resolved,
                                    mount_point: mount,
                                });
                            }
                        }
                    }
                }
            }
            out.push(description);
        }
        out
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HookDescription {
    pub name: String,
    pub kind: String,
    pub paths: Vec<DescribedPath>,
    pub problem: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescribedPath {
    pub what: String,
    /// With symlinks resolved (`pg_wal` is often one).
    pub path: PathBuf,
    /// The mount point of the filesystem holding it, `None` when unknown.
    pub mount_point: Option<PathBuf>,
}

/// Resolves symlinks; for a file that does not exist yet (`-wal`), resolves its directory.
pub fn resolve_path(path: &Path) -> PathBuf {
    if let Ok(real) = std::fs::canonicalize(path) {
        return real;
    }
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => resolve_path(parent).join(name),
        _ => path.to_owned(),
    }
}

/// The mount point holding `path`: the longest mount point that is a prefix of it.
pub fn mount_of(table: &dyn MountTable, path: &Path) -> Option<PathBuf> {
    table
        .entries()
        .ok()?
        .into_iter()
        .filter(|entry| path.starts_with(&entry.mount_point))
        .max_by_key(|entry| entry.mount_point.as_os_str().len())
        .map(|entry| entry.mount_point)
}

struct Entry {
    name: String,
    kind: &'static str,
    timeouts: Timeouts,
    session: Box<dyn HookSession>,
    quiesce_started: bool,
    quiesce_ms: u64,
}

/// The hook sessions of one set, in the order the coordinator named them.
pub struct HookSet {
    set_id: String,
    entries: Vec<Entry>,
    prepared_at: Instant,
}

impl std::fmt::Debug for HookSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HookSet")
            .field("set_id", &self.set_id)
            .field("hooks", &self.names())
            .finish()
    }
}

impl HookSet {
    /// Prepares every named hook in order. On a failure the ones already prepared are
    /// released and the error names the hook.
    pub async fn prepare(
        registry: &HookRegistry,
        names: &[String],
        ctx: &HookContext,
    ) -> Result<HookSet, HookError> {
        let mut seen = std::collections::HashSet::new();
        let mut resolved = Vec::new();
        for name in names {
            if !seen.insert(name) {
                return Err(HookError::Duplicate { name: name.clone() });
            }
            resolved.push((name.clone(), registry.get(name)?));
        }
        let mut set = HookSet {
            set_id: ctx.set_id.clone(),
            entries: Vec::new(),
            prepared_at: Instant::now(),
        };
        for (name, (hook, timeouts)) in resolved {
            let started = Instant::now();
            let result = tokio::time::timeout(timeouts.prepare, hook.prepare(ctx)).await;
            let session = match result {
                Ok(Ok(session)) => session,
                Ok(Err(message)) => {
                    set.release().await;
                    return Err(HookError::Failed {
                        hook: name,
                        phase: "prepare",
                        message,
                    });
                }
                Err(_) => {
                    set.release().await;
                    return Err(HookError::Timeout {
                        hook: name,
                        phase: "prepare",
                        timeout: humantime::format_duration(timeouts.prepare).to_string(),
                    });
                }
            };
            info!(set_id = %ctx.set_id, hook = %name, ms = started.elapsed().as_millis() as u64, "hook prepared");
            set.entries.push(Entry {
                name,
                kind: hook.kind(),
                timeouts,
                session,
                quiesce_started: false,
                quiesce_ms: 0,
            });
        }
        Ok(set)
    }

    pub fn names(&self) -> Vec<String> {
        self.entries.iter().map(|e| e.name.clone()).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn age(&self) -> Duration {
        self.prepared_at.elapsed()
    }

    /// Quiesces every hook in order. On a failure (or timeout) every hook whose quiesce
    /// started — the failing one included — is resumed in reverse order before the error
    /// returns, with `froze = false`.
    pub async fn quiesce(&mut self) -> Result<(), (HookError, Vec<HookOutput>)> {
        for index in 0..self.entries.len() {
            let entry = &mut self.entries[index];
            entry.quiesce_started = true;
            let started = Instant::now();
            let result =
                tokio::time::timeout(entry.timeouts.quiesce, entry.session.quiesce()).await;
            entry.quiesce_ms = started.elapsed().as_millis() as u64;
            let err = match result {
                Ok(Ok(())) => continue,
                Ok(Err(message)) => HookError::Failed {
                    hook: entry.name.clone(),
                    phase: "quiesce",
                    message,
                },
                Err(_) => HookError::Timeout {
                    hook: entry.name.clone(),
                    phase: "quiesce",
                    timeout: humantime::format_duration(entry.timeouts.quiesce).to_string(),
                },
            };
            warn!(set_id = %self.set_id, error = %err, "hook quiesce failed; resuming the hooks that quiesced");
            let outputs = self.resume(false).await;
            return Err((err, outputs));
        }
        Ok(())
    }

    /// Resumes, in reverse order, every hook whose quiesce started; releases the others.
    /// Never fails: a resume error is recorded in that hook's output.
    pub async fn resume(&mut self, froze: bool) -> Vec<HookOutput> {
        let mut outputs = Vec::new();
        for entry in self.entries.iter_mut().rev() {
            if !entry.quiesce_started {
                entry.session.release().await;
                continue;
            }
            entry.quiesce_started = false;
            let started = Instant::now();
            let result =
                tokio::time::timeout(entry.timeouts.resume, entry.session.resume(froze)).await;
            let error = match result {
                Ok(Ok(())) => String::new(),
                Ok(Err(message)) => HookError::Failed {
                    hook: entry.name.clone(),
                    phase: "resume",
                    message,
                }
                .to_string(),
                Err(_) => HookError::Timeout {
                    hook: entry.name.clone(),
                    phase: "resume",
                    timeout: humantime::format_duration(entry.timeouts.resume).to_string(),
                }
                .to_string(),
            };
            if !error.is_empty() {
                warn!(set_id = %self.set_id, %error, "hook resume failed");
            }
            outputs.push(HookOutput {
                hook: entry.name.clone(),
                kind: entry.kind.into(),
                values: entry.session.output(),
                error,
                quiesce_ms: entry.quiesce_ms,
                resume_ms: started.elapsed().as_millis() as u64,
            });
        }
        // Report in the configured order.
        outputs.reverse();
        outputs
    }

    /// The set ends before any quiesce: close every session.
    pub async fn release(&mut self) {
        for entry in self.entries.iter_mut().rev() {
            entry.session.release().await;
        }
        self.entries.clear();
    }
}

/// Prepared hook sessions waiting for their set's freeze.
#[derive(Default)]
pub struct PreparedSets {
    sets: std::sync::Mutex<HashMap<String, HookSet>>,
}

impl PreparedSets {
    /// Stores a prepared set; returns the one it replaces (a repeated prepare) and every set
    /// prepared longer ago than `ttl` (its coordinator never came back).
    pub fn insert(&self, set: HookSet, ttl: Duration) -> Vec<HookSet> {
        let mut sets = self.sets.lock().unwrap();
        let stale: Vec<String> = sets
            .iter()
            .filter(|(_, s)| s.age() > ttl)
            .map(|(id, _)| id.clone())
            .collect();
        let mut dropped: Vec<HookSet> = stale.iter().filter_map(|id| sets.remove(id)).collect();
        if let Some(old) = sets.insert(set.set_id.clone(), set) {
            dropped.push(old);
        }
        dropped
    }

    pub fn take(&self, set_id: &str) -> Option<HookSet> {
        self.sets.lock().unwrap().remove(set_id)
    }

    /// Takes the set only if it was prepared at least `ttl` ago (not a newer prepare of the
    /// same id).
    pub fn take_expired(&self, set_id: &str, ttl: Duration) -> Option<HookSet> {
        let mut sets = self.sets.lock().unwrap();
        if sets.get(set_id).is_some_and(|s| s.age() >= ttl) {
            sets.remove(set_id)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{FakeHook, Script};
    use super::*;

    fn timeouts(ms: u64) -> Timeouts {
        Timeouts {
            prepare: Duration::from_millis(ms),
            quiesce: Duration::from_millis(ms),
            resume: Duration::from_millis(ms),
        }
    }

    fn registry(hooks: &[(&str, &FakeHook)]) -> HookRegistry {
        let mut registry = HookRegistry::default();
        for (name, hook) in hooks {
            registry.insert(name, Arc::new((*hook).clone()), timeouts(200));
        }
        registry
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn resume_runs_in_reverse_order_of_quiesce() {
        let log = fake::Log::default();
        let a = FakeHook::new("a", &log, Script::default());
        let b = FakeHook::new("b", &log, Script::default());
        let reg = registry(&[("a", &a), ("b", &b)]);
        let mut set = HookSet::prepare(&reg, &names(&["a", "b"]), &HookContext::default())
            .await
            .unwrap();
        set.quiesce().await.unwrap();
        let outputs = set.resume(true).await;
        assert_eq!(
            log.lines(),
            [
                "a prepare",
                "b prepare",
                "a quiesce",
                "b quiesce",
                "b resume froze=true",
                "a resume froze=true"
            ]
        );
        assert_eq!(outputs.len(), 2);
        assert_eq!(outputs[0].hook, "a");
        assert!(outputs.iter().all(|o| o.error.is_empty()));
        // A second resume does nothing: every quiesced hook is resumed exactly once.
        assert!(set.resume(true).await.is_empty());
    }

    #[tokio::test]
    async fn a_quiesce_failure_resumes_the_failing_hook_and_those_before_it_only() {
        let log = fake::Log::default();
        let a = FakeHook::new("a", &log, Script::default());
        let b = FakeHook::new(
            "b",
            &log,
            Script {
                fail_quiesce: Some("lock refused".into()),
                ..Default::default()
            },
        );
        let c = FakeHook::new("c", &log, Script::default());
        let reg = registry(&[("a", &a), ("b", &b), ("c", &c)]);
        let mut set = HookSet::prepare(&reg, &names(&["a", "b", "c"]), &HookContext::default())
            .await
            .unwrap();
        let (err, outputs) = set.quiesce().await.unwrap_err();
        assert_eq!(err.to_string(), "hook b: quiesce failed: lock refused");
        assert_eq!(
            log.lines()[3..],
            [
                "a quiesce",
                "b quiesce",
                "c release",
                "b resume froze=false",
                "a resume froze=false"
            ]
        );
        assert_eq!(outputs.len(), 2);
    }

    #[tokio::test]
    async fn a_quiesce_that_overruns_its_timeout_fails_and_is_resumed() {
        let log = fake::Log::default();
        let a = FakeHook::new("a", &log, Script::default());
        let slow = FakeHook::new(
            "slow",
            &log,
            Script {
                quiesce_delay: Duration::from_secs(5),
                ..Default::default()
            },
        );
        let reg = registry(&[("a", &a), ("slow", &slow)]);
        let mut set = HookSet::prepare(&reg, &names(&["a", "slow"]), &HookContext::default())
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let (err, _) = set.quiesce().await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(
            matches!(err, HookError::Timeout { ref hook, phase: "quiesce", .. } if hook == "slow"),
            "{err}"
        );
        assert_eq!(
            log.lines()[2..],
            [
                "a quiesce",
                "slow quiesce",
                "slow resume froze=false",
                "a resume froze=false"
            ]
        );
    }

    #[tokio::test]
    async fn a_failed_prepare_releases_the_hooks_prepared_before_it() {
        let log = fake::Log::default();
        let a = FakeHook::new("a", &log, Script::default());
        let b = FakeHook::new(
            "b",
            &log,
            Script {
                fail_prepare: Some("password authentication failed".into()),
                ..Default::default()
            },
        );
        let reg = registry(&[("a", &a), ("b", &b)]);
        let err = HookSet::prepare(&reg, &names(&["a", "b"]), &HookContext::default())
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "hook b: prepare failed: password authentication failed"
        );
        assert_eq!(log.lines(), ["a prepare", "b prepare", "a release"]);
    }

    #[tokio::test]
    async fn a_resume_failure_is_reported_and_the_others_still_resume() {
        let log = fake::Log::default();
        let a = FakeHook::new("a", &log, Script::default());
        let b = FakeHook::new(
            "b",
            &log,
            Script {
                fail_resume: Some("pg_backup_stop failed".into()),
                ..Default::default()
            },
        );
        let reg = registry(&[("a", &a), ("b", &b)]);
        let mut set = HookSet::prepare(&reg, &names(&["a", "b"]), &HookContext::default())
            .await
            .unwrap();
        set.quiesce().await.unwrap();
        let outputs = set.resume(true).await;
        assert_eq!(
            outputs[1].error,
            "hook b: resume failed: pg_backup_stop failed"
        );
        assert!(outputs[0].error.is_empty());
        assert!(log.lines().contains(&"a resume froze=true".to_string()));
    }

    #[tokio::test]
    async fn unknown_and_duplicate_hooks_are_refused_by_name() {
        let log = fake::Log::default();
        let a = FakeHook::new("a", &log, Script::default());
        let reg = registry(&[("a", &a)]);
        let err = HookSet::prepare(&reg, &names(&["a", "pg"]), &HookContext::default())
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "hook pg is not configured on this agent (configured: a)"
        );
        let err = HookSet::prepare(&reg, &names(&["a", "a"]), &HookContext::default())
            .await
            .unwrap_err();
        assert!(matches!(err, HookError::Duplicate { .. }));
        assert!(log.lines().is_empty(), "nothing prepared");
    }

    #[test]
    fn hook_config_is_tagged_by_type_and_refuses_unknown_keys() {
        let text = r#"
listen = "127.0.0.1:1"
state-dir = "/run/q"
[hook.pg-main]
type = "postgres"
host = "/var/run/postgresql"
user = "quiesce"
password-file = "/etc/quiesce/pg.password"
mode = "backup"
quiesce-timeout = "2s"
[hook.app]
type = "sqlite"
path = "/mnt/data/app.db"
[hook.scripts]
type = "exec"
dir = "/etc/quiesce/hooks.d"
[hook.maria]
type = "mysql"
socket = "/run/mysqld/mysqld.sock"
user = "root"
"#;
        let config = crate::config::Config::parse(text).unwrap();
        assert_eq!(config.hooks.len(), 4);
        let pg = &config.hooks["pg-main"];
        assert_eq!(pg.kind(), "postgres");
        assert_eq!(pg.timeouts().quiesce, Duration::from_secs(2));
        assert!(
            config.problems(true).is_empty(),
            "{:?}",
            config.problems(true)
        );
        let bad = text.replace("mode = \"backup\"", "pasword = \"x\"");
        let err = crate::config::Config::parse(&bad).unwrap_err();
        assert!(err.to_string().contains("pasword"), "{err}");
        let remote = text.replace("/var/run/postgresql", "db.example.com");
        let problems = crate::config::Config::parse(&remote)
            .unwrap()
            .problems(true);
        assert!(
            problems.iter().any(|p| p.contains("loopback")),
            "{problems:?}"
        );
    }

    #[test]
    fn secrets_readable_by_others_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_password(&path).unwrap_err();
        assert!(err.contains("mode 0644"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_password(&path).unwrap(), "s3cret");
    }

    #[test]
    fn paths_resolve_symlinks_and_missing_files_to_their_mount() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("wal-volume/pg_wal");
        std::fs::create_dir_all(&real).unwrap();
        let link = dir.path().join("data/pg_wal");
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let resolved = resolve_path(&link);
        assert_eq!(resolved, std::fs::canonicalize(&real).unwrap());
        let missing = resolve_path(&link.join("000001.wal"));
        assert!(missing.starts_with(std::fs::canonicalize(&real).unwrap()));
    }
}
