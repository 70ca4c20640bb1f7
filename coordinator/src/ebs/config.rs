//! `[group.ebs]`: where and how the EBS provider talks to EC2. Credentials are not here: they
//! come from the standard AWS chain (environment, shared profile, web identity, ECS/EC2 role).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct EbsConfig {
    /// AWS region of the group's instances and volumes, e.g. `eu-west-1`.
    pub region: String,
    /// Override of the EC2 endpoint (a VPC endpoint; an emulator in tests).
    pub endpoint_url: Option<String>,
    /// Deadline of one EC2 call, retries included.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Attempts of the SDK's standard retry for every call except CreateSnapshot(s), which are
    /// never retried: they carry no idempotency token and run while the group is frozen.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Operator tags put on every snapshot (and restored volume), after the `quiesce:` ones.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Snapshot description; default `quiesce set <set id> (<group>)`.
    pub description: Option<String>,
    /// How often completion of pending snapshots is checked after a set is committed.
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// After an ambiguous create (timeout, transport error), how long to wait before searching
    /// once more for snapshots the call may still have made.
    #[serde(default = "default_reconcile_delay", with = "humantime_serde")]
    pub reconcile_delay: Duration,
}

fn default_request_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_max_attempts() -> u32 {
    3
}

fn default_poll_interval() -> Duration {
    Duration::from_secs(15)
}

fn default_reconcile_delay() -> Duration {
    Duration::from_secs(5)
}

/// EC2 allows 50 tags per resource; quiesce uses up to 8.
pub const MAX_OPERATOR_TAGS: usize = 40;

impl EbsConfig {
    /// Every problem at once, prefixed with the group name.
    pub fn problems(&self, group: &str, phase_timeout: Duration) -> Vec<String> {
        let mut problems = Vec::new();
        if self.region.trim().is_empty() {
            problems.push(format!("group {group}: ebs.region is empty"));
        }
        if let Some(url) = &self.endpoint_url
            && !(url.starts_with("https://") || url.starts_with("http://"))
        {
            problems.push(format!(
                "group {group}: ebs.endpoint-url {url:?} must start with https:// or http://"
            ));
        }
        if self.request_timeout.is_zero() {
            problems.push(format!(
                "group {group}: ebs.request-timeout must be longer than 0s"
            ));
        }
        if self.request_timeout > phase_timeout {
            problems.push(format!(
                "group {group}: ebs.request-timeout ({}) is longer than phase-timeout ({}): a snapshot call must fit in the snapshot phase",
                humantime::format_duration(self.request_timeout),
                humantime::format_duration(phase_timeout)
            ));
        }
        if self.max_attempts == 0 {
            problems.push(format!(
                "group {group}: ebs.max-attempts must be at least 1"
            ));
        }
        if self.poll_interval.is_zero() {
            problems.push(format!(
                "group {group}: ebs.poll-interval must be longer than 0s"
            ));
        }
        if self.tags.len() > MAX_OPERATOR_TAGS {
            problems.push(format!(
                "group {group}: ebs.tags has {} tags; at most {MAX_OPERATOR_TAGS}",
                self.tags.len()
            ));
        }
        for (key, value) in &self.tags {
            let lower = key.to_ascii_lowercase();
            if key.is_empty() || key.len() > 128 {
                problems.push(format!(
                    "group {group}: ebs.tags key {key:?} must be 1-128 characters"
                ));
            }
            if lower.starts_with("aws:") || lower.starts_with("quiesce:") {
                problems.push(format!(
                    "group {group}: ebs.tags key {key:?}: the aws: and quiesce: prefixes are reserved"
                ));
            }
            if value.len() > 256 {
                problems.push(format!(
                    "group {group}: ebs.tags value of {key:?} is longer than 256 characters"
                ));
            }
        }
        problems
    }
}
