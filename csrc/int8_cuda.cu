// CUDA int8 kernels (see int8_cuda.h). Plain CUDA C++, no ATen: this file compiles on its own with
// `nvcc -Icsrc` for sm_86 and sm_90.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <cstdint>

#include "int8_cuda.h"

namespace tk {
namespace cuda {
namespace {

template <typename T>
__device__ __forceinline__ float to_f32(T v);
template <>
__device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// ------------------------------------------------------------------------------------------------
// Per-row activation quantization: one block per row.
// ------------------------------------------------------------------------------------------------

template <typename T>
__global__ void quantize_rows_kernel(const T* __restrict__ x, int64_t k, int64_t ldx, int8_t* __restrict__ xq,
                                     int64_t ldq, float* __restrict__ xs) {
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * ldx;
  float amax = 0.f;
  // fmaxf drops a NaN operand, so inf/NaN are flagged apart (the row then has no int8 image).
  int nonfinite = 0, has_nan = 0;
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
    const float v = to_f32(xr[i]);
    amax = fmaxf(amax, fabsf(v));
    nonfinite |= !isfinite(v);
    has_nan |= isnan(v);
  }
  amax = warp_max(amax);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) red[warp] = amax;
  __syncthreads();
  if (warp == 0) {
    amax = lane < (blockDim.x >> 5) ? red[lane] : 0.f;
    amax = warp_max(amax);
    if (lane == 0) red[0] = amax;
  }
  __syncthreads();
  amax = red[0];
  // A row holding inf or NaN: xq = 0 and xs = NaN if it holds a NaN, else inf (as torch.amax); the
  // W8A8 GEMM computes such rows in float. __syncthreads_or also orders the reads of red[0].
  const bool row_nan = __syncthreads_or(has_nan) != 0;
  const bool row_ok = __syncthreads_or(nonfinite) == 0;
  // Correctly rounded division and product (immune to --use_fast_math), so the quantized values
  // match the CPU kernel and the PyTorch reference bit for bit.
  const float inv = row_ok && amax > 0.f ? __fdiv_rn(127.0f, amax) : 0.f;
  if (threadIdx.x == 0) xs[row] = row_ok ? __fdiv_rn(amax, 127.0f) : (row_nan ? CUDART_NAN_F : CUDART_INF_F);
  int8_t* qr = xq + row * ldq;
  for (int64_t i = threadIdx.x; i < ldq; i += blockDim.x) {
    int v = 0;
    if (row_ok && i < k) v = __float2int_rn(fminf(fmaxf(__fmul_rn(to_f32(xr[i]), inv), -127.f), 127.f));
    qr[i] = static_cast<int8_t>(v);
  }
}

// ------------------------------------------------------------------------------------------------
// Non-finite inputs get the float path's answer (see int8_cpu.h, kMaxFastScale): outputs of a row of
// x holding inf/NaN (W8A8: xs non-finite) or of a channel whose scale is non-finite or makes q·s
// overflow are Σ_k x·(q·s) + b, as F.linear(x, q·s, b) computes them. Finite inputs never take it.
// ------------------------------------------------------------------------------------------------

constexpr float kMaxFastScale = 3.40282347e+38f / 128.0f;

__device__ __forceinline__ bool scale_needs_float_path(float s) { return !(fabsf(s) <= kMaxFastScale); }

template <typename T>
__device__ float float_path_dot(const T* __restrict__ xr, const int8_t* __restrict__ qr, int64_t k, float s) {
  float t = 0.f;
  for (int64_t i = 0; i < k; ++i) t = fmaf(to_f32(xr[i]), static_cast<float>(qr[i]) * s, t);
  return t;
}

// ------------------------------------------------------------------------------------------------
// W8A16 GEMV / skinny GEMM (M ≤ 16), at memory bandwidth: the weight stream is the whole cost.
// ------------------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void load16(const T* p, float* out);
template <>
__device__ __forceinline__ void load16<float>(const float* p, float* out) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float4 v = __ldg(reinterpret_cast<const float4*>(p) + i);
    out[4 * i] = v.x;
    out[4 * i + 1] = v.y;
    out[4 * i + 2] = v.z;
    out[4 * i + 3] = v.w;
  }
}
template <>
__device__ __forceinline__ void load16<__half>(const __half* p, float* out) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p) + i);
    const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __half22float2(h[j]);
      out[8 * i + 2 * j] = f.x;
      out[8 * i + 2 * j + 1] = f.y;
    }
  }
}
template <>
__device__ __forceinline__ void load16<__nv_bfloat16>(const __nv_bfloat16* p, float* out) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p) + i);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __bfloat1622float2(h[j]);
      out[8 * i + 2 * j] = f.x;
      out[8 * i + 2 * j + 1] = f.y;
    }
  }
}

// int8 -> fp32 without I2F (a quarter-rate conversion on sm_86/sm_90, which the weight stream
// would saturate): flip the sign bit to get u = q + 128, splice u under the exponent of 2^23 with
// one byte permute (the float 2^23 + u, exact), and subtract 2^23 + 128. Two full-rate ops a weight.
__device__ __forceinline__ void decode16(const int4 wv, float* out) {
  const uint32_t words[4] = {static_cast<uint32_t>(wv.x) ^ 0x80808080u, static_cast<uint32_t>(wv.y) ^ 0x80808080u,
                             static_cast<uint32_t>(wv.z) ^ 0x80808080u, static_cast<uint32_t>(wv.w) ^ 0x80808080u};
#pragma unroll
  for (int w = 0; w < 4; ++w) {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      out[4 * w + j] = __uint_as_float(__byte_perm(words[w], 0x4B000000u, 0x7440u + j)) - 8388736.0f;
  }
}

// Block shape: 8 warps = WN row groups × WK slices of K. A warp owns R consecutive output channels
// of one K slice: per step each lane issues R independent 128-bit weight loads (16 int8 each, R rows
// in flight), decodes them with decode16 and multiplies them with 16 values of each of the MT rows
// of x, loaded and converted once per step and reused for all R channels (x's L1 traffic and
// conversions shrink R-fold against one warp per channel). WK > 1 splits K among the block's warps
// when N alone gives too few blocks to fill the GPU (the partial sums meet in shared memory, summed
// in a fixed order: deterministic).
//
// Traffic at M = 1, N = K = 8192: 64 MiB of weights streamed once from DRAM — the cost; x (16 KiB
// in fp16) read once from DRAM and then from L1/L2 by every warp (K·2 bytes per R channels: 1/8 of
// the weight bytes at R = 4), scales 32 KiB, y 16 KiB. At ≥ 70 % of an H200's 4.8 TB/s that is
// ≤ 20 µs; the arithmetic (decode: 2 ops a weight, 1 FMA a weight and row) stays well below the
// SM's issue rate, and R·2 loads of 16 B in flight per lane (the loop is unrolled twice) with 16
// warps an SM cover the DRAM latency.
// ------------------------------------------------------------------------------------------------

constexpr int kGemvWarps = 8;
constexpr int kGemvThreads = kGemvWarps * 32;

template <typename T, int MT, int R, int WK, bool VEC>
__global__ void __launch_bounds__(kGemvThreads)
    w8a16_gemv_kernel(const T* __restrict__ x, int m, int64_t k, int64_t ldx, const int8_t* __restrict__ q,
                      int64_t ldw, const float* __restrict__ ws, const T* __restrict__ bias, int64_t n,
                      T* __restrict__ y, int64_t ldy, int64_t kslice) {
  static_assert(MT * R <= 32, "one lane writes one (row, channel) result");
  constexpr int WN = kGemvWarps / WK;
  __shared__ float red[WK][WN * MT * R];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wn = warp % WN, wk = warp / WN;
  const int64_t ch0 = (static_cast<int64_t>(blockIdx.x) * WN + wn) * R;
  const int64_t k_lo = wk * kslice;
  const int64_t k_hi = k_lo + kslice < k ? k_lo + kslice : k;
  float s[R];
  bool valid[R], bad[R];
  bool any_bad = false;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    valid[r] = ch0 + r < n;
    s[r] = valid[r] ? ws[ch0 + r] : 0.f;
    bad[r] = valid[r] && scale_needs_float_path(s[r]);
    any_bad |= bad[r];
  }
  float acc[MT][R];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[i][r] = 0.f;
  if (VEC && !any_bad) {  // warp-uniform
#pragma unroll 2
    for (int64_t i = k_lo + lane * 16; i < k_hi; i += 32 * 16) {  // k_lo, kslice: multiples of 16
      int4 wv[R];
#pragma unroll
      for (int r = 0; r < R; ++r)
        wv[r] = valid[r] ? __ldg(reinterpret_cast<const int4*>(q + (ch0 + r) * ldw + i)) : make_int4(0, 0, 0, 0);
      float wf[R][16];
#pragma unroll
      for (int r = 0; r < R; ++r) decode16(wv[r], wf[r]);
#pragma unroll
      for (int row = 0; row < MT; ++row) {
        if (row < m) {
          float xf[16];
          load16<T>(x + row * ldx + i, xf);
#pragma unroll
          for (int r = 0; r < R; ++r)
#pragma unroll
            for (int j = 0; j < 16; ++j) acc[row][r] = fmaf(xf[j], wf[r][j], acc[row][r]);
        }
      }
    }
  } else {
    // Unaligned operands, or a channel whose scale needs the float path (Σ x·(q·s), the product
    // rounded as F.linear's weight; 1 for the other channels: exact).
    float wscale[R];
#pragma unroll
    for (int r = 0; r < R; ++r) wscale[r] = bad[r] ? s[r] : 1.f;
    for (int64_t i = k_lo + lane; i < k_hi; i += 32) {
      float wf[R];
#pragma unroll
      for (int r = 0; r < R; ++r) wf[r] = valid[r] ? static_cast<float>(q[(ch0 + r) * ldw + i]) * wscale[r] : 0.f;
#pragma unroll
      for (int row = 0; row < MT; ++row) {
        if (row < m) {
          const float xv = to_f32(x[row * ldx + i]);
#pragma unroll
          for (int r = 0; r < R; ++r) acc[row][r] = fmaf(xv, wf[r], acc[row][r]);
        }
      }
    }
  }
#pragma unroll
  for (int row = 0; row < MT; ++row)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[row][r] = warp_sum(acc[row][r]);  // every lane holds the sums
  if (WK > 1) {
    if (lane == 0) {
#pragma unroll
      for (int row = 0; row < MT; ++row)
#pragma unroll
        for (int r = 0; r < R; ++r) red[wk][(wn * MT + row) * R + r] = acc[row][r];
    }
    __syncthreads();
    if (wk != 0) return;
#pragma unroll
    for (int row = 0; row < MT; ++row)
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < WK; ++w) v += red[w][(wn * MT + row) * R + r];
        acc[row][r] = v;
      }
  }
  // Lane row·R + r writes y[row, ch0 + r]: the dequantization scale and the bias in the epilogue.
#pragma unroll
  for (int row = 0; row < MT; ++row)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (lane == row * R + r && row < m && valid[r]) {
        const float b = bias != nullptr ? to_f32(bias[ch0 + r]) : 0.f;
        const float v = acc[row][r];
        y[row * ldy + ch0 + r] = from_f32<T>(bad[r] ? v + b : fmaf(v, s[r], b));
      }
    }
}

int sm_count() {
  // Cached per device (a benign race writes the same value).
  static int counts[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 80;
  if (counts[dev] == 0) {
    int c = 0;
    cudaDeviceGetAttribute(&c, cudaDevAttrMultiProcessorCount, dev);
    counts[dev] = c > 0 ? c : 80;
  }
  return counts[dev];
}

template <typename T, int MT, int R, int WK>
cudaError_t launch_gemv_cfg(const T* x, int m, int64_t k, int64_t ldx, const int8_t* q, int64_t ldw, const float* ws,
                            const T* bias, int64_t n, T* y, int64_t ldy, cudaStream_t st) {
  constexpr int rows = (kGemvWarps / WK) * R;
  const int64_t kslice = ((k + WK - 1) / WK + 15) / 16 * 16;
  const dim3 grid(static_cast<unsigned>((n + rows - 1) / rows));
  w8a16_gemv_kernel<T, MT, R, WK, true><<<grid, kGemvThreads, 0, st>>>(x, m, k, ldx, q, ldw, ws, bias, n, y, ldy,
                                                                        kslice);
  return cudaGetLastError();
}

template <typename T, int MT, int R>
cudaError_t launch_gemv_r(const T* x, int m, int64_t k, int64_t ldx, const int8_t* q, int64_t ldw, const float* ws,
                          const T* bias, int64_t n, T* y, int64_t ldy, cudaStream_t st, int wk) {
  switch (wk) {
    case 1: return launch_gemv_cfg<T, MT, R, 1>(x, m, k, ldx, q, ldw, ws, bias, n, y, ldy, st);
    case 2: return launch_gemv_cfg<T, MT, R, 2>(x, m, k, ldx, q, ldw, ws, bias, n, y, ldy, st);
    case 4: return launch_gemv_cfg<T, MT, R, 4>(x, m, k, ldx, q, ldw, ws, bias, n, y, ldy, st);
    default: return launch_gemv_cfg<T, MT, R, 8>(x, m, k, ldx, q, ldw, ws, bias, n, y, ldy, st);
  }
}

template <typename T, int MT>
cudaError_t launch_gemv_mt(const T* x, int m, int64_t k, int64_t ldx, const int8_t* q, int64_t ldw, const float* ws,
                           const T* bias, int64_t n, T* y, int64_t ldy, cudaStream_t st) {
  const bool vec = k % 16 == 0 && ldw % 16 == 0 && ldx % 16 == 0 && reinterpret_cast<uintptr_t>(q) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(x) % 16 == 0;
  if (!vec) {  // scalar loads: one channel a warp, no K split
    const dim3 grid(static_cast<unsigned>((n + kGemvWarps - 1) / kGemvWarps));
    w8a16_gemv_kernel<T, MT, 1, 1, false><<<grid, kGemvThreads, 0, st>>>(x, m, k, ldx, q, ldw, ws, bias, n, y, ldy,
                                                                          k);
    return cudaGetLastError();
  }
  // R channels a warp (fewer registers for the wider x tiles of MT > 4); one channel a warp when
  // N is too small to give every SM a block. Then split K (WK warps a channel group) until there
  // are two blocks an SM, while each slice keeps at least two 512-byte passes of the warp.
  constexpr int kRBig = MT <= 4 ? 4 : 2;
  const int64_t target = 2 * static_cast<int64_t>(sm_count());
  const bool wide = (n + kGemvWarps * kRBig - 1) / (kGemvWarps * kRBig) >= target / 2;
  const int r = wide ? kRBig : 1;
  int wk = 1;
  while (wk < kGemvWarps && (n + (kGemvWarps / wk) * r - 1) / ((kGemvWarps / wk) * r) < target &&
         k / (2 * wk) >= 2 * 512)
    wk *= 2;
  if (wide) return launch_gemv_r<T, MT, kRBig>(x, m, k, ldx, q, ldw, ws, bias, n, y, ldy, st, wk);
  return launch_gemv_r<T, MT, 1>(x, m, k, ldx, q, ldw, ws, bias, n, y, ldy, st, wk);
}

template <typename T>
cudaError_t launch_gemv(const T* x, int m, int64_t k, int64_t ldx, const int8_t* q, int64_t ldw, const float* ws,
                        const T* bias, int64_t n, T* y, int64_t ldy, cudaStream_t st) {
  if (m <= 1) return launch_gemv_mt<T, 1>(x, m, k, ldx, q, ldw, ws, bias, n, y, ldy, st);
  if (m <= 2) return launch_gemv_mt<T, 2>(x, m, k, ldx, q, ldw, ws, bias, n, y, ldy, st);
  if (m <= 4) return launch_gemv_mt<T, 4>(x, m, k, ldx, q, ldw, ws, bias, n, y, ldy, st);
  if (m <= 8) return launch_gemv_mt<T, 8>(x, m, k, ldx, q, ldw, ws, bias, n, y, ldy, st);
  return launch_gemv_mt<T, 16>(x, m, k, ldx, q, ldw, ws, bias, n, y, ldy, st);
}

// ------------------------------------------------------------------------------------------------
// W8A8 GEMM with dp4a: 64×64 output tile per 256-thread block, 4×4 per thread, k in steps of 64
// bytes staged in shared memory as int32 words (4 consecutive k), transposed so a thread's four
// rows (or columns) are adjacent and come in one 128-bit shared-memory load.
// ------------------------------------------------------------------------------------------------

constexpr int kBM = 64, kBN = 64, kBK = 64, kWords = kBK / 4;
// Row pitch of the staged tiles in words: a multiple of 4 keeps the 128-bit reads aligned.
constexpr int kPitch = kBM + 4;
static_assert(kBM == kBN && kPitch % 4 == 0, "tile layout");
constexpr int kLoadsPerThread = kBM * kWords / 256;

template <bool VEC>
__device__ __forceinline__ int load_word(const int8_t* __restrict__ base, int64_t row, int64_t rows, int64_t ld,
                                         int64_t kk, int64_t k) {
  if (row >= rows) return 0;
  const int8_t* p = base + row * ld + kk;
  if (VEC) return kk < k ? __ldg(reinterpret_cast<const int*>(p)) : 0;
  uint32_t w = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i)
    if (kk + i < k) w |= static_cast<uint32_t>(static_cast<uint8_t>(p[i])) << (8 * i);
  return static_cast<int>(w);
}

template <typename T, bool VEC, bool INT_OUT>
__global__ void __launch_bounds__(256)
    w8a8_gemm_kernel(const int8_t* __restrict__ xq, int64_t ldq, const float* __restrict__ xs,
                     const T* __restrict__ x, int64_t ldx, const int8_t* __restrict__ q, int64_t ldw,
                     const float* __restrict__ ws, const T* __restrict__ bias, int64_t m, int64_t n, int64_t k,
                     void* __restrict__ out, int64_t ldo) {
  __shared__ __align__(16) int as[kWords][kPitch];
  __shared__ __align__(16) int bs[kWords][kPitch];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM, n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  int acc[4][4] = {};
  for (int64_t k0 = 0; k0 < k; k0 += kBK) {
    // Consecutive threads read consecutive words of one row: coalesced 4-byte global loads.
#pragma unroll
    for (int l = 0; l < kLoadsPerThread; ++l) {
      const int idx = tid + l * 256, r = idx / kWords, w = idx % kWords;
      as[w][r] = load_word<VEC>(xq, m0 + r, m, ldq, k0 + 4 * w, k);
      bs[w][r] = load_word<VEC>(q, n0 + r, n, ldw, k0 + 4 * w, k);
    }
    __syncthreads();
#pragma unroll
    for (int w = 0; w < kWords; ++w) {
      const int4 av = *reinterpret_cast<const int4*>(&as[w][ty * 4]);
      const int4 bv = *reinterpret_cast<const int4*>(&bs[w][tx * 4]);
      const int a[4] = {av.x, av.y, av.z, av.w};
      const int b[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = __dp4a(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t row = m0 + ty * 4 + i;
    if (row >= m) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t col = n0 + tx * 4 + j;
      if (col >= n) continue;
      if (INT_OUT) {
        static_cast<int32_t*>(out)[row * ldo + col] = acc[i][j];
      } else {
        const float b = bias != nullptr ? to_f32(bias[col]) : 0.f;
        const float sx = xs[row], sc = ws[col];
        const float v = !isfinite(sx) || scale_needs_float_path(sc)
                            ? float_path_dot(x + row * ldx, q + col * ldw, k, sc) + b
                            : static_cast<float>(acc[i][j]) * (sx * sc) + b;
        static_cast<T*>(out)[row * ldo + col] = from_f32<T>(v);
      }
    }
  }
}

template <typename T, bool INT_OUT>
cudaError_t launch_gemm(const int8_t* xq, int64_t ldq, const float* xs, const T* x, int64_t ldx, const int8_t* q,
                        int64_t ldw, const float* ws, const T* bias, int64_t m, int64_t n, int64_t k, void* out,
                        int64_t ldo, cudaStream_t st) {
  const bool vec = k % 4 == 0 && ldq % 4 == 0 && ldw % 4 == 0 && reinterpret_cast<uintptr_t>(xq) % 4 == 0 &&
                   reinterpret_cast<uintptr_t>(q) % 4 == 0;
  const dim3 grid(static_cast<unsigned>((n + kBN - 1) / kBN), static_cast<unsigned>((m + kBM - 1) / kBM));
  if (vec)
    w8a8_gemm_kernel<T, true, INT_OUT>
        <<<grid, 256, 0, st>>>(xq, ldq, xs, x, ldx, q, ldw, ws, bias, m, n, k, out, ldo);
  else
    w8a8_gemm_kernel<T, false, INT_OUT>
        <<<grid, 256, 0, st>>>(xq, ldq, xs, x, ldx, q, ldw, ws, bias, m, n, k, out, ldo);
  return cudaGetLastError();
}

}  // namespace

int quantize_rows(const void* x, int dtype, int64_t m, int64_t k, int64_t ldx, int8_t* xq, int64_t ldq, float* xs,
                  void* stream) {
  if (m == 0) return 0;
  auto st = static_cast<cudaStream_t>(stream);
  const dim3 grid(static_cast<unsigned>(m));
  switch (dtype) {
    case kF32: quantize_rows_kernel<float><<<grid, 256, 0, st>>>(static_cast<const float*>(x), k, ldx, xq, ldq, xs); break;
    case kF16: quantize_rows_kernel<__half><<<grid, 256, 0, st>>>(static_cast<const __half*>(x), k, ldx, xq, ldq, xs); break;
    case kBF16:
      quantize_rows_kernel<__nv_bfloat16>
          <<<grid, 256, 0, st>>>(static_cast<const __nv_bfloat16*>(x), k, ldx, xq, ldq, xs);
      break;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

int w8a16_gemv(const void* x, int dtype, int64_t m, int64_t k, int64_t ldx, const int8_t* q, int64_t ldw,
               const float* ws, const void* bias, int64_t n, void* y, int64_t ldy, void* stream) {
  if (m > kGemvMaxM) return static_cast<int>(cudaErrorInvalidValue);
  if (m == 0 || n == 0) return 0;
  auto st = static_cast<cudaStream_t>(stream);
  const int mi = static_cast<int>(m);
  switch (dtype) {
    case kF32:
      return static_cast<int>(launch_gemv<float>(static_cast<const float*>(x), mi, k, ldx, q, ldw, ws,
                                                 static_cast<const float*>(bias), n, static_cast<float*>(y), ldy, st));
    case kF16:
      return static_cast<int>(launch_gemv<__half>(static_cast<const __half*>(x), mi, k, ldx, q, ldw, ws,
                                                  static_cast<const __half*>(bias), n, static_cast<__half*>(y), ldy, st));
    case kBF16:
      return static_cast<int>(launch_gemv<__nv_bfloat16>(static_cast<const __nv_bfloat16*>(x), mi, k, ldx, q, ldw, ws,
                                                         static_cast<const __nv_bfloat16*>(bias), n,
                                                         static_cast<__nv_bfloat16*>(y), ldy, st));
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

int int8_gemm_s32(const int8_t* xq, int64_t ldq, const int8_t* q, int64_t ldw, int64_t m, int64_t n, int64_t k,
                  int32_t* out, int64_t ldo, void* stream) {
  if (m == 0 || n == 0) return 0;
  return static_cast<int>(launch_gemm<float, true>(xq, ldq, nullptr, nullptr, 0, q, ldw, nullptr, nullptr, m, n, k,
                                                   out, ldo, static_cast<cudaStream_t>(stream)));
}

int w8a8_gemm(const int8_t* xq, int64_t ldq, const float* xs, const void* x, int64_t ldx, const int8_t* q,
              int64_t ldw, const float* ws, const void* bias, int dtype, int64_t m, int64_t n, int64_t k, void* y,
              int64_t ldy, void* stream) {
  if (m == 0 || n == 0) return 0;
  auto st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kF32:
      return static_cast<int>(launch_gemm<float, false>(xq, ldq, xs, static_cast<const float*>(x), ldx, q, ldw, ws,
                                                        static_cast<const float*>(bias), m, n, k, y, ldy, st));
    case kF16:
      return static_cast<int>(launch_gemm<__half, false>(xq, ldq, xs, static_cast<const __half*>(x), ldx, q, ldw, ws,
                                                         static_cast<const __half*>(bias), m, n, k, y, ldy, st));
    case kBF16:
      return static_cast<int>(launch_gemm<__nv_bfloat16, false>(xq, ldq, xs, static_cast<const __nv_bfloat16*>(x), ldx,
                                                                 q, ldw, ws, static_cast<const __nv_bfloat16*>(bias),
                                                                 m, n, k, y, ldy, st));
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace cuda
}  // namespace tk
