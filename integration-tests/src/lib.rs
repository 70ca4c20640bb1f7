//! The Quiesce integration-test harness: real loop filesystems, the real binaries over mTLS, a
//! test PKI, and a writer process that measures how long writes stall while a volume is frozen.
//!
//! # Safety rules every helper keeps
//! - Only filesystems a test made are ever frozen: [`LoopFs`] images under `/var/tmp`,
//!   loop-attached and mounted by the test. Every freeze probe first checks that the mount point
//!   really is that loop device ([`LoopFs::is_frozen`]); the in-process agent runs with
//!   [`GuardedFreezer`], which lets the real ioctls through only for the test's own devices.
//! - Every guard that owns a mounted filesystem thaws it (`fsfreeze -u`, errors ignored) before
//!   it unmounts, in `Drop`, so a failing or panicking test never leaves anything frozen.
//! - A write to a frozen filesystem blocks in uninterruptible sleep (SIGKILL waits for the thaw).
//!   Such writes happen only in child processes ([`Writer`], [`write_completes_within`]); the
//!   test thread never writes to a filesystem that may be frozen.
//! - Scratch directories are never removed while anything is still mounted below them.
//! - Network: 127.0.0.1 only.
//!
//! # Layout of a test
//! ```text
//! let _serial = serial();                      // one test at a time per test binary
//! if !require_root() { return; }               // skip (or panic under CI=true)
//! let scratch = Scratch::new("my-test");       // /var/tmp/quiesce-it.my-test.PID.N
//! let vol = LoopFs::create(&scratch.join("a.img"), 128, FsKind::Ext4, &scratch.join("a"));
//! ...                                          // guards drop in reverse: thaw, umount, detach
//! ```
//!
//! Binaries: the product's (`quiesce-agent`, `quiesce-coordinator`, `quiescectl`) are looked up
//! in `$QUIESCE_BIN_DIR`, else next to the test executable (`target/debug`); build them first with
//! `cargo build --workspace --bins`. This crate's own `quiesce-writer` is always taken from next
//! to the test executable (cargo builds it for the integration tests).

pub mod faults;
pub mod multihost;
pub mod proxy;
pub mod safety;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use quiesce_agent::config::Config as AgentConfig;
use quiesce_agent::freeze::FreezeManager;
use quiesce_agent::freezer::{Freezer, IoctlFreezer, open_mount_point};
use quiesce_agent::mounts::{DevId, MountEntry, MountTable, ProcMountTable};
use quiesce_agent::records::RecordStore;
use quiesce_agent::volumes::AgentFiles;
use quiesce_agent::watchdog::NoWatchdog;
use quiesce_proto::agent::v1::agent_client::AgentClient;
use quiesce_proto::identity::Role;
use quiesce_proto::tls::TlsFiles;
use tonic::transport::{Channel, Endpoint};

// ---------------------------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------------------------

/// Tools the root tests run.
const ROOT_TOOLS: &[&str] = &["losetup", "mount", "umount", "mkfs.ext4", "fsfreeze"];

/// Whether this process may make loop filesystems: root, `/dev/loop-control`, the tools. When
/// it may not, prints `skipping: needs root (...)` and returns `false` — or panics when the
/// environment variable `CI` is set, so that CI never passes by skipping.
pub fn require_root() -> bool {
    let problem = if !is_root() {
        Some("not running as root".to_string())
    } else if !Path::new("/dev/loop-control").exists() {
        Some("no /dev/loop-control".to_string())
    } else {
        ROOT_TOOLS
            .iter()
            .find(|t| find_tool(t).is_none())
            .map(|t| format!("{t} is not installed"))
    };
    match problem {
        None => true,
        Some(why) if std::env::var_os("CI").is_some() => {
            panic!("this test needs root and loop devices, and CI is set: {why}")
        }
        Some(why) => {
            eprintln!("skipping: needs root ({why})");
            false
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

static SERIAL: Mutex<()> = Mutex::new(());

/// Held by one test at a time (see [`serial`]).
#[must_use = "the test runs alone only while this is held"]
pub struct SerialGuard {
    _guard: MutexGuard<'static, ()>,
}

/// Serialises the tests of one test binary (they share loop devices, ports and the host's
/// mount table). Poison-tolerant: a failed test does not fail the ones after it. Async tests
/// hold it across awaits on purpose: each test runs on its own thread, and the others wait.
pub fn serial() -> SerialGuard {
    SerialGuard {
        _guard: SERIAL
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()),
    }
}

/// `target/debug` (or wherever the test executable's `deps/` directory sits).
fn test_bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("test executable has a directory");
    // Tests live in target/debug/deps; this crate's own binaries in target/debug.
    if dir.file_name().is_some_and(|name| name == "deps") {
        dir.parent().unwrap_or(dir).to_owned()
    } else {
        dir.to_owned()
    }
}

/// Where the product binaries are: `$QUIESCE_BIN_DIR`, else next to the test executable.
pub fn bin_dir() -> PathBuf {
    match std::env::var_os("QUIESCE_BIN_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => test_bin_dir(),
    }
}

/// A product binary; panics with the build command when it is missing.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} not found: build the binaries first with `cargo build --workspace --bins` \
         (or point QUIESCE_BIN_DIR at them)",
        path.display()
    );
    path
}

/// This crate's writer process (see `src/bin/quiesce-writer.rs`).
pub fn writer_bin() -> PathBuf {
    let path = test_bin_dir().join("quiesce-writer");
    assert!(
        path.is_file(),
        "{} not found (cargo builds it with this crate's tests)",
        path.display()
    );
    path
}

/// A system tool by name, searched in `$PATH` and the sbin directories (which a non-login
/// `PATH` may lack).
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .filter(|d| !d.is_empty())
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
}

/// A `Command` for a system tool; panics when the tool is missing.
pub fn tool(name: &str) -> Command {
    let path = find_tool(name).unwrap_or_else(|| panic!("{name} is not installed"));
    Command::new(path)
}

/// Runs `cmd` to completion; panics with its output unless it succeeds. Returns stdout.
pub fn check(cmd: &mut Command) -> String {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        output.status.success(),
        "{cmd:?} failed: {}",
        describe(&output)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs `cmd`, ignoring its output and exit status (clean-up paths). `true` on success.
fn quiet(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `cmd` with stdout and stderr captured; kills it and panics if it has not finished
/// within `timeout` (a hung product binary fails the test instead of hanging it).
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("piped stderr")));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("{cmd:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// Exit status, stdout and stderr on one readable block, for assertion messages.
pub fn describe(output: &Output) -> String {
    format!(
        "{}\n--- stdout\n{}--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Stdout and stderr together.
pub fn all_text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Now, in nanoseconds since the Unix epoch (the writer's clock).
pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A path as a TOML basic string.
pub fn toml_str(path: impl AsRef<Path>) -> String {
    let text = path.as_ref().to_str().expect("test paths are UTF-8");
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A TOML array of path strings.
pub fn toml_paths<P: AsRef<Path>>(paths: &[P]) -> String {
    let items: Vec<String> = paths.iter().map(toml_str).collect();
    format!("[{}]", items.join(", "))
}

// ---------------------------------------------------------------------------------------------
// Mount table
// ---------------------------------------------------------------------------------------------

fn mount_entries() -> Vec<MountEntry> {
    ProcMountTable::host()
        .entries()
        .expect("read /proc/self/mountinfo")
}

/// The topmost mount at exactly `path`.
pub fn mount_at(path: &Path) -> Option<MountEntry> {
    ProcMountTable::host()
        .at(path)
        .expect("read /proc/self/mountinfo")
}

/// The device of the filesystem holding `path` (`stat` does not block on a frozen fs).
pub fn dev_of(path: &Path) -> DevId {
    DevId::of_path(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
}

/// The device number of a block device node such as `/dev/loop3`.
fn rdev_of(device: &str) -> DevId {
    let meta = fs::metadata(device).unwrap_or_else(|e| panic!("stat {device}: {e}"));
    DevId::from_raw(meta.rdev())
}

/// Unmounts `path` if `still_ours()` says the mount there is still the one we made: retries
/// while busy for up to 1 s, then detaches it lazily (the filesystem goes once its last open
/// descriptor closes; it was thawed before).
fn unmount(path: &Path, still_ours: impl Fn() -> bool) {
    for _ in 0..10 {
        if !still_ours() {
            return;
        }
        if quiet(tool("umount").arg(path)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if still_ours() {
        eprintln!("harness: {} still busy; lazy unmount", path.display());
        quiet(tool("umount").arg("-l").arg(path));
    }
}

// ---------------------------------------------------------------------------------------------
// Scratch directory
// ---------------------------------------------------------------------------------------------

static SCRATCH_SEQ: AtomicU32 = AtomicU32::new(0);

/// A fresh directory under `/var/tmp` for one test. Removed on drop — unless something is still
/// mounted below it, in which case it is left alone (with a message) rather than risk deleting
/// the contents of a mounted filesystem.
pub struct Scratch {
    path: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let seq = SCRATCH_SEQ.fetch_add(1, Ordering::Relaxed);
        let path = PathBuf::from(format!(
            "/var/tmp/quiesce-it.{tag}.{}.{seq}.{}",
            std::process::id(),
            unix_ns() % 1_000_000
        ));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Scratch { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.path.join(rel)
    }

    /// Creates `rel` (and its parents) below the scratch directory.
    pub fn mkdir(&self, rel: impl AsRef<Path>) -> PathBuf {
        let path = self.path.join(rel);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let busy: Vec<PathBuf> = mount_entries()
            .into_iter()
            .map(|e| e.mount_point)
            .filter(|m| m.starts_with(&self.path))
            .collect();
        if busy.is_empty() {
            let _ = fs::remove_dir_all(&self.path);
        } else {
            eprintln!(
                "harness: leaving {} in place: still mounted below it: {busy:?}",
                self.path.display()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Loop filesystems
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    Ext4,
    /// XFS made with `-m reflink=1`: FICLONE works on files inside it.
    XfsReflink,
}

/// A filesystem image attached to a loop device and mounted. On drop: `fsfreeze -u` (errors
/// ignored), unmount (retried while busy, lazily at last), `losetup -d`, and — for images it
/// created — the image file. Every step checks first that the mount is still ours.
pub struct LoopFs {
    image: PathBuf,
    mount_point: PathBuf,
    device: Option<String>,
    dev: Option<DevId>,
    owns_image: bool,
    made_mount_point: bool,
}

impl LoopFs {
    /// Makes a sparse image of `size_mb` MiB at `image` (which must not exist), puts `kind` on
    /// it, attaches it and mounts it at `mount_point` (created if needed).
    pub fn create(image: &Path, size_mb: u64, kind: FsKind, mount_point: &Path) -> LoopFs {
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(image)
            .unwrap_or_else(|e| panic!("create {}: {e}", image.display()));
        file.set_len(size_mb << 20).expect("size the image");
        drop(file);
        let made = match kind {
            FsKind::Ext4 => check(tool("mkfs.ext4").args(["-q", "-F"]).arg(image)),
            FsKind::XfsReflink => {
                check(tool("mkfs.xfs").args(["-q", "-m", "reflink=1"]).arg(image))
            }
        };
        drop(made);
        LoopFs::attach_inner(image, mount_point, false, true)
    }

    /// Attaches an existing image (a snapshot, a restored image) and mounts it; read-only
    /// attaches the loop device read-only too, so not even journal replay can change the
    /// image. The image is left in place on drop.
    pub fn attach(image: &Path, mount_point: &Path, read_only: bool) -> LoopFs {
        LoopFs::attach_inner(image, mount_point, read_only, false)
    }

    fn attach_inner(image: &Path, mount_point: &Path, read_only: bool, owns_image: bool) -> LoopFs {
        let made_mount_point = !mount_point.exists();
        fs::create_dir_all(mount_point)
            .unwrap_or_else(|e| panic!("mkdir {}: {e}", mount_point.display()));
        let mut fs = LoopFs {
            image: image.to_owned(),
            mount_point: mount_point.to_owned(),
            device: None,
            dev: None,
            owns_image,
            made_mount_point,
        };
        let mut losetup = tool("losetup");
        losetup.args(["--find", "--show"]);
        if read_only {
            losetup.arg("--read-only");
        }
        let device = check(losetup.arg(image)).trim().to_owned();
        assert!(
            device.starts_with("/dev/loop"),
            "losetup printed {device:?}"
        );
        fs.device = Some(device.clone());
        let mut mount = tool("mount");
        if read_only {
            mount.args(["-o", "ro"]);
        }
        check(mount.arg(&device).arg(mount_point));
        let dev = rdev_of(&device);
        assert_eq!(
            dev_of(mount_point),
            dev,
            "{} is not the filesystem of {device} after mounting it",
            mount_point.display()
        );
        fs.dev = Some(dev);
        fs
    }

    pub fn mount_point(&self) -> &Path {
        &self.mount_point
    }

    /// A path inside the mounted filesystem.
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.mount_point.join(rel)
    }

    pub fn image(&self) -> &Path {
        &self.image
    }

    /// `/dev/loopN`.
    pub fn device(&self) -> &str {
        self.device.as_deref().expect("attached")
    }

    /// The filesystem's device number (`st_dev` of every file in it).
    pub fn dev(&self) -> DevId {
        self.dev.expect("mounted")
    }

    /// Whether the mount point still holds this loop device's filesystem.
    fn mounted_here(&self) -> bool {
        let (Some(device), Some(dev)) = (&self.device, self.dev) else {
            return false;
        };
        mount_at(&self.mount_point).is_some_and(|e| &e.source == device && e.dev == dev)
    }

    /// Opens the mount point, checking that it is this loop filesystem and nothing else (never
    /// the directory of the filesystem below an unmounted mount point).
    fn open_checked(&self) -> OwnedFd {
        assert!(
            self.mounted_here(),
            "{} is not mounted from {:?} any more",
            self.mount_point.display(),
            self.device
        );
        let fd = open_mount_point(&self.mount_point)
            .unwrap_or_else(|e| panic!("open {}: {e}", self.mount_point.display()));
        let file = File::from(fd.try_clone().expect("dup"));
        let dev = DevId::from_raw(file.metadata().expect("fstat").dev());
        assert_eq!(
            dev,
            self.dev(),
            "{} changed under the test",
            self.mount_point.display()
        );
        fd
    }

    /// Whether the filesystem is frozen right now, by anyone. Probes with FIFREEZE: EBUSY means
    /// frozen (nothing changes); success means it was not, and it is thawed again at once.
    pub fn is_frozen(&self) -> bool {
        let fd = self.open_checked();
        match IoctlFreezer.freeze(fd.as_fd()) {
            Ok(()) => {
                IoctlFreezer.thaw(fd.as_fd()).unwrap_or_else(|e| {
                    panic!("thaw after probing {}: {e}", self.mount_point.display())
                });
                false
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => true,
            Err(e) => panic!("FIFREEZE probe of {}: {e}", self.mount_point.display()),
        }
    }

    /// Freezes it behind the agent's back, as another tool would (`fsfreeze -f`).
    pub fn freeze_externally(&self) {
        drop(self.open_checked());
        check(tool("fsfreeze").arg("-f").arg(&self.mount_point));
    }

    /// `fsfreeze -u`; `true` when it thawed something, `false` when it was not frozen.
    pub fn thaw_externally(&self) -> bool {
        drop(self.open_checked());
        quiet(tool("fsfreeze").arg("-u").arg(&self.mount_point))
    }

    /// Flushes the whole filesystem (`syncfs`), so an image clone sees what was written.
    pub fn sync(&self) {
        let fd = self.open_checked();
        IoctlFreezer
            .syncfs(fd.as_fd())
            .unwrap_or_else(|e| panic!("syncfs {}: {e}", self.mount_point.display()));
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if self.mounted_here() {
            // Thaw before unmounting: an unmount of a frozen filesystem would wait for ever.
            quiet(tool("fsfreeze").arg("-u").arg(&self.mount_point));
            unmount(&self.mount_point, || self.mounted_here());
        }
        if let Some(device) = &self.device {
            // With a lazy unmount still pending, this sets autoclear instead.
            quiet(tool("losetup").arg("-d").arg(device));
        }
        if !self.mounted_here() {
            if self.owns_image {
                let _ = fs::remove_file(&self.image);
            }
            if self.made_mount_point && mount_at(&self.mount_point).is_none() {
                let _ = fs::remove_dir(&self.mount_point);
            }
        }
    }
}

/// An XFS reflink filesystem holding the images of ext4 volumes that are themselves
/// loop-mounted: the setup under which the `reflink` provider works. Owns its volumes and any
/// image attached from it, and drops them before itself.
pub struct Pool {
    attached: Vec<LoopFs>,
    volumes: Vec<(String, LoopFs)>,
    fs: LoopFs,
}

impl Pool {
    /// A sparse pool of `size_mb` MiB: `scratch/pool.img` mounted at `scratch/pool`.
    pub fn create(scratch: &Scratch, size_mb: u64) -> Pool {
        assert!(
            find_tool("mkfs.xfs").is_some(),
            "mkfs.xfs is not installed (apt-get install xfsprogs)"
        );
        let fs = LoopFs::create(
            &scratch.join("pool.img"),
            size_mb,
            FsKind::XfsReflink,
            &scratch.join("pool"),
        );
        Pool {
            attached: Vec::new(),
            volumes: Vec::new(),
            fs,
        }
    }

    pub fn root(&self) -> &Path {
        self.fs.mount_point()
    }

    pub fn fs(&self) -> &LoopFs {
        &self.fs
    }

    /// An ext4 volume whose image is `<pool>/<name>.img`, mounted at `mount_point`.
    pub fn add_volume(&mut self, name: &str, size_mb: u64, mount_point: &Path) -> &LoopFs {
        let image = self.root().join(format!("{name}.img"));
        let volume = LoopFs::create(&image, size_mb, FsKind::Ext4, mount_point);
        self.volumes.push((name.to_owned(), volume));
        &self.volumes.last().expect("just pushed").1
    }

    pub fn volume(&self, name: &str) -> &LoopFs {
        self.volumes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("no volume {name} in the pool"))
    }

    pub fn volumes(&self) -> impl Iterator<Item = (&str, &LoopFs)> {
        self.volumes.iter().map(|(n, v)| (n.as_str(), v))
    }

    /// Attaches an image (a snapshot or a restored image, normally inside the pool) and mounts
    /// it; it is unmounted before the pool is.
    pub fn attach(&mut self, image: &Path, mount_point: &Path, read_only: bool) -> &LoopFs {
        self.attached
            .push(LoopFs::attach(image, mount_point, read_only));
        self.attached.last().expect("just pushed")
    }
}

/// A tmpfs mounted for the test (the agent's state directory must be on one).
pub struct Tmpfs {
    path: PathBuf,
}

/// Source name of the harness's tmpfs mounts, so that drop only unmounts its own.
const TMPFS_SOURCE: &str = "quiesce-it";

impl Tmpfs {
    pub fn mount(path: &Path, size_mb: u64) -> Tmpfs {
        fs::create_dir_all(path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        check(
            tool("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size_mb}m,mode=0700")])
                .arg(TMPFS_SOURCE)
                .arg(path),
        );
        Tmpfs {
            path: path.to_owned(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.path.join(rel)
    }

    fn mounted_here(&self) -> bool {
        mount_at(&self.path).is_some_and(|e| e.fs_type == "tmpfs" && e.source == TMPFS_SOURCE)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        unmount(&self.path, || self.mounted_here());
        if mount_at(&self.path).is_none() {
            let _ = fs::remove_dir(&self.path);
        }
    }
}

/// `mount --bind SOURCE TARGET`: a second mount point (an alias) of the same filesystem.
pub struct BindMount {
    target: PathBuf,
    dev: DevId,
}

impl BindMount {
    pub fn new(source: &Path, target: &Path) -> BindMount {
        fs::create_dir_all(target).unwrap_or_else(|e| panic!("mkdir {}: {e}", target.display()));
        check(tool("mount").arg("--bind").arg(source).arg(target));
        let dev = dev_of(target);
        assert_eq!(dev, dev_of(source), "bind mount shows another filesystem");
        BindMount {
            target: target.to_owned(),
            dev,
        }
    }

    pub fn path(&self) -> &Path {
        &self.target
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        unmount(&self.target, || {
            mount_at(&self.target).is_some_and(|e| e.dev == self.dev)
        });
        if mount_at(&self.target).is_none() {
            let _ = fs::remove_dir(&self.target);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Probes
// ---------------------------------------------------------------------------------------------

/// Appends a byte to `file` and fsyncs it in a child process; `true` if that finished within
/// `timeout`. On a frozen filesystem it does not: the child stays blocked until the thaw (the
/// test's guards thaw it), and is left to be reaped by init.
pub fn write_completes_within(file: &Path, timeout: Duration) -> bool {
    let mut child = tool("sh")
        .args(["-c", "printf x >> \"$1\" && sync \"$1\"", "sh"])
        .arg(file)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn sh");
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            assert!(
                status.success(),
                "writing {} failed: {status}",
                file.display()
            );
            return true;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The scheduler state of a process (`R`, `S`, `D`…), from `/proc/PID/stat`.
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ...": the state follows the last ')'.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

// ---------------------------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------------------------

/// One write the writer process completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteSample {
    /// When the write started (Unix ns).
    pub started_ns: u64,
    /// When the write (and fsync, if asked) returned (Unix ns).
    pub done_ns: u64,
}

/// A child process appending to a file on a volume every 2 ms (see `quiesce-writer`), reporting
/// each completed write on a pipe. While the volume is frozen its reports stop; the longest gap
/// between two reports is the write stall. Drop kills it without waiting for ever: if the
/// volume is still frozen the kill lands after the thaw, which the volume's guard does.
pub struct Writer {
    child: Option<Child>,
    samples: Arc<Mutex<Vec<WriteSample>>>,
    reader: Option<JoinHandle<()>>,
    pid: u32,
}

impl Writer {
    /// Starts appending to `file` (created if needed); with `fsync`, each write is followed by
    /// `fdatasync`.
    pub fn start(file: &Path, fsync: bool) -> Writer {
        let mut cmd = Command::new(writer_bin());
        cmd.arg(file).args(["--interval-ms", "2"]);
        if fsync {
            cmd.arg("--fsync");
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn quiesce-writer");
        let pid = child.id();
        let stdout = child.stdout.take().expect("piped stdout");
        let samples = Arc::new(Mutex::new(Vec::new()));
        let sink = samples.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let fields: Vec<u64> = line
                    .split_whitespace()
                    .filter_map(|f| f.parse().ok())
                    .collect();
                if let [_, started_ns, done_ns] = fields[..] {
                    sink.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(WriteSample {
                            started_ns,
                            done_ns,
                        });
                }
            }
        });
        Writer {
            child: Some(child),
            samples,
            reader: Some(reader),
            pid,
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Writes completed so far.
    /// How long after `since_ns` (Unix ns) the first write completed, waiting up to `timeout`.
    pub fn first_write_after(&self, since_ns: u64, timeout: Duration) -> Option<Duration> {
        let deadline = Instant::now() + timeout;
        loop {
            let first = self
                .samples
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|s| s.done_ns)
                .filter(|done| *done > since_ns)
                .min();
            if let Some(done) = first {
                return Some(Duration::from_nanos(done - since_ns));
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn count(&self) -> usize {
        self.samples.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Waits until at least `n` writes have completed; `false` on timeout.
    pub fn wait_for_count(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.count() < n {
            if Instant::now() >= deadline {
                return false;
            }
            if let Some(state) = proc_state(self.pid)
                && state == 'Z'
            {
                panic!("the writer process died");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// The writer's scheduler state: `D` while blocked on a frozen filesystem.
    pub fn state(&self) -> Option<char> {
        proc_state(self.pid)
    }

    /// Stops the writer and returns what it did. Call only once the volume is thawed.
    pub fn stop(mut self) -> WriterReport {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let samples = self
            .samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        WriterReport { samples }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = child.kill();
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!(
            "harness: writer {} is still blocked (frozen volume?); the volume's guard thaws it",
            self.pid
        );
    }
}

/// What a [`Writer`] did.
#[derive(Debug, Clone)]
pub struct WriterReport {
    pub samples: Vec<WriteSample>,
}

impl WriterReport {
    /// The longest time between two consecutive completed writes: how long writes stalled.
    pub fn longest_gap(&self) -> Duration {
        self.samples
            .windows(2)
            .map(|w| Duration::from_nanos(w[1].done_ns.saturating_sub(w[0].done_ns)))
            .max()
            .unwrap_or_default()
    }

    /// The longest single write (start to return).
    pub fn longest_write(&self) -> Duration {
        self.samples
            .iter()
            .map(|s| Duration::from_nanos(s.done_ns.saturating_sub(s.started_ns)))
            .max()
            .unwrap_or_default()
    }

    /// Writes that completed within `[from_ns, to_ns]`.
    pub fn completed_between(&self, from_ns: u64, to_ns: u64) -> usize {
        self.samples
            .iter()
            .filter(|s| (from_ns..=to_ns).contains(&s.done_ns))
            .count()
    }
}

// ---------------------------------------------------------------------------------------------
// In-process agent
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// PKI
// ---------------------------------------------------------------------------------------------

/// Name of the coordinator certificate (`quiesce://coordinator/coordinator`).
pub const COORDINATOR: &str = "coordinator";
/// Name of the agent certificate and of the agent in the coordinator's config.
pub const AGENT: &str = "db1";
/// Name of the operator certificate.
pub const OPERATOR: &str = "op";

/// A test CA made with `quiesce_coordinator::pki`, with the certificates of a coordinator
/// ([`COORDINATOR`], reachable at 127.0.0.1), an agent ([`AGENT`], 127.0.0.1) and an operator
/// ([`OPERATOR`]).
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        quiesce_coordinator::pki::init_ca(dir, "Quiesce test CA").expect("init CA");
        let pki = Pki {
            dir: dir.to_owned(),
        };
        pki.issue(Role::Coordinator, COORDINATOR);
        pki.issue(Role::Agent, AGENT);
        pki.issue(Role::Operator, OPERATOR);
        pki
    }

    /// Issues `NAME.pem`/`NAME.key` for `role` (DNS SAN `name`, IP SAN 127.0.0.1).
    pub fn issue(&self, role: Role, name: &str) {
        let localhost = [std::net::IpAddr::from([127, 0, 0, 1])];
        quiesce_coordinator::pki::issue(&self.dir, role, name, &[], &localhost, 2, false)
            .unwrap_or_else(|e| panic!("issue {role} {name}: {e}"));
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join(quiesce_coordinator::pki::CA_CERT)
    }

    pub fn cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pem"))
    }

    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.key"))
    }

    /// The mTLS files of `name`, trusting this CA.
    pub fn tls(&self, name: &str) -> TlsFiles {
        TlsFiles {
            ca: self.ca(),
            cert: self.cert(name),
            key: self.key(name),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// A free TCP port on 127.0.0.1 (bound once and released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

fn spawn_logged(cmd: &mut Command, log: &Path) -> Child {
    let file = File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
    let stderr = file.try_clone().expect("dup log");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(stderr))
        .env("QUIESCE_LOG", "info")
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

fn read_log(log: &Path) -> String {
    fs::read_to_string(log).unwrap_or_default()
}

/// Waits until 127.0.0.1:`port` accepts connections; panics with the log if the process exits
/// first or the port stays closed for 20 s.
fn wait_for_port(port: u16, child: &mut Child, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!(
                "{what} exited with {status} before listening:\n{}",
                read_log(log)
            );
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {addr} within 20 s:\n{}",
            read_log(log)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM (graceful: the agent thaws everything it holds), then SIGKILL after 5 s.
fn stop_child(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// `quiesce-agent run --config DIR/agent.toml`, logging to `DIR/agent.log`. Stopped with
/// SIGTERM (then SIGKILL) on drop.
pub struct AgentProcess {
    child: Child,
    port: u16,
    config: PathBuf,
    log: PathBuf,
}

impl AgentProcess {
    /// Writes the config (with a free port as `listen`) and starts the agent; returns once it
    /// accepts connections.
    pub fn start(dir: &Path, toml: &AgentToml) -> AgentProcess {
        let port = free_port();
        let mut toml = toml.clone();
        toml.listen = Some(SocketAddr::from(([127, 0, 0, 1], port)));
        let config = dir.join("agent.toml");
        fs::write(&config, toml.render()).expect("write agent.toml");
        let log = dir.join("agent.log");
        let mut child = spawn_logged(
            Command::new(bin("quiesce-agent"))
                .arg("run")
                .arg("--config")
                .arg(&config),
            &log,
        );
        wait_for_port(port, &mut child, "quiesce-agent", &log);
        AgentProcess {
            child,
            port,
            config,
            log,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    /// SIGKILL, as the OOM killer would; waits for the process to be gone.
    pub fn kill_hard(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` (SIGTERM, SIGSTOP, SIGCONT, ...) without waiting.
    pub fn signal(&self, signal: Signal) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), signal);
    }

    /// Waits up to `timeout` for the process to exit; true if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// A gRPC client of this agent presenting `identity`'s certificate from `pki`, checking the
    /// agent's certificate against the name [`AGENT`].
    pub async fn client(
        &self,
        pki: &Pki,
        identity: &str,
    ) -> Result<AgentClient<Channel>, tonic::transport::Error> {
        let tls = pki.tls(identity).client_config(AGENT).expect("client TLS");
        let channel = Endpoint::from_shared(self.endpoint())?
            .connect_timeout(Duration::from_secs(5))
            .tls_config(tls)?
            .connect()
            .await?;
        Ok(AgentClient::new(channel))
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

/// `quiesce-coordinator run --config DIR/coordinator.toml`, logging to `DIR/coordinator.log`,
/// catalog `DIR/catalog.sqlite`. Stopped with SIGTERM (then SIGKILL) on drop.
pub struct CoordinatorProcess {
    child: Child,
    port: u16,
    catalog: PathBuf,
    log: PathBuf,
    ca: PathBuf,
    pki_dir: PathBuf,
}

impl CoordinatorProcess {
    /// Starts a coordinator with mTLS from `pki` ([`COORDINATOR`]'s certificate); `body` holds
    /// its `[[agent]]` and `[[group]]` tables (see [`agent_table`], [`group_table`]).
    pub fn start(dir: &Path, pki: &Pki, body: &str) -> CoordinatorProcess {
        CoordinatorProcess::start_with_env(dir, pki, body, &[])
    }

    /// Like [`CoordinatorProcess::start`], with extra environment (e.g. the fault-injection
    /// pause `QUIESCE_TEST_PAUSE_AFTER`). Restarting in the same `dir` reuses the catalog.
    pub fn start_with_env(
        dir: &Path,
        pki: &Pki,
        body: &str,
        env: &[(&str, &str)],
    ) -> CoordinatorProcess {
        let port = free_port();
        let catalog = dir.join("catalog.sqlite");
        let tls = pki.tls(COORDINATOR);
        let text = format!(
            "listen = \"127.0.0.1:{port}\"\ncatalog = {}\n[tls]\nca = {}\ncert = {}\nkey = {}\n{body}",
            toml_str(&catalog),
            toml_str(&tls.ca),
            toml_str(&tls.cert),
            toml_str(&tls.key),
        );
        let config = dir.join("coordinator.toml");
        fs::write(&config, text).expect("write coordinator.toml");
        let log = dir.join("coordinator.log");
        let mut command = Command::new(bin("quiesce-coordinator"));
        command.arg("run").arg("--config").arg(&config);
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = spawn_logged(&mut command, &log);
        wait_for_port(port, &mut child, "quiesce-coordinator", &log);
        CoordinatorProcess {
            child,
            port,
            catalog,
            log,
            ca: pki.ca(),
            pki_dir: pki.dir().to_owned(),
        }
    }

    pub fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` without waiting.
    pub fn signal(&self, signal: Signal) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), signal);
    }

    /// SIGKILL; waits for the process to be gone.
    pub fn kill_hard(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn catalog(&self) -> &Path {
        &self.catalog
    }

    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    /// `quiescectl` as the operator [`OPERATOR`].
    pub fn ctl(&self) -> Ctl {
        self.ctl_as(
            &self.ca,
            &self.pki_dir.join(format!("{OPERATOR}.pem")),
            &self.pki_dir.join(format!("{OPERATOR}.key")),
        )
    }

    /// `quiescectl` with any CA/certificate/key.
    pub fn ctl_as(&self, ca: &Path, cert: &Path, key: &Path) -> Ctl {
        Ctl {
            endpoint: self.endpoint(),
            ca: ca.to_owned(),
            cert: cert.to_owned(),
            key: key.to_owned(),
        }
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

/// An `[[agent]]` table of the coordinator's config.
pub fn agent_table(name: &str, port: u16) -> String {
    format!("[[agent]]\nname = {name:?}\nendpoint = \"https://127.0.0.1:{port}\"\n")
}

/// A `[[group]]` table with the reflink provider and one member per `(agent, mounts)`.
pub fn group_table<P: AsRef<Path>>(
    name: &str,
    lease: Option<&str>,
    members: &[(&str, &[P])],
) -> String {
    let mut out = format!("[[group]]\nname = {name:?}\nprovider = \"reflink\"\n");
    if let Some(lease) = lease {
        out.push_str(&format!("lease = {lease:?}\n"));
    }
    for (agent, mounts) in members {
        out.push_str(&format!(
            "[[group.member]]\nagent = {agent:?}\nmounts = {}\n",
            toml_paths(mounts)
        ));
    }
    out
}

/// `quiescectl` with the `QUIESCECTL_*` environment set for one identity.
#[derive(Debug, Clone)]
pub struct Ctl {
    pub endpoint: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Ctl {
    /// Runs `quiescectl ARGS` (60 s at most).
    pub fn run(&self, args: &[&str]) -> Output {
        run_with_timeout(
            Command::new(bin("quiescectl"))
                .args(args)
                .env("QUIESCECTL_ENDPOINT", &self.endpoint)
                .env("QUIESCECTL_CA", &self.ca)
                .env("QUIESCECTL_CERT", &self.cert)
                .env("QUIESCECTL_KEY", &self.key),
            Duration::from_secs(60),
        )
    }

    /// Runs `quiescectl ARGS --json` and parses stdout.
    pub fn json(&self, args: &[&str]) -> (Output, serde_json::Value) {
        let mut all = args.to_vec();
        all.push("--json");
        let output = self.run(&all);
        let value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "quiescectl {args:?} printed no JSON ({e}): {}",
                describe(&output)
            )
        });
        (output, value)
    }
}

// ---------------------------------------------------------------------------------------------
// A whole system
// ---------------------------------------------------------------------------------------------

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
