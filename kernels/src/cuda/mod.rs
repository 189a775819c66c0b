//! The CUDA backend (feature `cuda`): cudarc with dynamic loading, our own
//! kernels compiled by NVRTC, and cuBLAS for the GEMMs.
//!
//! # Layout
//! - `device`: one [`CudaContext`](cudarc::driver::CudaContext) per GPU
//!   ordinal per process, with the loaded kernel module and the memory
//!   accounting, shared by every backend on that GPU;
//! - `jit`: NVRTC compilation of `kernels.cu` and its on-disk cache;
//! - `launch`: grids, dim coalescing and the kernel-argument builder;
//! - `ops`: the [`Backend`](crate::Backend) implementation;
//! - `blas`: matmul and attention on cuBLAS;
//! - `staging`: host↔device copies through pinned chunks;
//! - every `unsafe` call lives in `crate::sys::cuda`.
//!
//! # Tenants, streams and memory
//! [`CudaBackend::new`] opens a device and gives a backend with its own
//! stream and cuBLAS handle; [`CudaBackend::new_stream_backend`] gives
//! another one on the same device, module and memory pool, so tenants never
//! serialize behind each other. Ops enqueue and return; `to_bytes` and
//! `synchronize` wait and report device faults.
//!
//! A buffer belongs to the stream that allocated it (its home), which also
//! frees it, in stream order. The executor keeps each tenant's tensors on
//! that tenant's backend, so nearly every use is on the home stream and
//! needs no synchronization at all: cudarc's per-buffer event tracking is
//! turned off for the device (it cost 16 driver calls per small op). A
//! tensor may still be used by another backend of the device; such a use
//! goes through [`CrossStream`], which makes the using stream wait for the
//! home stream first and the home stream wait for the use after, so the
//! buffer is never read before it is written nor freed before it is read.
//!
//! Device memory comes from the device's stream-ordered pool
//! (`cuMemAllocAsync`), whose release threshold is raised so that freed
//! memory stays in the pool for reuse. An allocation that fails is retried
//! once after synchronizing the device (which lets the pool reuse memory
//! freed on other streams); a second failure is
//! [`KernelError::OutOfMemory`]. [`CudaBackend::memory_used`] counts the
//! bytes of live tensors on the device.
//!
//! # Testing aid
//! With `TENSOR_WASM_CUDA_POISON=1` in the environment when a backend is
//! created, every fresh op output is filled with 0xFF bytes (NaN for
//! floats) before its kernel runs, so parity tests catch elements a kernel
//! forgets to write.

mod blas;
mod device;
mod jit;
pub(crate) mod launch;
mod ops;
mod staging;

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DriverError};
use tensor_wasm_shared::DType;

use self::device::{Device, driver_error};
use self::staging::Staging;
use crate::error::{KernelError, Result};
use crate::shape::Limits;
use crate::sys::cuda::{BlasHandle, alloc_uninit, memset};
use crate::tensor::{Storage, Tensor};

/// Environment variable that makes backends poison fresh outputs (see the
/// module docs); read when a backend is created.
pub const POISON_ENV: &str = tensor_wasm_shared::names::env::CUDA_POISON;

/// Environment variable that, set to `gemm`, keeps attention off the fused
/// kernel; read when a backend is created.
pub const ATTENTION_ENV: &str = tensor_wasm_shared::names::env::CUDA_ATTENTION;

/// Device storage of one tensor: a buffer from the device's memory pool
/// (none for an empty tensor), its element count and dtype.
pub struct CudaStorage {
    buf: Option<CudaSlice<u8>>,
    len: usize,
    dtype: DType,
    dev: Arc<Device>,
}

impl fmt::Debug for CudaStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CudaStorage({}, {} elements, cuda:{})",
            self.dtype, self.len, self.dev.ordinal
        )
    }
}

impl CudaStorage {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The CUDA device ordinal the buffer lives on.
    pub fn ordinal(&self) -> usize {
        self.dev.ordinal
    }

    fn bytes(&self) -> u64 {
        self.buf.as_ref().map_or(0, |b| b.len() as u64)
    }

    /// The buffer's device address for reading on `stream`, with the guard
    /// to hold until the read is enqueued: None when the buffer belongs to
    /// `stream` or is empty (address 0). cudarc's own guards are dropped at
    /// once: with event tracking off they do nothing.
    fn read_ptr<'a>(
        &'a self,
        op: &'static str,
        stream: &'a CudaStream,
    ) -> Result<(u64, Option<CrossStream<'a>>)> {
        self.read_access(stream).map_err(|e| driver_error(op, e))
    }

    /// As [`CudaStorage::read_ptr`], for writing.
    fn write_ptr<'a>(
        &'a mut self,
        op: &'static str,
        stream: &'a CudaStream,
    ) -> Result<(u64, Option<CrossStream<'a>>)> {
        self.write_access(stream).map_err(|e| driver_error(op, e))
    }

    fn read_access<'a>(
        &'a self,
        stream: &'a CudaStream,
    ) -> std::result::Result<(u64, Option<CrossStream<'a>>), DriverError> {
        let Some(b) = &self.buf else {
            return Ok((0, None));
        };
        let cross = CrossStream::begin(b, stream)?;
        Ok((b.device_ptr(stream).0, cross))
    }

    fn write_access<'a>(
        &'a mut self,
        stream: &'a CudaStream,
    ) -> std::result::Result<(u64, Option<CrossStream<'a>>), DriverError> {
        let Some(b) = &mut self.buf else {
            return Ok((0, None));
        };
        let cross = CrossStream::begin(b, stream)?;
        Ok((b.device_ptr_mut(stream).0, cross))
    }
}

/// A use, on stream `on`, of a buffer whose home is another stream. `begin`
/// makes `on` wait for the work enqueued on the home stream so far (the
/// buffer's allocation and writes); dropping the guard, once the use is
/// enqueued, makes the home stream wait for `on`, so that a later write or
/// the free on the home stream cannot overtake the use.
pub(crate) struct CrossStream<'a> {
    home: Arc<CudaStream>,
    on: &'a CudaStream,
}

impl<'a> CrossStream<'a> {
    /// None when `buf` already belongs to `on`: stream order suffices.
    pub(crate) fn begin(
        buf: &CudaSlice<u8>,
        on: &'a CudaStream,
    ) -> std::result::Result<Option<CrossStream<'a>>, DriverError> {
        let home = buf.stream();
        if home.cu_stream() == on.cu_stream() {
            return Ok(None);
        }
        on.join(home)?;
        Ok(Some(CrossStream {
            home: home.clone(),
            on,
        }))
    }
}

impl Drop for CrossStream<'_> {
    fn drop(&mut self) {
        // A failure here cannot be returned; cudarc keeps it for the
        // context's next error check.
        let r = self.home.join(self.on);
        self.home.context().record_err(r);
    }
}

impl Drop for CudaStorage {
    fn drop(&mut self) {
        self.dev
            .used_bytes
            .fetch_sub(self.bytes(), Ordering::Relaxed);
    }
}

/// A backend on one CUDA device with its own stream and cuBLAS handle: one
/// per tenant. See the module docs.
pub struct CudaBackend {
    dev: Arc<Device>,
    stream: Arc<CudaStream>,
    blas: Mutex<BlasHandle>,
    staging: Staging,
    limits: Limits,
    poison: bool,
    /// Attention of bf16/f16 runs on the fused kernel where it applies.
    fused_attention: bool,
}

impl fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaBackend")
            .field("device", &self.dev)
            .field("limits", &self.limits)
            .field("poison", &self.poison)
            .finish_non_exhaustive()
    }
}

impl CudaBackend {
    /// A backend on GPU `ordinal` with a new stream. The first backend of an
    /// ordinal in the process creates the device context, compiles or loads
    /// the kernels (see `jit`) and configures the memory pool; later ones
    /// reuse them.
    ///
    /// Returns [`KernelError::Unavailable`] (never panics) when the CUDA
    /// libraries are missing, the ordinal names no visible device, or the
    /// kernels cannot be built for it.
    pub fn new(ordinal: usize, limits: Limits) -> Result<CudaBackend> {
        let dev = Device::get(ordinal)?;
        CudaBackend::on_device(dev, limits)
    }

    /// Another backend on the same device, kernels and memory pool, with
    /// its own stream and cuBLAS handle and this backend's limits: what the
    /// executor creates per tenant.
    pub fn new_stream_backend(&self) -> Result<CudaBackend> {
        CudaBackend::on_device(self.dev.clone(), self.limits)
    }

    fn on_device(dev: Arc<Device>, limits: Limits) -> Result<CudaBackend> {
        let stream = dev
            .ctx
            .new_stream()
            .map_err(|e| KernelError::Device(format!("cannot create a CUDA stream: {e}")))?;
        let blas = BlasHandle::new(stream.clone())
            .map_err(|e| KernelError::Device(format!("cannot create a cuBLAS handle: {e}")))?;
        let poison = std::env::var(POISON_ENV).is_ok_and(|v| v == "1");
        let fused_attention = std::env::var(ATTENTION_ENV).map_or(true, |v| v != "gemm");
        Ok(CudaBackend {
            dev,
            stream,
            blas: Mutex::new(blas),
            staging: Staging::default(),
            limits,
            poison,
            fused_attention,
        })
    }

    /// This backend with the fused attention kernel allowed (the default,
    /// unless `TENSOR_WASM_CUDA_ATTENTION=gemm`) or not: attention then runs
    /// as two cuBLAS GEMMs around a softmax kernel.
    pub fn with_fused_attention(mut self, on: bool) -> CudaBackend {
        self.fused_attention = on;
        self
    }

    /// The CUDA device ordinal.
    pub fn ordinal(&self) -> usize {
        self.dev.ordinal
    }

    /// The device architecture the kernels were built for (`sm_90`).
    pub fn arch(&self) -> &str {
        &self.dev.arch
    }

    /// Bytes held by live tensors (and in-flight workspaces) of every
    /// backend on this device.
    pub fn memory_used(&self) -> u64 {
        self.dev.used_bytes.load(Ordering::Relaxed)
    }

    /// The device's UUID as CUDA reports it (a MIG slice's own, inside a
    /// process bound to one), in the text form of
    /// [`discovery::uuid_text`](crate::discovery::uuid_text), to match with
    /// NVML's devices ([`DeviceInfo::has_cuda_uuid`](crate::discovery::DeviceInfo::has_cuda_uuid)).
    pub fn uuid(&self) -> Result<String> {
        let u = self.dev.ctx.uuid().map_err(|e| driver_error("device", e))?;
        Ok(crate::discovery::uuid_text(&u.bytes.map(|b| b as u8)))
    }

    /// The device's memory, bytes (a MIG slice's own).
    pub fn memory_total(&self) -> Result<u64> {
        self.dev
            .ctx
            .total_mem()
            .map(|b| b as u64)
            .map_err(|e| driver_error("device", e))
    }

    /// Bytes the device's memory pool reserves from the driver: in use, or
    /// freed and kept for reuse.
    pub fn memory_reserved(&self) -> Result<u64> {
        self.dev.reserved_bytes()
    }

    /// A fresh buffer for `numel` elements of `dtype`, poisoned when the
    /// backend poisons. Out of memory is retried once after synchronizing
    /// the device.
    fn alloc(&self, op: &'static str, dtype: DType, numel: usize) -> Result<CudaStorage> {
        let mut s = self.alloc_raw(op, dtype, numel)?;
        if self.poison {
            self.fill_bytes(op, &mut s, 0xFF)?;
        }
        Ok(s)
    }

    /// As [`CudaBackend::alloc`], never poisoned (for buffers that an upload
    /// or memset fills entirely).
    fn alloc_raw(&self, op: &'static str, dtype: DType, numel: usize) -> Result<CudaStorage> {
        let bytes = numel
            .checked_mul(dtype.size())
            .ok_or_else(|| KernelError::TooLarge {
                op,
                detail: format!("{numel} elements of {dtype} overflow"),
            })?;
        let buf = if bytes == 0 {
            None
        } else {
            let first = alloc_uninit(&self.stream, bytes);
            let retried = match first {
                Err(e) if is_oom(&e) => {
                    // Memory freed on other streams becomes reusable once
                    // their pending work has completed.
                    self.dev
                        .ctx
                        .synchronize()
                        .map_err(|e| driver_error(op, e))?;
                    alloc_uninit(&self.stream, bytes)
                }
                other => other,
            };
            Some(retried.map_err(|e| {
                if is_oom(&e) {
                    KernelError::OutOfMemory {
                        op,
                        bytes: bytes as u64,
                    }
                } else {
                    driver_error(op, e)
                }
            })?)
        };
        self.dev
            .used_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        Ok(CudaStorage {
            buf,
            len: numel,
            dtype,
            dev: self.dev.clone(),
        })
    }

    /// Sets every byte of `s` to `value`, in stream order.
    fn fill_bytes(&self, op: &'static str, s: &mut CudaStorage, value: u8) -> Result<()> {
        match s.buf.as_mut() {
            Some(buf) => memset(&self.stream, buf, value).map_err(|e| driver_error(op, e)),
            None => Ok(()),
        }
    }

    /// `t`'s storage, if it lives on this backend's device.
    fn storage<'t>(&self, op: &'static str, t: &'t Tensor) -> Result<&'t CudaStorage> {
        match t.storage() {
            Storage::Cuda(s) if Arc::ptr_eq(&s.dev, &self.dev) => Ok(s.as_ref()),
            Storage::Cuda(_) => Err(KernelError::WrongDevice {
                op,
                expected: "cuda",
                found: "another cuda device",
            }),
            other => Err(KernelError::WrongDevice {
                op,
                expected: "cuda",
                found: other.kind(),
            }),
        }
    }

    /// Waits for the stream and reports any fault of an op enqueued on it.
    fn wait(&self, op: &'static str) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| KernelError::Device(format!("{op}: {e}")))?;
        self.dev
            .ctx
            .check_err()
            .map_err(|e| KernelError::Device(format!("{op}: an earlier CUDA call failed: {e}")))
    }
}

fn is_oom(e: &DriverError) -> bool {
    e.0 == cudarc::driver::sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY
}

/// Wraps finished storage into a tensor of `dims`.
fn tensor(dims: &[usize], s: CudaStorage) -> Result<Tensor> {
    Tensor::from_storage(s.dtype, dims, Storage::Cuda(Arc::new(s)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend on a device that cannot be opened is a clean
    /// `Unavailable`, never a panic. On a machine without the CUDA libraries
    /// (CI, this repository's dev machines) that is any device; where the
    /// libraries load (a GPU machine, `scripts/cuda-emu`), an ordinal past
    /// every device. Either way the test checks something: it never passes
    /// by skipping.
    #[test]
    fn construction_of_a_device_that_cannot_open_is_unavailable() {
        let missing = !crate::sys::cuda::missing_libraries().is_empty();
        let ordinal = if missing { 0 } else { 1 << 20 };
        let r = std::panic::catch_unwind(|| CudaBackend::new(ordinal, Limits::default()));
        let r = r.expect("CudaBackend::new must not panic");
        match r {
            Err(KernelError::Unavailable(msg)) if missing => {
                assert!(msg.contains("not found"), "{msg}")
            }
            Err(KernelError::Unavailable(msg)) => {
                assert!(msg.contains(&ordinal.to_string()), "{msg}")
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
        // A second attempt fails the same way (failures are not cached).
        assert!(matches!(
            CudaBackend::new(ordinal + 3, Limits::default()),
            Err(KernelError::Unavailable(_))
        ));
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn backends_share_the_device_count_memory_and_order_streams() {
        let a = CudaBackend::new(0, Limits::default()).unwrap();
        let b = a.new_stream_backend().unwrap();
        assert_eq!(a.ordinal(), b.ordinal());
        let before = a.memory_used();
        let t = crate::Backend::zeros(&b, DType::F32, &[1024]).unwrap();
        assert_eq!(a.memory_used(), before + 4096);
        drop(t);
        assert_eq!(a.memory_used(), before);
        assert!(a.memory_reserved().unwrap() >= 4096);

        // Tensors cross streams in order (one test: memory_used is
        // device-wide, so a concurrent test would disturb the counts above).
        assert!(!a.dev.ctx.is_event_tracking());
        let t = crate::Backend::zeros(&a, DType::F32, &[16]).unwrap();
        let buf = a.storage("t", &t).unwrap().buf.as_ref().unwrap();
        // A use on the home stream is ordered by the stream alone.
        assert!(CrossStream::begin(buf, &a.stream).unwrap().is_none());
        // A use on another backend's stream joins the two streams.
        assert!(CrossStream::begin(buf, &b.stream).unwrap().is_some());
        let sum = crate::Backend::binary(&b, crate::BinaryOp::Add, &t, &t).unwrap();
        assert_eq!(crate::Backend::to_bytes(&a, &sum).unwrap(), vec![0u8; 64]);
    }
}
