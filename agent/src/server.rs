//! Serving the agent API: mTLS, the coordinator check, graceful shutdown that thaws.

use std::future::Future;
use std::sync::Arc;

use quiesce_proto::agent::v1::agent_server::AgentServer;
use quiesce_proto::tls_reload::ReloadableServerTls;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;

use crate::freeze::FreezeManager;
use crate::service::{AgentService, CoordinatorAuth};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("gRPC server")]
    Transport(#[source] tonic::transport::Error),
}

/// Serves until `shutdown` resolves, then thaws everything still frozen. `tls: None` is plain
/// text (only with `--insecure`).
pub async fn serve(
    manager: Arc<FreezeManager>,
    listener: TcpListener,
    tls: Option<Arc<ReloadableServerTls>>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let auth = match tls {
        Some(_) => CoordinatorAuth::new(manager.config().allowed_coordinators.clone()),
        None => CoordinatorAuth::insecure(),
    };
    let service = AgentServer::with_interceptor(AgentService::new(manager.clone()), auth);
    // Thaw first, then drain: a shutdown never waits on a frozen filesystem.
    let thaw_then_drain = {
        let manager = manager.clone();
        async move {
            shutdown.await;
            let thawed = manager.shutdown().await;
            tracing::info!(thawed, "shutting down: every freeze thawed");
        }
    };
    let router = Server::builder().add_service(service);
    // TLS is terminated by `ReloadableServerTls` so that SIGHUP can swap the certificate.
    let result = match tls {
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(tls.incoming(listener), thaw_then_drain)
                .await
        }
        None => {
            router
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), thaw_then_drain)
                .await
        }
    }
    .map_err(ServeError::Transport);
    // Also covers a server that stopped on an error.
    manager.shutdown().await;
    result
}
