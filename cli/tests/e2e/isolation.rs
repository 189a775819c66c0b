//! One tenant must not hurt another (`SECURITY.md`, "Tenants and each
//! other"): shares of an executor, tested against real executor processes.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::{
    ExecutorProcess, ProxyOptions, SPINNER, TOKEN, TestFleet, job_of, register_on, submit_job,
    wait_job_of,
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
    let ids: Vec<&str> = list["executors"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["id"].as_str())
        .collect();
    assert_eq!(ids, ["cpu0"]);
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
    let spinner = wat::parse_str(SPINNER).unwrap();
    // Two instances: its own pool would let two of its jobs run at once,
    // taking both of the executor's job slots, but for its cap.
    let hog = register_on(
        &ex,
        "hog",
        "spinner",
        &spinner,
        r#"{"deadline_ms": 20000, "max_instances": 2}"#,
    );
    let quick = register_on(&ex, "quick", "spinner", &spinner, "{}");
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
