//! One tenant must not hurt another (`SECURITY.md`, "Tenants and each
//! other"): shares of an executor, tested against real executor processes.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::{
    ExecutorProcess, ProxyOptions, TOKEN, TestFleet, executor_ids, hog_and_quick, job_of,
    submit_job, wait_job_of,
};

/// Holding the admin token does not yield the internal token: an address
/// registered through the admin API gets an identity challenge without
/// any credential, and one that cannot answer it is refused, not
/// registered. A registered id is not re-addressed.
#[test]
fn an_address_that_cannot_prove_it_is_an_executor_never_receives_the_internal_token() {
    let fleet = TestFleet::start(1, ProxyOptions::default());
    // Whoever listens here answers every request like an executor would,
    // and keeps all it was sent.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    listener.set_nonblocking(true).unwrap();
    let seen = Arc::new(Mutex::new(Vec::<u8>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let taker = {
        let (seen, stop) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            let until = Instant::now() + Duration::from_secs(60);
            while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                let Ok((mut conn, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                conn.set_nonblocking(false).unwrap();
                conn.set_read_timeout(Some(Duration::from_millis(300)))
                    .unwrap();
                let mut buf = [0u8; 4096];
                let mut got = Vec::new();
                while let Ok(n @ 1..) = conn.read(&mut buf) {
                    got.extend_from_slice(&buf[..n]);
                    if got.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                seen.lock().unwrap().extend_from_slice(&got);
                let body = format!(r#"{{"id":"evil","proof":"{}"}}"#, "ab".repeat(32));
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        })
    };
    let register = |id: &str, at: &str| {
        let body = serde_json::json!({"id": id, "addr": at}).to_string();
        fleet.proxy.admin(
            "POST",
            "/admin/executors",
            Some(("application/json", body.as_bytes())),
        )
    };
    let r = register("evil", &addr);
    assert_eq!(
        (r.status, r.code().as_str()),
        (502, "executor_unverified"),
        "{}",
        r.text()
    );
    // A registered id is never moved to another address.
    let r = register("cpu0", &addr);
    assert_eq!(
        (r.status, r.code().as_str()),
        (409, "executor_exists"),
        "{}",
        r.text()
    );
    stop.store(true, Ordering::Relaxed);
    taker.join().unwrap();
    let seen = String::from_utf8_lossy(&seen.lock().unwrap()).to_string();
    assert!(seen.contains("POST /internal/identity"), "{seen}");
    assert!(!seen.contains(TOKEN), "the internal token was sent: {seen}");
    let list = fleet.proxy.admin("GET", "/admin/executors", None).json();
    assert_eq!(executor_ids(&list), ["cpu0"]);
    assert_eq!(list["executors"][0]["addr"], fleet.executor("cpu0").addr);
}

/// A tenant's slow jobs take at most its share of the executor's job
/// slots: another tenant's job runs, and finishes, while they spin.
#[test]
fn one_tenants_slow_jobs_leave_job_slots_to_others() {
    let dir = tempfile::tempdir().unwrap();
    let ex = ExecutorProcess::start_with(
        "cpu-shares",
        dir.path(),
        &["--job-concurrency", "2", "--tenant-running-jobs", "1"],
    );
    // Two instances: its own pool would let two of its jobs run at once,
    // taking both of the executor's job slots, but for its cap.
    let (hog, quick) = hog_and_quick(&ex, r#"{"deadline_ms": 20000, "max_instances": 2}"#);
    let hogs: Vec<String> = (0..3).map(|_| submit_job(&ex, "hog", &hog, 1)).collect();
    wait_job_of(&ex, "hog", &hogs[0], "running");
    let mine = submit_job(&ex, "quick", &quick, 0);
    wait_job_of(&ex, "quick", &mine, "succeeded");
    let statuses: Vec<String> = hogs
        .iter()
        .map(|h| {
            job_of(&ex, "hog", h)["status"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    // None of the spinners has reached its deadline: the other tenant's
    // job did not wait for one of them to end.
    assert_eq!(
        statuses.iter().filter(|s| *s == "running").count(),
        1,
        "one at a time: {statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| *s == "pending").count(),
        2,
        "{statuses:?}"
    );
}

/// The proxy's public address, `host:port`.
fn public_addr(fleet: &TestFleet) -> String {
    fleet
        .proxy
        .api
        .base
        .trim_start_matches("http://")
        .to_string()
}

/// Reads until the proxy closes the connection (or `within` passes):
/// whether it closed, and what it sent.
fn read_to_close(conn: &mut TcpStream, within: Duration) -> (bool, String) {
    conn.set_read_timeout(Some(within)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match conn.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    (closed, String::from_utf8_lossy(&got).into_owned())
}

fn slow_client_fleet(extra: &[&str]) -> TestFleet {
    TestFleet::start(
        1,
        ProxyOptions {
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            ..ProxyOptions::default()
        },
    )
}

/// A client that sends its header a byte at a time (slowloris) loses its
/// connection once the header has taken the header timeout, however
/// steadily it trickles; a kept-alive connection left idle is closed at the
/// idle timeout. pingora alone bounds only each read, and keeps idle
/// connections for ever.
#[test]
fn slow_headers_and_idle_connections_are_closed() {
    let fleet = slow_client_fleet(&[
        "--client-header-timeout-ms",
        "400",
        "--client-idle-timeout-ms",
        "400",
    ]);
    let addr = public_addr(&fleet);

    // Slowloris: 600 header bytes at one per 20 ms would take 12 s, and
    // each read is quick; the proxy closes the connection before the end.
    let mut conn = TcpStream::connect(&addr).unwrap();
    conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        .unwrap();
    let mut sent = 0;
    let cut = loop {
        if sent == 600 {
            break false;
        }
        if conn.write_all(b"x").is_err() {
            break true;
        }
        sent += 1;
        std::thread::sleep(Duration::from_millis(20));
        // The proxy's close shows on a read before a write fails.
        conn.set_nonblocking(true).unwrap();
        let mut b = [0u8; 64];
        let gone = matches!(conn.read(&mut b), Ok(0))
            || matches!(conn.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset);
        conn.set_nonblocking(false).unwrap();
        if gone {
            break true;
        }
    };
    assert!(cut, "the trickled header was still open after {sent} bytes");

    // A whole request is answered, and the connection then stays open only
    // for the idle timeout.
    let mut conn = TcpStream::connect(&addr).unwrap();
    conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let (closed, got) = read_to_close(&mut conn, Duration::from_secs(30));
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(closed, "an idle kept-alive connection was never closed");

    let metrics = fleet.proxy.api.call("GET", "/metrics", &[], None).text();
    for phase in ["header", "idle"] {
        let line = format!("tensor_wasm_connections_timed_out_total{{phase=\"{phase}\"}}");
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with(&line) && !l.ends_with(" 0")),
            "{line}: {metrics}"
        );
    }
}

/// A request whose header came in time may take longer than the header
/// timeout to send its body: only the header is timed.
#[test]
fn a_slow_body_after_a_prompt_header_is_not_cut() {
    let fleet = slow_client_fleet(&["--client-header-timeout-ms", "300"]);
    let id = fleet.deploy_counter("tok-acme");
    let mut conn = TcpStream::connect(public_addr(&fleet)).unwrap();
    write!(
        conn,
        "POST /functions/{id}/invoke HTTP/1.1\r\nhost: x\r\nauthorization: Bearer tok-acme\r\ncontent-type: text/plain\r\ncontent-length: 2\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(900));
    conn.write_all(b"hi").unwrap();
    let (_, got) = read_to_close(&mut conn, Duration::from_secs(30));
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
}

/// A connection to `addr` from the loopback address `from` (any
/// 127.x.y.z is this host's), so that a test is one client of its own.
fn connect_from(from: &str, addr: &str) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let from: std::net::SocketAddr = format!("{from}:0").parse().unwrap();
    s.bind(&from.into()).unwrap();
    let to: std::net::SocketAddr = addr.parse().unwrap();
    s.connect(&to.into()).unwrap();
    s.into()
}

/// A request on `conn` for `/healthz` is answered 200.
fn healthz_on(conn: &mut TcpStream) {
    conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut b = [0u8; 256];
    let n = conn.read(&mut b).unwrap();
    assert!(
        b[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&b[..n])
    );
}

/// One address may hold only its share of the proxy's connections: the
/// next gets 503 `capacity_exhausted` at once, and a slot that closes is
/// free again. Other addresses are not affected.
#[test]
fn one_client_holds_at_most_its_connections() {
    let fleet = slow_client_fleet(&["--max-connections-per-client", "3"]);
    let addr = public_addr(&fleet);
    let client = "127.0.0.2";
    let mut held: Vec<TcpStream> = (0..3).map(|_| connect_from(client, &addr)).collect();
    // A request on each shows the proxy has counted it.
    for conn in &mut held {
        healthz_on(conn);
    }
    let mut over = connect_from(client, &addr);
    let (closed, got) = read_to_close(&mut over, Duration::from_secs(30));
    assert!(closed);
    assert!(got.starts_with("HTTP/1.1 503"), "{got}");
    assert!(got.contains("capacity_exhausted"), "{got}");
    // Another address is served meanwhile.
    healthz_on(&mut connect_from("127.0.0.3", &addr));
    // The freed slot is taken again once the proxy has seen the close.
    drop(held.pop());
    let start = Instant::now();
    loop {
        let mut conn = connect_from(client, &addr);
        let (_, got) = {
            conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .unwrap();
            read_to_close(&mut conn, Duration::from_secs(30))
        };
        if got.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(got.starts_with("HTTP/1.1 503"), "{got}");
        assert!(start.elapsed() < Duration::from_secs(30), "never freed");
        std::thread::sleep(Duration::from_millis(20));
    }
    let metrics = fleet.proxy.api.call("GET", "/metrics", &[], None).text();
    assert!(
        metrics.contains("tensor_wasm_connections_refused_total{reason=\"per_client\"}"),
        "{metrics}"
    );
}

/// Threads of process `pid` that the kernel schedules as `SCHED_IDLE`
/// (policy 5, the 41st field of `/proc/<pid>/task/<tid>/stat`), by name.
fn idle_threads(pid: u32) -> Vec<String> {
    let mut idle = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return idle;
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        // The name is in parentheses and may hold spaces; fields follow.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let name = head.split_once('(').map_or("", |(_, n)| n).to_string();
        // `rest` starts at field 3 (state): policy, field 41, is its 39th.
        if rest.split_whitespace().nth(38) == Some("5") {
            idle.push(name);
        }
    }
    idle
}

/// A tenant that keeps more than its share of the cores busy runs in the
/// background: while another tenant calls, the first one's guests run on
/// threads the kernel schedules only when nobody else wants a core
/// (`SCHED_IDLE`), including a guest that was running already when the
/// other tenant came; the other tenant's calls keep being answered.
#[test]
fn a_tenant_over_its_share_of_the_cores_runs_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let ex = ExecutorProcess::start_with(
        "cpu-fair",
        dir.path(),
        &["--tenant-running-invocations", "2"],
    );
    let (hog, quick) = hog_and_quick(&ex, r#"{"deadline_ms": 1500, "max_instances": 2}"#);
    let pid = ex.child.id();
    assert!(idle_threads(pid).is_empty(), "{:?}", idle_threads(pid));
    let stop = AtomicBool::new(false);
    let seen = std::thread::scope(|s| {
        // The hog spins on two instances, again and again.
        for _ in 0..2 {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let (status, _) = ex.request(
                        "POST",
                        &format!("/functions/{hog}/invoke"),
                        Some("hog"),
                        "application/octet-stream",
                        &[1],
                    );
                    assert_eq!(status, 504);
                }
            });
        }
        let start = Instant::now();
        let seen = loop {
            let (status, body) = ex.request(
                "POST",
                &format!("/functions/{quick}/invoke"),
                Some("quick"),
                "application/octet-stream",
                &[0],
            );
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
            let idle = idle_threads(pid);
            if !idle.is_empty() || start.elapsed() > Duration::from_secs(30) {
                break idle;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        stop.store(true, Ordering::Relaxed);
        seen
    });
    assert!(
        seen.iter()
            .any(|n| n.starts_with("tw-guest") || n.starts_with("tw-background")),
        "no guest ran in the background: {seen:?}"
    );
    // Operators see it too.
    let (_, metrics) = ex.request("GET", "/metrics", None, "", b"");
    let metrics = String::from_utf8_lossy(&metrics).into_owned();
    let counted: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("tensor_wasm_background_guests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(counted > 0, "{metrics}");
}

/// A client that goes away from the proxy cancels its invocation on the
/// executor: the proxy drops its upstream request, the executor's request
/// ends, and a guest that takes cancellation (guest ABI v2) stops at once
/// and keeps its warm state, instead of working to its deadline.
#[test]
fn a_client_that_leaves_the_proxy_cancels_its_guest() {
    let fleet = TestFleet::start(1, ProxyOptions::default());
    let wasm = wat::parse_str(include_str!("../../../examples/wat/cancellable.wat")).unwrap();
    let (ct, body) = crate::harness::multipart(&[
        ("module", "application/wasm", &wasm),
        ("config", "application/json", br#"{"deadline_ms": 60000}"#),
    ]);
    let r = fleet.proxy.call(
        "tok-acme",
        "POST",
        "/functions?name=cancellable",
        Some((&ct, &body)),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let ex = fleet.executor("cpu0");
    let zeros = || {
        let (_, m) = ex.request("GET", "/metrics", None, "", b"");
        String::from_utf8_lossy(&m)
            .lines()
            .filter(|l| {
                l.starts_with("tensor_wasm_kernel_dispatches_total{") && l.contains("op=\"zeros\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let mut conn = TcpStream::connect(public_addr(&fleet)).unwrap();
    write!(
        conn,
        "POST /functions/{id}/invoke HTTP/1.1\r\nhost: x\r\nauthorization: Bearer tok-acme\r\ncontent-type: application/octet-stream\r\ncontent-length: 1\r\n\r\n\x01"
    )
    .unwrap();
    let start = Instant::now();
    while zeros() == 0.0 {
        assert!(start.elapsed() < Duration::from_secs(30), "never ran");
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(conn);
    // The next call waits for the instance, which the cancelled guest
    // gives back as soon as it stops.
    let r = fleet.proxy.call(
        "tok-acme",
        "POST",
        &format!("/functions/{id}/invoke"),
        Some(("application/octet-stream", &[0])),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let b = r.body;
    assert_eq!(
        u32::from_le_bytes(b[0..4].try_into().unwrap()),
        1,
        "cancellations seen"
    );
    assert_eq!(i32::from_le_bytes(b[4..8].try_into().unwrap()), -9);
    // The proxy records the request its client left as unanswered (0,
    // `docs/AUDIT-LOG.md`), not as a failure of the fleet.
    let m = fleet.proxy.api.call("GET", "/metrics", &[], None).text();
    assert!(
        m.contains(
            r#"tensor_wasm_http_requests_total{method="POST",route="/functions/{id}/invoke",status="000"} 1"#
        ),
        "{m}"
    );
}
