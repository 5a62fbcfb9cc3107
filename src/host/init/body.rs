//! The body of `/init` as the contract describes it, and its checks. Apart
//! from the applying of it ([`super`]) because the decode rules (borrowed
//! token, messages that never quote a value) are a concern of their own.

use std::collections::HashMap;
use std::time::SystemTime;

use serde::Deserialize;

use super::InitError;
use crate::host::clock;
use crate::record::VolumeMount;

/// The body of `/init`; every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct InitBody<'a> {
    /// Borrowed, so that a string with escapes is a decode error, as in
    /// the reference.
    #[serde(borrow, default)]
    pub(super) access_token: Option<&'a str>,
    #[serde(default)]
    pub(super) env_vars: Option<HashMap<String, String>>,
    #[serde(default)]
    pub(super) default_user: Option<String>,
    #[serde(default)]
    pub(super) default_workdir: Option<String>,
    #[serde(default)]
    pub(super) timestamp: Option<String>,
    #[serde(default, rename = "hyperloopIP")]
    pub(super) hyperloop_ip: Option<String>,
    #[serde(default)]
    pub(super) ca_bundle: Option<String>,
    #[serde(default)]
    pub(super) volume_mounts: Option<Vec<VolumeMount>>,
    #[serde(default, rename = "lifecycleID")]
    pub(super) lifecycle_id: Option<String>,
}

/// Parses and validates an `/init` body; an empty body means no fields.
pub(super) fn parse_body(body: &[u8]) -> Result<(InitBody<'_>, Option<SystemTime>), InitError> {
    let body: InitBody<'_> = if body.iter().all(u8::is_ascii_whitespace) {
        InitBody::default()
    } else {
        // serde's own message may quote the offending value, which can be
        // the token: say only where and what kind of error it was.
        serde_json::from_slice(body).map_err(|e| {
            InitError::BadBody(format!("{:?} error at line {} column {}", e.classify(), e.line(), e.column()))
        })?
    };
    if body.access_token == Some("") {
        return Err(InitError::BadBody("accessToken must not be empty".into()));
    }
    let timestamp = match &body.timestamp {
        Some(text) => Some(clock::parse_rfc3339(text).map_err(|e| InitError::BadBody(e.to_string()))?),
        None => None,
    };
    Ok((body, timestamp))
}
