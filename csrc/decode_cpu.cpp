// One decode step of the fused TapeTransformer on the CPU (see decode_cpu.h).
//
// Cost model at the notebook size (D = 256, 12 blocks, B = 1): the four linears of a block stream
// 1.3 M weights, 15.7 M per token (63 MB fp32, 16 MB int8), against ~0.8 M attention multiply-adds
// at a full 128-token window and ~25 k activations; so the step is a weight stream, and the rest
// must stay off its critical path: no per-op dispatch, no allocation per op, vectorised elementwise
// math, and few barriers (five per layer).
//
// ISA: the int8 products are int8_cpu.cpp's kernels, which pick AVX-512 VNNI / AVX2 / portable at
// run time (tk::cpu_isa()). The fp32 GEMV and the elementwise code follow the same selection: the
// elementwise loops are written once as always-inline generic C++ and compiled three times, under
// target("avx512…"), target("avx2,fma") and the default ISA, so the compiler vectorises each for
// its width; the GEMV has explicit AVX-512 / AVX2 bodies.
#include "decode_cpu.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <utility>
#include <limits>
#include <vector>

#include "int8_cpu.h"

#if (defined(__x86_64__) || defined(__i386__)) && !defined(TK_NO_X86_SIMD)
#define TK_X86 1
#include <immintrin.h>
#define TK_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#define TK_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define TK_X86 0
#define TK_TARGET_AVX512
#define TK_TARGET_AVX2
#endif

#define TK_INLINE inline __attribute__((always_inline))

namespace tk::decode {
namespace {

// ---------------------------------------------------------------------------------------------
// ISA clones: NAME##_impl (always inline, generic) compiled for AVX-512, AVX2 and the default ISA
// ---------------------------------------------------------------------------------------------

#define TK_CLONES(NAME, PARAMS, ARGS)                                \
  TK_TARGET_AVX512 void NAME##_avx512 PARAMS { NAME##_impl ARGS; }   \
  TK_TARGET_AVX2 void NAME##_avx2 PARAMS { NAME##_impl ARGS; }       \
  void NAME##_base PARAMS { NAME##_impl ARGS; }

#define TK_CALL(ISA, NAME, ...)                                      \
  do {                                                               \
    if (TK_X86 && (ISA) == CpuIsa::kAvx512Vnni) {                    \
      NAME##_avx512(__VA_ARGS__);                                    \
    } else if (TK_X86 && (ISA) == CpuIsa::kAvx2) {                   \
      NAME##_avx2(__VA_ARGS__);                                      \
    } else {                                                         \
      NAME##_base(__VA_ARGS__);                                      \
    }                                                                \
  } while (0)

template <class To, class From>
TK_INLINE To bits(From v) {
  return __builtin_bit_cast(To, v);
}

// exp for fp32 (Cephes expf: 2^n · p(r), |r| ≤ ln2/2, ~1 ulp), plain arithmetic so that it
// vectorises. Arguments are clamped to [-87.3, 88]: below, the true result is subnormal or 0 and
// ~1e-38 is returned; no caller here passes more than 0 except the sigmoid's exp(-x), where a
// 1.6e38 instead of +inf still gives 1/(1+e) ≈ 0. NaN stays NaN (a comparison with NaN is false,
// so the clamps keep it).
TK_INLINE float exp_f(float x) {
  x = x < -87.3365447f ? -87.3365447f : x;  // value selects (no references): they vectorise
  x = x > 88.0f ? 88.0f : x;
  constexpr float kMagic = 12582912.0f;  // 1.5·2^23: (v + M) − M rounds v to an integer, ties to even
  const float fx = (x * 1.44269504088896341f + kMagic) - kMagic;
  float r = x - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  const float z = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  const int32_t n = static_cast<int32_t>(fx);
  return y * bits<float>((n + 127) << 23);
}

TK_INLINE float atanh_series(float w) {  // odd Taylor series through w^11: exact to fp32 for |w| < 0.103
  const float w2 = w * w;
  float p = 1.0f / 11.0f;
  p = p * w2 + 1.0f / 9.0f;
  p = p * w2 + 1.0f / 7.0f;
  p = p * w2 + 1.0f / 5.0f;
  p = p * w2 + 1.0f / 3.0f;
  p = p * w2 + 1.0f;
  return w * p;
}

// The activation, y = 2·atanh(p/2), p = l/sqrt(1+24l²), l = sign(s)·log1p(|s|), s = 2·tanh(x/2), in
// the form of tape_kernels/activation.py's fused kernel: y is odd, so work on a = |x|; with
// d = 1 − e^(−a) = −expm1(−a), |s| = 2d/(2−d) and l = log1p(|s|) = 2·atanh(d/2), d/2 in [0, 0.5).
// Here −expm1(−a) comes from exp's own range reduction (2^n·expm1(r) + 2^n − 1: no 1 − e
// cancellation near 0, where y ≈ x), and atanh(d/2) from its odd series through w^23 (truncation
// < 1.2e-9 at w = 0.5): no log, no division, no branch — 1.7x faster than a log for w >= 0.25.
// p/2 < 1/(2·sqrt(24)) ≈ 0.102, where the short series is exact to fp32.
// The intermediates the activation's value and derivative share (x's sign not applied to y):
// e = e^(−a), w = d/2, rs = 1/sqrt(1 + 24·l²), q = p/2.
struct ActCore {
  float y, e, w, rs, q;
};

TK_INLINE ActCore act_core(float x) {
  const float a = std::fabs(x);
  float v = -a;
  v = v < -87.3365447f ? -87.3365447f : v;  // e^v stays normal; d = 1 to fp32 long before
  constexpr float kMagic = 12582912.0f;
  const float fx = (v * 1.44269504088896341f + kMagic) - kMagic;
  float r = v - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float em1 = p * (r * r) + r;  // expm1(r), |r| <= ln2/2
  const float two_n = bits<float>((static_cast<int32_t>(fx) + 127) << 23);
  const float w = -0.5f * (two_n * em1 + (two_n - 1.0f));  // d/2 = −expm1(−a)/2
  const float w2 = w * w;
  float t = 1.0f / 23.0f;
  t = t * w2 + 1.0f / 21.0f;
  t = t * w2 + 1.0f / 19.0f;
  t = t * w2 + 1.0f / 17.0f;
  t = t * w2 + 1.0f / 15.0f;
  t = t * w2 + 1.0f / 13.0f;
  t = t * w2 + 1.0f / 11.0f;
  t = t * w2 + 1.0f / 9.0f;
  t = t * w2 + 1.0f / 7.0f;
  t = t * w2 + 1.0f / 5.0f;
  t = t * w2 + 1.0f / 3.0f;
  t = t * w2 + 1.0f;
  const float l = 2.0f * (w * t);
  const float rs = 1.0f / std::sqrt(1.0f + 24.0f * l * l);
  const float q = 0.5f * l * rs;
  return {2.0f * atanh_series(q), two_n * (em1 + 1.0f), w, rs, q};  // e = 2^n·e^r: no 1 − d cancellation
}

TK_INLINE float act_one(float x) {
  const float y = act_core(x).y;
  return x != x ? x : (x < 0.f ? -y : y);  // NaN in, NaN out (the polynomial pieces would not keep it)
}

// dy/dx = ds/dx · dl/ds · dp/dl · dy/dp = 4e^(−a)/(4 − d²) · rs³ · 1/(1 − q²) (y is odd: dy/dx is even),
// the form of activation.py's act_fwd_bwd.
TK_INLINE float act_grad(float x) {
  const ActCore c = act_core(x);
  const float g = (c.e / (1.0f - c.w * c.w)) * (c.rs * c.rs * c.rs) / (1.0f - c.q * c.q);
  return x != x ? x : g;
}

TK_INLINE float sigmoid_f(float x) { return 1.0f / (1.0f + exp_f(-x)); }

// ---------------------------------------------------------------------------------------------
// Elementwise and small reductions (generic bodies, cloned per ISA)
// ---------------------------------------------------------------------------------------------

TK_INLINE void activation_impl(float* x, const float* bias, int64_t n) {
  if (bias != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) x[i] = act_one(x[i] + bias[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) x[i] = act_one(x[i]);
  }
}
TK_CLONES(activation, (float* x, const float* bias, int64_t n), (x, bias, n))

// y = LayerNorm(a + r) (r may be null), two-pass mean/variance in fp32, biased variance.
TK_INLINE void add_layer_norm_impl(const float* a, const float* r, const float* w, const float* b, float eps,
                                   int64_t d, float* z, float* y) {
  float s = 0.f;
  if (r != nullptr) {
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < d; ++i) {
      z[i] = a[i] + r[i];
      s += z[i];
    }
  } else {
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < d; ++i) {
      z[i] = a[i];
      s += z[i];
    }
  }
  const float mean = s / static_cast<float>(d);
  float v = 0.f;
#pragma omp simd reduction(+ : v)
  for (int64_t i = 0; i < d; ++i) {
    const float c = z[i] - mean;
    v += c * c;
  }
  const float rstd = 1.0f / std::sqrt(v / static_cast<float>(d) + eps);
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) y[i] = (z[i] - mean) * rstd * w[i] + b[i];
}
TK_CLONES(add_layer_norm,
          (const float* a, const float* r, const float* w, const float* b, float eps, int64_t d, float* z, float* y),
          (a, r, w, b, eps, d, z, y))

// TapeHead combine, as tape_kernels.combine.tapehead_combine_ref writes it.
TK_INLINE void combine_impl(const float* hl, const float* hr, int mode, int64_t d, float* h) {
  if (mode == 0) {
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) {
      const float a = sigmoid_f(hl[i]), b = sigmoid_f(hr[i]);
      h[i] = (a + b) / 2.0f - a * b;
    }
  } else if (mode == 1) {
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) {
      const float m = hl[i] < hr[i] ? hr[i] : hl[i];
      const float el = exp_f(hl[i] - m), er = exp_f(hr[i] - m);
      const float s = el + er;
      h[i] = hl[i] * (el / s) + hr[i] * (er / s);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) h[i] = hl[i] + hr[i];
  }
}
TK_CLONES(combine, (const float* hl, const float* hr, int mode, int64_t d, float* h), (hl, hr, mode, d, h))

// The Char-RNN cell, as tape_kernels.charrnn.charrnn_ref computes it: from the left / right
// pre-activations z = (x·W_iᵀ + b_i) + (h·W_hᵀ + b_h), a = act(act(z_L)), b = act(act(z_R))
// (CharRNNModel applies the activation after the cell's own), h = ½((a + b) − (2a)·b). The only
// Char-RNN cell in C++ (decode step, prefill and the training recurrence alike).
TK_INLINE float cell_h(float zl, float zr) {
  const float a = act_one(act_one(zl)), b = act_one(act_one(zr));
  return 0.5f * ((a + b) - (2.0f * a) * b);
}

// One layer on n units; z arrives as its two halves, pl + ql and pr + qr.
TK_INLINE void charrnn_cell_impl(const float* pl, const float* pr, const float* ql, const float* qr, int64_t n,
                                 float* h) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) h[i] = cell_h(pl[i] + ql[i], pr[i] + qr[i]);
}
TK_CLONES(charrnn_cell, (const float* pl, const float* pr, const float* ql, const float* qr, int64_t n, float* h),
          (pl, pr, ql, qr, n, h))

// The training forward's cell: as charrnn_cell, and z kept (zl, zr) for the backward.
TK_INLINE void charrnn_cell_keep_impl(const float* pl, const float* pr, const float* ql, const float* qr, int64_t n,
                                      float* zl, float* zr, float* h) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    zl[i] = pl[i] + ql[i];
    zr[i] = pr[i] + qr[i];
    h[i] = cell_h(zl[i], zr[i]);
  }
}
TK_CLONES(charrnn_cell_keep,
          (const float* pl, const float* pr, const float* ql, const float* qr, int64_t n, float* zl, float* zr,
           float* h),
          (pl, pr, ql, qr, n, zl, zr, h))

// The cell's backward from dL/dh (g): through h = ½(a + b) − ab, a = act(c_L), c_L = act(z_L),
// dz_L = g·(½ − b)·act'(c_L)·act'(z_L), symmetrically for R (the Triton rnn_bwd_kernel's formula).
TK_INLINE void charrnn_cell_grad_impl(const float* zl, const float* zr, const float* g, int64_t n, float* dzl,
                                      float* dzr) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float cl = act_one(zl[i]), cr = act_one(zr[i]);
    const float a = act_one(cl), b = act_one(cr);
    dzl[i] = g[i] * (0.5f - b) * act_grad(cl) * act_grad(zl[i]);
    dzr[i] = g[i] * (0.5f - a) * act_grad(cr) * act_grad(zr[i]);
  }
}
TK_CLONES(charrnn_cell_grad, (const float* zl, const float* zr, const float* g, int64_t n, float* dzl, float* dzr),
          (zl, zr, g, n, dzl, dzr))

// The reference's RMSNorm (final_norm): y = x / (‖x‖₂ + eps) · w.
TK_INLINE void rms_norm_impl(const float* x, const float* w, float eps, int64_t n, float* y) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += x[i] * x[i];
  const float den = std::sqrt(s) + eps;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] / den * w[i];
}
TK_CLONES(rms_norm, (const float* x, const float* w, float eps, int64_t n, float* y), (x, w, eps, n, y))

// o = softmax((q·scale)·Kᵀ)·V over t cached rows (K, V: (t, dh) row-major); sc: t floats of scratch,
// qs: dh floats of scratch.
TK_INLINE void attend_generic_impl(const float* q, const float* K, const float* V, int64_t t, int64_t dh,
                                   float scale, float* qs, float* sc, float* o) {
#pragma omp simd
  for (int64_t j = 0; j < dh; ++j) qs[j] = q[j] * scale;
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < t; ++r) {
    const float* kr = K + r * dh;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < dh; ++j) s += qs[j] * kr[j];
    sc[r] = s;
    mx = std::max(mx, s);
  }
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t r = 0; r < t; ++r) {
    sc[r] = exp_f(sc[r] - mx);
    sum += sc[r];
  }
  const float inv = 1.0f / sum;
#pragma omp simd
  for (int64_t j = 0; j < dh; ++j) o[j] = 0.f;
  for (int64_t r = 0; r < t; ++r) {
    const float p = sc[r] * inv;
    const float* vr = V + r * dh;
#pragma omp simd
    for (int64_t j = 0; j < dh; ++j) o[j] += p * vr[j];
  }
}
TK_CLONES(attend_generic,
          (const float* q, const float* K, const float* V, int64_t t, int64_t dh, float scale, float* qs, float* sc,
           float* o),
          (q, K, V, t, dh, scale, qs, sc, o))

#if TK_X86
// Lane r of the result = the sum of v[r]'s 16 lanes: a transposing add tree (15 adds, 30 shuffles
// for 16 rows) instead of 16 horizontal reductions.
TK_TARGET_AVX512 inline __m512 sum16(const __m512* v) {
  __m512 w[8], x[4];
  for (int i = 0; i < 8; ++i)
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    x[i] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // each 128-bit lane l of x[i] now holds rows 4i..4i+3's partial sums over their lane l
  const __m512 y0 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], 0x88), _mm512_shuffle_f32x4(x[0], x[1], 0xDD));
  const __m512 y1 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], 0x88), _mm512_shuffle_f32x4(x[2], x[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(y0, y1, 0x88), _mm512_shuffle_f32x4(y0, y1, 0xDD));
}

// attend for dh = 16·NV: scores 16 rows at a time, o kept in registers.
template <int NV>
TK_TARGET_AVX512 void attend_avx512_fixed(const float* q, const float* K, const float* V, int64_t t, float scale,
                                          float* sc, float* o) {
  constexpr int64_t dh = 16 * NV;
  __m512 qv[NV];
  const __m512 sv = _mm512_set1_ps(scale);
  for (int u = 0; u < NV; ++u) qv[u] = _mm512_mul_ps(_mm512_loadu_ps(q + 16 * u), sv);
  __m512 mxv = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t r = 0;
  for (; r + 16 <= t; r += 16) {
    __m512 part[16];
    for (int rr = 0; rr < 16; ++rr) {
      const float* kr = K + (r + rr) * dh;
      __m512 a = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kr));
      for (int u = 1; u < NV; ++u) a = _mm512_fmadd_ps(qv[u], _mm512_loadu_ps(kr + 16 * u), a);
      part[rr] = a;
    }
    const __m512 s16 = sum16(part);
    _mm512_storeu_ps(sc + r, s16);
    mxv = _mm512_max_ps(mxv, s16);
  }
  float mx = _mm512_reduce_max_ps(mxv);
  for (; r < t; ++r) {
    const float* kr = K + r * dh;
    __m512 a = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kr));
    for (int u = 1; u < NV; ++u) a = _mm512_fmadd_ps(qv[u], _mm512_loadu_ps(kr + 16 * u), a);
    sc[r] = _mm512_reduce_add_ps(a);
    mx = std::max(mx, sc[r]);
  }
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < t; ++i) {
    sc[i] = exp_f(sc[i] - mx);
    sum += sc[i];
  }
  const float inv = 1.0f / sum;
  __m512 acc[NV];
  for (int u = 0; u < NV; ++u) acc[u] = _mm512_setzero_ps();
  for (int64_t i = 0; i < t; ++i) {
    const __m512 p = _mm512_set1_ps(sc[i] * inv);
    const float* vr = V + i * dh;
    for (int u = 0; u < NV; ++u) acc[u] = _mm512_fmadd_ps(p, _mm512_loadu_ps(vr + 16 * u), acc[u]);
  }
  for (int u = 0; u < NV; ++u) _mm512_storeu_ps(o + 16 * u, acc[u]);
}
#endif  // TK_X86

void attend(CpuIsa isa, const float* q, const float* K, const float* V, int64_t t, int64_t dh, float scale, float* qs,
            float* sc, float* o) {
#if TK_X86
  if (isa == CpuIsa::kAvx512Vnni) {
    switch (dh) {
      case 16: return attend_avx512_fixed<1>(q, K, V, t, scale, sc, o);
      case 32: return attend_avx512_fixed<2>(q, K, V, t, scale, sc, o);
      case 64: return attend_avx512_fixed<4>(q, K, V, t, scale, sc, o);
      case 128: return attend_avx512_fixed<8>(q, K, V, t, scale, sc, o);
      default: break;
    }
  }
#endif
  TK_CALL(isa, attend_generic, q, K, V, t, dh, scale, qs, sc, o);
}

// Student-t log-probs of one hidden row h (d) against the unembedding (d, vocab), as
// student_t_unembedding_ref computes them: dist = x² − 2·x·u + u², logits = c·log1p(dist/df).
TK_INLINE void unembed_impl(const float* h, const float* U, const float* usq, int64_t d, int64_t vocab, float df,
                            float c, float* xw, float* logp) {
  float x2 = 0.f;
#pragma omp simd reduction(+ : x2)
  for (int64_t i = 0; i < d; ++i) x2 += h[i] * h[i];
#pragma omp simd
  for (int64_t v = 0; v < vocab; ++v) xw[v] = 0.f;
  for (int64_t i = 0; i < d; ++i) {
    const float hi = h[i];
    const float* ur = U + i * vocab;
#pragma omp simd
    for (int64_t v = 0; v < vocab; ++v) xw[v] += hi * ur[v];
  }
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t v = 0; v < vocab; ++v) {
    const float dist = std::max((x2 - 2.0f * xw[v]) + usq[v], 1e-12f);
    logp[v] = c * std::log1p(dist / df);  // libm: V values only, and the logits reach thousands
    mx = std::max(mx, logp[v]);
  }
  float sum = 0.f;
  for (int64_t v = 0; v < vocab; ++v) sum += std::exp(logp[v] - mx);
  const float lse = std::log(sum);
  for (int64_t v = 0; v < vocab; ++v) logp[v] = (logp[v] - mx) - lse;
}
TK_CLONES(unembed,
          (const float* h, const float* U, const float* usq, int64_t d, int64_t vocab, float df, float c, float* xw,
           float* logp),
          (h, U, usq, d, vocab, df, c, xw, logp))

// ---------------------------------------------------------------------------------------------
// fp32 GEMV / small GEMM
// ---------------------------------------------------------------------------------------------
// One weight row at a time, front to back, so the whole matrix streams as one sequential run (the
// hardware prefetcher's best case; interleaving 4 rows of 1 KB — K = 256 — measured ~3.5× slower
// on a Zen 4 core), each row's load shared by up to kMR input rows. Every (weight row, input row)
// dot product uses the same four partial sums over 4·W-element chunks whatever the grouping, so the
// results do not depend on the batch size or on which thread computes a row.

constexpr int64_t kMR = 4;

#if TK_X86
template <int MR>
TK_TARGET_AVX512 void gemv_rows_avx512(const float* x, int64_t ldx, int64_t k, const float* w, const float* bias,
                                       int64_t n, float* y, int64_t ldy) {
  for (int64_t c = 0; c < n; ++c) {
    const float* wr = w + c * k;
    __m512 a[MR][4];
    for (int r = 0; r < MR; ++r)
      for (int u = 0; u < 4; ++u) a[r][u] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 64 <= k; i += 64) {
      __m512 wv[4];
      for (int u = 0; u < 4; ++u) wv[u] = _mm512_loadu_ps(wr + i + 16 * u);
      for (int r = 0; r < MR; ++r)
        for (int u = 0; u < 4; ++u) a[r][u] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * ldx + i + 16 * u), wv[u], a[r][u]);
    }
    for (; i < k; i += 16) {
      const __mmask16 mask = (k - i >= 16) ? __mmask16(0xFFFF) : __mmask16((1u << (k - i)) - 1u);
      const __m512 wv = _mm512_maskz_loadu_ps(mask, wr + i);
      for (int r = 0; r < MR; ++r) a[r][0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, x + r * ldx + i), wv, a[r][0]);
    }
    const float b = bias != nullptr ? bias[c] : 0.f;
    for (int r = 0; r < MR; ++r)
      y[r * ldy + c] =
          _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[r][0], a[r][1]), _mm512_add_ps(a[r][2], a[r][3]))) + b;
  }
}

TK_TARGET_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int MR>  // MR <= 2: 16 ymm registers
TK_TARGET_AVX2 void gemv_rows_avx2(const float* x, int64_t ldx, int64_t k, const float* w, const float* bias,
                                   int64_t n, float* y, int64_t ldy) {
  for (int64_t c = 0; c < n; ++c) {
    const float* wr = w + c * k;
    __m256 a[MR][4];
    for (int r = 0; r < MR; ++r)
      for (int u = 0; u < 4; ++u) a[r][u] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= k; i += 32) {
      __m256 wv[4];
      for (int u = 0; u < 4; ++u) wv[u] = _mm256_loadu_ps(wr + i + 8 * u);
      for (int r = 0; r < MR; ++r)
        for (int u = 0; u < 4; ++u) a[r][u] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * ldx + i + 8 * u), wv[u], a[r][u]);
    }
    for (; i + 8 <= k; i += 8) {
      const __m256 wv = _mm256_loadu_ps(wr + i);
      for (int r = 0; r < MR; ++r) a[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * ldx + i), wv, a[r][0]);
    }
    const float b = bias != nullptr ? bias[c] : 0.f;
    for (int r = 0; r < MR; ++r) {
      float t = hsum_avx2(_mm256_add_ps(_mm256_add_ps(a[r][0], a[r][1]), _mm256_add_ps(a[r][2], a[r][3])));
      for (int64_t ii = i; ii < k; ++ii) t += x[r * ldx + ii] * wr[ii];
      y[r * ldy + c] = t + b;
    }
  }
}
#endif  // TK_X86

#if TK_X86
// Prefill (many rows): a register-blocked GEMM. 4 weight rows × 4 input rows per block, one fp32
// accumulator each, the 16 of them reduced together by sum16; loop order n-block outer so that a
// block's 4 weight rows stay in L1 while every input row passes. Not used by a decode step (its
// per-row summation order differs from gemv_rows_avx512's; decode results stay batch-invariant).
TK_TARGET_AVX512 void gemm_f32_avx512(const float* x, int64_t m, int64_t k, int64_t ldx, const float* w,
                                      const float* bias, int64_t n, float* y, int64_t ldy) {
  for (int64_t n0 = 0; n0 < n; n0 += 4) {
    const int64_t cols = std::min<int64_t>(4, n - n0);
    const float* wr[4];
    for (int64_t j = 0; j < 4; ++j) wr[j] = w + std::min(n0 + j, n - 1) * k;  // past the end: recompute the last
    for (int64_t m0 = 0; m0 < m; m0 += 4) {
      const int64_t rows = std::min<int64_t>(4, m - m0);
      const float* xr[4];
      for (int64_t r = 0; r < 4; ++r) xr[r] = x + std::min(m0 + r, m - 1) * ldx;
      __m512 a[16];
      for (int u = 0; u < 16; ++u) a[u] = _mm512_setzero_ps();
      for (int64_t i = 0; i < k; i += 16) {
        const __mmask16 mask = (k - i >= 16) ? __mmask16(0xFFFF) : __mmask16((1u << (k - i)) - 1u);
        __m512 wv[4];
        for (int j = 0; j < 4; ++j) wv[j] = _mm512_maskz_loadu_ps(mask, wr[j] + i);
        for (int r = 0; r < 4; ++r) {
          const __m512 xv = _mm512_maskz_loadu_ps(mask, xr[r] + i);
          for (int j = 0; j < 4; ++j) a[4 * r + j] = _mm512_fmadd_ps(xv, wv[j], a[4 * r + j]);
        }
      }
      alignas(64) float out[16];
      _mm512_store_ps(out, sum16(a));
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < cols; ++j)
          y[(m0 + r) * ldy + n0 + j] = out[4 * r + j] + (bias != nullptr ? bias[n0 + j] : 0.f);
    }
  }
}
#endif  // TK_X86

// The portable path blocks its sums as the vector paths do: kLanes partial sums, element i into lane
// i mod kLanes, then the lanes added pairwise. Each product then passes through ⌈k/kLanes⌉ + log2(kLanes)
// additions instead of k, so the rounding error of a K = 2048 row is ~16x smaller than a sequential
// sum's (whose error the tests saw exceed a blocked BLAS's twice over) — and the compiler can keep the
// lanes in vector registers without reassociating anything.
constexpr int64_t kLanes = 16;

inline float dot_blocked(const float* x, const float* w, int64_t k) {
  float a[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= k; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) a[l] += x[i + l] * w[i + l];
  for (int64_t l = 0; i + l < k; ++l) a[l] += x[i + l] * w[i + l];
  for (int64_t half = kLanes / 2; half > 0; half /= 2)
    for (int64_t l = 0; l < half; ++l) a[l] += a[l + half];
  return a[0];
}

void gemv_rows_base(const float* x, int64_t ldx, int64_t k, const float* w, const float* bias, int64_t n, float* y,
                    int64_t ldy) {
  for (int64_t c = 0; c < n; ++c) y[c] = dot_blocked(x, w + c * k, k) + (bias != nullptr ? bias[c] : 0.f);
  (void)ldx;
  (void)ldy;
}

// y[m, c] = Σ_k x[m, k]·w[c, k] + bias[c] for c < n (w: n rows of k).
void linear_f32_isa(CpuIsa isa, const float* x, int64_t m, int64_t k, int64_t ldx, const float* w, const float* bias,
                    int64_t n, float* y, int64_t ldy, bool gemm = false) {
#if TK_X86
  if (isa == CpuIsa::kAvx512Vnni && gemm && m > kMR) return gemm_f32_avx512(x, m, k, ldx, w, bias, n, y, ldy);
  if (isa == CpuIsa::kAvx512Vnni) {
    for (int64_t m0 = 0; m0 < m; m0 += kMR) {
      const float* xr = x + m0 * ldx;
      float* yr = y + m0 * ldy;
      switch (std::min(kMR, m - m0)) {
        case 1: gemv_rows_avx512<1>(xr, ldx, k, w, bias, n, yr, ldy); break;
        case 2: gemv_rows_avx512<2>(xr, ldx, k, w, bias, n, yr, ldy); break;
        case 3: gemv_rows_avx512<3>(xr, ldx, k, w, bias, n, yr, ldy); break;
        default: gemv_rows_avx512<4>(xr, ldx, k, w, bias, n, yr, ldy); break;
      }
    }
    return;
  }
  if (isa == CpuIsa::kAvx2) {
    for (int64_t m0 = 0; m0 < m; m0 += 2) {
      if (m - m0 >= 2) {
        gemv_rows_avx2<2>(x + m0 * ldx, ldx, k, w, bias, n, y + m0 * ldy, ldy);
      } else {
        gemv_rows_avx2<1>(x + m0 * ldx, ldx, k, w, bias, n, y + m0 * ldy, ldy);
      }
    }
    return;
  }
#endif
  (void)isa;
  (void)gemm;
  for (int64_t r = 0; r < m; ++r) gemv_rows_base(x + r * ldx, ldx, k, w, bias, n, y + r * ldy, ldy);
}

// ---------------------------------------------------------------------------------------------
// The step
// ---------------------------------------------------------------------------------------------

// Output rows per unit of work: a packed W8A8 tile, else a few cache lines of bias.
constexpr int64_t kRowGrain = 16;

// One call: S new tokens for each of B batch rows, M = B·S activation rows (row ρ = b·S + s).
class Step {
 public:
  Step(const Plan& plan, const int64_t* tok, int64_t b, int64_t s, float* kv, int64_t capacity, int64_t t0,
       float* logp, float* rnn)
      : P_(plan), tok_(tok), b_(b), s_(s), m_(b * s), kv_(kv), cap_(capacity), t0_(t0), logp_(logp), rnn_(rnn),
        isa_(cpu_isa()) {
    d_ = plan.d;
    hn_ = plan.heads;
    dh_ = d_ / hn_;
    d8_ = plan.expand_n();
    hd_ = plan.seed_design ? plan.seed.hidden : 0;
    const int64_t side = m_ * (3 * d_ + d_ + d_ + d8_ + d_);
    // seed design: prophet input projections (M, 2Hd), its outputs of two layers (M, Hd) each, the
    // recurrent products of one step (B, 2Hd); p, mix, mod and the final hidden rows (M, D) each
    const int64_t seed = plan.seed_design ? m_ * 2 * hd_ + 2 * m_ * hd_ + b_ * 2 * hd_ + 4 * m_ * d_ : 0;
    shared_.resize(static_cast<size_t>(2 * side + seed));
    float* p = shared_.data();
    qkv_ = p, p += 2 * m_ * 3 * d_;
    o_ = p, p += 2 * m_ * d_;
    y_ = p, p += 2 * m_ * d_;
    act_ = p, p += 2 * m_ * d8_;
    ylin_ = p, p += 2 * m_ * d_;
    if (plan.seed_design) {
      rp_ = p, p += m_ * 2 * hd_;
      rout_[0] = p, p += m_ * hd_;
      rout_[1] = p, p += m_ * hd_;
      rq_ = p, p += b_ * 2 * hd_;
      proph_ = p, p += m_ * d_;
      mix_ = p, p += m_ * d_;
      mod_ = p, p += m_ * d_;
      hseed_ = p;
    }
    // torch multiplies q by the Python float 1/sqrt(dh), rounded to fp32.
    scale_ = static_cast<float>(1.0 / std::sqrt(static_cast<double>(dh_)));
  }

  void run(int tid, int team);

 private:
  // Per-thread scratch.
  struct Local {
    std::vector<float> f;
    float *x0, *x1, *h1, *hbuf[2], *coda, *z, *hl, *hr, *qs, *sc, *xw;
    float *cat, *cs, *csn, *xe;  // seed design: [coda | ·] (M, 2D), critics (M, nD) and normed, e (M, D)
  };
  void init_local(Local& L) const;

  void linear_rows(Weights kind, const Linear& l, const float* x, int64_t ldx, int64_t r0, int64_t r1, float* y,
                   int64_t ldy, int64_t m) const;
  template <class Epi>
  void linear_phase(int tid, int team, const Linear& l0, const Linear& l1, const float* x0, const float* x1,
                    float* y, Epi&& epi) const;
  void linear_split(int tid, int team, const Linear& l, const float* x, float* y) const;
  void attention_phase(Local& L, int tid, int team, int64_t blk0) const;
  void embed(Local& L) const;
  const float* head_pass(Local& L, int tid, int team, size_t hi, int64_t& blk, int& cur, const float* xin0,
                         const float* xin1) const;
  void prophet(Local& L, int tid, int team) const;
  const float* seed_tail(Local& L, int tid, int team, int64_t blk, int cur) const;

  const Plan& P_;
  const int64_t* tok_;
  int64_t b_, s_, m_;
  float* kv_;
  int64_t cap_, t0_;
  float* logp_;
  float* rnn_;
  CpuIsa isa_;
  int64_t d_, hn_, dh_, d8_, hd_;
  float scale_;
  std::vector<float> shared_;
  float *qkv_, *o_, *y_, *act_, *ylin_;  // (2, M, ·): the left block's rows first
  float *rp_ = nullptr, *rout_[2] = {nullptr, nullptr}, *rq_ = nullptr;  // seed: the prophet's
  float *proph_ = nullptr, *mix_ = nullptr, *mod_ = nullptr, *hseed_ = nullptr;
};

void Step::init_local(Local& L) const {
  const int64_t md = m_ * d_;
  const int64_t nc = static_cast<int64_t>(P_.eval_heads.size()) - 1;
  const int64_t seed = P_.seed_design ? 2 * md + 2 * nc * md + md : 0;
  L.f.resize(static_cast<size_t>(2 * md + 2 * md + 2 * md + md + 3 * d_ + dh_ + (t0_ + s_) + P_.vocab + seed));
  float* p = L.f.data();
  if (P_.seed_design) {
    L.cat = p, p += 2 * md;
    L.cs = p, p += nc * md;
    L.csn = p, p += nc * md;
    L.xe = p, p += md;
  }
  L.x0 = p, p += md;
  L.x1 = p, p += md;
  L.h1 = p, p += 2 * md;
  L.hbuf[0] = p, p += md;
  L.hbuf[1] = p, p += md;
  L.coda = p, p += md;
  L.z = p, p += d_;
  L.hl = p, p += d_;
  L.hr = p, p += d_;
  L.qs = p, p += dh_;
  L.sc = p, p += t0_ + s_;
  L.xw = p;
}

// The coda's first-layer inputs: token embedding + each block's positional row, rotated by RoPE.
// Positions: causal, t0 + s (absolute); reference semantics, s (every call restarts at 0), and a
// single token (S = 1) is not rotated.
void Step::embed(Local& L) const {
  const bool rotate = P_.causal || s_ > 1;
  for (int side = 0; side < 2; ++side) {
    float* xs = side ? L.x1 : L.x0;
    for (int64_t r = 0; r < m_; ++r) {
      const int64_t p = (P_.causal ? t0_ : 0) + r % s_;
      const float* pos = P_.pos[side] + p * d_;
      const float* e = P_.embedding + tok_[r] * d_;
      float* x = xs + r * d_;
      if (!rotate) {
        for (int64_t i = 0; i < d_; ++i) x[i] = e[i] + pos[i];
        continue;
      }
      const float* cs = P_.rope_cos[side] + p * (d_ / 2);
      const float* sn = P_.rope_sin[side] + p * (d_ / 2);
      for (int64_t i = 0; i < d_ / 2; ++i) {
        const float x1 = e[2 * i] + pos[2 * i], x2 = e[2 * i + 1] + pos[2 * i + 1];
        x[2 * i] = x1 * cs[i] - x2 * sn[i];
        x[2 * i + 1] = x1 * sn[i] + x2 * cs[i];
      }
    }
  }
}

// y (2, M, n) = the left and right linears of a layer on x0 / x1 (M, k) each (the same pointer when
// both blocks read the same input). The 2·n output rows are cut into units (a 64-channel packed
// tile for W8A8) and each thread takes one contiguous run of units, for all M rows (a weight is
// read once per call); epi(side, r0, r1) then runs on the thread's rows [r0, r1) of that side,
// before any barrier.
template <class Epi>
void Step::linear_phase(int tid, int team, const Linear& l0, const Linear& l1, const float* x0, const float* x1,
                        float* y, Epi&& epi) const {
  const int64_t n = l0.n, k = l0.k;
  const bool w8a8 = P_.kind == Weights::kW8A8;
  const int64_t grain = w8a8 ? kTileN : kRowGrain;
  const int64_t units = (n + grain - 1) / grain, total = 2 * units;
  const int64_t u0 = total * tid / team, u1 = total * (tid + 1) / team;
  const int64_t groups = packed_k(k) / kGroupK;
  for (int side = 0; side < 2; ++side) {
    const int64_t a = std::max(u0, side * units), e = std::min(u1, (side + 1) * units);
    if (a >= e) continue;
    const int64_t r0 = (a - side * units) * grain, r1 = std::min((e - side * units) * grain, n), rows = r1 - r0;
    (void)rows;
    (void)groups;
    linear_rows(P_.kind, side ? l1 : l0, side ? x1 : x0, k, r0, r1, y + side * m_ * n, n, m_);
    epi(side, r0, r1);
  }
}

// Output channels [r0, r1) of y (m, l.n) = x (m rows, stride ldx)·Wᵀ + bias, with `kind`'s weights
// (W8A8: r0 a multiple of kTileN).
void Step::linear_rows(Weights kind, const Linear& l, const float* x, int64_t ldx, int64_t r0, int64_t r1, float* y,
                       int64_t ldy, int64_t m) const {
  const int64_t k = l.k, rows = r1 - r0;
  if (rows <= 0) return;
  const float* bias = l.bias != nullptr ? l.bias + r0 : nullptr;
  if (kind == Weights::kF32) {
    linear_f32_isa(isa_, x, m, k, ldx, l.w + r0 * k, bias, rows, y + r0, ldy, /*gemm=*/m > b_);
  } else if (kind == Weights::kW8) {
    w8a32_linear_f32(x, m, k, ldx, l.q + r0 * k, k, l.scale + r0, bias, rows, y + r0, ldy);
  } else {
    // The single op's function on this thread's tiles: per-row activation quantization, exact int32
    // products, its epilogue and its float path for non-finite rows and scales, so every product
    // equals w8a8_linear_packed's bitwise (each thread quantizes the rows it needs itself: K
    // values per row, against N·K weight bytes).
    const int64_t groups = packed_k(k) / kGroupK;
    w8a8_linear_f32(x, m, k, ldx, l.packed + (r0 / kTileN) * groups * kTileN * kGroupK, l.wsum + r0, l.scale + r0,
                    bias, rows, y + r0, ldy);
  }
}

// y (M, l.n) = x (M, l.k)·Wᵀ + bias of one fp32 linear (the seed design's projections), its output
// rows split across the team; the caller puts a barrier before y is read.
void Step::linear_split(int tid, int team, const Linear& l, const float* x, float* y) const {
  const int64_t units = (l.n + kRowGrain - 1) / kRowGrain;
  const int64_t r0 = std::min(units * tid / team * kRowGrain, l.n);
  const int64_t r1 = std::min(units * (tid + 1) / team * kRowGrain, l.n);
  linear_rows(Weights::kF32, l, x, l.k, r0, r1, y, l.n, m_);
}

// Tasks (side, batch row, head): write the S new K/V rows at t0.., then attend each new row over
// the rows it sees (causal: up to its own position; reference semantics: all t0 + S).
void Step::attention_phase(Local& L, int tid, int team, int64_t blk0) const {
  const int64_t tasks = 2 * b_ * hn_;
  const int64_t a = tasks * tid / team, e = tasks * (tid + 1) / team;
  for (int64_t task = a; task < e; ++task) {
    const int64_t side = task / (b_ * hn_), bb = (task / hn_) % b_, hh = task % hn_;
    const int64_t blk = blk0 + side;
    float* K = kv_ + (((blk * 2 + 0) * b_ + bb) * hn_ + hh) * cap_ * dh_;
    float* V = kv_ + (((blk * 2 + 1) * b_ + bb) * hn_ + hh) * cap_ * dh_;
    for (int64_t j = 0; j < s_; ++j) {
      const float* row = qkv_ + (side * m_ + bb * s_ + j) * 3 * d_;  // [q | k | v], head-major within each
      std::memcpy(K + (t0_ + j) * dh_, row + d_ + hh * dh_, static_cast<size_t>(dh_) * sizeof(float));
      std::memcpy(V + (t0_ + j) * dh_, row + 2 * d_ + hh * dh_, static_cast<size_t>(dh_) * sizeof(float));
    }
    for (int64_t j = 0; j < s_; ++j) {
      const int64_t r = bb * s_ + j;
      const float* q = qkv_ + (side * m_ + r) * 3 * d_ + hh * dh_;
      const int64_t t = P_.causal ? t0_ + j + 1 : t0_ + s_;
      attend(isa_, q, K, V, t, dh_, scale_, L.qs, L.sc, o_ + (side * m_ + r) * d_ + hh * dh_);
    }
  }
}

// One TapeHead (eval_heads[hi]) on this thread's inputs xin0 / xin1 (M, D) -> its output rows (this
// thread's copy, valid until the next head's pass); blk and cur advance.
const float* Step::head_pass(Local& L, int tid, int team, size_t hi, int64_t& blk, int& cur, const float* xin0,
                             const float* xin1) const {
  const Head& head = P_.eval_heads[hi];
  const float* h = nullptr;
  for (int64_t layer = 0; layer < head.layers; ++layer, blk += 2) {
    const Block& bl = P_.blocks[static_cast<size_t>(blk)];
    const Block& br = P_.blocks[static_cast<size_t>(blk + 1)];
    // 1. qkv = x·in_projᵀ + b
    linear_phase(tid, team, bl.in_proj, br.in_proj, xin0, xin1, qkv_, [](int, int64_t, int64_t) {});
#pragma omp barrier
    // 2. K/V rows t0.., attention
    attention_phase(L, tid, team, blk);
#pragma omp barrier
    // 3. y = x + o·out_projᵀ + b
    linear_phase(tid, team, bl.out_proj, br.out_proj, o_, o_ + m_ * d_, y_,
                 [&](int side, int64_t r0, int64_t r1) {
                   const float* x = side ? xin1 : xin0;
                   for (int64_t r = 0; r < m_; ++r) {
                     float* yr = y_ + (side * m_ + r) * d_;
                     const float* xr = x + r * d_;
                     for (int64_t c = r0; c < r1; ++c) yr[c] = xr[c] + yr[c];
                   }
                 });
#pragma omp barrier
    // 4. h1 = LN_attn(y) (every thread, its own copy); act = activation(h1·expandᵀ + expand_b)
    for (int side = 0; side < 2; ++side) {
      const Block& bk = side ? br : bl;
      for (int64_t r = 0; r < m_; ++r)
        TK_CALL(isa_, add_layer_norm, y_ + (side * m_ + r) * d_, nullptr, bk.ln_attn_w, bk.ln_attn_b, bk.ln_attn_eps,
                d_, L.z, L.h1 + (side * m_ + r) * d_);
    }
    linear_phase(tid, team, bl.expand, br.expand, L.h1, L.h1 + m_ * d_, act_,
                 [&](int side, int64_t r0, int64_t r1) {
                   const float* eb = (side ? br : bl).expand_bias + r0;
                   for (int64_t r = 0; r < m_; ++r)
                     TK_CALL(isa_, activation, act_ + (side * m_ + r) * d8_ + r0, eb, r1 - r0);
                 });
#pragma omp barrier
    // 5. ylin = act·linearᵀ
    linear_phase(tid, team, bl.linear, br.linear, act_, act_ + m_ * d8_, ylin_, [](int, int64_t, int64_t) {});
#pragma omp barrier
    // 6. h = combine(LN_mlp(h1 + ylin) left, right) (every thread, its own copy)
    float* hn = L.hbuf[cur];
    cur ^= 1;
    for (int64_t r = 0; r < m_; ++r) {
      TK_CALL(isa_, add_layer_norm, L.h1 + r * d_, ylin_ + r * d_, bl.ln_mlp_w, bl.ln_mlp_b, bl.ln_mlp_eps, d_, L.z,
              L.hl);
      TK_CALL(isa_, add_layer_norm, L.h1 + (m_ + r) * d_, ylin_ + (m_ + r) * d_, br.ln_mlp_w, br.ln_mlp_b,
              br.ln_mlp_eps, d_, L.z, L.hr);
      TK_CALL(isa_, combine, L.hl, L.hr, head.mode, d_, hn + r * d_);
    }
    xin0 = xin1 = h = hn;
  }
  return h;
}

// The prophet over the S new tokens of every batch row, from the state in rnn_ (advanced in place),
// layer by layer as charrnn does: each layer projects its M input rows once (x·W_iᵀ + b_i, both
// cells), then steps through s = 0..S-1 (h·W_hᵀ + b_h, the cell), a barrier after each step since
// every unit of step s+1 reads every unit of step s. A thread owns the same hidden units j (left row
// j and right row Hd + j of every weight) throughout, so it reads only its own projections. The top
// layer's outputs end in rout_[(layers − 1) & 1] (M, Hd).
void Step::prophet(Local& L, int tid, int team) const {
  const Seed& sd = P_.seed;
  const int64_t hd = hd_;
  for (int64_t r = 0; r < m_; ++r)  // e: the token embeddings, without positions
    std::memcpy(L.xe + r * d_, P_.embedding + tok_[r] * d_, static_cast<size_t>(d_) * sizeof(float));
  const int64_t units = (hd + kRowGrain - 1) / kRowGrain;
  const int64_t j0 = std::min(units * tid / team * kRowGrain, hd);
  const int64_t j1 = std::min(units * (tid + 1) / team * kRowGrain, hd);
  const float* x = L.xe;
  int64_t ldx = d_;
  for (int64_t l = 0; l < sd.layers; ++l) {
    const Linear& wi = sd.wi[static_cast<size_t>(l)];
    const Linear& wh = sd.wh[static_cast<size_t>(l)];
    float* out = rout_[l & 1];
    float* state = rnn_ + l * b_ * hd;
    linear_rows(Weights::kF32, wi, x, ldx, j0, j1, rp_, 2 * hd, m_);
    linear_rows(Weights::kF32, wi, x, ldx, hd + j0, hd + j1, rp_, 2 * hd, m_);
    for (int64_t s = 0; s < s_; ++s) {
      const float* hprev = s == 0 ? state : out + (s - 1) * hd;  // batch row bb at + bb·ldh
      const int64_t ldh = s == 0 ? hd : s_ * hd;
      linear_rows(Weights::kF32, wh, hprev, ldh, j0, j1, rq_, 2 * hd, b_);
      linear_rows(Weights::kF32, wh, hprev, ldh, hd + j0, hd + j1, rq_, 2 * hd, b_);
      for (int64_t bb = 0; bb < b_; ++bb) {
        const float* pr = rp_ + (bb * s_ + s) * 2 * hd;
        const float* q = rq_ + bb * 2 * hd;
        TK_CALL(isa_, charrnn_cell, pr + j0, pr + hd + j0, q + j0, q + hd + j0, j1 - j0, out + (bb * s_ + s) * hd + j0);
      }
#pragma omp barrier
    }
    for (int64_t bb = 0; bb < b_; ++bb)
      std::memcpy(state + bb * hd + j0, out + (bb * s_ + s_ - 1) * hd + j0, static_cast<size_t>(j1 - j0) * sizeof(float));
    x = out;
    ldx = hd;
  }
}

// The seed design after the coda (in L.coda): prophet, rnn_projection, merge_projection, the critics
// on the mixture, the moderator and the merger -> the final hidden rows (shared, complete on return).
const float* Step::seed_tail(Local& L, int tid, int team, int64_t blk, int cur) const {
  const Seed& sd = P_.seed;
  const int64_t d = d_, nc = static_cast<int64_t>(P_.eval_heads.size()) - 1;
  const auto cat = [&](const float* right) {  // L.cat = [coda | right] (M, 2D)
    for (int64_t r = 0; r < m_; ++r) {
      std::memcpy(L.cat + r * 2 * d, L.coda + r * d, static_cast<size_t>(d) * sizeof(float));
      std::memcpy(L.cat + r * 2 * d + d, right + r * d, static_cast<size_t>(d) * sizeof(float));
    }
  };
  prophet(L, tid, team);
  linear_split(tid, team, sd.rnn_projection, rout_[(sd.layers - 1) & 1], proph_);
#pragma omp barrier
  cat(proph_);
  linear_split(tid, team, sd.merge_projection, L.cat, mix_);
#pragma omp barrier
  for (int64_t i = 0; i < nc; ++i) {
    const float* c = head_pass(L, tid, team, static_cast<size_t>(1 + i), blk, cur, mix_, mix_);
    for (int64_t r = 0; r < m_; ++r)
      std::memcpy(L.cs + r * nc * d + i * d, c + r * d, static_cast<size_t>(d) * sizeof(float));
  }
  for (int64_t r = 0; r < m_; ++r)
    TK_CALL(isa_, rms_norm, L.cs + r * nc * d, sd.final_norm_w, sd.final_norm_eps, nc * d, L.csn + r * nc * d);
  linear_split(tid, team, sd.merge_final, L.csn, mod_);
#pragma omp barrier
  cat(mod_);
  linear_split(tid, team, sd.merger, L.cat, hseed_);
#pragma omp barrier
  return hseed_;
}

void Step::run(int tid, int team) {
  Local L;
  init_local(L);
  embed(L);
  int64_t blk = 0;
  int cur = 0;
  const float* h = head_pass(L, tid, team, 0, blk, cur, L.x0, L.x1);
  std::memcpy(L.coda, h, static_cast<size_t>(m_ * d_) * sizeof(float));
  if (P_.seed_design) {
    h = seed_tail(L, tid, team, blk, cur);
  } else {
    for (size_t hi = 1; hi < P_.eval_heads.size(); ++hi) h = head_pass(L, tid, team, hi, blk, cur, L.coda, L.coda);
  }
  const float df = P_.df;
  const float c = static_cast<float>(-0.5 * (static_cast<double>(P_.df) + static_cast<double>(d_)));
  for (int64_t r = tid; r < m_; r += team)
    TK_CALL(isa_, unembed, h + r * d_, P_.unembedding, P_.unembedding_sq, d_, P_.vocab, df, c, L.xw,
            logp_ + r * P_.vocab);
}

}  // namespace

void decode_step(const Plan& plan, const int64_t* tok, int64_t b, int64_t s, float* kv, int64_t capacity, int64_t t0,
                 float* logp, int nthreads, float* rnn) {
  Step step(plan, tok, b, s, kv, capacity, t0, logp, rnn);
  nthreads = std::max(nthreads, 1);
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
  {
    // The int8 kernels' own parallel loops must not nest a second team inside this one.
    omp_set_num_threads(1);
    step.run(omp_get_thread_num(), omp_get_num_threads());
  }
}

void linear_f32(const float* x, int64_t m, int64_t k, int64_t ldx, const float* w, const float* bias, int64_t n,
                float* y, int64_t ldy) {
  linear_f32_isa(cpu_isa(), x, m, k, ldx, w, bias, n, y, ldy);
}

void activation_f32(float* x, const float* bias, int64_t n) { TK_CALL(cpu_isa(), activation, x, bias, n); }

namespace {
// This thread's hidden units [j0, j1) of hd, in kRowGrain units (both cells' rows j and hd + j).
std::pair<int64_t, int64_t> unit_range(int64_t hd, int tid, int team) {
  const int64_t units = (hd + kRowGrain - 1) / kRowGrain;
  return {std::min(units * tid / team * kRowGrain, hd), std::min(units * (tid + 1) / team * kRowGrain, hd)};
}
}  // namespace

// A team of threads over the hidden units, one barrier per step: every unit of step t+1 reads every
// unit of step t. The recurrent product of a step is (B, Hd)·W_hᵀ, B rows sharing each weight row's
// load (linear_f32_isa's register-blocked GEMM).
void charrnn_layer_forward(const float* p, const float* wh, int64_t b, int64_t s, int64_t hd, float* hs, float* z,
                           int nthreads) {
  const CpuIsa isa = cpu_isa();
  std::vector<float> q(static_cast<size_t>(b * 2 * hd));
  const int64_t ldh = (s + 1) * hd, ldz = s * 2 * hd;
#pragma omp parallel num_threads(std::max(nthreads, 1)) if (nthreads > 1)
  {
    const auto [j0, j1] = unit_range(hd, omp_get_thread_num(), omp_get_num_threads());
    for (int64_t t = 0; t < s; ++t) {
      const float* hprev = hs + t * hd;
      if (j1 > j0) linear_f32_isa(isa, hprev, b, hd, ldh, wh + j0 * hd, nullptr, j1 - j0, q.data() + j0, 2 * hd, true);
      if (j1 > j0) linear_f32_isa(isa, hprev, b, hd, ldh, wh + (hd + j0) * hd, nullptr, j1 - j0, q.data() + hd + j0, 2 * hd, true);
      for (int64_t bb = 0; bb < b && j1 > j0; ++bb) {
        const float* pr = p + bb * ldz + t * 2 * hd;
        const float* qr = q.data() + bb * 2 * hd;
        float* zr = z + bb * ldz + t * 2 * hd;
        TK_CALL(isa, charrnn_cell_keep, pr + j0, pr + hd + j0, qr + j0, qr + hd + j0, j1 - j0, zr + j0, zr + hd + j0,
                hs + bb * ldh + (t + 1) * hd + j0);
      }
#pragma omp barrier  // a thread without units still meets every barrier
    }
  }
}

// Reverse time: g = dout[:, t] + (t < S−1 ? dz[:, t+1]·W_h : dlast); dz[:, t] = the cell's backward of g.
// W_h is transposed once so that the carried product is row dot products like the forward's.
void charrnn_layer_backward(const float* dout, const float* dlast, const float* z, const float* wh, int64_t b,
                            int64_t s, int64_t hd, float* dz, int nthreads) {
  const CpuIsa isa = cpu_isa();
  std::vector<float> wt(static_cast<size_t>(hd * 2 * hd)), g(static_cast<size_t>(b * hd));
  const int64_t ldo = s * hd, ldz = s * 2 * hd;
#pragma omp parallel num_threads(std::max(nthreads, 1)) if (nthreads > 1)
  {
    const auto [j0, j1] = unit_range(hd, omp_get_thread_num(), omp_get_num_threads());
    for (int64_t j = j0; j < j1; ++j)
      for (int64_t k = 0; k < 2 * hd; ++k) wt[j * 2 * hd + k] = wh[k * hd + j];
    for (int64_t bb = 0; bb < b; ++bb)
      for (int64_t j = j0; j < j1; ++j) g[bb * hd + j] = dlast[bb * hd + j];
#pragma omp barrier
    for (int64_t t = s - 1; t >= 0; --t) {
      for (int64_t bb = 0; bb < b && j1 > j0; ++bb) {
        float* gr = g.data() + bb * hd;
        const float* dr = dout + bb * ldo + t * hd;
        for (int64_t j = j0; j < j1; ++j) gr[j] += dr[j];
        const float* zr = z + bb * ldz + t * 2 * hd;
        float* dzr = dz + bb * ldz + t * 2 * hd;
        TK_CALL(isa, charrnn_cell_grad, zr + j0, zr + hd + j0, gr + j0, j1 - j0, dzr + j0, dzr + hd + j0);
      }
#pragma omp barrier
      if (t > 0 && j1 > j0)
        linear_f32_isa(isa, dz + t * 2 * hd, b, 2 * hd, ldz, wt.data() + j0 * 2 * hd, nullptr, j1 - j0, g.data() + j0, hd,
                       true);
#pragma omp barrier
    }
  }
}

}  // namespace tk::decode

namespace tk::decode {

uint32_t philox_r0(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  // tape_kernels/sampling.py's philox_ref (Triton's tl.philox): 10 rounds, then the key bump.
  for (int i = 0; i < 10; ++i) {
    const uint64_t pb = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint64_t pa = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

void sample_rows(const float* logp, int64_t b, int64_t v, int64_t ldl, float inv_temp, int64_t top_k, uint64_t seed,
                 uint64_t step, int64_t* out) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const uint32_t c2 = static_cast<uint32_t>(step), c3 = static_cast<uint32_t>(step >> 32);
  std::vector<float> sc(static_cast<size_t>(v));
  for (int64_t r = 0; r < b; ++r) {
    const float* lp = logp + r * ldl;
    bool bad = false;
    for (int64_t i = 0; i < v; ++i) bad = bad || lp[i] != lp[i] || lp[i] == std::numeric_limits<float>::infinity();
    if (bad) {
      out[r] = -1;
      continue;
    }
    if (inv_temp <= 0.f) {  // greedy: the first maximum, as torch.argmax
      int64_t best = 0;
      for (int64_t i = 1; i < v; ++i) best = lp[i] > lp[best] ? i : best;
      out[r] = best;
      continue;
    }
    // pick_next's fp32 scores logp·fp32(1/T); top-k keeps scores >= the k-th largest (torch.topk's
    // values[..., -1]: duplicates count), the others never win.
    for (int64_t i = 0; i < v; ++i) sc[static_cast<size_t>(i)] = lp[i] * inv_temp;
    float thr = -std::numeric_limits<float>::infinity();
    const bool has_thr = top_k > 0;
    if (has_thr) {
      std::vector<float> tmp(sc);
      const int64_t k = std::min(top_k, v);
      std::nth_element(tmp.begin(), tmp.begin() + (k - 1), tmp.end(), std::greater<float>());
      thr = tmp[static_cast<size_t>(k - 1)];
    }
    // The race in float64: z = score + g, g = −log(−log u), u = ((r >> 9) + ½)·2⁻²³; the first maximum.
    double best = -std::numeric_limits<double>::infinity();
    int64_t best_i = 0;
    for (int64_t i = 0; i < v; ++i) {
      const float s = sc[static_cast<size_t>(i)];
      if (has_thr && s < thr) continue;
      const uint32_t rr = philox_r0(static_cast<uint32_t>(i), static_cast<uint32_t>(r), c2, c3, k0, k1);
      const double u = (static_cast<double>(rr >> 9) + 0.5) * 1.1920928955078125e-07;
      const double z = static_cast<double>(s) + -std::log(-std::log(u));
      if (z > best) {
        best = z;
        best_i = i;
      }
    }
    out[r] = best_i;
  }
}

}  // namespace tk::decode
