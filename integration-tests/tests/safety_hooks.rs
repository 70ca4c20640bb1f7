//! Issue 10, findings 5 and 6: exec hooks run only as checked, and `run` refuses exactly what
//! `check-config` refuses.
//!
//! - A hook directory swapped after prepare (its parent made world-writable, then `nobody`
//!   moves the checked directory away and puts their own in its place): the freeze is refused
//!   and nothing runs — neither the intruder's script nor the checked one.
//! - A script directory others can write, or under a parent others can write: `check-config`
//!   and `run` both exit 64 naming the same problems; `run` never listens.
//!
//! Cost: two agent starts, a few seconds.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use quiesce_integration_tests::safety::AgentChild;
use quiesce_integration_tests::{
    AGENT, AgentToml, COORDINATOR, FsKind, LoopFs, Pki, Scratch, Tmpfs, all_text, bin, describe,
    free_port, require_root, run_with_timeout, serial, toml_str,
};
use quiesce_proto::agent::v1 as pb;

const NOBODY: u32 = 65534;

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn script(path: &Path, body: &str) {
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).expect("write script");
    chmod(path, 0o755);
}

/// The agent config, private (it defines hooks), listening on `port`.
fn write_config(path: &Path, toml: &AgentToml, hooks_dir: &Path) {
    let text = format!(
        "{}[hook.scripts]\ntype = \"exec\"\ndir = {}\n",
        toml.render(),
        toml_str(hooks_dir)
    );
    std::fs::write(path, text).expect("write config");
    chmod(path, 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_dir_swapped_after_prepare_is_refused_and_nothing_runs() {
    let _serial = serial();
    if !require_root() {
        return;
    }
    let scratch = Scratch::new("hook-swap");
    chmod(scratch.path(), 0o755);
    let pki = Pki::new(&scratch.join("pki"));
    let state = Tmpfs::mount(&scratch.join("run"), 8);
    let volume = LoopFs::create(
        &scratch.join("a.img"),
        64,
        FsKind::Ext4,
        &scratch.join("vol/a"),
    );
    let marks = scratch.mkdir("marks");
    let log = marks.join("ran");
    std::fs::write(&log, "").expect("log");
    chmod(&log, 0o666);
    let parent = scratch.mkdir("hooks");
    let hooks = scratch.mkdir("hooks/hooks.d");
    for dir in [&parent, &hooks] {
        chmod(dir, 0o755);
    }
    script(
        &hooks.join("10-mark"),
        &format!("echo \"checked $1\" >> {}", log.display()),
    );
    let port = free_port();
    let config = scratch.join("agent.toml");
    write_config(
        &config,
        &AgentToml {
            listen: Some(std::net::SocketAddr::from(([127, 0, 0, 1], port))),
            state_dir: state.path().to_owned(),
            allowed_coordinators: vec![COORDINATOR.into()],
            tls: Some(pki.tls(AGENT)),
            volumes: vec![volume.mount_point().to_owned()],
            ..Default::default()
        },
        &hooks,
    );
    let mut command = Command::new(bin("quiesce-agent"));
    command.args(["run", "--config"]).arg(&config);
    let agent = AgentChild::start(command, port);
    let mut client = agent
        .client(Some(&pki), COORDINATOR, Duration::from_secs(5))
        .await
        .expect("connect");
    let mount = volume.mount_point().display().to_string();
    client
        .prepare_volumes(pb::PrepareVolumesRequest {
            set_id: "swap-1".into(),
            mount_points: vec![mount.clone()],
            hooks: vec!["scripts".into()],
        })
        .await
        .expect("prepare");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "checked prepare\n");

    // After prepare: the parent becomes world-writable, and nobody swaps the directory.
    chmod(&parent, 0o777);
    let swap = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "set -e; cd {dir}; mv hooks.d hooks.old; mkdir hooks.d; \
             printf '#!/bin/sh\\necho \"intruder $1\" >> {log}\\n' > hooks.d/10-mark; \
             chmod 755 hooks.d/10-mark",
            dir = parent.display(),
            log = log.display()
        ))
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .expect("swap as nobody");
    assert!(swap.status.success(), "{}", describe(&swap));

    let freeze = client
        .freeze_volumes(pb::FreezeVolumesRequest {
            set_id: "swap-1".into(),
            mount_points: vec![mount.clone()],
            lease_ms: 5000,
            hooks: vec!["scripts".into()],
        })
        .await;
    let frozen = volume.is_frozen();
    let _ = client
        .thaw_volumes(pb::ThawVolumesRequest {
            set_id: "swap-1".into(),
        })
        .await;
    let ran = std::fs::read_to_string(&log).unwrap();
    println!("freeze after the swap: {freeze:?}\nscripts that ran: {ran:?}");
    let status = freeze.expect_err("a freeze whose hook dir was swapped must be refused");
    assert!(
        status.message().contains("hook scripts")
            && status.message().contains(&parent.display().to_string()),
        "{status:?}"
    );
    assert_eq!(ran, "checked prepare\n", "something ran after the swap");
    assert!(!frozen, "the volume was frozen");
    drop(client);
    drop(agent);
    chmod(&parent, 0o755);
}

#[test]
fn run_refuses_what_check_config_refuses() {
    let _serial = serial();
    if !require_root() {
        return;
    }
    let scratch = Scratch::new("run-vs-check");
    chmod(scratch.path(), 0o755);
    let state = Tmpfs::mount(&scratch.join("run"), 8);
    let writable_parent = scratch.mkdir("shared");
    chmod(&writable_parent, 0o777);
    let under_writable = scratch.mkdir("shared/hooks.d");
    chmod(&under_writable, 0o755);
    let writable_dir = scratch.mkdir("open/hooks.d");
    chmod(&scratch.join("open"), 0o755);
    chmod(&writable_dir, 0o777);
    for (name, dir) in [
        ("under-writable", &under_writable),
        ("writable", &writable_dir),
    ] {
        let port = free_port();
        let config = scratch.join(format!("{name}.toml"));
        write_config(
            &config,
            &AgentToml {
                listen: Some(std::net::SocketAddr::from(([127, 0, 0, 1], port))),
                state_dir: state.path().to_owned(),
                ..Default::default()
            },
            dir,
        );
        let check = run_with_timeout(
            Command::new(bin("quiesce-agent"))
                .args(["check-config", "--insecure", "--config"])
                .arg(&config),
            Duration::from_secs(20),
        );
        let run = run_with_timeout(
            Command::new(bin("quiesce-agent"))
                .args(["run", "--insecure", "--config"])
                .arg(&config),
            Duration::from_secs(20),
        );
        println!("{name}: check-config: {}", all_text(&check).trim());
        println!("{name}: run: {}", all_text(&run).trim());
        assert_eq!(
            check.status.code(),
            Some(64),
            "{name}: {}",
            describe(&check)
        );
        assert_eq!(
            run.status.code(),
            Some(64),
            "{name}: run started: {}",
            describe(&run)
        );
        let problems: Vec<String> = String::from_utf8_lossy(&check.stderr)
            .lines()
            .filter_map(|l| l.trim().strip_prefix("- "))
            .map(str::to_owned)
            .collect();
        assert!(!problems.is_empty(), "{name}: {}", describe(&check));
        for problem in &problems {
            assert!(
                all_text(&run).contains(problem.as_str()),
                "{name}: run did not refuse {problem:?}: {}",
                describe(&run)
            );
        }
        assert!(
            std::net::TcpStream::connect_timeout(
                &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                Duration::from_millis(200)
            )
            .is_err(),
            "{name}: something listens on the port"
        );
    }
}
