//! Durable warm state (`docs/API.md`, "Durability"): an executor killed
//! with SIGKILL under load comes back with every `strict` answer its
//! clients saw, and `periodic` tenants as of a recent checkpoint; damaged
//! journals and a full disk lose nothing that was good before.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tensor_wasm_executor::durable::check_frames;

use crate::harness::{
    COUNTER, ExecutorProcess, ProxyOptions, RawError, SPINNER, TestFleet, job_of, multipart,
    parse_counter, raw_request, register_on, submit_job, wait_job_of,
};

/// Registers the counter for `tenant` with `config`; its id.
fn deploy(ex: &ExecutorProcess, tenant: &str, config: &str) -> String {
    register_on(
        ex,
        tenant,
        "counter",
        &wat::parse_str(COUNTER).unwrap(),
        config,
    )
}

/// One call of `tenant`'s counter on a fresh connection: its status and
/// body, or why there was none.
fn call(addr: &str, tenant: &str, id: &str) -> Result<(u16, Vec<u8>), RawError> {
    call_with(addr, tenant, id, b"")
}

/// [`call`] with `body` (which the counter ignores).
fn call_with(addr: &str, tenant: &str, id: &str, body: &[u8]) -> Result<(u16, Vec<u8>), RawError> {
    raw_request(
        addr,
        "POST",
        &format!("/functions/{id}/invoke"),
        &[
            (
                "authorization",
                &format!("Bearer {}", crate::harness::TOKEN),
            ),
            ("x-tensor-wasm-tenant", tenant),
            ("content-type", "text/plain"),
        ],
        body,
        Duration::from_secs(30),
    )
}

/// A call that must answer 200: the count, checked against the tensor
/// that grows with it (memory, a global and a tensor agree).
fn count(ex: &ExecutorProcess, tenant: &str, id: &str) -> u32 {
    let (status, body) = call(&ex.addr, tenant, id).unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let (n, sum) = parse_counter(&body);
    assert_eq!(sum, vec![n as f32; 4], "global and tensor agree");
    n
}

/// Every count answered 200, with when.
type Answers = Vec<(Instant, u32)>;

/// Calls `tenant`'s counter from `clients` threads until `stop`.
fn load(
    addr: &str,
    tenant: &str,
    id: &str,
    clients: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<Answers>> {
    (0..clients)
        .map(|_| {
            let (addr, tenant, id, stop) = (
                addr.to_string(),
                tenant.to_string(),
                id.to_string(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match call(&addr, &tenant, &id) {
                        Ok((200, body)) => seen.push((Instant::now(), parse_counter(&body).0)),
                        Ok((status, body)) => panic!(
                            "{tenant}: {status} before the kill: {}",
                            String::from_utf8_lossy(&body)
                        ),
                        // The kill: no answer.
                        Err(_) => break,
                    }
                }
                seen
            })
        })
        .collect()
}

/// SIGKILL under a steady load of a `strict` and a `periodic` tenant:
/// after the restart the strict counter goes on from at least the last
/// count any client was answered (at most the calls in flight past it),
/// and the periodic one from a count answered within about a checkpoint
/// interval of the kill.
#[test]
fn sigkill_under_load_loses_no_strict_answer_and_little_periodic_work() {
    let dir = tempfile::tempdir().unwrap();
    let mut ex = ExecutorProcess::start("cpu-k", dir.path());
    let strict = deploy(&ex, "acme", r#"{"durability": "strict"}"#);
    let periodic = deploy(
        &ex,
        "beta",
        r#"{"durability": "periodic", "checkpoint_ms": 200}"#,
    );
    let clients = 4;
    let stop = Arc::new(AtomicBool::new(false));
    let strict_load = load(&ex.addr, "acme", &strict, clients, &stop);
    let periodic_load = load(&ex.addr, "beta", &periodic, clients, &stop);
    std::thread::sleep(Duration::from_secs(3));
    let killed = Instant::now();
    ex.restart(); // SIGKILL, then the same id, state directory and port
    stop.store(true, Ordering::Relaxed);
    let gather = |handles: Vec<std::thread::JoinHandle<Answers>>| -> Answers {
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    };
    let strict_seen = gather(strict_load);
    let periodic_seen = gather(periodic_load);
    let acked = strict_seen.iter().map(|(_, n)| *n).max().unwrap();
    assert!(acked > 20, "a steady load: {acked} strict calls answered");

    let next = count(&ex, "acme", &strict);
    assert!(
        next > acked && next <= acked + 1 + clients as u32,
        "strict: answered up to {acked} before the kill, {next} after"
    );

    let periodic_acked = periodic_seen.iter().map(|(_, n)| *n).max().unwrap();
    let next = count(&ex, "beta", &periodic);
    // What was answered a generous interval before the kill (200 ms
    // interval, 100 ms passes, the sync): that much must have survived.
    let settled = periodic_seen
        .iter()
        .filter(|(at, _)| *at + Duration::from_secs(2) < killed)
        .map(|(_, n)| *n)
        .max()
        .unwrap_or(0);
    assert!(settled > 0, "periodic calls answered well before the kill");
    assert!(
        next > settled && next <= periodic_acked + 1 + clients as u32,
        "periodic: {settled} answered 2 s before the kill, {periodic_acked} in all, {next} after"
    );
    assert!(
        ex.log_text()
            .contains("tenant resumed from its checkpoints"),
        "{}",
        ex.log_text()
    );
}

/// The journal's only file, `durable/<tenant>/<generation>.journal`.
fn journal_file(state: &Path, tenant: &str) -> std::path::PathBuf {
    let dir = state.join("durable").join(tenant);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.pop().expect("a journal")
}

/// An executor `id` on `state` with tenant acme's `strict` counter,
/// checkpointed an hour apart (so every frame after its first is a call's
/// record), called `calls` times; the counter's id.
fn counted(id: &str, state: &Path, calls: u32) -> (ExecutorProcess, String) {
    let ex = ExecutorProcess::start(id, state);
    let function = deploy(
        &ex,
        "acme",
        r#"{"durability": "strict", "checkpoint_ms": 3600000}"#,
    );
    for n in 1..=calls {
        assert_eq!(count(&ex, "acme", &function), n);
    }
    (ex, function)
}

/// Where each frame of a journal's `bytes` starts (its 32-byte header,
/// `TWJ1` first, holds its payload's length at bytes 16..24), and where
/// the last one ends.
fn frame_starts(bytes: &[u8]) -> (Vec<usize>, usize) {
    let mut starts = Vec::new();
    let mut at = 0;
    while at + 32 <= bytes.len() && &bytes[at..at + 4] == b"TWJ1" {
        starts.push(at);
        let len = u64::from_le_bytes(bytes[at + 16..at + 24].try_into().unwrap());
        at += 32 + len as usize;
    }
    (starts, at)
}

/// The frames of a journal file, without the zeros written ahead of them.
fn read_frames(file: &Path) -> Vec<u8> {
    let mut bytes = std::fs::read(file).unwrap();
    let (_, end) = frame_starts(&bytes);
    assert!(
        bytes[end..].iter().all(|&b| b == 0),
        "zeros after the frames"
    );
    bytes.truncate(end);
    bytes
}

/// A journal cut short (a crash mid-write) or with a bit flipped on disk:
/// the damaged frame and what follows are refused, the tenant resumes from
/// the frames before it, and the journal goes on from there.
#[test]
fn a_damaged_journal_resumes_from_the_last_good_frame() {
    for damage in ["truncate", "flip"] {
        let dir = tempfile::tempdir().unwrap();
        let (mut ex, id) = counted("cpu-j", dir.path(), 5);
        // The first strict call wrote two frames (a racy copy of its new
        // instance, then the exact one), each call after it its record.
        ex.restart();
        assert_eq!(
            count(&ex, "acme", &id),
            6,
            "{damage}: whole, all of it back"
        );
        let file = journal_file(dir.path(), "acme");
        let _ = ex.child.kill();
        let _ = ex.child.wait();
        let mut bytes = read_frames(&file);
        assert_eq!(
            check_frames(&bytes),
            (7, None),
            "a frame per call, and the copy"
        );
        if damage == "truncate" {
            // Cut into the last frame (call 6's).
            bytes.truncate(bytes.len() - 10);
        } else {
            // A bit in the record of call 4 (frame 5): past the instance's
            // copy and the first calls' records.
            let at = frame_starts(&bytes).0[4] + 40;
            bytes[at] ^= 0x04;
        }
        std::fs::write(&file, &bytes).unwrap();
        // Frame n + 1 holds call n: the damaged one and those after it
        // are refused, the ones before it stand.
        let (good, damaged) = check_frames(&bytes);
        assert!(
            damaged.is_some() && (3..7).contains(&good),
            "{damage}: {good} good frames"
        );
        ex.restart();
        assert_eq!(
            count(&ex, "acme", &id),
            good as u32,
            "{damage}: from the {good} frames before the damaged one"
        );
        assert!(
            ex.log_text().contains("a damaged checkpoint frame"),
            "{}",
            ex.log_text()
        );
        // The journal goes on from the good frames.
        let again = count(&ex, "acme", &id);
        ex.restart();
        assert_eq!(
            count(&ex, "acme", &id),
            again + 1,
            "{damage}: journaled again"
        );
    }
}

/// A recorded `strict` call that answers otherwise when recovery runs it
/// again (here its record names another answer, its checksum made good):
/// the instance resumes from its last checkpoint, not from a replay that
/// went astray, the calls recorded after that checkpoint are lost, and the
/// log says so.
#[test]
fn a_call_that_answers_otherwise_when_run_again_falls_back_to_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ex, id) = counted("cpu-d", dir.path(), 4);
    let _ = ex.child.kill();
    let _ = ex.child.wait();
    let file = journal_file(dir.path(), "acme");
    let mut bytes = read_frames(&file);
    // The copy and the exact frame of call 1, then the records of 2, 3, 4.
    let (starts, end) = frame_starts(&bytes);
    assert_eq!(starts.len(), 5);
    let last = *starts.last().unwrap();
    let key = b"\"answer\":\"";
    let at = last
        + bytes[last..]
            .windows(key.len())
            .position(|w| w == key)
            .expect("a call's record names its answer")
        + key.len();
    bytes[at] = if bytes[at] == b'0' { b'1' } else { b'0' };
    assert!(tensor_wasm_shared::snapshot::stream::seal(
        &mut bytes[last + 32..end]
    ));
    assert_eq!(check_frames(&bytes), (5, None), "every frame checks out");
    std::fs::write(&file, &bytes).unwrap();

    ex.restart();
    assert_eq!(
        count(&ex, "acme", &id),
        2,
        "from the checkpoint of call 1, without the replay"
    );
    assert!(
        ex.log_text()
            .contains("a recorded call did not run again as it had"),
        "{}",
        ex.log_text()
    );
    // The journal goes on from there.
    assert_eq!(count(&ex, "acme", &id), 3);
    ex.restart();
    assert_eq!(count(&ex, "acme", &id), 4);
}

/// A function may checkpoint an hour apart, but its calls go as records
/// for at most 10 s after its instance's last exact frame: a call past
/// that takes a frame (so recovery never runs more than 10 s of an
/// instance's calls again), and records follow it again.
#[test]
fn calls_go_as_records_for_at_most_ten_seconds_after_a_frame() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ex, id) = counted("cpu-w", dir.path(), 2);
    std::thread::sleep(Duration::from_millis(10_500));
    assert_eq!(count(&ex, "acme", &id), 3);
    assert_eq!(count(&ex, "acme", &id), 4);
    let _ = ex.child.kill();
    let _ = ex.child.wait();
    let bytes = read_frames(&journal_file(dir.path(), "acme"));
    let (starts, _) = frame_starts(&bytes);
    let flags: Vec<u32> = starts
        .iter()
        .map(|&at| u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()))
        .collect();
    // Call 1: a racy fresh copy and its exact frame; call 2: a record;
    // call 3, past the window: an exact frame; call 4: a record.
    assert_eq!(flags, [1 | 8, 0, 16, 0, 16]);
    ex.restart();
    assert_eq!(count(&ex, "acme", &id), 5);
}

/// The executor's metrics count its journals' syncs and bytes: each of
/// the sequential `strict` calls waited for a sync of its own, and the
/// bytes written cover every frame the journal holds.
#[test]
fn the_executors_metrics_count_journal_syncs_and_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ex, _) = counted("cpu-m", dir.path(), 6);
    let syncs = ex.metric("tensor_wasm_journal_sync_duration_seconds_count");
    assert!(syncs >= 6.0, "{syncs} syncs for 6 strict calls");
    let written = ex.metric("tensor_wasm_journal_written_bytes_total");
    let _ = ex.child.kill();
    let _ = ex.child.wait();
    let frames = read_frames(&journal_file(dir.path(), "acme"));
    assert!(
        written >= frames.len() as f64,
        "{written} bytes counted for {} bytes of frames",
        frames.len()
    );
}

/// A full disk: strict calls answer `checkpoint_failed` while the tenant
/// keeps serving its other functions, the last good checkpoint stays
/// intact through a kill, and once there is room again checkpoints resume.
/// The state directory is a 48 MiB tmpfs, filled by a file.
#[test]
fn a_full_disk_keeps_the_tenant_serving_and_its_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("state");
    std::fs::create_dir(&mount).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=48m", "tmpfs"])
        .arg(&mount)
        .status()
        .unwrap();
    assert!(
        mounted.success(),
        "mounting a tmpfs (the tests run as root)"
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(mount.clone());

    let mut ex = ExecutorProcess::start("cpu-f", &mount);
    let id = deploy(&ex, "acme", r#"{"durability": "strict"}"#);
    let other = deploy(&ex, "acme-none", r#"{"durability": "none"}"#);
    for n in 1..=3 {
        assert_eq!(count(&ex, "acme", &id), n);
    }
    // Fill the disk.
    let filler = mount.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![7u8; 1 << 20];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
    // Calls' records (60 KiB each, with their requests) go on into the
    // zeros the journal wrote ahead of its frames: those calls are
    // answered, and on disk. The first that does not fit is refused, and
    // so is every one after it, which needs a fresh copy.
    let request = vec![b'x'; 60 << 10];
    let mut acked = 3;
    let mut failed = 0;
    for _ in 0..200 {
        let (status, body) = call_with(&ex.addr, "acme", &id, &request).unwrap();
        if status == 200 && failed == 0 {
            acked += 1;
            assert_eq!(parse_counter(&body).0, acked);
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(status, 507, "{v}");
        assert_eq!(v["error"]["code"], "checkpoint_failed");
        failed += 1;
        if failed == 3 {
            break;
        }
    }
    assert_eq!(failed, 3, "the full disk refuses strict calls");
    // Another tenant, without durability, is unaffected.
    assert_eq!(count(&ex, "acme-none", &other), 1);

    // Killed while the disk is full: what was answered is intact.
    let _ = ex.child.kill();
    let _ = ex.child.wait();
    std::fs::remove_file(&filler).unwrap();
    ex.restart();
    assert_eq!(
        count(&ex, "acme", &id),
        acked + 1,
        "after {failed} failed calls"
    );

    // Room again: checkpoints go on.
    for n in acked + 2..=acked + 3 {
        assert_eq!(count(&ex, "acme", &id), n);
    }
    ex.restart();
    assert_eq!(count(&ex, "acme", &id), acked + 4);
}

/// Job `id` of tenant `acme` as its executor reports it.
fn job(ex: &ExecutorProcess, id: &str) -> serde_json::Value {
    job_of(ex, "acme", id)
}

/// Waits until job `id` of tenant `acme` has `status`.
fn wait_job(ex: &ExecutorProcess, id: &str, status: &str) -> serde_json::Value {
    wait_job_of(ex, "acme", id, status)
}

/// Async jobs across a SIGKILL: accepted ones are on disk before their
/// 202; a finished one keeps its result, a waiting one runs after the
/// restart, and the one running at the kill is failed `job_interrupted`
/// (not run twice).
#[test]
fn jobs_accepted_before_a_sigkill_finish_or_fail_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let mut ex = ExecutorProcess::start("cpu-jobs", dir.path());
    let id = register_on(
        &ex,
        "acme",
        "spinner",
        &wat::parse_str(SPINNER).unwrap(),
        r#"{"deadline_ms": 120000}"#,
    );
    let submit = |ex: &ExecutorProcess, first: u8| submit_job(ex, "acme", &id, first);
    let finished = submit(&ex, 0);
    let done = wait_job(&ex, &finished, "succeeded");
    let running = submit(&ex, 1);
    wait_job(&ex, &running, "running");
    // Waits for the one instance the spinning job holds.
    let waiting = submit(&ex, 0);
    assert_eq!(job(&ex, &waiting)["status"], "pending");

    ex.restart(); // SIGKILL, then the same state directory

    assert_eq!(job(&ex, &finished), done, "a finished job keeps its result");
    let interrupted = job(&ex, &running);
    assert_eq!(interrupted["status"], "failed", "{interrupted}");
    assert_eq!(interrupted["error"]["code"], "job_interrupted");
    wait_job(&ex, &waiting, "succeeded");
    // And a cancelled job stays cancelled across a kill.
    let spin = submit(&ex, 1);
    wait_job(&ex, &spin, "running");
    let queued = submit(&ex, 0);
    let (status, _) = ex.request("DELETE", &format!("/jobs/{queued}"), Some("acme"), "", b"");
    assert_eq!(status, 204);
    ex.restart();
    let (status, _) = ex.request("GET", &format!("/jobs/{queued}"), Some("acme"), "", b"");
    assert_eq!(status, 404, "cancelled before the kill");
}

/// A tenant that moved here is on this executor's disk before it is
/// published here: killed the moment the move is over, the executor
/// resumes it with the state it brought, `strict` or `periodic` (its
/// source's journal went with the move).
#[test]
fn an_executor_killed_right_after_a_tenant_arrived_resumes_it() {
    let mut fleet = TestFleet::start(2, ProxyOptions::default());
    let wasm = wat::parse_str(COUNTER).unwrap();
    let mut ids = Vec::new();
    for (tenant, durability) in [("acme", "strict"), ("beta", "periodic")] {
        let config = format!(r#"{{"durability": "{durability}"}}"#);
        let (ct, body) = multipart(&[
            ("module", "application/wasm", &wasm),
            ("config", "application/json", config.as_bytes()),
        ]);
        let r = fleet.proxy.api.call(
            "POST",
            "/functions?name=counter",
            &[("authorization", &format!("Bearer tok-{tenant}"))],
            Some((&ct, &body)),
        );
        assert_eq!(r.status, 201, "{}", r.text());
        let id = r.json()["id"].as_str().unwrap().to_string();
        assert_eq!(fleet.proxy.migrate(tenant, "cpu0").status, 200);
        for n in 1..=3 {
            let r = fleet.count(&format!("tok-{tenant}"), &id);
            assert_eq!((r.status, parse_counter(&r.body).0), (200, n), "{tenant}");
        }
        ids.push((tenant, id));
    }
    for (tenant, id) in &ids {
        let r = fleet.proxy.migrate(tenant, "cpu1");
        assert_eq!(r.status, 200, "{}", r.text());
        fleet.executor_mut("cpu1").restart();
        let r = fleet.count(&format!("tok-{tenant}"), id);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            parse_counter(&r.body),
            (4, vec![4.0; 4]),
            "{tenant}: the state it brought, device tensor included"
        );
        assert_eq!(fleet.proxy.placement(tenant).as_deref(), Some("cpu1"));
    }
}

/// Warm state loaded at start (after a graceful stop) is in the tenants'
/// journals before the executor answers, and its file goes only then:
/// killed right after it is ready, the executor resumes each tenant from
/// there, `strict` or `periodic`.
#[test]
fn warm_state_loaded_at_start_survives_a_kill_right_after() {
    let dir = tempfile::tempdir().unwrap();
    let ex = ExecutorProcess::start("cpu-w", dir.path());
    let ids: Vec<(&str, String)> = [("acme", "strict"), ("beta", "periodic")]
        .into_iter()
        .map(|(tenant, durability)| {
            let id = deploy(&ex, tenant, &format!(r#"{{"durability": "{durability}"}}"#));
            for n in 1..=3 {
                assert_eq!(count(&ex, tenant, &id), n, "{tenant}");
            }
            (tenant, id)
        })
        .collect();
    ex.stop();
    let mut ex = ExecutorProcess::start("cpu-w", dir.path());
    let warm = dir.path().join("warm");
    assert_eq!(
        std::fs::read_dir(&warm).map_or(0, |d| d.count()),
        0,
        "the warm-state files went once the journals had them"
    );
    ex.restart();
    for (tenant, id) in &ids {
        assert_eq!(count(&ex, tenant, id), 4, "{tenant}: the warm state it had");
    }
    assert!(
        ex.log_text()
            .contains("tenant resumed from its checkpoints"),
        "{}",
        ex.log_text()
    );
}

/// A tenant's state given by a snapshot is in the journal before the
/// snapshot is answered for, and takes the place of what the journal
/// held: killed right after a restore (`import?replace=true`) or a plain
/// import, the executor resumes each tenant, `strict` or `periodic`, as
/// the snapshot left it, not as it was before.
#[test]
fn a_restored_or_imported_tenant_survives_a_kill_right_after() {
    let dir = tempfile::tempdir().unwrap();
    let mut ex = ExecutorProcess::start("cpu-r", &dir.path().join("a"));
    let mut other = ExecutorProcess::start("cpu-i", &dir.path().join("b"));
    let mut tenants = Vec::new();
    for (tenant, durability) in [("acme", "strict"), ("beta", "periodic")] {
        let id = deploy(&ex, tenant, &format!(r#"{{"durability": "{durability}"}}"#));
        for n in 1..=3 {
            assert_eq!(count(&ex, tenant, &id), n, "{tenant}");
        }
        let (status, snap) = ex.request(
            "POST",
            &format!("/internal/tenants/{tenant}/export"),
            None,
            "",
            b"",
        );
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&snap));
        let (status, body) = ex.request(
            "POST",
            &format!("/internal/tenants/{tenant}/thaw"),
            None,
            "",
            b"",
        );
        assert_eq!(status, 204, "{}", String::from_utf8_lossy(&body));
        // Past the snapshot, and checkpointed there.
        for n in 4..=6 {
            assert_eq!(count(&ex, tenant, &id), n, "{tenant}");
        }
        std::thread::sleep(Duration::from_millis(1500));
        tenants.push((tenant, id, snap));
    }
    for (tenant, _, snap) in &tenants {
        for (target, path) in [
            (
                &ex,
                format!("/internal/tenants/{tenant}/import?replace=true"),
            ),
            (&other, format!("/internal/tenants/{tenant}/import")),
        ] {
            let (status, body) =
                target.request("POST", &path, None, "application/octet-stream", snap);
            assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
        }
    }
    ex.restart();
    other.restart();
    for (tenant, id, _) in &tenants {
        assert_eq!(count(&ex, tenant, id), 4, "{tenant}: restored, then killed");
        assert_eq!(
            count(&other, tenant, id),
            4,
            "{tenant}: imported, then killed"
        );
    }
    // Nothing of the swap is left beside the journals.
    let left: Vec<String> = std::fs::read_dir(dir.path().join("a").join("durable"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains('.'))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
