//! Guest ABI v2: the `tensor` imports, over a kernel backend.
//!
//! Every import returns a value ≥ 0 on success or a negative [`AbiError`]
//! code, keeping the message for `last_error`. Guest pointers are checked
//! against linear memory before any byte is read or written (-4 otherwise),
//! shapes against the backend's limits before anything is allocated, and the
//! invocation's deadline before each call: a guest past its deadline traps
//! with [`DeadlineExceeded`] at its next import, so a loop of tensor ops
//! cannot outlive it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tensor_wasm_kernels::{Backend, BinaryOp, DType, ReduceOp, Tensor, UnaryOp};
use tensor_wasm_shared::AbiError;
use wasmtime::{Caller, Linker, Memory};
use wasmtime_wasi::p1::WasiP1Ctx;

use crate::memory::InstanceLimiter;
use crate::metrics::Metrics;
use crate::tensors::{AbiFailure, TensorTable};
use crate::wasm::ABI_MODULE;

/// The trap raised at the first import called after the deadline.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the invocation's deadline passed")]
pub struct DeadlineExceeded;

/// Longest input, output or asset name, in bytes.
pub const MAX_NAME_LEN: usize = 256;

/// The current invocation's inputs and outputs.
#[derive(Debug, Default)]
pub struct CallCtx {
    /// Named input tensors of the request.
    pub inputs: HashMap<String, Tensor>,
    /// The raw request body (empty for tensor requests).
    pub body: Arc<[u8]>,
    /// Handles made by `input`, freed when `handle` returns.
    pub input_handles: Vec<i32>,
    /// Named outputs, in the order first set; each charged to the tenant
    /// until the call ends.
    pub outputs: Vec<(String, Tensor)>,
    /// Bytes appended with `output_write`.
    pub raw_out: Vec<u8>,
    /// The message set with `set_error`.
    pub error_message: Option<String>,
    /// Set once the client that asked for the call is gone.
    pub cancel: Option<Arc<AtomicBool>>,
    /// Where `stream_write` and `stream_tensor` send chunks, when the call
    /// is streamed.
    pub stream: Option<Arc<crate::stream::Sink>>,
}

/// Everything an instance's imports reach: its store data.
pub struct HostState {
    pub wasi: WasiP1Ctx,
    pub limits: InstanceLimiter,
    pub tensors: TensorTable,
    pub call: CallCtx,
    pub last_error: String,
    pub backend: Arc<dyn Backend>,
    pub assets: Arc<HashMap<String, Tensor>>,
    pub deadline: Option<Instant>,
    pub memory: Option<Memory>,
    pub metrics: Arc<Metrics>,
    /// When the import being served was entered.
    pub call_started: Instant,
    pub max_output_bytes: usize,
    pub max_error_message: usize,
    /// The module imports `cancelled` (guest ABI v2): once its client is
    /// gone, its other imports fail with `Cancelled`.
    pub cancel_aware: bool,
}

impl HostState {
    /// Ends the current call (of `handle` or `init`): frees the handles
    /// that `input` made and releases the outputs' charges, since they
    /// leave the instance; returns what the call set.
    pub fn end_call(&mut self) -> CallCtx {
        let call = std::mem::take(&mut self.call);
        for &h in &call.input_handles {
            // Already freed by the guest, or not: either way it is gone now.
            let _ = self.tensors.free(h);
        }
        for (_, t) in &call.outputs {
            self.tensors.usage().release(t.nbytes(), false);
        }
        call
    }
}

impl std::fmt::Debug for HostState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostState")
            .field("tensors", &self.tensors.len())
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

type Ctx<'a> = Caller<'a, HostState>;
type AbiResult = Result<i32, AbiFailure>;

fn oob(what: &str) -> AbiFailure {
    AbiFailure::new(
        AbiError::OutOfBounds,
        format!("{what} lies outside guest memory"),
    )
}

fn invalid(msg: impl Into<String>) -> AbiFailure {
    AbiFailure::new(AbiError::InvalidArgument, msg)
}

/// `len` bytes of guest memory at `ptr` (both read as unsigned).
fn guest<'m>(mem: &'m [u8], ptr: i32, len: usize, what: &str) -> Result<&'m [u8], AbiFailure> {
    let start = ptr as u32 as usize;
    start
        .checked_add(len)
        .and_then(|end| mem.get(start..end))
        .ok_or_else(|| oob(what))
}

fn guest_mut<'m>(
    mem: &'m mut [u8],
    ptr: i32,
    len: usize,
    what: &str,
) -> Result<&'m mut [u8], AbiFailure> {
    let start = ptr as u32 as usize;
    start
        .checked_add(len)
        .and_then(|end| mem.get_mut(start..end))
        .ok_or_else(|| oob(what))
}

fn read_u32s(mem: &[u8], ptr: i32, n: i32, max: usize, what: &str) -> Result<Vec<u32>, AbiFailure> {
    let n = usize::try_from(n).map_err(|_| invalid(format!("{what}: negative count {n}")))?;
    if n > max {
        return Err(invalid(format!(
            "{what}: {n} dims exceed the rank cap of {max}"
        )));
    }
    let bytes = guest(mem, ptr, n * 4, what)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn read_dims(st: &HostState, mem: &[u8], ptr: i32, ndim: i32) -> Result<Vec<usize>, AbiFailure> {
    let max = st.backend.limits().max_rank;
    Ok(read_u32s(mem, ptr, ndim, max, "shape")?
        .into_iter()
        .map(|d| d as usize)
        .collect())
}

fn read_name(mem: &[u8], ptr: i32, len: i32) -> Result<&str, AbiFailure> {
    let len = usize::try_from(len).map_err(|_| invalid("negative name length"))?;
    if len > MAX_NAME_LEN {
        return Err(invalid(format!("names are at most {MAX_NAME_LEN} bytes")));
    }
    std::str::from_utf8(guest(mem, ptr, len, "name")?).map_err(|_| invalid("name is not UTF-8"))
}

fn dtype(code: i32) -> Result<DType, AbiFailure> {
    DType::from_code(code).map_err(|e| AbiFailure::new(AbiError::DTypeUnsupported, e.to_string()))
}

fn len_i32(n: usize, what: &str) -> AbiResult {
    i32::try_from(n).map_err(|_| invalid(format!("{what} of {n} bytes does not fit an i32")))
}

/// Whether the client of the call in progress is gone.
fn client_gone(st: &HostState) -> bool {
    st.call
        .cancel
        .as_ref()
        .is_some_and(|c| c.load(Ordering::Acquire))
}

/// Runs one import as [`call_any`] does, unless the guest takes
/// cancellation (it imports `cancelled`) and its client is gone: then the
/// import does nothing and fails with `Cancelled`.
fn call(
    caller: &mut Ctx<'_>,
    f: impl FnOnce(&mut HostState, &mut [u8]) -> AbiResult,
) -> wasmtime::Result<i32> {
    let st = caller.data_mut();
    if st.cancel_aware && client_gone(st) {
        st.last_error = "cancelled: the client is gone".into();
        return Ok(AbiError::Cancelled.code());
    }
    call_any(caller, f)
}

/// Runs one import: checks the deadline, hands `f` guest memory and the
/// state, and turns a failure into its code (keeping the message).
fn call_any(
    caller: &mut Ctx<'_>,
    f: impl FnOnce(&mut HostState, &mut [u8]) -> AbiResult,
) -> wasmtime::Result<i32> {
    let now = Instant::now();
    let deadline = caller.data().deadline;
    if deadline.is_some_and(|d| now >= d) {
        return Err(wasmtime::Error::new(DeadlineExceeded));
    }
    caller.data_mut().call_started = now;
    // Long CPU ops stop between chunks once the deadline passes.
    let result = tensor_wasm_kernels::deadline::scope(deadline, || match caller.data().memory {
        Some(memory) => {
            let (mem, st) = memory.data_and_store_mut(&mut *caller);
            f(st, mem)
        }
        // Before `memory` is known (a start function), no pointer is valid.
        None => f(caller.data_mut(), &mut []),
    });
    Ok(match result {
        Ok(v) => v,
        // Cut short by the deadline (or failed past it): the invocation
        // ends as at any import called after its deadline.
        Err(_) if deadline.is_some_and(|d| Instant::now() >= d) => {
            return Err(wasmtime::Error::new(DeadlineExceeded));
        }
        Err(e) => {
            let st = caller.data_mut();
            st.last_error = truncate(e.message, st.max_error_message);
            e.code.code()
        }
    })
}

/// Runs a tensor op: `f` gets the state, returns a new tensor, which is
/// stored and whose handle is returned.
fn op(
    caller: &mut Ctx<'_>,
    op: usize,
    f: impl FnOnce(&HostState, &[u8]) -> Result<Tensor, AbiFailure>,
) -> wasmtime::Result<i32> {
    call(caller, |st, mem| {
        let t = f(st, mem)?;
        // `call` read the clock just before: one clock read per op.
        st.metrics
            .dispatched(op, st.call_started.elapsed().as_secs_f64());
        st.tensors.insert(t)
    })
}

/// Sets the named output `name` to `t` (`output`).
fn set_output(st: &mut HostState, name: String, t: Tensor) -> AbiResult {
    // An output holds its tensor after the handle is freed: it is charged
    // like a handle until `handle` returns, so a loop of output-then-free
    // cannot hold memory past the quota.
    let usage = st.tensors.usage();
    usage.reserve(t.nbytes(), false)?;
    match st.call.outputs.iter_mut().find(|(n, _)| *n == name) {
        Some(slot) => {
            usage.release(slot.1.nbytes(), false);
            slot.1 = t;
        }
        None => st.call.outputs.push((name, t)),
    }
    Ok(0)
}

/// Appends `src` to the raw response (`output_write`), within its cap.
fn append_raw(st: &mut HostState, src: &[u8]) -> Result<(), AbiFailure> {
    if st.call.raw_out.len() + src.len() > st.max_output_bytes {
        return Err(AbiFailure::new(
            AbiError::QuotaExceeded,
            format!(
                "the raw response is capped at {} bytes",
                st.max_output_bytes
            ),
        ));
    }
    st.call.raw_out.extend_from_slice(src);
    Ok(())
}

/// Refuses a chunk over the stream's cap (-5).
fn chunk_fits(len: usize, sink: &crate::stream::Sink) -> Result<(), AbiFailure> {
    if len > sink.max_chunk_bytes() {
        return Err(AbiFailure::new(
            AbiError::QuotaExceeded,
            format!(
                "a chunk of {len} bytes is over the cap of {} bytes: send it in parts",
                sink.max_chunk_bytes()
            ),
        ));
    }
    Ok(())
}

/// A chunk that could not be sent, as the guest sees it.
fn stream_failure(e: crate::stream::SendError) -> AbiFailure {
    match e {
        crate::stream::SendError::Gone => {
            AbiFailure::new(AbiError::Cancelled, "cancelled: the client is gone")
        }
        // The caller turns it into the deadline's trap.
        crate::stream::SendError::Deadline => AbiFailure::new(
            AbiError::InvalidArgument,
            "the deadline passed while the client did not read",
        ),
        crate::stream::SendError::Invalid(m) => AbiFailure::new(AbiError::InvalidArgument, m),
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

fn opt_handle(st: &HostState, h: i32) -> Result<Option<Tensor>, AbiFailure> {
    if h == 0 {
        Ok(None)
    } else {
        st.tensors.get(h).map(Some)
    }
}

/// Adds the `tensor` imports to `linker`.
pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    let m = ABI_MODULE;

    linker.func_wrap(
        m,
        "new",
        |mut c: Ctx<'_>, dt: i32, sp: i32, nd: i32, dp: i32, dl: i32| {
            op(&mut c, const { Metrics::op_index("new") }, |st, mem| {
                let dtype = dtype(dt)?;
                let dims = read_dims(st, mem, sp, nd)?;
                let len = usize::try_from(dl).map_err(|_| invalid("negative data length"))?;
                let data = guest(mem, dp, len, "data")?;
                Ok(st.backend.from_bytes(dtype, &dims, data)?)
            })
        },
    )?;
    linker.func_wrap(m, "zeros", |mut c: Ctx<'_>, dt: i32, sp: i32, nd: i32| {
        op(&mut c, const { Metrics::op_index("zeros") }, |st, mem| {
            let dims = read_dims(st, mem, sp, nd)?;
            Ok(st.backend.zeros(dtype(dt)?, &dims)?)
        })
    })?;
    linker.func_wrap(m, "read", |mut c: Ctx<'_>, h: i32, dst: i32, cap: i32| {
        call(&mut c, |st, mem| {
            let t = st.tensors.get(h)?;
            let need = t.nbytes();
            if need > cap as u32 as u64 {
                return Err(invalid(format!(
                    "read needs {need} bytes; the buffer holds {cap}"
                )));
            }
            let n = len_i32(need as usize, "tensor")?;
            let out = guest_mut(mem, dst, need as usize, "destination")?;
            out.copy_from_slice(&st.backend.to_bytes(&t)?);
            Ok(n)
        })
    })?;
    linker.func_wrap(m, "dtype", |mut c: Ctx<'_>, h: i32| {
        call(&mut c, |st, _| Ok(st.tensors.get(h)?.dtype().code()))
    })?;
    linker.func_wrap(m, "ndim", |mut c: Ctx<'_>, h: i32| {
        call(&mut c, |st, _| Ok(st.tensors.get(h)?.ndim() as i32))
    })?;
    linker.func_wrap(m, "shape", |mut c: Ctx<'_>, h: i32, dst: i32, cap: i32| {
        call(&mut c, |st, mem| {
            let t = st.tensors.get(h)?;
            let dims = t.dims();
            let n = dims.len().min(usize::try_from(cap).unwrap_or(0));
            let mut bytes = Vec::with_capacity(n * 4);
            for &d in &dims[..n] {
                let d =
                    u32::try_from(d).map_err(|_| invalid(format!("dim {d} does not fit a u32")))?;
                bytes.extend_from_slice(&d.to_le_bytes());
            }
            guest_mut(mem, dst, bytes.len(), "destination")?.copy_from_slice(&bytes);
            Ok(dims.len() as i32)
        })
    })?;
    linker.func_wrap(m, "free", |mut c: Ctx<'_>, h: i32| {
        call(&mut c, |st, _| {
            st.tensors.free(h)?;
            Ok(0)
        })
    })?;
    linker.func_wrap(m, "input", |mut c: Ctx<'_>, p: i32, l: i32| {
        call(&mut c, |st, mem| {
            let name = read_name(mem, p, l)?;
            let t = st.call.inputs.get(name).cloned().ok_or_else(|| {
                AbiFailure::new(AbiError::NameNotFound, format!("no input named {name:?}"))
            })?;
            let h = st.tensors.insert(t)?;
            st.call.input_handles.push(h);
            Ok(h)
        })
    })?;
    linker.func_wrap(m, "output", |mut c: Ctx<'_>, p: i32, l: i32, h: i32| {
        call(&mut c, |st, mem| {
            let name = read_name(mem, p, l)?.to_string();
            let t = st.tensors.get(h)?;
            set_output(st, name, t)
        })
    })?;
    linker.func_wrap(m, "asset", |mut c: Ctx<'_>, p: i32, l: i32| {
        call(&mut c, |st, mem| {
            let name = read_name(mem, p, l)?;
            let assets = st.assets.clone();
            st.tensors.asset(name, || assets.get(name).cloned())
        })
    })?;
    linker.func_wrap(m, "input_len", |mut c: Ctx<'_>| {
        call(&mut c, |st, _| len_i32(st.call.body.len(), "body"))
    })?;
    linker.func_wrap(
        m,
        "input_read",
        |mut c: Ctx<'_>, off: i32, p: i32, l: i32| {
            call(&mut c, |st, mem| {
                let off = usize::try_from(off).map_err(|_| invalid("negative offset"))?;
                let len = usize::try_from(l).map_err(|_| invalid("negative length"))?;
                let dst = guest_mut(mem, p, len, "destination")?;
                let body = &st.call.body;
                let src = &body[off.min(body.len())..];
                let n = src.len().min(len);
                dst[..n].copy_from_slice(&src[..n]);
                len_i32(n, "read")
            })
        },
    )?;
    linker.func_wrap(m, "output_write", |mut c: Ctx<'_>, p: i32, l: i32| {
        call(&mut c, |st, mem| {
            let len = usize::try_from(l).map_err(|_| invalid("negative length"))?;
            append_raw(st, guest(mem, p, len, "source")?)?;
            Ok(l)
        })
    })?;
    linker.func_wrap(m, "stream_write", |mut c: Ctx<'_>, p: i32, l: i32| {
        call(&mut c, |st, mem| {
            let len = usize::try_from(l).map_err(|_| invalid("negative length"))?;
            let src = guest(mem, p, len, "source")?;
            let Some(sink) = st.call.stream.clone() else {
                // Not streamed: the chunk joins the one answer.
                append_raw(st, src)?;
                return Ok(l);
            };
            chunk_fits(len, &sink)?;
            sink.write(src, st.deadline).map_err(stream_failure)?;
            Ok(l)
        })
    })?;
    linker.func_wrap(
        m,
        "stream_tensor",
        |mut c: Ctx<'_>, p: i32, l: i32, h: i32| {
            call(&mut c, |st, mem| {
                let name = read_name(mem, p, l)?.to_string();
                let t = st.tensors.get(h)?;
                let Some(sink) = st.call.stream.clone() else {
                    // Not streamed: the tensor is a named output.
                    return set_output(st, name, t);
                };
                chunk_fits(usize::try_from(t.nbytes()).unwrap_or(usize::MAX), &sink)?;
                sink.tensor(&name, &t, st.backend.as_ref(), st.deadline)
                    .map_err(stream_failure)?;
                Ok(0)
            })
        },
    )?;
    linker.func_wrap(m, "set_error", |mut c: Ctx<'_>, p: i32, l: i32| {
        call_any(&mut c, |st, mem| {
            let len = usize::try_from(l).map_err(|_| invalid("negative length"))?;
            let msg = String::from_utf8_lossy(guest(mem, p, len, "message")?).into_owned();
            st.call.error_message = Some(truncate(msg, st.max_error_message));
            Ok(0)
        })
    })?;
    linker.func_wrap(m, "cancelled", |mut c: Ctx<'_>| {
        call_any(&mut c, |st, _| Ok(i32::from(client_gone(st))))
    })?;
    linker.func_wrap(m, "last_error", |mut c: Ctx<'_>, p: i32, cap: i32| {
        call_any(&mut c, |st, mem| {
            let msg = st.last_error.as_bytes();
            let n = msg.len().min(usize::try_from(cap).unwrap_or(0));
            guest_mut(mem, p, n, "destination")?.copy_from_slice(&msg[..n]);
            len_i32(msg.len(), "message")
        })
    })?;
    linker.func_wrap(m, "matmul", |mut c: Ctx<'_>, a: i32, b: i32| {
        op(&mut c, const { Metrics::op_index("matmul") }, |st, _| {
            Ok(st
                .backend
                .matmul(&st.tensors.get(a)?, &st.tensors.get(b)?)?)
        })
    })?;
    linker.func_wrap(m, "binary", |mut c: Ctx<'_>, o: i32, a: i32, b: i32| {
        op(&mut c, const { Metrics::op_index("binary") }, |st, _| {
            let o = BinaryOp::from_code(o)?;
            Ok(st
                .backend
                .binary(o, &st.tensors.get(a)?, &st.tensors.get(b)?)?)
        })
    })?;
    linker.func_wrap(m, "scalar", |mut c: Ctx<'_>, o: i32, a: i32, v: f32| {
        op(&mut c, const { Metrics::op_index("scalar") }, |st, _| {
            let o = BinaryOp::from_code(o)?;
            Ok(st.backend.scalar(o, &st.tensors.get(a)?, v)?)
        })
    })?;
    linker.func_wrap(m, "unary", |mut c: Ctx<'_>, o: i32, a: i32| {
        op(&mut c, const { Metrics::op_index("unary") }, |st, _| {
            let o = UnaryOp::from_code(o)?;
            Ok(st.backend.unary(o, &st.tensors.get(a)?)?)
        })
    })?;
    linker.func_wrap(
        m,
        "reduce",
        |mut c: Ctx<'_>, o: i32, a: i32, axis: i32, keep: i32| {
            op(&mut c, const { Metrics::op_index("reduce") }, |st, _| {
                let o = ReduceOp::from_code(o)?;
                Ok(st
                    .backend
                    .reduce(o, &st.tensors.get(a)?, axis.into(), keep != 0)?)
            })
        },
    )?;
    linker.func_wrap(m, "softmax", |mut c: Ctx<'_>, a: i32, axis: i32| {
        op(&mut c, const { Metrics::op_index("softmax") }, |st, _| {
            Ok(st.backend.softmax(&st.tensors.get(a)?, axis.into())?)
        })
    })?;
    linker.func_wrap(
        m,
        "layer_norm",
        |mut c: Ctx<'_>, x: i32, g: i32, b: i32, eps: f32| {
            op(
                &mut c,
                const { Metrics::op_index("layer_norm") },
                |st, _| {
                    let (g, b) = (opt_handle(st, g)?, opt_handle(st, b)?);
                    Ok(st
                        .backend
                        .layer_norm(&st.tensors.get(x)?, g.as_ref(), b.as_ref(), eps)?)
                },
            )
        },
    )?;
    linker.func_wrap(m, "rms_norm", |mut c: Ctx<'_>, x: i32, g: i32, eps: f32| {
        op(&mut c, const { Metrics::op_index("rms_norm") }, |st, _| {
            let g = opt_handle(st, g)?;
            Ok(st.backend.rms_norm(&st.tensors.get(x)?, g.as_ref(), eps)?)
        })
    })?;
    linker.func_wrap(m, "reshape", |mut c: Ctx<'_>, a: i32, sp: i32, nd: i32| {
        op(&mut c, const { Metrics::op_index("reshape") }, |st, mem| {
            let max = st.backend.limits().max_rank;
            let dims: Vec<i64> = read_u32s(mem, sp, nd, max, "shape")?
                .into_iter()
                .map(|d| if d == u32::MAX { -1 } else { i64::from(d) })
                .collect();
            Ok(st.backend.reshape(&st.tensors.get(a)?, &dims)?)
        })
    })?;
    linker.func_wrap(
        m,
        "transpose",
        |mut c: Ctx<'_>, a: i32, pp: i32, nd: i32| {
            op(
                &mut c,
                const { Metrics::op_index("transpose") },
                |st, mem| {
                    let max = st.backend.limits().max_rank;
                    let perm: Vec<usize> = read_u32s(mem, pp, nd, max, "permutation")?
                        .into_iter()
                        .map(|p| p as usize)
                        .collect();
                    Ok(st.backend.transpose(&st.tensors.get(a)?, &perm)?)
                },
            )
        },
    )?;
    linker.func_wrap(m, "cast", |mut c: Ctx<'_>, a: i32, dt: i32| {
        op(&mut c, const { Metrics::op_index("cast") }, |st, _| {
            Ok(st.backend.cast(&st.tensors.get(a)?, dtype(dt)?)?)
        })
    })?;
    linker.func_wrap(m, "gather", |mut c: Ctx<'_>, t: i32, i: i32| {
        op(&mut c, const { Metrics::op_index("gather") }, |st, _| {
            Ok(st
                .backend
                .gather(&st.tensors.get(t)?, &st.tensors.get(i)?)?)
        })
    })?;
    linker.func_wrap(m, "concat", |mut c: Ctx<'_>, a: i32, b: i32, axis: i32| {
        op(&mut c, const { Metrics::op_index("concat") }, |st, _| {
            Ok(st
                .backend
                .concat(&st.tensors.get(a)?, &st.tensors.get(b)?, axis.into())?)
        })
    })?;
    linker.func_wrap(
        m,
        "attention",
        |mut c: Ctx<'_>, q: i32, k: i32, v: i32, causal: i32| {
            op(&mut c, const { Metrics::op_index("attention") }, |st, _| {
                let t = &st.tensors;
                Ok(st
                    .backend
                    .attention(&t.get(q)?, &t.get(k)?, &t.get(v)?, causal != 0)?)
            })
        },
    )?;
    Ok(())
}
