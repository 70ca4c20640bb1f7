//! THE CROSS-HOST CUT. Three PostgreSQL 15 shards, each with its data and its WAL on two loop
//! volumes owned by its own agent (127.0.0.2, .3, .4). A workload moves money between shards:
//! the debit is committed on the source shard, then the credit on the destination, each
//! logged with the transfer id. Backups of the whole group are taken under load; every
//! consistent set is restored as a whole (all six volumes), each restored shard starts with
//! crash recovery, and the restored state is checked: no credit without its debit, and the
//! global total conserved (balances plus money in flight = the initial total).
//!
//! The negative control takes each shard by its own single-host set, one after another, as a
//! naive per-host script would; at least one such combination must show a violation, which
//! proves the check can fail.

use quiesce_proto::coordinator::v1::SetState;
use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use quiesce_integration_tests::multihost::{
    Lab, backup, free_port, have_root, path, scrape, serial, sh,
};
use quiesce_proto::coordinator::v1 as pb;
use quiesce_proto::coordinator::v1::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

const PGBIN: &str = "/usr/lib/postgresql/15/bin";
const SHARDS: usize = 3;
const ACCOUNTS: i64 = 50;
const START_BALANCE: i64 = 1_000;
const INITIAL_TOTAL: i64 = SHARDS as i64 * ACCOUNTS * START_BALANCE;

fn pg_as(args: &[&str]) {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .args(args)
        .current_dir("/")
        .output()
        .expect("runuser");
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn chown_postgres(p: &Path) {
    sh("chown", &["-R", "postgres:postgres", path(p)]);
}

/// A running PostgreSQL server, reached over its unix socket.
struct Pg {
    datadir: PathBuf,
    sockdir: PathBuf,
    port: u16,
}

impl Pg {
    fn start(datadir: &Path, sockdir: &Path, log: &Path) -> Pg {
        fs::create_dir_all(sockdir).unwrap();
        chown_postgres(sockdir);
        if !log.exists() {
            fs::write(log, "").unwrap();
        }
        chown_postgres(log);
        let port = free_port(Ipv4Addr::LOCALHOST);
        pg_as(&[
            &format!("{PGBIN}/pg_ctl"),
            "start",
            "-w",
            "-t",
            "120",
            "-D",
            path(datadir),
            "-l",
            path(log),
            "-o",
            &format!("-p {port} -k {} -c listen_addresses=''", sockdir.display()),
        ]);
        Pg {
            datadir: datadir.to_owned(),
            sockdir: sockdir.to_owned(),
            port,
        }
    }

    fn psql(&self, sql: &str) -> String {
        let out = Command::new(format!("{PGBIN}/psql"))
            .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-U", "postgres"])
            .args(["-h", path(&self.sockdir), "-p", &self.port.to_string()])
            .args(["-d", "postgres", "-c", sql])
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn session(&self) -> Session {
        let mut child = Command::new(format!("{PGBIN}/psql"))
            .args(["-X", "-q", "-At", "-U", "postgres"])
            .args(["-h", path(&self.sockdir), "-p", &self.port.to_string()])
            .args(["-d", "postgres"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("psql session");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Session {
            child,
            stdin,
            stdout,
            seq: 0,
        }
    }

    fn stop(&self) {
        pg_as(&[
            &format!("{PGBIN}/pg_ctl"),
            "stop",
            "-m",
            "fast",
            "-w",
            "-D",
            path(&self.datadir),
        ]);
    }
}

/// One long-lived psql: statements in, a marker echoed after each batch, so the caller knows
/// the batch (its COMMIT included) has returned.
struct Session {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    seq: u64,
}

impl Session {
    fn run(&mut self, sql: &str) -> bool {
        self.seq += 1;
        let marker = format!("__done_{}__", self.seq);
        if writeln!(self.stdin, "{sql}\n\\echo {marker}").is_err() || self.stdin.flush().is_err() {
            return false;
        }
        let mut line = String::new();
        loop {
            line.clear();
            match self.stdout.read_line(&mut line) {
                Ok(0) | Err(_) => return false,
                Ok(_) if line.trim() == marker => return true,
                Ok(_) => {}
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The workload: each worker moves random amounts between random shards, debit first.
struct Workload {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workload {
    fn start(shards: &[Pg], workers: u64) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for worker in 0..workers {
            let mut sessions: Vec<Session> = shards.iter().map(Pg::session).collect();
            let stop = stop.clone();
            let done = done.clone();
            threads.push(std::thread::spawn(move || {
                let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ (worker + 1);
                let mut next = move || {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed
                };
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let tid = worker * 1_000_000_000 + n;
                    let from = (next() % SHARDS as u64) as usize;
                    let to = (from + 1 + (next() % (SHARDS as u64 - 1)) as usize) % SHARDS;
                    let amount = 1 + (next() % 50) as i64;
                    let account = 1 + (next() % ACCOUNTS as u64) as i64;
                    let debit = format!(
                        "BEGIN; UPDATE accounts SET balance = balance - {amount} WHERE id = {account}; \
                         INSERT INTO transfers_out VALUES ({tid}, {to}, {amount}); COMMIT;"
                    );
                    if !sessions[from].run(&debit) {
                        return;
                    }
                    let credit = format!(
                        "BEGIN; UPDATE accounts SET balance = balance + {amount} WHERE id = {account}; \
                         INSERT INTO transfers_in VALUES ({tid}, {from}, {amount}); COMMIT;"
                    );
                    if !sessions[to].run(&credit) {
                        return;
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        Workload {
            stop,
            done,
            threads,
        }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        self.done.load(Ordering::Relaxed)
    }
}

/// What one restored shard holds.
#[derive(Debug, Default)]
struct ShardState {
    balance: i64,
    /// tid → (to, amount)
    outs: HashMap<i64, (usize, i64)>,
    /// tid → (from, amount)
    ins: HashMap<i64, (usize, i64)>,
}

fn read_state(pg: &Pg) -> ShardState {
    let balance = pg
        .psql("SELECT sum(balance) FROM accounts")
        .trim()
        .parse()
        .unwrap();
    let rows = |sql: &str| -> HashMap<i64, (usize, i64)> {
        pg.psql(sql)
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                let f: Vec<i64> = l.split('|').map(|x| x.parse().unwrap()).collect();
                (f[0], (f[1] as usize, f[2]))
            })
            .collect()
    };
    ShardState {
        balance,
        outs: rows("SELECT tid, to_shard, amount FROM transfers_out"),
        ins: rows("SELECT tid, from_shard, amount FROM transfers_in"),
    }
}

/// Every violation of the cut in a combination of restored shards.
fn violations(shards: &[ShardState]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut in_flight = 0;
    for (index, shard) in shards.iter().enumerate() {
        for (tid, (from, amount)) in &shard.ins {
            match shards[*from].outs.get(tid) {
                Some((to, debited)) if *to == index && debited == amount => {}
                _ => problems.push(format!(
                    "transfer {tid}: credit of {amount} on shard {index} without its debit on shard {from}"
                )),
            }
        }
        for (tid, (to, amount)) in &shard.outs {
            if !shards[*to].ins.contains_key(tid) {
                in_flight += amount;
            }
        }
    }
    let total: i64 = shards.iter().map(|s| s.balance).sum();
    if total + in_flight != INITIAL_TOTAL {
        problems.push(format!(
            "total {total} + in flight {in_flight} = {} ≠ {INITIAL_TOTAL}",
            total + in_flight
        ));
    }
    problems
}

struct Shard {
    data: PathBuf,
    wal: PathBuf,
}

/// Restores `set` (images next to the snapshots), starts each restored shard of `shards`
/// with crash recovery, reads it, and tears it down. Returns the states by shard index.
async fn restore_and_read(
    lab: &mut Lab,
    client: &mut CoordinatorClient<Channel>,
    set: &pb::SnapshotSet,
    layout: &[Shard],
    shards: &[usize],
) -> Vec<(usize, ShardState)> {
    let target = lab.pool.join("restore").join(&set.id);
    let reply = client
        .restore_set(pb::RestoreSetRequest {
            set_id: set.id.clone(),
            target_dir: target.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("restore {}: {e}", set.id))
        .into_inner();
    let image = |mount: &Path| -> PathBuf {
        let found = reply
            .volumes
            .iter()
            .find(|v| Path::new(&v.mount_point) == mount)
            .unwrap_or_else(|| panic!("{} not restored: {reply:?}", mount.display()));
        PathBuf::from(&found.image_path)
    };
    let mut states = Vec::new();
    for &index in shards {
        let root = lab.dir.join("restored").join(format!("{}-{index}", set.id));
        let data = root.join("data");
        let wal = root.join("wal");
        lab.mount_image(&image(&layout[index].data), &data);
        lab.mount_image(&image(&layout[index].wal), &wal);
        let datadir = data.join("pg");
        let _ = fs::remove_file(datadir.join("postmaster.pid"));
        fs::remove_file(datadir.join("pg_wal")).unwrap();
        std::os::unix::fs::symlink(wal.join("pg_wal"), datadir.join("pg_wal")).unwrap();
        lab.pg_datadirs.push(datadir.clone());
        let pg = Pg::start(
            &datadir,
            &lab.run.join(format!("r{index}")),
            &lab.dir.join(format!("restored-{}-{index}.log", set.id)),
        );
        states.push((index, read_state(&pg)));
        pg.stop();
        lab.pg_datadirs.pop();
        lab.unmount(&data);
        lab.unmount(&wal);
    }
    let _ = fs::remove_dir_all(&target);
    states
}

fn members(layout: &[Shard], only: Option<usize>) -> String {
    let mut text = String::new();
    for (index, shard) in layout.iter().enumerate() {
        if only.is_some_and(|o| o != index) {
            continue;
        }
        text.push_str(&format!(
            "[[group.member]]\nagent = \"shard{index}\"\nmounts = [\"{}\", \"{}\"]\n",
            shard.data.display(),
            shard.wal.display()
        ));
    }
    text
}

const GROUP_SETTINGS: &str =
    "provider = \"reflink\"\nlease = \"10s\"\nphase-timeout = \"10s\"\nfreeze-budget = \"8s\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_backup_under_cross_shard_load_restores_to_a_state_the_bank_passed_through() {
    if !have_root("cross_host_cut") {
        return;
    }
    assert!(
        Path::new(PGBIN).join("initdb").exists(),
        "PostgreSQL 15 binaries expected in {PGBIN}"
    );
    let _serial = serial().await;
    let mut lab = Lab::new("cut", 4096);
    fs::set_permissions(&lab.dir, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&lab.run, fs::Permissions::from_mode(0o755)).unwrap();

    // Shards: volumes, clusters, agents.
    let mut layout = Vec::new();
    let mut servers = Vec::new();
    for index in 0..SHARDS {
        let data = lab.volume(&format!("data{index}"), 256);
        let wal = lab.volume(&format!("wal{index}"), 256);
        fs::set_permissions(lab.dir.join("vol"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::create_dir_all(data.join("pg")).unwrap();
        fs::create_dir_all(wal.join("pg_wal")).unwrap();
        chown_postgres(&data.join("pg"));
        chown_postgres(&wal.join("pg_wal"));
        sh("chmod", &["700", path(&data.join("pg"))]);
        pg_as(&[
            &format!("{PGBIN}/initdb"),
            "-D",
            path(&data.join("pg")),
            "--waldir",
            path(&wal.join("pg_wal")),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        let mut conf = fs::OpenOptions::new()
            .append(true)
            .open(data.join("pg/postgresql.conf"))
            .unwrap();
        writeln!(
            conf,
            "shared_buffers = 16MB\nmax_wal_size = 64MB\nmin_wal_size = 32MB\nmax_connections = 20\nfsync = on\nsynchronous_commit = on"
        )
        .unwrap();
        drop(conf);
        sh("sync", &[]);
        lab.pg_datadirs.push(data.join("pg"));
        let pg = Pg::start(
            &data.join("pg"),
            &lab.run.join(format!("pg{index}")),
            &lab.dir.join(format!("pg{index}.log")),
        );
        pg.psql(&format!(
            "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL);
             INSERT INTO accounts SELECT g, {START_BALANCE} FROM generate_series(1, {ACCOUNTS}) g;
             CREATE TABLE transfers_out (tid bigint PRIMARY KEY, to_shard int NOT NULL, amount bigint NOT NULL);
             CREATE TABLE transfers_in (tid bigint PRIMARY KEY, from_shard int NOT NULL, amount bigint NOT NULL);
             CHECKPOINT;"
        ));
        servers.push(pg);
        layout.push(Shard { data, wal });
    }
    for (index, shard) in layout.iter().enumerate() {
        lab.spawn_agent(
            &format!("shard{index}"),
            2 + index as u8,
            &[shard.data.clone(), shard.wal.clone()],
            "default-lease = \"10s\"",
        );
    }

    // The whole bank as one group, backed up repeatedly under load.
    let groups = format!(
        "[[group]]\nname = \"bank\"\n{GROUP_SETTINGS}{}",
        members(&layout, None)
    );
    lab.start_coordinator(Some(&groups), &[]);
    let mut client = lab.coordinator().client().await;
    let workload = Workload::start(&servers, 2);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut sets = Vec::new();
    for _ in 0..3 {
        let set = backup(&mut client, "bank").await;
        assert_eq!(
            set.state(),
            SetState::Consistent,
            "{}: {}",
            set.id,
            set.error
        );
        assert!(
            set.verdict
                .starts_with("consistent: all 3 members frozen (last freeze reply +"),
            "{}",
            set.verdict
        );
        eprintln!(
            "{}: cut window {} ms, longest stall {} ms",
            set.id, set.freeze_window_ms, set.max_write_stall_ms
        );
        // The figures: every host's write stall (agent clock) lies inside the group's cut
        // window (coordinator clock), and its thaw returned within the set.
        assert!(set.freeze_window_ms > 0, "{}: no cut window", set.id);
        for host in &set.hosts {
            assert!(
                host.write_stall_ms > 0 && host.write_stall_ms <= set.freeze_window_ms,
                "{} {}: stall {} ms, cut window {} ms",
                set.id,
                host.agent,
                host.write_stall_ms,
                set.freeze_window_ms
            );
            assert!(
                host.thaw_returned_at_ms >= host.freeze_sent_at_ms
                    && host.thaw_returned_at_ms >= host.thaw_sent_at_ms
                    && host.thaw_returned_at_ms <= set.finished_at_ms,
                "{} {}: thaw returned at {} (freeze sent {}, thaw sent {}, finished {})",
                set.id,
                host.agent,
                host.thaw_returned_at_ms,
                host.freeze_sent_at_ms,
                host.thaw_sent_at_ms,
                set.finished_at_ms
            );
        }
        sets.push(set);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let metrics = scrape(lab.coordinator().metrics);
    assert!(
        metrics.contains("quiesce_sets{group=\"bank\",state=\"consistent\"} 3"),
        "{metrics}"
    );
    assert!(metrics.contains("quiesce_freeze_window_seconds_count{group=\"bank\"} 3"));

    let all: Vec<usize> = (0..SHARDS).collect();
    let mut transfers_seen = 0;
    for set in &sets {
        let states = restore_and_read(&mut lab, &mut client, set, &layout, &all).await;
        let states: Vec<ShardState> = states.into_iter().map(|(_, s)| s).collect();
        let problems = violations(&states);
        assert!(
            problems.is_empty(),
            "set {} is not a cut: {problems:#?}",
            set.id
        );
        let credits: usize = states.iter().map(|s| s.ins.len()).sum();
        eprintln!("{}: cut holds over {credits} completed transfers", set.id);
        transfers_seen = transfers_seen.max(credits);
    }
    assert!(
        transfers_seen > 0,
        "the workload moved money during the backups"
    );

    // Negative control: one single-host set per shard, one after another.
    let mut solo = String::new();
    for index in 0..SHARDS {
        solo.push_str(&format!(
            "[[group]]\nname = \"solo{index}\"\n{GROUP_SETTINGS}{}",
            members(&layout, Some(index))
        ));
    }
    lab.start_coordinator(Some(&solo), &[]);
    let mut client = lab.coordinator().client().await;
    let mut caught = None;
    for attempt in 0..4 {
        let mut per_host = Vec::new();
        for index in 0..SHARDS {
            let set = backup(&mut client, &format!("solo{index}")).await;
            assert_eq!(set.state(), SetState::Consistent, "{}", set.error);
            per_host.push(set);
        }
        let mut states = Vec::new();
        for (index, set) in per_host.iter().enumerate() {
            states.extend(restore_and_read(&mut lab, &mut client, set, &layout, &[index]).await);
        }
        let states: Vec<ShardState> = states.into_iter().map(|(_, s)| s).collect();
        let problems = violations(&states);
        eprintln!(
            "negative control, attempt {attempt}: {} violation(s){}",
            problems.len(),
            problems
                .first()
                .map(|p| format!(", e.g. {p}"))
                .unwrap_or_default()
        );
        if !problems.is_empty() {
            caught = Some(problems);
            break;
        }
    }
    let moved = workload.finish();
    eprintln!("workload: {moved} transfers completed");
    assert!(
        caught.is_some(),
        "host-by-host snapshots never showed a torn state: the check has no teeth"
    );

    // The live bank is still whole.
    let live: Vec<ShardState> = servers.iter().map(read_state).collect();
    assert!(violations(&live).is_empty(), "{:?}", violations(&live));
    for pg in &servers {
        pg.stop();
    }
    lab.pg_datadirs.clear();
}
