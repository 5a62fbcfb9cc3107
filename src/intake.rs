//! Holding the listening sockets still while an upgrade hands them over:
//! from just before the handover is written until the exec, nothing
//! accepts, so a connection made then waits in the kernel's backlog for the
//! next image instead of being accepted by this one and closed by the exec.
//! If the upgrade fails, accepting resumes.

use tokio::sync::watch;

/// Shared by the upgrade (which holds) and every accept loop (which waits).
#[derive(Debug)]
pub struct Intake {
    held: watch::Sender<bool>,
}

impl Default for Intake {
    fn default() -> Self {
        Self { held: watch::channel(false).0 }
    }
}

impl Intake {
    /// Stops every accept loop until the guard is dropped.
    pub fn hold(&self) -> IntakeHold<'_> {
        self.held.send_replace(true);
        IntakeHold { intake: self }
    }

    /// What an accept loop watches.
    pub fn watch(&self) -> IntakeWatch {
        IntakeWatch(self.held.subscribe())
    }
}

/// Accepting resumes when dropped (an exec that succeeds never drops it).
#[derive(Debug)]
pub struct IntakeHold<'a> {
    intake: &'a Intake,
}

impl Drop for IntakeHold<'_> {
    fn drop(&mut self) {
        self.intake.held.send_replace(false);
    }
}

/// An accept loop's view of the intake.
#[derive(Debug, Clone)]
pub struct IntakeWatch(watch::Receiver<bool>);

impl IntakeWatch {
    /// `accept`'s result, or `None` once the intake was held and has opened
    /// again (the accept was abandoned: it must be cancel-safe, and the
    /// caller simply accepts again).
    pub async fn unless_held<T>(&mut self, accept: impl std::future::Future<Output = T>) -> Option<T> {
        tokio::select! {
            biased;
            _ = self.0.wait_for(|held| *held) => {}
            accepted = accept => return Some(accepted),
        }
        let _ = self.0.wait_for(|held| !*held).await;
        None
    }
}
