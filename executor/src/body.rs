//! Request and response bodies of invocations: JSON tensors, safetensors,
//! or raw bytes (`docs/API.md`, "Invoke bodies").
//!
//! Every decoder here reads untrusted bytes: sizes are checked against the
//! backend's limits before anything is allocated, and every failure is an
//! `invalid_json` / `invalid_input` error, never a panic.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use base64::Engine as _;
use safetensors::SafeTensors;
use tensor_wasm_kernels::{Backend, DType, Limits, Tensor};
use tensor_wasm_shared::api::{InvokeRequest, InvokeResponse, JsonTensor};

use crate::assets::{dtype_from_safetensors, dtype_to_safetensors};
use crate::error::ExecError;
use crate::host::MAX_NAME_LEN;
use crate::instance::{Request, Response};

pub const JSON: &str = "application/json";
pub const SAFETENSORS: &str = "application/x-safetensors";
pub const OCTET_STREAM: &str = "application/octet-stream";

/// Most named inputs one request may carry.
pub const MAX_INPUTS: usize = 1024;

/// Most elements, over all outputs, a JSON answer may carry: 16 Mi, what a
/// 64 MiB body of f32 holds. JSON takes up to ~25 bytes of text per float,
/// so larger outputs are refused with `payload_too_large` and a pointer to
/// safetensors, rather than held in memory as gigabytes of text (and kept
/// that way for an async job's retention time).
pub const MAX_JSON_OUTPUT_ELEMENTS: u64 = 16 << 20;

/// The media type of a `Content-Type` or `Accept` value, without
/// parameters, in lower case (media types are case-insensitive).
pub fn media_type(value: &str) -> String {
    value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

fn check_name(name: &str) -> Result<(), ExecError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(ExecError::InvalidInput(format!(
            "input names are 1 to {MAX_NAME_LEN} bytes"
        )));
    }
    Ok(())
}

/// An invocation's body as it arrived, kept undecoded until its run (and,
/// for a job, while it waits).
#[derive(Clone, Debug, Default)]
pub struct RequestBody {
    pub content_type: Option<String>,
    pub body: bytes::Bytes,
}

impl RequestBody {
    /// Decodes it onto `backend`, as [`decode_request`].
    pub fn decode(self, backend: &dyn Backend) -> Result<Request, ExecError> {
        decode_request(self.content_type.as_deref(), self.body, backend)
    }
}

/// Decodes an invocation body by its content type.
pub fn decode_request(
    content_type: Option<&str>,
    body: bytes::Bytes,
    backend: &dyn Backend,
) -> Result<Request, ExecError> {
    let mut inputs = HashMap::new();
    let tensors = decode_inputs(
        content_type,
        &body,
        backend.limits().max_tensor_bytes,
        |name, dtype, dims, bytes| {
            let tensor = backend
                .from_bytes(dtype, dims, bytes)
                .map_err(|e| input_error(name, e))?;
            inputs.insert(name.to_string(), tensor);
            Ok(())
        },
    )?;
    Ok(Request {
        inputs,
        body: if tensors {
            Arc::from(&[][..])
        } else {
            Arc::from(&body[..])
        },
        stream: None,
    })
}

/// Checks an invocation body as [`decode_request`] would decode it, without
/// making tensors: what `invoke-async` does before it accepts a job, so a
/// malformed body is a 400 rather than a failed job.
pub fn check_request(
    content_type: Option<&str>,
    body: &bytes::Bytes,
    limits: &Limits,
) -> Result<(), ExecError> {
    decode_inputs(
        content_type,
        body,
        limits.max_tensor_bytes,
        |name, dtype, dims, _| {
            limits
                .check_tensor("input", dtype, dims)
                .map(|_| ())
                .map_err(|e| input_error(name, e))
        },
    )
    .map(|_| ())
}

/// Hands each input tensor of a JSON or safetensors body to `put` as
/// (name, dtype, dims, little-endian bytes); false for any other body,
/// which the guest reads raw.
fn decode_inputs(
    content_type: Option<&str>,
    body: &[u8],
    max_tensor_bytes: u64,
    mut put: impl FnMut(&str, DType, &[usize], &[u8]) -> Result<(), ExecError>,
) -> Result<bool, ExecError> {
    match content_type.map(media_type).as_deref() {
        Some(JSON) => {
            let req: InvokeRequest = serde_json::from_slice(body)
                .map_err(|e| ExecError::InvalidJson(format!("invalid invoke body: {e}")))?;
            if req.inputs.len() > MAX_INPUTS {
                return Err(ExecError::InvalidInput(format!(
                    "at most {MAX_INPUTS} inputs"
                )));
            }
            for (name, t) in req.inputs {
                check_name(&name)?;
                let max_elements = max_tensor_bytes / t.dtype.size() as u64;
                let bytes = t
                    .to_le_bytes(max_elements)
                    .map_err(|e| ExecError::InvalidInput(format!("input {name:?}: {e}")))?;
                let dims: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
                put(&name, t.dtype, &dims, &bytes)?;
            }
            Ok(true)
        }
        Some(SAFETENSORS) => {
            let st = SafeTensors::deserialize(body)
                .map_err(|e| ExecError::InvalidInput(format!("invalid safetensors body: {e}")))?;
            if st.len() > MAX_INPUTS {
                return Err(ExecError::InvalidInput(format!(
                    "at most {MAX_INPUTS} inputs"
                )));
            }
            for (name, view) in st.iter() {
                check_name(name)?;
                let dtype = dtype_from_safetensors(view.dtype()).ok_or_else(|| {
                    ExecError::InvalidInput(format!(
                        "input {name:?} has unsupported dtype {:?}",
                        view.dtype()
                    ))
                })?;
                put(name, dtype, view.shape(), view.data())?;
            }
            Ok(true)
        }
        _ => Ok(false),
    }
}

fn input_error(name: &str, e: tensor_wasm_kernels::KernelError) -> ExecError {
    match ExecError::from(e) {
        ExecError::InvalidInput(m) => ExecError::InvalidInput(format!("input {name:?}: {m}")),
        other => other,
    }
}

/// An encoded response: its content type and bytes.
#[derive(Debug)]
pub struct Encoded {
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

/// Encodes an invocation's result for `accept`.
pub fn encode_response(
    accept: Option<&str>,
    resp: Response,
    backend: &dyn Backend,
) -> Result<Encoded, ExecError> {
    if resp.outputs.is_empty() {
        return Ok(Encoded {
            content_type: OCTET_STREAM,
            body: resp.raw,
        });
    }
    let wants_safetensors =
        accept.is_some_and(|a| a.split(',').any(|m| media_type(m) == SAFETENSORS));
    if !wants_safetensors {
        check_json_size(&resp.outputs)?;
    }
    let mut tensors: Vec<(String, Tensor, Vec<u8>)> = Vec::with_capacity(resp.outputs.len());
    for (name, t) in resp.outputs {
        let bytes = backend.to_bytes(&t).map_err(ExecError::from)?;
        tensors.push((name, t, bytes));
    }
    let raw_b64 =
        (!resp.raw.is_empty()).then(|| base64::engine::general_purpose::STANDARD.encode(&resp.raw));
    if wants_safetensors {
        let metadata = raw_b64.map(|r| HashMap::from([("raw_b64".to_string(), r)]));
        let body = safetensors_bytes(
            tensors
                .iter()
                .map(|(name, t, bytes)| (name.as_str(), t, bytes.as_slice())),
            metadata,
        )?;
        return Ok(Encoded {
            content_type: SAFETENSORS,
            body,
        });
    }
    let outputs = json_outputs(tensors)?;
    let body = serde_json::to_vec(&InvokeResponse { outputs, raw_b64 })
        .map_err(|e| ExecError::Internal(format!("cannot encode JSON: {e}")))?;
    Ok(Encoded {
        content_type: JSON,
        body,
    })
}

/// Named tensors, with their bytes read back, as one safetensors document.
pub fn safetensors_bytes<'a>(
    tensors: impl Iterator<Item = (&'a str, &'a Tensor, &'a [u8])>,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>, ExecError> {
    let views = tensors
        .map(|(name, t, bytes)| {
            safetensors::tensor::TensorView::new(
                dtype_to_safetensors(t.dtype()),
                t.dims().to_vec(),
                bytes,
            )
            .map(|v| (name.to_string(), v))
            .map_err(|e| ExecError::Internal(format!("output {name:?}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(views, metadata)
        .map_err(|e| ExecError::Internal(format!("cannot encode safetensors: {e}")))
}

/// Refuses outputs too large for a JSON answer, before they are read back.
fn check_json_size(outputs: &[(String, Tensor)]) -> Result<(), ExecError> {
    let elements: u64 = outputs.iter().map(|(_, t)| t.numel() as u64).sum();
    if elements > MAX_JSON_OUTPUT_ELEMENTS {
        return Err(ExecError::PayloadTooLarge(format!(
            "the outputs hold {elements} elements; a JSON answer holds at most \
             {MAX_JSON_OUTPUT_ELEMENTS}: ask for application/x-safetensors"
        )));
    }
    Ok(())
}

fn json_outputs(
    tensors: Vec<(String, Tensor, Vec<u8>)>,
) -> Result<BTreeMap<String, JsonTensor>, ExecError> {
    let mut outputs = BTreeMap::new();
    for (name, t, bytes) in tensors {
        let shape = t.dims().iter().map(|&d| d as u64).collect();
        let jt = JsonTensor::from_le_bytes(t.dtype(), shape, &bytes)
            .map_err(|e| ExecError::Internal(format!("output {name:?}: {e}")))?;
        outputs.insert(name, jt);
    }
    Ok(outputs)
}

/// An invocation's result in JSON form (what a finished job answers).
pub fn to_invoke_response(
    resp: Response,
    backend: &dyn Backend,
) -> Result<InvokeResponse, ExecError> {
    check_json_size(&resp.outputs)?;
    let mut tensors = Vec::with_capacity(resp.outputs.len());
    for (name, t) in resp.outputs {
        let bytes = backend.to_bytes(&t).map_err(ExecError::from)?;
        tensors.push((name, t, bytes));
    }
    Ok(InvokeResponse {
        outputs: json_outputs(tensors)?,
        raw_b64: (!resp.raw.is_empty())
            .then(|| base64::engine::general_purpose::STANDARD.encode(&resp.raw)),
    })
}
