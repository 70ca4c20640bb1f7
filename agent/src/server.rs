//! Serving the agent API: mTLS, the coordinator check, graceful shutdown that thaws.

use std::future::Future;
use std::sync::Arc;

use quiesce_proto::admission::{Admit, Limits, Verdict};
use quiesce_proto::agent::v1::agent_server::AgentServer;
use quiesce_proto::identity::{Identity, Role};
use quiesce_proto::tls_reload::ReloadableServerTls;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;

use crate::freeze::FreezeManager;
use crate::service::{AgentService, CoordinatorAuth};

/// Listen backlog of the gRPC socket (the kernel caps it at `net.core.somaxconn`): room for
/// bursts of connections while the accept loop catches up, so a coordinator's SYN is not
/// dropped (a dropped SYN costs a 1 s retransmission).
const LISTEN_BACKLOG: u32 = 4096;

/// Binds the gRPC listener.
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Largest request the agent decodes (tonic's default is 4 MiB).
pub const MAX_REQUEST_BYTES: usize = 2 << 20;

/// Concurrent calls one connection may have in flight.
const MAX_STREAMS_PER_CONNECTION: u32 = 64;

/// Once a TLS handshake is done, the named coordinators keep their connection whatever else is
/// connected; any other certificate the CA signed (an operator's, another agent's) shares a
/// few connections, so it is told why each call is refused (by the interceptor) but cannot
/// take the descriptors a coordinator needs.
fn coordinators_only(config: &crate::config::Config) -> Admit {
    let allowed = config.allowed_coordinators.clone();
    Arc::new(move |certs| {
        match certs
            .first()
            .and_then(|leaf| Identity::from_der(leaf.as_ref()))
        {
            Some(id) if id.role == Role::Coordinator && allowed.contains(&id.name) => Verdict::Keep,
            _ => Verdict::Limited,
        }
    })
}

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
    // A request's size is bounded before it is decoded: the largest valid one (every volume
    // of a request at PATH_MAX) is well under this.
    let service = InterceptedService::new(
        AgentServer::new(AgentService::new(manager.clone()))
            .max_decoding_message_size(MAX_REQUEST_BYTES),
        auth,
    );
    // Thaw first, then drain: a shutdown never waits on a frozen filesystem.
    let thaw_then_drain = {
        let manager = manager.clone();
        async move {
            shutdown.await;
            let thawed = manager.shutdown().await;
            tracing::info!(thawed, "shutting down: every freeze thawed");
        }
    };
    let router = Server::builder()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .concurrency_limit_per_connection(MAX_STREAMS_PER_CONNECTION as usize)
        .add_service(service);
    // TLS is terminated by `ReloadableServerTls` so that SIGHUP can swap the certificate.
    let result = match tls {
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(
                    tls.incoming_with(
                        listener,
                        Limits::default(),
                        Some(coordinators_only(manager.config())),
                    ),
                    thaw_then_drain,
                )
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
