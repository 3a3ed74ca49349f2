//! The `ltv` command line: Docker- and Incus-shaped verbs over the REST API.

use crate::client::{instance_url, Client, ClientError, Upgraded};
use crate::daemon::{DaemonConfig, DEFAULT_SOCKET, DEFAULT_STATE_DIR};
use crate::stream::{read_frame, write_frame, Frame};
use crate::types::*;
use clap::{Args, Parser, Subcommand};
use hyper::Method;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use tokio::io::AsyncReadExt;

/// Exit code when ltv itself fails around a run or exec (Docker's convention).
pub const EXIT_LTV_ERROR: i32 = 125;

#[derive(Parser, Debug)]
#[command(
    name = "ltv",
    version,
    about = "Lightervisor: system containers, application containers and microVMs behind one API"
)]
pub struct Cli {
    /// The daemon's API socket.
    #[arg(long, global = true, env = "LTV_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
// Each subcommand's arguments are built only when it is the one given: building all of
// them at every start took 0.07 ms of the CLI's start, and 11 page faults.
#[command(defer = true)]
pub enum Command {
    /// Run the daemon (REST API on a Unix socket).
    Daemon {
        #[arg(long, env = "LTV_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Top-level cgroup for this daemon's instances.
        #[arg(long, env = "LTV_CGROUP_ROOT", default_value = "ltv")]
        cgroup_root: String,
        /// Container helpers kept pre-spawned to cut start and exec latency, of each kind
        /// (cgroup v1); 0 turns them off, and the fork server that clones helpers.
        #[arg(long, default_value_t = 2)]
        pool: usize,
        /// Guest kernel for microVMs (default: the newest guest-kernel/build.sh built).
        #[arg(long, env = "LTV_KERNEL")]
        kernel: Option<PathBuf>,
        /// Bridge for instance networking, created if missing; `none`: instances get
        /// loopback only.
        #[arg(long, default_value = "ltvbr0")]
        bridge: String,
        /// The bridge's IPv4 subnet; the daemon hands out static addresses in it.
        #[arg(long, default_value = "10.87.0.0/24")]
        subnet: String,
        /// Also serve the API on this vsock port, as a microVM's guest agent does.
        #[arg(long)]
        vsock_port: Option<u32>,
    },
    /// Run the guest agent: the daemon inside a microVM, also serving on vsock port 1024
    /// (the guest's /init starts it).
    Agent {
        #[arg(long, env = "LTV_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Connect stdin/stdout to a vsock port, like `socat - VSOCK-CONNECT:CID:PORT`
    /// (inside a microVM, CID 2 is the host: it arrives at `<vsock uds>_<PORT>` there).
    #[command(hide = true)]
    VsockPipe {
        cid: u32,
        port: u32,
    },
    /// Run one microVM's monitor (the daemon starts one per microVM).
    #[command(hide = true)]
    Vmm {
        #[arg(long)]
        config: PathBuf,
    },
    /// Create and start an application container in the foreground.
    Run(RunArgs),
    /// Create and start an instance in the background.
    Launch(LaunchArgs),
    /// Run a command inside a running instance.
    Exec(ExecArgs),
    /// List instances.
    #[command(alias = "ls")]
    List {
        /// List what is inside this instance (a path such as `vm1/sys1`).
        parent: Option<String>,
        /// Show what is nested in each instance too, level by level.
        #[arg(long)]
        tree: bool,
        #[arg(long, default_value = "table", value_parser = ["table", "json"])]
        format: String,
    },
    /// Show an instance, with live usage while it runs.
    Info {
        name: String,
    },
    Start {
        name: String,
    },
    Stop(StopArgs),
    Restart(StopArgs),
    /// Delete an instance.
    #[command(alias = "rm")]
    Delete {
        name: String,
        /// Stop it first if it runs.
        #[arg(short, long)]
        force: bool,
    },
    /// Change a running or stopped instance's limits: `ltv config set NAME memory 256MiB`.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Show an instance's console output.
    Logs {
        name: String,
    },
    /// Manage images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Start a throw-away daemon and show what works.
    Demo,
    /// Measure start time, density, overhead and isolation per kind, against peers.
    Bench(ltv_bench::BenchArgs),
}

#[derive(Args, Debug, Clone, Default)]
pub struct Limits {
    /// Memory limit, e.g. 64MiB (a microVM without one gets 128MiB of guest memory).
    #[arg(long)]
    pub memory: Option<String>,
    /// CPU bandwidth in CPUs, e.g. 0.5.
    #[arg(long)]
    pub cpus: Option<f64>,
    /// Maximum number of processes.
    #[arg(long)]
    pub pids: Option<u64>,
    /// Environment variable KEY=VALUE.
    #[arg(short = 'e', long = "env")]
    pub env: Vec<String>,
    /// Working directory inside the instance.
    #[arg(short = 'w', long = "workdir")]
    pub workdir: Option<String>,
    /// No user namespace: root inside is root on the host.
    #[arg(long)]
    pub privileged: bool,
    /// Mount the root filesystem read-only (app containers).
    #[arg(long)]
    pub read_only: bool,
    /// Mount a fresh tmpfs: PATH[:size=64m,mode=1777,exec,ro] (noexec by default).
    #[arg(long, value_name = "PATH[:OPTIONS]")]
    pub tmpfs: Vec<String>,
    /// `bridge` (default) or `none`.
    #[arg(long)]
    pub network: Option<String>,
}

impl Limits {
    fn config(&self, command: Vec<String>) -> InstanceConfig {
        InstanceConfig {
            memory: self.memory.clone(),
            cpus: self.cpus,
            pids: self.pids,
            env: self.env.clone(),
            command,
            workdir: self.workdir.clone(),
            privileged: self.privileged,
            read_only: self.read_only,
            tmpfs: self.tmpfs.clone(),
            network: self.network.clone(),
        }
    }
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Remove the container when it exits.
    #[arg(long)]
    pub rm: bool,
    /// Keep stdin open and forward it.
    #[arg(short, long)]
    pub interactive: bool,
    /// Allocate a terminal.
    #[arg(short, long)]
    pub tty: bool,
    /// A name, or a path inside a running instance: `sys1/app1`.
    #[arg(long)]
    pub name: Option<String>,
    /// The instance to run it in (the same as naming it `PARENT/NAME`).
    #[arg(long)]
    pub parent: Option<String>,
    #[command(flatten)]
    pub limits: Limits,
    pub image: String,
    /// Command and arguments (after `--`); default: the image's.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct LaunchArgs {
    pub image: String,
    /// A name, or a path inside a running instance: `vm1/sys1/app1`.
    pub name: String,
    /// The instance to create it in (the same as naming it `PARENT/NAME`).
    #[arg(long)]
    pub parent: Option<String>,
    #[arg(long, default_value = "system")]
    pub kind: String,
    #[command(flatten)]
    pub limits: Limits,
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    #[arg(short, long)]
    pub interactive: bool,
    #[arg(short, long)]
    pub tty: bool,
    #[arg(short = 'e', long = "env")]
    pub env: Vec<String>,
    #[arg(short = 'w', long = "workdir")]
    pub workdir: Option<String>,
    pub name: String,
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct StopArgs {
    pub name: String,
    /// Kill at once.
    #[arg(short, long)]
    pub force: bool,
    /// Seconds to wait for a clean stop before killing.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Set one of memory, cpus, pids.
    Set {
        name: String,
        key: String,
        value: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Build an image from Debian packages: `busybox` (seconds, offline) or `debian` (debootstrap).
    Build {
        builder: String,
        #[arg(long)]
        alias: Option<String>,
        #[arg(long)]
        suite: Option<String>,
        /// Extra packages, comma-separated.
        #[arg(long, value_delimiter = ',')]
        include: Vec<String>,
        /// Debian mirror URL; default: the host's apt configuration.
        #[arg(long)]
        mirror: Option<String>,
    },
    /// Import an OCI image layout (directory or tar) or a docker-archive tar.
    Import {
        path: PathBuf,
        #[arg(long)]
        alias: String,
    },
    #[command(alias = "ls")]
    List,
    #[command(alias = "rm")]
    Delete { alias: String },
}

fn fail(e: ClientError) -> i32 {
    eprintln!("Error: {e}");
    1
}

async fn vsock_pipe(cid: u32, port: u32) -> std::io::Result<()> {
    let sock = crate::daemon::agent::connect(cid, port).await?;
    let (mut rd, mut wr) = tokio::io::split(sock);
    let upload = async move {
        tokio::io::copy(&mut tokio::io::stdin(), &mut wr).await?;
        // Our EOF becomes the peer's.
        tokio::io::AsyncWriteExt::shutdown(&mut wr).await
    };
    let download = async move {
        let mut out = tokio::io::stdout();
        tokio::io::copy(&mut rd, &mut out).await?;
        tokio::io::AsyncWriteExt::flush(&mut out).await
    };
    tokio::try_join!(upload, download).map(|_| ())
}

async fn serve_daemon(config: DaemonConfig) -> i32 {
    match crate::daemon::serve(config, shutdown_signal()).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("Error: {e:#}");
            1
        }
    }
}

/// Runs a client command and returns the process exit code.
pub async fn run(cli: Cli) -> i32 {
    let client = Client::new(&cli.socket);
    match cli.command {
        Command::Daemon {
            state_dir,
            cgroup_root,
            pool,
            kernel,
            bridge,
            subnet,
            vsock_port,
        } => {
            let bridge = match bridge.as_str() {
                "none" => None,
                name => match ltv_containers::network::BridgeConfig::new(name, &subnet) {
                    Ok(b) => Some(b),
                    Err(e) => {
                        eprintln!("Error: --bridge/--subnet: {e}");
                        return 2;
                    }
                },
            };
            let config = DaemonConfig {
                state_dir,
                socket: cli.socket,
                cgroup_root,
                pool_size: pool,
                kernel,
                bridge,
                vsock_port,
            };
            serve_daemon(config).await
        }
        Command::Agent { state_dir } => {
            tracing::debug!("agent starting");
            crate::daemon::agent::configure_guest_network();
            tracing::debug!("guest network configured");
            let config = DaemonConfig {
                state_dir,
                socket: cli.socket,
                cgroup_root: "ltv".into(),
                // Every fork costs on an emulated guest kernel: no spare helpers.
                pool_size: 0,
                kernel: None,
                // For the containers nested in the VM; its subnet moves aside from the
                // one the VM itself is on.
                bridge: Some(ltv_containers::network::BridgeConfig::default()),
                vsock_port: Some(crate::daemon::agent::AGENT_VSOCK_PORT),
            };
            serve_daemon(config).await
        }
        // main() runs it before any runtime exists; this is for callers of run().
        Command::Vmm { config } => ltv_vmm::vmm_main(&config),
        Command::VsockPipe { cid, port } => match vsock_pipe(cid, port).await {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("Error: vsock {cid}:{port}: {e}");
                1
            }
        },
        Command::Run(args) => run_foreground(&client, args).await,
        Command::Launch(args) => launch(&client, args).await.map_or_else(fail, |_| 0),
        Command::Exec(args) => {
            let body = ExecPost {
                command: args.command,
                env: args.env,
                cwd: args.workdir,
                tty: args.tty,
                stdin: args.interactive,
            };
            match client
                .upgrade(&instance_url(&args.name, "/exec"), &body)
                .await
            {
                Ok(up) => stream_stdio(up, args.interactive, args.tty).await,
                Err(e) => {
                    eprintln!("Error: {e}");
                    EXIT_LTV_ERROR
                }
            }
        }
        Command::List {
            parent,
            tree,
            format,
        } => list(&client, parent.as_deref(), tree, &format)
            .await
            .map_or_else(fail, |_| 0),
        Command::Info { name } => match client.get::<Instance>(&instance_url(&name, "")).await {
            Ok(i) => {
                print_info(&i);
                0
            }
            Err(e) => fail(e),
        },
        Command::Start { name } => state(&client, &name, StateAction::Start, false, None).await,
        Command::Stop(a) => {
            state(
                &client,
                &a.name,
                StateAction::Stop,
                a.force,
                Some(a.timeout),
            )
            .await
        }
        Command::Restart(a) => {
            state(
                &client,
                &a.name,
                StateAction::Restart,
                a.force,
                Some(a.timeout),
            )
            .await
        }
        Command::Delete { name, force } => {
            let path = instance_url(&name, &format!("?force={force}"));
            client
                .call_raw(Method::DELETE, &path, None::<&()>)
                .await
                .map_or_else(fail, |_| 0)
        }
        Command::Config(ConfigCommand::Set { name, key, value }) => {
            let mut patch = InstancePatch::default();
            let bad = |m: String| {
                fail(ClientError {
                    status: None,
                    message: m,
                })
            };
            match key.as_str() {
                "memory" => patch.memory = Some(value),
                "cpus" => match value.parse() {
                    Ok(v) => patch.cpus = Some(v),
                    Err(_) => return bad(format!("cpus: {value:?} is not a number")),
                },
                "pids" => match value.parse() {
                    Ok(v) => patch.pids = Some(v),
                    Err(_) => return bad(format!("pids: {value:?} is not a whole number")),
                },
                other => return bad(format!("unknown key {other:?}: use memory, cpus or pids")),
            }
            client
                .call::<Instance>(Method::PATCH, &instance_url(&name, ""), Some(&patch))
                .await
                .map_or_else(fail, |_| 0)
        }
        Command::Logs { name } => match client
            .call_raw(Method::GET, &instance_url(&name, "/logs"), None::<&()>)
            .await
        {
            Ok(text) => {
                let _ = std::io::stdout().write_all(&text);
                0
            }
            Err(e) => fail(e),
        },
        Command::Image(cmd) => image(&client, cmd).await.map_or_else(fail, |_| 0),
        Command::Demo => crate::demo::run().await,
        Command::Bench(args) => {
            let exe = std::env::current_exe().unwrap_or_else(|_| "ltv".into());
            tokio::task::spawn_blocking(move || ltv_bench::run(&args, &exe))
                .await
                .unwrap_or(1)
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    let mut int = signal(SignalKind::interrupt()).expect("signal handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

async fn run_foreground(client: &Client, args: RunArgs) -> i32 {
    let body = InstancesPost {
        name: args.name,
        kind: Kind::App,
        image: args.image,
        parent: args.parent,
        config: args.limits.config(args.command),
        start: true,
        attach: Some(AttachOptions {
            stdin: args.interactive,
            tty: args.tty,
        }),
        auto_remove: args.rm,
    };
    match client.upgrade("/1.0/instances", &body).await {
        Ok(up) => stream_stdio(up, args.interactive, args.tty).await,
        Err(e) => {
            eprintln!("Error: {e}");
            EXIT_LTV_ERROR
        }
    }
}

async fn launch(client: &Client, args: LaunchArgs) -> Result<(), ClientError> {
    let kind: Kind = args.kind.parse().map_err(|message| ClientError {
        status: None,
        message,
    })?;
    let body = InstancesPost {
        name: Some(args.name),
        kind,
        image: args.image,
        parent: args.parent,
        config: args.limits.config(args.command),
        start: true,
        attach: None,
        auto_remove: false,
    };
    let instance: Instance = client
        .call(Method::POST, "/1.0/instances", Some(&body))
        .await?;
    println!(
        "Launched {} ({}, pid {})",
        instance.name,
        instance.kind.as_str(),
        instance.pid.unwrap_or_default()
    );
    Ok(())
}

async fn state(
    client: &Client,
    name: &str,
    action: StateAction,
    force: bool,
    timeout: Option<u64>,
) -> i32 {
    let body = StatePut {
        action,
        force,
        timeout,
    };
    client
        .call::<Instance>(Method::PUT, &instance_url(name, "/state"), Some(&body))
        .await
        .map_or_else(fail, |_| 0)
}

async fn list(
    client: &Client,
    parent: Option<&str>,
    tree: bool,
    format: &str,
) -> Result<(), ClientError> {
    let mut query = vec![];
    if tree {
        query.push("recursion=tree".to_string());
    }
    if let Some(p) = parent {
        query.push(format!(
            "parent={}",
            percent_encoding::utf8_percent_encode(p, percent_encoding::NON_ALPHANUMERIC)
        ));
    }
    let instances: Vec<Instance> = client
        .get(&format!("/1.0/instances?{}", query.join("&")))
        .await?;
    if format == "json" {
        println!(
            "{}",
            serde_json::to_string_pretty(&instances).expect("json")
        );
        return Ok(());
    }
    if tree {
        println!(
            "{:<32} {:<7} {:<8} {:<15} {:>10}",
            "NAME", "KIND", "STATUS", "ADDRESS", "MEMORY"
        );
        print_tree(&instances, 0);
        return Ok(());
    }
    println!(
        "{:<24} {:<7} {:<8} {:<12} {:<15} {:>8}  CREATED",
        "NAME", "KIND", "STATUS", "IMAGE", "ADDRESS", "PID"
    );
    for i in instances {
        let pid = i.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
        println!(
            "{:<24} {:<7} {:<8} {:<12} {:<15} {:>8}  {}",
            i.name,
            i.kind.as_str(),
            i.status.as_str(),
            i.image,
            i.address.as_deref().unwrap_or("-"),
            pid,
            i.created_at
        );
    }
    Ok(())
}

/// One line per instance, its nested instances indented under it.
fn print_tree(instances: &[Instance], depth: usize) {
    for i in instances {
        let memory = i
            .usage
            .as_ref()
            .map(|u| format_size(u.memory_bytes))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<32} {:<7} {:<8} {:<15} {:>10}",
            format!("{}{}", "  ".repeat(depth), i.name),
            i.kind.as_str(),
            i.status.as_str(),
            i.address.as_deref().unwrap_or("-"),
            memory
        );
        print_tree(&i.children, depth + 1);
    }
}

fn print_info(i: &Instance) {
    println!("Name:       {}", i.name);
    println!("Kind:       {}", i.kind.as_str());
    println!("Status:     {}", i.status.as_str());
    println!(
        "Image:      {} ({})",
        i.image,
        &i.image_fingerprint[..i.image_fingerprint.len().min(12)]
    );
    println!("Created:    {}", i.created_at);
    if let Some(pid) = i.pid {
        println!("PID:        {pid}");
    }
    match i.idmap_base {
        // Its daemon maps it within its parent's own unprivileged range.
        Some(_) if i.parent.is_some() => println!(
            "Privileged: no (root is root of {}, itself unprivileged)",
            i.parent.as_deref().unwrap_or_default()
        ),
        Some(base) => println!(
            "Privileged: no (root is host uid {base}, ids {base}-{})",
            base + 65535
        ),
        None if i.kind == Kind::Vm => {}
        None => println!("Privileged: yes (root is host root)"),
    }
    if let Some(code) = i.exit_code {
        println!("Exit code:  {code}");
    }
    let c = &i.config;
    println!(
        "Limits:     memory={} cpus={} pids={}",
        c.memory.as_deref().unwrap_or("-"),
        c.cpus.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
        c.pids.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
    );
    if !c.command.is_empty() {
        println!("Command:    {}", c.command.join(" "));
    }
    if c.read_only {
        println!("Root fs:    read-only");
    }
    if !c.tmpfs.is_empty() {
        println!("Tmpfs:      {}", c.tmpfs.join(" "));
    }
    if let Some(u) = &i.usage {
        println!(
            "Memory:     {}{}",
            format_size(u.memory_bytes),
            u.memory_limit_bytes
                .map(|l| format!(" of {}", format_size(l)))
                .unwrap_or_default()
        );
        println!("Processes:  {}", u.pids);
        println!("CPU time:   {:.3}s", u.cpu_time_ns as f64 / 1e9);
        if let Some(g) = &u.guest {
            let m = &g.machine;
            println!("Guest:      kernel {}, up {:.0}s", g.kernel, m.uptime_secs);
            println!(
                "Guest mem:  {} used of {}",
                format_size(
                    m.memory_total_bytes
                        .saturating_sub(m.memory_available_bytes)
                ),
                format_size(m.memory_total_bytes)
            );
        }
    }
}

async fn image(client: &Client, cmd: ImageCommand) -> Result<(), ClientError> {
    let body = match cmd {
        ImageCommand::List => {
            let images: Vec<Image> = client.get("/1.0/images").await?;
            println!(
                "{:<16} {:<14} {:>10}  SOURCE",
                "ALIAS", "FINGERPRINT", "SIZE"
            );
            for i in images {
                println!(
                    "{:<16} {:<14} {:>10}  {}",
                    i.alias,
                    &i.fingerprint[..12.min(i.fingerprint.len())],
                    format_size(i.size_bytes),
                    i.source
                );
            }
            return Ok(());
        }
        ImageCommand::Delete { alias } => {
            client
                .call_raw(Method::DELETE, &format!("/1.0/images/{alias}"), None::<&()>)
                .await?;
            return Ok(());
        }
        ImageCommand::Build {
            builder,
            alias,
            suite,
            include,
            mirror,
        } => ImagesPost {
            alias,
            source: ImageSource::Build {
                builder,
                suite,
                include,
                mirror,
            },
        },
        ImageCommand::Import { path, alias } => {
            let path = std::fs::canonicalize(&path).map_err(|e| ClientError {
                status: None,
                message: format!("{}: {e}", path.display()),
            })?;
            ImagesPost {
                alias: Some(alias),
                source: ImageSource::Import {
                    path: path.to_string_lossy().into_owned(),
                },
            }
        }
    };
    let image = add_image_with_progress(client, &body).await?;
    println!(
        "Image {} ready: {} ({})",
        image.alias,
        &image.fingerprint[..12.min(image.fingerprint.len())],
        format_size(image.size_bytes)
    );
    Ok(())
}

/// POST /1.0/images, showing the daemon's progress events on a progress bar.
pub async fn add_image_with_progress(
    client: &Client,
    body: &ImagesPost,
) -> Result<Image, ClientError> {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_msg} {pos}/{len}",
        )
        .expect("template"),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    let result = client
        .progress::<Image>("/1.0/images", body, |event| match event {
            ProgressEvent::Stage { message } => bar.set_message(message.clone()),
            ProgressEvent::Advance { done, total } => {
                if let Some(t) = total {
                    bar.set_length(*t);
                }
                bar.set_position(*done);
            }
            _ => {}
        })
        .await;
    bar.finish_and_clear();
    result
}

/// Restores the terminal mode when dropped.
struct RawMode(Option<nix::sys::termios::Termios>);

impl RawMode {
    fn enable(tty: bool) -> RawMode {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        if !tty || !stdin.is_terminal() {
            return RawMode(None);
        }
        let Ok(saved) = tcgetattr(&stdin) else {
            return RawMode(None);
        };
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        let _ = tcsetattr(&stdin, SetArg::TCSANOW, &raw);
        RawMode(Some(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                saved,
            );
        }
    }
}

fn terminal_size() -> Option<(u16, u16)> {
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ fills a winsize struct we own.
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_col > 0).then_some((ws.ws_col, ws.ws_row))
}

/// Client side of `ltv-stdio`: forwards stdin, signals and resizes, prints output,
/// and returns the remote exit code.
pub async fn stream_stdio(up: Upgraded, stdin: bool, tty: bool) -> i32 {
    let (mut rd, wr) = tokio::io::split(up);
    let wr = std::sync::Arc::new(tokio::sync::Mutex::new(wr));
    let _raw = RawMode::enable(tty);
    let mut tasks = Vec::new();
    if tty {
        if let Some((cols, rows)) = terminal_size() {
            let _ = write_frame(&mut *wr.lock().await, &Frame::Resize { cols, rows }).await;
        }
        let w = wr.clone();
        tasks.push(tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut winch) = signal(SignalKind::window_change()) else {
                return;
            };
            while winch.recv().await.is_some() {
                if let Some((cols, rows)) = terminal_size() {
                    let _ = write_frame(&mut *w.lock().await, &Frame::Resize { cols, rows }).await;
                }
            }
        }));
    } else {
        // Without a terminal, Ctrl-C and TERM go to the remote process (Docker's sig-proxy).
        let w = wr.clone();
        tasks.push(tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                return;
            };
            loop {
                let sig = tokio::select! {
                    _ = int.recv() => libc::SIGINT,
                    _ = term.recv() => libc::SIGTERM,
                };
                let _ = write_frame(&mut *w.lock().await, &Frame::Signal(sig)).await;
            }
        }));
    }
    if stdin {
        let w = wr.clone();
        tasks.push(tokio::spawn(async move {
            let mut input = tokio::io::stdin();
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match input.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = write_frame(&mut *w.lock().await, &Frame::StdinEof).await;
                        return;
                    }
                    Ok(n) => {
                        let frame = Frame::Stdin(bytes::Bytes::copy_from_slice(&buf[..n]));
                        if write_frame(&mut *w.lock().await, &frame).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }));
    }
    let code = loop {
        match read_frame(&mut rd).await {
            Ok(Some(Frame::Stdout(b))) => {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(&b);
                let _ = out.flush();
            }
            Ok(Some(Frame::Stderr(b))) => {
                let _ = std::io::stderr().lock().write_all(&b);
            }
            Ok(Some(Frame::Exit(code))) => break code,
            Ok(Some(Frame::Error(m))) => {
                eprintln!("Error: {m}");
                break EXIT_LTV_ERROR;
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => {
                eprintln!("Error: the connection to the daemon ended before the process did");
                break EXIT_LTV_ERROR;
            }
        }
    };
    for t in tasks {
        t.abort();
    }
    code
}

#[cfg(test)]
mod definition_tests {
    #[test]
    fn cli_definition_is_consistent() {
        // Builds every (deferred) subcommand and checks clap's invariants on each.
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
