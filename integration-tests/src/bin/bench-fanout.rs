//! `bench-fanout`: how the coordinator's parallel fan-out scales with the size of a group,
//! next to the same group driven one host at a time as a naive script would.
//!
//! For every size (default 1, 4, 16, 64 agents) it runs `--runs` sets and prints the median
//! freeze window (first freeze sent → last thaw returned), the median wall time of each phase,
//! and the coordinator's own overhead in the phases that hold the group frozen (freeze +
//! snapshot + thaw wall time minus the slowest member's simulated FIFREEZE and clone time).
//! The naive driver freezes every host one after another, then snapshots each, then thaws
//! each, over the same gRPC connections.
//!
//! Agents are real agent code (the agent library's freeze state machine and gRPC service) in a
//! child process, each on its own loopback port, with a test freezer that sleeps like FIFREEZE
//! (`--freeze-delay`, default 45 ms as measured on a loop ext4 under load) and a clone that
//! sleeps `--clone-delay` (default 2 ms, FICLONE of 1 GiB). With `--real N,...` (root) it also
//! runs groups of real `quiesce-agent` processes on loop volumes and reports their RSS.
//!
//!     cargo build --release -p quiesce-integration-tests --bin bench-fanout
//!     target/release/bench-fanout --runs 5
//!
//! Prints a Markdown table (docs/benchmarks.md holds one).

use quiesce_proto::coordinator::v1::SetState;
use quiesce_proto::states::StateText;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quiesce_agent::config::{Config as AgentConfig, VolumeConfig};
use quiesce_agent::freeze::FreezeManager;
use quiesce_agent::freezer::FakeFreezer;
use quiesce_agent::mounts::{DevId, MountEntry, MountError, MountTable};
use quiesce_agent::records::RecordStore;
use quiesce_agent::service::AgentService;
use quiesce_agent::volumes::AgentFiles;
use quiesce_agent::watchdog::NoWatchdog;
use quiesce_coordinator::agent_client::{AgentClient, AgentDirectory, GrpcAgents};
use quiesce_coordinator::catalog::Catalog;
use quiesce_coordinator::config::Config;
use quiesce_coordinator::workflow::Coordinator;
use quiesce_proto::agent::v1 as pb;
use quiesce_proto::agent::v1::agent_server::{Agent, AgentServer};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

struct Args {
    sizes: Vec<usize>,
    real: Vec<usize>,
    runs: usize,
    freeze_delay: Duration,
    clone_delay: Duration,
}

fn parse_args() -> Args {
    let mut args = Args {
        sizes: vec![1, 4, 16, 64],
        real: Vec::new(),
        runs: 5,
        freeze_delay: Duration::from_millis(45),
        clone_delay: Duration::from_millis(2),
    };
    let list = |v: &str| v.split(',').filter_map(|x| x.parse().ok()).collect();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_default();
        match flag.as_str() {
            "--sizes" => args.sizes = list(&value),
            "--real" => args.real = list(&value),
            "--runs" => args.runs = value.parse().expect("--runs N"),
            "--freeze-delay" => {
                args.freeze_delay = humantime::parse_duration(&value).expect("--freeze-delay")
            }
            "--clone-delay" => {
                args.clone_delay = humantime::parse_duration(&value).expect("--clone-delay")
            }
            other => {
                eprintln!(
                    "usage: bench-fanout [--sizes 1,4,16,64] [--real 1,4] [--runs 5] [--freeze-delay 45ms] [--clone-delay 2ms]\nunknown {other}"
                );
                std::process::exit(64);
            }
        }
    }
    args
}

// ---------------------------------------------------------------------------------------
// Simulated agents (child process).

/// One fake filesystem per agent: its mount point is a real directory (the fake freezer opens
/// it) on a device number of its own.
struct Table(PathBuf, DevId);

impl MountTable for Table {
    fn entries(&self) -> Result<Vec<MountEntry>, MountError> {
        Ok(vec![MountEntry {
            mount_id: 1,
            dev: self.1,
            root: "/".into(),
            mount_point: self.0.clone(),
            fs_type: "ext4".into(),
            source: format!("/dev/loop{}", self.1.minor),
        }])
    }
    fn loop_backing_file(&self, _dev: DevId) -> Option<PathBuf> {
        None
    }
    /// Its one directory, as the kernel would answer for a mount root.
    fn open_mount(
        &self,
        path: &std::path::Path,
    ) -> Result<quiesce_agent::mounts::OpenedMount, quiesce_agent::safepath::PathError> {
        let fd = quiesce_agent::freezer::open_mount_point(path).map_err(|source| {
            quiesce_agent::safepath::PathError::Open {
                path: path.to_owned(),
                component: path.to_owned(),
                source,
            }
        })?;
        Ok(quiesce_agent::mounts::OpenedMount {
            fd,
            mount_id: 1,
            is_mount_root: path == self.0,
        })
    }
}

/// The real agent service for everything about freezing; snapshots are a sleep (FICLONE).
struct SimAgent {
    inner: AgentService,
    clone_delay: Duration,
}

#[tonic::async_trait]
impl Agent for SimAgent {
    async fn get_host_info(
        &self,
        request: Request<pb::GetHostInfoRequest>,
    ) -> Result<Response<pb::GetHostInfoResponse>, Status> {
        let mut reply = self.inner.get_host_info(request).await?;
        for volume in &mut reply.get_mut().volumes {
            volume.backing_file = format!("/sim{}.img", volume.mount_point);
        }
        Ok(reply)
    }
    async fn prepare_volumes(
        &self,
        request: Request<pb::PrepareVolumesRequest>,
    ) -> Result<Response<pb::PrepareVolumesResponse>, Status> {
        self.inner.prepare_volumes(request).await
    }
    async fn describe_hooks(
        &self,
        request: Request<pb::DescribeHooksRequest>,
    ) -> Result<Response<pb::DescribeHooksResponse>, Status> {
        self.inner.describe_hooks(request).await
    }
    async fn verify_snapshots(
        &self,
        request: Request<pb::VerifySnapshotsRequest>,
    ) -> Result<Response<pb::VerifySnapshotsResponse>, Status> {
        self.inner.verify_snapshots(request).await
    }
    async fn freeze_volumes(
        &self,
        request: Request<pb::FreezeVolumesRequest>,
    ) -> Result<Response<pb::FreezeVolumesResponse>, Status> {
        self.inner.freeze_volumes(request).await
    }
    async fn renew_lease(
        &self,
        request: Request<pb::RenewLeaseRequest>,
    ) -> Result<Response<pb::RenewLeaseResponse>, Status> {
        self.inner.renew_lease(request).await
    }
    async fn thaw_volumes(
        &self,
        request: Request<pb::ThawVolumesRequest>,
    ) -> Result<Response<pb::ThawVolumesResponse>, Status> {
        self.inner.thaw_volumes(request).await
    }
    async fn create_snapshots(
        &self,
        request: Request<pb::CreateSnapshotsRequest>,
    ) -> Result<Response<pb::CreateSnapshotsResponse>, Status> {
        let req = request.into_inner();
        tokio::time::sleep(self.clone_delay).await;
        Ok(Response::new(pb::CreateSnapshotsResponse {
            snapshots: req
                .mount_points
                .iter()
                .map(|m| pb::VolumeSnapshot {
                    mount_point: m.clone(),
                    snapshot_id: format!("sim:{}:{m}", req.set_id),
                    size_bytes: 1 << 30,
                    duration_ms: self.clone_delay.as_millis() as u64,
                })
                .collect(),
        }))
    }
    async fn delete_snapshots(
        &self,
        request: Request<pb::DeleteSnapshotsRequest>,
    ) -> Result<Response<pb::DeleteSnapshotsResponse>, Status> {
        Ok(Response::new(pb::DeleteSnapshotsResponse {
            deleted: request.into_inner().snapshot_ids.len() as u32,
            ..Default::default()
        }))
    }
    async fn restore_snapshots(
        &self,
        _request: Request<pb::RestoreSnapshotsRequest>,
    ) -> Result<Response<pb::RestoreSnapshotsResponse>, Status> {
        Err(Status::unimplemented("simulated agent"))
    }
}

/// Child: serves `count` simulated agents, prints `PORTS p1,p2,…` and `MOUNTS m1,m2,…`, and
/// runs until its stdin closes.
fn serve_agents(count: usize, freeze_delay: Duration, clone_delay: Duration) {
    let dir = tempfile::tempdir().expect("tempdir");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut ports = Vec::new();
        let mut mounts = Vec::new();
        for i in 0..count {
            let mount = dir.path().join(format!("vol{i}"));
            let state = dir.path().join(format!("state{i}"));
            std::fs::create_dir_all(&mount).unwrap();
            let mut config = AgentConfig::parse(&format!(
                "listen = \"127.0.0.1:1\"\nstate-dir = \"{}\"\n",
                state.display()
            ))
            .unwrap();
            config.volumes = vec![VolumeConfig {
                mount: mount.clone(),
                ebs_volume_id: None,
            }];
            RecordStore::new(&state).create_dir().unwrap();
            let freezer = FakeFreezer::new();
            freezer.delay_freeze(&mount, freeze_delay);
            let manager = FreezeManager::new(
                Arc::new(config),
                Arc::new(freezer),
                Arc::new(Table(
                    mount.clone(),
                    DevId {
                        major: 7,
                        minor: i as u32,
                    },
                )),
                AgentFiles::default(),
                Arc::new(NoWatchdog),
            );
            let service = SimAgent {
                inner: AgentService::new(manager),
                clone_delay,
            };
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            ports.push(listener.local_addr().unwrap().port());
            mounts.push(mount.display().to_string());
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(AgentServer::new(service))
                    .serve_with_incoming(TcpListenerStream::new(listener)),
            );
        }
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        println!("PORTS {}", ports.join(","));
        println!("MOUNTS {}", mounts.join(","));
        std::io::stdout().flush().unwrap();
        tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
        })
        .await
        .unwrap();
    });
}

// ---------------------------------------------------------------------------------------
// Measuring.

#[derive(Default)]
struct Figures {
    windows: Vec<f64>,
    phases: HashMap<&'static str, Vec<f64>>,
    overhead: Vec<f64>,
    naive: Vec<f64>,
}

fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn coordinator_config(
    endpoints: &[(String, String)],
    mounts: &[Vec<String>],
    catalog: &Path,
) -> Config {
    let mut text = format!(
        "listen = \"127.0.0.1:1\"\nmetrics-listen = \"127.0.0.1:0\"\ncatalog = \"{}\"\n",
        catalog.display()
    );
    for (name, endpoint) in endpoints {
        text.push_str(&format!(
            "[[agent]]\nname = \"{name}\"\nendpoint = \"{endpoint}\"\n"
        ));
    }
    text.push_str(
        "[[group]]\nname = \"bench\"\nprovider = \"reflink\"\nlease = \"30s\"\nphase-timeout = \"30s\"\nfreeze-budget = \"60s\"\n",
    );
    for ((name, _), mounts) in endpoints.iter().zip(mounts) {
        let list: Vec<String> = mounts.iter().map(|m| format!("\"{m}\"")).collect();
        text.push_str(&format!(
            "[[group.member]]\nagent = \"{name}\"\nmounts = [{}]\n",
            list.join(", ")
        ));
    }
    Config::parse(&text).expect("bench config")
}

/// The phases of one set, in ms, from its phase marks.
fn phase_times(set: &quiesce_proto::coordinator::v1::SnapshotSet) -> HashMap<&'static str, f64> {
    let mut times = HashMap::new();
    for pair in set.phases.windows(2) {
        let took = pair[1].at_ms.saturating_sub(pair[0].at_ms) as f64;
        let name = match pair[0].phase().text() {
            "planned" => "plan",
            "preparing" => "prepare",
            "freezing" => "freeze",
            "snapshotting" => "snapshot",
            "thawing" => "thaw",
            _ => continue,
        };
        times.insert(name, took);
    }
    times
}

/// A naive script: freeze host 1, host 2, …; snapshot each; thaw each. Returns the freeze
/// window in ms.
async fn naive(agents: &[(String, Arc<dyn AgentClient>, Vec<String>)], round: usize) -> f64 {
    let set_id = format!("naive-{round}-{}", std::process::id());
    for (_, client, mounts) in agents {
        client
            .prepare_volumes(pb::PrepareVolumesRequest {
                set_id: set_id.clone(),
                mount_points: mounts.clone(),
                hooks: Vec::new(),
            })
            .await
            .expect("prepare");
    }
    let start = Instant::now();
    for (_, client, mounts) in agents {
        client
            .freeze_volumes(pb::FreezeVolumesRequest {
                set_id: set_id.clone(),
                mount_points: mounts.clone(),
                lease_ms: 30_000,
                hooks: Vec::new(),
            })
            .await
            .expect("freeze");
    }
    for (_, client, mounts) in agents {
        client
            .create_snapshots(pb::CreateSnapshotsRequest {
                set_id: set_id.clone(),
                mount_points: mounts.clone(),
                time_left_ms: 0,
            })
            .await
            .expect("snapshot");
    }
    for (_, client, _) in agents {
        client
            .thaw_volumes(pb::ThawVolumesRequest {
                set_id: set_id.clone(),
            })
            .await
            .expect("thaw");
    }
    let window = start.elapsed().as_secs_f64() * 1000.0;
    for (_, client, _) in agents {
        let _ = client
            .delete_snapshots(pb::DeleteSnapshotsRequest {
                set_id: set_id.clone(),
                snapshot_ids: Vec::new(),
            })
            .await;
    }
    window
}

async fn measure(
    endpoints: Vec<(String, String)>,
    mounts: Vec<Vec<String>>,
    runs: usize,
    agent_work_ms: f64,
) -> Figures {
    let dir = tempfile::tempdir().unwrap();
    let config = coordinator_config(&endpoints, &mounts, &dir.path().join("catalog.sqlite"));
    let catalog = Catalog::open(&config.catalog).unwrap();
    let agents = GrpcAgents::new(&config.agents, None).unwrap();
    let clients: Vec<(String, Arc<dyn AgentClient>, Vec<String>)> = endpoints
        .iter()
        .zip(&mounts)
        .map(|((name, _), m)| (name.clone(), agents.client(name).unwrap(), m.clone()))
        .collect();
    let coordinator = Coordinator::new(Arc::new(config), Arc::new(catalog), Arc::new(agents));
    // Warm the connections.
    let warm = coordinator.backup("bench").await.expect("warm-up set");
    assert_eq!(warm.state(), SetState::Consistent, "{}", warm.error);
    let mut figures = Figures::default();
    for round in 0..runs {
        let set = coordinator.backup("bench").await.expect("set");
        assert_eq!(set.state(), SetState::Consistent, "{}", set.error);
        figures.windows.push(set.freeze_window_ms as f64);
        let times = phase_times(&set);
        let frozen_phases = ["freeze", "snapshot", "thaw"]
            .iter()
            .filter_map(|p| times.get(p))
            .sum::<f64>();
        figures.overhead.push(frozen_phases - agent_work_ms);
        for (phase, took) in times {
            figures.phases.entry(phase).or_default().push(took);
        }
        figures.naive.push(naive(&clients, round).await);
    }
    figures
}

fn row(size: usize, mode: &str, f: &Figures) -> String {
    let p = |name: &str| median(f.phases.get(name).map(Vec::as_slice).unwrap_or(&[]));
    format!(
        "| {size} | {mode} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {:.0} |",
        median(&f.windows),
        p("plan"),
        p("prepare"),
        p("freeze"),
        p("snapshot"),
        p("thaw"),
        median(&f.overhead),
        median(&f.naive),
    )
}

// ---------------------------------------------------------------------------------------
// Real agents on loop volumes (root).

async fn real_agents(size: usize, runs: usize) -> (String, u64, u64) {
    use quiesce_integration_tests::multihost::Lab;
    let mut lab = Lab::new("bench", 256 + 64 * size as u64);
    let mut endpoints = Vec::new();
    let mut mounts = Vec::new();
    for i in 0..size {
        let mount = lab.volume(&format!("v{i}"), 32);
        lab.spawn_agent(
            &format!("a{i}"),
            2 + i as u8,
            std::slice::from_ref(&mount),
            "",
        );
        let agent = lab.agent(&format!("a{i}"));
        endpoints.push((agent.name.clone(), agent.endpoint()));
        mounts.push(vec![mount.display().to_string()]);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle = status_kib(lab.agent("a0").proc.pid() as u32, "VmRSS:");
    let figures = measure(endpoints, mounts, runs, 0.0).await;
    let peak = status_kib(lab.agent("a0").proc.pid() as u32, "VmHWM:");
    (row(size, "real agents, loop ext4", &figures), idle, peak)
}

fn main() {
    let mut argv = std::env::args().skip(1);
    if argv.next().as_deref() == Some("serve-agents") {
        let count = argv.next().and_then(|v| v.parse().ok()).expect("count");
        let freeze = humantime::parse_duration(&argv.next().unwrap()).unwrap();
        let clone = humantime::parse_duration(&argv.next().unwrap()).unwrap();
        serve_agents(count, freeze, clone);
        return;
    }
    let args = parse_args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "simulated FIFREEZE {} per agent, clone {}; {} runs per size (medians, ms)\n",
        humantime::format_duration(args.freeze_delay),
        humantime::format_duration(args.clone_delay),
        args.runs
    );
    println!(
        "| agents | agents are | freeze window | plan | prepare | freeze | snapshot | thaw | coordinator overhead while frozen | naive sequential freeze window |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut largest = (0, 0, 0, 0);
    for &size in &args.sizes {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "serve-agents",
                &size.to_string(),
                &humantime::format_duration(args.freeze_delay).to_string(),
                &humantime::format_duration(args.clone_delay).to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("agent child");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut ports = String::new();
        let mut mounts = String::new();
        out.read_line(&mut ports).unwrap();
        out.read_line(&mut mounts).unwrap();
        let endpoints: Vec<(String, String)> = ports
            .trim()
            .trim_start_matches("PORTS ")
            .split(',')
            .enumerate()
            .map(|(i, p)| (format!("a{i}"), format!("http://127.0.0.1:{p}")))
            .collect();
        let mounts: Vec<Vec<String>> = mounts
            .trim()
            .trim_start_matches("MOUNTS ")
            .split(',')
            .map(|m| vec![m.to_owned()])
            .collect();
        let work = (args.freeze_delay + args.clone_delay).as_secs_f64() * 1000.0;
        let figures = runtime.block_on(measure(endpoints, mounts, args.runs, work));
        println!(
            "{}",
            row(size, "simulated (agent code, test freezer)", &figures)
        );
        let me = std::process::id();
        largest = (
            size,
            status_kib(me, "VmRSS:"),
            status_kib(me, "VmHWM:"),
            status_kib(child.id(), "VmHWM:"),
        );
        drop(child.stdin.take());
        let _ = child.wait();
    }
    let mut agent_rss = None;
    for &size in &args.real {
        if !quiesce_integration_tests::multihost::have_root("bench-fanout --real") {
            break;
        }
        let (line, idle, peak) = runtime.block_on(real_agents(size, args.runs));
        println!("{line}");
        agent_rss = Some((idle, peak));
    }
    println!();
    println!(
        "coordinator (this process) at {} agents: RSS {} KiB, peak {} KiB; the {} simulated agents' process peak {} KiB",
        largest.0, largest.1, largest.2, largest.0, largest.3
    );
    if let Some((idle, peak)) = agent_rss {
        println!("one real quiesce-agent: idle RSS {idle} KiB, peak {peak} KiB");
    }
}
