//! An in-memory EC2 for tests: instances with attached volumes, snapshots that stay `pending`
//! until told, and injected failures (including "made the snapshot, then timed out").

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::api::{
    CreateSnapshotReq, CreateSnapshotsReq, CreateVolumeReq, Ec2Api, Ec2Error, InstanceVolumes,
    SnapshotDesc, Tag, VolumeDesc,
};

/// Which call a failure is injected into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    DescribeInstance,
    DescribeVolumes,
    DescribeSnapshots,
    CreateSnapshots,
    CreateSnapshot,
    CreateTags,
    DeleteSnapshot,
    CreateVolume,
    DeleteVolume,
    AttachVolume,
}

/// What an injected failure does.
#[derive(Debug, Clone)]
pub enum Failure {
    /// Fails without effect.
    Error(Ec2Error),
    /// Makes the snapshots, then answers with this error (a timeout after the fact).
    AfterEffect(Ec2Error),
    /// Makes the snapshots, then never answers within `Duration`.
    Hang(Duration),
}

#[derive(Debug, Default)]
struct State {
    instances: BTreeMap<String, InstanceVolumes>,
    volumes: BTreeMap<String, VolumeDesc>,
    snapshots: Vec<SnapshotDesc>,
    next: u32,
    /// Failures per op, per instance or volume id ("" for any), used once each.
    failures: HashMap<(Op, String), Vec<Failure>>,
    calls: Vec<(Op, String)>,
    /// For each call: was any member frozen when it was made (per `probe`)?
    frozen_at_call: Vec<bool>,
    create_snapshots_requests: Vec<CreateSnapshotsReq>,
    created_volumes: Vec<(String, CreateVolumeReq)>,
    deleted_volumes: Vec<String>,
    attachments: Vec<(String, String, String)>,
    /// Snapshots made `completed` at once (default) or left `pending`.
    pending: bool,
}

type Probe = Arc<dyn Fn() -> bool + Send + Sync>;

#[derive(Clone, Default)]
pub struct FakeEc2 {
    state: Arc<Mutex<State>>,
    probe: Arc<Mutex<Vec<Probe>>>,
}

impl std::fmt::Debug for FakeEc2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeEc2").finish_non_exhaustive()
    }
}

impl FakeEc2 {
    pub fn new() -> FakeEc2 {
        FakeEc2::default()
    }

    /// New snapshots start `pending` at 0 % until `complete`/`progress`/`fail_snapshot`.
    pub fn leave_pending(&self) {
        self.state.lock().unwrap().pending = true;
    }

    /// An instance with a root volume and the given (device, volume id, type) data volumes.
    pub fn add_instance(&self, instance_id: &str, volumes: &[(&str, &str, &str)]) {
        let mut state = self.state.lock().unwrap();
        let root = format!("vol-root{}", instance_id.trim_start_matches("i-"));
        let mut attached = vec![("/dev/xvda".to_owned(), root.clone())];
        state.volumes.insert(
            root.clone(),
            VolumeDesc {
                volume_id: root,
                volume_type: "gp3".into(),
                size_gib: 8,
                availability_zone: "us-east-1a".into(),
                state: "in-use".into(),
            },
        );
        for (device, id, kind) in volumes {
            attached.push(((*device).into(), (*id).into()));
            state.volumes.insert(
                (*id).into(),
                VolumeDesc {
                    volume_id: (*id).into(),
                    volume_type: (*kind).into(),
                    size_gib: 10,
                    availability_zone: "us-east-1a".into(),
                    state: "in-use".into(),
                },
            );
        }
        state.instances.insert(
            instance_id.into(),
            InstanceVolumes {
                instance_id: instance_id.into(),
                availability_zone: "us-east-1a".into(),
                root_device_name: "/dev/xvda".into(),
                attached,
            },
        );
    }

    /// A volume attached to no instance.
    pub fn add_volume(&self, volume_id: &str, kind: &str) {
        self.state.lock().unwrap().volumes.insert(
            volume_id.into(),
            VolumeDesc {
                volume_id: volume_id.into(),
                volume_type: kind.into(),
                size_gib: 10,
                availability_zone: "us-east-1a".into(),
                state: "in-use".into(),
            },
        );
    }

    /// A pending snapshot made by someone else (counts against the per-volume limit).
    pub fn add_foreign_pending_snapshot(&self, volume_id: &str) {
        let mut state = self.state.lock().unwrap();
        let id = state.new_id("snap-other");
        state.snapshots.push(SnapshotDesc {
            snapshot_id: id,
            volume_id: volume_id.into(),
            state: "pending".into(),
            ..Default::default()
        });
    }

    /// Injects a failure into the next `op` on `target` (an instance or volume id; "" for any).
    pub fn fail(&self, op: Op, target: &str, failure: Failure) {
        self.state
            .lock()
            .unwrap()
            .failures
            .entry((op, target.into()))
            .or_default()
            .push(failure);
    }

    pub fn calls(&self) -> Vec<(Op, String)> {
        self.state.lock().unwrap().calls.clone()
    }

    /// Tells the fake how to see whether a member is frozen; every call records it.
    pub fn watch_frozen(&self, probe: impl Fn() -> bool + Send + Sync + 'static) {
        self.probe.lock().unwrap().push(Arc::new(probe));
    }

    /// The calls made while some member was frozen.
    pub fn calls_while_frozen(&self) -> Vec<(Op, String)> {
        let state = self.state.lock().unwrap();
        state
            .calls
            .iter()
            .zip(&state.frozen_at_call)
            .filter(|(_, frozen)| **frozen)
            .map(|(call, _)| call.clone())
            .collect()
    }

    pub fn create_snapshots_requests(&self) -> Vec<CreateSnapshotsReq> {
        self.state.lock().unwrap().create_snapshots_requests.clone()
    }

    pub fn snapshots(&self) -> Vec<SnapshotDesc> {
        self.state.lock().unwrap().snapshots.clone()
    }

    pub fn created_volumes(&self) -> Vec<(String, CreateVolumeReq)> {
        self.state.lock().unwrap().created_volumes.clone()
    }

    pub fn deleted_volumes(&self) -> Vec<String> {
        self.state.lock().unwrap().deleted_volumes.clone()
    }

    /// Volumes that exist now (the instances' and those created and not deleted).
    pub fn volume_ids(&self) -> Vec<String> {
        self.state.lock().unwrap().volumes.keys().cloned().collect()
    }

    pub fn attachments(&self) -> Vec<(String, String, String)> {
        self.state.lock().unwrap().attachments.clone()
    }

    /// Sets one snapshot's state and progress.
    pub fn set_snapshot_state(&self, snapshot_id: &str, state: &str, progress: u32) {
        let mut st = self.state.lock().unwrap();
        for s in st
            .snapshots
            .iter_mut()
            .filter(|s| s.snapshot_id == snapshot_id)
        {
            s.state = state.into();
            s.progress = progress;
            if state == "error" {
                s.state_message = "internal error copying blocks".into();
            }
        }
    }

    pub fn complete_all(&self) {
        let mut st = self.state.lock().unwrap();
        for s in st.snapshots.iter_mut().filter(|s| s.state == "pending") {
            s.state = "completed".into();
            s.progress = 100;
        }
    }

    fn failure(&self, op: Op, target: &str) -> Option<Failure> {
        let frozen = self.probe.lock().unwrap().iter().any(|p| p());
        let mut state = self.state.lock().unwrap();
        state.calls.push((op, target.into()));
        state.frozen_at_call.push(frozen);
        for key in [(op, target.to_owned()), (op, String::new())] {
            if let Some(list) = state.failures.get_mut(&key)
                && !list.is_empty()
            {
                return Some(list.remove(0));
            }
        }
        None
    }
}

impl State {
    fn new_id(&mut self, prefix: &str) -> String {
        self.next += 1;
        format!("{prefix}-{:08x}", self.next)
    }

    fn make_snapshot(&mut self, volume_id: &str, tags: &[Tag]) -> SnapshotDesc {
        let id = self.new_id("snap");
        let (state, progress) = if self.pending {
            ("pending", 0)
        } else {
            ("completed", 100)
        };
        let snapshot = SnapshotDesc {
            snapshot_id: id,
            volume_id: volume_id.into(),
            state: state.into(),
            progress,
            size_gib: self.volumes.get(volume_id).map(|v| v.size_gib).unwrap_or(1),
            tags: tags.to_vec(),
            state_message: String::new(),
        };
        self.snapshots.push(snapshot.clone());
        snapshot
    }
}

fn not_found(code: &str, what: &str) -> Ec2Error {
    Ec2Error::NotFound {
        code: code.into(),
        message: format!("{what} does not exist"),
    }
}

/// Applies a failure that comes after the effect.
async fn after_effect<T>(failure: Option<Failure>, value: T) -> Result<T, Ec2Error> {
    match failure {
        Some(Failure::AfterEffect(e)) => Err(e),
        Some(Failure::Hang(d)) => {
            tokio::time::sleep(d).await;
            Err(Ec2Error::Ambiguous {
                message: "hung".into(),
            })
        }
        _ => Ok(value),
    }
}

fn before_effect(failure: &Option<Failure>) -> Result<(), Ec2Error> {
    match failure {
        Some(Failure::Error(e)) => Err(e.clone()),
        _ => Ok(()),
    }
}

#[tonic::async_trait]
impl Ec2Api for FakeEc2 {
    async fn describe_instance(&self, instance_id: &str) -> Result<InstanceVolumes, Ec2Error> {
        let failure = self.failure(Op::DescribeInstance, instance_id);
        before_effect(&failure)?;
        let state = self.state.lock().unwrap();
        state
            .instances
            .get(instance_id)
            .cloned()
            .ok_or_else(|| not_found("InvalidInstanceID.NotFound", instance_id))
    }

    async fn describe_volumes(&self, volume_ids: &[String]) -> Result<Vec<VolumeDesc>, Ec2Error> {
        let failure = self.failure(Op::DescribeVolumes, "");
        before_effect(&failure)?;
        let state = self.state.lock().unwrap();
        volume_ids
            .iter()
            .map(|id| {
                state
                    .volumes
                    .get(id)
                    .cloned()
                    .ok_or_else(|| not_found("InvalidVolume.NotFound", id))
            })
            .collect()
    }

    async fn describe_snapshots(
        &self,
        filters: &[(String, Vec<String>)],
    ) -> Result<Vec<SnapshotDesc>, Ec2Error> {
        let failure = self.failure(Op::DescribeSnapshots, "");
        before_effect(&failure)?;
        let state = self.state.lock().unwrap();
        Ok(state
            .snapshots
            .iter()
            .filter(|s| {
                filters.iter().all(|(name, values)| {
                    let actual = match name.as_str() {
                        "volume-id" => Some(s.volume_id.as_str()),
                        "status" => Some(s.state.as_str()),
                        "snapshot-id" => Some(s.snapshot_id.as_str()),
                        other => other.strip_prefix("tag:").and_then(|k| s.tag(k)),
                    };
                    actual.is_some_and(|a| values.iter().any(|v| v == a))
                })
            })
            .cloned()
            .collect())
    }

    async fn create_snapshots(
        &self,
        req: &CreateSnapshotsReq,
    ) -> Result<Vec<SnapshotDesc>, Ec2Error> {
        let failure = self.failure(Op::CreateSnapshots, &req.instance_id);
        before_effect(&failure)?;
        let made = {
            let mut state = self.state.lock().unwrap();
            state.create_snapshots_requests.push(req.clone());
            let instance = state
                .instances
                .get(&req.instance_id)
                .cloned()
                .ok_or_else(|| not_found("InvalidInstanceID.NotFound", &req.instance_id))?;
            let mut made = Vec::new();
            for (device, volume) in &instance.attached {
                let boot = *device == instance.root_device_name;
                if (boot && req.exclude_boot_volume) || req.exclude_data_volume_ids.contains(volume)
                {
                    continue;
                }
                made.push(state.make_snapshot(volume, &req.tags));
            }
            made
        };
        after_effect(failure, made).await
    }

    async fn create_snapshot(&self, req: &CreateSnapshotReq) -> Result<SnapshotDesc, Ec2Error> {
        let failure = self.failure(Op::CreateSnapshot, &req.volume_id);
        before_effect(&failure)?;
        let made = {
            let mut state = self.state.lock().unwrap();
            if !state.volumes.contains_key(&req.volume_id) {
                return Err(not_found("InvalidVolume.NotFound", &req.volume_id));
            }
            state.make_snapshot(&req.volume_id, &req.tags)
        };
        after_effect(failure, made).await
    }

    async fn create_tags(&self, resource_id: &str, tags: &[Tag]) -> Result<(), Ec2Error> {
        let failure = self.failure(Op::CreateTags, resource_id);
        before_effect(&failure)?;
        let mut state = self.state.lock().unwrap();
        let snapshot = state
            .snapshots
            .iter_mut()
            .find(|s| s.snapshot_id == resource_id)
            .ok_or_else(|| not_found("InvalidSnapshot.NotFound", resource_id))?;
        for (k, v) in tags {
            snapshot.tags.retain(|(key, _)| key != k);
            snapshot.tags.push((k.clone(), v.clone()));
        }
        Ok(())
    }

    async fn delete_snapshot(&self, snapshot_id: &str) -> Result<(), Ec2Error> {
        let failure = self.failure(Op::DeleteSnapshot, snapshot_id);
        before_effect(&failure)?;
        let mut state = self.state.lock().unwrap();
        let before = state.snapshots.len();
        state.snapshots.retain(|s| s.snapshot_id != snapshot_id);
        if state.snapshots.len() == before {
            return Err(not_found("InvalidSnapshot.NotFound", snapshot_id));
        }
        Ok(())
    }

    async fn create_volume(&self, req: &CreateVolumeReq) -> Result<String, Ec2Error> {
        let failure = self.failure(Op::CreateVolume, &req.snapshot_id);
        before_effect(&failure)?;
        let mut state = self.state.lock().unwrap();
        if !state
            .snapshots
            .iter()
            .any(|s| s.snapshot_id == req.snapshot_id)
        {
            return Err(not_found("InvalidSnapshot.NotFound", &req.snapshot_id));
        }
        let id = state.new_id("vol-new");
        state.created_volumes.push((id.clone(), req.clone()));
        state.volumes.insert(
            id.clone(),
            VolumeDesc {
                volume_id: id.clone(),
                volume_type: req.volume_type.clone(),
                size_gib: 10,
                availability_zone: req.availability_zone.clone(),
                state: "available".into(),
            },
        );
        Ok(id)
    }

    async fn delete_volume(&self, volume_id: &str) -> Result<(), Ec2Error> {
        let failure = self.failure(Op::DeleteVolume, volume_id);
        before_effect(&failure)?;
        let mut state = self.state.lock().unwrap();
        if state.volumes.remove(volume_id).is_none() {
            return Err(not_found("InvalidVolume.NotFound", volume_id));
        }
        state.deleted_volumes.push(volume_id.into());
        Ok(())
    }

    async fn attach_volume(
        &self,
        volume_id: &str,
        instance_id: &str,
        device: &str,
    ) -> Result<(), Ec2Error> {
        let failure = self.failure(Op::AttachVolume, volume_id);
        before_effect(&failure)?;
        self.state.lock().unwrap().attachments.push((
            volume_id.into(),
            instance_id.into(),
            device.into(),
        ));
        Ok(())
    }
}
