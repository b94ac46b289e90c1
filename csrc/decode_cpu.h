// One CPU decode step of the fused TapeTransformer: plain pointers, sizes and strides, no ATen.
//
// decode_step() runs, for B new tokens (or B·S: a native prefill), everything between the token
// ids and the log-probs of TapeTransformer._forward_eval (skip_dead, eval): embedding, the coda's first-layer
// positions (+ RoPE when causal), every TapeHeadBlock of the evaluated heads (QKV projection, K/V
// write at row t0, attention over rows 0..t0, out projection, LayerNorm, MLP with the bounded
// activation, LayerNorm), the left/right combine after every layer and the Student-t unembedding.
// For the seed design (Plan::seed_design) also the prophet's Char-RNN over the new tokens (its state
// in the caller's rnn buffer, advanced in place), rnn_projection, merge_projection (the critics' shared
// input), the moderator (final_norm + merge_projection_final) and merger.proj.
//
// Weights are fp32 (a vectorised GEMV, AVX-512 / AVX2 / portable chosen at run time), W8A8 (per-row
// activation quantization and the packed int8 kernels of int8_cpu.h) or weight-only int8 (W8A32,
// int8_cpu.h). Every product accumulates in fp32 (int32 for W8A8's integer dot products).
//
// Threads: one OpenMP team per step. Each linear splits the output rows of its left and right
// blocks into contiguous runs, one per thread (each thread streams its own weight rows once);
// attention splits (side, batch row, head); the LayerNorms and the combine, a few thousand flops,
// are computed by every thread into its own buffers, which saves a barrier each. A thread's rows
// are computed the same way whatever the team size, so results do not depend on the thread count
// (nor on the batch: each batch row is computed independently). Each call streams every weight
// once, for all B·S rows.
#pragma once

#include <cstdint>
#include <vector>

namespace tk::decode {

enum class Weights : int { kF32 = 0, kW8A8 = 1, kW8 = 2 };

// One linear y = x·Wᵀ + bias; which pointers are set depends on the plan's Weights.
struct Linear {
  int64_t n = 0, k = 0;
  const float* w = nullptr;        // kF32: (n, k) row-major
  const int8_t* q = nullptr;       // kW8: (n, k) row-major int8
  const int8_t* packed = nullptr;  // kW8A8: tk::pack_w8 layout of q
  const int32_t* wsum = nullptr;   // kW8A8: tk::pack_w8's column sums
  const float* scale = nullptr;    // int8: (n) per output channel
  const float* bias = nullptr;     // (n) or null
};

// One TapeHeadBlock. The expand linear carries no bias: expand_bias is added before the activation
// (as the model's fused bias + activation does).
struct Block {
  Linear in_proj, out_proj, expand, linear;
  const float* expand_bias = nullptr;  // (8D)
  const float* ln_attn_w = nullptr;
  const float* ln_attn_b = nullptr;
  const float* ln_mlp_w = nullptr;
  const float* ln_mlp_b = nullptr;
  float ln_attn_eps = 1e-5f, ln_mlp_eps = 1e-5f;
};

// An evaluated TapeHead: `layers` pairs of blocks, combined by `mode` (0 sigmoid-XOR, 1 pair softmax,
// 2 sum) after every layer. heads[0] is the coda (its first layer reads the token embedding); every
// later head's first layer reads the coda's output.
struct Head {
  int64_t layers = 0;
  int mode = 0;
};

// The seed design's extra pieces (design="seed"; tapetransformer.model's _seed_hidden): the prophet
// (a Char-RNN of `layers` layers of `hidden` units, each a left and a right cell), rnn_projection,
// merge_projection, the moderator (final_norm, an RMSNorm, then merge_projection_final) and
// merger.proj. All fp32 whatever the plan's Weights (the model's int8 path quantizes only the
// TapeHeadBlocks' linears), ~5 % of the weights read per token at the notebook size.
//   coda = heads[0](e);  p = rnn_projection(prophet(e));  mix = merge_projection([coda, p])
//   c_i = heads[1 + i](mix);  mod = merge_final(final_norm([c_0 .. c_n-1]));  h = merger([coda, mod])
struct Seed {
  int64_t layers = 0, hidden = 0;
  // Per layer: wi (2·hidden, in) with bias b_i, wh (2·hidden, hidden) with bias b_h; rows [0, hidden)
  // the left cell's, [hidden, 2·hidden) the right's; `in` is D for layer 0, hidden above.
  std::vector<Linear> wi, wh;
  Linear rnn_projection, merge_projection, merge_final, merger;
  const float* final_norm_w = nullptr;  // (n_critics·D)
  float final_norm_eps = 1e-12f;
};

struct Plan {
  int64_t d = 0, heads = 4, vocab = 0, seq_len = 0;
  bool seed_design = false;  // heads[1..] are the critics of the seed design; `seed` is set
  Seed seed;
  bool causal = false;
  Weights kind = Weights::kF32;
  float df = 0.f;                          // Student-t degrees of freedom
  const float* embedding = nullptr;        // (vocab, d)
  const float* unembedding = nullptr;      // (d, vocab)
  const float* unembedding_sq = nullptr;   // (vocab): Σ_d unembedding[d, v]², precomputed
  const float* pos[2] = {nullptr, nullptr};       // (seq_len, d): the coda's first left / right block
  const float* rope_cos[2] = {nullptr, nullptr};  // (seq_len, d/2): cos(p·f_i) of those blocks
  const float* rope_sin[2] = {nullptr, nullptr};
  std::vector<Head> eval_heads;  // coda first
  std::vector<Block> blocks;     // ordered (head, layer, side): head_offset + 2·layer + side

  int64_t n_blocks() const {
    int64_t n = 0;
    for (const Head& h : eval_heads) n += 2 * h.layers;
    return n;
  }
  int64_t expand_n() const { return blocks.empty() ? 0 : blocks[0].expand.n; }
};

// S new tokens for each of b batch rows at cache rows t0..t0+S-1 (S = 1: a decode step; S > 1: a
// prefill, or a chunk of one). tok: (b, S) ids in [0, vocab) (the caller checks); kv: (n_blocks,
// 2 [k, v], b, heads, capacity, d/heads) contiguous fp32, rows 0..t0-1 filled, rows t0..t0+S-1
// written here (capacity >= t0 + S); logp: (b, S, vocab) out.
// Positions (the model's): causal, t0 + s (< seq_len) with RoPE; reference semantics, s (each call
// restarts at 0; S <= seq_len), rotated only when S > 1. Attention: causal, new row s sees rows
// <= t0 + s; reference semantics, every new row sees all t0 + S rows. nthreads >= 1.
// Seed design: rnn (layers, b, hidden) contiguous, the prophet's state after rows 0..t0-1 (zeros at
// t0 = 0), advanced here over the S new tokens in place; null for the reference design.
void decode_step(const Plan& plan, const int64_t* tok, int64_t b, int64_t s, float* kv, int64_t capacity, int64_t t0,
                 float* logp, int nthreads, float* rnn = nullptr);

// One draw per row of logp (b, v): greedy (inv_temp <= 0: the first maximum) or the exponential race
// of tape_kernels/sampling.py on the fp32 scores logp·inv_temp restricted to the top_k largest
// (top_k <= 0: all; ties at the k-th kept), with Philox-4x32-10 keyed by `seed`, counter (column,
// row, step low 32 bits, step high 32 bits) — sample_ref's stream, so a seed draws the same ids.
// A row holding NaN or +inf gets -1 (the caller raises: never a silent token).
void sample_rows(const float* logp, int64_t b, int64_t v, int64_t ldl, float inv_temp, int64_t top_k, uint64_t seed,
                 uint64_t step, int64_t* out);

// Philox-4x32-10 (Triton's tl.philox): the first output word for counter (c0, c1, c2, c3), key (k0, k1).
uint32_t philox_r0(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1);

// The fp32 GEMV/GEMM of the kF32 path on its own (tests and the benchmark compare it with torch):
// y[m, n] = Σ_k x[m, k]·w[n, k] + bias[n] (bias may be null); single-threaded.
void linear_f32(const float* x, int64_t m, int64_t k, int64_t ldx, const float* w, const float* bias, int64_t n,
                float* y, int64_t ldy);

// The bounded activation y = 2·atanh(p/2), p = l/sqrt(1+24l²), l = sign(s)·log1p(|s|), s = 2·tanh(x/2),
// in place on n values after adding bias (may be null); fp32, NaN stays NaN.
void activation_f32(float* x, const float* bias, int64_t n);

// The Char-RNN's recurrence over a sequence, one layer, for training (tape_kernels.charrnn's
// CharRNNFunction on the CPU). p (B, S, 2Hd): the input projections with both biases, left cell
// first; wh (2Hd, Hd) = [W_hL; W_hR]; hs (B, S + 1, Hd) with hs[:, 0] = h0 on entry, hs[:, 1..S]
// written; z (B, S, 2Hd): the pre-activations, written.
void charrnn_layer_forward(const float* p, const float* wh, int64_t b, int64_t s, int64_t hd, float* hs, float* z,
                           int nthreads);

// Its backward: dout (B, S, Hd) = dL/dhs[:, 1..S] from above, dlast (B, Hd) = dL/dhs[:, S] from the
// returned state; writes dz (B, S, 2Hd) = dL/dz. dL/dh0 = dz[:, 0]·wh and the weight gradients are
// whole-sequence GEMMs, left to the caller.
void charrnn_layer_backward(const float* dout, const float* dlast, const float* z, const float* wh, int64_t b,
                            int64_t s, int64_t hd, float* dz, int nthreads);

}  // namespace tk::decode
