//! The mTLS settings of one end of a Quiesce channel, read from PEM files.
//!
//! Every channel is mutual TLS under one private CA: a server requires a client certificate
//! signed by that CA, and a client trusts nothing but that CA. Who the peer is — its role and
//! name — is read afterwards from the verified certificate by [`crate::identity`].

use std::error::Error as _;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, ServerTlsConfig};
use x509_parser::error::{PEMError, X509Error};
use x509_parser::pem::Pem;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::time::ASN1Time;

use crate::identity::{Identity, SCHEME};

const CA: &str = "CA file";
const CERT: &str = "certificate file";
const KEY: &str = "key file";

/// PEM labels of the unencrypted private-key formats rustls reads (PKCS#8, SEC1, PKCS#1).
const KEY_LABELS: [&str; 3] = ["PRIVATE KEY", "EC PRIVATE KEY", "RSA PRIVATE KEY"];

/// Paths to the PEM files of one end of an mTLS channel.
#[derive(Debug, Clone, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TlsFiles {
    /// The certificate(s) of the CA that signs every Quiesce certificate.
    pub ca: PathBuf,
    /// This end's certificate, leaf first.
    pub cert: PathBuf,
    /// This end's private key, unencrypted.
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what} {path} holds malformed PEM")]
    Pem {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: PEMError,
    },
    #[error("{what} {path} holds no PEM certificate")]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("{what} {path} holds a malformed certificate")]
    BadCertificate {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: X509Error,
    },
    #[error("key file {path} holds no PEM private key")]
    NoPrivateKey { path: PathBuf },
    #[error("key file {path} holds an encrypted private key; it must be unencrypted")]
    EncryptedKey { path: PathBuf },
}

impl TlsFiles {
    /// Server side: present cert/key, REQUIRE a client certificate signed by `ca`.
    pub fn server_config(&self) -> Result<ServerTlsConfig, TlsError> {
        let ca = read_certificates(CA, &self.ca)?;
        let identity = self.identity()?;
        Ok(ServerTlsConfig::new()
            .identity(identity)
            .client_ca_root(Certificate::from_pem(ca.pem))
            .client_auth_optional(false))
    }

    /// Client side: present cert/key, trust only `ca`, and verify the server's certificate
    /// against `server_name` (a DNS SAN in it).
    pub fn client_config(&self, server_name: &str) -> Result<ClientTlsConfig, TlsError> {
        let ca = read_certificates(CA, &self.ca)?;
        let identity = self.identity()?;
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca.pem))
            .identity(identity)
            .domain_name(server_name))
    }

    /// Reads and sanity-checks all three files and returns every problem found (empty: all
    /// good): each must be readable PEM, `ca` and `cert` holding valid, current certificates
    /// (`cert` with a Quiesce identity) and `key` an unencrypted private key that other users
    /// cannot read.
    pub fn check(&self) -> Vec<String> {
        let mut problems = Vec::new();
        match read_certificates(CA, &self.ca) {
            Ok(ca) => check_validity(CA, &self.ca, &ca.certs, &mut problems),
            Err(err) => problems.push(describe(&err)),
        }
        match read_certificates(CERT, &self.cert) {
            Ok(cert) => {
                check_validity(CERT, &self.cert, &cert.certs, &mut problems);
                if Identity::from_der(&cert.certs[0]).is_none() {
                    problems.push(format!(
                        "{CERT} {}: the certificate carries no single {SCHEME}<role>/<name> \
                         identity",
                        self.cert.display()
                    ));
                }
            }
            Err(err) => problems.push(describe(&err)),
        }
        match read_key(&self.key) {
            Ok(_) => check_key_mode(&self.key, &mut problems),
            Err(err) => problems.push(describe(&err)),
        }
        problems
    }

    fn identity(&self) -> Result<tonic::transport::Identity, TlsError> {
        let cert = read_certificates(CERT, &self.cert)?;
        let key = read_key(&self.key)?;
        Ok(tonic::transport::Identity::from_pem(cert.pem, key))
    }
}

/// A PEM file of certificates: its text and the DER of each certificate, in file order.
struct Certificates {
    pem: Vec<u8>,
    /// Never empty.
    certs: Vec<Vec<u8>>,
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// The PEM blocks of `pem`; text around them is ignored, as rustls does.
fn pem_blocks(what: &'static str, path: &Path, pem: &[u8]) -> Result<Vec<Pem>, TlsError> {
    Pem::iter_from_buffer(pem)
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Pem {
            what,
            path: path.to_owned(),
            source,
        })
}

fn read_certificates(what: &'static str, path: &Path) -> Result<Certificates, TlsError> {
    let pem = read_file(what, path)?;
    let mut certs = Vec::new();
    for block in pem_blocks(what, path, &pem)? {
        if block.label != "CERTIFICATE" {
            continue;
        }
        if let Err(err) = X509Certificate::from_der(&block.contents) {
            let source = match err {
                x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e) => e,
                x509_parser::nom::Err::Incomplete(_) => X509Error::InvalidCertificate,
            };
            return Err(TlsError::BadCertificate {
                what,
                path: path.to_owned(),
                source,
            });
        }
        certs.push(block.contents);
    }
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_owned(),
        });
    }
    Ok(Certificates { pem, certs })
}

/// The text of a PEM file holding an unencrypted private key.
fn read_key(path: &Path) -> Result<Vec<u8>, TlsError> {
    let pem = read_file(KEY, path)?;
    let blocks = pem_blocks(KEY, path, &pem)?;
    if blocks
        .iter()
        .any(|b| KEY_LABELS.contains(&b.label.as_str()))
    {
        return Ok(pem);
    }
    if blocks.iter().any(|b| b.label == "ENCRYPTED PRIVATE KEY") {
        return Err(TlsError::EncryptedKey {
            path: path.to_owned(),
        });
    }
    Err(TlsError::NoPrivateKey {
        path: path.to_owned(),
    })
}

fn check_validity(what: &str, path: &Path, certs: &[Vec<u8>], problems: &mut Vec<String>) {
    for der in certs {
        // Already parsed once by `read_certificates`.
        let Ok((_, cert)) = X509Certificate::from_der(der) else {
            continue;
        };
        let validity = cert.validity();
        let now = ASN1Time::now();
        let subject = cert.subject();
        let path = path.display();
        if validity.not_after < now {
            let not_after = validity.not_after;
            problems.push(format!(
                "{what} {path}: certificate \"{subject}\" expired on {not_after}"
            ));
        } else if now < validity.not_before {
            let not_before = validity.not_before;
            problems.push(format!(
                "{what} {path}: certificate \"{subject}\" is not valid before {not_before}"
            ));
        }
    }
}

fn check_key_mode(path: &Path, problems: &mut Vec<String>) {
    match fs::metadata(path) {
        Ok(meta) if meta.permissions().mode() & 0o004 != 0 => problems.push(format!(
            "{KEY} {}: readable by every user (mode {:o}); make it 0600",
            path.display(),
            meta.permissions().mode() & 0o777
        )),
        Ok(_) => {}
        Err(source) => problems.push(describe(&TlsError::Read {
            what: KEY,
            path: path.to_owned(),
            source,
        })),
    }
}

/// The error and its causes on one line.
fn describe(err: &TlsError) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> TlsFiles {
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("me.pem"),
            key: dir.join("me.key"),
        }
    }

    #[test]
    fn missing_files_are_each_reported() {
        let dir = tempfile::tempdir().unwrap();
        let files = files(dir.path());
        let problems = files.check();
        assert_eq!(problems.len(), 3, "{problems:#?}");
        for (problem, path) in problems.iter().zip([&files.ca, &files.cert, &files.key]) {
            assert!(problem.starts_with("cannot read "), "{problem}");
            assert!(problem.contains(&path.display().to_string()), "{problem}");
            assert!(problem.contains("No such file"), "{problem}");
        }
    }

    #[test]
    fn garbage_files_are_each_reported() {
        let dir = tempfile::tempdir().unwrap();
        let files = files(dir.path());
        fs::write(&files.ca, "not a certificate\n").unwrap();
        fs::write(&files.cert, [0xff, 0xfe, 0x00, 0x01, b'\n', 0x80]).unwrap();
        fs::write(
            &files.key,
            "-----BEGIN PRIVATE KEY-----\n!!!\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let problems = files.check();
        assert_eq!(
            problems,
            [
                format!("CA file {} holds no PEM certificate", files.ca.display()),
                format!(
                    "certificate file {} holds no PEM certificate",
                    files.cert.display()
                ),
                format!(
                    "key file {} holds malformed PEM: base64 decode error",
                    files.key.display()
                ),
            ]
        );
    }

    #[test]
    fn wrong_kinds_of_pem_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let files = files(dir.path());
        let block = |label: &str, body: &str| {
            format!("-----BEGIN {label}-----\n{body}\n-----END {label}-----\n")
        };
        // Base64 of bytes that are no DER certificate.
        fs::write(&files.ca, block("CERTIFICATE", "AAEC")).unwrap();
        fs::write(&files.cert, block("PRIVATE KEY", "AAEC")).unwrap();
        fs::write(&files.key, block("ENCRYPTED PRIVATE KEY", "AAEC")).unwrap();
        let problems = files.check();
        assert_eq!(problems.len(), 3, "{problems:#?}");
        assert!(
            problems[0].starts_with(&format!(
                "CA file {} holds a malformed certificate",
                files.ca.display()
            )),
            "{}",
            problems[0]
        );
        assert_eq!(
            problems[1],
            format!(
                "certificate file {} holds no PEM certificate",
                files.cert.display()
            )
        );
        assert_eq!(
            problems[2],
            format!(
                "key file {} holds an encrypted private key; it must be unencrypted",
                files.key.display()
            )
        );
    }

    #[test]
    fn configs_fail_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let files = files(dir.path());
        let err = files.server_config().unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("cannot read CA file {}", files.ca.display())
        );
        fs::write(&files.ca, "junk").unwrap();
        let err = files.client_config("central").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("CA file {} holds no PEM certificate", files.ca.display())
        );
    }
}
