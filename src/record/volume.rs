//! A volume as `/init` asks for it and the state file keeps it.

use serde::{Deserialize, Serialize};

/// One volume of `/init`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    /// `host:/export` of the NFS server.
    pub nfs_target: String,
    /// Where it is mounted in the sandbox.
    pub path: String,
}
