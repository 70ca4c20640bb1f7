//! The agent's TOML config (see `packaging/agent.toml` for the commented sample).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use quiesce_proto::tls::TlsFiles;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Config {
    /// Address the gRPC server listens on.
    pub listen: SocketAddr,
    /// Plain-HTTP Prometheus endpoint (`GET /metrics`), unauthenticated: keep it on loopback
    /// or a management network. A port that cannot be bound is logged, not fatal.
    /// `"off"` serves none.
    #[serde(
        default = "default_metrics_listen",
        deserialize_with = "metrics_listen"
    )]
    pub metrics_listen: Option<SocketAddr>,
    /// mTLS files. Required unless the agent runs with `--insecure`.
    pub tls: Option<TlsFiles>,
    /// Names (the `quiesce://coordinator/<name>` identity) of the coordinators this agent obeys.
    #[serde(default)]
    pub allowed_coordinators: Vec<String>,
    /// Freeze records live here; must be on tmpfs so that writing them never touches a disk
    /// filesystem that might be frozen.
    pub state_dir: PathBuf,
    /// Lease of a freeze whose request does not name one.
    #[serde(default = "default_lease", with = "humantime_serde")]
    pub default_lease: Duration,
    /// Hard cap: no freeze outlives this, whatever the coordinator asks or renews.
    #[serde(default = "default_max_freeze", with = "humantime_serde")]
    pub max_freeze: Duration,
    /// Deadline of one FIFREEZE ioctl (it syncs dirty data first and can block).
    #[serde(default = "default_freeze_timeout", with = "humantime_serde")]
    pub freeze_timeout: Duration,
    /// Most mount points one request may name (bounds what a request can cost the agent).
    #[serde(default = "default_max_volumes_per_request")]
    pub max_volumes_per_request: usize,
    /// The only filesystems this agent will ever freeze.
    #[serde(default, rename = "volume")]
    pub volumes: Vec<VolumeConfig>,
    #[serde(default)]
    pub reflink: ReflinkConfig,
    /// Database and script hooks, by name (`[hook.NAME]`); coordinators name them per member.
    #[serde(default, rename = "hook")]
    pub hooks: BTreeMap<String, crate::hooks::HookConfig>,
    /// EBS discovery for the coordinator's EBS provider: volume ids from NVMe serials and the
    /// instance id from IMDSv2. Off (nothing reported, IMDS never called) without this section.
    pub ebs: Option<EbsConfig>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct EbsConfig {
    /// This host's EC2 instance id; when set, IMDS is never asked.
    pub instance_id: Option<String>,
    /// IMDSv2 endpoint (`http://host:port`).
    #[serde(default = "default_imds_endpoint")]
    pub imds_endpoint: String,
    /// Deadline of the IMDSv2 exchange (token PUT, then GET).
    #[serde(default = "default_imds_timeout", with = "humantime_serde")]
    pub imds_timeout: Duration,
}

fn default_imds_endpoint() -> String {
    "http://169.254.169.254".into()
}

fn default_imds_timeout() -> Duration {
    Duration::from_secs(1)
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct VolumeConfig {
    /// Mount point, exactly as it appears in /proc/self/mountinfo.
    pub mount: PathBuf,
    /// EBS volume id (`vol-…`) of this mount's device, for hosts where it cannot be read from
    /// the NVMe serial. Reported to the coordinator as is.
    pub ebs_volume_id: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ReflinkConfig {
    /// Where snapshot clones go; must be on the filesystem holding the loop backing files.
    /// Default: `.quiesce-snapshots` next to each backing file.
    pub snapshot_dir: Option<PathBuf>,
    /// Plan-time estimate of one extent's clone cost; the estimate is the backing file's extent
    /// count (FIEMAP) times this. Default 40µs (measured ≈35 µs on XFS, docs/consistency.md).
    #[serde(default, with = "humantime_serde")]
    pub extent_cost: Option<Duration>,
}

fn metrics_listen<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(deserializer)?;
    if text == "off" {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|e| {
        serde::de::Error::custom(format!(
            "metrics-listen {text:?}: {e} (an address like \"127.0.0.1:9740\", or \"off\")"
        ))
    })
}

fn default_metrics_listen() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 9741)))
}

fn default_lease() -> Duration {
    Duration::from_secs(10)
}

fn default_max_freeze() -> Duration {
    Duration::from_secs(60)
}

/// Upper bound of `max-volumes-per-request`: the guardian receives a set's descriptors in one
/// SCM_RIGHTS message, which carries at most 253.
pub const MAX_VOLUMES_PER_REQUEST: usize = 250;

fn default_max_volumes_per_request() -> usize {
    64
}

fn default_freeze_timeout() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    pub fn parse(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    /// Every problem with the config itself (not the host), all at once.
    pub fn problems(&self, insecure: bool) -> Vec<String> {
        let mut problems = Vec::new();
        match (&self.tls, insecure) {
            (None, false) => problems.push(
                "no [tls] section: mTLS is required (plain text only with --insecure)".into(),
            ),
            (Some(tls), _) => problems.extend(tls.check()),
            (None, true) => {}
        }
        if self.tls.is_some() && self.allowed_coordinators.is_empty() {
            problems.push(
                "allowed-coordinators is empty: no coordinator could ever use this agent".into(),
            );
        }
        if !self.state_dir.is_absolute() {
            problems.push(format!(
                "state-dir {} must be an absolute path",
                self.state_dir.display()
            ));
        }
        if self.default_lease.is_zero() {
            problems.push("default-lease must be longer than 0s".into());
        }
        if self.max_freeze.is_zero() {
            problems.push("max-freeze must be longer than 0s".into());
        }
        if self.default_lease > self.max_freeze {
            problems.push(format!(
                "default-lease ({}) is longer than max-freeze ({})",
                humantime::format_duration(self.default_lease),
                humantime::format_duration(self.max_freeze)
            ));
        }
        if self.freeze_timeout.is_zero() {
            problems.push("freeze-timeout must be longer than 0s".into());
        }
        if !(1..=MAX_VOLUMES_PER_REQUEST).contains(&self.max_volumes_per_request) {
            problems.push(format!(
                "max-volumes-per-request ({}) must be between 1 and {MAX_VOLUMES_PER_REQUEST}",
                self.max_volumes_per_request
            ));
        }
        let mut seen = HashSet::new();
        for volume in &self.volumes {
            let mount = &volume.mount;
            if !mount.is_absolute() {
                problems.push(format!(
                    "volume {} must be an absolute path",
                    mount.display()
                ));
            } else if mount == Path::new("/") {
                problems.push("volume / is the root filesystem, which is never frozen".into());
            } else if mount.components().any(|c| {
                matches!(
                    c,
                    std::path::Component::CurDir | std::path::Component::ParentDir
                )
            }) {
                problems.push(format!(
                    "volume {} must not contain `.` or `..` components",
                    mount.display()
                ));
            }
            if !seen.insert(mount) {
                problems.push(format!("volume {} is listed twice", mount.display()));
            }
        }
        for volume in &self.volumes {
            if let Some(id) = &volume.ebs_volume_id
                && !id.starts_with("vol-")
            {
                problems.push(format!(
                    "volume {}: ebs-volume-id {id:?} must start with vol-",
                    volume.mount.display()
                ));
            }
        }
        if let Some(ebs) = &self.ebs {
            if let Some(id) = &ebs.instance_id
                && !id.starts_with("i-")
            {
                problems.push(format!("ebs.instance-id {id:?} must start with i-"));
            }
            if !ebs.imds_endpoint.starts_with("http://") {
                problems.push(format!(
                    "ebs.imds-endpoint {} must start with http://",
                    ebs.imds_endpoint
                ));
            }
            if ebs.imds_timeout.is_zero() {
                problems.push("ebs.imds-timeout must be longer than 0s".into());
            }
        }
        if let Some(dir) = &self.reflink.snapshot_dir
            && !dir.is_absolute()
        {
            problems.push(format!(
                "reflink.snapshot-dir {} must be an absolute path",
                dir.display()
            ));
        }
        for (name, hook) in &self.hooks {
            problems.extend(hook.problems(name));
        }
        problems
    }

    pub fn is_allowed(&self, mount: &Path) -> bool {
        self.volumes.iter().any(|volume| volume.mount == mount)
    }

    pub fn allowed_list(&self) -> String {
        if self.volumes.is_empty() {
            return "none".into();
        }
        let names: Vec<String> = self
            .volumes
            .iter()
            .map(|volume| volume.mount.display().to_string())
            .collect();
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
listen = "127.0.0.1:7401"
state-dir = "/run/quiesce-agent"
"#;

    #[test]
    fn minimal_config_has_safe_defaults() {
        let config = Config::parse(MINIMAL).unwrap();
        assert_eq!(config.default_lease, Duration::from_secs(10));
        assert_eq!(config.max_freeze, Duration::from_secs(60));
        assert!(config.volumes.is_empty(), "no volume is allowed by default");
        let problems = config.problems(false);
        assert!(
            problems.iter().any(|p| p.contains("mTLS is required")),
            "{problems:?}"
        );
        assert!(config.problems(true).is_empty());
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let err = Config::parse(&format!("{MINIMAL}\nmax-frezee = \"5s\"\n")).unwrap_err();
        assert!(err.to_string().contains("max-frezee"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
listen = "127.0.0.1:7401"
state-dir = "run/relative"
default-lease = "2m"
max-freeze = "1m"
[[volume]]
mount = "/"
[[volume]]
mount = "/mnt/a"
[[volume]]
mount = "/mnt/a"
"#;
        let problems = Config::parse(text).unwrap().problems(true);
        assert_eq!(problems.len(), 4, "{problems:#?}");
        let all = problems.join("\n");
        for needle in [
            "state-dir",
            "longer than max-freeze",
            "root filesystem",
            "listed twice",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in {all}");
        }
    }

    #[test]
    fn the_packaged_sample_is_valid_and_safe_by_default() {
        let config = Config::parse(include_str!("../../packaging/agent.toml")).unwrap();
        assert!(
            config.volumes.is_empty(),
            "no volume until the operator lists one"
        );
        assert!(config.tls.is_some(), "TLS required");
        let problems = config.problems(false);
        // Only the certificate files are missing on a build machine.
        assert!(
            problems.iter().all(|p| p.contains("/etc/quiesce/tls/")),
            "{problems:#?}"
        );
    }

    #[test]
    fn ebs_ids_are_checked() {
        let text = format!(
            "{MINIMAL}[ebs]\ninstance-id = \"x-1\"\nimds-endpoint = \"https://x\"\n[[volume]]\nmount = \"/mnt/a\"\nebs-volume-id = \"v-1\"\n"
        );
        let all = Config::parse(&text).unwrap().problems(true).join("\n");
        for needle in [
            "must start with vol-",
            "must start with i-",
            "imds-endpoint https://x must start with http://",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in {all}");
        }
        let ok = format!(
            "{MINIMAL}[ebs]\ninstance-id = \"i-0abc\"\n[[volume]]\nmount = \"/mnt/a\"\nebs-volume-id = \"vol-0abc\"\n"
        );
        let config = Config::parse(&ok).unwrap();
        assert!(config.problems(true).is_empty());
        assert_eq!(
            config.ebs.unwrap().imds_timeout,
            Duration::from_secs(1),
            "short IMDS timeout by default"
        );
    }

    #[test]
    fn durations_read_as_humantime() {
        let config = Config::parse(&format!("{MINIMAL}default-lease = \"1500ms\"\n")).unwrap();
        assert_eq!(config.default_lease, Duration::from_millis(1500));
    }
}
