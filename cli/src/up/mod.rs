//! `tensor-wasm up`: a whole fleet on one machine, supervised.
//!
//! It starts one executor per GPU or MIG slice that NVML finds (each pinned
//! with `CUDA_VISIBLE_DEVICES=<uuid>`), or CPU executors when there is none,
//! then a proxy in front of them, all as children of this process running
//! this same binary. With `--proxies N` (N > 1) it starts N proxies sharing
//! the public port and a placement table in etcd: the system's `etcd`,
//! supervised like the others (its data in `<state>/etcd`), unless
//! `--placement etcd://…` names one. Then it supervises:
//!
//! - a child that exits on its own is restarted (same id, port and state
//!   directory, so registrations come back), at most once every two
//!   seconds;
//! - Ctrl-C or SIGTERM stops every child gracefully (SIGTERM, then SIGKILL
//!   after 30 s) and exits; children also get SIGTERM from the kernel if
//!   this process dies without that chance, so none is orphaned;
//! - a control socket, `<state>/control.sock`, takes one JSON request per
//!   line (`ls`, `start`, `stop`, `upgrade_proxy`) from other commands
//!   (`executors add` and `rm`, `upgrade`) and answers each with one JSON
//!   line.
//!
//! Everything it needs to come back the same lives in the state directory:
//! the executor set and the etcd (`up.json`), tokens (`dev-token`, `admin-token`,
//! `internal-token`, `tokens`, all 0600), each process's state, and logs
//! (`logs/<id>.log`).
//!
//! Who owns what:
//! - this file: the command's flags, the tokens, the start-up order and the
//!   welcome text;
//! - [`launcher`]: which executors run here and how each child is started;
//! - [`supervisor`]: the running children, restarts, requests carried out,
//!   the proxies' hand-off, the final stop;
//! - [`control`]: the control socket's protocol, client and server loop,
//!   which is all that other commands use of `up`.

pub mod control;
mod launcher;
mod supervisor;

pub use launcher::Proxies;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use tensor_wasm_shared::names::env;

use launcher::{EtcdSpec, Launcher, Saved};
use supervisor::Supervisor;

/// Flags of `tensor-wasm up`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where the fleet keeps everything (tokens, placements, functions, logs).
    #[arg(long, env = env::STATE_DIR, default_value = "./tensor-wasm-state")]
    state_dir: PathBuf,
    /// Public listener of the proxy.
    #[arg(long, env = env::PROXY_LISTEN, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Admin listener of the proxy.
    #[arg(long, env = env::ADMIN_LISTEN, default_value = "127.0.0.1:9090")]
    admin_listen: String,
    /// `auto`: one executor per GPU/MIG slice NVML finds, else CPU
    /// executors; `cpu`: CPU executors only.
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu"])]
    device: String,
    /// CPU executors to start when there is no GPU.
    #[arg(long, env = env::CPU_EXECUTORS, default_value_t = 2)]
    cpu_executors: usize,
    /// Proxies to run, all on the public port (the kernel spreads
    /// connections across them), proxy k's admin listener on
    /// --admin-listen's port + k. More than one keep placement in etcd.
    #[arg(long, env = env::PROXIES, default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    proxies: u16,
    /// The proxies' placement table: `file` (one proxy), or
    /// `etcd://host:port[,…][/prefix]` for an etcd of your own. Left out:
    /// the file for one proxy; for more, an etcd this command runs.
    #[arg(long, env = env::PLACEMENT)]
    placement: Option<String>,
}

/// Where the proxies keep placement: `--placement`, or the etcd this
/// fleet ran before (once there, the table stays), or a new etcd for more
/// than one proxy, or the file. The etcd `up` is to run, if any, and the
/// proxies' `--placement` (none: the file).
fn placement(
    args: &Args,
    saved: Option<EtcdSpec>,
) -> anyhow::Result<(Option<EtcdSpec>, Option<String>)> {
    let own = |spec: EtcdSpec| {
        let p = spec.placement();
        (Some(spec), Some(p))
    };
    match (args.placement.as_deref(), saved) {
        (Some(_), Some(spec)) => bail!(
            "this fleet keeps its placement table in the etcd it runs ({}, data in etcd/ of the state directory): leave --placement out",
            spec.addr()
        ),
        (Some("file"), None) if args.proxies > 1 => bail!(
            "--proxies {} needs a placement table the proxies share: leave --placement out (up runs etcd) or give --placement etcd://…",
            args.proxies
        ),
        (Some("file"), None) => Ok((None, None)),
        (Some(p), None) if p.starts_with("etcd://") || p.starts_with("etcds://") => {
            Ok((None, Some(p.to_string())))
        }
        (Some(p), None) => {
            bail!("--placement {p:?}: expected file or etcd://host:port[,…][/prefix]")
        }
        (None, Some(spec)) => Ok(own(spec)),
        (None, None) if args.proxies > 1 => Ok(own(EtcdSpec::new()?)),
        (None, None) => Ok((None, None)),
    }
}

/// Writes a file only its owner may read.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// A secret kept in `<state>/<name>`, made once.
fn secret(state: &Path, name: &str, prefix: &str) -> anyhow::Result<(String, bool)> {
    let path = state.join(name);
    if let Ok(text) = std::fs::read_to_string(&path) {
        let t = text.trim().to_string();
        if !t.is_empty() {
            return Ok((t, false));
        }
    }
    let mut bytes = [0u8; 24];
    rand::RngCore::try_fill_bytes(&mut rand::rngs::OsRng, &mut bytes)
        .map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let token = format!("{prefix}{}", hex::encode(bytes));
    write_private(&path, format!("{token}\n").as_bytes())?;
    Ok((token, true))
}

/// The tokens of the fleet.
struct Tokens {
    /// Environment every child gets.
    env: Vec<(String, String)>,
    /// The dev token `up` made, and whether it is new; None when tokens
    /// are configured.
    dev: Option<(String, bool)>,
}

/// Configured tokens win; otherwise a dev token, and an internal and an
/// admin token, each made once and kept in the state directory.
fn tokens(state: &Path) -> anyhow::Result<Tokens> {
    let mut vars = Vec::new();
    let mut dev_token = None;
    let configured = std::env::var_os(env::API_TOKENS).is_some()
        || std::env::var_os(env::API_TOKENS_FILE).is_some();
    if !configured {
        let (token, fresh) = secret(state, "dev-token", "twdev_")?;
        write_private(&state.join("tokens"), format!("{token}:dev\n").as_bytes())?;
        vars.push((
            env::API_TOKENS_FILE.to_string(),
            state.join("tokens").to_string_lossy().into_owned(),
        ));
        dev_token = Some((token, fresh));
    }
    if std::env::var_os(env::INTERNAL_TOKEN).is_none() {
        let (t, _) = secret(state, "internal-token", "twint_")?;
        vars.push((env::INTERNAL_TOKEN.into(), t));
    }
    if std::env::var_os(env::ADMIN_TOKEN).is_none() {
        let (t, _) = secret(state, "admin-token", "twadm_")?;
        vars.push((env::ADMIN_TOKEN.into(), t));
    }
    // Snapshots and the rounds of a move are signed: an executor of the
    // fleet imports nothing the fleet did not sign (`SECURITY.md`).
    if std::env::var_os(env::SNAPSHOT_KEY).is_none() {
        let (k, _) = secret(state, "snapshot-key", "twsnap_")?;
        vars.push((env::SNAPSHOT_KEY.into(), k));
    }
    Ok(Tokens {
        env: vars,
        dev: dev_token,
    })
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let state = args.state_dir.clone();
    tensor_wasm_shared::files::private_dir(&state)
        .with_context(|| format!("cannot create {}", state.display()))?;
    let state = state.canonicalize()?;
    let me = std::env::current_exe().context("cannot find this binary")?;
    let tokens = tokens(&state)?;
    let saved = Saved::load(&state)?;
    let (etcd, placement) = placement(&args, saved.etcd.clone())?;
    // Checked before anything starts.
    let mut proxies = Proxies::new(
        &args.listen,
        &args.admin_listen,
        usize::from(args.proxies),
        placement,
    )?;
    let specs = launcher::plan(saved, args.device == "cpu", args.cpu_executors)?;

    let mut sup = Supervisor::new(Launcher::new(state.clone(), me, tokens.env));
    if let Some(spec) = etcd {
        // Its client port may have moved (`launcher::own_port`).
        proxies.use_etcd(&sup.boot_etcd(spec)?);
    }
    for spec in specs {
        sup.boot_executor(spec)?;
    }
    sup.save()?;
    let executors = sup.executor_specs();
    sup.launcher().set_proxies(proxies.clone(), &executors);
    sup.boot_proxies()?;

    let sup = Arc::new(Mutex::new(sup));
    // The control socket exists before the fleet is announced.
    let sock = control::socket_path(&state);
    let listener = control::bind(&sock)
        .with_context(|| format!("cannot bind the control socket {}", sock.display()))?;
    print_welcome(
        &args,
        &state,
        &proxies,
        executors.len(),
        tokens.dev.as_ref(),
    );

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(supervisor::supervise(sup.clone(), listener, sock))?;
    supervisor::stop_all(&sup);
    Ok(())
}

#[allow(clippy::print_stdout)]
fn print_welcome(
    args: &Args,
    state: &Path,
    proxies: &Proxies,
    executors: usize,
    dev: Option<&(String, bool)>,
) {
    let url = format!("http://{}", args.listen);
    if proxies.count == 1 {
        println!(
            "TensorWasm fleet ready: proxy {url}, admin http://{}, {executors} executors",
            args.admin_listen
        );
    } else {
        let admins: Vec<String> = (0..proxies.count)
            .map(|k| format!("http://{}", proxies.admin_addr(k)))
            .collect();
        println!(
            "TensorWasm fleet ready: {} proxies on {url} (admin {}), placement in etcd, {executors} executors",
            proxies.count,
            admins.join(", ")
        );
    }
    match dev {
        Some((token, true)) => println!(
            "dev token (tenant \"dev\"), shown once, kept in {}: {token}",
            state.join("dev-token").display()
        ),
        Some((_, false)) => println!(
            "dev token (tenant \"dev\") in {}",
            state.join("dev-token").display()
        ),
        None => println!("tokens: as configured ({})", env::API_TOKENS),
    }
    println!(
        "logs in {}; Ctrl-C stops the fleet",
        state.join("logs").display()
    );
    println!();
    println!(
        "next: tensor-wasm deploy target/examples-wasm/mlp-digits.wasm --assets examples/mlp-digits/weights.safetensors --name digits"
    );
    println!("      (build the examples first with scripts/build-examples)");
    println!(
        "      curl -H \"authorization: Bearer $(cat {})\" {url}/functions",
        state.join("dev-token").display()
    );
    let _ = std::io::stdout().flush();
}
