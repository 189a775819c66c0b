//! Elementwise ops: binary with broadcasting, unary, cast.

use rayon::prelude::*;

use crate::threads::par;

use super::element::Element;
use super::layout::{PAR_MIN_ELEMS, for_each_row};
use crate::ops::{BinaryOp, UnaryOp};
use crate::shape::BinaryPlan;

/// `a ∘ b` over a broadcast plan.
pub(crate) fn binary<T: Element>(op: BinaryOp, a: &[T], b: &[T], plan: &BinaryPlan) -> Vec<T> {
    if plan.is_same_shape() {
        return zip_map(a, b, |x, y| T::binary(op, x, y));
    }
    let mut out = vec![T::zeroed(); plan.numel];
    let sa = plan.a_strides.last().copied().unwrap_or(0);
    let sb = plan.b_strides.last().copied().unwrap_or(0);
    for_each_row(
        &mut out,
        &plan.out_dims,
        [&plan.a_strides, &plan.b_strides],
        |row, [ba, bb]| {
            for (j, o) in row.iter_mut().enumerate() {
                *o = T::binary(op, a[ba + j * sa], b[bb + j * sb]);
            }
        },
    );
    out
}

/// `a ∘ value`.
pub(crate) fn scalar<T: Element>(op: BinaryOp, a: &[T], value: T) -> Vec<T> {
    map(a, |x| T::binary(op, x, value))
}

/// An elementwise float op, computed in f32.
pub(crate) fn unary<T: Element>(op: UnaryOp, a: &[T]) -> Vec<T> {
    map(a, |x| T::from_f32(op.apply_f32(x.to_f32())))
}

/// Converts every element from `S` to `D`.
pub(crate) fn cast<S: Element, D: Element>(a: &[S]) -> Vec<D> {
    map(a, |x| D::from_cast(x.to_cast()))
}

/// `f` over every element, in parallel when large.
pub(crate) fn map<S: Element, D: Element>(a: &[S], f: impl Fn(S) -> D + Sync) -> Vec<D> {
    if a.len() >= PAR_MIN_ELEMS {
        par(|| {
            a.par_iter()
                .with_min_len(PAR_MIN_ELEMS / 4)
                .map(|&x| f(x))
                .collect()
        })
    } else {
        a.iter().map(|&x| f(x)).collect()
    }
}

fn zip_map<T: Element>(a: &[T], b: &[T], f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    if a.len() >= PAR_MIN_ELEMS {
        par(|| {
            a.par_iter()
                .zip(b.par_iter())
                .with_min_len(PAR_MIN_ELEMS / 4)
                .map(|(&x, &y)| f(x, y))
                .collect()
        })
    } else {
        a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect()
    }
}
