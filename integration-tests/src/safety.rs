//! Harness pieces for the safety tests (`tests/safety_*.rs`): a freeze probe for any test-made
//! filesystem, a btrfs loop filesystem with subvolumes, a chroot whose `/` is one of them, an
//! unprivileged racer process, and the agent process started with a lower descriptor limit.
//!
//! The same safety rules as the rest of the harness: only filesystems a test made are ever
//! frozen (every probe checks the superblock first), every guard thaws before it unmounts, and
//! nothing of the machine's own filesystems is ever mounted into a chroot (the chroot gets
//! copies of the binary and its libraries on tmpfs).

use std::fs;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use quiesce_agent::freezer::{Freezer, IoctlFreezer, open_mount_point};
use quiesce_agent::mounts::{DevId, MountTable, ProcMountTable, by_mount_id};

use crate::{check, mount_at, tool};

/// Whether the filesystem mounted at `mount` is frozen right now, by anyone. `mount` must be
/// the root of a mount of superblock `expected` (else this panics before any ioctl). Probes
/// with FIFREEZE: EBUSY means frozen (nothing changes); success means it was not, and it is
/// thawed again at once.
pub fn is_frozen(mount: &Path, expected: DevId) -> bool {
    let fd = open_mount_point(mount).unwrap_or_else(|e| panic!("open {}: {e}", mount.display()));
    let dev = DevId::of_fd(fd.as_fd(), mount).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        dev,
        expected,
        "{} is not the test's filesystem any more",
        mount.display()
    );
    match IoctlFreezer.freeze(fd.as_fd()) {
        Ok(()) => {
            IoctlFreezer
                .thaw(fd.as_fd())
                .unwrap_or_else(|e| panic!("thaw after probing {}: {e}", mount.display()));
            false
        }
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => true,
        Err(e) => panic!("FIFREEZE probe of {}: {e}", mount.display()),
    }
}

/// The superblock of the mount whose root is `mount` (mountinfo `major:minor`).
pub fn superblock(mount: &Path) -> DevId {
    let table = ProcMountTable::host();
    let opened = table
        .open_mount(mount)
        .unwrap_or_else(|e| panic!("open {}: {e}", mount.display()));
    let entries = table.entries().expect("mountinfo");
    let entry = by_mount_id(&entries, opened.mount_id).expect("listed");
    assert!(opened.is_mount_root, "{} is no mount root", mount.display());
    entry.dev
}

/// Unmounts `path` (retrying while busy, lazily at last) while `ours()` says the mount there
/// is still the test's.
fn unmount(path: &Path, ours: impl Fn() -> bool) {
    for _ in 0..20 {
        if !ours() {
            return;
        }
        if tool("umount")
            .arg(path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if ours() {
        let _ = tool("umount").arg("-l").arg(path).status();
    }
}

/// One mount the test made (tmpfs, proc, a subvolume), unmounted on drop if still there.
pub struct Mounted {
    path: PathBuf,
    fs_type: String,
}

impl Mounted {
    /// `mount -t FS_TYPE [-o OPTIONS] SOURCE PATH` (PATH created if needed).
    pub fn new(fs_type: &str, source: &str, options: &str, path: &Path) -> Mounted {
        fs::create_dir_all(path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        let mut mount = tool("mount");
        mount.args(["-t", fs_type]);
        if !options.is_empty() {
            mount.args(["-o", options]);
        }
        check(mount.arg(source).arg(path));
        Mounted {
            path: path.to_owned(),
            fs_type: fs_type.to_owned(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let here = || mount_at(&self.path).is_some_and(|e| e.fs_type == self.fs_type);
        if self.fs_type == "btrfs" && here() {
            let _ = tool("fsfreeze")
                .arg("-u")
                .arg(&self.path)
                .stderr(Stdio::null())
                .status();
        }
        unmount(&self.path, here);
    }
}

/// A btrfs filesystem on a loop device, its top level (subvolid 5) mounted at `top`.
pub struct Btrfs {
    /// Subvolume mounts, unmounted (in reverse) before the top level.
    mounts: Vec<Mounted>,
    top: Option<Mounted>,
    device: String,
    image: PathBuf,
    dev: DevId,
}

impl Btrfs {
    pub fn create(image: &Path, size_mb: u64, top: &Path) -> Btrfs {
        let file = fs::File::create_new(image)
            .unwrap_or_else(|e| panic!("create {}: {e}", image.display()));
        file.set_len(size_mb << 20).expect("size the image");
        drop(file);
        check(tool("mkfs.btrfs").args(["-q", "-f"]).arg(image));
        let device = check(tool("losetup").args(["--find", "--show"]).arg(image))
            .trim()
            .to_owned();
        assert!(
            device.starts_with("/dev/loop"),
            "losetup printed {device:?}"
        );
        let top = Mounted::new("btrfs", &device, "subvolid=5", top);
        let dev = superblock(top.path());
        Btrfs {
            mounts: Vec::new(),
            top: Some(top),
            device,
            image: image.to_owned(),
            dev,
        }
    }

    /// The superblock every subvolume mount of it shows.
    pub fn dev(&self) -> DevId {
        self.dev
    }

    pub fn top(&self) -> &Path {
        self.top.as_ref().expect("mounted").path()
    }

    pub fn create_subvolume(&self, name: &str) {
        check(
            tool("btrfs")
                .args(["-q", "subvolume", "create"])
                .arg(self.top().join(name)),
        );
    }

    /// Mounts subvolume `name` at `path`; returns its index for [`Btrfs::unmount`].
    pub fn mount_subvolume(&mut self, name: &str, path: &Path) -> usize {
        self.mounts.push(Mounted::new(
            "btrfs",
            &self.device,
            &format!("subvol={name}"),
            path,
        ));
        let mounted = superblock(path);
        assert_eq!(
            mounted, self.dev,
            "a subvolume shows its filesystem's superblock"
        );
        self.mounts.len() - 1
    }

    /// Unmounts the subvolume mount made last at `path`.
    pub fn unmount(&mut self, path: &Path) {
        if let Some(index) = self.mounts.iter().rposition(|m| m.path() == path) {
            drop(self.mounts.remove(index));
        }
    }

    /// Whether the filesystem (every subvolume of it) is frozen.
    pub fn is_frozen(&self) -> bool {
        is_frozen(self.top(), self.dev)
    }
}

impl Drop for Btrfs {
    fn drop(&mut self) {
        while let Some(mount) = self.mounts.pop() {
            drop(mount);
        }
        drop(self.top.take());
        let _ = tool("losetup").arg("-d").arg(&self.device).status();
        if mount_entries_on(&self.device).is_empty() {
            let _ = fs::remove_file(&self.image);
        }
    }
}

fn mount_entries_on(device: &str) -> Vec<PathBuf> {
    ProcMountTable::host()
        .entries()
        .map(|entries| {
            entries
                .into_iter()
                .filter(|e| e.source == device)
                .map(|e| e.mount_point)
                .collect()
        })
        .unwrap_or_default()
}

/// A directory tree to `chroot` into: `/` is whatever is mounted at `root` (a btrfs subvolume),
/// with the agent binary and the libraries it needs copied onto tmpfs mounts (`/opt`, `/usr`),
/// `/proc`, and a tmpfs at `/run/quiesce` for the state directory. Nothing of the machine's own
/// filesystems is mounted in.
pub struct Chroot {
    root: PathBuf,
    mounts: Vec<Mounted>,
}

/// Where the agent binary is inside the chroot.
pub const CHROOT_AGENT: &str = "/opt/quiesce-agent";
/// The state directory inside the chroot (a tmpfs).
pub const CHROOT_STATE: &str = "/run/quiesce";

impl Chroot {
    pub fn new(root: &Path, agent_binary: &Path) -> Chroot {
        let mut mounts = Vec::new();
        let size = fs::metadata(agent_binary).expect("agent binary").len();
        let opt = Mounted::new(
            "tmpfs",
            "quiesce-it",
            &format!("size={}m,mode=0755", (size >> 20) + 16),
            &root.join("opt"),
        );
        fs::copy(agent_binary, opt.path().join("quiesce-agent")).expect("copy the agent");
        mounts.push(opt);
        let usr = Mounted::new(
            "tmpfs",
            "quiesce-it",
            "size=64m,mode=0755",
            &root.join("usr"),
        );
        mounts.push(usr);
        // Merged /usr: /lib, /lib64 and /bin lead into the tmpfs at /usr.
        for (link, to) in [
            ("lib", "usr/lib"),
            ("lib64", "usr/lib64"),
            ("bin", "usr/bin"),
        ] {
            fs::create_dir_all(root.join(to)).expect("mkdir");
            let path = root.join(link);
            if fs::symlink_metadata(&path).is_err() {
                std::os::unix::fs::symlink(to, &path).expect("symlink");
            }
        }
        for lib in shared_libraries(agent_binary) {
            let target = root.join(lib.strip_prefix("/").expect("absolute"));
            fs::create_dir_all(target.parent().expect("parent")).expect("mkdir");
            fs::copy(&lib, &target)
                .unwrap_or_else(|e| panic!("copy {} to {}: {e}", lib.display(), target.display()));
        }
        mounts.push(Mounted::new("proc", "proc", "", &root.join("proc")));
        mounts.push(Mounted::new(
            "tmpfs",
            "quiesce-it",
            "size=8m,mode=0700",
            &root.join(CHROOT_STATE.trim_start_matches('/')),
        ));
        Chroot {
            root: root.to_owned(),
            mounts,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The host path of `inside` (an absolute path in the chroot).
    pub fn path(&self, inside: &str) -> PathBuf {
        self.root.join(inside.trim_start_matches('/'))
    }

    /// `program` (a path inside the chroot) run with its root at the chroot.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        let root = self.root.clone();
        // SAFETY: chroot(2) and chdir(2) are async-signal-safe; the path was allocated before
        // the fork.
        unsafe {
            command.pre_exec(move || {
                nix::unistd::chroot(&root)?;
                nix::unistd::chdir("/")?;
                Ok(())
            });
        }
        command.env_clear().env("QUIESCE_LOG", "info");
        command
    }
}

impl Drop for Chroot {
    fn drop(&mut self) {
        while let Some(mount) = self.mounts.pop() {
            drop(mount);
        }
    }
}

/// The shared libraries `binary` loads, from `ldd` (the dynamic loader included).
fn shared_libraries(binary: &Path) -> Vec<PathBuf> {
    let out = check(tool("ldd").arg(binary));
    out.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Where this crate's own binaries are (next to the test executable's `deps/`).
fn own_bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("test executable has a directory");
    if dir.file_name().is_some_and(|name| name == "deps") {
        dir.parent().unwrap_or(dir).to_owned()
    } else {
        dir.to_owned()
    }
}

/// `quiesce-racer` (this crate's binary, see `src/bin/quiesce-racer.rs`) swapping
/// `dir/name` for a symlink to `target` and back as fast as it can, as `uid` (and its gid).
/// Killed on drop, and the real directory put back.
pub struct Racer {
    child: Child,
    dir: PathBuf,
    name: String,
}

impl Racer {
    pub fn start(dir: &Path, name: &str, target: &Path, uid: Option<u32>) -> Racer {
        let mut command = Command::new(own_bin_dir().join("quiesce-racer"));
        command
            .arg(dir)
            .arg(name)
            .arg(target)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if let Some(uid) = uid {
            command.uid(uid).gid(uid);
        }
        let child = command.spawn().expect("spawn quiesce-racer");
        Racer {
            child,
            dir: dir.to_owned(),
            name: name.to_owned(),
        }
    }

    /// Waits until the racer has swapped at least once (the symlink was seen).
    pub fn wait_running(&self) {
        let link = self.dir.join(&self.name);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink()) {
                return;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        panic!("the racer never swapped {}", link.display());
    }

    /// Stops the racer and restores the real directory.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let link = self.dir.join(&self.name);
        let real = self.dir.join(format!(".{}.real", self.name));
        if fs::symlink_metadata(&real).is_ok() {
            if fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink()) {
                let _ = fs::remove_file(&link);
            }
            let _ = fs::rename(&real, &link);
        }
    }
}

impl Drop for Racer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Lowers this process's soft limit on open descriptors to `soft` while held (children started
/// meanwhile inherit it); restores the previous limits on drop.
pub struct NofileLimit {
    previous: libc::rlimit,
}

impl NofileLimit {
    pub fn set(soft: u64) -> NofileLimit {
        let mut previous = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit only read or write the struct passed, valid here.
        unsafe {
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut previous), 0);
            let lower = libc::rlimit {
                rlim_cur: soft.min(previous.rlim_max),
                rlim_max: previous.rlim_max,
            };
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lower), 0);
        }
        NofileLimit { previous }
    }

    /// Raises this process's soft limit to its hard limit (for a test that opens many sockets).
    pub fn raise_to_hard() -> u64 {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as above.
        unsafe {
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
            limit.rlim_cur = limit.rlim_max;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
        }
        limit.rlim_cur
    }
}

impl Drop for NofileLimit {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe {
            libc::setrlimit(libc::RLIMIT_NOFILE, &self.previous);
        }
    }
}

/// An agent process started from a prepared `Command` (in a chroot, with a lower descriptor
/// limit, with a private config...), its output collected through pipes (never a file the
/// agent could count as its own). SIGTERM (then SIGKILL) on drop.
pub struct AgentChild {
    child: Child,
    port: u16,
    output: std::sync::Arc<std::sync::Mutex<String>>,
}

impl AgentChild {
    /// Spawns `command` (an agent `run` listening on 127.0.0.1:`port`) and waits until the port
    /// accepts connections; panics with the output if it exits first or takes over 20 s.
    pub fn start(mut command: Command, port: u16) -> AgentChild {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        let output = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let sink = output.clone();
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(pipe).lines() {
                    let Ok(line) = line else { return };
                    let mut text = sink.lock().unwrap_or_else(|p| p.into_inner());
                    text.push_str(&line);
                    text.push('\n');
                }
            });
        }
        let mut agent = AgentChild {
            child,
            port,
            output,
        };
        agent.wait_listening();
        agent
    }

    fn wait_listening(&mut self) {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "the agent exited with {status} before listening:\n{}",
                    self.output()
                );
            }
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not listen on {addr} within 20 s:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything it printed so far.
    pub fn output(&self) -> String {
        self.output
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether it has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// A gRPC client presenting `identity`'s certificate from `pki` (mTLS), or plain text when
    /// `pki` is `None` (`--insecure`).
    pub async fn client(
        &self,
        pki: Option<&crate::Pki>,
        identity: &str,
        timeout: Duration,
    ) -> Result<
        quiesce_proto::agent::v1::agent_client::AgentClient<tonic::transport::Channel>,
        tonic::transport::Error,
    > {
        let endpoint = match pki {
            Some(pki) => {
                tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{}", self.port))?
                    .tls_config(
                        pki.tls(identity)
                            .client_config(crate::AGENT)
                            .expect("client TLS"),
                    )?
            }
            None => {
                tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", self.port))?
            }
        };
        let channel = endpoint
            .connect_timeout(timeout)
            .timeout(timeout)
            .connect()
            .await?;
        Ok(quiesce_proto::agent::v1::agent_client::AgentClient::new(
            channel,
        ))
    }
}

impl Drop for AgentChild {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
