//! Issue 10, finding 1: on btrfs, "the same filesystem" is the same superblock. An agent whose
//! `/` is a btrfs subvolume (a chroot made by the test, never the machine's root) refuses
//! `/data`, another subvolume of that filesystem: at `check-config`, at `run`, and at freeze
//! time when the subvolume is mounted at `/data` after the agent started (in place of an ext4
//! volume it had accepted). Nothing is ever frozen.
//!
//! Cost: one 256 MiB sparse btrfs image and two agent starts, a few seconds.

use std::time::Duration;

use quiesce_integration_tests::safety::{AgentChild, Btrfs, CHROOT_AGENT, CHROOT_STATE, Chroot};
use quiesce_integration_tests::{
    FsKind, LoopFs, Scratch, all_text, bin, describe, find_tool, free_port, require_root,
    run_with_timeout, serial,
};
use quiesce_proto::agent::v1 as pb;
use tonic::Code;

fn require_btrfs() -> bool {
    if find_tool("mkfs.btrfs").is_some() && find_tool("btrfs").is_some() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("mkfs.btrfs is not installed (apt-get install btrfs-progs), and CI is set");
    }
    eprintln!("skipping: mkfs.btrfs is not installed (apt-get install btrfs-progs)");
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_subvolume_of_a_btrfs_root_is_refused_everywhere_and_nothing_freezes() {
    let _serial = serial();
    if !require_root() || !require_btrfs() {
        return;
    }
    let scratch = Scratch::new("btrfs-root");
    let mut btrfs = Btrfs::create(&scratch.join("btrfs.img"), 256, &scratch.join("top"));
    btrfs.create_subvolume("@root");
    btrfs.create_subvolume("@data");
    for dir in ["@root/data", "@root/etc"] {
        std::fs::create_dir_all(btrfs.top().join(dir)).expect("mkdir");
    }
    std::fs::write(btrfs.top().join("@data/payload"), "data").expect("write");
    let root = scratch.join("root");
    btrfs.mount_subvolume("@root", &root);
    let chroot = Chroot::new(&root, &bin("quiesce-agent"));
    let port = free_port();
    let config = format!(
        "listen = \"127.0.0.1:{port}\"\nstate-dir = \"{CHROOT_STATE}\"\nmax-freeze = \"10s\"\n\
         default-lease = \"3s\"\n[[volume]]\nmount = \"/data\"\n"
    );
    std::fs::write(chroot.path("/etc/agent.toml"), config).expect("write config");
    let data = chroot.path("/data");

    // /data mounted: the config is refused by check-config and by run, alike.
    btrfs.mount_subvolume("@data", &data);
    let out = run_with_timeout(
        chroot
            .command(CHROOT_AGENT)
            .args(["check-config", "--insecure", "-c", "/etc/agent.toml"]),
        Duration::from_secs(30),
    );
    println!("check-config: {}", all_text(&out).trim());
    assert_eq!(out.status.code(), Some(64), "{}", describe(&out));
    assert!(
        all_text(&out).contains("/data is the root filesystem, which is never frozen"),
        "{}",
        describe(&out)
    );
    let out = run_with_timeout(
        chroot
            .command(CHROOT_AGENT)
            .args(["run", "--insecure", "-c", "/etc/agent.toml"]),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(64), "run: {}", describe(&out));
    assert!(
        all_text(&out).contains("/data is the root filesystem"),
        "{}",
        describe(&out)
    );
    assert!(
        !btrfs.is_frozen(),
        "the btrfs is frozen after check-config/run"
    );

    // Started while /data holds a filesystem of its own (an ext4 volume: accepted), then the
    // btrfs subvolume is mounted there instead: refused at freeze time.
    btrfs.unmount(&data);
    let ext4 = LoopFs::create(&scratch.join("ext4.img"), 64, FsKind::Ext4, &data);
    let mut command = chroot.command(CHROOT_AGENT);
    command.args(["run", "--insecure", "-c", "/etc/agent.toml"]);
    let agent = AgentChild::start(command, port);
    drop(ext4);
    btrfs.mount_subvolume("@data", &data);
    let mut client = agent
        .client(None, "", Duration::from_secs(5))
        .await
        .expect("connect");
    let freeze = client
        .freeze_volumes(pb::FreezeVolumesRequest {
            set_id: "btrfs-1".into(),
            mount_points: vec!["/data".into()],
            lease_ms: 3000,
            hooks: Vec::new(),
        })
        .await;
    let frozen_now = btrfs.is_frozen();
    let status = match freeze {
        Ok(reply) => {
            let _ = client
                .thaw_volumes(pb::ThawVolumesRequest {
                    set_id: "btrfs-1".into(),
                })
                .await;
            panic!(
                "the freeze of /data (the agent's own root filesystem) succeeded: {reply:?}; \
                 frozen then: {frozen_now}\n{}",
                agent.output()
            );
        }
        Err(status) => status,
    };
    println!("freeze of /data: {status:?}");
    assert!(!frozen_now, "the btrfs was frozen by a refused freeze");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("/data is the root filesystem"),
        "{status:?}"
    );
    let prepare = client
        .prepare_volumes(pb::PrepareVolumesRequest {
            set_id: "btrfs-2".into(),
            mount_points: vec!["/data".into()],
            hooks: Vec::new(),
        })
        .await
        .expect_err("prepare of /data must be refused");
    assert!(prepare.message().contains("root filesystem"), "{prepare:?}");
    let info = client
        .get_host_info(pb::GetHostInfoRequest {})
        .await
        .expect("host info")
        .into_inner();
    assert_eq!(info.volumes.len(), 1);
    assert!(
        info.volumes[0].problem.contains("root filesystem"),
        "{:?}",
        info.volumes[0]
    );
    assert!(info.freezes.is_empty(), "{:?}", info.freezes);
    assert!(!btrfs.is_frozen(), "the btrfs is frozen");
    drop(client);
    drop(agent);
    assert!(
        !btrfs.is_frozen(),
        "the btrfs is frozen after the agent stopped"
    );
    drop(chroot);
}
