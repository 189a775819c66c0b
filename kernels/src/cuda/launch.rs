//! Launch plumbing: grid sizes, dim coalescing, and a builder that turns
//! tensors into kernel arguments while holding the [`CrossStream`] guards
//! of operands from other streams.

use std::sync::Arc;

use cudarc::driver::{CudaStream, DriverError, LaunchConfig};

use super::device::{Device, driver_error};
use super::{CrossStream, CudaStorage};
use crate::error::{KernelError, Result};
use crate::sys::cuda::{KernelArg, launch};

/// Threads per block of every kernel; `BLOCK` in kernels.cu. 256 keeps
/// 8 blocks resident per SM on every architecture since Volta while giving
/// the per-row reductions enough threads to hide memory latency.
pub(crate) const BLOCK: u32 = 256;

/// Most dims a kernel takes after coalescing; `MAX_DIMS` in kernels.cu. The
/// default `Limits::max_rank` is 8, and coalescing only lowers the rank.
pub(crate) const MAX_DIMS: usize = 16;

/// Blocks per SM of a grid-stride launch: enough resident warps to saturate
/// memory bandwidth, few enough that each thread loops over several
/// elements and amortizes its index setup.
const BLOCKS_PER_SM: u64 = 16;

impl Device {
    fn max_blocks(&self) -> u64 {
        (u64::from(self.sm_count) * BLOCKS_PER_SM).max(1)
    }

    /// A grid-stride launch over `n` work items, one per thread.
    pub(crate) fn grid(&self, n: u64) -> LaunchConfig {
        let blocks = n.div_ceil(u64::from(BLOCK)).clamp(1, self.max_blocks());
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// A launch with one block per row (the grid strides over rows).
    pub(crate) fn row_grid(&self, rows: u64) -> LaunchConfig {
        let blocks = rows.clamp(1, self.max_blocks());
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// Removes unit dims and merges neighbouring dims that every operand walks
/// contiguously (outer stride = inner stride × inner dim), so kernels do
/// the least index arithmetic. `strides[o]` are operand o's element strides
/// over `dims`. Refuses (InvalidArgument) a shape that still has more than
/// [`MAX_DIMS`] dims.
pub(crate) fn coalesce(
    op: &'static str,
    dims: &[usize],
    strides: &[&[usize]],
) -> Result<(Vec<usize>, Vec<Vec<usize>>)> {
    let mut out_dims: Vec<usize> = Vec::with_capacity(dims.len());
    let mut out_strides: Vec<Vec<usize>> = vec![Vec::with_capacity(dims.len()); strides.len()];
    for (d, &size) in dims.iter().enumerate() {
        if size == 1 {
            continue;
        }
        let mergeable = !out_dims.is_empty()
            && strides
                .iter()
                .zip(&out_strides)
                .all(|(s, os)| os.last().copied() == s[d].checked_mul(size));
        if mergeable {
            if let Some(last) = out_dims.last_mut() {
                *last *= size;
            }
            for (s, os) in strides.iter().zip(out_strides.iter_mut()) {
                if let Some(last) = os.last_mut() {
                    *last = s[d];
                }
            }
        } else {
            out_dims.push(size);
            for (s, os) in strides.iter().zip(out_strides.iter_mut()) {
                os.push(s[d]);
            }
        }
    }
    if out_dims.len() > MAX_DIMS {
        return Err(KernelError::InvalidArgument {
            op,
            detail: format!(
                "{} dims remain after merging contiguous ones; the CUDA backend takes at most {MAX_DIMS}",
                out_dims.len()
            ),
        });
    }
    Ok((out_dims, out_strides))
}

/// The kind of one kernel parameter, to check launches against kernel
/// signatures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ArgKind {
    /// A device pointer (`const T*` / `T*`).
    Ptr,
    /// A `u64` count or bit pattern.
    U64,
    /// An `int`.
    I32,
    /// A `float`.
    F32,
    /// A `Dims` struct by value.
    Dims,
}

impl ArgKind {
    fn of(a: &KernelArg) -> ArgKind {
        match a {
            KernelArg::Ptr(_) => ArgKind::Ptr,
            KernelArg::U64(_) => ArgKind::U64,
            KernelArg::I32(_) => ArgKind::I32,
            KernelArg::F32(_) => ArgKind::F32,
            KernelArg::Dims(_) => ArgKind::Dims,
        }
    }
}

/// The parameter list of kernel `name`, as declared in kernels.cu (one
/// entry per kernel family). Every launch is checked against it before it
/// is enqueued, and a test checks it against the compiled PTX, so a
/// launch site and a kernel can never silently disagree.
pub(crate) fn signature(name: &str) -> Option<&'static [ArgKind]> {
    use ArgKind::{Dims, F32, I32, Ptr, U64};
    const FAMILIES: &[(&str, &[ArgKind])] = &[
        ("binary_same_", &[I32, U64, Ptr, Ptr, Ptr]),
        (
            "binary_bcast_",
            &[I32, U64, U64, Dims, Dims, Dims, Ptr, Ptr, Ptr],
        ),
        ("scalar_", &[I32, U64, Ptr, U64, Ptr]),
        ("unary_", &[I32, U64, Ptr, Ptr]),
        ("reduce_rows_", &[U64, U64, Ptr, Ptr]),
        ("reduce_cols_", &[U64, U64, U64, Ptr, Ptr]),
        ("cast_", &[U64, Ptr, Ptr]),
        ("softmax_rows_", &[U64, U64, Ptr, Ptr]),
        ("softmax_cols_", &[U64, U64, U64, Ptr, Ptr]),
        ("layer_norm_", &[U64, U64, Ptr, Ptr, Ptr, F32, Ptr]),
        ("rms_norm_", &[U64, U64, Ptr, Ptr, F32, Ptr]),
        ("attn_softmax_", &[U64, U64, U64, U64, I32, Ptr, Ptr]),
        ("permute_", &[U64, U64, Dims, Dims, Ptr, Ptr]),
        ("concat_", &[U64, U64, U64, Ptr, Ptr, Ptr]),
        ("gather_", &[U64, U64, U64, I32, Ptr, Ptr, Ptr, Ptr]),
        (
            "flash_attn_",
            &[U64, U64, I32, F32, Ptr, Ptr, Ptr, Ptr, U64, U64, U64, U64],
        ),
    ];
    FAMILIES
        .iter()
        .find(|(prefix, _)| name.starts_with(prefix))
        .map(|(_, sig)| *sig)
}

/// `v` padded into a `Dims` kernel argument.
pub(crate) fn dims_arg(v: &[usize]) -> KernelArg {
    let mut a = [0u64; MAX_DIMS];
    for (dst, &src) in a.iter_mut().zip(v) {
        *dst = src as u64;
    }
    KernelArg::Dims(a)
}

/// Builds one kernel launch. A tensor argument of another backend's stream
/// holds its [`CrossStream`] guard until the launch is enqueued, so it is
/// never read before it is written nor freed while this kernel uses it.
pub(crate) struct Launch<'a> {
    stream: &'a Arc<CudaStream>,
    args: Vec<KernelArg>,
    guards: Vec<CrossStream<'a>>,
    /// The first error of a tensor argument, reported by `run`.
    error: Option<DriverError>,
}

impl<'a> Launch<'a> {
    pub(crate) fn new(stream: &'a Arc<CudaStream>) -> Self {
        Launch {
            stream,
            args: Vec::with_capacity(12),
            guards: Vec::with_capacity(4),
            error: None,
        }
    }

    /// Adds a tensor argument from `read_ptr` / `write_ptr`.
    fn tensor(
        mut self,
        access: std::result::Result<(u64, Option<CrossStream<'a>>), DriverError>,
    ) -> Self {
        match access {
            Ok((ptr, guard)) => {
                self.args.push(KernelArg::Ptr(ptr));
                self.guards.extend(guard);
            }
            Err(e) => {
                self.args.push(KernelArg::Ptr(0));
                self.error.get_or_insert(e);
            }
        }
        self
    }

    /// A tensor read by the kernel (a null pointer for an empty tensor).
    pub(crate) fn input(self, s: &'a CudaStorage) -> Self {
        let access = s.read_access(self.stream);
        self.tensor(access)
    }

    /// An optional input: a null pointer when absent.
    pub(crate) fn opt_input(self, s: Option<&'a CudaStorage>) -> Self {
        match s {
            Some(s) => self.input(s),
            None => self.raw(0),
        }
    }

    /// A tensor written by the kernel.
    pub(crate) fn output(self, s: &'a mut CudaStorage) -> Self {
        let access = s.write_access(self.stream);
        self.tensor(access)
    }

    /// A raw device address whose buffer and guard the caller holds.
    pub(crate) fn raw(mut self, ptr: u64) -> Self {
        self.args.push(KernelArg::Ptr(ptr));
        self
    }

    pub(crate) fn u64(mut self, v: u64) -> Self {
        self.args.push(KernelArg::U64(v));
        self
    }

    pub(crate) fn usize(self, v: usize) -> Self {
        self.u64(v as u64)
    }

    pub(crate) fn i32(mut self, v: i32) -> Self {
        self.args.push(KernelArg::I32(v));
        self
    }

    pub(crate) fn f32(mut self, v: f32) -> Self {
        self.args.push(KernelArg::F32(v));
        self
    }

    pub(crate) fn dims(mut self, v: &[usize]) -> Self {
        self.args.push(dims_arg(v));
        self
    }

    /// Enqueues kernel `name` of `dev`. The guards (a `CrossStream` for each
    /// operand from another stream) are dropped once the launch is
    /// enqueued, which makes each such operand's home stream wait for it.
    pub(crate) fn run(
        self,
        dev: &Device,
        op: &'static str,
        name: &str,
        cfg: LaunchConfig,
    ) -> Result<()> {
        if let Some(e) = self.error {
            return Err(driver_error(op, e));
        }
        let func = dev.function(name)?;
        let matches = signature(name).is_some_and(|sig| {
            sig.len() == self.args.len()
                && sig
                    .iter()
                    .zip(&self.args)
                    .all(|(k, a)| *k == ArgKind::of(a))
        });
        if !matches {
            return Err(KernelError::Device(format!(
                "{op}: launch of {name} does not match its signature"
            )));
        }
        launch(self.stream, func, cfg, &self.args).map_err(|e| driver_error(op, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalescing_merges_contiguous_dims_only() {
        // Same-shape contiguous: one dim.
        let (d, s) = coalesce("t", &[2, 3, 4], &[&[12, 4, 1], &[12, 4, 1]]).unwrap();
        assert_eq!((d, s), (vec![24], vec![vec![1], vec![1]]));
        // b broadcast along the middle dim: a is contiguous, b is not.
        let (d, s) = coalesce("t", &[2, 3, 4], &[&[12, 4, 1], &[4, 0, 1]]).unwrap();
        assert_eq!(d, vec![2, 3, 4]);
        assert_eq!(s, vec![vec![12, 4, 1], vec![4, 0, 1]]);
        // Row vector broadcast over rows: [5, 4] with b [1, 4].
        let (d, s) = coalesce("t", &[5, 4], &[&[4, 1], &[0, 1]]).unwrap();
        assert_eq!((d, s), (vec![5, 4], vec![vec![4, 1], vec![0, 1]]));
        // Unit dims vanish; a scalar-broadcast pair of zero strides merges.
        let (d, s) = coalesce("t", &[1, 6, 1, 2], &[&[12, 2, 2, 1], &[0, 0, 0, 0]]).unwrap();
        assert_eq!((d, s), (vec![12], vec![vec![1], vec![0]]));
        // Rank 0 stays rank 0.
        let (d, s) = coalesce("t", &[], &[&[], &[]]).unwrap();
        assert!(d.is_empty() && s.iter().all(Vec::is_empty));
        // A transpose of the last two dims keeps two dims per batch.
        let (d, s) = coalesce("t", &[2, 4, 3], &[&[12, 1, 4]]).unwrap();
        assert_eq!((d, s), (vec![2, 4, 3], vec![vec![12, 1, 4]]));
    }

    #[test]
    fn coalescing_refuses_too_many_dims() {
        // Alternating broadcast never merges.
        let dims = vec![2usize; 18];
        let a: Vec<usize> = crate::shape::contiguous_strides(&dims);
        let b: Vec<usize> = a
            .iter()
            .enumerate()
            .map(|(i, &s)| if i % 2 == 0 { 0 } else { s })
            .collect();
        let e = coalesce("t", &dims, &[&a, &b]).unwrap_err();
        assert!(matches!(e, KernelError::InvalidArgument { .. }));
    }

    #[test]
    fn dims_are_padded() {
        match dims_arg(&[3, 4]) {
            KernelArg::Dims(d) => {
                assert_eq!(&d[..3], &[3, 4, 0]);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
