//! The Quiesce integration-test harness: real loop filesystems, the real binaries over mTLS, a
//! test PKI, and a writer process that measures how long writes stall while a volume is frozen.
//!
//! # Safety rules every helper keeps
//! - Only filesystems a test made are ever frozen: [`LoopFs`] images under `/var/tmp`,
//!   loop-attached and mounted by the test. Every freeze probe first checks that the mount point
//!   really is that loop device ([`LoopFs::is_frozen`]); the in-process agent runs with
//!   [`GuardedFreezer`], which lets the real ioctls through only for the test's own devices.
//! - Every guard that owns a mounted filesystem thaws it (`fsfreeze -u`, errors ignored) before
//!   it unmounts, in `Drop`, so a failing or panicking test never leaves anything frozen.
//! - A write to a frozen filesystem blocks in uninterruptible sleep (SIGKILL waits for the thaw).
//!   Such writes happen only in child processes ([`Writer`], [`write_completes_within`]); the
//!   test thread never writes to a filesystem that may be frozen.
//! - Scratch directories are never removed while anything is still mounted below them.
//! - Network: 127.0.0.1 only (multi-host labs: 127.0.0.0/8).
//!
//! # One skip policy
//! A test that needs something this machine lacks (root, loop devices, a tool, moto) calls
//! [`require`] (or [`require_root`]) first, and **fails**, naming what is missing — under CI and
//! outside it. Nothing passes by returning early. CI and `scripts/test` run as root with the
//! tools installed; to leave the root tests out elsewhere, run
//! `cargo test --workspace --exclude quiesce-integration-tests`.
//!
//! # Layout of a test
//! ```text
//! let _serial = serial();                      // one test at a time per test binary
//! require_root();                              // fails (never skips) without root
//! let scratch = Scratch::new("my-test");       // /var/tmp/quiesce-it.my-test.PID.N
//! let vol = LoopFs::create(&scratch.join("a.img"), 128, FsKind::Ext4, &scratch.join("a"));
//! ...                                          // guards drop in reverse: thaw, umount, detach
//! ```
//!
//! Binaries: the product's (`quiesce-agent`, `quiesce-coordinator`, `quiescectl`) are looked up
//! in `$QUIESCE_BIN_DIR`, else next to the test executable (`target/debug`); build them first
//! the way `scripts/test` does (`cargo build --workspace --bins`: this crate enables the
//! coordinator's `fault-injection` and both products' `testing` features, so the binaries
//! carry the pause points the fault tests use). This crate's own `quiesce-writer` is always
//! taken from next to the test executable (cargo builds it for the integration tests).
//!
//! # Modules
//! Each section of the harness is a module; everything public is re-exported here, so tests
//! `use quiesce_integration_tests::{...}` without naming modules.
//! - [`env`]: the skip policy, test serialisation, binaries, tools, command runners, TOML text;
//! - [`mounts`]: the mount table and unmounting; [`scratch`]: per-test directories;
//! - [`loopfs`]: loop filesystems, the reflink pool, tmpfs and bind mounts;
//! - [`probes`] and [`writer`]: what a frozen filesystem does to writers;
//! - [`in_process`]: the agent's freeze state machine in the test process;
//! - [`pki`]: a test CA; [`process`]: the real daemons as child processes, `quiescectl`;
//! - [`cluster`]: one agent and one coordinator process on a pool;
//! - [`multihost`]: a [`multihost::Lab`] of several agents on 127.0.0.x (also the hooks tests'
//!   lab); [`faults`]: fault scenarios; [`proxy`]: a black-hole TCP proxy.

pub mod browser;
pub mod cluster;
pub mod env;
pub mod faults;
pub mod fragmented;
pub mod in_process;
pub mod loopfs;
pub mod mounts;
pub mod multihost;
pub mod pgshards;
pub mod pki;
pub mod probes;
pub mod process;
pub mod proxy;
pub mod safety;
pub mod scratch;
pub mod writer;

pub use cluster::*;
pub use env::*;
pub use in_process::*;
pub use loopfs::*;
pub use mounts::*;
pub use pki::*;
pub use probes::*;
pub use process::*;
pub use scratch::*;
pub use writer::*;
