//! The coordinator's TOML config (see `packaging/coordinator.toml` for the commented sample).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use quiesce_proto::tls::TlsFiles;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Config {
    /// Address of the operator API (quiescectl).
    pub listen: SocketAddr,
    /// mTLS files: served to operators and presented to agents. Required unless `--insecure`.
    pub tls: Option<TlsFiles>,
    /// SQLite catalog of snapshot sets.
    pub catalog: PathBuf,
    #[serde(default, rename = "agent")]
    pub agents: Vec<AgentConfig>,
    #[serde(default, rename = "group")]
    pub groups: Vec<GroupConfig>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct AgentConfig {
    /// The agent's name: its certificate identity `quiesce://agent/<name>`.
    pub name: String,
    /// `https://host:port` (or `http://` with `--insecure`).
    pub endpoint: String,
    /// Name the agent's server certificate is checked against; default: `name`.
    pub server_name: Option<String>,
}

impl AgentConfig {
    pub fn server_name(&self) -> &str {
        self.server_name.as_deref().unwrap_or(&self.name)
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ProviderKind {
    /// Host-local FICLONE of loop backing files, done by each agent while frozen.
    Reflink,
    /// AWS EBS snapshots, made by the coordinator through the EC2 API (`[group.ebs]`).
    Ebs,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Reflink => "reflink",
            ProviderKind::Ebs => "ebs",
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct GroupConfig {
    pub name: String,
    pub provider: ProviderKind,
    /// Lease asked of each agent; renewed while snapshots run.
    #[serde(default = "default_lease", with = "humantime_serde")]
    pub lease: Duration,
    /// Deadline of each phase on each agent (prepare, freeze, snapshot, thaw).
    #[serde(default = "default_phase_timeout", with = "humantime_serde")]
    pub phase_timeout: Duration,
    #[serde(rename = "member")]
    pub members: Vec<MemberConfig>,
    /// Settings of the EBS provider; required when `provider = "ebs"`.
    pub ebs: Option<crate::ebs::EbsConfig>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct MemberConfig {
    pub agent: String,
    pub mounts: Vec<PathBuf>,
}

fn default_lease() -> Duration {
    Duration::from_secs(10)
}

fn default_phase_timeout() -> Duration {
    Duration::from_secs(30)
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

    pub fn agent(&self, name: &str) -> Option<&AgentConfig> {
        self.agents.iter().find(|a| a.name == name)
    }

    pub fn group(&self, name: &str) -> Option<&GroupConfig> {
        self.groups.iter().find(|g| g.name == name)
    }

    /// Every problem at once.
    pub fn problems(&self, insecure: bool) -> Vec<String> {
        let mut problems = Vec::new();
        match (&self.tls, insecure) {
            (None, false) => problems.push(
                "no [tls] section: mTLS is required (plain text only with --insecure)".into(),
            ),
            (Some(tls), _) => problems.extend(tls.check()),
            (None, true) => {}
        }
        let mut names = HashSet::new();
        for agent in &self.agents {
            if !names.insert(agent.name.as_str()) {
                problems.push(format!("agent {} is defined twice", agent.name));
            }
            let scheme_ok = agent.endpoint.starts_with("https://")
                || (insecure && agent.endpoint.starts_with("http://"));
            if !scheme_ok {
                problems.push(format!(
                    "agent {}: endpoint {} must start with https:// (http:// only with --insecure)",
                    agent.name, agent.endpoint
                ));
            }
        }
        let mut groups = HashSet::new();
        let mut owners: HashMap<(String, PathBuf), String> = HashMap::new();
        for group in &self.groups {
            if !groups.insert(group.name.as_str()) {
                problems.push(format!("group {} is defined twice", group.name));
            }
            if !valid_name(&group.name) {
                problems.push(format!(
                    "group name {:?} must be 1-64 characters of [A-Za-z0-9_-]",
                    group.name
                ));
            }
            if group.members.is_empty() {
                problems.push(format!("group {} has no members", group.name));
            }
            if group.lease.is_zero() {
                problems.push(format!(
                    "group {}: lease must be longer than 0s",
                    group.name
                ));
            }
            match (group.provider, &group.ebs) {
                (ProviderKind::Ebs, None) => problems.push(format!(
                    "group {}: provider ebs needs a [group.ebs] section (region at least)",
                    group.name
                )),
                (ProviderKind::Ebs, Some(ebs)) => {
                    problems.extend(ebs.problems(&group.name, group.phase_timeout))
                }
                (ProviderKind::Reflink, Some(_)) => problems.push(format!(
                    "group {}: [group.ebs] is set but the provider is reflink",
                    group.name
                )),
                (ProviderKind::Reflink, None) => {}
            }
            for member in &group.members {
                if !names.contains(member.agent.as_str()) {
                    problems.push(format!(
                        "group {}: member agent {} is not defined in any [[agent]]",
                        group.name, member.agent
                    ));
                }
                if member.mounts.is_empty() {
                    problems.push(format!(
                        "group {}: member {} lists no mounts",
                        group.name, member.agent
                    ));
                }
                for mount in &member.mounts {
                    if !mount.is_absolute() {
                        problems.push(format!(
                            "group {}: mount {} must be an absolute path",
                            group.name,
                            mount.display()
                        ));
                    }
                    let key = (member.agent.clone(), mount.clone());
                    if let Some(other) = owners.insert(key, group.name.clone())
                        && other != group.name
                    {
                        problems.push(format!(
                            "{}:{} is in groups {other} and {}: a volume belongs to one group",
                            member.agent,
                            mount.display(),
                            group.name
                        ));
                    }
                }
            }
        }
        problems
    }
}

/// Group names become part of set ids.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
listen = "127.0.0.1:7400"
catalog = "/var/lib/quiesce/catalog.sqlite"
[[agent]]
name = "db1"
endpoint = "https://127.0.0.1:7401"
[[group]]
name = "pg"
provider = "reflink"
[[group.member]]
agent = "db1"
mounts = ["/mnt/data", "/mnt/wal"]
"#;

    #[test]
    fn sample_parses_with_defaults() {
        let config = Config::parse(SAMPLE).unwrap();
        let group = config.group("pg").unwrap();
        assert_eq!(group.provider, ProviderKind::Reflink);
        assert_eq!(group.lease, Duration::from_secs(10));
        assert_eq!(group.members[0].mounts.len(), 2);
        assert_eq!(config.agent("db1").unwrap().server_name(), "db1");
        assert_eq!(config.problems(true), Vec::<String>::new());
    }

    #[test]
    fn the_packaged_sample_is_valid() {
        let config = Config::parse(include_str!("../../packaging/coordinator.toml")).unwrap();
        assert!(config.tls.is_some());
        let problems = config.problems(false);
        assert!(
            problems.iter().all(|p| p.contains("/etc/quiesce/tls/")),
            "{problems:#?}"
        );
    }

    #[test]
    fn unknown_provider_is_named() {
        let err = Config::parse(&SAMPLE.replace("\"reflink\"", "\"lvm\"")).unwrap_err();
        assert!(err.to_string().contains("lvm"), "{err}");
    }

    #[test]
    fn ebs_groups_are_checked() {
        let ebs = SAMPLE.replace("\"reflink\"", "\"ebs\"");
        let problems = Config::parse(&ebs).unwrap().problems(true).join("\n");
        assert!(
            problems.contains("group pg: provider ebs needs a [group.ebs] section"),
            "{problems}"
        );
        let text = format!(
            "{ebs}[group.ebs]\nregion = \"\"\nrequest-timeout = \"1m\"\nendpoint-url = \"ftp://x\"\ntags = {{ \"aws:x\" = \"1\", \"quiesce:set-id\" = \"2\" }}\n"
        );
        let problems = Config::parse(&text).unwrap().problems(true).join("\n");
        for needle in [
            "ebs.region is empty",
            "ebs.request-timeout (1m) is longer than phase-timeout (30s)",
            "must start with https:// or http://",
            "key \"aws:x\": the aws: and quiesce: prefixes are reserved",
            "key \"quiesce:set-id\": the aws: and quiesce: prefixes are reserved",
        ] {
            assert!(
                problems.contains(needle),
                "missing {needle:?} in:\n{problems}"
            );
        }
        let good = format!("{ebs}[group.ebs]\nregion = \"eu-west-1\"\n");
        let config = Config::parse(&good).unwrap();
        assert_eq!(config.problems(true), Vec::<String>::new());
        let group = config.group("pg").unwrap();
        assert_eq!(group.provider.as_str(), "ebs");
        let ebs = group.ebs.as_ref().unwrap();
        assert_eq!(ebs.request_timeout, Duration::from_secs(10));
        assert_eq!(ebs.max_attempts, 3);
    }

    #[test]
    fn every_problem_at_once() {
        let text = format!(
            "{SAMPLE}
[[group]]
name = \"bad name\"
provider = \"reflink\"
[[group.member]]
agent = \"db9\"
mounts = [\"relative\"]
[[group.member]]
agent = \"db1\"
mounts = [\"/mnt/data\"]
"
        );
        let problems = Config::parse(&text).unwrap().problems(false);
        let all = problems.join("\n");
        for needle in [
            "mTLS is required",
            "must be 1-64 characters",
            "db9 is not defined",
            "must be an absolute path",
            "in groups pg and bad name",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }
}
