use clap::Parser;
use ltv::cli::{Cli, Command};

fn main() {
    // Re-executed as a container's init helper: no runtime, no argument parsing.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == ltv_containers::process::INIT_ARG)
    {
        ltv_containers::process::init_main();
    }
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == ltv::daemon::agent::TTY_EXEC_ARG)
    {
        ltv::daemon::agent::tty_exec_main();
    }
    let cli = Cli::parse();
    // The VMM owns its signals and threads: no async runtime, no tracing.
    if let Command::Vmm { config } = &cli.command {
        std::process::exit(ltv_vmm::vmm_main(config));
    }
    if matches!(cli.command, Command::Demo) {
        // The demo's daemon, bridge and containers live in a network namespace of their
        // own, made while the process is still single-threaded, so the host's network is
        // never touched.
        if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
            eprintln!("Error: the demo needs its own network namespace (run it as root): {e}");
            std::process::exit(1);
        }
    }
    let daemonish = matches!(
        cli.command,
        Command::Daemon { .. } | Command::Agent { .. } | Command::Demo
    );
    // The demo's embedded daemon keeps its info lines out of the show.
    init_tracing(daemonish && !matches!(cli.command, Command::Demo));
    if !daemonish {
        // A CLI piped into `head` ends quietly, as other tools do, instead of panicking
        // on a write to the closed pipe (Rust ignores SIGPIPE by default).
        // SAFETY: setting a signal disposition before any thread exists.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    // In a kvm-pvm guest, YMM/ZMM state does not survive a context switch (see
    // daemon::agent::PVM_GLIBC_TUNABLES), and our dependencies pick AVX2 paths at run time
    // (memchr): one thread keeps two of our own tasks from clobbering each other.
    let runtime = if daemonish && !ltv::daemon::agent::pvm_guest() {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    } else {
        // One thread starts faster, and a client needs no more.
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    let code = match runtime {
        Ok(rt) => rt.block_on(ltv::cli::run(cli)),
        Err(e) => {
            eprintln!("Error: cannot start the async runtime: {e}");
            1
        }
    };
    // Exit without waiting for a blocked stdin reader.
    std::process::exit(code);
}

fn init_tracing(daemon: bool) {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let default = if daemon { "info" } else { "warn" };
    // `Targets` (`info`, `ltv=debug,warn`) rather than `EnvFilter`, which links the regex
    // engine: its tables doubled the data that every start relocates (0.15 ms per CLI run).
    let (filter, bad) = match std::env::var("LTV_LOG") {
        Ok(v) => match v.parse::<Targets>() {
            Ok(f) => (f, None),
            Err(e) => (default.parse().expect("a level parses"), Some((v, e))),
        },
        Err(_) => (default.parse().expect("a level parses"), None),
    };
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .init();
    if let Some((value, e)) = bad {
        tracing::warn!("LTV_LOG={value:?} ignored: {e}");
    }
}
