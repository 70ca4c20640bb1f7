//! The real binaries over mTLS, as an operator runs them: `quiesce-agent`, `quiesce-coordinator`
//! and `quiescectl` on 127.0.0.1, ext4 volumes in an XFS reflink pool. Build the binaries first
//! (`cargo build --workspace --bins`). The tests that freeze need root and skip without it
//! (fail under `CI=true`); `client_from_another_ca_is_refused` runs anywhere.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use quiesce_integration_tests::{
    AGENT, AgentToml, COORDINATOR, Cluster, ClusterOptions, CoordinatorProcess, OPERATOR, Pki,
    Scratch, Writer, agent_table, all_text, bin, describe, free_port, group_table, require_root,
    run_with_timeout, serial, write_completes_within,
};
use quiesce_proto::agent::v1 as pb;
use serde_json::Value;
use tonic::Code;

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

fn str_of<'a>(value: &'a Value, key: &str) -> &'a str {
    value[key].as_str().unwrap_or_default()
}

fn phases(set: &Value) -> Vec<String> {
    set["phases"]
        .as_array()
        .map(|p| p.iter().map(|m| str_of(m, "phase").to_owned()).collect())
        .unwrap_or_default()
}

/// `.img` files left in `<snapshot dir>/<set>/`.
fn snapshot_files(dir: &Path, set: &str) -> Vec<PathBuf> {
    fs::read_dir(dir.join(set))
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

#[test]
fn backup_is_consistent_and_restores() {
    let _serial = serial();
    if !require_root() {
        return;
    }
    let mut cluster = Cluster::start("backup", &ClusterOptions::default());
    let before: Vec<(&str, &str, Vec<u8>)> = vec![
        ("a", "data.bin", pattern(3 << 20, 1)),
        ("a", "marker.txt", b"A before the backup".to_vec()),
        ("b", "data.bin", pattern(1 << 20, 2)),
        (
            "b",
            "nested/dir/marker.txt",
            b"B before the backup".to_vec(),
        ),
    ];
    for (vol, name, bytes) in &before {
        let path = cluster.volume(vol).path(name);
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(&path, bytes).expect("write");
    }
    // A writer on a, running through the backup (no sync: prepare's syncfs and FIFREEZE flush).
    let writer = Writer::start(&cluster.volume("a").path("writer.log"), false);
    assert!(writer.wait_for_count(20, Duration::from_secs(10)));

    let ctl = cluster.ctl();
    let (out, set) = ctl.json(&["backup", "g"]);
    assert!(out.status.success(), "backup: {}", describe(&out));
    assert_eq!(str_of(&set, "state"), "consistent", "{set:#}");
    let id = str_of(&set, "id").to_owned();
    let window = set["freeze_window_ms"].as_u64().unwrap_or(0);
    assert!(window > 0, "freeze_window_ms: {set:#}");
    let hosts = set["hosts"].as_array().expect("hosts");
    assert_eq!(hosts.len(), 1, "{set:#}");
    assert_eq!(hosts[0]["held_continuously"], Value::Bool(true), "{set:#}");
    assert_eq!(str_of(&hosts[0], "freeze_end"), "thawed", "{set:#}");
    let volumes = set["volumes"].as_array().expect("volumes");
    assert_eq!(volumes.len(), 2, "{set:#}");
    for volume in volumes {
        let snapshot = PathBuf::from(str_of(volume, "snapshot_id"));
        assert!(
            snapshot.starts_with(cluster.snapshot_dir().join(&id)) && snapshot.is_file(),
            "snapshot {} missing: {set:#}",
            snapshot.display()
        );
    }
    let reached = phases(&set);
    for phase in ["freezing", "snapshotting", "thawing", "committed"] {
        assert!(
            reached.iter().any(|p| p == phase),
            "no {phase} in {reached:?}"
        );
    }
    let count = writer.count();
    assert!(
        writer.wait_for_count(count + 20, Duration::from_secs(10)),
        "writes did not resume after the backup"
    );
    cluster.assert_nothing_frozen("after the backup");

    // Changes after the backup must not be in what is restored.
    fs::write(cluster.volume("a").path("marker.txt"), "A after the backup").expect("write");
    fs::write(cluster.volume("b").path("after.txt"), "late").expect("write");

    let (out, list) = ctl.json(&["sets", "list"]);
    assert!(out.status.success(), "{}", describe(&out));
    let listed = list["sets"].as_array().expect("sets");
    assert!(
        listed
            .iter()
            .any(|s| str_of(s, "id") == id && str_of(s, "state") == "consistent"),
        "{id} not listed: {list:#}"
    );
    let (out, shown) = ctl.json(&["sets", "show", &id]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(str_of(&shown, "state"), "consistent");
    let (out, groups) = ctl.json(&["groups"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(str_of(&groups["groups"][0], "last_consistent_set"), id);

    // The catalog row, read straight from SQLite.
    let db = rusqlite::Connection::open_with_flags(
        cluster.coordinator.catalog(),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open the catalog read-only");
    let (state, catalog_window): (String, i64) = db
        .query_row(
            "SELECT state, freeze_window_ms FROM sets WHERE id = ?1",
            [&id],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .expect("catalog row of the set");
    assert_eq!(state, "consistent");
    assert_eq!(catalog_window as u64, window);
    let snapshots: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM set_volumes WHERE set_id = ?1 AND snapshot_id != ''",
            [&id],
            |row| row.get(0),
        )
        .expect("count snapshots");
    assert_eq!(snapshots, 2);
    drop(db);

    // Restore into the pool (reflink clones) and compare.
    let target = cluster.pool.root().join("restore");
    let (out, restored) = ctl.json(&[
        "restore",
        &id,
        "--target-dir",
        target.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "restore: {}", describe(&out));
    let images = restored["volumes"].as_array().expect("volumes").clone();
    assert_eq!(images.len(), 2, "{restored:#}");
    let mount_a = cluster.mount("a");
    let mount_b = cluster.mount("b");
    for image in &images {
        let path = PathBuf::from(str_of(image, "image_path"));
        assert!(path.starts_with(&target) && path.is_file(), "{image:#}");
        assert_eq!(
            image["cloned"],
            Value::Bool(true),
            "not a reflink clone: {image:#}"
        );
        let mount_point = PathBuf::from(str_of(image, "mount_point"));
        let name = if mount_point == mount_a {
            "a"
        } else if mount_point == mount_b {
            "b"
        } else {
            panic!("restored an unknown mount {}", mount_point.display())
        };
        let at = cluster.scratch.join("restored").join(name);
        let fs = cluster.pool.attach(&path, &at, true);
        for (vol, file, bytes) in before.iter().filter(|(v, _, _)| *v == name) {
            let got = fs::read(fs.path(file)).unwrap_or_else(|e| panic!("{vol}/{file}: {e}"));
            assert!(got == *bytes, "{vol}/{file} differs in the restored image");
        }
        assert!(
            !fs.path("after.txt").exists(),
            "a file written after the backup was restored"
        );
    }

    let run = writer.stop();
    let marks = set["phases"].as_array().expect("phases");
    let start = marks.first().and_then(|m| m["at_ms"].as_u64()).unwrap_or(0);
    let timeline: Vec<String> = marks
        .iter()
        .map(|m| {
            let at = m["at_ms"].as_u64().unwrap_or(0).saturating_sub(start);
            format!("{}@{at}ms", str_of(m, "phase"))
        })
        .collect();
    println!("backup {id} phases: {}", timeline.join(" "));
    println!(
        "backup {id}: freeze window {window} ms, agent-reported stall {} ms, writer's longest gap {} ms",
        set["max_write_stall_ms"],
        run.longest_gap().as_millis()
    );
}

#[test]
fn client_from_another_ca_is_refused() {
    let _serial = serial();
    let scratch = Scratch::new("other-ca");
    let pki = Pki::new(&scratch.join("pki"));
    let rogue = Pki::new(&scratch.join("rogue-pki"));
    // No agent needs to run: a set that started at all would show up in `sets list`.
    let body = format!(
        "{}{}",
        agent_table(AGENT, free_port()),
        group_table(
            "g",
            None,
            &[(AGENT, &[Path::new("/srv/quiesce-it-nowhere")][..])]
        )
    );
    let coordinator = CoordinatorProcess::start(scratch.path(), &pki, &body);
    let good = coordinator.ctl();
    let (out, _) = good.json(&["groups"]);
    assert!(
        out.status.success(),
        "the real operator is refused: {}",
        describe(&out)
    );

    // An operator certificate from another CA (trusting the right CA for the server).
    let foreign = coordinator.ctl_as(&pki.ca(), &rogue.cert(OPERATOR), &rogue.key(OPERATOR));
    let out = foreign.run(&["backup", "g"]);
    println!(
        "foreign operator: {} ({})",
        all_text(&out).trim(),
        out.status
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "a foreign client must get exit 3 (credentials refused): {}",
        describe(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("rejected this client's TLS certificate"),
        "{}",
        describe(&out)
    );
    // Another CA altogether: the client does not trust the coordinator either.
    let stranger = coordinator.ctl_as(&rogue.ca(), &rogue.cert(OPERATOR), &rogue.key(OPERATOR));
    let out = stranger.run(&["backup", "g"]);
    println!("stranger: {} ({})", all_text(&out).trim(), out.status);
    assert!(!out.status.success(), "{}", describe(&out));

    // Right CA, wrong role: agents and coordinators are not operators.
    for identity in [AGENT, COORDINATOR] {
        let ctl = coordinator.ctl_as(&pki.ca(), &pki.cert(identity), &pki.key(identity));
        for args in [&["backup", "g"][..], &["sets", "list"][..]] {
            let out = ctl.run(args);
            assert_eq!(
                out.status.code(),
                Some(3),
                "{identity} {args:?}: {}",
                describe(&out)
            );
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("is not an operator"),
                "{identity} {args:?}: {}",
                describe(&out)
            );
        }
    }

    let (out, list) = good.json(&["sets", "list"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        list["sets"],
        Value::Array(vec![]),
        "a refused client started a set: {list:#}"
    );
    assert!(
        !coordinator.log().contains("phase"),
        "the coordinator ran a set:\n{}",
        coordinator.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_not_named_by_the_agent_is_refused() {
    let _serial = serial();
    if !require_root() {
        return;
    }
    let options = ClusterOptions {
        allowed_coordinators: vec!["other".into()],
        ..Default::default()
    };
    let cluster = Cluster::start("not-named", &options);
    let (out, set) = cluster.ctl().json(&["backup", "g"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_eq!(str_of(&set, "state"), "failed", "{set:#}");
    let error = str_of(&set, "error");
    assert!(
        error.contains("not a coordinator this agent obeys") && error.contains(AGENT),
        "{error}"
    );
    let reached = phases(&set);
    assert!(!reached.iter().any(|p| p == "freezing"), "{reached:?}");
    assert_eq!(set["freeze_window_ms"], 0);
    cluster.assert_nothing_frozen("after the refused backup");

    // Straight at the agent's API: the same certificate, and an operator's, are refused.
    for identity in [COORDINATOR, OPERATOR] {
        let mut client = cluster
            .agent
            .client(&cluster.pki, identity)
            .await
            .expect("TLS connection (same CA)");
        let status = client
            .freeze_volumes(pb::FreezeVolumesRequest {
                set_id: "not-named-1".into(),
                mount_points: vec![cluster.mount("a").display().to_string()],
                lease_ms: 1000,
                hooks: Vec::new(),
            })
            .await
            .expect_err("an unlisted peer must not freeze");
        assert_eq!(
            status.code(),
            Code::PermissionDenied,
            "{identity}: {status:?}"
        );
        assert!(
            status
                .message()
                .contains("not a coordinator this agent obeys"),
            "{identity}: {status:?}"
        );
    }
    cluster.assert_nothing_frozen("after the refused freeze calls");
}

#[test]
fn bad_input_gets_clear_messages() {
    let _serial = serial();
    if !require_root() {
        return;
    }
    let options = ClusterOptions {
        unlisted_volumes: vec!["c".into()],
        groups: vec![
            ("g".into(), vec!["a".into(), "b".into()]),
            ("g2".into(), vec!["c".into()]),
        ],
        ..Default::default()
    };
    let cluster = Cluster::start("bad-input", &options);
    let ctl = cluster.ctl();
    let stderr = |out: &std::process::Output| String::from_utf8_lossy(&out.stderr).into_owned();

    let out = ctl.run(&["backup", "nope"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        stderr(&out).contains("unknown group nope (configured: g, g2)"),
        "{}",
        describe(&out)
    );
    cluster.assert_nothing_frozen("after an unknown group");

    for args in [
        &["sets", "show", "nope"][..],
        &["sets", "delete", "nope"][..],
        &["restore", "nope", "--target-dir", "/var/tmp"][..],
    ] {
        let out = ctl.run(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", describe(&out));
        assert!(
            stderr(&out).contains("unknown set nope"),
            "{args:?}: {}",
            describe(&out)
        );
    }

    // A group member mount the agent does not allow: the set fails at plan, naming the mount.
    let c = cluster.mount("c");
    let (out, set) = ctl.json(&["backup", "g2"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_eq!(str_of(&set, "state"), "failed", "{set:#}");
    let error = str_of(&set, "error");
    assert!(
        error.starts_with("plan:")
            && error.contains(&c.display().to_string())
            && error.contains("not an allowed volume"),
        "{error}"
    );
    assert!(!phases(&set).iter().any(|p| p == "freezing"), "{set:#}");
    cluster.assert_nothing_frozen("after a plan failure");

    // Agent configs.
    let agent_bin = bin("quiesce-agent");
    let check_config = |config: &Path| {
        run_with_timeout(
            Command::new(&agent_bin)
                .arg("check-config")
                .arg("--config")
                .arg(config),
            Duration::from_secs(30),
        )
    };
    let state_dir = cluster.state.join("agent-bad");
    fs::create_dir_all(&state_dir).expect("mkdir");
    let root_volume = AgentToml {
        listen: Some(std::net::SocketAddr::from(([127, 0, 0, 1], free_port()))),
        state_dir,
        allowed_coordinators: vec![COORDINATOR.into()],
        tls: Some(cluster.pki.tls(AGENT)),
        volumes: vec!["/".into(), cluster.mount("a")],
        ..Default::default()
    };
    let root_config = cluster.scratch.join("root-volume.toml");
    fs::write(&root_config, root_volume.render()).expect("write");
    let out = check_config(&root_config);
    println!("check-config with /: {}", stderr(&out).trim());
    assert_eq!(out.status.code(), Some(64), "{}", describe(&out));
    assert!(
        stderr(&out).contains("root filesystem"),
        "{}",
        describe(&out)
    );
    let out = run_with_timeout(
        Command::new(&agent_bin)
            .arg("run")
            .arg("--config")
            .arg(&root_config),
        Duration::from_secs(30),
    );
    assert_eq!(
        out.status.code(),
        Some(64),
        "run with / as a volume: {}",
        describe(&out)
    );
    assert!(
        all_text(&out).contains("root filesystem"),
        "{}",
        describe(&out)
    );

    let missing = cluster.scratch.join("no-such-agent.toml");
    let out = check_config(&missing);
    assert_eq!(out.status.code(), Some(64), "{}", describe(&out));
    assert!(
        stderr(&out).contains(&format!("cannot read config file {}", missing.display())),
        "{}",
        describe(&out)
    );

    let typo = cluster.scratch.join("typo-agent.toml");
    let with_typo = AgentToml {
        state_dir: cluster.state.join("agent"),
        top_level: "max-frezee = \"5s\"".into(),
        ..Default::default()
    };
    fs::write(&typo, with_typo.render()).expect("write");
    let out = check_config(&typo);
    println!("check-config with a typo: {}", stderr(&out).trim());
    assert_eq!(out.status.code(), Some(64), "{}", describe(&out));
    assert!(
        stderr(&out).contains(&typo.display().to_string()) && stderr(&out).contains("max-frezee"),
        "{}",
        describe(&out)
    );

    // Coordinator configs.
    let coordinator_bin = bin("quiesce-coordinator");
    let check_coordinator = |config: &Path| {
        run_with_timeout(
            Command::new(&coordinator_bin)
                .arg("check-config")
                .arg("--config")
                .arg(config),
            Duration::from_secs(30),
        )
    };
    let missing = cluster.scratch.join("no-such-coordinator.toml");
    let out = check_coordinator(&missing);
    assert_eq!(out.status.code(), Some(64), "{}", describe(&out));
    assert!(
        stderr(&out).contains(&format!("cannot read config file {}", missing.display())),
        "{}",
        describe(&out)
    );
    let typo = cluster.scratch.join("typo-coordinator.toml");
    let good = fs::read_to_string(cluster.scratch.join("coordinator.toml")).expect("read");
    fs::write(
        &typo,
        good.replacen(
            "provider = \"reflink\"",
            "provider = \"reflink\"\nleese = \"1s\"",
            1,
        ),
    )
    .expect("write");
    let out = check_coordinator(&typo);
    println!(
        "coordinator check-config with a typo: {}",
        stderr(&out).trim()
    );
    assert_eq!(out.status.code(), Some(64), "{}", describe(&out));
    assert!(
        stderr(&out).contains(&typo.display().to_string()) && stderr(&out).contains("leese"),
        "{}",
        describe(&out)
    );

    cluster.assert_nothing_frozen("after the config checks");
    // None of that wedged anything: a real backup still works.
    let (out, set) = ctl.json(&["backup", "g"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(str_of(&set, "state"), "consistent", "{set:#}");
    cluster.assert_nothing_frozen("after the final backup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expiry_over_grpc_reports_the_freeze_as_not_held() {
    let _serial = serial();
    if !require_root() {
        return;
    }
    let cluster = Cluster::start("lease-grpc", &ClusterOptions::default());
    let mut client = cluster
        .agent
        .client(&cluster.pki, COORDINATOR)
        .await
        .expect("connect to the agent as the coordinator");
    let set_id = "lease-grpc-1".to_string();
    let mounts = vec![cluster.mount("a").display().to_string()];

    let frozen = client
        .freeze_volumes(pb::FreezeVolumesRequest {
            set_id: set_id.clone(),
            mount_points: mounts.clone(),
            lease_ms: 200,
            hooks: Vec::new(),
        })
        .await
        .expect("freeze")
        .into_inner();
    let granted = frozen.lease_deadline_ms - frozen.frozen_at_ms;
    assert!(
        (150..=250).contains(&granted),
        "lease of {granted} ms: {frozen:?}"
    );
    assert!(
        cluster.volume("a").is_frozen(),
        "not frozen after FreezeVolumes"
    );
    let info = client
        .get_host_info(pb::GetHostInfoRequest {})
        .await
        .expect("host info")
        .into_inner();
    assert!(info.freezes.iter().any(|f| f.set_id == set_id), "{info:?}");

    // Nobody renews.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        !cluster.volume("a").is_frozen(),
        "still frozen 600 ms after a 200 ms lease"
    );
    let info = client
        .get_host_info(pb::GetHostInfoRequest {})
        .await
        .expect("host info")
        .into_inner();
    assert!(info.freezes.is_empty(), "{info:?}");
    assert!(
        info.volumes.iter().all(|v| v.frozen_by.is_empty()),
        "{info:?}"
    );

    // Too late for a snapshot: it could hold writes made after the freeze ended.
    let status = client
        .create_snapshots(pb::CreateSnapshotsRequest {
            set_id: set_id.clone(),
            mount_points: mounts.clone(),
            time_left_ms: 0,
        })
        .await
        .expect_err("a snapshot after the lease ran out must be refused");
    println!("CreateSnapshots after the lease: {}", status.message());
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("is not frozen on this host"),
        "{status:?}"
    );
    let status = client
        .renew_lease(pb::RenewLeaseRequest {
            set_id: set_id.clone(),
            lease_ms: 200,
        })
        .await
        .expect_err("renewing an expired lease must be refused");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("lease-expired"), "{status:?}");

    let thawed = client
        .thaw_volumes(pb::ThawVolumesRequest {
            set_id: set_id.clone(),
        })
        .await
        .expect("thaw")
        .into_inner();
    assert!(!thawed.held_continuously, "{thawed:?}");
    assert_eq!(thawed.end(), pb::FreezeEnd::LeaseExpired, "{thawed:?}");
    assert!(
        (200..600).contains(&thawed.write_stall_ms),
        "stall {} ms",
        thawed.write_stall_ms
    );
    assert!(snapshot_files(&cluster.snapshot_dir(), &set_id).is_empty());
    cluster.assert_nothing_frozen("at the end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_while_frozen_is_thawed_by_its_guardian() {
    let _serial = serial();
    if !require_root() {
        return;
    }
    let mut cluster = Cluster::start("guardian", &ClusterOptions::default());
    let mut client = cluster
        .agent
        .client(&cluster.pki, COORDINATOR)
        .await
        .expect("connect to the agent as the coordinator");
    client
        .freeze_volumes(pb::FreezeVolumesRequest {
            set_id: "guardian-1".into(),
            mount_points: vec![
                cluster.mount("a").display().to_string(),
                cluster.mount("b").display().to_string(),
            ],
            lease_ms: 60_000,
            hooks: Vec::new(),
        })
        .await
        .expect("freeze");
    assert!(cluster.volume("a").is_frozen() && cluster.volume("b").is_frozen());
    let records = cluster.state.join("agent/freezes");
    assert_eq!(fs::read_dir(&records).expect("records").count(), 1);

    // SIGKILL: no graceful shutdown, no lease timer. The guardian must thaw at once.
    cluster.agent.kill_hard();
    for vol in ["a", "b"] {
        assert!(
            write_completes_within(&cluster.volume(vol).path("probe"), Duration::from_secs(3)),
            "{vol} still frozen 3 s after the agent was killed:\n{}",
            cluster.agent.log()
        );
    }
    cluster.assert_nothing_frozen("after the agent was killed");
    let log = cluster.agent.log();
    assert!(log.contains("the agent died"), "{log}");
    // The guardian removes the record once it has thawed (give it a moment to get there).
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while fs::read_dir(&records).expect("records").count() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "freeze record left behind:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn max_freeze_cut_short_makes_the_set_failed() {
    let _serial = serial();
    if !require_root() {
        return;
    }
    // The agent's hard cap is 1 ms: it has ended every freeze by itself before the
    // coordinator's snapshot and thaw arrive (two catalog commits and RPCs later).
    let options = ClusterOptions {
        agent_top_level: "default-lease = \"1ms\"\nmax-freeze = \"1ms\"\n".into(),
        ..Default::default()
    };
    let cluster = Cluster::start("max-freeze", &options);
    let (out, set) = cluster.ctl().json(&["backup", "g"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_eq!(str_of(&set, "state"), "failed", "{set:#}");
    let error = str_of(&set, "error");
    println!("set error: {error}");
    assert!(
        error.contains(AGENT) && (error.contains("max-freeze") || error.contains("not frozen")),
        "{set:#}"
    );
    let host = &set["hosts"][0];
    assert_eq!(host["held_continuously"], Value::Bool(false), "{set:#}");
    assert_eq!(str_of(host, "freeze_end"), "max-freeze", "{set:#}");
    assert!(str_of(host, "error").contains("max-freeze"), "{set:#}");
    let id = str_of(&set, "id");
    assert!(
        snapshot_files(&cluster.snapshot_dir(), id).is_empty(),
        "snapshots of a failed set left behind"
    );
    cluster.assert_nothing_frozen("after the failed set");
}
