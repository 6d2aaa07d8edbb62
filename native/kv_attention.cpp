// Fused decode attention over the paged, quantized KV cache (localai/engine/torch/kv.py).
//
// One query token, all heads of one layer. For each KV head: scores against the quantized
// tokens [0, nq) and the fp16 buffer tokens [0, nb), softmax, then the V-weighted sum, without
// materializing dequantized K or V. K is per-channel quantized in groups of kg tokens, so for
// each group the query is pre-scaled once (qs = q * k_scale, qm = q . k_min) and a score is
// qs . code + qm. V is per-token quantized in groups of vg channels. The first tokens (the
// attention sink, [H, S, D] fp16 each for K and V, empty at 16 bits) are read exactly instead of
// through their codes. V may be stored rotated (times an orthonormal D x D matrix, vrot, empty
// when not): the quantized tokens' weighted sum is then taken in the rotated basis and turned
// back once per query head, which is exact since the sum is linear.
// Packing is planar (see kvquant.py): channel p*R + r sits in byte r at bit offset p*bits.
// Sparse: given `pages` ([H, P] int32, ascending page numbers of 16 tokens, per KV head), a head
// attends to those quantized pages and the whole fp16 buffer only; `select_pages` picks them
// from the per-page key summaries (kv.py: a centre c and spread s per channel) by the score
// q . c + |q * s| (the L1 norm for a min/max box: the largest q . k inside it; the L2 norm for a
// mean and standard deviation: one deviation above the mean score); a KV head combines its query
// heads' scores by their maximum, or (mass) as attention: softmax over the pages per query head,
// summed over the heads. With a 4-bit copy of the keys (kv.py "keys": codes [H, D, T_cap/2],
// channel by channel, planar within each K group; per-channel scale, minimum and mean per K group
// [H, T_cap/kg, D]) a page's score for a query head is instead its best token's q . k over the
// copy, read on the `channels` channels where the KV head's queries weigh most (sum of |q| over
// its query heads), the others counted at their group mean. A sparse step counts every page it
// does not read as one estimated token standing for its 16, scored q . (the page's mean key) +
// ln 16 (the mean key from the copy's scores, or kcent), valued the page's mean value (vcent,
// 4-bit; empty when not kept). select_pages returns these scores beside the pages.
// The pure-torch definitions are attention.decode_reference and attention.select_pages_reference;
// tests hold each pair to a tolerance.
#include <c10/util/Half.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "runner.h"

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

inline void half_row(const at::Half* row, int D, float* out) {
  int c = 0;
#ifdef __F16C__  // 8 halves per instruction (c10::Half converts one at a time)
  for (; c + 8 <= D; c += 8)
    _mm256_storeu_ps(out + c, _mm256_cvtph_ps(_mm_loadu_si128(
                                  reinterpret_cast<const __m128i*>(row + c))));
#endif
  for (; c < D; ++c) out[c] = static_cast<float>(row[c]);
}

constexpr int64_t kPage = 16;  // tokens per page (kv.PAGE)

// out[r * stride] = (q_r . row) * scale + add for the rep query heads qh [rep, D] and one exact
// key row (fp16 cache, sink, window, or a page's mean key)
inline void score_row(const float* qh, const float* row, int rep, int D, float scale, float add,
                      float* out, int64_t stride) {
  for (int r = 0; r < rep; ++r) {
    float acc = 0.f;
    for (int c = 0; c < D; ++c) acc += qh[r * D + c] * row[c];
    out[r * stride] = acc * scale + add;
  }
}

// o[r] += sum over j < n of p[r * N + at[j]] * rows[j] (each row [D]) for the rep query heads
// (o [rep, D], p the probabilities [rep, N]); then n = 0
inline void add_rows(float* o, int rep, int D, const float* p, int64_t N, const int64_t* at,
                     int& n, const float* rows) {
  for (int r = 0; r < rep; ++r) {
    float w[8];
    for (int j = 0; j < n; ++j) w[j] = p[r * N + at[j]];
    float* orow = o + r * D;
    int c = 0;
#ifdef __AVX2__
    for (; c + 8 <= D; c += 8) {  // each chunk of the output loaded and stored once
      __m256 acc = _mm256_loadu_ps(orow + c);
      for (int j = 0; j < n; ++j)
        acc = _mm256_fmadd_ps(_mm256_set1_ps(w[j]), _mm256_loadu_ps(rows + j * D + c), acc);
      _mm256_storeu_ps(orow + c, acc);
    }
#endif
    for (; c < D; ++c)
      for (int j = 0; j < n; ++j) orow[c] += w[j] * rows[j * D + c];
  }
  n = 0;
}

#ifdef __AVX2__
inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

inline float hsum8(__m256 v) {
  __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_add_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_add_ss(m, _mm_movehdup_ps(m)));
}

// the 8 dot products of q [D] with rows [8, D] (D a multiple of 8), in one vector
inline __m256 dot8(const float* q, const float* rows, int D) {
  __m256 a[8];
  for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
  for (int c = 0; c < D; c += 8) {
    const __m256 qv = _mm256_loadu_ps(q + c);
    for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(rows + j * D + c), a[j]);
  }
  // sums of pairs, then of fours, within each 128-bit half; then the two halves added
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// s[r * stride + i] = base[r] + sum_j qs[j * 8 + r] . (codes of channel j, token i), i < 8, for
// R query heads; `codes[j]` points at 8 bytes of channel j's 4-bit codes, `high`: their upper
// nibbles (the group's second half) rather than the lower
template <int R>
inline void copy_block(const uint8_t* const* codes, int64_t nc, int64_t off, bool high,
                       const float* qs, const float* base, float* s, int64_t stride) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_set1_ps(base[r]);
  const __m256i fifteen = _mm256_set1_epi32(15);
  for (int64_t j = 0; j < nc; ++j) {
    __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
        reinterpret_cast<const __m128i*>(codes[j] + off)));
    x = high ? _mm256_srli_epi32(x, 4) : _mm256_and_si256(x, fifteen);
    const __m256 c = _mm256_cvtepi32_ps(x);
    for (int r = 0; r < R; ++r)
      acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(qs + j * 8 + r), c, acc[r]);
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(s + r * stride, acc[r]);
}
#endif

// Scores of the tokens of one K group (g tokens, the copy's codes planar in it: byte i holds
// token i in its low nibble, token i + g/2 in its high one) over `nc` channels `ch` for rep query
// heads qh [rep, D]: s[r * g + i] = q_r . (the group's mean key mu) + sum over the chosen
// channels c of q_rc (code * scale + min - mu)_c.
void copy_group_scores(const float* qh, int64_t rep, int64_t D, const uint8_t* codes,
                       int64_t stride, const at::Half* sc, const at::Half* mn, const at::Half* mu,
                       const int32_t* ch, int64_t nc, int64_t g, float* s) {
  thread_local std::vector<float> base, a, b, u;  // per call: no allocation once grown
  base.assign(rep, 0.f);
  a.resize(D);
  b.resize(D);
  u.resize(D);
  half_row(sc, D, a.data());
  half_row(mn, D, b.data());
  half_row(mu, D, u.data());
  for (int64_t r = 0; r < rep; ++r) {
    float m = 0.f;
    for (int64_t c = 0; c < D; ++c) m += qh[r * D + c] * u[c];
    for (int64_t j = 0; j < nc; ++j) m += qh[r * D + ch[j]] * (b[ch[j]] - u[ch[j]]);
    base[r] = m;
  }
  const int64_t half = g / 2;
#ifdef __AVX2__
  thread_local std::vector<float> qs;  // [nc, 8]: each head's q times the channel's scale
  thread_local std::vector<const uint8_t*> rows;
  qs.resize(nc * 8);
  rows.resize(nc);
  for (int64_t j = 0; j < nc; ++j) {
    rows[j] = codes + ch[j] * stride;
    for (int64_t r = 0; r < 8; ++r)
      qs[j * 8 + r] = r < rep ? qh[r * D + ch[j]] * a[ch[j]] : 0.f;
  }
  if (half % 8 == 0) {
    for (int64_t r0 = 0; r0 < rep; r0 += 8) {
      const int64_t R = std::min<int64_t>(8, rep - r0);
      if (r0)  // query heads past the first 8: their own folded query
        for (int64_t j = 0; j < nc; ++j)
          for (int64_t r = 0; r < R; ++r)
            qs[j * 8 + r] = qh[(r0 + r) * D + ch[j]] * a[ch[j]];
      for (int64_t i = 0; i < g; i += 8) {
        const bool high = i >= half;
        const int64_t off = high ? i - half : i;
        float* out = s + r0 * g + i;
        switch (R) {
#define LOCALAI_BLOCK(n) \
  case n: copy_block<n>(rows.data(), nc, off, high, qs.data(), base.data() + r0, out, g); break;
          LOCALAI_BLOCK(1) LOCALAI_BLOCK(2) LOCALAI_BLOCK(3) LOCALAI_BLOCK(4)
          LOCALAI_BLOCK(5) LOCALAI_BLOCK(6) LOCALAI_BLOCK(7) LOCALAI_BLOCK(8)
#undef LOCALAI_BLOCK
        }
      }
    }
    return;
  }
#endif
  for (int64_t r = 0; r < rep; ++r)
    for (int64_t i = 0; i < g; ++i) {
      float acc = base[r];
      for (int64_t j = 0; j < nc; ++j) {
        const uint8_t byte = codes[ch[j] * stride + (i % half)];
        const float code = static_cast<float>(i < half ? byte & 15 : byte >> 4);
        acc += qh[r * D + ch[j]] * a[ch[j]] * code;
      }
      s[r * g + i] = acc;
    }
}

// A page's best score and the mean of its 16 scores
inline void page_best_mean(const float* s, float* best, float* mean) {
#ifdef __AVX2__
  const __m256 a = _mm256_loadu_ps(s), b = _mm256_loadu_ps(s + 8);
  *best = hmax8(_mm256_max_ps(a, b));
  *mean = hsum8(_mm256_add_ps(a, b)) / 16.f;
#else
  float m = s[0], total = 0.f;
  for (int i = 0; i < 16; ++i) m = std::max(m, s[i]);
  for (int i = 0; i < 16; ++i) total += s[i];
  *best = m;
  *mean = total / 16.f;
#endif
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> select_pages(
    torch::Tensor q,                                         // [Hq, D] fp32
    torch::Tensor kcent, torch::Tensor kspread,              // [H, P_cap, D] fp16, or empty
    torch::Tensor kcopy,                                     // [H, D, T_cap/2] 4-bit codes
    torch::Tensor kcs, torch::Tensor kcm, torch::Tensor kcmu,  // [H, T_cap/kg, D] fp16
    int64_t n_pages, int64_t keep, int64_t first, bool l2, bool mass, int64_t kg,
    int64_t channels, double sm_scale, bool estimate) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && q.is_contiguous(), "q must be contiguous fp32");
  const bool copy = kcopy.numel() > 0;
  const int64_t Hq = q.size(0), D = q.size(1);
  const int64_t H = copy ? kcopy.size(0) : kcent.size(0);
  TORCH_CHECK(copy || (kcent.dtype() == torch::kHalf && kcent.is_contiguous() &&
                       kspread.is_contiguous() && kcent.sizes() == kspread.sizes() &&
                       kcent.size(2) == D && kcent.size(1) >= n_pages),
              "page summaries must be contiguous fp16 [H, P_cap, D]");
  TORCH_CHECK(Hq % H == 0 && 0 <= first && first <= keep && keep < n_pages,
              "select_pages: need first <= keep < n_pages");
  TORCH_CHECK(!copy || (kcopy.dtype() == torch::kUInt8 && kcopy.is_contiguous() &&
                        kcopy.dim() == 3 && kcopy.size(1) == D && kg % kPage == 0 &&
                        kcopy.size(2) * 2 >= n_pages * kPage && kcs.is_contiguous() &&
                        kcm.is_contiguous() && kcmu.is_contiguous() &&
                        kcs.dtype() == torch::kHalf && kcs.sizes() == kcm.sizes() &&
                        kcs.sizes() == kcmu.sizes() && kcs.size(1) * kg == kcopy.size(2) * 2 &&
                        kcs.size(2) == D && (n_pages * kPage) % kg == 0),
              "the keys' copy must be [H, D, T/2] codes, [H, T/kg, D] fp16 scales, whole groups");
  const int64_t rep = Hq / H;
  const int64_t nc = (channels <= 0 || channels >= D) ? D : channels;
  const float scale = static_cast<float>(sm_scale), bonus = std::log(static_cast<float>(kPage));
  auto out = torch::empty({H, keep}, torch::dtype(torch::kInt32));
  auto est = estimate ? torch::full({H, rep, n_pages}, -std::numeric_limits<float>::infinity())
                      : torch::empty({0});
  const float* qp = q.data_ptr<float>();
  int32_t* op = out.data_ptr<int32_t>();
  parallel_chunks(H, [&](int64_t h) {
    const float* qh = qp + h * rep * D;
    float* eh = estimate ? est.data_ptr<float>() + h * rep * n_pages : nullptr;
    std::vector<float> score(n_pages, 0.f), each(rep * n_pages), a(D), b(D);
    std::vector<int32_t> idx;
    idx.reserve(n_pages - first);
    for (int64_t p = first; p < n_pages; ++p) idx.push_back(static_cast<int32_t>(p));
    if (copy) {  // each head's best token of the page over the copy, on the query's channels
      std::vector<int32_t> ch(D);
      std::vector<float> weight(D, 0.f), s(rep * kg);
      for (int64_t r = 0; r < rep; ++r)
        for (int64_t c = 0; c < D; ++c) weight[c] += std::fabs(qh[r * D + c]);
      for (int64_t c = 0; c < D; ++c) ch[c] = static_cast<int32_t>(c);
      std::partial_sort(ch.begin(), ch.begin() + nc, ch.end(), [&](int32_t x, int32_t y) {
        return weight[x] > weight[y] || (weight[x] == weight[y] && x < y);
      });
      std::sort(ch.begin(), ch.begin() + nc);  // channel order: the codes are read in order
      const int64_t KG = kcs.size(1), stride = kcopy.size(2);
      const uint8_t* codes = kcopy.data_ptr<uint8_t>() + h * D * stride;
      float mean;
      for (int64_t g0 = first * kPage / kg * kg; g0 < n_pages * kPage; g0 += kg) {
        const int64_t gi = h * KG + g0 / kg;
        copy_group_scores(qh, rep, D, codes + g0 / 2, stride, kcs.data_ptr<at::Half>() + gi * D,
                          kcm.data_ptr<at::Half>() + gi * D, kcmu.data_ptr<at::Half>() + gi * D,
                          ch.data(), nc, kg, s.data());
        for (int64_t r = 0; r < rep; ++r)
          for (int64_t p = std::max(first, g0 / kPage); p < (g0 + kg) / kPage; ++p) {
            page_best_mean(s.data() + r * kg + (p * kPage - g0), &each[r * n_pages + p], &mean);
            if (eh) eh[r * n_pages + p] = mean * scale + bonus;  // the page's mean key, for 16
          }
      }
    }
    for (int64_t p = first; !copy && p < n_pages; ++p) {
      half_row(kcent.data_ptr<at::Half>() + (h * kcent.size(1) + p) * D, D, a.data());
      half_row(kspread.data_ptr<at::Half>() + (h * kcent.size(1) + p) * D, D, b.data());
      for (int64_t r = 0; r < rep; ++r) {
        const float* qr = qh + r * D;
        float centre = 0.f, spread = 0.f;
        for (int64_t c = 0; c < D; ++c) {
          const float d = qr[c] * b[c];
          centre += qr[c] * a[c];
          spread += l2 ? d * d : std::fabs(d);
        }
        each[r * n_pages + p] = centre + (l2 ? std::sqrt(spread) : spread);
        if (eh) eh[r * n_pages + p] = centre * scale + bonus;  // the centre, for 16 tokens
      }
    }
    // a page's score: its largest over the query heads, or (mass) the attention the heads would
    // give it, each head's scores softmaxed over the pages, summed over the heads
    const float inv = 1.f / std::sqrt(static_cast<float>(D));
    for (int64_t r = 0; r < rep; ++r) {
      const float* e = each.data() + r * n_pages;
      if (!mass) {
        for (int64_t p = first; p < n_pages; ++p)
          score[p] = r ? std::max(score[p], e[p]) : e[p];
        continue;
      }
      float mx = -std::numeric_limits<float>::infinity(), sum = 0.f;
      for (int64_t p = first; p < n_pages; ++p) mx = std::max(mx, e[p]);
      for (int64_t p = first; p < n_pages; ++p) sum += std::exp((e[p] - mx) * inv);
      for (int64_t p = first; p < n_pages; ++p) score[p] += std::exp((e[p] - mx) * inv) / sum;
    }
    const int64_t want = keep - first;  // the rest by score (ties: the earlier page)
    auto better = [&](int32_t x, int32_t y) {
      return score[x] > score[y] || (score[x] == score[y] && x < y);
    };
    std::nth_element(idx.begin(), idx.begin() + want, idx.end(), better);
    std::sort(idx.begin(), idx.begin() + want);
    int32_t* o = op + h * keep;
    for (int64_t p = 0; p < first; ++p) o[p] = static_cast<int32_t>(p);
    std::copy(idx.begin(), idx.begin() + want, o + first);
  });
  return {out, est};
}

torch::Tensor decode_attention(torch::Tensor q,  // [Hq, D] fp32
                               torch::Tensor kc, torch::Tensor ks, torch::Tensor km,
                               torch::Tensor vc, torch::Tensor vs, torch::Tensor vm,
                               torch::Tensor kbuf, torch::Tensor vbuf,  // [H, W+G, D] fp16
                               torch::Tensor ksink, torch::Tensor vsink,  // [H, S, D] fp16
                               torch::Tensor vrot,  // [D, D] fp32 or empty
                               torch::Tensor pages,  // [H, P] int32, or empty: all of [0, nq)
                               torch::Tensor pool,  // [S, rec] bytes (kv_pages.cpp), or empty
                               torch::Tensor ptable,  // [H, P_cap] int32: page -> pool slot
                               torch::Tensor est,  // [H, Hq/H, P] fp32 (select_pages)
                               torch::Tensor vcent,  // [H, P_cap, D/2 + 4] 4-bit value means
                               int64_t nq, int64_t nb, int64_t k_bits, int64_t v_bits,
                               int64_t kg, int64_t vg, double sm_scale) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && q.is_contiguous(), "q must be contiguous fp32");
  TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous() && kbuf.is_contiguous() &&
                  vbuf.is_contiguous(), "cache tensors must be contiguous");
  const int Hq = q.size(0), D = q.size(1), H = kbuf.size(0);
  // quantized rows live in kc, vc, vs, vm [H, T, ...], or (paged) in pool records: a page's K
  // codes, V codes, V scales, V minimums (16 rows each), at the slot ptable gives
  const bool paged = ptable.numel() > 0;
  TORCH_CHECK(!paged || (ptable.dtype() == torch::kInt32 && ptable.is_contiguous() &&
                         ptable.dim() == 2 && ptable.size(0) == H && pool.is_contiguous() &&
                         pool.dtype() == torch::kUInt8), "bad KV page pool or table");
  const bool sparse = pages.numel() > 0;
  TORCH_CHECK(!sparse || (pages.dtype() == torch::kInt32 && pages.is_contiguous() &&
                          pages.dim() == 2 && pages.size(0) == H), "pages must be [H, P] int32");
  const int64_t nt = sparse ? pages.size(1) * kPage : nq;  // quantized tokens a head reads
  // pages not read, estimated (sparse only): a score per query head and page (select_pages),
  // and the page's mean value (4-bit codes, then an fp16 scale and minimum)
  const bool estimate = sparse && vcent.numel() > 0;
  TORCH_CHECK(!estimate || (est.dtype() == torch::kFloat32 && est.is_contiguous() &&
                            est.dim() == 3 && est.size(0) == H && est.size(1) * H == Hq &&
                            est.size(2) == nq / kPage && vcent.dtype() == torch::kUInt8 &&
                            vcent.is_contiguous() && vcent.size(0) == H &&
                            vcent.size(1) * kPage >= nq && vcent.size(2) == D / 2 + 4),
              "estimates must be [H, Hq/H, pages] fp32, value means [H, P_cap, D/2 + 4] bytes");
  const int64_t ne = estimate ? nq / kPage - pages.size(1) : 0;
  const int rep = Hq / H, N = nt + nb + ne;
  const int64_t cap = kbuf.size(1), T = paged ? ptable.size(1) * kPage : kc.size(1);
  const int64_t kb = k_bits == 16 ? 2 * D : D * k_bits / 8;  // bytes of a K row, a V row
  const int64_t vb = v_bits == 16 ? 2 * D : D * v_bits / 8;
  const int64_t vgs = v_bits == 16 ? 0 : D / vg, KG = T / kg;  // V groups per row, K groups
  TORCH_CHECK(nq <= T && nb <= cap && nq % kg == 0, "bad token counts");
  TORCH_CHECK(paged || (kc.size(2) * kc.element_size() == kb &&
                        vc.size(2) * vc.element_size() == vb), "K/V rows do not match the bits");
  const uint8_t* kc_b = paged ? nullptr : static_cast<const uint8_t*>(kc.data_ptr());
  const uint8_t* vc_b = paged ? nullptr : static_cast<const uint8_t*>(vc.data_ptr());
  const at::Half* vs_p = (paged || !vgs) ? nullptr : vs.data_ptr<at::Half>();
  const uint8_t* pool_b = paged ? pool.data_ptr<uint8_t>() : nullptr;
  const int32_t* tb = paged ? ptable.data_ptr<int32_t>() : nullptr;
  const int64_t rec = paged ? pool.size(1) : 0, pcap = paged ? ptable.size(1) : 0;
  // symmetric V stores no minimums (a row is (code - (2^b - 1)/2) * scale): its page records
  // are 2 bytes a group shorter, its minimum tensor empty
  const bool vsym = vgs && (paged ? rec == kPage * (kb + vb + 2 * vgs) : vm.numel() == 0);
  const at::Half* vm_p = (paged || !vgs || vsym) ? nullptr : vm.data_ptr<at::Half>();
  TORCH_CHECK(!paged || rec == kPage * (kb + vb + (vsym ? 2 : 4) * vgs),
              "KV page records of another size");
  const float vhalf = v_bits == 16 ? 0.f : ((1 << v_bits) - 1) / 2.f;
  auto page = [&](int64_t h, int64_t t) { return pool_b + tb[h * pcap + t / kPage] * rec; };
  // the K codes, V codes, V scales and V minimums of quantized token t of head h
  auto k_at = [&](int64_t h, int64_t t) {
    return paged ? page(h, t) + (t % kPage) * kb : kc_b + (h * T + t) * kb;
  };
  auto v_at = [&](int64_t h, int64_t t) {
    return paged ? page(h, t) + kPage * kb + (t % kPage) * vb : vc_b + (h * T + t) * vb;
  };
  auto vs_at = [&](int64_t h, int64_t t, int64_t which) {  // which: 0 scale, 1 minimum
    if (paged)
      return reinterpret_cast<const at::Half*>(page(h, t) + kPage * (kb + vb)) +
             (which * kPage + t % kPage) * vgs;
    return (which ? vm_p : vs_p) + (h * T + t) * vgs;
  };
  // sink tokens: at most nq (nq is 0 or at least one K group, which is longer than the sink)
  const int64_t ks_n = (k_bits < 16 && ksink.numel()) ? std::min<int64_t>(ksink.size(1), nq) : 0;
  const int64_t vs_n = (v_bits < 16 && vsink.numel()) ? std::min<int64_t>(vsink.size(1), nq) : 0;
  const int64_t ks_cap = ksink.numel() ? ksink.size(1) : 0;
  const int64_t vs_cap = vsink.numel() ? vsink.size(1) : 0;
  auto out = torch::zeros({Hq, D}, q.options());
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float scale = static_cast<float>(sm_scale);
  const bool rotated = vrot.numel() > 0 && v_bits < 16;
  TORCH_CHECK(!rotated || (vrot.dtype() == torch::kFloat32 && vrot.is_contiguous() &&
                           vrot.size(0) == D && vrot.size(1) == D), "vrot must be [D, D] fp32");
  const float* rot = rotated ? vrot.data_ptr<float>() : nullptr;

  const int32_t* pg = sparse ? pages.data_ptr<int32_t>() : nullptr;
  for (int64_t i = 0; sparse && i < pages.numel(); ++i)
    TORCH_CHECK(pg[i] >= 0 && (pg[i] + 1) * kPage <= nq, "a page past the quantized tokens");
  for (int64_t i = 1; estimate && i < pages.numel(); ++i)  // the rest is found by a merge
    TORCH_CHECK(i % pages.size(1) == 0 || pg[i - 1] < pg[i], "page lists must be ascending");
  for (int64_t h = 0; paged && h < H; ++h)  // every page read must be resident
    for (int64_t i = 0; i < (sparse ? pages.size(1) : nq / kPage); ++i)
      TORCH_CHECK(tb[h * pcap + (sparse ? pg[h * pages.size(1) + i] : i)] >= 0,
                  "a KV page that is not resident");

  parallel_chunks(H, [&](int64_t h0) {
    const int64_t h1 = h0 + 1;
    std::vector<float> s(static_cast<size_t>(rep) * N), row(D), qs(rep * D), qm(rep);
    std::vector<float> gsc(D), gmn(D);  // a K group's per-channel scales and minimums
    std::vector<float> rows8(8 * D);  // 8 keys' or values' codes as floats
    std::vector<float> ga(8 * vgs), gb(8 * vgs);  // their V scales and minimums
    std::vector<float> exact8(8 * D);  // up to 8 exact value rows waiting to be added
    int64_t at8[8];  // their positions among the N scores
    int n8 = 0;
    std::vector<float> acc_rot(rotated ? rep * D : 0);
    std::vector<float> vbias(static_cast<size_t>(rep) * vgs);
    for (int64_t h = h0; h < h1; ++h) {
      const float* qh = qp + h * rep * D;
      const int32_t* hp = sparse ? pg + h * pages.size(1) : nullptr;
      // the i-th quantized token this head reads
      auto token = [&](int64_t i) { return sparse ? hp[i / kPage] * kPage + i % kPage : i; };
      // ---- scores over the quantized pages
      int64_t g_lo = 0, g_hi = 0;  // the tokens of the K group folded into qs, qm
      for (int64_t i = 0; i < nt; ++i) {
        const int64_t t = token(i);
        if (k_bits == 16) {
          half_row(reinterpret_cast<const at::Half*>(k_at(h, t)), D, row.data());
          score_row(qh, row.data(), rep, D, scale, 0.f, s.data() + i, N);
          continue;
        }
        if (t < g_lo || t >= g_hi) {  // new K group: fold its per-channel scale, min into q
          g_lo = t / kg * kg;  // (a sparse step's pages lie in many groups: once a page, often)
          g_hi = g_lo + kg;
          half_row(ks.data_ptr<at::Half>() + (h * KG + t / kg) * D, D, gsc.data());
          half_row(km.data_ptr<at::Half>() + (h * KG + t / kg) * D, D, gmn.data());
          for (int r = 0; r < rep; ++r) {
            float m = 0.f;
            for (int c = 0; c < D; ++c) {
              qs[r * D + c] = qh[r * D + c] * gsc[c];
              m += qh[r * D + c] * gmn[c];
            }
            qm[r] = m;
          }
        }
        if (t < ks_n) {
          half_row(ksink.data_ptr<at::Half>() + (h * ks_cap + t) * D, D, row.data());
          score_row(qh, row.data(), rep, D, scale, 0.f, s.data() + i, N);
          continue;
        }
#ifdef __AVX2__
        if (i % 8 == 0 && i + 8 <= nt && D % 8 == 0) {  // 8 tokens of one page, one K group
          for (int j = 0; j < 8; ++j) unpack_row(k_at(h, t + j), k_bits, D, rows8.data() + j * D);
          for (int r = 0; r < rep; ++r) {
            const __m256 sum = dot8(qs.data() + r * D, rows8.data(), D);
            const __m256 v = _mm256_mul_ps(_mm256_add_ps(sum, _mm256_set1_ps(qm[r])),
                                           _mm256_set1_ps(scale));
            _mm256_storeu_ps(s.data() + r * N + i, v);
          }
          i += 7;
          continue;
        }
#endif
        unpack_row(k_at(h, t), k_bits, D, row.data());
        for (int r = 0; r < rep; ++r) {
          float acc = qm[r];
          for (int c = 0; c < D; ++c) acc += qs[r * D + c] * row[c];
          s[r * N + i] = acc * scale;
        }
      }
      // ---- scores over the fp16 buffer
      for (int64_t t = 0; t < nb; ++t) {
        half_row(kbuf.data_ptr<at::Half>() + (h * cap + t) * D, D, row.data());
        score_row(qh, row.data(), rep, D, scale, 0.f, s.data() + nt + t, N);
      }
      // ---- scores of the pages not read: one estimated token each, for its 16
      std::vector<int32_t> rest;  // their page numbers
      if (estimate) {
        rest.reserve(ne);
        for (int64_t p = 0, i = 0; p < nq / kPage; ++p) {
          if (i < pages.size(1) && hp[i] == p) {
            ++i;
            continue;
          }
          rest.push_back(static_cast<int32_t>(p));
        }
        const float* eh = est.data_ptr<float>() + h * rep * (nq / kPage);
        for (int r = 0; r < rep; ++r)
          for (int64_t u = 0; u < ne; ++u) s[r * N + nt + nb + u] = eh[r * (nq / kPage) + rest[u]];
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
      // ---- weighted sum of V. A quantized row is code * scale + min per group of vg channels:
      // its codes are summed with weight p * scale, and p * min goes to one sum per group,
      // spread over the group's channels at the end (no dequantized row is formed)
      float* oh = op + h * rep * D;
      float* qdst = rotated ? acc_rot.data() : oh;  // where the quantized rows' sums go
      std::fill(acc_rot.begin(), acc_rot.end(), 0.f);
      std::fill(vbias.begin(), vbias.end(), 0.f);
      const int64_t vcb = D / 2 + 4;  // bytes of a page's value mean
      const uint8_t* vce = estimate ? vcent.data_ptr<uint8_t>() + h * vcent.size(1) * vcb : nullptr;
      for (int64_t i = 0; i < N; ++i) {
        const bool quantized = i < nt;
        const int64_t t = quantized ? token(i) : i;
#ifdef __AVX2__
        if (quantized && t >= vs_n && v_bits < 16 && i % 8 == 0 && i + 8 <= nt && vg % 8 == 0) {
          // 8 tokens of one page: each output chunk of 8 channels loaded and stored once
          for (int j = 0; j < 8; ++j) {
            unpack_row(v_at(h, t + j), v_bits, D, rows8.data() + j * D);
            const at::Half* sc = vs_at(h, t + j, 0);
            const at::Half* mn = vsym ? nullptr : vs_at(h, t + j, 1);
            for (int64_t g = 0; g < vgs; ++g) {
              ga[j * vgs + g] = static_cast<float>(sc[g]);
              gb[j * vgs + g] = vsym ? -vhalf * ga[j * vgs + g] : static_cast<float>(mn[g]);
            }
          }
          for (int r = 0; r < rep; ++r) {
            const float* pr = s.data() + r * N + i;
            for (int64_t g = 0; g < vgs; ++g) {
              float b = 0.f;
              for (int j = 0; j < 8; ++j) b += pr[j] * gb[j * vgs + g];
              vbias[r * vgs + g] += b;
            }
            for (int64_t c = 0; c < D; c += 8) {
              const int64_t g = c / vg;
              __m256 acc = _mm256_loadu_ps(qdst + r * D + c);
              for (int j = 0; j < 8; ++j)
                acc = _mm256_fmadd_ps(_mm256_set1_ps(pr[j] * ga[j * vgs + g]),
                                      _mm256_loadu_ps(rows8.data() + j * D + c), acc);
              _mm256_storeu_ps(qdst + r * D + c, acc);
            }
          }
          i += 7;
          continue;
        }
#endif
        if (quantized && t >= vs_n && v_bits < 16) {
          unpack_row(v_at(h, t), v_bits, D, row.data());
          const at::Half* sc = vs_at(h, t, 0);
          const at::Half* mn = vsym ? nullptr : vs_at(h, t, 1);
          for (int64_t g = 0; g < vgs; ++g) {
            const float a = static_cast<float>(sc[g]);
            const float b = vsym ? -vhalf * a : static_cast<float>(mn[g]);
            for (int r = 0; r < rep; ++r) {
              const float p = s[r * N + i];
              vbias[r * vgs + g] += p * b;
              const float w = p * a;
              const float* x = row.data() + g * vg;
              float* o = qdst + r * D + g * vg;
              for (int64_t c = 0; c < vg; ++c) o[c] += w * x[c];
            }
          }
          continue;
        }
        // exact rows (sink, fp16 cache, window) and page means: gathered 8 at a time
        float* x = exact8.data() + n8 * D;
        if (quantized && t < vs_n) {
          half_row(vsink.data_ptr<at::Half>() + (h * vs_cap + t) * D, D, x);
        } else if (quantized) {
          half_row(reinterpret_cast<const at::Half*>(v_at(h, t)), D, x);
        } else if (i < nt + nb) {
          half_row(vbuf.data_ptr<at::Half>() + (h * cap + (i - nt)) * D, D, x);
        } else {  // a page not read: its mean value
          const uint8_t* m = vce + rest[i - nt - nb] * vcb;
          at::Half sm[2];
          std::memcpy(sm, m + D / 2, sizeof sm);
          unpack_row(m, 4, D, x);
          const float a = static_cast<float>(sm[0]), b = static_cast<float>(sm[1]);
          for (int c = 0; c < D; ++c) x[c] = x[c] * a + b;
        }
        at8[n8++] = i;
        if (n8 == 8) add_rows(oh, rep, D, s.data(), N, at8, n8, exact8.data());
      }
      add_rows(oh, rep, D, s.data(), N, at8, n8, exact8.data());
      for (int r = 0; r < rep; ++r)
        for (int64_t g = 0; g < vgs; ++g) {
          float* o = qdst + r * D + g * vg;
          for (int64_t c = 0; c < vg; ++c) o[c] += vbias[r * vgs + g];
        }
      // ---- back from the rotated basis: o += acc_rot @ vrot^T
      for (int r = 0; r < rotated * rep; ++r) {
        const float* a = acc_rot.data() + r * D;
        float* o = oh + r * D;
        for (int c = 0; c < D; ++c) {
          float x = 0.f;
          for (int j = 0; j < D; ++j) x += a[j] * rot[c * D + j];
          o[c] += x;
        }
      }
    }
  });
  return out;
}
