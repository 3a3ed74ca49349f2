//! Nested instances, addressed by path: `vm1/sys1/app1` is `app1` in the daemon of `sys1`,
//! which runs inside `vm1`. A daemon serves its own level and forwards the rest of a path,
//! one level at a time, to the daemon that owns it (a system container's own `ltv daemon`,
//! a microVM's guest agent), so every level speaks the same API.

use super::error::ApiError;
use super::Daemon;
use crate::client::{instance_url, Client};
use crate::types::{
    validate_name, ErrorBody, Instance, InstancesPost, StateAction, StatePut, Status,
};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use http_body_util::BodyExt;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::Duration;

/// Uploads of an image that arrives damaged, in all.
const UPLOAD_ATTEMPTS: u32 = 3;
/// Request bodies forwarded to a nested daemon are small JSON documents.
const MAX_FORWARDED_BODY: usize = 1 << 20;
/// How long a forced stop waits for each nested instance to stop.
const NESTED_STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a listing waits for a nested daemon (a microVM's agent on kvm-pvm is slow).
const NESTED_LIST_TIMEOUT: Duration = Duration::from_secs(20);

/// Middleware: `/1.0/instances/{a/b/...}...` goes to the daemon inside `a` as
/// `/1.0/instances/{b/...}...`; everything else to our own routes.
pub async fn forward_paths(State(d): State<Arc<Daemon>>, req: Request, next: Next) -> Response {
    let target = match nested_target(req.uri()) {
        Ok(None) => return next.run(req).await,
        Ok(Some(t)) => t,
        Err(e) => return e.into_response(),
    };
    let (mut parts, body) = req.into_parts();
    let upgrade = parts.extensions.remove::<OnUpgrade>();
    let body = match axum::body::to_bytes(body, MAX_FORWARDED_BODY).await {
        Ok(b) => b,
        Err(e) => return ApiError::bad_request(format!("request body: {e}")).into_response(),
    };
    let (first, uri) = target;
    d.forward(&first, parts.method, &uri, &parts.headers, body, upgrade)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// The first level and the request for the daemon below it, when the URI names a path.
fn nested_target(uri: &Uri) -> Result<Option<(String, String)>, ApiError> {
    let Some(rest) = uri.path().strip_prefix("/1.0/instances/") else {
        return Ok(None);
    };
    let (segment, suffix) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let name = percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .map_err(|_| ApiError::bad_request("instance path is not UTF-8"))?;
    let Some((first, inner)) = name.split_once('/') else {
        return Ok(None);
    };
    for level in name.split('/') {
        validate_name(level)
            .map_err(|e| ApiError::bad_request(format!("instance path {name:?}: {e}")))?;
    }
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    Ok(Some((
        first.to_string(),
        format!("{}{query}", instance_url(inner, suffix)),
    )))
}

/// The parent path and leaf name of a new instance that is nested (`parent` given, or a
/// path as its name); `None` for one of ours.
pub fn nested_parent(req: &InstancesPost) -> Option<(String, Option<String>)> {
    match (&req.parent, &req.name) {
        (Some(p), Some(n)) => Some(match n.rsplit_once('/') {
            Some((dir, leaf)) => (format!("{p}/{dir}"), Some(leaf.to_string())),
            None => (p.clone(), Some(n.clone())),
        }),
        (Some(p), None) => Some((p.clone(), None)),
        (None, Some(n)) => n
            .rsplit_once('/')
            .map(|(dir, leaf)| (dir.to_string(), Some(leaf.to_string()))),
        (None, None) => None,
    }
}

/// Names in a nested daemon's answer are its own; ours put the level in front. Its pid
/// namespace depths count from its own namespace; ours add the level's `depth`.
fn prefix_names(v: &mut serde_json::Value, level: &str, depth: u64) {
    match v {
        serde_json::Value::Array(items) => {
            items.iter_mut().for_each(|i| prefix_names(i, level, depth))
        }
        serde_json::Value::Object(o) if o.contains_key("kind") && o.contains_key("status") => {
            if let Some(d) = o.get_mut("usage").and_then(|u| u.get_mut("pid_ns_depth")) {
                *d = (d.as_u64().unwrap_or(0) + depth).into();
            }
            if let Some(serde_json::Value::String(n)) = o.get_mut("name") {
                *n = format!("{level}/{n}");
            }
            let parent = match o.get("parent").and_then(|p| p.as_str()) {
                Some(p) => format!("{level}/{p}"),
                None => level.to_string(),
            };
            o.insert("parent".into(), parent.into());
            if let Some(children) = o.get_mut("children") {
                prefix_names(children, level, depth);
            }
        }
        _ => {}
    }
}

/// The import below refused the upload because a digest did not match its content.
fn arrived_damaged(e: &crate::client::ClientError) -> bool {
    e.status == Some(400)
        && (e.message.contains("does not match") || e.message.contains("digest mismatch"))
}

fn unreachable(level: &str, e: crate::client::ClientError) -> ApiError {
    match e.status {
        Some(code) => ApiError::from_status(code, format!("in {level}: {}", e.message)),
        None => ApiError::new(StatusCode::BAD_GATEWAY, format!("in {level}: {e}")),
    }
}

impl Daemon {
    /// The daemon that owns what is nested in `name`, which must be running; `start`
    /// starts a system container's daemon if it does not run yet.
    pub async fn nested_client(&self, name: &str, start: bool) -> Result<Client, ApiError> {
        let instance = self.instance_row(name)?.instance;
        let pid = match (instance.status, instance.pid) {
            (Status::Running, Some(pid)) => pid,
            _ => {
                return Err(ApiError::conflict(format!(
                    "instance {name:?} is not running: start it to reach the instances inside it"
                )))
            }
        };
        let backend = self.backend(instance.kind)?;
        let image = self.instance_image(&instance)?;
        backend.nested_daemon(&instance, &image, pid, start).await
    }

    /// The pid namespace depth of our instance `level`, as its usage measures it.
    async fn pid_ns_depth_of(&self, level: &str) -> u64 {
        let Ok(row) = self.instance_row(level) else {
            return 0;
        };
        let Ok(backend) = self.backend(row.instance.kind) else {
            return 0;
        };
        if row.instance.kind == crate::types::Kind::Vm {
            // A fresh kernel; and no agent round trip for it.
            return 0;
        }
        backend
            .usage(&row.instance)
            .await
            .and_then(|u| u.pid_ns_depth)
            .unwrap_or(0)
            .into()
    }

    /// Sends a request on to the daemon inside `level` and relays its answer, an upgraded
    /// stdio stream included. Errors say which level they come from.
    pub async fn forward(
        &self,
        level: &str,
        method: Method,
        uri: &str,
        headers: &HeaderMap,
        body: bytes::Bytes,
        upgrade: Option<OnUpgrade>,
    ) -> Result<Response, ApiError> {
        let client = self.nested_client(level, true).await?;
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(uri)
            .header(header::HOST, "ltv");
        for h in [
            header::CONTENT_TYPE,
            header::ACCEPT,
            header::CONNECTION,
            header::UPGRADE,
        ] {
            if let Some(v) = headers.get(&h) {
                req = req.header(h, v);
            }
        }
        let req = req
            .body(http_body_util::Full::new(body))
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let resp = client.send(req).await.map_err(|e| unreachable(level, e))?;
        let status = resp.status();
        if status == StatusCode::SWITCHING_PROTOCOLS {
            let Some(upgrade) = upgrade else {
                return Err(ApiError::bad_request(
                    "the nested daemon upgraded a request that did not ask for it",
                ));
            };
            let inner = hyper::upgrade::on(resp);
            tokio::spawn(async move {
                if let (Ok(outer), Ok(inner)) = (upgrade.await, inner.await) {
                    let (mut a, mut b) = (TokioIo::new(outer), TokioIo::new(inner));
                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                }
            });
            return Ok(super::handlers::switching_protocols());
        }
        let (parts, body) = resp.into_parts();
        let json = parts
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
        if !json {
            // Logs and the like stream through as they come.
            return Ok(Response::from_parts(parts, Body::new(body)));
        }
        let bytes = body
            .collect()
            .await
            .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, format!("in {level}: {e}")))?
            .to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ApiError::from_status(
                status.as_u16(),
                format!("in {level}: {message}"),
            ));
        }
        let mut v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, format!("in {level}: {e}")))?;
        prefix_names(&mut v, level, self.pid_ns_depth_of(level).await);
        Ok((status, Json(v)).into_response())
    }

    /// `POST /1.0/instances` of a nested instance (see [`nested_parent`]): the image is
    /// handed down first if the level below lacks it, then the request follows.
    pub async fn create_nested(
        &self,
        req: &InstancesPost,
        headers: &HeaderMap,
        upgrade: Option<OnUpgrade>,
    ) -> Result<Response, ApiError> {
        let Some((parent, leaf)) = nested_parent(req) else {
            return Err(ApiError::internal("create_nested: not a nested instance"));
        };
        for level in parent.split('/').chain(leaf.as_deref()) {
            validate_name(level)
                .map_err(|e| ApiError::bad_request(format!("instance path {parent:?}: {e}")))?;
        }
        let (first, below) = match parent.split_once('/') {
            Some((f, b)) => (f.to_string(), Some(b.to_string())),
            None => (parent.clone(), None),
        };
        let client = self.nested_client(&first, true).await?;
        self.hand_down_image(&first, &client, &req.image).await?;
        let body = InstancesPost {
            name: leaf,
            parent: below,
            ..req.clone()
        };
        let body = serde_json::to_vec(&body).expect("serializable");
        self.forward(
            &first,
            Method::POST,
            "/1.0/instances",
            headers,
            body.into(),
            upgrade,
        )
        .await
    }

    /// Gives the daemon below `level` our image `reference` unless it has one by that name:
    /// exported as an OCI layout and uploaded through the API, so it works the same into a
    /// container and into a microVM.
    async fn hand_down_image(
        &self,
        level: &str,
        client: &Client,
        reference: &str,
    ) -> Result<(), ApiError> {
        let image = self.image_of(reference)?;
        let theirs: Vec<crate::types::Image> = client
            .get("/1.0/images")
            .await
            .map_err(|e| unreachable(level, e))?;
        if theirs.iter().any(|i| i.alias == image.alias) {
            return Ok(());
        }
        let exports = self.config.state_dir.join("exports");
        std::fs::create_dir_all(&exports)
            .map_err(|e| ApiError::internal(format!("create {}: {e}", exports.display())))?;
        let scratch = tempfile::tempdir_in(&exports).map_err(|e| {
            ApiError::internal(format!("scratch dir in {}: {e}", exports.display()))
        })?;
        let tar = scratch.path().join("image.tar");
        let t = std::time::Instant::now();
        // The level below checks every digest. An image that fails that check is exported
        // and sent again, as apt fetches again on a hash mismatch: on kvm-pvm hosts a
        // guest's own memory goes wrong now and then (README; vsock itself was checked
        // intact), and the export may be what went wrong when the sender is a guest.
        let mut attempt = 1;
        loop {
            let (images, fp, alias, dir, out) = (
                self.images.clone(),
                image.fingerprint.clone(),
                image.alias.clone(),
                scratch.path().to_path_buf(),
                tar.clone(),
            );
            tokio::task::spawn_blocking(move || images.export_oci(&fp, &alias, &out, &dir))
                .await
                .map_err(|e| ApiError::internal(format!("export task: {e}")))?
                .map_err(|e| ApiError::internal(format!("export image {:?}: {e}", image.alias)))?;
            match client.upload_image(&image.alias, &tar).await {
                Ok(_) => break,
                Err(e) if attempt < UPLOAD_ATTEMPTS && arrived_damaged(&e) => {
                    tracing::warn!(image = %image.alias, level, attempt, "the image arrived damaged, sending it again: {e}");
                    attempt += 1;
                }
                Err(e) => return Err(unreachable(level, e)),
            }
        }
        tracing::info!(image = %image.alias, level, ms = t.elapsed().as_millis() as u64, "image handed down");
        Ok(())
    }

    /// What is nested in `instance` right now, as its daemon lists it (names relative to
    /// it); empty when nothing inside runs a daemon.
    pub async fn nested_instances(&self, instance: &Instance, tree: bool) -> Vec<Instance> {
        if instance.status != Status::Running {
            return vec![];
        }
        let Ok(client) = self.nested_client(&instance.name, false).await else {
            return vec![];
        };
        let path = if tree {
            "/1.0/instances?recursion=tree"
        } else {
            "/1.0/instances"
        };
        match tokio::time::timeout(NESTED_LIST_TIMEOUT, client.get::<Vec<Instance>>(path)).await {
            Ok(Ok(list)) => list,
            _ => vec![],
        }
    }

    /// Before `instance` stops: without `force`, refuses while anything inside runs;
    /// with it, stops what is inside first, deepest first (each level does the same).
    pub async fn stop_nested(&self, instance: &Instance, force: bool) -> Result<(), ApiError> {
        let running: Vec<Instance> = self
            .nested_instances(instance, false)
            .await
            .into_iter()
            .filter(|i| i.status == Status::Running)
            .collect();
        if running.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = running
            .iter()
            .map(|i| format!("{}/{}", instance.name, i.name))
            .collect();
        if !force {
            return Err(ApiError::conflict(format!(
                "instance {:?} has running instances inside it ({}): stop them first, or use --force",
                instance.name,
                names.join(", ")
            )));
        }
        let client = self.nested_client(&instance.name, false).await?;
        let body = StatePut {
            action: StateAction::Stop,
            force: true,
            timeout: Some(0),
        };
        for child in running {
            let path = instance_url(&child.name, "/state");
            let stop = client.call_raw(Method::PUT, &path, Some(&body));
            // The parent's own stop ends it anyway, and what it held on our side with it:
            // a level below that fails or hangs only costs this wait.
            match tokio::time::timeout(NESTED_STOP_TIMEOUT, stop).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(instance = %instance.name, child = %child.name, "stopping a nested instance: {e}")
                }
                Err(_) => {
                    tracing::warn!(instance = %instance.name, child = %child.name, "stopping a nested instance: no answer")
                }
            }
        }
        Ok(())
    }

    /// Our instances, each with its usage and what is nested in it, named by full path.
    pub async fn instance_tree(&self) -> Result<Vec<Instance>, ApiError> {
        let rows = self.db.instances()?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let name = row.instance.name.clone();
            let mut instance = self
                .instance_with_usage(&name)
                .await
                .unwrap_or(row.instance);
            let mut children = serde_json::to_value(self.nested_instances(&instance, true).await)
                .expect("serializable");
            let depth = instance.usage.as_ref().and_then(|u| u.pid_ns_depth);
            prefix_names(&mut children, &name, depth.unwrap_or(0).into());
            instance.children = serde_json::from_value(children).unwrap_or_default();
            out.push(instance);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_go_one_level_down() {
        let t = |u: &str| nested_target(&u.parse::<Uri>().unwrap());
        assert!(t("/1.0/instances/app1/exec").unwrap().is_none());
        assert!(t("/1.0/instances").unwrap().is_none());
        assert_eq!(
            t("/1.0/instances/vm1%2Fsys1%2Fapp1/exec?x=1").unwrap(),
            Some(("vm1".into(), "/1.0/instances/sys1%2Fapp1/exec?x=1".into()))
        );
        assert_eq!(
            t("/1.0/instances/vm1%2Fsys1").unwrap(),
            Some(("vm1".into(), "/1.0/instances/sys1".into()))
        );
        assert!(t("/1.0/instances/vm1%2F%2Fx").is_err(), "empty level");
        assert!(t("/1.0/instances/vm1%2F..").is_err());
    }

    #[test]
    fn nested_answers_name_the_full_path() {
        let mut v = serde_json::json!([{
            "name": "app1", "kind": "app", "status": "Running", "parent": null,
            "children": [{"name": "sys1/x", "kind": "app", "status": "Running", "parent": "sys1"}]
        }]);
        v[0]["usage"] = serde_json::json!({"pid_ns_depth": 1});
        prefix_names(&mut v, "vm1", 2);
        assert_eq!(v[0]["usage"]["pid_ns_depth"], 3);
        assert_eq!(v[0]["name"], "vm1/app1");
        assert_eq!(v[0]["parent"], "vm1");
        assert_eq!(v[0]["children"][0]["name"], "vm1/sys1/x");
        assert_eq!(v[0]["children"][0]["parent"], "vm1/sys1");
        let mut err = serde_json::json!({"error": "x", "code": 404});
        prefix_names(&mut err, "vm1", 2);
        assert_eq!(err, serde_json::json!({"error": "x", "code": 404}));
    }
}
