//! Snapshot providers behind one trait. `reflink` delegates to each member's agent, which
//! clones its loop backing files while frozen; cloud providers (EBS) implement the same trait
//! from the coordinator.

use std::sync::Arc;

use quiesce_proto::agent::v1 as agent_pb;
use quiesce_proto::agent::v1::VolumeInfo;
use quiesce_proto::coordinator::v1::SnapshotSet;

use crate::agent_client::AgentClient;
use crate::config::{GroupConfig, ProviderKind};
use crate::error::agent_error;

/// One snapshot a provider made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub mount_point: String,
    pub snapshot_id: String,
    pub size_bytes: u64,
    /// Providers with background completion (EBS): `pending`, `completed`, ... Empty otherwise.
    pub state: String,
}

/// What one removal of a set's snapshots on one member did (`sets delete`, the reconciler).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemovalReport {
    /// Snapshots removed.
    pub deleted: u32,
    /// Every path or snapshot id removed (reflink: clones, partial clones, temporary names,
    /// the set's directories).
    pub removed: Vec<String>,
    /// What could not be removed: (path or id, why).
    pub not_removed: Vec<(String, String)>,
}

/// One member volume as planned: what the agent reported for it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlannedVolume {
    pub mount_point: String,
    pub device: String,
    /// EBS volume id; empty for other providers.
    pub ebs_volume_id: String,
    /// EC2 instance id of the member host; empty when unknown.
    pub instance_id: String,
}

/// What a provider is asked to snapshot: one member's planned volumes, while frozen.
pub struct SnapshotCall<'a> {
    pub set_id: &'a str,
    pub group: &'a str,
    /// 1 for the first try of a set.
    pub attempt: u32,
    pub agent: &'a str,
    pub client: &'a dyn AgentClient,
    pub volumes: &'a [PlannedVolume],
    /// What is left of the group's freeze budget for this call (host-local providers stop a
    /// clone that would run past it); `None`: only the phase timeout bounds it.
    pub time_left: Option<std::time::Duration>,
    /// The set's `lock-for` end (ms since the epoch), 0 when not locked (EBS tags it).
    pub locked_until_ms: u64,
}

impl SnapshotCall<'_> {
    pub fn mounts(&self) -> Vec<String> {
        self.volumes.iter().map(|v| v.mount_point.clone()).collect()
    }
}

/// Where one snapshot is after the set was committed (providers with background completion).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotProgress {
    pub agent: String,
    pub mount_point: String,
    pub snapshot_id: String,
    /// pending | completed | error
    pub state: String,
    /// 0-100.
    pub progress: u32,
    /// Why it is in error.
    pub message: String,
}

#[tonic::async_trait]
pub trait SnapshotProvider: Send + Sync {
    fn name(&self) -> &'static str;
    /// At plan time: can this volume be snapshotted by this provider? `Err` says why not.
    fn check_volume(&self, agent: &str, volume: &VolumeInfo) -> Result<(), String>;
    /// At plan time, before anything is frozen, with every member volume resolved: checks
    /// against the provider's own limits. `(agent, volume)` pairs.
    async fn preflight(
        &self,
        _set_id: &str,
        _volumes: &[(String, PlannedVolume)],
    ) -> Result<(), String> {
        Ok(())
    }
    /// While every member is frozen: snapshot one member's volumes. The point in time is fixed
    /// when this returns.
    async fn snapshot(&self, call: &SnapshotCall<'_>) -> Result<Vec<Snapshot>, String>;
    /// Once every member's thaw has returned (whatever the set's outcome): the provider work
    /// that must not run while the group is frozen, which only the snapshot calls may.
    async fn after_thaw(&self, _set_id: &str) {}
    /// Removes snapshots; missing ones count as removed. No ids: everything this provider made
    /// for the set on that agent (after an ambiguous failure).
    async fn delete(
        &self,
        set_id: &str,
        agent: &str,
        client: &dyn AgentClient,
        snapshot_ids: &[String],
    ) -> Result<u32, String>;
    /// As [`delete`](Self::delete), reporting exactly what was removed and what was not. The
    /// default reports the ids asked for (providers whose delete is all or nothing).
    async fn remove(
        &self,
        set_id: &str,
        agent: &str,
        client: &dyn AgentClient,
        snapshot_ids: &[String],
    ) -> Result<RemovalReport, String> {
        let deleted = self.delete(set_id, agent, client, snapshot_ids).await?;
        Ok(RemovalReport {
            deleted,
            removed: snapshot_ids.to_vec(),
            not_removed: Vec::new(),
        })
    }
    /// How often background completion is polled; `None`: snapshots are complete when made.
    fn completion_poll(&self) -> Option<std::time::Duration> {
        None
    }
    /// The state of every snapshot of a committed set.
    async fn progress(&self, _set: &SnapshotSet) -> Result<Vec<SnapshotProgress>, String> {
        Ok(Vec::new())
    }
    /// The EBS provider, for its own operations (restore to new volumes).
    fn as_ebs(&self) -> Option<&crate::ebs::EbsProvider> {
        None
    }
}

/// The provider a group's config asks for.
pub fn for_group(group: &GroupConfig) -> Arc<dyn SnapshotProvider> {
    match group.provider {
        ProviderKind::Reflink => Arc::new(Reflink),
        ProviderKind::Ebs => match &group.ebs {
            Some(ebs) => Arc::new(crate::ebs::EbsProvider::new(&group.name, ebs.clone())),
            // Config::problems refuses this; a provider that says so is the safe fallback.
            None => Arc::new(Misconfigured(format!(
                "group {} has provider ebs but no [group.ebs] section",
                group.name
            ))),
        },
    }
}

/// Stands in for a provider whose config is missing: refuses every volume at plan time.
struct Misconfigured(String);

#[tonic::async_trait]
impl SnapshotProvider for Misconfigured {
    fn name(&self) -> &'static str {
        "misconfigured"
    }

    fn check_volume(&self, _agent: &str, _volume: &VolumeInfo) -> Result<(), String> {
        Err(self.0.clone())
    }

    async fn snapshot(&self, _call: &SnapshotCall<'_>) -> Result<Vec<Snapshot>, String> {
        Err(self.0.clone())
    }

    async fn delete(
        &self,
        _set_id: &str,
        _agent: &str,
        _client: &dyn AgentClient,
        _snapshot_ids: &[String],
    ) -> Result<u32, String> {
        Err(self.0.clone())
    }
}

/// Host-local FICLONE clones, made by the agents.
#[derive(Debug, Clone, Copy)]
pub struct Reflink;

#[tonic::async_trait]
impl SnapshotProvider for Reflink {
    fn name(&self) -> &'static str {
        "reflink"
    }

    fn check_volume(&self, agent: &str, volume: &VolumeInfo) -> Result<(), String> {
        if volume.backing_file.is_empty() {
            return Err(format!(
                "{agent}:{} is on {}, not a loop device: the reflink provider clones loop backing files",
                volume.mount_point,
                if volume.device.is_empty() {
                    "an unknown device"
                } else {
                    &volume.device
                }
            ));
        }
        Ok(())
    }

    async fn snapshot(&self, call: &SnapshotCall<'_>) -> Result<Vec<Snapshot>, String> {
        let reply = call
            .client
            .create_snapshots(agent_pb::CreateSnapshotsRequest {
                set_id: call.set_id.into(),
                mount_points: call.mounts(),
                // A little less than what is left, so that the agent's own answer (naming the
                // clone it stopped) arrives before the coordinator's deadline.
                time_left_ms: call
                    .time_left
                    .map(|left| left - (left / 10).min(std::time::Duration::from_millis(50)))
                    .map(|left| (left.as_millis() as u64).max(1))
                    .unwrap_or(0),
            })
            .await
            .map_err(|status| agent_error(call.agent, &status))?;
        Ok(reply
            .snapshots
            .into_iter()
            .map(|s| Snapshot {
                mount_point: s.mount_point,
                snapshot_id: s.snapshot_id,
                size_bytes: s.size_bytes,
                state: String::new(),
            })
            .collect())
    }

    async fn delete(
        &self,
        set_id: &str,
        agent: &str,
        client: &dyn AgentClient,
        snapshot_ids: &[String],
    ) -> Result<u32, String> {
        let report = self.remove(set_id, agent, client, snapshot_ids).await?;
        if let Some((path, why)) = report.not_removed.first() {
            return Err(format!(
                "{agent}: {} of the set's files not removed, first {path}: {why}",
                report.not_removed.len()
            ));
        }
        Ok(report.deleted)
    }

    /// The agent removes the named clones and the whole `<snapshot-dir>/<set-id>/` directory
    /// (partial clones and temporary names included), and says what it removed and what not.
    async fn remove(
        &self,
        set_id: &str,
        agent: &str,
        client: &dyn AgentClient,
        snapshot_ids: &[String],
    ) -> Result<RemovalReport, String> {
        let reply = client
            .delete_snapshots(agent_pb::DeleteSnapshotsRequest {
                set_id: set_id.into(),
                snapshot_ids: snapshot_ids.to_vec(),
            })
            .await
            .map_err(|status| agent_error(agent, &status))?;
        Ok(RemovalReport {
            deleted: reply.deleted,
            removed: reply.removed,
            not_removed: reply
                .not_removed
                .into_iter()
                .map(|n| (n.path, n.error))
                .collect(),
        })
    }
}
