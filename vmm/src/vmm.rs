//! The running microVM: starts vCPU threads, then serves guest and control events until the
//! guest stops or is stopped, and maps the outcome to an exit code.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::builder::MicroVm;
use crate::control::ControlRequest;
use crate::vstate::vcpu::{install_kick_handler, RunControl, RunState, VcpuHandle};
use crate::{VmmEvent, EXIT_ERROR, EXIT_OK};

/// How long after a kernel panic line we keep collecting console output.
const PANIC_GRACE: Duration = Duration::from_secs(3);

pub struct Vmm {
    vm: MicroVm,
    handles: Vec<VcpuHandle>,
    ctl: Arc<RunControl>,
    started: Instant,
    /// Time from vCPU start to the guest's `LTV-READY` line.
    ready_after: Option<Duration>,
}

impl Vmm {
    /// Starts every vCPU thread.
    pub fn start(mut vm: MicroVm) -> Result<Self, String> {
        install_kick_handler().map_err(|e| format!("installing vCPU kick signal handler: {e}"))?;
        let ctl = Arc::new(RunControl::new());
        let mut handles = Vec::new();
        for vcpu in std::mem::take(&mut vm.vcpus) {
            let h = vcpu
                .start(
                    ctl.clone(),
                    vm.pio.clone(),
                    vm.mmio.clone(),
                    vm.events_tx.clone(),
                )
                .map_err(|e| e.to_string())?;
            handles.push(h);
        }
        Ok(Vmm {
            vm,
            handles,
            ctl,
            started: Instant::now(),
            ready_after: None,
        })
    }

    /// Serves events until the VM stops; returns the process exit code.
    pub fn run(mut self) -> i32 {
        let mut panic_deadline: Option<Instant> = None;
        let code = loop {
            let ev = match panic_deadline {
                Some(d) => match self
                    .vm
                    .events_rx
                    .recv_timeout(d.saturating_duration_since(Instant::now()))
                {
                    Ok(ev) => ev,
                    Err(_) => break EXIT_ERROR,
                },
                None => match self.vm.events_rx.recv() {
                    Ok(ev) => ev,
                    Err(_) => break EXIT_ERROR,
                },
            };
            let panicked = panic_deadline.is_some();
            match ev {
                VmmEvent::GuestReset => {
                    eprintln!("ltv-vmm: guest reset (i8042), stopping");
                    break if panicked { EXIT_ERROR } else { EXIT_OK };
                }
                VmmEvent::GuestReady => {
                    self.ready_after.get_or_insert(self.started.elapsed());
                }
                VmmEvent::GuestHalted => {
                    eprintln!("ltv-vmm: guest halted/powered off, stopping");
                    break if panicked { EXIT_ERROR } else { EXIT_OK };
                }
                VmmEvent::GuestPanic(line) => {
                    eprintln!("ltv-vmm: guest kernel panic: {line}");
                    panic_deadline.get_or_insert(Instant::now() + PANIC_GRACE);
                }
                VmmEvent::VcpuStopped(id, stop) => {
                    if stop.is_clean() && !panicked {
                        eprintln!("ltv-vmm: vCPU {id} stopped: {stop:?}");
                        break EXIT_OK;
                    }
                    eprintln!("ltv-vmm: error: {}", describe(&stop));
                    break EXIT_ERROR;
                }
                VmmEvent::Control(req, reply) => {
                    let (answer, stop) = self.control(req);
                    let _ = reply.send(answer);
                    if stop {
                        break EXIT_OK;
                    }
                }
            }
        };
        self.shutdown();
        code
    }

    fn control(&mut self, req: ControlRequest) -> (String, bool) {
        let state = |s: RunState| match s {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Stopping => "stopping",
        };
        let reply = match req {
            ControlRequest::Status => serde_json::json!({
                "ok": true,
                "state": state(self.ctl.state()),
                "vcpus": self.handles.len(),
                "memory_mib": self.vm.memory_mib,
                "flavour": format!("{:?}", self.vm.flavour),
                "boot": if self.vm.pvh { "pvh" } else { "linux" },
                "uptime_ms": self.started.elapsed().as_millis() as u64,
                "ready": self.ready_after.is_some(),
                "ready_ms": self.ready_after.map(|d| d.as_millis() as u64),
            }),
            ControlRequest::Pause => {
                self.ctl.set(RunState::Paused);
                self.handles.iter().for_each(VcpuHandle::kick);
                let parked = self
                    .ctl
                    .wait_parked(self.handles.len() as u32, Duration::from_secs(5));
                if parked {
                    serde_json::json!({"ok": true, "state": "paused"})
                } else {
                    serde_json::json!({"ok": false, "error": "vCPUs did not park within 5 s"})
                }
            }
            ControlRequest::Resume => {
                self.ctl.set(RunState::Running);
                serde_json::json!({"ok": true, "state": "running"})
            }
            ControlRequest::Stop => {
                return (
                    serde_json::json!({"ok": true, "state": "stopping"}).to_string(),
                    true,
                )
            }
        };
        (reply.to_string(), false)
    }

    fn shutdown(&mut self) {
        self.ctl.set(RunState::Stopping);
        for h in &self.handles {
            h.kick();
        }
        for h in &mut self.handles {
            if !h.join(Duration::from_secs(2)) {
                eprintln!("ltv-vmm: a vCPU thread did not leave KVM_RUN; exiting anyway");
            }
        }
        // Drops the control socket file.
        self.vm.control.take();
    }
}

fn describe(stop: &crate::vstate::vcpu::VcpuStop) -> String {
    use crate::vstate::vcpu::VcpuStop;
    match stop {
        VcpuStop::Error(msg) => msg.clone(),
        other => format!("guest stopped while panicking: {other:?}"),
    }
}
