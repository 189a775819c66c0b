//! The proxy in front of real executors: authentication, isolation, rate
//! limits, stickiness, live migration under load, a killed executor, the
//! audit log, and the admin API.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::harness::curl_tls;
use crate::harness::{ADMIN_TOKEN, ProxyOptions, TestFleet, parse_counter, tenants_on};

#[test]
fn tokens_decide_who_may_call_and_as_whom() {
    let fleet = TestFleet::start(1, ProxyOptions::default());
    let p = &fleet.proxy;

    let none = p.api.call("GET", "/functions", &[], None);
    assert_eq!(none.status, 401);
    assert_eq!(none.code(), "unauthorized");
    assert!(none.header("x-request-id").is_some());
    assert_eq!(none.header("www-authenticate"), Some("Bearer"));

    let wrong = p.call("not-a-token", "GET", "/functions", None);
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.code(), "unauthorized");

    let basic = p.api.call(
        "GET",
        "/functions",
        &[("authorization", "Basic dG9rLWFjbWU6")],
        None,
    );
    assert_eq!(basic.status, 401);

    // A tenant header may only name the token's own tenant.
    let other = p.api.call(
        "GET",
        "/functions",
        &[
            ("authorization", "Bearer tok-acme"),
            ("x-tensor-wasm-tenant", "beta"),
        ],
        None,
    );
    assert_eq!(other.status, 403);
    assert_eq!(other.code(), "tenant_scope_denied");
    let own = p.api.call(
        "GET",
        "/functions",
        &[
            ("authorization", "Bearer tok-acme"),
            ("x-tensor-wasm-tenant", "acme"),
            ("x-request-id", "client-chosen-id"),
        ],
        None,
    );
    assert_eq!(own.status, 200, "{}", own.text());
    assert_eq!(own.header("x-request-id"), Some("client-chosen-id"));
    assert_eq!(own.json()["functions"], serde_json::json!([]));

    // Health and metrics need no token.
    assert_eq!(p.api.call("GET", "/healthz", &[], None).status, 200);
    let metrics = p.api.call("GET", "/metrics", &[], None).text();
    for name in [
        "tensor_wasm_http_requests_total",
        "tensor_wasm_http_request_duration_seconds",
        "tensor_wasm_http_requests_in_flight",
        "tensor_wasm_build_info",
        "tensor_wasm_migrations_total",
    ] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }
    assert!(
        metrics.contains(r#"route="/functions",status="401""#),
        "{metrics}"
    );

    // The admin API wants its own token.
    let admin = p.admin.call("GET", "/admin/executors", &[], None);
    assert_eq!(admin.status, 401);
    let admin = p.admin.call(
        "GET",
        "/admin/executors",
        &[("authorization", "Bearer tok-acme")],
        None,
    );
    assert_eq!(admin.status, 401);
    let list = p.admin("GET", "/admin/executors", None);
    assert_eq!(list.status, 200, "{}", list.text());
    let execs = list.json()["executors"].as_array().unwrap().clone();
    assert_eq!(execs.len(), 1);
    assert_eq!(execs[0]["id"], "cpu0");
    assert_eq!(execs[0]["healthy"], true);
    assert_eq!(execs[0]["device"]["kind"], "cpu");
    assert_eq!(execs[0]["tenants"], serde_json::json!(["acme"]));
}

#[test]
fn a_bare_token_is_refused_at_start_up_without_echoing_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tensor-wasm"))
        .args([
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .arg("--state-dir")
        .arg(dir.path())
        .env("TENSOR_WASM_API_TOKENS", "sekrit-bare-token")
        .env("TENSOR_WASM_INTERNAL_TOKEN", "x")
        .env_remove("TENSOR_WASM_API_TOKENS_FILE")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("token:tenant"), "{err}");
    assert!(!err.contains("sekrit-bare-token"), "{err}");
}

#[test]
fn tenants_are_isolated_and_sticky_through_the_proxy() {
    let fleet = TestFleet::start(2, ProxyOptions::default());
    let p = &fleet.proxy;
    let acme_fn = fleet.deploy_counter("tok-acme");
    let beta_fn = fleet.deploy_counter("tok-beta");

    // Each tenant sees only its own function; the other's id is 404.
    let r = p.call("tok-acme", "GET", &format!("/functions/{beta_fn}"), None);
    assert_eq!(r.status, 404);
    assert_eq!(r.code(), "function_not_found");
    let r = p.call(
        "tok-beta",
        "POST",
        &format!("/functions/{acme_fn}/invoke"),
        Some(("text/plain", b"")),
    );
    assert_eq!(r.status, 404);
    let listed = p.call("tok-acme", "GET", "/functions", None).json();
    let ids: Vec<&str> = listed["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![acme_fn.as_str()]);

    // State is per tenant and every call lands on the same executor.
    for i in 1..=5 {
        let r = fleet.count("tok-acme", &acme_fn);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(parse_counter(&r.body), (i, vec![i as f32; 4]));
    }
    let r = fleet.count("tok-beta", &beta_fn);
    assert_eq!(parse_counter(&r.body).0, 1);

    // Many tenants: spread over both executors, each only where placed.
    let mut tokens = Vec::new();
    let mut list = Vec::new();
    for i in 0..12 {
        tokens.push(format!("tok-t{i}"));
        list.push(format!("tok-t{i}:t{i}"));
    }
    drop(fleet);
    let fleet = TestFleet::start(
        2,
        ProxyOptions {
            tokens: list.join(","),
            ..ProxyOptions::default()
        },
    );
    let mut fns = BTreeMap::new();
    for (i, tok) in tokens.iter().enumerate() {
        fns.insert(i, fleet.deploy_counter(tok));
    }
    for _round in 0..3 {
        for (i, tok) in tokens.iter().enumerate() {
            assert_eq!(fleet.count(tok, &fns[&i]).status, 200);
        }
    }
    let mut per_exec: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for i in 0..tokens.len() {
        let tenant = format!("t{i}");
        let placed = fleet.proxy.placement(&tenant).expect("placed");
        per_exec.entry(placed).or_default().insert(tenant);
    }
    assert_eq!(
        per_exec.len(),
        2,
        "both executors hold tenants: {per_exec:?}"
    );
    for ex in &fleet.executors {
        let held: BTreeSet<String> = tenants_on(ex).into_iter().collect();
        assert_eq!(
            held,
            per_exec.get(&ex.id).cloned().unwrap_or_default(),
            "executor {} holds exactly the tenants placed on it",
            ex.id
        );
    }
    // Counters went up by one per call, on one instance each.
    for (i, tok) in tokens.iter().enumerate() {
        assert_eq!(parse_counter(&fleet.count(tok, &fns[&i]).body).0, 4);
    }
}

#[test]
fn a_tenant_cannot_reach_the_executors_internal_routes() {
    // One executor: both tenants live on it.
    let fleet = TestFleet::start(1, ProxyOptions::default());
    let p = &fleet.proxy;
    let beta_fn = fleet.deploy_counter("tok-beta");
    assert_eq!(parse_counter(&fleet.count("tok-beta", &beta_fn).body).0, 1);

    let module = format!("/internal/tenants/beta/modules/{beta_fn}");
    let probes: [(&str, &str); 10] = [
        ("GET", "/internal/info"),
        ("POST", "/internal/tenants/beta/export"),
        ("POST", "/internal/tenants/beta/thaw"),
        ("GET", "/internal/tenants/beta/modules"),
        ("GET", &module),
        ("POST", "/internal/tenants/acme/import"),
        ("POST", "/internal/modules"),
        ("DELETE", "/internal/tenants/beta"),
        ("DELETE", "//internal/tenants/beta"),
        ("POST", "/functions/../internal/tenants/beta/export"),
    ];
    for (method, path) in probes {
        let r = p.call(
            "tok-acme",
            method,
            path,
            Some(("application/octet-stream", b"x")),
        );
        assert_eq!(r.status, 404, "{method} {path}: {}", r.text());
        assert_eq!(r.code(), "not_found", "{method} {path}");
    }

    // The proxy answered them itself: acme was never routed anywhere.
    assert_eq!(p.placement("acme"), None);

    // Beta was neither frozen nor dropped, and kept its state.
    let r = fleet.count("tok-beta", &beta_fn);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(parse_counter(&r.body).0, 2);
    assert_eq!(tenants_on(fleet.executor("cpu0")), vec!["beta".to_string()]);
}

#[test]
fn the_rate_limit_answers_429_with_retry_after_per_tenant() {
    let fleet = TestFleet::start(
        1,
        ProxyOptions {
            qps: 0.5,
            burst: 3,
            ..ProxyOptions::default()
        },
    );
    let p = &fleet.proxy;
    for _ in 0..3 {
        assert_eq!(p.call("tok-acme", "GET", "/functions", None).status, 200);
    }
    let limited = p.call("tok-acme", "GET", "/functions", None);
    assert_eq!(limited.status, 429);
    assert_eq!(limited.code(), "rate_limited");
    let retry: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    // Another tenant has its own budget.
    assert_eq!(p.call("tok-beta", "GET", "/functions", None).status, 200);
    let metrics = p.api.call("GET", "/metrics", &[], None).text();
    assert!(
        metrics.contains("tensor_wasm_rate_limited_total 1"),
        "{metrics}"
    );
}

#[test]
fn a_stateful_tenant_migrates_under_load_without_a_failed_request() {
    let fleet = Arc::new(TestFleet::start(2, ProxyOptions::default()));
    let id = fleet.deploy_counter("tok-acme");
    let bystander = fleet.deploy_counter("tok-beta");
    assert_eq!(parse_counter(&fleet.count("tok-acme", &id).body).0, 1);

    // A client calls without pause while the tenant moves back and forth.
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let fleet = fleet.clone();
        let stop = stop.clone();
        let id = id.clone();
        std::thread::spawn(move || {
            let mut seen = vec![1u32];
            while !stop.load(Ordering::Relaxed) {
                let r = fleet.count("tok-acme", &id);
                assert_eq!(
                    r.status,
                    200,
                    "a call failed during migration: {}",
                    r.text()
                );
                let (n, tensor) = parse_counter(&r.body);
                assert_eq!(
                    tensor,
                    vec![n as f32; 4],
                    "device tensor follows the counter"
                );
                seen.push(n);
            }
            seen
        })
    };
    let mut pauses = Vec::new();
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(150));
        let from = fleet.proxy.placement("acme").unwrap();
        let to = if from == "cpu0" { "cpu1" } else { "cpu0" };
        let body = serde_json::json!({ "to": to }).to_string();
        let r = fleet.proxy.admin(
            "POST",
            "/admin/tenants/acme/migrate",
            Some(("application/json", body.as_bytes())),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let report = r.json();
        assert_eq!(report["from"], from.as_str());
        assert_eq!(report["to"], to);
        assert!(report["bytes"].as_u64().unwrap() > 0);
        pauses.push(report["pause_ms"].as_f64().unwrap());
        assert_eq!(fleet.proxy.placement("acme").unwrap(), to);
        assert!(tenants_on(fleet.executor(to)).contains(&"acme".to_string()));
        assert!(!tenants_on(fleet.executor(&from)).contains(&"acme".to_string()));
        // The bystander is served throughout.
        assert_eq!(fleet.count("tok-beta", &bystander).status, 200);
    }
    std::thread::sleep(Duration::from_millis(150));
    stop.store(true, Ordering::Relaxed);
    let seen = client.join().expect("no failed request");
    assert!(seen.len() > 8, "the client kept calling: {}", seen.len());
    let expected: Vec<u32> = (1..=seen.len() as u32).collect();
    assert_eq!(seen, expected, "every call counted once, in order");
    eprintln!("migration pauses (ms): {pauses:?}, calls: {}", seen.len());

    // Migrating to where it is: a no-op; to nowhere: 404; twice at once
    // is impossible to observe here, the unit tests cover it.
    let here = fleet.proxy.placement("acme").unwrap();
    let body = serde_json::json!({ "to": here }).to_string();
    let r = fleet.proxy.admin(
        "POST",
        "/admin/tenants/acme/migrate",
        Some(("application/json", body.as_bytes())),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["pause_ms"], 0.0);
    let r = fleet.proxy.admin(
        "POST",
        "/admin/tenants/acme/migrate",
        Some(("application/json", br#"{"to": "gpu9"}"#)),
    );
    assert_eq!(r.status, 404);
    let r = fleet.proxy.admin(
        "POST",
        "/admin/tenants/nobody/migrate",
        Some(("application/json", br#"{"to": "cpu0"}"#)),
    );
    assert_eq!(r.status, 404);
    let metrics = fleet.proxy.api.call("GET", "/metrics", &[], None).text();
    assert!(
        metrics.contains(r#"tensor_wasm_migrations_total{result="success"} 5"#),
        "{metrics}"
    );
    assert!(metrics.contains("tensor_wasm_migration_pause_seconds_count 5"));
}

#[test]
fn a_killed_executor_fails_fast_for_its_tenants_only() {
    let mut list = Vec::new();
    for i in 0..10 {
        list.push(format!("tok-t{i}:t{i}"));
    }
    let mut fleet = TestFleet::start(
        2,
        ProxyOptions {
            tokens: list.join(","),
            ..ProxyOptions::default()
        },
    );
    let mut fns = Vec::new();
    for i in 0..10 {
        fns.push(fleet.deploy_counter(&format!("tok-t{i}")));
    }
    let mut placed: Vec<String> = (0..10)
        .map(|i| fleet.proxy.placement(&format!("t{i}")).unwrap())
        .collect();
    // The ring hashes the executors' ports, which differ from run to run:
    // now and then every tenant lands on one executor. Move one over so
    // that both hold tenants.
    for ex in ["cpu0", "cpu1"] {
        if !placed.iter().any(|p| p == ex) {
            let r = fleet.proxy.migrate("t0", ex);
            assert_eq!(r.status, 200, "{}", r.text());
            placed[0] = ex.to_string();
        }
    }
    assert_eq!(
        fleet.proxy.placement("t0").as_deref(),
        Some(placed[0].as_str())
    );

    // SIGKILL cpu0.
    let victim = fleet.executor_mut("cpu0");
    victim.child.kill().unwrap();
    victim.child.wait().unwrap();

    for round in 0..3 {
        for i in 0..10 {
            let r = fleet.count(&format!("tok-t{i}"), &fns[i]);
            if placed[i] == "cpu0" {
                assert_eq!(r.status, 503, "round {round}: {}", r.text());
                assert_eq!(r.code(), "executor_unavailable");
                assert_eq!(r.header("retry-after"), Some("1"));
            } else {
                assert_eq!(r.status, 200, "round {round}: {}", r.text());
                assert_eq!(parse_counter(&r.body).0, round + 1);
            }
        }
    }
    let execs = fleet.proxy.admin("GET", "/admin/executors", None).json();
    let cpu0 = execs["executors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == "cpu0")
        .unwrap()
        .clone();
    assert_eq!(cpu0["healthy"], false);
}

#[test]
fn audit_records_are_complete_across_rotations() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit").join("audit.log");
    let fleet = TestFleet::start(
        1,
        ProxyOptions {
            audit_log: Some(audit.clone()),
            audit_max_bytes: 4096,
            qps: 1.0,
            burst: 40,
            ..ProxyOptions::default()
        },
    );
    let p = &fleet.proxy;
    let mut sent = BTreeMap::new();
    for i in 0..150 {
        let rid = format!("audit-{i}");
        let (auth, expect) = match i % 5 {
            0 => ("Bearer wrong-token", 401),
            1 => ("", 401),
            _ => ("Bearer tok-acme", 0),
        };
        let mut headers = vec![("x-request-id", rid.as_str())];
        if !auth.is_empty() {
            headers.push(("authorization", auth));
        }
        let r = p.api.call("GET", "/functions", &headers, None);
        if expect != 0 {
            assert_eq!(r.status, expect);
        }
        sent.insert(rid, r.status);
    }
    let scoped = p.api.call(
        "GET",
        "/functions",
        &[
            ("authorization", "Bearer tok-acme"),
            ("x-tensor-wasm-tenant", "beta"),
            ("x-request-id", "audit-scope"),
        ],
        None,
    );
    sent.insert("audit-scope".into(), scoped.status);
    let admin = p.admin.call(
        "GET",
        "/admin/placements",
        &[
            ("authorization", &format!("Bearer {ADMIN_TOKEN}")),
            ("x-request-id", "audit-admin"),
        ],
        None,
    );
    sent.insert("audit-admin".into(), admin.status);
    assert!(
        sent.values().any(|&s| s == 429),
        "some requests were limited"
    );
    // A graceful stop flushes and fsyncs what is queued.
    let TestFleet {
        proxy, executors, ..
    } = fleet;
    proxy.stop();
    drop(executors);

    let mut seen = BTreeMap::new();
    let mut files = 0;
    for entry in std::fs::read_dir(audit.parent().unwrap()).unwrap() {
        files += 1;
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        assert!(!text.contains("tok-acme") && !text.contains("wrong-token"));
        assert!(!text.contains(ADMIN_TOKEN));
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).expect("whole JSON lines");
            let rid = v["request_id"].as_str().unwrap().to_string();
            let status = v["status"].as_u64().unwrap() as u16;
            for field in [
                "time",
                "action",
                "resource",
                "outcome",
                "latency_ms",
                "listener",
            ] {
                assert!(!v[field].is_null(), "{field} missing in {line}");
            }
            if status == 401 && v["token_id"].is_string() {
                assert_eq!(v["token_id"].as_str().unwrap().len(), 12);
            }
            assert!(
                seen.insert(rid, (status, v)).is_none(),
                "one record per request"
            );
        }
    }
    assert!(files > 3, "the log rotated: {files} files");
    for (rid, status) in &sent {
        let (got, rec) = seen
            .get(rid)
            .unwrap_or_else(|| panic!("no audit record for {rid}"));
        assert_eq!(got, status, "{rid}");
        let outcome = rec["outcome"].as_str().unwrap();
        match status {
            200 => assert_eq!(outcome, "success"),
            401 | 403 => assert_eq!(outcome, "denied"),
            429 => assert_eq!(outcome, "rate_limited"),
            s => panic!("unexpected status {s}"),
        }
    }
    assert_eq!(seen["audit-admin"].1["listener"], "admin");
    assert_eq!(seen["audit-scope"].1["tenant"], "acme");
    assert_eq!(seen["audit-2"].1["action"], "functions.list");
}

#[test]
fn the_public_listener_speaks_tls_when_given_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (_, cert, key) = crate::harness::test_certificates(dir.path());
    let fleet = TestFleet::start(
        1,
        ProxyOptions {
            tls: Some((cert, key)),
            ..ProxyOptions::default()
        },
    );
    let port = fleet.proxy.options.listen_port;
    let (status, body) = curl_tls(port, "/functions", Some("tok-acme"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, r#"{"functions":[]}"#);
    assert_eq!(curl_tls(port, "/functions", None).0, 401);
    // Plain HTTP on the TLS port gets no answer.
    let plain = fleet.proxy.api.try_call("GET", "/healthz", &[], None);
    assert!(!plain.is_ok_and(|r| r.status == 200));
}

#[test]
fn executors_are_discovered_through_dns() {
    let dir = tempfile::tempdir().unwrap();
    let ex = crate::harness::ExecutorProcess::start("pod-a", &dir.path().join("ex"));
    let port = ex.addr.rsplit(':').next().unwrap().to_string();
    let proxy = crate::harness::ProxyProcess::start(
        &dir.path().join("proxy"),
        &[],
        ProxyOptions {
            extra_args: vec!["--executor-dns".into(), format!("localhost:{port}")],
            ..ProxyOptions::default()
        },
    );
    let start = std::time::Instant::now();
    loop {
        let list = proxy.admin("GET", "/admin/executors", None).json();
        if crate::harness::executor_ids(&list) == ["pod-a"] {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "not discovered: {list}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = proxy.call("tok-acme", "GET", "/functions", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(proxy.placement("acme").as_deref(), Some("pod-a"));
}

/// What the proxy and the executors write of their tenants (functions,
/// compiled modules, journals, placements, the audit log) is theirs only:
/// no file or folder under a state directory is open to other users.
#[test]
fn state_files_are_for_the_services_user_only() {
    use std::os::unix::fs::PermissionsExt;

    let fleet = TestFleet::start(2, ProxyOptions::default());
    let id = fleet.deploy_counter("tok-acme");
    assert_eq!(fleet.count("tok-acme", &id).status, 200);
    // The checkpointer's first pass writes the tenant's journal.
    std::thread::sleep(Duration::from_millis(300));
    let mut open = Vec::new();
    let mut seen = 0;
    let mut walk = vec![fleet.proxy_state()];
    walk.extend(fleet.executors.iter().map(|e| e.state_dir().to_path_buf()));
    while let Some(path) = walk.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            walk.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        }
        if meta.is_file() || meta.is_dir() {
            seen += 1;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                open.push(format!("{} {mode:o}", path.display()));
            }
        }
    }
    assert!(seen > 10, "only {seen} files and folders");
    assert!(open.is_empty(), "open to others: {open:#?}");
}
