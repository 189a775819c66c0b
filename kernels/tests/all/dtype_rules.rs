//! The dtype rules of `docs/KERNELS.md` ("Semantics"), as explicit examples
//! with values worked out by hand (not by the reference), so each rule is
//! pinned independently of the property tests.

use tensor_wasm_kernels::{Backend, BinaryOp, DType, ReduceOp, UnaryOp};

use crate::util::{Expect, FLOATS, INTS, backend, download, expect_err, ft, int_range, it};

fn floats_of(b: &dyn Backend, t: &tensor_wasm_kernels::Tensor) -> Vec<f64> {
    download(b, t).floats().to_vec()
}

fn ints_of(b: &dyn Backend, t: &tensor_wasm_kernels::Tensor) -> Vec<i64> {
    download(b, t).ints().to_vec()
}

/// NaN-aware float equality, element by element.
#[track_caller]
fn assert_floats(what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g.is_nan() && w.is_nan()) || g == w,
            "{what}: element {i} is {g:e}, expected {w:e} (got {got:?})"
        );
    }
}

#[track_caller]
fn assert_near(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol,
            "{what}: element {i} is {g}, expected {w} ± {tol} (got {got:?})"
        );
    }
}

// ----------------------------------------------------------------------------
// Integer arithmetic
// ----------------------------------------------------------------------------

#[test]
fn integer_division_truncates_toward_zero_and_by_zero_gives_zero() {
    let b = backend();
    for dtype in [DType::I32, DType::I64] {
        let x = it(&b, dtype, &[6], &[7, -7, 7, -7, 5, 0]);
        let y = it(&b, dtype, &[6], &[-2, 2, 2, -2, 0, 0]);
        let q = b.binary(BinaryOp::Div, &x, &y).unwrap();
        assert_eq!(q.dtype(), dtype);
        assert_eq!(ints_of(&b, &q), [-3, -3, 3, 3, 0, 0], "{dtype}");
        // Scalar division by zero (and by a value that casts to zero).
        for v in [0.0, 0.5, -0.9] {
            let q = b.scalar(BinaryOp::Div, &x, v).unwrap();
            assert_eq!(ints_of(&b, &q), [0; 6], "{dtype} / {v}");
        }
    }
    let x = it(&b, DType::U8, &[4], &[7, 200, 0, 255]);
    let y = it(&b, DType::U8, &[4], &[2, 0, 0, 255]);
    let q = b.binary(BinaryOp::Div, &x, &y).unwrap();
    assert_eq!(ints_of(&b, &q), [3, 0, 0, 1]);
}

#[test]
fn integer_division_overflow_wraps() {
    // MIN / -1 overflows; overflow wraps, so the result is MIN.
    let b = backend();
    for dtype in [DType::I32, DType::I64] {
        let (lo, _) = int_range(dtype);
        let x = it(&b, dtype, &[1], &[lo]);
        let y = it(&b, dtype, &[1], &[-1]);
        let q = b.binary(BinaryOp::Div, &x, &y).unwrap();
        assert_eq!(ints_of(&b, &q), [lo], "{dtype} MIN / -1");
    }
}

#[test]
fn integer_overflow_wraps() {
    let b = backend();
    let add = |dtype, x: &[i64], y: &[i64], op| {
        let n = x.len();
        let r = b
            .binary(op, &it(&b, dtype, &[n], x), &it(&b, dtype, &[n], y))
            .unwrap();
        ints_of(&b, &r)
    };
    let (i32min, i32max) = (i64::from(i32::MIN), i64::from(i32::MAX));
    assert_eq!(
        add(DType::I32, &[i32max, i32min], &[1, 1], BinaryOp::Add),
        [i32min, i32min + 1]
    );
    assert_eq!(add(DType::I32, &[i32min], &[1], BinaryOp::Sub), [i32max]);
    assert_eq!(
        add(DType::I32, &[65536, 46341], &[65536, 46341], BinaryOp::Mul),
        [0, -2_147_479_015]
    );
    assert_eq!(
        add(DType::I64, &[i64::MAX], &[1], BinaryOp::Add),
        [i64::MIN]
    );
    assert_eq!(
        add(DType::I64, &[i64::MIN], &[-1], BinaryOp::Mul),
        [i64::MIN]
    );
    assert_eq!(
        add(DType::U8, &[255, 0, 16], &[1, 1, 16], BinaryOp::Add),
        [0, 1, 32]
    );
    assert_eq!(add(DType::U8, &[0, 3], &[1, 5], BinaryOp::Sub), [255, 254]);
    assert_eq!(
        add(DType::U8, &[16, 200], &[16, 2], BinaryOp::Mul),
        [0, 144]
    );
    // Scalars wrap too.
    let r = b
        .scalar(BinaryOp::Add, &it(&b, DType::U8, &[1], &[255]), 1.0)
        .unwrap();
    assert_eq!(ints_of(&b, &r), [0]);
}

#[test]
fn integer_pow() {
    let b = backend();
    let x = it(&b, DType::I32, &[10], &[2, 3, 1, -1, -1, 0, 0, 5, 2, 3]);
    let y = it(
        &b,
        DType::I32,
        &[10],
        &[10, -1, -5, -3, -2, -1, 0, 0, 31, 40],
    );
    let r = b.binary(BinaryOp::Pow, &x, &y).unwrap();
    // 2^31 wraps to i32::MIN; 3^40 wraps to 3^40 mod 2^32 = 689956897.
    assert_eq!(
        ints_of(&b, &r),
        [1024, 0, 1, -1, 1, 0, 1, 1, i64::from(i32::MIN), 689_956_897]
    );
    let x = it(&b, DType::I64, &[3], &[-2, 2, 7]);
    let y = it(&b, DType::I64, &[3], &[3, 63, -2]);
    let r = b.binary(BinaryOp::Pow, &x, &y).unwrap();
    assert_eq!(ints_of(&b, &r), [-8, i64::MIN, 0]);
    let x = it(&b, DType::U8, &[3], &[2, 3, 0]);
    let y = it(&b, DType::U8, &[3], &[8, 5, 0]);
    let r = b.binary(BinaryOp::Pow, &x, &y).unwrap();
    assert_eq!(ints_of(&b, &r), [0, 243, 1]);
}

#[test]
fn integer_max_min_are_exact() {
    let b = backend();
    let x = it(&b, DType::I64, &[2], &[i64::MAX, i64::MIN]);
    let y = it(&b, DType::I64, &[2], &[i64::MAX - 1, i64::MIN + 1]);
    let r = b.binary(BinaryOp::Max, &x, &y).unwrap();
    assert_eq!(ints_of(&b, &r), [i64::MAX, i64::MIN + 1]);
    let r = b.binary(BinaryOp::Min, &x, &y).unwrap();
    assert_eq!(ints_of(&b, &r), [i64::MAX - 1, i64::MIN]);
    // u8 compares unsigned.
    let x = it(&b, DType::U8, &[1], &[200]);
    let r = b
        .binary(BinaryOp::Max, &x, &it(&b, DType::U8, &[1], &[100]))
        .unwrap();
    assert_eq!(ints_of(&b, &r), [200]);
}

// ----------------------------------------------------------------------------
// Scalars
// ----------------------------------------------------------------------------

#[test]
fn scalar_value_is_cast_to_the_tensor_dtype_first() {
    let b = backend();
    let x = it(&b, DType::I32, &[2], &[5, -5]);
    // 2.7 → 2, -2.7 → -2 (truncation, not rounding).
    let r = b.scalar(BinaryOp::Add, &x, 2.7).unwrap();
    assert_eq!(ints_of(&b, &r), [7, -3]);
    let r = b.scalar(BinaryOp::Add, &x, -2.7).unwrap();
    assert_eq!(ints_of(&b, &r), [3, -7]);
    // 1e10 saturates to i32::MAX before the product, which then wraps.
    let r = b
        .scalar(BinaryOp::Mul, &it(&b, DType::I32, &[1], &[10]), 1e10)
        .unwrap();
    assert_eq!(ints_of(&b, &r), [-10]);
    // NaN becomes 0.
    let r = b.scalar(BinaryOp::Add, &x, f32::NAN).unwrap();
    assert_eq!(ints_of(&b, &r), [5, -5]);
    // u8: -1.5 → 0, 300.7 → 255.
    let u = it(&b, DType::U8, &[1], &[10]);
    let r = b.scalar(BinaryOp::Add, &u, -1.5).unwrap();
    assert_eq!(ints_of(&b, &r), [10]);
    let r = b.scalar(BinaryOp::Add, &u, 300.7).unwrap();
    assert_eq!(ints_of(&b, &r), [9]);
    let r = b.scalar(BinaryOp::Max, &u, 300.7).unwrap();
    assert_eq!(ints_of(&b, &r), [255]);
    // i64: a value beyond i32 stays exact.
    let r = b
        .scalar(BinaryOp::Sub, &it(&b, DType::I64, &[1], &[0]), 3e9)
        .unwrap();
    assert_eq!(ints_of(&b, &r), [-3_000_000_000]);
    assert_eq!(r.dtype(), DType::I64);
}

#[test]
fn scalar_on_half_floats_rounds_the_value() {
    let b = backend();
    // 2049 is not an f16: it rounds to 2048 (nearest even) first, and
    // 1 + 2048 = 2049 rounds to 2048 again. (Adding 2049 unrounded would
    // give 2050.)
    let x = ft(&b, DType::F16, &[1], &[1.0]);
    let r = b.scalar(BinaryOp::Add, &x, 2049.0).unwrap();
    assert_eq!(r.dtype(), DType::F16);
    assert_eq!(floats_of(&b, &r), [2048.0]);
}

#[test]
fn half_float_results_round_to_nearest_even() {
    let b = backend();
    // 2048 + 1 = 2049 lies halfway between f16 2048 and 2050 → 2048;
    // 2050 + 1 = 2051 halfway between 2050 and 2052 → 2052.
    let x = ft(&b, DType::F16, &[2], &[2048.0, 2050.0]);
    let r = b.scalar(BinaryOp::Add, &x, 1.0).unwrap();
    assert_eq!(floats_of(&b, &r), [2048.0, 2052.0]);
    // bf16 has 8 significant bits: 256 + 1 → 256, 258 + 1 → 260.
    let x = ft(&b, DType::BF16, &[2], &[256.0, 258.0]);
    let r = b.scalar(BinaryOp::Add, &x, 1.0).unwrap();
    assert_eq!(floats_of(&b, &r), [256.0, 260.0]);
}

// ----------------------------------------------------------------------------
// Casts
// ----------------------------------------------------------------------------

fn cast_f32(b: &dyn Backend, vals: &[f64], to: DType) -> Vec<i64> {
    let t = ft(b, DType::F32, &[vals.len()], vals);
    let r = b.cast(&t, to).unwrap();
    assert_eq!(r.dtype(), to);
    assert_eq!(r.dims(), t.dims());
    ints_of(b, &r)
}

#[test]
fn float_to_int_truncates_and_saturates_and_nan_is_zero() {
    let b = backend();
    let i32s = cast_f32(
        &b,
        &[
            1e10,
            -1e10,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            2.9,
            -2.9,
            -0.5,
        ],
        DType::I32,
    );
    let (lo, hi) = (i64::from(i32::MIN), i64::from(i32::MAX));
    assert_eq!(i32s, [hi, lo, 0, hi, lo, 2, -2, 0]);
    let u8s = cast_f32(&b, &[-1.5, 300.7, 255.9, 0.5, f64::NAN, -1e10], DType::U8);
    assert_eq!(u8s, [0, 255, 255, 0, 0, 0]);
    let i64s = cast_f32(&b, &[1e30, -1e30, 3e9, -3.5, f64::NAN], DType::I64);
    assert_eq!(i64s, [i64::MAX, i64::MIN, 3_000_000_000, -3, 0]);
    // Half floats saturate the same way.
    for from in [DType::F16, DType::BF16] {
        let t = ft(&b, from, &[3], &[-1.5, 300.0, f64::INFINITY]);
        assert_eq!(
            ints_of(&b, &b.cast(&t, DType::U8).unwrap()),
            [0, 255, 255],
            "{from}"
        );
    }
}

#[test]
fn int_to_int_wraps() {
    let b = backend();
    let t = it(
        &b,
        DType::I64,
        &[4],
        &[(1 << 32) + 5, -1, 1 << 31, -(1 << 31) - 1],
    );
    let r = b.cast(&t, DType::I32).unwrap();
    assert_eq!(
        ints_of(&b, &r),
        [5, -1, i64::from(i32::MIN), i64::from(i32::MAX)]
    );
    let t = it(&b, DType::I32, &[4], &[256, -1, 300, -256]);
    let r = b.cast(&t, DType::U8).unwrap();
    assert_eq!(ints_of(&b, &r), [0, 255, 44, 0]);
    // u8 → signed zero-extends.
    let t = it(&b, DType::U8, &[2], &[255, 128]);
    assert_eq!(ints_of(&b, &b.cast(&t, DType::I32).unwrap()), [255, 128]);
    assert_eq!(ints_of(&b, &b.cast(&t, DType::I64).unwrap()), [255, 128]);
    // i32 → i64 sign-extends.
    let t = it(&b, DType::I32, &[1], &[-7]);
    assert_eq!(ints_of(&b, &b.cast(&t, DType::I64).unwrap()), [-7]);
}

#[test]
fn narrowing_float_casts_round_to_nearest_even_and_overflow_to_inf() {
    let b = backend();
    let t = ft(
        &b,
        DType::F32,
        &[8],
        &[65504.0, 65520.0, 1e5, -1e5, 1e-8, 2049.0, 2051.0, f64::NAN],
    );
    let r = b.cast(&t, DType::F16).unwrap();
    let inf = f64::INFINITY;
    assert_floats(
        "f32 → f16",
        &floats_of(&b, &r),
        &[65504.0, inf, inf, -inf, 0.0, 2048.0, 2052.0, f64::NAN],
    );
    // bf16 keeps 8 significant bits: 1 + 2^-8 is a tie → 1; 1 + 3·2^-8 is
    // a tie → 1 + 2^-6 (even); just above the tie rounds up.
    let t = ft(
        &b,
        DType::F32,
        &[5],
        &[
            1.003_906_25,
            1.011_718_75,
            1.003_906_25 + 2f64.powi(-20),
            3e38,
            f64::NAN,
        ],
    );
    let r = b.cast(&t, DType::BF16).unwrap();
    let got = floats_of(&b, &r);
    assert_floats("f32 → bf16", &got[..3], &[1.0, 1.015_625, 1.007_812_5]);
    assert!(
        (got[3] - 3e38).abs() < 3e38 / 128.0,
        "3e38 stays finite: {}",
        got[3]
    );
    assert!(got[4].is_nan());
    // Just above a tie by one f32 ulp (2^-23): the sticky bit must count,
    // so it rounds up.
    let t = ft(&b, DType::F32, &[1], &[1.003_906_25 + 2f64.powi(-23)]);
    let r = b.cast(&t, DType::BF16).unwrap();
    assert_floats("f32 → bf16 above a tie", &floats_of(&b, &r), &[1.007_812_5]);
    let t = ft(
        &b,
        DType::F32,
        &[1],
        &[1.0 + 2f64.powi(-11) + 2f64.powi(-23)],
    );
    let r = b.cast(&t, DType::F16).unwrap();
    assert_floats(
        "f32 → f16 above a tie",
        &floats_of(&b, &r),
        &[1.0 + 2f64.powi(-10)],
    );
    // f16 → bf16: 65504 = 1.1111111111b·2^15 rounds up to 2^16.
    let t = ft(&b, DType::F16, &[2], &[65504.0, -3.0]);
    assert_floats(
        "f16 → bf16",
        &floats_of(&b, &b.cast(&t, DType::BF16).unwrap()),
        &[65536.0, -3.0],
    );
    // bf16 → f16 overflows to inf.
    let t = ft(&b, DType::BF16, &[1], &[1e5]);
    assert_floats(
        "bf16 → f16",
        &floats_of(&b, &b.cast(&t, DType::F16).unwrap()),
        &[inf],
    );
}

#[test]
fn int_to_float_rounds_to_nearest_even_once() {
    let b = backend();
    // 2^24 + 1 is a tie in f32 → 2^24; 2^24 + 3 → 2^24 + 4.
    let t = it(&b, DType::I32, &[2], &[(1 << 24) + 1, (1 << 24) + 3]);
    let r = b.cast(&t, DType::F32).unwrap();
    assert_floats(
        "i32 → f32",
        &floats_of(&b, &r),
        &[16_777_216.0, 16_777_220.0],
    );
    // 2^30 + 2^22 + 1 is just above a bf16 tie: it must round up to
    // 2^30 + 2^23. (Rounding to f32 first lands exactly on the tie and
    // then rounds down to 2^30: a double-rounding error.)
    let t = it(&b, DType::I32, &[1], &[(1 << 30) + (1 << 22) + 1]);
    let r = b.cast(&t, DType::BF16).unwrap();
    assert_floats(
        "i32 → bf16",
        &floats_of(&b, &r),
        &[f64::from((1u32 << 30) + (1 << 23))],
    );
    // i64 beyond f16's range → inf; u8 → f16 exact.
    let t = it(&b, DType::I64, &[2], &[70_000, -70_000]);
    let r = b.cast(&t, DType::F16).unwrap();
    assert_floats(
        "i64 → f16",
        &floats_of(&b, &r),
        &[f64::INFINITY, f64::NEG_INFINITY],
    );
    let t = it(&b, DType::U8, &[2], &[255, 0]);
    assert_floats(
        "u8 → f16",
        &floats_of(&b, &b.cast(&t, DType::F16).unwrap()),
        &[255.0, 0.0],
    );
}

#[test]
fn cast_to_the_same_dtype_is_the_identity() {
    let b = backend();
    for dtype in FLOATS {
        let t = ft(&b, dtype, &[3], &[1.5, f64::NAN, -0.0]);
        let r = b.cast(&t, dtype).unwrap();
        assert_eq!(b.to_bytes(&r).unwrap(), b.to_bytes(&t).unwrap(), "{dtype}");
    }
    for dtype in INTS {
        let (lo, hi) = int_range(dtype);
        let t = it(&b, dtype, &[2], &[lo, hi]);
        let r = b.cast(&t, dtype).unwrap();
        assert_eq!(ints_of(&b, &r), [lo, hi], "{dtype}");
    }
}

// ----------------------------------------------------------------------------
// Reductions
// ----------------------------------------------------------------------------

#[test]
fn argmax_returns_the_first_maximum_as_i64() {
    let b = backend();
    for dtype in FLOATS {
        let t = ft(&b, dtype, &[4], &[1.0, 3.0, 3.0, 2.0]);
        let r = b.reduce(ReduceOp::ArgMax, &t, 0, false).unwrap();
        assert_eq!(r.dtype(), DType::I64, "{dtype}");
        assert_eq!(r.dims(), &[] as &[usize]);
        assert_eq!(ints_of(&b, &r), [1], "{dtype}");
    }
    for dtype in INTS {
        let t = it(&b, dtype, &[2, 3], &[5, 5, 1, 0, 2, 2]);
        let r = b.reduce(ReduceOp::ArgMax, &t, -1, true).unwrap();
        assert_eq!(r.dtype(), DType::I64);
        assert_eq!(r.dims(), &[2, 1]);
        assert_eq!(ints_of(&b, &r), [0, 1], "{dtype}");
        let r = b.reduce(ReduceOp::ArgMax, &t, 0, false).unwrap();
        assert_eq!(ints_of(&b, &r), [0, 0, 1], "{dtype}");
    }
    // u8 compares unsigned, i32 signed.
    let t = it(&b, DType::U8, &[2], &[1, 200]);
    assert_eq!(
        ints_of(&b, &b.reduce(ReduceOp::ArgMax, &t, 0, false).unwrap()),
        [1]
    );
}

#[test]
fn nan_is_the_maximum_and_propagates() {
    let b = backend();
    let t = ft(&b, DType::F32, &[4], &[1.0, f64::NAN, 5.0, f64::NAN]);
    let r = b.reduce(ReduceOp::ArgMax, &t, 0, false).unwrap();
    assert_eq!(ints_of(&b, &r), [1]);
    let r = b.reduce(ReduceOp::Max, &t, 0, false).unwrap();
    assert!(floats_of(&b, &r)[0].is_nan(), "max with NaN");
    let r = b.reduce(ReduceOp::Min, &t, 0, false).unwrap();
    assert!(floats_of(&b, &r)[0].is_nan(), "min with NaN");
    let r = b.reduce(ReduceOp::Sum, &t, 0, false).unwrap();
    assert!(floats_of(&b, &r)[0].is_nan(), "sum with NaN");
}

#[test]
fn integer_mean_truncates_and_sum_wraps() {
    let b = backend();
    let t = it(&b, DType::I32, &[4, 2], &[1, 2, -1, -2, 7, 0, -7, 0]);
    let r = b.reduce(ReduceOp::Mean, &t, 1, false).unwrap();
    assert_eq!(r.dtype(), DType::I32);
    assert_eq!(ints_of(&b, &r), [1, -1, 3, -3]);
    let (lo, hi) = (i64::from(i32::MIN), i64::from(i32::MAX));
    let t = it(&b, DType::I32, &[2], &[hi, 1]);
    assert_eq!(
        ints_of(&b, &b.reduce(ReduceOp::Sum, &t, 0, false).unwrap()),
        [lo]
    );
    let t = it(&b, DType::U8, &[2], &[200, 100]);
    assert_eq!(
        ints_of(&b, &b.reduce(ReduceOp::Sum, &t, 0, false).unwrap()),
        [44]
    );
    // The mean is of the exact sum: 300 / 2 = 150, not 44 / 2.
    assert_eq!(
        ints_of(&b, &b.reduce(ReduceOp::Mean, &t, 0, false).unwrap()),
        [150]
    );
    let t = it(&b, DType::I64, &[3], &[10, 10, 11]);
    assert_eq!(
        ints_of(&b, &b.reduce(ReduceOp::Mean, &t, 0, false).unwrap()),
        [10]
    );
}

#[test]
fn reducing_an_empty_axis() {
    let b = backend();
    for dtype in FLOATS {
        let t = b.zeros(dtype, &[2, 0]).unwrap();
        let s = b.reduce(ReduceOp::Sum, &t, 1, false).unwrap();
        assert_eq!(s.dims(), &[2]);
        assert_eq!(floats_of(&b, &s), [0.0, 0.0], "{dtype} sum");
        let m = b.reduce(ReduceOp::Mean, &t, 1, true).unwrap();
        assert_eq!(m.dims(), &[2, 1]);
        assert!(floats_of(&b, &m).iter().all(|v| v.is_nan()), "{dtype} mean");
        for op in [ReduceOp::Max, ReduceOp::Min, ReduceOp::ArgMax] {
            expect_err(
                &format!("{op:?} {dtype}"),
                b.reduce(op, &t, 1, false),
                Expect::Invalid,
            );
        }
    }
    for dtype in INTS {
        let t = b.zeros(dtype, &[2, 0]).unwrap();
        let s = b.reduce(ReduceOp::Sum, &t, -1, false).unwrap();
        assert_eq!(ints_of(&b, &s), [0, 0], "{dtype} sum");
        for op in [ReduceOp::Max, ReduceOp::Min, ReduceOp::ArgMax] {
            expect_err(
                &format!("{op:?} {dtype}"),
                b.reduce(op, &t, 1, false),
                Expect::Invalid,
            );
        }
    }
    // When the result is empty too there is nothing to refuse: numpy
    // answers an empty array, and so do we (the backend's documented rule).
    let t = b.zeros(DType::F32, &[0, 0]).unwrap();
    for op in [ReduceOp::Max, ReduceOp::Min, ReduceOp::ArgMax] {
        let r = b.reduce(op, &t, 1, false).unwrap();
        assert_eq!(r.dims(), &[0], "{op:?} [0, 0] axis 1");
    }
    // A non-empty axis of an empty tensor is fine.
    let t = b.zeros(DType::F32, &[0, 3]).unwrap();
    let r = b.reduce(ReduceOp::Max, &t, 1, false).unwrap();
    assert_eq!(r.dims(), &[0]);
}

// ----------------------------------------------------------------------------
// Float ops
// ----------------------------------------------------------------------------

#[test]
fn gelu_is_the_erf_form() {
    let b = backend();
    // torch.nn.functional.gelu (approximate='none') values.
    let t = ft(&b, DType::F32, &[5], &[1.0, -2.0, 3.0, 0.5, 0.0]);
    let r = b.unary(UnaryOp::Gelu, &t).unwrap();
    assert_near(
        "gelu",
        &floats_of(&b, &r),
        &[0.841_344_7, -0.045_500_26, 2.995_950_3, 0.345_731_23, 0.0],
        1e-6,
    );
    // The tanh approximation gives 0.841192 at 1: outside the tolerance.
    for dtype in [DType::F16, DType::BF16] {
        let t = ft(&b, dtype, &[1], &[1.0]);
        let r = b.unary(UnaryOp::Gelu, &t).unwrap();
        assert_eq!(r.dtype(), dtype);
        assert_near("gelu", &floats_of(&b, &r), &[0.841_344_7], 5e-3);
    }
}

#[test]
fn unary_special_values() {
    let b = backend();
    let t = ft(&b, DType::F32, &[3], &[0.0, -1.0, f64::INFINITY]);
    assert_floats(
        "log",
        &floats_of(&b, &b.unary(UnaryOp::Log, &t).unwrap()),
        &[f64::NEG_INFINITY, f64::NAN, f64::INFINITY],
    );
    assert_floats(
        "sqrt",
        &floats_of(&b, &b.unary(UnaryOp::Sqrt, &t).unwrap()),
        &[0.0, f64::NAN, f64::INFINITY],
    );
    let t = ft(&b, DType::F32, &[4], &[-100.0, 100.0, -3.0, 0.0]);
    assert_floats(
        "relu",
        &floats_of(&b, &b.unary(UnaryOp::Relu, &t).unwrap()),
        &[0.0, 100.0, 0.0, 0.0],
    );
    assert_near(
        "sigmoid",
        &floats_of(&b, &b.unary(UnaryOp::Sigmoid, &t).unwrap()),
        &[0.0, 1.0, 0.047_425_873, 0.5],
        1e-7,
    );
    assert_near(
        "silu",
        &floats_of(&b, &b.unary(UnaryOp::Silu, &t).unwrap()),
        &[0.0, 100.0, -0.142_277_62, 0.0],
        1e-5,
    );
    assert_near(
        "tanh",
        &floats_of(&b, &b.unary(UnaryOp::Tanh, &t).unwrap()),
        &[-1.0, 1.0, -0.995_054_76, 0.0],
        1e-6,
    );
    assert_floats(
        "abs",
        &floats_of(&b, &b.unary(UnaryOp::Abs, &t).unwrap()),
        &[100.0, 100.0, 3.0, 0.0],
    );
    assert_floats(
        "neg",
        &floats_of(&b, &b.unary(UnaryOp::Neg, &t).unwrap()),
        &[100.0, -100.0, 3.0, 0.0],
    );
}

#[test]
fn softmax_is_stable_with_huge_inputs() {
    let b = backend();
    for dtype in [DType::F32, DType::BF16] {
        let t = ft(&b, dtype, &[2, 3], &[1e30, 1e30, 0.0, -1e30, 0.0, -1e30]);
        let r = b.softmax(&t, 1).unwrap();
        let got = floats_of(&b, &r);
        assert!(got.iter().all(|v| v.is_finite()), "{dtype}: {got:?}");
        assert_near(
            &format!("softmax {dtype}"),
            &got,
            &[0.5, 0.5, 0.0, 0.0, 1.0, 0.0],
            1e-6,
        );
    }
    let t = ft(&b, DType::F16, &[2], &[60000.0, 60000.0]);
    assert_near(
        "softmax f16",
        &floats_of(&b, &b.softmax(&t, 0).unwrap()),
        &[0.5, 0.5],
        1e-3,
    );
    // Along axis 0 of a column.
    let x1 = f64::from((1000.0 + 2f64.ln()) as f32);
    let t = ft(&b, DType::F32, &[2, 1], &[1000.0, x1]);
    let e = (x1 - 1000.0).exp();
    assert_near(
        "softmax axis 0",
        &floats_of(&b, &b.softmax(&t, -2).unwrap()),
        &[1.0 / (1.0 + e), e / (1.0 + e)],
        1e-6,
    );
}

#[test]
fn layer_norm_uses_the_biased_variance() {
    let b = backend();
    // mean 2.5, biased variance 1.25 (unbiased would be 5/3).
    let x = ft(&b, DType::F32, &[1, 4], &[1.0, 2.0, 3.0, 4.0]);
    let r = b.layer_norm(&x, None, None, 0.0).unwrap();
    let s = 1.0 / 1.25f64.sqrt();
    assert_near(
        "layer_norm",
        &floats_of(&b, &r),
        &[-1.5 * s, -0.5 * s, 0.5 * s, 1.5 * s],
        1e-6,
    );
    let gamma = ft(&b, DType::F32, &[4], &[1.0, 2.0, 0.0, -1.0]);
    let beta = ft(&b, DType::F32, &[4], &[0.0, 1.0, 5.0, 0.0]);
    let r = b.layer_norm(&x, Some(&gamma), Some(&beta), 0.0).unwrap();
    assert_near(
        "layer_norm affine",
        &floats_of(&b, &r),
        &[-1.5 * s, -s + 1.0, 5.0, -1.5 * s],
        1e-6,
    );
    // eps is added to the variance: a constant row gives beta.
    let c = ft(&b, DType::F32, &[1, 3], &[7.0, 7.0, 7.0]);
    let beta3 = ft(&b, DType::F32, &[3], &[0.5, -0.5, 2.0]);
    let r = b.layer_norm(&c, None, Some(&beta3), 1e-5).unwrap();
    assert_near(
        "layer_norm const",
        &floats_of(&b, &r),
        &[0.5, -0.5, 2.0],
        1e-6,
    );
}

#[test]
fn rms_norm_values() {
    let b = backend();
    // mean(x²) = (9 + 16) / 2 = 12.5.
    let x = ft(&b, DType::F32, &[2], &[3.0, 4.0]);
    let r = b.rms_norm(&x, None, 0.0).unwrap();
    let s = 1.0 / 12.5f64.sqrt();
    assert_near("rms_norm", &floats_of(&b, &r), &[3.0 * s, 4.0 * s], 1e-6);
    let g = ft(&b, DType::F32, &[2], &[2.0, -1.0]);
    let r = b.rms_norm(&x, Some(&g), 0.5).unwrap();
    let s = 1.0 / 13f64.sqrt();
    assert_near(
        "rms_norm gamma eps",
        &floats_of(&b, &r),
        &[6.0 * s, -4.0 * s],
        1e-6,
    );
}

#[test]
fn causal_attention_masks_later_keys() {
    let b = backend();
    let q = ft(&b, DType::F32, &[3, 2], &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
    let k = ft(&b, DType::F32, &[3, 2], &[1.0, 0.0, 0.0, 1.0, 5.0, 5.0]);
    let v = ft(&b, DType::F32, &[3, 1], &[10.0, 20.0, 30.0]);
    let r = b.attention(&q, &k, &v, true).unwrap();
    assert_eq!(r.dims(), &[3, 1]);
    let got = floats_of(&b, &r);
    // Query 0 sees key 0 only; query 1 sees keys 0 and 1 with scores 0 and
    // 1/√2; query 2 sees all three.
    let w = (1.0 / 2f64.sqrt()).exp();
    let row1 = (10.0 + 20.0 * w) / (1.0 + w);
    let s = [1.0, 1.0, 10.0].map(|x: f64| (x / 2f64.sqrt()).exp());
    let row2 = (10.0 * s[0] + 20.0 * s[1] + 30.0 * s[2]) / (s[0] + s[1] + s[2]);
    assert_near("causal attention", &got, &[10.0, row1, row2], 1e-4);
    // Without the mask query 0 sees key 2 as well.
    let r = b.attention(&q, &k, &v, false).unwrap();
    let s0 = [1.0, 0.0, 5.0].map(|x: f64| (x / 2f64.sqrt()).exp());
    let row0 = (10.0 * s0[0] + 20.0 * s0[1] + 30.0 * s0[2]) / (s0[0] + s0[1] + s0[2]);
    assert_near("attention", &floats_of(&b, &r)[..1], &[row0], 1e-4);
}

#[test]
fn matmul_follows_numpy_for_1d_operands() {
    let b = backend();
    let a = ft(&b, DType::F32, &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let v = ft(&b, DType::F32, &[3], &[1.0, 0.0, -1.0]);
    let r = b.matmul(&a, &v).unwrap();
    assert_eq!(r.dims(), &[2]);
    assert_floats("[2,3]×[3]", &floats_of(&b, &r), &[-2.0, -2.0]);
    let w = ft(&b, DType::F32, &[2], &[1.0, 1.0]);
    let r = b.matmul(&w, &a).unwrap();
    assert_eq!(r.dims(), &[3]);
    assert_floats("[2]×[2,3]", &floats_of(&b, &r), &[5.0, 7.0, 9.0]);
    let r = b.matmul(&v, &v).unwrap();
    assert_eq!(r.dims(), &[] as &[usize]);
    assert_floats("[3]×[3]", &floats_of(&b, &r), &[2.0]);
    // k = 0: a product of empty sums is zeros.
    let e1 = b.zeros(DType::F32, &[2, 0]).unwrap();
    let e2 = b.zeros(DType::F32, &[0, 3]).unwrap();
    let r = b.matmul(&e1, &e2).unwrap();
    assert_eq!(r.dims(), &[2, 3]);
    assert_floats("k = 0", &floats_of(&b, &r), &[0.0; 6]);
    // Batch dims broadcast: [2, 1, 1, 2] × [3, 2, 1] → [2, 3, 1, 1].
    let a = ft(&b, DType::F32, &[2, 1, 1, 2], &[1.0, 2.0, 3.0, 4.0]);
    let m = ft(&b, DType::F32, &[3, 2, 1], &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
    let r = b.matmul(&a, &m).unwrap();
    assert_eq!(r.dims(), &[2, 3, 1, 1]);
    assert_floats(
        "batched",
        &floats_of(&b, &r),
        &[1.0, 2.0, 3.0, 3.0, 4.0, 7.0],
    );
}

#[test]
fn float_ops_keep_the_input_dtype() {
    let b = backend();
    for dtype in FLOATS {
        let x = ft(&b, dtype, &[2, 2], &[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(b.unary(UnaryOp::Exp, &x).unwrap().dtype(), dtype);
        assert_eq!(b.softmax(&x, 0).unwrap().dtype(), dtype);
        assert_eq!(b.matmul(&x, &x).unwrap().dtype(), dtype);
        assert_eq!(b.layer_norm(&x, None, None, 1e-5).unwrap().dtype(), dtype);
        assert_eq!(b.rms_norm(&x, None, 1e-5).unwrap().dtype(), dtype);
        assert_eq!(b.attention(&x, &x, &x, false).unwrap().dtype(), dtype);
        assert_eq!(
            b.reduce(ReduceOp::Mean, &x, 0, false).unwrap().dtype(),
            dtype
        );
    }
}
