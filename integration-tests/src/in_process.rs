//! The agent's freeze state machine in the test process, behind a freezer that lets only the
//! test's own devices through, and the agent's TOML config rendered for a test.

use std::fs::{self, File};
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use quiesce_agent::config::Config as AgentConfig;
use quiesce_agent::freeze::FreezeManager;
use quiesce_agent::freezer::{Freezer, IoctlFreezer};
use quiesce_agent::mounts::{DevId, ProcMountTable};
use quiesce_agent::records::RecordStore;
use quiesce_agent::volumes::AgentFiles;
use quiesce_agent::watchdog::NoWatchdog;
use quiesce_proto::tls::TlsFiles;

use crate::env::toml_str;
use crate::loopfs::LoopFs;

/// A safety interlock around the real [`IoctlFreezer`]: FIFREEZE and FITHAW go through only for
/// the devices the test made; anything else is refused (EPERM) and recorded as a violation, so a
/// product bug fails the test instead of freezing the host. Also counts the calls.
pub struct GuardedFreezer {
    allowed: Vec<DevId>,
    calls: Mutex<Vec<(&'static str, DevId)>>,
    violations: Mutex<Vec<String>>,
}

impl GuardedFreezer {
    pub fn new(allowed: &[DevId]) -> Arc<GuardedFreezer> {
        Arc::new(GuardedFreezer {
            allowed: allowed.to_vec(),
            calls: Mutex::new(Vec::new()),
            violations: Mutex::new(Vec::new()),
        })
    }

    /// Every freeze/thaw let through, in order: `("freeze" | "thaw", device)`.
    pub fn calls(&self) -> Vec<(&'static str, DevId)> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Attempts on a device the test does not own.
    pub fn violations(&self) -> Vec<String> {
        self.violations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn admit(&self, op: &'static str, fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
        let file = File::from(fd.try_clone_to_owned()?);
        let dev = DevId::from_raw(file.metadata()?.dev());
        if self.allowed.contains(&dev) {
            self.calls
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((op, dev));
            Ok(())
        } else {
            let what = format!("{op} of device {dev}, which the test does not own");
            eprintln!("GuardedFreezer refused: {what}");
            self.violations
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(what);
            Err(std::io::Error::from_raw_os_error(libc::EPERM))
        }
    }
}

impl Freezer for GuardedFreezer {
    fn syncfs(&self, fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
        IoctlFreezer.syncfs(fd)
    }

    fn freeze(&self, fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
        self.admit("freeze", fd)?;
        IoctlFreezer.freeze(fd)
    }

    fn thaw(&self, fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
        self.admit("thaw", fd)?;
        IoctlFreezer.thaw(fd)
    }
}

/// The agent's TOML config, rendered for a test.
#[derive(Debug, Clone, Default)]
pub struct AgentToml {
    /// `None`: a placeholder address (in-process use), or the port the process harness picks.
    pub listen: Option<SocketAddr>,
    pub state_dir: PathBuf,
    pub allowed_coordinators: Vec<String>,
    /// `[tls]`: CA, certificate, key.
    pub tls: Option<TlsFiles>,
    pub volumes: Vec<PathBuf>,
    pub snapshot_dir: Option<PathBuf>,
    /// Raw top-level keys, e.g. `max-freeze = "2s"`.
    pub top_level: String,
}

impl AgentToml {
    pub fn render(&self) -> String {
        let listen = self
            .listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9)));
        let mut out = format!(
            "listen = \"{listen}\"\nstate-dir = {}\nallowed-coordinators = [{}]\n{}\n",
            toml_str(&self.state_dir),
            self.allowed_coordinators
                .iter()
                .map(|c| format!("{c:?}"))
                .collect::<Vec<_>>()
                .join(", "),
            self.top_level
        );
        if let Some(tls) = &self.tls {
            out.push_str(&format!(
                "[tls]\nca = {}\ncert = {}\nkey = {}\n",
                toml_str(&tls.ca),
                toml_str(&tls.cert),
                toml_str(&tls.key)
            ));
        }
        for volume in &self.volumes {
            out.push_str(&format!("[[volume]]\nmount = {}\n", toml_str(volume)));
        }
        if let Some(dir) = &self.snapshot_dir {
            out.push_str(&format!("[reflink]\nsnapshot-dir = {}\n", toml_str(dir)));
        }
        out
    }
}

/// The agent's freeze state machine in this process: the real `FreezeManager` with the real
/// mount table and the real ioctls (behind [`GuardedFreezer`]), no watchdog.
pub struct InProcessAgent {
    pub manager: Arc<FreezeManager>,
    pub freezer: Arc<GuardedFreezer>,
    pub config: Arc<AgentConfig>,
}

impl InProcessAgent {
    /// `toml.state_dir` must exist (normally on a [`Tmpfs`]); its `freezes/` directory is made
    /// here, as `quiesce-agent run` does. `owned` are the filesystems the freezer may touch.
    pub fn new(toml: &AgentToml, owned: &[&LoopFs]) -> InProcessAgent {
        let text = toml.render();
        let config = AgentConfig::parse(&text)
            .unwrap_or_else(|e| panic!("agent config does not parse: {e}\n{text}"));
        RecordStore::new(&config.state_dir)
            .create_dir()
            .expect("create the freeze record directory");
        let devs: Vec<DevId> = owned.iter().map(|fs| fs.dev()).collect();
        let freezer = GuardedFreezer::new(&devs);
        let config = Arc::new(config);
        let manager = FreezeManager::new(
            config.clone(),
            freezer.clone(),
            Arc::new(ProcMountTable::host()),
            AgentFiles::discover(&config.state_dir),
            Arc::new(NoWatchdog),
        );
        InProcessAgent {
            manager,
            freezer,
            config,
        }
    }

    /// The freeze record files present now (`<state-dir>/freezes/*.json`).
    pub fn records(&self) -> Vec<PathBuf> {
        let dir = RecordStore::new(&self.config.state_dir).dir().to_owned();
        let mut found: Vec<PathBuf> = fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "json"))
                    .collect()
            })
            .unwrap_or_default();
        found.sort();
        found
    }
}
