//! The audit log as an operator sees it, with the real binaries: `quiescectl audit` lists a
//! backup's calls, the `[audit] file` holds the same records as JSON lines, and
//! `quiescectl audit verify` exits 0 on the intact chain and 1, naming the record, once the
//! catalog file was edited behind the coordinator's back.

use std::fs;

use quiesce_integration_tests::{Cluster, ClusterOptions, describe, require_root, serial};
use serde_json::Value;

#[test]
fn quiescectl_audit_lists_verifies_and_names_an_edited_record() {
    let _serial = serial();
    if !require_root() {
        return;
    }
    // The audit file next to the catalog (a path created by the test, 0600 by the coordinator).
    let tail_dir = tempfile::tempdir().expect("tempdir");
    let audit_file = tail_dir.path().join("audit.jsonl");
    let options = ClusterOptions {
        coordinator_tail: format!(
            "[audit]\nfile = \"{}\"\nkeep = \"30d\"\n",
            audit_file.display()
        ),
        ..Default::default()
    };
    let cluster = Cluster::start("audit", &options);
    let ctl = cluster.ctl();
    let (out, set) = ctl.json(&["backup", "g"]);
    assert!(out.status.success(), "backup: {}", describe(&out));
    let id = set["id"].as_str().expect("id").to_owned();
    let out = ctl.run(&["sets", "show", "no-such-set"]);
    assert!(!out.status.success());

    let (out, listed) = ctl.json(&["audit"]);
    assert!(out.status.success(), "audit: {}", describe(&out));
    let records = listed["records"].as_array().expect("records").clone();
    let created: Vec<&Value> = records
        .iter()
        .filter(|r| r["verb"] == 1 && r["set_id"] == id.as_str())
        .collect();
    assert_eq!(created.len(), 1, "one CreateSet record: {listed:#}");
    assert_eq!(created[0]["outcome"], 1, "{listed:#}");
    assert!(
        created[0]["identity"]
            .as_str()
            .is_some_and(|i| i.starts_with("operator ")),
        "{listed:#}"
    );
    let unknown: Vec<&Value> = records
        .iter()
        .filter(|r| r["verb"] == 2 && r["code"] == "NotFound")
        .collect();
    assert_eq!(unknown.len(), 1, "the failed show is recorded: {listed:#}");

    // The text table names verbs and outcomes.
    let out = ctl.run(&["audit", "--since", "1h"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        text.contains("create_set") && text.contains(&id) && text.contains("failed"),
        "{text}"
    );
    let out = ctl.run(&["audit", "--since", "yesterday-ish"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));

    let out = ctl.run(&["audit", "verify"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("audit log intact"),
        "{}",
        describe(&out)
    );

    // The file copy: one JSON object per line, the same chain.
    let lines = fs::read_to_string(&audit_file).expect("audit file");
    let copies: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let copied = copies
        .iter()
        .find(|c| c["verb"] == "create_set" && c["set_id"] == id.as_str())
        .expect("the backup's CreateSet in the file");
    assert_eq!(copied["hash"], created[0]["hash"]);
    assert_eq!(copied["outcome"], "ok");
    assert_eq!(copied["args"]["group"], "g");

    // Rewrite who made the backup, in the catalog file itself.
    let seq = created[0]["seq"].as_u64().expect("seq");
    let catalog = rusqlite::Connection::open(cluster.scratch.join("catalog.sqlite"))
        .expect("open the catalog");
    catalog
        .execute(
            "UPDATE audit SET identity = 'operator nobody' WHERE seq = ?1",
            [seq as i64],
        )
        .expect("edit");
    drop(catalog);
    let out = ctl.run(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("BROKEN at record {seq}")) && said.contains("altered"),
        "{}",
        describe(&out)
    );
}
