//! Pre-copy migration between two executors: the destination pulls the
//! tenant from the source while it runs, then takes the final round and
//! publishes it; the source's copy is frozen from its final round on.

use crate::harness::{TestExecutor, multipart};

/// Counts calls in a global and in memory; keeps a tensor that grows by one
/// each call (a new handle each time, the old one freed); writes 64 KiB of
/// memory each call, at a place that moves; answers n, the tensor's 4
/// values and a checksum of the 2 MiB it writes into.
const COUNTER: &str = r#"(module
  (import "tensor" "zeros" (func $zeros (param i32 i32 i32) (result i32)))
  (import "tensor" "scalar" (func $scalar (param i32 i32 f32) (result i32)))
  (import "tensor" "free" (func $free (param i32) (result i32)))
  (import "tensor" "read" (func $read (param i32 i32 i32) (result i32)))
  (import "tensor" "output_write" (func $output_write (param i32 i32) (result i32)))
  (memory (export "memory") 48)
  (data (i32.const 0) "\04\00\00\00")
  (global $n (mut i32) (i32.const 0))
  (func (export "init") (result i32)
    (i32.store (i32.const 100) (call $zeros (i32.const 0) (i32.const 0) (i32.const 1)))
    (i32.const 0))
  (func (export "handle") (result i32)
    (local $old i32) (local $at i32) (local $end i32) (local $sum i32)
    (global.set $n (i32.add (global.get $n) (i32.const 1)))
    (local.set $old (i32.load (i32.const 100)))
    (i32.store (i32.const 100) (call $scalar (i32.const 0) (local.get $old) (f32.const 1)))
    (drop (call $free (local.get $old)))
    ;; 64 KiB of n at 1 MiB + (n mod 32) * 64 KiB
    (local.set $at (i32.add (i32.const 1048576)
      (i32.mul (i32.rem_u (global.get $n) (i32.const 32)) (i32.const 65536))))
    (memory.fill (local.get $at) (global.get $n) (i32.const 65536))
    ;; checksum of the 2 MiB region, a byte every 4 KiB
    (local.set $at (i32.const 1048576))
    (local.set $end (i32.const 3145728))
    (loop $l
      (local.set $sum (i32.add (local.get $sum) (i32.load8_u (local.get $at))))
      (local.set $at (i32.add (local.get $at) (i32.const 4096)))
      (br_if $l (i32.lt_u (local.get $at) (local.get $end))))
    (i32.store (i32.const 200) (global.get $n))
    (drop (call $read (i32.load (i32.const 100)) (i32.const 204) (i32.const 16)))
    (i32.store (i32.const 220) (local.get $sum))
    (drop (call $output_write (i32.const 200) (i32.const 24)))
    (i32.const 0)))"#;

/// (n, tensor values, checksum) of one call.
fn count(ex: &TestExecutor, id: &str) -> (u32, Vec<f32>, u32) {
    let r = ex.post("t1", &format!("/functions/{id}/invoke"), "text/plain", b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let n = u32::from_le_bytes(r.body[..4].try_into().unwrap());
    let v = r.body[4..20]
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let sum = u32::from_le_bytes(r.body[20..24].try_into().unwrap());
    (n, v, sum)
}

/// The checksum the guest computes after `n` calls.
fn checksum(n: u32) -> u32 {
    let mut region = [0u8; 32];
    for k in 1..=n {
        region[(k % 32) as usize] = k as u8;
    }
    // 16 sampled bytes per 64 KiB block.
    region.iter().map(|&b| u32::from(b) * 16).sum()
}

fn addr(ex: &TestExecutor) -> String {
    ex.base.trim_start_matches("http://").to_string()
}

fn start(a: &TestExecutor) -> String {
    let r = a.internal("POST", "/internal/tenants/t1/outbound", b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let m = r.json();
    assert_eq!(m["tenant"], "t1");
    assert!(
        ["write-protect", "hashing"].contains(&m["page_tracking"].as_str().unwrap()),
        "{m}"
    );
    m["session"].as_str().unwrap().to_string()
}

fn pull(a: &TestExecutor, b: &TestExecutor, session: &str) -> serde_json::Value {
    let body = serde_json::json!({"source": addr(a), "session": session}).to_string();
    let r = b.internal("POST", "/internal/tenants/t1/inbound", body.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

fn rows_assets() -> Vec<u8> {
    let data: Vec<f32> = (0..1024).map(|i| i as f32).collect();
    let view = safetensors::tensor::TensorView::new(
        safetensors::Dtype::F32,
        vec![32, 32],
        bytemuck::cast_slice(&data),
    )
    .unwrap();
    safetensors::serialize([("w".to_string(), view)], None).unwrap()
}

#[test]
fn a_tenant_moves_while_it_runs_and_only_the_last_changes_cross_in_the_pause() {
    let a = TestExecutor::start();
    let b = TestExecutor::start();
    let wasm = wat::parse_str(COUNTER).unwrap();
    let r = a.post(
        "t1",
        "/functions?name=counter",
        "multipart/form-data; boundary=XX",
        &multipart(&[("module", &wasm), ("assets", &rows_assets())]),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    for k in 1..=5 {
        assert_eq!(count(&a, &id), (k, vec![k as f32; 4], checksum(k)));
    }

    let session = start(&a);
    let report = pull(&a, &b, &session);
    let rounds = report["rounds"].as_array().unwrap();
    assert!(!rounds.is_empty(), "{report}");
    assert!(
        report["blob_bytes"].as_u64().unwrap() > 4096,
        "module and assets: {report}"
    );
    // The first round carried the memory written so far: 5 × 64 KiB and
    // the first page (no zero pages).
    let first = rounds[0]["page_bytes"].as_u64().unwrap();
    assert!(
        (5 * 65536..=5 * 65536 + 3 * 4096).contains(&first),
        "{report}"
    );
    // The tenant is staged on B, not served: B does not know it.
    assert_eq!(
        b.get("t1", "/functions").json()["functions"],
        serde_json::json!([])
    );

    // It keeps running on A.
    for k in 6..=8 {
        assert_eq!(count(&a, &id), (k, vec![k as f32; 4], checksum(k)));
    }
    let r = b.internal("POST", "/internal/tenants/t1/inbound/commit", b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let fin = r.json();
    // The final round: the three calls' writes (3 × 64 KiB and the page
    // of the counters), the new tensor, globals, records.
    let pages = fin["page_bytes"].as_u64().unwrap();
    assert!((3 * 65536..=3 * 65536 + 2 * 4096).contains(&pages), "{fin}");
    assert_eq!(fin["tensor_bytes"], 16);

    // A's copy is frozen; B serves the tenant where A left it.
    let r = a.post("t1", &format!("/functions/{id}/invoke"), "text/plain", b"");
    assert_eq!((r.status, r.code().as_str()), (409, "tenant_frozen"));
    for k in 9..=11 {
        assert_eq!(count(&b, &id), (k, vec![k as f32; 4], checksum(k)));
    }
    let listed = b.get("t1", "/functions").json();
    assert_eq!(listed["functions"][0]["assets"], serde_json::json!(["w"]));
    // A discard after the commit says so, and changes nothing.
    let r = b.internal("DELETE", "/internal/tenants/t1/inbound", b"");
    assert_eq!(r.json()["state"], "committed");
    assert_eq!(count(&b, &id).0, 12);
    // A drops its copy.
    assert_eq!(
        a.internal("DELETE", "/internal/tenants/t1", b"").status,
        204
    );
    assert_eq!(
        a.internal("GET", &format!("/internal/outbound/{session}"), b"")
            .status,
        404
    );
}

#[test]
fn an_undone_move_leaves_the_tenant_on_its_source() {
    let a = TestExecutor::start();
    let b = TestExecutor::start();
    let id = a.deploy("t1", "counter", COUNTER);
    assert_eq!(count(&a, &id).0, 1);
    let session = start(&a);
    pull(&a, &b, &session);
    // Undo: B discards, A ends the session; A still serves, B has nothing.
    let r = b.internal("DELETE", "/internal/tenants/t1/inbound", b"");
    assert_eq!(r.json()["state"], "discarded");
    assert_eq!(
        b.internal("POST", "/internal/tenants/t1/inbound/commit", b"")
            .status,
        404
    );
    assert_eq!(
        a.internal("DELETE", &format!("/internal/outbound/{session}"), b"")
            .status,
        204
    );
    assert_eq!(count(&a, &id).0, 2);
    assert_eq!(
        b.get("t1", "/functions").json()["functions"],
        serde_json::json!([])
    );
    assert_eq!(
        b.metric("tensor_wasm_host_memory_bytes"),
        0.0,
        "the staged instances are gone"
    );

    // Undone after the final round: A thaws and goes on where it was.
    let session = start(&a);
    pull(&a, &b, &session);
    let r = a.internal("POST", &format!("/internal/outbound/{session}/final"), b"");
    assert_eq!(r.status, 200);
    let r = a.post("t1", &format!("/functions/{id}/invoke"), "text/plain", b"");
    assert_eq!(r.code(), "tenant_frozen");
    assert_eq!(
        b.internal("DELETE", "/internal/tenants/t1/inbound", b"")
            .json()["state"],
        "discarded"
    );
    assert_eq!(
        a.internal("DELETE", &format!("/internal/outbound/{session}"), b"")
            .status,
        204
    );
    assert_eq!(count(&a, &id).0, 3);
}

#[test]
fn a_destination_that_holds_the_tenant_refuses_to_pull_it() {
    let a = TestExecutor::start();
    let b = TestExecutor::start();
    a.deploy("t1", "counter", COUNTER);
    b.deploy("t1", "other", COUNTER);
    let session = start(&a);
    let body = serde_json::json!({"source": addr(&a), "session": session}).to_string();
    let r = b.internal("POST", "/internal/tenants/t1/inbound", body.as_bytes());
    assert_eq!((r.status, r.code().as_str()), (409, "tenant_exists"));
    // An unknown session is the source's 404, not a half-built tenant.
    let body = serde_json::json!({"source": addr(&a), "session": "nope"}).to_string();
    let r = b.internal("POST", "/internal/tenants/t2/inbound", body.as_bytes());
    assert_ne!(r.status, 200, "{}", r.text());
    assert_eq!(
        b.get("t2", "/functions").json()["functions"],
        serde_json::json!([])
    );
}
