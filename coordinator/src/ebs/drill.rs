//! Restore drills of EBS sets: the API part of a restore, proven and undone.
//!
//! For one member host of a consistent set: one volume per snapshot (CreateVolume in the
//! host's availability zone, tagged with the set id and [`tags::DRILL`]), each waited for
//! until `available` — the snapshot restores. No block device of a new volume can appear on
//! the coordinator's host (and attaching it to the member would put a copy beside the live
//! volume), so the drill stops there with the outcome `NO_BLOCK_DEVICE`. Every volume it
//! created is deleted on every path (also when a create or the wait failed); one that cannot be
//! deleted is named in the drill's teardown.

use std::time::{Duration, Instant};

use quiesce_proto::agent::v1::{VerifyCheck, VerifyOutcome, VerifySnapshotsResponse};
use quiesce_proto::coordinator::v1::SnapshotSet;
use tracing::{info, warn};

use super::api::{CreateVolumeReq, Ec2Api, Ec2Error};
use super::{EbsProvider, tags};

/// Longest a drill waits for its volumes to become `available`.
pub const AVAILABLE_WITHIN: Duration = Duration::from_secs(600);
/// Longest it keeps trying to delete a volume that is still `creating`.
const DELETE_WITHIN: Duration = Duration::from_secs(120);

impl EbsProvider {
    /// The drill of `host`'s snapshots of `set` (`instance_id`: the host's EC2 instance, whose
    /// availability zone the volumes are made in).
    pub async fn drill(
        &self,
        set: &SnapshotSet,
        host: &str,
        instance_id: &str,
        available_within: Duration,
    ) -> VerifySnapshotsResponse {
        let started = Instant::now();
        let api = self.api().await;
        let mut checks = Vec::new();
        let mut created: Vec<String> = Vec::new();
        self.drill_steps(
            api.as_ref(),
            set,
            host,
            instance_id,
            available_within,
            &mut checks,
            &mut created,
        )
        .await;
        let mut teardown = Vec::new();
        for volume_id in &created {
            if let Err(e) = delete_when_possible(api.as_ref(), volume_id).await {
                warn!(%volume_id, error = %e, "a drill's volume was not deleted");
                teardown.push(format!(
                    "volume {volume_id} not deleted ({e}): delete it by hand (tag {}={})",
                    tags::DRILL,
                    set.id
                ));
            } else {
                info!(%volume_id, "drill volume deleted");
            }
        }
        let outcome = checks
            .iter()
            .map(|c| c.outcome())
            .max_by_key(|o| rank(*o))
            .unwrap_or(VerifyOutcome::Error);
        VerifySnapshotsResponse {
            outcome: outcome.into(),
            checks,
            duration_ms: started.elapsed().as_millis() as u64,
            teardown: teardown.join("; "),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn drill_steps(
        &self,
        api: &dyn Ec2Api,
        set: &SnapshotSet,
        host: &str,
        instance_id: &str,
        available_within: Duration,
        checks: &mut Vec<VerifyCheck>,
        created: &mut Vec<String>,
    ) {
        let t = Instant::now();
        let zone_check = |outcome: VerifyOutcome, output: String, t: Instant| VerifyCheck {
            name: host.to_owned(),
            kind: "ebs".into(),
            outcome: outcome.into(),
            check: "availability zone".into(),
            output,
            duration_ms: t.elapsed().as_millis() as u64,
        };
        if instance_id.is_empty() {
            checks.push(zone_check(
                VerifyOutcome::Error,
                format!(
                    "agent {host} reports no EC2 instance id: the availability zone to restore in is unknown"
                ),
                t,
            ));
            return;
        }
        let zone = match api.describe_instance(instance_id).await {
            Ok(instance) if !instance.availability_zone.is_empty() => instance.availability_zone,
            Ok(_) => {
                checks.push(zone_check(
                    VerifyOutcome::Error,
                    format!("DescribeInstances {instance_id}: no availability zone"),
                    t,
                ));
                return;
            }
            Err(e) => {
                checks.push(zone_check(
                    VerifyOutcome::Error,
                    format!("DescribeInstances {instance_id}: {e}"),
                    t,
                ));
                return;
            }
        };
        // One volume per snapshot of the host, in mount order.
        let mut volumes: Vec<_> = set
            .volumes
            .iter()
            .filter(|v| v.agent == host && !v.snapshot_id.is_empty())
            .collect();
        volumes.sort_by(|a, b| a.mount_point.cmp(&b.mount_point));
        let mut made: Vec<(String, String, String, Instant)> = Vec::new();
        for volume in &volumes {
            let t = Instant::now();
            let mut volume_tags = vec![
                (tags::SET_ID.to_owned(), set.id.clone()),
                (tags::GROUP.to_owned(), set.group.clone()),
                (tags::HOST.to_owned(), host.to_owned()),
                (tags::MOUNT.to_owned(), volume.mount_point.clone()),
                (tags::SOURCE_SNAPSHOT.to_owned(), volume.snapshot_id.clone()),
                (tags::DRILL.to_owned(), set.id.clone()),
                (
                    "Name".to_owned(),
                    format!("{} drill {host}:{}", set.id, volume.mount_point),
                ),
            ];
            volume_tags.extend(self.config.tags.iter().map(|(k, v)| (k.clone(), v.clone())));
            match api
                .create_volume(&CreateVolumeReq {
                    snapshot_id: volume.snapshot_id.clone(),
                    availability_zone: zone.clone(),
                    volume_type: "gp3".into(),
                    tags: volume_tags,
                })
                .await
            {
                Ok(volume_id) => {
                    info!(%volume_id, snapshot_id = %volume.snapshot_id, "drill volume created");
                    created.push(volume_id.clone());
                    made.push((
                        volume.mount_point.clone(),
                        volume.snapshot_id.clone(),
                        volume_id,
                        t,
                    ));
                }
                Err(e) => {
                    // A snapshot that is gone cannot be restored: the set is broken. Anything
                    // else (permissions, limits, the API) says nothing about the set.
                    let outcome = if e.is_not_found() {
                        VerifyOutcome::Failed
                    } else {
                        VerifyOutcome::Error
                    };
                    checks.push(VerifyCheck {
                        name: volume.mount_point.clone(),
                        kind: "ebs".into(),
                        outcome: outcome.into(),
                        check: "CreateVolume".into(),
                        output: format!("CreateVolume from {} in {zone}: {e}", volume.snapshot_id),
                        duration_ms: t.elapsed().as_millis() as u64,
                    });
                    return;
                }
            }
        }
        // Every volume `available` (or one in `error`, or the deadline).
        let deadline = Instant::now() + available_within;
        let ids: Vec<String> = made.iter().map(|m| m.2.clone()).collect();
        let mut states: Vec<String> = vec![String::new(); ids.len()];
        let mut last_error = String::new();
        let mut done_at: Vec<Option<Instant>> = vec![None; ids.len()];
        let mut delay = Duration::from_millis(200);
        loop {
            match api.describe_volumes(&ids).await {
                Ok(described) => {
                    for (i, id) in ids.iter().enumerate() {
                        if let Some(d) = described.iter().find(|d| &d.volume_id == id) {
                            states[i] = d.state.clone();
                            if d.state != "creating" && done_at[i].is_none() {
                                done_at[i] = Some(Instant::now());
                            }
                        }
                    }
                    last_error.clear();
                }
                Err(e) => last_error = format!("DescribeVolumes: {e}"),
            }
            if states.iter().all(|s| !s.is_empty() && s != "creating") || Instant::now() >= deadline
            {
                break;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        for (i, (mount, snapshot_id, volume_id, t)) in made.iter().enumerate() {
            let took = done_at[i].unwrap_or_else(Instant::now).duration_since(*t);
            let (outcome, output) = match states[i].as_str() {
                "available" => (
                    VerifyOutcome::NoBlockDevice,
                    format!(
                        "{volume_id} from {snapshot_id} in {zone}: available after {} ms; no block device here: the volume is not attached, so nothing was mounted or checked",
                        took.as_millis()
                    ),
                ),
                "error" => (
                    VerifyOutcome::Failed,
                    format!(
                        "{volume_id} from {snapshot_id} in {zone}: the volume went to state error"
                    ),
                ),
                "" | "creating" => (
                    VerifyOutcome::Error,
                    format!(
                        "{volume_id} from {snapshot_id} in {zone}: not available within {} s{}",
                        available_within.as_secs(),
                        if last_error.is_empty() {
                            String::new()
                        } else {
                            format!(" ({last_error})")
                        }
                    ),
                ),
                other => (
                    VerifyOutcome::Error,
                    format!("{volume_id} from {snapshot_id} in {zone}: unexpected state {other}"),
                ),
            };
            checks.push(VerifyCheck {
                name: mount.clone(),
                kind: "ebs".into(),
                outcome: outcome.into(),
                check: "CreateVolume, available".into(),
                output,
                duration_ms: took.as_millis() as u64,
            });
        }
    }
}

/// Failed beats error beats no block device beats passed (the drill's outcome is its worst
/// check's).
fn rank(outcome: VerifyOutcome) -> u8 {
    match outcome {
        VerifyOutcome::Failed => 5,
        VerifyOutcome::Error => 4,
        VerifyOutcome::Unspecified => 3,
        VerifyOutcome::NoBlockDevice => 2,
        VerifyOutcome::Skipped => 1,
        VerifyOutcome::Passed => 0,
    }
}

/// DeleteVolume, retried while the volume is still `creating` (IncorrectState); NotFound
/// counts as done.
async fn delete_when_possible(api: &dyn Ec2Api, volume_id: &str) -> Result<(), Ec2Error> {
    let until = Instant::now() + DELETE_WITHIN;
    let mut delay = Duration::from_millis(500);
    loop {
        match api.delete_volume(volume_id).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_not_found() => return Ok(()),
            Err(Ec2Error::Refused { code, message })
                if code == "IncorrectState" && Instant::now() < until =>
            {
                let _ = (code, message);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(Ec2Error::Throttled { .. } | Ec2Error::Ambiguous { .. })
                if Instant::now() < until =>
            {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(e),
        }
    }
}
