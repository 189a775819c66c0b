//! The `tensor` imports of guest ABI v2 (`docs/GUEST-ABI.md`) and the only
//! `unsafe` code of the SDK.
//!
//! Each import is declared once, under a Rust name prefixed `tw_` and linked
//! by its ABI name, so that no import can be confused with a C symbol of the
//! same name (`free`, `read`) in wasi-libc. Every wrapper here is safe to
//! call because of one invariant: the host only reads or writes guest memory
//! inside the pointer/length pairs it is given, and every pair passed below
//! comes from a live Rust slice of exactly that length (shared for reads,
//! exclusive for writes). Returns are the raw codes: ≥ 0 on success, a
//! negative ABI error code otherwise; [`crate::Error`] interprets them.
//!
//! Outside wasm32 (docs, host-side unit tests) the imports are replaced by
//! stubs that fail with [`NOT_WASM`], so the crate builds everywhere but
//! computes only inside an executor.
#![allow(unsafe_code)]

/// The code every stub returns off wasm32: -8, a device error, since there
/// is no device to reach.
#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
pub const NOT_WASM: i32 = -8;

macro_rules! imports {
    ($( fn $name:ident = $import:literal ( $($arg:ident : $ty:ty),* ); )*) => {
        #[cfg(target_arch = "wasm32")]
        #[link(wasm_import_module = "tensor")]
        unsafe extern "C" {
            $(
                #[link_name = $import]
                fn $name($($arg: $ty),*) -> i32;
            )*
        }

        #[cfg(not(target_arch = "wasm32"))]
        mod stubs {
            $(
                pub(super) unsafe fn $name($($arg: $ty),*) -> i32 {
                    let _ = ($($arg,)*);
                    super::NOT_WASM
                }
            )*
        }
        #[cfg(not(target_arch = "wasm32"))]
        use stubs::*;
    };
}

imports! {
    fn tw_new = "new"(dtype: i32, shape_ptr: *const u32, ndim: i32, data_ptr: *const u8, data_len: i32);
    fn tw_zeros = "zeros"(dtype: i32, shape_ptr: *const u32, ndim: i32);
    fn tw_read = "read"(h: i32, dst_ptr: *mut u8, dst_len: i32);
    fn tw_dtype = "dtype"(h: i32);
    fn tw_ndim = "ndim"(h: i32);
    fn tw_shape = "shape"(h: i32, dst_ptr: *mut u32, cap: i32);
    fn tw_free = "free"(h: i32);
    fn tw_input = "input"(name_ptr: *const u8, name_len: i32);
    fn tw_output = "output"(name_ptr: *const u8, name_len: i32, h: i32);
    fn tw_asset = "asset"(name_ptr: *const u8, name_len: i32);
    fn tw_input_len = "input_len"();
    fn tw_input_read = "input_read"(offset: i32, dst_ptr: *mut u8, len: i32);
    fn tw_output_write = "output_write"(src_ptr: *const u8, len: i32);
    fn tw_set_error = "set_error"(msg_ptr: *const u8, len: i32);
    fn tw_last_error = "last_error"(dst_ptr: *mut u8, cap: i32);
    fn tw_cancelled = "cancelled"();
    fn tw_stream_write = "stream_write"(src_ptr: *const u8, len: i32);
    fn tw_stream_tensor = "stream_tensor"(name_ptr: *const u8, name_len: i32, h: i32);
    fn tw_matmul = "matmul"(a: i32, b: i32);
    fn tw_binary = "binary"(op: i32, a: i32, b: i32);
    fn tw_scalar = "scalar"(op: i32, a: i32, value: f32);
    fn tw_unary = "unary"(op: i32, a: i32);
    fn tw_reduce = "reduce"(op: i32, a: i32, axis: i32, keepdim: i32);
    fn tw_softmax = "softmax"(a: i32, axis: i32);
    fn tw_layer_norm = "layer_norm"(x: i32, gamma: i32, beta: i32, eps: f32);
    fn tw_rms_norm = "rms_norm"(x: i32, gamma: i32, eps: f32);
    fn tw_reshape = "reshape"(a: i32, shape_ptr: *const u32, ndim: i32);
    fn tw_transpose = "transpose"(a: i32, perm_ptr: *const u32, ndim: i32);
    fn tw_cast = "cast"(a: i32, dtype: i32);
    fn tw_gather = "gather"(table: i32, indices: i32);
    fn tw_concat = "concat"(a: i32, b: i32, axis: i32);
    fn tw_attention = "attention"(q: i32, k: i32, v: i32, causal: i32);
}

/// A slice length as the ABI's `i32`. Lengths past `i32::MAX` wrap negative,
/// which the host refuses with -7; no length here can make it read beyond
/// the slice.
fn len(n: usize) -> i32 {
    n as i32
}

pub fn new(dtype: i32, shape: &[u32], data: &[u8]) -> i32 {
    // SAFETY: `shape` and `data` are live slices; the host reads at most
    // `shape.len()` u32s and `data.len()` bytes from them.
    unsafe {
        tw_new(
            dtype,
            shape.as_ptr(),
            len(shape.len()),
            data.as_ptr(),
            len(data.len()),
        )
    }
}

pub fn zeros(dtype: i32, shape: &[u32]) -> i32 {
    // SAFETY: the host reads at most `shape.len()` u32s from `shape`.
    unsafe { tw_zeros(dtype, shape.as_ptr(), len(shape.len())) }
}

pub fn read(h: i32, dst: &mut [u8]) -> i32 {
    // SAFETY: `dst` is borrowed exclusively; the host writes at most
    // `dst.len()` bytes into it and keeps no pointer after returning.
    unsafe { tw_read(h, dst.as_mut_ptr(), len(dst.len())) }
}

pub fn dtype(h: i32) -> i32 {
    // SAFETY: integers only; the host touches no guest memory.
    unsafe { tw_dtype(h) }
}

pub fn ndim(h: i32) -> i32 {
    // SAFETY: integers only; the host touches no guest memory.
    unsafe { tw_ndim(h) }
}

pub fn shape(h: i32, dst: &mut [u32]) -> i32 {
    // SAFETY: `dst` is borrowed exclusively; the host writes at most
    // `dst.len()` u32s into it.
    unsafe { tw_shape(h, dst.as_mut_ptr(), len(dst.len())) }
}

pub fn free(h: i32) -> i32 {
    // SAFETY: integers only; the host touches no guest memory.
    unsafe { tw_free(h) }
}

pub fn input(name: &str) -> i32 {
    // SAFETY: the host reads at most `name.len()` bytes from `name`.
    unsafe { tw_input(name.as_ptr(), len(name.len())) }
}

pub fn output(name: &str, h: i32) -> i32 {
    // SAFETY: the host reads at most `name.len()` bytes from `name`.
    unsafe { tw_output(name.as_ptr(), len(name.len()), h) }
}

pub fn asset(name: &str) -> i32 {
    // SAFETY: the host reads at most `name.len()` bytes from `name`.
    unsafe { tw_asset(name.as_ptr(), len(name.len())) }
}

pub fn input_len() -> i32 {
    // SAFETY: no arguments; the host touches no guest memory.
    unsafe { tw_input_len() }
}

pub fn input_read(offset: i32, dst: &mut [u8]) -> i32 {
    // SAFETY: `dst` is borrowed exclusively; the host writes at most
    // `dst.len()` bytes into it.
    unsafe { tw_input_read(offset, dst.as_mut_ptr(), len(dst.len())) }
}

pub fn output_write(src: &[u8]) -> i32 {
    // SAFETY: the host reads at most `src.len()` bytes from `src`.
    unsafe { tw_output_write(src.as_ptr(), len(src.len())) }
}

pub fn set_error(msg: &[u8]) -> i32 {
    // SAFETY: the host reads at most `msg.len()` bytes from `msg`.
    unsafe { tw_set_error(msg.as_ptr(), len(msg.len())) }
}

pub fn last_error(dst: &mut [u8]) -> i32 {
    // SAFETY: `dst` is borrowed exclusively; the host writes at most
    // `dst.len()` bytes into it.
    unsafe { tw_last_error(dst.as_mut_ptr(), len(dst.len())) }
}

/// 1 once the invocation's client is gone, else 0 (guest ABI v2). A
/// module that calls it imports it, and its other imports then fail with
/// -9 once the client is gone.
pub fn cancelled() -> i32 {
    // SAFETY: no arguments; the host touches no guest memory.
    unsafe { tw_cancelled() }
}

pub fn stream_write(src: &[u8]) -> i32 {
    // SAFETY: the host reads at most `src.len()` bytes from `src`.
    unsafe { tw_stream_write(src.as_ptr(), len(src.len())) }
}

pub fn stream_tensor(name: &str, h: i32) -> i32 {
    // SAFETY: the host reads at most `name.len()` bytes from `name`.
    unsafe { tw_stream_tensor(name.as_ptr(), len(name.len()), h) }
}

pub fn matmul(a: i32, b: i32) -> i32 {
    // SAFETY: integers only; the host touches no guest memory.
    unsafe { tw_matmul(a, b) }
}

pub fn binary(op: i32, a: i32, b: i32) -> i32 {
    // SAFETY: integers only; the host touches no guest memory.
    unsafe { tw_binary(op, a, b) }
}

pub fn scalar(op: i32, a: i32, value: f32) -> i32 {
    // SAFETY: numbers only; the host touches no guest memory.
    unsafe { tw_scalar(op, a, value) }
}

pub fn unary(op: i32, a: i32) -> i32 {
    // SAFETY: integers only; the host touches no guest memory.
    unsafe { tw_unary(op, a) }
}

pub fn reduce(op: i32, a: i32, axis: i32, keepdim: bool) -> i32 {
    // SAFETY: integers only; the host touches no guest memory.
    unsafe { tw_reduce(op, a, axis, i32::from(keepdim)) }
}

pub fn softmax(a: i32, axis: i32) -> i32 {
    // SAFETY: integers only; the host touches no guest memory.
    unsafe { tw_softmax(a, axis) }
}

pub fn layer_norm(x: i32, gamma: i32, beta: i32, eps: f32) -> i32 {
    // SAFETY: numbers only; the host touches no guest memory.
    unsafe { tw_layer_norm(x, gamma, beta, eps) }
}

pub fn rms_norm(x: i32, gamma: i32, eps: f32) -> i32 {
    // SAFETY: numbers only; the host touches no guest memory.
    unsafe { tw_rms_norm(x, gamma, eps) }
}

pub fn reshape(a: i32, shape: &[u32]) -> i32 {
    // SAFETY: the host reads at most `shape.len()` u32s from `shape`.
    unsafe { tw_reshape(a, shape.as_ptr(), len(shape.len())) }
}

pub fn transpose(a: i32, perm: &[u32]) -> i32 {
    // SAFETY: the host reads at most `perm.len()` u32s from `perm`.
    unsafe { tw_transpose(a, perm.as_ptr(), len(perm.len())) }
}

pub fn cast(a: i32, dtype: i32) -> i32 {
    // SAFETY: integers only; the host touches no guest memory.
    unsafe { tw_cast(a, dtype) }
}

pub fn gather(table: i32, indices: i32) -> i32 {
    // SAFETY: integers only; the host touches no guest memory.
    unsafe { tw_gather(table, indices) }
}

pub fn concat(a: i32, b: i32, axis: i32) -> i32 {
    // SAFETY: integers only; the host touches no guest memory.
    unsafe { tw_concat(a, b, axis) }
}

pub fn attention(q: i32, k: i32, v: i32, causal: bool) -> i32 {
    // SAFETY: integers only; the host touches no guest memory.
    unsafe { tw_attention(q, k, v, i32::from(causal)) }
}
