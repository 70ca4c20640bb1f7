//! Shared by the `hooks_*` tests: loop volumes inside an XFS reflink pool, the agent and the
//! coordinator in one process (the real FreezeManager with real FIFREEZE, hooks and reflink
//! provider; the real workflow and catalog; no network), and restores of a set's images.
//!
//! Safety: every volume is a loop-mounted ext4 made by the harness's [`Lab`] under /var/tmp,
//! whose guard thaws (`fsfreeze -u`) every volume before unmounting it, on success, failure
//! and panic.
#![allow(dead_code)]

pub mod mariadb;

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
use quiesce_integration_tests::env::{Need, quiet, require, sh};
pub use quiesce_integration_tests::multihost::Lab;
use quiesce_proto::agent::v1 as pb;
use quiesce_proto::agent::v1::agent_server::Agent;
use quiesce_proto::coordinator::v1::SnapshotSet;
use tonic::{Request, Status};

/// The one skip policy ([`quiesce_integration_tests::require`]): fails, naming what is
/// missing, unless this is root with loop devices and every tool in `tools` (names or paths).
/// Returns `true` (old call sites write `if !can_run(..) { return; }`); never `false`.
pub fn can_run(_what: &str, tools: &[&str]) -> bool {
    let mut needs: Vec<Need<'_>> = vec![Need::Root, Need::LoopDevices];
    needs.extend(tools.iter().map(|tool| Need::Tool(tool)));
    require(&needs);
    true
}

/// Runs a command, panicking with its output when it fails.
pub fn run(program: &str, args: &[&str]) -> String {
    sh(program, args)
}

/// Runs a command, returning whether it succeeded (output discarded).
pub fn try_run(program: &str, args: &[&str]) -> bool {
    quiet(Command::new(program).args(args))
}

/// Size of the hooks tests' reflink pool (sparse).
pub const POOL_MB: u64 = 6144;

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
    async fn verify_snapshots(
        &self,
        req: pb::VerifySnapshotsRequest,
    ) -> Result<pb::VerifySnapshotsResponse, Status> {
        inner(self.0.verify_snapshots(Request::new(req)).await)
    }
}

/// Writes a secret file with mode 0600.
pub fn secret(path: &Path, content: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, content).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}
