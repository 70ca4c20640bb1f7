//! Talking to agents: a narrow trait (so the workflow is testable with a fake) and its gRPC
//! implementation over mTLS.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use quiesce_proto::agent::v1 as pb;
use quiesce_proto::agent::v1::agent_client::AgentClient as GrpcClient;
use quiesce_proto::identity::{Identity, Role};
use quiesce_proto::tls::TlsFiles;
use quiesce_proto::tls_client::ClientTlsError;
use tonic::Status;
use tonic::transport::{Channel, Endpoint};

use crate::config::AgentConfig;

/// One agent, as the workflow sees it. Every call is one RPC of `quiesce.agent.v1`.
#[tonic::async_trait]
pub trait AgentClient: Send + Sync {
    async fn get_host_info(&self) -> Result<pb::GetHostInfoResponse, Status>;
    async fn prepare_volumes(
        &self,
        req: pb::PrepareVolumesRequest,
    ) -> Result<pb::PrepareVolumesResponse, Status>;
    async fn freeze_volumes(
        &self,
        req: pb::FreezeVolumesRequest,
    ) -> Result<pb::FreezeVolumesResponse, Status>;
    async fn renew_lease(
        &self,
        req: pb::RenewLeaseRequest,
    ) -> Result<pb::RenewLeaseResponse, Status>;
    async fn thaw_volumes(
        &self,
        req: pb::ThawVolumesRequest,
    ) -> Result<pb::ThawVolumesResponse, Status>;
    async fn create_snapshots(
        &self,
        req: pb::CreateSnapshotsRequest,
    ) -> Result<pb::CreateSnapshotsResponse, Status>;
    async fn delete_snapshots(
        &self,
        req: pb::DeleteSnapshotsRequest,
    ) -> Result<pb::DeleteSnapshotsResponse, Status>;
    async fn restore_snapshots(
        &self,
        req: pb::RestoreSnapshotsRequest,
    ) -> Result<pb::RestoreSnapshotsResponse, Status>;
    /// A restore drill of the set's snapshots on this agent's host.
    async fn verify_snapshots(
        &self,
        _req: pb::VerifySnapshotsRequest,
    ) -> Result<pb::VerifySnapshotsResponse, Status> {
        Err(Status::unimplemented(
            "this agent client cannot run restore drills",
        ))
    }
    /// The paths the databases of the named hooks write (completeness check at plan time).
    async fn describe_hooks(
        &self,
        _req: pb::DescribeHooksRequest,
    ) -> Result<pb::DescribeHooksResponse, Status> {
        Err(Status::unimplemented(
            "this agent client cannot describe hooks",
        ))
    }
}

/// Finds the client of an agent by its configured name.
pub trait AgentDirectory: Send + Sync {
    fn client(&self, name: &str) -> Option<Arc<dyn AgentClient>>;
}

impl AgentDirectory for HashMap<String, Arc<dyn AgentClient>> {
    fn client(&self, name: &str) -> Option<Arc<dyn AgentClient>> {
        self.get(name).cloned()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("agent {agent}: invalid endpoint {endpoint}")]
    Endpoint {
        agent: String,
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("agent {agent}")]
    Tls {
        agent: String,
        #[source]
        source: Box<ClientTlsError>,
    },
}

/// Lazily connected gRPC channels to every configured agent. Under mTLS each channel accepts
/// only the agent it is for: a certificate of the CA that names the configured server name
/// (DNS) AND carries `quiesce://agent/<name>` — never an operator's, a coordinator's or another
/// agent's certificate with the same DNS name.
pub struct GrpcAgents {
    clients: HashMap<String, Arc<dyn AgentClient>>,
}

impl GrpcAgents {
    /// `tls: None` is plain text (`--insecure`).
    pub fn new(agents: &[AgentConfig], tls: Option<&TlsFiles>) -> Result<Self, ConnectError> {
        let mut clients: HashMap<String, Arc<dyn AgentClient>> = HashMap::new();
        for agent in agents {
            let endpoint_err = |source| ConnectError::Endpoint {
                agent: agent.name.clone(),
                endpoint: agent.endpoint.clone(),
                source,
            };
            let channel = match tls {
                Some(tls) => {
                    // The connector does TLS (and the identity check tonic's TLS cannot do), so
                    // tonic is given the plain-text form of the https:// endpoint.
                    let connector = tls
                        .identity_connector(
                            agent.server_name(),
                            Identity::new(Role::Agent, agent.name.clone()),
                        )
                        .map_err(|source| ConnectError::Tls {
                            agent: agent.name.clone(),
                            source: Box::new(source),
                        })?;
                    let plain = match agent.endpoint.strip_prefix("https://") {
                        Some(rest) => format!("http://{rest}"),
                        None => agent.endpoint.clone(),
                    };
                    endpoint(plain)
                        .map_err(endpoint_err)?
                        .connect_with_connector_lazy(connector)
                }
                None => endpoint(agent.endpoint.clone())
                    .map_err(endpoint_err)?
                    .connect_lazy(),
            };
            clients.insert(
                agent.name.clone(),
                Arc::new(GrpcAgent(GrpcClient::new(channel))),
            );
        }
        Ok(GrpcAgents { clients })
    }
}

/// The channel settings of every agent endpoint.
fn endpoint(uri: String) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(uri)?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5)))
}

impl AgentDirectory for GrpcAgents {
    fn client(&self, name: &str) -> Option<Arc<dyn AgentClient>> {
        self.clients.get(name).cloned()
    }
}

struct GrpcAgent(GrpcClient<Channel>);

#[tonic::async_trait]
impl AgentClient for GrpcAgent {
    async fn get_host_info(&self) -> Result<pb::GetHostInfoResponse, Status> {
        Ok(self
            .0
            .clone()
            .get_host_info(pb::GetHostInfoRequest {})
            .await?
            .into_inner())
    }

    async fn prepare_volumes(
        &self,
        req: pb::PrepareVolumesRequest,
    ) -> Result<pb::PrepareVolumesResponse, Status> {
        Ok(self.0.clone().prepare_volumes(req).await?.into_inner())
    }

    async fn freeze_volumes(
        &self,
        req: pb::FreezeVolumesRequest,
    ) -> Result<pb::FreezeVolumesResponse, Status> {
        Ok(self.0.clone().freeze_volumes(req).await?.into_inner())
    }

    async fn renew_lease(
        &self,
        req: pb::RenewLeaseRequest,
    ) -> Result<pb::RenewLeaseResponse, Status> {
        Ok(self.0.clone().renew_lease(req).await?.into_inner())
    }

    async fn thaw_volumes(
        &self,
        req: pb::ThawVolumesRequest,
    ) -> Result<pb::ThawVolumesResponse, Status> {
        Ok(self.0.clone().thaw_volumes(req).await?.into_inner())
    }

    async fn create_snapshots(
        &self,
        req: pb::CreateSnapshotsRequest,
    ) -> Result<pb::CreateSnapshotsResponse, Status> {
        Ok(self.0.clone().create_snapshots(req).await?.into_inner())
    }

    async fn delete_snapshots(
        &self,
        req: pb::DeleteSnapshotsRequest,
    ) -> Result<pb::DeleteSnapshotsResponse, Status> {
        Ok(self.0.clone().delete_snapshots(req).await?.into_inner())
    }

    async fn restore_snapshots(
        &self,
        req: pb::RestoreSnapshotsRequest,
    ) -> Result<pb::RestoreSnapshotsResponse, Status> {
        Ok(self.0.clone().restore_snapshots(req).await?.into_inner())
    }

    async fn describe_hooks(
        &self,
        req: pb::DescribeHooksRequest,
    ) -> Result<pb::DescribeHooksResponse, Status> {
        Ok(self.0.clone().describe_hooks(req).await?.into_inner())
    }
    async fn verify_snapshots(
        &self,
        req: pb::VerifySnapshotsRequest,
    ) -> Result<pb::VerifySnapshotsResponse, Status> {
        Ok(self.0.clone().verify_snapshots(req).await?.into_inner())
    }
}
