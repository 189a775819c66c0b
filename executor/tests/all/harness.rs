//! `TestExecutor::start()`: a real executor on 127.0.0.1 with a fresh state
//! directory, stopped when dropped.

use std::path::Path;
use std::time::Duration;

use tensor_wasm_executor::config::{EngineLimits, TenantQuotas};
use tensor_wasm_executor::server::{DeviceChoice, Executor, ExecutorConfig};

pub const TOKEN: &str = "internal-test-token";

pub struct TestExecutor {
    pub base: String,
    rt: Option<tokio::runtime::Runtime>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<Result<(), tensor_wasm_executor::server::ServeError>>>,
    _dir: Option<tempfile::TempDir>,
    agent: ureq::Agent,
}

pub fn small_limits() -> EngineLimits {
    EngineLimits {
        total_instances: 16,
        default_deadline: Duration::from_secs(5),
        default_memory_limit: 16 << 20,
        max_memory_limit: 64 << 20,
        ..EngineLimits::default()
    }
}

impl TestExecutor {
    pub fn start() -> TestExecutor {
        let dir = tempfile::tempdir().unwrap();
        let mut t = TestExecutor::start_in(dir.path(), small_limits(), TenantQuotas::default());
        t._dir = Some(dir);
        t
    }

    pub fn start_in(state: &Path, limits: EngineLimits, quotas: TenantQuotas) -> TestExecutor {
        TestExecutor::start_keyed(state, limits, quotas, None)
    }

    pub fn start_keyed(
        state: &Path,
        limits: EngineLimits,
        quotas: TenantQuotas,
        key: Option<&[u8]>,
    ) -> TestExecutor {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let cfg = ExecutorConfig {
            id: "cpu-test".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            state_dir: state.to_path_buf(),
            internal_token: TOKEN.into(),
            device: DeviceChoice::Cpu,
            limits,
            quotas,
            snapshot_key: key.map(<[u8]>::to_vec),
            page_tracking: Default::default(),
            module_cache_dir: None,
        };
        let executor = rt.block_on(Executor::start(cfg, "")).unwrap();
        let addr = executor.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let served = rt.spawn(executor.serve(async move {
            let _ = rx.await;
        }));
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        TestExecutor {
            base: format!("http://{addr}"),
            rt: Some(rt),
            stop: Some(tx),
            served: Some(served),
            _dir: None,
            agent,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn get(&self, tenant: &str, path: &str) -> Reply {
        let r = self
            .agent
            .get(self.url(path))
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("x-tensor-wasm-tenant", tenant)
            .call()
            .unwrap();
        Reply::from(r)
    }

    pub fn delete(&self, tenant: &str, path: &str) -> Reply {
        let r = self
            .agent
            .delete(self.url(path))
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("x-tensor-wasm-tenant", tenant)
            .call()
            .unwrap();
        Reply::from(r)
    }

    pub fn post(&self, tenant: &str, path: &str, content_type: &str, body: &[u8]) -> Reply {
        self.post_with(tenant, path, content_type, body, &[])
    }

    pub fn post_with(
        &self,
        tenant: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut req = self
            .agent
            .post(self.url(path))
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("x-tensor-wasm-tenant", tenant)
            .header("content-type", content_type);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Reply::from(req.send(body).unwrap())
    }

    /// A control-plane call: the internal token and no tenant header.
    pub fn internal(&self, method: &str, path: &str, body: &[u8]) -> Reply {
        let url = self.url(path);
        let auth = format!("Bearer {TOKEN}");
        let r = match method {
            "GET" => self.agent.get(&url).header("authorization", &auth).call(),
            "POST" => self
                .agent
                .post(&url)
                .header("authorization", &auth)
                .header("content-type", "application/octet-stream")
                .send(body),
            "DELETE" => self
                .agent
                .delete(&url)
                .header("authorization", &auth)
                .call(),
            _ => panic!("no internal {method}"),
        };
        Reply::from(r.unwrap())
    }

    /// Registers WAT under `name`; panics unless 201.
    pub fn deploy(&self, tenant: &str, name: &str, wat: &str) -> String {
        let wasm = wat::parse_str(wat).unwrap();
        let r = self.post(
            tenant,
            &format!("/functions?name={name}"),
            "application/wasm",
            &wasm,
        );
        assert_eq!(r.status, 201, "{}", r.text());
        r.json()["id"].as_str().unwrap().to_string()
    }

    /// Registers `wasm` as `name` of `tenant` with the function config
    /// `config` (JSON), as a multipart upload.
    pub fn register_with_config(
        &self,
        tenant: &str,
        name: &str,
        wasm: &[u8],
        config: &str,
    ) -> Reply {
        let mut body = Vec::new();
        body.extend_from_slice(b"--XX\r\nContent-Disposition: form-data; name=\"module\"\r\n\r\n");
        body.extend_from_slice(wasm);
        body.extend_from_slice(
            b"\r\n--XX\r\nContent-Disposition: form-data; name=\"config\"\r\n\r\n",
        );
        body.extend_from_slice(config.as_bytes());
        body.extend_from_slice(b"\r\n--XX--\r\n");
        self.post(
            tenant,
            &format!("/functions?name={name}"),
            "multipart/form-data; boundary=XX",
            &body,
        )
    }

    /// The executor's Prometheus text.
    pub fn metrics_text(&self) -> String {
        self.agent
            .get(self.url("/metrics"))
            .call()
            .unwrap()
            .into_body()
            .read_to_string()
            .unwrap()
    }

    /// The metric `name` (with its labels, as `/metrics` writes them:
    /// `name{label="value"}`).
    pub fn metric(&self, name: &str) -> f64 {
        self.metric_opt(name)
            .unwrap_or_else(|| panic!("no metric {name} in:\n{}", self.metrics_text()))
    }

    fn metric_opt(&self, name: &str) -> Option<f64> {
        self.metrics_text()
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    /// Polls until the metric `name` reads `value` (at most 30 s); one not
    /// written yet reads 0.
    pub fn wait_metric(&self, name: &str, value: f64) {
        let start = std::time::Instant::now();
        loop {
            let now = self.metric_opt(name).unwrap_or(0.0);
            if now == value {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{name} stays {now}, not {value}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn raw_agent(&self) -> &ureq::Agent {
        &self.agent
    }
}

impl Drop for TestExecutor {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(rt) = self.rt.take() {
            // A graceful stop: the server finishes and writes warm state.
            if let Some(served) = self.served.take() {
                let _ = rt.block_on(async {
                    tokio::time::timeout(Duration::from_secs(30), served).await
                });
            }
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

/// A response, read whole.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl From<ureq::http::Response<ureq::Body>> for Reply {
    fn from(mut r: ureq::http::Response<ureq::Body>) -> Self {
        let headers = r
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let status = r.status().as_u16();
        let body = r
            .body_mut()
            .with_config()
            .limit(256 << 20)
            .read_to_vec()
            .unwrap();
        Reply {
            status,
            headers,
            body,
        }
    }
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The error code of a JSON error body.
    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

/// A JSON invoke body with f32 inputs.
pub fn f32_inputs(inputs: &[(&str, &[u64], &[f32])]) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    for (name, shape, data) in inputs {
        map.insert(
            name.to_string(),
            serde_json::json!({"dtype": "f32", "shape": shape, "data": data}),
        );
    }
    serde_json::to_vec(&serde_json::json!({ "inputs": map })).unwrap()
}

/// The f32 data of a JSON output.
pub fn f32_output(reply: &Reply, name: &str) -> Vec<f32> {
    let v = reply.json();
    v["outputs"][name]["data"]
        .as_array()
        .unwrap_or_else(|| panic!("no output {name}: {}", reply.text()))
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// A multipart/form-data body with boundary `XX`.
pub fn multipart(parts: &[(&str, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, data) in parts {
        body.extend_from_slice(
            format!("--XX\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"--XX--\r\n");
    body
}
