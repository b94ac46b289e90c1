// int8 matmul kernels for the CPU: plain pointers, sizes and strides, no ATen.
//
// Two paths, both y[m, n] = Σ_k x[m, k] · (q[n, k] · s[n]) + b[n]:
//   * weight-only (W8A32): q is dequantized in registers, x stays fp32, fp32 accumulation.
//   * W8A8: x is quantized per row (symmetric, [-127, 127]) and the dot products run in int32
//     (AVX-512 VNNI vpdpbusd, or AVX2 vpmaddubsw/vpmaddwd, or portable C++), chosen at run time.
//
// The W8A8 path reads weights in a packed layout, built once by pack_w8:
//   packed[Np / kTileN][Kp / 4][kTileN][4]   (Np = N rounded up to kTileN, Kp = K rounded up to 4)
// so that one 64-byte load holds 16 output channels × 4 consecutive k, exactly the operand of one
// vpdpbusd, and a tile's weights stream from memory in one sequential run.
#pragma once

#include <cstdint>

namespace tk {

constexpr int64_t kTileN = 64;  // output channels per packed tile
constexpr int64_t kGroupK = 4;  // consecutive k per packed group (one int32 lane of vpdpbusd)

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
inline int64_t packed_n(int64_t n) { return round_up(n, kTileN); }
inline int64_t packed_k(int64_t k) { return round_up(k, kGroupK); }

// Instruction set used by the W8A8 and weight-only CPU kernels.
enum class CpuIsa : int { kScalar = 0, kAvx2 = 1, kAvx512Vnni = 2 };

CpuIsa cpu_isa_best();           // best the CPU supports
CpuIsa cpu_isa();                // currently selected (defaults to the best)
void set_cpu_isa(CpuIsa isa);    // caller guarantees the CPU supports it
const char* cpu_isa_name(CpuIsa isa);

// Largest |scale| the factored kernels handle: 128 · s stays finite, so every q · s does. Outputs of a
// channel with a larger or non-finite scale, and of a row of x holding inf or NaN, are computed as
// F.linear(x, q·s, b) computes them, so non-finite values land where the float path puts them.
constexpr float kMaxFastScale = 3.40282347e+38f / 128.0f;

// Largest |q| allowed in a packed weight: the AVX2 path's vpmaddubsw pairs must not saturate int16.
constexpr int kWeightMin = -127;

// Pack q (N, K; row stride ldw) into packed (packed_n(N) * packed_k(K) bytes) and wsum (packed_n(N))
// = Σ_k q[n, k]. Returns false (and writes nothing useful) if some q == -128.
bool pack_w8(const int8_t* q, int64_t n, int64_t k, int64_t ldw, int8_t* packed, int32_t* wsum);

// Per-row symmetric quantization: xs[m] = max|x[m, :]| / 127, xq = round_half_even(x · (127 / max|x|)).
// xq has row stride ldq >= packed_k(K); the columns K..packed_k(K)-1 are zero-filled. A row holding
// inf or NaN gets xq = 0 and xs = NaN if it holds a NaN, else inf.
void quantize_rows_f32(const float* x, int64_t m, int64_t k, int64_t ldx, int8_t* xq, int64_t ldq, float* xs);

// out[m, n] = Σ_k xq[m, k] · q[n, k] exactly in int32; xq rows hold packed_k(K) bytes (zero padded).
void gemm_s8s8_s32_packed(const int8_t* xq, int64_t m, int64_t k, int64_t ldq, const int8_t* packed,
                          const int32_t* wsum, int64_t n, int32_t* out, int64_t ldo);

// W8A8 linear: quantizes x per row, int32 GEMM, y = acc · xs[m] · ws[n] + bias[n] (bias may be null).
void w8a8_linear_f32(const float* x, int64_t m, int64_t k, int64_t ldx, const int8_t* packed,
                     const int32_t* wsum, const float* ws, const float* bias, int64_t n, float* y, int64_t ldy);

// Weight-only linear on the unpacked q (N, K; row stride ldw, unit column stride).
void w8a32_linear_f32(const float* x, int64_t m, int64_t k, int64_t ldx, const int8_t* q, int64_t ldw,
                      const float* ws, const float* bias, int64_t n, float* y, int64_t ldy);

}  // namespace tk
