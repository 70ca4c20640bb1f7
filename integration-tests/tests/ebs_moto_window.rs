//! Only the snapshot calls while frozen (issue 12): the EBS provider talks to moto_server
//! through a timing proxy on 127.0.0.1 that timestamps every EC2 request (its `Action`) and
//! notes whether a member was frozen when it arrived and when its answer went back. Between
//! the first freeze and the last thaw nothing but `CreateSnapshots`/`CreateSnapshot` may be
//! sent: not the `DeleteSnapshot` of what moto captured outside the group (it ignores
//! `ExcludeDataVolumeIds`, so there are such strays to delete), not any `Describe*`.

use quiesce_proto::coordinator::v1::SetState;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::{InstanceType, Placement, VolumeType};
use quiesce_coordinator::agent_client::AgentClient;
use quiesce_coordinator::catalog::Catalog;
use quiesce_coordinator::config::Config;
use quiesce_coordinator::ebs::EbsProvider;
use quiesce_coordinator::ebs::sdk::SdkEc2;
use quiesce_coordinator::fake_agent::FakeAgent;
use quiesce_coordinator::workflow::Coordinator;
use quiesce_integration_tests::{Need, free_port, require};

struct Moto {
    child: Child,
    port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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
    let moto = Moto { child, port };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reset = TcpStream::connect(("127.0.0.1", port)).and_then(|mut s| {
            write!(
                s,
                "POST /moto-api/reset HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )?;
            let mut answer = String::new();
            s.read_to_string(&mut answer)?;
            Ok(answer.contains(" 200 "))
        });
        if let Ok(true) = reset {
            break;
        }
        assert!(Instant::now() < deadline, "moto_server did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    moto
}

/// One EC2 request as the proxy saw it.
#[derive(Debug, Clone)]
struct Seen {
    action: String,
    arrived: Instant,
    answered: Instant,
    frozen_at_arrival: bool,
    frozen_at_answer: bool,
}

type Probe = Arc<dyn Fn() -> bool + Send + Sync>;

/// A one-request-per-connection HTTP proxy to moto on 127.0.0.1, recording every request.
fn start_proxy(upstream: u16, probe: Probe) -> (u16, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let (probe, log) = (probe.clone(), log.clone());
            std::thread::spawn(move || {
                let _ = relay(client, upstream, probe.as_ref(), &log);
            });
        }
    });
    (port, seen)
}

fn relay(
    mut client: TcpStream,
    upstream: u16,
    probe: &(dyn Fn() -> bool + Send + Sync),
    log: &Mutex<Vec<Seen>>,
) -> std::io::Result<()> {
    // The head, up to the blank line (capped), then the body by Content-Length.
    let mut buf = Vec::new();
    let mut byte = [0u8; 4096];
    let head_end = loop {
        let n = client.read(&mut byte)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&byte[..n]);
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        assert!(buf.len() < 1 << 20, "request head over 1 MiB");
    };
    let arrived = Instant::now();
    let frozen_at_arrival = probe();
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = client.read(&mut byte)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&byte[..n]);
    }
    let body = String::from_utf8_lossy(&buf[head_end..]).into_owned();
    let action = body
        .split('&')
        .find_map(|kv| kv.strip_prefix("Action="))
        .unwrap_or("<none>")
        .to_owned();
    // Forward with `Connection: close`, so that one connection carries one request.
    let mut forwarded: String = head
        .lines()
        .filter(|l| !l.is_empty() && !l.to_ascii_lowercase().starts_with("connection:"))
        .map(|l| format!("{l}\r\n"))
        .collect();
    forwarded.push_str("Connection: close\r\n\r\n");
    let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
    up.write_all(forwarded.as_bytes())?;
    up.write_all(&buf[head_end..])?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer)?;
    let text = String::from_utf8_lossy(&answer);
    if !text
        .split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase()
        .contains("connection: close")
        && let Some(line_end) = answer.windows(2).position(|w| w == b"\r\n")
    {
        answer.splice(
            line_end + 2..line_end + 2,
            b"Connection: close\r\n".iter().copied(),
        );
    }
    let answered = Instant::now();
    let frozen_at_answer = probe();
    log.lock().unwrap().push(Seen {
        action,
        arrived,
        answered,
        frozen_at_arrival,
        frozen_at_answer,
    });
    client.write_all(&answer)?;
    Ok(())
}

/// Waits until no request has reached the proxy for `gap` (at most 60 s).
async fn quiet(seen: &Mutex<Vec<Seen>>, gap: Duration) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let last = seen.lock().unwrap().last().map(|s| s.answered);
        if last.is_none_or(|at| at.elapsed() >= gap) || Instant::now() > deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_create_snapshots_reach_ec2_between_the_first_freeze_and_the_last_thaw() {
    let moto = start_moto();
    let db1 = FakeAgent::new("db1", &["/data", "/wal"]);
    let db2 = FakeAgent::new("db2", &["/data", "/wal"]);
    let probe: Probe = {
        let (a, b) = (db1.clone(), db2.clone());
        Arc::new(move || a.is_frozen() || b.is_frozen())
    };
    let (proxy, seen) = start_proxy(moto.port, probe);
    let config = Arc::new(config(&format!("http://127.0.0.1:{proxy}")));
    assert_eq!(config.problems(true), Vec::<String>::new());
    let ebs_config = config.group("pg").unwrap().ebs.clone().unwrap();
    let sdk = Arc::new(SdkEc2::with_static_credentials(&ebs_config, "testing", "testing").await);
    let ec2 = sdk.client().clone();
    let (i1, v1) = instance_with_volumes(&ec2).await;
    let (i2, v2) = instance_with_volumes(&ec2).await;
    db1.set_ebs(&i1, &[("/data", &v1[0]), ("/wal", &v1[1])]);
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

    quiet(&seen, Duration::from_secs(2)).await;
    for round in 0..3 {
        seen.lock().unwrap().clear();
        let set = coordinator.backup("pg").await.unwrap();
        assert_eq!(
            set.state(),
            SetState::Consistent,
            "round {round}: {}",
            set.error
        );
        assert!(!db1.is_frozen() && !db2.is_frozen());
        // The strays (moto captured each instance's outside volume) are deleted after the
        // thaw: wait until exactly the group's 4 snapshots remain.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found = provider.find_by_tag(&set.id, None).await.unwrap();
            if found.len() == 4 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: strays not deleted: {found:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let seen_log = seen.clone();
        let seen = seen.lock().unwrap().clone();
        let start = seen.first().map(|s| s.arrived).unwrap();
        let timeline: Vec<String> = seen
            .iter()
            .map(|s| {
                format!(
                    "{:>6} ms–{:>6} ms {}{}",
                    s.arrived.duration_since(start).as_millis(),
                    s.answered.duration_since(start).as_millis(),
                    s.action,
                    if s.frozen_at_arrival || s.frozen_at_answer {
                        " (frozen)"
                    } else {
                        ""
                    }
                )
            })
            .collect();
        let timeline = timeline.join("\n");
        let creates = seen
            .iter()
            .filter(|s| s.action == "CreateSnapshots" && s.frozen_at_arrival)
            .count();
        assert_eq!(
            creates, 2,
            "round {round}: one CreateSnapshots per instance, sent frozen:\n{timeline}"
        );
        let deletes = seen.iter().filter(|s| s.action == "DeleteSnapshot").count();
        assert!(
            deletes >= 2,
            "round {round}: each stray deleted:\n{timeline}"
        );
        for s in &seen {
            let create = matches!(s.action.as_str(), "CreateSnapshots" | "CreateSnapshot");
            assert!(
                create || !(s.frozen_at_arrival || s.frozen_at_answer),
                "round {round}: {} reached EC2 while the group was frozen:\n{timeline}",
                s.action
            );
        }
        eprintln!("round {round}:\n{timeline}");
        // The set's background work after its commit (completion: DescribeInstances, CreateTags)
        // is another set's business: let it finish before the next round is timed.
        quiet(&seen_log, Duration::from_secs(2)).await;
    }
    drop(moto);
}
