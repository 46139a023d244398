// One client's part of a round around the training itself, as edge_client/local_round.py: the start
// state from the downloaded global, the upload from the trained state, the global's base delta.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "safetensors.hpp"

namespace fl {

// The trainer's state at the start of a round (export/adapters.py: ravan_download sets every s_i = 1;
// lora_pad zero-pads a lower-rank payload to the model's rank); fl::Error when a tensor is missing.
TensorMap start_state(const std::string& family, const TensorMap& adapter, const TensorMap& tmpl);

// What the client sends (export/adapters.py: ravan_upload folds s_i into H_i and keeps the trained
// heads, with their indices; LoRA as trained, at the model's rank).
TensorMap upload_state(const std::string& family, const TensorMap& trained, const std::optional<std::vector<int64_t>>& heads);

// The payload's base delta per layer as a dense d x k matrix (export/base_delta.py: dense_base_delta).
std::map<std::string, std::vector<float>> dense_deltas(const TensorMap& payload);

}  // namespace fl
