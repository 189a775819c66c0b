//! Data movement: strided reads (broadcast, transpose), gather, concat.

use rayon::prelude::*;

use crate::threads::par;

use crate::shape::{ConcatPlan, GatherPlan, strided_offset};

/// Fewest output elements worth splitting across threads; below this,
/// rayon's hand-off costs more than the copy.
pub(crate) const PAR_MIN_ELEMS: usize = 1 << 15;

/// Fills `out` (contiguous, dims `out_dims`) row by row: `f(row, bases)` gets
/// one output row (the last dim) and, for each stride set, the offset of
/// that row's first element. Runs rows in parallel when `out` is large.
pub(crate) fn for_each_row<T: Send, const N: usize>(
    out: &mut [T],
    out_dims: &[usize],
    strides: [&[usize]; N],
    f: impl Fn(&mut [T], [usize; N]) + Sync,
) {
    let last = out_dims.last().copied().unwrap_or(1);
    if out.is_empty() || last == 0 {
        return;
    }
    let bases = |row: usize| strides.map(|s| strided_offset(row * last, out_dims, s));
    if out.len() >= PAR_MIN_ELEMS {
        let min_rows = (PAR_MIN_ELEMS / 4 / last).max(1);
        par(|| {
            out.par_chunks_mut(last)
                .enumerate()
                .with_min_len(min_rows)
                .for_each(|(row, chunk)| f(chunk, bases(row)))
        });
    } else {
        out.chunks_mut(last)
            .enumerate()
            .for_each(|(row, chunk)| f(chunk, bases(row)));
    }
}

/// Reads `src` through `strides` into a contiguous tensor of `out_dims`.
pub(crate) fn strided_copy<T: Copy + Send + Sync + Default>(
    src: &[T],
    out_dims: &[usize],
    strides: &[usize],
    numel: usize,
) -> Vec<T> {
    let mut out = vec![T::default(); numel];
    let inner = strides.last().copied().unwrap_or(0);
    for_each_row(&mut out, out_dims, [strides], |row, [base]| {
        if inner == 1 {
            row.copy_from_slice(&src[base..base + row.len()]);
        } else {
            for (j, o) in row.iter_mut().enumerate() {
                *o = src[base + j * inner];
            }
        }
    });
    out
}

/// `table[indices]` by rows; every index has been checked to be in range.
pub(crate) fn gather_rows<T: Copy + Send + Sync + Default>(
    table: &[T],
    indices: &[usize],
    plan: &GatherPlan,
) -> Vec<T> {
    let row = plan.row_len;
    let mut out = vec![T::default(); plan.count * row];
    if row == 0 {
        return out;
    }
    let copy = |(i, chunk): (usize, &mut [T])| {
        let start = indices[i] * row;
        chunk.copy_from_slice(&table[start..start + row]);
    };
    if out.len() >= PAR_MIN_ELEMS {
        par(|| out.par_chunks_mut(row).enumerate().for_each(copy));
    } else {
        out.chunks_mut(row).enumerate().for_each(copy);
    }
    out
}

/// `a` and `b` joined block by block.
pub(crate) fn concat_blocks<T: Copy>(a: &[T], b: &[T], plan: &ConcatPlan) -> Vec<T> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    if out.capacity() == 0 {
        // Empty blocks: nothing to copy, however many there are.
        return out;
    }
    for o in 0..plan.outer {
        out.extend_from_slice(&a[o * plan.a_block..(o + 1) * plan.a_block]);
        out.extend_from_slice(&b[o * plan.b_block..(o + 1) * plan.b_block]);
    }
    out
}
