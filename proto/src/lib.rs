//! The gRPC contracts of Quiesce, the identity scheme both ends of every channel check, and
//! the plumbing both daemons share (reloadable server TLS, systemd notification).

pub mod admission;
pub mod echo;
pub mod identity;
pub mod metrics_http;
pub mod states;
pub mod systemd;
pub mod tls;
pub mod tls_client;
pub mod tls_reload;

/// `quiesce.agent.v1`: the coordinator drives agents on database hosts.
pub mod agent {
    pub mod v1 {
        tonic::include_proto!("quiesce.agent.v1");
    }
}

/// `quiesce.coordinator.v1`: operators (quiescectl) drive the coordinator.
pub mod coordinator {
    pub mod v1 {
        tonic::include_proto!("quiesce.coordinator.v1");
    }
}
