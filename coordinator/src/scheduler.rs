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
        Ok(())
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
        let mut started = Vec::new();
        for group in due {
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
            for id in retention::expired(&finished, policy, now_ms) {
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
