//! Watching the fleet's children: which run, restarting those that exit on
//! their own, starting and stopping executors on request, handing the
//! proxies' sockets to a new binary, and stopping everything at the end.
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
use super::launcher::{
    EtcdSpec, ExecutorSpec, Launcher, Proxies, Saved, free_port, own_port, wait_healthy, wait_ready,
};

/// Least time between two restarts of one child.
const RESTART_BACKOFF: Duration = Duration::from_secs(2);
/// How long a child may take to stop after SIGTERM before SIGKILL; an
/// executor writes its warm state on the way out.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Starts of a proxy tried before `up` gives up booting.
const BOOT_TRIES: u32 = 3;
/// Longest the new proxy may take to be ready for the old one's sockets.
const HANDOFF_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct Running {
    spec: ExecutorSpec,
    child: Option<Child>,
    restarts: u32,
    started: Instant,
}

/// One of the proxies.
#[derive(Debug)]
struct ProxyRunning {
    child: Option<Child>,
    restarts: u32,
    started: Instant,
    /// Set while it hands its sockets over: not restarted meanwhile.
    handoff: bool,
}

/// The etcd of the proxies' placement table, when `up` runs it.
#[derive(Debug)]
struct EtcdRunning {
    spec: EtcdSpec,
    child: Option<Child>,
    restarts: u32,
    started: Instant,
}

/// The children of one `up`.
#[derive(Debug)]
pub struct Supervisor {
    launcher: Launcher,
    executors: BTreeMap<String, Running>,
    /// Proxy `k` at index `k`.
    proxies: Vec<ProxyRunning>,
    /// The proxies' binary after an upgrade; this one before.
    proxy_binary: Option<PathBuf>,
    etcd: Option<EtcdRunning>,
    stopping: bool,
}

/// Whether a child is down: it exited (logged, and its handle dropped), or
/// it is not running since its last start failed.
fn exited(child: &mut Option<Child>, what: &str) -> bool {
    match child.as_mut().map(Child::try_wait) {
        Some(Ok(Some(status))) => {
            tracing::warn!(child = %what, %status, "exited; restarting");
            *child = None;
            true
        }
        Some(Ok(None)) => false,
        Some(Err(_)) | None => true,
    }
}

impl Supervisor {
    pub fn new(launcher: Launcher) -> Supervisor {
        Supervisor {
            launcher,
            executors: BTreeMap::new(),
            proxies: Vec::new(),
            proxy_binary: None,
            etcd: None,
            stopping: false,
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
    pub fn boot_executor(&mut self, mut spec: ExecutorSpec) -> anyhow::Result<()> {
        spec.port = own_port(spec.port, &spec.id)?;
        let mut child = self.launcher.executor(&spec)?;
        wait_healthy(spec.port, &mut child, &format!("executor {}", spec.id))?;
        tracing::info!(executor = %spec.id, device = %spec.device, port = spec.port, "executor up");
        self.adopt(spec, child);
        Ok(())
    }

    /// Starts the proxies from the calling thread, one after the other,
    /// each once the one before answers on its admin port; for the
    /// start-up, before [`supervise`] runs. The first is alone with the
    /// table a while: a fleet moving from the file to etcd has its table
    /// imported by it.
    pub fn boot_proxies(&mut self) -> anyhow::Result<()> {
        for k in 0..self.launcher.proxies.count {
            let proxy = self.boot_proxy(k)?;
            self.proxies.push(ProxyRunning {
                child: Some(proxy),
                restarts: 0,
                started: Instant::now(),
                handoff: false,
            });
        }
        Ok(())
    }

    /// Starts proxy `k` and waits until it answers on its admin port and
    /// on the public one (a proxy binds its listeners each on its own, so
    /// the admin one may answer first), trying [`BOOT_TRIES`] times: a
    /// proxy that exits at start (its etcd too slow to answer on a loaded
    /// machine) is started again, as it would be once the fleet runs.
    fn boot_proxy(&mut self, k: usize) -> anyhow::Result<Child> {
        let name = Proxies::name(k);
        let port = self.launcher.proxies.admin_port(k);
        let public = self.launcher.proxies.public_health_url();
        let mut tries = 0;
        loop {
            tries += 1;
            let mut proxy = self
                .launcher
                .proxy(k, None, false, &self.executor_specs())?;
            let ready = wait_healthy(port, &mut proxy, &name)
                .and_then(|()| wait_ready(&public, &mut proxy, &name));
            match ready {
                Ok(()) => return Ok(proxy),
                Err(e) if tries < BOOT_TRIES => {
                    tracing::warn!(proxy = %name, error = %e, "proxy did not start; trying again");
                    let _ = proxy.kill();
                    let _ = proxy.wait();
                    std::thread::sleep(RESTART_BACKOFF);
                }
                Err(e) => {
                    let _ = proxy.kill();
                    let _ = proxy.wait();
                    return Err(e);
                }
            }
        }
    }

    /// Starts etcd from the calling thread and waits until it answers
    /// `/health`; for the start-up, before the proxies. Where it runs.
    pub fn boot_etcd(&mut self, mut spec: EtcdSpec) -> anyhow::Result<EtcdSpec> {
        // Its clients' port may move; its peer port is in its data.
        spec.client_port = own_port(spec.client_port, "etcd")?;
        let mut child = self.launcher.etcd(&spec)?;
        wait_ready(
            &format!("http://{}/health", spec.addr()),
            &mut child,
            "etcd",
        )?;
        tracing::info!(addr = %spec.addr(), "etcd up");
        self.etcd = Some(EtcdRunning {
            spec: spec.clone(),
            child: Some(child),
            restarts: 0,
            started: Instant::now(),
        });
        Ok(spec)
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

    /// Records the executor set and the etcd in `up.json`.
    pub fn save(&self) -> anyhow::Result<()> {
        Saved {
            executors: self.executor_specs(),
            etcd: self.etcd.as_ref().map(|e| e.spec.clone()),
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
        for (k, p) in self.proxies.iter().enumerate() {
            out.push(ChildStatus {
                id: Proxies::name(k),
                role: Role::Proxy,
                addr: self.launcher.proxies.admin_addr(k),
                pid: p.child.as_ref().map(Child::id),
                restarts: p.restarts,
                device: String::new(),
                cuda_visible_devices: None,
                binary: self
                    .proxy_binary
                    .clone()
                    .unwrap_or_else(|| self.launcher.me.clone()),
            });
        }
        if let Some(e) = &self.etcd {
            out.push(ChildStatus {
                id: "etcd".into(),
                role: Role::Etcd,
                addr: e.spec.addr(),
                pid: e.child.as_ref().map(Child::id),
                restarts: e.restarts,
                device: String::new(),
                cuda_visible_devices: None,
                binary: PathBuf::from("etcd"),
            });
        }
        out
    }

    /// Restarts children that exited on their own.
    fn reap(&mut self) {
        if self.stopping {
            return;
        }
        if let Some(e) = &mut self.etcd
            && exited(&mut e.child, "etcd")
            && e.started.elapsed() >= RESTART_BACKOFF
        {
            match self.launcher.etcd(&e.spec) {
                Ok(child) => {
                    e.child = Some(child);
                    e.restarts += 1;
                    e.started = Instant::now();
                }
                Err(err) => tracing::error!(error = %err, "etcd restart failed"),
            }
        }
        let ids: Vec<String> = self.executors.keys().cloned().collect();
        for id in ids {
            let Some(r) = self.executors.get_mut(&id) else {
                continue;
            };
            if !exited(&mut r.child, &id) || r.started.elapsed() < RESTART_BACKOFF {
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
        let executors = self.executor_specs();
        for (k, p) in self.proxies.iter_mut().enumerate() {
            if p.handoff
                || !exited(&mut p.child, &Proxies::name(k))
                || p.started.elapsed() < RESTART_BACKOFF
            {
                continue;
            }
            match self
                .launcher
                .proxy(k, self.proxy_binary.as_deref(), false, &executors)
            {
                Ok(child) => {
                    p.child = Some(child);
                    p.restarts += 1;
                    p.started = Instant::now();
                }
                Err(e) => tracing::error!(proxy = k, error = %e, "proxy restart failed"),
            }
        }
    }

    /// Forks what a request asked for, on the supervising thread.
    fn spawn(&mut self, what: Spawn) -> anyhow::Result<Child> {
        match what {
            Spawn::Executor(spec) => self.launcher.executor(&spec),
            Spawn::UpgradedProxy(k, binary) => {
                let executors = self.executor_specs();
                let child = self
                    .launcher
                    .proxy(k, Some(binary.as_path()), true, &executors);
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
    /// Proxy `k` from this binary, taking its sockets over (`-u`).
    UpgradedProxy(usize, PathBuf),
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

    /// The proxies' socket hand-off (module doc of `crate::upgrade`), one
    /// proxy after the other, so the others serve while one hands over.
    fn upgrade_proxy(&self, binary: PathBuf) -> anyhow::Result<ProxyUpgraded> {
        let count = lock(&self.sup).proxies.len();
        let mut pids = Vec::with_capacity(count);
        for k in 0..count {
            pids.push(self.upgrade_one(k, binary.clone())?);
        }
        Ok(ProxyUpgraded {
            pid: pids.first().copied().unwrap_or_default(),
            pids,
        })
    }

    /// Hands proxy `k`'s sockets to `binary`; the new one's pid.
    fn upgrade_one(&self, k: usize, binary: PathBuf) -> anyhow::Result<u32> {
        let sock =
            Proxies::state_dir(&lock(&self.sup).launcher.state, k).join("proxy-upgrade.sock");
        let _ = std::fs::remove_file(&sock);
        // The new proxy waits on the upgrade socket for the old one's
        // sockets; the supervisor watches it from now on, the old one only
        // until it exits.
        let old = {
            let mut s = lock(&self.sup);
            let p = &mut s.proxies[k];
            p.handoff = true;
            p.child.take()
        };
        let result = self.hand_off(k, binary, &sock, old);
        lock(&self.sup).proxies[k].handoff = false;
        result
    }

    fn hand_off(
        &self,
        k: usize,
        binary: PathBuf,
        sock: &Path,
        old: Option<Child>,
    ) -> anyhow::Result<u32> {
        let name = Proxies::name(k);
        let restore = |old| lock(&self.sup).proxies[k].child = old;
        let mut new = match self.spawn(Spawn::UpgradedProxy(k, binary)) {
            Ok(child) => child,
            Err(e) => {
                restore(old);
                return Err(e);
            }
        };
        let start = Instant::now();
        while !sock.exists() {
            if let Ok(Some(status)) = new.try_wait() {
                restore(old);
                bail!(
                    "the new {name} exited ({status}) before taking the sockets; see logs/{name}.log"
                );
            }
            if start.elapsed() > HANDOFF_TIMEOUT {
                let _ = new.kill();
                let _ = new.wait();
                restore(old);
                bail!("the new {name} never waited for the sockets; see logs/{name}.log");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let pid = new.id();
        lock(&self.sup).proxies[k].child = Some(new);
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
                tracing::warn!(proxy = %name, "the old proxy did not exit after the hand-off; killing it");
                let _ = old.kill();
                let _ = old.wait();
            }
        }
        tracing::info!(proxy = %name, pid, "proxy upgraded");
        Ok(pid)
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

/// Stops the proxies first (no new requests), then the executors, then
/// etcd (the proxies leave its table on their way out).
pub fn stop_all(sup: &Mutex<Supervisor>) {
    let (proxies, executors, etcd) = {
        let mut s = lock(sup);
        s.stopping = true;
        let executors: Vec<(String, Child)> = s
            .executors
            .iter_mut()
            .filter_map(|(id, r)| r.child.take().map(|c| (id.clone(), c)))
            .collect();
        let proxies: Vec<(String, Child)> = s
            .proxies
            .iter_mut()
            .enumerate()
            .filter_map(|(k, p)| p.child.take().map(|c| (Proxies::name(k), c)))
            .collect();
        let etcd = s.etcd.as_mut().and_then(|e| e.child.take());
        (proxies, executors, etcd)
    };
    stop_together(proxies);
    stop_together(executors);
    if let Some(e) = etcd {
        stop_child(e, "etcd");
    }
    tracing::info!("fleet stopped");
}

/// Stops `children` at once, each as [`stop_child`].
fn stop_together(children: Vec<(String, Child)>) {
    let handles: Vec<_> = children
        .into_iter()
        .map(|(id, c)| std::thread::spawn(move || stop_child(c, &id)))
        .collect();
    for h in handles {
        let _ = h.join();
    }
}
