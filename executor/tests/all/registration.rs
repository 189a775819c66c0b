//! Registration: what is refused and why, replace, delete, persistence.

use tensor_wasm_executor::config::TenantQuotas;

use crate::harness::{TestExecutor, multipart, small_limits};

const MINIMAL: &str = r#"(module (memory (export "memory") 1)
    (func (export "handle") (result i32) (i32.const 0)))"#;

fn register(ex: &TestExecutor, name: &str, wasm: &[u8]) -> crate::harness::Reply {
    ex.post(
        "t1",
        &format!("/functions?name={name}"),
        "application/wasm",
        wasm,
    )
}

#[test]
fn refusals_name_the_reason() {
    let ex = TestExecutor::start();
    let cases: &[(&str, &str, &str)] = &[
        (
            r#"(module (import "env" "now" (func (result i64))) (memory (export "memory") 1)
               (func (export "handle") (result i32) (i32.const 0)))"#,
            "import_not_allowed",
            "env::now",
        ),
        (
            r#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
               (import "tensor" "spawn_thread" (func (result i32)))
               (memory (export "memory") 1) (func (export "handle") (result i32) (i32.const 0)))"#,
            "import_not_allowed",
            "tensor::spawn_thread",
        ),
        (
            r#"(module (func (export "handle") (result i32) (i32.const 0)))"#,
            "missing_export",
            "memory",
        ),
        (
            r#"(module (memory (export "memory") 1))"#,
            "missing_export",
            "handle",
        ),
        (
            r#"(module (memory (export "memory") 1) (memory 1)
               (func (export "handle") (result i32) (i32.const 0)))"#,
            "invalid_wasm",
            "memories",
        ),
        (
            r#"(module (memory (export "memory") 1) (table 2 funcref)
               (func (export "handle") (result i32)
                 (table.set (i32.const 0) (ref.null func)) (i32.const 0)))"#,
            "invalid_wasm",
            "table.set",
        ),
    ];
    for (i, (src, code, needle)) in cases.iter().enumerate() {
        let r = register(&ex, &format!("case{i}"), &wat::parse_str(src).unwrap());
        assert_eq!(r.status, 422, "case {i}: {}", r.text());
        assert_eq!(r.code(), *code, "case {i}: {}", r.text());
        let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(msg.contains(needle), "case {i}: {msg}");
    }
    let r = register(&ex, "garbage", b"\0asm\x01\0\0\0\xff\xff");
    assert_eq!((r.status, r.code().as_str()), (422, "invalid_wasm"));
    let r = ex.post("t1", "/functions", "text/plain", b"hi");
    assert_eq!(
        (r.status, r.code().as_str()),
        (415, "unsupported_media_type")
    );
    // Nothing of the refused modules was kept.
    assert_eq!(
        ex.get("t1", "/functions").json()["functions"],
        serde_json::json!([])
    );
}

#[test]
fn configs_that_could_never_run_are_refused() {
    let ex = TestExecutor::start();
    let wasm = wat::parse_str(MINIMAL).unwrap();
    let with_config = |name: &str, config: &str| {
        ex.post(
            "t1",
            &format!("/functions?name={name}"),
            "multipart/form-data; boundary=XX",
            &multipart(&[("module", &wasm), ("config", config.as_bytes())]),
        )
    };
    let cases = [
        ("[1, 2]", "invalid_json"),
        (r#"{"deadline_ms": 0}"#, "invalid_input"),
        (r#"{"max_instances": 0}"#, "invalid_input"),
        // One page of memory does not fit in 0 bytes.
        (r#"{"memory_limit_bytes": 0}"#, "invalid_input"),
    ];
    for (i, (config, code)) in cases.iter().enumerate() {
        let r = with_config(&format!("c{i}"), config);
        assert_eq!((r.status, r.code().as_str()), (400, *code), "{config}");
    }
    let r = with_config(
        "fits",
        r#"{"memory_limit_bytes": 65536, "max_instances": 2}"#,
    );
    assert_eq!(r.status, 201, "{}", r.text());
    // Media types are case-insensitive.
    let r = ex.post("t1", "/functions?name=upper", "Application/WASM", &wasm);
    assert_eq!(r.status, 201, "{}", r.text());
    let names: Vec<String> = ex.get("t1", "/functions").json()["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn names_are_unique_unless_replaced() {
    let ex = TestExecutor::start();
    let wasm = wat::parse_str(MINIMAL).unwrap();
    let first = register(&ex, "f", &wasm);
    assert_eq!(first.status, 201);
    let id = first.json()["id"].as_str().unwrap().to_string();
    assert_eq!(
        first.json()["exports"],
        serde_json::json!(["memory", "handle"])
    );
    let again = register(&ex, "f", &wasm);
    assert_eq!(
        (again.status, again.code().as_str()),
        (409, "function_exists")
    );
    let replaced = ex.post(
        "t1",
        "/functions?name=f&replace=true",
        "application/wasm",
        &wasm,
    );
    assert_eq!(replaced.status, 201, "{}", replaced.text());
    assert_eq!(replaced.json()["id"], id.as_str(), "replace keeps the id");
    let got = ex.get("t1", &format!("/functions/{id}"));
    assert_eq!(got.json()["name"], "f");
    assert_eq!(ex.delete("t1", &format!("/functions/{id}")).status, 204);
    let gone = ex.get("t1", &format!("/functions/{id}"));
    assert_eq!(
        (gone.status, gone.code().as_str()),
        (404, "function_not_found")
    );
}

#[test]
fn functions_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let ex = TestExecutor::start_in(dir.path(), small_limits(), TenantQuotas::default());
        ex.deploy(
            "t1",
            "kept",
            r#"(module (import "tensor" "output_write" (func $w (param i32 i32) (result i32)))
                (memory (export "memory") 1)
                (data (i32.const 0) "still here")
                (func (export "handle") (result i32) (drop (call $w (i32.const 0) (i32.const 10))) (i32.const 0)))"#,
        )
    };
    let ex = TestExecutor::start_in(dir.path(), small_limits(), TenantQuotas::default());
    let list = ex.get("t1", "/functions").json();
    assert_eq!(list["functions"][0]["id"], id.as_str());
    let r = ex.post("t1", &format!("/functions/{id}/invoke"), "text/plain", b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, b"still here");
}

#[test]
fn the_function_quota_holds() {
    let dir = tempfile::tempdir().unwrap();
    let quotas = TenantQuotas {
        functions: 2,
        ..TenantQuotas::default()
    };
    let ex = TestExecutor::start_in(dir.path(), small_limits(), quotas);
    let wasm = wat::parse_str(MINIMAL).unwrap();
    assert_eq!(register(&ex, "a", &wasm).status, 201);
    assert_eq!(register(&ex, "b", &wasm).status, 201);
    let r = register(&ex, "c", &wasm);
    assert_eq!(
        (r.status, r.code().as_str()),
        (422, "quota_exceeded"),
        "{}",
        r.text()
    );
    // Another tenant has its own quota.
    let r = ex.post("t2", "/functions?name=c", "application/wasm", &wasm);
    assert_eq!(r.status, 201);
}

/// A deleted function's compiled module leaves the module cache once no
/// function (of any tenant) uses it; one still in use stays.
#[test]
fn a_deleted_functions_module_leaves_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let ex = TestExecutor::start_in(dir.path(), small_limits(), TenantQuotas::default());
    let cache = dir.path().join("module-cache");
    let entries = || {
        std::fs::read_dir(&cache)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".cwasm")
            })
            .count()
    };
    const SHARED: &str = r#"(module (memory (export "memory") 1)
        (func (export "handle") (result i32) (i32.const 1)))"#;
    const OWN: &str = r#"(module (memory (export "memory") 1)
        (func (export "handle") (result i32) (i32.const 2)))"#;
    let a = ex.deploy("acme", "shared", SHARED);
    let b = ex.deploy("beta", "shared", SHARED);
    let own = ex.deploy("acme", "own", OWN);
    assert_eq!(entries(), 2);
    assert_eq!(ex.delete("acme", &format!("/functions/{own}")).status, 204);
    assert_eq!(entries(), 1, "its own module went");
    assert_eq!(ex.delete("acme", &format!("/functions/{a}")).status, 204);
    assert_eq!(entries(), 1, "beta still uses the shared one");
    assert_eq!(ex.delete("beta", &format!("/functions/{b}")).status, 204);
    assert_eq!(entries(), 0);
}

/// Modules of wasm proposals this build leaves out (GC, threads and
/// atomics, memory64, exceptions, typed function references): each is
/// refused `invalid_wasm` or, where the engine takes it, runs to a typed
/// answer; none takes the executor down, which serves on after them.
#[test]
fn modules_of_proposals_left_out_are_refused_or_run_safely() {
    let ex = TestExecutor::start();
    let body = |b: &str| format!(r#"(module (memory (export "memory") 1) {b})"#);
    let cases = [
        (
            "gc-struct",
            body(
                r#"(type $s (struct (field i32)))
                (func (export "handle") (result i32)
                  (drop (struct.new $s (i32.const 1))) (i32.const 0))"#,
            ),
        ),
        (
            "gc-array",
            body(
                r#"(type $a (array (mut i32)))
                (func (export "handle") (result i32)
                  (array.len (array.new $a (i32.const 0) (i32.const 1000000000))))"#,
            ),
        ),
        (
            "gc-i31",
            body(
                r#"(func (export "handle") (result i32)
                  (i31.get_s (ref.i31 (i32.const 7))))"#,
            ),
        ),
        (
            "shared-memory",
            r#"(module (memory (export "memory") 1 1 shared)
                (func (export "handle") (result i32) (i32.const 0)))"#
                .to_string(),
        ),
        (
            "atomics",
            body(
                r#"(func (export "handle") (result i32)
                  (drop (memory.atomic.notify (i32.const 0) (i32.const 1)))
                  (i32.atomic.rmw.add (i32.const 0) (i32.const 1)))"#,
            ),
        ),
        (
            "atomic-wait",
            body(
                r#"(func (export "handle") (result i32)
                  (memory.atomic.wait32 (i32.const 0) (i32.const 0) (i64.const -1)))"#,
            ),
        ),
        (
            "memory64",
            r#"(module (memory (export "memory") i64 1)
                (func (export "handle") (result i32) (i32.const 0)))"#
                .to_string(),
        ),
        (
            "exceptions",
            body(
                r#"(tag $t (param i32))
                (func (export "handle") (result i32) (throw $t (i32.const 1)))"#,
            ),
        ),
        (
            "typed-function-references",
            body(
                r#"(type $f (func (result i32)))
                (func $one (type $f) (i32.const 1))
                (elem declare func $one)
                (func (export "handle") (result i32)
                  (i32.sub (call_ref $f (ref.func $one)) (i32.const 1)))"#,
            ),
        ),
    ];
    for (name, src) in &cases {
        let wasm = wat::parse_str(src).unwrap_or_else(|e| panic!("{name}: {e}"));
        let r = register(&ex, name, &wasm);
        match r.status {
            422 => assert_eq!(r.code(), "invalid_wasm", "{name}: {}", r.text()),
            201 => {
                let id = r.json()["id"].as_str().unwrap().to_string();
                let run = ex.post("t1", &format!("/functions/{id}/invoke"), "text/plain", b"");
                assert!(
                    run.status == 200
                        || (run.status == 500
                            && ["guest_trap", "function_error"].contains(&run.code().as_str())),
                    "{name}: {} {}",
                    run.status,
                    run.text()
                );
            }
            other => panic!("{name}: {other} {}", r.text()),
        }
    }
    // The executor serves on.
    let ok = ex.deploy(
        "t1",
        "plain",
        r#"(module (memory (export "memory") 1) (func (export "handle") (result i32) (i32.const 0)))"#,
    );
    let r = ex.post("t1", &format!("/functions/{ok}/invoke"), "text/plain", b"");
    assert_eq!(r.status, 200, "{}", r.text());
}
