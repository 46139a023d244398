#include "local_round.hpp"

#include <algorithm>

#include "envelope.hpp"
#include "util.hpp"

namespace fl {

namespace {

std::string strip_suffix(const std::string& s, const std::string& suffix) { return s.substr(0, s.size() - suffix.size()); }

}  // namespace

TensorMap start_state(const std::string& family, const TensorMap& adapter, const TensorMap& tmpl) {
  TensorMap state = adapter;
  if (family == "ravan") {
    for (const auto& [key, t] : adapter)
      if (ends_with(key, kRavanH))
        state[strip_suffix(key, kRavanH) + kRavanS] = Tensor::floats({t.shape[0]}, std::vector<float>(static_cast<size_t>(t.shape[0]), 1.0f));
  } else {
    for (auto& [key, t] : state) {  // a lower-rank LoRA payload, zero-padded to the model's rank
      const Tensor& full = tmpl.at(key);
      if (t.shape == full.shape) continue;
      Tensor padded = Tensor::floats(full.shape, std::vector<float>(full.numel(), 0.0f));
      int64_t rows = t.shape[0], cols = t.shape.size() > 1 ? t.shape[1] : 1, full_cols = full.shape.size() > 1 ? full.shape[1] : 1;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c)
          padded.f[static_cast<size_t>(r * full_cols + c)] = t.f[static_cast<size_t>(r * cols + c)];
      t = std::move(padded);
    }
  }
  for (const auto& [key, t] : tmpl)
    if (!state.count(key)) throw Error("the payload lacks the trainable tensor " + key);
  return state;
}

TensorMap upload_state(const std::string& family, const TensorMap& trained, const std::optional<std::vector<int64_t>>& heads) {
  if (family != "ravan") return trained;
  TensorMap out;
  for (const auto& [key, t] : trained) {
    if (ends_with(key, kRavanS)) continue;
    if (!ends_with(key, kRavanH)) {
      out[key] = t;
      continue;
    }
    const std::string prefix = strip_suffix(key, kRavanH);
    const Tensor& s = trained.at(prefix + kRavanS);
    size_t row = t.numel() / static_cast<size_t>(t.shape[0]);
    std::vector<int64_t> idx;
    if (heads) {
      idx = *heads;
      std::sort(idx.begin(), idx.end());
    } else {
      for (int64_t i = 0; i < t.shape[0]; ++i) idx.push_back(i);
    }
    Tensor sh;
    sh.shape = t.shape;
    sh.shape[0] = static_cast<int64_t>(idx.size());
    for (auto i : idx)
      for (size_t j = 0; j < row; ++j) sh.f.push_back(s.f[static_cast<size_t>(i)] * t.f[static_cast<size_t>(i) * row + j]);
    out[key] = std::move(sh);
    if (heads) out[prefix + kRavanHeads] = Tensor::ints({static_cast<int64_t>(idx.size())}, idx);
  }
  return out;
}

std::map<std::string, std::vector<float>> dense_deltas(const TensorMap& payload) {
  std::map<std::string, std::vector<float>> out;
  for (const auto& [key, t] : payload) {
    if (ends_with(key, ".base_delta")) {
      out[strip_suffix(key, ".base_delta")] = t.f;
    } else if (ends_with(key, ".base_delta_B")) {
      const std::string layer = strip_suffix(key, ".base_delta_B");
      const Tensor& a = payload.at(layer + ".base_delta_A");
      int64_t d = t.shape[0], r = t.shape[1], k = a.shape[1];
      std::vector<float> m(static_cast<size_t>(d * k), 0.0f);
      for (int64_t i = 0; i < d; ++i)
        for (int64_t q = 0; q < r; ++q) {
          float b = t.f[static_cast<size_t>(i * r + q)];
          for (int64_t j = 0; j < k; ++j) m[static_cast<size_t>(i * k + j)] += b * a.f[static_cast<size_t>(q * k + j)];
        }
      out[layer] = std::move(m);
    }
  }
  return out;
}
}  // namespace fl
