//! Operating a fleet through the proxy's admin API and signals: snapshot,
//! restore, drain, rebalance, purge, a refused import, a restarted proxy
//! finishing a recorded move, token rotation on SIGHUP, and the socket
//! hand-off to a new proxy process.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::harness::{
    ProxyOptions, ProxyProcess, RawError, TestFleet, parse_counter, raw_post, tenants_on,
};

fn tenants(n: usize) -> String {
    (0..n)
        .map(|i| format!("tok-t{i}:t{i}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn snapshot_restore_drain_rebalance_and_purge() {
    let fleet = TestFleet::start(
        2,
        ProxyOptions {
            tokens: tenants(6),
            ..ProxyOptions::default()
        },
    );
    let p = &fleet.proxy;
    let fns: Vec<String> = (0..6)
        .map(|i| fleet.deploy_counter(&format!("tok-t{i}")))
        .collect();
    let count = |i: usize| {
        let r = fleet.count(&format!("tok-t{i}"), &fns[i]);
        assert_eq!(r.status, 200, "t{i}: {}", r.text());
        parse_counter(&r.body).0
    };
    for i in 0..6 {
        assert_eq!(count(i), 1);
    }

    // A snapshot leaves the tenant running where it is.
    let snap = p.admin("POST", "/admin/tenants/t0/snapshot", None);
    assert_eq!(snap.status, 200, "{}", snap.text());
    assert!(snap.body.starts_with(b"TWSNAP"));
    assert_eq!(count(0), 2);
    assert_eq!(count(0), 3);
    // Restoring it puts the state back to the moment it was taken.
    let r = p.admin(
        "POST",
        "/admin/tenants/t0/restore",
        Some(("application/octet-stream", &snap.body)),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(count(0), 2);
    // A corrupt snapshot is refused and the state stays.
    let mut bad = snap.body.clone();
    let n = bad.len();
    bad[n - 3] ^= 0x40;
    let r = p.admin(
        "POST",
        "/admin/tenants/t0/restore",
        Some(("application/octet-stream", &bad)),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.code(), "invalid_input");
    assert_eq!(count(0), 3);
    // So is another tenant's snapshot, and the tenant it names for the
    // restore stays unknown.
    let r = p.admin(
        "POST",
        "/admin/tenants/nobody/restore",
        Some(("application/octet-stream", &snap.body)),
    );
    assert_eq!(
        (r.status, r.code().as_str()),
        (400, "invalid_input"),
        "{}",
        r.text()
    );
    assert_eq!(p.placement("nobody"), None);

    // Drain cpu0: everything moves to cpu1, state and all.
    let r = p.admin("POST", "/admin/executors/cpu0/drain", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["failed"].as_array().unwrap().is_empty());
    assert!(tenants_on(fleet.executor("cpu0")).is_empty());
    assert_eq!(tenants_on(fleet.executor("cpu1")).len(), 6);
    assert_eq!(count(0), 4);
    for i in 1..6 {
        assert_eq!(count(i), 2);
    }
    // An executor holding tenants cannot be forgotten; an empty one can.
    let r = p.admin("DELETE", "/admin/executors/cpu1", None);
    assert_eq!(r.status, 409, "{}", r.text());
    let r = p.admin("DELETE", "/admin/executors/cpu0", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let r = p.admin("GET", "/admin/executors", None).json();
    assert_eq!(r["executors"].as_array().unwrap().len(), 1);

    // Register it again and rebalance: three each, counters continue.
    let body = serde_json::json!({"id": "cpu0", "addr": fleet.executor("cpu0").addr}).to_string();
    let r = p.admin(
        "POST",
        "/admin/executors",
        Some(("application/json", body.as_bytes())),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let r = p.admin("POST", "/admin/rebalance", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["moves"].as_array().unwrap().len(), 3);
    assert_eq!(tenants_on(fleet.executor("cpu0")).len(), 3);
    assert_eq!(tenants_on(fleet.executor("cpu1")).len(), 3);
    assert_eq!(count(0), 5);
    for i in 1..6 {
        assert_eq!(count(i), 3);
    }

    // Purge: the tenant is gone everywhere.
    let r = p.admin("DELETE", "/admin/tenants/t5", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(p.placement("t5"), None);
    let listed = p.call("tok-t5", "GET", "/functions", None).json();
    assert_eq!(listed["functions"], serde_json::json!([]));

    // Bad admin input gets typed errors.
    let r = p.admin(
        "POST",
        "/admin/executors",
        Some(("application/json", b"{not json")),
    );
    assert_eq!((r.status, r.code().as_str()), (400, "invalid_json"));
    let r = p.admin(
        "POST",
        "/admin/executors",
        Some(("application/json", br#"{"id": "Bad Id", "addr": "x"}"#)),
    );
    assert_eq!((r.status, r.code().as_str()), (400, "invalid_input"));
    let r = p.admin("POST", "/admin/tenants/BAD/snapshot", None);
    assert_eq!(r.status, 400);
    let r = p.admin("GET", "/admin/nothing", None);
    assert_eq!(r.status, 404);
}

#[test]
fn a_refused_import_leaves_the_tenant_on_its_source() {
    // Executors with different snapshot keys refuse each other's snapshots.
    let fleet = TestFleet::start_with(2, ProxyOptions::default(), |i| {
        if i == 0 {
            vec!["--snapshot-key", "key-zero-key-zero-key-zero-key-zero"]
        } else {
            vec!["--snapshot-key", "key-one-key-one-key-one-key-one-key"]
        }
    });
    let id = fleet.deploy_counter("tok-acme");
    assert_eq!(parse_counter(&fleet.count("tok-acme", &id).body).0, 1);
    let from = fleet.proxy.placement("acme").unwrap();
    let to = if from == "cpu0" { "cpu1" } else { "cpu0" };
    let r = fleet.proxy.migrate("acme", to);
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.code(), "import_failed");
    assert_eq!(fleet.proxy.placement("acme").unwrap(), from);
    let r = fleet.count("tok-acme", &id);
    assert_eq!(r.status, 200, "thawed on its source: {}", r.text());
    assert_eq!(parse_counter(&r.body).0, 2);
    let metrics = fleet.proxy.api.call("GET", "/metrics", &[], None).text();
    assert!(metrics.contains(r#"tensor_wasm_migrations_total{result="failed"} 1"#));
}

#[test]
fn a_restarted_proxy_finishes_or_undoes_recorded_moves() {
    let mut fleet = TestFleet::start(2, ProxyOptions::default());
    let acme = fleet.deploy_counter("tok-acme");
    let beta = fleet.deploy_counter("tok-beta");
    // acme on cpu0, beta on cpu1.
    for (t, to) in [("acme", "cpu0"), ("beta", "cpu1")] {
        assert_eq!(fleet.proxy.migrate(t, to).status, 200);
    }
    for _ in 0..2 {
        assert_eq!(fleet.count("tok-acme", &acme).status, 200);
        assert_eq!(fleet.count("tok-beta", &beta).status, 200);
    }

    // The proxy dies mid-way through two moves:
    // acme cpu0 → cpu1 after the export (bytes stored), and then cpu0
    // dies too; beta cpu1 → cpu0 after the export froze it, before the
    // bytes were recorded.
    fleet.proxy.child.kill().unwrap();
    fleet.proxy.child.wait().unwrap();
    let state = fleet.proxy_state();
    let export = |ex: &str, t: &str| {
        let (status, bytes) = fleet.executor(ex).request(
            "POST",
            &format!("/internal/tenants/{t}/export"),
            None,
            "application/octet-stream",
            b"",
        );
        assert_eq!(status, 200);
        bytes
    };
    let stored = state.join("moves").join("acme.twsnap");
    std::fs::create_dir_all(stored.parent().unwrap()).unwrap();
    std::fs::write(&stored, export("cpu0", "acme")).unwrap();
    export("cpu1", "beta");
    let file = state.join("placements.json");
    let mut table: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    table["moving"] = serde_json::json!({
        "acme": {"from": "cpu0", "to": "cpu1", "snapshot": stored},
        "beta": {"from": "cpu1", "to": "cpu0", "snapshot": null},
    });
    std::fs::write(&file, serde_json::to_vec(&table).unwrap()).unwrap();
    let victim = fleet.executor_mut("cpu0");
    victim.child.kill().unwrap();
    victim.child.wait().unwrap();

    fleet.proxy = ProxyProcess::start(&state, &[], ProxyOptions::default());
    // acme resumes on cpu1 from the stored bytes; beta thaws on cpu1.
    let r = fleet.count("tok-acme", &acme);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(parse_counter(&r.body), (3, vec![3.0; 4]));
    let r = fleet.count("tok-beta", &beta);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(parse_counter(&r.body).0, 3);
    assert_eq!(fleet.proxy.placement("acme").as_deref(), Some("cpu1"));
    assert_eq!(fleet.proxy.placement("beta").as_deref(), Some("cpu1"));
    let table = fleet.proxy.admin("GET", "/admin/placements", None).json();
    assert_eq!(table["moving"], serde_json::json!({}));
    assert!(!stored.exists(), "stored bytes deleted once imported");
}

/// A proxy killed at each step of a pre-copy move, its executors left as
/// that step left them; the restarted proxy finishes the move where the
/// destination committed and undoes it everywhere else, and every tenant is
/// served, warm, by exactly one executor.
#[test]
fn a_restarted_proxy_finishes_or_undoes_pre_copy_moves_at_every_step() {
    let options = || ProxyOptions {
        tokens: tenants(4),
        ..ProxyOptions::default()
    };
    let mut fleet = TestFleet::start(2, options());
    let ids: Vec<String> = (0..4)
        .map(|i| {
            let id = fleet.deploy_counter(&format!("tok-t{i}"));
            assert_eq!(fleet.proxy.migrate(&format!("t{i}"), "cpu0").status, 200);
            for n in 1..=2 {
                let r = fleet.count(&format!("tok-t{i}"), &id);
                assert_eq!(parse_counter(&r.body).0, n);
            }
            id
        })
        .collect();
    fleet.proxy.child.kill().unwrap();
    fleet.proxy.child.wait().unwrap();

    let (a, b) = (fleet.executor("cpu0"), fleet.executor("cpu1"));
    let call = |ex: &crate::harness::ExecutorProcess, method: &str, path: &str, body: &[u8]| {
        let (status, out) = ex.request(method, path, None, "application/json", body);
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {}",
            String::from_utf8_lossy(&out)
        );
        out
    };
    let start = |t: &str| {
        let out = call(a, "POST", &format!("/internal/tenants/{t}/outbound"), b"");
        serde_json::from_slice::<serde_json::Value>(&out).unwrap()["session"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let pull = |t: &str, session: &str| {
        let body = serde_json::json!({"source": a.addr, "session": session}).to_string();
        call(
            b,
            "POST",
            &format!("/internal/tenants/{t}/inbound"),
            body.as_bytes(),
        );
    };
    // t0: step 1 done (a session on the source). t1: step 2 done (staged on
    // the destination). t2: in step 4, the source froze it and sent its
    // final round, the destination did not commit. t3: in step 4, the
    // destination committed.
    let mut moving = serde_json::Map::new();
    for (i, t) in ["t0", "t1", "t2", "t3"].iter().enumerate() {
        let session = start(t);
        if i >= 1 {
            pull(t, &session);
        }
        if i == 2 {
            call(
                a,
                "POST",
                &format!("/internal/outbound/{session}/final"),
                b"",
            );
        }
        if i == 3 {
            call(
                b,
                "POST",
                &format!("/internal/tenants/{t}/inbound/commit"),
                b"",
            );
        }
        moving.insert(
            t.to_string(),
            serde_json::json!({"from": "cpu0", "to": "cpu1", "snapshot": null, "session": session}),
        );
    }
    let state = fleet.proxy_state();
    let file = state.join("placements.json");
    let mut table: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    table["moving"] = serde_json::Value::Object(moving);
    std::fs::write(&file, serde_json::to_vec(&table).unwrap()).unwrap();

    fleet.proxy = ProxyProcess::start(&state, &[], options());
    for (i, home) in ["cpu0", "cpu0", "cpu0", "cpu1"].iter().enumerate() {
        let t = format!("t{i}");
        let r = fleet.count(&format!("tok-t{i}"), &ids[i]);
        assert_eq!(r.status, 200, "{t}: {}", r.text());
        assert_eq!(parse_counter(&r.body), (3, vec![3.0; 4]), "{t} warm");
        assert_eq!(fleet.proxy.placement(&t).as_deref(), Some(*home), "{t}");
    }
    let table = fleet.proxy.admin("GET", "/admin/placements", None).json();
    assert_eq!(table["moving"], serde_json::json!({}));
    let mut on_a = tenants_on(fleet.executor("cpu0"));
    let mut on_b = tenants_on(fleet.executor("cpu1"));
    on_a.sort();
    on_b.sort();
    assert_eq!(
        (on_a, on_b),
        (
            vec!["t0".to_string(), "t1".into(), "t2".into()],
            vec!["t3".to_string()]
        )
    );
}

#[test]
fn tokens_rotate_on_sighup_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    std::fs::write(&file, "# tenants\ntok-a:acme\n").unwrap();
    let fleet = TestFleet::start(
        1,
        ProxyOptions {
            tokens_file: Some(file.clone()),
            ..ProxyOptions::default()
        },
    );
    let p = &fleet.proxy;
    assert_eq!(p.call("tok-a", "GET", "/functions", None).status, 200);
    assert_eq!(p.call("tok-b", "GET", "/functions", None).status, 401);

    std::fs::write(&file, "tok-b:beta\n").unwrap();
    p.signal("HUP");
    let start = Instant::now();
    while p.call("tok-b", "GET", "/functions", None).status != 200 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "reload never took effect"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(p.call("tok-a", "GET", "/functions", None).status, 401);

    // A broken file is refused and the tokens in force stay.
    std::fs::write(&file, "a-bare-token\n").unwrap();
    p.signal("HUP");
    let start = Instant::now();
    while !p.log_text().contains("token reload failed") {
        assert!(start.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(p.call("tok-b", "GET", "/functions", None).status, 200);
}

/// Where the hand-off was when a request began, in order.
const OLD_SERVING: u8 = 0;
const HANDING_OFF: u8 = 1;
const OLD_GONE: u8 = 2;

#[test]
fn a_new_proxy_takes_the_sockets_over_without_a_failed_request() {
    let mut fleet = TestFleet::start(2, ProxyOptions::default());
    let id = fleet.deploy_counter("tok-acme");
    let home = fleet.proxy.placement("acme").unwrap();
    let options = fleet.proxy.options.clone();

    // A client on fresh connections, calling throughout. It stops at the
    // first failed request; `answered[phase]` counts the requests answered
    // by phase at which they began.
    let stop = Arc::new(AtomicBool::new(false));
    let phase = Arc::new(AtomicU8::new(OLD_SERVING));
    let answered: Arc<[AtomicUsize; 3]> = Arc::new(Default::default());
    let client = {
        let (stop, phase, answered) = (stop.clone(), phase.clone(), answered.clone());
        let addr = fleet
            .proxy
            .api
            .base
            .trim_start_matches("http://")
            .to_string();
        let path = format!("/functions/{id}/invoke");
        std::thread::spawn(move || -> Result<Vec<u8>, String> {
            let mut last = 0;
            let mut resent_in = Vec::new();
            let mut in_a_row = 0;
            while !stop.load(Ordering::SeqCst) {
                let began = phase.load(Ordering::SeqCst);
                match raw_post(
                    &addr,
                    &path,
                    "tok-acme",
                    br#"{"inputs": {}}"#,
                    Duration::from_secs(30),
                ) {
                    Ok((200, body)) => {
                        // The counter counts runs: a request lost or run
                        // twice shows here.
                        let n = parse_counter(&body).0;
                        if n != last + 1 {
                            return Err(format!("counter {n} after {last}"));
                        }
                        last = n;
                        in_a_row = 0;
                        answered[usize::from(began)].fetch_add(1, Ordering::SeqCst);
                    }
                    Ok((status, body)) => {
                        return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
                    }
                    // A connection the old process accepted in the instant
                    // its listeners stop, before the request arrived, is
                    // closed unread (pingora, docs/UPGRADE.md). The request
                    // never ran, so it is sent again; the counter shows
                    // that it did not run twice.
                    Err(RawError::Unanswered(e)) if in_a_row < 10 => {
                        eprintln!("closed unanswered ({e}), sending again");
                        resent_in.push(began);
                        in_a_row += 1;
                        continue;
                    }
                    Err(e) => return Err(format!("{e:?}")),
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(resent_in)
        })
    };
    let wait_answered = |phase: u8, n: usize, what: &str| {
        let start = Instant::now();
        while answered[usize::from(phase)].load(Ordering::SeqCst) < n {
            assert!(!client.is_finished(), "the client failed {what}");
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no answers {what}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_answered(OLD_SERVING, 5, "before the hand-off");

    let state = fleet.proxy_state();
    let mut successor = ProxyProcess::start(
        &state,
        &[],
        ProxyOptions {
            upgrade: true,
            ..options
        },
    );
    let sock = state.join("proxy-upgrade.sock");
    let start = Instant::now();
    while !sock.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "successor never waited for sockets"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));
    phase.store(HANDING_OFF, Ordering::SeqCst);
    fleet.proxy.signal("QUIT");
    successor.wait_ready();
    // The old process drains and exits on its own.
    let start = Instant::now();
    while fleet.proxy.child.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "old proxy did not exit:\n{}",
            fleet.proxy.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // From here only the successor holds the sockets: requests begun now
    // are answered by it.
    phase.store(OLD_GONE, Ordering::SeqCst);
    wait_answered(OLD_GONE, 20, "after the old proxy exited");
    stop.store(true, Ordering::SeqCst);
    let resent_in = client
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("a failed request across the hand-off: {e}"));
    // Only the old process closes connections unread: no request begun
    // after it exited was.
    assert!(
        resent_in.iter().all(|&p| p != OLD_GONE),
        "connections closed unread by the successor (phases when begun): {resent_in:?}"
    );
    assert_eq!(successor.placement("acme").as_deref(), Some(home.as_str()));
    assert!(successor.log_text().contains("proxy serving"));
    fleet.proxy = successor;
}

/// The counter with a 256 MiB device tensor, so an export or import takes
/// long enough to be interrupted.
fn big_counter() -> Vec<u8> {
    let wat = crate::harness::COUNTER.replace(
        r#"(data (i32.const 0) "\04\00\00\00")"#,
        r#"(data (i32.const 0) "\00\00\00\04")"#,
    );
    assert_ne!(wat, crate::harness::COUNTER);
    wat::parse_str(wat).unwrap()
}

/// Two executors: acme's big counter on cpu0, beta's counter on `beta_on`;
/// the fleet and both function ids.
fn big_acme_on_cpu0_and_beta_on(beta_on: &str) -> (TestFleet, String, String) {
    let fleet = TestFleet::start(2, ProxyOptions::default());
    let big = big_counter();
    let r = fleet.proxy.call(
        "tok-acme",
        "POST",
        "/functions?name=big",
        Some(("application/wasm", &big)),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let beta = fleet.deploy_counter("tok-beta");
    for (tenant, to) in [("acme", "cpu0"), ("beta", beta_on)] {
        let r = fleet.proxy.migrate(tenant, to);
        assert_eq!(r.status, 200, "{tenant} to {to}: {}", r.text());
    }
    (fleet, id, beta)
}

/// Starts a migration of acme to `to` on a thread, waits until `when`
/// (the executor `watch` logged it), then SIGKILLs `victim`; the move's
/// answer.
fn kill_mid_move(
    fleet: &mut TestFleet,
    to: &str,
    watch: &str,
    when: &str,
    victim: &str,
) -> crate::harness::Resp {
    let admin = fleet.proxy.admin.clone();
    let to = to.to_string();
    let mark = fleet.executor(watch).log_mark();
    let mover = std::thread::spawn(move || {
        let body = serde_json::json!({ "to": to }).to_string();
        admin.call(
            "POST",
            "/admin/tenants/acme/migrate",
            &[(
                "authorization",
                &format!("Bearer {}", crate::harness::ADMIN_TOKEN),
            )],
            Some(("application/json", body.as_bytes())),
        )
    });
    fleet.executor(watch).wait_log_after(mark, &[when, "acme"]);
    let victim = fleet.executor_mut(victim);
    victim.child.kill().unwrap();
    victim.child.wait().unwrap();
    mover.join().unwrap()
}

/// The tenants `ex` holds, by its own account.
fn held_by(fleet: &TestFleet, ex: &str) -> Vec<String> {
    let (status, body) =
        fleet
            .executor(ex)
            .request("GET", "/internal/info", None, "application/json", b"");
    assert_eq!(status, 200);
    serde_json::from_slice::<serde_json::Value>(&body).unwrap()["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_destination_killed_during_the_pull_leaves_the_tenant_on_its_source() {
    let (mut fleet, id, beta) = big_acme_on_cpu0_and_beta_on("cpu0");
    assert_eq!(parse_counter(&fleet.count("tok-acme", &id).body[..20]).0, 1);

    let r = kill_mid_move(
        &mut fleet,
        "cpu1",
        "cpu0",
        "outbound session started",
        "cpu1",
    );
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.code(), "import_failed");
    assert_eq!(fleet.proxy.placement("acme").as_deref(), Some("cpu0"));
    let r = fleet.count("tok-acme", &id);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        parse_counter(&r.body[..20]).0,
        2,
        "state intact on the source"
    );
    let r = fleet.count("tok-beta", &beta);
    assert_eq!(
        (r.status, parse_counter(&r.body).0),
        (200, 1),
        "bystander unaffected"
    );
    // Back, the destination holds nothing of it.
    fleet.executor_mut("cpu1").restart();
    assert!(!held_by(&fleet, "cpu1").contains(&"acme".to_string()));
}

#[test]
fn a_source_killed_during_the_pull_keeps_the_tenant_placed_there() {
    let (mut fleet, id, beta) = big_acme_on_cpu0_and_beta_on("cpu1");
    assert_eq!(parse_counter(&fleet.count("tok-acme", &id).body[..20]).0, 1);

    let r = kill_mid_move(
        &mut fleet,
        "cpu1",
        "cpu0",
        "outbound session started",
        "cpu0",
    );
    assert_ne!(r.status, 200, "{}", r.text());
    assert_eq!(fleet.proxy.placement("acme").as_deref(), Some("cpu0"));
    assert!(
        !held_by(&fleet, "cpu1").contains(&"acme".to_string()),
        "the destination kept nothing"
    );
    let r = fleet.count("tok-beta", &beta);
    assert_eq!((r.status, parse_counter(&r.body).0), (200, 1));
    // The source comes back with the tenant's functions (its warm state
    // went with the process, as in any crash).
    fleet.executor_mut("cpu0").restart();
    let start = Instant::now();
    let r = loop {
        let r = fleet.count("tok-acme", &id);
        if r.status == 200 || start.elapsed() > Duration::from_secs(30) {
            break r;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(parse_counter(&r.body[..20]).0, 1, "cold, not lost");
}

#[test]
fn a_source_killed_after_its_final_round_resumes_the_tenant_on_its_destination() {
    let (mut fleet, id, beta) = big_acme_on_cpu0_and_beta_on("cpu1");
    for n in 1..=2 {
        assert_eq!(parse_counter(&fleet.count("tok-acme", &id).body[..20]).0, n);
    }

    // Once the destination holds the whole final round (the source's own
    // "final round sent" can precede the last bytes on the wire).
    let r = kill_mid_move(&mut fleet, "cpu1", "cpu1", "final round received", "cpu0");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(fleet.proxy.placement("acme").as_deref(), Some("cpu1"));
    let r = fleet.count("tok-acme", &id);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        parse_counter(&r.body[..20]).0,
        3,
        "resumed from the final round, warm"
    );
    let r = fleet.count("tok-beta", &beta);
    assert_eq!(
        (r.status, parse_counter(&r.body).0),
        (200, 1),
        "bystander unaffected"
    );
    // The source comes back; its stale copy is dropped, not served.
    fleet.executor_mut("cpu0").restart();
    let start = Instant::now();
    while held_by(&fleet, "cpu0").contains(&"acme".to_string()) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the source still holds acme"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(parse_counter(&fleet.count("tok-acme", &id).body[..20]).0, 4);
}

#[test]
fn a_stop_and_copy_move_carries_a_snapshot_sealed_to_it() {
    let fleet = TestFleet::start_with(2, ProxyOptions::default(), |_| {
        vec!["--snapshot-key", "seal-key-seal-key-seal-key-seal-key"]
    });
    let id = fleet.deploy_counter("tok-acme");
    assert_eq!(parse_counter(&fleet.count("tok-acme", &id).body).0, 1);
    let from = fleet.proxy.placement("acme").unwrap();
    let to = if from == "cpu0" { "cpu1" } else { "cpu0" };
    let body = serde_json::json!({"to": to, "protocol": "stop-and-copy"}).to_string();
    let r = fleet.proxy.admin(
        "POST",
        "/admin/tenants/acme/migrate",
        Some(("application/json", body.as_bytes())),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["protocol"], "stop-and-copy", "{}", r.text());
    assert_eq!(fleet.proxy.placement("acme").unwrap(), to);
    assert_eq!(parse_counter(&fleet.count("tok-acme", &id).body).0, 2);
    // The stored bytes were sealed to the move, and imported as its.
    let log = fleet.proxy.log_text();
    assert!(
        log.contains("snapshot of the move stored, sealed to the move"),
        "{log}"
    );
}
