//! The operator API (`quiesce.coordinator.v1`): a thin adapter over `Coordinator`.

use std::sync::Arc;

use quiesce_proto::coordinator::v1 as pb;
use quiesce_proto::coordinator::v1::coordinator_server::Coordinator as CoordinatorApi;
use quiesce_proto::identity::{Identity, Role};
use tonic::{Request, Response, Status};

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

#[tonic::async_trait]
impl CoordinatorApi for OperatorService {
    async fn create_set(
        &self,
        request: Request<pb::CreateSetRequest>,
    ) -> Result<Response<pb::CreateSetResponse>, Status> {
        let group = required(&request.get_ref().group, "group")?.to_owned();
        // Authorized first: an operator without a grant learns nothing about other groups.
        self.authorize(&request, pb::Action::Backup, &group)?;
        self.coordinator.group(&group)?;
        let set_id = self.coordinator.start_set(&group)?;
        Ok(Response::new(pb::CreateSetResponse { set_id }))
    }

    async fn get_set(
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

    async fn list_sets(
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

    async fn delete_set(
        &self,
        request: Request<pb::DeleteSetRequest>,
    ) -> Result<Response<pb::DeleteSetResponse>, Status> {
        self.authorize(
            &request,
            pb::Action::Delete,
            group_of_set(&request.get_ref().set_id),
        )?;
        let req = request.into_inner();
        let report = self.coordinator.delete_set(set_id(&req.set_id)?).await?;
        Ok(Response::new(report))
    }

    async fn restore_set(
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

    async fn verify_set(
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

    async fn list_agents(
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

    async fn list_groups(
        &self,
        request: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        let who = caller(&request);
        let policy = self.policy();
        let mut groups = self.coordinator.group_infos()?;
        groups.retain(|g| policy.allows(&who, pb::Action::View, &g.name));
        Ok(Response::new(pb::ListGroupsResponse { groups }))
    }

    async fn get_permissions(
        &self,
        request: Request<pb::GetPermissionsRequest>,
    ) -> Result<Response<pb::GetPermissionsResponse>, Status> {
        Ok(Response::new(self.policy().permissions(&caller(&request))))
    }
}

/// Admits only operator identities. Agents and coordinators, though signed by the same CA, are
/// not operators. `None` admits everyone (plain text with `--insecure`).
#[derive(Clone)]
pub struct OperatorAuth {
    required: bool,
}

impl OperatorAuth {
    pub fn mtls() -> Self {
        OperatorAuth { required: true }
    }

    pub fn insecure() -> Self {
        OperatorAuth { required: false }
    }
}

impl tonic::service::Interceptor for OperatorAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if !self.required {
            return Ok(request);
        }
        match Identity::of_peer(&request) {
            Some(id) if id.role == Role::Operator => Ok(request),
            Some(id) => Err(Status::permission_denied(format!(
                "{id} is not an operator"
            ))),
            None => Err(Status::unauthenticated(
                "no Quiesce identity in the client certificate",
            )),
        }
    }
}
