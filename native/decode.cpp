// One decode step (a single new token) of a block, fused: the Python model runs the same step
// as a dozen torch ops per half-block (model.py: Attention, DenseFFN), each a dispatch of a few
// microseconds, which at 30 layers cost a small model more than its matrix products. Here a
// half-block is one call; the products are QMatrices (qmatmul.cpp), the attention the fused
// kernel (kv_attention.cpp). The common case only: the new token's K and V go to the fp16
// buffer; a step that moves a K group from the buffer into the quantized pages takes the Python
// path (kv.py), every k_group tokens. Tests hold both paths to the same logits.
#include <c10/util/Half.h>

#include <cmath>
#include <vector>

#include "runner.h"

// E model dim, Hq query heads, H KV heads, D head dim, rd rotated dims, F ffn dim

void rms_norm_row(const float* x, const float* w, int64_t n, double eps, float* out) {
  double ss = 0.0;
  for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float r = static_cast<float>(1.0 / std::sqrt(ss / n + eps));
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * r * w[i];
}

namespace {

// rotate the first rd dims of each of `heads` rows of D (model.apply_rope)
void rope(float* x, int64_t heads, int64_t D, int64_t rd, bool neox, const float* cs,
          const float* sn) {
  const int64_t half = rd / 2;
  for (int64_t hh = 0; hh < heads; ++hh) {
    float* r = x + hh * D;
    for (int64_t i = 0; i < half; ++i) {
      const int64_t ia = neox ? i : 2 * i, ib = neox ? i + half : 2 * i + 1;
      const float a = r[ia], b = r[ib];
      r[ia] = a * cs[i] - b * sn[i];
      r[ib] = a * sn[i] + b * cs[i];
    }
  }
}

void check_row(const torch::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.dtype() == torch::kFloat32 && t.is_contiguous() && t.numel() == n, what,
              " must be ", n, " contiguous fp32 values");
}

}  // namespace

DecodeAttention::DecodeAttention(torch::Tensor norm, double eps, std::shared_ptr<QMatrices> qkv,
                                 torch::Tensor bias, std::shared_ptr<QMatrices> o,
                                 int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                                 int64_t rope_dims, bool neox, std::vector<torch::Tensor> kv,
                                 std::vector<int64_t> kv_cfg, std::shared_ptr<KVPages> pages)
    : norm_(norm.contiguous()), bias_(bias.contiguous()), eps_(eps), qkv_(std::move(qkv)),
      o_(std::move(o)), hq_(n_heads), h_(n_kv_heads), d_(head_dim), rd_(rope_dims),
      neox_(neox), kv_(std::move(kv)), cfg_(std::move(kv_cfg)), pages_(std::move(pages)) {
  TORCH_CHECK(kv_.size() == 20 && cfg_.size() == 7, "kv: 20 layer tensors, 7 settings");
  TORCH_CHECK(qkv_->out_features() == (hq_ + 2 * h_) * d_, "qkv rows do not match the heads");
  TORCH_CHECK(o_->in_features() == hq_ * d_, "o columns do not match the heads");
  TORCH_CHECK(bias_.numel() == 0 || bias_.numel() == qkv_->out_features(), "bias size");
  TORCH_CHECK(kv_[6].dtype() == torch::kHalf && kv_[6].is_contiguous() &&
                  kv_[7].is_contiguous(), "the fp16 K/V buffers must be contiguous [H, cap, D]");
}

void DecodeAttention::forward(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, int64_t nq,
                              int64_t nb, int64_t keep, int64_t first) const {
  const int64_t E = norm_.numel(), cap = kv_[6].size(1);
  check_row(x, E, "x");
  check_row(cos, rd_ / 2, "cos");
  check_row(sin, rd_ / 2, "sin");
  TORCH_CHECK(nb >= 0 && nb < cap, "the new token does not fit the fp16 buffer");
  float* xp = x.data_ptr<float>();
  std::vector<float> h(E), qkv(qkv_->out_features()), out(E);
  rms_norm_row(xp, norm_.data_ptr<float>(), E, eps_, h.data());
  qkv_->apply(h.data(), 1, qkv.data());  // (Hq + 2H)·D
  if (bias_.numel()) {
    const float* b = bias_.data_ptr<float>();
    for (size_t i = 0; i < qkv.size(); ++i) qkv[i] += b[i];
  }
  float* q = qkv.data();              // Hq, D
  float* k = q + hq_ * d_;            // H, D
  const float* v = k + h_ * d_;       // H, D
  rope(q, hq_, d_, rd_, neox_, cos.data_ptr<float>(), sin.data_ptr<float>());
  rope(k, h_, d_, rd_, neox_, cos.data_ptr<float>(), sin.data_ptr<float>());
  at::Half* kb = kv_[6].data_ptr<at::Half>();  // H, cap, D
  at::Half* vb = kv_[7].data_ptr<at::Half>();
  for (int64_t hh = 0; hh < h_; ++hh)
    for (int64_t c = 0; c < d_; ++c) {
      kb[(hh * cap + nb) * d_ + c] = at::Half(k[hh * d_ + c]);
      vb[(hh * cap + nb) * d_ + c] = at::Half(v[hh * d_ + c]);
    }
  auto qt = torch::from_blob(q, {hq_, d_}, torch::kFloat32);
  const double sm_scale = 1.0 / std::sqrt(static_cast<double>(d_));
  const bool estimate = kv_[12].numel() > 0;
  auto [pages, est] = keep > 0 ? select_pages(qt, kv_[10], kv_[11], kv_[16], kv_[17], kv_[18],
                                              kv_[19], nq / 16, keep, first, cfg_[4] & 1,
                                              cfg_[4] & 2, cfg_[2], cfg_[6], sm_scale, estimate)
                               : std::make_tuple(torch::empty({0}, torch::dtype(torch::kInt32)),
                                                 torch::empty({0}));
  if (pages_ && keep > 0) {
    pages_->ensure_tensor(cfg_[5], pages);
  } else if (pages_ && nq > 0) {  // dense: every page (the engine pairs offload with a budget)
    auto all = torch::arange(nq / 16, torch::dtype(torch::kInt32)).repeat({h_, 1}).contiguous();
    pages_->ensure_tensor(cfg_[5], all);
  }
  auto o = decode_attention(qt, kv_[0], kv_[1], kv_[2], kv_[3], kv_[4], kv_[5], kv_[6], kv_[7],
                            kv_[8], kv_[9], kv_[13], pages, kv_[14], kv_[15], est, kv_[12],
                            nq, nb + 1, cfg_[0], cfg_[1], cfg_[2], cfg_[3], sm_scale);  // Hq, D
  o_->apply(o.data_ptr<float>(), 1, out.data());
  for (int64_t i = 0; i < E; ++i) xp[i] += out[i];
}

DecodeDenseFFN::DecodeDenseFFN(torch::Tensor norm, double eps,
                               std::shared_ptr<QMatrices> gate_up,
                               std::shared_ptr<QMatrices> down)
    : norm_(norm.contiguous()), eps_(eps), gate_up_(std::move(gate_up)),
      down_(std::move(down)) {
  TORCH_CHECK(gate_up_->out_features() == 2 * down_->in_features(), "gate/up vs down sizes");
}

void DecodeDenseFFN::forward(torch::Tensor x) const {
  const int64_t E = norm_.numel(), F = down_->in_features();
  check_row(x, E, "x");
  float* xp = x.data_ptr<float>();
  std::vector<float> h(E), gu(2 * F), out(E);
  rms_norm_row(xp, norm_.data_ptr<float>(), E, eps_, h.data());
  gate_up_->apply(h.data(), 1, gu.data());  // 2F: gate, then up
  for (int64_t i = 0; i < F; ++i) {
    const float gt = gu[i];
    gu[i] = gt / (1.f + std::exp(-gt)) * gu[F + i];  // silu(gate) · up
  }
  down_->apply(gu.data(), 1, out.data());
  for (int64_t i = 0; i < E; ++i) xp[i] += out[i];
}
