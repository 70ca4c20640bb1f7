//! A small private CA for Quiesce's mTLS: creates the CA and issues the certificates of agents,
//! coordinators and operators.
//!
//! A CA directory holds `ca.pem` and `ca.key`, and every certificate issued from it as
//! `NAME.pem` and `NAME.key`. Each certificate carries the URI SAN `quiesce://<role>/<name>`
//! that [`quiesce_proto::identity`] reads, and DNS/IP SANs for reaching its server side.
//! Keys are ECDSA P-256 and written with mode 0600.

use std::fs::{self, DirBuilder, OpenOptions, Permissions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use quiesce_proto::identity::{Identity, Role};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// File names of the CA inside its directory.
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";

/// How long a new CA is valid.
const CA_DAYS: u32 = 3650;
const KEY_MODE: u32 = 0o600;
const CERT_MODE: u32 = 0o644;

#[derive(Debug, clap::Subcommand)]
pub enum PkiCommand {
    /// Create a new CA (ca.pem, ca.key) in DIR. Refuses to overwrite an existing one.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "Quiesce CA")]
        common_name: String,
    },
    /// Issue a certificate signed by DIR's CA: DIR/NAME.pem and DIR/NAME.key (0600).
    Issue {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, value_parser = ["agent", "coordinator", "operator"])]
        role: String,
        #[arg(long)]
        name: String,
        /// Extra DNS names the server side is reached by (NAME is always included).
        #[arg(long = "dns", value_name = "NAME")]
        dns: Vec<String>,
        /// IP addresses the server side is reached by.
        #[arg(long = "ip", value_name = "ADDR")]
        ips: Vec<IpAddr>,
        /// Validity of the certificate in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Replace an existing NAME.pem and NAME.key.
        #[arg(long)]
        force: bool,
    },
}

/// The files of an issued certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("unknown role {role:?}: expected agent, coordinator or operator")]
    UnknownRole { role: String },
    #[error("invalid name {name:?}: use letters, digits, '.', '_' and '-', not first '.' or '-'")]
    InvalidName { name: String },
    #[error("name {name:?} is reserved for the CA's own files")]
    ReservedName { name: String },
    #[error("invalid DNS name {name:?}")]
    InvalidDnsName { name: String },
    #[error("validity of {days} days is out of range")]
    InvalidDays { days: u32 },
    #[error("{path} already exists; refusing to overwrite a CA")]
    CaExists { path: PathBuf },
    #[error("{path} does not exist; create the CA first (pki init)")]
    NoCa { path: PathBuf },
    #[error("{path} already exists; use --force to replace it")]
    Exists { path: PathBuf },
    #[error("cannot create directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} holds no usable CA private key")]
    CaKey {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("{path} holds no usable CA certificate")]
    CaCert {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("cannot generate a key pair")]
    GenerateKey(#[source] rcgen::Error),
    #[error("cannot sign the certificate of {subject}")]
    Sign {
        subject: String,
        #[source]
        source: rcgen::Error,
    },
}

/// Runs a `pki` subcommand and returns a summary of the files written.
pub fn run(cmd: PkiCommand) -> Result<String, PkiError> {
    match cmd {
        PkiCommand::Init { dir, common_name } => {
            init_ca(&dir, &common_name)?;
            Ok(format!(
                "created CA {common_name:?}: {} (certificate), {} (private key: keep it secret)",
                dir.join(CA_CERT).display(),
                dir.join(CA_KEY).display()
            ))
        }
        PkiCommand::Issue {
            dir,
            role,
            name,
            dns,
            ips,
            days,
            force,
        } => {
            let role = Role::parse(&role).ok_or(PkiError::UnknownRole { role })?;
            let files = issue(&dir, role, &name, &dns, &ips, days, force)?;
            Ok(format!(
                "issued {} for {days} days: {} (certificate), {} (private key)",
                Identity::new(role, name).uri(),
                files.cert.display(),
                files.key.display()
            ))
        }
    }
}

/// Creates a new CA (`ca.pem`, `ca.key`) in `dir`, creating `dir` (0700) if needed. Refuses to
/// overwrite an existing CA.
pub fn init_ca(dir: &Path, common_name: &str) -> Result<(), PkiError> {
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    for path in [&cert_path, &key_path] {
        if path.exists() {
            return Err(PkiError::CaExists { path: path.clone() });
        }
    }
    create_dir(dir)?;

    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    set_validity(&mut params, CA_DAYS)?;

    let key = KeyPair::generate().map_err(PkiError::GenerateKey)?;
    let cert = params.self_signed(&key).map_err(|source| PkiError::Sign {
        subject: format!("CA {common_name:?}"),
        source,
    })?;

    let exists = |path: &Path| PkiError::CaExists {
        path: path.to_owned(),
    };
    write_file(&key_path, &key.serialize_pem(), KEY_MODE, false, exists)?;
    if let Err(err) = write_file(&cert_path, &cert.pem(), CERT_MODE, false, exists) {
        // Leave no half CA behind; a failed removal changes nothing about the error to report.
        let _ = fs::remove_file(&key_path);
        return Err(err);
    }
    Ok(())
}

/// Issues a certificate for `role`/`name` signed by the CA in `dir`, valid for `days` from now,
/// as `dir/NAME.pem` and `dir/NAME.key`. Its SANs: DNS `name`, each of `dns` and `ips`, and
/// URI `quiesce://<role>/<name>`. Refuses to replace existing files unless `force`.
pub fn issue(
    dir: &Path,
    role: Role,
    name: &str,
    dns: &[String],
    ips: &[IpAddr],
    days: u32,
    force: bool,
) -> Result<IssuedFiles, PkiError> {
    check_name(name)?;
    let identity = Identity::new(role, name);
    let cert_path = dir.join(format!("{name}.pem"));
    let key_path = dir.join(format!("{name}.key"));
    if !force {
        for path in [&cert_path, &key_path] {
            if path.exists() {
                return Err(PkiError::Exists { path: path.clone() });
            }
        }
    }

    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, role.as_str());
    params.subject_alt_names = subject_alt_names(&identity, dns, ips)?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, days)?;

    let issuer = load_issuer(dir)?;
    let key = KeyPair::generate().map_err(PkiError::GenerateKey)?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|source| PkiError::Sign {
            subject: identity.uri(),
            source,
        })?;

    let exists = |path: &Path| PkiError::Exists {
        path: path.to_owned(),
    };
    write_file(&key_path, &key.serialize_pem(), KEY_MODE, force, exists)?;
    if let Err(err) = write_file(&cert_path, &cert.pem(), CERT_MODE, force, exists) {
        if !force {
            // Leave no key without its certificate behind.
            let _ = fs::remove_file(&key_path);
        }
        return Err(err);
    }
    Ok(IssuedFiles {
        cert: cert_path,
        key: key_path,
    })
}

/// Names become file names and DNS SANs: letters, digits, `.`, `_` and `-`.
fn check_name(name: &str) -> Result<(), PkiError> {
    let valid = !name.is_empty()
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !valid {
        return Err(PkiError::InvalidName {
            name: name.to_owned(),
        });
    }
    // NAME.pem and NAME.key would be the CA's files.
    if format!("{name}.pem") == CA_CERT || format!("{name}.key") == CA_KEY {
        return Err(PkiError::ReservedName {
            name: name.to_owned(),
        });
    }
    Ok(())
}

fn subject_alt_names(
    identity: &Identity,
    dns: &[String],
    ips: &[IpAddr],
) -> Result<Vec<SanType>, PkiError> {
    let mut names: Vec<&str> = vec![&identity.name];
    for name in dns {
        if !names.contains(&name.as_str()) {
            names.push(name);
        }
    }
    let mut sans = Vec::new();
    for name in names {
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-*".contains(&b));
        let invalid = || PkiError::InvalidDnsName {
            name: name.to_owned(),
        };
        if !valid {
            return Err(invalid());
        }
        sans.push(SanType::DnsName(name.try_into().map_err(|_| invalid())?));
    }
    sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    let uri = identity.uri();
    let uri = uri.as_str().try_into().map_err(|_| PkiError::InvalidName {
        name: identity.name.clone(),
    })?;
    sans.push(SanType::URI(uri));
    Ok(sans)
}

/// Valid from an hour ago (clock skew) until `days` from now.
fn set_validity(params: &mut CertificateParams, days: u32) -> Result<(), PkiError> {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now
        .checked_add(Duration::days(i64::from(days)))
        .filter(|_| days > 0)
        .ok_or(PkiError::InvalidDays { days })?;
    Ok(())
}

fn load_issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    let cert_pem = read_ca_file(&cert_path)?;
    let key_pem = read_ca_file(&key_path)?;
    let key = KeyPair::from_pem(&key_pem).map_err(|source| PkiError::CaKey {
        path: key_path,
        source,
    })?;
    Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|source| PkiError::CaCert {
        path: cert_path,
        source,
    })
}

fn read_ca_file(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => PkiError::NoCa {
            path: path.to_owned(),
        },
        _ => PkiError::Read {
            path: path.to_owned(),
            source,
        },
    })
}

fn create_dir(dir: &Path) -> Result<(), PkiError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| PkiError::CreateDir {
            path: dir.to_owned(),
            source,
        })
}

/// Writes `contents` to `path` with exactly `mode`; an existing file is replaced only if
/// `replace`, and otherwise reported with `exists`.
fn write_file(
    path: &Path,
    contents: &str,
    mode: u32,
    replace: bool,
    exists: impl Fn(&Path) -> PkiError,
) -> Result<(), PkiError> {
    let mut options = OpenOptions::new();
    options.write(true).mode(mode);
    if replace {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let write = || -> io::Result<()> {
        let mut file = options.open(path)?;
        // `mode` applies only to a new file (and through the umask): tighten a replaced one
        // before its new contents go in.
        file.set_permissions(Permissions::from_mode(mode))?;
        file.write_all(contents.as_bytes())?;
        file.sync_all()
    };
    write().map_err(|source| match source.kind() {
        io::ErrorKind::AlreadyExists => exists(path),
        _ => PkiError::Write {
            path: path.to_owned(),
            source,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::GeneralName;
    use x509_parser::pem::parse_x509_pem;

    fn read_der(path: &Path) -> Vec<u8> {
        let pem = fs::read(path).unwrap();
        let (_, pem) = parse_x509_pem(&pem).unwrap();
        assert_eq!(pem.label, "CERTIFICATE");
        pem.contents
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// Whether the certificate at `leaf` carries a signature by the CA at `ca`.
    fn signed_by(leaf: &Path, ca: &Path) -> bool {
        let (leaf, ca) = (read_der(leaf), read_der(ca));
        let (_, leaf) = x509_parser::parse_x509_certificate(&leaf).unwrap();
        let (_, ca) = x509_parser::parse_x509_certificate(&ca).unwrap();
        leaf.verify_signature(Some(ca.public_key())).is_ok()
    }

    #[test]
    fn issues_every_role() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path().join("pki");
        init_ca(&dir, "Test CA").unwrap();
        assert_eq!(mode(&dir.join(CA_KEY)), 0o600);
        assert_eq!(mode(&dir), 0o700);

        for (role, name) in [
            (Role::Agent, "db1.example.com"),
            (Role::Coordinator, "central"),
            (Role::Operator, "alice"),
        ] {
            let files = issue(&dir, role, name, &[], &[], 30, false).unwrap();
            assert_eq!(files.cert, dir.join(format!("{name}.pem")));
            assert_eq!(files.key, dir.join(format!("{name}.key")));
            assert_eq!(mode(&files.key), 0o600);
            assert_eq!(mode(&files.cert), 0o644);
            let der = read_der(&files.cert);
            assert_eq!(Identity::from_der(&der), Some(Identity::new(role, name)));
            assert!(signed_by(&files.cert, &dir.join(CA_CERT)));
        }
    }

    #[test]
    fn certificate_contents() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), "Test CA").unwrap();
        let ips: [IpAddr; 2] = ["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()];
        let dns = ["db1.example.com".to_owned(), "db1".to_owned()];
        let files = issue(dir.path(), Role::Agent, "db1", &dns, &ips, 10, false).unwrap();

        let der = read_der(&files.cert);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let sans = &cert.subject_alternative_name().unwrap().unwrap().value;
        let sans: Vec<String> = sans
            .general_names
            .iter()
            .map(|name| match name {
                GeneralName::DNSName(name) => format!("dns:{name}"),
                GeneralName::URI(uri) => format!("uri:{uri}"),
                GeneralName::IPAddress(ip) => format!("ip:{ip:?}"),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            sans,
            [
                "dns:db1",
                "dns:db1.example.com",
                "ip:[127, 0, 0, 1]",
                "ip:[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]",
                "uri:quiesce://agent/db1",
            ]
        );
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let key_usage = cert.key_usage().unwrap().unwrap().value;
        assert!(key_usage.digital_signature() && !key_usage.key_cert_sign());
        assert!(!cert.is_ca());
        let lifetime = cert.validity().not_after - cert.validity().not_before;
        assert_eq!(lifetime.map(|d| d.whole_hours()), Some(10 * 24 + 1));

        let ca = read_der(&dir.path().join(CA_CERT));
        let (_, ca) = x509_parser::parse_x509_certificate(&ca).unwrap();
        assert!(ca.is_ca());
        let constraints = ca.basic_constraints().unwrap().unwrap().value;
        assert_eq!(constraints.path_len_constraint, Some(0));
        let key_usage = ca.key_usage().unwrap().unwrap().value;
        assert!(key_usage.key_cert_sign() && key_usage.crl_sign());
        assert_eq!(cert.issuer(), ca.subject());
    }

    #[test]
    fn refuses_to_overwrite_without_force() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), "Test CA").unwrap();
        let err = init_ca(dir.path(), "Test CA").unwrap_err();
        assert!(matches!(&err, PkiError::CaExists { path } if *path == dir.path().join(CA_CERT)));

        let first = issue(dir.path(), Role::Operator, "alice", &[], &[], 1, false).unwrap();
        let old = fs::read(&first.cert).unwrap();
        let err = issue(dir.path(), Role::Operator, "alice", &[], &[], 1, false).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{} already exists; use --force to replace it",
                first.cert.display()
            )
        );
        assert_eq!(fs::read(&first.cert).unwrap(), old);

        // A replaced key keeps mode 0600 even if it had been loosened.
        fs::set_permissions(&first.key, Permissions::from_mode(0o644)).unwrap();
        let second = issue(dir.path(), Role::Operator, "alice", &[], &[], 1, true).unwrap();
        assert_eq!(second, first);
        assert_ne!(fs::read(&second.cert).unwrap(), old);
        assert_eq!(mode(&second.key), 0o600);
    }

    #[test]
    fn certificates_of_another_ca_do_not_verify() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        init_ca(&a, "CA A").unwrap();
        init_ca(&b, "CA B").unwrap();
        let files = issue(&a, Role::Agent, "db1", &[], &[], 1, false).unwrap();
        assert!(signed_by(&files.cert, &a.join(CA_CERT)));
        assert!(!signed_by(&files.cert, &b.join(CA_CERT)));
    }

    #[test]
    fn rejects_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let issue_as = |name: &str, dns: &[String], days| {
            issue(dir.path(), Role::Agent, name, dns, &[], days, false).unwrap_err()
        };
        assert!(matches!(
            issue_as("db1", &[], 1),
            PkiError::NoCa { path } if path == dir.path().join(CA_CERT)
        ));
        init_ca(dir.path(), "Test CA").unwrap();
        for name in ["", "a/b", "../x", ".hidden", "-rf", "db 1", "dé"] {
            let err = issue_as(name, &[], 1);
            assert!(
                matches!(&err, PkiError::InvalidName { name: n } if n == name),
                "{err}"
            );
        }
        assert!(matches!(
            issue_as("ca", &[], 1),
            PkiError::ReservedName { .. }
        ));
        let err = issue_as("db1", &["bad name".to_owned()], 1);
        assert_eq!(err.to_string(), "invalid DNS name \"bad name\"");
        assert!(matches!(
            issue_as("db1", &[], 0),
            PkiError::InvalidDays { days: 0 }
        ));
        assert!(matches!(
            issue_as("db1", &[], u32::MAX),
            PkiError::InvalidDays { .. }
        ));
        // Nothing was left behind by the failures.
        let mut left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        left.sort();
        assert_eq!(left, [CA_KEY, CA_CERT]);

        let err = run(PkiCommand::Issue {
            dir: dir.path().to_owned(),
            role: "admin".to_owned(),
            name: "alice".to_owned(),
            dns: vec![],
            ips: vec![],
            days: 1,
            force: false,
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown role \"admin\": expected agent, coordinator or operator"
        );
    }

    #[test]
    fn parses_the_command_line() {
        use clap::{CommandFactory, Parser};

        #[derive(Debug, Parser)]
        struct Cli {
            #[command(subcommand)]
            pki: PkiCommand,
        }
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "pki", "issue", "--dir", "d", "--role", "agent", "--name", "db1", "--dns", "a",
            "--dns", "b", "--ip", "10.0.0.1",
        ])
        .unwrap();
        let PkiCommand::Issue {
            dns,
            ips,
            days,
            force,
            ..
        } = cli.pki
        else {
            panic!("{cli:?}");
        };
        assert_eq!(dns, ["a", "b"]);
        assert_eq!(ips, ["10.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!((days, force), (365, false));
        let err = Cli::try_parse_from([
            "pki", "issue", "--dir", "d", "--role", "root", "--name", "x",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("agent, coordinator, operator"), "{err}");
    }

    #[test]
    fn run_summarises_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let init = run(PkiCommand::Init {
            dir: dir.path().to_owned(),
            common_name: "Quiesce CA".to_owned(),
        })
        .unwrap();
        assert!(
            init.contains(&dir.path().join(CA_KEY).display().to_string()),
            "{init}"
        );
        let issued = run(PkiCommand::Issue {
            dir: dir.path().to_owned(),
            role: "coordinator".to_owned(),
            name: "central".to_owned(),
            dns: vec![],
            ips: vec![],
            days: 7,
            force: false,
        })
        .unwrap();
        assert!(
            issued.starts_with("issued quiesce://coordinator/central for 7 days"),
            "{issued}"
        );
    }
}
