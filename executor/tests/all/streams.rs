//! Streamed invocations (`docs/API.md`, "Streaming"), read with a standard
//! SSE parser (`eventsource-stream`), against `examples/wat/streaming.wat`.

use std::io::Read;
use std::time::Duration;

use eventsource_stream::{Event, Eventsource};
use tensor_wasm_executor::config::TenantQuotas;

use crate::harness::{TOKEN, TestExecutor, small_limits};

const STREAMING: &str = include_str!("../../../examples/wat/streaming.wat");

/// `'n'` and a count: that many chunks, then a tensor.
fn chunks(n: u32) -> Vec<u8> {
    let mut body = vec![b'n'];
    body.extend(n.to_le_bytes());
    body
}

fn deploy(ex: &TestExecutor, config: &str) -> String {
    let wasm = wat::parse_str(STREAMING).unwrap();
    let r = ex.register_with_config("acme", "streaming", &wasm, config);
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["id"].as_str().unwrap().to_string()
}

/// Starts an invocation of `id` with `accept`; the answer, unread.
fn open(
    ex: &TestExecutor,
    id: &str,
    accept: &str,
    body: &[u8],
) -> ureq::http::Response<ureq::Body> {
    ex.raw_agent()
        .post(ex.url(&format!("/functions/{id}/invoke")))
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("x-tensor-wasm-tenant", "acme")
        .header("content-type", "application/octet-stream")
        .header("accept", accept)
        .send(body)
        .unwrap()
}

/// The events of an answer, each as the parser hands it over (it reads
/// the body as it arrives).
pub fn events(resp: ureq::http::Response<ureq::Body>) -> impl Iterator<Item = Event> {
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

/// The function's state: invocations run, cancellations seen.
fn state(ex: &TestExecutor, id: &str) -> (u32, u32) {
    let r = ex.post(
        "acme",
        &format!("/functions/{id}/invoke"),
        "application/octet-stream",
        b"s",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let b = &r.body;
    (
        u32::from_le_bytes(b[0..4].try_into().unwrap()),
        u32::from_le_bytes(b[4..8].try_into().unwrap()),
    )
}

/// Polls [`state`] until its cancellations reach `seen`.
fn wait_cancelled(ex: &TestExecutor, id: &str, seen: u32) -> (u32, u32) {
    let start = std::time::Instant::now();
    loop {
        let s = state(ex, id);
        if s.1 >= seen {
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "not cancelled: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn an_event_stream_carries_each_chunk_then_the_outcome() {
    let ex = TestExecutor::start();
    let id = deploy(&ex, "{}");
    let resp = open(&ex, &id, "text/event-stream", &chunks(3));
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let got: Vec<Event> = events(resp).collect();
    let kinds: Vec<&str> = got.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        kinds,
        ["text", "text", "text", "tensors", "end"],
        "{got:#?}"
    );
    for (i, e) in got[..3].iter().enumerate() {
        assert_eq!(e.data, format!("chunk {i}\n"));
        assert_eq!(e.id, i.to_string());
    }
    let t: serde_json::Value = serde_json::from_str(&got[3].data).unwrap();
    assert_eq!(
        t,
        serde_json::json!({"count": {"dtype": "i32", "shape": [1], "data": [3]}})
    );
    let end: serde_json::Value = serde_json::from_str(&got[4].data).unwrap();
    assert_eq!(end["chunks"], 4);
    assert_eq!(ex.metric(r#"tensor_wasm_streams_total{outcome="ok"}"#), 1.0);
}

#[test]
fn a_raw_stream_is_the_chunks_back_to_back_with_tensors_as_safetensors() {
    let ex = TestExecutor::start();
    let id = deploy(&ex, "{}");
    for accept in ["application/octet-stream", "*/*"] {
        let mut req = ex
            .raw_agent()
            .post(ex.url(&format!("/functions/{id}/invoke")))
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("x-tensor-wasm-tenant", "acme")
            .header("content-type", "application/octet-stream")
            .header("accept", accept);
        if accept == "*/*" {
            req = req.header("x-tensor-wasm-stream", "1");
        }
        let mut resp = req.send(&chunks(2)[..]).unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.body_mut().read_to_vec().unwrap();
        let text = b"chunk 0\nchunk 1\n";
        assert_eq!(&body[..text.len()], text, "{accept}");
        let doc = safetensors::SafeTensors::deserialize(&body[text.len()..]).unwrap();
        let count = doc.tensor("count").unwrap();
        assert_eq!(count.dtype(), safetensors::Dtype::I32);
        assert_eq!(count.data(), 2i32.to_le_bytes());
    }
}

#[test]
fn unstreamed_the_chunks_join_the_one_answer() {
    let ex = TestExecutor::start();
    let id = deploy(&ex, "{}");
    let r = ex.post(
        "acme",
        &format!("/functions/{id}/invoke"),
        "application/octet-stream",
        &chunks(2),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["outputs"]["count"]["data"], serde_json::json!([2]));
    assert_eq!(
        j["raw_b64"], "Y2h1bmsgMApjaHVuayAxCg==",
        "chunk 0\\nchunk 1\\n"
    );
}

#[test]
fn the_first_chunk_arrives_while_the_guest_runs_and_leaving_cancels_it_warm() {
    let ex = TestExecutor::start();
    let id = deploy(&ex, r#"{"deadline_ms": 60000}"#);
    for round in 1..=2u32 {
        let resp = open(&ex, &id, "text/event-stream", b"w");
        let mut got = events(resp);
        // The guest sent this, and now waits for its client to leave: it
        // is running.
        let first = got.next().unwrap();
        assert_eq!(
            (first.event.as_str(), first.data.as_str()),
            ("text", "first\n")
        );
        drop(got);
        // It sees the cancellation and returns normally: same instance,
        // state kept (each round adds its call and a state query).
        let (calls, seen) = wait_cancelled(&ex, &id, round);
        assert_eq!(seen, round);
        assert!(calls >= 2 * round, "{calls}");
    }
    ex.wait_metric(r#"tensor_wasm_streams_total{outcome="client_gone"}"#, 2.0);
}

#[test]
fn a_guest_that_ignores_cancellation_ends_at_its_deadline_with_an_error_event() {
    let ex = TestExecutor::start();
    let id = deploy(&ex, r#"{"deadline_ms": 1000}"#);
    // A warm instance, so that the first chunk comes well within the
    // deadline however slow the machine.
    assert_eq!(state(&ex, &id), (1, 0));
    let got: Vec<Event> = events(open(&ex, &id, "text/event-stream", b"i")).collect();
    let kinds: Vec<&str> = got.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(kinds, ["text", "error"], "{got:#?}");
    let err: serde_json::Value = serde_json::from_str(&got[1].data).unwrap();
    assert_eq!(err["error"]["code"], "deadline_exceeded", "{err}");
    // Its instance was stopped: the next one starts afresh.
    assert_eq!(state(&ex, &id), (1, 0));
}

#[test]
fn a_stream_idle_past_its_timeout_ends_and_cancels_its_guest() {
    let dir = tempfile::tempdir().unwrap();
    let limits = tensor_wasm_executor::config::EngineLimits {
        stream_idle_timeout: Duration::from_millis(1000),
        ..small_limits()
    };
    let ex = TestExecutor::start_in(dir.path(), limits, TenantQuotas::default());
    let id = deploy(&ex, r#"{"deadline_ms": 60000}"#);
    // A warm instance: the first chunk comes well within the idle timeout.
    assert_eq!(state(&ex, &id), (1, 0));
    let got: Vec<Event> = events(open(&ex, &id, "text/event-stream", b"w")).collect();
    let kinds: Vec<&str> = got.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(kinds, ["text", "error"], "{got:#?}");
    let err: serde_json::Value = serde_json::from_str(&got[1].data).unwrap();
    assert_eq!(err["error"]["code"], "deadline_exceeded", "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("idle-chunk"),
        "{err}"
    );
    // The guest saw the stream end as a cancellation, and lives on.
    assert_eq!(wait_cancelled(&ex, &id, 1).1, 1);
    assert_eq!(
        ex.metric(r#"tensor_wasm_streams_total{outcome="idle"}"#),
        1.0
    );
}

#[test]
fn a_stream_that_fails_before_its_first_chunk_is_answered_as_an_error() {
    let ex = TestExecutor::start();
    let resp = ex
        .raw_agent()
        .post(ex.url("/functions/nope/invoke"))
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("x-tensor-wasm-tenant", "acme")
        .header("accept", "text/event-stream")
        .send(&b"n"[..])
        .unwrap();
    let r = crate::harness::Reply::from(resp);
    assert_eq!(r.status, 404);
    assert_eq!(r.code(), "function_not_found");
}
