//! Property tests: every op of the CPU backend against the reference, on
//! random shapes (broadcasting, size-0 dims, 1-D and batched matmul), random
//! values and every dtype the op accepts.
//!
//! Proptest picks the structure (dtype, op, shape, a seed); the seed makes
//! the values, so a failure prints everything needed to replay it.

use proptest::prelude::*;
use tensor_wasm_kernels::{Backend, BinaryOp, DType, ReduceOp, UnaryOp};

use crate::reference;
use crate::util::{
    Expect, FLOATS, Gen, Host, INTS, abs, assert_close, assert_close_by, assert_exact,
    assert_frobenius, backend, broadcastable_to, download, elem_tol, expect_err, numel, untouched,
    upload,
};

const CASES: u32 = 48;

/// `cases` cases; failures print the minimal input and its seed rather than
/// writing regression files next to the sources.
pub fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn any_dtype() -> impl Strategy<Value = DType> {
    prop::sample::select(DType::ALL.to_vec())
}

fn float_dtype() -> impl Strategy<Value = DType> {
    prop::sample::select(FLOATS.to_vec())
}

fn index_dtype() -> impl Strategy<Value = DType> {
    prop::sample::select(vec![DType::I32, DType::I64])
}

/// A dim: mostly 1..=4, sometimes 0.
fn dim() -> impl Strategy<Value = usize> {
    prop_oneof![1 => Just(0usize), 9 => 1usize..=4]
}

fn dims(min_rank: usize, max_rank: usize) -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(dim(), min_rank..=max_rank)
}

/// An axis of a rank-`rank` tensor, counted from the front or the back.
fn pick_axis(g: &mut Gen, rank: usize) -> i64 {
    let a = g.rng().gen_range(0..rank) as i64;
    if g.bool(0.5) { a - rank as i64 } else { a }
}

use rand::Rng;

/// Operands for a binary op, in domains where the float op is well
/// conditioned and stays within f16's range.
fn binary_operands(
    g: &mut Gen,
    dtype: DType,
    op: BinaryOp,
    ad: &[usize],
    bd: &[usize],
) -> (Host, Host) {
    let (na, nb) = (numel(ad), numel(bd));
    if dtype.is_float() {
        let x = match op {
            BinaryOp::Pow => g.floats(dtype, na, 0.25, 4.0),
            _ => g.floats(dtype, na, -4.0, 4.0),
        };
        let y = match op {
            BinaryOp::Pow => g.floats(dtype, nb, -3.0, 3.0),
            // Divisors away from zero, of either sign.
            BinaryOp::Div => (0..nb)
                .map(|_| {
                    let m = g.floats(dtype, 1, 0.25, 4.0)[0];
                    if g.bool(0.5) { -m } else { m }
                })
                .collect(),
            _ => g.floats(dtype, nb, -4.0, 4.0),
        };
        (Host::f(dtype, ad, x), Host::f(dtype, bd, y))
    } else {
        let x = g.ints(dtype, na);
        let y = match op {
            BinaryOp::Pow => g.ints_in(dtype, nb, -3, 20),
            _ => g.ints(dtype, nb),
        };
        (Host::i(dtype, ad, x), Host::i(dtype, bd, y))
    }
}

/// Scalars worth trying: fractions, negatives, values that saturate every
/// integer dtype, NaN, zero.
const SCALARS: [f32; 16] = [
    0.0,
    1.0,
    -1.0,
    2.0,
    0.5,
    -1.5,
    2.7,
    -2.7,
    3.0,
    255.0,
    300.7,
    1e10,
    -1e10,
    7.0,
    -0.25,
    f32::NAN,
];

proptest! {
    #![proptest_config(config(CASES))]

    #[test]
    fn binary_matches_reference(
        dtype in any_dtype(),
        op in prop::sample::select(BinaryOp::ALL.to_vec()),
        out in dims(0, 4),
        swap in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let b = backend();
        let mut g = Gen::new(seed);
        let (mut ad, mut bd) = (broadcastable_to(&mut g, &out), broadcastable_to(&mut g, &out));
        if swap {
            std::mem::swap(&mut ad, &mut bd);
        }
        let (x, y) = binary_operands(&mut g, dtype, op, &ad, &bd);
        let (tx, ty) = (upload(&b, &x), upload(&b, &y));
        let got = untouched(&b, &[&tx, &ty], || b.binary(op, &tx, &ty)).unwrap();
        let want = reference::binary(op, &x, &y);
        assert_close(&format!("binary {op:?} {dtype} {ad:?} {bd:?} seed {seed}"), &download(&b, &got), &want);
    }

    #[test]
    fn scalar_matches_reference(
        dtype in any_dtype(),
        op in prop::sample::select(BinaryOp::ALL.to_vec()),
        dims in dims(0, 3),
        value in prop_oneof![prop::sample::select(SCALARS.to_vec()), -10.0f32..10.0],
        seed in any::<u64>(),
    ) {
        // Float max/min with NaN is not specified.
        prop_assume!(!(dtype.is_float() && value.is_nan() && matches!(op, BinaryOp::Max | BinaryOp::Min)));
        let b = backend();
        let mut g = Gen::new(seed);
        let x = match (dtype.is_float(), op) {
            (true, BinaryOp::Pow) => Host::f(dtype, &dims, g.floats(dtype, numel(&dims), 0.25, 4.0)),
            _ => g.host(dtype, &dims, -4.0, 4.0),
        };
        let t = upload(&b, &x);
        let got = untouched(&b, &[&t], || b.scalar(op, &t, value)).unwrap();
        let want = reference::scalar(op, &x, value);
        assert_close(&format!("scalar {op:?} {dtype} {dims:?} value {value} seed {seed}"), &download(&b, &got), &want);
    }

    #[test]
    fn unary_matches_reference(
        dtype in float_dtype(),
        op in prop::sample::select(UnaryOp::ALL.to_vec()),
        dims in dims(0, 4),
        seed in any::<u64>(),
    ) {
        let b = backend();
        let mut g = Gen::new(seed);
        let (lo, hi) = match op {
            UnaryOp::Log | UnaryOp::Sqrt => (0.01, 10.0),
            _ => (-8.0, 8.0),
        };
        let x = g.host(dtype, &dims, lo, hi);
        let t = upload(&b, &x);
        let got = untouched(&b, &[&t], || b.unary(op, &t)).unwrap();
        assert_close(&format!("unary {op:?} {dtype} {dims:?} seed {seed}"), &download(&b, &got), &reference::unary(op, &x));
    }

    #[test]
    fn reduce_matches_reference(
        dtype in any_dtype(),
        op in prop::sample::select(ReduceOp::ALL.to_vec()),
        dims in dims(1, 4),
        keepdim in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let b = backend();
        let mut g = Gen::new(seed);
        let axis = pick_axis(&mut g, dims.len());
        let mut x = g.host(dtype, &dims, -2.0, 2.0);
        if dtype == DType::I64 && op == ReduceOp::Mean {
            // The mean of i64 values whose sum overflows is not specified.
            x = Host::i(dtype, &dims, g.ints_in(dtype, numel(&dims), -(1 << 50), 1 << 50));
        }
        if dtype.is_float() && matches!(op, ReduceOp::Max | ReduceOp::Min | ReduceOp::ArgMax) && g.bool(0.3) {
            // NaN is the maximum, and propagates through max and min.
            let mut v = x.floats().to_vec();
            let n = v.len();
            if n > 0 {
                v[g.rng().gen_range(0..n)] = f64::NAN;
            }
            x = Host::f(dtype, &dims, v);
        }
        let t = upload(&b, &x);
        let got = untouched(&b, &[&t], || b.reduce(op, &t, axis, keepdim));
        let what = format!("reduce {op:?} {dtype} {dims:?} axis {axis} keepdim {keepdim} seed {seed}");
        match reference::reduce(op, &x, axis, keepdim) {
            // An empty axis with an empty result: pinned by
            // `dtype_rules::reducing_an_empty_axis`, either is taken here.
            None if got.as_ref().is_ok_and(|t| t.numel() == 0) => {}
            None => expect_err(&what, got, Expect::Invalid),
            Some(want) => assert_close(&what, &download(&b, &got.unwrap()), &want),
        }
    }

    #[test]
    fn softmax_matches_reference(
        dtype in float_dtype(),
        dims in dims(1, 4),
        offset in prop::sample::select(vec![0.0, 50.0, -50.0]),
        seed in any::<u64>(),
    ) {
        let b = backend();
        let mut g = Gen::new(seed);
        let axis = pick_axis(&mut g, dims.len());
        let x = g.host(dtype, &dims, offset - 8.0, offset + 8.0);
        let t = upload(&b, &x);
        let got = untouched(&b, &[&t], || b.softmax(&t, axis)).unwrap();
        assert_close(&format!("softmax {dtype} {dims:?} axis {axis} seed {seed}"), &download(&b, &got), &reference::softmax(&x, axis));
    }

    #[test]
    fn layer_norm_matches_reference(
        dtype in float_dtype(),
        dims in dims(1, 3),
        with_gamma in any::<bool>(),
        with_beta in any::<bool>(),
        eps in prop::sample::select(vec![1e-5f32, 1e-3, 0.5]),
        seed in any::<u64>(),
    ) {
        let b = backend();
        let mut g = Gen::new(seed);
        let cols = *dims.last().unwrap();
        let x = g.host(dtype, &dims, -2.0, 2.0);
        let gamma = with_gamma.then(|| g.host(dtype, &[cols], -2.0, 2.0));
        let beta = with_beta.then(|| g.host(dtype, &[cols], -2.0, 2.0));
        let (tx, tg, tb) = (upload(&b, &x), gamma.as_ref().map(|h| upload(&b, h)), beta.as_ref().map(|h| upload(&b, h)));
        let operands: Vec<_> = [Some(&tx), tg.as_ref(), tb.as_ref()].into_iter().flatten().collect();
        let got = untouched(&b, &operands, || b.layer_norm(&tx, tg.as_ref(), tb.as_ref(), eps)).unwrap();
        let (want, cond) = reference::layer_norm(&x, gamma.as_ref(), beta.as_ref(), eps);
        // Subtracting the mean loses |x|·ε absolutely; dividing by σ
        // amplifies that by `cond`, so the tolerance scales with it.
        let tol = elem_tol(dtype);
        assert_close_by(
            &format!("layer_norm {dtype} {dims:?} gamma {with_gamma} beta {with_beta} eps {eps} seed {seed}"),
            &download(&b, &got),
            &want,
            |i| tol * cond[i].max(1.0),
        );
    }

    #[test]
    fn rms_norm_matches_reference(
        dtype in float_dtype(),
        dims in dims(1, 3),
        with_gamma in any::<bool>(),
        eps in prop::sample::select(vec![1e-6f32, 1e-3, 0.5]),
        seed in any::<u64>(),
    ) {
        let b = backend();
        let mut g = Gen::new(seed);
        let cols = *dims.last().unwrap();
        let x = g.host(dtype, &dims, -2.0, 2.0);
        let gamma = with_gamma.then(|| g.host(dtype, &[cols], -2.0, 2.0));
        let (tx, tg) = (upload(&b, &x), gamma.as_ref().map(|h| upload(&b, h)));
        let operands: Vec<_> = [Some(&tx), tg.as_ref()].into_iter().flatten().collect();
        let got = untouched(&b, &operands, || b.rms_norm(&tx, tg.as_ref(), eps)).unwrap();
        assert_close(
            &format!("rms_norm {dtype} {dims:?} gamma {with_gamma} eps {eps} seed {seed}"),
            &download(&b, &got),
            &reference::rms_norm(&x, gamma.as_ref(), eps),
        );
    }

    #[test]
    fn matmul_matches_reference(
        dtype in float_dtype(),
        // 0: batched ≥ 2-D; 1: 1-D a; 2: 1-D b; 3: both 1-D.
        mode in 0u8..4,
        batch in dims(0, 2),
        (m, k, n) in (0usize..=5, 0usize..=6, 0usize..=5),
        seed in any::<u64>(),
    ) {
        let b = backend();
        let mut g = Gen::new(seed);
        let mut ad = broadcastable_to(&mut g, &batch);
        let mut bd = broadcastable_to(&mut g, &batch);
        ad.extend([m, k]);
        bd.extend([k, n]);
        if mode & 1 == 1 {
            ad = vec![k];
        }
        if mode & 2 == 2 {
            bd = vec![k];
        }
        let (x, y) = (g.host(dtype, &ad, -1.0, 1.0), g.host(dtype, &bd, -1.0, 1.0));
        let (tx, ty) = (upload(&b, &x), upload(&b, &y));
        let got = untouched(&b, &[&tx, &ty], || b.matmul(&tx, &ty)).unwrap();
        assert_frobenius(&format!("matmul {dtype} {ad:?} × {bd:?} seed {seed}"), &download(&b, &got), &reference::matmul(&x, &y), &reference::matmul(&abs(&x), &abs(&y)));
    }

    #[test]
    fn attention_matches_reference(
        dtype in float_dtype(),
        batch in dims(0, 2),
        (lq, lk, d, dv) in (0usize..=5, 1usize..=5, 1usize..=6, 0usize..=5),
        causal in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let b = backend();
        let mut g = Gen::new(seed);
        let mut qd = broadcastable_to(&mut g, &batch);
        let mut kd = broadcastable_to(&mut g, &batch);
        let mut vd = broadcastable_to(&mut g, &batch);
        qd.extend([lq, d]);
        kd.extend([lk, d]);
        vd.extend([lk, dv]);
        let (q, k, v) = (g.host(dtype, &qd, -2.0, 2.0), g.host(dtype, &kd, -2.0, 2.0), g.host(dtype, &vd, -1.0, 1.0));
        let (tq, tk, tv) = (upload(&b, &q), upload(&b, &k), upload(&b, &v));
        let got = untouched(&b, &[&tq, &tk, &tv], || b.attention(&tq, &tk, &tv, causal)).unwrap();
        assert_frobenius(
            &format!("attention {dtype} q {qd:?} k {kd:?} v {vd:?} causal {causal} seed {seed}"),
            &download(&b, &got),
            &reference::attention(&q, &k, &v, causal),
            &reference::attention(&q, &k, &abs(&v), causal),
        );
    }

    #[test]
    fn reshape_matches_reference(
        dtype in any_dtype(),
        dims in dims(0, 4),
        seed in any::<u64>(),
    ) {
        let b = backend();
        let mut g = Gen::new(seed);
        // A target of the same element count: the dims shuffled, with 1s
        // inserted, adjacent dims merged, and maybe one dim inferred.
        let mut target: Vec<i64> = g.perm(dims.len()).into_iter().map(|i| dims[i] as i64).collect();
        for _ in 0..g.rng().gen_range(0..=2) {
            let at = g.rng().gen_range(0..=target.len());
            target.insert(at, 1);
        }
        if target.len() >= 2 && g.bool(0.5) {
            let at = g.rng().gen_range(0..target.len() - 1);
            let merged = target[at] * target[at + 1];
            target.splice(at..at + 2, [merged]);
        }
        if !target.is_empty() && g.bool(0.5) {
            let at = g.rng().gen_range(0..target.len());
            let rest: i64 = target.iter().enumerate().filter(|&(i, _)| i != at).map(|(_, &d)| d).product();
            if rest != 0 {
                target[at] = -1;
            }
        }
        let x = g.host(dtype, &dims, -100.0, 100.0);
        let t = upload(&b, &x);
        let got = untouched(&b, &[&t], || b.reshape(&t, &target)).unwrap();
        assert_exact(&format!("reshape {dtype} {dims:?} → {target:?}"), &download(&b, &got), &reference::reshape(&x, &target));
    }

    #[test]
    fn transpose_matches_reference(
        dtype in any_dtype(),
        dims in dims(0, 5),
        seed in any::<u64>(),
    ) {
        let b = backend();
        let mut g = Gen::new(seed);
        let perm = g.perm(dims.len());
        let x = g.host(dtype, &dims, -100.0, 100.0);
        let t = upload(&b, &x);
        let got = untouched(&b, &[&t], || b.transpose(&t, &perm)).unwrap();
        assert_exact(&format!("transpose {dtype} {dims:?} by {perm:?}"), &download(&b, &got), &reference::transpose(&x, &perm));
    }

    #[test]
    fn cast_matches_reference(
        from in any_dtype(),
        to in any_dtype(),
        dims in dims(0, 3),
        seed in any::<u64>(),
    ) {
        let b = backend();
        let mut g = Gen::new(seed);
        let n = numel(&dims);
        let x = if from.is_float() {
            let vals = (0..n)
                .map(|_| match g.rng().gen_range(0..5) {
                    0 => *[
                        f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.0, 0.0, 1e10, -1e10,
                        300.7, -1.5, 255.5, -0.99, 65504.0, 65520.0, 1e-8, 3e38, 2147483520.0,
                        2147483648.0, -2147483904.0, 9.3e18, -9.3e18, 1.00390625, 1.01171875,
                    ]
                    .get(g.rng().gen_range(0..22))
                    .unwrap(),
                    1 => g.uniform(-300.0, 300.0),
                    // Next to a rounding tie of bf16 (8 significant bits) or
                    // f16 (11): a tie, or a tie ± one f32 ulp.
                    2 => {
                        let bits = if g.bool(0.5) { 8 } else { 11 };
                        let m = g.rng().gen_range(1u64 << (bits - 1)..1 << bits) as f64;
                        let e = g.rng().gen_range(-10i32..10);
                        let tie = (m + 0.5) * 2f64.powi(e - bits + 1);
                        let ulp = tie.abs() * 2f64.powi(-23);
                        tie + ulp * f64::from(g.rng().gen_range(-1i32..=1))
                    }
                    _ => {
                        let mag = 10f64.powf(g.uniform(-10.0, 12.0));
                        if g.bool(0.5) { -mag } else { mag }
                    }
                })
                .collect();
            Host::f(from, &dims, vals)
        } else {
            Host::i(from, &dims, g.ints(from, n))
        };
        let t = upload(&b, &x);
        let got = untouched(&b, &[&t], || b.cast(&t, to)).unwrap();
        assert_exact(&format!("cast {from} → {to} {dims:?} seed {seed}"), &download(&b, &got), &reference::cast(&x, to));
    }

    #[test]
    fn gather_matches_reference(
        dtype in any_dtype(),
        index_dtype in index_dtype(),
        rows in 1usize..=5,
        row_dims in dims(0, 2),
        index_dims in dims(0, 3),
        seed in any::<u64>(),
    ) {
        let b = backend();
        let mut g = Gen::new(seed);
        let mut table_dims = vec![rows];
        table_dims.extend(&row_dims);
        let table = g.host(dtype, &table_dims, -100.0, 100.0);
        let idx = Host::i(index_dtype, &index_dims, g.ints_in(index_dtype, numel(&index_dims), 0, rows as i64 - 1));
        let (tt, ti) = (upload(&b, &table), upload(&b, &idx));
        let got = untouched(&b, &[&tt, &ti], || b.gather(&tt, &ti)).unwrap();
        assert_exact(
            &format!("gather {dtype} {table_dims:?} by {index_dtype} {index_dims:?} seed {seed}"),
            &download(&b, &got),
            &reference::gather(&table, &idx).unwrap(),
        );
    }

    #[test]
    fn concat_matches_reference(
        dtype in any_dtype(),
        dims in dims(1, 4),
        other in dim(),
        seed in any::<u64>(),
    ) {
        let b = backend();
        let mut g = Gen::new(seed);
        let axis = pick_axis(&mut g, dims.len());
        let mut bd = dims.clone();
        bd[axis.rem_euclid(dims.len() as i64) as usize] = other;
        let (x, y) = (g.host(dtype, &dims, -100.0, 100.0), g.host(dtype, &bd, -100.0, 100.0));
        let (tx, ty) = (upload(&b, &x), upload(&b, &y));
        let got = untouched(&b, &[&tx, &ty], || b.concat(&tx, &ty, axis)).unwrap();
        assert_exact(&format!("concat {dtype} {dims:?} {bd:?} axis {axis}"), &download(&b, &got), &reference::concat(&x, &y, axis));
    }
}

/// Integer dtypes run through the same elementwise property with their full
/// range: a quick deterministic sweep of the edge values of each.
#[test]
fn binary_integer_edges_match_reference() {
    let b = backend();
    for dtype in INTS {
        let (lo, hi) = crate::util::int_range(dtype);
        let edges: Vec<i64> = [lo, lo + 1, -2, -1, 0, 1, 2, 7, hi - 1, hi]
            .into_iter()
            .filter(|v| (lo..=hi).contains(v))
            .collect();
        let n = edges.len();
        // Every pair: a as a column, b as a row.
        let x = Host::i(dtype, &[n, 1], edges.clone());
        let y = Host::i(dtype, &[1, n], edges.clone());
        let (tx, ty) = (upload(&b, &x), upload(&b, &y));
        for op in BinaryOp::ALL {
            let got = b.binary(op, &tx, &ty).unwrap();
            assert_exact(
                &format!("binary {op:?} {dtype} edges"),
                &download(&b, &got),
                &reference::binary(op, &x, &y),
            );
        }
    }
}

#[test]
fn attention_over_long_keys_runs_in_query_blocks() {
    // 1100 keys: the CPU backend holds 3813 rows of scores at a time, so
    // 4100 queries take two blocks, the causal mask continuing across.
    let b = backend();
    let mut g = Gen::new(7);
    let (q, k, v) = (
        g.host(DType::F32, &[4100, 4], -2.0, 2.0),
        g.host(DType::F32, &[1100, 4], -2.0, 2.0),
        g.host(DType::F32, &[1100, 3], -1.0, 1.0),
    );
    let (tq, tk, tv) = (upload(&b, &q), upload(&b, &k), upload(&b, &v));
    for causal in [false, true] {
        let got = b.attention(&tq, &tk, &tv, causal).unwrap();
        assert_frobenius(
            &format!("attention 4100 × 1100 causal {causal}"),
            &download(&b, &got),
            &reference::attention(&q, &k, &v, causal),
            &reference::attention(&q, &k, &abs(&v), causal),
        );
    }
}
