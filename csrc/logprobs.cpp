// Per-token log-probabilities on the CPU: forward and backward (the native twin of ops/logprobs.py).
//
// For row i with label y, x = logits[i] / T, lse = log Σ_v exp(x_v):
//   forward   logp = x_y − lse, and on request entropy H = lse − Σ_v p_v x_v, mean_v x_v,
//             is_top1 = [y is the first argmax], log Σ_v p_v², with p = exp(x − lse);
//   backward  dx_v = [g (1[v = y] − p_v) − g_H p_v (x_v − (lse − H))] / T, in the logits' dtype.
// The forward reads each row once, in CHUNK-sized pieces converted to fp32 in a stack buffer, keeping an online
// max and sums of exp (fp32 within a chunk, fp64 across chunks). The backward reads each row once more and writes
// the gradient (into the logits themselves when asked). Rows are split over threads with at::parallel_for; the
// inner loops are `omp simd` loops built for AVX-512, AVX2 and baseline x86-64 and picked at load time.
// The logits are [R, T, V] with any batch and row strides (unit vocab stride), or [N, V] (R = N, T = 1): row n is
// (n / T, n % T), read where it is, so logits[:, :-1] costs no copy. Labels and every [N] output are flat over the
// N = R·T rows; the gradient has the logits' shape (a new contiguous tensor, or the strided logits in place).
// Partial mode, for logits sharded over the vocabulary (dpo_kernels/parallel.py combines the shards): the forward
// writes a shard's per-row sums (partial_row) instead of finalized outputs, and the backward takes the combined lse
// and entropy, a global label and the shard's first column (vocab_start), and writes the shard's gradient.
//
// NaN policy (the same on every backend, README "Numerics"): an ignored row is not read and gives 0 everywhere and a
// zero gradient row. A NaN or +inf logit, a row of −inf only, or a label outside [0, V) gives NaN log-prob, lse,
// entropy, mean logit and log Σp², is_top1 0, and a NaN gradient row. −inf logits elsewhere have p = 0 and a zero
// gradient (the entropy term included); a −inf label logit gives a log-prob of −inf and a finite gradient. Every
// output is relative to the row's max, so any finite x = logits / T works.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace dpo_kernels {
namespace {

constexpr int64_t CHUNK = 2048;  // fp32 values per buffered piece of a row: 8 KiB, well inside L1
constexpr float SUM_SCALE = 1.0f / CHUNK;  // Σx of a piece is summed as Σ x/2048: no fp32 overflow at any finite x
constexpr float INF = std::numeric_limits<float>::infinity();
constexpr float NAN_F = std::numeric_limits<float>::quiet_NaN();

// One build runs everywhere: GCC compiles the row loops once per ISA level and an ifunc picks the best clone when
// the library loads (a global -march would tie the cached build to the CPU that built it).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DPO_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DPO_ISA_CLONES
#endif
#define DPO_INLINE inline __attribute__((always_inline))

// ---------------------------------------------------------------------------------------------------------------
// Element types: fp32, and fp16 / bf16 as raw bits converted with integer arithmetic (GCC 12 does not vectorise
// conversions of _Float16; these loops vectorise on every clone and round to nearest even, as torch's .to does).

struct half_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};
static_assert(sizeof(half_t) == 2 && sizeof(bf16_t) == 2, "16-bit element types");

DPO_INLINE float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
DPO_INLINE uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

DPO_INLINE float to_f32(float x) { return x; }
DPO_INLINE float to_f32(half_t x) { return c10::detail::fp16_ieee_to_fp32_value(x.bits); }
DPO_INLINE float to_f32(bf16_t x) { return bits_to_f32(static_cast<uint32_t>(x.bits) << 16); }

template <typename T>
DPO_INLINE T from_f32(float x);
template <>
DPO_INLINE float from_f32<float>(float x) {
  return x;
}
template <>
DPO_INLINE half_t from_f32<half_t>(float x) {
  return half_t{c10::detail::fp16_ieee_from_fp32_value(x)};
}
template <>
DPO_INLINE bf16_t from_f32<bf16_t>(float x) {
  uint32_t u = f32_to_bits(x);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return bf16_t{static_cast<uint16_t>(x != x ? 0x7FC0u : rounded)};  // NaN stays NaN
}

// exp(x) for x <= 88 with about 1 ulp of error, written so that loops over it vectorise: x = n·ln2 + r with
// |r| <= ln2/2, exp(r) by its degree-6 Taylor polynomial, 2^n built in the exponent bits. Below −87.3 (where
// exp(x) leaves the normal range) it returns exactly 0, so −inf logits give p = 0; NaN stays NaN. Callers pass
// x − max or x − lse, never far above 0; leaving out an upper clamp makes the loops about 1.4x faster.
DPO_INLINE float fast_exp(float x) {
  constexpr float LOG2E = 1.44269504088896341f;
  constexpr float LN2_HI = 0.693359375f;  // ln 2 = LN2_HI + LN2_LO, LN2_HI exact in a few bits
  constexpr float LN2_LO = -2.12194440e-4f;
  constexpr float ROUND = 12582912.0f + 127.0f;  // 1.5·2^23 (round to integer) plus the exponent bias
  const float xc = x < -87.3f ? -87.3f : x;  // a comparison, not fmaxf: it keeps NaN
  float t = xc * LOG2E + ROUND;  // the low mantissa bits of t hold n + 127
  float n = t - ROUND;
  float r = xc - n * LN2_HI - n * LN2_LO;
  float poly = 1.0f / 720.0f;
  poly = poly * r + 1.0f / 120.0f;
  poly = poly * r + 1.0f / 24.0f;
  poly = poly * r + 1.0f / 6.0f;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  float scale = bits_to_f32(f32_to_bits(t) << 23);
  return x < -87.3f ? 0.0f : poly * scale;
}

// ---------------------------------------------------------------------------------------------------------------
// Forward

// Row n of the logits is (n / T, n % T) of an [R, T, V] tensor with any batch and row strides (T = 1 for [N, V]).
struct RowLayout {
  int64_t stride_b, stride_t, T;
  DPO_INLINE int64_t offset(int64_t row) const { return (row / T) * stride_b + (row % T) * stride_t; }
};

struct FwdArgs {
  const void* logits;    // [R, T, V] or [N, V], unit stride on V
  const int64_t* labels;  // [N], N = R·T
  float* logps;           // [N]
  float* lse;             // [N]
  float* stats;           // [4, N] (entropy, mean_logit, is_top1, log_sum_sq_probs) or nullptr
  float* partials;        // partial mode: [partial_rows, N] (see partial_row); logps, lse and stats unused
  int64_t partial_rows;   // 0 (finalized outputs), 3, or 7 with stats
  RowLayout logits_rows;
  int64_t N, V, ignore_index;
  float inv_temperature;
  int64_t vocab_start;    // partial mode: the global column of this shard's column 0
  double mean_scale;      // Σx (in units of x/CHUNK) → mean: CHUNK / V (partial mode: over the whole vocabulary)
};

// The sums of one row relative to its running max m (x = logits / T): l = Σ e, s_xm = Σ e·(x − m), s_ee = Σ e²,
// with e = exp(x − m); s_x = Σ x/CHUNK; the first argmax; and the max of x over the columns before `before_col`.
struct RowSums {
  float m = -INF;
  int64_t argmax = -1;
  double l = 0.0, s_xm = 0.0, s_ee = 0.0, s_x = 0.0;
  float before = -INF;
};

// One row: online max and sums over CHUNK-sized pieces; `buf` holds the current piece as fp32 x = logits / T.
// kBefore (the partial mode): also the max of x over the columns before `before_col`, in the max's own simd loop
// (a loop of its own after it changed how GCC vectorised the sums below, and so their rounding, with the label).
template <typename T, bool kBefore>
DPO_INLINE RowSums row_sums(const T* x_row, int64_t V, float inv_t, bool want_stats, int64_t before_col,
                            float* buf) {
  RowSums r;
  for (int64_t start = 0; start < V; start += CHUNK) {
    const int64_t n = std::min(CHUNK, V - start);
    const T* src = x_row + start;
    const int64_t before_n = before_col - start;  // the piece's columns before before_col: [0, before_n)
    float c_max = -INF, c_x = 0.f, c_before = -INF;
#pragma omp simd reduction(max : c_max, c_before) reduction(+ : c_x)
    for (int64_t i = 0; i < n; ++i) {
      float x = to_f32(src[i]) * inv_t;
      buf[i] = x;
      c_max = std::max(c_max, x);
      c_x += x * SUM_SCALE;
      if constexpr (kBefore) c_before = std::max(c_before, i < before_n ? x : -INF);
    }
    // Σx also detects NaN, which the max may drop: a NaN anywhere makes it NaN (checked after the loop).
    r.s_x += c_x;
    if constexpr (kBefore) r.before = std::max(r.before, c_before);
    if (c_max == -INF) continue;  // a piece of −inf logits adds nothing (and exp(−inf − (−inf)) would be NaN)
    float& m = r.m;
    if (c_max > m) {
      if (m > -INF) {  // move the sums to the new max
        const double d = static_cast<double>(m) - c_max;
        const double scale = std::exp(d);
        r.s_xm = scale * (r.s_xm + d * r.l);
        r.l *= scale;
        r.s_ee *= scale * scale;
      }
      m = c_max;
      // TRL's tie rule: the first index of the maximum; a later piece must exceed it strictly to take over.
      int64_t i = 0;
      while (i < n && buf[i] != c_max) ++i;
      r.argmax = start + i;
    }
    float c_l = 0.f;
    if (want_stats) {
      float c_xm = 0.f, c_ee = 0.f;
#pragma omp simd reduction(+ : c_l, c_xm, c_ee)
      for (int64_t i = 0; i < n; ++i) {
        const float d = buf[i] - m;
        const float e = fast_exp(d);
        c_l += e;
        c_xm += e > 0.f ? e * d : 0.f;  // 0 · (−inf) must count as 0
        c_ee += e * e;
      }
      r.s_xm += c_xm;
      r.s_ee += c_ee;
    } else {
#pragma omp simd reduction(+ : c_l)
      for (int64_t i = 0; i < n; ++i) c_l += fast_exp(buf[i] - m);
    }
    r.l += c_l;
  }
  return r;
}

template <typename T>
DPO_INLINE void fwd_row(const FwdArgs& a, int64_t row, float* buf) {
  const int64_t V = a.V;
  const int64_t label = a.labels[row];
  const bool want_stats = a.stats != nullptr;
  auto write = [&](float logp, float lse, float entropy, float mean_logit, float is_top1, float log_sum_sq) {
    a.logps[row] = logp;
    a.lse[row] = lse;
    if (want_stats) {
      a.stats[row] = entropy;
      a.stats[a.N + row] = mean_logit;
      a.stats[2 * a.N + row] = is_top1;
      a.stats[3 * a.N + row] = log_sum_sq;
    }
  };
  if (label == a.ignore_index) {  // ignored rows are not read
    write(0.f, 0.f, 0.f, 0.f, 0.f, 0.f);
    return;
  }
  const T* x_row = static_cast<const T*>(a.logits) + a.logits_rows.offset(row);  // int64: N·V passes 2^31
  const float inv_t = a.inv_temperature;
  const RowSums r = row_sums<T, false>(x_row, V, inv_t, want_stats, 0, buf);
  const double l = r.l;

  // A NaN or +inf logit makes l NaN (and Σx NaN: the max may drop a NaN), a row of −inf only leaves l = 0.
  const bool in_range = label >= 0 && label < V;
  if (!(l > 0.0) || std::isnan(r.s_x) || !in_range) {
    write(NAN_F, NAN_F, NAN_F, NAN_F, 0.f, NAN_F);  // lse NaN too: the backward writes a NaN row
    return;
  }
  const double log_l = std::log(l);
  // x_y − m first (exact in double): lse = m + log l alone would lose log l next to a huge m
  const double x_label = static_cast<double>(to_f32(x_row[label]) * inv_t);
  write(static_cast<float>((x_label - r.m) - log_l), static_cast<float>(r.m + log_l),
        static_cast<float>(log_l - r.s_xm / l), static_cast<float>(r.s_x * a.mean_scale),
        r.argmax == label ? 1.f : 0.f, static_cast<float>(std::log(r.s_ee) - 2.0 * log_l));
}

// Partial mode: one vocabulary shard's sums of a row, for a combine across shards (dpo_kernels/parallel.py):
// m, l, the label's x where the shard holds it (else 0); with stats s_xm, s_ee, the shard's part of the mean
// (Σx over the whole vocabulary's size) and the max of x before the label's column (−inf if none). The label is
// global; a NaN or +inf logit shows as a NaN l (the combine applies the NaN policy).
template <typename T>
DPO_INLINE void partial_row(const FwdArgs& a, int64_t row, float* buf) {
  const int64_t label = a.labels[row];
  const int64_t rows = a.partial_rows;
  const bool want_stats = rows == 7;
  float* out = a.partials;
  if (label == a.ignore_index) {  // ignored rows are not read
    for (int64_t k = 0; k < rows; ++k) out[k * a.N + row] = 0.f;
    return;
  }
  const T* x_row = static_cast<const T*>(a.logits) + a.logits_rows.offset(row);
  const int64_t y = label - a.vocab_start;  // the shard's column of the label
  const bool owned = y >= 0 && y < a.V;
  // before_col: the label's column, clamped to [0, V] (a label past the shard: all of it is before)
  const int64_t before_col = std::clamp<int64_t>(y, 0, a.V);
  // The stats loop with or without stats: its Σe rounds differently from the plain loop's, and a call without stats
  // (a reference model's) must give the very Σe of one with (the policy's), so that equal models give equal log-probs.
  const RowSums r = row_sums<T, true>(x_row, a.V, a.inv_temperature, true, before_col, buf);
  const float l = std::isnan(r.s_x) ? NAN_F : static_cast<float>(r.l);  // the max may drop a NaN, Σx does not
  out[row] = r.m;
  out[a.N + row] = l;
  out[2 * a.N + row] = owned ? to_f32(x_row[y]) * a.inv_temperature : 0.f;
  if (want_stats) {
    out[3 * a.N + row] = static_cast<float>(r.s_xm);
    out[4 * a.N + row] = static_cast<float>(r.s_ee);
    out[5 * a.N + row] = static_cast<float>(r.s_x * a.mean_scale);
    out[6 * a.N + row] = r.before;
  }
}

template <typename T>
DPO_INLINE void fwd_rows(const FwdArgs& a, int64_t begin, int64_t end) {
  alignas(64) float buf[CHUNK];
  if (a.partial_rows > 0) {
    for (int64_t row = begin; row < end; ++row) partial_row<T>(a, row, buf);
  } else {
    for (int64_t row = begin; row < end; ++row) fwd_row<T>(a, row, buf);
  }
}

DPO_ISA_CLONES void fwd_rows_f32(const FwdArgs& a, int64_t begin, int64_t end) { fwd_rows<float>(a, begin, end); }
DPO_ISA_CLONES void fwd_rows_f16(const FwdArgs& a, int64_t begin, int64_t end) { fwd_rows<half_t>(a, begin, end); }
DPO_ISA_CLONES void fwd_rows_bf16(const FwdArgs& a, int64_t begin, int64_t end) { fwd_rows<bf16_t>(a, begin, end); }

// ---------------------------------------------------------------------------------------------------------------
// Backward

struct BwdArgs {
  const void* logits;        // [R, T, V] or [N, V], unit stride on V
  void* dlogits;             // the logits' shape, unit stride on V; may be the logits themselves (in place)
  const int64_t* labels;     // [N]
  const float* lse;          // [N]
  const float* grad_logps;   // [N] or nullptr
  const float* grad_entropy;  // [N] or nullptr (then entropy is not read)
  const float* entropy;      // [N] or nullptr
  RowLayout logits_rows, dlogits_rows;
  int64_t N, V, ignore_index;
  float inv_temperature;
  bool sharded;         // the logits are a vocabulary shard; lse and entropy the whole rows', labels global
  int64_t vocab_start;  // sharded: the global column of this shard's column 0
};

// exp(x − lse) for the backward: x − lse is ≤ 0 but for the rounding of the fp32 lse (half an ulp), so it is clamped
// at 0 (NaN kept): p ≤ 1 and the gradient stays finite at any magnitude.
DPO_INLINE float prob(float x, float lse) {
  const float d = x - lse;
  return fast_exp(d > 0.f ? 0.f : d);
}

// One row, one pass: p = exp(x − lse) recomputed, the gradient written in T. The label's own entry is computed
// again afterwards, with 1 − p formed in fp32 before its one rounding; its logit is read before the pass because
// in place the pass overwrites it. Every element is read before it is written, so src == dst is safe.
template <typename T>
DPO_INLINE void bwd_row(const BwdArgs& a, int64_t row) {
  const int64_t V = a.V;
  const int64_t label = a.labels[row];
  const T* src = static_cast<const T*>(a.logits) + a.logits_rows.offset(row);
  T* dst = static_cast<T*>(a.dlogits) + a.dlogits_rows.offset(row);
  // Sharded, the label is global: its one-hot lands only in the shard that holds it, and a bad label's NaN row
  // comes from the combined lse (NaN there).
  const int64_t y = a.sharded ? label - a.vocab_start : label;
  const bool owned = y >= 0 && y < V;
  if (label == a.ignore_index || !(owned || a.sharded)) {  // ignored: zeros; bad label: NaN, as forward
    const T fill = from_f32<T>(label == a.ignore_index ? 0.f : NAN_F);
#pragma omp simd
    for (int64_t i = 0; i < V; ++i) dst[i] = fill;
    return;
  }
  const float inv_t = a.inv_temperature;
  const float lse = a.lse[row];
  const float g = a.grad_logps != nullptr ? a.grad_logps[row] : 0.f;
  const float x_label = owned ? to_f32(src[y]) * inv_t : 0.f;
  const float p_label = owned ? prob(x_label, lse) : 0.f;
  float d_label = g * (1.f - p_label);
  if (a.grad_entropy != nullptr && a.grad_entropy[row] != 0.f) {
    const float g_h = a.grad_entropy[row];
    const float mean_x = lse - a.entropy[row];  // Σ p x = lse − H
#pragma omp simd
    for (int64_t i = 0; i < V; ++i) {
      const float x = to_f32(src[i]) * inv_t;
      const float p = prob(x, lse);
      const float centred = p > 0.f ? x - mean_x : 0.f;  // 0 · (−inf) must give 0
      dst[i] = from_f32<T>(-(g + g_h * centred) * p * inv_t);
    }
    if (!(p_label == 0.f)) d_label -= g_h * p_label * (x_label - mean_x);  // at a −inf label: 0, not 0 · (−inf)
  } else {
    const float g_t = g * inv_t;
#pragma omp simd
    for (int64_t i = 0; i < V; ++i) dst[i] = from_f32<T>(-g_t * prob(to_f32(src[i]) * inv_t, lse));
  }
  if (owned) dst[y] = from_f32<T>(d_label * inv_t);
}

template <typename T>
DPO_INLINE void bwd_rows(const BwdArgs& a, int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) bwd_row<T>(a, row);
}

DPO_ISA_CLONES void bwd_rows_f32(const BwdArgs& a, int64_t begin, int64_t end) { bwd_rows<float>(a, begin, end); }
DPO_ISA_CLONES void bwd_rows_f16(const BwdArgs& a, int64_t begin, int64_t end) { bwd_rows<half_t>(a, begin, end); }
DPO_ISA_CLONES void bwd_rows_bf16(const BwdArgs& a, int64_t begin, int64_t end) { bwd_rows<bf16_t>(a, begin, end); }

// ---------------------------------------------------------------------------------------------------------------
// Launchers: checks of the launcher contract (the public API validates user input before this), outputs, threads.

// The rows of [R, T, V] logits (any batch and row strides) or of [N, V] logits (R = N, T = 1).
RowLayout row_layout(const at::Tensor& t) {
  if (t.dim() == 2) return RowLayout{t.stride(0), 0, 1};
  return RowLayout{t.stride(0), t.stride(1), std::max<int64_t>(t.size(1), 1)};
}

int64_t num_rows(const at::Tensor& logits) {
  return logits.dim() == 2 ? logits.size(0) : logits.size(0) * logits.size(1);
}

void check_logits_labels(const at::Tensor& logits, const at::Tensor& labels, double temperature) {
  TORCH_CHECK(logits.device().is_cpu() && labels.device().is_cpu(), "dpo_kernels CPU ops need CPU tensors");
  TORCH_CHECK(logits.dim() == 2 || logits.dim() == 3, "logits must be [R, T, V] or [N, V], got ", logits.sizes());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "logits must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(logits.size(-1) >= 1, "logits must have V >= 1");
  TORCH_CHECK(logits.stride(-1) == 1 || logits.size(-1) == 1, "logits need unit stride on the vocabulary");
  const int64_t N = num_rows(logits);
  const bool flat = labels.dim() == 1 && labels.size(0) == N;
  const bool shaped = logits.dim() == 3 && labels.dim() == 2 && labels.size(0) == logits.size(0) &&
                      labels.size(1) == logits.size(1);
  TORCH_CHECK(flat || shaped, "labels must be [N] with N = ", N, " (or [R, T] for [R, T, V] logits), got ",
              labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), "temperature must be finite and > 0");
}

// Optional [N] fp32 inputs of the backward, made contiguous (tiny next to the logits).
std::optional<at::Tensor> row_vector(const std::optional<at::Tensor>& t, int64_t N, const char* name) {
  if (!t.has_value()) return std::nullopt;
  TORCH_CHECK(t->device().is_cpu() && t->numel() == N && t->dim() == 1, name, " must be a CPU tensor [", N,
              "], got ", t->sizes());
  return t->to(at::kFloat).contiguous();
}

// A fresh [N, V] gradient is first touched by the backward itself; with 4 KiB pages that costs one page fault per
// 4 KiB, which on a VM took longer than the arithmetic (330 ms vs 70 ms for 1024 x 32000 fp32). Asking for
// transparent huge pages on the untouched buffer (Linux, THP in "madvise" mode) removes almost all of them. Only
// advice: memory that is already mapped, or a kernel without THP, is left as it is.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t HUGE = uintptr_t{2} << 20;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t first = (begin + HUGE - 1) & ~(HUGE - 1);
  const uintptr_t last = end & ~(HUGE - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// True when two elements of `t` share memory: with the dimensions sorted by stride, each stride must step over
// everything the smaller strides span (dimensions of size 1 aside).
bool overlapping(const at::Tensor& t) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size)
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  std::sort(dims.begin(), dims.end());
  int64_t span = 0;
  for (const auto& [stride, size] : dims) {
    if (stride <= span) return true;
    span += stride * (size - 1);
  }
  return false;
}

template <typename Args>
void run_rows(const at::Tensor& logits, const Args& args, void (*f32)(const Args&, int64_t, int64_t),
              void (*f16)(const Args&, int64_t, int64_t), void (*bf16)(const Args&, int64_t, int64_t)) {
  const auto dtype = logits.scalar_type();
  auto rows = dtype == at::kFloat ? f32 : dtype == at::kHalf ? f16 : bf16;
  // at least ~32K elements per task so that small problems do not pay for waking threads
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, args.V));
  at::parallel_for(0, args.N, grain, [&](int64_t begin, int64_t end) { rows(args, begin, end); });
}

void bwd_into(const at::Tensor& logits, const at::Tensor& dlogits, const at::Tensor& labels, const at::Tensor& lse,
              const std::optional<at::Tensor>& grad_logps, const std::optional<at::Tensor>& grad_entropy,
              const std::optional<at::Tensor>& entropy, int64_t ignore_index, double temperature,
              std::optional<int64_t> vocab_start) {
  check_logits_labels(logits, labels, temperature);
  const int64_t N = num_rows(logits);
  TORCH_CHECK(!grad_entropy.has_value() || entropy.has_value(), "grad_entropy needs the forward's entropy");
  auto lse_c = row_vector(lse, N, "lse").value();
  auto g = row_vector(grad_logps, N, "grad_logps");
  auto g_h = row_vector(grad_entropy, N, "grad_entropy");
  auto h = g_h.has_value() ? row_vector(entropy, N, "entropy") : std::nullopt;
  auto labels_c = labels.reshape({-1}).contiguous();
  if (N == 0) return;
  BwdArgs args{logits.data_ptr(),
               dlogits.data_ptr(),
               labels_c.const_data_ptr<int64_t>(),
               lse_c.const_data_ptr<float>(),
               g.has_value() ? g->const_data_ptr<float>() : nullptr,
               g_h.has_value() ? g_h->const_data_ptr<float>() : nullptr,
               h.has_value() ? h->const_data_ptr<float>() : nullptr,
               row_layout(logits),
               row_layout(dlogits),
               N,
               logits.size(-1),
               ignore_index,
               static_cast<float>(1.0 / temperature),
               vocab_start.has_value(),
               vocab_start.value_or(0)};
  run_rows<BwdArgs>(logits, args, bwd_rows_f32, bwd_rows_f16, bwd_rows_bf16);
}

}  // namespace

namespace {
// Fills the launch arguments of both forward modes (outputs set by the caller).
FwdArgs fwd_args(const at::Tensor& logits, const at::Tensor& labels_c, int64_t ignore_index, double temperature) {
  FwdArgs args{};
  args.logits = logits.const_data_ptr();
  args.labels = labels_c.const_data_ptr<int64_t>();
  args.logits_rows = row_layout(logits);
  args.N = num_rows(logits);
  args.V = logits.size(-1);
  args.ignore_index = ignore_index;
  args.inv_temperature = static_cast<float>(1.0 / temperature);
  args.mean_scale = static_cast<double>(CHUNK) / args.V;
  return args;
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                                 int64_t ignore_index, double temperature,
                                                                 bool return_stats) {
  check_logits_labels(logits, labels, temperature);
  const int64_t N = num_rows(logits);
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor logps = at::empty({N}, f32);
  at::Tensor lse = at::empty({N}, f32);
  at::Tensor stats = at::empty({return_stats ? 4 : 0, N}, f32);
  auto labels_c = labels.reshape({-1}).contiguous();
  if (N == 0) return {logps, lse, stats};
  FwdArgs args = fwd_args(logits, labels_c, ignore_index, temperature);
  args.logps = logps.data_ptr<float>();
  args.lse = lse.data_ptr<float>();
  args.stats = return_stats ? stats.data_ptr<float>() : nullptr;
  run_rows<FwdArgs>(logits, args, fwd_rows_f32, fwd_rows_f16, fwd_rows_bf16);
  return {logps, lse, stats};
}

at::Tensor logprobs_partial_fwd_cpu(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index,
                                    double temperature, bool return_stats, int64_t vocab_start, int64_t vocab_size) {
  check_logits_labels(logits, labels, temperature);
  TORCH_CHECK(vocab_start >= 0 && vocab_start + logits.size(-1) <= vocab_size, "the shard [", vocab_start, ", ",
              vocab_start + logits.size(-1), ") must lie in the vocabulary [0, ", vocab_size, ")");
  const int64_t N = num_rows(logits);
  const int64_t rows = return_stats ? 7 : 3;
  at::Tensor partials = at::empty({rows, N}, logits.options().dtype(at::kFloat));
  auto labels_c = labels.reshape({-1}).contiguous();
  if (N == 0) return partials;
  FwdArgs args = fwd_args(logits, labels_c, ignore_index, temperature);
  args.partials = partials.data_ptr<float>();
  args.partial_rows = rows;
  args.vocab_start = vocab_start;
  args.mean_scale = static_cast<double>(CHUNK) / vocab_size;
  run_rows<FwdArgs>(logits, args, fwd_rows_f32, fwd_rows_f16, fwd_rows_bf16);
  return partials;
}

at::Tensor logprobs_bwd_cpu(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                            const std::optional<at::Tensor>& grad_logps,
                            const std::optional<at::Tensor>& grad_entropy, const std::optional<at::Tensor>& entropy,
                            int64_t ignore_index, double temperature, std::optional<int64_t> vocab_start) {
  at::Tensor dlogits = at::empty(logits.sizes(), logits.options());  // contiguous, logits' dtype
  advise_huge_pages(dlogits);
  bwd_into(logits, dlogits, labels, lse, grad_logps, grad_entropy, entropy, ignore_index, temperature, vocab_start);
  return dlogits;
}

void logprobs_bwd_inplace_cpu(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                              const std::optional<at::Tensor>& grad_logps,
                              const std::optional<at::Tensor>& grad_entropy,
                              const std::optional<at::Tensor>& entropy, int64_t ignore_index, double temperature,
                              std::optional<int64_t> vocab_start) {
  // rows written in parallel must not share memory (an expanded tensor would)
  TORCH_CHECK(!overlapping(logits), "in-place backward needs logits whose elements do not share memory");
  bwd_into(logits, logits, labels, lse, grad_logps, grad_entropy, entropy, ignore_index, temperature, vocab_start);
}

}  // namespace dpo_kernels
