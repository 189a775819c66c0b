//! Every import of guest ABI v2, through a real executor.

use std::sync::Arc;

use tensor_wasm_kernels::{Backend, BinaryOp, CpuBackend, DType, ReduceOp, Tensor, UnaryOp};

use crate::harness::{TestExecutor, f32_inputs, f32_output, multipart};

/// Imports every `tensor` function, so guests below can call any of them.
pub const IMPORTS: &str = r#"
  (import "tensor" "new" (func $new (param i32 i32 i32 i32 i32) (result i32)))
  (import "tensor" "zeros" (func $zeros (param i32 i32 i32) (result i32)))
  (import "tensor" "read" (func $read (param i32 i32 i32) (result i32)))
  (import "tensor" "dtype" (func $dtype (param i32) (result i32)))
  (import "tensor" "ndim" (func $ndim (param i32) (result i32)))
  (import "tensor" "shape" (func $shape (param i32 i32 i32) (result i32)))
  (import "tensor" "free" (func $free (param i32) (result i32)))
  (import "tensor" "input" (func $input (param i32 i32) (result i32)))
  (import "tensor" "output" (func $output (param i32 i32 i32) (result i32)))
  (import "tensor" "asset" (func $asset (param i32 i32) (result i32)))
  (import "tensor" "input_len" (func $input_len (result i32)))
  (import "tensor" "input_read" (func $input_read (param i32 i32 i32) (result i32)))
  (import "tensor" "output_write" (func $output_write (param i32 i32) (result i32)))
  (import "tensor" "set_error" (func $set_error (param i32 i32) (result i32)))
  (import "tensor" "last_error" (func $last_error (param i32 i32) (result i32)))
  (import "tensor" "matmul" (func $matmul (param i32 i32) (result i32)))
  (import "tensor" "binary" (func $binary (param i32 i32 i32) (result i32)))
  (import "tensor" "scalar" (func $scalar (param i32 i32 f32) (result i32)))
  (import "tensor" "unary" (func $unary (param i32 i32) (result i32)))
  (import "tensor" "reduce" (func $reduce (param i32 i32 i32 i32) (result i32)))
  (import "tensor" "softmax" (func $softmax (param i32 i32) (result i32)))
  (import "tensor" "layer_norm" (func $layer_norm (param i32 i32 i32 f32) (result i32)))
  (import "tensor" "rms_norm" (func $rms_norm (param i32 i32 f32) (result i32)))
  (import "tensor" "reshape" (func $reshape (param i32 i32 i32) (result i32)))
  (import "tensor" "transpose" (func $transpose (param i32 i32 i32) (result i32)))
  (import "tensor" "cast" (func $cast (param i32 i32) (result i32)))
  (import "tensor" "gather" (func $gather (param i32 i32) (result i32)))
  (import "tensor" "concat" (func $concat (param i32 i32 i32) (result i32)))
  (import "tensor" "attention" (func $attention (param i32 i32 i32 i32) (result i32)))
  (func $must (param i32) (result i32)
    (if (i32.lt_s (local.get 0) (i32.const 0)) (then unreachable))
    (local.get 0))
"#;

fn guest(body: &str) -> String {
    format!("(module {IMPORTS} {body})")
}

/// Calls every tensor op once on input `x` [2, 3] and outputs each result.
const EVERY_OP: &str = r#"
  (memory (export "memory") 1)
  (data (i32.const 0) "x")
  (data (i32.const 16) "\03\00\00\00\02\00\00\00")
  (data (i32.const 32) "\00\00\80\3f\00\00\00\40\00\00\40\40\00\00\80\40\00\00\a0\40\00\00\c0\40")
  (data (i32.const 64) "\02\00\00\00")
  (data (i32.const 72) "\01\00\00\00\00\00\00\00")
  (data (i32.const 80) "\03\00\00\00\ff\ff\ff\ff")
  (data (i32.const 96) "\01\00\00\00\00\00\00\00")
  (data (i32.const 112) "matmul")
  (data (i32.const 120) "binary")
  (data (i32.const 128) "scalar")
  (data (i32.const 136) "unary")
  (data (i32.const 144) "reduce")
  (data (i32.const 152) "softmax")
  (data (i32.const 160) "layer_norm")
  (data (i32.const 176) "rms_norm")
  (data (i32.const 184) "reshape")
  (data (i32.const 192) "transpose")
  (data (i32.const 208) "cast")
  (data (i32.const 216) "gather")
  (data (i32.const 224) "concat")
  (data (i32.const 232) "attention")
  (data (i32.const 248) "zeros")
  (data (i32.const 256) "ok")
  (func (export "handle") (result i32)
    (local $x i32) (local $w i32) (local $y i32) (local $idx i32)
    (local.set $x (call $must (call $input (i32.const 0) (i32.const 1))))
    ;; dtype, ndim, shape
    (if (i32.ne (call $dtype (local.get $x)) (i32.const 0)) (then unreachable))
    (if (i32.ne (call $ndim (local.get $x)) (i32.const 2)) (then unreachable))
    (if (i32.ne (call $shape (local.get $x) (i32.const 600) (i32.const 8)) (i32.const 2)) (then unreachable))
    (if (i32.ne (i32.load (i32.const 600)) (i32.const 2)) (then unreachable))
    (if (i32.ne (i32.load (i32.const 604)) (i32.const 3)) (then unreachable))
    ;; read: exact, then a buffer too small (-7)
    (if (i32.ne (call $read (local.get $x) (i32.const 512) (i32.const 24)) (i32.const 24)) (then unreachable))
    (if (i32.ne (call $read (local.get $x) (i32.const 512) (i32.const 23)) (i32.const -7)) (then unreachable))
    (local.set $w (call $must (call $new (i32.const 0) (i32.const 16) (i32.const 2) (i32.const 32) (i32.const 24))))
    (local.set $y (call $must (call $matmul (local.get $x) (local.get $w))))
    (drop (call $must (call $output (i32.const 112) (i32.const 6) (local.get $y))))
    (drop (call $must (call $output (i32.const 120) (i32.const 6) (call $must (call $binary (i32.const 0) (local.get $y) (local.get $y))))))
    (drop (call $must (call $output (i32.const 128) (i32.const 6) (call $must (call $scalar (i32.const 2) (local.get $y) (f32.const -0.5))))))
    (drop (call $must (call $output (i32.const 136) (i32.const 5) (call $must (call $unary (i32.const 7) (local.get $x))))))
    (drop (call $must (call $output (i32.const 144) (i32.const 6) (call $must (call $reduce (i32.const 0) (local.get $x) (i32.const -1) (i32.const 0))))))
    (drop (call $must (call $output (i32.const 152) (i32.const 7) (call $must (call $softmax (local.get $x) (i32.const -1))))))
    (drop (call $must (call $output (i32.const 160) (i32.const 10) (call $must (call $layer_norm (local.get $x) (i32.const 0) (i32.const 0) (f32.const 1e-5))))))
    (drop (call $must (call $output (i32.const 176) (i32.const 8) (call $must (call $rms_norm (local.get $x) (i32.const 0) (f32.const 1e-6))))))
    (drop (call $must (call $output (i32.const 184) (i32.const 7) (call $must (call $reshape (local.get $x) (i32.const 80) (i32.const 2))))))
    (drop (call $must (call $output (i32.const 192) (i32.const 9) (call $must (call $transpose (local.get $x) (i32.const 96) (i32.const 2))))))
    (drop (call $must (call $output (i32.const 208) (i32.const 4) (call $must (call $cast (local.get $x) (i32.const 3))))))
    (local.set $idx (call $must (call $new (i32.const 3) (i32.const 64) (i32.const 1) (i32.const 72) (i32.const 8))))
    (drop (call $must (call $output (i32.const 216) (i32.const 6) (call $must (call $gather (local.get $x) (local.get $idx))))))
    (drop (call $must (call $output (i32.const 224) (i32.const 6) (call $must (call $concat (local.get $x) (local.get $x) (i32.const 0))))))
    (drop (call $must (call $output (i32.const 232) (i32.const 9) (call $must (call $attention (local.get $x) (local.get $x) (local.get $x) (i32.const 1))))))
    (drop (call $must (call $output (i32.const 248) (i32.const 5) (call $must (call $zeros (i32.const 0) (i32.const 64) (i32.const 1))))))
    ;; free twice: the second is a bad handle, with a message
    (if (i32.ne (call $free (local.get $w)) (i32.const 0)) (then unreachable))
    (if (i32.ne (call $free (local.get $w)) (i32.const -1)) (then unreachable))
    (if (i32.le_s (call $last_error (i32.const 700) (i32.const 64)) (i32.const 0)) (then unreachable))
    (drop (call $must (call $output_write (i32.const 256) (i32.const 2))))
    (i32.const 0))
"#;

fn cpu_f32(b: &CpuBackend, dims: &[usize], v: &[f32]) -> Tensor {
    b.from_bytes(DType::F32, dims, bytemuck::cast_slice(v))
        .unwrap()
}

fn as_f32(b: &CpuBackend, t: &Tensor) -> Vec<f32> {
    let t = b.cast(t, DType::F32).unwrap();
    bytemuck::pod_collect_to_vec(&b.to_bytes(&t).unwrap())
}

fn close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: {got:?} vs {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g - w).abs() <= 1e-5 * (w.abs() + 1.0),
            "{what}: {got:?} vs {want:?}"
        );
    }
}

#[test]
fn every_op_matches_the_cpu_kernels() {
    let ex = TestExecutor::start();
    let id = ex.deploy("t1", "every-op", &guest(EVERY_OP));
    let xs = [0.5f32, -1.0, 2.0, 3.0, -0.25, 1.5];
    let r = ex.post(
        "t1",
        &format!("/functions/{id}/invoke"),
        "application/json",
        &f32_inputs(&[("x", &[2, 3], &xs)]),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["raw_b64"], "b2s=", "raw bytes travel base64");

    let b = CpuBackend::default();
    let x = cpu_f32(&b, &[2, 3], &xs);
    let w = cpu_f32(&b, &[3, 2], &[1., 2., 3., 4., 5., 6.]);
    let y = b.matmul(&x, &w).unwrap();
    let idx = b
        .from_bytes(DType::I32, &[2], bytemuck::cast_slice(&[1i32, 0]))
        .unwrap();
    let expected: Vec<(&str, Tensor)> = vec![
        ("matmul", y.clone()),
        ("binary", b.binary(BinaryOp::Add, &y, &y).unwrap()),
        ("scalar", b.scalar(BinaryOp::Mul, &y, -0.5).unwrap()),
        ("unary", b.unary(UnaryOp::Gelu, &x).unwrap()),
        ("reduce", b.reduce(ReduceOp::Sum, &x, -1, false).unwrap()),
        ("softmax", b.softmax(&x, -1).unwrap()),
        ("layer_norm", b.layer_norm(&x, None, None, 1e-5).unwrap()),
        ("rms_norm", b.rms_norm(&x, None, 1e-6).unwrap()),
        ("reshape", b.reshape(&x, &[3, -1]).unwrap()),
        ("transpose", b.transpose(&x, &[1, 0]).unwrap()),
        ("cast", b.cast(&x, DType::I32).unwrap()),
        ("gather", b.gather(&x, &idx).unwrap()),
        ("concat", b.concat(&x, &x, 0).unwrap()),
        ("attention", b.attention(&x, &x, &x, true).unwrap()),
        ("zeros", b.zeros(DType::F32, &[2]).unwrap()),
    ];
    for (name, want) in expected {
        let out = &v["outputs"][name];
        assert_eq!(out["dtype"], want.dtype().name(), "{name} dtype");
        let shape: Vec<usize> = serde_json::from_value(out["shape"].clone()).unwrap();
        assert_eq!(shape, want.dims(), "{name} shape");
        close(&f32_output(&r, name), &as_f32(&b, &want), name);
    }
}

#[test]
fn state_persists_between_invocations() {
    let ex = TestExecutor::start();
    let id = ex.deploy(
        "t1",
        "counter",
        &guest(
            r#"(memory (export "memory") 1)
            (global $n (mut i32) (i32.const 0))
            (func (export "handle") (result i32)
              (global.set $n (i32.add (global.get $n) (i32.const 1)))
              (i32.store (i32.const 0) (global.get $n))
              (drop (call $output_write (i32.const 0) (i32.const 4)))
              (i32.const 0))"#,
        ),
    );
    for expect in 1u32..=3 {
        let r = ex.post(
            "t1",
            &format!("/functions/{id}/invoke"),
            "application/octet-stream",
            b"",
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/octet-stream"));
        assert_eq!(r.body, expect.to_le_bytes());
    }
}

#[test]
fn raw_bodies_round_trip() {
    let ex = TestExecutor::start();
    let id = ex.deploy(
        "t1",
        "echo",
        &guest(
            r#"(memory (export "memory") 2)
            (func (export "handle") (result i32)
              (local $n i32)
              (local.set $n (call $input_len))
              ;; read from offset 1 onwards, then append the first byte
              (drop (call $input_read (i32.const 1) (i32.const 0) (i32.const 65536)))
              (drop (call $output_write (i32.const 0) (i32.sub (local.get $n) (i32.const 1))))
              (drop (call $input_read (i32.const 0) (i32.const 0) (i32.const 1)))
              (drop (call $output_write (i32.const 0) (i32.const 1)))
              (i32.const 0))"#,
        ),
    );
    let r = ex.post(
        "t1",
        &format!("/functions/{id}/invoke"),
        "text/plain",
        b"hello",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, b"elloh");
}

#[test]
fn out_of_bounds_pointers_are_errors_not_crashes() {
    let ex = TestExecutor::start();
    let id = ex.deploy(
        "t1",
        "oob",
        &guest(
            r#"(memory (export "memory") 1)
            (func (export "handle") (result i32)
              ;; every pointer/length pair below reaches past the one page
              (i32.store (i32.const 0) (call $zeros (i32.const 0) (i32.const 65534) (i32.const 2)))
              (i32.store (i32.const 4) (call $new (i32.const 0) (i32.const 8) (i32.const 0) (i32.const -1) (i32.const 4)))
              (i32.store (i32.const 8) (call $input (i32.const 65535) (i32.const 10)))
              (i32.store (i32.const 12) (call $output_write (i32.const 65000) (i32.const 1000)))
              (i32.store (i32.const 16) (call $input_read (i32.const 0) (i32.const 70000) (i32.const 1)))
              (drop (call $output_write (i32.const 0) (i32.const 20)))
              (i32.const 0))"#,
        ),
    );
    let r = ex.post(
        "t1",
        &format!("/functions/{id}/invoke"),
        "application/octet-stream",
        b"x",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let codes: Vec<i32> = r
        .body
        .chunks(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(codes, vec![-4; 5]);
    // The executor is unharmed and serves again.
    let r = ex.post(
        "t1",
        &format!("/functions/{id}/invoke"),
        "application/octet-stream",
        b"x",
    );
    assert_eq!(r.status, 200);
}

#[test]
fn traps_and_deadlines_replace_the_instance() {
    let ex = TestExecutor::start();
    let id = ex.deploy(
        "t1",
        "moody",
        &guest(
            r#"(memory (export "memory") 1)
            (global $n (mut i32) (i32.const 0))
            (func (export "handle") (result i32)
              (global.set $n (i32.add (global.get $n) (i32.const 1)))
              (if (i32.eq (call $input_len) (i32.const 4)) (then unreachable))
              (if (i32.eq (call $input_len) (i32.const 5)) (then (loop $l (br $l))))
              (i32.store (i32.const 0) (global.get $n))
              (drop (call $output_write (i32.const 0) (i32.const 4)))
              (i32.const 0))"#,
        ),
    );
    let path = format!("/functions/{id}/invoke");
    let r = ex.post("t1", &path, "text/plain", b"1");
    assert_eq!(r.body, 1u32.to_le_bytes());
    let r = ex.post("t1", &path, "text/plain", b"trap");
    assert_eq!(
        (r.status, r.code().as_str()),
        (500, "guest_trap"),
        "{}",
        r.text()
    );
    // A fresh instance: the counter starts over.
    let r = ex.post("t1", &path, "text/plain", b"1");
    assert_eq!(r.body, 1u32.to_le_bytes());
    let r = ex.post("t1", &path, "text/plain", b"spin!");
    assert_eq!(
        (r.status, r.code().as_str()),
        (504, "deadline_exceeded"),
        "{}",
        r.text()
    );
    let r = ex.post("t1", &path, "text/plain", b"1");
    assert_eq!(r.body, 1u32.to_le_bytes());
}

#[test]
fn tensor_op_loops_stop_at_the_deadline() {
    let ex = TestExecutor::start();
    let wasm = wat::parse_str(guest(
        r#"(memory (export "memory") 1)
        (data (i32.const 0) "\00\01\00\00")
        (func (export "handle") (result i32)
          (local $t i32)
          (local.set $t (call $zeros (i32.const 0) (i32.const 0) (i32.const 1)))
          (loop $l
            (drop (call $free (call $unary (i32.const 1) (local.get $t))))
            (br $l))
          (i32.const 0))"#,
    ))
    .unwrap();
    let r = ex.register_with_config("t1", "busy", &wasm, r#"{"deadline_ms": 200}"#);
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["config"]["deadline_ms"], 200);
    let id = r.json()["id"].as_str().unwrap().to_string();
    let r = ex.post("t1", &format!("/functions/{id}/invoke"), "text/plain", b"");
    assert_eq!(
        (r.status, r.code().as_str()),
        (504, "deadline_exceeded"),
        "{}",
        r.text()
    );
}

/// A single long op (a 4096³ matmul, seconds of the executor's cores)
/// stops between chunks once the deadline passes: the invocation is
/// answered `deadline_exceeded`, and its function serves the next call.
#[test]
fn a_long_matmul_stops_at_the_deadline() {
    let ex = TestExecutor::start();
    let wasm = wat::parse_str(guest(
        r#"(memory (export "memory") 1)
        (data (i32.const 0) "\00\10\00\00\00\10\00\00")
        (func (export "handle") (result i32)
          (local $t i32)
          (if (i32.eqz (call $input_len)) (then (return (i32.const 0))))
          (local.set $t (call $must (call $zeros (i32.const 0) (i32.const 0) (i32.const 2))))
          (drop (call $must (call $matmul (local.get $t) (local.get $t))))
          (i32.const 0))"#,
    ))
    .unwrap();
    let r = ex.register_with_config("t1", "long", &wasm, r#"{"deadline_ms": 100}"#);
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let path = format!("/functions/{id}/invoke");
    let r = ex.post("t1", &path, "text/plain", b"go");
    assert_eq!(
        (r.status, r.code().as_str()),
        (504, "deadline_exceeded"),
        "{}",
        r.text()
    );
    let r = ex.post("t1", &path, "text/plain", b"");
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn function_errors_carry_the_guest_message() {
    let ex = TestExecutor::start();
    let id = ex.deploy(
        "t1",
        "fails",
        &guest(
            r#"(memory (export "memory") 1)
            (data (i32.const 0) "no input named x")
            (func (export "handle") (result i32)
              (if (i32.eq (call $input (i32.const 100) (i32.const 1)) (i32.const -6))
                (then (drop (call $set_error (i32.const 0) (i32.const 16)))))
              (i32.const 3))"#,
        ),
    );
    let r = ex.post("t1", &format!("/functions/{id}/invoke"), "text/plain", b"");
    assert_eq!((r.status, r.code().as_str()), (500, "function_error"));
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no input named x")
    );
}

#[test]
fn the_memory_cap_holds() {
    let ex = TestExecutor::start();
    // 16 MiB cap in the harness: growing by 512 pages (32 MiB) fails (-1).
    let id = ex.deploy(
        "t1",
        "greedy",
        &guest(
            r#"(memory (export "memory") 1)
            (func (export "handle") (result i32)
              (i32.store (i32.const 0) (memory.grow (i32.const 512)))
              (i32.store (i32.const 4) (memory.grow (i32.const 16)))
              (drop (call $output_write (i32.const 0) (i32.const 8)))
              (i32.const 0))"#,
        ),
    );
    let r = ex.post("t1", &format!("/functions/{id}/invoke"), "text/plain", b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        &r.body[..4],
        (-1i32).to_le_bytes(),
        "a grow past the cap fails"
    );
    assert_eq!(
        &r.body[4..],
        1i32.to_le_bytes(),
        "a grow within it succeeds"
    );
    // A module whose initial memory is over the cap could never run: it
    // is refused at registration.
    let huge = wat::parse_str(guest(
        r#"(memory (export "memory") 1024) (func (export "handle") (result i32) (i32.const 0))"#,
    ))
    .unwrap();
    let r = ex.post("t1", "/functions?name=huge", "application/wasm", &huge);
    assert_eq!((r.status, r.code().as_str()), (400, "invalid_input"));
    assert!(r.text().contains("memory_limit_bytes"), "{}", r.text());
}

#[test]
fn outputs_count_against_the_device_memory_quota() {
    let dir = tempfile::tempdir().unwrap();
    let quotas = tensor_wasm_executor::config::TenantQuotas {
        device_memory_bytes: 1 << 20,
        ..Default::default()
    };
    let ex = TestExecutor::start_in(dir.path(), crate::harness::small_limits(), quotas);
    // Outputs 256 KiB tensors as o0, o1, ... freeing each handle, until
    // `output` answers -5. Each output is charged like a handle until the
    // call ends, so the third is the last to fit beside the live handle.
    let id = ex.deploy(
        "t1",
        "hoard",
        &guest(
            r#"(memory (export "memory") 1)
            (data (i32.const 0) "\00\00\04\00")
            (data (i32.const 16) "o0")
            (func (export "handle") (result i32) (local $t i32) (local $r i32)
              (i32.store8 (i32.const 17) (i32.const 48))
              (loop $next
                (local.set $t (call $must (call $zeros (i32.const 5) (i32.const 0) (i32.const 1))))
                (local.set $r (call $output (i32.const 16) (i32.const 2) (local.get $t)))
                (drop (call $free (local.get $t)))
                (if (i32.eq (local.get $r) (i32.const -5)) (then (return (i32.const 0))))
                (if (local.get $r) (then (return (i32.const 101))))
                (i32.store8 (i32.const 17) (i32.add (i32.load8_u (i32.const 17)) (i32.const 1)))
                (br_if $next (i32.lt_u (i32.load8_u (i32.const 17)) (i32.const 58))))
              (i32.const 102))"#,
        ),
    );
    // Twice: the charges of the first call's outputs ended with it.
    for _ in 0..2 {
        let r = ex.post("t1", &format!("/functions/{id}/invoke"), "text/plain", b"");
        assert_eq!(r.status, 200, "{}", r.text());
        let outputs = r.json()["outputs"].as_object().unwrap().clone();
        let names: Vec<&str> = outputs.keys().map(String::as_str).collect();
        assert_eq!(names, ["o0", "o1", "o2"]);
    }
}

#[test]
fn guest_output_is_captured_in_logs() {
    let ex = TestExecutor::start();
    let id = ex.deploy(
        "t1",
        "chatty",
        r#"(module
            (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (data (i32.const 16) "hello from the guest\n")
            (data (i32.const 0) "\10\00\00\00\15\00\00\00")
            (func (export "handle") (result i32)
              (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
              (drop (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))
              (i32.const 0)))"#,
    );
    let r = ex.post("t1", &format!("/functions/{id}/invoke"), "text/plain", b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let logs = ex.get("t1", &format!("/functions/{id}/logs"));
    assert_eq!(logs.text(), "hello from the guest\nhello from the guest\n");
}

#[test]
fn init_runs_once_per_instance() {
    let ex = TestExecutor::start();
    let id = ex.deploy(
        "t1",
        "inits",
        &guest(
            r#"(memory (export "memory") 1)
            (global $inits (mut i32) (i32.const 0))
            (func (export "init") (result i32)
              (global.set $inits (i32.add (global.get $inits) (i32.const 1)))
              (i32.const 0))
            (func (export "handle") (result i32)
              (i32.store (i32.const 0) (global.get $inits))
              (drop (call $output_write (i32.const 0) (i32.const 4)))
              (i32.const 0))"#,
        ),
    );
    for _ in 0..2 {
        let r = ex.post("t1", &format!("/functions/{id}/invoke"), "text/plain", b"");
        assert_eq!(r.body, 1u32.to_le_bytes());
    }
}

/// y = x · w with w an asset; the same name gives the same handle.
const WITH_ASSET: &str = r#"
  (memory (export "memory") 1)
  (data (i32.const 0) "x")
  (data (i32.const 8) "w")
  (data (i32.const 16) "y")
  (data (i32.const 24) "nope")
  (func (export "handle") (result i32)
    (local $w i32)
    (local.set $w (call $must (call $asset (i32.const 8) (i32.const 1))))
    (if (i32.ne (call $asset (i32.const 8) (i32.const 1)) (local.get $w)) (then unreachable))
    (if (i32.ne (call $asset (i32.const 24) (i32.const 4)) (i32.const -6)) (then unreachable))
    (drop (call $must (call $output (i32.const 16) (i32.const 1)
      (call $must (call $matmul (call $must (call $input (i32.const 0) (i32.const 1))) (local.get $w))))))
    (i32.const 0))
"#;

#[test]
fn assets_are_shared_read_only_weights() {
    let ex = TestExecutor::start();
    let w: Vec<f32> = vec![1.0, 0.0, 0.0, 2.0, 3.0, 1.0];
    let view = safetensors::tensor::TensorView::new(
        safetensors::Dtype::F32,
        vec![2, 3],
        bytemuck::cast_slice(&w),
    )
    .unwrap();
    let assets = safetensors::serialize([("w".to_string(), view)], None).unwrap();
    let wasm = wat::parse_str(guest(WITH_ASSET)).unwrap();
    let r = ex.post(
        "t1",
        "/functions?name=weighted",
        "multipart/form-data; boundary=XX",
        &multipart(&[("module", &wasm), ("assets", &assets)]),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["assets"], serde_json::json!(["w"]));
    let id = r.json()["id"].as_str().unwrap().to_string();
    for _ in 0..2 {
        let r = ex.post(
            "t1",
            &format!("/functions/{id}/invoke"),
            "application/json",
            &f32_inputs(&[("x", &[1, 2], &[1.0, 2.0])]),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(f32_output(&r, "y"), vec![5.0, 6.0, 2.0]);
    }
    // Bad assets are refused with the reason.
    let r = ex.post(
        "t1",
        "/functions?name=broken",
        "multipart/form-data; boundary=XX",
        &multipart(&[("module", &wasm), ("assets", b"not safetensors")]),
    );
    assert_eq!(
        (r.status, r.code().as_str()),
        (400, "invalid_input"),
        "{}",
        r.text()
    );
}

#[test]
fn a_busy_function_queues_then_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let limits = tensor_wasm_executor::config::EngineLimits {
        max_queued_per_function: 1,
        default_deadline: std::time::Duration::from_millis(1500),
        ..crate::harness::small_limits()
    };
    let ex = Arc::new(TestExecutor::start_in(
        dir.path(),
        limits,
        Default::default(),
    ));
    let id = ex.deploy(
        "t1",
        "slow",
        &guest(
            r#"(memory (export "memory") 1)
            (func (export "handle") (result i32)
              (if (i32.eq (call $input_len) (i32.const 4)) (then (loop $l (br $l))))
              (i32.const 0))"#,
        ),
    );
    let path = format!("/functions/{id}/invoke");
    // One request holds the only instance (spinning to its deadline), a
    // second waits in the queue, a third finds the queue full.
    // No instance exists before the first run, so one instance means the
    // spinning request holds the slot.
    let spin = {
        let (ex, path) = (ex.clone(), path.clone());
        std::thread::spawn(move || ex.post("t1", &path, "text/plain", b"spin").status)
    };
    ex.wait_metric("tensor_wasm_active_instances", 1.0);
    // A queued call waits at most the function's deadline, and the spinning
    // one ends a little after its own (the next epoch tick): the second call
    // starts well after the first so that its wait outlasts the spin.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let queued = {
        let (ex, path) = (ex.clone(), path.clone());
        std::thread::spawn(move || ex.post("t1", &path, "text/plain", b"ok").status)
    };
    ex.wait_metric("tensor_wasm_invocations_waiting", 1.0);
    let r = ex.post("t1", &path, "text/plain", b"ok");
    assert_eq!(
        (r.status, r.code().as_str()),
        (503, "capacity_exhausted"),
        "{}",
        r.text()
    );
    assert!(r.header("retry-after").is_some());
    assert_eq!(spin.join().unwrap(), 504);
    assert_eq!(
        queued.join().unwrap(),
        200,
        "the queued request ran once the instance was free"
    );
    assert_eq!(ex.metric("tensor_wasm_invocations_waiting"), 0.0);
}

/// Guest ABI v2's cancellation, shown by `examples/wat/cancellable.wat`.
const CANCELLABLE: &str = include_str!("../../../examples/wat/cancellable.wat");

/// The zeros the executor has made, from its metrics.
fn zeros_made(ex: &TestExecutor) -> f64 {
    ex.metrics_text()
        .lines()
        .filter(|l| {
            l.starts_with("tensor_wasm_kernel_dispatches_total{") && l.contains("op=\"zeros\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A client that goes away reaches the guest (guest ABI v2): `cancelled`
/// turns 1 and its other imports fail with -9, so it stops at once rather
/// than at its deadline, and, since it returns normally, its instance and
/// its state live on.
#[test]
fn a_client_that_goes_away_cancels_its_guest_which_keeps_its_state() {
    use std::io::Write;
    let ex = TestExecutor::start();
    let wasm = wat::parse_str(CANCELLABLE).unwrap();
    let r = ex.register_with_config("acme", "cancellable", &wasm, r#"{"deadline_ms": 60000}"#);
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let addr = ex.base.trim_start_matches("http://").to_string();
    for round in 1..=2u32 {
        let before = zeros_made(&ex);
        let mut conn = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            conn,
            "POST /functions/{id}/invoke HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\nx-tensor-wasm-tenant: acme\r\ncontent-type: application/octet-stream\r\ncontent-length: 1\r\n\r\n\x01",
            crate::harness::TOKEN
        )
        .unwrap();
        // The guest runs: it makes tensors.
        let start = std::time::Instant::now();
        while zeros_made(&ex) <= before {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(30),
                "never ran"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        drop(conn);
        // It sees the cancellation and counts it, well before its deadline.
        let start = std::time::Instant::now();
        let (seen, code) = loop {
            let r = ex.post(
                "acme",
                &format!("/functions/{id}/invoke"),
                "application/octet-stream",
                &[0],
            );
            assert_eq!(r.status, 200, "{}", r.text());
            let b = &r.body;
            let seen = u32::from_le_bytes(b[0..4].try_into().unwrap());
            let code = i32::from_le_bytes(b[4..8].try_into().unwrap());
            if seen == round {
                break (seen, code);
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(30),
                "not cancelled"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        // The same instance, state kept: the count goes on.
        assert_eq!(seen, round);
        assert_eq!(code, -9, "an op after cancellation fails with -9");
    }
}
