//! quiesce-agent: freezes this host's filesystems for a coordinator, under a lease, and never
//! leaves them frozen.
//!
//! Layers: `service` (gRPC adapter) → `freeze` (state machine) → narrow traits for the
//! privileged world: `freezer::Freezer` (ioctls), `mounts::MountTable` (mountinfo),
//! `watchdog::Watchdog` (who thaws if the agent dies), and the `reflink` provider.

pub mod cloud;
pub mod config;
pub mod error;
pub mod freeze;
pub mod freezer;
pub mod guardian;
pub mod hooks;
pub mod lease;
pub mod metrics;
pub mod mounts;
pub mod records;
pub mod recovery;
pub mod reflink;
pub mod restore;
pub mod safepath;
pub mod server;
pub mod service;
pub mod startup;
pub mod thaw_marks;
pub mod verify;
pub mod volumes;
pub mod watchdog;

pub use error::Error;
