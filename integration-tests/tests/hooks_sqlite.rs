//! SQLite in WAL mode under a transfer workload: every set taken with the sqlite hook restores
//! to a database that passes `PRAGMA integrity_check` and keeps the conserved total; a database
//! file outside the group is refused at plan time.

mod hooks_support;

use quiesce_proto::coordinator::v1::SetState;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use hooks_support::*;
use rusqlite::Connection;

const ACCOUNTS: i64 = 50;
const TOTAL: i64 = ACCOUNTS * 1000;

fn create(path: &Path) {
    let conn = Connection::open(path).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    conn.execute_batch(
        "CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL);
         CREATE TABLE transfers (id INTEGER PRIMARY KEY, src INTEGER, dst INTEGER, amount INTEGER);",
    )
    .unwrap();
    for id in 1..=ACCOUNTS {
        conn.execute("INSERT INTO accounts VALUES (?1, 1000)", [id])
            .unwrap();
    }
}

/// Transfers between random accounts until `stop`; counts commits.
fn workload(path: &Path, seed: u64, stop: Arc<AtomicBool>, commits: Arc<AtomicU64>) {
    let mut conn = Connection::open(path).unwrap();
    conn.busy_timeout(Duration::from_secs(60)).unwrap();
    let mut x = seed;
    while !stop.load(Ordering::Relaxed) {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let src = (x >> 33) as i64 % ACCOUNTS + 1;
        let dst = (x >> 17) as i64 % ACCOUNTS + 1;
        let amount = (x >> 50) as i64 % 50 + 1;
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .unwrap();
        tx.execute(
            "UPDATE accounts SET balance = balance - ?2 WHERE id = ?1",
            [src, amount],
        )
        .unwrap();
        tx.execute(
            "UPDATE accounts SET balance = balance + ?2 WHERE id = ?1",
            [dst, amount],
        )
        .unwrap();
        tx.execute(
            "INSERT INTO transfers (src, dst, amount) VALUES (?1, ?2, ?3)",
            [src, dst, amount],
        )
        .unwrap();
        tx.commit().unwrap();
        commits.fetch_add(1, Ordering::Relaxed);
        // An application's writers pause between transactions; back to back, two writers in
        // one process can keep any third (the hook) from the lock indefinitely.
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The restored database: integrity, the conserved total, and balances that match the log.
fn check(path: &Path) -> Result<i64, String> {
    let conn = Connection::open(path).map_err(|e| e.to_string())?;
    let integrity: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .map_err(|e| e.to_string())?;
    if integrity != "ok" {
        return Err(format!("integrity_check: {integrity}"));
    }
    let total: i64 = conn
        .query_row("SELECT sum(balance) FROM accounts", [], |r| r.get(0))
        .map_err(|e| e.to_string())?;
    if total != TOTAL {
        return Err(format!("total {total} != {TOTAL}"));
    }
    let wrong: i64 = conn
        .query_row(
            "SELECT count(*) FROM accounts a WHERE a.balance <> 1000
               - COALESCE((SELECT sum(amount) FROM transfers WHERE src = a.id), 0)
               + COALESCE((SELECT sum(amount) FROM transfers WHERE dst = a.id), 0)",
            [],
            |r| r.get(0),
        )
        .map_err(|e| e.to_string())?;
    if wrong != 0 {
        return Err(format!("{wrong} balances disagree with the transfer log"));
    }
    conn.query_row("SELECT count(*) FROM transfers", [], |r| r.get(0))
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_sets_under_load_restore_consistent_and_outside_paths_are_refused() {
    if !can_run("sqlite hooks", &["mkfs.xfs", "mkfs.ext4", "fsfreeze"]) {
        return;
    }
    let mut lab = Lab::new("sqlite", POOL_MB);
    let data = lab.volume("sdata", 64);
    let other = lab.volume("sother", 32);
    let db = data.join("app.db");
    create(&db);
    let outside = other.join("other.db");
    create(&outside);

    let agent = format!(
        "{}[hook.app]\ntype = \"sqlite\"\npath = {:?}\nquiesce-timeout = \"5s\"\n[hook.elsewhere]\ntype = \"sqlite\"\npath = {:?}\n",
        volumes(&[&data, &other]),
        db.display().to_string(),
        outside.display().to_string()
    );
    let groups = format!(
        "{}{}{}",
        group("g", &[&data], &["app"]),
        group("plain", &[&data], &[]),
        // The "elsewhere" database lives on `other`, which this group leaves out.
        group("incomplete", &[&data], &["app", "elsewhere"]),
    );
    let stack = stack(&agent, &groups);

    let stop = Arc::new(AtomicBool::new(false));
    let commits = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..2)
        .map(|i| {
            let (db, stop, commits) = (db.clone(), stop.clone(), commits.clone());
            std::thread::spawn(move || workload(&db, i + 1, stop, commits))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut with_hook = Vec::new();
    let mut without = Vec::new();
    let mut hook_ms = Vec::new();
    let runs: usize = std::env::var("QUIESCE_HOOKS_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    for round in 0..runs {
        let before = commits.load(Ordering::Relaxed);
        let set = stack.backup("g").await;
        assert_eq!(set.state(), SetState::Consistent, "{}", set.error);
        with_hook.push(set.freeze_window_ms);
        hook_ms.push(hook_ms_of(&set));
        assert!(hook_value(&set, "app", "data-version").is_some());
        assert_eq!(
            hook_value(&set, "app", "journal-mode").as_deref(),
            Some("wal")
        );
        let plain = stack.backup("plain").await;
        assert_eq!(plain.state(), SetState::Consistent, "{}", plain.error);
        without.push(plain.freeze_window_ms);

        let target = lab.pool.join(format!("restore-{round}"));
        let images = stack.restore(&set, &target).await;
        let mount = lab.dir.join(format!("restored-{round}"));
        lab.mount_image(&images[&data.display().to_string()], &mount);
        let rows = check(&mount.join("app.db")).unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!(rows > 0, "round {round}: the restored log is empty");
        assert!(
            rows as u64 >= before,
            "round {round}: {rows} transfers restored, {before} were committed before the set"
        );
        lab.unmount(&mount);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let refused = stack.backup("incomplete").await;
    assert_eq!(refused.state(), SetState::Failed);
    for what in ["database", "-wal", "-shm"] {
        let needle = format!(
            "db1: hook elsewhere: {what} {}",
            if what == "database" {
                outside.display().to_string()
            } else {
                format!("{}{what}", outside.display())
            }
        );
        assert!(
            refused.error.contains(&needle),
            "{needle:?} not in {}",
            refused.error
        );
    }
    assert!(
        refused.error.contains(&format!(
            "lies on volume {}, which is not in group incomplete for db1",
            other.display()
        )),
        "{}",
        refused.error
    );

    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.join().unwrap();
    }
    assert!(none_frozen(&[&data, &other]));
    println!(
        "BENCH engine=sqlite runs={} median_hook_ms={} median_window_ms={} median_window_without_hooks_ms={}",
        with_hook.len(),
        median(&mut hook_ms),
        median(&mut with_hook),
        median(&mut without)
    );
}

fn hook_ms_of(set: &quiesce_proto::coordinator::v1::SnapshotSet) -> u64 {
    hook_ms(set)
}
