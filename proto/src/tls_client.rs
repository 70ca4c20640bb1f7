//! The client end of an mTLS channel that also checks *who* the server is: not only that its
//! certificate is signed by the CA and names the host it was reached by (what tonic's own TLS
//! checks), but that it carries the one Quiesce identity the client meant to reach —
//! `quiesce://agent/db9` for agent db9. Without this, any certificate of the CA with DNS name
//! `db9` (an operator's, a coordinator's, another agent's) would be taken for agent db9.
//!
//! tonic 0.14's `ClientTlsConfig` takes no custom certificate verifier, so the handshake is
//! ours: [`IdentityConnector`] connects TCP and runs rustls with [`IdentityVerifier`] (the
//! webpki verifier, then the identity check), ALPN `h2`, TLS 1.2 and 1.3 as tonic offers. The
//! channel is handed to tonic with `Endpoint::connect_with_connector_lazy` over an `http://`
//! form of the endpoint, since the connector has done TLS already.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::identity::Identity;
use crate::tls::{TlsError, TlsFiles};

/// Checks the chain and host name as webpki does, then that the certificate's Quiesce identity
/// is exactly `expected`.
#[derive(Debug)]
pub struct IdentityVerifier {
    inner: Arc<WebPkiServerVerifier>,
    expected: Identity,
}

impl IdentityVerifier {
    /// Whether a verified leaf certificate names `expected`; the error says whom it names.
    pub fn check(expected: &Identity, der: &[u8]) -> Result<(), String> {
        match Identity::from_der(der) {
            Some(found) if &found == expected => Ok(()),
            Some(found) => Err(format!(
                "the server's certificate is {} ({}), not {expected} ({}): refused",
                found,
                found.uri(),
                expected.uri()
            )),
            None => Err(format!(
                "the server's certificate carries no single Quiesce identity, expected {expected} ({}): refused",
                expected.uri()
            )),
        }
    }
}

impl ServerCertVerifier for IdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        IdentityVerifier::check(&self.expected, end_entity.as_ref())
            .map_err(rustls::Error::General)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Errors building the client's TLS settings.
#[derive(Debug, thiserror::Error)]
pub enum ClientTlsError {
    #[error(transparent)]
    Files(#[from] TlsError),
    #[error("CA file {path}: no usable CA certificate")]
    Verifier {
        path: String,
        #[source]
        source: rustls::client::VerifierBuilderError,
    },
    #[error("certificate {cert} and key {key} do not make a usable client identity")]
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
    #[error("{name:?} is not a valid server name")]
    ServerName { name: String },
}

/// A tower connector for tonic: TCP to the endpoint's host and port, then the mTLS handshake
/// with [`IdentityVerifier`].
#[derive(Clone)]
pub struct IdentityConnector {
    tls: TlsConnector,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for IdentityConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityConnector")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl TlsFiles {
    /// Client side that accepts only a server whose certificate names `server_name` (DNS) and
    /// carries the identity `expected`; presents this end's certificate.
    pub fn identity_connector(
        &self,
        server_name: &str,
        expected: Identity,
    ) -> Result<IdentityConnector, ClientTlsError> {
        // Every file checked the way the tonic path reads them (errors name the file).
        self.client_config(server_name)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for cert in
            CertificateDer::pem_file_iter(&self.ca).map_err(|source| ClientTlsError::Pem {
                path: self.ca.display().to_string(),
                source,
            })?
        {
            let cert = cert.map_err(|source| ClientTlsError::Pem {
                path: self.ca.display().to_string(),
                source,
            })?;
            // Certificates rustls cannot use as trust anchors are skipped, as tonic does.
            let _ = roots.add(cert);
        }
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|source| ClientTlsError::Verifier {
                path: self.ca.display().to_string(),
                source,
            })?;
        let chain = CertificateDer::pem_file_iter(&self.cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|source| ClientTlsError::Pem {
                path: self.cert.display().to_string(),
                source,
            })?;
        let key =
            PrivateKeyDer::from_pem_file(&self.key).map_err(|source| ClientTlsError::Pem {
                path: self.key.display().to_string(),
                source,
            })?;
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|source| ClientTlsError::Identity {
                cert: self.cert.display().to_string(),
                key: self.key.display().to_string(),
                source,
            })?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(IdentityVerifier { inner, expected }))
            .with_client_auth_cert(chain, key)
            .map_err(|source| ClientTlsError::Identity {
                cert: self.cert.display().to_string(),
                key: self.key.display().to_string(),
                source,
            })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        let server_name = ServerName::try_from(server_name.to_owned()).map_err(|_| {
            ClientTlsError::ServerName {
                name: server_name.to_owned(),
            }
        })?;
        Ok(IdentityConnector {
            tls: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }
}

impl tower_service::Service<http::Uri> for IdentityConnector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, io::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let tls = self.tls.clone();
        let server_name = self.server_name.clone();
        Box::pin(async move {
            let host = uri.host().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("{uri}: no host"))
            })?;
            // `[::1]` in a URI is `::1` to connect to.
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host, port)).await?;
            tcp.set_nodelay(true)?;
            let stream = tls.connect(server_name, tcp).await?;
            Ok(TokioIo::new(stream))
        })
    }
}
