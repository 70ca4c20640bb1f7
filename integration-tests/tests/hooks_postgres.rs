//! PostgreSQL 15 with data, WAL and a tablespace on three volumes, under a transfer workload:
//! every set restores to a server that starts, keeps the conserved total, agrees with its
//! transfer log across volumes, contains the recorded LSN and passes `pg_amcheck`. A negative
//! control (WAL and data snapshotted at different moments) is detected. Wrong password,
//! missing privilege, a WAL volume left out of the group, and a hanging or failing script hook
//! each fail the set with a message naming the cause, with nothing left frozen and every
//! quiesced hook resumed.

mod hooks_support;

use quiesce_proto::coordinator::v1::SetState;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use hooks_support::*;
use tokio_postgres::NoTls;

const BIN: &str = "/usr/lib/postgresql/15/bin";
const ACCOUNTS: i32 = 100;
const TOTAL: i64 = ACCOUNTS as i64 * 1000;

fn pg(tool: &str) -> String {
    format!("{BIN}/{tool}")
}

/// Runs a PostgreSQL tool as user postgres.
fn as_postgres(tool: &str, args: &[&str]) -> std::process::Output {
    Command::new("runuser")
        .args(["-u", "postgres", "--", &pg(tool)])
        .args(args)
        .output()
        .unwrap()
}

fn chown_postgres(path: &Path) {
    std::fs::create_dir_all(path).unwrap();
    run("chown", &["postgres:postgres", path.to_str().unwrap()]);
}

/// A server on a unix socket only. Dropping it thaws its volumes first, then stops it.
struct Server {
    data: PathBuf,
    sock: PathBuf,
    volumes: Vec<PathBuf>,
    running: bool,
}

impl Server {
    fn start(data: &Path, sock: &Path, log: &Path, volumes: &[&Path]) -> Result<Server, String> {
        chown_postgres(sock);
        std::fs::write(log, "").unwrap();
        run("chown", &["postgres:postgres", log.to_str().unwrap()]);
        let mut server = Server {
            data: data.to_owned(),
            sock: sock.to_owned(),
            volumes: volumes.iter().map(|v| v.to_path_buf()).collect(),
            running: false,
        };
        let opts = format!(
            "-c listen_addresses='' -c unix_socket_directories='{}' -c port=5432",
            sock.display()
        );
        let out = as_postgres(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
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
        if !out.status.success() {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            return Err(format!(
                "pg_ctl start failed: {}\n{log}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        server.running = true;
        Ok(server)
    }

    async fn connect(&self, user: &str, password: Option<&str>) -> tokio_postgres::Client {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(&self.sock)
            .port(5432)
            .user(user)
            .dbname("postgres");
        if let Some(password) = password {
            config.password(password);
        }
        let (client, connection) = config.connect(NoTls).await.unwrap();
        tokio::spawn(connection);
        client
    }

    fn stop(&mut self) {
        if self.running {
            for volume in &self.volumes {
                let _ = Command::new("fsfreeze").arg("-u").arg(volume).output();
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
            self.running = false;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

const SETUP: &str = "
CREATE ROLE quiesce LOGIN PASSWORD 'hook-secret';
GRANT pg_checkpoint, pg_read_all_settings TO quiesce;
GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean) TO quiesce;
GRANT EXECUTE ON FUNCTION pg_backup_stop(boolean) TO quiesce;
CREATE ROLE weak LOGIN PASSWORD 'weak-secret';
GRANT pg_read_all_settings TO weak;
CREATE TABLESPACE ts1 LOCATION 'TS';
CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL) TABLESPACE ts1;
INSERT INTO accounts SELECT g, 1000 FROM generate_series(1, 100) g;
CREATE TABLE transfers (id bigserial PRIMARY KEY, src int NOT NULL, dst int NOT NULL, amount int NOT NULL);
";

/// Transfers until `stop`; `committed` is the highest transfer id whose commit was
/// acknowledged.
async fn workload(
    client: tokio_postgres::Client,
    seed: u64,
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicI64>,
) {
    let mut x = seed;
    while !stop.load(Ordering::Relaxed) {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let a = ((x >> 33) % ACCOUNTS as u64) as i32 + 1;
        let b = ((x >> 17) % ACCOUNTS as u64) as i32 + 1;
        let amount = ((x >> 50) % 50) as i32 + 1;
        let (first, second, d1, d2) = if a <= b {
            (a, b, -amount, amount)
        } else {
            (b, a, amount, -amount)
        };
        let sql = format!(
            "BEGIN;
             UPDATE accounts SET balance = balance + ({d1}) WHERE id = {first};
             UPDATE accounts SET balance = balance + ({d2}) WHERE id = {second};
             INSERT INTO transfers (src, dst, amount) VALUES ({a}, {b}, {amount});
             COMMIT;"
        );
        if client.batch_execute(&sql).await.is_err() {
            if client.is_closed() {
                return;
            }
            let _ = client.batch_execute("ROLLBACK").await;
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        if let Ok(row) = client
            .query_one("SELECT currval('transfers_id_seq')", &[])
            .await
        {
            committed.fetch_max(row.get::<_, i64>(0), Ordering::Relaxed);
        }
    }
}

/// Checks a restored server: total, log agreement across volumes, LSN, pg_amcheck.
async fn check(server: &Server, lsn: Option<&str>) -> Result<i64, String> {
    let client = server.connect("postgres", None).await;
    let total: i64 = client
        .query_one("SELECT sum(balance)::bigint FROM accounts", &[])
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    if total != TOTAL {
        return Err(format!("total {total} != {TOTAL}"));
    }
    let wrong: i64 = client
        .query_one(
            "SELECT count(*) FROM accounts a WHERE a.balance <> 1000
               - COALESCE((SELECT sum(amount) FROM transfers WHERE src = a.id), 0)
               + COALESCE((SELECT sum(amount) FROM transfers WHERE dst = a.id), 0)",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    if wrong != 0 {
        return Err(format!("{wrong} balances disagree with the transfer log"));
    }
    if let Some(lsn) = lsn {
        let contained: bool = client
            .query_one("SELECT pg_current_wal_lsn() >= $1::text::pg_lsn", &[&lsn])
            .await
            .map_err(|e| e.to_string())?
            .get(0);
        if !contained {
            return Err(format!("restored WAL ends before the recorded LSN {lsn}"));
        }
    }
    let max_id: i64 = client
        .query_one("SELECT COALESCE(max(id), 0) FROM transfers", &[])
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    let out = as_postgres(
        "pg_amcheck",
        &[
            "-h",
            server.sock.to_str().unwrap(),
            "-p",
            "5432",
            "-U",
            "postgres",
            "--install-missing",
            "--heapallindexed",
            "-d",
            "postgres",
        ],
    );
    if !out.status.success() {
        return Err(format!(
            "pg_amcheck: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(max_id)
}

/// Mounts restored images and points the data directory's symlinks at them.
fn mount_restored(
    lab: &mut Lab,
    images: &std::collections::HashMap<String, PathBuf>,
    originals: &[(&Path, &str)],
    at: &Path,
) -> Vec<PathBuf> {
    let mut mounts = Vec::new();
    for (original, name) in originals {
        let Some(image) = images.get(&original.display().to_string()) else {
            continue;
        };
        let mount = at.join(name);
        lab.mount_image(image, &mount);
        mounts.push(mount);
    }
    let data = at.join("data/pg");
    let _ = std::fs::remove_file(data.join("postmaster.pid"));
    // pg_wal and each tablespace link point at the original volumes: re-point them.
    let relink = |link: &Path| {
        if let Ok(target) = std::fs::read_link(link) {
            for (original, name) in originals {
                if let Ok(rest) = target.strip_prefix(original) {
                    let new = at.join(name).join(rest);
                    std::fs::remove_file(link).unwrap();
                    std::os::unix::fs::symlink(&new, link).unwrap();
                    run(
                        "chown",
                        &["-h", "postgres:postgres", link.to_str().unwrap()],
                    );
                }
            }
        }
    };
    relink(&data.join("pg_wal"));
    for entry in std::fs::read_dir(data.join("pg_tblspc")).unwrap() {
        relink(&entry.unwrap().path());
    }
    mounts
}

fn hook_config(name: &str, sock: &Path, user: &str, password_file: &Path, mode: &str) -> String {
    format!(
        "[hook.{name}]\ntype = \"postgres\"\nhost = {:?}\nuser = \"{user}\"\npassword-file = {:?}\nmode = \"{mode}\"\nquiesce-timeout = \"5s\"\n",
        sock.display().to_string(),
        password_file.display().to_string()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_sets_under_load_restore_consistent_and_every_failure_is_clean() {
    if !can_run(
        "postgres hooks",
        &[
            "mkfs.xfs",
            "mkfs.ext4",
            "fsfreeze",
            "runuser",
            &pg("initdb"),
        ],
    ) {
        return;
    }
    let mut lab = Lab::new("pg", POOL_MB);
    let data = lab.volume("data", 256);
    let wal = lab.volume("wal", 384);
    let ts = lab.volume("ts", 128);
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
    std::fs::write(
        pgdata.join("pg_hba.conf"),
        "local all postgres trust\nlocal all all scram-sha-256\n",
    )
    .unwrap();
    let mut conf = std::fs::OpenOptions::new()
        .append(true)
        .open(pgdata.join("postgresql.conf"))
        .unwrap();
    // A WAL archive off the group's volumes: restoring a backup-mode set needs it.
    let archive = lab.dir.join("archive");
    chown_postgres(&archive);
    std::io::Write::write_all(
        &mut conf,
        format!(
            "max_wal_size = 96MB\nmin_wal_size = 32MB\nshared_buffers = 16MB\ncheckpoint_timeout = 30s\n\
             archive_mode = on\narchive_command = 'cp %p {0}/%f'\n",
            archive.display()
        )
        .as_bytes(),
    )
    .unwrap();
    let sock = lab.dir.join("sock");
    let mut server =
        Server::start(&pgdata, &sock, &lab.dir.join("pg.log"), &[&data, &wal, &ts]).unwrap();
    let admin = server.connect("postgres", None).await;
    let setup = SETUP.replace("TS", ts.join("pg").to_str().unwrap());
    for statement in setup.split(';').filter(|s| !s.trim().is_empty()) {
        admin.batch_execute(statement).await.unwrap();
    }

    let secrets = lab.dir.join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    secret(&secrets.join("good"), "hook-secret\n");
    secret(&secrets.join("bad"), "not-the-password\n");
    secret(&secrets.join("weak"), "weak-secret\n");
    let scripts = lab.dir.join("scripts.d");
    std::fs::create_dir_all(&scripts).unwrap();
    let script_log = lab.dir.join("scripts.log");
    let hang = lab.dir.join("hang.d");
    std::fs::create_dir_all(&hang).unwrap();
    let write_script = |dir: &Path, name: &str, body: &str| {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    write_script(
        &hang,
        "10-log",
        &format!("echo \"log $1\" >> {}", script_log.display()),
    );
    write_script(
        &hang,
        "20-hang",
        &format!(
            "echo \"hang $1\" >> {}\n[ \"$1\" = freeze ] && sleep 300\nexit 0",
            script_log.display()
        ),
    );
    write_script(
        &scripts,
        "10-fail",
        "[ \"$1\" = freeze ] && { echo 'replica lag too high' >&2; exit 4; }\nexit 0",
    );

    let agent = format!(
        "{}{}{}{}{}{}[hook.hang]\ntype = \"exec\"\ndir = {:?}\nquiesce-timeout = \"1s\"\n[hook.failing]\ntype = \"exec\"\ndir = {:?}\n",
        volumes(&[&data, &wal, &ts]),
        hook_config("pg", &sock, "quiesce", &secrets.join("good"), "crash"),
        hook_config(
            "pg-backup",
            &sock,
            "quiesce",
            &secrets.join("good"),
            "backup"
        ),
        hook_config("pg-badpw", &sock, "quiesce", &secrets.join("bad"), "crash"),
        hook_config("pg-weak", &sock, "weak", &secrets.join("weak"), "crash"),
        hook_config(
            "pg-weak-backup",
            &sock,
            "weak",
            &secrets.join("weak"),
            "backup"
        ),
        hang.display().to_string(),
        scripts.display().to_string(),
    );
    let all = [data.as_path(), wal.as_path(), ts.as_path()];
    let groups = [
        group("g", &all, &["pg"]),
        group("plain", &all, &[]),
        group("backup", &all, &["pg-backup"]),
        group("badpw", &all, &["pg-badpw"]),
        group("weak", &all, &["pg-weak"]),
        group("weak-backup", &all, &["pg-weak-backup"]),
        group("nowal", &[&data, &ts], &["pg"]),
        group("hang", &all, &["pg-backup", "hang"]),
        group("failing", &all, &["pg", "failing"]),
    ]
    .concat();
    let stack = stack(&agent, &groups);

    // The workload: 3 clients transferring between accounts.
    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicI64::new(0));
    let mut workers = Vec::new();
    for seed in 1..=3u64 {
        let client = server.connect("postgres", None).await;
        workers.push(tokio::spawn(workload(
            client,
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
    let originals: [(&Path, &str); 3] = [(&data, "data"), (&wal, "wal"), (&ts, "ts")];
    for round in 0..runs {
        let before = committed.load(Ordering::Relaxed);
        let set = stack.backup("g").await;
        assert_eq!(set.state(), SetState::Consistent, "{}", set.error);
        with_hook.push(set.freeze_window_ms);
        hook_ms_list.push(hook_ms(&set));
        let lsn = hook_value(&set, "pg", "lsn").expect("the hook records the LSN");
        let plain = stack.backup("plain").await;
        assert_eq!(plain.state(), SetState::Consistent, "{}", plain.error);
        without.push(plain.freeze_window_ms);

        let images = stack
            .restore(&set, &lab.pool.join(format!("restore-{round}")))
            .await;
        let at = lab.dir.join(format!("restored-{round}"));
        let mounts = mount_restored(&mut lab, &images, &originals, &at);
        // As docs/hooks.md says for every restored copy: never archive into production's
        // archive (a crash-mode copy would write timeline-1 segments under production's names).
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(at.join("data/pg/postgresql.conf"))
            .unwrap();
        std::io::Write::write_all(&mut conf, b"archive_mode = off\n").unwrap();
        let mut restored = Server::start(
            &at.join("data/pg"),
            &lab.dir.join(format!("sock-{round}")),
            &lab.dir.join(format!("restored-{round}.log")),
            &[],
        )
        .unwrap_or_else(|e| panic!("round {round}: {e}"));
        let max_id = check(&restored, Some(&lsn))
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!(
            max_id >= before,
            "round {round}: transfer {before} was committed before the set but is not restored (max {max_id})"
        );
        restored.stop();
        for mount in mounts.iter().rev() {
            lab.unmount(mount);
        }
    }

    // Backup mode, twice: two successive sets, each restored the documented way (archiving off
    // on the restored copy). The first copy's promotion must leave the production archive
    // alone — no timeline-2 history, no WAL of its own — or the second restore fails with
    // "requested timeline 2 is not a child of this server's history".
    let listing = |archive: &Path| -> Vec<(String, u64, std::time::SystemTime)> {
        let mut files: Vec<_> = std::fs::read_dir(archive)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let meta = e.metadata().unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    meta.len(),
                    meta.modified().unwrap(),
                )
            })
            .collect();
        files.sort();
        files
    };
    for round in 0..2 {
        let before = listing(&archive);
        // Backup mode: the label and tablespace map come back byte for byte from pg_backup_stop.
        let set = stack.backup("backup").await;
        assert_eq!(set.state(), SetState::Consistent, "{}", set.error);
        let output = &set.hook_outputs[0];
        assert!(
            output.backup_label.starts_with("START WAL LOCATION: "),
            "{:?}",
            output.backup_label
        );
        assert!(
            output
                .backup_label
                .contains(&format!("LABEL: quiesce {}", set.id))
        );
        assert!(
            output
                .tablespace_map
                .contains(&ts.join("pg").display().to_string()),
            "{:?}",
            output.tablespace_map
        );
        let stop_lsn = hook_value(&set, "pg-backup", "backup-stop-lsn").unwrap();

        // Restore it the documented way: label and map written into the restored data directory
        // (the map's path edited to where the tablespace is now), recovery from the WAL archive.
        let stop_file: String = admin
            .query_one("SELECT pg_walfile_name($1::text::pg_lsn)", &[&stop_lsn])
            .await
            .unwrap()
            .get(0);
        let archived = Instant::now();
        // pg_backup_stop switched to a new segment; the archiver copies the finished one.
        while !archive.join(&stop_file).exists() {
            if archived.elapsed() > Duration::from_secs(20) {
                let stats = admin
                    .query_one(
                        "SELECT archived_count, COALESCE(last_archived_wal, ''), failed_count,
                                COALESCE(last_failed_wal, ''), current_setting('archive_mode')
                         FROM pg_stat_archiver",
                        &[],
                    )
                    .await
                    .unwrap();
                let log = std::fs::read_to_string(lab.dir.join("pg.log")).unwrap_or_default();
                panic!(
                    "{stop_file} never archived: archived {} (last {}), failed {} (last {}), archive_mode {}\n{}",
                    stats.get::<_, i64>(0),
                    stats.get::<_, String>(1),
                    stats.get::<_, i64>(2),
                    stats.get::<_, String>(3),
                    stats.get::<_, String>(4),
                    log.lines()
                        .filter(|l| !l.contains("checkpoint"))
                        .take(30)
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let images = stack
            .restore(&set, &lab.pool.join(format!("restore-backup-{round}")))
            .await;
        let at = lab.dir.join(format!("restored-backup-{round}"));
        let mounts = mount_restored(&mut lab, &images, &originals, &at);
        let rdata = at.join("data/pg");
        let map = output.tablespace_map.replace(
            &ts.display().to_string(),
            &at.join("ts").display().to_string(),
        );
        for (name, content) in [
            ("backup_label", output.backup_label.as_str()),
            ("tablespace_map", &map),
        ] {
            std::fs::write(rdata.join(name), content).unwrap();
        }
        std::fs::write(rdata.join("recovery.signal"), "").unwrap();
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(rdata.join("postgresql.conf"))
            .unwrap();
        std::io::Write::write_all(
            &mut conf,
            format!(
                "restore_command = 'cp {}/%f %p'\narchive_mode = off\n",
                archive.display()
            )
            .as_bytes(),
        )
        .unwrap();
        run(
            "chown",
            &["-R", "postgres:postgres", rdata.to_str().unwrap()],
        );
        let mut restored = Server::start(
            &rdata,
            &lab.dir.join(format!("sock-backup-{round}")),
            &lab.dir.join(format!("restored-backup-{round}.log")),
            &[],
        )
        .unwrap_or_else(|e| panic!("backup mode, restore {round}: {e}"));
        let recovered = Instant::now();
        loop {
            let client = restored.connect("postgres", None).await;
            let in_recovery: bool = client
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await
                .unwrap()
                .get(0);
            if !in_recovery {
                break;
            }
            assert!(
                recovered.elapsed() < Duration::from_secs(60),
                "backup mode: still in recovery"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        check(&restored, Some(&stop_lsn))
            .await
            .unwrap_or_else(|e| panic!("backup mode, restore {round}: {e}"));
        let log =
            std::fs::read_to_string(lab.dir.join(format!("restored-backup-{round}.log"))).unwrap();
        assert!(log.contains("starting backup recovery"), "{log}");
        restored.stop();
        for mount in mounts.iter().rev() {
            lab.unmount(mount);
        }
        let foreign: Vec<String> = std::fs::read_dir(&archive)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".history") || !name.starts_with("00000001"))
            .collect();
        assert!(
            foreign.is_empty(),
            "restore {round}: the restored copy wrote into the production archive: {foreign:?}"
        );
        // Production keeps archiving its own new segments; nothing archived before the
        // restore changed.
        let after = listing(&archive);
        for file in &before {
            assert!(
                after.contains(file),
                "restore {round}: archived {} changed or vanished",
                file.0
            );
        }
    }

    // The negative control: WAL snapshotted, then (after more transfers and a checkpoint)
    // data and tablespace, each by a group freeze of its own: not one cut.
    let split = format!(
        "{}{}",
        group("walonly", &[&wal], &[]),
        group("dataonly", &[&data, &ts], &[])
    );
    let split_stack = hooks_support::stack(&volumes(&[&data, &wal, &ts]), &split);
    let wal_set = split_stack.backup("walonly").await;
    assert_eq!(wal_set.state(), SetState::Consistent, "{}", wal_set.error);
    tokio::time::sleep(Duration::from_millis(500)).await;
    admin.batch_execute("CHECKPOINT").await.unwrap();
    let data_set = split_stack.backup("dataonly").await;
    assert_eq!(data_set.state(), SetState::Consistent, "{}", data_set.error);
    let mut images = split_stack
        .restore(&wal_set, &lab.pool.join("restore-split"))
        .await;
    images.extend(
        split_stack
            .restore(&data_set, &lab.pool.join("restore-split"))
            .await,
    );
    let at = lab.dir.join("restored-split");
    let mounts = mount_restored(&mut lab, &images, &originals, &at);
    let detected = match Server::start(
        &at.join("data/pg"),
        &lab.dir.join("sock-split"),
        &lab.dir.join("split.log"),
        &[],
    ) {
        Err(e) => {
            let why = e
                .lines()
                .find(|l| l.contains("PANIC") || l.contains("FATAL"))
                .unwrap_or("");
            println!("negative control detected: the server does not start: {why}");
            true
        }
        Ok(mut restored) => {
            let result = check(&restored, None).await;
            restored.stop();
            println!("negative control: {result:?}");
            result.is_err()
        }
    };
    for mount in mounts.iter().rev() {
        lab.unmount(mount);
    }
    assert!(
        detected,
        "the negative control restored a consistent database: the check cannot fail"
    );

    // Failures: each names its cause; nothing stays frozen; no hook session stays open.
    let failures = [
        (
            "badpw",
            "password authentication failed (check password-file",
        ),
        ("weak", "GRANT pg_checkpoint TO weak"),
        (
            "weak-backup",
            "GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean), pg_backup_stop(boolean) TO weak",
        ),
        (
            "nowal",
            &format!(
                "hook pg: pg_wal {} lies on volume {}, which is not in group nowal for db1",
                wal.join("pg_wal").display(),
                wal.display()
            ),
        ),
        // The script's own 1 s deadline or the hook's 1 s quiesce deadline, whichever fires
        // first: both name the hook, the phase and the timeout.
        ("hang", "hook hang: quiesce"),
        (
            "failing",
            "script 10-fail freeze: exited with exit status: 4: replica lag too high",
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
        if group_name == "hang" {
            assert!(
                set.error.contains("did not finish within 1s"),
                "{}",
                set.error
            );
        }
        assert!(none_frozen(&all), "{group_name}: a volume stayed frozen");
        // Backends exit a moment after their client closes the socket: allow 3 s.
        let mut open: i64 = -1;
        for _ in 0..30 {
            open = admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'quiesce-agent'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if open == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(open, 0, "{group_name}: a hook session stayed open");
    }
    // The hanging script's group: the scripts that quiesced got freeze-fail, in reverse.
    let log = std::fs::read_to_string(&script_log).unwrap();
    assert!(
        log.ends_with("log freeze\nhang freeze\nhang freeze-fail\nlog freeze-fail\n"),
        "{log}"
    );

    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    server.stop();
    println!(
        "BENCH engine=postgres runs={} median_hook_ms={} median_window_ms={} median_window_without_hooks_ms={}",
        with_hook.len(),
        median(&mut hook_ms_list),
        median(&mut with_hook),
        median(&mut without)
    );
}
