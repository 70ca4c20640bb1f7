//! Operator actions on finished sets and on the fleet: delete, restore, agent and group status.

use std::collections::BTreeMap;
use std::time::Duration;

use quiesce_proto::agent::v1 as agent_pb;
use quiesce_proto::coordinator::v1 as pb;

use crate::error::{Error, agent_error};
use crate::workflow::Coordinator;

impl Coordinator {
    fn finished_set(&self, id: &str) -> Result<pb::SnapshotSet, Error> {
        let set = self
            .catalog()
            .get(id)?
            .ok_or_else(|| Error::UnknownSet { id: id.to_owned() })?;
        if set.state() == pb::SetState::Running {
            return Err(Error::SetRunning { id: id.to_owned() });
        }
        Ok(set)
    }

    /// Deletes a finished set: everything of it on every member (through its provider: for
    /// reflink each agent removes the set's whole directory, partial clones and temporary names
    /// included), then its catalog entry. The removals go through the reconciler's catalog, so
    /// a member that cannot be reached now is retried until it answers, and the set is
    /// forgotten once nothing of it is left. The reply says, per host, what was removed and
    /// what could not be.
    pub async fn delete_set(&self, id: &str) -> Result<pb::DeleteSetResponse, Error> {
        self.delete_set_with(id, false).await
    }

    /// Until when a set is locked against deletion, if it is now: only consistent sets are
    /// (a failed set holds nothing to protect, and its leftovers must go).
    pub fn locked_until(&self, set: &pb::SnapshotSet) -> Option<u64> {
        (set.state() == pb::SetState::Consistent && set.locked_until_ms > self.clock().now_ms())
            .then_some(set.locked_until_ms)
    }

    /// The refusal of a locked set's delete.
    pub fn locked_error(&self, set: &pb::SnapshotSet, until_ms: u64) -> Error {
        let window = self
            .group(&set.group)
            .map(|g| g.approval_window)
            .unwrap_or_default();
        Error::Locked {
            id: set.id.clone(),
            group: set.group.clone(),
            until: humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(until_ms),
            )
            .to_string(),
            window: humantime::format_duration(window).to_string(),
        }
    }

    /// `delete_set`; `unlocked`: two admins approved the early delete of a locked set.
    pub async fn delete_set_with(
        &self,
        id: &str,
        unlocked: bool,
    ) -> Result<pb::DeleteSetResponse, Error> {
        let set = self.finished_set(id)?;
        if !unlocked && let Some(until) = self.locked_until(&set) {
            return Err(self.locked_error(&set, until));
        }
        let group = self.group(&set.group)?;
        let provider = self.provider(group);
        let mut by_agent = snapshots_by_agent(&set);
        if provider.name() == "reflink" {
            // Host-local snapshots: every member agent removes everything of the set (partial
            // clones of a failed set included), even where no snapshot id was recorded.
            for volume in &set.volumes {
                by_agent.entry(volume.agent.clone()).or_default();
            }
        }
        for pending in &set.pending_removals {
            by_agent.entry(pending.agent.clone()).or_default();
        }
        // An attempt the reconciler is making now finishes first; this one follows.
        self.removals_idle(id).await;
        self.windows().closed("a set's delete").await;
        let now = self.clock().now_ms();
        self.catalog().request_delete(id)?;
        for (agent, ids) in &by_agent {
            self.catalog()
                .add_pending_removal(id, agent, ids, false, now)?;
        }
        if by_agent.is_empty() {
            self.catalog().delete(id)?;
        }
        let pendings = self.catalog().pending_removals(id)?;
        let hosts = self.attempt_removals(&pendings).await;
        let forgotten = self.catalog().get(id)?.is_none();
        Ok(pb::DeleteSetResponse {
            snapshots_deleted: hosts.iter().map(|h| h.deleted).sum(),
            hosts,
            forgotten,
            approvals: Vec::new(),
        })
    }

    /// Restores a consistent set the way its provider does: new EBS volumes (optionally
    /// attached), or new images on each member host.
    pub async fn restore(
        &self,
        req: &pb::RestoreSetRequest,
    ) -> Result<Vec<pb::RestoredVolume>, Error> {
        let set = self.finished_set(&req.set_id)?;
        let group = self.group(&set.group)?;
        let provider = self.provider(group);
        let Some(ebs) = provider.as_ebs() else {
            if req.target_dir.is_empty() {
                return Err(Error::InvalidArgument(
                    "target dir is required for this provider".into(),
                ));
            }
            return self.restore_set(&req.set_id, &req.target_dir).await;
        };
        if set.state() != pb::SetState::Consistent {
            return Err(Error::NotRestorable {
                state: set.state(),
                id: set.id,
            });
        }
        if set.completion() == pb::Completion::Pending {
            // EC2 can create a volume from a pending snapshot; it is lazily filled. Say so.
            tracing::info!(set_id = %set.id, "restoring from snapshots still pending");
        }
        let attach = (!req.attach_instance.is_empty()).then_some(req.attach_instance.as_str());
        ebs.restore(&set, &req.availability_zone, &req.volume_type, attach)
            .await
            .map_err(|message| {
                if req.availability_zone.is_empty() {
                    Error::InvalidArgument(message)
                } else {
                    Error::Provider { message }
                }
            })
    }

    /// Materialises a consistent set's snapshots as new images on each member host.
    pub async fn restore_set(
        &self,
        id: &str,
        target_dir: &str,
    ) -> Result<Vec<pb::RestoredVolume>, Error> {
        let set = self.finished_set(id)?;
        if set.state() != pb::SetState::Consistent {
            return Err(Error::NotRestorable {
                id: id.to_owned(),
                state: set.state(),
            });
        }
        if !target_dir.starts_with('/') {
            return Err(Error::InvalidArgument(format!(
                "--target-dir {:?} must be an absolute directory on each member host",
                quiesce_proto::echo::capped(target_dir)
            )));
        }
        let mut restored = Vec::new();
        for (agent, _) in snapshots_by_agent(&set) {
            let client = self.client(&agent)?;
            let snapshots = set
                .volumes
                .iter()
                .filter(|v| v.agent == agent && !v.snapshot_id.is_empty())
                .map(|v| agent_pb::VolumeSnapshot {
                    mount_point: v.mount_point.clone(),
                    snapshot_id: v.snapshot_id.clone(),
                    size_bytes: v.size_bytes,
                    duration_ms: 0,
                })
                .collect();
            let reply = client
                .restore_snapshots(agent_pb::RestoreSnapshotsRequest {
                    set_id: set.id.clone(),
                    snapshots,
                    target_dir: target_dir.to_owned(),
                })
                .await
                .map_err(|status| crate::error::from_agent(&agent, &status))?;
            for image in reply.images {
                restored.push(pb::RestoredVolume {
                    attach_hint: crate::shell::attach_image_hint(
                        &image.image_path,
                        &image.fs_type,
                        &image.mount_point,
                    ),
                    fs_type: image.fs_type,
                    agent: agent.clone(),
                    mount_point: image.mount_point,
                    image_path: image.image_path,
                    cloned: image.cloned,
                    ..Default::default()
                });
            }
        }
        Ok(restored)
    }

    /// A restore drill of a consistent set on one member host: the agent restores that host's
    /// snapshots into scratch space, starts the databases the set's hooks name on the copies,
    /// runs their checks and tears everything down. The outcome is recorded with the set
    /// (also when the drill could not run) and counted in the metrics.
    pub async fn verify_set(&self, req: &pb::VerifySetRequest) -> Result<pb::Verification, Error> {
        let set = self.finished_set(&req.set_id)?;
        if set.state() != pb::SetState::Consistent {
            return Err(Error::NotRestorable {
                state: set.state(),
                id: set.id,
            });
        }
        let group = self.group(&set.group)?;
        let provider = self.provider(group);
        let ebs = provider.as_ebs().is_some();
        let agents: Vec<String> = snapshots_by_agent(&set).into_keys().collect();
        let host = if req.host.is_empty() {
            match agents.as_slice() {
                [one] => one.clone(),
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "set {} has snapshots on {}: name the member to verify with --host",
                        set.id,
                        agents.join(", ")
                    )));
                }
            }
        } else if agents.contains(&req.host) {
            req.host.clone()
        } else {
            return Err(Error::InvalidArgument(format!(
                "--host {}: the set has no snapshot there (its members: {})",
                quiesce_proto::echo::capped(&req.host),
                agents.join(", ")
            )));
        };
        let client = self.client(&host)?;
        let snapshots = set
            .volumes
            .iter()
            .filter(|v| v.agent == host && !v.snapshot_id.is_empty())
            .map(|v| agent_pb::VolumeSnapshot {
                mount_point: v.mount_point.clone(),
                snapshot_id: v.snapshot_id.clone(),
                size_bytes: v.size_bytes,
                duration_ms: 0,
            })
            .collect();
        let databases = set
            .hook_outputs
            .iter()
            .filter(|o| o.agent == host)
            .map(|o| agent_pb::VerifyDatabase {
                hook: o.hook.clone(),
                backup_label: o.backup_label.clone(),
                tablespace_map: o.tablespace_map.clone(),
            })
            .collect();
        let started_at = self.clock().now_ms();
        let reply = if ebs {
            // The API part of a restore (volumes from the snapshots, in the host's zone), on a
            // task of its own: its clean-up runs even if this call is dropped.
            match client.get_host_info().await {
                Ok(info) => {
                    let (set, host) = (set.clone(), host.clone());
                    tokio::spawn(async move {
                        let ebs = provider.as_ebs().expect("an EBS group's provider");
                        ebs.drill(
                            &set,
                            &host,
                            &info.instance_id,
                            crate::ebs::drill::AVAILABLE_WITHIN,
                        )
                        .await
                    })
                    .await
                    .map_err(|e| tonic::Status::internal(format!("the drill's task ended: {e}")))
                }
                Err(status) => Err(status),
            }
        } else {
            client
                .verify_snapshots(agent_pb::VerifySnapshotsRequest {
                    set_id: set.id.clone(),
                    snapshots,
                    scratch_dir: req.scratch_dir.clone(),
                    databases,
                })
                .await
        };
        let finished_at = self.clock().now_ms();
        let (verification, refused) = match reply {
            Ok(reply) => (
                pb::Verification {
                    agent: host.clone(),
                    verified_at_ms: finished_at,
                    duration_ms: reply.duration_ms,
                    outcome: verify_outcome(reply.outcome()).into(),
                    checks: reply
                        .checks
                        .into_iter()
                        .map(|c| pb::VerifyCheck {
                            outcome: verify_outcome(c.outcome()).into(),
                            name: c.name,
                            kind: c.kind,
                            check: c.check,
                            output: c.output,
                            duration_ms: c.duration_ms,
                        })
                        .collect(),
                    error: if reply.teardown.is_empty() {
                        String::new()
                    } else {
                        format!("teardown: {}", reply.teardown)
                    },
                },
                None,
            ),
            Err(status) => {
                let error = crate::error::from_agent(&host, &status);
                (
                    pb::Verification {
                        agent: host.clone(),
                        verified_at_ms: finished_at,
                        duration_ms: finished_at.saturating_sub(started_at),
                        outcome: pb::VerifyOutcome::Error.into(),
                        checks: Vec::new(),
                        error: error.to_string(),
                    },
                    Some(error),
                )
            }
        };
        self.windows().closed("a restore drill's record").await;
        self.catalog().add_verification(&set.id, &verification)?;
        let result = match verification.outcome() {
            pb::VerifyOutcome::Passed => "ok",
            pb::VerifyOutcome::Failed => "failed",
            pb::VerifyOutcome::NoBlockDevice => "no_block_device",
            _ => "error",
        };
        self.metrics().verified(&set.group, result);
        match refused {
            Some(error) => Err(error),
            None => Ok(verification),
        }
    }

    /// Every configured agent, asked for its host info in parallel.
    pub async fn agent_statuses(&self) -> Vec<pb::AgentStatus> {
        let calls = self.config().agents.iter().map(|agent| async move {
            let mut status = pb::AgentStatus {
                name: agent.name.clone(),
                endpoint: agent.endpoint.clone(),
                ..Default::default()
            };
            let Ok(client) = self.client(&agent.name) else {
                status.error = "no client".into();
                return status;
            };
            match tokio::time::timeout(Duration::from_secs(5), client.get_host_info()).await {
                Ok(Ok(info)) => {
                    status.reachable = true;
                    status.hostname = info.hostname;
                    status.agent_version = info.agent_version;
                    status.frozen_sets = info.freezes.into_iter().map(|f| f.set_id).collect();
                    status.instance_id = info.instance_id;
                    status.instance_problem = info.instance_problem;
                    status.volumes = info
                        .volumes
                        .into_iter()
                        .map(|v| pb::AgentVolume {
                            mount_point: v.mount_point,
                            fs_type: v.fs_type,
                            device: v.device,
                            backing_file: v.backing_file,
                            frozen_by: v.frozen_by,
                            problem: v.problem,
                            ebs_volume_id: v.ebs_volume_id,
                            ebs_problem: v.ebs_problem,
                        })
                        .collect();
                }
                Ok(Err(e)) => status.error = agent_error(&agent.name, &e),
                Err(_) => status.error = "no answer within 5s".into(),
            }
            self.metrics().agent_reached(&agent.name, status.reachable);
            status.pending_removals = self
                .pending_removals_where(Some(&agent.name), None)
                .unwrap_or_default();
            status
        });
        futures::future::join_all(calls).await
    }

    pub fn group_infos(&self) -> Result<Vec<pb::GroupInfo>, Error> {
        let running: BTreeMap<String, String> = self
            .catalog()
            .running()?
            .into_iter()
            .map(|set| (set.group, set.id))
            .collect();
        self.config()
            .groups
            .iter()
            .map(|group| {
                let last = self.catalog().last_consistent(&group.name)?;
                let status = self.schedule_status(group);
                let consistent_sets = self
                    .catalog()
                    .finished(&group.name)?
                    .iter()
                    .filter(|s| s.consistent)
                    .count() as u32;
                let last_scheduled = self.catalog().last_scheduled(&group.name)?;
                Ok(pb::GroupInfo {
                    name: group.name.clone(),
                    provider: group.provider.as_str().into(),
                    members: group
                        .members
                        .iter()
                        .map(|m| pb::GroupMember {
                            agent: m.agent.clone(),
                            mount_points: m
                                .mounts
                                .iter()
                                .map(|p| p.display().to_string())
                                .collect(),
                        })
                        .collect(),
                    running_set: running.get(&group.name).cloned().unwrap_or_default(),
                    last_consistent_set: last.as_ref().map(|l| l.0.clone()).unwrap_or_default(),
                    last_consistent_at_ms: last.map(|l| l.1).unwrap_or(0),
                    schedule: group
                        .schedule
                        .as_ref()
                        .map(|s| s.cron.clone())
                        .unwrap_or_default(),
                    next_run_at_ms: status.next_run_at_ms,
                    overdue: status.overdue,
                    retention: crate::retention::describe(group.retention.as_ref()),
                    consistent_sets,
                    last_scheduled_set: last_scheduled
                        .as_ref()
                        .map(|l| l.0.clone())
                        .unwrap_or_default(),
                    last_scheduled_at_ms: last_scheduled.map(|l| l.1).unwrap_or(0),
                    pending_removals: self.pending_removals_where(None, Some(&group.name))?,
                })
            })
            .collect()
    }
}

impl Coordinator {
    /// The Prometheus text: catalog-derived gauges refreshed, then everything encoded.
    pub fn render_metrics(&self) -> String {
        let metrics = self.metrics();
        if let Ok(counts) = self.catalog().counts() {
            metrics.refresh_set_counts(self.config(), &counts);
        }
        if let Ok(pending) = self.catalog().pending_counts() {
            metrics.refresh_pending_removals(self.config(), &pending);
        }
        for group in &self.config().groups {
            // A catalog that cannot be read leaves the group's gauges as they were.
            let Ok(last) = self.catalog().last_consistent(&group.name) else {
                continue;
            };
            let status = group.schedule.as_ref().map(|_| self.schedule_status(group));
            let view = crate::metrics::GroupView {
                last_consistent_at_ms: last.map(|(_, at)| at),
                overdue: status.as_ref().is_some_and(|s| s.overdue),
                next_run_at_ms: status.map(|s| s.next_run_at_ms),
            };
            metrics.refresh_group(&group.name, &view);
            if let Ok(verified) = self.catalog().last_verified(&group.name) {
                metrics.refresh_last_verified(&group.name, verified.map(|(_, at)| at));
            }
        }
        metrics.encode()
    }
}

/// The snapshot ids of a set, per agent, agents in a stable order.
fn snapshots_by_agent(set: &pb::SnapshotSet) -> BTreeMap<String, Vec<String>> {
    let mut by_agent: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for volume in &set.volumes {
        if !volume.snapshot_id.is_empty() {
            by_agent
                .entry(volume.agent.clone())
                .or_default()
                .push(volume.snapshot_id.clone());
        }
    }
    by_agent
}

fn verify_outcome(outcome: agent_pb::VerifyOutcome) -> pb::VerifyOutcome {
    match outcome {
        agent_pb::VerifyOutcome::Unspecified => pb::VerifyOutcome::Unspecified,
        agent_pb::VerifyOutcome::Passed => pb::VerifyOutcome::Passed,
        agent_pb::VerifyOutcome::Failed => pb::VerifyOutcome::Failed,
        agent_pb::VerifyOutcome::Error => pb::VerifyOutcome::Error,
        agent_pb::VerifyOutcome::Skipped => pb::VerifyOutcome::Skipped,
        agent_pb::VerifyOutcome::NoBlockDevice => pb::VerifyOutcome::NoBlockDevice,
    }
}
