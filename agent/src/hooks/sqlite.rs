//! SQLite hook: prepare opens the one connection of the set and runs
//! `PRAGMA wal_checkpoint(TRUNCATE)` (so the snapshot's WAL is short); quiesce takes the write
//! lock with `BEGIN IMMEDIATE` (writers wait, readers go on); resume `ROLLBACK`s it.
//!
//! rusqlite is blocking: every call runs on the blocking pool. `BEGIN IMMEDIATE` is retried
//! every millisecond (SQLite's own busy handler backs off to 100 ms and starves behind busy
//! writers) until 90% of the quiesce timeout, so it gives up on its own rather than outliving
//! the phase.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use serde::Deserialize;

use super::{DbPath, Hook, HookContext, HookResult, HookSession, HookValues, Timeouts};

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SqliteConfig {
    /// The database file.
    pub path: PathBuf,
    /// Restore drills (`quiescectl verify`): a query run on the restored copy after the
    /// engine's own checks, and the answer it must give (first column of the first row, as
    /// text). Both or neither.
    #[serde(default)]
    pub verify_probe: Option<String>,
    #[serde(default)]
    pub verify_expect: Option<String>,
    #[serde(default = "super::default_prepare_timeout", with = "humantime_serde")]
    pub prepare_timeout: Duration,
    #[serde(default = "super::default_quiesce_timeout", with = "humantime_serde")]
    pub quiesce_timeout: Duration,
    #[serde(default = "super::default_resume_timeout", with = "humantime_serde")]
    pub resume_timeout: Duration,
}

impl SqliteConfig {
    pub fn timeouts(&self) -> Timeouts {
        Timeouts {
            prepare: self.prepare_timeout,
            quiesce: self.quiesce_timeout,
            resume: self.resume_timeout,
        }
    }
}

pub struct SqliteHook {
    config: SqliteConfig,
}

impl SqliteHook {
    pub fn new(config: SqliteConfig) -> Self {
        SqliteHook { config }
    }
}

/// Runs `f` on the connection on the blocking pool.
async fn blocking<T: Send + 'static>(
    conn: &Arc<Mutex<Connection>>,
    f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
) -> HookResult<T> {
    let conn = conn.clone();
    tokio::task::spawn_blocking(move || {
        let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&conn)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())
}

#[tonic::async_trait]
impl Hook for SqliteHook {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    async fn paths(&self) -> HookResult<Vec<DbPath>> {
        let db = &self.config.path;
        let with_suffix = |suffix: &str| {
            let mut name = db.as_os_str().to_owned();
            name.push(suffix);
            PathBuf::from(name)
        };
        Ok(vec![
            DbPath {
                what: "database".into(),
                path: db.clone(),
            },
            DbPath {
                what: "-wal".into(),
                path: with_suffix("-wal"),
            },
            DbPath {
                what: "-shm".into(),
                path: with_suffix("-shm"),
            },
        ])
    }

    async fn prepare(&self, _ctx: &HookContext) -> HookResult<Box<dyn HookSession>> {
        let path = self.config.path.clone();
        let busy = self.config.quiesce_timeout;
        let conn = tokio::task::spawn_blocking(move || -> HookResult<Connection> {
            if !path.is_file() {
                return Err(format!("{} does not exist", path.display()));
            }
            let conn = Connection::open_with_flags(
                &path,
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            conn.busy_timeout(busy).map_err(|e| e.to_string())?;
            Ok(conn)
        })
        .await
        .map_err(|e| e.to_string())??;
        let conn = Arc::new(Mutex::new(conn));
        let mut values = HookValues::default();
        let (mode, busy_ckpt, log, checkpointed) = blocking(&conn, |c| {
            let mode: String = c.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
            let (busy, log, done) = c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })?;
            Ok((mode, busy, log, done))
        })
        .await?;
        values.set("journal-mode", mode);
        values.set(
            "prepare-checkpoint",
            format!("busy={busy_ckpt} log={log} checkpointed={checkpointed}"),
        );
        Ok(Box::new(SqliteSession {
            conn,
            in_transaction: false,
            lock_for: self.config.quiesce_timeout.mul_f64(0.9),
            values,
        }))
    }
}

struct SqliteSession {
    conn: Arc<Mutex<Connection>>,
    in_transaction: bool,
    /// How long `BEGIN IMMEDIATE` keeps trying.
    lock_for: Duration,
    values: HookValues,
}

#[tonic::async_trait]
impl HookSession for SqliteSession {
    async fn quiesce(&mut self) -> HookResult<()> {
        self.in_transaction = true;
        let lock_for = self.lock_for;
        let version = blocking(&self.conn, move |c| {
            c.busy_timeout(Duration::ZERO)?;
            let deadline = std::time::Instant::now() + lock_for;
            loop {
                match c.execute_batch("BEGIN IMMEDIATE") {
                    Ok(()) => break,
                    Err(rusqlite::Error::SqliteFailure(e, _))
                        if e.code == rusqlite::ErrorCode::DatabaseBusy
                            && std::time::Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(e) => return Err(e),
                }
            }
            c.query_row("PRAGMA data_version", [], |r| r.get::<_, i64>(0))
        })
        .await
        .map_err(|e| format!("BEGIN IMMEDIATE: {e}"))?;
        self.values.set("data-version", version.to_string());
        Ok(())
    }

    async fn resume(&mut self, _froze: bool) -> HookResult<()> {
        if self.in_transaction {
            blocking(&self.conn, |c| {
                if !c.is_autocommit() {
                    c.execute_batch("ROLLBACK")?;
                }
                Ok(())
            })
            .await
            .map_err(|e| format!("ROLLBACK: {e}"))?;
            self.in_transaction = false;
        }
        Ok(())
    }

    fn output(&self) -> HookValues {
        self.values.clone()
    }
}
