//! After commit: providers whose snapshots finish in the background (EBS) are polled until
//! every snapshot is `completed`, or one is in `error`, which turns the set `failed`.

use std::sync::Arc;

use quiesce_proto::coordinator::v1::{Completion, SetState};
use quiesce_proto::states::StateText;
use tracing::{Instrument, info, info_span, warn};

use crate::error::Error;
use crate::workflow::Coordinator;

impl Coordinator {
    /// Tracks a committed set's completion in the background, if its provider needs it.
    pub fn spawn_completion_tracking(self: &Arc<Self>, set_id: &str) {
        let Some(poll) = self.completion_poll_of(set_id) else {
            return;
        };
        let coordinator = self.clone();
        let id = set_id.to_owned();
        let span = info_span!("completion", set_id = %id);
        tokio::spawn(
            async move {
                loop {
                    match coordinator.poll_completion(&id).await {
                        Ok(Some(end)) => {
                            info!(completion = %end, "snapshots finished");
                            break;
                        }
                        Ok(None) => {}
                        Err(e) => {
                            warn!(error = %e, "completion tracking stopped");
                            break;
                        }
                    }
                    tokio::time::sleep(poll).await;
                }
            }
            .instrument(span),
        );
    }

    /// After a restart: tracks every committed set still completing.
    pub fn resume_completion_tracking(self: &Arc<Self>) -> Result<usize, Error> {
        let ids = self.catalog().completion_pending()?;
        for id in &ids {
            self.spawn_completion_tracking(id);
        }
        Ok(ids.len())
    }

    fn completion_poll_of(&self, set_id: &str) -> Option<std::time::Duration> {
        let set = self.catalog().get(set_id).ok()??;
        if set.completion() != Completion::Pending {
            return None;
        }
        let group = self.config().group(&set.group)?;
        self.provider(group).completion_poll()
    }

    /// One poll: records each snapshot's progress. `Some(completion)` once the set is done
    /// (`completed`, or `error` with the set failed); `None` while snapshots are pending.
    pub async fn poll_completion(&self, set_id: &str) -> Result<Option<Completion>, Error> {
        let set = self
            .catalog()
            .get(set_id)?
            .ok_or_else(|| Error::UnknownSet { id: set_id.into() })?;
        if set.state() != SetState::Consistent || set.completion() != Completion::Pending {
            return Ok(Some(set.completion()));
        }
        let group = self.group(&set.group)?;
        let provider = self.provider(group);
        let progress = match provider.progress(&set).await {
            Ok(progress) => progress,
            Err(e) => {
                warn!(error = %e, "cannot read snapshot progress; will try again");
                return Ok(None);
            }
        };
        // Read while any group may be frozen; recorded once none is.
        self.windows().closed("snapshot progress").await;
        let mut errors = Vec::new();
        let mut pending = 0;
        for p in &progress {
            self.catalog().update_volume_progress(
                set_id,
                &p.agent,
                &p.mount_point,
                &p.state,
                p.progress,
            )?;
            // The volume's snapshot state has the completion's vocabulary; anything else is
            // still pending.
            match Completion::from_text(&p.state) {
                Ok(Completion::Completed) => {}
                Ok(Completion::Error) => errors.push(format!(
                    "{}:{} snapshot {} ended in error{}",
                    p.agent,
                    p.mount_point,
                    p.snapshot_id,
                    if p.message.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", p.message)
                    }
                )),
                Ok(Completion::Pending | Completion::Unspecified) | Err(_) => pending += 1,
            }
        }
        if !errors.is_empty() {
            let reason = format!(
                "{}; the set is not restorable (delete it with `quiescectl sets delete {set_id}`)",
                errors.join("; ")
            );
            warn!(%reason, "snapshot in error");
            self.catalog().fail_completion(set_id, &reason)?;
            return Ok(Some(Completion::Error));
        }
        if pending == 0 {
            self.catalog()
                .set_completion(set_id, Completion::Completed)?;
            return Ok(Some(Completion::Completed));
        }
        Ok(None)
    }
}
