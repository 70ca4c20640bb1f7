//! The gRPC contracts of Quiesce and the identity scheme both ends of every channel check.

pub mod identity;
pub mod tls;

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
