#include "envelope.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <regex>
#include <set>

#include "crypto.hpp"
#include "envelope_tensors.hpp"
#include "util.hpp"

namespace fl {

const char* const kLoraA = ".lora_A.default.weight";
const char* const kLoraB = ".lora_B.default.weight";
const char* const kRavanH = ".ravan_H";
const char* const kRavanS = ".ravan_s";
const char* const kRavanHeads = ".ravan_heads";
const char* const kBaseVersion = "base_delta.version";
const char* const kBaseDelta = ".base_delta";
const char* const kBaseDeltaA = ".base_delta_A";
const char* const kBaseDeltaB = ".base_delta_B";
namespace {
const uint8_t kMagic[4] = {'F', 'L', 'W', 0x01};
const char* const kHmac = "hmac-sha256";
const char* const kSha = "sha256";
}  // namespace

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

bool is_base_delta_key(const std::string& name) {
  return name == kBaseVersion || ends_with(name, kBaseDelta) || ends_with(name, kBaseDeltaA) ||
         ends_with(name, kBaseDeltaB);
}

bool valid_id(const std::string& value) {
  if (value.empty() || value.size() > 64) return false;
  bool only_dots = true;
  for (char c : value) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.' || c == '-')) return false;
    if (c != '.') only_dots = false;
  }
  return !only_dots;
}

// -- the header schema ------------------------------------------------------------------------------

namespace {

using Check = bool (*)(const json&);

bool is_int(const json& x) { return x.is_number_integer(); }  // booleans are not numbers in nlohmann

bool int_in(const json& x, int64_t lo, int64_t hi) {
  if (!is_int(x)) return false;
  if (x.is_number_unsigned() && x.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) return false;
  int64_t v = x.get<int64_t>();
  return lo <= v && v <= hi;
}

bool num_in(const json& x, double lo, double hi) {
  if (!x.is_number()) return false;
  double v = x.get<double>();
  return std::isfinite(v) && lo <= v && v <= hi;
}

bool matches(const json& x, const std::regex& re) { return x.is_string() && std::regex_match(x.get<std::string>(), re); }

const std::regex& hex16() { static const std::regex re("[0-9a-f]{16}"); return re; }
const std::regex& hex32() { static const std::regex re("[0-9a-f]{32}"); return re; }
const std::regex& method_re() { static const std::regex re("[a-z0-9][a-z0-9_\\-]{0,31}"); return re; }

bool id_check(const json& x) { return x.is_string() && valid_id(x.get<std::string>()); }

template <typename F>
bool unique_list(const json& x, size_t min_len, size_t max_len, F item) {
  if (!x.is_array() || x.size() < min_len || x.size() > max_len) return false;
  std::set<std::string> seen;
  for (const auto& i : x) {
    if (!item(i)) return false;
    if (!seen.insert(i.dump()).second) return false;
  }
  return true;
}

struct Field {
  const char* name;
  bool (*check)(const json&);
};

const std::vector<Field>& common_fields() {
  static const std::vector<Field> fields = {
      {"v", [](const json& x) { return is_int(x) && x.get<int64_t>() == kSchemaVersion; }},
      {"run", id_check},
      {"round", [](const json& x) { return int_in(x, 0, 2147483647); }},
      {"method", [](const json& x) { return matches(x, method_re()); }},
      {"spec", [](const json& x) { return matches(x, hex16()); }},
      {"rank", [](const json& x) { return x.is_null() || int_in(x, 1, 65536); }},
      {"msg_id", [](const json& x) { return matches(x, hex32()); }},
      {"sent_at", [](const json& x) { return num_in(x, 0, 1e11); }},
      {"auth", [](const json& x) { return x.is_string() && (x.get<std::string>() == kHmac || x.get<std::string>() == kSha); }},
  };
  return fields;
}

std::vector<Field> update_fields() {
  auto fields = common_fields();
  fields.push_back({"kind", [](const json& x) { return x.is_string() && x.get<std::string>() == "update"; }});
  fields.push_back({"client", id_check});
  fields.push_back({"num_examples", [](const json& x) { return int_in(x, 1, 1000000000000LL); }});
  fields.push_back({"local_steps", [](const json& x) { return int_in(x, 0, 1000000000LL); }});
  fields.push_back({"compute_s", [](const json& x) { return num_in(x, 0, 1e9); }});
  fields.push_back({"heads", [](const json& x) {
                      return x.is_null() || unique_list(x, 1, 65536, [](const json& i) { return int_in(i, 0, 65535); });
                    }});
  return fields;
}

std::vector<Field> global_fields() {
  auto fields = common_fields();
  fields.push_back({"kind", [](const json& x) { return x.is_string() && x.get<std::string>() == "global"; }});
  fields.push_back({"spec_json", [](const json& x) { return x.is_object(); }});
  fields.push_back({"deadline", [](const json& x) { return num_in(x, 0, 1e11); }});
  fields.push_back({"clients", [](const json& x) { return x.is_null() || unique_list(x, 0, 1000000, id_check); }});
  fields.push_back({"sample_fraction", [](const json& x) { return x.is_null() || num_in(x, 0, 1); }});
  fields.push_back({"final", [](const json& x) { return x.is_boolean(); }});
  fields.push_back({"keep_local", [](const json& x) {
                      return unique_list(x, 0, 1, [](const json& i) {
                        return i.is_string() && (i.get<std::string>() == kLoraA || i.get<std::string>() == kLoraB);
                      });
                    }});
  return fields;
}

// Optional fields (protocol/wire_schema.py's UPDATE_OPTIONAL and GLOBAL_OPTIONAL): a header may carry
// any of them, and nothing else beyond its fields.
const std::vector<Field>& update_optional() {
  static const std::vector<Field> fields = {
      {"eval_loss", [](const json& x) { return num_in(x, 0, 1e9); }},
      {"eval_accuracy", [](const json& x) { return num_in(x, 0, 1); }},
      {"eval_examples", [](const json& x) { return int_in(x, 1, 1000000000000LL); }},
      {"train_loss", [](const json& x) { return num_in(x, 0, 1e9); }},
  };
  return fields;
}

const std::vector<Field>& global_optional() {
  static const std::vector<Field> fields = {
      {"model", id_check},
      {"num_classes", [](const json& x) { return int_in(x, 1, 1000000); }},
      // The ranks a device may train instead of the global rank: this client trains its bundle's rank.
      {"rank_choices", [](const json& x) { return unique_list(x, 1, 64, [](const json& i) { return int_in(i, 1, 65536); }); }},
  };
  return fields;
}

void check_schema(const json& d, const std::vector<Field>& fields, const std::string& kind,
                  const std::vector<Field>& optional = {}) {
  if (!d.is_object()) throw Refused("schema", "header is not a JSON object");
  if (!d.contains("kind") || d["kind"] != kind) {
    std::string got = d.contains("kind") ? d["kind"].dump().substr(0, 20) : "None";
    throw Refused("schema", "expected a '" + kind + "' envelope, got kind " + got);
  }
  if (!d.contains("v") || !is_int(d["v"]) || d["v"].get<int64_t>() != kSchemaVersion) {
    bool older = d.contains("v") && is_int(d["v"]) && d["v"].get<int64_t>() < kSchemaVersion;
    std::string got = d.contains("v") ? d["v"].dump().substr(0, 20) : "None";
    throw Refused("schema", "schema version " + got + ", expected " + std::to_string(kSchemaVersion) +
                                (older ? ": the sender is older than this receiver (update it; protocol/ENVELOPE.md)" : ""));
  }
  std::set<std::string> known;
  std::string missing, unknown, bad;
  for (const auto& f : fields) {
    known.insert(f.name);
    if (!d.contains(f.name)) missing += std::string(missing.empty() ? "" : ", ") + f.name;
  }
  for (const auto& f : optional) {
    known.insert(f.name);
    if (d.contains(f.name) && !f.check(d[f.name])) bad += std::string(bad.empty() ? "" : ", ") + f.name;
  }
  for (auto& [k, v] : d.items())
    if (!known.count(k)) unknown += (unknown.empty() ? "" : ", ") + k.substr(0, 30);
  if (!missing.empty() || !unknown.empty())
    throw Refused("schema", "header fields missing [" + missing + "], unknown [" + unknown + "]");
  for (const auto& f : fields)
    if (!f.check(d[f.name])) bad += std::string(bad.empty() ? "" : ", ") + f.name;
  if (!bad.empty()) throw Refused("schema", "header fields with wrong type or out of range: [" + bad + "]");
}

// -- framing and MAC --------------------------------------------------------------------------------

struct Framed {
  json header;
  size_t header_end = 0;  // where the blob starts
  bool has_mac = false;
};

Framed unframe(const std::vector<uint8_t>& p, size_t max_bytes) {
  if (p.size() > max_bytes)
    throw Refused("too_large", "payload of " + std::to_string(p.size()) + " bytes exceeds the " + std::to_string(max_bytes) + " limit");
  if (std::memcmp(p.data(), kMagic, std::min<size_t>(4, p.size())) != 0) throw Refused("bad_magic", "not a fleetlora envelope");
  if (p.size() < 8) throw Refused("truncated", "payload of " + std::to_string(p.size()) + " bytes is shorter than the framing");
  size_t n = (size_t(p[4]) << 24) | (size_t(p[5]) << 16) | (size_t(p[6]) << 8) | size_t(p[7]);
  if (n > kMaxHeaderBytes)
    throw Refused("too_large", "header of " + std::to_string(n) + " bytes exceeds the " + std::to_string(kMaxHeaderBytes) + " limit");
  if (8 + n > p.size())
    throw Refused("truncated", "header of " + std::to_string(n) + " bytes but only " + std::to_string(p.size() - 8) + " follow");
  Framed f;
  try {
    f.header = parse_strict_json(reinterpret_cast<const char*>(p.data()) + 8, reinterpret_cast<const char*>(p.data()) + 8 + n);
  } catch (const Error& e) {
    throw Refused("bad_header", std::string("header is not valid JSON: ") + e.what());
  }
  f.header_end = 8 + n;
  f.has_mac = p.size() >= f.header_end + kMacBytes;
  return f;
}

std::vector<uint8_t> mac_of(const std::vector<Span>& parts, const Key& key) {
  return key ? hmac_sha256(*key, parts) : sha256(parts);
}

void verify_mac(const std::vector<uint8_t>& p, const Framed& f, const std::string& auth, const Key& key) {
  if (!f.has_mac) throw Refused("truncated", "no room for the 32-byte MAC after the header");
  if (key && auth != kHmac) throw Refused("bad_mac", "unsigned envelope refused: this receiver requires an HMAC");
  if (!key && auth != kSha) throw Refused("bad_mac", "signed envelope but no key is configured to verify it");
  size_t at = p.size() - kMacBytes;
  auto want = mac_of({Span{p.data(), at}}, key);
  if (!equal_constant_time(want, p.data() + at, kMacBytes)) throw Refused("bad_mac", auth + " does not verify");
}

std::optional<int64_t> opt_int(const json& x) { return x.is_null() ? std::nullopt : std::optional<int64_t>(x.get<int64_t>()); }

}  // namespace

// -- public -----------------------------------------------------------------------------------------

std::vector<uint8_t> encode_update(UpdateHeader h, const TensorMap& tensors, const Key& key) {
  if (key && key->size() < 16) throw Error("a device key must be at least 16 bytes");
  json d = {{"v", kSchemaVersion}, {"kind", "update"}, {"run", h.run}, {"round", h.round}, {"client", h.client},
            {"method", h.method}, {"spec", h.spec}, {"num_examples", h.num_examples},
            {"local_steps", h.local_steps}, {"compute_s", h.compute_s}, {"msg_id", h.msg_id},
            {"sent_at", h.sent_at}, {"auth", key ? kHmac : kSha}};
  d["rank"] = h.rank ? json(*h.rank) : json(nullptr);
  d["heads"] = h.heads ? json(*h.heads) : json(nullptr);
  try {
    check_schema(d, update_fields(), "update", update_optional());  // never send what would be refused
  } catch (const Refused& e) {
    throw Error(std::string("this update would be refused: ") + e.what());
  }
  std::string text = d.dump();  // any JSON writer will do: the MAC covers these bytes as sent
  auto blob = encode_safetensors(tensors);
  std::vector<uint8_t> out;
  out.reserve(8 + text.size() + blob.size() + kMacBytes);
  for (uint8_t b : kMagic) out.push_back(b);
  uint32_t n = static_cast<uint32_t>(text.size());
  for (int s = 24; s >= 0; s -= 8) out.push_back(static_cast<uint8_t>(n >> s));
  out.insert(out.end(), text.begin(), text.end());
  out.insert(out.end(), blob.begin(), blob.end());
  auto mac = mac_of({Span{out.data(), out.size()}}, key);
  out.insert(out.end(), mac.begin(), mac.end());
  return out;
}

DecodedGlobal decode_global(const std::vector<uint8_t>& p, const Receiver& r, int64_t min_round) {
  Framed f = unframe(p, r.max_bytes);
  const json& d = f.header;
  check_schema(d, global_fields(), "global", global_optional());
  if (d["clients"].is_null() == d["sample_fraction"].is_null())
    throw Refused("schema", "exactly one of clients and sample_fraction must be set");
  if (d["spec"] != r.spec_digest)
    throw Refused("spec_mismatch", "adapter spec " + d["spec"].get<std::string>() + " != this bundle's " + r.spec_digest);
  if (d["spec_json"] != r.spec_json) throw Refused("spec_mismatch", "spec_json differs from this bundle's adapter spec");
  if (d["run"] != r.run)
    throw Refused("topic_mismatch", "header says run '" + d["run"].get<std::string>() + "', topic says '" + r.run + "'");
  if (d["round"].get<int64_t>() < min_round)
    throw Refused("wrong_round", "round " + d["round"].dump() + " is older than " + std::to_string(min_round));
  verify_mac(p, f, d["auth"].get<std::string>(), r.key);
  DecodedGlobal out;
  GlobalHeader& h = out.header;
  h.run = d["run"];
  h.method = d["method"];
  h.spec = d["spec"];
  h.msg_id = d["msg_id"];
  h.spec_json = d["spec_json"];
  h.round = d["round"];
  h.deadline = d["deadline"].get<double>();
  h.sent_at = d["sent_at"].get<double>();
  if (!d["clients"].is_null()) h.clients = d["clients"].get<std::vector<std::string>>();
  if (!d["sample_fraction"].is_null()) h.sample_fraction = d["sample_fraction"].get<double>();
  h.rank = opt_int(d["rank"]);
  h.final = d["final"];
  h.is_signed = d["auth"] == kHmac;
  h.keep_local = d["keep_local"].get<std::vector<std::string>>();
  Template tmpl = r.shapes;
  if (!h.keep_local.empty()) {
    const std::string& kept = h.keep_local[0];
    bool has = std::any_of(tmpl.begin(), tmpl.end(), [&](const auto& kv) { return ends_with(kv.first, kept); });
    if (!has) throw Refused("schema", "keep_local names ['" + kept + "'], which this adapter lacks");
    for (auto it = tmpl.begin(); it != tmpl.end();) it = ends_with(it->first, kept) ? tmpl.erase(it) : std::next(it);
  }
  out.tensors = checked_tensors(p.data() + f.header_end, p.size() - kMacBytes - f.header_end, tmpl, h.rank,
                                std::nullopt, true);
  return out;
}

DecodedUpdate decode_update(const std::vector<uint8_t>& p, const Receiver& r, const std::string& expected_client,
                            const std::vector<int64_t>& open_rounds) {
  Framed f = unframe(p, r.max_bytes);
  const json& d = f.header;
  check_schema(d, update_fields(), "update", update_optional());
  if (d["spec"] != r.spec_digest)
    throw Refused("spec_mismatch", "adapter spec " + d["spec"].get<std::string>() + " != this run's " + r.spec_digest);
  if (d["run"] != r.run || d["client"] != expected_client)
    throw Refused("topic_mismatch", "header says run " + d["run"].dump() + " client " + d["client"].dump());
  if (std::find(open_rounds.begin(), open_rounds.end(), d["round"].get<int64_t>()) == open_rounds.end())
    throw Refused("wrong_round", "round " + d["round"].dump() + " is not open");
  verify_mac(p, f, d["auth"].get<std::string>(), r.key);
  DecodedUpdate out;
  UpdateHeader& h = out.header;
  h.run = d["run"];
  h.client = d["client"];
  h.method = d["method"];
  h.spec = d["spec"];
  h.msg_id = d["msg_id"];
  h.round = d["round"];
  h.num_examples = d["num_examples"];
  h.local_steps = d["local_steps"];
  h.compute_s = d["compute_s"].get<double>();
  h.sent_at = d["sent_at"].get<double>();
  h.rank = opt_int(d["rank"]);
  if (!d["heads"].is_null()) h.heads = d["heads"].get<std::vector<int64_t>>();
  h.is_signed = d["auth"] == kHmac;
  out.tensors = checked_tensors(p.data() + f.header_end, p.size() - kMacBytes - f.header_end, r.shapes, h.rank,
                                h.heads, false);
  return out;
}

bool is_sampled(const GlobalHeader& h, const std::string& client) {
  if (h.clients) return std::find(h.clients->begin(), h.clients->end(), client) != h.clients->end();
  auto digest = sha256(h.run + ":" + std::to_string(h.round) + ":" + client);
  uint64_t u = 0;
  for (int k = 0; k < 8; ++k) u = (u << 8) | digest[k];
  // u / 2^64 in double: u rounds to 53 bits, the division by a power of two is exact (as in Python).
  return static_cast<double>(u) / 18446744073709551616.0 < *h.sample_fraction;
}

}  // namespace fl
