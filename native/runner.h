// The torch runner's C++ kernels, built as one extension (localai/engine/torch/native.py):
// pool.cpp (the threads they share), qmatmul.cpp (products with GGUF-block matrices on ggml's kernels), kv_pages.cpp (KV pages on disk under a RAM pool), kv_attention.cpp (decode
// attention over the quantized KV pages), decode.cpp (one decode step of a layer, fused), and
// module.cpp (the Python bindings). Each has a pure-torch reference that tests hold it to.
#pragma once
#include <torch/extension.h>

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

// ---- pool.cpp
// fn(0) .. fn(n - 1) on this thread and helpers; returns when all have run
void parallel_chunks(int64_t n, const std::function<void(int64_t)>& fn);
void set_threads(int64_t n);  // threads a job may use, the caller's included (default 1)
int pool_threads();

// ---- qmatmul.cpp
void ggml_bind(const std::string& cpu_lib, const std::string& base_lib);
int64_t ggml_row_size(int64_t type, int64_t n);
bool ggml_has_sgemm();
bool ggml_has_graph();
int64_t ggml_dot_type(int64_t type);
torch::Tensor ggml_dequantize(torch::Tensor raw, int64_t type, int64_t cols);
torch::Tensor ggml_quantize(torch::Tensor x, int64_t type);

// One or more GGUF matrices that read the same input, their outputs side by side.
class QMatrices {
  struct Mat {
    const uint8_t* w;
    int64_t rows, row_bytes, col0;  // col0: the first output column
    void (*dot)(int, float*, size_t, const void*, size_t, const void*, size_t, int);
    int dot_type, type;
  };

 public:
  QMatrices(std::vector<torch::Tensor> rows, std::vector<int64_t> types);
  // x: [N, I] fp32 -> [N, O] fp32
  torch::Tensor forward(torch::Tensor x) const;
  // y[n * O + o] = (x[n] . W[o]) for n < N; x is N rows of I floats
  void apply(const float* x, int64_t N, float* y) const;
  int64_t in_features() const { return in_; }
  int64_t out_features() const { return out_; }

 private:
  std::vector<torch::Tensor> rows_;  // keeps the mapped rows alive
  std::vector<Mat> mats_;
  std::vector<int> dot_types_;  // distinct activation formats the matrices read
  int64_t in_ = 0, out_ = 0;
};

// ---- kv_pages.cpp
// The quantized KV pages of every layer and KV head on disk, `slots` of them resident in RAM:
// pool [slots, rec] bytes, table [L, H, P] int32 (a page's slot, or -1). `ahead`: layers
// after the one a step makes resident whose pages of the step before are read ahead meanwhile,
// on a thread of the pool's own (0: none)
class KVPages {
 public:
  KVPages(const std::string& path, int64_t layers, int64_t heads, int64_t pages, int64_t rec,
          int64_t slots, int64_t ahead);
  ~KVPages();
  KVPages(const KVPages&) = delete;
  KVPages& operator=(const KVPages&) = delete;
  // pages [p0, p0 + n) of every head of `layer`: data [H, n, rec] bytes, to disk and the pool
  void write(int64_t layer, int64_t p0, torch::Tensor data);
  // make `pages` ([heads, k], per head) of `layer` resident
  void ensure(int64_t layer, const int32_t* pages, int64_t heads, int64_t k);
  void ensure_tensor(int64_t layer, torch::Tensor pages);
  void wait();  // until every read ahead asked for is done
  // pages [0, n) of every head of `layer`, [H, n, rec], read from disk (the pool unchanged)
  torch::Tensor read(int64_t layer, int64_t n);
  void reset();  // forget every page
  int64_t resident() const;
  // pages found resident, pages read by ensure, pages read in bulk, pages resident now, pages
  // read ahead, of those found resident by a later ensure
  std::vector<int64_t> stats() const;
  torch::Tensor pool, table;

 private:
  // a slot to fill: a free one, else by the clock; -1 (or, `must`, an error) if every slot
  // is pinned by the current call (or, read ahead, holds a page of `spare`)
  int32_t victim(bool must = true, const std::vector<int64_t>* spare = nullptr);
  void place(int64_t flat, int32_t slot, bool pin = true);
  void read_at(uint8_t* dst, int64_t n, int64_t off) const;
  int64_t resident_locked() const;
  void read_later(int64_t layer);  // queue `layer`'s last pages (last_) for read_ahead
  void read_ahead();  // the background thread: `jobs_` until `stop_`
  int fd_ = -1;
  int64_t L_, H_, P_, rec_, S_, ahead_, used_ = 0, hand_ = 0, written_ = 0, epoch_ = 0;
  int64_t hits_ = 0, misses_ = 0, bulk_ = 0, ahead_read_ = 0, ahead_used_ = 0;
  std::vector<int64_t> owner_, pin_;
  std::vector<uint8_t> ref_, early_;  // early_: read ahead, not asked for since
  // every member above is the pool's state, guarded by mu_ (the pool's bytes: a slot is
  // written only while no step may read it, see victim)
  mutable std::mutex mu_;
  std::condition_variable wake_, idle_;
  std::vector<std::vector<int64_t>> last_;  // per layer: the pages its last ensure asked for
  std::deque<std::pair<int64_t, std::vector<int64_t>>> jobs_;  // (layer, flat page numbers)
  uint64_t gen_ = 0;  // bumped by write and reset: a page read before is dropped
  bool stop_ = false, busy_ = false;
  std::thread thread_;  // started by the first read_later
};

// ---- kv_attention.cpp
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor kc, torch::Tensor ks,
                               torch::Tensor km, torch::Tensor vc, torch::Tensor vs,
                               torch::Tensor vm, torch::Tensor kbuf, torch::Tensor vbuf,
                               torch::Tensor ksink, torch::Tensor vsink, torch::Tensor vrot,
                               torch::Tensor pages, torch::Tensor pool, torch::Tensor ptable,
                               torch::Tensor est, torch::Tensor vcent, int64_t nq, int64_t nb,
                               int64_t k_bits, int64_t v_bits, int64_t kg, int64_t vg,
                               double sm_scale);

// per KV head, `keep` ascending page numbers: pages [0, first), then the best of [first, n_pages)
// (kv.py page summaries: centre, spread; l2 for "meanstd", L1 for "minmax"; or the keys' 4-bit
// copy with its scales, minimums and means per group of kg tokens, "keys", read on `channels`
// channels); and (estimate) each query head's score of each page as one token for its 16,
// [H, Hq/H, n_pages] fp32, what decode_attention counts a page it does not read as
std::tuple<torch::Tensor, torch::Tensor> select_pages(
    torch::Tensor q, torch::Tensor kcent, torch::Tensor kspread, torch::Tensor kcopy,
    torch::Tensor kcs, torch::Tensor kcm, torch::Tensor kcmu, int64_t n_pages, int64_t keep,
    int64_t first, bool l2, bool mass, int64_t kg, int64_t channels, double sm_scale,
    bool estimate);

// ---- decode.cpp
// One decode step of a block's attention half: x += o(attend(rope(qkv(rms_norm(x))))), with the
// new token's K and V appended to the layer's fp16 buffer.
class DecodeAttention {
 public:
  DecodeAttention(torch::Tensor norm, double eps, std::shared_ptr<QMatrices> qkv,
                  torch::Tensor bias, std::shared_ptr<QMatrices> o, int64_t n_heads,
                  int64_t n_kv_heads, int64_t head_dim, int64_t rope_dims, bool neox,
                  std::vector<torch::Tensor> kv, std::vector<int64_t> kv_cfg,
                  std::shared_ptr<KVPages> pages);
  // x: [1, E] fp32, updated in place; cos, sin: [rope_dims / 2] at the token's position;
  // nq quantized tokens, nb buffered ones before this token (which goes to buffer row nb);
  // keep > 0: attend to `keep` pages of the quantized ones (select_pages, first sink pages)
  void forward(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, int64_t nq, int64_t nb,
               int64_t keep, int64_t first) const;

 private:
  torch::Tensor norm_, bias_;
  double eps_;
  std::shared_ptr<QMatrices> qkv_, o_;
  int64_t hq_, h_, d_, rd_;
  bool neox_;
  // kc, ks, km, vc, vs, vm, kbuf, vbuf, ksink, vsink, kcent, kspread, vrot, and the page pool
  // and this layer's page table when the pages are on disk (else empty)
  std::vector<torch::Tensor> kv_;
  // k_bits, v_bits, k_group, v_group, page selection (bit 0: meanstd, bit 1: mass), layer
  std::vector<int64_t> cfg_;
  std::shared_ptr<KVPages> pages_;  // null: every page in RAM
};

// One decode step of a dense SwiGLU FFN: x += down(silu(gate(h)) * up(h)), h = rms_norm(x).
class DecodeDenseFFN {
 public:
  DecodeDenseFFN(torch::Tensor norm, double eps, std::shared_ptr<QMatrices> gate_up,
                 std::shared_ptr<QMatrices> down);
  void forward(torch::Tensor x) const;

 private:
  torch::Tensor norm_;
  double eps_;
  std::shared_ptr<QMatrices> gate_up_, down_;
};

// helpers shared by the fused steps
void rms_norm_row(const float* x, const float* w, int64_t n, double eps, float* out);
