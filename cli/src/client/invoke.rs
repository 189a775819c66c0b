//! `tensor-wasm invoke`: call a function (`POST /functions/{id}/invoke`),
//! or run it as a job (`invoke-async`) and optionally wait for it.
//!
//! The body is built from exactly one source: tensors from `--input` and
//! `--safetensors` files (sent as one safetensors body), a JSON body
//! (`--json`), raw bytes (`--raw`), or nothing. Outputs are printed as
//! JSON, or written with `--out` to a `.safetensors` file, a `.npy` file
//! (one output), a directory (one `.npy` per output), or, for a function
//! that answers raw bytes, any file.

use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use tensor_wasm_shared::api::{InvokeResponse, JobAccepted, JobStatus};

use super::http::{Body, Endpoint, Reply, encode};
use super::tensors::{self, Outputs};
use super::{Conn, jobs, output};

/// Flags of `tensor-wasm invoke`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The function's id.
    id: String,
    /// An input tensor: NAME=FILE.npy, NAME=FILE.safetensors (its tensor
    /// NAME, or its only tensor), or FILE.safetensors (all its tensors).
    /// Repeatable.
    #[arg(long = "input", short = 'i', value_name = "NAME=FILE")]
    inputs: Vec<String>,
    /// Every tensor of a safetensors file, each under its own name.
    /// Repeatable.
    #[arg(long = "safetensors", value_name = "FILE")]
    safetensors: Vec<PathBuf>,
    /// Send FILE (or stdin for -) as the JSON body: {"inputs": {NAME:
    /// {"dtype", "shape", "data"}}}.
    #[arg(long, value_name = "FILE|-", conflicts_with_all = ["inputs", "safetensors", "raw"])]
    json: Option<String>,
    /// Send FILE (or stdin for -) as raw bytes (application/octet-stream).
    #[arg(long, value_name = "FILE|-", conflicts_with_all = ["inputs", "safetensors"])]
    raw: Option<String>,
    /// Write the outputs to FILE.safetensors, FILE.npy (a single output),
    /// DIR/ (NAME.npy per output, raw bytes to raw.bin), or raw bytes to
    /// FILE.
    #[arg(long, short = 'o', value_name = "PATH")]
    out: Option<PathBuf>,
    /// Ask for a stream of events and print each chunk as it comes: text
    /// as it is, bytes as they are, tensors as a JSON line
    /// (`docs/API.md`, "Streaming").
    #[arg(long, conflicts_with_all = ["out", "run_async"])]
    stream: bool,
    /// Run as an async job and print its id.
    #[arg(long = "async")]
    run_async: bool,
    /// With --async: wait for the job to finish and print its outputs.
    #[arg(long, requires = "run_async")]
    wait: bool,
    /// With --wait: give up waiting after this many seconds.
    #[arg(long, default_value_t = 600)]
    wait_timeout_secs: u64,
    #[command(flatten)]
    conn: Conn,
}

/// Reads FILE, or stdin for `-`.
fn read_source(source: &str) -> anyhow::Result<Vec<u8>> {
    if source == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("reading stdin")?;
        return Ok(buf);
    }
    std::fs::read(source).with_context(|| source.to_string())
}

/// The request body the flags describe.
fn body(args: &Args) -> anyhow::Result<Body> {
    if let Some(source) = &args.json {
        let data = read_source(source)?;
        serde_json::from_slice::<serde_json::Value>(&data)
            .with_context(|| format!("--json {source}: not JSON"))?;
        return Ok(Body::Bytes {
            content_type: "application/json".into(),
            data,
        });
    }
    if let Some(source) = &args.raw {
        if source == "-" {
            return Ok(Body::Bytes {
                content_type: "application/octet-stream".into(),
                data: read_source(source)?,
            });
        }
        let file = File::open(source).with_context(|| format!("--raw {source}"))?;
        let len = file
            .metadata()
            .with_context(|| format!("--raw {source}"))?
            .len();
        return Ok(Body::Stream {
            content_type: "application/octet-stream".into(),
            len,
            reader: Box::new(file),
            label: format!("uploading {source}"),
        });
    }
    let mut inputs = Vec::new();
    for spec in &args.inputs {
        inputs.extend(tensors::read_input(spec)?);
    }
    for path in &args.safetensors {
        inputs.extend(tensors::read_safetensors(path)?);
    }
    if inputs.is_empty() {
        return Ok(Body::empty());
    }
    tensors::check_unique(&inputs)?;
    let data = tensors::to_safetensors(&inputs, None)?;
    Ok(Body::Stream {
        content_type: "application/x-safetensors".into(),
        len: data.len() as u64,
        reader: Box::new(std::io::Cursor::new(data)),
        label: "uploading inputs".into(),
    })
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let ep = args.conn.public()?;
    let body = body(&args)?;
    let id = encode(&args.id);
    if args.run_async {
        let accepted: JobAccepted =
            ep.send_json("POST", &format!("/functions/{id}/invoke-async"), body)?;
        if !args.wait {
            return Ok(output::println(&accepted.job_id)?);
        }
        eprintln!("job {}", accepted.job_id);
        let timeout = Duration::from_secs(args.wait_timeout_secs);
        let job = jobs::wait(&ep, &accepted.job_id, timeout)?;
        if job.status == JobStatus::Failed {
            return Err(jobs::failure(&job));
        }
        let result = job.result.unwrap_or_default();
        return finish_json(&result, args.out.as_deref());
    }
    if args.stream {
        let resp = ep.open(
            "POST",
            &format!("/functions/{id}/invoke"),
            &[("accept", "text/event-stream")],
            body,
        )?;
        return print_stream(resp);
    }
    let accept = if args.out.is_some() {
        "application/x-safetensors"
    } else {
        "application/json"
    };
    let reply = ep.call(
        "POST",
        &format!("/functions/{id}/invoke"),
        &[("accept", accept)],
        body,
    )?;
    finish(&ep, reply, args.out.as_deref())
}

/// Prints or writes a synchronous answer.
fn finish(ep: &Endpoint, reply: Reply, out: Option<&Path>) -> anyhow::Result<()> {
    match reply.content_type.as_str() {
        "application/json" => {
            let resp: InvokeResponse = reply.json(ep)?;
            finish_json(&resp, out)
        }
        "application/x-safetensors" => {
            let outputs = Outputs::from_safetensors(&reply.body)?;
            match out {
                Some(out) => write_outputs(out, &outputs),
                None => Ok(output::print_json(&outputs.to_json()?)?),
            }
        }
        _ => {
            let outputs = Outputs {
                tensors: Vec::new(),
                raw: Some(reply.body),
            };
            match out {
                Some(out) => write_outputs(out, &outputs),
                None => print_raw(outputs.raw.as_deref().unwrap_or_default()),
            }
        }
    }
}

/// Prints a stream of events as they come (`docs/API.md`, "Streaming"):
/// `text` and `bytes` chunks to stdout as they are, `tensors` as a JSON
/// line; an `error` event is the command's error.
fn print_stream(resp: ureq::http::Response<ureq::Body>) -> anyhow::Result<()> {
    use base64::Engine as _;
    use eventsource_stream::Eventsource as _;
    let events_of = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if !events_of {
        bail!(
            "the answer is not a stream of events: the function's executor may predate streaming"
        );
    }
    let mut reader = resp.into_body().into_with_config().limit(u64::MAX).reader();
    let bytes = futures::stream::iter(std::iter::from_fn(move || {
        let mut buf = vec![0u8; 64 << 10];
        match reader.read(&mut buf) {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some(Ok::<_, std::io::Error>(buf))
            }
            Err(e) => Some(Err(e)),
        }
    }));
    let mut stdout = std::io::stdout().lock();
    for event in futures::executor::block_on_stream(bytes.eventsource()) {
        let event = event.context("reading the stream")?;
        match event.event.as_str() {
            "text" => stdout.write_all(event.data.as_bytes())?,
            "bytes" => {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(event.data.as_bytes())
                    .context("a bytes event that is not base64")?;
                stdout.write_all(&raw)?;
            }
            "tensors" => writeln!(stdout, "{}", event.data)?,
            "end" => {
                stdout.flush()?;
                return Ok(());
            }
            "error" => {
                stdout.flush()?;
                let body: tensor_wasm_shared::error::ErrorBody = serde_json::from_str(&event.data)
                    .context("an error event that is not an error body")?;
                bail!(
                    "the stream failed: {} ({})",
                    body.error.message,
                    body.error.code.as_str()
                );
            }
            // Events of a later release.
            _ => {}
        }
        stdout.flush()?;
    }
    bail!("the stream ended without its outcome: the connection broke")
}

/// Prints or writes a JSON answer (a call's, or a finished job's result).
fn finish_json(resp: &InvokeResponse, out: Option<&Path>) -> anyhow::Result<()> {
    match out {
        Some(out) => write_outputs(out, &Outputs::from_json(resp)?),
        None => Ok(output::print_json(resp)?),
    }
}

/// Raw bytes go to stdout as they are, unless stdout is a terminal.
fn print_raw(raw: &[u8]) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout();
    if stdout.is_terminal() {
        let preview: Vec<String> = raw.iter().take(32).map(|b| format!("{b:02x}")).collect();
        eprintln!(
            "{} of raw output (save them with --out FILE, or pipe them): {}{}",
            output::bytes(raw.len() as u64),
            preview.join(" "),
            if raw.len() > 32 { " ..." } else { "" }
        );
        return Ok(());
    }
    stdout.write_all(raw)?;
    stdout.flush()?;
    Ok(())
}

/// Writes outputs where `--out` says.
fn write_outputs(out: &Path, outputs: &Outputs) -> anyhow::Result<()> {
    let is_dir = out.is_dir() || out.as_os_str().to_string_lossy().ends_with('/');
    let ext = out.extension().and_then(|e| e.to_str()).unwrap_or("");
    let written: Vec<PathBuf> = if is_dir {
        outputs.write_dir(out)?
    } else if ext == "safetensors" {
        let bytes = tensors::to_safetensors(&outputs.tensors, outputs.raw.as_deref())?;
        std::fs::write(out, bytes).with_context(|| out.display().to_string())?;
        vec![out.to_path_buf()]
    } else if ext == "npy" {
        let [t] = outputs.tensors.as_slice() else {
            bail!(
                "the function returned {} outputs; a .npy file holds one: give --out a directory or a .safetensors file",
                outputs.tensors.len()
            );
        };
        let bytes = super::npy::write(&super::npy::Array {
            dtype: t.dtype,
            shape: t.shape.clone(),
            data: t.data.clone(),
        });
        std::fs::write(out, bytes).with_context(|| out.display().to_string())?;
        vec![out.to_path_buf()]
    } else {
        if !outputs.tensors.is_empty() {
            bail!(
                "the function returned tensors; give --out a .safetensors file, a .npy file or a directory"
            );
        }
        let raw = outputs.raw.as_deref().unwrap_or_default();
        std::fs::write(out, raw).with_context(|| out.display().to_string())?;
        vec![out.to_path_buf()]
    };
    for path in written {
        output::println(&format!("wrote {}", path.display()))?;
    }
    Ok(())
}
