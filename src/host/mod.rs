//! What comes from or goes to the host: `/init`, the metadata service,
//! the persisted exec context, metrics, the pause hooks (workload and
//! filesystem freezes, hugepage collapse), and what `/init` sets up in the
//! system (events address, CA bundle, NFS volumes).

pub mod ca_bundle;
mod cgroup_tree;
pub mod cgroups;
pub mod clock;
pub mod collapse;
pub mod command_cgroup;
pub mod disk_flush;
pub mod events_host;
mod freeze_state;
pub mod fsfreeze;
pub mod identity;
pub mod init;
pub mod metrics;
pub mod mmds;
pub mod mmds_route;
mod mountinfo;
pub mod persist;
pub mod provision;
pub mod system_files;
pub mod systemd;
pub mod volumes;
pub mod workload_freeze;
