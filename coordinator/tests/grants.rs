//! `[[grant]]` roles through the real operator API over mTLS: every role × every verb × a
//! granted and an ungranted group, allowed or `PERMISSION_DENIED`; lists show only viewable
//! groups; `GetPermissions` says what each operator may do; no grant at all allows everything.

mod common;

use std::net::SocketAddr;
use std::path::Path;

use quiesce_coordinator::catalog::Catalog;
use quiesce_coordinator::config::Config;
use quiesce_proto::coordinator::v1 as pb;
use quiesce_proto::coordinator::v1::coordinator_client::CoordinatorClient;
use tonic::Code;
use tonic::transport::Channel;

const OPERATORS: [&str; 4] = ["vera", "otto", "ada", "mallory"];

const GRANTS: &str = r#"
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
"#;

fn config(grants: &str) -> Config {
    Config::parse(&format!(
        r#"
listen = "127.0.0.1:0"
catalog = "/unused"
[[agent]]
name = "db1"
endpoint = "https://127.0.0.1:9"
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
{grants}"#
    ))
    .unwrap()
}

async fn serve(dir: &Path, grants: &str) -> SocketAddr {
    common::serve(dir, config(grants), Catalog::in_memory().unwrap())
        .await
        .0
}

async fn client(addr: SocketAddr, dir: &Path, name: &str) -> CoordinatorClient<Channel> {
    common::client(addr, dir, name).await
}

fn pki_dir() -> tempfile::TempDir {
    common::pki_dir(&OPERATORS)
}

/// The code of one verb's call on `group`; `Ok` as `Code::Ok`.
async fn call(client: &mut CoordinatorClient<Channel>, verb: &str, group: &str) -> Code {
    // A set id of the group that does not exist: a permitted caller gets past the grant check
    // to NOT_FOUND, a refused one stops at PERMISSION_DENIED.
    let set_id = format!("{group}-20261202T000000Z-dead");
    let result = match verb {
        "view" => client
            .list_sets(pb::ListSetsRequest {
                group: group.into(),
                limit: 5,
            })
            .await
            .map(|_| ()),
        "view-set" => client
            .get_set(pb::GetSetRequest { set_id })
            .await
            .map(|_| ()),
        "backup" => client
            .create_set(pb::CreateSetRequest {
                group: group.into(),
            })
            .await
            .map(|_| ()),
        "restore" => client
            .restore_set(pb::RestoreSetRequest {
                set_id,
                target_dir: "/tmp/x".into(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "delete" => client
            .delete_set(pb::DeleteSetRequest {
                set_id,
                approve: false,
            })
            .await
            .map(|_| ()),
        other => panic!("verb {other}"),
    };
    match result {
        Ok(()) => Code::Ok,
        Err(status) => {
            if status.code() == Code::PermissionDenied {
                assert!(
                    status.message().contains(group),
                    "the refusal names the group: {status:?}"
                );
            }
            status.code()
        }
    }
}

#[tokio::test]
async fn every_role_and_verb_on_granted_and_ungranted_groups() {
    let dir = pki_dir();
    let addr = serve(dir.path(), GRANTS).await;
    // (operator, group) → allowed for [view, view-set, backup, restore, delete]
    let table: [(&str, &str, [bool; 5]); 8] = [
        ("vera", "billing", [true, true, false, false, false]),
        ("vera", "orders", [true, true, false, false, false]),
        ("otto", "billing", [true, true, true, true, false]),
        ("otto", "orders", [false, false, false, false, false]),
        ("ada", "orders", [true, true, true, true, true]),
        ("ada", "billing", [false, false, false, false, false]),
        ("mallory", "billing", [false, false, false, false, false]),
        ("mallory", "orders", [false, false, false, false, false]),
    ];
    let verbs = ["view", "view-set", "backup", "restore", "delete"];
    for (who, group, allowed) in table {
        let mut client = client(addr, dir.path(), who).await;
        for (verb, allow) in verbs.iter().zip(allowed) {
            let code = call(&mut client, verb, group).await;
            if allow {
                assert_ne!(code, Code::PermissionDenied, "{who} {verb} {group}");
            } else {
                assert_eq!(code, Code::PermissionDenied, "{who} {verb} {group}");
            }
        }
    }
    // Lists and permissions.
    let mut otto = client(addr, dir.path(), "otto").await;
    let groups = otto
        .list_groups(pb::ListGroupsRequest {})
        .await
        .unwrap()
        .into_inner()
        .groups;
    let names: Vec<&str> = groups.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names, ["billing"]);
    let perms = otto
        .get_permissions(pb::GetPermissionsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(perms.identity, "operator otto");
    assert!(!perms.unrestricted);
    assert_eq!(perms.groups.len(), 1);
    assert_eq!(
        perms.groups[0].actions,
        [
            pb::Action::View as i32,
            pb::Action::Backup as i32,
            pb::Action::Restore as i32
        ]
    );
    let mut mallory = client(addr, dir.path(), "mallory").await;
    let status = mallory
        .list_agents(pb::ListAgentsRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let status = mallory
        .list_sets(pb::ListSetsRequest {
            group: String::new(),
            limit: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let perms = mallory
        .get_permissions(pb::GetPermissionsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(perms.groups.is_empty(), "{perms:?}");
}

#[tokio::test]
async fn without_grants_every_operator_may_do_everything() {
    let dir = pki_dir();
    let addr = serve(dir.path(), "").await;
    let mut mallory = client(addr, dir.path(), "mallory").await;
    for verb in ["view", "view-set", "backup", "restore", "delete"] {
        let code = call(&mut mallory, verb, "orders").await;
        assert_ne!(code, Code::PermissionDenied, "{verb}");
    }
    let perms = mallory
        .get_permissions(pb::GetPermissionsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(perms.unrestricted);
    assert_eq!(perms.groups.len(), 2);
    assert!(perms.groups.iter().all(|g| g.actions.len() == 4));
}
