//! The operator API (`quiesce.coordinator.v1`): a thin adapter over `Coordinator`.

use std::sync::Arc;

use quiesce_proto::coordinator::v1 as pb;
use quiesce_proto::coordinator::v1::coordinator_server::Coordinator as CoordinatorApi;
use quiesce_proto::identity::{Identity, Role};
use tonic::{Code, Request, Response, Status};

use crate::audit::{self, Entry};
use crate::authz::{Caller, Policy};
use crate::error::Error;
use crate::workflow::{Coordinator, group_of_set};

pub struct OperatorService {
    coordinator: Arc<Coordinator>,
}

impl OperatorService {
    pub fn new(coordinator: Arc<Coordinator>) -> Self {
        OperatorService { coordinator }
    }

    fn policy(&self) -> Policy<'_> {
        Policy::new(self.coordinator.config())
    }

    /// `Ok` if the caller of `request` may do `action` on `group` (see `authz`).
    fn authorize<T>(
        &self,
        request: &Request<T>,
        action: pb::Action,
        group: &str,
    ) -> Result<(), Status> {
        Ok(self.policy().check(&caller(request), action, group)?)
    }
}

/// The operator calling, by its certificate (the interceptor admitted only operators).
fn caller<T>(request: &Request<T>) -> Caller {
    match Identity::of_peer(request) {
        Some(id) => Caller::Operator(id.name),
        None => Caller::Unauthenticated,
    }
}

fn required<'a>(value: &'a str, what: &str) -> Result<&'a str, Status> {
    if value.is_empty() {
        Err(Error::InvalidArgument(format!("{what} is required")).into())
    } else {
        Ok(value)
    }
}

/// Longest set id accepted (the coordinator's own are far shorter; agents accept 128).
const MAX_SET_ID_CHARS: usize = 128;

/// A set id from a request: present and of a sane length, so no error echoes a huge one.
fn set_id(value: &str) -> Result<&str, Status> {
    let value = required(value, "set id")?;
    let chars = value.chars().count();
    if chars > MAX_SET_ID_CHARS {
        return Err(Error::InvalidArgument(format!(
            "set id {} is {chars} characters long; set ids have at most {MAX_SET_ID_CHARS}",
            quiesce_proto::echo::Capped(value)
        ))
        .into());
    }
    Ok(value)
}

/// One API call being audited: who, what, on what, with which arguments.
struct Call {
    at_ms: u64,
    identity: String,
    verb: pb::AuditVerb,
    group: String,
    set_id: String,
    args: String,
}

/// How the audit log names a caller.
pub fn identity_name(caller: &Caller) -> String {
    match caller {
        Caller::Operator(name) => format!("operator {name}"),
        Caller::Unauthenticated => String::new(),
    }
}

impl OperatorService {
    /// Starts the audit record of a call (before any check, so denials are recorded too).
    fn begin<T: serde::Serialize>(
        &self,
        request: &Request<T>,
        verb: pb::AuditVerb,
        group: &str,
        set_id: &str,
    ) -> Call {
        Call {
            at_ms: self.coordinator.clock().now_ms(),
            identity: identity_name(&caller(request)),
            verb,
            group: audit::cap(group, 200),
            set_id: audit::cap(set_id, 200),
            args: serde_json::to_string(request.get_ref())
                .unwrap_or_else(|e| format!("{{\"unserializable\":\"{e}\"}}")),
        }
    }

    /// Records how `call` ended and passes `result` on. `done` names, from a reply, the set
    /// the call made (if any) and what was done.
    fn end<R>(
        &self,
        call: Call,
        result: Result<Response<R>, Status>,
        done: impl FnOnce(&R) -> (String, String),
    ) -> Result<Response<R>, Status> {
        let (outcome, code, message, set_id) = match &result {
            Ok(reply) => {
                let (made, message) = done(reply.get_ref());
                let set_id = if made.is_empty() { call.set_id } else { made };
                (pb::AuditOutcome::Ok, String::new(), message, set_id)
            }
            Err(status) => {
                let outcome = match status.code() {
                    Code::PermissionDenied | Code::Unauthenticated => pb::AuditOutcome::Denied,
                    _ => pb::AuditOutcome::Failed,
                };
                (
                    outcome,
                    format!("{:?}", status.code()),
                    status.message().to_owned(),
                    call.set_id,
                )
            }
        };
        self.coordinator.audit().record(Entry {
            at_ms: call.at_ms,
            identity: call.identity,
            verb: call.verb,
            group: call.group,
            set_id,
            args: call.args,
            outcome,
            code,
            message,
        });
        result
    }

    async fn create_set_checked(
        &self,
        request: Request<pb::CreateSetRequest>,
        group: &str,
    ) -> Result<Response<pb::CreateSetResponse>, Status> {
        required(group, "group")?;
        // Authorized first: an operator without a grant learns nothing about other groups.
        self.authorize(&request, pb::Action::Backup, group)?;
        self.coordinator.group(group)?;
        // Its first record waits while another group is frozen.
        self.coordinator
            .windows()
            .closed("a new set's record")
            .await;
        let set_id = self.coordinator.start_set(group)?;
        Ok(Response::new(pb::CreateSetResponse { set_id }))
    }

    async fn get_set_checked(
        &self,
        request: Request<pb::GetSetRequest>,
    ) -> Result<Response<pb::GetSetResponse>, Status> {
        self.authorize(
            &request,
            pb::Action::View,
            group_of_set(&request.get_ref().set_id),
        )?;
        let req = request.into_inner();
        let id = set_id(&req.set_id)?;
        let set = self
            .coordinator
            .catalog()
            .get(id)
            .map_err(Error::from)?
            .ok_or_else(|| Error::UnknownSet { id: id.to_owned() })?;
        Ok(Response::new(pb::GetSetResponse { set: Some(set) }))
    }

    async fn list_sets_checked(
        &self,
        request: Request<pb::ListSetsRequest>,
    ) -> Result<Response<pb::ListSetsResponse>, Status> {
        let who = caller(&request);
        let req = request.into_inner();
        if !req.group.is_empty() {
            self.policy().check(&who, pb::Action::View, &req.group)?;
            self.coordinator.group(&req.group)?;
        } else {
            self.policy().check_any(&who, pb::Action::View)?;
        }
        let policy = self.policy();
        let mut sets = self
            .coordinator
            .catalog()
            .list(&req.group, req.limit)
            .map_err(Error::from)?;
        sets.retain(|s| policy.allows(&who, pb::Action::View, &s.group));
        Ok(Response::new(pb::ListSetsResponse { sets }))
    }

    async fn delete_set_checked(
        &self,
        request: Request<pb::DeleteSetRequest>,
    ) -> Result<Response<pb::DeleteSetResponse>, Status> {
        let group = group_of_set(&request.get_ref().set_id).to_owned();
        self.authorize(&request, pb::Action::Delete, &group)?;
        let who = caller(&request);
        let req = request.into_inner();
        let id = set_id(&req.set_id)?;
        if !req.approve {
            return Ok(Response::new(self.coordinator.delete_set(id).await?));
        }
        // An early delete of a locked set: approvals by different admins of the group.
        let policy = self.policy();
        if !policy.is_admin(&who, &group) {
            return Err(Error::PermissionDenied {
                identity: identity_name(&who),
                action: "approve an early delete",
                group,
            }
            .into());
        }
        let set = self
            .coordinator
            .catalog()
            .get(id)
            .map_err(Error::from)?
            .ok_or_else(|| Error::UnknownSet { id: id.to_owned() })?;
        if self.coordinator.locked_until(&set).is_none() {
            return Err(Error::InvalidArgument(format!(
                "set {id} is not locked; delete it without --approve"
            ))
            .into());
        }
        let window = self.coordinator.group(&set.group)?.approval_window;
        self.coordinator.windows().closed("a delete approval").await;
        let now = self.coordinator.clock().now_ms();
        let approvals = self
            .coordinator
            .catalog()
            .approve_delete(
                id,
                &identity_name(&who),
                now,
                now.saturating_sub(window.as_millis() as u64),
            )
            .map_err(Error::from)?;
        let approvals: Vec<pb::DeleteApproval> = approvals
            .into_iter()
            .map(|(identity, at_ms)| pb::DeleteApproval { identity, at_ms })
            .collect();
        if approvals.len() < 2 {
            // Not yet: the reply says who approved; the set stays.
            return Ok(Response::new(pb::DeleteSetResponse {
                approvals,
                ..Default::default()
            }));
        }
        let mut report = self.coordinator.delete_set_with(id, true).await?;
        report.approvals = approvals;
        Ok(Response::new(report))
    }

    async fn restore_set_checked(
        &self,
        request: Request<pb::RestoreSetRequest>,
    ) -> Result<Response<pb::RestoreSetResponse>, Status> {
        self.authorize(
            &request,
            pb::Action::Restore,
            group_of_set(&request.get_ref().set_id),
        )?;
        let req = request.into_inner();
        set_id(&req.set_id)?;
        let volumes = self.coordinator.restore(&req).await?;
        Ok(Response::new(pb::RestoreSetResponse { volumes }))
    }

    async fn verify_set_checked(
        &self,
        request: Request<pb::VerifySetRequest>,
    ) -> Result<Response<pb::VerifySetResponse>, Status> {
        // A drill restores the set (into scratch space): the restore grant covers it.
        self.authorize(
            &request,
            pb::Action::Restore,
            group_of_set(&request.get_ref().set_id),
        )?;
        let req = request.into_inner();
        set_id(&req.set_id)?;
        if req.scratch_dir.len() > 4096 || req.host.len() > 256 {
            return Err(Error::InvalidArgument(format!(
                "--scratch-dir is {} and --host {} characters long (at most 4096 and 256)",
                req.scratch_dir.len(),
                req.host.len()
            ))
            .into());
        }
        if !req.scratch_dir.is_empty() && !req.scratch_dir.starts_with('/') {
            return Err(Error::InvalidArgument(format!(
                "--scratch-dir {:?} must be an absolute directory on the host",
                quiesce_proto::echo::capped(&req.scratch_dir)
            ))
            .into());
        }
        let verification = self.coordinator.verify_set(&req).await?;
        Ok(Response::new(pb::VerifySetResponse {
            verification: Some(verification),
        }))
    }

    async fn list_agents_checked(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let who = caller(&request);
        let policy = self.policy();
        policy.check_any(&who, pb::Action::View)?;
        let mut agents = self.coordinator.agent_statuses().await;
        // Pending removals name their sets (and so their groups): only those the caller views.
        for agent in &mut agents {
            agent
                .pending_removals
                .retain(|p| policy.allows(&who, pb::Action::View, group_of_set(&p.set_id)));
        }
        Ok(Response::new(pb::ListAgentsResponse { agents }))
    }

    async fn list_audit_checked(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        let who = caller(&request);
        let req = request.into_inner();
        let policy = self.policy();
        if !req.group.is_empty() {
            policy.check(&who, pb::Action::View, &req.group)?;
            self.coordinator.group(&req.group)?;
        } else {
            policy.check_any(&who, pb::Action::View)?;
        }
        // Everything recorded before this call is in the catalog (a caller sees its own calls).
        self.coordinator.audit().flush().await;
        let records = self
            .coordinator
            .audit()
            .list(req.since_ms, req.limit as usize, |r| {
                if !req.group.is_empty() {
                    r.group == req.group
                } else if r.group.is_empty() {
                    true
                } else {
                    policy.allows(&who, pb::Action::View, &r.group)
                }
            })
            .map_err(Error::from)?;
        Ok(Response::new(pb::ListAuditResponse { records }))
    }

    async fn verify_audit_checked(
        &self,
        request: Request<pb::VerifyAuditRequest>,
    ) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        self.policy()
            .check_any(&caller(&request), pb::Action::View)?;
        self.coordinator.audit().flush().await;
        let report = self.coordinator.audit().verify().map_err(Error::from)?;
        Ok(Response::new(report))
    }
}

fn nothing<R>(_: &R) -> (String, String) {
    (String::new(), String::new())
}

#[tonic::async_trait]
impl CoordinatorApi for OperatorService {
    async fn create_set(
        &self,
        request: Request<pb::CreateSetRequest>,
    ) -> Result<Response<pb::CreateSetResponse>, Status> {
        let group = request.get_ref().group.clone();
        let call = self.begin(&request, pb::AuditVerb::CreateSet, &group, "");
        let result = self.create_set_checked(request, &group).await;
        self.end(call, result, |r| (r.set_id.clone(), "set started".into()))
    }

    async fn get_set(
        &self,
        request: Request<pb::GetSetRequest>,
    ) -> Result<Response<pb::GetSetResponse>, Status> {
        let id = request.get_ref().set_id.clone();
        let call = self.begin(&request, pb::AuditVerb::GetSet, group_of_set(&id), &id);
        let result = self.get_set_checked(request).await;
        self.end(call, result, nothing)
    }

    async fn list_sets(
        &self,
        request: Request<pb::ListSetsRequest>,
    ) -> Result<Response<pb::ListSetsResponse>, Status> {
        let group = request.get_ref().group.clone();
        let call = self.begin(&request, pb::AuditVerb::ListSets, &group, "");
        let result = self.list_sets_checked(request).await;
        self.end(call, result, |r| {
            (String::new(), format!("{} sets", r.sets.len()))
        })
    }

    async fn delete_set(
        &self,
        request: Request<pb::DeleteSetRequest>,
    ) -> Result<Response<pb::DeleteSetResponse>, Status> {
        let id = request.get_ref().set_id.clone();
        let call = self.begin(&request, pb::AuditVerb::DeleteSet, group_of_set(&id), &id);
        let result = self.delete_set_checked(request).await;
        self.end(call, result, |r| {
            let approvals: Vec<&str> = r.approvals.iter().map(|a| a.identity.as_str()).collect();
            let message = match (approvals.len(), r.forgotten) {
                (0, true) => format!("deleted ({} snapshots)", r.snapshots_deleted),
                (0, false) => "removal pending (the reconciler retries)".to_owned(),
                (1, _) => format!(
                    "early delete approved by {}; a second admin must approve",
                    approvals[0]
                ),
                (_, forgotten) => format!(
                    "early delete approved by {}; {}",
                    approvals.join(" and "),
                    if forgotten {
                        "deleted"
                    } else {
                        "removal pending"
                    }
                ),
            };
            (String::new(), message)
        })
    }

    async fn restore_set(
        &self,
        request: Request<pb::RestoreSetRequest>,
    ) -> Result<Response<pb::RestoreSetResponse>, Status> {
        let id = request.get_ref().set_id.clone();
        let call = self.begin(&request, pb::AuditVerb::RestoreSet, group_of_set(&id), &id);
        let result = self.restore_set_checked(request).await;
        self.end(call, result, |r| {
            (
                String::new(),
                format!("{} volumes restored", r.volumes.len()),
            )
        })
    }

    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let call = self.begin(&request, pb::AuditVerb::ListAgents, "", "");
        let result = self.list_agents_checked(request).await;
        self.end(call, result, nothing)
    }

    async fn list_groups(
        &self,
        request: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        let call = self.begin(&request, pb::AuditVerb::ListGroups, "", "");
        let who = caller(&request);
        let policy = self.policy();
        let result = self
            .coordinator
            .group_infos()
            .map(|mut groups| {
                groups.retain(|g| policy.allows(&who, pb::Action::View, &g.name));
                Response::new(pb::ListGroupsResponse { groups })
            })
            .map_err(Status::from);
        self.end(call, result, nothing)
    }

    async fn get_permissions(
        &self,
        request: Request<pb::GetPermissionsRequest>,
    ) -> Result<Response<pb::GetPermissionsResponse>, Status> {
        let call = self.begin(&request, pb::AuditVerb::GetPermissions, "", "");
        let result = Ok(Response::new(self.policy().permissions(&caller(&request))));
        self.end(call, result, nothing)
    }

    async fn verify_set(
        &self,
        request: Request<pb::VerifySetRequest>,
    ) -> Result<Response<pb::VerifySetResponse>, Status> {
        let id = request.get_ref().set_id.clone();
        let call = self.begin(&request, pb::AuditVerb::VerifySet, group_of_set(&id), &id);
        let result = self.verify_set_checked(request).await;
        self.end(call, result, |r| {
            let outcome = r
                .verification
                .as_ref()
                .map(|v| {
                    v.outcome()
                        .as_str_name()
                        .trim_start_matches("VERIFY_OUTCOME_")
                })
                .unwrap_or("none")
                .to_ascii_lowercase();
            (String::new(), format!("drill {outcome}"))
        })
    }

    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        let group = request.get_ref().group.clone();
        let call = self.begin(&request, pb::AuditVerb::ListAudit, &group, "");
        let result = self.list_audit_checked(request).await;
        self.end(call, result, |r| {
            (String::new(), format!("{} records", r.records.len()))
        })
    }

    async fn verify_audit(
        &self,
        request: Request<pb::VerifyAuditRequest>,
    ) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        let call = self.begin(&request, pb::AuditVerb::VerifyAudit, "", "");
        let result = self.verify_audit_checked(request).await;
        self.end(call, result, |r| {
            let message = if r.intact {
                format!("intact: {} records", r.records)
            } else {
                format!("broken at record {}: {}", r.broken_seq, r.problem)
            };
            (String::new(), message)
        })
    }
}

/// Admits only operator identities. Agents and coordinators, though signed by the same CA, are
/// not operators. `None` admits everyone (plain text with `--insecure`).
#[derive(Clone)]
pub struct OperatorAuth {
    required: bool,
    /// Where refusals are recorded (the call's verb is not known here: `unspecified`).
    audit: Option<Arc<audit::AuditLog>>,
}

impl OperatorAuth {
    pub fn mtls() -> Self {
        OperatorAuth {
            required: true,
            audit: None,
        }
    }

    pub fn insecure() -> Self {
        OperatorAuth {
            required: false,
            audit: None,
        }
    }

    pub fn audited(mut self, audit: Arc<audit::AuditLog>) -> Self {
        self.audit = Some(audit);
        self
    }
}

impl tonic::service::Interceptor for OperatorAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if !self.required {
            return Ok(request);
        }
        let (identity, refusal) = match Identity::of_peer(&request) {
            Some(id) if id.role == Role::Operator => return Ok(request),
            Some(id) => (
                id.to_string(),
                Status::permission_denied(format!("{id} is not an operator")),
            ),
            None => (
                String::new(),
                Status::unauthenticated("no Quiesce identity in the client certificate"),
            ),
        };
        if let Some(audit) = &self.audit {
            audit.record(Entry {
                at_ms: crate::workflow::unix_ms(),
                identity,
                verb: pb::AuditVerb::Unspecified,
                group: String::new(),
                set_id: String::new(),
                args: "{}".into(),
                outcome: pb::AuditOutcome::Denied,
                code: format!("{:?}", refusal.code()),
                message: refusal.message().to_owned(),
            });
        }
        Err(refusal)
    }
}
