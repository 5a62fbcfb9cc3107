//! The Filesystem service: translates Connect messages to `crate::fs` and
//! back. Paths resolve for the caller (Basic-header user, else the default
//! user); blocking filesystem work runs off the async workers.

use std::path::PathBuf;
use std::sync::Arc;

use connectrpc::{ConnectError, RequestContext, Response, ServiceRequest, ServiceResult, ServiceStream};
use futures_util::StreamExt;

use super::errors::RpcError;
use super::state::AppState;
use super::stream::{keepalive_interval, until_deadline, with_keepalive};
use crate::context::User;
use crate::fs::watch::{EventKind, FsEvent, WatchOptions, Watcher};
use crate::fs::{self, Entry, FileKind, FsError, InotifyBudget, Owner};
use crate::proto::filesystem as pb;

/// Very old Python SDKs (`User-Agent: connect-python`) know only the
/// first fields of `EntryInfo` and `FilesystemEvent` (CONTRACT 1.14).
const LEGACY_USER_AGENT: &str = "connect-python";
const LEGACY_HEADER: &str = "x-e2b-legacy-sdk";

/// The Filesystem service.
#[derive(Debug)]
pub struct FilesystemService {
    state: Arc<AppState>,
    /// Shared by `WatchDir` streams and the polling watchers.
    inotify: InotifyBudget,
}

impl FilesystemService {
    /// A service over the shared state.
    pub fn new(state: Arc<AppState>) -> Self {
        let inotify = state.inotify.clone();
        Self { state, inotify }
    }

    /// The caller and `path` resolved for it, once a volume it lies in is
    /// mounted (bounded; free when no volume is being mounted).
    async fn resolve(&self, ctx: &RequestContext, path: &str) -> Result<(User, PathBuf), ConnectError> {
        let user = self.state.caller(ctx)?;
        let resolved = self.state.context.snapshot().resolve_path(path, &user)?;
        self.state.volumes.wait_ready(Some(&resolved)).await;
        Ok((user, resolved))
    }
}

/// Runs blocking filesystem work on the blocking pool.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, FsError> + Send + 'static,
) -> Result<T, ConnectError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result.map_err(ConnectError::from),
        Err(err) => Err(RpcError::FsTask(err).into()),
    }
}

fn is_legacy(ctx: &RequestContext) -> bool {
    ctx.headers().get(http::header::USER_AGENT).is_some_and(|ua| ua.as_bytes() == LEGACY_USER_AGENT.as_bytes())
}

/// Marks a legacy response as the reference does.
fn respond<T>(ctx: &RequestContext, body: T) -> ServiceResult<T> {
    let response = Response::new(body);
    Ok(if is_legacy(ctx) { response.with_header(LEGACY_HEADER, "true") } else { response })
}

fn entry_to_pb(entry: Entry, legacy: bool) -> pb::EntryInfo {
    let kind = match entry.kind {
        FileKind::File => pb::FileType::FILE_TYPE_FILE,
        FileKind::Directory => pb::FileType::FILE_TYPE_DIRECTORY,
        FileKind::Unspecified => pb::FileType::FILE_TYPE_UNSPECIFIED,
    };
    let mut info = pb::EntryInfo { name: entry.name, r#type: kind.into(), path: entry.path, ..Default::default() };
    if legacy {
        return info;
    }
    info.size = entry.size;
    info.mode = entry.mode;
    info.permissions = entry.permissions;
    info.owner = entry.owner;
    info.group = entry.group;
    info.modified_time = entry
        .modified
        .map(|(seconds, nanos)| buffa_types::google::protobuf::Timestamp { seconds, nanos, ..Default::default() })
        .into();
    info.symlink_target = entry.symlink_target;
    info.metadata = entry.metadata.into_iter().collect();
    info.is_symlink = entry.is_symlink;
    info
}

fn event_to_pb(event: FsEvent, legacy: bool) -> pb::FilesystemEvent {
    let kind = match event.kind {
        EventKind::Create => pb::EventType::EVENT_TYPE_CREATE,
        EventKind::Write => pb::EventType::EVENT_TYPE_WRITE,
        EventKind::Remove => pb::EventType::EVENT_TYPE_REMOVE,
        EventKind::Rename => pb::EventType::EVENT_TYPE_RENAME,
        EventKind::Chmod => pb::EventType::EVENT_TYPE_CHMOD,
    };
    let entry = event.entry.filter(|_| !legacy).map(|e| entry_to_pb(e, false));
    pb::FilesystemEvent { name: event.name, r#type: kind.into(), entry: entry.into(), ..Default::default() }
}

fn watch_options(recursive: bool, include_entry: bool, allow_network_mounts: bool) -> WatchOptions {
    WatchOptions { recursive, include_entry, allow_network_mounts }
}

fn watch_response(event: impl Into<pb::__buffa::oneof::watch_dir_response::Event>) -> pb::WatchDirResponse {
    pb::WatchDirResponse { event: Some(event.into()), ..Default::default() }
}

/// Start event, then events and keep-alives; a watcher error ends the
/// stream with that error after the events before it.
fn watch_stream(watcher: Watcher, ctx: &RequestContext) -> ServiceStream<pb::WatchDirResponse> {
    let legacy = is_legacy(ctx);
    let failure = Arc::new(std::sync::Mutex::new(None::<ConnectError>));
    let slot = failure.clone();
    let events = futures_util::stream::unfold((watcher, slot), move |(mut watcher, slot)| async move {
        match watcher.next().await {
            Ok(event) => Some((watch_response(event_to_pb(event, legacy)), (watcher, slot))),
            Err(err) => {
                tracing::warn!("watcher failed: {err}");
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(err.into());
                None
            }
        }
    });
    let start = watch_response(pb::watch_dir_response::StartEvent::default());
    let keepalive = || watch_response(pb::watch_dir_response::KeepAlive::default());
    let live = with_keepalive(start, Box::pin(events), keepalive_interval(ctx.headers()), keepalive);
    let end = futures_util::stream::once(async move { failure.lock().unwrap_or_else(|e| e.into_inner()).take() })
        .filter_map(|error| async move { error.map(Err) });
    Box::pin(live.chain(end))
}

#[allow(refining_impl_trait)]
impl pb::Filesystem for FilesystemService {
    async fn stat(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, pb::StatRequest>,
    ) -> ServiceResult<pb::StatResponse> {
        let (_, path) = self.resolve(&ctx, request.to_owned_message().path.as_str()).await?;
        let entry = blocking(move || fs::ops::stat(&path)).await?;
        respond(&ctx, pb::StatResponse { entry: entry_to_pb(entry, is_legacy(&ctx)).into(), ..Default::default() })
    }

    async fn make_dir(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, pb::MakeDirRequest>,
    ) -> ServiceResult<pb::MakeDirResponse> {
        let (user, path) = self.resolve(&ctx, request.to_owned_message().path.as_str()).await?;
        let entry = blocking(move || fs::ops::make_dir(&path, Owner::from(&user))).await?;
        respond(&ctx, pb::MakeDirResponse { entry: entry_to_pb(entry, is_legacy(&ctx)).into(), ..Default::default() })
    }

    async fn r#move(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, pb::MoveRequest>,
    ) -> ServiceResult<pb::MoveResponse> {
        let request = request.to_owned_message();
        let (user, source) = self.resolve(&ctx, &request.source).await?;
        let (_, destination) = self.resolve(&ctx, &request.destination).await?;
        let entry = blocking(move || fs::ops::rename(&source, &destination, Owner::from(&user))).await?;
        respond(&ctx, pb::MoveResponse { entry: entry_to_pb(entry, is_legacy(&ctx)).into(), ..Default::default() })
    }

    async fn list_dir(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, pb::ListDirRequest>,
    ) -> ServiceResult<pb::ListDirResponse> {
        let request = request.to_owned_message();
        let (_, path) = self.resolve(&ctx, &request.path).await?;
        let entries = blocking(move || fs::ops::list_dir(&path, request.depth)).await?;
        let legacy = is_legacy(&ctx);
        let entries = entries.into_iter().map(|e| entry_to_pb(e, legacy)).collect();
        respond(&ctx, pb::ListDirResponse { entries, ..Default::default() })
    }

    async fn remove(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, pb::RemoveRequest>,
    ) -> ServiceResult<pb::RemoveResponse> {
        let (_, path) = self.resolve(&ctx, request.to_owned_message().path.as_str()).await?;
        blocking(move || fs::ops::remove(&path)).await?;
        respond(&ctx, pb::RemoveResponse::default())
    }

    async fn watch_dir(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, pb::WatchDirRequest>,
    ) -> ServiceResult<ServiceStream<pb::WatchDirResponse>> {
        let request = request.to_owned_message();
        let (_, path) = self.resolve(&ctx, &request.path).await?;
        let options = watch_options(request.recursive, request.include_entry, request.allow_network_mounts);
        let inotify = self.inotify.clone();
        let watcher = blocking(move || Watcher::start(&path, options, &inotify)).await?;
        // The deadline bounds the watch: the watcher is dropped with the stream.
        let stream = until_deadline(watch_stream(watcher, &ctx), ctx.deadline());
        respond(&ctx, stream)
    }

    async fn create_watcher(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, pb::CreateWatcherRequest>,
    ) -> ServiceResult<pb::CreateWatcherResponse> {
        let request = request.to_owned_message();
        let (_, path) = self.resolve(&ctx, &request.path).await?;
        let options = watch_options(request.recursive, request.include_entry, request.allow_network_mounts);
        let watcher_id = self.state.watchers.create(path, options).await?;
        respond(&ctx, pb::CreateWatcherResponse { watcher_id, ..Default::default() })
    }

    async fn get_watcher_events(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, pb::GetWatcherEventsRequest>,
    ) -> ServiceResult<pb::GetWatcherEventsResponse> {
        let events = self.state.watchers.poll(&request.to_owned_message().watcher_id).await?;
        let legacy = is_legacy(&ctx);
        let events = events.into_iter().map(|e| event_to_pb(e, legacy)).collect();
        respond(&ctx, pb::GetWatcherEventsResponse { events, ..Default::default() })
    }

    async fn remove_watcher(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, pb::RemoveWatcherRequest>,
    ) -> ServiceResult<pb::RemoveWatcherResponse> {
        self.state.watchers.remove(&request.to_owned_message().watcher_id).await?;
        respond(&ctx, pb::RemoveWatcherResponse::default())
    }
}
