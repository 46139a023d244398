// One MQTT 5 connection (libmosquitto) that keeps itself connected, as protocol/mqtt_link.py:
// a session that outlives a disconnect (session expiry, never a clean start), subscriptions renewed
// when the broker has no session for us, a retained "offline" last will and "online" after each
// connect, exponential back-off with jitter, and a publish refused locally (nothing sent) when it
// is above the broker's or our packet limit. Every libmosquitto call runs on the link's own thread.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "util.hpp"

struct mosquitto;

namespace fl {

struct LinkConfig {
  std::string client_id, host = "127.0.0.1";
  int port = 1883;
  bool tls = false;
  std::string ca_file, cert_file, key_file;
  std::string username;
  std::optional<std::string> password;
  std::string status_topic;
  int keepalive_s = 30;
  int session_expiry_s = 3600;
  long max_packet_size = 16L * 1024 * 1024;
  double connect_jitter_s = 0.0;
  double backoff_min_s = 0.25, backoff_max_s = 30.0;
};

struct PayloadTooLarge : Error {
  using Error::Error;
};

// The broker's acknowledgement of one QoS 1 publish (or the reason it failed).
class Delivery {
 public:
  bool wait(double timeout_s);  // true once done (ok or failed)
  bool ok();
  std::string error();
  void finish(const std::string& error);

 private:
  std::mutex m_;
  std::condition_variable cv_;
  bool done_ = false;
  std::string error_;
};

class MqttLink {
 public:
  using OnMessage = std::function<void(const std::string& topic, std::vector<uint8_t> payload)>;
  MqttLink(LinkConfig config, OnMessage on_message);
  ~MqttLink();
  void start();
  void subscribe(const std::string& topic);  // QoS 1, renewed on every connect without a session
  std::shared_ptr<Delivery> publish(const std::string& topic, std::vector<uint8_t> payload, bool retain = false);
  void close(double timeout_s = 5.0);  // "offline" on the status topic, then disconnect
  bool connected() const { return connected_; }
  long packet_limit() const { return packet_limit_; }
  int connects() const { return connects_; }

  // libmosquitto callbacks (on the link's thread).
  void on_connect(int rc, int flags, long announced_max_packet);
  void on_disconnect(int rc);
  void on_message(const std::string& topic, const uint8_t* data, size_t n);
  void on_publish(int mid, int reason_code);
  void on_log(int level, const char* text);

 private:
  struct Outgoing {
    std::string topic;
    std::vector<uint8_t> payload;
    bool retain;
    std::shared_ptr<Delivery> delivery;
  };
  void loop();
  bool connect_once();
  void send_queued();
  void sleep_interruptible(double seconds);
  double next_backoff();

  LinkConfig config_;
  OnMessage on_message_;
  mosquitto* mosq_ = nullptr;
  std::thread thread_;
  std::mutex m_;
  std::condition_variable wake_;
  std::deque<Outgoing> outbox_;
  std::vector<std::string> topics_;
  std::vector<std::pair<int, std::shared_ptr<Delivery>>> inflight_;
  std::atomic<bool> connected_{false}, stopping_{false};
  std::atomic<long> packet_limit_;
  std::atomic<int> connects_{0};
  bool resubscribe_ = false, say_online_ = false;
  double backoff_s_ = 0;
  double last_warning_ = 0;
};

size_t publish_packet_size(const std::string& topic, size_t payload_len);

}  // namespace fl
