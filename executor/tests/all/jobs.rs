//! Async jobs: submit, poll, list, cancel, isolation.

use std::time::{Duration, Instant};

use tensor_wasm_executor::config::{EngineLimits, TenantQuotas};

use crate::harness::{Reply, TestExecutor, f32_inputs, small_limits};

/// y = x · 3; with a raw body of "spin", loops until its deadline.
const TRIPLE: &str = r#"(module
  (import "tensor" "input" (func $input (param i32 i32) (result i32)))
  (import "tensor" "scalar" (func $scalar (param i32 i32 f32) (result i32)))
  (import "tensor" "output" (func $output (param i32 i32 i32) (result i32)))
  (import "tensor" "input_len" (func $input_len (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "x")
  (data (i32.const 8) "y")
  (func (export "handle") (result i32)
    (if (i32.eq (call $input_len) (i32.const 4)) (then (loop $l (br $l))))
    (drop (call $output (i32.const 8) (i32.const 1)
      (call $scalar (i32.const 2) (call $input (i32.const 0) (i32.const 1)) (f32.const 3))))
    (i32.const 0)))"#;

fn wait_finished(ex: &TestExecutor, tenant: &str, job: &str) -> Reply {
    let start = Instant::now();
    loop {
        let r = ex.get(tenant, &format!("/jobs/{job}"));
        assert_eq!(r.status, 200, "{}", r.text());
        let status = r.json()["status"].as_str().unwrap().to_string();
        if status == "succeeded" || status == "failed" {
            return r;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "job {job} never finished"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn submit(ex: &TestExecutor, tenant: &str, id: &str, ct: &str, body: &[u8]) -> String {
    let r = ex.post(tenant, &format!("/functions/{id}/invoke-async"), ct, body);
    assert_eq!(r.status, 202, "{}", r.text());
    r.json()["job_id"].as_str().unwrap().to_string()
}

#[test]
fn a_job_runs_and_keeps_its_result() {
    let ex = TestExecutor::start();
    let id = ex.deploy("t1", "triple", TRIPLE);
    let job = submit(
        &ex,
        "t1",
        &id,
        "application/json",
        &f32_inputs(&[("x", &[2], &[1.0, -2.0])]),
    );
    let r = wait_finished(&ex, "t1", &job);
    let v = r.json();
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(v["function_id"], id.as_str());
    assert_eq!(
        v["result"]["outputs"]["y"]["data"],
        serde_json::json!([3.0, -6.0])
    );
    assert!(v["finished_at"].is_string());
    // Listed, and filtered by status.
    assert_eq!(ex.get("t1", "/jobs").json()["jobs"][0]["id"], job.as_str());
    assert_eq!(
        ex.get("t1", "/jobs?status=succeeded").json()["jobs"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        ex.get("t1", "/jobs?status=pending").json()["jobs"],
        serde_json::json!([])
    );
    // Another tenant sees nothing of it.
    let r = ex.get("t2", &format!("/jobs/{job}"));
    assert_eq!((r.status, r.code().as_str()), (404, "job_not_found"));
    assert_eq!(ex.get("t2", "/jobs").json()["jobs"], serde_json::json!([]));
    assert_eq!(ex.delete("t2", &format!("/jobs/{job}")).status, 404);
    // Its owner may forget it.
    assert_eq!(ex.delete("t1", &format!("/jobs/{job}")).status, 204);
    assert_eq!(ex.get("t1", &format!("/jobs/{job}")).status, 404);
}

#[test]
fn malformed_bodies_are_refused_and_failures_recorded_with_their_code() {
    let dir = tempfile::tempdir().unwrap();
    let (ex, id) = one_job_slot(dir.path(), 200, TenantQuotas::default());
    // A body the synchronous invoke would refuse is refused here too.
    let path = format!("/functions/{id}/invoke-async");
    let r = ex.post("t1", &path, "application/json", b"{broken");
    assert_eq!((r.status, r.code().as_str()), (400, "invalid_json"));
    let mismatch = br#"{"inputs": {"x": {"dtype": "f32", "shape": [3], "data": [1, 2]}}}"#;
    let r = ex.post("t1", &path, "application/json", mismatch);
    assert_eq!((r.status, r.code().as_str()), (400, "invalid_input"));
    let r = ex.post("t1", &path, "application/x-safetensors", b"junk");
    assert_eq!((r.status, r.code().as_str()), (400, "invalid_input"));
    assert_eq!(ex.get("t1", "/jobs").json()["jobs"], serde_json::json!([]));
    // A job that fails keeps the code.
    let job = submit(&ex, "t1", &id, "text/plain", b"spin");
    let v = wait_finished(&ex, "t1", &job).json();
    assert_eq!(v["status"], "failed");
    assert_eq!(v["error"]["code"], "deadline_exceeded");
}

/// An executor in `dir` that runs one job at a time with `deadline_ms`
/// per invocation and `quotas`, with the TRIPLE function of t1 deployed;
/// returns it and the function's id.
fn one_job_slot(
    dir: &std::path::Path,
    deadline_ms: u64,
    quotas: TenantQuotas,
) -> (TestExecutor, String) {
    let limits = EngineLimits {
        job_concurrency: 1,
        default_deadline: Duration::from_millis(deadline_ms),
        ..small_limits()
    };
    let ex = TestExecutor::start_in(dir, limits, quotas);
    let id = ex.deploy("t1", "triple", TRIPLE);
    (ex, id)
}

/// Waits until job `id` of t1 runs (holding the only job slot).
fn wait_running(ex: &TestExecutor, id: &str) {
    let start = Instant::now();
    while ex.get("t1", &format!("/jobs/{id}")).json()["status"] != "running" {
        assert!(start.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Writes its raw body to stdout (so to the function's log), then, if the
/// body is "spin\n", loops until its deadline.
const ECHO_TO_LOG: &str = r#"(module
  (import "tensor" "input_len" (func $input_len (result i32)))
  (import "tensor" "input_read" (func $input_read (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "handle") (result i32)
    ;; the body at 64, one iovec {64, len} at 0, bytes written at 8
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (call $input_read (i32.const 0) (i32.const 64) (i32.const 1024)))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (if (i32.eq (call $input_len) (i32.const 5)) (then (loop $l (br $l))))
    (i32.const 0)))"#;

#[test]
fn pending_jobs_can_be_cancelled_running_ones_not() {
    let dir = tempfile::tempdir().unwrap();
    let limits = EngineLimits {
        job_concurrency: 1,
        default_deadline: Duration::from_millis(1500),
        ..small_limits()
    };
    let ex = TestExecutor::start_in(dir.path(), limits, TenantQuotas::default());
    let id = ex.deploy("t1", "echo-to-log", ECHO_TO_LOG);
    let slow = submit(&ex, "t1", &id, "text/plain", b"spin\n");
    wait_running(&ex, &slow);
    let queued = submit(&ex, "t1", &id, "text/plain", b"queued\n");
    assert_eq!(
        ex.get("t1", &format!("/jobs/{queued}")).json()["status"],
        "pending"
    );
    let r = ex.delete("t1", &format!("/jobs/{slow}"));
    assert_eq!((r.status, r.code().as_str()), (409, "job_running"));
    assert_eq!(ex.delete("t1", &format!("/jobs/{queued}")).status, 204);
    assert_eq!(ex.get("t1", &format!("/jobs/{queued}")).status, 404);
    let slow_done = wait_finished(&ex, "t1", &slow).json();
    assert_eq!(slow_done["error"]["code"], "deadline_exceeded");
    // A job submitted after the cancelled one, through the same single job
    // slot and the same function: once it has run, the cancelled job would
    // have run too, and every run leaves its body in the function's log.
    let after = submit(&ex, "t1", &id, "text/plain", b"after\n");
    let after_done = wait_finished(&ex, "t1", &after).json();
    assert_eq!(after_done["status"], "succeeded", "{after_done}");
    let logs = ex.get("t1", &format!("/functions/{id}/logs"));
    assert_eq!(logs.status, 200, "{}", logs.text());
    assert_eq!(
        logs.text(),
        "spin\nafter\n",
        "the log shows every run: a cancelled job never runs"
    );
}

#[test]
fn the_pending_job_quota_holds() {
    let dir = tempfile::tempdir().unwrap();
    let quotas = TenantQuotas {
        pending_jobs: 2,
        ..TenantQuotas::default()
    };
    let (ex, id) = one_job_slot(dir.path(), 1000, quotas);
    submit(&ex, "t1", &id, "text/plain", b"spin");
    submit(&ex, "t1", &id, "text/plain", b"spin");
    let r = ex.post(
        "t1",
        &format!("/functions/{id}/invoke-async"),
        "text/plain",
        b"spin",
    );
    assert_eq!(
        (r.status, r.code().as_str()),
        (422, "quota_exceeded"),
        "{}",
        r.text()
    );
}

#[test]
fn the_pending_job_bytes_quota_holds() {
    let dir = tempfile::tempdir().unwrap();
    let quotas = TenantQuotas {
        pending_job_bytes: 10,
        ..TenantQuotas::default()
    };
    let (ex, id) = one_job_slot(dir.path(), 3000, quotas);
    let slow = submit(&ex, "t1", &id, "text/plain", b"spin");
    // Once running, a job's request no longer counts.
    wait_running(&ex, &slow);
    submit(&ex, "t1", &id, "text/plain", b"spin");
    let path = format!("/functions/{id}/invoke-async");
    let r = ex.post("t1", &path, "text/plain", b"spin-spin");
    assert_eq!(
        (r.status, r.code().as_str()),
        (422, "quota_exceeded"),
        "{}",
        r.text()
    );
    // What fits still goes in.
    let r = ex.post("t1", &path, "text/plain", b"spin!!");
    assert_eq!(r.status, 202, "{}", r.text());
}

#[test]
fn jobs_for_unknown_functions_are_404() {
    let ex = TestExecutor::start();
    let r = ex.post("t1", "/functions/fn-nope/invoke-async", "text/plain", b"");
    assert_eq!((r.status, r.code().as_str()), (404, "function_not_found"));
}

fn jobs_in_flight(ex: &TestExecutor) -> u64 {
    ex.internal("GET", "/internal/info", b"").json()["stats"]["jobs_in_flight"]
        .as_u64()
        .unwrap()
}

/// Waits until the executor counts no job in flight.
fn wait_no_jobs(ex: &TestExecutor) {
    let start = Instant::now();
    loop {
        let n = jobs_in_flight(ex);
        assert!(n < 1000, "the in-flight count wrapped: {n}");
        if n == 0 {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{n} jobs stay");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn jobs_waiting_for_their_function_stay_pending_and_hold_no_job_slot() {
    let dir = tempfile::tempdir().unwrap();
    let limits = EngineLimits {
        job_concurrency: 2,
        default_deadline: Duration::from_millis(3000),
        ..small_limits()
    };
    let ex = TestExecutor::start_in(dir.path(), limits, TenantQuotas::default());
    // One instance: t1's spinning jobs run one at a time.
    let id = ex.deploy("t1", "triple", TRIPLE);
    let slow = submit(&ex, "t1", &id, "text/plain", b"spin");
    wait_running(&ex, &slow);
    let behind: Vec<String> = (0..3)
        .map(|_| submit(&ex, "t1", &id, "text/plain", b"spin"))
        .collect();

    // t2's job takes the free job slot while t1's first job still spins:
    // the jobs behind it wait for t1's instance, not for a job slot.
    let other = ex.deploy("t2", "triple", TRIPLE);
    let quick = submit(
        &ex,
        "t2",
        &other,
        "application/json",
        &f32_inputs(&[("x", &[1], &[2.0])]),
    );
    assert_eq!(
        wait_finished(&ex, "t2", &quick).json()["status"],
        "succeeded"
    );
    assert_eq!(
        ex.get("t1", &format!("/jobs/{slow}")).json()["status"],
        "running"
    );
    for job in &behind {
        let status = ex.get("t1", &format!("/jobs/{job}")).json()["status"].clone();
        assert_eq!(status, "pending", "job {job} waits for the instance");
    }
    assert_eq!(ex.delete("t1", &format!("/jobs/{}", behind[0])).status, 204);

    // Deleting the function fails its waiting jobs at once; the running
    // one ends at its deadline, and nothing stays counted.
    assert_eq!(ex.delete("t1", &format!("/functions/{id}")).status, 204);
    for job in &behind[1..] {
        let v = ex.get("t1", &format!("/jobs/{job}")).json();
        assert_eq!(v["status"], "failed", "{v}");
        assert_eq!(v["error"]["code"], "function_not_found");
    }
    let done = wait_finished(&ex, "t1", &slow).json();
    assert_eq!(done["error"]["code"], "deadline_exceeded");
    wait_no_jobs(&ex);
}

#[test]
fn a_purged_tenant_leaves_no_job_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (ex, id) = one_job_slot(dir.path(), 1000, TenantQuotas::default());
    let slow = submit(&ex, "t1", &id, "text/plain", b"spin");
    wait_running(&ex, &slow);
    for _ in 0..3 {
        submit(&ex, "t1", &id, "text/plain", b"spin");
    }
    assert_eq!(
        ex.internal("DELETE", "/internal/tenants/t1", b"").status,
        204
    );
    assert_eq!(ex.get("t1", &format!("/jobs/{slow}")).status, 404);
    // The running job ends at its deadline; the count neither stays up
    // nor wraps below zero.
    wait_no_jobs(&ex);
    // t2's job needs the only job slot, so it runs once the purged
    // tenant's job has ended (and given its slot back).
    let other = ex.deploy("t2", "triple", TRIPLE);
    let after = submit(
        &ex,
        "t2",
        &other,
        "application/json",
        &f32_inputs(&[("x", &[1], &[2.0])]),
    );
    assert_eq!(
        wait_finished(&ex, "t2", &after).json()["status"],
        "succeeded"
    );
    assert_eq!(jobs_in_flight(&ex), 0);
}

/// A frozen tenant's snapshot holds its jobs: forgetting one there is
/// refused until the tenant thaws, or the job would come back where the
/// snapshot lands.
#[test]
fn a_job_of_a_frozen_tenant_is_not_forgotten_until_it_thaws() {
    let ex = TestExecutor::start();
    let id = ex.deploy("t1", "triple", TRIPLE);
    let x = f32_inputs(&[("x", &[1], &[1.0])]);
    let job = submit(&ex, "t1", &id, "application/json", &x);
    wait_finished(&ex, "t1", &job);
    let r = ex.internal("POST", "/internal/tenants/t1/export", b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let r = ex.delete("t1", &format!("/jobs/{job}"));
    assert_eq!((r.status, r.code().as_str()), (409, "tenant_frozen"));
    let r = ex.post(
        "t1",
        &format!("/functions/{id}/invoke-async"),
        "application/json",
        &x,
    );
    assert_eq!((r.status, r.code().as_str()), (409, "tenant_frozen"));
    assert_eq!(ex.get("t1", &format!("/jobs/{job}")).status, 200);

    let r = ex.internal("POST", "/internal/tenants/t1/thaw", b"");
    assert!(r.status < 300, "{}", r.text());
    assert_eq!(ex.delete("t1", &format!("/jobs/{job}")).status, 204);
    assert_eq!(ex.get("t1", &format!("/jobs/{job}")).status, 404);
}
