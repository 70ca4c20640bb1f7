//! The machine a test runs on: the one skip policy ([`require`]), test serialisation, where
//! the binaries are, system tools and command runners, and TOML text for configs.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Something a test needs from the machine it runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need<'a> {
    /// Effective uid 0.
    Root,
    /// `/dev/loop-control`, to make loop devices.
    LoopDevices,
    /// A program: a bare name is searched in `$PATH` and the sbin directories, a path must exist.
    Tool(&'a str),
    /// python3 with `moto[server]` (the EC2 emulator; `scripts/test` installs it).
    Moto,
}

/// What a root test needs: root, loop devices and the tools that make, freeze and thaw them.
pub const ROOT: &[Need<'static>] = &[
    Need::Root,
    Need::LoopDevices,
    Need::Tool("losetup"),
    Need::Tool("mount"),
    Need::Tool("umount"),
    Need::Tool("mkfs.ext4"),
    Need::Tool("fsfreeze"),
];

impl Need<'_> {
    /// `None` when the machine has it, else why not.
    fn missing(&self) -> Option<String> {
        match self {
            Need::Root if !is_root() => Some("not running as root".into()),
            Need::LoopDevices if !Path::new("/dev/loop-control").exists() => {
                Some("no /dev/loop-control".into())
            }
            Need::Tool(tool) if tool.contains('/') && !Path::new(tool).exists() => {
                Some(format!("{tool} does not exist"))
            }
            Need::Tool(tool) if !tool.contains('/') && find_tool(tool).is_none() => {
                Some(format!("{tool} is not installed"))
            }
            Need::Moto if !moto_installed() => Some(
                "python3 with moto[server] is not installed (pip install 'moto[server]')".into(),
            ),
            _ => None,
        }
    }
}

fn moto_installed() -> bool {
    Command::new("python3")
        .args(["-c", "import moto.server"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The one skip policy of the integration tests: a test whose machine lacks what it `needs`
/// **fails** here, naming the test and everything missing — with or without `CI` set. No test
/// passes by returning early: `scripts/test` and CI run as root with every tool installed, and
/// a machine that cannot run these tests leaves the crate out
/// (`cargo test --workspace --exclude quiesce-integration-tests`).
pub fn require(needs: &[Need<'_>]) {
    let missing: Vec<String> = needs.iter().filter_map(Need::missing).collect();
    if missing.is_empty() {
        return;
    }
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("this test");
    panic!(
        "{test} cannot run on this machine: {}. The integration tests need root, loop devices \
         and the tools scripts/test installs; leave them out with \
         `cargo test --workspace --exclude quiesce-integration-tests`",
        missing.join("; ")
    );
}

/// [`require`]s what a root test needs ([`ROOT`]). Returns `true` so that the historical
/// `if !require_root() { return; }` keeps compiling; it never returns `false`: it fails.
pub fn require_root() -> bool {
    require(ROOT);
    true
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

/// `program args…` to completion (found in `$PATH`); panics with its output unless it
/// succeeds. Returns stdout.
pub fn sh(program: &str, args: &[&str]) -> String {
    check(Command::new(program).args(args))
}

/// Runs `cmd`, ignoring its output and exit status (clean-up paths). `true` on success.
pub fn quiet(cmd: &mut Command) -> bool {
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
