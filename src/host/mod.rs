//! What comes from or goes to the host: `/init`, the metadata service,
//! the persisted exec context, metrics, and the pause hooks (workload and
//! filesystem freezes, hugepage collapse).

pub mod cgroups;
pub mod clock;
pub mod collapse;
pub mod fsfreeze;
pub mod identity;
pub mod init;
pub mod metrics;
pub mod mmds;
pub mod persist;
pub mod systemd;
pub mod workload_freeze;
