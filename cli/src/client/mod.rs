//! The client and operator commands: `deploy`, `functions`, `invoke`,
//! `jobs`, `observe`, `snapshot`, `executors`, `migrate`, `completions`.
//!
//! They work against a running fleet exactly as an outside client would:
//! over HTTP, through the proxy's public API with a tenant's token and its
//! admin API with the admin token (`docs/API.md`). Nothing here links the
//! proxy or the executor.
//!
//! Layout:
//! - [`http`]: the one HTTP client, its errors (with the next step to take)
//!   and progress bars;
//! - [`npy`]: a strict `.npy` reader and a writer;
//! - [`tensors`]: invoke bodies from input files, outputs to files;
//! - [`output`]: tables, sizes, JSON as printed;
//! - one module per command group.
//!
//! Conventions: tables and short lines on stdout by default, JSON with
//! `--json`; progress and notes on stderr; any failure prints `error: ...`
//! on stderr, with the API's code and message when the API answered, and
//! exits with status 1.

pub mod completions;
pub mod deploy;
pub mod executors;
pub mod functions;
pub mod http;
pub mod invoke;
pub mod jobs;
pub mod migrate;
pub mod npy;
pub mod observe;
pub mod output;
pub mod snapshot;
pub mod tensors;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;

use http::{Endpoint, HttpError, Service, Setting, Transport};
use tensor_wasm_shared::names::env;

/// Where the fleet is and how to authenticate; every client command takes
/// these flags, each with an environment fallback.
#[derive(Clone, Debug, clap::Args)]
pub struct Conn {
    /// The proxy's public URL.
    #[arg(
        long,
        env = env::URL,
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
    /// A tenant's API token; else the one in <state-dir>/dev-token.
    #[arg(long, env = env::TOKEN, hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// The proxy's admin URL.
    #[arg(
        long,
        env = env::ADMIN_URL,
        default_value = "http://127.0.0.1:9090",
        global = true
    )]
    pub admin_url: String,
    /// The admin API's token; else the one in <state-dir>/admin-token.
    #[arg(
        long,
        env = env::ADMIN_TOKEN,
        hide_env_values = true,
        global = true
    )]
    pub admin_token: Option<String>,
    /// The state directory of `tensor-wasm up`, read for tokens not given.
    #[arg(
        long,
        env = env::STATE_DIR,
        default_value = "./tensor-wasm-state",
        global = true
    )]
    pub state_dir: PathBuf,
    /// PEM certificates to trust for https:// URLs instead of the built-in
    /// roots: the CA that signed the proxy's certificate (or that
    /// certificate itself, if self-signed without CA:TRUE).
    #[arg(long, env = env::CA_CERT, global = true)]
    pub ca_cert: Option<PathBuf>,
    /// Longest wait for an answer once a request is sent, in seconds (0: no
    /// limit).
    #[arg(
        long,
        env = env::TIMEOUT_SECS,
        default_value_t = 600,
        global = true
    )]
    pub timeout_secs: u64,
}

/// File of the state directory holding a tenant token for local use.
pub const DEV_TOKEN_FILE: &str = "dev-token";
/// File of the state directory holding the admin token.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

impl Conn {
    fn transport(&self) -> Transport {
        Transport {
            ca_cert: self.ca_cert.clone(),
            timeout: (self.timeout_secs > 0).then(|| Duration::from_secs(self.timeout_secs)),
        }
    }

    /// The public API with the tenant's token.
    pub fn public(&self) -> Result<Endpoint, HttpError> {
        let token = token(
            self.token.as_deref(),
            &self.state_dir.join(DEV_TOKEN_FILE),
            "API token",
            Setting::new(env::TOKEN, "--token"),
        )?;
        Endpoint::new(Service::Public, &self.url, Some(token), &self.transport())
    }

    /// The public API without a token (`/metrics`, `/healthz`).
    pub fn public_anonymous(&self) -> Result<Endpoint, HttpError> {
        Endpoint::new(Service::Public, &self.url, None, &self.transport())
    }

    /// The admin API with the admin token.
    pub fn admin(&self) -> Result<Endpoint, HttpError> {
        let token = token(
            self.admin_token.as_deref(),
            &self.state_dir.join(ADMIN_TOKEN_FILE),
            "admin token",
            Setting::new(env::ADMIN_TOKEN, "--admin-token"),
        )?;
        Endpoint::new(
            Service::Admin,
            &self.admin_url,
            Some(token),
            &self.transport(),
        )
    }
}

/// The token given, else the first line of `file`.
fn token(
    given: Option<&str>,
    file: &Path,
    what: &'static str,
    setting: Setting,
) -> Result<String, HttpError> {
    if let Some(t) = given.map(str::trim).filter(|t| !t.is_empty()) {
        return Ok(t.to_string());
    }
    match std::fs::read_to_string(file) {
        Ok(text) => text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(str::to_string)
            .ok_or_else(|| HttpError::TokenFile {
                what,
                path: file.to_path_buf(),
                reason: "the file is empty".into(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(HttpError::NoToken {
            what,
            setting,
            path: file.to_path_buf(),
        }),
        Err(e) => Err(HttpError::TokenFile {
            what,
            path: file.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

/// The client and operator commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Register a function: a .wasm module (or .wat text), with optional
    /// safetensors assets and config.
    Deploy(deploy::Args),
    /// List, show and delete functions; read their logs.
    Functions(functions::Args),
    /// Call a function with tensors from .npy or .safetensors files, JSON
    /// or raw bytes.
    Invoke(invoke::Args),
    /// Follow, list and cancel async jobs.
    Jobs(jobs::Args),
    /// A live view of the executors and the proxy's request rate.
    Observe(observe::Args),
    /// Save, restore, list and inspect tenant snapshots (admin).
    Snapshot(snapshot::Args),
    /// List, register, drain and forget executors (admin).
    Executors(executors::Args),
    /// Move a tenant, state and all, to another executor (admin).
    Migrate(migrate::Args),
    /// Print a shell completion script.
    Completions(completions::Args),
}

/// Runs a client command; `cli` is the whole command line's definition
/// (for completions). Errors are printed here, as `error: ...`.
pub fn run(command: Command, cli: clap::Command) -> ExitCode {
    let result = match command {
        Command::Deploy(args) => deploy::run(args),
        Command::Functions(args) => functions::run(args),
        Command::Invoke(args) => invoke::run(args),
        Command::Jobs(args) => jobs::run(args),
        Command::Observe(args) => observe::run(args),
        Command::Snapshot(args) => snapshot::run(args),
        Command::Executors(args) => executors::run(args),
        Command::Migrate(args) => migrate::run(args),
        Command::Completions(args) => completions::run(args, cli),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each cause once: messages that
/// already quote their cause are not followed by it again.
fn report(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
    }
    text
}

/// A reader of our stdout went away (`| head`): not worth a message.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_come_from_the_flag_else_the_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(DEV_TOKEN_FILE);
        let t = |given| {
            token(
                given,
                &file,
                "API token",
                Setting::new(env::TOKEN, "--token"),
            )
        };
        let e = t(None).unwrap_err().to_string();
        assert!(e.contains("TENSOR_WASM_TOKEN"), "{e}");
        assert!(e.contains("tensor-wasm up"), "{e}");
        std::fs::write(&file, "\n  tok-dev \n").unwrap();
        assert_eq!(t(None).unwrap(), "tok-dev");
        assert_eq!(t(Some("tok-flag")).unwrap(), "tok-flag");
        assert_eq!(t(Some("  ")).unwrap(), "tok-dev");
        std::fs::write(&file, "\n").unwrap();
        assert!(t(None).unwrap_err().to_string().contains("empty"));
    }

    #[test]
    fn reports_name_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let quoted = anyhow::Error::new(tensors::TensorFileError::Io {
            path: "x.npy".into(),
            source: io,
        });
        assert_eq!(report(&quoted), "x.npy: no such file");
        let wrapped = anyhow::anyhow!("inner cause").context("outer");
        assert_eq!(report(&wrapped), "outer: inner cause");
    }
}
