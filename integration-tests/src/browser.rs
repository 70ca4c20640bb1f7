//! Headless Chromium driven over the DevTools protocol, for tests of web pages.
//!
//! Chromium runs with `--remote-debugging-pipe`: it reads DevTools commands on fd 3 and writes
//! replies and events on fd 4, each message JSON ended by a NUL byte. No websocket, no port, no
//! crate: a pipe pair and `serde_json`. One page target is attached in flattened mode; the
//! test navigates it, evaluates JavaScript in it (DOM queries, clicks) and takes screenshots.
//!
//! Debian's `chromium` package; as root it needs `--no-sandbox`. The browser is killed on drop.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::env::find_tool;

/// The Chromium binary: `$QUIESCE_CHROMIUM`, else `chromium` (Debian) or `chromium-browser`.
pub fn chromium_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("QUIESCE_CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    find_tool("chromium").or_else(|| find_tool("chromium-browser"))
}

/// A pipe end moved above the standard and DevTools descriptors, close-on-exec.
fn high_fd(fd: OwnedFd) -> OwnedFd {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor we own returns a new one we then own.
    let raw = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
    assert!(
        raw >= 0,
        "fcntl(F_DUPFD_CLOEXEC): {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

pub struct Browser {
    child: Child,
    to_browser: File,
    from_browser: Receiver<Value>,
    next_id: u64,
    session: String,
    log: PathBuf,
}

impl Browser {
    /// Starts headless Chromium with its profile in `profile_dir` (created) and its stderr in
    /// `profile_dir/../chromium.log`, and attaches to a blank page of `width`×`height`.
    pub fn start(profile_dir: &Path, width: u32, height: u32) -> Browser {
        let binary = chromium_binary().expect("chromium is not installed");
        std::fs::create_dir_all(profile_dir).expect("create the browser profile directory");
        let log = profile_dir.with_extension("log");
        let log_file = File::create(&log).expect("create the browser log");
        let (cmd_read, cmd_write) = nix::unistd::pipe().expect("pipe");
        let (evt_read, evt_write) = nix::unistd::pipe().expect("pipe");
        let (cmd_read, evt_write) = (high_fd(cmd_read), high_fd(evt_write));
        let (child_in, child_out) = (cmd_read.as_raw_fd(), evt_write.as_raw_fd());
        let mut command = Command::new(&binary);
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--no-default-browser-check",
                "--hide-scrollbars",
                "--remote-debugging-pipe",
                &format!("--window-size={width},{height}"),
            ])
            .arg(format!("--user-data-dir={}", profile_dir.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_file.try_clone().expect("dup log")))
            .stderr(Stdio::from(log_file));
        // SAFETY: only async-signal-safe dup2 calls between fork and exec; the sources are
        // above fd 10, so neither overwrites the other.
        unsafe {
            command.pre_exec(move || {
                if libc::dup2(child_in, 3) < 0 || libc::dup2(child_out, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        drop((cmd_read, evt_write));
        let to_browser = File::from(cmd_write);
        let (tx, from_browser) = channel();
        let reader = File::from(evt_read);
        std::thread::spawn(move || {
            let mut reader = BufReader::new(reader);
            loop {
                let mut message = Vec::new();
                match reader.read_until(0, &mut message) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        if message.last() == Some(&0) {
                            message.pop();
                        }
                        if let Ok(value) = serde_json::from_slice::<Value>(&message)
                            && tx.send(value).is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
        let mut browser = Browser {
            child,
            to_browser,
            from_browser,
            next_id: 0,
            session: String::new(),
            log,
        };
        let target = browser.call("Target.createTarget", json!({ "url": "about:blank" }));
        let target_id = target["targetId"].as_str().expect("targetId").to_owned();
        let attached = browser.call(
            "Target.attachToTarget",
            json!({ "targetId": target_id, "flatten": true }),
        );
        browser.session = attached["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_owned();
        browser.call("Page.enable", json!({}));
        browser.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        );
        browser
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends one DevTools command (to the page once attached) and returns its `result`;
    /// panics on an error reply or no reply within 30 s.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        match self.try_call(method, params) {
            Ok(result) => result,
            Err(e) => panic!("{method}: {e}\n--- chromium log\n{}", self.log_text()),
        }
    }

    /// As [`Browser::call`], returning the error reply instead of panicking on it.
    pub fn try_call(&mut self, method: &str, params: Value) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            message["sessionId"] = Value::String(self.session.clone());
        }
        let mut bytes = serde_json::to_vec(&message).expect("encode");
        bytes.push(0);
        self.to_browser
            .write_all(&bytes)
            .map_err(|e| format!("cannot write to chromium: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.from_browser.recv_timeout(left) {
                Ok(reply) if reply["id"].as_u64() == Some(id) => {
                    return match reply.get("error") {
                        Some(error) => Err(error.to_string()),
                        None => Ok(reply["result"].clone()),
                    };
                }
                Ok(_event) => continue,
                Err(RecvTimeoutError::Timeout) => return Err("no reply within 30 s".into()),
                Err(RecvTimeoutError::Disconnected) => {
                    return Err("chromium closed its DevTools pipe".into());
                }
            }
        }
    }

    /// Evaluates `expression` in the page (promises awaited) and returns its value as JSON.
    /// `Err` for an exception or a page being replaced (retry after navigation).
    pub fn try_eval(&mut self, expression: &str) -> Result<Value, String> {
        let result = self.try_call(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
        )?;
        if let Some(details) = result.get("exceptionDetails") {
            return Err(format!("{expression}: {details}"));
        }
        Ok(result["result"]["value"].clone())
    }

    pub fn eval(&mut self, expression: &str) -> Value {
        match self.try_eval(expression) {
            Ok(value) => value,
            Err(e) => panic!("evaluate: {e}"),
        }
    }

    /// Evaluates `expression` until it returns `true` (errors while a page loads are retried);
    /// panics after `timeout` with what `describe` evaluates to then.
    pub fn wait_for(&mut self, expression: &str, timeout: Duration, describe: &str) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Value::Bool(true)) = self.try_eval(expression) {
                return;
            }
            if Instant::now() > deadline {
                let now = self.try_eval(describe);
                panic!(
                    "page never satisfied {expression} within {timeout:?}; {describe} = {now:?}"
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Loads `url` and waits until the document is complete at that address.
    pub fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url }));
        let expected = serde_json::to_string(url).expect("encode");
        self.wait_for(
            &format!("document.readyState === 'complete' && location.href === {expected}"),
            Duration::from_secs(20),
            "location.href + ' ' + document.readyState",
        );
    }

    /// A PNG of the whole page (beyond the viewport), written to `path`.
    pub fn screenshot(&mut self, path: &Path) {
        let metrics = self.call("Page.getLayoutMetrics", json!({}));
        let size = &metrics["cssContentSize"];
        let width = size["width"].as_f64().unwrap_or(1280.0).ceil();
        let height = size["height"].as_f64().unwrap_or(900.0).ceil();
        let shot = self.call(
            "Page.captureScreenshot",
            json!({
                "format": "png",
                "captureBeyondViewport": true,
                "clip": { "x": 0, "y": 0, "width": width, "height": height, "scale": 1 },
            }),
        );
        let data = shot["data"].as_str().expect("screenshot data");
        let png = base64_decode(data).expect("screenshot is base64");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("create the screenshot directory");
        }
        std::fs::write(path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Standard base64 (with padding), as DevTools encodes binary data.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let bytes: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for chunk in bytes.chunks(4) {
        let pad = chunk.iter().rev().take_while(|b| **b == b'=').count();
        if pad > 2 {
            return None;
        }
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            let v = if i >= 4 - pad { 0 } else { value(*c)? };
            n = n << 6 | v;
        }
        let decoded = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&decoded[..3 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::base64_decode;

    #[test]
    fn base64_round_trips_known_values() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGk=").unwrap(), b"hi");
        assert_eq!(base64_decode("YWJj").unwrap(), b"abc");
        assert!(base64_decode("abc").is_none());
        assert!(base64_decode("a*==").is_none());
    }
}
