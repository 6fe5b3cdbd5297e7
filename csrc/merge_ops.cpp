// Data-free merge kernels (CPU): fused weighted sum, generalised task arithmetic (task arithmetic,
// TIES, DARE in one kernel), the magnitude top-k selection passes TIES needs, and DARE's L1 sums.
//
// Every kernel reads bf16/fp16/fp32 storage once, computes in fp32 and rounds once to the output
// dtype. Work is split into blocks of kBlock elements over OpenMP threads (omp_set_num_threads /
// alignmerge._C.set_num_threads is respected); the Python launchers in alignmerge/ops/merge.py
// validate shapes, dtypes and contiguity and pass raw data pointers. The GIL is released.
//
// The arithmetic order mirrors mergekit 0.1.5 (generalized_task_arithmetic.py, linear.py) so that
// fp32 results agree bit for bit with its fp32 computation for up to four experts.
#include "alignmerge.h"

#include <omp.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <functional>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <stdexcept>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace py = pybind11;

// GCC tunes -march=native AVX-512 code for 256-bit vectors; the kernels below (the DARE hash,
// bf16 widening) run faster with full 512-bit vectors.
#if defined(__GNUC__) && !defined(__clang__) && defined(__AVX512F__)
#pragma GCC push_options
#pragma GCC target("prefer-vector-width=512")
#define ALIGNMERGE_WIDE_VECTORS 1
#endif

namespace alignmerge {
namespace {

constexpr int64_t kBlock = 256;
constexpr int64_t kParallelMin = 1 << 15;  // smaller tensors run on one thread (no wake-ups, one histogram)
constexpr int kBins = 1 << 16;
constexpr uint32_t kSkipPrefix = 0xffffffffu;
constexpr uint32_t kWeyl32 = 0x9E3779B9u;  // golden-ratio multiplier that spreads consecutive indices

// ---------------------------------------------------------------- storage access
template <int DT>
struct Io;

template <>
struct Io<kFloat32> {
  static inline float load(const void* p, int64_t i) { return static_cast<const float*>(p)[i]; }
  static inline void store(void* p, int64_t i, float v) { static_cast<float*>(p)[i] = v; }
};

template <>
struct Io<kBFloat16> {
  static inline float load(const void* p, int64_t i) {
    return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
  static inline void store(void* p, int64_t i, float v) { static_cast<uint16_t*>(p)[i] = f32_to_bf16(v); }
};

template <>
struct Io<kFloat16> {
  static inline float load(const void* p, int64_t i) {
#if defined(__F16C__)
    return _cvtsh_ss(static_cast<const uint16_t*>(p)[i]);
#else
    return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
#endif
  }
  static inline void store(void* p, int64_t i, float v) {
#if defined(__F16C__)
    static_cast<uint16_t*>(p)[i] = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
#else
    static_cast<uint16_t*>(p)[i] = f32_to_f16(v);
#endif
  }
};

template <int DT>
inline void load_block(const void* p, int64_t start, int64_t len, float* __restrict dst) {
  for (int64_t j = 0; j < len; ++j) dst[j] = Io<DT>::load(p, start + j);
}

// Outputs of at least this many bytes are written with non-temporal stores: they are far larger than the
// caches, and a plain store would first read each line it writes (10-15% of a merge's memory traffic).
constexpr int64_t kStreamMinBytes = int64_t{32} << 20;

template <int DT>
constexpr int64_t storage_bytes() {
  return DT == kFloat32 ? 4 : 2;
}

// Whether a merge writing n elements of dtype DT to out streams its whole blocks past the caches.
template <int DT>
bool stream_output(const void* out, int64_t n) {
#if defined(__AVX512F__)
  return n * storage_bytes<DT>() >= kStreamMinBytes && (reinterpret_cast<uintptr_t>(out) & 63) == 0;
#else
  (void)out, (void)n;
  return false;
#endif
}

// Makes one thread's non-temporal stores visible before the parallel region's closing barrier.
inline void stream_fence(bool stream) {
#if defined(__AVX512F__)
  if (stream) _mm_sfence();
#else
  (void)stream;
#endif
}

// stream: whole blocks go out with non-temporal stores (the block start is 64-byte aligned when out is).
template <int DT>
inline void store_block(void* p, int64_t start, int64_t len, const float* __restrict src, bool stream = false) {
#if defined(__AVX512F__)
  if (stream && len == kBlock) {
    constexpr int64_t bytes = kBlock * storage_bytes<DT>();
    alignas(64) char staged[bytes];
    for (int64_t j = 0; j < kBlock; ++j) Io<DT>::store(staged, j, src[j]);
    char* dst = static_cast<char*>(p) + start * storage_bytes<DT>();
    for (int64_t o = 0; o < bytes; o += 64)
      _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + o), _mm512_load_si512(staged + o));
    return;
  }
#else
  (void)stream;
#endif
  for (int64_t j = 0; j < len; ++j) Io<DT>::store(p, start + j, src[j]);
}

#if defined(__AVX512F__)
// The zero-masked forms of the intrinsics below, with every lane selected, compile to the plain instructions;
// GCC 12 warns that the plain forms' internal "undefined" operand is used uninitialised (GCC bug 105593).
constexpr __mmask16 kAllLanes = 0xFFFF;

// 16 elements from index i, widened to fp32 (exact, as Io<DT>::load).
template <int DT>
inline __m512 load16(const void* p, int64_t i) {
  if constexpr (DT == kFloat32) {
    return _mm512_loadu_ps(static_cast<const float*>(p) + i);
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i));
    if constexpr (DT == kBFloat16) {
      const __m512i widened = _mm512_maskz_cvtepu16_epi32(kAllLanes, h);
      return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(kAllLanes, widened, 16));
    } else {
      return _mm512_maskz_cvtph_ps(kAllLanes, h);
    }
  }
}
#endif

template <class F>
void dispatch_in(int dt, F&& f) {
  switch (dt) {
    case kFloat32: f(std::integral_constant<int, kFloat32>{}); break;
    case kBFloat16: f(std::integral_constant<int, kBFloat16>{}); break;
    case kFloat16: f(std::integral_constant<int, kFloat16>{}); break;
    default: throw std::invalid_argument("unsupported dtype code " + std::to_string(dt));
  }
}

template <class F>
void dispatch_in_out(int in_dt, int out_dt, F&& f) {
  dispatch_in(in_dt, [&](auto in_c) {
    dispatch_in(out_dt, [&](auto out_c) { f(in_c, out_c); });
  });
}

inline uint32_t magnitude_key(float d) {
  uint32_t u;
  std::memcpy(&u, &d, 4);
  return u & 0x7fffffffu;
}

// murmur3's 32-bit finaliser (a bijection with full avalanche).
inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

// DARE stream: element i of the stream with 64-bit key K is
//   uniform32(i) = fmix32(lo32(i) * W + page_key(K, hi32(i))),  page_key(K, p) = lo32(K) ^ fmix32(hi32(K) ^ fmix32(p)).
// All 32-bit lanes (16 per AVX-512 vector, three vpmulld), so the drop mask costs less than the loads.
inline uint32_t dare_page_key(uint64_t key, uint32_t page) {
  return static_cast<uint32_t>(key) ^ fmix32(static_cast<uint32_t>(key >> 32) ^ fmix32(page));
}

inline uint32_t dare_hash(uint32_t lo, uint32_t page_key) { return fmix32(lo * kWeyl32 + page_key); }

inline uint32_t dare_uniform32(uint64_t key, uint64_t gi) {
  return dare_hash(static_cast<uint32_t>(gi), dare_page_key(key, static_cast<uint32_t>(gi >> 32)));
}

// keep[j] = 1 if uniform32(g0 + j) < below else 0 (below = 2^32 keeps all), for one block.
inline void dare_keep_block(uint64_t key, uint64_t below, int64_t g0, int64_t len, float* __restrict keep) {
  const bool all = below > 0xFFFFFFFFull;
  const uint32_t below32 = all ? 0xFFFFFFFFu : static_cast<uint32_t>(below);
  const uint64_t first = static_cast<uint64_t>(g0);
  const uint64_t last = first + static_cast<uint64_t>(len) - 1;
  const int32_t n32 = static_cast<int32_t>(len);
  if ((first >> 32) == (last >> 32)) {  // one page: the key is a loop constant
    const uint32_t page_key = dare_page_key(key, static_cast<uint32_t>(first >> 32));
    const uint32_t lo0 = static_cast<uint32_t>(first);
    for (int32_t j = 0; j < n32; ++j) {
      keep[j] = (all | (dare_hash(lo0 + static_cast<uint32_t>(j), page_key) < below32)) ? 1.0f : 0.0f;
    }
  } else {
    for (int32_t j = 0; j < n32; ++j) keep[j] = (all | (dare_uniform32(key, first + j) < below32)) ? 1.0f : 0.0f;
  }
}

// 1 if sign(wd) equals the elected sign (+ when vote >= 0, else -), 0 otherwise (also for wd == 0).
inline float agree_mask(float vote, float wd) {
  const bool positive = vote >= 0.0f;
  const bool agrees = (positive & (wd > 0.0f)) | (!positive & (wd < 0.0f));
  return agrees ? 1.0f : 0.0f;
}

std::vector<const void*> as_ptrs(const std::vector<uintptr_t>& v) {
  std::vector<const void*> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = reinterpret_cast<const void*>(v[i]);
  return out;
}

// ---------------------------------------------------------------- weighted sum
// acc = 0; acc = fma(x_k, w_k, acc) for k in order; out = acc [/ divisor]
// (mergekit linear: zeros, addcmul_ -- torch's addcmul rounds once, i.e. a fused multiply-add -- div_)
template <int IN, int OUT>
void weighted_sum_impl(const std::vector<const void*>& xs, const std::vector<float>& w, void* out, int64_t n,
                       bool normalize, float divisor) {
  const int64_t nblocks = (n + kBlock - 1) / kBlock;
  const size_t K = xs.size();
  const bool stream = stream_output<OUT>(out, n);
#pragma omp parallel if (n >= kParallelMin)
  {
    alignas(64) float acc[kBlock];
#pragma omp for schedule(static) nowait
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t s = blk * kBlock;
      const int64_t len = std::min(kBlock, n - s);
      for (int64_t j = 0; j < len; ++j) acc[j] = 0.0f;
      for (size_t k = 0; k < K; ++k) {
        const void* x = xs[k];
        const float wk = w[k];
        for (int64_t j = 0; j < len; ++j) acc[j] = std::fma(Io<IN>::load(x, s + j), wk, acc[j]);
      }
      if (normalize)
        for (int64_t j = 0; j < len; ++j) acc[j] = acc[j] / divisor;
      store_block<OUT>(out, s, len, acc, stream);
    }
    stream_fence(stream);
  }
}

void weighted_sum(const std::vector<uintptr_t>& x_ptrs, int in_dtype, const std::vector<float>& weights,
                  uintptr_t out_ptr, int out_dtype, int64_t n, bool normalize, float divisor) {
  if (x_ptrs.size() != weights.size()) throw std::invalid_argument("weighted_sum: one weight per tensor");
  const auto xs = as_ptrs(x_ptrs);
  py::gil_scoped_release release;
  dispatch_in_out(in_dtype, out_dtype, [&](auto in_c, auto out_c) {
    weighted_sum_impl<decltype(in_c)::value, decltype(out_c)::value>(xs, weights, reinterpret_cast<void*>(out_ptr),
                                                                     n, normalize, divisor);
  });
}

// ---------------------------------------------------------------- generalised task arithmetic
enum Sparsify : int { kNone = 0, kMagnitude = 1, kRandom = 2 };

// An element of one-pass TIES's order (key descending, then flat index ascending; see ties_one_pass_impl).
struct RankedElement {
  int64_t idx;
  uint32_t key;
};

// The same order packed into one integer, larger ranking higher: (key << 32) | (2^32 - 1 - idx), for
// 0 <= idx <= 2^32 - 1 (one-pass TIES runs on tensors of fewer than 2^32 elements).
inline uint64_t pack_ranked(uint32_t key, int64_t idx) {
  return (static_cast<uint64_t>(key) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(idx));
}

inline RankedElement unpack_ranked(uint64_t v) {
  return {static_cast<int64_t>(0xFFFFFFFFu - static_cast<uint32_t>(v & 0xFFFFFFFFu)), static_cast<uint32_t>(v >> 32)};
}

struct GtaParams {
  int sparsify = kNone;
  bool consensus = false;
  bool normalize = false;
  bool apply_lambda = false;
  float lambda = 1.0f;
  float plain_divisor = 1.0f;  // sum of weights (|.| < 1e-8 -> 1), used without consensus
  int64_t element_offset = 0;
  std::vector<float> weights;
  std::vector<uint32_t> threshold_keys;  // magnitude: keep |tau| bits > key, or == key at index < cutoff
  std::vector<int64_t> tie_cutoffs;
  std::vector<uint64_t> rng_keys;        // random: keep iff uniform32 < keep_below
  std::vector<uint64_t> keep_below;
  std::vector<float> rescale;            // random: survivors multiplied by this (1 -> skipped)
  std::vector<RankedElement> band_upper, band_lower;  // one-pass TIES: record the band between these
  bool stream = false;  // whole output blocks are written with non-temporal stores (stream_output)
};

// Per element (mergekit GeneralizedTaskArithmeticMerge.merge_group, computed in fp32):
//   d_k = x_k - b;  d_k *= mask_k [* rescale_k];  wd_k = d_k * w_k
//   consensus: s = sum_k wd_k; maj = s >= 0 ? +1 : -1; m_k = sign(wd_k) == maj
//              mixed = sum_k wd_k m_k; div = sum_k w_k m_k (0 -> 1)
//   otherwise: mixed = sum_k wd_k; div = plain_divisor
//   normalize: mixed /= div;  lambda != 1: mixed *= lambda;  out = b + mixed
// The combine step for one block: mixed = b + [lambda *] (sum_k wd_k m_k [/ div]). KK > 0 is the expert count
// known at compile time: one loop over the block, every expert in registers. KK == 0 runs any count
// with one loop per expert (vote and div in `scratch`). Both keep the fp32 operation order above.
template <int KK>
void gta_combine(const float* wd_all, const float* b, int64_t len, const GtaParams& p, float* mixed,
                 float* scratch) {
  const float* w = p.weights.data();
  const bool normalize = p.normalize, apply_lambda = p.apply_lambda;
  const float lambda = p.lambda, plain_divisor = p.plain_divisor;
  if constexpr (KK > 0) {
    float wk[KK];
    for (int k = 0; k < KK; ++k) wk[k] = w[k];
    if (p.consensus) {
      for (int64_t j = 0; j < len; ++j) {
        float vote = wd_all[j];
        for (int k = 1; k < KK; ++k) vote = vote + wd_all[k * kBlock + j];
        float m = agree_mask(vote, wd_all[j]);
        float mix = wd_all[j] * m;
        float div = wk[0] * m;
        for (int k = 1; k < KK; ++k) {
          const float wdk = wd_all[k * kBlock + j];
          m = agree_mask(vote, wdk);
          mix = mix + wdk * m;
          div = div + wk[k] * m;
        }
        div = div == 0.0f ? 1.0f : div;
        if (normalize) mix = mix / div;
        if (apply_lambda) mix = mix * lambda;
        mixed[j] = b[j] + mix;
      }
    } else {
      for (int64_t j = 0; j < len; ++j) {
        float mix = wd_all[j];
        for (int k = 1; k < KK; ++k) mix = mix + wd_all[k * kBlock + j];
        if (normalize) mix = mix / plain_divisor;
        if (apply_lambda) mix = mix * lambda;
        mixed[j] = b[j] + mix;
      }
    }
  } else {
    const size_t K = p.weights.size();
    float* vote = scratch;
    float* div = scratch + kBlock;
    for (int64_t j = 0; j < len; ++j) mixed[j] = wd_all[j];
    for (size_t k = 1; k < K; ++k)
      for (int64_t j = 0; j < len; ++j) mixed[j] = mixed[j] + wd_all[k * kBlock + j];
    if (p.consensus) {
      for (int64_t j = 0; j < len; ++j) vote[j] = mixed[j];
      for (size_t k = 0; k < K; ++k) {
        const float* wd = wd_all + k * kBlock;
        for (int64_t j = 0; j < len; ++j) {
          const float m = agree_mask(vote[j], wd[j]);
          mixed[j] = k == 0 ? wd[j] * m : mixed[j] + wd[j] * m;
          div[j] = k == 0 ? w[k] * m : div[j] + w[k] * m;
        }
      }
      for (int64_t j = 0; j < len; ++j) div[j] = div[j] == 0.0f ? 1.0f : div[j];
    } else {
      for (int64_t j = 0; j < len; ++j) div[j] = plain_divisor;
    }
    for (int64_t j = 0; j < len; ++j) {
      float mix = mixed[j];
      if (normalize) mix = mix / div[j];
      if (apply_lambda) mix = mix * lambda;
      mixed[j] = b[j] + mix;
    }
  }
}

// A rule "ranks at or above (key, index cutoff)" of the order key desc, index asc, restricted to one block:
// rank >= (key, cut) iff key > key_cut or (key == key_cut and local index < cut). Where cut is 0 or the whole
// block, as in all but one block per rule, it is a single unsigned compare: key >= at_least (2^32: none).
struct BlockRule {
  uint32_t key;
  int32_t cut;          // local cutoff in [0, kBlock]
  uint64_t at_least;    // when simple
  bool simple;

  BlockRule(uint32_t key_, int64_t cutoff, int64_t g0) : key(key_) {
    cut = static_cast<int32_t>(std::clamp<int64_t>(cutoff - g0, 0, kBlock));
    simple = cut == 0 || cut == kBlock;
    at_least = static_cast<uint64_t>(key) + (cut == 0 ? 1 : 0);
  }

  // whether the element at local index j with this key ranks at or above the rule
  bool admits(uint32_t k, int32_t j) const { return (k > key) | ((k == key) & (j < cut)); }
};

// The magnitude rules of the block starting at global index g0, K each: keep (threshold key, tie cutoff) and,
// with bands, upper and lower (an element is in the band iff it is not admitted by upper and is admitted by
// lower). Returns whether every rule is simple.
inline bool block_rules(const GtaParams& p, size_t K, int64_t g0, bool bands, std::vector<BlockRule>& rules) {
  rules.clear();
  for (size_t k = 0; k < K; ++k) rules.emplace_back(p.threshold_keys[k], p.tie_cutoffs[k], g0);
  if (bands) {
    for (size_t k = 0; k < K; ++k) rules.emplace_back(p.band_upper[k].key, p.band_upper[k].idx, g0);
    for (size_t k = 0; k < K; ++k) rules.emplace_back(p.band_lower[k].key, p.band_lower[k].idx + 1, g0);
  }
  bool simple = true;
  for (const auto& r : rules) simple = simple && r.simple;
  return simple;
}

// Per-thread buffers of one block step.
struct GtaScratch {
  explicit GtaScratch(size_t experts)
      : wd(experts * kBlock), nonfinite(experts), band_keys(experts * kBlock), band_local(experts * kBlock),
        keep(experts * kBlock) {}
  std::vector<float> wd;
  std::vector<int64_t> nonfinite;  // kMagnitude: NaN/Inf task-vector elements per expert, summed over blocks
  std::vector<uint32_t> band_keys, band_local;  // gta_block16: one block's band elements per expert
  std::vector<BlockRule> rules;                 // block_rules: the block's magnitude rules
  alignas(64) float b[kBlock];
  alignas(64) float mixed[kBlock];
  alignas(64) float scratch[2 * kBlock];
  std::vector<float> keep;  // kRandom: each expert's DARE keep mask for the block
};

// ++h[lows[j]] for j < m: 16-bit key halves (the low halves inside one prefix, or the sample's top halves).
// Task vectors of bf16 fine-tunes are a few ulps, so their keys take few values (on a Llama-shaped benchmark
// tensor, 22% of all elements share the threshold's key); counted one by one they form a store-to-load chain
// through one bin. Lanes equal to
// the first value are counted in a register instead. (Not for level-0 prefixes: they spread over a few
// dozen bins, where the per-lane fallback is slower than two interleaved tables.)
inline void count_lows(const uint32_t* lows, int64_t m, uint32_t* h) {
  int64_t j = 0;
#if defined(__AVX512F__)
  if (m >= 16) {
    const uint32_t hot = lows[0];
    const __m512i hot_v = _mm512_set1_epi32(static_cast<int>(hot));
    uint32_t hot_count = 0;
    for (; j + 16 <= m; j += 16) {
      const __mmask16 same = _mm512_cmpeq_epi32_mask(_mm512_loadu_si512(lows + j), hot_v);
      hot_count += __builtin_popcount(same);
      for (uint32_t other = static_cast<uint16_t>(~same); other != 0; other &= other - 1)
        ++h[lows[j + __builtin_ctz(other)]];
    }
    h[hot] += hot_count;
  }
#endif
  for (; j < m; ++j) ++h[lows[j]];
}

// ---------------------------------------------------------------- one-pass TIES
// TIES keeps, per expert, the top k elements of the order "key descending, flat index ascending" (key = fp32
// bits of |x_k - b|; the lowest indices win ties). A sample guesses three elements of that order: upper U,
// middle M (the sample's k-th) and lower L, a few standard errors apart. The merge pass then keeps what ranks
// at or above M (a guess), counts what it kept and records the band between U and L with its keys. Everything
// ranking at or above M and not above U is in the band, so kept - (band elements at or above M) is the exact
// count above U. If the k-th element lies in the band it is found there, and only the elements whose fate the
// guess got wrong, those between M and it, are merged again; otherwise the guess is reported as failed and the
// caller selects exactly first (alignmerge/ops/merge.py).
constexpr int64_t kOnePassStride = 16;                // sample one block in every 16 ...
constexpr int64_t kOnePassMaxSampleBlocks = 1 << 14;  // ... or fewer, at most 4M elements per expert
constexpr double kOnePassSigmas = 4.0;                // band half-width: 4 standard errors of the sample's rank ...
constexpr int64_t kOnePassSlack = 64;                 // ... plus 64 sample elements
constexpr int64_t kSamplePrefetch = 4;                 // sampled blocks fetched ahead of their use

// A buffer that the thread owning it keeps between calls: one-pass TIES writes tens of MB of sample keys and
// band records per large tensor, and faulting fresh pages in for every tensor cost more than the writing.
// It grows and never shrinks (uninitialised: every use writes before it reads).
template <class T>
struct ReusedBuffer {
  std::unique_ptr<T[]> data;
  size_t size = 0;
  T* get(size_t n) {
    if (n > size) {
      data.reset();
      data.reset(new T[n]);
      size = n;
    }
    return data.get();
  }
};

// The band records of one merge pass: expert k, thread t owns the cap slots at slots + (k * threads + t) * cap.
struct TiesBands {
  uint64_t* slots = nullptr;  // pack_ranked(key, global index) of the band elements
  int64_t cap = 0;
  int threads = 0;
  std::vector<int64_t> count, kept;  // [k * threads + t]: band elements seen, elements kept by the guessed rule
  bool full = false;                 // a band outgrew its slots: the guess failed

  TiesBands(uint64_t* slots_, int64_t cap_, int threads_, size_t experts)
      : slots(slots_), cap(cap_), threads(threads_), count(experts * threads_, 0), kept(experts * threads_, 0) {}
};

// One thread's share of the band records while the pass runs.
struct BandPart {
  BandPart(const TiesBands* bands, size_t experts, int thread)
      : slots(experts), count(experts, 0), kept(experts, 0), cap(bands != nullptr ? bands->cap : 0) {
    for (size_t k = 0; bands != nullptr && k < experts; ++k)
      slots[k] = bands->slots + (k * bands->threads + thread) * cap;
  }
  std::vector<uint64_t*> slots;
  std::vector<int64_t> count, kept;
  int64_t cap;
  bool full = false;  // stop merging: the caller merges again

  void record(size_t k, uint64_t ranked) {
    if (count[k] < cap) slots[k][count[k]] = ranked;
    full = full || ++count[k] > cap;
  }
};

#if defined(__AVX512F__)
// The sign-elected merge (TIES, DARE-TIES: sparsify, sign election, disjoint mean) on one whole block with
// all KK experts in registers, 16 elements a step: gta_block's sparsify loops and gta_combine<KK> in the same
// fp32 operation order. kMagnitude also counts NaN/Inf task-vector elements and, with BANDS, one-pass TIES's
// kept counts and band records; SIMPLE: every rule of the block is simple (BlockRule), so keep and band are
// one or two compares. kRandom takes DARE's keep masks from dare_keep_block. Writes t.mixed.
template <int IN, int KK, int SPARSIFY, bool BANDS = false, bool SIMPLE = true>
void gta_block16(const void* base, const std::vector<const void*>& xs, int64_t s, const GtaParams& p,
                 const BlockRule* keep_rule, const BlockRule* upper, const BlockRule* lower, GtaScratch& t,
                 BandPart* band) {
  const int64_t g0 = p.element_offset + s;
  float* expert_keep = t.keep.data();
  __m512 rescale[KK];
  bool rescaled[KK];
  if constexpr (SPARSIFY == kRandom) {
    for (int k = 0; k < KK; ++k) {
      dare_keep_block(p.rng_keys[k], p.keep_below[k], g0, kBlock, expert_keep + k * kBlock);
      rescale[k] = _mm512_set1_ps(p.rescale[k]);
      rescaled[k] = p.rescale[k] != 1.0f;
    }
  }
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i abs_bits = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f), lambda = _mm512_set1_ps(p.lambda);
  auto splat = [](uint64_t v) { return _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(v))); };
  const void* x[KK];
  __m512 w[KK];
  // general: keys and local cutoffs of the rules; SIMPLE: keep iff key >= th (none_kept: never),
  // band iff key - band_low <= band_span (unsigned; band_none: empty)
  __m512i th[KK], cut[KK], up[KK], up_cut[KK], low[KK], low_cut[KK], band_low[KK], band_span[KK];
  bool none_kept[KK], band_none[KK];
  int64_t kept[KK] = {}, nonfinite[KK] = {}, found[KK] = {};
  for (int k = 0; k < KK; ++k) {
    x[k] = xs[k];
    w[k] = _mm512_set1_ps(p.weights[k]);
    if constexpr (SPARSIFY == kRandom) continue;
    if constexpr (SIMPLE) {
      none_kept[k] = keep_rule[k].at_least > 0xFFFFFFFFu;
      th[k] = splat(keep_rule[k].at_least);
      if constexpr (BANDS) {  // not above upper: key < upper.at_least; not below lower: key >= lower.at_least
        band_none[k] = upper[k].at_least <= lower[k].at_least;
        band_low[k] = splat(lower[k].at_least);
        band_span[k] = splat(upper[k].at_least - 1 - lower[k].at_least);
      }
    } else {
      th[k] = splat(keep_rule[k].key);
      cut[k] = _mm512_set1_epi32(keep_rule[k].cut);
      if constexpr (BANDS) {
        up[k] = splat(upper[k].key);
        up_cut[k] = _mm512_set1_epi32(upper[k].cut);
        low[k] = splat(lower[k].key);
        low_cut[k] = _mm512_set1_epi32(lower[k].cut);
      }
    }
  }
  for (int64_t j = 0; j < kBlock; j += 16) {
    const __m512 b = load16<IN>(base, s + j);
    const __m512i local = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(j)));
    __m512 wd[KK];
    for (int k = 0; k < KK; ++k) {
      const __m512 d = _mm512_sub_ps(load16<IN>(x[k], s + j), b);
      if constexpr (SPARSIFY == kRandom) {
        const __m512 kept_d = _mm512_mul_ps(d, _mm512_loadu_ps(expert_keep + k * kBlock + j));
        wd[k] = _mm512_mul_ps(rescaled[k] ? _mm512_mul_ps(kept_d, rescale[k]) : kept_d, w[k]);
        continue;
      }
      const __m512i key = _mm512_and_si512(_mm512_castps_si512(d), abs_bits);
      __mmask16 keep, in_band = 0;
      if constexpr (SIMPLE) {
        keep = none_kept[k] ? 0 : _mm512_cmpge_epu32_mask(key, th[k]);
        if constexpr (BANDS)
          in_band = band_none[k] ? 0 : _mm512_cmple_epu32_mask(_mm512_sub_epi32(key, band_low[k]), band_span[k]);
      } else {
        keep = _mm512_cmpgt_epu32_mask(key, th[k]) |
               (_mm512_cmpeq_epi32_mask(key, th[k]) & _mm512_cmplt_epi32_mask(local, cut[k]));
        if constexpr (BANDS) {
          const __mmask16 above_upper =
              _mm512_cmpgt_epu32_mask(key, up[k]) |
              (_mm512_cmpeq_epi32_mask(key, up[k]) & _mm512_cmplt_epi32_mask(local, up_cut[k]));
          const __mmask16 at_or_above_lower =
              _mm512_cmpgt_epu32_mask(key, low[k]) |
              (_mm512_cmpeq_epi32_mask(key, low[k]) & _mm512_cmplt_epi32_mask(local, low_cut[k]));
          in_band = static_cast<__mmask16>(~above_upper & at_or_above_lower);
        }
      }
      wd[k] = _mm512_mul_ps(_mm512_mul_ps(d, _mm512_maskz_mov_ps(keep, one)), w[k]);
      nonfinite[k] += __builtin_popcount(_mm512_cmpge_epu32_mask(key, inf));
      if constexpr (BANDS) {
        kept[k] += __builtin_popcount(keep);
        if (in_band != 0) {  // rare (the band is a few thousandths of the tensor); no calls in this loop
          _mm512_mask_compressstoreu_epi32(t.band_keys.data() + k * kBlock + found[k], in_band, key);
          _mm512_mask_compressstoreu_epi32(t.band_local.data() + k * kBlock + found[k], in_band, local);
          found[k] += __builtin_popcount(in_band);
        }
      }
    }
    __m512 vote = wd[0];
    for (int k = 1; k < KK; ++k) vote = _mm512_add_ps(vote, wd[k]);
    const __mmask16 positive = _mm512_cmp_ps_mask(vote, zero, _CMP_GE_OQ);
    __m512 mix = zero, div = zero;
    for (int k = 0; k < KK; ++k) {  // agree_mask: sign(wd) equals the elected sign
      const __mmask16 agrees = (positive & _mm512_cmp_ps_mask(wd[k], zero, _CMP_GT_OQ)) |
                               (~positive & _mm512_cmp_ps_mask(wd[k], zero, _CMP_LT_OQ));
      const __m512 m = _mm512_maskz_mov_ps(agrees, one);
      mix = k == 0 ? _mm512_mul_ps(wd[k], m) : _mm512_add_ps(mix, _mm512_mul_ps(wd[k], m));
      div = k == 0 ? _mm512_mul_ps(w[k], m) : _mm512_add_ps(div, _mm512_mul_ps(w[k], m));
    }
    div = _mm512_mask_mov_ps(div, _mm512_cmp_ps_mask(div, zero, _CMP_EQ_OQ), one);
    if (p.normalize) mix = _mm512_div_ps(mix, div);
    if (p.apply_lambda) mix = _mm512_mul_ps(mix, lambda);
    _mm512_storeu_ps(t.mixed + j, _mm512_add_ps(b, mix));
  }
  for (int k = 0; k < KK; ++k) {
    t.nonfinite[k] += nonfinite[k];
    if constexpr (BANDS) {
      band->kept[k] += kept[k];
      for (int64_t i = 0; i < found[k]; ++i)
        band->record(k, pack_ranked(t.band_keys[k * kBlock + i], g0 + t.band_local[k * kBlock + i]));
    }
  }
}

// gta_block's path for whole blocks of up to four experts with sign election: picks the gta_block16 variant.
template <int IN>
void consensus_block(const void* base, const std::vector<const void*>& xs, int64_t s, const GtaParams& p,
                     GtaScratch& t, BandPart* band) {
  const size_t K = xs.size();
  if (p.sparsify == kRandom) {
    switch (K) {
      case 1: gta_block16<IN, 1, kRandom>(base, xs, s, p, nullptr, nullptr, nullptr, t, band); break;
      case 2: gta_block16<IN, 2, kRandom>(base, xs, s, p, nullptr, nullptr, nullptr, t, band); break;
      case 3: gta_block16<IN, 3, kRandom>(base, xs, s, p, nullptr, nullptr, nullptr, t, band); break;
      default: gta_block16<IN, 4, kRandom>(base, xs, s, p, nullptr, nullptr, nullptr, t, band);
    }
    return;
  }
  const bool simple = block_rules(p, K, p.element_offset + s, band != nullptr, t.rules);
  const BlockRule* keep = t.rules.data();
  const BlockRule* upper = band != nullptr ? keep + K : nullptr;
  const BlockRule* lower = band != nullptr ? keep + 2 * K : nullptr;
  auto run = [&](auto kk) {
    constexpr int KK = decltype(kk)::value;
    if (band != nullptr) {
      if (simple)
        gta_block16<IN, KK, kMagnitude, true, true>(base, xs, s, p, keep, upper, lower, t, band);
      else
        gta_block16<IN, KK, kMagnitude, true, false>(base, xs, s, p, keep, upper, lower, t, band);
    } else {
      if (simple)
        gta_block16<IN, KK, kMagnitude, false, true>(base, xs, s, p, keep, upper, lower, t, band);
      else
        gta_block16<IN, KK, kMagnitude, false, false>(base, xs, s, p, keep, upper, lower, t, band);
    }
  };
  switch (K) {
    case 1: run(std::integral_constant<int, 1>{}); break;
    case 2: run(std::integral_constant<int, 2>{}); break;
    case 3: run(std::integral_constant<int, 3>{}); break;
    default: run(std::integral_constant<int, 4>{});
  }
}
#endif

// Elements [s, s + len) of the merge (len <= kBlock). With band (one-pass TIES, kMagnitude) the pass also
// counts what the guessed rule keeps and records the band elements (see ties_one_pass_impl).
template <int IN, int OUT>
void gta_block(const void* base, const std::vector<const void*>& xs, void* out, int64_t s, int64_t len,
               const GtaParams& p, GtaScratch& t, BandPart* band = nullptr) {
  const size_t K = xs.size();
#if defined(__AVX512F__)
  if (p.sparsify != kNone && p.consensus && len == kBlock && K <= 4) {
    consensus_block<IN>(base, xs, s, p, t, band);
    store_block<OUT>(out, s, len, t.mixed, p.stream);
    return;
  }
#endif
  const int64_t g0 = p.element_offset + s;  // global index of element s
  float* b = t.b;
  load_block<IN>(base, s, len, b);
  for (size_t k = 0; k < K; ++k) {
    float* __restrict wd = t.wd.data() + k * kBlock;
    const void* x = xs[k];
    const float wk = p.weights[k];
    if (p.sparsify == kMagnitude) {
      const bool bands = band != nullptr;
      if (k == 0) block_rules(p, K, g0, bands, t.rules);
      const BlockRule keep_rule = t.rules[k];
      const int32_t n32 = static_cast<int32_t>(len);
      int64_t kept = 0, nonfinite = 0;  // nonfinite: TIES may drop an element, so count what its output won't show
      for (int32_t j = 0; j < n32; ++j) {
        const float d = Io<IN>::load(x, s + j) - b[j];
        const uint32_t key = magnitude_key(d);
        const bool keep = keep_rule.admits(key, j);
        wd[j] = (d * (keep ? 1.0f : 0.0f)) * wk;
        nonfinite += key >= 0x7f800000u;
        if (bands) {
          kept += keep;
          if (!t.rules[K + k].admits(key, j) && t.rules[2 * K + k].admits(key, j))
            band->record(k, pack_ranked(key, g0 + j));
        }
      }
      if (bands) band->kept[k] += kept;
      t.nonfinite[k] += nonfinite;
    } else if (p.sparsify == kRandom) {
      float* keep = t.keep.data() + k * kBlock;
      dare_keep_block(p.rng_keys[k], p.keep_below[k], g0, len, keep);
      const float r = p.rescale[k];
      if (r != 1.0f) {
        for (int64_t j = 0; j < len; ++j) wd[j] = (((Io<IN>::load(x, s + j) - b[j]) * keep[j]) * r) * wk;
      } else {
        for (int64_t j = 0; j < len; ++j) wd[j] = ((Io<IN>::load(x, s + j) - b[j]) * keep[j]) * wk;
      }
    } else {
      for (int64_t j = 0; j < len; ++j) wd[j] = (Io<IN>::load(x, s + j) - b[j]) * wk;
    }
  }
  switch (K) {
    case 1: gta_combine<1>(t.wd.data(), b, len, p, t.mixed, t.scratch); break;
    case 2: gta_combine<2>(t.wd.data(), b, len, p, t.mixed, t.scratch); break;
    case 3: gta_combine<3>(t.wd.data(), b, len, p, t.mixed, t.scratch); break;
    case 4: gta_combine<4>(t.wd.data(), b, len, p, t.mixed, t.scratch); break;
    default: gta_combine<0>(t.wd.data(), b, len, p, t.mixed, t.scratch);
  }
  store_block<OUT>(out, s, len, t.mixed, p.stream);
}

// The whole merge; kMagnitude adds each expert's NaN/Inf task-vector elements to nonfinite. With bands
// (one-pass TIES) each thread also records its band elements and counts what the guessed rule keeps.
template <int IN, int OUT>
void gta_impl(const void* base, const std::vector<const void*>& xs, void* out, int64_t n, const GtaParams& p,
              std::vector<int64_t>& nonfinite, TiesBands* bands = nullptr) {
  const int64_t nblocks = (n + kBlock - 1) / kBlock;
  const size_t K = xs.size();
#pragma omp parallel if (n >= kParallelMin)
  {
    GtaScratch t(K);
    const int thread = omp_get_thread_num();
    BandPart part(bands, K, thread);
#pragma omp for schedule(static) nowait
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      if (part.full) continue;  // the one-pass guess failed: the caller merges again
      const int64_t s = blk * kBlock;
      const int64_t len = std::min(kBlock, n - s);
      gta_block<IN, OUT>(base, xs, out, s, len, p, t, bands != nullptr ? &part : nullptr);
    }
    stream_fence(p.stream);
#pragma omp critical
    {
      for (size_t k = 0; k < K; ++k) nonfinite[k] += t.nonfinite[k];
      if (bands != nullptr) {
        bands->full = bands->full || part.full;
        for (size_t k = 0; k < K; ++k) {
          bands->count[k * bands->threads + thread] = part.count[k];
          bands->kept[k * bands->threads + thread] = part.kept[k];
        }
      }
    }
  }
}

// The sample: in each group of `stride` whole blocks, block q * stride + (7q mod stride), so that the offset
// cycles through the group and row-periodic structure is not aliased. keys[k] holds the sampled keys of
// expert k in index order, hist[k] the histogram of their top 16 bits.
struct TiesSample {
  int64_t stride = 0, groups = 0;
  uint32_t* keys = nullptr;  // expert k's at keys + k * size()
  std::vector<std::vector<int64_t>> hist;

  int64_t size() const { return groups * kBlock; }
  int64_t block_of_group(int64_t q) const { return q * stride + (7 * q) % stride; }
  int64_t global_index(int64_t j) const { return block_of_group(j / kBlock) * kBlock + j % kBlock; }

  // The sampled elements at the given 1-based ranks (ascending) of the order key desc, index asc.
  std::vector<RankedElement> at_ranks(size_t k, const std::vector<int64_t>& ranks, ReusedBuffer<uint64_t>& scratch,
                                      ReusedBuffer<uint32_t>& split) const {
    const auto& h = hist[k];
    auto bucket_of = [&](int64_t rank, int64_t* above) {  // the bucket holding `rank`, and the count above it
      int64_t seen = 0;
      for (int bin = kBins - 1; bin >= 0; --bin) {
        if (seen + h[bin] >= rank) {
          *above = seen;
          return bin;
        }
        seen += h[bin];
      }
      *above = seen;
      return 0;
    };
    int64_t above = 0, unused = 0;
    const int hi = bucket_of(ranks.front(), &above);
    const int lo = bucket_of(ranks.back(), &unused);
    // packed (pack_ranked with sample positions, < 2^32) so that descending order is the rank order
    int64_t inside = 0;
    for (int bin = lo; bin <= hi; ++bin) inside += h[bin];
    uint64_t* packed = scratch.get(static_cast<size_t>(inside) + 1);
    const uint32_t* kk = keys + k * size();
    const uint32_t width = static_cast<uint32_t>(hi - lo);
    int64_t j = 0, filled = 0;
#if defined(__AVX512F__)
    {  // 16 keys a step: the candidates' keys and positions, compressed, then packed
      uint32_t* cand_keys = split.get(2 * static_cast<size_t>(inside) + 32);
      uint32_t* cand_pos = cand_keys + inside + 16;
      const __m512i lo_v = _mm512_set1_epi32(lo), width_v = _mm512_set1_epi32(static_cast<int>(width));
      const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      for (; j + 16 <= size(); j += 16) {
        const __m512i key = _mm512_loadu_si512(kk + j);
        const __m512i top = _mm512_maskz_srli_epi32(kAllLanes, key, 16);
        const __mmask16 in = _mm512_cmple_epu32_mask(_mm512_sub_epi32(top, lo_v), width_v);
        _mm512_mask_compressstoreu_epi32(cand_keys + filled, in, key);
        _mm512_mask_compressstoreu_epi32(cand_pos + filled, in,
                                         _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(j))));
        filled += __builtin_popcount(in);
      }
      for (int64_t i = 0; i < filled; ++i) packed[i] = pack_ranked(cand_keys[i], cand_pos[i]);
    }
#endif
    for (; j < size(); ++j) {  // branch-free: the slot is overwritten unless the bin is inside
      packed[filled] = pack_ranked(kk[j], j);
      filled += ((kk[j] >> 16) - static_cast<uint32_t>(lo)) <= width;
    }
    std::vector<RankedElement> found;
    uint64_t* first = packed;
    for (int64_t rank : ranks) {
      uint64_t* nth = packed + (rank - above - 1);
      std::nth_element(first, nth, packed + inside, std::greater<uint64_t>());
      const RankedElement e = unpack_ranked(*nth);
      found.push_back({global_index(e.idx), e.key});
      first = nth + 1;
    }
    return found;
  }
};

template <int IN>
TiesSample ties_sample(const void* base, const std::vector<const void*>& xs, int64_t n, const std::vector<char>& active,
                       ReusedBuffer<uint32_t>& keys) {
  TiesSample smp;
  const int64_t whole = n / kBlock;
  smp.stride = std::max(kOnePassStride, (whole + kOnePassMaxSampleBlocks - 1) / kOnePassMaxSampleBlocks);
  smp.groups = whole / smp.stride;
  const size_t K = xs.size();
  smp.keys = keys.get(static_cast<size_t>(K * smp.size()));
  smp.hist.assign(K, std::vector<int64_t>(kBins, 0));
#pragma omp parallel if (smp.size() >= kParallelMin)
  {
    std::vector<uint32_t> local(K * kBins, 0u);
    alignas(64) float b[kBlock];
#pragma omp for schedule(static)
    for (int64_t q = 0; q < smp.groups; ++q) {
      const int64_t s = smp.block_of_group(q) * kBlock;
      if (q + kSamplePrefetch < smp.groups) {  // blocks 16+ KB apart: the hardware prefetchers do not follow
        const int64_t ahead = smp.block_of_group(q + kSamplePrefetch) * kBlock * storage_bytes<IN>();
        for (int64_t line = 0; line < kBlock * storage_bytes<IN>(); line += 64) {
          __builtin_prefetch(static_cast<const char*>(base) + ahead + line, 0, 2);
          for (size_t k = 0; k < K; ++k)
            if (active[k]) __builtin_prefetch(static_cast<const char*>(xs[k]) + ahead + line, 0, 2);
        }
      }
      load_block<IN>(base, s, kBlock, b);
      for (size_t k = 0; k < K; ++k) {
        if (!active[k]) continue;
        uint32_t* key = smp.keys + k * smp.size() + q * kBlock;
        for (int64_t j = 0; j < kBlock; ++j) key[j] = magnitude_key(Io<IN>::load(xs[k], s + j) - b[j]);
        alignas(64) uint32_t top[kBlock];
        for (int64_t j = 0; j < kBlock; ++j) top[j] = key[j] >> 16;
        count_lows(top, kBlock, local.data() + k * kBins);
      }
    }
#pragma omp critical
    for (size_t k = 0; k < K; ++k)
      for (int i = 0; i < kBins; ++i) smp.hist[k][i] += local[k * kBins + i];
  }
  return smp;
}

struct OnePassResult {
  bool ok = false;
  int64_t band = 0, remerged = 0;  // band elements recorded, elements merged again
  std::vector<int64_t> nonfinite;  // per expert: NaN/Inf task-vector elements
};

// One-pass TIES over the whole tensor (p.element_offset == 0). keep[k]: elements expert k keeps; experts with
// 0 < keep < n are selected here, the others come with their fixed rule in p.threshold_keys / tie_cutoffs. On
// success p holds the exact rule (keep iff key > threshold, or == threshold and index < cutoff).
template <int IN, int OUT>
OnePassResult ties_one_pass_impl(const void* base, const std::vector<const void*>& xs, void* out, int64_t n,
                                 GtaParams& p, const std::vector<int64_t>& keep) {
  const size_t K = xs.size();
  OnePassResult res;
  res.nonfinite.assign(K, 0);
  if (n > 0xFFFFFFFFll) return res;  // pack_ranked needs indices below 2^32
  std::vector<char> active(K, 0);  // selected here (not keep-all / keep-none)
  for (size_t k = 0; k < K; ++k) active[k] = keep[k] > 0 && keep[k] < n;
  static thread_local ReusedBuffer<uint32_t> sample_keys, candidate_parts;
  static thread_local ReusedBuffer<uint64_t> candidates, band_slots;
  const TiesSample smp = ties_sample<IN>(base, xs, n, active, sample_keys);
  const int64_t m = smp.size();
  if (m < 16 * kBlock) return res;  // too few sampled blocks to guess from
  // an empty band (every element below "lower") for the experts with a fixed rule
  p.band_upper.assign(K, {0, 0xFFFFFFFFu});
  p.band_lower.assign(K, {0, 0xFFFFFFFFu});
  std::vector<uint64_t> mid(K, 0);  // the guessed k-th element of each expert, packed
  int64_t widest = 0;
  for (size_t k = 0; k < K; ++k) {
    if (!active[k]) continue;
    const int64_t r = std::clamp<int64_t>(std::llround(static_cast<double>(keep[k]) * m / n), 1, m);
    const double sigma = std::sqrt(static_cast<double>(r) * (1.0 - static_cast<double>(r) / m));
    const int64_t delta = static_cast<int64_t>(std::ceil(kOnePassSigmas * sigma)) + kOnePassSlack;
    std::vector<int64_t> ranks;
    if (r - delta >= 1) ranks.push_back(r - delta);
    ranks.push_back(r);
    if (r + delta <= m) ranks.push_back(r + delta);
    const auto found = smp.at_ranks(k, ranks, candidates, candidate_parts);
    const RankedElement guess = found[r - delta >= 1 ? 1 : 0];
    mid[k] = pack_ranked(guess.key, guess.idx);
    p.band_upper[k] = r - delta >= 1 ? found.front() : RankedElement{0, 0xFFFFFFFFu};  // above every key
    p.band_lower[k] = r + delta <= m ? found.back() : RankedElement{n, 0u};            // below every element
    p.threshold_keys[k] = guess.key;  // the guess: keep what ranks at or above mid
    p.tie_cutoffs[k] = guess.idx + 1;
    widest = std::max(widest, std::min(r + delta, m) - std::max<int64_t>(r - delta, 1) + 1);
  }
  // expected band: widest * n / m elements per expert; more means the sample misled
  const int threads = omp_get_max_threads();
  const int64_t cap = 2 * (widest * (n / m + 1)) + 4096;
  TiesBands bands(band_slots.get(static_cast<size_t>(K * threads * cap)), cap, threads, K);
  gta_impl<IN, OUT>(base, xs, out, n, p, res.nonfinite, &bands);
  if (bands.full) return res;

  std::vector<int64_t> remerge;
  for (size_t k = 0; k < K; ++k) {
    if (!active[k]) continue;
    int64_t kept = 0, size = 0;  // the threads' records, moved together
    uint64_t* band = bands.slots + k * threads * cap;
    for (int t = 0; t < threads; ++t) {
      const int64_t count = bands.count[k * threads + t];
      kept += bands.kept[k * threads + t];
      std::memmove(band + size, band + t * cap, static_cast<size_t>(count) * sizeof(uint64_t));
      size += count;
    }
    res.band += size;
    int64_t above = kept;  // kept by the guess, less the band elements it kept
    for (int64_t i = 0; i < size; ++i) above -= band[i] >= mid[k];
    const int64_t need = keep[k] - above;  // how many of the band are kept
    if (need < 0 || need > size) return res;
    if (need == 0) {  // exactly what ranks above upper
      p.threshold_keys[k] = p.band_upper[k].key;
      p.tie_cutoffs[k] = p.band_upper[k].idx;
    } else {
      std::nth_element(band, band + (need - 1), band + size, std::greater<uint64_t>());
      const RankedElement kth = unpack_ranked(band[need - 1]);
      p.threshold_keys[k] = kth.key;
      p.tie_cutoffs[k] = kth.idx + 1;
    }
    for (int64_t i = 0; i < size; ++i) {
      const bool keeps = i < need;  // after nth_element, the band's top `need` come first
      const bool guessed = band[i] >= mid[k];
      if (keeps != guessed) remerge.push_back(unpack_ranked(band[i]).idx);
    }
  }
  std::sort(remerge.begin(), remerge.end());
  remerge.erase(std::unique(remerge.begin(), remerge.end()), remerge.end());
  res.remerged = static_cast<int64_t>(remerge.size());
  const int64_t count = res.remerged;
#pragma omp parallel if (count >= 4096)
  {
    GtaScratch t(K);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < count; ++i) gta_block<IN, OUT>(base, xs, out, remerge[i], 1, p, t);
  }
  res.ok = true;
  return res;
}

// With keep_counts (TIES over a whole tensor) the thresholds of the experts with 0 < keep < n are found in the
// same pass (ties_one_pass_impl). Returns (ok, threshold keys, tie cutoffs, band elements, elements merged
// again, NaN/Inf task-vector elements per expert (magnitude sparsification only)); ok is false only when the
// one-pass guess failed, and then the output must be merged again.
std::tuple<bool, std::vector<uint32_t>, std::vector<int64_t>, int64_t, int64_t, std::vector<int64_t>> gta_merge(
    uintptr_t base_ptr, const std::vector<uintptr_t>& x_ptrs, int in_dtype, uintptr_t out_ptr, int out_dtype,
    int64_t n, int64_t element_offset, const std::vector<float>& weights, int sparsify, bool consensus,
    bool normalize, float lambda, bool apply_lambda, float plain_divisor, const std::vector<uint32_t>& threshold_keys,
    const std::vector<int64_t>& tie_cutoffs, const std::vector<uint64_t>& rng_keys,
    const std::vector<uint64_t>& keep_below, const std::vector<float>& rescale,
    const std::vector<int64_t>& keep_counts) {
  const size_t K = x_ptrs.size();
  if (K == 0 || weights.size() != K) throw std::invalid_argument("gta_merge: need one weight per expert");
  if (sparsify == kMagnitude && (threshold_keys.size() != K || tie_cutoffs.size() != K))
    throw std::invalid_argument("gta_merge: need one threshold and tie cutoff per expert");
  if (sparsify == kRandom && (rng_keys.size() != K || keep_below.size() != K || rescale.size() != K))
    throw std::invalid_argument("gta_merge: need one rng key, keep threshold and rescale per expert");
  const bool one_pass = !keep_counts.empty();
  if (one_pass && (sparsify != kMagnitude || keep_counts.size() != K || element_offset != 0))
    throw std::invalid_argument("gta_merge: keep_counts need magnitude sparsification, one per expert, offset 0");
  GtaParams p;
  p.sparsify = sparsify;
  p.consensus = consensus;
  p.normalize = normalize;
  p.lambda = lambda;
  p.apply_lambda = apply_lambda;
  p.plain_divisor = plain_divisor;
  p.element_offset = element_offset;
  p.weights = weights;
  p.threshold_keys = threshold_keys;
  p.tie_cutoffs = tie_cutoffs;
  p.rng_keys = rng_keys;
  p.keep_below = keep_below;
  p.rescale = rescale;
  const auto xs = as_ptrs(x_ptrs);
  OnePassResult res;
  res.ok = true;
  res.nonfinite.assign(K, 0);
  {
    py::gil_scoped_release release;
    dispatch_in_out(in_dtype, out_dtype, [&](auto in_c, auto out_c) {
      constexpr int IN = decltype(in_c)::value, OUT = decltype(out_c)::value;
      const void* base = reinterpret_cast<const void*>(base_ptr);
      void* out = reinterpret_cast<void*>(out_ptr);
      p.stream = stream_output<OUT>(out, n);
      if (one_pass)
        res = ties_one_pass_impl<IN, OUT>(base, xs, out, n, p, keep_counts);
      else
        gta_impl<IN, OUT>(base, xs, out, n, p, res.nonfinite);
    });
  }
  return {res.ok, p.threshold_keys, p.tie_cutoffs, res.band, res.remerged, res.nonfinite};
}

// ---------------------------------------------------------------- magnitude selection (TIES)
// key(i) = fp32 bits of |x_k[i] - b[i]| (monotone in the magnitude). Level 0 histograms key >> 16;
// level 1 histograms key & 0xffff over the elements whose key >> 16 equals the expert's prefix p.
// Counts are added into hist (int64 [K, 65536]) so calls over row chunks accumulate. With window
// (int64 [K, kWindow], level 1 only) each call also adds, per expert, the count of keys whose top half
// exceeds p + 2 and the counts of top halves p + 2, p + 1, p, p - 1, p - 2: these confirm (or correct)
// a prefix guessed from a sample without a full level-0 pass.
constexpr int kWindow = 6;
constexpr int64_t kSampleTableMin = int64_t{1} << 20;  // smaller samples: one thread, no 64K-bin tables
constexpr int kReach = 2;  // the window covers prefixes p - kReach .. p + kReach

inline void window_count(uint32_t hi, uint32_t prefix, int64_t* w) {
  const int64_t d = static_cast<int64_t>(prefix) + kReach - static_cast<int64_t>(hi);  // 0 at p + 2
  if (d < 0)
    ++w[0];
  else if (d <= 2 * kReach)
    ++w[1 + d];
}

// With stride > 1 (level 0 only) just every stride-th block of kBlock elements is counted: a sample that
// reads 1/stride of the memory. Returns the number of elements counted per expert.
template <int IN>
int64_t magnitude_histogram_impl(const void* base, const std::vector<const void*>& xs, int64_t n, int level,
                                 const std::vector<uint32_t>& prefixes, int64_t* hist, int64_t* window,
                                 int64_t stride) {
  const size_t K = xs.size();
  int64_t counted = 0;
  for (int64_t s = 0; s < n; s += kBlock)
    if ((s / kBlock) % stride == 0) counted += std::min(kBlock, n - s);
  // small tensor, or a sample under kSampleTableMin: count straight into hist, no per-thread tables to clear
  if (counted < (stride > 1 ? kSampleTableMin : kParallelMin)) {
    for (size_t k = 0; k < K; ++k) {
      const uint32_t prefix = prefixes[k];
      if (prefix == kSkipPrefix) continue;
      int64_t* h = hist + k * kBins;
      for (int64_t s = 0; s < n; s += kBlock * stride) {
        for (int64_t i = s; i < std::min(s + kBlock, n); ++i) {
          const uint32_t key = magnitude_key(Io<IN>::load(xs[k], i) - Io<IN>::load(base, i));
          if (level == 0) {
            ++h[key >> 16];
          } else {
            if ((key >> 16) == prefix) ++h[key & 0xffffu];
            if (window != nullptr) window_count(key >> 16, prefix, window + k * kWindow);
          }
        }
      }
    }
    return counted;
  }
  // per-thread uint32 bins (two interleaved tables per expert at level 0): split the range so that no
  // bin can overflow
  const size_t tables = level == 0 ? 2 : 1;
  constexpr int64_t kPiece = int64_t{1} << 31;
  for (int64_t p0 = 0; p0 < n; p0 += kPiece) {
    const int64_t pn = std::min(kPiece, n - p0);
    const int64_t nblocks = (pn + kBlock - 1) / kBlock;
#pragma omp parallel if (pn >= kParallelMin)
    {
      std::vector<uint32_t> local(tables * K * kBins, 0u);
      std::vector<int64_t> local_window(K * kWindow, 0);
      std::vector<uint32_t> keys(K * kBlock);
      alignas(64) float b[kBlock];
#pragma omp for schedule(static)
      for (int64_t blk = 0; blk < nblocks; ++blk) {
        const int64_t s = p0 + blk * kBlock;
        if ((s / kBlock) % stride != 0) continue;
        const int64_t len = std::min(kBlock, p0 + pn - s);
        load_block<IN>(base, s, len, b);
        for (size_t k = 0; k < K; ++k) {
          const uint32_t prefix = prefixes[k];
          if (prefix == kSkipPrefix) continue;
          const void* x = xs[k];
          uint32_t* __restrict key = keys.data() + k * kBlock;
          for (int64_t j = 0; j < len; ++j) key[j] = magnitude_key(Io<IN>::load(x, s + j) - b[j]);
          if (level == 0) {
            // two interleaved copies break the store-to-load chains of runs that hit one bin
            uint32_t* h0 = local.data() + (2 * k) * kBins;
            uint32_t* h1 = h0 + kBins;
            int64_t j = 0;
            for (; j + 1 < len; j += 2) {
              ++h0[key[j] >> 16];
              ++h1[key[j + 1] >> 16];
            }
            if (j < len) ++h0[key[j] >> 16];
          } else {
            // compact the low halves of the keys in the prefix's bucket (branch-free), then count them
            uint32_t* h = local.data() + k * kBins;
            int64_t* w = window != nullptr ? local_window.data() + k * kWindow : nullptr;
            int64_t m = 0;
            int64_t j = 0;
#if defined(__AVX512F__)
            const __m512i want = _mm512_set1_epi32(static_cast<int>(prefix));
            const __m512i low = _mm512_set1_epi32(0xffff);
            const __m512i top = _mm512_set1_epi32(static_cast<int>(prefix) + kReach);
            // window counts in registers: the compress store may alias any memory, so w[] would be
            // reloaded and stored back on every iteration
            int64_t win[kWindow] = {0, 0, 0, 0, 0, 0};
            for (; j + 16 <= len; j += 16) {
              const __m512i v = _mm512_loadu_si512(key + j);
              const __m512i hi = _mm512_maskz_srli_epi32(kAllLanes, v, 16);
              const __mmask16 hit = _mm512_cmpeq_epi32_mask(hi, want);
              _mm512_mask_compressstoreu_epi32(key + m, hit, _mm512_and_si512(v, low));
              m += __builtin_popcount(hit);
              if (w != nullptr) {
                win[0] += __builtin_popcount(_mm512_cmpgt_epi32_mask(hi, top));
                for (int d = 0; d <= 2 * kReach; ++d)
                  win[1 + d] += __builtin_popcount(
                      _mm512_cmpeq_epi32_mask(hi, _mm512_set1_epi32(static_cast<int>(prefix) + kReach - d)));
              }
            }
            if (w != nullptr)
              for (int d = 0; d < kWindow; ++d) w[d] += win[d];
#endif
            for (; j < len; ++j) {
              const uint32_t v = key[j];
              if (w != nullptr) window_count(v >> 16, prefix, w);
              key[m] = v & 0xffffu;
              m += (v >> 16) == prefix;
            }
            count_lows(key, m, h);
          }
        }
      }
#pragma omp critical
      {
        for (size_t k = 0; k < K; ++k)
          for (int i = 0; i < kBins; ++i)
            hist[k * kBins + i] += level == 0 ? local[(2 * k) * kBins + i] + local[(2 * k + 1) * kBins + i]
                                              : local[k * kBins + i];
        if (window != nullptr)
          for (size_t i = 0; i < K * kWindow; ++i) window[i] += local_window[i];
      }
    }
  }
  return counted;
}

int64_t magnitude_histogram(uintptr_t base_ptr, const std::vector<uintptr_t>& x_ptrs, int in_dtype, int64_t n,
                            int level, const std::vector<uint32_t>& prefixes, uintptr_t hist_ptr, uintptr_t window_ptr,
                            int64_t stride) {
  if (prefixes.size() != x_ptrs.size()) throw std::invalid_argument("magnitude_histogram: one prefix per expert");
  if (level != 0 && level != 1) throw std::invalid_argument("magnitude_histogram: level must be 0 or 1");
  if (level == 0 && window_ptr != 0) throw std::invalid_argument("magnitude_histogram: window counts need level 1");
  if (stride < 1 || (stride > 1 && level != 0))
    throw std::invalid_argument("magnitude_histogram: a sampling stride >= 1, and > 1 only at level 0");
  const auto xs = as_ptrs(x_ptrs);
  py::gil_scoped_release release;
  int64_t counted = 0;
  dispatch_in(in_dtype, [&](auto in_c) {
    counted = magnitude_histogram_impl<decltype(in_c)::value>(
        reinterpret_cast<const void*>(base_ptr), xs, n, level, prefixes, reinterpret_cast<int64_t*>(hist_ptr),
        reinterpret_cast<int64_t*>(window_ptr), stride);
  });
  return counted;
}

// For each expert with need_k > 0: count elements whose key equals keys_k, and find the local index just
// after the need_k-th such element (-1 if this range holds fewer). Returns (counts, cutoffs).
template <int IN>
void magnitude_tie_cutoffs_impl(const void* base, const std::vector<const void*>& xs, int64_t n,
                                const std::vector<uint32_t>& keys, const std::vector<int64_t>& need,
                                std::vector<int64_t>& counts, std::vector<int64_t>& cutoffs) {
  const size_t K = xs.size();
  const int64_t nblocks = (n + kBlock - 1) / kBlock;
  std::vector<int32_t> per_block(static_cast<size_t>(nblocks) * K, 0);  // ties per block and expert
#pragma omp parallel if (n >= kParallelMin)
  {
    alignas(64) float b[kBlock];
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t s = blk * kBlock;
      const int64_t len = std::min(kBlock, n - s);
      load_block<IN>(base, s, len, b);
      for (size_t k = 0; k < K; ++k) {
        if (need[k] <= 0) continue;
        const uint32_t t = keys[k];
        int32_t c = 0;
        for (int64_t j = 0; j < len; ++j) c += magnitude_key(Io<IN>::load(xs[k], s + j) - b[j]) == t;
        per_block[blk * K + k] = c;
      }
    }
  }
  counts.assign(K, 0);
  cutoffs.assign(K, -1);
  for (size_t k = 0; k < K; ++k) {
    if (need[k] <= 0) continue;
    int64_t before = 0;
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t c = per_block[blk * K + k];
      if (cutoffs[k] < 0 && before + c >= need[k]) {  // the need-th tie is in this block
        int64_t seen = before;
        const int64_t s = blk * kBlock, e = std::min(n, s + kBlock);
        for (int64_t i = s; i < e; ++i) {
          seen += magnitude_key(Io<IN>::load(xs[k], i) - Io<IN>::load(base, i)) == keys[k];
          if (seen == need[k]) {
            cutoffs[k] = i + 1;
            break;
          }
        }
      }
      before += c;
    }
    counts[k] = before;
  }
}

std::tuple<std::vector<int64_t>, std::vector<int64_t>> magnitude_tie_cutoffs(
    uintptr_t base_ptr, const std::vector<uintptr_t>& x_ptrs, int in_dtype, int64_t n,
    const std::vector<uint32_t>& keys, const std::vector<int64_t>& need) {
  if (keys.size() != x_ptrs.size() || need.size() != x_ptrs.size())
    throw std::invalid_argument("magnitude_tie_cutoffs: one key and count per expert");
  const auto xs = as_ptrs(x_ptrs);
  std::vector<int64_t> counts, cutoffs;
  {
    py::gil_scoped_release release;
    dispatch_in(in_dtype, [&](auto in_c) {
      magnitude_tie_cutoffs_impl<decltype(in_c)::value>(reinterpret_cast<const void*>(base_ptr), xs, n, keys, need,
                                                        counts, cutoffs);
    });
  }
  return {counts, cutoffs};
}

// ---------------------------------------------------------------- DARE L1 sums
// sums[2k] += sum |tau_k|, sums[2k+1] += sum |tau_k * keep_k| (fp64), for mergekit's L1 rescale.
template <int IN>
void dare_l1_sums_impl(const void* base, const std::vector<const void*>& xs, int64_t n, int64_t element_offset,
                       const std::vector<uint64_t>& rng_keys, const std::vector<uint64_t>& keep_below,
                       double* sums) {
  const size_t K = xs.size();
  const int64_t nblocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel if (n >= kParallelMin)
  {
    std::vector<double> local(2 * K, 0.0);
    alignas(64) float b[kBlock];
    alignas(64) float keep[kBlock];
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t s = blk * kBlock;
      const int64_t len = std::min(kBlock, n - s);
      const int64_t g0 = element_offset + s;
      load_block<IN>(base, s, len, b);
      for (size_t k = 0; k < K; ++k) {
        dare_keep_block(rng_keys[k], keep_below[k], g0, len, keep);
        double all = 0.0, kept = 0.0;
        for (int64_t j = 0; j < len; ++j) {
          const double a = std::fabs(Io<IN>::load(xs[k], s + j) - b[j]);
          all += a;
          kept += a * keep[j];
        }
        local[2 * k] += all;
        local[2 * k + 1] += kept;
      }
    }
#pragma omp critical
    for (size_t i = 0; i < 2 * K; ++i) sums[i] += local[i];
  }
}

void dare_l1_sums(uintptr_t base_ptr, const std::vector<uintptr_t>& x_ptrs, int in_dtype, int64_t n,
                  int64_t element_offset, const std::vector<uint64_t>& rng_keys,
                  const std::vector<uint64_t>& keep_below, uintptr_t sums_ptr) {
  if (rng_keys.size() != x_ptrs.size() || keep_below.size() != x_ptrs.size())
    throw std::invalid_argument("dare_l1_sums: one rng key and keep threshold per expert");
  const auto xs = as_ptrs(x_ptrs);
  py::gil_scoped_release release;
  dispatch_in(in_dtype, [&](auto in_c) {
    dare_l1_sums_impl<decltype(in_c)::value>(reinterpret_cast<const void*>(base_ptr), xs, n, element_offset,
                                             rng_keys, keep_below, reinterpret_cast<double*>(sums_ptr));
  });
}

// The DARE stream value for n consecutive elements (tests compare it with the torch reference).
void dare_uniform(uint64_t key, int64_t element_offset, int64_t n, uintptr_t out_ptr) {
  auto* out = reinterpret_cast<int64_t*>(out_ptr);
  py::gil_scoped_release release;
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<int64_t>(dare_uniform32(key, element_offset + i));
}

}  // namespace

void register_merge_ops(py::module_& m) {
  m.def("weighted_sum", &weighted_sum, "out = sum_k w_k x_k (fused multiply-adds) [/ divisor]", py::arg("x_ptrs"), py::arg("in_dtype"),
        py::arg("weights"), py::arg("out_ptr"), py::arg("out_dtype"), py::arg("n"), py::arg("normalize"),
        py::arg("divisor"));
  m.def("gta_merge", &gta_merge, "generalised task arithmetic (task arithmetic / TIES / DARE), one pass",
        py::arg("base_ptr"), py::arg("x_ptrs"), py::arg("in_dtype"), py::arg("out_ptr"), py::arg("out_dtype"),
        py::arg("n"), py::arg("element_offset"), py::arg("weights"), py::arg("sparsify"), py::arg("consensus"),
        py::arg("normalize"), py::arg("lambda_"), py::arg("apply_lambda"), py::arg("plain_divisor"),
        py::arg("threshold_keys"), py::arg("tie_cutoffs"), py::arg("rng_keys"), py::arg("keep_below"),
        py::arg("rescale"), py::arg("keep_counts") = std::vector<int64_t>{});
  m.def("magnitude_histogram", &magnitude_histogram, "accumulate |tau| key histograms (level 0: hi16, 1: lo16 [+ prefix window counts])",
        py::arg("base_ptr"), py::arg("x_ptrs"), py::arg("in_dtype"), py::arg("n"), py::arg("level"),
        py::arg("prefixes"), py::arg("hist_ptr"), py::arg("window_ptr") = 0, py::arg("stride") = 1);
  m.def("magnitude_tie_cutoffs", &magnitude_tie_cutoffs, "count threshold ties and locate the need-th one",
        py::arg("base_ptr"), py::arg("x_ptrs"), py::arg("in_dtype"), py::arg("n"), py::arg("keys"), py::arg("need"));
  m.def("dare_l1_sums", &dare_l1_sums, "accumulate sum|tau| and sum|kept tau| per expert", py::arg("base_ptr"),
        py::arg("x_ptrs"), py::arg("in_dtype"), py::arg("n"), py::arg("element_offset"), py::arg("rng_keys"),
        py::arg("keep_below"), py::arg("sums_ptr"));
  m.def("dare_uniform", &dare_uniform, "DARE stream: uniform32 values for elements offset..offset+n",
        py::arg("key"), py::arg("element_offset"), py::arg("n"), py::arg("out_ptr"));
}

}  // namespace alignmerge

#if defined(ALIGNMERGE_WIDE_VECTORS)
#pragma GCC pop_options
#endif
