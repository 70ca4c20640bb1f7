//! `quiesce-agent`: run the agent, check its config, or thaw by hand.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use quiesce_agent::config::Config;
use quiesce_agent::error::error_chain;
use quiesce_agent::freeze::FreezeManager;
use quiesce_agent::freezer::{Freezer, IoctlFreezer};
use quiesce_agent::guardian::Guardian;
use quiesce_agent::mounts::{MountTable, ProcMountTable};
use quiesce_agent::records::RecordStore;
use quiesce_agent::recovery::{self, Outcome};
use quiesce_agent::startup;
use quiesce_agent::volumes::AgentFiles;
use quiesce_proto::systemd;
use quiesce_proto::tls_reload::ReloadableServerTls;

/// Exit status for a bad config (EX_USAGE / EX_CONFIG convention: 64).
const EXIT_CONFIG: u8 = 64;

const DEFAULT_CONFIG: &str = "/etc/quiesce/agent.toml";

#[derive(Parser)]
#[command(
    name = "quiesce-agent",
    version,
    about = "Freezes this host's filesystems for a Quiesce coordinator, under a lease"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent.
    Run {
        #[arg(short, long, default_value = "/etc/quiesce/agent.toml")]
        config: PathBuf,
        /// Serve plain-text gRPC without mTLS (tests and demos only; logs a warning).
        #[arg(long)]
        insecure: bool,
        /// Log format on stderr.
        #[arg(long, default_value = "plain", value_parser = ["plain", "json"])]
        log_format: String,
    },
    /// Check the config and this host against it; report every problem at once (exit 64).
    CheckConfig {
        #[arg(short, long, default_value = "/etc/quiesce/agent.toml")]
        config: PathBuf,
        #[arg(long)]
        insecure: bool,
    },
    /// Emergency hatch, no network: thaw what the agent's record says it froze.
    Thaw {
        /// The agent's config, for its state directory (--all) [default: /etc/quiesce/agent.toml].
        /// Not read with --mount.
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Thaw every volume of every set in the freeze record.
        #[arg(long, conflicts_with = "mount", required_unless_present = "mount")]
        all: bool,
        /// Thaw this mount point even if no record names it (needs --force).
        #[arg(long, requires = "force")]
        mount: Option<PathBuf>,
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            config,
            insecure,
            log_format,
        } => {
            init_logging(&log_format);
            match run(&config, insecure) {
                Ok(code) => code,
                Err(err) => {
                    tracing::error!("{err:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::CheckConfig { config, insecure } => check_config(&config, insecure),
        Command::Thaw {
            config,
            all: _,
            mount,
            force: _,
        } => {
            init_logging("plain");
            let config = config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
            thaw(&config, mount.as_deref())
        }
    }
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("QUIESCE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("quiesce-agent: {}", error_chain(&e));
        ExitCode::from(EXIT_CONFIG)
    })
}

fn check_config(path: &Path, insecure: bool) -> ExitCode {
    let config = match load(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let report = startup::check(path, &config, insecure);
    if report.is_ok() {
        println!("{}: ok ({} volumes)", path.display(), config.volumes.len());
        ExitCode::SUCCESS
    } else {
        eprintln!("{}: {} problem(s):", path.display(), report.problems.len());
        for problem in &report.problems {
            eprintln!("  - {problem}");
        }
        ExitCode::from(EXIT_CONFIG)
    }
}

fn thaw(path: &Path, mount: Option<&Path>) -> ExitCode {
    let freezer = IoctlFreezer;
    if let Some(mount) = mount {
        let outcome = recovery::thaw_path(&freezer, &ProcMountTable::host(), mount);
        println!("{}: {:?}", mount.display(), outcome);
        return match outcome {
            Outcome::Failed(_) => ExitCode::FAILURE,
            _ => ExitCode::SUCCESS,
        };
    }
    let config = match load(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let store = RecordStore::new(&config.state_dir);
    match recovery::replay(&store, &freezer, &ProcMountTable::host()) {
        Ok(done) => {
            if done.is_empty() {
                println!("nothing recorded as frozen in {}", store.dir().display());
            }
            let mut failed = false;
            for item in &done {
                failed |= matches!(item.outcome, Outcome::Failed(_));
                println!("{} {}: {:?}", item.set_id, item.mount_point, item.outcome);
            }
            if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("cannot read {}: {e}", store.dir().display());
            ExitCode::FAILURE
        }
    }
}

fn run(path: &Path, insecure: bool) -> anyhow::Result<ExitCode> {
    let config = match load(path) {
        Ok(config) => config,
        Err(code) => return Ok(code),
    };
    // A missing state directory is made first, on tmpfs only (a missing one whose parent is
    // on tmpfs is what `check-config` accepts).
    match startup::ensure_state_dir(&config.state_dir) {
        Ok(true) => tracing::info!(
            state_dir = %config.state_dir.display(),
            "made the missing state directory (on tmpfs)"
        ),
        Ok(false) => {}
        Err(e) => tracing::error!("cannot make state-dir {}: {e}", config.state_dir.display()),
    }
    // Exactly what `check-config` refuses.
    let report = startup::check(path, &config, insecure);
    if !report.is_ok() {
        for problem in &report.problems {
            tracing::error!("config: {problem}");
        }
        return Ok(ExitCode::from(EXIT_CONFIG));
    }
    if insecure {
        tracing::warn!("--insecure: serving plain-text gRPC with no client authentication");
    }

    let freezer: Arc<dyn Freezer> = Arc::new(IoctlFreezer);
    let mounts: Arc<dyn MountTable> = Arc::new(ProcMountTable::host());
    let store = RecordStore::new(&config.state_dir);
    store
        .create_dir()
        .with_context(|| format!("creating {}", store.dir().display()))?;
    for item in recovery::replay(&store, freezer.as_ref(), mounts.as_ref())? {
        tracing::warn!(set_id = %item.set_id, mount = %item.mount_point, outcome = ?item.outcome, "recovered a freeze left by a previous agent");
    }

    // Before any thread exists: fork the guardian that thaws if this process dies.
    let guardian = Guardian::spawn(store.clone(), config.max_freeze.as_millis() as u64)
        .context("starting the guardian process")?;
    tracing::info!(pid = guardian.pid(), "guardian started");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let tls = match (insecure, &config.tls) {
            (false, Some(files)) => {
                Some(ReloadableServerTls::load(files).context("loading TLS files")?)
            }
            _ => None,
        };
        let listener = quiesce_agent::server::bind(config.listen)
            .with_context(|| format!("binding {}", config.listen))?;
        tracing::info!(listen = %listener.local_addr()?, volumes = config.volumes.len(), "agent ready");
        if let Some(addr) = config.metrics_listen {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(metrics) => {
                    tracing::info!(listen = %addr, "metrics on http://{addr}/metrics");
                    tokio::spawn(quiesce_agent::metrics::serve_http(
                        metrics,
                        std::future::pending(),
                    ));
                }
                Err(e) => tracing::warn!(listen = %addr, error = %e, "metrics endpoint not served"),
            }
        }
        let files = AgentFiles::discover(&config.state_dir);
        let manager = FreezeManager::new(
            Arc::new(config),
            freezer,
            mounts,
            files,
            Arc::new(guardian),
        );
        // The listener is bound (connections queue from here on) and the freeze record replayed.
        // SIGHUP's default action kills: take it over before systemd may send a reload.
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        notify_systemd("READY=1");
        tokio::spawn(reload_on_sighup(hup, tls.clone()));
        quiesce_agent::server::serve(manager, listener, tls, shutdown_signal()).await?;
        Ok(ExitCode::SUCCESS)
    })
}

/// Under systemd (`Type=notify`), says "ready" / "stopping"; elsewhere does nothing.
fn notify_systemd(state: &str) {
    if let Err(e) = systemd::notify(state) {
        tracing::warn!(error = %e, state, "cannot notify systemd");
    }
}

/// Certificate rotation: on SIGHUP re-read the TLS files. Files that fail any check leave the
/// running certificate in place; connections already open keep theirs.
async fn reload_on_sighup(
    mut hup: tokio::signal::unix::Signal,
    tls: Option<Arc<ReloadableServerTls>>,
) {
    while hup.recv().await.is_some() {
        let Some(tls) = &tls else {
            tracing::info!("SIGHUP: --insecure, no TLS files to reload");
            continue;
        };
        match tls.reload() {
            Ok(()) => {
                tracing::info!(cert = %tls.files().cert.display(), "SIGHUP: TLS files reloaded")
            }
            Err(e) => tracing::error!(
                "SIGHUP: TLS files not reloaded, previous certificate still served: {}",
                error_chain(&e)
            ),
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
    notify_systemd("STOPPING=1");
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// `thaw --mount` does not read the config: its usage must not show `--config` at all,
    /// let alone as required.
    #[test]
    fn thaw_usage_does_not_require_the_config() {
        let err = Cli::try_parse_from(["quiesce-agent", "thaw", "--mount", "/mnt/x"])
            .err()
            .expect("--mount without --force is refused");
        let text = err.render().to_string();
        assert!(text.contains("--force"), "{text}");
        assert!(!text.contains("--config"), "{text}");
        let mut thaw = Cli::command().find_subcommand("thaw").unwrap().clone();
        let usage = thaw.render_usage().to_string();
        assert!(!usage.contains("--config"), "{usage}");
        assert!(
            Cli::try_parse_from(["quiesce-agent", "thaw", "--mount", "/mnt/x", "--force"]).is_ok()
        );
    }
}
