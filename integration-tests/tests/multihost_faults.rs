//! Faults across hosts, with real processes: agents on 127.0.0.2 and 127.0.0.3, each owning one
//! loop volume in an XFS reflink pool, and a coordinator process that is killed, restarted,
//! paused at a phase (`QUIESCE_TEST_PAUSE_AFTER`), or whose members die or stop mid-set.

use quiesce_proto::coordinator::v1::SetState;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use quiesce_coordinator::catalog::Catalog;
use quiesce_integration_tests::multihost::{
    Lab, backup, bin, get_set, have_root, is_frozen, scrape, serial, wait_set,
};
use quiesce_proto::coordinator::v1 as pb;

/// Long enough that a thaw seen within it was done by recovery, not by the lease running out.
const LEASE: &str = "20s";

fn group(budget: &str, phase_timeout: &str, a: &Path, b: &Path) -> String {
    format!(
        r#"
[[group]]
name = "g"
provider = "reflink"
lease = "{LEASE}"
phase-timeout = "{phase_timeout}"
freeze-budget = "{budget}"
[[group.member]]
agent = "db1"
mounts = ["{}"]
[[group.member]]
agent = "db2"
mounts = ["{}"]
"#,
        a.display(),
        b.display()
    )
}

/// Two agents, one 64 MiB volume each.
fn lab(tag: &str) -> (Lab, PathBuf, PathBuf) {
    let mut lab = Lab::new(tag, 512);
    let a = lab.volume("a", 64);
    let b = lab.volume("b", 64);
    std::fs::write(a.join("marker"), "a").unwrap();
    std::fs::write(b.join("marker"), "b").unwrap();
    let agent_extra = format!("default-lease = \"{LEASE}\"\nmax-freeze = \"60s\"");
    lab.spawn_agent("db1", 2, std::slice::from_ref(&a), &agent_extra);
    lab.spawn_agent("db2", 3, std::slice::from_ref(&b), &agent_extra);
    (lab, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_at_each_phase_recovers_the_set_as_failed_with_nothing_frozen_or_left() {
    if !have_root("coordinator_killed_at_each_phase") {
        return;
    }
    let _serial = serial().await;
    let (mut lab, a, b) = lab("crash");
    lab.start_coordinator(Some(&group("10s", "5s", &a, &b)), &[]);
    let mut client = lab.coordinator().client().await;
    let committed = backup(&mut client, "g").await;
    assert_eq!(committed.state(), SetState::Consistent, "{committed:?}");
    let committed_files = lab.snapshot_files(&committed.id);
    assert_eq!(committed_files.len(), 2, "{committed_files:?}");

    for point in [
        "planned",
        "freezing",
        "frozen",
        "snapshotted",
        "thawing",
        "thawed",
    ] {
        lab.start_coordinator(None, &[("QUIESCE_TEST_PAUSE_AFTER", point)]);
        let mut client = lab.coordinator().client().await;
        let id = client
            .create_set(pb::CreateSetRequest { group: "g".into() })
            .await
            .unwrap()
            .into_inner()
            .set_id;
        lab.coordinator()
            .proc
            .wait_for_log("test hook", Duration::from_secs(30));
        lab.coordinator().proc.kill9();
        // What the kill left behind: frozen volumes, snapshots.
        let frozen_expected = matches!(point, "frozen" | "snapshotted" | "thawing");
        assert_eq!(is_frozen(&a), frozen_expected, "{point}: db1's volume");
        assert_eq!(is_frozen(&b), frozen_expected, "{point}: db2's volume");
        let left = lab.snapshot_files(&id);
        let snapshots_expected = matches!(point, "snapshotted" | "thawing" | "thawed");
        assert_eq!(!left.is_empty(), snapshots_expected, "{point}: {left:?}");

        let restarted = Instant::now();
        lab.start_coordinator(None, &[]);
        let mut client = lab.coordinator().client().await;
        let set = get_set(&mut client, &id).await;
        assert_eq!(set.state(), SetState::Failed, "{point}: {set:?}");
        assert!(
            set.error
                .contains("the coordinator stopped while the set was"),
            "{point}: {}",
            set.error
        );
        assert!(
            restarted.elapsed() < Duration::from_secs(15),
            "recovery must beat the {LEASE} lease"
        );
        assert!(
            !is_frozen(&a) && !is_frozen(&b),
            "{point}: thawed by recovery"
        );
        assert!(
            lab.snapshot_files(&id).is_empty(),
            "{point}: partial snapshots removed"
        );
        let kept = get_set(&mut client, &committed.id).await;
        assert_eq!(
            kept.state(),
            SetState::Consistent,
            "{point}: committed set untouched"
        );
        assert_eq!(kept.verdict, committed.verdict);
        for file in &committed_files {
            assert!(file.exists(), "{point}: {} kept", file.display());
        }
        eprintln!("{point}: recovered in {:?}", restarted.elapsed());
    }

    // A last clean set after all that, then the catalog checked by a fresh open.
    let mut client = lab.coordinator().client().await;
    let after = backup(&mut client, "g").await;
    assert_eq!(after.state(), SetState::Consistent, "{after:?}");
    let metrics = scrape(lab.coordinator().metrics);
    assert!(
        metrics.contains("quiesce_sets{group=\"g\",state=\"failed\"} 6"),
        "{metrics}"
    );
    lab.coordinator().proc.stop();
    let catalog = Catalog::open(&lab.dir.join("catalog.sqlite")).expect("catalog intact");
    assert!(catalog.running().unwrap().is_empty());
    assert_eq!(catalog.list("g", 0).unwrap().len(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_unreachable_at_plan_time_fails_the_set_before_anything_is_frozen() {
    if !have_root("an_agent_unreachable_at_plan_time") {
        return;
    }
    let _serial = serial().await;
    let (mut lab, a, b) = lab("unreach");
    lab.start_coordinator(Some(&group("10s", "3s", &a, &b)), &[]);
    lab.agent("db2").proc.kill9();
    let mut client = lab.coordinator().client().await;
    let set = backup(&mut client, "g").await;
    assert_eq!(set.state(), SetState::Failed);
    assert!(
        set.error.contains("db2: unreachable at plan time"),
        "{}",
        set.error
    );
    assert!(!lab.agent("db1").proc.log_text().contains("frozen"));
    assert!(!is_frozen(&a));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_dies_mid_freeze_fails_the_set_and_every_volume_is_thawed() {
    if !have_root("an_agent_that_dies_mid_freeze") {
        return;
    }
    let _serial = serial().await;
    let (mut lab, a, b) = lab("die");
    lab.start_coordinator(
        Some(&group("10s", "3s", &a, &b)),
        &[("QUIESCE_TEST_PAUSE_AFTER", "frozen:2s")],
    );
    let mut client = lab.coordinator().client().await;
    let id = client
        .create_set(pb::CreateSetRequest { group: "g".into() })
        .await
        .unwrap()
        .into_inner()
        .set_id;
    lab.coordinator()
        .proc
        .wait_for_log("test hook", Duration::from_secs(30));
    assert!(is_frozen(&a) && is_frozen(&b), "both members frozen");
    lab.agent("db2").proc.kill9();
    let set = wait_set(&mut client, &id, Duration::from_secs(30)).await;
    assert_eq!(set.state(), SetState::Failed);
    assert!(set.error.contains("db2"), "{}", set.error);
    assert!(set.verdict.starts_with("not consistent"), "{}", set.verdict);
    assert!(!is_frozen(&a), "db1 thawed by the coordinator");
    assert!(!is_frozen(&b), "db2's guardian thawed when the agent died");
    assert!(lab.snapshot_files(&id).is_empty(), "db1's snapshot removed");
    let metrics = scrape(lab.agent("db1").metrics);
    assert!(
        metrics.contains("quiesce_agent_freezes_ended_total{end=\"thawed\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_slower_than_the_freeze_budget_fails_the_set_and_the_others_thaw_at_once() {
    if !have_root("an_agent_slower_than_the_freeze_budget") {
        return;
    }
    let _serial = serial().await;
    let (mut lab, a, b) = lab("slow");
    lab.start_coordinator(
        Some(&group("2s", "3s", &a, &b)),
        &[("QUIESCE_TEST_PAUSE_AFTER", "frozen:300ms")],
    );
    let mut client = lab.coordinator().client().await;
    let id = client
        .create_set(pb::CreateSetRequest { group: "g".into() })
        .await
        .unwrap()
        .into_inner()
        .set_id;
    lab.coordinator()
        .proc
        .wait_for_log("test hook", Duration::from_secs(30));
    // db2 stays alive but answers nothing: its snapshot call cannot return.
    lab.agent("db2").proc.pause();
    let set = wait_set(&mut client, &id, Duration::from_secs(30)).await;
    assert_eq!(set.state(), SetState::Failed);
    assert!(
        set.error
            .contains("db2: snapshot did not return within the freeze budget of 2s"),
        "{}",
        set.error
    );
    assert!(!is_frozen(&a), "db1 thawed as soon as the set failed");
    let continued = Instant::now();
    lab.agent("db2").proc.cont();
    // db2 thaws on its own once it runs again: the coordinator's thaw, or its lease.
    while is_frozen(&b) {
        assert!(
            continued.elapsed() < Duration::from_secs(25),
            "db2 still frozen after its lease"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        lab.snapshot_files(&id)
            .iter()
            .all(|f| !f.starts_with(&lab.agent("db1").snapshot_dir))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_backup_of_a_group_while_one_runs_is_refused_by_the_coordinator_process() {
    if !have_root("a_second_backup_of_a_group") {
        return;
    }
    let _serial = serial().await;
    let (mut lab, a, b) = lab("twice");
    lab.start_coordinator(
        Some(&group("10s", "3s", &a, &b)),
        &[("QUIESCE_TEST_PAUSE_AFTER", "planned:1s")],
    );
    let mut client = lab.coordinator().client().await;
    let first = client
        .create_set(pb::CreateSetRequest { group: "g".into() })
        .await
        .unwrap()
        .into_inner()
        .set_id;
    let second = client
        .create_set(pb::CreateSetRequest { group: "g".into() })
        .await
        .unwrap_err();
    assert_eq!(second.code(), tonic::Code::AlreadyExists, "{second}");
    assert!(
        second.message().contains(&first),
        "names the running set: {second}"
    );
    let set = wait_set(&mut client, &first, Duration::from_secs(30)).await;
    assert_eq!(set.state(), SetState::Consistent, "{set:?}");
    // The CLI says the same to an operator.
    let out = std::process::Command::new(bin("quiescectl"))
        .args(["--insecure", "--endpoint", &lab.coordinator().endpoint()])
        .args(["sets", "show", &first])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert!(
        text.contains("verdict        consistent: all 2 members frozen (last freeze reply +"),
        "{text}"
    );
    assert!(text.contains("FROZEN(C)"), "{text}");

    // Logs join across hosts: every line about the set carries its id, on both sides.
    let coordinator_log = lab.coordinator().proc.log_text();
    let phase_lines: Vec<&str> = coordinator_log
        .lines()
        .filter(|l| l.contains("phase"))
        .collect();
    assert!(phase_lines.len() >= 5, "{coordinator_log}");
    for line in phase_lines {
        assert!(line.contains(&format!("set_id={first}")), "{line}");
    }
    for agent in ["db1", "db2"] {
        let log = lab.agent(agent).proc.log_text();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("frozen") || l.contains("thawed"))
            .collect();
        assert_eq!(lines.len(), 2, "{agent}: {log}");
        for line in lines {
            assert!(line.contains(&first), "{agent}: {line}");
        }
    }
}

#[test]
fn two_groups_sharing_a_volume_are_refused_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            r#"
listen = "127.0.0.1:1"
catalog = "{}/catalog.sqlite"
[[agent]]
name = "db1"
endpoint = "http://127.0.0.2:1"
[[group]]
name = "orders"
provider = "reflink"
[[group.member]]
agent = "db1"
mounts = ["/srv/data"]
[[group]]
name = "billing"
provider = "reflink"
[[group.member]]
agent = "db1"
mounts = ["/srv/data", "/srv/wal"]
"#,
            dir.path().display()
        ),
    )
    .unwrap();
    for command in ["check-config", "run"] {
        let out = std::process::Command::new(bin("quiesce-coordinator"))
            .args([command, "--insecure", "-c"])
            .arg(&config)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{command}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("db1:/srv/data is in groups orders and billing"),
            "{command}: {err}"
        );
    }
    assert!(
        !dir.path().join("catalog.sqlite").exists(),
        "refused before the catalog"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_runs_the_schedule_and_retention_deletes_expired_sets_with_their_snapshots()
{
    if !have_root("the_coordinator_runs_the_schedule") {
        return;
    }
    let _serial = serial().await;
    let (mut lab, a, b) = lab("sched");
    // Every 2 seconds (croner accepts a leading seconds field), keep the newest 2.
    let groups = format!(
        "{}[group.schedule]\ncron = \"*/2 * * * * *\"\n[group.retention]\nkeep-last = 2\n",
        group("10s", "3s", &a, &b)
    );
    lab.start_coordinator(Some(&groups), &[]);
    let mut client = lab.coordinator().client().await;
    let deadline = Instant::now() + Duration::from_secs(40);
    let expired = loop {
        assert!(Instant::now() < deadline, "schedule did not run and expire");
        let metrics = scrape(lab.coordinator().metrics);
        let expired = metrics
            .lines()
            .find(|l| l.starts_with("quiesce_sets_expired_total{group=\"g\"}"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        if expired >= 2 {
            break expired;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let sets = client
        .list_sets(pb::ListSetsRequest {
            group: "g".into(),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .sets;
    assert!(sets.iter().all(|s| s.trigger == "schedule"), "{sets:?}");
    let consistent: Vec<&pb::SnapshotSet> = sets
        .iter()
        .filter(|s| s.state() == SetState::Consistent)
        .collect();
    assert!(
        (2..=3).contains(&consistent.len()),
        "keep-last 2 (a third may have finished since the last tick): {consistent:?}"
    );
    for set in &consistent {
        assert_eq!(
            lab.snapshot_files(&set.id).len(),
            2,
            "{} kept whole",
            set.id
        );
    }
    // Expired sets are gone from the catalog and from the agents' snapshot directories.
    let kept: Vec<&str> = sets.iter().map(|s| s.id.as_str()).collect();
    for agent in ["db1", "db2"] {
        let dir = lab.agent(agent).snapshot_dir.clone();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            assert!(
                kept.contains(&name.as_str()),
                "{agent}: snapshots of expired set {name} left behind ({expired} expired)"
            );
        }
    }
    let groups = client
        .list_groups(pb::ListGroupsRequest {})
        .await
        .unwrap()
        .into_inner()
        .groups;
    let g = &groups[0];
    assert_eq!(g.schedule, "*/2 * * * * *");
    assert!(g.next_run_at_ms > 0 && !g.overdue, "{g:?}");
    assert_eq!(g.retention, "keep last 2");
    assert!(g.last_scheduled_set.starts_with("g-"), "{g:?}");
    let out = std::process::Command::new(bin("quiescectl"))
        .args([
            "--insecure",
            "--endpoint",
            &lab.coordinator().endpoint(),
            "groups",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert!(text.contains("SCHEDULE → NEXT RUN"), "{text}");
    assert!(text.contains("*/2 * * * * * → 20"), "{text}");
    assert!(text.contains("keep last 2;"), "{text}");
    assert!(!text.contains("OVERDUE"), "{text}");
}
