//! `quiescectl`: the operator's CLI for the coordinator.
//!
//! Exit status: 0 success (for `backup`: the set is consistent), 1 the operation failed or the
//! set is not consistent — including an agent's refusal or an agent the coordinator cannot
//! reach —, 2 usage errors (clap), 3 cannot reach or authenticate to the coordinator.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand};
use quiesce_coordinator::pki::{self, PkiCommand};
use quiesce_proto::coordinator::v1 as pb;
use quiesce_proto::coordinator::v1::coordinator_client::CoordinatorClient;
use quiesce_proto::states::StateText;
use quiesce_proto::tls::TlsFiles;
use tonic::transport::{Channel, Endpoint};

#[path = "quiescectl/dashboard/mod.rs"]
mod dashboard;

const EXIT_FAILED: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_UNREACHABLE: u8 = 3;

#[derive(Parser)]
#[command(
    name = "quiescectl",
    version,
    about = "Operate a Quiesce coordinator: backups, sets, restores, agents"
)]
struct Cli {
    #[command(flatten)]
    conn: Connection,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Connection {
    /// Coordinator API endpoint.
    #[arg(
        long,
        env = "QUIESCECTL_ENDPOINT",
        default_value = "https://127.0.0.1:7400",
        global = true
    )]
    endpoint: String,
    /// CA certificate that signed the coordinator's certificate.
    #[arg(long, env = "QUIESCECTL_CA", global = true)]
    ca: Option<PathBuf>,
    /// Operator certificate (role operator).
    #[arg(long, env = "QUIESCECTL_CERT", global = true)]
    cert: Option<PathBuf>,
    #[arg(long, env = "QUIESCECTL_KEY", global = true)]
    key: Option<PathBuf>,
    /// Name in the coordinator's certificate.
    #[arg(
        long,
        env = "QUIESCECTL_SERVER_NAME",
        default_value = "coordinator",
        global = true
    )]
    server_name: String,
    /// Plain-text gRPC (only against a coordinator run with --insecure).
    #[arg(long, global = true)]
    insecure: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Take a snapshot set of GROUP. Waits and shows progress; exits 0 only when consistent.
    Backup {
        group: String,
        /// Print the set id and return at once.
        #[arg(long)]
        no_wait: bool,
        /// EBS: after the set is consistent, wait until every snapshot is completed (a
        /// progress bar on stderr); exits non-zero if one ends in error.
        #[arg(long, conflicts_with = "no_wait")]
        wait_complete: bool,
    },
    /// Snapshot sets in the catalog.
    #[command(subcommand)]
    Sets(SetsCommand),
    /// Restore a consistent set: new images on each member host (reflink), or new EBS volumes.
    Restore {
        set: String,
        /// Reflink: directory on each member host that receives the restored images.
        #[arg(long)]
        target_dir: Option<String>,
        /// EBS: availability zone of the new volumes.
        #[arg(long)]
        availability_zone: Option<String>,
        /// EBS: type of the new volumes (default gp3).
        #[arg(long)]
        volume_type: Option<String>,
        /// EBS: attach the new volumes to this instance, in the original device order.
        /// Without it, the attachment plan is printed.
        #[arg(long)]
        attach: Option<String>,
    },
    /// The audit log: every API call (allowed or denied) and what the coordinator did by
    /// itself, oldest first. `audit verify` checks its hash chain.
    #[command(args_conflicts_with_subcommands = true)]
    Audit {
        #[command(subcommand)]
        check: Option<AuditCommand>,
        /// Only the records of this group.
        #[arg(long)]
        group: Option<String>,
        /// Only records since: an RFC 3339 time (2026-12-01T00:00:00Z) or a duration ago (1h, 7d).
        #[arg(long)]
        since: Option<String>,
        /// The newest N records (the coordinator sends at most 5000 per call).
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Restore drill: restore a consistent set on one member host into scratch space, start
    /// the databases its hooks name on the copies, run their checks (recovery, pg_amcheck
    /// --heapallindexed, PRAGMA integrity_check, the operator's probe), tear everything down
    /// and record the outcome with the set. Exits 0 only when the drill passed.
    Verify {
        set: String,
        /// The member agent whose snapshots are checked (needed when the set has several).
        #[arg(long)]
        host: Option<String>,
        /// Scratch directory on that host (default: `.quiesce-verify` beside the agent's
        /// snapshot directory, so the copies are reflink clones). Never a group volume.
        #[arg(long)]
        scratch_dir: Option<String>,
    },
    /// Agents: reachability, volumes and what they hold frozen.
    Agents,
    /// Groups: members, running set, last consistent set.
    Groups,
    /// Serve a local web dashboard (groups, sets, agents, "back up now") that talks to the
    /// coordinator with this operator's credentials. Loopback only.
    Dashboard {
        /// Where the dashboard listens (a loopback address; port 0 picks a free one).
        #[arg(long, default_value = "127.0.0.1:8740")]
        listen: std::net::SocketAddr,
    },
    /// Make a CA and certificates for coordinators, agents and operators (local, no server).
    #[command(subcommand)]
    Pki(PkiCommand),
}

#[derive(Subcommand)]
enum SetsCommand {
    /// List sets, newest first.
    List {
        #[arg(long)]
        group: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Show one set with its hosts, volumes and phases.
    Show { set: String },
    /// Delete a finished set and its snapshots.
    Delete {
        set: String,
        /// Approve the early delete of a locked set (admins). It is deleted once two
        /// different admins approved it within the group's approval window.
        #[arg(long)]
        approve: bool,
    },
    /// PostgreSQL backup mode: write a set's backup_label (and tablespace_map) into a restored
    /// data directory, as pg_backup_stop() returned them. Refuses to overwrite.
    BackupLabel {
        set: String,
        /// The hook that recorded the label (a member's PostgreSQL hook).
        #[arg(long)]
        hook: String,
        /// The member agent; needed only when several members have a hook of that name.
        #[arg(long)]
        agent: Option<String>,
        /// The restored PostgreSQL data directory (on the host where this runs).
        #[arg(long)]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the audit log's hash chain; exits 1 naming the first record that does not fit.
    Verify,
}

/// `quiescectl pki …` parses on its own: it is local and takes none of the connection options
/// (so its `--help` does not list them).
#[derive(Parser)]
#[command(
    name = "quiescectl pki",
    about = "Make a CA and certificates for coordinators, agents and operators (local, no server)"
)]
struct PkiCli {
    #[command(subcommand)]
    command: PkiCommand,
}

fn main() -> ExitCode {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let pki_command = if args.get(1).is_some_and(|a| a == "pki") {
        args.drain(..2);
        Some(PkiCli::parse_from(std::iter::once("quiescectl pki".into()).chain(args)).command)
    } else {
        let cli = Cli::parse();
        match cli.command {
            Command::Pki(cmd) => Some(cmd),
            command => return connect_and_run(cli.conn, command, cli.json),
        }
    };
    if let Some(cmd) = pki_command {
        return match pki::run(cmd) {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("quiescectl: {}", chain(&e));
                ExitCode::from(EXIT_FAILED)
            }
        };
    }
    ExitCode::SUCCESS
}

fn connect_and_run(conn: Connection, command: Command, json: bool) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("quiescectl: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    runtime.block_on(async move {
        let client = match connect(&conn).await {
            Ok(client) => client,
            Err(message) => {
                eprintln!("quiescectl: {message}");
                return ExitCode::from(EXIT_UNREACHABLE);
            }
        };
        if let Command::Dashboard { listen } = command {
            return run_dashboard(client, listen).await;
        }
        match run(client, command, json).await {
            Ok(code) => code,
            Err(status) => {
                let message = status_message(&status);
                match failure_kind(&status) {
                    Failure::Refused => {
                        eprintln!("quiescectl: the coordinator refused this client: {message}");
                        ExitCode::from(EXIT_UNREACHABLE)
                    }
                    Failure::Transport => {
                        eprintln!(
                            "quiescectl: the connection to the coordinator failed (unreachable, or it rejected this client's TLS certificate): {message}"
                        );
                        ExitCode::from(EXIT_UNREACHABLE)
                    }
                    Failure::Request => {
                        eprintln!("quiescectl: {message}");
                        ExitCode::from(EXIT_FAILED)
                    }
                }
            }
        }
    })
}

/// Checks that the coordinator answers this operator, then serves the dashboard.
async fn run_dashboard(
    mut client: CoordinatorClient<Channel>,
    listen: std::net::SocketAddr,
) -> ExitCode {
    if let Err(message) = dashboard::check_listen(listen) {
        eprintln!("quiescectl: {message}");
        return ExitCode::from(EXIT_FAILED);
    }
    match client.get_permissions(pb::GetPermissionsRequest {}).await {
        Ok(reply) => {
            let reply = reply.into_inner();
            if !reply.identity.is_empty() {
                eprintln!(
                    "quiescectl: the coordinator knows you as {}",
                    reply.identity
                );
            }
        }
        Err(status) => {
            eprintln!(
                "quiescectl: the coordinator did not answer this operator: {}",
                status_message(&status)
            );
            return ExitCode::from(EXIT_UNREACHABLE);
        }
    }
    match dashboard::serve(client, listen).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("quiescectl: {message}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

enum Failure {
    /// The coordinator answered: these credentials are not an operator's.
    Refused,
    /// No answer at the gRPC level: the connection failed or was closed. Under TLS 1.3 a
    /// client certificate the server rejects shows up here, on the first call.
    Transport,
    /// The coordinator answered with an error about the request itself.
    Request,
}

/// A status made on this side of the connection (tonic attaches the transport error as its
/// source) is a transport failure; one the coordinator sent is its answer. So an agent the
/// coordinator could not reach, or an agent's refusal, is an operation failure (exit 1), not a
/// connection failure (exit 3).
fn failure_kind(status: &tonic::Status) -> Failure {
    let local = std::error::Error::source(status).is_some();
    match status.code() {
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => Failure::Refused,
        _ if local => Failure::Transport,
        _ => Failure::Request,
    }
}

fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

fn status_message(status: &tonic::Status) -> String {
    let message = status.message();
    if message.is_empty() {
        format!("{:?}", status.code())
    } else if matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    ) && let Some(source) = std::error::Error::source(status)
    {
        format!("{message}: {}", chain(source))
    } else {
        message.to_owned()
    }
}

async fn connect(conn: &Connection) -> Result<CoordinatorClient<Channel>, String> {
    let mut endpoint = Endpoint::from_shared(conn.endpoint.clone())
        .map_err(|e| format!("invalid endpoint {}: {e}", conn.endpoint))?
        .connect_timeout(Duration::from_secs(5));
    if !conn.insecure {
        let (Some(ca), Some(cert), Some(key)) = (&conn.ca, &conn.cert, &conn.key) else {
            return Err(
                "mTLS needs --ca, --cert and --key (or QUIESCECTL_CA/_CERT/_KEY); --insecure for plain text"
                    .into(),
            );
        };
        let files = TlsFiles {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        };
        let tls = files
            .client_config(&conn.server_name)
            .map_err(|e| chain(&e))?;
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| format!("TLS setup: {}", chain(&e)))?;
    }
    endpoint
        .connect()
        .await
        .map(CoordinatorClient::new)
        .map_err(|e| {
            format!(
                "cannot reach the coordinator at {}: {}",
                conn.endpoint,
                chain(&e)
            )
        })
}

async fn run(
    mut client: CoordinatorClient<Channel>,
    command: Command,
    json: bool,
) -> Result<ExitCode, tonic::Status> {
    match command {
        Command::Backup {
            group,
            no_wait,
            wait_complete,
        } => {
            let set_id = client
                .create_set(pb::CreateSetRequest { group })
                .await?
                .into_inner()
                .set_id;
            if no_wait {
                println!("{set_id}");
                return Ok(ExitCode::SUCCESS);
            }
            let mut set = wait_for(&mut client, &set_id).await?;
            if wait_complete
                && set.state() == pb::SetState::Consistent
                && set.completion() == pb::Completion::Pending
            {
                set = wait_complete_for(&mut client, &set_id).await?;
            }
            if json {
                print_json(&set);
            } else {
                print_set(&set);
            }
            Ok(if set.state() == pb::SetState::Consistent {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "quiescectl: set {} is {}: {}",
                    set.id,
                    set.state(),
                    set.error
                );
                ExitCode::from(EXIT_FAILED)
            })
        }
        Command::Verify {
            set,
            host,
            scratch_dir,
        } => {
            let reply = client
                .verify_set(pb::VerifySetRequest {
                    set_id: set.clone(),
                    host: host.unwrap_or_default(),
                    scratch_dir: scratch_dir.unwrap_or_default(),
                })
                .await?
                .into_inner();
            let verification = reply.verification.clone().unwrap_or_default();
            if json {
                print_json(&reply);
            } else {
                println!("verify set {set} on {}:", verification.agent);
                print_verification(&verification);
            }
            Ok(if verification.outcome() == pb::VerifyOutcome::Passed {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "quiescectl: set {set}: restore drill {}",
                    outcome_text(verification.outcome())
                );
                ExitCode::from(EXIT_FAILED)
            })
        }
        Command::Sets(SetsCommand::List { group, limit }) => {
            let sets = client
                .list_sets(pb::ListSetsRequest {
                    group: group.unwrap_or_default(),
                    limit,
                })
                .await?
                .into_inner();
            if json {
                print_json(&sets);
            } else {
                print_sets(&sets.sets);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Sets(SetsCommand::Show { set }) => {
            let set = get_set(&mut client, &set).await?;
            if json {
                print_json(&set);
            } else {
                print_set(&set);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Sets(SetsCommand::BackupLabel {
            set,
            hook,
            agent,
            data_dir,
        }) => {
            let set = get_set(&mut client, &set).await?;
            match write_backup_label(&set, &hook, agent.as_deref(), &data_dir) {
                Ok(written) => {
                    for path in written {
                        println!("wrote {}", path.display());
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(message) => {
                    eprintln!("quiescectl: {message}");
                    Ok(ExitCode::from(EXIT_FAILED))
                }
            }
        }
        Command::Sets(SetsCommand::Delete { set, approve }) => {
            let reply = client
                .delete_set(pb::DeleteSetRequest {
                    set_id: set.clone(),
                    approve,
                })
                .await?
                .into_inner();
            if approve && reply.approvals.len() < 2 {
                // Recorded; the set stays until a second admin approves.
                if json {
                    print_json(&reply);
                } else {
                    let who: Vec<&str> = reply
                        .approvals
                        .iter()
                        .map(|a| a.identity.as_str())
                        .collect();
                    println!(
                        "set {set}: early delete approved by {}; it is deleted when a second admin runs: quiescectl sets delete {} --approve",
                        who.join(", "),
                        quiesce_coordinator::shell::quote(&set)
                    );
                }
                return Ok(ExitCode::SUCCESS);
            }
            if json {
                print_json(&reply);
            } else {
                print_removal(&set, &reply);
            }
            Ok(if reply.forgotten {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "quiescectl: set {set}: not everything could be removed yet; the coordinator retries and forgets the set when nothing of it is left (see `quiescectl sets show {set}`)"
                );
                ExitCode::from(EXIT_FAILED)
            })
        }
        Command::Audit {
            check: Some(AuditCommand::Verify),
            ..
        } => {
            let report = client
                .verify_audit(pb::VerifyAuditRequest {})
                .await?
                .into_inner();
            if json {
                print_json(&report);
            } else if report.intact {
                println!(
                    "audit log intact: {} records (seq {}–{})",
                    report.records, report.first_seq, report.last_seq
                );
            } else {
                println!(
                    "audit log BROKEN at record {}: {}",
                    report.broken_seq, report.problem
                );
            }
            Ok(if report.intact {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_FAILED)
            })
        }
        Command::Audit {
            check: None,
            group,
            since,
            limit,
        } => {
            let since_ms = match since.as_deref().map(parse_since).transpose() {
                Ok(since) => since.unwrap_or(0),
                Err(message) => {
                    eprintln!("quiescectl: --since: {message}");
                    return Ok(ExitCode::from(EXIT_USAGE));
                }
            };
            let reply = client
                .list_audit(pb::ListAuditRequest {
                    group: group.unwrap_or_default(),
                    since_ms,
                    limit,
                })
                .await?
                .into_inner();
            if json {
                print_json(&reply);
            } else {
                print_audit(&reply.records);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Restore {
            set,
            target_dir,
            availability_zone,
            volume_type,
            attach,
        } => {
            let reply = client
                .restore_set(pb::RestoreSetRequest {
                    set_id: set.clone(),
                    target_dir: target_dir.unwrap_or_default(),
                    availability_zone: availability_zone.unwrap_or_default(),
                    volume_type: volume_type.unwrap_or_default(),
                    attach_instance: attach.unwrap_or_default(),
                })
                .await?
                .into_inner();
            if json {
                print_json(&reply);
            } else {
                println!("restored set {set}:");
                if reply.volumes.iter().any(|v| !v.volume_id.is_empty()) {
                    let rows = reply
                        .volumes
                        .iter()
                        .map(|v| {
                            vec![
                                v.agent.clone(),
                                v.mount_point.clone(),
                                v.snapshot_id.clone(),
                                v.volume_id.clone(),
                                v.device.clone(),
                                if v.attached { "attached" } else { "-" }.into(),
                            ]
                        })
                        .collect();
                    table(
                        &[
                            "HOST",
                            "MOUNT",
                            "SNAPSHOT",
                            "NEW VOLUME",
                            "DEVICE",
                            "ATTACHED",
                        ],
                        rows,
                    );
                    println!("\nattachment plan (original device order):");
                    for v in &reply.volumes {
                        println!("  [{}] {}", v.agent, v.attach_hint);
                    }
                    return Ok(ExitCode::SUCCESS);
                }
                let rows = reply
                    .volumes
                    .iter()
                    .map(|v| {
                        vec![
                            v.agent.clone(),
                            v.mount_point.clone(),
                            v.image_path.clone(),
                            if v.cloned { "reflink" } else { "copy" }.into(),
                        ]
                    })
                    .collect();
                table(&["AGENT", "MOUNT", "IMAGE", "HOW"], rows);
                println!("\nattach on each host:");
                for v in &reply.volumes {
                    println!("  [{}] {}", v.agent, v.attach_hint);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Agents => {
            let reply = client
                .list_agents(pb::ListAgentsRequest {})
                .await?
                .into_inner();
            if json {
                print_json(&reply);
            } else {
                let mut rows = Vec::new();
                for a in &reply.agents {
                    let state = if a.reachable {
                        "reachable".to_string()
                    } else {
                        format!("UNREACHABLE: {}", a.error)
                    };
                    let frozen = if a.frozen_sets.is_empty() {
                        "-".to_string()
                    } else {
                        a.frozen_sets.join(",")
                    };
                    rows.push(vec![
                        a.name.clone(),
                        a.endpoint.clone(),
                        state,
                        a.hostname.clone(),
                        a.agent_version.clone(),
                        frozen,
                    ]);
                }
                table(
                    &["AGENT", "ENDPOINT", "STATE", "HOST", "VERSION", "FROZEN"],
                    rows,
                );
                let pending: Vec<pb::PendingRemoval> = reply
                    .agents
                    .iter()
                    .flat_map(|a| a.pending_removals.iter().cloned())
                    .collect();
                if !pending.is_empty() {
                    println!();
                    print_pending(&pending);
                }
                for a in reply.agents.iter().filter(|a| a.reachable) {
                    println!();
                    let rows = a
                        .volumes
                        .iter()
                        .map(|v| {
                            vec![
                                v.mount_point.clone(),
                                dash(&v.fs_type),
                                dash(&v.device),
                                dash(&v.backing_file),
                                dash(&v.frozen_by),
                                dash(&v.problem),
                            ]
                        })
                        .collect();
                    println!("{}:", a.name);
                    if !a.instance_id.is_empty() {
                        println!("  EC2 instance {}", a.instance_id);
                    }
                    if a.volumes.iter().any(|v| !v.ebs_volume_id.is_empty()) {
                        let ebs_rows = a
                            .volumes
                            .iter()
                            .map(|v| {
                                vec![
                                    v.mount_point.clone(),
                                    dash(&v.ebs_volume_id),
                                    dash(&v.ebs_problem),
                                ]
                            })
                            .collect();
                        table(&["MOUNT", "EBS VOLUME", "EBS PROBLEM"], ebs_rows);
                    }
                    table(
                        &[
                            "MOUNT",
                            "FS",
                            "DEVICE",
                            "BACKING FILE",
                            "FROZEN BY",
                            "PROBLEM",
                        ],
                        rows,
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Groups => {
            let reply = client
                .list_groups(pb::ListGroupsRequest {})
                .await?
                .into_inner();
            if json {
                print_json(&reply);
            } else {
                let rows = reply
                    .groups
                    .iter()
                    .map(|g| {
                        let members = g
                            .members
                            .iter()
                            .map(|m| format!("{}:{}", m.agent, m.mount_points.join(",")))
                            .collect::<Vec<_>>()
                            .join(" ");
                        vec![
                            g.name.clone(),
                            g.provider.clone(),
                            members,
                            dash(&g.running_set),
                            if g.last_consistent_set.is_empty() {
                                "-".into()
                            } else {
                                format!(
                                    "{} ({})",
                                    g.last_consistent_set,
                                    ago(g.last_consistent_at_ms)
                                )
                            },
                            if g.schedule.is_empty() {
                                "-".into()
                            } else {
                                format!("{} → {}", g.schedule, at(g.next_run_at_ms))
                            },
                            if g.schedule.is_empty() {
                                "-".into()
                            } else if g.overdue {
                                "OVERDUE".into()
                            } else {
                                "ok".into()
                            },
                            format!("{}; {} consistent", g.retention, g.consistent_sets),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "GROUP",
                        "PROVIDER",
                        "MEMBERS",
                        "RUNNING",
                        "LAST CONSISTENT",
                        "SCHEDULE → NEXT RUN",
                        "STATUS",
                        "RETENTION",
                    ],
                    rows,
                );
                let pending: Vec<pb::PendingRemoval> = reply
                    .groups
                    .iter()
                    .flat_map(|g| g.pending_removals.iter().cloned())
                    .collect();
                if !pending.is_empty() {
                    println!();
                    print_pending(&pending);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Pki(_) => unreachable!("handled before connecting"),
        Command::Dashboard { .. } => unreachable!("handled after connecting"),
    }
}

async fn get_set(
    client: &mut CoordinatorClient<Channel>,
    id: &str,
) -> Result<pb::SnapshotSet, tonic::Status> {
    client
        .get_set(pb::GetSetRequest { set_id: id.into() })
        .await?
        .into_inner()
        .set
        .ok_or_else(|| tonic::Status::internal("empty reply"))
}

/// Polls the set until it ends, printing each phase as it is reached (on stderr, so that
/// `--json` output stays clean).
async fn wait_for(
    client: &mut CoordinatorClient<Channel>,
    id: &str,
) -> Result<pb::SnapshotSet, tonic::Status> {
    // Progress goes to stderr also with --json: stdout carries only the JSON.
    let mut shown = 0;
    eprintln!("set {id}");
    loop {
        let set = get_set(client, id).await?;
        let start = set.created_at_ms;
        for mark in set.phases.iter().skip(shown) {
            eprintln!(
                "  {:>6} ms  {}",
                mark.at_ms.saturating_sub(start),
                mark.phase()
            );
        }
        let _ = std::io::stderr().flush();
        shown = set.phases.len();
        if set.state() != pb::SetState::Running {
            return Ok(set);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls a consistent set until its snapshots finished in the background, drawing a progress
/// bar (the mean of every snapshot's progress) on stderr.
async fn wait_complete_for(
    client: &mut CoordinatorClient<Channel>,
    id: &str,
) -> Result<pb::SnapshotSet, tonic::Status> {
    loop {
        let set = get_set(client, id).await?;
        {
            let total: u32 = set.volumes.iter().map(|v| v.snapshot_progress).sum();
            let percent = total / (set.volumes.len().max(1) as u32);
            let done = set
                .volumes
                .iter()
                .filter(|v| v.snapshot_state == pb::Completion::Completed.text())
                .count();
            eprint!(
                "\r  snapshots {}  {percent:>3}%  {done}/{} completed",
                progress_bar(percent, 30),
                set.volumes.len()
            );
            let _ = std::io::stderr().flush();
        }
        if set.completion() != pb::Completion::Pending {
            eprintln!();
            return Ok(set);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn progress_bar(percent: u32, width: usize) -> String {
    let filled = (percent.min(100) as usize * width) / 100;
    format!("[{}{}]", "#".repeat(filled), " ".repeat(width - filled))
}

fn print_json<T: serde::Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("quiescectl: cannot encode JSON: {e}"),
    }
}

fn dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { s.into() }
}

/// `--since`: an RFC 3339 time, or a duration before now.
fn parse_since(text: &str) -> Result<u64, String> {
    if let Ok(at) = humantime::parse_rfc3339_weak(text) {
        return Ok(at
            .duration_since(UNIX_EPOCH)
            .map_err(|_| format!("{text} is before 1970"))?
            .as_millis() as u64);
    }
    let ago = humantime::parse_duration(text).map_err(|_| {
        format!(
            "{} is neither an RFC 3339 time (2026-12-01T00:00:00Z) nor a duration (1h, 7d)",
            quiesce_proto::echo::Capped(text)
        )
    })?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Ok(now.saturating_sub(ago).as_millis() as u64)
}

fn print_audit(records: &[pb::AuditRecord]) {
    let rows = records
        .iter()
        .map(|r| {
            vec![
                r.seq.to_string(),
                humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(r.at_ms))
                    .to_string(),
                dash(&r.identity),
                quiesce_coordinator::audit::verb_name(r.verb),
                dash(&r.group),
                dash(&r.set_id),
                quiesce_coordinator::audit::outcome_name(r.outcome),
                dash(&quiesce_coordinator::audit::cap(&r.message, 120)),
            ]
        })
        .collect();
    table(
        &[
            "SEQ", "TIME", "IDENTITY", "VERB", "GROUP", "SET", "OUTCOME", "MESSAGE",
        ],
        rows,
    );
}

fn print_sets(sets: &[pb::SnapshotSet]) {
    let rows = sets
        .iter()
        .map(|s| {
            vec![
                s.id.clone(),
                s.group.clone(),
                s.state().text().to_owned(),
                ago(s.created_at_ms),
                ms(s.freeze_window_ms),
                s.volumes.len().to_string(),
                verified_text(s),
                dash(&s.error),
            ]
        })
        .collect();
    table(
        &[
            "SET",
            "GROUP",
            "STATE",
            "CREATED",
            "FREEZE WINDOW",
            "VOLUMES",
            "VERIFIED",
            "ERROR",
        ],
        rows,
    );
}

fn print_set(set: &pb::SnapshotSet) {
    println!("set            {}", set.id);
    println!("group          {} ({})", set.group, set.provider);
    println!("state          {}", set.state());
    if !set.error.is_empty() {
        println!("error          {}", set.error);
    }
    println!("created        {}", ago(set.created_at_ms));
    println!(
        "cut window     {} (first freeze sent → last FITHAW returned, coordinator clock)",
        ms(set.freeze_window_ms)
    );
    println!(
        "longest stall  {} (writes blocked on one host: first FIFREEZE → last FITHAW)",
        ms(set.max_write_stall_ms)
    );
    if set.max_resume_ms > 0 {
        println!(
            "hook resume    {} longest, after the thaw (in neither figure above)",
            ms(set.max_resume_ms)
        );
    }
    println!(
        "freeze budget  {}; started by {}",
        ms(set.freeze_budget_ms),
        dash(&set.trigger)
    );
    println!("verdict        {}", dash(&set.verdict));
    if set.snapshot_calls_ms > 0 {
        println!(
            "snapshot calls {} (inside the freeze window)",
            ms(set.snapshot_calls_ms)
        );
    }
    if set.completion() != pb::Completion::Unspecified {
        println!("completion     {}", set.completion());
    }
    if set.locked_until_ms > 0 && set.state() == pb::SetState::Consistent {
        let until = humantime::format_rfc3339_seconds(
            UNIX_EPOCH + Duration::from_millis(set.locked_until_ms),
        );
        println!("locked until   {until} (no delete before, except by two admins)");
    }
    println!();
    // Instants relative to the set's creation. FROZEN and THAWED are on each agent's clock,
    // the others on the coordinator's: the verdict orders only the coordinator's.
    let start = set.created_at_ms;
    let rel = |at: u64| {
        if at == 0 {
            "-".to_string()
        } else {
            format!("+{}", at as i64 - start as i64)
        }
    };
    println!(
        "snapshots      first call sent {} ms, last returned {} ms (coordinator clock)",
        rel(set.first_snapshot_started_at_ms),
        rel(set.last_snapshot_returned_at_ms)
    );
    let rows = set
        .hosts
        .iter()
        .map(|h| {
            vec![
                h.agent.clone(),
                h.state().text().to_owned(),
                rel(h.freeze_acked_at_ms),
                rel(h.frozen_at_ms),
                rel(h.snapshot_returned_at_ms),
                rel(h.thaw_sent_at_ms),
                rel(h.thawed_at_ms),
                if h.held_continuously { "yes" } else { "no" }.into(),
                dash(h.freeze_end().text()),
                ms(h.write_stall_ms),
                ms(h.resume_ms),
                // The set's error names the host and says it already: print it once.
                if !h.error.is_empty() && set.error.contains(&h.error) {
                    "(error above)".to_string()
                } else {
                    dash(&h.error)
                },
            ]
        })
        .collect();
    table(
        &[
            "HOST",
            "STATE",
            "FROZEN(C)",
            "FROZEN(A)",
            "SNAP DONE(C)",
            "THAW SENT(C)",
            "THAWED(A)",
            "HELD",
            "FREEZE END",
            "STALL",
            "RESUME",
            "ERROR",
        ],
        rows,
    );
    println!("(C) coordinator clock, (A) the agent's clock; ms after the set was created");
    for h in set.hosts.iter().filter(|h| h.lease_bound_at_ms > 0) {
        println!(
            "{}: thawed — {}; last lease grant sent {} ms, lease bound {} ms (C)",
            h.agent,
            thaw_evidence_text(h.thaw_evidence()),
            rel(h.lease_sent_at_ms),
            rel(h.lease_bound_at_ms)
        );
    }
    if !set.pending_removals.is_empty() {
        println!();
        print_pending(&set.pending_removals);
    }
    println!();
    if set.volumes.iter().any(|v| !v.ebs_volume_id.is_empty()) {
        let rows = set
            .volumes
            .iter()
            .map(|v| {
                vec![
                    v.agent.clone(),
                    v.mount_point.clone(),
                    dash(&v.ebs_volume_id),
                    dash(&v.snapshot_id),
                    dash(&v.snapshot_state),
                    format!(
                        "{} {:>3}%",
                        progress_bar(v.snapshot_progress, 10),
                        v.snapshot_progress
                    ),
                ]
            })
            .collect();
        table(
            &["HOST", "MOUNT", "VOLUME", "SNAPSHOT", "STATE", "PROGRESS"],
            rows,
        );
    } else {
        let rows = set
            .volumes
            .iter()
            .map(|v| {
                vec![
                    v.agent.clone(),
                    v.mount_point.clone(),
                    dash(&v.device),
                    dash(&v.fs_type),
                    dash(&v.snapshot_id),
                ]
            })
            .collect();
        table(&["HOST", "MOUNT", "DEVICE", "FS", "SNAPSHOT"], rows);
    }
    println!();
    if !set.hook_outputs.is_empty() {
        let rows = set
            .hook_outputs
            .iter()
            .map(|o| {
                let mut values: Vec<String> = o
                    .values
                    .iter()
                    .map(|v| format!("{}={}", v.key, v.value))
                    .collect();
                if !o.backup_label.is_empty() {
                    values.push(format!("backup_label={} bytes", o.backup_label.len()));
                }
                if !o.tablespace_map.is_empty() {
                    values.push(format!("tablespace_map={} bytes", o.tablespace_map.len()));
                }
                vec![
                    o.agent.clone(),
                    o.hook.clone(),
                    o.kind.clone(),
                    ms(o.quiesce_ms),
                    ms(o.resume_ms),
                    dash(&values.join(" ")),
                    dash(&o.error),
                ]
            })
            .collect();
        table(
            &[
                "HOST", "HOOK", "KIND", "QUIESCE", "RESUME", "OUTPUT", "ERROR",
            ],
            rows,
        );
        println!();
    }
    if let Some(last) = set.verifications.last() {
        println!(
            "verified       {} ({} drill{}; newest below)",
            verified_text(set),
            set.verifications.len(),
            if set.verifications.len() == 1 {
                ""
            } else {
                "s"
            }
        );
        print_verification(last);
        println!();
    }
    let rows = set
        .phases
        .iter()
        .map(|p| {
            vec![
                p.phase().text().to_owned(),
                format!("+{} ms", p.at_ms.saturating_sub(start)),
            ]
        })
        .collect();
    table(&["PHASE", "AT"], rows);
}

fn outcome_text(outcome: pb::VerifyOutcome) -> &'static str {
    match outcome {
        pb::VerifyOutcome::Unspecified => "unknown",
        pb::VerifyOutcome::Passed => "passed",
        pb::VerifyOutcome::Failed => "failed",
        pb::VerifyOutcome::Error => "could not run",
        pb::VerifyOutcome::Skipped => "skipped",
        pb::VerifyOutcome::NoBlockDevice => "stopped: no block device here",
    }
}

/// The newest drill of a set, short: "passed 5m ago on db1", or "-".
fn verified_text(set: &pb::SnapshotSet) -> String {
    match set.verifications.last() {
        None => "-".into(),
        Some(v) => format!(
            "{} {} on {}",
            outcome_text(v.outcome()),
            ago(v.verified_at_ms),
            v.agent
        ),
    }
}

fn print_verification(v: &pb::Verification) {
    println!(
        "outcome        {} ({} on {}, took {})",
        outcome_text(v.outcome()),
        ago(v.verified_at_ms),
        v.agent,
        ms(v.duration_ms)
    );
    if !v.error.is_empty() {
        println!("error          {}", v.error);
    }
    let rows = v
        .checks
        .iter()
        .map(|c| {
            vec![
                c.name.clone(),
                dash(&c.kind),
                outcome_text(c.outcome()).to_owned(),
                dash(&c.check),
                ms(c.duration_ms),
            ]
        })
        .collect();
    table(&["CHECKED", "KIND", "OUTCOME", "CHECKS", "TOOK"], rows);
    for c in v
        .checks
        .iter()
        .filter(|c| c.outcome() != pb::VerifyOutcome::Passed && !c.output.is_empty())
    {
        println!(
            "--- {} ({}): {}",
            c.name,
            c.check,
            outcome_text(c.outcome())
        );
        for line in c
            .output
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            println!("  {line}");
        }
    }
}

/// What says a member thawed (`sets show`).
fn thaw_evidence_text(evidence: pb::ThawEvidence) -> &'static str {
    match evidence {
        pb::ThawEvidence::Unspecified => "not decided",
        pb::ThawEvidence::Answered => "it answered the thaw",
        pb::ThawEvidence::LeaseBound => {
            "no answer; decided when its lease bound passed (its lease must have thawed it)"
        }
        pb::ThawEvidence::AnsweredLate => {
            "no answer at the time; decided by its lease bound, and its agent's report came later"
        }
        pb::ThawEvidence::Unconfirmed => {
            "NOT CONFIRMED: no answer within the phase timeout; its lease ends the freeze by the bound"
        }
    }
}

/// Leftovers still to be removed, per host.
fn print_pending(pending: &[pb::PendingRemoval]) {
    println!("pending removals (the coordinator retries until each agent answers):");
    let rows = pending
        .iter()
        .map(|p| {
            vec![
                p.agent.clone(),
                p.set_id.clone(),
                ago(p.since_ms),
                p.attempts.to_string(),
                if p.next_attempt_at_ms == 0 {
                    "-".into()
                } else {
                    at(p.next_attempt_at_ms)
                },
                if p.thaw_unconfirmed { "yes" } else { "no" }.into(),
                dash(&p.last_error),
            ]
        })
        .collect();
    table(
        &[
            "HOST",
            "SET",
            "SINCE",
            "ATTEMPTS",
            "NEXT",
            "THAW FIRST",
            "LAST ERROR",
        ],
        rows,
    );
}

/// What `sets delete` removed and what it could not, per host.
fn print_removal(set: &str, reply: &pb::DeleteSetResponse) {
    if reply.forgotten {
        println!(
            "deleted set {set} ({} snapshots removed)",
            reply.snapshots_deleted
        );
    } else {
        println!(
            "set {set}: {} snapshots removed; removal pending on some hosts",
            reply.snapshots_deleted
        );
    }
    for host in &reply.hosts {
        if !host.error.is_empty() {
            println!("  {}: NOT DONE: {}", host.agent, host.error);
        } else {
            println!("  {}: {} removed", host.agent, host.removed.len());
        }
        for path in &host.removed {
            println!("    removed      {path}");
        }
        for n in &host.not_removed {
            println!("    NOT removed  {}: {}", n.path, n.error);
        }
    }
}

/// Writes `backup_label` and, when not empty, `tablespace_map` (mode 0600) into `data_dir`.
fn write_backup_label(
    set: &pb::SnapshotSet,
    hook: &str,
    agent: Option<&str>,
    data_dir: &Path,
) -> Result<Vec<PathBuf>, String> {
    let matching: Vec<&pb::SetHookOutput> = set
        .hook_outputs
        .iter()
        .filter(|o| o.hook == hook && agent.is_none_or(|a| o.agent == a))
        .collect();
    let output = match matching.as_slice() {
        [one] => *one,
        [] => return Err(format!("set {} has no output of hook {hook}", set.id)),
        _ => {
            return Err(format!(
                "several members have a hook {hook}: name one with --agent"
            ));
        }
    };
    if output.backup_label.is_empty() {
        return Err(format!(
            "hook {hook} recorded no backup label in set {} (crash-consistent mode needs none: start the server and let it run crash recovery)",
            set.id
        ));
    }
    if set.state() != pb::SetState::Consistent {
        return Err(format!("set {} is {}, not consistent", set.id, set.state()));
    }
    let mut files = vec![("backup_label", &output.backup_label)];
    if !output.tablespace_map.is_empty() {
        files.push(("tablespace_map", &output.tablespace_map));
    }
    let mut written = Vec::new();
    for (name, content) in files {
        let path = data_dir.join(name);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        file.write_all(content.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

fn ms(value: u64) -> String {
    if value == 0 {
        "-".into()
    } else {
        format!("{value} ms")
    }
}

fn ago(at_ms: u64) -> String {
    if at_ms == 0 {
        return "-".into();
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let stamp = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(at_ms));
    let secs = now.saturating_sub(at_ms) / 1000;
    format!(
        "{stamp} ({} ago)",
        humantime::format_duration(Duration::from_secs(secs))
    )
}

fn at(at_ms: u64) -> String {
    if at_ms == 0 {
        return "-".into();
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(at_ms)).to_string()
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = widths[i]))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    if rows.is_empty() {
        println!("(none)");
    }
    for row in rows {
        line(row);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn set_with_label(label: &str) -> pb::SnapshotSet {
        pb::SnapshotSet {
            id: "pg-1".into(),
            state: pb::SetState::Consistent as i32,
            hook_outputs: vec![pb::SetHookOutput {
                agent: "db1".into(),
                hook: "pg-main".into(),
                backup_label: label.into(),
                tablespace_map: "16384 /mnt/ts/pg\n".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn backup_label_is_written_byte_for_byte_private_and_never_over_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let label = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n";
        let set = set_with_label(label);
        let written = write_backup_label(&set, "pg-main", None, dir.path()).unwrap();
        assert_eq!(written.len(), 2);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("backup_label")).unwrap(),
            label
        );
        let mode = std::fs::metadata(dir.path().join("tablespace_map"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = write_backup_label(&set, "pg-main", None, dir.path()).unwrap_err();
        assert!(again.contains("cannot create"), "{again}");
    }

    #[test]
    fn a_crash_mode_set_has_no_label_to_write() {
        let dir = tempfile::tempdir().unwrap();
        let err = write_backup_label(&set_with_label(""), "pg-main", None, dir.path()).unwrap_err();
        assert!(err.contains("crash-consistent mode needs none"), "{err}");
        let err = write_backup_label(&set_with_label("x"), "other", None, dir.path()).unwrap_err();
        assert!(err.contains("no output of hook other"), "{err}");
    }
}
