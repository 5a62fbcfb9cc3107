//! Who may call `/init` (CONTRACT.md 4.5): the token in memory, the
//! metadata service's hash, or first-time setup. Apart from the applying
//! of `/init` ([`super`]) because it decides, from the guard and the
//! metadata alone, before anything is applied.

use super::InitError;
use crate::auth::{AccessGuard, sha512_hex};
use crate::host::identity::Identity;

/// The token hash the metadata service holds, looked up on demand.
pub(super) trait TokenHashSource: Send + Sync {
    /// The current `accessTokenHash`, or `None` when unreachable or empty.
    fn token_hash(&self) -> impl std::future::Future<Output = Option<String>> + Send;
}

impl TokenHashSource for Option<Identity> {
    async fn token_hash(&self) -> Option<String> {
        match self {
            Some(identity) => identity.token_hash().await,
            None => None,
        }
    }
}

/// CONTRACT.md 4.5: the token in memory, else the metadata hash, else
/// first-time setup. A sandbox that is secured by a hash or closed after
/// a cold boot is never open to first-time setup.
pub(super) async fn authorize(
    guard: &AccessGuard,
    token: Option<&str>,
    metadata: &impl TokenHashSource,
) -> Result<(), InitError> {
    if let Some(token) = token
        && guard.matches_token(token)
    {
        return Ok(());
    }
    let hash = metadata.token_hash().await;
    if let Some(hash) = &hash {
        let given = sha512_hex(token.unwrap_or(""));
        if crate::auth::constant_time_eq(given.as_bytes(), hash.to_ascii_lowercase().as_bytes()) {
            return Ok(());
        }
    }
    if hash.is_none() && !guard.is_secured() {
        return Ok(());
    }
    if hash.is_none()
        && guard.token().is_none()
        && let Some(token) = token
        && crate::auth::token::Access::Granted == guard.check(Some(token.as_bytes()))
    {
        // Cold boot with the metadata service gone again: the hash
        // learnt at start-up still recognises the token.
        return Ok(());
    }
    Err(InitError::Unauthorized(if token.is_none() {
        "access token reset not authorized"
    } else {
        "access token validation failed"
    }))
}
