//! One snapshot set, start to end: plan → prepare → freeze → snapshot → thaw → commit.
//!
//! Every phase is written to the catalog before it is acted on. Whatever fails, every member
//! that was sent a freeze is sent a thaw (idempotent by set id on the agent), partial snapshots
//! are removed, and the set ends `failed` with the member and reason. A set is `consistent` only
//! when every member froze, every snapshot returned, and every agent reports that its freeze
//! held continuously until the thaw that followed the last snapshot.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::join_all;
use quiesce_proto::agent::v1 as agent_pb;
use quiesce_proto::coordinator::v1::{SetHost, SetVolume, SnapshotSet};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{Instrument, error, info, info_span, warn};

use crate::agent_client::{AgentClient, AgentDirectory};
use crate::catalog::{Catalog, NewSet};
use crate::config::{Config, GroupConfig};
use crate::error::{Error, agent_error};
use crate::provider::{self, PlannedVolume, Snapshot, SnapshotCall, SnapshotProvider};

pub struct Coordinator {
    config: Arc<Config>,
    catalog: Arc<Catalog>,
    agents: Arc<dyn AgentDirectory>,
    runs: Mutex<HashMap<String, JoinHandle<()>>>,
    /// Per group; built from the config, replaceable in tests.
    providers: Mutex<HashMap<String, Arc<dyn SnapshotProvider>>>,
}

/// One member host of a running set.
struct Member {
    agent: String,
    client: Arc<dyn AgentClient>,
    mounts: Vec<String>,
    /// Filled at plan time from the agent's host info, in `mounts` order.
    planned: Vec<PlannedVolume>,
    host: SetHost,
    freeze_sent: bool,
    snapshots: Vec<Snapshot>,
    /// A snapshot call was sent and did not answer cleanly: it may have left something behind.
    snapshot_unsure: bool,
}

struct Run<'a> {
    set_id: String,
    group: &'a GroupConfig,
    provider: Arc<dyn SnapshotProvider>,
    catalog: &'a Catalog,
    members: Vec<Member>,
    first_freeze_sent: Option<Instant>,
}

impl Coordinator {
    pub fn new(
        config: Arc<Config>,
        catalog: Arc<Catalog>,
        agents: Arc<dyn AgentDirectory>,
    ) -> Arc<Self> {
        let providers = config
            .groups
            .iter()
            .map(|g| (g.name.clone(), provider::for_group(g)))
            .collect();
        Arc::new(Coordinator {
            config,
            catalog,
            agents,
            runs: Mutex::new(HashMap::new()),
            providers: Mutex::new(providers),
        })
    }

    /// The provider of a group.
    pub fn provider(&self, group: &GroupConfig) -> Arc<dyn SnapshotProvider> {
        self.providers
            .lock()
            .unwrap()
            .entry(group.name.clone())
            .or_insert_with(|| provider::for_group(group))
            .clone()
    }

    /// Replaces a group's provider (tests: an EBS provider over a fake or an emulator).
    pub fn set_provider(&self, group: &str, provider: Arc<dyn SnapshotProvider>) {
        self.providers
            .lock()
            .unwrap()
            .insert(group.to_owned(), provider);
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn agents(&self) -> &dyn AgentDirectory {
        self.agents.as_ref()
    }

    pub fn group(&self, name: &str) -> Result<&GroupConfig, Error> {
        self.config.group(name).ok_or_else(|| Error::UnknownGroup {
            group: name.to_owned(),
            known: self
                .config
                .groups
                .iter()
                .map(|g| g.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    pub fn client(&self, agent: &str) -> Result<Arc<dyn AgentClient>, Error> {
        self.agents
            .client(agent)
            .ok_or_else(|| Error::UnknownAgent {
                agent: agent.to_owned(),
            })
    }

    /// Records a new set of `group` and starts running it in the background.
    pub fn start_set(self: &Arc<Self>, group: &str) -> Result<String, Error> {
        let group_config = self.group(group)?;
        let set_id = new_set_id(group);
        let volumes = group_config
            .members
            .iter()
            .flat_map(|m| {
                m.mounts
                    .iter()
                    .map(|mount| (m.agent.clone(), mount.display().to_string()))
            })
            .collect();
        self.catalog.create_set(&NewSet {
            id: &set_id,
            group,
            provider: group_config.provider.as_str(),
            created_at_ms: unix_ms(),
            volumes,
        })?;
        let coordinator = self.clone();
        let id = set_id.clone();
        let group = group.to_owned();
        let span = info_span!("set", set_id = %set_id, group = %group);
        let handle = tokio::spawn(
            async move {
                coordinator.run(&id, &group).await;
                coordinator.runs.lock().unwrap().remove(&id);
                coordinator.spawn_completion_tracking(&id);
            }
            .instrument(span),
        );
        self.runs.lock().unwrap().insert(set_id.clone(), handle);
        Ok(set_id)
    }

    /// Waits until a set started by this process has ended.
    pub async fn wait(&self, set_id: &str) {
        let handle = self.runs.lock().unwrap().remove(set_id);
        if let Some(handle) = handle {
            let _ = handle.await;
        }
    }

    /// Starts a set and waits for its end (tests, benchmarks).
    pub async fn backup(self: &Arc<Self>, group: &str) -> Result<SnapshotSet, Error> {
        let id = self.start_set(group)?;
        self.wait(&id).await;
        self.catalog.get(&id)?.ok_or(Error::UnknownSet { id })
    }

    async fn run(&self, set_id: &str, group: &str) {
        let Ok(group) = self.group(group) else {
            return;
        };
        let mut members = Vec::new();
        for member in &group.members {
            let Some(client) = self.agents.client(&member.agent) else {
                continue;
            };
            members.push(Member {
                agent: member.agent.clone(),
                client,
                mounts: member
                    .mounts
                    .iter()
                    .map(|m| m.display().to_string())
                    .collect(),
                planned: Vec::new(),
                host: SetHost {
                    agent: member.agent.clone(),
                    state: "pending".into(),
                    ..Default::default()
                },
                freeze_sent: false,
                snapshots: Vec::new(),
                snapshot_unsure: false,
            });
        }
        let mut run = Run {
            set_id: set_id.to_owned(),
            group,
            provider: self.provider(group),
            catalog: &self.catalog,
            members,
            first_freeze_sent: None,
        };
        if let Err(e) = run.execute().await {
            error!(error = %e, "catalog write failed; the set is left running for recovery");
        }
    }

    /// After a restart: every set still marked running was interrupted. Thaw its members,
    /// remove its snapshots, mark it failed.
    pub async fn recover(&self) -> Result<Vec<String>, Error> {
        let mut recovered = Vec::new();
        for set in self.catalog.running()? {
            let span = info_span!("recover", set_id = %set.id);
            async {
                let mut problems = Vec::new();
                let mut agents: Vec<&str> = set.hosts.iter().map(|h| h.agent.as_str()).collect();
                agents.dedup();
                for agent in &agents {
                    let Some(client) = self.agents.client(agent) else {
                        problems.push(format!("{agent}: no longer configured"));
                        continue;
                    };
                    if let Err(status) = client
                        .thaw_volumes(agent_pb::ThawVolumesRequest {
                            set_id: set.id.clone(),
                        })
                        .await
                    {
                        problems.push(format!("thaw {}", agent_error(agent, &status)));
                    }
                }
                let provider = self.config.group(&set.group).map(|g| self.provider(g));
                if let Some(provider) = provider {
                    for agent in &agents {
                        if let Some(client) = self.agents.client(agent) {
                            // No ids: everything the provider made for this set on this agent.
                            if let Err(e) =
                                provider.delete(&set.id, agent, client.as_ref(), &[]).await
                            {
                                problems.push(format!("removing partial snapshots: {e}"));
                            }
                        }
                    }
                }
                let mut reason = format!(
                    "the coordinator stopped while the set was {}; members thawed and partial snapshots removed",
                    set.phase
                );
                if !problems.is_empty() {
                    reason = format!("{reason}; but: {}", problems.join("; "));
                }
                warn!(%reason, "recovered an interrupted set");
                let now = unix_ms();
                self.catalog.set_phase(&set.id, "aborted", now)?;
                self.catalog.finish(&set.id, "failed", &reason, 0, 0, now)?;
                recovered.push(set.id.clone());
                Ok::<_, Error>(())
            }
            .instrument(span)
            .await?;
        }
        Ok(recovered)
    }
}

impl Run<'_> {
    fn timeout(&self) -> Duration {
        self.group.phase_timeout
    }

    fn phase(&self, phase: &str) -> Result<(), Error> {
        info!(phase, "phase");
        Ok(self.catalog.set_phase(&self.set_id, phase, unix_ms())?)
    }

    fn save_host(&self, index: usize) -> Result<(), Error> {
        Ok(self
            .catalog
            .update_host(&self.set_id, &self.members[index].host)?)
    }

    /// Runs the set to its end. `Err` only when the catalog cannot be written.
    async fn execute(&mut self) -> Result<(), Error> {
        let outcome = self.capture().await?;
        let thaw_failure = if self.first_freeze_sent.is_some() {
            self.phase("thawing")?;
            self.thaw().await?
        } else {
            None
        };
        let freeze_window_ms = self
            .first_freeze_sent
            .map(|sent| sent.elapsed().as_millis() as u64)
            .unwrap_or(0);
        let max_stall = self
            .members
            .iter()
            .map(|m| m.host.write_stall_ms)
            .max()
            .unwrap_or(0);
        let failure = outcome.err().or(thaw_failure);
        match failure {
            None => {
                self.phase("committed")?;
                if self.provider.completion_poll().is_some() {
                    self.catalog.set_completion(&self.set_id, "pending")?;
                }
                self.catalog.finish(
                    &self.set_id,
                    "consistent",
                    "",
                    freeze_window_ms,
                    max_stall,
                    unix_ms(),
                )?;
                info!(freeze_window_ms, max_stall, "consistent");
            }
            Some(reason) => {
                self.phase("aborting")?;
                let cleanup = self.remove_snapshots().await;
                let reason = match cleanup {
                    Ok(()) => reason,
                    Err(e) => format!("{reason}; partial snapshots not all removed: {e}"),
                };
                self.phase("aborted")?;
                self.catalog.finish(
                    &self.set_id,
                    "failed",
                    &reason,
                    freeze_window_ms,
                    max_stall,
                    unix_ms(),
                )?;
                warn!(%reason, freeze_window_ms, "failed");
            }
        }
        Ok(())
    }

    /// Plan, prepare, freeze, snapshot. The inner `Err(reason)` is a failed set.
    async fn capture(&mut self) -> Result<Result<(), String>, Error> {
        if let Err(reason) = self.plan().await? {
            return Ok(Err(reason));
        }
        self.phase("preparing")?;
        if let Err(reason) = self.prepare().await? {
            return Ok(Err(reason));
        }
        self.phase("freezing")?;
        if let Err(reason) = self.freeze().await? {
            return Ok(Err(reason));
        }
        self.phase("snapshotting")?;
        self.snapshot().await
    }

    /// Every member reachable, every mount allowed, resolved and fit for the provider.
    async fn plan(&mut self) -> Result<Result<(), String>, Error> {
        let timeout = self.timeout();
        let replies = fan_out(&self.members, timeout, |m| {
            let client = m.client.clone();
            async move { client.get_host_info().await }
        })
        .await;
        let mut problems = Vec::new();
        let mut planned_all = Vec::new();
        for (member, reply) in self.members.iter_mut().zip(replies) {
            let info = match reply {
                Ok(info) => info,
                Err(e) => {
                    problems.push(format!("{}: unreachable at plan time: {e}", member.agent));
                    continue;
                }
            };
            for mount in &member.mounts {
                let Some(volume) = info.volumes.iter().find(|v| &v.mount_point == mount) else {
                    problems.push(format!(
                        "{}:{mount} is not an allowed volume of that agent",
                        member.agent
                    ));
                    continue;
                };
                if !volume.problem.is_empty() {
                    problems.push(format!("{}: {}", member.agent, volume.problem));
                    continue;
                }
                if !volume.frozen_by.is_empty() {
                    problems.push(format!(
                        "{}:{mount} is busy: set {} holds it frozen",
                        member.agent, volume.frozen_by
                    ));
                    continue;
                }
                if let Err(why) = self.provider.check_volume(&member.agent, volume) {
                    problems.push(why);
                    continue;
                }
                let planned = PlannedVolume {
                    mount_point: mount.clone(),
                    device: volume.device.clone(),
                    ebs_volume_id: volume.ebs_volume_id.clone(),
                    instance_id: info.instance_id.clone(),
                };
                member.planned.push(planned.clone());
                planned_all.push((member.agent.clone(), planned));
                self.catalog.update_volume(
                    &self.set_id,
                    &SetVolume {
                        agent: member.agent.clone(),
                        mount_point: mount.clone(),
                        device: volume.device.clone(),
                        fs_type: volume.fs_type.clone(),
                        backing_file: volume.backing_file.clone(),
                        ebs_volume_id: volume.ebs_volume_id.clone(),
                        instance_id: info.instance_id.clone(),
                        ..Default::default()
                    },
                )?;
            }
        }
        if problems.is_empty()
            && let Err(why) = self.provider.preflight(&self.set_id, &planned_all).await
        {
            problems.push(why);
        }
        Ok(if problems.is_empty() {
            Ok(())
        } else {
            Err(format!("plan: {}", problems.join("; ")))
        })
    }

    async fn prepare(&mut self) -> Result<Result<(), String>, Error> {
        let set_id = self.set_id.clone();
        let replies = fan_out(&self.members, self.timeout(), |m| {
            let client = m.client.clone();
            let req = agent_pb::PrepareVolumesRequest {
                set_id: set_id.clone(),
                mount_points: m.mounts.clone(),
            };
            async move { client.prepare_volumes(req).await }
        })
        .await;
        let mut problems = Vec::new();
        for (index, reply) in replies.iter().enumerate() {
            match reply {
                Ok(_) => self.members[index].host.state = "prepared".into(),
                Err(e) => {
                    let member = &mut self.members[index];
                    member.host.state = "failed".into();
                    member.host.error = format!("prepare: {e}");
                    problems.push(format!("{}: prepare failed: {e}", member.agent));
                }
            }
            self.save_host(index)?;
        }
        Ok(if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        })
    }

    async fn freeze(&mut self) -> Result<Result<(), String>, Error> {
        let set_id = self.set_id.clone();
        let lease_ms = self.group.lease.as_millis() as u64;
        for member in &mut self.members {
            member.freeze_sent = true;
        }
        self.first_freeze_sent = Some(Instant::now());
        let replies = fan_out(&self.members, self.timeout(), |m| {
            let client = m.client.clone();
            let req = agent_pb::FreezeVolumesRequest {
                set_id: set_id.clone(),
                mount_points: m.mounts.clone(),
                lease_ms,
            };
            async move { client.freeze_volumes(req).await }
        })
        .await;
        let mut problems = Vec::new();
        for (index, reply) in replies.into_iter().enumerate() {
            let member = &mut self.members[index];
            match reply {
                Ok(frozen) => {
                    member.host.state = "frozen".into();
                    member.host.freeze_started_at_ms = frozen.freeze_started_at_ms;
                    member.host.frozen_at_ms = frozen.frozen_at_ms;
                }
                Err(e) => {
                    member.host.state = "failed".into();
                    member.host.error = format!("freeze: {e}");
                    problems.push(format!("{}: freeze failed: {e}", member.agent));
                }
            }
            self.save_host(index)?;
        }
        Ok(if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        })
    }

    /// Snapshots every member while all are frozen, renewing their leases meanwhile.
    async fn snapshot(&mut self) -> Result<Result<(), String>, Error> {
        let renewer = self.spawn_renewer();
        let set_id = self.set_id.clone();
        let timeout = self.timeout();
        let provider = &self.provider;
        let group = self.group.name.as_str();
        let calls = self.members.iter().map(|m| {
            let set_id = set_id.clone();
            async move {
                let call = SnapshotCall {
                    set_id: &set_id,
                    group,
                    attempt: 1,
                    agent: &m.agent,
                    client: m.client.as_ref(),
                    volumes: &m.planned,
                };
                match tokio::time::timeout(timeout, provider.snapshot(&call)).await {
                    Ok(result) => result,
                    Err(_) => Err(format!(
                        "{}: snapshot did not return within {}",
                        m.agent,
                        humantime::format_duration(timeout)
                    )),
                }
            }
        });
        let started = Instant::now();
        let replies = join_all(calls).await;
        self.catalog
            .set_snapshot_calls_ms(&self.set_id, started.elapsed().as_millis() as u64)?;
        renewer.abort();
        let mut problems = Vec::new();
        for (index, reply) in replies.into_iter().enumerate() {
            match reply {
                Ok(snapshots) => {
                    let agent = self.members[index].agent.clone();
                    for snapshot in &snapshots {
                        self.catalog.update_volume_snapshot(
                            &self.set_id,
                            &agent,
                            &snapshot.mount_point,
                            &snapshot.snapshot_id,
                            snapshot.size_bytes,
                        )?;
                        if !snapshot.state.is_empty() {
                            self.catalog.update_volume_progress(
                                &self.set_id,
                                &agent,
                                &snapshot.mount_point,
                                &snapshot.state,
                                0,
                            )?;
                        }
                    }
                    self.members[index].snapshots = snapshots;
                }
                Err(reason) => {
                    self.members[index].snapshot_unsure = true;
                    problems.push(format!("snapshot failed: {reason}"));
                }
            }
        }
        Ok(if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        })
    }

    /// Renews every member's lease at a third of its length until aborted.
    fn spawn_renewer(&self) -> JoinHandle<()> {
        let lease = self.group.lease;
        let set_id = self.set_id.clone();
        let clients: Vec<(String, Arc<dyn AgentClient>)> = self
            .members
            .iter()
            .map(|m| (m.agent.clone(), m.client.clone()))
            .collect();
        tokio::spawn(
            async move {
                let mut tick = tokio::time::interval(lease / 3);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    for (agent, client) in &clients {
                        let req = agent_pb::RenewLeaseRequest {
                            set_id: set_id.clone(),
                            lease_ms: lease.as_millis() as u64,
                        };
                        if let Err(status) = client.renew_lease(req).await {
                            warn!(error = %agent_error(agent, &status), "lease renewal failed");
                        }
                    }
                }
            }
            .in_current_span(),
        )
    }

    /// Thaws every member that was sent a freeze, retrying within the phase deadline, and
    /// checks that each freeze held. `Some(reason)` when the set cannot be consistent.
    async fn thaw(&mut self) -> Result<Option<String>, Error> {
        let set_id = self.set_id.clone();
        let timeout = self.timeout();
        let calls = self.members.iter().filter(|m| m.freeze_sent).map(|m| {
            let client = m.client.clone();
            let set_id = set_id.clone();
            async move {
                let deadline = Instant::now() + timeout;
                let mut last = String::new();
                for attempt in 0..3u32 {
                    let req = agent_pb::ThawVolumesRequest {
                        set_id: set_id.clone(),
                    };
                    match tokio::time::timeout_at(deadline, client.thaw_volumes(req)).await {
                        Ok(Ok(reply)) => return Ok(reply),
                        Ok(Err(status)) => last = agent_error(&m.agent, &status),
                        Err(_) => {
                            last = format!("{}: thaw timed out", m.agent);
                            break;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt + 1))).await;
                }
                Err(last)
            }
        });
        let replies = join_all(calls).await;
        let mut problems = Vec::new();
        let indices: Vec<usize> = (0..self.members.len())
            .filter(|i| self.members[*i].freeze_sent)
            .collect();
        for (index, reply) in indices.into_iter().zip(replies) {
            let member = &mut self.members[index];
            match reply {
                Ok(thawed) => {
                    let end = freeze_end_name(thawed.end());
                    member.host.thawed_at_ms = thawed.thawed_at_ms;
                    member.host.held_continuously = thawed.held_continuously;
                    member.host.freeze_end = end.into();
                    member.host.write_stall_ms = thawed.write_stall_ms;
                    if member.host.state == "frozen" {
                        member.host.state = "thawed".into();
                        if !thawed.held_continuously {
                            member.host.error = format!("freeze ended early: {end}");
                            problems.push(format!(
                                "{}: freeze did not hold until the thaw (ended by {end})",
                                member.agent
                            ));
                        }
                    }
                }
                Err(reason) => {
                    member.host.error = format!("thaw not confirmed: {reason}");
                    if member.host.state == "frozen" {
                        member.host.state = "failed".into();
                        problems.push(format!(
                            "{}: thaw not confirmed (its lease thaws it): {reason}",
                            member.agent
                        ));
                    }
                }
            }
            self.save_host(index)?;
        }
        Ok((!problems.is_empty()).then(|| problems.join("; ")))
    }

    /// Removes every snapshot of a failed set.
    async fn remove_snapshots(&mut self) -> Result<(), String> {
        let mut problems = Vec::new();
        for member in &self.members {
            if member.snapshots.is_empty() && !member.snapshot_unsure {
                continue;
            }
            // An unsure member may hold snapshots we never heard of: ask for all of the set's.
            let ids: Vec<String> = if member.snapshot_unsure {
                Vec::new()
            } else {
                member
                    .snapshots
                    .iter()
                    .map(|s| s.snapshot_id.clone())
                    .collect()
            };
            if let Err(e) = self
                .provider
                .delete(&self.set_id, &member.agent, member.client.as_ref(), &ids)
                .await
            {
                problems.push(e);
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

/// Calls every member at once, each bounded by `timeout`; errors become one line.
async fn fan_out<T, F, Fut>(
    members: &[Member],
    timeout: Duration,
    call: F,
) -> Vec<Result<T, String>>
where
    F: Fn(&Member) -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let calls = members.iter().map(|m| {
        let fut = call(m);
        async move {
            match tokio::time::timeout(timeout, fut).await {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(status)) => Err(status_line(&status)),
                Err(_) => Err(format!(
                    "no answer within {}",
                    humantime::format_duration(timeout)
                )),
            }
        }
    });
    join_all(calls).await
}

fn status_line(status: &tonic::Status) -> String {
    if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        status.message().to_owned()
    }
}

pub fn freeze_end_name(end: agent_pb::FreezeEnd) -> &'static str {
    match end {
        agent_pb::FreezeEnd::Unspecified => "unspecified",
        agent_pb::FreezeEnd::Thawed => "thawed",
        agent_pb::FreezeEnd::LeaseExpired => "lease-expired",
        agent_pb::FreezeEnd::MaxFreeze => "max-freeze",
        agent_pb::FreezeEnd::Shutdown => "shutdown",
        agent_pb::FreezeEnd::ExternalThaw => "external-thaw",
        agent_pb::FreezeEnd::UnknownSet => "unknown-set",
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `pg-20261125T131200Z-3fa9`: group, UTC time, and 16 random bits. Sorts by time per group.
pub fn new_set_id(group: &str) -> String {
    let stamp = humantime::format_rfc3339_seconds(SystemTime::now())
        .to_string()
        .replace(['-', ':'], "");
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let noise = (nanos ^ std::process::id().rotate_left(16)) & 0xffff;
    format!("{group}-{stamp}-{noise:04x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_agent::{FakeAgent, Phase};
    use tonic::Status;

    const CONFIG: &str = r#"
listen = "127.0.0.1:1"
catalog = ":memory:"
[[agent]]
name = "db1"
endpoint = "https://127.0.0.1:2"
[[agent]]
name = "db2"
endpoint = "https://127.0.0.1:3"
[[group]]
name = "g"
provider = "reflink"
lease = "3s"
phase-timeout = "1s"
[[group.member]]
agent = "db1"
mounts = ["/data", "/wal"]
[[group.member]]
agent = "db2"
mounts = ["/data"]
"#;

    fn setup() -> (Arc<Coordinator>, FakeAgent, FakeAgent) {
        let db1 = FakeAgent::new("db1", &["/data", "/wal"]);
        let db2 = FakeAgent::new("db2", &["/data"]);
        let mut agents: HashMap<String, Arc<dyn AgentClient>> = HashMap::new();
        agents.insert("db1".into(), Arc::new(db1.clone()));
        agents.insert("db2".into(), Arc::new(db2.clone()));
        let coordinator = Coordinator::new(
            Arc::new(Config::parse(CONFIG).unwrap()),
            Arc::new(Catalog::in_memory().unwrap()),
            Arc::new(agents),
        );
        (coordinator, db1, db2)
    }

    fn phases(set: &SnapshotSet) -> Vec<&str> {
        set.phases.iter().map(|p| p.phase.as_str()).collect()
    }

    #[tokio::test]
    async fn a_clean_run_is_consistent_with_every_snapshot_recorded() {
        let (coordinator, db1, db2) = setup();
        let set = coordinator.backup("g").await.unwrap();
        assert_eq!(set.state, "consistent", "{}", set.error);
        assert_eq!(
            phases(&set),
            [
                "planned",
                "preparing",
                "freezing",
                "snapshotting",
                "thawing",
                "committed"
            ]
        );
        assert!(set.volumes.iter().all(|v| !v.snapshot_id.is_empty()));
        assert!(
            set.hosts
                .iter()
                .all(|h| h.held_continuously && h.state == "thawed")
        );
        assert!(!db1.is_frozen() && !db2.is_frozen());
        assert_eq!(db1.live_snapshots().len(), 2);
        assert_eq!(db2.live_snapshots().len(), 1);
    }

    #[tokio::test]
    async fn one_member_failing_to_freeze_thaws_everyone_and_snapshots_nothing() {
        let (coordinator, db1, db2) = setup();
        db2.fail(
            Phase::Freeze,
            Status::aborted("/data is busy: set x holds it frozen"),
        );
        let set = coordinator.backup("g").await.unwrap();
        assert_eq!(set.state, "failed");
        assert!(
            set.error.contains("db2: freeze failed: /data is busy"),
            "{}",
            set.error
        );
        assert!(!db1.is_frozen(), "the member that froze was thawed");
        assert!(db1.calls().contains(&Phase::Thaw));
        assert!(!db1.calls().contains(&Phase::Snapshot));
        assert_eq!(phases(&set).last(), Some(&"aborted"));
    }

    #[tokio::test]
    async fn a_failed_snapshot_removes_the_partial_set() {
        let (coordinator, db1, db2) = setup();
        db2.fail(Phase::Snapshot, Status::internal("clone failed"));
        let set = coordinator.backup("g").await.unwrap();
        assert_eq!(set.state, "failed");
        assert!(set.error.contains("db2: clone failed"), "{}", set.error);
        assert!(!db1.is_frozen() && !db2.is_frozen());
        assert!(db1.live_snapshots().is_empty(), "db1's snapshots removed");
        assert!(
            db2.calls().contains(&Phase::Delete),
            "unsure member asked to clean up"
        );
    }

    #[tokio::test]
    async fn a_lease_that_ran_out_makes_the_set_failed() {
        let (coordinator, db1, _db2) = setup();
        db1.expire_lease();
        let set = coordinator.backup("g").await.unwrap();
        assert_eq!(set.state, "failed");
        assert!(
            set.error
                .contains("db1: freeze did not hold until the thaw (ended by lease-expired)"),
            "{}",
            set.error
        );
        assert!(db1.live_snapshots().is_empty());
        let host = set.hosts.iter().find(|h| h.agent == "db1").unwrap();
        assert!(!host.held_continuously);
        assert_eq!(host.freeze_end, "lease-expired");
    }

    #[tokio::test]
    async fn an_unreachable_member_fails_the_plan_before_any_freeze() {
        let (coordinator, db1, db2) = setup();
        db2.fail(Phase::HostInfo, Status::unavailable("connection refused"));
        let set = coordinator.backup("g").await.unwrap();
        assert_eq!(set.state, "failed");
        assert!(
            set.error.contains("db2: unreachable at plan time"),
            "{}",
            set.error
        );
        assert!(!db1.calls().contains(&Phase::Freeze));
        assert!(!db1.calls().contains(&Phase::Thaw));
    }

    #[tokio::test]
    async fn a_hung_prepare_fails_at_the_phase_deadline() {
        let (coordinator, _db1, db2) = setup();
        db2.delay(Phase::Prepare, Duration::from_secs(5));
        let set = coordinator.backup("g").await.unwrap();
        assert_eq!(set.state, "failed");
        assert!(
            set.error
                .contains("db2: prepare failed: no answer within 1s"),
            "{}",
            set.error
        );
    }

    #[tokio::test]
    async fn a_second_backup_of_a_running_group_is_refused() {
        let (coordinator, _db1, db2) = setup();
        db2.delay(Phase::Prepare, Duration::from_millis(300));
        let first = coordinator.start_set("g").unwrap();
        let err = coordinator.start_set("g").unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("already has a running set ({first})")),
            "{err}"
        );
        coordinator.wait(&first).await;
        let unknown = coordinator.start_set("nope").unwrap_err();
        assert!(
            unknown
                .to_string()
                .contains("unknown group nope (configured: g)")
        );
    }

    #[tokio::test]
    async fn recovery_thaws_and_fails_sets_left_running() {
        let (coordinator, db1, db2) = setup();
        coordinator
            .catalog()
            .create_set(&NewSet {
                id: "g-crashed",
                group: "g",
                provider: "reflink",
                created_at_ms: 1,
                volumes: vec![
                    ("db1".into(), "/data".into()),
                    ("db2".into(), "/data".into()),
                ],
            })
            .unwrap();
        coordinator
            .catalog()
            .set_phase("g-crashed", "snapshotting", 2)
            .unwrap();
        let recovered = coordinator.recover().await.unwrap();
        assert_eq!(recovered, ["g-crashed"]);
        let set = coordinator.catalog().get("g-crashed").unwrap().unwrap();
        assert_eq!(set.state, "failed");
        assert!(
            set.error.contains("stopped while the set was snapshotting"),
            "{}",
            set.error
        );
        assert!(db1.calls().contains(&Phase::Thaw) && db2.calls().contains(&Phase::Thaw));
        assert!(db1.calls().contains(&Phase::Delete));
    }

    #[test]
    fn set_ids_start_with_the_group_and_are_safe_file_names() {
        let id = new_set_id("pg");
        assert!(id.starts_with("pg-20"), "{id}");
        assert!(
            id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "{id}"
        );
    }
}
