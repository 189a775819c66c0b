//! The example functions of `examples/`, as built by `scripts/build-examples`
//! into `target/examples-wasm/`, deployed and invoked as a user would:
//! the Rust SDK's MLP against the numpy reference its training script
//! wrote, the stateful running mean across calls and a migration, and the
//! hand-written WAT module.
//!
//! A test whose module is missing is skipped with a message, unless
//! `TENSOR_WASM_REQUIRE_EXAMPLES` is set (as `scripts/test` does), which
//! makes it a failure: CI cannot pass without building the examples.

use std::path::{Path, PathBuf};

use crate::harness::{Reply, TestExecutor, f32_inputs, f32_output};

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// The bytes of `target/examples-wasm/<file>`, or `None` (with a message)
/// when it has not been built and the examples are not required.
fn built_example(file: &str) -> Option<Vec<u8>> {
    let path: PathBuf = repo_root().join("target/examples-wasm").join(file);
    match std::fs::read(&path) {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            let required = std::env::var_os("TENSOR_WASM_REQUIRE_EXAMPLES")
                .is_some_and(|v| !v.is_empty() && v != "0");
            assert!(
                !required,
                "{}: {e}; run scripts/build-examples (TENSOR_WASM_REQUIRE_EXAMPLES is set)",
                path.display()
            );
            eprintln!(
                "skipping: {} is missing ({e}); run scripts/build-examples to test the examples",
                path.display()
            );
            None
        }
    }
}

/// A committed file of an example's source folder.
fn example_file(example: &str, file: &str) -> Vec<u8> {
    let path = repo_root().join("examples").join(example).join(file);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn example_json(example: &str, file: &str) -> serde_json::Value {
    serde_json::from_slice(&example_file(example, file)).unwrap()
}

/// Registers a binary module with optional safetensors assets; returns the
/// function id.
fn deploy_wasm(ex: &TestExecutor, tenant: &str, name: &str, wasm: &[u8], assets: &[u8]) -> String {
    let mut body = Vec::new();
    let mut part = |field: &str, data: &[u8]| {
        body.extend_from_slice(
            format!("--XX\r\nContent-Disposition: form-data; name=\"{field}\"\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    };
    part("module", wasm);
    if !assets.is_empty() {
        part("assets", assets);
    }
    body.extend_from_slice(b"--XX--\r\n");
    let r = ex.post(
        tenant,
        &format!("/functions?name={name}"),
        "multipart/form-data; boundary=XX",
        &body,
    );
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["id"].as_str().unwrap().to_string()
}

fn invoke(ex: &TestExecutor, tenant: &str, id: &str, body: &[u8]) -> Reply {
    ex.post(
        tenant,
        &format!("/functions/{id}/invoke"),
        "application/json",
        body,
    )
}

fn i64_output(reply: &Reply, name: &str) -> Vec<i64> {
    let v = reply.json();
    assert_eq!(v["outputs"][name]["dtype"], "i64", "{}", reply.text());
    v["outputs"][name]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

/// The held-out samples of `mlp-digits/heldout.json`, row-major, and how
/// many there are.
fn heldout_x(heldout: &serde_json::Value) -> (Vec<f32>, usize) {
    let rows = heldout["x"].as_array().unwrap();
    let x = rows
        .iter()
        .flat_map(|row| row.as_array().unwrap())
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    (x, rows.len())
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "{what}[{i}]: got {g}, want {w}");
    }
}

#[test]
fn the_mlp_matches_its_numpy_reference() {
    let Some(wasm) = built_example("mlp-digits.wasm") else {
        return;
    };
    let weights = example_file("mlp-digits", "weights.safetensors");
    let heldout = example_json("mlp-digits", "heldout.json");
    let expected = example_json("mlp-digits", "expected.json");
    let (x, n) = heldout_x(&heldout);
    let truth: Vec<i64> = heldout["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    let want_labels: Vec<i64> = expected["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    let want_probs: Vec<f32> = expected["probs"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap())
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!((n, truth.len()), (want_labels.len(), n));

    let ex = TestExecutor::start();
    let id = deploy_wasm(&ex, "t1", "digits", &wasm, &weights);
    let r = invoke(&ex, "t1", &id, &f32_inputs(&[("x", &[n as u64, 64], &x)]));
    assert_eq!(r.status, 200, "{}", r.text());
    let labels = i64_output(&r, "labels");
    assert_eq!(labels, want_labels, "labels differ from numpy's");
    assert_eq!(
        r.json()["outputs"]["probs"]["shape"],
        serde_json::json!([n, 10])
    );
    assert_close(&f32_output(&r, "probs"), &want_probs, 1e-4, "probs");
    let correct = labels.iter().zip(&truth).filter(|(a, b)| a == b).count();
    let accuracy = correct as f64 / n as f64;
    let want_accuracy = expected["accuracy"].as_f64().unwrap();
    assert!(
        (accuracy - want_accuracy).abs() < 1e-9,
        "accuracy {accuracy}, training reported {want_accuracy}"
    );
    assert!(accuracy > 0.9, "a trained model, not a guess: {accuracy}");

    // One sample as a 1-D input, and a bad request refused with the
    // guest's own message.
    let r = invoke(&ex, "t1", &id, &f32_inputs(&[("x", &[64], &x[64..128])]));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(i64_output(&r, "labels"), vec![want_labels[1]]);
    let r = invoke(&ex, "t1", &id, &f32_inputs(&[("x", &[2, 32], &x[..64])]));
    assert_eq!(
        (r.status, r.code().as_str()),
        (500, "function_error"),
        "{}",
        r.text()
    );
    assert!(r.text().contains("x must be [n, 64]"), "{}", r.text());
    // A missing input: the ABI's error and the host's message, through the
    // SDK's Error.
    let r = invoke(&ex, "t1", &id, &f32_inputs(&[("y", &[64], &x[..64])]));
    assert_eq!(r.code(), "function_error", "{}", r.text());
    assert!(r.text().contains("name not found (-6)"), "{}", r.text());
    assert!(r.text().contains("no input named"), "{}", r.text());
}

/// One call of the running mean: (mean, count).
fn running_mean(ex: &TestExecutor, id: &str, shape: &[u64], x: &[f32]) -> (Vec<f32>, i64) {
    let r = invoke(ex, "t1", id, &f32_inputs(&[("x", shape, x)]));
    assert_eq!(r.status, 200, "{}", r.text());
    let count = i64_output(&r, "count");
    (f32_output(&r, "mean"), count[0])
}

#[test]
fn the_running_mean_keeps_state_across_calls_and_a_migration() {
    let Some(wasm) = built_example("running-mean.wasm") else {
        return;
    };
    let a = TestExecutor::start();
    let b = TestExecutor::start();
    let id = deploy_wasm(&a, "t1", "mean", &wasm, &[]);

    let (mean, count) = running_mean(&a, &id, &[3], &[1.0, 2.0, 3.0]);
    assert_close(&mean, &[1.0, 2.0, 3.0], 1e-6, "mean after 1");
    assert_eq!(count, 1);
    let (mean, count) = running_mean(&a, &id, &[2, 3], &[3.0, 4.0, 5.0, 5.0, 6.0, 7.0]);
    assert_close(&mean, &[3.0, 4.0, 5.0], 1e-6, "mean after 3");
    assert_eq!(count, 3);
    // A sample of another width is refused and changes nothing.
    let r = invoke(&a, "t1", &id, &f32_inputs(&[("x", &[2], &[1.0, 1.0])]));
    assert_eq!(r.code(), "function_error", "{}", r.text());
    assert!(r.text().contains("samples have 3 values"), "{}", r.text());

    // Move the tenant: the count (linear memory) and the mean (a device
    // tensor whose handle is in linear memory) carry on on the importer.
    let snapshot = a.internal("POST", "/internal/tenants/t1/export", b"");
    assert_eq!(snapshot.status, 200, "{}", snapshot.text());
    let r = b.internal("POST", "/internal/tenants/t1/import", &snapshot.body);
    assert_eq!(r.status, 200, "{}", r.text());
    let (mean, count) = running_mean(&b, &id, &[3], &[7.0, 8.0, 9.0]);
    assert_close(&mean, &[4.0, 5.0, 6.0], 1e-6, "mean after the move");
    assert_eq!(count, 4);
    let (mean, count) = running_mean(&b, &id, &[1, 3], &[-16.0, -20.0, -24.0]);
    assert_close(&mean, &[0.0, 0.0, 0.0], 1e-6, "mean after 5");
    assert_eq!(count, 5);
}

#[test]
fn the_wat_example_scales_and_shifts() {
    let Some(text) = built_example("scale.wat") else {
        return;
    };
    let ex = TestExecutor::start();
    let id = ex.deploy("t1", "scale", std::str::from_utf8(&text).unwrap());
    let r = invoke(
        &ex,
        "t1",
        &id,
        &f32_inputs(&[("x", &[2, 2], &[0.0, 1.0, 2.5, -4.0])]),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(f32_output(&r, "y"), vec![1.0, 3.0, 6.0, -7.0]);
    assert_eq!(r.json()["outputs"]["y"]["shape"], serde_json::json!([2, 2]));
    // Its error path hands the host's message on.
    let r = invoke(&ex, "t1", &id, &f32_inputs(&[("z", &[1], &[0.0])]));
    assert_eq!(r.code(), "function_error", "{}", r.text());
    assert!(r.text().contains("no input named"), "{}", r.text());
}

#[test]
fn the_char_model_streams_the_text_of_its_numpy_reference() {
    let Some(wasm) = built_example("char-model.wasm") else {
        return;
    };
    let weights = example_file("char-model", "weights.safetensors");
    let expected = example_json("char-model", "expected.json");
    let ex = TestExecutor::start();
    let id = deploy_wasm(&ex, "t1", "chars", &wasm, &weights);
    let cases = expected["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let (steps, prompt) = (
            case["steps"].as_u64().unwrap(),
            case["prompt"].as_str().unwrap(),
        );
        let want = case["text"].as_str().unwrap();
        let body = format!("{steps}\n{prompt}");
        // As events: a character per chunk, as it is chosen.
        let resp = ex
            .raw_agent()
            .post(ex.url(&format!("/functions/{id}/invoke")))
            .header("authorization", format!("Bearer {}", crate::harness::TOKEN))
            .header("x-tensor-wasm-tenant", "t1")
            .header("content-type", "text/plain")
            .header("accept", "text/event-stream")
            .send(body.as_bytes())
            .unwrap();
        assert_eq!(resp.status(), 200);
        let events: Vec<_> = crate::streams::events(resp).collect();
        let chunks: Vec<&str> = events
            .iter()
            .filter(|e| e.event == "text")
            .map(|e| e.data.as_str())
            .collect();
        assert_eq!(
            chunks.len() as u64,
            steps,
            "{prompt:?}: one chunk per character"
        );
        assert_eq!(
            chunks.concat(),
            want,
            "{prompt:?}: streamed text differs from numpy's"
        );
        assert_eq!(events.last().unwrap().event, "end");
        // Unstreamed: the whole text as the raw answer.
        let r = ex.post(
            "t1",
            &format!("/functions/{id}/invoke"),
            "text/plain",
            body.as_bytes(),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), want, "{prompt:?}: unstreamed");
    }
    // A character outside the vocabulary is the function's clear error.
    let r = ex.post(
        "t1",
        &format!("/functions/{id}/invoke"),
        "text/plain",
        "5\nA tensor is ~".as_bytes(),
    );
    assert_eq!(r.code(), "function_error", "{}", r.text());
    assert!(r.text().contains("vocabulary"), "{}", r.text());
}

#[test]
fn the_c_mlp_answers_like_its_rust_twin() {
    let (Some(c), Some(rust)) = (
        built_example("c-mlp-digits.wasm"),
        built_example("mlp-digits.wasm"),
    ) else {
        return;
    };
    let weights = example_file("mlp-digits", "weights.safetensors");
    let (x, n) = heldout_x(&example_json("mlp-digits", "heldout.json"));
    let n = n as u64;
    let ex = TestExecutor::start();
    let c_id = deploy_wasm(&ex, "t1", "digits-c", &c, &weights);
    let rust_id = deploy_wasm(&ex, "t1", "digits-rust", &rust, &weights);
    // Twice: the C function frees the tensors it makes, so the host
    // memory its tenant holds is the same after each round.
    let mut held = Vec::new();
    for _ in 0..2 {
        let body = f32_inputs(&[("x", &[n, 64], &x)]);
        let from_c = invoke(&ex, "t1", &c_id, &body);
        let from_rust = invoke(&ex, "t1", &rust_id, &body);
        held.push(ex.metric("tensor_wasm_host_memory_bytes"));
        assert_eq!(from_c.status, 200, "{}", from_c.text());
        assert_eq!(
            from_c.json(),
            from_rust.json(),
            "the same ops, the same answer"
        );
        // One sample, [64], is reshaped as in Rust.
        let one = f32_inputs(&[("x", &[64], &x[..64])]);
        assert_eq!(
            invoke(&ex, "t1", &c_id, &one).json(),
            invoke(&ex, "t1", &rust_id, &one).json()
        );
    }
    assert_eq!(held[0], held[1], "nothing kept from call to call");
    // Bad input is the function's clear error, as in Rust.
    let bad = f32_inputs(&[("x", &[3], &[1.0, 2.0, 3.0])]);
    let r = invoke(&ex, "t1", &c_id, &bad);
    assert_eq!(r.code(), "function_error", "{}", r.text());
    assert!(r.text().contains("[n, 64]"), "{}", r.text());
}
