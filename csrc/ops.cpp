// The dpo_kernels torch operators: schemas (TORCH_LIBRARY) and their CPU kernels (TORCH_LIBRARY_IMPL). Nothing
// else lives here. The fake (meta) kernels that torch.compile traces with are registered in dpo_kernels/cpu.py.

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace dpo_kernels {
// logprobs.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                                 int64_t ignore_index, double temperature,
                                                                 bool return_stats);
at::Tensor logprobs_partial_fwd_cpu(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index,
                                    double temperature, bool return_stats, int64_t vocab_start, int64_t vocab_size);
at::Tensor logprobs_bwd_cpu(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                            const std::optional<at::Tensor>& grad_logps,
                            const std::optional<at::Tensor>& grad_entropy, const std::optional<at::Tensor>& entropy,
                            int64_t ignore_index, double temperature, std::optional<int64_t> vocab_start);
void logprobs_bwd_inplace_cpu(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                              const std::optional<at::Tensor>& grad_logps,
                              const std::optional<at::Tensor>& grad_entropy,
                              const std::optional<at::Tensor>& entropy, int64_t ignore_index, double temperature,
                              std::optional<int64_t> vocab_start);
}  // namespace dpo_kernels

TORCH_LIBRARY(dpo_kernels, m) {
  // logits [R, T, V] (any batch and row strides) or [N, V], unit vocab stride; labels [N] (N = R·T) or [R, T]
  // -> (logps [N], lse [N], stats [4, N] with return_stats else [0, N]), all fp32
  m.def(
      "logprobs_fwd(Tensor logits, Tensor labels, int ignore_index, float temperature, bool return_stats)"
      " -> (Tensor, Tensor, Tensor)");
  // one vocabulary shard [.., V_shard] of a vocabulary of vocab_size, global labels -> the shard's per-row partials
  // [3, N] or [7, N] with return_stats, fp32 (rows: dpo_kernels.parallel.PARTIALS)
  m.def(
      "logprobs_partial_fwd(Tensor logits, Tensor labels, int ignore_index, float temperature, bool return_stats,"
      " int vocab_start, int vocab_size) -> Tensor");
  // -> dlogits shaped like the logits (contiguous) in the logits' dtype; with vocab_start the logits are the
  // shard that starts there, lse / entropy the whole rows', labels global
  m.def(
      "logprobs_bwd(Tensor logits, Tensor labels, Tensor lse, Tensor? grad_logps, Tensor? grad_entropy,"
      " Tensor? entropy, int ignore_index, float temperature, int? vocab_start=None) -> Tensor");
  // the same gradient written over the logits; returns nothing so that torch.compile can functionalize it
  m.def(
      "logprobs_bwd_(Tensor(a!) logits, Tensor labels, Tensor lse, Tensor? grad_logps, Tensor? grad_entropy,"
      " Tensor? entropy, int ignore_index, float temperature, int? vocab_start=None) -> ()");
}

TORCH_LIBRARY_IMPL(dpo_kernels, CPU, m) {
  m.impl("logprobs_fwd", &dpo_kernels::logprobs_fwd_cpu);
  m.impl("logprobs_partial_fwd", &dpo_kernels::logprobs_partial_fwd_cpu);
  m.impl("logprobs_bwd", &dpo_kernels::logprobs_bwd_cpu);
  m.impl("logprobs_bwd_", &dpo_kernels::logprobs_bwd_inplace_cpu);
}
