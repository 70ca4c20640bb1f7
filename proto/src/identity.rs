//! Who is on the other end of an mTLS channel.
//!
//! Every Quiesce certificate carries one URI subject alternative name
//! `quiesce://<role>/<name>` (role: `agent`, `coordinator` or `operator`) next to the DNS and IP
//! names its server side is reached by. The chain is checked by rustls against the configured
//! CA; this module only reads the role and name out of an already verified leaf certificate, so
//! that an agent obeys only its named coordinators and the coordinator's API serves only
//! operators.

use std::fmt;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// URI scheme of the identity SAN.
pub const SCHEME: &str = "quiesce://";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Agent,
    Coordinator,
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Coordinator => "coordinator",
            Role::Operator => "operator",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "agent" => Some(Role::Agent),
            "coordinator" => Some(Role::Coordinator),
            "operator" => Some(Role::Operator),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The identity a verified peer certificate names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub role: Role,
    pub name: String,
}

impl Identity {
    pub fn new(role: Role, name: impl Into<String>) -> Self {
        Identity {
            role,
            name: name.into(),
        }
    }

    /// The SAN URI that carries this identity.
    pub fn uri(&self) -> String {
        format!("{SCHEME}{}/{}", self.role, self.name)
    }

    /// Parses `quiesce://role/name`.
    pub fn from_uri(uri: &str) -> Option<Identity> {
        let rest = uri.strip_prefix(SCHEME)?;
        let (role, name) = rest.split_once('/')?;
        if name.is_empty() || name.contains('/') {
            return None;
        }
        Some(Identity::new(Role::parse(role)?, name))
    }

    /// Reads the identity out of a DER certificate. `None` when it carries no (or more than
    /// one) Quiesce identity.
    pub fn from_der(der: &[u8]) -> Option<Identity> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let san = cert.subject_alternative_name().ok()??;
        let mut found = san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::URI(uri) => Identity::from_uri(uri),
                _ => None,
            });
        let first = found.next()?;
        match found.next() {
            Some(_) => None,
            None => Some(first),
        }
    }

    /// The identity of the client of a request received over mTLS, if any.
    pub fn of_peer<T>(request: &tonic::Request<T>) -> Option<Identity> {
        let certs = request.peer_certs()?;
        Identity::from_der(certs.first()?.as_ref())
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.role, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_round_trips() {
        let id = Identity::new(Role::Coordinator, "central");
        assert_eq!(id.uri(), "quiesce://coordinator/central");
        assert_eq!(Identity::from_uri(&id.uri()), Some(id));
    }

    #[test]
    fn malformed_uris_name_nobody() {
        for bad in [
            "quiesce://operator/",
            "quiesce://root/alice",
            "https://operator/alice",
            "quiesce://operator/a/b",
            "quiesce://operator",
        ] {
            assert_eq!(Identity::from_uri(bad), None, "{bad}");
        }
    }
}
