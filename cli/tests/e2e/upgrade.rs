//! Upgrading a whole fleet under load (`tensor-wasm upgrade`): every
//! executor, then the proxy, while an open-loop client calls 20 small
//! stateful tenants at a constant rate and two tenants the size of a real
//! model (1 GiB of assets, 256 MiB of memory that every call changes) are
//! called at 50 calls/s each. No request may fail and no tenant may lose a
//! sample or a call.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::assets::{big_checksum, deploy_big_tenant, write_gigabyte_weights};
use crate::harness::{RawError, UpProcess, heavy, multipart, percentile, raw_post};

/// Small tenants (running-mean).
const TENANTS: usize = 20;
/// Requests per second to the small tenants, open loop.
const RATE: f64 = 200.0;
/// Tenants of 1.25 GiB each ([`crate::assets::BIG_TENANT`]).
const BIG: usize = 2;
/// Calls per second to each big tenant, each writing 1 MiB of its memory.
const BIG_RATE: f64 = 50.0;

/// Where the load was, in order: before the upgrade, while the executors
/// upgrade, while the proxy hands its sockets over (`upgrade
/// --proxy-binary`), after.
const BEFORE: u8 = 0;
const EXECUTORS: u8 = 1;
const HANDING_OFF: u8 = 2;
const AFTER: u8 = 3;

/// Connections closed unanswered that one request may meet before it
/// counts as failed (a bound, so that a proxy closing every connection
/// fails the test instead of hanging it).
const MAX_RESENDS: usize = 10;

#[derive(Debug)]
struct Outcome {
    tenant: usize,
    value: f32,
    /// The phase when the request was queued.
    phase: u8,
    latency_ms: f64,
    result: Result<(u16, Vec<u8>), String>,
    /// For each time the request's connection closed before any byte of an
    /// answer, after which it was sent again: the phases when that attempt
    /// began and when it ended.
    resent_in: Vec<(u8, u8)>,
}

fn running_mean() -> Option<Vec<u8>> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/examples-wasm/running-mean.wasm");
    match std::fs::read(&path) {
        Ok(b) => Some(b),
        Err(_) if std::env::var_os("TENSOR_WASM_REQUIRE_EXAMPLES").is_none() => {
            eprintln!(
                "skipped: {} not built (scripts/build-examples)",
                path.display()
            );
            None
        }
        Err(e) => panic!("{}: {e}", path.display()),
    }
}

/// A copy of this build's binary at another path: "the new version".
fn new_binary(dir: &Path) -> PathBuf {
    let to = dir.join("tensor-wasm-next");
    std::fs::copy(env!("CARGO_BIN_EXE_tensor-wasm"), &to).unwrap();
    to
}

/// Runs `tensor-wasm upgrade --no-progress FLAG BINARY`, which must succeed; its stdout.
fn upgrade(up: &UpProcess, flag: &str, binary: &Path) -> String {
    let (ok, stdout, stderr) = run_upgrade(
        up,
        &["--no-progress".as_ref(), flag.as_ref(), binary.as_os_str()],
    );
    eprintln!("{stdout}");
    assert!(ok, "upgrade {flag} failed: {stdout}{stderr}");
    assert!(
        stdout.contains("verified: 2 executors answer"),
        "the upgrade verified the fleet: {stdout}"
    );
    stdout
}

/// Runs `tensor-wasm upgrade ARGS` against `up`'s fleet: whether it
/// succeeded, its stdout and its stderr.
pub(crate) fn run_upgrade(up: &UpProcess, args: &[&std::ffi::OsStr]) -> (bool, String, String) {
    // Without a canary unless the test asks for one: its default window
    // is a minute each way.
    let canary: &[&str] = if args.iter().any(|a| *a == "--canary-window") {
        &[]
    } else {
        &["--canary-window", "0s"]
    };
    let out = Command::new(env!("CARGO_BIN_EXE_tensor-wasm"))
        .arg("upgrade")
        .args(args)
        .args(canary)
        .arg("--state-dir")
        .arg(&up.state)
        .arg("--admin-url")
        .arg(&up.admin.base)
        .env_remove("TENSOR_WASM_ADMIN_TOKEN")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Per-tenant pauses (ms) from `upgrade --no-progress` lines
/// `t3: cpu0 → cpu0.1 in 4.2 ms (…)`.
fn pauses(stdout: &str) -> Vec<f64> {
    let mut v: Vec<f64> = stdout
        .lines()
        .filter_map(|l| l.split(" in ").nth(1)?.split(" ms").next()?.parse().ok())
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

#[test]
fn the_whole_fleet_upgrades_under_load_without_a_failed_request() {
    let Some(wasm) = running_mean() else {
        return;
    };
    let _heavy = heavy();
    let dir = tempfile::tempdir().unwrap();
    let tokens: Vec<String> = (0..TENANTS).map(|i| format!("tok-{i}")).collect();
    let mut list: Vec<String> = (0..TENANTS).map(|i| format!("tok-{i}:t{i}")).collect();
    list.extend((0..BIG).map(|i| format!("tok-big{i}:big{i}")));
    let up = UpProcess::start_with_env(
        &dir.path().join("state"),
        &["--cpu-executors", "2"],
        &[
            ("TENSOR_WASM_API_TOKENS", list.join(",").as_str()),
            ("TENSOR_WASM_API_RATE_LIMIT_QPS", "1000"),
            ("TENSOR_WASM_API_RATE_LIMIT_BURST", "1000"),
            // The backup pauses each tenant for its own export
            // (`docs/UPGRADE.md`, "Backup"): a 1.25 GiB tenant's took
            // 10 s on a loaded 2-core machine, past the 5 s default.
            ("TENSOR_WASM_MIGRATION_QUEUE_DEADLINE_MS", "30000"),
        ],
    );
    let config = br#"{"max_instances": 1}"#;
    let mut fns = Vec::new();
    for token in &tokens {
        let (ct, body) = multipart(&[
            ("module", "application/wasm", &wasm),
            ("config", "application/json", config),
        ]);
        let r = up.api.call(
            "POST",
            "/functions?name=mean",
            &[("authorization", &format!("Bearer {token}"))],
            Some((&ct, &body)),
        );
        assert_eq!(r.status, 201, "{}", r.text());
        fns.push(r.json()["id"].as_str().unwrap().to_string());
    }
    let addr = up.api.base.trim_start_matches("http://").to_string();
    let weights = dir.path().join("weights.safetensors");
    write_gigabyte_weights(&weights);
    let big_fns: Vec<String> = (0..BIG)
        .map(|i| deploy_big_tenant(&up.api.base, &format!("tok-big{i}"), &weights, dir.path()))
        .collect();
    std::fs::remove_file(&weights).unwrap();

    // The open-loop client: request k starts at k / RATE seconds, for
    // tenant k mod TENANTS, sending the sample value k.
    let stop = Arc::new(AtomicBool::new(false));
    let phase = Arc::new(AtomicU8::new(BEFORE));
    let outcomes = Arc::new(Mutex::new(Vec::<Outcome>::new()));
    let (tx, rx) = std::sync::mpsc::channel::<(usize, f32, u8)>();
    let rx = Arc::new(Mutex::new(rx));
    let workers: Vec<_> = (0..24)
        .map(|_| {
            let (rx, outcomes, now) = (rx.clone(), outcomes.clone(), phase.clone());
            let (addr, tokens, fns) = (addr.clone(), tokens.clone(), fns.clone());
            std::thread::spawn(move || {
                loop {
                    let job = rx.lock().unwrap().recv();
                    let Ok((tenant, value, phase)) = job else {
                        return;
                    };
                    let body = format!(
                        r#"{{"inputs": {{"x": {{"dtype": "f32", "shape": [1], "data": [{value}]}}}}}}"#
                    );
                    let path = format!("/functions/{}/invoke", fns[tenant]);
                    let started = Instant::now();
                    let mut resent_in = Vec::new();
                    let result = loop {
                        let began = now.load(Ordering::SeqCst);
                        match raw_post(&addr, &path, &tokens[tenant], body.as_bytes(), Duration::from_secs(30)) {
                            // The listening sockets never close
                            // (docs/UPGRADE.md): a refused connection is a
                            // failed request.
                            Err(RawError::Connect(e)) => break Err(format!("connect: {e}")),
                            // Closed before any byte of an answer: the
                            // request was never read (docs/UPGRADE.md), so
                            // it is sent again; the tenants' counts below
                            // show that none ran twice.
                            Err(RawError::Unanswered(e)) if resent_in.len() < MAX_RESENDS => {
                                resent_in.push((began, now.load(Ordering::SeqCst)));
                                eprintln!("t{tenant}: closed unanswered ({e}), sending again");
                            }
                            Err(RawError::Unanswered(e)) => break Err(format!("unanswered: {e}")),
                            Err(RawError::After(e)) => break Err(e),
                            Ok(r) => break Ok(r),
                        }
                    };
                    outcomes.lock().unwrap().push(Outcome {
                        tenant,
                        value,
                        phase,
                        latency_ms: started.elapsed().as_secs_f64() * 1e3,
                        result,
                        resent_in,
                    });
                }
            })
        })
        .collect();
    let pacer = {
        let (stop, phase) = (stop.clone(), phase.clone());
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut k = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let due = start + Duration::from_secs_f64(k as f64 / RATE);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let _ = tx.send((k % TENANTS, k as f32, phase.load(Ordering::Relaxed)));
                k += 1;
            }
            k
        })
    };

    // Each big client's last answered call, as it goes.
    let big_done: Vec<Arc<AtomicU32>> = (0..BIG).map(|_| Arc::default()).collect();
    let big_clients: Vec<_> = big_fns
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let (addr, stop, done) = (addr.clone(), stop.clone(), big_done[i].clone());
            let (token, path) = (format!("tok-big{i}"), format!("/functions/{id}/invoke"));
            std::thread::spawn(move || big_client(&addr, &path, &token, &stop, &done))
        })
        .collect();

    std::thread::sleep(Duration::from_secs(2));
    let binary = new_binary(dir.path());
    phase.store(EXECUTORS, Ordering::SeqCst);
    let upgrade_started = Instant::now();
    // With everything an operator would ask for: a backup first, a
    // canary, and the report of the verification.
    let (backup_dir, report_path) = (dir.path().join("backup"), dir.path().join("report.json"));
    let (ok, stdout, stderr) = run_upgrade(
        &up,
        &[
            "--no-progress".as_ref(),
            "--backup".as_ref(),
            backup_dir.as_os_str(),
            "--canary-window".as_ref(),
            "2s".as_ref(),
            "--report".as_ref(),
            report_path.as_os_str(),
            "--executor-binary".as_ref(),
            binary.as_os_str(),
        ],
    );
    eprintln!("{stdout}");
    assert!(ok, "upgrade failed: {stdout}{stderr}");
    let executors_took = upgrade_started.elapsed();
    let big_before_proxy: Vec<u32> = big_done.iter().map(|d| d.load(Ordering::SeqCst)).collect();
    let pauses = pauses(&stdout);
    assert_eq!(pauses.len(), TENANTS + BIG, "every tenant moved once");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    // The small tenants, called ten times a second each, must all have
    // answered after their moves within the report's wait; a big tenant's
    // first call after its move may come later on a loaded machine, and
    // its own client shows below that it was served on the new executor.
    check_report(&report, TENANTS + BIG, TENANTS);
    let backups: Vec<_> = std::fs::read_dir(&backup_dir).unwrap().collect();
    assert_eq!(backups.len(), 1, "one backup folder");
    let folder = backups[0].as_ref().unwrap().path();
    let snapshots = std::fs::read_dir(&folder)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "twsnap")
        })
        .count();
    assert_eq!(snapshots, TENANTS + BIG, "a snapshot of every tenant");
    // Gigabytes the test no longer needs.
    std::fs::remove_dir_all(&backup_dir).unwrap();
    phase.store(HANDING_OFF, Ordering::SeqCst);
    upgrade(&up, "--proxy-binary", &binary);
    phase.store(AFTER, Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let sent = pacer.join().unwrap();
    for w in workers {
        w.join().unwrap();
    }
    let big_calls: Vec<u32> = big_clients
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            c.join()
                .unwrap()
                .unwrap_or_else(|e| panic!("tenant big{i}: {e}"))
        })
        .collect();

    // The big tenants were served after their moves, on the new
    // executors: their clients' calls went on past the executors' upgrade.
    for (i, (&before, &calls)) in big_before_proxy.iter().zip(&big_calls).enumerate() {
        assert!(
            calls > before,
            "tenant big{i}: no call answered after the executors' upgrade ({calls} calls)"
        );
    }

    // Every request answered 200.
    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());
    assert_eq!(outcomes.len(), sent, "every request answered");
    let failed: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| !matches!(o.result, Ok((200, _))))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {sent} requests failed, e.g. {:?}",
        failed.len(),
        failed
            .iter()
            .take(3)
            .map(|o| (&o.result, o.tenant))
            .collect::<Vec<_>>()
    );

    // Only the proxy's hand-off may close a connection unanswered, never a
    // steady fleet or an executor's upgrade: every such attempt began
    // before the hand-off was over and ended after it had begun.
    let resent: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| !o.resent_in.is_empty())
        .collect();
    assert!(
        resent.iter().all(|o| o
            .resent_in
            .iter()
            .all(|&(began, ended)| began <= HANDING_OFF && ended >= HANDING_OFF)),
        "connections closed unanswered outside the proxy's hand-off \
         ((tenant, sample, [(phase began, phase ended)]), phases {BEFORE} before, \
         {EXECUTORS} executors, {HANDING_OFF} proxy, {AFTER} after): {:?}",
        resent
            .iter()
            .map(|o| (o.tenant, o.value, &o.resent_in))
            .collect::<Vec<_>>()
    );

    // Each tenant's state is continuous: its mean and count cover every
    // sample it was sent, across both moves, each exactly once — resent
    // requests included: one that ran twice would count twice.
    let mut per_tenant: BTreeMap<usize, Vec<f32>> = BTreeMap::new();
    for o in &outcomes {
        per_tenant.entry(o.tenant).or_default().push(o.value);
    }
    for (tenant, values) in &per_tenant {
        let body = br#"{"inputs": {"x": {"dtype": "f32", "shape": [1], "data": [0]}}}"#;
        let (status, resp) = raw_post(
            &addr,
            &format!("/functions/{}/invoke", fns[*tenant]),
            &tokens[*tenant],
            body,
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_slice(&resp).unwrap();
        let count = v["outputs"]["count"]["data"][0].as_f64().unwrap() as usize;
        let mean = v["outputs"]["mean"]["data"][0].as_f64().unwrap();
        assert_eq!(count, values.len() + 1, "tenant t{tenant} lost samples");
        let expected = values.iter().map(|&x| f64::from(x)).sum::<f64>() / count as f64;
        assert!(
            (mean - expected).abs() <= 1e-3 * expected.abs().max(1.0),
            "tenant t{tenant}: mean {mean}, expected {expected}"
        );
    }

    // The fleet now runs the new binary everywhere.
    let ls = up.control(serde_json::json!({"op": "ls"}));
    for child in ls["result"].as_array().unwrap() {
        assert_eq!(
            child["binary"],
            binary.to_string_lossy().as_ref(),
            "{child}"
        );
    }
    assert_eq!(up.child_ids(), ["cpu0.1", "cpu1.1", "proxy"]);

    // The report (bench/upgrade-under-load prints it).
    let lat = |phase: u8| {
        let mut v: Vec<f64> = outcomes
            .iter()
            .filter(|o| o.phase == phase)
            .map(|o| o.latency_ms)
            .collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let (mut steady, mut during) = (lat(BEFORE), lat(EXECUTORS));
    steady.extend(lat(AFTER));
    steady.sort_by(f64::total_cmp);
    during.extend(lat(HANDING_OFF));
    during.sort_by(f64::total_cmp);
    eprintln!(
        "UPGRADE REPORT tenants={TENANTS} rate={RATE}/s sent={sent} failed=0 resent_unanswered={}\n\
         steady: n={} p50={:.2} ms p99={:.2} ms | during upgrade: n={} p50={:.2} ms p99={:.2} ms\n\
         big tenants ({BIG} of 1.25 GiB): {big_calls:?} calls, none failed\n\
         executors upgraded in {:.2} s ({} tenants moved); per-tenant pause p50={:.2} ms p99={:.2} ms max={:.2} ms",
        resent.len(),
        steady.len(),
        percentile(&steady, 50.0),
        percentile(&steady, 99.0),
        during.len(),
        percentile(&during, 50.0),
        percentile(&during, 99.0),
        executors_took.as_secs_f64(),
        TENANTS + BIG,
        percentile(&pauses, 50.0),
        percentile(&pauses, 99.0),
        pauses.last().copied().unwrap_or(0.0),
    );
}

/// The report of an upgrade under load checks out: the canary was judged
/// and passed, every tenant moved once and answered after its move, no
/// request id is missing from the audit log, the counters advance, the
/// proxy's build is named, and nothing is a problem.
fn check_report(report: &serde_json::Value, tenants: usize, answering: usize) {
    let canary = &report["canary"];
    assert_eq!(canary["result"], "passed", "{canary}");
    assert_eq!(canary["baseline"]["errors"], 0, "{canary}");
    assert_eq!(canary["canary"]["errors"], 0, "{canary}");
    assert!(
        canary["canary"]["requests"].as_u64().unwrap() >= 20,
        "{canary}"
    );
    let moves = report["moves"].as_array().unwrap();
    assert_eq!(moves.len(), tenants, "{report}");
    let bytes: u64 = moves.iter().map(|m| m["bytes"].as_u64().unwrap()).sum();
    assert_eq!(report["bytes_moved"], bytes);
    assert_eq!(report["problems"], serde_json::json!([]), "{report}");
    let verified: Vec<&str> = report["verified"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let has = |what: &str| {
        assert!(
            verified.iter().any(|v| v.contains(what)),
            "{what:?} not in {verified:#?}"
        )
    };
    has("2 executors answer");
    has(&format!("{tenants} tenants placed"));
    has("the proxy's build_info names");
    let answered = verified
        .iter()
        .find_map(|v| {
            v.strip_suffix(&format!(
                " of {tenants} moved tenants answered after their move"
            ))?
            .parse::<usize>()
            .ok()
        })
        .unwrap_or_else(|| panic!("no count of moved tenants answered in {verified:#?}"));
    assert!(answered >= answering, "{verified:#?}");
    has("a record for every request id the proxy answered");
    assert_eq!(
        verified
            .iter()
            .filter(|v| v.starts_with("counters advance on"))
            .count(),
        2,
        "{verified:#?}"
    );
}

/// Calls a [`crate::assets::BIG_TENANT`] function at [`BIG_RATE`] until
/// `stop`, one call at a time, checking that every call counts once and in
/// order and that its memory carries on; the calls made, or what went
/// wrong.
fn big_client(
    addr: &str,
    path: &str,
    token: &str,
    stop: &AtomicBool,
    done: &AtomicU32,
) -> Result<u32, String> {
    let mut last = 0u32;
    let start = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let due = start + Duration::from_secs_f64(f64::from(last) / BIG_RATE);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let mut resends = 0;
        let (status, body) = loop {
            match raw_post(addr, path, token, b"{}", Duration::from_secs(60)) {
                Ok(r) => break r,
                // Only the proxy's hand-off closes a connection unanswered
                // (the small tenants' load checks when): sent again.
                Err(RawError::Unanswered(_)) if resends < MAX_RESENDS => resends += 1,
                Err(e) => return Err(format!("call {}: {e:?}", last + 1)),
            }
        };
        if status != 200 || body.len() != 8 {
            return Err(format!(
                "call {}: {status} {}",
                last + 1,
                String::from_utf8_lossy(&body)
            ));
        }
        let n = u32::from_le_bytes(body[..4].try_into().unwrap());
        let sum = u32::from_le_bytes(body[4..].try_into().unwrap());
        if n != last + 1 {
            return Err(format!("call {} counted as {n}", last + 1));
        }
        if sum != big_checksum(n) {
            return Err(format!("call {n}: the memory did not carry on"));
        }
        last = n;
        done.store(n, Ordering::SeqCst);
    }
    Ok(last)
}

/// Runs `upgrade --executor-binary` and SIGKILLs it once `after` tenants
/// have moved.
fn interrupted_upgrade(up: &UpProcess, binary: &Path, after: usize) {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_tensor-wasm"))
        .args([
            "upgrade",
            "--no-progress",
            "--canary-window",
            "0s",
            "--executor-binary",
        ])
        .arg(binary)
        .arg("--state-dir")
        .arg(&up.state)
        .arg("--admin-url")
        .arg(&up.admin.base)
        .env_remove("TENSOR_WASM_ADMIN_TOKEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut moved = 0;
    for line in std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
    {
        if line.contains(" ms (") {
            moved += 1;
            if moved == after {
                break;
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs `tensor-wasm upgrade --abort` against `up`'s fleet, which must
/// succeed.
fn abort_upgrade(up: &UpProcess) {
    let (ok, stdout, stderr) = run_upgrade(up, &["--abort".as_ref()]);
    assert!(ok, "upgrade --abort failed: {stdout}{stderr}");
}

/// `tensor-wasm up` with two CPU executors and `n` counter tenants
/// (`tok-i` for tenant `ti`); the fleet and the tenants' function ids.
fn counter_fleet(dir: &Path, n: usize) -> (UpProcess, Vec<String>) {
    let list: Vec<String> = (0..n).map(|i| format!("tok-{i}:t{i}")).collect();
    let up = UpProcess::start_with_env(
        &dir.join("state"),
        &["--cpu-executors", "2"],
        &[("TENSOR_WASM_API_TOKENS", list.join(",").as_str())],
    );
    let fns = (0..n)
        .map(|i| up.deploy_counter(&format!("tok-{i}")))
        .collect();
    (up, fns)
}

/// One call of every counter tenant of [`counter_fleet`]: each answers
/// 200 with its `expect`-th call.
fn count_all(up: &UpProcess, fns: &[String], expect: u32) {
    for (i, id) in fns.iter().enumerate() {
        let r = up.count(&format!("tok-{i}"), id);
        assert_eq!(r.status, 200, "t{i}: {}", r.text());
        assert_eq!(crate::harness::parse_counter(&r.body).0, expect, "t{i}");
    }
}

/// `tensor-wasm upgrade --rollback`, which must succeed.
fn rollback(up: &UpProcess) {
    let (ok, stdout, stderr) = run_upgrade(up, &["--no-progress".as_ref(), "--rollback".as_ref()]);
    eprintln!("{stdout}");
    assert!(ok, "rollback failed: {stdout}{stderr}");
    assert!(
        stdout.contains("verified: 2 executors answer"),
        "the rollback verified the fleet: {stdout}"
    );
}

#[test]
fn an_interrupted_upgrade_can_be_aborted_or_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let (up, fns) = counter_fleet(dir.path(), 10);
    let count_all = |expect: u32| count_all(&up, &fns, expect);
    count_all(1);
    let binary = new_binary(dir.path());

    // Killed half way, then aborted: every tenant is served, by whichever
    // executor it ended up on, and the record is gone.
    interrupted_upgrade(&up, &binary, 2);
    assert!(up.state.join("upgrade.json").exists());
    abort_upgrade(&up);
    assert!(!up.state.join("upgrade.json").exists());
    count_all(2);

    // Killed again, then run to the end: it resumes and finishes.
    interrupted_upgrade(&up, &binary, 2);
    count_all(3);
    upgrade(&up, "--executor-binary", &binary);
    count_all(4);
    assert_eq!(up.child_ids(), ["cpu0.1", "cpu1.1", "proxy"]);
    assert!(!up.state.join("upgrade.json").exists());
}

/// An upgrade stopped within its last step for an executor (the proxy
/// forgot the old executor once its tenants had moved, and the upgrade died
/// before it stopped that executor) resumes, or is aborted, from there: the
/// old executor is stopped, and every tenant is served.
#[test]
fn an_upgrade_stopped_after_the_proxy_forgot_an_executor_resumes_or_aborts() {
    for abort in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (up, fns) = counter_fleet(dir.path(), 6);
        let count_all = |expect: u32| count_all(&up, &fns, expect);
        count_all(1);
        let binary = new_binary(dir.path());
        interrupted_upgrade(&up, &binary, 1);
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(up.state.join("upgrade.json")).unwrap()).unwrap();
        let (old, step) = record["steps"]
            .as_object()
            .unwrap()
            .iter()
            .find(|(_, s)| s["done"] == false)
            .map(|(o, s)| (o.clone(), s["new_id"].as_str().unwrap().to_string()))
            .expect("a step under way");
        // Step 4, done by hand up to where the upgrade died: the old
        // executor's tenants moved to its replacement, the old one forgotten.
        let admin = |method: &str, path: &str, body: Option<serde_json::Value>| {
            let body = body.map(|b| b.to_string());
            up.admin.call(
                method,
                path,
                &[(
                    "authorization",
                    &format!("Bearer {}", up.secret("admin-token")),
                )],
                body.as_deref().map(|b| ("application/json", b.as_bytes())),
            )
        };
        let placements = admin("GET", "/admin/placements", None).json();
        for (tenant, home) in placements["placements"].as_object().unwrap() {
            if home.as_str() == Some(old.as_str()) {
                // The move the stopped upgrade asked for may still run.
                let start = Instant::now();
                loop {
                    let r = admin(
                        "POST",
                        &format!("/admin/tenants/{tenant}/migrate"),
                        Some(serde_json::json!({ "to": step })),
                    );
                    if r.status == 409 && start.elapsed() < Duration::from_secs(30) {
                        assert_eq!(r.code(), "migration_running", "{}", r.text());
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                    assert_eq!(r.status, 200, "{}", r.text());
                    break;
                }
            }
        }
        let r = admin("DELETE", &format!("/admin/executors/{old}"), None);
        assert!(r.status < 300, "{}", r.text());
        assert!(up.child_ids().contains(&old), "{:?}", up.child_ids());
        count_all(2);

        if abort {
            abort_upgrade(&up);
            assert!(!up.child_ids().contains(&old), "{:?}", up.child_ids());
            count_all(3);
        } else {
            let out = upgrade(&up, "--executor-binary", &binary);
            assert!(out.contains("stopped now"), "{out}");
            count_all(3);
            assert_eq!(up.child_ids(), ["cpu0.1", "cpu1.1", "proxy"]);
        }
        assert!(!up.state.join("upgrade.json").exists());
    }
}

/// Runs `tensor-wasm ARGS`, which must succeed; its stdout as JSON.
fn cli_json(args: &[&std::ffi::OsStr]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_tensor-wasm"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tensor-wasm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `tensor-wasm --version --json`: what `upgrade` reads of a new binary.
#[test]
fn version_json_names_the_formats_and_abi() {
    let r = cli_json(&["--version".as_ref(), "--json".as_ref()]);
    assert_eq!(r["version"], env!("CARGO_PKG_VERSION"));
    assert!(r["rustc"].as_str().unwrap().starts_with("rustc "), "{r}");
    assert_eq!(r["snapshot_formats"]["reads"], serde_json::json!([1, 2]));
    assert_eq!(r["snapshot_formats"]["writes"], serde_json::json!([1]));
    assert_eq!(r["guest_abi"], serde_json::json!([1, 2]));
    // `--json` alone is a usage error, not a silent no-op.
    let out = Command::new(env!("CARGO_BIN_EXE_tensor-wasm"))
        .arg("--json")
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// A binary that says, as this build's `--version --json` would, that it
/// reads and writes `formats` only: what a release with another snapshot
/// format reports. It runs nothing else.
fn binary_reporting(dir: &Path, formats: &[u32]) -> PathBuf {
    let mut report = cli_json(&["--version".as_ref(), "--json".as_ref()]);
    report["version"] = "9.0.0".into();
    report["snapshot_formats"] =
        serde_json::json!({"reads": formats, "writes": formats, "negotiated": []});
    let path = dir.join("tensor-wasm-other-format");
    std::fs::write(
        &path,
        format!("#!/bin/sh\n[ \"$1 $2\" = '--version --json' ] || exit 2\necho '{report}'\n"),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Runs `tensor-wasm upgrade` with `args`; (success, stdout + stderr).
fn try_upgrade(up: &UpProcess, args: &[&str], binary: &Path) -> (bool, String) {
    let mut all: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
    all.push(binary.as_os_str());
    let (ok, stdout, stderr) = run_upgrade(up, &all);
    (ok, format!("{stdout}{stderr}"))
}

/// The pre-flight check refuses a new binary whose snapshot formats do not
/// meet the fleet's, naming them, and changes nothing; `--check` alone
/// passes a binary of this release.
#[test]
fn an_upgrade_to_a_binary_of_another_snapshot_format_is_refused_before_it_starts() {
    let dir = tempfile::tempdir().unwrap();
    let up = UpProcess::start_with_env(
        &dir.path().join("state"),
        &["--cpu-executors", "2"],
        &[("TENSOR_WASM_API_TOKENS", "tok-acme:acme")],
    );
    let id = up.deploy_counter("tok-acme");
    assert_eq!(up.count("tok-acme", &id).status, 200);
    let before = up.child_ids();

    // Format 3 only: it could not read the fleet's format 1 files, and the
    // fleet could not read what it writes after a rollback.
    let other = binary_reporting(dir.path(), &[3]);
    for args in [
        &["--check", "--executor-binary"][..],
        &["--no-progress", "--executor-binary"],
    ] {
        let (ok, text) = try_upgrade(&up, args, &other);
        eprintln!("{text}");
        assert!(!ok, "{args:?} went ahead: {text}");
        assert!(text.contains("upgrade refused"), "{text}");
        assert!(
            text.contains("the fleet writes snapshot format 1, which the new binary cannot read"),
            "{text}"
        );
        assert!(
            text.contains(
                "the new binary writes snapshot format 3, which the fleet cannot read back"
            ),
            "{text}"
        );
        assert!(text.contains("cpu0") && text.contains("cpu1"), "{text}");
        assert_eq!(up.child_ids(), before, "nothing was started or stopped");
        assert!(!up.state.join("upgrade.json").exists());
        let r = up.count("tok-acme", &id);
        assert_eq!(r.status, 200, "{}", r.text());
    }

    // This release's binary passes, and `--check` stops there.
    let (ok, text) = try_upgrade(
        &up,
        &["--check", "--executor-binary"],
        &new_binary(dir.path()),
    );
    eprintln!("{text}");
    assert!(ok, "{text}");
    assert!(text.contains("ok: every tenant can move"), "{text}");
    assert!(text.contains("jobs in flight: 0"), "{text}");
    assert_eq!(up.child_ids(), before, "a check moves nothing");
    assert_eq!(
        crate::harness::parse_counter(&up.count("tok-acme", &id).body).0,
        4,
        "every call counted, none lost"
    );
}

/// `--backup` saves every tenant (signed under the fleet's snapshot key)
/// and the audit log before anything changes; a saved snapshot, checked by
/// `snapshot inspect` with the key, restores its tenant to the moment of
/// the backup.
#[test]
fn a_backup_holds_every_tenant_and_the_audit_log_and_restores_them() {
    use sha2::Digest as _;
    let dir = tempfile::tempdir().unwrap();
    let key = "backup-test-key-of-at-least-32-bytes";
    let up = UpProcess::start_with_env(
        &dir.path().join("state"),
        &["--cpu-executors", "2"],
        &[
            ("TENSOR_WASM_API_TOKENS", "tok-a:a,tok-b:b,tok-c:c"),
            ("TENSOR_WASM_SNAPSHOT_KEY", key),
        ],
    );
    let ids: Vec<String> = ["tok-a", "tok-b", "tok-c"]
        .iter()
        .map(|t| up.deploy_counter(t))
        .collect();
    let calls = |token: &str, id: &str| crate::harness::parse_counter(&up.count(token, id).body).0;
    assert_eq!((calls("tok-a", &ids[0]), calls("tok-a", &ids[0])), (1, 2));
    assert_eq!(calls("tok-b", &ids[1]), 1);
    let before = up.child_ids();

    let backups = dir.path().join("backups");
    let (ok, text) = try_upgrade(
        &up,
        &[
            "--check",
            "--backup",
            backups.to_str().unwrap(),
            "--executor-binary",
        ],
        &new_binary(dir.path()),
    );
    eprintln!("{text}");
    assert!(ok, "{text}");
    assert!(text.contains("backup: 3 tenants"), "{text}");
    assert!(!text.contains("not signed"), "{text}");
    assert_eq!(
        up.child_ids(),
        before,
        "a check with a backup moves nothing"
    );
    let folders: Vec<_> = std::fs::read_dir(&backups).unwrap().flatten().collect();
    assert_eq!(folders.len(), 1);
    let folder = folders[0].path();
    let name = folder.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with(&format!("{}-", env!("CARGO_PKG_VERSION"))),
        "{name}"
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(folder.join("backup.json")).unwrap()).unwrap();
    assert_eq!(manifest["version"], env!("CARGO_PKG_VERSION"));
    let saved = manifest["tenants"].as_array().unwrap();
    let names: Vec<&str> = saved
        .iter()
        .map(|t| t["tenant"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b", "c"]);
    for t in saved {
        let file = folder.join(t["file"].as_str().unwrap());
        let bytes = std::fs::read(&file).unwrap();
        assert_eq!(t["bytes"], bytes.len() as u64);
        assert_eq!(t["sha256"], hex::encode(sha2::Sha256::digest(&bytes)));
        assert_eq!(t["signed"], true);
        // Checked as an executor checks it, signature included.
        let view = cli_json(&[
            "snapshot".as_ref(),
            "inspect".as_ref(),
            "--json".as_ref(),
            "--key".as_ref(),
            key.as_ref(),
            file.as_os_str(),
        ]);
        assert_eq!(view["tenant"], t["tenant"], "{view}");
    }
    // The audit log up to the backup: every deploy is in it, whole.
    let audit = std::fs::read_to_string(folder.join("audit.log")).unwrap();
    let records: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).expect("a whole record"))
        .collect();
    assert_eq!(manifest["audit"]["records"], records.len() as u64);
    let deploys = records
        .iter()
        .filter(|r| r["action"] == "functions.create" && r["status"] == 201)
        .count();
    assert_eq!(deploys, 3, "{audit}");

    // Tenant a goes on, then comes back to the backup.
    assert_eq!(calls("tok-a", &ids[0]), 3);
    let snapshot = std::fs::read(folder.join("a.twsnap")).unwrap();
    let r = up.admin.call(
        "POST",
        "/admin/tenants/a/restore",
        &[(
            "authorization",
            &format!("Bearer {}", up.secret("admin-token")),
        )],
        Some(("application/octet-stream", &snapshot)),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(calls("tok-a", &ids[0]), 3, "the backup held two calls");
    assert_eq!(calls("tok-b", &ids[1]), 2, "b untouched");
}

/// A real Prometheus, scraping the proxy every second with the fleet's own
/// rules (`deploy/prometheus/tensor-wasm-rules.yml`); stopped on drop.
struct Prometheus {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Started against `target` (`host:port` of the proxy's public
    /// listener); `None` where the machine has no `prometheus` (CI installs
    /// it; `TENSOR_WASM_REQUIRE_PROMETHEUS` makes that a failure).
    fn start(target: &str) -> Option<Prometheus> {
        if Command::new("prometheus")
            .arg("--version")
            .output()
            .is_err()
        {
            assert!(
                std::env::var_os("TENSOR_WASM_REQUIRE_PROMETHEUS").is_none(),
                "no prometheus binary"
            );
            eprintln!("skipped: no prometheus binary (apt-get install prometheus)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let rules = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/prometheus/tensor-wasm-rules.yml");
        let config = format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             rule_files: [{:?}]\n\
             scrape_configs:\n  - job_name: proxy\n    static_configs: [{{targets: [{target:?}]}}]\n",
            rules.canonicalize().unwrap()
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let port = crate::harness::free_port();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let p = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        let ready = crate::harness::Api::new(&p.url);
        let deadline = Instant::now() + Duration::from_secs(60);
        while ready
            .try_call("GET", "/-/ready", &[], None)
            .ok()
            .map(|r| r.status)
            != Some(200)
        {
            assert!(Instant::now() < deadline, "prometheus did not get ready");
            std::thread::sleep(Duration::from_millis(200));
        }
        Some(p)
    }

    /// The newest value of `query`, once there is one that `accept`s.
    fn wait_for(&self, query: &str, accept: impl Fn(f64) -> bool) -> f64 {
        let api = crate::harness::Api::new(&self.url);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let path = format!("/api/v1/query?query={query}");
            let value = api.try_call("GET", &path, &[], None).ok().and_then(|r| {
                r.json()["data"]["result"][0]["value"][1]
                    .as_str()
                    .and_then(|s| s.parse::<f64>().ok())
            });
            if let Some(v) = value.filter(|v| accept(*v)) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{query} never came right: {value:?}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// With `--prometheus`, the upgrade reads the fleet's error budget from a
/// real Prometheus: it goes ahead while the budget is whole, refuses once
/// 5xx answers have spent it, and goes ahead with `--force`, which the
/// proxy's audit log records.
#[test]
fn an_upgrade_is_refused_when_the_error_budget_is_spent_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let up = UpProcess::start_with_env(
        &dir.path().join("state"),
        &["--cpu-executors", "2"],
        &[("TENSOR_WASM_API_TOKENS", "tok-acme:acme")],
    );
    let target = up.api.base.trim_start_matches("http://").to_string();
    let Some(prom) = Prometheus::start(&target) else {
        return;
    };
    let id = up.deploy_counter("tok-acme");
    for _ in 0..20 {
        assert_eq!(up.count("tok-acme", &id).status, 200);
    }
    let rule = "tensor_wasm:availability:error_budget_remaining30d";
    assert_eq!(prom.wait_for(rule, |v| v == 1.0), 1.0);
    let binary = new_binary(dir.path());
    let with_budget = [
        "--check",
        "--prometheus",
        prom.url.as_str(),
        "--executor-binary",
    ];
    let (ok, text) = try_upgrade(&up, &with_budget, &binary);
    eprintln!("{text}");
    assert!(ok, "{text}");
    assert!(text.contains("error budget: 100.0 % left"), "{text}");

    // A function that traps: every call is a 500, and the budget goes.
    let trap = wat::parse_str(
        r#"(module (memory (export "memory") 1) (func (export "handle") (result i32) unreachable))"#,
    )
    .unwrap();
    let r = up.api.call(
        "POST",
        "/functions?name=trap",
        &[("authorization", "Bearer tok-acme")],
        Some(("application/wasm", &trap)),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let trap_id = r.json()["id"].as_str().unwrap().to_string();
    // Prometheus counts a counter's increase from the first sample it
    // scrapes, so the calls go on until the budget shows them.
    let stop = AtomicBool::new(false);
    let left = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                assert_eq!(up.count("tok-acme", &trap_id).status, 500);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let left = prom.wait_for(rule, |v| v < 0.3);
        stop.store(true, Ordering::Relaxed);
        left
    });
    let (ok, text) = try_upgrade(&up, &with_budget, &binary);
    eprintln!("{text}");
    assert!(!ok, "went ahead with {left} of the budget: {text}");
    assert!(
        text.contains("of the 30-day error budget is left, under 30 %"),
        "{text}"
    );
    assert!(text.contains("--force overrides"), "{text}");

    // Forced: it goes ahead, and the audit log says so.
    let forced = [
        "--check",
        "--force",
        "--prometheus",
        prom.url.as_str(),
        "--executor-binary",
    ];
    let (ok, text) = try_upgrade(&up, &forced, &binary);
    eprintln!("{text}");
    assert!(ok, "{text}");
    assert!(
        text.contains("forced past the error-budget check"),
        "{text}"
    );
    let audit = up.state.join("logs").join("audit.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(&audit).unwrap_or_default();
        let overrides: Vec<serde_json::Value> = log
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|r: &serde_json::Value| r["action"] == "admin.upgrade.override")
            .collect();
        if let Some(r) = overrides.first() {
            assert_eq!(
                r["resource"], "/admin/upgrade/overrides/error-budget",
                "{r}"
            );
            assert_eq!(r["status"], 200, "{r}");
            assert_eq!(overrides.len(), 1, "one forced upgrade, one record");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no override in the audit log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The binaries each executor runs, from the supervisor.
fn executor_binaries(up: &UpProcess) -> Vec<(String, PathBuf)> {
    let ls = up.control(serde_json::json!({"op": "ls"}));
    ls["result"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["role"] == "executor")
        .map(|c| {
            (
                c["id"].as_str().unwrap().to_string(),
                PathBuf::from(c["binary"].as_str().unwrap()),
            )
        })
        .collect()
}

/// A finished upgrade rolls back onto the binary it replaced, kept by
/// content although the original file changed since, by the same live
/// migration: every tenant's count carries on; and the rollback can itself
/// be rolled back.
#[test]
fn a_finished_upgrade_rolls_back_onto_the_binary_it_replaced() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let (up, fns) = counter_fleet(dir.path(), 4);
    let count_all = |expect: u32| count_all(&up, &fns, expect);
    count_all(1);
    // The fleet moves onto a copy ("old"), then onto another ("next"); the
    // old copy is then overwritten: the rollback must not depend on the
    // old path still holding the old binary.
    let old = dir.path().join("tensor-wasm-old");
    std::fs::copy(env!("CARGO_BIN_EXE_tensor-wasm"), &old).unwrap();
    upgrade(&up, "--executor-binary", &old);
    count_all(2);
    // Another build, as far as its bytes go (an ELF file runs the same
    // with bytes after its end).
    let next = new_binary(dir.path());
    std::fs::OpenOptions::new()
        .append(true)
        .open(&next)
        .unwrap()
        .write_all(b"another build")
        .unwrap();
    // With a report of what the upgrade did and checked.
    let report_path = dir.path().join("report.json");
    let (ok, stdout, stderr) = run_upgrade(
        &up,
        &[
            "--no-progress".as_ref(),
            "--report".as_ref(),
            report_path.as_os_str(),
            "--executor-binary".as_ref(),
            next.as_os_str(),
        ],
    );
    assert!(ok, "{stdout}{stderr}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    let moves = report["moves"].as_array().unwrap();
    assert_eq!(moves.len(), 4, "every tenant moved once: {report}");
    for m in moves {
        assert_eq!(m["protocol"], "pre-copy", "{m}");
        assert!(m["pause_ms"].as_f64().unwrap() > 0.0, "{m}");
        assert!(m["bytes"].as_u64().unwrap() > 0, "{m}");
    }
    let (p50, max) = (
        report["pause_ms"]["p50"].as_f64().unwrap(),
        report["pause_ms"]["max"].as_f64().unwrap(),
    );
    assert!(p50 > 0.0 && p50 <= max, "{report}");
    let verified = report["verified"].to_string();
    assert!(
        verified.contains("2 executors answer") && verified.contains("4 tenants placed"),
        "{report}"
    );
    assert_eq!(report["problems"], serde_json::json!([]));
    assert!(report["canary"].is_null(), "no canary was asked for");
    assert_eq!(
        report["binaries"][0]["build"]["version"],
        env!("CARGO_PKG_VERSION")
    );
    assert!(!report["not_checked"].as_array().unwrap().is_empty());
    count_all(3);
    let next = next.canonicalize().unwrap();
    assert!(executor_binaries(&up).iter().all(|(_, b)| *b == next));
    std::fs::write(&old, b"#!/bin/sh\nexit 1\n").unwrap();

    // Back onto the kept copy of the old binary.
    rollback(&up);
    count_all(4);
    let running = executor_binaries(&up);
    assert_eq!(
        running
            .iter()
            .map(|(id, _)| id.as_str())
            .collect::<Vec<_>>(),
        ["cpu0.3", "cpu1.3"]
    );
    let kept = &running[0].1;
    assert!(kept.starts_with(up.state.join("binaries")), "{kept:?}");
    assert!(running.iter().all(|(_, b)| b == kept));
    assert_eq!(
        std::fs::read(kept).unwrap(),
        std::fs::read(env!("CARGO_BIN_EXE_tensor-wasm")).unwrap(),
        "the old binary, byte for byte"
    );
    // And forward again: the rollback kept what it replaced.
    let previous: serde_json::Value =
        serde_json::from_slice(&std::fs::read(up.state.join("previous.json")).unwrap()).unwrap();
    let forward = PathBuf::from(previous["executor"].as_str().unwrap());
    assert_ne!(&forward, kept);
    assert_eq!(
        std::fs::read(&forward).unwrap(),
        std::fs::read(&next).unwrap()
    );
    rollback(&up);
    count_all(5);
    assert!(executor_binaries(&up).iter().all(|(_, b)| *b == forward));
}

/// A function that holds a 32 MiB tensor for the length of a call: fine
/// under the default quota, a trap (500) on an executor whose tenants may
/// hold 16 MiB of host memory.
const SCRATCH_32MIB: &str = r#"(module
  (import "tensor" "zeros" (func $zeros (param i32 i32 i32) (result i32)))
  (import "tensor" "free" (func $free (param i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "\00\00\80\00")
  (func (export "handle") (result i32)
    (local $h i32)
    (local.set $h (call $zeros (i32.const 0) (i32.const 0) (i32.const 1)))
    (if (i32.lt_s (local.get $h) (i32.const 0)) (then unreachable))
    (drop (call $free (local.get $h)))
    (i32.const 0)))"#;

/// An invocation with an empty `text/plain` body on a fresh connection.
fn plain_call(addr: &str, path: &str, token: &str) -> Result<(u16, Vec<u8>), RawError> {
    crate::harness::raw_request(
        addr,
        "POST",
        path,
        &[
            ("authorization", &format!("Bearer {token}")),
            ("content-type", "text/plain"),
        ],
        b"",
        Duration::from_secs(30),
    )
}

/// "A new binary" with a regression: this build, with a tenant host-memory
/// quota of 16 MiB instead of 4 GiB, so that [`SCRATCH_32MIB`] answers 500
/// on it while every other function works.
fn regressed_binary(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("tensor-wasm-regressed");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nTENSOR_WASM_TENANT_HOST_MEMORY_BYTES=16777216 exec '{}' \"$@\"\n",
            env!("CARGO_BIN_EXE_tensor-wasm")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Counter tenants called by [`ScratchFleet::load`].
const COUNTERS: usize = 4;

/// `tensor-wasm up` with two CPU executors, [`COUNTERS`] counter tenants
/// (`t0`…) and a tenant `scratch` running [`SCRATCH_32MIB`], placed on the
/// first executor the supervisor lists: the one an upgrade replaces first.
struct ScratchFleet {
    up: UpProcess,
    /// `tok-0`… then `tok-scratch`.
    tokens: Vec<String>,
    /// Their functions, in the same order.
    fns: Vec<String>,
    /// (id, binary) of each executor, in the supervisor's order.
    executors: Vec<(String, String)>,
}

impl ScratchFleet {
    fn start(dir: &Path) -> ScratchFleet {
        let mut list: Vec<String> = (0..COUNTERS).map(|i| format!("tok-{i}:t{i}")).collect();
        list.push("tok-scratch:scratch".into());
        let up = UpProcess::start_with_env(
            &dir.join("state"),
            &["--cpu-executors", "2"],
            &[
                ("TENSOR_WASM_API_TOKENS", list.join(",").as_str()),
                ("TENSOR_WASM_API_RATE_LIMIT_QPS", "1000"),
                ("TENSOR_WASM_API_RATE_LIMIT_BURST", "1000"),
            ],
        );
        let mut tokens: Vec<String> = (0..COUNTERS).map(|i| format!("tok-{i}")).collect();
        let mut fns: Vec<String> = tokens.iter().map(|t| up.deploy_counter(t)).collect();
        let r = up.api.call(
            "POST",
            "/functions?name=scratch",
            &[("authorization", "Bearer tok-scratch")],
            Some(("application/wasm", &wat::parse_str(SCRATCH_32MIB).unwrap())),
        );
        assert_eq!(r.status, 201, "{}", r.text());
        tokens.push("tok-scratch".into());
        fns.push(r.json()["id"].as_str().unwrap().to_string());
        let fleet = ScratchFleet {
            executors: executor_binaries(&up)
                .into_iter()
                .map(|(id, b)| (id, b.to_string_lossy().into_owned()))
                .collect(),
            up,
            tokens,
            fns,
        };
        let body = serde_json::json!({"to": fleet.executors[0].0}).to_string();
        let r = fleet.up.admin.call(
            "POST",
            "/admin/tenants/scratch/migrate",
            &[(
                "authorization",
                &format!("Bearer {}", fleet.up.secret("admin-token")),
            )],
            Some(("application/json", body.as_bytes())),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        fleet
    }

    /// Calls every tenant in a loop until `stop`: each client's statuses.
    fn load(&self, stop: &Arc<AtomicBool>) -> Vec<std::thread::JoinHandle<Vec<u16>>> {
        let addr = self.up.api.base.trim_start_matches("http://").to_string();
        self.tokens
            .iter()
            .zip(&self.fns)
            .map(|(token, id)| {
                let (addr, stop, token) = (addr.clone(), stop.clone(), token.clone());
                let path = format!("/functions/{id}/invoke");
                std::thread::spawn(move || {
                    let mut statuses = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        statuses.push(match plain_call(&addr, &path, &token) {
                            Ok((status, _)) => status,
                            Err(e) => panic!("{token}: {e:?}"),
                        });
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    statuses
                })
            })
            .collect()
    }

    /// Runs `upgrade ARGS --executor-binary <regressed>` under load:
    /// whether it succeeded, its stdout and stderr, and each client's
    /// statuses.
    fn upgrade_under_load(
        &self,
        dir: &Path,
        args: &[&std::ffi::OsStr],
    ) -> (bool, String, String, Vec<Vec<u16>>) {
        let stop = Arc::new(AtomicBool::new(false));
        let clients = self.load(&stop);
        std::thread::sleep(Duration::from_millis(500));
        let regressed = regressed_binary(dir);
        let mut all = args.to_vec();
        all.extend([
            "--no-progress".as_ref(),
            "--executor-binary".as_ref(),
            regressed.as_os_str(),
        ]);
        let (ok, stdout, stderr) = run_upgrade(&self.up, &all);
        eprintln!("{stdout}{stderr}");
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        let statuses = clients.into_iter().map(|c| c.join().unwrap()).collect();
        (ok, stdout, stderr, statuses)
    }

    /// No counter tenant saw a failure and each counted every call once;
    /// the scratch tenant failed only with 500 and answers again now.
    fn check_tenants(&self, statuses: &[Vec<u16>]) {
        for (i, s) in statuses[..COUNTERS].iter().enumerate() {
            assert!(s.len() > 20, "t{i} was called");
            assert!(s.iter().all(|&st| st == 200), "t{i}: {s:?}");
            let r = self.up.count(&self.tokens[i], &self.fns[i]);
            assert_eq!(r.status, 200);
            assert_eq!(
                crate::harness::parse_counter(&r.body).0 as usize,
                s.len() + 1,
                "t{i} counted every call once"
            );
        }
        let scratch = &statuses[COUNTERS];
        assert!(scratch.contains(&500), "the regression showed: {scratch:?}");
        assert!(scratch.iter().all(|&st| st == 200 || st == 500));
        let addr = self.up.api.base.trim_start_matches("http://");
        let path = format!("/functions/{}/invoke", self.fns[COUNTERS]);
        assert_eq!(plain_call(addr, &path, "tok-scratch").unwrap().0, 200);
    }
}

#[test]
fn a_failing_canary_moves_its_tenants_back_and_stops_the_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = ScratchFleet::start(dir.path());
    let canary = fleet.executors[0].0.clone();
    let report_path = dir.path().join("report.json");
    let (ok, _, stderr, statuses) = fleet.upgrade_under_load(
        dir.path(),
        &[
            "--canary-window".as_ref(),
            "3s".as_ref(),
            "--report".as_ref(),
            report_path.as_os_str(),
        ],
    );
    assert!(!ok, "the upgrade stopped");
    assert!(
        stderr.contains(&format!("canary failed: {canary}.1")),
        "{stderr}"
    );
    fleet.check_tenants(&statuses);

    // The fleet is as it was: the same executors on the same binary,
    // every tenant on one of them, nothing left recorded.
    let now: Vec<(String, String)> = executor_binaries(&fleet.up)
        .into_iter()
        .map(|(id, b)| (id, b.to_string_lossy().into_owned()))
        .collect();
    assert_eq!(now, fleet.executors);
    let placements = fleet.up.placements();
    assert_eq!(placements["scratch"], canary.as_str());
    for (t, on) in placements.as_object().unwrap() {
        assert!(
            fleet.executors.iter().any(|(id, _)| on == id.as_str()),
            "{t} on {on}"
        );
    }
    assert!(!fleet.up.state.join("upgrade.json").exists());

    // The report says what happened.
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    let c = &report["canary"];
    assert_eq!(c["result"], "failed", "{report}");
    assert_eq!(c["old"], canary.as_str());
    assert_eq!(c["baseline"]["errors"], 0, "{c}");
    assert!(c["canary"]["errors"].as_u64().unwrap() > 0, "{c}");
    assert!(c["why"].as_str().unwrap().contains("failed (5xx)"), "{c}");
    assert!(
        report["stopped"]
            .as_str()
            .unwrap()
            .contains("canary failed"),
        "{report}"
    );
    // Each canary tenant moved there and back.
    let moves = report["moves"].as_array().unwrap();
    let there = moves
        .iter()
        .filter(|m| m["to"] == format!("{canary}.1"))
        .count();
    let back = moves.iter().filter(|m| m["to"] == canary.as_str()).count();
    assert!(there >= 1 && there == back, "{moves:?}");
}

/// Without a canary the same regression reaches every executor; the
/// verification finds the tenant that only fails since its move, and the
/// command rolls the fleet back by itself.
#[test]
fn a_failed_verification_rolls_the_fleet_back_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = ScratchFleet::start(dir.path());
    let report_path = dir.path().join("report.json");
    let (ok, stdout, stderr, statuses) = fleet.upgrade_under_load(
        dir.path(),
        &[
            "--canary-window".as_ref(),
            "0s".as_ref(),
            "--report".as_ref(),
            report_path.as_os_str(),
        ],
    );
    assert!(!ok);
    assert!(
        stderr.contains("verification failed: tenant scratch answered only 5xx after its move")
            && stderr.contains("the fleet was rolled back onto the binaries it ran before"),
        "{stderr}"
    );
    assert!(stdout.contains("rolling back"), "{stdout}");
    fleet.check_tenants(&statuses);

    // Every executor was replaced twice (onto the regression and back),
    // and runs the kept copy of the binary it ran before.
    let now = executor_binaries(&fleet.up);
    assert_eq!(
        now.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
        ["cpu0.2", "cpu1.2"]
    );
    for (_, b) in &now {
        assert!(b.starts_with(fleet.up.state.join("binaries")), "{b:?}");
        assert_eq!(
            std::fs::read(b).unwrap(),
            std::fs::read(&fleet.executors[0].1).unwrap()
        );
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    assert_eq!(report["rolled_back"]["ok"], true, "{report}");
    assert!(
        report["problems"]
            .to_string()
            .contains("tenant scratch answered only 5xx after its move"),
        "{report}"
    );
}

#[test]
fn a_frozen_tenant_holds_the_upgrade_back_until_it_thaws() {
    let dir = tempfile::tempdir().unwrap();
    let (up, fns) = counter_fleet(dir.path(), 2);
    count_all(&up, &fns, 1);
    // t0 frozen as an export leaves it (the executor's internal API).
    let on = up.placements()["t0"].as_str().unwrap().to_string();
    let ls = up.control(serde_json::json!({"op": "ls"}));
    let addr = ls["result"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == on.as_str())
        .unwrap()["addr"]
        .as_str()
        .unwrap()
        .to_string();
    let internal = up.secret("internal-token");
    let internal_call = |action: &str| {
        crate::harness::raw_request(
            &addr,
            "POST",
            &format!("/internal/tenants/t0/{action}"),
            &[("authorization", &format!("Bearer {internal}"))],
            b"",
            Duration::from_secs(30),
        )
        .unwrap()
        .0
    };
    assert_eq!(internal_call("export"), 200);

    let binary = new_binary(dir.path());
    let frozen = format!("executor {on}: tenants t0 are frozen");
    let (ok, out) = try_upgrade(&up, &["--check", "--executor-binary"], &binary);
    assert!(!ok, "{out}");
    assert!(out.contains(&frozen), "{out}");
    // The same as JSON, alone on standard output.
    let (ok, stdout, stderr) = run_upgrade(
        &up,
        &[
            "--json".as_ref(),
            "--executor-binary".as_ref(),
            binary.as_os_str(),
        ],
    );
    assert!(!ok);
    let report: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert!(
        report["preflight"]["blockers"][0]
            .as_str()
            .unwrap()
            .contains(&frozen),
        "{report}"
    );
    assert!(
        report["stopped"]
            .as_str()
            .unwrap()
            .starts_with("upgrade refused"),
        "{report}"
    );
    assert!(stderr.contains("pre-flight:"), "{stderr}");
    assert!(report["moves"].as_array().unwrap().is_empty());
    assert_eq!(internal_call("thaw"), 204);
    let (ok, out) = try_upgrade(&up, &["--check", "--executor-binary"], &binary);
    assert!(ok, "{out}");
    count_all(&up, &fns, 2);
}

/// The canary is the first executor that holds a tenant: with every
/// tenant on the second one, that one is replaced first, watched, and
/// judged on the requests its tenants carry.
#[test]
fn the_canary_is_the_first_executor_that_holds_a_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let (up, fns) = counter_fleet(dir.path(), 2);
    let executors: Vec<String> = executor_binaries(&up).into_iter().map(|e| e.0).collect();
    let (first, second) = (executors[0].clone(), executors[1].clone());
    let auth = format!("Bearer {}", up.secret("admin-token"));
    for t in ["t0", "t1"] {
        if up.placements()[t] == first.as_str() {
            let body = serde_json::json!({ "to": second }).to_string();
            let r = up.admin.call(
                "POST",
                &format!("/admin/tenants/{t}/migrate"),
                &[("authorization", &auth)],
                Some(("application/json", body.as_bytes())),
            );
            assert_eq!(r.status, 200, "{}", r.text());
        }
    }
    // Both tenants called all along, 40 times a second each.
    let stop = Arc::new(AtomicBool::new(false));
    let addr = up.api.base.trim_start_matches("http://").to_string();
    let clients: Vec<_> = fns
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let (addr, stop) = (addr.clone(), stop.clone());
            let (token, path) = (format!("tok-{i}"), format!("/functions/{id}/invoke"));
            std::thread::spawn(move || {
                let mut failed = 0;
                while !stop.load(Ordering::Relaxed) {
                    match plain_call(&addr, &path, &token) {
                        Ok((200, _)) => {}
                        _ => failed += 1,
                    }
                    std::thread::sleep(Duration::from_millis(25));
                }
                failed
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let binary = new_binary(dir.path());
    let (ok, stdout, stderr) = run_upgrade(
        &up,
        &[
            "--no-progress".as_ref(),
            "--canary-window".as_ref(),
            "2s".as_ref(),
            "--executor-binary".as_ref(),
            binary.as_os_str(),
        ],
    );
    stop.store(true, Ordering::Relaxed);
    let failed: u32 = clients.into_iter().map(|c| c.join().unwrap()).sum();
    eprintln!("{stdout}");
    assert!(ok, "upgrade failed: {stdout}{stderr}");
    assert!(
        stdout.contains(&format!("canary: {second}, watched for 2s")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("canary: passed on {second}.1")),
        "{stdout}"
    );
    // It went first: the executor holding nothing was replaced after it.
    let at = |s: &str| stdout.find(s).unwrap_or_else(|| panic!("{s}: {stdout}"));
    assert!(at(&format!("{second}: replaced by")) < at(&format!("{first}: replaced by")));
    assert_eq!(failed, 0, "no call failed");
}
