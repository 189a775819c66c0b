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
    let info = deploy_read_rows(&fleet, dir.path(), &path, "big");
    assert_eq!(info["assets"], serde_json::json!(["w"]));
    assert_eq!(info["assets_sha256"], sha.as_str(), "received exactly");
    let id = info["id"].as_str().unwrap().to_string();

    // Every row back, 1024 at a time (32 MiB per answer).
    let mut want = Vec::with_capacity(COLS);
    for first in (0..ROWS).step_by(1024) {
        let got = read_rows(&fleet, &id, first..first + 1024);
        assert_eq!(got.len(), 1024 * COLS);
        for (k, got_row) in got.chunks(COLS).enumerate() {
            row(first + k, COLS, &mut want);
            assert!(got_row == want.as_slice(), "row {} differs", first + k);
        }
    }
}

/// Deploys [`READ_ROWS`] with the assets file `weights` through the CLI,
/// as tenant acme; the function's record.
fn deploy_read_rows(
    fleet: &TestFleet,
    dir: &std::path::Path,
    weights: &std::path::Path,
    name: &str,
) -> serde_json::Value {
    std::fs::write(dir.join("read-rows.wat"), READ_ROWS).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tensor-wasm"))
        .args(["deploy", "read-rows.wat", "--assets"])
        .arg(weights)
        .args(["--name", name, "--json"])
        .current_dir(dir)
        .env("TENSOR_WASM_URL", &fleet.proxy.api.base)
        .env("TENSOR_WASM_TOKEN", "tok-acme")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Rows `rows` of asset "w", read back through the proxy by function `id`
/// of [`READ_ROWS`]: their bytes, in order.
fn read_rows(fleet: &TestFleet, id: &str, rows: std::ops::Range<usize>) -> Vec<u8> {
    let idx: Vec<i32> = rows.map(|r| r as i32).collect();
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
    assert_eq!(got.shape()[0], idx.len());
    got.data().to_vec()
}

/// A migration's destination checks the assets file it fetches against
/// the BLAKE3 digest the source recorded beside it: a file whose digest
/// does not match stays where it was (the move fails, the tenant is whole
/// on its executor); a file without one (stored by an earlier release) is
/// checked by its SHA-256 name, moves, and gets its digest recorded.
#[test]
fn fetched_assets_are_checked_against_the_recorded_digest() {
    const ROWS: usize = 256;
    const COLS: usize = 1024;
    let fleet = TestFleet::start(2, ProxyOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.safetensors");
    let header = format!(
        r#"{{"w":{{"dtype":"U8","shape":[{ROWS},{COLS}],"data_offsets":[0,{}]}}}}"#,
        ROWS * COLS
    );
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header.as_bytes());
    let mut buf = Vec::new();
    for r in 0..ROWS {
        row(r, COLS, &mut buf);
        file.extend_from_slice(&buf);
    }
    std::fs::write(&path, &file).unwrap();
    let sha = hex::encode(sha2::Sha256::digest(&file));
    let info = deploy_read_rows(&fleet, dir.path(), &path, "rows");
    let id = info["id"].as_str().unwrap().to_string();
    let digest_on = |ex: &str| {
        fleet
            .dir
            .path()
            .join(ex)
            .join("assets/acme")
            .join(format!("{sha}.blake3"))
    };
    let rows_read_back = || read_rows(&fleet, &id, 0..ROWS) == file[8 + header.len()..];
    let home = fleet.proxy.placement("acme").unwrap();
    let away = if home == "cpu0" { "cpu1" } else { "cpu0" };
    let recorded = std::fs::read_to_string(digest_on(&home)).unwrap();
    assert_eq!(
        recorded,
        blake3::hash(&file).to_hex().as_str(),
        "recorded at registration"
    );

    // A digest that is not the file's: the destination refuses the bytes.
    std::fs::write(
        digest_on(&home),
        blake3::hash(b"other bytes").to_hex().as_str(),
    )
    .unwrap();
    let r = fleet.proxy.migrate("acme", away);
    assert_ne!(r.status, 200, "{}", r.text());
    assert_eq!(
        fleet.proxy.placement("acme").as_deref(),
        Some(home.as_str())
    );
    assert!(rows_read_back(), "the tenant is whole where it was");
    assert!(!crate::harness::tenants_on(fleet.executor(away)).contains(&"acme".to_string()));
    assert!(
        !digest_on(away).exists(),
        "nothing kept of the refused file"
    );

    // No digest (a file of an earlier release): checked by its name.
    std::fs::remove_file(digest_on(&home)).unwrap();
    let r = fleet.proxy.migrate("acme", away);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(fleet.proxy.placement("acme").as_deref(), Some(away));
    assert!(rows_read_back(), "every byte arrived");
    let recorded = std::fs::read_to_string(digest_on(away)).unwrap();
    assert_eq!(
        recorded,
        blake3::hash(&file).to_hex().as_str(),
        "recorded on arrival"
    );
}

/// 256 MiB of linear memory, filled by `init`; each call bumps a counter,
/// checks its 1 GiB asset is there, fills 1 MiB of memory with the counter
/// at a place that moves, and answers the counter and a checksum (one
/// byte of every MiB).
pub const BIG_TENANT: &str = r#"(module
  (import "tensor" "asset" (func $asset (param i32 i32) (result i32)))
  (import "tensor" "output_write" (func $output_write (param i32 i32) (result i32)))
  (memory (export "memory") 4096)
  (data (i32.const 0) "w")
  (global $n (mut i32) (i32.const 0))
  (func (export "init") (result i32)
    (memory.fill (i32.const 1048576) (i32.const 7) (i32.const 267386880))
    (i32.const 0))
  (func (export "handle") (result i32)
    (local $at i32) (local $sum i32)
    (global.set $n (i32.add (global.get $n) (i32.const 1)))
    (if (i32.lt_s (call $asset (i32.const 0) (i32.const 1)) (i32.const 0)) (then unreachable))
    (local.set $at (i32.mul
      (i32.add (i32.const 1) (i32.rem_u (global.get $n) (i32.const 255)))
      (i32.const 1048576)))
    (memory.fill (local.get $at) (global.get $n) (i32.const 1048576))
    (local.set $at (i32.const 1048576))
    (loop $l
      (local.set $sum (i32.add (local.get $sum) (i32.load8_u (i32.add (local.get $at) (i32.const 12345)))))
      (local.set $at (i32.add (local.get $at) (i32.const 1048576)))
      (br_if $l (i32.lt_u (local.get $at) (i32.const 268435456))))
    (i32.store (i32.const 16) (global.get $n))
    (i32.store (i32.const 20) (local.get $sum))
    (drop (call $output_write (i32.const 16) (i32.const 8)))
    (i32.const 0)))"#;

/// The checksum `BIG_TENANT` answers after `n` calls.
pub fn big_checksum(n: u32) -> u32 {
    let mut blocks = [7u8; 255];
    for k in 1..=n {
        blocks[(k % 255) as usize] = k as u8;
    }
    blocks.iter().map(|&b| u32::from(b)).sum()
}

/// Writes a safetensors file of one 1 GiB `U8` tensor named `w`.
pub fn write_gigabyte_weights(path: &std::path::Path) {
    const LEN: usize = 1 << 30;
    let header = format!(r#"{{"w":{{"dtype":"U8","shape":[{LEN}],"data_offsets":[0,{LEN}]}}}}"#);
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
    f.write_all(header.as_bytes()).unwrap();
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 251) as u8).collect();
    for _ in 0..LEN / chunk.len() {
        f.write_all(&chunk).unwrap();
    }
    f.flush().unwrap();
}

/// Deploys [`BIG_TENANT`] with `weights` as its assets through the CLI
/// (`dir` holds its source); the function's id.
pub fn deploy_big_tenant(
    url: &str,
    token: &str,
    weights: &std::path::Path,
    dir: &std::path::Path,
) -> String {
    std::fs::write(dir.join("big.wat"), BIG_TENANT).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tensor-wasm"))
        .args(["deploy", "big.wat", "--assets"])
        .arg(weights)
        .args(["--config", r#"{"memory_limit_bytes": 536870912}"#, "--json"])
        .current_dir(dir)
        .env("TENSOR_WASM_URL", url)
        .env("TENSOR_WASM_TOKEN", token)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A tenant the size of a real model (1 GiB of assets, 256 MiB of memory
/// that every call changes) moves back and forth under steady load: no
/// call fails, and its state carries on across every move.
#[test]
fn a_tenant_with_a_gigabyte_of_assets_moves_back_and_forth_under_load() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let fleet = Arc::new(TestFleet::start(2, ProxyOptions::default()));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.safetensors");
    write_gigabyte_weights(&path);
    let id = deploy_big_tenant(&fleet.proxy.api.base, "tok-acme", &path, dir.path());
    std::fs::remove_file(&path).unwrap();
    let call = move |fleet: &TestFleet| {
        let r = fleet.proxy.call(
            "tok-acme",
            "POST",
            &format!("/functions/{id}/invoke"),
            Some(("text/plain", b"")),
        );
        assert_eq!(r.status, 200, "a call failed: {}", r.text());
        let n = u32::from_le_bytes(r.body[..4].try_into().unwrap());
        let sum = u32::from_le_bytes(r.body[4..8].try_into().unwrap());
        (n, sum)
    };
    assert_eq!(call(&fleet), (1, big_checksum(1)));

    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (fleet, stop) = (fleet.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut last = 1;
            while !stop.load(Ordering::Relaxed) {
                let (n, sum) = call(&fleet);
                assert_eq!(n, last + 1, "every call counted once, in order");
                assert_eq!(sum, big_checksum(n), "memory carried on at call {n}");
                last = n;
            }
            last
        })
    };
    let mut reports = Vec::new();
    for _ in 0..4 {
        let from = fleet.proxy.placement("acme").unwrap();
        let to = if from == "cpu0" { "cpu1" } else { "cpu0" };
        let r = fleet.proxy.migrate("acme", to);
        assert_eq!(r.status, 200, "{}", r.text());
        let report = r.json();
        assert_eq!(report["protocol"], "pre-copy", "{report}");
        assert!(
            report["precopy_bytes"].as_u64().unwrap() > 1 << 30,
            "the assets and memory crossed before the pause: {report}"
        );
        assert_eq!(fleet.proxy.placement("acme").as_deref(), Some(to));
        reports.push(report);
    }
    stop.store(true, Ordering::Relaxed);
    let calls = client.join().expect("no failed call");
    assert!(calls > 8, "the client kept calling: {calls}");
    let home = fleet.proxy.placement("acme").unwrap();
    let away = if home == "cpu0" { "cpu1" } else { "cpu0" };
    assert!(crate::harness::tenants_on(fleet.executor(&home)).contains(&"acme".to_string()));
    assert!(!crate::harness::tenants_on(fleet.executor(away)).contains(&"acme".to_string()));
    let pauses: Vec<f64> = reports
        .iter()
        .map(|r| r["pause_ms"].as_f64().unwrap())
        .collect();
    let in_pause: Vec<u64> = reports
        .iter()
        .map(|r| r["pause_bytes"].as_u64().unwrap())
        .collect();
    eprintln!(
        "moves of a 1.25 GiB tenant: pauses {pauses:?} ms, bytes in the pause {in_pause:?}, calls {calls}"
    );
}
