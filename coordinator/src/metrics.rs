//! Prometheus metrics of the coordinator, served as text on `metrics-listen` (`GET /metrics`).
//!
//! Every series exists from start-up: [`Metrics::new`] creates, at zero, each series of every
//! configured group (every set state, phase, member host) and agent, so `increase(...) > 0`
//! sees the first failure and dashboards show flat lines instead of gaps. Counters and
//! histograms are updated as sets run; gauges that describe the catalog (sets by state, last
//! consistent set, overdue) are refreshed from it at each scrape, so they are right after a
//! restart too.
//!
//! Names follow the Prometheus conventions: base units (seconds, Unix-time seconds), `_total`
//! on counters, `group`/`host`/`agent` labels. Restore drills (`quiescectl verify`):
//! `quiesce_verifications_total{group,result="ok"|"failed"|"error"}` and
//! `quiesce_group_last_verified_timestamp_seconds{group}` (the newest drill that passed).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use quiesce_proto::coordinator::v1::{SetHost, SetPhase, SetState};
use quiesce_proto::states::StateText;
use tokio::net::TcpListener;
use tracing::warn;

use crate::config::Config;

type Labels = Vec<(String, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

/// Buckets for freeze windows and write stalls, in seconds: 5 ms … 10 s (a freeze budget is
/// seconds; a healthy reflink or EBS freeze is tens to hundreds of milliseconds).
pub const FREEZE_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Buckets for phase durations: the freeze buckets, then up to the default phase timeout and
/// past it (planning and preparing include database hooks, which can take tens of seconds).
pub const PHASE_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// The states a set has in the catalog (`quiesce_sets{state}`).
pub const SET_STATES: [SetState; 3] = [SetState::Running, SetState::Consistent, SetState::Failed];

/// The states a finished set ends in (`quiesce_sets_finished_total{state}`).
pub const FINISHED_STATES: [SetState; 2] = [SetState::Consistent, SetState::Failed];

/// The results of a restore drill (`quiesce_verifications_total{result}`): ok (passed),
/// failed (a check found the copy broken), error (the drill could not run).
pub const VERIFY_RESULTS: [&str; 4] = ["ok", "failed", "error", "no_block_device"];

/// The phases a set is timed in (`quiesce_phase_duration_seconds{phase}`): each one that ends
/// when the workflow moves on to the next, labelled [`SetPhase::duration_label`].
pub const PHASES: [SetPhase; 6] = [
    SetPhase::Planned,
    SetPhase::Preparing,
    SetPhase::Freezing,
    SetPhase::Snapshotting,
    SetPhase::Thawing,
    SetPhase::Aborting,
];

fn freeze_histogram() -> Histogram {
    Histogram::new(FREEZE_BUCKETS)
}

fn phase_histogram() -> Histogram {
    Histogram::new(PHASE_BUCKETS)
}

pub struct Metrics {
    registry: Mutex<Registry>,
    /// Freeze budget of each configured group.
    budgets: HashMap<String, Duration>,
    finished: Family<Labels, Counter>,
    over_budget: Family<Labels, Counter>,
    expired: Family<Labels, Counter>,
    freeze_window: Histograms,
    phase_duration: Histograms,
    host_stall: Histograms,
    last_freeze_window: Family<Labels, FloatGauge>,
    host_last_stall: Family<Labels, FloatGauge>,
    freeze_budget: Family<Labels, FloatGauge>,
    sets: Family<Labels, Gauge>,
    last_consistent: Family<Labels, FloatGauge>,
    overdue: Family<Labels, Gauge>,
    next_run: Family<Labels, FloatGauge>,
    agent_reachable: Family<Labels, Gauge>,
    pending_removals: Family<Labels, Gauge>,
    verifications: Family<Labels, Counter>,
    last_verified: Family<Labels, FloatGauge>,
}

/// What the catalog and the schedule say about one group, at scrape time.
#[derive(Debug, Clone, Default)]
pub struct GroupView {
    /// When the newest consistent set finished (coordinator clock, ms).
    pub last_consistent_at_ms: Option<u64>,
    pub overdue: bool,
    /// When the schedule runs next; `None` for an unscheduled group.
    pub next_run_at_ms: Option<u64>,
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn group(name: &str) -> Labels {
    labels(&[("group", name)])
}

impl Metrics {
    /// The registry, with every series of `config`'s groups and agents created at zero.
    pub fn new(config: &Config) -> Self {
        let metrics = Metrics {
            registry: Mutex::new(Registry::default()),
            budgets: config
                .groups
                .iter()
                .map(|g| (g.name.clone(), g.freeze_budget))
                .collect(),
            finished: Family::default(),
            over_budget: Family::default(),
            expired: Family::default(),
            freeze_window: Family::new_with_constructor(freeze_histogram as fn() -> Histogram),
            phase_duration: Family::new_with_constructor(phase_histogram as fn() -> Histogram),
            host_stall: Family::new_with_constructor(freeze_histogram as fn() -> Histogram),
            last_freeze_window: Family::default(),
            host_last_stall: Family::default(),
            freeze_budget: Family::default(),
            sets: Family::default(),
            last_consistent: Family::default(),
            overdue: Family::default(),
            next_run: Family::default(),
            agent_reachable: Family::default(),
            pending_removals: Family::default(),
            verifications: Family::default(),
            last_verified: Family::default(),
        };
        let mut registry = Registry::with_prefix("quiesce");
        // Counters: prometheus-client appends `_total`.
        registry.register(
            "sets_finished",
            "Sets this process finished, by group and state (consistent, failed)",
            metrics.finished.clone(),
        );
        registry.register(
            "freeze_window_over_budget",
            "Sets whose freeze window (first freeze sent to last thaw returned) exceeded the group's freeze-budget",
            metrics.over_budget.clone(),
        );
        registry.register(
            "sets_expired",
            "Sets deleted by retention, by group",
            metrics.expired.clone(),
        );
        registry.register(
            "freeze_window_seconds",
            "The cut window of each set: first freeze sent to the last member's FITHAW returned (hook resume after it not included)",
            metrics.freeze_window.clone(),
        );
        registry.register(
            "phase_duration_seconds",
            "Time the coordinator spent in each phase of a set",
            metrics.phase_duration.clone(),
        );
        registry.register(
            "host_write_stall_seconds",
            "How long writers on one member host were blocked in a set (its agent's first FIFREEZE started to last FITHAW returned)",
            metrics.host_stall.clone(),
        );
        registry.register(
            "group_last_freeze_window_seconds",
            "Freeze window of the newest set of the group this process froze",
            metrics.last_freeze_window.clone(),
        );
        registry.register(
            "host_last_write_stall_seconds",
            "Write stall on the member host in the newest set of the group this process froze",
            metrics.host_last_stall.clone(),
        );
        registry.register(
            "group_freeze_budget_seconds",
            "The group's configured freeze-budget",
            metrics.freeze_budget.clone(),
        );
        registry.register(
            "sets",
            "Sets in the catalog, by group and state (running, consistent, failed)",
            metrics.sets.clone(),
        );
        registry.register(
            "group_last_consistent_timestamp_seconds",
            "When the newest consistent set of the group finished (Unix time; 0: none yet)",
            metrics.last_consistent.clone(),
        );
        registry.register(
            "group_overdue",
            "1 when the group's last consistent set is older than its schedule promises (0 for unscheduled groups)",
            metrics.overdue.clone(),
        );
        registry.register(
            "group_next_run_timestamp_seconds",
            "When the group's schedule runs next (Unix time; 0: unscheduled)",
            metrics.next_run.clone(),
        );
        registry.register(
            "agent_reachable",
            "1 when the coordinator's last call to the agent (GetHostInfo over its mTLS channel) answered",
            metrics.agent_reachable.clone(),
        );
        registry.register(
            "pending_removals",
            "Leftovers of failed or deleted sets the reconciler still has to remove on the agent (one per set)",
            metrics.pending_removals.clone(),
        );
        registry.register(
            "verifications",
            "Restore drills (quiescectl verify) this process ran, by group and result (ok, failed, error)",
            metrics.verifications.clone(),
        );
        registry.register(
            "group_last_verified_timestamp_seconds",
            "When the newest restore drill of a set of the group passed (Unix time; 0: none yet)",
            metrics.last_verified.clone(),
        );
        *metrics.registry.lock().unwrap() = registry;
        metrics.create_series(config);
        metrics
    }

    /// Creates every series of the configured groups and agents (at zero).
    fn create_series(&self, config: &Config) {
        for g in &config.groups {
            let name = g.name.as_str();
            for state in FINISHED_STATES {
                drop(
                    self.finished
                        .get_or_create(&labels(&[("group", name), ("state", state.text())])),
                );
            }
            drop(self.over_budget.get_or_create(&group(name)));
            drop(self.expired.get_or_create(&group(name)));
            for result in VERIFY_RESULTS {
                drop(
                    self.verifications
                        .get_or_create(&labels(&[("group", name), ("result", result)])),
                );
            }
            drop(self.last_verified.get_or_create(&group(name)));
            drop(self.freeze_window.get_or_create(&group(name)));
            drop(self.last_freeze_window.get_or_create(&group(name)));
            for phase in PHASES {
                drop(self.phase_duration.get_or_create(&labels(&[
                    ("group", name),
                    ("phase", phase.duration_label()),
                ])));
            }
            for member in &g.members {
                let host = labels(&[("group", name), ("host", &member.agent)]);
                drop(self.host_stall.get_or_create(&host));
                drop(self.host_last_stall.get_or_create(&host));
            }
            self.freeze_budget
                .get_or_create(&group(name))
                .set(g.freeze_budget.as_secs_f64());
            self.refresh_group(name, &GroupView::default());
        }
        self.refresh_set_counts(config, &[]);
        for agent in &config.agents {
            drop(
                self.agent_reachable
                    .get_or_create(&labels(&[("agent", &agent.name)])),
            );
        }
        self.refresh_pending_removals(config, &[]);
    }

    /// Pending removals per agent, from the catalog: every configured agent present (zero when
    /// it has none), agents no longer configured shown too while they hold leftovers.
    pub fn refresh_pending_removals(&self, config: &Config, counts: &[(String, u64)]) {
        self.pending_removals.clear();
        for agent in &config.agents {
            drop(
                self.pending_removals
                    .get_or_create(&labels(&[("agent", &agent.name)])),
            );
        }
        for (agent, count) in counts {
            self.pending_removals
                .get_or_create(&labels(&[("agent", agent)]))
                .set(*count as i64);
        }
    }

    pub fn observe_phase(&self, group_name: &str, phase: SetPhase, took: Duration) {
        self.phase_duration
            .get_or_create(&labels(&[
                ("group", group_name),
                ("phase", phase.duration_label()),
            ]))
            .observe(took.as_secs_f64());
    }

    /// A set of `group_name` finished. `freeze_window` is `None` when nothing was frozen;
    /// `hosts` are the members' records (write stall of each host that was sent a freeze).
    pub fn finished(
        &self,
        group_name: &str,
        consistent: bool,
        freeze_window: Option<Duration>,
        hosts: &[SetHost],
    ) {
        let state = if consistent {
            SetState::Consistent
        } else {
            SetState::Failed
        };
        self.finished
            .get_or_create(&labels(&[("group", group_name), ("state", state.text())]))
            .inc();
        let Some(window) = freeze_window else {
            return;
        };
        let labels_group = group(group_name);
        self.freeze_window
            .get_or_create(&labels_group)
            .observe(window.as_secs_f64());
        self.last_freeze_window
            .get_or_create(&labels_group)
            .set(window.as_secs_f64());
        if self
            .budgets
            .get(group_name)
            .is_some_and(|budget| window > *budget)
        {
            self.over_budget.get_or_create(&labels_group).inc();
        }
        for host in hosts.iter().filter(|h| h.freeze_sent_at_ms > 0) {
            let stall = host.write_stall_ms as f64 / 1000.0;
            let host_labels = labels(&[("group", group_name), ("host", &host.agent)]);
            self.host_stall.get_or_create(&host_labels).observe(stall);
            self.host_last_stall.get_or_create(&host_labels).set(stall);
        }
    }

    /// Retention deleted one set of the group.
    pub fn expired(&self, group_name: &str) {
        self.expired.get_or_create(&group(group_name)).inc();
    }

    /// A restore drill of a set of the group ended with `result` (one of [`VERIFY_RESULTS`]).
    pub fn verified(&self, group_name: &str, result: &str) {
        self.verifications
            .get_or_create(&labels(&[("group", group_name), ("result", result)]))
            .inc();
    }

    /// When the newest passed drill of the group ran (catalog, at scrape time).
    pub fn refresh_last_verified(&self, group_name: &str, at_ms: Option<u64>) {
        self.last_verified
            .get_or_create(&group(group_name))
            .set(at_ms.unwrap_or(0) as f64 / 1000.0);
    }

    /// The outcome of one call to the agent.
    pub fn agent_reached(&self, agent: &str, reachable: bool) {
        self.agent_reachable
            .get_or_create(&labels(&[("agent", agent)]))
            .set(i64::from(reachable));
    }

    /// Sets in the catalog per (group, state): every configured group and state present
    /// (zero when the catalog has none), groups no longer configured dropped.
    pub fn refresh_set_counts(&self, config: &Config, counts: &[(String, SetState, u64)]) {
        self.sets.clear();
        for g in &config.groups {
            for state in SET_STATES {
                drop(
                    self.sets
                        .get_or_create(&labels(&[("group", &g.name), ("state", state.text())])),
                );
            }
        }
        for (group_name, state, count) in counts {
            if config.groups.iter().any(|g| &g.name == group_name) {
                self.sets
                    .get_or_create(&labels(&[("group", group_name), ("state", state.text())]))
                    .set(*count as i64);
            }
        }
    }

    /// The scrape-time gauges of one group.
    pub fn refresh_group(&self, group_name: &str, view: &GroupView) {
        let labels = group(group_name);
        self.last_consistent
            .get_or_create(&labels)
            .set(view.last_consistent_at_ms.unwrap_or(0) as f64 / 1000.0);
        self.overdue
            .get_or_create(&labels)
            .set(i64::from(view.overdue));
        self.next_run
            .get_or_create(&labels)
            .set(view.next_run_at_ms.unwrap_or(0) as f64 / 1000.0);
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        let registry = self.registry.lock().unwrap();
        if let Err(e) = encode(&mut text, &registry) {
            warn!(error = %e, "encoding metrics");
        }
        text
    }
}

/// Serves `render()` at `GET /metrics` until `shutdown` resolves.
pub async fn serve_http<F>(listener: TcpListener, render: F, shutdown: impl Future<Output = ()>)
where
    F: Fn() -> String + Send + Sync + Clone + 'static,
{
    quiesce_proto::metrics_http::serve(listener, render, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
listen = "127.0.0.1:0"
catalog = "/nonexistent/catalog.sqlite"
[[agent]]
name = "db1"
endpoint = "http://127.0.0.1:1"
[[agent]]
name = "db2"
endpoint = "http://127.0.0.1:2"
[[group]]
name = "a"
provider = "reflink"
freeze-budget = "2s"
[[group.member]]
agent = "db1"
mounts = ["/srv/a"]
[[group.member]]
agent = "db2"
mounts = ["/srv/b"]
"#;

    fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting {prefix:?} in\n{text}"))
    }

    fn host(agent: &str, stall_ms: u64) -> SetHost {
        SetHost {
            agent: agent.into(),
            freeze_sent_at_ms: 1,
            write_stall_ms: stall_ms,
            ..Default::default()
        }
    }

    #[test]
    fn every_series_exists_at_zero_before_any_set() {
        let config = Config::parse(CONFIG).unwrap();
        let text = Metrics::new(&config).encode();
        for state in FINISHED_STATES {
            line(
                &text,
                &format!("quiesce_sets_finished_total{{group=\"a\",state=\"{state}\"}} 0"),
            );
        }
        for state in SET_STATES {
            line(
                &text,
                &format!("quiesce_sets{{group=\"a\",state=\"{state}\"}} 0"),
            );
        }
        // The label values as they were when they were strings.
        let labels = PHASES.map(SetPhase::duration_label);
        assert_eq!(
            labels,
            [
                "planning",
                "preparing",
                "freezing",
                "snapshotting",
                "thawing",
                "aborting"
            ]
        );
        assert_eq!(
            FINISHED_STATES.map(SetState::text),
            ["consistent", "failed"]
        );
        assert_eq!(
            SET_STATES.map(SetState::text),
            ["running", "consistent", "failed"]
        );
        for phase in labels {
            line(
                &text,
                &format!("quiesce_phase_duration_seconds_count{{group=\"a\",phase=\"{phase}\"}} 0"),
            );
        }
        for h in ["db1", "db2"] {
            line(
                &text,
                &format!("quiesce_host_write_stall_seconds_count{{group=\"a\",host=\"{h}\"}} 0"),
            );
            line(
                &text,
                &format!("quiesce_agent_reachable{{agent=\"{h}\"}} 0"),
            );
        }
        line(&text, "quiesce_freeze_window_seconds_count{group=\"a\"} 0");
        line(
            &text,
            "quiesce_freeze_window_over_budget_total{group=\"a\"} 0",
        );
        line(&text, "quiesce_sets_expired_total{group=\"a\"} 0");
        for result in VERIFY_RESULTS {
            line(
                &text,
                &format!("quiesce_verifications_total{{group=\"a\",result=\"{result}\"}} 0"),
            );
        }
        line(
            &text,
            "quiesce_group_last_verified_timestamp_seconds{group=\"a\"} 0.0",
        );
        line(&text, "quiesce_group_overdue{group=\"a\"} 0");
        line(
            &text,
            "quiesce_group_last_consistent_timestamp_seconds{group=\"a\"} 0.0",
        );
        line(
            &text,
            "quiesce_group_freeze_budget_seconds{group=\"a\"} 2.0",
        );
        // Buckets for freeze windows: 5 ms … 10 s.
        line(
            &text,
            "quiesce_freeze_window_seconds_bucket{le=\"0.005\",group=\"a\"} 0",
        );
        line(
            &text,
            "quiesce_freeze_window_seconds_bucket{le=\"10.0\",group=\"a\"} 0",
        );
    }

    #[test]
    fn a_set_records_window_budget_and_each_hosts_stall() {
        let config = Config::parse(CONFIG).unwrap();
        let metrics = Metrics::new(&config);
        metrics.finished(
            "a",
            true,
            Some(Duration::from_millis(40)),
            &[host("db1", 30), host("db2", 7)],
        );
        metrics.finished(
            "a",
            false,
            Some(Duration::from_millis(2500)),
            &[host("db1", 2400), host("db2", 2450)],
        );
        // A set that failed before freezing: counted, nothing observed.
        metrics.finished("a", false, None, &[]);
        let text = metrics.encode();
        line(
            &text,
            "quiesce_sets_finished_total{group=\"a\",state=\"consistent\"} 1",
        );
        line(
            &text,
            "quiesce_sets_finished_total{group=\"a\",state=\"failed\"} 2",
        );
        line(&text, "quiesce_freeze_window_seconds_count{group=\"a\"} 2");
        line(
            &text,
            "quiesce_freeze_window_over_budget_total{group=\"a\"} 1",
        );
        line(
            &text,
            "quiesce_group_last_freeze_window_seconds{group=\"a\"} 2.5",
        );
        line(
            &text,
            "quiesce_host_write_stall_seconds_bucket{le=\"0.01\",group=\"a\",host=\"db2\"} 1",
        );
        line(
            &text,
            "quiesce_host_write_stall_seconds_bucket{le=\"0.05\",group=\"a\",host=\"db1\"} 1",
        );
        line(
            &text,
            "quiesce_host_write_stall_seconds_count{group=\"a\",host=\"db1\"} 2",
        );
        line(
            &text,
            "quiesce_host_last_write_stall_seconds{group=\"a\",host=\"db2\"} 2.45",
        );
    }

    #[test]
    fn catalog_counts_keep_every_state_and_drop_unconfigured_groups() {
        let config = Config::parse(CONFIG).unwrap();
        let metrics = Metrics::new(&config);
        metrics.refresh_set_counts(
            &config,
            &[
                ("a".into(), SetState::Consistent, 4),
                ("gone".into(), SetState::Failed, 2),
            ],
        );
        metrics.refresh_group(
            "a",
            &GroupView {
                last_consistent_at_ms: Some(1_700_000_000_500),
                overdue: true,
                next_run_at_ms: Some(1_700_000_360_000),
            },
        );
        metrics.agent_reached("db1", true);
        let text = metrics.encode();
        line(&text, "quiesce_sets{group=\"a\",state=\"consistent\"} 4");
        line(&text, "quiesce_sets{group=\"a\",state=\"failed\"} 0");
        line(&text, "quiesce_sets{group=\"a\",state=\"running\"} 0");
        assert!(!text.contains("group=\"gone\""), "{text}");
        line(&text, "quiesce_group_overdue{group=\"a\"} 1");
        line(
            &text,
            "quiesce_group_last_consistent_timestamp_seconds{group=\"a\"} 1700000000.5",
        );
        line(
            &text,
            "quiesce_group_next_run_timestamp_seconds{group=\"a\"} 1700000360.0",
        );
        line(&text, "quiesce_agent_reachable{agent=\"db1\"} 1");
        line(&text, "quiesce_agent_reachable{agent=\"db2\"} 0");
    }
}
