//! The client and operator commands as a user runs them: the real
//! `tensor-wasm` binary against a real fleet (a proxy before CPU
//! executors), tokens and URLs in the environment, files in a scratch
//! directory — deploy, functions, invoke with .npy/.safetensors/JSON
//! inputs, async jobs, snapshots, executors, migrate, observe,
//! completions, and the error paths a user meets first.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Value, json};

use crate::harness::{
    ADMIN_TOKEN, COUNTER, ProxyOptions, TestFleet, parse_counter, test_certificates,
};

/// Variables of the client commands, cleared so the caller's own shell
/// cannot leak into a test.
const CLIENT_ENV: [&str; 8] = [
    "TENSOR_WASM_URL",
    "TENSOR_WASM_TOKEN",
    "TENSOR_WASM_ADMIN_URL",
    "TENSOR_WASM_ADMIN_TOKEN",
    "TENSOR_WASM_STATE_DIR",
    "TENSOR_WASM_SNAPSHOT_KEY",
    "TENSOR_WASM_CA_CERT",
    "TENSOR_WASM_TIMEOUT_SECS",
];

/// One finished command.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: Vec<u8>,
    stderr: String,
}

impl Run {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Asserts success; the stdout.
    fn ok(&self) -> String {
        assert_eq!(
            self.code,
            0,
            "stderr: {}\nstdout: {}",
            self.stderr,
            self.text()
        );
        self.text()
    }

    /// Asserts success; the stdout as JSON.
    fn json(&self) -> Value {
        let text = self.ok();
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    }

    /// Asserts failure; the stderr.
    fn fails(&self) -> &str {
        assert_ne!(self.code, 0, "expected a failure; stdout: {}", self.text());
        assert!(self.stderr.contains("error: "), "{}", self.stderr);
        &self.stderr
    }
}

/// Runs `tensor-wasm` in a scratch directory with a given environment.
struct Client {
    dir: PathBuf,
    env: Vec<(String, String)>,
}

impl Client {
    /// A client of `fleet` acting with `token`, in `dir`.
    fn new(fleet: &TestFleet, token: &str, dir: &Path) -> Client {
        Client {
            dir: dir.to_path_buf(),
            env: vec![
                ("TENSOR_WASM_URL".into(), fleet.proxy.api.base.clone()),
                (
                    "TENSOR_WASM_ADMIN_URL".into(),
                    fleet.proxy.admin.base.clone(),
                ),
                ("TENSOR_WASM_TOKEN".into(), token.into()),
                ("TENSOR_WASM_ADMIN_TOKEN".into(), ADMIN_TOKEN.into()),
                (
                    "TENSOR_WASM_STATE_DIR".into(),
                    dir.join("no-state").display().to_string(),
                ),
            ],
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tensor-wasm"));
        cmd.args(args).current_dir(&self.dir);
        for k in CLIENT_ENV {
            cmd.env_remove(k);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    fn run(&self, args: &[&str]) -> Run {
        let out = self.command(args).output().expect("tensor-wasm runs");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: out.stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs with `input` on stdin.
    fn run_stdin(&self, args: &[&str], input: &[u8]) -> Run {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tensor-wasm runs");
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: out.stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

/// A `.npy` file (version 1.0) of `descr` elements.
fn npy(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let dims = match shape {
        [d] => format!("({d},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {dims}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The header text and the data of a `.npy` file.
fn read_npy(bytes: &[u8]) -> (String, Vec<u8>) {
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00", "a version 1.0 .npy file");
    let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    assert_eq!((10 + len) % 64, 0, "data aligned to 64 bytes");
    (
        String::from_utf8_lossy(&bytes[10..10 + len]).into_owned(),
        bytes[10 + len..].to_vec(),
    )
}

/// `outputs.<name>.data` of a printed answer, as f32.
fn output_data(answer: &Value, name: &str) -> Vec<f32> {
    answer["outputs"][name]["data"]
        .as_array()
        .unwrap_or_else(|| panic!("no output {name}: {answer}"))
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// `target/examples-wasm/<file>` when built; `None` with a message
/// otherwise, unless `TENSOR_WASM_REQUIRE_EXAMPLES` makes it a failure.
fn built_example(file: &str) -> Option<PathBuf> {
    let path = repo_root().join("target/examples-wasm").join(file);
    if path.exists() {
        return Some(path);
    }
    let required =
        std::env::var_os("TENSOR_WASM_REQUIRE_EXAMPLES").is_some_and(|v| !v.is_empty() && v != "0");
    assert!(
        !required,
        "{} is missing; run scripts/build-examples (TENSOR_WASM_REQUIRE_EXAMPLES is set)",
        path.display()
    );
    eprintln!(
        "skipping the digits example: {} is missing; run scripts/build-examples",
        path.display()
    );
    None
}

#[test]
fn deploy_invoke_and_follow_jobs_from_the_command_line() {
    let fleet = TestFleet::start(1, ProxyOptions::default());
    let scratch = tempfile::tempdir().unwrap();
    let c = Client::new(&fleet, "tok-acme", scratch.path());
    std::fs::write(c.path("counter.wasm"), wat::parse_str(COUNTER).unwrap()).unwrap();

    // Deploy: named after the file; a second deploy of the name is refused
    // with the API's code and the way out, which keeps the id.
    let counter = c.run(&["deploy", "counter.wasm", "--json"]).json();
    assert_eq!(counter["name"], "counter");
    assert_eq!(counter["sha256"].as_str().unwrap().len(), 64);
    assert!(
        counter["exports"]
            .as_array()
            .unwrap()
            .contains(&json!("handle"))
    );
    let counter_id = counter["id"].as_str().unwrap().to_string();
    let err = c.run(&["deploy", "counter.wasm"]).fails().to_string();
    assert!(err.contains("function_exists"), "{err}");
    assert!(err.contains("--replace"), "{err}");
    let again = c
        .run(&["deploy", "counter.wasm", "--replace", "--json"])
        .json();
    assert_eq!(again["id"], counter["id"]);
    // WAT text with a config: compiled here, sent as multipart.
    let scale_wat = repo_root().join("examples/wat/scale.wat");
    let scale = c
        .run(&[
            "deploy",
            scale_wat.to_str().unwrap(),
            "--name",
            "scale",
            "--config",
            r#"{"deadline_ms": 2000}"#,
            "--json",
        ])
        .json();
    assert_eq!(scale["config"]["deadline_ms"], 2000);
    let scale_id = scale["id"].as_str().unwrap().to_string();
    let table = c.run(&["deploy", "counter.wasm", "--replace"]).ok();
    assert!(
        table.contains(&counter_id) && table.contains("sha256"),
        "{table}"
    );

    // functions ls, as a table and as JSON; get; logs.
    let listed = c.run(&["functions", "ls", "--json"]).json();
    assert_eq!(listed["functions"].as_array().unwrap().len(), 2);
    let table = c.run(&["functions", "ls"]).ok();
    assert!(table.starts_with("ID "), "{table}");
    assert!(
        table.contains("scale") && table.contains(&counter_id),
        "{table}"
    );
    let got = c.run(&["functions", "get", &scale_id, "--json"]).json();
    assert_eq!(got["name"], "scale");
    c.run(&["functions", "logs", &scale_id]).ok();

    // A raw answer goes to stdout as bytes, or to --out.
    let r = c.run(&["invoke", &counter_id]);
    r.ok();
    assert_eq!(parse_counter(&r.stdout), (1, vec![1.0; 4]));
    let written = c.run(&["invoke", &counter_id, "--out", "raw.bin"]).ok();
    assert!(written.contains("raw.bin"), "{written}");
    let raw = std::fs::read(c.path("raw.bin")).unwrap();
    assert_eq!(parse_counter(&raw), (2, vec![2.0; 4]));

    // Tensor inputs: .npy, safetensors (one named, all of a file), JSON
    // from a file and from stdin. y = 2x + 1.
    let x = [0.0f32, 1.0, 2.5, -4.0];
    let want = [1.0f32, 3.0, 6.0, -7.0];
    std::fs::write(c.path("x.npy"), npy("<f4", &[2, 2], &f32_bytes(&x))).unwrap();
    let answer = c.run(&["invoke", &scale_id, "--input", "x=x.npy"]).json();
    assert_eq!(output_data(&answer, "y"), want);
    assert_eq!(answer["outputs"]["y"]["shape"], json!([2, 2]));
    assert_eq!(answer["outputs"]["y"]["dtype"], "f32");
    let data = f32_bytes(&x);
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4], &data).unwrap();
    std::fs::write(
        c.path("in.safetensors"),
        safetensors::serialize([("x", view)], None).unwrap(),
    )
    .unwrap();
    for args in [
        vec!["--safetensors", "in.safetensors"],
        vec!["-i", "in.safetensors"],
        vec!["-i", "x=in.safetensors"],
    ] {
        let mut all = vec!["invoke", scale_id.as_str()];
        all.extend(args);
        let answer = c.run(&all).json();
        assert_eq!(output_data(&answer, "y"), want, "{all:?}");
        assert_eq!(answer["outputs"]["y"]["shape"], json!([4]));
    }
    let body = json!({"inputs": {"x": {"dtype": "f32", "shape": [3], "data": [1, 2, 3]}}});
    std::fs::write(c.path("body.json"), body.to_string()).unwrap();
    let answer = c.run(&["invoke", &scale_id, "--json", "body.json"]).json();
    assert_eq!(output_data(&answer, "y"), [3.0, 5.0, 7.0]);
    let answer = c
        .run_stdin(
            &["invoke", &scale_id, "--json", "-"],
            body.to_string().as_bytes(),
        )
        .json();
    assert_eq!(output_data(&answer, "y"), [3.0, 5.0, 7.0]);

    // Outputs to files: one .npy per output in a directory, a safetensors
    // file, a single .npy.
    c.run(&["invoke", &scale_id, "-i", "x=x.npy", "--out", "outs/"])
        .ok();
    let (header, data) = read_npy(&std::fs::read(c.path("outs/y.npy")).unwrap());
    assert!(header.contains("'descr': '<f4'"), "{header}");
    assert!(header.contains("'shape': (2, 2)"), "{header}");
    assert_eq!(data, f32_bytes(&want));
    c.run(&["invoke", &scale_id, "-i", "x=x.npy", "-o", "y.safetensors"])
        .ok();
    let bytes = std::fs::read(c.path("y.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("y").unwrap().data(), f32_bytes(&want).as_slice());
    c.run(&["invoke", &scale_id, "-i", "x=x.npy", "-o", "y.npy"])
        .ok();
    assert_eq!(
        read_npy(&std::fs::read(c.path("y.npy")).unwrap()).1,
        f32_bytes(&want)
    );

    // Async: the job id alone, then followed to the end; or waited for.
    let job = c
        .run(&["invoke", &scale_id, "-i", "x=x.npy", "--async"])
        .ok()
        .trim()
        .to_string();
    assert!(
        !job.is_empty() && !job.contains(char::is_whitespace),
        "{job}"
    );
    let done = c.run(&["jobs", "get", &job, "--wait"]).json();
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(output_data(&done["result"], "y"), want);
    let answer = c
        .run(&["invoke", &scale_id, "-i", "x=x.npy", "--async", "--wait"])
        .json();
    assert_eq!(output_data(&answer, "y"), want);
    c.run(&[
        "invoke", &scale_id, "-i", "x=x.npy", "--async", "--wait", "-o", "job-out/",
    ])
    .ok();
    assert_eq!(
        read_npy(&std::fs::read(c.path("job-out/y.npy")).unwrap()).1,
        f32_bytes(&want)
    );
    let jobs = c.run(&["jobs", "ls", "--json"]).json();
    assert!(jobs["jobs"].as_array().unwrap().len() >= 3, "{jobs}");
    let done = c
        .run(&["jobs", "ls", "--status", "succeeded", "--json"])
        .json();
    assert!(
        done["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|j| j["status"] == "succeeded")
    );
    assert!(c.run(&["jobs", "ls"]).ok().contains(&job));

    // Errors carry the API's code: a guest's own failure, sync and async;
    // unknown ids.
    let err = c
        .run(&["invoke", &scale_id, "-i", "z=x.npy"])
        .fails()
        .to_string();
    assert!(err.contains("function_error"), "{err}");
    assert!(err.contains("no input named"), "{err}");
    let err = c
        .run(&["invoke", &scale_id, "-i", "z=x.npy", "--async", "--wait"])
        .fails()
        .to_string();
    assert!(
        err.contains("failed") && err.contains("function_error"),
        "{err}"
    );
    let err = c.run(&["invoke", "fn-does-not-exist"]).fails().to_string();
    assert!(err.contains("function_not_found"), "{err}");
    assert!(err.contains("HTTP 404"), "{err}");
    let err = c.run(&["jobs", "cancel", "job-nope"]).fails().to_string();
    assert!(err.contains("job_not_found"), "{err}");
    // Input files are checked before anything is sent.
    std::fs::write(c.path("x64.npy"), npy("<f8", &[1], &[0; 8])).unwrap();
    let err = c
        .run(&["invoke", &scale_id, "-i", "x=x64.npy"])
        .fails()
        .to_string();
    assert!(err.contains("<f8") && err.contains("np.float32"), "{err}");
    let err = c
        .run(&["invoke", &scale_id, "-i", "x.npy"])
        .fails()
        .to_string();
    assert!(err.contains("NAME=FILE"), "{err}");

    // functions rm: gone.
    assert!(
        c.run(&["functions", "rm", &counter_id])
            .ok()
            .contains("deleted")
    );
    let err = c
        .run(&["functions", "get", &counter_id])
        .fails()
        .to_string();
    assert!(err.contains("function_not_found"), "{err}");

    // The digits MLP with its weights, from .npy inputs, against the numpy
    // reference its training script wrote.
    let Some(wasm) = built_example("mlp-digits.wasm") else {
        return;
    };
    let example = repo_root().join("examples/mlp-digits");
    let weights = example.join("weights.safetensors");
    let digits = c
        .run(&[
            "deploy",
            wasm.to_str().unwrap(),
            "--assets",
            weights.to_str().unwrap(),
            "--name",
            "digits",
            "--json",
        ])
        .json();
    assert!(!digits["assets"].as_array().unwrap().is_empty(), "{digits}");
    let heldout: Value =
        serde_json::from_slice(&std::fs::read(example.join("heldout.json")).unwrap()).unwrap();
    let expected: Value =
        serde_json::from_slice(&std::fs::read(example.join("expected.json")).unwrap()).unwrap();
    let rows = heldout["x"].as_array().unwrap();
    let x: Vec<f32> = rows
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    std::fs::write(
        c.path("heldout.npy"),
        npy("<f4", &[rows.len(), 64], &f32_bytes(&x)),
    )
    .unwrap();
    let id = digits["id"].as_str().unwrap();
    c.run(&["invoke", id, "-i", "x=heldout.npy", "-o", "digits/"])
        .ok();
    let (header, labels) = read_npy(&std::fs::read(c.path("digits/labels.npy")).unwrap());
    assert!(header.contains("'descr': '<i8'"), "{header}");
    let labels: Vec<i64> = labels
        .chunks(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let want_labels: Vec<i64> = expected["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(labels, want_labels, "labels differ from numpy's");
    let (header, probs) = read_npy(&std::fs::read(c.path("digits/probs.npy")).unwrap());
    assert!(
        header.contains(&format!("'shape': ({}, 10)", rows.len())),
        "{header}"
    );
    let want_probs: Vec<f64> = expected["probs"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .map(|v| v.as_f64().unwrap())
        .collect();
    for (i, (got, want)) in probs
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
        .zip(&want_probs)
        .enumerate()
    {
        assert!((got - want).abs() <= 1e-4, "probs[{i}]: {got} vs {want}");
    }
    // The same as printed JSON, one sample.
    std::fs::write(c.path("one.npy"), npy("<f4", &[64], &f32_bytes(&x[..64]))).unwrap();
    let answer = c.run(&["invoke", id, "-i", "x=one.npy"]).json();
    assert_eq!(answer["outputs"]["labels"]["data"], json!([want_labels[0]]));
}

#[test]
fn operate_a_fleet_from_the_command_line() {
    let fleet = TestFleet::start(2, ProxyOptions::default());
    let scratch = tempfile::tempdir().unwrap();
    let c = Client::new(&fleet, "tok-acme", scratch.path());
    std::fs::write(c.path("counter.wasm"), wat::parse_str(COUNTER).unwrap()).unwrap();
    let id = c.run(&["deploy", "counter.wasm", "--json"]).json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let count = || {
        let r = c.run(&["invoke", &id]);
        r.ok();
        parse_counter(&r.stdout).0
    };
    assert_eq!(count(), 1);
    assert_eq!(count(), 2);

    // Snapshot: saved to a file while the tenant keeps running, listed,
    // inspected, and restored.
    let saved = c.run(&["snapshot", "save", "acme", "--dir", "snaps"]).ok();
    assert!(saved.starts_with("saved acme to "), "{saved}");
    let files: Vec<PathBuf> = std::fs::read_dir(c.path("snaps"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let file = files[0].display().to_string();
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    let stamp: u64 = name
        .strip_prefix("acme-")
        .and_then(|s| s.strip_suffix(".twsnap"))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("named <tenant>-<unix time>.twsnap: {name}"));
    assert!(stamp > 1_600_000_000, "{stamp}");
    assert_eq!(count(), 3);

    let listed = c
        .run(&["snapshot", "ls", "--dir", "snaps", "--json"])
        .json();
    let entry = &listed["snapshots"][0];
    assert_eq!(entry["file"], name.as_str());
    assert_eq!(entry["tenant"], "acme");
    assert_eq!(entry["taken_unix"], stamp);
    assert_eq!(entry["format_version"], 1);
    assert_eq!(entry["keyed"], false);
    assert!(entry["bytes"].as_u64().unwrap() > 96);
    let table = c.run(&["snapshot", "ls", "--dir", "snaps"]).ok();
    assert!(table.contains(&name) && table.contains("acme"), "{table}");

    let seen = c.run(&["snapshot", "inspect", &file, "--json"]).json();
    assert_eq!(seen["tenant"], "acme");
    assert_eq!(seen["format_version"], 1);
    assert_eq!(
        (seen["keyed"].clone(), seen["signature"].clone()),
        (json!(false), json!("none"))
    );
    assert_eq!(seen["functions"][0]["name"], "counter");
    assert_eq!(seen["functions"][0]["id"], id.as_str());
    // One warm instance holding the counter's 4-element f32 tensor.
    assert_eq!(seen["instances"], 1);
    assert_eq!(seen["tensors"], 1);
    assert_eq!(seen["tensor_bytes"], 16);
    assert_eq!(seen["memory_bytes"], 65536);
    assert_eq!(seen["jobs"]["total"], 0);
    let text = c.run(&["snapshot", "inspect", &file]).ok();
    assert!(text.contains("checksum   ok"), "{text}");
    assert!(text.contains("counter"), "{text}");
    // A key demands a signature; a flipped byte fails the checksum.
    let err = c
        .run(&["snapshot", "inspect", &file, "--key", "k"])
        .fails()
        .to_string();
    assert!(err.contains("not keyed"), "{err}");
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(c.path("bad.twsnap"), &bytes).unwrap();
    let err = c
        .run(&["snapshot", "inspect", "bad.twsnap"])
        .fails()
        .to_string();
    assert!(err.contains("checksum"), "{err}");

    let restored = c.run(&["snapshot", "restore", "acme", &file]).ok();
    assert!(restored.starts_with("restored acme on cpu"), "{restored}");
    assert_eq!(count(), 3, "state as it was when saved");
    let err = c
        .run(&["snapshot", "restore", "acme", "bad.twsnap"])
        .fails()
        .to_string();
    assert!(err.contains("invalid_input"), "{err}");
    assert_eq!(count(), 4);

    // Executors, migrate, drain, forget, register.
    let list = c.run(&["executors", "ls", "--json"]).json();
    let execs = list["executors"].as_array().unwrap();
    assert_eq!(execs.len(), 2);
    for e in execs {
        assert_eq!(e["healthy"], true, "{e}");
        assert_eq!(e["device"]["kind"], "cpu", "{e}");
    }
    let home = fleet.proxy.placement("acme").unwrap();
    let other = if home == "cpu0" { "cpu1" } else { "cpu0" };
    let table = c.run(&["executors", "ls"]).ok();
    assert!(table.contains("cpu0") && table.contains("cpu1"), "{table}");

    let moved = c.run(&["migrate", "acme", "--to", other, "--json"]).json();
    assert_eq!(
        (moved["from"].as_str(), moved["to"].as_str()),
        (Some(home.as_str()), Some(other))
    );
    assert!(moved["bytes"].as_u64().unwrap() > 0);
    assert_eq!(count(), 5, "state moved along");
    let noop = c.run(&["migrate", "acme", "--to", other]).ok();
    assert!(noop.contains("already on"), "{noop}");
    let err = c
        .run(&["migrate", "acme", "--to", "gpu9"])
        .fails()
        .to_string();
    assert!(err.contains("HTTP 404"), "{err}");

    let drained = c.run(&["executors", "drain", other, "--json"]).json();
    assert_eq!(drained["moves"].as_array().unwrap().len(), 1, "{drained}");
    assert_eq!(drained["moves"][0]["tenant"], "acme");
    assert_eq!(drained["moves"][0]["to"], home.as_str());
    assert_eq!(count(), 6);
    let line = c.run(&["executors", "drain", other]).ok();
    assert!(line.contains("nothing moved"), "{line}");
    assert!(c.run(&["executors", "rm", other]).ok().contains("forgot"));
    let list = c.run(&["executors", "ls", "--json"]).json();
    assert_eq!(list["executors"].as_array().unwrap().len(), 1);
    let addr = fleet.executor(other).addr.clone();
    let added = c
        .run(&["executors", "add", "--id", other, "--addr", &addr, "--json"])
        .json();
    assert_eq!(added["id"], other);
    assert_eq!(added["healthy"], true);
    let list = c.run(&["executors", "ls", "--json"]).json();
    assert_eq!(list["executors"].as_array().unwrap().len(), 2);
    let err = c.run(&["executors", "rm", &home]).fails().to_string();
    assert!(err.contains("drain it first"), "{err}");

    // observe --once: every executor, and the request rate under load.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        let api = fleet.proxy.api.clone();
        let id = id.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let r = api.call(
                    "POST",
                    &format!("/functions/{id}/invoke"),
                    &[("authorization", "Bearer tok-acme")],
                    Some(("text/plain", b"")),
                );
                assert_eq!(r.status, 200, "{}", r.text());
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        })
    };
    let frame = c.run(&["observe", "--once", "--json"]).json();
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    let execs = frame["executors"].as_array().unwrap();
    assert_eq!(execs.len(), 2, "{frame}");
    for e in execs {
        assert_eq!(e["healthy"], true, "{e}");
        assert_eq!(e["device_kind"], "cpu", "{e}");
        assert!(e["memory_total"].as_u64().unwrap() > 0, "{e}");
        assert!(e["kernel_dispatches_total"].is_u64(), "{e}");
    }
    let with_acme = execs.iter().find(|e| e["id"] == home.as_str()).unwrap();
    assert_eq!(with_acme["tenants"], 1);
    assert!(
        frame["proxy"]["requests_total"].as_f64().unwrap() > 10.0,
        "{frame}"
    );
    let rate = frame["proxy"]["requests_per_second"].as_f64().unwrap();
    assert!(rate > 1.0, "requests under load: {frame}");
    let text = c.run(&["observe", "--once", "--interval-ms", "100"]).ok();
    assert!(
        text.contains("EXECUTOR") && text.contains("API req/s"),
        "{text}"
    );

    // Admin commands want the admin token.
    let mut bad = Client::new(&fleet, "tok-acme", scratch.path());
    bad.env.retain(|(k, _)| k != "TENSOR_WASM_ADMIN_TOKEN");
    bad.env
        .push(("TENSOR_WASM_ADMIN_TOKEN".into(), "tok-acme".into()));
    let err = bad.run(&["executors", "ls"]).fails().to_string();
    assert!(err.contains("unauthorized"), "{err}");
    assert!(err.contains("TENSOR_WASM_ADMIN_TOKEN"), "{err}");
}

#[test]
fn tokens_fall_back_to_the_state_dir_and_errors_say_what_to_do() {
    let fleet = TestFleet::start(1, ProxyOptions::default());
    let scratch = tempfile::tempdir().unwrap();
    let state = scratch.path().join("state");
    let mut c = Client::new(&fleet, "unused", scratch.path());
    c.env
        .retain(|(k, _)| k != "TENSOR_WASM_TOKEN" && k != "TENSOR_WASM_ADMIN_TOKEN");
    c.env.retain(|(k, _)| k != "TENSOR_WASM_STATE_DIR");
    c.env
        .push(("TENSOR_WASM_STATE_DIR".into(), state.display().to_string()));

    // No token anywhere: say how to get one, send nothing.
    let err = c.run(&["functions", "ls"]).fails().to_string();
    assert!(err.contains("TENSOR_WASM_TOKEN"), "{err}");
    assert!(err.contains("tensor-wasm up"), "{err}");
    let err = c.run(&["executors", "ls"]).fails().to_string();
    assert!(err.contains("TENSOR_WASM_ADMIN_TOKEN"), "{err}");

    // The files `tensor-wasm up` writes are read instead.
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("dev-token"), "tok-acme\n").unwrap();
    std::fs::write(state.join("admin-token"), format!("{ADMIN_TOKEN}\n")).unwrap();
    let listed = c.run(&["functions", "ls", "--json"]).json();
    assert_eq!(listed["functions"], json!([]));
    let execs = c.run(&["executors", "ls", "--json"]).json();
    assert_eq!(execs["executors"][0]["id"], "cpu0");
    // A flag wins over the file.
    let err = c
        .run(&["functions", "ls", "--token", "not-a-token"])
        .fails()
        .to_string();
    assert!(
        err.contains("unauthorized") && err.contains("HTTP 401"),
        "{err}"
    );

    // Nothing listening: name the URL and the setting.
    let err = c
        .run(&["functions", "ls", "--url", "http://127.0.0.1:1"])
        .fails()
        .to_string();
    assert!(
        err.contains("cannot reach the proxy at http://127.0.0.1:1"),
        "{err}"
    );
    assert!(err.contains("TENSOR_WASM_URL"), "{err}");
    let err = c
        .run(&["functions", "ls", "--url", "localhost:8080"])
        .fails()
        .to_string();
    assert!(err.contains("http://"), "{err}");

    // Completions, from the command line's own definition.
    let bash = c.run(&["completions", "bash"]).ok();
    assert!(
        bash.contains("complete -F"),
        "{}",
        &bash[..200.min(bash.len())]
    );
    for sub in [
        "deploy",
        "invoke",
        "snapshot",
        "executors",
        "migrate",
        "observe",
    ] {
        assert!(
            bash.contains(sub),
            "{sub} missing from the bash completions"
        );
    }
    let zsh = c.run(&["completions", "zsh"]).ok();
    assert!(
        zsh.starts_with("#compdef tensor-wasm"),
        "{}",
        &zsh[..100.min(zsh.len())]
    );
    assert!(c.run(&["completions", "tcsh"]).code != 0);
}

#[test]
fn https_proxies_are_trusted_through_a_ca_certificate() {
    // A private CA, and a certificate for 127.0.0.1 that it signs.
    let certs = tempfile::tempdir().unwrap();
    let d = certs.path();
    test_certificates(d);
    let fleet = TestFleet::start(
        1,
        ProxyOptions {
            tls: Some((d.join("cert.pem"), d.join("key.pem"))),
            ..ProxyOptions::default()
        },
    );
    let scratch = tempfile::tempdir().unwrap();
    let mut c = Client::new(&fleet, "tok-acme", scratch.path());
    let url = format!("https://127.0.0.1:{}", fleet.proxy.options.listen_port);
    c.env.retain(|(k, _)| k != "TENSOR_WASM_URL");
    c.env.push(("TENSOR_WASM_URL".into(), url.clone()));
    let ca = d.join("ca.pem").display().to_string();
    let listed = c
        .run(&["functions", "ls", "--json", "--ca-cert", &ca])
        .json();
    assert_eq!(listed["functions"], json!([]));
    // Without the CA the certificate is not trusted, and the error says
    // where it tried.
    let err = c.run(&["functions", "ls"]).fails().to_string();
    assert!(
        err.contains(&format!("cannot reach the proxy at {url}")),
        "{err}"
    );
    assert!(err.contains("--ca-cert"), "{err}");
    let err = c
        .run(&["functions", "ls", "--ca-cert", "missing.pem"])
        .fails()
        .to_string();
    assert!(err.contains("--ca-cert missing.pem"), "{err}");
}
