//! `fault-latencies [--runs N] [--lease-ms MS]`: repeats every fault-injection scenario and
//! prints, per fault, how long a writer blocked on the frozen volume waited after the fault
//! (median and max over the runs), as the markdown table in docs/fault-latencies.md.
//!
//! Needs root (loop devices) and the built binaries (`cargo build --workspace --bins`).
//! Run (after `cargo build --workspace --all-targets`):
//! `QUIESCE_BIN_DIR=$CARGO_TARGET_DIR/debug $CARGO_TARGET_DIR/debug/fault-latencies --runs 5`

use std::time::Duration;

use quiesce_integration_tests::faults::{self, Fault, median_max};

fn main() {
    let mut runs = 5usize;
    let mut lease_ms = 1500u64;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().and_then(|v| v.parse::<u64>().ok());
        match (arg.as_str(), value) {
            ("--runs", Some(n)) if n > 0 => runs = n as usize,
            ("--lease-ms", Some(ms)) if ms >= 100 => lease_ms = ms,
            _ => {
                eprintln!("usage: fault-latencies [--runs N] [--lease-ms MS>=100]");
                std::process::exit(2);
            }
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("fault-latencies: needs root (loop devices, FIFREEZE)");
        std::process::exit(1);
    }
    let lease = Duration::from_millis(lease_ms);
    println!(
        "| fault | thawed by | set lease | runs | median | max | set decided (median / max) | set state |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for fault in Fault::ALL {
        let mut latencies = Vec::new();
        let mut states = Vec::new();
        let mut decided = Vec::new();
        let mut set_lease = lease;
        for _ in 0..runs {
            let outcome = faults::run(fault, lease);
            eprintln!(
                "{fault}: {} ms, set {} ({})",
                outcome.thaw_latency.as_millis(),
                outcome.state,
                outcome.error
            );
            set_lease = outcome.lease;
            decided.push(outcome.decided);
            latencies.push(outcome.thaw_latency);
            states.push(outcome.state);
        }
        states.sort();
        states.dedup();
        let (median, max) = median_max(&mut latencies);
        let (decided_median, decided_max) = median_max(&mut decided);
        println!(
            "| {fault} | {} | {} ms | {runs} | {} ms | {} ms | {} ms / {} ms | {} |",
            fault.thawed_by(),
            set_lease.as_millis(),
            median.as_millis(),
            max.as_millis(),
            decided_median.as_millis(),
            decided_max.as_millis(),
            states.join(", ")
        );
    }
}
