//! Filesystem operations for the Filesystem service and the `/files` API.
