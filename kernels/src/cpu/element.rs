//! Element types of the CPU backend and the scalar semantics of every dtype.
//!
//! These functions are the reference definition of the dtype rules that
//! `docs/KERNELS.md` ("Semantics") states (integer division, wrapping,
//! saturating casts); the CUDA kernels follow them.

use half::{bf16, f16};
use tensor_wasm_shared::DType;

use crate::ops::BinaryOp;
use crate::tensor::CpuStorage;

/// A value in transit through a cast: integers keep their exact value, floats
/// travel as f64 (which holds every f32, f16 and bf16 exactly).
#[derive(Clone, Copy, Debug)]
pub(crate) enum CastVal {
    Int(i64),
    Float(f64),
}

/// One element type of [`CpuStorage`].
pub(crate) trait Element: bytemuck::Pod + Send + Sync + PartialOrd + 'static {
    const DTYPE: DType;
    const IS_FLOAT: bool;

    fn to_f32(self) -> f32;
    /// From f32: rounds to nearest even for narrower floats; for integers
    /// this is a cast (saturating, NaN → 0).
    fn from_f32(v: f32) -> Self;
    fn to_cast(self) -> CastVal;
    /// Integers from integers wrap; integers from floats saturate (NaN → 0);
    /// floats round to nearest even.
    fn from_cast(v: CastVal) -> Self;
    /// `a ∘ b` with this dtype's semantics.
    fn binary(op: BinaryOp, a: Self, b: Self) -> Self;
    /// Wrapping conversion from an i64 accumulator (integers) or a cast
    /// (floats).
    fn from_i64_wrapping(v: i64) -> Self;
    fn is_nan(self) -> bool;

    fn wrap(v: Vec<Self>) -> CpuStorage;
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
}

fn float_binary(op: BinaryOp, a: f32, b: f32) -> f32 {
    match op {
        BinaryOp::Add => a + b,
        BinaryOp::Sub => a - b,
        BinaryOp::Mul => a * b,
        BinaryOp::Div => a / b,
        // numpy's maximum/minimum: NaN propagates.
        BinaryOp::Max => {
            if a.is_nan() || b.is_nan() {
                f32::NAN
            } else {
                a.max(b)
            }
        }
        BinaryOp::Min => {
            if a.is_nan() || b.is_nan() {
                f32::NAN
            } else {
                a.min(b)
            }
        }
        BinaryOp::Pow => a.powf(b),
    }
}

macro_rules! float_element {
    ($t:ty, $dtype:ident, $to:expr, $from:expr, $from64:expr, $fromint:expr) => {
        impl Element for $t {
            const DTYPE: DType = DType::$dtype;
            const IS_FLOAT: bool = true;

            #[inline]
            fn to_f32(self) -> f32 {
                ($to)(self)
            }
            #[inline]
            fn from_f32(v: f32) -> Self {
                ($from)(v)
            }
            #[inline]
            fn to_cast(self) -> CastVal {
                CastVal::Float(f64::from(self.to_f32()))
            }
            #[inline]
            fn from_cast(v: CastVal) -> Self {
                match v {
                    CastVal::Int(i) => ($fromint)(i),
                    CastVal::Float(f) => ($from64)(f),
                }
            }
            #[inline]
            fn binary(op: BinaryOp, a: Self, b: Self) -> Self {
                Self::from_f32(float_binary(op, a.to_f32(), b.to_f32()))
            }
            #[inline]
            fn from_i64_wrapping(v: i64) -> Self {
                ($fromint)(v)
            }
            #[inline]
            fn is_nan(self) -> bool {
                self.to_f32().is_nan()
            }
            fn wrap(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$dtype(v.into())
            }
            fn slice(s: &CpuStorage) -> Option<&[Self]> {
                match s {
                    CpuStorage::$dtype(v) => Some(&v[..]),
                    _ => None,
                }
            }
        }
    };
}

float_element!(
    f32,
    F32,
    |x: f32| x,
    |v: f32| v,
    |v: f64| v as f32,
    |i: i64| i as f32
);
float_element!(
    f16,
    F16,
    |x: f16| x.to_f32(),
    f16::from_f32,
    |v: f64| f16::from_f32(f64_to_f32_odd(v)),
    |i: i64| f16::from_f32(f64_to_f32_odd(i64_to_f64_odd(i)))
);
float_element!(
    bf16,
    BF16,
    |x: bf16| x.to_f32(),
    bf16::from_f32,
    |v: f64| bf16::from_f32(f64_to_f32_odd(v)),
    |i: i64| bf16::from_f32(f64_to_f32_odd(i64_to_f64_odd(i)))
);

// Narrowing to f16/bf16 through a wider format rounds twice, which can miss
// round-to-nearest-even by one unit. Rounding the intermediate step to odd
// (truncate, then set the last bit if anything was dropped) cannot: the
// wider format keeps more than two extra bits, so the final rounding sees
// the true value's side of every tie. (`half`'s own f64 conversions round
// from the top bits only.)

/// `x` as f32, rounded to odd.
pub(crate) fn f64_to_f32_odd(x: f64) -> f32 {
    let r = x as f32;
    if !r.is_finite() || f64::from(r) == x || x.is_nan() {
        return r;
    }
    // `r` is the nearest f32; step toward zero if it overshot |x|, so that
    // `t` is x truncated, then mark the dropped bits in the last place.
    let t = if f64::from(r).abs() > x.abs() {
        f32::from_bits(r.to_bits() - 1)
    } else {
        r
    };
    f32::from_bits(t.to_bits() | 1)
}

/// `i` as f64, rounded to odd.
pub(crate) fn i64_to_f64_odd(i: i64) -> f64 {
    let r = i as f64;
    // Exact below 2^53; above, compare in i128 (every f64 here is an
    // integer within ±2^63).
    if r as i128 == i128::from(i) {
        return r;
    }
    let t = if (r as i128).abs() > i128::from(i).abs() {
        f64::from_bits(r.to_bits() - 1)
    } else {
        r
    };
    f64::from_bits(t.to_bits() | 1)
}

/// Wrapping integer power by squaring, for any non-negative exponent.
fn wrapping_pow_u64<T: Copy>(mut base: T, mut exp: u64, one: T, mul: impl Fn(T, T) -> T) -> T {
    let mut acc = one;
    while exp > 0 {
        if exp & 1 == 1 {
            acc = mul(acc, base);
        }
        base = mul(base, base);
        exp >>= 1;
    }
    acc
}

macro_rules! int_element {
    ($t:ty, $dtype:ident, signed = $signed:expr) => {
        impl Element for $t {
            const DTYPE: DType = DType::$dtype;
            const IS_FLOAT: bool = false;

            #[inline]
            fn to_f32(self) -> f32 {
                self as f32
            }
            #[inline]
            fn from_f32(v: f32) -> Self {
                v as $t
            }
            #[inline]
            fn to_cast(self) -> CastVal {
                CastVal::Int(self as i64)
            }
            #[inline]
            fn from_cast(v: CastVal) -> Self {
                match v {
                    CastVal::Int(i) => i as $t,
                    // `as` from a float saturates and maps NaN to 0.
                    CastVal::Float(f) => f as $t,
                }
            }
            #[inline]
            fn binary(op: BinaryOp, a: Self, b: Self) -> Self {
                match op {
                    BinaryOp::Add => a.wrapping_add(b),
                    BinaryOp::Sub => a.wrapping_sub(b),
                    BinaryOp::Mul => a.wrapping_mul(b),
                    // Truncates toward zero; division by zero gives 0.
                    BinaryOp::Div => {
                        if b == 0 {
                            0
                        } else {
                            a.wrapping_div(b)
                        }
                    }
                    BinaryOp::Max => a.max(b),
                    BinaryOp::Min => a.min(b),
                    BinaryOp::Pow => {
                        #[allow(unused_comparisons)]
                        let negative = $signed && b < 0;
                        if negative {
                            // 1/a^|b| truncated: only ±1 survive.
                            #[allow(unused_comparisons)]
                            let minus_one = $signed && (a as i64) == -1;
                            if a == 1 {
                                1
                            } else if minus_one {
                                if (b as i64) % 2 == 0 { 1 } else { a }
                            } else {
                                0
                            }
                        } else {
                            wrapping_pow_u64(a, b as u64, 1, |x: $t, y: $t| x.wrapping_mul(y))
                        }
                    }
                }
            }
            #[inline]
            fn from_i64_wrapping(v: i64) -> Self {
                v as $t
            }
            #[inline]
            fn is_nan(self) -> bool {
                false
            }
            fn wrap(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$dtype(v.into())
            }
            fn slice(s: &CpuStorage) -> Option<&[Self]> {
                match s {
                    CpuStorage::$dtype(v) => Some(&v[..]),
                    _ => None,
                }
            }
        }
    };
}

int_element!(i32, I32, signed = true);
int_element!(i64, I64, signed = true);
int_element!(u8, U8, signed = false);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_semantics() {
        assert_eq!(i32::binary(BinaryOp::Div, 7, -2), -3);
        assert_eq!(i32::binary(BinaryOp::Div, -7, 2), -3);
        assert_eq!(i32::binary(BinaryOp::Div, 5, 0), 0);
        assert_eq!(i32::binary(BinaryOp::Div, i32::MIN, -1), i32::MIN);
        assert_eq!(u8::binary(BinaryOp::Add, 255, 1), 0);
        assert_eq!(i64::binary(BinaryOp::Pow, 3, 4), 81);
        assert_eq!(i64::binary(BinaryOp::Pow, 2, -1), 0);
        assert_eq!(i64::binary(BinaryOp::Pow, -1, -3), -1);
        assert_eq!(i64::binary(BinaryOp::Pow, -1, -4), 1);
        assert_eq!(i32::binary(BinaryOp::Pow, 1, -7), 1);
        assert_eq!(i32::binary(BinaryOp::Pow, 2, 40), 0);
        assert_eq!(u8::binary(BinaryOp::Pow, 2, 9), 0);
    }

    #[test]
    fn casts_saturate_and_wrap() {
        assert_eq!(i32::from_cast(CastVal::Float(1e10)), i32::MAX);
        assert_eq!(i32::from_cast(CastVal::Float(f64::NAN)), 0);
        assert_eq!(u8::from_cast(CastVal::Float(-1.5)), 0);
        assert_eq!(u8::from_cast(CastVal::Int(300)), 44);
        assert_eq!(i32::from_cast(CastVal::Int(1 << 32)), 0);
        assert!(f16::from_cast(CastVal::Float(1e6)).is_infinite());
        assert!(f32::binary(BinaryOp::Max, 1.0, f32::NAN).is_nan());
    }
}
