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

/// `up.json`: the executor set, so a restarted `up` brings back the same.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Saved {
    pub executors: Vec<ExecutorSpec>,
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

/// How this supervisor starts its children: all run a binary (this one
/// unless told otherwise) with the fleet's environment, logging to
/// `<state>/logs/<id>.log`.
#[derive(Debug)]
pub struct Launcher {
    /// The fleet's state directory.
    pub state: PathBuf,
    /// This binary.
    pub me: PathBuf,
    /// Set on every child (the tokens `up` made).
    env: Vec<(String, String)>,
    /// The proxy's flags but its executors; fixed once the first executors
    /// run.
    proxy_args: Vec<OsString>,
}

impl Launcher {
    pub fn new(state: PathBuf, me: PathBuf, env: Vec<(String, String)>) -> Launcher {
        Launcher {
            state,
            me,
            env,
            proxy_args: Vec::new(),
        }
    }

    /// The proxy listens on `listen` and `admin_listen` (it routes to the
    /// executors running when it starts: [`proxy`](Self::proxy)). The
    /// `executors` share the machine's memory: unless the environment sets
    /// `--host-memory-bytes`, each gets its part of the default budget.
    pub fn set_proxy(&mut self, listen: &str, admin_listen: &str, executors: &[ExecutorSpec]) {
        let var = tensor_wasm_shared::names::env::HOST_MEMORY_BYTES;
        if std::env::var_os(var).is_none() && !self.env.iter().any(|(k, _)| k == var) {
            let share = tensor_wasm_executor::memory::default_budget(executors.len() as u64);
            self.env.push((var.to_string(), share.to_string()));
        }
        self.proxy_args = vec![
            "--listen".into(),
            listen.into(),
            "--admin-listen".into(),
            admin_listen.into(),
            "--state-dir".into(),
            self.state.join("proxy").into(),
            "--audit-log".into(),
            self.state.join("logs").join("audit.log").into(),
        ];
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

    /// Starts the proxy from `binary` (this one when None), routing to
    /// `executors`, the ones running now: an executor an upgrade replaced
    /// and the proxy forgot must not come back with a restarted (or
    /// upgraded) proxy. With `upgrade`, one that takes the running proxy's
    /// sockets over (`-u`).
    pub fn proxy(
        &self,
        binary: Option<&Path>,
        upgrade: bool,
        executors: &[ExecutorSpec],
    ) -> anyhow::Result<Child> {
        let log = self.log_file("proxy")?;
        let mut cmd = Command::new(binary.unwrap_or(self.me.as_path()));
        cmd.arg("proxy").args(&self.proxy_args);
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
}

/// A free loopback port.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits until `127.0.0.1:port/healthz` answers 200.
pub fn wait_healthy(port: u16, child: &mut Child, what: &str) -> anyhow::Result<()> {
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
}
