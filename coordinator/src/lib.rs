//! quiesce-coordinator: sequences consistency groups across agents and keeps the catalog.
//!
//! Layers: `service` (operator gRPC adapter) → `workflow` (one set's state machine) and
//! `operations` → narrow traits: `agent_client::AgentClient`, `provider::SnapshotProvider`,
//! and the SQLite `catalog`.

pub mod agent_audit;
pub mod agent_client;
pub mod audit;
pub mod authz;
pub mod catalog;
pub mod clock;
pub mod completion;
pub mod config;
pub mod ebs;
pub mod error;
pub mod fake_agent;
pub mod metrics;
pub mod operations;
pub mod pki;
pub mod provider;
pub mod reconcile;
pub mod reload;
pub mod retention;
pub mod scheduler;
pub mod server;
pub mod service;
pub mod shell;
pub mod test_hook;
pub mod windows;
pub mod workflow;

pub use error::Error;
