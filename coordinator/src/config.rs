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
    /// Plain-HTTP Prometheus endpoint (`GET /metrics`). Keep it on loopback or a management
    /// network: it is not authenticated. A port that cannot be bound is logged, not fatal.
    /// `"off"` serves none.
    #[serde(
        default = "default_metrics_listen",
        deserialize_with = "metrics_listen"
    )]
    pub metrics_listen: Option<SocketAddr>,
    #[serde(default, rename = "agent")]
    pub agents: Vec<AgentConfig>,
    #[serde(default, rename = "group")]
    pub groups: Vec<GroupConfig>,
    /// `[[grant]]`: roles per group (see `authz`). None: every operator may do everything.
    #[serde(default, rename = "grant")]
    pub grants: Vec<crate::authz::Grant>,
    /// `[operator-lists]`: named lists of operator names, used in grants as `"@name"`.
    #[serde(default)]
    pub operator_lists: HashMap<String, Vec<String>>,
    /// `[audit]`: where the audit log is copied, and how long it is kept at least.
    #[serde(default)]
    pub audit: crate::audit::AuditConfig,
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
    /// Longest the group may stay frozen, first freeze sent → last thaw sent. The freeze and
    /// snapshot phases get only what is left of it; running over fails the set.
    #[serde(default = "default_freeze_budget", with = "humantime_serde")]
    pub freeze_budget: Duration,
    pub schedule: Option<ScheduleConfig>,
    pub retention: Option<RetentionConfig>,
    /// `[group.verify]`: restore drills the coordinator runs by itself.
    pub verify: Option<VerifyScheduleConfig>,
    #[serde(rename = "member")]
    pub members: Vec<MemberConfig>,
    /// Settings of the EBS provider; required when `provider = "ebs"`.
    pub ebs: Option<crate::ebs::EbsConfig>,
    /// New consistent sets cannot be deleted for this long (by anyone, nor by retention),
    /// except by two different admins within `approval-window`.
    #[serde(default, with = "humantime_serde")]
    pub lock_for: Option<Duration>,
    /// How close together the two admins' approvals of an early delete must be.
    #[serde(default = "default_approval_window", with = "humantime_serde")]
    pub approval_window: Duration,
}

fn default_approval_window() -> Duration {
    Duration::from_secs(3600)
}

/// `[group.schedule]`: when the coordinator starts sets of the group by itself.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Five-field cron expression (or `@hourly`, `@daily`…), evaluated in UTC.
    pub cron: String,
    /// The group is overdue when its last consistent set is older than this. Default: twice
    /// the interval between the next two runs.
    #[serde(default, with = "humantime_serde")]
    pub overdue_after: Option<Duration>,
}

/// `[group.verify]`: at each cron time the coordinator runs a restore drill (as
/// `quiescectl verify` does) of the group's newest consistent set that has no drill yet.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct VerifyScheduleConfig {
    /// Five-field cron expression (or `@daily`…), evaluated in UTC, as `[group.schedule]`.
    pub cron: String,
    /// The member host the drill runs on; may be left out when the group has one member.
    pub host: Option<String>,
    /// Scratch space on that host (default: the agent's, beside the snapshots).
    pub scratch_dir: Option<String>,
}

/// `[group.retention]`: which consistent sets to keep. A set is kept if any rule keeps it;
/// failed sets are removed once older than `max-age` (or the newest 10 failed are kept).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RetentionConfig {
    /// Keep the newest N consistent sets.
    pub keep_last: Option<u32>,
    /// Keep every consistent set younger than this.
    #[serde(default, with = "humantime_serde")]
    pub max_age: Option<Duration>,
    /// Grandfather-father-son: the newest set of each of the last N hours/days/weeks/months.
    pub keep_hourly: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    /// Keep the newest set whose restore drill passed (`quiescectl verify`, `[group.verify]`),
    /// whatever the other rules say.
    #[serde(default)]
    pub keep_verified: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct MemberConfig {
    pub agent: String,
    pub mounts: Vec<PathBuf>,
    /// Hooks (names defined in that agent's own config) run around this member's freeze,
    /// in this order; resumed in reverse.
    #[serde(default)]
    pub hooks: Vec<String>,
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
    Some(SocketAddr::from(([127, 0, 0, 1], 9740)))
}

fn default_lease() -> Duration {
    Duration::from_secs(10)
}

fn default_phase_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_freeze_budget() -> Duration {
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
            if group.lease < Duration::from_millis(100) {
                problems.push(format!(
                    "group {}: lease must be at least 100ms",
                    group.name
                ));
            }
            if group.phase_timeout < Duration::from_millis(100) {
                problems.push(format!(
                    "group {}: phase-timeout must be at least 100ms",
                    group.name
                ));
            }
            if group.freeze_budget.is_zero() {
                problems.push(format!(
                    "group {}: freeze-budget must be longer than 0s",
                    group.name
                ));
            }
            if let Some(schedule) = &group.schedule
                && let Err(e) = crate::scheduler::parse_cron(&schedule.cron)
            {
                problems.push(format!(
                    "group {}: schedule cron {:?}: {e}",
                    group.name, schedule.cron
                ));
            }
            if let Some(verify) = &group.verify {
                problems.extend(verify_problems(group, verify));
            }
            if let Some(retention) = &group.retention
                && retention == &RetentionConfig::default()
            {
                problems.push(format!(
                    "group {}: [group.retention] keeps nothing: set keep-last, max-age, keep-hourly/daily/weekly/monthly or keep-verified",
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
                let mut hook_names = HashSet::new();
                for hook in &member.hooks {
                    if !valid_name(hook) {
                        problems.push(format!(
                            "group {}: member {}: hook name {hook:?} must be 1-64 characters of [A-Za-z0-9_-]",
                            group.name, member.agent
                        ));
                    }
                    if !hook_names.insert(hook.as_str()) {
                        problems.push(format!(
                            "group {}: member {}: hook {hook} is listed twice",
                            group.name, member.agent
                        ));
                    }
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
        for group in &self.groups {
            if group.lock_for.is_some_and(|d| d.is_zero()) {
                problems.push(format!(
                    "group {}: lock-for must be longer than 0s (leave it out for no lock)",
                    group.name
                ));
            }
            if group.approval_window.is_zero() {
                problems.push(format!(
                    "group {}: approval-window must be longer than 0s",
                    group.name
                ));
            }
        }
        problems.extend(crate::authz::problems(self));
        problems.extend(crate::audit::problems(&self.audit));
        problems
    }
}

/// What is wrong with a group's `[group.verify]`.
fn verify_problems(group: &GroupConfig, verify: &VerifyScheduleConfig) -> Vec<String> {
    use quiesce_proto::echo::capped;
    let mut problems = Vec::new();
    if let Err(e) = crate::scheduler::parse_cron(&verify.cron) {
        problems.push(format!(
            "group {}: verify cron {:?}: {e}",
            group.name,
            capped(&verify.cron)
        ));
    }
    let members: Vec<&str> = group.members.iter().map(|m| m.agent.as_str()).collect();
    match &verify.host {
        Some(host) if !members.contains(&host.as_str()) => problems.push(format!(
            "group {}: verify host {:?} is not a member of the group (members: {})",
            group.name,
            capped(host),
            members.join(", ")
        )),
        Some(_) => {}
        None if members.len() > 1 => problems.push(format!(
            "group {}: [group.verify] needs a host: the group has members {}",
            group.name,
            members.join(", ")
        )),
        None => {}
    }
    if let Some(dir) = &verify.scratch_dir
        && (!dir.starts_with('/') || dir.len() > 4096)
    {
        problems.push(format!(
            "group {}: verify scratch-dir {:?} must be an absolute directory (at most 4096 bytes)",
            group.name,
            capped(dir)
        ));
    }
    problems
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
    fn metrics_listen_defaults_to_loopback_and_can_be_turned_off() {
        let config = Config::parse(SAMPLE).unwrap();
        assert_eq!(
            config.metrics_listen,
            Some(SocketAddr::from(([127, 0, 0, 1], 9740)))
        );
        let off = Config::parse(&format!("metrics-listen = \"off\"\n{SAMPLE}")).unwrap();
        assert_eq!(off.metrics_listen, None);
        let bad = Config::parse(&format!("metrics-listen = \"nowhere\"\n{SAMPLE}")).unwrap_err();
        assert!(
            bad.to_string().contains("metrics-listen \"nowhere\""),
            "{bad}"
        );
    }

    #[test]
    fn a_group_with_schedule_and_retention_parses_and_bad_cron_is_reported() {
        let text = format!(
            "{}[group.schedule]\ncron = \"0 * * * *\"\n[group.retention]\nkeep-last = 3\nkeep-daily = 7\n",
            SAMPLE.replace(
                "provider = \"reflink\"\n",
                "provider = \"reflink\"\nfreeze-budget = \"5s\"\n"
            )
        );
        let config = Config::parse(&text).unwrap();
        let group = config.group("pg").unwrap();
        assert_eq!(group.freeze_budget, Duration::from_secs(5));
        assert_eq!(group.retention.as_ref().unwrap().keep_daily, Some(7));
        assert_eq!(config.problems(true), Vec::<String>::new());
        let bad = Config::parse(
            &text
                .replace("0 * * * *", "61 * * * *")
                .replace("keep-last = 3\nkeep-daily = 7\n", ""),
        )
        .unwrap();
        let problems = bad.problems(true).join("\n");
        assert!(
            problems.contains("group pg: schedule cron \"61 * * * *\""),
            "{problems}"
        );
        assert!(
            problems.contains("[group.retention] keeps nothing"),
            "{problems}"
        );
    }

    #[test]
    fn a_verify_schedule_is_checked() {
        let two = SAMPLE.replace(
            "mounts = [\"/mnt/data\", \"/mnt/wal\"]\n",
            "mounts = [\"/mnt/data\", \"/mnt/wal\"]\n[[group.member]]\nagent = \"db2\"\nmounts = [\"/mnt/x\"]\n[[agent]]\nname = \"db2\"\nendpoint = \"https://127.0.0.1:7402\"\n",
        );
        // The verify table right after the group's keys, before its members.
        let with = |verify: &str| {
            Config::parse(&two.replace(
                "provider = \"reflink\"\n",
                &format!("provider = \"reflink\"\n[group.verify]\n{verify}"),
            ))
            .unwrap()
        };
        let good =
            with("cron = \"30 3 * * *\"\nhost = \"db2\"\nscratch-dir = \"/var/tmp/drills\"\n");
        assert_eq!(good.problems(true), Vec::<String>::new());
        let verify = good.group("pg").unwrap().verify.as_ref().unwrap();
        assert_eq!(verify.host.as_deref(), Some("db2"));
        let bad = with("cron = \"61 * * * *\"\nhost = \"db9\"\nscratch-dir = \"rel\"\n")
            .problems(true)
            .join("\n");
        for needle in [
            "group pg: verify cron \"61 * * * *\"",
            "group pg: verify host \"db9\" is not a member of the group (members: db1, db2)",
            "group pg: verify scratch-dir \"rel\" must be an absolute directory",
        ] {
            assert!(bad.contains(needle), "missing {needle:?} in:\n{bad}");
        }
        let no_host = with("cron = \"@daily\"\n").problems(true).join("\n");
        assert!(
            no_host.contains("[group.verify] needs a host: the group has members db1, db2"),
            "{no_host}"
        );
        let unknown = Config::parse(&two.replace(
            "provider = \"reflink\"\n",
            "provider = \"reflink\"\n[group.verify]\ncron = \"@daily\"\nschedule = \"x\"\n",
        ))
        .unwrap_err();
        assert!(unknown.to_string().contains("schedule"), "{unknown}");
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
