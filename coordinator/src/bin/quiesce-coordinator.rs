//! `quiesce-coordinator`: the central daemon that sequences consistency groups.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use quiesce_coordinator::catalog::Catalog;
use quiesce_coordinator::config::Config;
use quiesce_coordinator::error::error_chain;
use quiesce_coordinator::reload::ReloadableAgents;
use quiesce_coordinator::workflow::Coordinator;
use quiesce_proto::systemd;
use quiesce_proto::tls_reload::ReloadableServerTls;

/// How often the coordinator checks that it reaches every agent (metric quiesce_agent_reachable).
const AGENT_PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// Exit status for a bad config.
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "quiesce-coordinator",
    version,
    about = "Takes application-consistent snapshots of consistency groups across Quiesce agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the coordinator.
    Run {
        #[arg(short, long, default_value = "/etc/quiesce/coordinator.toml")]
        config: PathBuf,
        /// Plain-text gRPC on both sides, no client authentication (tests and demos only).
        #[arg(long)]
        insecure: bool,
        #[arg(long, default_value = "plain", value_parser = ["plain", "json"])]
        log_format: String,
    },
    /// Check the config; report every problem at once (exit 64).
    CheckConfig {
        #[arg(short, long, default_value = "/etc/quiesce/coordinator.toml")]
        config: PathBuf,
        #[arg(long)]
        insecure: bool,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
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
        Command::CheckConfig { config, insecure } => match load(&config, insecure) {
            Ok(config_ok) => {
                println!(
                    "{}: ok ({} agents, {} groups)",
                    config.display(),
                    config_ok.agents.len(),
                    config_ok.groups.len()
                );
                if config_ok.grants.is_empty() {
                    eprintln!(
                        "warning: no [[grant]]: every operator certificate may back up, restore and delete on every group"
                    );
                }
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
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

/// Loads and checks the config, printing every problem.
fn load(path: &Path, insecure: bool) -> Result<Config, ExitCode> {
    let config = Config::load(path).map_err(|e| {
        eprintln!("quiesce-coordinator: {}", error_chain(&e));
        ExitCode::from(EXIT_CONFIG)
    })?;
    let problems = config.problems(insecure);
    if problems.is_empty() {
        return Ok(config);
    }
    eprintln!("{}: {} problem(s):", path.display(), problems.len());
    for problem in &problems {
        eprintln!("  - {problem}");
    }
    Err(ExitCode::from(EXIT_CONFIG))
}

fn run(path: &Path, insecure: bool) -> anyhow::Result<ExitCode> {
    let config = match load(path, insecure) {
        Ok(config) => config,
        Err(code) => return Ok(code),
    };
    if insecure {
        tracing::warn!("--insecure: plain-text gRPC to agents and operators, no authentication");
    }
    let tls = if insecure { None } else { config.tls.clone() };
    let catalog = Catalog::open(&config.catalog)
        .with_context(|| format!("opening catalog {}", config.catalog.display()))?;
    quiesce_coordinator::audit::check_file(&config.audit).context("[audit] file")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let server_tls = match &tls {
            Some(files) => Some(ReloadableServerTls::load(files).context("loading TLS files")?),
            None => None,
        };
        let agents = Arc::new(ReloadableAgents::new(&config.agents, tls.as_ref())?);
        let listen = config.listen;
        let coordinator = Coordinator::new(Arc::new(config), Arc::new(catalog), agents.clone());
        let recovered = coordinator.recover().await?;
        if !recovered.is_empty() {
            tracing::warn!(
                ?recovered,
                "interrupted sets thawed, cleaned up and marked failed"
            );
        }
        if let Some(addr) = coordinator.config().metrics_listen {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(metrics) => {
                    tracing::info!(listen = %addr, "metrics on http://{addr}/metrics");
                    let c = coordinator.clone();
                    tokio::spawn(quiesce_coordinator::metrics::serve_http(
                        metrics,
                        move || c.render_metrics(),
                        std::future::pending(),
                    ));
                    // quiesce_agent_reachable: every agent asked for its host info now and
                    // every AGENT_PROBE_INTERVAL (agents are also recorded whenever an
                    // operator lists them).
                    let c = coordinator.clone();
                    tokio::spawn(async move {
                        loop {
                            c.agent_statuses().await;
                            tokio::time::sleep(AGENT_PROBE_INTERVAL).await;
                        }
                    });
                }
                Err(e) => tracing::warn!(listen = %addr, error = %e, "metrics endpoint not served"),
            }
        }
        tokio::spawn(coordinator.clone().run_schedules(std::future::pending()));
        // Leftovers of failed and deleted sets (persisted in the catalog), retried until each
        // agent answers.
        tokio::spawn(coordinator.clone().run_reconciler(std::future::pending()));
        let tracking = coordinator.resume_completion_tracking()?;
        if tracking > 0 {
            tracing::info!(sets = tracking, "tracking completion of committed sets");
        }
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        tracing::info!(listen = %listener.local_addr()?, "coordinator ready");
        // SIGHUP's default action kills: take it over before systemd may send a reload.
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        notify_systemd("READY=1");
        tokio::spawn(reload_on_sighup(hup, server_tls.clone(), agents));
        quiesce_coordinator::server::serve(
            coordinator.clone(),
            listener,
            server_tls,
            shutdown_signal(),
        )
        .await?;
        // Let running sets finish (each phase is bounded by its deadline), so that shutdown
        // does not leave them for recovery.
        let running = coordinator.drain(std::time::Duration::from_secs(60)).await;
        tracing::info!(running, "coordinator stopped");
        Ok(ExitCode::SUCCESS)
    })
}

/// Under systemd (`Type=notify`), says "ready" / "stopping"; elsewhere does nothing.
fn notify_systemd(state: &str) {
    if let Err(e) = systemd::notify(state) {
        tracing::warn!(error = %e, state, "cannot notify systemd");
    }
}

/// Certificate rotation: on SIGHUP re-read the TLS files, for the operator API and for the
/// channels to agents. Files that fail any check leave the running certificates in place.
async fn reload_on_sighup(
    mut hup: tokio::signal::unix::Signal,
    server: Option<Arc<ReloadableServerTls>>,
    agents: Arc<ReloadableAgents>,
) {
    while hup.recv().await.is_some() {
        let Some(server) = &server else {
            tracing::info!("SIGHUP: --insecure, no TLS files to reload");
            continue;
        };
        let cert = server.files().cert.display().to_string();
        match server.reload() {
            Ok(()) => match agents.reload() {
                Ok(()) => tracing::info!(%cert, "SIGHUP: TLS files reloaded"),
                Err(e) => tracing::error!(
                    "SIGHUP: operator API reloaded, but the agents' channels keep the previous certificate: {}",
                    error_chain(&e)
                ),
            },
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
