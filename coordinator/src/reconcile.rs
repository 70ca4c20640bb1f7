//! The reconciler: removes what failed and deleted sets left on their member hosts.
//!
//! One mechanism for every leftover. A failed set whose member did not answer (a network cut,
//! an agent killed or stopped), a set recovered after a coordinator restart, and a set an
//! operator (or retention) deletes all hand their leftovers to the catalog's
//! `pending_removals`: one row per (set, agent), written before anything is attempted, so a
//! restarted coordinator goes on with it. Each attempt is one bounded call (a thaw first when
//! the member never confirmed its thaw, then the provider's removal). An attempt that does not
//! remove everything is retried with backoff (1 s, doubling, at most [`BACKOFF_MAX`]) until the
//! agent answers; a set whose deletion was requested is forgotten with its last removal.
//!
//! A member with removals pending stays usable: nothing here is consulted when a set is
//! planned. What is pending is shown by `sets show`, `groups`, `agents` and the metric
//! `quiesce_pending_removals{agent}`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use quiesce_proto::agent::v1 as agent_pb;
use quiesce_proto::coordinator::v1::{self as pb, SnapshotSet, ThawEvidence};
use quiesce_proto::states::StateText;
use tracing::{Instrument, info, info_span, warn};

use crate::agent_client::AgentClient;
use crate::catalog::{Catalog, Pending};
use crate::error::{Error, agent_error};
use crate::provider::SnapshotProvider;
use crate::workflow::{Coordinator, freeze_end_text};

/// How often due removals are looked for.
pub const TICK: Duration = Duration::from_secs(1);
/// The longest one call of an attempt (thaw, removal) may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest wait between two attempts at one removal.
pub const BACKOFF_MAX: Duration = Duration::from_secs(15);
/// At most this many characters of what could not be removed are kept per attempt.
const ERROR_CAP: usize = 1000;

/// The wait after the `attempts`-th failed attempt: 1 s, 2 s, 4 s, … up to [`BACKOFF_MAX`].
pub fn backoff(attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(16);
    Duration::from_secs(1u64 << exp).min(BACKOFF_MAX)
}

/// What an attempt needs; the workflow (inline, while its set ends), the reconciler and
/// `sets delete` all build one.
pub(crate) struct Attempt<'a> {
    pub catalog: &'a Catalog,
    /// Its records wait for every freeze window to close (no commit while a group is frozen).
    pub windows: &'a crate::windows::FreezeWindows,
    pub provider: Option<Arc<dyn SnapshotProvider>>,
    pub client: Option<Arc<dyn AgentClient>>,
    pub now_ms: u64,
}

impl Attempt<'_> {
    /// One attempt at one pending removal; its outcome is recorded in the catalog (removal done,
    /// or retry later). Returns what the host reported (`error` set when it did not finish).
    pub async fn run(&self, pending: &Pending) -> Result<pb::HostRemoval, Error> {
        let set_id = pending.status.set_id.as_str();
        let agent = pending.status.agent.as_str();
        let mut report = pb::HostRemoval {
            agent: agent.to_owned(),
            ..Default::default()
        };
        let outcome = self.call(pending, &mut report).await;
        self.windows.closed("a leftover removal's record").await;
        match outcome {
            Ok(()) if report.not_removed.is_empty() => {
                let forgotten = self.catalog.removal_done(set_id, agent)?;
                info!(
                    set_id,
                    agent,
                    removed = report.removed.len(),
                    forgotten,
                    "leftovers removed"
                );
            }
            outcome => {
                let error = match outcome {
                    Err(e) => e,
                    Ok(()) => {
                        let mut listed: Vec<String> = report
                            .not_removed
                            .iter()
                            .map(|n| format!("{}: {}", n.path, n.error))
                            .collect();
                        listed.sort();
                        cap(&format!(
                            "{agent}: {} not removed: {}",
                            report.not_removed.len(),
                            listed.join("; ")
                        ))
                    }
                };
                let attempts = pending.status.attempts + 1;
                let next = self.now_ms + backoff(attempts).as_millis() as u64;
                self.catalog
                    .removal_retry(set_id, agent, self.now_ms, next, &error)?;
                warn!(set_id, agent, attempts, error = %error, "leftovers not removed yet; retried later");
                report.error = error;
            }
        }
        Ok(report)
    }

    async fn call(&self, pending: &Pending, report: &mut pb::HostRemoval) -> Result<(), String> {
        let set_id = pending.status.set_id.as_str();
        let agent = pending.status.agent.as_str();
        let Some(provider) = &self.provider else {
            return Err(format!(
                "{agent}: the set's group is no longer configured, so its provider is unknown"
            ));
        };
        let Some(client) = &self.client else {
            return Err(format!("{agent}: no longer configured"));
        };
        // A thaw first when the member never confirmed one. A provider that removes without
        // the agent (EBS) removes whatever the thaw answered; one that removes through the agent
        // (reflink) waits for the thaw. Either way the row stays until the thaw is confirmed.
        let thaw_error = if pending.status.thaw_unconfirmed {
            let req = agent_pb::ThawVolumesRequest {
                set_id: set_id.to_owned(),
            };
            match tokio::time::timeout(CALL_TIMEOUT, client.thaw_volumes(req)).await {
                Ok(Ok(thawed)) => {
                    self.windows.closed("a late thaw report").await;
                    record_late_thaw(self.catalog, set_id, agent, &thawed)
                        .map_err(|e| format!("{agent}: recording its thaw report: {e}"))?;
                    self.catalog
                        .removal_thaw_confirmed(set_id, agent)
                        .map_err(|e| format!("{agent}: {e}"))?;
                    None
                }
                Ok(Err(status)) => Some(format!("thaw: {}", agent_error(agent, &status))),
                Err(_) => Some(format!(
                    "{agent}: no answer to the thaw within {}",
                    humantime::format_duration(CALL_TIMEOUT)
                )),
            }
        } else {
            None
        };
        if let Some(thaw) = &thaw_error
            && provider.name() == "reflink"
        {
            return Err(thaw.clone());
        }
        let removal = provider.remove(set_id, agent, client.as_ref(), &pending.snapshot_ids);
        let removed = match tokio::time::timeout(CALL_TIMEOUT, removal).await {
            Ok(Ok(removed)) => {
                report.deleted = removed.deleted;
                report.removed = removed.removed;
                report.not_removed = removed
                    .not_removed
                    .into_iter()
                    .map(|(path, error)| pb::NotRemoved { path, error })
                    .collect();
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!(
                "{agent}: no answer to the removal within {}",
                humantime::format_duration(CALL_TIMEOUT)
            )),
        };
        match (thaw_error, removed) {
            (None, removed) => removed,
            (Some(thaw), Ok(())) => Err(thaw),
            (Some(thaw), Err(e)) => Err(format!("{thaw}; removal: {e}")),
        }
    }
}

/// The agent's own report of how the freeze of a set decided without it ended, recorded with
/// the set: what really thawed it and how long its writers were blocked. A report of an agent
/// that knows nothing of the set (it restarted and had no record) changes nothing.
fn record_late_thaw(
    catalog: &Catalog,
    set_id: &str,
    agent: &str,
    thawed: &agent_pb::ThawVolumesResponse,
) -> Result<(), Error> {
    let end = thawed.end();
    if end == agent_pb::FreezeEnd::UnknownSet && thawed.write_stall_ms == 0 {
        return Ok(());
    }
    let Some(set) = catalog.get(set_id)? else {
        return Ok(());
    };
    let Some(mut host) = set.hosts.into_iter().find(|h| h.agent == agent) else {
        return Ok(());
    };
    if host.thaw_evidence == ThawEvidence::Answered as i32 {
        return Ok(());
    }
    host.set_freeze_end(end);
    host.held_continuously = false;
    host.thawed_at_ms = thawed.thawed_at_ms;
    host.write_stall_ms = crate::workflow::agent_stall_ms(thawed, &host);
    host.resume_ms = thawed.resume_ms;
    if host.freeze_started_at_ms == 0 {
        host.freeze_started_at_ms = thawed.freeze_started_at_ms;
        host.frozen_at_ms = thawed.frozen_at_ms;
    }
    host.thaw_evidence = ThawEvidence::AnsweredLate as i32;
    host.error = cap(&format!(
        "{}; its agent reported later: {}, writers blocked {} ms",
        host.error,
        freeze_end_text(end),
        host.write_stall_ms
    ));
    catalog.update_host_report(set_id, &host)?;
    info!(
        set_id,
        agent,
        end = host.freeze_end().text(),
        write_stall_ms = host.write_stall_ms,
        "late thaw report recorded"
    );
    Ok(())
}

fn cap(text: &str) -> String {
    if text.len() <= ERROR_CAP {
        return text.to_owned();
    }
    let mut end = ERROR_CAP;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes in all)", &text[..end], text.len())
}

impl Coordinator {
    fn attempt_for(&self, set: Option<&SnapshotSet>, agent: &str) -> Attempt<'_> {
        Attempt {
            catalog: self.catalog(),
            windows: self.windows(),
            provider: set
                .and_then(|s| self.config().group(&s.group))
                .map(|g| self.provider(g)),
            client: self.agents().client(agent),
            now_ms: self.clock().now_ms(),
        }
    }

    /// One attempt at every given pending removal, in parallel. Removals another attempt is
    /// working on are skipped (reported with that error).
    pub(crate) async fn attempt_removals(&self, pendings: &[Pending]) -> Vec<pb::HostRemoval> {
        let calls = pendings.iter().map(|pending| async move {
            let key = (pending.status.set_id.clone(), pending.status.agent.clone());
            if !self
                .removals_in_flight()
                .lock()
                .unwrap()
                .insert(key.clone())
            {
                return pb::HostRemoval {
                    agent: key.1,
                    error: "another removal attempt is in progress".into(),
                    ..Default::default()
                };
            }
            let set = self.catalog().get(&key.0).ok().flatten();
            let attempt = self.attempt_for(set.as_ref(), &key.1);
            let span = info_span!("reconcile", set_id = %key.0, agent = %key.1);
            let report = match attempt.run(pending).instrument(span).await {
                Ok(report) => report,
                Err(e) => pb::HostRemoval {
                    agent: key.1.clone(),
                    error: crate::error::error_chain(&e),
                    ..Default::default()
                },
            };
            self.removals_in_flight().lock().unwrap().remove(&key);
            report
        });
        join_all(calls).await
    }

    /// Waits until no attempt works on a removal of `set_id`.
    pub(crate) async fn removals_idle(&self, set_id: &str) {
        while self
            .removals_in_flight()
            .lock()
            .unwrap()
            .iter()
            .any(|(set, _)| set == set_id)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One pass: every removal that is due. Returns how many were attempted.
    pub async fn reconcile_due(&self) -> usize {
        let due = match self.catalog().due_removals(self.clock().now_ms()) {
            Ok(due) => due,
            Err(e) => {
                warn!(error = %crate::error::error_chain(&e), "reconciler cannot read the catalog");
                return 0;
            }
        };
        if due.is_empty() {
            return 0;
        }
        self.attempt_removals(&due).await;
        due.len()
    }

    /// Runs the reconciler until `stop` completes.
    pub async fn run_reconciler(self: Arc<Self>, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tick.tick() => {}
            }
            self.reconcile_due().await;
        }
    }

    /// Pending removals, optionally only of one agent (`agents`) or of one group's sets.
    pub fn pending_removals_where(
        &self,
        agent: Option<&str>,
        group: Option<&str>,
    ) -> Result<Vec<pb::PendingRemoval>, Error> {
        Ok(self
            .catalog()
            .pending_removals("")?
            .into_iter()
            .map(|p| p.status)
            .filter(|p| agent.is_none_or(|a| p.agent == a))
            .filter(|p| group.is_none_or(|g| crate::workflow::group_of_set(&p.set_id) == g))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_up_to_its_cap() {
        let waits: Vec<u64> = (1..=7).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 15, 15, 15]);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }

    #[test]
    fn long_errors_are_capped_on_a_char_boundary() {
        let long = "é".repeat(2000);
        let capped = cap(&long);
        assert!(capped.len() < 1100, "{}", capped.len());
        assert!(capped.ends_with("(4000 bytes in all)"), "{capped}");
    }
}
