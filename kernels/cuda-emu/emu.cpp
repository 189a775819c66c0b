// A CPU emulation of the CUDA driver and cuBLAS calls that the TensorWasm
// CUDA backend makes, built as one shared library that stands in for
// libcuda.so.1 and libcublas.so.13 (scripts/cuda-emu). Its kernels are
// kernels.cu itself, compiled by the host compiler with device.h.
//
// It exists to run the CUDA backend's host code and kernels where there is
// no GPU: launch geometry, argument lists, index arithmetic, barriers, warp
// shuffles and tensor-core MMAs, GEMM arguments (transposes, leading
// dimensions, strides), every copy, and the order of work across streams
// are exercised and checked. It proves nothing about speed, the real
// compiler's code or the real cuBLAS: the GPU check (scripts/gpu-check)
// remains the proof.
//
// Checks beyond what a GPU reports:
// - every device allocation ends at a guard page (and starts after one), and
//   freed memory stays mapped without access for a while, so a kernel that
//   reads or writes past a buffer, or a freed one, faults, and the fault
//   names the kernel;
// - copies, memsets and GEMM operands must lie inside one live allocation;
// - streams run lazily, only as far as the program's synchronization forces
//   (see "streams" below), so a missing wait shows as stale or freed data;
// - row kernels must run with their exact block size, and barriers and warp
//   operations must not diverge (see device.h);
// - fresh allocations are filled with 0xFF bytes (NaN for floats), as
//   stale device memory would be.

#include "device.h"
#define TENSOR_WASM_CUDA_EMU 1
#include "../src/cuda/kernels.cu"

#include <signal.h>
#include <sys/mman.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <deque>
#include <functional>
#include <memory>
#include <set>
#include <tuple>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace emu {

EmuDim3 grid_dim, block_dim, block_idx, thread_idx;

// ---------------------------------------------------------------- kernels

typedef void (*Invoke)(void* fn, void** params);
typedef std::function<void()> Work;
struct Kernel;
typedef Work (*Capture)(const Kernel* k, EmuDim3 grid, EmuDim3 block, void** params);

struct Kernel {
  const char* name;
  void* fn;
  Invoke invoke;
  Capture capture;  // the launch as deferred work, its arguments copied
  // The block size it requires, for kernels with barriers or warp
  // operations, which run a fiber per thread; 0 for the others (any size,
  // threads run one after another).
  unsigned block;
};

static std::string run(const Kernel* k, EmuDim3 grid, EmuDim3 block, void** params);
static void fail_async(const std::string& what);

template <typename... A>
struct Invoker {
  template <size_t... I>
  static void call(void* fn, void** p, std::index_sequence<I...>) {
    reinterpret_cast<void (*)(A...)>(fn)(*static_cast<std::remove_cv_t<A>*>(p[I])...);
  }
  static void invoke(void* fn, void** p) { call(fn, p, std::index_sequence_for<A...>{}); }

  template <size_t... I>
  static Work capture_args(const Kernel* k, EmuDim3 grid, EmuDim3 block, void** p,
                           std::index_sequence<I...>) {
    auto args = std::make_shared<std::tuple<std::remove_cv_t<A>...>>(
        *static_cast<std::remove_cv_t<A>*>(p[I])...);
    return [k, grid, block, args] {
      void* ptrs[sizeof...(A) + 1] = {static_cast<void*>(&std::get<I>(*args))...};
      const std::string err = run(k, grid, block, ptrs);
      if (!err.empty()) fail_async(std::string("kernel ") + k->name + ": " + err);
    };
  }
  static Work capture(const Kernel* k, EmuDim3 grid, EmuDim3 block, void** p) {
    return capture_args(k, grid, block, p, std::index_sequence_for<A...>{});
  }
};

template <typename... A>
Kernel entry(const char* name, void (*fn)(A...)) {
  static const struct {
    const char* prefix;
    unsigned block;
  } fiber_kernels[] = {{"reduce_rows_", BLOCK}, {"softmax_rows_", BLOCK},
                       {"layer_norm_", BLOCK},  {"rms_norm_", BLOCK},
                       {"attn_softmax_", BLOCK}, {"flash_attn_", FA_THREADS}};
  unsigned block = 0;
  for (const auto& f : fiber_kernels) {
    if (std::strncmp(name, f.prefix, std::strlen(f.prefix)) == 0) block = f.block;
  }
  return Kernel{name, reinterpret_cast<void*>(fn), &Invoker<A...>::invoke,
                &Invoker<A...>::capture, block};
}

// The registry mirrors the DEF_* lists at the end of kernels.cu; a kernel
// missing here fails cuModuleGetFunction, so the backend's startup names it.
#define REG(f) entry(#f, &f),
#define REG_ELEMENTWISE(T) REG(binary_same_##T) REG(binary_bcast_##T) REG(scalar_##T)
#define REG_REDUCE_OP(T, NAME) REG(reduce_rows_##NAME##_##T) REG(reduce_cols_##NAME##_##T)
#define REG_REDUCE(T)        \
  REG_REDUCE_OP(T, sum)      \
  REG_REDUCE_OP(T, mean)     \
  REG_REDUCE_OP(T, max)      \
  REG_REDUCE_OP(T, min)      \
  REG_REDUCE_OP(T, argmax)
#define REG_CAST_FROM(S) \
  REG(cast_##S##_f32) REG(cast_##S##_f16) REG(cast_##S##_bf16) REG(cast_##S##_i32) REG(cast_##S##_i64) REG(cast_##S##_u8)
#define REG_FLOAT(T)                                                                   \
  REG(unary_##T) REG(softmax_rows_##T) REG(softmax_cols_##T) REG(layer_norm_##T) \
      REG(rms_norm_##T) REG(attn_softmax_##T)
#define REG_COPY(N, E) REG(permute_##N) REG(concat_##N) REG(gather_##N##_i32) REG(gather_##N##_i64)
#define REG_FLASH(T, D) REG(flash_attn_##T##_##D)

static const std::vector<Kernel>& kernels() {
  static const std::vector<Kernel> k = {FOR_ALL_DTYPES(REG_ELEMENTWISE) FOR_ALL_DTYPES(REG_REDUCE)
                                            FOR_ALL_DTYPES(REG_CAST_FROM) FOR_FLOAT_DTYPES(REG_FLOAT)
                                                FOR_ELEM_SIZES(REG_COPY) FOR_FLASH(REG_FLASH)};
  return k;
}

// ---------------------------------------------------------------- execution

enum State { READY, AT_SYNC, AT_SHUFFLE, DONE };

// A warp-wide operation other than a shuffle: every lane parks with its
// operands; `resolve` then runs once with the 32 lanes' operands.
typedef void (*Collective)(void* const* lanes);

struct Fiber {
  ucontext_t ctx;
  State state;
  EmuDim3 idx;
  uint64_t shuffle_in, shuffle_out;
  unsigned shuffle_src;
  Collective collective;  // null for a shuffle
  void* operands;
};

static const unsigned MAX_THREADS = 1024;
static const size_t STACK = 256 * 1024;

struct Launch {
  const Kernel* kernel;
  void** params;
  std::vector<Fiber> threads;
  ucontext_t sched;
  Fiber* cur;
  std::string error;
};

static Launch* running;  // under the launch lock
static char* stacks;     // MAX_THREADS stacks, each above a guard page

static void fail(const char* what) {
  fprintf(stderr, "cuda-emu: kernel %s, block (%u,%u,%u), thread (%u,%u,%u): %s\n",
          running ? running->kernel->name : "?", block_idx.x, block_idx.y, block_idx.z,
          thread_idx.x, thread_idx.y, thread_idx.z, what);
}

static void fiber_entry() {
  running->kernel->invoke(running->kernel->fn, running->params);
  running->cur->state = DONE;  // uc_link returns to the scheduler
}

__attribute__((noinline)) static void park(State s) {
  Launch* l = running;
  if (l->kernel->block == 0) {
    fail("barrier or shuffle in a kernel that cuda-emu runs without fibers "
         "(add it to fiber_kernels in emu.cpp)");
    abort();
  }
  l->cur->state = s;
  asm volatile("" ::: "memory");
  swapcontext(&l->cur->ctx, &l->sched);
  asm volatile("" ::: "memory");
}

void sync_threads() { park(AT_SYNC); }

uint64_t shuffle(uint64_t v, unsigned src, unsigned xor_mask, bool is_xor) {
  Fiber* f = running->cur;
  const unsigned lane = (unsigned)(f - running->threads.data()) % 32u;
  f->shuffle_in = v;
  f->shuffle_src = (is_xor ? (lane ^ xor_mask) : src) & 31u;
  f->collective = nullptr;
  park(AT_SHUFFLE);
  return running->cur->shuffle_out;
}

static void collective(Collective fn, void* operands) {
  Fiber* f = running->cur;
  f->collective = fn;
  f->operands = operands;
  park(AT_SHUFFLE);
}

struct MmaOperands {
  float* c;
  const uint32_t* a;
  const uint32_t* b;
  bool bf16;
};

static float half_bits_to_f32(uint32_t h, bool bf16) {
  return bf16 ? bf16_to_f32((u16)h) : emu_f16_to_f32((unsigned short)h);
}

// The PTX ISA's m16n8k16 fragments (groupID g = lane / 4, t = lane % 4):
// A (16×16, row-major): a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..),
//   a[2] = (g, 2t+8..), a[3] = (g+8, 2t+8..); the lower column in the low
//   16 bits.
// B (16×8, k×n): b[0] = (k 2t..2t+1, n g), b[1] = (k 2t+8.., n g).
// C (16×8, f32): c[0] = (g, 2t), c[1] = (g, 2t+1), c[2] = (g+8, 2t),
//   c[3] = (g+8, 2t+1).
static void mma_resolve(void* const* lanes) {
  float A[16][16], B[16][8], C[16][8];
  const bool bf16 = static_cast<const MmaOperands*>(lanes[0])->bf16;
  for (unsigned lane = 0; lane < 32; ++lane) {
    const MmaOperands* op = static_cast<const MmaOperands*>(lanes[lane]);
    const unsigned g = lane / 4, t = lane % 4;
    for (unsigned r = 0; r < 4; ++r) {
      const unsigned row = g + ((r & 1) ? 8 : 0), col = 2 * t + ((r & 2) ? 8 : 0);
      A[row][col] = half_bits_to_f32(op->a[r] & 0xFFFFu, bf16);
      A[row][col + 1] = half_bits_to_f32(op->a[r] >> 16, bf16);
    }
    for (unsigned r = 0; r < 2; ++r) {
      const unsigned k = 2 * t + (r ? 8 : 0);
      B[k][g] = half_bits_to_f32(op->b[r] & 0xFFFFu, bf16);
      B[k + 1][g] = half_bits_to_f32(op->b[r] >> 16, bf16);
    }
    for (unsigned r = 0; r < 4; ++r) C[g + (r >= 2 ? 8 : 0)][2 * t + (r & 1)] = op->c[r];
  }
  for (unsigned lane = 0; lane < 32; ++lane) {
    const MmaOperands* op = static_cast<const MmaOperands*>(lanes[lane]);
    const unsigned g = lane / 4, t = lane % 4;
    for (unsigned r = 0; r < 4; ++r) {
      const unsigned row = g + (r >= 2 ? 8 : 0), col = 2 * t + (r & 1);
      float acc = C[row][col];
      for (unsigned k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
      op->c[r] = acc;
    }
  }
}

void mma_m16n8k16(float c[4], const uint32_t a[4], const uint32_t b[2], bool bf16) {
  MmaOperands op{c, a, b, bf16};
  collective(mma_resolve, &op);
}

struct LdmatrixOperands {
  uint32_t* r;
  const uint16_t* row;
  bool trans;
};

// The PTX ISA's ldmatrix (m8n8, 16-bit): the 8 rows of matrix i come from
// the addresses of lanes 8i..8i+7; lane l gets two consecutive elements of
// row l / 4, columns 2(l % 4) and 2(l % 4) + 1, or with .trans of column
// l / 4, rows 2(l % 4) and 2(l % 4) + 1 (the lower one in the low half).
static void ldmatrix_resolve(void* const* lanes) {
  const bool trans = static_cast<const LdmatrixOperands*>(lanes[0])->trans;
  for (unsigned lane = 0; lane < 32; ++lane) {
    LdmatrixOperands* op = static_cast<LdmatrixOperands*>(lanes[lane]);
    if (op->trans != trans) {
      fail_async("ldmatrix with .trans on some lanes only");
      return;
    }
    const unsigned g = lane / 4, t = lane % 4;
    for (unsigned i = 0; i < 4; ++i) {
      auto at = [&](unsigned row, unsigned col) {
        return static_cast<const LdmatrixOperands*>(lanes[8 * i + row])->row[col];
      };
      const uint32_t lo = trans ? at(2 * t, g) : at(g, 2 * t);
      const uint32_t hi = trans ? at(2 * t + 1, g) : at(g, 2 * t + 1);
      op->r[i] = lo | (hi << 16);
    }
  }
}

void ldmatrix_x4(uint32_t r[4], const void* row, bool trans) {
  if (((uintptr_t)row) % 16 != 0) {
    fail("ldmatrix row address not 16-byte aligned");
    abort();
  }
  LdmatrixOperands op{r, static_cast<const uint16_t*>(row), trans};
  collective(ldmatrix_resolve, &op);
}

static EmuDim3 unflatten(unsigned i, const EmuDim3& d) {
  return EmuDim3{i % d.x, (i / d.x) % d.y, i / (d.x * d.y)};
}

// Runs one block with a fiber per thread; false (and l->error) on divergence.
static bool run_block_fibers(Launch* l, unsigned n) {
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = l->threads[i];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stacks + (size_t)i * (STACK + 4096) + 4096;
    f.ctx.uc_stack.ss_size = STACK;
    f.ctx.uc_link = &l->sched;
    makecontext(&f.ctx, fiber_entry, 0);
    f.state = READY;
    f.idx = unflatten(i, block_dim);
  }
  for (;;) {
    for (unsigned i = 0; i < n; ++i) {
      Fiber& f = l->threads[i];
      if (f.state != READY) continue;
      l->cur = &f;
      thread_idx = f.idx;
      swapcontext(&l->sched, &f.ctx);
    }
    unsigned done = 0, at_sync = 0, at_shuffle = 0;
    for (unsigned i = 0; i < n; ++i) {
      done += l->threads[i].state == DONE;
      at_sync += l->threads[i].state == AT_SYNC;
      at_shuffle += l->threads[i].state == AT_SHUFFLE;
    }
    if (done == n) return true;
    if (at_shuffle > 0) {
      bool resolved = false;
      for (unsigned w = 0; w * 32 < n; ++w) {
        const unsigned lo = w * 32, hi = lo + 32 < n ? lo + 32 : n;
        unsigned waiting = 0;
        for (unsigned i = lo; i < hi; ++i) waiting += l->threads[i].state == AT_SHUFFLE;
        if (waiting == 0) continue;
        if (waiting != hi - lo) {
          l->error = "warp shuffle reached by only some lanes of warp " + std::to_string(w) +
                     " (the others are at __syncthreads or finished)";
          return false;
        }
        const Collective fn = l->threads[lo].collective;
        for (unsigned i = lo; i < hi; ++i) {
          if (l->threads[i].collective != fn) {
            l->error = "lanes of warp " + std::to_string(w) + " at different warp operations";
            return false;
          }
        }
        if (fn != nullptr) {
          if (hi - lo != 32) {
            l->error = "warp operation in a partial warp";
            return false;
          }
          void* operands[32];
          for (unsigned i = lo; i < hi; ++i) operands[i - lo] = l->threads[i].operands;
          fn(operands);
        } else {
          for (unsigned i = lo; i < hi; ++i) {
            Fiber& f = l->threads[i];
            const unsigned src = lo + f.shuffle_src;
            if (src >= hi) {
              l->error = "warp shuffle from a lane that does not exist";
              return false;
            }
            f.shuffle_out = l->threads[src].shuffle_in;
          }
        }
        for (unsigned i = lo; i < hi; ++i) l->threads[i].state = READY;
        resolved = true;
      }
      if (resolved) continue;
    }
    if (done > 0 || at_shuffle > 0) {
      l->error = "__syncthreads reached by " + std::to_string(at_sync) + " of " +
                 std::to_string(n) + " threads (divergent barrier)";
      return false;
    }
    for (unsigned i = 0; i < n; ++i) l->threads[i].state = READY;
  }
}

// Runs the whole grid; an empty string on success.
static std::string run(const Kernel* k, EmuDim3 grid, EmuDim3 block, void** params) {
  Launch l;
  l.kernel = k;
  l.params = params;
  running = &l;
  grid_dim = grid;
  block_dim = block;
  const unsigned n = block.x * block.y * block.z;
  const bool fibers = k->block != 0;
  if (fibers) l.threads.resize(n);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        block_idx = EmuDim3{bx, by, bz};
        if (fibers) {
          if (!run_block_fibers(&l, n)) {
            running = nullptr;
            return l.error;
          }
        } else {
          for (unsigned i = 0; i < n; ++i) {
            thread_idx = unflatten(i, block);
            k->invoke(k->fn, params);
          }
        }
      }
  running = nullptr;
  return std::string();
}

// ---------------------------------------------------------------- memory

static std::mutex mem_lock;
struct Alloc {
  size_t size;
  char* map;  // the mapping, guard pages included
  size_t map_len;
};
static std::map<uint64_t, Alloc> allocs;  // by start address
static std::deque<Alloc> quarantine;      // freed, inaccessible
static const size_t QUARANTINE = 2048;
static size_t used_bytes;
// The pool's reservation: freed memory stays reserved up to the release
// threshold (CU_MEMPOOL_ATTR_RELEASE_THRESHOLD), as with the real pool.
static size_t reserved_bytes, release_threshold;
static const size_t TOTAL_MEM = 4ull << 30;
static const size_t PAGE = 4096;

// Memory for `size` bytes (16-byte aligned) ending within 15 bytes of a
// guard page, with a guard page before it too; 0 when over TOTAL_MEM.
static uint64_t dev_alloc(size_t size) {
  const size_t body = (size + 15) / 16 * 16;
  const size_t pages = (body + PAGE - 1) / PAGE;
  const size_t map_len = (pages + 2) * PAGE;
  std::lock_guard<std::mutex> g(mem_lock);
  if (used_bytes + size > TOTAL_MEM) return 0;
  char* m = (char*)mmap(nullptr, map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) return 0;
  mprotect(m, PAGE, PROT_NONE);
  mprotect(m + map_len - PAGE, PAGE, PROT_NONE);
  char* start = m + map_len - PAGE - body;
  memset(start, 0xFF, body);
  allocs[(uint64_t)start] = Alloc{size, m, map_len};
  used_bytes += size;
  if (reserved_bytes < used_bytes) reserved_bytes = used_bytes;
  return (uint64_t)start;
}

static bool dev_free(uint64_t p) {
  std::lock_guard<std::mutex> g(mem_lock);
  auto it = allocs.find(p);
  if (it == allocs.end()) return false;
  used_bytes -= it->second.size;
  if (reserved_bytes - used_bytes > release_threshold) reserved_bytes = used_bytes + release_threshold;
  // Freed memory stays mapped without access for a while, so that a late
  // use faults rather than reading a newer allocation.
  madvise(it->second.map, it->second.map_len, MADV_DONTNEED);
  mprotect(it->second.map, it->second.map_len, PROT_NONE);
  quarantine.push_back(it->second);
  if (quarantine.size() > QUARANTINE) {
    munmap(quarantine.front().map, quarantine.front().map_len);
    quarantine.pop_front();
  }
  allocs.erase(it);
  return true;
}

// Whether [p, p + len) lies inside one live allocation.
static bool dev_range(uint64_t p, size_t len) {
  std::lock_guard<std::mutex> g(mem_lock);
  auto it = allocs.upper_bound(p);
  if (it == allocs.begin()) return false;
  --it;
  return p >= it->first && p - it->first <= it->second.size && len <= it->second.size - (p - it->first);
}

// Faults in a guard page during a launch name the kernel.
static struct sigaction old_segv;
static void on_segv(int sig, siginfo_t* info, void* uc) {
  if (running != nullptr) {
    // On the small signal stack: write(2) only, no stdio.
    static const char head[] = "cuda-emu: out-of-bounds or freed device memory accessed by kernel ";
    const char* name = running->kernel->name;
    if (write(2, head, sizeof head - 1) < 0 || write(2, name, strlen(name)) < 0 ||
        write(2, "\n", 1) < 0) {
      // Nothing more to do: the process ends below either way.
    }
    signal(SIGSEGV, SIG_DFL);
    raise(SIGSEGV);
    return;
  }
  if (old_segv.sa_flags & SA_SIGINFO) {
    old_segv.sa_sigaction(sig, info, uc);
  } else if (old_segv.sa_handler != SIG_DFL && old_segv.sa_handler != SIG_IGN) {
    old_segv.sa_handler(sig);
  } else {
    signal(SIGSEGV, SIG_DFL);
    raise(SIGSEGV);
  }
}

static void init_once() {
  static std::once_flag once;
  std::call_once(once, [] {
    const size_t len = (size_t)MAX_THREADS * (STACK + PAGE);
    stacks = (char*)mmap(nullptr, len, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (stacks == MAP_FAILED) {
      perror("cuda-emu: fiber stacks");
      abort();
    }
    for (unsigned i = 0; i < MAX_THREADS; ++i) mprotect(stacks + i * (STACK + PAGE), PAGE, PROT_NONE);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigaction(SIGSEGV, &sa, &old_segv);
  });
}

// ---------------------------------------------------------------- streams
//
// Work enqueued on a stream runs lazily, in stream order, when the host
// needs it done: a synchronize of its stream or of an event after it,
// another stream's work that waits for such an event, a copy into pageable
// host memory, or a call on the null stream (which drains every stream
// first). Work on two streams thus runs in the order that the program's
// synchronization forces and no other: a buffer used on another stream
// without a wait is read before its writer ran or after it was freed, and
// the checks above fail. Failures of deferred work are reported by the
// next call that returns a status (sticky, as on a GPU). CUDA_EMU_SYNC=1
// runs all work at enqueue instead.

struct Stream {
  std::deque<Work> queue;
  uint64_t enqueued = 0, executed = 0;
  bool draining = false;
};

struct Event {
  void* stream = nullptr;
  uint64_t seq = 0;  // the stream's work before the record
  bool recorded = false;
  double ms = 0;
};

static std::recursive_mutex lock;       // everything below, and running work
static std::map<void*, Stream> streams;  // node-based: stable under insertion
static std::map<void*, Event> events;
static std::map<uint64_t, size_t> pinned;  // host allocations, by start
static std::set<uint64_t> pending_free;    // enqueued frees not yet run
static std::string async_error;

static bool sync_mode() {
  static const bool on = [] {
    const char* v = getenv("CUDA_EMU_SYNC");
    return v != nullptr && *v != '\0' && *v != '0';
  }();
  return on;
}

static void fail_async(const std::string& what) {
  fprintf(stderr, "cuda-emu: %s\n", what.c_str());
  if (async_error.empty()) async_error = what;
}

static bool is_pinned(const void* p, size_t n) {
  auto it = pinned.upper_bound((uint64_t)p);
  if (it == pinned.begin()) return false;
  --it;
  const uint64_t a = (uint64_t)p;
  return a >= it->first && a - it->first + n <= it->second;
}

// Runs `s`'s work up to its `upto`-th item.
static void drain(void* s, uint64_t upto) {
  Stream& st = streams[s];
  if (st.executed >= upto) return;
  if (st.draining) {
    fail_async("streams wait for each other in a cycle");
    return;
  }
  st.draining = true;
  while (st.executed < upto && !st.queue.empty()) {
    Work w = std::move(st.queue.front());
    st.queue.pop_front();
    ++st.executed;
    w();
  }
  st.draining = false;
}

static void drain_all() {
  std::vector<void*> keys;
  for (const auto& kv : streams) keys.push_back(kv.first);
  for (void* s : keys) drain(s, streams[s].enqueued);
}

// Enqueues `w` on `s`; on the null stream (or with CUDA_EMU_SYNC=1) every
// stream is drained and `w` runs at once.
static void enqueue(void* s, Work w) {
  if (s == nullptr || sync_mode()) {
    drain_all();
    w();
    return;
  }
  Stream& st = streams[s];
  st.queue.push_back(std::move(w));
  ++st.enqueued;
}

}  // namespace emu

// ---------------------------------------------------------------- driver API

// CUDA_EMU_COUNT_CALLS=1: every driver and cuBLAS call is counted, and the
// counts are printed to stderr at exit (how many calls an op costs).
namespace emu {
static std::mutex count_lock;
static std::map<std::string, unsigned long>* call_counts;
static void print_counts() {
  std::lock_guard<std::mutex> g(count_lock);
  for (const auto& kv : *call_counts) fprintf(stderr, "cuda-emu calls: %-32s %lu\n", kv.first.c_str(), kv.second);
}
static void count_call(const char* name) {
  static const bool on = [] {
    const char* v = getenv("CUDA_EMU_COUNT_CALLS");
    if (v == nullptr || *v == '\0' || *v == '0') return false;
    call_counts = new std::map<std::string, unsigned long>();
    atexit(print_counts);
    return true;
  }();
  if (!on) return;
  std::lock_guard<std::mutex> g(count_lock);
  ++(*call_counts)[name];
}
// Counts the outermost call only (entry points that forward to another
// count once).
static thread_local bool in_call;
struct CallGuard {
  bool outer;
  explicit CallGuard(const char* name) : outer(!in_call) {
    if (outer) {
      in_call = true;
      count_call(name);
    }
  }
  ~CallGuard() {
    if (outer) in_call = false;
  }
};
}  // namespace emu
#define COUNT_CALL() emu::CallGuard emu_call_guard(__func__)

extern "C" {

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void* CUcontext;
typedef void* CUstream;
typedef void* CUevent;
typedef void* CUmodule;
typedef void* CUmemoryPool;
typedef const emu::Kernel* CUfunction;

enum {
  OK = 0,
  INVALID_VALUE = 1,
  OUT_OF_MEMORY = 2,
  INVALID_DEVICE = 101,
  NOT_FOUND = 500,
  ILLEGAL_ADDRESS = 700,
  LAUNCH_FAILED = 719,
  NOT_SUPPORTED = 801,
};

static int device_count() {
  const char* v = getenv("CUDA_VISIBLE_DEVICES");
  return (v != nullptr && *v == '\0') ? 0 : 1;
}

static int primary_ctx;
static thread_local CUcontext current_ctx;

CUresult cuInit(unsigned) {
  COUNT_CALL();
  emu::init_once();
  return OK;
}
CUresult cuDriverGetVersion(int* v) {
  COUNT_CALL();
  *v = 13000;
  return OK;
}
CUresult cuDeviceGetCount(int* n) {
  COUNT_CALL();
  *n = device_count();
  return OK;
}
CUresult cuDeviceGet(CUdevice* d, int ordinal) {
  COUNT_CALL();
  if (ordinal < 0 || ordinal >= device_count()) return INVALID_DEVICE;
  *d = ordinal;
  return OK;
}
CUresult cuDeviceGetName(char* name, int len, CUdevice) {
  COUNT_CALL();
  snprintf(name, (size_t)len, "%s", "TensorWasm CUDA emulation (CPU)");
  return OK;
}
CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice) {
  COUNT_CALL();
  switch (attr) {
    case 1: *v = 1024; break;        // max threads per block
    case 2: *v = 1024; break;        // max block dim x
    case 3: case 4: *v = 1024; break;
    case 5: *v = 2147483647; break;  // max grid dim x
    case 6: case 7: *v = 65535; break;
    case 8: *v = 49152; break;       // shared memory per block
    case 10: *v = 32; break;         // warp size
    case 16: *v = 4; break;          // SMs: few, so that grid-stride loops loop
    case 75: *v = 9; break;          // compute capability 9.0
    case 76: *v = 0; break;
    case 115: *v = 1; break;         // memory pools supported
    default: *v = 0; break;
  }
  return OK;
}
CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice) {
  COUNT_CALL();
  *bytes = emu::TOTAL_MEM;
  return OK;
}
CUresult cuDeviceGetUuid(unsigned char* uuid, CUdevice d) {
  COUNT_CALL();
  for (int i = 0; i < 16; ++i) uuid[i] = (unsigned char)(0xE0 + i + d);
  return OK;
}
CUresult cuDeviceGetUuid_v2(unsigned char* uuid, CUdevice d) {
  COUNT_CALL();
  return cuDeviceGetUuid(uuid, d);
}
CUresult cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice) {
  COUNT_CALL();
  *c = &primary_ctx;
  return OK;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) {
  COUNT_CALL();
  return OK;
}
CUresult cuCtxSetCurrent(CUcontext c) {
  COUNT_CALL();
  current_ctx = c;
  return OK;
}
CUresult cuCtxGetCurrent(CUcontext* c) {
  COUNT_CALL();
  *c = current_ctx;
  return OK;
}
CUresult cuCtxGetDevice(CUdevice* d) {
  COUNT_CALL();
  *d = 0;
  return OK;
}

// Name and description of every status the emulation returns.
struct Status {
  CUresult code;
  const char* name;
  const char* text;
};
static const Status STATUSES[] = {
    {OK, "CUDA_SUCCESS", "no error"},
    {INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {NOT_FOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {ILLEGAL_ADDRESS, "CUDA_ERROR_ILLEGAL_ADDRESS",
     "an illegal memory access was encountered (cuda-emu)"},
    {LAUNCH_FAILED, "CUDA_ERROR_LAUNCH_FAILED", "unspecified launch failure (cuda-emu: see stderr)"},
};
static const Status* status_of(CUresult e) {
  static const Status unknown{-1, "CUDA_ERROR_UNKNOWN", "unknown error (cuda-emu)"};
  for (const Status& st : STATUSES) {
    if (st.code == e) return &st;
  }
  return &unknown;
}
CUresult cuGetErrorString(CUresult e, const char** s) {
  COUNT_CALL();
  *s = status_of(e)->text;
  return OK;
}
CUresult cuGetErrorName(CUresult e, const char** s) {
  COUNT_CALL();
  *s = status_of(e)->name;
  return OK;
}

// Handles: distinct non-null pointers.
static std::atomic<unsigned long> handles{1};
static void* new_handle() { return (void*)(uintptr_t)(handles.fetch_add(1) * 16); }

static CUresult sticky() { return emu::async_error.empty() ? OK : LAUNCH_FAILED; }

CUresult cuStreamCreate(CUstream* s, unsigned) {
  COUNT_CALL();
  *s = new_handle();
  return OK;
}
CUresult cuStreamCreateWithPriority(CUstream* s, unsigned, int) {
  COUNT_CALL();
  *s = new_handle();
  return OK;
}
CUresult cuStreamDestroy_v2(CUstream s) {
  COUNT_CALL();
  std::lock_guard<std::recursive_mutex> g(emu::lock);
  emu::drain(s, emu::streams[s].enqueued);
  emu::streams.erase(s);
  return OK;
}
CUresult cuStreamSynchronize(CUstream s) {
  COUNT_CALL();
  std::lock_guard<std::recursive_mutex> g(emu::lock);
  if (s == nullptr) {
    emu::drain_all();
  } else {
    emu::drain(s, emu::streams[s].enqueued);
  }
  return sticky();
}
CUresult cuStreamQuery(CUstream s) { return cuStreamSynchronize(s); }
CUresult cuCtxSynchronize() {
  COUNT_CALL();
  std::lock_guard<std::recursive_mutex> g(emu::lock);
  emu::drain_all();
  return sticky();
}

static double now_ms() {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}
CUresult cuEventCreate(CUevent* e, unsigned) {
  COUNT_CALL();
  *e = new_handle();
  return OK;
}
CUresult cuEventDestroy_v2(CUevent e) {
  COUNT_CALL();
  std::lock_guard<std::recursive_mutex> g(emu::lock);
  emu::events.erase(e);
  return OK;
}
CUresult cuEventRecord(CUevent e, CUstream s) {
  COUNT_CALL();
  std::lock_guard<std::recursive_mutex> g(emu::lock);
  emu::enqueue(s, [e] {
    auto it = emu::events.find(e);
    if (it != emu::events.end()) it->second.ms = now_ms();
  });
  emu::Event& ev = emu::events[e];
  ev.recorded = true;
  ev.stream = s;
  ev.seq = s == nullptr ? 0 : emu::streams[s].enqueued;
  if (s == nullptr || emu::sync_mode()) ev.ms = now_ms();
  return OK;
}
// Drains the work before `e`'s last record.
static void drain_to(CUevent e) {
  auto it = emu::events.find(e);
  if (it != emu::events.end() && it->second.recorded && it->second.stream != nullptr) {
    emu::drain(it->second.stream, it->second.seq);
  }
}
CUresult cuEventSynchronize(CUevent e) {
  COUNT_CALL();
  std::lock_guard<std::recursive_mutex> g(emu::lock);
  drain_to(e);
  return sticky();
}
CUresult cuEventQuery(CUevent e) { return cuEventSynchronize(e); }
CUresult cuStreamWaitEvent(CUstream s, CUevent e, unsigned) {
  COUNT_CALL();
  std::lock_guard<std::recursive_mutex> g(emu::lock);
  auto it = emu::events.find(e);
  if (it == emu::events.end() || !it->second.recorded) return OK;  // waits for nothing
  void* es = it->second.stream;
  const uint64_t seq = it->second.seq;
  if (es == s || es == nullptr) return OK;
  emu::enqueue(s, [es, seq] { emu::drain(es, seq); });
  return OK;
}
CUresult cuEventElapsedTime(float* ms, CUevent a, CUevent b) {
  COUNT_CALL();
  std::lock_guard<std::recursive_mutex> g(emu::lock);
  drain_to(a);
  drain_to(b);
  auto ia = emu::events.find(a), ib = emu::events.find(b);
  if (ia == emu::events.end() || ib == emu::events.end()) return INVALID_VALUE;
  *ms = (float)(ib->second.ms - ia->second.ms);
  return OK;
}
CUresult cuEventElapsedTime_v2(float* ms, CUevent a, CUevent b) {
  COUNT_CALL();
  return cuEventElapsedTime(ms, a, b);
}

// Device memory: allocation at once (stream-ordered allocation only makes
// the memory usable by later work, which holds here too), frees in stream
// order.
CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
  COUNT_CALL();
  if (bytes == 0) return INVALID_VALUE;
  *p = emu::dev_alloc(bytes);
  return *p ? OK : OUT_OF_MEMORY;
}
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, CUstream) {
  COUNT_CALL();
  return cuMemAlloc_v2(p, bytes);
}
CUresult cuMemFree_v2(CUdeviceptr p) {
  COUNT_CALL();
  std::lock_guard<std::recursive_mutex> g(emu::lock);
  emu::drain_all();
  if (emu::pending_free.count(p) != 0) return INVALID_VALUE;
  return emu::dev_free(p) ? OK : INVALID_VALUE;
}
CUresult cuMemFreeAsync(CUdeviceptr p, CUstream s) {
  COUNT_CALL();
  std::lock_guard<std::recursive_mutex> g(emu::lock);
  if (!emu::dev_range(p, 0) || emu::pending_free.count(p) != 0) {
    fprintf(stderr, "cuda-emu: free of 0x%llx, which is not a live allocation\n", p);
    return INVALID_VALUE;
  }
  emu::pending_free.insert(p);
  emu::enqueue(s, [p] {
    emu::pending_free.erase(p);
    emu::dev_free(p);
  });
  return OK;
}
CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
  COUNT_CALL();
  std::lock_guard<std::mutex> g(emu::mem_lock);
  *total = emu::TOTAL_MEM;
  *free_bytes = emu::TOTAL_MEM - emu::used_bytes;
  return OK;
}
static int pool_handle;
CUresult cuDeviceGetMemPool(CUmemoryPool* pool, CUdevice) {
  COUNT_CALL();
  *pool = &pool_handle;
  return OK;
}
CUresult cuDeviceGetDefaultMemPool(CUmemoryPool* pool, CUdevice d) {
  COUNT_CALL();
  return cuDeviceGetMemPool(pool, d);
}
CUresult cuMemPoolSetAttribute(CUmemoryPool, int attr, void* value) {
  COUNT_CALL();
  if (attr == 4) {  // release threshold
    std::lock_guard<std::mutex> g(emu::mem_lock);
    uint64_t v;
    memcpy(&v, value, sizeof v);
    emu::release_threshold = (size_t)v;
  }
  return OK;
}
CUresult cuMemPoolGetAttribute(CUmemoryPool, int attr, void* value) {
  COUNT_CALL();
  std::lock_guard<std::mutex> g(emu::mem_lock);
  uint64_t v = 0;
  if (attr == 5 || attr == 6) v = emu::reserved_bytes;  // reserved: current, high
  if (attr == 7 || attr == 8) v = emu::used_bytes;      // used: current, high
  memcpy(value, &v, sizeof v);
  return OK;
}

static CUresult bad_range(const char* what, CUdeviceptr p, size_t n) {
  fprintf(stderr, "cuda-emu: %s of %zu bytes at 0x%llx is outside every device allocation\n", what,
          n, p);
  return ILLEGAL_ADDRESS;
}
// Deferred work re-checks its ranges: the buffer may be freed by then.
static void checked_copy(const char* what, void* dst, const void* src, size_t n, CUdeviceptr dev,
                         CUdeviceptr dev2) {
  if (!emu::dev_range(dev, n) || (dev2 != 0 && !emu::dev_range(dev2, n))) {
    emu::fail_async(std::string(what) + " on a buffer freed before the copy ran");
    return;
  }
  memmove(dst, src, n);
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, CUstream s) {
  COUNT_CALL();
  if (n == 0) return OK;
  std::lock_guard<std::recursive_mutex> g(emu::lock);
  if (!emu::dev_range(dst, n)) return bad_range("host-to-device copy", dst, n);
  if (emu::is_pinned(src, n)) {
    // Read when the copy runs: the host must not touch the buffer before.
    emu::enqueue(s, [dst, src, n] {
      checked_copy("host-to-device copy", (void*)dst, src, n, dst, 0);
    });
  } else {
    // Pageable memory is staged at the call, as the driver does.
    auto data = std::make_shared<std::vector<char>>((const char*)src, (const char*)src + n);
    emu::enqueue(s, [dst, data, n] {
      checked_copy("host-to-device copy", (void*)dst, data->data(), n, dst, 0);
    });
  }
  return sticky();
}
CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
  COUNT_CALL();
  return cuMemcpyHtoDAsync_v2(dst, src, n, nullptr);
}
CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, CUstream s) {
  COUNT_CALL();
  if (n == 0) return OK;
  std::lock_guard<std::recursive_mutex> g(emu::lock);
  if (!emu::dev_range(src, n)) return bad_range("device-to-host copy", src, n);
  emu::enqueue(s, [dst, src, n] { checked_copy("device-to-host copy", dst, (const void*)src, n, src, 0); });
  // Into pageable memory the copy completes before the call returns.
  if (s != nullptr && !emu::is_pinned(dst, n)) emu::drain(s, emu::streams[s].enqueued);
  return sticky();
}
CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
  COUNT_CALL();
  return cuMemcpyDtoHAsync_v2(dst, src, n, nullptr);
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
  COUNT_CALL();
  if (n == 0) return OK;
  std::lock_guard<std::recursive_mutex> g(emu::lock);
  if (!emu::dev_range(src, n)) return bad_range("device-to-device copy (source)", src, n);
  if (!emu::dev_range(dst, n)) return bad_range("device-to-device copy (destination)", dst, n);
  emu::enqueue(s, [dst, src, n] {
    checked_copy("device-to-device copy", (void*)dst, (const void*)src, n, src, dst);
  });
  return sticky();
}
CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
  COUNT_CALL();
  return cuMemcpyDtoDAsync_v2(dst, src, n, nullptr);
}
CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, CUstream s) {
  COUNT_CALL();
  if (n == 0) return OK;
  std::lock_guard<std::recursive_mutex> g(emu::lock);
  if (!emu::dev_range(dst, n)) return bad_range("memset", dst, n);
  emu::enqueue(s, [dst, v, n] {
    if (!emu::dev_range(dst, n)) {
      emu::fail_async("memset of a buffer freed before it ran");
      return;
    }
    memset((void*)dst, v, n);
  });
  return sticky();
}
CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
  COUNT_CALL();
  return cuMemsetD8Async(dst, v, n, nullptr);
}

// Pinned host memory is ordinary memory here, remembered so that copies
// from and to it run in stream order.
CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) {
  COUNT_CALL();
  *p = malloc(bytes ? bytes : 1);
  if (*p == nullptr) return OUT_OF_MEMORY;
  std::lock_guard<std::recursive_mutex> g(emu::lock);
  emu::pinned[(uint64_t)*p] = bytes;
  return OK;
}
CUresult cuMemAllocHost_v2(void** p, size_t bytes) {
  COUNT_CALL();
  return cuMemHostAlloc(p, bytes, 0);
}
CUresult cuMemFreeHost(void* p) {
  COUNT_CALL();
  std::lock_guard<std::recursive_mutex> g(emu::lock);
  emu::drain_all();  // as the driver does
  emu::pinned.erase((uint64_t)p);
  free(p);
  return OK;
}

// Modules: the image (NVRTC's output) is accepted as is; functions come
// from the host-compiled kernels.
static int module_handle;
CUresult cuModuleLoadData(CUmodule* m, const void* image) {
  COUNT_CALL();
  if (image == nullptr) return INVALID_VALUE;
  *m = &module_handle;
  return OK;
}
CUresult cuModuleUnload(CUmodule) {
  COUNT_CALL();
  return OK;
}
CUresult cuModuleGetFunction(CUfunction* f, CUmodule, const char* name) {
  COUNT_CALL();
  for (const emu::Kernel& k : emu::kernels()) {
    if (strcmp(k.name, name) == 0) {
      *f = &k;
      return OK;
    }
  }
  return NOT_FOUND;
}
CUresult cuFuncGetAttribute(int* v, int attr, CUfunction) {
  COUNT_CALL();
  *v = attr == 0 ? 1024 : 0;  // max threads per block
  return OK;
}
CUresult cuFuncSetAttribute(CUfunction, int, int) {
  COUNT_CALL();
  return OK;
}

CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                        unsigned by, unsigned bz, unsigned shared, CUstream s, void** params,
                        void** extra) {
  COUNT_CALL();
  if (f == nullptr || params == nullptr || extra != nullptr) return INVALID_VALUE;
  const unsigned long long threads = (unsigned long long)bx * by * bz;
  const char* why = nullptr;
  if (gx == 0 || gy == 0 || gz == 0 || bx == 0 || by == 0 || bz == 0) why = "empty grid or block";
  else if (gx > 2147483647u || gy > 65535 || gz > 65535) why = "grid larger than the device allows";
  else if (threads > emu::MAX_THREADS || bz > 64) why = "block larger than the device allows";
  else if (shared > 49152) why = "more dynamic shared memory than the device allows";
  else if (f->block != 0 && (bx != f->block || by != 1 || bz != 1))
    why = "launched with another block size than the kernel requires";
  if (why != nullptr) {
    fprintf(stderr, "cuda-emu: launch of %s with grid (%u,%u,%u), block (%u,%u,%u): %s\n",
            f->name, gx, gy, gz, bx, by, bz, why);
    return INVALID_VALUE;
  }
  std::lock_guard<std::recursive_mutex> g(emu::lock);
  // The arguments are copied now, as the driver copies them.
  emu::enqueue(s, f->capture(f, EmuDim3{gx, gy, gz}, EmuDim3{bx, by, bz}, params));
  return sticky();
}

typedef void (*CUhostFn)(void*);
CUresult cuLaunchHostFunc(CUstream s, CUhostFn fn, void* data) {
  COUNT_CALL();
  std::lock_guard<std::recursive_mutex> g(emu::lock);
  emu::enqueue(s, [fn, data] { fn(data); });
  return OK;
}

// ---------------------------------------------------------------- cuBLAS

typedef int cublasStatus_t;
typedef void* cublasHandle_t;
enum {
  BLAS_OK = 0,
  BLAS_INVALID_VALUE = 7,
  BLAS_EXECUTION_FAILED = 13,
  BLAS_NOT_SUPPORTED = 15,
};
enum { R_32F = 0, R_16F = 2, R_16BF = 14 };

cublasStatus_t cublasCreate_v2(cublasHandle_t* h) {
  COUNT_CALL();
  emu::init_once();
  *h = new_handle();
  return BLAS_OK;
}
// The stream of each handle (the null stream until set).
static std::map<cublasHandle_t, CUstream> blas_streams;
cublasStatus_t cublasDestroy_v2(cublasHandle_t h) {
  COUNT_CALL();
  std::lock_guard<std::recursive_mutex> g(emu::lock);
  blas_streams.erase(h);
  return BLAS_OK;
}
cublasStatus_t cublasSetStream_v2(cublasHandle_t h, CUstream s) {
  COUNT_CALL();
  std::lock_guard<std::recursive_mutex> g(emu::lock);
  blas_streams[h] = s;
  return BLAS_OK;
}
cublasStatus_t cublasSetMathMode(cublasHandle_t, int) {
  COUNT_CALL();
  return BLAS_OK;
}
cublasStatus_t cublasSetWorkspace_v2(cublasHandle_t, void*, size_t) {
  COUNT_CALL();
  return BLAS_OK;
}
const char* cublasGetStatusString(cublasStatus_t s) {
  COUNT_CALL();
  return s == BLAS_OK ? "CUBLAS_STATUS_SUCCESS" : "CUBLAS_STATUS_ERROR (cuda-emu)";
}

static size_t elem_size(int t) { return t == R_32F ? 4 : 2; }

static float load(const void* base, int t, int64_t i) {
  if (t == R_32F) return ((const float*)base)[i];
  const uint16_t b = ((const uint16_t*)base)[i];
  return t == R_16F ? emu_f16_to_f32(b) : bf16_to_f32(b);
}

static void store(void* base, int t, int64_t i, float v) {
  if (t == R_32F) ((float*)base)[i] = v;
  else ((uint16_t*)base)[i] = t == R_16F ? emu_f32_to_f16(v) : f32_to_bf16(v);
}

// Whether every element of `batch` column-major matrices of rows × cols
// (leading dimension ld, batch stride) lies in one allocation.
static bool matrices_in_range(const void* p, int t, int64_t rows, int64_t cols, int64_t ld,
                              int64_t stride, int64_t batch) {
  if (rows == 0 || cols == 0 || batch == 0) return true;
  const int64_t last = (rows - 1) + (cols - 1) * ld + (batch - 1) * stride;
  if (stride < 0 || last < 0) return false;
  return emu::dev_range((uint64_t)p, (size_t)(last + 1) * elem_size(t));
}

static void gemm_now(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,
                     const void* A, int at, int64_t lda, int64_t sa, const void* B, int bt,
                     int64_t ldb, int64_t sb, float beta, void* C, int ct, int64_t ldc,
                     int64_t sc, int64_t batch);

cublasStatus_t cublasGemmStridedBatchedEx_64(cublasHandle_t h, int transa, int transb, int64_t m,
                                             int64_t n, int64_t k, const void* alpha_p,
                                             const void* A, int at, int64_t lda, int64_t sa,
                                             const void* B, int bt, int64_t ldb, int64_t sb,
                                             const void* beta_p, void* C, int ct, int64_t ldc,
                                             int64_t sc, int64_t batch, int compute, int) {
  COUNT_CALL();
  const bool ta = transa != 0, tb = transb != 0;
  const int64_t a_rows = ta ? k : m, a_cols = ta ? m : k;
  const int64_t b_rows = tb ? n : k, b_cols = tb ? k : n;
  if (m < 0 || n < 0 || k < 0 || batch < 0 || transa < 0 || transa > 1 || transb < 0 ||
      transb > 1 || lda < (a_rows > 1 ? a_rows : 1) || ldb < (b_rows > 1 ? b_rows : 1) ||
      ldc < (m > 1 ? m : 1)) {
    fprintf(stderr, "cuda-emu: cuBLAS GEMM with invalid sizes or leading dimensions\n");
    return BLAS_INVALID_VALUE;
  }
  const bool types_ok = (at == R_32F || at == R_16F || at == R_16BF) && bt == at &&
                        (ct == at || ct == R_32F) && compute == 68;
  if (!types_ok) {
    fprintf(stderr, "cuda-emu: cuBLAS GEMM types %d/%d/%d compute %d not supported\n", at, bt, ct,
            compute);
    return BLAS_NOT_SUPPORTED;
  }
  if (!matrices_in_range(A, at, a_rows, a_cols, lda, sa, batch) ||
      !matrices_in_range(B, bt, b_rows, b_cols, ldb, sb, batch) ||
      !matrices_in_range(C, ct, m, n, ldc, sc, batch)) {
    fprintf(stderr, "cuda-emu: cuBLAS GEMM operand outside every device allocation "
                    "(m %lld n %lld k %lld lda %lld ldb %lld ldc %lld batch %lld)\n",
            (long long)m, (long long)n, (long long)k, (long long)lda, (long long)ldb,
            (long long)ldc, (long long)batch);
    return BLAS_EXECUTION_FAILED;
  }
  const float alpha = *(const float*)alpha_p, beta = *(const float*)beta_p;
  std::lock_guard<std::recursive_mutex> g(emu::lock);
  auto hs = blas_streams.find(h);
  emu::enqueue(hs == blas_streams.end() ? nullptr : hs->second, [=] {
    if (!matrices_in_range(A, at, a_rows, a_cols, lda, sa, batch) ||
        !matrices_in_range(B, bt, b_rows, b_cols, ldb, sb, batch) ||
        !matrices_in_range(C, ct, m, n, ldc, sc, batch)) {
      emu::fail_async("cuBLAS GEMM on a buffer freed before it ran");
      return;
    }
    gemm_now(ta, tb, m, n, k, alpha, A, at, lda, sa, B, bt, ldb, sb, beta, C, ct, ldc, sc, batch);
  });
  return BLAS_OK;
}

static void gemm_now(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,
                     const void* A, int at, int64_t lda, int64_t sa, const void* B, int bt,
                     int64_t ldb, int64_t sb, float beta, void* C, int ct, int64_t ldc,
                     int64_t sc, int64_t batch) {
  std::vector<double> col((size_t)m);
  for (int64_t q = 0; q < batch; ++q) {
    const void* a = (const char*)A + q * sa * (int64_t)elem_size(at);
    const void* b = (const char*)B + q * sb * (int64_t)elem_size(bt);
    void* c = (char*)C + q * sc * (int64_t)elem_size(ct);
    for (int64_t j = 0; j < n; ++j) {
      std::fill(col.begin(), col.end(), 0.0);
      for (int64_t l = 0; l < k; ++l) {
        const double bv = load(b, bt, tb ? j + l * ldb : l + j * ldb);
        for (int64_t i = 0; i < m; ++i) {
          col[(size_t)i] += (double)load(a, at, ta ? l + i * lda : i + l * lda) * bv;
        }
      }
      for (int64_t i = 0; i < m; ++i) {
        float v = alpha * (float)col[(size_t)i];
        // beta == 0: C is not read (it may hold NaN), as in cuBLAS.
        if (beta != 0.0f) v += beta * load(c, ct, i + j * ldc);
        store(c, ct, i + j * ldc, v);
      }
    }
  }
}

cublasStatus_t cublasGemmEx_64(cublasHandle_t h, int transa, int transb, int64_t m, int64_t n,
                               int64_t k, const void* alpha, const void* A, int at, int64_t lda,
                               const void* B, int bt, int64_t ldb, const void* beta, void* C,
                               int ct, int64_t ldc, int compute, int algo) {
  COUNT_CALL();
  return cublasGemmStridedBatchedEx_64(h, transa, transb, m, n, k, alpha, A, at, lda, 0, B, bt,
                                       ldb, 0, beta, C, ct, ldc, 0, 1, compute, algo);
}

// The 32-bit entry points, for callers of cuBLAS other than the backend
// (gpu-bench's direct cuBLAS baseline).
cublasStatus_t cublasGemmEx(cublasHandle_t h, int transa, int transb, int m, int n, int k,
                            const void* alpha, const void* A, int at, int lda, const void* B,
                            int bt, int ldb, const void* beta, void* C, int ct, int ldc,
                            int compute, int algo) {
  COUNT_CALL();
  return cublasGemmEx_64(h, transa, transb, m, n, k, alpha, A, at, lda, B, bt, ldb, beta, C, ct,
                         ldc, compute, algo);
}

cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t h, int transa, int transb, int m, int n,
                                          int k, const void* alpha, const void* A, int at,
                                          int lda, long long sa, const void* B, int bt, int ldb,
                                          long long sb, const void* beta, void* C, int ct,
                                          int ldc, long long sc, int batch, int compute,
                                          int algo) {
  COUNT_CALL();
  return cublasGemmStridedBatchedEx_64(h, transa, transb, m, n, k, alpha, A, at, lda, sa, B, bt,
                                       ldb, sb, beta, C, ct, ldc, sc, batch, compute, algo);
}

cublasStatus_t cublasSgemm_v2(cublasHandle_t h, int transa, int transb, int m, int n, int k,
                              const float* alpha, const float* A, int lda, const float* B,
                              int ldb, const float* beta, float* C, int ldc) {
  COUNT_CALL();
  return cublasGemmEx_64(h, transa, transb, m, n, k, alpha, A, R_32F, lda, B, R_32F, ldb, beta, C,
                         R_32F, ldc, 68, -1);
}

}  // extern "C"
