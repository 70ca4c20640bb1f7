//! Release and dist builds abort on panic (`panic = "abort"` in the workspace profile): a panic
//! anywhere in the agent ends the process at once with SIGABRT. The guardian must then thaw
//! what the agent held, as it does for a SIGKILL: it watches its socket to the agent, which the
//! kernel closes when the process ends, however it ends. Debug builds (these tests) unwind, so
//! the test sends the SIGABRT that an aborting panic raises. Real binaries, a real loop
//! filesystem; root only.

use std::time::Duration;

use nix::sys::signal::Signal;
use quiesce_integration_tests::faults::Rig;
use quiesce_integration_tests::{require_root, serial, unix_ns};

#[test]
fn an_agent_that_aborts_while_frozen_is_thawed_by_its_guardian_at_once() {
    let _serial = serial();
    require_root();
    // No core file: the agent's working directory is this test's.
    let none = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads the struct we pass and changes only this process's limit (which
    // the agent inherits); it has no other preconditions.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_CORE, &none) }, 0);
    // A 60 s lease and 120 s max-freeze: a thaw within seconds can only be the guardian's.
    let mut rig = Rig::start(
        "agent-abort",
        Duration::from_secs(60),
        "max-freeze = \"120s\"\ndefault-lease = \"10s\"\n",
        false,
        "frozen:1500ms",
    );
    let writer = rig.writer.as_ref().expect("writer");
    assert!(
        writer.wait_for_count(5, Duration::from_secs(5)),
        "the writer never wrote"
    );
    let id = rig.start_backup();
    rig.wait_for_frozen(&id, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(100));

    let abort_ns = unix_ns();
    rig.agent.signal(Signal::SIGABRT);
    assert!(
        rig.agent.wait_exit(Duration::from_secs(5)),
        "the agent did not end on SIGABRT"
    );
    let latency = rig
        .writer
        .as_ref()
        .expect("writer")
        .first_write_after(abort_ns, Duration::from_secs(10))
        .unwrap_or_else(|| {
            panic!(
                "still frozen 10 s after the agent aborted\n--- agent\n{}",
                rig.agent.log()
            )
        });
    println!(
        "agent SIGABRT: writer resumed after {} ms",
        latency.as_millis()
    );
    assert!(
        latency < Duration::from_secs(2),
        "the guardian took {latency:?} to thaw after the agent aborted"
    );
    let (state, error) = rig.wait_for_end(&id, Duration::from_secs(60));
    assert_eq!(state, "failed", "{error}");
    assert!(!error.is_empty());
}
