//! The AWS EBS provider: the coordinator snapshots member volumes through the EC2 API while the
//! agents hold them frozen.
//!
//! - **Snapshot**: one `CreateSnapshots` per instance (boot volume and every attached data
//!   volume outside the group excluded), `CreateSnapshot` per volume for volumes without an
//!   instance; all tagged at creation. The set's point in time is fixed when the calls return:
//!   the workflow thaws then, and the snapshots complete in the background.
//! - **No idempotency token** exists on these calls, so they are never retried (the SDK's
//!   retry is disabled for them): after a timeout or ambiguous error the workflow thaws, then
//!   `delete` with no ids finds what was made by `tag:quiesce:set-id` and removes it.
//! - **Plan**: every volume resolved to a `vol-…` id, attached to the instance the agent
//!   reported, and below EBS's limit of pending snapshots per volume.
//! - **Completion**: `progress` reads the set's snapshots by tag (paginated, `OwnerIds=self`)
//!   and adds the per-volume tags (mount, device) that `CreateSnapshots` cannot set per volume.
//!
//! - **Restore drills** (`drill`): volumes from a set's snapshots, waited for until
//!   `available`, then deleted.
//!
//! The aws-sdk-ec2 client is built on first use, so groups of other providers never touch it.

pub mod api;
pub mod config;
pub mod drill;
pub mod fake;
pub mod sdk;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use futures::future::join_all;
use quiesce_proto::agent::v1::VolumeInfo;
use quiesce_proto::coordinator::v1::{RestoredVolume, SnapshotSet};
use tokio::sync::OnceCell;
use tracing::{info, warn};

use crate::agent_client::AgentClient;
use crate::provider::{PlannedVolume, Snapshot, SnapshotCall, SnapshotProgress, SnapshotProvider};
use api::{
    CreateSnapshotReq, CreateSnapshotsReq, CreateVolumeReq, Ec2Api, Ec2Error, InstanceVolumes,
    SnapshotDesc, Tag,
};
pub use config::EbsConfig;

/// Tag keys quiesce puts on snapshots and restored volumes.
pub mod tags {
    pub const SET_ID: &str = "quiesce:set-id";
    pub const GROUP: &str = "quiesce:group";
    pub const ATTEMPT: &str = "quiesce:attempt";
    pub const HOST: &str = "quiesce:host";
    pub const MOUNT: &str = "quiesce:mount";
    pub const DEVICE: &str = "quiesce:device";
    /// The EC2 block device name the volume was attached as (`/dev/sdf`): restore reuses it.
    pub const EC2_DEVICE: &str = "quiesce:ec2-device";
    pub const SOURCE_SNAPSHOT: &str = "quiesce:source-snapshot";
    /// RFC 3339: the set's `lock-for` end (Quiesce refuses deletes before it; AWS does not).
    pub const LOCKED_UNTIL: &str = "quiesce:locked-until";
    /// On the volumes of a restore drill (value: the set id); the drill deletes them.
    pub const DRILL: &str = "quiesce:drill";
}

const GIB: u64 = 1 << 30;

pub struct EbsProvider {
    group: String,
    config: EbsConfig,
    api: OnceCell<Arc<dyn Ec2Api>>,
    /// Instances described at plan time, per set: the snapshot phase reuses them so that no
    /// DescribeInstances runs while frozen.
    planned: Mutex<HashMap<String, HashMap<String, InstanceVolumes>>>,
    /// Per set: snapshots CreateSnapshots captured of volumes outside the group, deleted in
    /// `after_thaw` (only the create calls run while the group is frozen).
    strays: Mutex<HashMap<String, Vec<String>>>,
}

/// Per-volume EBS limit of pending snapshots.
pub fn pending_limit(volume_type: &str) -> usize {
    match volume_type {
        "st1" | "sc1" => 1,
        _ => 5,
    }
}

impl EbsProvider {
    /// With the aws-sdk-ec2 client, built from the standard credential chain on first use.
    pub fn new(group: &str, config: EbsConfig) -> EbsProvider {
        EbsProvider {
            group: group.to_owned(),
            config,
            api: OnceCell::new(),
            planned: Mutex::default(),
            strays: Mutex::default(),
        }
    }

    /// With a given EC2 (a fake, or an SDK client with static credentials).
    pub fn with_api(group: &str, config: EbsConfig, api: Arc<dyn Ec2Api>) -> EbsProvider {
        EbsProvider {
            group: group.to_owned(),
            config,
            api: OnceCell::new_with(Some(api)),
            planned: Mutex::default(),
            strays: Mutex::default(),
        }
    }

    async fn api(&self) -> Arc<dyn Ec2Api> {
        self.api
            .get_or_init(|| async {
                Arc::new(sdk::SdkEc2::new(&self.config).await) as Arc<dyn Ec2Api>
            })
            .await
            .clone()
    }

    fn description(&self, set_id: &str) -> String {
        self.config
            .description
            .clone()
            .unwrap_or_else(|| format!("quiesce set {set_id} ({})", self.group))
    }

    /// The tags every snapshot of a call gets at creation: quiesce's, then the operator's.
    fn common_tags(&self, call: &SnapshotCall<'_>) -> Vec<Tag> {
        let mut tags = vec![
            (tags::SET_ID.to_owned(), call.set_id.to_owned()),
            (tags::GROUP.to_owned(), call.group.to_owned()),
            (tags::ATTEMPT.to_owned(), call.attempt.to_string()),
            (tags::HOST.to_owned(), call.agent.to_owned()),
            ("Name".to_owned(), format!("{} {}", call.set_id, call.agent)),
        ];
        if call.locked_until_ms > 0 {
            tags.push((
                tags::LOCKED_UNTIL.to_owned(),
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_millis(call.locked_until_ms),
                )
                .to_string(),
            ));
        }
        for (k, v) in &self.config.tags {
            if k == "Name" {
                tags.retain(|(key, _)| key != "Name");
            }
            tags.push((k.clone(), v.clone()));
        }
        tags
    }

    /// Drops what the plan cached for a set (each instance entry is taken by its snapshot call;
    /// this clears sets that failed earlier).
    fn forget_plan(&self, set_id: &str) {
        self.planned.lock().unwrap().remove(set_id);
    }

    async fn describe_instance(
        &self,
        set_id: &str,
        instance_id: &str,
    ) -> Result<InstanceVolumes, Ec2Error> {
        let cached = self
            .planned
            .lock()
            .unwrap()
            .get_mut(set_id)
            .and_then(|m| m.remove(instance_id));
        // Never a DescribeInstances while frozen: the plan described every instance.
        cached.ok_or_else(|| Ec2Error::Refused {
            code: "NotPlanned".into(),
            message: format!(
                "instance {instance_id} was not described at plan time (no DescribeInstances while the group is frozen)"
            ),
        })
    }

    /// Every snapshot of a set (optionally of one host), by tag.
    pub async fn find_by_tag(
        &self,
        set_id: &str,
        host: Option<&str>,
    ) -> Result<Vec<SnapshotDesc>, Ec2Error> {
        let mut filters = vec![(format!("tag:{}", tags::SET_ID), vec![set_id.to_owned()])];
        if let Some(host) = host {
            filters.push((format!("tag:{}", tags::HOST), vec![host.to_owned()]));
        }
        self.api().await.describe_snapshots(&filters).await
    }

    /// Deletes snapshots by id; NotFound counts as deleted. Returns how many are gone.
    async fn delete_ids(&self, ids: &[String]) -> Result<u32, String> {
        let api = self.api().await;
        let results = join_all(ids.iter().map(|id| {
            let api = api.clone();
            async move { (id, api.delete_snapshot(id).await) }
        }))
        .await;
        let mut deleted = 0;
        let mut problems = Vec::new();
        for (id, result) in results {
            match result {
                Ok(()) => deleted += 1,
                Err(e) if e.is_not_found() => deleted += 1,
                Err(e) => problems.push(format!("DeleteSnapshot {id}: {e}")),
            }
        }
        if problems.is_empty() {
            Ok(deleted)
        } else {
            Err(problems.join("; "))
        }
    }

    /// Creates one volume per snapshot of a consistent set in `availability_zone`, tagged with
    /// the set id and original mount, and attaches them to `attach` when given, in the original
    /// device order. Without `attach` the plan is returned for the operator to carry out.
    pub async fn restore(
        &self,
        set: &SnapshotSet,
        availability_zone: &str,
        volume_type: &str,
        attach: Option<&str>,
    ) -> Result<Vec<RestoredVolume>, String> {
        if availability_zone.is_empty() {
            return Err("--availability-zone is required to restore an EBS set".into());
        }
        let volume_type = if volume_type.is_empty() {
            "gp3"
        } else {
            volume_type
        };
        let api = self.api().await;
        let described = self
            .find_by_tag(&set.id, None)
            .await
            .map_err(|e| format!("DescribeSnapshots: {e}"))?;
        // Original order: per host, by the EC2 device name it was attached as.
        let mut plan: Vec<(String, String, String, String)> = Vec::new();
        for volume in set.volumes.iter().filter(|v| !v.snapshot_id.is_empty()) {
            let ec2_device = described
                .iter()
                .find(|d| d.snapshot_id == volume.snapshot_id)
                .and_then(|d| d.tag(tags::EC2_DEVICE))
                .unwrap_or_default()
                .to_owned();
            plan.push((
                volume.agent.clone(),
                ec2_device,
                volume.mount_point.clone(),
                volume.snapshot_id.clone(),
            ));
        }
        plan.sort();
        let hosts: std::collections::BTreeSet<&str> = plan.iter().map(|p| p.0.as_str()).collect();
        // Device names: the original ones when they are known and cannot collide (one host),
        // else /dev/sdf, /dev/sdg, ... in the original order.
        let keep_names = hosts.len() <= 1 && plan.iter().all(|p| !p.1.is_empty());
        let mut restored = Vec::new();
        for (index, (agent, ec2_device, mount, snapshot_id)) in plan.iter().enumerate() {
            let device = if keep_names {
                ec2_device.clone()
            } else {
                format!("/dev/sd{}", (b'f' + (index as u8 % 21)) as char)
            };
            let mut tags = vec![
                (tags::SET_ID.to_owned(), set.id.clone()),
                (tags::GROUP.to_owned(), set.group.clone()),
                (tags::HOST.to_owned(), agent.clone()),
                (tags::MOUNT.to_owned(), mount.clone()),
                (tags::SOURCE_SNAPSHOT.to_owned(), snapshot_id.clone()),
                ("Name".to_owned(), format!("{} {agent}:{mount}", set.id)),
            ];
            tags.extend(self.config.tags.iter().map(|(k, v)| (k.clone(), v.clone())));
            let volume_id = api
                .create_volume(&CreateVolumeReq {
                    snapshot_id: snapshot_id.clone(),
                    availability_zone: availability_zone.to_owned(),
                    volume_type: volume_type.to_owned(),
                    tags,
                })
                .await
                .map_err(|e| format!("CreateVolume from {snapshot_id} ({agent}:{mount}): {e}"))?;
            info!(%volume_id, %snapshot_id, %mount, "restored volume created");
            restored.push(RestoredVolume {
                agent: agent.clone(),
                mount_point: mount.clone(),
                snapshot_id: snapshot_id.clone(),
                volume_id,
                device,
                ..Default::default()
            });
        }
        for volume in &mut restored {
            match attach {
                Some(instance) => {
                    attach_when_available(
                        api.as_ref(),
                        &volume.volume_id,
                        instance,
                        &volume.device,
                    )
                    .await
                    .map_err(|e| {
                        format!(
                            "AttachVolume {} to {instance} as {}: {e}",
                            volume.volume_id, volume.device
                        )
                    })?;
                    volume.attached = true;
                    volume.attach_hint = format!(
                        "attached to {instance} as {}; mount it at {}",
                        volume.device, volume.mount_point
                    );
                }
                None => {
                    volume.attach_hint = format!(
                        "aws ec2 attach-volume --volume-id {} --instance-id <INSTANCE> --device {}  # then mount at {}",
                        crate::shell::quote(&volume.volume_id),
                        crate::shell::quote(&volume.device),
                        crate::shell::quote(&volume.mount_point)
                    );
                }
            }
        }
        Ok(restored)
    }
}

/// A new volume is `creating` for a while; AttachVolume needs it `available`.
async fn attach_when_available(
    api: &dyn Ec2Api,
    volume_id: &str,
    instance: &str,
    device: &str,
) -> Result<(), Ec2Error> {
    let mut last = None;
    for attempt in 0..60u64 {
        match api.attach_volume(volume_id, instance, device).await {
            Ok(()) => return Ok(()),
            Err(Ec2Error::Refused { code, message }) if code == "IncorrectState" => {
                last = Some(Ec2Error::Refused { code, message });
                tokio::time::sleep(std::time::Duration::from_millis(500 + 100 * attempt)).await;
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or(Ec2Error::Ambiguous {
        message: "volume never became available".into(),
    }))
}

/// One line naming what a create call was about and why it failed.
fn create_failure(what: &str, e: &Ec2Error) -> String {
    match e {
        Ec2Error::SnapshotLimit { .. } | Ec2Error::Throttled { .. } => format!(
            "{what}: {e}; not retried while frozen: the set fails and the next scheduled run tries again"
        ),
        Ec2Error::Ambiguous { .. } => format!(
            "{what}: {e}; it may have made snapshots: they are searched for by tag and deleted after the thaw"
        ),
        _ => format!("{what}: {e}"),
    }
}

#[tonic::async_trait]
impl SnapshotProvider for EbsProvider {
    fn name(&self) -> &'static str {
        "ebs"
    }

    fn check_volume(&self, agent: &str, volume: &VolumeInfo) -> Result<(), String> {
        if volume.ebs_volume_id.is_empty() {
            let why = if volume.ebs_problem.is_empty() {
                "the agent reported no EBS volume id (an older agent?)".to_owned()
            } else {
                volume.ebs_problem.clone()
            };
            return Err(format!(
                "{agent}:{} has no EBS volume id: {why}; set ebs-volume-id in that agent's [[volume]] if the host cannot tell",
                volume.mount_point
            ));
        }
        if !volume.ebs_volume_id.starts_with("vol-") {
            return Err(format!(
                "{agent}:{}: {:?} is not an EBS volume id (vol-…)",
                volume.mount_point, volume.ebs_volume_id
            ));
        }
        Ok(())
    }

    async fn preflight(
        &self,
        set_id: &str,
        volumes: &[(String, PlannedVolume)],
    ) -> Result<(), String> {
        let api = self.api().await;
        let ids: Vec<String> = volumes.iter().map(|v| v.1.ebs_volume_id.clone()).collect();
        let described = api.describe_volumes(&ids).await.map_err(|e| {
            format!(
                "DescribeVolumes {}: {e} (region {})",
                ids.join(","),
                self.config.region
            )
        })?;
        let pending = api
            .describe_snapshots(&[
                ("volume-id".into(), ids.clone()),
                ("status".into(), vec!["pending".into()]),
            ])
            .await
            .map_err(|e| format!("DescribeSnapshots (pending per volume): {e}"))?;
        let mut problems = Vec::new();
        for (agent, volume) in volumes {
            let id = &volume.ebs_volume_id;
            let Some(desc) = described.iter().find(|d| &d.volume_id == id) else {
                problems.push(format!(
                    "{agent}:{}: volume {id} not found in region {}",
                    volume.mount_point, self.config.region
                ));
                continue;
            };
            let count = pending.iter().filter(|s| &s.volume_id == id).count();
            let limit = pending_limit(&desc.volume_type);
            if count >= limit {
                problems.push(format!(
                    "{agent}:{}: volume {id} ({}) already has {count} pending snapshot(s), the most EBS allows is {limit}; wait for them to complete",
                    volume.mount_point, desc.volume_type
                ));
            }
        }
        let mut instances: BTreeMap<&str, Vec<&(String, PlannedVolume)>> = BTreeMap::new();
        for entry in volumes.iter().filter(|v| !v.1.instance_id.is_empty()) {
            instances
                .entry(entry.1.instance_id.as_str())
                .or_default()
                .push(entry);
        }
        let mut described_instances = HashMap::new();
        for (instance_id, members) in instances {
            match api.describe_instance(instance_id).await {
                Ok(instance) => {
                    for (agent, volume) in members {
                        if !instance
                            .attached
                            .iter()
                            .any(|(_, v)| v == &volume.ebs_volume_id)
                        {
                            problems.push(format!(
                                "{agent}:{}: volume {} is not attached to instance {instance_id}, which the agent reported",
                                volume.mount_point, volume.ebs_volume_id
                            ));
                        }
                    }
                    described_instances.insert(instance_id.to_owned(), instance);
                }
                Err(e) => problems.push(format!("DescribeInstances {instance_id}: {e}")),
            }
        }
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        self.planned
            .lock()
            .unwrap()
            .insert(set_id.to_owned(), described_instances);
        Ok(())
    }

    async fn snapshot(&self, call: &SnapshotCall<'_>) -> Result<Vec<Snapshot>, String> {
        let api = self.api().await;
        let common = self.common_tags(call);
        let description = self.description(call.set_id);
        let mut by_instance: BTreeMap<&str, Vec<&PlannedVolume>> = BTreeMap::new();
        let mut loose = Vec::new();
        for volume in call.volumes {
            if volume.instance_id.is_empty() {
                loose.push(volume);
            } else {
                by_instance
                    .entry(volume.instance_id.as_str())
                    .or_default()
                    .push(volume);
            }
        }
        let instance_calls = by_instance.into_iter().map(|(instance_id, members)| {
            let api = api.clone();
            let common = common.clone();
            let description = description.clone();
            async move {
                let instance = self
                    .describe_instance(call.set_id, instance_id)
                    .await
                    .map_err(|e| format!("{}: DescribeInstances {instance_id}: {e}", call.agent))?;
                let wanted: Vec<&str> = members.iter().map(|v| v.ebs_volume_id.as_str()).collect();
                let exclude: Vec<String> = instance
                    .attached
                    .iter()
                    .filter(|(device, volume)| {
                        *device != instance.root_device_name && !wanted.contains(&volume.as_str())
                    })
                    .map(|(_, volume)| volume.clone())
                    .collect();
                let req = CreateSnapshotsReq {
                    instance_id: instance_id.to_owned(),
                    exclude_boot_volume: true,
                    exclude_data_volume_ids: exclude,
                    description,
                    tags: common,
                };
                let made = api.create_snapshots(&req).await.map_err(|e| {
                    create_failure(
                        &format!("{}: CreateSnapshots on {instance_id}", call.agent),
                        &e,
                    )
                })?;
                let mut snapshots = Vec::new();
                let mut problems = Vec::new();
                for volume in &members {
                    match made.iter().find(|s| s.volume_id == volume.ebs_volume_id) {
                        Some(s) => snapshots.push(Snapshot {
                            mount_point: volume.mount_point.clone(),
                            snapshot_id: s.snapshot_id.clone(),
                            size_bytes: u64::from(s.size_gib) * GIB,
                            state: if s.state.is_empty() {
                                "pending".into()
                            } else {
                                s.state.clone()
                            },
                        }),
                        None => problems.push(format!(
                            "{}: CreateSnapshots on {instance_id} returned no snapshot of {} ({})",
                            call.agent, volume.ebs_volume_id, volume.mount_point
                        )),
                    }
                }
                // Anything else it captured (a volume attached since the plan) is not ours.
                let strays: Vec<String> = made
                    .iter()
                    .filter(|s| !wanted.contains(&s.volume_id.as_str()))
                    .map(|s| s.snapshot_id.clone())
                    .collect();
                // Deleted after the last thaw (`after_thaw`), never while the group is frozen.
                if !strays.is_empty() {
                    warn!(
                        ?strays,
                        "CreateSnapshots captured volumes outside the group; deleting them after the thaw"
                    );
                    self.strays
                        .lock()
                        .unwrap()
                        .entry(call.set_id.to_owned())
                        .or_default()
                        .extend(strays);
                }
                if problems.is_empty() {
                    Ok(snapshots)
                } else {
                    Err(problems.join("; "))
                }
            }
        });
        let volume_calls = loose.into_iter().map(|volume| {
            let api = api.clone();
            let mut tags = common.clone();
            tags.push((tags::MOUNT.to_owned(), volume.mount_point.clone()));
            tags.push((tags::DEVICE.to_owned(), volume.device.clone()));
            let req = CreateSnapshotReq {
                volume_id: volume.ebs_volume_id.clone(),
                description: description.clone(),
                tags,
            };
            async move {
                let s = api.create_snapshot(&req).await.map_err(|e| {
                    create_failure(
                        &format!(
                            "{}: CreateSnapshot of {} ({})",
                            call.agent, volume.ebs_volume_id, volume.mount_point
                        ),
                        &e,
                    )
                })?;
                Ok::<_, String>(vec![Snapshot {
                    mount_point: volume.mount_point.clone(),
                    snapshot_id: s.snapshot_id,
                    size_bytes: u64::from(s.size_gib) * GIB,
                    state: if s.state.is_empty() {
                        "pending".into()
                    } else {
                        s.state
                    },
                }])
            }
        });
        let (a, b) = futures::join!(join_all(instance_calls), join_all(volume_calls));
        let mut snapshots = Vec::new();
        let mut problems = Vec::new();
        for result in a.into_iter().chain(b) {
            match result {
                Ok(made) => snapshots.extend(made),
                Err(e) => problems.push(e),
            }
        }
        if problems.is_empty() {
            Ok(snapshots)
        } else {
            // The workflow thaws, then calls `delete` with no ids for this agent: whatever
            // the successful calls made is found by tag and removed with the rest.
            Err(problems.join("; "))
        }
    }

    async fn after_thaw(&self, set_id: &str) {
        self.forget_plan(set_id);
        let strays = self
            .strays
            .lock()
            .unwrap()
            .remove(set_id)
            .unwrap_or_default();
        if strays.is_empty() {
            return;
        }
        let api = self.api().await;
        tokio::spawn(async move {
            for id in strays {
                match api.delete_snapshot(&id).await {
                    Ok(()) => {}
                    Err(e) if e.is_not_found() => {}
                    Err(e) => warn!(snapshot = %id, error = %e, "stray snapshot not deleted"),
                }
            }
        });
    }

    async fn delete(
        &self,
        set_id: &str,
        agent: &str,
        _client: &dyn AgentClient,
        snapshot_ids: &[String],
    ) -> Result<u32, String> {
        self.forget_plan(set_id);
        if !snapshot_ids.is_empty() {
            return self.delete_ids(snapshot_ids).await;
        }
        // Unsure what was made: search by tag, delete, and search once more after a pause for
        // a create call that was still in flight when it timed out.
        let mut deleted = 0;
        for round in 0..2 {
            if round == 1 {
                tokio::time::sleep(self.config.reconcile_delay).await;
            }
            let found = self
                .find_by_tag(set_id, Some(agent))
                .await
                .map_err(|e| format!("DescribeSnapshots tag:{}={set_id}: {e}", tags::SET_ID))?;
            let ids: Vec<String> = found.into_iter().map(|s| s.snapshot_id).collect();
            if !ids.is_empty() {
                info!(?ids, "deleting snapshots found by tag");
            }
            deleted += self.delete_ids(&ids).await?;
        }
        Ok(deleted)
    }

    fn completion_poll(&self) -> Option<std::time::Duration> {
        Some(self.config.poll_interval)
    }

    async fn progress(&self, set: &SnapshotSet) -> Result<Vec<SnapshotProgress>, String> {
        self.forget_plan(&set.id);
        let api = self.api().await;
        let found = self
            .find_by_tag(&set.id, None)
            .await
            .map_err(|e| format!("DescribeSnapshots tag:{}={}: {e}", tags::SET_ID, set.id))?;
        let mut out = Vec::new();
        for volume in set.volumes.iter().filter(|v| !v.snapshot_id.is_empty()) {
            let Some(desc) = found.iter().find(|d| d.snapshot_id == volume.snapshot_id) else {
                out.push(SnapshotProgress {
                    agent: volume.agent.clone(),
                    mount_point: volume.mount_point.clone(),
                    snapshot_id: volume.snapshot_id.clone(),
                    state: "error".into(),
                    progress: 0,
                    message: "the snapshot no longer exists (deleted outside quiesce?)".into(),
                });
                continue;
            };
            if desc.tag(tags::MOUNT).is_none() {
                // CreateSnapshots tags all of an instance's snapshots alike: add the per-volume
                // ones now. The EC2 device name comes from the plan's instance mapping.
                let mut extra = vec![
                    (tags::MOUNT.to_owned(), volume.mount_point.clone()),
                    (tags::DEVICE.to_owned(), volume.device.clone()),
                ];
                if !volume.instance_id.is_empty()
                    && let Ok(instance) = api.describe_instance(&volume.instance_id).await
                    && let Some((device, _)) =
                        instance.attached.iter().find(|(_, v)| v == &desc.volume_id)
                {
                    extra.push((tags::EC2_DEVICE.to_owned(), device.clone()));
                }
                if let Err(e) = api.create_tags(&desc.snapshot_id, &extra).await {
                    warn!(snapshot = %desc.snapshot_id, error = %e, "could not add per-volume tags");
                }
            }
            out.push(SnapshotProgress {
                agent: volume.agent.clone(),
                mount_point: volume.mount_point.clone(),
                snapshot_id: desc.snapshot_id.clone(),
                state: desc.state.clone(),
                progress: if desc.state == "completed" {
                    100
                } else {
                    desc.progress
                },
                message: desc.state_message.clone(),
            });
        }
        Ok(out)
    }

    fn as_ebs(&self) -> Option<&EbsProvider> {
        Some(self)
    }
}

#[cfg(test)]
mod tests;
