// The CUDA device-side language, as far as kernels.cu uses it, for the host
// compiler: thread and block indices, __syncthreads and warp shuffles, the
// bit-cast intrinsics. Included before kernels.cu by emu.cpp.
//
// Execution model: the launch runs one block at a time. Kernels with block
// barriers or warp shuffles run each thread of the block as a fiber
// (ucontext) and switch at every barrier; a warp shuffle is a barrier of the
// 32 lanes, resolved for all of them at once. Other kernels run thread after
// thread on the caller's stack. Divergent barriers (some threads at
// __syncthreads, others at a shuffle or finished) are reported as errors,
// as are barriers in kernels launched without fibers.

#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

struct EmuDim3 {
  unsigned x, y, z;
};

namespace emu {

// The running launch (launches are serialized by the driver).
extern EmuDim3 grid_dim, block_dim, block_idx;
// The running thread of the block.
extern EmuDim3 thread_idx;

// Block barrier; aborts the launch if called without fibers.
void sync_threads();
// Every lane of the calling warp contributes `v`; returns lane `src`'s value
// (`xor_mask` non-zero: lane ^ xor_mask).
uint64_t shuffle(uint64_t v, unsigned src, unsigned xor_mask, bool is_xor);
// One m16n8k16 tensor-core MMA of the calling warp (f32 accumulators, bf16
// or f16 inputs), with the fragment layouts of the PTX ISA: c += a·b.
void mma_m16n8k16(float c[4], const uint32_t a[4], const uint32_t b[2], bool bf16);
// ldmatrix.m8n8.x4(.trans).b16 of the calling warp: lane l gives the row
// address `row` of row l % 8 of matrix l / 8, and gets matrix i's fragment
// in r[i].
void ldmatrix_x4(uint32_t r[4], const void* row, bool trans);

}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __restrict__ __restrict
// One instance per block: blocks run one after another, never concurrently.
#define __shared__ static

inline void __trap() { abort(); }

inline void __syncthreads() { emu::sync_threads(); }

template <typename T>
inline uint64_t emu_bits(T v) {
  static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}

template <typename T>
inline T emu_from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  (void)mask;
  return emu_from_bits<T>(emu::shuffle(emu_bits(v), 0, (unsigned)lane_mask, true));
}

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane) {
  (void)mask;
  return emu_from_bits<T>(emu::shuffle(emu_bits(v), (unsigned)src_lane, 0, false));
}

inline float __int_as_float(int i) { return emu_from_bits<float>((uint32_t)i); }
inline float __uint_as_float(unsigned u) { return emu_from_bits<float>(u); }
inline unsigned __float_as_uint(float f) { return (unsigned)emu_bits(f); }
inline long long __double_as_longlong(double d) { return (long long)emu_bits(d); }
inline double __longlong_as_double(long long l) { return emu_from_bits<double>((uint64_t)l); }

// kernels.cu converts f16 with inline PTX; under emulation it uses these.
inline float emu_f16_to_f32(unsigned short h) {
  _Float16 x;
  std::memcpy(&x, &h, 2);
  return (float)x;
}

inline unsigned short emu_f32_to_f16(float f) {
  _Float16 x = (_Float16)f;
  unsigned short h;
  std::memcpy(&h, &x, 2);
  return h;
}
