//! A whole system: one agent and one coordinator process over mTLS on a reflink pool.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;

use crate::in_process::AgentToml;
use crate::loopfs::{LoopFs, Pool, Tmpfs};
use crate::pki::{AGENT, COORDINATOR, Pki};
use crate::process::{AgentProcess, CoordinatorProcess, Ctl, agent_table, group_table};
use crate::scratch::Scratch;

/// What [`Cluster::start`] builds.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Volumes (pool images, 128 MiB ext4) the agent's config allows, by name.
    pub volumes: Vec<String>,
    /// Volumes mounted in the same way but absent from the agent's config.
    pub unlisted_volumes: Vec<String>,
    /// Coordinator groups: name → volume names (all members on the one agent [`AGENT`]).
    pub groups: Vec<(String, Vec<String>)>,
    /// `lease` of every group; `None` for the default.
    pub group_lease: Option<String>,
    /// The agent's `allowed-coordinators`.
    pub allowed_coordinators: Vec<String>,
    /// Extra top-level keys of the agent's config.
    pub agent_top_level: String,
    /// Appended to the coordinator's config, after the groups (e.g. an `[audit]` table).
    pub coordinator_tail: String,
}

impl Default for ClusterOptions {
    /// Volumes `a` and `b`, both in group `g`, agent obeying [`COORDINATOR`].
    fn default() -> Self {
        ClusterOptions {
            volumes: vec!["a".into(), "b".into()],
            unlisted_volumes: Vec::new(),
            groups: vec![("g".into(), vec!["a".into(), "b".into()])],
            group_lease: None,
            allowed_coordinators: vec![COORDINATOR.into()],
            agent_top_level: String::new(),
            coordinator_tail: String::new(),
        }
    }
}

/// One agent and one coordinator process over mTLS, on an XFS reflink pool of ext4 volumes
/// mounted at `scratch/vol/<name>`; the agent's state directory on a tmpfs; snapshots in
/// `<pool>/snapshots`. Drops (in field order) the coordinator, the agent (SIGTERM: it thaws),
/// the volumes and pool (thaw, unmount, detach), the tmpfs, then the scratch directory.
pub struct Cluster {
    pub coordinator: CoordinatorProcess,
    pub agent: AgentProcess,
    pub pool: Pool,
    pub state: Tmpfs,
    pub pki: Pki,
    pub scratch: Scratch,
}

impl Cluster {
    pub fn start(tag: &str, options: &ClusterOptions) -> Cluster {
        let scratch = Scratch::new(tag);
        let pki = Pki::new(&scratch.join("pki"));
        let state = Tmpfs::mount(&scratch.join("run"), 8);
        let state_dir = state.join("agent");
        fs::create_dir_all(&state_dir).expect("mkdir state dir");
        let mut pool = Pool::create(&scratch, 1024);
        let mut mounts = BTreeMap::new();
        for name in options.volumes.iter().chain(&options.unlisted_volumes) {
            let mount = scratch.join("vol").join(name);
            pool.add_volume(name, 128, &mount);
            mounts.insert(name.clone(), mount);
        }
        let agent_toml = AgentToml {
            listen: None,
            state_dir,
            allowed_coordinators: options.allowed_coordinators.clone(),
            tls: Some(pki.tls(AGENT)),
            volumes: options.volumes.iter().map(|v| mounts[v].clone()).collect(),
            snapshot_dir: Some(pool.root().join("snapshots")),
            top_level: options.agent_top_level.clone(),
        };
        let agent = AgentProcess::start(scratch.path(), &agent_toml);
        let mut body = agent_table(AGENT, agent.port());
        for (group, names) in &options.groups {
            let paths: Vec<&PathBuf> = names.iter().map(|n| &mounts[n]).collect();
            body.push_str(&group_table(
                group,
                options.group_lease.as_deref(),
                &[(AGENT, &paths[..])],
            ));
        }
        body.push_str(&options.coordinator_tail);
        let coordinator = CoordinatorProcess::start(scratch.path(), &pki, &body);
        Cluster {
            coordinator,
            agent,
            pool,
            state,
            pki,
            scratch,
        }
    }

    pub fn volume(&self, name: &str) -> &LoopFs {
        self.pool.volume(name)
    }

    /// Where volume `name` is mounted.
    pub fn mount(&self, name: &str) -> PathBuf {
        self.volume(name).mount_point().to_owned()
    }

    /// The agent's reflink snapshot directory.
    pub fn snapshot_dir(&self) -> PathBuf {
        self.pool.root().join("snapshots")
    }

    /// `quiescectl` as the operator.
    pub fn ctl(&self) -> Ctl {
        self.coordinator.ctl()
    }

    /// Panics (with both logs) if any volume of the pool is frozen.
    pub fn assert_nothing_frozen(&self, context: &str) {
        for (name, volume) in self.pool.volumes() {
            assert!(
                !volume.is_frozen(),
                "{context}: volume {name} is frozen\n--- agent log\n{}\n--- coordinator log\n{}",
                self.agent.log(),
                self.coordinator.log()
            );
        }
    }
}
