//! What one tenant's abuse costs another on the same executor
//! (`SECURITY.md`, "Tenants and each other"), side by side in one run:
//!
//!     cargo bench -p tensor-wasm-bench --bench noisy_neighbour
//!     DURATION=5 CLIENTS=4 cargo bench -p tensor-wasm-bench --bench noisy_neighbour
//!
//! Tenant B's function (a 64×64 matmul, its answer a few bytes) is called
//! by CLIENTS (4) closed-loop clients for DURATION (3 s) per row, over
//! keep-alive HTTP to an executor serving on loopback in this process, as
//! the proxy calls it. Each row prints B's p50, p99 and calls per second,
//! and its p99 against the `alone` row, while tenant A, on the same
//! executor, does one thing:
//!
//! - `alone`: nothing (again last, to show drift);
//! - `cpu-ops`: 2048³ matmuls back to back from 4 clients, on 4 instances
//!   (seconds of the cores each);
//! - `spinners`: invocations that spin to their 500 ms deadline, from 80
//!   clients: its 16 instances busy and its queue full;
//! - `jobs`: 64 async jobs that spin to their deadline (cancelled after);
//! - `slow-bodies`: 200 connections each sending a 1 MiB body a byte every
//!   100 ms.
//!
//! The executor runs as `tensor-wasm executor` does: each tenant runs at
//! most as many invocations at once as the machine has cores
//! (`--tenant-running-invocations`); RUNNING sets another quota.
//!
//! The target (`SECURITY.md`): B's p99 within 3× of its `alone` figure
//! under every abuse on a CPU executor.

// A report for a person: its table is what it prints.
#![allow(clippy::print_stdout)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tensor_wasm_executor::config::{EngineLimits, TenantQuotas};
use tensor_wasm_executor::state::Registration;
use tensor_wasm_shared::TenantId;
use tensor_wasm_shared::api::FunctionConfig;
use tokio::io::AsyncWriteExt;

use common::{HttpCaller, Served, ms, pct};

/// A matmul of two `n`×`n` zeros; answers 4 bytes.
fn matmul(n: u32) -> String {
    let d = n.to_le_bytes();
    let dims: String = d
        .iter()
        .chain(d.iter())
        .map(|b| format!("\\{b:02x}"))
        .collect();
    format!(
        r#"(module
  (import "tensor" "zeros" (func $zeros (param i32 i32 i32) (result i32)))
  (import "tensor" "matmul" (func $matmul (param i32 i32) (result i32)))
  (import "tensor" "free" (func $free (param i32) (result i32)))
  (import "tensor" "output_write" (func $output_write (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "{dims}")
  (func (export "handle") (result i32)
    (local $t i32)
    (local.set $t (call $zeros (i32.const 0) (i32.const 0) (i32.const 2)))
    (drop (call $free (call $matmul (local.get $t) (local.get $t))))
    (drop (call $free (local.get $t)))
    (drop (call $output_write (i32.const 0) (i32.const 4)))
    (i32.const 0)))"#
    )
}

/// Spins until its deadline.
const SPINNER: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "handle") (result i32)
    (loop $spin (br $spin))
    (i32.const 0)))"#;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Registers `wat` as `name` of `tenant` with `config`; its invoke path.
fn register(
    served: &Served,
    tenant: &str,
    name: &str,
    wat: &str,
    config: FunctionConfig,
) -> String {
    let info = served
        .registry
        .register(
            &TenantId::new(tenant).unwrap(),
            Registration {
                name: name.into(),
                wasm: wat::parse_str(wat).unwrap(),
                assets: None,
                config,
                replace: false,
            },
        )
        .unwrap();
    format!("/functions/{}", info.id)
}

/// What tenant A does during a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Abuse {
    Alone,
    CpuOps,
    Spinners,
    Jobs,
    SlowBodies,
}

impl Abuse {
    fn name(self) -> &'static str {
        match self {
            Abuse::Alone => "alone",
            Abuse::CpuOps => "cpu-ops",
            Abuse::Spinners => "spinners",
            Abuse::Jobs => "jobs",
            Abuse::SlowBodies => "slow-bodies",
        }
    }
}

struct Paths {
    victim: String,
    heavy: String,
    spinner: String,
}

/// Starts `abuse` from tenant A; it runs until `stop` is set. Returns the
/// tasks to wait for.
async fn start_abuse(
    abuse: Abuse,
    addr: std::net::SocketAddr,
    paths: &Paths,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    let (clients, path) = match abuse {
        Abuse::Alone => return tasks,
        Abuse::CpuOps => (4, format!("{}/invoke", paths.heavy)),
        Abuse::Spinners => (80, format!("{}/invoke", paths.spinner)),
        Abuse::Jobs => {
            let mut jobs = Vec::new();
            for _ in 0..64 {
                let mut a = HttpCaller::connect(addr, "a").await;
                let (status, body) = a
                    .post(
                        &format!("{}/invoke-async", paths.spinner),
                        bytes::Bytes::new(),
                    )
                    .await;
                assert_eq!(status, 202, "{}", String::from_utf8_lossy(&body));
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                jobs.push(v["job_id"].as_str().unwrap().to_string());
            }
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                // Those still pending go; the running end at their deadline.
                for j in jobs {
                    let mut a = HttpCaller::connect(addr, "a").await;
                    let path = format!("/jobs/{j}");
                    let _ = a
                        .send(hyper::Method::DELETE, &path, bytes::Bytes::new())
                        .await;
                }
            }));
            return tasks;
        }
        Abuse::SlowBodies => {
            for _ in 0..200 {
                let stop = stop.clone();
                let path = format!("{}/invoke", paths.spinner);
                tasks.push(tokio::spawn(async move {
                    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
                        return;
                    };
                    let head = format!(
                        "POST {path} HTTP/1.1\r\nhost: executor\r\nauthorization: Bearer {}\r\nx-tensor-wasm-tenant: a\r\ncontent-type: application/octet-stream\r\ncontent-length: 1048576\r\n\r\n",
                        common::TOKEN
                    );
                    if s.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    while !stop.load(Ordering::Relaxed) {
                        if s.write_all(b"x").await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }));
            }
            return tasks;
        }
    };
    for _ in 0..clients {
        let stop = stop.clone();
        let path = path.clone();
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                // Refused (503), cut off (504) or answered: it calls
                // again, on a new connection if this one went.
                let mut a = HttpCaller::connect(addr, "a").await;
                while !stop.load(Ordering::Relaxed)
                    && a.send(hyper::Method::POST, &path, bytes::Bytes::new())
                        .await
                        .is_ok()
                {}
            }
        }));
    }
    tasks
}

struct Row {
    p50: Duration,
    p99: Duration,
    per_sec: f64,
}

/// B's clients for `seconds` while A does `abuse`.
fn row(
    tokio: &tokio::runtime::Runtime,
    addr: std::net::SocketAddr,
    paths: &Paths,
    abuse: Abuse,
    clients: usize,
    seconds: f64,
) -> Row {
    tokio.block_on(async {
        let stop = Arc::new(AtomicBool::new(false));
        let abusers = start_abuse(abuse, addr, paths, stop.clone()).await;
        // Let the abuse take hold.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let end = Instant::now() + Duration::from_secs_f64(seconds);
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let path = format!("{}/invoke", paths.victim);
            tasks.push(tokio::spawn(async move {
                let mut b = HttpCaller::connect(addr, "b").await;
                let mut times = Vec::new();
                while Instant::now() < end {
                    let t = Instant::now();
                    let (status, body) = b.post(&path, bytes::Bytes::new()).await;
                    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
                    times.push(t.elapsed());
                }
                times
            }));
        }
        let start = Instant::now();
        let mut times = Vec::new();
        for t in tasks {
            times.extend(t.await.unwrap());
        }
        let elapsed = start.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        for a in abusers {
            let _ = a.await;
        }
        // What A left running (spinners, jobs) ends at its deadline.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        times.sort();
        Row {
            p50: pct(&times, 0.5),
            p99: pct(&times, 0.99),
            per_sec: times.len() as f64 / elapsed,
        }
    })
}

fn main() {
    // `cargo bench` passes `--bench`; this bench takes no arguments.
    let clients = env_or("CLIENTS", 4usize);
    let seconds = env_or("DURATION", 3.0f64);
    let dir = tempfile::tempdir().unwrap();
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let limits = EngineLimits {
        total_instances: 64,
        ..EngineLimits::default()
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let running = env_or("RUNNING", cores);
    let quotas = TenantQuotas {
        running_invocations: running,
        ..TenantQuotas::default()
    };
    let served = Served::start(&tokio, dir.path(), limits, quotas);
    let spin = FunctionConfig {
        deadline_ms: Some(500),
        max_instances: Some(16),
        ..FunctionConfig::default()
    };
    let paths = Paths {
        victim: register(
            &served,
            "b",
            "victim",
            &matmul(64),
            FunctionConfig::default(),
        ),
        heavy: register(
            &served,
            "a",
            "heavy",
            &matmul(2048),
            FunctionConfig {
                max_instances: Some(4),
                ..FunctionConfig::default()
            },
        ),
        spinner: register(&served, "a", "spinner", SPINNER, spin),
    };
    println!(
        "noisy neighbour: tenant B, {clients} clients, {seconds} s per row; {cores} cores; {running} running invocations per tenant"
    );
    println!(
        "{:<12} {:>9} {:>9} {:>9} {:>10}",
        "A does", "p50 ms", "p99 ms", "calls/s", "p99 ×alone"
    );
    let mut alone: Option<Duration> = None;
    for abuse in [
        Abuse::Alone,
        Abuse::CpuOps,
        Abuse::Spinners,
        Abuse::Jobs,
        Abuse::SlowBodies,
        Abuse::Alone,
    ] {
        let r = row(&tokio, served.addr, &paths, abuse, clients, seconds);
        let base = *alone.get_or_insert(r.p99);
        println!(
            "{:<12} {:>9} {:>9} {:>9.0} {:>10.2}",
            abuse.name(),
            ms(r.p50),
            ms(r.p99),
            r.per_sec,
            r.p99.as_secs_f64() / base.as_secs_f64()
        );
    }
    println!("target: B's p99 within 3× of alone under every abuse (CPU executor)");
    served.stop(&tokio);
}
