//! The agent's freeze state machine (`FreezeManager`) on real loop filesystems, in this process:
//! the real FIFREEZE/FITHAW ioctls (behind the harness's `GuardedFreezer` interlock, which lets
//! them through only for the test's own devices), the real mount table, the freeze record on a
//! real tmpfs. Needs root; skips without it (fails under `CI=true`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use quiesce_agent::error::error_chain;
use quiesce_agent::freeze::FreezeEnd;
use quiesce_integration_tests::{
    AgentToml, BindMount, FsKind, InProcessAgent, LoopFs, Scratch, Tmpfs, Writer, require_root,
    serial, unix_ns, write_completes_within,
};

/// An in-process agent allowed to freeze ext4 loop volumes named `names`, its state directory
/// on a tmpfs. Fields drop in order: the agent, then the volumes (thawed, unmounted), the tmpfs
/// and the scratch directory.
struct Fixture {
    agent: InProcessAgent,
    vols: Vec<LoopFs>,
    _state: Tmpfs,
    _scratch: Scratch,
}

impl Fixture {
    fn new(tag: &str, names: &[&str]) -> Fixture {
        let scratch = Scratch::new(tag);
        let state = Tmpfs::mount(&scratch.join("run"), 8);
        let vols: Vec<LoopFs> = names
            .iter()
            .map(|name| {
                LoopFs::create(
                    &scratch.join(format!("{name}.img")),
                    64,
                    FsKind::Ext4,
                    &scratch.join(name),
                )
            })
            .collect();
        let toml = AgentToml {
            state_dir: state.path().to_owned(),
            volumes: vols.iter().map(|v| v.mount_point().to_owned()).collect(),
            ..Default::default()
        };
        let owned: Vec<&LoopFs> = vols.iter().collect();
        let agent = InProcessAgent::new(&toml, &owned);
        Fixture {
            agent,
            vols,
            _state: state,
            _scratch: scratch,
        }
    }

    fn mounts(&self, indices: &[usize]) -> Vec<PathBuf> {
        indices
            .iter()
            .map(|&i| self.vols[i].mount_point().to_owned())
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeze_blocks_writers_until_thaw() {
    let _serial = serial();
    if !require_root() {
        return;
    }
    let fx = Fixture::new("freeze-blocks", &["a"]);
    let vol = &fx.vols[0];
    let writer = Writer::start(&vol.path("writer.log"), true);
    assert!(
        writer.wait_for_count(20, Duration::from_secs(10)),
        "the writer never got going"
    );

    let info = fx
        .agent
        .manager
        .freeze("blocks-1", &fx.mounts(&[0]), Some(Duration::from_secs(30)))
        .await
        .expect("freeze");
    assert!(info.frozen_at_ms >= info.freeze_started_at_ms, "{info:?}");
    assert!(vol.is_frozen(), "not frozen after freeze() returned");
    assert_eq!(
        fx.agent.records().len(),
        1,
        "no freeze record on the tmpfs while frozen"
    );

    // A write that returned just before the freeze may still be reported; after that, none.
    std::thread::sleep(Duration::from_millis(100));
    let confirmed_ns = unix_ns();
    let before = writer.count();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(writer.count(), before, "writes completed while frozen");
    assert_eq!(
        writer.state(),
        Some('D'),
        "the writer is not blocked in uninterruptible sleep"
    );

    let thaw_called_ns = unix_ns();
    let report = fx.agent.manager.thaw("blocks-1").await;
    assert_eq!(report.end, FreezeEnd::Thawed, "{report:?}");
    assert!(report.held_continuously, "{report:?}");
    assert!(
        writer.wait_for_count(before + 20, Duration::from_secs(10)),
        "the writer did not resume after the thaw"
    );
    assert!(!vol.is_frozen(), "still frozen after thaw()");
    assert!(
        fx.agent.records().is_empty(),
        "freeze record left after the thaw"
    );

    let run = writer.stop();
    // Every write reported by `confirmed_ns` finished before it; the next one only after FITHAW.
    let frozen = Duration::from_nanos(thaw_called_ns - confirmed_ns);
    let stall = run.longest_gap();
    println!(
        "write stall: {} ms measured by the writer (longest single write {} ms); \
         frozen for at least {} ms as the test saw it; agent-reported stall {} ms",
        stall.as_millis(),
        run.longest_write().as_millis(),
        frozen.as_millis(),
        report.write_stall_ms
    );
    assert!(
        stall >= frozen,
        "longest gap {stall:?} shorter than the frozen time {frozen:?}"
    );
    assert!(
        stall < frozen + Duration::from_secs(2),
        "writes resumed late: gap {stall:?}, frozen {frozen:?}"
    );
    assert_eq!(
        run.completed_between(confirmed_ns, thaw_called_ns),
        0,
        "a write completed while frozen"
    );
    assert!(
        Duration::from_millis(report.write_stall_ms) >= frozen,
        "the agent reports a stall of {} ms, shorter than {frozen:?}",
        report.write_stall_ms
    );
    assert!(fx.agent.freezer.violations().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_freeze_failure_thaws_what_was_frozen() {
    let _serial = serial();
    if !require_root() {
        return;
    }
    // Freeze order is by mount point: a first, then b.
    let fx = Fixture::new("partial", &["a", "b"]);
    let (a, b) = (&fx.vols[0], &fx.vols[1]);
    b.freeze_externally();

    let err = fx
        .agent
        .manager
        .freeze("partial-1", &fx.mounts(&[0, 1]), None)
        .await
        .expect_err("a freeze of an already frozen volume must fail");
    let message = error_chain(&err);
    assert!(
        message.contains("frozen by someone other"),
        "error does not say who froze it: {message}"
    );
    assert!(
        message.contains(&b.mount_point().display().to_string()),
        "error does not name {}: {message}",
        b.mount_point().display()
    );
    assert_eq!(
        fx.agent.freezer.calls(),
        vec![("freeze", a.dev()), ("freeze", b.dev()), ("thaw", a.dev())],
        "expected: freeze a, freeze b (EBUSY), thaw a — and never a thaw of b"
    );

    assert!(
        write_completes_within(&a.path("probe"), Duration::from_secs(5)),
        "a write to a did not complete: a was left frozen"
    );
    assert!(!a.is_frozen(), "a was left frozen");
    assert!(
        b.is_frozen(),
        "b, frozen by someone else, was thawed by the agent"
    );
    assert!(fx.agent.records().is_empty(), "freeze record left behind");
    assert!(fx.agent.manager.held().await.is_empty());

    // The other party lets go; a new set then freezes both.
    assert!(b.thaw_externally(), "fsfreeze -u b");
    fx.agent
        .manager
        .freeze("partial-2", &fx.mounts(&[0, 1]), None)
        .await
        .expect("freeze once b is free");
    assert!(a.is_frozen() && b.is_frozen());
    let report = fx.agent.manager.thaw("partial-2").await;
    assert!(report.held_continuously, "{report:?}");
    assert!(!a.is_frozen() && !b.is_frozen());
    assert!(fx.agent.freezer.violations().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thaw_of_a_never_frozen_set_is_harmless() {
    let _serial = serial();
    if !require_root() {
        return;
    }
    let fx = Fixture::new("thaw-unknown", &["a", "b"]);
    let (a, b) = (&fx.vols[0], &fx.vols[1]);
    // a: held by a set of ours; b: frozen by someone else.
    fx.agent
        .manager
        .freeze("held-1", &fx.mounts(&[0]), Some(Duration::from_secs(30)))
        .await
        .expect("freeze a");
    b.freeze_externally();
    let calls = fx.agent.freezer.calls().len();

    for _ in 0..2 {
        let report = fx.agent.manager.thaw("nope").await;
        assert_eq!(report.end, FreezeEnd::UnknownSet, "{report:?}");
        assert!(!report.held_continuously, "{report:?}");
        assert_eq!(report.write_stall_ms, 0, "{report:?}");
    }
    assert_eq!(
        fx.agent.freezer.calls().len(),
        calls,
        "a thaw of an unknown set issued ioctls"
    );
    assert!(
        a.is_frozen(),
        "our set's volume was thawed by a thaw of another set"
    );
    assert!(b.is_frozen(), "someone else's freeze was thawed");
    let held: Vec<String> = fx
        .agent
        .manager
        .held()
        .await
        .into_iter()
        .map(|h| h.set_id)
        .collect();
    assert_eq!(held, ["held-1"]);
    assert_eq!(fx.agent.records().len(), 1);

    let report = fx.agent.manager.thaw("held-1").await;
    assert_eq!(report.end, FreezeEnd::Thawed, "{report:?}");
    assert!(report.held_continuously);
    assert!(!a.is_frozen());
    assert!(
        b.is_frozen(),
        "thawing our set thawed someone else's freeze"
    );
    // A repeated thaw gets the same answer and touches nothing.
    let calls = fx.agent.freezer.calls().len();
    assert_eq!(fx.agent.manager.thaw("held-1").await, report);
    assert_eq!(fx.agent.freezer.calls().len(), calls);
    assert!(b.thaw_externally(), "fsfreeze -u b");
    assert!(fx.agent.freezer.violations().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expiry_thaws_and_reports_it() {
    let _serial = serial();
    if !require_root() {
        return;
    }
    let fx = Fixture::new("lease", &["a"]);
    let vol = &fx.vols[0];
    let writer = Writer::start(&vol.path("writer.log"), false);
    assert!(writer.wait_for_count(20, Duration::from_secs(10)));

    let lease = Duration::from_millis(300);
    let started = Instant::now();
    let info = fx
        .agent
        .manager
        .freeze("lease-1", &fx.mounts(&[0]), Some(lease))
        .await
        .expect("freeze");
    let granted = info.lease_deadline_ms - info.frozen_at_ms;
    assert!(
        (250..=350).contains(&granted),
        "lease of {granted} ms granted"
    );
    assert!(vol.is_frozen());
    let before = writer.count();

    // Nobody thaws: the lease must.
    assert!(
        writer.wait_for_count(before + 20, Duration::from_secs(3)),
        "the writer is still blocked 3 s after a {lease:?} lease"
    );
    let resumed = started.elapsed();
    assert!(resumed >= lease, "writes resumed after {resumed:?}");
    assert!(!vol.is_frozen(), "still frozen after the lease ran out");
    assert!(
        fx.agent.manager.held().await.is_empty(),
        "the expired set is still listed as held"
    );
    assert!(fx.agent.records().is_empty(), "freeze record left behind");

    let report = fx.agent.manager.thaw("lease-1").await;
    assert_eq!(report.end, FreezeEnd::LeaseExpired, "{report:?}");
    assert!(!report.held_continuously, "{report:?}");
    assert!(
        (300..1500).contains(&report.write_stall_ms),
        "stall {} ms",
        report.write_stall_ms
    );
    let err = fx
        .agent
        .manager
        .renew("lease-1", None)
        .await
        .expect_err("renewing an expired lease must fail");
    assert!(error_chain(&err).contains("lease-expired"), "{err}");

    let run = writer.stop();
    let stall = run.longest_gap();
    println!(
        "lease {} ms: writes stalled {} ms, resumed {} ms after the freeze call; agent reports {} ms",
        lease.as_millis(),
        stall.as_millis(),
        resumed.as_millis(),
        report.write_stall_ms
    );
    assert!(stall >= lease, "stall {stall:?} shorter than the lease");
    assert!(stall < Duration::from_millis(1500), "stall {stall:?}");
    assert!(fx.agent.freezer.violations().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals() {
    let _serial = serial();
    if !require_root() {
        return;
    }
    let scratch = Scratch::new("refusals");
    let state = Tmpfs::mount(&scratch.join("run"), 8);
    let other_tmpfs = Tmpfs::mount(&scratch.join("tmpfs"), 8);
    let a = LoopFs::create(&scratch.join("a.img"), 64, FsKind::Ext4, &scratch.join("a"));
    let unlisted = LoopFs::create(
        &scratch.join("unlisted.img"),
        64,
        FsKind::Ext4,
        &scratch.join("unlisted"),
    );
    let st = LoopFs::create(
        &scratch.join("st.img"),
        64,
        FsKind::Ext4,
        &scratch.join("st"),
    );
    let alias = BindMount::new(a.mount_point(), &scratch.join("alias"));
    let plain_dir = scratch.mkdir("plain-dir");

    let toml = AgentToml {
        state_dir: state.path().to_owned(),
        volumes: vec![
            "/".into(),
            other_tmpfs.path().to_owned(),
            state.path().to_owned(),
            a.mount_point().to_owned(),
            plain_dir.clone(),
        ],
        ..Default::default()
    };
    let agent = InProcessAgent::new(&toml, &[&a, &unlisted, &st]);
    let root = PathBuf::from("/");
    let cases: Vec<(&str, Vec<PathBuf>, PathBuf, &str)> = vec![
        (
            "root",
            vec![root.clone()],
            root.clone(),
            "is the root filesystem",
        ),
        (
            "tmpfs",
            vec![other_tmpfs.path().to_owned()],
            other_tmpfs.path().to_owned(),
            "is tmpfs, which cannot be frozen",
        ),
        (
            "not-allowed",
            vec![unlisted.mount_point().to_owned()],
            unlisted.mount_point().to_owned(),
            "is not an allowed volume of this agent",
        ),
        (
            "bind-alias",
            vec![alias.path().to_owned()],
            alias.path().to_owned(),
            "is not an allowed volume of this agent",
        ),
        (
            "state-dir",
            vec![state.path().to_owned()],
            state.path().to_owned(),
            "holds the agent's state directory",
        ),
        (
            "not-a-mount",
            vec![plain_dir.clone()],
            plain_dir.clone(),
            "is not a mount point",
        ),
        (
            // All or nothing: one bad mount refuses the whole request before any freeze.
            "mixed",
            vec![a.mount_point().to_owned(), root.clone()],
            root.clone(),
            "is the root filesystem",
        ),
    ];
    for (name, mounts, culprit, needle) in &cases {
        let err = agent
            .manager
            .freeze(&format!("refuse-{name}"), mounts, None)
            .await
            .expect_err(&format!("{name}: freezing {mounts:?} must be refused"));
        let message = error_chain(&err);
        println!("{name}: {message}");
        assert!(message.contains(needle), "{name}: {message}");
        assert!(
            message.contains(&culprit.display().to_string()),
            "{name}: the message does not name {}: {message}",
            culprit.display()
        );
        let err = agent
            .manager
            .prepare(&format!("refuse-{name}"), mounts)
            .await
            .expect_err(&format!("{name}: preparing {mounts:?} must be refused"));
        assert!(error_chain(&err).contains(needle), "{name}: {err}");
    }

    // A second agent whose state directory lives on an ext4 volume it is allowed to freeze.
    let st_state = st.path("agent-state");
    std::fs::create_dir_all(&st_state).expect("mkdir");
    let st_agent = InProcessAgent::new(
        &AgentToml {
            state_dir: st_state,
            volumes: vec![st.mount_point().to_owned()],
            ..Default::default()
        },
        &[&st],
    );
    let err = st_agent
        .manager
        .freeze("refuse-own-state", &[st.mount_point().to_owned()], None)
        .await
        .expect_err("freezing the filesystem of the agent's own state dir must be refused");
    let message = error_chain(&err);
    println!("state dir on ext4: {message}");
    assert!(
        message.contains("holds the agent's state directory"),
        "{message}"
    );

    for agent in [&agent, &st_agent] {
        assert_eq!(
            agent.freezer.calls(),
            vec![],
            "a refused request reached FIFREEZE"
        );
        assert_eq!(agent.freezer.violations(), Vec::<String>::new());
        assert!(agent.manager.held().await.is_empty());
        assert!(agent.records().is_empty(), "freeze record left behind");
    }
    for fs in [&a, &unlisted, &st] {
        assert!(!fs.is_frozen(), "{} is frozen", fs.mount_point().display());
    }
}
