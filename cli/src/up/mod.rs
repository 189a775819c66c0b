//! `tensor-wasm up`: a whole fleet on one machine, supervised.
//!
//! It starts one executor per GPU or MIG slice that NVML finds (each pinned
//! with `CUDA_VISIBLE_DEVICES=<uuid>`), or CPU executors when there is none,
//! then a proxy in front of them, all as children of this process running
//! this same binary. Then it supervises:
//!
//! - a child that exits on its own is restarted (same id, port and state
//!   directory, so registrations come back), at most once per
//!   [`RESTART_BACKOFF`];
//! - Ctrl-C or SIGTERM stops every child gracefully (SIGTERM, then SIGKILL
//!   after [`STOP_TIMEOUT`]) and exits; children also get SIGTERM from the
//!   kernel if this process dies without that chance, so none is orphaned;
//! - a control socket, `<state>/control.sock`, takes one JSON request per
//!   line (`ls`, `start`, `stop`) from other commands (`executors add`,
//!   `upgrade`) and answers one JSON line.
//!
//! Everything it needs to come back the same lives in the state directory:
//! the executor set (`up.json`), tokens (`dev-token`, `admin-token`,
//! `internal-token`, `tokens`, all 0600), each process's state, and logs
//! (`logs/<id>.log`).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tensor_wasm_kernels::discovery::DeviceInfo;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

/// Least time between two restarts of one child.
const RESTART_BACKOFF: Duration = Duration::from_secs(2);
/// How long a child may take to stop after SIGTERM before SIGKILL; an
/// executor writes its warm state on the way out.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a started executor may take to answer `/healthz`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Flags of `tensor-wasm up`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where the fleet keeps everything (tokens, placements, functions, logs).
    #[arg(
        long,
        env = "TENSOR_WASM_STATE_DIR",
        default_value = "./tensor-wasm-state"
    )]
    state_dir: PathBuf,
    /// Public listener of the proxy.
    #[arg(
        long,
        env = "TENSOR_WASM_PROXY_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    listen: String,
    /// Admin listener of the proxy.
    #[arg(
        long,
        env = "TENSOR_WASM_ADMIN_LISTEN",
        default_value = "127.0.0.1:9090"
    )]
    admin_listen: String,
    /// `auto`: one executor per GPU/MIG slice NVML finds, else CPU
    /// executors; `cpu`: CPU executors only.
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu"])]
    device: String,
    /// CPU executors to start when there is no GPU.
    #[arg(long, env = "TENSOR_WASM_CPU_EXECUTORS", default_value_t = 2)]
    cpu_executors: usize,
}

/// One executor the supervisor runs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ExecutorSpec {
    pub id: String,
    /// `cpu` or `cuda`.
    pub device: String,
    /// `CUDA_VISIBLE_DEVICES` for a GPU or MIG slice (a UUID).
    #[serde(default)]
    pub cuda_visible_devices: Option<String>,
    /// The binary; this one when absent.
    #[serde(default)]
    pub binary: Option<PathBuf>,
    /// Listening port, fixed for the executor's life under this supervisor.
    pub port: u16,
}

/// `up.json`: the executor set, so a restarted `up` brings back the same.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Saved {
    executors: Vec<ExecutorSpec>,
}

/// A control-socket request.
#[derive(Debug, Deserialize, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// The children and their pids.
    Ls,
    /// Start an executor (and wait until it answers); the caller registers
    /// it with the proxy.
    Start {
        id: String,
        #[serde(default)]
        device: Option<String>,
        #[serde(default)]
        cuda_visible_devices: Option<String>,
        #[serde(default)]
        binary: Option<PathBuf>,
    },
    /// Stop an executor gracefully and forget it.
    Stop { id: String },
    /// Hand the proxy's sockets to a new proxy binary (`-u`, then SIGQUIT
    /// to the old one) and supervise the new one.
    UpgradeProxy { binary: PathBuf },
}

/// A child as `ls` shows it.
#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct ChildStatus {
    pub id: String,
    pub role: String,
    pub addr: String,
    pub pid: Option<u32>,
    pub restarts: u32,
    pub device: String,
    #[serde(default)]
    pub cuda_visible_devices: Option<String>,
    pub binary: PathBuf,
}

struct Running {
    spec: ExecutorSpec,
    child: Option<Child>,
    restarts: u32,
    started: Instant,
}

struct Supervisor {
    state: PathBuf,
    me: PathBuf,
    executors: BTreeMap<String, Running>,
    proxy: Option<Child>,
    /// The proxy's binary after an upgrade; this one before.
    proxy_binary: Option<PathBuf>,
    proxy_args: Vec<OsString>,
    proxy_restarts: u32,
    proxy_started: Instant,
    env: Vec<(String, String)>,
    stopping: bool,
    /// Set while the proxy hands its sockets over: not restarted meanwhile.
    proxy_handoff: bool,
}

impl Supervisor {
    fn log_file(&self, id: &str) -> anyhow::Result<std::fs::File> {
        let dir = self.state.join("logs");
        std::fs::create_dir_all(&dir)?;
        Ok(std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{id}.log")))?)
    }

    fn spawn_executor(&self, spec: &ExecutorSpec) -> anyhow::Result<Child> {
        let binary = spec.binary.clone().unwrap_or_else(|| self.me.clone());
        let log = self.log_file(&spec.id)?;
        let mut cmd = executor_command(&binary, &self.state, spec);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        crate::sys::die_with_parent(&mut cmd);
        cmd.spawn()
            .with_context(|| format!("cannot start {} executor", binary.display()))
    }

    fn spawn_proxy(&self, upgrade: bool) -> anyhow::Result<Child> {
        let log = self.log_file("proxy")?;
        let mut cmd = Command::new(self.proxy_binary.as_ref().unwrap_or(&self.me));
        cmd.arg("proxy").args(&self.proxy_args);
        if upgrade {
            cmd.arg("-u");
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        crate::sys::die_with_parent(&mut cmd);
        cmd.spawn().context("cannot start the proxy")
    }

    fn save(&self) -> anyhow::Result<()> {
        let saved = Saved {
            executors: self.executors.values().map(|r| r.spec.clone()).collect(),
        };
        write_private(
            &self.state.join("up.json"),
            &serde_json::to_vec_pretty(&saved)?,
        )
    }

    fn status(&self) -> Vec<ChildStatus> {
        let mut out: Vec<ChildStatus> = self
            .executors
            .values()
            .map(|r| ChildStatus {
                id: r.spec.id.clone(),
                role: "executor".into(),
                addr: format!("127.0.0.1:{}", r.spec.port),
                pid: r.child.as_ref().map(Child::id),
                restarts: r.restarts,
                device: r.spec.device.clone(),
                cuda_visible_devices: r.spec.cuda_visible_devices.clone(),
                binary: r.spec.binary.clone().unwrap_or_else(|| self.me.clone()),
            })
            .collect();
        out.push(ChildStatus {
            id: "proxy".into(),
            role: "proxy".into(),
            addr: String::new(),
            pid: self.proxy.as_ref().map(Child::id),
            restarts: self.proxy_restarts,
            device: String::new(),
            cuda_visible_devices: None,
            binary: self.proxy_binary.clone().unwrap_or_else(|| self.me.clone()),
        });
        out
    }

    /// Restarts children that exited on their own.
    fn reap(&mut self) {
        if self.stopping {
            return;
        }
        let ids: Vec<String> = self.executors.keys().cloned().collect();
        for id in ids {
            let exited = {
                let r = self.executors.get_mut(&id).expect("listed");
                match r.child.as_mut().map(Child::try_wait) {
                    Some(Ok(Some(status))) => {
                        tracing::warn!(executor = %id, %status, "executor exited; restarting");
                        r.child = None;
                        true
                    }
                    Some(Ok(None)) => false,
                    Some(Err(_)) | None => true,
                }
            };
            if !exited {
                continue;
            }
            let r = &self.executors[&id];
            if r.started.elapsed() < RESTART_BACKOFF {
                continue;
            }
            let spec = r.spec.clone();
            match self.spawn_executor(&spec) {
                Ok(child) => {
                    let r = self.executors.get_mut(&id).expect("listed");
                    r.child = Some(child);
                    r.restarts += 1;
                    r.started = Instant::now();
                }
                Err(e) => tracing::error!(executor = %id, error = %e, "restart failed"),
            }
        }
        if self.proxy_handoff {
            return;
        }
        let proxy_down = match self.proxy.as_mut().map(Child::try_wait) {
            Some(Ok(Some(status))) => {
                tracing::warn!(%status, "proxy exited; restarting");
                self.proxy = None;
                true
            }
            Some(Ok(None)) => false,
            Some(Err(_)) | None => true,
        };
        if proxy_down && self.proxy_started.elapsed() >= RESTART_BACKOFF {
            match self.spawn_proxy(false) {
                Ok(child) => {
                    self.proxy = Some(child);
                    self.proxy_restarts += 1;
                    self.proxy_started = Instant::now();
                }
                Err(e) => tracing::error!(error = %e, "proxy restart failed"),
            }
        }
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

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits until `127.0.0.1:port/healthz` answers 200.
fn wait_healthy(port: u16, child: &mut Child, what: &str) -> anyhow::Result<()> {
    let start = Instant::now();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(2)))
        .build()
        .into();
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited during start-up ({status}); see its log");
        }
        if agent
            .get(&format!("http://127.0.0.1:{port}/healthz"))
            .call()
            .is_ok_and(|r| r.status() == 200)
        {
            return Ok(());
        }
        if start.elapsed() > READY_TIMEOUT {
            bail!("{what} did not answer /healthz within {READY_TIMEOUT:?}; see its log");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The executors to run on this machine.
fn plan(args: &Args, saved: Saved) -> anyhow::Result<Vec<ExecutorSpec>> {
    if !saved.executors.is_empty() {
        return Ok(saved.executors);
    }
    let gpus = if args.device == "cpu" {
        Vec::new()
    } else {
        tensor_wasm_kernels::discovery::discover_system()
    };
    specs_for(&gpus, args.cpu_executors, free_port)
}

/// One executor per discovered GPU or MIG slice, bound to it by UUID; or
/// `cpu_executors` CPU executors (at least one) when there is none. Ports
/// come from `port`.
fn specs_for(
    gpus: &[DeviceInfo],
    cpu_executors: usize,
    mut port: impl FnMut() -> anyhow::Result<u16>,
) -> anyhow::Result<Vec<ExecutorSpec>> {
    let mut specs = Vec::new();
    if gpus.is_empty() {
        for i in 0..cpu_executors.max(1) {
            specs.push(ExecutorSpec {
                id: format!("cpu{i}"),
                device: "cpu".into(),
                cuda_visible_devices: None,
                binary: None,
                port: port()?,
            });
        }
    } else {
        for gpu in gpus {
            specs.push(ExecutorSpec {
                id: gpu.executor_id(),
                device: "cuda".into(),
                cuda_visible_devices: Some(gpu.cuda_visible_devices().to_string()),
                binary: None,
                port: port()?,
            });
        }
    }
    Ok(specs)
}

/// The command that starts `spec`'s executor with `binary`: its id,
/// device, loopback port and state directory under `state`, and for a GPU
/// or MIG slice `CUDA_VISIBLE_DEVICES=<uuid>`, so the process sees exactly
/// that device, as CUDA ordinal 0.
fn executor_command(binary: &Path, state: &Path, spec: &ExecutorSpec) -> Command {
    let mut cmd = Command::new(binary);
    cmd.arg("executor")
        .arg("--id")
        .arg(&spec.id)
        .arg("--device")
        .arg(&spec.device)
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", spec.port))
        .arg("--state-dir")
        .arg(state.join("executors").join(&spec.id));
    if let Some(uuid) = &spec.cuda_visible_devices {
        cmd.env("CUDA_VISIBLE_DEVICES", uuid);
    }
    cmd
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let state = args.state_dir.clone();
    std::fs::create_dir_all(&state)
        .with_context(|| format!("cannot create {}", state.display()))?;
    let state = state.canonicalize()?;
    let me = std::env::current_exe().context("cannot find this binary")?;

    // Tokens: configured ones win; otherwise a dev token, made once.
    let mut env = Vec::new();
    let mut dev_token = None;
    let configured = std::env::var_os("TENSOR_WASM_API_TOKENS").is_some()
        || std::env::var_os("TENSOR_WASM_API_TOKENS_FILE").is_some();
    if !configured {
        let (token, fresh) = secret(&state, "dev-token", "twdev_")?;
        write_private(&state.join("tokens"), format!("{token}:dev\n").as_bytes())?;
        env.push((
            "TENSOR_WASM_API_TOKENS_FILE".to_string(),
            state.join("tokens").to_string_lossy().into_owned(),
        ));
        dev_token = Some((token, fresh));
    }
    if std::env::var_os("TENSOR_WASM_INTERNAL_TOKEN").is_none() {
        let (t, _) = secret(&state, "internal-token", "twint_")?;
        env.push(("TENSOR_WASM_INTERNAL_TOKEN".into(), t));
    }
    if std::env::var_os("TENSOR_WASM_ADMIN_TOKEN").is_none() {
        let (t, _) = secret(&state, "admin-token", "twadm_")?;
        env.push(("TENSOR_WASM_ADMIN_TOKEN".into(), t));
    }

    let saved: Saved = match std::fs::read(state.join("up.json")) {
        Ok(b) => serde_json::from_slice(&b).context("up.json is corrupt")?,
        Err(_) => Saved::default(),
    };
    let specs = plan(&args, saved)?;

    let mut sup = Supervisor {
        state: state.clone(),
        me: me.clone(),
        executors: BTreeMap::new(),
        proxy: None,
        proxy_binary: None,
        proxy_args: Vec::new(),
        proxy_restarts: 0,
        proxy_started: Instant::now(),
        env,
        stopping: false,
        proxy_handoff: false,
    };
    for spec in specs {
        let mut child = sup.spawn_executor(&spec)?;
        wait_healthy(spec.port, &mut child, &format!("executor {}", spec.id))?;
        tracing::info!(executor = %spec.id, device = %spec.device, port = spec.port, "executor up");
        sup.executors.insert(
            spec.id.clone(),
            Running {
                spec,
                child: Some(child),
                restarts: 0,
                started: Instant::now(),
            },
        );
    }
    sup.save()?;
    let list: Vec<String> = sup
        .executors
        .values()
        .map(|r| format!("{}=127.0.0.1:{}", r.spec.id, r.spec.port))
        .collect();
    sup.proxy_args = vec![
        "--listen".into(),
        args.listen.clone().into(),
        "--admin-listen".into(),
        args.admin_listen.clone().into(),
        "--state-dir".into(),
        state.join("proxy").into(),
        "--executor".into(),
        list.join(",").into(),
        "--audit-log".into(),
        state.join("logs").join("audit.log").into(),
    ];
    let mut proxy = sup.spawn_proxy(false)?;
    let port: u16 = args
        .listen
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .context("--listen needs host:port")?;
    wait_healthy(port, &mut proxy, "proxy")?;
    sup.proxy = Some(proxy);
    sup.proxy_started = Instant::now();

    let executors = sup.executors.len();
    let sup = Arc::new(Mutex::new(sup));
    // The control socket exists before the fleet is announced.
    let sock = state.join("control.sock");
    let _ = std::fs::remove_file(&sock);
    let control = std::os::unix::net::UnixListener::bind(&sock)
        .with_context(|| format!("cannot bind the control socket {}", sock.display()))?;
    control.set_nonblocking(true)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))?;
    }
    print_welcome(&args, &state, executors, dev_token.as_ref());

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(supervise(sup.clone(), control, sock))?;
    stop_all(&sup);
    Ok(())
}

#[allow(clippy::print_stdout)]
fn print_welcome(args: &Args, state: &Path, executors: usize, dev: Option<&(String, bool)>) {
    let url = format!("http://{}", args.listen);
    println!(
        "TensorWasm fleet ready: proxy {url}, admin http://{}, {executors} executors",
        args.admin_listen
    );
    match dev {
        Some((token, true)) => println!(
            "dev token (tenant \"dev\"), shown once, kept in {}: {token}",
            state.join("dev-token").display()
        ),
        Some((_, false)) => println!(
            "dev token (tenant \"dev\") in {}",
            state.join("dev-token").display()
        ),
        None => println!("tokens: as configured (TENSOR_WASM_API_TOKENS)"),
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

/// Asks the supervising thread to fork an executor: the kernel ties
/// `PR_SET_PDEATHSIG` to the forking *thread*, so every child is forked by
/// the one thread that lives as long as the supervisor.
type SpawnRequest = (Spawn, std::sync::mpsc::Sender<anyhow::Result<Child>>);

/// What the supervising thread forks.
enum Spawn {
    Executor(ExecutorSpec),
    /// A proxy from this binary taking the sockets over (`-u`).
    UpgradedProxy(PathBuf),
}

/// Supervises until Ctrl-C or SIGTERM.
async fn supervise(
    sup: Arc<Mutex<Supervisor>>,
    control_listener: std::os::unix::net::UnixListener,
    sock: PathBuf,
) -> anyhow::Result<()> {
    let (spawn_tx, mut spawn_rx) = tokio::sync::mpsc::unbounded_channel::<SpawnRequest>();
    let listener = UnixListener::from_std(control_listener)?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut ticker = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = ticker.tick() => lock(&sup).reap(),
            Some((what, reply)) = spawn_rx.recv() => {
                let mut s = lock(&sup);
                let child = match what {
                    Spawn::Executor(spec) => s.spawn_executor(&spec),
                    Spawn::UpgradedProxy(binary) => {
                        let previous = s.proxy_binary.replace(binary);
                        let child = s.spawn_proxy(true);
                        if child.is_err() {
                            s.proxy_binary = previous;
                        }
                        child
                    }
                };
                let _ = reply.send(child);
            }
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    let sup = sup.clone();
                    let spawn_tx = spawn_tx.clone();
                    tokio::spawn(async move {
                        if let Err(e) = control(sup, spawn_tx, stream).await {
                            tracing::warn!(error = %e, "control request failed");
                        }
                    });
                }
            }
        }
    }
    let _ = std::fs::remove_file(&sock);
    tracing::info!("stopping the fleet");
    Ok(())
}

fn lock(sup: &Mutex<Supervisor>) -> std::sync::MutexGuard<'_, Supervisor> {
    sup.lock().unwrap_or_else(|p| p.into_inner())
}

async fn control(
    sup: Arc<Mutex<Supervisor>>,
    spawn_tx: tokio::sync::mpsc::UnboundedSender<SpawnRequest>,
    stream: tokio::net::UnixStream,
) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await? {
        let answer = match serde_json::from_str::<Request>(&line) {
            Ok(req) => {
                let sup = sup.clone();
                let spawn_tx = spawn_tx.clone();
                tokio::task::spawn_blocking(move || handle(&sup, &spawn_tx, req))
                    .await
                    .unwrap_or_else(|e| Err(anyhow::anyhow!("{e}")))
            }
            Err(e) => Err(anyhow::anyhow!("bad request: {e}")),
        };
        let mut out = match answer {
            Ok(v) => serde_json::json!({"ok": true, "result": v}),
            Err(e) => serde_json::json!({"ok": false, "error": format!("{e:#}")}),
        }
        .to_string();
        out.push('\n');
        write.write_all(out.as_bytes()).await?;
    }
    Ok(())
}

fn handle(
    sup: &Mutex<Supervisor>,
    spawn_tx: &tokio::sync::mpsc::UnboundedSender<SpawnRequest>,
    req: Request,
) -> anyhow::Result<serde_json::Value> {
    match req {
        Request::Ls => Ok(serde_json::to_value(lock(sup).status())?),
        Request::Start {
            id,
            device,
            cuda_visible_devices,
            binary,
        } => {
            let spec = ExecutorSpec {
                id: id.clone(),
                device: device.unwrap_or_else(|| "cpu".into()),
                cuda_visible_devices,
                binary,
                port: free_port()?,
            };
            if lock(sup).executors.contains_key(&id) {
                bail!("executor {id} already runs");
            }
            let (tx, rx) = std::sync::mpsc::channel();
            spawn_tx
                .send((Spawn::Executor(spec.clone()), tx))
                .map_err(|_| anyhow::anyhow!("the supervisor is stopping"))?;
            let mut child = rx
                .recv()
                .map_err(|_| anyhow::anyhow!("the supervisor is stopping"))??;
            if let Err(e) = wait_healthy(spec.port, &mut child, &format!("executor {id}")) {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
            let mut s = lock(sup);
            let status = ChildStatus {
                id: id.clone(),
                role: "executor".into(),
                addr: format!("127.0.0.1:{}", spec.port),
                pid: Some(child.id()),
                restarts: 0,
                device: spec.device.clone(),
                cuda_visible_devices: spec.cuda_visible_devices.clone(),
                binary: spec.binary.clone().unwrap_or_else(|| s.me.clone()),
            };
            s.executors.insert(
                id,
                Running {
                    spec,
                    child: Some(child),
                    restarts: 0,
                    started: Instant::now(),
                },
            );
            s.save()?;
            Ok(serde_json::to_value(status)?)
        }
        Request::Stop { id } => {
            let running = {
                let mut s = lock(sup);
                let r = s
                    .executors
                    .remove(&id)
                    .with_context(|| format!("no executor {id}"))?;
                s.save()?;
                r
            };
            if let Some(child) = running.child {
                stop_child(child, &id);
            }
            Ok(serde_json::json!({"id": id, "stopped": true}))
        }
        Request::UpgradeProxy { binary } => upgrade_proxy(sup, spawn_tx, binary),
    }
}

/// Longest the new proxy may take to be ready for the old one's sockets.
const HANDOFF_TIMEOUT: Duration = Duration::from_secs(30);

/// The proxy's socket hand-off (module doc of `upgrade`).
fn upgrade_proxy(
    sup: &Mutex<Supervisor>,
    spawn_tx: &tokio::sync::mpsc::UnboundedSender<SpawnRequest>,
    binary: PathBuf,
) -> anyhow::Result<serde_json::Value> {
    let sock = lock(sup).state.join("proxy").join("proxy-upgrade.sock");
    let _ = std::fs::remove_file(&sock);
    // The new proxy waits on the upgrade socket for the old one's sockets;
    // the supervisor watches it from now on, the old one only until it exits.
    let old = {
        let mut s = lock(sup);
        s.proxy_handoff = true;
        s.proxy.take()
    };
    let result = hand_off(sup, spawn_tx, binary, &sock, old);
    lock(sup).proxy_handoff = false;
    result
}

fn hand_off(
    sup: &Mutex<Supervisor>,
    spawn_tx: &tokio::sync::mpsc::UnboundedSender<SpawnRequest>,
    binary: PathBuf,
    sock: &Path,
    old: Option<Child>,
) -> anyhow::Result<serde_json::Value> {
    let (tx, rx) = std::sync::mpsc::channel();
    spawn_tx
        .send((Spawn::UpgradedProxy(binary), tx))
        .map_err(|_| anyhow::anyhow!("the supervisor is stopping"))?;
    let spawned = rx
        .recv()
        .map_err(|_| anyhow::anyhow!("the supervisor is stopping"));
    let mut new = match spawned.and_then(|r| r) {
        Ok(child) => child,
        Err(e) => {
            lock(sup).proxy = old;
            return Err(e);
        }
    };
    let start = Instant::now();
    while !sock.exists() {
        if let Ok(Some(status)) = new.try_wait() {
            lock(sup).proxy = old;
            bail!("the new proxy exited ({status}) before taking the sockets; see logs/proxy.log");
        }
        if start.elapsed() > HANDOFF_TIMEOUT {
            let _ = new.kill();
            let _ = new.wait();
            lock(sup).proxy = old;
            bail!("the new proxy never waited for the sockets; see logs/proxy.log");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid = new.id();
    lock(sup).proxy = Some(new);
    if let Some(mut old) = old {
        crate::sys::quit(&old);
        // The old proxy drains its connections, then exits on its own.
        let start = Instant::now();
        while start.elapsed() < STOP_TIMEOUT * 2 {
            if let Ok(Some(_)) = old.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if old.try_wait().ok().flatten().is_none() {
            tracing::warn!("the old proxy did not exit after the hand-off; killing it");
            let _ = old.kill();
            let _ = old.wait();
        }
    }
    tracing::info!(pid, "proxy upgraded");
    Ok(serde_json::json!({"pid": pid}))
}

/// SIGTERM, wait up to [`STOP_TIMEOUT`], then SIGKILL.
fn stop_child(mut child: Child, what: &str) {
    crate::sys::terminate(&child);
    let start = Instant::now();
    while start.elapsed() < STOP_TIMEOUT {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::warn!(child = %what, "did not stop after SIGTERM; killing it");
    let _ = child.kill();
    let _ = child.wait();
}

/// Stops the proxy first (no new requests), then the executors.
fn stop_all(sup: &Mutex<Supervisor>) {
    let (proxy, executors) = {
        let mut s = lock(sup);
        s.stopping = true;
        let executors: Vec<(String, Child)> = s
            .executors
            .iter_mut()
            .filter_map(|(id, r)| r.child.take().map(|c| (id.clone(), c)))
            .collect();
        (s.proxy.take(), executors)
    };
    if let Some(p) = proxy {
        stop_child(p, "proxy");
    }
    let handles: Vec<_> = executors
        .into_iter()
        .map(|(id, c)| std::thread::spawn(move || stop_child(c, &id)))
        .collect();
    for h in handles {
        let _ = h.join();
    }
    tracing::info!("fleet stopped");
}

/// Sends one control request to a running `up` and returns its result.
pub fn control_request(state: &Path, req: &Request) -> anyhow::Result<serde_json::Value> {
    use std::io::{BufRead, BufReader as StdBufReader};
    let sock = state.join("control.sock");
    let mut stream = std::os::unix::net::UnixStream::connect(&sock).with_context(|| {
        format!(
            "no fleet supervisor at {}: start one with `tensor-wasm up`",
            sock.display()
        )
    })?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut answer = String::new();
    StdBufReader::new(stream).read_line(&mut answer)?;
    let v: serde_json::Value = serde_json::from_str(&answer).context("bad control answer")?;
    if v["ok"] == true {
        Ok(v["result"].clone())
    } else {
        bail!(
            "{}",
            v["error"].as_str().unwrap_or("control request failed")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tensor_wasm_kernels::discovery::DeviceKind;

    fn device(kind: DeviceKind, index: u32, uuid: &str, profile: Option<&str>) -> DeviceInfo {
        DeviceInfo {
            kind,
            gpu_index: index,
            uuid: uuid.into(),
            name: "NVIDIA H200".into(),
            mig_profile: profile.map(Into::into),
            memory_total: 1 << 30,
            memory_used: 0,
            parent_uuid: (kind == DeviceKind::MigSlice).then(|| "GPU-parent".into()),
        }
    }

    #[test]
    fn every_gpu_and_mig_slice_gets_an_executor_bound_by_uuid() {
        let gpus = [
            device(
                DeviceKind::Gpu,
                0,
                "GPU-0aaaaaaa-1111-2222-3333-444444444444",
                None,
            ),
            device(
                DeviceKind::MigSlice,
                1,
                "MIG-3f2a9c1e-aaaa-5b6c-8d9e-0123456789ab",
                Some("1g.18gb"),
            ),
            device(
                DeviceKind::MigSlice,
                1,
                "MIG-0b1c2d3e-bbbb-5b6c-8d9e-0123456789ab",
                Some("3g.71gb"),
            ),
        ];
        let mut next = 7000;
        let specs = specs_for(&gpus, 2, || {
            next += 1;
            Ok(next)
        })
        .unwrap();
        let ids: Vec<_> = specs.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["gpu0", "mig-3f2a9c1e", "mig-0b1c2d3e"]);
        for (spec, gpu) in specs.iter().zip(&gpus) {
            assert_eq!(spec.device, "cuda");
            assert_eq!(
                spec.cuda_visible_devices.as_deref(),
                Some(gpu.uuid.as_str())
            );
            let cmd = executor_command(Path::new("/bin/tw"), Path::new("/state"), spec);
            let env: Vec<_> = cmd.get_envs().collect();
            assert_eq!(
                env,
                [(
                    std::ffi::OsStr::new("CUDA_VISIBLE_DEVICES"),
                    Some(std::ffi::OsStr::new(&gpu.uuid))
                )]
            );
            let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy()).collect();
            assert_eq!(
                args,
                [
                    "executor".to_string(),
                    "--id".into(),
                    spec.id.clone(),
                    "--device".into(),
                    "cuda".into(),
                    "--listen".into(),
                    format!("127.0.0.1:{}", spec.port),
                    "--state-dir".into(),
                    format!("/state/executors/{}", spec.id),
                ]
            );
        }
        let ports: std::collections::BTreeSet<_> = specs.iter().map(|s| s.port).collect();
        assert_eq!(ports.len(), 3);
    }

    #[test]
    fn no_gpu_means_cpu_executors_with_no_device_binding() {
        let specs = specs_for(&[], 2, || Ok(7000)).unwrap();
        let ids: Vec<_> = specs.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["cpu0", "cpu1"]);
        assert!(
            specs
                .iter()
                .all(|s| s.device == "cpu" && s.cuda_visible_devices.is_none())
        );
        let cmd = executor_command(Path::new("tw"), Path::new("/s"), &specs[0]);
        assert_eq!(cmd.get_envs().count(), 0);
        assert_eq!(specs_for(&[], 0, || Ok(1)).unwrap().len(), 1);
    }
}
