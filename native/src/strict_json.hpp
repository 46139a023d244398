// JSON as the envelope reads it: UTF-8, no duplicate keys, no NaN/Infinity, nesting bounded.
#pragma once

#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "util.hpp"

namespace fl {

using json = nlohmann::json;

// Parse `text` strictly; throws fl::Error with a reason-free message (the caller names the reason).
inline json parse_strict_json(const char* begin, const char* end, int max_depth = 64) {
  std::vector<std::set<std::string>> keys;
  auto check = [&](int depth, json::parse_event_t event, json& parsed) -> bool {
    if (depth > max_depth) throw Error("JSON nested too deeply");
    if (event == json::parse_event_t::object_start) {
      keys.emplace_back();
    } else if (event == json::parse_event_t::object_end) {
      keys.pop_back();
    } else if (event == json::parse_event_t::key) {
      const auto& name = parsed.get_ref<const std::string&>();
      if (!keys.back().insert(name).second) throw Error("duplicate key " + name.substr(0, 40));
    }
    return true;
  };
  try {
    return json::parse(begin, end, check, true);
  } catch (const json::exception& e) {
    throw Error(std::string(e.what()).substr(0, 200));
  }
}

inline json parse_strict_json(const std::string& text) {
  return parse_strict_json(text.data(), text.data() + text.size());
}

}  // namespace fl
