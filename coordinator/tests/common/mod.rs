//! The operator API served over real mTLS on loopback, with a fake agent behind it, for the
//! tests of grants, the audit log and locks.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quiesce_coordinator::agent_client::AgentClient;
use quiesce_coordinator::catalog::Catalog;
use quiesce_coordinator::config::Config;
use quiesce_coordinator::fake_agent::FakeAgent;
use quiesce_coordinator::pki;
use quiesce_coordinator::workflow::Coordinator;
use quiesce_proto::coordinator::v1::coordinator_client::CoordinatorClient;
use quiesce_proto::identity::Role;
use quiesce_proto::tls::TlsFiles;
use quiesce_proto::tls_reload::ReloadableServerTls;
use tonic::transport::{Channel, Endpoint};

/// Serves `config` on 127.0.0.1 with mTLS; agent `db1` is a fake holding `/mnt/a` and `/mnt/b`.
pub async fn serve(dir: &Path, config: Config, catalog: Catalog) -> (SocketAddr, Arc<Coordinator>) {
    let mut agents: HashMap<String, Arc<dyn AgentClient>> = HashMap::new();
    agents.insert(
        "db1".into(),
        Arc::new(FakeAgent::new("db1", &["/mnt/a", "/mnt/b"])),
    );
    let coordinator = Coordinator::new(Arc::new(config), Arc::new(catalog), Arc::new(agents));
    let tls = ReloadableServerTls::load(&files(dir, "coordinator")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(quiesce_coordinator::server::serve(
        coordinator.clone(),
        listener,
        Some(tls),
        std::future::pending(),
    ));
    (addr, coordinator)
}

pub fn files(dir: &Path, name: &str) -> TlsFiles {
    TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    }
}

pub async fn client(addr: SocketAddr, dir: &Path, name: &str) -> CoordinatorClient<Channel> {
    let tls = files(dir, name).client_config("coordinator").unwrap();
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    CoordinatorClient::new(channel)
}

/// A CA, the coordinator's certificate, one operator certificate per name, and agent `db1`'s.
pub fn pki_dir(operators: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    pki::init_ca(dir.path(), "operator API test CA").unwrap();
    let localhost = [std::net::IpAddr::from([127, 0, 0, 1])];
    pki::issue(
        dir.path(),
        Role::Coordinator,
        "coordinator",
        &[],
        &localhost,
        1,
        false,
    )
    .unwrap();
    for name in operators {
        pki::issue(dir.path(), Role::Operator, name, &[], &[], 1, false).unwrap();
    }
    pki::issue(dir.path(), Role::Agent, "db1", &[], &localhost, 1, false).unwrap();
    dir
}
