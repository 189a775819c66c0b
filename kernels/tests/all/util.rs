//! Shared helpers: host-side tensors, random inputs, comparisons and error
//! checks. Everything here talks to a backend only through the [`Backend`]
//! trait, so the same tests can run against any backend.

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tensor_wasm_kernels::{Backend, CpuBackend, DType, KernelError, Limits, Result, Tensor};
use tensor_wasm_shared::AbiError;

pub const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];
pub const INTS: [DType; 3] = [DType::I32, DType::I64, DType::U8];

/// The backend under test, with default limits.
pub fn backend() -> CpuBackend {
    CpuBackend::default()
}

/// The backend under test, with the given limits.
pub fn backend_with(limits: Limits) -> CpuBackend {
    CpuBackend::new(limits)
}

// ---------------------------------------------------------------------------
// Host tensors
// ---------------------------------------------------------------------------

/// Element values held exactly: every f32, f16 and bf16 value is an f64, and
/// every i32, i64 and u8 value an i64.
#[derive(Clone, Debug, PartialEq)]
pub enum Vals {
    F(Vec<f64>),
    I(Vec<i64>),
}

/// A tensor on the host: what the reference computes on.
#[derive(Clone, Debug, PartialEq)]
pub struct Host {
    pub dtype: DType,
    pub dims: Vec<usize>,
    pub vals: Vals,
}

impl Host {
    /// A float tensor; values are rounded to `dtype` (so the host tensor
    /// holds exactly what the device will).
    pub fn f(dtype: DType, dims: &[usize], vals: Vec<f64>) -> Host {
        assert!(dtype.is_float(), "{dtype} is not a float dtype");
        assert_eq!(vals.len(), numel(dims), "{dims:?}");
        let vals = vals.into_iter().map(|v| round_float(dtype, v)).collect();
        Host {
            dtype,
            dims: dims.to_vec(),
            vals: Vals::F(vals),
        }
    }

    /// A float result of the reference: values are kept unrounded (f64).
    pub fn f_exact(dtype: DType, dims: &[usize], vals: Vec<f64>) -> Host {
        assert!(dtype.is_float(), "{dtype} is not a float dtype");
        assert_eq!(vals.len(), numel(dims), "{dims:?}");
        Host {
            dtype,
            dims: dims.to_vec(),
            vals: Vals::F(vals),
        }
    }

    /// An integer tensor; values wrap into `dtype`.
    pub fn i(dtype: DType, dims: &[usize], vals: Vec<i64>) -> Host {
        assert!(!dtype.is_float(), "{dtype} is not an integer dtype");
        assert_eq!(vals.len(), numel(dims), "{dims:?}");
        let vals = vals
            .into_iter()
            .map(|v| wrap_int(dtype, i128::from(v)))
            .collect();
        Host {
            dtype,
            dims: dims.to_vec(),
            vals: Vals::I(vals),
        }
    }

    pub fn numel(&self) -> usize {
        numel(&self.dims)
    }

    pub fn floats(&self) -> &[f64] {
        match &self.vals {
            Vals::F(v) => v,
            Vals::I(_) => panic!("{} tensor holds integers", self.dtype),
        }
    }

    pub fn ints(&self) -> &[i64] {
        match &self.vals {
            Vals::I(v) => v,
            Vals::F(_) => panic!("{} tensor holds floats", self.dtype),
        }
    }

    /// Element `i` as f64 (exact for floats, possibly rounded for i64).
    pub fn at_f64(&self, i: usize) -> f64 {
        match &self.vals {
            Vals::F(v) => v[i],
            Vals::I(v) => v[i] as f64,
        }
    }

    /// Little-endian row-major bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.numel() * self.dtype.size());
        match &self.vals {
            Vals::F(v) => {
                for &x in v {
                    match self.dtype {
                        DType::F32 => out.extend_from_slice(&(x as f32).to_le_bytes()),
                        DType::F16 => out.extend_from_slice(&to_f16(x).to_le_bytes()),
                        DType::BF16 => out.extend_from_slice(&to_bf16(x).to_le_bytes()),
                        d => unreachable!("{d}"),
                    }
                }
            }
            Vals::I(v) => {
                for &x in v {
                    match self.dtype {
                        DType::I32 => out.extend_from_slice(&(x as i32).to_le_bytes()),
                        DType::I64 => out.extend_from_slice(&x.to_le_bytes()),
                        DType::U8 => out.push(x as u8),
                        d => unreachable!("{d}"),
                    }
                }
            }
        }
        out
    }

    /// Decodes little-endian row-major bytes.
    pub fn from_bytes(dtype: DType, dims: &[usize], bytes: &[u8]) -> Host {
        assert_eq!(
            bytes.len(),
            numel(dims) * dtype.size(),
            "{dtype} {dims:?}: wrong byte count"
        );
        let chunks = bytes.chunks_exact(dtype.size());
        let vals = match dtype {
            DType::F32 => Vals::F(
                chunks
                    .map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap())))
                    .collect(),
            ),
            DType::F16 => Vals::F(
                chunks
                    .map(|c| f16::from_le_bytes(c.try_into().unwrap()).to_f64())
                    .collect(),
            ),
            DType::BF16 => Vals::F(
                chunks
                    .map(|c| bf16::from_le_bytes(c.try_into().unwrap()).to_f64())
                    .collect(),
            ),
            DType::I32 => Vals::I(
                chunks
                    .map(|c| i64::from(i32::from_le_bytes(c.try_into().unwrap())))
                    .collect(),
            ),
            DType::I64 => Vals::I(
                chunks
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            DType::U8 => Vals::I(bytes.iter().map(|&b| i64::from(b)).collect()),
        };
        Host {
            dtype,
            dims: dims.to_vec(),
            vals,
        }
    }
}

/// The element count of `dims` (0 whenever a dim is 0, even if the others
/// multiply past `usize::MAX`).
pub fn numel(dims: &[usize]) -> usize {
    if dims.contains(&0) {
        0
    } else {
        dims.iter().product()
    }
}

/// `v` (exactly an f32 value, or anything when only generating inputs)
/// rounded to the float `dtype`, nearest even.
pub fn round_float(dtype: DType, v: f64) -> f64 {
    match dtype {
        DType::F32 => f64::from(v as f32),
        DType::F16 => to_f16(v).to_f64(),
        DType::BF16 => to_bf16(v).to_f64(),
        d => panic!("{d} is not a float dtype"),
    }
}

// `half`'s f64 conversions are not correctly rounded (they go through f32 or
// drop low bits), so every conversion goes from an f32.
fn to_f16(v: f64) -> f16 {
    f16::from_f32(v as f32)
}

fn to_bf16(v: f64) -> bf16 {
    bf16::from_f32(v as f32)
}

/// `v` wrapped (two's complement) into the integer `dtype`.
pub fn wrap_int(dtype: DType, v: i128) -> i64 {
    let bits = match dtype {
        DType::U8 => 8,
        DType::I32 => 32,
        DType::I64 => 64,
        d => panic!("{d} is not an integer dtype"),
    };
    let modulus = 1i128 << bits;
    let r = v.rem_euclid(modulus);
    let r = if dtype != DType::U8 && r >= modulus / 2 {
        r - modulus
    } else {
        r
    };
    r as i64
}

/// The smallest and largest value of an integer dtype.
pub fn int_range(dtype: DType) -> (i64, i64) {
    match dtype {
        DType::U8 => (0, 255),
        DType::I32 => (i64::from(i32::MIN), i64::from(i32::MAX)),
        DType::I64 => (i64::MIN, i64::MAX),
        d => panic!("{d} is not an integer dtype"),
    }
}

// ---------------------------------------------------------------------------
// Moving tensors through the trait
// ---------------------------------------------------------------------------

pub fn upload(b: &dyn Backend, h: &Host) -> Tensor {
    b.from_bytes(h.dtype, &h.dims, &h.to_bytes())
        .unwrap_or_else(|e| panic!("from_bytes({} {:?}): {e}", h.dtype, h.dims))
}

pub fn download(b: &dyn Backend, t: &Tensor) -> Host {
    let bytes = b.to_bytes(t).expect("to_bytes");
    Host::from_bytes(t.dtype(), t.dims(), &bytes)
}

/// A float tensor from literal values.
pub fn ft(b: &dyn Backend, dtype: DType, dims: &[usize], vals: &[f64]) -> Tensor {
    upload(b, &Host::f(dtype, dims, vals.to_vec()))
}

/// An integer tensor from literal values.
pub fn it(b: &dyn Backend, dtype: DType, dims: &[usize], vals: &[i64]) -> Tensor {
    upload(b, &Host::i(dtype, dims, vals.to_vec()))
}

/// Runs `op` and asserts it left every operand's dims and bytes as they
/// were (ops must never write to their operands).
pub fn untouched<R>(b: &dyn Backend, operands: &[&Tensor], op: impl FnOnce() -> R) -> R {
    let before: Vec<_> = operands
        .iter()
        .map(|t| {
            (
                t.dtype(),
                t.dims().to_vec(),
                b.to_bytes(t).expect("to_bytes"),
            )
        })
        .collect();
    let r = op();
    for (i, (t, (dtype, dims, bytes))) in operands.iter().zip(before).enumerate() {
        assert_eq!(t.dtype(), dtype, "operand {i} changed dtype");
        assert_eq!(t.dims(), &dims[..], "operand {i} changed dims");
        assert!(
            b.to_bytes(t).expect("to_bytes") == bytes,
            "operand {i} ({dtype} {dims:?}) was modified by the op"
        );
    }
    r
}

// ---------------------------------------------------------------------------
// Random inputs
// ---------------------------------------------------------------------------

/// Seeded random values: proptest picks the shapes and a seed, this makes
/// the values (so that a failing case is reproduced by its seed).
#[derive(Debug)]
pub struct Gen(StdRng);

impl Gen {
    pub fn new(seed: u64) -> Gen {
        Gen(StdRng::seed_from_u64(seed))
    }

    pub fn rng(&mut self) -> &mut StdRng {
        &mut self.0
    }

    pub fn bool(&mut self, p: f64) -> bool {
        self.0.gen_bool(p)
    }

    /// Uniform float in `[lo, hi)`.
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        if lo >= hi {
            lo
        } else {
            self.0.gen_range(lo..hi)
        }
    }

    /// `n` floats uniform in `[lo, hi)`, rounded to `dtype`.
    pub fn floats(&mut self, dtype: DType, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..n)
            .map(|_| round_float(dtype, self.uniform(lo, hi)))
            .collect()
    }

    /// `n` integers of `dtype` over its whole range, with the edge values
    /// (min, max, 0, ±1) over-represented.
    pub fn ints(&mut self, dtype: DType, n: usize) -> Vec<i64> {
        let (lo, hi) = int_range(dtype);
        (0..n)
            .map(|_| match self.0.gen_range(0..10) {
                0 => lo,
                1 => hi,
                2 => 0,
                3 => 1,
                4 => wrap_int(dtype, -1),
                5 => self.0.gen_range(-10i64..=10).clamp(lo, hi),
                _ => self.0.gen_range(lo..=hi),
            })
            .collect()
    }

    /// `n` integers in `[lo, hi]` clamped to `dtype`'s range.
    pub fn ints_in(&mut self, dtype: DType, n: usize, lo: i64, hi: i64) -> Vec<i64> {
        let (dlo, dhi) = int_range(dtype);
        let (lo, hi) = (lo.max(dlo), hi.min(dhi));
        (0..n).map(|_| self.0.gen_range(lo..=hi)).collect()
    }

    /// A tensor of `dims`: floats uniform in `[lo, hi)`, integers over the
    /// whole range of the dtype.
    pub fn host(&mut self, dtype: DType, dims: &[usize], lo: f64, hi: f64) -> Host {
        let n = numel(dims);
        if dtype.is_float() {
            Host::f(dtype, dims, self.floats(dtype, n, lo, hi))
        } else {
            Host::i(dtype, dims, self.ints(dtype, n))
        }
    }

    /// A random permutation of `0..n`.
    pub fn perm(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.0.gen_range(0..=i);
            p.swap(i, j);
        }
        p
    }
}

/// Dims of a right-aligned suffix of `out`, each dim possibly replaced by 1:
/// a shape that broadcasts to `out`.
pub fn broadcastable_to(g: &mut Gen, out: &[usize]) -> Vec<usize> {
    let keep = g.rng().gen_range(0..=out.len());
    out[out.len() - keep..]
        .iter()
        .map(|&d| if g.bool(0.3) { 1 } else { d })
        .collect()
}

// ---------------------------------------------------------------------------
// Comparisons
// ---------------------------------------------------------------------------

/// The elementwise tolerance factor of a float dtype: |err| ≤ tol·(|ref|+1).
pub fn elem_tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 | DType::BF16 => 1e-2,
        _ => 0.0,
    }
}

/// The relative Frobenius tolerance of matmul and attention.
pub fn frob_tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        _ => 1e-2,
    }
}

fn same_special(got: f64, want: f64) -> bool {
    (got.is_nan() && want.is_nan()) || got == want
}

fn check_meta(what: &str, got: &Host, want: &Host) {
    assert_eq!(got.dtype, want.dtype, "{what}: dtype");
    assert_eq!(got.dims, want.dims, "{what}: dims");
}

/// Exact equality (NaN equals NaN; integers bit for bit).
pub fn assert_exact(what: &str, got: &Host, want: &Host) {
    check_meta(what, got, want);
    match (&got.vals, &want.vals) {
        (Vals::I(g), Vals::I(w)) => {
            if let Some(i) = (0..g.len()).find(|&i| g[i] != w[i]) {
                panic!(
                    "{what}: element {i} (index {:?}) is {}, expected {}",
                    crate::reference::unravel(i, &want.dims),
                    g[i],
                    w[i]
                );
            }
        }
        (Vals::F(g), Vals::F(w)) => {
            if let Some(i) = (0..g.len()).find(|&i| !same_special(g[i], w[i])) {
                panic!(
                    "{what}: element {i} (index {:?}) is {:e}, expected {:e}",
                    crate::reference::unravel(i, &want.dims),
                    g[i],
                    w[i]
                );
            }
        }
        _ => panic!("{what}: value kinds differ"),
    }
}

/// Elementwise closeness: |got − ref| ≤ tol_i·(|ref| + 1), where `tol_of(i)`
/// gives element i's tolerance factor. A reference value that overflows the
/// dtype (or is NaN/inf) must be matched exactly. Integers must be exact.
pub fn assert_close_by(what: &str, got: &Host, want: &Host, tol_of: impl Fn(usize) -> f64) {
    check_meta(what, got, want);
    let (g, w) = match (&got.vals, &want.vals) {
        (Vals::F(g), Vals::F(w)) => (g, w),
        _ => return assert_exact(what, got, want),
    };
    for i in 0..w.len() {
        let rounded = round_float(want.dtype, w[i]);
        let ok = if !rounded.is_finite() {
            same_special(g[i], rounded)
        } else {
            (g[i] - w[i]).abs() <= tol_of(i) * (w[i].abs() + 1.0)
        };
        assert!(
            ok,
            "{what}: element {i} (index {:?}) is {:e}, expected {:e} (tolerance {:e})",
            crate::reference::unravel(i, &want.dims),
            g[i],
            w[i],
            tol_of(i)
        );
    }
}

/// Elementwise closeness with the dtype's tolerance.
pub fn assert_close(what: &str, got: &Host, want: &Host) {
    let tol = elem_tol(want.dtype);
    assert_close_by(what, got, want, |_| tol);
}

/// The same tensor with every value replaced by its magnitude.
pub fn abs(h: &Host) -> Host {
    let vals = match &h.vals {
        Vals::F(v) => Vals::F(v.iter().map(|x| x.abs()).collect()),
        Vals::I(v) => Vals::I(v.iter().map(|x| x.abs()).collect()),
    };
    Host { vals, ..h.clone() }
}

/// ‖got − ref‖ ≤ tol·‖ref‖ + tol/10·‖terms‖ (Frobenius), with the dtype's
/// tolerance. `terms` is the reference computed on magnitudes (|A|·|B| for
/// a matmul): f32 accumulation errs by at most a few ε·Σ|term| per element,
/// so a sum that cancels to almost nothing is judged against its terms
/// rather than its tiny result. Every element must be finite where the
/// reference is.
pub fn assert_frobenius(what: &str, got: &Host, want: &Host, terms: &Host) {
    check_meta(what, got, want);
    let (g, w) = (got.floats(), want.floats());
    for i in 0..w.len() {
        assert!(
            g[i].is_finite() == w[i].is_finite(),
            "{what}: element {i} is {:e}, expected {:e}",
            g[i],
            w[i]
        );
    }
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let diff: f64 = g
        .iter()
        .zip(w)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f64>()
        .sqrt();
    let tol = frob_tol(want.dtype);
    let bound = tol * norm(w) + tol / 10.0 * norm(terms.floats());
    assert!(
        diff <= bound,
        "{what}: Frobenius error {diff:e} exceeds {bound:e} (relative {:e})\n got: {g:?}\nwant: {w:?}",
        diff / norm(w)
    );
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// The classes of [`KernelError`] a test expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    Shape,
    DTypeUnsupported,
    DTypeMismatch,
    Invalid,
    TooLarge,
    WorkCap,
}

impl Expect {
    pub fn abi(self) -> AbiError {
        match self {
            Expect::Shape => AbiError::ShapeMismatch,
            Expect::DTypeUnsupported | Expect::DTypeMismatch => AbiError::DTypeUnsupported,
            Expect::Invalid => AbiError::InvalidArgument,
            Expect::TooLarge | Expect::WorkCap => AbiError::QuotaExceeded,
        }
    }

    /// The guest-visible code, as `docs/GUEST-ABI.md` lists it.
    pub fn code(self) -> i32 {
        match self {
            Expect::Shape => -2,
            Expect::DTypeUnsupported | Expect::DTypeMismatch => -3,
            Expect::Invalid => -7,
            Expect::TooLarge | Expect::WorkCap => -5,
        }
    }

    fn matches(self, e: &KernelError) -> bool {
        match self {
            Expect::Shape => matches!(e, KernelError::ShapeMismatch { .. }),
            Expect::DTypeUnsupported => matches!(e, KernelError::DTypeUnsupported { .. }),
            Expect::DTypeMismatch => matches!(e, KernelError::DTypeMismatch { .. }),
            Expect::Invalid => matches!(e, KernelError::InvalidArgument { .. }),
            Expect::TooLarge => matches!(e, KernelError::TooLarge { .. }),
            Expect::WorkCap => matches!(e, KernelError::WorkCapExceeded { .. }),
        }
    }
}

/// Asserts `r` failed with the expected variant and ABI code.
#[track_caller]
pub fn expect_err<T: std::fmt::Debug>(what: &str, r: Result<T>, want: Expect) {
    match r {
        Ok(v) => panic!("{what}: expected {want:?}, got Ok({v:?})"),
        Err(e) => {
            assert!(want.matches(&e), "{what}: expected {want:?}, got {e:?}");
            assert_eq!(e.abi(), want.abi(), "{what}: ABI code of {e:?}");
            assert_eq!(e.abi().code(), want.code(), "{what}: ABI code of {e:?}");
        }
    }
}
