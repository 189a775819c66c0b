//! Executors on their own: migration between processes by hand, warm
//! restart, start-up checks.

use std::process::Command;

use crate::harness::{
    COUNTER, ExecutorProcess, counter_call, deploy_counter_on, invoke_ok, register_on,
};

#[test]
fn a_tenant_moves_between_executor_processes() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = ExecutorProcess::start("cpu-a", da.path());
    let b = ExecutorProcess::start("cpu-b", db.path());
    let id = deploy_counter_on(&a);
    assert_eq!(counter_call(&a, &id), (1, vec![1.0; 4]));
    assert_eq!(counter_call(&a, &id), (2, vec![2.0; 4]));

    let (status, snapshot) = a.request(
        "POST",
        "/internal/tenants/acme/export",
        None,
        "application/octet-stream",
        b"",
    );
    assert_eq!(status, 200);
    let (status, body) = b.request(
        "POST",
        "/internal/tenants/acme/import",
        None,
        "application/octet-stream",
        &snapshot,
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        counter_call(&b, &id),
        (3, vec![3.0; 4]),
        "state and device tensor continue"
    );

    // A corrupted copy is refused by a third process, which stays empty.
    let dc = tempfile::tempdir().unwrap();
    let c = ExecutorProcess::start("cpu-c", dc.path());
    let mut bad = snapshot.clone();
    let n = bad.len();
    bad[n / 2] ^= 1;
    let (status, body) = c.request(
        "POST",
        "/internal/tenants/acme/import",
        None,
        "application/octet-stream",
        &bad,
    );
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("checksum"));
    let (_, list) = c.request("GET", "/functions", Some("acme"), "", b"");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&list).unwrap()["functions"],
        serde_json::json!([])
    );
}

#[test]
fn warm_state_survives_a_graceful_restart_of_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let ex = ExecutorProcess::start("cpu-r", dir.path());
    let id = deploy_counter_on(&ex);
    counter_call(&ex, &id);
    counter_call(&ex, &id);
    ex.stop();
    let ex = ExecutorProcess::start("cpu-r", dir.path());
    assert_eq!(counter_call(&ex, &id), (3, vec![3.0; 4]));
}

#[test]
fn version_names_the_build() {
    let out = Command::new(env!("CARGO_BIN_EXE_tensor-wasm"))
        .arg("--version")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains(env!("CARGO_PKG_VERSION")) && text.contains("rustc"),
        "{text}"
    );
}

#[test]
fn an_executor_without_a_token_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tensor-wasm"))
        .args([
            "executor",
            "--device",
            "cpu",
            "--listen",
            "127.0.0.1:0",
            "--internal-token",
            "",
        ])
        .arg("--state-dir")
        .arg(dir.path())
        .env_remove("TENSOR_WASM_INTERNAL_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("TENSOR_WASM_INTERNAL_TOKEN"));
}

#[test]
fn a_destination_can_compile_a_tenants_modules_ahead_of_a_move() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = ExecutorProcess::start("cpu-a", da.path());
    let b = ExecutorProcess::start("cpu-b", db.path());
    let wasm = wat::parse_str(COUNTER).unwrap();
    let id = deploy_counter_on(&a);
    let (status, list) = a.request("GET", "/internal/tenants/acme/modules", None, "", b"");
    assert_eq!(status, 200);
    let list: serde_json::Value = serde_json::from_slice(&list).unwrap();
    assert_eq!(list["modules"], serde_json::json!([id]));
    let (status, module) = a.request(
        "GET",
        &format!("/internal/tenants/acme/modules/{id}"),
        None,
        "",
        b"",
    );
    assert_eq!(status, 200);
    assert_eq!(module, wasm, "the module as registered");
    let (status, _) = a.request("GET", "/internal/tenants/nobody/modules", None, "", b"");
    assert_eq!(status, 404);

    let (status, body) = b.request(
        "POST",
        "/internal/modules",
        None,
        "application/wasm",
        &module,
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let (status, body) = b.request(
        "POST",
        "/internal/modules",
        None,
        "application/wasm",
        b"\0asm\x01\0\0\0garbage",
    );
    assert_eq!(status, 422, "{}", String::from_utf8_lossy(&body));
    // Nothing was registered by compiling.
    let (_, listed) = b.request("GET", "/functions", Some("acme"), "", b"");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&listed).unwrap()["functions"],
        serde_json::json!([])
    );
}

#[test]
fn malformed_query_strings_get_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ex = ExecutorProcess::start("cpu-q", dir.path());
    let wasm = wat::parse_str(COUNTER).unwrap();
    for path in ["/functions?name=x&replace=maybe", "/jobs?status=sleeping"] {
        let (method, body): (&str, &[u8]) = if path.starts_with("/jobs") {
            ("GET", b"")
        } else {
            ("POST", &wasm)
        };
        let (status, body) = ex.request(method, path, Some("acme"), "application/wasm", body);
        assert_eq!(status, 400, "{path}");
        let v: serde_json::Value = serde_json::from_slice(&body).expect("a JSON error body");
        assert_eq!(v["error"]["code"], "invalid_input", "{path}: {v}");
    }
}

/// Counts its calls, and takes 8 MiB of memory on its first (a refusal of
/// the growth is not an error): warm state that needs more host memory
/// than a 4 MiB quota allows.
const GROWER: &str = r#"(module
  (import "tensor" "output_write" (func $output_write (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $n (mut i32) (i32.const 0))
  (func (export "handle") (result i32)
    (global.set $n (i32.add (global.get $n) (i32.const 1)))
    (if (i32.lt_u (memory.size) (i32.const 128))
      (then (drop (memory.grow (i32.const 128)))))
    (i32.store (i32.const 0) (global.get $n))
    (drop (call $output_write (i32.const 0) (i32.const 4)))
    (i32.const 0)))"#;

/// One call of the grower: its count.
fn grow_call(ex: &ExecutorProcess, id: &str) -> u32 {
    u32::from_le_bytes(invoke_ok(ex, id)[..4].try_into().unwrap())
}

/// Warm state that no longer fits (the quota shrank across the restart)
/// is refused and kept aside; the tenant starts cold from its registered
/// functions, which are never removed for it.
#[test]
fn refused_warm_state_starts_the_tenant_cold_with_its_functions() {
    let dir = tempfile::tempdir().unwrap();
    let ex = ExecutorProcess::start("cpu-g", dir.path());
    let (status, body) = ex.request(
        "POST",
        "/functions?name=grower",
        Some("acme"),
        "application/wasm",
        &wat::parse_str(GROWER).unwrap(),
    );
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    let id = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(grow_call(&ex, &id), 1);
    assert_eq!(grow_call(&ex, &id), 2);
    ex.stop();
    let warm = dir.path().join("warm");
    assert!(warm.join("acme.twsnap").exists());

    let ex = ExecutorProcess::start_with(
        "cpu-g",
        dir.path(),
        &["--tenant-host-memory-bytes", "4194304"],
    );
    assert_eq!(grow_call(&ex, &id), 1, "cold, from the registered function");
    assert!(warm.join("acme.twsnap.refused").exists(), "kept aside");
    assert!(!warm.join("acme.twsnap").exists());
    ex.stop();

    // And warm again under the old quota: nothing was lost on the way.
    let ex = ExecutorProcess::start("cpu-g", dir.path());
    assert_eq!(grow_call(&ex, &id), 2);
}

/// A graceful stop is bounded: an invocation still running when the drain
/// ends is cut off, the other tenants' warm state is saved, and the
/// process exits (`ExecutorProcess::stop` fails the test after 30 s; the
/// invocation would run for 120).
#[test]
fn a_graceful_stop_cuts_off_a_long_invocation_and_saves_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let ex = ExecutorProcess::start_with("cpu-b", dir.path(), &["--shutdown-budget-secs", "4"]);
    let id = deploy_counter_on(&ex);
    counter_call(&ex, &id);
    counter_call(&ex, &id);
    let spin = wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "handle") (result i32) (loop $l (br $l)) (i32.const 0)))"#).unwrap();
    let spin_id = register_on(&ex, "spinner", "spin", &spin, r#"{"deadline_ms": 120000}"#);
    let addr = ex.addr.clone();
    let spinning = std::thread::spawn(move || {
        crate::harness::raw_request(
            &addr,
            "POST",
            &format!("/functions/{spin_id}/invoke"),
            &[
                (
                    "authorization",
                    &format!("Bearer {}", crate::harness::TOKEN),
                ),
                ("x-tensor-wasm-tenant", "spinner"),
                ("content-type", "text/plain"),
            ],
            b"",
            std::time::Duration::from_secs(60),
        )
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    ex.stop();
    // Cut off: the connection closed without an answer.
    assert!(spinning.join().unwrap().is_err());

    let ex = ExecutorProcess::start("cpu-b", dir.path());
    assert_eq!(counter_call(&ex, &id), (3, vec![3.0; 4]), "saved warm");
}

/// A warm-state file damaged on disk (one bit flipped, or cut short as a
/// crash mid-write would leave it) fails its checksum: it is kept aside and
/// the tenant resumes from its checkpoints (the graceful stop wrote the
/// last), its registered functions untouched.
#[test]
fn damaged_warm_state_is_refused_and_the_tenant_resumes_from_its_checkpoints() {
    for damage in ["flip", "truncate"] {
        let dir = tempfile::tempdir().unwrap();
        let ex = ExecutorProcess::start("cpu-d", dir.path());
        let id = deploy_counter_on(&ex);
        counter_call(&ex, &id);
        counter_call(&ex, &id);
        ex.stop();
        let file = dir.path().join("warm").join("acme.twsnap");
        let mut bytes = std::fs::read(&file).unwrap();
        match damage {
            "flip" => {
                let at = bytes.len() / 2;
                bytes[at] ^= 0x10;
            }
            _ => bytes.truncate(bytes.len() * 2 / 3),
        }
        std::fs::write(&file, &bytes).unwrap();

        let ex = ExecutorProcess::start("cpu-d", dir.path());
        assert_eq!(
            counter_call(&ex, &id),
            (3, vec![3.0; 4]),
            "{damage}: from the checkpoint of call 2"
        );
        assert!(
            dir.path().join("warm").join("acme.twsnap.refused").exists(),
            "{damage}: kept aside"
        );
    }
}

/// A snapshot key too short to sign with is refused at start, saying what
/// is needed and never echoing the key.
#[test]
fn a_short_snapshot_key_is_refused_at_start_up_without_echoing_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tensor-wasm"))
        .args([
            "executor",
            "--id",
            "cpu-k",
            "--device",
            "cpu",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--state-dir")
        .arg(dir.path())
        .env("TENSOR_WASM_INTERNAL_TOKEN", "internal-token")
        .env("TENSOR_WASM_SNAPSHOT_KEY", "sekrit-short")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("at least 32"), "{err}");
    assert!(!err.contains("sekrit-short"), "{err}");
}

#[test]
fn a_moves_snapshot_is_imported_as_that_moves_only_and_an_old_signed_one_cannot_stand_in() {
    let key = ["--snapshot-key", "seal-key-seal-key-seal-key-seal-key"];
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = ExecutorProcess::start_with("cpu-a", da.path(), &key);
    let b = ExecutorProcess::start_with("cpu-b", db.path(), &key);
    let id = deploy_counter_on(&a);
    counter_call(&a, &id);
    let post = |ex: &ExecutorProcess, path: &str, body: &[u8]| {
        let (status, bytes) = ex.request("POST", path, None, "application/octet-stream", body);
        (status, bytes)
    };
    // An old snapshot, signed with the fleet's key: the tenant at 1.
    let (status, old) = post(&a, "/internal/tenants/acme/export", b"");
    assert_eq!(status, 200);
    assert_eq!(post(&a, "/internal/tenants/acme/thaw", b"").0, 204);
    assert_eq!(counter_call(&a, &id).0, 2);
    // The snapshot of move m1: the tenant at 2.
    let (status, moved) = post(&a, "/internal/tenants/acme/export?move=m1", b"");
    assert_eq!(status, 200);

    // Neither the old snapshot, nor m1's under another move or none, is
    // taken for move m1's.
    for (bytes, path) in [
        (&old, "/internal/tenants/acme/import?move=m1"),
        (&moved, "/internal/tenants/acme/import?move=m2"),
        (&moved, "/internal/tenants/acme/import"),
        (&moved, "/internal/tenants/acme/import?move=m1&replace=true"),
        (&moved, "/internal/tenants/acme/import?move=not%20an%20id"),
    ] {
        let (status, body) = post(&b, path, bytes);
        assert_eq!(status, 400, "{path}: {}", String::from_utf8_lossy(&body));
    }
    let (_, list) = b.request("GET", "/functions", Some("acme"), "", b"");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&list).unwrap()["functions"],
        serde_json::json!([]),
        "nothing refused was installed"
    );
    // A header changed after it was signed is refused too.
    let mut changed = old.clone();
    changed[12] |= 8;
    let (status, body) = post(&b, "/internal/tenants/acme/import", &changed);
    assert_eq!(status, 400);
    assert!(
        String::from_utf8_lossy(&body).contains("header"),
        "{}",
        String::from_utf8_lossy(&body)
    );

    // m1's snapshot as m1's: the tenant goes on from 2.
    let (status, body) = post(&b, "/internal/tenants/acme/import?move=m1", &moved);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(counter_call(&b, &id).0, 3);
}
