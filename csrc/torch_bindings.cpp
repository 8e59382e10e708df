// Every aligner op's schema, and the kernels registered for each device.
// The Python face (autograd, fake kernels, argument docs) is aligner/ops/.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "cpu/vec_kernels.h"
#include "ops.h"

TORCH_LIBRARY(aligner, m) {
  // Per-row log-softmax statistics of logits [..., V] / temperature:
  // (logprobs [...] or [0], entropy [...] or [0], lse [...]).
  m.def(
      "logprobs_entropy_forward(Tensor logits, Tensor? labels, float temperature, int ignore_index, "
      "bool with_logprobs, bool with_entropy) -> (Tensor, Tensor, Tensor)");
  // Gradient w.r.t. logits from the saved lse (and entropy), in one pass.
  m.def(
      "logprobs_entropy_backward(Tensor? grad_logprobs, Tensor? grad_entropy, Tensor logits, Tensor? labels, "
      "Tensor lse, Tensor? entropy, float temperature, int ignore_index) -> Tensor");
  // estimator: 0 k1, 1 abs, 2 k2, 3 k3.
  m.def("kl_penalty_forward(Tensor logprobs, Tensor ref_logprobs, int estimator) -> Tensor");
  m.def("kl_penalty_backward(Tensor grad, Tensor logprobs, Tensor ref_logprobs, int estimator) -> (Tensor, Tensor)");
  // Per row of x [..., C] over mask != 0: (count, mean, sum of squared deviations).
  m.def("masked_moments(Tensor x, Tensor mask) -> (Tensor, Tensor, Tensor)");
  // Over all elements with mask != 0: ((x - mean) * rstd [+ mean], 0 where masked; mean; rstd),
  // rstd = rsqrt(population variance + eps).
  m.def("masked_whiten(Tensor x, Tensor mask, bool shift_mean, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam, bool carry_forward) "
      "-> (Tensor, Tensor)");
  m.def(
      "group_advantages(Tensor rewards, Tensor? valid, int group_size, bool leave_one_out, bool scale_by_std, "
      "float eps) -> Tensor");
  // The LM head's per-row statistics of (hidden [N, H] @ weight[V, H].T) / temperature without the logits,
  // bf16/fp16 with H % 8 == 0, CUDA only: (logprobs [N], entropy [N] or [0], lse [N]), float32.
  m.def(
      "linear_logprobs_forward(Tensor hidden, Tensor weight, Tensor labels, float temperature, int ignore_index, "
      "bool with_entropy) -> (Tensor, Tensor, Tensor)");
  // The greedy decoding step of an LM head without the logits: per row of hidden [N, H] @ weight [V, H].T,
  // (argmax [N] int64, the first of tied maxima; max logit [N]; log-sum-exp [N]), float32, CPU only.
  m.def("linear_argmax(Tensor hidden, Tensor weight) -> (Tensor, Tensor, Tensor)");
}

#define ALIGNER_REGISTER_IMPLS(dev)                                               \
  m.impl("logprobs_entropy_forward", &aligner::logprobs_entropy_forward_##dev);   \
  m.impl("logprobs_entropy_backward", &aligner::logprobs_entropy_backward_##dev); \
  m.impl("kl_penalty_forward", &aligner::kl_penalty_forward_##dev);               \
  m.impl("kl_penalty_backward", &aligner::kl_penalty_backward_##dev);             \
  m.impl("masked_moments", &aligner::masked_moments_##dev);                       \
  m.impl("masked_whiten", &aligner::masked_whiten_##dev);                         \
  m.impl("gae", &aligner::gae_##dev);                                             \
  m.impl("group_advantages", &aligner::group_advantages_##dev);

TORCH_LIBRARY_IMPL(aligner, CPU, m) {
  ALIGNER_REGISTER_IMPLS(cpu)
  m.impl("linear_argmax", &aligner::linear_argmax_cpu);
}
#ifdef ALIGNER_WITH_CUDA
TORCH_LIBRARY_IMPL(aligner, CUDA, m) {
  ALIGNER_REGISTER_IMPLS(cuda)
  m.impl("linear_logprobs_forward", &aligner::linear_logprobs_forward_cuda);
}
#endif

namespace {

pybind11::dict build_info() {
  namespace py = pybind11;
  py::dict info;
  info["torch_version"] = ALIGNER_BUILD_TORCH_VERSION;
  info["torch_cuda_version"] = ALIGNER_BUILD_TORCH_CUDA;
#ifdef ALIGNER_WITH_CUDA
  info["has_cuda_kernels"] = true;
#else
    info["has_cuda_kernels"] = false;
#endif
  info["nvcc_version"] = ALIGNER_BUILD_NVCC_VERSION;
  py::list archs;
  std::string arch_list = ALIGNER_BUILD_CUDA_ARCHS;
  for (size_t start = 0; start < arch_list.size();) {
    size_t end = arch_list.find(',', start);
    if (end == std::string::npos) end = arch_list.size();
    if (end > start) archs.append(arch_list.substr(start, end - start));
    start = end + 1;
  }
  info["cuda_archs"] = archs;
  info["cxx_compiler"] = ALIGNER_BUILD_CXX_COMPILER;
  info["cxx_flags"] = ALIGNER_BUILD_CXX_FLAGS;
  info["cuda_flags"] = ALIGNER_BUILD_CUDA_FLAGS;
  info["cutlass_version"] = ALIGNER_BUILD_CUTLASS_VERSION;
  info["ptxas_report_dir"] = ALIGNER_BUILD_PTXAS_DIR;
  info["cpu_capabilities"] = py::make_tuple("default", "avx2", "avx512");
  info["cpu_capability"] = aligner::cpu::active_capability();
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "aligner's compiled kernels; the ops register under torch.ops.aligner on import.";
  m.def("build_info", &build_info,
        "Versions, CUDA archs, compiler flags and CUTLASS version this extension was built with.");
}
