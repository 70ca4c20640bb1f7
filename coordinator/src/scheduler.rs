//! Schedules and retention, run by the coordinator itself.
//!
//! Every group with a `[group.schedule]` gets sets started at its cron times (UTC). Policy:
//!
//! * **No overlap.** A run that comes due while a set of the group is still running is
//!   skipped (logged and counted), not queued; the next run is the next cron time.
//! * **Missed runs after downtime.** At start, the next run is computed from the last set the
//!   scheduler started (from the catalog). If that time has already passed, one set is started
//!   at once — one, however many runs were missed, never a burst — and the schedule carries on
//!   from the next cron time after now.
//! * **Overdue.** A group is overdue when its last consistent set is older than
//!   `overdue-after` (default: twice the interval between its next two runs), or when it has
//!   none and the scheduler has been running it for longer than that.
//! * **Retention** runs at each tick, before due sets are started, for each group with a `[group.retention]` and no set
//!   running: expired sets (see `retention`) are deleted through their provider
//!   (`Coordinator::delete_set`); a deletion that fails is retried at the next tick.
//! * **Restore drills.** Every group with a `[group.verify]` gets a drill (as `quiescectl
//!   verify`) of its newest consistent set that no drill has passed or failed yet, at its cron
//!   times, on the host it names; audited as `verify_set` under the identity `scheduler`,
//!   recorded with the set and counted like a manual one. At most one drill per group runs: one
//!   due while the last still runs is skipped. A drill missed while the coordinator was down
//!   is not caught up (the next cron time runs). Drills work on scratch copies, so they run
//!   while a set of the group is frozen; their record waits until no group is frozen.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use croner::Cron;
use tracing::{Instrument, info, info_span, warn};

use quiesce_proto::coordinator::v1 as pb;

use crate::audit::Entry;
use crate::config::GroupConfig;
use crate::error::Error;
use crate::retention;
use crate::workflow::Coordinator;

/// The scheduler's state for one group.
#[derive(Debug, Clone)]
pub struct GroupSchedule {
    pub cron: Cron,
    /// When the next set is due (coordinator clock, ms).
    pub next_due_ms: u64,
    /// When the scheduler took the group on.
    pub since_ms: u64,
    pub skipped: u64,
}

/// The drill schedule of one group (`[group.verify]`).
#[derive(Debug, Clone)]
pub struct DrillSchedule {
    pub cron: Cron,
    pub next_due_ms: u64,
    /// A drill of the group runs now.
    pub running: Arc<std::sync::atomic::AtomicBool>,
    pub skipped: u64,
}

/// Marks a group's drill as running until dropped (on every path, a panic too).
struct DrillRunning(Arc<std::sync::atomic::AtomicBool>);

impl Drop for DrillRunning {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A group's schedule status, as `quiescectl groups` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScheduleStatus {
    pub next_run_at_ms: u64,
    pub overdue: bool,
}

pub fn parse_cron(expr: &str) -> Result<Cron, String> {
    Cron::from_str(expr).map_err(|e| e.to_string())
}

/// The first cron time strictly after `after_ms`.
pub fn next_after(cron: &Cron, after_ms: u64) -> Option<u64> {
    let after: DateTime<Utc> = DateTime::from_timestamp_millis(after_ms as i64)?;
    cron.find_next_occurrence(&after, false)
        .ok()
        .map(|t| t.timestamp_millis() as u64)
}

fn overdue_after(group: &GroupConfig, cron: &Cron, now_ms: u64) -> Duration {
    if let Some(after) = group.schedule.as_ref().and_then(|s| s.overdue_after) {
        return after;
    }
    let first = next_after(cron, now_ms).unwrap_or(now_ms);
    let second = next_after(cron, first).unwrap_or(first);
    Duration::from_millis(2 * second.saturating_sub(first))
}

impl Coordinator {
    /// Takes on every scheduled group: computes its next run from the catalog, so a run
    /// missed while the coordinator was down is due at once (once).
    pub fn start_schedules(&self) -> Result<(), Error> {
        let now = self.clock().now_ms();
        let mut schedules = self.schedules.lock().unwrap();
        schedules.clear();
        for group in &self.config().groups {
            let Some(schedule) = &group.schedule else {
                continue;
            };
            let cron = match parse_cron(&schedule.cron) {
                Ok(cron) => cron,
                Err(e) => {
                    warn!(group = %group.name, error = %e, "schedule ignored");
                    continue;
                }
            };
            let last = self.catalog().last_scheduled(&group.name)?;
            let next_due_ms = match &last {
                Some((_, at)) => next_after(&cron, *at).unwrap_or(u64::MAX),
                None => next_after(&cron, now).unwrap_or(u64::MAX),
            };
            if next_due_ms <= now {
                info!(group = %group.name, missed_since_ms = next_due_ms, "a scheduled run was missed while the coordinator was down: running once now");
            }
            schedules.insert(
                group.name.clone(),
                GroupSchedule {
                    cron,
                    next_due_ms,
                    since_ms: now,
                    skipped: 0,
                },
            );
        }
        drop(schedules);
        let mut drills = self.drills.lock().unwrap();
        drills.clear();
        for group in &self.config().groups {
            let Some(verify) = &group.verify else {
                continue;
            };
            match parse_cron(&verify.cron) {
                Ok(cron) => {
                    let next_due_ms = next_after(&cron, now).unwrap_or(u64::MAX);
                    drills.insert(
                        group.name.clone(),
                        DrillSchedule {
                            cron,
                            next_due_ms,
                            running: Default::default(),
                            skipped: 0,
                        },
                    );
                }
                Err(e) => warn!(group = %group.name, error = %e, "verify schedule ignored"),
            }
        }
        Ok(())
    }

    /// Starts the restore drills that are due, each on a task of its own: (set id, task).
    pub fn drill_tick(self: &Arc<Self>) -> Vec<(String, tokio::task::JoinHandle<()>)> {
        use std::sync::atomic::Ordering;
        let now = self.clock().now_ms();
        let mut due = Vec::new();
        {
            let mut drills = self.drills.lock().unwrap();
            for (group, drill) in drills.iter_mut() {
                if drill.next_due_ms > now {
                    continue;
                }
                drill.next_due_ms = next_after(&drill.cron, now).unwrap_or(u64::MAX);
                if drill.running.load(Ordering::SeqCst) {
                    drill.skipped += 1;
                    warn!(%group, "scheduled drill skipped: the group's last drill still runs");
                    continue;
                }
                due.push((group.clone(), drill.running.clone()));
            }
        }
        due.sort_by(|a, b| a.0.cmp(&b.0));
        let mut started = Vec::new();
        for (group, running) in due {
            let Some(verify) = self.group(&group).ok().and_then(|g| g.verify.clone()) else {
                continue;
            };
            let set_id = match self.catalog().newest_undrilled(&group) {
                Ok(Some(id)) => id,
                Ok(None) => {
                    info!(%group, "scheduled drill: no consistent set without a drill");
                    continue;
                }
                Err(e) => {
                    warn!(%group, error = %e, "scheduled drill: cannot read the catalog");
                    continue;
                }
            };
            running.store(true, Ordering::SeqCst);
            let running = DrillRunning(running);
            let coordinator = self.clone();
            let id = set_id.clone();
            let span = info_span!("drill", set_id = %id, %group);
            let task = tokio::spawn(
                async move {
                    let req = pb::VerifySetRequest {
                        set_id: id.clone(),
                        host: verify.host.clone().unwrap_or_default(),
                        scratch_dir: verify.scratch_dir.clone().unwrap_or_default(),
                    };
                    let result = coordinator.verify_set(&req).await;
                    let (outcome, message) = match &result {
                        Ok(v) if v.outcome() == pb::VerifyOutcome::Passed => {
                            (pb::AuditOutcome::Ok, "scheduled drill passed".to_owned())
                        }
                        Ok(v) => {
                            let failing: Vec<String> = v
                                .checks
                                .iter()
                                .filter(|c| {
                                    matches!(
                                        c.outcome(),
                                        pb::VerifyOutcome::Failed | pb::VerifyOutcome::Error
                                    )
                                })
                                .map(|c| format!("{}: {}", c.name, c.check))
                                .collect();
                            let outcome = v
                                .outcome()
                                .as_str_name()
                                .trim_start_matches("VERIFY_OUTCOME_")
                                .to_ascii_lowercase();
                            (
                                pb::AuditOutcome::Failed,
                                format!("scheduled drill {outcome}: {}", failing.join("; ")),
                            )
                        }
                        Err(e) => (
                            pb::AuditOutcome::Failed,
                            format!(
                                "scheduled drill could not run: {}",
                                crate::error::error_chain(e)
                            ),
                        ),
                    };
                    match &result {
                        Ok(v) => info!(outcome = ?v.outcome(), "scheduled drill done"),
                        Err(e) => warn!(error = %e, "scheduled drill could not run"),
                    }
                    coordinator.audit().record(Entry::scheduler(
                        coordinator.clock().now_ms(),
                        pb::AuditVerb::VerifySet,
                        &group,
                        &id,
                        outcome,
                        message,
                    ));
                    drop(running);
                }
                .instrument(span),
            );
            started.push((set_id, task));
        }
        started
    }

    /// One pass: apply retention (while no set of the group runs), then start the sets that
    /// are due. Returns the ids started.
    pub async fn schedule_tick(self: &Arc<Self>) -> Vec<String> {
        let now = self.clock().now_ms();
        self.apply_retention(now).await;
        let running: Vec<String> = match self.catalog().running() {
            Ok(sets) => sets.into_iter().map(|s| s.group).collect(),
            Err(e) => {
                warn!(error = %e, "scheduler cannot read the catalog");
                return Vec::new();
            }
        };
        let mut due = Vec::new();
        {
            let mut schedules = self.schedules.lock().unwrap();
            for (group, schedule) in schedules.iter_mut() {
                if schedule.next_due_ms > now {
                    continue;
                }
                schedule.next_due_ms = next_after(&schedule.cron, now).unwrap_or(u64::MAX);
                if running.contains(group) {
                    schedule.skipped += 1;
                    warn!(%group, "scheduled run skipped: a set of the group is still running");
                    continue;
                }
                due.push(group.clone());
            }
        }
        due.sort();
        // Drills run on tasks of their own (they take minutes).
        drop(self.drill_tick());
        let mut started = Vec::new();
        for group in due {
            self.windows().closed("a scheduled set's record").await;
            let now = self.clock().now_ms();
            match self.start_set_with(&group, "schedule") {
                Ok(id) => {
                    info!(%group, set_id = %id, "scheduled set started");
                    self.audit().record(Entry::scheduler(
                        now,
                        pb::AuditVerb::ScheduledBackup,
                        &group,
                        &id,
                        pb::AuditOutcome::Ok,
                        "scheduled set started".into(),
                    ));
                    started.push(id);
                }
                Err(e) => {
                    warn!(%group, error = %e, "scheduled set not started");
                    self.audit().record(Entry::scheduler(
                        now,
                        pb::AuditVerb::ScheduledBackup,
                        &group,
                        "",
                        pb::AuditOutcome::Failed,
                        format!("scheduled set not started: {e}"),
                    ));
                }
            }
        }
        started
    }

    /// Deletes the expired sets of every group with a retention policy and no set running.
    pub async fn apply_retention(&self, now_ms: u64) -> Vec<String> {
        let mut deleted = Vec::new();
        for group in &self.config().groups {
            let Some(policy) = &group.retention else {
                continue;
            };
            let busy = self
                .catalog()
                .running()
                .map(|sets| sets.iter().any(|s| s.group == group.name))
                .unwrap_or(true);
            if busy {
                continue;
            }
            let finished = match self.catalog().finished(&group.name) {
                Ok(finished) => finished,
                Err(e) => {
                    warn!(group = %group.name, error = %e, "retention cannot read the catalog");
                    continue;
                }
            };
            let audit = |id: &str, outcome, message: String| {
                self.audit().record(Entry::scheduler(
                    now_ms,
                    pb::AuditVerb::RetentionDelete,
                    &group.name,
                    id,
                    outcome,
                    message,
                ))
            };
            let verified = if policy.keep_verified {
                match self.catalog().newest_verified_set(&group.name) {
                    Ok(verified) => verified,
                    Err(e) => {
                        warn!(group = %group.name, error = %e, "retention cannot read the catalog");
                        continue;
                    }
                }
            } else {
                None
            };
            for id in retention::expired(&finished, policy, now_ms, verified.as_deref()) {
                // A locked set stays, whatever the policy says; said once per set.
                if let Ok(Some(set)) = self.catalog().get(&id)
                    && let Some(until) = self.locked_until(&set)
                {
                    if self.lock_reported().lock().unwrap().insert(id.clone()) {
                        let why = self.locked_error(&set, until).to_string();
                        info!(set_id = %id, locked_until = until, "expired set kept: it is locked");
                        audit(
                            &id,
                            pb::AuditOutcome::Denied,
                            format!("expired by retention, kept: {why}"),
                        );
                    }
                    continue;
                }
                let span = info_span!("retention", set_id = %id, group = %group.name);
                match self.delete_set(&id).instrument(span).await {
                    Ok(report) if report.forgotten => {
                        info!(set_id = %id, snapshots = report.snapshots_deleted, "expired set deleted");
                        audit(
                            &id,
                            pb::AuditOutcome::Ok,
                            format!(
                                "expired set deleted ({} snapshots)",
                                report.snapshots_deleted
                            ),
                        );
                        self.metrics().expired(&group.name);
                        deleted.push(id);
                    }
                    Ok(report) => {
                        let waiting: Vec<&str> = report
                            .hosts
                            .iter()
                            .filter(|h| !h.error.is_empty())
                            .map(|h| h.error.as_str())
                            .collect();
                        audit(
                            &id,
                            pb::AuditOutcome::Failed,
                            format!("expired set's removal pending: {}", waiting.join("; ")),
                        );
                        warn!(set_id = %id, waiting = %waiting.join("; "), "expired set's removal pending; the reconciler retries and forgets the set when done")
                    }
                    Err(e) => {
                        let chain = crate::error::error_chain(&e);
                        audit(
                            &id,
                            pb::AuditOutcome::Failed,
                            format!("expired set not deleted: {chain}"),
                        );
                        warn!(set_id = %id, error = %chain, "expired set not deleted; retried next tick")
                    }
                }
            }
        }
        if let Some(keep) = self.config().audit.keep {
            match self.audit().prune(keep, now_ms) {
                Ok(0) => {}
                Ok(n) => info!(
                    removed = n,
                    "audit records older than the audit keep removed"
                ),
                Err(e) => warn!(error = %e, "audit records not pruned; retried next tick"),
            }
        }
        deleted
    }

    pub fn schedule_status(&self, group: &GroupConfig) -> ScheduleStatus {
        let now = self.clock().now_ms();
        let schedules = self.schedules.lock().unwrap();
        let Some(schedule) = schedules.get(&group.name) else {
            return ScheduleStatus::default();
        };
        let limit = overdue_after(group, &schedule.cron, now).as_millis() as u64;
        let last = self
            .catalog()
            .last_consistent_created(&group.name)
            .ok()
            .flatten();
        let overdue = match last {
            Some(at) => now.saturating_sub(at) > limit,
            None => now.saturating_sub(schedule.since_ms) > limit,
        };
        ScheduleStatus {
            next_run_at_ms: if schedule.next_due_ms == u64::MAX {
                0
            } else {
                schedule.next_due_ms
            },
            overdue,
        }
    }

    /// Runs schedules until `shutdown`: ticks whenever a run is due, and at least every 10 s
    /// (retention, and a clock that jumped).
    pub async fn run_schedules(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        if let Err(e) = self.start_schedules() {
            warn!(error = %e, "schedules not started");
            return;
        }
        tokio::pin!(shutdown);
        loop {
            self.schedule_tick().await;
            let now = self.clock().now_ms();
            let next = self
                .schedules
                .lock()
                .unwrap()
                .values()
                .map(|s| s.next_due_ms)
                .chain(self.drills.lock().unwrap().values().map(|d| d.next_due_ms))
                .min()
                .unwrap_or(u64::MAX);
            let wait = Duration::from_millis(next.saturating_sub(now).clamp(50, 10_000));
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = &mut shutdown => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiesce_proto::coordinator::v1::SetState;
    use quiesce_proto::states::StateText;
    use std::collections::HashMap;

    use crate::agent_client::AgentClient;
    use crate::catalog::{Catalog, NewSet};
    use crate::clock::{Clock, FakeClock};
    use crate::config::Config;
    use crate::fake_agent::{FakeAgent, Phase};

    const HOUR: u64 = 3_600_000;
    /// 2026-11-02T10:30:00Z.
    const T1030: u64 = 1_793_577_600_000 + 10 * HOUR + HOUR / 2;

    fn setup(extra: &str) -> (Arc<Coordinator>, FakeAgent, FakeClock) {
        let config = format!(
            r#"
listen = "127.0.0.1:1"
catalog = ":memory:"
[[agent]]
name = "db1"
endpoint = "https://127.0.0.1:2"
[[group]]
name = "g"
provider = "reflink"
phase-timeout = "1s"
[group.schedule]
cron = "0 * * * *"
{extra}
[[group.member]]
agent = "db1"
mounts = ["/data"]
"#
        );
        let config = Config::parse(&config).unwrap();
        assert_eq!(config.problems(true), Vec::<String>::new());
        let db1 = FakeAgent::new("db1", &["/data"]);
        let mut agents: HashMap<String, Arc<dyn AgentClient>> = HashMap::new();
        agents.insert("db1".into(), Arc::new(db1.clone()));
        let clock = FakeClock::at(T1030);
        let coordinator = Coordinator::with_clock(
            Arc::new(config),
            Arc::new(Catalog::in_memory().unwrap()),
            Arc::new(agents),
            Arc::new(clock.clone()),
        );
        (coordinator, db1, clock)
    }

    async fn tick_and_wait(coordinator: &Arc<Coordinator>) -> Vec<String> {
        let started = coordinator.schedule_tick().await;
        for id in &started {
            coordinator.wait(id).await;
        }
        started
    }

    #[tokio::test]
    async fn a_scheduled_group_gets_one_set_per_cron_time_and_none_in_between() {
        let (coordinator, _db1, clock) = setup("");
        coordinator.start_schedules().unwrap();
        let group = coordinator.group("g").unwrap().clone();
        assert_eq!(
            coordinator.schedule_status(&group).next_run_at_ms,
            T1030 + HOUR / 2
        );
        assert!(
            tick_and_wait(&coordinator).await.is_empty(),
            "not due at 10:30"
        );
        clock.set(T1030 + HOUR / 2 - 1);
        assert!(
            tick_and_wait(&coordinator).await.is_empty(),
            "not due at 10:59:59.999"
        );
        clock.set(T1030 + HOUR / 2);
        let started = tick_and_wait(&coordinator).await;
        assert_eq!(started.len(), 1);
        let set = coordinator.catalog().get(&started[0]).unwrap().unwrap();
        assert_eq!(
            (set.state().text(), set.trigger.as_str()),
            ("consistent", "schedule")
        );
        assert_eq!(set.created_at_ms, T1030 + HOUR / 2);
        assert!(
            tick_and_wait(&coordinator).await.is_empty(),
            "11:00 ran once"
        );
        assert_eq!(
            coordinator.schedule_status(&group).next_run_at_ms,
            T1030 + 3 * HOUR / 2
        );
    }

    #[tokio::test]
    async fn runs_missed_while_down_are_caught_up_once_not_in_a_burst() {
        let (coordinator, _db1, clock) = setup("");
        // The last scheduled set started at 07:00; the coordinator comes back at 10:30.
        coordinator
            .catalog()
            .create_set(&NewSet {
                id: "g-old",
                group: "g",
                provider: "reflink",
                created_at_ms: T1030 - 3 * HOUR - HOUR / 2,
                volumes: vec![("db1".into(), "/data".into())],
                trigger: "schedule",
                freeze_budget_ms: 1,
            })
            .unwrap();
        coordinator
            .catalog()
            .finish("g-old", SetState::Consistent, "", 1, 1, 1)
            .unwrap();
        coordinator.start_schedules().unwrap();
        assert_eq!(
            tick_and_wait(&coordinator).await.len(),
            1,
            "one catch-up run"
        );
        assert!(tick_and_wait(&coordinator).await.is_empty(), "not three");
        clock.set(T1030 + HOUR / 2);
        assert_eq!(
            tick_and_wait(&coordinator).await.len(),
            1,
            "then on schedule"
        );
    }

    #[tokio::test]
    async fn a_run_due_while_the_previous_set_still_runs_is_skipped_not_queued() {
        let (coordinator, db1, clock) = setup("");
        db1.delay(Phase::Prepare, Duration::from_millis(300));
        coordinator.start_schedules().unwrap();
        clock.set(T1030 + HOUR / 2);
        let first = coordinator.schedule_tick().await;
        assert_eq!(first.len(), 1);
        clock.set(T1030 + 3 * HOUR / 2);
        assert!(
            coordinator.schedule_tick().await.is_empty(),
            "skipped: overlap"
        );
        assert_eq!(coordinator.schedules.lock().unwrap()["g"].skipped, 1);
        coordinator.wait(&first[0]).await;
        assert!(
            coordinator.schedule_tick().await.is_empty(),
            "and not run late"
        );
        assert_eq!(coordinator.catalog().list("g", 0).unwrap().len(), 1);
    }

    #[tokio::test]
    async fn retention_deletes_expired_sets_through_their_provider() {
        let (coordinator, db1, clock) = setup("[group.retention]\nkeep-last = 2");
        coordinator.start_schedules().unwrap();
        let mut ids = Vec::new();
        for hour in 0..4 {
            clock.set(T1030 + HOUR / 2 + hour * HOUR);
            ids.extend(tick_and_wait(&coordinator).await);
        }
        assert_eq!(ids.len(), 4);
        // Retention runs at each tick before the sets it starts: the last tick's set is
        // counted at the next one.
        coordinator.apply_retention(clock.now_ms()).await;
        let left: Vec<String> = coordinator
            .catalog()
            .list("g", 0)
            .unwrap()
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(left, [ids[3].clone(), ids[2].clone()]);
        let live = db1.live_snapshots();
        assert_eq!(live.len(), 2, "{live:?}");
        assert!(
            live.iter()
                .all(|s| s.contains(&ids[2]) || s.contains(&ids[3]))
        );
    }

    #[tokio::test]
    async fn retention_keeps_a_locked_set_says_so_once_and_the_scheduler_is_audited() {
        let (coordinator, _db1, clock) = setup("[group.retention]\nkeep-last = 1");
        coordinator.start_schedules().unwrap();
        let mut ids = Vec::new();
        clock.set(T1030 + HOUR / 2);
        ids.extend(tick_and_wait(&coordinator).await);
        // The first set is locked for a day (as `lock-for` does at its creation).
        coordinator
            .catalog()
            .lock(&ids[0], clock.now_ms() + 24 * HOUR)
            .unwrap();
        for hour in 1..3 {
            clock.set(T1030 + HOUR / 2 + hour * HOUR);
            ids.extend(tick_and_wait(&coordinator).await);
        }
        assert_eq!(ids.len(), 3);
        coordinator.apply_retention(clock.now_ms()).await;
        let left: Vec<String> = coordinator
            .catalog()
            .list("g", 0)
            .unwrap()
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(
            left,
            [ids[2].clone(), ids[0].clone()],
            "the locked set stays"
        );

        coordinator.audit().flush().await;
        let records = coordinator.audit().list(0, 0, |_| true).unwrap();
        let scheduled: Vec<&str> = records
            .iter()
            .filter(|r| r.verb == pb::AuditVerb::ScheduledBackup as i32)
            .inspect(|r| assert_eq!(r.identity, "scheduler"))
            .map(|r| r.set_id.as_str())
            .collect();
        assert_eq!(scheduled, [&ids[0], &ids[1], &ids[2]]);
        let retention: Vec<(&str, i32, &str)> = records
            .iter()
            .filter(|r| r.verb == pb::AuditVerb::RetentionDelete as i32)
            .map(|r| (r.set_id.as_str(), r.outcome, r.message.as_str()))
            .collect();
        assert_eq!(retention.len(), 2, "{retention:?}");
        assert_eq!(retention[0].0, ids[0]);
        assert_eq!(retention[0].1, pb::AuditOutcome::Denied as i32);
        assert!(retention[0].2.contains("locked until"), "{retention:?}");
        assert_eq!(retention[1].0, ids[1]);
        assert_eq!(retention[1].1, pb::AuditOutcome::Ok as i32);
        assert!(coordinator.audit().verify().unwrap().intact);
    }

    #[tokio::test]
    async fn scheduled_drills_verify_the_newest_undrilled_set_audited_as_the_scheduler() {
        let (coordinator, db1, clock) = setup("[group.verify]\ncron = \"30 * * * *\"");
        coordinator.start_schedules().unwrap();
        // 10:30 itself is not due (the next cron time after start is 11:30); no set yet.
        assert!(coordinator.drill_tick().is_empty());
        clock.set(T1030 + HOUR / 2);
        let a = tick_and_wait(&coordinator).await;
        assert_eq!(a.len(), 1);
        assert!(coordinator.drill_tick().is_empty(), "11:00: no drill due");
        clock.set(T1030 + HOUR);
        let drills = coordinator.drill_tick();
        assert_eq!(
            drills.iter().map(|d| d.0.clone()).collect::<Vec<_>>(),
            a,
            "11:30 drills the new set"
        );
        for (_, task) in drills {
            task.await.unwrap();
        }
        assert!(coordinator.drill_tick().is_empty(), "once per cron time");
        let recorded = coordinator.catalog().get(&a[0]).unwrap().unwrap();
        assert_eq!(recorded.verifications.len(), 1);
        assert_eq!(
            recorded.verifications[0].outcome(),
            pb::VerifyOutcome::Passed
        );
        assert_eq!(recorded.verifications[0].agent, "db1");

        // 12:00 takes set B; its drill at 12:30 fails; a freeze window (a set frozen)
        // keeps the record off the catalog until the thaw (its freeze window).
        clock.set(T1030 + 3 * HOUR / 2);
        let b = tick_and_wait(&coordinator).await;
        db1.verify_outcome(quiesce_proto::agent::v1::VerifyOutcome::Failed);
        clock.set(T1030 + 2 * HOUR);
        let hold = coordinator.windows().open();
        let drills = coordinator.drill_tick();
        assert_eq!(drills.len(), 1);
        assert_eq!(drills[0].0, b[0]);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(db1.verified(), [a[0].clone(), b[0].clone()]);
        assert!(
            coordinator
                .catalog()
                .get(&b[0])
                .unwrap()
                .unwrap()
                .verifications
                .is_empty(),
            "recorded while a group is frozen"
        );
        drop(hold);
        for (_, task) in drills {
            task.await.unwrap();
        }
        let recorded = coordinator.catalog().get(&b[0]).unwrap().unwrap();
        assert_eq!(
            recorded.verifications[0].outcome(),
            pb::VerifyOutcome::Failed
        );
        // Every consistent set has a drill that passed or failed: nothing to do at 13:30.
        clock.set(T1030 + 3 * HOUR);
        assert!(coordinator.drill_tick().is_empty());

        coordinator.audit().flush().await;
        let records = coordinator.audit().list(0, 0, |_| true).unwrap();
        let drills: Vec<(&str, &str, i32, &str)> = records
            .iter()
            .filter(|r| r.verb == pb::AuditVerb::VerifySet as i32)
            .map(|r| {
                (
                    r.identity.as_str(),
                    r.set_id.as_str(),
                    r.outcome,
                    r.message.as_str(),
                )
            })
            .collect();
        assert_eq!(drills.len(), 2, "{drills:?}");
        assert_eq!(
            drills[0],
            (
                "scheduler",
                a[0].as_str(),
                pb::AuditOutcome::Ok as i32,
                "scheduled drill passed"
            )
        );
        assert_eq!(drills[1].0, "scheduler");
        assert_eq!(drills[1].2, pb::AuditOutcome::Failed as i32);
        assert_eq!(
            drills[1].3, "scheduled drill failed: /data: mount read-write (ext4)",
            "{drills:?}"
        );
        let metrics = coordinator.render_metrics();
        for line in [
            "quiesce_verifications_total{group=\"g\",result=\"ok\"} 1",
            "quiesce_verifications_total{group=\"g\",result=\"failed\"} 1",
        ] {
            assert!(metrics.contains(line), "{line} not in\n{metrics}");
        }
    }

    #[tokio::test]
    async fn a_drill_due_while_the_last_still_runs_is_skipped_and_one_that_cannot_run_is_retried() {
        let (coordinator, db1, clock) = setup("[group.verify]\ncron = \"*/10 * * * *\"");
        coordinator.start_schedules().unwrap();
        clock.set(T1030 + HOUR / 2);
        let a = tick_and_wait(&coordinator).await;
        db1.delay(Phase::Verify, Duration::from_millis(400));
        clock.set(T1030 + HOUR / 2 + 10 * 60_000);
        let first = coordinator.drill_tick();
        assert_eq!(first.len(), 1);
        clock.set(T1030 + HOUR / 2 + 20 * 60_000);
        assert!(coordinator.drill_tick().is_empty(), "skipped: overlap");
        assert_eq!(coordinator.drills.lock().unwrap()["g"].skipped, 1);
        for (_, task) in first {
            task.await.unwrap();
        }
        let set = coordinator.catalog().get(&a[0]).unwrap().unwrap();
        assert_eq!(set.verifications.len(), 1);
        db1.delay(Phase::Verify, Duration::ZERO);
        // A second set, whose drill cannot run (the agent is unreachable): recorded as an
        // error, and the set is drilled again at the next cron time.
        clock.set(T1030 + 3 * HOUR / 2);
        let b = tick_and_wait(&coordinator).await;
        db1.fail(
            Phase::Verify,
            tonic::Status::unavailable("connection refused"),
        );
        clock.set(T1030 + 3 * HOUR / 2 + 10 * 60_000);
        for (id, task) in coordinator.drill_tick() {
            assert_eq!(id, b[0]);
            task.await.unwrap();
        }
        db1.heal(Phase::Verify);
        clock.set(T1030 + 3 * HOUR / 2 + 20 * 60_000);
        let again = coordinator.drill_tick();
        assert_eq!(again.iter().map(|d| d.0.clone()).collect::<Vec<_>>(), b);
        for (_, task) in again {
            task.await.unwrap();
        }
        let outcomes: Vec<pb::VerifyOutcome> = coordinator
            .catalog()
            .get(&b[0])
            .unwrap()
            .unwrap()
            .verifications
            .iter()
            .map(|v| v.outcome())
            .collect();
        assert_eq!(
            outcomes,
            [pb::VerifyOutcome::Error, pb::VerifyOutcome::Passed]
        );
        coordinator.audit().flush().await;
        let records = coordinator.audit().list(0, 0, |_| true).unwrap();
        assert!(
            records
                .iter()
                .any(|r| r.verb == pb::AuditVerb::VerifySet as i32
                    && r.identity == "scheduler"
                    && r.message.starts_with("scheduled drill could not run: ")
                    && r.message.contains("connection refused")),
            "{records:#?}"
        );
    }

    #[tokio::test]
    async fn retention_with_keep_verified_keeps_the_newest_set_whose_drill_passed() {
        let (coordinator, db1, clock) = setup(
            "[group.retention]\nkeep-last = 1\nkeep-verified = true\n[group.verify]\ncron = \"30 * * * *\"",
        );
        coordinator.start_schedules().unwrap();
        let mut ids = Vec::new();
        clock.set(T1030 + HOUR / 2);
        ids.extend(tick_and_wait(&coordinator).await);
        clock.set(T1030 + HOUR);
        for (_, task) in coordinator.drill_tick() {
            task.await.unwrap();
        }
        // The next sets' drills fail: the first stays the newest verified.
        db1.verify_outcome(quiesce_proto::agent::v1::VerifyOutcome::Failed);
        for hour in 1..4 {
            clock.set(T1030 + HOUR / 2 + hour * HOUR);
            ids.extend(tick_and_wait(&coordinator).await);
            clock.set(T1030 + HOUR + hour * HOUR);
            for (_, task) in coordinator.drill_tick() {
                task.await.unwrap();
            }
        }
        assert_eq!(ids.len(), 4);
        coordinator.apply_retention(clock.now_ms()).await;
        let left: Vec<String> = coordinator
            .catalog()
            .list("g", 0)
            .unwrap()
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(
            left,
            [ids[3].clone(), ids[0].clone()],
            "newest and verified"
        );
    }

    #[tokio::test]
    async fn a_group_without_a_recent_consistent_set_is_overdue() {
        let (coordinator, db1, clock) = setup("");
        coordinator.start_schedules().unwrap();
        let group = coordinator.group("g").unwrap().clone();
        assert!(!coordinator.schedule_status(&group).overdue);
        db1.fail(Phase::Snapshot, tonic::Status::internal("disk full"));
        for hour in 0..3 {
            clock.set(T1030 + HOUR / 2 + hour * HOUR);
            tick_and_wait(&coordinator).await;
        }
        assert!(
            coordinator.schedule_status(&group).overdue,
            "3 failed runs, > 2 periods"
        );
        db1.heal(Phase::Snapshot);
        clock.set(T1030 + HOUR / 2 + 3 * HOUR);
        tick_and_wait(&coordinator).await;
        assert!(!coordinator.schedule_status(&group).overdue);
        assert!(
            coordinator
                .render_metrics()
                .contains("quiesce_group_overdue{group=\"g\"} 0")
        );
    }
}
