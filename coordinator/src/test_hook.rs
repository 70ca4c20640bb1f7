//! Deterministic crash points for the process-level fault tests.
//!
//! With `QUIESCE_TEST_PAUSE_AFTER=<point>` in its environment, the coordinator stops making
//! progress forever right after it has persisted `<point>` of a set, so that a test can
//! SIGKILL it at exactly that phase and check what a restart recovers. With
//! `<point>:<duration>` (e.g. `frozen:2s`) it pauses that long and carries on, so that a test
//! can kill or stop an agent at that point. Points, in order:
//! `planned` (plan done, nothing prepared), `freezing` (phase persisted, no freeze sent),
//! `frozen` (every member frozen, no snapshot), `snapshotted` (snapshots made, still frozen),
//! `thawing` (phase persisted, no thaw sent), `thawed` (thawed, verdict stored, not committed).
//! Nothing else reads the variable; unset, this is a no-op.

use tracing::warn;

pub const PAUSE_ENV: &str = "QUIESCE_TEST_PAUSE_AFTER";

pub async fn pause_after(point: &str) {
    let Ok(wanted) = std::env::var(PAUSE_ENV) else {
        return;
    };
    let (name, pause) = match wanted.split_once(':') {
        Some((name, duration)) => (name, humantime::parse_duration(duration).ok()),
        None => (wanted.as_str(), None),
    };
    if name != point {
        return;
    }
    match pause {
        Some(pause) => {
            warn!(point, ?pause, "test hook {PAUSE_ENV}: pausing");
            tokio::time::sleep(pause).await;
        }
        None => {
            warn!(
                point,
                "test hook {PAUSE_ENV}: paused for good after this point (kill me)"
            );
            std::future::pending::<()>().await;
        }
    }
}
