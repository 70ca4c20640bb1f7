//! The `reflink` provider on a real XFS reflink pool: a clone of a frozen volume's loop backing
//! file is the volume exactly as it was frozen. Needs root; skips without it (fails under
//! `CI=true`).

use std::fs;
use std::process::Stdio;
use std::time::{Duration, Instant};

use quiesce_agent::freeze::FreezeEnd;
use quiesce_agent::reflink::ReflinkProvider;
use quiesce_integration_tests::{
    AgentToml, InProcessAgent, Pool, Scratch, Tmpfs, proc_state, require_root, serial, tool,
};

/// `len` bytes of a deterministic pseudo-random pattern.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflink_snapshot_holds_exactly_the_bytes_at_the_freeze() {
    let _serial = serial();
    if !require_root() {
        return;
    }
    let scratch = Scratch::new("reflink");
    let state = Tmpfs::mount(&scratch.join("run"), 8);
    let mut pool = Pool::create(&scratch, 1024);
    let mount = scratch.join("vol");
    pool.add_volume("v", 128, &mount);
    let snapshots = pool.root().join("snapshots");
    let agent = InProcessAgent::new(
        &AgentToml {
            state_dir: state.path().to_owned(),
            volumes: vec![mount.clone()],
            snapshot_dir: Some(snapshots.clone()),
            ..Default::default()
        },
        &[pool.volume("v")],
    );
    let vol = pool.volume("v");

    // Marker A, on disk before the freeze.
    let mut marker_a = pattern(4 << 20, 7);
    marker_a.extend_from_slice(b"marker A");
    fs::write(vol.path("a.bin"), &marker_a).expect("write A");
    vol.sync();

    agent
        .manager
        .freeze(
            "snap-1",
            std::slice::from_ref(&mount),
            Some(Duration::from_secs(30)),
        )
        .await
        .expect("freeze");

    // Marker B, written by a child process while frozen: it must block until the thaw.
    let mut writer_b = tool("sh")
        .args(["-c", "printf 'marker B' > \"$1\" && sync \"$1\"", "sh"])
        .arg(vol.path("b.txt"))
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn the B writer");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        writer_b.try_wait().expect("try_wait").is_none(),
        "marker B was written while the volume was frozen"
    );
    assert_eq!(proc_state(writer_b.id()), Some('D'), "B writer not blocked");

    // The snapshot: FICLONE of the loop backing file, while frozen.
    let frozen = agent
        .manager
        .frozen_volumes("snap-1", &[])
        .await
        .expect("frozen volumes");
    assert_eq!(frozen.len(), 1);
    let (frozen_mount, _, backing) = &frozen[0];
    let backing = backing.clone().expect("a loop volume has a backing file");
    assert_eq!(backing, pool.root().join("v.img"));
    let provider = ReflinkProvider::new(Some(snapshots.clone()));
    let clone = provider
        .snapshot(
            "snap-1",
            frozen_mount,
            &backing,
            &agent.manager.frozen_devs(),
        )
        .expect("reflink snapshot");
    println!(
        "cloned {} MiB in {} ms: {}",
        clone.size_bytes >> 20,
        clone.duration_ms,
        clone.path.display()
    );
    assert!(clone.path.starts_with(snapshots.join("snap-1")));
    assert_eq!(clone.size_bytes, 128 << 20);
    assert!(agent.manager.is_frozen("snap-1").await);
    assert!(
        writer_b.try_wait().expect("try_wait").is_none(),
        "marker B landed before the thaw"
    );

    let report = agent.manager.thaw("snap-1").await;
    assert_eq!(report.end, FreezeEnd::Thawed, "{report:?}");
    assert!(report.held_continuously, "{report:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = writer_b.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "marker B never landed after the thaw"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "B writer: {status}");

    // The live volume has both markers.
    assert_eq!(fs::read(vol.path("a.bin")).expect("live A"), marker_a);
    assert_eq!(fs::read(vol.path("b.txt")).expect("live B"), b"marker B");

    // The clone, attached read-only (no journal replay could change it), has A and not B.
    let clone_fs = pool.attach(&clone.path, &scratch.join("clone"), true);
    assert_eq!(
        fs::read(clone_fs.path("a.bin")).expect("A in the clone"),
        marker_a,
        "the clone does not hold marker A as written before the freeze"
    );
    assert!(
        !clone_fs.path("b.txt").exists(),
        "the clone holds marker B, written after the freeze"
    );
    assert!(agent.freezer.violations().is_empty());
}
