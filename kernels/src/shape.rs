//! Checked shape arithmetic and the plans every backend runs.
//!
//! Shapes come from tenants, so every product, sum and index here is checked:
//! a hostile shape yields a [`KernelError`], never an overflow, a panic or an
//! allocation sized by the attacker. Each op's validation lives in one plan
//! function (`plan_*`) that both backends call before touching memory, so the
//! CPU reference and the CUDA backend accept exactly the same inputs and
//! report exactly the same errors.
//!
//! Invariants of a plan: every extent and offset it holds is ≤ the element
//! count of a tensor that passed [`Limits::check_tensor`], so later `usize`
//! arithmetic on them cannot overflow.

use tensor_wasm_shared::DType;

use crate::error::{KernelError, Result};

/// Highest rank any configuration may allow: the CUDA kernels carry
/// shapes and strides in fixed arrays of this many dims.
pub const MAX_RANK: usize = 16;

/// Caps on what one tensor and one op may cost. The executor sets them from
/// the operator's configuration; the defaults suit one GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most dims a tensor may have; 8 covers every layer layout in common
    /// use, and bounds the per-element index arithmetic of broadcasting.
    /// Values above [`MAX_RANK`] act as [`MAX_RANK`].
    pub max_rank: usize,
    /// Largest tensor, in bytes; 4 GiB keeps one tensor from taking a whole
    /// device or host while leaving room for 8192×8192 f32 weights.
    pub max_tensor_bytes: u64,
    /// Largest op, in work units (multiply-adds for matmul and attention,
    /// elements touched for the others); 2^42 ≈ 4.4·10^12 lets an 8192³
    /// matmul through and stops a single call from holding a device for
    /// minutes.
    pub max_op_work: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_rank: 8,
            max_tensor_bytes: 4 << 30,
            max_op_work: 1 << 42,
        }
    }
}

impl Limits {
    /// Checks a tensor's dims: rank, overflow, and byte size. Returns the
    /// element count.
    pub fn check_tensor(&self, op: &'static str, dtype: DType, dims: &[usize]) -> Result<usize> {
        if dims.len() > self.max_rank.min(MAX_RANK) {
            return Err(KernelError::invalid(
                op,
                format!("rank {} exceeds the cap of {}", dims.len(), self.max_rank),
            ));
        }
        let numel = checked_numel(dims).ok_or_else(|| KernelError::TooLarge {
            op,
            detail: format!("element count of {dims:?} overflows"),
        })?;
        let bytes = (numel as u128) * dtype.size() as u128;
        if bytes > u128::from(self.max_tensor_bytes) {
            return Err(KernelError::TooLarge {
                op,
                detail: format!(
                    "{dims:?} {dtype} is {bytes} bytes; the cap is {}",
                    self.max_tensor_bytes
                ),
            });
        }
        Ok(numel)
    }

    /// Checks an op's work estimate against the per-op cap.
    pub fn check_work(&self, op: &'static str, work: u128) -> Result<()> {
        if work > u128::from(self.max_op_work) {
            return Err(KernelError::WorkCapExceeded {
                op,
                work: u64::try_from(work).unwrap_or(u64::MAX),
                cap: self.max_op_work,
            });
        }
        Ok(())
    }
}

/// The product of `dims`, saturating at `usize::MAX`. Plans use it for
/// sub-products (outer and inner extents): those can only saturate when the
/// tensor is empty, and every loop over them is bounded by a checked count.
pub fn saturating_numel(dims: &[usize]) -> usize {
    if dims.contains(&0) {
        return 0;
    }
    dims.iter().fold(1usize, |acc, &d| acc.saturating_mul(d))
}

/// The product of `dims`, or `None` if it overflows `usize`.
pub fn checked_numel(dims: &[usize]) -> Option<usize> {
    if dims.contains(&0) {
        return Some(0);
    }
    dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Row-major strides, in elements, of a contiguous tensor.
pub fn contiguous_strides(dims: &[usize]) -> Vec<usize> {
    let mut strides = vec![0; dims.len()];
    let mut acc = 1usize;
    for (s, &d) in strides.iter_mut().zip(dims).rev() {
        *s = acc;
        acc = acc.saturating_mul(d);
    }
    strides
}

/// Resolves a possibly negative axis against `ndim` dims.
pub fn normalize_axis(op: &'static str, axis: i64, ndim: usize) -> Result<usize> {
    let n = ndim as i64;
    let a = if axis < 0 { axis + n } else { axis };
    if a < 0 || a >= n {
        return Err(KernelError::invalid(
            op,
            format!("axis {axis} is out of range for rank {ndim}"),
        ));
    }
    Ok(a as usize)
}

/// Numpy broadcasting of two shapes.
pub fn broadcast_shapes(op: &'static str, a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for i in 0..n {
        let da = if i + a.len() >= n {
            a[i + a.len() - n]
        } else {
            1
        };
        let db = if i + b.len() >= n {
            b[i + b.len() - n]
        } else {
            1
        };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => {
                return Err(KernelError::shape(
                    op,
                    format!("{a:?} and {b:?} do not broadcast"),
                ));
            }
        };
    }
    Ok(out)
}

/// Strides, in elements, that read a contiguous tensor of dims `src` as if
/// it had the broadcast dims `out` (0 along broadcast dims). `src` must
/// broadcast to `out`.
pub fn broadcast_strides(src: &[usize], out: &[usize]) -> Vec<usize> {
    let own = contiguous_strides(src);
    let pad = out.len() - src.len();
    (0..out.len())
        .map(|i| {
            if i < pad || src[i - pad] == 1 {
                0
            } else {
                own[i - pad]
            }
        })
        .collect()
}

/// Offset, in elements, of the `linear`-th element of `dims` in a tensor
/// read with `strides`.
pub fn strided_offset(mut linear: usize, dims: &[usize], strides: &[usize]) -> usize {
    let mut off = 0;
    for (&d, &s) in dims.iter().zip(strides).rev() {
        if d == 0 {
            return 0;
        }
        off += (linear % d) * s;
        linear /= d;
    }
    off
}

/// An elementwise op over broadcast operands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BinaryPlan {
    pub out_dims: Vec<usize>,
    pub numel: usize,
    /// Strides of `a` and `b` over `out_dims` (0 along broadcast dims).
    pub a_strides: Vec<usize>,
    pub b_strides: Vec<usize>,
}

impl BinaryPlan {
    /// True when neither operand is broadcast: element i of both operands
    /// is element i of the output.
    pub fn is_same_shape(&self) -> bool {
        self.a_strides == self.b_strides && self.a_strides == contiguous_strides(&self.out_dims)
    }
}

pub fn plan_binary(
    limits: &Limits,
    op: &'static str,
    dtype: DType,
    a: &[usize],
    b: &[usize],
) -> Result<BinaryPlan> {
    let out_dims = broadcast_shapes(op, a, b)?;
    let numel = limits.check_tensor(op, dtype, &out_dims)?;
    limits.check_work(op, numel as u128)?;
    Ok(BinaryPlan {
        a_strides: broadcast_strides(a, &out_dims),
        b_strides: broadcast_strides(b, &out_dims),
        out_dims,
        numel,
    })
}

/// Largest matrix extent of matmul and attention: BLAS libraries take
/// 32-bit dims, so both backends refuse more alike.
pub const MAX_MATRIX_DIM: usize = i32::MAX as usize;

fn check_matrix_dims(op: &'static str, dims: &[usize]) -> Result<()> {
    if let Some(d) = dims.iter().find(|&&d| d > MAX_MATRIX_DIM) {
        return Err(KernelError::invalid(
            op,
            format!("matrix extent {d} exceeds {MAX_MATRIX_DIM}"),
        ));
    }
    Ok(())
}

/// Where each entry of a broadcast batch starts in one operand, in
/// elements. Computed on demand: a table would cost 8 bytes per entry and
/// operand, far more than the output of a large batch of small matrices,
/// and nothing at all to ask for with a batch of empty ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchOffsets {
    dims: Vec<usize>,
    strides: Vec<usize>,
}

impl BatchOffsets {
    /// The offsets of an operand with batch dims `operand`, broadcast to
    /// `batch_dims`, whose matrices hold `matrix` elements each.
    fn new(operand: &[usize], batch_dims: &[usize], matrix: usize) -> BatchOffsets {
        // Saturating, as `contiguous_strides` is: a stride only overflows
        // in a batch with a zero dim, which has no entry to ask for.
        let strides = broadcast_strides(operand, batch_dims)
            .into_iter()
            .map(|s| s.saturating_mul(matrix))
            .collect();
        BatchOffsets {
            dims: batch_dims.to_vec(),
            strides,
        }
    }

    /// The offset of batch entry `i`.
    pub fn at(&self, i: usize) -> usize {
        strided_offset(i, &self.dims, &self.strides)
    }
}

/// A batched matmul `[.., m, k] × [.., k, n]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MatmulPlan {
    pub out_dims: Vec<usize>,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    /// The broadcast batch dims (empty for a plain 2-D product).
    pub batch_dims: Vec<usize>,
    /// Element offsets of each batch's matrices in a and b.
    pub a_offsets: BatchOffsets,
    pub b_offsets: BatchOffsets,
    batch: usize,
}

impl MatmulPlan {
    /// The number of matrix products.
    pub fn batch(&self) -> usize {
        self.batch
    }
}

/// Plans a matmul with numpy's rules: 1-D operands get a dim of 1 prepended
/// (a) or appended (b), which is removed from the result.
pub fn plan_matmul(limits: &Limits, dtype: DType, a: &[usize], b: &[usize]) -> Result<MatmulPlan> {
    const OP: &str = "matmul";
    if a.is_empty() || b.is_empty() {
        return Err(KernelError::shape(OP, "operands must have at least 1 dim"));
    }
    let a2: Vec<usize> = if a.len() == 1 {
        vec![1, a[0]]
    } else {
        a.to_vec()
    };
    let b2: Vec<usize> = if b.len() == 1 {
        vec![b[0], 1]
    } else {
        b.to_vec()
    };
    let (m, k) = (a2[a2.len() - 2], a2[a2.len() - 1]);
    let (kb, n) = (b2[b2.len() - 2], b2[b2.len() - 1]);
    if k != kb {
        return Err(KernelError::shape(
            OP,
            format!("{a:?} × {b:?}: inner dims {k} and {kb} differ"),
        ));
    }
    check_matrix_dims(OP, &[m, k, n])?;
    let a_batch = &a2[..a2.len() - 2];
    let b_batch = &b2[..b2.len() - 2];
    let batch_dims = broadcast_shapes(OP, a_batch, b_batch)?;
    let mut out_dims = batch_dims.clone();
    if a.len() > 1 {
        out_dims.push(m);
    }
    if b.len() > 1 {
        out_dims.push(n);
    }
    limits.check_tensor(OP, dtype, &out_dims)?;
    let batch = checked_numel(&batch_dims).unwrap_or(usize::MAX);
    // Every factor counts at least 1, so a huge batch of empty matrices is
    // still work.
    let work = [batch, m, n, k]
        .iter()
        .fold(1u128, |w, &x| w * x.max(1) as u128);
    limits.check_work(OP, work)?;
    Ok(MatmulPlan {
        a_offsets: BatchOffsets::new(a_batch, &batch_dims, m * k),
        b_offsets: BatchOffsets::new(b_batch, &batch_dims, k * n),
        out_dims,
        m,
        k,
        n,
        batch_dims,
        batch,
    })
}

/// A tensor viewed as `[outer, len, inner]` around one axis: the layout of
/// reductions and softmax.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AxisPlan {
    pub outer: usize,
    pub len: usize,
    pub inner: usize,
    pub out_dims: Vec<usize>,
}

/// Plans a reduction of `dims` over `axis`.
pub fn plan_reduce(
    limits: &Limits,
    op: &'static str,
    dims: &[usize],
    axis: i64,
    keepdim: bool,
) -> Result<AxisPlan> {
    if dims.is_empty() {
        return Err(KernelError::invalid(op, "cannot reduce a 0-dim tensor"));
    }
    let ax = normalize_axis(op, axis, dims.len())?;
    let mut out_dims = dims.to_vec();
    if keepdim {
        out_dims[ax] = 1;
    } else {
        out_dims.remove(ax);
    }
    // The output is a tensor like any other; capping it also bounds the
    // `outer · inner` lines every backend loops over.
    limits.check_tensor(op, DType::I64, &out_dims)?;
    let numel = checked_numel(dims).unwrap_or(usize::MAX);
    limits.check_work(op, numel as u128)?;
    Ok(AxisPlan {
        outer: saturating_numel(&dims[..ax]),
        len: dims[ax],
        inner: saturating_numel(&dims[ax + 1..]),
        out_dims,
    })
}

/// Plans a softmax of `dims` over `axis` (output dims = input dims).
pub fn plan_softmax(limits: &Limits, dims: &[usize], axis: i64) -> Result<AxisPlan> {
    let mut p = plan_reduce(limits, "softmax", dims, axis, true)?;
    p.out_dims = dims.to_vec();
    Ok(p)
}

/// A normalization over the last axis: `rows` rows of `cols` elements.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NormPlan {
    pub rows: usize,
    pub cols: usize,
}

/// Plans layer_norm / rms_norm: `x` has at least one dim; gamma and beta,
/// when given, are 1-D of the last dim's length.
pub fn plan_norm(
    limits: &Limits,
    op: &'static str,
    x: &[usize],
    params: &[Option<&[usize]>],
) -> Result<NormPlan> {
    let Some(&cols) = x.last() else {
        return Err(KernelError::invalid(op, "input must have at least 1 dim"));
    };
    for p in params.iter().flatten() {
        if *p != [cols] {
            return Err(KernelError::shape(
                op,
                format!("parameter of shape {p:?} must be [{cols}] to match {x:?}"),
            ));
        }
    }
    let numel = checked_numel(x).unwrap_or(usize::MAX);
    limits.check_work(op, numel as u128)?;
    Ok(NormPlan {
        rows: numel.checked_div(cols).unwrap_or(0),
        cols,
    })
}

/// Resolves a reshape target (one dim may be -1) against `numel` elements.
pub fn plan_reshape(
    limits: &Limits,
    dtype: DType,
    numel: usize,
    target: &[i64],
) -> Result<Vec<usize>> {
    const OP: &str = "reshape";
    let mut infer = None;
    let mut known = 1usize;
    let mut out = Vec::with_capacity(target.len());
    for (i, &d) in target.iter().enumerate() {
        if d == -1 {
            if infer.replace(i).is_some() {
                return Err(KernelError::invalid(OP, "at most one dim may be -1"));
            }
            out.push(0);
        } else if d < 0 {
            return Err(KernelError::invalid(OP, format!("dim {d} is negative")));
        } else {
            let d = usize::try_from(d)
                .map_err(|_| KernelError::invalid(OP, format!("dim {d} is too large")))?;
            known = known.checked_mul(d).ok_or_else(|| KernelError::TooLarge {
                op: OP,
                detail: format!("element count of {target:?} overflows"),
            })?;
            out.push(d);
        }
    }
    if let Some(i) = infer {
        if known == 0 || !numel.is_multiple_of(known) {
            return Err(KernelError::shape(
                OP,
                format!("cannot infer -1 in {target:?} for {numel} elements"),
            ));
        }
        out[i] = numel / known;
    } else if known != numel {
        return Err(KernelError::shape(
            OP,
            format!("{target:?} holds {known} elements, the tensor {numel}"),
        ));
    }
    limits.check_tensor(OP, dtype, &out)?;
    Ok(out)
}

/// A permutation of dims.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransposePlan {
    pub out_dims: Vec<usize>,
    /// Strides of the input, in elements, in output dim order.
    pub in_strides: Vec<usize>,
    pub numel: usize,
}

pub fn plan_transpose(limits: &Limits, dims: &[usize], perm: &[usize]) -> Result<TransposePlan> {
    const OP: &str = "transpose";
    if perm.len() != dims.len() {
        return Err(KernelError::invalid(
            OP,
            format!(
                "permutation {perm:?} has {} entries for rank {}",
                perm.len(),
                dims.len()
            ),
        ));
    }
    let mut seen = vec![false; dims.len()];
    for &p in perm {
        if p >= dims.len() || std::mem::replace(&mut seen[p], true) {
            return Err(KernelError::invalid(
                OP,
                format!("{perm:?} is not a permutation of 0..{}", dims.len()),
            ));
        }
    }
    let strides = contiguous_strides(dims);
    let numel = checked_numel(dims).unwrap_or(usize::MAX);
    limits.check_work(OP, numel as u128)?;
    Ok(TransposePlan {
        out_dims: perm.iter().map(|&p| dims[p]).collect(),
        in_strides: perm.iter().map(|&p| strides[p]).collect(),
        numel,
    })
}

/// A concatenation along one axis, viewed as `[outer, a_len + b_len]`
/// blocks where `a_len = a.dims[axis] · inner`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConcatPlan {
    pub out_dims: Vec<usize>,
    pub outer: usize,
    /// Contiguous elements of a, and of b, in each outer block.
    pub a_block: usize,
    pub b_block: usize,
}

pub fn plan_concat(
    limits: &Limits,
    dtype: DType,
    a: &[usize],
    b: &[usize],
    axis: i64,
) -> Result<ConcatPlan> {
    const OP: &str = "concat";
    if a.len() != b.len() {
        return Err(KernelError::shape(
            OP,
            format!("ranks of {a:?} and {b:?} differ"),
        ));
    }
    let ax = normalize_axis(OP, axis, a.len())?;
    for i in 0..a.len() {
        if i != ax && a[i] != b[i] {
            return Err(KernelError::shape(
                OP,
                format!("{a:?} and {b:?} differ outside axis {ax}"),
            ));
        }
    }
    let mut out_dims = a.to_vec();
    out_dims[ax] = a[ax]
        .checked_add(b[ax])
        .ok_or_else(|| KernelError::TooLarge {
            op: OP,
            detail: "concatenated dim overflows".into(),
        })?;
    let numel = limits.check_tensor(OP, dtype, &out_dims)?;
    let inner = saturating_numel(&a[ax + 1..]);
    let outer = saturating_numel(&a[..ax]);
    // Every outer block is a step even when it copies nothing.
    limits.check_work(OP, numel as u128 + outer as u128)?;
    Ok(ConcatPlan {
        outer,
        a_block: a[ax].saturating_mul(inner),
        b_block: b[ax].saturating_mul(inner),
        out_dims,
    })
}

/// Row lookups `table[indices]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatherPlan {
    pub out_dims: Vec<usize>,
    /// Number of indices.
    pub count: usize,
    /// Rows in the table.
    pub rows: usize,
    /// Elements per row.
    pub row_len: usize,
}

pub fn plan_gather(
    limits: &Limits,
    dtype: DType,
    table: &[usize],
    indices: &[usize],
) -> Result<GatherPlan> {
    const OP: &str = "gather";
    let Some((&rows, row)) = table.split_first() else {
        return Err(KernelError::invalid(OP, "table must have at least 1 dim"));
    };
    let mut out_dims = indices.to_vec();
    out_dims.extend_from_slice(row);
    let numel = limits.check_tensor(OP, dtype, &out_dims)?;
    limits.check_work(OP, numel as u128)?;
    Ok(GatherPlan {
        count: checked_numel(indices).unwrap_or(usize::MAX),
        rows,
        row_len: saturating_numel(row),
        out_dims,
    })
}

/// Scaled dot-product attention over `[.., seq, d]` operands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttentionPlan {
    pub out_dims: Vec<usize>,
    pub lq: usize,
    pub lk: usize,
    pub d: usize,
    pub dv: usize,
    /// Element offsets of each batch's q, k, v matrices.
    pub q_offsets: BatchOffsets,
    pub k_offsets: BatchOffsets,
    pub v_offsets: BatchOffsets,
    batch: usize,
}

impl AttentionPlan {
    /// The number of attentions.
    pub fn batch(&self) -> usize {
        self.batch
    }
}

pub fn plan_attention(
    limits: &Limits,
    dtype: DType,
    q: &[usize],
    k: &[usize],
    v: &[usize],
) -> Result<AttentionPlan> {
    const OP: &str = "attention";
    if q.len() < 2 || k.len() < 2 || v.len() < 2 {
        return Err(KernelError::shape(
            OP,
            "q, k and v must have at least 2 dims",
        ));
    }
    let split = |s: &[usize]| (s[..s.len() - 2].to_vec(), s[s.len() - 2], s[s.len() - 1]);
    let (qb, lq, d) = split(q);
    let (kb, lk, dk) = split(k);
    let (vb, lv, dv) = split(v);
    if dk != d {
        return Err(KernelError::shape(
            OP,
            format!("q {q:?} and k {k:?} differ in d"),
        ));
    }
    if lv != lk {
        return Err(KernelError::shape(
            OP,
            format!("k {k:?} and v {v:?} differ in seq"),
        ));
    }
    check_matrix_dims(OP, &[lq, lk, d, dv])?;
    let batch_dims = broadcast_shapes(OP, &broadcast_shapes(OP, &qb, &kb)?, &vb)?;
    let mut out_dims = batch_dims.clone();
    out_dims.extend([lq, dv]);
    limits.check_tensor(OP, dtype, &out_dims)?;
    // The scores matrix is materialized per batch: cap it like a tensor.
    limits.check_tensor(OP, DType::F32, &[lq, lk])?;
    let batch = checked_numel(&batch_dims).unwrap_or(usize::MAX);
    let work = [batch, lq, lk, d + dv]
        .iter()
        .fold(1u128, |w, &x| w * x.max(1) as u128);
    limits.check_work(OP, work)?;
    Ok(AttentionPlan {
        q_offsets: BatchOffsets::new(&qb, &batch_dims, lq * d),
        k_offsets: BatchOffsets::new(&kb, &batch_dims, lk * d),
        v_offsets: BatchOffsets::new(&vb, &batch_dims, lk * dv),
        out_dims,
        lq,
        lk,
        d,
        dv,
        batch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_offsets_of_an_empty_batch_with_huge_dims_do_not_overflow() {
        // A zero dim leaves the dims after it with a huge stride.
        let dims = [2, 0, usize::MAX / 2];
        let offsets = BatchOffsets::new(&dims, &dims, 4);
        assert_eq!(offsets.strides[1], usize::MAX);
    }

    fn lim() -> Limits {
        Limits::default()
    }

    #[test]
    fn broadcasting_follows_numpy() {
        assert_eq!(
            broadcast_shapes("t", &[2, 1, 3], &[4, 1]).unwrap(),
            vec![2, 4, 3]
        );
        assert_eq!(broadcast_shapes("t", &[], &[5]).unwrap(), vec![5]);
        assert_eq!(broadcast_shapes("t", &[0, 1], &[1, 3]).unwrap(), vec![0, 3]);
        assert!(broadcast_shapes("t", &[2, 3], &[3, 2]).is_err());
        assert_eq!(broadcast_strides(&[4, 1], &[2, 4, 3]), vec![0, 1, 0]);
    }

    #[test]
    fn hostile_dims_are_refused_without_allocating() {
        let l = lim();
        let e = l
            .check_tensor("new", DType::F32, &[usize::MAX, 2])
            .unwrap_err();
        assert!(matches!(e, KernelError::TooLarge { .. }));
        let e = l
            .check_tensor("new", DType::F32, &[1 << 20, 1 << 20])
            .unwrap_err();
        assert!(matches!(e, KernelError::TooLarge { .. }));
        let e = l.check_tensor("new", DType::U8, &[1; 9]).unwrap_err();
        assert!(matches!(e, KernelError::InvalidArgument { .. }));
        assert_eq!(
            l.check_tensor("new", DType::F32, &[0, usize::MAX]).unwrap(),
            0
        );
    }

    #[test]
    fn matmul_plans() {
        let p = plan_matmul(&lim(), DType::F32, &[2, 1, 3, 4], &[5, 4, 6]).unwrap();
        assert_eq!(p.out_dims, vec![2, 5, 3, 6]);
        assert_eq!(p.batch(), 10);
        let a: Vec<usize> = (0..6).map(|i| p.a_offsets.at(i)).collect();
        let b: Vec<usize> = (0..6).map(|i| p.b_offsets.at(i)).collect();
        assert_eq!(a, [0, 0, 0, 0, 0, 12]);
        assert_eq!(b, [0, 24, 48, 72, 96, 0]);
        let p = plan_matmul(&lim(), DType::F32, &[4], &[4]).unwrap();
        assert_eq!(p.out_dims, Vec::<usize>::new());
        let p = plan_matmul(&lim(), DType::F32, &[3, 4], &[4]).unwrap();
        assert_eq!(p.out_dims, vec![3]);
        assert_eq!((p.batch(), p.a_offsets.at(0), p.b_offsets.at(0)), (1, 0, 0));
        assert!(plan_matmul(&lim(), DType::F32, &[3, 4], &[5, 6]).is_err());
        let l = Limits {
            max_op_work: 1000,
            ..lim()
        };
        let e = plan_matmul(&l, DType::F32, &[10, 10], &[10, 11]).unwrap_err();
        assert!(matches!(e, KernelError::WorkCapExceeded { .. }));
    }

    #[test]
    fn reshape_infers_and_refuses() {
        assert_eq!(
            plan_reshape(&lim(), DType::F32, 12, &[-1, 4]).unwrap(),
            vec![3, 4]
        );
        assert!(plan_reshape(&lim(), DType::F32, 12, &[-1, -1]).is_err());
        assert!(plan_reshape(&lim(), DType::F32, 12, &[5, -1]).is_err());
        assert!(plan_reshape(&lim(), DType::F32, 0, &[0, -1]).is_err());
        assert!(plan_reshape(&lim(), DType::F32, 12, &[i64::MAX, i64::MAX]).is_err());
        assert!(plan_reshape(&lim(), DType::F32, 12, &[-3, -4]).is_err());
    }

    #[test]
    fn transpose_checks_the_permutation() {
        let p = plan_transpose(&lim(), &[2, 3, 4], &[2, 0, 1]).unwrap();
        assert_eq!(p.out_dims, vec![4, 2, 3]);
        assert_eq!(p.in_strides, vec![1, 12, 4]);
        assert!(plan_transpose(&lim(), &[2, 3], &[0, 0]).is_err());
        assert!(plan_transpose(&lim(), &[2, 3], &[0, 2]).is_err());
        assert!(plan_transpose(&lim(), &[2, 3], &[0]).is_err());
    }

    #[test]
    fn axes_may_be_negative() {
        let p = plan_reduce(&lim(), "reduce", &[2, 3, 4], -2, false).unwrap();
        assert_eq!((p.outer, p.len, p.inner), (2, 3, 4));
        assert_eq!(p.out_dims, vec![2, 4]);
        assert!(plan_reduce(&lim(), "reduce", &[2, 3], 2, false).is_err());
        assert!(plan_reduce(&lim(), "reduce", &[2, 3], -3, false).is_err());
        assert!(plan_reduce(&lim(), "reduce", &[], 0, false).is_err());
    }

    #[test]
    fn concat_and_gather_plans() {
        let p = plan_concat(&lim(), DType::I32, &[2, 3, 4], &[2, 5, 4], 1).unwrap();
        assert_eq!(p.out_dims, vec![2, 8, 4]);
        assert_eq!((p.outer, p.a_block, p.b_block), (2, 12, 20));
        assert!(plan_concat(&lim(), DType::I32, &[2, 3], &[3, 3], 1).is_err());
        let g = plan_gather(&lim(), DType::F32, &[10, 4], &[2, 3]).unwrap();
        assert_eq!(g.out_dims, vec![2, 3, 4]);
        assert_eq!((g.count, g.rows, g.row_len), (6, 10, 4));
    }

    #[test]
    fn attention_plans() {
        let p = plan_attention(&lim(), DType::F32, &[2, 5, 8], &[2, 7, 8], &[1, 7, 3]).unwrap();
        assert_eq!(p.out_dims, vec![2, 5, 3]);
        assert_eq!(p.batch(), 2);
        assert_eq!([p.v_offsets.at(0), p.v_offsets.at(1)], [0, 0]);
        assert_eq!([p.k_offsets.at(0), p.k_offsets.at(1)], [0, 56]);
        assert!(plan_attention(&lim(), DType::F32, &[5, 8], &[7, 9], &[7, 3]).is_err());
        assert!(plan_attention(&lim(), DType::F32, &[5, 8], &[7, 8], &[6, 3]).is_err());
    }
}

#[cfg(test)]
mod empty_tensor_tests {
    use super::*;

    #[test]
    fn empty_tensors_with_huge_dims_plan_without_overflow() {
        let l = Limits::default();
        let big = 1usize << 40;
        let dims = [big, big, 0];
        assert_eq!(l.check_tensor("t", DType::F32, &dims).unwrap(), 0);
        let p = plan_reduce(&l, "reduce", &dims, 2, false);
        assert!(matches!(p, Err(KernelError::TooLarge { .. })), "{p:?}");
        let p = plan_reduce(&l, "reduce", &[0, big, big], 0, true);
        assert!(p.is_err(), "the [1, big, big] output is over the cap");
        let p = plan_reduce(&l, "reduce", &[big, 0, big], 1, false).unwrap_err();
        assert!(matches!(p, KernelError::TooLarge { .. }));
        let p = plan_softmax(&l, &[big, big, 0], 0).unwrap();
        assert_eq!(p.outer * p.inner, 0);
        let c = plan_concat(&l, DType::F32, &[big << 3, 0], &[big << 3, 0], 1);
        assert!(
            matches!(c, Err(KernelError::WorkCapExceeded { .. })),
            "{c:?}"
        );
        let g = plan_gather(&l, DType::F32, &[3, big, 0], &[2]).unwrap();
        assert_eq!(g.row_len, 0);
    }

    #[test]
    fn matrix_extents_fit_blas() {
        let l = Limits {
            max_tensor_bytes: u64::MAX,
            max_op_work: u64::MAX,
            ..Limits::default()
        };
        let huge = MAX_MATRIX_DIM + 1;
        let e = plan_matmul(&l, DType::U8, &[1, huge], &[huge, 1]).unwrap_err();
        assert!(matches!(e, KernelError::InvalidArgument { .. }));
    }
}
