//! Prometheus metrics of the coordinator, served as text on `metrics-listen` (`GET /metrics`).
//!
//! Counters and histograms are updated by the workflow as sets run; gauges that describe the
//! catalog (sets by state, last consistent set, overdue groups) are refreshed from it at each
//! scrape, so they are right after a restart too.

use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::warn;

type Labels = Vec<(String, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

fn histogram() -> Histogram {
    // 1 ms … ~16 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

pub struct Metrics {
    registry: Mutex<Registry>,
    finished: Family<Labels, Counter>,
    freeze_window: Family<Labels, Histogram, fn() -> Histogram>,
    phase_duration: Family<Labels, Histogram, fn() -> Histogram>,
    pub(crate) sets: Family<Labels, Gauge>,
    pub(crate) last_consistent: Family<Labels, FloatGauge>,
    pub(crate) overdue: Family<Labels, Gauge>,
    pub(crate) next_run: Family<Labels, FloatGauge>,
    pub(crate) expired: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("quiesce");
        let metrics = Metrics {
            registry: Mutex::new(Registry::default()),
            finished: Family::default(),
            freeze_window: Family::new_with_constructor(histogram as fn() -> Histogram),
            phase_duration: Family::new_with_constructor(histogram as fn() -> Histogram),
            sets: Family::default(),
            last_consistent: Family::default(),
            overdue: Family::default(),
            next_run: Family::default(),
            expired: Family::default(),
        };
        registry.register(
            "sets_finished",
            "Sets this process finished, by group and state",
            metrics.finished.clone(),
        );
        registry.register(
            "freeze_window_seconds",
            "First freeze sent to last thaw returned, per set",
            metrics.freeze_window.clone(),
        );
        registry.register(
            "phase_duration_seconds",
            "Time the coordinator spent in each phase of a set",
            metrics.phase_duration.clone(),
        );
        registry.register(
            "sets",
            "Sets in the catalog, by group and state",
            metrics.sets.clone(),
        );
        registry.register(
            "last_consistent_set_timestamp_seconds",
            "When the newest consistent set of the group finished (Unix time)",
            metrics.last_consistent.clone(),
        );
        registry.register(
            "group_overdue",
            "1 when the group's last consistent set is older than its schedule promises",
            metrics.overdue.clone(),
        );
        registry.register(
            "group_next_run_timestamp_seconds",
            "When the group's schedule runs next (Unix time)",
            metrics.next_run.clone(),
        );
        registry.register(
            "sets_expired",
            "Sets deleted by retention, by group",
            metrics.expired.clone(),
        );
        *metrics.registry.lock().unwrap() = registry;
        metrics
    }
}

pub(crate) fn group(name: &str) -> Labels {
    vec![("group".into(), name.into())]
}

impl Metrics {
    pub fn observe_phase(&self, group_name: &str, phase: &str, took: Duration) {
        let mut labels = group(group_name);
        labels.push(("phase".into(), phase.into()));
        self.phase_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    pub fn finished(&self, group_name: &str, consistent: bool, freeze_window: Option<Duration>) {
        let mut labels = group(group_name);
        labels.push((
            "state".into(),
            if consistent { "consistent" } else { "failed" }.into(),
        ));
        self.finished.get_or_create(&labels).inc();
        if let Some(window) = freeze_window {
            self.freeze_window
                .get_or_create(&group(group_name))
                .observe(window.as_secs_f64());
        }
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
