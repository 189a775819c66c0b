// TensorWasm's own CUDA kernels (everything except GEMMs, which cuBLAS runs).
//
// Compiled at run time by NVRTC, once per process and GPU architecture, and
// cached on disk (see jit.rs). The source is self-contained on purpose: it
// includes no CUDA header (no cuda_fp16.h / cuda_bf16.h), so it compiles with
// nothing but libnvrtc. f16 and bf16 are carried as 16-bit patterns and
// converted with inline PTX (f16) or bit manipulation (bf16).
//
// Conventions every kernel follows:
// - Element counts, offsets and strides are 64-bit (`u64`); every loop is a
//   grid-stride loop, so any grid size is correct and the host caps the grid
//   well below gridDim.x's limit.
// - Kernels named `*_rows_*`, `layer_norm_*`, `rms_norm_*` and
//   `attn_softmax_*` use one block per row and must be launched with exactly
//   BLOCK threads per block (their shared-memory reductions assume it).
// - Arithmetic follows the CPU backend: f16/bf16 compute in f32 and round
//   once to nearest even; integer arithmetic wraps; integer division by zero
//   gives 0; float -> int conversion saturates and maps NaN to 0.
// - The argument order of every extern "C" kernel is mirrored exactly by its
//   launch site in ops.rs; change both together.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;
typedef int i32;
typedef float f32;

#define BLOCK 256
#define MAX_DIMS 16
#define TID ((u64)blockIdx.x * (u64)blockDim.x + (u64)threadIdx.x)
#define NTHREADS ((u64)blockDim.x * (u64)gridDim.x)

struct f16 { u16 bits; };
struct bf16 { u16 bits; };

// Dims and strides of a (coalesced) shape, passed by value.
struct Dims { u64 v[MAX_DIMS]; };

__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }
__device__ __forceinline__ float neg_inf() { return __int_as_float((int)0xff800000u); }
__device__ __forceinline__ bool is_nan(float x) { return x != x; }

// ---------------------------------------------------------------- f16 / bf16

__device__ __forceinline__ float f16_to_f32(u16 h) {
#ifdef TENSOR_WASM_CUDA_EMU  // the host-compiled emulation (kernels/cuda-emu)
  return emu_f16_to_f32(h);
#else
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
#endif
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
#ifdef TENSOR_WASM_CUDA_EMU
  return emu_f32_to_f16(f);
#else
  u16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
#endif
}

__device__ __forceinline__ float bf16_to_f32(u16 b) {
  return __uint_as_float(((u32)b) << 16);
}

// Round to nearest even; NaN stays NaN (quieted, sign and top payload kept),
// exactly as the `half` crate's bf16::from_f32.
__device__ __forceinline__ u16 f32_to_bf16(float f) {
  u32 u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    return (u16)((u >> 16) | 0x0040u);
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  return (u16)(u >> 16);
}

// ---------------------------------------------------------------- dtype traits
//
// F: the float compute type (float-like dtypes only).
// U: the unsigned type integer arithmetic wraps in.
// K: the comparison key of max/min/argmax (float for floats, i64 for ints).
// S: the sum accumulator (double for floats, as the CPU reference sums;
//    u64 wrapping for ints).

template <typename T> struct Ty;

template <> struct Ty<f32> {
  static const bool is_float = true;
  static const bool is_signed = true;
  typedef u32 U;
  typedef float K;
  typedef double S;
  __device__ static float to_f(f32 x) { return x; }
  __device__ static f32 from_f(float x) { return x; }
  __device__ static f32 from_bits(u64 b) { return __uint_as_float((u32)b); }
  __device__ static f32 zero() { return 0.0f; }
};

template <> struct Ty<f16> {
  static const bool is_float = true;
  static const bool is_signed = true;
  typedef u16 U;
  typedef float K;
  typedef double S;
  __device__ static float to_f(f16 x) { return f16_to_f32(x.bits); }
  __device__ static f16 from_f(float x) { f16 r; r.bits = f32_to_f16(x); return r; }
  __device__ static f16 from_bits(u64 b) { f16 r; r.bits = (u16)b; return r; }
  __device__ static f16 zero() { f16 r; r.bits = 0; return r; }
};

template <> struct Ty<bf16> {
  static const bool is_float = true;
  static const bool is_signed = true;
  typedef u16 U;
  typedef float K;
  typedef double S;
  __device__ static float to_f(bf16 x) { return bf16_to_f32(x.bits); }
  __device__ static bf16 from_f(float x) { bf16 r; r.bits = f32_to_bf16(x); return r; }
  __device__ static bf16 from_bits(u64 b) { bf16 r; r.bits = (u16)b; return r; }
  __device__ static bf16 zero() { bf16 r; r.bits = 0; return r; }
};

template <> struct Ty<i32> {
  static const bool is_float = false;
  static const bool is_signed = true;
  typedef u32 U;
  typedef i64 K;
  typedef u64 S;
  __device__ static i64 to_i64(i32 x) { return (i64)x; }
  __device__ static i32 wrap(u64 v) { return (i32)(u32)v; }
  __device__ static i32 from_bits(u64 b) { return (i32)(u32)b; }
  __device__ static i32 zero() { return 0; }
};

template <> struct Ty<i64> {
  static const bool is_float = false;
  static const bool is_signed = true;
  typedef u64 U;
  typedef i64 K;
  typedef u64 S;
  __device__ static i64 to_i64(i64 x) { return x; }
  __device__ static i64 wrap(u64 v) { return (i64)v; }
  __device__ static i64 from_bits(u64 b) { return (i64)b; }
  __device__ static i64 zero() { return 0; }
};

template <> struct Ty<u8> {
  static const bool is_float = false;
  static const bool is_signed = false;
  // u8 arithmetic wraps in u32, then truncates: 256 divides 2^32, so the
  // result is the same as wrapping in u8.
  typedef u32 U;
  typedef i64 K;
  typedef u64 S;
  __device__ static i64 to_i64(u8 x) { return (i64)x; }
  __device__ static u8 wrap(u64 v) { return (u8)v; }
  __device__ static u8 from_bits(u64 b) { return (u8)b; }
  __device__ static u8 zero() { return 0; }
};

// Four consecutive elements, aligned for one vector load or store.
template <typename T> struct alignas(4 * sizeof(T)) V4 { T v[4]; };

template <typename T>
__device__ __forceinline__ bool aligned4(const void* p) {
  return ((u64)p) % sizeof(V4<T>) == 0;
}

// ---------------------------------------------------------------- binary ops
// op codes: 0 add, 1 sub, 2 mul, 3 div, 4 max, 5 min, 6 pow (ops.rs BinaryOp).

__device__ __forceinline__ float fbin(int op, float a, float b) {
  switch (op) {
    case 0: return a + b;
    case 1: return a - b;
    case 2: return a * b;
    case 3: return a / b;
    case 4: return is_nan(a) ? a : (is_nan(b) ? b : (b > a ? b : a));
    case 5: return is_nan(a) ? a : (is_nan(b) ? b : (b < a ? b : a));
    default: return powf(a, b);
  }
}

template <typename T>
__device__ __forceinline__ T idiv(T a, T b) {
  typedef typename Ty<T>::U U;
  if (b == (T)0) return (T)0;
  // MIN / -1 overflows: the wrapping result is -MIN = MIN.
  if (Ty<T>::is_signed && (i64)b == -1) return (T)(U)((U)0 - (U)a);
  return (T)(a / b);
}

// a^b with wrapping multiplication; a negative exponent gives 1/a^|b|
// truncated toward zero: 0 unless |a| = 1.
template <typename T>
__device__ __forceinline__ T ipow(T a, T b) {
  typedef typename Ty<T>::U U;
  if (Ty<T>::is_signed && (i64)b < 0) {
    if ((i64)a == 1) return (T)1;
    if ((i64)a == -1) return (((U)b) & 1u) ? a : (T)1;
    return (T)0;
  }
  U base = (U)a;
  U e = (U)b;
  U r = 1u;
  while (e != 0u) {
    if (e & 1u) r = (U)(r * base);
    base = (U)(base * base);
    e >>= 1;
  }
  return (T)r;
}

template <typename T>
__device__ __forceinline__ T ibin(int op, T a, T b) {
  typedef typename Ty<T>::U U;
  switch (op) {
    case 0: return (T)(U)((U)a + (U)b);
    case 1: return (T)(U)((U)a - (U)b);
    case 2: return (T)(U)((U)a * (U)b);
    case 3: return idiv<T>(a, b);
    case 4: return b > a ? b : a;
    case 5: return b < a ? b : a;
    default: return ipow<T>(a, b);
  }
}

template <typename T>
__device__ __forceinline__ T binop(int op, T a, T b) {
  if constexpr (Ty<T>::is_float) {
    return Ty<T>::from_f(fbin(op, Ty<T>::to_f(a), Ty<T>::to_f(b)));
  } else {
    return ibin<T>(op, a, b);
  }
}

// out[i] = a[i] op b[i] over n elements (same shapes).
template <typename T>
__device__ __forceinline__ void binary_same_impl(int op, u64 n, const T* __restrict__ a,
                                                 const T* __restrict__ b, T* __restrict__ out) {
  const u64 tid = TID, nt = NTHREADS;
  u64 done = 0;
  if (aligned4<T>(a) && aligned4<T>(b) && aligned4<T>(out)) {
    const u64 nv = n / 4;
    const V4<T>* va = reinterpret_cast<const V4<T>*>(a);
    const V4<T>* vb = reinterpret_cast<const V4<T>*>(b);
    V4<T>* vo = reinterpret_cast<V4<T>*>(out);
    for (u64 i = tid; i < nv; i += nt) {
      const V4<T> x = va[i];
      const V4<T> y = vb[i];
      V4<T> r;
#pragma unroll
      for (int j = 0; j < 4; ++j) r.v[j] = binop<T>(op, x.v[j], y.v[j]);
      vo[i] = r;
    }
    done = nv * 4;
  }
  for (u64 i = done + tid; i < n; i += nt) out[i] = binop<T>(op, a[i], b[i]);
}

// Broadcasting: element i of the output reads a and b at offsets computed
// from the output dims and each operand's strides (0 along broadcast dims).
template <typename T>
__device__ __forceinline__ void binary_bcast_impl(int op, u64 n, u64 rank, const Dims& dims,
                                                  const Dims& sa, const Dims& sb,
                                                  const T* __restrict__ a,
                                                  const T* __restrict__ b,
                                                  T* __restrict__ out) {
  for (u64 i = TID; i < n; i += NTHREADS) {
    u64 rem = i, oa = 0, ob = 0;
    for (int d = (int)rank - 1; d >= 0; --d) {
      const u64 dim = dims.v[d];
      const u64 q = rem / dim;
      const u64 r = rem - q * dim;
      oa += r * sa.v[d];
      ob += r * sb.v[d];
      rem = q;
    }
    out[i] = binop<T>(op, a[oa], b[ob]);
  }
}

// out[i] = a[i] op s, where `bits` holds s already cast to T by the host.
template <typename T>
__device__ __forceinline__ void scalar_impl(int op, u64 n, const T* __restrict__ a, u64 bits,
                                            T* __restrict__ out) {
  const T s = Ty<T>::from_bits(bits);
  const u64 tid = TID, nt = NTHREADS;
  u64 done = 0;
  if (aligned4<T>(a) && aligned4<T>(out)) {
    const u64 nv = n / 4;
    const V4<T>* va = reinterpret_cast<const V4<T>*>(a);
    V4<T>* vo = reinterpret_cast<V4<T>*>(out);
    for (u64 i = tid; i < nv; i += nt) {
      const V4<T> x = va[i];
      V4<T> r;
#pragma unroll
      for (int j = 0; j < 4; ++j) r.v[j] = binop<T>(op, x.v[j], s);
      vo[i] = r;
    }
    done = nv * 4;
  }
  for (u64 i = done + tid; i < n; i += nt) out[i] = binop<T>(op, a[i], s);
}

// ---------------------------------------------------------------- unary ops
// op codes: 0 neg 1 exp 2 log 3 sqrt 4 tanh 5 sigmoid 6 relu 7 gelu 8 silu
// 9 abs, defined as UnaryOp::apply_f32 in ops.rs.

__device__ __forceinline__ float funary(int op, float x) {
  switch (op) {
    case 0: return -x;
    case 1: return expf(x);
    case 2: return logf(x);
    case 3: return sqrtf(x);
    case 4: return tanhf(x);
    case 5: return 1.0f / (1.0f + expf(-x));
    case 6: return x > 0.0f ? x : (is_nan(x) ? x : 0.0f);
    case 7: return 0.5f * x * (1.0f + erff(x * 0.70710678118654752440f));
    case 8: return x / (1.0f + expf(-x));
    default: return fabsf(x);
  }
}

template <typename T>
__device__ __forceinline__ void unary_impl(int op, u64 n, const T* __restrict__ a,
                                           T* __restrict__ out) {
  const u64 tid = TID, nt = NTHREADS;
  u64 done = 0;
  if (aligned4<T>(a) && aligned4<T>(out)) {
    const u64 nv = n / 4;
    const V4<T>* va = reinterpret_cast<const V4<T>*>(a);
    V4<T>* vo = reinterpret_cast<V4<T>*>(out);
    for (u64 i = tid; i < nv; i += nt) {
      const V4<T> x = va[i];
      V4<T> r;
#pragma unroll
      for (int j = 0; j < 4; ++j) r.v[j] = Ty<T>::from_f(funary(op, Ty<T>::to_f(x.v[j])));
      vo[i] = r;
    }
    done = nv * 4;
  }
  for (u64 i = done + tid; i < n; i += nt) out[i] = Ty<T>::from_f(funary(op, Ty<T>::to_f(a[i])));
}

// ---------------------------------------------------------------- casts

// float -> int saturates, NaN -> 0 (Rust's `as`).
template <typename D>
__device__ __forceinline__ D sat_from_float(float f);

template <> __device__ __forceinline__ i32 sat_from_float<i32>(float f) {
  if (is_nan(f)) return 0;
  if (f >= 2147483648.0f) return (i32)0x7fffffff;
  if (f <= -2147483648.0f) return (i32)0x80000000u;
  return (i32)f;
}

template <> __device__ __forceinline__ i64 sat_from_float<i64>(float f) {
  if (is_nan(f)) return 0;
  if (f >= 9223372036854775808.0f) return (i64)0x7fffffffffffffffull;
  if (f <= -9223372036854775808.0f) return (i64)0x8000000000000000ull;
  return (i64)f;
}

template <> __device__ __forceinline__ u8 sat_from_float<u8>(float f) {
  if (!(f > 0.0f)) return 0;  // NaN, negatives and zeros
  if (f >= 255.0f) return 255;
  return (u8)(u32)f;
}

// f64 -> bf16, rounding the whole mantissa to nearest even at once (no
// double rounding through f32). For finite values within bf16's normal
// range, which is all that integer sources produce.
__device__ __forceinline__ u16 f64_to_bf16(double d) {
  u64 u = (u64)__double_as_longlong(d);
  // Drop 45 of the 52 mantissa bits: add half an ulp minus one plus the
  // kept LSB, then clear; a carry into the exponent is the correct result.
  u += 0xFFFFFFFFFFFull + ((u >> 45) & 1ull);
  u &= ~0x1FFFFFFFFFFFull;
  // At most 8 significant bits now: exact in f32, and f32 -> bf16 is exact.
  return f32_to_bf16((float)__longlong_as_double((i64)u));
}

// int -> float as the CPU reference converts: the value as f64 (exact up
// to 2^53, rounded beyond, like Rust's `as f64`), then rounded once to
// nearest even into the target. f32 -> f16 after f64 -> f32 is still a
// single rounding: every integer that f16 can hold finitely (< 65520) is
// exact in f32, and larger ones overflow to infinity either way.
template <typename D>
__device__ __forceinline__ D int_to_float(i64 v);
template <> __device__ __forceinline__ f32 int_to_float<f32>(i64 v) { return (float)(double)v; }
template <> __device__ __forceinline__ f16 int_to_float<f16>(i64 v) {
  return Ty<f16>::from_f((float)(double)v);
}
template <> __device__ __forceinline__ bf16 int_to_float<bf16>(i64 v) {
  bf16 r;
  r.bits = f64_to_bf16((double)v);
  return r;
}

template <typename S, typename D>
__device__ __forceinline__ D convert(S x) {
  if constexpr (Ty<S>::is_float) {
    const float f = Ty<S>::to_f(x);
    if constexpr (Ty<D>::is_float) {
      return Ty<D>::from_f(f);
    } else {
      return sat_from_float<D>(f);
    }
  } else {
    const i64 v = Ty<S>::to_i64(x);
    if constexpr (Ty<D>::is_float) {
      return int_to_float<D>(v);
    } else {
      return Ty<D>::wrap((u64)v);
    }
  }
}

template <typename S, typename D>
__device__ __forceinline__ void cast_impl(u64 n, const S* __restrict__ x, D* __restrict__ y) {
  for (u64 i = TID; i < n; i += NTHREADS) y[i] = convert<S, D>(x[i]);
}

// ---------------------------------------------------------------- reductions

__device__ __forceinline__ float kmax(float a, float b) {
  return is_nan(a) ? a : (is_nan(b) ? b : (b > a ? b : a));
}
__device__ __forceinline__ float kmin(float a, float b) {
  return is_nan(a) ? a : (is_nan(b) ? b : (b < a ? b : a));
}
__device__ __forceinline__ i64 kmax(i64 a, i64 b) { return b > a ? b : a; }
__device__ __forceinline__ i64 kmin(i64 a, i64 b) { return b < a ? b : a; }
__device__ __forceinline__ bool knan(float a) { return is_nan(a); }
__device__ __forceinline__ bool knan(i64) { return false; }

template <typename T>
__device__ __forceinline__ typename Ty<T>::K to_key(T x) {
  if constexpr (Ty<T>::is_float) {
    return Ty<T>::to_f(x);
  } else {
    return Ty<T>::to_i64(x);
  }
}

template <typename T>
__device__ __forceinline__ T from_key(typename Ty<T>::K k) {
  if constexpr (Ty<T>::is_float) {
    return Ty<T>::from_f(k);
  } else {
    return Ty<T>::wrap((u64)k);
  }
}

template <typename T>
struct SumR {
  typedef typename Ty<T>::S A;
  typedef T Out;
  __device__ static A init() { return (A)0; }
  __device__ static A lift(T x, u64) {
    if constexpr (Ty<T>::is_float) {
      return (double)Ty<T>::to_f(x);
    } else {
      return (u64)Ty<T>::to_i64(x);
    }
  }
  __device__ static A comb(A a, A b) { return a + b; }
  __device__ static Out fin(A a, u64) {
    if constexpr (Ty<T>::is_float) {
      return Ty<T>::from_f((float)a);
    } else {
      return Ty<T>::wrap(a);
    }
  }
};

// Float mean = f64 sum / len (NaN for an empty axis); integer mean = the
// wrapping i64 sum / len truncated toward zero (0 for an empty axis).
template <typename T>
struct MeanR : SumR<T> {
  typedef typename Ty<T>::S A;
  typedef T Out;
  __device__ static Out fin(A a, u64 len) {
    if constexpr (Ty<T>::is_float) {
      return Ty<T>::from_f((float)(a / (double)len));
    } else {
      if (len == 0) return Ty<T>::zero();
      return Ty<T>::wrap((u64)((i64)a / (i64)len));
    }
  }
};

template <typename T>
struct MaxR {
  typedef typename Ty<T>::K A;
  typedef T Out;
  __device__ static A init() {
    if constexpr (Ty<T>::is_float) {
      return neg_inf();
    } else {
      return (i64)0x8000000000000000ull;
    }
  }
  __device__ static A lift(T x, u64) { return to_key<T>(x); }
  __device__ static A comb(A a, A b) { return kmax(a, b); }
  __device__ static Out fin(A a, u64) { return from_key<T>(a); }
};

template <typename T>
struct MinR {
  typedef typename Ty<T>::K A;
  typedef T Out;
  __device__ static A init() {
    if constexpr (Ty<T>::is_float) {
      return pos_inf();
    } else {
      return (i64)0x7fffffffffffffffull;
    }
  }
  __device__ static A lift(T x, u64) { return to_key<T>(x); }
  __device__ static A comb(A a, A b) { return kmin(a, b); }
  __device__ static Out fin(A a, u64) { return from_key<T>(a); }
};

template <typename K>
struct ArgAcc {
  K val;
  i64 idx;  // -1: no element seen
};

// First index of the maximum; NaN counts as the maximum. `comb` is
// commutative (ties go to the smaller index), so any reduction order gives
// the sequential answer.
template <typename T>
struct ArgMaxR {
  typedef typename Ty<T>::K K;
  typedef ArgAcc<K> A;
  typedef i64 Out;
  __device__ static A init() {
    A r;
    r.val = MaxR<T>::init();
    r.idx = -1;
    return r;
  }
  __device__ static A lift(T x, u64 j) {
    A r;
    r.val = to_key<T>(x);
    r.idx = (i64)j;
    return r;
  }
  __device__ static A comb(A a, A b) {
    if (a.idx < 0) return b;
    if (b.idx < 0) return a;
    const bool an = knan(a.val), bn = knan(b.val);
    if (an || bn) {
      if (an && bn) return a.idx < b.idx ? a : b;
      return an ? a : b;
    }
    if (a.val > b.val) return a;
    if (b.val > a.val) return b;
    return a.idx < b.idx ? a : b;
  }
  __device__ static Out fin(A a, u64) { return a.idx < 0 ? 0 : a.idx; }
};

struct FSum {
  typedef float A;
  __device__ static A comb(A a, A b) { return a + b; }
};
struct FMax {
  typedef float A;
  __device__ static A comb(A a, A b) { return kmax(a, b); }
};

// Reduces one value per thread across the block (blockDim.x == BLOCK); every
// thread gets the result. Ends with a barrier so the call can be repeated.
template <typename Op>
__device__ __forceinline__ typename Op::A block_reduce(typename Op::A v) {
  __shared__ typename Op::A sh[BLOCK];
  sh[threadIdx.x] = v;
  __syncthreads();
#pragma unroll
  for (unsigned s = BLOCK / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sh[threadIdx.x] = Op::comb(sh[threadIdx.x], sh[threadIdx.x + s]);
    __syncthreads();
  }
  const typename Op::A r = sh[0];
  __syncthreads();
  return r;
}

// As block_reduce, for the float ops (FSum, FMax) of the row kernels: warp
// shuffles, then one shared slot per warp, so a row costs two barriers
// rather than one per halving step. Every thread gets the result; ends with
// a barrier so the call can be repeated.
template <typename Op>
__device__ __forceinline__ float block_reduce_f(float v) {
  __shared__ float sh[BLOCK / 32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = Op::comb(v, __shfl_xor_sync(0xffffffffu, v, o));
  const unsigned warp = threadIdx.x >> 5, lane = threadIdx.x & 31u;
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  v = sh[lane < BLOCK / 32 ? lane : 0];
#pragma unroll
  for (int o = BLOCK / 64; o > 0; o >>= 1) v = Op::comb(v, __shfl_xor_sync(0xffffffffu, v, o));
  v = __shfl_sync(0xffffffffu, v, 0);
  __syncthreads();
  return v;
}

// Row kernels keep a row in registers when it has at most ROW_CACHE * BLOCK
// elements (8192): thread t holds elements t, t + BLOCK, ... so each pass
// after the first reads registers, not memory, and loads stay coalesced.
#define ROW_CACHE 32

// [rows, len] contiguous, reduced over len: one block per row.
template <typename T, typename Op>
__device__ __forceinline__ void reduce_rows_impl(u64 rows, u64 len, const T* __restrict__ x,
                                                 typename Op::Out* __restrict__ out) {
  for (u64 r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* row = x + r * len;
    typename Op::A acc = Op::init();
    for (u64 j = threadIdx.x; j < len; j += BLOCK) acc = Op::comb(acc, Op::lift(row[j], j));
    acc = block_reduce<Op>(acc);
    if (threadIdx.x == 0) out[r] = Op::fin(acc, len);
  }
}

// [outer, len, inner] reduced over len: one thread per output, reading
// consecutive `inner` positions across a warp (coalesced).
template <typename T, typename Op>
__device__ __forceinline__ void reduce_cols_impl(u64 outer, u64 len, u64 inner,
                                                 const T* __restrict__ x,
                                                 typename Op::Out* __restrict__ out) {
  const u64 n = outer * inner;
  for (u64 t = TID; t < n; t += NTHREADS) {
    const u64 o = t / inner;
    const u64 i = t - o * inner;
    const T* base = x + o * len * inner + i;
    typename Op::A acc = Op::init();
    for (u64 j = 0; j < len; ++j) acc = Op::comb(acc, Op::lift(base[j * inner], j));
    out[t] = Op::fin(acc, len);
  }
}

// ---------------------------------------------------------------- softmax

// The value subtracted before exp: the row maximum, or 0 when it is
// infinite (a row of -inf then gives 0/0 = NaN everywhere, and a row holding
// +inf gives NaN there and 0 elsewhere, as the CPU reference and PyTorch).
__device__ __forceinline__ float softmax_shift(float m) {
  return (m == pos_inf() || m == neg_inf()) ? 0.0f : m;
}

template <typename T>
__device__ __forceinline__ void softmax_rows_impl(u64 rows, u64 len, const T* __restrict__ x,
                                                  T* __restrict__ out) {
  if (len <= (u64)ROW_CACHE * BLOCK) {
    for (u64 r = blockIdx.x; r < rows; r += gridDim.x) {
      const T* row = x + r * len;
      T* orow = out + r * len;
      float v[ROW_CACHE];
      float m = neg_inf();
#pragma unroll
      for (int k = 0; k < ROW_CACHE; ++k) {
        const u64 j = threadIdx.x + (u64)k * BLOCK;
        v[k] = j < len ? Ty<T>::to_f(row[j]) : neg_inf();
        m = kmax(m, v[k]);
      }
      m = softmax_shift(block_reduce_f<FMax>(m));
      float s = 0.0f;
#pragma unroll
      for (int k = 0; k < ROW_CACHE; ++k) {
        if (threadIdx.x + (u64)k * BLOCK < len) {
          v[k] = expf(v[k] - m);
          s += v[k];
        }
      }
      s = block_reduce_f<FSum>(s);
#pragma unroll
      for (int k = 0; k < ROW_CACHE; ++k) {
        const u64 j = threadIdx.x + (u64)k * BLOCK;
        if (j < len) orow[j] = Ty<T>::from_f(v[k] / s);
      }
    }
    return;
  }
  for (u64 r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* row = x + r * len;
    T* orow = out + r * len;
    float m = neg_inf();
    for (u64 j = threadIdx.x; j < len; j += BLOCK) m = kmax(m, Ty<T>::to_f(row[j]));
    m = softmax_shift(block_reduce_f<FMax>(m));
    float s = 0.0f;
    for (u64 j = threadIdx.x; j < len; j += BLOCK) s += expf(Ty<T>::to_f(row[j]) - m);
    s = block_reduce_f<FSum>(s);
    for (u64 j = threadIdx.x; j < len; j += BLOCK) {
      orow[j] = Ty<T>::from_f(expf(Ty<T>::to_f(row[j]) - m) / s);
    }
  }
}

template <typename T>
__device__ __forceinline__ void softmax_cols_impl(u64 outer, u64 len, u64 inner,
                                                  const T* __restrict__ x, T* __restrict__ out) {
  const u64 n = outer * inner;
  for (u64 t = TID; t < n; t += NTHREADS) {
    const u64 o = t / inner;
    const u64 i = t - o * inner;
    const u64 base = o * len * inner + i;
    float m = neg_inf();
    for (u64 j = 0; j < len; ++j) m = kmax(m, Ty<T>::to_f(x[base + j * inner]));
    m = softmax_shift(m);
    float s = 0.0f;
    for (u64 j = 0; j < len; ++j) s += expf(Ty<T>::to_f(x[base + j * inner]) - m);
    for (u64 j = 0; j < len; ++j) {
      out[base + j * inner] = Ty<T>::from_f(expf(Ty<T>::to_f(x[base + j * inner]) - m) / s);
    }
  }
}

// Attention probabilities: `s` holds f32 scores [rows = batch * lq, lk]
// (already scaled); row r is query r % lq. With `causal`, key j > query i is
// masked out (probability 0). Writes p in T; for T = f32, p may alias s
// (each thread reads its own elements before writing them, and the block
// barriers separate the reading passes from the writing one). Queries go in
// blocks of `qblock` rows (lq when not causal); the row of query i is
// written up to the end of its block's visible keys, min(lk, (i / qblock +
// 1) * qblock), the columns the block's p·v reads; the rest stays unwritten.
template <typename T>
__device__ __forceinline__ void attn_softmax_impl(u64 rows, u64 lq, u64 lk, u64 qblock,
                                                  int causal, const float* s, T* p) {
  for (u64 r = blockIdx.x; r < rows; r += gridDim.x) {
    const u64 qi = r % lq;
    const u64 valid = (causal && qi + 1 < lk) ? qi + 1 : lk;
    const u64 block_end = (qi / qblock + 1) * qblock;
    const u64 written = (causal && block_end < lk) ? block_end : lk;
    const float* srow = s + r * lk;
    T* prow = p + r * lk;
    float m = neg_inf();
    for (u64 j = threadIdx.x; j < valid; j += BLOCK) m = kmax(m, srow[j]);
    m = block_reduce_f<FMax>(m);
    float sum = 0.0f;
    for (u64 j = threadIdx.x; j < valid; j += BLOCK) sum += expf(srow[j] - m);
    sum = block_reduce_f<FSum>(sum);
    for (u64 j = threadIdx.x; j < written; j += BLOCK) {
      const float e = j < valid ? expf(srow[j] - m) / sum : 0.0f;
      prow[j] = Ty<T>::from_f(e);
    }
  }
}

// ---------------------------------------------------------------- norms

template <typename T>
__device__ __forceinline__ void layer_norm_impl(u64 rows, u64 cols, const T* __restrict__ x,
                                                const T* __restrict__ gamma,
                                                const T* __restrict__ beta, float eps,
                                                T* __restrict__ out) {
  if (cols <= (u64)ROW_CACHE * BLOCK) {
    for (u64 r = blockIdx.x; r < rows; r += gridDim.x) {
      const T* row = x + r * cols;
      T* orow = out + r * cols;
      float v[ROW_CACHE];
      float s = 0.0f;
#pragma unroll
      for (int k = 0; k < ROW_CACHE; ++k) {
        const u64 j = threadIdx.x + (u64)k * BLOCK;
        v[k] = j < cols ? Ty<T>::to_f(row[j]) : 0.0f;
        s += v[k];
      }
      const float mean = block_reduce_f<FSum>(s) / (float)cols;
      float var = 0.0f;
#pragma unroll
      for (int k = 0; k < ROW_CACHE; ++k) {
        if (threadIdx.x + (u64)k * BLOCK < cols) {
          const float d = v[k] - mean;
          var += d * d;
        }
      }
      const float inv = 1.0f / sqrtf(block_reduce_f<FSum>(var) / (float)cols + eps);
#pragma unroll
      for (int k = 0; k < ROW_CACHE; ++k) {
        const u64 j = threadIdx.x + (u64)k * BLOCK;
        if (j < cols) {
          float y = (v[k] - mean) * inv;
          if (gamma != nullptr) y *= Ty<T>::to_f(gamma[j]);
          if (beta != nullptr) y += Ty<T>::to_f(beta[j]);
          orow[j] = Ty<T>::from_f(y);
        }
      }
    }
    return;
  }
  for (u64 r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* row = x + r * cols;
    T* orow = out + r * cols;
    float s = 0.0f;
    for (u64 j = threadIdx.x; j < cols; j += BLOCK) s += Ty<T>::to_f(row[j]);
    const float mean = block_reduce_f<FSum>(s) / (float)cols;
    float v = 0.0f;
    for (u64 j = threadIdx.x; j < cols; j += BLOCK) {
      const float d = Ty<T>::to_f(row[j]) - mean;
      v += d * d;
    }
    const float var = block_reduce_f<FSum>(v) / (float)cols;
    const float inv = 1.0f / sqrtf(var + eps);
    for (u64 j = threadIdx.x; j < cols; j += BLOCK) {
      float y = (Ty<T>::to_f(row[j]) - mean) * inv;
      if (gamma != nullptr) y *= Ty<T>::to_f(gamma[j]);
      if (beta != nullptr) y += Ty<T>::to_f(beta[j]);
      orow[j] = Ty<T>::from_f(y);
    }
  }
}

template <typename T>
__device__ __forceinline__ void rms_norm_impl(u64 rows, u64 cols, const T* __restrict__ x,
                                              const T* __restrict__ gamma, float eps,
                                              T* __restrict__ out) {
  for (u64 r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* row = x + r * cols;
    T* orow = out + r * cols;
    float s = 0.0f;
    for (u64 j = threadIdx.x; j < cols; j += BLOCK) {
      const float v = Ty<T>::to_f(row[j]);
      s += v * v;
    }
    const float ms = block_reduce_f<FSum>(s) / (float)cols;
    const float inv = 1.0f / sqrtf(ms + eps);
    for (u64 j = threadIdx.x; j < cols; j += BLOCK) {
      float y = Ty<T>::to_f(row[j]) * inv;
      if (gamma != nullptr) y *= Ty<T>::to_f(gamma[j]);
      orow[j] = Ty<T>::from_f(y);
    }
  }
}

// ---------------------------------------------------------------- layout
// Dtype-agnostic copies, by element size E (u8, u16, u32, u64).

// out (contiguous, `dims`) [i] = in[sum of index_d * strides_d].
template <typename E>
__device__ __forceinline__ void permute_impl(u64 n, u64 rank, const Dims& dims,
                                             const Dims& strides, const E* __restrict__ in,
                                             E* __restrict__ out) {
  for (u64 i = TID; i < n; i += NTHREADS) {
    u64 rem = i, off = 0;
    for (int d = (int)rank - 1; d >= 0; --d) {
      const u64 dim = dims.v[d];
      const u64 q = rem / dim;
      off += (rem - q * dim) * strides.v[d];
      rem = q;
    }
    out[i] = in[off];
  }
}

// [outer, ab] and [outer, bb] side by side into [outer, ab + bb].
template <typename E>
__device__ __forceinline__ void concat_impl(u64 outer, u64 ab, u64 bb, const E* __restrict__ a,
                                            const E* __restrict__ b, E* __restrict__ out) {
  const u64 w = ab + bb;
  const u64 n = outer * w;
  for (u64 e = TID; e < n; e += NTHREADS) {
    const u64 o = e / w;
    const u64 j = e - o * w;
    out[e] = j < ab ? a[o * ab + j] : b[o * bb + (j - ab)];
  }
}

// out[c, :] = table[idx[c], :]. An index outside 0..rows sets *bad = 1 (the
// host reads the flag and fails the op) and its row is written as zeros, so
// no read ever leaves the table. `per_block`: one block per index, for long
// rows; otherwise one thread per output element.
template <typename E, typename I>
__device__ __forceinline__ void gather_impl(u64 count, u64 rows, u64 row_len, int per_block,
                                            const I* __restrict__ idx,
                                            const E* __restrict__ table, E* __restrict__ out,
                                            u32* bad) {
  for (u64 c = TID; c < count; c += NTHREADS) {
    const i64 k = (i64)idx[c];
    if (k < 0 || (u64)k >= rows) *bad = 1u;
  }
  if (per_block) {
    for (u64 c = blockIdx.x; c < count; c += gridDim.x) {
      const i64 k = (i64)idx[c];
      const bool ok = k >= 0 && (u64)k < rows;
      E* orow = out + c * row_len;
      const E* trow = table + (ok ? (u64)k * row_len : 0);
      for (u64 j = threadIdx.x; j < row_len; j += blockDim.x) orow[j] = ok ? trow[j] : (E)0;
    }
  } else {
    const u64 n = count * row_len;
    for (u64 e = TID; e < n; e += NTHREADS) {
      const u64 c = e / row_len;
      const u64 j = e - c * row_len;
      const i64 k = (i64)idx[c];
      out[e] = (k >= 0 && (u64)k < rows) ? table[(u64)k * row_len + j] : (E)0;
    }
  }
}

// ---------------------------------------------------------------- fused attention
//
// Flash attention for bf16/f16 with head size D (64 or 128) on tensor cores
// (mma.sync m16n8k16, sm_80 and later): scores and probabilities never
// leave registers. A block of FA_THREADS threads (4 warps) takes FA_BM
// queries of one batch entry, 16 per warp, and walks the keys FA_BN at a
// time through shared memory with an online softmax (running maximum and
// sum per row, in base 2). K and V fragments come from shared memory by
// ldmatrix (V transposed on the way), whose padded rows fall into distinct
// banks. Query i sees key j when j < lk and, causal, j <=
// i: the CPU reference's (top-left aligned) mask. Probabilities are rounded
// to the dtype before the P·V product, as the unfused path rounds them;
// accumulation is f32. Rows past lq are computed but not written.
//
// Fragment layouts are the PTX ISA's for m16n8k16 (g = lane / 4, t = lane
// % 4): A (16×16, row-major) a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 =
// (g, 2t+8..), a3 = (g+8, 2t+8..); B (16×8, k×n) b0 = (k 2t..2t+1, n g),
// b1 = (k 2t+8.., n g); C (16×8, f32) c0 = (g, 2t), c1 = (g, 2t+1), c2 =
// (g+8, 2t), c3 = (g+8, 2t+1). Two adjacent C tiles of scores are, as
// they stand, the A fragment of the probabilities for the next product.

#define FA_BM 64
#define FA_BN 64
#define FA_THREADS 128

template <typename A, typename B> struct Same { static const bool value = false; };
template <typename A> struct Same<A, A> { static const bool value = true; };

template <typename T>
__device__ __forceinline__ void mma_16816(float c[4], const u32 a[4], u32 b0, u32 b1) {
#ifdef TENSOR_WASM_CUDA_EMU
  const u32 b[2] = {b0, b1};
  emu::mma_m16n8k16(c, a, b, Same<T, bf16>::value);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (Same<T, bf16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  __trap();  // the host launches this only on sm_80 and later
#endif
}

// ldmatrix.m8n8.x4 (`TRANS`: .trans) from shared memory: lane l gives the
// address of row l % 8 of matrix l / 8 (16-byte aligned); r[i] gets matrix
// i's fragment, which is an mma B fragment half (b0 or b1) as laid out.
template <bool TRANS>
__device__ __forceinline__ void ldsm_x4(u32 r[4], const u16* row) {
#ifdef TENSOR_WASM_CUDA_EMU
  emu::ldmatrix_x4(r, row, TRANS);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  u32 a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(row));
  if constexpr (TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
  }
#else
  (void)r;
  (void)row;
  __trap();
#endif
}

// Two floats rounded to T, the first in the low 16 bits.
template <typename T>
__device__ __forceinline__ u32 pack2(float lo, float hi) {
  return (u32)Ty<T>::from_f(lo).bits | ((u32)Ty<T>::from_f(hi).bits << 16);
}

template <typename T, int D>
__device__ __forceinline__ void flash_attn_impl(u64 lq, u64 lk, int causal, float scale_log2,
                                                const T* __restrict__ q,
                                                const T* __restrict__ k,
                                                const T* __restrict__ v, T* __restrict__ out,
                                                u64 q_step, u64 k_step, u64 v_step, u64 o_step) {
  // Shared rows are padded by 8 elements, so that the fragment loads of a
  // warp fall into distinct banks.
  constexpr int LD = D + 8;
  __shared__ V4<u32> ks_v[FA_BN * LD / 8];
  __shared__ V4<u32> vs_v[FA_BN * LD / 8];
  u16* ks = reinterpret_cast<u16*>(ks_v);
  u16* vs = reinterpret_cast<u16*>(vs_v);

  const u64 z = blockIdx.y;
  const u16* qb = reinterpret_cast<const u16*>(q + z * q_step);
  const u16* kb = reinterpret_cast<const u16*>(k + z * k_step);
  const u16* vb = reinterpret_cast<const u16*>(v + z * v_step);
  u16* ob = reinterpret_cast<u16*>(out + z * o_step);
  const unsigned warp = threadIdx.x >> 5, lane = threadIdx.x & 31u;
  const unsigned g = lane >> 2, t = lane & 3u;
  const u64 q0 = (u64)blockIdx.x * FA_BM + warp * 16u;

  // This warp's 16 query rows as A fragments, one per 16 columns of D.
  u32 qa[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const u64 row = q0 + g + ((r & 1) ? 8u : 0u);
      const u64 col = (u64)kk * 16 + 2 * t + ((r & 2) ? 8u : 0u);
      qa[kk][r] = row < lq ? *reinterpret_cast<const u32*>(qb + row * D + col) : 0u;
    }
  }

  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float m[2] = {neg_inf(), neg_inf()};  // running maxima, rows g and g + 8
  float l[2] = {0.0f, 0.0f};            // this thread's share of the row sums

  // Causal: the block's last query sees keys up to its own index.
  const u64 first = (u64)blockIdx.x * FA_BM;
  const u64 last_row = (lq - first < FA_BM ? lq : first + FA_BM) - 1;
  const u64 kend = (causal && last_row + 1 < lk) ? last_row + 1 : lk;

  for (u64 k0 = 0; k0 < kend; k0 += FA_BN) {
    __syncthreads();  // every warp is done with the previous tile
    for (unsigned i = threadIdx.x; i < FA_BN * D / 8; i += FA_THREADS) {
      const unsigned r = i / (D / 8), c = i % (D / 8);
      const u64 key = k0 + r;
      V4<u32> kv, vv;
      kv.v[0] = kv.v[1] = kv.v[2] = kv.v[3] = 0u;
      vv = kv;
      if (key < lk) {
        kv = *reinterpret_cast<const V4<u32>*>(kb + key * D + c * 8);
        vv = *reinterpret_cast<const V4<u32>*>(vb + key * D + c * 8);
      }
      ks_v[(r * LD + c * 8) / 8] = kv;
      vs_v[(r * LD + c * 8) / 8] = vv;
    }
    __syncthreads();

    // Scores of 16 rows × FA_BN keys. One ldmatrix gives the B fragments
    // of keys n*8.. for two 16-column steps of D: lane l addresses key
    // n*8 + l % 8 at column 32*kk2 + 8*(l / 8).
    float sc[FA_BN / 8][4];
#pragma unroll
    for (int n = 0; n < FA_BN / 8; ++n) {
      sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.0f;
      const u16* krow = ks + (n * 8 + (lane & 7u)) * LD + (lane >> 3) * 8;
#pragma unroll
      for (int kk2 = 0; kk2 < D / 32; ++kk2) {
        u32 b[4];
        ldsm_x4<false>(b, krow + kk2 * 32);
        mma_16816<T>(sc[n], qa[2 * kk2], b[0], b[1]);
        mma_16816<T>(sc[n], qa[2 * kk2 + 1], b[2], b[3]);
      }
    }

    // Scale (into base 2), mask, and the new row maxima.
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int n = 0; n < FA_BN / 8; ++n) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const u64 key = k0 + n * 8 + 2 * t + (r & 1);
        const u64 row = q0 + g + (r >= 2 ? 8u : 0u);
        float x = sc[n][r] * scale_log2;
        if (key >= lk || (causal && key > row)) x = neg_inf();
        sc[n][r] = x;
        mx[r >> 1] = fmaxf(mx[r >> 1], x);
      }
    }
    float corr[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
      // A row with no visible key yet keeps m = -inf; 0 stands in for it
      // so that exp2 gives 0, never NaN.
      const float base = mx[h] == neg_inf() ? 0.0f : mx[h];
      corr[h] = exp2f(m[h] - base);
      m[h] = mx[h];
      mx[h] = base;
    }
#pragma unroll
    for (int n = 0; n < FA_BN / 8; ++n) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        sc[n][r] = exp2f(sc[n][r] - mx[r >> 1]);
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) l[h] *= corr[h];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      o[n][0] *= corr[0];
      o[n][1] *= corr[0];
      o[n][2] *= corr[1];
      o[n][3] *= corr[1];
    }

    // O += P·V, P rounded to T (the row sums add the rounded values, so
    // that the weights sum to exactly 1 after the division).
#pragma unroll
    for (int kk = 0; kk < FA_BN / 16; ++kk) {
      u32 pa[4];
      pa[0] = pack2<T>(sc[2 * kk][0], sc[2 * kk][1]);
      pa[1] = pack2<T>(sc[2 * kk][2], sc[2 * kk][3]);
      pa[2] = pack2<T>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
      pa[3] = pack2<T>(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        l[r & 1] += Ty<T>::to_f(Ty<T>::from_bits(pa[r] & 0xFFFFu)) +
                    Ty<T>::to_f(Ty<T>::from_bits(pa[r] >> 16));
      }
      // One transposing ldmatrix gives the B fragments of two 8-column
      // tiles of V: lane l addresses key kk*16 + l % 16 at column
      // 16*n2 + 8*(l / 16).
      const u16* vrow = vs + (kk * 16 + (lane & 15u)) * LD + (lane >> 4) * 8;
#pragma unroll
      for (int n2 = 0; n2 < D / 16; ++n2) {
        u32 b[4];
        ldsm_x4<true>(b, vrow + n2 * 16);
        mma_16816<T>(o[2 * n2], pa, b[0], b[1]);
        mma_16816<T>(o[2 * n2 + 1], pa, b[2], b[3]);
      }
    }
  }

  // Row sums over the four threads of each group, then the output rows.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const u64 row = q0 + g + (h ? 8u : 0u);
    if (row >= lq) continue;
    const float inv = 1.0f / l[h];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      *reinterpret_cast<u32*>(ob + row * D + n * 8 + 2 * t) =
          pack2<T>(o[n][2 * h] * inv, o[n][2 * h + 1] * inv);
    }
  }
}

// ---------------------------------------------------------------- entry points

#define FOR_ALL_DTYPES(X) X(f32) X(f16) X(bf16) X(i32) X(i64) X(u8)
#define FOR_FLOAT_DTYPES(X) X(f32) X(f16) X(bf16)
#define FOR_ELEM_SIZES(X) X(1, u8) X(2, u16) X(4, u32) X(8, u64)
#define FOR_FLASH(X) X(bf16, 64) X(bf16, 128) X(f16, 64) X(f16, 128)

#define DEF_ELEMENTWISE(T)                                                                     \
  extern "C" __global__ void binary_same_##T(int op, u64 n, const T* __restrict__ a,          \
                                             const T* __restrict__ b, T* __restrict__ out) {  \
    binary_same_impl<T>(op, n, a, b, out);                                                     \
  }                                                                                            \
  extern "C" __global__ void binary_bcast_##T(int op, u64 n, u64 rank, Dims dims, Dims sa,    \
                                              Dims sb, const T* __restrict__ a,               \
                                              const T* __restrict__ b, T* __restrict__ out) { \
    binary_bcast_impl<T>(op, n, rank, dims, sa, sb, a, b, out);                                \
  }                                                                                            \
  extern "C" __global__ void scalar_##T(int op, u64 n, const T* __restrict__ a, u64 bits,     \
                                        T* __restrict__ out) {                                 \
    scalar_impl<T>(op, n, a, bits, out);                                                       \
  }

#define DEF_REDUCE_OP(T, NAME, OP)                                                             \
  extern "C" __global__ void __launch_bounds__(BLOCK)                                          \
      reduce_rows_##NAME##_##T(u64 rows, u64 len, const T* __restrict__ x,                     \
                               OP<T>::Out* __restrict__ out) {                                 \
    reduce_rows_impl<T, OP<T> >(rows, len, x, out);                                            \
  }                                                                                            \
  extern "C" __global__ void reduce_cols_##NAME##_##T(u64 outer, u64 len, u64 inner,          \
                                                      const T* __restrict__ x,                 \
                                                      OP<T>::Out* __restrict__ out) {          \
    reduce_cols_impl<T, OP<T> >(outer, len, inner, x, out);                                    \
  }

#define DEF_REDUCE(T)                \
  DEF_REDUCE_OP(T, sum, SumR)        \
  DEF_REDUCE_OP(T, mean, MeanR)      \
  DEF_REDUCE_OP(T, max, MaxR)        \
  DEF_REDUCE_OP(T, min, MinR)        \
  DEF_REDUCE_OP(T, argmax, ArgMaxR)

#define DEF_CAST(S, D)                                                                         \
  extern "C" __global__ void cast_##S##_##D(u64 n, const S* __restrict__ x,                   \
                                            D* __restrict__ y) {                               \
    cast_impl<S, D>(n, x, y);                                                                  \
  }

#define DEF_CAST_FROM(S) \
  DEF_CAST(S, f32) DEF_CAST(S, f16) DEF_CAST(S, bf16) DEF_CAST(S, i32) DEF_CAST(S, i64) DEF_CAST(S, u8)

#define DEF_FLOAT(T)                                                                           \
  extern "C" __global__ void unary_##T(int op, u64 n, const T* __restrict__ a,                \
                                       T* __restrict__ out) {                                  \
    unary_impl<T>(op, n, a, out);                                                              \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(BLOCK)                                          \
      softmax_rows_##T(u64 rows, u64 len, const T* __restrict__ x, T* __restrict__ out) {      \
    softmax_rows_impl<T>(rows, len, x, out);                                                   \
  }                                                                                            \
  extern "C" __global__ void softmax_cols_##T(u64 outer, u64 len, u64 inner,                  \
                                              const T* __restrict__ x, T* __restrict__ out) { \
    softmax_cols_impl<T>(outer, len, inner, x, out);                                           \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(BLOCK)                                          \
      layer_norm_##T(u64 rows, u64 cols, const T* __restrict__ x, const T* __restrict__ gamma, \
                     const T* __restrict__ beta, float eps, T* __restrict__ out) {             \
    layer_norm_impl<T>(rows, cols, x, gamma, beta, eps, out);                                  \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(BLOCK)                                          \
      rms_norm_##T(u64 rows, u64 cols, const T* __restrict__ x, const T* __restrict__ gamma,   \
                   float eps, T* __restrict__ out) {                                           \
    rms_norm_impl<T>(rows, cols, x, gamma, eps, out);                                          \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(BLOCK)                                          \
      attn_softmax_##T(u64 rows, u64 lq, u64 lk, u64 qblock, int causal, const float* s,       \
                       T* p) {                                                                 \
    attn_softmax_impl<T>(rows, lq, lk, qblock, causal, s, p);                                  \
  }

#define DEF_COPY(N, E)                                                                         \
  extern "C" __global__ void permute_##N(u64 n, u64 rank, Dims dims, Dims strides,            \
                                         const E* __restrict__ in, E* __restrict__ out) {      \
    permute_impl<E>(n, rank, dims, strides, in, out);                                          \
  }                                                                                            \
  extern "C" __global__ void concat_##N(u64 outer, u64 ab, u64 bb, const E* __restrict__ a,   \
                                        const E* __restrict__ b, E* __restrict__ out) {        \
    concat_impl<E>(outer, ab, bb, a, b, out);                                                  \
  }                                                                                            \
  extern "C" __global__ void gather_##N##_i32(u64 count, u64 rows, u64 row_len, int per_block, \
                                              const i32* __restrict__ idx,                     \
                                              const E* __restrict__ table,                     \
                                              E* __restrict__ out, u32* bad) {                 \
    gather_impl<E, i32>(count, rows, row_len, per_block, idx, table, out, bad);                \
  }                                                                                            \
  extern "C" __global__ void gather_##N##_i64(u64 count, u64 rows, u64 row_len, int per_block, \
                                              const i64* __restrict__ idx,                     \
                                              const E* __restrict__ table,                     \
                                              E* __restrict__ out, u32* bad) {                 \
    gather_impl<E, i64>(count, rows, row_len, per_block, idx, table, out, bad);                \
  }

FOR_ALL_DTYPES(DEF_ELEMENTWISE)
FOR_ALL_DTYPES(DEF_REDUCE)
FOR_ALL_DTYPES(DEF_CAST_FROM)
FOR_FLOAT_DTYPES(DEF_FLOAT)
FOR_ELEM_SIZES(DEF_COPY)

#define DEF_FLASH(T, D)                                                                        \
  extern "C" __global__ void __launch_bounds__(FA_THREADS)                                     \
      flash_attn_##T##_##D(u64 lq, u64 lk, int causal, float scale_log2,                       \
                           const T* __restrict__ q, const T* __restrict__ k,                   \
                           const T* __restrict__ v, T* __restrict__ out, u64 q_step,           \
                           u64 k_step, u64 v_step, u64 o_step) {                               \
    flash_attn_impl<T, D>(lq, lk, causal, scale_log2, q, k, v, out, q_step, k_step, v_step,    \
                          o_step);                                                             \
  }

FOR_FLASH(DEF_FLASH)
