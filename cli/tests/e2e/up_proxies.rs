//! `tensor-wasm up --proxies N`: proxies sharing the public port and a
//! placement table in the etcd that `up` runs, upgraded with the whole
//! fleet under load; a one-proxy fleet that comes back with two keeps
//! every tenant where it was.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;

const TENANTS: usize = 6;

fn token_env() -> String {
    (0..TENANTS)
        .map(|i| format!("tok-t{i}:t{i}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn start(state: &Path, extra: &[&str]) -> UpProcess {
    let tokens = token_env();
    let mut args = vec!["--cpu-executors", "2"];
    args.extend_from_slice(extra);
    UpProcess::start_with_env(
        state,
        &args,
        &[
            ("TENSOR_WASM_API_TOKENS", tokens.as_str()),
            ("TENSOR_WASM_API_RATE_LIMIT_QPS", "1000"),
            ("TENSOR_WASM_API_RATE_LIMIT_BURST", "1000"),
        ],
    )
}

fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The supervised children as `ls` lists them: (id, admin or client
/// address, binary).
fn children(up: &UpProcess) -> Vec<(String, String, String)> {
    let ls = up.control(serde_json::json!({"op": "ls"}));
    assert_eq!(ls["ok"], true, "{ls}");
    ls["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
            (s("id"), s("addr"), s("binary"))
        })
        .collect()
}

/// Invocations a proxy answered, from its `/metrics` on `admin`.
fn invocations(admin: &str) -> f64 {
    let r = Api::new(&format!("http://{admin}")).call("GET", "/metrics", &[], None);
    assert_eq!(r.status, 200);
    r.text()
        .lines()
        .filter(|l| l.starts_with("tensor_wasm_http_requests_total{") && l.contains("invoke"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One counter call on a fresh connection to the shared port, so that the
/// kernel picks the proxy: its count, or why it failed. A connection
/// closed before any answer (a proxy handing its sockets over) carried a
/// request that was never read, and is sent again.
fn count_once(addr: &str, token: &str, id: &str) -> Result<u32, String> {
    let auth = format!("Bearer {token}");
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "text/plain"),
    ];
    let path = format!("/functions/{id}/invoke");
    for _ in 0..10 {
        match raw_request(addr, "POST", &path, &headers, b"", Duration::from_secs(30)) {
            Ok((200, body)) => return Ok(parse_counter(&body).0),
            Ok((status, body)) => {
                return Err(format!("{status} {}", String::from_utf8_lossy(&body)));
            }
            Err(RawError::Unanswered(_)) => continue,
            Err(e) => return Err(format!("{e:?}")),
        }
    }
    Err("closed unanswered ten times".into())
}

fn deploy(up: &UpProcess) -> Vec<(String, String)> {
    (0..TENANTS)
        .map(|i| {
            let token = format!("tok-t{i}");
            let id = up.deploy_counter(&token);
            (token, id)
        })
        .collect()
}

/// Stops `up` as Ctrl-C would: every tenant's state is saved.
fn stop(mut up: UpProcess) {
    let pid = up.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let start = Instant::now();
    while up.child.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < Duration::from_secs(90), "up did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn two_proxies_share_one_port_and_the_whole_fleet_upgrades_under_load_without_a_failed_request() {
    let _heavy = heavy();
    let dir = tempfile::tempdir().unwrap();
    let up = start(&dir.path().join("state"), &["--proxies", "2"]);
    let ids: Vec<String> = children(&up).into_iter().map(|c| c.0).collect();
    assert_eq!(ids, ["cpu0", "cpu1", "proxy", "proxy-1", "etcd"]);
    assert!(up.stdout.contains("2 proxies on"), "{}", up.stdout);
    let admins = |up: &UpProcess| -> Vec<String> {
        children(up)
            .into_iter()
            .filter(|c| c.0.starts_with("proxy"))
            .map(|c| c.1)
            .collect()
    };
    let tenants = deploy(&up);
    let addr = up.api.base.trim_start_matches("http://").to_string();

    // Each call on a new connection to the shared port.
    let load = CounterLoad::start(&tenants, 0, |token, id| {
        let (addr, token, id) = (addr.clone(), token.to_string(), id.to_string());
        move || count_once(&addr, &token, &id)
    });
    // Both proxies serve the one port.
    wait_until(
        "both proxies answer clients",
        Duration::from_secs(20),
        || admins(&up).iter().all(|a| invocations(a) > 0.0),
    );

    // Every executor and both proxies onto a new binary, under the load.
    let binary = dir.path().join("tensor-wasm-next");
    std::fs::copy(env!("CARGO_BIN_EXE_tensor-wasm"), &binary).unwrap();
    let backup = dir.path().join("backup");
    let (ok, stdout, stderr) = crate::upgrade::run_upgrade(
        &up,
        &[
            "--no-progress".as_ref(),
            "--canary-window".as_ref(),
            "2s".as_ref(),
            "--backup".as_ref(),
            backup.as_os_str(),
            "--executor-binary".as_ref(),
            binary.as_os_str(),
            "--proxy-binary".as_ref(),
            binary.as_os_str(),
        ],
    );
    eprintln!("{stdout}");
    assert!(ok, "upgrade failed: {stdout}{stderr}");
    assert!(stdout.contains("proxies: now pids"), "{stdout}");
    // The backup holds every tenant and both proxies' audit logs.
    let folder = std::fs::read_dir(&backup)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(folder.join("backup.json")).unwrap()).unwrap();
    assert_eq!(manifest["tenants"].as_array().unwrap().len(), TENANTS);
    assert_eq!(manifest["audit"]["file"], "audit.log", "{manifest}");
    assert_eq!(
        manifest["other_audits"][0]["file"], "audit-1.log",
        "{manifest}"
    );
    for log in ["audit.log", "audit-1.log"] {
        assert!(folder.join(log).metadata().unwrap().len() > 0, "{log}");
    }
    // The canary counted the requests of both proxies, and the
    // verification read both.
    for line in [
        "canary: passed on",
        "verified: proxy's build_info",
        "verified: proxy-1's build_info",
        "verified: the audit logs of the 2 proxies hold a record for every request id",
        "verified: 6 of 6 moved tenants answered after their move",
    ] {
        assert!(stdout.contains(line), "{line}: {stdout}");
    }
    // The new proxies serve the clients, both of them.
    wait_until(
        "both new proxies answer clients",
        Duration::from_secs(20),
        || admins(&up).iter().all(|a| invocations(a) > 0.0),
    );
    let (counts, failures) = load.finish();
    assert_eq!(failures, 0, "no request failed");
    assert!(
        counts.iter().all(|&n| n > 20),
        "served all along: {counts:?}"
    );

    let now = children(&up);
    let ids: Vec<&str> = now.iter().map(|c| c.0.as_str()).collect();
    assert_eq!(ids, ["cpu0.1", "cpu1.1", "proxy", "proxy-1", "etcd"]);
    for (id, _, bin) in now.iter().filter(|c| c.0 != "etcd") {
        assert_eq!(bin, &binary.to_string_lossy(), "{id} runs the new binary");
    }
    let placed = up.placements();
    for (t, at) in placed.as_object().unwrap() {
        assert!(
            at == "cpu0.1" || at == "cpu1.1",
            "{t} is on a new executor: {at}"
        );
    }

    // The front door is not one process: with one proxy killed, every new
    // connection reaches the other, and the supervisor brings it back.
    let pids = up.children();
    let (_, killed) = pids.iter().find(|(id, _)| id == "proxy-1").unwrap();
    assert!(
        Command::new("kill")
            .args(["-KILL", &killed.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let (token, id) = &tenants[0];
    let mut n = counts[0];
    for _ in 0..40 {
        n += 1;
        assert_eq!(
            count_once(&addr, token, id),
            Ok(n),
            "served by the other proxy"
        );
    }
    wait_until("proxy-1 restarted", Duration::from_secs(30), || {
        up.children()
            .iter()
            .any(|(id, pid)| id == "proxy-1" && pid != killed)
    });
}

#[test]
fn a_fleet_of_one_proxy_started_again_with_two_keeps_every_tenant_where_it_was() {
    let _heavy = heavy();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let up = start(&state, &[]);
    let tenants = deploy(&up);
    let addr = |up: &UpProcess| up.api.base.trim_start_matches("http://").to_string();
    for (token, id) in &tenants {
        for n in 1..=3 {
            assert_eq!(count_once(&addr(&up), token, id), Ok(n));
        }
    }
    let placed = up.placements();
    assert!(
        !children(&up).iter().any(|c| c.0 == "etcd"),
        "one proxy: the file"
    );
    stop(up);

    // Two proxies: `up` starts etcd, and the first proxy brings the file's
    // table into it.
    let up = start(&state, &["--proxies", "2"]);
    assert_eq!(up.placements(), placed, "every tenant where it was");
    for (token, id) in &tenants {
        assert_eq!(count_once(&addr(&up), token, id), Ok(4), "{token}");
    }
    assert!(state.join("proxy/placements.json.imported").exists());
    assert!(!state.join("proxy/placements.json").exists());
    stop(up);

    // Once in etcd, the table stays there: the file is refused, and one
    // proxy goes on with the etcd.
    let out = Command::new(env!("CARGO_BIN_EXE_tensor-wasm"))
        .args([
            "up",
            "--device",
            "cpu",
            "--placement",
            "file",
            "--state-dir",
        ])
        .arg(&state)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("leave --placement out"), "{stderr}");
    let up = start(&state, &[]);
    let ids: Vec<String> = children(&up).into_iter().map(|c| c.0).collect();
    assert_eq!(ids, ["cpu0", "cpu1", "proxy", "etcd"]);
    assert_eq!(up.placements(), placed);
    for (token, id) in &tenants {
        assert_eq!(count_once(&addr(&up), token, id), Ok(5), "{token}");
    }
}
