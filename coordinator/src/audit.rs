//! The audit log: every operator API call (allowed or denied) and everything the coordinator
//! does by itself (scheduled sets, retention, agents' refusals), kept in the catalog as a hash
//! chain, and optionally copied as JSON lines to a file and to syslog.
//!
//! Each record carries the SHA-256 of the record before it (`prev_hash`) and its own `hash`
//! over every field and `prev_hash`: editing, inserting or removing a record in the catalog
//! breaks the chain at that record, which `verify` names. Pruning (`[audit] keep`) removes
//! the oldest records and writes a record naming the last removed seq and hash, so the chain
//! still verifies from its new first record.
//!
//! Records are appended by one writer thread, in batches (one transaction, one fsync): an API
//! call never waits on the disk for its audit record, and the chain has one writer per
//! process. Several coordinators on one catalog serialize through the transaction.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use quiesce_proto::coordinator::v1 as pb;
use rusqlite::{OptionalExtension, params};
use serde::Deserialize;
use tracing::{error, warn};

use crate::catalog::{Catalog, CatalogError};

/// `prev_hash` of the first record of a chain.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Longest `args` and `message` kept in a record (characters; longer ends in "…").
pub const MAX_FIELD_CHARS: usize = 2000;

/// Most records one `ListAudit` answer carries (the newest of them; `since` pages back).
pub const MAX_LIST: usize = 5000;

/// `[audit]` of the coordinator config.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct AuditConfig {
    /// Also append every record to this file, one JSON object per line.
    pub file: Option<PathBuf>,
    /// Also send every record to syslog (journald listens there too).
    #[serde(default)]
    pub syslog: bool,
    /// The syslog socket.
    #[serde(default = "default_syslog_socket")]
    pub syslog_socket: PathBuf,
    /// Records younger than this are never removed; older ones are, by the retention pass.
    /// Unset: records are kept forever.
    #[serde(default, with = "humantime_serde")]
    pub keep: Option<Duration>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            file: None,
            syslog: false,
            syslog_socket: default_syslog_socket(),
            keep: None,
        }
    }
}

fn default_syslog_socket() -> PathBuf {
    PathBuf::from("/dev/log")
}

/// Shortest `[audit] keep` accepted: audit records are evidence, not a cache.
pub const MIN_KEEP: Duration = Duration::from_secs(24 * 3600);

/// Config problems of `[audit]` (reported with every other problem by `check-config`).
pub fn problems(config: &AuditConfig) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(keep) = config.keep
        && keep < MIN_KEEP
    {
        problems.push(format!(
            "audit.keep is {}; it must be at least 1 day",
            humantime::format_duration(keep)
        ));
    }
    if let Some(file) = &config.file
        && !file.is_absolute()
    {
        problems.push(format!(
            "audit.file {} must be an absolute path",
            file.display()
        ));
    }
    problems
}

/// What is recorded; the log adds seq and hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub at_ms: u64,
    pub identity: String,
    pub verb: pb::AuditVerb,
    pub group: String,
    pub set_id: String,
    /// A JSON object.
    pub args: String,
    pub outcome: pb::AuditOutcome,
    pub code: String,
    pub message: String,
}

impl Entry {
    /// An action the coordinator's scheduler took.
    pub fn scheduler(
        at_ms: u64,
        verb: pb::AuditVerb,
        group: &str,
        set_id: &str,
        outcome: pb::AuditOutcome,
        message: String,
    ) -> Entry {
        Entry {
            at_ms,
            identity: "scheduler".into(),
            verb,
            group: group.into(),
            set_id: set_id.into(),
            args: "{}".into(),
            outcome,
            code: String::new(),
            message,
        }
    }
}

/// `text` cut to `max` characters, ending in "…" when cut.
pub fn cap(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_owned(),
        Some((end, _)) => format!("{}…", &text[..end]),
    }
}

/// The hash of `record`: SHA-256 over every field but `hash`, each length-prefixed so no two
/// records share an encoding.
pub fn hash(record: &pb::AuditRecord) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut field = |bytes: &[u8]| {
        ctx.update(&(bytes.len() as u64).to_be_bytes());
        ctx.update(bytes);
    };
    field(&record.seq.to_be_bytes());
    field(&record.at_ms.to_be_bytes());
    field(record.identity.as_bytes());
    field(&record.verb.to_be_bytes());
    field(record.group.as_bytes());
    field(record.set_id.as_bytes());
    field(record.args.as_bytes());
    field(&record.outcome.to_be_bytes());
    field(record.code.as_bytes());
    field(record.message.as_bytes());
    field(record.prev_hash.as_bytes());
    let digest = ctx.finish();
    let mut hex = String::with_capacity(64);
    for byte in digest.as_ref() {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

/// A verb's short name, as the CLI and the JSON lines show it (`create_set`).
pub fn verb_name(verb: i32) -> String {
    pb::AuditVerb::try_from(verb)
        .map(|v| {
            v.as_str_name()
                .trim_start_matches("AUDIT_VERB_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| format!("verb-{verb}"))
}

/// An outcome's short name (`ok`, `denied`, `failed`).
pub fn outcome_name(outcome: i32) -> String {
    pb::AuditOutcome::try_from(outcome)
        .map(|v| {
            v.as_str_name()
                .trim_start_matches("AUDIT_OUTCOME_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| format!("outcome-{outcome}"))
}

/// One record as a JSON object with named verb and outcome (the file and syslog copies).
pub fn json_line(record: &pb::AuditRecord) -> String {
    serde_json::json!({
        "seq": record.seq,
        "at_ms": record.at_ms,
        "identity": record.identity,
        "verb": verb_name(record.verb),
        "group": record.group,
        "set_id": record.set_id,
        "args": serde_json::from_str::<serde_json::Value>(&record.args)
            .unwrap_or_else(|_| serde_json::Value::String(record.args.clone())),
        "outcome": outcome_name(record.outcome),
        "code": record.code,
        "message": record.message,
        "prev_hash": record.prev_hash,
        "hash": record.hash,
    })
    .to_string()
}

enum Msg {
    Record(Entry),
    /// Answered once everything sent before is in the catalog.
    Flush(mpsc::SyncSender<()>),
}

/// The process's audit log: appends through its writer thread, reads from the catalog.
pub struct AuditLog {
    catalog: Arc<Catalog>,
    tx: mpsc::Sender<Msg>,
    /// Groups frozen now: while any is, the writer keeps its records in memory (no fsync
    /// while a group is frozen), for at most [`MAX_HOLD`].
    frozen: Arc<AtomicUsize>,
}

/// Longest the writer keeps records back for frozen groups (each window is bounded by its
/// group's freeze budget; back-to-back windows of several groups must not starve the log).
pub const MAX_HOLD: Duration = Duration::from_secs(30);

/// Held while a group is frozen (see [`AuditLog::hold`]); released on drop, on every path.
pub struct Hold(Arc<AtomicUsize>);

impl Drop for Hold {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl AuditLog {
    /// Starts the writer thread. The JSON-lines file is opened (created 0600) here; the
    /// coordinator checks it can be ([`check_file`]) before it starts, so a file that cannot be
    /// written fails start-up, and one that fails later is logged (the catalog keeps the chain).
    pub fn start(catalog: Arc<Catalog>, config: &AuditConfig) -> Arc<AuditLog> {
        let file = config
            .file
            .as_deref()
            .and_then(|path| match open_append(path) {
                Ok(file) => Some(file),
                Err(e) => {
                    error!(error = %e, "audit file not written; the records are in the catalog");
                    None
                }
            });
        let syslog = config.syslog.then(|| Syslog::new(&config.syslog_socket));
        let (tx, rx) = mpsc::channel();
        let frozen = Arc::new(AtomicUsize::new(0));
        let writer = Writer {
            catalog: catalog.clone(),
            file,
            syslog,
            frozen: frozen.clone(),
        };
        std::thread::Builder::new()
            .name("audit".into())
            .spawn(move || writer.run(rx))
            .expect("spawn the audit writer thread");
        Arc::new(AuditLog {
            catalog,
            tx,
            frozen,
        })
    }

    /// Keeps records off the disk until the returned guard drops: taken by a set from its
    /// first freeze sent to its last thaw returned.
    pub fn hold(&self) -> Hold {
        self.frozen.fetch_add(1, Ordering::SeqCst);
        Hold(self.frozen.clone())
    }

    /// How many groups are frozen now (holds taken and not dropped).
    pub fn frozen_groups(&self) -> usize {
        self.frozen.load(Ordering::SeqCst)
    }

    /// Queues `entry`; never blocks. Fields are capped here.
    pub fn record(&self, mut entry: Entry) {
        entry.args = cap(&entry.args, MAX_FIELD_CHARS);
        entry.message = cap(&entry.message, MAX_FIELD_CHARS);
        if let Err(mpsc::SendError(Msg::Record(entry))) = self.tx.send(Msg::Record(entry)) {
            // The writer is gone (it only stops when the process does): keep the record in
            // the log rather than lose it.
            error!(?entry, "audit writer stopped; record not appended");
        }
    }

    /// Waits until everything recorded before is in the catalog (reads see their own calls).
    pub async fn flush(&self) {
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        if self.tx.send(Msg::Flush(done_tx)).is_err() {
            return;
        }
        let _ = tokio::task::spawn_blocking(move || done_rx.recv()).await;
    }

    /// The records of the catalog, oldest first: at or after `since_ms`, for which `visible`
    /// says yes, the newest `limit` of them (0: up to [`MAX_LIST`]).
    pub fn list(
        &self,
        since_ms: u64,
        limit: usize,
        mut visible: impl FnMut(&pb::AuditRecord) -> bool,
    ) -> Result<Vec<pb::AuditRecord>, CatalogError> {
        let limit = if limit == 0 {
            MAX_LIST
        } else {
            limit.min(MAX_LIST)
        };
        self.catalog.with(|conn| {
            let mut stmt = conn.prepare(&format!(
                "{SELECT_RECORD} WHERE at_ms >= ?1 ORDER BY seq DESC"
            ))?;
            let mut rows = stmt.query([since_ms as i64])?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                let record = record_from_row(row)?;
                if visible(&record) {
                    out.push(record);
                    if out.len() == limit {
                        break;
                    }
                }
            }
            out.reverse();
            Ok(out)
        })
    }

    /// Checks the whole chain.
    pub fn verify(&self) -> Result<pb::VerifyAuditResponse, CatalogError> {
        self.catalog.with(|conn| {
            let mut stmt = conn.prepare(&format!("{SELECT_RECORD} ORDER BY seq"))?;
            let records = stmt
                .query_map([], record_from_row)?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(verify_chain(&records))
        })
    }

    /// Removes records older than `keep` (never younger), leaving a record that names the
    /// last one removed so the chain still verifies. Returns how many were removed.
    pub fn prune(&self, keep: Duration, now_ms: u64) -> Result<u64, CatalogError> {
        let cutoff = now_ms.saturating_sub(keep.as_millis() as u64);
        let last: Option<(i64, String)> = self.catalog.with(|conn| {
            Ok(conn
                .query_row(
                    "SELECT seq, hash FROM audit WHERE at_ms < ?1 ORDER BY seq DESC LIMIT 1",
                    [cutoff as i64],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .optional()?)
        })?;
        let Some((last_seq, last_hash)) = last else {
            return Ok(0);
        };
        let removed = self.catalog.with(|conn| {
            Ok(conn.execute("DELETE FROM audit WHERE seq <= ?1", [last_seq])? as u64)
        })?;
        self.record(Entry {
            at_ms: now_ms,
            identity: "coordinator".into(),
            verb: pb::AuditVerb::AuditPruned,
            group: String::new(),
            set_id: String::new(),
            args: serde_json::json!({
                "up_to_seq": last_seq,
                "last_hash": last_hash,
                "keep": humantime::format_duration(keep).to_string(),
            })
            .to_string(),
            outcome: pb::AuditOutcome::Ok,
            code: String::new(),
            message: format!("{removed} records older than the audit keep removed"),
        });
        Ok(removed)
    }
}

/// Checks `records` (ascending seq): each hash right, each linked to the one before, no seq
/// missing. A first record after seq 1 is accepted only where a pruning record vouches for the
/// seq and hash before it.
pub fn verify_chain(records: &[pb::AuditRecord]) -> pb::VerifyAuditResponse {
    let mut response = pb::VerifyAuditResponse {
        intact: true,
        records: records.len() as u64,
        first_seq: records.first().map_or(0, |r| r.seq),
        last_seq: records.last().map_or(0, |r| r.seq),
        broken_seq: 0,
        problem: String::new(),
    };
    let mut broken = |seq: u64, problem: String| {
        if response.intact {
            response.intact = false;
            response.broken_seq = seq;
            response.problem = problem;
        }
    };
    let Some(first) = records.first() else {
        return response;
    };
    if first.seq == 1 {
        if first.prev_hash != GENESIS {
            broken(1, "the first record does not start the chain".into());
        }
    } else {
        let vouched = records.iter().any(|r| {
            r.verb == pb::AuditVerb::AuditPruned as i32
                && serde_json::from_str::<serde_json::Value>(&r.args).is_ok_and(|args| {
                    args["up_to_seq"].as_u64() == Some(first.seq - 1)
                        && args["last_hash"].as_str() == Some(first.prev_hash.as_str())
                })
        });
        if !vouched {
            broken(
                first.seq,
                format!(
                    "records 1–{} are missing and no pruning record accounts for them",
                    first.seq - 1
                ),
            );
        }
    }
    let mut prev: Option<&pb::AuditRecord> = None;
    for record in records {
        if let Some(p) = prev {
            if record.seq != p.seq + 1 {
                broken(
                    p.seq + 1,
                    format!(
                        "record {} is missing (record {} follows {})",
                        p.seq + 1,
                        record.seq,
                        p.seq
                    ),
                );
            } else if record.prev_hash != p.hash {
                broken(
                    record.seq,
                    format!(
                        "record {} does not link to record {} (its prev_hash is not that record's hash)",
                        record.seq, p.seq
                    ),
                );
            }
        }
        if hash(record) != record.hash {
            broken(
                record.seq,
                format!(
                    "record {} was altered: its fields do not give its hash",
                    record.seq
                ),
            );
        }
        prev = Some(record);
    }
    response
}

const SELECT_RECORD: &str = "SELECT seq, at_ms, identity, verb, group_name, set_id, args, outcome,
    code, message, prev_hash, hash FROM audit";

fn record_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<pb::AuditRecord> {
    Ok(pb::AuditRecord {
        seq: row.get::<_, i64>(0)? as u64,
        at_ms: row.get::<_, i64>(1)? as u64,
        identity: row.get(2)?,
        verb: row.get(3)?,
        group: row.get(4)?,
        set_id: row.get(5)?,
        args: row.get(6)?,
        outcome: row.get(7)?,
        code: row.get(8)?,
        message: row.get(9)?,
        prev_hash: row.get(10)?,
        hash: row.get(11)?,
    })
}

/// Whether the audit file of `config` can be appended to (start-up check).
pub fn check_file(config: &AuditConfig) -> std::io::Result<()> {
    match &config.file {
        Some(path) => open_append(path).map(drop),
        None => Ok(()),
    }
}

fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("audit file {}: {e}", path.display())))
}

struct Syslog {
    socket: PathBuf,
    sock: Option<UnixDatagram>,
}

impl Syslog {
    fn new(socket: &Path) -> Syslog {
        Syslog {
            socket: socket.to_owned(),
            sock: None,
        }
    }

    /// Facility `security/authorization` (10) at `info`: `<86>`.
    fn send(&mut self, line: &str) {
        let message = format!("<86>quiesce-coordinator[{}]: {line}", std::process::id());
        for _ in 0..2 {
            if self.sock.is_none() {
                match UnixDatagram::unbound().and_then(|s| s.connect(&self.socket).map(|()| s)) {
                    Ok(s) => self.sock = Some(s),
                    Err(e) => {
                        warn!(socket = %self.socket.display(), error = %e, "audit: syslog unreachable; the record is in the catalog");
                        return;
                    }
                }
            }
            match self.sock.as_ref().map(|s| s.send(message.as_bytes())) {
                Some(Ok(_)) => return,
                // The listener restarted (journald): reconnect once.
                _ => self.sock = None,
            }
        }
    }
}

struct Writer {
    catalog: Arc<Catalog>,
    file: Option<std::fs::File>,
    syslog: Option<Syslog>,
    frozen: Arc<AtomicUsize>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        while let Ok(first) = rx.recv() {
            let mut entries = Vec::new();
            let mut waiters = Vec::new();
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Record(e) => entries.push(e),
                    Msg::Flush(w) => waiters.push(w),
                }
                if entries.len() < 512 {
                    next = rx.try_recv().ok();
                }
            }
            if !entries.is_empty() {
                let held = std::time::Instant::now();
                while self.frozen.load(Ordering::SeqCst) > 0 && held.elapsed() < MAX_HOLD {
                    std::thread::sleep(Duration::from_millis(5));
                }
                self.append(entries);
            }
            for waiter in waiters {
                let _ = waiter.send(());
            }
        }
    }

    fn append(&mut self, entries: Vec<Entry>) {
        let mut attempt = 0;
        let records = loop {
            match append_batch(&self.catalog, &entries) {
                Ok(records) => break records,
                Err(e) if attempt < 3 => {
                    attempt += 1;
                    warn!(error = %e, attempt, "audit append failed; retrying");
                    std::thread::sleep(Duration::from_millis(200 * attempt));
                }
                Err(e) => {
                    for entry in &entries {
                        error!(error = %e, ?entry, "audit record not appended to the catalog");
                    }
                    return;
                }
            }
        };
        for record in &records {
            let line = json_line(record);
            if let Some(file) = &mut self.file
                && let Err(e) = writeln!(file, "{line}")
            {
                error!(error = %e, seq = record.seq, "audit file write failed; the record is in the catalog");
            }
            if let Some(syslog) = &mut self.syslog {
                syslog.send(&line);
            }
        }
        if let Some(file) = &self.file
            && let Err(e) = file.sync_data()
        {
            error!(error = %e, "audit file sync failed");
        }
    }
}

/// Appends `entries` in one transaction, chained to the last record in the catalog.
fn append_batch(
    catalog: &Catalog,
    entries: &[Entry],
) -> Result<Vec<pb::AuditRecord>, CatalogError> {
    catalog.with(|conn| {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let (mut seq, mut prev): (u64, String) = tx
            .query_row(
                "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
                [],
                |row| Ok((row.get::<_, i64>(0)? as u64, row.get(1)?)),
            )
            .optional()?
            .unwrap_or((0, GENESIS.to_owned()));
        let mut records = Vec::with_capacity(entries.len());
        for entry in entries {
            seq += 1;
            let mut record = pb::AuditRecord {
                seq,
                at_ms: entry.at_ms,
                identity: entry.identity.clone(),
                verb: entry.verb as i32,
                group: entry.group.clone(),
                set_id: entry.set_id.clone(),
                args: entry.args.clone(),
                outcome: entry.outcome as i32,
                code: entry.code.clone(),
                message: entry.message.clone(),
                prev_hash: prev,
                hash: String::new(),
            };
            record.hash = hash(&record);
            tx.execute(
                "INSERT INTO audit (seq, at_ms, identity, verb, group_name, set_id, args, outcome,
                    code, message, prev_hash, hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                params![
                    record.seq as i64,
                    record.at_ms as i64,
                    record.identity,
                    record.verb,
                    record.group,
                    record.set_id,
                    record.args,
                    record.outcome,
                    record.code,
                    record.message,
                    record.prev_hash,
                    record.hash,
                ],
            )?;
            prev = record.hash.clone();
            records.push(record);
        }
        tx.commit()?;
        Ok(records)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(identity: &str, verb: pb::AuditVerb, outcome: pb::AuditOutcome) -> Entry {
        Entry {
            at_ms: 1_000,
            identity: identity.into(),
            verb,
            group: "billing".into(),
            set_id: String::new(),
            args: r#"{"group":"billing"}"#.into(),
            outcome,
            code: String::new(),
            message: String::new(),
        }
    }

    fn log() -> (Arc<Catalog>, Arc<AuditLog>) {
        let catalog = Arc::new(Catalog::in_memory().unwrap());
        let log = AuditLog::start(catalog.clone(), &AuditConfig::default());
        (catalog, log)
    }

    #[tokio::test]
    async fn records_chain_and_verify_and_an_edit_is_named() {
        let (catalog, log) = log();
        for i in 0..5 {
            let mut e = entry(
                "operator ada",
                pb::AuditVerb::CreateSet,
                pb::AuditOutcome::Ok,
            );
            e.at_ms = 1_000 + i;
            log.record(e);
        }
        log.flush().await;
        let records = log.list(0, 0, |_| true).unwrap();
        assert_eq!(records.len(), 5);
        assert_eq!(records[0].prev_hash, GENESIS);
        assert_eq!(records[1].prev_hash, records[0].hash);
        assert_eq!(
            records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        let ok = log.verify().unwrap();
        assert!(ok.intact, "{ok:?}");
        assert_eq!((ok.records, ok.first_seq, ok.last_seq), (5, 1, 5));

        catalog
            .with(|c| {
                c.execute(
                    "UPDATE audit SET identity = 'operator mallory' WHERE seq = 3",
                    [],
                )?;
                Ok(())
            })
            .unwrap();
        let bad = log.verify().unwrap();
        assert!(!bad.intact);
        assert_eq!(bad.broken_seq, 3);
        assert!(bad.problem.contains("record 3 was altered"), "{bad:?}");

        // Recomputing the edited record's hash still breaks the link of the next one.
        let mut altered = log.list(0, 0, |r| r.seq == 3).unwrap().remove(0);
        altered.hash = hash(&altered);
        catalog
            .with(|c| {
                c.execute("UPDATE audit SET hash = ?1 WHERE seq = 3", [&altered.hash])?;
                Ok(())
            })
            .unwrap();
        let bad = log.verify().unwrap();
        assert_eq!(bad.broken_seq, 4, "{bad:?}");

        catalog
            .with(|c| {
                c.execute("DELETE FROM audit WHERE seq >= 3", [])?;
                Ok(())
            })
            .unwrap();
        assert!(log.verify().unwrap().intact);
        catalog
            .with(|c| {
                c.execute("DELETE FROM audit WHERE seq = 1", [])?;
                Ok(())
            })
            .unwrap();
        let bad = log.verify().unwrap();
        assert_eq!(bad.broken_seq, 2);
        assert!(bad.problem.contains("no pruning record"), "{bad:?}");
    }

    #[tokio::test]
    async fn a_missing_record_in_the_middle_is_named() {
        let (catalog, log) = log();
        for _ in 0..4 {
            log.record(entry(
                "scheduler",
                pb::AuditVerb::ScheduledBackup,
                pb::AuditOutcome::Ok,
            ));
        }
        log.flush().await;
        catalog
            .with(|c| {
                c.execute("DELETE FROM audit WHERE seq = 2", [])?;
                Ok(())
            })
            .unwrap();
        let bad = log.verify().unwrap();
        assert_eq!(bad.broken_seq, 2);
        assert!(bad.problem.contains("record 2 is missing"), "{bad:?}");
    }

    #[tokio::test]
    async fn pruning_keeps_young_records_and_the_chain_verifies() {
        let (_catalog, log) = log();
        let day = 24 * 3600 * 1000;
        for at in [1, 2, 3 * day, 4 * day] {
            let mut e = entry(
                "operator vera",
                pb::AuditVerb::ListSets,
                pb::AuditOutcome::Ok,
            );
            e.at_ms = at;
            log.record(e);
        }
        log.flush().await;
        let removed = log.prune(Duration::from_millis(2 * day), 4 * day).unwrap();
        assert_eq!(removed, 2, "only records older than the keep go");
        log.flush().await;
        let records = log.list(0, 0, |_| true).unwrap();
        assert_eq!(records.first().unwrap().seq, 3);
        assert_eq!(
            records.last().unwrap().verb,
            pb::AuditVerb::AuditPruned as i32
        );
        let ok = log.verify().unwrap();
        assert!(ok.intact, "{ok:?}");
        // Nothing older than the keep left: pruning again removes nothing.
        assert_eq!(
            log.prune(Duration::from_millis(2 * day), 4 * day).unwrap(),
            0
        );
    }

    #[tokio::test]
    async fn list_takes_the_newest_visible_records_oldest_first_and_caps_fields() {
        let (_catalog, log) = log();
        for (i, group) in ["billing", "orders", "billing", "orders", "billing"]
            .iter()
            .enumerate()
        {
            let mut e = entry(
                "operator otto",
                pb::AuditVerb::GetSet,
                pb::AuditOutcome::Denied,
            );
            e.group = (*group).into();
            e.at_ms = 10 + i as u64;
            e.message = "x".repeat(MAX_FIELD_CHARS + 50);
            log.record(e);
        }
        log.flush().await;
        let billing = log.list(0, 2, |r| r.group == "billing").unwrap();
        assert_eq!(billing.iter().map(|r| r.seq).collect::<Vec<_>>(), [3, 5]);
        assert_eq!(billing[0].message.chars().count(), MAX_FIELD_CHARS + 1);
        assert!(billing[0].message.ends_with('…'));
        let since = log.list(13, 0, |_| true).unwrap();
        assert_eq!(since.iter().map(|r| r.seq).collect::<Vec<_>>(), [4, 5]);
    }

    #[tokio::test]
    async fn records_go_to_the_file_and_to_syslog_as_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("log");
        let listener = UnixDatagram::bind(&socket).unwrap();
        listener
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let config = AuditConfig {
            file: Some(dir.path().join("audit.jsonl")),
            syslog: true,
            syslog_socket: socket,
            keep: None,
        };
        check_file(&config).unwrap();
        let catalog = Arc::new(Catalog::in_memory().unwrap());
        let log = AuditLog::start(catalog, &config);
        log.record(entry(
            "operator ada",
            pb::AuditVerb::DeleteSet,
            pb::AuditOutcome::Ok,
        ));
        log.flush().await;
        let mut buf = vec![0u8; 65536];
        let n = listener.recv(&mut buf).unwrap();
        let datagram = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(
            datagram.starts_with("<86>quiesce-coordinator["),
            "{datagram}"
        );
        let json = &datagram[datagram.find('{').unwrap()..];
        let value: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(value["verb"], "delete_set");
        let file = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
        assert_eq!(file.trim_end(), json);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("audit.jsonl"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let bad = AuditConfig {
            file: Some(dir.path().join("no-such-dir/audit.jsonl")),
            ..AuditConfig::default()
        };
        let err = check_file(&bad).unwrap_err().to_string();
        assert!(err.contains("no-such-dir/audit.jsonl"), "{err}");
    }

    #[tokio::test]
    async fn a_catalog_from_before_the_audit_log_migrates_and_its_chain_starts_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.sqlite");
        {
            // The schema as the previous release left it: migrations 1–6.
            let conn = rusqlite::Connection::open(&path).unwrap();
            for migration in &crate::catalog::MIGRATIONS[..6] {
                conn.execute_batch(migration).unwrap();
            }
            conn.pragma_update(None, "user_version", 6).unwrap();
            conn.execute(
                "INSERT INTO sets (id, group_name, provider, state, phase, created_at_ms)
                 VALUES ('old', 'pg', 'reflink', 'consistent', 'committed', 1)",
                [],
            )
            .unwrap();
        }
        let catalog = Arc::new(Catalog::open(&path).unwrap());
        let old = catalog.get("old").unwrap().unwrap();
        assert_eq!(old.locked_until_ms, 0, "an old set is not locked");
        let log = AuditLog::start(catalog, &AuditConfig::default());
        assert!(log.verify().unwrap().intact, "an empty log is intact");
        log.record(entry(
            "operator ada",
            pb::AuditVerb::GetSet,
            pb::AuditOutcome::Ok,
        ));
        log.flush().await;
        let records = log.list(0, 0, |_| true).unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(
            (records[0].seq, records[0].prev_hash.as_str()),
            (1, GENESIS)
        );
        assert!(log.verify().unwrap().intact);
    }

    #[tokio::test]
    async fn nothing_is_written_while_a_group_is_frozen() {
        let (_catalog, log) = log();
        let hold = log.hold();
        log.record(entry(
            "operator ada",
            pb::AuditVerb::GetSet,
            pb::AuditOutcome::Ok,
        ));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            log.list(0, 0, |_| true).unwrap().is_empty(),
            "written while frozen"
        );
        drop(hold);
        log.flush().await;
        assert_eq!(log.list(0, 0, |_| true).unwrap().len(), 1);
    }

    #[test]
    fn the_json_line_names_verb_and_outcome() {
        let mut record = pb::AuditRecord {
            seq: 7,
            verb: pb::AuditVerb::DeleteSet as i32,
            outcome: pb::AuditOutcome::Denied as i32,
            args: r#"{"set_id":"s"}"#.into(),
            ..Default::default()
        };
        record.hash = hash(&record);
        let value: serde_json::Value = serde_json::from_str(&json_line(&record)).unwrap();
        assert_eq!(value["verb"], "delete_set");
        assert_eq!(value["outcome"], "denied");
        assert_eq!(value["args"]["set_id"], "s");
    }

    #[test]
    fn the_hash_covers_every_field() {
        let base = pb::AuditRecord {
            seq: 1,
            prev_hash: GENESIS.into(),
            ..Default::default()
        };
        let h = hash(&base);
        let variants = [
            pb::AuditRecord {
                seq: 2,
                ..base.clone()
            },
            pb::AuditRecord {
                at_ms: 1,
                ..base.clone()
            },
            pb::AuditRecord {
                identity: "a".into(),
                ..base.clone()
            },
            pb::AuditRecord {
                verb: 1,
                ..base.clone()
            },
            pb::AuditRecord {
                group: "g".into(),
                ..base.clone()
            },
            pb::AuditRecord {
                set_id: "s".into(),
                ..base.clone()
            },
            pb::AuditRecord {
                args: "{}".into(),
                ..base.clone()
            },
            pb::AuditRecord {
                outcome: 1,
                ..base.clone()
            },
            pb::AuditRecord {
                code: "c".into(),
                ..base.clone()
            },
            pb::AuditRecord {
                message: "m".into(),
                ..base.clone()
            },
            pb::AuditRecord {
                prev_hash: "x".into(),
                ..base.clone()
            },
            // Moving bytes between fields changes the hash too.
            pb::AuditRecord {
                identity: "ab".into(),
                group: String::new(),
                ..base.clone()
            },
        ];
        let mut seen = std::collections::HashSet::new();
        for v in &variants {
            let hv = hash(v);
            assert_ne!(hv, h, "{v:?}");
            assert!(seen.insert(hv), "{v:?}");
        }
        let a = pb::AuditRecord {
            identity: "ab".into(),
            group: "c".into(),
            ..base.clone()
        };
        let b = pb::AuditRecord {
            identity: "a".into(),
            group: "bc".into(),
            ..base
        };
        assert_ne!(hash(&a), hash(&b));
    }
}
