//! Fault injection: whatever fails while a set holds a volume frozen, a blocked writer on it
//! makes progress again within the bound of the mechanism that must thaw it, and the set is
//! `failed`. Real binaries, real loop filesystems; root only.

use std::time::Duration;

use quiesce_integration_tests::faults::{self, Fault};
use quiesce_integration_tests::{require_root, serial};

const LEASE: Duration = Duration::from_millis(1500);

fn check(fault: Fault, bound: Duration) {
    let _serial = serial();
    if !require_root() {
        return;
    }
    let outcome = faults::run(fault, LEASE);
    println!(
        "{fault}: thaw latency {} ms (lease {} ms); set {}: {}",
        outcome.thaw_latency.as_millis(),
        outcome.lease.as_millis(),
        outcome.state,
        outcome.error
    );
    assert!(
        outcome.thaw_latency <= bound,
        "{fault}: a writer waited {:?} after the fault (bound {bound:?})",
        outcome.thaw_latency
    );
    assert_eq!(outcome.state, "failed", "{fault}: {outcome:?}");
    assert!(
        !outcome.error.is_empty(),
        "{fault}: failed without a reason"
    );
}

#[test]
fn coordinator_killed_while_frozen_is_thawed_by_the_lease_and_the_set_fails() {
    // The lease runs from the freeze, so the latency is at most the lease.
    check(Fault::CoordinatorKilled, LEASE + Duration::from_millis(500));
}

#[test]
fn coordinator_stalled_while_frozen_is_thawed_by_the_lease_and_the_set_fails() {
    check(
        Fault::CoordinatorStalled,
        LEASE + Duration::from_millis(500),
    );
}

#[test]
fn network_cut_while_frozen_is_thawed_by_the_lease_and_the_set_fails() {
    check(Fault::NetworkCut, LEASE + Duration::from_millis(500));
}

#[test]
fn agent_killed_while_frozen_is_thawed_by_the_guardian_at_once() {
    // The set's lease is 60 s here: only the guardian can explain a fast thaw.
    check(Fault::AgentKilled, Duration::from_millis(500));
}

#[test]
fn agent_terminated_while_frozen_thaws_before_exiting() {
    check(Fault::AgentTerminated, Duration::from_millis(500));
}

mod direct {
    //! Faults driven straight through the agent API, as a misbehaving coordinator would.

    use std::time::{Duration, Instant};

    use nix::sys::signal::Signal;
    use quiesce_integration_tests::faults::Rig;
    use quiesce_integration_tests::{COORDINATOR, require_root, serial, unix_ns};
    use quiesce_proto::agent::v1 as pb;

    #[tokio::test(flavor = "multi_thread")]
    async fn a_coordinator_that_keeps_renewing_is_cut_off_at_max_freeze() {
        let _serial = serial();
        if !require_root() {
            return;
        }
        let rig = Rig::start(
            "fault-hard-cap",
            Duration::from_secs(1),
            "max-freeze = \"2s\"\ndefault-lease = \"1s\"\n",
            false,
            "",
        );
        let mut client = rig
            .agent
            .client(&rig.pki, COORDINATOR)
            .await
            .expect("connect");
        let mounts = vec![rig.mount().display().to_string()];
        let frozen_ns = unix_ns();
        client
            .freeze_volumes(pb::FreezeVolumesRequest {
                set_id: "cap-1".into(),
                mount_points: mounts,
                lease_ms: 1000,
                hooks: Vec::new(),
            })
            .await
            .expect("freeze");
        // Renew every 200 ms asking for a minute, until the agent refuses.
        let started = Instant::now();
        let mut renewals = 0;
        loop {
            let renewed = client
                .renew_lease(pb::RenewLeaseRequest {
                    set_id: "cap-1".into(),
                    lease_ms: 60_000,
                })
                .await;
            match renewed {
                Ok(reply) => {
                    renewals += 1;
                    let reply = reply.into_inner();
                    assert!(
                        reply.lease_deadline_ms <= reply.hard_deadline_ms,
                        "lease past the hard cap: {reply:?}"
                    );
                }
                Err(status) => {
                    assert!(status.message().contains("max-freeze"), "{status:?}");
                    break;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "the cap never fired"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let resumed = rig
            .writer
            .as_ref()
            .expect("writer")
            .first_write_after(frozen_ns + 1_500_000_000, Duration::from_secs(5))
            .expect("writer resumed");
        let frozen_for = Duration::from_millis(1500) + resumed;
        println!(
            "hard cap: {renewals} renewals; writes blocked ≈{} ms",
            frozen_for.as_millis()
        );
        assert!(
            renewals >= 5,
            "renewals did extend the 1 s lease: {renewals}"
        );
        assert!(
            frozen_for < Duration::from_millis(2600),
            "frozen {frozen_for:?} with max-freeze 2 s"
        );
        let thawed = client
            .thaw_volumes(pb::ThawVolumesRequest {
                set_id: "cap-1".into(),
            })
            .await
            .expect("thaw")
            .into_inner();
        assert_eq!(thawed.end(), pb::FreezeEnd::MaxFreeze, "{thawed:?}");
        assert!(!thawed.held_continuously);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_hung_agent_is_thawed_by_its_guardian_at_max_freeze() {
        let _serial = serial();
        if !require_root() {
            return;
        }
        let rig = Rig::start(
            "fault-hung-agent",
            Duration::from_secs(1),
            "max-freeze = \"2s\"\ndefault-lease = \"2s\"\n",
            false,
            "",
        );
        let mut client = rig
            .agent
            .client(&rig.pki, COORDINATOR)
            .await
            .expect("connect");
        let frozen_ns = unix_ns();
        client
            .freeze_volumes(pb::FreezeVolumesRequest {
                set_id: "hung-1".into(),
                mount_points: vec![rig.mount().display().to_string()],
                lease_ms: 2000,
                hooks: Vec::new(),
            })
            .await
            .expect("freeze");
        // The agent stops answering (and its own lease timer with it).
        rig.agent.signal(Signal::SIGSTOP);
        let resumed = rig
            .writer
            .as_ref()
            .expect("writer")
            .first_write_after(frozen_ns + 500_000_000, Duration::from_secs(8));
        rig.agent.signal(Signal::SIGCONT);
        let blocked = Duration::from_millis(500) + resumed.expect("the guardian never thawed");
        println!(
            "hung agent: writes blocked ≈{} ms (max-freeze 2 s + 1 s guardian slack)",
            blocked.as_millis()
        );
        assert!(
            blocked >= Duration::from_millis(2500),
            "thawed before the cap: {blocked:?}"
        );
        assert!(
            blocked < Duration::from_millis(4500),
            "guardian late: {blocked:?}"
        );
        assert!(
            rig.agent
                .log()
                .contains("max-freeze passed and the agent did not thaw"),
            "{}",
            rig.agent.log()
        );
        // The stall the agent reports is what its guardian measured (first FIFREEZE → the
        // guardian's FITHAW), close to what the writer felt — not the later moment the
        // continued agent looked at it.
        let thawed = client
            .thaw_volumes(pb::ThawVolumesRequest {
                set_id: "hung-1".into(),
            })
            .await
            .expect("thaw")
            .into_inner();
        assert_eq!(thawed.end(), pb::FreezeEnd::Guardian, "{thawed:?}");
        let reported = Duration::from_millis(thawed.write_stall_ms);
        println!("hung agent: the agent reports a {reported:?} stall, writers felt ≈{blocked:?}");
        assert!(
            reported.abs_diff(blocked) < Duration::from_millis(400),
            "reported {reported:?}, writers blocked {blocked:?}"
        );
    }

    #[test]
    fn a_prepare_that_hangs_fails_the_set_without_freezing_anything() {
        let _serial = serial();
        if !require_root() {
            return;
        }
        // The coordinator pauses 2 s once its plan is done; the test stops the agent in that
        // pause, so the prepare call that follows hangs until the 2 s phase deadline.
        let rig = Rig::start(
            "fault-prepare-hang",
            Duration::from_secs(2),
            "",
            false,
            "planned:2s",
        );
        let id = rig.start_backup();
        // The plan (one host-info call) is done well within this.
        std::thread::sleep(Duration::from_millis(700));
        rig.agent.signal(Signal::SIGSTOP);
        let (state, error) = rig.wait_for_end(&id, Duration::from_secs(20));
        rig.agent.signal(Signal::SIGCONT);
        println!("hung prepare: set {state}: {error}");
        assert_eq!(state, "failed");
        assert!(
            error.contains("prepare failed: no answer within 2s"),
            "{error}"
        );
        let set = rig.set(&id);
        let phases: Vec<&str> = set["phases"]
            .as_array()
            .expect("phases")
            .iter()
            .filter_map(|p| p["phase"].as_str())
            .collect();
        assert!(
            !phases.contains(&"freezing"),
            "froze after a failed prepare: {phases:?}"
        );
        let report = rig.writer.as_ref().expect("writer");
        assert!(report.count() > 0);
        assert!(!rig.pool.volume("a").is_frozen());
    }
}

mod cycles {
    use std::time::Duration;

    use quiesce_integration_tests::faults::Rig;
    use quiesce_integration_tests::{COORDINATOR, require_root, serial};
    use quiesce_proto::agent::v1 as pb;

    /// (open fds, threads, RSS KiB) of a process.
    fn usage(pid: u32) -> (usize, u64, u64) {
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0);
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (fds, field("Threads:"), field("VmRSS:"))
    }

    fn guardian_of(pid: u32) -> u32 {
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .ok()
            .and_then(|c| c.split_whitespace().next().and_then(|p| p.parse().ok()))
            .expect("the agent has a guardian child")
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn hundreds_of_freeze_thaw_cycles_leak_no_fds_threads_or_memory() {
        let _serial = serial();
        if !require_root() {
            return;
        }
        let rig = Rig::start("fault-cycles", Duration::from_secs(5), "", false, "");
        let client = rig
            .agent
            .client(&rig.pki, COORDINATOR)
            .await
            .expect("connect");
        let mounts = vec![rig.mount().display().to_string()];
        let cycle = |n: usize| {
            let mounts = mounts.clone();
            let mut client = client.clone();
            async move {
                let set_id = format!("cycle-{n}");
                client
                    .freeze_volumes(pb::FreezeVolumesRequest {
                        set_id: set_id.clone(),
                        mount_points: mounts,
                        lease_ms: 5000,
                        hooks: Vec::new(),
                    })
                    .await
                    .expect("freeze");
                let thawed = client
                    .thaw_volumes(pb::ThawVolumesRequest { set_id })
                    .await
                    .expect("thaw")
                    .into_inner();
                assert!(thawed.held_continuously, "cycle {n}: {thawed:?}");
            }
        };
        for n in 0..30 {
            cycle(n).await;
        }
        // Let blocking-pool threads and lease timers of the warm-up settle.
        tokio::time::sleep(Duration::from_secs(6)).await;
        let agent = rig.agent.pid();
        let guardian = guardian_of(agent);
        let before = (usage(agent), usage(guardian));
        for n in 30..330 {
            cycle(n).await;
        }
        tokio::time::sleep(Duration::from_secs(6)).await;
        let after = (usage(agent), usage(guardian));
        println!(
            "agent (fds, threads, RSS KiB) before {:?} after {:?}",
            before.0, after.0
        );
        println!("guardian before {:?} after {:?}", before.1, after.1);
        assert_eq!(after.0.0, before.0.0, "agent fds leaked");
        assert_eq!(after.1.0, before.1.0, "guardian fds leaked");
        assert!(
            after.0.1 <= before.0.1 + 4,
            "agent threads grew: {before:?} → {after:?}"
        );
        assert!(
            after.0.2 <= before.0.2 + 4096,
            "agent RSS grew by more than 4 MiB over 300 cycles: {before:?} → {after:?}"
        );
        assert!(
            after.1.2 <= before.1.2 + 512,
            "guardian RSS grew: {before:?} → {after:?}"
        );
        assert!(!rig.pool.volume("a").is_frozen());
    }
}

mod hatch {
    //! When both the agent and its guardian are gone, the freeze record still gets the volume
    //! thawed: by the emergency hatch, or by the next agent's start-up replay.

    use std::process::Command;
    use std::time::Duration;

    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    use quiesce_integration_tests::faults::Rig;
    use quiesce_integration_tests::{
        AgentProcess, COORDINATOR, bin, describe, require_root, serial, write_completes_within,
    };
    use quiesce_proto::agent::v1 as pb;

    fn guardian_of(pid: u32) -> i32 {
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .ok()
            .and_then(|c| c.split_whitespace().next().and_then(|p| p.parse().ok()))
            .expect("the agent has a guardian child")
    }

    /// Freezes volume `a` through the agent, then SIGKILLs the guardian and the agent (in that
    /// order, so nothing thaws), leaving a frozen volume and its record.
    async fn orphan_a_freeze(rig: &mut Rig) {
        let mut client = rig
            .agent
            .client(&rig.pki, COORDINATOR)
            .await
            .expect("connect");
        client
            .freeze_volumes(pb::FreezeVolumesRequest {
                set_id: "orphan-1".into(),
                mount_points: vec![rig.mount().display().to_string()],
                lease_ms: 60_000,
                hooks: Vec::new(),
            })
            .await
            .expect("freeze");
        let guardian = guardian_of(rig.agent.pid());
        kill(Pid::from_raw(guardian), Signal::SIGKILL).expect("kill guardian");
        std::thread::sleep(Duration::from_millis(100));
        rig.agent.kill_hard();
        assert!(
            rig.pool.volume("a").is_frozen(),
            "the setup should leave the volume frozen"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn thaw_all_replays_the_record_without_network() {
        let _serial = serial();
        if !require_root() {
            return;
        }
        let mut rig = Rig::start("hatch-thaw-all", Duration::from_secs(5), "", false, "");
        orphan_a_freeze(&mut rig).await;
        let out = Command::new(bin("quiesce-agent"))
            .args(["thaw", "--all", "--config"])
            .arg(rig.agent.config_path())
            .output()
            .expect("run quiesce-agent thaw");
        println!("{}", describe(&out));
        assert!(out.status.success(), "{}", describe(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("orphan-1"),
            "{}",
            describe(&out)
        );
        assert!(write_completes_within(
            &rig.mount().join("probe"),
            Duration::from_secs(3)
        ));
        // The record is gone: a second run has nothing to do.
        let again = Command::new(bin("quiesce-agent"))
            .args(["thaw", "--all", "--config"])
            .arg(rig.agent.config_path())
            .output()
            .expect("run quiesce-agent thaw");
        assert!(
            String::from_utf8_lossy(&again.stdout).contains("nothing recorded"),
            "{}",
            describe(&again)
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_restarted_agent_thaws_what_a_dead_one_left_frozen() {
        let _serial = serial();
        if !require_root() {
            return;
        }
        let mut rig = Rig::start("hatch-replay", Duration::from_secs(5), "", false, "");
        orphan_a_freeze(&mut rig).await;
        let config = std::fs::read_to_string(rig.agent.config_path()).expect("config");
        let dir = rig.scratch.join("second");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let toml = quiesce_integration_tests::AgentToml {
            listen: None,
            state_dir: rig.state.join("agent"),
            allowed_coordinators: vec![COORDINATOR.into()],
            tls: Some(rig.pki.tls(quiesce_integration_tests::AGENT)),
            volumes: vec![rig.mount()],
            snapshot_dir: None,
            top_level: String::new(),
        };
        assert!(config.contains("state-dir"));
        let second = AgentProcess::start(&dir, &toml);
        assert!(
            write_completes_within(&rig.mount().join("probe"), Duration::from_secs(3)),
            "the new agent did not thaw at start-up:\n{}",
            second.log()
        );
        assert!(
            second
                .log()
                .contains("recovered a freeze left by a previous agent"),
            "{}",
            second.log()
        );
    }

    #[test]
    fn thaw_mount_force_thaws_a_freeze_nobody_recorded() {
        let _serial = serial();
        if !require_root() {
            return;
        }
        let rig = Rig::start("hatch-force", Duration::from_secs(5), "", false, "");
        let volume = rig.pool.volume("a");
        volume.freeze_externally();
        let without_force = Command::new(bin("quiesce-agent"))
            .args(["thaw", "--mount"])
            .arg(rig.mount())
            .output()
            .expect("run");
        assert!(!without_force.status.success(), "--mount must need --force");
        assert!(volume.is_frozen());
        let out = Command::new(bin("quiesce-agent"))
            .args(["thaw", "--force", "--mount"])
            .arg(rig.mount())
            .output()
            .expect("run");
        assert!(out.status.success(), "{}", describe(&out));
        assert!(!volume.is_frozen());
        // On a volume that is not frozen it says so and does no harm.
        let again = Command::new(bin("quiesce-agent"))
            .args(["thaw", "--force", "--mount"])
            .arg(rig.mount())
            .output()
            .expect("run");
        assert!(
            String::from_utf8_lossy(&again.stdout).contains("WasNotFrozen"),
            "{}",
            describe(&again)
        );
    }
}
