//! The kernel backend: the one extension point between the executor and a
//! device.
//!
//! A backend owns the storage of the tensors it makes and runs every op of
//! guest ABI v1 on them. The executor holds one backend per tenant (on CUDA,
//! each with its own stream, so tenants never serialize behind each other)
//! and never looks inside a tensor's storage.
//!
//! Contract shared by every method:
//! - Operands must come from the same kind of backend; anything else is
//!   [`KernelError::WrongDevice`].
//! - Shapes, dtypes and limits are validated first, by the same `plan_*`
//!   functions of [`crate::shape`] in every backend, so both backends accept
//!   and refuse exactly the same calls with the same errors. Validation
//!   never allocates more than the output the [`Limits`] allow.
//! - Ops may return before the device has finished (CUDA enqueues);
//!   [`Backend::to_bytes`] and [`Backend::synchronize`] wait, and a fault of
//!   an earlier op surfaces there as [`KernelError::Device`].
//! - No method panics on any input, and none writes to its operands.
//! - Float ops accumulate f16 and bf16 in f32 and return the input dtype.

use std::fmt;
use std::ops::Range;

use tensor_wasm_shared::DType;

use crate::error::{KernelError, Result};
use crate::ops::{BinaryOp, ReduceOp, UnaryOp};
use crate::shape::Limits;
use crate::tensor::{SharedBytes, Tensor};

/// What kind of device a backend drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendKind {
    Cpu,
    Cuda,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Cuda => "cuda",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A device that runs tensor ops. See the module docs for the contract
/// every method shares.
pub trait Backend: Send + Sync + fmt::Debug {
    /// The kind of device.
    fn kind(&self) -> BackendKind;

    /// A human-readable device name (`"cpu (2 threads)"`, `"NVIDIA H100"`).
    fn device_name(&self) -> String;

    /// The caps this backend enforces on tensors and ops.
    fn limits(&self) -> &Limits;

    /// A tensor of `dims` from little-endian row-major `bytes`, whose length
    /// must be exactly the tensor's size ([`KernelError::InvalidArgument`]
    /// otherwise). Checks `dims` against the limits before allocating.
    ///
    /// [`KernelError::InvalidArgument`]: crate::KernelError::InvalidArgument
    // `self` is the device the tensor is made on, not its source.
    #[allow(clippy::wrong_self_convention)]
    fn from_bytes(&self, dtype: DType, dims: &[usize], bytes: &[u8]) -> Result<Tensor>;

    /// A tensor of `dims` from the little-endian row-major elements in
    /// `bytes[range]` (exactly the tensor's size), which never change: a
    /// memory-mapped assets file. The CPU backend borrows them without a
    /// copy where they are aligned for the dtype; other backends (and
    /// unaligned ranges) copy, as [`from_bytes`](Self::from_bytes) does.
    /// An out-of-bounds range is [`KernelError::InvalidArgument`].
    ///
    /// [`KernelError::InvalidArgument`]: crate::KernelError::InvalidArgument
    #[allow(clippy::wrong_self_convention)]
    fn from_shared(
        &self,
        dtype: DType,
        dims: &[usize],
        bytes: SharedBytes,
        range: Range<usize>,
    ) -> Result<Tensor> {
        let slice = (*bytes).as_ref().get(range.clone()).ok_or_else(|| {
            KernelError::invalid("new", format!("byte range {range:?} is out of bounds"))
        })?;
        self.from_bytes(dtype, dims, slice)
    }

    /// A tensor of zeros.
    fn zeros(&self, dtype: DType, dims: &[usize]) -> Result<Tensor>;

    /// The tensor's elements as little-endian row-major bytes. Waits for
    /// every op enqueued before it.
    fn to_bytes(&self, t: &Tensor) -> Result<Vec<u8>>;

    /// Waits until every enqueued op has finished; reports a device fault.
    fn synchronize(&self) -> Result<()>;

    /// `[.., m, k] × [.., k, n]` with numpy's rules: batch dims broadcast,
    /// a 1-D `a` is a row vector and a 1-D `b` a column vector, their unit
    /// dim dropped from the result. Float dtypes, equal on both sides.
    fn matmul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor>;

    /// `a ∘ b` elementwise with numpy broadcasting, any dtype, equal on both
    /// sides. Integer division truncates toward zero and gives 0 when
    /// dividing by zero; integer overflow wraps; integer `pow` with a
    /// negative exponent gives `1/a^|b|` truncated (0 unless |a| = 1).
    fn binary(&self, op: BinaryOp, a: &Tensor, b: &Tensor) -> Result<Tensor>;

    /// `a ∘ value`, with `value` first cast to a's dtype the way
    /// [`Backend::cast`] casts (float → int saturates, NaN → 0).
    fn scalar(&self, op: BinaryOp, a: &Tensor, value: f32) -> Result<Tensor>;

    /// An elementwise float op (f32, f16, bf16).
    fn unary(&self, op: UnaryOp, a: &Tensor) -> Result<Tensor>;

    /// Reduces over `axis` (negative counts from the end), keeping it as a
    /// dim of 1 when `keepdim`. Any dtype; the result has a's dtype, except
    /// argmax, which gives i64 (first index of the maximum; NaN is the
    /// maximum). Floats sum in at least f32 precision; integer sums wrap and
    /// integer means truncate toward zero. Max, min and argmax over an
    /// empty axis are [`KernelError::InvalidArgument`] (unless the result
    /// itself is empty); the mean of an empty float axis is NaN, of an
    /// empty integer axis 0 (integer division by zero gives 0).
    ///
    /// [`KernelError::InvalidArgument`]: crate::KernelError::InvalidArgument
    fn reduce(&self, op: ReduceOp, a: &Tensor, axis: i64, keepdim: bool) -> Result<Tensor>;

    /// Softmax over `axis`, numerically stable (the maximum is subtracted
    /// first). Float dtypes.
    fn softmax(&self, a: &Tensor, axis: i64) -> Result<Tensor>;

    /// `(x − mean) / √(var + eps) · gamma + beta` over the last axis with
    /// the biased variance; `gamma` and `beta` are optional and 1-D of the
    /// last dim's length. Float dtypes, all equal.
    fn layer_norm(
        &self,
        x: &Tensor,
        gamma: Option<&Tensor>,
        beta: Option<&Tensor>,
        eps: f32,
    ) -> Result<Tensor>;

    /// `x / √(mean(x²) + eps) · gamma` over the last axis. Float dtypes.
    fn rms_norm(&self, x: &Tensor, gamma: Option<&Tensor>, eps: f32) -> Result<Tensor>;

    /// The same elements with other dims (one may be -1). Any dtype. Shares
    /// storage: costs no copy.
    fn reshape(&self, a: &Tensor, dims: &[i64]) -> Result<Tensor>;

    /// Permutes dims: output dim i is input dim `perm[i]`. Any dtype.
    fn transpose(&self, a: &Tensor, perm: &[usize]) -> Result<Tensor>;

    /// Converts to `dtype`: float → int saturates and NaN becomes 0, int →
    /// int wraps, float → narrower float rounds to nearest even.
    fn cast(&self, a: &Tensor, dtype: DType) -> Result<Tensor>;

    /// Rows of `table` (first dim) picked by `indices` (i32 or i64, any
    /// shape): the result is `indices.dims ++ table.dims[1..]`. An index
    /// outside `0..rows` is [`KernelError::InvalidArgument`], checked
    /// before the result is made.
    ///
    /// [`KernelError::InvalidArgument`]: crate::KernelError::InvalidArgument
    fn gather(&self, table: &Tensor, indices: &Tensor) -> Result<Tensor>;

    /// Joins `a` and `b` along `axis`; every other dim must match, and the
    /// dtypes too. Any dtype.
    fn concat(&self, a: &Tensor, b: &Tensor, axis: i64) -> Result<Tensor>;

    /// `softmax(q·kᵀ/√d)·v` over `[.., seq, d]` operands with broadcast
    /// batch dims; with `causal`, key j is masked for query i when j > i
    /// (PyTorch's `is_causal`). Float dtypes, all equal; accumulates in f32.
    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Result<Tensor>;
}
