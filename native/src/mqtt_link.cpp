#include "mqtt_link.hpp"

#include <mosquitto.h>
#include <mqtt_protocol.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <random>

namespace fl {

namespace {
std::mt19937_64& rng() {
  static std::mt19937_64 gen{std::random_device{}()};
  return gen;
}

MqttLink* self(void* obj) { return static_cast<MqttLink*>(obj); }

void cb_connect(mosquitto*, void* obj, int rc, int flags, const mosquitto_property* props) {
  uint32_t announced = 0;
  if (props) mosquitto_property_read_int32(props, MQTT_PROP_MAXIMUM_PACKET_SIZE, &announced, false);
  self(obj)->on_connect(rc, flags, static_cast<long>(announced));
}
void cb_disconnect(mosquitto*, void* obj, int rc, const mosquitto_property*) { self(obj)->on_disconnect(rc); }
void cb_message(mosquitto*, void* obj, const mosquitto_message* msg, const mosquitto_property*) {
  self(obj)->on_message(msg->topic, static_cast<const uint8_t*>(msg->payload), static_cast<size_t>(msg->payloadlen));
}
void cb_publish(mosquitto*, void* obj, int mid, int reason_code, const mosquitto_property*) {
  self(obj)->on_publish(mid, reason_code);
}
void cb_log(mosquitto*, void* obj, int level, const char* text) { self(obj)->on_log(level, text); }

size_t varint_len(size_t n) {
  size_t k = 1;
  while (n >= 128) {
    n /= 128;
    ++k;
  }
  return k;
}
}  // namespace

size_t publish_packet_size(const std::string& topic, size_t payload_len) {
  size_t remaining = 2 + topic.size() + 2 /* packet id, QoS 1 */ + 1 /* no properties */ + payload_len;
  return 1 + varint_len(remaining) + remaining;
}

// -- Delivery ---------------------------------------------------------------------------------------

bool Delivery::wait(double timeout_s) {
  std::unique_lock<std::mutex> lock(m_);
  cv_.wait_for(lock, std::chrono::duration<double>(timeout_s), [&] { return done_; });
  return done_;
}
bool Delivery::ok() {
  std::lock_guard<std::mutex> lock(m_);
  return done_ && error_.empty();
}
std::string Delivery::error() {
  std::lock_guard<std::mutex> lock(m_);
  return error_;
}
void Delivery::finish(const std::string& error) {
  {
    std::lock_guard<std::mutex> lock(m_);
    done_ = true;
    error_ = error;
  }
  cv_.notify_all();
}

// -- MqttLink ---------------------------------------------------------------------------------------

MqttLink::MqttLink(LinkConfig config, OnMessage on_message)
    : config_(std::move(config)), on_message_(std::move(on_message)), packet_limit_(config_.max_packet_size) {
  mosquitto_lib_init();
  // No clean start: a restarted client resumes its session (QoS 1 messages queued for it).
  mosq_ = mosquitto_new(config_.client_id.c_str(), false, this);
  if (!mosq_) throw Error("libmosquitto: cannot make a client for " + config_.client_id);
  mosquitto_int_option(mosq_, MOSQ_OPT_PROTOCOL_VERSION, MQTT_PROTOCOL_V5);
  mosquitto_threaded_set(mosq_, true);
  if (!config_.username.empty() &&
      mosquitto_username_pw_set(mosq_, config_.username.c_str(), config_.password ? config_.password->c_str() : nullptr))
    throw Error("libmosquitto: bad username/password");
  if (config_.tls) {
    int rc = mosquitto_tls_set(mosq_, config_.ca_file.empty() ? nullptr : config_.ca_file.c_str(), nullptr,
                               config_.cert_file.empty() ? nullptr : config_.cert_file.c_str(),
                               config_.key_file.empty() ? nullptr : config_.key_file.c_str(), nullptr);
    if (rc != MOSQ_ERR_SUCCESS) throw Error("TLS setup failed (" + std::string(mosquitto_strerror(rc)) + "): check " + config_.ca_file);
    if (config_.ca_file.empty()) mosquitto_int_option(mosq_, MOSQ_OPT_TLS_USE_OS_CERTS, 1);
  }
  if (!config_.status_topic.empty() &&
      mosquitto_will_set_v5(mosq_, config_.status_topic.c_str(), 7, "offline", 1, true, nullptr) != MOSQ_ERR_SUCCESS)
    throw Error("libmosquitto: cannot set the last will");
  mosquitto_connect_v5_callback_set(mosq_, cb_connect);
  mosquitto_disconnect_v5_callback_set(mosq_, cb_disconnect);
  mosquitto_message_v5_callback_set(mosq_, cb_message);
  mosquitto_publish_v5_callback_set(mosq_, cb_publish);
  mosquitto_log_callback_set(mosq_, cb_log);
}

MqttLink::~MqttLink() {
  close(1.0);
  if (mosq_) mosquitto_destroy(mosq_);
  mosquitto_lib_cleanup();
}

void MqttLink::start() {
  thread_ = std::thread([this] { loop(); });
}

void MqttLink::subscribe(const std::string& topic) {
  std::lock_guard<std::mutex> lock(m_);
  topics_.push_back(topic);
  resubscribe_ = true;
  wake_.notify_all();
}

std::shared_ptr<Delivery> MqttLink::publish(const std::string& topic, std::vector<uint8_t> payload, bool retain) {
  size_t size = publish_packet_size(topic, payload.size());
  if (static_cast<long>(size) > packet_limit_)
    throw PayloadTooLarge("a " + std::to_string(size) + "-byte packet exceeds the " + std::to_string(packet_limit_) +
                          "-byte limit of the broker or this client; nothing was sent");
  auto delivery = std::make_shared<Delivery>();
  std::lock_guard<std::mutex> lock(m_);
  outbox_.push_back(Outgoing{topic, std::move(payload), retain, delivery});
  wake_.notify_all();
  return delivery;
}

void MqttLink::close(double timeout_s) {
  if (!thread_.joinable()) return;
  if (connected_ && !config_.status_topic.empty()) {  // a clean exit sends no will: say it ourselves
    auto d = publish(config_.status_topic, {'o', 'f', 'f', 'l', 'i', 'n', 'e'}, true);
    d->wait(timeout_s);
  }
  stopping_ = true;
  wake_.notify_all();
  thread_.join();
  if (connected_) mosquitto_disconnect_v5(mosq_, 0, nullptr);
  connected_ = false;
}

double MqttLink::next_backoff() {
  backoff_s_ = backoff_s_ == 0 ? config_.backoff_min_s : std::min(config_.backoff_max_s, 2 * backoff_s_);
  std::uniform_real_distribution<double> jitter(0.5, 1.0);
  return backoff_s_ * jitter(rng());
}

void MqttLink::sleep_interruptible(double seconds) {
  std::unique_lock<std::mutex> lock(m_);
  wake_.wait_for(lock, std::chrono::duration<double>(seconds), [&] { return stopping_.load(); });
}

bool MqttLink::connect_once() {
  mosquitto_property* props = nullptr;
  mosquitto_property_add_int32(&props, MQTT_PROP_SESSION_EXPIRY_INTERVAL, static_cast<uint32_t>(config_.session_expiry_s));
  int rc = mosquitto_connect_bind_v5(mosq_, config_.host.c_str(), config_.port, config_.keepalive_s, nullptr, props);
  mosquitto_property_free_all(&props);
  if (rc == MOSQ_ERR_SUCCESS) return true;
  double now = monotonic_time();
  if (now - last_warning_ > 30) {  // a warning, not once per retry
    last_warning_ = now;
    std::string why = rc == MOSQ_ERR_ERRNO ? std::strerror(errno) : mosquitto_strerror(rc);
    log_warn(config_.client_id + ": cannot reach the broker at " + config_.host + ":" + std::to_string(config_.port) +
             (config_.tls ? " (TLS, CA " + (config_.ca_file.empty() ? std::string("system") : config_.ca_file) + ")" : "") +
             ": " + why + "; retrying");
  }
  return false;
}

void MqttLink::loop() {
  std::uniform_real_distribution<double> jitter(0.0, std::max(0.0, config_.connect_jitter_s));
  sleep_interruptible(jitter(rng()));
  bool socket_open = false;
  while (!stopping_) {
    if (!socket_open) {
      socket_open = connect_once();
      if (!socket_open) {
        sleep_interruptible(next_backoff());
        continue;
      }
    }
    send_queued();
    int rc = mosquitto_loop(mosq_, 50, 1);
    if (rc != MOSQ_ERR_SUCCESS && !stopping_) {
      if (connected_) log_info(config_.client_id + ": disconnected (" + mosquitto_strerror(rc) + "); reconnecting");
      connected_ = false;
      socket_open = false;
      sleep_interruptible(next_backoff());
    }
  }
}

void MqttLink::send_queued() {
  if (!connected_) return;
  std::vector<std::string> topics;
  std::deque<Outgoing> out;
  bool online;
  {
    std::lock_guard<std::mutex> lock(m_);
    if (resubscribe_) topics = topics_;
    resubscribe_ = false;
    online = say_online_;
    say_online_ = false;
    out.swap(outbox_);
  }
  for (const auto& t : topics) {
    int rc = mosquitto_subscribe_v5(mosq_, nullptr, t.c_str(), 1, 0, nullptr);
    if (rc != MOSQ_ERR_SUCCESS) log_warn(config_.client_id + ": cannot subscribe to " + t + ": " + mosquitto_strerror(rc));
  }
  if (online && !config_.status_topic.empty())
    mosquitto_publish_v5(mosq_, nullptr, config_.status_topic.c_str(), 6, "online", 1, true, nullptr);
  for (auto& item : out) {
    int mid = 0;
    int rc = mosquitto_publish_v5(mosq_, &mid, item.topic.c_str(), static_cast<int>(item.payload.size()),
                                  item.payload.data(), 1, item.retain, nullptr);
    if (rc == MOSQ_ERR_OVERSIZE_PACKET || rc == MOSQ_ERR_PAYLOAD_SIZE) {
      item.delivery->finish("the broker's packet limit refuses this payload; nothing was sent");
    } else if (rc != MOSQ_ERR_SUCCESS) {
      std::lock_guard<std::mutex> lock(m_);  // not sent now: again after the next connect
      outbox_.push_front(std::move(item));
    } else {
      std::lock_guard<std::mutex> lock(m_);
      inflight_.emplace_back(mid, item.delivery);
    }
  }
}

void MqttLink::on_connect(int rc, int flags, long announced) {
  if (rc != 0) {
    std::string reason = mosquitto_reason_string(rc);
    log_warn(config_.client_id + ": the broker at " + config_.host + ":" + std::to_string(config_.port) +
             " refused the connection: " + reason +
             (config_.username.empty() ? "" : " (user " + config_.username + "; is this device enrolled?)"));
    return;
  }
  backoff_s_ = 0;
  ++connects_;
  packet_limit_ = announced > 0 ? std::min(config_.max_packet_size, announced) : config_.max_packet_size;
  std::lock_guard<std::mutex> lock(m_);
  // A kept session still has our subscriptions; a new one (a broker that forgot us) needs them again.
  if (!(flags & 1)) resubscribe_ = true;
  say_online_ = true;
  connected_ = true;
  if (connects_ == 1)
    log_info(config_.client_id + ": connected to " + config_.host + ":" + std::to_string(config_.port) +
             (config_.tls ? " (TLS)" : ""));
  else
    log_info(config_.client_id + ": reconnected" + ((flags & 1) ? "" : " (the broker had no session for us: subscribing again)"));
}

void MqttLink::on_disconnect(int rc) {
  if (connected_ && !stopping_) log_info(config_.client_id + ": disconnected (" + std::string(mosquitto_reason_string(rc)) + ")");
  connected_ = false;
}

void MqttLink::on_message(const std::string& topic, const uint8_t* data, size_t n) {
  on_message_(topic, std::vector<uint8_t>(data, data + n));
}

void MqttLink::on_publish(int mid, int reason_code) {
  std::shared_ptr<Delivery> d;
  {
    std::lock_guard<std::mutex> lock(m_);
    for (auto it = inflight_.begin(); it != inflight_.end(); ++it)
      if (it->first == mid) {
        d = it->second;
        inflight_.erase(it);
        break;
      }
  }
  if (d) d->finish(reason_code >= 128 ? std::string("the broker refused it: ") + mosquitto_reason_string(reason_code) : "");
}

void MqttLink::on_log(int level, const char* text) {
  if (level == MOSQ_LOG_ERR) log_warn(config_.client_id + ": libmosquitto: " + text);
}

}  // namespace fl
