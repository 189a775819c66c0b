//! Starting the fleet's processes: which executors this machine gets, the
//! command line and environment of each child, its log file, its port, and
//! waiting until it answers.
//!
//! This module starts processes and keeps none: the [`super::supervisor`]
//! holds the children it returns, restarts and stops them.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tensor_wasm_kernels::discovery::DeviceInfo;

/// How long a started executor may take to answer `/healthz`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

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

impl ExecutorSpec {
    /// Where the executor listens.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// The etcd `up` runs for its proxies' shared placement table, on loopback
/// ports fixed for the fleet's life; its data lives in `<state>/etcd`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EtcdSpec {
    pub client_port: u16,
    pub peer_port: u16,
}

impl EtcdSpec {
    /// New ports, for a fleet's first etcd.
    pub fn new() -> anyhow::Result<EtcdSpec> {
        Ok(EtcdSpec {
            client_port: free_port()?,
            peer_port: free_port()?,
        })
    }

    /// Where its clients reach it.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// The proxies' `--placement`.
    pub fn placement(&self) -> String {
        format!("etcd://{}", self.addr())
    }
}

/// `up.json`: the executor set, so a restarted `up` brings back the same,
/// and the etcd it runs, if any: once a fleet's placement table is there,
/// it stays there.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Saved {
    pub executors: Vec<ExecutorSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd: Option<EtcdSpec>,
}

impl Saved {
    fn path(state: &Path) -> PathBuf {
        state.join("up.json")
    }

    /// The set saved under `state`; empty when there is none.
    pub fn load(state: &Path) -> anyhow::Result<Saved> {
        match std::fs::read(Saved::path(state)) {
            Ok(b) => serde_json::from_slice(&b).context("up.json is corrupt"),
            Err(_) => Ok(Saved::default()),
        }
    }

    pub fn store(&self, state: &Path) -> anyhow::Result<()> {
        super::write_private(&Saved::path(state), &serde_json::to_vec_pretty(self)?)
    }
}

/// The proxies of a fleet: all on one public port (shared with
/// SO_REUSEPORT when there are several, so the kernel spreads connections
/// across them), each on an admin port of its own: proxy `k` on
/// `--admin-listen`'s port + `k`.
#[derive(Clone, Debug, Default)]
pub struct Proxies {
    listen: String,
    admin_host: String,
    admin_port: u16,
    /// How many.
    pub count: usize,
    /// Their `--placement`; none: the file table of the one proxy.
    placement: Option<String>,
}

impl Proxies {
    /// `count` proxies on `listen`, admin ports from `admin_listen`'s.
    pub fn new(
        listen: &str,
        admin_listen: &str,
        count: usize,
        placement: Option<String>,
    ) -> anyhow::Result<Proxies> {
        let (host, port) = admin_listen
            .rsplit_once(':')
            .context("--admin-listen needs host:port")?;
        let port: u16 = port.parse().context("--admin-listen needs host:port")?;
        if count == 0 || usize::from(port) + count - 1 > usize::from(u16::MAX) {
            bail!("--proxies {count} with admin port {port}: no room for their admin ports");
        }
        if count > 1 && placement.is_none() {
            bail!("{count} proxies need a placement table they share (etcd)");
        }
        Ok(Proxies {
            listen: listen.to_string(),
            admin_host: host.to_string(),
            admin_port: port,
            count,
            placement,
        })
    }

    /// Keep placement in the etcd `up` runs as `spec`.
    pub fn use_etcd(&mut self, spec: &EtcdSpec) {
        self.placement = Some(spec.placement());
    }

    /// Proxy `k`'s name: `proxy`, then `proxy-1`, `proxy-2`…
    pub fn name(k: usize) -> String {
        match k {
            0 => "proxy".into(),
            k => format!("proxy-{k}"),
        }
    }

    /// The index of the proxy named `name` ([`name`](Self::name)).
    pub fn index(name: &str) -> Option<usize> {
        match name {
            "proxy" => Some(0),
            n => n.strip_prefix("proxy-")?.parse().ok().filter(|&k| k > 0),
        }
    }

    /// The proxies' public `/healthz`: every proxy answers it there once
    /// its public listener is bound (`--listen`, which they share).
    pub fn public_health_url(&self) -> String {
        format!("http://{}/healthz", self.listen)
    }

    /// Proxy `k`'s admin port.
    pub fn admin_port(&self, k: usize) -> u16 {
        self.admin_port + k as u16
    }

    /// Proxy `k`'s admin listener.
    pub fn admin_addr(&self, k: usize) -> String {
        format!("{}:{}", self.admin_host, self.admin_port(k))
    }

    /// Proxy `k`'s state directory: `<state>/proxy`, `<state>/proxy-1`…
    pub fn state_dir(state: &Path, k: usize) -> PathBuf {
        state.join(Proxies::name(k))
    }

    /// Proxy `k`'s audit log: `logs/audit.log`, `logs/audit-1.log`…
    pub fn audit_log(state: &Path, k: usize) -> PathBuf {
        let logs = state.join("logs");
        match k {
            0 => logs.join("audit.log"),
            k => logs.join(format!("audit-{k}.log")),
        }
    }

    /// Proxy `k`'s flags but its executors.
    fn args(&self, state: &Path, k: usize) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--listen".into(),
            self.listen.clone().into(),
            "--admin-listen".into(),
            self.admin_addr(k).into(),
            "--state-dir".into(),
            Proxies::state_dir(state, k).into(),
            "--audit-log".into(),
            Proxies::audit_log(state, k).into(),
        ];
        // Always given, so that a TENSOR_WASM_PLACEMENT in `up`'s
        // environment cannot tell a proxy otherwise.
        let placement = self.placement.as_deref().unwrap_or("file");
        args.extend(["--placement".into(), placement.into()]);
        if self.count > 1 {
            args.push("--reuse-port".into());
        }
        args
    }
}

/// How this supervisor starts its children: all run a binary (this one
/// unless told otherwise) with the fleet's environment, logging to
/// `<state>/logs/<id>.log`; etcd runs the system's.
#[derive(Debug)]
pub struct Launcher {
    /// The fleet's state directory.
    pub state: PathBuf,
    /// This binary.
    pub me: PathBuf,
    /// Set on every child (the tokens `up` made).
    env: Vec<(String, String)>,
    /// The proxies; fixed once the first executors run.
    pub proxies: Proxies,
}

impl Launcher {
    pub fn new(state: PathBuf, me: PathBuf, env: Vec<(String, String)>) -> Launcher {
        Launcher {
            state,
            me,
            env,
            proxies: Proxies::default(),
        }
    }

    /// The proxies (they route to the executors running when each starts:
    /// [`proxy`](Self::proxy)). The `executors` share the machine's
    /// memory: unless the environment sets `--host-memory-bytes`, each gets
    /// its part of the default budget.
    pub fn set_proxies(&mut self, proxies: Proxies, executors: &[ExecutorSpec]) {
        let var = tensor_wasm_shared::names::env::HOST_MEMORY_BYTES;
        if std::env::var_os(var).is_none() && !self.env.iter().any(|(k, _)| k == var) {
            let share = tensor_wasm_executor::memory::default_budget(executors.len() as u64);
            self.env.push((var.to_string(), share.to_string()));
        }
        self.proxies = proxies;
    }

    fn log_file(&self, id: &str) -> anyhow::Result<std::fs::File> {
        let dir = self.state.join("logs");
        std::fs::create_dir_all(&dir)?;
        Ok(std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{id}.log")))?)
    }

    /// Starts `spec`'s executor; the kernel stops it if the calling thread
    /// ends (`crate::sys::die_with_parent`).
    pub fn executor(&self, spec: &ExecutorSpec) -> anyhow::Result<Child> {
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

    /// Starts proxy `k` from `binary` (this one when None), routing to
    /// `executors`, the ones running now: an executor an upgrade replaced
    /// and the proxy forgot must not come back with a restarted (or
    /// upgraded) proxy. With `upgrade`, one that takes the running proxy
    /// `k`'s sockets over (`-u`).
    pub fn proxy(
        &self,
        k: usize,
        binary: Option<&Path>,
        upgrade: bool,
        executors: &[ExecutorSpec],
    ) -> anyhow::Result<Child> {
        let log = self.log_file(&Proxies::name(k))?;
        let mut cmd = Command::new(binary.unwrap_or(self.me.as_path()));
        cmd.arg("proxy").args(self.proxies.args(&self.state, k));
        if !executors.is_empty() {
            let list: Vec<String> = executors
                .iter()
                .map(|s| format!("{}={}", s.id, s.addr()))
                .collect();
            cmd.arg("--executor").arg(list.join(","));
        }
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

    /// Starts etcd (`TENSOR_WASM_ETCD_BINARY`, else `etcd` from the PATH:
    /// Debian's `etcd-server`), one member on loopback, its data in
    /// `<state>/etcd`, keeping an hour of history.
    pub fn etcd(&self, spec: &EtcdSpec) -> anyhow::Result<Child> {
        let binary = std::env::var_os(tensor_wasm_shared::names::env::ETCD_BINARY)
            .unwrap_or_else(|| "etcd".into());
        let data = self.state.join("etcd");
        tensor_wasm_shared::files::private_dir(&data)
            .with_context(|| format!("cannot create {}", data.display()))?;
        let log = self.log_file("etcd")?;
        let client = format!("http://{}", spec.addr());
        let peer = format!("http://127.0.0.1:{}", spec.peer_port);
        let mut cmd = Command::new(&binary);
        cmd.args(["--name", "up", "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("up={peer}")])
            .args(["--auto-compaction-mode", "periodic"])
            .args(["--auto-compaction-retention", "1h"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        crate::sys::die_with_parent(&mut cmd);
        cmd.spawn().with_context(|| {
            format!(
                "cannot start {} (more than one proxy keeps placement in etcd: install the etcd-server package, or give --placement etcd://…)",
                binary.to_string_lossy()
            )
        })
    }
}

/// A free loopback port.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `port` itself if nothing listens on it, else a free one: a port kept in
/// `up.json` that another program took while the fleet was down is not
/// worth failing the start over (the proxies are told the new address).
pub fn own_port(port: u16, what: &str) -> anyhow::Result<u16> {
    if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
        return Ok(port);
    }
    let new = free_port()?;
    tracing::warn!(child = %what, port, new, "its port is taken by another program; moving to a new one");
    Ok(new)
}

/// Waits until `127.0.0.1:port/healthz` answers 200.
pub fn wait_healthy(port: u16, child: &mut Child, what: &str) -> anyhow::Result<()> {
    wait_ready(&format!("http://127.0.0.1:{port}/healthz"), child, what)
}

/// Waits until `url` answers 200.
pub fn wait_ready(url: &str, child: &mut Child, what: &str) -> anyhow::Result<()> {
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
        if agent.get(url).call().is_ok_and(|r| r.status() == 200) {
            return Ok(());
        }
        if start.elapsed() > READY_TIMEOUT {
            bail!("{what} did not answer {url} within {READY_TIMEOUT:?}; see its log");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The executors to run on this machine: the saved set, else one per GPU
/// or MIG slice NVML finds (none with `cpu_only`), else CPU executors.
pub fn plan(
    saved: Saved,
    cpu_only: bool,
    cpu_executors: usize,
) -> anyhow::Result<Vec<ExecutorSpec>> {
    if !saved.executors.is_empty() {
        return Ok(saved.executors);
    }
    let gpus = if cpu_only {
        Vec::new()
    } else {
        tensor_wasm_kernels::discovery::discover_system()
    };
    specs_for(&gpus, cpu_executors, free_port)
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
        .arg(spec.addr())
        .arg("--state-dir")
        .arg(state.join("executors").join(&spec.id));
    if let Some(uuid) = &spec.cuda_visible_devices {
        cmd.env("CUDA_VISIBLE_DEVICES", uuid);
    }
    cmd
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

    #[test]
    fn a_saved_port_another_program_took_is_traded_for_a_free_one() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let moved = own_port(port, "cpu0").unwrap();
        assert_ne!(moved, port);
        drop(taken);
        assert_eq!(own_port(port, "cpu0").unwrap(), port);
    }
}
