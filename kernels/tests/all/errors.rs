//! Every error path: the right [`KernelError`] variant and ABI code. Then
//! hostile inputs (random dims, axes, permutations, dtypes) through every
//! op: never a panic, and an `Ok` always has the shape the op plans.
//!
//! [`KernelError`]: tensor_wasm_kernels::KernelError

use proptest::prelude::*;
use tensor_wasm_kernels::{Backend, BinaryOp, DType, Limits, ReduceOp, Tensor, UnaryOp};

use crate::reference::{broadcast, reshape_dims};
use crate::util::{Expect, INTS, backend, backend_with, expect_err, ft, it, numel, untouched};

fn zeros(b: &dyn Backend, dtype: DType, dims: &[usize]) -> Tensor {
    b.zeros(dtype, dims).unwrap()
}

fn f32s(b: &dyn Backend, dims: &[usize]) -> Tensor {
    zeros(b, DType::F32, dims)
}

// ----------------------------------------------------------------------------
// Shape mismatch (-2)
// ----------------------------------------------------------------------------

#[test]
fn shape_mismatches() {
    let b = backend();
    let (x23, x32) = (f32s(&b, &[2, 3]), f32s(&b, &[3, 2]));
    for op in BinaryOp::ALL {
        expect_err(
            &format!("binary {op:?} [2,3] [3,2]"),
            b.binary(op, &x23, &x32),
            Expect::Shape,
        );
    }
    expect_err(
        "binary [2,3] [2]",
        b.binary(BinaryOp::Add, &x23, &f32s(&b, &[2])),
        Expect::Shape,
    );
    expect_err(
        "binary [0] [2]",
        b.binary(BinaryOp::Add, &f32s(&b, &[0]), &f32s(&b, &[2])),
        Expect::Shape,
    );
    // Matmul: inner dims, 1-D operands, batch dims.
    expect_err("matmul [2,3]×[2,3]", b.matmul(&x23, &x23), Expect::Shape);
    expect_err(
        "matmul [3]×[4]",
        b.matmul(&f32s(&b, &[3]), &f32s(&b, &[4])),
        Expect::Shape,
    );
    expect_err(
        "matmul [2,3]×[2]",
        b.matmul(&x23, &f32s(&b, &[2])),
        Expect::Shape,
    );
    expect_err(
        "matmul [4]×[3,2]",
        b.matmul(&f32s(&b, &[4]), &x32),
        Expect::Shape,
    );
    expect_err(
        "matmul batch [2,2,3]×[3,3,2]",
        b.matmul(&f32s(&b, &[2, 2, 3]), &f32s(&b, &[3, 3, 2])),
        Expect::Shape,
    );
    // Concat: other dims and ranks must match.
    expect_err(
        "concat [2,3] [3,2] axis 0",
        b.concat(&x23, &x32, 0),
        Expect::Shape,
    );
    expect_err(
        "concat [2,3] [3,3] axis 1",
        b.concat(&x23, &f32s(&b, &[3, 3]), 1),
        Expect::Shape,
    );
    expect_err(
        "concat [2,3] [3] axis 0",
        b.concat(&x23, &f32s(&b, &[3]), 0),
        Expect::Shape,
    );
    // Norm parameters must be 1-D of the last dim's length.
    let (g2, g3, g13) = (f32s(&b, &[2]), f32s(&b, &[3]), f32s(&b, &[1, 3]));
    expect_err(
        "layer_norm gamma [2]",
        b.layer_norm(&x23, Some(&g2), None, 1e-5),
        Expect::Shape,
    );
    expect_err(
        "layer_norm beta [2]",
        b.layer_norm(&x23, Some(&g3), Some(&g2), 1e-5),
        Expect::Shape,
    );
    expect_err(
        "layer_norm gamma [1,3]",
        b.layer_norm(&x23, Some(&g13), None, 1e-5),
        Expect::Shape,
    );
    expect_err(
        "rms_norm gamma [2]",
        b.rms_norm(&x23, Some(&g2), 1e-5),
        Expect::Shape,
    );
    expect_err(
        "rms_norm gamma [1,3]",
        b.rms_norm(&x23, Some(&g13), 1e-5),
        Expect::Shape,
    );
    // Attention: d of q and k, seq of k and v, batch dims, rank.
    let q = f32s(&b, &[2, 4]);
    expect_err(
        "attention d",
        b.attention(&q, &f32s(&b, &[3, 5]), &f32s(&b, &[3, 4]), false),
        Expect::Shape,
    );
    expect_err(
        "attention seq",
        b.attention(&q, &f32s(&b, &[3, 4]), &f32s(&b, &[2, 4]), false),
        Expect::Shape,
    );
    expect_err(
        "attention batch",
        b.attention(
            &f32s(&b, &[2, 2, 4]),
            &f32s(&b, &[3, 3, 4]),
            &f32s(&b, &[3, 3, 4]),
            false,
        ),
        Expect::Shape,
    );
    expect_err(
        "attention 1-D",
        b.attention(&f32s(&b, &[4]), &q, &q, false),
        Expect::Shape,
    );
}

// ----------------------------------------------------------------------------
// Dtype unsupported or mismatched (-3)
// ----------------------------------------------------------------------------

#[test]
fn float_only_ops_refuse_integers() {
    let b = backend();
    for dtype in INTS {
        let x = zeros(&b, dtype, &[2, 2]);
        let v = zeros(&b, dtype, &[2]);
        for op in UnaryOp::ALL {
            expect_err(
                &format!("unary {op:?} {dtype}"),
                b.unary(op, &x),
                Expect::DTypeUnsupported,
            );
        }
        expect_err(
            &format!("matmul {dtype}"),
            b.matmul(&x, &x),
            Expect::DTypeUnsupported,
        );
        expect_err(
            &format!("softmax {dtype}"),
            b.softmax(&x, 0),
            Expect::DTypeUnsupported,
        );
        expect_err(
            &format!("layer_norm {dtype}"),
            b.layer_norm(&x, None, None, 1e-5),
            Expect::DTypeUnsupported,
        );
        expect_err(
            &format!("layer_norm γβ {dtype}"),
            b.layer_norm(&x, Some(&v), Some(&v), 1e-5),
            Expect::DTypeUnsupported,
        );
        expect_err(
            &format!("rms_norm {dtype}"),
            b.rms_norm(&x, None, 1e-5),
            Expect::DTypeUnsupported,
        );
        expect_err(
            &format!("attention {dtype}"),
            b.attention(&x, &x, &x, true),
            Expect::DTypeUnsupported,
        );
    }
}

#[test]
fn gather_indices_must_be_i32_or_i64() {
    let b = backend();
    let table = f32s(&b, &[4, 2]);
    for dtype in [DType::F32, DType::F16, DType::BF16, DType::U8] {
        let idx = zeros(&b, dtype, &[3]);
        expect_err(
            &format!("gather by {dtype}"),
            b.gather(&table, &idx),
            Expect::DTypeUnsupported,
        );
    }
}

#[test]
fn mismatched_dtypes() {
    let b = backend();
    for (p, q) in [
        (DType::F32, DType::F16),
        (DType::I32, DType::I64),
        (DType::U8, DType::I32),
        (DType::BF16, DType::F16),
    ] {
        let (x, y) = (zeros(&b, p, &[2, 2]), zeros(&b, q, &[2, 2]));
        for op in BinaryOp::ALL {
            expect_err(
                &format!("binary {op:?} {p} {q}"),
                b.binary(op, &x, &y),
                Expect::DTypeMismatch,
            );
        }
        expect_err(
            &format!("concat {p} {q}"),
            b.concat(&x, &y, 0),
            Expect::DTypeMismatch,
        );
    }
    let (x, y) = (f32s(&b, &[2, 2]), zeros(&b, DType::BF16, &[2, 2]));
    expect_err("matmul f32 bf16", b.matmul(&x, &y), Expect::DTypeMismatch);
    expect_err(
        "attention f32 bf16 f32",
        b.attention(&x, &y, &x, false),
        Expect::DTypeMismatch,
    );
    expect_err(
        "attention f32 f32 bf16",
        b.attention(&x, &x, &y, false),
        Expect::DTypeMismatch,
    );
    let g = zeros(&b, DType::F16, &[2]);
    let g32 = f32s(&b, &[2]);
    expect_err(
        "layer_norm gamma f16",
        b.layer_norm(&x, Some(&g), None, 1e-5),
        Expect::DTypeMismatch,
    );
    expect_err(
        "layer_norm beta f16",
        b.layer_norm(&x, Some(&g32), Some(&g), 1e-5),
        Expect::DTypeMismatch,
    );
    expect_err(
        "rms_norm gamma f16",
        b.rms_norm(&x, Some(&g), 1e-5),
        Expect::DTypeMismatch,
    );
}

// ----------------------------------------------------------------------------
// Invalid argument (-7)
// ----------------------------------------------------------------------------

#[test]
fn bad_axes() {
    let b = backend();
    let x = f32s(&b, &[2, 3]);
    for axis in [2, -3, i64::MAX, i64::MIN] {
        for op in ReduceOp::ALL {
            expect_err(
                &format!("reduce {op:?} axis {axis}"),
                b.reduce(op, &x, axis, false),
                Expect::Invalid,
            );
        }
        expect_err(
            &format!("softmax axis {axis}"),
            b.softmax(&x, axis),
            Expect::Invalid,
        );
        expect_err(
            &format!("concat axis {axis}"),
            b.concat(&x, &x, axis),
            Expect::Invalid,
        );
    }
    // A 0-dim tensor has no axis at all.
    let s = f32s(&b, &[]);
    expect_err(
        "reduce 0-dim",
        b.reduce(ReduceOp::Sum, &s, 0, false),
        Expect::Invalid,
    );
    expect_err("softmax 0-dim", b.softmax(&s, 0), Expect::Invalid);
    expect_err("concat 0-dim", b.concat(&s, &s, 0), Expect::Invalid);
}

#[test]
fn bad_permutations() {
    let b = backend();
    let x = f32s(&b, &[2, 3, 4]);
    for perm in [
        &[0, 0, 1][..],
        &[0, 1, 3],
        &[0, 1],
        &[0, 1, 2, 3],
        &[usize::MAX, 0, 1],
        &[],
    ] {
        expect_err(
            &format!("transpose {perm:?}"),
            b.transpose(&x, perm),
            Expect::Invalid,
        );
    }
}

#[test]
fn gather_index_out_of_range() {
    let b = backend();
    let table = ft(&b, DType::F32, &[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    for dtype in [DType::I32, DType::I64] {
        for bad in [-1, 3, 100, i64::from(i32::MIN)] {
            let idx = it(&b, dtype, &[3], &[0, bad, 2]);
            expect_err(
                &format!("gather {dtype} index {bad}"),
                b.gather(&table, &idx),
                Expect::Invalid,
            );
        }
    }
    let idx = it(&b, DType::I64, &[1], &[i64::MAX]);
    expect_err("gather i64::MAX", b.gather(&table, &idx), Expect::Invalid);
    // Any index into an empty table is out of range; no index is fine.
    let empty = f32s(&b, &[0, 2]);
    expect_err(
        "gather from empty",
        b.gather(&empty, &it(&b, DType::I32, &[1], &[0])),
        Expect::Invalid,
    );
    let r = b.gather(&empty, &it(&b, DType::I32, &[0], &[])).unwrap();
    assert_eq!(r.dims(), &[0, 2]);
    // A 0-dim table has no rows.
    expect_err(
        "gather from 0-dim",
        b.gather(&f32s(&b, &[]), &it(&b, DType::I32, &[1], &[0])),
        Expect::Invalid,
    );
}

#[test]
fn bad_reshapes() {
    let b = backend();
    let x = f32s(&b, &[3, 4]);
    expect_err(
        "reshape [-1, -1]",
        b.reshape(&x, &[-1, -1]),
        Expect::Invalid,
    );
    expect_err(
        "reshape [-2, -6]",
        b.reshape(&x, &[-2, -6]),
        Expect::Invalid,
    );
    // A target that cannot hold the elements is a shape mismatch (-2);
    // a malformed target (two -1, negative dims, rank) is invalid (-7).
    expect_err("reshape [5, 2]", b.reshape(&x, &[5, 2]), Expect::Shape);
    expect_err("reshape [5, -1]", b.reshape(&x, &[5, -1]), Expect::Shape);
    expect_err("reshape [0, -1]", b.reshape(&x, &[0, -1]), Expect::Shape);
    expect_err("reshape []", b.reshape(&x, &[]), Expect::Shape);
    // Rank over the cap (8), even with the right element count.
    expect_err(
        "reshape rank 9",
        b.reshape(&x, &[3, 4, 1, 1, 1, 1, 1, 1, 1]),
        Expect::Invalid,
    );
}

#[test]
fn rank_over_the_cap() {
    let b = backend();
    for dtype in DType::ALL {
        expect_err(
            &format!("zeros rank 9 {dtype}"),
            b.zeros(dtype, &[1; 9]),
            Expect::Invalid,
        );
        expect_err(
            &format!("from_bytes rank 9 {dtype}"),
            b.from_bytes(dtype, &[1; 9], &vec![0; dtype.size()]),
            Expect::Invalid,
        );
    }
    // Rank 8 is fine; broadcasting two rank-8 tensors too.
    let x = f32s(&b, &[1; 8]);
    assert_eq!(b.binary(BinaryOp::Add, &x, &x).unwrap().dims(), &[1; 8]);
    let b4 = backend_with(Limits {
        max_rank: 4,
        ..Limits::default()
    });
    let x = f32s(&b4, &[2, 1, 1, 1]);
    expect_err(
        "cap 4: reshape to rank 5",
        b4.reshape(&x, &[2, 1, 1, 1, 1]),
        Expect::Invalid,
    );
}

#[test]
fn from_bytes_needs_exactly_the_tensor_size() {
    let b = backend();
    for dtype in DType::ALL {
        let size = 6 * dtype.size();
        for len in [0, size - 1, size + 1, 2 * size] {
            expect_err(
                &format!("from_bytes {dtype} [2,3] with {len} bytes"),
                b.from_bytes(dtype, &[2, 3], &vec![0; len]),
                Expect::Invalid,
            );
        }
        let t = b.from_bytes(dtype, &[2, 3], &vec![7; size]).unwrap();
        assert_eq!(b.to_bytes(&t).unwrap(), vec![7; size], "{dtype} round trip");
        expect_err(
            &format!("from_bytes {dtype} [0] with 1 byte"),
            b.from_bytes(dtype, &[0], &[0]),
            Expect::Invalid,
        );
        let t = b.from_bytes(dtype, &[0, 5], &[]).unwrap();
        assert_eq!(t.dims(), &[0, 5]);
    }
}

// ----------------------------------------------------------------------------
// Quota (-5)
// ----------------------------------------------------------------------------

#[test]
fn overflowing_dims_are_refused_without_allocating() {
    let b = backend();
    for dtype in DType::ALL {
        for dims in [
            &[usize::MAX, 2][..],
            &[1 << 32, 1 << 32],
            &[1 << 40, 1 << 40, 1 << 40],
        ] {
            expect_err(
                &format!("zeros {dtype} {dims:?}"),
                b.zeros(dtype, dims),
                Expect::TooLarge,
            );
            expect_err(
                &format!("from_bytes {dtype} {dims:?}"),
                b.from_bytes(dtype, dims, &[]),
                Expect::TooLarge,
            );
        }
        // Past the 4 GiB default cap without overflowing.
        expect_err(
            &format!("zeros {dtype} 2^33"),
            b.zeros(dtype, &[1 << 33]),
            Expect::TooLarge,
        );
    }
    let x = f32s(&b, &[2, 3]);
    expect_err(
        "reshape overflow",
        b.reshape(&x, &[i64::MAX, i64::MAX, 0]),
        Expect::TooLarge,
    );
    // A concat whose dim overflows.
    let (p, q) = (f32s(&b, &[0, usize::MAX]), f32s(&b, &[0, 1]));
    expect_err("concat overflow", b.concat(&p, &q, 1), Expect::TooLarge);
}

#[test]
fn tensors_over_max_tensor_bytes() {
    let b = backend_with(Limits {
        max_tensor_bytes: 1024,
        ..Limits::default()
    });
    // 256 f32 fit exactly, 257 do not; 1024 u8 fit.
    assert_eq!(f32s(&b, &[256]).dims(), &[256]);
    expect_err(
        "zeros 257 f32",
        b.zeros(DType::F32, &[257]),
        Expect::TooLarge,
    );
    expect_err(
        "from_bytes 257 f32",
        b.from_bytes(DType::F32, &[257], &[0; 1028]),
        Expect::TooLarge,
    );
    expect_err(
        "zeros 129 i64",
        b.zeros(DType::I64, &[129]),
        Expect::TooLarge,
    );
    let u = zeros(&b, DType::U8, &[1024]);
    // Results over the cap: broadcasting, casting, concat, gather, matmul,
    // attention output, reshape is free (same bytes).
    let col = zeros(&b, DType::U8, &[64, 1]);
    let row = zeros(&b, DType::U8, &[1, 64]);
    expect_err(
        "binary broadcast 64×64 u8",
        b.binary(BinaryOp::Add, &col, &row),
        Expect::TooLarge,
    );
    expect_err(
        "cast 1024 u8 → f32",
        b.cast(&u, DType::F32),
        Expect::TooLarge,
    );
    expect_err(
        "concat 1024 + 1024 u8",
        b.concat(&u, &u, 0),
        Expect::TooLarge,
    );
    let table = zeros(&b, DType::U8, &[2, 256]);
    let idx = zeros(&b, DType::I32, &[8]);
    expect_err(
        "gather 8 rows of 256 u8",
        b.gather(&table, &idx),
        Expect::TooLarge,
    );
    let (a, c) = (f32s(&b, &[32, 1]), f32s(&b, &[1, 32]));
    expect_err("matmul 32×32 f32", b.matmul(&a, &c), Expect::TooLarge);
    let (q, k) = (f32s(&b, &[32, 1]), f32s(&b, &[4, 1]));
    let v = f32s(&b, &[4, 16]);
    expect_err(
        "attention output 32×16 f32",
        b.attention(&q, &k, &v, false),
        Expect::TooLarge,
    );
    assert_eq!(b.reshape(&u, &[32, -1]).unwrap().dims(), &[32, 32]);
}

#[test]
fn reducing_an_empty_axis_into_an_output_over_the_cap_is_refused() {
    // [1024, 0] holds no element, but summing over axis 1 makes 1024 zeros
    // (4 KiB of f32): over a 1 KiB cap, so refused before allocating. (With
    // the default cap, [2^40, 0] would otherwise allocate 4 TiB.)
    let b = backend_with(Limits {
        max_tensor_bytes: 1024,
        ..Limits::default()
    });
    let x = f32s(&b, &[1024, 0]);
    for op in [ReduceOp::Sum, ReduceOp::Mean] {
        for keepdim in [false, true] {
            expect_err(
                &format!("reduce {op:?} [1024, 0] axis 1 keepdim {keepdim}"),
                b.reduce(op, &x, 1, keepdim),
                Expect::TooLarge,
            );
        }
    }
    // With the default limits: an output whose size overflows.
    let b = backend();
    for dims in [&[usize::MAX, 0][..], &[0, usize::MAX]] {
        let x = f32s(&b, dims);
        let axis = if dims[0] == 0 { 0 } else { 1 };
        expect_err(
            &format!("reduce Sum {dims:?} axis {axis}"),
            b.reduce(ReduceOp::Sum, &x, axis, false),
            Expect::TooLarge,
        );
    }
}

#[test]
fn ops_over_max_op_work() {
    let b = backend_with(Limits {
        max_op_work: 1000,
        ..Limits::default()
    });
    let x = f32s(&b, &[64, 64]);
    let v = f32s(&b, &[64]);
    let i = zeros(&b, DType::I32, &[64, 64]);
    expect_err("matmul 64³", b.matmul(&x, &x), Expect::WorkCap);
    expect_err(
        "binary 4096",
        b.binary(BinaryOp::Add, &x, &x),
        Expect::WorkCap,
    );
    expect_err(
        "binary broadcast 4096",
        b.binary(BinaryOp::Mul, &x, &v),
        Expect::WorkCap,
    );
    expect_err(
        "scalar 4096",
        b.scalar(BinaryOp::Mul, &x, 2.0),
        Expect::WorkCap,
    );
    expect_err("unary 4096", b.unary(UnaryOp::Exp, &x), Expect::WorkCap);
    expect_err(
        "reduce 4096",
        b.reduce(ReduceOp::Sum, &x, 0, false),
        Expect::WorkCap,
    );
    expect_err("softmax 4096", b.softmax(&x, 1), Expect::WorkCap);
    expect_err(
        "layer_norm 4096",
        b.layer_norm(&x, None, None, 1e-5),
        Expect::WorkCap,
    );
    expect_err("rms_norm 4096", b.rms_norm(&x, None, 1e-5), Expect::WorkCap);
    expect_err("transpose 4096", b.transpose(&x, &[1, 0]), Expect::WorkCap);
    expect_err("cast 4096", b.cast(&i, DType::F32), Expect::WorkCap);
    expect_err("concat 8192", b.concat(&x, &x, 0), Expect::WorkCap);
    expect_err(
        "gather 4096",
        b.gather(&x, &zeros(&b, DType::I64, &[64])),
        Expect::WorkCap,
    );
    expect_err(
        "attention 64×64×64",
        b.attention(&x, &x, &x, true),
        Expect::WorkCap,
    );
    // A huge batch of empty matrices is still work.
    let e = f32s(&b, &[4096, 0, 0]);
    expect_err(
        "matmul 4096 empty batches",
        b.matmul(&e, &e),
        Expect::WorkCap,
    );
    // Small ops pass under the same cap.
    let s = f32s(&b, &[4, 4]);
    assert_eq!(b.matmul(&s, &s).unwrap().dims(), &[4, 4]);
    assert_eq!(b.unary(UnaryOp::Exp, &s).unwrap().dims(), &[4, 4]);
}

#[test]
fn batches_of_empty_matrices_just_under_the_work_cap_cost_nothing() {
    // 4 294 967 295 × 1024 batch entries, one short of the default work
    // cap (2^42): the output is empty, so the op must answer at once and
    // allocate nothing per entry.
    let b = backend();
    let batch = [u32::MAX as usize, 1024];
    let a = f32s(&b, &[batch[0], batch[1], 0, 1]);
    let c = f32s(&b, &[batch[0], batch[1], 1, 0]);
    let out = b.matmul(&a, &c).unwrap();
    assert_eq!(out.dims(), &[batch[0], batch[1], 0, 0]);
    // k = 0 the other way round: an output of 2^42 zeros, refused.
    expect_err("matmul k = 0", b.matmul(&c, &a), Expect::TooLarge);
    let q = f32s(&b, &[batch[0], batch[1], 0, 0]);
    let out = b.attention(&q, &q, &q, true).unwrap();
    assert_eq!(out.dims(), &[batch[0], batch[1], 0, 0]);
}

// ----------------------------------------------------------------------------
// Operands are never modified
// ----------------------------------------------------------------------------

#[test]
fn no_op_modifies_its_operands() {
    let b = backend();
    let x = ft(&b, DType::F32, &[2, 3], &[1.0, -2.0, 3.0, -4.0, 5.0, 0.5]);
    let y = ft(&b, DType::F32, &[3, 2], &[0.5, 1.0, 2.0, -1.0, 0.0, 3.0]);
    let g = ft(&b, DType::F32, &[3], &[2.0, 0.5, -1.0]);
    let idx = it(&b, DType::I64, &[2], &[1, 0]);
    let n = it(&b, DType::I32, &[2, 3], &[1, 2, 3, 4, 5, 6]);
    untouched(&b, &[&x, &y], || b.matmul(&x, &y).unwrap());
    untouched(&b, &[&x], || b.binary(BinaryOp::Pow, &x, &x).unwrap());
    untouched(&b, &[&n], || b.binary(BinaryOp::Div, &n, &n).unwrap());
    untouched(&b, &[&x], || b.scalar(BinaryOp::Sub, &x, 1.0).unwrap());
    for op in UnaryOp::ALL {
        untouched(&b, &[&x], || b.unary(op, &x).unwrap());
    }
    for op in ReduceOp::ALL {
        untouched(&b, &[&x], || b.reduce(op, &x, 1, false).unwrap());
    }
    untouched(&b, &[&x], || b.softmax(&x, 1).unwrap());
    untouched(&b, &[&x, &g], || {
        b.layer_norm(&x, Some(&g), Some(&g), 1e-5).unwrap()
    });
    untouched(&b, &[&x, &g], || b.rms_norm(&x, Some(&g), 1e-5).unwrap());
    untouched(&b, &[&x], || b.reshape(&x, &[3, 2]).unwrap());
    untouched(&b, &[&x], || b.transpose(&x, &[1, 0]).unwrap());
    untouched(&b, &[&x], || b.cast(&x, DType::BF16).unwrap());
    untouched(&b, &[&x, &idx], || b.gather(&x, &idx).unwrap());
    untouched(&b, &[&x], || b.concat(&x, &x, 0).unwrap());
    untouched(&b, &[&n], || b.concat(&n, &n, -1).unwrap());
    untouched(&b, &[&x, &y], || b.attention(&x, &x, &x, true).unwrap());
    untouched(&b, &[&y], || b.attention(&y, &y, &y, false).unwrap());
    // A reshape shares storage: the result and the original still read the
    // same elements after further ops on either.
    let r = b.reshape(&x, &[6]).unwrap();
    let _ = b.scalar(BinaryOp::Mul, &r, 0.0).unwrap();
    assert_eq!(b.to_bytes(&r).unwrap(), b.to_bytes(&x).unwrap());
}

// ----------------------------------------------------------------------------
// Hostile inputs never panic
// ----------------------------------------------------------------------------

/// Dims a hostile guest might send: small, zero, and huge. Huge dims are
/// ≥ 2^63, so that a count that escapes the checks fails as a
/// capacity-overflow panic (a test failure) rather than as a failed
/// allocation that aborts the whole test process; allocations by unchecked
/// counts below that are tested with small limits instead.
fn hostile_dim() -> impl Strategy<Value = usize> {
    prop_oneof![
        6 => 0usize..=3,
        1 => Just(usize::MAX),
        1 => Just(1usize << 63),
        1 => (1usize << 63)..=usize::MAX,
    ]
}

fn hostile_dims() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(hostile_dim(), 0..=10)
}

fn hostile_axis() -> impl Strategy<Value = i64> {
    prop_oneof![4 => -6i64..6, 1 => any::<i64>(), 1 => Just(i64::MIN), 1 => Just(i64::MAX)]
}

/// Runs `op`; a panic becomes `Err` with the panic's message.
fn catch<R>(op: impl FnOnce() -> R) -> Result<R, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(op)).map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    })
}

/// Runs an op and reads its result's size (which must not panic either).
fn run_op(
    op: impl FnOnce() -> tensor_wasm_kernels::Result<Tensor>,
) -> Result<tensor_wasm_kernels::Result<Tensor>, String> {
    catch(|| {
        let r = op();
        if let Ok(t) = &r {
            let _ = (t.numel(), t.nbytes());
        }
        r
    })
}

/// A tensor of `dims`, if the backend will make one; a refusal must be a
/// quota or an invalid argument.
fn try_zeros(b: &dyn Backend, dtype: DType, dims: &[usize]) -> Option<Tensor> {
    let made = run_op(|| b.zeros(dtype, dims))
        .unwrap_or_else(|msg| panic!("zeros {dtype} {dims:?}: panicked: {msg}"));
    match made {
        Ok(t) => {
            assert_eq!(t.dims(), dims);
            assert_eq!(t.dtype(), dtype);
            assert_eq!(t.numel(), numel(dims));
            Some(t)
        }
        Err(e) => {
            assert!(
                matches!(e.abi().code(), -5 | -7),
                "zeros {dtype} {dims:?}: unexpected {e:?}"
            );
            None
        }
    }
}

/// The dims `matmul` must produce, if the shapes fit.
fn matmul_dims(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    if a.is_empty() || b.is_empty() {
        return None;
    }
    let a2 = if a.len() == 1 {
        vec![1, a[0]]
    } else {
        a.to_vec()
    };
    let b2 = if b.len() == 1 {
        vec![b[0], 1]
    } else {
        b.to_vec()
    };
    let (m, k) = (a2[a2.len() - 2], a2[a2.len() - 1]);
    let (kb, n) = (b2[b2.len() - 2], b2[b2.len() - 1]);
    if k != kb {
        return None;
    }
    let mut out = broadcast(&a2[..a2.len() - 2], &b2[..b2.len() - 2])?;
    if a.len() > 1 {
        out.push(m);
    }
    if b.len() > 1 {
        out.push(n);
    }
    Some(out)
}

fn axis_of(axis: i64, rank: usize) -> Option<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis.checked_add(r)? } else { axis };
    (0..r).contains(&a).then_some(a as usize)
}

/// Checks an op's outcome: no panic happened (we got here), a result has
/// the dims the op must plan (`None` when the op must refuse), and an error
/// is one of the ABI's codes for a refused call.
fn check(
    what: &str,
    op: impl FnOnce() -> tensor_wasm_kernels::Result<Tensor>,
    want: Option<Vec<usize>>,
) {
    let got = run_op(op).unwrap_or_else(|msg| panic!("{what}: panicked: {msg}"));
    match got {
        Ok(t) => {
            let want = want.unwrap_or_else(|| panic!("{what}: accepted an invalid call: {t:?}"));
            assert_eq!(t.dims(), &want[..], "{what}: result dims");
        }
        Err(e) => assert!(
            matches!(e.abi().code(), -2 | -3 | -5 | -7),
            "{what}: unexpected error {e:?}"
        ),
    }
}

proptest! {
    #![proptest_config(crate::ops::config(256))]

    #[test]
    fn hostile_inputs_never_panic(
        da in hostile_dims(),
        db in hostile_dims(),
        ta in prop::sample::select(DType::ALL.to_vec()),
        tb in prop::sample::select(DType::ALL.to_vec()),
        axis in hostile_axis(),
        keepdim in any::<bool>(),
        perm in prop::collection::vec(prop_oneof![4 => 0usize..10, 1 => any::<usize>()], 0..=10),
        target in prop::collection::vec(prop_oneof![4 => -2i64..5, 1 => any::<i64>(), 1 => Just(1i64 << 40)], 0..=10),
        value in any::<f32>(),
        eps in any::<f32>(),
    ) {
        let b = backend();
        let b = &b as &dyn Backend;
        let (Some(x), Some(y)) = (try_zeros(b, ta, &da), try_zeros(b, tb, &db)) else {
            return Ok(());
        };
        let float = |t: DType| t.is_float();
        let same = ta == tb;
        let w = format!("{ta} {da:?}, {tb} {db:?}");

        for op in BinaryOp::ALL {
            check(&format!("binary {op:?} {w}"), || b.binary(op, &x, &y), broadcast(&da, &db).filter(|_| same));
            check(&format!("scalar {op:?} {w}"), || b.scalar(op, &x, value), Some(da.clone()));
        }
        for op in UnaryOp::ALL {
            check(&format!("unary {op:?} {w}"), || b.unary(op, &x), float(ta).then(|| da.clone()));
        }
        let ax = axis_of(axis, da.len());
        for op in ReduceOp::ALL {
            // Max, min and argmax refuse an empty axis; when the result is
            // empty too, either answer is taken here (pinned by
            // `dtype_rules::reducing_an_empty_axis`).
            let want = ax.map(|a| {
                let mut d = da.clone();
                if keepdim { d[a] = 1 } else { d.remove(a); }
                (a, d)
            }).filter(|(a, d)| {
                da[*a] > 0 || matches!(op, ReduceOp::Sum | ReduceOp::Mean) || d.contains(&0)
            }).map(|(_, d)| d);
            check(&format!("reduce {op:?} axis {axis} {w}"), || b.reduce(op, &x, axis, keepdim), want);
        }
        check(&format!("softmax axis {axis} {w}"), || b.softmax(&x, axis), ax.filter(|_| float(ta)).map(|_| da.clone()));
        let norm_ok = float(ta) && !da.is_empty();
        let param_ok = |p: &[usize]| p.len() == 1 && Some(&p[0]) == da.last() && same;
        check(&format!("layer_norm {w}"), || b.layer_norm(&x, None, None, eps), norm_ok.then(|| da.clone()));
        check(&format!("layer_norm γ {w}"), || b.layer_norm(&x, Some(&y), None, eps), (norm_ok && param_ok(&db)).then(|| da.clone()));
        check(&format!("layer_norm γβ {w}"), || b.layer_norm(&x, Some(&y), Some(&y), eps), (norm_ok && param_ok(&db)).then(|| da.clone()));
        check(&format!("rms_norm {w}"), || b.rms_norm(&x, None, eps), norm_ok.then(|| da.clone()));
        check(&format!("rms_norm γ {w}"), || b.rms_norm(&x, Some(&y), eps), (norm_ok && param_ok(&db)).then(|| da.clone()));
        check(&format!("matmul {w}"), || b.matmul(&x, &y), matmul_dims(&da, &db).filter(|_| same && float(ta)));
        check(&format!("reshape {target:?} {w}"), || b.reshape(&x, &target), reshape_dims(numel(&da), &target));
        let mut sorted = perm.clone();
        sorted.sort_unstable();
        let is_perm = sorted == (0..da.len()).collect::<Vec<_>>();
        check(&format!("transpose {perm:?} {w}"), || b.transpose(&x, &perm), is_perm.then(|| perm.iter().map(|&p| da[p]).collect()));
        for to in DType::ALL {
            check(&format!("cast → {to} {w}"), || b.cast(&x, to), Some(da.clone()));
        }
        // y's elements are zeros: index 0, valid when x has a row or y is
        // empty.
        let gather_ok = matches!(tb, DType::I32 | DType::I64)
            && !da.is_empty()
            && (da[0] > 0 || numel(&db) == 0);
        let gather_dims = gather_ok.then(|| db.iter().chain(&da[1..]).copied().collect());
        check(&format!("gather {w}"), || b.gather(&x, &y), gather_dims);
        let concat_dims = axis_of(axis, da.len()).filter(|_| same && da.len() == db.len()).and_then(|a| {
            let fits = (0..da.len()).all(|i| i == a || da[i] == db[i]);
            let mut d = da.clone();
            d[a] = da[a].checked_add(db[a])?;
            fits.then_some(d)
        });
        check(&format!("concat axis {axis} {w}"), || b.concat(&x, &y, axis), concat_dims);
        for causal in [false, true] {
            // q = x, k = y, v = x or y.
            for v in [&x, &y] {
                let vd = v.dims().to_vec();
                let want = (|| {
                    if !(same && float(ta)) || da.len() < 2 || db.len() < 2 || vd.len() < 2 {
                        return None;
                    }
                    let (qn, kn, vn) = (da.len(), db.len(), vd.len());
                    if da[qn - 1] != db[kn - 1] || db[kn - 2] != vd[vn - 2] {
                        return None;
                    }
                    let mut out = broadcast(&broadcast(&da[..qn - 2], &db[..kn - 2])?, &vd[..vn - 2])?;
                    out.extend([da[qn - 2], vd[vn - 1]]);
                    Some(out)
                })();
                check(&format!("attention causal {causal} v {vd:?} {w}"), || b.attention(&x, &y, v, causal), want);
            }
        }
    }
}

/// Runs `op`, turning a panic into a message.
fn no_panic(
    what: String,
    failures: &mut Vec<String>,
    op: impl FnOnce() -> tensor_wasm_kernels::Result<Tensor>,
) {
    match run_op(op) {
        Ok(Ok(t)) => {
            if t.nbytes() > Limits::default().max_tensor_bytes {
                failures.push(format!(
                    "{what}: returned {:?}, over the tensor cap",
                    t.dims()
                ));
            }
        }
        Ok(Err(_)) => {}
        Err(msg) => failures.push(format!("{what}: panicked: {msg}")),
    }
}

/// Empty tensors whose other dims are huge: every extent the backend derives
/// (outer and inner counts, row lengths, work) must be computed without
/// overflow. Huge dims are ≥ 2^63 so that a count that escapes the checks
/// fails as a capacity-overflow panic rather than aborting the process on a
/// failed allocation. Collects every failing call before failing.
#[test]
fn empty_tensors_with_huge_dims_never_panic() {
    let b = backend();
    let (m, h) = (usize::MAX, 1usize << 63);
    let cases: [&[usize]; 7] = [
        &[0, m],
        &[m, 0],
        &[0, m, 2],
        &[0, h, h],
        &[2, 0, m],
        &[h, 0, 3],
        &[0, 1, m],
    ];
    let mut failures = Vec::new();
    for dims in cases {
        let x = f32s(&b, dims);
        let f = &mut failures;
        for axis in 0..dims.len() as i64 {
            for op in ReduceOp::ALL {
                no_panic(format!("reduce {op:?} {dims:?} axis {axis}"), f, || {
                    b.reduce(op, &x, axis, false)
                });
            }
            no_panic(format!("softmax {dims:?} axis {axis}"), f, || {
                b.softmax(&x, axis)
            });
            no_panic(format!("concat {dims:?} axis {axis}"), f, || {
                b.concat(&x, &x, axis)
            });
        }
        no_panic(format!("layer_norm {dims:?}"), f, || {
            b.layer_norm(&x, None, None, 1e-5)
        });
        no_panic(format!("rms_norm {dims:?}"), f, || {
            b.rms_norm(&x, None, 1e-5)
        });
        no_panic(format!("unary {dims:?}"), f, || b.unary(UnaryOp::Gelu, &x));
        no_panic(format!("cast {dims:?}"), f, || b.cast(&x, DType::BF16));
        no_panic(format!("binary {dims:?}"), f, || {
            b.binary(BinaryOp::Add, &x, &x)
        });
        no_panic(format!("gather {dims:?} by [2]"), f, || {
            b.gather(&x, &it(&b, DType::I32, &[2], &[0, 0]))
        });
        no_panic(format!("gather {dims:?} by [0]"), f, || {
            b.gather(&x, &it(&b, DType::I32, &[0], &[]))
        });
        no_panic(format!("matmul {dims:?}²"), f, || b.matmul(&x, &x));
        no_panic(format!("attention {dims:?}³"), f, || {
            b.attention(&x, &x, &x, true)
        });
        let perm: Vec<usize> = (0..dims.len()).rev().collect();
        no_panic(format!("transpose {dims:?}"), f, || b.transpose(&x, &perm));
        no_panic(format!("reshape {dims:?} to [-1]"), f, || {
            b.reshape(&x, &[-1])
        });
    }
    assert!(
        failures.is_empty(),
        "{} calls failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A tensor's element count does not depend on where its zero dim is: if
/// [0, MAX, 2] is a tensor (0 elements), so is its transpose [2, MAX, 0].
#[test]
fn zero_dims_make_empty_tensors_in_any_position() {
    let b = backend();
    for dims in [
        &[0, usize::MAX, 2][..],
        &[2, usize::MAX, 0],
        &[usize::MAX, 2, 0],
    ] {
        let t = b.zeros(DType::F32, dims);
        assert!(t.is_ok(), "zeros {dims:?}: {t:?}");
        assert!(
            b.from_bytes(DType::F32, dims, &[]).is_ok(),
            "from_bytes {dims:?}"
        );
    }
    let x = f32s(&b, &[0, usize::MAX, 2]);
    assert_eq!(
        b.transpose(&x, &[2, 1, 0]).unwrap().dims(),
        &[2, usize::MAX, 0]
    );
}

/// Concatenating empty blocks must not cost one step per block: [2^63, 0]
/// with itself along axis 1 is an empty result (a backend that loops over
/// the 2^63 blocks hangs here).
#[test]
fn concat_of_empty_blocks_under_a_huge_outer_dim_returns() {
    let b = backend();
    let x = f32s(&b, &[1 << 63, 0]);
    let r = b.concat(&x, &x, 1);
    assert!(r.is_err() || r.unwrap().dims() == [1 << 63, 0]);
}

// ----------------------------------------------------------------------------
// The invocation's deadline
// ----------------------------------------------------------------------------

#[test]
fn long_matmul_and_attention_stop_once_the_deadline_passes() {
    use std::time::{Duration, Instant};
    use tensor_wasm_kernels::{KernelError, deadline};
    let b = backend();
    // 4096³ is about 7·10^10 multiply-adds: seconds on a core, far past a
    // deadline a millisecond away, and 128 chunks to stop between.
    let n = 4096;
    let x = b.zeros(DType::F32, &[n, n]).unwrap();
    let soon = || Some(Instant::now() + Duration::from_millis(1));
    let cut = deadline::scope(soon(), || b.matmul(&x, &x));
    assert!(
        matches!(cut, Err(KernelError::DeadlineExceeded { op: "matmul" })),
        "{cut:?}"
    );
    let q = b.zeros(DType::F32, &[1, n, n]).unwrap();
    let cut = deadline::scope(soon(), || b.attention(&q, &q, &q, false));
    assert!(
        matches!(cut, Err(KernelError::DeadlineExceeded { op: "attention" })),
        "{cut:?}"
    );
    // With time to spare (or none set), the same ops finish.
    let small = b.zeros(DType::F32, &[64, 64]).unwrap();
    let later = Some(Instant::now() + Duration::from_secs(3600));
    assert!(deadline::scope(later, || b.matmul(&small, &small)).is_ok());
    assert!(b.matmul(&small, &small).is_ok());
}
