//! The files `pki` writes work for tonic's mTLS, through `TlsFiles`: a peer with a certificate
//! of the same CA gets through and is identified; anyone else is refused.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use quiesce_coordinator::pki;
use quiesce_proto::agent::v1::agent_client::AgentClient;
use quiesce_proto::agent::v1::agent_server::{Agent, AgentServer};
use quiesce_proto::agent::v1::*;
use quiesce_proto::identity::{Identity, Role};
use quiesce_proto::tls::TlsFiles;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Server};
use tonic::{Request, Response, Status};

/// Answers `GetHostInfo` with the caller's identity URI as the hostname.
#[derive(Default)]
struct WhoAmI {
    calls: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl Agent for WhoAmI {
    async fn get_host_info(
        &self,
        request: Request<GetHostInfoRequest>,
    ) -> Result<Response<GetHostInfoResponse>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let identity = Identity::of_peer(&request)
            .ok_or_else(|| Status::unauthenticated("no Quiesce identity"))?;
        Ok(Response::new(GetHostInfoResponse {
            hostname: identity.uri(),
            ..Default::default()
        }))
    }

    async fn prepare_volumes(
        &self,
        _: Request<PrepareVolumesRequest>,
    ) -> Result<Response<PrepareVolumesResponse>, Status> {
        Err(Status::unimplemented("test server"))
    }

    async fn freeze_volumes(
        &self,
        _: Request<FreezeVolumesRequest>,
    ) -> Result<Response<FreezeVolumesResponse>, Status> {
        Err(Status::unimplemented("test server"))
    }

    async fn renew_lease(
        &self,
        _: Request<RenewLeaseRequest>,
    ) -> Result<Response<RenewLeaseResponse>, Status> {
        Err(Status::unimplemented("test server"))
    }

    async fn thaw_volumes(
        &self,
        _: Request<ThawVolumesRequest>,
    ) -> Result<Response<ThawVolumesResponse>, Status> {
        Err(Status::unimplemented("test server"))
    }

    async fn create_snapshots(
        &self,
        _: Request<CreateSnapshotsRequest>,
    ) -> Result<Response<CreateSnapshotsResponse>, Status> {
        Err(Status::unimplemented("test server"))
    }

    async fn delete_snapshots(
        &self,
        _: Request<DeleteSnapshotsRequest>,
    ) -> Result<Response<DeleteSnapshotsResponse>, Status> {
        Err(Status::unimplemented("test server"))
    }

    async fn restore_snapshots(
        &self,
        _: Request<RestoreSnapshotsRequest>,
    ) -> Result<Response<RestoreSnapshotsResponse>, Status> {
        Err(Status::unimplemented("test server"))
    }

    async fn describe_hooks(
        &self,
        _: Request<quiesce_proto::agent::v1::DescribeHooksRequest>,
    ) -> Result<Response<quiesce_proto::agent::v1::DescribeHooksResponse>, Status> {
        Err(Status::unimplemented("test server"))
    }
    async fn verify_snapshots(
        &self,
        _: Request<VerifySnapshotsRequest>,
    ) -> Result<Response<VerifySnapshotsResponse>, Status> {
        Err(Status::unimplemented("test server"))
    }
}

/// CA `good` with agent `db1` (the server), coordinator `central` and operator `alice`; CA
/// `other` with a coordinator `central` of its own.
struct Pki {
    _dir: tempfile::TempDir,
    good: std::path::PathBuf,
    other: std::path::PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good");
        let other = dir.path().join("other");
        let localhost = [IpAddr::V4(Ipv4Addr::LOCALHOST)];
        pki::init_ca(&good, "Good CA").unwrap();
        pki::issue(&good, Role::Agent, "db1", &[], &localhost, 1, false).unwrap();
        pki::issue(&good, Role::Coordinator, "central", &[], &[], 1, false).unwrap();
        pki::issue(&good, Role::Operator, "alice", &[], &[], 1, false).unwrap();
        pki::init_ca(&other, "Other CA").unwrap();
        pki::issue(&other, Role::Coordinator, "central", &[], &[], 1, false).unwrap();
        Pki {
            _dir: dir,
            good,
            other,
        }
    }

    /// `name`'s files, trusting the CA of `trusted`.
    fn files(name_dir: &Path, name: &str, trusted: &Path) -> TlsFiles {
        TlsFiles {
            ca: trusted.join("ca.pem"),
            cert: name_dir.join(format!("{name}.pem")),
            key: name_dir.join(format!("{name}.key")),
        }
    }
}

/// Serves `WhoAmI` as agent `db1` of the good CA; returns its address and call counter.
async fn serve(pki: &Pki) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = WhoAmI::default();
    let calls = service.calls.clone();
    let tls = Pki::files(&pki.good, "db1", &pki.good)
        .server_config()
        .unwrap();
    let server = Server::builder()
        .tls_config(tls)
        .unwrap()
        .add_service(AgentServer::new(service))
        .serve_with_incoming(TcpListenerStream::new(listener));
    tokio::spawn(server);
    (addr, calls)
}

/// Calls `GetHostInfo` on `addr` and returns the identity the server saw.
async fn who_am_i(addr: SocketAddr, tls: ClientTlsConfig) -> Result<String, String> {
    let endpoint = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    let call = async {
        let channel = endpoint
            .connect()
            .await
            .map_err(|err| format!("connect: {err:?}"))?;
        AgentClient::new(channel)
            .get_host_info(GetHostInfoRequest {})
            .await
            .map(|response| response.into_inner().hostname)
            .map_err(|status| format!("rpc: {status}"))
    };
    tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .unwrap_or_else(|_| Err("timed out".to_owned()))
}

#[tokio::test]
async fn same_ca_clients_get_through_and_are_identified() {
    let pki = Pki::new();
    let (addr, calls) = serve(&pki).await;
    for (name, uri) in [
        ("central", "quiesce://coordinator/central"),
        ("alice", "quiesce://operator/alice"),
    ] {
        let tls = Pki::files(&pki.good, name, &pki.good)
            .client_config("db1")
            .unwrap();
        assert_eq!(who_am_i(addr, tls).await.as_deref(), Ok(uri));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn client_of_another_ca_is_refused() {
    let pki = Pki::new();
    let (addr, calls) = serve(&pki).await;
    // Trusts the server's CA, but presents a certificate of another one.
    let tls = Pki::files(&pki.other, "central", &pki.good)
        .client_config("db1")
        .unwrap();
    let err = who_am_i(addr, tls).await.unwrap_err();
    assert!(err.contains("UnknownCA"), "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    // The server survives the failed handshake.
    let tls = Pki::files(&pki.good, "central", &pki.good)
        .client_config("db1")
        .unwrap();
    assert!(who_am_i(addr, tls).await.is_ok());
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let pki = Pki::new();
    let (addr, calls) = serve(&pki).await;
    let ca = std::fs::read(pki.good.join("ca.pem")).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("db1");
    let err = who_am_i(addr, tls).await.unwrap_err();
    assert!(err.contains("CertificateRequired"), "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn client_checks_the_server() {
    let pki = Pki::new();
    let (addr, calls) = serve(&pki).await;
    // The server's certificate does not name `db2`.
    let tls = Pki::files(&pki.good, "central", &pki.good)
        .client_config("db2")
        .unwrap();
    let err = who_am_i(addr, tls).await.unwrap_err();
    assert!(err.contains("NotValidForName"), "{err}");
    // A client trusting only another CA does not trust the server.
    let tls = Pki::files(&pki.other, "central", &pki.other)
        .client_config("db1")
        .unwrap();
    let err = who_am_i(addr, tls).await.unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[test]
fn issued_files_pass_check() {
    let pki = Pki::new();
    for name in ["db1", "central", "alice"] {
        let files = Pki::files(&pki.good, name, &pki.good);
        assert_eq!(files.check(), Vec::<String>::new(), "{name}");
    }
    // The CA's own certificate carries no Quiesce identity.
    let files = TlsFiles {
        ca: pki.good.join("ca.pem"),
        cert: pki.good.join("ca.pem"),
        key: pki.good.join("ca.key"),
    };
    let problems = files.check();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("no single quiesce://<role>/<name> identity"));
}
