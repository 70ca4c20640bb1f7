//! Shared by the `hooks_*` tests: loop volumes inside an XFS reflink pool, the agent and the
//! coordinator in one process (the real FreezeManager with real FIFREEZE, hooks and reflink
//! provider; the real workflow and catalog; no network), and restores of a set's images.
//!
//! Safety: every volume is a loop-mounted ext4 made here under /var/tmp. The `Lab` guard
//! thaws (`fsfreeze -u`) every volume before unmounting it, on success, failure and panic.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use quiesce_agent::config::Config as AgentConfig;
use quiesce_agent::freeze::FreezeManager;
use quiesce_agent::freezer::IoctlFreezer;
use quiesce_agent::mounts::ProcMountTable;
use quiesce_agent::service::AgentService;
use quiesce_agent::volumes::AgentFiles;
use quiesce_agent::watchdog::NoWatchdog;
use quiesce_coordinator::agent_client::AgentClient;
use quiesce_coordinator::catalog::Catalog;
use quiesce_coordinator::config::Config as CoordinatorConfig;
use quiesce_coordinator::workflow::Coordinator;
use quiesce_proto::agent::v1 as pb;
use quiesce_proto::agent::v1::agent_server::Agent;
use quiesce_proto::coordinator::v1::SnapshotSet;
use tonic::{Request, Status};

/// `true` when the test can run; prints why not otherwise (panics under CI).
pub fn can_run(what: &str, tools: &[&str]) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|tool| !Path::new(tool).exists() && which(tool).is_none())
        .collect();
    if root && missing.is_empty() && Path::new("/dev/loop-control").exists() {
        return true;
    }
    let why = if !root {
        "needs root".to_string()
    } else {
        format!("needs {}", missing.join(", "))
    };
    if std::env::var_os("CI").is_some() {
        panic!("{what}: {why}");
    }
    eprintln!("skipping {what}: {why}");
    false
}

pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(tool))
            .find(|p| p.is_file())
    })
}

/// Runs a command, panicking with its output when it fails.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    if !out.status.success() {
        panic!(
            "{program} {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command, returning whether it succeeded (output discarded).
pub fn try_run(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Loop volumes (ext4) whose images live in an XFS pool with reflink, all under one directory
/// of /var/tmp. Dropping it thaws, unmounts and removes everything.
pub struct Lab {
    pub dir: PathBuf,
    pub pool: PathBuf,
    mounts: Vec<PathBuf>,
}

impl Lab {
    pub fn new(name: &str) -> Lab {
        let dir = PathBuf::from(format!(
            "/var/tmp/quiesce-hooks-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let pool = dir.join("pool");
        std::fs::create_dir_all(&pool).unwrap();
        let image = dir.join("pool.img");
        run("truncate", &["-s", "6G", image.to_str().unwrap()]);
        run(
            "mkfs.xfs",
            &["-q", "-m", "reflink=1", image.to_str().unwrap()],
        );
        run(
            "mount",
            &[
                "-o",
                "loop",
                image.to_str().unwrap(),
                pool.to_str().unwrap(),
            ],
        );
        std::fs::create_dir_all(pool.join("images")).unwrap();
        Lab {
            dir,
            pool: pool.clone(),
            mounts: vec![pool],
        }
    }

    /// A new ext4 volume of `size_mb` MiB mounted at `DIR/mnt/NAME`.
    pub fn volume(&mut self, name: &str, size_mb: u64) -> PathBuf {
        let image = self.pool.join("images").join(format!("{name}.img"));
        run(
            "truncate",
            &["-s", &format!("{size_mb}M"), image.to_str().unwrap()],
        );
        run("mkfs.ext4", &["-q", "-F", image.to_str().unwrap()]);
        let mount = self.dir.join("mnt").join(name);
        self.mount_image(&image, &mount);
        mount
    }

    pub fn mount_image(&mut self, image: &Path, at: &Path) {
        std::fs::create_dir_all(at).unwrap();
        run(
            "mount",
            &["-o", "loop", image.to_str().unwrap(), at.to_str().unwrap()],
        );
        self.mounts.push(at.to_owned());
    }

    /// Thaws (harmless when not frozen) and unmounts.
    pub fn unmount(&mut self, at: &Path) {
        let _ = Command::new("fsfreeze").args(["-u"]).arg(at).output();
        let ok = try_run("umount", &[at.to_str().unwrap()]);
        if !ok {
            let _ = try_run("umount", &["-l", at.to_str().unwrap()]);
        }
        self.mounts.retain(|m| m != at);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Thaw everything first (a panic may have left a volume frozen), then unmount.
        for mount in self.mounts.iter().rev() {
            let _ = Command::new("fsfreeze").args(["-u"]).arg(mount).output();
        }
        for mount in self.mounts.clone().iter().rev() {
            if !try_run("umount", &[mount.to_str().unwrap()]) {
                let _ = try_run("umount", &["-l", mount.to_str().unwrap()]);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The agent (in process, real freezer and hooks) and a coordinator that calls it directly.
pub struct Stack {
    pub coordinator: Arc<Coordinator>,
    pub agent: Arc<LocalAgent>,
    _state: tempfile::TempDir,
}

/// Builds the stack. `agent_extra` is appended to the agent config (volumes, hooks);
/// `groups` to the coordinator's (`[[group]]` tables whose members are agent `db1`).
pub fn stack(agent_extra: &str, groups: &str) -> Stack {
    let state = tempfile::Builder::new()
        .prefix("quiesce-hooks-state")
        .tempdir_in("/dev/shm")
        .unwrap();
    let agent_config = AgentConfig::parse(&format!(
        "listen = \"127.0.0.1:1\"\nstate-dir = \"{}\"\nmax-freeze = \"60s\"\n{agent_extra}",
        state.path().display()
    ))
    .unwrap();
    let problems = agent_config.problems(true);
    assert!(problems.is_empty(), "agent config: {problems:?}");
    quiesce_agent::records::RecordStore::new(state.path())
        .create_dir()
        .unwrap();
    let files = AgentFiles::discover(state.path());
    let manager = FreezeManager::new(
        Arc::new(agent_config),
        Arc::new(IoctlFreezer),
        Arc::new(ProcMountTable::host()),
        files,
        Arc::new(NoWatchdog),
    );
    let agent = Arc::new(LocalAgent(AgentService::new(manager)));
    let config = CoordinatorConfig::parse(&format!(
        r#"
listen = "127.0.0.1:1"
catalog = ":memory:"
[[agent]]
name = "db1"
endpoint = "http://127.0.0.1:1"
{groups}
"#
    ))
    .unwrap();
    let mut agents: HashMap<String, Arc<dyn AgentClient>> = HashMap::new();
    agents.insert("db1".into(), agent.clone());
    let coordinator = Coordinator::new(
        Arc::new(config),
        Arc::new(Catalog::in_memory().unwrap()),
        Arc::new(agents),
    );
    Stack {
        coordinator,
        agent,
        _state: state,
    }
}

/// A `[[group]]` of agent db1 with these mounts and hooks.
pub fn group(name: &str, mounts: &[&Path], hooks: &[&str]) -> String {
    let mounts: Vec<String> = mounts
        .iter()
        .map(|m| format!("{:?}", m.display().to_string()))
        .collect();
    let hooks: Vec<String> = hooks.iter().map(|h| format!("{h:?}")).collect();
    format!(
        "[[group]]\nname = \"{name}\"\nprovider = \"reflink\"\nlease = \"20s\"\nphase-timeout = \"30s\"\n[[group.member]]\nagent = \"db1\"\nmounts = [{}]\nhooks = [{}]\n",
        mounts.join(", "),
        hooks.join(", ")
    )
}

/// `[[volume]]` tables for the agent config.
pub fn volumes(mounts: &[&Path]) -> String {
    mounts
        .iter()
        .map(|m| format!("[[volume]]\nmount = {:?}\n", m.display().to_string()))
        .collect()
}

impl Stack {
    pub async fn backup(&self, group: &str) -> SnapshotSet {
        self.coordinator.backup(group).await.unwrap()
    }

    /// Clones a consistent set's images into `target` (on the pool): mount point → image.
    pub async fn restore(&self, set: &SnapshotSet, target: &Path) -> HashMap<String, PathBuf> {
        let restored = self
            .coordinator
            .restore_set(&set.id, target.to_str().unwrap())
            .await
            .unwrap();
        restored
            .into_iter()
            .map(|r| (r.mount_point, PathBuf::from(r.image_path)))
            .collect()
    }
}

/// A hook output value of a set.
pub fn hook_value(set: &SnapshotSet, hook: &str, key: &str) -> Option<String> {
    set.hook_outputs
        .iter()
        .find(|o| o.hook == hook)?
        .values
        .iter()
        .find(|v| v.key == key)
        .map(|v| v.value.clone())
}

pub fn hook_ms(set: &SnapshotSet) -> u64 {
    set.hook_outputs
        .iter()
        .map(|o| o.quiesce_ms + o.resume_ms)
        .sum()
}

pub fn median(values: &mut [u64]) -> u64 {
    values.sort_unstable();
    if values.is_empty() {
        0
    } else {
        values[values.len() / 2]
    }
}

/// Whether any of these mounts is frozen right now (FIFREEZE answers EBUSY).
pub fn none_frozen(mounts: &[&Path]) -> bool {
    for mount in mounts {
        // `fsfreeze -f` on a frozen fs fails with EBUSY; on a thawed one it freezes: undo.
        if try_run("fsfreeze", &["-f", mount.to_str().unwrap()]) {
            run("fsfreeze", &["-u", mount.to_str().unwrap()]);
        } else {
            return false;
        }
    }
    true
}

pub struct LocalAgent(pub AgentService);

fn inner<T>(r: Result<tonic::Response<T>, Status>) -> Result<T, Status> {
    r.map(tonic::Response::into_inner)
}

#[tonic::async_trait]
impl AgentClient for LocalAgent {
    async fn get_host_info(&self) -> Result<pb::GetHostInfoResponse, Status> {
        inner(
            self.0
                .get_host_info(Request::new(pb::GetHostInfoRequest {}))
                .await,
        )
    }
    async fn prepare_volumes(
        &self,
        req: pb::PrepareVolumesRequest,
    ) -> Result<pb::PrepareVolumesResponse, Status> {
        inner(self.0.prepare_volumes(Request::new(req)).await)
    }
    async fn freeze_volumes(
        &self,
        req: pb::FreezeVolumesRequest,
    ) -> Result<pb::FreezeVolumesResponse, Status> {
        inner(self.0.freeze_volumes(Request::new(req)).await)
    }
    async fn renew_lease(
        &self,
        req: pb::RenewLeaseRequest,
    ) -> Result<pb::RenewLeaseResponse, Status> {
        inner(self.0.renew_lease(Request::new(req)).await)
    }
    async fn thaw_volumes(
        &self,
        req: pb::ThawVolumesRequest,
    ) -> Result<pb::ThawVolumesResponse, Status> {
        inner(self.0.thaw_volumes(Request::new(req)).await)
    }
    async fn create_snapshots(
        &self,
        req: pb::CreateSnapshotsRequest,
    ) -> Result<pb::CreateSnapshotsResponse, Status> {
        inner(self.0.create_snapshots(Request::new(req)).await)
    }
    async fn delete_snapshots(
        &self,
        req: pb::DeleteSnapshotsRequest,
    ) -> Result<pb::DeleteSnapshotsResponse, Status> {
        inner(self.0.delete_snapshots(Request::new(req)).await)
    }
    async fn restore_snapshots(
        &self,
        req: pb::RestoreSnapshotsRequest,
    ) -> Result<pb::RestoreSnapshotsResponse, Status> {
        inner(self.0.restore_snapshots(Request::new(req)).await)
    }
    async fn describe_hooks(
        &self,
        req: pb::DescribeHooksRequest,
    ) -> Result<pb::DescribeHooksResponse, Status> {
        inner(self.0.describe_hooks(Request::new(req)).await)
    }
}

/// Writes a secret file with mode 0600.
pub fn secret(path: &Path, content: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, content).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}
