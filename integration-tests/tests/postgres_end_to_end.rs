//! The README's main job as a test: `scripts/demo` backs up PostgreSQL (data and WAL on two
//! volumes, under a transfer workload) through the real binaries over mTLS, restores the set,
//! starts PostgreSQL on it, and checks that it recovers with the conserved total intact,
//! `pg_amcheck` and `pg_checksums` clean. Root only.

use std::process::Command;

use quiesce_integration_tests::{bin_dir, describe, require_root, serial};

#[test]
fn postgres_backup_restores_to_a_consistent_database() {
    let _serial = serial();
    if !require_root() {
        return;
    }
    let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/demo");
    let out = Command::new("bash")
        .arg(demo)
        .env("QUIESCE_BIN_DIR", bin_dir())
        .output()
        .expect("run scripts/demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(out.status.success(), "{}", describe(&out));
    for check in [
        "PASS: sum(balance) = 100000",
        "PASS: pg_amcheck --heapallindexed: no corruption",
        "PASS: pg_checksums --check",
        "restored to a consistent database",
    ] {
        assert!(stdout.contains(check), "missing {check:?}:\n{stdout}");
    }
    assert!(stdout.contains("state          consistent"), "{stdout}");
}

#[test]
fn check_config_refuses_a_volume_holding_the_agents_state_or_log() {
    let _serial = serial();
    if !require_root() {
        return;
    }
    use quiesce_integration_tests::{FsKind, LoopFs, Scratch, Tmpfs, toml_str};
    let scratch = Scratch::new("check-config-own-files");
    let volume = LoopFs::create(
        &scratch.join("v.img"),
        64,
        FsKind::Ext4,
        &scratch.join("vol"),
    );
    let tmpfs = Tmpfs::mount(&scratch.join("tmp"), 1);
    // The state directory is on the volume itself (and so is the log below).
    let state_dir = volume.path("state");
    std::fs::create_dir_all(&state_dir).expect("mkdir");
    let config = scratch.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:9\"\nstate-dir = {}\n[[volume]]\nmount = {}\n[[volume]]\nmount = {}\n",
            toml_str(&state_dir),
            toml_str(volume.mount_point()),
            toml_str(tmpfs.path()),
        ),
    )
    .expect("write config");
    let log = std::fs::File::create(volume.path("agent.log")).expect("log file");
    let out = Command::new(bin_dir().join("quiesce-agent"))
        .args(["check-config", "--insecure", "--config"])
        .arg(&config)
        .stderr(log)
        .output()
        .expect("run check-config");
    let report = std::fs::read_to_string(volume.path("agent.log")).expect("read log");
    println!("{report}");
    assert_eq!(out.status.code(), Some(64), "{}", describe(&out));
    for needle in [
        "is not on tmpfs",
        "holds the agent's state directory",
        "tmpfs, which cannot be frozen",
    ] {
        assert!(report.contains(needle), "missing {needle:?}:\n{report}");
    }

    // State on tmpfs, but the log (stderr) written to the volume: refused for the log.
    let config = scratch.join("agent-log.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:9\"\nstate-dir = {}\n[[volume]]\nmount = {}\n",
            toml_str(tmpfs.path()),
            toml_str(volume.mount_point()),
        ),
    )
    .expect("write config");
    let log = std::fs::File::create(volume.path("agent2.log")).expect("log file");
    let out = Command::new(bin_dir().join("quiesce-agent"))
        .args(["check-config", "--insecure", "--config"])
        .arg(&config)
        .stderr(log)
        .output()
        .expect("run check-config");
    let report = std::fs::read_to_string(volume.path("agent2.log")).expect("read log");
    assert_eq!(out.status.code(), Some(64), "{report}");
    assert!(report.contains("holds the agent's log file"), "{report}");
}
