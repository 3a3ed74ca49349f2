//! Process stdio on the daemon side: detached (to the instance log) or attached
//! (pipes or a pty, pumped over an `ltv-stdio` stream). One piece serves `run` and `exec`.

use crate::stream::{read_frame, write_frame, Frame};
use bytes::Bytes;
use ltv_containers::process::Stdio;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use std::fs::OpenOptions;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// The daemon's ends of an attached process's stdio.
pub struct AttachedEnds {
    stdin: Option<OwnedFd>,
    stdout: OwnedFd,
    /// `None` with a tty, where stderr is the terminal too.
    stderr: Option<OwnedFd>,
    /// The pty master (same fd as stdout), for resizes.
    tty: bool,
}

/// stdin from /dev/null, stdout and stderr appended to `log`.
pub fn detached(log: &Path) -> io::Result<Stdio> {
    let out = OpenOptions::new().create(true).append(true).open(log)?;
    let err = out.try_clone()?;
    let null = OpenOptions::new().read(true).open("/dev/null")?;
    Ok(Stdio {
        stdin: null.into(),
        stdout: out.into(),
        stderr: err.into(),
    })
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(OFlag::O_CLOEXEC)?)
}

/// Pipes, or a pty when `tty`; stdin is /dev/null unless `stdin`.
pub fn attached(stdin: bool, tty: bool) -> io::Result<(Stdio, AttachedEnds)> {
    if tty {
        let pty = nix::pty::openpty(None, None)?;
        for fd in [&pty.master, &pty.slave] {
            fcntl(
                fd.as_raw_fd(),
                FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            )?;
        }
        let master_in = pty.master.try_clone()?;
        let stdio = Stdio {
            stdin: pty.slave.try_clone()?,
            stdout: pty.slave.try_clone()?,
            stderr: pty.slave,
        };
        // With a tty the stdin flag only decides whether we forward input.
        let ends = AttachedEnds {
            stdin: stdin.then_some(master_in),
            stdout: pty.master,
            stderr: None,
            tty: true,
        };
        return Ok((stdio, ends));
    }
    let (in_r, in_w) = if stdin {
        let (r, w) = pipe()?;
        (r, Some(w))
    } else {
        (
            OpenOptions::new().read(true).open("/dev/null")?.into(),
            None,
        )
    };
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    Ok((
        Stdio {
            stdin: in_r,
            stdout: out_w,
            stderr: err_w,
        },
        AttachedEnds {
            stdin: in_w,
            stdout: out_r,
            stderr: Some(err_r),
            tty: false,
        },
    ))
}

/// Non-blocking reads and writes on a pipe or pty fd.
struct Fd(AsyncFd<OwnedFd>);

impl Fd {
    fn new(fd: OwnedFd) -> io::Result<Fd> {
        let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open and the same.
        Ok(Fd(unsafe { AsyncFd::register(fd) }?))
    }

    /// `Ok(0)` at end of file; a pty master's EIO (no slave left) counts as that.
    async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.0.readable().await?;
            match guard.try_io(|fd| nix::unistd::read(fd.as_raw_fd(), buf).map_err(io::Error::from))
            {
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.0.writable().await?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }
}

async fn copy_out(
    fd: OwnedFd,
    wrap: fn(Bytes) -> Frame,
    out: mpsc::Sender<Frame>,
    log: Option<std::fs::File>,
) {
    let Ok(fd) = Fd::new(fd) else { return };
    let mut log = log;
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match fd.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if let Some(l) = log.as_mut() {
                    let _ = io::Write::write_all(l, &buf[..n]);
                }
                // A gone client must not stop the process: keep draining.
                let _ = out.send(wrap(Bytes::copy_from_slice(&buf[..n]))).await;
            }
        }
    }
}

/// Pumps stdio between the process and the stream until the process exits and its
/// output is drained, then sends the exit code. `signal` delivers client signals.
pub async fn pump<S, F>(
    stream: S,
    ends: AttachedEnds,
    exit: F,
    signal: impl Fn(i32) + Send + 'static,
    log: Option<&Path>,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
    F: Future<Output = i32>,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<Frame>(64);
    let log_file = |p: Option<&Path>| {
        p.and_then(|p| OpenOptions::new().create(true).append(true).open(p).ok())
    };

    let mut outputs = Vec::new();
    outputs.push(tokio::spawn(copy_out(
        ends.stdout,
        Frame::Stdout,
        tx.clone(),
        log_file(log),
    )));
    if let Some(err) = ends.stderr {
        outputs.push(tokio::spawn(copy_out(
            err,
            Frame::Stderr,
            tx.clone(),
            log_file(log),
        )));
    }

    let tty = ends.tty;
    let master_for_resize = if tty {
        ends.stdin.as_ref().and_then(|f| f.try_clone().ok())
    } else {
        None
    };
    let mut stdin = ends.stdin.map(Fd::new).transpose().ok().flatten();
    let input = tokio::spawn(async move {
        while let Ok(Some(frame)) = read_frame(&mut rd).await {
            match frame {
                Frame::Stdin(data) => {
                    if let Some(fd) = stdin.as_ref() {
                        if fd.write_all(&data).await.is_err() {
                            stdin = None;
                        }
                    }
                }
                // A terminal has no EOF of its own: send the EOF character (^D).
                Frame::StdinEof if tty => {
                    if let Some(fd) = stdin.as_ref() {
                        let _ = fd.write_all(&[4]).await;
                    }
                }
                Frame::StdinEof => stdin = None,
                Frame::Resize { cols, rows } => {
                    if let Some(m) = master_for_resize.as_ref() {
                        let ws = libc::winsize {
                            ws_row: rows,
                            ws_col: cols,
                            ws_xpixel: 0,
                            ws_ypixel: 0,
                        };
                        // SAFETY: TIOCSWINSZ reads a winsize struct that outlives the call.
                        unsafe { libc::ioctl(m.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
                    }
                }
                Frame::Signal(sig) => signal(sig),
                _ => {}
            }
        }
    });

    let writer = tokio::spawn(async move {
        let mut alive = true;
        while let Some(frame) = rx.recv().await {
            if alive && write_frame(&mut wr, &frame).await.is_err() {
                alive = false;
            }
            if matches!(frame, Frame::Exit(_) | Frame::Error(_)) {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });

    let code = exit.await;
    // Output still buffered in pipes is sent; a leftover background holder of the
    // pipe must not keep the client waiting forever.
    let drain = futures_util::future::join_all(outputs);
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
    let _ = tx.send(Frame::Exit(code)).await;
    drop(tx);
    let _ = writer.await;
    input.abort();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::read_frame;

    #[tokio::test]
    async fn pump_pipes_output_and_exit_code() {
        let (stdio, ends) = attached(true, false).unwrap();
        let (client, server) = tokio::io::duplex(1 << 16);
        // Play the process: echo stdin back on stdout, write to stderr, then "exit".
        let child = std::thread::spawn(move || {
            use std::io::{Read, Write};
            let mut input = std::fs::File::from(stdio.stdin);
            let mut out = std::fs::File::from(stdio.stdout);
            let mut err = std::fs::File::from(stdio.stderr);
            let mut buf = String::new();
            input.read_to_string(&mut buf).unwrap();
            out.write_all(buf.as_bytes()).unwrap();
            err.write_all(b"warn").unwrap();
        });
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<i32>();
        let server_task = tokio::spawn(pump(
            server,
            ends,
            async { done_rx.await.unwrap() },
            |_| {},
            None,
        ));
        let (mut rd, mut wr) = tokio::io::split(client);
        write_frame(&mut wr, &Frame::Stdin(Bytes::from_static(b"hello")))
            .await
            .unwrap();
        write_frame(&mut wr, &Frame::StdinEof).await.unwrap();
        tokio::task::spawn_blocking(move || child.join().unwrap())
            .await
            .unwrap();
        done_tx.send(7).unwrap();
        let (mut out, mut err, mut code) = (Vec::new(), Vec::new(), None);
        while let Some(f) = read_frame(&mut rd).await.unwrap() {
            match f {
                Frame::Stdout(b) => out.extend_from_slice(&b),
                Frame::Stderr(b) => err.extend_from_slice(&b),
                Frame::Exit(c) => code = Some(c),
                other => panic!("unexpected {other:?}"),
            }
        }
        server_task.await.unwrap();
        assert_eq!(out, b"hello");
        assert_eq!(err, b"warn");
        assert_eq!(code, Some(7));
    }
}
