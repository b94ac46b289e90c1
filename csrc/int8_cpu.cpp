// CPU int8 kernels (see int8_cpu.h). ISA-specific bodies carry per-function target attributes, so
// the file builds with the default -march and the best body is picked at run time with
// __builtin_cpu_supports.
#include "int8_cpu.h"

// x86 SIMD bodies compile only on x86 (elsewhere, or with -DTK_NO_X86_SIMD, the portable C++ runs).
#if (defined(__x86_64__) || defined(__i386__)) && !defined(TK_NO_X86_SIMD)
#define TK_X86 1
#include <immintrin.h>
#else
#define TK_X86 0
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cfloat>
#include <cstring>
#include <limits>
#include <vector>

namespace tk {

// ---------------------------------------------------------------------------------------------
// ISA selection
// ---------------------------------------------------------------------------------------------

CpuIsa cpu_isa_best() {
#if TK_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
    return CpuIsa::kAvx512Vnni;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuIsa::kAvx2;
#endif
  return CpuIsa::kScalar;
}

static std::atomic<int> g_isa{-1};

CpuIsa cpu_isa() {
  int v = g_isa.load(std::memory_order_relaxed);
  if (v < 0) {
    v = static_cast<int>(cpu_isa_best());
    g_isa.store(v, std::memory_order_relaxed);
  }
  return static_cast<CpuIsa>(v);
}

void set_cpu_isa(CpuIsa isa) { g_isa.store(static_cast<int>(isa), std::memory_order_relaxed); }

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512Vnni: return "avx512_vnni";
    case CpuIsa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

// Work below this many multiply-adds runs on the calling thread: waking the OpenMP team costs a
// few microseconds (far more when another process holds a core), more than a small GEMV takes.
// VNNI does ~100 int8 MACs per ns on one core, dequantize-and-FMA about a third of that.
static constexpr int64_t kParallelMacs = 1 << 16;
static constexpr int64_t kParallelMacsW8A8 = 1 << 20;
static constexpr int64_t kParallelMacsW8A32 = 1 << 18;

// ---------------------------------------------------------------------------------------------
// Packing and activation quantization
// ---------------------------------------------------------------------------------------------

bool pack_w8(const int8_t* q, int64_t n, int64_t k, int64_t ldw, int8_t* packed, int32_t* wsum) {
  const int64_t np = packed_n(n), kp = packed_k(k), groups = kp / kGroupK;
  bool ok = true;
#pragma omp parallel for schedule(static) reduction(&& : ok) if (n * k > kParallelMacs)
  for (int64_t c = 0; c < np; ++c) {
    const int64_t tile = c / kTileN, lane = c % kTileN;
    int8_t* dst = packed + tile * groups * kTileN * kGroupK + lane * kGroupK;
    int32_t s = 0;
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t i = 0; i < kGroupK; ++i) {
        const int64_t kk = g * kGroupK + i;
        const int8_t v = (c < n && kk < k) ? q[c * ldw + kk] : int8_t(0);
        ok = ok && (v >= kWeightMin);
        s += v;
        dst[g * kTileN * kGroupK + i] = v;
      }
    }
    wsum[c] = s;
  }
  return ok;
}

void quantize_rows_f32(const float* x, int64_t m, int64_t k, int64_t ldx, int8_t* xq, int64_t ldq, float* xs) {
  // Adding and subtracting 1.5·2^23 rounds an fp32 of magnitude < 2^22 to the nearest integer, ties
  // to even (the default rounding mode), exactly like torch.round, and vectorizes on any x86.
  constexpr float kMagic = 12582912.0f;
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * ldx;
    int8_t* qr = xq + r * ldq;
    float amax = 0.f;
    // std::max drops a NaN operand, so non-finite values are flagged apart: !(|v| <= FLT_MAX) holds
    // for ±inf and NaN alike.
    int bad = 0;
#pragma omp simd reduction(max : amax) reduction(| : bad)
    for (int64_t i = 0; i < k; ++i) {
      const float a = std::fabs(xr[i]);
      amax = std::max(amax, a);
      bad |= !(a <= FLT_MAX);
    }
    if (bad) {
      // A row with inf or NaN has no int8 image: xq is zero and xs is max|x| / 127 as torch.amax
      // gives it (NaN if the row holds one, else inf); the linear ops compute such rows in float.
      bool has_nan = false;
      for (int64_t i = 0; i < k && !has_nan; ++i) has_nan = std::isnan(xr[i]);
      xs[r] = has_nan ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
      std::memset(qr, 0, static_cast<size_t>(ldq));
      continue;
    }
    const float inv = amax > 0.f ? 127.0f / amax : 0.f;
    xs[r] = amax / 127.0f;
#pragma omp simd
    for (int64_t i = 0; i < k; ++i) {
      float v = std::min(std::max(xr[i] * inv, -127.0f), 127.0f);
      v = (v + kMagic) - kMagic;
      qr[i] = static_cast<int8_t>(static_cast<int32_t>(v));
    }
    for (int64_t i = k; i < ldq; ++i) qr[i] = 0;
  }
}

// ---------------------------------------------------------------------------------------------
// Non-finite inputs: the float path's answer
// ---------------------------------------------------------------------------------------------
//
// Where an input is inf or NaN, the factored int8 forms (acc · xs · s, or (Σ x·q) · s) put inf and NaN
// in other places than F.linear(x, q·s, b) does: W8A8 has no int8 image of a non-finite row, and an
// inf (or overflowing) scale multiplies a sum of terms instead of every term. Those outputs are
// recomputed here as Σ_k x[m, k] · (q[n, k] · s[n]) + b[n], whose inf/NaN pattern does not depend on
// the summation order. They are found in O(M + N) per call, so finite inputs pay nothing else.

static inline bool scale_needs_float_path(float s) { return !(std::fabs(s) <= kMaxFastScale); }

// Columns whose scale needs the float path; empty in any sane model.
static std::vector<int64_t> float_path_columns(const float* ws, int64_t n) {
  std::vector<int64_t> cols;
  for (int64_t c = 0; c < n; ++c)
    if (scale_needs_float_path(ws[c])) cols.push_back(c);
  return cols;
}

// Recomputes y[r, c] = Σ_k x[r, k] · (q(c, k) · s[c]) + b[c] for every column of the rows in `rows` and
// for the columns `cols` of every other row; q(c, k) reads the weights in whatever layout they are.
template <class Q>
static void float_path_fixup(const float* x, int64_t m, int64_t k, int64_t ldx, const float* ws, const float* bias,
                             int64_t n, float* y, int64_t ldy, const std::vector<char>& rows,
                             const std::vector<int64_t>& cols, Q q) {
  auto one = [&](int64_t r, int64_t c) {
    const float* xr = x + r * ldx;
    const float s = ws[c];
    float t = 0.f;
    for (int64_t i = 0; i < k; ++i) t += xr[i] * (static_cast<float>(q(c, i)) * s);
    y[r * ldy + c] = t + (bias ? bias[c] : 0.f);
  };
#pragma omp parallel for schedule(static) if (m * k * (cols.empty() ? n : int64_t(cols.size())) > kParallelMacs)
  for (int64_t r = 0; r < m; ++r) {
    if (rows[r]) {
      for (int64_t c = 0; c < n; ++c) one(r, c);
    } else {
      for (const int64_t c : cols) one(r, c);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// W8A8 tile kernels: acc[r][c] = Σ_k xq[r, k] · q[tile·64 + c, k] for r < MR rows, one 64-channel tile
// ---------------------------------------------------------------------------------------------

#if TK_X86
// vpdpbusd multiplies unsigned by signed bytes, so x enters shifted to u8 (x + 128) and the
// 128·Σ_k q[n, k] it adds is subtracted at the end (wsum); int32 lanes never saturate here.
template <int MR>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) static void tile_vnni(
    const uint8_t* xu, int64_t ldu, int64_t groups, const int8_t* wt, const int32_t* wsum, int32_t* acc) {
  __m512i a[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) a[r][j] = _mm512_setzero_si512();
  for (int64_t g = 0; g < groups; ++g) {
    const int8_t* wg = wt + g * kTileN * kGroupK;
    const __m512i w0 = _mm512_loadu_si512(wg);
    const __m512i w1 = _mm512_loadu_si512(wg + 64);
    const __m512i w2 = _mm512_loadu_si512(wg + 128);
    const __m512i w3 = _mm512_loadu_si512(wg + 192);
    for (int r = 0; r < MR; ++r) {
      int32_t x4;
      std::memcpy(&x4, xu + r * ldu + g * kGroupK, 4);
      const __m512i xb = _mm512_set1_epi32(x4);
      a[r][0] = _mm512_dpbusd_epi32(a[r][0], xb, w0);
      a[r][1] = _mm512_dpbusd_epi32(a[r][1], xb, w1);
      a[r][2] = _mm512_dpbusd_epi32(a[r][2], xb, w2);
      a[r][3] = _mm512_dpbusd_epi32(a[r][3], xb, w3);
    }
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i comp = _mm512_slli_epi32(_mm512_loadu_si512(wsum + 16 * j), 7);
    for (int r = 0; r < MR; ++r) _mm512_storeu_si512(acc + r * kTileN + 16 * j, _mm512_sub_epi32(a[r][j], comp));
  }
}

// vpmaddubsw also wants u8 × s8 but saturates its int16 pair sums, so instead of shifting x we move
// x's sign onto q: |x| · (q · sign x) = x · q, and with |q| ≤ 127 a pair sum stays ≤ 2·128·127 < 2^15.
__attribute__((target("avx2,fma"))) static void tile_avx2(const int8_t* xq, int64_t groups, const int8_t* wt,
                                                          int32_t* acc) {
  __m256i a[8];
  for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t g = 0; g < groups; ++g) {
    const int8_t* wg = wt + g * kTileN * kGroupK;
    int32_t x4;
    std::memcpy(&x4, xq + g * kGroupK, 4);
    const __m256i xb = _mm256_set1_epi32(x4);
    const __m256i xa = _mm256_abs_epi8(xb);
    for (int j = 0; j < 8; ++j) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 32 * j));
      const __m256i p = _mm256_maddubs_epi16(xa, _mm256_sign_epi8(w, xb));
      a[j] = _mm256_add_epi32(a[j], _mm256_madd_epi16(p, ones));
    }
  }
  for (int j = 0; j < 8; ++j) _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + 8 * j), a[j]);
}

#endif  // TK_X86

static void tile_scalar(const int8_t* xq, int64_t groups, const int8_t* wt, int32_t* acc) {
  for (int64_t c = 0; c < kTileN; ++c) acc[c] = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const int8_t* wg = wt + g * kTileN * kGroupK;
    const int8_t* xg = xq + g * kGroupK;
    for (int64_t c = 0; c < kTileN; ++c) {
      int32_t s = 0;
      for (int64_t i = 0; i < kGroupK; ++i) s += int32_t(xg[i]) * int32_t(wg[c * kGroupK + i]);
      acc[c] += s;
    }
  }
}

// Runs the selected tile kernel over every (row block, tile) and hands each block of int32 results
// (rows × 64, row stride 64) to epi(m0, rows, n0, acc).
template <class Epi>
static void gemm_packed_driver(const int8_t* xq, int64_t m, int64_t k, int64_t ldq, const int8_t* packed,
                               const int32_t* wsum, int64_t n, Epi epi) {
  const CpuIsa isa = cpu_isa();
  const int64_t kp = packed_k(k), groups = kp / kGroupK, tiles = packed_n(n) / kTileN;
  constexpr int64_t kMaxMR = 4;
  const int64_t mblocks = (m + kMaxMR - 1) / kMaxMR;
  std::vector<uint8_t> xu;
  if (isa == CpuIsa::kAvx512Vnni) {
    xu.resize(static_cast<size_t>(m * kp));
    for (int64_t r = 0; r < m; ++r)
      for (int64_t i = 0; i < kp; ++i) xu[r * kp + i] = static_cast<uint8_t>(xq[r * ldq + i]) ^ 0x80u;
  }
  const int64_t items = tiles * mblocks;
  // Items are ordered tile-major so a thread's consecutive row blocks reuse one tile from cache.
#pragma omp parallel for schedule(static) if (m * n * k > kParallelMacsW8A8)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t tile = it / mblocks, mb = it % mblocks;
    const int64_t m0 = mb * kMaxMR, rows = std::min(kMaxMR, m - m0);
    const int8_t* wt = packed + tile * groups * kTileN * kGroupK;
    alignas(64) int32_t acc[kMaxMR * kTileN];
    if (TK_X86 && isa == CpuIsa::kAvx512Vnni) {
#if TK_X86
      const uint8_t* xr = xu.data() + m0 * kp;
      const int32_t* ws = wsum + tile * kTileN;
      switch (rows) {
        case 1: tile_vnni<1>(xr, kp, groups, wt, ws, acc); break;
        case 2: tile_vnni<2>(xr, kp, groups, wt, ws, acc); break;
        case 3: tile_vnni<3>(xr, kp, groups, wt, ws, acc); break;
        default: tile_vnni<4>(xr, kp, groups, wt, ws, acc); break;
      }
#endif
    } else if (TK_X86 && isa == CpuIsa::kAvx2) {
#if TK_X86
      for (int64_t r = 0; r < rows; ++r) tile_avx2(xq + (m0 + r) * ldq, groups, wt, acc + r * kTileN);
#endif
    } else {
      for (int64_t r = 0; r < rows; ++r) tile_scalar(xq + (m0 + r) * ldq, groups, wt, acc + r * kTileN);
    }
    epi(m0, rows, tile * kTileN, acc);
  }
}

void gemm_s8s8_s32_packed(const int8_t* xq, int64_t m, int64_t k, int64_t ldq, const int8_t* packed,
                          const int32_t* wsum, int64_t n, int32_t* out, int64_t ldo) {
  gemm_packed_driver(xq, m, k, ldq, packed, wsum, n, [&](int64_t m0, int64_t rows, int64_t n0, const int32_t* acc) {
    const int64_t cols = std::min(kTileN, n - n0);
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(out + (m0 + r) * ldo + n0, acc + r * kTileN, static_cast<size_t>(cols) * sizeof(int32_t));
  });
}

void w8a8_linear_f32(const float* x, int64_t m, int64_t k, int64_t ldx, const int8_t* packed, const int32_t* wsum,
                     const float* ws, const float* bias, int64_t n, float* y, int64_t ldy) {
  const int64_t kp = packed_k(k);
  std::vector<int8_t> xq(static_cast<size_t>(m * kp));
  std::vector<float> xs(static_cast<size_t>(m));
  quantize_rows_f32(x, m, k, ldx, xq.data(), kp, xs.data());
  gemm_packed_driver(xq.data(), m, k, kp, packed, wsum, n,
                     [&](int64_t m0, int64_t rows, int64_t n0, const int32_t* acc) {
                       const int64_t cols = std::min(kTileN, n - n0);
                       for (int64_t r = 0; r < rows; ++r) {
                         const float sx = xs[m0 + r];
                         float* yr = y + (m0 + r) * ldy + n0;
                         const int32_t* ar = acc + r * kTileN;
#pragma omp simd
                         for (int64_t c = 0; c < cols; ++c)
                           yr[c] = static_cast<float>(ar[c]) * (sx * ws[n0 + c]) + (bias ? bias[n0 + c] : 0.f);
                       }
                     });
  // Rows with inf/NaN (xs non-finite, xq zero) and columns with a non-finite or huge scale.
  std::vector<char> rows(static_cast<size_t>(m), 0);
  bool any_row = false;
  for (int64_t r = 0; r < m; ++r) any_row |= (rows[r] = !std::isfinite(xs[r])) != 0;
  const std::vector<int64_t> cols = float_path_columns(ws, n);
  if (!any_row && cols.empty()) return;
  const int64_t groups = packed_k(k) / kGroupK;
  float_path_fixup(x, m, k, ldx, ws, bias, n, y, ldy, rows, cols, [&](int64_t c, int64_t i) {
    return packed[(c / kTileN) * groups * kTileN * kGroupK + (i / kGroupK) * kTileN * kGroupK + (c % kTileN) * kGroupK +
                  i % kGroupK];
  });
}

// ---------------------------------------------------------------------------------------------
// Weight-only (W8A32): q dequantized in registers, fp32 FMAs; blocks of NR=4 channels × MR rows
// ---------------------------------------------------------------------------------------------

#if TK_X86
template <int MR>
__attribute__((target("avx512f,avx512bw,avx512vl"))) static void w8a32_block_avx512(
    const float* x, int64_t ldx, int64_t k, const int8_t* const* qr, float* out /* MR x 4 */) {
  __m512 a[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) a[r][j] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 16) {
    const __mmask16 mask = (k - i >= 16) ? __mmask16(0xFFFF) : __mmask16((1u << (k - i)) - 1u);
    __m512 w[4];
    for (int j = 0; j < 4; ++j)
      w[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, qr[j] + i)));
    for (int r = 0; r < MR; ++r) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + r * ldx + i);
      for (int j = 0; j < 4; ++j) a[r][j] = _mm512_fmadd_ps(xv, w[j], a[r][j]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) out[r * 4 + j] = _mm512_reduce_add_ps(a[r][j]);
}

__attribute__((target("avx2,fma"))) static void w8a32_block_avx2(const float* x, int64_t k, const int8_t* const* qr,
                                                                 float* out /* 4 */) {
  __m256 a[4];
  for (int j = 0; j < 4; ++j) a[j] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    for (int j = 0; j < 4; ++j) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qr[j] + i));
      a[j] = _mm256_fmadd_ps(xv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), a[j]);
    }
  }
  for (int j = 0; j < 4; ++j) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a[j]), _mm256_extractf128_ps(a[j], 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    float t = _mm_cvtss_f32(s);
    for (int64_t ii = i; ii < k; ++ii) t += x[ii] * static_cast<float>(qr[j][ii]);
    out[j] = t;
  }
}

#endif  // TK_X86

static void w8a32_block_scalar(const float* x, int64_t k, const int8_t* const* qr, float* out /* 4 */) {
  for (int j = 0; j < 4; ++j) {
    float t = 0.f;
#pragma omp simd reduction(+ : t)
    for (int64_t i = 0; i < k; ++i) t += x[i] * static_cast<float>(qr[j][i]);
    out[j] = t;
  }
}

void w8a32_linear_f32(const float* x, int64_t m, int64_t k, int64_t ldx, const int8_t* q, int64_t ldw,
                      const float* ws, const float* bias, int64_t n, float* y, int64_t ldy) {
  const CpuIsa isa = cpu_isa();
  constexpr int64_t NR = 4, MR = 4;
  const int64_t nblocks = (n + NR - 1) / NR, mblocks = (m + MR - 1) / MR, items = nblocks * mblocks;
#pragma omp parallel for schedule(static) if (m * n * k > kParallelMacsW8A32)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t nb = it / mblocks, mb = it % mblocks;
    const int64_t n0 = nb * NR, m0 = mb * MR, rows = std::min(MR, m - m0), cols = std::min(NR, n - n0);
    // Past the last channel the block re-reads the last row and discards the result.
    const int8_t* qr[NR];
    for (int64_t j = 0; j < NR; ++j) qr[j] = q + std::min(n0 + j, n - 1) * ldw;
    float out[MR * NR];
    const float* xr = x + m0 * ldx;
    if (TK_X86 && isa == CpuIsa::kAvx512Vnni) {
#if TK_X86
      switch (rows) {
        case 1: w8a32_block_avx512<1>(xr, ldx, k, qr, out); break;
        case 2: w8a32_block_avx512<2>(xr, ldx, k, qr, out); break;
        case 3: w8a32_block_avx512<3>(xr, ldx, k, qr, out); break;
        default: w8a32_block_avx512<4>(xr, ldx, k, qr, out); break;
      }
#endif
    } else {
      for (int64_t r = 0; r < rows; ++r) {
#if TK_X86
        if (isa == CpuIsa::kAvx2) {
          w8a32_block_avx2(xr + r * ldx, k, qr, out + r * NR);
          continue;
        }
#endif
        w8a32_block_scalar(xr + r * ldx, k, qr, out + r * NR);
      }
    }
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < cols; ++j)
        y[(m0 + r) * ldy + n0 + j] = out[r * NR + j] * ws[n0 + j] + (bias ? bias[n0 + j] : 0.f);
  }
  // fp32 sums of x·q already put inf/NaN where x·(q·s) does for a finite scale (a common factor s of
  // every term, 0 included); only columns whose scale is non-finite or makes q·s overflow differ.
  const std::vector<int64_t> cols = float_path_columns(ws, n);
  if (cols.empty()) return;
  const std::vector<char> rows(static_cast<size_t>(m), 0);
  float_path_fixup(x, m, k, ldx, ws, bias, n, y, ldy, rows, cols, [&](int64_t c, int64_t i) { return q[c * ldw + i]; });
}

}  // namespace tk
