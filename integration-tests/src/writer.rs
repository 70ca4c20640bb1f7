//! A writer process on a volume, and the write stalls it saw.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::env::writer_bin;
use crate::probes::proc_state;

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
