//! Reductions, softmax and normalizations.
//!
//! A tensor is viewed as `[outer, len, inner]` around the reduced axis
//! ([`AxisPlan`]); output element `o·inner + i` reduces the `len` elements at
//! `o·len·inner + l·inner + i`. Float sums accumulate in f64 here: this
//! backend is the reference the others are checked against.

use rayon::prelude::*;

use crate::threads::par;

use super::element::{CastVal, Element};
use super::layout::PAR_MIN_ELEMS;
use crate::shape::{AxisPlan, NormPlan};

/// A reduction that keeps the input dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fold {
    Sum,
    Mean,
    Max,
    Min,
}

/// Reduces `a` over the plan's axis. An empty axis gives 0 for integer
/// means and NaN for float means; the backend refuses max and min over an
/// empty axis before calling this.
pub(crate) fn reduce<T: Element>(fold: Fold, a: &[T], p: &AxisPlan) -> Vec<T> {
    lines(a, p, |line| match fold {
        Fold::Sum | Fold::Mean => {
            if T::IS_FLOAT {
                let s: f64 = line.map(|x| f64::from(x.to_f32())).sum();
                let v = if fold == Fold::Mean {
                    s / p.len as f64
                } else {
                    s
                };
                T::from_cast(CastVal::Float(v))
            } else {
                let s = line.fold(0i64, |acc, x| acc.wrapping_add(int_value(x)));
                let v = if fold == Fold::Mean {
                    s.checked_div(p.len as i64).unwrap_or(0)
                } else {
                    s
                };
                T::from_i64_wrapping(v)
            }
        }
        Fold::Max | Fold::Min => {
            let mut best: Option<T> = None;
            for x in line {
                if x.is_nan() {
                    return x;
                }
                best = Some(match best {
                    Some(b) if !((fold == Fold::Max && x > b) || (fold == Fold::Min && x < b)) => b,
                    _ => x,
                });
            }
            best.unwrap_or(T::zeroed())
        }
    })
}

/// First index of the maximum of each line; NaN is the maximum.
pub(crate) fn argmax<T: Element>(a: &[T], p: &AxisPlan) -> Vec<i64> {
    lines(a, p, |line| {
        let mut best: Option<(usize, T)> = None;
        for (i, x) in line.enumerate() {
            if x.is_nan() {
                return i as i64;
            }
            match best {
                Some((_, b)) if x <= b => {}
                _ => best = Some((i, x)),
            }
        }
        best.map_or(0, |(i, _)| i as i64)
    })
}

#[inline]
fn int_value<T: Element>(x: T) -> i64 {
    match x.to_cast() {
        CastVal::Int(i) => i,
        CastVal::Float(f) => f as i64,
    }
}

/// One reduction line: `len` elements `stride` apart.
struct Line<'a, T> {
    data: &'a [T],
    pos: usize,
    stride: usize,
    left: usize,
}

impl<T: Copy> Iterator for Line<'_, T> {
    type Item = T;

    #[inline]
    fn next(&mut self) -> Option<T> {
        if self.left == 0 {
            return None;
        }
        let x = self.data[self.pos];
        self.left -= 1;
        self.pos += self.stride;
        Some(x)
    }
}

/// Applies `f` to every reduction line of `a`, one output per line.
fn lines<T: Element, R: Send>(
    a: &[T],
    p: &AxisPlan,
    f: impl Fn(Line<'_, T>) -> R + Sync,
) -> Vec<R> {
    let count = p.outer * p.inner;
    let one = |idx: usize| {
        let (o, i) = (idx / p.inner, idx % p.inner);
        f(Line {
            data: a,
            pos: o * p.len * p.inner + i,
            stride: p.inner,
            left: p.len,
        })
    };
    if count * p.len >= PAR_MIN_ELEMS {
        par(|| (0..count).into_par_iter().map(one).collect())
    } else {
        (0..count).map(one).collect()
    }
}

/// Softmax of each line, computed in f32 with the maximum subtracted.
pub(crate) fn softmax<T: Element>(a: &[T], p: &AxisPlan) -> Vec<T> {
    let mut out = vec![T::zeroed(); a.len()];
    if a.is_empty() {
        return out;
    }
    let block = p.len * p.inner;
    let run_block = |(o, chunk): (usize, &mut [T])| {
        let src = &a[o * block..(o + 1) * block];
        let mut buf = vec![0f32; p.len];
        for i in 0..p.inner {
            let mut max = f32::NEG_INFINITY;
            for (l, b) in buf.iter_mut().enumerate() {
                *b = src[l * p.inner + i].to_f32();
                max = if b.is_nan() || max.is_nan() {
                    f32::NAN
                } else {
                    max.max(*b)
                };
            }
            // A line of -inf has no finite maximum; subtracting 0 keeps exp
            // well defined (every term is then 0 and the result NaN, as in
            // PyTorch).
            let shift = if max.is_infinite() { 0.0 } else { max };
            let mut sum = 0f32;
            for b in buf.iter_mut() {
                *b = (*b - shift).exp();
                sum += *b;
            }
            for (l, b) in buf.iter().enumerate() {
                chunk[l * p.inner + i] = T::from_f32(b / sum);
            }
        }
    };
    if a.len() >= PAR_MIN_ELEMS && block > 0 {
        par(|| out.par_chunks_mut(block).enumerate().for_each(run_block));
    } else if block > 0 {
        out.chunks_mut(block).enumerate().for_each(run_block);
    }
    out
}

/// Layer norm (`beta` given or not) or RMS norm (`rms`), row by row in f32
/// with two passes over each row.
pub(crate) fn norm<T: Element>(
    x: &[T],
    gamma: Option<&[T]>,
    beta: Option<&[T]>,
    eps: f32,
    rms: bool,
    p: &NormPlan,
) -> Vec<T> {
    let mut out = vec![T::zeroed(); x.len()];
    if p.cols == 0 || x.is_empty() {
        return out;
    }
    let n = p.cols as f32;
    let run_row = |(r, row): (usize, &mut [T])| {
        let src = &x[r * p.cols..(r + 1) * p.cols];
        let (mean, var) = if rms {
            let ms = src.iter().map(|v| {
                let f = v.to_f32();
                f * f
            });
            (0.0, ms.sum::<f32>() / n)
        } else {
            let mean = src.iter().map(|v| v.to_f32()).sum::<f32>() / n;
            let var = src
                .iter()
                .map(|v| {
                    let d = v.to_f32() - mean;
                    d * d
                })
                .sum::<f32>()
                / n;
            (mean, var)
        };
        let inv = 1.0 / (var + eps).sqrt();
        for (c, o) in row.iter_mut().enumerate() {
            let mut y = (src[c].to_f32() - mean) * inv;
            if let Some(g) = gamma {
                y *= g[c].to_f32();
            }
            if let Some(b) = beta {
                y += b[c].to_f32();
            }
            *o = T::from_f32(y);
        }
    };
    if x.len() >= PAR_MIN_ELEMS {
        par(|| out.par_chunks_mut(p.cols).enumerate().for_each(run_row));
    } else {
        out.chunks_mut(p.cols).enumerate().for_each(run_row);
    }
    out
}
