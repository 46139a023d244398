// The bundle's ExecuTorch training program, trained with an SGD step written here (the wheel has no
// C++ optimizer): torch's rules (momentum, dampening, weight decay, nesterov) in the runtime's order.
//
// The joint program's `forward` returns [loss, outputs..., gradients..., parameters...]; the
// metadata methods say where the gradients and parameters begin and name them. The parameter outputs
// alias the runtime's weights, so an update written into them is what the next step computes with.
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "safetensors.hpp"

namespace executorch::extension::module {
class Module;
}  // namespace executorch::extension::module

namespace fl {

struct SgdConfig {
  double lr = 0.05, momentum = 0.9, dampening = 0.0, weight_decay = 0.0;
  bool nesterov = false;
};

// One mini-batch: n examples of seq_len tokens (row-major), their masks and labels.
struct Batch {
  int64_t n = 0;
  std::vector<int64_t> input_ids, attention_mask, labels;
};

struct TrainResult {
  int steps = 0;
  int64_t examples = 0;
  std::vector<float> losses;
  double seconds = 0;
};

class Trainer {
 public:
  Trainer(const std::string& train_pte, const std::string& adapter_ptd, int64_t seq_len, int64_t batch_min,
          int64_t batch_max, std::vector<std::pair<std::string, std::vector<int64_t>>> base_delta_inputs);
  ~Trainer();

  const std::vector<std::string>& names() const { return names_; }
  TensorMap get_trainable() const;  // copies
  void set_trainable(const TensorMap& state);  // every key, checked before anything is written
  // Ravan: train only these heads (gradient rows of the others zeroed); nullopt: all.
  void select_heads(std::optional<std::vector<int64_t>> heads);
  // The coordinator's base delta (layer -> dense d x k) as the program's inputs; clear_base_delta()
  // makes them zero again.
  void set_base_delta(const std::map<std::string, std::vector<float>>& dense);
  void clear_base_delta();
  bool has_base_delta_inputs() const { return !delta_shapes_.empty(); }
  // `steps` SGD steps over `batches` (fewer when they run out), with a fresh optimizer.
  TrainResult train(const std::vector<Batch>& batches, int steps, const SgdConfig& sgd);

  // XNNPACK's and the kernels' threads (the runtime's process-wide pool; 1: none, 0: the default).
  static void set_threads(unsigned n);

 private:
  struct Param {
    float* data;
    size_t numel;
    std::vector<int64_t> shape;
  };
  std::vector<float*> forward_backward(const Batch& batch, float* loss);
  void mask_heads(const std::vector<float*>& grads);

  std::unique_ptr<executorch::extension::module::Module> module_;
  int64_t seq_len_, batch_min_, batch_max_;
  std::vector<std::pair<std::string, std::vector<int64_t>>> delta_shapes_;
  std::vector<std::vector<float>> deltas_;
  size_t grad_start_ = 0, param_start_ = 0;
  std::vector<std::string> names_;
  std::vector<Param> params_;
  std::optional<std::vector<int64_t>> heads_;
};

}  // namespace fl
