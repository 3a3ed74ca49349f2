//! Control socket: a Unix socket taking one JSON request per line, answering one JSON line.
//! `{"action":"status"|"pause"|"resume"|"stop"}`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::VmmEvent;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "action", rename_all = "lowercase")]
pub enum ControlRequest {
    Status,
    Pause,
    Resume,
    Stop,
}

/// Parses one request line; the error text goes back to the client.
pub fn parse_request(line: &str) -> Result<ControlRequest, String> {
    serde_json::from_str(line)
        .map_err(|e| format!("bad request (want {{\"action\":\"status|pause|resume|stop\"}}): {e}"))
}

/// Sends one request to the control socket at `path`; returns the answer line.
pub fn ask(path: &Path, request: ControlRequest, timeout: Duration) -> std::io::Result<String> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(timeout))?;
    let mut line = serde_json::to_string(&request)?;
    line.push('\n');
    s.write_all(line.as_bytes())?;
    line.clear();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line)
}

fn error_reply(msg: &str) -> String {
    serde_json::json!({"ok": false, "error": msg}).to_string()
}

/// The listening socket; the file is removed on drop.
pub struct ControlSocket {
    path: PathBuf,
}

impl ControlSocket {
    /// Binds `path` (replacing a stale socket) and serves it on a thread.
    pub fn start(path: &Path, events: Sender<VmmEvent>) -> std::io::Result<Self> {
        if path.exists() {
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        std::thread::Builder::new()
            .name("ltv-control".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    // One client at a time: control traffic is a handful of requests.
                    serve(stream, &events);
                }
            })?;
        Ok(ControlSocket {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(stream: UnixStream, events: &Sender<VmmEvent>) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        let reply = match parse_request(&line) {
            Ok(req) => {
                let (tx, rx) = mpsc::channel();
                if events.send(VmmEvent::Control(req, tx)).is_err() {
                    error_reply("VMM is exiting")
                } else {
                    rx.recv_timeout(Duration::from_secs(10))
                        .unwrap_or_else(|_| error_reply("VMM did not answer"))
                }
            }
            Err(e) => error_reply(&e),
        };
        if writeln!(out, "{reply}").is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests() {
        assert_eq!(
            parse_request(r#"{"action":"status"}"#),
            Ok(ControlRequest::Status)
        );
        assert_eq!(
            parse_request(r#"{"action":"pause"}"#),
            Ok(ControlRequest::Pause)
        );
        assert!(parse_request(r#"{"action":"explode"}"#).is_err());
        assert!(parse_request("nope").is_err());
    }

    #[test]
    fn socket_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let (tx, rx) = mpsc::channel();
        let _sock = ControlSocket::start(&path, tx).unwrap();
        std::thread::spawn(move || {
            while let Ok(VmmEvent::Control(req, reply)) = rx.recv() {
                let _ = reply.send(format!("{{\"got\":\"{req:?}\"}}"));
            }
        });
        let answer = ask(&path, ControlRequest::Stop, Duration::from_secs(5)).unwrap();
        assert_eq!(answer.trim(), r#"{"got":"Stop"}"#);
        let mut s = UnixStream::connect(&path).unwrap();
        writeln!(s, r#"{{"action":"status"}}"#).unwrap();
        writeln!(s, "garbage").unwrap();
        let mut r = BufReader::new(s);
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        assert_eq!(l.trim(), r#"{"got":"Status"}"#);
        l.clear();
        r.read_line(&mut l).unwrap();
        assert!(l.contains("\"ok\":false"));
    }
}
