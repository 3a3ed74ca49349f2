//! The stdio stream of `exec` and attached `run`: a small framed protocol over an
//! HTTP connection upgraded to `ltv-stdio`. Our own framing rather than websockets:
//! both ends are ours, and it needs no masking or extra crate.
//!
//! A frame is `[type: u8][length: u32 big-endian][payload]`.

use bytes::Bytes;
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const UPGRADE_PROTOCOL: &str = "ltv-stdio";
const MAX_PAYLOAD: u32 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Client to server.
    Stdin(Bytes),
    StdinEof,
    Resize {
        cols: u16,
        rows: u16,
    },
    Signal(i32),
    /// Server to client.
    Stdout(Bytes),
    Stderr(Bytes),
    /// The process's exit code (128 + signal when killed); the last frame.
    Exit(i32),
    /// The stream failed; the last frame.
    Error(String),
}

impl Frame {
    fn encode(&self) -> (u8, Vec<u8>) {
        match self {
            Frame::Stdin(b) => (0, b.to_vec()),
            Frame::Stdout(b) => (1, b.to_vec()),
            Frame::Stderr(b) => (2, b.to_vec()),
            Frame::StdinEof => (3, vec![]),
            Frame::Resize { cols, rows } => {
                let mut v = cols.to_be_bytes().to_vec();
                v.extend_from_slice(&rows.to_be_bytes());
                (4, v)
            }
            Frame::Signal(s) => (5, s.to_be_bytes().to_vec()),
            Frame::Exit(c) => (6, c.to_be_bytes().to_vec()),
            Frame::Error(m) => (7, m.as_bytes().to_vec()),
        }
    }

    fn decode(kind: u8, payload: Vec<u8>) -> io::Result<Frame> {
        let bad = || {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad ltv-stdio frame type {kind}"),
            )
        };
        let int = |p: &[u8]| -> io::Result<i32> {
            Ok(i32::from_be_bytes(p.try_into().map_err(|_| bad())?))
        };
        Ok(match kind {
            0 => Frame::Stdin(payload.into()),
            1 => Frame::Stdout(payload.into()),
            2 => Frame::Stderr(payload.into()),
            3 => Frame::StdinEof,
            4 if payload.len() == 4 => Frame::Resize {
                cols: u16::from_be_bytes([payload[0], payload[1]]),
                rows: u16::from_be_bytes([payload[2], payload[3]]),
            },
            5 => Frame::Signal(int(&payload)?),
            6 => Frame::Exit(int(&payload)?),
            7 => Frame::Error(String::from_utf8_lossy(&payload).into_owned()),
            _ => return Err(bad()),
        })
    }
}

pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> io::Result<()> {
    let (kind, payload) = frame.encode();
    let mut buf = Vec::with_capacity(5 + payload.len());
    buf.push(kind);
    buf.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    buf.extend_from_slice(&payload);
    w.write_all(&buf).await?;
    w.flush().await
}

/// `Ok(None)` on a clean end of stream between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<Frame>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    r.read_exact(&mut head[1..]).await?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    if len > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("ltv-stdio frame of {len} bytes is too large"),
        ));
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).await?;
    Frame::decode(head[0], payload).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip() {
        let frames = vec![
            Frame::Stdin(Bytes::from_static(b"abc")),
            Frame::StdinEof,
            Frame::Resize { cols: 80, rows: 24 },
            Frame::Signal(15),
            Frame::Stdout(Bytes::from_static(b"out")),
            Frame::Stderr(Bytes::new()),
            Frame::Exit(-1),
            Frame::Error("boom".into()),
        ];
        let mut buf = Vec::new();
        for f in &frames {
            write_frame(&mut buf, f).await.unwrap();
        }
        let mut r = &buf[..];
        for f in &frames {
            assert_eq!(read_frame(&mut r).await.unwrap().as_ref(), Some(f));
        }
        assert_eq!(read_frame(&mut r).await.unwrap(), None);
    }

    #[tokio::test]
    async fn rejects_garbage() {
        let mut r = &[9u8, 0, 0, 0, 0][..];
        assert!(read_frame(&mut r).await.is_err());
        let mut r = &[1u8, 0xff, 0xff, 0xff, 0xff][..];
        assert!(read_frame(&mut r).await.is_err());
        let mut r = &[1u8, 0, 0][..];
        assert!(read_frame(&mut r).await.is_err(), "truncated header");
    }
}
