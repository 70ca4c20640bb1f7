//! Compiles the .proto files with protox (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "quiesce/agent/v1/agent.proto",
        "quiesce/coordinator/v1/coordinator.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["."])?;
    let mut config = tonic_prost_build::configure()
        // Operator-facing messages are printed as JSON by quiescectl --json.
        .type_attribute(".quiesce.coordinator.v1", "#[derive(serde::Serialize)]");
    // The state enums print as their text (quiesce_proto::states), as the strings they were.
    for (field, with) in [
        ("SnapshotSet.state", "set_state"),
        ("SnapshotSet.phase", "set_phase"),
        ("SnapshotSet.completion", "completion"),
        ("PhaseMark.phase", "set_phase"),
        ("SetHost.state", "host_state"),
        ("SetHost.freeze_end", "freeze_end"),
    ] {
        config = config.field_attribute(
            format!(".quiesce.coordinator.v1.{field}"),
            format!("#[serde(serialize_with = \"crate::states::json::{with}\")]"),
        );
    }
    config.compile_fds(descriptors)?;
    Ok(())
}
