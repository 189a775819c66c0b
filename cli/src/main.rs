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
#[command(
    name = "tensor-wasm",
    version = LONG_VERSION.as_str(),
    disable_version_flag = true,
    arg_required_else_help = true,
    about = "Multi-tenant WebAssembly functions over GPU tensor kernels"
)]
struct Cli {
    /// Print what this binary is: version, commit, compiler, profile,
    /// target and features.
    #[arg(short = 'V', long)]
    version: bool,
    /// With `--version`: as JSON, with the snapshot formats it reads and
    /// writes and the guest ABI versions it runs (what `tensor-wasm upgrade`
    /// checks before it starts a new binary).
    #[arg(long, requires = "version")]
    json: bool,
    #[command(subcommand)]
    command: Option<Command>,
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

#[allow(clippy::print_stdout)]
fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if cli.version {
        if cli.json {
            let report = tensor_wasm_shared::build::BuildReport::this_build(FEATURES);
            println!("{}", serde_json::json!(report));
        } else {
            println!("tensor-wasm {}", LONG_VERSION.as_str());
        }
        return std::process::ExitCode::SUCCESS;
    }
    let Some(command) = cli.command else {
        // `arg_required_else_help` answers a bare `tensor-wasm`; this is
        // `tensor-wasm --json` and the like.
        let _ = Cli::command().print_help();
        return std::process::ExitCode::FAILURE;
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    if !matches!(command, Command::Client(_)) {
        // Servers, the supervisor and upgrades write tenants' state.
        sys::private_files();
    }
    let result = match command {
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
