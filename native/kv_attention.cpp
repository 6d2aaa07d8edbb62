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
// summed over the heads. With a 2-bit copy of the keys (kv.py "keys2": codes [H, T_cap, D/4],
// per-channel scale and minimum per K group [H, T_cap/kg, D]) a page's score for a query head is
// instead its best token's q . k over the copy (the group's scale folded into the query, as the
// decode kernel does for quantized K). With the page means (kcent: keys' centre, vcent: values'
// mean; vcent empty when not kept), a sparse step also counts every page it does not read as one
// estimated token standing for its 16: score q . kcent + ln 16, value vcent (attention.py's
// estimate).
// The pure-torch definitions are attention.decode_reference and attention.select_pages_reference;
// tests hold each pair to a tolerance.
#include <c10/util/Half.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
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

// One query head against one K group of the 2-bit key copy: qs = q * scale (per channel) as int8
// codes qi times `step` (round to nearest even of qs / step, step = max |qs| / 127), and the
// returned q . min; a token then scores q . min + step * (qi . codes), an integer dot product.
// attention.copy_scores computes the same.
inline float fold_int8(const float* q, const float* scale, const float* lo, int64_t D, float* qs,
                       int8_t* qi, float* step) {
  float m = 0.f, top = 0.f;
  for (int64_t c = 0; c < D; ++c) {
    qs[c] = q[c] * scale[c];
    m += q[c] * lo[c];
    top = std::max(top, std::fabs(qs[c]));
  }
  *step = top / 127.f;
  const float inv = top > 0.f ? 127.f / top : 0.f;
  for (int64_t c = 0; c < D; ++c) qi[c] = static_cast<int8_t>(std::nearbyint(qs[c] * inv));
  return m;
}

// qi[r] . codes for the rep heads (qi: rep rows of D int8) over one row of 2-bit codes (planar:
// channel j*R + i in byte i at bit 2j, R = D/4); `emit(r, dot)` per head.
template <class Emit>
inline void dot_codes2(const uint8_t* row, const int8_t* qi, int64_t rep, int64_t D, Emit emit) {
  const int64_t R = D / 4;
#ifdef __AVX2__
  constexpr int64_t kMaxChunks = 4;  // D <= 256
  if (R % 16 == 0 && R / 16 <= kMaxChunks) {  // 16 bytes at a time: 4 planes of 16 channels
    const __m128i three = _mm_set1_epi8(3);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i lo[kMaxChunks], hi[kMaxChunks];
    const int64_t chunks = R / 16;
    for (int64_t j = 0; j < chunks; ++j) {
      const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * j));
      const __m128i p0 = _mm_and_si128(x, three), p1 = _mm_and_si128(_mm_srli_epi16(x, 2), three);
      const __m128i p2 = _mm_and_si128(_mm_srli_epi16(x, 4), three);
      const __m128i p3 = _mm_and_si128(_mm_srli_epi16(x, 6), three);
      lo[j] = _mm256_set_m128i(p1, p0);
      hi[j] = _mm256_set_m128i(p3, p2);
    }
    for (int64_t r = 0; r < rep; ++r) {
      const int8_t* w = qi + r * D;
      __m256i acc = _mm256_setzero_si256();
      for (int64_t j = 0; j < chunks; ++j) {
        // the query's codes laid out as the planes: [plane 0 | plane 1], [plane 2 | plane 3]
        const __m256i w01 = _mm256_set_m128i(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + R + 16 * j)),
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16 * j)));
        const __m256i w23 = _mm256_set_m128i(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 3 * R + 16 * j)),
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 2 * R + 16 * j)));
        const __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(lo[j], w01),
                                           _mm256_maddubs_epi16(hi[j], w23));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(s, ones));
      }
      __m128i v = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
      v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0x4E));
      v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0xB1));
      emit(r, _mm_cvtsi128_si32(v));
    }
    return;
  }
#endif
  for (int64_t r = 0; r < rep; ++r) {
    const int8_t* w = qi + r * D;
    int32_t dot = 0;
    for (int64_t j = 0; j < 4; ++j)
      for (int64_t i = 0; i < R; ++i) dot += w[j * R + i] * ((row[i] >> (2 * j)) & 3);
    emit(r, dot);
  }
}

}  // namespace

torch::Tensor select_pages(torch::Tensor q,  // [Hq, D] fp32
                           torch::Tensor kcent, torch::Tensor kspread,  // [H, P_cap, D] fp16
                           torch::Tensor k2, torch::Tensor k2s, torch::Tensor k2m,  // or empty
                           int64_t n_pages, int64_t keep, int64_t first, bool l2, bool mass,
                           int64_t kg) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && q.is_contiguous(), "q must be contiguous fp32");
  const bool copy = k2.numel() > 0;
  TORCH_CHECK(kcent.dtype() == torch::kHalf && kcent.is_contiguous() &&
                  (copy || (kspread.is_contiguous() && kcent.sizes() == kspread.sizes())),
              "page summaries must be contiguous fp16");
  const int64_t Hq = q.size(0), D = q.size(1), H = kcent.size(0), cap = kcent.size(1);
  TORCH_CHECK(kcent.size(2) == D && Hq % H == 0, "page summaries do not match the query");
  TORCH_CHECK(0 <= first && first <= keep && keep < n_pages && n_pages <= cap,
              "select_pages: need first <= keep < n_pages <= capacity");
  TORCH_CHECK(!copy || (k2.dtype() == torch::kUInt8 && k2.is_contiguous() && k2.dim() == 3 &&
                        k2.size(0) == H && k2.size(1) == cap * kPage && k2.size(2) == D / 4 &&
                        k2s.dtype() == torch::kHalf && k2s.is_contiguous() &&
                        k2m.is_contiguous() && k2s.sizes() == k2m.sizes() && kg % kPage == 0 &&
                        k2s.size(1) * kg == k2.size(1) && k2s.size(2) == D),
              "the keys' 2-bit copy must be [H, T, D/4] codes, [H, T/kg, D] fp16 scales");
  const int64_t rep = Hq / H;
  auto out = torch::empty({H, keep}, torch::dtype(torch::kInt32));
  const float* qp = q.data_ptr<float>();
  int32_t* op = out.data_ptr<int32_t>();
  parallel_chunks(H, [&](int64_t h) {
    const at::Half* cp = kcent.data_ptr<at::Half>() + h * cap * D;
    const at::Half* sp = kspread.data_ptr<at::Half>() + h * cap * D;
    std::vector<float> score(n_pages, 0.f), each(rep * n_pages), a(D), b(D);
    std::vector<int32_t> idx;
    idx.reserve(n_pages - first);
    if (copy) {  // each head's best token of the page, over the 2-bit copy
      const uint8_t* codes = k2.data_ptr<uint8_t>() + h * k2.size(1) * (D / 4);
      const int64_t KG = k2s.size(1);
      std::vector<float> qs(D), step(rep), qm(rep);
      std::vector<int8_t> qi(rep * D);
      for (int64_t p = first; p < n_pages; ++p) {
        const int64_t t0 = p * kPage;
        if (p == first || t0 % kg == 0) {  // a new K group: fold its scale into q, as int8
          half_row(k2s.data_ptr<at::Half>() + (h * KG + t0 / kg) * D, D, a.data());
          half_row(k2m.data_ptr<at::Half>() + (h * KG + t0 / kg) * D, D, b.data());
          for (int64_t r = 0; r < rep; ++r)
            qm[r] = fold_int8(qp + (h * rep + r) * D, a.data(), b.data(), D, qs.data(),
                              qi.data() + r * D, &step[r]);
        }
        for (int64_t r = 0; r < rep; ++r)
          each[r * n_pages + p] = -std::numeric_limits<float>::infinity();
        for (int64_t t = t0; t < t0 + kPage; ++t)
          dot_codes2(codes + t * (D / 4), qi.data(), rep, D, [&](int64_t r, int32_t dot) {
            float& e = each[r * n_pages + p];
            e = std::max(e, qm[r] + step[r] * static_cast<float>(dot));
          });
        idx.push_back(static_cast<int32_t>(p));
      }
    }
    for (int64_t p = first; !copy && p < n_pages; ++p) {
      half_row(cp + p * D, D, a.data());
      half_row(sp + p * D, D, b.data());
      for (int64_t r = 0; r < rep; ++r) {
        const float* qr = qp + (h * rep + r) * D;
        float centre = 0.f, spread = 0.f;
        for (int64_t c = 0; c < D; ++c) {
          const float d = qr[c] * b[c];
          centre += qr[c] * a[c];
          spread += l2 ? d * d : std::fabs(d);
        }
        each[r * n_pages + p] = centre + (l2 ? std::sqrt(spread) : spread);
      }
      idx.push_back(static_cast<int32_t>(p));
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
  return out;
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
                               torch::Tensor kcent,  // [H, P_cap, D] fp16 page key centres
                               torch::Tensor vcent,  // [H, P_cap, D] fp16 value means, or empty
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
  // pages not read, estimated from their means (sparse only)
  const bool estimate = sparse && vcent.numel() > 0;
  TORCH_CHECK(!estimate || (kcent.dtype() == torch::kHalf && vcent.dtype() == torch::kHalf &&
                            kcent.is_contiguous() && vcent.is_contiguous() &&
                            kcent.sizes() == vcent.sizes() && kcent.size(0) == H &&
                            kcent.size(1) * kPage >= nq && kcent.size(2) == D),
              "page means must be [H, P_cap, D] fp16");
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
  const at::Half* vm_p = (paged || !vgs) ? nullptr : vm.data_ptr<at::Half>();
  const uint8_t* pool_b = paged ? pool.data_ptr<uint8_t>() : nullptr;
  const int32_t* tb = paged ? ptable.data_ptr<int32_t>() : nullptr;
  const int64_t rec = paged ? pool.size(1) : 0, pcap = paged ? ptable.size(1) : 0;
  TORCH_CHECK(!paged || rec == kPage * (kb + vb + 4 * vgs), "KV page records of another size");
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
          g_lo = t / kg * kg;
          g_hi = g_lo + kg;
          const at::Half* sc = ks.data_ptr<at::Half>() + (h * KG + t / kg) * D;
          const at::Half* mn = km.data_ptr<at::Half>() + (h * KG + t / kg) * D;
          for (int r = 0; r < rep; ++r) {
            float m = 0.f;
            for (int c = 0; c < D; ++c) {
              qs[r * D + c] = qh[r * D + c] * static_cast<float>(sc[c]);
              m += qh[r * D + c] * static_cast<float>(mn[c]);
            }
            qm[r] = m;
          }
        }
        if (t < ks_n) {
          half_row(ksink.data_ptr<at::Half>() + (h * ks_cap + t) * D, D, row.data());
          score_row(qh, row.data(), rep, D, scale, 0.f, s.data() + i, N);
          continue;
        }
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
        const float bonus = std::log(static_cast<float>(kPage));
        const at::Half* kce = kcent.data_ptr<at::Half>() + h * kcent.size(1) * D;
        for (int64_t u = 0; u < ne; ++u) {
          half_row(kce + rest[u] * D, D, row.data());
          score_row(qh, row.data(), rep, D, scale, bonus, s.data() + nt + nb + u, N);
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
      // ---- weighted sum of V. A quantized row is code * scale + min per group of vg channels:
      // its codes are summed with weight p * scale, and p * min goes to one sum per group,
      // spread over the group's channels at the end (no dequantized row is formed)
      float* oh = op + h * rep * D;
      float* qdst = rotated ? acc_rot.data() : oh;  // where the quantized rows' sums go
      std::fill(acc_rot.begin(), acc_rot.end(), 0.f);
      std::fill(vbias.begin(), vbias.end(), 0.f);
      const at::Half* vce = estimate ? vcent.data_ptr<at::Half>() + h * vcent.size(1) * D : nullptr;
      for (int64_t i = 0; i < N; ++i) {
        const bool quantized = i < nt;
        const int64_t t = quantized ? token(i) : i;
        if (quantized && t >= vs_n && v_bits < 16) {
          unpack_row(v_at(h, t), v_bits, D, row.data());
          const at::Half* sc = vs_at(h, t, 0);
          const at::Half* mn = vs_at(h, t, 1);
          for (int64_t g = 0; g < vgs; ++g) {
            const float a = static_cast<float>(sc[g]), b = static_cast<float>(mn[g]);
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
        if (quantized && t < vs_n) {
          half_row(vsink.data_ptr<at::Half>() + (h * vs_cap + t) * D, D, row.data());
        } else if (quantized) {
          half_row(reinterpret_cast<const at::Half*>(v_at(h, t)), D, row.data());
        } else if (i < nt + nb) {
          half_row(vbuf.data_ptr<at::Half>() + (h * cap + (i - nt)) * D, D, row.data());
        } else {  // a page not read: its mean value
          half_row(vce + rest[i - nt - nb] * D, D, row.data());
        }
        for (int r = 0; r < rep; ++r) {  // exact rows (sink, fp16 cache, window), page means
          const float p = s[r * N + i];
          float* o = oh + r * D;
          for (int c = 0; c < D; ++c) o[c] += p * row[c];
        }
      }
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
