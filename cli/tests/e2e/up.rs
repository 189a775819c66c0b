//! `tensor-wasm up`: a supervised local fleet.

use std::time::{Duration, Instant};

use crate::harness::{COUNTER, UpProcess, alive, multipart, parse_counter};

#[test]
fn up_brings_a_fleet_up_restarts_crashes_and_stops_everything() {
    let dir = tempfile::tempdir().unwrap();
    let up = UpProcess::start(&dir.path().join("state"), &[]);
    assert!(up.stdout.contains("dev token"), "{}", up.stdout);
    let token = up.secret("dev-token");
    assert!(up.stdout.contains(&token), "printed once at creation");
    {
        use std::os::unix::fs::PermissionsExt;
        for f in [
            "dev-token",
            "admin-token",
            "internal-token",
            "snapshot-key",
            "tokens",
        ] {
            let mode = std::fs::metadata(up.state.join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
    }
    // Its warm state in memory only (durability "none"), so that the crash
    // below loses it whatever the timing; `durable.rs` tests the others.
    let wasm = wat::parse_str(COUNTER).unwrap();
    let (ct, body) = multipart(&[
        ("module", "application/wasm", &wasm),
        ("config", "application/json", br#"{"durability": "none"}"#),
    ]);
    let r = up.api.call(
        "POST",
        "/functions?name=counter",
        &[("authorization", &format!("Bearer {token}"))],
        Some((&ct, &body)),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let invoke = || up.count(&token, &id);
    assert_eq!(parse_counter(&invoke().body).0, 1);

    // Its snapshots are signed under the key `up` made, of 32 bytes or
    // more, which its executors demand of what they import.
    let key = up.secret("snapshot-key");
    assert!(key.len() >= 32, "{key}");
    let auth = format!("Bearer {}", up.secret("admin-token"));
    let r = up.admin.call(
        "POST",
        "/admin/tenants/dev/snapshot",
        &[("authorization", &auth)],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let header = tensor_wasm_shared::snapshot::verify(&r.body, Some(key.as_bytes()), u64::MAX)
        .expect("signed under the fleet's key");
    assert!(header.keyed);
    assert!(tensor_wasm_shared::snapshot::verify(&r.body, Some(b"another key"), u64::MAX).is_err());

    let children = up.children();
    assert_eq!(children.len(), 3, "{children:?}");
    let home = up.placements()["dev"].as_str().unwrap().to_string();
    let (_, pid) = children.iter().find(|(i, _)| *i == home).unwrap().clone();

    // SIGKILL the tenant's executor: the supervisor restarts it, and the
    // tenant's registration is back (its warm state, in memory only, was
    // lost with it).
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    let start = Instant::now();
    loop {
        let now = up.children();
        let new_pid = now.iter().find(|(i, _)| *i == home).map(|(_, p)| *p);
        if new_pid.is_some_and(|p| p != pid) {
            let r = invoke();
            if r.status == 200 {
                assert_eq!(parse_counter(&r.body).0, 1);
                break;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no restart");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Other commands start and stop executors through the control socket.
    let started = up.control(serde_json::json!({"op": "start", "id": "cpu9"}));
    assert_eq!(started["ok"], true, "{started}");
    assert!(
        started["result"]["addr"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    let again = up.control(serde_json::json!({"op": "start", "id": "cpu9"}));
    assert_eq!(again["ok"], false);
    assert_eq!(up.children().len(), 4);
    let stopped = up.control(serde_json::json!({"op": "stop", "id": "cpu9"}));
    assert_eq!(stopped["ok"], true, "{stopped}");
    let bad = up.control(serde_json::json!({"op": "nonsense"}));
    assert_eq!(bad["ok"], false);

    // `executors add` without an address starts one under the supervisor
    // and registers it; `executors rm` forgets and stops it.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tensor-wasm"))
            .args(args)
            .arg("--state-dir")
            .arg(&up.state)
            .arg("--admin-url")
            .arg(&up.admin.base)
            .arg("--url")
            .arg(&up.api.base)
            .env_remove("TENSOR_WASM_ADMIN_TOKEN")
            .env_remove("TENSOR_WASM_TOKEN")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    cli(&["executors", "add", "--id", "cpu7"]);
    assert!(up.children().iter().any(|(i, _)| i == "cpu7"));
    let listed: serde_json::Value =
        serde_json::from_str(&cli(&["executors", "ls", "--json"])).unwrap();
    let cpu7 = listed["executors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == "cpu7")
        .cloned()
        .expect("registered");
    assert_eq!(cpu7["healthy"], true);
    cli(&["executors", "rm", "cpu7"]);
    assert!(!up.children().iter().any(|(i, _)| i == "cpu7"));

    // SIGTERM stops every child.
    let pids: Vec<u32> = up.children().iter().map(|(_, p)| *p).collect();
    std::process::Command::new("kill")
        .args(["-TERM", &up.child.id().to_string()])
        .status()
        .unwrap();
    let mut up = up;
    let start = Instant::now();
    while up.child.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < Duration::from_secs(60), "up did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    for pid in pids {
        assert!(!alive(pid), "child {pid} left behind");
    }
}

#[test]
fn a_killed_supervisor_leaves_no_orphans() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = UpProcess::start(&dir.path().join("state"), &["--cpu-executors", "1"]);
    let pids: Vec<u32> = up.children().iter().map(|(_, p)| *p).collect();
    assert_eq!(pids.len(), 2);
    up.child.kill().unwrap();
    up.child.wait().unwrap();
    let start = Instant::now();
    while pids.iter().any(|&p| alive(p)) {
        assert!(start.elapsed() < Duration::from_secs(60), "orphans left");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An executor killed outright is restarted by `up`; the proxy holds its
/// tenants' requests while it comes back instead of failing them (within
/// the hold deadline, raised here so that a slow restart on a busy machine
/// cannot fail the test).
#[test]
fn requests_wait_for_a_killed_executor_to_restart() {
    let dir = tempfile::tempdir().unwrap();
    let up = UpProcess::start_with_env(
        &dir.path().join("state"),
        &["--cpu-executors", "1"],
        &[("TENSOR_WASM_MIGRATION_QUEUE_DEADLINE_MS", "30000")],
    );
    let token = up.secret("dev-token");
    let id = up.deploy_counter(&token);
    assert_eq!(up.count(&token, &id).status, 200);
    let (_, pid) = up
        .children()
        .into_iter()
        .find(|(i, _)| i == "cpu0")
        .unwrap();
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    // Once the process is gone (a request it had read would have died
    // with it), every call until the executor is back and beyond is
    // answered 200: the first ones waited for the restart.
    let start = Instant::now();
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "not reaped");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut calls = 0;
    let mut restarted = false;
    while !restarted || calls < 5 {
        let r = up.count(&token, &id);
        assert_eq!(r.status, 200, "call {calls}: {}", r.text());
        calls += 1;
        restarted = up.children().iter().any(|(i, p)| i == "cpu0" && *p != pid);
        assert!(start.elapsed() < Duration::from_secs(60), "no restart");
    }
}
