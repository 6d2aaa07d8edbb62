// Fused decode attention over the paged, quantized KV cache (localai/engine/torch/kv.py).
//
// One query token, all heads of one layer. For each KV head: scores against the quantized
// tokens [0, nq) and the fp16 buffer tokens [0, nb), softmax, then the V-weighted sum, without
// materializing dequantized K or V. K is per-channel quantized in groups of kg tokens, so for
// each group the query is pre-scaled once (qs = q * k_scale, qm = q . k_min) and a score is
// qs . code + qm. V is per-token quantized in groups of vg channels.
// A rotated tensor (k_rot / v_rot, the 2-bit layout) holds H x, H the orthonormal Hadamard matrix
// of the head dim, quantized per token in groups of vg channels; a rotated K is centered first
// (kz: per-channel mean of each K group). Scores use the rotated query,
// q . k = q . kz + Hq . H(k - kz), and the V sum over quantized tokens is rotated back once.
// Packing is planar (see kvquant.py): channel p*R + r sits in byte r at bit offset p*bits.
// The pure-torch definition is attention.decode_reference; tests hold the two to a tolerance.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// codes of one packed row -> float, D channels
inline void unpack_row(const uint8_t* row, int bits, int D, float* out) {
  const int per = 8 / bits, R = D / per, mask = (1 << bits) - 1;
  for (int p = 0; p < per; ++p) {
    const int shift = p * bits;
    float* o = out + p * R;
    for (int r = 0; r < R; ++r) o[r] = static_cast<float>((row[r] >> shift) & mask);
  }
}

// x <- x H in place (Sylvester order, orthonormal; H is its own inverse); D a power of two
inline void hadamard(float* x, int D) {
  for (int h = 1; h < D; h *= 2)
    for (int i = 0; i < D; i += 2 * h)
      for (int j = i; j < i + h; ++j) {
        const float a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
  const float norm = 1.f / std::sqrt(static_cast<float>(D));
  for (int c = 0; c < D; ++c) x[c] *= norm;
}

inline void half_row(const at::Half* row, int D, float* out) {
  for (int c = 0; c < D; ++c) out[c] = static_cast<float>(row[c]);
}

}  // namespace

torch::Tensor decode_attention(torch::Tensor q,  // [Hq, D] fp32
                               torch::Tensor kc, torch::Tensor ks, torch::Tensor km,
                               torch::Tensor kz,  // [T/kg, D] fp16 when k_rot, else empty
                               torch::Tensor vc, torch::Tensor vs, torch::Tensor vm,
                               torch::Tensor kbuf, torch::Tensor vbuf,  // [H, W+G, D] fp16
                               int64_t nq, int64_t nb, int64_t k_bits, int64_t v_bits,
                               int64_t kg, int64_t vg, double sm_scale, bool k_rot,
                               bool v_rot) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && q.is_contiguous(), "q must be contiguous fp32");
  TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous() && kbuf.is_contiguous() &&
                  vbuf.is_contiguous(), "cache tensors must be contiguous");
  const int Hq = q.size(0), D = q.size(1), H = kbuf.size(0);
  const int rep = Hq / H, N = nq + nb;
  const int64_t T = kc.size(1), cap = kbuf.size(1);
  const int64_t k_row = kc.size(2), v_row = vc.size(2);
  TORCH_CHECK(nq <= T && nb <= cap && nq % kg == 0, "bad token counts");
  TORCH_CHECK(D % vg == 0 && (!(k_rot || v_rot) || (D & (D - 1)) == 0), "bad head dim");
  const int ng = D / vg;  // per-token groups of a rotated K row
  auto out = torch::zeros({Hq, D}, q.options());
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float scale = static_cast<float>(sm_scale);

  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
    std::vector<float> s(static_cast<size_t>(rep) * N), row(D), qs(rep * D), qm(rep);
    std::vector<float> qsum(rep * ng), acc(rep * D);
    for (int64_t h = h0; h < h1; ++h) {
      const float* qh = qp + h * rep * D;
      if (k_rot && k_bits < 16 && nq > 0) {  // rotated query and its per-group sums
        for (int r = 0; r < rep; ++r) {
          float* qr = qs.data() + r * D;
          for (int c = 0; c < D; ++c) qr[c] = qh[r * D + c];
          hadamard(qr, D);
          for (int g = 0; g < ng; ++g) {
            float m = 0.f;
            for (int c = g * vg; c < (g + 1) * vg; ++c) m += qr[c];
            qsum[r * ng + g] = m;
          }
        }
      }
      // ---- scores over the quantized pages
      for (int64_t t = 0; t < nq; ++t) {
        if (k_bits == 16) {
          half_row(kc.data_ptr<at::Half>() + (h * T + t) * D, D, row.data());
          for (int r = 0; r < rep; ++r) {
            float acc = 0.f;
            for (int c = 0; c < D; ++c) acc += qh[r * D + c] * row[c];
            s[r * N + t] = acc * scale;
          }
          continue;
        }
        if (k_rot) {  // per token: q . kz + sum over groups of scale (Hq . code) + min sum(Hq)
          if (t % kg == 0) {
            const at::Half* z = kz.data_ptr<at::Half>() + (h * (T / kg) + t / kg) * D;
            for (int r = 0; r < rep; ++r) {
              float m = 0.f;
              for (int c = 0; c < D; ++c) m += qh[r * D + c] * static_cast<float>(z[c]);
              qm[r] = m;
            }
          }
          unpack_row(kc.data_ptr<uint8_t>() + (h * T + t) * k_row, k_bits, D, row.data());
          const at::Half* sc = ks.data_ptr<at::Half>() + (h * T + t) * ng;
          const at::Half* mn = km.data_ptr<at::Half>() + (h * T + t) * ng;
          for (int r = 0; r < rep; ++r) {
            const float* qr = qs.data() + r * D;
            float total = qm[r];
            for (int g = 0; g < ng; ++g) {
              float dot = 0.f;
              for (int c = g * vg; c < (g + 1) * vg; ++c) dot += qr[c] * row[c];
              total += dot * static_cast<float>(sc[g]) +
                       qsum[r * ng + g] * static_cast<float>(mn[g]);
            }
            s[r * N + t] = total * scale;
          }
          continue;
        }
        if (t % kg == 0) {  // new K group: fold its per-channel scale and min into the query
          const at::Half* sc = ks.data_ptr<at::Half>() + (h * (T / kg) + t / kg) * D;
          const at::Half* mn = km.data_ptr<at::Half>() + (h * (T / kg) + t / kg) * D;
          for (int r = 0; r < rep; ++r) {
            float m = 0.f;
            for (int c = 0; c < D; ++c) {
              qs[r * D + c] = qh[r * D + c] * static_cast<float>(sc[c]);
              m += qh[r * D + c] * static_cast<float>(mn[c]);
            }
            qm[r] = m;
          }
        }
        unpack_row(kc.data_ptr<uint8_t>() + (h * T + t) * k_row, k_bits, D, row.data());
        for (int r = 0; r < rep; ++r) {
          float acc = qm[r];
          for (int c = 0; c < D; ++c) acc += qs[r * D + c] * row[c];
          s[r * N + t] = acc * scale;
        }
      }
      // ---- scores over the fp16 buffer
      for (int64_t t = 0; t < nb; ++t) {
        half_row(kbuf.data_ptr<at::Half>() + (h * cap + t) * D, D, row.data());
        for (int r = 0; r < rep; ++r) {
          float acc = 0.f;
          for (int c = 0; c < D; ++c) acc += qh[r * D + c] * row[c];
          s[r * N + nq + t] = acc * scale;
        }
      }
      // ---- softmax per query head
      for (int r = 0; r < rep; ++r) {
        float* sr = s.data() + r * N;
        float mx = -std::numeric_limits<float>::infinity();
        for (int t = 0; t < N; ++t) mx = std::max(mx, sr[t]);
        float sum = 0.f;
        for (int t = 0; t < N; ++t) {
          sr[t] = std::exp(sr[t] - mx);
          sum += sr[t];
        }
        const float inv = 1.f / sum;
        for (int t = 0; t < N; ++t) sr[t] *= inv;
      }
      // ---- weighted sum of V
      float* oh = op + h * rep * D;
      const bool rot_sum = v_rot && v_bits < 16 && nq > 0;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < N; ++t) {
        if (t < nq && v_bits < 16) {
          unpack_row(vc.data_ptr<uint8_t>() + (h * T + t) * v_row, v_bits, D, row.data());
          const at::Half* sc = vs.data_ptr<at::Half>() + (h * T + t) * (D / vg);
          const at::Half* mn = vm.data_ptr<at::Half>() + (h * T + t) * (D / vg);
          for (int c = 0; c < D; ++c)
            row[c] = row[c] * static_cast<float>(sc[c / vg]) + static_cast<float>(mn[c / vg]);
        } else if (t < nq) {
          half_row(vc.data_ptr<at::Half>() + (h * T + t) * D, D, row.data());
        } else {
          half_row(vbuf.data_ptr<at::Half>() + (h * cap + (t - nq)) * D, D, row.data());
        }
        float* dst = (rot_sum && t < nq) ? acc.data() : oh;  // rotated rows sum apart
        for (int r = 0; r < rep; ++r) {
          const float p = s[r * N + t];
          float* o = dst + r * D;
          for (int c = 0; c < D; ++c) o[c] += p * row[c];
        }
      }
      if (rot_sum) {
        for (int r = 0; r < rep; ++r) {
          float* a = acc.data() + r * D;
          hadamard(a, D);
          for (int c = 0; c < D; ++c) oh[r * D + c] += a[c];
        }
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "fused decode attention over quantized KV pages");
}
