//! Snapshot providers behind one trait. `reflink` delegates to each member's agent, which
//! clones its loop backing files while frozen; cloud providers (EBS) implement the same trait
//! from the coordinator.

use quiesce_proto::agent::v1 as agent_pb;
use quiesce_proto::agent::v1::VolumeInfo;

use crate::agent_client::AgentClient;
use crate::config::ProviderKind;
use crate::error::agent_error;

/// One snapshot a provider made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub mount_point: String,
    pub snapshot_id: String,
    pub size_bytes: u64,
}

#[tonic::async_trait]
pub trait SnapshotProvider: Send + Sync {
    fn name(&self) -> &'static str;
    /// At plan time: can this volume be snapshotted by this provider? `Err` says why not.
    fn check_volume(&self, agent: &str, volume: &VolumeInfo) -> Result<(), String>;
    /// While every member is frozen: snapshot one member's volumes. The point in time is fixed
    /// when this returns.
    async fn snapshot(
        &self,
        set_id: &str,
        agent: &str,
        client: &dyn AgentClient,
        mounts: &[String],
    ) -> Result<Vec<Snapshot>, String>;
    /// Removes snapshots; missing ones count as removed.
    async fn delete(
        &self,
        set_id: &str,
        agent: &str,
        client: &dyn AgentClient,
        snapshot_ids: &[String],
    ) -> Result<u32, String>;
}

pub fn for_kind(kind: ProviderKind) -> Box<dyn SnapshotProvider> {
    match kind {
        ProviderKind::Reflink => Box::new(Reflink),
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

    async fn snapshot(
        &self,
        set_id: &str,
        agent: &str,
        client: &dyn AgentClient,
        mounts: &[String],
    ) -> Result<Vec<Snapshot>, String> {
        let reply = client
            .create_snapshots(agent_pb::CreateSnapshotsRequest {
                set_id: set_id.into(),
                mount_points: mounts.to_vec(),
            })
            .await
            .map_err(|status| agent_error(agent, &status))?;
        Ok(reply
            .snapshots
            .into_iter()
            .map(|s| Snapshot {
                mount_point: s.mount_point,
                snapshot_id: s.snapshot_id,
                size_bytes: s.size_bytes,
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
        let reply = client
            .delete_snapshots(agent_pb::DeleteSnapshotsRequest {
                set_id: set_id.into(),
                snapshot_ids: snapshot_ids.to_vec(),
            })
            .await
            .map_err(|status| agent_error(agent, &status))?;
        Ok(reply.deleted)
    }
}
