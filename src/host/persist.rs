//! Keeps the state file in step with the exec context. A save while the
//! filesystem is frozen is deferred to the next thaw, so that no request
//! ever blocks on the frozen disk. Saves go to disk one at a time, in the
//! order they were made; every save carries the template-process record,
//! which `restore` owns.

use std::sync::{Arc, Mutex};

use super::fsfreeze::FsFreezer;
use crate::context::state::{SavedContext, StateFile};
use crate::record::TemplateRecord;

/// Writes the exec context to disk when it changes.
#[derive(Debug)]
pub struct Persister {
    file: StateFile,
    freezer: Arc<FsFreezer>,
    last_saved: Mutex<Option<SavedContext>>,
    deferred: Mutex<Option<SavedContext>>,
    /// The newest template-process record.
    template_processes: Mutex<TemplateRecord>,
    /// One save at a time.
    writing: tokio::sync::Mutex<()>,
}

impl Persister {
    /// A persister of `file`; `loaded` is what it holds already.
    pub fn new(file: StateFile, freezer: Arc<FsFreezer>, loaded: Option<SavedContext>) -> Arc<Self> {
        let template_processes = loaded.as_ref().map(|l| l.template_processes.clone()).unwrap_or_default();
        let persister = Arc::new(Self {
            file,
            freezer,
            last_saved: Mutex::new(loaded),
            deferred: Mutex::default(),
            template_processes: Mutex::new(template_processes),
            writing: Default::default(),
        });
        tokio::spawn(flush_after_thaws(persister.clone()));
        persister
    }

    /// Saves `context` (with the newest template-process record) unless it
    /// is what the file already holds. Returns once it is durable, or
    /// deferred because the filesystem is frozen.
    pub async fn save(&self, mut context: SavedContext) {
        let _one_at_a_time = self.writing.lock().await;
        context.template_processes = self.template_processes.lock().unwrap_or_else(|e| e.into_inner()).clone();
        self.write(context).await;
    }

    /// Saves the template-process record with the newest exec context.
    /// Before any exec context was saved it is only kept, for the first save.
    pub async fn save_template_processes(&self, record: TemplateRecord) {
        let _one_at_a_time = self.writing.lock().await;
        *self.template_processes.lock().unwrap_or_else(|e| e.into_inner()) = record.clone();
        let deferred = self.deferred.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let newest = deferred.or_else(|| self.last_saved.lock().unwrap_or_else(|e| e.into_inner()).clone());
        if let Some(mut context) = newest {
            context.template_processes = record;
            self.write(context).await;
        }
    }

    async fn write(&self, context: SavedContext) {
        if self.last_saved.lock().unwrap_or_else(|e| e.into_inner()).as_ref() == Some(&context) {
            return;
        }
        let file = self.file.clone();
        let to_write = context.clone();
        match self.freezer.while_writable(move || file.save(&to_write)).await {
            Some(Ok(())) => {
                *self.last_saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(context);
            }
            Some(Err(err)) => tracing::error!("saving the exec context: {err}"),
            None => {
                tracing::info!("filesystem frozen: exec context will be saved after the thaw");
                *self.deferred.lock().unwrap_or_else(|e| e.into_inner()) = Some(context);
            }
        }
    }
}

async fn flush_after_thaws(persister: Arc<Persister>) {
    let mut thaws = persister.freezer.thaws();
    while thaws.changed().await.is_ok() {
        let deferred = persister.deferred.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(context) = deferred {
            persister.save(context).await;
        }
    }
}
