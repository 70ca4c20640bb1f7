//! MySQL / MariaDB hook (tested on MariaDB 10.11).
//!
//! - prepare: open two connections — the session that will hold the lock, and a control
//!   connection that can `KILL` it — and `FLUSH LOCAL TABLES` (no lock: makes the later lock
//!   short). `lock_wait_timeout` of the session is set short.
//! - quiesce on MariaDB: `BACKUP STAGE START` + `BACKUP STAGE BLOCK_COMMIT`; on MySQL 8
//!   `FLUSH TABLES WITH READ LOCK`. A lock wait that times out is retried a bounded number of
//!   times, so a long-running statement delays the set instead of stalling the server. Then
//!   the binlog file/position and GTID position are recorded while commits are blocked.
//! - resume: `BACKUP STAGE END` / `UNLOCK TABLES`. If the quiesce was cut off mid-statement by
//!   its timeout, the control connection kills the session instead: no lock is ever left.

use std::path::{Path, PathBuf};
use std::time::Duration;

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder, Row};
use serde::Deserialize;

use super::{
    DbPath, Hook, HookContext, HookResult, HookSession, HookValues, Timeouts, read_password,
};

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct MysqlConfig {
    /// Unix socket of the server (preferred).
    pub socket: Option<PathBuf>,
    /// Loopback address when no socket is given.
    #[serde(default = "default_host")]
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default = "default_user")]
    pub user: String,
    /// File holding the password (mode 0600, owned by the agent's user).
    pub password_file: Option<PathBuf>,
    /// `lock_wait_timeout` of the locking session (whole seconds, at least 1).
    #[serde(default = "default_lock_wait", with = "humantime_serde")]
    pub lock_wait_timeout: Duration,
    /// How many times a lock wait that timed out is retried before the set fails.
    #[serde(default = "default_lock_retries")]
    pub lock_retries: u32,
    /// Restore drills (`quiescectl verify`): a query run on the restored copy after
    /// `mariadb-check`, and the answer it must give (first column of the first row, as
    /// `mariadb -N -B` prints it; qualify tables with their database). Both or neither.
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

fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_port() -> u16 {
    3306
}
fn default_user() -> String {
    "root".into()
}
fn default_lock_wait() -> Duration {
    Duration::from_secs(1)
}
fn default_lock_retries() -> u32 {
    2
}

impl MysqlConfig {
    pub fn timeouts(&self) -> Timeouts {
        Timeouts {
            prepare: self.prepare_timeout,
            quiesce: self.quiesce_timeout,
            resume: self.resume_timeout,
        }
    }
}

/// ER_LOCK_WAIT_TIMEOUT.
const LOCK_WAIT_TIMEOUT: u16 = 1205;
/// ER_BACKUP_NOT_RUNNING: "You must start backup with BACKUP STAGE START".
const NO_BACKUP_STAGE: u16 = 4146;
/// ER_ACCESS_DENIED_ERROR (bad user or password).
const ACCESS_DENIED: u16 = 1045;

pub struct MysqlHook {
    name: String,
    config: MysqlConfig,
}

impl MysqlHook {
    pub fn new(name: &str, config: MysqlConfig) -> Self {
        MysqlHook {
            name: name.into(),
            config,
        }
    }

    fn target(&self) -> String {
        match &self.config.socket {
            Some(socket) => socket.display().to_string(),
            None => format!("{}:{}", self.config.host, self.config.port),
        }
    }

    async fn connect(&self) -> HookResult<Conn> {
        let c = &self.config;
        let mut opts = OptsBuilder::default()
            .user(Some(c.user.clone()))
            .prefer_socket(false);
        opts = match &c.socket {
            Some(socket) => opts.socket(Some(socket.display().to_string())),
            None => opts.ip_or_hostname(c.host.clone()).tcp_port(c.port),
        };
        if let Some(path) = &c.password_file {
            opts = opts.pass(Some(read_password(path)?));
        }
        Conn::new(opts).await.map_err(|e| {
            let hint = match &e {
                mysql_async::Error::Server(s) if s.code == ACCESS_DENIED => format!(
                    " (check user and password-file{})",
                    c.password_file
                        .as_ref()
                        .map(|p| format!(" {}", p.display()))
                        .unwrap_or_default()
                ),
                _ => String::new(),
            };
            format!(
                "cannot connect to MySQL/MariaDB at {} as {}: {}{hint}",
                self.target(),
                c.user,
                my_error(&e)
            )
        })
    }
}

fn my_error(e: &mysql_async::Error) -> String {
    match e {
        mysql_async::Error::Server(s) => format!("{} (error {})", s.message, s.code),
        other => other.to_string(),
    }
}

fn lock_wait_secs(timeout: Duration) -> u64 {
    timeout.as_secs_f64().ceil().max(1.0) as u64
}

#[tonic::async_trait]
impl Hook for MysqlHook {
    fn kind(&self) -> &'static str {
        "mysql"
    }

    async fn paths(&self) -> HookResult<Vec<DbPath>> {
        let mut conn = self.connect().await?;
        let rows: Vec<(String, String)> = conn
            .query(
                "SHOW GLOBAL VARIABLES WHERE Variable_name IN ('datadir',
                 'innodb_log_group_home_dir', 'innodb_undo_directory', 'innodb_data_home_dir',
                 'aria_log_dir_path', 'log_bin', 'log_bin_basename')",
            )
            .await
            .map_err(|e| my_error(&e))?;
        let _ = conn.disconnect().await;
        let get = |name: &str| {
            rows.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .filter(|v| !v.is_empty())
        };
        let datadir = PathBuf::from(get("datadir").ok_or("the server reports no datadir")?);
        let under_datadir = |value: String| {
            let path = Path::new(&value);
            if path.is_absolute() {
                path.to_owned()
            } else {
                datadir.join(path)
            }
        };
        let mut paths = vec![DbPath {
            what: "datadir".into(),
            path: datadir.clone(),
        }];
        for var in [
            "innodb_log_group_home_dir",
            "innodb_undo_directory",
            "innodb_data_home_dir",
            "aria_log_dir_path",
        ] {
            if let Some(value) = get(var) {
                paths.push(DbPath {
                    what: var.into(),
                    path: under_datadir(value),
                });
            }
        }
        if get("log_bin").as_deref() == Some("ON")
            && let Some(base) = get("log_bin_basename")
        {
            let base = under_datadir(base);
            paths.push(DbPath {
                what: "log_bin_basename dir".into(),
                path: base.parent().map(Path::to_owned).unwrap_or(base),
            });
        }
        Ok(paths)
    }

    async fn prepare(&self, _ctx: &HookContext) -> HookResult<Box<dyn HookSession>> {
        let mut session = self.connect().await?;
        let control = self.connect().await?;
        let version: String = session
            .query_first("SELECT VERSION()")
            .await
            .map_err(|e| my_error(&e))?
            .unwrap_or_default();
        let mariadb = version.contains("MariaDB");
        let secs = lock_wait_secs(self.config.lock_wait_timeout);
        session
            .query_drop(format!("SET SESSION lock_wait_timeout = {secs}"))
            .await
            .map_err(|e| my_error(&e))?;
        let mut values = HookValues::default();
        // Best effort: it only shortens the lock to come. A table held by a long statement
        // makes it wait; that is the quiesce's business (with retries), not a failure here.
        match session.query_drop("FLUSH LOCAL TABLES").await {
            Ok(()) => values.set("flush", "done"),
            Err(mysql_async::Error::Server(s)) if s.code == LOCK_WAIT_TIMEOUT => {
                tracing::warn!(hook = %self.name, "FLUSH LOCAL TABLES timed out; going on");
                values.set("flush", "skipped: lock wait timeout");
            }
            Err(e) => return Err(format!("FLUSH LOCAL TABLES: {}", my_error(&e))),
        }
        values.set("server-version", version);
        let id = session.id();
        Ok(Box::new(MysqlSession {
            name: self.name.clone(),
            session: Some(session),
            control: Some(control),
            session_id: id,
            mariadb,
            retries: self.config.lock_retries,
            lock_wait_secs: secs,
            locked: false,
            in_flight: false,
            values,
        }))
    }
}

struct MysqlSession {
    name: String,
    session: Option<Conn>,
    control: Option<Conn>,
    session_id: u32,
    mariadb: bool,
    retries: u32,
    lock_wait_secs: u64,
    /// A backup stage (or global read lock) may be held by the session.
    locked: bool,
    /// A statement was sent and its answer not read (the quiesce was cut off).
    in_flight: bool,
    values: HookValues,
}

impl MysqlSession {
    async fn exec(&mut self, sql: &str) -> Result<(), mysql_async::Error> {
        let conn = self
            .session
            .as_mut()
            .ok_or_else(|| mysql_async::Error::Other("session closed".into()))?;
        self.in_flight = true;
        let result = conn.query_drop(sql).await;
        self.in_flight = false;
        result
    }

    async fn first_row(&mut self, sql: &str) -> Result<Option<Row>, mysql_async::Error> {
        let conn = self
            .session
            .as_mut()
            .ok_or_else(|| mysql_async::Error::Other("session closed".into()))?;
        self.in_flight = true;
        let result = conn.query_first(sql).await;
        self.in_flight = false;
        result
    }

    async fn release_lock(&mut self) -> Result<(), mysql_async::Error> {
        let sql = if self.mariadb {
            "BACKUP STAGE END"
        } else {
            "UNLOCK TABLES"
        };
        match self.exec(sql).await {
            // A failed BACKUP STAGE statement already ended the backup on the server.
            Err(mysql_async::Error::Server(s)) if s.code == NO_BACKUP_STAGE => {}
            other => other?,
        }
        self.locked = false;
        Ok(())
    }

    /// Takes the lock once; `Ok(false)` when a lock wait timed out.
    async fn try_lock(&mut self) -> HookResult<bool> {
        self.locked = true;
        let steps: &[&str] = if self.mariadb {
            &["BACKUP STAGE START", "BACKUP STAGE BLOCK_COMMIT"]
        } else {
            &["FLUSH TABLES WITH READ LOCK"]
        };
        for step in steps {
            match self.exec(step).await {
                Ok(()) => {}
                Err(mysql_async::Error::Server(s)) if s.code == LOCK_WAIT_TIMEOUT => {
                    self.release_lock().await.map_err(|e| {
                        format!("releasing after a lock wait timeout: {}", my_error(&e))
                    })?;
                    return Ok(false);
                }
                Err(e) => {
                    let _ = self.release_lock().await;
                    return Err(format!("{step}: {}", my_error(&e)));
                }
            }
        }
        Ok(true)
    }

    async fn record_positions(&mut self) -> HookResult<()> {
        let status = if self.mariadb {
            // SHOW BINLOG STATUS since 10.5.2; SHOW MASTER STATUS before.
            match self.first_row("SHOW BINLOG STATUS").await {
                Ok(row) => row,
                Err(_) => self
                    .first_row("SHOW MASTER STATUS")
                    .await
                    .map_err(|e| format!("SHOW MASTER STATUS: {}", my_error(&e)))?,
            }
        } else {
            match self.first_row("SHOW BINARY LOG STATUS").await {
                Ok(row) => row,
                Err(_) => self
                    .first_row("SHOW MASTER STATUS")
                    .await
                    .map_err(|e| format!("SHOW MASTER STATUS: {}", my_error(&e)))?,
            }
        };
        if let Some(row) = status {
            if let Some(Ok(file)) = row.get_opt::<String, _>(0) {
                self.values.set("binlog-file", file);
            }
            if let Some(Ok(pos)) = row.get_opt::<String, _>(1) {
                self.values.set("binlog-position", pos);
            }
        } else {
            self.values.set("binlog-file", "");
        }
        let gtid_sql = if self.mariadb {
            "SELECT @@gtid_binlog_pos"
        } else {
            "SELECT @@gtid_executed"
        };
        if let Ok(Some(row)) = self.first_row(gtid_sql).await
            && let Some(Ok(gtid)) = row.get_opt::<String, _>(0)
        {
            self.values.set("gtid", gtid);
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl HookSession for MysqlSession {
    async fn quiesce(&mut self) -> HookResult<()> {
        let attempts = self.retries + 1;
        for attempt in 1..=attempts {
            if self.try_lock().await? {
                self.values.set("lock-attempts", attempt.to_string());
                return self.record_positions().await;
            }
            tracing::warn!(hook = %self.name, attempt, "lock wait timed out; retrying");
            if attempt < attempts {
                tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
            }
        }
        Err(format!(
            "{} waited {attempts} times × {}s (lock_wait_timeout) for a lock held by a long-running statement; see SHOW PROCESSLIST",
            if self.mariadb {
                "BACKUP STAGE BLOCK_COMMIT"
            } else {
                "FLUSH TABLES WITH READ LOCK"
            },
            self.lock_wait_secs
        ))
    }

    async fn resume(&mut self, _froze: bool) -> HookResult<()> {
        if self.in_flight {
            // Cut off mid-statement: the session may be about to get the lock. Kill it.
            self.session = None;
            let id = self.session_id;
            let control = self.control.as_mut().ok_or("control connection closed")?;
            control
                .query_drop(format!("KILL CONNECTION {id}"))
                .await
                .map_err(|e| format!("KILL CONNECTION {id}: {}", my_error(&e)))?;
            self.in_flight = false;
            self.locked = false;
        } else if self.locked {
            self.release_lock().await.map_err(|e| my_error(&e))?;
        }
        self.close().await;
        Ok(())
    }

    async fn release(&mut self) {
        self.close().await;
    }

    fn output(&self) -> HookValues {
        self.values.clone()
    }
}

impl MysqlSession {
    async fn close(&mut self) {
        if let Some(conn) = self.session.take() {
            let _ = conn.disconnect().await;
        }
        if let Some(conn) = self.control.take() {
            let _ = conn.disconnect().await;
        }
    }
}
