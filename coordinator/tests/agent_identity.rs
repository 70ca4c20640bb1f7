//! The coordinator talks to an agent only if the agent's certificate says it is that agent:
//! `quiesce://agent/<name>` for the agent it meant to reach, on top of the CA chain and the DNS
//! name. Impostors — certificates of the same CA whose DNS name is the agent's, but that are an
//! operator's, a coordinator's, or another agent's — are refused before any call reaches them.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use quiesce_coordinator::agent_client::{AgentDirectory, GrpcAgents};
use quiesce_coordinator::config::AgentConfig;
use quiesce_coordinator::error::status_line;
use quiesce_coordinator::pki;
use quiesce_proto::agent::v1::agent_server::{Agent, AgentServer};
use quiesce_proto::agent::v1::*;
use quiesce_proto::identity::Role;
use quiesce_proto::tls::TlsFiles;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tonic::{Request, Response, Status};

/// Answers `GetHostInfo` with its own name; counts the calls that reached it.
struct Stub {
    name: &'static str,
    calls: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl Agent for Stub {
    async fn get_host_info(
        &self,
        _: Request<GetHostInfoRequest>,
    ) -> Result<Response<GetHostInfoResponse>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(GetHostInfoResponse {
            hostname: self.name.into(),
            ..Default::default()
        }))
    }
    async fn prepare_volumes(
        &self,
        _: Request<PrepareVolumesRequest>,
    ) -> Result<Response<PrepareVolumesResponse>, Status> {
        Err(Status::unimplemented("stub"))
    }
    async fn freeze_volumes(
        &self,
        _: Request<FreezeVolumesRequest>,
    ) -> Result<Response<FreezeVolumesResponse>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Err(Status::unimplemented("stub"))
    }
    async fn renew_lease(
        &self,
        _: Request<RenewLeaseRequest>,
    ) -> Result<Response<RenewLeaseResponse>, Status> {
        Err(Status::unimplemented("stub"))
    }
    async fn thaw_volumes(
        &self,
        _: Request<ThawVolumesRequest>,
    ) -> Result<Response<ThawVolumesResponse>, Status> {
        Err(Status::unimplemented("stub"))
    }
    async fn create_snapshots(
        &self,
        _: Request<CreateSnapshotsRequest>,
    ) -> Result<Response<CreateSnapshotsResponse>, Status> {
        Err(Status::unimplemented("stub"))
    }
    async fn delete_snapshots(
        &self,
        _: Request<DeleteSnapshotsRequest>,
    ) -> Result<Response<DeleteSnapshotsResponse>, Status> {
        Err(Status::unimplemented("stub"))
    }
    async fn restore_snapshots(
        &self,
        _: Request<RestoreSnapshotsRequest>,
    ) -> Result<Response<RestoreSnapshotsResponse>, Status> {
        Err(Status::unimplemented("stub"))
    }
    async fn describe_hooks(
        &self,
        _: Request<DescribeHooksRequest>,
    ) -> Result<Response<DescribeHooksResponse>, Status> {
        Err(Status::unimplemented("stub"))
    }
    async fn verify_snapshots(
        &self,
        _: Request<VerifySnapshotsRequest>,
    ) -> Result<Response<VerifySnapshotsResponse>, Status> {
        Err(Status::unimplemented("stub"))
    }
}

/// One CA; certificates named `<label>.pem`: the coordinator `central`, the real agent `db9`,
/// and three impostors whose DNS name is also `db9` (and IP 127.0.0.1).
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        pki::init_ca(&ca, "Test CA").unwrap();
        let pki = Pki { _dir: dir, ca };
        let db9 = ["db9".to_owned()];
        pki.issue(Role::Coordinator, "central", &[], "central");
        pki.issue(Role::Operator, "db9", &[], "operator-db9");
        pki.issue(Role::Coordinator, "db9", &[], "coordinator-db9");
        pki.issue(Role::Agent, "db8", &db9, "agent-db8");
        pki.issue(Role::Agent, "db9", &[], "agent-db9");
        pki
    }

    /// Issues `role`/`name` (DNS `name` and `dns`, IP 127.0.0.1) as `<label>.pem`/`.key`.
    fn issue(&self, role: Role, name: &str, dns: &[String], label: &str) {
        let localhost = [IpAddr::V4(Ipv4Addr::LOCALHOST)];
        pki::issue(&self.ca, role, name, dns, &localhost, 1, false).unwrap();
        for ext in ["pem", "key"] {
            std::fs::rename(
                self.ca.join(format!("{name}.{ext}")),
                self.ca.join(format!("{label}.{ext}")),
            )
            .unwrap();
        }
    }

    fn files(&self, label: &str) -> TlsFiles {
        TlsFiles {
            ca: self.ca.join(pki::CA_CERT),
            cert: self.ca.join(format!("{label}.pem")),
            key: self.ca.join(format!("{label}.key")),
        }
    }
}

/// Serves the stub over mTLS with `label`'s certificate; its address and call counter.
async fn serve(pki: &Pki, label: &'static str) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let stub = Stub {
        name: label,
        calls: calls.clone(),
    };
    let server = Server::builder()
        .tls_config(pki.files(label).server_config().unwrap())
        .unwrap()
        .add_service(AgentServer::new(stub))
        .serve_with_incoming(TcpListenerStream::new(listener));
    tokio::spawn(server);
    (addr, calls)
}

/// The coordinator's client of agent `db9` at `addr`, as `quiesce-coordinator run` builds it.
fn coordinator_client_of_db9(
    pki: &Pki,
    addr: SocketAddr,
) -> Arc<dyn quiesce_coordinator::agent_client::AgentClient> {
    let agents = GrpcAgents::new(
        &[AgentConfig {
            name: "db9".into(),
            endpoint: format!("https://{addr}"),
            server_name: None,
        }],
        Some(&pki.files("central")),
    )
    .unwrap();
    agents.client("db9").unwrap()
}

async fn host_info(pki: &Pki, addr: SocketAddr) -> Result<String, String> {
    let client = coordinator_client_of_db9(pki, addr);
    match tokio::time::timeout(Duration::from_secs(10), client.get_host_info()).await {
        Ok(Ok(info)) => Ok(info.hostname),
        Ok(Err(status)) => Err(status_line(&status)),
        Err(_) => Err("timed out".into()),
    }
}

fn assert_in(haystack: &str, needle: &str) {
    assert!(haystack.contains(needle), "{needle:?} not in {haystack:?}");
}

#[tokio::test]
async fn the_agent_named_in_the_config_is_reached() {
    let pki = Pki::new();
    let (addr, calls) = serve(&pki, "agent-db9").await;
    assert_eq!(host_info(&pki, addr).await, Ok("agent-db9".to_owned()));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_impostor_with_the_agents_dns_name_is_refused_naming_who_it_is() {
    let pki = Pki::new();
    for (label, is) in [
        ("operator-db9", "operator db9 (quiesce://operator/db9)"),
        (
            "coordinator-db9",
            "coordinator db9 (quiesce://coordinator/db9)",
        ),
        ("agent-db8", "agent db8 (quiesce://agent/db8)"),
    ] {
        let (addr, calls) = serve(&pki, label).await;
        let err = host_info(&pki, addr)
            .await
            .expect_err(&format!("{label} was taken for agent db9"));
        assert_in(&err, &format!("the server's certificate is {is}"));
        assert_in(&err, "not agent db9 (quiesce://agent/db9): refused");
        // Not one request reached the impostor, freezes included.
        let client = coordinator_client_of_db9(&pki, addr);
        let freeze = client
            .freeze_volumes(FreezeVolumesRequest {
                set_id: "g-1".into(),
                mount_points: vec!["/data".into()],
                ..Default::default()
            })
            .await;
        assert!(freeze.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 0, "{label} got a call");
    }
}

#[test]
fn the_check_itself_names_both_identities() {
    let pki = Pki::new();
    let der = |label: &str| -> Vec<u8> {
        let pem = std::fs::read(pki.files(label).cert).unwrap();
        let block = x509_parser::pem::Pem::iter_from_buffer(&pem)
            .next()
            .unwrap()
            .unwrap();
        block.contents
    };
    let expected = quiesce_proto::identity::Identity::new(Role::Agent, "db9");
    use quiesce_proto::tls_client::IdentityVerifier;
    assert_eq!(
        IdentityVerifier::check(&expected, &der("agent-db9")),
        Ok(())
    );
    let err = IdentityVerifier::check(&expected, &der("operator-db9")).unwrap_err();
    assert_in(&err, "operator db9");
}
