//! PostgreSQL 15 shards on a [`Lab`]'s loop volumes (data and WAL each on its own volume) and a
//! transfer load between them: each worker moves money from one shard to another, the debit
//! committed on the source, then the credit on the destination (`synchronous_commit = on`, so
//! every commit is a WAL flush on the volume). The same lab as tests/multihost_cut.rs, for
//! benchmarks (`bench-window`); the cut test keeps its own copy, with the checks of the state.
//!
//! Servers are registered with the lab (`pg_datadirs`), whose `Drop` stops them before it
//! thaws and unmounts the volumes.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::multihost::{Lab, free_port, path, sh};

pub const PGBIN: &str = "/usr/lib/postgresql/15/bin";
pub const ACCOUNTS: i64 = 50;
pub const START_BALANCE: i64 = 1_000;

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
pub struct Pg {
    pub datadir: PathBuf,
    pub sockdir: PathBuf,
    pub port: u16,
}

impl Pg {
    /// A new cluster with its data directory on `data` and its WAL on `wal` (two volumes of
    /// `lab`), started, with the bank's tables.
    pub fn create(lab: &mut Lab, index: usize, data: &Path, wal: &Path) -> Pg {
        assert!(
            Path::new(PGBIN).join("initdb").exists(),
            "PostgreSQL 15 binaries expected in {PGBIN}"
        );
        for dir in [&lab.dir, &lab.run, &lab.dir.join("vol")] {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
        }
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
        pg
    }

    pub fn start(datadir: &Path, sockdir: &Path, log: &Path) -> Pg {
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

    pub fn psql(&self, sql: &str) -> String {
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

    pub fn session(&self) -> Session {
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
}

/// One long-lived psql: statements in, a marker echoed after each batch, so the caller knows
/// the batch (its COMMIT included) has returned.
pub struct Session {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    seq: u64,
}

impl Session {
    pub fn run(&mut self, sql: &str) -> bool {
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

/// The transfer load: each worker moves random amounts between random shards, debit first.
pub struct Workload {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workload {
    /// `shards` must be at least two.
    pub fn start(shards: &[Pg], workers: u64) -> Workload {
        let count = shards.len();
        assert!(count >= 2, "transfers need two shards");
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
                    let from = (next() % count as u64) as usize;
                    let to = (from + 1 + (next() % (count as u64 - 1)) as usize) % count;
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

    /// Transfers completed so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Stops the workers; the number of transfers completed.
    pub fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        self.done.load(Ordering::Relaxed)
    }
}
