//! What a frozen filesystem does to the processes using it.

use std::fs;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::env::tool;

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
