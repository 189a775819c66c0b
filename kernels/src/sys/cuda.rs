//! Every `unsafe` call of the CUDA backend: kernel launches, uninitialized
//! device allocations, stream-ordered memsets and copies through pinned
//! buffers, the memory-pool attributes, cuBLAS GEMMs and NVRTC.
//!
//! Each function here is safe to call: it either checks what the foreign
//! call needs (lengths, ranges) or documents the invariant its callers in
//! `crate::cuda` uphold (kernel argument lists mirror kernel signatures).
//! Device memory is only ever touched in stream order: every buffer is a
//! cudarc `CudaSlice`, freed asynchronously on the stream that allocated it.
//! cudarc's per-buffer events are off ([`disable_event_tracking`]), so a use
//! on another stream is ordered by `crate::cuda::CrossStream` instead.

use std::ffi::{CStr, CString, c_char, c_void};
use std::sync::Arc;

use cudarc::cublas::{result as blas_result, sys as blas_sys};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
    DriverError, HostSlice, LaunchConfig, PinnedHostSlice, PushKernelArg, result as drv_result,
    sys as drv_sys,
};
use cudarc::nvrtc::{result as nvrtc_result, sys as nvrtc_sys};

use crate::cuda::launch::MAX_DIMS;

/// The CUDA libraries the backend loads at run time that cannot be found.
/// With dynamic loading, cudarc panics on the first call into a missing
/// library, so this runs before any other CUDA call.
pub(crate) fn missing_libraries() -> Vec<&'static str> {
    let mut missing = Vec::new();
    // SAFETY: each probe only tries `dlopen` on the library's candidate names
    // and closes what it opened; it calls no function of the library.
    if !unsafe { drv_sys::is_culib_present() } {
        missing.push("libcuda (the NVIDIA driver)");
    }
    // SAFETY: as above.
    if !unsafe { nvrtc_sys::is_culib_present() } {
        missing.push("libnvrtc (CUDA runtime compiler)");
    }
    // SAFETY: as above.
    if !unsafe { blas_sys::is_culib_present() } {
        missing.push("libcublas");
    }
    missing
}

/// One kernel argument, by value. Pointers are raw device addresses (0 for
/// "none"); the caller keeps the buffers they point into alive and holds
/// their cudarc sync guards until `launch` has returned.
#[derive(Clone, Copy, Debug)]
pub(crate) enum KernelArg {
    Ptr(u64),
    U64(u64),
    I32(i32),
    F32(f32),
    /// A `struct Dims { u64 v[MAX_DIMS]; }` passed by value.
    Dims([u64; MAX_DIMS]),
}

/// Enqueues `func` on `stream` with `args`.
///
/// Contract for callers (each launch site in `crate::cuda::ops`): `args`
/// matches the kernel's C signature in `kernels.cu` one to one, in order and
/// in type (`Ptr`/`U64` ↔ 8-byte pointer or `u64`, `I32` ↔ `int`, `F32` ↔
/// `float`, `Dims` ↔ `Dims`); every pointer addresses a live
/// device buffer at least as large as the kernel's index range for the
/// given sizes, as computed from the op's plan; kernels that require
/// `BLOCK` threads per block get exactly that.
pub(crate) fn launch(
    stream: &CudaStream,
    func: &CudaFunction,
    cfg: LaunchConfig,
    args: &[KernelArg],
) -> Result<(), DriverError> {
    let mut builder = stream.launch_builder(func);
    for arg in args {
        match arg {
            KernelArg::Ptr(v) | KernelArg::U64(v) => {
                builder.arg(v);
            }
            KernelArg::I32(v) => {
                builder.arg(v);
            }
            KernelArg::F32(v) => {
                builder.arg(v);
            }
            KernelArg::Dims(v) => {
                builder.arg(v);
            }
        }
    }
    // SAFETY: the argument list mirrors the kernel signature and every
    // pointer stays valid until the kernel has run (see the contract above:
    // the buffers are cudarc slices freed in stream order, and the caller's
    // sync guards order other streams around this launch). The argument
    // values live in `args`, which outlives this call; the driver copies
    // them at enqueue time.
    unsafe { builder.launch(cfg) }.map(|_| ())
}

/// A device buffer of `bytes` bytes whose contents are unspecified.
///
/// Callers overwrite the whole buffer (a kernel, an upload, a memset, or the
/// test poison) before anything reads it.
pub(crate) fn alloc_uninit(
    stream: &Arc<CudaStream>,
    bytes: usize,
) -> Result<CudaSlice<u8>, DriverError> {
    // SAFETY: `u8` has no invalid bit patterns, and every caller writes the
    // buffer (in stream order) before any read of it is enqueued.
    unsafe { stream.alloc::<u8>(bytes) }
}

/// Sets every byte of `buf` to `value`, in stream order.
pub(crate) fn memset(
    stream: &Arc<CudaStream>,
    buf: &mut CudaSlice<u8>,
    value: u8,
) -> Result<(), DriverError> {
    // Driver calls act on the calling thread's current context.
    stream.context().bind_to_thread()?;
    let bytes = buf.len();
    let (ptr, _write) = buf.device_ptr_mut(stream);
    // SAFETY: `ptr` addresses `bytes` bytes owned by `buf`; the memset is
    // stream-ordered, and `buf` is freed only in stream order after it.
    unsafe { drv_result::memset_d8_async(ptr, value, bytes, stream.cu_stream()) }
}

/// Sets `bytes` bytes at device address `ptr` to `value`, in stream order.
///
/// Contract for callers: `ptr..ptr + bytes` lies inside a live device
/// buffer whose write guard the caller holds across this call.
pub(crate) fn memset_raw(
    stream: &CudaStream,
    ptr: u64,
    bytes: usize,
    value: u8,
) -> Result<(), DriverError> {
    if bytes == 0 {
        return Ok(());
    }
    stream.context().bind_to_thread()?;
    // SAFETY: the range is inside a live buffer (the caller's contract) and
    // the memset is ordered on `stream` with the buffer's other uses.
    unsafe { drv_result::memset_d8_async(ptr, value, bytes, stream.cu_stream()) }
}

/// Page-locked host memory of `len` bytes, zeroed, for staging copies.
pub(crate) fn alloc_pinned(
    ctx: &Arc<CudaContext>,
    len: usize,
) -> Result<PinnedHostSlice<u8>, DriverError> {
    // SAFETY: `u8` accepts any bit pattern; the buffer is zeroed below
    // before any reference to it is formed. `len` is a small constant of
    // the staging module, far below `isize::MAX`.
    let mut buf = unsafe { ctx.alloc_pinned_with_flags::<u8>(len, 0) }?;
    let ptr = buf.as_mut_ptr()?;
    // SAFETY: `ptr` is the start of a live host allocation of `len` bytes
    // that nothing else references yet.
    unsafe { std::ptr::write_bytes(ptr, 0, len) };
    Ok(buf)
}

/// The CUDA error code for an argument out of range, for the copy helpers
/// below (their callers check ranges first, so this is a safety net).
fn invalid_value() -> DriverError {
    DriverError(drv_sys::cudaError_enum::CUDA_ERROR_INVALID_VALUE)
}

/// Enqueues a copy of `src[..len]` (pinned) into `dst[offset..offset + len]`
/// and records `done` after it.
///
/// Contract for callers (`crate::cuda::staging`): the host touches `src`
/// again only after `done` has completed.
pub(crate) fn upload_from_pinned(
    stream: &Arc<CudaStream>,
    src: &PinnedHostSlice<u8>,
    done: &CudaEvent,
    len: usize,
    dst: &mut CudaSlice<u8>,
    offset: usize,
) -> Result<(), DriverError> {
    if len == 0 {
        return Ok(());
    }
    let end = offset.checked_add(len).ok_or_else(invalid_value)?;
    if len > src.len() || end > dst.len() {
        return Err(invalid_value());
    }
    stream.context().bind_to_thread()?;
    let mut view = dst.try_slice_mut(offset..end).ok_or_else(invalid_value)?;
    let (dptr, _write) = view.device_ptr_mut(stream);
    // SAFETY: the slice covers the whole live allocation; the copy below is
    // its only use on the device, ordered by `done` (recorded after it).
    let (host, _record) = unsafe { src.stream_synced_slice(stream) };
    // SAFETY: `host[..len]` is in bounds (checked above) and stays pinned
    // and unmodified until `done` completes (the caller's contract); `dptr`
    // addresses `len` bytes of `dst`.
    unsafe { drv_result::memcpy_htod_async(dptr, &host[..len], stream.cu_stream()) }?;
    done.record(stream)
}

/// Enqueues a copy of `src[offset..offset + len]` into the pinned
/// `dst[..len]` and records `done` after it.
///
/// Contract for callers (`crate::cuda::staging`): the host reads or writes
/// `dst` only after `done` has completed.
pub(crate) fn download_to_pinned(
    stream: &Arc<CudaStream>,
    src: &CudaSlice<u8>,
    offset: usize,
    len: usize,
    dst: &mut PinnedHostSlice<u8>,
    done: &CudaEvent,
) -> Result<(), DriverError> {
    if len == 0 {
        return Ok(());
    }
    let end = offset.checked_add(len).ok_or_else(invalid_value)?;
    if len > dst.len() || end > src.len() {
        return Err(invalid_value());
    }
    stream.context().bind_to_thread()?;
    let view = src.try_slice(offset..end).ok_or_else(invalid_value)?;
    let (sptr, _read) = view.device_ptr(stream);
    // SAFETY: as in `upload_from_pinned`.
    let (host, _record) = unsafe { dst.stream_synced_mut_slice(stream) };
    // SAFETY: `host[..len]` is in bounds and is not touched by the host
    // before `done` completes (the caller's contract); `sptr` addresses
    // `len` bytes of `src`.
    unsafe { drv_result::memcpy_dtoh_async(&mut host[..len], sptr, stream.cu_stream()) }?;
    done.record(stream)
}

/// Turns off cudarc's per-buffer event tracking for buffers allocated in
/// `ctx` from now on. Called once, when the device is opened, before any
/// buffer exists.
///
/// Contract for the caller (`crate::cuda`): every use of a buffer on a
/// stream other than the one that allocated it is ordered by a
/// `CrossStream` guard (the using stream waits for the home stream, and the
/// home stream, which frees the buffer, waits for the use).
pub(crate) fn disable_event_tracking(ctx: &CudaContext) {
    // SAFETY: cudarc's requirements (no free before another stream's use is
    // done, no use before the allocating stream's work, no concurrent
    // writes from two streams) are what `CrossStream` provides for every
    // cross-stream use (the contract above); same-stream uses are ordered
    // by the stream itself.
    unsafe { ctx.disable_event_tracking() }
}

/// Lets the device's stream-ordered memory pool keep freed memory instead
/// of returning it to the driver at every synchronization: tensors are
/// allocated and freed at a high rate, and reuse from the pool costs
/// nothing while a fresh reservation costs a driver call and a page-table
/// update.
pub(crate) fn keep_pool_memory(ctx: &CudaContext) -> Result<(), DriverError> {
    // SAFETY: the device handle comes from a live context.
    let pool = unsafe { drv_result::device::get_mem_pool(ctx.cu_device()) }?;
    let mut threshold: u64 = u64::MAX;
    // SAFETY: RELEASE_THRESHOLD takes a `cuuint64_t`, which `threshold` is,
    // and the pointer is valid for the duration of the call.
    unsafe {
        drv_result::mem_pool::set_attribute(
            pool,
            drv_sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast::<c_void>(),
        )
    }
}

/// Bytes the device's memory pool currently reserves from the driver (in
/// use by tensors or kept for reuse).
pub(crate) fn pool_reserved_bytes(ctx: &CudaContext) -> Result<u64, DriverError> {
    // SAFETY: the device handle comes from a live context.
    let pool = unsafe { drv_result::device::get_mem_pool(ctx.cu_device()) }?;
    let mut value: u64 = 0;
    // SAFETY: RESERVED_MEM_CURRENT writes a `cuuint64_t` into `value`.
    unsafe {
        drv_result::mem_pool::get_attribute(
            pool,
            drv_sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT,
            (&mut value as *mut u64).cast::<c_void>(),
        )
    }?;
    Ok(value)
}

/// A cuBLAS handle bound to one stream. Owned here rather than through
/// cudarc's `CudaBlas`, whose drop panics if the handle fails to destroy.
#[derive(Debug)]
pub(crate) struct BlasHandle {
    handle: blas_sys::cublasHandle_t,
    stream: Arc<CudaStream>,
}

// SAFETY: a cuBLAS handle may be used from any thread; the backend
// serializes calls on one handle with a mutex, and the stream it is bound to
// is itself Send + Sync.
unsafe impl Send for BlasHandle {}
// SAFETY: as above; `&BlasHandle` only exposes `gemm`, called under the
// backend's mutex.
unsafe impl Sync for BlasHandle {}

impl BlasHandle {
    pub(crate) fn new(stream: Arc<CudaStream>) -> Result<Self, String> {
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| e.to_string())?;
        let handle = blas_result::create_handle().map_err(|e| e.to_string())?;
        // SAFETY: `handle` was just created; the stream belongs to the
        // current context and outlives the handle (held in `self`).
        if let Err(e) = unsafe { blas_result::set_stream(handle, stream.cu_stream() as _) } {
            // SAFETY: `handle` is live and not used after this.
            let _ = unsafe { blas_result::destroy_handle(handle) };
            return Err(e.to_string());
        }
        Ok(BlasHandle { handle, stream })
    }
}

impl Drop for BlasHandle {
    fn drop(&mut self) {
        let _ = self.stream.context().bind_to_thread();
        // SAFETY: the handle is live and this is its last use. A failure
        // cannot be reported from drop and leaks nothing we could reclaim.
        let _ = unsafe { blas_result::destroy_handle(self.handle) };
    }
}

/// Element types of a GEMM's matrices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GemmType {
    F32,
    F16,
    BF16,
}

impl GemmType {
    fn cuda(self) -> blas_sys::cudaDataType {
        match self {
            GemmType::F32 => blas_sys::cudaDataType::CUDA_R_32F,
            GemmType::F16 => blas_sys::cudaDataType::CUDA_R_16F,
            GemmType::BF16 => blas_sys::cudaDataType::CUDA_R_16BF,
        }
    }
}

/// One column-major strided-batched GEMM, `C_i = alpha·op(A_i)·op(B_i) +
/// beta·C_i` for `i < batch`, with f32 compute (no TF32: f32 results match
/// the CPU reference to ~1e-6).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Gemm {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: i64,
    pub n: i64,
    pub k: i64,
    pub alpha: f32,
    pub beta: f32,
    pub a: u64,
    pub a_type: GemmType,
    pub lda: i64,
    pub stride_a: i64,
    pub b: u64,
    pub b_type: GemmType,
    pub ldb: i64,
    pub stride_b: i64,
    pub c: u64,
    pub c_type: GemmType,
    pub ldc: i64,
    pub stride_c: i64,
    pub batch: i64,
}

/// Enqueues `g` on the handle's stream (64-bit cuBLAS API, so no dimension
/// or leading dimension needs to fit in 32 bits).
///
/// Contract for callers (`crate::cuda::blas`): `m, n, k, batch ≥ 1`; the
/// leading dimensions are valid for the shapes (≥ the rows of each stored
/// matrix); every matrix of every batch lies inside a live device buffer,
/// whose sync guards the caller holds across this call.
pub(crate) fn gemm(h: &BlasHandle, g: &Gemm) -> Result<(), blas_result::CublasError> {
    let op = |t: bool| {
        if t {
            blas_sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            blas_sys::cublasOperation_t::CUBLAS_OP_N
        }
    };
    // cuBLAS calls run in the current context of the calling thread.
    if h.stream.context().bind_to_thread().is_err() {
        return Err(blas_result::CublasError(
            blas_sys::cublasStatus_t::CUBLAS_STATUS_EXECUTION_FAILED,
        ));
    }
    let alpha = g.alpha;
    let beta = g.beta;
    if g.batch == 1 {
        // One matrix: the plain GEMM entry point, the one callers of cuBLAS
        // use directly, so its heuristics pick the same kernel for us.
        // SAFETY: as below, for one matrix (strides unused).
        return unsafe {
            blas_sys::cublasGemmEx_64(
                h.handle,
                op(g.trans_a),
                op(g.trans_b),
                g.m,
                g.n,
                g.k,
                (&alpha as *const f32).cast::<c_void>(),
                g.a as *const c_void,
                g.a_type.cuda(),
                g.lda,
                g.b as *const c_void,
                g.b_type.cuda(),
                g.ldb,
                (&beta as *const f32).cast::<c_void>(),
                g.c as *mut c_void,
                g.c_type.cuda(),
                g.ldc,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            )
            .result()
        };
    }
    // SAFETY: the handle is live and bound to its stream; alpha and beta are
    // host f32 values (pointer mode host, f32 compute type); the matrix
    // pointers, leading dimensions, strides and batch count describe memory
    // inside live device buffers (the caller's contract above).
    unsafe {
        blas_sys::cublasGemmStridedBatchedEx_64(
            h.handle,
            op(g.trans_a),
            op(g.trans_b),
            g.m,
            g.n,
            g.k,
            (&alpha as *const f32).cast::<c_void>(),
            g.a as *const c_void,
            g.a_type.cuda(),
            g.lda,
            g.stride_a,
            g.b as *const c_void,
            g.b_type.cuda(),
            g.ldb,
            g.stride_b,
            (&beta as *const f32).cast::<c_void>(),
            g.c as *mut c_void,
            g.c_type.cuda(),
            g.ldc,
            g.stride_c,
            g.batch,
            blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
        )
        .result()
    }
}

/// What NVRTC should produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NvrtcOutput {
    /// Device code for the exact architecture named by `--gpu-architecture`.
    Cubin,
    /// PTX text (used by tests to list the kernels defined).
    #[cfg_attr(not(test), allow(dead_code))]
    Ptx,
}

/// The NVRTC version as (major, minor).
pub(crate) fn nvrtc_version() -> Result<(i32, i32), String> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: both pointers are valid for writes of one `c_int`.
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| format!("nvrtcVersion failed: {e:?}"))?;
    Ok((major, minor))
}

/// Compiles CUDA C++ `src` with NVRTC. On a compile error the message holds
/// NVRTC's log.
pub(crate) fn nvrtc_compile(
    src: &str,
    name: &str,
    options: &[String],
    output: NvrtcOutput,
) -> Result<Vec<u8>, String> {
    let src_c = CString::new(src).map_err(|_| "kernel source contains a NUL byte".to_string())?;
    let name_c = CString::new(name).map_err(|_| "program name contains a NUL byte".to_string())?;
    for o in options {
        if o.contains('\0') {
            return Err(format!("NVRTC option {o:?} contains a NUL byte"));
        }
    }
    let prog = nvrtc_result::create_program(&src_c, Some(&name_c))
        .map_err(|e| format!("nvrtcCreateProgram failed: {e:?}"))?;
    // SAFETY: `prog` is live until the destroy below; `src_c` and `name_c`
    // outlive it; options were checked for NUL bytes (compile_program
    // unwraps their conversion to C strings).
    let compiled = unsafe { nvrtc_result::compile_program(prog, options) };
    let result = match compiled {
        Err(e) => {
            // SAFETY: `prog` is live.
            let log = unsafe { nvrtc_result::get_program_log(prog) }
                .map(|l| c_chars_to_string(&l))
                .unwrap_or_default();
            Err(format!("NVRTC compilation failed ({e:?}):\n{log}"))
        }
        // SAFETY: `prog` is live and compiled.
        Ok(()) => unsafe { program_output(prog, output) },
    };
    // SAFETY: `prog` is live and never used again.
    let _ = unsafe { nvrtc_result::destroy_program(prog) };
    result
}

/// # Safety
/// `prog` must be a live, successfully compiled NVRTC program.
unsafe fn program_output(
    prog: nvrtc_sys::nvrtcProgram,
    output: NvrtcOutput,
) -> Result<Vec<u8>, String> {
    match output {
        NvrtcOutput::Ptx => {
            // SAFETY: guaranteed by this function's contract.
            let ptx = unsafe { nvrtc_result::get_ptx(prog) }
                .map_err(|e| format!("nvrtcGetPTX failed: {e:?}"))?;
            Ok(c_chars_to_string(&ptx).into_bytes())
        }
        NvrtcOutput::Cubin => {
            let mut size = 0usize;
            // SAFETY: guaranteed by this function's contract; `size` is a
            // valid out-pointer.
            unsafe { nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size) }
                .result()
                .map_err(|e| format!("nvrtcGetCUBINSize failed: {e:?}"))?;
            if size == 0 {
                return Err("NVRTC produced no CUBIN (is the architecture a real sm_XY?)".into());
            }
            let mut cubin = vec![0u8; size];
            // SAFETY: `cubin` has exactly the size NVRTC reported.
            unsafe { nvrtc_sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast::<c_char>()) }
                .result()
                .map_err(|e| format!("nvrtcGetCUBIN failed: {e:?}"))?;
            Ok(cubin)
        }
    }
}

/// A NUL-terminated C character buffer as a Rust string (lossy).
fn c_chars_to_string(chars: &[c_char]) -> String {
    let bytes: Vec<u8> = chars.iter().map(|&c| c as u8).collect();
    match CStr::from_bytes_until_nul(&bytes) {
        Ok(s) => s.to_string_lossy().into_owned(),
        Err(_) => String::from_utf8_lossy(&bytes).into_owned(),
    }
}
