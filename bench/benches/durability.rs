//! Invocation cost of each durability, side by side in one run
//! (`docs/API.md`, "Durability"):
//!
//!     cargo bench -p tensor-wasm-bench --bench durability
//!     DURATION=5 CLIENTS=32 STATE_DIR=/var/lib/x cargo bench -p tensor-wasm-bench --bench durability
//!     WRITES=4096 MODES=none,strict cargo bench -p tensor-wasm-bench --bench durability
//!
//! One tenant per row, on the executor's own invocation path (the registry,
//! its pool, its journal, and the checkpointer pass every 100 ms as the
//! server runs it), driven by CLIENTS concurrent callers (32) for DURATION
//! (5) each. Two functions: one that writes 4 KiB of its memory per call,
//! one that writes 1 MiB, each at a place that moves. For `none`,
//! `periodic` (1 s) and `strict` it prints latency p50 and p99, calls per
//! second, the bytes written to the journal per second, and each against
//! `none`; first
//! the disk's own `fdatasync` p50 (4 KiB written, then synced), the floor
//! under a `strict` call. Each row also prints the CPU time per call
//! (clients, server and journal together, all in this process, and the
//! proxy's process in `proxy` rows) and
//! the calls one journal sync answered. The journal is written under
//! STATE_DIR (a temporary folder by default: put it on the disk you mean
//! to measure). WRITES (bytes per call, comma-separated) and MODES (none,
//! periodic, strict) pick rows; the ratios are to `none`, or to the first
//! row run.
//!
//! Before its first row, each VIA runs one discarded second of `none`: the
//! first row of a process measured up to a third slower than the same row
//! run again (new threads, pages and connections), and a slow `none` row
//! flatters every ratio to it. ROUNDS (1) runs the modes in turn that many
//! times, and then prints the median of each mode's rows and the ratios of
//! those medians: on a noisy machine, compare those. Last, for each VIA
//! with a 4 KiB `none` row, a line judges the targets that the `targets`
//! line states on those medians, and says of each `met` or `missed`.
//!
//! VIA picks how the clients call, comma-separated (all three by
//! default):
//! - `engine`: the registry's invoke, no HTTP. The harshest ratio, every
//!   other cost left out.
//! - `http`: an executor serving on loopback, each client on a keep-alive
//!   connection of its own, in this process. What a client of the
//!   executor sees, the proxy's hop left out.
//! - `proxy`: a `tensor-wasm proxy` process in front of that executor,
//!   each client with the tenant's API token: what a tenant's client sees.
//!   It runs the binary at TENSOR_WASM_BIN, or the `tensor-wasm` beside
//!   this bench's (`cargo build --release -p tensor-wasm` first); where
//!   there is none, its rows are left out, with a line that says so. Its
//!   rows' CPU per call counts the proxy's process too.
//!
//! The HTTP clients run on an async runtime of their own, of
//! CLIENT_THREADS (2) threads, beside the server's, as a client process
//! would: sharing the server's runtime, `none` measured 41k or 62k calls a
//! second from row to row, as the tasks happened to fall on its threads.

// A report for a person: its table is what it prints.
#![allow(clippy::print_stdout)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tensor_wasm_executor::body::RequestBody;
use tensor_wasm_executor::config::{EngineLimits, TenantQuotas};
use tensor_wasm_executor::engine::Runtime;
use tensor_wasm_executor::metrics::Metrics;
use tensor_wasm_executor::registry::{BackendFactory, Registry, Target};
use tensor_wasm_executor::state::Registration;
use tensor_wasm_kernels::{Backend, CpuBackend};
use tensor_wasm_shared::TenantId;
use tensor_wasm_shared::api::{Durability, FunctionConfig};

use common::{HttpCaller, Served, TOKEN, ms, pct};

/// The allocator the executor's binary runs on.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Writes `BYTES` of its memory per call, at a place that moves, and
/// counts its calls in a global.
fn writer(bytes: u32) -> String {
    format!(
        r#"(module
  (memory (export "memory") 256)
  (global $n (mut i32) (i32.const 0))
  (func (export "handle") (result i32)
    (global.set $n (i32.add (global.get $n) (i32.const 1)))
    (memory.fill
      (i32.rem_u (i32.mul (global.get $n) (i32.const {bytes})) (i32.const 16777216))
      (global.get $n)
      (i32.const {bytes}))
    (i32.const 0)))"#
    )
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn limits() -> EngineLimits {
    EngineLimits {
        total_instances: 64,
        ..EngineLimits::default()
    }
}

fn registry(dir: &Path) -> Arc<Registry> {
    let limits = limits();
    let runtime = Runtime::new(limits, None).unwrap();
    let cpu: Arc<dyn Backend> = Arc::new(CpuBackend::default());
    let factory: BackendFactory = Arc::new(move || Ok(cpu.clone()));
    let metrics = Arc::new(Metrics::new("cpu", &[("component", "bench")]));
    Arc::new(Registry::new(
        runtime,
        factory,
        dir.to_path_buf(),
        TenantQuotas::default(),
        metrics,
    ))
}

/// The disk's own `fdatasync` p50: 4 KiB appended, then synced.
fn fdatasync_p50(dir: &Path) -> Duration {
    use std::io::Write;
    let path = dir.join("fdatasync-probe");
    let mut f = std::fs::File::create(&path).unwrap();
    let page = vec![1u8; 4096];
    let mut times = Vec::new();
    for _ in 0..200 {
        let start = Instant::now();
        f.write_all(&page).unwrap();
        f.sync_data().unwrap();
        times.push(start.elapsed());
    }
    let _ = std::fs::remove_file(&path);
    times.sort();
    pct(&times, 0.5)
}

#[derive(Clone, Copy)]
struct Row {
    p50: Duration,
    p99: Duration,
    per_sec: f64,
    journal_per_sec: f64,
    /// CPU time (user and system, every thread: clients, server and
    /// journal, and the proxy's process in `proxy` rows) per call.
    cpu_per_call: Duration,
    /// Calls over journal syncs (infinite where none ran).
    per_sync: f64,
}

/// The CPU time so far of this process, and of `child` if given, user and
/// system, from `/proc/<pid>/stat` (in clock ticks of 10 ms; zero where
/// it cannot be read).
fn cpu_time(child: Option<u32>) -> Duration {
    let own = process_cpu_time("/proc/self/stat");
    match child {
        Some(pid) => own + process_cpu_time(&format!("/proc/{pid}/stat")),
        None => own,
    }
}

fn process_cpu_time(path: &str) -> Duration {
    let Ok(stat) = std::fs::read_to_string(path) else {
        return Duration::ZERO;
    };
    // utime and stime are the 14th and 15th fields of the line, the 12th
    // and 13th after the command's closing parenthesis.
    let ticks: u64 = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|t| t.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// The median of `rows` by `key`.
fn median<T: Copy + PartialOrd>(rows: &[Row], key: impl Fn(&Row) -> T) -> T {
    let mut v: Vec<T> = rows.iter().map(key).collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

/// How the clients call.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    Engine,
    Http,
    Proxy,
}

impl Via {
    fn name(self) -> &'static str {
        match self {
            Via::Engine => "engine",
            Via::Http => "http",
            Via::Proxy => "proxy",
        }
    }
}

/// The `tensor-wasm` binary the `proxy` rows run: TENSOR_WASM_BIN, or the
/// one in the target folder of this bench (`target/release/deps/..`).
fn tensor_wasm_bin() -> Option<PathBuf> {
    let path = match std::env::var_os("TENSOR_WASM_BIN") {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()
            .ok()?
            .parent()?
            .parent()?
            .join("tensor-wasm"),
    };
    path.is_file().then_some(path)
}

/// A `tensor-wasm proxy` process on loopback in front of the executor at
/// `executor`, with the API token `token` for `tenant`; killed on drop.
struct Proxied {
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

impl Proxied {
    fn start(
        bin: &Path,
        dir: &Path,
        executor: std::net::SocketAddr,
        token: &str,
        tenant: &str,
    ) -> Proxied {
        let port = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .unwrap()
        };
        let (addr, admin) = (port(), port());
        std::fs::create_dir_all(dir).unwrap();
        let log = std::fs::File::create(dir.join("proxy.log")).unwrap();
        let child = std::process::Command::new(bin)
            .arg("proxy")
            .args(["--listen", &addr.to_string()])
            .args(["--admin-listen", &admin.to_string()])
            .arg("--state-dir")
            .arg(dir.join("proxy"))
            .args(["--executor", &format!("bench={executor}")])
            .env("TENSOR_WASM_INTERNAL_TOKEN", TOKEN)
            .env(
                "TENSOR_WASM_ADMIN_TOKEN",
                "bench-admin-token-0123456789abcdef",
            )
            .env("TENSOR_WASM_API_TOKENS", format!("{token}:{tenant}"))
            .env("TENSOR_WASM_API_RATE_LIMIT_QPS", "1000000000")
            .env("TENSOR_WASM_API_RATE_LIMIT_BURST", "1000000000")
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let proxied = Proxied { child, addr };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !healthy(addr) {
            assert!(
                Instant::now() < deadline,
                "the proxy never answered /healthz: see {}",
                dir.join("proxy.log").display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        proxied
    }
}

impl Drop for Proxied {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `GET /healthz` at `addr` answers 200.
fn healthy(addr: std::net::SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut answer = String::new();
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: proxy\r\nconnection: close\r\n\r\n")
        .is_ok()
        && s.read_to_string(&mut answer).is_ok()
        && answer.starts_with("HTTP/1.1 200")
}

/// One client's way to the function.
enum Caller {
    Engine(Arc<Registry>, Target),
    Http(HttpCaller, String),
}

impl Caller {
    /// One call, answered 200.
    async fn call(&mut self) {
        match self {
            Caller::Engine(reg, target) => {
                reg.invoke(target, RequestBody::default(), |r, _| Ok(r))
                    .await
                    .unwrap();
            }
            Caller::Http(caller, path) => {
                let (status, body) = caller.post(path, bytes::Bytes::new()).await;
                assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run(
    tokio: &tokio::runtime::Runtime,
    callers: &tokio::runtime::Runtime,
    dir: &Path,
    bytes: u32,
    durability: Durability,
    clients: usize,
    seconds: f64,
    via: Via,
    bin: Option<&Path>,
) -> Row {
    let server = (via != Via::Engine).then(|| {
        Served::start(
            tokio,
            &dir.join("executor"),
            limits(),
            TenantQuotas::default(),
        )
    });
    let reg = match &server {
        Some(s) => s.registry.clone(),
        None => registry(dir),
    };
    let tenant = TenantId::new(format!("w{bytes}-{}", durability.as_str())).unwrap();
    let token = format!("bench-token-{tenant}");
    let proxy = match (via, &server, bin) {
        (Via::Proxy, Some(s), Some(bin)) => {
            Some(Proxied::start(bin, dir, s.addr, &token, tenant.as_str()))
        }
        _ => None,
    };
    let info = reg
        .register(
            &tenant,
            Registration {
                name: "writer".into(),
                wasm: wat::parse_str(writer(bytes)).unwrap(),
                assets: None,
                config: FunctionConfig {
                    durability: Some(durability),
                    ..FunctionConfig::default()
                },
                replace: false,
            },
        )
        .unwrap();
    let target = reg.resolve(&tenant, &info.id).unwrap();
    let addr = server.as_ref().map(|s| s.addr);
    // HTTP clients on their runtime, the server on its own, as a client
    // process and an executor would be.
    let rt = match via {
        Via::Http | Via::Proxy => callers,
        Via::Engine => tokio,
    };
    let child = proxy.as_ref().map(|p| p.child.id());
    let row = rt.block_on(async {
        // The server runs its own checkpointer; the engine rows, one as
        // it runs it.
        let checkpointer = addr.is_none().then(|| {
            let reg = reg.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                loop {
                    tick.tick().await;
                    reg.checkpoint_pass(false).await;
                }
            })
        });
        let mut callers = Vec::new();
        let path = format!("/functions/{}/invoke", info.id);
        for _ in 0..clients {
            callers.push(match (&proxy, addr) {
                (Some(p), _) => {
                    Caller::Http(HttpCaller::connect_with(p.addr, &token).await, path.clone())
                }
                (None, Some(addr)) => Caller::Http(
                    HttpCaller::connect(addr, tenant.as_str()).await,
                    path.clone(),
                ),
                (None, None) => Caller::Engine(reg.clone(), target.clone()),
            });
        }
        // Warm: the instance made and its first full copy written.
        callers[0].call().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let journal = &reg.metrics.journal;
        let before = journal.written_bytes.get();
        let syncs_before = journal.sync_duration.get_sample_count();
        let cpu_before = cpu_time(child);
        let start = Instant::now();
        let end = start + Duration::from_secs_f64(seconds);
        let mut tasks = Vec::new();
        for mut caller in callers {
            tasks.push(tokio::spawn(async move {
                let mut times = Vec::new();
                while Instant::now() < end {
                    let t = Instant::now();
                    caller.call().await;
                    times.push(t.elapsed());
                }
                times
            }));
        }
        let mut times = Vec::new();
        for t in tasks {
            times.extend(t.await.unwrap());
        }
        let elapsed = start.elapsed().as_secs_f64();
        let cpu = cpu_time(child).saturating_sub(cpu_before);
        let syncs = journal
            .sync_duration
            .get_sample_count()
            .saturating_sub(syncs_before);
        if let Some(c) = checkpointer {
            c.abort();
        }
        times.sort();
        Row {
            p50: pct(&times, 0.5),
            p99: pct(&times, 0.99),
            per_sec: times.len() as f64 / elapsed,
            journal_per_sec: journal.written_bytes.get().saturating_sub(before) as f64 / elapsed,
            cpu_per_call: cpu / u32::try_from(times.len().max(1)).unwrap_or(u32::MAX),
            per_sync: times.len() as f64 / syncs as f64,
        }
    });
    drop(proxy);
    if let Some(server) = server {
        server.stop(tokio);
    }
    row
}

/// One row of the table, its ratios to `base`.
fn print_row(via: &str, bytes: u32, mode: &str, row: &Row, base: &Row) {
    println!(
        "{:<13} {:<10} {:<9} {:>9} {:>9} {:>9.0} {:>12.1} {:>11.1} {:>10.1} {:>10.2} {:>10.2}",
        via,
        format!("{} KiB", bytes / 1024),
        mode,
        ms(row.p50),
        ms(row.p99),
        row.per_sec,
        row.journal_per_sec / 1e6,
        row.cpu_per_call.as_secs_f64() * 1e6,
        row.per_sync,
        row.p50.as_secs_f64() / base.p50.as_secs_f64(),
        row.per_sec / base.per_sec,
    );
}

fn main() {
    // `cargo bench` passes `--bench`; this bench takes no arguments.
    let clients = env_or("CLIENTS", 32usize);
    let seconds = env_or("DURATION", 5.0f64);
    let state: PathBuf = std::env::var_os("STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| tempfile::tempdir().unwrap().keep());
    std::fs::create_dir_all(&state).unwrap();
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let callers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(env_or("CLIENT_THREADS", 2usize).max(1))
        .enable_all()
        .build()
        .unwrap();
    let sync = fdatasync_p50(&state);
    println!(
        "durability: {clients} clients, {seconds} s per row, state under {}",
        state.display()
    );
    println!("disk fdatasync p50 (4 KiB): {} ms", ms(sync));
    println!(
        "{:<13} {:<10} {:<9} {:>9} {:>9} {:>9} {:>12} {:>11} {:>10} {:>10} {:>10}",
        "via",
        "writes",
        "mode",
        "p50 ms",
        "p99 ms",
        "calls/s",
        "journal MB/s",
        "CPU µs/call",
        "calls/sync",
        "p50 ×none",
        "tput ×none"
    );
    let sizes: Vec<u32> = std::env::var("WRITES")
        .ok()
        .map(|v| v.split(',').filter_map(|b| b.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![4096, 1 << 20]);
    let bin = tensor_wasm_bin();
    let vias: Vec<Via> = [Via::Engine, Via::Http, Via::Proxy]
        .into_iter()
        .filter(|v| {
            std::env::var("VIA").map_or(true, |want| want.split(',').any(|w| w == v.name()))
        })
        .filter(|&v| {
            let missing = v == Via::Proxy && bin.is_none();
            if missing {
                println!(
                    "proxy rows left out: no tensor-wasm binary (set TENSOR_WASM_BIN, or `cargo build --release -p tensor-wasm`)"
                );
            }
            !missing
        })
        .collect();
    let modes: Vec<Durability> = [Durability::None, Durability::Periodic, Durability::Strict]
        .into_iter()
        .filter(|mode| {
            std::env::var("MODES").map_or(true, |m| m.split(',').any(|m| m == mode.as_str()))
        })
        .collect();
    let rounds = env_or("ROUNDS", 1usize).max(1);
    let mut verdicts = Vec::new();
    for via in vias {
        // Discarded: the process's first row runs slow.
        let warm = state.join(format!("{}-warm", via.name()));
        run(
            &tokio,
            &callers,
            &warm,
            4096,
            Durability::None,
            clients,
            seconds.min(1.0),
            via,
            bin.as_deref(),
        );
        let _ = std::fs::remove_dir_all(&warm);
        for &bytes in &sizes {
            let mut rows: Vec<Vec<Row>> = vec![Vec::new(); modes.len()];
            for _ in 0..rounds {
                for (i, &mode) in modes.iter().enumerate() {
                    let dir = state.join(format!("{}-{bytes}-{}", via.name(), mode.as_str()));
                    let row = run(
                        &tokio,
                        &callers,
                        &dir,
                        bytes,
                        mode,
                        clients,
                        seconds,
                        via,
                        bin.as_deref(),
                    );
                    let _ = std::fs::remove_dir_all(&dir);
                    // This round's first mode's row (`none`'s, unless left
                    // out).
                    let base = match i {
                        0 => row,
                        _ => rows[0].last().copied().unwrap_or(row),
                    };
                    print_row(via.name(), bytes, mode.as_str(), &row, &base);
                    rows[i].push(row);
                }
            }
            // Each mode's median row (its one row, with one round).
            let med: Vec<Row> = rows
                .iter()
                .map(|r| Row {
                    p50: median(r, |r| r.p50),
                    p99: median(r, |r| r.p99),
                    per_sec: median(r, |r| r.per_sec),
                    journal_per_sec: median(r, |r| r.journal_per_sec),
                    cpu_per_call: median(r, |r| r.cpu_per_call),
                    per_sync: median(r, |r| r.per_sync),
                })
                .collect();
            if bytes == 4096
                && let Some(v) = verdict(via.name(), &modes, &med, sync)
            {
                verdicts.push(v);
            }
            if rounds > 1 {
                for (mode, row) in modes.iter().zip(&med) {
                    print_row(
                        &format!("{} median", via.name()),
                        bytes,
                        mode.as_str(),
                        row,
                        &med[0],
                    );
                }
            }
        }
    }
    println!(
        "targets (4 KiB): strict p50 ≤ max(1.5 × none, none + fdatasync p50 = {} ms), strict calls/s ≥ 0.7 × none, periodic p50 ≤ 1.1 × none",
        ms(sync)
    );
    for v in verdicts {
        println!("{v}");
    }
}

/// The 4 KiB targets (the `targets` line) judged on `rows`, one per mode
/// of `modes`, against `none`'s row: one line that says whether each was
/// met. `None` without a `none` row, or with no other mode.
fn verdict(via: &str, modes: &[Durability], rows: &[Row], sync: Duration) -> Option<String> {
    let row = |mode| modes.iter().position(|&m| m == mode).map(|i| rows[i]);
    let said = |met: bool| if met { "met" } else { "missed" };
    let none = row(Durability::None)?;
    let mut parts = Vec::new();
    if let Some(strict) = row(Durability::Strict) {
        let limit = none.p50.mul_f64(1.5).max(none.p50 + sync);
        let tput = strict.per_sec / none.per_sec;
        parts.push(format!(
            "strict p50 {} ms (≤ {} ms: {}), calls/s {tput:.2}× (≥ 0.70×: {})",
            ms(strict.p50),
            ms(limit),
            said(strict.p50 <= limit),
            said(tput >= 0.7)
        ));
    }
    if let Some(periodic) = row(Durability::Periodic) {
        let ratio = periodic.p50.as_secs_f64() / none.p50.as_secs_f64();
        parts.push(format!(
            "periodic p50 {ratio:.2}× (≤ 1.10×: {})",
            said(ratio <= 1.1)
        ));
    }
    if parts.is_empty() {
        return None;
    }
    Some(format!("{via} 4 KiB: {}", parts.join("; ")))
}
