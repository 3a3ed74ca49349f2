//! HTTP handlers: parse, call the daemon, shape the answer. Nothing else.

use super::error::ApiError;
use super::images::ChannelProgress;
use super::instances::ExecStarted;
use super::instances::DEFAULT_STOP_TIMEOUT;
use super::{pio, reaper, Daemon};
use crate::stream::{write_frame, Frame, UPGRADE_PROTOCOL};
use crate::types::*;
use axum::body::Body;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::{header, request::Parts, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::Duration;
use utoipa::OpenApi;

type D = State<Arc<Daemon>>;

pub fn router(daemon: Arc<Daemon>) -> Router {
    let mut router = Router::new();
    if daemon.config.vsock_port.is_some() {
        // Only a guest agent serves its own machine.
        router = router
            .route("/1.0/exec", post(guest_exec))
            .route("/1.0/state", put(guest_state_put));
    }
    router
        .route("/1.0", get(server_info))
        .route("/1.0/openapi.json", get(openapi))
        .route("/1.0/instances", get(instances_list).post(instances_post))
        .route(
            "/1.0/instances/{name}",
            get(instance_get)
                .delete(instance_delete)
                .patch(instance_patch),
        )
        .route("/1.0/instances/{name}/state", put(instance_state_put))
        .route("/1.0/instances/{name}/logs", get(instance_logs))
        .route("/1.0/instances/{name}/exec", post(instance_exec))
        .route("/1.0/images", get(images_list).post(images_post))
        .route("/1.0/images/{alias}", axum::routing::delete(image_delete))
        .route("/1.0/operations", get(operations_list))
        .fallback(|| async { ApiError::not_found("no such API endpoint") })
        .layer(axum::middleware::from_fn_with_state(
            daemon.clone(),
            super::nested::forward_paths,
        ))
        .with_state(daemon)
}

/// `Json` whose rejections are API errors (400 with a JSON body).
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Json::<T>::from_request(req, state)
            .await
            .map(|Json(v)| ApiJson(v))
            .map_err(|e| ApiError::bad_request(format!("invalid request body: {}", e.body_text())))
    }
}

/// The connection upgrade, when the client asked for `ltv-stdio`.
pub struct StdioUpgrade(Option<OnUpgrade>);

impl<S: Send + Sync> FromRequestParts<S> for StdioUpgrade {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let wants = parts
            .headers
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case(UPGRADE_PROTOCOL));
        Ok(StdioUpgrade(if wants {
            parts.extensions.remove::<OnUpgrade>()
        } else {
            None
        }))
    }
}

impl StdioUpgrade {
    fn require(self) -> Result<OnUpgrade, ApiError> {
        self.0.ok_or_else(|| {
            ApiError::bad_request(format!("this request streams stdio: send `Connection: Upgrade` and `Upgrade: {UPGRADE_PROTOCOL}`"))
        })
    }
}

pub(super) fn switching_protocols() -> Response {
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, UPGRADE_PROTOCOL)
        .body(Body::empty())
        .expect("static response")
}

/// After the upgrade: a command that cannot be executed gets its message and 127 or 126.
fn stream_exec_failure(upgrade: OnUpgrade, message: String, code: i32) {
    tokio::spawn(async move {
        if let Ok(up) = upgrade.await {
            let mut io = TokioIo::new(up);
            let _ = write_frame(&mut io, &Frame::Stderr(format!("ltv: {message}\n").into())).await;
            let _ = write_frame(&mut io, &Frame::Exit(code)).await;
        }
    });
}

fn kill_fn(pid: i32) -> impl Fn(i32) + Send + 'static {
    move |sig| {
        if let Ok(sig) = nix::sys::signal::Signal::try_from(sig) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
    }
}

#[utoipa::path(get, path = "/1.0", responses((status = 200, body = ServerInfo)))]
async fn server_info(State(d): D) -> Json<ServerInfo> {
    Json(ServerInfo {
        api_version: API_VERSION.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        kvm: kvm_flavour().into(),
        cgroup: ltv_containers::cgroups::Layout::detect().as_str().into(),
        kernel: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        kinds: d.kinds(),
        machine: super::agent::machine_facts(),
        agent: d.config.vsock_port.is_some(),
    })
}

fn kvm_flavour() -> &'static str {
    match ltv_vmm::kvm_flavour() {
        ltv_vmm::Flavour::Hardware => "hardware",
        ltv_vmm::Flavour::Pvm => "pvm",
        ltv_vmm::Flavour::None => "none",
    }
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

#[derive(serde::Deserialize)]
struct InstancesQuery {
    /// `tree`: each instance with what is nested in it, recursively.
    #[serde(default)]
    recursion: Option<String>,
    /// List what is inside this instance (a path) instead of ours.
    #[serde(default)]
    parent: Option<String>,
}

/// Our instances; `?parent=PATH` lists inside an instance, `?recursion=tree` nests the
/// instances inside each one under `children`, named by full path.
#[utoipa::path(get, path = "/1.0/instances",
    params(("recursion" = Option<String>, Query, description = "tree"), ("parent" = Option<String>, Query)),
    responses((status = 200, body = [Instance]), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn instances_list(
    State(d): D,
    headers: HeaderMap,
    Query(q): Query<InstancesQuery>,
) -> Result<Response, ApiError> {
    let tree = q.recursion.as_deref() == Some("tree");
    if let Some(parent) = q.parent.filter(|p| !p.is_empty()) {
        // What is inside `parent`: its daemon's list, one level down per hop.
        let (first, below) = match parent.split_once('/') {
            Some((f, b)) => (f.to_string(), Some(b.to_string())),
            None => (parent.clone(), None),
        };
        let mut query = vec![];
        if tree {
            query.push("recursion=tree".to_string());
        }
        if let Some(b) = below {
            query.push(format!(
                "parent={}",
                percent_encoding::utf8_percent_encode(&b, percent_encoding::NON_ALPHANUMERIC)
            ));
        }
        let uri = format!("/1.0/instances?{}", query.join("&"));
        return d
            .forward(
                &first,
                Method::GET,
                &uri,
                &headers,
                Default::default(),
                None,
            )
            .await;
    }
    if tree {
        return Ok(Json(d.instance_tree().await?).into_response());
    }
    Ok(Json(
        d.db.instances()?
            .into_iter()
            .map(|r| r.instance)
            .collect::<Vec<_>>(),
    )
    .into_response())
}

/// Creates an instance; with `start` it runs detached, with `attach` the connection is
/// upgraded to `ltv-stdio` and streams the main process's stdio until it exits.
#[utoipa::path(post, path = "/1.0/instances", request_body = InstancesPost,
    responses((status = 201, body = Instance), (status = 101, description = "attached: ltv-stdio stream"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn instances_post(
    State(d): D,
    upgrade: StdioUpgrade,
    headers: HeaderMap,
    ApiJson(req): ApiJson<InstancesPost>,
) -> Result<Response, ApiError> {
    if super::nested::nested_parent(&req).is_some() {
        return d.create_nested(&req, &headers, upgrade.0).await;
    }
    let Some(attach) = req.attach.clone() else {
        let instance = d.create_instance(&req).await?;
        if req.start {
            d.start_instance(&instance.name, None).await?;
        }
        // The state after the start, without live usage: reading it (for a microVM, from
        // the guest agent) would only delay the reply; GET has it.
        let instance = d
            .instance_row(&instance.name)
            .map(|r| r.instance)
            .unwrap_or(instance);
        return Ok((StatusCode::CREATED, Json(instance)).into_response());
    };
    let upgrade = upgrade.require()?;
    let instance = d.create_instance(&req).await?;
    let name = instance.name.clone();
    let (stdio, ends) = pio::attached(attach.stdin, attach.tty)
        .map_err(|e| ApiError::internal(format!("stdio: {e}")))?;
    match d.start_instance(&name, Some((stdio, attach.tty))).await {
        Ok(pid) => {
            let exit = d.exit_watch(&name);
            let log = d.log_path(&name);
            tokio::spawn(async move {
                let Ok(up) = upgrade.await else { return };
                let exited = async move {
                    let Some(mut rx) = exit else { return 255 };
                    let exit = rx.wait_for(|e| e.is_some()).await.map(|e| *e);
                    exit.ok().flatten().and_then(|e| e.code()).unwrap_or(255)
                };
                let log = (!instance.auto_remove).then_some(log);
                pio::pump(TokioIo::new(up), ends, exited, kill_fn(pid), log.as_deref()).await;
            });
        }
        Err(ApiError {
            exec_exit: Some(code),
            message,
            ..
        }) => stream_exec_failure(upgrade, message, code),
        Err(e) => return Err(e),
    }
    Ok(switching_protocols())
}

#[utoipa::path(get, path = "/1.0/instances/{name}", responses((status = 200, body = Instance), (status = 404, body = ErrorBody)))]
async fn instance_get(State(d): D, Path(name): Path<String>) -> Result<Json<Instance>, ApiError> {
    Ok(Json(d.instance_with_usage(&name).await?))
}

/// Changes limits (memory, cpus, pids), applied at once to a running instance; other
/// keys take effect at the next start.
#[utoipa::path(patch, path = "/1.0/instances/{name}", request_body = InstancePatch,
    responses((status = 200, body = Instance), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn instance_patch(
    State(d): D,
    Path(name): Path<String>,
    ApiJson(patch): ApiJson<InstancePatch>,
) -> Result<Json<Instance>, ApiError> {
    d.update_config(&name, &patch).await?;
    Ok(Json(d.instance_with_usage(&name).await?))
}

#[derive(serde::Deserialize)]
struct DeleteQuery {
    #[serde(default)]
    force: bool,
}

#[utoipa::path(delete, path = "/1.0/instances/{name}", params(("force" = Option<bool>, Query)),
    responses((status = 200), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn instance_delete(
    State(d): D,
    Path(name): Path<String>,
    axum::extract::Query(q): axum::extract::Query<DeleteQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    d.delete_instance(&name, q.force).await?;
    Ok(Json(serde_json::json!({})))
}

#[utoipa::path(put, path = "/1.0/instances/{name}/state", request_body = StatePut,
    responses((status = 200, body = Instance), (status = 404, body = ErrorBody)))]
async fn instance_state_put(
    State(d): D,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<StatePut>,
) -> Result<Json<Instance>, ApiError> {
    let timeout = Duration::from_secs(req.timeout.unwrap_or(DEFAULT_STOP_TIMEOUT));
    match req.action {
        StateAction::Start => {
            let row = d.instance_row(&name)?;
            if row.instance.status != Status::Running {
                d.start_instance(&name, None).await?;
            }
        }
        StateAction::Stop => d.stop_instance(&name, req.force, timeout).await?,
        StateAction::Restart => d.restart_instance(&name, req.force, timeout).await?,
    }
    Ok(Json(d.instance_row(&name)?.instance))
}

#[utoipa::path(get, path = "/1.0/instances/{name}/logs", responses((status = 200, content_type = "text/plain"), (status = 404, body = ErrorBody)))]
async fn instance_logs(State(d): D, Path(name): Path<String>) -> Result<Response, ApiError> {
    d.instance_row(&name)?;
    let text = match tokio::fs::read(d.log_path(&name)).await {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(ApiError::internal(format!("read log: {e}"))),
    };
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

/// Runs a command in a running instance; the connection is upgraded to `ltv-stdio`.
#[utoipa::path(post, path = "/1.0/instances/{name}/exec", request_body = ExecPost,
    responses((status = 101, description = "ltv-stdio stream; the last frame carries the exit code"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn instance_exec(
    State(d): D,
    Path(name): Path<String>,
    upgrade: StdioUpgrade,
    ApiJson(req): ApiJson<ExecPost>,
) -> Result<Response, ApiError> {
    let upgrade = upgrade.require()?;
    let (stdio, ends) = exec_stdio(&req)?;
    match d.exec_instance(&name, &req, stdio).await {
        Ok(ExecStarted::Local(pid)) => stream_local(upgrade, ends, pid),
        Ok(ExecStarted::Remote(agent)) => {
            tokio::spawn(async move {
                if let Ok(up) = upgrade.await {
                    relay(TokioIo::new(up), agent).await;
                }
            });
        }
        Err(e) => return exec_failed(upgrade, e),
    }
    Ok(switching_protocols())
}

/// The pipes or tty of an exec request, after checking that it names a command.
fn exec_stdio(
    req: &ExecPost,
) -> Result<(ltv_containers::process::Stdio, pio::AttachedEnds), ApiError> {
    if req.command.is_empty() {
        return Err(ApiError::bad_request("exec needs a command"));
    }
    pio::attached(req.stdin, req.tty).map_err(|e| ApiError::internal(format!("stdio: {e}")))
}

/// Streams a local child's stdio to the client until it exits, and reaps it.
fn stream_local(upgrade: OnUpgrade, ends: pio::AttachedEnds, pid: i32) {
    tokio::spawn(async move {
        let exited = async move { reaper::wait(pid).await.code().unwrap_or(255) };
        match upgrade.await {
            Ok(up) => pio::pump(TokioIo::new(up), ends, exited, kill_fn(pid), None).await,
            // The client is gone: still reap the process.
            Err(_) => {
                exited.await;
            }
        }
    });
}

/// A command that could not be started: after the upgrade when it is a 127/126 case.
fn exec_failed(upgrade: OnUpgrade, e: ApiError) -> Result<Response, ApiError> {
    match e {
        ApiError {
            exec_exit: Some(code),
            message,
            ..
        } => {
            stream_exec_failure(upgrade, message, code);
            Ok(switching_protocols())
        }
        e => Err(e),
    }
}

/// Relays an `ltv-stdio` stream between the client and a guest agent. Frames from the agent
/// are passed on one by one, so a stream that breaks before its exit frame (the VMM died)
/// still ends with an error and an exit code for the client.
async fn relay(client: TokioIo<hyper::upgrade::Upgraded>, agent: crate::client::Upgraded) {
    let (mut client_rd, mut client_wr) = tokio::io::split(client);
    let (mut agent_rd, mut agent_wr) = tokio::io::split(agent);
    let upstream = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_rd, &mut agent_wr).await;
    });
    let mut exited = false;
    while let Ok(Some(frame)) = crate::stream::read_frame(&mut agent_rd).await {
        exited = matches!(frame, Frame::Exit(_));
        if write_frame(&mut client_wr, &frame).await.is_err() || exited {
            break;
        }
    }
    if !exited {
        let msg = "ltv: the connection to the microVM's agent broke (did the VM stop?)\n";
        let _ = write_frame(&mut client_wr, &Frame::Stderr(msg.into())).await;
        let _ = write_frame(&mut client_wr, &Frame::Exit(255)).await;
    }
    upstream.abort();
}

/// Runs a command on the machine this agent serves; upgraded to `ltv-stdio` like
/// instance exec.
async fn guest_exec(
    upgrade: StdioUpgrade,
    ApiJson(req): ApiJson<ExecPost>,
) -> Result<Response, ApiError> {
    let upgrade = upgrade.require()?;
    let (stdio, ends) = exec_stdio(&req)?;
    match super::agent::spawn_on_guest(&req, stdio) {
        Ok(pid) => stream_local(upgrade, ends, pid),
        Err(e) => return exec_failed(upgrade, e),
    }
    Ok(switching_protocols())
}

/// `{"action": "poweroff"}`: the guest shuts down through its own init.
async fn guest_state_put(
    ApiJson(req): ApiJson<GuestStatePut>,
) -> Result<Json<serde_json::Value>, ApiError> {
    match req.action.as_str() {
        "poweroff" => super::agent::power_off()?,
        other => {
            return Err(ApiError::bad_request(format!(
                "unknown action {other:?}: the guest agent knows \"poweroff\""
            )))
        }
    }
    Ok(Json(serde_json::json!({"action": req.action})))
}

#[utoipa::path(get, path = "/1.0/images", responses((status = 200, body = [Image])))]
async fn images_list(State(d): D) -> Result<Json<Vec<Image>>, ApiError> {
    Ok(Json(d.db.images()?))
}

#[derive(serde::Deserialize)]
struct UploadQuery {
    #[serde(default)]
    alias: Option<String>,
}

/// Builds or imports an image. With `Accept: application/x-ndjson` the answer is a stream
/// of `ProgressEvent`s ending in `done` or `error`; otherwise one JSON answer. A body of
/// type `application/x-tar` is an upload: a tar of an OCI layout, named by `?alias=`.
#[utoipa::path(post, path = "/1.0/images", request_body = ImagesPost,
    responses((status = 201, body = Image), (status = 400, body = ErrorBody)))]
async fn images_post(
    State(d): D,
    headers: HeaderMap,
    Query(q): Query<UploadQuery>,
    request: Request,
) -> Result<Response, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    if content_type == Some(crate::client::IMAGE_ARCHIVE) {
        let alias = q
            .alias
            .ok_or_else(|| ApiError::bad_request("an image upload needs ?alias=NAME"))?;
        let image = d.upload_image(alias, request.into_body()).await?;
        return Ok((StatusCode::CREATED, Json(image)).into_response());
    }
    let ApiJson(req) = ApiJson::<ImagesPost>::from_request(request, &()).await?;
    let streaming = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/x-ndjson"));
    if !streaming {
        let image = d.add_image(req, ChannelProgress(None)).await?;
        return Ok((StatusCode::CREATED, Json(image)).into_response());
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let progress = ChannelProgress(Some(tx.clone()));
    tokio::spawn(async move {
        let last = match d.add_image(req, progress).await {
            Ok(image) => ProgressEvent::Done {
                image: Box::new(image),
            },
            Err(e) => ProgressEvent::Error {
                code: e.status.as_u16(),
                error: e.message,
            },
        };
        let _ = tx.send(last);
    });
    let lines = futures_util::stream::unfold(rx, |mut rx| async move {
        let event = rx.recv().await?;
        let mut line = serde_json::to_vec(&event).unwrap_or_default();
        line.push(b'\n');
        Some((
            Ok::<_, std::convert::Infallible>(bytes::Bytes::from(line)),
            rx,
        ))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response())
}

#[utoipa::path(delete, path = "/1.0/images/{alias}", responses((status = 200), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn image_delete(
    State(d): D,
    Path(alias): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    d.delete_image(&alias)?;
    Ok(Json(serde_json::json!({})))
}

#[utoipa::path(get, path = "/1.0/operations", responses((status = 200, body = [Operation])))]
async fn operations_list(State(d): D) -> Result<Json<Vec<Operation>>, ApiError> {
    Ok(Json(d.db.operations(100)?))
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Lightervisor API",
        description = "Containers and microVMs behind one REST API."
    ),
    paths(
        server_info,
        instances_list,
        instances_post,
        instance_get,
        instance_delete,
        instance_patch,
        instance_state_put,
        instance_logs,
        instance_exec,
        images_list,
        images_post,
        image_delete,
        operations_list
    ),
    components(schemas(
        ServerInfo,
        Instance,
        InstanceConfig,
        InstancesPost,
        InstancePatch,
        AttachOptions,
        StatePut,
        StateAction,
        ExecPost,
        Image,
        ImagesPost,
        ImageSource,
        ProgressEvent,
        Operation,
        ErrorBody,
        Usage,
        Kind,
        Status
    ))
)]
pub struct ApiDoc;
