//! Streamed invocations through the proxy (`docs/API.md`, "Streaming"),
//! read with a standard SSE parser (`eventsource-stream`), against
//! `examples/wat/streaming.wat`: chunks arrive while the guest runs, a
//! client that leaves cancels the guest, a migration waits for an open
//! stream and then refuses without cutting it, and `tensor-wasm invoke
//! --stream` prints chunks as they come.

use std::io::Read;
use std::process::Command;
use std::time::{Duration, Instant};

use eventsource_stream::{Event, Eventsource};

use crate::harness::{ProxyOptions, TestFleet, multipart};

const STREAMING: &str = include_str!("../../../examples/wat/streaming.wat");

/// Two executors behind a proxy that holds a moving tenant's requests for
/// at most a second.
fn two_executors_holding_a_second() -> TestFleet {
    TestFleet::start(
        2,
        ProxyOptions {
            extra_args: vec!["--queue-deadline-ms".into(), "1000".into()],
            ..ProxyOptions::default()
        },
    )
}

fn deploy(fleet: &TestFleet) -> String {
    let wasm = wat::parse_str(STREAMING).unwrap();
    let (ct, body) = multipart(&[
        ("module", "application/wasm", &wasm),
        ("config", "application/json", br#"{"deadline_ms": 60000}"#),
    ]);
    let r = fleet.proxy.call(
        "tok-acme",
        "POST",
        "/functions?name=streaming",
        Some((&ct, &body)),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["id"].as_str().unwrap().to_string()
}

/// `'n'` and a count: that many chunks, then a tensor.
fn chunks(n: u32) -> Vec<u8> {
    let mut body = vec![b'n'];
    body.extend(n.to_le_bytes());
    body
}

/// Opens an event stream of `id` through the proxy; its events, parsed as
/// the body arrives.
fn open(fleet: &TestFleet, id: &str, body: &[u8]) -> impl Iterator<Item = Event> + use<> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();
    let resp = agent
        .post(format!("{}/functions/{id}/invoke", fleet.proxy.api.base))
        .header("authorization", "Bearer tok-acme")
        .header("content-type", "application/octet-stream")
        .header("accept", "text/event-stream")
        .send(body)
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut reader = resp.into_body().into_reader();
    let bytes = futures::stream::iter(std::iter::from_fn(move || {
        let mut buf = vec![0u8; 8192];
        match reader.read(&mut buf) {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some(Ok::<_, std::io::Error>(buf))
            }
            Err(e) => Some(Err(e)),
        }
    }));
    futures::executor::block_on_stream(bytes.eventsource()).map(|e| e.expect("a well-formed event"))
}

/// The function's state through the proxy: invocations, cancellations.
fn state(fleet: &TestFleet, id: &str) -> (u32, u32) {
    let r = fleet.proxy.call(
        "tok-acme",
        "POST",
        &format!("/functions/{id}/invoke"),
        Some(("application/octet-stream", b"s")),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let b = &r.body;
    (
        u32::from_le_bytes(b[0..4].try_into().unwrap()),
        u32::from_le_bytes(b[4..8].try_into().unwrap()),
    )
}

fn wait_cancelled(fleet: &TestFleet, id: &str, seen: u32) {
    let start = Instant::now();
    while state(fleet, id).1 < seen {
        assert!(start.elapsed() < Duration::from_secs(30), "not cancelled");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The proxy's `tensor_wasm_http_streams_total{outcome}`.
fn streams(fleet: &TestFleet, outcome: &str) -> f64 {
    let m = fleet.proxy.admin.call("GET", "/metrics", &[], None).text();
    let series = format!("tensor_wasm_http_streams_total{{outcome=\"{outcome}\"}} ");
    m.lines()
        .find_map(|l| l.strip_prefix(&series)?.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn a_stream_through_the_proxy_arrives_while_the_guest_runs_and_leaving_cancels_it() {
    let audit = tempfile::NamedTempFile::new().unwrap();
    let fleet = TestFleet::start(
        1,
        ProxyOptions {
            audit_log: Some(audit.path().to_path_buf()),
            ..ProxyOptions::default()
        },
    );
    let id = deploy(&fleet);

    let got: Vec<Event> = open(&fleet, &id, &chunks(5)).collect();
    let kinds: Vec<&str> = got.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        kinds,
        ["text", "text", "text", "text", "text", "tensors", "end"],
        "{got:#?}"
    );
    assert_eq!(got[4].data, "chunk 4\n");

    // The guest sends its first chunk, then waits for its client to go:
    // the chunk came through the proxy while the guest ran.
    let mut live = open(&fleet, &id, b"w");
    let first = live.next().unwrap();
    assert_eq!(
        (first.event.as_str(), first.data.as_str()),
        ("text", "first\n")
    );
    drop(live);
    // The proxy's client left, so the executor's request was cancelled and
    // the guest returned normally: its state is kept.
    wait_cancelled(&fleet, &id, 1);
    let (calls, seen) = state(&fleet, &id);
    assert_eq!(seen, 1);
    assert!(calls >= 4, "the same instance throughout: {calls} calls");

    let start = Instant::now();
    while streams(&fleet, "client_gone") < 1.0 {
        assert!(start.elapsed() < Duration::from_secs(30), "never counted");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(streams(&fleet, "ok"), 1.0);
    // The audit log (written out on a period) says how each stream ended.
    let start = Instant::now();
    loop {
        let records: Vec<serde_json::Value> = std::fs::read_to_string(audit.path())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let ends: Vec<&str> = records
            .iter()
            .filter_map(|r| r["stream"]["outcome"].as_str())
            .collect();
        if ends.len() == 2 {
            assert_eq!(ends, ["ok", "client_gone"], "{records:#?}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{records:#?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_migration_waits_for_an_open_stream_then_refuses_without_cutting_it() {
    let fleet = two_executors_holding_a_second();
    let id = deploy(&fleet);
    let home = fleet.proxy.placement("acme").unwrap();
    let away = if home == "cpu0" { "cpu1" } else { "cpu0" };
    let mut live = open(&fleet, &id, b"w");
    assert_eq!(live.next().unwrap().data, "first\n");

    let r = fleet.proxy.migrate("acme", away);
    assert_eq!(r.code(), "deadline_exceeded", "{}", r.text());
    assert!(r.text().contains("the move was undone"), "{}", r.text());
    assert_eq!(
        fleet.proxy.placement("acme").as_deref(),
        Some(home.as_str())
    );
    // The stream was not cut: it is open until its client leaves.
    assert_eq!(streams(&fleet, "cut"), 0.0);
    drop(live);
    wait_cancelled(&fleet, &id, 1);

    // With no stream open, the move goes through and streams go on there.
    let r = fleet.proxy.migrate("acme", away);
    assert_eq!(r.status, 200, "{}", r.text());
    let got: Vec<Event> = open(&fleet, &id, &chunks(2)).collect();
    assert_eq!(got.last().unwrap().event, "end", "{got:#?}");
    assert_eq!(state(&fleet, &id).1, 1, "the state moved with the tenant");
}

#[test]
fn a_drain_tries_a_move_again_once_an_open_stream_ends() {
    let fleet = two_executors_holding_a_second();
    let id = deploy(&fleet);
    let home = fleet.proxy.placement("acme").unwrap();
    let mut live = open(&fleet, &id, b"w");
    assert_eq!(live.next().unwrap().data, "first\n");
    // The client leaves while the drain waits on its stream (or between
    // its tries); either way no move is refused for good.
    let leaving = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        drop(live);
    });
    let r = fleet
        .proxy
        .admin("POST", &format!("/admin/executors/{home}/drain"), None);
    leaving.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_ne!(fleet.proxy.placement("acme").unwrap(), home);
    wait_cancelled(&fleet, &id, 1);
}

#[test]
fn invoke_stream_prints_each_chunk_as_it_comes() {
    let fleet = TestFleet::start(1, ProxyOptions::default());
    let id = deploy(&fleet);
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("body.bin");
    std::fs::write(&body, chunks(3)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tensor-wasm"))
        .args(["invoke", &id, "--stream", "--raw"])
        .arg(&body)
        .args(["--url", &fleet.proxy.api.base, "--token", "tok-acme"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "chunk 0\nchunk 1\nchunk 2\n{\"count\":{\"dtype\":\"i32\",\"shape\":[1],\"data\":[3]}}\n"
    );
}
