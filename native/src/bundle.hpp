// A flashed bundle folder, verified against its manifest before anything of it is used.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "envelope.hpp"

namespace fl {

struct Bundle {
  std::string folder;
  std::string model;
  int64_t num_classes = 0, seq_len = 0, batch_min = 0, batch_max = 0;
  bool xnnpack = false;
  Template trainable;                                                  // name -> shape
  std::vector<std::pair<std::string, std::vector<int64_t>>> base_delta;  // program inputs, in order
  json spec_json;
  std::string spec_digest;  // first 16 hex of SHA-256 of the canonical spec JSON (adapter_spec.json)
  std::string family;       // "lora" or "ravan"
  int64_t rank = 0, heads = 0;

  std::string train_pte() const;
  std::string adapter_ptd() const;
};

// Check every file the manifest lists (size and SHA-256), then read bundle.json and the spec;
// fl::Error naming the folder and file otherwise.
Bundle load_bundle(const std::string& folder);

}  // namespace fl
