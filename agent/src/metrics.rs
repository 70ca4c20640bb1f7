//! Prometheus metrics of the agent, served as text on `metrics-listen` (`GET /metrics`).
//!
//! One process-wide registry: the freeze state machine reports into [`METRICS`] where things
//! happen (a freeze taken, a freeze ended and why, how long FITHAW took). Every series exists
//! from start-up at zero (each way a freeze can end included), so `increase(...) > 0` sees the
//! first lease expiry. Names: base units, `_total` on counters, `_seconds` on durations.

use std::future::Future;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::warn;

type Labels = Vec<(String, String)>;

/// How a freeze can end (`quiesce_agent_freezes_ended_total{end}`): `FreezeEnd::as_str` of
/// every variant (a test in freeze.rs keeps the two in step).
pub const FREEZE_ENDS: [&str; 7] = [
    "thawed",
    "lease-expired",
    "max-freeze",
    "shutdown",
    "external-thaw",
    "unknown-set",
    "guardian",
];

/// Buckets for FIFREEZE/FITHAW calls and write stalls, in seconds: 1 ms … 10 s (the freeze
/// window buckets of the coordinator, 5 ms … 10 s, with two finer ones below: a FITHAW takes
/// well under a millisecond).
const FREEZE_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Buckets for hooks: a checkpoint at pg_backup_start can take tens of seconds.
const HOOK_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

pub static METRICS: LazyLock<AgentMetrics> = LazyLock::new(AgentMetrics::new);

pub struct AgentMetrics {
    registry: Mutex<Registry>,
    freezes: Counter,
    ended: Family<Labels, Counter>,
    freeze_seconds: Histogram,
    thaw_seconds: Histogram,
    stall_seconds: Histogram,
    /// Hook durations, by hook and phase: the database-hooks work reports into this with
    /// [`AgentMetrics::hook_finished`].
    hook_seconds: Family<Labels, Histogram, fn() -> Histogram>,
}

fn histogram() -> Histogram {
    Histogram::new(FREEZE_BUCKETS)
}

fn hook_histogram() -> Histogram {
    Histogram::new(HOOK_BUCKETS)
}

impl AgentMetrics {
    fn new() -> Self {
        let metrics = AgentMetrics {
            registry: Mutex::new(Registry::default()),
            freezes: Counter::default(),
            ended: Family::default(),
            freeze_seconds: histogram(),
            thaw_seconds: histogram(),
            stall_seconds: histogram(),
            hook_seconds: Family::new_with_constructor(hook_histogram as fn() -> Histogram),
        };
        let mut registry = Registry::with_prefix("quiesce_agent");
        registry.register(
            "freezes",
            "Sets frozen (every FIFREEZE of the set returned)",
            metrics.freezes.clone(),
        );
        registry.register(
            "freezes_ended",
            "Freezes ended, by how: thawed (by the coordinator), lease-expired, max-freeze, shutdown, external-thaw, unknown-set",
            metrics.ended.clone(),
        );
        registry.register(
            "freeze_duration_seconds",
            "First FIFREEZE started to last FIFREEZE returned, per set",
            metrics.freeze_seconds.clone(),
        );
        registry.register(
            "thaw_duration_seconds",
            "Time the FITHAWs of one set took",
            metrics.thaw_seconds.clone(),
        );
        registry.register(
            "write_stall_seconds",
            "First FIFREEZE started to last FITHAW returned, per set",
            metrics.stall_seconds.clone(),
        );
        registry.register(
            "hook_duration_seconds",
            "Database hook durations, by hook and phase",
            metrics.hook_seconds.clone(),
        );
        *metrics.registry.lock().unwrap() = registry;
        for end in FREEZE_ENDS {
            drop(
                metrics
                    .ended
                    .get_or_create(&vec![("end".into(), end.into())]),
            );
        }
        metrics
    }

    pub fn frozen(&self, took: Duration) {
        self.freezes.inc();
        self.freeze_seconds.observe(took.as_secs_f64());
    }

    pub fn freeze_ended(&self, end: &str, thaw_took: Duration, stall_ms: u64) {
        self.ended
            .get_or_create(&vec![("end".into(), end.into())])
            .inc();
        self.thaw_seconds.observe(thaw_took.as_secs_f64());
        self.stall_seconds.observe(stall_ms as f64 / 1000.0);
    }

    /// For the hooks: one hook run of `phase` (`prepare`, `pre-freeze`, `post-thaw`…) took.
    pub fn hook_finished(&self, hook: &str, phase: &str, took: Duration) {
        self.hook_seconds
            .get_or_create(&vec![
                ("hook".into(), hook.into()),
                ("phase".into(), phase.into()),
            ])
            .observe(took.as_secs_f64());
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

/// Serves the agent's metrics at `GET /metrics` until `shutdown` resolves. Never touches a
/// filesystem, so it is safe while volumes are frozen.
pub async fn serve_http(listener: TcpListener, shutdown: impl Future<Output = ()>) {
    quiesce_proto::metrics_http::serve(listener, || METRICS.encode(), shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn metrics_are_served_over_plain_http_and_count_freeze_ends() {
        METRICS.frozen(Duration::from_millis(3));
        METRICS.freeze_ended("lease-expired", Duration::from_millis(1), 40);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_http(listener, std::future::pending()));
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        stream.read_to_string(&mut body).await.unwrap();
        assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
        assert!(
            body.contains("quiesce_agent_freezes_ended_total{end=\"lease-expired\"}"),
            "{body}"
        );
        assert!(body.contains("quiesce_agent_freezes_total"), "{body}");
        for end in FREEZE_ENDS {
            assert!(
                body.contains(&format!(
                    "quiesce_agent_freezes_ended_total{{end=\"{end}\"}} "
                )),
                "{end}: {body}"
            );
        }
        assert!(
            body.contains("quiesce_agent_write_stall_seconds_bucket{le=\"0.005\"}"),
            "{body}"
        );
        assert!(
            body.contains("quiesce_agent_freeze_duration_seconds_count"),
            "{body}"
        );
        assert!(body.contains("# EOF"), "{body}");
    }
}
