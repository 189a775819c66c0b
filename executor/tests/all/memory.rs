//! Host memory under quotas: linear memory and host tensors count against
//! the tenant's quota and the executor's budget, checked before anything is
//! allocated.

use tensor_wasm_executor::config::{EngineLimits, TenantQuotas};

use crate::harness::{TestExecutor, small_limits};

/// Grows its memory by the pages named in the raw body (a u32) and answers
/// `memory.grow`'s result (an i32: the old size in pages, or -1).
const GROWER: &str = r#"(module
  (import "tensor" "input_read" (func $input_read (param i32 i32 i32) (result i32)))
  (import "tensor" "output_write" (func $output_write (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "handle") (result i32)
    (drop (call $input_read (i32.const 0) (i32.const 0) (i32.const 4)))
    (i32.store (i32.const 8) (memory.grow (i32.load (i32.const 0))))
    (drop (call $output_write (i32.const 8) (i32.const 4)))
    (i32.const 0)))"#;

/// A module whose memory starts at 32 pages (2 MiB).
const BIG_START: &str = r#"(module (memory (export "memory") 32)
  (func (export "handle") (result i32) (i32.const 0)))"#;

/// Makes a zero tensor of the bytes named in the raw body (a u32, as u8
/// elements) and answers the handle (or the error code).
const ZEROS: &str = r#"(module
  (import "tensor" "input_read" (func $input_read (param i32 i32 i32) (result i32)))
  (import "tensor" "output_write" (func $output_write (param i32 i32) (result i32)))
  (import "tensor" "zeros" (func $zeros (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "handle") (result i32)
    (drop (call $input_read (i32.const 0) (i32.const 0) (i32.const 4)))
    ;; dtype 5 is u8; shape [n] at 0
    (i32.store (i32.const 8) (call $zeros (i32.const 5) (i32.const 0) (i32.const 1)))
    (drop (call $output_write (i32.const 8) (i32.const 4)))
    (i32.const 0)))"#;

fn call(ex: &TestExecutor, tenant: &str, id: &str, n: u32) -> i32 {
    let r = ex.post(
        tenant,
        &format!("/functions/{id}/invoke"),
        "application/octet-stream",
        &n.to_le_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    i32::from_le_bytes(r.body[..4].try_into().unwrap())
}

const MIB: u32 = 16; // pages

#[test]
fn linear_memory_counts_against_the_tenants_host_quota() {
    let dir = tempfile::tempdir().unwrap();
    let quotas = TenantQuotas {
        host_memory_bytes: 4 << 20,
        ..TenantQuotas::default()
    };
    let ex = TestExecutor::start_in(dir.path(), small_limits(), quotas);
    let grower = ex.deploy("t1", "grower", GROWER);
    // One page to start, then 2 MiB: 33 pages held.
    assert_eq!(call(&ex, "t1", &grower, 2 * MIB), 1);
    assert_eq!(
        ex.metric("tensor_wasm_host_memory_bytes"),
        f64::from(33 * 65536)
    );
    // 2 MiB more would pass 4 MiB: the grow fails, the instance lives on.
    assert_eq!(call(&ex, "t1", &grower, 2 * MIB), -1);
    assert_eq!(call(&ex, "t1", &grower, MIB), 33);
    // A new instance whose memory cannot fit is refused for the quota.
    let big = ex.deploy("t1", "big", BIG_START);
    let r = ex.post("t1", &format!("/functions/{big}/invoke"), "text/plain", b"");
    assert_eq!(
        (r.status, r.code().as_str()),
        (422, "quota_exceeded"),
        "{}",
        r.text()
    );
    assert!(r.text().contains("host memory"), "{}", r.text());
    // Another tenant has a quota of its own.
    let other = ex.deploy("t2", "big", BIG_START);
    let r = ex.post(
        "t2",
        &format!("/functions/{other}/invoke"),
        "text/plain",
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // Instances give their memory back when they go.
    assert_eq!(ex.delete("t1", &format!("/functions/{grower}")).status, 204);
    assert_eq!(ex.delete("t2", &format!("/functions/{other}")).status, 204);
    ex.wait_metric("tensor_wasm_host_memory_bytes", 0.0);
}

#[test]
fn all_tenants_together_stay_within_the_executors_budget() {
    let dir = tempfile::tempdir().unwrap();
    let limits = EngineLimits {
        host_memory_bytes: 6 << 20,
        ..small_limits()
    };
    let quotas = TenantQuotas {
        host_memory_bytes: 4 << 20,
        ..TenantQuotas::default()
    };
    let ex = TestExecutor::start_in(dir.path(), limits, quotas);
    assert_eq!(
        ex.metric("tensor_wasm_host_memory_limit_bytes"),
        f64::from(6u32 << 20)
    );
    let a = ex.deploy("t1", "grower", GROWER);
    assert_eq!(call(&ex, "t1", &a, 3 * MIB), 1); // t1: 3 MiB + 1 page
    let big = ex.deploy("t2", "big", BIG_START); // needs 2 MiB; 3 MiB - 1 page are left
    let r = ex.post("t2", &format!("/functions/{big}/invoke"), "text/plain", b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let b = ex.deploy("t2", "grower", GROWER);
    let r = ex.post(
        "t2",
        &format!("/functions/{b}/invoke"),
        "application/octet-stream",
        &0u32.to_le_bytes(),
    );
    assert_eq!(r.status, 200, "one page still fits: {}", r.text());
    assert_eq!(call(&ex, "t2", &b, MIB), -1, "past the executor's budget");
    // A third tenant, within its own quota, finds the executor full.
    let c = ex.deploy("t3", "big", BIG_START);
    let r = ex.post("t3", &format!("/functions/{c}/invoke"), "text/plain", b"");
    assert_eq!(
        (r.status, r.code().as_str()),
        (503, "capacity_exhausted"),
        "{}",
        r.text()
    );
}

#[test]
fn tensors_on_the_cpu_count_as_host_memory() {
    let dir = tempfile::tempdir().unwrap();
    let quotas = TenantQuotas {
        host_memory_bytes: 2 << 20,
        ..TenantQuotas::default()
    };
    let ex = TestExecutor::start_in(dir.path(), small_limits(), quotas);
    let id = ex.deploy("t1", "zeros", ZEROS);
    // 1 MiB fits beside the instance's page; another 1 MiB does not.
    assert!(call(&ex, "t1", &id, 1 << 20) > 0);
    assert_eq!(call(&ex, "t1", &id, 1 << 20), -5, "quota_exceeded");
    assert_eq!(
        ex.metric("tensor_wasm_host_memory_bytes"),
        f64::from((1u32 << 20) + 65536)
    );
}
