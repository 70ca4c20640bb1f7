//! Fault-injection scenarios shared by `tests/faults.rs` (which asserts on them) and the
//! `fault-latencies` command (which repeats them and prints the table in
//! docs/fault-latencies.md).
//!
//! Every scenario runs the real binaries on a loop volume with a writer appending to it, takes
//! a set that the coordinator holds frozen (its `QUIESCE_TEST_PAUSE_AFTER=frozen` hook stops it
//! right after every member froze), injects one fault, and measures the **thaw latency**: the time
//! from the fault to the writer's first completed write. It then waits for the set's verdict.

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::proxy::Proxy;
use crate::{
    AGENT, AgentProcess, AgentToml, CoordinatorProcess, Pki, Pool, Scratch, Tmpfs, Writer,
    agent_table, toml_paths, unix_ns,
};

/// One way the world breaks while a set holds a volume frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The coordinator is SIGKILLed; it is restarted afterwards (recovery ends the set).
    CoordinatorKilled,
    /// The coordinator is SIGSTOPped, then continued after the lease.
    CoordinatorStalled,
    /// Every byte between coordinator and agent is dropped, for good.
    NetworkCut,
    /// The agent is SIGKILLed: only its guardian can thaw.
    AgentKilled,
    /// The agent gets SIGTERM: it thaws before exiting.
    AgentTerminated,
}

impl Fault {
    pub const ALL: [Fault; 5] = [
        Fault::CoordinatorKilled,
        Fault::CoordinatorStalled,
        Fault::NetworkCut,
        Fault::AgentKilled,
        Fault::AgentTerminated,
    ];

    /// Who ends the freeze, and so the bound on the thaw latency.
    pub fn thawed_by(self) -> &'static str {
        match self {
            Fault::CoordinatorKilled | Fault::CoordinatorStalled | Fault::NetworkCut => {
                "the agent's lease"
            }
            Fault::AgentKilled => "the guardian process",
            Fault::AgentTerminated => "the agent's SIGTERM handler",
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fault::CoordinatorKilled => "coordinator SIGKILL",
            Fault::CoordinatorStalled => "coordinator SIGSTOP",
            Fault::NetworkCut => "network cut (black hole)",
            Fault::AgentKilled => "agent SIGKILL",
            Fault::AgentTerminated => "agent SIGTERM",
        })
    }
}

/// What a scenario measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub fault: Fault,
    /// The lease the set asked for.
    pub lease: Duration,
    /// Fault injected → first write completed on the volume.
    pub thaw_latency: Duration,
    /// How long the volume had been frozen when the fault hit (set froze → fault).
    pub frozen_before_fault: Duration,
    /// Fault injected → the set seen decided (no longer `running`) by the test's polling; for a
    /// killed coordinator this includes its restart and recovery.
    pub decided: Duration,
    /// The set's final state and error.
    pub state: String,
    pub error: String,
}

/// Everything a scenario runs on; dropped in an order that thaws before unmounting.
pub struct Rig {
    pub writer: Option<Writer>,
    pub coordinator: Option<CoordinatorProcess>,
    pub agent: AgentProcess,
    pub proxy: Option<Proxy>,
    pub pool: Pool,
    pub state: Tmpfs,
    pub pki: Pki,
    pub scratch: Scratch,
    pub body: String,
}

impl Rig {
    /// One agent with one volume `a` (the agent's own lease/max-freeze from `agent_keys`), and a
    /// coordinator whose group `g` has `lease` and a 2 s phase timeout, optionally reaching the
    /// agent through a fault-injecting proxy, and pausing after `pause` (`phase:ms`).
    pub fn start(
        tag: &str,
        lease: Duration,
        agent_keys: &str,
        via_proxy: bool,
        pause: &str,
    ) -> Rig {
        let scratch = Scratch::new(tag);
        let pki = Pki::new(&scratch.join("pki"));
        let state = Tmpfs::mount(&scratch.join("run"), 8);
        let state_dir = state.join("agent");
        std::fs::create_dir_all(&state_dir).expect("mkdir state dir");
        let mut pool = Pool::create(&scratch, 512);
        let mount = scratch.join("vol/a");
        pool.add_volume("a", 128, &mount);
        let agent = AgentProcess::start(
            scratch.path(),
            &AgentToml {
                listen: None,
                state_dir,
                allowed_coordinators: vec![crate::COORDINATOR.into()],
                tls: Some(pki.tls(AGENT)),
                volumes: vec![mount.clone()],
                snapshot_dir: Some(pool.root().join("snapshots")),
                top_level: agent_keys.into(),
            },
        );
        let proxy = via_proxy
            .then(|| Proxy::start(([127, 0, 0, 1], agent.port()).into()).expect("start proxy"));
        let port = proxy.as_ref().map_or(agent.port(), |p| p.addr().port());
        let body = format!(
            "{}[[group]]\nname = \"g\"\nprovider = \"reflink\"\nlease = \"{}ms\"\nphase-timeout = \"2s\"\n[[group.member]]\nagent = \"{AGENT}\"\nmounts = {}\n",
            agent_table(AGENT, port),
            lease.as_millis(),
            toml_paths(&[&mount]),
        );
        let coordinator = CoordinatorProcess::start_with_env(
            scratch.path(),
            &pki,
            &body,
            &[("QUIESCE_TEST_PAUSE_AFTER", pause)],
        );
        let writer = Writer::start(&mount.join("writer.log"), false);
        Rig {
            writer: Some(writer),
            coordinator: Some(coordinator),
            agent,
            proxy,
            pool,
            state,
            pki,
            scratch,
            body,
        }
    }

    pub fn mount(&self) -> PathBuf {
        self.pool.volume("a").mount_point().to_owned()
    }

    pub fn coordinator(&self) -> &CoordinatorProcess {
        self.coordinator.as_ref().expect("coordinator running")
    }

    /// Starts a backup without waiting; returns the set id.
    pub fn start_backup(&self) -> String {
        let out = self.coordinator().ctl().run(&["backup", "g", "--no-wait"]);
        assert!(out.status.success(), "{}", crate::describe(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The set as the catalog has it.
    pub fn set(&self, id: &str) -> Value {
        let (out, set) = self.coordinator().ctl().json(&["sets", "show", id]);
        assert!(out.status.success(), "{}", crate::describe(&out));
        set
    }

    /// Waits until every member agent of the set holds it frozen, as the agents themselves
    /// say (`quiescectl agents`: the catalog records nothing while a set is frozen).
    pub fn wait_for_frozen(&self, id: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let set = self.set(id);
            let hosts = set["hosts"].as_array().cloned().unwrap_or_default();
            let (out, agents) = self.coordinator().ctl().json(&["agents"]);
            assert!(out.status.success(), "{}", crate::describe(&out));
            let holds = |agent: &Value| {
                agents["agents"].as_array().is_some_and(|all| {
                    all.iter().any(|a| {
                        a["name"] == *agent
                            && a["frozen_sets"]
                                .as_array()
                                .is_some_and(|f| f.iter().any(|s| s == id))
                    })
                })
            };
            if !hosts.is_empty() && hosts.iter().all(|h| holds(&h["agent"])) {
                return;
            }
            assert!(
                set["state"] == "running" && Instant::now() < deadline,
                "set never held every member frozen: {set:#}\n--- coordinator\n{}\n--- agent\n{}",
                self.coordinator().log(),
                self.agent.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the set is no longer running; returns (state, error).
    pub fn wait_for_end(&self, id: &str, timeout: Duration) -> (String, String) {
        let deadline = Instant::now() + timeout;
        loop {
            let set = self.set(id);
            if set["state"] != "running" {
                return (
                    set["state"].as_str().unwrap_or_default().into(),
                    set["error"].as_str().unwrap_or_default().into(),
                );
            }
            assert!(
                Instant::now() < deadline,
                "set still running after {timeout:?}: {set:#}\n--- coordinator\n{}",
                self.coordinator().log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Restarts the coordinator on the same catalog without the pause hook.
    pub fn restart_coordinator(&mut self) {
        if let Some(mut old) = self.coordinator.take() {
            old.kill_hard();
        }
        self.coordinator = Some(CoordinatorProcess::start(
            self.scratch.path(),
            &self.pki,
            &self.body,
        ));
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        // Writer and daemons first; the pool's own guards thaw before unmounting.
        self.writer.take();
        self.coordinator.take();
        self.proxy.take();
    }
}

/// Runs one fault scenario with the given lease.
pub fn run(fault: Fault, lease: Duration) -> Outcome {
    // The agent's lease is what the set asked for; a long max-freeze so only the fault's own
    // mechanism can end the freeze early.
    let agent_keys = "max-freeze = \"120s\"\ndefault-lease = \"10s\"\n";
    // How long the coordinator stays paused with everything frozen. For agent faults the
    // lease is long (60 s) so a fast thaw can only come from the guardian or SIGTERM path.
    let (set_lease, pause) = match fault {
        Fault::CoordinatorKilled => (lease, "frozen".to_string()),
        Fault::CoordinatorStalled | Fault::NetworkCut => {
            (lease, format!("frozen:{}ms", (lease * 2).as_millis()))
        }
        Fault::AgentKilled | Fault::AgentTerminated => {
            (Duration::from_secs(60), "frozen:1500ms".to_string())
        }
    };
    let tag = format!("fault-{}", format!("{fault:?}").to_lowercase());
    let mut rig = Rig::start(
        &tag,
        set_lease,
        agent_keys,
        fault == Fault::NetworkCut,
        &pause,
    );
    let writer_started = rig
        .writer
        .as_ref()
        .expect("writer")
        .wait_for_count(5, Duration::from_secs(5));
    assert!(writer_started, "the writer never wrote");

    let id = rig.start_backup();
    let asked = Instant::now();
    rig.wait_for_frozen(&id, Duration::from_secs(10));
    // Everything is frozen now; hold it a moment so the writer is surely blocked.
    std::thread::sleep(Duration::from_millis(100));
    let frozen_before_fault = asked.elapsed();

    let fault_ns = unix_ns();
    let fault_at = Instant::now();
    match fault {
        Fault::CoordinatorKilled => rig.coordinator.as_mut().expect("coordinator").kill_hard(),
        Fault::CoordinatorStalled => rig.coordinator().signal(Signal::SIGSTOP),
        Fault::NetworkCut => rig.proxy.as_ref().expect("proxy").cut(),
        Fault::AgentKilled => rig.agent.kill_hard(),
        Fault::AgentTerminated => rig.agent.signal(Signal::SIGTERM),
    }
    let thaw_latency = rig
        .writer
        .as_ref()
        .expect("writer")
        .first_write_after(fault_ns, set_lease + Duration::from_secs(10))
        .unwrap_or_else(|| {
            panic!(
                "{fault}: the volume was still frozen {:?} after the fault\n--- agent\n{}",
                set_lease + Duration::from_secs(10),
                rig.agent.log()
            )
        });

    // Let the set reach its verdict.
    match fault {
        Fault::CoordinatorKilled => rig.restart_coordinator(),
        Fault::CoordinatorStalled => rig.coordinator().signal(Signal::SIGCONT),
        Fault::AgentTerminated => {
            assert!(
                rig.agent.wait_exit(Duration::from_secs(10)),
                "agent ignored SIGTERM"
            );
        }
        Fault::NetworkCut | Fault::AgentKilled => {}
    }
    let (state, error) = rig.wait_for_end(&id, Duration::from_secs(30));
    let decided = fault_at.elapsed();
    Outcome {
        fault,
        lease: set_lease,
        thaw_latency,
        frozen_before_fault,
        decided,
        state,
        error,
    }
}

/// Median and maximum of some durations.
pub fn median_max(values: &mut [Duration]) -> (Duration, Duration) {
    values.sort();
    let median = values[values.len() / 2];
    (median, *values.last().unwrap_or(&Duration::ZERO))
}
