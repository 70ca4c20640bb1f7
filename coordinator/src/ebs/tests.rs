//! The EBS provider inside the set workflow, against `FakeEc2` and fake agents: what moto
//! cannot show (pending snapshots, limits and throttling while frozen, timeouts after the
//! fact, partial sets, snapshots ending in error).

use quiesce_proto::coordinator::v1::{Completion, SetState};
use quiesce_proto::states::StateText;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::api::Ec2Error;
use super::fake::{Failure, FakeEc2, Op};
use super::{EbsProvider, tags};
use crate::agent_client::AgentClient;
use crate::catalog::Catalog;
use crate::config::Config;
use crate::fake_agent::{FakeAgent, Phase};
use crate::workflow::Coordinator;
use quiesce_proto::coordinator::v1 as pb;

const CONFIG: &str = r#"
listen = "127.0.0.1:1"
catalog = ":memory:"
[[agent]]
name = "db1"
endpoint = "https://127.0.0.1:2"
[[agent]]
name = "db2"
endpoint = "https://127.0.0.1:3"
[[group]]
name = "pg"
provider = "ebs"
lease = "3s"
phase-timeout = "1s"
[group.ebs]
region = "us-east-1"
request-timeout = "1s"
poll-interval = "1h"
reconcile-delay = "10ms"
tags = { team = "db", env = "test" }
[[group.member]]
agent = "db1"
mounts = ["/data", "/wal"]
[[group.member]]
agent = "db2"
mounts = ["/data", "/wal"]
"#;

struct Fixture {
    coordinator: Arc<Coordinator>,
    ec2: FakeEc2,
    db1: FakeAgent,
    db2: FakeAgent,
}

/// Two instances, each with two group volumes and one outside the group.
fn setup() -> Fixture {
    setup_config(CONFIG)
}

fn setup_config(text: &str) -> Fixture {
    let config = Arc::new(Config::parse(text).unwrap());
    assert_eq!(config.problems(true), Vec::<String>::new());
    let ec2 = FakeEc2::new();
    ec2.add_instance(
        "i-1",
        &[
            ("/dev/sdf", "vol-1data", "gp3"),
            ("/dev/sdg", "vol-1wal", "gp3"),
            ("/dev/sdh", "vol-1other", "gp3"),
        ],
    );
    ec2.add_instance(
        "i-2",
        &[
            ("/dev/sdf", "vol-2data", "gp3"),
            ("/dev/sdg", "vol-2wal", "io2"),
            ("/dev/sdh", "vol-2other", "gp3"),
        ],
    );
    let db1 = FakeAgent::new("db1", &["/data", "/wal"]);
    db1.set_ebs("i-1", &[("/data", "vol-1data"), ("/wal", "vol-1wal")]);
    let db2 = FakeAgent::new("db2", &["/data", "/wal"]);
    db2.set_ebs("i-2", &[("/data", "vol-2data"), ("/wal", "vol-2wal")]);
    ec2.watch_frozen(db1.frozen_probe());
    ec2.watch_frozen(db2.frozen_probe());
    let mut agents: HashMap<String, Arc<dyn AgentClient>> = HashMap::new();
    agents.insert("db1".into(), Arc::new(db1.clone()));
    agents.insert("db2".into(), Arc::new(db2.clone()));
    let coordinator = Coordinator::new(
        config.clone(),
        Arc::new(Catalog::in_memory().unwrap()),
        Arc::new(agents),
    );
    let group = config.group("pg").unwrap();
    coordinator.set_provider(
        "pg",
        Arc::new(EbsProvider::with_api(
            "pg",
            group.ebs.clone().unwrap(),
            Arc::new(ec2.clone()),
        )),
    );
    Fixture {
        coordinator,
        ec2,
        db1,
        db2,
    }
}

fn count(ec2: &FakeEc2, op: Op, target: &str) -> usize {
    ec2.calls()
        .iter()
        .filter(|(o, t)| *o == op && t == target)
        .count()
}

/// Nothing but the create calls ran while a member was frozen.
fn only_creates_while_frozen(ec2: &FakeEc2) {
    for (op, target) in ec2.calls_while_frozen() {
        assert!(
            matches!(op, Op::CreateSnapshots | Op::CreateSnapshot),
            "{op:?} {target} ran while frozen"
        );
    }
}

#[tokio::test]
async fn a_locked_groups_snapshots_carry_the_lock_in_a_tag() {
    let f = setup_config(&CONFIG.replace(
        "phase-timeout = \"1s\"\n",
        "phase-timeout = \"1s\"\nlock-for = \"30d\"\n",
    ));
    let set = f.coordinator.backup("pg").await.unwrap();
    assert_eq!(set.state(), SetState::Consistent, "{}", set.error);
    assert_eq!(
        set.locked_until_ms,
        set.created_at_ms + 30 * 24 * 3600 * 1000
    );
    let until = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(set.locked_until_ms),
    )
    .to_string();
    let requests = f.ec2.create_snapshots_requests();
    assert_eq!(requests.len(), 2);
    for req in requests {
        let tag = req.tags.iter().find(|t| t.0 == tags::LOCKED_UNTIL);
        assert_eq!(
            tag.map(|t| t.1.as_str()),
            Some(until.as_str()),
            "{:?}",
            req.tags
        );
    }
    let unlocked = setup();
    unlocked.coordinator.backup("pg").await.unwrap();
    assert!(
        unlocked
            .ec2
            .create_snapshots_requests()
            .iter()
            .all(|r| r.tags.iter().all(|t| t.0 != tags::LOCKED_UNTIL)),
        "no lock, no tag"
    );
}

#[tokio::test]
async fn a_backup_snapshots_exactly_the_group_volumes_one_call_per_instance() {
    let f = setup();
    let set = f.coordinator.backup("pg").await.unwrap();
    assert_eq!(set.state(), SetState::Consistent, "{}", set.error);
    let mut requests = f.ec2.create_snapshots_requests();
    requests.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
    assert_eq!(requests.len(), 2, "one CreateSnapshots per instance");
    for (req, other) in requests.iter().zip(["vol-1other", "vol-2other"]) {
        assert!(req.exclude_boot_volume);
        assert_eq!(req.exclude_data_volume_ids, [other]);
        let tag = |k: &str| req.tags.iter().find(|t| t.0 == k).map(|t| t.1.as_str());
        assert_eq!(tag(tags::SET_ID), Some(set.id.as_str()));
        assert_eq!(tag(tags::GROUP), Some("pg"));
        assert_eq!(tag(tags::ATTEMPT), Some("1"));
        assert_eq!(tag("team"), Some("db"));
        assert!(req.description.contains(&set.id));
    }
    let mut captured: Vec<String> = f.ec2.snapshots().into_iter().map(|s| s.volume_id).collect();
    captured.sort();
    assert_eq!(captured, ["vol-1data", "vol-1wal", "vol-2data", "vol-2wal"]);
    assert!(
        set.volumes
            .iter()
            .all(|v| v.snapshot_id.starts_with("snap-") && !v.ebs_volume_id.is_empty())
    );
    assert!(["pending", "completed"].contains(&set.completion().text()));
    assert!(!f.db1.is_frozen() && !f.db2.is_frozen());
    // DescribeInstances ran at plan time, not while frozen.
    only_creates_while_frozen(&f.ec2);
    let snapshot_calls = set.snapshot_calls_ms;
    // Each figure is rounded down to the millisecond on its own: the calls, inside the window,
    // may read 1 ms more than it when both take less than a millisecond (fakes).
    assert!(
        snapshot_calls <= set.freeze_window_ms + 1,
        "{snapshot_calls} > {}",
        set.freeze_window_ms
    );
}

#[tokio::test]
async fn pending_snapshots_are_tracked_to_completed_and_tagged_per_volume() {
    let f = setup();
    f.ec2.leave_pending();
    let set = f.coordinator.backup("pg").await.unwrap();
    assert_eq!(set.state(), SetState::Consistent, "{}", set.error);
    assert_eq!(set.completion(), Completion::Pending);
    assert!(set.volumes.iter().all(|v| v.snapshot_state == "pending"));
    assert_eq!(f.coordinator.poll_completion(&set.id).await.unwrap(), None);
    let first = &set.volumes[0].snapshot_id;
    f.ec2.set_snapshot_state(first, "pending", 40);
    f.coordinator.poll_completion(&set.id).await.unwrap();
    let shown = f.coordinator.catalog().get(&set.id).unwrap().unwrap();
    assert_eq!(shown.volumes[0].snapshot_progress, 40);
    f.ec2.complete_all();
    assert_eq!(
        f.coordinator.poll_completion(&set.id).await.unwrap(),
        Some(Completion::Completed)
    );
    let done = f.coordinator.catalog().get(&set.id).unwrap().unwrap();
    assert_eq!(done.state(), SetState::Consistent);
    assert_eq!(done.completion(), Completion::Completed);
    assert!(
        done.volumes
            .iter()
            .all(|v| v.snapshot_state == "completed" && v.snapshot_progress == 100)
    );
    // Per-volume tags were added after the thaw.
    for snapshot in f.ec2.snapshots() {
        let volume = done
            .volumes
            .iter()
            .find(|v| v.snapshot_id == snapshot.snapshot_id)
            .unwrap();
        assert_eq!(snapshot.tag(tags::MOUNT), Some(volume.mount_point.as_str()));
        assert_eq!(snapshot.tag(tags::HOST), Some(volume.agent.as_str()));
        assert!(
            snapshot
                .tag(tags::EC2_DEVICE)
                .unwrap()
                .starts_with("/dev/sd")
        );
    }
}

#[tokio::test]
async fn a_restarted_coordinator_resumes_tracking_pending_sets() {
    let f = setup();
    f.ec2.leave_pending();
    let set = f.coordinator.backup("pg").await.unwrap();
    assert_eq!(set.completion(), Completion::Pending);
    // What a coordinator does at start: every consistent set still pending is tracked.
    assert_eq!(f.coordinator.resume_completion_tracking().unwrap(), 1);
    f.ec2.complete_all();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let now = f.coordinator.catalog().get(&set.id).unwrap().unwrap();
        if now.completion() == Completion::Completed {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not tracked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_snapshot_ending_in_error_fails_the_committed_set() {
    let f = setup();
    f.ec2.leave_pending();
    let set = f.coordinator.backup("pg").await.unwrap();
    assert_eq!(set.state(), SetState::Consistent, "{}", set.error);
    let wal = set
        .volumes
        .iter()
        .find(|v| v.agent == "db2" && v.mount_point == "/wal")
        .unwrap();
    f.ec2.set_snapshot_state(&wal.snapshot_id, "error", 10);
    assert_eq!(
        f.coordinator.poll_completion(&set.id).await.unwrap(),
        Some(Completion::Error)
    );
    let failed = f.coordinator.catalog().get(&set.id).unwrap().unwrap();
    assert_eq!(failed.state(), SetState::Failed);
    assert_eq!(failed.completion(), Completion::Error);
    assert!(
        failed.error.contains(&format!(
            "db2:/wal snapshot {} ended in error",
            wal.snapshot_id
        )),
        "{}",
        failed.error
    );
}

async fn limit_while_frozen(error: Ec2Error, needle: &str) {
    let f = setup();
    f.ec2
        .fail(Op::CreateSnapshots, "i-2", Failure::Error(error));
    let set = f.coordinator.backup("pg").await.unwrap();
    assert_eq!(set.state(), SetState::Failed);
    assert!(set.error.contains(needle), "{}", set.error);
    assert!(
        set.error.contains("not retried while frozen"),
        "{}",
        set.error
    );
    assert_eq!(count(&f.ec2, Op::CreateSnapshots, "i-2"), 1, "no retry");
    assert!(!f.db1.is_frozen() && !f.db2.is_frozen());
    // db1's snapshots were removed, and only after the thaw.
    assert!(f.ec2.snapshots().is_empty(), "{:?}", f.ec2.snapshots());
    only_creates_while_frozen(&f.ec2);
}

#[tokio::test]
async fn the_per_volume_rate_limit_while_frozen_thaws_and_fails_without_retry() {
    limit_while_frozen(
        Ec2Error::SnapshotLimit {
            code: "SnapshotCreationPerVolumeRateExceeded".into(),
            message: "rate exceeded for vol-2data".into(),
        },
        "db2: CreateSnapshots on i-2: EBS snapshot limit reached (SnapshotCreationPerVolumeRateExceeded",
    )
    .await;
}

#[tokio::test]
async fn the_concurrent_snapshot_limit_while_frozen_thaws_and_fails_without_retry() {
    limit_while_frozen(
        Ec2Error::SnapshotLimit {
            code: "ConcurrentSnapshotLimitExceeded".into(),
            message: "too many".into(),
        },
        "ConcurrentSnapshotLimitExceeded",
    )
    .await;
}

#[tokio::test]
async fn throttling_while_frozen_thaws_and_fails_without_retry() {
    limit_while_frozen(
        Ec2Error::Throttled {
            code: "RequestLimitExceeded".into(),
            message: "slow down".into(),
        },
        "throttled by EC2 (RequestLimitExceeded",
    )
    .await;
}

#[tokio::test]
async fn a_call_that_times_out_after_creating_is_reconciled_by_tag_after_the_thaw() {
    let f = setup();
    f.ec2.fail(
        Op::CreateSnapshots,
        "i-1",
        Failure::Hang(Duration::from_secs(30)),
    );
    let set = f.coordinator.backup("pg").await.unwrap();
    assert_eq!(set.state(), SetState::Failed);
    assert!(
        set.error.contains("db1: snapshot did not return within 1s"),
        "{}",
        set.error
    );
    assert!(!f.db1.is_frozen() && !f.db2.is_frozen());
    assert!(
        f.ec2.snapshots().is_empty(),
        "the snapshots the hung call made were found by tag and deleted: {:?}",
        f.ec2.snapshots()
    );
    assert!(
        count(&f.ec2, Op::DescribeSnapshots, "") >= 2,
        "searched by tag"
    );
    only_creates_while_frozen(&f.ec2);
}

#[tokio::test]
async fn an_ambiguous_error_after_creating_is_reconciled_by_tag() {
    let f = setup();
    f.ec2.fail(
        Op::CreateSnapshots,
        "i-2",
        Failure::AfterEffect(Ec2Error::Ambiguous {
            message: "connection reset".into(),
        }),
    );
    let set = f.coordinator.backup("pg").await.unwrap();
    assert_eq!(set.state(), SetState::Failed);
    assert!(
        set.error.contains("searched for by tag and deleted"),
        "{}",
        set.error
    );
    assert!(f.ec2.snapshots().is_empty(), "{:?}", f.ec2.snapshots());
    only_creates_while_frozen(&f.ec2);
}

#[tokio::test]
async fn one_host_failing_removes_the_other_hosts_snapshots() {
    let f = setup();
    f.ec2.fail(
        Op::CreateSnapshots,
        "i-2",
        Failure::Error(Ec2Error::Refused {
            code: "UnauthorizedOperation".into(),
            message: "not allowed".into(),
        }),
    );
    let set = f.coordinator.backup("pg").await.unwrap();
    assert_eq!(set.state(), SetState::Failed);
    assert!(set.error.contains("UnauthorizedOperation"), "{}", set.error);
    assert_eq!(count(&f.ec2, Op::CreateSnapshots, "i-1"), 1);
    assert!(f.ec2.snapshots().is_empty(), "{:?}", f.ec2.snapshots());
    assert!(f.db1.calls().contains(&Phase::Thaw));
}

#[tokio::test]
async fn a_volume_at_its_pending_limit_is_refused_before_any_freeze() {
    let f = setup();
    for _ in 0..5 {
        f.ec2.add_foreign_pending_snapshot("vol-2wal");
    }
    let set = f.coordinator.backup("pg").await.unwrap();
    assert_eq!(set.state(), SetState::Failed);
    assert!(
        set.error.contains(
            "db2:/wal: volume vol-2wal (io2) already has 5 pending snapshot(s), the most EBS allows is 5"
        ),
        "{}",
        set.error
    );
    assert!(!f.db1.calls().contains(&Phase::Freeze));
    assert_eq!(super::pending_limit("st1"), 1);
    assert_eq!(super::pending_limit("sc1"), 1);
    assert_eq!(super::pending_limit("gp3"), 5);
}

#[tokio::test]
async fn a_volume_without_an_ebs_id_is_named_at_plan_time() {
    let f = setup();
    f.db2.set_ebs("i-2", &[("/data", "vol-2data")]);
    let set = f.coordinator.backup("pg").await.unwrap();
    assert_eq!(set.state(), SetState::Failed);
    assert!(
        set.error
            .contains("db2:/wal has no EBS volume id: /dev/loop0 is not an NVMe device"),
        "{}",
        set.error
    );
    assert!(!f.db2.calls().contains(&Phase::Freeze));
}

#[tokio::test]
async fn a_volume_attached_elsewhere_is_refused_at_plan_time() {
    let f = setup();
    f.db2
        .set_ebs("i-2", &[("/data", "vol-2data"), ("/wal", "vol-1wal")]);
    let set = f.coordinator.backup("pg").await.unwrap();
    assert_eq!(set.state(), SetState::Failed);
    assert!(
        set.error
            .contains("db2:/wal: volume vol-1wal is not attached to instance i-2"),
        "{}",
        set.error
    );
}

#[tokio::test]
async fn volumes_without_an_instance_fall_back_to_one_create_snapshot_each() {
    let f = setup();
    f.ec2.add_volume("vol-loose1", "gp3");
    f.ec2.add_volume("vol-loose2", "st1");
    f.db2
        .set_ebs("", &[("/data", "vol-loose1"), ("/wal", "vol-loose2")]);
    let set = f.coordinator.backup("pg").await.unwrap();
    assert_eq!(set.state(), SetState::Consistent, "{}", set.error);
    assert_eq!(count(&f.ec2, Op::CreateSnapshot, "vol-loose1"), 1);
    assert_eq!(count(&f.ec2, Op::CreateSnapshot, "vol-loose2"), 1);
    let loose = f
        .ec2
        .snapshots()
        .into_iter()
        .find(|s| s.volume_id == "vol-loose2")
        .unwrap();
    assert_eq!(loose.tag(tags::MOUNT), Some("/wal"));
    assert_eq!(loose.tag(tags::DEVICE), Some("/dev/nvme2n1"));
    assert_eq!(loose.tag(tags::SET_ID), Some(set.id.as_str()));
}

#[tokio::test]
async fn delete_removes_every_snapshot_and_counts_missing_ones_as_done() {
    let f = setup();
    let set = f.coordinator.backup("pg").await.unwrap();
    assert_eq!(set.state(), SetState::Consistent, "{}", set.error);
    // One disappeared already.
    use super::api::Ec2Api;
    f.ec2
        .delete_snapshot(&set.volumes[0].snapshot_id)
        .await
        .unwrap();
    let deleted = f.coordinator.delete_set(&set.id).await.unwrap();
    assert_eq!(deleted.snapshots_deleted, 4);
    assert!(deleted.forgotten, "{deleted:?}");
    assert!(f.ec2.snapshots().is_empty());
    assert!(f.coordinator.catalog().get(&set.id).unwrap().is_none());
}

#[tokio::test]
async fn restore_creates_tagged_volumes_and_attaches_them_in_device_order() {
    let f = setup();
    let set = f.coordinator.backup("pg").await.unwrap();
    assert_eq!(set.state(), SetState::Consistent, "{}", set.error);
    f.coordinator.poll_completion(&set.id).await.unwrap();
    let restored = f
        .coordinator
        .restore(&pb::RestoreSetRequest {
            set_id: set.id.clone(),
            availability_zone: "us-east-1b".into(),
            volume_type: "io2".into(),
            attach_instance: "i-9".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(restored.len(), 4);
    let devices: Vec<(&str, &str, &str)> = restored
        .iter()
        .map(|r| (r.agent.as_str(), r.mount_point.as_str(), r.device.as_str()))
        .collect();
    assert_eq!(
        devices,
        [
            ("db1", "/data", "/dev/sdf"),
            ("db1", "/wal", "/dev/sdg"),
            ("db2", "/data", "/dev/sdh"),
            ("db2", "/wal", "/dev/sdi"),
        ]
    );
    assert!(restored.iter().all(|r| r.attached));
    let created = f.ec2.created_volumes();
    for (volume_id, req) in &created {
        let r = restored.iter().find(|r| &r.volume_id == volume_id).unwrap();
        assert_eq!(req.availability_zone, "us-east-1b");
        assert_eq!(req.volume_type, "io2");
        assert!(req.tags.contains(&(tags::SET_ID.into(), set.id.clone())));
        assert!(
            req.tags
                .contains(&(tags::MOUNT.into(), r.mount_point.clone()))
        );
        assert!(
            req.tags
                .contains(&(tags::SOURCE_SNAPSHOT.into(), r.snapshot_id.clone()))
        );
    }
    let attachments = f.ec2.attachments();
    assert_eq!(attachments.len(), 4);
    assert!(attachments.iter().all(|a| a.1 == "i-9"));
    let no_az = f
        .coordinator
        .restore(&pb::RestoreSetRequest {
            set_id: set.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(no_az.to_string().contains("--availability-zone"), "{no_az}");
}

#[tokio::test]
async fn a_drill_makes_a_volume_per_snapshot_in_the_hosts_zone_stops_at_no_block_device_and_deletes_them()
 {
    let f = setup();
    let set = f.coordinator.backup("pg").await.unwrap();
    assert_eq!(set.state(), pb::SetState::Consistent, "{}", set.error);
    let before = f.ec2.volume_ids();
    let v = f
        .coordinator
        .verify_set(&pb::VerifySetRequest {
            set_id: set.id.clone(),
            host: "db2".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(v.outcome(), pb::VerifyOutcome::NoBlockDevice, "{v:#?}");
    assert_eq!(v.agent, "db2");
    assert!(v.error.is_empty(), "{}", v.error);
    let mounts: Vec<&str> = v.checks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(mounts, ["/data", "/wal"]);
    for check in &v.checks {
        assert_eq!(check.outcome(), pb::VerifyOutcome::NoBlockDevice);
        assert_eq!(check.check, "CreateVolume, available");
        assert!(check.output.contains("no block device here"), "{check:#?}");
    }
    let created = f.ec2.created_volumes();
    assert_eq!(created.len(), 2);
    for (id, req) in &created {
        assert_eq!(req.availability_zone, "us-east-1a");
        let tag = |k: &str| req.tags.iter().find(|t| t.0 == k).map(|t| t.1.as_str());
        assert_eq!(tag(tags::SET_ID), Some(set.id.as_str()));
        assert_eq!(tag(tags::DRILL), Some(set.id.as_str()));
        assert_eq!(tag(tags::HOST), Some("db2"));
        assert_eq!(tag("team"), Some("db"));
        assert!(f.ec2.deleted_volumes().contains(id));
    }
    assert_eq!(f.ec2.volume_ids(), before, "every drill volume deleted");
    let recorded = f.coordinator.catalog().get(&set.id).unwrap().unwrap();
    assert_eq!(recorded.verifications, vec![v]);
    assert!(
        f.coordinator
            .render_metrics()
            .contains("quiesce_verifications_total{group=\"pg\",result=\"no_block_device\"} 1")
    );
    assert!(!f.db1.is_frozen() && !f.db2.is_frozen());
}

#[tokio::test]
async fn a_drill_whose_second_create_fails_deletes_the_first_volume_and_names_the_call() {
    let f = setup();
    let set = f.coordinator.backup("pg").await.unwrap();
    assert_eq!(set.state(), pb::SetState::Consistent, "{}", set.error);
    let wal = set
        .volumes
        .iter()
        .find(|v| v.agent == "db1" && v.mount_point == "/wal")
        .unwrap()
        .snapshot_id
        .clone();
    f.ec2.fail(
        Op::CreateVolume,
        &wal,
        Failure::Error(Ec2Error::Refused {
            code: "UnauthorizedOperation".into(),
            message: "not allowed".into(),
        }),
    );
    let before = f.ec2.volume_ids();
    let v = f
        .coordinator
        .verify_set(&pb::VerifySetRequest {
            set_id: set.id.clone(),
            host: "db1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(v.outcome(), pb::VerifyOutcome::Error, "{v:#?}");
    let failing = v.checks.last().unwrap();
    assert_eq!(
        (failing.name.as_str(), failing.check.as_str()),
        ("/wal", "CreateVolume")
    );
    assert!(
        failing.output.contains("UnauthorizedOperation"),
        "{failing:#?}"
    );
    assert_eq!(f.ec2.created_volumes().len(), 1);
    assert_eq!(f.ec2.deleted_volumes().len(), 1);
    assert_eq!(
        f.ec2.volume_ids(),
        before,
        "the first volume was deleted too"
    );

    // A host whose agent reports no instance: an error naming why, nothing created.
    f.db1
        .set_ebs("", &[("/data", "vol-1data"), ("/wal", "vol-1wal")]);
    let v = f
        .coordinator
        .verify_set(&pb::VerifySetRequest {
            set_id: set.id.clone(),
            host: "db1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(v.outcome(), pb::VerifyOutcome::Error);
    assert!(
        v.checks[0].output.contains("reports no EC2 instance id"),
        "{v:#?}"
    );
    assert_eq!(f.ec2.created_volumes().len(), 1);
}
