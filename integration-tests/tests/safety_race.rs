//! Issue 10, finding 2: a symlink race never steers a freeze onto a filesystem the config does
//! not list, and no set is ever `consistent` while its volume was live.
//!
//! The listed volume is mounted at `pub/parent/mnt`; a victim loop filesystem at
//! `victim/mnt`. A racer swaps `pub/parent` for a symlink to `victim` and back as fast as it
//! can, while the test (acting as the coordinator) runs freeze → snapshot → thaw rounds against
//! the agent process and probes both filesystems in between:
//!
//! 1. as `nobody`, after `pub` became world-writable and `parent` nobody's (the layout of the
//!    finding): every freeze must be refused;
//! 2. as root in a root-owned tree (the path checks pass): every freeze must be refused or
//!    freeze the listed filesystem — the descriptor walk follows no symlink.
//!
//! In every round the victim must not be frozen, and a freeze the agent reports as held must
//! have held the listed filesystem frozen (else a snapshot of a live volume would be called
//! consistent).
//!
//! Cost: `QUIESCE_RACE_FREEZES` rounds per phase (default 1500): about 10 s for phase 1 (all
//! refused) and 30-60 s for phase 2 (a freeze, two probes, a reflink clone and a thaw per
//! successful round) on a loaded 2-CPU machine.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use quiesce_agent::mounts::DevId;
use quiesce_integration_tests::safety::{Racer, is_frozen, superblock};
use quiesce_integration_tests::{
    AGENT, AgentProcess, AgentToml, BindMount, COORDINATOR, FsKind, LoopFs, Pki, Pool, Scratch,
    Tmpfs, require_root, serial,
};
use quiesce_proto::agent::v1 as pb;
use quiesce_proto::agent::v1::agent_client::AgentClient;
use tonic::transport::Channel;

const NOBODY: u32 = 65534;

fn rounds() -> usize {
    std::env::var("QUIESCE_RACE_FREEZES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500)
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).expect("chown");
}

/// What the rounds of one phase saw.
#[derive(Default, Debug)]
struct Tally {
    refused: BTreeMap<String, usize>,
    froze_listed: usize,
    snapshots: usize,
    violations: Vec<String>,
}

struct Probes {
    /// A bind mount of the listed filesystem at a path the racer cannot touch.
    listed: PathBuf,
    listed_dev: DevId,
    victim: PathBuf,
    victim_dev: DevId,
}

async fn run_rounds(
    client: &mut AgentClient<Channel>,
    listed_path: &Path,
    probes: &Probes,
    phase: &str,
    count: usize,
) -> Tally {
    let mut tally = Tally::default();
    for round in 0..count {
        let set_id = format!("race-{phase}-{round}");
        let freeze = client
            .freeze_volumes(pb::FreezeVolumesRequest {
                set_id: set_id.clone(),
                mount_points: vec![listed_path.display().to_string()],
                lease_ms: 10_000,
                hooks: Vec::new(),
            })
            .await;
        match freeze {
            Err(status) => {
                let reason = refusal_kind(status.message());
                *tally
                    .refused
                    .entry(format!("{:?}: {reason}", status.code()))
                    .or_default() += 1;
            }
            Ok(_) => {
                let listed_frozen = is_frozen(&probes.listed, probes.listed_dev);
                let victim_frozen = is_frozen(&probes.victim, probes.victim_dev);
                let snapshot = client
                    .create_snapshots(pb::CreateSnapshotsRequest {
                        set_id: set_id.clone(),
                        mount_points: Vec::new(),
                        ..Default::default()
                    })
                    .await;
                let thaw = client
                    .thaw_volumes(pb::ThawVolumesRequest {
                        set_id: set_id.clone(),
                    })
                    .await
                    .expect("thaw")
                    .into_inner();
                if snapshot.is_ok() {
                    tally.snapshots += 1;
                    client
                        .delete_snapshots(pb::DeleteSnapshotsRequest {
                            set_id: set_id.clone(),
                            snapshot_ids: Vec::new(),
                        })
                        .await
                        .expect("delete the round's snapshots");
                }
                if victim_frozen {
                    tally
                        .violations
                        .push(format!("{set_id}: the victim filesystem was frozen"));
                }
                if !listed_frozen {
                    tally.violations.push(format!(
                        "{set_id}: the freeze succeeded but the listed filesystem was live"
                    ));
                    if snapshot.is_ok() && thaw.held_continuously {
                        tally.violations.push(format!(
                            "{set_id}: a snapshot of the live volume was reported held continuously (would be `consistent`)"
                        ));
                    }
                } else {
                    tally.froze_listed += 1;
                }
            }
        }
        if is_frozen(&probes.victim, probes.victim_dev) {
            tally
                .violations
                .push(format!("{set_id}: the victim is frozen after the round"));
            // Never leave it so: the test's own filesystem, thawed by the test.
            let _ = std::process::Command::new("fsfreeze")
                .arg("-u")
                .arg(&probes.victim)
                .status();
        }
    }
    tally
}

/// A refusal message without its per-round details, for counting.
fn refusal_kind(message: &str) -> String {
    for kind in [
        "writable by group or others",
        "is owned by uid",
        "is a symbolic link",
        "is not a mount point",
        "not a directory",
        "No such file",
    ] {
        if message.contains(kind) {
            return kind.into();
        }
    }
    message.chars().take(120).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_race_never_freezes_an_unlisted_filesystem() {
    let _serial = serial();
    if !require_root() {
        return;
    }
    let scratch = Scratch::new("symlink-race");
    chmod(scratch.path(), 0o755);
    let pki = Pki::new(&scratch.join("pki"));
    let state = Tmpfs::mount(&scratch.join("run"), 8);
    let mut pool = Pool::create(&scratch, 512);
    let public = scratch.mkdir("pub");
    let parent = scratch.mkdir("pub/parent");
    let listed_path = parent.join("mnt");
    let listed = pool.add_volume("listed", 64, &listed_path);
    let listed_dev = listed.dev();
    let probe_mount = BindMount::new(&listed_path, &scratch.join("listed-probe"));
    let victim_dir = scratch.mkdir("victim");
    let victim = LoopFs::create(
        &scratch.join("victim.img"),
        64,
        FsKind::Ext4,
        &victim_dir.join("mnt"),
    );
    let probes = Probes {
        listed: probe_mount.path().to_owned(),
        listed_dev: superblock(probe_mount.path()),
        victim: victim.mount_point().to_owned(),
        victim_dev: superblock(victim.mount_point()),
    };
    assert_eq!(probes.listed_dev, listed_dev);
    for dir in [scratch.path(), &public, &parent, &victim_dir] {
        chmod(dir, 0o755);
    }

    let agent = AgentProcess::start(
        scratch.path(),
        &AgentToml {
            state_dir: state.path().to_owned(),
            allowed_coordinators: vec![COORDINATOR.into()],
            tls: Some(pki.tls(AGENT)),
            volumes: vec![listed_path.clone()],
            snapshot_dir: Some(pool.root().join("snapshots")),
            top_level: "max-freeze = \"20s\"\n".into(),
            ..Default::default()
        },
    );
    let mut client = agent.client(&pki, COORDINATOR).await.expect("connect");
    // Sanity: with nobody racing, the listed volume freezes.
    let calm = run_rounds(&mut client, &listed_path, &probes, "calm", 3).await;
    assert_eq!(calm.froze_listed, 3, "{calm:?}\n{}", agent.log());

    // Phase 1: an unprivileged racer, after `pub` became world-writable and `parent` its own.
    chown(&parent, NOBODY);
    chmod(&public, 0o777);
    let started = Instant::now();
    let mut racer = Racer::start(&public, "parent", &victim_dir, Some(NOBODY));
    racer.wait_running();
    let count = rounds();
    let unprivileged = run_rounds(&mut client, &listed_path, &probes, "nobody", count).await;
    racer.stop();
    println!(
        "phase 1 (racer uid {NOBODY}, {count} freezes, {:.1} s): {unprivileged:?}",
        started.elapsed().as_secs_f64()
    );

    // Phase 2: a root racer in a root-owned tree: the walk itself must hold.
    chown(&parent, 0);
    chmod(&public, 0o755);
    let started = Instant::now();
    let mut racer = Racer::start(&public, "parent", &victim_dir, None);
    racer.wait_running();
    let privileged = run_rounds(&mut client, &listed_path, &probes, "root", count).await;
    racer.stop();
    println!(
        "phase 2 (root racer, {count} freezes, {:.1} s): {privileged:?}",
        started.elapsed().as_secs_f64()
    );

    assert!(
        unprivileged.violations.is_empty() && privileged.violations.is_empty(),
        "phase 1: {:#?}\nphase 2: {:#?}\n--- agent log (tail)\n{}",
        unprivileged.violations,
        privileged.violations,
        tail(&agent.log(), 40)
    );
    assert_eq!(
        unprivileged.froze_listed, 0,
        "a path a non-root user can redirect must be refused: {unprivileged:?}"
    );
    assert!(
        unprivileged
            .refused
            .keys()
            .all(|k| k.contains("writable by group or others") || k.contains("owned by uid")),
        "{unprivileged:?}"
    );
    assert!(
        privileged
            .refused
            .keys()
            .any(|k| k.contains("symbolic link")),
        "the root racer was never seen: {privileged:?}"
    );
    assert!(!is_frozen(&probes.victim, probes.victim_dev));
    assert!(!is_frozen(&probes.listed, probes.listed_dev));
    drop(client);
    drop(agent);
    let _ = Duration::ZERO;
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
