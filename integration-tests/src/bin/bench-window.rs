//! `bench-window`: Quiesce's write stall against the physical floor, on the lab of the
//! cross-host cut test (PostgreSQL shards, data and WAL each on a loop ext4 volume in an XFS
//! reflink pool, a transfer load between the shards).
//!
//! For each configuration (default `1x2,2x2,1x4`: hosts × volumes per host) it alternates, for
//! `--rounds` rounds each (default 20), in a rotating order:
//!
//! - **Quiesce**: `quiescectl backup` through the real coordinator and the real agents (one
//!   `quiesce-agent` process per host on 127.0.0.2, .3), then `quiescectl sets show --json` for
//!   the set's cut window (first freeze sent → last FITHAW returned, coordinator clock), its
//!   hosts' write stalls (first FIFREEZE → last FITHAW, agent clock) and each host's FIFREEZE
//!   time (first FIFREEZE started → last returned).
//! - **floor (syncfs)**: one process does the least any tool can: mount descriptors opened and
//!   `syncfs`-ed before the timer; then FIFREEZE of every volume at once (a thread each),
//!   FICLONE of every image at once, FITHAW of every volume at once. Its window is its stall.
//! - **floor (settled)**: the same, prepared with the agent's own prepare work (`syncfs` until
//!   one finds little to write, then `EXT4_IOC_CHECKPOINT`: `freezer::settle`) instead of one
//!   `syncfs`; it shows what that work takes off FIFREEZE.
//!
//! It prints median, p95 and max of each, the ratios and the load average, as Markdown.
//! Root; freezes only the loop filesystems it made; every freeze of the floor is thawed by a
//! guard and nothing between its FIFREEZE and its FITHAW can panic (release builds abort on
//! panic, which would skip guards).
//!
//!     cargo build --profile dist --workspace --bins
//!     QUIESCE_BIN_DIR=target/dist target/dist/bench-window --rounds 20

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use quiesce_agent::freezer::{Freezer, IoctlFreezer, open_mount_point, settle};
use quiesce_integration_tests::multihost::{Lab, bin, have_root};
use quiesce_integration_tests::pgshards::{Pg, Workload};

struct Args {
    configs: Vec<(usize, usize)>,
    rounds: usize,
    workers: u64,
    pause: Duration,
}

fn parse_args() -> Args {
    let mut args = Args {
        configs: vec![(1, 2), (2, 2), (1, 4)],
        rounds: 20,
        workers: 4,
        pause: Duration::from_millis(200),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_default();
        match flag.as_str() {
            "--configs" => {
                args.configs = value
                    .split(',')
                    .map(|c| {
                        let (h, v) = c.split_once('x').expect("--configs 1x2,2x2");
                        let (h, v) = (h.parse().expect("hosts"), v.parse().expect("volumes"));
                        assert!(
                            h >= 1 && v >= 2 && v % 2 == 0,
                            "HOSTSxVOLUMES, volumes even"
                        );
                        (h, v)
                    })
                    .collect()
            }
            "--rounds" => args.rounds = value.parse().expect("--rounds N"),
            "--workers" => args.workers = value.parse().expect("--workers N"),
            "--pause" => args.pause = humantime::parse_duration(&value).expect("--pause"),
            other => {
                eprintln!(
                    "usage: bench-window [--configs 1x2,2x2,1x4] [--rounds 20] [--workers 4] [--pause 200ms]\nunknown {other}"
                );
                std::process::exit(64);
            }
        }
    }
    args
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// One volume of the group: its mount point and its loop image in the pool.
#[derive(Clone)]
struct Volume {
    name: String,
    mount: PathBuf,
    image: PathBuf,
}

/// One round's figures, ms.
#[derive(Clone, Copy, Default)]
struct Round {
    window: f64,
    stall: f64,
    fifreeze: f64,
    /// Quiesce only, coordinator clock: where the cut window went (see `PARTS`).
    parts: [f64; 5],
}

/// The cut window of a Quiesce round in parts, from the set's instants (coordinator clock).
const PARTS: [&str; 5] = [
    "freeze calls (first sent → last reply)",
    "last freeze reply → first snapshot call",
    "snapshot calls",
    "last snapshot returned → thaw sent",
    "thaw sent → last FITHAW returned",
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Prepare {
    Syncfs,
    Settle,
}

/// Thaws, on drop, every descriptor it still holds frozen.
struct ThawGuard<'a> {
    fds: &'a [OwnedFd],
    frozen: Vec<bool>,
}

impl Drop for ThawGuard<'_> {
    fn drop(&mut self) {
        for (fd, frozen) in self.fds.iter().zip(&self.frozen) {
            if *frozen {
                let _ = IoctlFreezer.thaw(fd.as_fd());
            }
        }
    }
}

/// Runs `work` for every item at once, each on a scoped thread of its own; the results and
/// each call's duration, in order. Never panics (an item the system refuses a thread for runs
/// here).
fn at_once<T: Sync, R: Send>(items: &[T], work: impl Fn(&T) -> R + Sync) -> Vec<(R, Duration)> {
    let work = &work;
    std::thread::scope(|scope| {
        let started: Vec<_> = items
            .iter()
            .map(|item| {
                std::thread::Builder::new()
                    .spawn_scoped(scope, move || {
                        let t = Instant::now();
                        let r = work(item);
                        (r, t.elapsed())
                    })
                    .map_err(|_| item)
            })
            .collect();
        started
            .into_iter()
            .filter_map(|s| match s {
                Ok(handle) => handle.join().ok(),
                Err(item) => {
                    let t = Instant::now();
                    let r = work(item);
                    Some((r, t.elapsed()))
                }
            })
            .collect()
    })
}

/// One floor round: prepare (untimed), then FIFREEZE all ∥, FICLONE all ∥, FITHAW all ∥.
fn floor_round(volumes: &[Volume], clones: &Path, round: usize, prepare: Prepare) -> Round {
    let fds: Vec<OwnedFd> = volumes
        .iter()
        .map(|v| open_mount_point(&v.mount).expect("open mount point"))
        .collect();
    for fd in &fds {
        match prepare {
            Prepare::Syncfs => IoctlFreezer.syncfs(fd.as_fd()).expect("syncfs"),
            Prepare::Settle => {
                settle(&IoctlFreezer, fd.as_fd(), Duration::from_secs(2)).expect("settle");
            }
        }
    }
    let targets: Vec<(PathBuf, PathBuf)> = volumes
        .iter()
        .map(|v| {
            (
                v.image.clone(),
                clones.join(format!("{round}-{:?}-{}.img", prepare as u8, v.name)),
            )
        })
        .collect();
    // From here to the guard's end nothing may panic.
    let mut guard = ThawGuard {
        fds: &fds,
        frozen: vec![false; fds.len()],
    };
    let start = Instant::now();
    let froze = at_once(&fds, |fd| IoctlFreezer.freeze(fd.as_fd()));
    let frozen_at = start.elapsed();
    for (index, (result, _)) in froze.iter().enumerate() {
        guard.frozen[index] = result.is_ok();
    }
    let all_frozen = froze.len() == fds.len() && froze.iter().all(|(r, _)| r.is_ok());
    let cloned = if all_frozen {
        at_once(&targets, |(image, target)| {
            quiesce_agent::reflink::clone_file(image, target).map(|_| ())
        })
    } else {
        Vec::new()
    };
    let thawed = at_once(&fds, |fd| IoctlFreezer.thaw(fd.as_fd()));
    let window = start.elapsed();
    for (index, (result, _)) in thawed.iter().enumerate() {
        if result.is_ok() {
            guard.frozen[index] = false;
        }
    }
    drop(guard);
    // Thawed: now failures may be reported.
    for (result, _) in &froze {
        if let Err(e) = result {
            panic!("floor FIFREEZE: {e}");
        }
    }
    for (result, _) in &cloned {
        if let Err(e) = result {
            panic!("floor FICLONE: {e}");
        }
    }
    for (_, target) in &targets {
        let _ = std::fs::remove_file(target);
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Round {
        window: ms(window),
        stall: ms(window),
        fifreeze: ms(frozen_at),
        parts: [0.0; 5],
    }
}

fn quiescectl(endpoint: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new(bin("quiescectl"))
        .args(["--insecure", "--endpoint", endpoint, "--json"])
        .args(args)
        .output()
        .expect("quiescectl");
    assert!(
        out.status.success(),
        "quiescectl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("quiescectl --json")
}

fn quiesce_round(endpoint: &str) -> Round {
    let set = quiescectl(endpoint, &["backup", "bank"]);
    let id = set["id"].as_str().expect("set id").to_owned();
    let set = quiescectl(endpoint, &["sets", "show", &id]);
    assert_eq!(set["state"], "consistent", "{set}");
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0) as f64;
    let hosts = set["hosts"].as_array().cloned().unwrap_or_default();
    let fifreeze = hosts
        .iter()
        .map(|h| n(&h["frozen_at_ms"]) - n(&h["freeze_started_at_ms"]))
        .fold(0.0, f64::max);
    let max_of = |key: &str| hosts.iter().map(|h| n(&h[key])).fold(0.0, f64::max);
    let min_of = |key: &str| {
        hosts
            .iter()
            .map(|h| n(&h[key]))
            .filter(|v| *v > 0.0)
            .fold(f64::MAX, f64::min)
    };
    let (first_snap, last_snap) = (
        n(&set["first_snapshot_started_at_ms"]),
        n(&set["last_snapshot_returned_at_ms"]),
    );
    let thaw_sent = max_of("thaw_sent_at_ms");
    Round {
        window: n(&set["freeze_window_ms"]),
        stall: n(&set["max_write_stall_ms"]),
        fifreeze,
        parts: [
            max_of("freeze_acked_at_ms") - min_of("freeze_sent_at_ms"),
            first_snap - max_of("freeze_acked_at_ms"),
            last_snap - first_snap,
            thaw_sent - last_snap,
            max_of("thaw_returned_at_ms") - thaw_sent,
        ],
    }
}

/// (median, p95, max) of `values`.
fn stats(values: &[f64]) -> (f64, f64, f64) {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.95), v[v.len() - 1])
}

struct Measured {
    config: String,
    quiesce: Vec<Round>,
    floor: Vec<Round>,
    settled: Vec<Round>,
    transfers: u64,
    load: (String, String),
}

fn run_config(hosts: usize, per_host: usize, args: &Args) -> Measured {
    let in_group = hosts * per_host / 2;
    let shards = in_group.max(2);
    let mut lab = Lab::new(&format!("bw{hosts}x{per_host}"), 8192);
    let mut servers = Vec::new();
    let mut layout: Vec<(Volume, Volume)> = Vec::new();
    for index in 0..shards {
        let mut volume = |name: String| {
            let mount = lab.volume(&name, 256);
            let image = lab.pool.join(format!("{name}.img"));
            Volume { name, mount, image }
        };
        let data = volume(format!("data{index}"));
        let wal = volume(format!("wal{index}"));
        servers.push(Pg::create(&mut lab, index, &data.mount, &wal.mount));
        layout.push((data, wal));
    }
    // Shard i of the group belongs to host i / (per_host / 2); shards past the group only
    // carry the load's other end.
    let mut members = String::new();
    let mut group_volumes = Vec::new();
    for host in 0..hosts {
        let owned: Vec<&(Volume, Volume)> = layout
            .iter()
            .enumerate()
            .filter(|(i, _)| *i < in_group && i / (per_host / 2) == host)
            .map(|(_, s)| s)
            .collect();
        let mounts: Vec<PathBuf> = owned
            .iter()
            .flat_map(|(d, w)| [d.mount.clone(), w.mount.clone()])
            .collect();
        let name = format!("db{host}");
        lab.spawn_agent(&name, 2 + host as u8, &mounts, "default-lease = \"10s\"");
        members.push_str(&format!(
            "[[group.member]]\nagent = \"{name}\"\nmounts = [{}]\n",
            mounts
                .iter()
                .map(|m| format!("{:?}", m.display().to_string()))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        for (d, w) in owned {
            group_volumes.push(d.clone());
            group_volumes.push(w.clone());
        }
    }
    let groups = format!(
        "[[group]]\nname = \"bank\"\nprovider = \"reflink\"\nlease = \"10s\"\nphase-timeout = \"10s\"\nfreeze-budget = \"8s\"\n{members}"
    );
    lab.start_coordinator(Some(&groups), &[]);
    let endpoint = lab.coordinator().endpoint();
    let clones = lab.pool.join("floor");
    std::fs::create_dir_all(&clones).unwrap();

    let workload = Workload::start(&servers, args.workers);
    std::thread::sleep(Duration::from_secs(1));
    let load_before = load_average();
    let (mut quiesce, mut floor, mut settled) = (Vec::new(), Vec::new(), Vec::new());
    // One warm-up of each, not counted (first connections, first clone into the pool).
    quiesce_round(&endpoint);
    floor_round(&group_volumes, &clones, usize::MAX, Prepare::Syncfs);
    for round in 0..args.rounds {
        for step in 0..3 {
            match (round + step) % 3 {
                0 => quiesce.push(quiesce_round(&endpoint)),
                1 => floor.push(floor_round(&group_volumes, &clones, round, Prepare::Syncfs)),
                _ => settled.push(floor_round(&group_volumes, &clones, round, Prepare::Settle)),
            }
            std::thread::sleep(args.pause);
        }
    }
    let load_after = load_average();
    let transfers = workload.finish();
    eprintln!("{hosts}x{per_host}: {transfers} transfers during the rounds");
    Measured {
        config: format!("{hosts} host(s) × {per_host} volumes"),
        quiesce,
        floor,
        settled,
        transfers,
        load: (load_before, load_after),
    }
}

fn main() {
    let args = parse_args();
    assert!(have_root("bench-window"));
    let mut results = Vec::new();
    for &(hosts, per_host) in &args.configs {
        eprintln!("{hosts} host(s) × {per_host} volumes: setting up");
        results.push(run_config(hosts, per_host, &args));
    }
    println!(
        "| configuration | approach | cut window median | p95 | max | max ÷ median | longest write stall median | FIFREEZE median (p95) |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for m in &results {
        for (name, rounds) in [
            ("Quiesce (`quiescectl backup`)", &m.quiesce),
            ("floor, `syncfs` before", &m.floor),
            (
                "floor, settled before (`syncfs` loop + checkpoint)",
                &m.settled,
            ),
        ] {
            let windows: Vec<f64> = rounds.iter().map(|r| r.window).collect();
            let stalls: Vec<f64> = rounds.iter().map(|r| r.stall).collect();
            let freezes: Vec<f64> = rounds.iter().map(|r| r.fifreeze).collect();
            let (med, p95, max) = stats(&windows);
            let (stall, _, _) = stats(&stalls);
            let (fz, fz95, _) = stats(&freezes);
            println!(
                "| {} | {name} ({} rounds) | {med:.1} | {p95:.1} | {max:.1} | {:.2} | {stall:.1} | {fz:.1} ({fz95:.1}) |",
                m.config,
                rounds.len(),
                max / med.max(0.001)
            );
        }
    }
    println!();
    println!(
        "| configuration (Quiesce, medians, ms) | {} |",
        PARTS.join(" | ")
    );
    println!("|---|{}", "---:|".repeat(PARTS.len()));
    for m in &results {
        let cells: Vec<String> = (0..PARTS.len())
            .map(|i| {
                let v: Vec<f64> = m.quiesce.iter().map(|r| r.parts[i]).collect();
                format!("{:.0}", stats(&v).0)
            })
            .collect();
        println!("| {} | {} |", m.config, cells.join(" | "));
    }
    println!();
    println!(
        "| configuration | Quiesce ÷ floor, median | p95 | Quiesce ÷ settled floor, median | p95 | floor FIFREEZE, settled ÷ syncfs | transfers | load average before → after |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---|");
    for m in &results {
        let w = |rounds: &[Round]| stats(&rounds.iter().map(|r| r.window).collect::<Vec<_>>());
        let f = |rounds: &[Round]| stats(&rounds.iter().map(|r| r.fifreeze).collect::<Vec<_>>());
        let (q, f0, s) = (w(&m.quiesce), w(&m.floor), w(&m.settled));
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} → {} |",
            m.config,
            q.0 / f0.0,
            q.1 / f0.1,
            q.0 / s.0,
            q.1 / s.1,
            f(&m.settled).0 / f(&m.floor).0.max(0.001),
            m.transfers,
            m.load.0,
            m.load.1
        );
    }
}
