//! A test CA (made with `quiesce_coordinator::pki`) and the certificates of one coordinator,
//! one agent and one operator.

use std::path::{Path, PathBuf};

use quiesce_proto::identity::Role;
use quiesce_proto::tls::TlsFiles;

/// Name of the coordinator certificate (`quiesce://coordinator/coordinator`).
pub const COORDINATOR: &str = "coordinator";
/// Name of the agent certificate and of the agent in the coordinator's config.
pub const AGENT: &str = "db1";
/// Name of the operator certificate.
pub const OPERATOR: &str = "op";

/// A test CA made with `quiesce_coordinator::pki`, with the certificates of a coordinator
/// ([`COORDINATOR`], reachable at 127.0.0.1), an agent ([`AGENT`], 127.0.0.1) and an operator
/// ([`OPERATOR`]).
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        quiesce_coordinator::pki::init_ca(dir, "Quiesce test CA").expect("init CA");
        let pki = Pki {
            dir: dir.to_owned(),
        };
        pki.issue(Role::Coordinator, COORDINATOR);
        pki.issue(Role::Agent, AGENT);
        pki.issue(Role::Operator, OPERATOR);
        pki
    }

    /// Issues `NAME.pem`/`NAME.key` for `role` (DNS SAN `name`, IP SAN 127.0.0.1).
    pub fn issue(&self, role: Role, name: &str) {
        let localhost = [std::net::IpAddr::from([127, 0, 0, 1])];
        quiesce_coordinator::pki::issue(&self.dir, role, name, &[], &localhost, 2, false)
            .unwrap_or_else(|e| panic!("issue {role} {name}: {e}"));
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join(quiesce_coordinator::pki::CA_CERT)
    }

    pub fn cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pem"))
    }

    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.key"))
    }

    /// The mTLS files of `name`, trusting this CA.
    pub fn tls(&self, name: &str) -> TlsFiles {
        TlsFiles {
            ca: self.ca(),
            cert: self.cert(name),
            key: self.key(name),
        }
    }
}
