// Quantized matrix products on GGUF blocks as they are in the file: y = x @ W.T.
//
// W is one or more matrices in their GGUF block formats (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K,
// Q6_K, F16, F32, ...), rows straight from the file's memory map: no copy, no re-quantization.
// The arithmetic is ggml's own, through its public CPU type traits (`ggml_get_type_traits_cpu`,
// exported by the libggml-cpu.so that llama-cpp-python installs): each activation row is rounded
// once to the weight type's dot-product format (Q8_0, Q8_1 or Q8_K blocks: `from_float`) and
// each output is one `vec_dot` of a weight row with it: the kernels, dispatched for this CPU's
// instruction set, and the rounding of llama.cpp's own matrix-vector path. So the two runners
// agree to the last bit on each product, and a CPU llama.cpp is fast on is fast here too.
//
// Threads split the output rows (pool.cpp: chunks claimed one at a time). Matrices that read the same
// input (Q, K and V; gate and up) are one QMatrices: the input is rounded once per dot format
// and their rows are one range to split, so no thread waits at a barrier between them.
// A batch (prefill) takes what llama.cpp's prompt processing takes: llamafile's GEMM for the
// 32-weight formats, called per thread, and ggml's own mul_mat for the rest (through its graph
// API: for K-quants its tiled integer GEMM, 2-3x one vec_dot per output). Both sum the same
// integer products as vec_dot in another order, so a batch equals one-row products to float
// rounding (~1e-6 of the scale), not to the bit; a row-by-row vec_dot loop is the fallback.
//
// The pure-torch definition (the gguf package's dequantization, an fp32 product) is
// weights.QLinear.dense; tests hold the two to a tolerance set by the activation rounding.
#include <dlfcn.h>

#include <algorithm>

#include "runner.h"

namespace {

// ggml's ABI (ggml.h and ggml-cpu.h of the pinned llama-cpp-python)
using vec_dot_t = void (*)(int n, float* s, size_t bs, const void* x, size_t bx, const void* y,
                           size_t by, int nrc);
using from_float_t = void (*)(const float* x, void* y, int64_t k);
using to_float_t = void (*)(const void* x, float* y, int64_t k);
struct TypeTraitsCpu {  // struct ggml_type_traits_cpu
  from_float_t from_float;
  vec_dot_t vec_dot;
  int vec_dot_type;
  int64_t nrows;
};
struct TypeTraits {  // struct ggml_type_traits
  const char* type_name;
  int64_t blck_size;
  int64_t blck_size_interleave;
  size_t type_size;
  bool is_quantized;
  to_float_t to_float;
  from_float_t from_float_ref;
};

// The leading fields of ggml's private struct ggml_compute_params: the batched kernels for the
// 32-weight block formats (tinyBLAS_Q0_AVX in llamafile_sgemm) read only ith and nth, a static
// split of the output tiles, so a caller's own threads can each run their share.
struct ComputeParams {
  int ith, nth;
  size_t wsize;
  void* wdata;
  void* threadpool;
  bool use_ref;
};
struct InitParams {  // struct ggml_init_params
  size_t mem_size;
  void* mem_buffer;
  bool no_alloc;
};
using sgemm_t = bool (*)(const ComputeParams*, int64_t m, int64_t n, int64_t k, const void* A,
                         int64_t lda, const void* B, int64_t ldb, void* C, int64_t ldc, int Atype,
                         int Btype, int Ctype);

constexpr int GGML_TYPE_F32 = 0, GGML_TYPE_Q4_0 = 2, GGML_TYPE_Q5_0 = 6, GGML_TYPE_Q8_0 = 8;
constexpr int GGML_TYPE_IQ4_NL = 20;
constexpr int GGML_TYPE_COUNT = 43;

// weight types whose batched product llamafile_sgemm computes from Q8_0 inputs on x86 (the
// others only on ARM/POWER, or through its thread pool)
bool sgemm_type(int t) {
  return t == GGML_TYPE_Q8_0 || t == GGML_TYPE_Q4_0 || t == GGML_TYPE_Q5_0 ||
         t == GGML_TYPE_IQ4_NL;
}

struct Ggml {
  const TypeTraitsCpu* (*cpu_traits)(int) = nullptr;
  const TypeTraits* (*traits)(int) = nullptr;
  size_t (*row_size)(int, int64_t) = nullptr;
  int64_t (*blck_size)(int) = nullptr;
  size_t (*quantize_chunk)(int, const float*, void*, int64_t, int64_t, int64_t,
                           const float*) = nullptr;
  sgemm_t sgemm = nullptr;  // absent from builds without llamafile: then vec_dot only
  // ggml's graph API, for one batched product through its own mul_mat (`graph_product`);
  // null when a symbol is missing: then vec_dot only
  void* (*init)(InitParams) = nullptr;
  void (*free_ctx)(void*) = nullptr;
  size_t (*tensor_overhead)() = nullptr;
  size_t (*graph_overhead)() = nullptr;
  void* (*new_tensor_2d)(void*, int, int64_t, int64_t) = nullptr;
  void* (*mul_mat)(void*, void*, void*) = nullptr;
  void* (*new_graph)(void*) = nullptr;
  void (*build_forward_expand)(void*, void*) = nullptr;
  int (*graph_compute_with_ctx)(void*, void*, int) = nullptr;
  void* (*buffer_from_ptr)(void*, size_t) = nullptr;
  int (*tensor_alloc)(void*, void*, void*) = nullptr;
  void (*buffer_free)(void*) = nullptr;
  bool graph = false;  // every symbol above bound
};
Ggml g;

// out = the symbol `name` of lib; an optional one may be absent (then null)
template <typename F>
void bind(void* lib, const char* name, F& out, bool required = true) {
  void* p = dlsym(lib, name);
  TORCH_CHECK(p || !required, "ggml symbol ", name, " not found");
  out = reinterpret_cast<F>(p);
}

void check_type(int64_t t) {
  TORCH_CHECK(g.cpu_traits, "the ggml library is not bound (native.load binds it)");
  TORCH_CHECK(t >= 0 && t < GGML_TYPE_COUNT, "unknown ggml type ", t);
}

// Weight rows per block: 16 rows of the widest format in use (Q8_0 at 4,864 columns: 83 KB)
// stay in L2 while a prefill chunk's activation rows pass over them.
constexpr int64_t ROW_BLOCK = 16;

}  // namespace

void ggml_bind(const std::string& cpu_lib, const std::string& base_lib) {
  void* base = dlopen(base_lib.c_str(), RTLD_NOW | RTLD_GLOBAL);
  TORCH_CHECK(base, "cannot open ", base_lib, ": ", dlerror());
  void* cpu = dlopen(cpu_lib.c_str(), RTLD_NOW | RTLD_GLOBAL);
  TORCH_CHECK(cpu, "cannot open ", cpu_lib, ": ", dlerror());
  void (*cpu_init)() = nullptr;
  bind(cpu, "ggml_cpu_init", cpu_init);
  cpu_init();  // ggml's fp16 tables; idempotent
  bind(cpu, "ggml_get_type_traits_cpu", g.cpu_traits);
  bind(base, "ggml_get_type_traits", g.traits);
  bind(base, "ggml_row_size", g.row_size);
  bind(base, "ggml_blck_size", g.blck_size);
  bind(base, "ggml_quantize_chunk", g.quantize_chunk);
  bind(cpu, "llamafile_sgemm", g.sgemm, false);
  const bool opt = false;
  bind(base, "ggml_init", g.init, opt);
  bind(base, "ggml_free", g.free_ctx, opt);
  bind(base, "ggml_tensor_overhead", g.tensor_overhead, opt);
  bind(base, "ggml_graph_overhead", g.graph_overhead, opt);
  bind(base, "ggml_new_tensor_2d", g.new_tensor_2d, opt);
  bind(base, "ggml_mul_mat", g.mul_mat, opt);
  bind(base, "ggml_new_graph", g.new_graph, opt);
  bind(base, "ggml_build_forward_expand", g.build_forward_expand, opt);
  bind(cpu, "ggml_graph_compute_with_ctx", g.graph_compute_with_ctx, opt);
  bind(base, "ggml_backend_cpu_buffer_from_ptr", g.buffer_from_ptr, opt);
  bind(base, "ggml_backend_tensor_alloc", g.tensor_alloc, opt);
  bind(base, "ggml_backend_buffer_free", g.buffer_free, opt);
  g.graph = g.init && g.free_ctx && g.tensor_overhead && g.graph_overhead && g.new_tensor_2d &&
            g.mul_mat && g.new_graph && g.build_forward_expand && g.graph_compute_with_ctx &&
            g.buffer_from_ptr && g.tensor_alloc && g.buffer_free;
}

bool ggml_has_graph() { return g.graph; }

bool ggml_has_sgemm() { return g.sgemm != nullptr; }

int64_t ggml_row_size(int64_t type, int64_t n) {
  check_type(type);
  return static_cast<int64_t>(g.row_size(static_cast<int>(type), n));
}

int64_t ggml_dot_type(int64_t type) {
  check_type(type);
  return g.cpu_traits(static_cast<int>(type))->vec_dot_type;
}

// Rows of a GGUF matrix ([R, row bytes] uint8 of type `type`, `cols` values a row) as fp32.
torch::Tensor ggml_dequantize(torch::Tensor raw, int64_t type, int64_t cols) {
  check_type(type);
  TORCH_CHECK(raw.dtype() == torch::kUInt8 && raw.dim() == 2 && raw.stride(1) == 1,
              "rows must be [R, row bytes] uint8");
  TORCH_CHECK(raw.size(1) == ggml_row_size(type, cols), "row bytes do not match");
  const int64_t R = raw.size(0), stride = raw.stride(0);
  if (type == GGML_TYPE_F32) return raw.view(torch::kFloat32).reshape({R, cols}).clone();
  const to_float_t f = g.traits(static_cast<int>(type))->to_float;
  TORCH_CHECK(f, "ggml cannot convert type ", type, " to fp32");
  auto y = torch::empty({R, cols}, torch::kFloat32);
  const uint8_t* src = raw.data_ptr<uint8_t>();
  float* dst = y.data_ptr<float>();
  parallel_chunks((R + 63) / 64, [&](int64_t c) {
    for (int64_t r = c * 64; r < std::min(R, c * 64 + 64); ++r)
      f(src + r * stride, dst + r * cols, cols);
  });
  return y;
}

// fp32 rows [R, C] quantized with ggml's own quantizer: [R, row bytes] uint8 (tests, and
// compact copies of a matrix).
torch::Tensor ggml_quantize(torch::Tensor x, int64_t type) {
  check_type(type);
  TORCH_CHECK(x.dim() == 2 && x.dtype() == torch::kFloat32, "x must be [R, C] fp32");
  x = x.contiguous();
  const int64_t R = x.size(0), C = x.size(1);
  auto y = torch::empty({R, ggml_row_size(type, C)}, torch::kUInt8);
  g.quantize_chunk(static_cast<int>(type), x.data_ptr<float>(), y.data_ptr<uint8_t>(), 0, R, C,
                   nullptr);
  return y;
}

QMatrices::QMatrices(std::vector<torch::Tensor> rows, std::vector<int64_t> types)
    : rows_(std::move(rows)) {
  TORCH_CHECK(rows_.size() == types.size() && !rows_.empty(), "one type per matrix");
  for (size_t j = 0; j < rows_.size(); ++j) {
    const auto& w = rows_[j];
    const int t = static_cast<int>(types[j]);
    check_type(t);
    const TypeTraitsCpu* tr = g.cpu_traits(t);
    TORCH_CHECK(tr->vec_dot, "ggml has no CPU dot product for type ", t);
    TORCH_CHECK(w.dtype() == torch::kUInt8 && w.dim() == 2 && w.stride(1) == 1,
                "weights must be [O, row bytes] uint8 rows");
    const int64_t cols = w.size(1) / static_cast<int64_t>(g.traits(t)->type_size) *
                         g.blck_size(t);
    TORCH_CHECK(j == 0 || cols == in_, "fused matrices must share the input size");
    TORCH_CHECK(ggml_row_size(t, cols) == w.size(1), "row bytes are not whole blocks");
    in_ = cols;
    mats_.push_back({w.data_ptr<uint8_t>(), w.size(0), w.stride(0), out_, tr->vec_dot,
                     tr->vec_dot_type, t});
    out_ += w.size(0);
    if (tr->vec_dot_type != GGML_TYPE_F32 &&
        std::find(dot_types_.begin(), dot_types_.end(), tr->vec_dot_type) == dot_types_.end()) {
      TORCH_CHECK(g.cpu_traits(tr->vec_dot_type)->from_float, "no fp32 conversion for type ",
                  tr->vec_dot_type);
      dot_types_.push_back(tr->vec_dot_type);
    }
  }
}

namespace {

constexpr uintptr_t kAlign = 32;  // ggml's TENSOR_ALIGNMENT: a CPU buffer's base needs it

// a CPU buffer over [p, p + n) whose base is p rounded down to ggml's alignment (a tensor in
// it may start anywhere: the kernels read unaligned), so the path taken never depends on where
// a caller's memory happens to start
void* buffer_over(const void* p, size_t n) {
  const uintptr_t at = reinterpret_cast<uintptr_t>(p), base = at / kAlign * kAlign;
  return g.buffer_from_ptr(reinterpret_cast<void*>(base), n + (at - base));
}

// out [N, rows] = x [N, I] @ W.T through ggml's own mul_mat (its graph API, its threads): for a
// batch of a K-quant it takes ggml's tiled integer GEMM, which llama.cpp's prompt processing
// uses (2-3x a vec_dot per output). Weights, input and output stay where they are (CPU buffers
// over the pointers).
void graph_product(int type, const uint8_t* w, int64_t rows, const float* x, int64_t N,
                   int64_t I, float* out) {
  const size_t wbytes = g.row_size(type, I) * rows;
  const int dot = g.cpu_traits(type)->vec_dot_type;
  // the context holds 3 tensors, the graph and the work buffer (the input in the dot format)
  const size_t mem = 3 * g.tensor_overhead() + g.graph_overhead() + 2 * g.row_size(dot, I) * N +
                     (4 << 20);
  void* ctx = g.init(InitParams{mem, nullptr, true});
  TORCH_CHECK(ctx, "ggml_init failed");
  void* bufs[3] = {buffer_over(w, wbytes), buffer_over(x, N * I * sizeof(float)),
                   buffer_over(out, N * rows * sizeof(float))};
  void* a = g.new_tensor_2d(ctx, type, I, rows);
  void* b = g.new_tensor_2d(ctx, GGML_TYPE_F32, I, N);
  void* c = g.mul_mat(ctx, a, b);
  int status = g.tensor_alloc(bufs[0], a, const_cast<uint8_t*>(w));
  status |= g.tensor_alloc(bufs[1], b, const_cast<float*>(x));
  status |= g.tensor_alloc(bufs[2], c, out);
  if (status == 0) {
    void* graph = g.new_graph(ctx);
    g.build_forward_expand(graph, c);
    status = g.graph_compute_with_ctx(ctx, graph, pool_threads());
  }
  for (void* buf : bufs) g.buffer_free(buf);
  g.free_ctx(ctx);
  TORCH_CHECK(status == 0, "ggml's mul_mat failed (status ", status, ")");
}

}  // namespace

void QMatrices::apply(const float* x, int64_t N, float* y) const {
  const int64_t I = in_, O = out_;
  // a batch of a matrix llamafile's GEMM does not take goes to ggml's mul_mat, which rounds
  // the input itself
  auto by_sgemm = [&](const Mat& m) {
    return N >= 2 && g.sgemm && sgemm_type(m.type) && m.dot_type == GGML_TYPE_Q8_0;
  };
  auto by_graph = [&](const Mat& m) {
    return N >= 2 && g.graph && m.dot_type != GGML_TYPE_F32 &&
           m.row_bytes == static_cast<int64_t>(g.row_size(m.type, I)) && !by_sgemm(m);
  };
  // the input rounded once per dot format in use (F32 weights read x itself)
  std::vector<std::vector<uint8_t>> act(dot_types_.size());
  std::vector<int64_t> act_bytes(dot_types_.size());
  for (size_t k = 0; k < dot_types_.size(); ++k) {
    const int d = dot_types_[k];
    const int64_t rb = ggml_row_size(d, I);
    act_bytes[k] = rb;
    if (std::all_of(mats_.begin(), mats_.end(),
                    [&](const Mat& m) { return m.dot_type != d || by_graph(m); }))
      continue;
    act[k].resize(static_cast<size_t>(rb * N));
    const from_float_t q = g.cpu_traits(d)->from_float;
    uint8_t* dst = act[k].data();
    if (N == 1) {
      q(x, dst, I);
    } else {
      parallel_chunks((N + 7) / 8, [&](int64_t c) {
        for (int64_t n = c * 8; n < std::min(N, c * 8 + 8); ++n) q(x + n * I, dst + n * rb, I);
      });
    }
  }
  std::vector<const uint8_t*> mat_act(mats_.size());
  std::vector<int64_t> mat_act_bytes(mats_.size());
  for (size_t j = 0; j < mats_.size(); ++j) {
    const int d = mats_[j].dot_type;
    if (d == GGML_TYPE_F32) {
      mat_act[j] = reinterpret_cast<const uint8_t*>(x);
      mat_act_bytes[j] = I * static_cast<int64_t>(sizeof(float));
      continue;
    }
    const size_t k = std::find(dot_types_.begin(), dot_types_.end(), d) - dot_types_.begin();
    mat_act[j] = act[k].data();
    mat_act_bytes[j] = act_bytes[k];
  }
  // a batch of a 32-weight block format: ggml's batched kernel, each thread its share of tiles
  std::vector<bool> done(mats_.size(), false);
  bool all_done = true;
  for (size_t j = 0; j < mats_.size(); ++j) {
    const Mat& m = mats_[j];
    if (by_sgemm(m)) {
      // more shares than threads, claimed one at a time: a slow thread delays no one
      const int64_t blocks = I / 32, nth = 4 * pool_threads();
      const int64_t lda = m.row_bytes / static_cast<int64_t>(g.traits(m.type)->type_size);
      const int64_t ldb = mat_act_bytes[j] / static_cast<int64_t>(g.traits(m.dot_type)->type_size);
      std::vector<char> ok(nth, 0);
      parallel_chunks(nth, [&](int64_t t) {
        const ComputeParams p{static_cast<int>(t), static_cast<int>(nth), 0, nullptr, nullptr,
                              false};
        ok[t] = g.sgemm(&p, m.rows, N, blocks, m.w, lda, mat_act[j], ldb, y + m.col0, O, m.type,
                        m.dot_type, GGML_TYPE_F32);
      });
      done[j] = std::all_of(ok.begin(), ok.end(), [](char c) { return c != 0; });
      TORCH_CHECK(done[j] || std::none_of(ok.begin(), ok.end(), [](char c) { return c != 0; }),
                  "ggml's batched product ran for some threads only");
    }
    if (by_graph(m)) {
      if (mats_.size() == 1) {
        graph_product(m.type, m.w, m.rows, x, N, I, y);
      } else {  // its own columns of y: computed apart, then put in place
        std::vector<float> part(static_cast<size_t>(N * m.rows));
        graph_product(m.type, m.w, m.rows, x, N, I, part.data());
        for (int64_t n = 0; n < N; ++n)
          std::copy(part.begin() + n * m.rows, part.begin() + (n + 1) * m.rows,
                    y + n * O + m.col0);
      }
      done[j] = true;
    }
    all_done = all_done && done[j];
  }
  if (all_done) return;
  // one range over every matrix's rows, in chunks of whole ROW_BLOCKs claimed one at a time
  const int64_t per = std::max<int64_t>(
      ROW_BLOCK, (O / (8 * pool_threads()) + ROW_BLOCK - 1) / ROW_BLOCK * ROW_BLOCK);
  parallel_chunks((O + per - 1) / per, [&](int64_t chunk) {
    const int64_t r0 = chunk * per, r1 = std::min(O, r0 + per);
    size_t j = 0;
    for (int64_t b0 = r0; b0 < r1; b0 += ROW_BLOCK) {
      const int64_t b1 = std::min(r1, b0 + ROW_BLOCK);
      for (int64_t r = b0; r < b1;) {
        while (r >= mats_[j].col0 + mats_[j].rows) ++j;
        const Mat& m = mats_[j];
        if (done[j]) {
          r = std::min(b1, m.col0 + m.rows);
          continue;
        }
        const int64_t end = std::min(b1, m.col0 + m.rows);
        for (int64_t n = 0; n < N; ++n) {
          const uint8_t* a = mat_act[j] + n * mat_act_bytes[j];
          float* yn = y + n * O;
          for (int64_t rr = r; rr < end; ++rr)
            m.dot(static_cast<int>(I), yn + rr, 0, m.w + (rr - m.col0) * m.row_bytes, 0, a, 0,
                  1);
        }
        r = end;
      }
    }
  });
}

torch::Tensor QMatrices::forward(torch::Tensor x) const {
  TORCH_CHECK(x.dim() == 2 && x.dtype() == torch::kFloat32 && x.size(1) == in_,
              "x must be [N, ", in_, "] fp32");
  x = x.contiguous();
  auto y = torch::empty({x.size(0), out_}, x.options());
  apply(x.data_ptr<float>(), x.size(0), y.data_ptr<float>());
  return y;
}
