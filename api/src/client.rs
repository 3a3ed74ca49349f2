//! The API client, used by the CLI, the demo, and the host daemon to reach the daemon inside
//! a microVM (its guest agent) through the VM's hybrid vsock socket.

use crate::stream::UPGRADE_PROTOCOL;
use crate::types::{ErrorBody, ProgressEvent};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::PathBuf;

/// Characters a path segment may not carry as they are: a nested instance's path
/// (`vm1/sys1/app1`) travels as one segment, its `/` escaped.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b'/')
    .add(b'%')
    .add(b'?')
    .add(b'#')
    .add(b' ');

/// `/1.0/instances/{name}{suffix}`, for a name or a nested path.
pub fn instance_url(name: &str, suffix: &str) -> String {
    format!(
        "/1.0/instances/{}{suffix}",
        percent_encoding::utf8_percent_encode(name, SEGMENT)
    )
}

/// Content type of an image upload: a tar of an OCI image layout.
pub const IMAGE_ARCHIVE: &str = "application/x-tar";

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

fn transport(endpoint: &Endpoint, e: impl std::fmt::Display) -> ClientError {
    ClientError {
        status: None,
        message: format!("cannot talk to the ltv daemon at {endpoint}: {e}"),
    }
}

/// Where a daemon listens.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// Its API socket.
    Unix(PathBuf),
    /// A guest agent's vsock port, reached through the VM's hybrid vsock Unix socket
    /// (`CONNECT <port>` answered by `OK <host port>`).
    HybridVsock { uds: PathBuf, port: u32 },
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "{}", p.display()),
            Endpoint::HybridVsock { uds, port } => {
                write!(f, "vsock port {port} via {}", uds.display())
            }
        }
    }
}

impl Endpoint {
    pub async fn connect(&self) -> std::io::Result<tokio::net::UnixStream> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        match self {
            Endpoint::Unix(p) => tokio::net::UnixStream::connect(p).await,
            Endpoint::HybridVsock { uds, port } => {
                let mut s = tokio::net::UnixStream::connect(uds).await?;
                s.write_all(format!("CONNECT {port}\n").as_bytes()).await?;
                // Byte by byte: what follows the line already belongs to the connection.
                let mut line = Vec::new();
                let mut byte = [0u8; 1];
                while byte[0] != b'\n' {
                    if s.read(&mut byte).await? == 0 || line.len() > 64 {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::ConnectionRefused,
                            format!("nothing listens on guest vsock port {port}"),
                        ));
                    }
                    line.push(byte[0]);
                }
                if !line.starts_with(b"OK ") {
                    return Err(std::io::Error::other(format!(
                        "vsock handshake answered {:?}",
                        String::from_utf8_lossy(&line).trim_end()
                    )));
                }
                Ok(s)
            }
        }
    }
}

pub type Upgraded = TokioIo<hyper::upgrade::Upgraded>;

#[derive(Debug, Clone)]
pub struct Client {
    endpoint: Endpoint,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            endpoint: Endpoint::Unix(socket.into()),
        }
    }

    pub fn to(endpoint: Endpoint) -> Client {
        Client { endpoint }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// One request, any body; the answer as it comes (also used to forward requests to a
    /// nested daemon).
    pub async fn send<B>(&self, req: Request<B>) -> Result<Response<Incoming>, ClientError>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stream = self
            .endpoint
            .connect()
            .await
            .map_err(|e| transport(&self.endpoint, e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| transport(&self.endpoint, e))?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        sender
            .send_request(req)
            .await
            .map_err(|e| transport(&self.endpoint, e))
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
            .map_err(|e| transport(&self.endpoint, e))
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
            .map_err(|e| transport(&self.endpoint, e))?;
        Ok(TokioIo::new(up))
    }

    /// `POST /1.0/images` of an image archive (an OCI layout tar), streamed from `file`.
    pub async fn upload_image(
        &self,
        alias: &str,
        file: &std::path::Path,
    ) -> Result<crate::types::Image, ClientError> {
        let f = tokio::fs::File::open(file).await.map_err(|e| ClientError {
            status: None,
            message: format!("open {}: {e}", file.display()),
        })?;
        let chunks = futures_util::stream::unfold(f, |mut f| async move {
            use tokio::io::AsyncReadExt;
            let mut buf = vec![0u8; 256 << 10];
            match f.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(hyper::body::Frame::data(Bytes::from(buf))), f))
                }
                Err(e) => Some((Err(e), f)),
            }
        });
        let path = format!(
            "/1.0/images?alias={}",
            percent_encoding::utf8_percent_encode(alias, percent_encoding::NON_ALPHANUMERIC)
        );
        let req = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header("host", "ltv")
            .header("content-type", IMAGE_ARCHIVE)
            .body(http_body_util::StreamBody::new(chunks))
            .expect("valid request");
        let resp = self.send(req).await?;
        if !resp.status().is_success() {
            return Err(self.error_of(resp).await);
        }
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| transport(&self.endpoint, e))?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError {
            status: None,
            message: format!("unexpected answer from the daemon: {e}"),
        })
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
            let frame = frame.map_err(|e| transport(&self.endpoint, e))?;
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
