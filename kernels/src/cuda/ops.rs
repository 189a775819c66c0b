//! [`Backend`] for [`CudaBackend`]: validation through the shared plans,
//! then kernel launches.
//!
//! Every op first checks that its operands live on this device
//! ([`KernelError::WrongDevice`]), then runs the same checks as the CPU
//! backend in the same order (dtype agreement, the op's `plan_*` from
//! [`crate::shape`], the op's dtype domain, value checks such as empty
//! reduction axes and gather indices), so a call with several faults is
//! refused with the same error on both. Only then is memory allocated and
//! work enqueued.
//!
//! Each launch below passes its arguments in the exact order of the kernel
//! signature in kernels.cu, named in the comment above it.

use half::{bf16, f16};
use tensor_wasm_shared::DType;

use super::device::{REDUCE_NAMES, driver_error, dtype_suffix};
use super::launch::{BLOCK, Launch, coalesce};
use super::{CrossStream, CudaBackend, CudaStorage, tensor};
use crate::backend::{Backend, BackendKind};
use crate::error::{KernelError, Result};
use crate::ops::{BinaryOp, ReduceOp, UnaryOp};
use crate::shape::{
    AxisPlan, Limits, checked_numel, plan_binary, plan_concat, plan_gather, plan_norm, plan_reduce,
    plan_reshape, plan_softmax, plan_transpose,
};
use crate::tensor::Tensor;

/// Gather rows at least this long (in elements) use one block per index;
/// shorter rows one thread per output element, so short rows still fill
/// the GPU.
const GATHER_ROW_PER_BLOCK: usize = BLOCK as usize / 2;

/// The common dtype of `a` and `b`, or [`KernelError::DTypeMismatch`].
pub(super) fn same_dtype(op: &'static str, a: &Tensor, b: &Tensor) -> Result<DType> {
    if a.dtype() != b.dtype() {
        return Err(KernelError::DTypeMismatch {
            op,
            a: a.dtype(),
            b: b.dtype(),
        });
    }
    Ok(a.dtype())
}

fn float_only(op: &'static str, dtype: DType) -> Result<()> {
    if dtype.is_float() {
        Ok(())
    } else {
        Err(KernelError::DTypeUnsupported { op, dtype })
    }
}

/// `v` cast to `dtype` the way `cast` casts (saturating, NaN → 0, rounding
/// to the nearest f16/bf16), as the little-endian bit pattern the scalar
/// kernel reads. Half floats convert from the f64 value, bit for bit as the
/// CPU backend converts a scalar.
pub(crate) fn scalar_bits(dtype: DType, v: f32) -> u64 {
    match dtype {
        DType::F32 => u64::from(v.to_bits()),
        DType::F16 => u64::from(f16::from_f64(f64::from(v)).to_bits()),
        DType::BF16 => u64::from(bf16::from_f64(f64::from(v)).to_bits()),
        DType::I32 => u64::from(v as i32 as u32),
        DType::I64 => v as i64 as u64,
        DType::U8 => u64::from(v as u8),
    }
}

impl CudaBackend {
    /// Copies all of `src` into `dst` at `byte_offset` (stream-ordered).
    fn copy_into(
        &self,
        op: &'static str,
        dst: &mut CudaStorage,
        byte_offset: usize,
        src: &CudaStorage,
    ) -> Result<()> {
        let (Some(s), Some(d)) = (src.buf.as_ref(), dst.buf.as_mut()) else {
            return Ok(());
        };
        let _cross = CrossStream::begin(s, &self.stream).map_err(|e| driver_error(op, e))?;
        let end = byte_offset.saturating_add(s.len());
        let mut view = d
            .try_slice_mut(byte_offset..end)
            .ok_or_else(|| KernelError::Device(format!("{op}: copy out of range")))?;
        self.stream
            .memcpy_dtod(s, &mut view)
            .map_err(|e| driver_error(op, e))
    }
}

impl Backend for CudaBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cuda
    }

    fn device_name(&self) -> String {
        self.dev.name.clone()
    }

    fn limits(&self) -> &Limits {
        &self.limits
    }

    fn from_bytes(&self, dtype: DType, dims: &[usize], bytes: &[u8]) -> Result<Tensor> {
        const OP: &str = "new";
        let numel = self.limits.check_tensor(OP, dtype, dims)?;
        let want = numel * dtype.size();
        if bytes.len() != want {
            return Err(KernelError::invalid(
                OP,
                format!("{} bytes given; {dims:?} {dtype} needs {want}", bytes.len()),
            ));
        }
        let mut s = self.alloc_raw(OP, dtype, numel)?;
        if let Some(buf) = s.buf.as_mut() {
            self.staging
                .upload(&self.dev.ctx, &self.stream, OP, bytes, buf)?;
        }
        tensor(dims, s)
    }

    fn zeros(&self, dtype: DType, dims: &[usize]) -> Result<Tensor> {
        const OP: &str = "zeros";
        let numel = self.limits.check_tensor(OP, dtype, dims)?;
        let mut s = self.alloc_raw(OP, dtype, numel)?;
        self.fill_bytes(OP, &mut s, 0)?;
        tensor(dims, s)
    }

    fn to_bytes(&self, t: &Tensor) -> Result<Vec<u8>> {
        const OP: &str = "read";
        let s = self.storage(OP, t)?;
        let out = match s.buf.as_ref() {
            Some(buf) => {
                let _cross =
                    CrossStream::begin(buf, &self.stream).map_err(|e| driver_error(OP, e))?;
                self.staging
                    .download(&self.dev.ctx, &self.stream, OP, buf)?
            }
            None => Vec::new(),
        };
        self.wait(OP)?;
        Ok(out)
    }

    fn synchronize(&self) -> Result<()> {
        self.wait("synchronize")
    }

    fn matmul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.matmul_impl(a, b)
    }

    fn binary(&self, op: BinaryOp, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        const OP: &str = "binary";
        let sa = self.storage(OP, a)?;
        let sb = self.storage(OP, b)?;
        let dtype = same_dtype(OP, a, b)?;
        let plan = plan_binary(&self.limits, OP, dtype, a.dims(), b.dims())?;
        let mut out = self.alloc(OP, dtype, plan.numel)?;
        if plan.numel > 0 {
            let t = dtype_suffix(dtype);
            let n = plan.numel as u64;
            let (dims, strides) =
                coalesce(OP, &plan.out_dims, &[&plan.a_strides, &plan.b_strides])?;
            let contiguous = dims.len() <= 1 && strides.iter().flatten().all(|&s| s == 1);
            if contiguous {
                // binary_same_T(int op, u64 n, const T* a, const T* b, T* out)
                Launch::new(&self.stream)
                    .i32(op as i32)
                    .u64(n)
                    .input(sa)
                    .input(sb)
                    .output(&mut out)
                    .run(
                        &self.dev,
                        OP,
                        &format!("binary_same_{t}"),
                        self.dev.grid(n.div_ceil(4)),
                    )?;
            } else {
                // binary_bcast_T(int op, u64 n, u64 rank, Dims dims, Dims sa,
                //                Dims sb, const T* a, const T* b, T* out)
                Launch::new(&self.stream)
                    .i32(op as i32)
                    .u64(n)
                    .usize(dims.len())
                    .dims(&dims)
                    .dims(&strides[0])
                    .dims(&strides[1])
                    .input(sa)
                    .input(sb)
                    .output(&mut out)
                    .run(
                        &self.dev,
                        OP,
                        &format!("binary_bcast_{t}"),
                        self.dev.grid(n),
                    )?;
            }
        }
        tensor(&plan.out_dims, out)
    }

    fn scalar(&self, op: BinaryOp, a: &Tensor, value: f32) -> Result<Tensor> {
        const OP: &str = "scalar";
        let sa = self.storage(OP, a)?;
        let dtype = a.dtype();
        let numel = a.numel();
        self.limits.check_work(OP, numel as u128)?;
        let mut out = self.alloc(OP, dtype, numel)?;
        if numel > 0 {
            let n = numel as u64;
            // scalar_T(int op, u64 n, const T* a, u64 bits, T* out)
            Launch::new(&self.stream)
                .i32(op as i32)
                .u64(n)
                .input(sa)
                .u64(scalar_bits(dtype, value))
                .output(&mut out)
                .run(
                    &self.dev,
                    OP,
                    &format!("scalar_{}", dtype_suffix(dtype)),
                    self.dev.grid(n.div_ceil(4)),
                )?;
        }
        tensor(a.dims(), out)
    }

    fn unary(&self, op: UnaryOp, a: &Tensor) -> Result<Tensor> {
        const OP: &str = "unary";
        let sa = self.storage(OP, a)?;
        let dtype = a.dtype();
        let numel = a.numel();
        self.limits.check_work(OP, numel as u128)?;
        float_only(OP, dtype)?;
        let mut out = self.alloc(OP, dtype, numel)?;
        if numel > 0 {
            let n = numel as u64;
            // unary_T(int op, u64 n, const T* a, T* out)
            Launch::new(&self.stream)
                .i32(op as i32)
                .u64(n)
                .input(sa)
                .output(&mut out)
                .run(
                    &self.dev,
                    OP,
                    &format!("unary_{}", dtype_suffix(dtype)),
                    self.dev.grid(n.div_ceil(4)),
                )?;
        }
        tensor(a.dims(), out)
    }

    fn reduce(&self, op: ReduceOp, a: &Tensor, axis: i64, keepdim: bool) -> Result<Tensor> {
        const OP: &str = "reduce";
        let sa = self.storage(OP, a)?;
        let plan = plan_reduce(&self.limits, OP, a.dims(), axis, keepdim)?;
        let outputs = checked_numel(&plan.out_dims).unwrap_or(usize::MAX);
        if plan.len == 0
            && outputs > 0
            && matches!(op, ReduceOp::Max | ReduceOp::Min | ReduceOp::ArgMax)
        {
            return Err(KernelError::invalid(
                OP,
                format!("{} over an empty axis", op.name()),
            ));
        }
        let out_dtype = match op {
            ReduceOp::ArgMax => DType::I64,
            _ => a.dtype(),
        };
        let numel = self.limits.check_tensor(OP, out_dtype, &plan.out_dims)?;
        let mut out = self.alloc(OP, out_dtype, numel)?;
        if numel > 0 {
            let name = format!("{}_{}", REDUCE_NAMES[op as usize], dtype_suffix(a.dtype()));
            self.launch_axis(OP, "reduce", &name, &plan, sa, &mut out)?;
        }
        tensor(&plan.out_dims, out)
    }

    fn softmax(&self, a: &Tensor, axis: i64) -> Result<Tensor> {
        const OP: &str = "softmax";
        let sa = self.storage(OP, a)?;
        let dtype = a.dtype();
        float_only(OP, dtype)?;
        let plan = plan_softmax(&self.limits, a.dims(), axis)?;
        let numel = a.numel();
        let mut out = self.alloc(OP, dtype, numel)?;
        if numel > 0 {
            self.launch_axis(OP, "softmax", dtype_suffix(dtype), &plan, sa, &mut out)?;
        }
        tensor(a.dims(), out)
    }

    fn layer_norm(
        &self,
        x: &Tensor,
        gamma: Option<&Tensor>,
        beta: Option<&Tensor>,
        eps: f32,
    ) -> Result<Tensor> {
        const OP: &str = "layer_norm";
        let sx = self.storage(OP, x)?;
        let sg = gamma.map(|g| self.storage(OP, g)).transpose()?;
        let sb = beta.map(|b| self.storage(OP, b)).transpose()?;
        let dtype = x.dtype();
        float_only(OP, dtype)?;
        for p in [gamma, beta].into_iter().flatten() {
            same_dtype(OP, x, p)?;
        }
        let plan = plan_norm(
            &self.limits,
            OP,
            x.dims(),
            &[gamma.map(Tensor::dims), beta.map(Tensor::dims)],
        )?;
        let numel = x.numel();
        let mut out = self.alloc(OP, dtype, numel)?;
        if numel > 0 {
            // layer_norm_T(u64 rows, u64 cols, const T* x, const T* gamma,
            //              const T* beta, float eps, T* out)
            Launch::new(&self.stream)
                .usize(plan.rows)
                .usize(plan.cols)
                .input(sx)
                .opt_input(sg)
                .opt_input(sb)
                .f32(eps)
                .output(&mut out)
                .run(
                    &self.dev,
                    OP,
                    &format!("layer_norm_{}", dtype_suffix(dtype)),
                    self.dev.row_grid(plan.rows as u64),
                )?;
        }
        tensor(x.dims(), out)
    }

    fn rms_norm(&self, x: &Tensor, gamma: Option<&Tensor>, eps: f32) -> Result<Tensor> {
        const OP: &str = "rms_norm";
        let sx = self.storage(OP, x)?;
        let sg = gamma.map(|g| self.storage(OP, g)).transpose()?;
        let dtype = x.dtype();
        float_only(OP, dtype)?;
        if let Some(g) = gamma {
            same_dtype(OP, x, g)?;
        }
        let plan = plan_norm(&self.limits, OP, x.dims(), &[gamma.map(Tensor::dims)])?;
        let numel = x.numel();
        let mut out = self.alloc(OP, dtype, numel)?;
        if numel > 0 {
            // rms_norm_T(u64 rows, u64 cols, const T* x, const T* gamma,
            //            float eps, T* out)
            Launch::new(&self.stream)
                .usize(plan.rows)
                .usize(plan.cols)
                .input(sx)
                .opt_input(sg)
                .f32(eps)
                .output(&mut out)
                .run(
                    &self.dev,
                    OP,
                    &format!("rms_norm_{}", dtype_suffix(dtype)),
                    self.dev.row_grid(plan.rows as u64),
                )?;
        }
        tensor(x.dims(), out)
    }

    fn reshape(&self, a: &Tensor, dims: &[i64]) -> Result<Tensor> {
        const OP: &str = "reshape";
        self.storage(OP, a)?;
        let dims = plan_reshape(&self.limits, a.dtype(), a.numel(), dims)?;
        Ok(a.with_dims(&dims))
    }

    fn transpose(&self, a: &Tensor, perm: &[usize]) -> Result<Tensor> {
        const OP: &str = "transpose";
        let sa = self.storage(OP, a)?;
        let plan = plan_transpose(&self.limits, a.dims(), perm)?;
        if plan.numel == 0 {
            return Ok(a.with_dims(&plan.out_dims));
        }
        let (dims, strides) = coalesce(OP, &plan.out_dims, &[&plan.in_strides])?;
        if dims.len() <= 1 && strides[0].iter().all(|&s| s == 1) {
            // The permutation only moves unit dims: same element order,
            // so the result shares the storage.
            return Ok(a.with_dims(&plan.out_dims));
        }
        let dtype = a.dtype();
        let mut out = self.alloc(OP, dtype, plan.numel)?;
        let n = plan.numel as u64;
        // permute_E(u64 n, u64 rank, Dims dims, Dims strides, const E* in,
        //           E* out)
        Launch::new(&self.stream)
            .u64(n)
            .usize(dims.len())
            .dims(&dims)
            .dims(&strides[0])
            .input(sa)
            .output(&mut out)
            .run(
                &self.dev,
                OP,
                &format!("permute_{}", dtype.size()),
                self.dev.grid(n),
            )?;
        tensor(&plan.out_dims, out)
    }

    fn cast(&self, a: &Tensor, dtype: DType) -> Result<Tensor> {
        const OP: &str = "cast";
        let sa = self.storage(OP, a)?;
        let numel = self.limits.check_tensor(OP, dtype, a.dims())?;
        self.limits.check_work(OP, numel as u128)?;
        if dtype == a.dtype() {
            // Tensors are immutable: the same elements need no copy.
            return Ok(a.clone());
        }
        let mut out = self.alloc(OP, dtype, numel)?;
        if numel > 0 {
            let n = numel as u64;
            // cast_S_D(u64 n, const S* x, D* y)
            Launch::new(&self.stream)
                .u64(n)
                .input(sa)
                .output(&mut out)
                .run(
                    &self.dev,
                    OP,
                    &format!("cast_{}_{}", dtype_suffix(a.dtype()), dtype_suffix(dtype)),
                    self.dev.grid(n),
                )?;
        }
        tensor(a.dims(), out)
    }

    /// Out-of-range indices are detected on the device: the gather kernel
    /// raises a flag (and writes zeros instead of reading outside the
    /// table), and the call waits for the stream to read the flag back.
    /// This costs one round trip per gather, but the op must fail itself
    /// (the contract says "checked before the result is made"), and it never
    /// copies the indices to the host.
    fn gather(&self, table: &Tensor, indices: &Tensor) -> Result<Tensor> {
        const OP: &str = "gather";
        let st = self.storage(OP, table)?;
        let si = self.storage(OP, indices)?;
        let dtype = table.dtype();
        let plan = plan_gather(&self.limits, dtype, table.dims(), indices.dims())?;
        let index_type = match indices.dtype() {
            DType::I32 => "i32",
            DType::I64 => "i64",
            other => {
                return Err(KernelError::DTypeUnsupported {
                    op: OP,
                    dtype: other,
                });
            }
        };
        let numel = checked_numel(&plan.out_dims).unwrap_or(usize::MAX);
        let mut out = self.alloc(OP, dtype, numel)?;
        if plan.count > 0 {
            let mut flag = self.alloc_raw(OP, DType::U8, 4)?;
            self.fill_bytes(OP, &mut flag, 0)?;
            let per_block = plan.row_len >= GATHER_ROW_PER_BLOCK;
            let cfg = if per_block {
                self.dev.row_grid(plan.count as u64)
            } else {
                self.dev.grid(plan.count.max(numel) as u64)
            };
            // gather_E_I(u64 count, u64 rows, u64 row_len, int per_block,
            //            const I* idx, const E* table, E* out, u32* bad)
            Launch::new(&self.stream)
                .usize(plan.count)
                .usize(plan.rows)
                .usize(plan.row_len)
                .i32(i32::from(per_block))
                .input(si)
                .input(st)
                .output(&mut out)
                .output(&mut flag)
                .run(
                    &self.dev,
                    OP,
                    &format!("gather_{}_{index_type}", dtype.size()),
                    cfg,
                )?;
            let bad = match flag.buf.as_ref() {
                Some(buf) => self
                    .stream
                    .clone_dtoh(buf)
                    .map_err(|e| driver_error(OP, e))?,
                None => Vec::new(),
            };
            self.wait(OP)?;
            if bad.iter().any(|&b| b != 0) {
                return Err(KernelError::invalid(
                    OP,
                    format!("an index is outside 0..{}", plan.rows),
                ));
            }
        }
        tensor(&plan.out_dims, out)
    }

    fn concat(&self, a: &Tensor, b: &Tensor, axis: i64) -> Result<Tensor> {
        const OP: &str = "concat";
        let sa = self.storage(OP, a)?;
        let sb = self.storage(OP, b)?;
        let dtype = same_dtype(OP, a, b)?;
        let plan = plan_concat(&self.limits, dtype, a.dims(), b.dims(), axis)?;
        let numel = checked_numel(&plan.out_dims).unwrap_or(usize::MAX);
        let mut out = self.alloc(OP, dtype, numel)?;
        if numel > 0 {
            if plan.outer == 1 {
                // Two contiguous blocks: plain device copies.
                self.copy_into(OP, &mut out, 0, sa)?;
                self.copy_into(OP, &mut out, plan.a_block * dtype.size(), sb)?;
            } else {
                // concat_E(u64 outer, u64 ab, u64 bb, const E* a, const E* b,
                //          E* out)
                Launch::new(&self.stream)
                    .usize(plan.outer)
                    .usize(plan.a_block)
                    .usize(plan.b_block)
                    .input(sa)
                    .input(sb)
                    .output(&mut out)
                    .run(
                        &self.dev,
                        OP,
                        &format!("concat_{}", dtype.size()),
                        self.dev.grid(numel as u64),
                    )?;
            }
        }
        tensor(&plan.out_dims, out)
    }

    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Result<Tensor> {
        self.attention_impl(q, k, v, causal)
    }
}

impl CudaBackend {
    /// Launches a kernel over the lines of an [`AxisPlan`]:
    /// `{prefix}_rows_{suffix}(u64 rows, u64 len, const T* x, Out* out)`,
    /// one block per row, when the axis is the last (contiguous lines);
    /// otherwise `{prefix}_cols_{suffix}(u64 outer, u64 len, u64 inner,
    /// const T* x, Out* out)`, one thread per line.
    fn launch_axis(
        &self,
        op: &'static str,
        prefix: &str,
        suffix: &str,
        plan: &AxisPlan,
        x: &CudaStorage,
        out: &mut CudaStorage,
    ) -> Result<()> {
        if plan.inner == 1 {
            Launch::new(&self.stream)
                .usize(plan.outer)
                .usize(plan.len)
                .input(x)
                .output(out)
                .run(
                    &self.dev,
                    op,
                    &format!("{prefix}_rows_{suffix}"),
                    self.dev.row_grid(plan.outer as u64),
                )
        } else {
            Launch::new(&self.stream)
                .usize(plan.outer)
                .usize(plan.len)
                .usize(plan.inner)
                .input(x)
                .output(out)
                .run(
                    &self.dev,
                    op,
                    &format!("{prefix}_cols_{suffix}"),
                    self.dev.grid((plan.outer * plan.inner) as u64),
                )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_are_cast_like_cast() {
        assert_eq!(scalar_bits(DType::F32, 1.5), u64::from(1.5f32.to_bits()));
        assert_eq!(scalar_bits(DType::F16, 1.0), 0x3c00);
        assert_eq!(scalar_bits(DType::BF16, 1.0), 0x3f80);
        assert_eq!(scalar_bits(DType::I32, -2.7), u64::from((-2i32) as u32));
        assert_eq!(scalar_bits(DType::I32, f32::NAN), 0);
        assert_eq!(scalar_bits(DType::I32, 3e10), u64::from(i32::MAX as u32));
        assert_eq!(scalar_bits(DType::I64, -1e30), i64::MIN as u64);
        assert_eq!(scalar_bits(DType::U8, 300.0), 255);
        assert_eq!(scalar_bits(DType::U8, -4.0), 0);
    }
}
