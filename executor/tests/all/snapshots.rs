//! Export a tenant from one executor, import it into another: state, device
//! tensors and jobs intact; bad snapshots refused with the importer
//! unchanged.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tensor_wasm_executor::config::TenantQuotas;

use crate::harness::{Reply, TestExecutor, f32_inputs, small_limits};

/// Keeps a running count in a global it does not export, and a running sum
/// in a device tensor whose handle lives in linear memory. Each call adds
/// input `x` to the tensor, outputs it as `sum`, and writes the count raw.
const ACCUMULATOR: &str = r#"(module
  (import "tensor" "input" (func $input (param i32 i32) (result i32)))
  (import "tensor" "binary" (func $binary (param i32 i32 i32) (result i32)))
  (import "tensor" "free" (func $free (param i32) (result i32)))
  (import "tensor" "zeros" (func $zeros (param i32 i32 i32) (result i32)))
  (import "tensor" "output" (func $output (param i32 i32 i32) (result i32)))
  (import "tensor" "output_write" (func $output_write (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "x")
  (data (i32.const 8) "sum")
  (data (i32.const 16) "\03\00\00\00")
  (global $calls (mut i32) (i32.const 0))
  (func (export "init") (result i32)
    ;; the sum tensor's handle is kept at address 100
    (i32.store (i32.const 100) (call $zeros (i32.const 0) (i32.const 16) (i32.const 1)))
    (i32.const 0))
  (func (export "handle") (result i32)
    (local $old i32) (local $new i32)
    (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
    (local.set $old (i32.load (i32.const 100)))
    (local.set $new (call $binary (i32.const 0) (local.get $old) (call $input (i32.const 0) (i32.const 1))))
    (if (i32.lt_s (local.get $new) (i32.const 0)) (then unreachable))
    (drop (call $free (local.get $old)))
    (i32.store (i32.const 100) (local.get $new))
    (drop (call $output (i32.const 8) (i32.const 3) (local.get $new)))
    (i32.store (i32.const 200) (global.get $calls))
    (drop (call $output_write (i32.const 200) (i32.const 4)))
    (i32.const 0)))"#;

fn call(ex: &TestExecutor, tenant: &str, id: &str, x: [f32; 3]) -> (Vec<f32>, u32) {
    let r = ex.post(
        tenant,
        &format!("/functions/{id}/invoke"),
        "application/json",
        &f32_inputs(&[("x", &[3], &x)]),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let sum = v["outputs"]["sum"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let raw = base64_decode(v["raw_b64"].as_str().unwrap());
    (sum, u32::from_le_bytes(raw.try_into().unwrap()))
}

fn base64_decode(s: &str) -> Vec<u8> {
    // Four characters → three bytes; enough for the short values here.
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let vals: Vec<u32> = s
        .bytes()
        .filter(|&c| c != b'=')
        .map(|c| A.iter().position(|&a| a == c).unwrap() as u32)
        .collect();
    let mut out = Vec::new();
    for chunk in vals.chunks(4) {
        let mut n = 0u32;
        for (i, v) in chunk.iter().enumerate() {
            n |= v << (18 - 6 * i);
        }
        for i in 0..chunk.len() - 1 {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

fn export(ex: &TestExecutor, tenant: &str) -> Vec<u8> {
    let r = ex.internal("POST", &format!("/internal/tenants/{tenant}/export"), b"");
    assert_eq!(r.status, 200, "{}", r.text());
    r.body
}

#[test]
fn a_tenant_moves_with_its_state() {
    let a = TestExecutor::start();
    let b = TestExecutor::start();
    let id = a.deploy("t1", "acc", ACCUMULATOR);
    assert_eq!(
        call(&a, "t1", &id, [1.0, 2.0, 3.0]),
        (vec![1.0, 2.0, 3.0], 1)
    );
    assert_eq!(
        call(&a, "t1", &id, [1.0, 1.0, 1.0]),
        (vec![2.0, 3.0, 4.0], 2)
    );
    // A finished job, and another tenant that must not move.
    let job = a.post(
        "t1",
        &format!("/functions/{id}/invoke-async"),
        "application/json",
        &f32_inputs(&[("x", &[3], &[0.5, 0.5, 0.5])]),
    );
    let job = job.json()["job_id"].as_str().unwrap().to_string();
    for _ in 0..500 {
        if a.get("t1", &format!("/jobs/{job}")).json()["status"] == "succeeded" {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let other = a.deploy("t2", "acc", ACCUMULATOR);

    let snapshot = export(&a, "t1");
    assert_eq!(&snapshot[..8], b"TWSNAP\0\x01");
    // Frozen on the source; other tenants unaffected.
    let r = a.post(
        "t1",
        &format!("/functions/{id}/invoke"),
        "application/json",
        &f32_inputs(&[("x", &[3], &[0.0; 3])]),
    );
    assert_eq!((r.status, r.code().as_str()), (409, "tenant_frozen"));
    assert_eq!(call(&a, "t2", &other, [1.0, 1.0, 1.0]).1, 1);

    let r = b.internal("POST", "/internal/tenants/t1/import", &snapshot);
    assert_eq!(r.status, 200, "{}", r.text());
    // The count (a global the module never exported) and the device
    // tensor continue where they were; init did not run again.
    assert_eq!(
        call(&b, "t1", &id, [10.0, 10.0, 10.0]),
        (vec![12.5, 13.5, 14.5], 4)
    );
    let j = b.get("t1", &format!("/jobs/{job}")).json();
    assert_eq!(j["status"], "succeeded");
    assert_eq!(
        j["result"]["outputs"]["sum"]["data"],
        serde_json::json!([2.5, 3.5, 4.5])
    );
    // The function was persisted on the importer too.
    assert_eq!(
        b.get("t1", "/functions").json()["functions"][0]["id"],
        id.as_str()
    );
    // A second import is refused; the source drops the tenant.
    let again = b.internal("POST", "/internal/tenants/t1/import", &snapshot);
    assert_eq!(
        (again.status, again.code().as_str()),
        (409, "tenant_exists")
    );
    assert_eq!(
        a.internal("DELETE", "/internal/tenants/t1", b"").status,
        204
    );
    assert_eq!(
        a.get("t1", "/functions").json()["functions"],
        serde_json::json!([])
    );
    assert_eq!(call(&a, "t2", &other, [1.0, 1.0, 1.0]).1, 2);
}

#[test]
fn a_thawed_tenant_carries_on_where_it_was() {
    let a = TestExecutor::start();
    let id = a.deploy("t1", "acc", ACCUMULATOR);
    call(&a, "t1", &id, [1.0, 1.0, 1.0]);
    export(&a, "t1");
    assert_eq!(
        a.internal("POST", "/internal/tenants/t1/thaw", b"").status,
        204
    );
    assert_eq!(
        call(&a, "t1", &id, [1.0, 1.0, 1.0]),
        (vec![2.0, 2.0, 2.0], 2)
    );
}

#[test]
fn bad_snapshots_are_refused_and_change_nothing() {
    let a = TestExecutor::start();
    let b = TestExecutor::start();
    let id = a.deploy("t1", "acc", ACCUMULATOR);
    call(&a, "t1", &id, [1.0, 1.0, 1.0]);
    let good = export(&a, "t1");
    let mut flipped = good.clone();
    let n = flipped.len();
    flipped[n - 10] ^= 0x40;
    let mut forged = good.clone();
    forged[8] = 7;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", Vec::new(), "shorter than its 96-byte header"),
        ("truncated", good[..good.len() / 2].to_vec(), "header says"),
        ("corrupted", flipped, "checksum"),
        ("future version", forged, "version 7"),
        ("not a snapshot", b"hello, world, this is certainly not a snapshot at all, no sir; it is longer than the header though, by a few bytes".to_vec(), "magic"),
    ];
    for (what, bytes, needle) in cases {
        let r = b.internal("POST", "/internal/tenants/t1/import", &bytes);
        assert_eq!(
            (r.status, r.code().as_str()),
            (400, "invalid_input"),
            "{what}: {}",
            r.text()
        );
        assert!(r.text().contains(needle), "{what}: {}", r.text());
        assert_eq!(
            b.get("t1", "/functions").json()["functions"],
            serde_json::json!([]),
            "{what}"
        );
    }
    // A snapshot of one tenant cannot be imported as another.
    let r = b.internal("POST", "/internal/tenants/t9/import", &good);
    assert_eq!(r.status, 400, "{}", r.text());
    // The good one still imports afterwards.
    assert_eq!(
        b.internal("POST", "/internal/tenants/t1/import", &good)
            .status,
        200
    );
    assert_eq!(
        call(&b, "t1", &id, [1.0, 1.0, 1.0]),
        (vec![2.0, 2.0, 2.0], 2)
    );
}

/// A restore: `import?replace=true` swaps a live tenant's state for a
/// snapshot's in one step (state, device tensor, jobs, a function it had
/// then and not now); a refused snapshot leaves the tenant as it was.
#[test]
fn a_restore_swaps_the_state_in_and_a_refused_one_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let a = TestExecutor::start_in(dir.path(), small_limits(), TenantQuotas::default());
    let id = a.deploy("t1", "acc", ACCUMULATOR);
    let other = a.deploy("t2", "acc", ACCUMULATOR);
    call(&a, "t1", &id, [1.0, 2.0, 3.0]);
    let then = export(&a, "t1");
    assert_eq!(
        a.internal("POST", "/internal/tenants/t1/thaw", b"").status,
        204
    );
    call(&a, "t1", &id, [5.0, 5.0, 5.0]);
    // A function registered after the snapshot goes with the restore.
    let later = a.deploy("t1", "later", ACCUMULATOR);
    assert_eq!(call(&a, "t1", &later, [1.0, 1.0, 1.0]).1, 1);

    // Without `replace`, a tenant here is refused.
    let r = a.internal("POST", "/internal/tenants/t1/import", &then);
    assert_eq!((r.status, r.code().as_str()), (409, "tenant_exists"));

    // Refused snapshots: corrupt, and another tenant's. Nothing changes.
    let mut flipped = then.clone();
    let n = flipped.len();
    flipped[n - 10] ^= 0x40;
    for (what, path) in [
        (&flipped, "/internal/tenants/t1/import?replace=true"),
        (&then, "/internal/tenants/t2/import?replace=true"),
    ] {
        let r = a.internal("POST", path, what);
        assert_eq!(
            (r.status, r.code().as_str()),
            (400, "invalid_input"),
            "{path}: {}",
            r.text()
        );
    }
    assert_eq!(
        call(&a, "t1", &id, [0.0, 0.0, 0.0]),
        (vec![6.0, 7.0, 8.0], 3)
    );
    assert_eq!(call(&a, "t2", &other, [1.0, 1.0, 1.0]).1, 1);

    // The restore: the count and the device tensor are back where the
    // snapshot took them, and the later function is gone.
    let r = a.internal("POST", "/internal/tenants/t1/import?replace=true", &then);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        call(&a, "t1", &id, [1.0, 1.0, 1.0]),
        (vec![2.0, 3.0, 4.0], 2)
    );
    let fns = a.get("t1", "/functions").json();
    assert_eq!(fns["functions"].as_array().unwrap().len(), 1, "{fns}");
    assert_eq!(fns["functions"][0]["id"], id.as_str());
    let r = a.post(
        "t1",
        &format!("/functions/{later}/invoke"),
        "application/json",
        &f32_inputs(&[("x", &[3], &[0.0; 3])]),
    );
    assert_eq!(r.status, 404, "{}", r.text());
    // Other tenants carried on untouched.
    assert_eq!(call(&a, "t2", &other, [1.0, 1.0, 1.0]).1, 2);
    // What was restored is what a restart finds.
    drop(a);
    let a = TestExecutor::start_in(dir.path(), small_limits(), TenantQuotas::default());
    assert_eq!(
        call(&a, "t1", &id, [0.0, 0.0, 0.0]),
        (vec![2.0, 3.0, 4.0], 3)
    );
    let fns = a.get("t1", "/functions").json();
    assert_eq!(fns["functions"].as_array().unwrap().len(), 1, "{fns}");
}

#[test]
fn snapshots_that_would_pass_the_quotas_or_overwrite_themselves_are_refused() {
    use tensor_wasm_shared::snapshot::{JobSnapshot, decode, encode};
    let a = TestExecutor::start();
    let id = a.deploy("t1", "acc", ACCUMULATOR);
    call(&a, "t1", &id, [1.0, 1.0, 1.0]);
    let good = decode(&export(&a, "t1"), None, u64::MAX).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let quotas = TenantQuotas {
        pending_jobs: 2,
        pending_job_bytes: 100,
        ..TenantQuotas::default()
    };
    let b = TestExecutor::start_in(dir.path(), small_limits(), quotas);
    let pending = |n: usize, body: usize| -> Vec<JobSnapshot> {
        (0..n)
            .map(|i| JobSnapshot {
                info_json: serde_json::json!({
                    "id": format!("job-{i}"), "function_id": id, "status": "pending",
                    "created_at": "2026-01-01T00:00:00Z", "finished_at": null,
                    "result": null, "error": null,
                })
                .to_string(),
                content_type: Some("text/plain".into()),
                body: Some(vec![0; body]),
            })
            .collect()
    };
    let mut twice = good.clone();
    twice.functions.push(twice.functions[0].clone());
    let mut many_jobs = good.clone();
    many_jobs.jobs = pending(3, 1);
    let mut big_jobs = good.clone();
    big_jobs.jobs = pending(2, 60);
    let mut same_job = good.clone();
    same_job.jobs = pending(1, 1);
    same_job.jobs.push(same_job.jobs[0].clone());
    let mut bad_id = good.clone();
    bad_id.jobs = pending(1, 1);
    bad_id.jobs[0].info_json = bad_id.jobs[0].info_json.replace("job-0", "../job-0");
    let cases = [
        ("a function twice", twice, "invalid_input", "twice"),
        (
            "3 waiting jobs",
            many_jobs,
            "quota_exceeded",
            "3 waiting jobs",
        ),
        (
            "120 bytes of requests",
            big_jobs,
            "quota_exceeded",
            "120 bytes",
        ),
        ("a job id twice", same_job, "invalid_input", "job-0"),
        ("a job id that is no id", bad_id, "invalid_input", "job id"),
    ];
    for (what, snap, code, needle) in cases {
        let bytes = encode(&snap, None).unwrap();
        let r = b.internal("POST", "/internal/tenants/t1/import", &bytes);
        assert_eq!(r.code(), code, "{what}: {}", r.text());
        assert!(r.text().contains(needle), "{what}: {}", r.text());
        assert_eq!(
            b.get("t1", "/functions").json()["functions"],
            serde_json::json!([]),
            "{what}"
        );
    }
    let mut fits = good;
    fits.jobs = pending(2, 50);
    let r = b.internal(
        "POST",
        "/internal/tenants/t1/import",
        &encode(&fits, None).unwrap(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn keyed_executors_only_take_signed_snapshots() {
    let (da, db, dc) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let q = TenantQuotas::default;
    let unkeyed = TestExecutor::start_keyed(da.path(), small_limits(), q(), None);
    let keyed = TestExecutor::start_keyed(db.path(), small_limits(), q(), Some(&[1; 32]));
    let other_key = TestExecutor::start_keyed(dc.path(), small_limits(), q(), Some(&[2; 32]));
    let id = unkeyed.deploy("t1", "acc", ACCUMULATOR);
    let plain = export(&unkeyed, "t1");
    let r = keyed.internal("POST", "/internal/tenants/t1/import", &plain);
    assert_eq!(r.status, 400);
    assert!(r.text().contains("not keyed"), "{}", r.text());
    // Signed by one key, refused under another.
    unkeyed.internal("POST", "/internal/tenants/t1/thaw", b"");
    let kid = keyed.deploy("t1", "acc", ACCUMULATOR);
    call(&keyed, "t1", &kid, [1.0, 1.0, 1.0]);
    let signed = export(&keyed, "t1");
    let r = other_key.internal("POST", "/internal/tenants/t1/import", &signed);
    assert_eq!(r.status, 400);
    assert!(r.text().contains("signature"), "{}", r.text());
    let _ = id;
}

#[test]
fn exports_of_unknown_tenants_are_404_tenant_not_here_not_an_unknown_route() {
    let a = TestExecutor::start();
    // Every internal route that names a tenant says the tenant is not here…
    for (method, path) in [
        ("POST", "/internal/tenants/nobody/export"),
        ("POST", "/internal/tenants/nobody/thaw"),
        ("GET", "/internal/tenants/nobody/modules"),
        ("DELETE", "/internal/tenants/nobody"),
    ] {
        let r = a.internal(method, path, b"");
        assert_eq!(
            (r.status, r.code().as_str()),
            (404, "tenant_not_here"),
            "{method} {path}"
        );
    }
    // …which a route the executor does not have never says.
    let r = a.internal("POST", "/internal/tenants/nobody/exportx", b"");
    assert_eq!((r.status, r.code().as_str()), (404, "not_found"));
    let r = a.internal("POST", "/internal/tenants/Bad!/export", b"");
    assert_eq!(r.status, 400);
}

#[test]
fn a_graceful_restart_keeps_warm_state() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let ex = TestExecutor::start_in(dir.path(), small_limits(), TenantQuotas::default());
        let id = ex.deploy("t1", "acc", ACCUMULATOR);
        assert_eq!(call(&ex, "t1", &id, [1.0, 2.0, 3.0]).1, 1);
        assert_eq!(call(&ex, "t1", &id, [1.0, 2.0, 3.0]).1, 2);
        id
    };
    assert!(
        dir.path().join("warm/t1.twsnap").exists(),
        "shutdown wrote warm state"
    );
    let ex = TestExecutor::start_in(dir.path(), small_limits(), TenantQuotas::default());
    assert!(
        !dir.path().join("warm/t1.twsnap").exists(),
        "start consumed it"
    );
    assert_eq!(
        call(&ex, "t1", &id, [1.0, 1.0, 1.0]),
        (vec![3.0, 5.0, 7.0], 3)
    );
    assert_eq!(
        ex.get("t1", "/functions").json()["functions"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

/// The end of a move of `tenant` from `a` to `b` by the placement of
/// `epoch`: `snap` imported on `b`, the tenant dropped from `a` by a drop
/// that names `b`.
fn moved(a: &TestExecutor, b: &TestExecutor, tenant: &str, snap: &[u8], epoch: &str) {
    moved_unnamed(a, b, tenant, snap, epoch, true);
}

/// [`moved`], by a drop that names where the tenant went only when
/// `named`.
fn moved_unnamed(
    a: &TestExecutor,
    b: &TestExecutor,
    tenant: &str,
    snap: &[u8],
    epoch: &str,
    named: bool,
) {
    let to = b.url("").trim_start_matches("http://").to_string();
    moved_to(a, b, tenant, snap, epoch, named.then_some(to.as_str()));
}

/// [`moved`], by a drop that names `to` as where the tenant went.
fn moved_to(
    a: &TestExecutor,
    b: &TestExecutor,
    tenant: &str,
    snap: &[u8],
    epoch: &str,
    to: Option<&str>,
) {
    let r = b.internal("POST", &format!("/internal/tenants/{tenant}/import"), snap);
    assert_eq!(r.status, 200, "{}", r.text());
    let mut drop = a
        .raw_agent()
        .delete(a.url(&format!("/internal/tenants/{tenant}")))
        .header("authorization", format!("Bearer {}", crate::harness::TOKEN))
        .header("x-tensor-wasm-epoch", epoch);
    if let Some(to) = to {
        drop = drop.header("x-tensor-wasm-moved-to", to);
    }
    let r = drop.call().unwrap();
    assert_eq!(r.status().as_u16(), 204);
}

/// A TCP relay to `to` on a port of its own: the connections it accepted.
fn counting_relay(to: String) -> (String, Arc<AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            count.fetch_add(1, Ordering::SeqCst);
            let Ok(server) = std::net::TcpStream::connect(&to) else {
                continue;
            };
            let pipe = |mut from: std::net::TcpStream, mut into: std::net::TcpStream| {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut into);
                    let _ = into.shutdown(std::net::Shutdown::Write);
                });
            };
            pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
            pipe(server, client);
        }
    });
    (addr, accepted)
}

/// Sends a `POST` of `tenant` to `path`, routed by the placement of
/// `epoch`, with half its body; runs `meanwhile`, once the executor has let
/// the request in and waits for the rest; then sends the rest. The answer's
/// status and text.
fn post_slowly(
    ex: &TestExecutor,
    tenant: &str,
    path: &str,
    epoch: &str,
    (content_type, body): (&str, &[u8]),
    meanwhile: impl FnOnce(),
) -> (u16, String) {
    use std::io::{Read, Write};

    let addr = ex.url("").trim_start_matches("http://").to_string();
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        conn,
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\n\
         authorization: Bearer {}\r\nx-tensor-wasm-tenant: {tenant}\r\n\
         x-tensor-wasm-epoch: {epoch}\r\ncontent-type: {content_type}\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        crate::harness::TOKEN,
        body.len()
    )
    .unwrap();
    let (head, rest) = body.split_at(body.len() / 2);
    conn.write_all(head).unwrap();
    conn.flush().unwrap();
    // The fence let the request in; its handler now waits for the body.
    std::thread::sleep(Duration::from_millis(200));
    meanwhile();
    conn.write_all(rest).unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, answer)
}

/// [`post_slowly`] of tenant `t1`, routed by epoch 5, whose tenant a
/// snapshot freezes while the body arrives and which thaws 0.5 s later.
fn post_through_a_pause(ex: &TestExecutor, path: &str, body: (&str, &[u8])) -> (u16, String) {
    std::thread::scope(|s| {
        post_slowly(ex, "t1", path, "5", body, || {
            export(ex, "t1");
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(500));
                let r = ex.internal("POST", "/internal/tenants/t1/thaw", b"");
                assert!(r.status < 300, "{}", r.text());
            });
        })
    })
}

/// A routed request let in before its tenant froze (a snapshot began while
/// its body was still arriving) is refused as stale too, not with
/// `tenant_frozen`: the proxy sends it again once the tenant runs, and never
/// shows the client a refusal.
#[test]
fn a_routed_request_that_meets_a_freeze_after_it_was_let_in_is_refused_as_stale() {
    let ex = TestExecutor::start();
    let id = ex.deploy("t1", "acc", ACCUMULATOR);
    let body = f32_inputs(&[("x", &[3], &[1.0, 1.0, 1.0])]);
    let invoke = format!("/functions/{id}/invoke");
    let (status, answer) =
        post_slowly(&ex, "t1", &invoke, "5", ("application/json", &body), || {
            export(&ex, "t1");
        });
    assert_eq!(status, 421, "{answer}");
    assert!(answer.contains("\"placement_stale\""), "{answer}");

    // Thawed, the same request runs: nothing of the refused one ran.
    let r = ex.internal("POST", "/internal/tenants/t1/thaw", b"");
    assert!(r.status < 300, "{}", r.text());
    let r = routed_reply(&ex, "t1", &invoke, &body, "5");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["outputs"]["sum"]["data"][0], 1.0);
}

/// A registration routed by an old placement, let in before its tenant
/// moved away, neither registers the function on the executor it left nor
/// makes the tenant anew there: it is sent on to where the tenant went,
/// when the move's drop named it, and refused as stale otherwise, for the
/// proxy to send where the tenant lives now.
#[test]
fn a_routed_registration_that_outlives_its_tenants_move_is_sent_on_or_refused_as_stale() {
    for named in [true, false] {
        let a = TestExecutor::start();
        let b = TestExecutor::start();
        a.deploy("t1", "acc", ACCUMULATOR);
        let wasm = wat::parse_str(ACCUMULATOR).unwrap();
        let (status, answer) = post_slowly(
            &a,
            "t1",
            "/functions?name=late",
            "5",
            ("application/wasm", &wasm),
            || {
                let snap = export(&a, "t1");
                moved_unnamed(&a, &b, "t1", &snap, "9", named);
            },
        );
        let info = a.internal("GET", "/internal/info", b"").json();
        assert_eq!(info["tenants"], serde_json::json!([]), "{info}");
        let listed = b.get("t1", "/functions").json();
        let functions = listed["functions"].as_array().unwrap();
        if named {
            assert_eq!(status, 201, "{answer}");
            assert_eq!(functions.len(), 2, "{listed}");
            assert!(listed.to_string().contains("\"late\""), "{listed}");
        } else {
            assert_eq!(status, 421, "{answer}");
            assert!(answer.contains("\"placement_stale\""), "{answer}");
            assert_eq!(functions.len(), 1, "{listed}");
        }
    }
}

/// A module of more than a proxy keeps to send again: the accumulator,
/// with a custom section of 96 KiB.
fn large_module() -> Vec<u8> {
    let mut wasm = wat::parse_str(ACCUMULATOR).unwrap();
    let name = b"padding";
    let size = 1 + name.len() + (96 << 10);
    wasm.push(0);
    let mut n = size;
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            wasm.push(byte);
            break;
        }
        wasm.push(byte | 0x80);
    }
    wasm.push(name.len() as u8);
    wasm.extend_from_slice(name);
    wasm.resize(wasm.len() + (96 << 10), 0);
    wasm
}

/// A registration whose module the proxy could not send again, let in
/// before its tenant froze for a snapshot (its body still arriving), is
/// held through the pause once its body is read, and registers when the
/// tenant thaws.
#[test]
fn a_routed_registration_too_large_to_send_again_that_meets_a_freeze_is_held_and_registers() {
    let ex = TestExecutor::start();
    ex.deploy("t1", "acc", ACCUMULATOR);
    let (status, answer) = post_through_a_pause(
        &ex,
        "/functions?name=big",
        ("application/wasm", &large_module()),
    );
    assert_eq!(status, 201, "{answer}");
    let listed = ex.get("t1", "/functions").json();
    assert!(listed.to_string().contains("\"big\""), "{listed}");
    assert_eq!(
        ex.metric("tensor_wasm_held_requests_total{outcome=\"ran\"}"),
        1.0
    );
}

/// A request routed by the placement of `epoch` (`x-tensor-wasm-epoch`).
fn routed_reply(ex: &TestExecutor, tenant: &str, path: &str, body: &[u8], epoch: &str) -> Reply {
    ex.post_with(
        tenant,
        path,
        "application/json",
        body,
        &[("x-tensor-wasm-epoch", epoch)],
    )
}

/// [`routed_reply`]'s status and error code.
fn routed(ex: &TestExecutor, tenant: &str, path: &str, body: &[u8], epoch: &str) -> (u16, String) {
    let r = routed_reply(ex, tenant, path, body, epoch);
    (r.status, r.code())
}

#[test]
fn requests_routed_by_a_placement_the_executor_moved_past_are_refused_and_run_nowhere() {
    let a = TestExecutor::start();
    let b = TestExecutor::start();
    let id = a.deploy("t1", "acc", ACCUMULATOR);
    let invoke = format!("/functions/{id}/invoke");
    let x = f32_inputs(&[("x", &[3], &[1.0, 1.0, 1.0])]);
    assert_eq!(routed(&a, "t1", &invoke, &x, "5").0, 200);
    // A request of an older placement than one seen already.
    assert_eq!(
        routed(&a, "t1", &invoke, &x, "4"),
        (421, "placement_stale".into())
    );
    assert_eq!(
        routed(&a, "t1", &invoke, &x, "x"),
        (400, "invalid_input".into())
    );

    // Frozen on its way out: refused as stale, whatever the epoch; a
    // request without one is answered as before.
    let snap = export(&a, "t1");
    assert_eq!(
        routed(&a, "t1", &invoke, &x, "5"),
        (421, "placement_stale".into())
    );
    let r = a.post("t1", &invoke, "application/json", &x);
    assert_eq!((r.status, r.code().as_str()), (409, "tenant_frozen"));

    // Imported on B, dropped from A by the placement of epoch 9, by a
    // drop that does not say where it went.
    moved_unnamed(&a, &b, "t1", &snap, "9", false);

    // A stale proxy can neither run the tenant on A nor make it anew
    // there: both are refused, and A holds nothing of it.
    assert_eq!(
        routed(&a, "t1", &invoke, &x, "5"),
        (421, "placement_stale".into())
    );
    let r = a.post_with(
        "t1",
        "/functions?name=again",
        "application/wasm",
        &wat::parse_str(ACCUMULATOR).unwrap(),
        &[("x-tensor-wasm-epoch", "8")],
    );
    assert_eq!((r.status, r.code().as_str()), (421, "placement_stale"));
    let listed = a.get("t1", "/functions");
    assert_eq!(listed.json()["functions"].as_array().unwrap().len(), 0);

    // On B, the new placement finds the state as it left A.
    let r = routed_reply(&b, "t1", &invoke, &x, "9");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["outputs"]["sum"]["data"][0], 2.0);

    // A placement newer than the one that took it away may put it on A
    // again.
    assert_eq!(
        routed(&a, "t1", &invoke, &x, "10"),
        (404, "function_not_found".into())
    );
}

/// The accumulator, with `n` more functions of long arithmetic: a module
/// that takes a while to compile.
fn slow_to_compile(n: usize) -> Vec<u8> {
    let mut extra = String::new();
    for i in 0..n {
        extra.push_str(&format!(
            "  (func $f{i} (param i64) (result i64)\n    (local.get 0)\n"
        ));
        for k in 0..400 {
            extra.push_str(&format!(
                "    (i64.mul (i64.const {})) (i64.add (local.get 0)) (i64.rotl (i64.const {}))\n",
                k * 2 + 1,
                k % 63
            ));
        }
        extra.push_str("  )\n");
    }
    let wat = ACCUMULATOR
        .trim_end()
        .strip_suffix(')')
        .unwrap()
        .to_string()
        + &extra
        + ")";
    wat::parse_str(wat).unwrap()
}

/// An export waits for a registration under way: the function is in the
/// snapshot if and only if its registration was answered 201, so a move
/// loses no function that a client saw registered.
#[test]
fn an_export_waits_for_a_registration_under_way() {
    let ex = TestExecutor::start();
    ex.deploy("t1", "acc", ACCUMULATOR);
    let wasm = slow_to_compile(800);
    let started = std::time::Instant::now();
    let (status, took) = std::thread::scope(|s| {
        let registering = s.spawn(|| {
            let r = ex.post("t1", "/functions?name=slow", "application/wasm", &wasm);
            (r.status, started.elapsed())
        });
        std::thread::sleep(Duration::from_millis(300));
        let snap = export(&ex, "t1");
        let exported = started.elapsed();
        let (status, registered) = registering.join().unwrap();
        eprintln!(
            "{} bytes; registered at {registered:?} ({status}), exported at {exported:?}",
            wasm.len()
        );
        let b = TestExecutor::start();
        let r = b.internal("POST", "/internal/tenants/t1/import", &snap);
        assert_eq!(r.status, 200, "{}", r.text());
        let names: Vec<String> = b.get("t1", "/functions").json()["functions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            names.contains(&"slow".to_string()),
            status == 201,
            "{status}: {names:?}"
        );
        (status, registered)
    });
    assert!(status == 201 || status == 409, "{status} after {took:?}");
}

/// An invocation's body past what a proxy keeps to send again (64 KiB):
/// `x` of `[1, 1, 1]`, padded with spaces.
fn large_inputs() -> Vec<u8> {
    let mut body = f32_inputs(&[("x", &[3], &[1.0, 1.0, 1.0])]);
    body.resize(80 << 10, b' ');
    body
}

/// A routed call whose body the proxy could not send again is not refused
/// for its tenant's pause: the executor holds it, and it runs, once, when
/// the tenant thaws.
#[test]
fn a_routed_call_too_large_to_send_again_is_held_through_a_pause_and_runs() {
    let ex = TestExecutor::start();
    let id = ex.deploy("t1", "acc", ACCUMULATOR);
    let invoke = format!("/functions/{id}/invoke");
    let body = large_inputs();
    export(&ex, "t1");
    // One the proxy can send again is refused at once.
    let small = f32_inputs(&[("x", &[3], &[1.0, 1.0, 1.0])]);
    assert_eq!(
        routed(&ex, "t1", &invoke, &small, "5"),
        (421, "placement_stale".into())
    );
    let (status, sum) = std::thread::scope(|s| {
        let held = s.spawn(|| {
            let r = routed_reply(&ex, "t1", &invoke, &body, "5");
            (r.status, r.json()["outputs"]["sum"]["data"][0].clone())
        });
        std::thread::sleep(Duration::from_millis(300));
        assert!(!held.is_finished(), "held while the tenant is frozen");
        let r = ex.internal("POST", "/internal/tenants/t1/thaw", b"");
        assert!(r.status < 300, "{}", r.text());
        held.join().unwrap()
    });
    assert_eq!(status, 200);
    assert_eq!(sum, 1.0, "it ran once");
    assert_eq!(routed(&ex, "t1", &invoke, &small, "5").0, 200);
    assert_eq!(
        ex.metric("tensor_wasm_held_requests_total{outcome=\"ran\"}"),
        1.0
    );
}

/// A routed call whose body the proxy could not send again, let in before
/// its tenant froze (its body still arriving), is held through the pause
/// once its body is read, and runs when the tenant thaws.
#[test]
fn a_routed_call_too_large_to_send_again_that_meets_a_freeze_after_it_was_let_in_runs_after_it() {
    let ex = TestExecutor::start();
    let id = ex.deploy("t1", "acc", ACCUMULATOR);
    let invoke = format!("/functions/{id}/invoke");
    let (status, answer) =
        post_through_a_pause(&ex, &invoke, ("application/json", &large_inputs()));
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("\"data\":[1.0,"), "{answer}");
}

/// A routed call whose body the proxy could not send again, whose tenant
/// moved while it arrived, is sent on to the executor the tenant moved to
/// (which the move's drop named) and runs there, on the tenant's one copy.
#[test]
fn a_routed_call_too_large_to_send_again_is_sent_on_to_where_its_tenant_moved() {
    let a = TestExecutor::start();
    let b = TestExecutor::start();
    let id = a.deploy("t1", "acc", ACCUMULATOR);
    let invoke = format!("/functions/{id}/invoke");
    let small = f32_inputs(&[("x", &[3], &[1.0, 1.0, 1.0])]);
    assert_eq!(routed(&a, "t1", &invoke, &small, "5").0, 200);
    let (status, answer) = post_slowly(
        &a,
        "t1",
        &invoke,
        "5",
        ("application/json", &large_inputs()),
        || {
            let snap = export(&a, "t1");
            moved(&a, &b, "t1", &snap, "9");
        },
    );
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("\"data\":[2.0,"), "{answer}");
    // It ran on the one copy, where the tenant lives now.
    let r = routed_reply(&b, "t1", &invoke, &small, "9");
    assert_eq!(r.json()["outputs"]["sum"]["data"][0], 3.0, "{}", r.text());
    // Sent on as soon as it arrives, once the tenant has left.
    let r = routed_reply(&a, "t1", &invoke, &large_inputs(), "5");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["outputs"]["sum"]["data"][0], 4.0, "{}", r.text());
}

/// After `t1` (one accumulator, called once at epoch 5) moved from `a` to
/// `b` by the placement of epoch 9: a call and a registration routed by
/// older placements reach `a`, are sent on, and run on `b`, and `a` holds
/// nothing of the tenant.
fn stale_calls_are_sent_on(a: &TestExecutor, b: &TestExecutor, invoke: &str, x: &[u8]) {
    let r = routed_reply(a, "t1", invoke, x, "5");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["outputs"]["sum"]["data"][0], 2.0, "{}", r.text());
    let r = a.post_with(
        "t1",
        "/functions?name=again",
        "application/wasm",
        &wat::parse_str(ACCUMULATOR).unwrap(),
        &[("x-tensor-wasm-epoch", "8")],
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let info = a.internal("GET", "/internal/info", b"").json();
    assert_eq!(info["tenants"], serde_json::json!([]), "{info}");
    let listed = b.get("t1", "/functions").json();
    assert_eq!(listed["functions"].as_array().unwrap().len(), 2, "{listed}");
}

/// Once a tenant has left by a newer placement, and the drop named where
/// it went, every request routed by an older one (a proxy cut off from
/// etcd) is sent on there, small or large, an invocation or a
/// registration: it runs on the tenant's one copy, and the executor it
/// left makes no copy anew.
#[test]
fn requests_routed_by_a_placement_the_executor_moved_past_are_sent_on_to_where_the_tenant_went() {
    let a = TestExecutor::start();
    let b = TestExecutor::start();
    let id = a.deploy("t1", "acc", ACCUMULATOR);
    let invoke = format!("/functions/{id}/invoke");
    let x = f32_inputs(&[("x", &[3], &[1.0, 1.0, 1.0])]);
    assert_eq!(routed(&a, "t1", &invoke, &x, "5").0, 200);
    let snap = export(&a, "t1");
    moved(&a, &b, "t1", &snap, "9");

    stale_calls_are_sent_on(&a, &b, &invoke, &x);
    assert_eq!(
        a.metric("tensor_wasm_sent_on_requests_total{outcome=\"answered\"}"),
        2.0
    );

    // One sent on twice already is refused, not sent a third time.
    let r = a.post_with(
        "t1",
        &invoke,
        "application/json",
        &x,
        &[("x-tensor-wasm-epoch", "5"), ("x-tensor-wasm-hops", "2")],
    );
    assert_eq!((r.status, r.code().as_str()), (421, "placement_stale"));
    assert_eq!(
        a.metric("tensor_wasm_sent_on_requests_total{outcome=\"refused\"}"),
        1.0
    );

    // Where the tenant is, its state counted each call once.
    let r = routed_reply(&b, "t1", &invoke, &x, "9");
    assert_eq!(r.json()["outputs"]["sum"]["data"][0], 3.0, "{}", r.text());
}

/// Requests sent on to where their tenant went share connections: a proxy
/// cut off from etcd may send a moved tenant's every request that way, and
/// a connection each would hold a port each on the executor it left.
#[test]
fn requests_sent_on_share_connections() {
    let a = TestExecutor::start();
    let b = TestExecutor::start();
    let id = a.deploy("t1", "acc", ACCUMULATOR);
    let invoke = format!("/functions/{id}/invoke");
    let x = f32_inputs(&[("x", &[3], &[1.0, 1.0, 1.0])]);
    let snap = export(&a, "t1");
    let (relay, accepted) = counting_relay(b.url("").trim_start_matches("http://").to_string());
    moved_to(&a, &b, "t1", &snap, "9", Some(&relay));
    for n in 1..=20 {
        let r = routed_reply(&a, "t1", &invoke, &x, "5");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["outputs"]["sum"]["data"][0], f64::from(n));
    }
    let connections = accepted.load(Ordering::SeqCst);
    assert!(
        connections <= 2,
        "20 requests sent on one after another took {connections} connections"
    );
}

/// The tenants that left an executor stay fenced there across its restart:
/// a stale proxy's requests are still sent on to where the tenant went,
/// and a registration makes no copy of it anew on the executor it left.
#[test]
fn a_tenant_that_left_is_still_sent_on_after_its_old_executor_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let start = || TestExecutor::start_in(dir.path(), small_limits(), TenantQuotas::default());
    let a = start();
    let b = TestExecutor::start();
    let id = a.deploy("t1", "acc", ACCUMULATOR);
    let invoke = format!("/functions/{id}/invoke");
    let x = f32_inputs(&[("x", &[3], &[1.0, 1.0, 1.0])]);
    assert_eq!(routed(&a, "t1", &invoke, &x, "5").0, 200);
    let snap = export(&a, "t1");
    moved(&a, &b, "t1", &snap, "9");
    drop(a);
    let a = start();

    stale_calls_are_sent_on(&a, &b, &invoke, &x);
}
