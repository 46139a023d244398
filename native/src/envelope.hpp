// The fleetlora envelope, schema 2 (protocol/ENVELOPE.md): encode a device's update, decode and
// check the coordinator's global, and the sampling rule.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "safetensors.hpp"
#include "strict_json.hpp"

namespace fl {

constexpr int kSchemaVersion = 2;
constexpr size_t kMacBytes = 32;
constexpr size_t kMaxHeaderBytes = 256 * 1024;
constexpr size_t kDefaultMaxBytes = 64 * 1024 * 1024;

extern const char* const kLoraA;  // ".lora_A.default.weight"
extern const char* const kLoraB;
extern const char* const kRavanH;
extern const char* const kRavanS;
extern const char* const kRavanHeads;
extern const char* const kBaseVersion;  // "base_delta.version"
extern const char* const kBaseDelta;    // ".base_delta" (dense), "_A" / "_B" (factored)
extern const char* const kBaseDeltaA;
extern const char* const kBaseDeltaB;

using Template = std::map<std::string, std::vector<int64_t>>;  // name -> full-rank shape
using Key = std::optional<std::vector<uint8_t>>;

bool ends_with(const std::string& s, const std::string& suffix);
bool is_base_delta_key(const std::string& name);

struct UpdateHeader {
  std::string run, client, method, spec, msg_id;
  int64_t round = 0, num_examples = 0, local_steps = 0;
  double compute_s = 0, sent_at = 0;
  std::optional<int64_t> rank;
  std::optional<std::vector<int64_t>> heads;
  bool is_signed = false;
};

struct GlobalHeader {
  std::string run, method, spec, msg_id;
  json spec_json;
  int64_t round = 0;
  double deadline = 0, sent_at = 0;
  std::optional<std::vector<std::string>> clients;
  std::optional<double> sample_fraction;
  std::optional<int64_t> rank;
  bool final = false, is_signed = false;
  std::vector<std::string> keep_local;
};

// What a receiver knows: its run, its adapter (digest and spec JSON), the template, its key for the
// sender (none: a SHA-256 checksum is required), the payload limit.
struct Receiver {
  std::string run;
  std::string spec_digest;
  json spec_json;
  Template shapes;
  Key key;
  size_t max_bytes = kDefaultMaxBytes;
};

// An update as one payload (the header checked as the coordinator would, before anything is sent).
std::vector<uint8_t> encode_update(UpdateHeader header, const TensorMap& tensors, const Key& key);

struct DecodedGlobal {
  GlobalHeader header;
  TensorMap tensors;
};
struct DecodedUpdate {
  UpdateHeader header;
  TensorMap tensors;
};

// Throw fl::Refused with the envelope's reason for anything not exactly right.
DecodedGlobal decode_global(const std::vector<uint8_t>& payload, const Receiver& receiver, int64_t min_round);
DecodedUpdate decode_update(const std::vector<uint8_t>& payload, const Receiver& receiver,
                            const std::string& expected_client, const std::vector<int64_t>& open_rounds);

// Whether `client` takes part in the announced round (the listed ids, or the SHA-256 draw).
bool is_sampled(const GlobalHeader& header, const std::string& client);

bool valid_id(const std::string& value);

}  // namespace fl
