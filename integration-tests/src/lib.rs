pub mod multihost;
