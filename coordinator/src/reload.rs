//! The coordinator's side of certificate rotation: its certificate is also the client
//! identity it presents to agents, so a reload rebuilds the agents' channels too. Sets already
//! running keep the channels they started with; the next call of `client` gets the new ones.

use std::sync::{Arc, RwLock};

use quiesce_proto::tls::TlsFiles;

use crate::agent_client::{AgentClient, AgentDirectory, ConnectError, GrpcAgents};
use crate::config::AgentConfig;

/// `GrpcAgents` that can be rebuilt from the same agent list and TLS files.
pub struct ReloadableAgents {
    agents: Vec<AgentConfig>,
    tls: Option<TlsFiles>,
    current: RwLock<Arc<GrpcAgents>>,
}

impl ReloadableAgents {
    pub fn new(agents: &[AgentConfig], tls: Option<&TlsFiles>) -> Result<Self, ConnectError> {
        Ok(ReloadableAgents {
            current: RwLock::new(Arc::new(GrpcAgents::new(agents, tls)?)),
            agents: agents.to_vec(),
            tls: tls.cloned(),
        })
    }

    /// Re-reads the TLS files into fresh (lazily connected) channels; on error nothing changes.
    pub fn reload(&self) -> Result<(), ConnectError> {
        let fresh = Arc::new(GrpcAgents::new(&self.agents, self.tls.as_ref())?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }
}

impl AgentDirectory for ReloadableAgents {
    fn client(&self, name: &str) -> Option<Arc<dyn AgentClient>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .client(name)
    }
}
