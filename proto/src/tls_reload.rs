//! Server-side mTLS whose certificate, key and CA can be replaced while the server runs
//! (certificate rotation without a restart, on SIGHUP).
//!
//! tonic 0.14's `ServerTlsConfig` is fixed once the server is built, so a daemon that wants
//! to rotate its certificate terminates TLS itself: [`ReloadableServerTls::incoming`] accepts
//! TCP connections, runs each handshake with the `rustls::ServerConfig` current at that
//! moment, and hands the finished `TlsStream`s to `Server::serve_with_incoming_shutdown`.
//! tonic implements `Connected` for `tokio_rustls::server::TlsStream`, so a request's
//! `peer_certs()` — and with it [`crate::identity::Identity::of_peer`] — works unchanged.
//! [`ReloadableServerTls::reload`] builds a new config from the same files and swaps it in
//! only if every file checks out; connections already open keep the config they started with.
//! The settings match what `TlsFiles::server_config` gives tonic: client certificate
//! required and verified against the CA, ALPN `h2`, TLS 1.2 and 1.3.

use std::io;
use std::os::fd::AsFd;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use crate::admission::{Admit, Counted, LimitedCount, Limits, Pending, Verdict};
use crate::tls::TlsFiles;

/// The TLS connections `incoming` yields, ready for `serve_with_incoming_shutdown`.
pub type TlsIncoming = ReceiverStream<Result<Counted<TlsStream<TcpStream>>, io::Error>>;

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The files failed `TlsFiles::check`: one line per problem.
    #[error("{}", .0.join("; "))]
    Files(Vec<String>),
    #[error("CA file {path}: no usable CA certificate")]
    Verifier {
        path: String,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("certificate {cert} and key {key} do not make a usable identity")]
    Identity {
        cert: String,
        key: String,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot parse {path}")]
    Pem {
        path: String,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
}

/// The server end of an mTLS channel, reloadable from its files.
#[derive(Debug)]
pub struct ReloadableServerTls {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
}

impl ReloadableServerTls {
    /// Loads the files; fails on every problem `TlsFiles::check` finds, or if rustls refuses
    /// them (a key that does not match the certificate, say).
    pub fn load(files: &TlsFiles) -> Result<Arc<Self>, ReloadError> {
        let config = build(files)?;
        Ok(Arc::new(ReloadableServerTls {
            files: files.clone(),
            current: RwLock::new(config),
        }))
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Reads the files again. On success new handshakes use them; on failure nothing changes
    /// and the previous certificate keeps being served.
    pub fn reload(&self) -> Result<(), ReloadError> {
        let config = build(&self.files)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = config;
        Ok(())
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }

    /// Accepts on `listener` until the returned stream is dropped, with the default
    /// [`Limits`] and no admission check: see [`ReloadableServerTls::incoming_with`].
    pub fn incoming(self: &Arc<Self>, listener: TcpListener) -> TlsIncoming {
        self.incoming_with(listener, Limits::default(), None)
    }

    /// Accepts on `listener` until the returned stream is dropped. Each handshake runs in its
    /// own task (a slow or silent client delays nobody) with the config current when the
    /// connection arrived, under `limits` (see [`crate::admission`]); failed handshakes, and
    /// peers `admit` refuses, are logged and dropped, never yielded.
    pub fn incoming_with(
        self: &Arc<Self>,
        listener: TcpListener,
        limits: Limits,
        admit: Option<Admit>,
    ) -> TlsIncoming {
        let (tx, rx) = mpsc::channel(32);
        let tls = self.clone();
        let pending = Pending::default();
        let limited = LimitedCount::default();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = tx.closed() => return,
                };
                let (tcp, peer) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // EMFILE and the like: back off instead of spinning.
                        tracing::warn!(error = %e, pending = pending.len(), "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = tls.acceptor();
                let tx = tx.clone();
                let admit = admit.clone();
                let limited = limited.clone();
                let probe = tcp
                    .as_fd()
                    .try_clone_to_owned()
                    .ok()
                    .map(std::net::TcpStream::from);
                let evicted = pending.admit(peer.ip(), probe, &limits, move |slot| {
                    tokio::spawn(async move {
                        let handshake = async {
                            // Idle until the first byte: idle connections are closed first.
                            tcp.readable().await?;
                            slot.spoke();
                            acceptor.accept(tcp).await
                        };
                        let stream =
                            match tokio::time::timeout(limits.handshake_timeout, handshake).await {
                                Ok(Ok(stream)) => stream,
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                    return;
                                }
                                Err(_) => {
                                    tracing::debug!(%peer, "TLS handshake timed out");
                                    return;
                                }
                            };
                        drop(slot);
                        let certs = stream.get_ref().1.peer_certificates().unwrap_or(&[]);
                        let verdict = match &admit {
                            Some(admit) => admit(certs),
                            None => Verdict::Keep,
                        };
                        let limited = match verdict {
                            Verdict::Keep => None,
                            Verdict::Limited => match limited.take(limits.max_limited) {
                                Some(slot) => Some(slot),
                                None => {
                                    tracing::debug!(%peer, "too many connections of peers that are refused anyway; closed");
                                    return;
                                }
                            },
                            Verdict::Refuse(why) => {
                                tracing::debug!(%peer, why, "connection refused after the handshake");
                                return;
                            }
                        };
                        let _ = tx.send(Ok(Counted::new(stream, limited))).await;
                    })
                    .abort_handle()
                });
                if evicted > 0 {
                    tracing::debug!(%peer, evicted, "pending-connection cap reached; closed idle connections");
                }
            }
        });
        ReceiverStream::new(rx)
    }
}

fn build(files: &TlsFiles) -> Result<Arc<ServerConfig>, ReloadError> {
    let problems = files.check();
    if !problems.is_empty() {
        return Err(ReloadError::Files(problems));
    }
    let pem_err = |path: &std::path::Path| {
        let path = path.display().to_string();
        move |source| ReloadError::Pem { path, source }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let ca: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.ca)
        .map_err(pem_err(&files.ca))?
        .collect::<Result<_, _>>()
        .map_err(pem_err(&files.ca))?;
    roots.add_parsable_certificates(ca);
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|source| ReloadError::Verifier {
            path: files.ca.display().to_string(),
            source,
        })?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(pem_err(&files.cert))?
        .collect::<Result<_, _>>()
        .map_err(pem_err(&files.cert))?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(pem_err(&files.key))?;
    let identity_err = |source| ReloadError::Identity {
        cert: files.cert.display().to_string(),
        key: files.key.display().to_string(),
        source,
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(identity_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(identity_err)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}
