//! The gRPC adapter: convert the request, call the domain, convert the answer. No logic here.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use quiesce_proto::agent::v1 as pb;
use quiesce_proto::agent::v1::agent_server::Agent;
use quiesce_proto::identity::{Identity, Role};
use tonic::{Request, Response, Status};
use tracing::{Instrument, info_span};

use crate::cloud::{DeviceRoots, imds_instance_id};
use crate::error::Error;
use crate::freeze::{FreezeEnd, FreezeManager, check_path_lengths, check_paths, validate_set_id};
use crate::hooks::HookOutput;
use crate::reflink::ReflinkProvider;

pub struct AgentService {
    manager: Arc<FreezeManager>,
    reflink: ReflinkProvider,
    hostname: String,
    devices: DeviceRoots,
    /// Restore drills: the namespace and mounts, and the database checks.
    drill_host: Arc<dyn crate::verify::DrillHost>,
    drill_checks: Arc<dyn crate::verify::DatabaseChecks>,
    /// The instance id once IMDS answered (failures are not cached: asked again next time).
    instance_id: tokio::sync::Mutex<Option<String>>,
}

impl AgentService {
    pub fn new(manager: Arc<FreezeManager>) -> Self {
        let reflink_config = &manager.config().reflink;
        let reflink = ReflinkProvider::new(reflink_config.snapshot_dir.clone()).with_extent_cost(
            reflink_config
                .extent_cost
                .unwrap_or(crate::reflink::DEFAULT_EXTENT_COST),
        );
        let hostname = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown".into());
        AgentService {
            manager,
            reflink,
            hostname,
            devices: DeviceRoots::default(),
            drill_host: Arc::new(crate::verify::SystemDrillHost),
            drill_checks: Arc::new(crate::verify::EngineChecks),
            instance_id: tokio::sync::Mutex::new(None),
        }
    }

    /// Reads device information under other roots than `/sys` and `/dev` (tests).
    pub fn with_device_roots(mut self, devices: DeviceRoots) -> Self {
        self.devices = devices;
        self
    }

    /// This host's EC2 instance id: from the config, else IMDSv2. `Err` says why not.
    async fn instance_id(&self) -> Result<String, String> {
        let Some(ebs) = &self.manager.config().ebs else {
            return Err("EBS discovery is off: no [ebs] section in the agent config".into());
        };
        if let Some(id) = &ebs.instance_id {
            return Ok(id.clone());
        }
        let mut cached = self.instance_id.lock().await;
        if let Some(id) = cached.as_ref() {
            return Ok(id.clone());
        }
        let id = imds_instance_id(&ebs.imds_endpoint, ebs.imds_timeout).await?;
        *cached = Some(id.clone());
        Ok(id)
    }

    /// The EBS volume id of an allowed volume: from the config, else the device's NVMe serial.
    fn ebs_volume_id(
        &self,
        volume: &crate::config::VolumeConfig,
        device: &str,
    ) -> Result<String, String> {
        if let Some(id) = &volume.ebs_volume_id {
            return Ok(id.clone());
        }
        if self.manager.config().ebs.is_none() {
            return Err("EBS discovery is off: no [ebs] section in the agent config".into());
        }
        if device.is_empty() {
            return Err("the mount is not resolved, so its device is unknown".into());
        }
        self.devices.volume_id(device)
    }

    /// What a restore must not write to: every volume of this agent's config (so every
    /// volume of every group on this host) and the snapshot's own source mount, each by the
    /// superblock mountinfo gives its mount; and what this agent holds frozen.
    fn restore_guard(&self, source_mount: &std::path::Path) -> crate::restore::Guard {
        let mounts = self.manager.mounts();
        let mut protected = Vec::new();
        let volumes = self.manager.config().volumes.iter().map(|v| {
            (
                v.mount.clone(),
                format!("volume {} of this agent", v.mount.display()),
            )
        });
        let source = std::iter::once((
            source_mount.to_owned(),
            format!("the snapshot's source volume {}", source_mount.display()),
        ));
        for (mount, what) in volumes.chain(source) {
            if let Ok(Some(entry)) = mounts.at(&mount) {
                protected.push(crate::restore::Protected {
                    dev: entry.dev,
                    what,
                });
            }
        }
        crate::restore::Guard {
            protected,
            frozen: self.manager.frozen_devs(),
            frozen_probe: None,
        }
    }

    fn backing_files(&self) -> Vec<PathBuf> {
        let mounts = self.manager.mounts();
        self.manager
            .config()
            .volumes
            .iter()
            .filter_map(|v| mounts.at(&v.mount).ok().flatten())
            .filter_map(|entry| mounts.loop_backing_file(entry.dev))
            .collect()
    }
}

impl AgentService {
    /// When a clone of this set must stop: what is left of the group's freeze budget when the
    /// call came, and the set's hard cap (max-freeze), whichever is first. Lease ends and thaws
    /// are seen directly (the set no longer holds its filesystems).
    async fn snapshot_deadline(
        &self,
        set_id: &str,
        time_left_ms: u64,
    ) -> Option<(std::time::Instant, String)> {
        let now = std::time::Instant::now();
        let mut deadline: Option<(std::time::Instant, String)> = (time_left_ms > 0).then(|| {
            (
                now + Duration::from_millis(time_left_ms),
                format!(
                    "the group's freeze budget ran out ({time_left_ms} ms were left when the snapshot call came)"
                ),
            )
        });
        let held = self.manager.held().await;
        if let Some(held) = held.iter().find(|h| h.set_id == set_id) {
            let left = held
                .hard_deadline_ms
                .saturating_sub(crate::freeze::unix_ms());
            let hard = now + Duration::from_millis(left);
            if deadline.as_ref().is_none_or(|(at, _)| hard < *at) {
                deadline = Some((hard, "the agent's max-freeze cap came".to_owned()));
            }
        }
        deadline
    }

    /// Starts the clone of one volume on a blocking thread of its own (the volumes of one
    /// request are cloned at once, like the floor's parallel FICLONE).
    fn begin_snapshot(
        &self,
        set_id: &str,
        mount: &std::path::Path,
        dev: crate::mounts::DevId,
        backing: Option<PathBuf>,
        frozen: &[crate::mounts::DevId],
        deadline: Option<(std::time::Instant, String)>,
    ) -> Result<PendingClone, Status> {
        let device = self
            .manager
            .mounts()
            .at(mount)
            .map_err(Error::from)?
            .map(|e| e.source)
            .unwrap_or_else(|| dev.to_string());
        let backing = ReflinkProvider::backing_file(mount, &device, backing.as_deref())
            .map_err(Error::from)?
            .to_owned();
        let reflink = self.reflink.clone();
        let set_id = set_id.to_owned();
        let frozen = frozen.to_vec();
        let target_mount = mount.to_owned();
        let manager = self.manager.clone();
        Ok(tokio::task::spawn_blocking(move || {
            // Between ranges: stop when the freeze ended (lease, max-freeze, a thaw) or its
            // deadline came, so the thaw never waits behind more than one range.
            let stop = || {
                if manager.holder_of(dev).as_deref() != Some(set_id.as_str()) {
                    return Some("the freeze ended while cloning".to_owned());
                }
                match &deadline {
                    Some((at, why)) if std::time::Instant::now() >= *at => Some(why.clone()),
                    _ => None,
                }
            };
            reflink.snapshot_until(&set_id, &target_mount, &backing, &frozen, &stop)
        }))
    }
}

type PendingClone =
    tokio::task::JoinHandle<Result<crate::reflink::Clone, crate::reflink::ReflinkError>>;

/// The answer of one clone started by `begin_snapshot`.
async fn finish_snapshot(
    mount: &std::path::Path,
    pending: PendingClone,
) -> Result<pb::VolumeSnapshot, Status> {
    let clone = pending
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(Error::from)?;
    Ok(pb::VolumeSnapshot {
        mount_point: mount.display().to_string(),
        snapshot_id: clone.path.display().to_string(),
        size_bytes: clone.size_bytes,
        duration_ms: clone.duration_ms,
    })
}

fn paths(list: Vec<String>) -> Vec<PathBuf> {
    list.into_iter().map(PathBuf::from).collect()
}

fn lease(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

fn freeze_end(end: FreezeEnd) -> pb::FreezeEnd {
    match end {
        FreezeEnd::Thawed => pb::FreezeEnd::Thawed,
        FreezeEnd::LeaseExpired => pb::FreezeEnd::LeaseExpired,
        FreezeEnd::MaxFreeze => pb::FreezeEnd::MaxFreeze,
        FreezeEnd::Shutdown => pb::FreezeEnd::Shutdown,
        FreezeEnd::ExternalThaw => pb::FreezeEnd::ExternalThaw,
        FreezeEnd::UnknownSet => pb::FreezeEnd::UnknownSet,
        FreezeEnd::Guardian => pb::FreezeEnd::Guardian,
    }
}

fn hook_output(output: HookOutput) -> pb::HookOutput {
    pb::HookOutput {
        hook: output.hook,
        kind: output.kind,
        values: output
            .values
            .values
            .into_iter()
            .map(|(key, value)| pb::HookValue { key, value })
            .collect(),
        backup_label: output.values.backup_label,
        tablespace_map: output.values.tablespace_map,
        error: output.error,
        quiesce_ms: output.quiesce_ms,
        resume_ms: output.resume_ms,
    }
}

impl AgentService {
    /// A restore drill (see `verify`): copies restored by the restore machinery (every
    /// refusal of a restore applies to the scratch space), checked on a thread of its own in a
    /// private mount namespace, everything removed after.
    async fn verify(
        &self,
        req: pb::VerifySnapshotsRequest,
    ) -> Result<pb::VerifySnapshotsResponse, Status> {
        let started = std::time::Instant::now();
        if req.snapshots.len() > self.manager.config().max_volumes_per_request {
            return Err(Error::OverLimit {
                what: "snapshots in one request",
                got: req.snapshots.len(),
                max: self.manager.config().max_volumes_per_request,
                limit: "max-volumes-per-request",
            }
            .into());
        }
        check_path_lengths(
            std::iter::once(req.scratch_dir.len())
                .chain(req.snapshots.iter().map(|s| s.snapshot_id.len()))
                .chain(req.snapshots.iter().map(|s| s.mount_point.len())),
        )?;
        let scratch = if req.scratch_dir.is_empty() {
            // Beside the snapshot directory: `<snapshot-dir>/<set>/<volume>.img`.
            let first = std::path::Path::new(&req.snapshots[0].snapshot_id);
            first
                .parent()
                .and_then(|set_dir| set_dir.parent())
                .and_then(|snapshot_dir| snapshot_dir.parent())
                .map(|dir| dir.join(".quiesce-verify"))
                .ok_or_else(|| Status::invalid_argument("a snapshot id is not a path"))?
        } else {
            PathBuf::from(&req.scratch_dir)
        };
        let scratch_existed = std::fs::symlink_metadata(&scratch).is_ok();
        let root = scratch.join(format!("{}.{}", req.set_id, crate::freeze::unix_ms()));
        let images_dir = root.join("images");
        let backing_files = self.backing_files();
        let mut copies = Vec::new();
        for snapshot in &req.snapshots {
            let reflink = self.reflink.clone();
            let set_id = req.set_id.clone();
            let target = images_dir.clone();
            let backing_files = backing_files.clone();
            let id = PathBuf::from(&snapshot.snapshot_id);
            let guard = self.restore_guard(std::path::Path::new(&snapshot.mount_point));
            let restored = tokio::task::spawn_blocking(move || {
                reflink.restore(&set_id, &id, &target, &backing_files, &guard)
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))
            .and_then(|r| r.map_err(Status::from));
            match restored {
                Ok(restored) => copies.push(crate::verify::Copy {
                    mount_point: PathBuf::from(&snapshot.mount_point),
                    image: restored.path,
                    fs_type: restored.fs_type,
                }),
                Err(status) => {
                    if !copies.is_empty() {
                        let root = root.clone();
                        let _ = tokio::task::spawn_blocking(move || {
                            crate::verify::remove_scratch(&root, Duration::from_secs(10))
                        })
                        .await;
                    }
                    return Err(status);
                }
            }
        }
        // The databases run as their own users: they must reach their mount points.
        for dir in std::iter::once(&root).chain((!scratch_existed).then_some(&scratch)) {
            if let Err(e) = crate::verify::traversable(dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "drill directory not traversable");
            }
        }
        let described = self
            .manager
            .hooks()
            .describe(&hooks_of(&req), self.manager.mounts())
            .await;
        let databases = req
            .databases
            .iter()
            .zip(described)
            .map(|(db, d)| crate::verify::Database {
                hook: db.hook.clone(),
                config: self.manager.config().hooks.get(&db.hook).cloned(),
                paths: d.paths,
                problem: d.problem,
                backup_label: db.backup_label.clone(),
                tablespace_map: db.tablespace_map.clone(),
            })
            .collect();
        let plan = crate::verify::Plan {
            root: root.clone(),
            copies,
            databases,
            deadline: std::time::Instant::now() + crate::verify::DRILL_TIMEOUT,
        };
        let host = self.drill_host.clone();
        let checks = self.drill_checks.clone();
        let report = tokio::task::spawn_blocking(move || {
            let report = crate::verify::run_on_own_thread(plan, host, checks);
            let removed = crate::verify::remove_scratch(&root, Duration::from_secs(30));
            (report, removed)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        let (report, removed) = report;
        let mut report = report.unwrap_or_else(|why| crate::verify::Report {
            checks: vec![crate::verify::Check {
                name: "drill".into(),
                kind: "filesystem".into(),
                outcome: crate::verify::Outcome::Error,
                check: "deadline".into(),
                output: why,
                duration: started.elapsed(),
            }],
            teardown: Vec::new(),
        });
        if let Err(why) = removed {
            report.teardown.push(why);
        }
        let outcome = report.outcome();
        tracing::info!(outcome = ?outcome, ms = started.elapsed().as_millis() as u64, "restore drill finished");
        Ok(pb::VerifySnapshotsResponse {
            outcome: verify_outcome(outcome).into(),
            checks: report
                .checks
                .into_iter()
                .map(|c| pb::VerifyCheck {
                    name: c.name,
                    kind: c.kind,
                    outcome: verify_outcome(c.outcome).into(),
                    check: c.check,
                    output: c.output,
                    duration_ms: c.duration.as_millis() as u64,
                })
                .collect(),
            duration_ms: started.elapsed().as_millis() as u64,
            teardown: report.teardown.join("; "),
        })
    }
}

fn hooks_of(req: &pb::VerifySnapshotsRequest) -> Vec<String> {
    req.databases.iter().map(|d| d.hook.clone()).collect()
}

fn verify_outcome(outcome: crate::verify::Outcome) -> pb::VerifyOutcome {
    match outcome {
        crate::verify::Outcome::Passed => pb::VerifyOutcome::Passed,
        crate::verify::Outcome::Failed => pb::VerifyOutcome::Failed,
        crate::verify::Outcome::Error => pb::VerifyOutcome::Error,
        crate::verify::Outcome::Skipped => pb::VerifyOutcome::Skipped,
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn describe_hooks(
        &self,
        request: Request<pb::DescribeHooksRequest>,
    ) -> Result<Response<pb::DescribeHooksResponse>, Status> {
        let req = request.into_inner();
        crate::freeze::validate_hook_names(&req.hooks)?;
        let described = self
            .manager
            .hooks()
            .describe(&req.hooks, self.manager.mounts())
            .await;
        let hooks = described
            .into_iter()
            .map(|d| pb::HookDescription {
                name: d.name,
                kind: d.kind,
                problem: d.problem,
                paths: d
                    .paths
                    .into_iter()
                    .map(|p| pb::HookPath {
                        what: p.what,
                        path: p.path.display().to_string(),
                        mount_point: p
                            .mount_point
                            .map(|m| m.display().to_string())
                            .unwrap_or_default(),
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::DescribeHooksResponse { hooks }))
    }

    async fn get_host_info(
        &self,
        _request: Request<pb::GetHostInfoRequest>,
    ) -> Result<Response<pb::GetHostInfoResponse>, Status> {
        let config = self.manager.config();
        let mut volumes = Vec::new();
        for volume in &config.volumes {
            let mut info = pb::VolumeInfo {
                mount_point: volume.mount.display().to_string(),
                ..Default::default()
            };
            match self
                .manager
                .resolve(std::slice::from_ref(&volume.mount))
                .await
            {
                Ok(resolved) => {
                    let resolved = &resolved[0];
                    info.fs_type = resolved.entry.fs_type.clone();
                    info.device = resolved.entry.source.clone();
                    info.backing_file = resolved
                        .backing_file
                        .as_ref()
                        .map(|b| b.display().to_string())
                        .unwrap_or_default();
                    info.frozen_by = self.manager.holder_of(resolved.dev()).unwrap_or_default();
                    if let Some(backing) = resolved.backing_file.clone() {
                        info.provider = "reflink".into();
                        let reflink = self.reflink.clone();
                        let estimate =
                            tokio::task::spawn_blocking(move || reflink.estimate(&backing)).await;
                        match estimate {
                            Ok(Ok((extents, cost))) => {
                                info.clone_extents = extents;
                                info.clone_estimate_ms = cost.as_millis() as u64;
                            }
                            // No estimate (0: unknown); the clone's own deadline still holds.
                            Ok(Err(e)) => tracing::warn!(
                                mount = %volume.mount.display(),
                                error = %crate::error::error_chain(&e),
                                "no clone estimate"
                            ),
                            Err(e) => tracing::warn!(error = %e, "no clone estimate"),
                        }
                    }
                }
                Err(e) => info.problem = crate::error::error_chain(&e),
            }
            match self.ebs_volume_id(volume, &info.device) {
                Ok(id) => info.ebs_volume_id = id,
                Err(why) => info.ebs_problem = why,
            }
            volumes.push(info);
        }
        let freezes = self
            .manager
            .held()
            .await
            .into_iter()
            .map(|held| pb::HeldFreeze {
                set_id: held.set_id,
                mount_points: held
                    .mount_points
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect(),
                frozen_at_ms: held.frozen_at_ms,
                lease_deadline_ms: held.lease_deadline_ms,
                hard_deadline_ms: held.hard_deadline_ms,
            })
            .collect();
        let (instance_id, instance_problem) = match self.instance_id().await {
            Ok(id) => (id, String::new()),
            Err(why) => (String::new(), why),
        };
        Ok(Response::new(pb::GetHostInfoResponse {
            instance_id,
            instance_problem,
            hostname: self.hostname.clone(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            volumes,
            freezes,
            max_freeze_ms: config.max_freeze.as_millis() as u64,
            default_lease_ms: config.default_lease.as_millis() as u64,
        }))
    }

    async fn prepare_volumes(
        &self,
        request: Request<pb::PrepareVolumesRequest>,
    ) -> Result<Response<pb::PrepareVolumesResponse>, Status> {
        let req = request.into_inner();
        let span = info_span!("prepare", set_id = %req.set_id);
        let took = self
            .manager
            .prepare_with_hooks(&req.set_id, &paths(req.mount_points), &req.hooks)
            .instrument(span)
            .await?;
        Ok(Response::new(pb::PrepareVolumesResponse {
            duration_ms: took.as_millis() as u64,
        }))
    }

    async fn freeze_volumes(
        &self,
        request: Request<pb::FreezeVolumesRequest>,
    ) -> Result<Response<pb::FreezeVolumesResponse>, Status> {
        let req = request.into_inner();
        let span = info_span!("freeze", set_id = %req.set_id);
        let info = self
            .manager
            .freeze_with_hooks(
                &req.set_id,
                &paths(req.mount_points),
                lease(req.lease_ms),
                &req.hooks,
            )
            .instrument(span)
            .await?;
        Ok(Response::new(pb::FreezeVolumesResponse {
            freeze_started_at_ms: info.freeze_started_at_ms,
            frozen_at_ms: info.frozen_at_ms,
            lease_deadline_ms: info.lease_deadline_ms,
            hard_deadline_ms: info.hard_deadline_ms,
        }))
    }

    async fn renew_lease(
        &self,
        request: Request<pb::RenewLeaseRequest>,
    ) -> Result<Response<pb::RenewLeaseResponse>, Status> {
        let req = request.into_inner();
        let info = self.manager.renew(&req.set_id, lease(req.lease_ms)).await?;
        Ok(Response::new(pb::RenewLeaseResponse {
            lease_deadline_ms: info.lease_deadline_ms,
            hard_deadline_ms: info.hard_deadline_ms,
        }))
    }

    async fn thaw_volumes(
        &self,
        request: Request<pb::ThawVolumesRequest>,
    ) -> Result<Response<pb::ThawVolumesResponse>, Status> {
        let req = request.into_inner();
        validate_set_id(&req.set_id)?;
        let span = info_span!("thaw", set_id = %req.set_id);
        let report = self.manager.thaw(&req.set_id).instrument(span).await;
        Ok(Response::new(pb::ThawVolumesResponse {
            held_continuously: report.held_continuously,
            end: freeze_end(report.end).into(),
            freeze_started_at_ms: report.freeze_started_at_ms,
            frozen_at_ms: report.frozen_at_ms,
            thawed_at_ms: report.thawed_at_ms,
            write_stall_ms: report.write_stall_ms,
            resume_ms: report.resume_ms,
            since_thaw_ms: report.since_thaw_ms(),
            hooks: report.hooks.into_iter().map(hook_output).collect(),
        }))
    }

    async fn create_snapshots(
        &self,
        request: Request<pb::CreateSnapshotsRequest>,
    ) -> Result<Response<pb::CreateSnapshotsResponse>, Status> {
        let req = request.into_inner();
        validate_set_id(&req.set_id)?;
        let volumes = self
            .manager
            .frozen_volumes(&req.set_id, &paths(req.mount_points))
            .await?;
        let frozen = self.manager.frozen_devs();
        let deadline = self.snapshot_deadline(&req.set_id, req.time_left_ms).await;
        // Every volume's clone at once, each on its own blocking thread; then their answers,
        // in the order asked.
        let mut pending = Vec::new();
        let mut failure = None;
        for (mount, dev, backing) in volumes {
            match self.begin_snapshot(&req.set_id, &mount, dev, backing, &frozen, deadline.clone())
            {
                Ok(clone) => pending.push((mount, clone)),
                Err(status) => {
                    failure = Some(status);
                    break;
                }
            }
        }
        let mut snapshots = Vec::new();
        for (mount, clone) in pending {
            match finish_snapshot(&mount, clone).await {
                Ok(snapshot) => snapshots.push(snapshot),
                Err(status) => {
                    failure.get_or_insert(status);
                }
            }
        }
        if let Some(status) = failure {
            // All or nothing: remove the clones this request made.
            let ids: Vec<PathBuf> = snapshots
                .iter()
                .map(|s| s.snapshot_id.clone().into())
                .collect();
            let _ = self
                .reflink
                .delete(&req.set_id, &ids, &self.backing_files());
            return Err(status);
        }
        if !self.manager.is_frozen(&req.set_id).await {
            // The lease ran out while cloning: the clones may hold later writes.
            let ids: Vec<PathBuf> = snapshots
                .iter()
                .map(|s| s.snapshot_id.clone().into())
                .collect();
            let _ = self
                .reflink
                .delete(&req.set_id, &ids, &self.backing_files());
            return Err(Error::NotFrozen {
                set_id: req.set_id,
                state: "freeze ended while the snapshots were taken".into(),
            }
            .into());
        }
        Ok(Response::new(pb::CreateSnapshotsResponse { snapshots }))
    }

    async fn delete_snapshots(
        &self,
        request: Request<pb::DeleteSnapshotsRequest>,
    ) -> Result<Response<pb::DeleteSnapshotsResponse>, Status> {
        let req = request.into_inner();
        validate_set_id(&req.set_id)?;
        check_paths(
            "snapshot ids in one request",
            &paths(req.snapshot_ids.clone()),
            self.manager.config().max_volumes_per_request,
        )?;
        let reflink = self.reflink.clone();
        let backing_files = self.backing_files();
        let set_id = req.set_id.clone();
        let ids = paths(req.snapshot_ids);
        let report =
            tokio::task::spawn_blocking(move || reflink.delete(&set_id, &ids, &backing_files))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(Error::from)?;
        Ok(Response::new(pb::DeleteSnapshotsResponse {
            deleted: report.deleted,
            removed: report
                .removed
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
            not_removed: report
                .not_removed
                .into_iter()
                .map(|(path, error)| pb::NotRemoved {
                    path: path.display().to_string(),
                    error,
                })
                .collect(),
        }))
    }

    async fn restore_snapshots(
        &self,
        request: Request<pb::RestoreSnapshotsRequest>,
    ) -> Result<Response<pb::RestoreSnapshotsResponse>, Status> {
        let req = request.into_inner();
        validate_set_id(&req.set_id)?;
        if req.snapshots.len() > self.manager.config().max_volumes_per_request {
            return Err(Error::OverLimit {
                what: "snapshots in one request",
                got: req.snapshots.len(),
                max: self.manager.config().max_volumes_per_request,
                limit: "max-volumes-per-request",
            }
            .into());
        }
        check_path_lengths(
            std::iter::once(req.target_dir.len())
                .chain(req.snapshots.iter().map(|s| s.snapshot_id.len()))
                .chain(req.snapshots.iter().map(|s| s.mount_point.len())),
        )?;
        let target_dir = PathBuf::from(&req.target_dir);
        let backing_files = self.backing_files();
        let mut images = Vec::new();
        for snapshot in req.snapshots {
            let reflink = self.reflink.clone();
            let set_id = req.set_id.clone();
            let target_dir = target_dir.clone();
            let backing_files = backing_files.clone();
            let id = PathBuf::from(&snapshot.snapshot_id);
            let guard = self.restore_guard(std::path::Path::new(&snapshot.mount_point));
            let result = tokio::task::spawn_blocking(move || {
                reflink.restore(&set_id, &id, &target_dir, &backing_files, &guard)
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))
            .and_then(|r| r.map_err(Status::from));
            let restored = match result {
                Ok(restored) => restored,
                Err(status) => {
                    // All or nothing on this host: the images this request made go too.
                    for image in &images {
                        let image: &pb::RestoredImage = image;
                        let _ = std::fs::remove_file(&image.image_path);
                    }
                    return Err(status);
                }
            };
            images.push(pb::RestoredImage {
                mount_point: snapshot.mount_point,
                image_path: restored.path.display().to_string(),
                cloned: restored.cloned,
                fs_type: restored.fs_type,
            });
        }
        Ok(Response::new(pb::RestoreSnapshotsResponse { images }))
    }

    async fn verify_snapshots(
        &self,
        request: Request<pb::VerifySnapshotsRequest>,
    ) -> Result<Response<pb::VerifySnapshotsResponse>, Status> {
        let req = request.into_inner();
        validate_set_id(&req.set_id)?;
        let hooks: Vec<String> = req.databases.iter().map(|d| d.hook.clone()).collect();
        crate::freeze::validate_hook_names(&hooks)?;
        if req.snapshots.is_empty() {
            return Err(Status::invalid_argument(
                "a drill needs at least one snapshot of this host",
            ));
        }
        let span = info_span!("verify", set_id = %req.set_id);
        self.verify(req).instrument(span).await.map(Response::new)
    }
}

/// Admits only coordinators named in the agent's config (their mTLS identity). `None` admits
/// everyone: plain text with `--insecure`.
#[derive(Clone)]
pub struct CoordinatorAuth {
    allowed: Option<Arc<Vec<String>>>,
}

impl CoordinatorAuth {
    pub fn new(allowed: Vec<String>) -> Self {
        CoordinatorAuth {
            allowed: Some(Arc::new(allowed)),
        }
    }

    pub fn insecure() -> Self {
        CoordinatorAuth { allowed: None }
    }
}

impl tonic::service::Interceptor for CoordinatorAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(allowed) = &self.allowed else {
            return Ok(request);
        };
        match Identity::of_peer(&request) {
            Some(id) if id.role == Role::Coordinator && allowed.contains(&id.name) => Ok(request),
            Some(id) => Err(Status::permission_denied(format!(
                "{id} is not a coordinator this agent obeys"
            ))),
            None => Err(Status::unauthenticated(
                "no Quiesce identity in the client certificate",
            )),
        }
    }
}
