// The bf16 GEMM on AMX tiles, for CPUs that have them (Intel Xeon from the
// 4th generation, Sapphire Rapids: /proc/cpuinfo lists amx_tile and
// amx_bf16). Not a header of its own: cpu_kernel.cc includes it inside its
// namespace when built with -DFUSEDMOE_AMX=1, and it uses that file's View,
// Store, store_tile, Buffers and pack_b_pairs.
//
// An AMX tile register holds 16 rows of 64 bytes. TDPBF16PS multiplies a
// 16 x 32 bf16 tile of A (16 rows of 32 contraction steps) by a 32 x 16 tile
// of B held as 16 rows of 16 bf16 pairs (two consecutive contraction steps
// of a column side by side: the layout pack_b_pairs makes for vdpbf16ps,
// oneDNN's "VNNI" layout) into a 16 x 16 f32 tile: 8,192 multiply-adds in
// one instruction, 16 times a vdpbf16ps. Eight tile registers: four hold a
// 32 x 32 block of C, and per 32 contraction steps two A tiles and two B
// tiles are loaded, each used twice (the 2 x 2 blocking of oneDNN's brgemm).
//
// gemm_amx, loops outside in: row block (MC_AMX rows of A packed as whole
// rows of the contraction block, zero-padded to 32 rows and 32 steps) ->
// contraction block (KC_AMX) -> NC_AMX columns of B packed as pairs (one
// 32-column panel where the steps need padding) -> 32-column panel -> 32
// rows -> the 2 x 2 tiles over the block. A group of 64 rows (the Qwen3
// layer's forward) packs its rows once and its weight once. C is stored
// through a 32 x 32 f32 scratch by store_tile, so outputs, tails and bf16
// rounding are the other paths'. gemm_amx_weight_rows: dX, the weight's
// rows read in place as A tiles. Products of a few rows (kAmxMinRows) stay
// on the AVX-512 BF16 paths.
//
// Linux gives a process the tile registers only on request
// (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)): amx_ready() asks
// once, then checks one product on the tiles (amx_self_check); refused, or
// a CPU without AMX, or a wrong result, and bf16 runs on the AVX-512 BF16
// paths instead.
//
// Built with -DFUSEDMOE_AMX_EMULATE=1 the tile instructions are plain C++
// with the same semantics (TileEmulator below), so the layouts and loops
// are tested on CPUs without AMX (slowly): tests/test_gmm_cpu_kernel.py.

#include <sys/syscall.h>
#include <unistd.h>

#include <cpuid.h>

static_assert(NR == 32, "the AMX build is an AVX-512 build: panels of 32 columns, two B tiles");

// Products of at most this many rows stay on the AVX-512 BF16 paths: a tile
// computes 16 rows whatever a group has (SGLang's CPU MoE kernels and
// ktransformers draw the line at 4 rows too).
constexpr int64_t kAmxMinRows = 5;
constexpr int64_t MC_AMX = 128;   // row block: A packed is 128 x (KC_AMX + 32) bf16, 520 KiB
constexpr int64_t KC_AMX = 2048;  // contraction block: a 2048 x 32 pair panel of B is 128 KiB
constexpr int64_t NC_AMX = 256;   // columns of B packed at once (its rows read 512 bytes at a time)
constexpr int64_t kTileSteps = 32;  // contraction steps of one A tile (16 pair rows of a B tile)

#ifdef FUSEDMOE_AMX_EMULATE
// The tile registers and the four instructions used, in plain C++: a tile
// is 16 rows of 64 bytes; dp adds A (16 x 32 bf16) times B (16 rows of 16
// bf16 pairs) into C (16 x 16 f32), each pair's two products summed first.
struct TileEmulator {
  uint8_t tiles[8][16][64];
  void load(int t, const void* base, int64_t stride) {
    for (int r = 0; r < 16; ++r)
      std::memcpy(tiles[t][r], static_cast<const char*>(base) + r * stride, 64);
  }
  void store(int t, void* base, int64_t stride) const {
    for (int r = 0; r < 16; ++r)
      std::memcpy(static_cast<char*>(base) + r * stride, tiles[t][r], 64);
  }
  void zero(int t) { std::memset(tiles[t], 0, sizeof(tiles[t])); }
  void dp(int c, int a, int b) {
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j) {
        float sum;
        std::memcpy(&sum, &tiles[c][i][4 * j], 4);
        for (int q = 0; q < 16; ++q) {
          uint16_t ai[2], bj[2];
          std::memcpy(ai, &tiles[a][i][4 * q], 4);
          std::memcpy(bj, &tiles[b][q][4 * j], 4);
          sum += to_f32(ai[0]) * to_f32(bj[0]) + to_f32(ai[1]) * to_f32(bj[1]);
        }
        std::memcpy(&tiles[c][i][4 * j], &sum, 4);
      }
  }
};
thread_local TileEmulator tile_emulator;
#ifndef FUSEDMOE_AMX_NO_ARITHMETIC
#define TILE_LOAD(t, base, stride) tile_emulator.load(t, base, stride)
#define TILE_STORE(t, base, stride) tile_emulator.store(t, base, stride)
#define TILE_ZERO(t) tile_emulator.zero(t)
#define TILE_DP(c, a, b) tile_emulator.dp(c, a, b)
#else
// With -DFUSEDMOE_AMX_NO_ARITHMETIC=1 too: everything the AMX path does but
// the tiles' arithmetic (packing, reading the operands, storing), on any
// CPU, for timing only (its results are zeros): a tile load reads its 16
// rows, the rest does nothing. docs/backends.md, "bf16 on AMX tiles".
thread_local __m512i tile_load_sink;
inline void read_tile_rows(const void* base, int64_t stride) {
  __m512i x = tile_load_sink;
  for (int r = 0; r < 16; ++r)
    x = _mm512_xor_si512(x, _mm512_loadu_si512(static_cast<const char*>(base) + r * stride));
  tile_load_sink = x;
}
#define TILE_LOAD(t, base, stride) read_tile_rows(base, stride)
inline void zero_tile_rows(void* base, int64_t stride) {
  for (int r = 0; r < 16; ++r) std::memset(static_cast<char*>(base) + r * stride, 0, 64);
}
#define TILE_STORE(t, base, stride) zero_tile_rows(base, stride)
#define TILE_ZERO(t) ((void)0)
#define TILE_DP(c, a, b) ((void)0)
#endif
#else
// The intrinsics take the tile register's number as a literal.
#define TILE_LOAD(t, base, stride) _tile_loadd(t, base, stride)
#define TILE_STORE(t, base, stride) _tile_stored(t, base, stride)
#define TILE_ZERO(t) _tile_zero(t)
#define TILE_DP(c, a, b) _tile_dpbf16ps(c, a, b)
#endif

// Give every tile register 16 rows of 64 bytes (palette 1), once per thread
// and call; release_tiles undoes it when the thread's work is done, so an
// XLA thread does not carry the 8 KiB tile state through its context switches.
inline void configure_tiles(Buffers& bufs) {
  if (bufs.tiles_configured) return;
#ifndef FUSEDMOE_AMX_EMULATE
  struct alignas(64) Config {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};  // bytes per row of each tile register
    uint8_t rows[16] = {};
  } config;
  static_assert(sizeof(Config) == 64, "the layout LDTILECFG reads");
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = 16;
  }
  _tile_loadconfig(&config);
#endif
  bufs.tiles_configured = true;
}

inline void release_tiles(Buffers& bufs) {
#ifndef FUSEDMOE_AMX_EMULATE
  if (bufs.tiles_configured) _tile_release();
#endif
  bufs.tiles_configured = false;
}

// out[32 x 32] (f32, row stride 32) = the top RT*16 rows of A times a B
// panel over `tiles` x 32 contraction steps. a: packed rows, `lda` bytes
// apart; b: the panel's pair rows (NR words each, 32 columns: the first 16
// one B tile, the next 16 the other). Tiles 0-3 hold C, 4-5 A, 6-7 B.
template <int RT>
void amx_block(int64_t tiles, const uint16_t* a, int64_t lda, const uint32_t* b, float* out) {
  constexpr int64_t ldb = NR * sizeof(uint32_t);
  TILE_ZERO(0);
  TILE_ZERO(1);
  if constexpr (RT == 2) {
    TILE_ZERO(2);
    TILE_ZERO(3);
  }
  for (int64_t t = 0; t < tiles; ++t) {
    const uint32_t* bt = b + t * (kTileSteps / 2) * NR;
    const char* at = reinterpret_cast<const char*>(a + t * kTileSteps);
    TILE_LOAD(6, bt, ldb);
    TILE_LOAD(7, bt + 16, ldb);
    TILE_LOAD(4, at, lda);
    TILE_DP(0, 4, 6);
    TILE_DP(1, 4, 7);
    if constexpr (RT == 2) {
      TILE_LOAD(5, at + 16 * lda, lda);
      TILE_DP(2, 5, 6);
      TILE_DP(3, 5, 7);
    }
  }
  TILE_STORE(0, out, 32 * sizeof(float));
  TILE_STORE(1, out + 16, 32 * sizeof(float));
  if constexpr (RT == 2) {
    TILE_STORE(2, out + 16 * 32, 32 * sizeof(float));
    TILE_STORE(3, out + 16 * 32 + 16, 32 * sizeof(float));
  }
}

// One 32 x 32 product over 64 steps on the tiles against the same in plain
// C++, exact (small integers): run once, at first use, so that a CPU or OS
// whose tiles do not compute what this file expects (its layouts were
// written against the instructions' documentation and tested with them
// emulated) runs bf16 on the AVX-512 paths instead of computing wrong results.
inline bool amx_self_check() {
  constexpr int64_t kSteps = 64, width = kSteps + 32;
  alignas(64) uint16_t a[32][width] = {};
  alignas(64) uint32_t b[kSteps / 2][NR] = {};
  alignas(64) float out[32][32];
  auto value = [](int64_t x) { return static_cast<float>(x % 7 - 3); };
  auto bits = [](float x) {
    uint16_t h;
    from_f32(x, &h);
    return h;
  };
  for (int64_t i = 0; i < 32; ++i)
    for (int64_t p = 0; p < kSteps; ++p) a[i][p] = bits(value(3 * i + p));
  for (int64_t q = 0; q < kSteps / 2; ++q)
    for (int64_t j = 0; j < 32; ++j)
      b[q][j] = pair(bits(value(2 * q + 5 * j)), bits(value(2 * q + 1 + 5 * j)));
  Buffers bufs;
  configure_tiles(bufs);
  amx_block<2>(kSteps / kTileSteps, a[0], width * 2, b[0], out[0]);
  release_tiles(bufs);
  for (int64_t i = 0; i < 32; ++i)
    for (int64_t j = 0; j < 32; ++j) {
      float want = 0;
      for (int64_t p = 0; p < kSteps; ++p) want += value(3 * i + p) * value(p + 5 * j);
      if (out[i][j] != want) return false;
    }
  return true;
}

// Whether this process uses the tile registers: the CPU has AMX-TILE and
// AMX-BF16 (CPUID leaf 7: EDX bits 24 and 22), Linux granted the tile data
// state (the grant holds for every thread of the process), and the self
// check passed. Decided once.
inline bool amx_ready() {
  static const bool ready = [] {
#ifndef FUSEDMOE_AMX_EMULATE
    unsigned eax, ebx, ecx, edx;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    if (!(edx >> 24 & 1) || !(edx >> 22 & 1)) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) return false;
#endif
#ifdef FUSEDMOE_AMX_NO_ARITHMETIC
    return true;  // (it computes nothing to check)
#else
    return amx_self_check();
#endif
  }();
  return ready;
}

// packed[i][p] = A(i, p) for i < mc, p < kc; zero up to `rows` rows and
// `width` steps (the padding the tiles read). Rows `width` elements apart.
void pack_a_rows(View<uint16_t> a, int64_t mc, int64_t kc, int64_t rows, int64_t width,
                 uint16_t* packed) {
  if (a.cs == 1) {  // rows contiguous (the forward's and dX's rows): a copy per row
    for (int64_t i = 0; i < mc; ++i) {
      std::memcpy(packed + i * width, a.ptr(i, 0), kc * sizeof(uint16_t));
      std::memset(packed + i * width + kc, 0, (width - kc) * sizeof(uint16_t));
    }
  } else {
    // Columns contiguous (dW's transposed rows): 8 rows x 16 steps at a time,
    // two source rows' 8 elements interleaved into 8 words (a pair of steps
    // of each of 8 rows, as pack_a_pairs does), eight such transposed as
    // 8 x 8 words. The rest, element by element.
    const bool vectors = a.rs == 1 && width % 2 == 0;
    int64_t i = 0;
    for (; vectors && i + 8 <= mc; i += 8) {
      int64_t p = 0;
      for (; p + 16 <= kc; p += 16) {
        alignas(32) uint32_t words[8][8];
        for (int64_t q = 0; q < 8; ++q)
          interleave8(a.ptr(i, p + 2 * q), a.ptr(i, p + 2 * q + 1), words[q]);
        transpose8(reinterpret_cast<const float*>(words[0]), 8,
                   reinterpret_cast<float*>(packed + i * width + p), width / 2);
      }
      for (; p < kc; ++p)
        for (int64_t r = 0; r < 8; ++r) packed[(i + r) * width + p] = a.at(i + r, p);
    }
    for (; i < mc; ++i)
      for (int64_t p = 0; p < kc; ++p) packed[i * width + p] = a.at(i, p);
    for (int64_t r = 0; r < mc; ++r) std::memset(packed + r * width + kc, 0, (width - kc) * 2);
  }
  std::memset(packed + mc * width, 0, (rows - mc) * width * sizeof(uint16_t));
}

// c[0:m, 0:n] = A[0:m, 0:k] @ B[0:k, 0:n] for bf16 operands on AMX tiles;
// c f32, or bf16 where k <= KC_AMX (gemm_into sums longer contractions in an
// f32 scratch).
template <typename TC>
void gemm_amx(int64_t m, int64_t n, int64_t k, View<uint16_t> a, View<uint16_t> b, TC* c,
              int64_t ldc, Buffers& bufs) {
  configure_tiles(bufs);
  for (int64_t ic = 0; ic < m; ic += MC_AMX) {
    const int64_t mc = std::min(MC_AMX, m - ic);
    const int64_t rows = (mc + 31) / 32 * 32;
    for (int64_t pc = 0; pc < k; pc += KC_AMX) {
      const int64_t kc = std::min(KC_AMX, k - pc);
      const int64_t tiles = (kc + kTileSteps - 1) / kTileSteps;
      const int64_t pair_rows = tiles * kTileSteps / 2;
      // One A tile's 16 rows 64 bytes further apart than the steps: at a
      // power-of-two stride they would all fall into the same L1 sets.
      const int64_t width = tiles * kTileSteps + 32;
      const Store store = pc > 0 ? Store::kAccumulate
                          : k <= KC_AMX ? Store::kStream
                                        : Store::kOverwrite;
      // B is packed NC_AMX columns at a time where its panels need no
      // padding between them (whole tiles of steps), else a panel at a time.
      const bool whole_tiles = kc % kTileSteps == 0;
      const int64_t block_cols = whole_tiles ? NC_AMX : NR;
      bufs.a16.resize(std::max(bufs.a16.size(), static_cast<size_t>(rows * width)));
      bufs.b2.resize(std::max(bufs.b2.size(), static_cast<size_t>(pair_rows * block_cols)));
      pack_a_rows(View<uint16_t>{a.ptr(ic, pc), a.rs, a.cs}, mc, kc, rows, width, bufs.a16.data());
      for (int64_t jb = 0; jb < n; jb += block_cols) {
        const int64_t nb = std::min(block_cols, n - jb);
        pack_b_pairs(View<uint16_t>{b.ptr(pc, jb), b.rs, b.cs}, kc, nb, bufs.b2.data());
        if (!whole_tiles) {
          const int64_t packed_pairs = (kc + 1) / 2;
          std::memset(bufs.b2.data() + packed_pairs * NR, 0, (pair_rows - packed_pairs) * NR * 4);
        }
        for (int64_t jr = 0; jr < nb; jr += NR) {
          const uint32_t* panel = bufs.b2.data() + jr * pair_rows;
          const int64_t cols = std::min(NR, nb - jr);
          for (int64_t ir = 0; ir < mc; ir += 32) {
            alignas(64) float out[32][32];
            const uint16_t* a_rows = bufs.a16.data() + ir * width;
            if (mc - ir > 16) amx_block<2>(tiles, a_rows, width * 2, panel, out[0]);
            else amx_block<1>(tiles, a_rows, width * 2, panel, out[0]);
            for (int64_t h = 0; h < 2 && ir + 16 * h < mc; ++h) {
              vec acc[16][2];
              std::memcpy(acc, out[16 * h], sizeof(acc));
              store_tile<16>(acc, c + (ic + ir + 16 * h) * ldc + jb + jr, ldc, store,
                             std::min<int64_t>(16, mc - ir - 16 * h), cols);
            }
          }
        }
      }
    }
  }
}

// The longest contraction gemm_amx_weight_rows takes: its packed panels of
// A^T are then 8192 / 2 x 32 words, 512 KiB each.
constexpr int64_t kAmxWeightRowsMaxSteps = 8192;

// Whether gemm_amx_weight_rows can read B in place: B read transposed (the
// weight of dX, B(p, j) = b.data[j * b.cs + p]), whole 32-step tiles of it.
inline bool amx_weight_rows_fit(int64_t k, View<uint16_t> b) {
  return b.rs == 1 && b.cs != 1 && k % kTileSteps == 0 && k <= kAmxWeightRowsMaxSteps;
}

// c[0:m, 0:n] = A[0:m, 0:k] @ B[0:k, 0:n] with B read transposed (dX: the
// weight stored [n, k]), computed as c^T = B^T A^T on the tiles: B^T's rows
// are the weight's rows, contiguous over the contraction, so the A tiles
// load them in place (no packing of the weight: at G=64 packing it cost
// more than the tiles' arithmetic); A^T, a group's few dout rows, is packed
// as pair panels (pack_b_pairs) and stored transposed. 32 weight rows at a
// time; a last part of fewer rows is copied, zero-padded, so no tile reads
// past the weight.
template <typename TC>
void gemm_amx_weight_rows(int64_t m, int64_t n, int64_t k, View<uint16_t> a, View<uint16_t> b,
                          TC* c, int64_t ldc, Buffers& bufs) {
  configure_tiles(bufs);
  const int64_t panels = (m + NR - 1) / NR, pair_rows = k / 2, tiles = k / kTileSteps;
  bufs.b2.resize(std::max(bufs.b2.size(), static_cast<size_t>(panels * pair_rows * NR)));
  pack_b_pairs(View<uint16_t>{a.data, a.cs, a.rs}, k, m, bufs.b2.data());
  const int64_t width = k + 32;  // the zero-padded copy of a last part
  for (int64_t j = 0; j < n; j += 32) {
    const int64_t rows = std::min<int64_t>(32, n - j);
    const uint16_t* w = b.data + j * b.cs;
    int64_t ldw = b.cs * 2;
    if (rows < 32) {
      bufs.a16.resize(std::max(bufs.a16.size(), static_cast<size_t>(32 * width)));
      pack_a_rows(View<uint16_t>{w, b.cs, 1}, rows, k, 32, width, bufs.a16.data());
      w = bufs.a16.data();
      ldw = width * 2;
    }
    for (int64_t q = 0; q < panels; ++q) {
      alignas(64) float out[32][32];
      const uint32_t* panel = bufs.b2.data() + q * pair_rows * NR;
      if (rows > 16) amx_block<2>(tiles, w, ldw, panel, out[0]);
      else amx_block<1>(tiles, w, ldw, panel, out[0]);
      const int64_t cols = std::min(NR, m - q * NR);  // rows of c
      for (int64_t i = 0; i < cols; ++i)
        for (int64_t r = 0; r < rows; ++r) from_f32(out[r][i], c + (q * NR + i) * ldc + j + r);
    }
  }
}

