// int8 matmul kernels for CUDA: plain pointers, sizes, strides and a stream (passed as void* so
// this header needs no CUDA include); no ATen. Each launcher returns a cudaError_t as int (0 = ok).
//
//   quantize_rows  per-row symmetric activation quantization, xs = max|x| / 127, xq ∈ [-127, 127]
//                  (a row holding inf/NaN: xq = 0, xs = NaN if it holds a NaN, else inf)
//   w8a16_gemv     y = x · (q · s)ᵀ + b for M ≤ 16 (decode): q streamed once, dequantized in
//                  registers, fp32 accumulation; the weight read is the whole cost
//   int8_gemm_s32  out = xq · qᵀ in int32 (dp4a), for tests
//   w8a8_gemm      y = (xq · qᵀ) · xs[m] · s[n] + b (dp4a, int32 accumulation), prefill
#pragma once

#include <cstdint>

namespace tk {
namespace cuda {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

constexpr int64_t kGemvMaxM = 16;

int quantize_rows(const void* x, int dtype, int64_t m, int64_t k, int64_t ldx, int8_t* xq, int64_t ldq, float* xs,
                  void* stream);

// bias (dtype, may be null) and y use dtype; ws is fp32.
int w8a16_gemv(const void* x, int dtype, int64_t m, int64_t k, int64_t ldx, const int8_t* q, int64_t ldw,
               const float* ws, const void* bias, int64_t n, void* y, int64_t ldy, void* stream);

int int8_gemm_s32(const int8_t* xq, int64_t ldq, const int8_t* q, int64_t ldw, int64_t m, int64_t n, int64_t k,
                  int32_t* out, int64_t ldo, void* stream);

// x (dtype, row stride ldx) is the unquantized input: rows whose xs is non-finite (x holds inf/NaN)
// and channels with a non-finite or huge scale are computed from it in float (see int8_cpu.h).
int w8a8_gemm(const int8_t* xq, int64_t ldq, const float* xs, const void* x, int64_t ldx, const int8_t* q,
              int64_t ldw, const float* ws, const void* bias, int dtype, int64_t m, int64_t n, int64_t k, void* y,
              int64_t ldy, void* stream);

}  // namespace cuda
}  // namespace tk
