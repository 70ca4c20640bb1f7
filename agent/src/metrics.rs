//! Prometheus metrics of the agent, served as text on `metrics-listen` (`GET /metrics`).
//!
//! One process-wide registry: the freeze state machine reports into [`METRICS`] where things
//! happen (a freeze taken, a freeze ended and why, how long FITHAW took).

use std::future::Future;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::warn;

type Labels = Vec<(String, String)>;

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
    // 0.5 ms … ~16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
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
            hook_seconds: Family::new_with_constructor(histogram as fn() -> Histogram),
        };
        let mut registry = Registry::with_prefix("quiesce_agent");
        registry.register(
            "freezes",
            "Sets frozen (every FIFREEZE of the set returned)",
            metrics.freezes.clone(),
        );
        registry.register(
            "freezes_ended",
            "Freezes ended, by how: thawed (by the coordinator), lease-expired, max-freeze, shutdown, external-thaw",
            metrics.ended.clone(),
        );
        registry.register(
            "freeze_seconds",
            "First FIFREEZE started to last FIFREEZE returned, per set",
            metrics.freeze_seconds.clone(),
        );
        registry.register(
            "thaw_seconds",
            "Time the FITHAWs of one set took",
            metrics.thaw_seconds.clone(),
        );
        registry.register(
            "write_stall_seconds",
            "First FIFREEZE started to last FITHAW returned, per set",
            metrics.stall_seconds.clone(),
        );
        registry.register(
            "hook_seconds",
            "Database hook durations, by hook and phase",
            metrics.hook_seconds.clone(),
        );
        *metrics.registry.lock().unwrap() = registry;
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
        assert!(body.contains("# EOF"), "{body}");
    }
}
