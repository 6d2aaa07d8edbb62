// Python bindings of the runner's kernels (runner.h): one extension module, localai_runner.
#include <pybind11/stl.h>

#include "runner.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ggml_bind", &ggml_bind, "bind to ggml's CPU and base libraries");
  m.def("set_threads", &set_threads, "threads the kernels use, the caller's included");
  m.def("has_sgemm", &ggml_has_sgemm, "whether ggml's batched Q8_0/Q4_0/Q5_0 kernel is bound");
  m.def("has_graph", &ggml_has_graph, "whether ggml's graph API (its own batched mul_mat) is bound");
  m.def("row_size", &ggml_row_size, "bytes of a row of n values of a ggml type");
  m.def("dot_type", &ggml_dot_type, "the format a weight type's dot product reads inputs in");
  m.def("dequantize", &ggml_dequantize, "GGUF-block rows to fp32");
  m.def("quantize", &ggml_quantize, "fp32 rows to GGUF blocks (ggml's quantizer)");
  m.def("decode_attention", &decode_attention,
        "fused decode attention over quantized KV pages (all, or a list per head)");
  m.def("select_pages", &select_pages, "the pages a decode query attends to, per KV head");
  py::class_<KVPages, std::shared_ptr<KVPages>>(m, "KVPages")
      .def(py::init<const std::string&, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>())
      .def("write", &KVPages::write)
      .def("ensure", &KVPages::ensure_tensor)
      .def("wait", &KVPages::wait, py::call_guard<py::gil_scoped_release>())
      .def("read", &KVPages::read)
      .def("reset", &KVPages::reset)
      .def("stats", &KVPages::stats)
      .def_readonly("pool", &KVPages::pool)
      .def_readonly("table", &KVPages::table);
  py::class_<QMatrices, std::shared_ptr<QMatrices>>(m, "QMatrices")
      .def(py::init<std::vector<torch::Tensor>, std::vector<int64_t>>())
      .def("__call__", &QMatrices::forward)
      .def_property_readonly("in_features", &QMatrices::in_features)
      .def_property_readonly("out_features", &QMatrices::out_features);
  py::class_<DecodeAttention>(m, "DecodeAttention")
      .def(py::init<torch::Tensor, double, std::shared_ptr<QMatrices>, torch::Tensor,
                    std::shared_ptr<QMatrices>, int64_t, int64_t, int64_t, int64_t, bool,
                    std::vector<torch::Tensor>, std::vector<int64_t>,
                    std::shared_ptr<KVPages>>())
      .def("__call__", &DecodeAttention::forward);
  py::class_<DecodeDenseFFN>(m, "DecodeDenseFFN")
      .def(py::init<torch::Tensor, double, std::shared_ptr<QMatrices>,
                    std::shared_ptr<QMatrices>>())
      .def("__call__", &DecodeDenseFFN::forward);
}
