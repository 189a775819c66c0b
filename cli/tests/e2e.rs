//! End to end with real processes: `tensor-wasm executor` started from the
//! binary this test build made, on loopback ports, stopped by the test.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "e2e-internal-token";

/// A `tensor-wasm executor` child process, killed when dropped.
struct ExecutorProcess {
    child: Child,
    base: String,
    agent: ureq::Agent,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl ExecutorProcess {
    fn start(id: &str, state: &Path) -> ExecutorProcess {
        let port = free_port();
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
            .env("TENSOR_WASM_INTERNAL_TOKEN", TOKEN)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Wait for the "executor ready" line.
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("executor ready") {
                    let _ = tx.send(());
                }
            }
        });
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
            agent,
        }
    }

    fn request(
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
    fn stop(mut self) {
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
const COUNTER: &str = r#"(module
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

fn counter_call(ex: &ExecutorProcess, id: &str) -> (u32, Vec<f32>) {
    let (status, body) = ex.request(
        "POST",
        &format!("/functions/{id}/invoke"),
        Some("acme"),
        "text/plain",
        b"",
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let n = u32::from_le_bytes(body[..4].try_into().unwrap());
    let sum = body[4..]
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (n, sum)
}

#[test]
fn a_tenant_moves_between_executor_processes() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = ExecutorProcess::start("cpu-a", da.path());
    let b = ExecutorProcess::start("cpu-b", db.path());
    let wasm = wat::parse_str(COUNTER).unwrap();
    let (status, body) = a.request(
        "POST",
        "/functions?name=counter",
        Some("acme"),
        "application/wasm",
        &wasm,
    );
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    let info: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let id = info["id"].as_str().unwrap().to_string();
    assert_eq!(counter_call(&a, &id), (1, vec![1.0; 4]));
    assert_eq!(counter_call(&a, &id), (2, vec![2.0; 4]));

    let (status, snapshot) = a.request(
        "POST",
        "/internal/tenants/acme/export",
        None,
        "application/octet-stream",
        b"",
    );
    assert_eq!(status, 200);
    let (status, body) = b.request(
        "POST",
        "/internal/tenants/acme/import",
        None,
        "application/octet-stream",
        &snapshot,
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        counter_call(&b, &id),
        (3, vec![3.0; 4]),
        "state and device tensor continue"
    );

    // A corrupted copy is refused by a third process, which stays empty.
    let dc = tempfile::tempdir().unwrap();
    let c = ExecutorProcess::start("cpu-c", dc.path());
    let mut bad = snapshot.clone();
    let n = bad.len();
    bad[n / 2] ^= 1;
    let (status, body) = c.request(
        "POST",
        "/internal/tenants/acme/import",
        None,
        "application/octet-stream",
        &bad,
    );
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("checksum"));
    let (_, list) = c.request("GET", "/functions", Some("acme"), "", b"");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&list).unwrap()["functions"],
        serde_json::json!([])
    );
}

#[test]
fn warm_state_survives_a_graceful_restart_of_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let ex = ExecutorProcess::start("cpu-r", dir.path());
    let wasm = wat::parse_str(COUNTER).unwrap();
    let (status, body) = ex.request(
        "POST",
        "/functions?name=counter",
        Some("acme"),
        "application/wasm",
        &wasm,
    );
    assert_eq!(status, 201);
    let id = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    counter_call(&ex, &id);
    counter_call(&ex, &id);
    ex.stop();
    let ex = ExecutorProcess::start("cpu-r", dir.path());
    assert_eq!(counter_call(&ex, &id), (3, vec![3.0; 4]));
}

#[test]
fn version_names_the_build() {
    let out = Command::new(env!("CARGO_BIN_EXE_tensor-wasm"))
        .arg("--version")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains(env!("CARGO_PKG_VERSION")) && text.contains("rustc"),
        "{text}"
    );
}

#[test]
fn an_executor_without_a_token_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tensor-wasm"))
        .args([
            "executor",
            "--device",
            "cpu",
            "--listen",
            "127.0.0.1:0",
            "--internal-token",
            "",
        ])
        .arg("--state-dir")
        .arg(dir.path())
        .env_remove("TENSOR_WASM_INTERNAL_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("TENSOR_WASM_INTERNAL_TOKEN"));
}
