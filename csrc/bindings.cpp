// Every input is checked with TORCH_CHECK_VALUE (a ValueError in Python) before a kernel sees it.
// Registers the int8 ops as torch.ops.tape_kernels.* (TORCH_LIBRARY, so torch.library.opcheck and
// torch.compile see them) and a few plain helpers on the tape_kernels._C module. The kernels live
// in int8_cpu.cpp / int8_cuda.cu and see only pointers, sizes and strides.
#include <torch/extension.h>
#include <torch/library.h>

#include <cmath>
#include <string>

#include "decode_cpu.h"
#include "int8_cpu.h"
#ifdef TK_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "int8_cuda.h"
#endif

namespace {

using at::Tensor;

void check_2d(const Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.stride(1) == 1, name, " must have unit stride in its last dim");
}

void check_vec(const Tensor& t, const char* name, at::ScalarType dtype, int64_t n, const Tensor& like) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, name, " must have shape (", n, "), got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " is on ", t.device(), " but the input is on ", like.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

void check_packed(const Tensor& packed, const Tensor& wsum, int64_t n, int64_t k) {
  TORCH_CHECK_VALUE(packed.scalar_type() == at::kChar && packed.is_contiguous() && packed.dim() == 4 &&
                  packed.size(0) == tk::packed_n(n) / tk::kTileN && packed.size(1) == tk::packed_k(k) / tk::kGroupK &&
                  packed.size(2) == tk::kTileN && packed.size(3) == tk::kGroupK,
              "packed must be the contiguous int8 (", tk::packed_n(n) / tk::kTileN, ", ",
              tk::packed_k(k) / tk::kGroupK, ", ", tk::kTileN, ", ", tk::kGroupK,
              ") tensor from pack_int8_weight for N=", n, ", K=", k, "; got ", packed.scalar_type(), " ",
              packed.sizes());
  TORCH_CHECK_VALUE(packed.device().is_cpu(), "packed weights are CPU-only");
  check_vec(wsum, "wsum", at::kInt, tk::packed_n(n), packed);
}

// --------------------------------------------------------------------------------------------- CPU

// A linear op's output y (..., M, N) needs no kernel when it is empty or K = 0 (y = bias, broadcast
// over the rows, or 0); fills y then and returns true. bias is (..., N) like y without its M dim.
bool trivial_linear(Tensor& y, const c10::optional<Tensor>& bias, int64_t k) {
  if (y.numel() == 0) return true;
  if (k != 0) return false;
  if (bias.has_value()) {
    y.copy_(bias->unsqueeze(-2).expand(y.sizes()));
  } else {
    y.zero_();
  }
  return true;
}

std::tuple<Tensor, Tensor> pack_int8_weight_cpu(const Tensor& qweight) {
  check_2d(qweight, "qweight", at::kChar);
  const int64_t n = qweight.size(0), k = qweight.size(1);
  auto packed = at::empty({tk::packed_n(n) / tk::kTileN, tk::packed_k(k) / tk::kGroupK, tk::kTileN, tk::kGroupK},
                          qweight.options());
  auto wsum = at::empty({tk::packed_n(n)}, qweight.options().dtype(at::kInt));
  const bool ok = tk::pack_w8(qweight.data_ptr<int8_t>(), n, k, qweight.stride(0), packed.data_ptr<int8_t>(),
                              wsum.data_ptr<int32_t>());
  TORCH_CHECK_VALUE(ok, "qweight holds -128; int8 weights must lie in [-127, 127] (symmetric quantization)");
  return {packed, wsum};
}

std::tuple<Tensor, Tensor> quantize_rows_cpu(const Tensor& x) {
  check_2d(x, "x", at::kFloat);
  const int64_t m = x.size(0), k = x.size(1);
  auto xq = at::empty({m, k}, x.options().dtype(at::kChar));
  auto xs = at::empty({m}, x.options());
  if (m > 0 && k > 0) {
    // The kernel zero-fills its rows up to a multiple of 4; quantize into such rows, then view.
    const int64_t kp = tk::packed_k(k);
    auto buf = at::empty({m, kp}, xq.options());
    tk::quantize_rows_f32(x.data_ptr<float>(), m, k, x.stride(0), buf.data_ptr<int8_t>(), kp, xs.data_ptr<float>());
    xq.copy_(buf.narrow(1, 0, k));
  } else {
    xs.zero_();
  }
  return {xq, xs};
}

// xq (M, K) as contiguous rows of packed_k(K) bytes with zero padding, as the packed kernels need.
Tensor padded_rows(const Tensor& xq) {
  const int64_t k = xq.size(1), kp = tk::packed_k(k);
  if (kp == k && xq.is_contiguous()) return xq;
  auto buf = at::zeros({xq.size(0), kp}, xq.options());
  buf.narrow(1, 0, k).copy_(xq);
  return buf;
}

Tensor int8_mm_packed_cpu(const Tensor& xq, const Tensor& packed, const Tensor& wsum, int64_t n) {
  check_2d(xq, "xq", at::kChar);
  TORCH_CHECK_VALUE(n >= 0, "n must be >= 0");
  const int64_t m = xq.size(0), k = xq.size(1);
  check_packed(packed, wsum, n, k);
  auto out = at::empty({m, n}, xq.options().dtype(at::kInt));
  if (m == 0 || n == 0) return out;
  if (k == 0) return out.zero_();
  auto xp = padded_rows(xq);
  tk::gemm_s8s8_s32_packed(xp.data_ptr<int8_t>(), m, k, xp.stride(0), packed.data_ptr<int8_t>(),
                           wsum.data_ptr<int32_t>(), n, out.data_ptr<int32_t>(), n);
  return out;
}

Tensor int8_mm_cpu(const Tensor& xq, const Tensor& qweight) {
  check_2d(qweight, "qweight", at::kChar);
  check_2d(xq, "xq", at::kChar);
  TORCH_CHECK_VALUE(xq.size(1) == qweight.size(1), "xq has K=", xq.size(1), " but qweight has K=", qweight.size(1));
  auto [packed, wsum] = pack_int8_weight_cpu(qweight);
  return int8_mm_packed_cpu(xq, packed, wsum, qweight.size(0));
}

Tensor w8a8_linear_packed_cpu(const Tensor& x, const Tensor& packed, const Tensor& wsum, const Tensor& scale,
                              const c10::optional<Tensor>& bias) {
  check_2d(x, "x", at::kFloat);
  TORCH_CHECK_VALUE(scale.dim() == 1, "scale must be 1-D, got shape ", scale.sizes());
  const int64_t m = x.size(0), k = x.size(1), n = scale.size(0);
  check_vec(scale, "scale", at::kFloat, n, x);
  check_packed(packed, wsum, n, k);
  const float* bp = nullptr;
  if (bias.has_value()) {
    check_vec(*bias, "bias", at::kFloat, n, x);
    bp = bias->data_ptr<float>();
  }
  auto y = at::empty({m, n}, x.options());
  if (trivial_linear(y, bias, k)) return y;
  tk::w8a8_linear_f32(x.data_ptr<float>(), m, k, x.stride(0), packed.data_ptr<int8_t>(), wsum.data_ptr<int32_t>(),
                      scale.data_ptr<float>(), bp, n, y.data_ptr<float>(), n);
  return y;
}

Tensor w8a8_linear_cpu(const Tensor& x, const Tensor& qweight, const Tensor& scale, const c10::optional<Tensor>& bias) {
  check_2d(qweight, "qweight", at::kChar);
  check_2d(x, "x", at::kFloat);
  TORCH_CHECK_VALUE(x.size(1) == qweight.size(1), "x has K=", x.size(1), " but qweight has K=", qweight.size(1));
  TORCH_CHECK_VALUE(scale.dim() == 1 && scale.size(0) == qweight.size(0), "scale must have shape (", qweight.size(0), ")");
  auto [packed, wsum] = pack_int8_weight_cpu(qweight);
  return w8a8_linear_packed_cpu(x, packed, wsum, scale, bias);
}

Tensor w8_linear_cpu(const Tensor& x, const Tensor& qweight, const Tensor& scale, const c10::optional<Tensor>& bias) {
  check_2d(x, "x", at::kFloat);
  check_2d(qweight, "qweight", at::kChar);
  const int64_t m = x.size(0), k = x.size(1), n = qweight.size(0);
  TORCH_CHECK_VALUE(qweight.size(1) == k, "x has K=", k, " but qweight has K=", qweight.size(1));
  TORCH_CHECK_VALUE(qweight.device() == x.device(), "qweight is on ", qweight.device(), " but x is on ", x.device());
  check_vec(scale, "scale", at::kFloat, n, x);
  const float* bp = nullptr;
  if (bias.has_value()) {
    check_vec(*bias, "bias", at::kFloat, n, x);
    bp = bias->data_ptr<float>();
  }
  auto y = at::empty({m, n}, x.options());
  if (trivial_linear(y, bias, k)) return y;
  tk::w8a32_linear_f32(x.data_ptr<float>(), m, k, x.stride(0), qweight.data_ptr<int8_t>(), qweight.stride(0),
                       scale.data_ptr<float>(), bp, n, y.data_ptr<float>(), n);
  return y;
}

// ----------------------------------------------------------------------------- CPU decode step

// A decode plan: the weights of every evaluated block, checked and turned into pointers once (per
// generate() call), so that a decode step receives one object instead of ~150 tensors. It holds
// the tensors, which keeps them alive while the plan lives. Layout (tapetransformer/native_decode.py
// builds it):
//   config  = [D, H, V, seq_len, causal, kind (0 fp32, 1 W8A8, 2 weight-only int8), n_heads,
//              layers_0, mode_0, layers_1, mode_1, ...]        (head 0 is the coda)
//   floats  = [df, then per block: ln_attn eps, ln_mlp eps]
//   tensors = [embedding (V, D), unembedding (D, V), Σ_d unembedding² (V), pos (2, seq_len, D),
//              rope cos (2, seq_len, D/2), rope sin (2, seq_len, D/2)]   (pos/rope: the coda's first
//              left and right blocks), then per block, in kv order (head, layer, side), 19 tensors:
//              in_proj bias (3D), out_proj bias (D), expand bias (E), ln_attn w, b, ln_mlp w, b (D),
//              then 3 slots for each of in_proj, out_proj, expand, linear:
//              fp32 (weight (N, K), -, -); W8A8 (packed, wsum, scale); int8 (qweight (N, K), scale, -)
//              where "-" is any (e.g. empty) tensor, ignored.
// The seed design (decode_step_seed) appends [1, rnn_layers, hidden] to config, the final_norm eps to
// floats, and to tensors, all fp32: per prophet layer W_i (2Hd, in) = [left; right], b_i (2Hd), W_h
// (2Hd, Hd), b_h (2Hd) (in = D for layer 0, Hd above); then rnn_projection weight (D, Hd) and bias
// (D), merge_projection (D, 2D), final_norm weight (n_critics·D), merge_projection_final (D,
// n_critics·D), merger.proj (D, 2D).
struct DecodePlan : torch::CustomClassHolder {
  static constexpr int64_t kGlobal = 6, kPerBlock = 19;
  std::vector<Tensor> tensors;
  std::vector<int64_t> config;
  std::vector<double> floats;
  tk::decode::Plan plan;

  DecodePlan(std::vector<Tensor> t, std::vector<int64_t> c, std::vector<double> f)
      : tensors(std::move(t)), config(std::move(c)), floats(std::move(f)) {
    build();
  }

  int64_t n_blocks() const { return plan.n_blocks(); }

 private:
  const float* f32(int64_t i, const char* what, std::initializer_list<int64_t> shape) const {
    const Tensor& t = tensors.at(static_cast<size_t>(i));
    TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat && t.device().is_cpu() && t.is_contiguous() &&
                          t.sizes() == at::IntArrayRef(shape),
                      "decode plan: ", what, " (tensor ", i, ") must be a contiguous float32 CPU tensor of shape ",
                      at::IntArrayRef(shape), ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
    return t.data_ptr<float>();
  }

  template <class T>
  const T* typed(int64_t i, const char* what, at::ScalarType dt, std::initializer_list<int64_t> shape) const {
    const Tensor& t = tensors.at(static_cast<size_t>(i));
    TORCH_CHECK_VALUE(t.scalar_type() == dt && t.device().is_cpu() && t.is_contiguous() &&
                          t.sizes() == at::IntArrayRef(shape),
                      "decode plan: ", what, " (tensor ", i, ") must be a contiguous ", dt, " CPU tensor of shape ",
                      at::IntArrayRef(shape), ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
    return t.data_ptr<T>();
  }

  void linear(tk::decode::Linear& l, int64_t i, const char* what, int64_t n, int64_t k, const float* bias) {
    l.n = n;
    l.k = k;
    l.bias = bias;
    switch (plan.kind) {
      case tk::decode::Weights::kF32: l.w = f32(i, what, {n, k}); break;
      case tk::decode::Weights::kW8A8:
        l.packed = typed<int8_t>(i, what, at::kChar,
                                 {tk::packed_n(n) / tk::kTileN, tk::packed_k(k) / tk::kGroupK, tk::kTileN, tk::kGroupK});
        l.wsum = typed<int32_t>(i + 1, what, at::kInt, {tk::packed_n(n)});
        l.scale = f32(i + 2, what, {n});
        break;
      case tk::decode::Weights::kW8:
        l.q = typed<int8_t>(i, what, at::kChar, {n, k});
        l.scale = f32(i + 1, what, {n});
        break;
    }
  }

  void build() {
    TORCH_CHECK_VALUE(config.size() >= 9, "decode plan: config too short");
    const int64_t d = config[0], h = config[1], v = config[2], seq = config[3];
    TORCH_CHECK_VALUE(d > 0 && h > 0 && d % h == 0 && d % 2 == 0, "decode plan: bad D=", d, " / H=", h);
    TORCH_CHECK_VALUE(v > 0 && seq > 0, "decode plan: bad vocab ", v, " or seq_len ", seq);
    TORCH_CHECK_VALUE(config[5] >= 0 && config[5] <= 2, "decode plan: kind must be 0, 1 or 2");
    plan.d = d;
    plan.heads = h;
    plan.vocab = v;
    plan.seq_len = seq;
    plan.causal = config[4] != 0;
    plan.kind = static_cast<tk::decode::Weights>(config[5]);
    const int64_t nh = config[6];
    const int64_t base = 7 + 2 * nh;
    TORCH_CHECK_VALUE(nh >= 1 && (static_cast<int64_t>(config.size()) == base ||
                                  static_cast<int64_t>(config.size()) == base + 3),
                      "decode plan: config must list (layers, mode) for each of its ", nh,
                      " heads (then, for the seed design, [1, rnn_layers, hidden])");
    plan.seed_design = static_cast<int64_t>(config.size()) == base + 3;
    for (int64_t i = 0; i < nh; ++i) {
      tk::decode::Head hd;
      hd.layers = config[7 + 2 * i];
      hd.mode = static_cast<int>(config[8 + 2 * i]);
      TORCH_CHECK_VALUE(hd.layers >= 1 && hd.mode >= 0 && hd.mode <= 2, "decode plan: bad head ", i);
      plan.eval_heads.push_back(hd);
    }
    const int64_t nb = plan.n_blocks();
    int64_t rl = 0, hd = 0;
    if (plan.seed_design) {
      rl = config[static_cast<size_t>(base + 1)];
      hd = config[static_cast<size_t>(base + 2)];
      TORCH_CHECK_VALUE(config[static_cast<size_t>(base)] == 1 && rl >= 1 && hd >= 1 && nh >= 2,
                        "decode plan: bad seed-design config (need [1, rnn_layers >= 1, hidden >= 1] and a critic)");
    }
    const int64_t n_tensors = kGlobal + kPerBlock * nb + (plan.seed_design ? 4 * rl + 6 : 0);
    const int64_t n_floats = 1 + 2 * nb + (plan.seed_design ? 1 : 0);
    TORCH_CHECK_VALUE(static_cast<int64_t>(tensors.size()) == n_tensors, "decode plan: expected ", n_tensors,
                      " tensors, got ", tensors.size());
    TORCH_CHECK_VALUE(static_cast<int64_t>(floats.size()) == n_floats, "decode plan: expected ", n_floats,
                      " floats, got ", floats.size());
    plan.df = static_cast<float>(floats[0]);
    plan.embedding = f32(0, "embedding", {v, d});
    plan.unembedding = f32(1, "unembedding", {d, v});
    plan.unembedding_sq = f32(2, "unembedding_sq", {v});
    const float* pos = f32(3, "pos", {2, seq, d});
    const float* cs = f32(4, "rope_cos", {2, seq, d / 2});
    const float* sn = f32(5, "rope_sin", {2, seq, d / 2});
    for (int s = 0; s < 2; ++s) {
      plan.pos[s] = pos + s * seq * d;
      plan.rope_cos[s] = cs + s * seq * (d / 2);
      plan.rope_sin[s] = sn + s * seq * (d / 2);
    }
    const int64_t e = tensors.at(kGlobal + 2).numel();  // the expand width (8·D in the model)
    TORCH_CHECK_VALUE(e > 0, "decode plan: empty expand bias");
    plan.blocks.resize(static_cast<size_t>(nb));
    for (int64_t i = 0; i < nb; ++i) {
      tk::decode::Block& bk = plan.blocks[static_cast<size_t>(i)];
      const int64_t o = kGlobal + kPerBlock * i;
      const float* in_b = f32(o, "in_proj bias", {3 * d});
      const float* out_b = f32(o + 1, "out_proj bias", {d});
      bk.expand_bias = f32(o + 2, "expand bias", {e});
      bk.ln_attn_w = f32(o + 3, "ln_attn weight", {d});
      bk.ln_attn_b = f32(o + 4, "ln_attn bias", {d});
      bk.ln_mlp_w = f32(o + 5, "ln_mlp weight", {d});
      bk.ln_mlp_b = f32(o + 6, "ln_mlp bias", {d});
      bk.ln_attn_eps = static_cast<float>(floats[static_cast<size_t>(1 + 2 * i)]);
      bk.ln_mlp_eps = static_cast<float>(floats[static_cast<size_t>(2 + 2 * i)]);
      linear(bk.in_proj, o + 7, "in_proj weight", 3 * d, d, in_b);
      linear(bk.out_proj, o + 10, "out_proj weight", d, d, out_b);
      linear(bk.expand, o + 13, "expand weight", e, d, nullptr);
      linear(bk.linear, o + 16, "linear weight", d, e, nullptr);
    }
    if (plan.seed_design) build_seed(kGlobal + kPerBlock * nb, nh - 1, rl, hd);
  }

  // An fp32 linear of the seed design: weight (n, k) at tensor i, bias at bi (or none: -1).
  tk::decode::Linear f32_linear(int64_t i, int64_t bi, const char* what, int64_t n, int64_t k) const {
    tk::decode::Linear l;
    l.n = n;
    l.k = k;
    l.w = f32(i, what, {n, k});
    l.bias = bi >= 0 ? f32(bi, what, {n}) : nullptr;
    return l;
  }

  void build_seed(int64_t o, int64_t critics, int64_t layers, int64_t hd) {
    const int64_t d = plan.d;
    tk::decode::Seed& sd = plan.seed;
    sd.layers = layers;
    sd.hidden = hd;
    for (int64_t l = 0; l < layers; ++l, o += 4) {
      sd.wi.push_back(f32_linear(o, o + 1, "prophet W_i / b_i", 2 * hd, l == 0 ? d : hd));
      sd.wh.push_back(f32_linear(o + 2, o + 3, "prophet W_h / b_h", 2 * hd, hd));
    }
    sd.rnn_projection = f32_linear(o, o + 1, "rnn_projection", d, hd);
    sd.merge_projection = f32_linear(o + 2, -1, "merge_projection", d, 2 * d);
    sd.final_norm_w = f32(o + 3, "final_norm weight", {critics * d});
    sd.merge_final = f32_linear(o + 4, -1, "merge_projection_final", d, critics * d);
    sd.merger = f32_linear(o + 5, -1, "merger.proj", d, 2 * d);
    sd.final_norm_eps = static_cast<float>(floats.back());
  }
};

// The decode step's fp32 pieces on their own, for tests and benchmarks (single-threaded):
// y = x·wᵀ + bias through its GEMV, and its bounded activation of x + bias.
Tensor decode_linear_f32_cpu(const Tensor& x, const Tensor& w, const c10::optional<Tensor>& bias) {
  check_2d(x, "x", at::kFloat);
  check_2d(w, "w", at::kFloat);
  TORCH_CHECK_VALUE(w.is_contiguous(), "w must be contiguous");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  TORCH_CHECK_VALUE(w.size(1) == k, "x has K=", k, " but w has K=", w.size(1));
  const float* bp = nullptr;
  if (bias.has_value()) {
    check_vec(*bias, "bias", at::kFloat, n, x);
    bp = bias->data_ptr<float>();
  }
  auto y = at::empty({m, n}, x.options());
  if (trivial_linear(y, bias, k)) return y;
  tk::decode::linear_f32(x.data_ptr<float>(), m, k, x.stride(0), w.data_ptr<float>(), bp, n, y.data_ptr<float>(), n);
  return y;
}

// The Char-RNN's training recurrence, one layer (tape_kernels.charrnn: the CPU's CharRNNFunction).
void check_f32_cpu(const Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat, name, " must have dtype float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

// p (B, S, 2Hd), wh (2Hd, Hd), h0 (B, Hd) -> hs (B, S + 1, Hd) with hs[:, 0] = h0, z (B, S, 2Hd).
std::tuple<Tensor, Tensor> charrnn_forward_cpu(const Tensor& p, const Tensor& wh, const Tensor& h0) {
  check_f32_cpu(p, "p", 3);
  check_f32_cpu(wh, "wh", 2);
  check_f32_cpu(h0, "h0", 2);
  const int64_t b = p.size(0), s = p.size(1), hd = wh.size(1);
  TORCH_CHECK_VALUE(wh.size(0) == 2 * hd && p.size(2) == 2 * hd && h0.size(0) == b && h0.size(1) == hd,
                    "charrnn_forward: p ", p.sizes(), ", wh ", wh.sizes(), " and h0 ", h0.sizes(),
                    " do not fit (B, S, 2Hd), (2Hd, Hd), (B, Hd)");
  auto hs = at::empty({b, s + 1, hd}, p.options());
  auto z = at::empty({b, s, 2 * hd}, p.options());
  hs.select(1, 0).copy_(h0);
  if (b > 0 && s > 0 && hd > 0)
    tk::decode::charrnn_layer_forward(p.data_ptr<float>(), wh.data_ptr<float>(), b, s, hd, hs.data_ptr<float>(),
                                      z.data_ptr<float>(), at::get_num_threads());
  return {hs, z};
}

// dout (B, S, Hd), dlast (B, Hd), z (B, S, 2Hd), wh (2Hd, Hd) -> dz (B, S, 2Hd).
Tensor charrnn_backward_cpu(const Tensor& dout, const Tensor& dlast, const Tensor& z, const Tensor& wh) {
  check_f32_cpu(dout, "dout", 3);
  check_f32_cpu(dlast, "dlast", 2);
  check_f32_cpu(z, "z", 3);
  check_f32_cpu(wh, "wh", 2);
  const int64_t b = z.size(0), s = z.size(1), hd = wh.size(1);
  TORCH_CHECK_VALUE(wh.size(0) == 2 * hd && z.size(2) == 2 * hd && dout.size(0) == b && dout.size(1) == s &&
                        dout.size(2) == hd && dlast.size(0) == b && dlast.size(1) == hd,
                    "charrnn_backward: dout ", dout.sizes(), ", dlast ", dlast.sizes(), ", z ", z.sizes(), " and wh ",
                    wh.sizes(), " do not fit (B, S, Hd), (B, Hd), (B, S, 2Hd), (2Hd, Hd)");
  auto dz = at::empty_like(z);
  if (dz.numel() > 0)
    tk::decode::charrnn_layer_backward(dout.data_ptr<float>(), dlast.data_ptr<float>(), z.data_ptr<float>(),
                                       wh.data_ptr<float>(), b, s, hd, dz.data_ptr<float>(), at::get_num_threads());
  return dz;
}

Tensor decode_activation_cpu(const Tensor& x, const c10::optional<Tensor>& bias) {
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat, "x must have dtype float32, got ", x.scalar_type());
  auto y = x.contiguous().clone();
  if (y.numel() == 0) return y;
  const int64_t n = y.size(-1), rows = y.numel() / n;
  const float* bp = nullptr;
  if (bias.has_value()) {
    check_vec(*bias, "bias", at::kFloat, n, x);
    bp = bias->data_ptr<float>();
  }
  for (int64_t r = 0; r < rows; ++r) tk::decode::activation_f32(y.data_ptr<float>() + r * n, bp, n);
  return y;
}

// logp (B, S, V) for tokens tok (B, S) — or (B,), S = 1: a decode step — at cache rows t0..t0+S-1 of
// kv (n_blocks, 2, B, H, capacity, D/H), which it writes (those rows of every block's K and V).
Tensor decode_step_impl(const c10::intrusive_ptr<DecodePlan>& plan, const Tensor& tok, const Tensor& kv, int64_t t0,
                        const Tensor* rnn) {
  const tk::decode::Plan& p = plan->plan;
  TORCH_CHECK_VALUE(p.seed_design == (rnn != nullptr),
                    p.seed_design ? "this plan is of the seed design: call decode_step_seed with the prophet's state"
                                  : "decode_step_seed needs a plan of the seed design");
  TORCH_CHECK_VALUE((tok.dim() == 1 || tok.dim() == 2) && tok.size(0) >= 1 && (tok.dim() == 1 || tok.size(1) >= 1),
                    "tok must be (B,) or (B, S) with B, S >= 1, got shape ", tok.sizes());
  TORCH_CHECK_VALUE(tok.scalar_type() == at::kLong, "tok must have dtype int64, got ", tok.scalar_type());
  TORCH_CHECK_VALUE(tok.device().is_cpu(), "tok must be on the CPU, got ", tok.device());
  const int64_t b = tok.size(0), s = tok.dim() == 2 ? tok.size(1) : 1, dh = p.d / p.heads;
  TORCH_CHECK_VALUE(kv.scalar_type() == at::kFloat, "kv must have dtype float32, got ", kv.scalar_type());
  TORCH_CHECK_VALUE(kv.device().is_cpu(), "kv must be on the CPU, got ", kv.device());
  TORCH_CHECK_VALUE(kv.dim() == 6 && kv.size(0) == p.n_blocks() && kv.size(1) == 2 && kv.size(2) == b &&
                        kv.size(3) == p.heads && kv.size(4) >= 1 && kv.size(5) == dh,
                    "kv must have shape (", p.n_blocks(), ", 2, ", b, ", ", p.heads, ", capacity, ", dh,
                    ") for this plan and B=", b, ", got ", kv.sizes());
  TORCH_CHECK_VALUE(kv.is_contiguous(), "kv must be contiguous");
  const int64_t cap = kv.size(4);
  TORCH_CHECK_VALUE(t0 >= 0 && t0 + s <= cap, "t0=", t0, " with ", s, " new token(s) must fit the capacity ", cap,
                    " of kv (t0 must lie in [0, ", cap - s + 1, "))");
  TORCH_CHECK_VALUE(p.causal ? t0 + s <= p.seq_len : s <= p.seq_len, "t0=", t0, " with ", s,
                    " new token(s): positions must stay below seq_len=", p.seq_len,
                    p.causal ? " (a causal model decodes absolute positions)" : "");
  auto tc = tok.contiguous();
  const int64_t* ids = tc.data_ptr<int64_t>();
  for (int64_t i = 0; i < b * s; ++i)
    TORCH_CHECK_VALUE(ids[i] >= 0 && ids[i] < p.vocab, "tok holds token id ", ids[i], " out of range [0, ", p.vocab,
                      ")");
  float* rp = nullptr;
  if (rnn != nullptr) {
    const int64_t rl = p.seed.layers, hd = p.seed.hidden;
    TORCH_CHECK_VALUE(rnn->scalar_type() == at::kFloat && rnn->device().is_cpu() && rnn->is_contiguous() &&
                          rnn->dim() >= 3 && rnn->size(0) == rl && rnn->size(1) == b && rnn->size(-1) == hd &&
                          rnn->numel() == rl * b * hd,
                      "rnn (the prophet's state) must be a contiguous float32 CPU tensor of shape (", rl, ", ", b,
                      ", ", hd, ") or (", rl, ", ", b, ", 1, ", hd, "), got ", rnn->scalar_type(), " ", rnn->sizes(),
                      " on ", rnn->device());
    rp = rnn->data_ptr<float>();
  }
  auto logp = at::empty({b, s, p.vocab}, kv.options());
  tk::decode::decode_step(p, ids, b, s, kv.data_ptr<float>(), cap, t0, logp.data_ptr<float>(), at::get_num_threads(),
                          rp);
  return logp;
}

Tensor decode_step_cpu(const c10::intrusive_ptr<DecodePlan>& plan, const Tensor& tok, const Tensor& kv, int64_t t0) {
  return decode_step_impl(plan, tok, kv, t0, nullptr);
}

// The seed design's step: as decode_step, and the prophet's state rnn (layers, B[, 1], Hd) advanced
// over the new tokens in place.
Tensor decode_step_seed_cpu(const c10::intrusive_ptr<DecodePlan>& plan, const Tensor& tok, const Tensor& kv,
                            const Tensor& rnn, int64_t t0) {
  return decode_step_impl(plan, tok, kv, t0, &rnn);
}

// Next ids (B,) from logp (B, V) or (B, 1, V), the last row: greedy when state is None, else
// tape_kernels.sampling's exponential race at fp32(inv_temp) restricted to the top_k largest
// (top_k <= 0: all), state ([seed, step] int64) advanced by one. A row holding NaN or +inf gets -1.
Tensor sample_next_cpu(const Tensor& logp, const c10::optional<Tensor>& state, double inv_temp, int64_t top_k) {
  TORCH_CHECK_VALUE(logp.scalar_type() == at::kFloat && logp.device().is_cpu(),
                    "logp must be a float32 CPU tensor, got ", logp.scalar_type(), " on ", logp.device());
  TORCH_CHECK_VALUE((logp.dim() == 2 || logp.dim() == 3) && logp.numel() > 0, "logp must be (B, V) or (B, S, V), got ",
                    logp.sizes());
  auto rows = (logp.dim() == 3 ? logp.select(1, logp.size(1) - 1) : logp).contiguous();
  const int64_t b = rows.size(0), v = rows.size(1);
  auto out = at::empty({b}, logp.options().dtype(at::kLong));
  uint64_t seed = 0, step = 0;
  float it = 0.f;
  if (state.has_value()) {
    TORCH_CHECK_VALUE(state->scalar_type() == at::kLong && state->device().is_cpu() && state->dim() == 1 &&
                          state->size(0) == 2 && state->is_contiguous(),
                      "state must be the contiguous (2,) int64 CPU tensor [seed, step], got ", state->scalar_type(),
                      " ", state->sizes());
    TORCH_CHECK_VALUE(inv_temp > 0 && std::isfinite(inv_temp), "inv_temp must be finite and > 0, got ", inv_temp);
    int64_t* st = state->data_ptr<int64_t>();
    seed = static_cast<uint64_t>(st[0]);
    step = static_cast<uint64_t>(st[1]);
    it = static_cast<float>(inv_temp);
    st[1] += 1;
  }
  tk::decode::sample_rows(rows.data_ptr<float>(), b, v, v, it, state.has_value() ? top_k : 0, seed, step,
                          out.data_ptr<int64_t>());
  return out;
}

// -------------------------------------------------------------------------------------------- CUDA
#ifdef TK_WITH_CUDA

int cuda_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return tk::cuda::kF32;
    case at::kHalf: return tk::cuda::kF16;
    case at::kBFloat16: return tk::cuda::kBF16;
    default: TORCH_CHECK_VALUE(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return -1;
}

void check_cuda(int err, const char* what) {
  TORCH_CHECK(err == 0, what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

void check_float_2d(const Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.dim() == 2, name, " must be 2-D, got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.stride(1) == 1, name, " must have unit stride in its last dim");
  cuda_dtype(x, name);
}

std::tuple<Tensor, Tensor> quantize_rows_cuda(const Tensor& x) {
  check_float_2d(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0), k = x.size(1);
  auto xq = at::empty({m, k}, x.options().dtype(at::kChar));
  auto xs = at::empty({m}, x.options().dtype(at::kFloat));
  if (m == 0) return {xq, xs};
  check_cuda(tk::cuda::quantize_rows(x.data_ptr(), cuda_dtype(x, "x"), m, k, x.stride(0), xq.data_ptr<int8_t>(), k,
                                     xs.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream()),
             "quantize_rows");
  return {xq, xs};
}

Tensor int8_mm_cuda(const Tensor& xq, const Tensor& qweight) {
  check_2d(xq, "xq", at::kChar);
  check_2d(qweight, "qweight", at::kChar);
  TORCH_CHECK_VALUE(xq.size(1) == qweight.size(1), "xq has K=", xq.size(1), " but qweight has K=", qweight.size(1));
  TORCH_CHECK_VALUE(xq.device() == qweight.device(), "qweight is on ", qweight.device(), " but xq is on ", xq.device());
  const c10::cuda::CUDAGuard guard(xq.device());
  const int64_t m = xq.size(0), n = qweight.size(0), k = xq.size(1);
  auto out = at::zeros({m, n}, xq.options().dtype(at::kInt));
  if (k == 0) return out;
  check_cuda(tk::cuda::int8_gemm_s32(xq.data_ptr<int8_t>(), xq.stride(0), qweight.data_ptr<int8_t>(),
                                     qweight.stride(0), m, n, k, out.data_ptr<int32_t>(), n,
                                     c10::cuda::getCurrentCUDAStream().stream()),
             "int8_mm");
  return out;
}

void check_linear_cuda(const Tensor& x, const Tensor& qweight, const Tensor& scale, const c10::optional<Tensor>& bias) {
  check_float_2d(x, "x");
  check_2d(qweight, "qweight", at::kChar);
  TORCH_CHECK_VALUE(qweight.size(1) == x.size(1), "x has K=", x.size(1), " but qweight has K=", qweight.size(1));
  TORCH_CHECK_VALUE(qweight.device() == x.device(), "qweight is on ", qweight.device(), " but x is on ", x.device());
  check_vec(scale, "scale", at::kFloat, qweight.size(0), x);
  if (bias.has_value()) check_vec(*bias, "bias", x.scalar_type(), qweight.size(0), x);
}

Tensor w8a8_linear_cuda(const Tensor& x, const Tensor& qweight, const Tensor& scale,
                        const c10::optional<Tensor>& bias) {
  check_linear_cuda(x, qweight, scale, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0), k = x.size(1), n = qweight.size(0);
  auto y = at::empty({m, n}, x.options());
  if (trivial_linear(y, bias, k)) return y;
  auto [xq, xs] = quantize_rows_cuda(x);
  check_cuda(tk::cuda::w8a8_gemm(xq.data_ptr<int8_t>(), k, xs.data_ptr<float>(), x.data_ptr(), x.stride(0),
                                 qweight.data_ptr<int8_t>(), qweight.stride(0), scale.data_ptr<float>(),
                                 bias.has_value() ? bias->data_ptr() : nullptr, cuda_dtype(x, "x"), m, n, k,
                                 y.data_ptr(), n, c10::cuda::getCurrentCUDAStream().stream()),
             "w8a8_gemm");
  return y;
}

Tensor w8_linear_cuda(const Tensor& x, const Tensor& qweight, const Tensor& scale, const c10::optional<Tensor>& bias) {
  check_linear_cuda(x, qweight, scale, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0), k = x.size(1), n = qweight.size(0);
  if (m > tk::cuda::kGemvMaxM) {
    // Prefill is compute-bound: dequantize once and let cuBLAS run the GEMM. In fp32 whatever x's
    // dtype, as the GEMV and the CPU kernels do: a dequantized weight rounded to fp16/bf16 (and a
    // half-precision GEMM) cost up to 2.7 % of an output on an H200.
    auto w = qweight.to(at::kFloat) * scale.unsqueeze(1);
    auto xf = x.to(at::kFloat);
    auto y = bias.has_value() ? at::linear(xf, w, bias->to(at::kFloat)) : at::linear(xf, w);
    return y.to(x.scalar_type());
  }
  auto y = at::empty({m, n}, x.options());
  if (trivial_linear(y, bias, k)) return y;
  check_cuda(tk::cuda::w8a16_gemv(x.data_ptr(), cuda_dtype(x, "x"), m, k, x.stride(0), qweight.data_ptr<int8_t>(),
                                  qweight.stride(0), scale.data_ptr<float>(),
                                  bias.has_value() ? bias->data_ptr() : nullptr, n, y.data_ptr(), n,
                                  c10::cuda::getCurrentCUDAStream().stream()),
             "w8a16_gemv");
  return y;
}

#endif  // TK_WITH_CUDA

}  // namespace

TORCH_LIBRARY(tape_kernels, m) {
  m.def("pack_int8_weight(Tensor qweight) -> (Tensor, Tensor)");
  m.def("quantize_rows(Tensor x) -> (Tensor, Tensor)");
  m.def("int8_mm(Tensor xq, Tensor qweight) -> Tensor");
  m.def("int8_mm_packed(Tensor xq, Tensor packed, Tensor wsum, int n) -> Tensor");
  m.def("w8_linear(Tensor x, Tensor qweight, Tensor scale, Tensor? bias) -> Tensor");
  m.def("w8a8_linear(Tensor x, Tensor qweight, Tensor scale, Tensor? bias) -> Tensor");
  m.def("w8a8_linear_packed(Tensor x, Tensor packed, Tensor wsum, Tensor scale, Tensor? bias) -> Tensor");
  m.class_<DecodePlan>("DecodePlan")
      .def(torch::init<std::vector<Tensor>, std::vector<int64_t>, std::vector<double>>())
      .def("n_blocks", &DecodePlan::n_blocks)
      .def("vocab", [](const c10::intrusive_ptr<DecodePlan>& self) { return self->plan.vocab; })
      // (name, value) pairs: what torch.library's fake-class machinery (opcheck, torch.compile) rebuilds.
      .def("__obj_flatten__",
           [](const c10::intrusive_ptr<DecodePlan>& self) {
             return std::make_tuple(std::make_tuple(std::string("tensors"), self->tensors),
                                    std::make_tuple(std::string("config"), self->config),
                                    std::make_tuple(std::string("floats"), self->floats));
           })
      .def_pickle(
          [](const c10::intrusive_ptr<DecodePlan>& self) {
            return std::make_tuple(self->tensors, self->config, self->floats);
          },
          [](std::tuple<std::vector<Tensor>, std::vector<int64_t>, std::vector<double>> state) {
            return c10::make_intrusive<DecodePlan>(std::move(std::get<0>(state)), std::move(std::get<1>(state)),
                                                   std::move(std::get<2>(state)));
          });
  m.def("decode_linear_f32(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("decode_activation(Tensor x, Tensor? bias) -> Tensor");
  m.def("charrnn_forward(Tensor p, Tensor wh, Tensor h0) -> (Tensor, Tensor)");
  m.def("charrnn_backward(Tensor dout, Tensor dlast, Tensor z, Tensor wh) -> Tensor");
  m.def("decode_step(__torch__.torch.classes.tape_kernels.DecodePlan plan, Tensor tok, Tensor(a!) kv, int t0) "
        "-> Tensor");
  m.def("decode_step_seed(__torch__.torch.classes.tape_kernels.DecodePlan plan, Tensor tok, Tensor(a!) kv, "
        "Tensor(b!) rnn, int t0) -> Tensor");
  m.def("sample_next(Tensor logp, Tensor(a!)? state, float inv_temp, int top_k) -> Tensor");
}

TORCH_LIBRARY_IMPL(tape_kernels, CPU, m) {
  m.impl("pack_int8_weight", &pack_int8_weight_cpu);
  m.impl("quantize_rows", &quantize_rows_cpu);
  m.impl("int8_mm", &int8_mm_cpu);
  m.impl("int8_mm_packed", &int8_mm_packed_cpu);
  m.impl("w8_linear", &w8_linear_cpu);
  m.impl("w8a8_linear", &w8a8_linear_cpu);
  m.impl("w8a8_linear_packed", &w8a8_linear_packed_cpu);
  m.impl("decode_step", &decode_step_cpu);
  m.impl("decode_step_seed", &decode_step_seed_cpu);
  m.impl("sample_next", &sample_next_cpu);
  m.impl("decode_linear_f32", &decode_linear_f32_cpu);
  m.impl("decode_activation", &decode_activation_cpu);
  m.impl("charrnn_forward", &charrnn_forward_cpu);
  m.impl("charrnn_backward", &charrnn_backward_cpu);
}

#ifdef TK_WITH_CUDA
TORCH_LIBRARY_IMPL(tape_kernels, CUDA, m) {
  m.impl("quantize_rows", &quantize_rows_cuda);
  m.impl("int8_mm", &int8_mm_cuda);
  m.impl("w8_linear", &w8_linear_cuda);
  m.impl("w8a8_linear", &w8a8_linear_cuda);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tape-kernels int8 ops; the tensor ops are registered as torch.ops.tape_kernels.*";
  m.def("cpu_isa", []() { return std::string(tk::cpu_isa_name(tk::cpu_isa())); },
        "Instruction set the CPU int8 kernels use now");
  m.def("cpu_isas", []() {
    std::vector<std::string> out{"scalar"};
    const auto best = tk::cpu_isa_best();
    if (best >= tk::CpuIsa::kAvx2) out.emplace_back("avx2");
    if (best >= tk::CpuIsa::kAvx512Vnni) out.emplace_back("avx512_vnni");
    return out;
  }, "Instruction sets this CPU supports, worst first");
  m.def("set_cpu_isa", [](const std::string& name) {
    tk::CpuIsa isa;
    if (name == "scalar") isa = tk::CpuIsa::kScalar;
    else if (name == "avx2") isa = tk::CpuIsa::kAvx2;
    else if (name == "avx512_vnni") isa = tk::CpuIsa::kAvx512Vnni;
    else throw std::invalid_argument("unknown ISA '" + name + "' (scalar, avx2, avx512_vnni)");
    TORCH_CHECK_VALUE(isa <= tk::cpu_isa_best(), "this CPU does not support ", name);
    tk::set_cpu_isa(isa);
  }, "Force an instruction set (tests compare every path)");
  // Which torch the extension was compiled against (setup.py defines these): an extension built for
  // another torch may load and still break, so the loader refuses a mismatch with a clear message.
  m.def("built_with_torch", []() {
    return std::to_string(TK_TORCH_MAJOR) + "." + std::to_string(TK_TORCH_MINOR) + "." +
           std::to_string(TK_TORCH_PATCH);
  }, "torch version (major.minor.patch) this extension was compiled against");
#ifdef TK_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
