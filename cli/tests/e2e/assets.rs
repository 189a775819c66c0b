//! Weights at model scale: a gigabyte of assets deployed with the CLI
//! through the proxy, and every byte read back.

use std::io::Write;
use std::process::Command;

use sha2::Digest;

use crate::harness::{ProxyOptions, TestFleet};

/// `y = gather(asset "w", input "idx")`: rows of the asset, byte for byte;
/// a failed call is a `function_error` with the ABI's message.
const READ_ROWS: &str = r#"(module
  (import "tensor" "asset" (func $asset (param i32 i32) (result i32)))
  (import "tensor" "input" (func $input (param i32 i32) (result i32)))
  (import "tensor" "gather" (func $gather (param i32 i32) (result i32)))
  (import "tensor" "output" (func $output (param i32 i32 i32) (result i32)))
  (import "tensor" "last_error" (func $last_error (param i32 i32) (result i32)))
  (import "tensor" "set_error" (func $set_error (param i32 i32) (result i32)))
  (import "tensor" "free" (func $free (param i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "w")
  (data (i32.const 8) "idx")
  (data (i32.const 16) "y")
  (func $failed (result i32)
    (drop (call $set_error (i32.const 64)
      (call $last_error (i32.const 64) (i32.const 4096))))
    (i32.const 1))
  (func (export "handle") (result i32)
    (local $w i32) (local $idx i32) (local $y i32)
    (local.set $w (call $asset (i32.const 0) (i32.const 1)))
    (if (i32.lt_s (local.get $w) (i32.const 0)) (then (return (call $failed))))
    (local.set $idx (call $input (i32.const 8) (i32.const 3)))
    (if (i32.lt_s (local.get $idx) (i32.const 0)) (then (return (call $failed))))
    (local.set $y (call $gather (local.get $w) (local.get $idx)))
    (if (i32.lt_s (local.get $y) (i32.const 0)) (then (return (call $failed))))
    (if (i32.lt_s (call $output (i32.const 16) (i32.const 1) (local.get $y)) (i32.const 0))
      (then (return (call $failed))))
    (drop (call $free (local.get $y)))
    (drop (call $free (local.get $idx)))
    (i32.const 0)))"#;

/// Row `r` of the test tensor: bytes that differ from row to row and
/// within each row.
fn row(r: usize, cols: usize, out: &mut Vec<u8>) {
    out.clear();
    let mut x = (r as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for _ in 0..cols / 8 {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
}

#[test]
fn a_gigabyte_of_assets_deploys_from_the_cli_and_reads_back_exactly() {
    const ROWS: usize = 32 * 1024;
    const COLS: usize = 32 * 1024; // 1 GiB of u8
    let fleet = TestFleet::start(1, ProxyOptions::default());
    let dir = tempfile::tempdir().unwrap();

    // The file, written row by row (never whole in this test's memory),
    // hashed on the way.
    let path = dir.path().join("weights.safetensors");
    let header = format!(
        r#"{{"w":{{"dtype":"U8","shape":[{ROWS},{COLS}],"data_offsets":[0,{}]}}}}"#,
        ROWS * COLS
    );
    let mut hasher = sha2::Sha256::new();
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        let mut put = |b: &[u8]| {
            f.write_all(b).unwrap();
            hasher.update(b);
        };
        put(&(header.len() as u64).to_le_bytes());
        put(header.as_bytes());
        let mut buf = Vec::with_capacity(COLS);
        for r in 0..ROWS {
            row(r, COLS, &mut buf);
            put(&buf);
        }
    }
    let sha = hex::encode(hasher.finalize());
    std::fs::write(dir.path().join("read-rows.wat"), READ_ROWS).unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_tensor-wasm"))
        .args(["deploy", "read-rows.wat", "--assets"])
        .arg(&path)
        .args(["--name", "big", "--json"])
        .current_dir(dir.path())
        .env("TENSOR_WASM_URL", &fleet.proxy.api.base)
        .env("TENSOR_WASM_TOKEN", "tok-acme")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["assets"], serde_json::json!(["w"]));
    assert_eq!(info["assets_sha256"], sha.as_str(), "received exactly");
    let id = info["id"].as_str().unwrap().to_string();

    // Every row back, 1024 at a time (32 MiB per answer).
    let mut want = Vec::with_capacity(COLS);
    for first in (0..ROWS).step_by(1024) {
        let idx: Vec<i32> = (first as i32..first as i32 + 1024).collect();
        let body = serde_json::json!({
            "inputs": {"idx": {"dtype": "i32", "shape": [idx.len()], "data": idx}}
        })
        .to_string();
        let r = fleet.proxy.api.call(
            "POST",
            &format!("/functions/{id}/invoke"),
            &[
                ("authorization", "Bearer tok-acme"),
                ("accept", "application/x-safetensors"),
            ],
            Some(("application/json", body.as_bytes())),
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let st = safetensors::SafeTensors::deserialize(&r.body).unwrap();
        let got = st.tensor("y").unwrap();
        assert_eq!(got.shape(), [1024, COLS]);
        for (k, got_row) in got.data().chunks(COLS).enumerate() {
            row(first + k, COLS, &mut want);
            assert!(got_row == want.as_slice(), "row {} differs", first + k);
        }
    }
}
