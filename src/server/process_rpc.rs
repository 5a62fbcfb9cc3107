//! The Process service: translates Connect messages to the process module
//! and back. The work lives in `crate::process`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use connectrpc::{ConnectError, RequestContext, Response, ServiceRequest, ServiceResult, ServiceStream};
use futures_util::StreamExt;

use super::errors::RpcError;
use super::state::AppState;
use super::stream::{keepalive_interval, until_deadline, with_keepalive};
use crate::host::cgroups::{Placement, Slot};
use crate::process::spawn::StdioMode;
use crate::process::{self, CommandConfig, EndStatus, Event, Found, Output, Selector, StartSpec, Subscription};
use crate::proto::process as pb;
use crate::restore::Recipe;
use pb::__buffa::oneof::process_event::Event as PbEvent;
use pb::__buffa::oneof::process_event::data_event::Output as PbOutput;
use pb::__buffa::oneof::process_input::Input as PbInput;
use pb::__buffa::oneof::process_selector::Selector as PbSelector;
use pb::__buffa::oneof::stream_input_request::Event as PbInputEvent;

/// How long SendSignal waits for a SIGKILLed command's processes to go.
const SIGKILL_WAIT: Duration = Duration::from_secs(5);
/// How long it waits after SIGTERM, which a process may handle or ignore.
const SIGTERM_WAIT: Duration = Duration::from_secs(1);
/// Names the pids a signal left alive; absent when everything is gone.
const SURVIVORS_HEADER: &str = "envd-kill-survivors";

/// The Process service.
#[derive(Debug, Clone)]
pub struct ProcessService {
    state: Arc<AppState>,
}

impl ProcessService {
    /// A service over the shared state.
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }

    fn start_spec(&self, ctx: &RequestContext, request: pb::StartRequest) -> Result<StartSpec, ConnectError> {
        let user = self.state.caller(ctx)?;
        let config = request.process.into_option().unwrap_or_default();
        let context = self.state.context.snapshot();
        let cwd = context.resolve_path(config.cwd.as_deref().unwrap_or(""), &user)?;
        let env = context.process_env(&user, &config.envs);
        let stdio = match request.pty.as_option() {
            Some(pty) => {
                let size = pty.size.as_option().cloned().unwrap_or_default();
                StdioMode::Pty { cols: clamp_u16(size.cols), rows: clamp_u16(size.rows) }
            }
            None => StdioMode::Pipes { stdin: request.stdin.unwrap_or(true) },
        };
        let placement = Slot::for_process(request.tag.as_deref(), matches!(stdio, StdioMode::Pty { .. }))
            .map_or(Placement::Outside, |slot| self.state.workload.place(slot));
        Ok(StartSpec {
            config: CommandConfig {
                cmd: config.cmd,
                args: config.args,
                envs: config.envs.into_iter().collect(),
                cwd: config.cwd,
            },
            tag: request.tag,
            user,
            cwd,
            env,
            stdio,
            deadline: ctx.deadline(),
            placement,
        })
    }
}

fn clamp_u16(value: u32) -> u16 {
    u16::try_from(value).unwrap_or(u16::MAX)
}

fn selector(selector: Option<&pb::ProcessSelector>) -> Result<Selector, ConnectError> {
    match selector.and_then(|s| s.selector.as_ref()) {
        Some(PbSelector::Pid(pid)) => Ok(Selector::Pid(*pid)),
        Some(PbSelector::Tag(tag)) => Ok(Selector::Tag(tag.clone())),
        None => Err(RpcError::NoSelector.into()),
    }
}

fn event(event: impl Into<PbEvent>) -> pb::ProcessEvent {
    pb::ProcessEvent { event: Some(event.into()), ..Default::default() }
}

fn start_event(pid: u32) -> pb::ProcessEvent {
    event(pb::process_event::StartEvent { pid, ..Default::default() })
}

fn keepalive_event() -> pb::ProcessEvent {
    event(pb::process_event::KeepAlive::default())
}

fn end_event(end: EndStatus) -> pb::ProcessEvent {
    event(pb::process_event::EndEvent {
        exit_code: end.exit_code,
        exited: end.exited,
        status: end.status,
        error: end.error,
        ..Default::default()
    })
}

fn to_pb(item: Event) -> pb::ProcessEvent {
    match item {
        Event::Data(output, data) => {
            // Zero-copy when this subscriber holds the only reference.
            let data = Vec::from(data);
            let output = match output {
                Output::Stdout => PbOutput::Stdout(data),
                Output::Stderr => PbOutput::Stderr(data),
                Output::Pty => PbOutput::Pty(data),
            };
            event(pb::process_event::DataEvent { output: Some(output), ..Default::default() })
        }
        Event::End(end) => end_event(end),
    }
}

/// start event, then live events (ending after the end event), with
/// keep-alives in between.
fn process_stream<T: Send + 'static>(
    pid: u32,
    subscription: Subscription,
    ctx: &RequestContext,
    wrap: fn(pb::ProcessEvent) -> T,
    keepalive: fn() -> T,
) -> ServiceStream<T> {
    let events: std::pin::Pin<Box<dyn futures_util::Stream<Item = T> + Send>> = match subscription {
        Subscription::Live(rx) => Box::pin(
            futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) })
                .map(move |e| wrap(to_pb(e))),
        ),
        Subscription::Ended(end) => Box::pin(futures_util::stream::iter([wrap(end_event(end))])),
    };
    with_keepalive(wrap(start_event(pid)), events, keepalive_interval(ctx.headers()), keepalive)
}

fn start_response(event: pb::ProcessEvent) -> pb::StartResponse {
    pb::StartResponse { event: event.into(), ..Default::default() }
}

fn connect_response(event: pb::ProcessEvent) -> pb::ConnectResponse {
    pb::ConnectResponse { event: event.into(), ..Default::default() }
}

#[allow(refining_impl_trait)]
impl pb::Process for ProcessService {
    async fn list(
        &self,
        _ctx: RequestContext,
        _request: ServiceRequest<'_, pb::ListRequest>,
    ) -> ServiceResult<pb::ListResponse> {
        let processes = self
            .state
            .processes
            .list()
            .iter()
            .map(|handle| {
                let config = handle.config();
                pb::ProcessInfo {
                    config: pb::ProcessConfig {
                        cmd: config.cmd.clone(),
                        args: config.args.clone(),
                        envs: config.envs.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                        cwd: config.cwd.clone(),
                        ..Default::default()
                    }
                    .into(),
                    pid: handle.pid(),
                    tag: handle.tag().map(str::to_owned),
                    ..Default::default()
                }
            })
            .collect();
        Response::ok(pb::ListResponse { processes, ..Default::default() })
    }

    async fn connect(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, pb::ConnectRequest>,
    ) -> ServiceResult<ServiceStream<pb::ConnectResponse>> {
        let request = request.to_owned_message();
        let selector = selector(request.process.as_option())?;
        let (pid, subscription) = match self.state.processes.find(&selector)? {
            Found::Live(handle) => (handle.pid(), handle.subscribe()),
            Found::Ended { pid, end } => (pid, Subscription::Ended(end)),
        };
        let keepalive = || connect_response(keepalive_event());
        let stream = process_stream(pid, subscription, &ctx, connect_response, keepalive);
        Response::ok(until_deadline(stream, ctx.deadline()))
    }

    async fn start(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, pb::StartRequest>,
    ) -> ServiceResult<ServiceStream<pb::StartResponse>> {
        // After a cold boot, a command must not run before its volumes are back.
        self.state.volumes.wait_ready(None).await;
        let spec = self.start_spec(&ctx, request.to_owned_message())?;
        let command = spec.config.cmd.clone();
        let recipe = Recipe::of(&spec);
        let started = process::start(&self.state.processes, spec).await?;
        tracing::debug!(pid = started.pid, %command, "process started");
        self.state.templates.track(&started.handle, recipe);
        let keepalive = || start_response(keepalive_event());
        let stream = process_stream(started.pid, Subscription::Live(started.events), &ctx, start_response, keepalive);
        // The deadline is also the process's lifetime: when it kills the
        // process, the caller sees `deadline_exceeded`, as with the reference.
        Response::ok(until_deadline(stream, ctx.deadline()))
    }

    async fn update(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::UpdateRequest>,
    ) -> ServiceResult<pb::UpdateResponse> {
        let request = request.to_owned_message();
        let handle = self.state.processes.get(&selector(request.process.as_option())?)?;
        if let Some(pty) = request.pty.as_option() {
            let size = pty.size.as_option().cloned().unwrap_or_default();
            if size.cols == 0 || size.rows == 0 {
                return Err(process::ProcessError::BadTerminalSize { cols: size.cols, rows: size.rows }.into());
            }
            handle.resize(clamp_u16(size.cols), clamp_u16(size.rows))?;
        }
        Response::ok(pb::UpdateResponse::default())
    }

    async fn stream_input(
        &self,
        _ctx: RequestContext,
        mut requests: connectrpc::InboundStream<pb::StreamInputRequest>,
    ) -> ServiceResult<pb::StreamInputResponse> {
        let mut target = None;
        while let Some(message) = requests.next().await {
            let message = message?.to_owned_message();
            match message.event {
                Some(PbInputEvent::Start(start)) => {
                    target = Some(self.state.processes.get(&selector(start.process.as_option())?)?);
                }
                Some(PbInputEvent::Data(data)) => {
                    let Some(handle) = &target else {
                        return Err(RpcError::InputBeforeStart.into());
                    };
                    send_input(handle, data.input.as_option()).await?;
                }
                Some(PbInputEvent::Keepalive(_)) => {}
                None => {
                    return Err(RpcError::UnknownInputEvent.into());
                }
            }
        }
        Response::ok(pb::StreamInputResponse::default())
    }

    async fn send_input(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::SendInputRequest>,
    ) -> ServiceResult<pb::SendInputResponse> {
        let request = request.to_owned_message();
        let handle = self.state.processes.get(&selector(request.process.as_option())?)?;
        send_input(&handle, request.input.as_option()).await?;
        Response::ok(pb::SendInputResponse::default())
    }

    async fn send_signal(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, pb::SendSignalRequest>,
    ) -> ServiceResult<pb::SendSignalResponse> {
        let request = request.to_owned_message();
        let selector = selector(request.process.as_option())?;
        // Looked up first: an unknown process is not_found whatever the signal.
        self.state.processes.get(&selector)?;
        let (signal, wait) = match request.signal.as_known() {
            Some(pb::Signal::SIGNAL_SIGKILL) => (nix::sys::signal::Signal::SIGKILL, SIGKILL_WAIT),
            Some(pb::Signal::SIGNAL_SIGTERM) => (nix::sys::signal::Signal::SIGTERM, SIGTERM_WAIT),
            _ => {
                return Err(RpcError::UnsupportedSignal.into());
            }
        };
        let wait = ctx.deadline().map_or(wait, |d| wait.min(d.saturating_duration_since(Instant::now())));
        let report = process::kill(&self.state.processes, &selector, signal, wait).await?;
        let response = Response::new(pb::SendSignalResponse::default());
        if report.all_gone() {
            return Ok(response);
        }
        tracing::warn!(
            %selector,
            ?signal,
            survivors = ?report.survivors,
            cgroup_populated = report.cgroup_populated,
            "processes still alive after the signal"
        );
        let pids: Vec<String> = report.survivors.iter().map(u32::to_string).collect();
        Ok(response.with_header(SURVIVORS_HEADER, pids.join(",")))
    }

    async fn close_stdin(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::CloseStdinRequest>,
    ) -> ServiceResult<pb::CloseStdinResponse> {
        let request = request.to_owned_message();
        let handle = self.state.processes.get(&selector(request.process.as_option())?)?;
        handle.close_stdin().await?;
        Response::ok(pb::CloseStdinResponse::default())
    }
}

async fn send_input(handle: &process::ProcessHandle, input: Option<&pb::ProcessInput>) -> Result<(), ConnectError> {
    match input.and_then(|i| i.input.as_ref()) {
        Some(PbInput::Stdin(data)) => handle.write_stdin(data).await?,
        Some(PbInput::Pty(data)) => handle.write_pty(data).await?,
        None => return Err(RpcError::NoInput.into()),
    }
    Ok(())
}
