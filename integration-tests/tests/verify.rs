//! Restore drills (`verify`): a set (PostgreSQL, MariaDB, SQLite) restores into scratch space on its agent's host, the
//! databases its hooks name start on the copies (in a private mount namespace) and pass their
//! engine's checks; a copy corrupted after the snapshot fails, naming the check; the originals
//! are never touched, and nothing is left mounted, running or on disk after any drill.
//! Root, loop devices, PostgreSQL 15, MariaDB; the agent and coordinator in process (real freezer,
//! hooks, reflink provider, workflow and catalog).

mod hooks_support;

use quiesce_proto::coordinator::v1::SetState;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hooks_support::mariadb::Server;
use hooks_support::*;
use quiesce_proto::coordinator::v1 as pb;
use tokio_postgres::NoTls;

const BIN: &str = "/usr/lib/postgresql/15/bin";

fn as_postgres(tool: &str, args: &[&str]) -> std::process::Output {
    Command::new("runuser")
        .args(["-u", "postgres", "--", &format!("{BIN}/{tool}")])
        .args(args)
        .current_dir("/")
        .output()
        .unwrap()
}

fn chown_postgres(path: &Path) {
    std::fs::create_dir_all(path).unwrap();
    run("chown", &["postgres:postgres", path.to_str().unwrap()]);
}

/// The live server (unix socket only), stopped on drop after its volumes are thawed.
struct LivePg {
    data: PathBuf,
    sock: PathBuf,
    volumes: Vec<PathBuf>,
}

impl LivePg {
    async fn connect(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::Config::new()
            .host_path(&self.sock)
            .port(5432)
            .user("postgres")
            .dbname("postgres")
            .connect(NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
    }
}

impl Drop for LivePg {
    fn drop(&mut self) {
        for v in &self.volumes {
            let _ = Command::new("fsfreeze").arg("-u").arg(v).output();
        }
        let _ = as_postgres(
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().unwrap(),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
    }
}

/// Nothing of a drill is left: no loop device on a copy, no process it started, no copy.
fn assert_drill_left_nothing(lab: &Lab, set_id: &str) {
    let ours = lab.pool.join(".quiesce-verify").display().to_string();
    let loops = run("losetup", &["-a"]);
    assert!(
        !loops.contains(&ours),
        "a loop device still holds a drill's copy:\n{loops}"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&ours), "{mounts}");
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(
            !cmdline.contains("cluster_name=quiesce-verify")
                && !cmdline.contains("pg-pg")
                && !cmdline.contains("/tmp/mysql-"),
            "a drill's process is still running: {cmdline}"
        );
    }
    let scratch = lab.pool.join(".quiesce-verify");
    let left: Vec<String> = std::fs::read_dir(&scratch)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(set_id))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "scratch left behind: {left:?}");
}

fn check<'a>(v: &'a pb::Verification, name: &str) -> &'a pb::VerifyCheck {
    v.checks
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no check {name} in {v:#?}"))
}

/// The set's own snapshot image of `mount` (a reflink clone in the snapshot directory).
fn snapshot_image(set: &pb::SnapshotSet, mount: &Path) -> PathBuf {
    let volume = set
        .volumes
        .iter()
        .find(|v| v.mount_point == mount.display().to_string())
        .unwrap();
    PathBuf::from(&volume.snapshot_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_set_under_load_verifies_and_a_corrupted_copy_fails_naming_the_check() {
    let _serial = quiesce_integration_tests::serial();
    can_run(
        "verify postgres",
        &[
            "mkfs.xfs",
            "mkfs.ext4",
            "fsfreeze",
            "runuser",
            "losetup",
            &format!("{BIN}/initdb"),
            &format!("{BIN}/pg_amcheck"),
        ],
    );
    let mut lab = Lab::new("verify-pg", POOL_MB);
    let data = lab.volume("data", 256);
    let wal = lab.volume("wal", 256);
    let ts = lab.volume("ts", 64);
    let pgdata = data.join("pg");
    for dir in [&pgdata, &wal.join("pg_wal"), &ts.join("pg")] {
        chown_postgres(dir);
    }
    run("chmod", &["700", pgdata.to_str().unwrap()]);
    let out = as_postgres(
        "initdb",
        &[
            "-D",
            pgdata.to_str().unwrap(),
            "--waldir",
            wal.join("pg_wal").to_str().unwrap(),
            "--auth-local=trust",
            "-U",
            "postgres",
            "--no-instructions",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Archiving on, as in production: the drill must turn it off on the copy.
    let archive = lab.dir.join("archive");
    chown_postgres(&archive);
    std::fs::OpenOptions::new()
        .append(true)
        .open(pgdata.join("postgresql.conf"))
        .and_then(|mut f| {
            std::io::Write::write_all(
                &mut f,
                format!(
                    "shared_buffers = 16MB\narchive_mode = on\narchive_command = 'cp %p {}/%f'\n",
                    archive.display()
                )
                .as_bytes(),
            )
        })
        .unwrap();
    let sock = lab.dir.join("sock");
    chown_postgres(&sock);
    let log = lab.dir.join("pg.log");
    std::fs::write(&log, "").unwrap();
    run("chown", &["postgres:postgres", log.to_str().unwrap()]);
    let opts = format!(
        "-c listen_addresses='' -c unix_socket_directories='{}' -c port=5432",
        sock.display()
    );
    let out = as_postgres(
        "pg_ctl",
        &[
            "-D",
            pgdata.to_str().unwrap(),
            "-l",
            log.to_str().unwrap(),
            "-o",
            &opts,
            "-w",
            "-t",
            "60",
            "start",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let live = LivePg {
        data: pgdata.clone(),
        sock: sock.clone(),
        volumes: vec![data.clone(), wal.clone(), ts.clone()],
    };
    let admin = live.connect().await;
    let setup = format!(
        "CREATE TABLESPACE ts1 LOCATION '{}';
             CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL) TABLESPACE ts1;
             INSERT INTO accounts SELECT g, 1000 FROM generate_series(1, 100) g;
             CREATE TABLE transfers (id bigserial PRIMARY KEY, amount int NOT NULL);
             CREATE TABLE static (id int PRIMARY KEY, payload text NOT NULL);
             INSERT INTO static SELECT g, repeat(md5(g::text), 8) FROM generate_series(1, 5000) g;
             VACUUM FREEZE static;
             CHECKPOINT;",
        ts.join("pg").display()
    );
    // One statement at a time (CREATE TABLESPACE and VACUUM refuse a transaction block).
    for statement in setup.split(';').filter(|s| !s.trim().is_empty()) {
        admin.batch_execute(statement).await.unwrap();
    }
    let static_file: String = admin
        .query_one("SELECT pg_relation_filepath('static')", &[])
        .await
        .unwrap()
        .get(0);
    let static_sum = "SELECT md5(string_agg(payload, ',' ORDER BY id)) FROM static";
    let static_before: String = admin.query_one(static_sum, &[]).await.unwrap().get(0);

    let agent = format!(
        "{}[hook.pg]\ntype = \"postgres\"\nhost = {:?}\nuser = \"postgres\"\nquiesce-timeout = \"5s\"\nverify-probe = \"SELECT sum(balance) FROM accounts\"\nverify-expect = \"100000\"\n[hook.pgb]\ntype = \"postgres\"\nmode = \"backup\"\nhost = {:?}\nuser = \"postgres\"\nquiesce-timeout = \"5s\"\nverify-probe = \"SELECT sum(balance) FROM accounts\"\nverify-expect = \"100000\"\n",
        volumes(&[&data, &wal, &ts]),
        sock.display().to_string(),
        sock.display().to_string()
    );
    // Group g takes crash-mode sets, group gb backup-mode sets (pg_backup_start/stop) of the
    // same server and volumes.
    let stack = stack(
        &agent,
        &format!(
            "{}{}",
            group("g", &[&data, &wal, &ts], &["pg"]),
            group("gb", &[&data, &wal, &ts], &["pgb"])
        ),
    );

    // A transfer load through the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let commits = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for seed in 1..=2u64 {
        let client = live.connect().await;
        let (stop, commits) = (stop.clone(), commits.clone());
        workers.push(tokio::spawn(async move {
            let mut x = seed;
            while !stop.load(Ordering::Relaxed) {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let a = (x >> 33) % 100 + 1;
                let b = (x >> 17) % 100 + 1;
                let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
                let sql = format!(
                    "BEGIN;
                     UPDATE accounts SET balance = balance - 7 WHERE id = {lo};
                     UPDATE accounts SET balance = balance + 7 WHERE id = {hi};
                     INSERT INTO transfers (amount) VALUES (7);
                     COMMIT;"
                );
                if client.batch_execute(&sql).await.is_ok() {
                    commits.fetch_add(1, Ordering::Relaxed);
                } else if client.is_closed() {
                    return;
                } else {
                    let _ = client.batch_execute("ROLLBACK").await;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let set = stack.backup("g").await;
    assert_eq!(set.state(), SetState::Consistent, "{}", set.error);
    let started = Instant::now();
    let verification = stack
        .coordinator
        .verify_set(&pb::VerifySetRequest {
            set_id: set.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(
        verification.outcome(),
        pb::VerifyOutcome::Passed,
        "{verification:#?}"
    );
    let pg = check(&verification, "pg");
    assert_eq!(pg.kind, "postgres");
    assert_eq!(
        pg.check, "crash recovery, pg_amcheck --heapallindexed, probe",
        "{pg:#?}"
    );
    assert!(pg.output.contains("probe: 100000"), "{}", pg.output);
    for mount in [&data, &wal, &ts] {
        let fs = check(&verification, &mount.display().to_string());
        assert_eq!(fs.outcome(), pb::VerifyOutcome::Passed, "{fs:#?}");
    }
    assert!(verification.error.is_empty(), "{}", verification.error);
    assert_drill_left_nothing(&lab, &set.id);
    let recorded = stack.coordinator.catalog().get(&set.id).unwrap().unwrap();
    assert_eq!(recorded.verifications.len(), 1);
    assert_eq!(recorded.verifications[0], verification);
    // The copy's promotion archived nothing into production's archive.
    let archived_before: Vec<_> = std::fs::read_dir(&archive).unwrap().flatten().collect();

    // Negative control: blocks of a heap page of `static` overwritten in the set's own clone
    // of the data volume, after the snapshot.
    let image = snapshot_image(&set, &data);
    let bad = lab.dir.join("corrupt");
    lab.mount_image(&image, &bad);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(bad.join("pg").join(&static_file))
        .unwrap();
    for block in [1u64, 2, 3] {
        file.write_all_at(&[0xA5u8; 8192], block * 8192).unwrap();
    }
    file.sync_all().unwrap();
    drop(file);
    lab.unmount(&bad);
    let verification = stack
        .coordinator
        .verify_set(&pb::VerifySetRequest {
            set_id: set.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        verification.outcome(),
        pb::VerifyOutcome::Failed,
        "{verification:#?}"
    );
    let pg = check(&verification, "pg");
    assert_eq!(pg.outcome(), pb::VerifyOutcome::Failed);
    assert_eq!(pg.check, "pg_amcheck --heapallindexed", "{pg:#?}");
    assert!(!pg.output.is_empty(), "{pg:#?}");
    println!("negative control, pg_amcheck said:\n{}", pg.output);
    assert_drill_left_nothing(&lab, &set.id);
    let recorded = stack.coordinator.catalog().get(&set.id).unwrap().unwrap();
    assert_eq!(recorded.verifications.len(), 2);
    assert_eq!(
        recorded.verifications[1].outcome(),
        pb::VerifyOutcome::Failed
    );

    // A backup-mode set (pg_backup_start/stop around the cut) verifies too, by crash
    // recovery of its atomic data + WAL cut; its drill reads nothing of production's archive.
    let backup_set = stack.backup("gb").await;
    assert_eq!(
        backup_set.state(),
        SetState::Consistent,
        "{}",
        backup_set.error
    );
    let verification = stack
        .coordinator
        .verify_set(&pb::VerifySetRequest {
            set_id: backup_set.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        verification.outcome(),
        pb::VerifyOutcome::Passed,
        "{verification:#?}"
    );
    let pgb = check(&verification, "pgb");
    assert_eq!(
        pgb.check, "crash recovery, pg_amcheck --heapallindexed, probe",
        "{pgb:#?}"
    );
    assert!(pgb.output.contains("probe: 100000"), "{}", pgb.output);
    assert_drill_left_nothing(&lab, &backup_set.id);

    // The originals: the live server still commits, `static` is as it was, nothing archived
    // by a copy, nothing frozen.
    let before = commits.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(10);
    while commits.load(Ordering::Relaxed) < before + 10 {
        assert!(
            Instant::now() < deadline,
            "the live database stopped committing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let static_after: String = admin.query_one(static_sum, &[]).await.unwrap().get(0);
    assert_eq!(static_before, static_after, "the live table changed");
    let total: i64 = admin
        .query_one("SELECT sum(balance)::bigint FROM accounts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, 100_000);
    let history: Vec<_> = std::fs::read_dir(&archive)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".history"))
        .collect();
    assert!(history.is_empty(), "a copy archived {history:?}");
    assert!(archived_before.iter().all(|e| e.path().exists()));
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        let _ = worker.await;
    }
    assert!(none_frozen(&[&data, &wal, &ts]));
    println!(
        "BENCH verify engine=postgres volumes=3 drill_ms={} agent_ms={}",
        took.as_millis(),
        stack
            .coordinator
            .catalog()
            .get(&set.id)
            .unwrap()
            .unwrap()
            .verifications[0]
            .duration_ms
    );
    drop(stack);
    drop(live);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mariadb_set_under_load_verifies_and_a_corrupted_ibd_page_fails_mariadb_check() {
    use mysql_async::prelude::Queryable;
    let _serial = quiesce_integration_tests::serial();
    can_run(
        "verify mariadb",
        &[
            "mkfs.xfs",
            "mkfs.ext4",
            "fsfreeze",
            "losetup",
            "mariadbd",
            "mariadb-install-db",
            "mariadb-check",
        ],
    );
    let mut lab = Lab::new("verify-maria", POOL_MB);
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
    let binlog_base = binlog_dir.join("mysql-bin");
    let mut server = Server::start(&datadir, &binlog_base, &run_dir, &[&data, &binlog]).unwrap();
    server.sql(
        "CREATE USER quiesce@localhost IDENTIFIED BY 'hook-secret';
         GRANT RELOAD, BINLOG MONITOR ON *.* TO quiesce@localhost;
         CREATE USER app@localhost IDENTIFIED BY 'app-secret';
         CREATE DATABASE bank;
         USE bank;
         GRANT ALL ON bank.* TO app@localhost;
         CREATE TABLE bank.accounts (id INT PRIMARY KEY, balance BIGINT NOT NULL) ENGINE=InnoDB;
         INSERT INTO bank.accounts SELECT seq, 1000 FROM seq_1_to_100;
         CREATE TABLE bank.transfers (id BIGINT AUTO_INCREMENT PRIMARY KEY, amount INT) ENGINE=InnoDB;
         CREATE TABLE bank.static (id INT PRIMARY KEY, payload VARCHAR(600) NOT NULL) ENGINE=InnoDB;
         INSERT INTO bank.static SELECT seq, repeat(md5(seq), 16) FROM seq_1_to_5000;",
    );
    // A clean restart: `static` is written out and checkpointed, so crash recovery of a
    // later cut never rewrites its pages (the negative control corrupts them).
    server.stop();
    let mut server = Server::start(&datadir, &binlog_base, &run_dir, &[&data, &binlog]).unwrap();
    let static_sum = "SELECT md5(group_concat(payload ORDER BY id)) FROM bank.static";
    let static_before = server.sql(static_sum);

    let password = lab.dir.join("secrets/maria");
    std::fs::create_dir_all(password.parent().unwrap()).unwrap();
    secret(&password, "hook-secret\n");
    let agent = format!(
        "{}[hook.maria]\ntype = \"mysql\"\nsocket = {:?}\nuser = \"quiesce\"\npassword-file = {:?}\nquiesce-timeout = \"15s\"\nverify-probe = \"SELECT sum(balance) FROM bank.accounts\"\nverify-expect = \"100000\"\n",
        volumes(&[&data, &binlog]),
        server.sock.display().to_string(),
        password.display().to_string()
    );
    let stack = stack(&agent, &group("g", &[&data, &binlog], &["maria"]));

    let stop = Arc::new(AtomicBool::new(false));
    let commits = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for seed in 1..=2u64 {
        let mut conn = server.connect("app", "app-secret").await;
        let (stop, commits) = (stop.clone(), commits.clone());
        workers.push(tokio::spawn(async move {
            let mut x = seed;
            while !stop.load(Ordering::Relaxed) {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let a = (x >> 33) % 100 + 1;
                let b = (x >> 17) % 100 + 1;
                let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
                let statements = [
                    "START TRANSACTION".to_owned(),
                    format!("UPDATE bank.accounts SET balance = balance - 7 WHERE id = {lo}"),
                    format!("UPDATE bank.accounts SET balance = balance + 7 WHERE id = {hi}"),
                    "INSERT INTO bank.transfers (amount) VALUES (7)".to_owned(),
                    "COMMIT".to_owned(),
                ];
                let mut ok = true;
                for statement in &statements {
                    if conn.query_drop(statement.as_str()).await.is_err() {
                        ok = false;
                        break;
                    }
                }
                if ok {
                    commits.fetch_add(1, Ordering::Relaxed);
                } else if conn.query_drop("ROLLBACK").await.is_err() {
                    return;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let set = stack.backup("g").await;
    assert_eq!(set.state(), pb::SetState::Consistent, "{}", set.error);
    let started = Instant::now();
    let verification = stack
        .coordinator
        .verify_set(&pb::VerifySetRequest {
            set_id: set.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(
        verification.outcome(),
        pb::VerifyOutcome::Passed,
        "{verification:#?}"
    );
    let maria = check(&verification, "maria");
    assert_eq!(maria.kind, "mysql");
    assert_eq!(
        maria.check, "crash recovery, mariadb-check, probe",
        "{maria:#?}"
    );
    assert!(maria.output.contains("probe: 100000"), "{}", maria.output);
    assert!(maria.output.contains("tables OK"), "{}", maria.output);
    assert_drill_left_nothing(&lab, &set.id);
    let recorded = stack.coordinator.catalog().get(&set.id).unwrap().unwrap();
    assert_eq!(recorded.verifications, vec![verification.clone()]);

    // Negative control: pages of `static` overwritten in the set's own clone of the datadir
    // volume, after the snapshot.
    let image = snapshot_image(&set, &data);
    let bad = lab.dir.join("corrupt");
    lab.mount_image(&image, &bad);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(bad.join("db/bank/static.ibd"))
        .unwrap();
    for page in [3u64, 4, 5, 6, 20, 40] {
        file.write_all_at(&[0xA5u8; 4000], page * 16384 + 200)
            .unwrap();
    }
    file.sync_all().unwrap();
    drop(file);
    lab.unmount(&bad);
    let verification = stack
        .coordinator
        .verify_set(&pb::VerifySetRequest {
            set_id: set.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        verification.outcome(),
        pb::VerifyOutcome::Failed,
        "{verification:#?}"
    );
    let maria = check(&verification, "maria");
    assert_eq!(maria.outcome(), pb::VerifyOutcome::Failed);
    assert_eq!(maria.check, "mariadb-check", "{maria:#?}");
    assert!(maria.output.contains("bank.static"), "{}", maria.output);
    println!("negative control, mariadb-check said:\n{}", maria.output);
    assert_drill_left_nothing(&lab, &set.id);

    // The original: still commits, `static` as it was, the total conserved, nothing frozen.
    let before = commits.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(10);
    while commits.load(Ordering::Relaxed) < before + 10 {
        assert!(
            Instant::now() < deadline,
            "the live database stopped committing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        let _ = worker.await;
    }
    assert_eq!(
        server.sql(static_sum),
        static_before,
        "the live table changed"
    );
    assert_eq!(
        server.sql("SELECT sum(balance) FROM bank.accounts").trim(),
        "100000"
    );
    assert!(none_frozen(&[&data, &binlog]));
    println!(
        "BENCH verify engine=mariadb volumes=2 drill_ms={}",
        took.as_millis()
    );
    drop(stack);
    server.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sqlite_set_under_load_verifies_and_a_copy_with_a_broken_header_fails() {
    let _serial = quiesce_integration_tests::serial();
    can_run(
        "verify sqlite",
        &["mkfs.xfs", "mkfs.ext4", "fsfreeze", "losetup"],
    );
    let mut lab = Lab::new("verify-sqlite", POOL_MB);
    let data = lab.volume("sdata", 64);
    let db = data.join("app.db");
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        let _: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .unwrap();
        conn.execute_batch(
            "CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 50)
             INSERT INTO accounts SELECT i, 1000 FROM n;",
        )
        .unwrap();
    }
    let agent = format!(
        "{}[hook.app]\ntype = \"sqlite\"\npath = {:?}\nquiesce-timeout = \"5s\"\nverify-probe = \"SELECT sum(balance) FROM accounts\"\nverify-expect = \"50000\"\n",
        volumes(&[&data]),
        db.display().to_string()
    );
    let stack = stack(&agent, &group("g", &[&data], &["app"]));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (db, stop) = (db.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut conn = rusqlite::Connection::open(&db).unwrap();
            conn.busy_timeout(Duration::from_secs(60)).unwrap();
            let mut i = 0i64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let (a, b) = (i % 50 + 1, (i * 7) % 50 + 1);
                let tx = conn
                    .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                    .unwrap();
                tx.execute(
                    "UPDATE accounts SET balance = balance - 3 WHERE id = ?1",
                    [a],
                )
                .unwrap();
                tx.execute(
                    "UPDATE accounts SET balance = balance + 3 WHERE id = ?1",
                    [b],
                )
                .unwrap();
                tx.commit().unwrap();
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let set = stack.backup("g").await;
    assert_eq!(set.state(), SetState::Consistent, "{}", set.error);
    let verification = stack
        .coordinator
        .verify_set(&pb::VerifySetRequest {
            set_id: set.id.clone(),
            host: "db1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        verification.outcome(),
        pb::VerifyOutcome::Passed,
        "{verification:#?}"
    );
    let app = check(&verification, "app");
    assert_eq!(app.check, "PRAGMA integrity_check, probe", "{app:#?}");
    assert!(app.output.contains("probe: 50000"), "{}", app.output);
    assert_drill_left_nothing(&lab, &set.id);

    // The clone's database header overwritten after the snapshot: not a database any more.
    let image = snapshot_image(&set, &data);
    let bad = lab.dir.join("corrupt");
    lab.mount_image(&image, &bad);
    std::fs::OpenOptions::new()
        .write(true)
        .open(bad.join("app.db"))
        .unwrap()
        .write_all_at(&[0x5Au8; 100], 0)
        .unwrap();
    lab.unmount(&bad);
    let verification = stack
        .coordinator
        .verify_set(&pb::VerifySetRequest {
            set_id: set.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(verification.outcome(), pb::VerifyOutcome::Failed);
    let app = check(&verification, "app");
    assert_eq!(app.check, "PRAGMA integrity_check", "{app:#?}");
    assert!(
        app.output.contains("not a database") || app.output.contains("malformed"),
        "{}",
        app.output
    );
    assert_drill_left_nothing(&lab, &set.id);

    // Scratch space on the group's own volume is refused before anything is written, and the
    // refusal is recorded as a drill that could not run.
    let err = stack
        .coordinator
        .verify_set(&pb::VerifySetRequest {
            set_id: set.id.clone(),
            scratch_dir: data.join("scratch").display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("is on the filesystem of volume"),
        "{err}"
    );
    assert!(!data.join("scratch").exists());
    let recorded = stack.coordinator.catalog().get(&set.id).unwrap().unwrap();
    let outcomes: Vec<_> = recorded.verifications.iter().map(|v| v.outcome()).collect();
    assert_eq!(
        outcomes,
        vec![
            pb::VerifyOutcome::Passed,
            pb::VerifyOutcome::Failed,
            pb::VerifyOutcome::Error
        ]
    );

    // Counted per result, and the group's newest passed drill exported.
    let metrics = stack.coordinator.render_metrics();
    for (result, count) in [("ok", 1), ("failed", 1), ("error", 1)] {
        let line =
            format!("quiesce_verifications_total{{group=\"g\",result=\"{result}\"}} {count}");
        assert!(metrics.contains(&line), "{line} not in\n{metrics}");
    }
    let passed_at = recorded.verifications[0].verified_at_ms as f64 / 1000.0;
    let gauge = metrics
        .lines()
        .find_map(|l| l.strip_prefix("quiesce_group_last_verified_timestamp_seconds{group=\"g\"} "))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no last-verified gauge in\n{metrics}"));
    assert!((gauge - passed_at).abs() < 0.002, "{gauge} != {passed_at}");

    // The live database is untouched and still commits.
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let conn = rusqlite::Connection::open(&db).unwrap();
    let ok: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    let total: i64 = conn
        .query_row("SELECT sum(balance) FROM accounts", [], |r| r.get(0))
        .unwrap();
    assert_eq!(total, 50_000);
    assert!(none_frozen(&[&data]));
}

/// The operator's view over mTLS with the real binaries: `quiescectl verify` (text and JSON,
/// exit codes), the drill shown by `sets show` and `sets list`, a refused scratch directory.
#[test]
fn quiescectl_verify_records_the_drill_and_sets_show_and_list_display_it() {
    use quiesce_integration_tests::{Cluster, ClusterOptions, Need, describe, require, serial};
    let _serial = serial();
    require(&[
        Need::Root,
        Need::LoopDevices,
        Need::Tool("mkfs.xfs"),
        Need::Tool("losetup"),
    ]);
    let cluster = Cluster::start("verify-cli", &ClusterOptions::default());
    let (out, set) = cluster.ctl().json(&["backup", "g"]);
    assert!(out.status.success(), "{}", describe(&out));
    let id = set["id"].as_str().unwrap().to_owned();

    let out = cluster.ctl().run(&["verify", &id]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", describe(&out));
    assert!(text.contains("outcome        passed"), "{text}");
    for mount in ["a", "b"] {
        assert!(
            text.contains(&cluster.mount(mount).display().to_string()),
            "{text}"
        );
    }
    let (out, reply) = cluster.ctl().json(&["verify", &id, "--host", "db1"]);
    assert!(out.status.success(), "{}", describe(&out));
    let v = &reply["verification"];
    assert_eq!(v["outcome"], pb::VerifyOutcome::Passed as i32, "{reply:#}");
    assert_eq!(v["agent"], "db1");
    assert_eq!(v["checks"].as_array().unwrap().len(), 2, "{reply:#}");
    assert!(
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["kind"] == "filesystem" && c["check"] == "mount read-write (ext4)")
    );

    // Scratch on a group volume: exit 1, the agent's refusal once, recorded as an error.
    let target = cluster.volume("a").path("scratch");
    let out = cluster
        .ctl()
        .run(&["verify", &id, "--scratch-dir", target.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_eq!(
        stderr.matches("is on the filesystem of volume").count(),
        1,
        "{stderr}"
    );
    assert!(!target.exists());
    // Scratch on a filesystem someone else froze: refused within the probe, nothing made.
    let frozen = quiesce_integration_tests::LoopFs::create(
        &cluster.scratch.join("frozen.img"),
        64,
        quiesce_integration_tests::FsKind::Ext4,
        &cluster.scratch.join("frozen"),
    );
    frozen.freeze_externally();
    let started = Instant::now();
    let out = cluster.ctl().run(&[
        "verify",
        &id,
        "--scratch-dir",
        frozen.path("drills").to_str().unwrap(),
    ]);
    let took = started.elapsed();
    assert!(
        frozen.thaw_externally(),
        "the scratch filesystem stayed frozen"
    );
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is on a frozen filesystem"),
        "{}",
        describe(&out)
    );
    assert!(took < Duration::from_secs(20), "refusal took {took:?}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(!frozen.path("drills").exists());
    drop(frozen);
    let out = cluster.ctl().run(&["verify", &id, "--host", "nosuch"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the set has no snapshot there"),
        "{}",
        describe(&out)
    );

    let (out, shown) = cluster.ctl().json(&["sets", "show", &id]);
    assert!(out.status.success(), "{}", describe(&out));
    let outcomes: Vec<i64> = shown["verifications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["outcome"].as_i64().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        vec![
            pb::VerifyOutcome::Passed as i64,
            pb::VerifyOutcome::Passed as i64,
            pb::VerifyOutcome::Error as i64,
            pb::VerifyOutcome::Error as i64
        ]
    );
    let out = cluster.ctl().run(&["sets", "show", &id]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("verified       could not run"), "{text}");
    assert!(text.contains("4 drills"), "{text}");
    let out = cluster.ctl().run(&["sets", "list"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("VERIFIED"), "{text}");
    assert!(text.contains("could not run"), "{text}");
    // Nothing of any drill left on the pool, nothing frozen.
    let scratch = cluster.pool.root().join(".quiesce-verify");
    let left: Vec<_> = std::fs::read_dir(&scratch)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    assert!(!run("losetup", &["-a"]).contains(".quiesce-verify"));
    cluster.assert_nothing_frozen("after the drills");
}
