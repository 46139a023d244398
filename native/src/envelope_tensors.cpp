#include "envelope_tensors.hpp"

#include <cmath>
#include <set>

#include "util.hpp"

namespace fl {

namespace {

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += std::to_string(s[i]) + (s.size() == 1 ? "," : (i + 1 < s.size() ? ", " : ""));
  return out + ")";
}

void need(bool ok, const std::string& message) {
  if (!ok) throw Refused("shape", message);
}

std::string strip(const std::string& s, const std::string& suffix) { return s.substr(0, s.size() - suffix.size()); }

void check_dtypes(const std::map<std::string, Entry>& entries) {
  for (const auto& [name, e] : entries) {
    bool index = ends_with(name, kRavanHeads) || name == kBaseVersion;
    if (index && e.dtype != "I64") throw Refused("dtype", name + ": must be I64, got " + e.dtype);
    if (!index && e.dtype != "F32" && e.dtype != "BF16" && e.dtype != "F16")
      throw Refused("dtype", name + ": dtype " + e.dtype.substr(0, 10) + " not in ['BF16', 'F16', 'F32']");
  }
}

void check_base_delta(const std::map<std::string, Entry>& entries, const std::set<std::string>& names,
                      const std::map<std::string, std::map<std::string, std::vector<int64_t>>>& lora) {
  if (!names.count(kBaseVersion)) throw Refused("missing_key", std::string("a base delta without ") + kBaseVersion);
  need(entries.at(kBaseVersion).shape.empty(), std::string(kBaseVersion) + ": want a scalar");
  std::set<std::string> prefixes;
  for (const auto& n : names) {
    if (n == kBaseVersion) continue;
    for (const char* s : {kBaseDeltaA, kBaseDeltaB, kBaseDelta})
      if (ends_with(n, s)) {
        prefixes.insert(strip(n, s));
        break;
      }
  }
  for (const auto& prefix : prefixes) {
    auto layer = lora.find(prefix);
    if (layer == lora.end() || !layer->second.count(prefix + kLoraA) || !layer->second.count(prefix + kLoraB))
      throw Refused("unknown_key", "a base delta for '" + prefix + "', not a LoRA layer here");
    int64_t d = layer->second.at(prefix + kLoraB)[0], k = layer->second.at(prefix + kLoraA)[1];
    auto find = [&](const char* s) -> const Entry* {
      auto it = entries.find(prefix + s);
      return it == entries.end() ? nullptr : &it->second;
    };
    const Entry *dense = find(kBaseDelta), *b = find(kBaseDeltaB), *a = find(kBaseDeltaA);
    if (dense) {
      if (a || b) throw Refused("shape", prefix + ": a base delta is dense or factored, not both");
      need(dense->shape == std::vector<int64_t>{d, k}, prefix + kBaseDelta + ": " + shape_str(dense->shape));
      continue;
    }
    if (!a || !b) throw Refused("missing_key", prefix + ": a factored base delta needs B and A");
    need(b->shape.size() == 2 && a->shape.size() == 2 && b->shape[0] == d && a->shape[1] == k &&
             b->shape[1] == a->shape[0] && a->shape[0] >= 1,
         prefix + ": base delta factors " + shape_str(b->shape) + " @ " + shape_str(a->shape));
  }
}

void check_against_template(const std::map<std::string, Entry>& entries, const Template& tmpl,
                            const std::optional<int64_t>& rank, const std::optional<std::vector<int64_t>>& heads,
                            bool allow_base_delta) {
  std::map<std::string, std::map<std::string, std::vector<int64_t>>> lora;
  std::map<std::string, std::vector<int64_t>> ravan, dense;
  std::map<std::string, std::string> ravan_s;
  for (const auto& [key, shape] : tmpl) {
    if (ends_with(key, kLoraA)) lora[strip(key, kLoraA)][key] = shape;
    else if (ends_with(key, kLoraB)) lora[strip(key, kLoraB)][key] = shape;
    else if (ends_with(key, kRavanH)) ravan[key] = shape;
    else if (ends_with(key, kRavanS) && tmpl.count(strip(key, kRavanS) + kRavanH)) ravan_s[key] = strip(key, kRavanS) + kRavanH;
    else dense[key] = shape;
  }
  std::set<std::string> names, delta;
  for (const auto& [n, e] : entries) (is_base_delta_key(n) ? delta : names).insert(n);
  if (!delta.empty() && !allow_base_delta) throw Refused("unknown_key", "only a global carries a base delta, got " + *delta.begin());
  if (!delta.empty()) check_base_delta(entries, delta, lora);
  std::set<std::string> index_keys;
  if (heads)
    for (const auto& [h, s] : ravan) index_keys.insert(strip(h, kRavanH) + kRavanHeads);
  std::vector<std::string> unknown, missing;
  for (const auto& n : names)
    if (!tmpl.count(n) && !index_keys.count(n)) unknown.push_back(n);
  if (!unknown.empty())
    throw Refused("unknown_key", std::to_string(unknown.size()) + " tensors not in the template, e.g. ['" + unknown[0] + "']");
  for (const auto& [k, s] : tmpl)
    if (!ravan_s.count(k) && !names.count(k)) missing.push_back(k);
  for (const auto& k : index_keys)
    if (!names.count(k)) missing.push_back(k);
  if (!missing.empty())
    throw Refused("missing_key", std::to_string(missing.size()) + " required tensors absent, e.g. ['" + missing[0] + "']");
  if (!lora.empty()) need(rank.has_value(), "the adapter has LoRA layers but the header gives no rank");
  else need(!rank.has_value(), "header gives a rank but the template has no LoRA layers");
  for (const auto& [prefix, layer] : lora)
    for (const auto& [key, t] : layer) {
      const auto& got = entries.at(key).shape;
      need(got.size() == 2, key + ": shape " + shape_str(got) + " is not 2-D");
      if (ends_with(key, kLoraA))
        need(got == std::vector<int64_t>{*rank, t[1]} && *rank <= t[0], key + ": " + shape_str(got) + " does not fit rank " + std::to_string(*rank));
      else
        need(got == std::vector<int64_t>{t[0], *rank} && *rank <= t[1], key + ": " + shape_str(got) + " does not fit rank " + std::to_string(*rank));
    }
  if (ravan.empty()) need(!heads.has_value(), "header names heads but the template has no Ravan layers");
  for (const auto& [h_key, t] : ravan) {
    if (heads)
      for (auto i : *heads)
        if (i < 0 || i >= t[0]) throw Refused("heads", h_key + ": header heads not all in [0, " + std::to_string(t[0]) + ")");
    int64_t k = heads ? static_cast<int64_t>(heads->size()) : t[0];
    std::vector<int64_t> want = t;
    want[0] = k;
    need(entries.at(h_key).shape == want, h_key + ": " + shape_str(entries.at(h_key).shape) + ", want " + shape_str(want));
    auto idx = entries.find(strip(h_key, kRavanH) + kRavanHeads);
    if (idx != entries.end()) need(idx->second.shape == std::vector<int64_t>{k}, idx->first + ": bad shape");
  }
  for (const auto& [s_key, h_key] : ravan_s) {
    auto it = entries.find(s_key);
    if (it == entries.end()) continue;
    int64_t k = heads ? static_cast<int64_t>(heads->size()) : ravan.at(h_key)[0];
    need(it->second.shape == std::vector<int64_t>{k}, s_key + ": " + shape_str(it->second.shape));
  }
  for (const auto& [key, t] : dense) need(entries.at(key).shape == t, key + ": " + shape_str(entries.at(key).shape) + ", want " + shape_str(t));
}

}  // namespace

TensorMap checked_tensors(const uint8_t* blob, size_t n, const Template& tmpl, const std::optional<int64_t>& rank,
                          const std::optional<std::vector<int64_t>>& heads, bool allow_base_delta) {
  auto entries = parse_tensor_header(blob, n);
  check_dtypes(entries);
  check_against_template(entries, tmpl, rank, heads, allow_base_delta);
  TensorMap tensors = load_tensors(blob, n, entries);
  for (const auto& [name, t] : tensors) {
    if (ends_with(name, kRavanHeads)) {
      if (!heads || t.i != *heads) throw Refused("heads", name + ": indices differ from the header's heads");
    } else if (name == kBaseVersion) {
      if (t.i.empty() || t.i[0] < 0) throw Refused("shape", name + ": is negative");
    } else {
      for (float v : t.f)
        if (!std::isfinite(v)) throw Refused("non_finite", name + ": contains NaN or infinity");
    }
  }
  return tensors;
}

}  // namespace fl
