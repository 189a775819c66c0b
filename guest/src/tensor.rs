//! [`Tensor`]: an owned handle to a tensor on the host, freed when dropped,
//! with every op of guest ABI v1 as a method.
//!
//! Ops never change their operands: each returns a new tensor. They are
//! enqueued on the executor's device; only [`Tensor::to_vec`] and
//! [`Tensor::to_bytes`] wait for it, which is where a device fault of an
//! earlier op shows up.

use std::fmt;

use crate::error::{Error, Result, check};
use crate::sys;

/// Element type of a tensor, with its ABI code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float (code 0).
    F32,
    /// IEEE half (code 1).
    F16,
    /// bfloat16 (code 2).
    BF16,
    /// 32-bit signed integer (code 3).
    I32,
    /// 64-bit signed integer (code 4); what `argmax` returns.
    I64,
    /// Byte (code 5).
    U8,
}

impl DType {
    /// The ABI code.
    pub fn code(self) -> i32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::BF16 => 2,
            DType::I32 => 3,
            DType::I64 => 4,
            DType::U8 => 5,
        }
    }

    /// The dtype of an ABI code, if it is one.
    pub fn from_code(code: i32) -> Option<DType> {
        Some(match code {
            0 => DType::F32,
            1 => DType::F16,
            2 => DType::BF16,
            3 => DType::I32,
            4 => DType::I64,
            5 => DType::U8,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::U8 => 1,
            DType::F16 | DType::BF16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::I64 => 8,
        }
    }
}

mod sealed {
    pub trait Sealed {}
}

/// A Rust type a tensor's elements can be read into or made from; the half
/// types go through bytes ([`Tensor::from_bytes`], [`Tensor::to_bytes`]).
pub trait Element: Copy + sealed::Sealed {
    /// The matching dtype.
    const DTYPE: DType;
    /// Appends the little-endian bytes of `self`.
    fn put(self, out: &mut Vec<u8>);
    /// The value of `DTYPE.size()` little-endian bytes.
    fn take(bytes: &[u8]) -> Self;
}

macro_rules! element {
    ($($t:ty => $d:ident),*) => {$(
        impl sealed::Sealed for $t {}
        impl Element for $t {
            const DTYPE: DType = DType::$d;
            fn put(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn take(bytes: &[u8]) -> Self {
                let mut b = [0u8; size_of::<$t>()];
                b.copy_from_slice(bytes);
                <$t>::from_le_bytes(b)
            }
        }
    )*};
}
element!(f32 => F32, i32 => I32, i64 => I64, u8 => U8);

/// Elementwise ops of [`Tensor::binary`] and [`Tensor::scalar`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    /// `a + b` (code 0).
    Add,
    /// `a - b` (code 1).
    Sub,
    /// `a * b` (code 2).
    Mul,
    /// `a / b` (code 3); integers truncate toward zero, `/ 0` gives 0.
    Div,
    /// `max(a, b)` (code 4).
    Max,
    /// `min(a, b)` (code 5).
    Min,
    /// `a ^ b` (code 6).
    Pow,
}

impl BinaryOp {
    /// The ABI code.
    pub fn code(self) -> i32 {
        self as i32
    }
}

/// Elementwise functions of [`Tensor::unary`]; float dtypes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    /// `-x` (code 0).
    Neg,
    /// `eˣ` (code 1).
    Exp,
    /// `ln x` (code 2).
    Log,
    /// `√x` (code 3).
    Sqrt,
    /// `tanh x` (code 4).
    Tanh,
    /// `1 / (1 + e⁻ˣ)` (code 5).
    Sigmoid,
    /// `max(x, 0)` (code 6).
    Relu,
    /// GELU, erf form (PyTorch's default) (code 7).
    Gelu,
    /// `x · sigmoid(x)` (code 8).
    Silu,
    /// `|x|` (code 9).
    Abs,
}

impl UnaryOp {
    /// The ABI code.
    pub fn code(self) -> i32 {
        self as i32
    }
}

/// Reductions of [`Tensor::reduce`] over one axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// Sum (code 0).
    Sum,
    /// Mean (code 1).
    Mean,
    /// Maximum (code 2).
    Max,
    /// Minimum (code 3).
    Min,
    /// Index of the first maximum, as i64 (code 4).
    ArgMax,
}

impl ReduceOp {
    /// The ABI code.
    pub fn code(self) -> i32 {
        self as i32
    }
}

/// A tensor on the host, held by its handle.
///
/// Dropping it frees the handle, except for assets ([`Tensor::asset`]),
/// which the instance keeps for as long as it lives. A `Tensor` kept in a
/// `static` survives between invocations and migrations: linear memory and
/// handle numbers are restored as they were.
pub struct Tensor {
    handle: i32,
    /// Whether dropping frees the handle.
    owned: bool,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tensor")
            .field("handle", &self.handle)
            .field("owned", &self.owned)
            .finish()
    }
}

impl Drop for Tensor {
    fn drop(&mut self) {
        if self.owned {
            // Nothing to do about a failure: the handle is gone either way.
            let _ = sys::free(self.handle);
        }
    }
}

/// A shape as the ABI's u32 dims.
fn dims_u32(shape: &[usize]) -> Result<Vec<u32>> {
    shape
        .iter()
        .map(|&d| u32::try_from(d).map_err(|_| invalid(format!("dim {d} does not fit a u32"))))
        .collect()
}

fn invalid(message: String) -> Error {
    Error::with_code(-7, message)
}

impl Tensor {
    /// Takes ownership of a handle returned by an op (or an error code).
    fn owned(ret: i32) -> Result<Tensor> {
        Ok(Tensor {
            handle: check(ret)?,
            owned: true,
        })
    }

    /// A tensor of `shape` from row-major `data`; `data.len()` must be the
    /// product of `shape`.
    pub fn new<T: Element>(shape: &[usize], data: &[T]) -> Result<Tensor> {
        let mut bytes = Vec::with_capacity(data.len() * T::DTYPE.size());
        for &x in data {
            x.put(&mut bytes);
        }
        Tensor::from_bytes(T::DTYPE, shape, &bytes)
    }

    /// A tensor from its little-endian bytes; `bytes.len()` must equal the
    /// tensor's byte size. The way to make f16 and bf16 tensors.
    pub fn from_bytes(dtype: DType, shape: &[usize], bytes: &[u8]) -> Result<Tensor> {
        Tensor::owned(sys::new(dtype.code(), &dims_u32(shape)?, bytes))
    }

    /// A tensor of zeros.
    pub fn zeros(dtype: DType, shape: &[usize]) -> Result<Tensor> {
        Tensor::owned(sys::zeros(dtype.code(), &dims_u32(shape)?))
    }

    /// A read-only weight of the function (from the safetensors it was
    /// registered with). The handle belongs to the instance, which gives
    /// the same handle for the same name: dropping this never frees it, and
    /// it counts against no quota.
    pub fn asset(name: &str) -> Result<Tensor> {
        Ok(Tensor {
            handle: check(sys::asset(name))?,
            owned: false,
        })
    }

    /// Takes ownership of a raw handle (one from [`Tensor::into_raw`], or
    /// from the raw ABI); it is freed when the result is dropped.
    pub fn from_raw(handle: i32) -> Tensor {
        Tensor {
            handle,
            owned: true,
        }
    }

    /// Gives up ownership: returns the handle without freeing it.
    pub fn into_raw(self) -> i32 {
        let h = self.handle;
        std::mem::forget(self);
        h
    }

    /// The handle, for the raw ABI.
    pub fn handle(&self) -> i32 {
        self.handle
    }

    /// The element type.
    pub fn dtype(&self) -> Result<DType> {
        let code = check(sys::dtype(self.handle))?;
        DType::from_code(code)
            .ok_or_else(|| Error::with_code(-3, format!("unknown dtype code {code}")))
    }

    /// The number of dims.
    pub fn ndim(&self) -> Result<usize> {
        Ok(check(sys::ndim(self.handle))? as usize)
    }

    /// The dims.
    pub fn shape(&self) -> Result<Vec<usize>> {
        let mut dims = vec![0u32; 8];
        let mut n = check(sys::shape(self.handle, &mut dims))? as usize;
        if n > dims.len() {
            dims.resize(n, 0);
            n = check(sys::shape(self.handle, &mut dims))? as usize;
        }
        Ok(dims[..n].iter().map(|&d| d as usize).collect())
    }

    /// The number of elements.
    pub fn numel(&self) -> Result<usize> {
        Ok(self.shape()?.iter().product())
    }

    /// The row-major little-endian bytes; waits for the device.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let n = self.numel()? * self.dtype()?.size();
        let mut buf = vec![0u8; n];
        let written = check(sys::read(self.handle, &mut buf))? as usize;
        buf.truncate(written);
        Ok(buf)
    }

    /// The elements in row-major order; the dtype must be `T`'s. Waits for
    /// the device.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        let dtype = self.dtype()?;
        if dtype != T::DTYPE {
            return Err(Error::with_code(
                -3,
                format!("the tensor is {dtype:?}, not {:?}", T::DTYPE),
            ));
        }
        let bytes = self.to_bytes()?;
        Ok(bytes.chunks_exact(dtype.size()).map(T::take).collect())
    }

    /// A second handle to the same data (the ABI's reshape to the same
    /// shape, which shares storage): an owned copy of an asset or an input
    /// that outlives the invocation.
    pub fn try_clone(&self) -> Result<Tensor> {
        let dims = dims_u32(&self.shape()?)?;
        Tensor::owned(sys::reshape(self.handle, &dims))
    }

    /// `self × other`: `[.., m, k] × [.., k, n]` with batch dims
    /// broadcast; 1-D operands as in numpy.
    pub fn matmul(&self, other: &Tensor) -> Result<Tensor> {
        Tensor::owned(sys::matmul(self.handle, other.handle))
    }

    /// `self ∘ other` elementwise, with numpy broadcasting; any dtype, both
    /// the same.
    pub fn binary(&self, op: BinaryOp, other: &Tensor) -> Result<Tensor> {
        Tensor::owned(sys::binary(op.code(), self.handle, other.handle))
    }

    /// `self + other`, broadcasting.
    pub fn add(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(BinaryOp::Add, other)
    }

    /// `self - other`, broadcasting.
    pub fn sub(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(BinaryOp::Sub, other)
    }

    /// `self * other` elementwise, broadcasting.
    pub fn mul(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(BinaryOp::Mul, other)
    }

    /// `self / other` elementwise, broadcasting.
    pub fn div(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(BinaryOp::Div, other)
    }

    /// Elementwise maximum, broadcasting.
    pub fn maximum(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(BinaryOp::Max, other)
    }

    /// Elementwise minimum, broadcasting.
    pub fn minimum(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(BinaryOp::Min, other)
    }

    /// `self ^ other` elementwise, broadcasting.
    pub fn pow(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(BinaryOp::Pow, other)
    }

    /// `self ∘ value` elementwise, `value` cast to the tensor's dtype.
    pub fn scalar(&self, op: BinaryOp, value: f32) -> Result<Tensor> {
        Tensor::owned(sys::scalar(op.code(), self.handle, value))
    }

    /// `self + value`.
    pub fn add_scalar(&self, value: f32) -> Result<Tensor> {
        self.scalar(BinaryOp::Add, value)
    }

    /// `self - value`.
    pub fn sub_scalar(&self, value: f32) -> Result<Tensor> {
        self.scalar(BinaryOp::Sub, value)
    }

    /// `self * value`.
    pub fn mul_scalar(&self, value: f32) -> Result<Tensor> {
        self.scalar(BinaryOp::Mul, value)
    }

    /// `self / value`.
    pub fn div_scalar(&self, value: f32) -> Result<Tensor> {
        self.scalar(BinaryOp::Div, value)
    }

    /// `max(self, value)`.
    pub fn max_scalar(&self, value: f32) -> Result<Tensor> {
        self.scalar(BinaryOp::Max, value)
    }

    /// `min(self, value)`.
    pub fn min_scalar(&self, value: f32) -> Result<Tensor> {
        self.scalar(BinaryOp::Min, value)
    }

    /// `self ^ value`.
    pub fn pow_scalar(&self, value: f32) -> Result<Tensor> {
        self.scalar(BinaryOp::Pow, value)
    }

    /// An elementwise function; float dtypes.
    pub fn unary(&self, op: UnaryOp) -> Result<Tensor> {
        Tensor::owned(sys::unary(op.code(), self.handle))
    }

    /// `-self`.
    pub fn neg(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Neg)
    }

    /// `eˣ`.
    pub fn exp(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Exp)
    }

    /// `ln x`.
    pub fn log(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Log)
    }

    /// `√x`.
    pub fn sqrt(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Sqrt)
    }

    /// `tanh x`.
    pub fn tanh(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Tanh)
    }

    /// `1 / (1 + e⁻ˣ)`.
    pub fn sigmoid(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Sigmoid)
    }

    /// `max(x, 0)`.
    pub fn relu(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Relu)
    }

    /// GELU, erf form.
    pub fn gelu(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Gelu)
    }

    /// `x · sigmoid(x)`.
    pub fn silu(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Silu)
    }

    /// `|x|`.
    pub fn abs(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Abs)
    }

    /// Reduces over `axis` (negative counts from the end), keeping it as a
    /// dim of 1 when `keepdim`.
    pub fn reduce(&self, op: ReduceOp, axis: i32, keepdim: bool) -> Result<Tensor> {
        Tensor::owned(sys::reduce(op.code(), self.handle, axis, keepdim))
    }

    /// Sum over `axis`.
    pub fn sum(&self, axis: i32, keepdim: bool) -> Result<Tensor> {
        self.reduce(ReduceOp::Sum, axis, keepdim)
    }

    /// Mean over `axis`.
    pub fn mean(&self, axis: i32, keepdim: bool) -> Result<Tensor> {
        self.reduce(ReduceOp::Mean, axis, keepdim)
    }

    /// Maximum over `axis`.
    pub fn max(&self, axis: i32, keepdim: bool) -> Result<Tensor> {
        self.reduce(ReduceOp::Max, axis, keepdim)
    }

    /// Minimum over `axis`.
    pub fn min(&self, axis: i32, keepdim: bool) -> Result<Tensor> {
        self.reduce(ReduceOp::Min, axis, keepdim)
    }

    /// Index of the first maximum over `axis`, as i64.
    pub fn argmax(&self, axis: i32, keepdim: bool) -> Result<Tensor> {
        self.reduce(ReduceOp::ArgMax, axis, keepdim)
    }

    /// Softmax over `axis`, numerically stable.
    pub fn softmax(&self, axis: i32) -> Result<Tensor> {
        Tensor::owned(sys::softmax(self.handle, axis))
    }

    /// Layer norm over the last axis (biased variance), optionally scaled
    /// by `gamma` and shifted by `beta`.
    pub fn layer_norm(
        &self,
        gamma: Option<&Tensor>,
        beta: Option<&Tensor>,
        eps: f32,
    ) -> Result<Tensor> {
        Tensor::owned(sys::layer_norm(
            self.handle,
            gamma.map_or(0, |g| g.handle),
            beta.map_or(0, |b| b.handle),
            eps,
        ))
    }

    /// `x / √(mean(x²) + eps) · gamma` over the last axis.
    pub fn rms_norm(&self, gamma: Option<&Tensor>, eps: f32) -> Result<Tensor> {
        Tensor::owned(sys::rms_norm(
            self.handle,
            gamma.map_or(0, |g| g.handle),
            eps,
        ))
    }

    /// The same data under new dims; one dim may be -1 (inferred).
    pub fn reshape(&self, shape: &[i64]) -> Result<Tensor> {
        let dims = shape
            .iter()
            .map(|&d| match d {
                -1 => Ok(u32::MAX),
                d => u32::try_from(d)
                    .ok()
                    .filter(|&d| d != u32::MAX)
                    .ok_or_else(|| invalid(format!("reshape: dim {d} is out of range"))),
            })
            .collect::<Result<Vec<u32>>>()?;
        Tensor::owned(sys::reshape(self.handle, &dims))
    }

    /// Permutes dims: output dim i is input dim `perm[i]`.
    pub fn transpose(&self, perm: &[usize]) -> Result<Tensor> {
        Tensor::owned(sys::transpose(self.handle, &dims_u32(perm)?))
    }

    /// Converts to `dtype`: float → int saturates (NaN → 0), int → int
    /// wraps.
    pub fn cast(&self, dtype: DType) -> Result<Tensor> {
        Tensor::owned(sys::cast(self.handle, dtype.code()))
    }

    /// Rows of `self` (the table) picked by i32/i64 `indices`, as for
    /// embeddings; an index out of range is [`crate::ErrorKind::InvalidArgument`].
    pub fn gather(&self, indices: &Tensor) -> Result<Tensor> {
        Tensor::owned(sys::gather(self.handle, indices.handle))
    }

    /// `self` and `other` joined along `axis`.
    pub fn concat(&self, other: &Tensor, axis: i32) -> Result<Tensor> {
        Tensor::owned(sys::concat(self.handle, other.handle, axis))
    }

    /// `softmax(self·kᵀ/√d)·v` with `self` as the queries, over `[.., seq,
    /// d]`; `causal` masks key j for query i when j > i.
    pub fn attention(&self, k: &Tensor, v: &Tensor, causal: bool) -> Result<Tensor> {
        Tensor::owned(sys::attention(self.handle, k.handle, v.handle, causal))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn dtype_codes_round_trip() {
        for d in [
            DType::F32,
            DType::F16,
            DType::BF16,
            DType::I32,
            DType::I64,
            DType::U8,
        ] {
            assert_eq!(DType::from_code(d.code()), Some(d));
        }
        assert_eq!(DType::from_code(6), None);
    }

    #[test]
    fn op_codes_follow_the_abi() {
        assert_eq!(BinaryOp::Pow.code(), 6);
        assert_eq!(UnaryOp::Abs.code(), 9);
        assert_eq!(UnaryOp::Gelu.code(), 7);
        assert_eq!(ReduceOp::ArgMax.code(), 4);
    }

    #[test]
    fn elements_are_little_endian() {
        let mut out = Vec::new();
        1.5f32.put(&mut out);
        (-2i64).put(&mut out);
        assert_eq!(f32::take(&out[..4]), 1.5);
        assert_eq!(i64::take(&out[4..]), -2);
    }

    #[test]
    fn off_wasm_every_op_fails_cleanly() {
        let e = Tensor::zeros(DType::F32, &[2]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Device);
        assert_eq!(
            Tensor::from_raw(3).reshape(&[-2]).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
    }
}
