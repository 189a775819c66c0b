//! Single-precision GEMM through the system's CBLAS (Debian's OpenBLAS).

use cblas_sys::{CBLAS_LAYOUT, CBLAS_TRANSPOSE, cblas_sgemm};

// The CBLAS symbols come from OpenBLAS; `cblas-sys` declares them without
// naming a library.
#[link(name = "openblas")]
unsafe extern "C" {
    fn openblas_set_num_threads(n: std::ffi::c_int);
}

/// Makes every sgemm run on its calling thread alone.
pub(crate) fn single_threaded() {
    // SAFETY: takes a plain integer; OpenBLAS applies it to calls made
    // after it returns.
    unsafe { openblas_set_num_threads(1) }
}

/// Largest extent CBLAS takes: its dims are C `int`.
pub(crate) const MAX_DIM: usize = i32::MAX as usize;

/// `c[m×n] = alpha · a[m×k] · b`, row-major, where `b` is `[k×n]`, or
/// `[n×k]` read transposed when `b_transposed`.
///
/// Panics if a slice is shorter than its matrix or a dim exceeds
/// [`MAX_DIM`]: callers size both from a validated plan, so either is a bug
/// here, not bad input.
// The argument list mirrors BLAS, minus what is derived from row-major layout.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    b: &[f32],
    b_transposed: bool,
    c: &mut [f32],
) {
    assert!(
        m <= MAX_DIM && n <= MAX_DIM && k <= MAX_DIM,
        "gemm dims over the CBLAS range"
    );
    assert!(
        a.len() >= m * k && b.len() >= k * n && c.len() >= m * n,
        "gemm operand too short"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c[..m * n].fill(0.0);
        return;
    }
    let (tb, ldb) = if b_transposed {
        (CBLAS_TRANSPOSE::CblasTrans, k)
    } else {
        (CBLAS_TRANSPOSE::CblasNoTrans, n)
    };
    // SAFETY: row-major A is m×k with lda = k, B is k×n (ldb = n) or n×k
    // transposed (ldb = k), C is m×n with ldc = n; the asserts above ensure
    // each slice holds at least that many elements and every dim fits a C
    // int, so OpenBLAS reads and writes only inside the slices. `c` is a
    // unique borrow, so nothing aliases the output.
    unsafe {
        cblas_sgemm(
            CBLAS_LAYOUT::CblasRowMajor,
            CBLAS_TRANSPOSE::CblasNoTrans,
            tb,
            m as i32,
            n as i32,
            k as i32,
            alpha,
            a.as_ptr(),
            k as i32,
            b.as_ptr(),
            ldb as i32,
            0.0,
            c.as_mut_ptr(),
            n as i32,
        );
    }
}
