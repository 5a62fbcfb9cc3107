//! The exec context: who runs a command by default, where, and with which
//! environment. After a cold boot it is rebuilt from the state file so
//! that commands run exactly as before the pause.

pub mod names;
pub mod paths;
pub mod state;
pub mod users;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

pub use paths::PathError;
pub use users::{User, UserError};

/// Env var names envd owns; `/init` cannot overwrite them.
pub const INTERNAL_ENV_VARS: [&str; 4] = ["E2B_SANDBOX", "E2B_SANDBOX_ID", "E2B_TEMPLATE_ID", "E2B_EVENTS_ADDRESS"];

/// The user a process or a file operation runs for, and where its paths go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecContext {
    /// Used when a request names no user.
    pub default_user: String,
    /// Used for an empty path or cwd; `None` means the user's home.
    pub default_workdir: Option<String>,
    /// The env vars of the last `/init`.
    pub init_env: BTreeMap<String, String>,
    /// envd's own vars (`E2B_SANDBOX`, sandbox and template ids).
    pub internal_env: BTreeMap<String, String>,
}

impl ExecContext {
    /// The default env vars every process gets: internal ones win over
    /// `/init` ones of the same name.
    pub fn default_env(&self) -> BTreeMap<String, String> {
        let mut env = self.init_env.clone();
        env.extend(self.internal_env.iter().map(|(k, v)| (k.clone(), v.clone())));
        env
    }

    /// The environment of a process, in the contract's order: later
    /// entries win (PATH, HOME, USER, LOGNAME < defaults < request).
    pub fn process_env<'a>(
        &self,
        user: &User,
        request: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Vec<(String, String)> {
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        env.insert("PATH".into(), std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.into()));
        env.insert("HOME".into(), user.home.to_string_lossy().into_owned());
        env.insert("USER".into(), user.name.clone());
        env.insert("LOGNAME".into(), user.name.clone());
        env.extend(self.default_env());
        env.extend(request.into_iter().map(|(k, v)| (k.clone(), v.clone())));
        env.into_iter().collect()
    }

    /// Resolves a request path for `user` (see [`paths::resolve`]).
    pub fn resolve_path(&self, path: &str, user: &User) -> Result<PathBuf, PathError> {
        paths::resolve(path, &user.home, self.default_workdir.as_deref())
    }
}

/// PATH for processes when envd itself has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The shared, current exec context.
#[derive(Debug, Clone)]
pub struct ContextStore {
    inner: Arc<RwLock<ExecContext>>,
}

impl ContextStore {
    /// A store holding `initial`.
    pub fn new(initial: ExecContext) -> Self {
        Self { inner: Arc::new(RwLock::new(initial)) }
    }

    /// A copy of the current context.
    pub fn snapshot(&self) -> ExecContext {
        self.inner.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Changes the context in place; returns what `f` returns.
    pub fn update<T>(&self, f: impl FnOnce(&mut ExecContext) -> T) -> T {
        let mut guard = self.inner.write().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    /// The user named by a request, or the default user when it names none.
    pub fn user(&self, requested: Option<&str>) -> Result<User, UserError> {
        match requested {
            Some(name) => users::lookup(name),
            None => {
                let name = self.inner.read().unwrap_or_else(|e| e.into_inner()).default_user.clone();
                users::lookup(&name)
            }
        }
    }
}
