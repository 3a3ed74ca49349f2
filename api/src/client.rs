//! The API client over the daemon's Unix socket, used by the CLI and the demo.

use crate::stream::UPGRADE_PROTOCOL;
use crate::types::{ErrorBody, ProgressEvent};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct ClientError {
    /// HTTP status, or `None` when the daemon could not be reached.
    pub status: Option<u16>,
    pub message: String,
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ClientError {}

fn transport(socket: &Path, e: impl std::fmt::Display) -> ClientError {
    ClientError {
        status: None,
        message: format!("cannot talk to the ltv daemon at {}: {e}", socket.display()),
    }
}

pub type Upgraded = TokioIo<hyper::upgrade::Upgraded>;

#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn send(&self, req: Request<Full<Bytes>>) -> Result<Response<Incoming>, ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| transport(&self.socket, e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| transport(&self.socket, e))?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        sender
            .send_request(req)
            .await
            .map_err(|e| transport(&self.socket, e))
    }

    fn build(method: Method, path: &str, body: Option<Vec<u8>>) -> Request<Full<Bytes>> {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "ltv");
        if body.is_some() {
            b = b.header("content-type", "application/json");
        }
        b.body(Full::new(Bytes::from(body.unwrap_or_default())))
            .expect("valid request")
    }

    async fn error_of(&self, resp: Response<Incoming>) -> ClientError {
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let message = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|e| e.error)
            .unwrap_or_else(|_| format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes)));
        ClientError {
            status: Some(status),
            message,
        }
    }

    /// One request with an optional JSON body; the raw answer body on success.
    pub async fn call_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<Bytes, ClientError> {
        let body = body.map(|b| serde_json::to_vec(b).expect("serializable"));
        let resp = self.send(Self::build(method, path, body)).await?;
        if !resp.status().is_success() {
            return Err(self.error_of(resp).await);
        }
        resp.into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| transport(&self.socket, e))
    }

    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let bytes = self.call_raw(method, path, body).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError {
            status: None,
            message: format!("unexpected answer from the daemon: {e}"),
        })
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, None::<&()>).await
    }

    /// A request answered by an upgrade to `ltv-stdio`.
    pub async fn upgrade(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<Upgraded, ClientError> {
        let mut req = Self::build(
            Method::POST,
            path,
            Some(serde_json::to_vec(body).expect("serializable")),
        );
        req.headers_mut()
            .insert("connection", "upgrade".parse().expect("header"));
        req.headers_mut()
            .insert("upgrade", UPGRADE_PROTOCOL.parse().expect("header"));
        let resp = self.send(req).await?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Err(self.error_of(resp).await);
        }
        let up = hyper::upgrade::on(resp)
            .await
            .map_err(|e| transport(&self.socket, e))?;
        Ok(TokioIo::new(up))
    }

    /// A request answered by an `application/x-ndjson` progress stream.
    pub async fn progress<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
        mut on_event: impl FnMut(&ProgressEvent),
    ) -> Result<T, ClientError> {
        let mut req = Self::build(
            Method::POST,
            path,
            Some(serde_json::to_vec(body).expect("serializable")),
        );
        req.headers_mut()
            .insert("accept", "application/x-ndjson".parse().expect("header"));
        let resp = self.send(req).await?;
        if !resp.status().is_success() {
            return Err(self.error_of(resp).await);
        }
        let mut body = resp.into_body();
        let mut pending = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| transport(&self.socket, e))?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            pending.extend_from_slice(data);
            while let Some(pos) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=pos).collect();
                let event: ProgressEvent =
                    serde_json::from_slice(&line).map_err(|e| ClientError {
                        status: None,
                        message: format!("bad progress line: {e}"),
                    })?;
                match event {
                    ProgressEvent::Done { image } => {
                        return serde_json::from_value(serde_json::to_value(image).expect("json"))
                            .map_err(|e| ClientError {
                                status: None,
                                message: e.to_string(),
                            });
                    }
                    ProgressEvent::Error { code, error } => {
                        return Err(ClientError {
                            status: Some(code),
                            message: error,
                        })
                    }
                    other => on_event(&other),
                }
            }
        }
        Err(ClientError {
            status: None,
            message: "the daemon ended the progress stream early".into(),
        })
    }
}
