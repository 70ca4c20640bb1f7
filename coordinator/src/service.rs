//! The operator API (`quiesce.coordinator.v1`): a thin adapter over `Coordinator`.

use std::sync::Arc;

use quiesce_proto::coordinator::v1 as pb;
use quiesce_proto::coordinator::v1::coordinator_server::Coordinator as CoordinatorApi;
use quiesce_proto::identity::{Identity, Role};
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::workflow::Coordinator;

pub struct OperatorService {
    coordinator: Arc<Coordinator>,
}

impl OperatorService {
    pub fn new(coordinator: Arc<Coordinator>) -> Self {
        OperatorService { coordinator }
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
        let req = request.into_inner();
        let set_id = self.coordinator.start_set(required(&req.group, "group")?)?;
        Ok(Response::new(pb::CreateSetResponse { set_id }))
    }

    async fn get_set(
        &self,
        request: Request<pb::GetSetRequest>,
    ) -> Result<Response<pb::GetSetResponse>, Status> {
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
        let req = request.into_inner();
        if !req.group.is_empty() {
            self.coordinator.group(&req.group)?;
        }
        let sets = self
            .coordinator
            .catalog()
            .list(&req.group, req.limit)
            .map_err(Error::from)?;
        Ok(Response::new(pb::ListSetsResponse { sets }))
    }

    async fn delete_set(
        &self,
        request: Request<pb::DeleteSetRequest>,
    ) -> Result<Response<pb::DeleteSetResponse>, Status> {
        let req = request.into_inner();
        let deleted = self.coordinator.delete_set(set_id(&req.set_id)?).await?;
        Ok(Response::new(pb::DeleteSetResponse {
            snapshots_deleted: deleted,
        }))
    }

    async fn restore_set(
        &self,
        request: Request<pb::RestoreSetRequest>,
    ) -> Result<Response<pb::RestoreSetResponse>, Status> {
        let req = request.into_inner();
        set_id(&req.set_id)?;
        let volumes = self.coordinator.restore(&req).await?;
        Ok(Response::new(pb::RestoreSetResponse { volumes }))
    }

    async fn list_agents(
        &self,
        _request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let agents = self.coordinator.agent_statuses().await;
        Ok(Response::new(pb::ListAgentsResponse { agents }))
    }

    async fn list_groups(
        &self,
        _request: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        let groups = self.coordinator.group_infos()?;
        Ok(Response::new(pb::ListGroupsResponse { groups }))
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
