//! Auth, tenant scoping, request ids, health and metrics.

use crate::harness::{TOKEN, TestExecutor};

const FN: &str = r#"(module (memory (export "memory") 1)
    (func (export "handle") (result i32) (i32.const 0)))"#;

#[test]
fn another_tenant_cannot_see_or_invoke() {
    let ex = TestExecutor::start();
    let id = ex.deploy("alice", "secret", FN);
    assert_eq!(
        ex.get("alice", "/functions").json()["functions"][0]["id"],
        id.as_str()
    );
    assert_eq!(
        ex.get("bob", "/functions").json()["functions"],
        serde_json::json!([])
    );
    for r in [
        ex.get("bob", &format!("/functions/{id}")),
        ex.get("bob", &format!("/functions/{id}/logs")),
        ex.post("bob", &format!("/functions/{id}/invoke"), "text/plain", b""),
        ex.delete("bob", &format!("/functions/{id}")),
    ] {
        assert_eq!(
            (r.status, r.code().as_str()),
            (404, "function_not_found"),
            "{}",
            r.text()
        );
    }
    // Still there for its owner.
    assert_eq!(ex.get("alice", &format!("/functions/{id}")).status, 200);
}

#[test]
fn the_internal_token_is_required() {
    let ex = TestExecutor::start();
    let agent = ex.raw_agent();
    let no_token = agent
        .get(ex.url("/functions"))
        .header("x-tensor-wasm-tenant", "a")
        .call()
        .unwrap();
    assert_eq!(no_token.status().as_u16(), 401);
    let wrong = agent
        .get(ex.url("/functions"))
        .header("x-tensor-wasm-tenant", "a")
        .header("authorization", "Bearer nope")
        .call()
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    let longer = agent
        .get(ex.url("/internal/info"))
        .header("authorization", format!("Bearer {TOKEN}x"))
        .call()
        .unwrap();
    assert_eq!(longer.status().as_u16(), 401);
    // Open routes.
    let health = agent.get(ex.url("/healthz")).call().unwrap();
    assert_eq!(health.status().as_u16(), 200);
}

#[test]
fn bad_tenant_headers_are_refused() {
    let ex = TestExecutor::start();
    for tenant in ["", "Upper", "../etc", "a b"] {
        let r = ex.get(tenant, "/functions");
        assert_eq!(
            (r.status, r.code().as_str()),
            (400, "invalid_input"),
            "{tenant:?}"
        );
    }
}

#[test]
fn request_ids_are_echoed_or_made() {
    let ex = TestExecutor::start();
    let agent = ex.raw_agent();
    let r = agent
        .get(ex.url("/healthz"))
        .header("x-request-id", "abc-123")
        .call()
        .unwrap();
    assert_eq!(r.headers().get("x-request-id").unwrap(), "abc-123");
    let r = agent.get(ex.url("/healthz")).call().unwrap();
    assert!(!r.headers().get("x-request-id").unwrap().is_empty());
    let r = ex.get("t1", "/functions/nope");
    assert!(r.header("x-request-id").is_some());
}

#[test]
fn unknown_routes_and_methods_answer_json_errors() {
    let ex = TestExecutor::start();
    let r = ex.get("t1", "/nothing/here");
    assert_eq!((r.status, r.code().as_str()), (404, "not_found"));
    // A route that exists, with a method it does not take.
    let r = ex.get("t1", "/functions/f1/invoke");
    assert_eq!((r.status, r.code().as_str()), (405, "method_not_allowed"));
    assert!(r.header("x-request-id").is_some());
}

#[test]
fn info_and_metrics_describe_the_executor() {
    let ex = TestExecutor::start();
    let id = ex.deploy("t1", "f", FN);
    let r = ex.post("t1", &format!("/functions/{id}/invoke"), "text/plain", b"");
    assert_eq!(r.status, 200);
    // The control plane's route: tenant traffic is refused there.
    let as_tenant = ex.get("t1", "/internal/info");
    assert_eq!(as_tenant.status, 404);
    assert_eq!(as_tenant.code(), "not_found");
    let info = ex.internal("GET", "/internal/info", b"").json();
    assert_eq!(info["id"], "cpu-test");
    assert_eq!(info["device"]["kind"], "cpu");
    assert_eq!(info["tenants"], serde_json::json!(["t1"]));
    assert_eq!(info["stats"]["active_instances"], 1);
    let metrics = ex
        .raw_agent()
        .get(ex.url("/metrics"))
        .call()
        .unwrap()
        .into_body()
        .read_to_string()
        .unwrap();
    assert!(
        metrics.contains("tensor_wasm_invocations_total{result=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tensor_wasm_active_instances 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tensor_wasm_build_info{component=\"executor\""),
        "{metrics}"
    );
}

/// A tenant runs at most its quota of invocations at once, across its
/// functions: past it, its calls wait (no instance is made for them),
/// while another tenant's call runs.
#[test]
fn a_tenants_running_invocations_stay_within_its_quota() {
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let limits = tensor_wasm_executor::config::EngineLimits {
        default_deadline: std::time::Duration::from_millis(1500),
        default_max_instances: 2,
        ..crate::harness::small_limits()
    };
    let quotas = tensor_wasm_executor::config::TenantQuotas {
        running_invocations: 1,
        ..Default::default()
    };
    let ex = Arc::new(TestExecutor::start_in(dir.path(), limits, quotas));
    let spinner = ex.deploy(
        "a",
        "spinner",
        r#"(module (memory (export "memory") 1)
            (func (export "handle") (result i32) (loop $l (br $l)) (i32.const 0)))"#,
    );
    let quick = ex.deploy("b", "quick", FN);
    let spin = |ex: &Arc<TestExecutor>| {
        let (ex, path) = (ex.clone(), format!("/functions/{spinner}/invoke"));
        std::thread::spawn(move || {
            let r = ex.post("a", &path, "text/plain", b"");
            (r.status, r.code())
        })
    };
    let first = spin(&ex);
    ex.wait_metric("tensor_wasm_active_instances", 1.0);
    let second = spin(&ex);
    std::thread::sleep(std::time::Duration::from_millis(300));
    // Its function has room for two, the tenant's quota for one.
    assert_eq!(ex.metric("tensor_wasm_active_instances"), 1.0);
    let r = ex.post(
        "b",
        &format!("/functions/{quick}/invoke"),
        "text/plain",
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(ex.metric("tensor_wasm_active_instances"), 2.0);
    assert_eq!(
        first.join().unwrap(),
        (504, "deadline_exceeded".to_string())
    );
    // It ran once the first ended (and spun to its own deadline), or
    // gave up waiting.
    let (status, code) = second.join().unwrap();
    assert!(
        matches!(
            (status, code.as_str()),
            (504, "deadline_exceeded") | (503, "capacity_exhausted")
        ),
        "{status} {code}"
    );
}
