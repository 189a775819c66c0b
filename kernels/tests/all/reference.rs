//! A plain reference for every op, written to be obviously correct rather
//! than fast: naive loops over explicit multi-indices, floats in f64,
//! integers in i128 wrapped into the dtype. It shares no code with the
//! crate (no plans, no stride helpers), so a bug in those cannot hide here.
//!
//! Float results are returned unrounded; comparisons round or allow for the
//! output dtype. Integer and data-movement results are exact.

use half::{bf16, f16};
use tensor_wasm_kernels::{BinaryOp, DType, ReduceOp, UnaryOp};

use crate::util::{Host, Vals, int_range, numel, round_float, wrap_int};

// ---------------------------------------------------------------------------
// Multi-indices
// ---------------------------------------------------------------------------

/// The multi-index of the `linear`-th element of row-major `dims`.
pub fn unravel(mut linear: usize, dims: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; dims.len()];
    for i in (0..dims.len()).rev() {
        if dims[i] == 0 {
            return idx;
        }
        idx[i] = linear % dims[i];
        linear /= dims[i];
    }
    idx
}

/// The linear position of multi-index `idx` in row-major `dims`.
pub fn ravel(idx: &[usize], dims: &[usize]) -> usize {
    assert_eq!(idx.len(), dims.len());
    let mut linear = 0;
    for i in 0..dims.len() {
        assert!(idx[i] < dims[i], "index {idx:?} out of {dims:?}");
        linear = linear * dims[i] + idx[i];
    }
    linear
}

/// Numpy broadcasting of two shapes, or `None`.
pub fn broadcast(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let n = a.len().max(b.len());
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        // Dims counted from the right.
        let from_right = n - 1 - i;
        let da = if from_right < a.len() {
            a[a.len() - 1 - from_right]
        } else {
            1
        };
        let db = if from_right < b.len() {
            b[b.len() - 1 - from_right]
        } else {
            1
        };
        out.push(if da == db {
            da
        } else if da == 1 {
            db
        } else if db == 1 {
            da
        } else {
            return None;
        });
    }
    Some(out)
}

/// The element of a tensor of `src` dims that broadcasting reads at output
/// multi-index `out_idx` (right-aligned; dims of 1 always read index 0).
fn source_index(out_idx: &[usize], src: &[usize]) -> usize {
    let pad = out_idx.len() - src.len();
    let idx: Vec<usize> = (0..src.len())
        .map(|i| if src[i] == 1 { 0 } else { out_idx[pad + i] })
        .collect();
    ravel(&idx, src)
}

fn resolve_axis(axis: i64, ndim: usize) -> usize {
    let a = if axis < 0 { axis + ndim as i64 } else { axis };
    assert!(a >= 0 && (a as usize) < ndim, "axis {axis} for rank {ndim}");
    a as usize
}

// ---------------------------------------------------------------------------
// Scalars
// ---------------------------------------------------------------------------

/// A float value to an integer dtype: truncate toward zero, saturate,
/// NaN → 0.
pub fn float_to_int(dtype: DType, v: f64) -> i64 {
    let (lo, hi) = int_range(dtype);
    if v.is_nan() {
        0
    } else if v.trunc() <= lo as f64 {
        lo
    } else if v.trunc() >= hi as f64 {
        // For i64, `hi as f64` is 2^63, one past the maximum: saturate too.
        hi
    } else {
        v.trunc() as i64
    }
}

/// An integer to f32 rounded to odd at 24 bits: exact below 2^24, and
/// otherwise precise enough that a second rounding to f16 or bf16 (≤ 11
/// bits) is the correctly rounded result.
fn int_to_f32_round_to_odd(v: i64) -> f32 {
    let mag = v.unsigned_abs();
    let bits = 64 - mag.leading_zeros();
    let f = if bits <= 24 {
        mag as f32
    } else {
        let shift = bits - 24;
        let mut m = mag >> shift;
        if mag & ((1u64 << shift) - 1) != 0 {
            m |= 1;
        }
        (m as f32) * 2f32.powi(shift as i32)
    };
    if v < 0 { -f } else { f }
}

/// An integer to a float dtype, rounded to nearest even.
pub fn int_to_float(dtype: DType, v: i64) -> f64 {
    match dtype {
        DType::F32 => f64::from(v as f32),
        DType::F16 => f16::from_f32(int_to_f32_round_to_odd(v)).to_f64(),
        DType::BF16 => bf16::from_f32(int_to_f32_round_to_odd(v)).to_f64(),
        d => panic!("{d} is not a float dtype"),
    }
}

/// `value` cast to `dtype` as `scalar` does before applying the op.
pub fn cast_scalar(dtype: DType, value: f32) -> Vals {
    if dtype.is_float() {
        Vals::F(vec![round_float(dtype, f64::from(value))])
    } else {
        Vals::I(vec![float_to_int(dtype, f64::from(value))])
    }
}

fn float_binary(op: BinaryOp, a: f64, b: f64) -> f64 {
    match op {
        BinaryOp::Add => a + b,
        BinaryOp::Sub => a - b,
        BinaryOp::Mul => a * b,
        BinaryOp::Div => a / b,
        BinaryOp::Max => {
            if a >= b {
                a
            } else {
                b
            }
        }
        BinaryOp::Min => {
            if a <= b {
                a
            } else {
                b
            }
        }
        BinaryOp::Pow => a.powf(b),
    }
}

fn int_binary(dtype: DType, op: BinaryOp, a: i64, b: i64) -> i64 {
    let (a, b) = (i128::from(a), i128::from(b));
    let exact = match op {
        BinaryOp::Add => a + b,
        BinaryOp::Sub => a - b,
        BinaryOp::Mul => a * b,
        // i128 division truncates toward zero; i64::MIN / -1 wraps below.
        BinaryOp::Div => {
            if b == 0 {
                0
            } else {
                a / b
            }
        }
        BinaryOp::Max => a.max(b),
        BinaryOp::Min => a.min(b),
        BinaryOp::Pow => {
            if b < 0 {
                // 1 / a^|b|, truncated.
                match a {
                    1 => 1,
                    -1 => {
                        if b % 2 == 0 {
                            1
                        } else {
                            -1
                        }
                    }
                    _ => 0,
                }
            } else {
                // Square and multiply, wrapping after every product (the
                // wrapped value is the same modulo 2^bits).
                let (mut acc, mut base, mut e) = (1i128, a, b);
                while e > 0 {
                    if e % 2 == 1 {
                        acc = i128::from(wrap_int(dtype, acc * base));
                    }
                    base = i128::from(wrap_int(dtype, base * base));
                    e /= 2;
                }
                acc
            }
        }
    };
    wrap_int(dtype, exact)
}

// ---------------------------------------------------------------------------
// Elementwise ops
// ---------------------------------------------------------------------------

/// `a ∘ b` with numpy broadcasting.
pub fn binary(op: BinaryOp, a: &Host, b: &Host) -> Host {
    assert_eq!(a.dtype, b.dtype);
    let dims = broadcast(&a.dims, &b.dims).expect("shapes broadcast");
    let n = numel(&dims);
    let pos = |i: usize| {
        let idx = unravel(i, &dims);
        (source_index(&idx, &a.dims), source_index(&idx, &b.dims))
    };
    match (&a.vals, &b.vals) {
        (Vals::F(x), Vals::F(y)) => {
            let out = (0..n)
                .map(|i| {
                    let (ia, ib) = pos(i);
                    float_binary(op, x[ia], y[ib])
                })
                .collect();
            Host::f_exact(a.dtype, &dims, out)
        }
        (Vals::I(x), Vals::I(y)) => {
            let out = (0..n)
                .map(|i| {
                    let (ia, ib) = pos(i);
                    int_binary(a.dtype, op, x[ia], y[ib])
                })
                .collect();
            Host::i(a.dtype, &dims, out)
        }
        _ => unreachable!(),
    }
}

/// `a ∘ value`, the value first cast to a's dtype.
pub fn scalar(op: BinaryOp, a: &Host, value: f32) -> Host {
    let s = Host {
        dtype: a.dtype,
        dims: vec![],
        vals: cast_scalar(a.dtype, value),
    };
    binary(op, a, &s)
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// An elementwise float op.
pub fn unary(op: UnaryOp, a: &Host) -> Host {
    let out = a
        .floats()
        .iter()
        .map(|&x| match op {
            UnaryOp::Neg => -x,
            UnaryOp::Exp => x.exp(),
            UnaryOp::Log => x.ln(),
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Tanh => x.tanh(),
            UnaryOp::Sigmoid => sigmoid(x),
            UnaryOp::Relu => {
                if x.is_nan() || x > 0.0 {
                    x
                } else {
                    0.0
                }
            }
            UnaryOp::Gelu => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
            UnaryOp::Silu => x * sigmoid(x),
            UnaryOp::Abs => x.abs(),
        })
        .collect();
    Host::f_exact(a.dtype, &a.dims, out)
}

// ---------------------------------------------------------------------------
// Reductions and normalizations
// ---------------------------------------------------------------------------

/// The positions (linear, in `dims`) of each line along `axis`, grouped by
/// the multi-index of the other dims (in row-major order of those dims).
fn lines(dims: &[usize], axis: usize) -> Vec<Vec<usize>> {
    let mut rest = dims.to_vec();
    rest[axis] = 1;
    (0..numel(&rest))
        .map(|o| {
            let mut idx = unravel(o, &rest);
            (0..dims[axis])
                .map(|j| {
                    idx[axis] = j;
                    ravel(&idx, dims)
                })
                .collect()
        })
        .collect()
}

/// Reduces over `axis`; `None` where the op is refused (max, min, argmax
/// over an empty axis).
pub fn reduce(op: ReduceOp, a: &Host, axis: i64, keepdim: bool) -> Option<Host> {
    let ax = resolve_axis(axis, a.dims.len());
    let len = a.dims[ax];
    if len == 0 && matches!(op, ReduceOp::Max | ReduceOp::Min | ReduceOp::ArgMax) {
        return None;
    }
    let mut out_dims = a.dims.clone();
    if keepdim {
        out_dims[ax] = 1;
    } else {
        out_dims.remove(ax);
    }
    let lines = lines(&a.dims, ax);
    if op == ReduceOp::ArgMax {
        let out = lines
            .iter()
            .map(|line| {
                // First NaN if any (NaN is the maximum), else first maximum.
                let mut best = 0;
                for (j, &p) in line.iter().enumerate() {
                    let (v, bv) = (a.at_f64(p), a.at_f64(line[best]));
                    if bv.is_nan() {
                        break;
                    }
                    let better = match &a.vals {
                        Vals::I(x) => x[p] > x[line[best]],
                        Vals::F(_) => v.is_nan() || v > bv,
                    };
                    if better {
                        best = j;
                    }
                }
                best as i64
            })
            .collect();
        return Some(Host::i(DType::I64, &out_dims, out));
    }
    Some(match &a.vals {
        Vals::F(x) => {
            let out = lines
                .iter()
                .map(|line| {
                    let v: Vec<f64> = line.iter().map(|&p| x[p]).collect();
                    let sum: f64 = v.iter().sum();
                    match op {
                        ReduceOp::Sum => sum,
                        ReduceOp::Mean => sum / v.len() as f64,
                        ReduceOp::Max if v.iter().any(|x| x.is_nan()) => f64::NAN,
                        ReduceOp::Min if v.iter().any(|x| x.is_nan()) => f64::NAN,
                        ReduceOp::Max => v.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
                        ReduceOp::Min => v.iter().cloned().fold(f64::INFINITY, f64::min),
                        ReduceOp::ArgMax => unreachable!(),
                    }
                })
                .collect();
            Host::f_exact(a.dtype, &out_dims, out)
        }
        Vals::I(x) => {
            let out = lines
                .iter()
                .map(|line| {
                    let v: Vec<i128> = line.iter().map(|&p| i128::from(x[p])).collect();
                    let sum: i128 = v.iter().sum();
                    match op {
                        ReduceOp::Sum => wrap_int(a.dtype, sum),
                        // The exact mean, truncated toward zero (i128
                        // division truncates); an empty axis gives 0 like
                        // every integer division by zero.
                        ReduceOp::Mean if v.is_empty() => 0,
                        ReduceOp::Mean => wrap_int(a.dtype, sum / v.len() as i128),
                        ReduceOp::Max => *v.iter().max().unwrap() as i64,
                        ReduceOp::Min => *v.iter().min().unwrap() as i64,
                        ReduceOp::ArgMax => unreachable!(),
                    }
                })
                .collect();
            Host::i(a.dtype, &out_dims, out)
        }
    })
}

/// Softmax over `axis`, with the maximum subtracted first.
pub fn softmax(a: &Host, axis: i64) -> Host {
    let ax = resolve_axis(axis, a.dims.len());
    let x = a.floats();
    let mut out = vec![0.0; x.len()];
    for line in lines(&a.dims, ax) {
        let m = line.iter().map(|&p| x[p]).fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = line.iter().map(|&p| (x[p] - m).exp()).collect();
        let s: f64 = e.iter().sum();
        for (j, &p) in line.iter().enumerate() {
            out[p] = e[j] / s;
        }
    }
    Host::f_exact(a.dtype, &a.dims, out)
}

/// Rows of the last axis, as (row start, row length).
fn last_axis_rows(dims: &[usize]) -> Vec<Vec<usize>> {
    lines(dims, dims.len() - 1)
}

/// `(x − mean) / √(var + eps) · gamma + beta` over the last axis, biased
/// variance. Also returns each element's conditioning: how much an
/// absolute rounding error of the mean is amplified in that element
/// (max|x|·max(1, max|γ|) / √(var + eps) of its row).
pub fn layer_norm(
    x: &Host,
    gamma: Option<&Host>,
    beta: Option<&Host>,
    eps: f32,
) -> (Host, Vec<f64>) {
    let v = x.floats();
    let eps = f64::from(eps);
    let mut out = vec![0.0; v.len()];
    let mut cond = vec![0.0; v.len()];
    let gmax = gamma.map_or(1.0, |g| {
        g.floats().iter().fold(1.0f64, |m, x| m.max(x.abs()))
    });
    for row in last_axis_rows(&x.dims) {
        let n = row.len() as f64;
        let mean = row.iter().map(|&p| v[p]).sum::<f64>() / n;
        let var = row.iter().map(|&p| (v[p] - mean).powi(2)).sum::<f64>() / n;
        let inv = 1.0 / (var + eps).sqrt();
        let xmax = row.iter().fold(0.0f64, |m, &p| m.max(v[p].abs()));
        for (j, &p) in row.iter().enumerate() {
            let g = gamma.map_or(1.0, |g| g.floats()[j]);
            let b = beta.map_or(0.0, |b| b.floats()[j]);
            out[p] = (v[p] - mean) * inv * g + b;
            cond[p] = xmax * gmax * inv;
        }
    }
    (Host::f_exact(x.dtype, &x.dims, out), cond)
}

/// `x / √(mean(x²) + eps) · gamma` over the last axis.
pub fn rms_norm(x: &Host, gamma: Option<&Host>, eps: f32) -> Host {
    let v = x.floats();
    let eps = f64::from(eps);
    let mut out = vec![0.0; v.len()];
    for row in last_axis_rows(&x.dims) {
        let ms = row.iter().map(|&p| v[p] * v[p]).sum::<f64>() / row.len() as f64;
        let inv = 1.0 / (ms + eps).sqrt();
        for (j, &p) in row.iter().enumerate() {
            let g = gamma.map_or(1.0, |g| g.floats()[j]);
            out[p] = v[p] * inv * g;
        }
    }
    Host::f_exact(x.dtype, &x.dims, out)
}

// ---------------------------------------------------------------------------
// Data movement
// ---------------------------------------------------------------------------

fn pick(a: &Host, positions: &[usize], dtype: DType, dims: &[usize]) -> Host {
    let vals = match &a.vals {
        Vals::F(x) => Vals::F(positions.iter().map(|&p| x[p]).collect()),
        Vals::I(x) => Vals::I(positions.iter().map(|&p| x[p]).collect()),
    };
    Host {
        dtype,
        dims: dims.to_vec(),
        vals,
    }
}

/// The dims a reshape target resolves to, or `None` when it cannot.
pub fn reshape_dims(numel_in: usize, target: &[i64]) -> Option<Vec<usize>> {
    if target.iter().filter(|&&d| d == -1).count() > 1 || target.iter().any(|&d| d < -1) {
        return None;
    }
    let known: Option<usize> = target
        .iter()
        .filter(|&&d| d != -1)
        .try_fold(1usize, |acc, &d| acc.checked_mul(usize::try_from(d).ok()?));
    let known = known?;
    let mut out = Vec::new();
    for &d in target {
        if d == -1 {
            if known == 0 || !numel_in.is_multiple_of(known) {
                return None;
            }
            out.push(numel_in / known);
        } else {
            out.push(d as usize);
        }
    }
    (numel(&out) == numel_in).then_some(out)
}

/// The same elements, in the same order, with other dims.
pub fn reshape(a: &Host, target: &[i64]) -> Host {
    let dims = reshape_dims(a.numel(), target).expect("valid reshape");
    Host {
        dtype: a.dtype,
        dims,
        vals: a.vals.clone(),
    }
}

/// Output dim i is input dim `perm[i]`.
pub fn transpose(a: &Host, perm: &[usize]) -> Host {
    let out_dims: Vec<usize> = perm.iter().map(|&p| a.dims[p]).collect();
    let positions: Vec<usize> = (0..a.numel())
        .map(|i| {
            let out_idx = unravel(i, &out_dims);
            let mut in_idx = vec![0; perm.len()];
            for (j, &p) in perm.iter().enumerate() {
                in_idx[p] = out_idx[j];
            }
            ravel(&in_idx, &a.dims)
        })
        .collect();
    pick(a, &positions, a.dtype, &out_dims)
}

/// Converts every element to `dtype`.
pub fn cast(a: &Host, dtype: DType) -> Host {
    let vals = match (&a.vals, dtype.is_float()) {
        (Vals::F(x), true) => Vals::F(x.iter().map(|&v| round_float(dtype, v)).collect()),
        (Vals::F(x), false) => Vals::I(x.iter().map(|&v| float_to_int(dtype, v)).collect()),
        (Vals::I(x), true) => Vals::F(x.iter().map(|&v| int_to_float(dtype, v)).collect()),
        (Vals::I(x), false) => Vals::I(x.iter().map(|&v| wrap_int(dtype, i128::from(v))).collect()),
    };
    Host {
        dtype,
        dims: a.dims.clone(),
        vals,
    }
}

/// Rows of `table` picked by `indices`; `None` if an index is out of range.
pub fn gather(table: &Host, indices: &Host) -> Option<Host> {
    let rows = table.dims[0];
    let row_dims = &table.dims[1..];
    let mut out_dims = indices.dims.clone();
    out_dims.extend_from_slice(row_dims);
    let mut positions = Vec::new();
    for &i in indices.ints() {
        if i < 0 || i as u64 >= rows as u64 {
            return None;
        }
        for r in 0..numel(row_dims) {
            let mut idx = vec![i as usize];
            idx.extend(unravel(r, row_dims));
            positions.push(ravel(&idx, &table.dims));
        }
    }
    Some(pick(table, &positions, table.dtype, &out_dims))
}

/// `a` and `b` joined along `axis`.
pub fn concat(a: &Host, b: &Host, axis: i64) -> Host {
    let ax = resolve_axis(axis, a.dims.len());
    let mut out_dims = a.dims.clone();
    out_dims[ax] += b.dims[ax];
    let n = numel(&out_dims);
    let from = |i: usize| -> (bool, usize) {
        let mut idx = unravel(i, &out_dims);
        if idx[ax] < a.dims[ax] {
            (true, ravel(&idx, &a.dims))
        } else {
            idx[ax] -= a.dims[ax];
            (false, ravel(&idx, &b.dims))
        }
    };
    let vals = match (&a.vals, &b.vals) {
        (Vals::F(x), Vals::F(y)) => Vals::F(
            (0..n)
                .map(|i| match from(i) {
                    (true, p) => x[p],
                    (false, p) => y[p],
                })
                .collect(),
        ),
        (Vals::I(x), Vals::I(y)) => Vals::I(
            (0..n)
                .map(|i| match from(i) {
                    (true, p) => x[p],
                    (false, p) => y[p],
                })
                .collect(),
        ),
        _ => unreachable!(),
    };
    Host {
        dtype: a.dtype,
        dims: out_dims,
        vals,
    }
}

// ---------------------------------------------------------------------------
// Matmul and attention
// ---------------------------------------------------------------------------

/// The matrix `[rows, cols]` of `t` at batch multi-index `batch` (which
/// broadcasts over t's own batch dims), as a closure `(i, j) → value`.
fn matrix_at<'a>(
    t: &'a Host,
    dims: &'a [usize],
    batch: &'a [usize],
) -> impl Fn(usize, usize) -> f64 + 'a {
    let nb = dims.len() - 2;
    let pad = batch.len() - nb;
    move |i, j| {
        let mut idx: Vec<usize> = (0..nb)
            .map(|d| if dims[d] == 1 { 0 } else { batch[pad + d] })
            .collect();
        idx.push(i);
        idx.push(j);
        t.floats()[ravel(&idx, dims)]
    }
}

/// `[.., m, k] × [.., k, n]` with numpy's rules for 1-D operands.
pub fn matmul(a: &Host, b: &Host) -> Host {
    let a2: Vec<usize> = if a.dims.len() == 1 {
        vec![1, a.dims[0]]
    } else {
        a.dims.clone()
    };
    let b2: Vec<usize> = if b.dims.len() == 1 {
        vec![b.dims[0], 1]
    } else {
        b.dims.clone()
    };
    let (m, k) = (a2[a2.len() - 2], a2[a2.len() - 1]);
    let (kb, n) = (b2[b2.len() - 2], b2[b2.len() - 1]);
    assert_eq!(k, kb, "inner dims");
    let batch_dims = broadcast(&a2[..a2.len() - 2], &b2[..b2.len() - 2]).expect("batch dims");
    let mut out = Vec::new();
    for bi in 0..numel(&batch_dims) {
        let batch = unravel(bi, &batch_dims);
        let am = matrix_at(a, &a2, &batch);
        let bm = matrix_at(b, &b2, &batch);
        for i in 0..m {
            for j in 0..n {
                out.push((0..k).map(|p| am(i, p) * bm(p, j)).sum());
            }
        }
    }
    let mut out_dims = batch_dims;
    if a.dims.len() > 1 {
        out_dims.push(m);
    }
    if b.dims.len() > 1 {
        out_dims.push(n);
    }
    Host::f_exact(a.dtype, &out_dims, out)
}

/// `softmax(q·kᵀ/√d)·v` with broadcast batch dims; with `causal`, key j is
/// masked for query i when j > i.
pub fn attention(q: &Host, k: &Host, v: &Host, causal: bool) -> Host {
    let split = |d: &[usize]| (d[..d.len() - 2].to_vec(), d[d.len() - 2], d[d.len() - 1]);
    let (qb, lq, d) = split(&q.dims);
    let (kb, lk, _) = split(&k.dims);
    let (vb, _, dv) = split(&v.dims);
    let batch_dims = broadcast(&broadcast(&qb, &kb).expect("q, k"), &vb).expect("v");
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = Vec::new();
    for bi in 0..numel(&batch_dims) {
        let batch = unravel(bi, &batch_dims);
        let (qm, km, vm) = (
            matrix_at(q, &q.dims, &batch),
            matrix_at(k, &k.dims, &batch),
            matrix_at(v, &v.dims, &batch),
        );
        for i in 0..lq {
            let visible: Vec<usize> = (0..lk).filter(|&j| !causal || j <= i).collect();
            let scores: Vec<f64> = visible
                .iter()
                .map(|&j| (0..d).map(|p| qm(i, p) * km(j, p)).sum::<f64>() * scale)
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let total: f64 = e.iter().sum();
            for c in 0..dv {
                out.push(
                    visible
                        .iter()
                        .zip(&e)
                        .map(|(&j, w)| w / total * vm(j, c))
                        .sum(),
                );
            }
        }
    }
    let mut out_dims = batch_dims;
    out_dims.extend([lq, dv]);
    Host::f_exact(q.dtype, &out_dims, out)
}
