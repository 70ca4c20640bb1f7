//! Who may do what: role grants per group, from the config's `[[grant]]` tables.
//!
//! A grant gives a role to operators on groups (`"*"` for all). Operators are named one by
//! one, or as `"@list"`, a named list of `[operator-lists]`.
//! Roles nest: `viewer` reads (sets, groups, agents); `operator` also backs up and restores;
//! `admin` also deletes. With no `[[grant]]` at all the coordinator behaves as before grants:
//! every operator certificate may do everything (`check-config` warns about it).
//!
//! The check is one layer ([`Policy::check`]), called by the API adapter before any domain call,
//! so what a client shows (the dashboard hides buttons) never decides anything.

use std::collections::BTreeSet;

use quiesce_proto::coordinator::v1 as pb;
use serde::Deserialize;

use crate::config::Config;
use crate::error::Error;

/// A role of the `[[grant]]` tables, weakest first: each includes the ones before it.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum GrantRole {
    Viewer,
    Operator,
    Admin,
}

impl GrantRole {
    /// The weakest role that may do `action`.
    pub fn needed_for(action: pb::Action) -> GrantRole {
        match action {
            pb::Action::Unspecified | pb::Action::View => GrantRole::Viewer,
            pb::Action::Backup | pb::Action::Restore => GrantRole::Operator,
            pb::Action::Delete => GrantRole::Admin,
        }
    }
}

/// `[[grant]]`: `role` to the operators named, on the groups named (`"*"`: every group).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Grant {
    pub role: GrantRole,
    /// Operator names: the `<name>` of `quiesce://operator/<name>` certificates.
    pub operators: Vec<String>,
    /// Group names, or `"*"` for every group.
    pub groups: Vec<String>,
}

/// Every action, in the order the API lists them.
pub const ACTIONS: [pb::Action; 4] = [
    pb::Action::View,
    pb::Action::Backup,
    pb::Action::Restore,
    pb::Action::Delete,
];

fn action_name(action: pb::Action) -> &'static str {
    match action {
        pb::Action::Unspecified => "unspecified",
        pb::Action::View => "view",
        pb::Action::Backup => "backup",
        pb::Action::Restore => "restore",
        pb::Action::Delete => "delete",
    }
}

/// Who is calling: an operator's name over mTLS, or nobody known (`--insecure`, which admits
/// everyone as before).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Operator(String),
    Unauthenticated,
}

/// The grants of a config, checked per call.
pub struct Policy<'a> {
    config: &'a Config,
}

impl<'a> Policy<'a> {
    pub fn new(config: &'a Config) -> Self {
        Policy { config }
    }

    /// No grants configured: every operator may do everything.
    pub fn unrestricted(&self) -> bool {
        self.config.grants.is_empty()
    }

    /// The strongest role `caller` holds on `group`, if any.
    pub fn role(&self, caller: &Caller, group: &str) -> Option<GrantRole> {
        let Caller::Operator(name) = caller else {
            return Some(GrantRole::Admin);
        };
        if self.unrestricted() {
            return Some(GrantRole::Admin);
        }
        self.config
            .grants
            .iter()
            .filter(|g| g.operators.iter().any(|o| self.names(o, name)))
            .filter(|g| g.groups.iter().any(|x| x == "*" || x == group))
            .map(|g| g.role)
            .max()
    }

    /// Whether a grant's `operators` entry (a name, or `@list` of `[operator-lists]`) names
    /// operator `name`.
    fn names(&self, entry: &str, name: &str) -> bool {
        match entry.strip_prefix('@') {
            Some(list) => self
                .config
                .operator_lists
                .get(list)
                .is_some_and(|names| names.iter().any(|n| n == name)),
            None => entry == name,
        }
    }

    /// Whether `caller` is an admin of `group`, by name (early deletes need two of them).
    pub fn is_admin(&self, caller: &Caller, group: &str) -> bool {
        self.role(caller, group) == Some(GrantRole::Admin)
    }

    pub fn allows(&self, caller: &Caller, action: pb::Action, group: &str) -> bool {
        self.role(caller, group)
            .is_some_and(|role| role >= GrantRole::needed_for(action))
    }

    /// `Ok` if `caller` may do `action` on `group`; else `PERMISSION_DENIED` naming both.
    pub fn check(&self, caller: &Caller, action: pb::Action, group: &str) -> Result<(), Error> {
        if self.allows(caller, action, group) {
            return Ok(());
        }
        Err(Error::PermissionDenied {
            identity: match caller {
                Caller::Operator(name) => format!("operator {name}"),
                Caller::Unauthenticated => "an unauthenticated caller".into(),
            },
            action: action_name(action),
            group: group.to_owned(),
        })
    }

    /// `Ok` if `caller` may view at least one group (calls that are not about one group:
    /// ListAgents).
    pub fn check_any(&self, caller: &Caller, action: pb::Action) -> Result<(), Error> {
        if self
            .config
            .groups
            .iter()
            .any(|g| self.allows(caller, action, &g.name))
            || self.unrestricted()
        {
            return Ok(());
        }
        self.check(caller, action, "*")
    }

    /// What `caller` may do on each configured group (groups it may do nothing on left out).
    pub fn permissions(&self, caller: &Caller) -> pb::GetPermissionsResponse {
        let groups = self
            .config
            .groups
            .iter()
            .filter_map(|g| {
                let actions: Vec<i32> = ACTIONS
                    .iter()
                    .filter(|a| self.allows(caller, **a, &g.name))
                    .map(|a| *a as i32)
                    .collect();
                (!actions.is_empty()).then(|| pb::GroupPermissions {
                    group: g.name.clone(),
                    actions,
                })
            })
            .collect();
        pb::GetPermissionsResponse {
            identity: match caller {
                Caller::Operator(name) => format!("operator {name}"),
                Caller::Unauthenticated => String::new(),
            },
            unrestricted: self.unrestricted(),
            groups,
        }
    }
}

/// Config problems of the grants (reported with every other problem by `check-config`).
pub fn problems(config: &Config) -> Vec<String> {
    let groups: BTreeSet<&str> = config.groups.iter().map(|g| g.name.as_str()).collect();
    let mut problems = Vec::new();
    for (i, grant) in config.grants.iter().enumerate() {
        if grant.operators.is_empty() {
            problems.push(format!("grant {}: operators is empty", i + 1));
        }
        for list in grant.operators.iter().filter_map(|o| o.strip_prefix('@')) {
            if !config.operator_lists.contains_key(list) {
                problems.push(format!(
                    "grant {}: @{list} is not defined in [operator-lists]",
                    i + 1
                ));
            }
        }
        if grant.groups.is_empty() {
            problems.push(format!("grant {}: groups is empty (\"*\" for all)", i + 1));
        }
        for group in &grant.groups {
            if group != "*" && !groups.contains(group.as_str()) {
                problems.push(format!(
                    "grant {}: group {group} is not defined in any [[group]]",
                    i + 1
                ));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(grants: &str) -> Config {
        Config::parse(&format!(
            r#"
listen = "127.0.0.1:7400"
catalog = "/tmp/x.sqlite"
[[agent]]
name = "db1"
endpoint = "https://127.0.0.1:7401"
[[group]]
name = "billing"
provider = "reflink"
[[group.member]]
agent = "db1"
mounts = ["/mnt/a"]
[[group]]
name = "orders"
provider = "reflink"
[[group.member]]
agent = "db1"
mounts = ["/mnt/b"]
{grants}
"#
        ))
        .unwrap()
    }

    fn op(name: &str) -> Caller {
        Caller::Operator(name.into())
    }

    #[test]
    fn without_grants_every_operator_may_do_everything() {
        let config = config("");
        let policy = Policy::new(&config);
        assert!(policy.unrestricted());
        for action in ACTIONS {
            assert!(policy.allows(&op("anyone"), action, "billing"));
        }
        let perms = policy.permissions(&op("anyone"));
        assert_eq!(perms.groups.len(), 2);
        assert_eq!(perms.groups[0].actions.len(), ACTIONS.len());
    }

    #[test]
    fn roles_nest_and_apply_only_to_their_groups() {
        let config = config(
            r#"
[[grant]]
role = "viewer"
operators = ["vera"]
groups = ["*"]
[[grant]]
role = "operator"
operators = ["otto"]
groups = ["billing"]
[[grant]]
role = "admin"
operators = ["ada"]
groups = ["orders"]
"#,
        );
        let policy = Policy::new(&config);
        assert!(!policy.unrestricted());
        let table = [
            ("vera", "billing", [true, false, false, false]),
            ("vera", "orders", [true, false, false, false]),
            ("otto", "billing", [true, true, true, false]),
            ("otto", "orders", [false, false, false, false]),
            ("ada", "orders", [true, true, true, true]),
            ("ada", "billing", [false, false, false, false]),
            ("mallory", "billing", [false, false, false, false]),
        ];
        for (who, group, expected) in table {
            for (action, want) in ACTIONS.iter().zip(expected) {
                assert_eq!(
                    policy.allows(&op(who), *action, group),
                    want,
                    "{who} {action:?} {group}"
                );
            }
        }
        let err = policy
            .check(&op("vera"), pb::Action::Backup, "billing")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("operator vera") && err.contains("backup") && err.contains("billing"),
            "{err}"
        );
        assert!(policy.check_any(&op("mallory"), pb::Action::View).is_err());
        assert!(policy.check_any(&op("otto"), pb::Action::View).is_ok());
        let perms = policy.permissions(&op("otto"));
        assert_eq!(perms.groups.len(), 1);
        assert_eq!(perms.groups[0].group, "billing");
        assert_eq!(
            perms.groups[0].actions,
            vec![
                pb::Action::View as i32,
                pb::Action::Backup as i32,
                pb::Action::Restore as i32
            ]
        );
    }

    #[test]
    fn a_grant_to_a_named_list_covers_its_members_only() {
        let config = config(
            r#"
[operator-lists]
dbas = ["ada", "bob"]
[[grant]]
role = "admin"
operators = ["@dbas"]
groups = ["billing"]
[[grant]]
role = "viewer"
operators = ["@nobody"]
groups = ["*"]
"#,
        );
        let policy = Policy::new(&config);
        assert!(policy.allows(&op("bob"), pb::Action::Delete, "billing"));
        assert!(policy.is_admin(&op("ada"), "billing"));
        assert!(!policy.allows(&op("bob"), pb::Action::View, "orders"));
        assert!(!policy.allows(&op("dbas"), pb::Action::View, "billing"));
        assert!(!policy.allows(&op("@dbas"), pb::Action::View, "billing"));
        let problems = problems(&config);
        assert!(
            problems
                .iter()
                .any(|p| p.contains("@nobody is not defined")),
            "{problems:?}"
        );
    }

    #[test]
    fn grants_naming_unknown_groups_are_problems() {
        let config = config(
            r#"
[[grant]]
role = "operator"
operators = []
groups = ["nope"]
"#,
        );
        let problems = problems(&config);
        assert!(problems.iter().any(|p| p.contains("operators is empty")));
        assert!(problems.iter().any(|p| p.contains("group nope")));
    }
}
