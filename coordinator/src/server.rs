//! Serving the operator API over mTLS.

use std::future::Future;
use std::sync::Arc;

use quiesce_proto::coordinator::v1::coordinator_server::CoordinatorServer;
use quiesce_proto::tls::{TlsError, TlsFiles};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;

use crate::service::{OperatorAuth, OperatorService};
use crate::workflow::Coordinator;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("TLS setup")]
    TlsSetup(#[source] tonic::transport::Error),
    #[error("gRPC server")]
    Transport(#[source] tonic::transport::Error),
}

pub async fn serve(
    coordinator: Arc<Coordinator>,
    listener: TcpListener,
    tls: Option<&TlsFiles>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let mut builder = Server::builder();
    let auth = match tls {
        Some(files) => {
            builder = builder
                .tls_config(files.server_config()?)
                .map_err(ServeError::TlsSetup)?;
            OperatorAuth::mtls()
        }
        None => OperatorAuth::insecure(),
    };
    let service = CoordinatorServer::with_interceptor(OperatorService::new(coordinator), auth);
    builder
        .add_service(service)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
        .map_err(ServeError::Transport)
}
