//! A small harness for end-to-end tests: real `tensor-wasm` processes
//! (executors, the proxy) from the binary this test build made, on loopback
//! ports, stopped when dropped.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const TOKEN: &str = "e2e-internal-token";

/// Taken by the tests that keep the machine busy for long (fleets under
/// load, whole upgrades), so that no two of them run at once: each
/// judges latencies and deadlines that a second one would eat into.
pub fn heavy() -> std::sync::MutexGuard<'static, ()> {
    static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());
    HEAVY.lock().unwrap_or_else(|p| p.into_inner())
}

/// A `tensor-wasm executor` child process, killed when dropped.
pub struct ExecutorProcess {
    pub child: Child,
    pub base: String,
    pub addr: String,
    pub id: String,
    agent: ureq::Agent,
    state: PathBuf,
    extra: Vec<String>,
    /// Its log lines so far (stderr).
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

pub fn free_port() -> u16 {
    free_ports_in_a_row(1)
}

/// The first of `n` free ports in a row, for a server to bind later.
///
/// Ports come from the span just below the kernel's ephemeral range
/// (`ip_local_port_range`), and none is handed out twice in this process.
/// A port from `bind(0)` could be taken between its pick and its server's
/// bind: by another test's `bind(0)`, or as the source port of an outgoing
/// connection. A proxy's admin port taken so sent one test's admin calls
/// to another test's executor.
pub fn free_ports_in_a_row(n: u16) -> u16 {
    static NEXT: std::sync::OnceLock<std::sync::atomic::AtomicU32> = std::sync::OnceLock::new();
    let (low, span) = private_ports();
    // Where this process starts in the span, so that two test processes
    // at once mostly pick apart.
    let next = NEXT.get_or_init(|| (std::process::id().wrapping_mul(7919) % span).into());
    let n32 = u32::from(n);
    assert!(n32 < span, "{n} ports in a row");
    loop {
        let at = next.fetch_add(n32, std::sync::atomic::Ordering::Relaxed) % (span - n32);
        let first = (low + at) as u16;
        if (0..n).all(|i| TcpListener::bind(("127.0.0.1", first + i)).is_ok()) {
            return first;
        }
    }
}

/// The span of ports below the ephemeral range: its first port and its
/// length (below 32768 by default, 12,000 ports).
fn private_ports() -> (u32, u32) {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let span = 12_000.min(ephemeral_low.saturating_sub(1024));
    assert!(
        span >= 1000,
        "no room below the ephemeral ports ({ephemeral_low})"
    );
    (ephemeral_low - span, span)
}

impl ExecutorProcess {
    pub fn start(id: &str, state: &Path) -> ExecutorProcess {
        Self::start_with(id, state, &[])
    }

    /// Its state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    /// Starts with extra flags.
    pub fn start_with(id: &str, state: &Path, extra: &[&str]) -> ExecutorProcess {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Self::start_on(id, state, &extra, free_port())
    }

    fn start_on(id: &str, state: &Path, extra: &[String], port: u16) -> ExecutorProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tensor-wasm"))
            .args([
                "executor",
                "--id",
                id,
                "--device",
                "cpu",
                "--total-instances",
                "16",
            ])
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--state-dir")
            .arg(state)
            .args(extra)
            .env_remove("TENSOR_WASM_SNAPSHOT_KEY")
            .env("TENSOR_WASM_INTERNAL_TOKEN", TOKEN)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Keep every line; wait for the "executor ready" one.
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains("executor ready") {
                        let _ = tx.send(());
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        rx.recv_timeout(Duration::from_secs(60))
            .expect("executor did not become ready");
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        ExecutorProcess {
            child,
            base: format!("http://127.0.0.1:{port}"),
            addr: format!("127.0.0.1:{port}"),
            id: id.to_string(),
            agent,
            state: state.to_path_buf(),
            extra: extra.to_vec(),
            log,
        }
    }

    /// Starts it again (after it was killed): same id, state directory,
    /// flags and port.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let port: u16 = self.addr.rsplit(':').next().unwrap().parse().unwrap();
        let start = Instant::now();
        // The old socket may linger a moment.
        while TcpListener::bind(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "port {port} stays taken"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        *self = Self::start_on(
            &self.id.clone(),
            &self.state.clone(),
            &self.extra.clone(),
            port,
        );
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// The value of the sample `name` (labels included, as the text
    /// format writes them) in its `/metrics`; 0 when absent.
    pub fn metric(&self, name: &str) -> f64 {
        let (status, body) = self.request("GET", "/metrics", None, "", b"");
        assert_eq!(status, 200);
        let text = String::from_utf8(body).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    /// Lines logged so far: a mark for [`wait_log_after`](Self::wait_log_after).
    pub fn log_mark(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// Waits until a line logged after `mark` contains every one of
    /// `needles` (at most 60 s).
    pub fn wait_log_after(&self, mark: usize, needles: &[&str]) {
        let start = Instant::now();
        loop {
            let found = self.log.lock().unwrap()[mark..]
                .iter()
                .any(|l| needles.iter().all(|n| l.contains(n)));
            if found {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{} never logged {needles:?}:\n{}",
                self.id,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        tenant: Option<&str>,
        ct: &str,
        body: &[u8],
    ) -> (u16, Vec<u8>) {
        let url = format!("{}{path}", self.base);
        let auth = format!("Bearer {TOKEN}");
        let mut resp = match method {
            "GET" => {
                let mut r = self.agent.get(&url).header("authorization", &auth);
                if let Some(t) = tenant {
                    r = r.header("x-tensor-wasm-tenant", t);
                }
                r.call()
            }
            "DELETE" => {
                let mut r = self.agent.delete(&url).header("authorization", &auth);
                if let Some(t) = tenant {
                    r = r.header("x-tensor-wasm-tenant", t);
                }
                r.call()
            }
            _ => {
                let mut r = self
                    .agent
                    .post(&url)
                    .header("authorization", &auth)
                    .header("content-type", ct);
                if let Some(t) = tenant {
                    r = r.header("x-tensor-wasm-tenant", t);
                }
                r.send(body)
            }
        }
        .unwrap();
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_vec()
            .unwrap();
        (status, body)
    }

    /// Stops gracefully (SIGTERM) and waits for the exit.
    pub fn stop(mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("executor did not stop on SIGTERM");
    }
}

impl Drop for ExecutorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A counter kept in a non-exported global, plus a device tensor whose
/// handle lives in linear memory and which grows by one each call.
pub const COUNTER: &str = r#"(module
  (import "tensor" "zeros" (func $zeros (param i32 i32 i32) (result i32)))
  (import "tensor" "scalar" (func $scalar (param i32 i32 f32) (result i32)))
  (import "tensor" "free" (func $free (param i32) (result i32)))
  (import "tensor" "read" (func $read (param i32 i32 i32) (result i32)))
  (import "tensor" "output_write" (func $output_write (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "\04\00\00\00")
  (global $n (mut i32) (i32.const 0))
  (func (export "init") (result i32)
    (i32.store (i32.const 100) (call $zeros (i32.const 0) (i32.const 0) (i32.const 1)))
    (i32.const 0))
  (func (export "handle") (result i32)
    (local $old i32)
    (global.set $n (i32.add (global.get $n) (i32.const 1)))
    (local.set $old (i32.load (i32.const 100)))
    (i32.store (i32.const 100) (call $scalar (i32.const 0) (local.get $old) (f32.const 1)))
    (drop (call $free (local.get $old)))
    (i32.store (i32.const 200) (global.get $n))
    (drop (call $read (i32.load (i32.const 100)) (i32.const 204) (i32.const 16)))
    (drop (call $output_write (i32.const 200) (i32.const 20)))
    (i32.const 0)))"#;

/// Invokes tenant `acme`'s function `id` with an empty body, which must
/// answer 200; the answer's body.
pub fn invoke_ok(ex: &ExecutorProcess, id: &str) -> Vec<u8> {
    let (status, body) = ex.request(
        "POST",
        &format!("/functions/{id}/invoke"),
        Some("acme"),
        "text/plain",
        b"",
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    body
}

pub fn counter_call(ex: &ExecutorProcess, id: &str) -> (u32, Vec<f32>) {
    let body = invoke_ok(ex, id);
    let n = u32::from_le_bytes(body[..4].try_into().unwrap());
    let sum = body[4..]
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (n, sum)
}

/// An answer: status, headers, body.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {} {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The `code` of an error body.
    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// An HTTP client for one base URL.
#[derive(Clone, Debug)]
pub struct Api {
    pub base: String,
    agent: ureq::Agent,
}

impl Api {
    pub fn new(base: &str) -> Api {
        Api {
            base: base.to_string(),
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(30)))
                .build()
                .into(),
        }
    }

    /// One request; `Err` only when no answer came.
    pub fn try_call(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<(&str, &[u8])>,
    ) -> Result<Resp, ureq::Error> {
        let url = format!("{}{path}", self.base);
        let mut resp = match method {
            "GET" | "DELETE" => {
                let mut r = if method == "GET" {
                    self.agent.get(&url)
                } else {
                    self.agent.delete(&url)
                };
                for (k, v) in headers {
                    r = r.header(*k, *v);
                }
                r.call()?
            }
            _ => {
                let mut r = self.agent.post(&url);
                for (k, v) in headers {
                    r = r.header(*k, *v);
                }
                let (ct, bytes) = body.unwrap_or(("application/octet-stream", b""));
                r.header("content-type", ct).send(bytes)?
            }
        };
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let body = resp.body_mut().with_config().limit(1 << 30).read_to_vec()?;
        Ok(Resp {
            status,
            headers,
            body,
        })
    }

    pub fn call(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<(&str, &[u8])>,
    ) -> Resp {
        self.try_call(method, path, headers, body)
            .unwrap_or_else(|e| panic!("{method} {path}: no answer: {e}"))
    }
}

/// The admin token the harness gives proxies.
pub const ADMIN_TOKEN: &str = "e2e-admin-token";

/// How a test proxy is started.
#[derive(Clone, Debug)]
pub struct ProxyOptions {
    pub tokens: String,
    /// Read tokens from this file instead (re-read on SIGHUP).
    pub tokens_file: Option<PathBuf>,
    pub qps: f64,
    pub burst: u32,
    pub audit_log: Option<PathBuf>,
    pub audit_max_bytes: u64,
    pub listen_port: u16,
    pub admin_port: u16,
    pub upgrade: bool,
    /// Certificate and key: TLS on the public listener.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub extra_args: Vec<String>,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            tokens: "tok-acme:acme,tok-beta:beta,tok-gamma:gamma".into(),
            tokens_file: None,
            qps: 10_000.0,
            burst: 10_000,
            audit_log: None,
            audit_max_bytes: 64 << 20,
            listen_port: free_port(),
            admin_port: free_port(),
            upgrade: false,
            tls: None,
            extra_args: Vec::new(),
        }
    }
}

/// A `tensor-wasm proxy` child process, killed when dropped.
pub struct ProxyProcess {
    pub child: Child,
    pub api: Api,
    pub admin: Api,
    pub options: ProxyOptions,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl ProxyProcess {
    /// Starts a proxy on `state` in front of `executors` and waits until it
    /// answers `/healthz` and its admin listener answers.
    pub fn start(state: &Path, executors: &[&ExecutorProcess], options: ProxyOptions) -> Self {
        let mut proxy = Self::spawn(state, executors, options);
        if !proxy.options.upgrade {
            proxy.wait_ready();
        }
        proxy
    }

    /// Starts a proxy as [`start`](Self::start) does, without waiting.
    pub fn spawn(state: &Path, executors: &[&ExecutorProcess], options: ProxyOptions) -> Self {
        let list: Vec<String> = executors
            .iter()
            .map(|e| format!("{}={}", e.id, e.addr))
            .collect();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tensor-wasm"));
        cmd.arg("proxy")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", options.listen_port))
            .arg("--admin-listen")
            .arg(format!("127.0.0.1:{}", options.admin_port))
            .arg("--state-dir")
            .arg(state)
            .args(["--threads", "2", "--health-interval-ms", "200"])
            .args(["--grace-period-secs", "1"])
            .arg("--rate-limit-qps")
            .arg(options.qps.to_string())
            .arg("--rate-limit-burst")
            .arg(options.burst.to_string())
            .args(&options.extra_args)
            .env_remove("TENSOR_WASM_API_TOKENS_FILE")
            .env("TENSOR_WASM_API_TOKENS", &options.tokens)
            .env("TENSOR_WASM_INTERNAL_TOKEN", TOKEN)
            .env("TENSOR_WASM_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if !list.is_empty() {
            cmd.arg("--executor").arg(list.join(","));
        }
        if let Some(file) = &options.tokens_file {
            cmd.env_remove("TENSOR_WASM_API_TOKENS")
                .arg("--tokens-file")
                .arg(file);
        }
        if let Some(audit) = &options.audit_log {
            cmd.arg("--audit-log")
                .arg(audit)
                .arg("--audit-max-bytes")
                .arg(options.audit_max_bytes.to_string());
        }
        if options.upgrade {
            cmd.arg("-u");
        }
        if let Some((cert, key)) = &options.tls {
            cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
        }
        let mut child = cmd.spawn().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    log.lock().unwrap().push(line);
                }
            });
        }
        ProxyProcess {
            child,
            api: Api::new(&format!("http://127.0.0.1:{}", options.listen_port)),
            admin: Api::new(&format!("http://127.0.0.1:{}", options.admin_port)),
            options,
            log,
        }
    }

    /// Waits for the "proxy serving" line and a `/healthz` answer.
    pub fn wait_ready(&mut self) {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("proxy exited with {status}:\n{}", self.log_text());
            }
            let serving = self.log_text().contains("proxy serving");
            let healthy = if self.options.tls.is_some() {
                curl_tls(self.options.listen_port, "/healthz", None).0 == 200
            } else {
                self.api
                    .try_call("GET", "/healthz", &[], None)
                    .is_ok_and(|r| r.status == 200)
            };
            // The admin listener is bound by its own service: any answer
            // (401 without a token) shows it is up too.
            let admin = healthy
                && self
                    .admin
                    .try_call("GET", "/admin/executors", &[], None)
                    .is_ok();
            if serving && healthy && admin {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "proxy did not become ready:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// A public call with tenant `token`.
    pub fn call(&self, token: &str, method: &str, path: &str, body: Option<(&str, &[u8])>) -> Resp {
        let auth = format!("Bearer {token}");
        self.api
            .call(method, path, &[("authorization", auth.as_str())], body)
    }

    /// An admin call.
    pub fn admin(&self, method: &str, path: &str, body: Option<(&str, &[u8])>) -> Resp {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        self.admin
            .call(method, path, &[("authorization", auth.as_str())], body)
    }

    /// Registers the counter module for `token`'s tenant; its function id.
    pub fn deploy_counter(&self, token: &str) -> String {
        let wasm = wat::parse_str(COUNTER).unwrap();
        let r = self.call(
            token,
            "POST",
            "/functions?name=counter",
            Some(("application/wasm", &wasm)),
        );
        assert_eq!(r.status, 201, "{}", r.text());
        r.json()["id"].as_str().unwrap().to_string()
    }

    /// One counter call with tenant `token`: (calls so far, the tensor).
    pub fn count(&self, token: &str, id: &str) -> Resp {
        self.call(
            token,
            "POST",
            &format!("/functions/{id}/invoke"),
            Some(("text/plain", b"")),
        )
    }

    /// `POST /admin/tenants/{tenant}/migrate` to `to`.
    pub fn migrate(&self, tenant: &str, to: &str) -> Resp {
        let body = serde_json::json!({ "to": to }).to_string();
        self.admin(
            "POST",
            &format!("/admin/tenants/{tenant}/migrate"),
            Some(("application/json", body.as_bytes())),
        )
    }

    /// Where the proxy placed `tenant`.
    pub fn placement(&self, tenant: &str) -> Option<String> {
        let r = self.admin("GET", "/admin/placements", None);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["placements"][tenant].as_str().map(str::to_string)
    }

    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status();
    }

    /// Stops with SIGTERM and waits for the exit.
    pub fn stop(mut self) {
        self.signal("TERM");
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("proxy did not stop on SIGTERM:\n{}", self.log_text());
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- proxy log ---\n{}\n--- end ---", self.log_text());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A proxy in front of executors, each with its own state directory.
pub struct TestFleet {
    pub proxy: ProxyProcess,
    pub executors: Vec<ExecutorProcess>,
    /// Holds the state directories until the fleet is dropped.
    pub dir: tempfile::TempDir,
}

impl TestFleet {
    /// `n` CPU executors (`cpu0`…) and a proxy with `options`.
    pub fn start(n: usize, options: ProxyOptions) -> TestFleet {
        Self::start_with(n, options, |_| Vec::new())
    }

    /// As [`start`](Self::start), with extra flags for executor `i`.
    pub fn start_with(
        n: usize,
        options: ProxyOptions,
        flags: impl Fn(usize) -> Vec<&'static str>,
    ) -> TestFleet {
        let dir = tempfile::tempdir().unwrap();
        let executors: Vec<ExecutorProcess> = (0..n)
            .map(|i| {
                let state = dir.path().join(format!("cpu{i}"));
                ExecutorProcess::start_with(&format!("cpu{i}"), &state, &flags(i))
            })
            .collect();
        let refs: Vec<&ExecutorProcess> = executors.iter().collect();
        let proxy = ProxyProcess::start(&dir.path().join("proxy"), &refs, options);
        TestFleet {
            proxy,
            executors,
            dir,
        }
    }

    /// The proxy's state directory.
    pub fn proxy_state(&self) -> PathBuf {
        self.dir.path().join("proxy")
    }

    pub fn executor(&self, id: &str) -> &ExecutorProcess {
        self.executors
            .iter()
            .find(|e| e.id == id)
            .unwrap_or_else(|| panic!("no executor {id}"))
    }

    pub fn executor_mut(&mut self, id: &str) -> &mut ExecutorProcess {
        self.executors
            .iter_mut()
            .find(|e| e.id == id)
            .unwrap_or_else(|| panic!("no executor {id}"))
    }

    /// Registers the counter module for `token`'s tenant; its function id.
    pub fn deploy_counter(&self, token: &str) -> String {
        self.proxy.deploy_counter(token)
    }

    /// One counter call through the proxy: (calls so far, the tensor).
    pub fn count(&self, token: &str, id: &str) -> Resp {
        self.proxy.count(token, id)
    }
}

/// The id a registration answered 201 with.
fn created_id(status: u16, body: &[u8]) -> String {
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(body));
    serde_json::from_slice::<serde_json::Value>(body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Registers the counter module for tenant acme straight on `ex`; its id.
pub fn deploy_counter_on(ex: &ExecutorProcess) -> String {
    let wasm = wat::parse_str(COUNTER).unwrap();
    let (status, body) = ex.request(
        "POST",
        "/functions?name=counter",
        Some("acme"),
        "application/wasm",
        &wasm,
    );
    created_id(status, &body)
}

/// Registers `wasm` as function `name` of `tenant` on `ex`, with the
/// function config `config` (JSON); its id.
pub fn register_on(
    ex: &ExecutorProcess,
    tenant: &str,
    name: &str,
    wasm: &[u8],
    config: &str,
) -> String {
    let (ct, body) = multipart(&[
        ("module", "application/wasm", wasm),
        ("config", "application/json", config.as_bytes()),
    ]);
    let (status, body) = ex.request(
        "POST",
        &format!("/functions?name={name}"),
        Some(tenant),
        &ct,
        &body,
    );
    created_id(status, &body)
}

/// The ids in a `GET /admin/executors` answer, in its order.
pub fn executor_ids(list: &serde_json::Value) -> Vec<String> {
    list["executors"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["id"].as_str().map(str::to_string))
        .collect()
}

/// [`SPINNER`] registered on `ex` for tenant `hog` with `hog_config` and
/// for tenant `quick` with defaults: their function ids.
pub fn hog_and_quick(ex: &ExecutorProcess, hog_config: &str) -> (String, String) {
    let spinner = wat::parse_str(SPINNER).unwrap();
    let hog = register_on(ex, "hog", "spinner", &spinner, hog_config);
    let quick = register_on(ex, "quick", "spinner", &spinner, "{}");
    (hog, quick)
}

/// Spins until its deadline when its body's first byte is 1, else answers
/// at once.
pub const SPINNER: &str = r#"(module
  (import "tensor" "input_read" (func $input_read (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "handle") (result i32)
    (drop (call $input_read (i32.const 0) (i32.const 0) (i32.const 1)))
    (if (i32.eq (i32.load8_u (i32.const 0)) (i32.const 1))
      (then (loop $spin (br $spin))))
    (i32.const 0)))"#;

/// Submits a job of function `id` of `tenant` on `ex` whose body is the
/// one byte `first`; its job id.
pub fn submit_job(ex: &ExecutorProcess, tenant: &str, id: &str, first: u8) -> String {
    let (status, body) = ex.request(
        "POST",
        &format!("/functions/{id}/invoke-async"),
        Some(tenant),
        "application/octet-stream",
        &[first],
    );
    assert_eq!(status, 202, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice::<serde_json::Value>(&body).unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Job `id` of `tenant` as its executor reports it.
pub fn job_of(ex: &ExecutorProcess, tenant: &str, id: &str) -> serde_json::Value {
    let (status, body) = ex.request("GET", &format!("/jobs/{id}"), Some(tenant), "", b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

/// Waits until job `id` of `tenant` has `status`.
pub fn wait_job_of(
    ex: &ExecutorProcess,
    tenant: &str,
    id: &str,
    status: &str,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let j = job_of(ex, tenant, id);
        if j["status"] == status {
            return j;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "job {id} stays {j}, not {status}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The counter's answer: (calls so far, tensor values).
pub fn parse_counter(body: &[u8]) -> (u32, Vec<f32>) {
    let n = u32::from_le_bytes(body[..4].try_into().unwrap());
    let sum = body[4..]
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (n, sum)
}

/// Tenants on an executor, from its own `/internal/info`.
pub fn tenants_on(ex: &ExecutorProcess) -> Vec<String> {
    let (status, body) = ex.request("GET", "/internal/info", None, "", b"");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    v["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect()
}

/// `GET path` over HTTPS with curl (certificate not verified): status, body.
pub fn curl_tls(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sk", "-o", "-", "-w", "\n%{http_code}"]);
    if let Some(t) = token {
        cmd.arg("-H").arg(format!("authorization: Bearer {t}"));
    }
    let out = cmd
        .arg(format!("https://127.0.0.1:{port}{path}"))
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// A `tensor-wasm up` supervisor, killed when dropped (its children get
/// SIGTERM from the kernel then).
pub struct UpProcess {
    pub child: Child,
    pub state: PathBuf,
    pub api: Api,
    pub admin: Api,
    pub stdout: String,
}

impl UpProcess {
    /// Starts `tensor-wasm up --device cpu` on `state` and waits for its
    /// "fleet ready" line.
    pub fn start(state: &Path, extra: &[&str]) -> UpProcess {
        Self::start_with_env(state, extra, &[])
    }

    /// As [`start`](Self::start), with extra environment variables.
    pub fn start_with_env(state: &Path, extra: &[&str], env: &[(&str, &str)]) -> UpProcess {
        // `--proxies N` gives proxy k the admin port after proxy 0's + k.
        let (port, admin_port) = (free_port(), free_ports_in_a_row(4));
        let mut child = Command::new(env!("CARGO_BIN_EXE_tensor-wasm"))
            .args(["up", "--device", "cpu"])
            .arg("--state-dir")
            .arg(state)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--admin-listen")
            .arg(format!("127.0.0.1:{admin_port}"))
            .args(extra)
            .env_remove("TENSOR_WASM_API_TOKENS")
            .env_remove("TENSOR_WASM_API_TOKENS_FILE")
            .env_remove("TENSOR_WASM_INTERNAL_TOKEN")
            .env_remove("TENSOR_WASM_ADMIN_TOKEN")
            .env_remove("TENSOR_WASM_SNAPSHOT_KEY")
            .env_remove("TENSOR_WASM_STATE_DIR")
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The supervisor's own log, its last lines kept for a failed start.
        let said = std::sync::Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
        {
            let (said, stderr) = (said.clone(), child.stderr.take().unwrap());
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let mut said = said.lock().unwrap();
                    if said.len() == 40 {
                        said.pop_front();
                    }
                    said.push_back(line);
                }
            });
        }
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut seen = String::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                seen.push_str(&line);
                seen.push('\n');
                if line.starts_with("next:") {
                    let _ = tx.send(seen.clone());
                }
            }
        });
        let stdout = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|e| {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(100));
                let said: Vec<String> = said.lock().unwrap().iter().cloned().collect();
                panic!(
                    "the fleet did not come up ({e}); up said:\n{}\nits children's logs:\n{}",
                    said.join("\n"),
                    log_tails(&state.join("logs"))
                )
            });
        UpProcess {
            child,
            state: state.to_path_buf(),
            api: Api::new(&format!("http://127.0.0.1:{port}")),
            admin: Api::new(&format!("http://127.0.0.1:{admin_port}")),
            stdout,
        }
    }

    pub fn secret(&self, name: &str) -> String {
        std::fs::read_to_string(self.state.join(name))
            .unwrap()
            .trim()
            .to_string()
    }

    /// One request to the control socket.
    pub fn control(&self, request: serde_json::Value) -> serde_json::Value {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(self.state.join("control.sock"))
            .expect("control socket");
        let mut line = request.to_string();
        line.push('\n');
        s.write_all(line.as_bytes()).unwrap();
        let mut answer = String::new();
        BufReader::new(s).read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap()
    }

    /// Registers the counter module through the proxy for the tenant of
    /// `token`; its function id.
    pub fn deploy_counter(&self, token: &str) -> String {
        let wasm = wat::parse_str(COUNTER).unwrap();
        let r = self.api.call(
            "POST",
            "/functions?name=counter",
            &[("authorization", &format!("Bearer {token}"))],
            Some(("application/wasm", &wasm)),
        );
        assert_eq!(r.status, 201, "{}", r.text());
        r.json()["id"].as_str().unwrap().to_string()
    }

    /// One counter call through the proxy for the tenant of `token`.
    pub fn count(&self, token: &str, id: &str) -> Resp {
        self.api.call(
            "POST",
            &format!("/functions/{id}/invoke"),
            &[("authorization", &format!("Bearer {token}"))],
            Some(("text/plain", b"")),
        )
    }

    /// Ids of the supervised children, in the supervisor's order.
    /// Where the proxy places each tenant (`GET /admin/placements`):
    /// tenant → executor id.
    pub fn placements(&self) -> serde_json::Value {
        let auth = format!("Bearer {}", self.secret("admin-token"));
        self.admin
            .call(
                "GET",
                "/admin/placements",
                &[("authorization", &auth)],
                None,
            )
            .json()["placements"]
            .clone()
    }

    pub fn child_ids(&self) -> Vec<String> {
        self.children().into_iter().map(|(id, _)| id).collect()
    }

    /// Pids of the supervised children.
    pub fn children(&self) -> Vec<(String, u32)> {
        let ls = self.control(serde_json::json!({"op": "ls"}));
        assert_eq!(ls["ok"], true, "{ls}");
        ls["result"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| Some((c["id"].as_str()?.to_string(), c["pid"].as_u64()? as u32)))
            .collect()
    }
}

impl Drop for UpProcess {
    /// Kills the whole fleet at once and waits for it to be gone. Killing
    /// only the supervisor would leave its children a graceful stop, which
    /// writes every tenant's warm state into a folder the test is about to
    /// delete: the folder outlives the test, gigabytes at a time.
    fn drop(&mut self) {
        let fleet = descendants(self.child.id());
        let _ = self.child.kill();
        let _ = self.child.wait();
        if fleet.is_empty() {
            return;
        }
        let pids: Vec<String> = fleet.iter().map(u32::to_string).collect();
        let _ = Command::new("kill")
            .arg("-KILL")
            .args(&pids)
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while fleet.iter().any(|&pid| alive(pid)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Every process below `pid`, read from each process's parent in
/// `/proc/*/stat`.
fn descendants(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let child: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // `pid (comm) state ppid ...`; comm may hold spaces.
            let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?;
            Some((child, ppid.parse().ok()?))
        })
        .collect();
    let mut found = Vec::new();
    let mut next = vec![pid];
    while let Some(parent) = next.pop() {
        for &(child, _) in parents.iter().filter(|&&(_, p)| p == parent) {
            found.push(child);
            next.push(child);
        }
    }
    found
}

/// True while a process with `pid` exists.
pub fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// A `multipart/form-data` body of `(name, content type, bytes)` parts.
pub fn multipart(parts: &[(&str, &str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "tensor-wasm-e2e-boundary-7d1f";
    let mut body = Vec::new();
    for (name, ct, bytes) in parts {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}\"\r\nContent-Type: {ct}\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// Why a raw request got no answer.
#[derive(Debug)]
pub enum RawError {
    /// The connection failed before any byte of the request was written.
    Connect(std::io::Error),
    /// The connection was closed (an end of stream or a reset) before any
    /// byte of an answer arrived.
    Unanswered(String),
    /// Anything else: a time-out, a partial or malformed answer.
    After(String),
}

/// One `POST` of JSON on a fresh connection, `Connection: close`: (status,
/// body).
pub fn raw_post(
    addr: &str,
    path: &str,
    token: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<(u16, Vec<u8>), RawError> {
    let auth = format!("Bearer {token}");
    raw_request(
        addr,
        "POST",
        path,
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        body,
        timeout,
    )
}

/// One request on a fresh connection, `Connection: close`: (status, body).
pub fn raw_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<(u16, Vec<u8>), RawError> {
    use std::io::{ErrorKind, Read, Write};
    let mut s = std::net::TcpStream::connect(addr).map_err(RawError::Connect)?;
    let after = |e: std::io::Error| RawError::After(e.to_string());
    // A closed connection, as opposed to a slow one.
    let closed = |e: &std::io::Error| {
        matches!(
            e.kind(),
            ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::BrokenPipe
                | ErrorKind::UnexpectedEof
        )
    };
    s.set_read_timeout(Some(timeout)).map_err(after)?;
    s.set_nodelay(true).map_err(after)?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    let mut req = head.into_bytes();
    req.extend_from_slice(body);
    match s.write_all(&req) {
        Err(e) if closed(&e) => return Err(RawError::Unanswered(format!("writing: {e}"))),
        r => r.map_err(after)?,
    }
    let mut resp = Vec::new();
    match s.read_to_end(&mut resp) {
        Err(e) if closed(&e) && resp.is_empty() => {
            return Err(RawError::Unanswered(format!("reading: {e}")));
        }
        r => r.map_err(after)?,
    };
    if resp.is_empty() {
        return Err(RawError::Unanswered("closed without an answer".into()));
    }
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| RawError::After(format!("no header end in {} bytes", resp.len())))?;
    let head = String::from_utf8_lossy(&resp[..split]).to_string();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| RawError::After(format!("bad status line: {head}")))?;
    let mut body = resp[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..eol]).trim(), 16)
                .map_err(|e| RawError::After(e.to_string()))?;
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
            rest = &rest[eol + 2 + size + 2..];
        }
        body = out;
    }
    Ok((status, body))
}

/// The nearest-rank percentile of sorted `v`.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// An `etcd` of its own (Debian's `etcd-server`), on loopback ports, in a
/// temporary folder; killed when dropped.
pub struct EtcdProcess {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub client_port: u16,
    peer_port: u16,
    /// Certificate and key: TLS for clients.
    tls: Option<(PathBuf, PathBuf)>,
}

impl EtcdProcess {
    pub fn start() -> EtcdProcess {
        let mut e = EtcdProcess {
            child: None,
            dir: tempfile::tempdir().unwrap(),
            client_port: free_port(),
            peer_port: free_port(),
            tls: None,
        };
        e.run();
        e
    }

    /// `--placement` for proxies sharing this etcd.
    pub fn placement(&self) -> String {
        let scheme = if self.tls.is_some() { "etcds" } else { "etcd" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// Adds `users` (name, password), each with the root role, and turns
    /// authentication on, through etcd's JSON gateway; before TLS.
    pub fn enable_auth(&self, users: &[(&str, &str)]) {
        let api = Api::new(&format!("http://127.0.0.1:{}", self.client_port));
        let mut calls = vec![
            (
                "/v3/auth/user/add",
                serde_json::json!({"name": "root", "password": "root-pw"}),
            ),
            (
                "/v3/auth/user/grant",
                serde_json::json!({"user": "root", "role": "root"}),
            ),
        ];
        for (name, password) in users {
            calls.push((
                "/v3/auth/user/add",
                serde_json::json!({"name": name, "password": password}),
            ));
            calls.push((
                "/v3/auth/user/grant",
                serde_json::json!({"user": name, "role": "root"}),
            ));
        }
        calls.push(("/v3/auth/enable", serde_json::json!({})));
        for (path, body) in calls {
            let body = body.to_string();
            let r = api.call(
                "POST",
                path,
                &[],
                Some(("application/json", body.as_bytes())),
            );
            assert_eq!(r.status, 200, "{path}: {}", r.text());
        }
    }

    /// Starts the server again, serving clients over TLS with `cert` and
    /// `key`.
    pub fn restart_with_tls(&mut self, cert: &Path, key: &Path) {
        self.stop();
        self.tls = Some((cert.to_path_buf(), key.to_path_buf()));
        self.run();
    }

    /// Starts (or starts again) the server on its data and ports, and
    /// waits until it listens.
    pub fn run(&mut self) {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", "e2e", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("e2e={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some((cert, key)) = &self.tls {
            cmd.arg("--cert-file").arg(cert).arg("--key-file").arg(key);
        }
        let child = cmd
            .spawn()
            .expect("etcd (Debian package etcd-server) must be installed");
        self.child = Some(child);
        let addr: std::net::SocketAddr = format!("127.0.0.1:{}", self.client_port).parse().unwrap();
        let start = Instant::now();
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "etcd never listened"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server; its data stays for [`run`](Self::run).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs openssl in `dir`; panics with its stderr on failure.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A private CA (`ca.pem`) and a certificate for 127.0.0.1 that it signs
/// (`cert.pem`, `key.pem`), made in `dir`: (CA, certificate, key).
pub fn test_certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=tensor-wasm test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "key.pem",
            "-out",
            "req.csr",
        ],
    );
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "req.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
            "-out",
            "cert.pem",
        ],
    );
    (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    )
}

/// Clients that call counters without pause, a thread per tenant; each
/// checks that its counts go up by one: every call ran once, on the
/// tenant's one copy.
pub struct CounterLoad {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    failures: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<u32>>,
}

impl CounterLoad {
    /// Starts a client per (token, function id) of `tenants`, whose counts
    /// stand at `from`; `client(token, id)` makes its calls, each
    /// answering the count or why it failed.
    pub fn start<C>(
        tenants: &[(String, String)],
        from: u32,
        client: impl Fn(&str, &str) -> C,
    ) -> CounterLoad
    where
        C: FnMut() -> Result<u32, String> + Send + 'static,
    {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let failures = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let threads = tenants
            .iter()
            .map(|(token, id)| {
                let (stop, failures, token) = (stop.clone(), failures.clone(), token.clone());
                let mut call = client(&token, id);
                std::thread::spawn(move || {
                    let mut n = from;
                    while !stop.load(Ordering::Relaxed) {
                        match call() {
                            Ok(got) => {
                                n += 1;
                                assert_eq!(
                                    got, n,
                                    "{token}: every call ran once, on the tenant's one copy"
                                );
                            }
                            Err(e) => {
                                failures.fetch_add(1, Ordering::Relaxed);
                                eprintln!("{token}: {e}");
                            }
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    n
                })
            })
            .collect();
        CounterLoad {
            stop,
            failures,
            threads,
        }
    }

    /// Stops the clients: each tenant's last count, and the calls that
    /// failed.
    pub fn finish(self) -> (Vec<u32>, usize) {
        use std::sync::atomic::Ordering;
        self.stop.store(true, Ordering::Relaxed);
        let counts = self
            .threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        (counts, self.failures.load(Ordering::Relaxed))
    }
}

/// The last lines of every log in `dir`, for a failure's message.
fn log_tails(dir: &Path) -> String {
    let mut out = String::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        out.push_str(&format!("== {}\n", entry.path().display()));
        for line in &lines[lines.len().saturating_sub(15)..] {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}
