//! `tensor-wasm`: one binary for every TensorWasm process and command.
//!
//! Subcommands live in their own modules; this file only parses the command
//! line, sets up logging and runs the chosen one.

mod client;
mod executor;
mod proxy;
mod sys;
mod up;
mod upgrade;

use clap::{CommandFactory, Parser, Subcommand};

/// mimalloc: the proxy allocates and frees a pingora buffer of 64 KiB per
/// request, which costs glibc's allocator 1.5–3 µs each time
/// (bench/PROXY-FINDINGS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Features compiled into this binary, for `--version` and `build_info`.
const FEATURES: &str = if cfg!(feature = "cuda") { "cuda" } else { "" };

#[derive(Debug, Parser)]
#[command(name = "tensor-wasm", version = LONG_VERSION.as_str(), about = "Multi-tenant WebAssembly functions over GPU tensor kernels")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run an executor: one process per GPU, MIG slice or CPU.
    Executor(executor::Args),
    /// Run the proxy: the public endpoint and the admin API.
    Proxy(proxy::Args),
    /// Bring up a local fleet: a proxy and one executor per GPU, MIG slice
    /// (or two CPU executors), supervised until Ctrl-C.
    Up(up::Args),
    /// Roll a running fleet to new executor and/or proxy binaries, moving
    /// every tenant live.
    Upgrade(upgrade::Args),
    /// Client and operator commands against a running fleet.
    #[command(flatten)]
    Client(client::Command),
}

/// `--version`: the version, commit, compiler, profile, target and features.
static LONG_VERSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    use tensor_wasm_shared::build;
    format!(
        "{} (git {}, {}, {} {}, features: {})",
        build::VERSION,
        build::GIT_SHA,
        build::RUSTC,
        build::PROFILE,
        build::TARGET,
        if FEATURES.is_empty() {
            "none"
        } else {
            FEATURES
        }
    )
});

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Executor(args) => executor::run(args, FEATURES),
        Command::Proxy(args) => proxy::run(args),
        Command::Up(args) => up::run(args),
        Command::Upgrade(args) => upgrade::run(args),
        // Client commands print their own errors, plainly, for a terminal.
        Command::Client(command) => return client::run(command, Cli::command()),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
