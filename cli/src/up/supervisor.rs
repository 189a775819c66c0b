//! Watching the fleet's children: which run, restarting those that exit on
//! their own, starting and stopping executors on request, handing the
//! proxy's sockets to a new binary, and stopping everything at the end.
//!
//! The supervisor owns the children ([`std::process::Child`]) and
//! `up.json`; the [`super::launcher`] makes each child, and the
//! [`super::control`] socket brings the requests, which [`Control`]
//! carries out here.
//!
//! Every child is forked by the one thread that runs [`supervise`]: the
//! kernel ties `PR_SET_PDEATHSIG` to the forking *thread*, and that thread
//! lives as long as the supervisor. Requests that start a child (handled on
//! blocking threads) ask it to through a channel.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::control::{self, ChildStatus, ProxyUpgraded, Reply, Request, Role, StartExecutor};
use super::launcher::{ExecutorSpec, Launcher, Saved, free_port, wait_healthy};

/// Least time between two restarts of one child.
const RESTART_BACKOFF: Duration = Duration::from_secs(2);
/// How long a child may take to stop after SIGTERM before SIGKILL; an
/// executor writes its warm state on the way out.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest the new proxy may take to be ready for the old one's sockets.
const HANDOFF_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct Running {
    spec: ExecutorSpec,
    child: Option<Child>,
    restarts: u32,
    started: Instant,
}

/// The children of one `up`.
#[derive(Debug)]
pub struct Supervisor {
    launcher: Launcher,
    executors: BTreeMap<String, Running>,
    proxy: Option<Child>,
    /// The proxy's binary after an upgrade; this one before.
    proxy_binary: Option<PathBuf>,
    proxy_restarts: u32,
    proxy_started: Instant,
    stopping: bool,
    /// Set while the proxy hands its sockets over: not restarted meanwhile.
    proxy_handoff: bool,
}

impl Supervisor {
    pub fn new(launcher: Launcher) -> Supervisor {
        Supervisor {
            launcher,
            executors: BTreeMap::new(),
            proxy: None,
            proxy_binary: None,
            proxy_restarts: 0,
            proxy_started: Instant::now(),
            stopping: false,
            proxy_handoff: false,
        }
    }

    pub fn launcher(&mut self) -> &mut Launcher {
        &mut self.launcher
    }

    /// The executors supervised, in id order.
    pub fn executor_specs(&self) -> Vec<ExecutorSpec> {
        self.executors.values().map(|r| r.spec.clone()).collect()
    }

    /// Starts `spec`'s executor from the calling thread and waits until it
    /// answers; for the start-up, before [`supervise`] runs.
    pub fn boot_executor(&mut self, spec: ExecutorSpec) -> anyhow::Result<()> {
        let mut child = self.launcher.executor(&spec)?;
        wait_healthy(spec.port, &mut child, &format!("executor {}", spec.id))?;
        tracing::info!(executor = %spec.id, device = %spec.device, port = spec.port, "executor up");
        self.adopt(spec, child);
        Ok(())
    }

    /// Starts the proxy from the calling thread and waits until it answers
    /// on `port`; for the start-up, before [`supervise`] runs.
    pub fn boot_proxy(&mut self, port: u16) -> anyhow::Result<()> {
        let mut proxy = self.launcher.proxy(None, false, &self.executor_specs())?;
        wait_healthy(port, &mut proxy, "proxy")?;
        self.proxy = Some(proxy);
        self.proxy_started = Instant::now();
        Ok(())
    }

    fn adopt(&mut self, spec: ExecutorSpec, child: Child) {
        self.executors.insert(
            spec.id.clone(),
            Running {
                spec,
                child: Some(child),
                restarts: 0,
                started: Instant::now(),
            },
        );
    }

    /// Records the executor set in `up.json`.
    pub fn save(&self) -> anyhow::Result<()> {
        Saved {
            executors: self.executor_specs(),
        }
        .store(&self.launcher.state)
    }

    fn executor_status(&self, r: &Running) -> ChildStatus {
        ChildStatus {
            id: r.spec.id.clone(),
            role: Role::Executor,
            addr: r.spec.addr(),
            pid: r.child.as_ref().map(Child::id),
            restarts: r.restarts,
            device: r.spec.device.clone(),
            cuda_visible_devices: r.spec.cuda_visible_devices.clone(),
            binary: r
                .spec
                .binary
                .clone()
                .unwrap_or_else(|| self.launcher.me.clone()),
        }
    }

    fn status(&self) -> Vec<ChildStatus> {
        let mut out: Vec<ChildStatus> = self
            .executors
            .values()
            .map(|r| self.executor_status(r))
            .collect();
        out.push(ChildStatus {
            id: "proxy".into(),
            role: Role::Proxy,
            addr: String::new(),
            pid: self.proxy.as_ref().map(Child::id),
            restarts: self.proxy_restarts,
            device: String::new(),
            cuda_visible_devices: None,
            binary: self
                .proxy_binary
                .clone()
                .unwrap_or_else(|| self.launcher.me.clone()),
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
            let Some(r) = self.executors.get_mut(&id) else {
                continue;
            };
            let exited = match r.child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => {
                    tracing::warn!(executor = %id, %status, "executor exited; restarting");
                    r.child = None;
                    true
                }
                Some(Ok(None)) => false,
                Some(Err(_)) | None => true,
            };
            if !exited || r.started.elapsed() < RESTART_BACKOFF {
                continue;
            }
            match self.launcher.executor(&r.spec) {
                Ok(child) => {
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
            let executors = self.executor_specs();
            match self
                .launcher
                .proxy(self.proxy_binary.as_deref(), false, &executors)
            {
                Ok(child) => {
                    self.proxy = Some(child);
                    self.proxy_restarts += 1;
                    self.proxy_started = Instant::now();
                }
                Err(e) => tracing::error!(error = %e, "proxy restart failed"),
            }
        }
    }

    /// Forks what a request asked for, on the supervising thread.
    fn spawn(&mut self, what: Spawn) -> anyhow::Result<Child> {
        match what {
            Spawn::Executor(spec) => self.launcher.executor(&spec),
            Spawn::UpgradedProxy(binary) => {
                let executors = self.executor_specs();
                let child = self
                    .launcher
                    .proxy(Some(binary.as_path()), true, &executors);
                if child.is_ok() {
                    self.proxy_binary = Some(binary);
                }
                child
            }
        }
    }
}

/// A request to the supervising thread to fork a child, and where its
/// answer goes.
type SpawnRequest = (Spawn, std::sync::mpsc::Sender<anyhow::Result<Child>>);

/// What the supervising thread forks.
#[derive(Debug)]
enum Spawn {
    Executor(ExecutorSpec),
    /// A proxy from this binary taking the sockets over (`-u`).
    UpgradedProxy(PathBuf),
}

/// Supervises until Ctrl-C or SIGTERM, answering the control socket
/// meanwhile; [`stop_all`] then stops the children.
pub async fn supervise(
    sup: Arc<Mutex<Supervisor>>,
    control_listener: std::os::unix::net::UnixListener,
    sock: PathBuf,
) -> anyhow::Result<()> {
    let (spawn_tx, mut spawn_rx) = tokio::sync::mpsc::unbounded_channel::<SpawnRequest>();
    let listener = tokio::net::UnixListener::from_std(control_listener)?;
    let server = tokio::spawn(control::serve(
        listener,
        Arc::new(Control {
            sup: sup.clone(),
            spawn_tx,
        }),
    ));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut ticker = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = ticker.tick() => lock(&sup).reap(),
            Some((what, reply)) = spawn_rx.recv() => {
                let _ = reply.send(lock(&sup).spawn(what));
            }
        }
    }
    server.abort();
    let _ = std::fs::remove_file(&sock);
    tracing::info!("stopping the fleet");
    Ok(())
}

fn lock(sup: &Mutex<Supervisor>) -> std::sync::MutexGuard<'_, Supervisor> {
    sup.lock().unwrap_or_else(|p| p.into_inner())
}

/// Carries out control requests on the supervisor.
#[derive(Debug)]
struct Control {
    sup: Arc<Mutex<Supervisor>>,
    spawn_tx: tokio::sync::mpsc::UnboundedSender<SpawnRequest>,
}

impl control::Handler for Control {
    fn handle(&self, request: Request) -> anyhow::Result<Reply> {
        match request {
            Request::Ls => Ok(Reply::Children(lock(&self.sup).status())),
            Request::Start(executor) => self.start(executor).map(Reply::Started),
            Request::Stop { id } => self.stop(id).map(Reply::Stopped),
            Request::UpgradeProxy { binary } => {
                self.upgrade_proxy(binary).map(Reply::ProxyUpgraded)
            }
        }
    }
}

impl Control {
    /// Has the supervising thread fork `what`.
    fn spawn(&self, what: Spawn) -> anyhow::Result<Child> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.spawn_tx
            .send((what, tx))
            .map_err(|_| anyhow::anyhow!("the supervisor is stopping"))?;
        rx.recv()
            .map_err(|_| anyhow::anyhow!("the supervisor is stopping"))?
    }

    fn start(&self, executor: StartExecutor) -> anyhow::Result<ChildStatus> {
        let StartExecutor {
            id,
            device,
            cuda_visible_devices,
            binary,
        } = executor;
        let spec = ExecutorSpec {
            id: id.clone(),
            device: device.unwrap_or_else(|| "cpu".into()),
            cuda_visible_devices,
            binary,
            port: free_port()?,
        };
        if lock(&self.sup).executors.contains_key(&id) {
            bail!("executor {id} already runs");
        }
        let mut child = self.spawn(Spawn::Executor(spec.clone()))?;
        if let Err(e) = wait_healthy(spec.port, &mut child, &format!("executor {id}")) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        let mut s = lock(&self.sup);
        s.adopt(spec, child);
        let status = s.executor_status(&s.executors[&id]);
        s.save()?;
        Ok(status)
    }

    fn stop(&self, id: String) -> anyhow::Result<control::Stopped> {
        let running = {
            let mut s = lock(&self.sup);
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
        Ok(control::Stopped { id, stopped: true })
    }

    /// The proxy's socket hand-off (module doc of `crate::upgrade`).
    fn upgrade_proxy(&self, binary: PathBuf) -> anyhow::Result<ProxyUpgraded> {
        let sock = lock(&self.sup)
            .launcher
            .state
            .join("proxy")
            .join("proxy-upgrade.sock");
        let _ = std::fs::remove_file(&sock);
        // The new proxy waits on the upgrade socket for the old one's
        // sockets; the supervisor watches it from now on, the old one only
        // until it exits.
        let old = {
            let mut s = lock(&self.sup);
            s.proxy_handoff = true;
            s.proxy.take()
        };
        let result = self.hand_off(binary, &sock, old);
        lock(&self.sup).proxy_handoff = false;
        result
    }

    fn hand_off(
        &self,
        binary: PathBuf,
        sock: &Path,
        old: Option<Child>,
    ) -> anyhow::Result<ProxyUpgraded> {
        let mut new = match self.spawn(Spawn::UpgradedProxy(binary)) {
            Ok(child) => child,
            Err(e) => {
                lock(&self.sup).proxy = old;
                return Err(e);
            }
        };
        let start = Instant::now();
        while !sock.exists() {
            if let Ok(Some(status)) = new.try_wait() {
                lock(&self.sup).proxy = old;
                bail!(
                    "the new proxy exited ({status}) before taking the sockets; see logs/proxy.log"
                );
            }
            if start.elapsed() > HANDOFF_TIMEOUT {
                let _ = new.kill();
                let _ = new.wait();
                lock(&self.sup).proxy = old;
                bail!("the new proxy never waited for the sockets; see logs/proxy.log");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let pid = new.id();
        lock(&self.sup).proxy = Some(new);
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
        Ok(ProxyUpgraded { pid })
    }
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
pub fn stop_all(sup: &Mutex<Supervisor>) {
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
