//! What comes from or goes to the host: `/init`, metrics, and (with the
//! lifecycle work) the metadata service and the pause hooks.

pub mod clock;
pub mod init;
pub mod metrics;
