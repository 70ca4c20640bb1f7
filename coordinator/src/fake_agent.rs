//! A hand-written fake agent for unit tests and benchmarks of the workflow: records every call,
//! keeps a frozen flag per set, and injects failures per phase.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quiesce_proto::agent::v1 as pb;
use tonic::Status;

use crate::agent_client::AgentClient;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    HostInfo,
    Prepare,
    Freeze,
    Snapshot,
    Thaw,
    Delete,
    Verify,
}

#[derive(Debug, Default)]
struct State {
    calls: Vec<(Phase, String)>,
    frozen: HashMap<String, bool>,
    failures: HashMap<Phase, Status>,
    delays: HashMap<Phase, Duration>,
    /// The lease "ran out": thaw replies report it.
    lease_expired: bool,
    /// Hook resume work after the "FITHAW": the thaw reply waits this long and says so.
    resume: Option<Duration>,
    snapshots: Vec<String>,
    deleted: Vec<String>,
    /// mount → set id holding it frozen (host info reports it).
    held_by: HashMap<String, String>,
    /// Hook name → the paths DescribeHooks reports for it.
    hooks: HashMap<String, Vec<pb::HookPath>>,
    /// Hooks named by the last freeze of each set: the thaw reports an output for each.
    frozen_hooks: HashMap<String, Vec<String>>,
    /// EBS identity reported in host info: instance id, and volume id per mount.
    instance_id: String,
    ebs_volumes: HashMap<String, String>,
    /// What a drill finds (default: passed); the set ids drilled.
    verify_outcome: Option<pb::VerifyOutcome>,
    verified: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct FakeAgent {
    name: String,
    mounts: Vec<String>,
    state: Arc<Mutex<State>>,
}

impl FakeAgent {
    pub fn new(name: &str, mounts: &[&str]) -> Self {
        FakeAgent {
            name: name.into(),
            mounts: mounts.iter().map(|m| m.to_string()).collect(),
            state: Arc::default(),
        }
    }

    pub fn fail(&self, phase: Phase, status: Status) {
        self.state.lock().unwrap().failures.insert(phase, status);
    }

    /// Host info reports `mount` as held frozen by `set_id` (another coordinator's set).
    pub fn hold(&self, mount: &str, set_id: &str) {
        self.state
            .lock()
            .unwrap()
            .held_by
            .insert(mount.into(), set_id.into());
    }

    /// Stops injecting the failure of `phase`.
    pub fn heal(&self, phase: Phase) {
        self.state.lock().unwrap().failures.remove(&phase);
    }

    pub fn delay(&self, phase: Phase, delay: Duration) {
        self.state.lock().unwrap().delays.insert(phase, delay);
    }

    /// Configures a hook whose database writes `(what, path, mount point)`.
    pub fn add_hook(&self, name: &str, paths: &[(&str, &str, &str)]) {
        let paths = paths
            .iter()
            .map(|(what, path, mount)| pb::HookPath {
                what: what.to_string(),
                path: path.to_string(),
                mount_point: mount.to_string(),
            })
            .collect();
        self.state.lock().unwrap().hooks.insert(name.into(), paths);
    }

    /// Reports an EC2 instance id (may be empty) and EBS volume ids per mount in host info.
    pub fn set_ebs(&self, instance_id: &str, volumes: &[(&str, &str)]) {
        let mut state = self.state.lock().unwrap();
        state.instance_id = instance_id.into();
        state.ebs_volumes = volumes
            .iter()
            .map(|(m, v)| (m.to_string(), v.to_string()))
            .collect();
    }

    /// Makes every thaw answer `resume` after its "FITHAW" (like hooks resuming), reporting
    /// it as `resume_ms` and `since_thaw_ms`.
    pub fn slow_resume(&self, resume: Duration) {
        self.state.lock().unwrap().resume = Some(resume);
    }

    /// What the next drills find.
    pub fn verify_outcome(&self, outcome: pb::VerifyOutcome) {
        self.state.lock().unwrap().verify_outcome = Some(outcome);
    }

    /// The set ids drilled (`VerifySnapshots`), in order.
    pub fn verified(&self) -> Vec<String> {
        self.state.lock().unwrap().verified.clone()
    }

    pub fn expire_lease(&self) {
        self.state.lock().unwrap().lease_expired = true;
    }

    /// Frozen under any set right now (for fakes that check what happens while frozen).
    pub fn frozen_probe(&self) -> impl Fn() -> bool + Send + Sync + 'static {
        let state = self.state.clone();
        move || state.lock().unwrap().frozen.values().any(|f| *f)
    }

    pub fn calls(&self) -> Vec<Phase> {
        self.state
            .lock()
            .unwrap()
            .calls
            .iter()
            .map(|c| c.0)
            .collect()
    }

    pub fn is_frozen(&self) -> bool {
        self.state.lock().unwrap().frozen.values().any(|f| *f)
    }

    /// Snapshots that exist (made and not deleted).
    pub fn live_snapshots(&self) -> Vec<String> {
        let state = self.state.lock().unwrap();
        state
            .snapshots
            .iter()
            .filter(|s| !state.deleted.contains(s))
            .cloned()
            .collect()
    }

    async fn enter(&self, phase: Phase, set_id: &str) -> Result<(), Status> {
        let (delay, failure) = {
            let mut state = self.state.lock().unwrap();
            state.calls.push((phase, set_id.to_owned()));
            (
                state.delays.get(&phase).copied(),
                state.failures.get(&phase).cloned(),
            )
        };
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        match failure {
            Some(status) => Err(status),
            None => Ok(()),
        }
    }
}

#[tonic::async_trait]
impl AgentClient for FakeAgent {
    async fn get_host_info(&self) -> Result<pb::GetHostInfoResponse, Status> {
        self.enter(Phase::HostInfo, "").await?;
        let state = self.state.lock().unwrap();
        let held_by = state.held_by.clone();
        Ok(pb::GetHostInfoResponse {
            hostname: self.name.clone(),
            agent_version: "fake".into(),
            volumes: self
                .mounts
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let ebs = state.ebs_volumes.get(m).cloned().unwrap_or_default();
                    pb::VolumeInfo {
                        mount_point: m.clone(),
                        fs_type: "ext4".into(),
                        device: if ebs.is_empty() {
                            "/dev/loop0".into()
                        } else {
                            format!("/dev/nvme{}n1", i + 1)
                        },
                        backing_file: if ebs.is_empty() {
                            format!("/pool{m}.img")
                        } else {
                            String::new()
                        },
                        ebs_problem: if ebs.is_empty() {
                            "/dev/loop0 is not an NVMe device".into()
                        } else {
                            String::new()
                        },
                        ebs_volume_id: ebs,
                        frozen_by: held_by.get(m).cloned().unwrap_or_default(),
                        ..Default::default()
                    }
                })
                .collect(),
            instance_id: state.instance_id.clone(),
            ..Default::default()
        })
    }

    async fn prepare_volumes(
        &self,
        req: pb::PrepareVolumesRequest,
    ) -> Result<pb::PrepareVolumesResponse, Status> {
        self.enter(Phase::Prepare, &req.set_id).await?;
        Ok(pb::PrepareVolumesResponse { duration_ms: 1 })
    }

    async fn freeze_volumes(
        &self,
        req: pb::FreezeVolumesRequest,
    ) -> Result<pb::FreezeVolumesResponse, Status> {
        let started = crate::workflow::unix_ms();
        self.enter(Phase::Freeze, &req.set_id).await?;
        let mut state = self.state.lock().unwrap();
        state.frozen_hooks.insert(req.set_id.clone(), req.hooks);
        state.frozen.insert(req.set_id, true);
        drop(state);
        let now = crate::workflow::unix_ms();
        Ok(pb::FreezeVolumesResponse {
            freeze_started_at_ms: started,
            frozen_at_ms: now,
            lease_deadline_ms: now + req.lease_ms,
            hard_deadline_ms: now + req.lease_ms,
        })
    }

    async fn renew_lease(
        &self,
        _req: pb::RenewLeaseRequest,
    ) -> Result<pb::RenewLeaseResponse, Status> {
        Ok(pb::RenewLeaseResponse::default())
    }

    async fn thaw_volumes(
        &self,
        req: pb::ThawVolumesRequest,
    ) -> Result<pb::ThawVolumesResponse, Status> {
        self.enter(Phase::Thaw, &req.set_id).await?;
        let (held, end, hooks, resume) = {
            let mut state = self.state.lock().unwrap();
            let was_frozen = state
                .frozen
                .insert(req.set_id.clone(), false)
                .unwrap_or(false);
            let (held, end) = match (was_frozen, state.lease_expired) {
                (true, false) => (true, pb::FreezeEnd::Thawed),
                (true, true) => (false, pb::FreezeEnd::LeaseExpired),
                (false, _) => (false, pb::FreezeEnd::UnknownSet),
            };
            let hooks = state
                .frozen_hooks
                .remove(&req.set_id)
                .unwrap_or_default()
                .into_iter()
                .map(|hook| pb::HookOutput {
                    hook,
                    kind: "fake".into(),
                    values: vec![pb::HookValue {
                        key: "lsn".into(),
                        value: "0/1".into(),
                    }],
                    backup_label: "START WAL LOCATION: 0/1\n".into(),
                    ..Default::default()
                })
                .collect::<Vec<_>>();
            (held, end, hooks, state.resume)
        };
        let thawed_at_ms = crate::workflow::unix_ms();
        if let Some(resume) = resume {
            tokio::time::sleep(resume).await;
        }
        let resume_ms = resume.map_or(0, |r| r.as_millis() as u64);
        Ok(pb::ThawVolumesResponse {
            held_continuously: held,
            end: end.into(),
            write_stall_ms: 5,
            thawed_at_ms,
            hooks,
            resume_ms,
            since_thaw_ms: resume_ms,
            ..Default::default()
        })
    }

    async fn create_snapshots(
        &self,
        req: pb::CreateSnapshotsRequest,
    ) -> Result<pb::CreateSnapshotsResponse, Status> {
        self.enter(Phase::Snapshot, &req.set_id).await?;
        let mut state = self.state.lock().unwrap();
        let snapshots: Vec<pb::VolumeSnapshot> = req
            .mount_points
            .iter()
            .map(|m| pb::VolumeSnapshot {
                mount_point: m.clone(),
                snapshot_id: format!("{}:{}{m}", self.name, req.set_id),
                size_bytes: 1,
                duration_ms: 0,
            })
            .collect();
        state
            .snapshots
            .extend(snapshots.iter().map(|s| s.snapshot_id.clone()));
        Ok(pb::CreateSnapshotsResponse { snapshots })
    }

    async fn delete_snapshots(
        &self,
        req: pb::DeleteSnapshotsRequest,
    ) -> Result<pb::DeleteSnapshotsResponse, Status> {
        self.enter(Phase::Delete, &req.set_id).await?;
        let mut state = self.state.lock().unwrap();
        let ids = if req.snapshot_ids.is_empty() {
            state
                .snapshots
                .iter()
                .filter(|s| s.contains(&req.set_id))
                .cloned()
                .collect()
        } else {
            req.snapshot_ids
        };
        let deleted = ids.len() as u32;
        state.deleted.extend(ids.iter().cloned());
        Ok(pb::DeleteSnapshotsResponse {
            deleted,
            removed: ids,
            ..Default::default()
        })
    }

    async fn restore_snapshots(
        &self,
        _req: pb::RestoreSnapshotsRequest,
    ) -> Result<pb::RestoreSnapshotsResponse, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn verify_snapshots(
        &self,
        req: pb::VerifySnapshotsRequest,
    ) -> Result<pb::VerifySnapshotsResponse, Status> {
        self.enter(Phase::Verify, &req.set_id).await?;
        let mut state = self.state.lock().unwrap();
        state.verified.push(req.set_id.clone());
        let outcome = state.verify_outcome.unwrap_or(pb::VerifyOutcome::Passed);
        Ok(pb::VerifySnapshotsResponse {
            outcome: outcome.into(),
            checks: req
                .snapshots
                .iter()
                .map(|s| pb::VerifyCheck {
                    name: s.mount_point.clone(),
                    kind: "filesystem".into(),
                    outcome: outcome.into(),
                    check: "mount read-write (ext4)".into(),
                    output: String::new(),
                    duration_ms: 1,
                })
                .collect(),
            duration_ms: 1,
            teardown: String::new(),
        })
    }

    async fn describe_hooks(
        &self,
        req: pb::DescribeHooksRequest,
    ) -> Result<pb::DescribeHooksResponse, Status> {
        self.enter(Phase::HostInfo, "").await?;
        let state = self.state.lock().unwrap();
        let hooks = req
            .hooks
            .iter()
            .map(|name| match state.hooks.get(name) {
                Some(paths) => pb::HookDescription {
                    name: name.clone(),
                    kind: "fake".into(),
                    paths: paths.clone(),
                    problem: String::new(),
                },
                None => pb::HookDescription {
                    name: name.clone(),
                    problem: format!("hook {name} is not configured on this agent"),
                    ..Default::default()
                },
            })
            .collect();
        Ok(pb::DescribeHooksResponse { hooks })
    }
}
