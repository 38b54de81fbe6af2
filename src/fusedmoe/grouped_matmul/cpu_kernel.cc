// Grouped matmul kernels for the CPU, called from XLA through its FFI.
//
// Backend "cpu_kernel" (fusedmoe/grouped_matmul/cpu_kernel.py compiles this file on first
// use and registers the two handlers below). Why a kernel outside plain JAX:
// on XLA:CPU a dot cannot read a weight in place out of a [G, K, N] array nor
// write its result into a slab of a larger one, so a plain-JAX grouped matmul
// copies every expert's weight and every gradient slab (docs/notebook.md,
// "Where the layer's step goes"). Here each group's product reads its operands
// where they lie and writes its output where it belongs.
//
// One blocked GEMM (the BLIS loop structure) serves all three products; the
// operands are addressed through (row stride, column stride) pairs so that the
// transposes of the backward pass are just other strides:
//
//   forward  out[rows g]  = lhs[rows g] @ rhs[g]      A = lhs rows,   B = rhs[g]
//   dX       out[rows g]  = dout[rows g] @ rhs[g].T   A = dout rows,  B = rhs[g] read transposed
//   dW       out[g]       = lhs[rows g].T @ dout[rows g]   A = lhs rows transposed, B = dout rows
//
// Loops, outside in: column block (NC) -> contraction block (KC, pack B into a
// KC x NC buffer) -> row block (MC, pack A) -> NR-column panel -> MR-row
// sliver -> the MR x NR register tile over KC. (A product of few output rows
// with B's rows contiguous, above all the forward of a small group, takes
// another order, gemm_few_rows: B is packed one panel at a time by the tiles
// of the panel before. A dX, B read transposed, is computed as its
// transpose, gemm_weight_rows: the tile reads the weight's rows in place.
// Both have a bf16-pairs twin.) Packing copies the operands
// into the order the register tile reads them (and converts bf16 to f32, or
// keeps it as bf16 pairs where the CPU multiplies those: kBf16Pairs), so the
// tile's loads are sequential whatever the strides. Accumulation is f32; a
// bf16 output is rounded as the tile stores it, unless contraction blocks
// add up (then in an f32 scratch, rounded once).
//
// Threads split each product's output COLUMNS: the work is cut into one
// item per group and column range (one range per thread), which the threads
// take in turn, so no two threads write the same element and skewed group
// sizes cannot unbalance the work. Calls run one at a time (over_items).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include <immintrin.h>
#include <sched.h>
#include <unistd.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// The register tile is MR rows x two vectors. With AVX-512 (compiled with
// -mavx512f when the CPU has it) a vector holds 16 floats and the 32 vector
// registers take an 8 x 32 tile: 16 accumulators, and per contraction step 2
// loads and 8 broadcasts for 16 FMAs of 16 lanes, against 8 for 12 FMAs of 8
// lanes in AVX2's 6 x 16: fewer loads per FMA, which took the forward and dW
// at 64 groups much closer to the dense GEMM (measured on a Zen 4:
// docs/notebook.md, "`cpu_kernel`").
#ifdef __AVX512F__
constexpr int64_t kVec = 16;  // floats in a vector register
constexpr int64_t MR = 8;     // rows of the register tile
#else
constexpr int64_t kVec = 8;
constexpr int64_t MR = 6;
#endif
typedef float vec __attribute__((vector_size(kVec * 4)));
typedef float half_vec __attribute__((vector_size(kVec * 2)));  // half a register

constexpr int64_t NR = 2 * kVec;  // columns of the register tile
constexpr int64_t MC = 144;       // row block (a multiple of both MRs)
constexpr int64_t NC = 1024;      // column block

// The contraction block depends on how B is laid out. Where its rows are
// contiguous (the weight in the forward, dout in dW) it is long: 1024 steps,
// so at K <= 1024 each output tile is written once (streamed past the
// caches) instead of being read back and added to once per 256-step block,
// and A is packed once per group. Its B panels (128 KiB) stream from L2,
// which costs less than the passes over the output it saves (measured:
// docs/notebook.md, "`cpu_kernel`"). Where B is read transposed (the weight
// in dX) a long block made dX slower at the Qwen3 shape: the next block it
// prefetches no longer fits in cache. So dX keeps a block that fills L2 (256
// steps at 1 MiB, see Blocks) and a 32 KiB panel that L1 holds.
constexpr int64_t KC_ROWS = 1024;  // B rows contiguous: packed B is up to KC_ROWS*NC*4 = 4 MiB

// The L2 cache of a core, which the blocks below are sized to fill: as the
// CPU reports it (sysconf, which glibc reads from CPUID), or
// FUSEDMOE_L2_BYTES to try another size. The kernel was tuned on a Zen 4
// (1 MiB); a Xeon from Sapphire Rapids on has 2 MiB, a Zen 3 512 KiB.
int64_t l2_bytes() {
  static const int64_t bytes = [] {
    int64_t found = 0;
    if (const char* env = std::getenv("FUSEDMOE_L2_BYTES")) found = std::atoll(env);
    if (found <= 0) found = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (found <= 0) found = int64_t{1} << 20;  // not reported (some VMs): the common size
    return std::clamp<int64_t>(found, int64_t{256} << 10, int64_t{8} << 20);
  }();
  return bytes;
}

inline int64_t floor_pow2(int64_t x) { return int64_t{1} << (63 - __builtin_clzll(x)); }

// Block sizes derived from l2_bytes(), each filling L2:
//   kc_cols: the contraction block where B is read transposed (kc_cols x NC floats);
//   few_rows_steps: gemm_few_rows' longest contraction (two panels of NR floats a step);
//   weight_rows_steps: gemm_weight_rows' longest (one A^T panel of NR floats a step).
struct Blocks {
  int64_t kc_cols, few_rows_steps, weight_rows_steps;
};
constexpr int64_t kMaxKcCols = 1024;
const Blocks& blocks() {
  static const Blocks b = [] {
    const int64_t l2 = l2_bytes();
    return Blocks{std::clamp<int64_t>(floor_pow2(l2 / (NC * 4)), 64, kMaxKcCols),
                  l2 / (2 * NR * 4), l2 / (NR * 4)};
  }();
  return b;
}

// bf16 is the top half of an f32.
inline float to_f32(float x) { return x; }
inline float to_f32(uint16_t x) {
  uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline void from_f32(float x, float* out) { *out = x; }
inline void from_f32(float x, uint16_t* out) {  // round to nearest even; NaN stays NaN
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    *out = static_cast<uint16_t>((bits >> 16) | 0x40);
    return;
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);
  *out = static_cast<uint16_t>(bits >> 16);
}
// A vector of f32 as bf16, rounded as from_f32 rounds.
typedef uint32_t bits_vec __attribute__((vector_size(kVec * 4)));
typedef uint16_t bf16_vec __attribute__((vector_size(kVec * 2)));
inline bf16_vec to_bf16(vec v) {
  const bits_vec u = (bits_vec)v;
  const bits_vec rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const bits_vec out = (u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : rounded;
  return __builtin_convertvector(out, bf16_vec);
}

// A strided matrix view: element (i, j) is data[i * rs + j * cs].
template <typename T>
struct View {
  const T* data;
  int64_t rs, cs;
  T at(int64_t i, int64_t j) const { return data[i * rs + j * cs]; }
  const T* ptr(int64_t i, int64_t j) const { return data + i * rs + j * cs; }
};

// Pack rows [0, mc) x contraction [0, kc) of A into MR-row slivers:
// packed[s][p][i] = A(s*MR + i, p), rows past mc zero.
template <typename T>
void pack_a(View<T> a, int64_t mc, int64_t kc, float* packed) {
  for (int64_t s = 0; s < mc; s += MR) {
    const int64_t rows = std::min(MR, mc - s);
    float* dst = packed + s * kc;
    if (a.cs == 1) {  // rows contiguous: walk each row once
      for (int64_t i = 0; i < MR; ++i)
        for (int64_t p = 0; p < kc; ++p)
          dst[p * MR + i] = i < rows ? to_f32(a.at(s + i, p)) : 0.f;
    } else {  // columns contiguous (the transposed lhs of dW)
      for (int64_t p = 0; p < kc; ++p)
        for (int64_t i = 0; i < MR; ++i)
          dst[p * MR + i] = i < rows ? to_f32(a.at(s + i, p)) : 0.f;
    }
  }
}

// Eight consecutive elements as f32.
inline __m256 load8(const float* src) { return _mm256_loadu_ps(src); }
inline __m256 load8(const uint16_t* src) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

// dst[i * ld_dst + j] = src[j * ld_src + i] for an 8 x 8 block.
template <typename T>
void transpose8(const T* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = load8(src + i * ld_src);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ld_dst, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ld_dst, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

// Pack contraction [0, kc) x columns [0, nc) of B into NR-column panels:
// packed[q][p][j] = B(p, q*NR + j), columns past nc zero.
template <typename T>
void pack_b(View<T> b, int64_t kc, int64_t nc, float* packed) {
  if (b.cs == 1) {
    // Rows contiguous: read a few rows at a time, each as one stream, and deal
    // them out panel by panel, so each panel receives one contiguous run.
    // (Row by row, each row's 64-byte pieces land kc*NR*4 bytes apart: one
    // cache set, and the packing ran 4x below memory bandwidth.)
    constexpr int64_t kRows = 8;
    for (int64_t p0 = 0; p0 < kc; p0 += kRows) {
      const int64_t p1 = std::min(kc, p0 + kRows);
      for (int64_t q = 0; q < nc; q += NR) {
        const int64_t cols = std::min(NR, nc - q);
        for (int64_t p = p0; p < p1; ++p) {
          const T* src = b.data + p * b.rs + q;
          float* dst = packed + q * kc + p * NR;
          if (cols == NR) {  // fixed trip count: vectorized
            for (int64_t j = 0; j < NR; ++j) dst[j] = to_f32(src[j]);
          } else {
            for (int64_t j = 0; j < NR; ++j) dst[j] = j < cols ? to_f32(src[j]) : 0.f;
          }
        }
      }
    }
  } else {
    // Columns contiguous (the transposed weight of dX): 8 x 8 blocks are
    // transposed in registers, so each weight row is read as a run of 8 and
    // each panel row written as one.
    for (int64_t q = 0; q < nc; q += NR) {
      const int64_t cols = std::min(NR, nc - q);
      float* dst = packed + q * kc;
      int64_t p = 0;
      if (cols == NR) {
        for (; p + 8 <= kc; p += 8)
          for (int64_t j = 0; j < NR; j += 8)
            transpose8(b.data + p * b.rs + (q + j) * b.cs, b.cs, dst + p * NR + j, NR);
      }
      for (; p < kc; ++p)
        for (int64_t j = 0; j < NR; ++j) dst[p * NR + j] = j < cols ? to_f32(b.at(p, q + j)) : 0.f;
    }
  }
}

// How a register tile reaches c.
enum class Store {
  kOverwrite,   // c = tile
  kAccumulate,  // c += tile (contraction blocks after the first)
  kStream,      // c = tile, final, bypassing the caches: a write-only output
                // (a weight gradient slab) is not read for ownership first
};

// A register tile does some memory work on the side, a little every
// kStepsBetween contraction steps: spread out, its loads overlap the FMAs
// instead of stalling them (a burst of 64 prefetches after a tile stalled
// them). What the work is, is the tile's Side (below).
constexpr int64_t kStepsBetween = 4;
// (Only B read transposed, in blocks of kc_cols, is prefetched, one line per turn.)
constexpr int64_t kMaxPrefetchesPerTile = (kMaxKcCols + kStepsBetween - 1) / kStepsBetween;

// Steps p0..p1 of the register tile's top R rows, into acc. (A's packed
// slivers hold MR rows per step whatever R is.)
template <int R>
inline void tile_steps(int64_t p0, int64_t p1, const float* a, const float* b, vec (&acc)[R][2]) {
  for (int64_t p = p0; p < p1; ++p) {
    vec b0, b1;
    std::memcpy(&b0, b + p * NR, sizeof(vec));
    std::memcpy(&b1, b + p * NR + kVec, sizeof(vec));
#pragma GCC unroll 8  // all of R: a partly unrolled loop spills the accumulators
    for (int64_t i = 0; i < R; ++i) {
      const vec ai = a[p * MR + i] - vec{};  // broadcast
      acc[i][0] += ai * b0;
      acc[i][1] += ai * b1;
    }
  }
}

// Store the accumulators of a tile's R rows to c; only the top-left rows x cols.
// (A bf16 c is stored rounded, below.)
template <int R>
inline void store_tile(const vec (&acc)[R][2], float* c, int64_t ldc, Store store, int64_t rows,
                       int64_t cols) {
  if (rows == R && cols == NR) {  // whole rows: vector stores
    const bool aligned = reinterpret_cast<uintptr_t>(c) % sizeof(vec) == 0 && ldc % kVec == 0;
    for (int64_t i = 0; i < R; ++i) {
      for (int64_t h = 0; h < 2; ++h) {
        float* dst = c + i * ldc + kVec * h;
        vec v = acc[i][h];
        if (store == Store::kStream && aligned) {
#ifdef __AVX512F__
          _mm512_stream_ps(dst, reinterpret_cast<__m512>(v));
#else
          _mm256_stream_ps(dst, reinterpret_cast<__m256>(v));
#endif
          continue;
        }
        if (store == Store::kAccumulate) {
          vec old;
          std::memcpy(&old, dst, sizeof(vec));
          v += old;
        }
        std::memcpy(dst, &v, sizeof(vec));
      }
    }
    return;
  }
  float out[R][NR];
  std::memcpy(out, acc, sizeof(out));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j)
      c[i * ldc + j] = store == Store::kAccumulate ? c[i * ldc + j] + out[i][j] : out[i][j];
}

// The same into a bf16 c: rounded once, so never added to (Store::kAccumulate
// does not reach here; see gemm_into).
template <int R>
inline void store_tile(const vec (&acc)[R][2], uint16_t* c, int64_t ldc, Store, int64_t rows,
                       int64_t cols) {
  if (rows == R && cols == NR) {
    for (int64_t i = 0; i < R; ++i)
      for (int64_t h = 0; h < 2; ++h) {
        const bf16_vec v = to_bf16(acc[i][h]);
        std::memcpy(c + i * ldc + kVec * h, &v, sizeof(v));
      }
    return;
  }
  float out[R][NR];
  std::memcpy(out, acc, sizeof(out));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) from_f32(out[i][j], c + i * ldc + j);
}

// bf16 inputs on a CPU with AVX-512 BF16 (compiled with -mavx512bf16 where
// /proc/cpuinfo lists avx512_bf16): the register tile multiplies bf16 pairs
// with vdpbf16ps, c[j] += a[2p]*b[2p][j] + a[2p+1]*b[2p+1][j] in f32, twice
// the multiply-adds per instruction of the f32 tile and half the packed
// bytes. Packing keeps the inputs in bf16, two consecutive contraction steps
// side by side in one 32-bit word.
#if defined(__AVX512BF16__)
constexpr bool kBf16Pairs = true;
#else
constexpr bool kBf16Pairs = false;
#endif

inline uint32_t pair(uint16_t lo, uint16_t hi) { return lo | static_cast<uint32_t>(hi) << 16; }

// The functions below are templates so that a build without AVX-512 BF16
// never instantiates them (kBf16Pairs is false there).

// dst[i] = (lo[i], hi[i]) for i < 8: two rows of 8 bf16 as 8 pair words.
inline void interleave8(const void* lo, const void* hi, uint32_t* dst) {
  const __m128i l = _mm_loadu_si128(static_cast<const __m128i*>(lo));
  const __m128i h = _mm_loadu_si128(static_cast<const __m128i*>(hi));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm_unpacklo_epi16(l, h));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 4), _mm_unpackhi_epi16(l, h));
}

// packed[s][q][i] = (A(s*MR + i, 2q), A(s*MR + i, 2q + 1)), rows past mc and
// steps past kc zero.
// Whole slivers take vector paths: rows contiguous (a group's rows in the
// forward), a pair is a 32-bit word of a row, so 8 x 8 blocks of words are
// transposed; columns contiguous (the transposed rows of dW), two rows of 8
// bf16 are interleaved into 8 words. The rest, element by element.
template <typename T>
void pack_a_pairs(View<T> a, int64_t mc, int64_t kc, uint32_t* packed) {
  const int64_t kp = (kc + 1) / 2;
  const bool whole = MR == 8;  // the vector paths pack 8-row slivers (MR is 8 where pairs are)
  const bool words = a.cs == 1 && a.rs % 2 == 0 && reinterpret_cast<uintptr_t>(a.data) % 4 == 0;
  for (int64_t s = 0; s < mc; s += MR) {
    const int64_t rows = std::min(MR, mc - s);
    uint32_t* dst = packed + s * kp;
    int64_t q0 = 0;  // pairs [0, q0) are packed
    if (whole && rows == MR && words) {
      for (; 2 * (q0 + 8) <= kc; q0 += 8)
        transpose8(reinterpret_cast<const float*>(a.ptr(s, 2 * q0)), a.rs / 2,
                   reinterpret_cast<float*>(dst + q0 * MR), MR);
    } else if (whole && rows == MR && a.rs == 1) {
      for (; 2 * q0 + 1 < kc; ++q0)
        interleave8(a.ptr(s, 2 * q0), a.ptr(s, 2 * q0 + 1), dst + q0 * MR);
    }
    for (int64_t i = 0; i < MR; ++i)
      for (int64_t q = q0; q < kp; ++q) {
        const bool row = i < rows, second = 2 * q + 1 < kc;
        dst[q * MR + i] = row ? pair(a.at(s + i, 2 * q), second ? a.at(s + i, 2 * q + 1) : 0) : 0;
      }
  }
}

// packed[r][q][j] = (B(2q, r*NR + j), B(2q + 1, r*NR + j)), columns past nc
// and steps past kc zero.
template <typename T>
void pack_b_pairs(View<T> b, int64_t kc, int64_t nc, uint32_t* packed) {
  const int64_t kp = (kc + 1) / 2;
  if (b.cs == 1) {
    // Rows contiguous: two rows at a time, widened to 32 bits and interleaved
    // (the second row in the high half), a few row pairs per sweep as in pack_b.
    constexpr int64_t kPairsPerSweep = 4;
    for (int64_t q0 = 0; q0 < kp; q0 += kPairsPerSweep) {
      const int64_t q1 = std::min(kp, q0 + kPairsPerSweep);
      for (int64_t r = 0; r < nc; r += NR) {
        const int64_t cols = std::min(NR, nc - r);
        for (int64_t q = q0; q < q1; ++q) {
          const T* lo = b.data + 2 * q * b.rs + r;
          const T* hi = 2 * q + 1 < kc ? lo + b.rs : nullptr;
          uint32_t* dst = packed + r * kp + q * NR;
          if (cols == NR) {
            for (int64_t j = 0; j < NR; j += 16) {
              const __m512i l = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo + j)));
              const __m512i h = hi ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi + j)))
                                   : _mm512_setzero_si512();
              _mm512_storeu_si512(dst + j, _mm512_or_si512(l, _mm512_slli_epi32(h, 16)));
            }
          } else {
            for (int64_t j = 0; j < NR; ++j) dst[j] = j < cols ? pair(lo[j], hi ? hi[j] : 0) : 0;
          }
        }
      }
    }
  } else {
    // Columns contiguous (the weight of dX): a pair is one 32-bit word of a
    // weight row, so 8 x 8 blocks of words are transposed in registers.
    const bool words = b.rs == 1 && b.cs % 2 == 0;
    for (int64_t r = 0; r < nc; r += NR) {
      const int64_t cols = std::min(NR, nc - r);
      uint32_t* dst = packed + r * kp;
      int64_t q = 0;
      if (words && cols == NR) {
        for (; 2 * (q + 8) <= kc; q += 8)
          for (int64_t j = 0; j < NR; j += 8)
            transpose8(reinterpret_cast<const float*>(b.data + (r + j) * b.cs + 2 * q), b.cs / 2,
                       reinterpret_cast<float*>(dst + q * NR + j), NR);
      }
      for (; q < kp; ++q)
        for (int64_t j = 0; j < NR; ++j)
          dst[q * NR + j] =
              j < cols ? pair(b.at(2 * q, r + j), 2 * q + 1 < kc ? b.at(2 * q + 1, r + j) : 0) : 0;
    }
  }
}

template <int R, typename Word>
void tile_pair_steps(int64_t q0, int64_t q1, const Word* a, const Word* b, vec (&acc)[R][2]) {
  for (int64_t q = q0; q < q1; ++q) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + q * NR);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + q * NR + kVec);
#pragma GCC unroll 8
    for (int64_t i = 0; i < R; ++i) {
      const __m512bh ai = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[q * MR + i]));
      acc[i][0] = (vec)_mm512_dpbf16_ps((__m512)acc[i][0], ai, b0);
      acc[i][1] = (vec)_mm512_dpbf16_ps((__m512)acc[i][1], ai, b1);
    }
  }
}

// A share of `work` units for each turn of a tile of `steps` contraction
// steps (all of it in one turn if there are none), so the last turn ends it.
inline int64_t share_per_turn(int64_t work, int64_t steps) {
  const int64_t turns = (steps + kStepsBetween - 1) / kStepsBetween;
  return turns > 0 ? (work + turns - 1) / turns : work;
}

// Side work of a register tile (see kStepsBetween) has three methods: while
// busy(i), turn(i) runs before the i-th group of steps; finish() runs after
// the last step. There are two kinds, below.

// Prefetch `count` lines (at most kMaxPrefetchesPerTile), one per turn.
struct PrefetchLines {
  const char* const* lines;
  int64_t count;
  bool busy(int64_t i) const { return i < count; }
  void turn(int64_t i) { _mm_prefetch(lines[i], _MM_HINT_T0); }
  void finish() {}
};

// Copy `rows` rows of a B panel (NR floats each, source row stride `rs`)
// into their packed place (row stride NR), as two vectors per row, spread
// evenly over the turns: gemm_few_rows packs the next panel this way while
// the tiles of the current one run. Each row is prefetched into L2
// kPanelPrefetchRows rows ahead, not into L1: the source rows are a whole
// weight row (8 KiB at N=2048) apart, so they all fall in the same few L1
// sets, and prefetching into L1 (hint T0) was slower (measured:
// docs/backends.md, "How `cpu_kernel` works").
constexpr int64_t kPanelPrefetchRows = 24;
struct CopyPanelRows {
  const float* src;
  int64_t rs;
  float* dst;
  int64_t rows;
  int64_t rows_in_source;  // rows readable from src (prefetches stay inside)
  int64_t per_turn = 0;    // vectors per turn
  int64_t done = 0;        // vectors copied

  void plan(int64_t steps) { per_turn = share_per_turn(2 * rows, steps); }
  void copy(int64_t v) {
    const int64_t r = v / 2, h = v % 2;
    if (r + kPanelPrefetchRows < rows_in_source)
      _mm_prefetch(reinterpret_cast<const char*>(src + (r + kPanelPrefetchRows) * rs + h * kVec),
                   _MM_HINT_T1);
    std::memcpy(dst + r * NR + h * kVec, src + r * rs + h * kVec, sizeof(vec));
  }
  bool busy(int64_t) const { return done < 2 * rows; }
  void turn(int64_t) {
    for (const int64_t end = std::min(2 * rows, done + per_turn); done < end; ++done) copy(done);
  }
  void finish() {
    for (; done < 2 * rows; ++done) copy(done);
  }
};

// CopyPanelRows for bf16 pairs: `pairs` pair rows of a B panel, each two
// source rows (row stride `rs`) of NR bf16 interleaved into NR 32-bit words
// (the second row in the high half; a row past the contraction, zero), as
// two 16-word halves per pair row, spread evenly over the turns.
// (A template, so that a build without AVX-512 never instantiates it.)
template <typename T>
struct CopyPanelPairs {
  const T* src;  // source row 2 * (first pair row)
  int64_t rs;
  uint32_t* dst;
  int64_t pairs;
  int64_t rows_in_source;  // source rows readable from src (the last may be unpaired)
  int64_t per_turn = 0;    // halves per turn
  int64_t done = 0;        // halves copied

  void plan(int64_t steps) { per_turn = share_per_turn(2 * pairs, steps); }
  void copy(int64_t v) {
    const int64_t r = v / 2, h = v % 2;
    const T* lo = src + 2 * r * rs + h * kVec;
    if (h == 0 && 2 * (r + kPanelPrefetchRows) + 1 < rows_in_source) {
      _mm_prefetch(reinterpret_cast<const char*>(lo + 2 * kPanelPrefetchRows * rs), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(lo + (2 * kPanelPrefetchRows + 1) * rs), _MM_HINT_T1);
    }
    const __m512i l = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo)));
    const __m512i hi = 2 * r + 1 < rows_in_source
        ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo + rs)))
        : _mm512_setzero_si512();
    _mm512_storeu_si512(dst + r * NR + h * kVec, _mm512_or_si512(l, _mm512_slli_epi32(hi, 16)));
  }
  bool busy(int64_t) const { return done < 2 * pairs; }
  void turn(int64_t) {
    for (const int64_t end = std::min(2 * pairs, done + per_turn); done < end; ++done) copy(done);
  }
  void finish() {
    for (; done < 2 * pairs; ++done) copy(done);
  }
};

// A tile's contraction steps [0, steps), run(p0, p1) at a time, with the
// side work's turns between groups of kStepsBetween steps.
template <typename Side, typename Run>
inline void steps_with_side(int64_t steps, Side& side, const Run& run) {
  int64_t p = 0;
  for (int64_t i = 0; p < steps && side.busy(i); p += kStepsBetween, ++i) {
    side.turn(i);
    run(p, std::min(steps, p + kStepsBetween));
  }
  run(std::min(p, steps), steps);
  side.finish();
}

// The register tile: acc[R x NR] = sum_p a[p][:R] (x) b[p][:] over `steps`
// packed contraction steps (f32 values, or bf16 pairs), then stored to c.
// Only the top-left rows x cols of it are written. `side` runs between its
// steps (see kStepsBetween).
//
// R is MR but for a group's last few rows, which get a tile of just as many
// rows (row_tile below): groups are cut at arbitrary rows, and a full MR-row
// tile over the remainder computed up to MR - 1 rows per group for nothing,
// a noticeable share at ~64 rows per group.
template <typename Packed, int R, typename Side, typename TC>
void tile(int64_t steps, const Packed* a, const Packed* b, TC* c, int64_t ldc, Store store,
          int64_t rows, int64_t cols, Side& side) {
  vec acc[R][2] = {};
  steps_with_side(steps, side, [&](int64_t p0, int64_t p1) {
    if constexpr (std::is_same_v<Packed, float>) tile_steps<R>(p0, p1, a, b, acc);
    else tile_pair_steps<R>(p0, p1, a, b, acc);
  });
  store_tile<R>(acc, c, ldc, store, rows, cols);
}

// tile<Packed, R> with R = rows (1 <= rows <= MR), chosen at run time.
template <typename Packed, typename Side, typename TC, int R = MR>
void row_tile(int64_t steps, const Packed* a, const Packed* b, TC* c, int64_t ldc, Store store,
              int64_t rows, int64_t cols, Side& side) {
  if constexpr (R > 1) {
    if (rows < R) {
      row_tile<Packed, Side, TC, R - 1>(steps, a, b, c, ldc, store, rows, cols, side);
      return;
    }
  }
  tile<Packed, R>(steps, a, b, c, ldc, store, rows, cols, side);
}

// Each thread's packing buffers, and its f32 scratch for 16-bit outputs.
struct Buffers {
  std::vector<float> a, b;          // packed f32 operands
  std::vector<uint32_t> a2, b2;     // packed bf16 pairs (kBf16Pairs)
  std::vector<uint16_t> a16;        // packed bf16 rows (AMX)
  std::vector<float> c;
  bool tiles_configured = false;    // AMX tile registers set up on this thread

  // The A or B buffer of packed f32 values (Packed float) or bf16 pairs (uint32_t).
  template <typename Packed>
  std::vector<Packed>& packed_a() {
    if constexpr (std::is_same_v<Packed, float>) return a; else return a2;
  }
  template <typename Packed>
  std::vector<Packed>& packed_b() {
    if constexpr (std::is_same_v<Packed, float>) return b; else return b2;
  }
};

template <typename TOut>
void zero_columns(TOut* c, int64_t rows, int64_t ldc, int64_t n_lo, int64_t n_hi) {
  for (int64_t i = 0; i < rows; ++i) std::memset(c + i * ldc + n_lo, 0, (n_hi - n_lo) * sizeof(TOut));
}


// The memory lines of a block of B read transposed (its columns contiguous),
// handed out a few at a time to be prefetched.
template <typename T>
struct BlockPrefetch {
  const char* base = nullptr;  // the line holding the block's first element
  int64_t columns = 0;         // contiguous runs of memory
  int64_t stride = 0;          // bytes between them
  int64_t lines = 0;           // 64-byte lines per run
  int64_t column = 0, line = 0;  // the next line to prefetch

  BlockPrefetch() = default;
  BlockPrefetch(View<T> b, int64_t kc, int64_t nc)
      : columns(nc), stride(b.cs * static_cast<int64_t>(sizeof(T))) {
    const uintptr_t start = reinterpret_cast<uintptr_t>(b.data);
    base = reinterpret_cast<const char*>(start - start % 64);
    lines = (start % 64 + kc * static_cast<int64_t>(sizeof(T)) + 63) / 64;
  }
  int64_t total() const { return columns * lines; }
  // The addresses of the next `count` lines (fewer at the end) into out.
  int64_t next(int64_t count, const char** out) {
    int64_t n = 0;
    for (; n < count && column < columns; ++n) {
      out[n] = base + column * stride + line * 64;
      if (++line == lines) {
        line = 0;
        ++column;
      }
    }
    return n;
  }
};

// The longest contraction gemm_few_rows takes (Blocks::few_rows_steps): its
// two panels then fill L2, 4096 x NR floats each at 1 MiB; up to there it
// still beat the blocked loops (docs/notebook.md, "`cpu_kernel`"). bf16
// pairs pack two steps in the bytes of one f32 step: the same
// panels hold twice the contraction (a fused FFN1's dX contracts 2 x
// mlp_dim). gemm_weight_rows keeps one A^T panel of k x NR floats
// (Blocks::weight_rows_steps: 8192 steps at 1 MiB; half that as pairs).

// c[0:m, 0:n] = A[0:m, 0:k] @ B[0:k, 0:n] for f32 operands (or bf16 pairs)
// with B's rows contiguous, k <= Blocks::few_rows_steps (twice that as pairs)
// and m <= MC: a group of an expert's weight
// with few rows (64 at G=64 in the benchmark), where reading the weight costs
// about a fifth of the arithmetic. Instead of packing a whole KC x NC block
// of B first (memory-bound, the FMAs idle) and then computing on it (the
// memory idles), B is packed one NR-column panel at a time into two
// alternating buffers: the first panel up front, each next one by the tiles
// of the current panel, a few rows per tile, between their steps
// (CopyPanelRows, CopyPanelPairs). A is packed once; every output tile is
// written once.
// The copies then overlap the FMAs: faster than packing whole blocks first
// for groups of tens of rows (G=64 balanced, and the Qwen3 and DeepSeek
// layer shapes; measured: docs/backends.md, "How `cpu_kernel` works"). At 64
// skewed groups, many of a few rows (too little arithmetic to hide their
// weight's reads), no clear gain.
template <typename TIn, typename TC>
void gemm_few_rows(int64_t m, int64_t n, int64_t k, View<TIn> a, View<TIn> b, TC* c,
                   int64_t ldc, Buffers& bufs) {
  // f32 values, or bf16 pairs (gemm_into sends bf16 here only where the CPU
  // multiplies pairs): a packed step is one contraction step, or two.
  constexpr bool pairs = std::is_same_v<TIn, uint16_t>;
  using Packed = std::conditional_t<pairs, uint32_t, float>;
  const int64_t tiles = (m + MR - 1) / MR, steps = pairs ? (k + 1) / 2 : k;
  std::vector<Packed>& packed_a = bufs.packed_a<Packed>();
  std::vector<Packed>& packed_b = bufs.packed_b<Packed>();
  auto pack_panel = [&](View<TIn> panel_b, int64_t cols, Packed* out) {
    if constexpr (pairs) pack_b_pairs(panel_b, k, cols, out);
    else pack_b(panel_b, k, cols, out);
  };
  packed_a.resize(std::max(packed_a.size(), static_cast<size_t>(MC * steps)));
  packed_b.resize(std::max(packed_b.size(), static_cast<size_t>(2 * steps * NR)));
  if constexpr (pairs) pack_a_pairs(a, m, k, packed_a.data());
  else pack_a(a, m, k, packed_a.data());
  Packed* panels[2] = {packed_b.data(), packed_b.data() + steps * NR};
  pack_panel(b, std::min(NR, n), panels[0]);
  for (int64_t q = 0; q * NR < n; ++q) {
    const Packed* panel = panels[q % 2];
    Packed* next_panel = panels[(q + 1) % 2];
    const int64_t cols = std::min(NR, n - q * NR);
    const int64_t next_cols = std::min(NR, n - (q + 1) * NR);  // <= 0: this is the last
    const bool copy_next = next_cols == NR;  // a narrower last panel is packed below, padded
    for (int64_t t = 0; t < tiles; ++t) {
      // This tile's share of the next panel's packed rows: [r0, r1).
      const int64_t r0 = copy_next ? steps * t / tiles : 0;
      const int64_t r1 = copy_next ? steps * (t + 1) / tiles : 0;
      auto side = [&] {
        if constexpr (pairs)
          return CopyPanelPairs<TIn>{b.data + 2 * r0 * b.rs + (q + 1) * NR, b.rs,
                                     next_panel + r0 * NR, r1 - r0, k - 2 * r0};
        else
          return CopyPanelRows{b.data + r0 * b.rs + (q + 1) * NR, b.rs, next_panel + r0 * NR,
                               r1 - r0, k - r0};
      }();
      side.plan(steps);
      row_tile(steps, packed_a.data() + t * MR * steps, panel, c + t * MR * ldc + q * NR, ldc,
               Store::kStream, std::min(MR, m - t * MR), cols, side);
    }
    if (next_cols > 0 && !copy_next)
      pack_panel(View<TIn>{b.data + (q + 1) * NR, b.rs, 1}, next_cols, next_panel);
  }
}


// How many NR-column panels of A^T gemm_weight_rows takes at once: up to 4
// (128 rows with AVX-512; 32 to 128 measured alike at G=8 and G=64), fewer
// where 4 would not fit L2 at a contraction of k steps.
inline int64_t weight_rows_panels(int64_t k) {
  return std::clamp<int64_t>(l2_bytes() / (k * NR * 4), 1, 4);
}

// Prefetch `count` rows of `lines` 64-byte lines each into L2, line by line
// across the rows, a share per turn (gemm_weight_rows: the next rows of the
// weight while the tile multiplies the current ones; into L1 measured the
// same).
struct PrefetchRows {
  const char* const* rows;
  int64_t count, lines, per_turn;
  int64_t done = 0;
  bool busy(int64_t) const { return done < count * lines; }
  void turn(int64_t) {
    for (const int64_t end = std::min(count * lines, done + per_turn); done < end; ++done)
      _mm_prefetch(rows[done % count] + (done / count) * 64, _MM_HINT_T1);
  }
  void finish() {}
};

// acc[MR x NR] = sum_p w[i][p] (x) b[p][:], stored transposed: tile row i
// to c column i, tile column j to c row j (rows x cols of it).
//
// V vectors (of type Vec) of the panel's columns: 1 where at most kVec
// columns are used, half the FMAs for a group of a few rows, whose weight
// still has to be read whole (against 2 always: faster where groups are
// skewed, unchanged where balanced); and a half vector where at most
// kVec / 2 are (AMD's Zen 4 runs a 512-bit FMA as two 256-bit halves: a
// small further gain for skewed groups). Measured: docs/backends.md, "How
// `cpu_kernel` works".
template <typename Vec, int V, typename Side, typename TC>
void tile_weight_rows(int64_t steps, const float* const* w, const float* b, TC* c, int64_t ldc,
                      int64_t rows, int64_t cols, Side& side) {
  constexpr int64_t lanes = sizeof(Vec) / sizeof(float);
  Vec acc[MR][V] = {};
  steps_with_side(steps, side, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      Vec bv[V];
      for (int64_t h = 0; h < V; ++h) std::memcpy(&bv[h], b + p * NR + h * lanes, sizeof(Vec));
#pragma GCC unroll 8
      for (int64_t i = 0; i < MR; ++i) {
        const Vec wi = w[i][p] - Vec{};  // broadcast
        for (int64_t h = 0; h < V; ++h) acc[i][h] += wi * bv[h];
      }
    }
  });
  float out[MR][V * lanes];
  std::memcpy(out, acc, sizeof(out));
  for (int64_t j = 0; j < cols; ++j)
    for (int64_t i = 0; i < rows; ++i) from_f32(out[i][j], c + j * ldc + i);
}

// tile_weight_rows for bf16 pairs (a template: a build without AVX-512 BF16
// never instantiates it): w[i] is a weight row read in place as
// 32-bit words, each a pair of consecutive contraction steps (its columns
// are the contraction here); b a panel packed as pairs. V vectors of 16
// columns: 1 where at most 16 columns are used.
template <int V, typename Side, typename TC>
void tile_weight_rows_pairs(int64_t steps, const uint32_t* const* w, const uint32_t* b, TC* c,
                            int64_t ldc, int64_t rows, int64_t cols, Side& side) {
  __m512 acc[MR][V];
  for (auto& row : acc)
    for (auto& v : row) v = _mm512_setzero_ps();
  steps_with_side(steps, side, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      __m512bh bv[V];
      for (int64_t h = 0; h < V; ++h) bv[h] = (__m512bh)_mm512_loadu_si512(b + q * NR + h * kVec);
#pragma GCC unroll 8
      for (int64_t i = 0; i < MR; ++i) {
        const __m512bh wi = (__m512bh)_mm512_set1_epi32(static_cast<int>(w[i][q]));
        for (int64_t h = 0; h < V; ++h) acc[i][h] = _mm512_dpbf16_ps(acc[i][h], wi, bv[h]);
      }
    }
  });
  float out[MR][V * kVec];
  std::memcpy(out, acc, sizeof(out));
  for (int64_t j = 0; j < cols; ++j)
    for (int64_t i = 0; i < rows; ++i) from_f32(out[i][j], c + j * ldc + i);
}

// Whether gemm_weight_rows can read B's rows in place as bf16 pairs: an even
// contraction (no pair runs past a row) and rows that start on 32-bit words.
template <typename T>
bool weight_rows_are_pairs(int64_t k, View<T> b) {
  return k % 2 == 0 && b.cs % 2 == 0 && reinterpret_cast<uintptr_t>(b.data) % 4 == 0;
}

// c[0:m, 0:n] = A[0:m, 0:k] @ B[0:k, 0:n] for f32 operands (or bf16 pairs) with B read
// transposed (B(p, j) = b.data[j * b.cs + p]: the weight in dX, stored
// [n, k]), m at most a few panels (weight_rows_panels), computed as
// c^T = B^T @ A^T: A^T (the group's dout rows, small) is packed as NR-column
// panels that stay in L2, and the register tile multiplies MR rows of the
// weight, read in place and in order, by each panel, its result stored
// transposed. The blocked loops instead packed the weight itself, 8 x 8
// blocks transposed, into panels used by only a few register tiles when a
// group has few rows. The next MR weight rows are prefetched between the
// tile's steps (PrefetchRows). Faster than the blocked loops at every group
// count measured, most where groups have tens of rows; least where many
// groups have a few rows (skewed), each still reading its whole weight (a
// narrower tile for those, see tile_weight_rows). Measured:
// docs/backends.md, "How `cpu_kernel` works".
template <typename TIn, typename TC>
void gemm_weight_rows(int64_t m, int64_t n, int64_t k, View<TIn> a, View<TIn> b, TC* c,
                      int64_t ldc, Buffers& bufs) {
  // f32 values, or bf16 pairs (weight_rows_are_pairs(k, b)): the weight's rows
  // read as 32-bit words, each two contraction steps.
  constexpr bool pairs = std::is_same_v<TIn, uint16_t>;
  using Packed = std::conditional_t<pairs, uint32_t, float>;
  const int64_t panels = (m + NR - 1) / NR, steps = pairs ? k / 2 : k;
  std::vector<Packed>& packed = bufs.packed_b<Packed>();
  packed.resize(std::max(packed.size(), static_cast<size_t>(panels * steps * NR)));
  if constexpr (pairs) pack_b_pairs(View<TIn>{a.data, a.cs, a.rs}, k, m, packed.data());
  else pack_b(View<TIn>{a.data, a.cs, a.rs}, k, m, packed.data());
  auto sliver = [&](int64_t s, const Packed* (&w)[MR]) {
    for (int64_t i = 0; i < MR; ++i)
      w[i] = reinterpret_cast<const Packed*>(b.data + std::min(s + i, n - 1) * b.cs);
  };
  const int64_t lines = (k * sizeof(TIn) + 63) / 64 + 1;  // + 1: a row need not start a line
  for (int64_t s = 0; s < n; s += MR) {
    const Packed* w[MR];
    const Packed* w_next[MR];
    sliver(s, w);
    const int64_t next_rows = std::max<int64_t>(0, std::min(MR, n - s - MR));
    if (next_rows > 0) sliver(s + MR, w_next);
    const char* next_lines[MR];
    for (int64_t i = 0; i < next_rows; ++i) next_lines[i] = reinterpret_cast<const char*>(w_next[i]);
    PrefetchRows side{next_lines, next_rows, lines, share_per_turn(next_rows * lines, steps)};
    for (int64_t q = 0; q < panels; ++q) {
      TC* out = c + q * NR * ldc + s;
      const int64_t rows = std::min(MR, n - s), cols = std::min(NR, m - q * NR);
      const Packed* panel = packed.data() + q * steps * NR;
      auto run_tile = [&](auto& tile_side) {
        if constexpr (pairs) {
          if (cols > kVec) tile_weight_rows_pairs<2>(steps, w, panel, out, ldc, rows, cols, tile_side);
          else tile_weight_rows_pairs<1>(steps, w, panel, out, ldc, rows, cols, tile_side);
        } else if (cols > kVec) {
          tile_weight_rows<vec, 2>(steps, w, panel, out, ldc, rows, cols, tile_side);
        } else if (cols > kVec / 2) {
          tile_weight_rows<vec, 1>(steps, w, panel, out, ldc, rows, cols, tile_side);
        } else {
          tile_weight_rows<half_vec, 1>(steps, w, panel, out, ldc, rows, cols, tile_side);
        }
      };
      PrefetchLines none{nullptr, 0};  // the first panel's tile prefetches
      if (q == 0) run_tile(side);
      else run_tile(none);
    }
  }
}

#ifdef FUSEDMOE_AMX
#include "cpu_kernel_amx.h"
#else
constexpr int64_t KC_AMX = 0;  // (no AMX in this build)
#endif

// Whether a bf16 product of m rows runs on AMX tiles: in a build with them,
// where the process may use them (amx_ready), past kAmxMinRows rows.
template <typename TIn>
bool uses_amx([[maybe_unused]] int64_t m) {
#ifdef FUSEDMOE_AMX
  if constexpr (std::is_same_v<TIn, uint16_t>) return amx_ready() && m >= kAmxMinRows;
#endif
  return false;
}

// c[0:m, 0:n] = A[0:m, 0:k] @ B[0:k, 0:n], c (f32 or bf16) of row stride
// ldc. `next` is the B of the product that follows on this thread (data null
// if none), of the same k and n.
//
// Where B is read transposed (the weight in dX), its packing walks NR columns
// of memory at once, more streams than the hardware prefetcher follows, so
// the lines of the next block are prefetched a few per register tile of this
// one (the last block prefetches `next`'s first), which made dX faster,
// balanced and skewed. Where B's rows are contiguous (forward, dW) the
// hardware prefetcher keeps up, and neither this nor packing the next block
// between the tiles helped (docs/notebook.md, "`cpu_kernel`"); what did help,
// for groups of few rows, is packing one panel at a time (gemm_few_rows).
template <typename TIn, typename TC>
void gemm_into(int64_t m, int64_t n, int64_t k, View<TIn> a, View<TIn> b, TC* c, int64_t ldc,
               Buffers& bufs, View<TIn> next = {}) {
  if (k == 0) {  // an empty sum: no contraction block would write c
    zero_columns(c, m, ldc, 0, n);
    return;
  }
  // The shortcuts for few rows, in f32 or as bf16 pairs (not bf16 widened to f32).
  constexpr bool pairs = kBf16Pairs && std::is_same_v<TIn, uint16_t>;
  const bool amx = uses_amx<TIn>(m);
#ifdef FUSEDMOE_AMX
  if constexpr (std::is_same_v<TIn, uint16_t>) {
    if (amx && amx_weight_rows_fit(k, b)) {
      gemm_amx_weight_rows(m, n, k, a, b, c, ldc, bufs);
      return;
    }
  }
#endif
  if constexpr (pairs || std::is_same_v<TIn, float>) {
    const Blocks& sizes = blocks();
    if (!amx && b.cs == 1 && k <= sizes.few_rows_steps * (pairs ? 2 : 1) && m <= MC) {
      gemm_few_rows(m, n, k, a, b, c, ldc, bufs);
      return;
    }
    if (!amx && b.rs == 1 && b.cs != 1 && k <= sizes.weight_rows_steps &&
        (!pairs || weight_rows_are_pairs(k, b))) {
      // More rows than a few panels: in chunks, each reading the weight again
      // (a pair panel holds k / 2 words a column).
      const int64_t chunk = weight_rows_panels(pairs ? (k + 1) / 2 : k) * NR;
      for (int64_t i = 0; i < m; i += chunk)
        gemm_weight_rows(std::min(chunk, m - i), n, k, View<TIn>{a.data + i * a.rs, a.rs, a.cs},
                         b, c + i * ldc, ldc, bufs);
      return;
    }
  }
  // The contraction block (see KC_ROWS).
  const int64_t KC = amx ? KC_AMX : b.cs == 1 ? KC_ROWS : blocks().kc_cols;
  if constexpr (!std::is_same_v<TC, float>) {
    if (k > KC) {
      // Contraction blocks add up: summed in an f32 scratch, rounded once
      // (rounding after every block would lose precision).
      bufs.c.resize(std::max(bufs.c.size(), static_cast<size_t>(m * n)));
      gemm_into(m, n, k, a, b, bufs.c.data(), n, bufs, next);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j) from_f32(bufs.c[i * n + j], c + i * ldc + j);
      return;
    }
  }
#ifdef FUSEDMOE_AMX
  if constexpr (std::is_same_v<TIn, uint16_t>) {
    if (amx) {
      gemm_amx(m, n, k, a, b, c, ldc, bufs);
      return;
    }
  }
#endif
  if constexpr (pairs) {
    bufs.a2.resize(MC * KC / 2);
    bufs.b2.resize(KC * NC / 2);
  } else {
    bufs.a.resize(MC * KC);
    bufs.b.resize(KC * NC);
  }
  const int64_t tiles_per_block = ((std::min(NC, n) + NR - 1) / NR) * ((m + MR - 1) / MR);
  for (int64_t jc = 0; jc < n; jc += NC) {
    const int64_t nc = std::min(NC, n - jc);
    for (int64_t pc = 0; pc < k; pc += KC) {
      const int64_t kc = std::min(KC, k - pc);
      const Store store = pc > 0 ? Store::kAccumulate
                          : k <= KC ? Store::kStream
                                    : Store::kOverwrite;
      const View<TIn> block{b.data + pc * b.rs + jc * b.cs, b.rs, b.cs};
      const int64_t steps = pairs ? (kc + 1) / 2 : kc;  // packed contraction steps
      if constexpr (pairs) pack_b_pairs(block, kc, nc, bufs.b2.data());
      else pack_b(block, kc, nc, bufs.b.data());
      BlockPrefetch<TIn> prefetch;  // of the next block, if B is read transposed
      if (b.cs == 1) {
      } else if (pc + KC < k)
        prefetch = BlockPrefetch<TIn>({b.data + (pc + KC) * b.rs + jc * b.cs, b.rs, b.cs},
                                      std::min(KC, k - pc - KC), nc);
      else if (jc + NC < n)
        prefetch = BlockPrefetch<TIn>({b.data + (jc + NC) * b.cs, b.rs, b.cs}, std::min(KC, k),
                                      std::min(NC, n - jc - NC));
      else if (next.data != nullptr)
        prefetch = BlockPrefetch<TIn>(next, std::min(KC, k), std::min(NC, n));
      const int64_t per_tile =
          std::min((prefetch.total() + tiles_per_block - 1) / tiles_per_block,
                   (KC + kStepsBetween - 1) / kStepsBetween);  // a tile's turns
      const char* addresses[kMaxPrefetchesPerTile] = {};
      for (int64_t ic = 0; ic < m; ic += MC) {
        const int64_t mc = std::min(MC, m - ic);
        const View<TIn> rows{a.data + ic * a.rs + pc * a.cs, a.rs, a.cs};
        if constexpr (pairs) pack_a_pairs(rows, mc, kc, bufs.a2.data());
        else pack_a(rows, mc, kc, bufs.a.data());
        for (int64_t jr = 0; jr < nc; jr += NR) {
          for (int64_t ir = 0; ir < mc; ir += MR) {
            PrefetchLines side{addresses, prefetch.next(per_tile, addresses)};
            TC* out = c + (ic + ir) * ldc + jc + jr;
            const int64_t tile_rows = std::min(MR, mc - ir), tile_cols = std::min(NR, nc - jr);
            if constexpr (pairs)
              row_tile(steps, bufs.a2.data() + ir * steps, bufs.b2.data() + jr * steps, out, ldc, store,
                       tile_rows, tile_cols, side);
            else
              row_tile(steps, bufs.a.data() + ir * steps, bufs.b.data() + jr * steps, out, ldc, store,
                       tile_rows, tile_cols, side);
          }
        }
      }
    }
  }
}

int num_threads() {
  static const int n = [] {
    if (const char* env = std::getenv("FUSEDMOE_CPU_THREADS")) {
      const int v = std::atoi(env);
      if (v > 0) return v;
    }
#ifdef __linux__
    cpu_set_t cpus;  // the cores this process may run on, not the machine's
    if (sched_getaffinity(0, sizeof(cpus), &cpus) == 0) return std::max(1, CPU_COUNT(&cpus));
#endif
    const unsigned hw = std::thread::hardware_concurrency();
    return hw > 0 ? static_cast<int>(hw) : 1;
  }();
  return n;
}

// The column ranges the work is cut into: [0, n) in one range per thread,
// each a whole number of NR panels (none if n is 0).
std::vector<std::pair<int64_t, int64_t>> column_ranges(int64_t n) {
  const int64_t panels = (n + NR - 1) / NR;
  const int64_t count = std::min<int64_t>(num_threads(), panels);
  std::vector<std::pair<int64_t, int64_t>> ranges;
  for (int64_t t = 0; t < count; ++t)
    ranges.emplace_back(std::min(n, panels * t / count * NR),
                        std::min(n, panels * (t + 1) / count * NR));
  return ranges;
}

// Run body(item, buffers) for every item in [0, items) on up to one thread
// per core, each thread taking the next item not yet taken. An item is one
// group's product over one column range (column_ranges), so no two threads
// write the same element and none waits for another inside the call.
// Taking items as they come, rather than each thread a fixed range of every
// group, keeps the threads together when one core is slowed by the
// machine's other work: with fixed ranges the call took as long as the
// slower thread, which at G=64 at times finished well after the other. Taking
// items was never slower beyond the noise, and faster where a core was
// slowed (measured: docs/backends.md, "How `cpu_kernel` works").
template <typename Body>
void over_items(int64_t items, const Body& body) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(num_threads(), items));
  std::atomic<int64_t> next_item{0};
  auto run = [&] {
    Buffers bufs;
    for (int64_t i = next_item++; i < items; i = next_item++) body(i, bufs);
#ifdef FUSEDMOE_AMX
    release_tiles(bufs);
#endif
    _mm_sfence();  // make this thread's streaming stores visible before the join
  };
  // One product at a time in the process: XLA runs independent operations
  // concurrently (dX and dW of one backward pass), and two calls each
  // spreading over every core would contend for cores and caches; serialising
  // them made forward+backward much faster (docs/backends.md, "How
  // `cpu_kernel` works").
  static std::mutex one_at_a_time;
  std::lock_guard<std::mutex> hold(one_at_a_time);
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t) pool.emplace_back(run);
  run();
  for (auto& th : pool) th.join();
}

// Row offsets of the groups, sizes clamped so no group reads past row m_total.
std::vector<int64_t> group_starts(const int32_t* sizes, int64_t groups, int64_t m_total) {
  std::vector<int64_t> starts(groups + 1, 0);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t size = std::max<int64_t>(0, sizes[g]);
    starts[g + 1] = std::min(m_total, starts[g] + size);
  }
  return starts;
}

// out[rows of g] = lhs[rows of g] @ rhs[g]   (rhs [G, K, N])
//               or lhs[rows of g] @ rhs[g].T (rhs [G, N, K], transpose_rhs)
template <typename TIn, typename TOut>
void times_weight(const TIn* lhs, const TIn* rhs, const int32_t* sizes, TOut* out, int64_t m,
                  int64_t k, int64_t n, int64_t groups, bool transpose_rhs) {
  const std::vector<int64_t> starts = group_starts(sizes, groups, m);
  const auto ranges = column_ranges(n);
  const int64_t per_group = static_cast<int64_t>(ranges.size());
  // The groups with rows, in order, then `groups` for the rows past them.
  std::vector<int64_t> order;
  for (int64_t g = 0; g < groups; ++g)
    if (starts[g + 1] > starts[g]) order.push_back(g);
  if (starts[groups] < m) order.push_back(groups);
  const int64_t items = static_cast<int64_t>(order.size()) * per_group;
  over_items(items, [&](int64_t item, Buffers& bufs) {
    const auto [n_lo, n_hi] = ranges[item % per_group];
    const int64_t g = order[item / per_group];
    if (g == groups) {
      zero_columns(out + starts[groups] * n, m - starts[groups], n, n_lo, n_hi);
      return;
    }
    auto weight = [&](int64_t h) {
      return transpose_rhs ? View<TIn>{rhs + h * n * k + n_lo * k, 1, k}
                           : View<TIn>{rhs + h * k * n + n_lo, n, 1};
    };
    // The same columns of the next group: what this thread most likely takes
    // next, its weight read next (prefetched where B is read transposed).
    const int64_t g_next = item + per_group < items ? order[item / per_group + 1] : groups;
    const View<TIn> a{lhs + starts[g] * k, k, 1};
    gemm_into(starts[g + 1] - starts[g], n_hi - n_lo, k, a, weight(g), out + starts[g] * n + n_lo,
              n, bufs, g_next < groups ? weight(g_next) : View<TIn>{});
  });
}

// out[g] = lhs[rows of g].T @ dout[rows of g]   (out [G, K, N])
template <typename TIn, typename TOut>
void t_times_rows(const TIn* lhs, const TIn* dout, const int32_t* sizes, TOut* out, int64_t m,
                  int64_t k, int64_t n, int64_t groups) {
  const std::vector<int64_t> starts = group_starts(sizes, groups, m);
  const auto ranges = column_ranges(n);
  const int64_t per_group = static_cast<int64_t>(ranges.size());
  over_items(groups * per_group, [&](int64_t item, Buffers& bufs) {
    const auto [n_lo, n_hi] = ranges[item % per_group];
    const int64_t g = item / per_group;
    const int64_t rows = starts[g + 1] - starts[g];
    TOut* slab = out + g * k * n;
    if (rows == 0) {
      zero_columns(slab, k, n, n_lo, n_hi);
      return;
    }
    const View<TIn> a{lhs + starts[g] * k, 1, k};
    const View<TIn> b{dout + starts[g] * n + n_lo, n, 1};
    gemm_into(k, n_hi - n_lo, rows, a, b, slab + n_lo, n, bufs);
  });
}

// The element types the handlers accept: f32 or bf16 inputs (both operands the
// same), f32 or bf16 output.
template <typename F>
ffi::Error dispatch(ffi::DataType in, ffi::DataType out, const F& f) {
  const bool in_ok = in == ffi::DataType::F32 || in == ffi::DataType::BF16;
  const bool out_ok = out == ffi::DataType::F32 || out == ffi::DataType::BF16;
  if (!in_ok || !out_ok) return ffi::Error::InvalidArgument("cpu_kernel: f32 or bf16 only");
  if (in == ffi::DataType::F32) {
    if (out == ffi::DataType::F32) f(float{}, float{});
    else f(float{}, uint16_t{});
  } else {
    if (out == ffi::DataType::F32) f(uint16_t{}, float{});
    else f(uint16_t{}, uint16_t{});
  }
  return ffi::Error::Success();
}

ffi::Error TimesWeight(ffi::AnyBuffer lhs, ffi::AnyBuffer rhs, ffi::Buffer<ffi::S32> sizes,
                       ffi::Result<ffi::AnyBuffer> out, bool transpose_rhs) {
  const auto ld = lhs.dimensions();
  const auto rd = rhs.dimensions();
  if (ld.size() != 2 || rd.size() != 3 || lhs.element_type() != rhs.element_type())
    return ffi::Error::InvalidArgument("cpu_kernel: expected lhs [M, K], rhs [G, K, N] of one dtype");
  const int64_t m = ld[0], k = ld[1], groups = rd[0];
  const int64_t n = transpose_rhs ? rd[1] : rd[2];
  return dispatch(lhs.element_type(), out->element_type(), [&](auto tin, auto tout) {
    using TIn = decltype(tin);
    using TOut = decltype(tout);
    times_weight(static_cast<const TIn*>(lhs.untyped_data()),
                 static_cast<const TIn*>(rhs.untyped_data()), sizes.typed_data(),
                 static_cast<TOut*>(out->untyped_data()), m, k, n, groups, transpose_rhs);
  });
}

ffi::Error TTimesRows(ffi::AnyBuffer lhs, ffi::AnyBuffer dout, ffi::Buffer<ffi::S32> sizes,
                      ffi::Result<ffi::AnyBuffer> out) {
  const auto ld = lhs.dimensions();
  const auto dd = dout.dimensions();
  if (ld.size() != 2 || dd.size() != 2 || lhs.element_type() != dout.element_type())
    return ffi::Error::InvalidArgument("cpu_kernel: expected lhs [M, K], dout [M, N] of one dtype");
  const int64_t m = ld[0], k = ld[1], n = dd[1];
  const int64_t groups = sizes.dimensions()[0];
  return dispatch(lhs.element_type(), out->element_type(), [&](auto tin, auto tout) {
    using TIn = decltype(tin);
    using TOut = decltype(tout);
    t_times_rows(static_cast<const TIn*>(lhs.untyped_data()),
                 static_cast<const TIn*>(dout.untyped_data()), sizes.typed_data(),
                 static_cast<TOut*>(out->untyped_data()), m, k, n, groups);
  });
}

}  // namespace

// The L2 size the block sizes were derived from (cpu_kernel.py records it).
extern "C" int64_t fusedmoe_l2_bytes() { return l2_bytes(); }

// 1 where bf16 products (of a whole row block) run on AMX tiles in this
// process (cpu_kernel.py reports it with the build's name), else 0.
extern "C" int fusedmoe_uses_amx() { return uses_amx<uint16_t>(MC) ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(fusedmoe_times_weight, TimesWeight,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("transpose_rhs"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(fusedmoe_t_times_rows, TTimesRows,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>());
