// Grouped matmul for XLA:CPU, reading float / int8 / int4 expert weights in place.
//
// An XLA FFI custom call (target "moejax_grouped_matmul"). The rows of x [N, K]
// are sorted by expert: group_sizes[e] rows for expert e, padding rows last.
// Row r of group e gets y[r] = x[r] @ W_e, where W_e [K, M] is expert e's
// weight in one of the formats of moejax.weight_formats:
//
//   bits 0: float32 W.
//   bits 8: int8 q [K, M]; w = (q - zero) * scale[k / group_size].
//   bits 4: uint8 q [K/2, M], byte i = row 2i (low nibble) | row 2i+1 (high
//           nibble); w = (q - zero) * scale[k / group_size].
//   zero is 0 (int8) or 8 (int4) when symmetric, else a float32 [K/gs, M] leaf.
//
// Why a kernel: decode multiplies one or a few rows by each used expert, so the
// time is the time to read the expert's bytes. XLA:CPU neither fuses the
// dequantization into the dot nor spreads a one-row dot over threads, so
// int4/int8 experts decoded no faster than float ones. Here each thread streams
// its share of the used experts' columns once, dequantizing in registers.
//
// Numerics: the products x * (q - zero) of one quantization group are summed in
// float32 (the AVX-512 tiles sum x * q and subtract zero * sum(x) once per
// group), then scaled by the group's scale and added to the float32 result (for
// float weights: x * w summed over blocks of 256 rows). This is the
// dequantize-then-dot function with another float32 summation order.
//
// Several matrices of one format and shape (gate and up) can share a call
// (attribute num_mats): y is [N, num_mats * M], matrix i in columns [i*M, (i+1)*M).
// Weight leaves (the remaining arguments, matrix by matrix) are either stacked,
// one buffer per leaf ([E, ...]), or per expert: E consecutive tuples of leaves
// (attribute per_expert), matching moejax.expert_layout.PerExpertWeights.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kItemCols = 256;  // columns per work item
constexpr int64_t kTileCols = 64;   // columns per portable tile (and the narrowest vector tile)
constexpr int64_t kTileRows = 4;    // rows of x that share one read of a weight tile
constexpr int64_t kFloatBlock = 256;  // float weights: rows summed before joining the result
// A tile reads one short run of bytes per weight row, rows a page or more apart:
// hardware prefetchers stop at page boundaries, so the kernel prefetches this
// many rows ahead itself.
constexpr int64_t kPrefetchRows = 24;

// One expert's weight leaves, as raw pointers.
struct ExpertWeight {
  const void* q = nullptr;        // float32, int8 or packed uint8
  const float* scale = nullptr;   // [K/gs, M] or null for float
  const float* zero = nullptr;    // [K/gs, M] or null (symmetric: the constant zero)
};

struct Problem {
  const float* x;     // [N, K]
  float* y;           // [N, num_mats * M]: matrix i's result in columns [i*M, (i+1)*M)
  int64_t y_stride;   // num_mats * M
  int64_t k, m;       // each matrix is [K, M]
  int64_t num_experts;
  int bits;
  int64_t group_size;     // rows per scale group (== k for per-channel)
  float implicit_zero;    // the zero of symmetric formats
  std::vector<ExpertWeight> experts;  // [matrix * num_experts + expert]
  std::vector<int64_t> row_start, row_count;  // per expert
};

// Weight value of row kk, column c (relative to the tile's first column), before scaling.
template <int Bits>
inline void load_row(const ExpertWeight& w, int64_t m, int64_t kk, int64_t c0, int64_t width,
                     const float* zero_row, float zero_const, float* out) {
  if constexpr (Bits == 0) {
    const float* src = static_cast<const float*>(w.q) + kk * m + c0;
    for (int64_t c = 0; c < width; ++c) out[c] = src[c];
  } else if constexpr (Bits == 8) {
    const int8_t* src = static_cast<const int8_t*>(w.q) + kk * m + c0;
    if (zero_row) {
      for (int64_t c = 0; c < width; ++c) out[c] = static_cast<float>(src[c]) - zero_row[c];
    } else {
      for (int64_t c = 0; c < width; ++c) out[c] = static_cast<float>(src[c]) - zero_const;
    }
  } else {
    const uint8_t* src = static_cast<const uint8_t*>(w.q) + (kk >> 1) * m + c0;
    const int shift = (kk & 1) ? 4 : 0;
    if (zero_row) {
      for (int64_t c = 0; c < width; ++c) out[c] = static_cast<float>((src[c] >> shift) & 15) - zero_row[c];
    } else {
      for (int64_t c = 0; c < width; ++c) out[c] = static_cast<float>((src[c] >> shift) & 15) - zero_const;
    }
  }
}

// y[rows, c0:c0+W] = x[rows] @ W_e[:, c0:c0+W] for up to kTileRows rows, W == kTileCols
// (Full) or any width <= kTileCols (the last tile of a row). Portable C++.
template <int Bits, int Rows, bool Full>
void tile(const Problem& p, const ExpertWeight& w, int64_t row0, int64_t c0, int64_t width_arg, float* y) {
  constexpr int64_t kMaxW = kTileCols;
  const int64_t width = Full ? kMaxW : width_arg;  // a constant in the Full instantiation
  const int64_t k = p.k, m = p.m;
  const int64_t block = Bits == 0 ? kFloatBlock : p.group_size;
  alignas(64) float acc[Rows][kMaxW] = {};
  alignas(64) float part[Rows][kMaxW];
  alignas(64) float wrow[kMaxW];
  const float* xr[Rows];
  for (int r = 0; r < Rows; ++r) xr[r] = p.x + (row0 + r) * k;

  for (int64_t g0 = 0; g0 < k; g0 += block) {
    const int64_t g1 = std::min(k, g0 + block);
    const int64_t g = g0 / block;
    const float* zero_row = (Bits != 0 && w.zero) ? w.zero + g * m + c0 : nullptr;
    for (int r = 0; r < Rows; ++r)
      for (int64_t c = 0; c < width; ++c) part[r][c] = 0.f;
    for (int64_t kk = g0; kk < g1; ++kk) {
      load_row<Bits>(w, m, kk, c0, width, zero_row, p.implicit_zero, wrow);
      for (int r = 0; r < Rows; ++r) {
        const float xv = xr[r][kk];
        for (int64_t c = 0; c < width; ++c) part[r][c] += xv * wrow[c];
      }
    }
    if constexpr (Bits == 0) {
      for (int r = 0; r < Rows; ++r)
        for (int64_t c = 0; c < width; ++c) acc[r][c] += part[r][c];
    } else {
      const float* s = w.scale + g * m + c0;
      for (int r = 0; r < Rows; ++r)
        for (int64_t c = 0; c < width; ++c) acc[r][c] += part[r][c] * s[c];
    }
  }
  for (int r = 0; r < Rows; ++r) std::memcpy(y + (row0 + r) * p.y_stride + c0, acc[r], sizeof(float) * width);
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// The same tile with AVX-512, kVecs registers of 16 columns per row (16
// accumulators in all: one row reads 256 contiguous columns of each weight row,
// which DRAM serves better than 64). Quantized weights are converted to float
// in registers; the zero point is folded out of the inner loop:
// sum x*(q - z) = sum x*q - z * sum x per group.
template <int Bits, int Rows, int kVecs>
void tile_avx512(const Problem& p, const ExpertWeight& w, int64_t row0, int64_t c0, float* y) {
  constexpr int64_t kCols = 16 * kVecs;
  const int64_t k = p.k, m = p.m;
  const int64_t block = Bits == 0 ? kFloatBlock : p.group_size;
  alignas(64) float acc[Rows][kCols] = {};
  const float* xr[Rows];
  for (int r = 0; r < Rows; ++r) xr[r] = p.x + (row0 + r) * k;

  for (int64_t g0 = 0; g0 < k; g0 += block) {
    const int64_t g1 = std::min(k, g0 + block);
    __m512 part[Rows][kVecs];
    for (int r = 0; r < Rows; ++r)
      for (int j = 0; j < kVecs; ++j) part[r][j] = _mm512_setzero_ps();
    if constexpr (Bits == 0) {
      const float* src = static_cast<const float*>(w.q) + g0 * m + c0;
      for (int64_t kk = g0; kk < g1; ++kk, src += m) {
        if (kk + kPrefetchRows < k)
          for (int j = 0; j < kVecs; ++j) _mm_prefetch(reinterpret_cast<const char*>(src + kPrefetchRows * m + 16 * j), _MM_HINT_T0);
        __m512 wv[kVecs];
        for (int j = 0; j < kVecs; ++j) wv[j] = _mm512_loadu_ps(src + 16 * j);
        for (int r = 0; r < Rows; ++r) {
          const __m512 xv = _mm512_set1_ps(xr[r][kk]);
          for (int j = 0; j < kVecs; ++j) part[r][j] = _mm512_fmadd_ps(xv, wv[j], part[r][j]);
        }
      }
    } else if constexpr (Bits == 8) {
      const int8_t* src = static_cast<const int8_t*>(w.q) + g0 * m + c0;
      for (int64_t kk = g0; kk < g1; ++kk, src += m) {
        if (kk + kPrefetchRows < k)
          for (int j = 0; j < kVecs; j += 4) _mm_prefetch(reinterpret_cast<const char*>(src + kPrefetchRows * m + 16 * j), _MM_HINT_T0);
        __m512 wv[kVecs];
        for (int j = 0; j < kVecs; ++j)
          wv[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16 * j))));
        for (int r = 0; r < Rows; ++r) {
          const __m512 xv = _mm512_set1_ps(xr[r][kk]);
          for (int j = 0; j < kVecs; ++j) part[r][j] = _mm512_fmadd_ps(xv, wv[j], part[r][j]);
        }
      }
    } else {
      const uint8_t* src = static_cast<const uint8_t*>(w.q) + (g0 / 2) * m + c0;
      const __m512i mask = _mm512_set1_epi32(0x0F);
      for (int64_t kk = g0; kk < g1; kk += 2, src += m) {
        if (kk + 2 * kPrefetchRows < k)
          for (int j = 0; j < kVecs; j += 4) _mm_prefetch(reinterpret_cast<const char*>(src + kPrefetchRows * m + 16 * j), _MM_HINT_T0);
        __m512 x0[Rows], x1[Rows];
        for (int r = 0; r < Rows; ++r) {
          x0[r] = _mm512_set1_ps(xr[r][kk]);
          x1[r] = _mm512_set1_ps(xr[r][kk + 1]);
        }
        for (int j = 0; j < kVecs; ++j) {
          const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16 * j)));
          const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, mask));
          const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
          for (int r = 0; r < Rows; ++r) part[r][j] = _mm512_fmadd_ps(x1[r], hi, _mm512_fmadd_ps(x0[r], lo, part[r][j]));
        }
      }
    }
    if constexpr (Bits == 0) {
      for (int r = 0; r < Rows; ++r)
        for (int j = 0; j < kVecs; ++j)
          _mm512_store_ps(acc[r] + 16 * j, _mm512_add_ps(_mm512_load_ps(acc[r] + 16 * j), part[r][j]));
    } else {
      const int64_t g = g0 / block;
      const float* s = w.scale + g * m + c0;
      const float* z = w.zero ? w.zero + g * m + c0 : nullptr;
      const bool has_zero = z != nullptr || p.implicit_zero != 0.f;
      for (int r = 0; r < Rows; ++r) {
        float xsum = 0.f;
        if (has_zero)
          for (int64_t kk = g0; kk < g1; ++kk) xsum += xr[r][kk];
        const __m512 xs = _mm512_set1_ps(xsum);
        for (int j = 0; j < kVecs; ++j) {
          __m512 v = part[r][j];
          if (has_zero) {
            const __m512 zv = z ? _mm512_loadu_ps(z + 16 * j) : _mm512_set1_ps(p.implicit_zero);
            v = _mm512_fnmadd_ps(zv, xs, v);
          }
          _mm512_store_ps(acc[r] + 16 * j, _mm512_fmadd_ps(v, _mm512_loadu_ps(s + 16 * j), _mm512_load_ps(acc[r] + 16 * j)));
        }
      }
    }
  }
  for (int r = 0; r < Rows; ++r) std::memcpy(y + (row0 + r) * p.y_stride + c0, acc[r], sizeof(float) * kCols);
}
#define MOEJAX_HAVE_AVX512 1
#endif

// Rows [row0, row0 + Rows) times columns [c0, c1) of one expert's weight.
template <int Bits, int Rows>
void item_rows(const Problem& p, const ExpertWeight& w, int64_t row0, int64_t c0, int64_t c1, float* y) {
  int64_t c = c0;
#ifdef MOEJAX_HAVE_AVX512
  constexpr int kWideVecs = 16 / (Rows == 1 ? 1 : Rows == 2 ? 2 : 4);  // 16 accumulator registers
  for (; c + 16 * kWideVecs <= c1; c += 16 * kWideVecs) tile_avx512<Bits, Rows, kWideVecs>(p, w, row0, c, y);
  for (; c + kTileCols <= c1; c += kTileCols) tile_avx512<Bits, Rows, kTileCols / 16>(p, w, row0, c, y);
#endif
  for (; c < c1; c += kTileCols) {
    const int64_t width = std::min(kTileCols, c1 - c);
    if (width == kTileCols) tile<Bits, Rows, true>(p, w, row0, c, width, y);
    else tile<Bits, Rows, false>(p, w, row0, c, width, y);
  }
}

// One work item: every row of expert e times columns [c0, c0 + kItemCols) of matrix `mat`.
struct Item {
  int64_t mat, expert, c0;
};

template <int Bits>
void column_tile(const Problem& p, const Item& item) {
  const ExpertWeight& w = p.experts[item.mat * p.num_experts + item.expert];
  float* y = p.y + item.mat * p.m;
  int64_t row = p.row_start[item.expert];
  const int64_t end = row + p.row_count[item.expert];
  const int64_t c0 = item.c0, c1 = std::min(p.m, c0 + kItemCols);
  for (; row + kTileRows <= end; row += kTileRows) item_rows<Bits, kTileRows>(p, w, row, c0, c1, y);
  switch (end - row) {
    case 3: item_rows<Bits, 3>(p, w, row, c0, c1, y); break;
    case 2: item_rows<Bits, 2>(p, w, row, c0, c1, y); break;
    case 1: item_rows<Bits, 1>(p, w, row, c0, c1, y); break;
    default: break;
  }
}

void work_item(const Problem& p, const Item& item) {
  switch (p.bits) {
    case 0: column_tile<0>(p, item); break;
    case 8: column_tile<8>(p, item); break;
    default: column_tile<4>(p, item); break;
  }
}

// Work items are (used expert, column tile) pairs, handed out by an atomic
// counter; every thread (the caller included) takes items until none are left.
struct SharedWork {
  const Problem* problem = nullptr;
  std::vector<Item> items;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void run() {
    for (;;) {
      const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= static_cast<int64_t>(items.size())) return;
      work_item(*problem, items[i]);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// A small pool of our own threads. XLA's intra-op pool queues a task scheduled
// from one of its threads on that thread's own queue, where it waited up to a
// millisecond (measured) for a steal: longer than a whole decode matmul.
// Threads spin briefly for the next job (decode runs matmuls back to back),
// then sleep, so they do not compete with XLA's threads between MoE layers.
// One job at a time: a call that finds the pool busy (XLA running two
// matmuls concurrently) computes its items on its own thread.
class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool();  // never destroyed: threads outlive static destructors
    return *pool;
  }

  void run(const std::shared_ptr<SharedWork>& work) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock() || workers_.empty() || work->items.size() < 2) {
      work->run();
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = work;
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    work->run();
    const int64_t total = static_cast<int64_t>(work->items.size());
    while (work->done.load(std::memory_order_acquire) < total) std::this_thread::yield();
    std::lock_guard<std::mutex> lock(mu_);
    job_.reset();
  }

 private:
  Pool() {
    int n = static_cast<int>(std::thread::hardware_concurrency());
#if defined(__linux__)
    cpu_set_t allowed;  // the CPUs this process may run on (taskset, containers), not the machine's
    if (sched_getaffinity(0, sizeof(allowed), &allowed) == 0) n = CPU_COUNT(&allowed);
#endif
    if (const char* env = std::getenv("MOEJAX_NUM_THREADS")) n = std::atoi(env);
    for (int t = 1; t < std::max(n, 1); ++t) workers_.emplace_back([this] { loop(); });
    for (auto& w : workers_) w.detach();
  }

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      // Spin a little (tens of microseconds: the gap between the gate/up and the down call)
      // before sleeping.
      for (int spin = 0; spin < 4000 && generation_.load(std::memory_order_acquire) == seen; ++spin) {
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
      }
      std::shared_ptr<SharedWork> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        seen = generation_.load(std::memory_order_acquire);
        job = job_;
      }
      if (job) job->run();
    }
  }

  std::mutex busy_;  // held by the one call using the pool
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::shared_ptr<SharedWork> job_;
  std::vector<std::thread> workers_;
};

ffi::Error GroupedMatmul(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> group_sizes,
                         ffi::RemainingArgs weights, ffi::ResultBuffer<ffi::F32> y, int32_t bits,
                         int64_t group_size, bool has_zero, bool per_expert, int64_t num_mats) {
  const auto xd = x.dimensions();
  const auto yd = y->dimensions();
  if (xd.size() != 2 || yd.size() != 2 || yd[0] != xd[0] || num_mats < 1 || yd[1] % num_mats)
    return ffi::Error::InvalidArgument("moejax_grouped_matmul: x must be [N, K] and y [N, num_mats * M]");
  if (bits != 0 && bits != 4 && bits != 8)
    return ffi::Error::InvalidArgument("moejax_grouped_matmul: bits must be 0 (float), 4 or 8");
  Problem p;
  p.x = x.typed_data();
  p.y = y->typed_data();
  p.y_stride = yd[1];
  p.k = xd[1];
  p.m = yd[1] / num_mats;
  p.bits = bits;
  p.group_size = group_size > 0 ? group_size : p.k;
  p.implicit_zero = bits == 4 ? 8.f : 0.f;
  if (p.k % p.group_size || (bits == 4 && p.k % 2))
    return ffi::Error::InvalidArgument("moejax_grouped_matmul: K must be a multiple of group_size (and even for int4)");
  const int64_t n = xd[0];
  const int64_t num_experts = p.num_experts = group_sizes.element_count();
  const int64_t leaves = bits == 0 ? 1 : (has_zero ? 3 : 2);
  const int64_t per_mat = per_expert ? num_experts * leaves : leaves;
  if (static_cast<int64_t>(weights.size()) != num_mats * per_mat)
    return ffi::Error::InvalidArgument("moejax_grouped_matmul: wrong number of weight leaves");

  // Matrix i, expert e, leaf j: its own buffer, or slice e of a stacked buffer.
  const int64_t q_bytes = (bits == 4 ? p.k / 2 : p.k) * p.m * (bits == 0 ? 4 : 1);
  const int64_t s_bytes = (p.k / p.group_size) * p.m * 4;
  p.experts.resize(num_mats * num_experts);
  for (int64_t i = 0; i < num_mats; ++i) {
    for (int64_t e = 0; e < num_experts; ++e) {
      const char* ptr[3] = {nullptr, nullptr, nullptr};
      for (int64_t j = 0; j < leaves; ++j) {
        auto buf = weights.get<ffi::AnyBuffer>(i * per_mat + (per_expert ? e * leaves : 0) + j);
        if (!buf.has_value()) return buf.error();
        const int64_t one = j == 0 ? q_bytes : s_bytes;
        if (static_cast<int64_t>(buf->size_bytes()) != one * (per_expert ? 1 : num_experts))
          return ffi::Error::InvalidArgument("moejax_grouped_matmul: a weight leaf has the wrong size");
        ptr[j] = static_cast<const char*>(buf->untyped_data()) + (per_expert ? 0 : e * one);
      }
      ExpertWeight& w = p.experts[i * num_experts + e];
      w.q = ptr[0];
      w.scale = reinterpret_cast<const float*>(ptr[1]);
      w.zero = reinterpret_cast<const float*>(ptr[2]);
    }
  }

  // Rows of each group; rows past the groups (padding) are zero.
  const int32_t* sizes = group_sizes.typed_data();
  p.row_start.resize(num_experts);
  p.row_count.resize(num_experts);
  int64_t row = 0;
  auto work = std::make_shared<SharedWork>();
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t rows = std::clamp<int64_t>(sizes[e], 0, n - row);
    p.row_start[e] = row;
    p.row_count[e] = rows;
    row += rows;
    for (int64_t i = 0; rows > 0 && i < num_mats; ++i)
      for (int64_t c0 = 0; c0 < p.m; c0 += kItemCols) work->items.push_back({i, e, c0});
  }
  std::memset(p.y + row * p.y_stride, 0, sizeof(float) * (n - row) * p.y_stride);
  work->problem = &p;
  Pool::get().run(work);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxGroupedMatmul, GroupedMatmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("bits")
                                  .Attr<int64_t>("group_size")
                                  .Attr<bool>("has_zero")
                                  .Attr<bool>("per_expert")
                                  .Attr<int64_t>("num_mats"));
