//! Tensors: a dtype, a shape, and immutable contiguous row-major storage
//! owned by a backend.
//!
//! Storage is shared behind an `Arc`: cloning a tensor, reshaping it, or
//! handing it to several instances (assets) copies no data. Ops never write
//! into their operands; each returns a new tensor.

use std::fmt;
use std::sync::Arc;

use half::{bf16, f16};
use tensor_wasm_shared::DType;

use crate::error::{KernelError, Result};
use crate::shape::checked_numel;

/// Host storage of the CPU backend: one typed vector per dtype, so that
/// elements are always aligned for their type.
#[derive(Clone, PartialEq)]
pub enum CpuStorage {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    U8(Vec<u8>),
}

impl fmt::Debug for CpuStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CpuStorage({}, {} elements)", self.dtype(), self.len())
    }
}

impl CpuStorage {
    pub fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::F16(_) => DType::F16,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::I32(_) => DType::I32,
            CpuStorage::I64(_) => DType::I64,
            CpuStorage::U8(_) => DType::U8,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            CpuStorage::F32(v) => v.len(),
            CpuStorage::F16(v) => v.len(),
            CpuStorage::BF16(v) => v.len(),
            CpuStorage::I32(v) => v.len(),
            CpuStorage::I64(v) => v.len(),
            CpuStorage::U8(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decodes little-endian bytes; `bytes.len()` must be a multiple of the
    /// dtype's size (the caller checks it against the shape).
    pub fn from_le_bytes(dtype: DType, bytes: &[u8]) -> CpuStorage {
        match dtype {
            DType::F32 => CpuStorage::F32(bytemuck::pod_collect_to_vec(bytes)),
            DType::F16 => CpuStorage::F16(bytemuck::pod_collect_to_vec(bytes)),
            DType::BF16 => CpuStorage::BF16(bytemuck::pod_collect_to_vec(bytes)),
            DType::I32 => CpuStorage::I32(bytemuck::pod_collect_to_vec(bytes)),
            DType::I64 => CpuStorage::I64(bytemuck::pod_collect_to_vec(bytes)),
            DType::U8 => CpuStorage::U8(bytes.to_vec()),
        }
    }

    /// Zeros of `dtype`.
    pub fn zeros(dtype: DType, numel: usize) -> CpuStorage {
        match dtype {
            DType::F32 => CpuStorage::F32(vec![0.0; numel]),
            DType::F16 => CpuStorage::F16(vec![f16::ZERO; numel]),
            DType::BF16 => CpuStorage::BF16(vec![bf16::ZERO; numel]),
            DType::I32 => CpuStorage::I32(vec![0; numel]),
            DType::I64 => CpuStorage::I64(vec![0; numel]),
            DType::U8 => CpuStorage::U8(vec![0; numel]),
        }
    }

    /// The elements as little-endian bytes.
    pub fn as_le_bytes(&self) -> &[u8] {
        match self {
            CpuStorage::F32(v) => bytemuck::cast_slice(v),
            CpuStorage::F16(v) => bytemuck::cast_slice(v),
            CpuStorage::BF16(v) => bytemuck::cast_slice(v),
            CpuStorage::I32(v) => bytemuck::cast_slice(v),
            CpuStorage::I64(v) => bytemuck::cast_slice(v),
            CpuStorage::U8(v) => v,
        }
    }
}

/// Where a tensor's elements live.
#[derive(Clone, Debug)]
pub enum Storage {
    Cpu(Arc<CpuStorage>),
    #[cfg(feature = "cuda")]
    Cuda(Arc<crate::cuda::CudaStorage>),
}

impl Storage {
    /// The backend kind that owns this storage.
    pub fn kind(&self) -> &'static str {
        match self {
            Storage::Cpu(_) => "cpu",
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => "cuda",
        }
    }
}

/// A tensor: dtype, dims and contiguous row-major storage.
#[derive(Clone, Debug)]
pub struct Tensor {
    dtype: DType,
    dims: Arc<[usize]>,
    storage: Storage,
}

impl Tensor {
    /// Wraps storage that holds exactly `dims`' element count of `dtype`.
    /// Backends call this; the counts are checked.
    pub fn from_storage(dtype: DType, dims: &[usize], storage: Storage) -> Result<Tensor> {
        let numel = checked_numel(dims).ok_or_else(|| KernelError::TooLarge {
            op: "tensor",
            detail: format!("element count of {dims:?} overflows"),
        })?;
        let (held, held_dtype) = match &storage {
            Storage::Cpu(s) => (s.len(), s.dtype()),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => (s.len(), s.dtype()),
        };
        if held != numel || held_dtype != dtype {
            return Err(KernelError::invalid(
                "tensor",
                format!("storage holds {held} {held_dtype}, shape {dims:?} {dtype} needs {numel}"),
            ));
        }
        Ok(Tensor {
            dtype,
            dims: dims.into(),
            storage,
        })
    }

    /// A CPU tensor from a typed vector.
    pub fn from_cpu(dims: &[usize], storage: CpuStorage) -> Result<Tensor> {
        let dtype = storage.dtype();
        Tensor::from_storage(dtype, dims, Storage::Cpu(Arc::new(storage)))
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    pub fn ndim(&self) -> usize {
        self.dims.len()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        // Checked at construction; saturating only matters for empty
        // tensors whose other dims overflow, where it yields 0.
        crate::shape::saturating_numel(&self.dims)
    }

    /// Size of the elements in bytes: what the tensor costs its device.
    pub fn nbytes(&self) -> u64 {
        self.numel() as u64 * self.dtype.size() as u64
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The same storage seen with other dims of the same element count.
    pub(crate) fn with_dims(&self, dims: &[usize]) -> Tensor {
        debug_assert_eq!(checked_numel(dims), Some(self.numel()));
        Tensor {
            dtype: self.dtype,
            dims: dims.into(),
            storage: self.storage.clone(),
        }
    }
}
