// client.toml (what `fleetlora flash` writes; its keys are `fleetlora client` flags) and the flags.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "envelope.hpp"

namespace fl {

struct ClientConfig {
  std::string folder;  // the flashed folder: relative paths are resolved against it
  std::string host = "127.0.0.1";
  int port = 1883;
  bool tls = false;
  std::string run, id, profile, bundle_dir;
  std::string username;
  std::optional<std::string> password;
  std::string ca_file, cert_file, cert_key_file;
  Key key, coordinator_key;
  std::string state_file;  // "" keeps progress in memory only
  std::string plan_file, data_file;
  int local_steps = 0;  // 0: from the device's plan table
  int batch_size = 16;
  double lr = 2e-3, momentum = 0.9, weight_decay = 0.0;
  long max_packet_size = 16L * 1024 * 1024;
  double connect_jitter_s = 2.0;
  int threads = 0;  // 0: the runtime's default
};

// A TOML subset: `key = "string" | integer | float | true | false`, comments, blank lines.
std::map<std::string, std::string> parse_flat_toml(const std::string& text, const std::string& source);

// client.toml with command-line flags (`--local-steps 2`, ...) applied over it; fl::Error naming the
// file and key for anything unusable.
ClientConfig load_client_config(const std::string& path, const std::vector<std::string>& flags);

Key read_key_spec(const std::string& spec, const std::string& folder);

}  // namespace fl
