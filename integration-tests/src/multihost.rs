//! Multi-host harness: an XFS reflink pool on a loop file, ext4 loop volumes inside it, agents
//! as separate processes on distinct loopback addresses (127.0.0.2, 127.0.0.3, …), a
//! coordinator process, and a gRPC client for it.
//!
//! Everything a [`Lab`] made is undone in its `Drop`, also on panic, in this order: processes
//! killed (stopped ones continued first), PostgreSQL servers stopped, every volume thawed
//! (`fsfreeze -u`, errors ignored) BEFORE it is unmounted, loop devices detached, the pool and
//! the tmpfs unmounted, the work directory removed. Tests freeze only volumes made here.
//!
//! The hooks tests use the same [`Lab`] for their volumes (with agent and coordinator in their
//! own process instead of as child processes).

use quiesce_proto::coordinator::v1::SetState;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use quiesce_proto::coordinator::v1 as pb;
use quiesce_proto::coordinator::v1::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

use crate::env::quiet;
use crate::loopfs::{FsKind, LoopFs, Tmpfs};

/// [`crate::require`]s what a root test needs and returns `true`; it never returns `false`
/// (the one skip policy: a test that cannot run fails). `test` is kept for old call sites.
pub fn have_root(_test: &str) -> bool {
    crate::env::require_root()
}

pub use crate::env::{bin, sh};
/// A free TCP port on an address of 127.0.0.0/8 (the harness's one implementation).
pub use crate::process::free_port_on as free_port;

/// A child process with its log file; killed in `Drop`.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
    stopped: bool,
}

impl Proc {
    pub fn spawn(name: &str, command: &mut Command, log: PathBuf) -> Proc {
        let file = fs::File::create(&log).expect("log file");
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        Proc {
            name: name.into(),
            child: Some(child),
            log,
            stopped: false,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        if self.child.is_some() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal);
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.stopped {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(child.id() as i32),
                    nix::sys::signal::Signal::SIGCONT,
                );
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then SIGKILL after 10 s.
    pub fn stop(&mut self) {
        if self.stopped {
            self.cont();
        }
        self.signal(nix::sys::signal::Signal::SIGTERM);
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the process is alive but answers nothing.
    pub fn pause(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
        self.stopped = true;
    }

    pub fn cont(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
        self.stopped = false;
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log_text().contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "{}: no {needle:?} in its log within {timeout:?}:\n{}",
            self.name,
            self.log_text()
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// An agent process and what it serves.
pub struct AgentProc {
    pub name: String,
    pub ip: Ipv4Addr,
    pub port: u16,
    pub metrics: SocketAddr,
    pub mounts: Vec<PathBuf>,
    pub snapshot_dir: PathBuf,
    pub config: PathBuf,
    pub proc: Proc,
}

impl AgentProc {
    pub fn endpoint(&self) -> String {
        format!("http://{}:{}", self.ip, self.port)
    }
}

/// A coordinator process.
pub struct CoordinatorProc {
    pub port: u16,
    pub metrics: SocketAddr,
    pub config: PathBuf,
    pub catalog: PathBuf,
    pub proc: Proc,
}

impl CoordinatorProc {
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Connects, retrying until the coordinator serves (recovery runs before it does).
    pub async fn client(&self) -> CoordinatorClient<Channel> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match CoordinatorClient::connect(self.endpoint()).await {
                Ok(client) => return client,
                Err(e) if Instant::now() > deadline => {
                    panic!("coordinator never served: {e}\n{}", self.proc.log_text())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

pub struct Lab {
    pub dir: PathBuf,
    pub pool: PathBuf,
    pub run: PathBuf,
    /// Loop volumes (and images attached from the pool), in the order made.
    volumes: Vec<LoopFs>,
    run_fs: Option<Tmpfs>,
    pool_fs: Option<LoopFs>,
    /// PostgreSQL data directories to stop (immediate) before unmounting.
    pub pg_datadirs: Vec<PathBuf>,
    pub agents: Vec<AgentProc>,
    pub coordinator: Option<CoordinatorProc>,
}

impl Lab {
    /// A pool of `pool_mb` MiB (sparse XFS with reflink, on a loop device) and a small tmpfs
    /// for agent state, under a fresh `/var/tmp/qmh-<tag>.XXXX`.
    pub fn new(tag: &str, pool_mb: u64) -> Lab {
        let dir = PathBuf::from(sh("mktemp", &["-d", &format!("/var/tmp/qmh-{tag}.XXXX")]).trim());
        // mktemp makes it 0700: database servers run as their own users (mysql, postgres)
        // and must be able to reach their data directories below it.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let pool = dir.join("pool");
        let run = dir.join("run");
        let pool_fs = LoopFs::create(&dir.join("pool.img"), pool_mb, FsKind::XfsReflink, &pool);
        let run_fs = Tmpfs::mount(&run, 16);
        Lab {
            pool,
            run,
            dir,
            volumes: Vec::new(),
            run_fs: Some(run_fs),
            pool_fs: Some(pool_fs),
            pg_datadirs: Vec::new(),
            agents: Vec::new(),
            coordinator: None,
        }
    }

    /// An ext4 volume of `mb` MiB in the pool, loop-mounted at `<dir>/vol/<name>`.
    pub fn volume(&mut self, name: &str, mb: u64) -> PathBuf {
        let image = self.pool.join(format!("{name}.img"));
        let mount = self.dir.join("vol").join(name);
        self.volumes
            .push(LoopFs::create(&image, mb, FsKind::Ext4, &mount));
        mount
    }

    /// Loop-mounts an image (read-write) and remembers to undo it.
    pub fn mount_image(&mut self, image: &Path, mount: &Path) {
        self.volumes.push(LoopFs::attach(image, mount, false));
    }

    /// Thaws (harmless when not frozen), unmounts and detaches one volume mounted by
    /// `mount_image`/`volume`.
    pub fn unmount(&mut self, mount: &Path) {
        if let Some(index) = self.volumes.iter().position(|v| v.mount_point() == mount) {
            drop(self.volumes.remove(index));
        }
    }

    /// Starts an agent on `127.0.0.<host>` owning `mounts`.
    pub fn spawn_agent(&mut self, name: &str, host: u8, mounts: &[PathBuf], extra: &str) {
        let ip = Ipv4Addr::new(127, 0, 0, host);
        let port = free_port(ip);
        let metrics = SocketAddr::from((ip, free_port(ip)));
        let state = self.run.join(name);
        fs::create_dir_all(&state).unwrap();
        let snapshot_dir = self.pool.join("snapshots").join(name);
        fs::create_dir_all(&snapshot_dir).unwrap();
        let mut config = format!(
            "listen = \"{ip}:{port}\"\nmetrics-listen = \"{metrics}\"\nstate-dir = \"{}\"\n{extra}\n",
            state.display()
        );
        for mount in mounts {
            config.push_str(&format!("[[volume]]\nmount = \"{}\"\n", mount.display()));
        }
        config.push_str(&format!(
            "[reflink]\nsnapshot-dir = \"{}\"\n",
            snapshot_dir.display()
        ));
        let path = self.dir.join(format!("{name}.toml"));
        fs::write(&path, config).unwrap();
        let proc = self.start_agent_proc(name, &path);
        self.agents.push(AgentProc {
            name: name.into(),
            ip,
            port,
            metrics,
            mounts: mounts.to_vec(),
            snapshot_dir,
            config: path,
            proc,
        });
        wait_port(
            SocketAddr::from((ip, port)),
            &self.agents.last().unwrap().proc,
        );
    }

    fn start_agent_proc(&self, name: &str, config: &Path) -> Proc {
        let log = self.dir.join(format!("{name}.log"));
        // Append to the log across restarts.
        let previous = fs::read_to_string(&log).unwrap_or_default();
        let proc = Proc::spawn(
            name,
            Command::new(bin("quiesce-agent"))
                .args(["run", "--insecure", "-c", path(config)])
                .env("QUIESCE_LOG", "info"),
            log.clone(),
        );
        if !previous.is_empty() {
            let _ = fs::write(self.dir.join(format!("{name}.log.previous")), previous);
        }
        proc
    }

    /// Restarts an agent that was killed.
    pub fn restart_agent(&mut self, name: &str) {
        let index = self.agent_index(name);
        let config = self.agents[index].config.clone();
        let proc = self.start_agent_proc(name, &config);
        self.agents[index].proc = proc;
        let a = &self.agents[index];
        wait_port(SocketAddr::from((a.ip, a.port)), &a.proc);
    }

    fn agent_index(&self, name: &str) -> usize {
        self.agents
            .iter()
            .position(|a| a.name == name)
            .unwrap_or_else(|| panic!("no agent {name}"))
    }

    pub fn agent(&mut self, name: &str) -> &mut AgentProc {
        let index = self.agent_index(name);
        &mut self.agents[index]
    }

    /// Writes the coordinator config: every agent of the lab, then `groups` (TOML).
    pub fn write_coordinator_config(&self, groups: &str) -> (PathBuf, u16, SocketAddr) {
        let port = free_port(Ipv4Addr::LOCALHOST);
        let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port(Ipv4Addr::LOCALHOST)));
        let mut config = format!(
            "listen = \"127.0.0.1:{port}\"\nmetrics-listen = \"{metrics}\"\ncatalog = \"{}\"\n",
            self.dir.join("catalog.sqlite").display()
        );
        for agent in &self.agents {
            config.push_str(&format!(
                "[[agent]]\nname = \"{}\"\nendpoint = \"{}\"\n",
                agent.name,
                agent.endpoint()
            ));
        }
        config.push_str(groups);
        let path = self.dir.join("coordinator.toml");
        fs::write(&path, config).unwrap();
        (path, port, metrics)
    }

    /// Starts (or restarts, same config and catalog) the coordinator with extra env.
    pub fn start_coordinator(&mut self, groups: Option<&str>, env: &[(&str, &str)]) {
        let (config, port, metrics) = match (groups, &self.coordinator) {
            (Some(groups), _) => self.write_coordinator_config(groups),
            (None, Some(c)) => (c.config.clone(), c.port, c.metrics),
            (None, None) => panic!("first start needs the groups"),
        };
        if let Some(mut old) = self.coordinator.take() {
            old.proc.kill9();
        }
        let runs = fs::read_dir(&self.dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().starts_with("coordinator-"))
                    .count()
            })
            .unwrap_or(0);
        let log = self.dir.join(format!("coordinator-{runs}.log"));
        let mut command = Command::new(bin("quiesce-coordinator"));
        command
            .args(["run", "--insecure", "-c", path(&config)])
            .env("QUIESCE_LOG", "info")
            .env_remove("QUIESCE_TEST_PAUSE_AFTER");
        for (key, value) in env {
            command.env(key, value);
        }
        let proc = Proc::spawn("coordinator", &mut command, log);
        wait_port(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), &proc);
        self.coordinator = Some(CoordinatorProc {
            port,
            metrics,
            catalog: self.dir.join("catalog.sqlite"),
            config,
            proc,
        });
    }

    pub fn coordinator(&mut self) -> &mut CoordinatorProc {
        self.coordinator.as_mut().expect("coordinator started")
    }

    /// Every snapshot file any agent holds for `set_id`.
    pub fn snapshot_files(&self, set_id: &str) -> Vec<PathBuf> {
        let mut found = Vec::new();
        for agent in &self.agents {
            let dir = agent.snapshot_dir.join(set_id);
            if let Ok(entries) = fs::read_dir(&dir) {
                found.extend(entries.filter_map(|e| e.ok()).map(|e| e.path()));
            }
        }
        found
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut c) = self.coordinator.take() {
            c.proc.kill9();
        }
        for agent in &mut self.agents {
            agent.proc.kill9();
        }
        for datadir in &self.pg_datadirs {
            let _ = Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg("/usr/lib/postgresql/15/bin/pg_ctl")
                .args(["stop", "-m", "immediate", "-D"])
                .arg(datadir)
                .current_dir("/")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        // Thaw everything before any unmount (each guard thaws itself again before its own).
        for volume in &self.volumes {
            quiet(Command::new("fsfreeze").arg("-u").arg(volume.mount_point()));
        }
        while let Some(volume) = self.volumes.pop() {
            drop(volume);
        }
        drop(self.run_fs.take());
        drop(self.pool_fs.take());
        if std::env::var_os("QUIESCE_KEEP_LAB").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("lab kept in {}", self.dir.display());
        }
    }
}

fn wait_port(addr: SocketAddr, proc: &Proc) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!(
        "{} never listened on {addr}:\n{}",
        proc.name,
        proc.log_text()
    );
}

pub fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Whether the kernel holds `mount` frozen: FIFREEZE answers EBUSY on a frozen filesystem.
/// A probe that froze it thaws it at once. Meant for volumes no set is working on; while an
/// agent may still be thawing (its lease thread after its guardian, say), that agent's late
/// FITHAW can end the probe's own freeze, so the probe's thaw then finds nothing frozen.
pub fn is_frozen(mount: &Path) -> bool {
    let out = Command::new("fsfreeze")
        .arg("-f")
        .arg(mount)
        .output()
        .expect("fsfreeze");
    if out.status.success() {
        let thaw = Command::new("fsfreeze")
            .arg("-u")
            .arg(mount)
            .output()
            .expect("fsfreeze -u");
        let err = String::from_utf8_lossy(&thaw.stderr);
        // EINVAL: someone else's FITHAW already ended the probe's freeze. Either way the
        // probe's FIFREEZE succeeding proved the volume was not frozen.
        assert!(
            thaw.status.success() || err.contains("Invalid argument"),
            "fsfreeze -u {}: {err}",
            mount.display()
        );
        return false;
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("busy"),
        "fsfreeze -f {}: {err}",
        mount.display()
    );
    true
}

/// Creates a set and polls it to its end.
pub async fn backup(client: &mut CoordinatorClient<Channel>, group: &str) -> pb::SnapshotSet {
    let id = client
        .create_set(pb::CreateSetRequest {
            group: group.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("create set of {group}: {e}"))
        .into_inner()
        .set_id;
    wait_set(client, &id, Duration::from_secs(60)).await
}

pub async fn get_set(client: &mut CoordinatorClient<Channel>, id: &str) -> pb::SnapshotSet {
    client
        .get_set(pb::GetSetRequest { set_id: id.into() })
        .await
        .unwrap_or_else(|e| panic!("get set {id}: {e}"))
        .into_inner()
        .set
        .expect("set")
}

pub async fn wait_set(
    client: &mut CoordinatorClient<Channel>,
    id: &str,
    timeout: Duration,
) -> pb::SnapshotSet {
    let deadline = Instant::now() + timeout;
    loop {
        let set = get_set(client, id).await;
        if set.state() != SetState::Running {
            return set;
        }
        assert!(Instant::now() < deadline, "set {id} still running: {set:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `GET /metrics` over plain HTTP.
pub fn scrape(addr: SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("metrics at {addr}: {e}"));
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).unwrap();
    body
}

/// Root tests that build labs run one at a time within a test binary: the harness's one lock
/// ([`crate::serial`]), taken from async tests (each test runs on its own thread and runtime,
/// so blocking that thread while another test holds it is what serialising means).
pub async fn serial() -> crate::env::SerialGuard {
    crate::env::serial()
}
