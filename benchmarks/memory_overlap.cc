// Can this CPU read memory while it computes? A probe for the cpu_kernel work
// (docs/backends.md, "How `cpu_kernel` works"), not part of the library.
//
// cpu_kernel's grouped forward at 64 rows per group costs the dense GEMM's
// arithmetic plus ~0.3x for reading the 512 MB of weights, as if the two never
// overlapped. This program separates the machine from the kernel: each thread
// streams its half of every 8 KB row of a 512 MB buffer (cpu_kernel's column
// split) while running register-only FMAs at the ratio of the real product
// (one 64-byte line per ~10 x 12 vector FMAs, as 64 rows x 16 columns give),
// and times:
//
//   compute          the FMAs alone
//   read             the reads alone
//   compute+load     FMAs with a plain load of each line in between
//   compute+pf+load  the same, each line prefetched `distance` lines ahead
//
// If compute+pf+load takes the time of compute alone, the machine overlaps
// the reads with the arithmetic, and what keeps cpu_kernel from doing so lies
// in the kernel (its cache footprint, the order it reads in), not here.
//
//   c++ -O3 -std=c++17 -mavx2 -mfma -pthread benchmarks/memory_overlap.cc -o /tmp/memory_overlap
//   /tmp/memory_overlap [threads=2] [fma_steps_per_line=10] [distance=32]

#include <immintrin.h>
#include <sys/mman.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

namespace {

typedef float f32x8 __attribute__((vector_size(32)));

constexpr long kBytes = 512L << 20;
constexpr long kRow = 8192;       // bytes per row: a [K, 2048] f32 weight
constexpr long kHalfRow = 4096;   // each of two threads reads its half

enum Mode { kCompute, kRead, kComputeLoad, kComputePrefetchLoad, kModes };
const char* const kNames[] = {"compute", "read", "compute+load", "compute+pf+load"};

// The address of line `l` of the half rows starting at byte `offset` of each row.
const char* line(const char* base, long offset, long l) {
  return base + (l / 64) * kRow + offset + (l % 64) * 64;
}

float run(Mode mode, const char* base, long offset, long steps_per_line, long distance) {
  const long lines = kBytes / kRow * 64;
  f32x8 acc[12], loaded = {};
  for (int i = 0; i < 12; ++i) acc[i] = f32x8{} + 1e-7f * i;
  f32x8 a = f32x8{} + 1.0000001f;
  const f32x8 b = f32x8{} + 0.9999999f;
  for (long l = 0; l < lines; ++l) {
    if (mode == kComputePrefetchLoad && l + distance < lines)
      _mm_prefetch(line(base, offset, l + distance), _MM_HINT_T0);
    if (mode != kCompute) {
      f32x8 v;
      std::memcpy(&v, line(base, offset, l), 32);
      loaded += v;
    }
    if (mode == kRead) continue;
    for (long s = 0; s < steps_per_line; ++s) {
#pragma GCC unroll 12
      for (int i = 0; i < 12; ++i) acc[i] = acc[i] * a + b;
      asm volatile("" : "+x"(a));  // keep the FMAs from being folded
    }
  }
  float sum = loaded[0];
  for (int i = 0; i < 12; ++i) sum += acc[i][0];
  return sum;
}

double seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 2;
  const long steps_per_line = argc > 2 ? std::atol(argv[2]) : 10;
  const long distance = argc > 3 ? std::atol(argv[3]) : 32;
  char* buffer = static_cast<char*>(std::aligned_alloc(2 << 20, kBytes));
  madvise(buffer, kBytes, MADV_HUGEPAGE);
  std::memset(buffer, 1, kBytes);
  std::printf("%d threads, %ld FMA steps per line, prefetch distance %ld lines\n", threads,
              steps_per_line, distance);
  for (int round = 0; round < 3; ++round) {
    for (int m = 0; m < kModes; ++m) {
      const double start = seconds();
      std::vector<std::thread> pool;
      std::vector<float> sinks(threads);
      for (int t = 0; t < threads; ++t)
        pool.emplace_back([&, t] {
          const long offset = threads == 2 ? t * kHalfRow : 0;
          sinks[t] = run(static_cast<Mode>(m), buffer, offset, steps_per_line, distance);
        });
      for (auto& th : pool) th.join();
      std::printf("%-16s %7.1f ms%s\n", kNames[m], (seconds() - start) * 1e3,
                  sinks[0] == 12345.f ? " " : "");
    }
  }
  std::free(buffer);
  return 0;
}
