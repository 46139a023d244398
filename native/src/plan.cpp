#include "plan.hpp"

#include <algorithm>

#include "crypto.hpp"
#include "strict_json.hpp"
#include "util.hpp"

namespace fl {

std::vector<int64_t> draw_heads(const std::string& client, int64_t round, int total, int n) {
  std::vector<std::pair<std::vector<uint8_t>, int64_t>> keyed;
  for (int h = 0; h < total; ++h)
    keyed.emplace_back(sha256(client + ":" + std::to_string(round) + ":" + std::to_string(h)), h);
  std::sort(keyed.begin(), keyed.end());
  std::vector<int64_t> out;
  for (int k = 0; k < std::min(n, total); ++k) out.push_back(keyed[static_cast<size_t>(k)].second);
  std::sort(out.begin(), out.end());
  return out;
}

Planner::Planner(const std::string& plan_file, const Bundle& bundle, const std::string& client, int fixed_steps, int max_batch)
    : client_(client), family_(bundle.family), spec_heads_(static_cast<int>(bundle.heads)), fixed_steps_(fixed_steps),
      max_batch_(max_batch) {
  if (plan_file.empty() || !file_exists(plan_file)) {
    log_warn("no plan table (" + plan_file + "): every round trains " + std::to_string(fixed_steps ? fixed_steps : 5) +
             " steps of batch " + std::to_string(max_batch) + " (flash with --profile to plan from the device's budget)");
    return;
  }
  try {
    json d = parse_strict_json(read_text(plan_file));
    if (d.at("format") != 1) throw Error("format " + d.at("format").dump() + " is not the supported 1");
    if (d.at("spec") != bundle.spec_digest)
      throw Error("made for adapter spec " + d.at("spec").get<std::string>() + ", the bundle's is " + bundle.spec_digest);
    for (const auto& r : d.at("rows")) {
      PlanRow row{r.at("min_round_s").get<double>(), r.at("local_steps").get<int>(), r.at("batch_size").get<int>(),
                  r.at("rank").get<int>(), r.at("heads").get<int>()};
      if (row.local_steps < 1 || row.batch_size < 1 || row.heads < 1) throw Error("a row with nothing to train");
      if (!rows_.empty() && row.min_round_s <= rows_.back().min_round_s) throw Error("rows are not in increasing order");
      rows_.push_back(row);
    }
    if (rows_.empty()) throw Error("no rows");
  } catch (const Error& e) {
    throw Error(plan_file + ": " + e.what());
  } catch (const std::exception& e) {
    throw Error(plan_file + " is malformed: " + e.what());
  }
}

RoundPlan Planner::plan(int64_t round, double deadline, double now) const {
  RoundPlan out;
  int heads_n = spec_heads_;
  if (rows_.empty()) {
    out.local_steps = fixed_steps_ ? fixed_steps_ : 5;
    out.batch_size = max_batch_;
  } else {
    double remaining = std::max(1.0, deadline - now);  // as the Python client's DevicePlanner
    const PlanRow* row = &rows_.front();
    for (const auto& r : rows_)
      if (r.min_round_s <= remaining) row = &r;
    out.local_steps = fixed_steps_ ? fixed_steps_ : row->local_steps;
    out.batch_size = std::min(row->batch_size, max_batch_);
    heads_n = row->heads;
  }
  if (family_ == "ravan" && heads_n < spec_heads_) out.heads = draw_heads(client_, round, spec_heads_, heads_n);
  return out;
}

LocalData load_local_data(const std::string& path, const Bundle& bundle) {
  if (!file_exists(path))
    throw Error("no local data: " + path + " is missing (fleetlora flash --runtime native writes it)");
  TensorMap t = read_safetensors(path);
  for (const char* name : {"input_ids", "attention_mask", "labels"})
    if (!t.count(name) || t[name].dtype != "I64") throw Error(path + ": needs an I64 tensor " + name);
  const auto &ids = t["input_ids"], &mask = t["attention_mask"], &labels = t["labels"];
  if (ids.shape.size() != 2 || mask.shape != ids.shape || labels.shape != std::vector<int64_t>{ids.shape[0]})
    throw Error(path + ": input_ids and attention_mask must be (N, seq_len), labels (N,)");
  if (ids.shape[1] != bundle.seq_len)
    throw Error(path + ": examples of " + std::to_string(ids.shape[1]) + " tokens, the bundle's program takes " +
                std::to_string(bundle.seq_len));
  if (ids.shape[0] < 1) throw Error(path + ": no examples");
  for (auto l : labels.i)
    if (l < 0 || l >= bundle.num_classes)
      throw Error(path + ": label " + std::to_string(l) + " is outside the bundle's " + std::to_string(bundle.num_classes) + " classes");
  LocalData d;
  d.n = ids.shape[0];
  d.seq_len = ids.shape[1];
  d.input_ids = ids.i;
  d.attention_mask = mask.i;
  d.labels = labels.i;
  return d;
}

std::vector<Batch> round_batches(const LocalData& data, const std::string& client, int64_t round, int steps, int batch) {
  std::vector<std::pair<std::vector<uint8_t>, int64_t>> keyed;
  for (int64_t i = 0; i < data.n; ++i)
    keyed.emplace_back(sha256(client + ":" + std::to_string(round) + ":" + std::to_string(i)), i);
  std::sort(keyed.begin(), keyed.end());
  int64_t per = std::min<int64_t>(batch, data.n);
  std::vector<Batch> out;
  size_t next = 0;
  for (int s = 0; s < steps; ++s) {
    Batch b;
    b.n = per;
    for (int64_t k = 0; k < per; ++k, next = (next + 1) % keyed.size()) {
      int64_t i = keyed[next].second;
      auto from = data.input_ids.begin() + i * data.seq_len;
      b.input_ids.insert(b.input_ids.end(), from, from + data.seq_len);
      auto mfrom = data.attention_mask.begin() + i * data.seq_len;
      b.attention_mask.insert(b.attention_mask.end(), mfrom, mfrom + data.seq_len);
      b.labels.push_back(data.labels[static_cast<size_t>(i)]);
    }
    out.push_back(std::move(b));
  }
  return out;
}

}  // namespace fl
