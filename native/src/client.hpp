// The device loop, as edge_client/client.py's EdgeClient and run_device: announcement -> sampled? ->
// train within the plan -> publish one update, with the same progress file, pending envelope and kept
// tensors on disk (written atomically, before publishing), so a restart neither retrains nor skips.
#pragma once

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "bundle.hpp"
#include "config.hpp"
#include "envelope.hpp"
#include "mqtt_link.hpp"
#include "plan.hpp"
#include "trainer.hpp"

namespace fl {

// The persisted part of a client (the same JSON fields as the Python client's Progress).
struct Progress {
  std::string run;
  int64_t last_round = 0, pending_round = 0, missed = 0;
  std::string last_outcome, last_error;
  std::vector<int64_t> refused;
};

class EdgeClient {
 public:
  EdgeClient(const ClientConfig& config, const Bundle& bundle, Trainer& trainer, const Planner& planner,
             const LocalData& data, MqttLink& link);
  // Act on one announcement: "trained", "resent", "not_sampled", "already_done", "final", "rejected", "refused".
  std::string handle_global(const std::vector<uint8_t>& payload);
  // Once the broker acknowledged the pending update, forget it; true when nothing is pending.
  bool settle(double timeout_s = 0.0);
  const Progress& progress() const { return progress_; }
  bool finished() const { return finished_; }
  const std::string& id() const { return config_.id; }

 private:
  std::string train_and_publish(const GlobalHeader& header, const TensorMap& payload);
  std::string publish_pending(int64_t round, bool resent);
  std::string finish(const std::string& outcome, const std::string& error = "", int64_t round = 0);
  void save();
  Progress load_progress();
  TensorMap load_kept();
  std::string pending_file() const;
  std::string kept_file() const;

  const ClientConfig& config_;
  const Bundle& bundle_;
  Trainer& trainer_;
  const Planner& planner_;
  const LocalData& data_;
  MqttLink& link_;
  Receiver receiver_;
  TensorMap template_;
  TensorMap kept_;
  Progress progress_;
  bool finished_ = false;
  std::shared_ptr<Delivery> delivery_;
  std::optional<std::vector<uint8_t>> pending_envelope_;
  std::optional<std::pair<int64_t, std::vector<uint8_t>>> sent_;  // the last acknowledged update
  std::string answered_;  // the announcement id the last update answered
  std::string up_topic_;
};

// Announcements as they arrive (the link's thread pushes, the device loop takes the newest).
class Inbox {
 public:
  void push(std::vector<uint8_t> payload);
  // The newest payload (older ones are superseded), or nothing after `timeout_s`.
  std::optional<std::vector<uint8_t>> take_newest(double timeout_s);

 private:
  std::mutex m_;
  std::condition_variable cv_;
  std::vector<std::vector<uint8_t>> items_;
};

// Handle announcements until the final one (and its update acknowledged) or `stop`.
Progress run_device(EdgeClient& client, Inbox& inbox, const std::atomic<bool>& stop);

// `fleetlora-client run`: the whole client from a flashed folder's client.toml.
int run_client(const std::string& config_path, const std::vector<std::string>& flags);

}  // namespace fl
