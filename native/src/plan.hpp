// A round's plan (steps, batch, Ravan heads) and the local mini-batches.
//
// The budget rules are written once, in Python (edge_client/budget.py: compute_budget); `fleetlora
// flash` evaluates them for this device into plan.json, a table "remaining seconds -> plan" (see
// edge_client/plan_table.py), which this client only looks up. The head draw and the batch order are
// SHA-256 rules any language reproduces (edge_client/plan_table.py states them).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "bundle.hpp"
#include "trainer.hpp"

namespace fl {

struct PlanRow {
  double min_round_s = 0;
  int local_steps = 0, batch_size = 0, rank = 0, heads = 0;
};

struct RoundPlan {
  int local_steps = 0, batch_size = 0;
  std::optional<std::vector<int64_t>> heads;  // Ravan heads to train (nullopt: all)
};

class Planner {
 public:
  // plan_file may be absent ("" or missing): then `fixed_steps` (or 5) steps of `max_batch`, every head.
  Planner(const std::string& plan_file, const Bundle& bundle, const std::string& client, int fixed_steps, int max_batch);
  RoundPlan plan(int64_t round, double deadline, double now) const;
  const std::vector<PlanRow>& rows() const { return rows_; }

 private:
  std::string client_;
  std::string family_;
  int spec_heads_;
  int fixed_steps_, max_batch_;
  std::vector<PlanRow> rows_;
};

// The n heads of `total` with the smallest SHA-256("{client}:{round}:{head}"), ascending.
std::vector<int64_t> draw_heads(const std::string& client, int64_t round, int total, int n);

// The device's tokenized examples (data.safetensors: input_ids, attention_mask (N, seq_len), labels (N,)).
struct LocalData {
  int64_t n = 0, seq_len = 0;
  std::vector<int64_t> input_ids, attention_mask, labels;
};
LocalData load_local_data(const std::string& path, const Bundle& bundle);

// The round's batches: the examples ordered by SHA-256("{client}:{round}:{index}"), taken in turn
// (wrapping around) `batch` at a time.
std::vector<Batch> round_batches(const LocalData& data, const std::string& client, int64_t round, int steps, int batch);

}  // namespace fl
