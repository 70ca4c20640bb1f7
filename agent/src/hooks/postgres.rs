//! PostgreSQL hook (12–17; tested on 15).
//!
//! - prepare: connect (the only connection of the set) and `CHECKPOINT`, so that crash
//!   recovery of the snapshot is short; in backup mode `pg_backup_start(label, fast => true)`
//!   instead, in that same session, which stays open until resume.
//! - quiesce: record `pg_current_wal_lsn()` (every commit acknowledged before it is in the
//!   snapshot) and its WAL file name.
//! - resume: backup mode only: `pg_backup_stop(wait_for_archive => false)` — after the thaw,
//!   since it writes WAL — and keep its `labelfile` and `spcmapfile` exactly as returned.
//!
//! Crash-consistent mode (the default) needs no backup label: data, WAL and tablespaces are
//! captured in one cut and the restored server runs crash recovery.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

use super::{
    DbPath, Hook, HookContext, HookResult, HookSession, HookValues, Timeouts, read_password,
};

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum PgMode {
    /// One crash-consistent cut of data, WAL and tablespaces; restore runs crash recovery.
    #[default]
    Crash,
    /// `pg_backup_start`/`pg_backup_stop` around the freeze; restore writes the backup label
    /// and needs the WAL archive up to the stop position.
    Backup,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PostgresConfig {
    /// Unix socket directory (absolute path) or a loopback address.
    #[serde(default = "default_host")]
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default = "default_user")]
    pub user: String,
    /// File holding the password (mode 0600, owned by the agent's user). None: peer/trust auth.
    pub password_file: Option<PathBuf>,
    #[serde(default = "default_dbname")]
    pub dbname: String,
    #[serde(default)]
    pub mode: PgMode,
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

fn default_host() -> String {
    "/var/run/postgresql".into()
}
fn default_port() -> u16 {
    5432
}
fn default_user() -> String {
    "postgres".into()
}
fn default_dbname() -> String {
    "postgres".into()
}

impl PostgresConfig {
    pub fn timeouts(&self) -> Timeouts {
        Timeouts {
            prepare: self.prepare_timeout,
            quiesce: self.quiesce_timeout,
            resume: self.resume_timeout,
        }
    }
}

pub struct PostgresHook {
    config: PostgresConfig,
}

impl PostgresHook {
    pub fn new(config: PostgresConfig) -> Self {
        PostgresHook { config }
    }

    async fn connect(&self) -> HookResult<Connection> {
        let c = &self.config;
        let mut pg = tokio_postgres::Config::new();
        pg.host(&c.host)
            .port(c.port)
            .user(&c.user)
            .dbname(&c.dbname)
            .application_name("quiesce-agent")
            .connect_timeout(c.prepare_timeout);
        if let Some(path) = &c.password_file {
            pg.password(read_password(path)?);
        }
        let (client, connection) = pg.connect(NoTls).await.map_err(|e| {
            let where_ = format!("{}:{} as {}", c.host, c.port, c.user);
            match e.code() {
                Some(code) if *code == SqlState::INVALID_PASSWORD => format!(
                    "cannot connect to PostgreSQL at {where_}: password authentication failed (check password-file{})",
                    c.password_file
                        .as_ref()
                        .map(|p| format!(" {}", p.display()))
                        .unwrap_or_default()
                ),
                _ => format!("cannot connect to PostgreSQL at {where_}: {}", pg_error(&e)),
            }
        })?;
        let task = tokio::spawn(async move {
            let _ = connection.await;
        });
        let version: i32 = client
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .map_err(|e| pg_error(&e))?
            .get(0);
        Ok(Connection {
            client,
            _task: task,
            version,
        })
    }
}

/// Dropping the client ends the connection task: it sends Terminate and closes the socket.
struct Connection {
    client: Client,
    _task: JoinHandle<()>,
    version: i32,
}

/// The server's own message (with SQLSTATE) when there is one.
fn pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => {
            let mut out = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(cause) = source {
                out.push_str(": ");
                out.push_str(&cause.to_string());
                source = cause.source();
            }
            out
        }
    }
}

fn privilege_hint(e: &tokio_postgres::Error, user: &str, hint: &str) -> String {
    if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
        format!("{}: user {user} lacks a privilege: {hint}", pg_error(e))
    } else {
        pg_error(e)
    }
}

#[tonic::async_trait]
impl Hook for PostgresHook {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    async fn paths(&self) -> HookResult<Vec<DbPath>> {
        let conn = self.connect().await?;
        let user = &self.config.user;
        let data: String = conn
            .client
            .query_one("SELECT current_setting('data_directory')", &[])
            .await
            .map_err(|e| {
                privilege_hint(
                    &e,
                    user,
                    &format!("GRANT pg_read_all_settings TO {user} (to read data_directory)"),
                )
            })?
            .get(0);
        let data = PathBuf::from(data);
        let mut paths = vec![
            DbPath {
                what: "data_directory".into(),
                path: data.clone(),
            },
            DbPath {
                what: "pg_wal".into(),
                path: data.join("pg_wal"),
            },
        ];
        let rows = conn
            .client
            .query(
                "SELECT spcname::text, pg_tablespace_location(oid) FROM pg_tablespace
                 WHERE pg_tablespace_location(oid) <> '' ORDER BY spcname",
                &[],
            )
            .await
            .map_err(|e| pg_error(&e))?;
        for row in rows {
            let name: String = row.get(0);
            let location: String = row.get(1);
            paths.push(DbPath {
                what: format!("tablespace {name}"),
                path: location.into(),
            });
        }
        Ok(paths)
    }

    async fn prepare(&self, ctx: &HookContext) -> HookResult<Box<dyn HookSession>> {
        let conn = self.connect().await?;
        let user = &self.config.user;
        let mut values = HookValues::default();
        values.set("mode", format!("{:?}", self.config.mode).to_lowercase());
        match self.config.mode {
            PgMode::Crash => {
                conn.client.batch_execute("CHECKPOINT").await.map_err(|e| {
                    privilege_hint(
                        &e,
                        user,
                        &format!(
                            "GRANT pg_checkpoint TO {user} (PostgreSQL 15+; a superuser before)"
                        ),
                    )
                })?;
            }
            PgMode::Backup => {
                let label = format!("quiesce {}", ctx.set_id);
                let (sql, function) = if conn.version >= 150000 {
                    (
                        "SELECT pg_backup_start($1, true)::text",
                        "pg_backup_start(text, boolean), pg_backup_stop(boolean)",
                    )
                } else {
                    (
                        "SELECT pg_start_backup($1, true, false)::text",
                        "pg_start_backup(text, boolean, boolean), pg_stop_backup(boolean, boolean)",
                    )
                };
                let start: String = conn
                    .client
                    .query_one(sql, &[&label])
                    .await
                    .map_err(|e| {
                        privilege_hint(
                            &e,
                            user,
                            &format!("GRANT EXECUTE ON FUNCTION {function} TO {user}"),
                        )
                    })?
                    .get(0);
                values.set("backup-start-lsn", start);
                values.set("backup-label-name", label);
            }
        }
        Ok(Box::new(PostgresSession {
            conn: Some(conn),
            mode: self.config.mode,
            backup_open: self.config.mode == PgMode::Backup,
            values,
        }))
    }
}

struct PostgresSession {
    conn: Option<Connection>,
    mode: PgMode,
    backup_open: bool,
    values: HookValues,
}

#[tonic::async_trait]
impl HookSession for PostgresSession {
    async fn quiesce(&mut self) -> HookResult<()> {
        let conn = self.conn.as_ref().ok_or("session closed")?;
        let row = conn
            .client
            .query_one(
                "SELECT pg_current_wal_lsn()::text, pg_walfile_name(pg_current_wal_lsn()),
                        (SELECT timeline_id FROM pg_control_checkpoint())::text",
                &[],
            )
            .await
            .map_err(|e| pg_error(&e))?;
        self.values.set("lsn", row.get::<_, String>(0));
        self.values.set("wal-file", row.get::<_, String>(1));
        self.values.set("timeline", row.get::<_, String>(2));
        Ok(())
    }

    async fn resume(&mut self, froze: bool) -> HookResult<()> {
        if self.mode == PgMode::Backup && self.backup_open {
            let conn = self.conn.as_ref().ok_or("session closed")?;
            let sql = if conn.version >= 150000 {
                "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)"
            } else {
                "SELECT lsn::text, labelfile, spcmapfile FROM pg_stop_backup(false, false)"
            };
            let row = conn
                .client
                .query_one(sql, &[])
                .await
                .map_err(|e| format!("ending backup mode: {}", pg_error(&e)))?;
            self.backup_open = false;
            if froze {
                self.values.set("backup-stop-lsn", row.get::<_, String>(0));
                self.values.backup_label = row.get::<_, Option<String>>(1).unwrap_or_default();
                self.values.tablespace_map = row.get::<_, Option<String>>(2).unwrap_or_default();
            }
        }
        // Close the session now rather than when the set is forgotten.
        self.conn = None;
        Ok(())
    }

    async fn release(&mut self) {
        // Closing the session aborts a non-exclusive backup on the server.
        self.conn = None;
    }

    fn output(&self) -> HookValues {
        self.values.clone()
    }
}
