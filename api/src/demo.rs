//! `ltv demo`: an embedded daemon on a temporary state dir, driven through the same
//! client as the CLI, showing each capability that works so far. It leaves nothing behind.

use crate::cli::{add_image_with_progress, stream_stdio};
use crate::client::{instance_url, Client, ClientError};
use crate::daemon::{self, DaemonConfig};
use crate::stream::{read_frame, Frame};
use crate::types::*;
use hyper::Method;
use std::time::{Duration, Instant};

fn step(title: &str) {
    println!("\n\x1b[1m== {title}\x1b[0m");
}

fn shell(cmd: &str) {
    println!("\x1b[2m$ {cmd}\x1b[0m");
}

pub async fn run() -> i32 {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("Error: the demo creates namespaces, mounts and cgroups: run it as root");
        return 1;
    }
    let dir = match tempfile::Builder::new().prefix("ltv-demo-").tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("Error: temporary directory: {e}");
            return 1;
        }
    };
    let config = DaemonConfig {
        state_dir: dir.path().join("state"),
        socket: dir.path().join("ltv.sock"),
        cgroup_root: format!("ltv-demo-{}", std::process::id()),
        pool_size: 1,
        kernel: None,
        // In the demo's own network namespace (see main.rs).
        bridge: Some(ltv_containers::network::BridgeConfig::default()),
        vsock_port: None,
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(daemon::serve(config.clone(), async {
        let _ = stop_rx.await;
    }));
    let client = Client::new(&config.socket);
    let mut ready = false;
    for _ in 0..100 {
        if client.get::<ServerInfo>("/1.0").await.is_ok() {
            ready = true;
            break;
        }
        if server.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let result = if ready {
        scenes(&client).await
    } else {
        Err(ClientError {
            status: None,
            message: "the embedded daemon did not start".into(),
        })
    };
    // Whatever happened, remove every instance we made before the daemon goes.
    if let Ok(instances) = client.get::<Vec<Instance>>("/1.0/instances").await {
        for i in instances {
            let _ = client
                .call_raw(
                    Method::DELETE,
                    &format!("/1.0/instances/{}?force=true", i.name),
                    None::<&()>,
                )
                .await;
        }
    }
    let _ = stop_tx.send(());
    if let Ok(Err(e)) = server.await {
        eprintln!("Error: daemon: {e:#}");
    }
    match result {
        Ok(()) => {
            println!("\nDemo finished; its daemon, instances and state directory are gone.");
            0
        }
        Err(e) => {
            eprintln!("Error: {e}");
            1
        }
    }
}

/// `ltv stop NAME --timeout SECS`.
async fn stop(client: &Client, name: &str, timeout: u64) -> Result<Instance, ClientError> {
    let body = StatePut {
        action: StateAction::Stop,
        force: false,
        timeout: Some(timeout),
    };
    let path = format!("/1.0/instances/{name}/state");
    client.call(Method::PUT, &path, Some(&body)).await
}

/// `ltv launch`: a detached busybox instance.
async fn launch(
    client: &Client,
    name: &str,
    kind: Kind,
    config: InstanceConfig,
) -> Result<Instance, ClientError> {
    let body = InstancesPost {
        name: Some(name.into()),
        kind,
        image: "busybox".into(),
        parent: None,
        config,
        start: true,
        attach: None,
        auto_remove: false,
    };
    client
        .call(Method::POST, "/1.0/instances", Some(&body))
        .await
}

/// Shows `cli`, the command line that does the same, then runs `config` in the foreground
/// as `ltv run --rm busybox` would and shows its exit code.
async fn run_shown(client: &Client, cli: &str, config: InstanceConfig) -> Result<(), ClientError> {
    shell(cli);
    let code = run_attached(client, "busybox", config).await?;
    println!("exit code {code}");
    Ok(())
}

async fn run_attached(
    client: &Client,
    image: &str,
    config: InstanceConfig,
) -> Result<i32, ClientError> {
    let body = InstancesPost {
        name: None,
        kind: Kind::App,
        image: image.into(),
        parent: None,
        config,
        start: true,
        attach: Some(AttachOptions::default()),
        auto_remove: true,
    };
    let up = client.upgrade("/1.0/instances", &body).await?;
    Ok(stream_stdio(up, false, false).await)
}

async fn exec(client: &Client, name: &str, command: &[&str]) -> Result<i32, ClientError> {
    let body = ExecPost {
        command: command.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let up = client.upgrade(&instance_url(name, "/exec"), &body).await?;
    Ok(stream_stdio(up, false, false).await)
}

/// `ltv exec`, its stdout kept; a failed command is an error.
async fn exec_output(client: &Client, name: &str, command: &[&str]) -> Result<String, ClientError> {
    let body = ExecPost {
        command: command.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let mut up = client.upgrade(&instance_url(name, "/exec"), &body).await?;
    let mut out = Vec::new();
    let failed = |message: String| ClientError {
        status: None,
        message: format!("exec in {name}: {message}"),
    };
    loop {
        match read_frame(&mut up).await {
            Ok(Some(Frame::Stdout(b))) => out.extend_from_slice(&b),
            Ok(Some(Frame::Exit(0))) => return Ok(String::from_utf8_lossy(&out).into_owned()),
            Ok(Some(Frame::Exit(code))) => return Err(failed(format!("exit code {code}"))),
            Ok(Some(_)) => {}
            Ok(None) => return Err(failed("the stream ended early".into())),
            Err(e) => return Err(failed(e.to_string())),
        }
    }
}

/// A level's step, given up at `deadline`: a guest that hangs must not hang the demo.
async fn bounded<T>(
    deadline: tokio::time::Instant,
    step: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    tokio::time::timeout_at(deadline, step)
        .await
        .unwrap_or_else(|_| {
            Err(ClientError {
                status: None,
                message: "no answer in the time the demo gives its levels".into(),
            })
        })
}

/// All levels together; a microVM level on a kvm-pvm host takes minutes, elsewhere seconds.
const LEVELS_TIME: Duration = Duration::from_secs(20 * 60);

/// One row of the nesting table.
struct Level {
    path: &'static str,
    kind: Kind,
    what: &'static str,
}

const LEVELS: &[Level] = &[
    Level {
        path: "app1",
        kind: Kind::App,
        what: "app",
    },
    Level {
        path: "sys1",
        kind: Kind::System,
        what: "system",
    },
    Level {
        path: "sys1/app1",
        kind: Kind::App,
        what: "app in system",
    },
    Level {
        path: "vm1",
        kind: Kind::Vm,
        what: "microVM",
    },
    Level {
        path: "vm1/sys1",
        kind: Kind::System,
        what: "system in VM",
    },
    Level {
        path: "vm1/sys1/app1",
        kind: Kind::App,
        what: "app in system in VM",
    },
];

/// Every kind and nesting level side by side, the same command in each, and what each
/// costs and shares, measured.
async fn levels(client: &Client, info: &ServerInfo) -> Result<(), ClientError> {
    step("Every kind and nesting level, side by side");
    let vms = info.kinds.contains(&Kind::Vm);
    if !vms {
        println!("(no usable /dev/kvm here: the microVM levels are left out)");
    } else if info.kvm == "pvm" {
        println!("(kvm-pvm host: guest kernel code is emulated, so a microVM takes a minute or more to boot here, and its agent may fail: see the README)");
    }
    let deadline = tokio::time::Instant::now() + LEVELS_TIME;
    let mut ready: Vec<(&Level, Result<Duration, String>)> = Vec::new();
    for level in LEVELS.iter().filter(|l| vms || !l.path.starts_with("vm")) {
        let parent_failed = ready
            .iter()
            .any(|(l, r)| r.is_err() && level.path.starts_with(&format!("{}/", l.path)));
        if parent_failed {
            ready.push((level, Err("its parent failed".into())));
            continue;
        }
        let kind = level.kind.as_str();
        let command = if level.kind == Kind::App {
            " -- sleep 3600"
        } else {
            ""
        };
        shell(&format!(
            "ltv launch busybox {} --kind {kind}{command}",
            level.path
        ));
        let config = InstanceConfig {
            command: if level.kind == Kind::App {
                vec!["sleep".into(), "3600".into()]
            } else {
                vec![]
            },
            memory: (level.kind == Kind::Vm).then(|| "256MiB".into()),
            ..Default::default()
        };
        let t = Instant::now();
        let result = bounded(deadline, launch(client, level.path, level.kind, config)).await;
        let elapsed = t.elapsed();
        match result {
            Ok(_) => {
                println!("{} ready in {:.2} s", level.path, elapsed.as_secs_f64());
                ready.push((level, Ok(elapsed)));
            }
            Err(e) => {
                println!("{} failed: {e}", level.path);
                ready.push((level, Err(e.message)));
            }
        }
    }
    let script = "echo \"$(hostname): kernel $(uname -r), pid ns $(readlink /proc/self/ns/pid)\"";
    let mut kernels = std::collections::HashMap::new();
    let mut failed: Vec<&str> = ready
        .iter()
        .filter(|(_, r)| r.is_err())
        .map(|(l, _)| l.path)
        .collect();
    for (level, r) in &ready {
        if r.is_err() {
            continue;
        }
        shell(&format!("ltv exec {} -- sh -c '{script}'", level.path));
        match bounded(
            deadline,
            exec_output(client, level.path, &["sh", "-c", script]),
        )
        .await
        {
            Ok(out) => {
                print!("{out}");
                let kernel = out
                    .split("kernel ")
                    .nth(1)
                    .and_then(|k| k.split(',').next());
                kernels.insert(level.path, kernel.unwrap_or("?").to_string());
            }
            Err(e) => {
                println!("{e}");
                failed.push(level.path);
            }
        }
    }
    // Memory and pid namespace depth as each level's daemon measures them.
    let tree: Vec<Instance> = bounded(deadline, client.get("/1.0/instances?recursion=tree"))
        .await
        .unwrap_or_default();
    let mut all = Vec::new();
    let mut stack: Vec<Instance> = tree;
    while let Some(mut i) = stack.pop() {
        stack.append(&mut i.children);
        all.push(i);
    }
    println!(
        "\n{:<15} {:<20} {:>8} {:>10} {:<20} {:>6} {:>13}",
        "LEVEL", "WHAT", "READY", "MEMORY", "KERNEL", "PID NS", "HOST KERNEL"
    );
    for (level, r) in &ready {
        let usage = all
            .iter()
            .find(|i| i.name == level.path)
            .and_then(|i| i.usage.clone());
        let kernel = kernels
            .get(level.path)
            .cloned()
            .unwrap_or_else(|| "-".into());
        let (time, shared) = match r {
            Ok(t) => (
                format!("{:.2} s", t.as_secs_f64()),
                if kernel == info.kernel && !level.path.starts_with("vm") {
                    "shared"
                } else {
                    "own"
                },
            ),
            Err(_) => ("failed".to_string(), "-"),
        };
        println!(
            "{:<15} {:<20} {:>8} {:>10} {:<20} {:>6} {:>13}",
            level.path,
            level.what,
            time,
            usage
                .as_ref()
                .map(|u| format_size(u.memory_bytes))
                .unwrap_or_else(|| "-".into()),
            kernel,
            usage
                .and_then(|u| u.pid_ns_depth)
                .map(|d| d.to_string())
                .unwrap_or_else(|| "-".into()),
            shared
        );
    }
    println!("MEMORY: a container's cgroup, a microVM's VMM process on the host; a nested level's is part of its parent's.");
    println!("PID NS: pid namespaces between the level's kernel and its processes.");
    if !failed.is_empty() {
        let known = info.kvm == "pvm" && failed.iter().all(|p| p.starts_with("vm"));
        if !known {
            return Err(ClientError {
                status: None,
                message: format!("failed at {}", failed.join(", ")),
            });
        }
        println!("The microVM levels failed on this kvm-pvm host: a known problem of its emulation (README, \"microVMs on kvm-pvm hosts\"); on hardware KVM they must not.");
    }
    Ok(())
}

fn sh(script: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), script.into()]
}

async fn scenes(client: &Client) -> Result<(), ClientError> {
    step("The host");
    let info: ServerInfo = client.get("/1.0").await?;
    println!(
        "kernel {}, KVM: {}, cgroups: {}, kinds: {:?}",
        info.kernel, info.kvm, info.cgroup, info.kinds
    );

    step("An image from Debian's busybox-static");
    shell("ltv image build busybox");
    let body = ImagesPost {
        alias: None,
        source: ImageSource::Build {
            builder: "busybox".into(),
            suite: None,
            include: vec![],
            mirror: None,
        },
    };
    let image = add_image_with_progress(client, &body).await?;
    println!(
        "image {} {} ({})",
        image.alias,
        &image.fingerprint[..12],
        format_size(image.size_bytes)
    );

    step("An application container in the foreground");
    let script = "echo \"hostname: $(hostname)\"; echo \"my pid: $$\"; echo \"processes: $(ls /proc | grep -c '^[0-9]')\"; cat /proc/net/dev | tail -n +3 | cut -d: -f1";
    let config = InstanceConfig {
        memory: Some("64MiB".into()),
        command: sh(script),
        ..Default::default()
    };
    let cli = format!("ltv run --rm --memory 64MiB busybox -- sh -c '{script}'");
    run_shown(client, &cli, config).await?;

    step("Exit codes and missing commands");
    let config = InstanceConfig {
        command: sh("exit 7"),
        ..Default::default()
    };
    run_shown(client, "ltv run --rm busybox -- sh -c 'exit 7'", config).await?;
    let config = InstanceConfig {
        command: vec!["no-such-command".into()],
        ..Default::default()
    };
    run_shown(client, "ltv run --rm busybox -- no-such-command", config).await?;

    step("A read-only root: the image itself, no overlay (Docker's --read-only)");
    let script = "cat /etc/hostname; touch /new-file";
    let config = InstanceConfig {
        read_only: true,
        network: Some("none".into()),
        command: sh(script),
        ..Default::default()
    };
    let cli = format!("ltv run --rm --read-only --network none busybox -- sh -c '{script}'");
    run_shown(client, &cli, config).await?;

    step("A detached container with limits, exec and usage");
    shell("ltv launch busybox web --kind app --memory 32MiB --pids 20 -- sh -c 'while true; do echo tick; sleep 1; done'");
    let config = InstanceConfig {
        memory: Some("32MiB".into()),
        pids: Some(20),
        command: sh("while true; do echo tick; sleep 1; done"),
        ..Default::default()
    };
    let web = launch(client, "web", Kind::App, config).await?;
    println!(
        "web is {} with host pid {}",
        web.status.as_str(),
        web.pid.unwrap_or_default()
    );
    shell("ltv exec web -- ps");
    exec(client, "web", &["ps"]).await?;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let web: Instance = client.get("/1.0/instances/web").await?;
    if let Some(u) = &web.usage {
        println!(
            "usage: memory {} of {}, {} processes, CPU {:.3}s",
            format_size(u.memory_bytes),
            u.memory_limit_bytes
                .map(format_size)
                .unwrap_or_else(|| "unlimited".into()),
            u.pids,
            u.cpu_time_ns as f64 / 1e9
        );
    }
    shell("ltv logs web");
    let logs = client
        .call_raw(Method::GET, "/1.0/instances/web/logs", None::<&()>)
        .await?;
    print!("{}", String::from_utf8_lossy(&logs));
    shell("ltv stop web --timeout 1 && ltv delete web");
    let web = stop(client, "web", 1).await?;
    println!("web is {}", web.status.as_str());
    client
        .call_raw(Method::DELETE, "/1.0/instances/web", None::<&()>)
        .await?;

    step("A system container: its own init, unprivileged, on the bridge");
    shell("ltv launch busybox sys1 && ltv info sys1");
    let sys1 = launch(client, "sys1", Kind::System, InstanceConfig::default()).await?;
    println!(
        "sys1: {} at {}, root inside = host uid {}",
        sys1.status.as_str(),
        sys1.address.as_deref().unwrap_or("-"),
        sys1.idmap_base
            .map(|b| b.to_string())
            .unwrap_or_else(|| "0".into())
    );
    shell("ltv exec sys1 -- ps");
    exec(client, "sys1", &["ps"]).await?;
    shell("ltv launch busybox www --kind app -- httpd -f -p 80 -h /etc");
    let httpd = ["httpd", "-f", "-p", "80", "-h", "/etc"]
        .map(String::from)
        .to_vec();
    let config = InstanceConfig {
        command: httpd,
        ..Default::default()
    };
    let www = launch(client, "www", Kind::App, config).await?;
    let url = format!(
        "http://{}/hostname",
        www.address.as_deref().unwrap_or("127.0.0.1")
    );
    shell(&format!("ltv exec sys1 -- wget -q -O - {url}"));
    exec(client, "sys1", &["wget", "-q", "-O", "-", &url]).await?;
    shell("ltv stop sys1   # busybox init gets its poweroff signal");
    let t = Instant::now();
    let sys1 = stop(client, "sys1", 10).await?;
    println!(
        "sys1 is {} after {:.1} s",
        sys1.status.as_str(),
        t.elapsed().as_secs_f64()
    );
    for name in ["sys1", "www"] {
        client
            .call_raw(
                Method::DELETE,
                &format!("/1.0/instances/{name}?force=true"),
                None::<&()>,
            )
            .await?;
    }

    levels(client, &info).await?;

    step("Start latency");
    let mut samples = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        let config = InstanceConfig {
            command: vec!["/bin/true".into()],
            ..Default::default()
        };
        run_attached(client, "busybox", config).await?;
        samples.push(t.elapsed());
    }
    samples.sort();
    println!("`ltv run --rm busybox -- /bin/true` through the API: median {:.1} ms over {} runs (see bench/ for the comparison with crun)", samples[samples.len() / 2].as_secs_f64() * 1e3, samples.len());
    Ok(())
}
