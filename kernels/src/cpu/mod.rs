//! The CPU backend: the reference every other backend is checked against,
//! and the embedded default where there is no GPU.
//!
//! Matmul and attention run on OpenBLAS's sgemm (f16/bf16 widened to f32);
//! everything else is plain Rust over typed vectors, split across rayon's
//! threads once a tensor is large enough to pay for it. Ops run eagerly:
//! when a method returns, its result is computed.

mod element;
mod elementwise;
mod layout;
mod linalg;
mod reduce;

use std::ops::Range;

use tensor_wasm_shared::DType;

use self::element::{CastVal, Element};
use self::reduce::Fold;
use crate::backend::{Backend, BackendKind};
use crate::error::{KernelError, Result};
use crate::ops::{BinaryOp, ReduceOp, UnaryOp};
use crate::shape::{self, Limits};
use crate::tensor::{CpuStorage, SharedBytes, Storage, Tensor};

/// The CPU backend. Cheap to create; holds only its limits.
#[derive(Debug, Default, Clone)]
pub struct CpuBackend {
    limits: Limits,
}

/// Calls `$body` with `$v` bound to the typed slice of `$s`, whatever its
/// dtype; `$T` names the element type inside the body.
macro_rules! with_slice {
    ($s:expr, |$v:ident: $T:ident| $body:expr) => {
        match $s {
            CpuStorage::F32($v) => {
                type $T = f32;
                $body
            }
            CpuStorage::F16($v) => {
                type $T = half::f16;
                $body
            }
            CpuStorage::BF16($v) => {
                type $T = half::bf16;
                $body
            }
            CpuStorage::I32($v) => {
                type $T = i32;
                $body
            }
            CpuStorage::I64($v) => {
                type $T = i64;
                $body
            }
            CpuStorage::U8($v) => {
                type $T = u8;
                $body
            }
        }
    };
}

/// As [`with_slice`], for float storage only; other dtypes are refused.
macro_rules! with_float_slice {
    ($op:expr, $s:expr, |$v:ident: $T:ident| $body:expr) => {
        match $s {
            CpuStorage::F32($v) => {
                type $T = f32;
                $body
            }
            CpuStorage::F16($v) => {
                type $T = half::f16;
                $body
            }
            CpuStorage::BF16($v) => {
                type $T = half::bf16;
                $body
            }
            other => Err(KernelError::DTypeUnsupported {
                op: $op,
                dtype: other.dtype(),
            }),
        }
    };
}

impl CpuBackend {
    pub fn new(limits: Limits) -> CpuBackend {
        crate::threads::init();
        CpuBackend { limits }
    }

    /// The host storage of `t`, or an error naming the op if `t` lives on
    /// another device.
    fn host<'t>(&self, op: &'static str, t: &'t Tensor) -> Result<&'t CpuStorage> {
        match t.storage() {
            Storage::Cpu(s) => Ok(s),
            #[allow(unreachable_patterns)]
            other => Err(KernelError::WrongDevice {
                op,
                expected: "cpu",
                found: other.kind(),
            }),
        }
    }

    fn same_dtype(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
        if a.dtype() != b.dtype() {
            return Err(KernelError::DTypeMismatch {
                op,
                a: a.dtype(),
                b: b.dtype(),
            });
        }
        Ok(())
    }

    fn float_only(op: &'static str, t: &Tensor) -> Result<()> {
        if !t.dtype().is_float() {
            return Err(KernelError::DTypeUnsupported {
                op,
                dtype: t.dtype(),
            });
        }
        Ok(())
    }
}

/// The typed slice of `s` as `T`; `s` has been checked to hold `T`.
fn typed<'s, T: Element>(op: &'static str, s: &'s CpuStorage) -> Result<&'s [T]> {
    T::slice(s).ok_or(KernelError::DTypeMismatch {
        op,
        a: T::DTYPE,
        b: s.dtype(),
    })
}

fn tensor<T: Element>(dims: &[usize], v: Vec<T>) -> Result<Tensor> {
    Tensor::from_cpu(dims, T::wrap(v))
}

impl Backend for CpuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cpu
    }

    fn device_name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn limits(&self) -> &Limits {
        &self.limits
    }

    fn from_bytes(&self, dtype: DType, dims: &[usize], bytes: &[u8]) -> Result<Tensor> {
        let numel = self.limits.check_tensor("new", dtype, dims)?;
        let want = numel * dtype.size();
        if bytes.len() != want {
            return Err(KernelError::invalid(
                "new",
                format!(
                    "{dims:?} {dtype} takes {want} bytes, {} were given",
                    bytes.len()
                ),
            ));
        }
        Tensor::from_cpu(dims, CpuStorage::from_le_bytes(dtype, bytes))
    }

    fn from_shared(
        &self,
        dtype: DType,
        dims: &[usize],
        bytes: SharedBytes,
        range: Range<usize>,
    ) -> Result<Tensor> {
        let numel = self.limits.check_tensor("new", dtype, dims)?;
        let want = numel * dtype.size();
        if range.len() != want {
            return Err(KernelError::invalid(
                "new",
                format!(
                    "{dims:?} {dtype} takes {want} bytes, {} were given",
                    range.len()
                ),
            ));
        }
        if let Some(s) = CpuStorage::from_shared(dtype, bytes.clone(), range.clone()) {
            return Tensor::from_cpu(dims, s);
        }
        let slice = (*bytes).as_ref().get(range.clone()).ok_or_else(|| {
            KernelError::invalid("new", format!("byte range {range:?} is out of bounds"))
        })?;
        Tensor::from_cpu(dims, CpuStorage::from_le_bytes(dtype, slice))
    }

    fn zeros(&self, dtype: DType, dims: &[usize]) -> Result<Tensor> {
        let numel = self.limits.check_tensor("zeros", dtype, dims)?;
        Tensor::from_cpu(dims, CpuStorage::zeros(dtype, numel))
    }

    fn to_bytes(&self, t: &Tensor) -> Result<Vec<u8>> {
        Ok(self.host("read", t)?.as_le_bytes().to_vec())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn matmul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        const OP: &str = "matmul";
        Self::same_dtype(OP, a, b)?;
        let plan = shape::plan_matmul(&self.limits, a.dtype(), a.dims(), b.dims())?;
        let bs = self.host(OP, b)?;
        with_float_slice!(OP, self.host(OP, a)?, |x: T| {
            tensor(
                &plan.out_dims,
                linalg::matmul::<T>(x, typed(OP, bs)?, &plan)?,
            )
        })
    }

    fn binary(&self, op: BinaryOp, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        const OP: &str = "binary";
        Self::same_dtype(OP, a, b)?;
        let plan = shape::plan_binary(&self.limits, OP, a.dtype(), a.dims(), b.dims())?;
        let bs = self.host(OP, b)?;
        with_slice!(self.host(OP, a)?, |x: T| {
            tensor(
                &plan.out_dims,
                elementwise::binary::<T>(op, x, typed(OP, bs)?, &plan),
            )
        })
    }

    fn scalar(&self, op: BinaryOp, a: &Tensor, value: f32) -> Result<Tensor> {
        const OP: &str = "scalar";
        self.limits.check_work(OP, a.numel() as u128)?;
        let v = CastVal::Float(f64::from(value));
        with_slice!(self.host(OP, a)?, |x: T| {
            tensor(a.dims(), elementwise::scalar::<T>(op, x, T::from_cast(v)))
        })
    }

    fn unary(&self, op: UnaryOp, a: &Tensor) -> Result<Tensor> {
        const OP: &str = "unary";
        self.limits.check_work(OP, a.numel() as u128)?;
        with_float_slice!(OP, self.host(OP, a)?, |x: T| {
            tensor(a.dims(), elementwise::unary::<T>(op, x))
        })
    }

    fn reduce(&self, op: ReduceOp, a: &Tensor, axis: i64, keepdim: bool) -> Result<Tensor> {
        const OP: &str = "reduce";
        let plan = shape::plan_reduce(&self.limits, OP, a.dims(), axis, keepdim)?;
        let needs_element = matches!(op, ReduceOp::Max | ReduceOp::Min | ReduceOp::ArgMax);
        if needs_element && plan.len == 0 && plan.outer * plan.inner > 0 {
            return Err(KernelError::invalid(
                OP,
                format!("{} over an empty axis has no result", op.name()),
            ));
        }
        let fold = match op {
            ReduceOp::Sum => Fold::Sum,
            ReduceOp::Mean => Fold::Mean,
            ReduceOp::Max => Fold::Max,
            ReduceOp::Min => Fold::Min,
            ReduceOp::ArgMax => {
                return with_slice!(self.host(OP, a)?, |x: T| {
                    tensor(&plan.out_dims, reduce::argmax::<T>(x, &plan))
                });
            }
        };
        with_slice!(self.host(OP, a)?, |x: T| {
            tensor(&plan.out_dims, reduce::reduce::<T>(fold, x, &plan))
        })
    }

    fn softmax(&self, a: &Tensor, axis: i64) -> Result<Tensor> {
        const OP: &str = "softmax";
        Self::float_only(OP, a)?;
        let plan = shape::plan_softmax(&self.limits, a.dims(), axis)?;
        with_float_slice!(OP, self.host(OP, a)?, |x: T| {
            tensor(a.dims(), reduce::softmax::<T>(x, &plan))
        })
    }

    fn layer_norm(
        &self,
        x: &Tensor,
        gamma: Option<&Tensor>,
        beta: Option<&Tensor>,
        eps: f32,
    ) -> Result<Tensor> {
        self.norm("layer_norm", x, gamma, beta, eps, false)
    }

    fn rms_norm(&self, x: &Tensor, gamma: Option<&Tensor>, eps: f32) -> Result<Tensor> {
        self.norm("rms_norm", x, gamma, None, eps, true)
    }

    fn reshape(&self, a: &Tensor, dims: &[i64]) -> Result<Tensor> {
        self.host("reshape", a)?;
        let out = shape::plan_reshape(&self.limits, a.dtype(), a.numel(), dims)?;
        Ok(a.with_dims(&out))
    }

    fn transpose(&self, a: &Tensor, perm: &[usize]) -> Result<Tensor> {
        const OP: &str = "transpose";
        let plan = shape::plan_transpose(&self.limits, a.dims(), perm)?;
        with_slice!(self.host(OP, a)?, |x: T| {
            tensor(
                &plan.out_dims,
                layout::strided_copy::<T>(x, &plan.out_dims, &plan.in_strides, plan.numel),
            )
        })
    }

    fn cast(&self, a: &Tensor, dtype: DType) -> Result<Tensor> {
        const OP: &str = "cast";
        self.limits.check_tensor(OP, dtype, a.dims())?;
        self.limits.check_work(OP, a.numel() as u128)?;
        let src = self.host(OP, a)?;
        let out = with_slice!(src, |x: S| match dtype {
            DType::F32 => f32::wrap(elementwise::cast::<S, f32>(x)),
            DType::F16 => half::f16::wrap(elementwise::cast::<S, half::f16>(x)),
            DType::BF16 => half::bf16::wrap(elementwise::cast::<S, half::bf16>(x)),
            DType::I32 => i32::wrap(elementwise::cast::<S, i32>(x)),
            DType::I64 => i64::wrap(elementwise::cast::<S, i64>(x)),
            DType::U8 => u8::wrap(elementwise::cast::<S, u8>(x)),
        });
        Tensor::from_cpu(a.dims(), out)
    }

    fn gather(&self, table: &Tensor, indices: &Tensor) -> Result<Tensor> {
        const OP: &str = "gather";
        let plan = shape::plan_gather(&self.limits, table.dtype(), table.dims(), indices.dims())?;
        let rows = plan.rows;
        let check = |i: i64| {
            usize::try_from(i)
                .ok()
                .filter(|&r| r < rows)
                .ok_or_else(|| {
                    KernelError::invalid(OP, format!("index {i} is out of range for {rows} rows"))
                })
        };
        let idx: Vec<usize> = match self.host(OP, indices)? {
            CpuStorage::I32(v) => v
                .iter()
                .map(|&i| check(i64::from(i)))
                .collect::<Result<_>>()?,
            CpuStorage::I64(v) => v.iter().map(|&i| check(i)).collect::<Result<_>>()?,
            other => {
                return Err(KernelError::DTypeUnsupported {
                    op: OP,
                    dtype: other.dtype(),
                });
            }
        };
        with_slice!(self.host(OP, table)?, |x: T| {
            tensor(&plan.out_dims, layout::gather_rows::<T>(x, &idx, &plan))
        })
    }

    fn concat(&self, a: &Tensor, b: &Tensor, axis: i64) -> Result<Tensor> {
        const OP: &str = "concat";
        Self::same_dtype(OP, a, b)?;
        let plan = shape::plan_concat(&self.limits, a.dtype(), a.dims(), b.dims(), axis)?;
        let bs = self.host(OP, b)?;
        with_slice!(self.host(OP, a)?, |x: T| {
            tensor(
                &plan.out_dims,
                layout::concat_blocks::<T>(x, typed(OP, bs)?, &plan),
            )
        })
    }

    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Result<Tensor> {
        const OP: &str = "attention";
        Self::same_dtype(OP, q, k)?;
        Self::same_dtype(OP, q, v)?;
        let plan = shape::plan_attention(&self.limits, q.dtype(), q.dims(), k.dims(), v.dims())?;
        let (ks, vs) = (self.host(OP, k)?, self.host(OP, v)?);
        with_float_slice!(OP, self.host(OP, q)?, |x: T| {
            tensor(
                &plan.out_dims,
                linalg::attention::<T>(x, typed(OP, ks)?, typed(OP, vs)?, causal, &plan)?,
            )
        })
    }
}

impl CpuBackend {
    fn norm(
        &self,
        op: &'static str,
        x: &Tensor,
        gamma: Option<&Tensor>,
        beta: Option<&Tensor>,
        eps: f32,
        rms: bool,
    ) -> Result<Tensor> {
        Self::float_only(op, x)?;
        for p in [gamma, beta].into_iter().flatten() {
            Self::same_dtype(op, x, p)?;
        }
        let plan = shape::plan_norm(
            &self.limits,
            op,
            x.dims(),
            &[gamma.map(Tensor::dims), beta.map(Tensor::dims)],
        )?;
        let g = gamma.map(|t| self.host(op, t)).transpose()?;
        let b = beta.map(|t| self.host(op, t)).transpose()?;
        with_float_slice!(op, self.host(op, x)?, |xs: T| {
            let g = g.map(|s| typed::<T>(op, s)).transpose()?;
            let b = b.map(|s| typed::<T>(op, s)).transpose()?;
            tensor(x.dims(), reduce::norm::<T>(xs, g, b, eps, rms, &plan))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Arc;

    fn f32s(b: &CpuBackend, dims: &[usize], v: &[f32]) -> Tensor {
        b.from_bytes(DType::F32, dims, bytemuck::cast_slice(v))
            .unwrap()
    }

    fn read_f32(b: &CpuBackend, t: &Tensor) -> Vec<f32> {
        bytemuck::pod_collect_to_vec(&b.to_bytes(t).unwrap())
    }

    #[test]
    fn matmul_runs_on_blas() {
        let b = CpuBackend::default();
        let x = f32s(&b, &[2, 3], &[1., 2., 3., 4., 5., 6.]);
        let y = f32s(&b, &[3, 2], &[7., 8., 9., 10., 11., 12.]);
        let z = b.matmul(&x, &y).unwrap();
        assert_eq!(z.dims(), &[2, 2]);
        assert_eq!(read_f32(&b, &z), vec![58., 64., 139., 154.]);
    }

    #[test]
    fn causal_attention_first_row_sees_only_itself() {
        let b = CpuBackend::default();
        let q = f32s(&b, &[2, 1], &[1., 1.]);
        let k = f32s(&b, &[2, 1], &[0., 5.]);
        let v = f32s(&b, &[2, 1], &[10., 20.]);
        let out = read_f32(&b, &b.attention(&q, &k, &v, true).unwrap());
        assert_eq!(out[0], 10.0);
        let p1 = 1.0 / (1.0 + (-5f32).exp());
        assert!((out[1] - (10.0 * (1.0 - p1) + 20.0 * p1)).abs() < 1e-4);
    }

    #[test]
    fn broadcast_binary_and_reduce() {
        let b = CpuBackend::default();
        let x = f32s(&b, &[2, 3], &[1., 2., 3., 4., 5., 6.]);
        let y = f32s(&b, &[3], &[10., 20., 30.]);
        let s = b.binary(BinaryOp::Add, &x, &y).unwrap();
        assert_eq!(read_f32(&b, &s), vec![11., 22., 33., 14., 25., 36.]);
        let r = b.reduce(ReduceOp::Sum, &s, 0, false).unwrap();
        assert_eq!(read_f32(&b, &r), vec![25., 47., 69.]);
        let am = b.reduce(ReduceOp::ArgMax, &x, -1, true).unwrap();
        assert_eq!(am.dtype(), DType::I64);
        assert_eq!(am.dims(), &[2, 1]);
    }

    /// f32 elements seen as bytes: aligned for f32 at offsets that are
    /// multiples of 4.
    struct F32Bytes(Vec<f32>);

    impl AsRef<[u8]> for F32Bytes {
        fn as_ref(&self) -> &[u8] {
            bytemuck::cast_slice(&self.0)
        }
    }

    fn shared(t: &Tensor) -> bool {
        match t.storage() {
            Storage::Cpu(s) => s.is_shared(),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    #[test]
    fn shared_bytes_are_borrowed_when_aligned_and_copied_when_not() {
        let b = CpuBackend::default();
        let bytes: SharedBytes = Arc::new(F32Bytes(vec![0., 1., 2., 3., 4.]));
        let t = b
            .from_shared(DType::F32, &[2], bytes.clone(), 4..12)
            .unwrap();
        assert!(shared(&t), "aligned: borrowed");
        assert_eq!(read_f32(&b, &t), vec![1., 2.]);
        let doubled = b.binary(BinaryOp::Add, &t, &t).unwrap();
        assert_eq!(read_f32(&b, &doubled), vec![2., 4.]);
        // Two bytes in: not aligned for f32, so copied, same values.
        let u = b.from_shared(DType::U8, &[3], bytes.clone(), 4..7).unwrap();
        assert!(shared(&u), "u8 is always aligned");
        let c = b
            .from_shared(DType::F32, &[1], bytes.clone(), 2..6)
            .unwrap();
        assert!(!shared(&c));
        let want: Vec<u8> = (*bytes).as_ref()[2..6].to_vec();
        assert_eq!(b.to_bytes(&c).unwrap(), want);
        // Wrong length, out of bounds.
        assert!(
            b.from_shared(DType::F32, &[3], bytes.clone(), 4..12)
                .is_err()
        );
        assert!(b.from_shared(DType::F32, &[2], bytes, 16..24).is_err());
    }

    #[test]
    fn tensors_of_another_dtype_are_refused() {
        let b = CpuBackend::default();
        let x = f32s(&b, &[2], &[1., 2.]);
        let i = b.zeros(DType::I32, &[2]).unwrap();
        let e = b.binary(BinaryOp::Add, &x, &i).unwrap_err();
        assert_eq!(e.abi(), tensor_wasm_shared::AbiError::DTypeUnsupported);
        let e = b.unary(UnaryOp::Exp, &i).unwrap_err();
        assert_eq!(e.abi(), tensor_wasm_shared::AbiError::DTypeUnsupported);
    }
}
