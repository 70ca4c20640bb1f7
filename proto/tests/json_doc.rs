//! docs/json.md, the `--json` schemas of quiescectl, is what the proto says, and what serde
//! really prints: every field of each documented message, always present.

use std::process::Command;

use quiesce_proto::coordinator::v1 as pb;

const DOC: &str = include_str!("../../docs/json.md");

/// The field names the doc lists under `## MESSAGE`.
fn documented(message: &str) -> Vec<String> {
    let heading = format!("## {message}\n");
    let start = DOC
        .find(&heading)
        .unwrap_or_else(|| panic!("docs/json.md has no section {message}"));
    DOC[start + heading.len()..]
        .lines()
        .take_while(|line| !line.starts_with("## "))
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split('`').next())
        .map(str::to_owned)
        .collect()
}

fn printed<T: serde::Serialize>(value: &T) -> Vec<String> {
    match serde_json::to_value(value).unwrap() {
        serde_json::Value::Object(map) => map.keys().cloned().collect(),
        other => panic!("not an object: {other}"),
    }
}

fn same(message: &str, mut printed: Vec<String>) {
    let mut documented = documented(message);
    documented.sort();
    printed.sort();
    assert_eq!(
        documented, printed,
        "{message}: docs/json.md against serde's output"
    );
}

#[test]
fn every_printed_field_is_documented_and_nothing_else() {
    same("SnapshotSet", printed(&pb::SnapshotSet::default()));
    same("SetHost", printed(&pb::SetHost::default()));
    same("SetVolume", printed(&pb::SetVolume::default()));
    same(
        "ListSetsResponse",
        printed(&pb::ListSetsResponse::default()),
    );
    same(
        "ListAgentsResponse",
        printed(&pb::ListAgentsResponse::default()),
    );
    same("AgentStatus", printed(&pb::AgentStatus::default()));
    same("AgentVolume", printed(&pb::AgentVolume::default()));
    same(
        "ListGroupsResponse",
        printed(&pb::ListGroupsResponse::default()),
    );
    same("GroupInfo", printed(&pb::GroupInfo::default()));
    same("GroupMember", printed(&pb::GroupMember::default()));
    same("RestoredVolume", printed(&pb::RestoredVolume::default()));
    same(
        "VerifySetResponse",
        printed(&pb::VerifySetResponse::default()),
    );
    same("Verification", printed(&pb::Verification::default()));
    same("VerifyCheck", printed(&pb::VerifyCheck::default()));
}

#[test]
fn the_doc_is_what_the_generator_makes_of_the_proto() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/json-schemas");
    let out = Command::new("python3")
        .arg(script)
        .arg("--check")
        .output()
        .expect("python3 scripts/json-schemas --check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
