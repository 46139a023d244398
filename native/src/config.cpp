#include "config.hpp"

#include <algorithm>
#include <cstdlib>
#include <set>
#include <sstream>

#include "strict_json.hpp"
#include "util.hpp"

namespace fl {

namespace {

std::string trim(const std::string& s) {
  size_t b = s.find_first_not_of(" \t\r"), e = s.find_last_not_of(" \t\r");
  return b == std::string::npos ? "" : s.substr(b, e - b + 1);
}

// Keys `fleetlora client` has that only the Python client uses (its own data and model flags).
const std::set<std::string> kPythonOnly = {"dataset", "shard", "max_examples", "max_len", "model", "num_classes",
                                           "spec", "seed", "optimizer"};

long to_long(const std::string& v, const std::string& where) {
  char* end = nullptr;
  long out = std::strtol(v.c_str(), &end, 10);
  if (v.empty() || *end) throw Error(where + ": expected an integer, got " + v);
  return out;
}

double to_double(const std::string& v, const std::string& where) {
  char* end = nullptr;
  double out = std::strtod(v.c_str(), &end);
  if (v.empty() || *end) throw Error(where + ": expected a number, got " + v);
  return out;
}

void parse_broker(const std::string& url, ClientConfig& c, const std::string& where) {
  std::string rest;
  if (url.rfind("mqtts://", 0) == 0) {
    c.tls = true;
    rest = url.substr(8);
  } else if (url.rfind("mqtt://", 0) == 0) {
    c.tls = false;
    rest = url.substr(7);
  } else {
    throw Error(where + ": broker must look like mqtt://host:port or mqtts://host:port, got " + url);
  }
  auto colon = rest.rfind(':');
  c.host = colon == std::string::npos ? rest : rest.substr(0, colon);
  c.port = colon == std::string::npos ? (c.tls ? 8883 : 1883) : static_cast<int>(to_long(rest.substr(colon + 1), where));
  if (c.host.empty() || c.port <= 0 || c.port > 65535) throw Error(where + ": bad broker address " + url);
}

}  // namespace

std::map<std::string, std::string> parse_flat_toml(const std::string& text, const std::string& source) {
  std::map<std::string, std::string> out;
  std::istringstream in(text);
  std::string line;
  int number = 0;
  while (std::getline(in, line)) {
    ++number;
    std::string where = source + ":" + std::to_string(number);
    std::string t = trim(line);
    if (t.empty() || t[0] == '#') continue;
    if (t[0] == '[') throw Error(where + ": tables are not supported in client.toml");
    auto eq = t.find('=');
    if (eq == std::string::npos) throw Error(where + ": expected key = value");
    std::string key = trim(t.substr(0, eq)), value = trim(t.substr(eq + 1));
    for (char ch : key)
      if (!(std::isalnum(static_cast<unsigned char>(ch)) || ch == '_' || ch == '-')) throw Error(where + ": bad key " + key);
    if (!value.empty() && value[0] == '"') {
      // A TOML basic string's escapes are JSON's: let the JSON parser read it (up to its closing quote).
      size_t end = 1;
      while (end < value.size() && value[end] != '"') end += value[end] == '\\' ? 2 : 1;
      if (end >= value.size()) throw Error(where + ": unterminated string");
      std::string rest = trim(value.substr(end + 1));
      if (!rest.empty() && rest[0] != '#') throw Error(where + ": unexpected text after the string");
      try {
        value = json::parse(value.substr(0, end + 1)).get<std::string>();
      } catch (const json::exception& e) {
        throw Error(where + ": bad string: " + e.what());
      }
    } else {
      auto hash = value.find('#');
      if (hash != std::string::npos) value = trim(value.substr(0, hash));
      if (value.empty()) throw Error(where + ": no value for " + key);
    }
    std::replace(key.begin(), key.end(), '-', '_');
    if (out.count(key)) throw Error(where + ": " + key + " is set twice");
    out[key] = value;
  }
  return out;
}

Key read_key_spec(const std::string& spec, const std::string& folder) {
  if (spec.empty()) return std::nullopt;
  std::string text, source;
  if (spec.rfind("env:", 0) == 0) {
    const char* v = std::getenv(spec.substr(4).c_str());
    if (!v) throw Error("environment variable " + spec.substr(4) + " (named for a key) is not set");
    text = v;
    source = "$" + spec.substr(4);
  } else {
    source = join_path(folder, spec);
    if (!file_exists(source)) throw Error("key file not found: " + source);
    text = read_text(source);
  }
  auto key = from_hex(text, source);
  if (key.size() < 16) throw Error(source + ": a key needs at least 16 bytes, got " + std::to_string(key.size()));
  return key;
}

ClientConfig load_client_config(const std::string& path, const std::vector<std::string>& flags) {
  if (!file_exists(path)) throw Error("client config not found: " + path);
  auto values = parse_flat_toml(read_text(path), path);
  for (size_t i = 0; i < flags.size(); ++i) {  // --name value, over the file's values
    const std::string& f = flags[i];
    if (f.rfind("--", 0) != 0 || i + 1 >= flags.size()) throw Error("flags are --name value pairs, got " + f);
    std::string key = f.substr(2);
    std::replace(key.begin(), key.end(), '-', '_');
    values[key] = flags[++i];
  }
  ClientConfig c;
  c.folder = dirname_of(path);
  std::string hmac_spec, coordinator_spec, password_file;
  for (const auto& [key, v] : values) {
    std::string where = path + ": " + key;
    if (key == "broker") parse_broker(v, c, where);
    else if (key == "run") c.run = v;
    else if (key == "id") c.id = v;
    else if (key == "profile") c.profile = v;
    else if (key == "bundle") c.bundle_dir = join_path(c.folder, v);
    else if (key == "username") c.username = v;
    else if (key == "password_file") password_file = v;
    else if (key == "ca") c.ca_file = join_path(c.folder, v);
    else if (key == "cert") c.cert_file = join_path(c.folder, v);
    else if (key == "key_file") c.cert_key_file = join_path(c.folder, v);
    else if (key == "key") hmac_spec = v;
    else if (key == "coordinator_key") coordinator_spec = v;
    else if (key == "state_file") c.state_file = join_path(c.folder, v);
    else if (key == "local_steps") c.local_steps = static_cast<int>(to_long(v, where));
    else if (key == "batch_size") c.batch_size = static_cast<int>(to_long(v, where));
    else if (key == "lr") c.lr = to_double(v, where);
    else if (key == "max_packet_size") c.max_packet_size = to_long(v, where);
    else if (key == "connect_jitter") c.connect_jitter_s = to_double(v, where);
    else if (key == "threads") c.threads = static_cast<int>(to_long(v, where));
    else if (key == "backend") {
      if (v != "executorch")
        throw Error(where + ": the native client trains the bundle's ExecuTorch program (backend = \"executorch\"), got " + v);
    } else if (key == "plan") c.plan_file = join_path(c.folder, v);
    else if (key == "data") c.data_file = join_path(c.folder, v);
    else if (kPythonOnly.count(key)) log_warn(where + ": used by the Python client only; the native client ignores it");
    else throw Error(where + ": unknown key (valid: broker, run, id, profile, bundle, username, password_file, ca, "
                             "cert, key_file, key, coordinator_key, state_file, local_steps, batch_size, lr, "
                             "max_packet_size, connect_jitter, threads, backend, plan, data)");
  }
  if (!valid_id(c.run)) throw Error(path + ": run must be 1-64 characters of [A-Za-z0-9_.-], got '" + c.run + "'");
  if (!valid_id(c.id)) throw Error(path + ": id must be 1-64 characters of [A-Za-z0-9_.-], got '" + c.id + "'");
  if (c.bundle_dir.empty()) throw Error(path + ": no bundle folder (bundle = \"bundle\")");
  if (c.batch_size < 1) throw Error(path + ": batch_size must be >= 1");
  if (!(c.lr > 0)) throw Error(path + ": lr must be > 0");
  if (c.local_steps < 0) throw Error(path + ": local_steps must be >= 0");
  if (c.plan_file.empty()) c.plan_file = join_path(c.folder, "plan.json");
  if (c.data_file.empty()) c.data_file = join_path(c.folder, "data.safetensors");
  if (!password_file.empty()) {
    std::string p = join_path(c.folder, password_file);
    if (!file_exists(p)) throw Error("password file not found: " + p);
    std::string text = read_text(p);
    c.password = text.substr(0, text.find_last_not_of(" \t\r\n") + 1);
    if (c.username.empty()) c.username = c.id;
  }
  if (c.tls && c.ca_file.empty()) log_warn(path + ": mqtts:// without ca: the system's CA store verifies the broker");
  if (c.cert_file.empty() != c.cert_key_file.empty()) throw Error(path + ": cert and key_file go together");
  for (const auto& f : {c.ca_file, c.cert_file, c.cert_key_file})
    if (!f.empty() && !file_exists(f)) throw Error("file not found: " + f);
  c.key = read_key_spec(hmac_spec, c.folder);
  c.coordinator_key = read_key_spec(coordinator_spec, c.folder);
  return c;
}

}  // namespace fl
