//! Agents' refusals in the audit log: a decorator of every agent client that records each
//! request an agent answered with a refusal (it was reached, and said no: a volume it does not
//! list, a filesystem it will not freeze, a limit) under the identity `agent <name>`.
//! Unreachable agents are not refusals: the set's error says those.

use std::sync::Arc;

use quiesce_proto::agent::v1 as pb;
use quiesce_proto::coordinator::v1 as cpb;
use tonic::{Code, Status};

use crate::agent_client::{AgentClient, AgentDirectory};
use crate::audit::{AuditLog, Entry};
use crate::clock::Clock;
use crate::workflow::group_of_set;

/// Every client of `inner`, audited. Every method of `AgentClient` is forwarded (those with a
/// default body too: a missing one would hide the real client's).
pub struct AuditedAgents {
    inner: Arc<dyn AgentDirectory>,
    audit: Arc<AuditLog>,
    clock: Arc<dyn Clock>,
}

impl AuditedAgents {
    pub fn new(
        inner: Arc<dyn AgentDirectory>,
        audit: Arc<AuditLog>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        AuditedAgents {
            inner,
            audit,
            clock,
        }
    }
}

impl AgentDirectory for AuditedAgents {
    fn client(&self, name: &str) -> Option<Arc<dyn AgentClient>> {
        let inner = self.inner.client(name)?;
        Some(Arc::new(AuditedAgent {
            name: name.to_owned(),
            inner,
            audit: self.audit.clone(),
            clock: self.clock.clone(),
        }))
    }
}

struct AuditedAgent {
    name: String,
    inner: Arc<dyn AgentClient>,
    audit: Arc<AuditLog>,
    clock: Arc<dyn Clock>,
}

/// Codes by which an agent that was reached says no.
fn is_refusal(status: &Status) -> bool {
    std::error::Error::source(status).is_none()
        && matches!(
            status.code(),
            Code::PermissionDenied
                | Code::FailedPrecondition
                | Code::InvalidArgument
                | Code::ResourceExhausted
                | Code::OutOfRange
                | Code::AlreadyExists
                | Code::Unauthenticated
        )
}

impl AuditedAgent {
    fn check<T>(&self, call: &str, set_id: &str, result: Result<T, Status>) -> Result<T, Status> {
        if let Err(status) = &result
            && is_refusal(status)
        {
            self.audit.record(Entry {
                at_ms: self.clock.now_ms(),
                identity: format!("agent {}", self.name),
                verb: cpb::AuditVerb::AgentRefusal,
                group: if set_id.is_empty() {
                    String::new()
                } else {
                    group_of_set(set_id).to_owned()
                },
                set_id: set_id.to_owned(),
                args: serde_json::json!({ "call": call }).to_string(),
                outcome: cpb::AuditOutcome::Denied,
                code: format!("{:?}", status.code()),
                message: status.message().to_owned(),
            });
        }
        result
    }
}

#[tonic::async_trait]
impl AgentClient for AuditedAgent {
    async fn get_host_info(&self) -> Result<pb::GetHostInfoResponse, Status> {
        let result = self.inner.get_host_info().await;
        self.check("GetHostInfo", "", result)
    }

    async fn prepare_volumes(
        &self,
        req: pb::PrepareVolumesRequest,
    ) -> Result<pb::PrepareVolumesResponse, Status> {
        let set_id = req.set_id.clone();
        let result = self.inner.prepare_volumes(req).await;
        self.check("PrepareVolumes", &set_id, result)
    }

    async fn freeze_volumes(
        &self,
        req: pb::FreezeVolumesRequest,
    ) -> Result<pb::FreezeVolumesResponse, Status> {
        let set_id = req.set_id.clone();
        let result = self.inner.freeze_volumes(req).await;
        self.check("FreezeVolumes", &set_id, result)
    }

    async fn renew_lease(
        &self,
        req: pb::RenewLeaseRequest,
    ) -> Result<pb::RenewLeaseResponse, Status> {
        let set_id = req.set_id.clone();
        let result = self.inner.renew_lease(req).await;
        self.check("RenewLease", &set_id, result)
    }

    async fn thaw_volumes(
        &self,
        req: pb::ThawVolumesRequest,
    ) -> Result<pb::ThawVolumesResponse, Status> {
        let set_id = req.set_id.clone();
        let result = self.inner.thaw_volumes(req).await;
        self.check("ThawVolumes", &set_id, result)
    }

    async fn create_snapshots(
        &self,
        req: pb::CreateSnapshotsRequest,
    ) -> Result<pb::CreateSnapshotsResponse, Status> {
        let set_id = req.set_id.clone();
        let result = self.inner.create_snapshots(req).await;
        self.check("CreateSnapshots", &set_id, result)
    }

    async fn delete_snapshots(
        &self,
        req: pb::DeleteSnapshotsRequest,
    ) -> Result<pb::DeleteSnapshotsResponse, Status> {
        let set_id = req.set_id.clone();
        let result = self.inner.delete_snapshots(req).await;
        self.check("DeleteSnapshots", &set_id, result)
    }

    async fn restore_snapshots(
        &self,
        req: pb::RestoreSnapshotsRequest,
    ) -> Result<pb::RestoreSnapshotsResponse, Status> {
        let set_id = req.set_id.clone();
        let result = self.inner.restore_snapshots(req).await;
        self.check("RestoreSnapshots", &set_id, result)
    }

    async fn verify_snapshots(
        &self,
        req: pb::VerifySnapshotsRequest,
    ) -> Result<pb::VerifySnapshotsResponse, Status> {
        let set_id = req.set_id.clone();
        let result = self.inner.verify_snapshots(req).await;
        self.check("VerifySnapshots", &set_id, result)
    }

    async fn describe_hooks(
        &self,
        req: pb::DescribeHooksRequest,
    ) -> Result<pb::DescribeHooksResponse, Status> {
        let result = self.inner.describe_hooks(req).await;
        self.check("DescribeHooks", "", result)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::catalog::Catalog;
    use crate::config::Config;
    use crate::fake_agent::{FakeAgent, Phase};
    use crate::workflow::Coordinator;

    #[tokio::test]
    async fn an_agents_refusal_is_recorded_under_its_name_and_an_outage_is_not() {
        let config = Config::parse(
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
[[group.member]]
agent = "db1"
mounts = ["/data"]
"#,
        )
        .unwrap();
        let db1 = FakeAgent::new("db1", &["/data"]);
        let mut agents: HashMap<String, Arc<dyn AgentClient>> = HashMap::new();
        agents.insert("db1".into(), Arc::new(db1.clone()));
        let coordinator = Coordinator::new(
            Arc::new(config),
            Arc::new(Catalog::in_memory().unwrap()),
            Arc::new(agents),
        );
        db1.fail(
            Phase::Freeze,
            Status::failed_precondition("/data is on the agent's root filesystem"),
        );
        let refused = coordinator.start_set("g").unwrap();
        coordinator.wait(&refused).await;
        db1.fail(Phase::Freeze, Status::unavailable("connection reset"));
        let unreachable = coordinator.start_set("g").unwrap();
        coordinator.wait(&unreachable).await;

        coordinator.audit().flush().await;
        let records = coordinator.audit().list(0, 0, |_| true).unwrap();
        let refusals: Vec<_> = records
            .iter()
            .filter(|r| r.verb == cpb::AuditVerb::AgentRefusal as i32)
            .collect();
        assert!(!refusals.is_empty(), "{records:#?}");
        assert!(
            refusals.iter().all(|r| r.set_id == refused),
            "an unreachable agent is no refusal: {refusals:#?}"
        );
        let r = refusals[0];
        assert_eq!(r.identity, "agent db1");
        assert_eq!(r.set_id, refused);
        assert_eq!(r.group, "g");
        assert_eq!(r.code, "FailedPrecondition");
        assert!(r.message.contains("root filesystem"), "{r:?}");
        assert!(r.args.contains("FreezeVolumes"), "{r:?}");
    }
}
