//! The freeze state machine: which sets hold which filesystems frozen, under which lease.
//!
//! Per set: `Freezing` → `Frozen` → `Ended(report)`. A set's own async mutex serialises its
//! transitions; the short-lived `Inner` mutex only guards the maps (set id → session,
//! superblock → holder). Blocking work — resolving and checking paths, ioctls — runs on the
//! blocking pool, never on the async runtime, and at most `VALIDATIONS` requests resolve paths
//! at once, so a flood of requests costs bounded CPU.
//!
//! Lease and max-freeze expiry do not depend on the runtime at all: once frozen, a set's
//! descriptors are armed on the [`LeaseTimer`]'s own thread, which thaws at the deadline
//! whatever the runtime is doing. The async side only learns of it afterwards.
//!
//! Nothing in here writes to a frozen filesystem: mount descriptors are opened (and checked)
//! before the first FIFREEZE, the freeze record lives on tmpfs, and log lines go to stderr.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{Mutex as AsyncMutex, Semaphore};
use tracing::{error, info, warn};

use crate::config::Config;
use crate::error::Error;
use crate::freezer::Freezer;
use crate::hooks::{HookContext, HookError, HookOutput, HookRegistry, HookSet, PreparedSets};
use crate::lease::{Disarmed, Expired, LeaseTimer};
use crate::mounts::{DevId, MountTable};
use crate::records::{FreezeRecord, RecordStore, RecordedVolume};
use crate::volumes::{AgentFiles, Volume, resolve_all};
use crate::watchdog::Watchdog;

/// How many ended sets are remembered, so that a repeated thaw gets the same answer.
const REMEMBERED_ENDINGS: usize = 256;

/// How many requests resolve and check their paths at the same time (the rest wait, costing
/// nothing but their place in the queue).
const VALIDATIONS: usize = 4;

/// Most hooks one request may name.
pub const MAX_HOOKS_PER_REQUEST: usize = 32;

/// How a freeze ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreezeEnd {
    Thawed,
    LeaseExpired,
    MaxFreeze,
    Shutdown,
    ExternalThaw,
    UnknownSet,
    /// The guardian process thawed it (the agent hung past max-freeze, or died).
    Guardian,
}

impl FreezeEnd {
    /// What thawed the set, for error texts.
    pub fn describe(self) -> &'static str {
        match self {
            FreezeEnd::Thawed => "thawed by the coordinator",
            FreezeEnd::LeaseExpired => "thawed by its lease (the coordinator stopped renewing it)",
            FreezeEnd::MaxFreeze => "thawed by the agent's max-freeze cap",
            FreezeEnd::Shutdown => "thawed by the agent's shutdown",
            FreezeEnd::ExternalThaw => "thawed by someone else behind the agent's back",
            FreezeEnd::UnknownSet => "unknown set",
            FreezeEnd::Guardian => {
                "thawed by the agent's guardian process (the agent hung past max-freeze or died)"
            }
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FreezeEnd::Thawed => "thawed",
            FreezeEnd::LeaseExpired => "lease-expired",
            FreezeEnd::MaxFreeze => "max-freeze",
            FreezeEnd::Shutdown => "shutdown",
            FreezeEnd::ExternalThaw => "external-thaw",
            FreezeEnd::UnknownSet => "unknown-set",
            FreezeEnd::Guardian => "guardian",
        }
    }
}

/// What the thaw of a set found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThawReport {
    /// Every volume stayed frozen from its FIFREEZE until an explicit thaw.
    pub held_continuously: bool,
    pub end: FreezeEnd,
    pub freeze_started_at_ms: u64,
    pub frozen_at_ms: u64,
    pub thawed_at_ms: u64,
    /// First FIFREEZE started → last FITHAW returned: how long writers were blocked.
    pub write_stall_ms: u64,
    /// What each hook of the set recorded, in the order they were named.
    pub hooks: Vec<HookOutput>,
    /// The hooks' resume work after the last FITHAW, all together: in neither the write
    /// stall nor the coordinator's cut window.
    pub resume_ms: u64,
    /// When the last FITHAW returned, on this process's monotonic clock (`None` when this
    /// process did not see it: an unknown set, or one the guardian thawed).
    pub thawed_at: Option<Instant>,
}

impl ThawReport {
    /// How long ago the last FITHAW returned, for the thaw reply: the coordinator subtracts
    /// it from the reply's arrival. 0 when unknown.
    pub fn since_thaw_ms(&self) -> u64 {
        match self.thawed_at {
            Some(at) => at.elapsed().as_millis() as u64,
            None if self.thawed_at_ms > 0 => unix_ms().saturating_sub(self.thawed_at_ms),
            None => 0,
        }
    }
}

impl ThawReport {
    fn unknown() -> Self {
        ThawReport {
            held_continuously: false,
            end: FreezeEnd::UnknownSet,
            freeze_started_at_ms: 0,
            frozen_at_ms: 0,
            thawed_at_ms: 0,
            write_stall_ms: 0,
            hooks: Vec::new(),
            resume_ms: 0,
            thawed_at: None,
        }
    }
}

/// What a successful freeze reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreezeInfo {
    pub freeze_started_at_ms: u64,
    pub frozen_at_ms: u64,
    pub lease_deadline_ms: u64,
    pub hard_deadline_ms: u64,
}

/// A set currently frozen, as host info shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldFreeze {
    pub set_id: String,
    pub mount_points: Vec<PathBuf>,
    pub frozen_at_ms: u64,
    pub lease_deadline_ms: u64,
    pub hard_deadline_ms: u64,
}

/// One frozen superblock, known by the descriptor that was checked and frozen.
#[derive(Debug)]
struct HeldVolume {
    mount_point: PathBuf,
    /// Every path of the request that named this superblock.
    aliases: Vec<PathBuf>,
    dev: DevId,
    backing_file: Option<PathBuf>,
    fd: Arc<OwnedFd>,
}

impl HeldVolume {
    fn from_volume(volume: &Volume) -> Self {
        HeldVolume {
            mount_point: volume.mount_point.clone(),
            aliases: volume.aliases.clone(),
            dev: volume.dev(),
            backing_file: volume.backing_file.clone(),
            fd: volume.fd.clone(),
        }
    }
}

/// How one volume's FIFREEZE went.
enum FreezeOutcome {
    Frozen,
    Failed(Error),
    /// Past its freeze-timeout, the ioctl still running.
    TimedOut(Error, tokio::task::JoinHandle<io::Result<()>>),
}

#[derive(Debug)]
enum Phase {
    Freezing,
    Frozen,
    Ended(ThawReport),
}

#[derive(Debug)]
struct Session {
    set_id: String,
    volumes: Vec<HeldVolume>,
    phase: Phase,
    freeze_started: Instant,
    freeze_started_at_ms: u64,
    frozen_at_ms: u64,
    lease_deadline: Instant,
    hard_deadline: Instant,
    /// Hooks quiesced for this freeze: resumed after the thaw, whatever ends it.
    hooks: Option<HookSet>,
}

impl Session {
    fn info(&self) -> FreezeInfo {
        // One reading of both clocks, so that lease ≤ hard cap holds in wall-clock ms too.
        let (now, wall) = (Instant::now(), unix_ms());
        FreezeInfo {
            freeze_started_at_ms: self.freeze_started_at_ms,
            frozen_at_ms: self.frozen_at_ms,
            lease_deadline_ms: unix_ms_at(self.lease_deadline, now, wall),
            hard_deadline_ms: unix_ms_at(self.hard_deadline, now, wall),
        }
    }

    fn state_name(&self) -> String {
        match &self.phase {
            Phase::Freezing => "still freezing".into(),
            Phase::Frozen => "frozen".into(),
            Phase::Ended(report) => format!(
                "freeze ended: {}, {}",
                report.end.as_str(),
                report.end.describe()
            ),
        }
    }
}

#[derive(Default)]
struct Inner {
    sets: HashMap<String, Arc<AsyncMutex<Session>>>,
    holders: HashMap<DevId, String>,
    ended: VecDeque<(String, ThawReport)>,
    shutting_down: bool,
}

/// Everything the agent does to filesystems.
pub struct FreezeManager {
    config: Arc<Config>,
    freezer: Arc<dyn Freezer>,
    mounts: Arc<dyn MountTable>,
    agent_files: AgentFiles,
    records: RecordStore,
    watchdog: Arc<dyn Watchdog>,
    timer: LeaseTimer,
    validations: Semaphore,
    inner: Mutex<Inner>,
    hooks: HookRegistry,
    prepared: Arc<PreparedSets>,
}

impl FreezeManager {
    pub fn new(
        config: Arc<Config>,
        freezer: Arc<dyn Freezer>,
        mounts: Arc<dyn MountTable>,
        agent_files: AgentFiles,
        watchdog: Arc<dyn Watchdog>,
    ) -> Arc<Self> {
        let hooks = HookRegistry::from_config(&config.hooks);
        Self::with_hooks(config, freezer, mounts, agent_files, watchdog, hooks)
    }

    /// As `new`, with hooks other than the config's (tests use fakes).
    pub fn with_hooks(
        config: Arc<Config>,
        freezer: Arc<dyn Freezer>,
        mounts: Arc<dyn MountTable>,
        agent_files: AgentFiles,
        watchdog: Arc<dyn Watchdog>,
        hooks: HookRegistry,
    ) -> Arc<Self> {
        let records = RecordStore::new(&config.state_dir);
        if let Err(e) = records.create_dir() {
            // Every freeze will then fail to write its record, naming the path.
            error!(dir = %records.dir().display(), error = %e, "cannot create the freeze record directory");
        }
        Arc::new(FreezeManager {
            config,
            timer: LeaseTimer::new(freezer.clone()),
            freezer,
            mounts,
            agent_files,
            records,
            watchdog,
            validations: Semaphore::new(VALIDATIONS),
            inner: Mutex::new(Inner::default()),
            hooks,
            prepared: Arc::default(),
        })
    }

    pub fn hooks(&self) -> &HookRegistry {
        &self.hooks
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn mounts(&self) -> &dyn MountTable {
        self.mounts.as_ref()
    }

    pub fn agent_files(&self) -> &AgentFiles {
        &self.agent_files
    }

    /// Resolves and checks `mounts` (see `volumes::resolve_all`) on the blocking pool, at most
    /// `VALIDATIONS` requests at a time. The checks that cost nothing (how many, how long,
    /// listed at all) are made first, before waiting for a turn.
    pub async fn resolve(&self, mounts: &[PathBuf]) -> Result<Vec<Volume>, Error> {
        crate::volumes::check_request(&self.config, mounts)?;
        let _turn = self
            .validations
            .acquire()
            .await
            .map_err(|_| Error::ShuttingDown)?;
        let config = self.config.clone();
        let table = self.mounts.clone();
        let files = self.agent_files.clone();
        let mounts = mounts.to_vec();
        tokio::task::spawn_blocking(move || resolve_all(&config, table.as_ref(), &files, &mounts))
            .await
            .unwrap_or_else(|join| {
                Err(Error::InvalidArgument(format!("resolution failed: {join}")))
            })
    }

    /// Outside any freeze: syncfs each volume so that FIFREEZE has little left to flush.
    pub async fn prepare(&self, set_id: &str, mounts: &[PathBuf]) -> Result<Duration, Error> {
        self.prepare_with_hooks(set_id, mounts, &[]).await
    }

    /// `prepare`, then the prepare phase of every named hook: their sessions wait, keyed by
    /// set id, for the freeze (or are dropped after max-freeze if it never comes). A volume
    /// some set holds frozen is refused (never a syncfs on a frozen filesystem).
    pub async fn prepare_with_hooks(
        &self,
        set_id: &str,
        mounts: &[PathBuf],
        hooks: &[String],
    ) -> Result<Duration, Error> {
        validate_set_id(set_id)?;
        validate_hook_names(hooks)?;
        let started = Instant::now();
        let volumes = self.resolve(mounts).await?;
        for volume in &volumes {
            if let Some(holder) = self.holder_of(volume.dev()) {
                return Err(Error::Busy {
                    mount: volume.mount_point.clone(),
                    holder,
                });
            }
        }
        if !hooks.is_empty() {
            let ctx = HookContext {
                set_id: set_id.to_owned(),
                mounts: mounts.to_vec(),
            };
            let set = HookSet::prepare(&self.hooks, hooks, &ctx).await?;
            let ttl = self.config.max_freeze;
            for mut stale in self.prepared.insert(set, ttl) {
                stale.release().await;
            }
            // Nobody came to freeze or thaw this set (its coordinator failed elsewhere or
            // died): close its sessions after max-freeze, so no backup or lock stays open.
            let prepared = self.prepared.clone();
            let id = set_id.to_owned();
            tokio::spawn(async move {
                tokio::time::sleep(ttl).await;
                if let Some(mut set) = prepared.take_expired(&id, ttl) {
                    warn!(set_id = %id, "prepared hooks never frozen; closing them");
                    set.release().await;
                }
            });
        }
        // Every volume at once, each on its own blocking thread: syncfs until quiet, then the
        // journal checkpoint (`freezer::settle`), bounded by a share of the freeze timeout.
        let budget = self.config.freeze_timeout / 2;
        let pending: Vec<_> = volumes
            .iter()
            .map(|volume| {
                let freezer = self.freezer.clone();
                let fd = volume.fd.clone();
                tokio::task::spawn_blocking(move || {
                    crate::freezer::settle(freezer.as_ref(), fd.as_fd(), budget)
                })
            })
            .collect();
        let mut first_error = None;
        for (volume, handle) in volumes.iter().zip(pending) {
            match handle
                .await
                .unwrap_or_else(|join| Err(io::Error::other(join)))
            {
                Ok(settled) => info!(
                    set_id,
                    mount = %volume.mount_point.display(),
                    syncs = settled.syncs,
                    checkpointed = settled.checkpointed,
                    "prepared"
                ),
                Err(source) => {
                    first_error.get_or_insert(Error::Sync {
                        mount: volume.mount_point.clone(),
                        source,
                    });
                }
            }
        }
        match first_error {
            Some(err) => Err(err),
            None => Ok(started.elapsed()),
        }
    }

    /// Freezes every named volume, all or nothing, under a lease.
    pub async fn freeze(
        self: &Arc<Self>,
        set_id: &str,
        mounts: &[PathBuf],
        lease: Option<Duration>,
    ) -> Result<FreezeInfo, Error> {
        self.freeze_with_hooks(set_id, mounts, lease, &[]).await
    }

    /// `freeze`, with the named hooks (prepared by `prepare_with_hooks`) quiesced just before
    /// the first FIFREEZE. A quiesce failure resumes the hooks that quiesced and fails the
    /// freeze before anything is frozen.
    pub async fn freeze_with_hooks(
        self: &Arc<Self>,
        set_id: &str,
        mounts: &[PathBuf],
        lease: Option<Duration>,
        hooks: &[String],
    ) -> Result<FreezeInfo, Error> {
        validate_set_id(set_id)?;
        validate_hook_names(hooks)?;
        // Every mount point is opened and checked here, before anything is frozen; from now on
        // the descriptors are all the agent uses.
        let volumes = self.resolve(mounts).await?;
        let lease = lease
            .filter(|lease| !lease.is_zero())
            .unwrap_or(self.config.default_lease)
            .min(self.config.max_freeze);

        let now = Instant::now();
        let session = Arc::new(AsyncMutex::new(Session {
            set_id: set_id.to_owned(),
            volumes: volumes.iter().map(HeldVolume::from_volume).collect(),
            phase: Phase::Freezing,
            freeze_started: now,
            freeze_started_at_ms: unix_ms(),
            frozen_at_ms: 0,
            lease_deadline: now,
            hard_deadline: now,
            hooks: None,
        }));
        let mut guard = session
            .clone()
            .try_lock_owned()
            .expect("a session nobody else has seen is unlocked");
        if let Some(existing) = self.register(set_id, &guard, &session)? {
            return self.existing_freeze(set_id, &volumes, existing).await;
        }
        match self.take_prepared_hooks(set_id, hooks).await {
            Ok(set) => guard.hooks = set,
            Err(err) => {
                self.forget(set_id, &guard);
                return Err(err.into());
            }
        }

        let record = FreezeRecord {
            set_id: set_id.to_owned(),
            pid: std::process::id(),
            volumes: guard
                .volumes
                .iter()
                .map(|v| RecordedVolume::new(&v.mount_point, v.dev))
                .collect(),
        };
        if let Err((path, source)) = self.records.write(&record) {
            self.forget(set_id, &guard);
            return Err(Error::Record { path, source });
        }
        let fds: Vec<_> = guard.volumes.iter().map(|v| v.fd.clone()).collect();
        if let Err(err) = self.watchdog.hold(set_id, &fds) {
            error!(set_id, error = %err, "watchdog refused the freeze");
            self.forget(set_id, &guard);
            return Err(Error::GuardianGone);
        }

        if let Some(hooks) = guard.hooks.as_mut()
            && let Err((err, _outputs)) = hooks.quiesce().await
        {
            guard.hooks = None;
            self.forget(set_id, &guard);
            return Err(err.into());
        }

        let freeze_started = Instant::now();
        guard.freeze_started = freeze_started;
        guard.freeze_started_at_ms = unix_ms();
        // Every volume at once, each FIFREEZE on its own blocking thread under its own
        // freeze-timeout: the host's write stall is its slowest volume, not their sum.
        let targets = guard
            .volumes
            .iter()
            .map(|v| (v.mount_point.clone(), v.fd.clone()))
            .collect();
        let outcomes = self.freeze_all(targets).await;
        if outcomes.iter().any(|o| !matches!(o, FreezeOutcome::Frozen)) {
            // Thaw everything this set froze, all at once, before answering.
            let frozen: Vec<usize> = outcomes
                .iter()
                .enumerate()
                .filter(|(_, o)| matches!(o, FreezeOutcome::Frozen))
                .map(|(i, _)| i)
                .collect();
            let thawed = self
                .thaw_all(
                    frozen
                        .iter()
                        .map(|&i| guard.volumes[i].fd.clone())
                        .collect(),
                )
                .await;
            for (&i, result) in frozen.iter().zip(thawed) {
                if let Err(e) = result {
                    error!(set_id, mount = %guard.volumes[i].mount_point.display(), error = %e, "thaw after failed freeze");
                }
            }
            guard.phase = Phase::Ended(ThawReport::unknown());
            let mut hooks = guard.hooks.take();
            let mut first_error = None;
            let mut stuck = Vec::new();
            for (i, outcome) in outcomes.into_iter().enumerate() {
                match outcome {
                    FreezeOutcome::Frozen => {}
                    FreezeOutcome::Failed(err) => {
                        first_error.get_or_insert(err);
                    }
                    FreezeOutcome::TimedOut(err, pending) => {
                        first_error.get_or_insert(err);
                        stuck.push((guard.volumes[i].fd.clone(), pending));
                    }
                }
            }
            let err = first_error.expect("a failed outcome was seen");
            if stuck.is_empty() {
                if let Some(hooks) = hooks.as_mut() {
                    hooks.resume(false).await;
                }
                self.forget(set_id, &guard);
            } else {
                // Ioctls still running: keep their filesystems reserved until each returns,
                // thaw each that froze, then let the set go.
                self.inner.lock().unwrap().sets.remove(set_id);
                let manager = self.clone();
                tokio::spawn(async move {
                    for (fd, pending) in stuck {
                        if let Ok(Ok(())) = pending.await {
                            let freezer = manager.freezer.clone();
                            let thawed =
                                tokio::task::spawn_blocking(move || freezer.thaw(fd.as_fd())).await;
                            warn!(set_id = %guard.set_id, ?thawed, "late FIFREEZE returned; thawed");
                        }
                    }
                    if let Some(hooks) = hooks.as_mut() {
                        hooks.resume(false).await;
                    }
                    manager.forget(&guard.set_id.clone(), &guard);
                });
            }
            return Err(err);
        }
        let frozen = Instant::now();
        guard.frozen_at_ms = unix_ms();
        guard.hard_deadline = freeze_started + self.config.max_freeze;
        guard.lease_deadline = (frozen + lease).min(guard.hard_deadline);
        guard.phase = Phase::Frozen;
        // From here on the lease thread holds the deadlines: it thaws at the first of them
        // whatever this runtime is doing.
        let expired = self.timer.arm(
            set_id,
            guard.volumes.iter().map(|v| v.fd.clone()).collect(),
            guard.lease_deadline,
            guard.hard_deadline,
        );
        crate::metrics::METRICS.frozen(frozen.duration_since(freeze_started));
        let info = guard.info();
        drop(guard);
        info!(
            set_id,
            volumes = mounts.len(),
            lease_ms = lease.as_millis() as u64,
            "frozen"
        );
        self.watch_expiry(session, expired);
        Ok(info)
    }

    /// Answers a repeated freeze of a set: the same volumes, still frozen, is a retry.
    async fn existing_freeze(
        &self,
        set_id: &str,
        volumes: &[Volume],
        existing: Arc<AsyncMutex<Session>>,
    ) -> Result<FreezeInfo, Error> {
        let session = existing.lock().await;
        let same = session.volumes.len() == volumes.len()
            && volumes
                .iter()
                .all(|v| session.volumes.iter().any(|h| h.dev == v.dev()));
        match session.phase {
            Phase::Frozen if same && self.timer.is_armed(set_id) => Ok(session.info()),
            _ => Err(Error::SetConflict {
                set_id: set_id.to_owned(),
            }),
        }
    }

    /// Makes the session visible and reserves its filesystems; `Some(existing)` when the set id
    /// is already known.
    fn register(
        &self,
        set_id: &str,
        session: &Session,
        handle: &Arc<AsyncMutex<Session>>,
    ) -> Result<Option<Arc<AsyncMutex<Session>>>, Error> {
        let mut inner = self.inner.lock().unwrap();
        if inner.shutting_down {
            return Err(Error::ShuttingDown);
        }
        if let Some(existing) = inner.sets.get(set_id) {
            return Ok(Some(existing.clone()));
        }
        if inner.ended.iter().any(|(id, _)| id == set_id) {
            return Err(Error::SetConflict {
                set_id: set_id.to_owned(),
            });
        }
        for volume in &session.volumes {
            if let Some(holder) = inner.holders.get(&volume.dev) {
                return Err(Error::Busy {
                    mount: volume.mount_point.clone(),
                    holder: holder.clone(),
                });
            }
        }
        for volume in &session.volumes {
            inner.holders.insert(volume.dev, set_id.to_owned());
        }
        inner.sets.insert(set_id.to_owned(), handle.clone());
        Ok(None)
    }

    /// Releases everything the set reserved: its filesystems, record and watchdog hold.
    fn forget(&self, set_id: &str, session: &Session) {
        // Release the guardian's copy first: once the filesystems are free, another set may
        // freeze them, and the guardian must never thaw that one on this set's account.
        self.watchdog.release(set_id);
        {
            let mut inner = self.inner.lock().unwrap();
            for volume in &session.volumes {
                if inner.holders.get(&volume.dev).map(String::as_str) == Some(set_id) {
                    inner.holders.remove(&volume.dev);
                }
            }
            inner.sets.remove(set_id);
            if let Phase::Ended(report) = &session.phase
                && report.end != FreezeEnd::UnknownSet
            {
                inner.ended.push_back((set_id.to_owned(), report.clone()));
                while inner.ended.len() > REMEMBERED_ENDINGS {
                    inner.ended.pop_front();
                }
            }
        }
        if let Err(e) = self.records.remove(set_id) {
            error!(set_id, error = %e, "cannot remove freeze record");
        }
    }

    /// FIFREEZE of every volume at once, each on its own blocking thread and each under its
    /// own `freeze-timeout` (counted from its own start). A timed-out ioctl is handed back
    /// still running, so the caller can thaw it when it returns.
    async fn freeze_all(&self, volumes: Vec<(PathBuf, Arc<OwnedFd>)>) -> Vec<FreezeOutcome> {
        let timeout = self.config.freeze_timeout;
        let started: Vec<_> = volumes
            .iter()
            .map(|(_, fd)| {
                let freezer = self.freezer.clone();
                let fd = fd.clone();
                let deadline = tokio::time::Instant::now() + timeout;
                let pending = tokio::task::spawn_blocking(move || freezer.freeze(fd.as_fd()));
                (deadline, pending)
            })
            .collect();
        let mut outcomes = Vec::with_capacity(volumes.len());
        for ((mount, _), (deadline, mut pending)) in volumes.into_iter().zip(started) {
            outcomes.push(
                match tokio::time::timeout_at(deadline, &mut pending).await {
                    Ok(Ok(Ok(()))) => FreezeOutcome::Frozen,
                    Ok(Ok(Err(e))) if e.raw_os_error() == Some(libc::EBUSY) => {
                        FreezeOutcome::Failed(Error::FrozenByOther { mount })
                    }
                    Ok(Ok(Err(source))) => FreezeOutcome::Failed(Error::Freeze { mount, source }),
                    Ok(Err(join)) => FreezeOutcome::Failed(Error::Freeze {
                        mount,
                        source: io::Error::other(join),
                    }),
                    Err(_elapsed) => {
                        FreezeOutcome::TimedOut(Error::FreezeTimedOut { mount, timeout }, pending)
                    }
                },
            );
        }
        outcomes
    }

    /// FITHAW of every given volume at once, each on its own blocking thread; the results in
    /// the order given.
    async fn thaw_all(&self, fds: Vec<Arc<OwnedFd>>) -> Vec<io::Result<()>> {
        let pending: Vec<_> = fds
            .into_iter()
            .map(|fd| {
                let freezer = self.freezer.clone();
                tokio::task::spawn_blocking(move || freezer.thaw(fd.as_fd()))
            })
            .collect();
        let mut results = Vec::with_capacity(pending.len());
        for handle in pending {
            results.push(
                handle
                    .await
                    .unwrap_or_else(|join| Err(io::Error::other(join))),
            );
        }
        results
    }

    /// Ends a frozen session: takes it back from the lease thread and thaws every volume at
    /// once — or, if the lease thread got there first, reports the expiry it thawed
    /// at. Then resumes the hooks and releases the set.
    async fn end(&self, session: &mut Session, asked: FreezeEnd) -> ThawReport {
        let thaw_started = Instant::now();
        let (end, external, failed, thawed_at, thawed_at_ms) = match self
            .timer
            .disarm(&session.set_id)
        {
            Disarmed::Fired(expiry) => {
                let end = match expiry.why {
                    Expired::Lease => FreezeEnd::LeaseExpired,
                    Expired::MaxFreeze => FreezeEnd::MaxFreeze,
                };
                let at = expiry.thawed_at;
                (end, expiry.external, expiry.failed, at, expiry.thawed_at_ms)
            }
            Disarmed::Armed | Disarmed::Unknown => {
                let (mut external, mut failed) = (false, false);
                let results = self
                    .thaw_all(session.volumes.iter().map(|v| v.fd.clone()).collect())
                    .await;
                for (volume, result) in session.volumes.iter().zip(results) {
                    match result {
                        Ok(()) => {}
                        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => external = true,
                        Err(e) => {
                            failed = true;
                            error!(set_id = %session.set_id, mount = %volume.mount_point.display(), error = %e, "FITHAW failed");
                        }
                    }
                }
                (asked, external, failed, Instant::now(), unix_ms())
            }
        };
        let mut thawed_at_ms = thawed_at_ms;
        let mut write_stall_ms = thawed_at
            .saturating_duration_since(session.freeze_started)
            .as_millis() as u64;
        // The guardian thawed first (this agent hung past max-freeze): its FITHAW ended the
        // stall, not this late look at it.
        let guardian = crate::thaw_marks::take(self.records.dir(), &session.set_id);
        let mut thawed_at = Some(thawed_at);
        if let Some(at_ms) = guardian {
            thawed_at_ms = at_ms;
            thawed_at = None;
            write_stall_ms = at_ms.saturating_sub(session.freeze_started_at_ms);
        }
        // After the last FITHAW: resume every quiesced hook, in reverse order. Timed on its
        // own: the writers are already running again.
        let resume_started = Instant::now();
        let hooks = match session.hooks.as_mut() {
            Some(hooks) => hooks.resume(true).await,
            None => Vec::new(),
        };
        let resume_ms = if hooks.is_empty() {
            0
        } else {
            resume_started.elapsed().as_millis() as u64
        };
        session.hooks = None;
        let end = if guardian.is_some() {
            FreezeEnd::Guardian
        } else if external && end == FreezeEnd::Thawed {
            FreezeEnd::ExternalThaw
        } else {
            end
        };
        let report = ThawReport {
            held_continuously: end == FreezeEnd::Thawed && !failed,
            end,
            freeze_started_at_ms: session.freeze_started_at_ms,
            frozen_at_ms: session.frozen_at_ms,
            thawed_at_ms,
            write_stall_ms,
            hooks,
            resume_ms,
            thawed_at,
        };
        session.phase = Phase::Ended(report.clone());
        crate::metrics::METRICS.freeze_ended(
            end.as_str(),
            thaw_started.elapsed(),
            report.write_stall_ms,
        );
        self.forget(&session.set_id.clone(), session);
        // Close the mount descriptors now: an ended set must not keep its filesystems busy.
        session.volumes.clear();
        match end {
            FreezeEnd::Thawed => {
                info!(set_id = %session.set_id, stall_ms = report.write_stall_ms, "thawed")
            }
            _ => {
                warn!(set_id = %session.set_id, end = end.as_str(), stall_ms = report.write_stall_ms, "freeze ended early")
            }
        }
        report
    }

    /// Once the lease thread has thawed a set (its receiver fires), finish it here: resume
    /// hooks, release the set. A set disarmed first drops the sender and this task ends.
    fn watch_expiry(
        self: &Arc<Self>,
        session: Arc<AsyncMutex<Session>>,
        expired: tokio::sync::oneshot::Receiver<()>,
    ) {
        let manager = self.clone();
        tokio::spawn(async move {
            if expired.await.is_err() {
                return;
            }
            let mut s = session.lock().await;
            if matches!(s.phase, Phase::Frozen) {
                // `end` finds the expiry the lease thread recorded.
                manager.end(&mut s, FreezeEnd::LeaseExpired).await;
            }
        });
    }

    fn session(&self, set_id: &str) -> Option<Arc<AsyncMutex<Session>>> {
        self.inner.lock().unwrap().sets.get(set_id).cloned()
    }

    fn ended_report(&self, set_id: &str) -> Option<ThawReport> {
        let inner = self.inner.lock().unwrap();
        inner
            .ended
            .iter()
            .rev()
            .find(|(id, _)| id == set_id)
            .map(|(_, report)| report.clone())
    }

    /// How a set that is no longer held ended, for messages.
    fn ended_state(&self, set_id: &str) -> String {
        match self.ended_report(set_id) {
            Some(report) => format!(
                "freeze ended: {}, {}",
                report.end.as_str(),
                report.end.describe()
            ),
            None => "unknown set".into(),
        }
    }

    /// The prepared hook sessions of a set, checked against the names the freeze asks for.
    async fn take_prepared_hooks(
        &self,
        set_id: &str,
        hooks: &[String],
    ) -> Result<Option<HookSet>, HookError> {
        let prepared = self.prepared.take(set_id);
        let prepared_names = prepared.as_ref().map(HookSet::names).unwrap_or_default();
        if prepared_names != hooks {
            if let Some(mut set) = prepared {
                set.release().await;
            }
            return Err(HookError::NotPrepared {
                set_id: set_id.to_owned(),
                wanted: hooks.join(", "),
                prepared: prepared_names.join(", "),
            });
        }
        Ok(prepared.filter(|set| !set.is_empty()))
    }

    /// A frozen session, or why not. A set the lease thread has thawed (but the async side
    /// has not finished yet) is finished here and refused.
    async fn frozen_session(
        &self,
        set_id: &str,
    ) -> Result<tokio::sync::OwnedMutexGuard<Session>, Error> {
        let not_frozen = |state: String| Error::NotFrozen {
            set_id: set_id.to_owned(),
            state,
        };
        let Some(session) = self.session(set_id) else {
            return Err(not_frozen(self.ended_state(set_id)));
        };
        let mut s = session.lock_owned().await;
        if !matches!(s.phase, Phase::Frozen) {
            return Err(not_frozen(s.state_name()));
        }
        if !self.timer.is_armed(set_id) {
            self.end(&mut s, FreezeEnd::LeaseExpired).await;
            return Err(not_frozen(s.state_name()));
        }
        Ok(s)
    }

    /// Pushes the lease out by `lease` from now, never past the hard deadline.
    pub async fn renew(&self, set_id: &str, lease: Option<Duration>) -> Result<FreezeInfo, Error> {
        validate_set_id(set_id)?;
        let mut s = self.frozen_session(set_id).await?;
        let lease = lease
            .filter(|lease| !lease.is_zero())
            .unwrap_or(self.config.default_lease);
        let deadline = (Instant::now() + lease).min(s.hard_deadline);
        if self.timer.renew(set_id, deadline).is_err() {
            // The lease thread thawed it a moment ago.
            self.end(&mut s, FreezeEnd::LeaseExpired).await;
            return Err(Error::NotFrozen {
                set_id: set_id.to_owned(),
                state: s.state_name(),
            });
        }
        s.lease_deadline = deadline;
        Ok(s.info())
    }

    /// Thaws a set. Idempotent: a set already ended (or never seen) reports how it ended.
    pub async fn thaw(&self, set_id: &str) -> ThawReport {
        // A set prepared but never frozen here: close its hook sessions.
        if let Some(mut prepared) = self.prepared.take(set_id) {
            prepared.release().await;
        }
        if let Some(session) = self.session(set_id) {
            let mut s = session.lock().await;
            return match &s.phase {
                Phase::Frozen => self.end(&mut s, FreezeEnd::Thawed).await,
                Phase::Ended(report) => report.clone(),
                Phase::Freezing => unreachable!("a freezing session is locked until it ends"),
            };
        }
        if let Some(report) = self.ended_report(set_id) {
            return report;
        }
        // Unknown here, e.g. to an agent restarted after it died frozen: its guardian may have
        // recorded when it thawed the set.
        match crate::thaw_marks::take(self.records.dir(), set_id) {
            Some(thawed_at_ms) => ThawReport {
                end: FreezeEnd::Guardian,
                thawed_at_ms,
                ..ThawReport::unknown()
            },
            None => ThawReport::unknown(),
        }
    }

    /// The mount points (and loop backing files) a frozen set holds, checking `mounts` is a
    /// subset of the paths its freeze named.
    pub async fn frozen_volumes(
        &self,
        set_id: &str,
        mounts: &[PathBuf],
    ) -> Result<Vec<(PathBuf, DevId, Option<PathBuf>)>, Error> {
        validate_set_id(set_id)?;
        check_paths(
            "mount points in one request",
            mounts,
            self.config.max_volumes_per_request,
        )?;
        let s = self.frozen_session(set_id).await?;
        if mounts.is_empty() {
            return Ok(s
                .volumes
                .iter()
                .map(|v| (v.mount_point.clone(), v.dev, v.backing_file.clone()))
                .collect());
        }
        mounts
            .iter()
            .map(|mount| {
                let held = s
                    .volumes
                    .iter()
                    .find(|v| v.aliases.contains(mount))
                    .ok_or_else(|| {
                        Error::InvalidArgument(format!(
                            "{} is not frozen by set {set_id}",
                            crate::error::capped_path(mount).display()
                        ))
                    })?;
                Ok((mount.clone(), held.dev, held.backing_file.clone()))
            })
            .collect()
    }

    /// Whether the set still holds its freeze (checked after a snapshot returns): frozen, and
    /// its deadline has not passed on the lease thread.
    pub async fn is_frozen(&self, set_id: &str) -> bool {
        match self.session(set_id) {
            Some(session) => {
                matches!(session.lock().await.phase, Phase::Frozen) && self.timer.is_armed(set_id)
            }
            None => false,
        }
    }

    /// Filesystems frozen by any set of this agent.
    pub fn frozen_devs(&self) -> Vec<DevId> {
        self.inner.lock().unwrap().holders.keys().copied().collect()
    }

    pub fn holder_of(&self, dev: DevId) -> Option<String> {
        self.inner.lock().unwrap().holders.get(&dev).cloned()
    }

    pub async fn held(&self) -> Vec<HeldFreeze> {
        let sessions: Vec<_> = self.inner.lock().unwrap().sets.values().cloned().collect();
        let mut held = Vec::new();
        for session in sessions {
            let s = session.lock().await;
            if matches!(s.phase, Phase::Frozen) && self.timer.is_armed(&s.set_id) {
                let info = s.info();
                held.push(HeldFreeze {
                    set_id: s.set_id.clone(),
                    mount_points: s.volumes.iter().map(|v| v.mount_point.clone()).collect(),
                    frozen_at_ms: info.frozen_at_ms,
                    lease_deadline_ms: info.lease_deadline_ms,
                    hard_deadline_ms: info.hard_deadline_ms,
                });
            }
        }
        held.sort_by(|a, b| a.set_id.cmp(&b.set_id));
        held
    }

    /// Refuses new freezes and thaws every set (SIGTERM/SIGINT path).
    pub async fn shutdown(&self) -> usize {
        let sessions: Vec<_> = {
            let mut inner = self.inner.lock().unwrap();
            inner.shutting_down = true;
            inner.sets.values().cloned().collect()
        };
        let mut thawed = 0;
        for session in sessions {
            let mut s = session.lock().await;
            if matches!(s.phase, Phase::Frozen) {
                self.end(&mut s, FreezeEnd::Shutdown).await;
                thawed += 1;
            }
        }
        thawed
    }
}

/// Set ids name record files and snapshot directories: keep them to a safe alphabet.
pub fn validate_set_id(set_id: &str) -> Result<(), Error> {
    let ok = !set_id.is_empty()
        && set_id.len() <= 128
        && !set_id.starts_with('.')
        && set_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "set id {:?} must be 1-128 characters of [A-Za-z0-9._-], not starting with '.'",
            crate::error::capped(set_id)
        )))
    }
}

/// Hook names in a request: at most [`MAX_HOOKS_PER_REQUEST`], each a valid hook name.
pub fn validate_hook_names(hooks: &[String]) -> Result<(), Error> {
    if hooks.len() > MAX_HOOKS_PER_REQUEST {
        return Err(Error::OverLimit {
            what: "hooks in one request",
            got: hooks.len(),
            max: MAX_HOOKS_PER_REQUEST,
            limit: "hooks per request",
        });
    }
    if let Some(bad) = hooks.iter().find(|h| !crate::hooks::valid_hook_name(h)) {
        return Err(Error::InvalidArgument(format!(
            "hook name {:?} must be 1-64 characters of [A-Za-z0-9_-]",
            crate::error::capped(bad)
        )));
    }
    Ok(())
}

/// Paths in a request (snapshot ids, target directories): at most `max`, each at most
/// PATH_MAX bytes.
pub fn check_paths(what: &'static str, paths: &[PathBuf], max: usize) -> Result<(), Error> {
    if paths.len() > max {
        return Err(Error::OverLimit {
            what,
            got: paths.len(),
            max,
            limit: "max-volumes-per-request",
        });
    }
    check_path_lengths(paths.iter().map(|p| p.as_os_str().len()))
}

/// Every length at most PATH_MAX.
pub fn check_path_lengths(lengths: impl IntoIterator<Item = usize>) -> Result<(), Error> {
    match lengths
        .into_iter()
        .find(|len| *len > crate::safepath::MAX_PATH_BYTES)
    {
        Some(got) => Err(Error::OverLimit {
            what: "bytes in a path",
            got,
            max: crate::safepath::MAX_PATH_BYTES,
            limit: "PATH_MAX",
        }),
        None => Ok(()),
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The wall-clock time of a monotonic instant (for reports), given one reading of both
/// clocks: `now` (monotonic) taken at wall-clock `wall` ms.
fn unix_ms_at(instant: Instant, now: Instant, wall: u64) -> u64 {
    if instant >= now {
        wall + (instant - now).as_millis() as u64
    } else {
        wall.saturating_sub((now - instant).as_millis() as u64)
    }
}

/// Mount paths as the request named them, for messages.
pub fn display_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::VolumeConfig;
    use crate::freezer::{Call, FakeFreezer};
    use crate::mounts::{MountEntry, MountError};
    use crate::watchdog::NoWatchdog;

    #[test]
    fn every_freeze_end_has_a_metric_series_from_start_up() {
        let all = [
            FreezeEnd::Thawed,
            FreezeEnd::LeaseExpired,
            FreezeEnd::MaxFreeze,
            FreezeEnd::Shutdown,
            FreezeEnd::ExternalThaw,
            FreezeEnd::UnknownSet,
            FreezeEnd::Guardian,
        ];
        // Exhaustive: a new variant fails to compile here until it is listed above.
        for end in all {
            match end {
                FreezeEnd::Thawed
                | FreezeEnd::LeaseExpired
                | FreezeEnd::MaxFreeze
                | FreezeEnd::Shutdown
                | FreezeEnd::ExternalThaw
                | FreezeEnd::UnknownSet
                | FreezeEnd::Guardian => {}
            }
        }
        let names: Vec<&str> = all.iter().map(|e| e.as_str()).collect();
        assert_eq!(names, crate::metrics::FREEZE_ENDS);
    }

    /// Mount points are real temp dirs (the fake freezer opens them); each is its own
    /// filesystem unless listed as an alias.
    struct Table(Vec<(PathBuf, DevId)>);

    impl MountTable for Table {
        fn entries(&self) -> Result<Vec<MountEntry>, MountError> {
            Ok(self
                .0
                .iter()
                .enumerate()
                .map(|(i, (path, dev))| MountEntry {
                    mount_id: i as u64,
                    dev: *dev,
                    root: "/".into(),
                    mount_point: path.clone(),
                    fs_type: "ext4".into(),
                    source: format!("/dev/loop{}", dev.minor),
                })
                .collect())
        }
        fn loop_backing_file(&self, _dev: DevId) -> Option<PathBuf> {
            None
        }
        fn open_mount(
            &self,
            path: &std::path::Path,
        ) -> Result<crate::mounts::OpenedMount, crate::safepath::PathError> {
            crate::volumes::tests::fake_open(&self.entries().unwrap(), &[], path)
        }
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        mounts: Vec<PathBuf>,
        freezer: FakeFreezer,
        manager: Arc<FreezeManager>,
    }

    fn fixture(count: u32, tweak: impl FnOnce(&mut Config)) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let mut table = Vec::new();
        let mut mounts = Vec::new();
        for i in 0..count {
            let mount = dir.path().join(format!("vol{i}"));
            std::fs::create_dir_all(&mount).unwrap();
            table.push((mount.clone(), DevId { major: 7, minor: i }));
            mounts.push(mount);
        }
        let mut config = Config::parse(&format!(
            "listen = \"127.0.0.1:1\"\nstate-dir = \"{}\"\n",
            state.display()
        ))
        .unwrap();
        config.volumes = mounts
            .iter()
            .map(|m| VolumeConfig {
                mount: m.clone(),
                ebs_volume_id: None,
            })
            .collect();
        tweak(&mut config);
        let freezer = FakeFreezer::new();
        let manager = FreezeManager::new(
            Arc::new(config),
            Arc::new(freezer.clone()),
            Arc::new(Table(table)),
            AgentFiles::default(),
            Arc::new(NoWatchdog),
        );
        RecordStore::new(&state).create_dir().unwrap();
        Fixture {
            _dir: dir,
            mounts,
            freezer,
            manager,
        }
    }

    fn freezes_and_thaws(calls: Vec<Call>) -> Vec<Call> {
        calls
            .into_iter()
            .filter(|c| !matches!(c, Call::Sync(_) | Call::Checkpoint(_)))
            .collect()
    }

    /// The calls as (sorted freezes, sorted thaws), each step in order: volumes of one step
    /// run at once, so their order within it is the scheduler's.
    fn steps(calls: Vec<Call>) -> Vec<Vec<Call>> {
        let mut steps: Vec<Vec<Call>> = Vec::new();
        for call in freezes_and_thaws(calls) {
            let same = steps.last().is_some_and(|last| {
                std::mem::discriminant(&last[0]) == std::mem::discriminant(&call)
            });
            if same {
                steps.last_mut().unwrap().push(call);
            } else {
                steps.push(vec![call]);
            }
        }
        for step in &mut steps {
            step.sort_by_key(|c| format!("{c:?}"));
        }
        steps
    }

    #[tokio::test]
    async fn freeze_then_thaw_holds_and_thaws_every_volume() {
        let f = fixture(2, |_| {});
        f.manager.freeze("s1", &f.mounts, None).await.unwrap();
        assert!(f.mounts.iter().all(|m| f.freezer.is_frozen(m)));
        assert_eq!(f.manager.held().await.len(), 1);
        let report = f.manager.thaw("s1").await;
        assert!(report.held_continuously);
        assert_eq!(report.end, FreezeEnd::Thawed);
        let (a, b) = (f.mounts[0].clone(), f.mounts[1].clone());
        assert_eq!(
            steps(f.freezer.calls()),
            vec![
                vec![Call::Freeze(a.clone()), Call::Freeze(b.clone())],
                vec![Call::Thaw(a), Call::Thaw(b)]
            ]
        );
        assert!(f.manager.held().await.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hosts_volumes_are_frozen_at_once_each_on_its_own_thread() {
        let f = fixture(4, |_| {});
        // Each FIFREEZE waits until all four have started: one after another, the first would
        // wait in vain and fail.
        f.freezer.rendezvous(4, Duration::from_secs(5));
        f.manager.freeze("s1", &f.mounts, None).await.unwrap();
        assert!(f.mounts.iter().all(|m| f.freezer.is_frozen(m)));
        f.manager.thaw("s1").await;
        assert!(f.mounts.iter().all(|m| !f.freezer.is_frozen(m)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_failed_fifreeze_thaws_every_volume_that_froze_at_the_same_time() {
        let f = fixture(3, |_| {});
        f.freezer.rendezvous(3, Duration::from_secs(5));
        f.freezer.fail_freeze(&f.mounts[1], libc::EIO);
        let err = f.manager.freeze("s1", &f.mounts, None).await.unwrap_err();
        assert!(
            err.to_string().contains(&f.mounts[1].display().to_string()),
            "{err}"
        );
        assert!(f.mounts.iter().all(|m| !f.freezer.is_frozen(m)));
        let steps = steps(f.freezer.calls());
        assert_eq!(steps.len(), 2, "{steps:?}");
        assert_eq!(steps[0].len(), 3, "every FIFREEZE started: {steps:?}");
        assert_eq!(
            steps[1],
            vec![
                Call::Thaw(f.mounts[0].clone()),
                Call::Thaw(f.mounts[2].clone())
            ],
            "exactly the volumes that froze are thawed"
        );
        // The set left nothing reserved.
        f.manager.freeze("s2", &f.mounts[..1], None).await.unwrap();
        f.manager.thaw("s2").await;
    }

    #[tokio::test]
    async fn partial_failure_thaws_what_was_frozen() {
        let f = fixture(3, |_| {});
        f.freezer.fail_freeze(&f.mounts[2], libc::EIO);
        let err = f.manager.freeze("s1", &f.mounts, None).await.unwrap_err();
        assert!(err.to_string().contains("FIFREEZE on"), "{err}");
        assert!(f.mounts.iter().all(|m| !f.freezer.is_frozen(m)));
        let steps = steps(f.freezer.calls());
        assert_eq!(
            steps[1],
            [
                Call::Thaw(f.mounts[0].clone()),
                Call::Thaw(f.mounts[1].clone())
            ]
        );
        // The set left nothing reserved: a new set can freeze the same volumes.
        f.manager.freeze("s2", &f.mounts[..2], None).await.unwrap();
        f.manager.thaw("s2").await;
    }

    #[tokio::test]
    async fn a_foreign_freeze_is_refused_and_never_thawed() {
        let f = fixture(2, |_| {});
        f.freezer.set_frozen(&f.mounts[1], true);
        let err = f.manager.freeze("s1", &f.mounts, None).await.unwrap_err();
        assert!(matches!(err, Error::FrozenByOther { .. }), "{err}");
        assert!(!f.freezer.is_frozen(&f.mounts[0]));
        assert!(
            f.freezer.is_frozen(&f.mounts[1]),
            "someone else's freeze stays"
        );
    }

    #[tokio::test]
    async fn an_overlapping_set_is_busy_and_names_the_holder() {
        let f = fixture(2, |_| {});
        f.manager
            .freeze("holder", &f.mounts[..1], None)
            .await
            .unwrap();
        let err = f
            .manager
            .freeze("second", &f.mounts, None)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("set holder holds it frozen"),
            "{err}"
        );
        // A retry of the same freeze is answered, not refused.
        f.manager
            .freeze("holder", &f.mounts[..1], None)
            .await
            .unwrap();
        f.manager.thaw("holder").await;
    }

    #[tokio::test]
    async fn thaw_is_idempotent_and_harmless_for_unknown_sets() {
        let f = fixture(1, |_| {});
        let unknown = f.manager.thaw("never").await;
        assert_eq!(unknown.end, FreezeEnd::UnknownSet);
        assert!(!unknown.held_continuously);
        f.manager.freeze("s1", &f.mounts, None).await.unwrap();
        let first = f.manager.thaw("s1").await;
        let second = f.manager.thaw("s1").await;
        assert_eq!(first, second);
        let thaws = f
            .freezer
            .calls()
            .into_iter()
            .filter(|c| matches!(c, Call::Thaw(_)))
            .count();
        assert_eq!(thaws, 1);
    }

    #[tokio::test]
    async fn lease_expiry_thaws_and_the_thaw_reply_says_so() {
        let f = fixture(1, |_| {});
        f.manager
            .freeze("s1", &f.mounts, Some(Duration::from_millis(150)))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(!f.freezer.is_frozen(&f.mounts[0]), "lease thawed it");
        let report = f.manager.thaw("s1").await;
        assert!(!report.held_continuously);
        assert_eq!(report.end, FreezeEnd::LeaseExpired);
        let err = f.manager.renew("s1", None).await.unwrap_err();
        assert!(err.to_string().contains("lease-expired"), "{err}");
        assert!(err.to_string().contains("thawed by its lease"), "{err}");
    }

    #[tokio::test]
    async fn a_set_the_guardian_thawed_reports_the_guardian_and_its_thaw_instant() {
        let f = fixture(1, |_| {});
        let info = f
            .manager
            .freeze("s1", &f.mounts, Some(Duration::from_secs(30)))
            .await
            .unwrap();
        // The agent hung: its guardian thawed the filesystem and recorded when.
        f.freezer.set_frozen(&f.mounts[0], false);
        let records = RecordStore::new(&f._dir.path().join("state"));
        let guardian_at = info.freeze_started_at_ms + 123;
        crate::thaw_marks::write(records.dir(), "s1", guardian_at).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let report = f.manager.thaw("s1").await;
        assert_eq!(report.end, FreezeEnd::Guardian, "{report:?}");
        assert!(!report.held_continuously);
        assert_eq!(report.thawed_at_ms, guardian_at);
        assert_eq!(
            report.write_stall_ms, 123,
            "the stall ends at the guardian's FITHAW, not when the agent looked (≥300 ms)"
        );
        let err = f.manager.renew("s1", None).await.unwrap_err();
        assert!(err.to_string().contains("guardian"), "{err}");
    }

    #[tokio::test]
    async fn an_unknown_set_the_guardian_thawed_says_so() {
        let f = fixture(1, |_| {});
        let records = RecordStore::new(&f._dir.path().join("state"));
        crate::thaw_marks::write(records.dir(), "gone", 4242).unwrap();
        let report = f.manager.thaw("gone").await;
        assert_eq!(report.end, FreezeEnd::Guardian);
        assert_eq!(report.thawed_at_ms, 4242);
        assert_eq!(f.manager.thaw("other").await.end, FreezeEnd::UnknownSet);
    }

    #[tokio::test]
    async fn renewals_never_outlive_max_freeze() {
        let f = fixture(1, |config| {
            config.max_freeze = Duration::from_millis(500);
        });
        f.manager
            .freeze("s1", &f.mounts, Some(Duration::from_millis(200)))
            .await
            .unwrap();
        let started = std::time::Instant::now();
        while f
            .manager
            .renew("s1", Some(Duration::from_secs(60)))
            .await
            .is_ok()
        {
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "cap not enforced"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let report = f.manager.thaw("s1").await;
        assert_eq!(report.end, FreezeEnd::MaxFreeze);
        assert!(!f.freezer.is_frozen(&f.mounts[0]));
        assert!(started.elapsed() < Duration::from_millis(900));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_stalled_runtime_does_not_delay_the_lease() {
        let f = fixture(1, |_| {});
        f.manager
            .freeze("s1", &f.mounts, Some(Duration::from_millis(100)))
            .await
            .unwrap();
        // Block the only runtime thread well past the lease, as a flood of request work would.
        std::thread::sleep(Duration::from_millis(400));
        assert!(
            !f.freezer.is_frozen(&f.mounts[0]),
            "the lease thread thawed while the runtime was stalled"
        );
        let report = f.manager.thaw("s1").await;
        assert_eq!(report.end, FreezeEnd::LeaseExpired);
        assert!(!report.held_continuously);
        assert!(
            report.write_stall_ms < 350,
            "stall measured to the lease thread's FITHAW: {}",
            report.write_stall_ms
        );
        let thaws = f
            .freezer
            .calls()
            .into_iter()
            .filter(|c| matches!(c, Call::Thaw(_)))
            .count();
        assert_eq!(thaws, 1, "thawed once, by the lease thread");
    }

    #[tokio::test]
    async fn a_renewal_or_snapshot_check_after_expiry_is_refused() {
        let f = fixture(1, |_| {});
        f.manager
            .freeze("s1", &f.mounts, Some(Duration::from_millis(50)))
            .await
            .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(!f.manager.is_frozen("s1").await);
        let err = f.manager.frozen_volumes("s1", &[]).await.unwrap_err();
        assert!(err.to_string().contains("lease-expired"), "{err}");
        assert!(f.manager.held().await.is_empty());
    }

    #[tokio::test]
    async fn prepare_refuses_a_volume_another_set_holds_frozen() {
        let f = fixture(2, |_| {});
        f.manager.freeze("s1", &f.mounts[..1], None).await.unwrap();
        let err = f.manager.prepare("s2", &f.mounts).await.unwrap_err();
        assert!(matches!(err, Error::Busy { .. }), "{err}");
        assert!(
            !f.freezer.calls().iter().any(|c| matches!(c, Call::Sync(_))),
            "no syncfs on a frozen filesystem"
        );
        f.manager.thaw("s1").await;
    }

    #[tokio::test]
    async fn oversized_requests_are_refused_before_any_work() {
        let f = fixture(1, |config| config.max_volumes_per_request = 3);
        let many = vec![f.mounts[0].clone(); 4];
        let err = f.manager.freeze("s1", &many, None).await.unwrap_err();
        assert!(err.to_string().contains("max-volumes-per-request"), "{err}");
        let hooks: Vec<String> = (0..40).map(|i| format!("h{i}")).collect();
        let err = f
            .manager
            .prepare_with_hooks("s1", &f.mounts, &hooks)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("hooks per request"), "{err}");
        let err = f
            .manager
            .renew(&"x".repeat(10_000), None)
            .await
            .unwrap_err();
        assert!(err.to_string().len() < 600, "the echo is capped");
        assert!(f.freezer.calls().is_empty());
    }

    #[tokio::test]
    async fn a_thaw_behind_our_back_is_not_a_held_freeze() {
        let f = fixture(1, |_| {});
        f.manager.freeze("s1", &f.mounts, None).await.unwrap();
        f.freezer.set_frozen(&f.mounts[0], false);
        let report = f.manager.thaw("s1").await;
        assert_eq!(report.end, FreezeEnd::ExternalThaw);
        assert!(!report.held_continuously);
    }

    #[tokio::test]
    async fn a_slow_fifreeze_fails_the_freeze_and_is_thawed_when_it_returns() {
        let f = fixture(1, |config| {
            config.freeze_timeout = Duration::from_millis(100);
        });
        f.freezer
            .delay_freeze(&f.mounts[0], Duration::from_millis(400));
        let err = f.manager.freeze("s1", &f.mounts, None).await.unwrap_err();
        assert!(matches!(err, Error::FreezeTimedOut { .. }), "{err}");
        // Still reserved while the ioctl runs.
        let busy = f.manager.freeze("s2", &f.mounts, None).await.unwrap_err();
        assert!(matches!(busy, Error::Busy { .. }), "{busy}");
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(
            !f.freezer.is_frozen(&f.mounts[0]),
            "thawed once FIFREEZE returned"
        );
        f.freezer.delay_freeze(&f.mounts[0], Duration::ZERO);
        f.manager.freeze("s3", &f.mounts, None).await.unwrap();
        f.manager.thaw("s3").await;
    }

    #[tokio::test]
    async fn a_slow_fifreeze_among_others_thaws_them_at_once_and_it_when_it_returns() {
        let f = fixture(3, |config| {
            config.freeze_timeout = Duration::from_millis(100);
        });
        f.freezer
            .delay_freeze(&f.mounts[1], Duration::from_millis(400));
        let err = f.manager.freeze("s1", &f.mounts, None).await.unwrap_err();
        assert!(matches!(err, Error::FreezeTimedOut { .. }), "{err}");
        // The others froze at once and are thawed before the answer; the slow one still runs.
        assert!(!f.freezer.is_frozen(&f.mounts[0]));
        assert!(!f.freezer.is_frozen(&f.mounts[2]));
        let busy = f
            .manager
            .freeze("s2", &f.mounts[1..2], None)
            .await
            .unwrap_err();
        assert!(matches!(busy, Error::Busy { .. }), "{busy}");
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(
            f.mounts.iter().all(|m| !f.freezer.is_frozen(m)),
            "thawed once FIFREEZE returned"
        );
        f.freezer.delay_freeze(&f.mounts[1], Duration::ZERO);
        f.manager.freeze("s3", &f.mounts, None).await.unwrap();
        f.manager.thaw("s3").await;
    }

    #[tokio::test]
    async fn shutdown_thaws_everything_and_refuses_new_freezes() {
        let f = fixture(2, |_| {});
        f.manager.freeze("a", &f.mounts[..1], None).await.unwrap();
        f.manager.freeze("b", &f.mounts[1..], None).await.unwrap();
        assert_eq!(f.manager.shutdown().await, 2);
        assert!(f.mounts.iter().all(|m| !f.freezer.is_frozen(m)));
        assert_eq!(f.manager.thaw("a").await.end, FreezeEnd::Shutdown);
        let err = f.manager.renew("b", None).await.unwrap_err();
        assert!(
            err.to_string().contains("thawed by the agent's shutdown"),
            "{err}"
        );
        let err = f.manager.freeze("c", &f.mounts, None).await.unwrap_err();
        assert!(matches!(err, Error::ShuttingDown));
    }

    mod with_hooks {
        use super::*;
        use crate::hooks::fake::{FakeHook, Log, Script};
        use crate::hooks::{HookRegistry, Timeouts};

        fn hooked(
            count: u32,
            tweak: impl FnOnce(&mut Config),
            scripts: Vec<(&str, Script)>,
        ) -> (Fixture, Log) {
            let mut f = fixture(count, tweak);
            let log = Log::default();
            let mut registry = HookRegistry::default();
            for (name, mut script) in scripts {
                let freezer = f.freezer.clone();
                let mount = f.mounts[0].clone();
                script.probe = Some(Arc::new(move || {
                    if freezer.is_frozen(&mount) {
                        "(frozen)".into()
                    } else {
                        "(thawed)".into()
                    }
                }));
                registry.insert(
                    name,
                    Arc::new(FakeHook::new(name, &log, script)),
                    Timeouts {
                        prepare: Duration::from_millis(300),
                        quiesce: Duration::from_millis(300),
                        resume: Duration::from_millis(300),
                    },
                );
            }
            f.manager = FreezeManager::with_hooks(
                Arc::new(f.manager.config().clone()),
                Arc::new(f.freezer.clone()),
                Arc::new(Table(
                    f.mounts
                        .iter()
                        .enumerate()
                        .map(|(i, m)| {
                            (
                                m.clone(),
                                DevId {
                                    major: 7,
                                    minor: i as u32,
                                },
                            )
                        })
                        .collect(),
                )),
                AgentFiles::default(),
                Arc::new(NoWatchdog),
                registry,
            );
            (f, log)
        }

        fn names(list: &[&str]) -> Vec<String> {
            list.iter().map(|s| s.to_string()).collect()
        }

        #[tokio::test]
        async fn hooks_quiesce_before_fifreeze_and_resume_in_reverse_after_fithaw() {
            let (f, log) = hooked(
                1,
                |_| {},
                vec![("a", Script::default()), ("b", Script::default())],
            );
            let hooks = names(&["a", "b"]);
            f.manager
                .prepare_with_hooks("s1", &f.mounts, &hooks)
                .await
                .unwrap();
            f.manager
                .freeze_with_hooks("s1", &f.mounts, None, &hooks)
                .await
                .unwrap();
            let report = f.manager.thaw("s1").await;
            assert!(report.held_continuously);
            assert_eq!(
                log.lines(),
                [
                    "a prepare",
                    "b prepare",
                    "a quiesce (thawed)",
                    "b quiesce (thawed)",
                    "b resume froze=true (thawed)",
                    "a resume froze=true (thawed)"
                ]
            );
            let outputs: Vec<_> = report.hooks.iter().map(|o| o.hook.as_str()).collect();
            assert_eq!(outputs, ["a", "b"]);
            assert_eq!(
                report.hooks[0].values.values,
                [("position".to_string(), "42".to_string())]
            );
            // A repeated thaw answers the same, outputs included, and resumes nothing again.
            assert_eq!(f.manager.thaw("s1").await, report);
            assert_eq!(log.lines().len(), 6);
        }

        #[tokio::test]
        async fn a_quiesce_failure_fails_the_freeze_with_nothing_frozen_and_resumes() {
            let (f, log) = hooked(
                2,
                |_| {},
                vec![
                    ("a", Script::default()),
                    (
                        "b",
                        Script {
                            fail_quiesce: Some("lock wait timeout".into()),
                            ..Default::default()
                        },
                    ),
                ],
            );
            let hooks = names(&["a", "b"]);
            f.manager
                .prepare_with_hooks("s1", &f.mounts, &hooks)
                .await
                .unwrap();
            let err = f
                .manager
                .freeze_with_hooks("s1", &f.mounts, None, &hooks)
                .await
                .unwrap_err();
            assert_eq!(err.to_string(), "hook b: quiesce failed: lock wait timeout");
            assert!(
                !f.freezer
                    .calls()
                    .iter()
                    .any(|c| matches!(c, Call::Freeze(_))),
                "no FIFREEZE after a failed quiesce"
            );
            assert_eq!(
                log.lines()[4..],
                [
                    "b resume froze=false (thawed)",
                    "a resume froze=false (thawed)"
                ]
            );
            // Nothing stays reserved.
            f.manager.freeze("s2", &f.mounts, None).await.unwrap();
            f.manager.thaw("s2").await;
        }

        #[tokio::test]
        async fn a_failed_fifreeze_thaws_then_resumes_the_hooks() {
            let (f, log) = hooked(2, |_| {}, vec![("a", Script::default())]);
            f.freezer.fail_freeze(&f.mounts[1], libc::EIO);
            let hooks = names(&["a"]);
            f.manager
                .prepare_with_hooks("s1", &f.mounts, &hooks)
                .await
                .unwrap();
            f.manager
                .freeze_with_hooks("s1", &f.mounts, None, &hooks)
                .await
                .unwrap_err();
            assert_eq!(log.lines()[2], "a resume froze=false (thawed)");
        }

        #[tokio::test]
        async fn lease_expiry_resumes_the_hooks_after_the_thaw() {
            let (f, log) = hooked(1, |_| {}, vec![("a", Script::default())]);
            let hooks = names(&["a"]);
            f.manager
                .prepare_with_hooks("s1", &f.mounts, &hooks)
                .await
                .unwrap();
            f.manager
                .freeze_with_hooks("s1", &f.mounts, Some(Duration::from_millis(100)), &hooks)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(400)).await;
            assert_eq!(
                log.lines()[1..],
                ["a quiesce (thawed)", "a resume froze=true (thawed)"]
            );
            let report = f.manager.thaw("s1").await;
            assert_eq!(report.end, FreezeEnd::LeaseExpired);
            assert_eq!(report.hooks.len(), 1, "the lease's resume outputs are kept");
        }

        #[tokio::test]
        async fn shutdown_resumes_the_hooks_of_every_frozen_set() {
            let (f, log) = hooked(1, |_| {}, vec![("a", Script::default())]);
            let hooks = names(&["a"]);
            f.manager
                .prepare_with_hooks("s1", &f.mounts, &hooks)
                .await
                .unwrap();
            f.manager
                .freeze_with_hooks("s1", &f.mounts, None, &hooks)
                .await
                .unwrap();
            assert_eq!(f.manager.shutdown().await, 1);
            assert_eq!(log.lines().last().unwrap(), "a resume froze=true (thawed)");
        }

        #[tokio::test]
        async fn a_freeze_naming_hooks_that_were_not_prepared_is_refused() {
            let (f, log) = hooked(1, |_| {}, vec![("a", Script::default())]);
            let err = f
                .manager
                .freeze_with_hooks("s1", &f.mounts, None, &names(&["a"]))
                .await
                .unwrap_err();
            assert!(err.to_string().contains("prepared []"), "{err}");
            assert!(log.lines().is_empty());
            assert!(!f.freezer.is_frozen(&f.mounts[0]));
        }

        #[tokio::test]
        async fn prepared_hooks_never_frozen_are_released_after_max_freeze() {
            let (f, log) = hooked(
                1,
                |config| config.max_freeze = Duration::from_millis(200),
                vec![("a", Script::default())],
            );
            f.manager
                .prepare_with_hooks("s1", &f.mounts, &names(&["a"]))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert_eq!(log.lines(), ["a prepare", "a release"]);
        }

        #[tokio::test]
        async fn a_thaw_of_a_set_only_prepared_releases_its_hooks() {
            let (f, log) = hooked(1, |_| {}, vec![("a", Script::default())]);
            f.manager
                .prepare_with_hooks("s1", &f.mounts, &names(&["a"]))
                .await
                .unwrap();
            f.manager.thaw("s1").await;
            assert_eq!(log.lines(), ["a prepare", "a release"]);
        }
    }

    #[test]
    fn set_ids_are_restricted_to_a_safe_alphabet() {
        assert!(validate_set_id("pg-20261125T131200Z-3fa9").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", "a b"] {
            assert!(validate_set_id(bad).is_err(), "{bad:?}");
        }
    }
}
