//! Request and response bodies: JSON, safetensors, raw; malformed input.

use crate::harness::{TestExecutor, f32_inputs, f32_output};

/// y = x + x for input "x".
const DOUBLE: &str = r#"(module
  (import "tensor" "input" (func $input (param i32 i32) (result i32)))
  (import "tensor" "binary" (func $binary (param i32 i32 i32) (result i32)))
  (import "tensor" "output" (func $output (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "x")
  (data (i32.const 8) "y")
  (func (export "handle") (result i32)
    (local $x i32)
    (local.set $x (call $input (i32.const 0) (i32.const 1)))
    (if (i32.lt_s (local.get $x) (i32.const 0)) (then (return (i32.const 1))))
    (drop (call $output (i32.const 8) (i32.const 1)
      (call $binary (i32.const 0) (local.get $x) (local.get $x))))
    (i32.const 0)))"#;

fn safetensors_f32(name: &str, shape: &[usize], data: &[f32]) -> Vec<u8> {
    let bytes: &[u8] = bytemuck::cast_slice(data);
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.to_vec(), bytes)
        .unwrap();
    safetensors::serialize([(name.to_string(), view)], None).unwrap()
}

#[test]
fn json_in_json_out() {
    let ex = TestExecutor::start();
    let id = ex.deploy("t1", "double", DOUBLE);
    let r = ex.post(
        "t1",
        &format!("/functions/{id}/invoke"),
        "application/json",
        &f32_inputs(&[("x", &[3], &[1.0, -2.5, 0.1])]),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(f32_output(&r, "y"), vec![2.0, -5.0, 0.2]);
    assert_eq!(r.json()["outputs"]["y"]["shape"], serde_json::json!([3]));
}

#[test]
fn non_finite_floats_travel_as_strings() {
    let ex = TestExecutor::start();
    let id = ex.deploy("t1", "double", DOUBLE);
    let body =
        br#"{"inputs": {"x": {"dtype": "f32", "shape": [3], "data": ["NaN", "Infinity", -3e38]}}}"#;
    let r = ex.post(
        "t1",
        &format!("/functions/{id}/invoke"),
        "application/json",
        body,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["outputs"]["y"]["data"],
        serde_json::json!(["NaN", "Infinity", "-Infinity"])
    );
}

#[test]
fn safetensors_in_safetensors_out() {
    let ex = TestExecutor::start();
    let id = ex.deploy("t1", "double", DOUBLE);
    let body = safetensors_f32("x", &[2, 2], &[1.0, 2.0, 3.0, 4.0]);
    let r = ex.post_with(
        "t1",
        &format!("/functions/{id}/invoke"),
        "application/x-safetensors",
        &body,
        &[("accept", "application/x-safetensors")],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/x-safetensors"));
    let st = safetensors::SafeTensors::deserialize(&r.body).unwrap();
    let y = st.tensor("y").unwrap();
    assert_eq!(y.shape(), &[2, 2]);
    let ys: Vec<f32> = bytemuck::pod_collect_to_vec(y.data());
    assert_eq!(ys, vec![2.0, 4.0, 6.0, 8.0]);
}

#[test]
fn malformed_bodies_get_typed_errors() {
    let ex = TestExecutor::start();
    let id = ex.deploy("t1", "double", DOUBLE);
    let path = format!("/functions/{id}/invoke");
    let cases: &[(&str, &[u8], u16, &str)] = &[
        ("application/json", b"{not json", 400, "invalid_json"),
        ("application/json", br#"{"inputs": {"x": {"dtype": "f64", "shape": [1], "data": [1]}}}"#, 400, "invalid_json"),
        ("application/json", br#"{"inputs": {"x": {"dtype": "f32", "shape": [2], "data": [1]}}}"#, 400, "invalid_input"),
        ("application/json", br#"{"inputs": {"x": {"dtype": "u8", "shape": [1], "data": [300]}}}"#, 400, "invalid_input"),
        ("application/json", br#"{"inputs": {"x": {"dtype": "f32", "shape": [1], "data": {"a": 1}}}}"#, 400, "invalid_input"),
        ("application/json", br#"{"inputs": {"x": {"dtype": "f32", "shape": [1], "data": [[1]]}}}"#, 400, "invalid_input"),
        ("application/json", br#"{"inputs": {"x": {"dtype": "f32", "shape": [1], "data": [1, 2"#, 400, "invalid_json"),
        ("application/json", br#"{"inputs": {"x": {"dtype": "f32", "shape": [4294967296, 4294967296], "data": []}}}"#, 400, "invalid_input"),
        ("application/json", br#"{"inputs": {"x": {"dtype": "f32", "shape": [1,1,1,1,1,1,1,1,1], "data": [1]}}}"#, 400, "invalid_input"),
        ("application/x-safetensors", b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage", 400, "invalid_input"),
        ("application/x-safetensors", b"", 400, "invalid_input"),
    ];
    for (ct, body, status, code) in cases {
        let r = ex.post("t1", &path, ct, body);
        assert_eq!(
            (r.status, r.code().as_str()),
            (*status, *code),
            "{}: {}",
            String::from_utf8_lossy(body),
            r.text()
        );
    }
    // A missing input reaches the guest, which reports it.
    let r = ex.post("t1", &path, "application/json", br#"{"inputs": {}}"#);
    assert_eq!((r.status, r.code().as_str()), (500, "function_error"));
}

/// Outputs "y": zeros of [16 Mi + 1] f32, one element more than a JSON
/// answer may hold.
const HUGE_OUTPUT: &str = r#"(module
  (import "tensor" "zeros" (func $zeros (param i32 i32 i32) (result i32)))
  (import "tensor" "output" (func $output (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "\01\00\00\01")
  (data (i32.const 8) "y")
  (func (export "handle") (result i32)
    (drop (call $output (i32.const 8) (i32.const 1)
      (call $zeros (i32.const 0) (i32.const 0) (i32.const 1))))
    (i32.const 0)))"#;

#[test]
fn outputs_too_large_for_json_are_413_and_fine_as_safetensors() {
    let ex = TestExecutor::start();
    let id = ex.deploy("t1", "huge", HUGE_OUTPUT);
    let path = format!("/functions/{id}/invoke");
    let r = ex.post("t1", &path, "application/octet-stream", b"");
    assert_eq!(
        (r.status, r.code().as_str()),
        (413, "payload_too_large"),
        "{}",
        r.text()
    );
    assert!(
        r.text().contains("application/x-safetensors"),
        "{}",
        r.text()
    );
    let r = ex.post_with(
        "t1",
        &path,
        "application/octet-stream",
        b"",
        &[("accept", "application/x-safetensors")],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let st = safetensors::SafeTensors::deserialize(&r.body).unwrap();
    assert_eq!(st.tensor("y").unwrap().shape(), &[(16 << 20) + 1]);
}

#[test]
fn oversized_bodies_are_413_without_being_read() {
    use std::io::{Read, Write};
    let ex = TestExecutor::start();
    let id = ex.deploy("t1", "double", DOUBLE);
    // Announce one byte over the 64 MiB quota and send none of it: the
    // answer must come from the header alone.
    let addr = ex.base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        s,
        "POST /functions/{id}/invoke HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\
         x-tensor-wasm-tenant: t1\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n",
        crate::harness::TOKEN,
        (64u64 << 20) + 1
    )
    .unwrap();
    let mut head = [0u8; 512];
    let n = s.read(&mut head).unwrap();
    let text = String::from_utf8_lossy(&head[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("payload_too_large"), "{text}");
}

#[test]
fn unknown_functions_are_404_before_reading_the_body() {
    let ex = TestExecutor::start();
    let r = ex.post("t1", "/functions/fn-nope/invoke", "application/json", b"{}");
    assert_eq!((r.status, r.code().as_str()), (404, "function_not_found"));
}
