//! `quiesce-coordinator`: the central daemon that sequences consistency groups.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use quiesce_coordinator::agent_client::GrpcAgents;
use quiesce_coordinator::catalog::Catalog;
use quiesce_coordinator::config::Config;
use quiesce_coordinator::error::error_chain;
use quiesce_coordinator::workflow::Coordinator;

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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let agents = GrpcAgents::new(&config.agents, tls.as_ref())?;
        let listen = config.listen;
        let coordinator = Coordinator::new(Arc::new(config), Arc::new(catalog), Arc::new(agents));
        let recovered = coordinator.recover().await?;
        if !recovered.is_empty() {
            tracing::warn!(
                ?recovered,
                "interrupted sets thawed, cleaned up and marked failed"
            );
        }
        let tracking = coordinator.resume_completion_tracking()?;
        if tracking > 0 {
            tracing::info!(sets = tracking, "tracking completion of committed sets");
        }
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        tracing::info!(listen = %listener.local_addr()?, "coordinator ready");
        quiesce_coordinator::server::serve(coordinator, listener, tls.as_ref(), shutdown_signal())
            .await?;
        Ok(ExitCode::SUCCESS)
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}
