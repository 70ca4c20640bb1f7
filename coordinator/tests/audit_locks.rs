//! The audit log and locked sets through the real operator API over mTLS: every call recorded,
//! allowed or denied (by a grant or by the certificate check), readable per the caller's
//! grants, its chain verified and an edit in the catalog named; a locked set refused to
//! everyone until two different admins approve.

mod common;

use quiesce_proto::coordinator::v1::SetState;
use std::path::Path;
use std::time::Duration;

use quiesce_coordinator::catalog::Catalog;
use quiesce_coordinator::config::Config;
use quiesce_proto::coordinator::v1 as pb;
use quiesce_proto::coordinator::v1::coordinator_client::CoordinatorClient;
use tonic::Code;
use tonic::transport::Channel;

const OPERATORS: [&str; 5] = ["vera", "otto", "ada", "adele", "mallory"];

fn config(catalog: &Path, extra_group: &str, extra: &str) -> Config {
    Config::parse(&format!(
        r#"
listen = "127.0.0.1:0"
catalog = "{catalog}"
[[agent]]
name = "db1"
endpoint = "https://127.0.0.1:9"
[[group]]
name = "billing"
provider = "reflink"
{extra_group}
[[group.member]]
agent = "db1"
mounts = ["/mnt/a"]
[[group]]
name = "orders"
provider = "reflink"
[[group.member]]
agent = "db1"
mounts = ["/mnt/b"]
[operator-lists]
admins = ["ada", "adele"]
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
operators = ["@admins"]
groups = ["billing"]
{extra}"#,
        catalog = catalog.display()
    ))
    .unwrap()
}

async fn wait_consistent(client: &mut CoordinatorClient<Channel>, id: &str) -> pb::SnapshotSet {
    for _ in 0..200 {
        let set = client
            .get_set(pb::GetSetRequest { set_id: id.into() })
            .await
            .unwrap()
            .into_inner()
            .set
            .unwrap();
        if set.state() != SetState::Running {
            assert_eq!(set.state(), SetState::Consistent, "{}", set.error);
            return set;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("set {id} still running");
}

fn find<'a>(
    records: &'a [pb::AuditRecord],
    identity: &str,
    verb: pb::AuditVerb,
) -> Vec<&'a pb::AuditRecord> {
    records
        .iter()
        .filter(|r| r.identity == identity && r.verb == verb as i32)
        .collect()
}

#[tokio::test]
async fn every_call_is_audited_visible_per_grant_and_an_edited_record_is_named() {
    let dir = common::pki_dir(&OPERATORS);
    let path = dir.path().join("catalog.sqlite");
    let (addr, _coordinator) = common::serve(
        dir.path(),
        config(&path, "", ""),
        Catalog::open(&path).unwrap(),
    )
    .await;
    let mut vera = common::client(addr, dir.path(), "vera").await;
    let mut otto = common::client(addr, dir.path(), "otto").await;
    let mut mallory = common::client(addr, dir.path(), "mallory").await;

    vera.list_sets(pb::ListSetsRequest {
        group: "billing".into(),
        limit: 3,
    })
    .await
    .unwrap();
    let denied = vera
        .create_set(pb::CreateSetRequest {
            group: "billing".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let id = otto
        .create_set(pb::CreateSetRequest {
            group: "billing".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .set_id;
    wait_consistent(&mut otto, &id).await;
    assert_eq!(
        mallory
            .list_agents(pb::ListAgentsRequest {})
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let orders_set = "orders-20261202T000000Z-dead";
    vera.get_set(pb::GetSetRequest {
        set_id: orders_set.into(),
    })
    .await
    .unwrap_err();
    // An agent's certificate, though signed by the same CA, is no operator: refused before
    // any handler, and recorded all the same.
    let mut agent = common::client(addr, dir.path(), "db1").await;
    assert_eq!(
        agent
            .list_groups(pb::ListGroupsRequest {})
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );

    let records = vera
        .list_audit(pb::ListAuditRequest::default())
        .await
        .unwrap()
        .into_inner()
        .records;
    let listed = find(&records, "operator vera", pb::AuditVerb::ListSets);
    assert_eq!(listed.len(), 1, "{records:#?}");
    assert_eq!(listed[0].outcome, pb::AuditOutcome::Ok as i32);
    assert_eq!(listed[0].group, "billing");
    assert!(
        listed[0].args.contains(r#""limit":3"#),
        "{}",
        listed[0].args
    );
    let refused = find(&records, "operator vera", pb::AuditVerb::CreateSet);
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].outcome, pb::AuditOutcome::Denied as i32);
    assert_eq!(refused[0].code, "PermissionDenied");
    assert!(
        refused[0]
            .message
            .contains("operator vera may not backup on group billing"),
        "{}",
        refused[0].message
    );
    let created = find(&records, "operator otto", pb::AuditVerb::CreateSet);
    assert_eq!(created.len(), 1);
    assert_eq!(
        created[0].set_id, id,
        "the record names the set the call made"
    );
    assert_eq!(created[0].outcome, pb::AuditOutcome::Ok as i32);
    let agents = find(&records, "operator mallory", pb::AuditVerb::ListAgents);
    assert_eq!(agents[0].outcome, pb::AuditOutcome::Denied as i32);
    let missing = find(&records, "operator vera", pb::AuditVerb::GetSet);
    assert_eq!(missing[0].outcome, pb::AuditOutcome::Failed as i32);
    assert_eq!(missing[0].code, "NotFound");
    assert_eq!(missing[0].group, "orders");
    let not_operator: Vec<_> = records
        .iter()
        .filter(|r| r.identity.contains("db1"))
        .collect();
    assert_eq!(not_operator.len(), 1, "{records:#?}");
    assert_eq!(not_operator[0].outcome, pb::AuditOutcome::Denied as i32);
    assert!(not_operator[0].message.contains("is not an operator"));

    // otto views billing only: no record about orders; records about no group are shown.
    let ottos = otto
        .list_audit(pb::ListAuditRequest::default())
        .await
        .unwrap()
        .into_inner()
        .records;
    assert!(ottos.iter().all(|r| r.group != "orders"), "{ottos:#?}");
    assert!(
        ottos
            .iter()
            .any(|r| r.verb == pb::AuditVerb::ListAgents as i32)
    );
    let since = otto
        .list_audit(pb::ListAuditRequest {
            group: "billing".into(),
            since_ms: created[0].at_ms,
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    assert!(
        since
            .iter()
            .all(|r| r.group == "billing" && r.at_ms >= created[0].at_ms)
    );
    assert!(since.iter().any(|r| r.seq == created[0].seq));
    assert_eq!(
        mallory
            .list_audit(pb::ListAuditRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );

    let intact = vera
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(intact.intact, "{intact:?}");
    assert!(intact.records >= 9, "{intact:?}");
    assert_eq!(intact.first_seq, 1);

    // Someone with the catalog file rewrites who was refused.
    let db = rusqlite::Connection::open(&path).unwrap();
    db.execute(
        "UPDATE audit SET identity = 'operator ada' WHERE seq = ?1",
        [refused[0].seq as i64],
    )
    .unwrap();
    let broken = vera
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!broken.intact);
    assert_eq!(broken.broken_seq, refused[0].seq, "{broken:?}");
    assert!(broken.problem.contains("altered"), "{broken:?}");
}

#[tokio::test]
async fn a_locked_set_is_deleted_only_when_two_admins_approve() {
    let dir = common::pki_dir(&OPERATORS);
    let path = dir.path().join("catalog.sqlite");
    let config = config(&path, "lock-for = \"30d\"\napproval-window = \"10m\"", "");
    assert_eq!(config.problems(true), Vec::<String>::new());
    let (addr, _coordinator) =
        common::serve(dir.path(), config, Catalog::open(&path).unwrap()).await;
    let mut otto = common::client(addr, dir.path(), "otto").await;
    let mut ada = common::client(addr, dir.path(), "ada").await;
    let mut adele = common::client(addr, dir.path(), "adele").await;
    let id = otto
        .create_set(pb::CreateSetRequest {
            group: "billing".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .set_id;
    let set = wait_consistent(&mut otto, &id).await;
    let thirty_days = 30 * 24 * 3600 * 1000;
    assert_eq!(set.locked_until_ms, set.created_at_ms + thirty_days);

    let delete = |approve| pb::DeleteSetRequest {
        set_id: id.clone(),
        approve,
    };
    let refused = ada.delete_set(delete(false)).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("is locked until")
            && refused.message().contains("--approve")
            && refused.message().contains("10m"),
        "{refused:?}"
    );
    // An operator may not delete at all, locked or not, nor approve.
    for approve in [false, true] {
        let status = otto.delete_set(delete(approve)).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    }
    let first = ada.delete_set(delete(true)).await.unwrap().into_inner();
    assert_eq!(first.approvals.len(), 1);
    assert_eq!(first.approvals[0].identity, "operator ada");
    assert!(!first.forgotten);
    // The same admin twice is still one approval.
    let again = ada.delete_set(delete(true)).await.unwrap().into_inner();
    assert_eq!(again.approvals.len(), 1);
    assert!(
        otto.get_set(pb::GetSetRequest { set_id: id.clone() })
            .await
            .is_ok(),
        "one admin is not enough"
    );
    let second = adele.delete_set(delete(true)).await.unwrap().into_inner();
    assert_eq!(second.approvals.len(), 2, "{second:?}");
    assert!(second.forgotten, "{second:?}");
    assert_eq!(
        otto.get_set(pb::GetSetRequest { set_id: id.clone() })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    let records = ada
        .list_audit(pb::ListAuditRequest {
            group: "billing".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    let deletes: Vec<(&str, i32, &str)> = records
        .iter()
        .filter(|r| r.verb == pb::AuditVerb::DeleteSet as i32)
        .map(|r| (r.identity.as_str(), r.outcome, r.message.as_str()))
        .collect();
    assert_eq!(deletes.len(), 6, "{deletes:#?}");
    assert_eq!(deletes[0].1, pb::AuditOutcome::Failed as i32);
    assert!(deletes[0].2.contains("locked until"));
    assert!(
        deletes[3].2.contains("a second admin must approve"),
        "{deletes:#?}"
    );
    assert_eq!(deletes[5].0, "operator adele");
    assert!(
        deletes[5]
            .2
            .contains("approved by operator ada and operator adele; deleted"),
        "{deletes:#?}"
    );
    assert!(
        records
            .iter()
            .all(|r| r.set_id == id || r.set_id.is_empty())
    );
}
