//! `quiesce-writer FILE [--interval-ms N] [--fsync]`: a test writer.
//!
//! Appends one line to FILE every N ms (default 2), optionally `fdatasync`s it, and after each
//! write has returned prints `SEQ STARTED_NS DONE_NS` (Unix nanoseconds) on stdout, a pipe the
//! test reads. Stdout never touches the filesystem under test, so while that filesystem is
//! frozen the writer simply stops reporting: the test measures the write stall as the longest
//! gap between two reported completions, and the latency of the one write that was blocked.
//!
//! FILE is opened once, before anything is frozen. A write to a frozen filesystem blocks in
//! uninterruptible sleep; even SIGKILL takes effect only after the thaw, which is why this runs
//! in its own process and never on a test's thread.

use std::fs::OpenOptions;
use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut file = None;
    let mut interval = Duration::from_millis(2);
    let mut fsync = false;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--fsync" => fsync = true,
            "--interval-ms" => {
                let ms = args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
                    eprintln!("quiesce-writer: --interval-ms needs a number");
                    std::process::exit(2)
                });
                interval = Duration::from_millis(ms);
            }
            _ if file.is_none() => file = Some(arg),
            other => {
                eprintln!("quiesce-writer: unexpected argument {other:?}");
                std::process::exit(2);
            }
        }
    }
    let Some(path) = file else {
        eprintln!("usage: quiesce-writer FILE [--interval-ms N] [--fsync]");
        std::process::exit(2);
    };
    let mut target = match OpenOptions::new().create(true).append(true).open(&path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("quiesce-writer: cannot open {path}: {e}");
            std::process::exit(1);
        }
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for seq in 0u64.. {
        let started = unix_ns();
        let line = format!("{seq} {started}\n");
        if let Err(e) = target.write_all(line.as_bytes()) {
            eprintln!("quiesce-writer: write to {path}: {e}");
            std::process::exit(1);
        }
        if fsync && let Err(e) = target.sync_data() {
            eprintln!("quiesce-writer: fdatasync {path}: {e}");
            std::process::exit(1);
        }
        let done = unix_ns();
        // The test went away: stop.
        if writeln!(out, "{seq} {started} {done}").is_err() || out.flush().is_err() {
            return;
        }
        std::thread::sleep(interval);
    }
}
