//! Certificate rotation without a restart: the operator API served through
//! `ReloadableServerTls` (as `quiesce-coordinator run` does) still identifies its peers, and a
//! reload swaps the certificate and CA for new handshakes — or, if the new files are bad,
//! changes nothing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quiesce_coordinator::agent_client::{AgentClient, AgentDirectory};
use quiesce_coordinator::catalog::Catalog;
use quiesce_coordinator::config::Config;
use quiesce_coordinator::pki;
use quiesce_coordinator::workflow::Coordinator;
use quiesce_proto::coordinator::v1::ListGroupsRequest;
use quiesce_proto::coordinator::v1::coordinator_client::CoordinatorClient;
use quiesce_proto::identity::Role;
use quiesce_proto::tls::TlsFiles;
use quiesce_proto::tls_reload::{ReloadError, ReloadableServerTls};
use tonic::transport::Endpoint;

/// CA `a` (coordinator, operator alice, agent db1) and CA `b` (coordinator, operator bob).
/// The server reads its files from `served/`, which the tests overwrite to rotate.
struct Pki {
    _dir: tempfile::TempDir,
    a: PathBuf,
    b: PathBuf,
    served: TlsFiles,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        pki::init_ca(&a, "CA A").unwrap();
        pki::issue(&a, Role::Coordinator, "coordinator", &[], &[], 1, false).unwrap();
        pki::issue(&a, Role::Operator, "alice", &[], &[], 1, false).unwrap();
        pki::issue(&a, Role::Agent, "db1", &[], &[], 1, false).unwrap();
        pki::init_ca(&b, "CA B").unwrap();
        pki::issue(&b, Role::Coordinator, "coordinator", &[], &[], 1, false).unwrap();
        pki::issue(&b, Role::Operator, "bob", &[], &[], 1, false).unwrap();
        let served_dir = dir.path().join("served");
        std::fs::create_dir(&served_dir).unwrap();
        let served = TlsFiles {
            ca: served_dir.join("ca.pem"),
            cert: served_dir.join("coordinator.pem"),
            key: served_dir.join("coordinator.key"),
        };
        let pki = Pki {
            _dir: dir,
            a,
            b,
            served,
        };
        pki.serve_from(&pki.a);
        pki
    }

    /// Copies the CA and coordinator files of `ca_dir` over the served ones.
    fn serve_from(&self, ca_dir: &Path) {
        std::fs::copy(ca_dir.join("ca.pem"), &self.served.ca).unwrap();
        std::fs::copy(ca_dir.join("coordinator.pem"), &self.served.cert).unwrap();
        std::fs::copy(ca_dir.join("coordinator.key"), &self.served.key).unwrap();
    }

    fn client(&self, ca_dir: &Path, name: &str) -> TlsFiles {
        TlsFiles {
            ca: ca_dir.join("ca.pem"),
            cert: ca_dir.join(format!("{name}.pem")),
            key: ca_dir.join(format!("{name}.key")),
        }
    }
}

/// Serves the real operator API (no agents, no groups) through `tls`.
async fn serve(tls: Arc<ReloadableServerTls>) -> SocketAddr {
    let config =
        Arc::new(Config::parse("listen = \"127.0.0.1:0\"\ncatalog = \"/unused\"\n").unwrap());
    let agents: HashMap<String, Arc<dyn AgentClient>> = HashMap::new();
    let coordinator = Coordinator::new(
        config,
        Arc::new(Catalog::in_memory().unwrap()),
        Arc::new(agents),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(quiesce_coordinator::server::serve(
        coordinator,
        listener,
        Some(tls),
        std::future::pending(),
    ));
    addr
}

/// `ListGroups` as the holder of `files`; the error text on failure.
async fn list_groups(addr: SocketAddr, files: &TlsFiles) -> Result<(), String> {
    let tls = files.client_config("coordinator").unwrap();
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
        CoordinatorClient::new(channel)
            .list_groups(ListGroupsRequest {})
            .await
            .map(|_| ())
            .map_err(|status| format!("rpc: {status}"))
    };
    tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .unwrap_or_else(|_| Err("timed out".to_owned()))
}

#[tokio::test]
async fn reload_serves_the_new_ca_and_certificate_to_new_connections() {
    let pki = Pki::new();
    let tls = ReloadableServerTls::load(&pki.served).unwrap();
    let addr = serve(tls.clone()).await;

    let alice = pki.client(&pki.a, "alice");
    let bob = pki.client(&pki.b, "bob");
    assert_eq!(list_groups(addr, &alice).await, Ok(()));
    // Peers are still identified through the reloadable acceptor: an agent is no operator.
    let err = list_groups(addr, &pki.client(&pki.a, "db1"))
        .await
        .unwrap_err();
    assert!(err.contains("is not an operator"), "{err}");
    let err = list_groups(addr, &bob).await.unwrap_err();
    assert!(err.contains("connect"), "{err}");

    pki.serve_from(&pki.b);
    tls.reload().unwrap();

    assert_eq!(list_groups(addr, &bob).await, Ok(()));
    let err = list_groups(addr, &alice).await.unwrap_err();
    assert!(err.contains("connect"), "{err}");
}

#[tokio::test]
async fn a_bad_reload_changes_nothing() {
    let pki = Pki::new();
    let tls = ReloadableServerTls::load(&pki.served).unwrap();
    let addr = serve(tls.clone()).await;
    let alice = pki.client(&pki.a, "alice");

    // A key that is not the certificate's (a rotation caught half-way).
    std::fs::copy(pki.a.join("alice.key"), &pki.served.key).unwrap();
    let err = tls.reload().unwrap_err();
    assert!(matches!(err, ReloadError::Identity { .. }), "{err:?}");
    assert_eq!(list_groups(addr, &alice).await, Ok(()));

    // Missing and garbage files: every problem named at once.
    std::fs::remove_file(&pki.served.key).unwrap();
    std::fs::write(&pki.served.cert, "not a certificate").unwrap();
    match tls.reload().unwrap_err() {
        ReloadError::Files(problems) => {
            assert_eq!(problems.len(), 2, "{problems:?}");
            assert!(
                problems[0].contains(&pki.served.cert.display().to_string()),
                "{problems:?}"
            );
            assert!(
                problems[1].contains(&pki.served.key.display().to_string()),
                "{problems:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(list_groups(addr, &alice).await, Ok(()));

    // Fixed files take effect on the next reload.
    pki.serve_from(&pki.a);
    tls.reload().unwrap();
    assert_eq!(list_groups(addr, &alice).await, Ok(()));
}

#[tokio::test]
async fn reloadable_agents_rebuild_their_channels() {
    let pki = Pki::new();
    let config = Config::parse(
        "listen = \"127.0.0.1:0\"\ncatalog = \"/unused\"\n\
         [[agent]]\nname = \"db1\"\nendpoint = \"https://127.0.0.1:1\"\n",
    )
    .unwrap();
    let agents =
        quiesce_coordinator::reload::ReloadableAgents::new(&config.agents, Some(&pki.served))
            .unwrap();
    assert!(agents.client("db1").is_some());
    assert!(agents.client("db2").is_none());
    std::fs::remove_file(&pki.served.cert).unwrap();
    assert!(agents.reload().is_err());
    // The previous channels stay.
    let client = agents.client("db1").unwrap();
    assert!(client.get_host_info().await.is_err());
    pki.serve_from(&pki.b);
    agents.reload().unwrap();
    assert!(agents.client("db1").is_some());
}

#[tokio::test]
async fn a_silent_client_delays_no_other_handshake() {
    let pki = Pki::new();
    let tls = ReloadableServerTls::load(&pki.served).unwrap();
    let addr = serve(tls).await;
    // Connects and never says a word: its handshake waits in its own task.
    let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _silent_too = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert_eq!(
        list_groups(addr, &pki.client(&pki.a, "alice")).await,
        Ok(())
    );
}
