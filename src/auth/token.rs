//! The access token. Held only in memory: after a cold boot its SHA-512
//! hash from the metadata service stands in until `/init` brings the token.

use std::sync::{Arc, RwLock};

use super::{constant_time_eq, sha512_hex};

/// A secret string whose `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The value, for comparisons and signatures only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[derive(Debug, Default)]
struct State {
    /// The token set by the last authorised `/init`.
    token: Option<Secret>,
    /// SHA-512 hex of the token, from the metadata service, when the
    /// sandbox is secured (never the hash of the empty token).
    token_hash: Option<String>,
    /// The sandbox was secured before a cold boot and neither the token
    /// nor its hash is known yet: refuse everything that needs a token.
    fail_closed: bool,
}

/// The guard's whole state (the token itself: never log or persist it).
#[derive(Debug, Clone, Default)]
pub struct AuthState {
    /// The token.
    pub token: Option<Secret>,
    /// Its hash from the metadata service.
    pub token_hash: Option<String>,
    /// Closed until one of them is known.
    pub fail_closed: bool,
}

/// Decides whether a request's `X-Access-Token` lets it through.
#[derive(Debug, Clone)]
pub struct AccessGuard {
    state: Arc<RwLock<State>>,
    /// Bumped whenever the token or its hash changes.
    changes: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for AccessGuard {
    fn default() -> Self {
        Self { state: Arc::default(), changes: Arc::new(tokio::sync::watch::channel(0).0) }
    }
}

/// The outcome of checking a request's token header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No token is enforced.
    Open,
    /// The header carries the right token.
    Granted,
    /// A token is required and the header does not carry it.
    Denied,
}

impl AccessGuard {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks an `X-Access-Token` header value.
    pub fn check(&self, header: Option<&[u8]>) -> Access {
        let state = self.read();
        if let Some(token) = &state.token {
            return match header {
                Some(given) if constant_time_eq(given, token.expose().as_bytes()) => Access::Granted,
                _ => Access::Denied,
            };
        }
        if let Some(hash) = &state.token_hash {
            let given = header.and_then(|h| std::str::from_utf8(h).ok());
            return match given {
                Some(given) if constant_time_eq(sha512_hex(given).as_bytes(), hash.as_bytes()) => Access::Granted,
                _ => Access::Denied,
            };
        }
        if state.fail_closed { Access::Denied } else { Access::Open }
    }

    /// Checks a header, first waiting up to `patience` for the token hash
    /// when envd is closed only because it has not read the hash yet (the
    /// first moments after a cold boot): a client holding the right token
    /// is then let in instead of refused.
    pub async fn check_patiently(&self, header: Option<&[u8]>, patience: std::time::Duration) -> Access {
        let mut changes = self.changes.subscribe();
        let access = self.check(header);
        if access != Access::Denied || !self.awaiting_hash() {
            return access;
        }
        let _ = tokio::time::timeout(patience, changes.wait_for(|_| !self.awaiting_hash())).await;
        self.check(header)
    }

    fn awaiting_hash(&self) -> bool {
        let state = self.read();
        state.fail_closed && state.token.is_none() && state.token_hash.is_none()
    }

    /// The raw token, when known (needed to verify signed URLs).
    pub fn token(&self) -> Option<Secret> {
        self.read().token.clone()
    }

    /// Whether any token requirement is in force.
    pub fn is_secured(&self) -> bool {
        let state = self.read();
        state.token.is_some() || state.token_hash.is_some() || state.fail_closed
    }

    /// True when `candidate` is the token in memory.
    pub fn matches_token(&self, candidate: &str) -> bool {
        self.read().token.as_ref().is_some_and(|t| constant_time_eq(t.expose().as_bytes(), candidate.as_bytes()))
    }

    /// Sets (or, with `None`, clears) the token. Knowing the token makes
    /// the hash and the fail-closed state obsolete.
    pub fn set_token(&self, token: Option<Secret>) {
        let mut state = self.write();
        state.token = token;
        state.token_hash = None;
        state.fail_closed = false;
        drop(state);
        self.changes.send_modify(|n| *n += 1);
    }

    /// Records the token hash from the metadata service. The hash of the
    /// empty token means "no token": the sandbox is open.
    pub fn set_token_hash(&self, hash: &str) {
        let mut state = self.write();
        if state.token.is_some() {
            return;
        }
        let hash = hash.trim().to_ascii_lowercase();
        if hash.is_empty() {
            return;
        }
        state.token_hash = (hash != sha512_hex("")).then_some(hash);
        state.fail_closed = false;
        drop(state);
        self.changes.send_modify(|n| *n += 1);
    }

    /// Everything the guard knows, to hand to another image of envd.
    pub fn export(&self) -> AuthState {
        let state = self.read();
        AuthState { token: state.token.clone(), token_hash: state.token_hash.clone(), fail_closed: state.fail_closed }
    }

    /// Takes over what another image of envd knew.
    pub fn restore(&self, auth: AuthState) {
        let mut state = self.write();
        state.token = auth.token;
        state.token_hash = auth.token_hash;
        state.fail_closed = auth.fail_closed;
        drop(state);
        self.changes.send_modify(|n| *n += 1);
    }

    /// Refuse token-protected requests until the token or its hash is known.
    pub fn close_until_known(&self) {
        let mut state = self.write();
        if state.token.is_none() && state.token_hash.is_none() {
            state.fail_closed = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_until_token_set() {
        let guard = AccessGuard::default();
        assert_eq!(guard.check(None), Access::Open);
        guard.set_token(Some(Secret::new("t0k".into())));
        assert_eq!(guard.check(None), Access::Denied);
        assert_eq!(guard.check(Some(b"nope")), Access::Denied);
        assert_eq!(guard.check(Some(b"t0k")), Access::Granted);
        guard.set_token(None);
        assert_eq!(guard.check(None), Access::Open);
    }

    #[test]
    fn hash_stands_in_for_the_token() {
        let guard = AccessGuard::default();
        guard.set_token_hash(&sha512_hex("secret"));
        assert_eq!(guard.check(Some(b"secret")), Access::Granted);
        assert_eq!(guard.check(Some(b"other")), Access::Denied);
        assert!(guard.token().is_none());
        guard.set_token_hash(&sha512_hex(""));
        assert_eq!(guard.check(None), Access::Open);
    }

    #[test]
    fn fail_closed_until_known() {
        let guard = AccessGuard::default();
        guard.close_until_known();
        assert_eq!(guard.check(Some(b"anything")), Access::Denied);
        guard.set_token_hash(&sha512_hex("secret"));
        assert_eq!(guard.check(Some(b"secret")), Access::Granted);
    }

    #[tokio::test]
    async fn a_closed_guard_waits_briefly_for_the_hash() {
        let guard = AccessGuard::default();
        guard.close_until_known();
        let later = guard.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            later.set_token_hash(&sha512_hex("secret"));
        });
        let patience = std::time::Duration::from_secs(5);
        assert_eq!(guard.check_patiently(Some(b"secret"), patience).await, Access::Granted);
        assert_eq!(guard.check_patiently(Some(b"wrong"), patience).await, Access::Denied);
    }

    #[tokio::test]
    async fn patience_ends() {
        let guard = AccessGuard::default();
        guard.close_until_known();
        let patience = std::time::Duration::from_millis(50);
        assert_eq!(guard.check_patiently(Some(b"secret"), patience).await, Access::Denied);
    }

    #[test]
    fn debug_hides_the_secret() {
        assert!(!format!("{:?}", Secret::new("hunter2".into())).contains("hunter2"));
    }
}
