//! Issue 12: a set's figures are typed and ordered. The cut window (first freeze sent → last
//! FITHAW returned, coordinator clock) holds each host's write stall (first FIFREEZE → last
//! FITHAW, agent clock), and hook resume work after the thaw is a figure of its own, counted
//! in neither: a hook whose resume takes 3 s leaves the cut window as short as without it.
//!
//! Real FIFREEZE on loop ext4 volumes made here (the Lab's guards thaw them on failure and
//! panic), the real agent FreezeManager with a real exec hook, the real workflow and catalog
//! in one process (hooks_support).

mod hooks_support;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use hooks_support::{Lab, can_run, group, stack, volumes};

/// How long the hook's `thaw` (its resume) sleeps.
const SLOW_RESUME: Duration = Duration::from_millis(3000);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_hook_resume_is_its_own_figure_and_not_in_the_cut_window() {
    if !can_run("cut window", &["mkfs.xfs", "mkfs.ext4", "fsfreeze"]) {
        return;
    }
    let mut lab = Lab::new("cutwin", 1024);
    let data = lab.volume("data", 64);
    let wal = lab.volume("wal", 32);
    // The hook: root-owned, not group/world-writable (the agent refuses it otherwise).
    let hooks = lab.dir.join("hooks");
    std::fs::create_dir_all(&hooks).unwrap();
    std::fs::set_permissions(&hooks, std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = hooks.join("10-slow-thaw");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ncase \"$1\" in\n  thaw) sleep {:.1}; echo resumed=yes ;;\nesac\nexit 0\n",
            SLOW_RESUME.as_secs_f64()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();

    let agent = format!(
        "{}[hook.slow]\ntype = \"exec\"\ndir = {:?}\n",
        volumes(&[&data, &wal]),
        hooks.display().to_string()
    );
    let groups = format!(
        "{}{}",
        group("slow", &[&data, &wal], &["slow"]),
        group("plain", &[&data, &wal], &[])
    );
    let stack = stack(&agent, &groups);

    for round in 0..2 {
        let plain = stack.backup("plain").await;
        assert_eq!(
            plain.state(),
            quiesce_proto::coordinator::v1::SetState::Consistent,
            "{}",
            plain.error
        );
        assert_eq!(plain.max_resume_ms, 0, "no hook, no resume");
        let set = stack.backup("slow").await;
        assert_eq!(
            set.state(),
            quiesce_proto::coordinator::v1::SetState::Consistent,
            "{}",
            set.error
        );
        // The hook's outputs from its resume are still recorded with the set.
        assert!(
            set.hook_outputs
                .iter()
                .any(|o| o.hook == "slow" && o.values.iter().any(|v| v.key.ends_with("resumed"))),
            "{:?}",
            set.hook_outputs
        );
        for s in [&plain, &set] {
            assert!(s.freeze_window_ms > 0, "{}: no cut window", s.id);
            assert_eq!(s.hosts.len(), 1);
            let host = &s.hosts[0];
            assert!(host.write_stall_ms > 0, "{}: no write stall", s.id);
            assert!(
                host.write_stall_ms <= s.freeze_window_ms,
                "{}: stall {} ms > cut window {} ms",
                s.id,
                host.write_stall_ms,
                s.freeze_window_ms
            );
            assert_eq!(s.max_write_stall_ms, host.write_stall_ms);
            // The thaw returned inside the set, after its freeze was sent.
            assert!(
                host.thaw_returned_at_ms >= host.freeze_sent_at_ms
                    && host.thaw_returned_at_ms <= s.finished_at_ms,
                "{}: thaw returned at {} outside [{}, {}]",
                s.id,
                host.thaw_returned_at_ms,
                host.freeze_sent_at_ms,
                s.finished_at_ms
            );
        }
        let slow = SLOW_RESUME.as_millis() as u64;
        let host = &set.hosts[0];
        assert!(
            host.resume_ms >= slow && set.max_resume_ms == host.resume_ms,
            "round {round}: resume {} ms (set {} ms), the hook slept {slow} ms",
            host.resume_ms,
            set.max_resume_ms
        );
        // The resume is after the thaw: neither the stall nor the window holds it. A window
        // that did would be ≥ 3 s; the plain set's shows what the freeze itself costs.
        assert!(
            set.freeze_window_ms < slow && host.write_stall_ms < slow,
            "round {round}: cut window {} ms / stall {} ms include the {slow} ms resume",
            set.freeze_window_ms,
            host.write_stall_ms
        );
        eprintln!(
            "round {round}: plain cut window {} ms (stall {} ms); with the slow hook cut window {} ms, stall {} ms, resume {} ms",
            plain.freeze_window_ms,
            plain.hosts[0].write_stall_ms,
            set.freeze_window_ms,
            host.write_stall_ms,
            host.resume_ms
        );
    }
}
