//! Assets files: streamed to disk, validated before anything is registered,
//! kept by content per tenant, shared by a tenant's functions, loaded again
//! after a restart.

use std::path::Path;

use sha2::Digest;
use tensor_wasm_executor::config::TenantQuotas;

use crate::harness::{Reply, TestExecutor, multipart, small_limits};

/// `y = gather(asset "w", input "idx")`: rows of the asset, byte for byte;
/// a failed call is a `function_error` with the ABI's message.
pub const READ_ROWS: &str = r#"(module
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

/// A safetensors file of one U8 tensor `w` of `rows` × `cols`, each byte a
/// function of its position.
pub fn rows_file(rows: usize, cols: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..rows * cols)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
        .collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::U8, vec![rows, cols], &data)
            .unwrap();
    safetensors::serialize([("w".to_string(), view)], None).unwrap()
}

/// A file with a hand-written header and `data` after it.
fn raw(header: &str, data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(data);
    v
}

fn register(ex: &TestExecutor, tenant: &str, name: &str, assets: &[u8]) -> Reply {
    let wasm = wat::parse_str(READ_ROWS).unwrap();
    ex.post(
        tenant,
        &format!("/functions?name={name}"),
        "multipart/form-data; boundary=XX",
        &multipart(&[("module", &wasm), ("assets", assets)]),
    )
}

/// Rows `idx` of function `id`'s asset, as raw bytes.
fn read_rows(ex: &TestExecutor, tenant: &str, id: &str, idx: &[i32]) -> Vec<u8> {
    let body = serde_json::json!({
        "inputs": {"idx": {"dtype": "i32", "shape": [idx.len()], "data": idx}}
    })
    .to_string();
    let r = ex.post_with(
        tenant,
        &format!("/functions/{id}/invoke"),
        "application/json",
        body.as_bytes(),
        &[("accept", "application/x-safetensors")],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let st = safetensors::SafeTensors::deserialize(&r.body).unwrap();
    st.tensor("y").unwrap().data().to_vec()
}

/// The files in `state`'s assets folder of `tenant`.
fn files(state: &Path, tenant: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(state.join("assets").join(tenant))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// What the store holds for one file: the file and its BLAKE3 digest.
fn kept(sha: &str) -> [String; 2] {
    [format!("{sha}.blake3"), format!("{sha}.safetensors")]
}

fn device_bytes(ex: &TestExecutor) -> u64 {
    ex.internal("GET", "/internal/info", b"").json()["device"]["memory_used"]
        .as_u64()
        .unwrap()
}

#[test]
fn invalid_assets_are_refused_before_anything_is_registered() {
    let dir = tempfile::tempdir().unwrap();
    let ex = TestExecutor::start_in(dir.path(), small_limits(), TenantQuotas::default());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "not safetensors",
            b"not safetensors".to_vec(),
            "safetensors",
        ),
        (
            "offsets past the end",
            raw(
                r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
                &[0; 8],
            ),
            "safetensors",
        ),
        (
            "overlapping tensors",
            raw(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"w":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                &[0; 12],
            ),
            "safetensors",
        ),
        (
            "a header length past the end",
            {
                let mut v = (1u64 << 40).to_le_bytes().to_vec();
                v.extend_from_slice(b"{}");
                v
            },
            "header",
        ),
        (
            "an absurd shape",
            raw(
                r#"{"w":{"dtype":"U8","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,0]}}"#,
                &[],
            ),
            "safetensors",
        ),
        (
            "a shape past the tensor limits",
            // Valid safetensors (a dim of 0 holds no data), but of a rank
            // no backend takes.
            raw(
                r#"{"w":{"dtype":"U8","shape":[0,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1],"data_offsets":[0,0]}}"#,
                &[],
            ),
            "rank 34 exceeds",
        ),
        (
            "an unsupported dtype",
            raw(
                r#"{"w":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}}"#,
                &[0; 8],
            ),
            "dtype",
        ),
    ];
    for (what, bytes, says) in cases {
        let r = register(&ex, "t1", "f", &bytes);
        assert_eq!(
            (r.status, r.code().as_str()),
            (400, "invalid_input"),
            "{what}: {}",
            r.text()
        );
        assert!(r.text().contains(says), "{what}: {}", r.text());
    }
    assert_eq!(
        ex.get("t1", "/functions").json()["functions"],
        serde_json::json!([])
    );
    assert_eq!(
        files(dir.path(), "t1"),
        Vec::<String>::new(),
        "nothing kept"
    );
    assert_eq!(device_bytes(&ex), 0);
}

#[test]
fn assets_are_kept_by_content_and_shared_within_a_tenant_only() {
    let dir = tempfile::tempdir().unwrap();
    let ex = TestExecutor::start_in(dir.path(), small_limits(), TenantQuotas::default());
    let file = rows_file(64, 1024);
    let sha = hex::encode(sha2::Sha256::digest(&file));
    let a = register(&ex, "t1", "a", &file);
    assert_eq!(a.status, 201, "{}", a.text());
    assert_eq!(a.json()["assets_sha256"], sha.as_str());
    let b = register(&ex, "t1", "b", &file);
    assert_eq!(b.status, 201, "{}", b.text());
    let (a, b) = (
        a.json()["id"].as_str().unwrap().to_string(),
        b.json()["id"].as_str().unwrap().to_string(),
    );
    // One file and one charge for two functions.
    assert_eq!(files(dir.path(), "t1"), kept(&sha));
    assert_eq!(device_bytes(&ex), 64 * 1024);
    // Another tenant with the same bytes has its own copy and charge.
    assert_eq!(register(&ex, "t2", "a", &file).status, 201);
    assert_eq!(files(dir.path(), "t2"), kept(&sha));
    assert_eq!(device_bytes(&ex), 2 * 64 * 1024);
    // Both functions read the same rows.
    let expect: Vec<u8> = [5usize, 63, 0]
        .iter()
        .flat_map(|&r| {
            let start = file.len() - 64 * 1024 + r * 1024;
            file[start..start + 1024].to_vec()
        })
        .collect();
    assert_eq!(read_rows(&ex, "t1", &a, &[5, 63, 0]), expect);
    assert_eq!(read_rows(&ex, "t1", &b, &[5, 63, 0]), expect);
    // The file stays while a function uses it, and goes with the last.
    assert_eq!(ex.delete("t1", &format!("/functions/{a}")).status, 204);
    assert_eq!(files(dir.path(), "t1").len(), 2);
    assert_eq!(read_rows(&ex, "t1", &b, &[63]), expect[1024..2048]);
    assert_eq!(ex.delete("t1", &format!("/functions/{b}")).status, 204);
    assert_eq!(files(dir.path(), "t1"), Vec::<String>::new());
    assert_eq!(device_bytes(&ex), 64 * 1024, "t2's copy only");
    // Replacing a function with other assets lets the old file go.
    let other = rows_file(8, 8);
    let r = ex.post(
        "t2",
        "/functions?name=a&replace=true",
        "multipart/form-data; boundary=XX",
        &multipart(&[
            ("module", &wat::parse_str(READ_ROWS).unwrap()),
            ("assets", &other),
        ]),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let other_sha = hex::encode(sha2::Sha256::digest(&other));
    assert_eq!(files(dir.path(), "t2"), kept(&other_sha));
    assert_eq!(device_bytes(&ex), 64);
}

#[test]
fn assets_past_the_cap_or_the_quota_are_refused_as_they_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let quotas = TenantQuotas {
        device_memory_bytes: 1 << 20,
        max_asset_bytes: Some(4 << 20),
        ..TenantQuotas::default()
    };
    let ex = TestExecutor::start_in(dir.path(), small_limits(), quotas);
    // Over the cap: 413, the limit named.
    let r = register(&ex, "t1", "f", &rows_file(5, 1 << 20));
    assert_eq!(
        (r.status, r.code().as_str()),
        (413, "payload_too_large"),
        "{}",
        r.text()
    );
    assert!(r.text().contains(&(4u64 << 20).to_string()), "{}", r.text());
    // Under the cap, over what the quota holds: 422.
    let r = register(&ex, "t1", "f", &rows_file(2, 1 << 20));
    assert_eq!(
        (r.status, r.code().as_str()),
        (422, "quota_exceeded"),
        "{}",
        r.text()
    );
    // What fits goes in; then the rest of the quota is what is left.
    assert_eq!(
        register(&ex, "t1", "f", &rows_file(3, 256 << 10)).status,
        201
    );
    let r = register(&ex, "t1", "g", &rows_file(2, 256 << 10));
    assert_eq!((r.status, r.code().as_str()), (422, "quota_exceeded"));
    // The same bytes again cost nothing more.
    assert_eq!(
        register(&ex, "t1", "h", &rows_file(3, 256 << 10)).status,
        201
    );
    assert_eq!(files(dir.path(), "t1").len(), 2, "no partial upload left");
    // Without an operator cap, the cap is the quota.
    let dir = tempfile::tempdir().unwrap();
    let quotas = TenantQuotas {
        device_memory_bytes: 1 << 20,
        ..TenantQuotas::default()
    };
    let ex = TestExecutor::start_in(dir.path(), small_limits(), quotas);
    let r = register(&ex, "t1", "f", &rows_file(2, 1 << 20));
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(r.text().contains(&(1u64 << 20).to_string()), "{}", r.text());
}

#[test]
fn assets_come_back_after_a_restart_and_from_the_older_layout() {
    let dir = tempfile::tempdir().unwrap();
    let file = rows_file(16, 4096);
    let sha = hex::encode(sha2::Sha256::digest(&file));
    let id = {
        let ex = TestExecutor::start_in(dir.path(), small_limits(), TenantQuotas::default());
        let r = register(&ex, "t1", "f", &file);
        assert_eq!(r.status, 201, "{}", r.text());
        r.json()["id"].as_str().unwrap().to_string()
    };
    let row = |r: usize| file[file.len() - 16 * 4096 + r * 4096..][..4096].to_vec();
    {
        let ex = TestExecutor::start_in(dir.path(), small_limits(), TenantQuotas::default());
        assert_eq!(
            device_bytes(&ex),
            16 * 4096,
            "loaded at start, charged once"
        );
        assert_eq!(read_rows(&ex, "t1", &id, &[15]), row(15));
    }
    // An older release kept the file beside the module and no hash in the
    // record: it moves to the store on start.
    let fdir = dir.path().join("functions").join("t1").join(&id);
    let stored = dir
        .path()
        .join("assets")
        .join("t1")
        .join(format!("{sha}.safetensors"));
    std::fs::rename(&stored, fdir.join("assets.safetensors")).unwrap();
    let record = fdir.join("function.json");
    let mut info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    info.as_object_mut().unwrap().remove("assets_sha256");
    std::fs::write(&record, serde_json::to_vec(&info).unwrap()).unwrap();
    // A half-written upload left by a crash goes too.
    std::fs::write(dir.path().join("assets").join("t1").join(".upload-1"), b"x").unwrap();
    let ex = TestExecutor::start_in(dir.path(), small_limits(), TenantQuotas::default());
    assert_eq!(read_rows(&ex, "t1", &id, &[3]), row(3));
    assert!(!fdir.join("assets.safetensors").exists());
    assert_eq!(files(dir.path(), "t1"), kept(&sha));
    let info: serde_json::Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    assert_eq!(info["assets_sha256"], sha.as_str());
}

/// A tenant streams one assets file to disk at a time: while one of its
/// registrations is still sending its assets, its next waits (nothing of
/// it on disk) and another tenant's goes through; once the first is in,
/// the second follows.
#[test]
fn a_tenants_uploads_reach_the_disk_one_at_a_time() {
    use std::io::{Read, Write};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let ex = Arc::new(TestExecutor::start_in(
        dir.path(),
        small_limits(),
        TenantQuotas::default(),
    ));
    let wasm = wat::parse_str(READ_ROWS).unwrap();
    let first = multipart(&[("module", &wasm), ("assets", &rows_file(64, 1024))]);
    // The first registration, sent by hand: all but its last 1000 bytes.
    let addr = ex.base.trim_start_matches("http://").to_string();
    let mut slow = std::net::TcpStream::connect(&addr).unwrap();
    let head = format!(
        "POST /functions?name=slow HTTP/1.1\r\nhost: executor\r\nauthorization: Bearer {}\r\n\
         x-tensor-wasm-tenant: t1\r\ncontent-type: multipart/form-data; boundary=XX\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        crate::harness::TOKEN,
        first.len()
    );
    slow.write_all(head.as_bytes()).unwrap();
    let (sent, rest) = first.split_at(first.len() - 1000);
    slow.write_all(sent).unwrap();
    let uploading = || {
        files(dir.path(), "t1")
            .iter()
            .filter(|f| f.starts_with(".upload-"))
            .count()
    };
    let start = std::time::Instant::now();
    while uploading() == 0 {
        assert!(start.elapsed() < std::time::Duration::from_secs(30));
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // The same tenant's next registration waits for it.
    let (done, second) = std::sync::mpsc::channel();
    {
        let ex = ex.clone();
        std::thread::spawn(move || {
            let _ = done.send(register(&ex, "t1", "next", &rows_file(8, 1024)).status);
        });
    }
    assert!(
        second
            .recv_timeout(std::time::Duration::from_millis(500))
            .is_err(),
        "the second registration did not wait"
    );
    assert_eq!(uploading(), 1, "one upload of the tenant on disk at a time");
    // Another tenant's is not held up.
    assert_eq!(
        register(&ex, "t2", "other", &rows_file(8, 1024)).status,
        201
    );
    // The first finishes; the second follows.
    slow.write_all(rest).unwrap();
    let mut answer = String::new();
    slow.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    assert_eq!(
        second
            .recv_timeout(std::time::Duration::from_secs(30))
            .unwrap(),
        201
    );
}
