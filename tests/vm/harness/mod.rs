//! The pieces of the VM end-to-end test (tests/vm_e2e.rs): a qemu VM with
//! QMP, a metadata service, an HTTP/Connect client for envd, and disk
//! image handling. See tests/vm/README.md.

pub mod disk;
pub mod envd;
pub mod forward;
pub mod host_setup;
pub mod http;
pub mod mmds;
pub mod pause_flush;
pub mod qemu;
pub mod reattach;
pub mod restored_processes;
pub mod upgrade;
