//! `quiesce-agent check-config` refuses hook secrets anyone else can read: a config that defines
//! hooks, and a password file, readable by group or others; and a script directory others can
//! write. Every problem is named at once (exit 64).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn check_config_names_every_readable_secret_and_writable_script_dir() {
    // The harness's lookup: $QUIESCE_BIN_DIR, else next to this test; fails when not built.
    let agent = quiesce_integration_tests::bin("quiesce-agent");
    let dir = tempfile::tempdir().unwrap();
    chmod(dir.path(), 0o755);
    let password = dir.path().join("pg.password");
    std::fs::write(&password, "secret\n").unwrap();
    chmod(&password, 0o644);
    let scripts = dir.path().join("hooks.d");
    std::fs::create_dir(&scripts).unwrap();
    chmod(&scripts, 0o777);
    let state = tempfile::Builder::new()
        .prefix("quiesce-hooks-config")
        .tempdir_in("/dev/shm")
        .unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:1\"\nstate-dir = {:?}\n[hook.pg]\ntype = \"postgres\"\npassword-file = {:?}\n[hook.scripts]\ntype = \"exec\"\ndir = {:?}\n",
            state.path().display().to_string(),
            password.display().to_string(),
            scripts.display().to_string()
        ),
    )
    .unwrap();
    chmod(&config, 0o644);

    let out = Command::new(&agent)
        .args(["check-config", "--insecure", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    for needle in [
        &format!("hook pg: {} has mode 0644", password.display()),
        &format!(
            "hook scripts: {0}: {0} has mode 0777: writable by group or others",
            scripts.display()
        ),
        &format!(
            "config file (it defines hooks): {} has mode 0644",
            config.display()
        ),
    ] {
        assert!(
            stderr.contains(needle.as_str()),
            "{needle:?} not in {stderr}"
        );
    }

    for path in [&password, &config] {
        chmod(path, 0o600);
    }
    chmod(&scripts, 0o755);
    let out = Command::new(&agent)
        .args(["check-config", "--insecure", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
