//! Streamed invocations (`docs/API.md`, "Streaming"; `docs/GUEST-ABI.md`,
//! "Streaming").
//!
//! A guest of a streamed invocation sends chunks with `stream_write` and
//! `stream_tensor`. Each chunk is put in its wire form on the guest's
//! thread ([`Sink`]) and handed over a small bounded channel to the HTTP
//! answer ([`answer`]), which writes it at once. The channel's bound is the
//! back-pressure: a guest whose client reads slowly waits in its next
//! chunk, at most until its deadline.
//!
//! The status waits for the first chunk: an invocation that fails before
//! it sends one is answered as an unstreamed one would be, status and
//! error body, so that clients and the proxy handle it alike. Once a chunk
//! is out the status is 200, and the outcome comes last: an `end` or
//! `error` event (SSE), or, on a raw stream, the chunked body's end or its
//! abort.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use bytes::Bytes;
use tensor_wasm_kernels::{Backend, Tensor};
use tensor_wasm_shared::api::JsonTensor;
use tensor_wasm_shared::error::ErrorBody;
use tensor_wasm_shared::headers::STREAM_HEADER;
use tokio::sync::mpsc;

use crate::body::{self, Encoded, MAX_JSON_OUTPUT_ELEMENTS};
use crate::error::ExecError;
use crate::metrics::Metrics;

/// The media type of Server-Sent Events.
pub const EVENT_STREAM: &str = "text/event-stream";

/// Chunks waiting for the client, per stream: a guest that is ahead waits
/// in its next chunk.
const QUEUED_CHUNKS: usize = 8;

/// How an invocation is streamed: Server-Sent Events or raw chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Sse,
    Raw,
}

impl Mode {
    /// The stream a request asks for, if any: `Accept: text/event-stream`
    /// for events; `Accept: application/octet-stream` or the
    /// `x-tensor-wasm-stream` header for raw chunks.
    pub fn of(headers: &HeaderMap) -> Option<Mode> {
        let accepts = |media: &str| {
            headers
                .get_all(header::ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .any(|m| body::media_type(m) == media)
        };
        if accepts(EVENT_STREAM) {
            Some(Mode::Sse)
        } else if headers.contains_key(STREAM_HEADER) || accepts(body::OCTET_STREAM) {
            Some(Mode::Raw)
        } else {
            None
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Mode::Sse => EVENT_STREAM,
            Mode::Raw => body::OCTET_STREAM,
        }
    }
}

/// What travels from the guest's thread to the HTTP answer.
#[derive(Debug)]
enum Frame {
    /// A chunk in its wire form.
    Chunk(Bytes),
    /// The invocation's outcome.
    End(Result<Finished, ExecError>),
}

/// How an invocation that was streamed ends.
#[derive(Debug)]
pub enum Finished {
    /// No chunk went out: the answer an unstreamed invocation gets.
    Whole(Encoded),
    /// After chunks: the rest of the response in the stream's form (what
    /// `output_write` and `output` set, as chunks).
    Tail(Vec<u8>),
}

/// Why a chunk could not be sent.
#[derive(Debug)]
pub enum SendError {
    /// The client is gone (its answer was dropped).
    Gone,
    /// The invocation's deadline passed while the client did not read.
    Deadline,
    /// The chunk cannot be put in the stream's form.
    Invalid(String),
}

/// The guest's end of a stream: puts chunks in their wire form and sends
/// them, waiting while the client is behind.
pub struct Sink {
    mode: Mode,
    tx: mpsc::Sender<Frame>,
    runtime: tokio::runtime::Handle,
    /// Set when the client is gone, as the invocation's cancellation flag.
    cancel: Arc<AtomicBool>,
    chunks: AtomicU64,
    bytes: AtomicU64,
    max_chunk_bytes: usize,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink")
            .field("mode", &self.mode)
            .field("chunks", &self.chunks)
            .finish_non_exhaustive()
    }
}

impl Sink {
    /// Chunks sent so far.
    pub fn chunks(&self) -> u64 {
        self.chunks.load(Ordering::Relaxed)
    }

    /// The largest chunk a guest may send, in bytes.
    pub fn max_chunk_bytes(&self) -> usize {
        self.max_chunk_bytes
    }

    /// Sends `bytes` as one chunk. Blocking: called on the guest's thread.
    pub fn write(&self, bytes: &[u8], deadline: Option<Instant>) -> Result<(), SendError> {
        let seq = self.chunks();
        let wire = match self.mode {
            Mode::Sse => sse_bytes(seq, bytes),
            Mode::Raw => bytes.to_vec(),
        };
        self.send(wire, bytes.len(), deadline)
    }

    /// Sends `tensor` named `name` as one chunk: a `tensors` event, or a
    /// safetensors document in a raw stream. Blocking.
    pub fn tensor(
        &self,
        name: &str,
        tensor: &Tensor,
        backend: &dyn Backend,
        deadline: Option<Instant>,
    ) -> Result<(), SendError> {
        let seq = self.chunks();
        let outputs = [(name.to_string(), tensor.clone())];
        let wire = match self.mode {
            Mode::Sse => sse_tensors(seq, &outputs, backend),
            Mode::Raw => safetensors_doc(&outputs, backend),
        }
        .map_err(|e| SendError::Invalid(e.to_string()))?;
        let len = wire.len();
        self.send(wire, len, deadline)
    }

    fn send(&self, wire: Vec<u8>, len: usize, deadline: Option<Instant>) -> Result<(), SendError> {
        if self.cancel.load(Ordering::Acquire) {
            return Err(SendError::Gone);
        }
        let frame = Frame::Chunk(Bytes::from(wire));
        let waiting = Instant::now();
        let sent = match deadline {
            Some(at) => self.runtime.block_on(async {
                tokio::time::timeout_at(tokio::time::Instant::from_std(at), self.tx.send(frame))
                    .await
            }),
            None => Ok(self.runtime.block_on(self.tx.send(frame))),
        };
        crate::state::cpu::waited(waiting.elapsed());
        match sent {
            Ok(Ok(())) => {
                self.chunks.fetch_add(1, Ordering::Relaxed);
                self.bytes.fetch_add(len as u64, Ordering::Relaxed);
                Ok(())
            }
            Ok(Err(_)) => {
                self.cancel.store(true, Ordering::Release);
                Err(SendError::Gone)
            }
            Err(_) => Err(SendError::Deadline),
        }
    }

    /// The end of the response in the stream's form: after chunks, what
    /// the guest set with `output_write` and `output` goes as chunks;
    /// with none, the whole answer an unstreamed invocation gets.
    pub fn finish(
        &self,
        accept: Option<&str>,
        resp: crate::instance::Response,
        backend: &dyn Backend,
    ) -> Result<Finished, ExecError> {
        // A raw stream that sent nothing answers as unstreamed, so that a
        // client asking for `application/octet-stream` from a function
        // that does not stream gets what it always got; an event stream is
        // always one.
        if self.chunks() == 0 && self.mode == Mode::Raw {
            return body::encode_response(accept, resp, backend).map(Finished::Whole);
        }
        let mut seq = self.chunks();
        let mut tail = Vec::new();
        if !resp.raw.is_empty() {
            match self.mode {
                Mode::Sse => tail.extend(sse_bytes(seq, &resp.raw)),
                Mode::Raw => tail.extend(&resp.raw),
            }
            seq += 1;
        }
        if !resp.outputs.is_empty() {
            match self.mode {
                Mode::Sse => tail.extend(sse_tensors(seq, &resp.outputs, backend)?),
                Mode::Raw => tail.extend(safetensors_doc(&resp.outputs, backend)?),
            }
        }
        Ok(Finished::Tail(tail))
    }
}

/// One SSE event: `event`, `id` and `data` (each line of `data` a `data:`
/// field, which a client joins with `\n`).
fn sse_event(out: &mut Vec<u8>, event: &str, id: Option<u64>, data: &str) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(event.as_bytes());
    out.push(b'\n');
    if let Some(id) = id {
        out.extend_from_slice(format!("id: {id}\n").as_bytes());
    }
    for line in data.split('\n') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    out.push(b'\n');
}

/// A bytes chunk as an event: `text` when it is UTF-8 without a carriage
/// return (SSE would read one as a line break), else `bytes`, base64.
fn sse_bytes(seq: u64, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 32);
    match std::str::from_utf8(bytes) {
        Ok(text) if !text.contains('\r') => sse_event(&mut out, "text", Some(seq), text),
        _ => {
            let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
            sse_event(&mut out, "bytes", Some(seq), &b64);
        }
    }
    out
}

/// Named tensors as one `tensors` event: a JSON object of name → tensor,
/// as in a JSON answer's `outputs`.
fn sse_tensors(
    seq: u64,
    tensors: &[(String, Tensor)],
    backend: &dyn Backend,
) -> Result<Vec<u8>, ExecError> {
    let elements: u64 = tensors.iter().map(|(_, t)| t.numel() as u64).sum();
    if elements > MAX_JSON_OUTPUT_ELEMENTS {
        return Err(ExecError::PayloadTooLarge(format!(
            "the tensors hold {elements} elements; an event holds at most \
             {MAX_JSON_OUTPUT_ELEMENTS}: stream raw (safetensors chunks)"
        )));
    }
    let mut map = std::collections::BTreeMap::new();
    for (name, t) in tensors {
        let bytes = backend.to_bytes(t).map_err(ExecError::from)?;
        let shape = t.dims().iter().map(|&d| d as u64).collect();
        let jt = JsonTensor::from_le_bytes(t.dtype(), shape, &bytes)
            .map_err(|e| ExecError::Internal(format!("tensor {name:?}: {e}")))?;
        map.insert(name.clone(), jt);
    }
    let json = serde_json::to_string(&map)
        .map_err(|e| ExecError::Internal(format!("cannot encode JSON: {e}")))?;
    let mut out = Vec::with_capacity(json.len() + 32);
    sse_event(&mut out, "tensors", Some(seq), &json);
    Ok(out)
}

/// Named tensors as one safetensors document (self-delimiting: its header
/// gives its length), a raw stream's tensor chunk.
fn safetensors_doc(
    tensors: &[(String, Tensor)],
    backend: &dyn Backend,
) -> Result<Vec<u8>, ExecError> {
    let mut read = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        read.push((name, t, backend.to_bytes(t).map_err(ExecError::from)?));
    }
    body::safetensors_bytes(
        read.iter().map(|(n, t, b)| (n.as_str(), *t, b.as_slice())),
        None,
    )
}

/// The last event of an SSE stream: `end` with the counts, or `error` with
/// the error's body.
fn sse_outcome(result: &Result<(), ExecError>, chunks: u64, bytes: u64) -> Vec<u8> {
    let mut out = Vec::new();
    match result {
        Ok(()) => {
            let data = serde_json::json!({"chunks": chunks, "bytes": bytes}).to_string();
            sse_event(&mut out, "end", None, &data);
        }
        Err(e) => {
            let data = serde_json::to_string(&ErrorBody { error: e.to_api() }).unwrap_or_default();
            sse_event(&mut out, "error", None, &data);
        }
    }
    out
}

/// An open stream, from the HTTP side: made before the invocation starts.
#[derive(Debug)]
pub struct Stream {
    mode: Mode,
    rx: mpsc::Receiver<Frame>,
    done: mpsc::Sender<Frame>,
    sink: Arc<Sink>,
}

impl Stream {
    /// A stream of `mode` whose guest may send chunks of at most
    /// `max_chunk_bytes`; `cancel` is the invocation's cancellation flag.
    /// Called on the runtime.
    pub fn open(mode: Mode, max_chunk_bytes: usize, cancel: Arc<AtomicBool>) -> Stream {
        let (tx, rx) = mpsc::channel(QUEUED_CHUNKS);
        let sink = Arc::new(Sink {
            mode,
            tx: tx.clone(),
            runtime: tokio::runtime::Handle::current(),
            cancel,
            chunks: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            max_chunk_bytes,
        });
        Stream {
            mode,
            rx,
            done: tx,
            sink,
        }
    }

    /// The guest's end.
    pub fn sink(&self) -> &Arc<Sink> {
        &self.sink
    }

    /// Where the invocation's outcome goes, once it has one.
    pub fn outcome(&self) -> Outcome {
        Outcome(self.done.clone())
    }
}

/// Hands an invocation's outcome to its stream.
#[derive(Debug)]
pub struct Outcome(mpsc::Sender<Frame>);

impl Outcome {
    pub async fn send(self, result: Result<Finished, ExecError>) {
        // Nobody reads any more when the client is gone: nothing to tell.
        let _ = self.0.send(Frame::End(result)).await;
    }
}

/// Answers a streamed invocation: waits for its first frame (at most
/// `idle`), then answers as an unstreamed invocation would if it failed
/// (or, raw, ended) without a chunk, or opens the stream and writes every
/// frame as it comes. No frame for `idle` ends the stream with
/// `deadline_exceeded`. `guard` is dropped with the answer (the client
/// gone, or the stream ended), which tells the guest.
pub async fn answer<G: Send + 'static>(
    mut stream: Stream,
    idle: Duration,
    metrics: Arc<Metrics>,
    guard: G,
) -> Result<Response, ExecError> {
    drop(stream.done);
    let first = match tokio::time::timeout(idle, stream.rx.recv()).await {
        Ok(Some(Frame::End(Ok(Finished::Whole(encoded))))) => {
            return Ok(
                ([(header::CONTENT_TYPE, encoded.content_type)], encoded.body).into_response(),
            );
        }
        Ok(Some(Frame::End(Err(e)))) => return Err(e),
        Ok(Some(f)) => f,
        Ok(None) => {
            return Err(ExecError::Internal(
                "the invocation ended unanswered".into(),
            ));
        }
        Err(_) => {
            stream.sink.cancel.store(true, Ordering::Release);
            metrics.streams.with_label_values(&["idle"]).inc();
            return Err(ExecError::StreamIdle(idle));
        }
    };
    let (mode, sink, mut rx) = (stream.mode, stream.sink, stream.rx);
    let (out_tx, out_rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    tokio::spawn(async move {
        let _guard = guard;
        let mut next = Some(first);
        let outcome = loop {
            let frame = match next.take() {
                Some(f) => Ok(Some(f)),
                None => tokio::select! {
                    f = tokio::time::timeout(idle, rx.recv()) => f,
                    () = out_tx.closed() => break "client_gone",
                },
            };
            let (result, label) = match frame {
                Ok(Some(Frame::Chunk(b))) => {
                    if out_tx.send(Ok(b)).await.is_err() {
                        break "client_gone";
                    }
                    continue;
                }
                Ok(Some(Frame::End(Ok(Finished::Tail(tail))))) => {
                    if !tail.is_empty() && out_tx.send(Ok(Bytes::from(tail))).await.is_err() {
                        break "client_gone";
                    }
                    (Ok(()), "ok")
                }
                Ok(Some(Frame::End(Ok(Finished::Whole(_))))) => (
                    Err(ExecError::Internal(
                        "a streamed answer ended unstreamed".into(),
                    )),
                    "error",
                ),
                Ok(Some(Frame::End(Err(e)))) => (Err(e), "error"),
                Ok(None) => (
                    Err(ExecError::Internal(
                        "the invocation ended unanswered".into(),
                    )),
                    "error",
                ),
                Err(_) => {
                    sink.cancel.store(true, Ordering::Release);
                    (Err(ExecError::StreamIdle(idle)), "idle")
                }
            };
            let last = match (mode, &result) {
                (Mode::Sse, _) => Ok(Bytes::from(sse_outcome(
                    &result,
                    sink.chunks(),
                    sink.bytes.load(Ordering::Relaxed),
                ))),
                (Mode::Raw, Ok(())) => break label,
                // A raw stream has no place for an outcome: a failed one is
                // cut (its chunked body never ends).
                (Mode::Raw, Err(e)) => Err(std::io::Error::other(e.to_string())),
            };
            let _ = out_tx.send(last).await;
            break label;
        };
        metrics.streams.with_label_values(&[outcome]).inc();
    });
    let mut resp = (StatusCode::OK, Body::from_stream(body_stream(out_rx))).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(mode.content_type()),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(resp)
}

/// A receiver as a stream of body frames.
fn body_stream(
    rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an SSE client makes of the `data` fields of one event.
    fn data_of(event: &[u8]) -> String {
        let text = std::str::from_utf8(event).unwrap();
        let lines: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(|l| l.strip_prefix(' ').unwrap_or(l))
            .collect();
        lines.join("\n")
    }

    #[test]
    fn text_chunks_survive_sse_framing_and_others_go_as_base64() {
        for text in [
            "hello",
            "two\nlines",
            "ends in a newline\n",
            "\n",
            "",
            " lead",
        ] {
            let e = sse_bytes(3, text.as_bytes());
            assert!(e.starts_with(b"event: text\nid: 3\n"), "{text:?}");
            assert_eq!(data_of(&e), text);
        }
        for bytes in [&b"a\rb"[..], &[0xff, 0x00, 0x10][..]] {
            let e = sse_bytes(0, bytes);
            assert!(e.starts_with(b"event: bytes\n"));
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(data_of(&e))
                .unwrap();
            assert_eq!(decoded, bytes);
        }
    }

    #[test]
    fn modes_come_from_accept_or_the_stream_header() {
        let mut h = HeaderMap::new();
        assert_eq!(Mode::of(&h), None);
        h.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        assert_eq!(Mode::of(&h), None);
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/json, Text/Event-Stream; q=0.9"),
        );
        assert_eq!(Mode::of(&h), Some(Mode::Sse));
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/octet-stream"),
        );
        assert_eq!(Mode::of(&h), Some(Mode::Raw));
        h.remove(header::ACCEPT);
        h.insert(STREAM_HEADER, HeaderValue::from_static("1"));
        assert_eq!(Mode::of(&h), Some(Mode::Raw));
    }
}
