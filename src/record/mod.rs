//! What envd writes down to find again after a restart, a cold boot or
//! an upgrade, as plain serde types with no behaviour of their own: the
//! bottom layer, so that `context`, `host`, `restore` and `upgrade` can all
//! read them without depending on one another (docs/ARCHITECTURE.md).

pub mod fds;
pub mod template;
pub mod volume;

pub use fds::{CarriedFds, Carry, NamesFds, carry_into};
pub use template::{RecordedStdio, TemplateProcess, TemplateRecord};
pub use volume::VolumeMount;
