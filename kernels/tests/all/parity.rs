//! CUDA backend parity: every op, on every dtype it takes, against the CPU
//! backend, on fresh random inputs (the seed is printed on failure and can
//! be pinned with `TENSOR_WASM_PARITY_SEED`).
//!
//! Run on a GPU machine with `TENSOR_WASM_CUDA_POISON=1` (scripts/gpu-check
//! sets it), so that an output element a kernel forgets to write reads as
//! NaN / 0xFF and fails the comparison.
//!
//! Tolerances: f32 elementwise |gpu − cpu| ≤ 1e-5·(|cpu| + 1); matmul and
//! attention relative Frobenius error ≤ 1e-4 (f32); f16 and bf16 1e-2
//! relative; integers and index results exact; NaN must match NaN and
//! infinities must match exactly. Errors must be the same variant with the
//! same ABI code.
//!
//! Every test needs a CUDA GPU and is `#[ignore]`d; this module is
//! self-contained on purpose (no helpers from other test modules).

use std::mem::discriminant;

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tensor_wasm_kernels::cuda::{CudaBackend, POISON_ENV};
use tensor_wasm_kernels::{
    Backend, BinaryOp, CpuBackend, DType, KernelError, Limits, ReduceOp, Result, Tensor, UnaryOp,
};

const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// What random values an input holds.
#[derive(Clone, Copy, Debug)]
enum Dist {
    /// Floats in [-2, 2]; ints in [-50, 50] (u8: [0, 100]).
    Small,
    /// Floats in [0.05, 3]; ints in [1, 20].
    Positive,
    /// Ints over their whole range (wrapping); floats in [-1e4, 1e4].
    Wide,
    /// Ints in [-6, 6] (u8 [0, 6]), zeros included; floats in [-2, 2] with
    /// some exact zeros.
    WithZeros,
    /// Floats mixing NaN, ±inf, huge and fractional values around the
    /// integer ranges; ints as `Wide`.
    Specials,
}

/// How results are compared.
#[derive(Clone, Debug)]
enum Tol {
    Elementwise,
    Frobenius,
    /// Elementwise, plus, for each element, the rounding that summing in
    /// another order may cost: a sum of terms as large as those given
    /// (the sum of the magnitudes it adds up, over the count for a mean)
    /// moves by up to n·2^-24 of them in f32.
    Summed(Vec<f64>),
}

struct Ctx {
    cpu: CpuBackend,
    gpu: CudaBackend,
    rng: StdRng,
    seed: u64,
}

impl Ctx {
    fn new() -> Ctx {
        Ctx::with_limits(Limits::default())
    }

    fn with_limits(limits: Limits) -> Ctx {
        if std::env::var(POISON_ENV).as_deref() != Ok("1") {
            eprintln!("warning: {POISON_ENV}=1 is not set; unwritten outputs may go unnoticed");
        }
        let seed = std::env::var("TENSOR_WASM_PARITY_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| rand::thread_rng().r#gen());
        let gpu = CudaBackend::new(0, limits).expect("a CUDA GPU (device 0)");
        Ctx {
            cpu: CpuBackend::new(limits),
            gpu,
            rng: StdRng::seed_from_u64(seed),
            seed,
        }
    }

    fn float_value(&mut self, dist: Dist) -> f32 {
        match dist {
            Dist::Small => self.rng.gen_range(-2.0f32..2.0),
            Dist::Positive => self.rng.gen_range(0.05f32..3.0),
            Dist::Wide => self.rng.gen_range(-1e4f32..1e4),
            Dist::WithZeros => {
                if self.rng.gen_bool(0.2) {
                    0.0
                } else {
                    self.rng.gen_range(-2.0f32..2.0)
                }
            }
            Dist::Specials => {
                const SPECIAL: [f32; 22] = [
                    f32::NAN,
                    f32::INFINITY,
                    f32::NEG_INFINITY,
                    0.0,
                    -0.0,
                    -0.5,
                    0.5,
                    254.5,
                    255.0,
                    255.9,
                    256.0,
                    300.0,
                    -1.0,
                    -129.0,
                    2.147_483_5e9,
                    3e9,
                    -3e9,
                    1e10,
                    -1e10,
                    9.3e18,
                    -9.3e18,
                    65519.0,
                ];
                if self.rng.gen_bool(0.5) {
                    SPECIAL[self.rng.gen_range(0..SPECIAL.len())]
                } else {
                    self.rng.gen_range(-1e3f32..1e3)
                }
            }
        }
    }

    fn int_value(&mut self, dtype: DType, dist: Dist) -> i64 {
        let unsigned = dtype == DType::U8;
        match dist {
            Dist::Small if unsigned => self.rng.gen_range(0..=100),
            Dist::Small => self.rng.gen_range(-50..=50),
            Dist::Positive => self.rng.gen_range(1..=20),
            Dist::WithZeros if unsigned => self.rng.gen_range(0..=6),
            Dist::WithZeros => self.rng.gen_range(-6..=6),
            Dist::Wide | Dist::Specials => match dtype {
                DType::I32 => i64::from(self.rng.r#gen::<i32>()),
                DType::I64 => self.rng.r#gen::<i64>(),
                _ => i64::from(self.rng.r#gen::<u8>()),
            },
        }
    }

    /// Little-endian bytes of `n` random elements of `dtype`.
    fn bytes(&mut self, dtype: DType, n: usize, dist: Dist) -> Vec<u8> {
        let mut out = Vec::with_capacity(n * dtype.size());
        for _ in 0..n {
            match dtype {
                DType::F32 => out.extend(self.float_value(dist).to_le_bytes()),
                DType::F16 => out.extend(f16::from_f32(self.float_value(dist)).to_le_bytes()),
                DType::BF16 => out.extend(bf16::from_f32(self.float_value(dist)).to_le_bytes()),
                DType::I32 => out.extend((self.int_value(dtype, dist) as i32).to_le_bytes()),
                DType::I64 => out.extend(self.int_value(dtype, dist).to_le_bytes()),
                DType::U8 => out.push(self.int_value(dtype, dist) as u8),
            }
        }
        out
    }

    /// The same tensor on both backends.
    fn upload(&self, dtype: DType, dims: &[usize], bytes: &[u8]) -> (Tensor, Tensor) {
        (
            self.cpu.from_bytes(dtype, dims, bytes).expect("cpu upload"),
            self.gpu.from_bytes(dtype, dims, bytes).expect("gpu upload"),
        )
    }

    /// A random tensor on both backends.
    fn input(&mut self, dtype: DType, dims: &[usize], dist: Dist) -> (Tensor, Tensor) {
        let n: usize = dims.iter().product();
        let bytes = self.bytes(dtype, n, dist);
        self.upload(dtype, dims, &bytes)
    }

    /// Compares one op's results (or errors) on both backends.
    fn check(&self, what: &str, cpu: Result<Tensor>, gpu: Result<Tensor>, tol: Tol) {
        let seed = self.seed;
        let (c, g) = match (cpu, gpu) {
            (Ok(c), Ok(g)) => (c, g),
            (Err(c), Err(g)) => {
                assert_same_error(what, &c, &g);
                return;
            }
            (c, g) => panic!("{what} (seed {seed}): cpu {c:?} but gpu {g:?}"),
        };
        assert_eq!(c.dtype(), g.dtype(), "{what} (seed {seed}): dtype");
        assert_eq!(c.dims(), g.dims(), "{what} (seed {seed}): dims");
        let cb = self.cpu.to_bytes(&c).expect("cpu read");
        let gb = self
            .gpu
            .to_bytes(&g)
            .unwrap_or_else(|e| panic!("{what} (seed {seed}): gpu read failed: {e}"));
        compare(&format!("{what} (seed {seed})"), c.dtype(), &cb, &gb, tol);
    }
}

/// Σ|x| along `axis` of a `rows`×`cols` matrix, one per output element.
fn line_magnitudes(values: &[f64], rows: usize, cols: usize, axis: i64) -> Vec<f64> {
    if axis == 0 {
        (0..cols)
            .map(|c| (0..rows).map(|r| values[r * cols + c].abs()).sum())
            .collect()
    } else {
        (0..rows)
            .map(|r| {
                values[r * cols..(r + 1) * cols]
                    .iter()
                    .map(|v| v.abs())
                    .sum()
            })
            .collect()
    }
}

fn assert_same_error(what: &str, c: &KernelError, g: &KernelError) {
    assert_eq!(
        discriminant(c),
        discriminant(g),
        "{what}: cpu error {c:?}, gpu error {g:?}"
    );
    assert_eq!(c.abi(), g.abi(), "{what}: abi codes of {c:?} and {g:?}");
}

/// Float elements as f64 (exact for every f32, f16 and bf16 value).
fn floats(dtype: DType, bytes: &[u8]) -> Vec<f64> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f64())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f64())
            .collect(),
        other => panic!("{other} is not a float dtype"),
    }
}

fn compare(what: &str, dtype: DType, cpu: &[u8], gpu: &[u8], tol: Tol) {
    assert_eq!(cpu.len(), gpu.len(), "{what}: byte lengths");
    if !dtype.is_float() {
        if cpu != gpu {
            let size = dtype.size();
            let at = cpu
                .chunks(size)
                .zip(gpu.chunks(size))
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            panic!(
                "{what}: {dtype} results differ first at element {at}: cpu {:?} gpu {:?}",
                &cpu[at * size..(at + 1) * size],
                &gpu[at * size..(at + 1) * size]
            );
        }
        return;
    }
    let (c, g) = (floats(dtype, cpu), floats(dtype, gpu));
    let half = dtype != DType::F32;
    for (i, (&x, &y)) in c.iter().zip(&g).enumerate() {
        if x.is_nan() || y.is_nan() || x.is_infinite() || y.is_infinite() {
            let same = (x.is_nan() && y.is_nan()) || x == y;
            assert!(same, "{what}: element {i}: cpu {x} gpu {y}");
        }
    }
    let finite = |v: &f64| v.is_finite();
    match tol {
        Tol::Elementwise | Tol::Summed(_) => {
            let t = if half { 1e-2 } else { 1e-5 };
            for (i, (&x, &y)) in c.iter().zip(&g).enumerate() {
                let order = match &tol {
                    Tol::Summed(magnitudes) => 1e-5 * magnitudes[i],
                    _ => 0.0,
                };
                if finite(&x) {
                    assert!(
                        (y - x).abs() <= t * (x.abs() + 1.0) + order,
                        "{what}: element {i}: cpu {x} gpu {y}"
                    );
                }
            }
        }
        Tol::Frobenius => {
            let t = if half { 1e-2 } else { 1e-4 };
            let (mut err, mut norm) = (0.0f64, 0.0f64);
            for (&x, &y) in c.iter().zip(&g) {
                if finite(&x) {
                    err += (y - x) * (y - x);
                    norm += x * x;
                }
            }
            let (err, norm) = (err.sqrt(), norm.sqrt());
            assert!(
                err <= t * (norm + 1e-6),
                "{what}: relative Frobenius error {} (|err| {err}, |ref| {norm})",
                err / norm.max(1e-30)
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Transfers
// ---------------------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA GPU"]
fn parity_round_trips_bytes_of_every_dtype() {
    let mut cx = Ctx::new();
    for dtype in DType::ALL {
        for dims in [
            vec![],
            vec![0],
            vec![1],
            vec![3, 5],
            vec![2, 0, 4],
            vec![1001],
        ] {
            let n: usize = dims.iter().product();
            let bytes = cx.bytes(dtype, n, Dist::Wide);
            let (_, g) = cx.upload(dtype, &dims, &bytes);
            assert_eq!(g.dims(), dims.as_slice());
            assert_eq!(cx.gpu.to_bytes(&g).unwrap(), bytes, "{dtype} {dims:?}");
            let z = cx.gpu.zeros(dtype, &dims).unwrap();
            assert_eq!(cx.gpu.to_bytes(&z).unwrap(), vec![0; n * dtype.size()]);
        }
    }
    // Several staging chunks, with a ragged tail.
    let n = (9 << 20) + 3;
    let bytes = cx.bytes(DType::U8, n, Dist::Wide);
    let (_, g) = cx.upload(DType::U8, &[n], &bytes);
    assert!(cx.gpu.to_bytes(&g).unwrap() == bytes, "9 MiB round trip");
    cx.gpu.synchronize().unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn parity_tensors_cross_tenant_streams() {
    let mut cx = Ctx::new();
    let other = cx.gpu.new_stream_backend().unwrap();
    let (ca, ga) = cx.input(DType::F32, &[64, 32], Dist::Small);
    let (cb, gb) = cx.input(DType::F32, &[32, 16], Dist::Small);
    // Produced on one stream, consumed on another, read on a third.
    let gm = other.matmul(&ga, &gb);
    let third = cx.gpu.new_stream_backend().unwrap();
    let gs = gm.and_then(|m| third.unary(UnaryOp::Tanh, &m));
    let cs = cx
        .cpu
        .matmul(&ca, &cb)
        .and_then(|m| cx.cpu.unary(UnaryOp::Tanh, &m));
    cx.check("matmul then tanh across streams", cs, gs, Tol::Frobenius);
    let used = cx.gpu.memory_used();
    assert!(used > 0);
    assert!(cx.gpu.memory_reserved().unwrap() >= used);
}

// ---------------------------------------------------------------------------
// Elementwise
// ---------------------------------------------------------------------------

const BINARY_SHAPES: &[(&[usize], &[usize])] = &[
    (&[3, 4], &[3, 4]),
    (&[1001], &[1001]),
    (&[2, 3, 4], &[4]),
    (&[2, 1, 4], &[3, 1]),
    (&[5, 1], &[1, 6]),
    (&[], &[3]),
    (&[7], &[]),
    (&[1], &[7]),
    (&[4, 1, 3, 1], &[2, 1, 5]),
    (&[2, 3, 4, 5], &[2, 1, 4, 1]),
    (&[2, 0, 3], &[3]),
    (&[0], &[1]),
];

fn binary_dist(op: BinaryOp, dtype: DType) -> (Dist, Dist) {
    match op {
        BinaryOp::Pow if dtype.is_float() => (Dist::Positive, Dist::Small),
        BinaryOp::Pow => (Dist::WithZeros, Dist::WithZeros),
        BinaryOp::Div => (Dist::Small, Dist::WithZeros),
        BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul if !dtype.is_float() => {
            (Dist::Wide, Dist::Wide)
        }
        _ => (Dist::Small, Dist::Small),
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn parity_binary_every_op_dtype_and_broadcast() {
    let mut cx = Ctx::new();
    for dtype in DType::ALL {
        for op in BinaryOp::ALL {
            let (da, db) = binary_dist(op, dtype);
            for &(sa, sb) in BINARY_SHAPES {
                let (ca, ga) = cx.input(dtype, sa, da);
                let (cb, gb) = cx.input(dtype, sb, db);
                cx.check(
                    &format!("binary {} {dtype} {sa:?} {sb:?}", op.name()),
                    cx.cpu.binary(op, &ca, &cb),
                    cx.gpu.binary(op, &ga, &gb),
                    Tol::Elementwise,
                );
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn parity_binary_nan_and_integer_edges() {
    let mut cx = Ctx::new();
    // NaN propagation through max/min and IEEE specials through every op.
    for dtype in FLOATS {
        for op in BinaryOp::ALL {
            let (ca, ga) = cx.input(dtype, &[257], Dist::Specials);
            let (cb, gb) = cx.input(dtype, &[257], Dist::Specials);
            cx.check(
                &format!("binary {} {dtype} specials", op.name()),
                cx.cpu.binary(op, &ca, &cb),
                cx.gpu.binary(op, &ga, &gb),
                Tol::Elementwise,
            );
        }
    }
    // MIN / -1, division by zero, negative exponents, wrapping powers.
    let a: Vec<i32> = vec![i32::MIN, i32::MIN, 7, -7, 5, 1, -1, -1, 2, 3, 0, 0];
    let b: Vec<i32> = vec![-1, 0, -2, 2, 0, -7, -3, -4, -1, 40, 0, -2];
    for op in BinaryOp::ALL {
        let (ca, ga) = cx.upload(DType::I32, &[a.len()], bytemuck::cast_slice(&a));
        let (cb, gb) = cx.upload(DType::I32, &[b.len()], bytemuck::cast_slice(&b));
        cx.check(
            &format!("binary {} i32 edges", op.name()),
            cx.cpu.binary(op, &ca, &cb),
            cx.gpu.binary(op, &ga, &gb),
            Tol::Elementwise,
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn parity_scalar_every_op_dtype_and_value() {
    let mut cx = Ctx::new();
    let values = [
        0.0f32,
        1.0,
        -1.0,
        2.5,
        -3.7,
        0.3,
        300.0,
        -1e10,
        3e9,
        f32::NAN,
        f32::INFINITY,
    ];
    for dtype in DType::ALL {
        for op in BinaryOp::ALL {
            let (da, _) = binary_dist(op, dtype);
            for dims in [&[5, 7][..], &[1001], &[], &[0, 3]] {
                let (ca, ga) = cx.input(dtype, dims, da);
                for v in values {
                    if op == BinaryOp::Pow && dtype.is_float() && v.abs() > 10.0 {
                        continue;
                    }
                    cx.check(
                        &format!("scalar {} {dtype} {dims:?} {v}", op.name()),
                        cx.cpu.scalar(op, &ca, v),
                        cx.gpu.scalar(op, &ga, v),
                        Tol::Elementwise,
                    );
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn parity_unary_every_op_and_float_dtype() {
    let mut cx = Ctx::new();
    for dtype in FLOATS {
        for op in UnaryOp::ALL {
            for (dims, dist) in [
                (&[4, 33][..], Dist::Small),
                (&[1003], Dist::Small),
                (&[64], Dist::Specials),
                (&[], Dist::Positive),
                (&[3, 0], Dist::Small),
            ] {
                // log and sqrt of negatives are NaN on both sides: keep
                // most inputs in their domain so values get compared.
                let dist = match (op, dist) {
                    (UnaryOp::Log | UnaryOp::Sqrt, Dist::Small) => Dist::Positive,
                    (_, d) => d,
                };
                let (ca, ga) = cx.input(dtype, dims, dist);
                cx.check(
                    &format!("unary {} {dtype} {dims:?} {dist:?}", op.name()),
                    cx.cpu.unary(op, &ca),
                    cx.gpu.unary(op, &ga),
                    Tol::Elementwise,
                );
            }
        }
    }
    for dtype in [DType::I32, DType::I64, DType::U8] {
        let (ca, ga) = cx.input(dtype, &[4], Dist::Small);
        cx.check(
            &format!("unary on {dtype}"),
            cx.cpu.unary(UnaryOp::Exp, &ca),
            cx.gpu.unary(UnaryOp::Exp, &ga),
            Tol::Elementwise,
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn parity_cast_every_dtype_pair() {
    let mut cx = Ctx::new();
    for from in DType::ALL {
        for to in DType::ALL {
            for dist in [Dist::Small, Dist::Wide, Dist::Specials] {
                for dims in [&[517][..], &[2, 3], &[], &[0]] {
                    let (ca, ga) = cx.input(from, dims, dist);
                    cx.check(
                        &format!("cast {from}->{to} {dims:?} {dist:?}"),
                        cx.cpu.cast(&ca, to),
                        cx.gpu.cast(&ga, to),
                        Tol::Elementwise,
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Reductions, softmax, norms
// ---------------------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA GPU"]
fn parity_reduce_every_op_dtype_axis() {
    let mut cx = Ctx::new();
    let cases: &[(&[usize], &[i64])] = &[
        (&[3, 4, 5], &[0, 1, 2, -1, -3]),
        (&[7], &[0]),
        (&[1000, 3], &[0, 1]),
        (&[2, 700], &[1]),
        (&[3, 0, 2], &[0, 1, 2]),
        (&[0, 4], &[0, 1]),
    ];
    for dtype in DType::ALL {
        for op in ReduceOp::ALL {
            for &(dims, axes) in cases {
                for &axis in axes {
                    for keepdim in [false, true] {
                        let dist = if dtype.is_float() {
                            Dist::Small
                        } else {
                            Dist::Wide
                        };
                        let (ca, ga) = cx.input(dtype, dims, dist);
                        cx.check(
                            &format!(
                                "reduce {} {dtype} {dims:?} axis {axis} keepdim {keepdim}",
                                op.name()
                            ),
                            cx.cpu.reduce(op, &ca, axis, keepdim),
                            cx.gpu.reduce(op, &ga, axis, keepdim),
                            Tol::Elementwise,
                        );
                    }
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn parity_reduce_nan_and_argmax_ties() {
    let mut cx = Ctx::new();
    for dtype in FLOATS {
        for op in ReduceOp::ALL {
            let (ca, ga) = cx.input(dtype, &[9, 40], Dist::Specials);
            let values = floats(dtype, &cx.cpu.to_bytes(&ca).unwrap());
            for axis in [0, 1] {
                // ±3e9 and ±1e10 cancel: a sum's rounding depends on its
                // order, which the backends need not share.
                let tol = match op {
                    ReduceOp::Sum | ReduceOp::Mean => {
                        let n = if axis == 0 { 9 } else { 40 };
                        let mut m = line_magnitudes(&values, 9, 40, axis);
                        if op == ReduceOp::Mean {
                            m.iter_mut().for_each(|v| *v /= f64::from(n));
                        }
                        Tol::Summed(m)
                    }
                    _ => Tol::Elementwise,
                };
                cx.check(
                    &format!("reduce {} {dtype} specials axis {axis}", op.name()),
                    cx.cpu.reduce(op, &ca, axis, false),
                    cx.gpu.reduce(op, &ga, axis, false),
                    tol,
                );
            }
        }
    }
    // Ties: the first maximum wins; NaN beats everything, the first NaN
    // wins among NaNs.
    let rows: Vec<f32> = vec![
        1.0,
        3.0,
        3.0,
        2.0,
        3.0, //
        5.0,
        5.0,
        5.0,
        5.0,
        5.0, //
        0.0,
        f32::NAN,
        9.0,
        f32::NAN,
        1.0, //
        -1.0,
        -0.0,
        0.0,
        -0.0,
        -2.0, //
    ];
    for dtype in FLOATS {
        let bytes: Vec<u8> = match dtype {
            DType::F32 => bytemuck::cast_slice(&rows).to_vec(),
            DType::F16 => rows
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
            _ => rows
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
        };
        let (ca, ga) = cx.upload(dtype, &[4, 5], &bytes);
        for axis in [0, 1] {
            cx.check(
                &format!("argmax ties {dtype} axis {axis}"),
                cx.cpu.reduce(ReduceOp::ArgMax, &ca, axis, true),
                cx.gpu.reduce(ReduceOp::ArgMax, &ga, axis, true),
                Tol::Elementwise,
            );
        }
    }
    let ints: Vec<i32> = vec![4, 9, 9, 1, 9, -3, -3, -5, -3, -9];
    let (ca, ga) = cx.upload(DType::I32, &[2, 5], bytemuck::cast_slice(&ints));
    cx.check(
        "argmax ties i32",
        cx.cpu.reduce(ReduceOp::ArgMax, &ca, 1, false),
        cx.gpu.reduce(ReduceOp::ArgMax, &ga, 1, false),
        Tol::Elementwise,
    );
    // Long rows (block reductions) with ties planted far apart.
    let mut long = vec![0.5f32; 5000];
    long[4321] = 7.0;
    long[777] = 7.0;
    let (ca, ga) = cx.upload(DType::F32, &[1, 5000], bytemuck::cast_slice(&long));
    cx.check(
        "argmax long row",
        cx.cpu.reduce(ReduceOp::ArgMax, &ca, 1, false),
        cx.gpu.reduce(ReduceOp::ArgMax, &ga, 1, false),
        Tol::Elementwise,
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn parity_softmax_every_float_dtype_and_axis() {
    let mut cx = Ctx::new();
    let cases: &[(&[usize], &[i64])] = &[
        (&[4, 7], &[-1, 0]),
        (&[2, 3, 5], &[0, 1, 2]),
        (&[3, 1000], &[1]),
        // Rows of up to 8192 elements are kept in registers; longer ones
        // are read once per pass.
        (&[3, 8192], &[1]),
        (&[2, 8193], &[-1]),
        (&[1000, 3], &[0]),
        (&[5], &[0]),
        (&[2, 0, 3], &[1, 2]),
    ];
    for dtype in FLOATS {
        for &(dims, axes) in cases {
            for &axis in axes {
                for dist in [Dist::Small, Dist::Wide] {
                    let (ca, ga) = cx.input(dtype, dims, dist);
                    cx.check(
                        &format!("softmax {dtype} {dims:?} axis {axis} {dist:?}"),
                        cx.cpu.softmax(&ca, axis),
                        cx.gpu.softmax(&ga, axis),
                        Tol::Elementwise,
                    );
                }
            }
        }
        // Rows with -inf, +inf and NaN.
        let (ca, ga) = cx.input(dtype, &[16, 6], Dist::Specials);
        for axis in [0, 1] {
            cx.check(
                &format!("softmax {dtype} specials axis {axis}"),
                cx.cpu.softmax(&ca, axis),
                cx.gpu.softmax(&ga, axis),
                Tol::Elementwise,
            );
        }
    }
    let (ca, ga) = cx.input(DType::I32, &[2, 3], Dist::Small);
    cx.check(
        "softmax i32",
        cx.cpu.softmax(&ca, 1),
        cx.gpu.softmax(&ga, 1),
        Tol::Elementwise,
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn parity_norms_with_and_without_parameters() {
    let mut cx = Ctx::new();
    for dtype in FLOATS {
        for dims in [
            &[5, 16][..],
            &[3, 4, 300],
            &[7],
            &[2, 1],
            &[0, 8],
            &[3, 0],
            &[3, 8192],
            &[2, 8200],
        ] {
            let cols = *dims.last().unwrap();
            let (cx_, gx) = cx.input(dtype, dims, Dist::Small);
            let (cg, gg) = cx.input(dtype, &[cols], Dist::Small);
            let (cb, gb) = cx.input(dtype, &[cols], Dist::Small);
            for eps in [1e-5f32, 0.1] {
                for (with_g, with_b) in [(false, false), (true, false), (false, true), (true, true)]
                {
                    let (c_g, g_g) = if with_g {
                        (Some(&cg), Some(&gg))
                    } else {
                        (None, None)
                    };
                    let (c_b, g_b) = if with_b {
                        (Some(&cb), Some(&gb))
                    } else {
                        (None, None)
                    };
                    cx.check(
                        &format!("layer_norm {dtype} {dims:?} eps {eps} γ {with_g} β {with_b}"),
                        cx.cpu.layer_norm(&cx_, c_g, c_b, eps),
                        cx.gpu.layer_norm(&gx, g_g, g_b, eps),
                        Tol::Elementwise,
                    );
                }
                for with_g in [false, true] {
                    let (c_g, g_g) = if with_g {
                        (Some(&cg), Some(&gg))
                    } else {
                        (None, None)
                    };
                    cx.check(
                        &format!("rms_norm {dtype} {dims:?} eps {eps} γ {with_g}"),
                        cx.cpu.rms_norm(&cx_, c_g, eps),
                        cx.gpu.rms_norm(&gx, g_g, eps),
                        Tol::Elementwise,
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Layout
// ---------------------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA GPU"]
fn parity_reshape_transpose_every_dtype() {
    let mut cx = Ctx::new();
    let perms3: [[usize; 3]; 6] = [
        [0, 1, 2],
        [0, 2, 1],
        [1, 0, 2],
        [1, 2, 0],
        [2, 0, 1],
        [2, 1, 0],
    ];
    for dtype in DType::ALL {
        let (ca, ga) = cx.input(dtype, &[2, 3, 4], Dist::Wide);
        for p in perms3 {
            cx.check(
                &format!("transpose {dtype} [2,3,4] {p:?}"),
                cx.cpu.transpose(&ca, &p),
                cx.gpu.transpose(&ga, &p),
                Tol::Elementwise,
            );
        }
        for (dims, perm) in [
            (&[2, 3, 4, 5][..], &[3, 1, 0, 2][..]),
            (&[1, 5, 1], &[2, 1, 0]),
            (&[33, 65], &[1, 0]),
            (&[0, 3], &[1, 0]),
            (&[], &[]),
        ] {
            let (ca, ga) = cx.input(dtype, dims, Dist::Wide);
            cx.check(
                &format!("transpose {dtype} {dims:?} {perm:?}"),
                cx.cpu.transpose(&ca, perm),
                cx.gpu.transpose(&ga, perm),
                Tol::Elementwise,
            );
        }
        let (ca, ga) = cx.input(dtype, &[4, 6], Dist::Wide);
        for target in [&[24][..], &[-1, 4], &[2, -1, 3], &[3, 8]] {
            // A reshape, then a transpose of it: views share storage.
            let c = cx.cpu.reshape(&ca, target).and_then(|t| {
                cx.cpu
                    .transpose(&t, &(0..t.ndim()).rev().collect::<Vec<_>>())
            });
            let g = cx.gpu.reshape(&ga, target).and_then(|t| {
                cx.gpu
                    .transpose(&t, &(0..t.ndim()).rev().collect::<Vec<_>>())
            });
            cx.check(
                &format!("reshape {dtype} {target:?}"),
                c,
                g,
                Tol::Elementwise,
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn parity_concat_every_dtype_and_axis() {
    let mut cx = Ctx::new();
    let cases: &[(&[usize], &[usize], i64)] = &[
        (&[2, 3], &[2, 5], 1),
        (&[2, 3], &[4, 3], 0),
        (&[2, 3, 4], &[2, 1, 4], -2),
        (&[2, 3, 4], &[2, 3, 7], 2),
        (&[2, 0, 3], &[2, 4, 3], 1),
        (&[0, 3], &[0, 3], 0),
        (&[5], &[0], 0),
    ];
    for dtype in DType::ALL {
        for &(sa, sb, axis) in cases {
            let (ca, ga) = cx.input(dtype, sa, Dist::Wide);
            let (cb, gb) = cx.input(dtype, sb, Dist::Wide);
            cx.check(
                &format!("concat {dtype} {sa:?} {sb:?} axis {axis}"),
                cx.cpu.concat(&ca, &cb, axis),
                cx.gpu.concat(&ga, &gb, axis),
                Tol::Elementwise,
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn parity_gather_every_dtype_and_index_type() {
    let mut cx = Ctx::new();
    for dtype in DType::ALL {
        for table_dims in [&[10, 4][..], &[7], &[6, 300], &[5, 2, 3], &[4, 0]] {
            let rows = table_dims[0];
            let (ct, gt) = cx.input(dtype, table_dims, Dist::Wide);
            for index_dims in [&[3, 2][..], &[9], &[], &[0]] {
                let n: usize = index_dims.iter().product();
                let idx: Vec<i64> = (0..n).map(|_| cx.rng.gen_range(0..rows as i64)).collect();
                for index_type in [DType::I32, DType::I64] {
                    let bytes: Vec<u8> = match index_type {
                        DType::I32 => idx.iter().flat_map(|&i| (i as i32).to_le_bytes()).collect(),
                        _ => idx.iter().flat_map(|&i| i.to_le_bytes()).collect(),
                    };
                    let (ci, gi) = cx.upload(index_type, index_dims, &bytes);
                    cx.check(
                        &format!("gather {dtype} {table_dims:?} by {index_type} {index_dims:?}"),
                        cx.cpu.gather(&ct, &ci),
                        cx.gpu.gather(&gt, &gi),
                        Tol::Elementwise,
                    );
                }
            }
        }
    }
    // Out-of-range and negative indices fail the call on both backends,
    // for short rows and for long ones.
    for table_dims in [&[10, 4][..], &[10, 300], &[0, 3]] {
        let (ct, gt) = cx.input(DType::F32, table_dims, Dist::Small);
        for bad in [10i64, -1, i64::MAX, 1 << 40] {
            let idx = [0i64, 3, bad, 2];
            let (ci, gi) = cx.upload(DType::I64, &[4], bytemuck::cast_slice(&idx));
            cx.check(
                &format!("gather {table_dims:?} index {bad}"),
                cx.cpu.gather(&ct, &ci),
                cx.gpu.gather(&gt, &gi),
                Tol::Elementwise,
            );
        }
        let idx = [1i32, -5];
        let (ci, gi) = cx.upload(DType::I32, &[2], bytemuck::cast_slice(&idx));
        cx.check(
            &format!("gather {table_dims:?} i32 index -5"),
            cx.cpu.gather(&ct, &ci),
            cx.gpu.gather(&gt, &gi),
            Tol::Elementwise,
        );
    }
    // The backend stays usable after a failed gather.
    let (ca, ga) = cx.input(DType::F32, &[8], Dist::Small);
    cx.check(
        "op after a failed gather",
        cx.cpu.unary(UnaryOp::Neg, &ca),
        cx.gpu.unary(UnaryOp::Neg, &ga),
        Tol::Elementwise,
    );
}

// ---------------------------------------------------------------------------
// Matmul and attention
// ---------------------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA GPU"]
fn parity_matmul_shapes_and_batch_broadcast() {
    let mut cx = Ctx::new();
    let cases: &[(&[usize], &[usize])] = &[
        (&[4, 5], &[5, 3]),
        (&[5], &[5]),
        (&[3, 5], &[5]),
        (&[5], &[5, 3]),
        (&[2, 3, 4], &[4, 5]),
        (&[4, 5], &[3, 5, 2]),
        (&[2, 1, 3, 4], &[5, 4, 6]),
        (&[1, 3, 4], &[2, 4, 5]),
        (&[3, 1, 2, 4], &[1, 2, 4, 3]),
        (&[2, 64, 33], &[33, 17]),
        (&[7, 128, 64], &[7, 64, 96]),
        (&[257, 129], &[129, 255]),
        (&[0, 4], &[4, 3]),
        (&[3, 4], &[4, 0]),
        (&[3, 0], &[0, 4]),
        (&[0, 3, 4], &[4, 2]),
        (&[2, 3, 0], &[2, 0, 5]),
    ];
    for dtype in FLOATS {
        for &(sa, sb) in cases {
            let (ca, ga) = cx.input(dtype, sa, Dist::Small);
            let (cb, gb) = cx.input(dtype, sb, Dist::Small);
            cx.check(
                &format!("matmul {dtype} {sa:?} {sb:?}"),
                cx.cpu.matmul(&ca, &cb),
                cx.gpu.matmul(&ga, &gb),
                Tol::Frobenius,
            );
        }
    }
    let (ca, ga) = cx.input(DType::I32, &[2, 2], Dist::Small);
    cx.check(
        "matmul i32",
        cx.cpu.matmul(&ca, &ca),
        cx.gpu.matmul(&ga, &ga),
        Tol::Frobenius,
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn parity_attention_causal_and_not() {
    let mut cx = Ctx::new();
    let cases: &[(&[usize], &[usize], &[usize])] = &[
        (&[5, 8], &[7, 8], &[7, 4]),
        (&[2, 3, 5, 8], &[2, 3, 7, 8], &[2, 3, 7, 4]),
        (&[2, 1, 4, 8], &[1, 3, 6, 8], &[1, 3, 6, 5]),
        (&[6, 8], &[3, 8], &[3, 8]),
        (&[3, 16], &[9, 16], &[9, 16]),
        (&[4, 130, 64], &[4, 200, 64], &[4, 200, 64]),
        // Long enough that causal attention runs in query blocks, with
        // fewer, equal and more keys than queries.
        (&[300, 32], &[300, 32], &[300, 16]),
        (&[2, 200, 32], &[2, 70, 32], &[2, 70, 24]),
        (&[2, 2, 129, 16], &[2, 2, 500, 16], &[2, 2, 500, 16]),
        (&[0, 8], &[4, 8], &[4, 2]),
        (&[0, 3, 4, 8], &[4, 8], &[4, 2]),
        (&[3, 8], &[0, 8], &[0, 2]),
        (&[3, 8], &[4, 8], &[4, 0]),
        (&[3, 0], &[4, 0], &[4, 2]),
    ];
    for dtype in FLOATS {
        for &(q, k, v) in cases {
            for causal in [false, true] {
                let (cq, gq) = cx.input(dtype, q, Dist::Small);
                let (ck, gk) = cx.input(dtype, k, Dist::Small);
                let (cv, gv) = cx.input(dtype, v, Dist::Small);
                cx.check(
                    &format!("attention {dtype} q {q:?} k {k:?} v {v:?} causal {causal}"),
                    cx.cpu.attention(&cq, &ck, &cv, causal),
                    cx.gpu.attention(&gq, &gk, &gv, causal),
                    Tol::Frobenius,
                );
            }
        }
    }
}

/// Shapes the fused tensor-core kernel takes (bf16/f16, d = dv of 64 or
/// 128): both paths against the CPU, with query and key counts that are
/// not multiples of the kernel's 64-row tiles, fewer and more keys than
/// queries, and broadcast batch dims.
#[test]
#[ignore = "needs a CUDA GPU"]
fn parity_fused_attention_and_the_gemm_path() {
    let mut cx = Ctx::new();
    let gemm_path = cx
        .gpu
        .new_stream_backend()
        .unwrap()
        .with_fused_attention(false);
    let cases: &[(&[usize], &[usize], &[usize])] = &[
        (&[100, 64], &[100, 64], &[100, 64]),
        (&[2, 130, 128], &[2, 130, 128], &[2, 130, 128]),
        (&[2, 150, 64], &[2, 70, 64], &[2, 70, 64]),
        (&[70, 128], &[200, 128], &[200, 128]),
        (&[2, 1, 65, 64], &[1, 3, 129, 64], &[1, 3, 129, 64]),
        (&[64, 64], &[1, 64], &[1, 64]),
        (&[3, 1, 128], &[3, 5, 128], &[3, 5, 128]),
    ];
    for dtype in [DType::BF16, DType::F16] {
        for &(q, k, v) in cases {
            for causal in [false, true] {
                let (cq, gq) = cx.input(dtype, q, Dist::Small);
                let (ck, gk) = cx.input(dtype, k, Dist::Small);
                let (cv, gv) = cx.input(dtype, v, Dist::Small);
                let what = format!("attention {dtype} q {q:?} k {k:?} v {v:?} causal {causal}");
                cx.check(
                    &format!("{what} (fused)"),
                    cx.cpu.attention(&cq, &ck, &cv, causal),
                    cx.gpu.attention(&gq, &gk, &gv, causal),
                    Tol::Frobenius,
                );
                cx.check(
                    &format!("{what} (GEMMs)"),
                    cx.cpu.attention(&cq, &ck, &cv, causal),
                    gemm_path.attention(&gq, &gk, &gv, causal),
                    Tol::Frobenius,
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA GPU"]
fn parity_errors_have_the_same_variant_and_code() {
    let mut cx = Ctx::new();
    let (cf, gf) = cx.input(DType::F32, &[2, 3], Dist::Small);
    let (cg, gg) = cx.input(DType::F32, &[3, 2], Dist::Small);
    let (ci, gi) = cx.input(DType::I32, &[2, 3], Dist::Small);
    let (cu, gu) = cx.input(DType::U8, &[2, 3], Dist::Small);
    let (ce, ge) = cx.input(DType::F32, &[2, 0], Dist::Small);
    let (cidx, gidx) = cx.upload(DType::I64, &[2], bytemuck::cast_slice(&[0i64, 5]));
    let (cv, gv) = cx.input(DType::F32, &[4], Dist::Small);
    type Case<'a> = (
        &'a str,
        Box<dyn Fn(&dyn Backend, bool) -> Result<Tensor> + 'a>,
    );
    let cases: Vec<Case<'_>> = vec![
        (
            "binary shapes",
            Box::new(|b, gpu| {
                b.binary(
                    BinaryOp::Add,
                    if gpu { &gf } else { &cf },
                    if gpu { &gg } else { &cg },
                )
            }),
        ),
        (
            "binary dtypes",
            Box::new(|b, gpu| {
                b.binary(
                    BinaryOp::Add,
                    if gpu { &gf } else { &cf },
                    if gpu { &gi } else { &ci },
                )
            }),
        ),
        (
            "unary int",
            Box::new(|b, gpu| b.unary(UnaryOp::Exp, if gpu { &gi } else { &ci })),
        ),
        (
            "matmul inner",
            Box::new(|b, gpu| {
                let x = if gpu { &gf } else { &cf };
                b.matmul(x, x)
            }),
        ),
        (
            "matmul int",
            Box::new(|b, gpu| b.matmul(if gpu { &gi } else { &ci }, if gpu { &gi } else { &ci })),
        ),
        (
            "reduce axis",
            Box::new(|b, gpu| b.reduce(ReduceOp::Sum, if gpu { &gf } else { &cf }, 2, false)),
        ),
        (
            "max of empty axis",
            Box::new(|b, gpu| b.reduce(ReduceOp::Max, if gpu { &ge } else { &ce }, 1, false)),
        ),
        (
            "softmax u8",
            Box::new(|b, gpu| b.softmax(if gpu { &gu } else { &cu }, 0)),
        ),
        (
            "layer_norm gamma",
            Box::new(|b, gpu| {
                b.layer_norm(
                    if gpu { &gf } else { &cf },
                    Some(if gpu { &gv } else { &cv }),
                    None,
                    1e-5,
                )
            }),
        ),
        (
            "rms_norm dtype",
            Box::new(|b, gpu| b.rms_norm(if gpu { &gi } else { &ci }, None, 1e-5)),
        ),
        (
            "reshape count",
            Box::new(|b, gpu| b.reshape(if gpu { &gf } else { &cf }, &[4, 2])),
        ),
        (
            "reshape two -1",
            Box::new(|b, gpu| b.reshape(if gpu { &gf } else { &cf }, &[-1, -1])),
        ),
        (
            "transpose perm",
            Box::new(|b, gpu| b.transpose(if gpu { &gf } else { &cf }, &[0, 0])),
        ),
        (
            "gather out of range",
            Box::new(|b, gpu| {
                b.gather(if gpu { &gf } else { &cf }, if gpu { &gidx } else { &cidx })
            }),
        ),
        (
            "gather float indices",
            Box::new(|b, gpu| b.gather(if gpu { &gf } else { &cf }, if gpu { &gf } else { &cf })),
        ),
        (
            "concat shapes",
            Box::new(|b, gpu| {
                b.concat(if gpu { &gf } else { &cf }, if gpu { &gg } else { &cg }, 0)
            }),
        ),
        (
            "concat axis",
            Box::new(|b, gpu| {
                b.concat(if gpu { &gf } else { &cf }, if gpu { &gf } else { &cf }, 5)
            }),
        ),
        (
            "attention d",
            Box::new(|b, gpu| {
                let (x, y) = if gpu { (&gf, &gg) } else { (&cf, &cg) };
                b.attention(x, y, y, false)
            }),
        ),
        (
            "attention dtype",
            Box::new(|b, gpu| {
                let x = if gpu { &gi } else { &ci };
                b.attention(x, x, x, true)
            }),
        ),
        (
            "from_bytes length",
            Box::new(|b, _| b.from_bytes(DType::F32, &[2, 2], &[0u8; 15])),
        ),
        (
            "zeros too large",
            Box::new(|b, _| b.zeros(DType::F32, &[1 << 20, 1 << 20])),
        ),
        ("zeros rank", Box::new(|b, _| b.zeros(DType::F32, &[1; 9]))),
    ];
    for (what, f) in &cases {
        let c = f(&cx.cpu, false);
        let g = f(&cx.gpu, true);
        match (&c, &g) {
            (Err(ce), Err(ge)) => assert_same_error(what, ce, ge),
            _ => panic!("{what}: expected errors on both, got cpu {c:?} gpu {g:?}"),
        }
    }
    // Per-op work caps refuse the same calls.
    let small = Limits {
        max_op_work: 100,
        ..Limits::default()
    };
    let mut capped = Ctx::with_limits(small);
    let (ca, ga) = capped.input(DType::F32, &[10, 11], Dist::Small);
    let (cb, gb) = capped.input(DType::F32, &[11, 10], Dist::Small);
    capped.check(
        "matmul over the work cap",
        capped.cpu.matmul(&ca, &cb),
        capped.gpu.matmul(&ga, &gb),
        Tol::Frobenius,
    );
    capped.check(
        "unary over the work cap",
        capped.cpu.unary(UnaryOp::Exp, &ca),
        capped.gpu.unary(UnaryOp::Exp, &ga),
        Tol::Elementwise,
    );
    // A CPU tensor handed to the CUDA backend is refused, not read.
    let e = cx.gpu.unary(UnaryOp::Neg, &cf).unwrap_err();
    assert!(matches!(e, KernelError::WrongDevice { .. }), "{e:?}");
}
