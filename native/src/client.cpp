#include "client.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <csignal>
#include <deque>
#include <iostream>
#include <mutex>

#include "crypto.hpp"
#include "local_round.hpp"
#include "strict_json.hpp"
#include "util.hpp"

namespace fl {

namespace {
const char* const TRAINED = "trained";
const char* const RESENT = "resent";
const char* const NOT_SAMPLED = "not_sampled";
const char* const ALREADY_DONE = "already_done";
const char* const FINAL = "final";
const char* const REJECTED = "rejected";
const char* const REFUSED = "refused";

std::string topic_of(const std::string& run, const std::string& channel, const std::string& client = "") {
  return "fleetlora/" + run + "/" + channel + (client.empty() ? "" : "/" + client);
}

}  // namespace

EdgeClient::EdgeClient(const ClientConfig& config, const Bundle& bundle, Trainer& trainer, const Planner& planner,
                       const LocalData& data, MqttLink& link)
    : config_(config), bundle_(bundle), trainer_(trainer), planner_(planner), data_(data), link_(link) {
  template_ = trainer_.get_trainable();
  receiver_.run = config.run;
  receiver_.spec_digest = bundle.spec_digest;
  receiver_.spec_json = bundle.spec_json;
  receiver_.key = config.coordinator_key;
  for (const auto& [k, t] : template_) receiver_.shapes[k] = t.shape;
  if (receiver_.shapes != bundle.trainable)
    throw Error(bundle.folder + ": bundle.json's trainable tensors differ from the training program's");
  up_topic_ = topic_of(config.run, "up", config.id);
  if (!config.state_file.empty()) make_dirs(dirname_of(config.state_file));
  progress_ = load_progress();
  kept_ = load_kept();
}

std::string EdgeClient::pending_file() const { return config_.state_file.empty() ? "" : config_.state_file + ".pending.env"; }
std::string EdgeClient::kept_file() const { return config_.state_file.empty() ? "" : config_.state_file + ".kept.safetensors"; }

Progress EdgeClient::load_progress() {
  Progress p;
  p.run = config_.run;
  const std::string& f = config_.state_file;
  if (f.empty() || !file_exists(f)) return p;
  try {
    json d = parse_strict_json(read_text(f));
    Progress got;
    for (auto& [k, v] : d.items()) {
      if (k == "run") got.run = v.get<std::string>();
      else if (k == "last_round") got.last_round = v.get<int64_t>();
      else if (k == "pending_round") got.pending_round = v.get<int64_t>();
      else if (k == "missed") got.missed = v.get<int64_t>();
      else if (k == "last_outcome") got.last_outcome = v.get<std::string>();
      else if (k == "last_error") got.last_error = v.get<std::string>();
      else if (k == "refused") got.refused = v.get<std::vector<int64_t>>();
      else throw Error("unknown field " + k);
    }
    if (!got.run.empty() && got.run != config_.run) {
      // A new run on the same state file: its rounds start again at 1.
      log_warn(config_.id + ": " + f + " belongs to run '" + got.run + "': starting run '" + config_.run + "' afresh");
      return p;
    }
    got.run = config_.run;
    return got;
  } catch (const std::exception& e) {
    throw Error(f + " is not a progress file of this client (" + e.what() + "); move it away");
  }
}

TensorMap EdgeClient::load_kept() {
  std::string f = kept_file();
  if (f.empty() || !file_exists(f)) return {};
  std::map<std::string, std::string> meta;
  TensorMap kept = read_safetensors(f, &meta);
  if (meta["run"] != config_.run) {
    log_warn(config_.id + ": " + f + " holds run '" + meta["run"] + "''s tensors, not '" + config_.run + "''s: starting them afresh");
    return {};
  }
  for (const auto& [name, t] : kept) {
    auto it = template_.find(name);
    bool finite = std::all_of(t.f.begin(), t.f.end(), [](float v) { return std::isfinite(v); });
    if (it == template_.end() || it->second.shape != t.shape || t.dtype != "F32" || !finite)
      throw Error(f + ": " + name + " is not a finite tensor of this adapter's template");
  }
  return kept;
}

void EdgeClient::save() {
  if (config_.state_file.empty()) return;
  json d = {{"run", progress_.run}, {"last_round", progress_.last_round}, {"pending_round", progress_.pending_round},
            {"missed", progress_.missed}, {"last_outcome", progress_.last_outcome}, {"last_error", progress_.last_error},
            {"refused", progress_.refused}};
  write_atomically(config_.state_file, d.dump());
}

std::string EdgeClient::finish(const std::string& outcome, const std::string& error, int64_t round) {
  progress_.last_outcome = outcome;
  if (!error.empty()) {
    progress_.last_error = error;
    if (round && std::find(progress_.refused.begin(), progress_.refused.end(), round) == progress_.refused.end())
      progress_.refused.push_back(round);
  }
  save();
  return outcome;
}

std::string EdgeClient::handle_global(const std::vector<uint8_t>& payload) {
  DecodedGlobal decoded;
  try {
    decoded = decode_global(payload, receiver_, progress_.last_round);
  } catch (const Refused& e) {
    log_warn(config_.id + ": announcement refused: " + e.what());
    return REJECTED;  // not persisted: a bad message says nothing about our progress
  }
  const GlobalHeader& h = decoded.header;
  settle();  // an acknowledgement that arrived since the last look counts before we judge
  if (progress_.pending_round && progress_.pending_round == h.round) {
    answered_ = h.msg_id;
    return publish_pending(h.round, true);
  }
  if (sent_ && sent_->first == h.round && h.msg_id != answered_ && is_sampled(h, config_.id)) {
    // Re-announced with us still awaited: the broker may have lost our update (restart).
    answered_ = h.msg_id;
    pending_envelope_ = sent_->second;
    progress_.pending_round = h.round;
    return publish_pending(h.round, true);
  }
  if (progress_.pending_round && progress_.pending_round < h.round) {
    log_warn(config_.id + ": round " + std::to_string(progress_.pending_round) + " closed before its update was acked");
    progress_.pending_round = 0;
  }
  if (h.final) {
    finished_ = true;
    progress_.last_round = std::max(progress_.last_round, h.round);
    return finish(FINAL);
  }
  if (h.round <= progress_.last_round) return ALREADY_DONE;
  if (progress_.last_round && h.round > progress_.last_round + 1) {
    int64_t gap = h.round - progress_.last_round - 1;
    progress_.missed += gap;
    log_warn(config_.id + ": missed " + std::to_string(gap) + " round(s) before round " + std::to_string(h.round) + " (offline)");
  }
  if (!is_sampled(h, config_.id)) {
    progress_.last_round = h.round;
    return finish(NOT_SAMPLED);
  }
  try {
    return train_and_publish(h, decoded.tensors);
  } catch (const Error& e) {  // e.g. a base delta this program cannot take: nothing trained or sent
    log_error(config_.id + ": round " + std::to_string(h.round) + " not trained: " + e.what());
    progress_.last_round = h.round;
    return finish(REFUSED, e.what(), h.round);
  }
}

std::string EdgeClient::train_and_publish(const GlobalHeader& h, const TensorMap& payload) {
  RoundPlan plan = planner_.plan(h.round, h.deadline, unix_time());
  TensorMap state, kept;
  for (const auto& [k, t] : payload)
    if (!is_base_delta_key(k)) state[k] = t;
  for (const auto& suffix : h.keep_local)
    for (const auto& [k, t] : template_)
      if (ends_with(k, suffix)) kept[k] = kept_.count(k) ? kept_.at(k) : t;
  for (const auto& [k, t] : kept) state[k] = t;
  auto deltas = dense_deltas(payload);
  if (!deltas.empty()) {
    trainer_.set_base_delta(deltas);  // refuses a program without base-delta inputs
    log_info(config_.id + ": round " + std::to_string(h.round) + ": the coordinator's base delta on " +
             std::to_string(deltas.size()) + " layers");
  }
  TrainResult metrics;
  try {
    trainer_.set_trainable(start_state(bundle_.family, state, template_));
    if (bundle_.family == "ravan") trainer_.select_heads(plan.heads);
    SgdConfig sgd;
    sgd.lr = config_.lr;
    sgd.momentum = config_.momentum;
    sgd.weight_decay = config_.weight_decay;
    auto batches = round_batches(data_, config_.id, h.round, plan.local_steps, plan.batch_size);
    metrics = trainer_.train(batches, plan.local_steps, sgd);
  } catch (...) {
    trainer_.clear_base_delta();
    throw;
  }
  trainer_.clear_base_delta();
  TensorMap trained = trainer_.get_trainable();
  if (!kept.empty()) {
    for (auto& [k, t] : kept) t = trained.at(k);
    kept_ = kept;
    if (!kept_file().empty()) write_atomically(kept_file(), encode_safetensors(kept_, {{"run", config_.run}}));
  }
  TensorMap upload = upload_state(bundle_.family, trained, plan.heads);
  for (const auto& [k, t] : kept) upload.erase(k);
  UpdateHeader u;
  u.run = config_.run;
  u.round = h.round;
  u.client = config_.id;
  u.method = h.method;
  u.spec = bundle_.spec_digest;
  u.num_examples = data_.n;
  u.local_steps = metrics.steps;
  u.compute_s = metrics.seconds;
  if (bundle_.family == "lora") u.rank = bundle_.rank;
  u.heads = plan.heads;
  u.msg_id = random_hex(16);
  u.sent_at = unix_time();
  std::vector<uint8_t> envelope = encode_update(u, upload, config_.key);
  float first = metrics.losses.empty() ? NAN : metrics.losses.front(), last = metrics.losses.empty() ? NAN : metrics.losses.back();
  log_info(config_.id + ": round " + std::to_string(h.round) + ": " + std::to_string(metrics.steps) + " steps of " +
           std::to_string(plan.batch_size) + " in " + std::to_string(metrics.seconds) + " s, loss " + std::to_string(first) +
           " -> " + std::to_string(last));
  pending_envelope_ = envelope;
  answered_ = h.msg_id;
  if (!pending_file().empty()) write_atomically(pending_file(), envelope);  // before publishing: a restart resends it
  progress_.pending_round = h.round;
  progress_.last_round = h.round;
  save();
  return publish_pending(h.round, false);
}

std::string EdgeClient::publish_pending(int64_t round, bool resent) {
  if (!pending_envelope_ && !pending_file().empty() && file_exists(pending_file())) pending_envelope_ = read_file(pending_file());
  if (!pending_envelope_) {
    progress_.pending_round = 0;
    return finish(REFUSED, "the update of round " + std::to_string(round) + " was lost before it was sent", round);
  }
  try {
    delivery_ = link_.publish(up_topic_, *pending_envelope_);
  } catch (const PayloadTooLarge& e) {
    log_error(config_.id + ": round " + std::to_string(round) + " update not sent: " + e.what());
    progress_.pending_round = 0;
    pending_envelope_.reset();
    return finish(REFUSED, e.what(), round);
  }
  return finish(resent ? RESENT : TRAINED);
}

bool EdgeClient::settle(double timeout_s) {
  auto d = delivery_;
  if (d && d->wait(timeout_s)) {
    delivery_.reset();
    if (d->ok()) {
      if (pending_envelope_) sent_ = std::make_pair(progress_.pending_round, *pending_envelope_);
      progress_.pending_round = 0;
      pending_envelope_.reset();
      if (!pending_file().empty()) remove_file(pending_file());
      save();
    } else {
      log_error(config_.id + ": update not delivered: " + d->error());
    }
  }
  return progress_.pending_round == 0;
}

void Inbox::push(std::vector<uint8_t> payload) {
  std::lock_guard<std::mutex> lock(m_);
  items_.push_back(std::move(payload));
  cv_.notify_all();
}

std::optional<std::vector<uint8_t>> Inbox::take_newest(double timeout_s) {
  std::unique_lock<std::mutex> lock(m_);
  cv_.wait_for(lock, std::chrono::duration<double>(timeout_s), [&] { return !items_.empty(); });
  if (items_.empty()) return std::nullopt;
  auto newest = std::move(items_.back());
  items_.clear();
  return newest;
}

Progress run_device(EdgeClient& client, Inbox& inbox, const std::atomic<bool>& stop) {
  while (!stop) {
    auto payload = inbox.take_newest(0.5);
    if (!payload) {
      client.settle();
      continue;
    }
    std::string outcome = client.handle_global(*payload);
    log_info(client.id() + ": " + outcome + " (round " + std::to_string(client.progress().last_round) + ")");
    client.settle(0.5);
    if (client.finished() && client.settle()) break;
  }
  return client.progress();
}

namespace {
std::atomic<bool> g_stop{false};
void on_signal(int) { g_stop = true; }
}  // namespace

int run_client(const std::string& config_path, const std::vector<std::string>& flags) {
  ClientConfig config = load_client_config(config_path, flags);
  Bundle bundle = load_bundle(config.bundle_dir);
  LocalData data = load_local_data(config.data_file, bundle);
  Planner planner(config.plan_file, bundle, config.id, config.local_steps, config.batch_size);
  if (config.batch_size > bundle.batch_max)
    throw Error("batch_size " + std::to_string(config.batch_size) + " exceeds the bundle program's largest batch " +
                std::to_string(bundle.batch_max));
  Trainer::set_threads(static_cast<unsigned>(config.threads));
  double t0 = monotonic_time();
  Trainer trainer(bundle.train_pte(), bundle.adapter_ptd(), bundle.seq_len, bundle.batch_min, bundle.batch_max, bundle.base_delta);
  log_info(config.id + ": bundle " + bundle.folder + ": " + bundle.model + ", " + std::to_string(bundle.num_classes) +
           " classes, seq len " + std::to_string(bundle.seq_len) + ", " + std::to_string(data.n) + " local examples, program loaded in " +
           std::to_string(monotonic_time() - t0) + " s");
  if (config.tls && !config.coordinator_key)
    log_warn(config.id + ": no coordinator_key: announcements are checked by SHA-256 only, not authenticated");

  LinkConfig lc;
  lc.client_id = config.id;
  lc.host = config.host;
  lc.port = config.port;
  lc.tls = config.tls;
  lc.ca_file = config.ca_file;
  lc.cert_file = config.cert_file;
  lc.key_file = config.cert_key_file;
  lc.username = config.username;
  lc.password = config.password;
  lc.status_topic = topic_of(config.run, "status", config.id);
  lc.max_packet_size = config.max_packet_size;
  lc.connect_jitter_s = config.connect_jitter_s;
  Inbox inbox;
  const std::string global = topic_of(config.run, "global");
  MqttLink link(lc, [&](const std::string& topic, std::vector<uint8_t> payload) {
    if (topic == global) inbox.push(std::move(payload));
  });
  EdgeClient client(config, bundle, trainer, planner, data, link);
  std::signal(SIGTERM, on_signal);
  std::signal(SIGINT, on_signal);
  link.subscribe(global);
  link.start();
  Progress p = run_device(client, inbox, g_stop);
  link.close();
  std::cout << config.id << " (native): last round " << p.last_round << ", outcome "
            << (p.last_outcome.empty() ? "-" : p.last_outcome) << (p.missed ? ", missed " + std::to_string(p.missed) : "")
            << (p.last_error.empty() ? "" : ", error: " + p.last_error) << std::endl;
  return 0;
}

}  // namespace fl
