//! Serving the operator API over mTLS.

use std::future::Future;
use std::sync::Arc;

use quiesce_proto::coordinator::v1::coordinator_server::CoordinatorServer;
use quiesce_proto::tls_reload::ReloadableServerTls;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;

use crate::service::{OperatorAuth, OperatorService};
use crate::workflow::Coordinator;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("gRPC server")]
    Transport(#[source] tonic::transport::Error),
}

pub async fn serve(
    coordinator: Arc<Coordinator>,
    listener: TcpListener,
    tls: Option<Arc<ReloadableServerTls>>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let auth = match tls {
        Some(_) => OperatorAuth::mtls().audited(coordinator.audit_log()),
        None => OperatorAuth::insecure(),
    };
    let service = CoordinatorServer::with_interceptor(OperatorService::new(coordinator), auth);
    let router = Server::builder().add_service(service);
    // TLS is terminated by `ReloadableServerTls` so that SIGHUP can swap the certificate.
    match tls {
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(tls.incoming(listener), shutdown)
                .await
        }
        None => {
            router
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
                .await
        }
    }
    .map_err(ServeError::Transport)
}
