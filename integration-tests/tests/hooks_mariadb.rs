//! MariaDB with datadir and binlog on two volumes, under a transfer workload: every set taken
//! with the mysql hook restores to a server that starts, keeps the conserved total, agrees with
//! its transfer log, holds the recorded binlog position and passes `mariadb-check`. A
//! long-running statement holding a table makes the hook time out, retry and fail the set
//! cleanly: no backup lock left, nothing frozen. Wrong password, missing privilege and a binlog
//! volume left out of the group fail the set naming the cause.

mod hooks_support;

use quiesce_proto::coordinator::v1::SetState;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hooks_support::mariadb::Server;
use hooks_support::*;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, TxOpts};

const ACCOUNTS: i64 = 100;
const TOTAL: i64 = ACCOUNTS * 1000;

async fn workload(mut conn: Conn, seed: u64, stop: Arc<AtomicBool>, committed: Arc<AtomicU64>) {
    let mut x = seed;
    while !stop.load(Ordering::Relaxed) {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let a = (x >> 33) as i64 % ACCOUNTS + 1;
        let b = (x >> 17) as i64 % ACCOUNTS + 1;
        let amount = (x >> 50) as i64 % 50 + 1;
        let (first, second, d1, d2) = if a <= b {
            (a, b, -amount, amount)
        } else {
            (b, a, amount, -amount)
        };
        let result: Result<u64, mysql_async::Error> = async {
            let mut tx = conn.start_transaction(TxOpts::default()).await?;
            tx.query_drop(format!(
                "UPDATE accounts SET balance = balance + ({d1}) WHERE id = {first}"
            ))
            .await?;
            tx.query_drop(format!(
                "UPDATE accounts SET balance = balance + ({d2}) WHERE id = {second}"
            ))
            .await?;
            tx.query_drop(format!(
                "INSERT INTO transfers (src, dst, amount) VALUES ({a}, {b}, {amount})"
            ))
            .await?;
            let id = tx.last_insert_id().unwrap_or(0);
            tx.commit().await?;
            Ok(id)
        }
        .await;
        match result {
            Ok(id) => {
                committed.fetch_max(id, Ordering::Relaxed);
            }
            Err(mysql_async::Error::Server(_)) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(_) => return,
        }
    }
}

/// Checks a restored server: total, log agreement, binlog position, mariadb-check.
fn check(server: &Server, binlog_dir: &Path, file: &str, position: u64) -> Result<u64, String> {
    let total: i64 = server
        .sql("SELECT sum(balance) FROM bank.accounts")
        .trim()
        .parse()
        .map_err(|e| format!("{e}"))?;
    if total != TOTAL {
        return Err(format!("total {total} != {TOTAL}"));
    }
    let wrong: i64 = server
        .sql(
            "SELECT count(*) FROM bank.accounts a WHERE a.balance <> 1000
               - COALESCE((SELECT sum(amount) FROM bank.transfers WHERE src = a.id), 0)
               + COALESCE((SELECT sum(amount) FROM bank.transfers WHERE dst = a.id), 0)",
        )
        .trim()
        .parse()
        .map_err(|e| format!("{e}"))?;
    if wrong != 0 {
        return Err(format!("{wrong} balances disagree with the transfer log"));
    }
    let size = std::fs::metadata(binlog_dir.join(file))
        .map_err(|e| format!("recorded binlog {file}: {e}"))?
        .len();
    if size < position {
        return Err(format!(
            "binlog {file} has {size} bytes, recorded position {position}"
        ));
    }
    let out = Command::new("mariadb-check")
        .args([
            "--socket",
            server.sock.to_str().unwrap(),
            "--all-databases",
            "--check",
        ])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || text.to_lowercase().contains("error") || text.contains("corrupt") {
        return Err(format!("mariadb-check: {text}"));
    }
    let max_id: u64 = server
        .sql("SELECT COALESCE(max(id), 0) FROM bank.transfers")
        .trim()
        .parse()
        .map_err(|e| format!("{e}"))?;
    Ok(max_id)
}

const SETUP: &str = "
CREATE USER quiesce@localhost IDENTIFIED BY 'hook-secret';
GRANT RELOAD, BINLOG MONITOR ON *.* TO quiesce@localhost;
CREATE USER weak@localhost IDENTIFIED BY 'weak-secret';
CREATE USER app@localhost IDENTIFIED BY 'app-secret';
CREATE DATABASE bank;
USE bank;
GRANT ALL ON bank.* TO app@localhost;
CREATE TABLE bank.accounts (id INT PRIMARY KEY, balance BIGINT NOT NULL) ENGINE=InnoDB;
INSERT INTO bank.accounts SELECT seq, 1000 FROM seq_1_to_100;
CREATE TABLE bank.transfers (id BIGINT AUTO_INCREMENT PRIMARY KEY, src INT, dst INT, amount INT) ENGINE=InnoDB;
CREATE TABLE bank.slow (a INT) ENGINE=Aria;
INSERT INTO bank.slow VALUES (1), (2);
";

fn hook_config(name: &str, sock: &Path, user: &str, password_file: &Path) -> String {
    format!(
        "[hook.{name}]\ntype = \"mysql\"\nsocket = {:?}\nuser = \"{user}\"\npassword-file = {:?}\nlock-wait-timeout = \"1s\"\nlock-retries = 2\nquiesce-timeout = \"15s\"\n",
        sock.display().to_string(),
        password_file.display().to_string()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mariadb_sets_under_load_restore_consistent_and_a_long_statement_fails_cleanly() {
    if !can_run(
        "mariadb hooks",
        &[
            "mkfs.xfs",
            "mkfs.ext4",
            "fsfreeze",
            "mariadbd",
            "mariadb-install-db",
            "mariadb-check",
        ],
    ) {
        return;
    }
    let mut lab = Lab::new("maria", POOL_MB);
    let data = lab.volume("mdata", 256);
    let binlog = lab.volume("mbinlog", 128);
    let datadir = data.join("db");
    let binlog_dir = binlog.join("binlog");
    for dir in [&datadir, &binlog_dir] {
        std::fs::create_dir_all(dir).unwrap();
        run("chown", &["mysql:mysql", dir.to_str().unwrap()]);
    }
    run(
        "mariadb-install-db",
        &[
            &format!("--datadir={}", datadir.display()),
            "--user=mysql",
            "--auth-root-authentication-method=socket",
            "--skip-test-db",
        ],
    );
    let run_dir = lab.dir.join("run");
    let mut server = Server::start(
        &datadir,
        &binlog_dir.join("mysql-bin"),
        &run_dir,
        &[&data, &binlog],
    )
    .unwrap();
    server.sql(SETUP);

    let secrets = lab.dir.join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    secret(&secrets.join("good"), "hook-secret\n");
    secret(&secrets.join("bad"), "wrong\n");
    secret(&secrets.join("weak"), "weak-secret\n");
    let agent = format!(
        "{}{}{}{}",
        volumes(&[&data, &binlog]),
        hook_config("maria", &server.sock, "quiesce", &secrets.join("good")),
        hook_config("maria-badpw", &server.sock, "quiesce", &secrets.join("bad")),
        hook_config("maria-weak", &server.sock, "weak", &secrets.join("weak")),
    );
    let both = [data.as_path(), binlog.as_path()];
    let groups = [
        group("g", &both, &["maria"]),
        group("plain", &both, &[]),
        group("badpw", &both, &["maria-badpw"]),
        group("weak", &both, &["maria-weak"]),
        group("nobinlog", &[&data], &["maria"]),
    ]
    .concat();
    let stack = stack(&agent, &groups);

    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for seed in 1..=3u64 {
        let mut conn = server.connect("app", "app-secret").await;
        conn.query_drop("USE bank").await.unwrap();
        workers.push(tokio::spawn(workload(
            conn,
            seed,
            stop.clone(),
            committed.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let runs: usize = std::env::var("QUIESCE_HOOKS_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let (mut with_hook, mut without, mut hook_ms_list) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..runs {
        let before = committed.load(Ordering::Relaxed);
        let set = stack.backup("g").await;
        assert_eq!(set.state(), SetState::Consistent, "{}", set.error);
        with_hook.push(set.freeze_window_ms);
        hook_ms_list.push(hook_ms(&set));
        let file = hook_value(&set, "maria", "binlog-file").expect("binlog file recorded");
        let position: u64 = hook_value(&set, "maria", "binlog-position")
            .expect("binlog position recorded")
            .parse()
            .unwrap();
        assert!(hook_value(&set, "maria", "gtid").is_some());
        let plain = stack.backup("plain").await;
        assert_eq!(plain.state(), SetState::Consistent, "{}", plain.error);
        without.push(plain.freeze_window_ms);

        let images = stack
            .restore(&set, &lab.pool.join(format!("restore-{round}")))
            .await;
        let at = lab.dir.join(format!("restored-{round}"));
        let (rdata, rbinlog) = (at.join("mdata"), at.join("mbinlog"));
        lab.mount_image(&images[&data.display().to_string()], &rdata);
        lab.mount_image(&images[&binlog.display().to_string()], &rbinlog);
        // The binlog index names files by absolute path: point it at the restored volume.
        let index = rbinlog.join("binlog/mysql-bin.index");
        let text = std::fs::read_to_string(&index).unwrap();
        std::fs::write(
            &index,
            text.replace(
                &binlog.display().to_string(),
                &rbinlog.display().to_string(),
            ),
        )
        .unwrap();
        let mut restored = Server::start(
            &rdata.join("db"),
            &rbinlog.join("binlog/mysql-bin"),
            &lab.dir.join(format!("run-{round}")),
            &[],
        )
        .unwrap_or_else(|e| panic!("round {round}: {e}"));
        let max_id = check(&restored, &rbinlog.join("binlog"), &file, position)
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!(
            max_id >= before,
            "round {round}: transfer {before} was committed before the set but is not restored (max {max_id})"
        );
        restored.stop();
        lab.unmount(&rbinlog);
        lab.unmount(&rdata);
    }

    // A long-running statement holding a non-transactional table (write-locked) blocks
    // BLOCK_COMMIT: the hook
    // waits lock-wait-timeout, retries twice, and fails the set without leaving a lock.
    let sock = server.sock.clone();
    let slow = std::thread::spawn(move || {
        let _ = Command::new("mariadb")
            .args([
                "--socket",
                sock.to_str().unwrap(),
                "-e",
                "LOCK TABLES bank.slow WRITE; SELECT SLEEP(6); UNLOCK TABLES",
            ])
            .output();
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let set = stack.backup("g").await;
    assert_eq!(set.state(), SetState::Failed);
    assert!(
        set.error
            .contains("hook maria: quiesce failed: BACKUP STAGE BLOCK_COMMIT waited 3 times × 1s"),
        "{}",
        set.error
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(none_frozen(&both), "a volume stayed frozen");
    // Commits go through (no BLOCK_COMMIT left held)...
    let before = committed.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        committed.load(Ordering::Relaxed) > before,
        "commits are blocked"
    );
    // ...and once the long statement is over, a new backup stage starts at once: the hook's
    // own stage was ended (only one can exist per server).
    slow.join().unwrap();
    let mut probe = server.connect("quiesce", "hook-secret").await;
    probe
        .query_drop("SET SESSION lock_wait_timeout = 2")
        .await
        .unwrap();
    probe.query_drop("BACKUP STAGE START").await.unwrap();
    probe.query_drop("BACKUP STAGE BLOCK_COMMIT").await.unwrap();
    probe.query_drop("BACKUP STAGE END").await.unwrap();

    let failures = [
        (
            "badpw",
            "Access denied for user 'quiesce'@'localhost' (using password: YES) (error 1045) (check user and password-file",
        ),
        (
            "weak",
            "FLUSH LOCAL TABLES: Access denied; you need (at least one of) the RELOAD privilege(s)",
        ),
        (
            "nobinlog",
            &format!(
                "hook maria: log_bin_basename dir {} lies on volume {}, which is not in group nobinlog for db1",
                binlog_dir.display(),
                binlog.display()
            ),
        ),
    ];
    for (group_name, needle) in failures {
        let set = stack.backup(group_name).await;
        assert_eq!(set.state(), SetState::Failed, "{group_name}");
        assert!(
            set.error.contains(needle),
            "{group_name}: {needle:?} not in {}",
            set.error
        );
        assert!(none_frozen(&both), "{group_name}: a volume stayed frozen");
    }

    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    drop(probe);
    server.stop();
    println!(
        "BENCH engine=mariadb runs={} median_hook_ms={} median_window_ms={} median_window_without_hooks_ms={}",
        with_hook.len(),
        median(&mut hook_ms_list),
        median(&mut with_hook),
        median(&mut without)
    );
}
