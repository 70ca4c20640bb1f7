//! The SQLite catalog of snapshot sets (rusqlite, versioned migrations, WAL mode).
//!
//! Every transition of a set is written here before the coordinator acts on it, so a restarted
//! coordinator finds what was in flight. Reads return the `quiesce.coordinator.v1` messages
//! directly: they are the record's shape, and the operator API serves them as they are.

use std::path::Path;
use std::sync::Mutex;

use quiesce_proto::coordinator::v1::{
    Completion, HookValue, PendingRemoval, PhaseMark, SetHookOutput, SetHost, SetPhase, SetState,
    SetVolume, SnapshotSet, Verification, VerifyCheck, VerifyOutcome,
};
use quiesce_proto::states::StateText;
use rusqlite::{Connection, OptionalExtension, params};

/// Schema migrations, applied in order; `PRAGMA user_version` counts how many have run.
pub(crate) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE sets (
    id                 TEXT PRIMARY KEY,
    group_name         TEXT NOT NULL,
    provider           TEXT NOT NULL,
    state              TEXT NOT NULL CHECK (state IN ('running', 'consistent', 'failed')),
    phase              TEXT NOT NULL,
    error              TEXT NOT NULL DEFAULT '',
    created_at_ms      INTEGER NOT NULL,
    finished_at_ms     INTEGER NOT NULL DEFAULT 0,
    freeze_window_ms   INTEGER NOT NULL DEFAULT 0,
    max_write_stall_ms INTEGER NOT NULL DEFAULT 0
);
-- One running set per group, enforced by the database itself.
CREATE UNIQUE INDEX sets_one_running_per_group ON sets (group_name) WHERE state = 'running';
CREATE INDEX sets_by_group ON sets (group_name, created_at_ms);
CREATE TABLE set_phases (
    set_id TEXT NOT NULL REFERENCES sets (id) ON DELETE CASCADE,
    seq    INTEGER NOT NULL,
    phase  TEXT NOT NULL,
    at_ms  INTEGER NOT NULL,
    PRIMARY KEY (set_id, seq)
);
CREATE TABLE set_hosts (
    set_id               TEXT NOT NULL REFERENCES sets (id) ON DELETE CASCADE,
    agent                TEXT NOT NULL,
    state                TEXT NOT NULL DEFAULT 'pending',
    error                TEXT NOT NULL DEFAULT '',
    freeze_started_at_ms INTEGER NOT NULL DEFAULT 0,
    frozen_at_ms         INTEGER NOT NULL DEFAULT 0,
    thawed_at_ms         INTEGER NOT NULL DEFAULT 0,
    held_continuously    INTEGER NOT NULL DEFAULT 0,
    freeze_end           TEXT NOT NULL DEFAULT '',
    write_stall_ms       INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (set_id, agent)
);
CREATE TABLE set_volumes (
    set_id       TEXT NOT NULL REFERENCES sets (id) ON DELETE CASCADE,
    agent        TEXT NOT NULL,
    mount_point  TEXT NOT NULL,
    device       TEXT NOT NULL DEFAULT '',
    fs_type      TEXT NOT NULL DEFAULT '',
    backing_file TEXT NOT NULL DEFAULT '',
    snapshot_id  TEXT NOT NULL DEFAULT '',
    size_bytes   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (set_id, agent, mount_point)
);
"#,
    // 2: the instants the consistency verdict is computed from, the verdict itself, and what
    // started the set (schedules).
    r#"
ALTER TABLE sets ADD COLUMN verdict TEXT NOT NULL DEFAULT '';
ALTER TABLE sets ADD COLUMN first_snapshot_started_at_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sets ADD COLUMN last_snapshot_returned_at_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sets ADD COLUMN freeze_budget_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sets ADD COLUMN trigger TEXT NOT NULL DEFAULT 'manual';
ALTER TABLE set_hosts ADD COLUMN freeze_sent_at_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE set_hosts ADD COLUMN freeze_acked_at_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE set_hosts ADD COLUMN snapshot_started_at_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE set_hosts ADD COLUMN snapshot_returned_at_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE set_hosts ADD COLUMN thaw_sent_at_ms INTEGER NOT NULL DEFAULT 0;
CREATE INDEX sets_by_group_state ON sets (group_name, state, finished_at_ms);
"#,
    // 3: what each member's hooks recorded (positions, PostgreSQL backup label), in hook order.
    r#"
CREATE TABLE set_hook_outputs (
    set_id         TEXT NOT NULL REFERENCES sets (id) ON DELETE CASCADE,
    agent          TEXT NOT NULL,
    seq            INTEGER NOT NULL,
    hook           TEXT NOT NULL,
    kind           TEXT NOT NULL DEFAULT '',
    -- JSON array of [key, value] pairs, in the order the hook recorded them.
    hook_values    TEXT NOT NULL DEFAULT '[]',
    backup_label   TEXT NOT NULL DEFAULT '',
    tablespace_map TEXT NOT NULL DEFAULT '',
    error          TEXT NOT NULL DEFAULT '',
    quiesce_ms     INTEGER NOT NULL DEFAULT 0,
    resume_ms      INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (set_id, agent, seq)
);
"#,
    // 4: providers whose snapshots complete in the background (EBS), and the
    // freeze-window breakdown.
    r#"
-- Providers with background completion (EBS) and the freeze-window breakdown.
ALTER TABLE sets ADD COLUMN completion TEXT NOT NULL DEFAULT '';
ALTER TABLE sets ADD COLUMN snapshot_calls_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE set_volumes ADD COLUMN ebs_volume_id TEXT NOT NULL DEFAULT '';
ALTER TABLE set_volumes ADD COLUMN instance_id TEXT NOT NULL DEFAULT '';
ALTER TABLE set_volumes ADD COLUMN snapshot_state TEXT NOT NULL DEFAULT '';
ALTER TABLE set_volumes ADD COLUMN snapshot_progress INTEGER NOT NULL DEFAULT 0;
"#,
    // 5: leftovers the reconciler removes (failed sets, deleted sets), what says a member
    // thawed, and sets whose deletion waits for their leftovers.
    r#"
ALTER TABLE set_hosts ADD COLUMN lease_sent_at_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE set_hosts ADD COLUMN lease_bound_at_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE set_hosts ADD COLUMN thaw_evidence INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sets ADD COLUMN delete_requested INTEGER NOT NULL DEFAULT 0;
CREATE TABLE pending_removals (
    set_id             TEXT NOT NULL REFERENCES sets (id) ON DELETE CASCADE,
    agent              TEXT NOT NULL,
    -- JSON array of snapshot ids known to exist; [] for everything of the set on the agent.
    snapshot_ids       TEXT NOT NULL DEFAULT '[]',
    since_ms           INTEGER NOT NULL,
    attempts           INTEGER NOT NULL DEFAULT 0,
    last_attempt_at_ms INTEGER NOT NULL DEFAULT 0,
    next_attempt_at_ms INTEGER NOT NULL DEFAULT 0,
    last_error         TEXT NOT NULL DEFAULT '',
    thaw_unconfirmed   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (set_id, agent)
);
"#,
    // 6: the audit log (a hash chain, see `audit`), locked sets and their early-delete
    // approvals.
    r#"
CREATE TABLE audit (
    seq        INTEGER PRIMARY KEY,
    at_ms      INTEGER NOT NULL,
    identity   TEXT NOT NULL,
    verb       INTEGER NOT NULL,
    group_name TEXT NOT NULL,
    set_id     TEXT NOT NULL,
    args       TEXT NOT NULL,
    outcome    INTEGER NOT NULL,
    code       TEXT NOT NULL,
    message    TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL
);
CREATE INDEX audit_at ON audit (at_ms);
ALTER TABLE sets ADD COLUMN locked_until_ms INTEGER NOT NULL DEFAULT 0;
CREATE TABLE delete_approvals (
    set_id   TEXT NOT NULL REFERENCES sets (id) ON DELETE CASCADE,
    identity TEXT NOT NULL,
    at_ms    INTEGER NOT NULL,
    PRIMARY KEY (set_id, identity)
);
"#,
    // 7: restore drills (`quiescectl verify`): each one with the set it proved, its checks as a
    // JSON array of {name, kind, outcome, check, output, duration_ms}.
    r#"
CREATE TABLE set_verifications (
    set_id         TEXT NOT NULL REFERENCES sets (id) ON DELETE CASCADE,
    seq            INTEGER NOT NULL,
    agent          TEXT NOT NULL,
    verified_at_ms INTEGER NOT NULL,
    duration_ms    INTEGER NOT NULL,
    outcome        INTEGER NOT NULL,
    error          TEXT NOT NULL DEFAULT '',
    checks         TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (set_id, seq)
);
"#,
    // 8: per member, the hooks' resume after its last FITHAW (in neither its write stall nor
    // the cut window) and when that FITHAW returned on the coordinator's clock.
    r#"
ALTER TABLE set_hosts ADD COLUMN resume_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE set_hosts ADD COLUMN thaw_returned_at_ms INTEGER NOT NULL DEFAULT 0;
"#,
];

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("cannot open catalog {path}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("catalog {path} failed its integrity check: {report}")]
    Corrupt { path: String, report: String },
    #[error(
        "catalog {path} has schema version {found}, newer than this coordinator knows ({known})"
    )]
    TooNew {
        path: String,
        found: usize,
        known: usize,
    },
    #[error("group {group} already has a running set: {running}")]
    GroupBusy { group: String, running: String },
    #[error("catalog query")]
    Sql(#[from] rusqlite::Error),
}

pub struct Catalog {
    conn: Mutex<Connection>,
}

/// A set about to be planned.
#[derive(Debug, Clone)]
pub struct NewSet<'a> {
    pub id: &'a str,
    pub group: &'a str,
    pub provider: &'a str,
    pub created_at_ms: u64,
    /// (agent, mount point) for every member volume.
    pub volumes: Vec<(String, String)>,
    /// `manual` or `schedule`.
    pub trigger: &'a str,
    pub freeze_budget_ms: u64,
}

impl Catalog {
    pub fn open(path: &Path) -> Result<Catalog, CatalogError> {
        let shown = path.display().to_string();
        let open_err = |source| CatalogError::Open {
            path: shown.clone(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| CatalogError::Open {
                path: shown.clone(),
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            })?;
        }
        let conn = Connection::open(path).map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        let report: String = conn
            .query_row("PRAGMA integrity_check", [], |row| row.get(0))
            .map_err(open_err)?;
        if report != "ok" {
            return Err(CatalogError::Corrupt {
                path: shown,
                report,
            });
        }
        Catalog::init(conn, &shown)
    }

    pub fn in_memory() -> Result<Catalog, CatalogError> {
        let conn = Connection::open_in_memory().map_err(|source| CatalogError::Open {
            path: ":memory:".into(),
            source,
        })?;
        Catalog::init(conn, ":memory:")
    }

    fn init(mut conn: Connection, path: &str) -> Result<Catalog, CatalogError> {
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: usize = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
        if version > MIGRATIONS.len() {
            return Err(CatalogError::TooNew {
                path: path.into(),
                found: version,
                known: MIGRATIONS.len(),
            });
        }
        for (index, migration) in MIGRATIONS.iter().enumerate().skip(version) {
            let tx = conn.transaction()?;
            tx.execute_batch(migration)?;
            tx.pragma_update(None, "user_version", index + 1)?;
            tx.commit()?;
        }
        Ok(Catalog {
            conn: Mutex::new(conn),
        })
    }

    /// Runs `f` on the catalog's connection (also for modules that keep their own tables:
    /// `audit`).
    pub(crate) fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, CatalogError>,
    ) -> Result<T, CatalogError> {
        let mut conn = self
            .conn
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        f(&mut conn)
    }

    /// Records a new running set with its members, refusing a second running set per group.
    pub fn create_set(&self, set: &NewSet<'_>) -> Result<(), CatalogError> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            let inserted = tx.execute(
                "INSERT INTO sets (id, group_name, provider, state, phase, created_at_ms, trigger,
                    freeze_budget_ms)
                 VALUES (?1, ?2, ?3, ?7, ?8, ?4, ?5, ?6)",
                params![
                    set.id,
                    set.group,
                    set.provider,
                    set.created_at_ms as i64,
                    set.trigger,
                    set.freeze_budget_ms as i64,
                    SetState::Running.text(),
                    SetPhase::Planned.text()
                ],
            );
            if let Err(rusqlite::Error::SqliteFailure(e, _)) = &inserted
                && e.code == rusqlite::ErrorCode::ConstraintViolation
            {
                let running: String = tx
                    .query_row(
                        "SELECT id FROM sets WHERE group_name = ?1 AND state = ?2",
                        [set.group, SetState::Running.text()],
                        |row| row.get(0),
                    )
                    .optional()?
                    .unwrap_or_else(|| "?".into());
                return Err(CatalogError::GroupBusy {
                    group: set.group.into(),
                    running,
                });
            }
            inserted?;
            tx.execute(
                "INSERT INTO set_phases (set_id, seq, phase, at_ms) VALUES (?1, 0, ?3, ?2)",
                params![set.id, set.created_at_ms as i64, SetPhase::Planned.text()],
            )?;
            for (agent, mount) in &set.volumes {
                tx.execute(
                    "INSERT OR IGNORE INTO set_hosts (set_id, agent) VALUES (?1, ?2)",
                    params![set.id, agent],
                )?;
                tx.execute(
                    "INSERT INTO set_volumes (set_id, agent, mount_point) VALUES (?1, ?2, ?3)",
                    params![set.id, agent, mount],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// Records that the set entered `phase`.
    pub fn set_phase(&self, id: &str, phase: SetPhase, at_ms: u64) -> Result<(), CatalogError> {
        let phase = phase.text();
        self.with(|conn| {
            let tx = conn.transaction()?;
            tx.execute(
                "UPDATE sets SET phase = ?2 WHERE id = ?1",
                params![id, phase],
            )?;
            tx.execute(
                "INSERT INTO set_phases (set_id, seq, phase, at_ms)
                 VALUES (?1, (SELECT COALESCE(MAX(seq), -1) + 1 FROM set_phases WHERE set_id = ?1), ?2, ?3)",
                params![id, phase, at_ms as i64],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    pub fn update_host(&self, id: &str, host: &SetHost) -> Result<(), CatalogError> {
        self.update_hosts(id, std::slice::from_ref(host))
    }

    /// Every member host of a phase in one transaction (one fsync, not one per member: the
    /// snapshot and thaw phases write these while the group is frozen).
    pub fn update_hosts(&self, id: &str, hosts: &[SetHost]) -> Result<(), CatalogError> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            for host in hosts {
                write_host(&tx, id, host)?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// Volumes resolved at plan time, in one transaction.
    pub fn update_volumes(&self, id: &str, volumes: &[SetVolume]) -> Result<(), CatalogError> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            for volume in volumes {
                write_volume(&tx, id, volume)?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// The outcome of the snapshot phase in one transaction: its bounds (coordinator clock),
    /// every member host, and every snapshot made: (agent, mount point, snapshot id, size).
    pub fn record_snapshots(
        &self,
        id: &str,
        first_started_at_ms: u64,
        last_returned_at_ms: u64,
        hosts: &[SetHost],
        snapshots: &[(String, String, String, u64)],
    ) -> Result<(), CatalogError> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            tx.execute(
                "UPDATE sets SET first_snapshot_started_at_ms = ?2, last_snapshot_returned_at_ms = ?3
                 WHERE id = ?1",
                params![id, first_started_at_ms as i64, last_returned_at_ms as i64],
            )?;
            for host in hosts {
                write_host(&tx, id, host)?;
            }
            for (agent, mount_point, snapshot_id, size_bytes) in snapshots {
                tx.execute(
                    "UPDATE set_volumes SET snapshot_id = ?4, size_bytes = ?5
                     WHERE set_id = ?1 AND agent = ?2 AND mount_point = ?3",
                    params![id, agent, mount_point, snapshot_id, *size_bytes as i64],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    pub fn update_volume(&self, id: &str, volume: &SetVolume) -> Result<(), CatalogError> {
        self.update_volumes(id, std::slice::from_ref(volume))
    }

    /// Records the snapshot a provider made of one member volume.
    pub fn update_volume_snapshot(
        &self,
        id: &str,
        agent: &str,
        mount_point: &str,
        snapshot_id: &str,
        size_bytes: u64,
    ) -> Result<(), CatalogError> {
        self.with(|conn| {
            conn.execute(
                "UPDATE set_volumes SET snapshot_id = ?4, size_bytes = ?5
                 WHERE set_id = ?1 AND agent = ?2 AND mount_point = ?3",
                params![id, agent, mount_point, snapshot_id, size_bytes as i64],
            )?;
            Ok(())
        })
    }

    pub fn set_verdict(&self, id: &str, verdict: &str) -> Result<(), CatalogError> {
        self.with(|conn| {
            conn.execute(
                "UPDATE sets SET verdict = ?2 WHERE id = ?1",
                params![id, verdict],
            )?;
            Ok(())
        })
    }

    /// Replaces what the hooks of one member recorded.
    pub fn set_hook_outputs(
        &self,
        id: &str,
        agent: &str,
        outputs: &[SetHookOutput],
    ) -> Result<(), CatalogError> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            tx.execute(
                "DELETE FROM set_hook_outputs WHERE set_id = ?1 AND agent = ?2",
                params![id, agent],
            )?;
            for (seq, output) in outputs.iter().enumerate() {
                let pairs: Vec<(&str, &str)> = output
                    .values
                    .iter()
                    .map(|v| (v.key.as_str(), v.value.as_str()))
                    .collect();
                let values = serde_json::to_string(&pairs)
                    .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
                tx.execute(
                    "INSERT INTO set_hook_outputs (set_id, agent, seq, hook, kind, hook_values,
                        backup_label, tablespace_map, error, quiesce_ms, resume_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                    params![
                        id,
                        agent,
                        seq as i64,
                        output.hook,
                        output.kind,
                        values,
                        output.backup_label,
                        output.tablespace_map,
                        output.error,
                        output.quiesce_ms as i64,
                        output.resume_ms as i64
                    ],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// The background state of one volume's snapshot (EBS: pending, completed, error).
    pub fn update_volume_progress(
        &self,
        id: &str,
        agent: &str,
        mount_point: &str,
        state: &str,
        progress: u32,
    ) -> Result<(), CatalogError> {
        self.with(|conn| {
            conn.execute(
                "UPDATE set_volumes SET snapshot_state = ?4, snapshot_progress = ?5
                 WHERE set_id = ?1 AND agent = ?2 AND mount_point = ?3",
                params![id, agent, mount_point, state, i64::from(progress)],
            )?;
            Ok(())
        })
    }

    /// Finished sets of a group, newest first: (id, state, created at, finished at).
    pub fn finished(&self, group: &str) -> Result<Vec<FinishedSet>, CatalogError> {
        self.with(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, state, created_at_ms, finished_at_ms FROM sets
                 WHERE group_name = ?1 AND state != ?2
                 ORDER BY created_at_ms DESC, id DESC",
            )?;
            let rows = stmt
                .query_map([group, SetState::Running.text()], |row| {
                    Ok(FinishedSet {
                        id: row.get(0)?,
                        consistent: state_col::<SetState>(row, 1)? == SetState::Consistent as i32,
                        created_at_ms: row.get::<_, i64>(2)? as u64,
                        finished_at_ms: row.get::<_, i64>(3)? as u64,
                    })
                })?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    /// When the newest consistent set of a group was created (its snapshot instant, within
    /// seconds).
    pub fn last_consistent_created(&self, group: &str) -> Result<Option<u64>, CatalogError> {
        self.with(|conn| {
            Ok(conn
                .query_row(
                    "SELECT MAX(created_at_ms) FROM sets WHERE group_name = ?1 AND state = ?2",
                    [group, SetState::Consistent.text()],
                    |row| row.get::<_, Option<i64>>(0),
                )?
                .map(|v| v as u64))
        })
    }

    /// The newest set the scheduler started: (id, created at).
    pub fn last_scheduled(&self, group: &str) -> Result<Option<(String, u64)>, CatalogError> {
        self.with(|conn| {
            Ok(conn
                .query_row(
                    "SELECT id, created_at_ms FROM sets WHERE group_name = ?1 AND trigger = 'schedule'
                     ORDER BY created_at_ms DESC LIMIT 1",
                    [group],
                    |row| Ok((row.get(0)?, row.get::<_, i64>(1)? as u64)),
                )
                .optional()?)
        })
    }

    /// Count of sets per (group, state), for metrics.
    pub fn counts(&self) -> Result<Vec<(String, SetState, u64)>, CatalogError> {
        self.with(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT group_name, state, COUNT(*) FROM sets GROUP BY group_name, state",
            )?;
            let rows = stmt
                .query_map([], |row| {
                    Ok((
                        row.get(0)?,
                        SetState::try_from(state_col::<SetState>(row, 1)?).unwrap_or_default(),
                        row.get::<_, i64>(2)? as u64,
                    ))
                })?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    /// Time spent in the provider's snapshot calls (part of the freeze window).
    pub fn set_snapshot_calls_ms(&self, id: &str, ms: u64) -> Result<(), CatalogError> {
        self.with(|conn| {
            conn.execute(
                "UPDATE sets SET snapshot_calls_ms = ?2 WHERE id = ?1",
                params![id, ms as i64],
            )?;
            Ok(())
        })
    }

    /// Background completion of a committed set: pending, completed or error.
    pub fn set_completion(&self, id: &str, completion: Completion) -> Result<(), CatalogError> {
        self.with(|conn| {
            conn.execute(
                "UPDATE sets SET completion = ?2 WHERE id = ?1",
                params![id, completion.text()],
            )?;
            Ok(())
        })
    }

    /// A committed set whose snapshot ended in error: failed, completion `error`.
    pub fn fail_completion(&self, id: &str, reason: &str) -> Result<(), CatalogError> {
        self.with(|conn| {
            conn.execute(
                "UPDATE sets SET state = ?3, completion = ?4, error = ?2 WHERE id = ?1",
                params![
                    id,
                    reason,
                    SetState::Failed.text(),
                    Completion::Error.text()
                ],
            )?;
            Ok(())
        })
    }

    /// Ids of committed sets whose snapshots are still completing.
    pub fn completion_pending(&self) -> Result<Vec<String>, CatalogError> {
        self.with(|conn| {
            let mut stmt = conn.prepare(
                "SELECT id FROM sets WHERE state = ?1 AND completion = ?2
                 ORDER BY created_at_ms",
            )?;
            let ids = stmt
                .query_map(
                    [SetState::Consistent.text(), Completion::Pending.text()],
                    |row| row.get(0),
                )?
                .collect::<Result<Vec<String>, _>>()?;
            Ok(ids)
        })
    }

    /// Ends a set: `consistent` or `failed`, with the figures measured.
    pub fn finish(
        &self,
        id: &str,
        state: SetState,
        error: &str,
        freeze_window_ms: u64,
        max_write_stall_ms: u64,
        at_ms: u64,
    ) -> Result<(), CatalogError> {
        self.with(|conn| {
            conn.execute(
                "UPDATE sets SET state = ?2, error = ?3, freeze_window_ms = ?4,
                    max_write_stall_ms = ?5, finished_at_ms = ?6
                 WHERE id = ?1",
                params![
                    id,
                    state.text(),
                    error,
                    freeze_window_ms as i64,
                    max_write_stall_ms as i64,
                    at_ms as i64
                ],
            )?;
            Ok(())
        })
    }

    /// Locks a set against deletion until `until_ms` (the group's `lock-for`).
    pub fn lock(&self, id: &str, until_ms: u64) -> Result<(), CatalogError> {
        self.with(|conn| {
            conn.execute(
                "UPDATE sets SET locked_until_ms = ?2 WHERE id = ?1",
                params![id, until_ms as i64],
            )?;
            Ok(())
        })
    }

    /// Records `identity`'s approval of a locked set's early delete (a repeated approval
    /// renews its time) and returns the approvals at or after `since_ms`, oldest first.
    pub fn approve_delete(
        &self,
        id: &str,
        identity: &str,
        at_ms: u64,
        since_ms: u64,
    ) -> Result<Vec<(String, u64)>, CatalogError> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            tx.execute(
                "INSERT INTO delete_approvals (set_id, identity, at_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (set_id, identity) DO UPDATE SET at_ms = excluded.at_ms",
                params![id, identity, at_ms as i64],
            )?;
            let approvals = {
                let mut stmt = tx.prepare(
                    "SELECT identity, at_ms FROM delete_approvals
                     WHERE set_id = ?1 AND at_ms >= ?2 ORDER BY at_ms, identity",
                )?;
                stmt.query_map(params![id, since_ms as i64], |row| {
                    Ok((row.get(0)?, row.get::<_, i64>(1)? as u64))
                })?
                .collect::<Result<Vec<_>, _>>()?
            };
            tx.commit()?;
            Ok(approvals)
        })
    }

    pub fn get(&self, id: &str) -> Result<Option<SnapshotSet>, CatalogError> {
        self.with(|conn| {
            let set = conn
                .query_row(&format!("{SELECT_SET} WHERE id = ?1"), [id], set_from_row)
                .optional()?;
            set.map(|set| load_members(conn, set)).transpose()
        })
    }

    /// Newest first; `group` empty for all; `limit` 0 for all.
    pub fn list(&self, group: &str, limit: u32) -> Result<Vec<SnapshotSet>, CatalogError> {
        self.list_where(
            "WHERE (?1 = '' OR group_name = ?1) ORDER BY created_at_ms DESC, id DESC LIMIT ?2",
            params![group, if limit == 0 { -1 } else { i64::from(limit) }],
        )
    }

    /// Sets still marked running (in flight when a coordinator stopped).
    pub fn running(&self) -> Result<Vec<SnapshotSet>, CatalogError> {
        self.list_where(
            "WHERE state = ?1 ORDER BY created_at_ms",
            [SetState::Running.text()],
        )
    }

    fn list_where(
        &self,
        clause: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<SnapshotSet>, CatalogError> {
        self.with(|conn| {
            let sets = {
                let mut stmt = conn.prepare(&format!("{SELECT_SET} {clause}"))?;
                stmt.query_map(params, set_from_row)?
                    .collect::<Result<Vec<_>, _>>()?
            };
            sets.into_iter()
                .map(|set| load_members(conn, set))
                .collect()
        })
    }

    /// Hands a set's leftovers on `agent` to the reconciler (due at once). An existing entry is
    /// widened: to every snapshot of the set when either asks for that, and it keeps an
    /// unconfirmed thaw.
    pub fn add_pending_removal(
        &self,
        set_id: &str,
        agent: &str,
        snapshot_ids: &[String],
        thaw_unconfirmed: bool,
        now_ms: u64,
    ) -> Result<(), CatalogError> {
        let ids = serde_json::to_string(snapshot_ids).expect("strings serialise");
        self.with(|conn| {
            conn.execute(
                "INSERT INTO pending_removals (set_id, agent, snapshot_ids, since_ms,
                    next_attempt_at_ms, thaw_unconfirmed)
                 VALUES (?1, ?2, ?3, ?4, ?4, ?5)
                 ON CONFLICT (set_id, agent) DO UPDATE SET
                    snapshot_ids = CASE WHEN snapshot_ids = '[]' OR excluded.snapshot_ids = '[]'
                        THEN '[]' ELSE excluded.snapshot_ids END,
                    thaw_unconfirmed = thaw_unconfirmed OR excluded.thaw_unconfirmed,
                    next_attempt_at_ms = excluded.next_attempt_at_ms",
                params![set_id, agent, ids, now_ms as i64, thaw_unconfirmed],
            )?;
            Ok(())
        })
    }

    /// Pending removals due by `now_ms`, of sets that are no longer running (a running set's
    /// own run, or recovery, handles its leftovers first).
    pub fn due_removals(&self, now_ms: u64) -> Result<Vec<Pending>, CatalogError> {
        self.with(|conn| {
            pending_where(
                conn,
                "WHERE next_attempt_at_ms <= ?1
                   AND set_id IN (SELECT id FROM sets WHERE state != ?2)",
                params![now_ms as i64, SetState::Running.text()],
            )
        })
    }

    /// Every pending removal of one set (`""`: of every set).
    pub fn pending_removals(&self, set_id: &str) -> Result<Vec<Pending>, CatalogError> {
        self.with(|conn| pending_where(conn, "WHERE ?1 = '' OR set_id = ?1", [set_id]))
    }

    /// The reconciler's attempt failed: when to try again and why it did not finish.
    pub fn removal_retry(
        &self,
        set_id: &str,
        agent: &str,
        at_ms: u64,
        next_ms: u64,
        error: &str,
    ) -> Result<(), CatalogError> {
        self.with(|conn| {
            conn.execute(
                "UPDATE pending_removals SET attempts = attempts + 1, last_attempt_at_ms = ?3,
                    next_attempt_at_ms = ?4, last_error = ?5
                 WHERE set_id = ?1 AND agent = ?2",
                params![set_id, agent, at_ms as i64, next_ms as i64, error],
            )?;
            Ok(())
        })
    }

    /// The member's thaw is confirmed (a late report arrived): later attempts only remove.
    pub fn removal_thaw_confirmed(&self, set_id: &str, agent: &str) -> Result<(), CatalogError> {
        self.with(|conn| {
            conn.execute(
                "UPDATE pending_removals SET thaw_unconfirmed = 0 WHERE set_id = ?1 AND agent = ?2",
                params![set_id, agent],
            )?;
            Ok(())
        })
    }

    /// Everything of the set is gone from `agent`. Returns `true` when the set itself was
    /// forgotten too: its deletion was requested and this was its last pending removal.
    pub fn removal_done(&self, set_id: &str, agent: &str) -> Result<bool, CatalogError> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            tx.execute(
                "DELETE FROM pending_removals WHERE set_id = ?1 AND agent = ?2",
                params![set_id, agent],
            )?;
            let forgotten = tx.execute(
                "DELETE FROM sets WHERE id = ?1 AND delete_requested = 1
                   AND NOT EXISTS (SELECT 1 FROM pending_removals WHERE set_id = ?1)",
                [set_id],
            )? > 0;
            tx.commit()?;
            Ok(forgotten)
        })
    }

    /// An operator (or retention) asked for the set to go: it is forgotten once its last
    /// pending removal is done.
    pub fn request_delete(&self, id: &str) -> Result<(), CatalogError> {
        self.with(|conn| {
            conn.execute("UPDATE sets SET delete_requested = 1 WHERE id = ?1", [id])?;
            Ok(())
        })
    }

    /// Pending removals per agent (metric `quiesce_pending_removals`).
    pub fn pending_counts(&self) -> Result<Vec<(String, u64)>, CatalogError> {
        self.with(|conn| {
            let mut stmt =
                conn.prepare("SELECT agent, COUNT(*) FROM pending_removals GROUP BY agent")?;
            let rows = stmt
                .query_map([], |row| Ok((row.get(0)?, row.get::<_, i64>(1)? as u64)))?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    /// Updates the figures of one member host (a late thaw report) and the set's longest
    /// stall, in one transaction.
    pub fn update_host_report(&self, id: &str, host: &SetHost) -> Result<(), CatalogError> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            write_host(&tx, id, host)?;
            tx.execute(
                "UPDATE sets SET max_write_stall_ms = MAX(max_write_stall_ms, ?2) WHERE id = ?1",
                params![id, host.write_stall_ms as i64],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    pub fn delete(&self, id: &str) -> Result<bool, CatalogError> {
        self.with(|conn| Ok(conn.execute("DELETE FROM sets WHERE id = ?1", [id])? > 0))
    }

    /// Records a restore drill of a set.
    pub fn add_verification(&self, set_id: &str, v: &Verification) -> Result<(), CatalogError> {
        let checks: Vec<StoredCheck> = v.checks.iter().map(StoredCheck::from).collect();
        let checks = serde_json::to_string(&checks).unwrap_or_else(|_| "[]".into());
        self.with(|conn| {
            conn.execute(
                "INSERT INTO set_verifications (set_id, seq, agent, verified_at_ms, duration_ms,
                    outcome, error, checks)
                 VALUES (?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM set_verifications
                              WHERE set_id = ?1), ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    set_id,
                    v.agent,
                    v.verified_at_ms as i64,
                    v.duration_ms as i64,
                    v.outcome,
                    v.error,
                    checks
                ],
            )?;
            Ok(())
        })
    }

    /// The newest passed drill of a group's sets: (set id, verified at).
    pub fn last_verified(&self, group: &str) -> Result<Option<(String, u64)>, CatalogError> {
        self.with(|conn| {
            Ok(conn
                .query_row(
                    "SELECT v.set_id, v.verified_at_ms FROM set_verifications v
                     JOIN sets s ON s.id = v.set_id
                     WHERE s.group_name = ?1 AND v.outcome = ?2
                     ORDER BY v.verified_at_ms DESC LIMIT 1",
                    params![group, VerifyOutcome::Passed as i32],
                    |row| Ok((row.get(0)?, row.get::<_, i64>(1)? as u64)),
                )
                .optional()?)
        })
    }

    /// The newest consistent set of a group that no drill has passed, failed or taken to
    /// "no block device" (EBS) yet (one that could not run, or skipped everything, is tried
    /// again).
    pub fn newest_undrilled(&self, group: &str) -> Result<Option<String>, CatalogError> {
        self.with(|conn| {
            Ok(conn
                .query_row(
                    "SELECT s.id FROM sets s WHERE s.group_name = ?1 AND s.state = 'consistent'
                     AND NOT EXISTS (SELECT 1 FROM set_verifications v WHERE v.set_id = s.id
                                     AND v.outcome IN (?2, ?3, ?4))
                     ORDER BY s.created_at_ms DESC, s.id DESC LIMIT 1",
                    params![
                        group,
                        VerifyOutcome::Passed as i32,
                        VerifyOutcome::Failed as i32,
                        VerifyOutcome::NoBlockDevice as i32
                    ],
                    |row| row.get(0),
                )
                .optional()?)
        })
    }

    /// The newest consistent set of a group (by creation) that a drill passed.
    pub fn newest_verified_set(&self, group: &str) -> Result<Option<String>, CatalogError> {
        self.with(|conn| {
            Ok(conn
                .query_row(
                    "SELECT s.id FROM sets s WHERE s.group_name = ?1 AND s.state = 'consistent'
                     AND EXISTS (SELECT 1 FROM set_verifications v WHERE v.set_id = s.id
                                 AND v.outcome = ?2)
                     ORDER BY s.created_at_ms DESC, s.id DESC LIMIT 1",
                    params![group, VerifyOutcome::Passed as i32],
                    |row| row.get(0),
                )
                .optional()?)
        })
    }

    /// The newest consistent set of a group: (id, finished at).
    pub fn last_consistent(&self, group: &str) -> Result<Option<(String, u64)>, CatalogError> {
        self.with(|conn| {
            Ok(conn
                .query_row(
                    "SELECT id, finished_at_ms FROM sets WHERE group_name = ?1 AND state = ?2
                     ORDER BY finished_at_ms DESC LIMIT 1",
                    [group, SetState::Consistent.text()],
                    |row| Ok((row.get(0)?, row.get::<_, i64>(1)? as u64)),
                )
                .optional()?)
        })
    }
}

fn write_host(conn: &Connection, id: &str, host: &SetHost) -> Result<(), CatalogError> {
    conn.execute(
        "UPDATE set_hosts SET state = ?3, error = ?4, freeze_started_at_ms = ?5,
            frozen_at_ms = ?6, thawed_at_ms = ?7, held_continuously = ?8,
            freeze_end = ?9, write_stall_ms = ?10, freeze_sent_at_ms = ?11,
            freeze_acked_at_ms = ?12, snapshot_started_at_ms = ?13,
            snapshot_returned_at_ms = ?14, thaw_sent_at_ms = ?15, lease_sent_at_ms = ?16,
            lease_bound_at_ms = ?17, thaw_evidence = ?18, resume_ms = ?19,
            thaw_returned_at_ms = ?20
         WHERE set_id = ?1 AND agent = ?2",
        params![
            id,
            host.agent,
            host.state().text(),
            host.error,
            host.freeze_started_at_ms as i64,
            host.frozen_at_ms as i64,
            host.thawed_at_ms as i64,
            host.held_continuously,
            host.freeze_end().text(),
            host.write_stall_ms as i64,
            host.freeze_sent_at_ms as i64,
            host.freeze_acked_at_ms as i64,
            host.snapshot_started_at_ms as i64,
            host.snapshot_returned_at_ms as i64,
            host.thaw_sent_at_ms as i64,
            host.lease_sent_at_ms as i64,
            host.lease_bound_at_ms as i64,
            host.thaw_evidence,
            host.resume_ms as i64,
            host.thaw_returned_at_ms as i64
        ],
    )?;
    Ok(())
}

fn write_volume(conn: &Connection, id: &str, volume: &SetVolume) -> Result<(), CatalogError> {
    conn.execute(
        "UPDATE set_volumes SET device = ?4, fs_type = ?5, backing_file = ?6,
            snapshot_id = ?7, size_bytes = ?8, ebs_volume_id = ?9, instance_id = ?10
         WHERE set_id = ?1 AND agent = ?2 AND mount_point = ?3",
        params![
            id,
            volume.agent,
            volume.mount_point,
            volume.device,
            volume.fs_type,
            volume.backing_file,
            volume.snapshot_id,
            volume.size_bytes as i64,
            volume.ebs_volume_id,
            volume.instance_id
        ],
    )?;
    Ok(())
}

const SELECT_SET: &str = "SELECT id, group_name, provider, state, phase, error, created_at_ms,
    finished_at_ms, freeze_window_ms, max_write_stall_ms, verdict, first_snapshot_started_at_ms,
    last_snapshot_returned_at_ms, freeze_budget_ms, trigger, completion, snapshot_calls_ms,
    locked_until_ms FROM sets";

/// A finished set, as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishedSet {
    pub id: String,
    pub consistent: bool,
    pub created_at_ms: u64,
    pub finished_at_ms: u64,
}

/// A state column: its TEXT as the enum's number; text that names no value is an error naming it.
fn state_col<E: StateText + Into<i32>>(
    row: &rusqlite::Row<'_>,
    idx: usize,
) -> rusqlite::Result<i32> {
    let text: String = row.get(idx)?;
    E::from_text(&text).map(Into::into).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn set_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<SnapshotSet> {
    Ok(SnapshotSet {
        id: row.get(0)?,
        group: row.get(1)?,
        provider: row.get(2)?,
        state: state_col::<SetState>(row, 3)?,
        phase: state_col::<SetPhase>(row, 4)?,
        error: row.get(5)?,
        created_at_ms: row.get::<_, i64>(6)? as u64,
        finished_at_ms: row.get::<_, i64>(7)? as u64,
        freeze_window_ms: row.get::<_, i64>(8)? as u64,
        max_write_stall_ms: row.get::<_, i64>(9)? as u64,
        verdict: row.get(10)?,
        first_snapshot_started_at_ms: row.get::<_, i64>(11)? as u64,
        last_snapshot_returned_at_ms: row.get::<_, i64>(12)? as u64,
        freeze_budget_ms: row.get::<_, i64>(13)? as u64,
        trigger: row.get(14)?,
        completion: state_col::<Completion>(row, 15)?,
        snapshot_calls_ms: row.get::<_, i64>(16)? as u64,
        locked_until_ms: row.get::<_, i64>(17)? as u64,
        hosts: Vec::new(),
        volumes: Vec::new(),
        phases: Vec::new(),
        hook_outputs: Vec::new(),
        pending_removals: Vec::new(),
        verifications: Vec::new(),
        max_resume_ms: 0,
    })
}

fn load_members(conn: &Connection, mut set: SnapshotSet) -> Result<SnapshotSet, CatalogError> {
    let mut stmt = conn.prepare_cached(
        "SELECT agent, state, error, freeze_started_at_ms, frozen_at_ms, thawed_at_ms,
            held_continuously, freeze_end, write_stall_ms, freeze_sent_at_ms, freeze_acked_at_ms,
            snapshot_started_at_ms, snapshot_returned_at_ms, thaw_sent_at_ms, lease_sent_at_ms,
            lease_bound_at_ms, thaw_evidence, resume_ms, thaw_returned_at_ms
         FROM set_hosts WHERE set_id = ?1 ORDER BY agent",
    )?;
    set.hosts = stmt
        .query_map([&set.id], |row| {
            Ok(SetHost {
                agent: row.get(0)?,
                state: state_col::<quiesce_proto::coordinator::v1::HostState>(row, 1)?,
                error: row.get(2)?,
                freeze_started_at_ms: row.get::<_, i64>(3)? as u64,
                frozen_at_ms: row.get::<_, i64>(4)? as u64,
                thawed_at_ms: row.get::<_, i64>(5)? as u64,
                held_continuously: row.get(6)?,
                freeze_end: state_col::<quiesce_proto::agent::v1::FreezeEnd>(row, 7)?,
                write_stall_ms: row.get::<_, i64>(8)? as u64,
                freeze_sent_at_ms: row.get::<_, i64>(9)? as u64,
                freeze_acked_at_ms: row.get::<_, i64>(10)? as u64,
                snapshot_started_at_ms: row.get::<_, i64>(11)? as u64,
                snapshot_returned_at_ms: row.get::<_, i64>(12)? as u64,
                thaw_sent_at_ms: row.get::<_, i64>(13)? as u64,
                lease_sent_at_ms: row.get::<_, i64>(14)? as u64,
                lease_bound_at_ms: row.get::<_, i64>(15)? as u64,
                thaw_evidence: row.get(16)?,
                resume_ms: row.get::<_, i64>(17)? as u64,
                thaw_returned_at_ms: row.get::<_, i64>(18)? as u64,
            })
        })?
        .collect::<Result<_, _>>()?;
    set.max_resume_ms = set.hosts.iter().map(|h| h.resume_ms).max().unwrap_or(0);
    let mut stmt = conn.prepare_cached(
        "SELECT agent, mount_point, device, fs_type, backing_file, snapshot_id, size_bytes,
            ebs_volume_id, instance_id, snapshot_state, snapshot_progress
         FROM set_volumes WHERE set_id = ?1 ORDER BY agent, mount_point",
    )?;
    set.volumes = stmt
        .query_map([&set.id], |row| {
            Ok(SetVolume {
                agent: row.get(0)?,
                mount_point: row.get(1)?,
                device: row.get(2)?,
                fs_type: row.get(3)?,
                backing_file: row.get(4)?,
                snapshot_id: row.get(5)?,
                size_bytes: row.get::<_, i64>(6)? as u64,
                ebs_volume_id: row.get(7)?,
                instance_id: row.get(8)?,
                snapshot_state: row.get(9)?,
                snapshot_progress: row.get::<_, i64>(10)? as u32,
            })
        })?
        .collect::<Result<_, _>>()?;
    let mut stmt =
        conn.prepare_cached("SELECT phase, at_ms FROM set_phases WHERE set_id = ?1 ORDER BY seq")?;
    set.phases = stmt
        .query_map([&set.id], |row| {
            Ok(PhaseMark {
                phase: state_col::<SetPhase>(row, 0)?,
                at_ms: row.get::<_, i64>(1)? as u64,
            })
        })?
        .collect::<Result<_, _>>()?;
    let mut stmt = conn.prepare_cached(
        "SELECT agent, hook, kind, hook_values, backup_label, tablespace_map, error, quiesce_ms,
            resume_ms
         FROM set_hook_outputs WHERE set_id = ?1 ORDER BY agent, seq",
    )?;
    set.hook_outputs = stmt
        .query_map([&set.id], |row| {
            let values: String = row.get(3)?;
            let pairs: Vec<(String, String)> = serde_json::from_str(&values).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(
                    3,
                    rusqlite::types::Type::Text,
                    Box::new(e),
                )
            })?;
            Ok(SetHookOutput {
                agent: row.get(0)?,
                hook: row.get(1)?,
                kind: row.get(2)?,
                values: pairs
                    .into_iter()
                    .map(|(key, value)| HookValue { key, value })
                    .collect(),
                backup_label: row.get(4)?,
                tablespace_map: row.get(5)?,
                error: row.get(6)?,
                quiesce_ms: row.get::<_, i64>(7)? as u64,
                resume_ms: row.get::<_, i64>(8)? as u64,
            })
        })?
        .collect::<Result<_, _>>()?;
    let mut stmt = conn.prepare_cached(
        "SELECT agent, verified_at_ms, duration_ms, outcome, error, checks FROM (
            SELECT * FROM set_verifications WHERE set_id = ?1 ORDER BY seq DESC LIMIT 10
         ) ORDER BY seq",
    )?;
    set.verifications = stmt
        .query_map([&set.id], |row| {
            let checks: String = row.get(5)?;
            let checks: Vec<StoredCheck> = serde_json::from_str(&checks).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(
                    5,
                    rusqlite::types::Type::Text,
                    Box::new(e),
                )
            })?;
            Ok(Verification {
                agent: row.get(0)?,
                verified_at_ms: row.get::<_, i64>(1)? as u64,
                duration_ms: row.get::<_, i64>(2)? as u64,
                outcome: row.get(3)?,
                error: row.get(4)?,
                checks: checks.into_iter().map(VerifyCheck::from).collect(),
            })
        })?
        .collect::<Result<_, _>>()?;
    set.pending_removals = pending_where(conn, "WHERE set_id = ?1", [&set.id])?
        .into_iter()
        .map(|p| p.status)
        .collect();
    Ok(set)
}

/// A drill's check as the catalog stores it (JSON).
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredCheck {
    name: String,
    kind: String,
    outcome: i32,
    check: String,
    output: String,
    duration_ms: u64,
}

impl From<&VerifyCheck> for StoredCheck {
    fn from(c: &VerifyCheck) -> Self {
        StoredCheck {
            name: c.name.clone(),
            kind: c.kind.clone(),
            outcome: c.outcome,
            check: c.check.clone(),
            output: c.output.clone(),
            duration_ms: c.duration_ms,
        }
    }
}

impl From<StoredCheck> for VerifyCheck {
    fn from(c: StoredCheck) -> Self {
        VerifyCheck {
            name: c.name,
            kind: c.kind,
            outcome: c.outcome,
            check: c.check,
            output: c.output,
            duration_ms: c.duration_ms,
        }
    }
}

/// One pending removal as the reconciler works on it.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    pub status: PendingRemoval,
    /// Known snapshot ids on that agent; empty for everything of the set there.
    pub snapshot_ids: Vec<String>,
}

fn pending_where(
    conn: &Connection,
    clause: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<Pending>, CatalogError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT set_id, agent, snapshot_ids, since_ms, attempts, last_attempt_at_ms,
            next_attempt_at_ms, last_error, thaw_unconfirmed
         FROM pending_removals {clause} ORDER BY since_ms, set_id, agent"
    ))?;
    let rows = stmt
        .query_map(params, |row| {
            let ids: String = row.get(2)?;
            let snapshot_ids: Vec<String> = serde_json::from_str(&ids).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(
                    2,
                    rusqlite::types::Type::Text,
                    Box::new(e),
                )
            })?;
            Ok(Pending {
                status: PendingRemoval {
                    set_id: row.get(0)?,
                    agent: row.get(1)?,
                    since_ms: row.get::<_, i64>(3)? as u64,
                    attempts: row.get::<_, i64>(4)? as u32,
                    last_attempt_at_ms: row.get::<_, i64>(5)? as u64,
                    next_attempt_at_ms: row.get::<_, i64>(6)? as u64,
                    last_error: row.get(7)?,
                    thaw_unconfirmed: row.get(8)?,
                },
                snapshot_ids,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiesce_proto::agent::v1::FreezeEnd;
    use quiesce_proto::coordinator::v1::HostState;

    fn new_set<'a>(id: &'a str, group: &'a str, at: u64) -> NewSet<'a> {
        NewSet {
            id,
            group,
            provider: "reflink",
            created_at_ms: at,
            volumes: vec![
                ("db1".into(), "/mnt/data".into()),
                ("db1".into(), "/mnt/wal".into()),
            ],
            trigger: "manual",
            freeze_budget_ms: 10_000,
        }
    }

    #[test]
    fn a_second_running_set_of_a_group_is_refused_by_name() {
        let catalog = Catalog::in_memory().unwrap();
        catalog.create_set(&new_set("s1", "pg", 1)).unwrap();
        let err = catalog.create_set(&new_set("s2", "pg", 2)).unwrap_err();
        assert!(
            err.to_string()
                .contains("group pg already has a running set: s1"),
            "{err}"
        );
        catalog.create_set(&new_set("s3", "other", 3)).unwrap();
        catalog
            .finish("s1", SetState::Failed, "boom", 0, 0, 4)
            .unwrap();
        catalog.create_set(&new_set("s2", "pg", 5)).unwrap();
    }

    #[test]
    fn a_set_round_trips_with_members_and_phases() {
        let catalog = Catalog::in_memory().unwrap();
        catalog.create_set(&new_set("s1", "pg", 10)).unwrap();
        catalog.set_phase("s1", SetPhase::Freezing, 20).unwrap();
        catalog
            .update_host(
                "s1",
                &SetHost {
                    agent: "db1".into(),
                    state: HostState::Thawed as i32,
                    held_continuously: true,
                    freeze_end: FreezeEnd::Thawed as i32,
                    write_stall_ms: 42,
                    ..Default::default()
                },
            )
            .unwrap();
        catalog
            .update_volume(
                "s1",
                &SetVolume {
                    agent: "db1".into(),
                    mount_point: "/mnt/wal".into(),
                    snapshot_id: "/pool/snap/wal.img".into(),
                    ..Default::default()
                },
            )
            .unwrap();
        catalog
            .finish("s1", SetState::Consistent, "", 55, 42, 30)
            .unwrap();

        let set = catalog.get("s1").unwrap().unwrap();
        assert_eq!(set.state(), SetState::Consistent);
        assert_eq!(set.phase(), SetPhase::Freezing);
        assert_eq!(set.freeze_window_ms, 55);
        assert_eq!(set.hosts.len(), 1);
        assert!(set.hosts[0].held_continuously);
        assert_eq!(set.volumes[1].snapshot_id, "/pool/snap/wal.img");
        let phases: Vec<_> = set.phases.iter().map(|p| p.phase().text()).collect();
        assert_eq!(phases, ["planned", "freezing"]);
        assert_eq!(
            catalog.last_consistent("pg").unwrap(),
            Some(("s1".into(), 30))
        );
        assert!(catalog.delete("s1").unwrap());
        assert!(catalog.get("s1").unwrap().is_none());
    }

    #[test]
    fn hook_outputs_round_trip_byte_for_byte_in_hook_order() {
        let catalog = Catalog::in_memory().unwrap();
        catalog.create_set(&new_set("s1", "pg", 1)).unwrap();
        let label =
            "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nLABEL: quiesce s1\n";
        let outputs = [
            SetHookOutput {
                agent: "db1".into(),
                hook: "pg-main".into(),
                kind: "postgres".into(),
                values: vec![
                    HookValue {
                        key: "lsn".into(),
                        value: "0/3000060".into(),
                    },
                    HookValue {
                        key: "a-key".into(),
                        value: "with \"quotes\" and\ttabs".into(),
                    },
                ],
                backup_label: label.into(),
                tablespace_map: "16384 /mnt/ts/pg\n".into(),
                quiesce_ms: 3,
                resume_ms: 9,
                ..Default::default()
            },
            SetHookOutput {
                agent: "db1".into(),
                hook: "scripts".into(),
                kind: "exec".into(),
                error: "hook scripts: resume failed: boom".into(),
                ..Default::default()
            },
        ];
        catalog.set_hook_outputs("s1", "db1", &outputs).unwrap();
        let set = catalog.get("s1").unwrap().unwrap();
        assert_eq!(set.hook_outputs, outputs);
        assert_eq!(set.hook_outputs[0].backup_label, label);
    }

    #[test]
    fn a_state_text_the_enums_do_not_know_is_an_error_naming_it() {
        let catalog = Catalog::in_memory().unwrap();
        catalog.create_set(&new_set("s1", "pg", 10)).unwrap();
        catalog
            .with(|conn| {
                conn.execute("UPDATE sets SET phase = 'snapshotted' WHERE id = 's1'", [])?;
                Ok(())
            })
            .unwrap();
        let err = catalog.get("s1").unwrap_err();
        let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(
            chain.contains("unknown set phase \"snapshotted\""),
            "{chain}"
        );
    }

    #[test]
    fn a_version_1_catalog_is_migrated_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.sqlite");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(
                "INSERT INTO sets (id, group_name, provider, state, phase, created_at_ms)
                 VALUES ('old', 'pg', 'reflink', 'consistent', 'committed', 1)",
                [],
            )
            .unwrap();
        }
        let catalog = Catalog::open(&path).unwrap();
        let old = catalog.get("old").unwrap().unwrap();
        assert_eq!(old.trigger, "manual");
        assert_eq!(old.verdict, "");
        catalog.set_verdict("old", "consistent: checked").unwrap();
        assert_eq!(
            catalog.get("old").unwrap().unwrap().verdict,
            "consistent: checked"
        );
        let set = catalog.get("old").unwrap().unwrap();
        assert!(set.hook_outputs.is_empty());
        assert_eq!(old.state(), SetState::Consistent);
        assert_eq!(old.completion(), Completion::Unspecified);
        catalog.create_set(&new_set("s1", "pg", 2)).unwrap();
        catalog.set_completion("s1", Completion::Pending).unwrap();
        catalog
            .update_volume_progress("s1", "db1", "/mnt/wal", "pending", 40)
            .unwrap();
        catalog
            .finish("s1", SetState::Consistent, "", 1, 1, 3)
            .unwrap();
        assert_eq!(catalog.completion_pending().unwrap(), ["s1"]);
        let set = catalog.get("s1").unwrap().unwrap();
        assert_eq!(set.volumes[1].snapshot_progress, 40);
        catalog.fail_completion("s1", "snapshot in error").unwrap();
        let set = catalog.get("s1").unwrap().unwrap();
        assert_eq!(
            (set.state().text(), set.completion().text()),
            ("failed", "error")
        );
        assert!(catalog.completion_pending().unwrap().is_empty());
    }

    #[test]
    fn a_file_catalog_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/catalog.sqlite");
        Catalog::open(&path)
            .unwrap()
            .create_set(&new_set("s1", "pg", 1))
            .unwrap();
        let catalog = Catalog::open(&path).unwrap();
        assert_eq!(catalog.running().unwrap().len(), 1);
        assert_eq!(catalog.list("", 0).unwrap().len(), 1);
    }
}
