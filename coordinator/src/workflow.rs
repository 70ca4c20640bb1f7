//! One snapshot set, start to end: plan → prepare → freeze → snapshot → thaw → commit.
//!
//! Every phase is written to the catalog before it is acted on. Whatever fails, every member
//! that was sent a freeze is sent a thaw (idempotent by set id on the agent), partial snapshots
//! are removed, and the set ends `failed` with the member and reason. A set is `consistent` only
//! when the verdict (see [`verdict`]) computed from the recorded instants and every agent's thaw
//! report says so: every member froze before the first snapshot call started, and every
//! member's freeze held until after the last snapshot call returned.
//!
//! The freeze budget of the group bounds first freeze sent → last thaw sent: the freeze and
//! snapshot phases get only what is left of it.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::join_all;
use quiesce_proto::agent::v1 as agent_pb;
use quiesce_proto::coordinator::v1::{
    Completion, HookValue, HostState, SetHookOutput, SetHost, SetPhase, SetState, SetVolume,
    SnapshotSet, ThawEvidence,
};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{Instrument, error, info, info_span, warn};

use crate::agent_client::{AgentClient, AgentDirectory};
use crate::catalog::{Catalog, NewSet};
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, GroupConfig};
use crate::error::{Error, agent_error, status_line};
use crate::metrics::Metrics;
use crate::provider::{self, PlannedVolume, Snapshot, SnapshotCall, SnapshotProvider};
use crate::test_hook::pause_after;
use crate::windows::{FreezeWindows, Window};
use quiesce_proto::states::StateText;

pub struct Coordinator {
    config: Arc<Config>,
    catalog: Arc<Catalog>,
    agents: Arc<dyn AgentDirectory>,
    runs: Mutex<HashMap<String, JoinHandle<()>>>,
    metrics: Arc<Metrics>,
    /// Set ids, creation and phase times, schedules and retention (tests drive it). The
    /// verdict's instants are always read from the system clock.
    clock: Arc<dyn Clock>,
    pub(crate) schedules: Mutex<HashMap<String, crate::scheduler::GroupSchedule>>,
    /// `[group.verify]` schedules, per group.
    pub(crate) drills: Mutex<HashMap<String, crate::scheduler::DrillSchedule>>,
    /// Per group; built from the config, replaceable in tests.
    providers: Mutex<HashMap<String, Arc<dyn SnapshotProvider>>>,
    /// (set, agent) removals an attempt is working on (see `reconcile`).
    removals_in_flight: Mutex<HashSet<(String, String)>>,
    audit: Arc<crate::audit::AuditLog>,
    /// The freeze windows open now: catalog writers wait for them to close.
    windows: Arc<FreezeWindows>,
    lock_reported: Mutex<HashSet<String>>,
}

/// What the coordinator adds to a member's lease before it counts the member as thawed by
/// it: the agent's lease timer runs on the agent's own thread, and a grant reaches the agent
/// after the coordinator sent it; a grant delayed longer than this in the network could push
/// the member's thaw later, up to its agent's max-freeze (see docs/consistency.md).
pub const LEASE_MARGIN: Duration = Duration::from_secs(1);

/// Every member gets at least this long to answer its thaw.
const MIN_THAW_WAIT: Duration = Duration::from_millis(500);

/// One member host of a running set.
struct Member {
    agent: String,
    client: Arc<dyn AgentClient>,
    mounts: Vec<String>,
    /// Hook names from the group config; the agent holds their definitions.
    hooks: Vec<String>,
    /// Filled at plan time from the agent's host info, in `mounts` order.
    planned: Vec<PlannedVolume>,
    host: SetHost,
    freeze_sent: bool,
    snapshots: Vec<Snapshot>,
    /// A snapshot call was sent and did not answer cleanly: it may have left something behind.
    snapshot_unsure: bool,
    /// The last lease grant sent (its freeze, or a renewal).
    lease_sent: Option<Instant>,
}

struct Run<'a> {
    set_id: String,
    /// The set's `lock-for` end, 0 when not locked.
    locked_until_ms: u64,
    group: &'a GroupConfig,
    provider: Arc<dyn SnapshotProvider>,
    catalog: Arc<Catalog>,
    members: Vec<Member>,
    first_freeze_sent: Option<Instant>,
    /// The last member's FITHAW returned (its thaw reply's arrival less the agent's work after
    /// that FITHAW, the hooks' resume), or the coordinator gave up on it: the cut window's end.
    last_thaw_returned: Option<Instant>,
    /// Coordinator clock, ms: first snapshot call sent, last snapshot call returned.
    first_snapshot_started_at_ms: u64,
    last_snapshot_returned_at_ms: u64,
    metrics: &'a Metrics,
    clock: &'a dyn Clock,
    phase_started: Instant,
    current_phase: SetPhase,
    /// From the first freeze sent until every thaw returned: nothing is written to the
    /// catalog meanwhile (no fsync while the group is frozen). The `freezing` phase, written
    /// before the first freeze, is the intent record recovery needs: the set, its member
    /// hosts (saved after prepare) and volumes (saved at plan time); recovery thaws every
    /// member and removes everything of the set whatever happened after it.
    window_open: bool,
    /// The group's freeze window, open from the first freeze sent to the last thaw returned
    /// (dropped on every path): every catalog and audit writer waits for it to close.
    window: Option<Window>,
    windows: &'a Arc<FreezeWindows>,
    /// Phases entered while the window was open, (phase, at ms), written after the thaw.
    deferred_phases: Vec<(SetPhase, u64)>,
    /// Snapshots made, (agent, mount point, snapshot id, size), written after the thaw.
    made: Vec<(String, String, String, u64)>,
}

impl Coordinator {
    pub fn new(
        config: Arc<Config>,
        catalog: Arc<Catalog>,
        agents: Arc<dyn AgentDirectory>,
    ) -> Arc<Self> {
        Self::with_clock(config, catalog, agents, Arc::new(SystemClock))
    }

    pub fn with_clock(
        config: Arc<Config>,
        catalog: Arc<Catalog>,
        agents: Arc<dyn AgentDirectory>,
        clock: Arc<dyn Clock>,
    ) -> Arc<Self> {
        let providers = config
            .groups
            .iter()
            .map(|g| (g.name.clone(), provider::for_group(g)))
            .collect();
        let metrics = Arc::new(Metrics::new(&config));
        let windows = FreezeWindows::new();
        let audit = crate::audit::AuditLog::start(catalog.clone(), &config.audit, windows.clone());
        let agents: Arc<dyn AgentDirectory> = Arc::new(crate::agent_audit::AuditedAgents::new(
            agents,
            audit.clone(),
            clock.clone(),
        ));
        Arc::new(Coordinator {
            audit,
            windows,
            config,
            catalog,
            agents,
            runs: Mutex::new(HashMap::new()),
            providers: Mutex::new(providers),
            metrics,
            clock,
            schedules: Mutex::new(HashMap::new()),
            drills: Mutex::new(HashMap::new()),
            removals_in_flight: Mutex::new(HashSet::new()),
            lock_reported: Mutex::new(HashSet::new()),
        })
    }

    pub(crate) fn removals_in_flight(&self) -> &Mutex<HashSet<(String, String)>> {
        &self.removals_in_flight
    }

    pub fn audit(&self) -> &crate::audit::AuditLog {
        &self.audit
    }

    pub fn audit_log(&self) -> Arc<crate::audit::AuditLog> {
        self.audit.clone()
    }

    /// The freeze windows open now (see [`crate::windows`]).
    pub fn windows(&self) -> &Arc<FreezeWindows> {
        &self.windows
    }

    /// Locked sets retention already said it keeps (said once per set and process).
    pub(crate) fn lock_reported(&self) -> &Mutex<HashSet<String>> {
        &self.lock_reported
    }

    pub fn clock(&self) -> &dyn Clock {
        self.clock.as_ref()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
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
        self.start_set_with(group, "manual")
    }

    /// As [`start_set`](Self::start_set), saying what started it (`manual`, `schedule`).
    pub fn start_set_with(self: &Arc<Self>, group: &str, trigger: &str) -> Result<String, Error> {
        let group_config = self.group(group)?;
        let created_at_ms = self.clock.now_ms();
        let set_id = new_set_id_at(group, created_at_ms);
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
            created_at_ms,
            volumes,
            trigger,
            freeze_budget_ms: group_config.freeze_budget.as_millis() as u64,
        })?;
        if let Some(lock_for) = group_config.lock_for {
            // Recorded now, applied once the set is consistent (see `locked_until`).
            self.catalog
                .lock(&set_id, created_at_ms + lock_for.as_millis() as u64)?;
        }
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

    /// Waits for every running set to end, up to `grace` (graceful shutdown). A set still
    /// running after that is left to the next start's recovery.
    pub async fn drain(&self, grace: Duration) -> usize {
        let handles: Vec<_> = self.runs.lock().unwrap().drain().map(|(_, h)| h).collect();
        let count = handles.len();
        let _ = tokio::time::timeout(grace, join_all(handles)).await;
        count
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
                hooks: member.hooks.clone(),
                planned: Vec::new(),
                host: SetHost {
                    agent: member.agent.clone(),
                    state: HostState::Pending as i32,
                    ..Default::default()
                },
                freeze_sent: false,
                snapshots: Vec::new(),
                snapshot_unsure: false,
                lease_sent: None,
            });
        }
        // Read before anything is frozen (the EBS provider tags the lock).
        let locked_until_ms = match self.catalog.get(set_id) {
            Ok(set) => set.map_or(0, |s| s.locked_until_ms),
            Err(e) => {
                warn!(error = %e, "cannot read the set's lock; its snapshots are not tagged with it");
                0
            }
        };
        let mut run = Run {
            locked_until_ms,
            set_id: set_id.to_owned(),
            group,
            provider: self.provider(group),
            catalog: self.catalog.clone(),
            members,
            first_freeze_sent: None,
            last_thaw_returned: None,
            first_snapshot_started_at_ms: 0,
            last_snapshot_returned_at_ms: 0,
            metrics: &self.metrics,
            clock: self.clock.as_ref(),
            phase_started: Instant::now(),
            current_phase: SetPhase::Planned,
            window_open: false,
            window: None,
            windows: &self.windows,
            deferred_phases: Vec::new(),
            made: Vec::new(),
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
                let mut agents: Vec<&str> = set.hosts.iter().map(|h| h.agent.as_str()).collect();
                agents.sort_unstable();
                agents.dedup();
                // Unsure what the interrupted set did on each member: thaw it and remove
                // everything of the set there. What does not answer now is left to the
                // reconciler, which retries until it does.
                let now = self.clock.now_ms();
                for agent in &agents {
                    self.catalog
                        .add_pending_removal(&set.id, agent, &[], true, now)?;
                }
                let pendings = self.catalog.pending_removals(&set.id)?;
                let problems: Vec<String> = self
                    .attempt_removals(&pendings)
                    .await
                    .into_iter()
                    .filter(|r| !r.error.is_empty())
                    .map(|r| r.error)
                    .collect();
                let mut reason = format!(
                    "the coordinator stopped while the set was {}; members thawed and partial snapshots removed",
                    set.phase()
                );
                if !problems.is_empty() {
                    reason = format!(
                        "{reason}; but: {}; the reconciler retries until the agent answers",
                        problems.join("; ")
                    );
                }
                warn!(%reason, "recovered an interrupted set");
                let now = self.clock.now_ms();
                self.catalog
                    .set_verdict(&set.id, &format!("not consistent: {reason}"))?;
                self.catalog.set_phase(&set.id, SetPhase::Aborted, now)?;
                self.catalog
                    .finish(&set.id, SetState::Failed, &reason, 0, 0, now)?;
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

    /// Runs catalog I/O on the blocking pool, off the async workers.
    async fn db<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&Catalog) -> Result<T, crate::catalog::CatalogError> + Send + 'static,
    {
        if !self.window_open {
            // Another group's window: no commit while it is frozen (our own window defers).
            self.windows.closed("a set's catalog write").await;
        }
        let catalog = self.catalog.clone();
        match tokio::task::spawn_blocking(move || f(&catalog)).await {
            Ok(result) => Ok(result?),
            Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            Err(_) => Err(Error::ShuttingDown),
        }
    }

    /// Persists `phase` before anything of it is done (or, while the group is frozen, keeps
    /// it for after the thaw), and times the phase that ended.
    async fn phase(&mut self, phase: SetPhase) -> Result<(), Error> {
        info!(phase = phase.text(), "phase");
        let at_ms = self.clock.now_ms();
        if self.window_open {
            self.deferred_phases.push((phase, at_ms));
        } else {
            let id = self.set_id.clone();
            self.db(move |c| c.set_phase(&id, phase, at_ms)).await?;
        }
        self.metrics.observe_phase(
            &self.group.name,
            self.current_phase,
            self.phase_started.elapsed(),
        );
        self.current_phase = phase;
        self.phase_started = Instant::now();
        Ok(())
    }

    /// What is left of the freeze budget (all of it before the first freeze).
    fn budget_left(&self) -> Duration {
        match self.first_freeze_sent {
            Some(sent) => self.group.freeze_budget.saturating_sub(sent.elapsed()),
            None => self.group.freeze_budget,
        }
    }

    /// Every member's host record, in one catalog transaction.
    async fn save_hosts(&self) -> Result<(), Error> {
        let hosts: Vec<SetHost> = self.members.iter().map(|m| m.host.clone()).collect();
        let id = self.set_id.clone();
        self.db(move |c| c.update_hosts(&id, &hosts)).await
    }

    /// Everything held back while the group was frozen, once every thaw has returned, in
    /// one blocking task: the phases entered meanwhile, the snapshot phase's outcome (its
    /// bounds, every host, every snapshot made), the time spent in snapshot calls and the
    /// initial state of snapshots that complete in the background.
    async fn record_after_thaw(&mut self) -> Result<(), Error> {
        let id = self.set_id.clone();
        let phases = std::mem::take(&mut self.deferred_phases);
        let made = std::mem::take(&mut self.made);
        let hosts: Vec<SetHost> = self.members.iter().map(|m| m.host.clone()).collect();
        let (first, last) = (
            self.first_snapshot_started_at_ms,
            self.last_snapshot_returned_at_ms,
        );
        let progress: Vec<(String, String, String)> = self
            .members
            .iter()
            .flat_map(|m| {
                m.snapshots
                    .iter()
                    .filter(|s| !s.state.is_empty())
                    .map(|s| (m.agent.clone(), s.mount_point.clone(), s.state.clone()))
            })
            .collect();
        let snapshotted = first > 0;
        self.db(move |c| {
            for (phase, at_ms) in phases {
                c.set_phase(&id, phase, at_ms)?;
            }
            if snapshotted {
                c.record_snapshots(&id, first, last, &hosts, &made)?;
            } else {
                c.update_hosts(&id, &hosts)?;
            }
            c.set_snapshot_calls_ms(&id, last.saturating_sub(first))?;
            for (agent, mount_point, state) in progress {
                c.update_volume_progress(&id, &agent, &mount_point, &state, 0)?;
            }
            Ok(())
        })
        .await
    }

    /// Runs the set to its end. `Err` only when the catalog cannot be written.
    async fn execute(&mut self) -> Result<(), Error> {
        let outcome = self.capture().await?;
        let mut window = None;
        let thaw_failure = if self.first_freeze_sent.is_some() {
            self.phase(SetPhase::Thawing).await?;
            let thawed = self.thaw().await?;
            // Every thaw has returned (or its member is given up on): the window is closed.
            // It ends at the last member's FITHAW, not at its hooks' resume after it (that is
            // `resume_ms`), nor at the writes held back during it.
            window = self.first_freeze_sent.map(|sent| {
                self.last_thaw_returned
                    .map_or_else(|| sent.elapsed(), |end| end.saturating_duration_since(sent))
            });
            self.window_open = false;
            self.window = None;
            self.provider.after_thaw(&self.set_id).await;
            self.record_after_thaw().await?;
            thawed
        } else {
            None
        };
        let freeze_window_ms = window.map(|w| w.as_millis() as u64).unwrap_or(0);
        let max_stall = self
            .members
            .iter()
            .map(|m| m.host.write_stall_ms)
            .max()
            .unwrap_or(0);
        let mut failure = match (outcome.err(), thaw_failure) {
            (Some(first), Some(thaw)) => Some(format!("{first}; {thaw}")),
            (first, thaw) => first.or(thaw),
        };
        let hosts: Vec<SetHost> = self.members.iter().map(|m| m.host.clone()).collect();
        let verdict_text = match &failure {
            Some(reason) => format!("not consistent: {reason}"),
            None => match verdict(
                &hosts,
                self.first_snapshot_started_at_ms,
                self.last_snapshot_returned_at_ms,
            ) {
                Ok(why) => format!("consistent: {why}"),
                Err(why) => {
                    failure = Some(format!("verdict: {why}"));
                    format!("not consistent: {why}")
                }
            },
        };
        {
            let (id, text) = (self.set_id.clone(), verdict_text.clone());
            self.db(move |c| c.set_verdict(&id, &text)).await?;
        }
        pause_after("thawed").await;
        match failure {
            None => {
                self.phase(SetPhase::Committed).await?;
                let (id, now) = (self.set_id.clone(), self.clock.now_ms());
                let pending = self.provider.completion_poll().is_some();
                self.db(move |c| {
                    if pending {
                        c.set_completion(&id, Completion::Pending)?;
                    }
                    c.finish(
                        &id,
                        SetState::Consistent,
                        "",
                        freeze_window_ms,
                        max_stall,
                        now,
                    )
                })
                .await?;
                self.metrics
                    .finished(&self.group.name, true, window, &hosts);
                info!(freeze_window_ms, max_stall, verdict = %verdict_text, "consistent");
            }
            Some(reason) => {
                self.phase(SetPhase::Aborting).await?;
                let pending = self.remove_snapshots().await?;
                let reason = if pending.is_empty() {
                    reason
                } else {
                    format!(
                        "{reason}; leftovers pending removal on {} (the reconciler retries until the agent answers)",
                        pending.join(", ")
                    )
                };
                self.phase(SetPhase::Aborted).await?;
                let (id, now, why) = (self.set_id.clone(), self.clock.now_ms(), reason.clone());
                self.db(move |c| {
                    c.finish(
                        &id,
                        SetState::Failed,
                        &why,
                        freeze_window_ms,
                        max_stall,
                        now,
                    )
                })
                .await?;
                self.metrics
                    .finished(&self.group.name, false, window, &hosts);
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
        pause_after("planned").await;
        self.phase(SetPhase::Preparing).await?;
        if let Err(reason) = self.prepare().await? {
            return Ok(Err(reason));
        }
        // The intent record: persisted (fsynced) before the first freeze is sent.
        self.phase(SetPhase::Freezing).await?;
        pause_after("freezing").await;
        if let Err(reason) = self.freeze().await? {
            return Ok(Err(reason));
        }
        pause_after("frozen").await;
        self.phase(SetPhase::Snapshotting).await?;
        let snapshotted = self.snapshot().await?;
        pause_after("snapshotted").await;
        Ok(snapshotted)
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
        let mut resolved = Vec::new();
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
                    let other = group_of_set(&volume.frozen_by);
                    if other != self.group.name {
                        // Two groups (from two coordinators' configs) share this volume.
                        problems.push(format!(
                            "{}:{mount} is busy: set {} of group {other} holds it frozen; a volume belongs to one group, and groups {other} and {} both claim it",
                            member.agent, volume.frozen_by, self.group.name
                        ));
                    } else {
                        problems.push(format!(
                            "{}:{mount} is busy: set {} holds it frozen",
                            member.agent, volume.frozen_by
                        ));
                    }
                    continue;
                }
                if let Err(why) = self.provider.check_volume(&member.agent, volume) {
                    problems.push(why);
                    continue;
                }
                // The agent's clone estimate (reflink: extents × per-extent cost) must fit
                // the budget: a clone that cannot finish in it would fail every set.
                if volume.clone_estimate_ms > self.group.freeze_budget.as_millis() as u64 {
                    problems.push(format!(
                        "{}:{mount}: its clone cannot fit the freeze budget of {}: the backing file {} has {} extents, estimated at {} ms to clone (defragment or recreate the image, or raise freeze-budget)",
                        member.agent,
                        humantime::format_duration(self.group.freeze_budget),
                        volume.backing_file,
                        volume.clone_extents,
                        volume.clone_estimate_ms
                    ));
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
                resolved.push(SetVolume {
                    agent: member.agent.clone(),
                    mount_point: mount.clone(),
                    device: volume.device.clone(),
                    fs_type: volume.fs_type.clone(),
                    backing_file: volume.backing_file.clone(),
                    ebs_volume_id: volume.ebs_volume_id.clone(),
                    instance_id: info.instance_id.clone(),
                    ..Default::default()
                });
            }
        }
        {
            let id = self.set_id.clone();
            self.db(move |c| c.update_volumes(&id, &resolved)).await?;
        }
        problems.extend(self.check_hook_paths().await);
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

    /// No freeze follows a failed prepare: members whose hooks prepared are sent a thaw (which
    /// closes their hook sessions at once; their agents would after max-freeze anyway).
    async fn release_prepared_hooks<T>(&self, replies: &[Result<T, String>]) {
        let calls = self
            .members
            .iter()
            .zip(replies)
            .filter(|(m, reply)| !m.hooks.is_empty() && reply.is_ok())
            .map(|(m, _)| {
                let req = agent_pb::ThawVolumesRequest {
                    set_id: self.set_id.clone(),
                };
                tokio::time::timeout(self.timeout(), m.client.thaw_volumes(req))
            });
        join_all(calls).await;
    }

    /// Completeness check: every path a member's databases write must lie on one of that
    /// member's volumes in this group — a WAL or binlog volume left out would make every set
    /// silently unusable.
    async fn check_hook_paths(&self) -> Vec<String> {
        let with_hooks: Vec<&Member> = self
            .members
            .iter()
            .filter(|m| !m.hooks.is_empty())
            .collect();
        let calls = with_hooks.iter().map(|m| {
            let req = agent_pb::DescribeHooksRequest {
                hooks: m.hooks.clone(),
            };
            tokio::time::timeout(self.timeout(), m.client.describe_hooks(req))
        });
        let replies = join_all(calls).await;
        let mut problems = Vec::new();
        for (member, reply) in with_hooks.into_iter().zip(replies) {
            let described = match reply {
                Ok(Ok(described)) => described,
                Ok(Err(status)) => {
                    problems.push(format!(
                        "{}: cannot describe hooks: {}",
                        member.agent,
                        status_line(&status)
                    ));
                    continue;
                }
                Err(_) => {
                    problems.push(format!(
                        "{}: describing hooks took longer than {}",
                        member.agent,
                        humantime::format_duration(self.timeout())
                    ));
                    continue;
                }
            };
            problems.extend(hook_path_problems(
                &self.group.name,
                &member.agent,
                &member.mounts,
                &described.hooks,
            ));
        }
        problems
    }

    async fn prepare(&mut self) -> Result<Result<(), String>, Error> {
        let set_id = self.set_id.clone();
        let replies = fan_out(&self.members, self.timeout(), |m| {
            let client = m.client.clone();
            let req = agent_pb::PrepareVolumesRequest {
                set_id: set_id.clone(),
                mount_points: m.mounts.clone(),
                hooks: m.hooks.clone(),
            };
            async move { client.prepare_volumes(req).await }
        })
        .await;
        let mut problems = Vec::new();
        for (index, reply) in replies.iter().enumerate() {
            match reply {
                Ok(_) => self.members[index].host.set_state(HostState::Prepared),
                Err(e) => {
                    let member = &mut self.members[index];
                    member.host.set_state(HostState::Failed);
                    member.host.error = format!("prepare: {e}");
                    problems.push(format!("{}: prepare failed: {e}", member.agent));
                }
            }
        }
        self.save_hosts().await?;
        if !problems.is_empty() {
            self.release_prepared_hooks(&replies).await;
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
        let sent = Instant::now();
        self.window_open = true;
        self.window = Some(self.windows.open());
        for member in &mut self.members {
            member.freeze_sent = true;
            member.lease_sent = Some(sent);
        }
        self.first_freeze_sent = Some(sent);
        let sent_at_ms = unix_ms();
        let timeout = self.timeout().min(self.group.freeze_budget);
        let replies = fan_out(&self.members, timeout, |m| {
            let client = m.client.clone();
            let req = agent_pb::FreezeVolumesRequest {
                set_id: set_id.clone(),
                mount_points: m.mounts.clone(),
                lease_ms,
                hooks: m.hooks.clone(),
            };
            // The reply's arrival, on the coordinator clock: every FIFREEZE of the member had
            // returned before it.
            async move { client.freeze_volumes(req).await.map(|r| (r, unix_ms())) }
        })
        .await;
        let mut problems = Vec::new();
        for (index, reply) in replies.into_iter().enumerate() {
            let member = &mut self.members[index];
            member.host.freeze_sent_at_ms = sent_at_ms;
            member.host.lease_sent_at_ms = sent_at_ms;
            match reply {
                Ok((frozen, acked_at_ms)) => {
                    member.host.freeze_acked_at_ms = acked_at_ms;
                    member.host.set_state(HostState::Frozen);
                    member.host.freeze_started_at_ms = frozen.freeze_started_at_ms;
                    member.host.frozen_at_ms = frozen.frozen_at_ms;
                }
                Err(e) => {
                    member.host.set_state(HostState::Failed);
                    member.host.error = format!("freeze: {e}");
                    problems.push(format!("{}: freeze failed: {e}", member.agent));
                }
            }
        }
        // Nothing written: the group may be frozen. The hosts are saved after the thaw.
        Ok(if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        })
    }

    /// Snapshots every member while all are frozen, renewing their leases meanwhile.
    async fn snapshot(&mut self) -> Result<Result<(), String>, Error> {
        let left = self.budget_left();
        if left.is_zero() {
            return Ok(Err(format!(
                "the freeze budget of {} was used up by the freeze phase",
                humantime::format_duration(self.group.freeze_budget)
            )));
        }
        let (renewer, grants) = self.spawn_renewer();
        let set_id = self.set_id.clone();
        let locked_until_ms = self.locked_until_ms;
        let by_budget = left < self.timeout();
        let timeout = self.timeout().min(left);
        let why = if by_budget {
            format!(
                "the freeze budget of {} ({} left after freezing)",
                humantime::format_duration(self.group.freeze_budget),
                humantime::format_duration(Duration::from_millis(left.as_millis() as u64))
            )
        } else {
            humantime::format_duration(timeout).to_string()
        };
        let provider = &self.provider;
        let group = self.group.name.as_str();
        let calls = self.members.iter().map(|m| {
            let set_id = set_id.clone();
            let why = why.clone();
            async move {
                let call = SnapshotCall {
                    set_id: &set_id,
                    group,
                    attempt: 1,
                    agent: &m.agent,
                    client: m.client.as_ref(),
                    volumes: &m.planned,
                    time_left: by_budget.then_some(left),
                    locked_until_ms,
                };
                let started = unix_ms();
                let result = match tokio::time::timeout(timeout, provider.snapshot(&call)).await {
                    Ok(result) => result,
                    Err(_) => Err(format!("{}: snapshot did not return within {why}", m.agent)),
                };
                (result, started, unix_ms())
            }
        });
        let replies = join_all(calls).await;
        renewer.abort();
        // Wait for the renewer to be gone, so that no grant is sent after the ones read here.
        let _ = renewer.await;
        let grants = grants.lock().unwrap().clone();
        for (member, grant) in self.members.iter_mut().zip(grants) {
            if let Some((at, at_ms)) = grant {
                member.lease_sent = Some(at);
                member.host.lease_sent_at_ms = at_ms;
            }
        }
        self.first_snapshot_started_at_ms = replies.iter().map(|r| r.1).min().unwrap_or_default();
        self.last_snapshot_returned_at_ms = replies.iter().map(|r| r.2).max().unwrap_or_default();
        let mut problems = Vec::new();
        let mut made = Vec::new();
        for (index, (reply, started, returned)) in replies.into_iter().enumerate() {
            let member = &mut self.members[index];
            member.host.snapshot_started_at_ms = started;
            member.host.snapshot_returned_at_ms = returned;
            match reply {
                Ok(snapshots) => {
                    made.extend(snapshots.iter().map(|s| {
                        (
                            member.agent.clone(),
                            s.mount_point.clone(),
                            s.snapshot_id.clone(),
                            s.size_bytes,
                        )
                    }));
                    member.snapshots = snapshots;
                }
                Err(reason) => {
                    member.snapshot_unsure = true;
                    problems.push(format!("snapshot failed: {reason}"));
                }
            }
        }
        // The group is still frozen: recorded after the thaw (`record_after_thaw`).
        self.made = made;
        Ok(if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        })
    }

    /// Renews every member's lease at a third of its length until aborted, all members at
    /// once, each call bounded by a third of the lease (one member that does not answer
    /// delays no other's renewal). Records when each member's last grant was sent.
    #[allow(clippy::type_complexity)]
    fn spawn_renewer(&self) -> (JoinHandle<()>, Arc<Mutex<Vec<Option<(Instant, u64)>>>>) {
        let lease = self.group.lease;
        let set_id = self.set_id.clone();
        let clients: Vec<(String, Arc<dyn AgentClient>)> = self
            .members
            .iter()
            .map(|m| (m.agent.clone(), m.client.clone()))
            .collect();
        let grants = Arc::new(Mutex::new(vec![None; clients.len()]));
        let sent = grants.clone();
        let handle = tokio::spawn(
            async move {
                let mut tick = tokio::time::interval(lease / 3);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let calls = clients.iter().enumerate().map(|(index, (agent, client))| {
                        let req = agent_pb::RenewLeaseRequest {
                            set_id: set_id.clone(),
                            lease_ms: lease.as_millis() as u64,
                        };
                        sent.lock().unwrap()[index] = Some((Instant::now(), unix_ms()));
                        async move {
                            match tokio::time::timeout(lease / 3, client.renew_lease(req)).await {
                                Ok(Ok(_)) => {}
                                Ok(Err(status)) => {
                                    warn!(error = %agent_error(agent, &status), "lease renewal failed")
                                }
                                Err(_) => warn!(
                                    agent,
                                    "lease renewal not answered within a third of the lease"
                                ),
                            }
                        }
                    });
                    join_all(calls).await;
                }
            }
            .in_current_span(),
        );
        (handle, grants)
    }

    /// Thaws every member that was sent a freeze and checks that each freeze held.
    /// `Some(reason)` when the set cannot be consistent.
    ///
    /// A member is asked again and again until it answers, or until its lease must have thawed
    /// it (its last grant sent + lease + [`LEASE_MARGIN`], on the coordinator's clock), or until
    /// the phase timeout, whichever comes first: the set is decided then, without waiting for a
    /// member that is gone. Its leftovers go to the reconciler.
    async fn thaw(&mut self) -> Result<Option<String>, Error> {
        let set_id = self.set_id.clone();
        let timeout = self.timeout();
        let lease = self.group.lease;
        pause_after("thawing").await;
        let thaw_sent_at_ms = unix_ms();
        let started = Instant::now();
        let deadline_of = |m: &Member| {
            let by_phase = started + timeout;
            let by_lease = m.lease_sent.map(|sent| sent + lease + LEASE_MARGIN);
            by_lease
                .map_or(by_phase, |bound| bound.min(by_phase))
                .max(started + MIN_THAW_WAIT)
        };
        let calls = self.members.iter().filter(|m| m.freeze_sent).map(|m| {
            let client = m.client.clone();
            let set_id = set_id.clone();
            let deadline = deadline_of(m);
            async move {
                let mut last = String::new();
                let mut attempt = 0u32;
                loop {
                    let req = agent_pb::ThawVolumesRequest {
                        set_id: set_id.clone(),
                    };
                    match tokio::time::timeout_at(deadline, client.thaw_volumes(req)).await {
                        Ok(Ok(reply)) => {
                            // When its last FITHAW returned, on this clock: the agent says how
                            // long before its reply (its hooks' resume ran in between).
                            let since = Duration::from_millis(reply.since_thaw_ms);
                            let arrived = Instant::now();
                            let returned = arrived.checked_sub(since).unwrap_or(arrived);
                            let returned_ms = unix_ms().saturating_sub(reply.since_thaw_ms);
                            return (Ok((reply, returned_ms)), returned);
                        }
                        Ok(Err(status)) => last = agent_error(&m.agent, &status),
                        Err(_) => break,
                    }
                    attempt += 1;
                    let pause = Duration::from_millis(100 * u64::from(attempt.min(5)));
                    if Instant::now() + pause >= deadline {
                        break;
                    }
                    tokio::time::sleep(pause).await;
                }
                if last.is_empty() {
                    last = format!("{}: no answer", m.agent);
                }
                (Err(last), Instant::now())
            }
        });
        let (replies, returned): (Vec<_>, Vec<_>) = join_all(calls).await.into_iter().unzip();
        self.last_thaw_returned = returned.into_iter().max();
        let mut problems = Vec::new();
        let indices: Vec<usize> = (0..self.members.len())
            .filter(|i| self.members[*i].freeze_sent)
            .collect();
        for (index, reply) in indices.into_iter().zip(replies) {
            let member = &mut self.members[index];
            member.host.thaw_sent_at_ms = thaw_sent_at_ms;
            let bound = member.lease_sent.map(|sent| sent + lease + LEASE_MARGIN);
            member.host.lease_bound_at_ms = if member.host.lease_sent_at_ms > 0 {
                member.host.lease_sent_at_ms + (lease + LEASE_MARGIN).as_millis() as u64
            } else {
                0
            };
            match reply {
                Ok((thawed, returned_ms)) => {
                    let end = thawed.end();
                    member.host.thaw_evidence = ThawEvidence::Answered as i32;
                    member.host.thaw_returned_at_ms = returned_ms;
                    member.host.resume_ms = thawed.resume_ms;
                    member.host.thawed_at_ms = thawed.thawed_at_ms;
                    member.host.held_continuously = thawed.held_continuously;
                    member.host.set_freeze_end(end);
                    member.host.write_stall_ms = agent_stall_ms(&thawed, &member.host);
                    if let Some(problem) =
                        store_hook_outputs(&self.catalog, &set_id, &member.agent, &thawed.hooks)?
                    {
                        problems.push(problem);
                    }
                    if member.host.state() == HostState::Frozen {
                        member.host.set_state(HostState::Thawed);
                        if !thawed.held_continuously {
                            member.host.error =
                                format!("freeze ended early: {}", freeze_end_text(end));
                            problems.push(format!(
                                "{}: freeze did not hold until the thaw ({})",
                                member.agent,
                                freeze_end_text(end)
                            ));
                        }
                    }
                }
                Err(reason) => {
                    let bound_passed = bound.is_some_and(|b| Instant::now() >= b);
                    let by = format_ms(member.host.lease_bound_at_ms);
                    let (evidence, what) = if bound_passed {
                        (
                            ThawEvidence::LeaseBound,
                            format!(
                                "did not answer its thaw; its lease must have thawed it by {by} (last lease grant sent at {} + lease {} + margin {})",
                                format_ms(member.host.lease_sent_at_ms),
                                humantime::format_duration(lease),
                                humantime::format_duration(LEASE_MARGIN)
                            ),
                        )
                    } else {
                        (
                            ThawEvidence::Unconfirmed,
                            format!(
                                "thaw not confirmed within the phase timeout of {}; its lease ends the freeze by {by} at the latest",
                                humantime::format_duration(timeout)
                            ),
                        )
                    };
                    if member.host.lease_sent_at_ms > 0 {
                        member.host.thaw_evidence = evidence as i32;
                    }
                    member.host.error = format!("{what}: {reason}");
                    if member.host.state() == HostState::Frozen {
                        member.host.set_state(HostState::Failed);
                        problems.push(format!("{}: {what}: {reason}", member.agent));
                    }
                }
            }
        }
        Ok((!problems.is_empty()).then(|| problems.join("; ")))
    }

    /// Hands every leftover of a failed set to the reconciler's catalog (one row per member
    /// that may hold something: snapshots made, a snapshot call that did not answer cleanly, or
    /// a thaw never confirmed), then makes one attempt at once on each member that answered
    /// its thaw. Returns the members whose removal is still pending.
    async fn remove_snapshots(&mut self) -> Result<Vec<String>, Error> {
        if !self.window_open {
            self.windows.closed("a failed set's removal records").await;
        }
        let now = self.clock.now_ms();
        let mut now_attempted = Vec::new();
        let mut pending = Vec::new();
        for member in &self.members {
            let thaw_unconfirmed =
                member.freeze_sent && member.host.thaw_evidence != ThawEvidence::Answered as i32;
            if member.snapshots.is_empty() && !member.snapshot_unsure && !thaw_unconfirmed {
                continue;
            }
            // An unsure member may hold snapshots we never heard of: ask for all of the set's.
            let ids: Vec<String> = if member.snapshot_unsure || thaw_unconfirmed {
                Vec::new()
            } else {
                member
                    .snapshots
                    .iter()
                    .map(|s| s.snapshot_id.clone())
                    .collect()
            };
            self.catalog.add_pending_removal(
                &self.set_id,
                &member.agent,
                &ids,
                thaw_unconfirmed,
                now,
            )?;
            if thaw_unconfirmed {
                // It did not answer just now: the reconciler retries, without holding the set.
                pending.push(member.agent.clone());
            } else {
                now_attempted.push(member.agent.clone());
            }
        }
        let rows = self.catalog.pending_removals(&self.set_id)?;
        for row in rows
            .iter()
            .filter(|r| now_attempted.contains(&r.status.agent))
        {
            let client = self
                .members
                .iter()
                .find(|m| m.agent == row.status.agent)
                .map(|m| m.client.clone());
            let attempt = crate::reconcile::Attempt {
                catalog: &self.catalog,
                windows: self.windows,
                provider: Some(self.provider.clone()),
                client,
                now_ms: self.clock.now_ms(),
            };
            let report = attempt.run(row).await?;
            if !report.error.is_empty() {
                pending.push(row.status.agent.clone());
            }
        }
        pending.sort();
        Ok(pending)
    }
}

/// How long writers on a member were blocked, as its agent measured it. An agent restarted
/// after its guardian thawed a set it no longer remembers reports only the guardian's FITHAW
/// instant: the stall is then that instant minus the first FIFREEZE start the agent reported
/// in its freeze reply (both on the agent's clock), never 0.
pub fn agent_stall_ms(thawed: &agent_pb::ThawVolumesResponse, host: &SetHost) -> u64 {
    let started = if thawed.freeze_started_at_ms > 0 {
        thawed.freeze_started_at_ms
    } else {
        host.freeze_started_at_ms
    };
    if thawed.write_stall_ms == 0
        && thawed.end() == agent_pb::FreezeEnd::Guardian
        && started > 0
        && thawed.thawed_at_ms > started
    {
        return thawed.thawed_at_ms - started;
    }
    thawed.write_stall_ms
}

/// How a freeze ended, in words naming what thawed it.
pub fn freeze_end_text(end: agent_pb::FreezeEnd) -> &'static str {
    match end {
        agent_pb::FreezeEnd::Unspecified => "ended for a reason the agent did not say",
        agent_pb::FreezeEnd::Thawed => "thawed by the coordinator's thaw",
        agent_pb::FreezeEnd::LeaseExpired => "thawed by the agent when its lease ran out",
        agent_pb::FreezeEnd::MaxFreeze => "thawed by the agent at its max-freeze cap",
        agent_pb::FreezeEnd::Shutdown => "thawed by the agent's shutdown",
        agent_pb::FreezeEnd::ExternalThaw => {
            "thawed by someone else (the agent found it no longer frozen)"
        }
        agent_pb::FreezeEnd::UnknownSet => {
            "unknown: the agent has no record of the set (it restarted without one)"
        }
        agent_pb::FreezeEnd::Guardian => {
            "thawed by the agent's guardian (the agent died or hung past max-freeze)"
        }
    }
}

/// Coordinator-clock milliseconds as an RFC 3339 instant (UTC, milliseconds).
pub fn format_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Decides whether a set whose every phase succeeded is a cut across its hosts.
///
/// Which clock each instant is on, and why the check is sound although hosts' clocks differ:
///
/// * Ordering is checked on the **coordinator's clock only**. `freeze_acked_at_ms` is when the
///   member's freeze reply reached the coordinator; the agent answers only after every FIFREEZE
///   of the member returned, so the member was frozen at that instant in real time.
///   `first_snapshot_started_at_ms` and `last_snapshot_returned_at_ms` bound the snapshot calls;
///   `thaw_sent_at_ms` is when the thaw was sent. Comparing these needs no agreement between
///   hosts' clocks: one clock, read by one process, in the order things happened to it.
/// * Continuity is the **agent's own statement**: `held_continuously` is true only when every
///   volume stayed frozen from its FIFREEZE until the explicit thaw of this set (no lease end,
///   no hard cap, no external thaw). A freeze that held until a thaw which was sent after the
///   last snapshot returned held past that return, whatever the agent's clock says.
/// * The agent-clock instants (`frozen_at_ms`, `thawed_at_ms`) are shown next to them and only
///   used to report skew: an agent whose `frozen_at_ms` falls outside the coordinator's
///   [freeze sent, freeze acked] window has a clock off by at least the difference.
///
/// `Ok` explains the cut; `Err` names every member that breaks it.
pub fn verdict(
    hosts: &[SetHost],
    first_snapshot_started_at_ms: u64,
    last_snapshot_returned_at_ms: u64,
) -> Result<String, String> {
    let mut problems = Vec::new();
    if hosts.is_empty() {
        problems.push("no members".to_owned());
    }
    if first_snapshot_started_at_ms == 0 || last_snapshot_returned_at_ms == 0 {
        problems.push("no snapshot call was recorded".to_owned());
    }
    let mut skews = Vec::new();
    for host in hosts {
        let agent = &host.agent;
        if host.freeze_acked_at_ms == 0 {
            problems.push(format!("{agent}: no freeze reply recorded"));
        } else if host.freeze_acked_at_ms > first_snapshot_started_at_ms {
            problems.push(format!(
                "{agent}: frozen (reply at {}) only after the first snapshot call started ({})",
                host.freeze_acked_at_ms, first_snapshot_started_at_ms
            ));
        }
        let end = host.freeze_end();
        if !host.held_continuously || end != agent_pb::FreezeEnd::Thawed {
            problems.push(format!(
                "{agent}: freeze did not hold until the thaw (ended by {})",
                match end {
                    agent_pb::FreezeEnd::Unspecified => "unknown",
                    end => end.text(),
                }
            ));
        }
        if host.thaw_sent_at_ms < last_snapshot_returned_at_ms {
            problems.push(format!(
                "{agent}: thaw sent at {} before the last snapshot returned ({})",
                host.thaw_sent_at_ms, last_snapshot_returned_at_ms
            ));
        }
        if host.snapshot_returned_at_ms == 0 {
            problems.push(format!("{agent}: its snapshot call never returned"));
        }
        if host.frozen_at_ms != 0 && host.freeze_acked_at_ms != 0 {
            if host.frozen_at_ms > host.freeze_acked_at_ms {
                skews.push(format!(
                    "{agent} +{} ms",
                    host.frozen_at_ms - host.freeze_acked_at_ms
                ));
            } else if host.frozen_at_ms < host.freeze_sent_at_ms {
                skews.push(format!(
                    "{agent} -{} ms",
                    host.freeze_sent_at_ms - host.frozen_at_ms
                ));
            }
        }
    }
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    let origin = hosts.iter().map(|h| h.freeze_sent_at_ms).min().unwrap_or(0);
    let rel = |at: u64| at as i64 - origin as i64;
    let last_freeze = hosts
        .iter()
        .map(|h| h.freeze_acked_at_ms)
        .max()
        .unwrap_or(0);
    let first_thaw = hosts.iter().map(|h| h.thaw_sent_at_ms).min().unwrap_or(0);
    let mut why = format!(
        "all {} members frozen (last freeze reply +{} ms) before the first snapshot call (+{} ms); every freeze held until a thaw sent (+{} ms) after the last snapshot returned (+{} ms); coordinator clock, ms after the first freeze was sent",
        hosts.len(),
        rel(last_freeze),
        rel(first_snapshot_started_at_ms),
        rel(first_thaw),
        rel(last_snapshot_returned_at_ms),
    );
    if !skews.is_empty() {
        why.push_str(&format!(
            "; agent clocks off by at least: {} (not used for the verdict)",
            skews.join(", ")
        ));
    }
    Ok(why)
}

/// Which described hook paths lie outside the member's volumes in this group (or could not be
/// described at all); one line each, naming the path, the hook and the missing volume.
pub fn hook_path_problems(
    group: &str,
    agent: &str,
    mounts: &[String],
    hooks: &[agent_pb::HookDescription],
) -> Vec<String> {
    let mut problems = Vec::new();
    for hook in hooks {
        if !hook.problem.is_empty() {
            problems.push(format!("{agent}: {}", hook.problem));
            continue;
        }
        for path in &hook.paths {
            if path.mount_point.is_empty() {
                problems.push(format!(
                    "{agent}: hook {}: cannot tell which volume holds {} {}",
                    hook.name, path.what, path.path
                ));
            } else if !mounts.contains(&path.mount_point) {
                problems.push(format!(
                    "{agent}: hook {}: {} {} lies on volume {}, which is not in group {group} for {agent}; add it to the member's mounts",
                    hook.name, path.what, path.path, path.mount_point
                ));
            }
        }
    }
    problems
}

/// Records a member's hook outputs; `Some(problem)` when a hook's resume failed.
fn store_hook_outputs(
    catalog: &Catalog,
    set_id: &str,
    agent: &str,
    outputs: &[agent_pb::HookOutput],
) -> Result<Option<String>, Error> {
    if outputs.is_empty() {
        return Ok(None);
    }
    let rows: Vec<SetHookOutput> = outputs
        .iter()
        .map(|o| SetHookOutput {
            agent: agent.to_owned(),
            hook: o.hook.clone(),
            kind: o.kind.clone(),
            values: o
                .values
                .iter()
                .map(|v| HookValue {
                    key: v.key.clone(),
                    value: v.value.clone(),
                })
                .collect(),
            backup_label: o.backup_label.clone(),
            tablespace_map: o.tablespace_map.clone(),
            error: o.error.clone(),
            quiesce_ms: o.quiesce_ms,
            resume_ms: o.resume_ms,
        })
        .collect();
    catalog.set_hook_outputs(set_id, agent, &rows)?;
    let errors: Vec<&str> = outputs
        .iter()
        .filter(|o| !o.error.is_empty())
        .map(|o| o.error.as_str())
        .collect();
    Ok((!errors.is_empty()).then(|| format!("{agent}: {}", errors.join("; "))))
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

/// The group a set id belongs to: `<group>-<UTC stamp>-<hex>`.
pub fn group_of_set(set_id: &str) -> &str {
    set_id.rsplitn(3, '-').nth(2).unwrap_or(set_id)
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `pg-20261125T131200Z-3fa9`: group, UTC time, and 16 random bits. Sorts by time per group.
pub fn new_set_id(group: &str) -> String {
    new_set_id_at(group, unix_ms())
}

/// A set id for a set created at `at_ms`.
pub fn new_set_id_at(group: &str, at_ms: u64) -> String {
    let stamp = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(at_ms))
        .to_string()
        .replace(['-', ':'], "");
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let count = COUNTER.fetch_add(0x9e37, std::sync::atomic::Ordering::Relaxed);
    let noise = (nanos ^ std::process::id().rotate_left(16) ^ count) & 0xffff;
    format!("{group}-{stamp}-{noise:04x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_agent::{FakeAgent, Phase};
    use agent_pb::FreezeEnd;
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
freeze-budget = "800ms"
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
        set.phases.iter().map(|p| p.phase().text()).collect()
    }

    #[tokio::test]
    async fn a_clean_run_is_consistent_with_every_snapshot_recorded() {
        let (coordinator, db1, db2) = setup();
        let set = coordinator.backup("g").await.unwrap();
        assert_eq!(set.state(), SetState::Consistent, "{}", set.error);
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
                .all(|h| h.held_continuously && h.state() == HostState::Thawed)
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
        assert_eq!(set.state(), SetState::Failed);
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
        assert_eq!(set.state(), SetState::Failed);
        assert!(set.error.contains("db2: clone failed"), "{}", set.error);
        assert!(!db1.is_frozen() && !db2.is_frozen());
        assert!(db1.live_snapshots().is_empty(), "db1's snapshots removed");
        assert!(
            db2.calls().contains(&Phase::Delete),
            "unsure member asked to clean up"
        );
    }

    #[tokio::test]
    async fn hook_resume_after_the_thaw_is_its_own_figure_and_not_in_the_cut_window() {
        let (coordinator, db1, db2) = setup();
        db2.slow_resume(Duration::from_millis(800));
        let set = coordinator.backup("g").await.unwrap();
        assert_eq!(set.state(), SetState::Consistent, "{}", set.error);
        assert!(
            set.freeze_window_ms > 0 && set.freeze_window_ms < 800,
            "the cut window holds the resume: {} ms",
            set.freeze_window_ms
        );
        assert_eq!(set.max_resume_ms, 800);
        let host = |name: &str| set.hosts.iter().find(|h| h.agent == name).unwrap().clone();
        let (h1, h2) = (host("db1"), host("db2"));
        assert_eq!((h1.resume_ms, h2.resume_ms), (0, 800));
        for h in [&h1, &h2] {
            assert!(
                h.thaw_returned_at_ms >= h.thaw_sent_at_ms
                    && h.thaw_returned_at_ms <= set.finished_at_ms,
                "{h:?}"
            );
        }
        // db2's thaw reply came ≥ 800 ms after its "FITHAW": its thaw returned long before.
        assert!(
            h2.thaw_returned_at_ms + 700 <= set.finished_at_ms,
            "{} vs finished {}",
            h2.thaw_returned_at_ms,
            set.finished_at_ms
        );
        assert!(!db1.is_frozen() && !db2.is_frozen());
    }

    #[tokio::test]
    async fn a_lease_that_ran_out_makes_the_set_failed() {
        let (coordinator, db1, _db2) = setup();
        db1.expire_lease();
        let set = coordinator.backup("g").await.unwrap();
        assert_eq!(set.state(), SetState::Failed);
        assert!(
            set.error
                .contains("db1: freeze did not hold until the thaw (thawed by the agent when its lease ran out)"),
            "{}",
            set.error
        );
        assert!(db1.live_snapshots().is_empty());
        let host = set.hosts.iter().find(|h| h.agent == "db1").unwrap();
        assert!(!host.held_continuously);
        assert_eq!(host.freeze_end(), FreezeEnd::LeaseExpired);
    }

    #[tokio::test]
    async fn an_unreachable_member_fails_the_plan_before_any_freeze() {
        let (coordinator, db1, db2) = setup();
        db2.fail(Phase::HostInfo, Status::unavailable("connection refused"));
        let set = coordinator.backup("g").await.unwrap();
        assert_eq!(set.state(), SetState::Failed);
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
        assert_eq!(set.state(), SetState::Failed);
        assert!(
            set.error
                .contains("db2: prepare failed: no answer within 1s"),
            "{}",
            set.error
        );
    }

    /// A group whose phase timeout is far longer than its lease: only the lease bound can end
    /// the wait for a member that does not answer its thaw.
    const LEASE_CONFIG: &str = r#"
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
lease = "600ms"
phase-timeout = "20s"
freeze-budget = "800ms"
[[group.member]]
agent = "db1"
mounts = ["/data", "/wal"]
[[group.member]]
agent = "db2"
mounts = ["/data"]
"#;

    fn setup_with(config: &str, catalog: Catalog) -> (Arc<Coordinator>, FakeAgent, FakeAgent) {
        let db1 = FakeAgent::new("db1", &["/data", "/wal"]);
        let db2 = FakeAgent::new("db2", &["/data"]);
        let mut agents: HashMap<String, Arc<dyn AgentClient>> = HashMap::new();
        agents.insert("db1".into(), Arc::new(db1.clone()));
        agents.insert("db2".into(), Arc::new(db2.clone()));
        let coordinator = Coordinator::new(
            Arc::new(Config::parse(config).unwrap()),
            Arc::new(catalog),
            Arc::new(agents),
        );
        (coordinator, db1, db2)
    }

    #[tokio::test]
    async fn a_member_silent_at_its_thaw_fails_the_set_at_its_lease_bound_and_frees_the_group() {
        let (coordinator, db1, db2) = setup_with(LEASE_CONFIG, Catalog::in_memory().unwrap());
        db2.delay(Phase::Thaw, Duration::from_secs(3600));
        let started = Instant::now();
        let set = coordinator.backup("g").await.unwrap();
        let took = started.elapsed();
        assert_eq!(set.state(), SetState::Failed, "{set:?}");
        // Freeze, snapshot (no renewal within 600 ms / 3 … at most one), then the bound:
        // last grant + 600 ms + 1 s margin; far less than the 20 s phase timeout.
        assert!(took < Duration::from_millis(2500), "decided after {took:?}");
        let host = set.hosts.iter().find(|h| h.agent == "db2").unwrap();
        assert_eq!(
            host.thaw_evidence,
            ThawEvidence::LeaseBound as i32,
            "{host:?}"
        );
        assert!(host.lease_sent_at_ms >= host.freeze_sent_at_ms, "{host:?}");
        assert_eq!(
            host.lease_bound_at_ms,
            host.lease_sent_at_ms + 1600,
            "{host:?}"
        );
        assert!(
            set.finished_at_ms >= host.lease_bound_at_ms,
            "decided only once the bound passed: {set:?}"
        );
        assert!(
            set.error
                .contains("db2: did not answer its thaw; its lease must have thawed it by"),
            "{}",
            set.error
        );
        assert!(
            set.error.contains("leftovers pending removal on db2"),
            "{}",
            set.error
        );
        let db1_host = set.hosts.iter().find(|h| h.agent == "db1").unwrap();
        assert_eq!(db1_host.thaw_evidence, ThawEvidence::Answered as i32);
        assert!(
            db1.live_snapshots().is_empty(),
            "db1 answered: removed at once"
        );
        assert_eq!(set.pending_removals.len(), 1, "{set:?}");
        let pending = &set.pending_removals[0];
        assert_eq!(pending.agent, "db2");
        assert!(pending.thaw_unconfirmed);
        assert_eq!(db2.live_snapshots().len(), 1, "still on the silent member");

        // The group is not locked by the silent member: its next set runs (and, with db2 back,
        // succeeds while db2's removal is still pending).
        db2.delay(Phase::Thaw, Duration::ZERO);
        let next = coordinator.backup("g").await.unwrap();
        assert_eq!(next.state(), SetState::Consistent, "{}", next.error);
        let groups = coordinator.group_infos().unwrap();
        assert_eq!(groups[0].pending_removals.len(), 1, "{groups:?}");
        assert_eq!(groups[0].pending_removals[0].set_id, set.id);

        // The reconciler: a thaw first (the agent's late report is recorded), then the removal.
        db2.expire_lease();
        assert_eq!(coordinator.reconcile_due().await, 1);
        let after = coordinator.catalog().get(&set.id).unwrap().unwrap();
        assert!(after.pending_removals.is_empty(), "{after:?}");
        let host = after.hosts.iter().find(|h| h.agent == "db2").unwrap();
        assert_eq!(
            host.thaw_evidence,
            ThawEvidence::AnsweredLate as i32,
            "{host:?}"
        );
        assert_eq!(host.freeze_end(), FreezeEnd::LeaseExpired);
        assert_eq!(host.write_stall_ms, 5, "the agent's own figure");
        assert!(
            host.error
                .contains("its agent reported later: thawed by the agent when its lease ran out"),
            "{}",
            host.error
        );
        assert_eq!(after.max_write_stall_ms, 5);
        assert!(
            db2.live_snapshots().iter().all(|s| !s.contains(&set.id)),
            "{:?}",
            db2.live_snapshots()
        );
        let text = coordinator.render_metrics();
        assert!(
            text.contains("quiesce_pending_removals{agent=\"db2\"} 0"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_thaw_unconfirmed_within_the_phase_timeout_says_the_lease_may_still_hold_it() {
        let (coordinator, _db1, db2) = setup();
        db2.fail(Phase::Thaw, Status::unavailable("connection refused"));
        let set = coordinator.backup("g").await.unwrap();
        assert_eq!(set.state(), SetState::Failed);
        let host = set.hosts.iter().find(|h| h.agent == "db2").unwrap();
        assert_eq!(
            host.thaw_evidence,
            ThawEvidence::Unconfirmed as i32,
            "{host:?}"
        );
        assert!(
            set.error.contains(
                "db2: thaw not confirmed within the phase timeout of 1s; its lease ends the freeze by"
            ),
            "{}",
            set.error
        );
        assert!(set.error.contains("connection refused"), "{}", set.error);
    }

    #[tokio::test]
    async fn nothing_commits_while_another_group_is_frozen() {
        let (coordinator, _db1, db2) = setup_with(LEASE_CONFIG, Catalog::in_memory().unwrap());
        db2.fail(Phase::Thaw, Status::unavailable("connection refused"));
        let set = coordinator.backup("g").await.unwrap();
        assert_eq!(set.pending_removals.len(), 1, "{set:?}");
        let attempts = |c: &Coordinator| {
            c.catalog().pending_removals(&set.id).unwrap()[0]
                .status
                .attempts
        };
        let before = attempts(&coordinator);
        // Another group's set holds its freeze window open.
        let window = coordinator.windows().open();
        let reconciling = {
            let coordinator = coordinator.clone();
            tokio::spawn(async move {
                // Past any first backoff, so the removal is due.
                tokio::time::sleep(Duration::from_secs(2)).await;
                coordinator.reconcile_due().await
            })
        };
        let deleting = {
            let coordinator = coordinator.clone();
            let id = set.id.clone();
            tokio::spawn(async move { coordinator.delete_set(&id).await })
        };
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(
            attempts(&coordinator),
            before,
            "a removal was recorded while frozen"
        );
        assert!(!reconciling.is_finished() && !deleting.is_finished());
        drop(window);
        assert_eq!(reconciling.await.unwrap(), 1);
        deleting.await.unwrap().unwrap();
        assert!(
            attempts(&coordinator) > before,
            "recorded once the window closed"
        );
    }

    #[tokio::test]
    async fn pending_removals_survive_a_restart_and_are_retried_with_backoff_until_the_agent_answers()
     {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.sqlite");
        let set_id = {
            let (coordinator, _db1, db2) = setup_with(LEASE_CONFIG, Catalog::open(&path).unwrap());
            db2.delay(Phase::Thaw, Duration::from_secs(3600));
            let set = coordinator.backup("g").await.unwrap();
            assert_eq!(set.pending_removals.len(), 1);
            set.id
        };
        let clock = crate::clock::FakeClock::at(unix_ms());
        // A new coordinator process on the same catalog; db2 still refuses.
        let db1 = FakeAgent::new("db1", &["/data", "/wal"]);
        let db2 = FakeAgent::new("db2", &["/data"]);
        db2.fail(Phase::Thaw, Status::unavailable("connection refused"));
        let mut agents: HashMap<String, Arc<dyn AgentClient>> = HashMap::new();
        agents.insert("db1".into(), Arc::new(db1));
        agents.insert("db2".into(), Arc::new(db2.clone()));
        let coordinator = Coordinator::with_clock(
            Arc::new(Config::parse(LEASE_CONFIG).unwrap()),
            Arc::new(Catalog::open(&path).unwrap()),
            Arc::new(agents),
            Arc::new(clock.clone()),
        );
        assert_eq!(coordinator.reconcile_due().await, 1);
        let pending = coordinator.catalog().pending_removals(&set_id).unwrap();
        assert_eq!(pending[0].status.attempts, 1);
        assert!(
            pending[0].status.last_error.contains("connection refused"),
            "{pending:?}"
        );
        assert_eq!(
            pending[0].status.next_attempt_at_ms,
            clock.now_ms() + 1000,
            "first retry after 1 s"
        );
        assert_eq!(coordinator.reconcile_due().await, 0, "not due yet");
        clock.advance(Duration::from_secs(1));
        assert_eq!(coordinator.reconcile_due().await, 1);
        let pending = coordinator.catalog().pending_removals(&set_id).unwrap();
        assert_eq!(pending[0].status.next_attempt_at_ms, clock.now_ms() + 2000);
        let statuses = coordinator.agent_statuses().await;
        let db2_status = statuses.iter().find(|a| a.name == "db2").unwrap();
        assert_eq!(db2_status.pending_removals.len(), 1, "{db2_status:?}");
        assert!(
            coordinator
                .render_metrics()
                .contains("quiesce_pending_removals{agent=\"db2\"} 1")
        );
        db2.heal(Phase::Thaw);
        clock.advance(Duration::from_secs(2));
        assert_eq!(coordinator.reconcile_due().await, 1);
        assert!(
            coordinator
                .catalog()
                .pending_removals("")
                .unwrap()
                .is_empty()
        );
        assert!(db2.calls().contains(&Phase::Delete));
    }

    #[tokio::test]
    async fn deleting_a_set_reports_per_host_and_waits_for_an_unreachable_member() {
        let (coordinator, db1, db2) = setup();
        let set = coordinator.backup("g").await.unwrap();
        assert_eq!(set.state(), SetState::Consistent, "{}", set.error);
        db2.fail(Phase::Delete, Status::unavailable("connection refused"));
        let report = coordinator.delete_set(&set.id).await.unwrap();
        assert!(!report.forgotten, "{report:?}");
        assert_eq!(report.hosts.len(), 2, "{report:?}");
        let db1_report = report.hosts.iter().find(|h| h.agent == "db1").unwrap();
        assert!(db1_report.error.is_empty(), "{db1_report:?}");
        assert_eq!(db1_report.removed.len(), 2, "{db1_report:?}");
        let db2_report = report.hosts.iter().find(|h| h.agent == "db2").unwrap();
        assert!(
            db2_report.error.contains("connection refused"),
            "{db2_report:?}"
        );
        assert!(db1.live_snapshots().is_empty());
        let kept = coordinator.catalog().get(&set.id).unwrap().unwrap();
        assert_eq!(kept.pending_removals.len(), 1, "{kept:?}");
        assert_eq!(kept.pending_removals[0].agent, "db2");
        // The reconciler finishes it and forgets the set.
        db2.heal(Phase::Delete);
        coordinator
            .catalog()
            .removal_retry(&set.id, "db2", 0, 0, "due now")
            .unwrap();
        assert_eq!(coordinator.reconcile_due().await, 1);
        assert!(coordinator.catalog().get(&set.id).unwrap().is_none());
        assert!(db2.live_snapshots().is_empty());
    }

    #[test]
    fn a_guardian_thaw_reported_by_a_restarted_agent_keeps_its_stall() {
        let host = SetHost {
            freeze_started_at_ms: 10_000,
            ..Default::default()
        };
        let restarted = agent_pb::ThawVolumesResponse {
            end: agent_pb::FreezeEnd::Guardian.into(),
            thawed_at_ms: 17_000,
            ..Default::default()
        };
        assert_eq!(agent_stall_ms(&restarted, &host), 7_000);
        let measured = agent_pb::ThawVolumesResponse {
            write_stall_ms: 6_900,
            ..restarted.clone()
        };
        assert_eq!(
            agent_stall_ms(&measured, &host),
            6_900,
            "the agent's figure wins"
        );
        let unknown = agent_pb::ThawVolumesResponse {
            end: agent_pb::FreezeEnd::UnknownSet.into(),
            ..Default::default()
        };
        assert_eq!(agent_stall_ms(&unknown, &host), 0, "unknown stays unknown");
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
                trigger: "manual",
                freeze_budget_ms: 1000,
            })
            .unwrap();
        coordinator
            .catalog()
            .set_phase("g-crashed", SetPhase::Snapshotting, 2)
            .unwrap();
        let recovered = coordinator.recover().await.unwrap();
        assert_eq!(recovered, ["g-crashed"]);
        let set = coordinator.catalog().get("g-crashed").unwrap().unwrap();
        assert_eq!(set.state(), SetState::Failed);
        assert!(
            set.error.contains("stopped while the set was snapshotting"),
            "{}",
            set.error
        );
        assert!(db1.calls().contains(&Phase::Thaw) && db2.calls().contains(&Phase::Thaw));
        assert!(db1.calls().contains(&Phase::Delete));
        assert!(
            set.verdict
                .starts_with("not consistent: the coordinator stopped")
        );
    }

    #[tokio::test]
    async fn a_clean_run_records_every_instant_and_a_consistent_verdict() {
        let (coordinator, _db1, _db2) = setup();
        let set = coordinator.backup("g").await.unwrap();
        assert_eq!(set.state(), SetState::Consistent, "{}", set.error);
        assert!(
            set.verdict
                .starts_with("consistent: all 2 members frozen (last freeze reply +"),
            "{}",
            set.verdict
        );
        assert_eq!(set.freeze_budget_ms, 800);
        assert_eq!(set.trigger, "manual");
        assert!(set.first_snapshot_started_at_ms > 0);
        for host in &set.hosts {
            assert!(
                host.freeze_sent_at_ms > 0 && host.frozen_at_ms > 0,
                "{host:?}"
            );
            assert!(host.freeze_acked_at_ms <= set.first_snapshot_started_at_ms);
            assert!(host.snapshot_returned_at_ms <= set.last_snapshot_returned_at_ms);
            assert!(host.thaw_sent_at_ms >= set.last_snapshot_returned_at_ms);
            assert!(host.thawed_at_ms > 0);
        }
    }

    fn good_host(agent: &str) -> SetHost {
        SetHost {
            agent: agent.into(),
            state: HostState::Thawed as i32,
            freeze_sent_at_ms: 100,
            freeze_acked_at_ms: 110,
            frozen_at_ms: 105,
            snapshot_started_at_ms: 120,
            snapshot_returned_at_ms: 150,
            thaw_sent_at_ms: 160,
            thawed_at_ms: 170,
            held_continuously: true,
            freeze_end: FreezeEnd::Thawed as i32,
            ..Default::default()
        }
    }

    #[test]
    fn the_verdict_needs_every_freeze_before_the_first_snapshot_and_held_past_the_last() {
        let hosts = vec![good_host("db1"), good_host("db2")];
        let ok = verdict(&hosts, 120, 150).unwrap();
        assert!(
            ok.contains("all 2 members frozen (last freeze reply +10 ms) before the first snapshot call (+20 ms); every freeze held until a thaw sent (+60 ms) after the last snapshot returned (+50 ms)"),
            "{ok}"
        );
        assert!(!ok.contains("clocks off"), "{ok}");

        let mut late = hosts.clone();
        late[1].freeze_acked_at_ms = 121;
        let err = verdict(&late, 120, 150).unwrap_err();
        assert!(
            err.contains(
                "db2: frozen (reply at 121) only after the first snapshot call started (120)"
            ),
            "{err}"
        );

        let mut early_thaw = hosts.clone();
        early_thaw[0].thaw_sent_at_ms = 149;
        let err = verdict(&early_thaw, 120, 150).unwrap_err();
        assert!(
            err.contains("db1: thaw sent at 149 before the last snapshot returned (150)"),
            "{err}"
        );

        let mut lease = hosts.clone();
        lease[0].held_continuously = false;
        lease[0].set_freeze_end(FreezeEnd::LeaseExpired);
        let err = verdict(&lease, 120, 150).unwrap_err();
        assert!(
            err.contains("db1: freeze did not hold until the thaw (ended by lease-expired)"),
            "{err}"
        );

        let mut never = hosts.clone();
        never[1].snapshot_returned_at_ms = 0;
        assert!(
            verdict(&never, 120, 150)
                .unwrap_err()
                .contains("db2: its snapshot call never returned")
        );
        assert!(verdict(&[], 120, 150).is_err());
    }

    #[test]
    fn agent_clock_skew_is_reported_but_does_not_decide_the_verdict() {
        let mut hosts = vec![good_host("db1"), good_host("db2")];
        // db2's clock runs 5 s ahead: its frozen_at is after the coordinator got its reply.
        hosts[1].frozen_at_ms = 5_105;
        hosts[1].thawed_at_ms = 5_170;
        // db1's runs 1 s behind.
        hosts[0].frozen_at_ms = 90;
        let ok = verdict(&hosts, 120, 150).unwrap();
        assert!(
            ok.contains("agent clocks off by at least: db1 -10 ms, db2 +4995 ms"),
            "{ok}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_snapshot_slower_than_the_freeze_budget_fails_the_set_and_thaws_everyone() {
        let (coordinator, db1, db2) = setup();
        db2.delay(Phase::Snapshot, Duration::from_secs(5));
        let set = coordinator.backup("g").await.unwrap();
        assert_eq!(set.state(), SetState::Failed);
        assert!(
            set.error
                .contains("db2: snapshot did not return within the freeze budget of 800ms"),
            "{}",
            set.error
        );
        assert!(
            set.verdict.starts_with("not consistent:"),
            "{}",
            set.verdict
        );
        assert!(!db1.is_frozen() && !db2.is_frozen());
        assert!(db1.live_snapshots().is_empty(), "db1's snapshot removed");
        assert!(db2.calls().contains(&Phase::Delete));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_freeze_eats_the_budget_left_for_snapshots() {
        let (coordinator, db1, db2) = setup();
        db1.delay(Phase::Freeze, Duration::from_millis(500));
        db2.delay(Phase::Snapshot, Duration::from_millis(400));
        let set = coordinator.backup("g").await.unwrap();
        assert_eq!(set.state(), SetState::Failed, "{}", set.verdict);
        assert!(set.error.contains("left after freezing"), "{}", set.error);
        assert!(!db1.is_frozen() && !db2.is_frozen());
    }

    #[tokio::test]
    async fn a_volume_held_by_another_groups_set_is_refused_at_plan_time_naming_both_groups() {
        let (coordinator, db1, _db2) = setup();
        let other = new_set_id("billing-eu");
        db1.hold("/wal", &other);
        let set = coordinator.backup("g").await.unwrap();
        assert_eq!(set.state(), SetState::Failed);
        assert!(
            set.error.contains(&format!(
                "db1:/wal is busy: set {other} of group billing-eu holds it frozen; a volume belongs to one group, and groups billing-eu and g both claim it"
            )),
            "{}",
            set.error
        );
        assert!(!db1.calls().contains(&Phase::Freeze));
    }

    fn setup_with_hooks() -> (Arc<Coordinator>, FakeAgent, FakeAgent) {
        let db1 = FakeAgent::new("db1", &["/data", "/wal"]);
        let db2 = FakeAgent::new("db2", &["/data"]);
        let mut agents: HashMap<String, Arc<dyn AgentClient>> = HashMap::new();
        agents.insert("db1".into(), Arc::new(db1.clone()));
        agents.insert("db2".into(), Arc::new(db2.clone()));
        let config = CONFIG.replace(
            "mounts = [\"/data\", \"/wal\"]",
            "mounts = [\"/data\", \"/wal\"]\nhooks = [\"pg\", \"scripts\"]",
        );
        let coordinator = Coordinator::new(
            Arc::new(Config::parse(&config).unwrap()),
            Arc::new(Catalog::in_memory().unwrap()),
            Arc::new(agents),
        );
        (coordinator, db1, db2)
    }

    #[tokio::test]
    async fn hook_outputs_are_stored_with_the_set_in_hook_order() {
        let (coordinator, db1, _db2) = setup_with_hooks();
        db1.add_hook(
            "pg",
            &[
                ("data_directory", "/data/pg", "/data"),
                ("pg_wal", "/wal/pg_wal", "/wal"),
            ],
        );
        db1.add_hook("scripts", &[]);
        let set = coordinator.backup("g").await.unwrap();
        assert_eq!(set.state(), SetState::Consistent, "{}", set.error);
        let hooks: Vec<(&str, &str)> = set
            .hook_outputs
            .iter()
            .map(|o| (o.agent.as_str(), o.hook.as_str()))
            .collect();
        assert_eq!(hooks, [("db1", "pg"), ("db1", "scripts")]);
        assert_eq!(set.hook_outputs[0].values[0].value, "0/1");
        assert_eq!(
            set.hook_outputs[0].backup_label,
            "START WAL LOCATION: 0/1\n"
        );
    }

    #[tokio::test]
    async fn a_database_path_outside_the_group_refuses_the_set_before_any_freeze() {
        let (coordinator, db1, db2) = setup_with_hooks();
        db1.add_hook(
            "pg",
            &[
                ("data_directory", "/data/pg", "/data"),
                ("pg_wal", "/srv/wal/pg_wal", "/srv/wal"),
                ("tablespace ts1", "/ts/pg", "/ts"),
            ],
        );
        db1.add_hook("scripts", &[]);
        let set = coordinator.backup("g").await.unwrap();
        assert_eq!(set.state(), SetState::Failed);
        for needle in [
            "db1: hook pg: pg_wal /srv/wal/pg_wal lies on volume /srv/wal, which is not in group g for db1",
            "db1: hook pg: tablespace ts1 /ts/pg lies on volume /ts",
        ] {
            assert!(
                set.error.contains(needle),
                "{needle:?} not in {}",
                set.error
            );
        }
        assert!(!db1.calls().contains(&Phase::Prepare));
        assert!(!db2.calls().contains(&Phase::Freeze));
    }

    #[tokio::test]
    async fn a_failed_prepare_elsewhere_releases_the_hooks_that_prepared() {
        let (coordinator, db1, db2) = setup_with_hooks();
        db1.add_hook("pg", &[("data_directory", "/data/pg", "/data")]);
        db1.add_hook("scripts", &[]);
        db2.fail(Phase::Prepare, Status::internal("syncfs failed"));
        let set = coordinator.backup("g").await.unwrap();
        assert_eq!(set.state(), SetState::Failed);
        assert!(
            db1.calls().contains(&Phase::Thaw),
            "db1's hook sessions closed"
        );
        assert!(!db1.calls().contains(&Phase::Freeze));
        assert!(!db2.calls().contains(&Phase::Thaw), "db2 has no hooks");
    }

    #[tokio::test]
    async fn a_hook_the_agent_does_not_know_fails_the_plan() {
        let (coordinator, db1, _db2) = setup_with_hooks();
        db1.add_hook("pg", &[("data_directory", "/data/pg", "/data")]);
        let set = coordinator.backup("g").await.unwrap();
        assert_eq!(set.state(), SetState::Failed);
        assert!(
            set.error
                .contains("db1: hook scripts is not configured on this agent"),
            "{}",
            set.error
        );
    }

    #[test]
    fn set_ids_start_with_the_group_and_are_safe_file_names() {
        let id = new_set_id("pg");
        assert!(id.starts_with("pg-20"), "{id}");
        assert_eq!(group_of_set(&id), "pg");
        assert_eq!(group_of_set(&new_set_id("a-b_c")), "a-b_c");
        assert!(
            id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "{id}"
        );
    }
}
