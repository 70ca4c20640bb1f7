//! The real daemons as child processes ([`AgentProcess`], [`CoordinatorProcess`]), their
//! config tables, `quiescectl` ([`Ctl`]), and free ports.

use std::fs::{self, File};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use quiesce_proto::agent::v1::agent_client::AgentClient;
use tonic::transport::{Channel, Endpoint};

use crate::env::{bin, describe, run_with_timeout, toml_paths, toml_str};
use crate::in_process::AgentToml;
use crate::pki::{AGENT, COORDINATOR, OPERATOR, Pki};

/// A free TCP port on 127.0.0.1 (bound once and released).
pub fn free_port() -> u16 {
    free_port_on(Ipv4Addr::LOCALHOST)
}

/// A free TCP port on `ip` (bound once and released), e.g. 127.0.0.2 for a second host.
pub fn free_port_on(ip: impl Into<IpAddr>) -> u16 {
    let ip = ip.into();
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("bind {ip}:0: {e}"))
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
