//! Tensors: a dtype, a shape, and immutable contiguous row-major storage
//! owned by a backend.
//!
//! Storage is shared behind an `Arc`: cloning a tensor, reshaping it, or
//! handing it to several instances (assets) copies no data. Ops never write
//! into their operands; each returns a new tensor.

use std::fmt;
use std::ops::{Deref, Range};
use std::sync::Arc;

use bytemuck::Pod;
use half::{bf16, f16};
use tensor_wasm_shared::DType;

use crate::error::{KernelError, Result};
use crate::shape::checked_numel;

/// Immutable bytes that tensors may borrow without a copy, shared behind an
/// `Arc`: a memory-mapped assets file, say. The bytes must never change
/// while any tensor over them lives.
pub type SharedBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// Elements of one type on the host: a vector the tensor owns, or a range of
/// [`SharedBytes`] it borrows (checked at construction to be aligned for
/// `T`). Either way it reads as a `&[T]`.
#[derive(Clone)]
pub struct HostBuf<T: Pod> {
    repr: HostRepr<T>,
}

#[derive(Clone)]
enum HostRepr<T: Pod> {
    Owned(Vec<T>),
    Shared {
        bytes: SharedBytes,
        /// Byte range within `bytes`: aligned for `T`, a whole number of
        /// elements.
        range: Range<usize>,
    },
}

impl<T: Pod> HostBuf<T> {
    /// The elements in `bytes[range]`, borrowed; `None` if the range is out
    /// of bounds, not a whole number of elements, or not aligned for `T`.
    pub fn shared(bytes: SharedBytes, range: Range<usize>) -> Option<HostBuf<T>> {
        let slice = (*bytes).as_ref().get(range.clone())?;
        bytemuck::try_cast_slice::<u8, T>(slice).ok()?;
        Some(HostBuf {
            repr: HostRepr::Shared { bytes, range },
        })
    }

    /// Whether the elements are borrowed rather than owned.
    pub fn is_shared(&self) -> bool {
        matches!(self.repr, HostRepr::Shared { .. })
    }
}

impl<T: Pod> From<Vec<T>> for HostBuf<T> {
    fn from(v: Vec<T>) -> HostBuf<T> {
        HostBuf {
            repr: HostRepr::Owned(v),
        }
    }
}

impl<T: Pod> Deref for HostBuf<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match &self.repr {
            HostRepr::Owned(v) => v,
            // Checked in `shared`; the bytes never move or change.
            HostRepr::Shared { bytes, range } => {
                bytemuck::cast_slice(&(**bytes).as_ref()[range.clone()])
            }
        }
    }
}

impl<T: Pod> fmt::Debug for HostBuf<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostBuf")
            .field("len", &self.len())
            .field("shared", &self.is_shared())
            .finish()
    }
}

impl<T: Pod + PartialEq> PartialEq for HostBuf<T> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

/// Host storage of the CPU backend: one typed buffer per dtype, so that
/// elements are always aligned for their type.
#[derive(Clone, PartialEq)]
pub enum CpuStorage {
    F32(HostBuf<f32>),
    F16(HostBuf<f16>),
    BF16(HostBuf<bf16>),
    I32(HostBuf<i32>),
    I64(HostBuf<i64>),
    U8(HostBuf<u8>),
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
            DType::F32 => CpuStorage::F32(bytemuck::pod_collect_to_vec(bytes).into()),
            DType::F16 => CpuStorage::F16(bytemuck::pod_collect_to_vec(bytes).into()),
            DType::BF16 => CpuStorage::BF16(bytemuck::pod_collect_to_vec(bytes).into()),
            DType::I32 => CpuStorage::I32(bytemuck::pod_collect_to_vec(bytes).into()),
            DType::I64 => CpuStorage::I64(bytemuck::pod_collect_to_vec(bytes).into()),
            DType::U8 => CpuStorage::U8(bytes.to_vec().into()),
        }
    }

    /// The little-endian elements in `bytes[range]`, borrowed without a
    /// copy; `None` where [`HostBuf::shared`] refuses the range (the caller
    /// copies instead).
    pub fn from_shared(
        dtype: DType,
        bytes: SharedBytes,
        range: Range<usize>,
    ) -> Option<CpuStorage> {
        Some(match dtype {
            DType::F32 => CpuStorage::F32(HostBuf::shared(bytes, range)?),
            DType::F16 => CpuStorage::F16(HostBuf::shared(bytes, range)?),
            DType::BF16 => CpuStorage::BF16(HostBuf::shared(bytes, range)?),
            DType::I32 => CpuStorage::I32(HostBuf::shared(bytes, range)?),
            DType::I64 => CpuStorage::I64(HostBuf::shared(bytes, range)?),
            DType::U8 => CpuStorage::U8(HostBuf::shared(bytes, range)?),
        })
    }

    /// Whether the elements are borrowed from [`SharedBytes`].
    pub fn is_shared(&self) -> bool {
        match self {
            CpuStorage::F32(v) => v.is_shared(),
            CpuStorage::F16(v) => v.is_shared(),
            CpuStorage::BF16(v) => v.is_shared(),
            CpuStorage::I32(v) => v.is_shared(),
            CpuStorage::I64(v) => v.is_shared(),
            CpuStorage::U8(v) => v.is_shared(),
        }
    }

    /// Zeros of `dtype`.
    pub fn zeros(dtype: DType, numel: usize) -> CpuStorage {
        match dtype {
            DType::F32 => CpuStorage::F32(vec![0.0; numel].into()),
            DType::F16 => CpuStorage::F16(vec![f16::ZERO; numel].into()),
            DType::BF16 => CpuStorage::BF16(vec![bf16::ZERO; numel].into()),
            DType::I32 => CpuStorage::I32(vec![0; numel].into()),
            DType::I64 => CpuStorage::I64(vec![0; numel].into()),
            DType::U8 => CpuStorage::U8(vec![0; numel].into()),
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
