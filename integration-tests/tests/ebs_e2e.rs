//! End to end with the real binaries: two `quiesce-agent`s freezing real loop-mounted ext4
//! filesystems (EBS ids set statically in their config, as on a host without Nitro serials or
//! IMDS), `quiesce-coordinator` with the EBS provider pointed at moto_server on 127.0.0.1 with
//! credentials from the standard chain (environment), and `quiescectl backup --wait-complete`,
//! `sets show`, `restore --attach` and `sets delete`. Prints the freeze-window breakdown.
//!
//! Needs root (loop devices, FIFREEZE) and python3 with moto; fails without them (the
//! harness's one skip policy).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::{InstanceType, Placement, VolumeType};
use quiesce_integration_tests::{
    FsKind, LoopFs, Need, ROOT, bin, free_port, require, run_with_timeout,
};

/// Runs `cmd` (60 s at most), panicking with its output unless it succeeds.
fn run(cmd: &mut Command) -> Output {
    let out = run_with_timeout(cmd, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn moto_reset(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = write!(
        stream,
        "POST /moto-api/reset HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.1 200")
}

async fn instance_with_volumes(ec2: &aws_sdk_ec2::Client) -> (String, Vec<String>) {
    let run = ec2
        .run_instances()
        .image_id("ami-12345678")
        .min_count(1)
        .max_count(1)
        .instance_type(InstanceType::T3Micro)
        .placement(Placement::builder().availability_zone("us-east-1a").build())
        .send()
        .await
        .unwrap();
    let instance = run.instances()[0].instance_id().unwrap().to_owned();
    let mut volumes = Vec::new();
    for device in ["/dev/sdf", "/dev/sdg", "/dev/sdh"] {
        let volume = ec2
            .create_volume()
            .availability_zone("us-east-1a")
            .size(1)
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
    (instance, volumes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebs_backup_with_real_agents_and_binaries_against_moto() {
    let mut needs = ROOT.to_vec();
    needs.push(Need::Moto);
    require(&needs);

    let work = tempfile::Builder::new()
        .prefix("quiesce-ebs-e2e-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let state = tempfile::Builder::new()
        .prefix("quiesce-ebs-e2e-")
        .tempdir_in("/dev/shm")
        .unwrap();
    let fs: Vec<LoopFs> = ["db1-data", "db1-wal", "db2-data", "db2-wal"]
        .iter()
        .map(|n| {
            LoopFs::create(
                &work.path().join(format!("{n}.img")),
                32,
                FsKind::Ext4,
                &work.path().join(n),
            )
        })
        .collect();

    let moto_port = free_port();
    let _moto = Proc(
        Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p"])
            .arg(moto_port.to_string())
            .env("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !moto_reset(moto_port) {
        assert!(Instant::now() < deadline, "moto_server did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let endpoint = format!("http://127.0.0.1:{moto_port}");
    let sdk_config = aws_sdk_ec2::Config::builder()
        .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
        .region(aws_sdk_ec2::config::Region::new("us-east-1"))
        .endpoint_url(&endpoint)
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .http_client(
            aws_smithy_http_client::Builder::new()
                .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                    aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                ))
                .build_https(),
        )
        .build();
    let ec2 = aws_sdk_ec2::Client::from_conf(sdk_config);
    let (i1, v1) = instance_with_volumes(&ec2).await;
    let (i2, v2) = instance_with_volumes(&ec2).await;

    // Agents.
    let mut procs = Vec::new();
    let mut agent_ports = Vec::new();
    for (n, (instance, volumes)) in [(&i1, &v1), (&i2, &v2)].into_iter().enumerate() {
        let port = free_port();
        let state_dir = state.path().join(format!("db{}", n + 1));
        std::fs::create_dir_all(&state_dir).unwrap();
        let config = format!(
            r#"listen = "127.0.0.1:{port}"
state-dir = "{state}"
max-freeze = "30s"
[ebs]
instance-id = "{instance}"
[[volume]]
mount = "{data}"
ebs-volume-id = "{vdata}"
[[volume]]
mount = "{wal}"
ebs-volume-id = "{vwal}"
"#,
            state = state_dir.display(),
            data = fs[2 * n].mount_point().display(),
            wal = fs[2 * n + 1].mount_point().display(),
            vdata = volumes[0],
            vwal = volumes[1],
        );
        let path = work.path().join(format!("agent{}.toml", n + 1));
        std::fs::write(&path, config).unwrap();
        procs.push(Proc(
            Command::new(bin("quiesce-agent"))
                .args(["run", "--insecure", "--config"])
                .arg(&path)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        ));
        agent_ports.push(port);
    }

    // Coordinator: EBS credentials from the standard chain (environment here).
    let coord_port = free_port();
    let config = format!(
        r#"listen = "127.0.0.1:{coord_port}"
catalog = "{catalog}"
[[agent]]
name = "db1"
endpoint = "http://127.0.0.1:{a1}"
[[agent]]
name = "db2"
endpoint = "http://127.0.0.1:{a2}"
[[group]]
name = "pg"
provider = "ebs"
phase-timeout = "10s"
[group.ebs]
region = "us-east-1"
endpoint-url = "{endpoint}"
request-timeout = "5s"
poll-interval = "200ms"
tags = {{ team = "db" }}
[[group.member]]
agent = "db1"
mounts = ["{m1}", "{m2}"]
[[group.member]]
agent = "db2"
mounts = ["{m3}", "{m4}"]
"#,
        catalog = work.path().join("catalog.sqlite").display(),
        a1 = agent_ports[0],
        a2 = agent_ports[1],
        m1 = fs[0].mount_point().display(),
        m2 = fs[1].mount_point().display(),
        m3 = fs[2].mount_point().display(),
        m4 = fs[3].mount_point().display(),
    );
    let coord_config = work.path().join("coordinator.toml");
    std::fs::write(&coord_config, config).unwrap();
    procs.push(Proc(
        Command::new(bin("quiesce-coordinator"))
            .args(["run", "--insecure", "--config"])
            .arg(&coord_config)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CONFIG_FILE", "/nonexistent")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ));
    for port in agent_ports.iter().chain([&coord_port]) {
        wait_port(*port);
    }
    let ctl = |args: &[&str]| {
        let mut cmd = Command::new(bin("quiescectl"));
        cmd.args(["--insecure", "--endpoint"])
            .arg(format!("http://127.0.0.1:{coord_port}"))
            .args(args);
        cmd
    };

    // The agents report their static EBS ids.
    let out = run(&mut ctl(&["--json", "agents"]));
    let agents: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for (agent, (instance, volumes)) in agents["agents"]
        .as_array()
        .unwrap()
        .iter()
        .zip([(&i1, &v1), (&i2, &v2)])
    {
        assert_eq!(agent["instance_id"], instance.as_str(), "{agent:#}");
        let ids: Vec<&str> = agent["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["ebs_volume_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, [volumes[0].as_str(), volumes[1].as_str()]);
    }

    // Backup, waiting for completion.
    let out = run(&mut ctl(&["--json", "backup", "pg", "--wait-complete"]));
    let set: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(set["state"], "consistent", "{set:#}");
    assert_eq!(set["completion"], "completed", "{set:#}");
    let id = set["id"].as_str().unwrap().to_owned();
    let volumes = set["volumes"].as_array().unwrap();
    assert_eq!(volumes.len(), 4);
    for v in volumes {
        assert_eq!(v["snapshot_state"], "completed", "{v:#}");
        assert!(v["snapshot_id"].as_str().unwrap().starts_with("snap-"));
        assert!(v["ebs_volume_id"].as_str().unwrap().starts_with("vol-"));
    }
    assert!(
        set["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["held_continuously"] == true)
    );
    let at = |phase: &str| {
        set["phases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["phase"] == phase)
            .and_then(|p| p["at_ms"].as_u64())
            .unwrap()
    };
    println!(
        "EBS set against moto with real agents: freeze window {} ms = FIFREEZE on 2 hosts ≈{} ms + snapshot calls {} ms + thaw ≈{} ms; longest write stall {} ms",
        set["freeze_window_ms"],
        at("snapshotting") - at("freezing"),
        set["snapshot_calls_ms"],
        at("committed") - at("thawing"),
        set["max_write_stall_ms"],
    );

    // Show.
    let shown = String::from_utf8(run(&mut ctl(&["sets", "show", &id])).stdout).unwrap();
    assert!(shown.contains("completion     completed"), "{shown}");
    assert!(shown.contains("100%"), "{shown}");

    // Restore, attached to a fresh instance.
    let (target, _) = instance_with_volumes(&ec2).await;
    let out = run(&mut ctl(&[
        "--json",
        "restore",
        &id,
        "--availability-zone",
        "us-east-1a",
        "--attach",
        &target,
    ]));
    let restored: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let restored = restored["volumes"].as_array().unwrap();
    assert_eq!(restored.len(), 4);
    assert!(restored.iter().all(|r| r["attached"] == true));

    // Delete.
    let out = String::from_utf8(run(&mut ctl(&["sets", "delete", &id])).stdout).unwrap();
    assert!(out.contains("4 snapshots removed"), "{out}");
    let left = ec2
        .describe_snapshots()
        .owner_ids("self")
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("tag:quiesce:set-id")
                .values(&id)
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert!(left.snapshots().is_empty());
    drop(procs);
    drop(fs);
}
