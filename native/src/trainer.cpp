#include "trainer.hpp"

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>

#include "envelope.hpp"
#include "util.hpp"

// Not in the wheel's headers; exported by libexecutorch_threadpool.so.
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  bool _unsafe_reset_threadpool(uint32_t num_threads);
  size_t get_thread_count() const;
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

namespace {
std::atomic<uint32_t> g_threads{0};  // 0: as the runtime decides
}

// The runtime sizes its thread pool with this, the first time a kernel or XNNPACK asks for the pool.
// Defined here it takes the place of the runtime's own (a call through the PLT), so a pool of
// `threads` is made from the start: with 1, no worker thread is ever started (and nothing spins).
namespace executorch::extension::cpuinfo {
uint32_t get_num_performant_cores() {
  if (uint32_t n = g_threads.load()) return n;
  using Fn = uint32_t (*)();
  static Fn runtime = reinterpret_cast<Fn>(dlsym(RTLD_NEXT, "_ZN10executorch9extension7cpuinfo24get_num_performant_coresEv"));
  return runtime ? runtime() : 1;
}
}  // namespace executorch::extension::cpuinfo

namespace fl {

using executorch::aten::ScalarType;
using executorch::extension::module::Module;
using executorch::runtime::EValue;

namespace {
const char* const kGradIndex = "__et_training_gradients_index_forward";
const char* const kParamIndex = "__et_training_parameters_index_forward";
const char* const kFqn = "__et_training_fqn_forward";

std::vector<EValue> run(Module& m, const std::string& method, const std::vector<EValue>& inputs) {
  auto result = m.execute(method, inputs);
  if (!result.ok())
    throw Error("the training program's " + method + " failed (ExecuTorch error 0x" +
                to_hex(std::vector<uint8_t>{static_cast<uint8_t>(static_cast<int>(result.error()))}) + ")");
  return std::move(*result);  // owned: never iterate a temporary's outputs (they are freed)
}

std::string shape_text(const std::vector<int64_t>& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + ")";
}
}  // namespace

void Trainer::set_threads(unsigned n) {
  if (n == 0) return;
  g_threads = n;
  auto* pool = executorch::extension::threadpool::get_threadpool();  // made with n threads if new
  if (pool->get_thread_count() != n) pool->_unsafe_reset_threadpool(n);
}

Trainer::Trainer(const std::string& train_pte, const std::string& adapter_ptd, int64_t seq_len, int64_t batch_min,
                 int64_t batch_max, std::vector<std::pair<std::string, std::vector<int64_t>>> base_delta_inputs)
    : seq_len_(seq_len), batch_min_(batch_min), batch_max_(batch_max), delta_shapes_(std::move(base_delta_inputs)) {
  module_ = std::make_unique<Module>(train_pte, adapter_ptd, Module::LoadMode::Mmap);
  if (module_->load() != executorch::runtime::Error::Ok) throw Error("cannot load the training program " + train_pte);
  clear_base_delta();
  grad_start_ = static_cast<size_t>(run(*module_, kGradIndex, {})[0].toInt());
  param_start_ = static_cast<size_t>(run(*module_, kParamIndex, {})[0].toInt());
  auto fqns = run(*module_, kFqn, {});
  for (const auto& v : fqns) names_.emplace_back(v.toString());
  // The parameters exist (as outputs) only after a first forward: run one on dummy inputs, with no
  // optimizer step, so they keep the .ptd's values.
  Batch dummy;
  dummy.n = batch_min_;
  dummy.input_ids.assign(static_cast<size_t>(batch_min_ * seq_len_), 0);
  dummy.attention_mask.assign(dummy.input_ids.size(), 1);
  dummy.labels.assign(static_cast<size_t>(batch_min_), 0);
  float loss = 0;
  forward_backward(dummy, &loss);
}

Trainer::~Trainer() = default;

std::vector<float*> Trainer::forward_backward(const Batch& batch, float* loss) {
  int64_t n = batch.n, lo = batch_min_, hi = batch_max_;
  if (n < 1 || static_cast<int64_t>(batch.input_ids.size()) != n * seq_len_ ||
      batch.attention_mask.size() != batch.input_ids.size() || static_cast<int64_t>(batch.labels.size()) != n)
    throw Error("a batch must hold n x " + std::to_string(seq_len_) + " tokens, masks and n labels");
  for (int64_t r = 0; r < n; ++r) {
    bool any = false;
    for (int64_t t = 0; t < seq_len_; ++t) any |= batch.attention_mask[static_cast<size_t>(r * seq_len_ + t)] != 0;
    // The program drops attention's guard for queries with no key (export.passes).
    if (!any) throw Error("every example needs at least one token in its attention_mask");
  }
  // A batch below the program's smallest is tiled whole: the mean loss and its gradient are unchanged.
  int64_t copies = (n < lo) ? (lo + n - 1) / n : 1;
  if (n * copies < lo || n * copies > hi)
    throw Error("batch size " + std::to_string(n) + " is outside the program's range [" + std::to_string(lo) + ", " +
                std::to_string(hi) + "]");
  std::vector<int64_t> ids, mask, labels;
  for (int64_t c = 0; c < copies; ++c) {
    ids.insert(ids.end(), batch.input_ids.begin(), batch.input_ids.end());
    mask.insert(mask.end(), batch.attention_mask.begin(), batch.attention_mask.end());
    labels.insert(labels.end(), batch.labels.begin(), batch.labels.end());
  }
  using executorch::aten::SizesType;
  auto s = static_cast<SizesType>(n * copies), l = static_cast<SizesType>(seq_len_);
  std::vector<executorch::extension::TensorPtr> keep;
  keep.push_back(executorch::extension::from_blob(ids.data(), {s, l}, ScalarType::Long));
  keep.push_back(executorch::extension::from_blob(mask.data(), {s, l}, ScalarType::Long));
  keep.push_back(executorch::extension::from_blob(labels.data(), {s}, ScalarType::Long));
  for (size_t k = 0; k < delta_shapes_.size(); ++k) {
    const auto& shape = delta_shapes_[k].second;
    keep.push_back(executorch::extension::from_blob(
        deltas_[k].data(), {static_cast<SizesType>(shape[0]), static_cast<SizesType>(shape[1])}, ScalarType::Float));
  }
  std::vector<EValue> inputs;
  for (auto& t : keep) inputs.emplace_back(*t);
  auto outputs = run(*module_, "forward", inputs);
  if (outputs.size() < param_start_ || param_start_ - grad_start_ != names_.size() || outputs.size() - param_start_ != names_.size())
    throw Error("the training program's outputs do not match its gradient and parameter metadata");
  *loss = outputs[0].toTensor().const_data_ptr<float>()[0];
  if (params_.empty()) {
    for (size_t k = 0; k < names_.size(); ++k) {
      auto t = outputs[param_start_ + k].toTensor();
      if (t.scalar_type() != ScalarType::Float) throw Error(names_[k] + ": only float32 parameters are supported");
      Param p{t.mutable_data_ptr<float>(), static_cast<size_t>(t.numel()), {}};
      for (auto d : t.sizes()) p.shape.push_back(d);
      params_.push_back(p);
    }
  }
  std::vector<float*> grads;
  for (size_t k = 0; k < names_.size(); ++k) {
    auto t = outputs[grad_start_ + k].toTensor();
    if (static_cast<size_t>(t.numel()) != params_[k].numel) throw Error(names_[k] + ": gradient and parameter sizes differ");
    grads.push_back(t.mutable_data_ptr<float>());
  }
  return grads;
}

TensorMap Trainer::get_trainable() const {
  TensorMap out;
  for (size_t k = 0; k < names_.size(); ++k)
    out[names_[k]] = Tensor::floats(params_[k].shape, std::vector<float>(params_[k].data, params_[k].data + params_[k].numel));
  return out;
}

void Trainer::set_trainable(const TensorMap& state) {
  for (size_t k = 0; k < names_.size(); ++k) {
    auto it = state.find(names_[k]);
    if (it == state.end()) throw Error("state lacks the program's tensor " + names_[k]);
    if (it->second.shape != params_[k].shape)
      throw Error(names_[k] + ": shape " + shape_text(it->second.shape) + " != program's " + shape_text(params_[k].shape));
    if (it->second.dtype != "F32") throw Error(names_[k] + ": not a float tensor");
  }
  if (state.size() != names_.size()) throw Error("state has tensors the program does not train");
  for (size_t k = 0; k < names_.size(); ++k) {
    const auto& v = state.at(names_[k]).f;
    std::memcpy(params_[k].data, v.data(), 4 * params_[k].numel);
  }
}

void Trainer::select_heads(std::optional<std::vector<int64_t>> heads) {
  if (heads) {
    bool any = false;
    for (size_t k = 0; k < names_.size(); ++k) {
      if (!ends_with(names_[k], kRavanH) && !ends_with(names_[k], kRavanS)) continue;
      any = true;
      for (auto i : *heads)
        if (i < 0 || i >= params_[k].shape[0]) throw Error("head index " + std::to_string(i) + " out of range for " + names_[k]);
    }
    if (!any) throw Error("this program has no Ravan heads");
  }
  heads_ = std::move(heads);
}

void Trainer::mask_heads(const std::vector<float*>& grads) {
  if (!heads_) return;
  for (size_t k = 0; k < names_.size(); ++k) {
    if (!ends_with(names_[k], kRavanH) && !ends_with(names_[k], kRavanS)) continue;
    int64_t h = params_[k].shape[0];
    size_t row = params_[k].numel / static_cast<size_t>(h);
    for (int64_t i = 0; i < h; ++i)
      if (std::find(heads_->begin(), heads_->end(), i) == heads_->end())
        std::fill(grads[k] + static_cast<size_t>(i) * row, grads[k] + static_cast<size_t>(i + 1) * row, 0.0f);
  }
}

void Trainer::set_base_delta(const std::map<std::string, std::vector<float>>& dense) {
  if (delta_shapes_.empty())
    throw Error("this bundle's program has no base-delta inputs: rebuild it with `fleetlora export --base-delta` to "
                "train a method that changes the base (FLoRA, FedEx-LoRA)");
  for (const auto& [layer, values] : dense) {
    auto it = std::find_if(delta_shapes_.begin(), delta_shapes_.end(), [&](const auto& kv) { return kv.first == layer; });
    if (it == delta_shapes_.end()) throw Error("base delta for a layer the program has no input for: " + layer);
    if (values.size() != static_cast<size_t>(it->second[0] * it->second[1])) throw Error(layer + ": base delta of the wrong size");
    deltas_[static_cast<size_t>(it - delta_shapes_.begin())] = values;
  }
}

void Trainer::clear_base_delta() {
  deltas_.clear();
  for (const auto& [name, shape] : delta_shapes_) deltas_.emplace_back(static_cast<size_t>(shape[0] * shape[1]), 0.0f);
}

TrainResult Trainer::train(const std::vector<Batch>& batches, int steps, const SgdConfig& sgd) {
  TrainResult out;
  double start = monotonic_time();
  // torch.optim.SGD as the runtime's SGD computes it: each elementwise op of float32 tensors with a
  // double scalar is evaluated in double and rounded once to float32 (that is what makes the two
  // bit-identical; float32 scalars would differ in the last bit):
  //   d = g + wd * p;  buf = d (first step) or momentum * buf + (1 - dampening) * d;
  //   d = d + momentum * buf (nesterov) or buf;  p = p + (-lr) * d.
  const double wd = sgd.weight_decay, mom = sgd.momentum, keep = 1.0 - sgd.dampening, step = -1.0 * sgd.lr;
  auto axpy = [](float a, double alpha, float b) { return static_cast<float>(static_cast<double>(a) + alpha * static_cast<double>(b)); };
  std::vector<std::vector<float>> momentum(names_.size());
  for (int s = 0; s < steps && static_cast<size_t>(s) < batches.size(); ++s) {
    float loss = 0;
    auto grads = forward_backward(batches[static_cast<size_t>(s)], &loss);
    if (!std::isfinite(loss)) throw Error("non-finite loss " + std::to_string(loss) + " at local step " + std::to_string(s));
    mask_heads(grads);
    for (size_t k = 0; k < names_.size(); ++k) {
      float* p = params_[k].data;
      float* d = grads[k];
      size_t n = params_[k].numel;
      if (wd != 0.0)
        for (size_t i = 0; i < n; ++i) d[i] = axpy(d[i], wd, p[i]);
      if (mom != 0.0) {
        auto& buf = momentum[k];
        if (buf.empty()) {
          buf.assign(d, d + n);
        } else {
          for (size_t i = 0; i < n; ++i) buf[i] = static_cast<float>(static_cast<double>(buf[i]) * mom);
          for (size_t i = 0; i < n; ++i) buf[i] = axpy(buf[i], keep, d[i]);
        }
        if (sgd.nesterov) {
          for (size_t i = 0; i < n; ++i) d[i] = axpy(d[i], mom, buf[i]);
        } else {
          d = buf.data();
        }
      }
      for (size_t i = 0; i < n; ++i) p[i] = axpy(p[i], step, d[i]);
    }
    out.steps += 1;
    out.examples += batches[static_cast<size_t>(s)].n;
    out.losses.push_back(loss);
  }
  out.seconds = monotonic_time() - start;
  return out;
}

}  // namespace fl
