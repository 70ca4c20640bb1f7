//! The EBS provider against moto_server (a real EC2 API emulator on 127.0.0.1): two instances,
//! each with two group volumes and one outside the group; agents (in-process fakes) report the
//! volume and instance ids statically. A backup makes exactly the group's snapshots with every
//! tag, restore makes tagged volumes, a restore drill makes volumes from one host's snapshots
//! and deletes them (outcome "no block device here"), delete removes the snapshots.
//!
//! moto ignores `ExcludeDataVolumeIds` (it captures the outside volume too), so what the
//! provider *sends* is checked with the fake in `coordinator/src/ebs/tests.rs`; here the
//! provider's own clean-up of such strays is checked.

use quiesce_proto::coordinator::v1::{Completion, SetPhase, SetState};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::{Filter, InstanceType, Placement, VolumeType};
use quiesce_coordinator::agent_client::AgentClient;
use quiesce_coordinator::catalog::Catalog;
use quiesce_coordinator::config::Config;
use quiesce_coordinator::ebs::api::Ec2Api;
use quiesce_coordinator::ebs::sdk::SdkEc2;
use quiesce_coordinator::ebs::{EbsProvider, tags};
use quiesce_coordinator::fake_agent::FakeAgent;
use quiesce_coordinator::workflow::Coordinator;
use quiesce_integration_tests::{Need, free_port, require};
use quiesce_proto::coordinator::v1 as pb;

/// moto_server on a free 127.0.0.1 port, killed on drop.
struct Moto {
    child: Child,
    endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// moto_server on a free port, once it answers. Fails (never skips) without moto.
fn start_moto() -> Moto {
    require(&[Need::Moto]);
    let port = free_port();
    let child = Command::new("python3")
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .env("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start moto_server");
    let moto = Moto {
        child,
        endpoint: format!("http://127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_post(port, "/moto-api/reset").is_err() {
        assert!(Instant::now() < deadline, "moto_server did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    moto
}

fn http_post(port: u16, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    if answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200") {
        Ok(answer)
    } else {
        Err(std::io::Error::other(answer))
    }
}

fn config(endpoint: &str) -> Config {
    Config::parse(&format!(
        r#"
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
lease = "10s"
phase-timeout = "10s"
[group.ebs]
region = "us-east-1"
endpoint-url = "{endpoint}"
request-timeout = "5s"
poll-interval = "1h"
reconcile-delay = "100ms"
tags = {{ team = "db" }}
[[group.member]]
agent = "db1"
mounts = ["/data", "/wal"]
[[group.member]]
agent = "db2"
mounts = ["/data", "/wal"]
"#
    ))
    .unwrap()
}

/// One instance with (group data, group wal, outside) volumes attached as sdf, sdg, sdh.
async fn instance_with_volumes(ec2: &aws_sdk_ec2::Client) -> (String, [String; 3]) {
    // moto's first RunInstances loads its AMI catalogue, which can take longer than the
    // product's 5 s request timeout on a loaded machine: this is test setup, so it is retried.
    let mut attempt = 0;
    let run = loop {
        attempt += 1;
        let sent = ec2
            .run_instances()
            .image_id("ami-12345678")
            .min_count(1)
            .max_count(1)
            .instance_type(InstanceType::T3Micro)
            .placement(Placement::builder().availability_zone("us-east-1a").build())
            .send()
            .await;
        match sent {
            Ok(run) => break run,
            Err(aws_sdk_ec2::error::SdkError::TimeoutError(_)) if attempt < 5 => continue,
            Err(e) => panic!("RunInstances against moto (attempt {attempt}): {e:?}"),
        }
    };
    let instance = run.instances()[0].instance_id().unwrap().to_owned();
    let mut volumes = Vec::new();
    for device in ["/dev/sdf", "/dev/sdg", "/dev/sdh"] {
        let volume = ec2
            .create_volume()
            .availability_zone("us-east-1a")
            .size(10)
            .volume_type(VolumeType::Gp3)
            .send()
            .await
            .unwrap()
            .volume_id()
            .unwrap()
            .to_owned();
        ec2.attach_volume()
            .volume_id(&volume)
            .instance_id(&instance)
            .device(device)
            .send()
            .await
            .unwrap();
        volumes.push(volume);
    }
    (instance, volumes.try_into().unwrap())
}

fn phase_at(set: &pb::SnapshotSet, phase: SetPhase) -> u64 {
    set.phases
        .iter()
        .find(|p| p.phase() == phase)
        .map(|p| p.at_ms)
        .unwrap_or_else(|| panic!("no phase {}", phase.as_str_name()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebs_sets_against_moto_capture_only_the_group_tagged_then_restore_and_delete() {
    let moto = start_moto();
    let config = Arc::new(config(&moto.endpoint));
    assert_eq!(config.problems(true), Vec::<String>::new());
    let ebs_config = config.group("pg").unwrap().ebs.clone().unwrap();
    let sdk = Arc::new(SdkEc2::with_static_credentials(&ebs_config, "testing", "testing").await);
    let ec2 = sdk.client().clone();

    let (i1, v1) = instance_with_volumes(&ec2).await;
    let (i2, v2) = instance_with_volumes(&ec2).await;
    let db1 = FakeAgent::new("db1", &["/data", "/wal"]);
    db1.set_ebs(&i1, &[("/data", &v1[0]), ("/wal", &v1[1])]);
    let db2 = FakeAgent::new("db2", &["/data", "/wal"]);
    db2.set_ebs(&i2, &[("/data", &v2[0]), ("/wal", &v2[1])]);
    let mut agents: HashMap<String, Arc<dyn AgentClient>> = HashMap::new();
    agents.insert("db1".into(), Arc::new(db1.clone()));
    agents.insert("db2".into(), Arc::new(db2.clone()));
    let coordinator = Coordinator::new(
        config.clone(),
        Arc::new(Catalog::in_memory().unwrap()),
        Arc::new(agents),
    );
    let provider = Arc::new(EbsProvider::with_api("pg", ebs_config, sdk.clone()));
    coordinator.set_provider("pg", provider.clone());

    // Backup.
    let set = coordinator.backup("pg").await.unwrap();
    assert_eq!(set.state(), SetState::Consistent, "{}", set.error);
    assert!(!db1.is_frozen() && !db2.is_frozen());
    assert!(set.freeze_window_ms > 0);
    let group_volumes: Vec<&String> = [&v1[0], &v1[1], &v2[0], &v2[1]].into_iter().collect();
    // moto captured the outside volumes too; the provider deletes such strays in the
    // background. Wait for that, then exactly the group's snapshots remain.
    let deadline = Instant::now() + Duration::from_secs(10);
    let snapshots = loop {
        let found = provider.find_by_tag(&set.id, None).await.unwrap();
        if found.len() == 4 || Instant::now() > deadline {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut captured: Vec<&String> = snapshots.iter().map(|s| &s.volume_id).collect();
    captured.sort();
    let mut expected = group_volumes.clone();
    expected.sort();
    assert_eq!(captured, expected, "exactly the group's volumes");
    assert!(!captured.contains(&&v1[2]) && !captured.contains(&&v2[2]));
    for volume in &set.volumes {
        assert!(volume.snapshot_id.starts_with("snap-"), "{volume:?}");
    }

    // Completion (moto: completed at once) adds the per-volume tags.
    assert_eq!(
        coordinator.poll_completion(&set.id).await.unwrap(),
        Some(Completion::Completed)
    );
    let done = coordinator.catalog().get(&set.id).unwrap().unwrap();
    assert_eq!(done.completion(), Completion::Completed);
    let snapshots = provider.find_by_tag(&set.id, None).await.unwrap();
    for snapshot in &snapshots {
        let volume = done
            .volumes
            .iter()
            .find(|v| v.snapshot_id == snapshot.snapshot_id)
            .expect("every snapshot belongs to a set volume");
        assert_eq!(snapshot.volume_id, volume.ebs_volume_id);
        assert_eq!(snapshot.tag(tags::SET_ID), Some(set.id.as_str()));
        assert_eq!(snapshot.tag(tags::GROUP), Some("pg"));
        assert_eq!(snapshot.tag(tags::ATTEMPT), Some("1"));
        assert_eq!(snapshot.tag(tags::HOST), Some(volume.agent.as_str()));
        assert_eq!(snapshot.tag(tags::MOUNT), Some(volume.mount_point.as_str()));
        assert_eq!(snapshot.tag(tags::DEVICE), Some(volume.device.as_str()));
        assert_eq!(
            snapshot.tag(tags::EC2_DEVICE),
            Some(if volume.mount_point == "/data" {
                "/dev/sdf"
            } else {
                "/dev/sdg"
            })
        );
        assert_eq!(snapshot.tag("team"), Some("db"));
    }
    let freeze = phase_at(&done, SetPhase::Snapshotting) - phase_at(&done, SetPhase::Freezing);
    let thaw = phase_at(&done, SetPhase::Committed) - phase_at(&done, SetPhase::Thawing);
    println!(
        "EBS freeze window against moto: {} ms = freeze {} ms + snapshot calls {} ms + thaw {} ms (phase marks, ms resolution)",
        done.freeze_window_ms, freeze, done.snapshot_calls_ms, thaw
    );

    // Restore into a third instance, in device order.
    let (target, _) = instance_with_volumes(&ec2).await;
    let restored = coordinator
        .restore(&pb::RestoreSetRequest {
            set_id: set.id.clone(),
            availability_zone: "us-east-1a".into(),
            volume_type: "gp3".into(),
            attach_instance: target.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(restored.len(), 4);
    let order: Vec<(&str, &str)> = restored
        .iter()
        .map(|r| (r.agent.as_str(), r.mount_point.as_str()))
        .collect();
    assert_eq!(
        order,
        [
            ("db1", "/data"),
            ("db1", "/wal"),
            ("db2", "/data"),
            ("db2", "/wal")
        ]
    );
    let new_volumes = ec2
        .describe_volumes()
        .filters(
            Filter::builder()
                .name(format!("tag:{}", tags::SET_ID))
                .values(&set.id)
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(new_volumes.volumes().len(), 4);
    for volume in new_volumes.volumes() {
        let tag = |k: &str| {
            volume
                .tags()
                .iter()
                .find(|t| t.key() == Some(k))
                .and_then(|t| t.value())
        };
        let r = restored
            .iter()
            .find(|r| Some(r.volume_id.as_str()) == volume.volume_id())
            .unwrap();
        assert_eq!(tag(tags::MOUNT), Some(r.mount_point.as_str()));
        assert_eq!(tag(tags::SOURCE_SNAPSHOT), Some(r.snapshot_id.as_str()));
        assert_eq!(volume.snapshot_id(), Some(r.snapshot_id.as_str()));
        assert!(r.attached);
        let attached_to: Vec<_> = volume
            .attachments()
            .iter()
            .map(|a| {
                (
                    a.instance_id().unwrap_or_default(),
                    a.device().unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(attached_to, [(target.as_str(), r.device.as_str())]);
    }

    // A restore drill on db1: one volume per snapshot of db1 in its zone, waited for until
    // available, then the typed "no block device here" stop; every drill volume deleted.
    let drill = coordinator
        .verify_set(&pb::VerifySetRequest {
            set_id: set.id.clone(),
            host: "db1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        drill.outcome(),
        pb::VerifyOutcome::NoBlockDevice,
        "{drill:#?}"
    );
    assert!(drill.error.is_empty(), "{}", drill.error);
    assert_eq!(drill.checks.len(), 2, "{drill:#?}");
    let mut drill_volumes = Vec::new();
    for check in &drill.checks {
        assert_eq!(check.outcome(), pb::VerifyOutcome::NoBlockDevice);
        assert!(
            check.output.contains("in us-east-1a: available"),
            "{check:#?}"
        );
        let volume_id = check.output.split_whitespace().next().unwrap().to_owned();
        assert!(volume_id.starts_with("vol-"), "{check:#?}");
        drill_volumes.push(volume_id);
    }
    let left = ec2
        .describe_volumes()
        .filters(
            Filter::builder()
                .name(format!("tag:{}", tags::DRILL))
                .values(&set.id)
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert!(left.volumes().is_empty(), "drill volumes left: {left:?}");
    for volume_id in &drill_volumes {
        let gone = ec2.describe_volumes().volume_ids(volume_id).send().await;
        assert!(
            gone.is_err() || gone.as_ref().unwrap().volumes().is_empty(),
            "{volume_id} still exists: {gone:?}"
        );
    }
    let recorded = coordinator.catalog().get(&set.id).unwrap().unwrap();
    assert_eq!(recorded.verifications, vec![drill]);

    // Delete.
    let deleted = coordinator.delete_set(&set.id).await.unwrap();
    assert_eq!(deleted.snapshots_deleted, 4);
    assert!(deleted.forgotten, "{deleted:?}");
    assert!(
        provider
            .find_by_tag(&set.id, None)
            .await
            .unwrap()
            .is_empty()
    );
    // NotFound counts as done.
    let again = sdk.delete_snapshot(&snapshots[0].snapshot_id).await;
    assert!(again.unwrap_err().is_not_found());
    drop(moto);
}
